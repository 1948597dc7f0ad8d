//! The stock candle-transformers Llama (`models::llama`, its own KV cache) on the same weights:
//! the reference a decode step of `lab` is compared with in the same process.

use std::time::Instant;

use candle_core::{Tensor, D};
use candle_transformers::models::llama as stock;
use rand::{Rng, SeedableRng};

use super::floor::median;
use crate::engine::load::{weights, LoadedModel};
use crate::engine::model::config::LlamaConfig;

/// One stock decode point (batch 1).
#[derive(Debug, Clone)]
pub struct StockPoint {
    pub context: usize,
    pub step_ms: f64,
}

/// candle-transformers' config for `cfg`.
fn stock_config(cfg: &LlamaConfig) -> stock::Config {
    stock::Config {
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        vocab_size: cfg.vocab_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_key_value_heads,
        use_flash_attn: false,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta as f32,
        bos_token_id: cfg.bos_token_id,
        eos_token_id: None,
        rope_scaling: cfg.rope_scaling.as_ref().map(|s| stock::Llama3RopeConfig {
            factor: s.factor as f32,
            low_freq_factor: s.low_freq_factor as f32,
            high_freq_factor: s.high_freq_factor as f32,
            original_max_position_embeddings: s.original_max_position_embeddings,
            rope_type: stock::Llama3RopeType::Llama3,
        }),
        max_position_embeddings: cfg.max_position_embeddings,
        tie_word_embeddings: cfg.tie_word_embeddings,
    }
}

/// Loads the stock model from the same files (synthetic: the same seeded weights), prefills a
/// random `context`-token prompt, then times `steps` greedy decode steps (forward + argmax +
/// its copy to the host, as `lab`'s points), median of `repeats`.
pub fn decode_point(m: &LoadedModel, context: usize, steps: usize, repeats: usize) -> anyhow::Result<StockPoint> {
    let (model, cfg) = (&m.model, m.model.config());
    let (_, vb) = weights::open(&m.files, model.dtype(), model.device())?;
    let scfg = stock_config(cfg);
    let llama = stock::Llama::load(vb, &scfg)?;
    let mut cache = stock::Cache::new(true, model.dtype(), &scfg, model.device())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(context as u64);
    let prompt: Vec<u32> = (0..context.max(1)).map(|_| rng.gen_range(0..cfg.vocab_size as u32)).collect();
    let dev = model.device();
    let logits = llama.forward(&Tensor::new(prompt.as_slice(), dev)?.unsqueeze(0)?, 0, &mut cache)?;
    let mut tok = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0];
    let mut pos = prompt.len();
    let mut step = || -> anyhow::Result<()> {
        let logits = llama.forward(&Tensor::new(&[tok], dev)?.unsqueeze(0)?, pos, &mut cache)?;
        tok = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0];
        pos += 1;
        Ok(())
    };
    step()?;
    step()?;
    let mut samples = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        dev.synchronize()?;
        let t = Instant::now();
        for _ in 0..steps.max(1) {
            step()?;
        }
        dev.synchronize()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64);
    }
    Ok(StockPoint { context: context + 2 + repeats * steps / 2, step_ms: median(&mut samples) })
}
