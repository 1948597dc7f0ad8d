//! Shared helpers for the integration tests.
#![allow(dead_code)] // each test binary uses a subset

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lab::engine::load::source::{ensure_default_model, lab_home, local_dir_files};
use lab::engine::load::weights;
use lab::engine::model::config::LlamaConfig;
use lab::engine::model::Llama;

/// Path of a file under `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// The tiny random HF Llama made by `tests/fixtures/make_tiny_llama.py`.
pub fn tiny_hf_llama() -> Llama {
    let files = local_dir_files(&fixture("tiny-llama"), "tiny-llama").unwrap();
    let (cfg, vb) = weights::open(&files, DType::F32, &Device::Cpu).unwrap();
    Llama::load(vb, &cfg).unwrap()
}

/// A random Llama built in the test (seeded), with GQA and llama3 rope scaling.
pub fn random_llama(seed: u64) -> Llama {
    let mut cfg = LlamaConfig::preset("tiny").unwrap();
    cfg.vocab_size = 300;
    cfg.tie_word_embeddings = false;
    cfg.rope_scaling = LlamaConfig::preset("llama-3.1-8b").unwrap().rope_scaling;
    let mut t = weights::synthetic_tensors(&cfg, seed, DType::F32, &Device::Cpu).unwrap();
    // Wider weights than the synthetic default so logits are far from flat.
    for (name, w) in t.iter_mut() {
        if w.rank() == 2 {
            *w = (w.clone() * 10.0).unwrap();
        } else if name.contains("norm") {
            *w = Tensor::rand(0.5f32, 1.5, w.shape(), &Device::Cpu).unwrap();
        }
    }
    Llama::load(candle_nn::VarBuilder::from_tensors(t, DType::F32, &Device::Cpu), &cfg).unwrap()
}

/// The embedded default GGUF (fetched into `$LAB_HOME` on first use).
pub fn default_gguf() -> PathBuf {
    ensure_default_model(&lab_home()).expect("default model fetch")
}

/// `max |a - b| / max |b|` over two tensors of the same shape.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / scale.max(1e-12)
}

/// A random adapter of rank `r` on `modules` for `cfg` (B non-zero, so it changes outputs).
pub fn random_adapter(
    cfg: &LlamaConfig,
    r: usize,
    modules: &[lab::engine::lora::LoraModule],
    rslora: bool,
    seed: u64,
) -> lab::engine::lora::LoraAdapter {
    use lab::engine::lora::{AdapterConfig, LoraAdapter, ProjKey};
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rand_t = |rows: usize, cols: usize, a: f32| {
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-a..a)).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    };
    let mut weights = std::collections::BTreeMap::new();
    for layer in 0..cfg.num_hidden_layers {
        for &module in modules {
            let (inp, out) = module.dims(cfg);
            weights.insert(ProjKey { layer, module }, (rand_t(r, inp, 0.5), rand_t(out, r, 0.5)));
        }
    }
    LoraAdapter { config: AdapterConfig::new(r, 2.0 * r as f64, modules, rslora, "test"), weights }
}

/// Rewrites a PEFT adapter's `adapter_config.json` through `f`.
pub fn edit_config(dir: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

/// Rewrites a PEFT adapter's `adapter_model.safetensors` through `f`.
pub fn edit_tensors(dir: &std::path::Path, f: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let p = dir.join("adapter_model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &p).unwrap();
}
