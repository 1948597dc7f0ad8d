//! The adapter being trained: one f32 `Var` pair per target projection, PEFT-initialised.
//!
//! Vars are keyed by PEFT names, so saving them writes the adapter file directly.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::engine::lora::{AdapterConfig, LoraAdapter, LoraModule, ProjKey};
use crate::engine::model::config::LlamaConfig;

use super::TrainError;

/// Trainable LoRA weights (`A: [r, in]`, `B: [out, r]`, f32 so AdamW moments stay f32).
pub struct TrainableLora {
    pub config: AdapterConfig,
    vars: BTreeMap<ProjKey, (Var, Var)>,
}

impl TrainableLora {
    /// PEFT init: `A ~ U(-1/sqrt(in), 1/sqrt(in))` (kaiming-uniform with a = sqrt(5)), `B = 0`.
    pub fn init(
        cfg: &LlamaConfig,
        config: AdapterConfig,
        modules: &[LoraModule],
        seed: u64,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let r = config.r;
        let mut vars = BTreeMap::new();
        for layer in 0..cfg.num_hidden_layers {
            for &module in modules {
                let (inp, out) = module.dims(cfg);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..r * inp).map(|_| rng.gen_range(-bound..bound)).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (r, inp), device)?)?;
                let b = Var::zeros((out, r), DType::F32, device)?;
                vars.insert(ProjKey { layer, module }, (a, b));
            }
        }
        Ok(Self { config, vars })
    }

    /// Trainable copies of an existing adapter's weights (resume, or fine-tune further).
    pub fn from_adapter(adapter: &LoraAdapter, device: &Device) -> Result<Self, TrainError> {
        let mut vars = BTreeMap::new();
        for (key, (a, b)) in &adapter.weights {
            let a = Var::from_tensor(&a.to_dtype(DType::F32)?.to_device(device)?)?;
            let b = Var::from_tensor(&b.to_dtype(DType::F32)?.to_device(device)?)?;
            vars.insert(*key, (a, b));
        }
        Ok(Self { config: adapter.config.clone(), vars })
    }

    /// A view for the forward: the tensors share storage (and gradient identity) with the vars.
    pub fn as_adapter(&self) -> LoraAdapter {
        let weights =
            self.vars.iter().map(|(k, (a, b))| (*k, (a.as_tensor().clone(), b.as_tensor().clone()))).collect();
        LoraAdapter { config: self.config.clone(), weights }
    }

    /// Every var with its PEFT name (`...q_proj.lora_A.weight`), in a fixed order.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::with_capacity(self.vars.len() * 2);
        for (key, (a, b)) in &self.vars {
            let p = key.peft_prefix();
            out.push((format!("{p}.lora_A.weight"), a));
            out.push((format!("{p}.lora_B.weight"), b));
        }
        out
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.vars.values().map(|(a, b)| a.elem_count() + b.elem_count()).sum()
    }
}
