//! The two ceilings a benchmark point is judged against, measured in the same process, and the
//! bytes a decode step cannot avoid reading.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::engine::{Llama, LlamaConfig};

/// Measured ceilings of the device.
#[derive(Debug, Clone, Copy)]
pub struct Ceilings {
    /// Device-to-device copy, bytes read + written per second.
    pub copy_bytes_per_s: f64,
    /// Dense matmul in the run dtype, FLOP per second (None where not measured).
    pub matmul_flop_per_s: Option<f64>,
}

/// Copy bandwidth (a large buffer copied repeatedly; bytes read + written, as the peer counts)
/// and, on CUDA, the dense matmul rate on random data.
pub fn measure(device: &Device, dtype: DType) -> anyhow::Result<Ceilings> {
    let elems = if device.is_cuda() { 1usize << 30 } else { 1 << 26 }; // 2 GiB / 128 MiB of bf16
    let x = Tensor::rand(-1f32, 1f32, elems, device)?.to_dtype(DType::BF16)?;
    let copy_s = median_seconds(device, 3, 10, || Ok(drop(x.copy()?)))?;
    let copy_bytes_per_s = 2.0 * (elems * 2) as f64 / copy_s;
    drop(x);
    let matmul_flop_per_s = if device.is_cuda() {
        let n = 8192;
        let a = Tensor::randn(0f32, 1f32, (n, n), device)?.to_dtype(dtype)?;
        let b = Tensor::randn(0f32, 1f32, (n, n), device)?.to_dtype(dtype)?;
        let s = median_seconds(device, 3, 10, || Ok(drop(a.matmul(&b)?)))?;
        Some(2.0 * (n as f64).powi(3) / s)
    } else {
        None
    };
    Ok(Ceilings { copy_bytes_per_s, matmul_flop_per_s })
}

/// Median over `samples` of the time of one call of `f`, after `warmup` calls, synchronised.
pub fn median_seconds(
    device: &Device,
    warmup: usize,
    samples: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(&mut times))
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Weight bytes a decode step reads: every matrix and norm, and of the embedding table only
/// its rows (negligible) unless it doubles as the lm_head (tied), which reads it whole.
pub fn weight_bytes_read(model: &Llama) -> f64 {
    let cfg = model.config();
    let elem = model.dtype().size_in_bytes() as f64;
    let mut params = model.num_parameters() as f64;
    if !cfg.tie_word_embeddings {
        params -= (cfg.vocab_size * cfg.hidden_size) as f64;
    }
    params * elem
}

/// KV bytes one decode step reads: keys and values of every layer over `total_context`
/// positions (summed over the batch).
pub fn kv_bytes_read(cfg: &LlamaConfig, total_context: usize, dtype: DType) -> f64 {
    (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.size_in_bytes() * total_context) as f64
}

/// Adapter bytes one step reads for `distinct` adapters of rank `r` on all seven projections.
pub fn adapter_bytes_read(cfg: &LlamaConfig, distinct: usize, r: usize, dtype: DType) -> f64 {
    use crate::engine::lora::LoraModule;
    let per_layer: usize = LoraModule::ALL.iter().map(|m| m.dims(cfg)).map(|(i, o)| r * (i + o)).sum();
    (distinct * per_layer * cfg.num_hidden_layers * dtype.size_in_bytes()) as f64
}

/// Matmul FLOP of a prefill of `len` tokens: the projections and lm_head of the last token,
/// plus causal attention (QK^T and PV over half the square).
pub fn prefill_flop(model: &Llama, len: usize) -> f64 {
    let cfg = model.config();
    let vocab_mats = if cfg.tie_word_embeddings { 1.0 } else { 2.0 };
    let matrices = model.num_parameters() as f64 - vocab_mats * (cfg.vocab_size * cfg.hidden_size) as f64;
    let proj = 2.0 * matrices * len as f64;
    let attn =
        2.0 * 2.0 * (len * len) as f64 / 2.0 * (cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers) as f64;
    proj + attn + 2.0 * (cfg.vocab_size * cfg.hidden_size) as f64
}
