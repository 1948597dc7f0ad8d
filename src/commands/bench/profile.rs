//! Where a decode step's time goes (`lab bench --profile`), by difference and isolation rather
//! than hardware counters: the host time to enqueue a step (launch-bound when it is as long as
//! the step), the step's GEMMs alone at the same batch, and its attention launches alone.

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::floor::{median, median_seconds};
use super::points::greedy_ids;
use crate::engine::attention::decode_meta;
use crate::engine::attention::paged_ops::paged_decode_attention;
use crate::engine::kv::paged::{BlockTable, PagedKvCache};
use crate::engine::load::LoadedModel;
use crate::engine::lora::slots::SlotBank;
use crate::engine::model::layers::Proj;
use crate::engine::model::{LogitsAt, PackedBatch};

/// The parts of one base decode step at `batch`.
#[derive(Debug, Clone)]
pub struct StepProfile {
    pub batch: usize,
    pub context: usize,
    /// Step wall time, synchronised (ms).
    pub step_ms: f64,
    /// Host time until the forward returned, before waiting for the device (ms).
    pub enqueue_ms: f64,
    /// Every projection and the lm_head as the model runs them at this batch (ms).
    pub gemm_ms: f64,
    /// The same products through cuBLAS (`matmul`), for comparison (ms).
    pub cublas_ms: f64,
    /// Every layer's paged decode attention alone (ms).
    pub attention_ms: f64,
    /// Every batched LoRA launch pair of a step alone, rows round-robin over the bank's
    /// adapters (ms); and the same launches with every row on the base (`NO_SLOT`: the kernels
    /// return at once), i.e. their fixed cost. `None` without adapters.
    pub lora_ms: Option<(f64, f64)>,
}

/// Profiles a base decode step of `batch` sequences at `context` positions each.
pub fn profile_step(
    m: &LoadedModel,
    bank: &SlotBank,
    adapters: usize,
    batch: usize,
    context: usize,
    repeats: usize,
) -> anyhow::Result<StepProfile> {
    let (model, cfg) = (&m.model, m.model.config());
    let device = model.device();
    let block = 16;
    let len = context + 4 * repeats + 8;
    let mut kv = PagedKvCache::new(cfg, batch * len.div_ceil(block), block, model.dtype(), device)?;
    let mut tables: Vec<BlockTable> = (0..batch).map(|_| BlockTable::default()).collect();
    for t in &mut tables {
        anyhow::ensure!(kv.reserve(t, len), "KV pool too small for the profile");
    }
    let vocab = cfg.vocab_size as u32;
    let mut prefill = PackedBatch::default();
    for i in 0..batch {
        let prompt: Vec<u32> = (0..context as u32).map(|p| (p * 31 + i as u32 * 7) % vocab).collect();
        prefill.push(&prompt, 0);
    }
    model.forward(&prefill, &mut kv.batch(tables.iter_mut().collect()), LogitsAt::Last)?;
    let (mut steps, mut enqueues) = (Vec::new(), Vec::new());
    for r in 0..repeats + 2 {
        let mut b = PackedBatch::default();
        for (i, t) in tables.iter().enumerate() {
            b.push(&[(i as u32 + 1) % vocab], t.len());
        }
        device.synchronize()?;
        let t0 = Instant::now();
        let logits = model.forward(&b, &mut kv.batch(tables.iter_mut().collect()), LogitsAt::Last)?;
        let enqueue = t0.elapsed().as_secs_f64();
        greedy_ids(&logits)?;
        let step = t0.elapsed().as_secs_f64();
        if r >= 2 {
            steps.push(step * 1e3);
            enqueues.push(enqueue * 1e3);
        }
    }
    let gemm_ms = gemm_alone(m, batch, repeats, true)? * 1e3;
    let cublas_ms = gemm_alone(m, batch, repeats, false)? * 1e3;
    let attention_ms = attention_alone(m, &kv, &tables, repeats)? * 1e3;
    let lora_ms = if adapters > 0 {
        let on = lora_alone(m, bank, batch, Some(adapters), repeats)? * 1e3;
        let off = lora_alone(m, bank, batch, None, repeats)? * 1e3;
        Some((on, off))
    } else {
        None
    };
    Ok(StepProfile {
        batch,
        context,
        step_ms: median(&mut steps),
        enqueue_ms: median(&mut enqueues),
        gemm_ms,
        cublas_ms,
        attention_ms,
        lora_ms,
    })
}

/// Seconds for the step's batched LoRA launches (q/k/v, o, gate/up, down per layer) over
/// `bank`, rows round-robin over `adapters` slots (`None`: every row base-only).
fn lora_alone(
    m: &LoadedModel,
    bank: &SlotBank,
    batch: usize,
    adapters: Option<usize>,
    repeats: usize,
) -> anyhow::Result<f64> {
    use crate::engine::lora::op::{bgmv, LoraWeights, NO_SLOT};
    use crate::engine::lora::{LoraModule, ProjKey};
    let (cfg, device, dtype) = (m.model.config(), m.model.device(), m.model.dtype());
    let slots: Vec<u32> = (0..batch).map(|i| adapters.map_or(NO_SLOT, |n| (i % n) as u32)).collect();
    let slots = Tensor::new(slots.as_slice(), device)?;
    let x = |k: usize| Tensor::randn(0f32, 1f32, (batch, k), device)?.to_dtype(dtype);
    let (xh, xi) = (x(cfg.hidden_size)?, x(cfg.intermediate_size)?);
    use LoraModule::*;
    let groups: [(&[LoraModule], &Tensor); 4] = [(&[Q, K, V], &xh), (&[O], &xh), (&[Gate, Up], &xh), (&[Down], &xi)];
    median_seconds(device, 1, repeats.max(1), || {
        for layer in 0..cfg.num_hidden_layers {
            for (modules, x) in &groups {
                let ws: Vec<_> = modules
                    .iter()
                    .map(|&module| bank.stacked(ProjKey { layer, module }).ok_or_else(|| anyhow::anyhow!("no slots")))
                    .collect::<anyhow::Result<_>>()?;
                let ys = modules
                    .iter()
                    .map(|md| Tensor::zeros((batch, md.dims(cfg).1), dtype, device))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                drop(bgmv(ys, x, &ws, &slots)?);
            }
        }
        Ok(())
    })
}

/// Seconds for `x W^T` over every projection weight and the lm_head, `x: [batch, in]`: as the
/// model's projections run it (`model_path`), or as a plain cuBLAS `matmul`.
fn gemm_alone(m: &LoadedModel, batch: usize, repeats: usize, model_path: bool) -> anyhow::Result<f64> {
    let weights = m.model.matmul_weights();
    let device = m.model.device();
    let mut inputs: Vec<(usize, Tensor)> = Vec::new();
    for w in &weights {
        let k = w.dim(1)?;
        if !inputs.iter().any(|(d, _)| *d == k) {
            inputs.push((k, Tensor::randn(0f32, 1f32, (batch, k), device)?.to_dtype(m.model.dtype())?));
        }
    }
    median_seconds(device, 1, repeats.max(1), || {
        for w in &weights {
            let x = &inputs.iter().find(|(d, _)| *d == w.dim(1).unwrap_or(0)).expect("an input per width").1;
            if model_path {
                drop(Proj::from_weight((*w).clone()).with_skinny(m.model.skinny()).forward(x)?);
            } else {
                drop(x.matmul(&w.t()?)?);
            }
        }
        Ok(())
    })
}

/// Seconds for one paged decode attention per layer over the step's tables.
fn attention_alone(m: &LoadedModel, kv: &PagedKvCache, tables: &[BlockTable], repeats: usize) -> anyhow::Result<f64> {
    let cfg = m.model.config();
    let device: &Device = m.model.device();
    let view = kv.view(tables.iter());
    let batch = tables.len();
    let q =
        Tensor::randn(0f32, 1f32, (batch, cfg.num_attention_heads, cfg.head_dim), device)?.to_dtype(m.model.dtype())?;
    let rows: Vec<u32> = (0..batch as u32).collect();
    let ctx: Vec<u32> = view.past.iter().map(|&p| p as u32).collect();
    let tables: Vec<&[u32]> = view.tables.iter().map(Vec::as_slice).collect();
    let meta = decode_meta(&rows, &ctx, &tables, view.block_size, device, m.model.grouped_attention())?;
    median_seconds(device, 1, repeats.max(1), || {
        for l in 0..cfg.num_hidden_layers {
            drop(paged_decode_attention(&q, &view.k[l], &view.v[l], &meta)?);
        }
        Ok(())
    })
}
