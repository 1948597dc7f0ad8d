//! Sizing the KV pool from `--gpu-memory-utilization`, as vLLM does: the server may hold
//! `utilization x total` device bytes; what the weights, the adapter slots and the peak
//! activations of the largest step leave of that is the KV pool.
//!
//! The peak is measured, not estimated: one profile step of the largest shapes the scheduler
//! can form (a `max_num_batched_tokens` prefill, then a `max_num_seqs` decode) runs through a
//! throwaway pool first. The engine's memory pool keeps what it freed (see
//! `cuda::open_device`), so the driver's "used" figure after the profile includes the peak.

use candle_core::{DType, Device};

use crate::engine::kv::paged::{BlockTable, PagedKvCache};
use crate::engine::model::{Llama, LogitsAt, PackedBatch};
use crate::engine::{EngineError, Result};

/// Device memory set aside for the decode graphs' own pools (captured once at start-up, after
/// the KV pool exists). A fixed reserve, not a measurement: the 8B shape's 26 buckets were
/// captured within it on the H200 (2026-12-02); their own size is not measured yet.
pub const GRAPH_RESERVE_BYTES: usize = 1 << 30;

/// The largest step the scheduler may form.
#[derive(Debug, Clone, Copy)]
pub struct StepShape {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub block_size: usize,
}

/// What the profile found and what it leaves for the KV pool.
#[derive(Debug, Clone, Copy)]
pub struct KvBudget {
    pub utilization: f64,
    pub total_bytes: usize,
    /// Used after the profile step (weights, slots, the pool's peak, other processes).
    pub used_bytes: usize,
    /// Used before it (so `used - before` is the profile's peak activations).
    pub used_before_bytes: usize,
    pub kv_bytes: usize,
}

impl std::fmt::Display for KvBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "--gpu-memory-utilization {:.2} of {:.1} GiB: {:.1} GiB in use before the profile step, {:.1} GiB after it \
             (peak activations), {:.1} GiB kept for decode graphs -> {:.1} GiB of KV cache",
            self.utilization,
            gib(self.total_bytes),
            gib(self.used_before_bytes),
            gib(self.used_bytes),
            gib(GRAPH_RESERVE_BYTES),
            gib(self.kv_bytes)
        )
    }
}

/// Runs the profile step and returns the KV budget. `extra_bytes` is device memory that will
/// be allocated later but is not yet (the adapter slots, when the bank is made after sizing).
pub fn profile(
    model: &Llama,
    dtype: DType,
    shape: StepShape,
    utilization: f64,
    extra_bytes: usize,
) -> Result<KvBudget> {
    let device = model.device().clone();
    let (free0, total) = mem_info(&device)?;
    profile_step(model, dtype, shape)?;
    let (free1, _) = mem_info(&device)?;
    let allowed = (utilization * total as f64) as usize;
    let used = total - free1;
    let kv_bytes = allowed.saturating_sub(used + extra_bytes + GRAPH_RESERVE_BYTES);
    let budget =
        KvBudget { utilization, total_bytes: total, used_bytes: used, used_before_bytes: total - free0, kv_bytes };
    if kv_bytes == 0 {
        return Err(EngineError::Device(format!(
            "no device memory left for the KV cache ({budget}): raise --gpu-memory-utilization or lower \
             --max-num-batched-tokens / --max-num-seqs / --max-loras"
        )));
    }
    Ok(budget)
}

/// A `max_num_batched_tokens` prefill of one sequence, then a decode of `max_num_seqs` rows,
/// through a pool just big enough for them.
fn profile_step(model: &Llama, dtype: DType, s: StepShape) -> Result<()> {
    let cfg = model.config();
    let prompt_len = s.max_num_batched_tokens.min(cfg.max_position_embeddings.saturating_sub(1)).max(1);
    let bs = s.block_size.max(1);
    let blocks = prompt_len.div_ceil(bs) + s.max_num_seqs * 2usize.div_ceil(bs) + 1;
    let mut kv = PagedKvCache::new(cfg, blocks, bs, dtype, model.device())?;
    let oom = |e: EngineError| {
        EngineError::Device(format!(
            "the profile step (a {prompt_len}-token prefill, a {}-row decode) failed: {e}; lower \
             --max-num-batched-tokens or --max-num-seqs",
            s.max_num_seqs
        ))
    };
    let vocab = cfg.vocab_size as u32;
    let mut table = BlockTable::default();
    if !kv.reserve(&mut table, prompt_len) {
        return Err(EngineError::Device("the profile pool is too small (a bug)".into()));
    }
    let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| (i * 7919) % vocab).collect();
    let mut b = PackedBatch::default();
    b.push(&prompt, 0);
    model.forward(&b, &mut kv.batch(vec![&mut table]), LogitsAt::Last).map_err(oom)?;
    kv.release(&mut table);
    let mut tables: Vec<BlockTable> = (0..s.max_num_seqs).map(|_| BlockTable::default()).collect();
    for t in &mut tables {
        if !kv.reserve(t, 2) {
            return Err(EngineError::Device("the profile pool is too small (a bug)".into()));
        }
    }
    let mut d = PackedBatch::default();
    for i in 0..s.max_num_seqs {
        d.push(&[(i as u32 * 31) % vocab, 1], 0);
    }
    model.forward(&d, &mut kv.batch(tables.iter_mut().collect()), LogitsAt::Last).map_err(oom)?;
    model.device().synchronize()?;
    Ok(())
}

#[cfg(feature = "cuda")]
fn mem_info(device: &Device) -> Result<(usize, usize)> {
    crate::engine::cuda::mem_info(device)
}

#[cfg(not(feature = "cuda"))]
fn mem_info(_device: &Device) -> Result<(usize, usize)> {
    Err(EngineError::Device("--gpu-memory-utilization sizes the KV cache on CUDA only: pass --kv-cache-memory".into()))
}
