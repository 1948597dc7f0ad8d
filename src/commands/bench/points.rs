//! The measured points of `lab bench`: decode steps of a batch in the paged pool, and prefill.

use std::time::Instant;

use candle_core::{Tensor, D};
use rand::{Rng, SeedableRng};

use super::floor::{self, median};
use crate::cli::BenchArgs;
use crate::engine::graph::{DecodeGraphs, GraphConfig};
use crate::engine::kv::paged::{BlockTable, PagedKvCache};
use crate::engine::load::LoadedModel;
use crate::engine::lora::slots::{PendingWrite, SlotBank, SlotImage};
use crate::engine::lora::LoraAdapter;
use crate::engine::model::{LogitsAt, PackedBatch};
use crate::engine::sampling::op::{RowParam, RowParams};

/// Positions per KV block (the server's default).
const BLOCK: usize = 16;
/// Packed tokens per prefill forward when filling a batch.
const PREFILL_CHUNK: usize = 16_384;

/// One (batch size, distinct adapters) decode point.
#[derive(Debug, Clone)]
pub struct DecodePoint {
    pub batch: usize,
    pub adapters: usize,
    /// Replayed as a CUDA graph (else eager launches).
    pub graph: bool,
    /// Mean context per sequence over the timed steps.
    pub context: usize,
    /// Median step time, ms (forward + greedy pick of every row + its copy to the host).
    pub step_ms: f64,
    /// Bytes the step must read: weights + KV + adapters.
    pub floor_bytes: f64,
    /// `--load-while-decoding` (graph points): the median step while adapter hot loads run
    /// back to back on the copy stream (what a server's running batch sees during loads), and
    /// the loads that landed meanwhile.
    pub loading: Option<(f64, usize)>,
}

/// Hot loads kept running beside decode steps: one staged adapter copied again and again into
/// a bank of its own (the copy is the same DMA a serving bank's free slot takes).
struct LoadLoop {
    bank: SlotBank,
    adapter: LoraAdapter,
    image: SlotImage,
    pending: Option<PendingWrite>,
    landed: usize,
}

impl LoadLoop {
    fn new(m: &LoadedModel, rank: usize) -> anyhow::Result<Option<Self>> {
        let (cfg, dtype, device) = (m.model.config(), m.model.dtype(), m.model.device());
        let bank = SlotBank::new(cfg, 1, rank, dtype, device)?;
        let Some(stager) = bank.stager() else { return Ok(None) };
        let adapter = LoraAdapter::random(cfg, rank, 11, dtype, &candle_core::Device::Cpu)?;
        let image = stager.stage(&adapter)?;
        Ok(Some(Self { bank, adapter, image, pending: None, landed: 0 }))
    }

    /// Starts the next copy once the last one has landed.
    fn tick(&mut self) -> anyhow::Result<()> {
        if let Some(w) = &self.pending {
            if !self.bank.poll_write(w)? {
                return Ok(());
            }
            self.landed += 1;
        }
        self.pending = Some(self.bank.begin_write(0, &self.adapter, &self.image)?);
        Ok(())
    }
}

/// One prefill point (batch 1, base only).
#[derive(Debug, Clone)]
pub struct PrefillPoint {
    pub len: usize,
    pub ms: f64,
    pub flop: f64,
}

/// Prefills `batch` random prompts, then times decode steps with each count of distinct
/// adapters in `args.adapters` (rows round-robin over slots `0..n`).
pub fn decode_points(
    m: &LoadedModel,
    bank: &SlotBank,
    batch: usize,
    args: &BenchArgs,
) -> anyhow::Result<Vec<DecodePoint>> {
    let (model, cfg) = (&m.model, m.model.config());
    // Every point runs eagerly and, on CUDA unless --enforce-eager, again as graph replays
    // (what `lab serve` runs; adapters through the batched LoRA kernels), so both land in one
    // table.
    let graphs_on = model.device().is_cuda() && !args.enforce_eager;
    let modes: Vec<(usize, bool)> =
        args.adapters.iter().flat_map(|&n| std::iter::once((n, false)).chain(graphs_on.then_some((n, true)))).collect();
    let steps_per_point = 2 + args.repeats * args.decode_steps;
    // Every point starts from the prefilled prompts (tables rewound), so all run at one context.
    let max_len = args.prompt_len + steps_per_point + 1;
    let mut kv = PagedKvCache::new(cfg, batch * max_len.div_ceil(BLOCK), BLOCK, model.dtype(), model.device())?;
    let mut tables: Vec<BlockTable> = (0..batch).map(|_| BlockTable::default()).collect();
    for t in &mut tables {
        anyhow::ensure!(kv.reserve(t, max_len), "KV pool too small for the benchmark");
    }
    let vocab = cfg.vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(batch as u64);
    let per_chunk = (PREFILL_CHUNK / args.prompt_len.max(1)).max(1);
    for group in tables.chunks_mut(per_chunk) {
        let mut b = PackedBatch::default();
        for _ in 0..group.len() {
            let prompt: Vec<u32> = (0..args.prompt_len).map(|_| rng.gen_range(0..vocab)).collect();
            b.push(&prompt, 0);
        }
        model.forward(&b, &mut kv.batch(group.iter_mut().collect()), LogitsAt::Last)?;
    }
    let mut graphs = DecodeGraphs::new(GraphConfig { max_batch: batch, max_context: max_len });
    let mut load_loop = if args.load_while_decoding { LoadLoop::new(m, args.lora_rank)? } else { None };
    let greedy = RowParams(vec![RowParam::GREEDY; batch]);
    let mut out = Vec::new();
    let prefilled: Vec<usize> = tables.iter().map(|t| t.len()).collect();
    for (n, graph) in modes {
        for (t, &len) in tables.iter_mut().zip(&prefilled) {
            t.rewind(len);
        }
        let slot = |i: usize| (n > 0).then_some(i % n.max(1));
        let mut step = |tables: &mut [BlockTable]| -> anyhow::Result<()> {
            let mut b = PackedBatch::default();
            for (i, t) in tables.iter().enumerate() {
                b.push_with_slot(&[(t.len() as u32 + i as u32) % vocab], t.len(), slot(i));
            }
            let mut kv = kv.batch(tables.iter_mut().collect());
            if graph {
                let ids = graphs.decode(model, &b, &mut kv, &greedy, Some(bank))?;
                anyhow::ensure!(ids.is_some(), "batch {batch} did not fit a decode graph");
            } else {
                greedy_ids(&model.forward_lora(&b, &mut kv, Some(bank), LogitsAt::Last)?)?;
            }
            Ok(())
        };
        step(&mut tables)?; // graph: the capture
        step(&mut tables)?;
        let ctx_start: usize = tables.iter().map(|t| t.len()).sum();
        let mut timed = |tables: &mut [BlockTable], mut loads: Option<&mut LoadLoop>| -> anyhow::Result<f64> {
            let mut samples = Vec::with_capacity(args.repeats);
            for _ in 0..args.repeats.max(1) {
                model.device().synchronize()?;
                let t = Instant::now();
                for _ in 0..args.decode_steps.max(1) {
                    if let Some(l) = loads.as_deref_mut() {
                        l.tick()?;
                    }
                    step(tables)?;
                }
                model.device().synchronize()?;
                samples.push(t.elapsed().as_secs_f64() * 1e3 / args.decode_steps.max(1) as f64);
            }
            Ok(median(&mut samples))
        };
        let step_ms = timed(&mut tables, None)?;
        let ctx_end: usize = tables.iter().map(|t| t.len()).sum();
        let loading = match load_loop.as_mut().filter(|_| graph) {
            Some(l) => {
                // Rewound, so the loaded steps run at the context of the plain ones.
                for (t, &len) in tables.iter_mut().zip(&prefilled) {
                    t.rewind(len + 2);
                }
                let landed = l.landed;
                Some((timed(&mut tables, Some(l))?, l.landed - landed))
            }
            None => None,
        };
        let mean_total_ctx = (ctx_start + ctx_end) / 2;
        let floor_bytes = floor::weight_bytes_read(model)
            + floor::kv_bytes_read(cfg, mean_total_ctx, model.dtype())
            + floor::adapter_bytes_read(cfg, n.min(batch), args.lora_rank, model.dtype());
        out.push(DecodePoint {
            batch,
            adapters: n,
            graph,
            context: mean_total_ctx / batch.max(1),
            step_ms,
            floor_bytes,
            loading,
        });
    }
    Ok(out)
}

/// The greedy token of every row, picked on the device; only the ids come back.
pub fn greedy_ids(logits: &Tensor) -> anyhow::Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// Times the prefill of one random prompt of `len` tokens (median of `repeats`).
pub fn prefill_point(m: &LoadedModel, len: usize, repeats: usize) -> anyhow::Result<PrefillPoint> {
    let (model, cfg) = (&m.model, m.model.config());
    let mut kv = PagedKvCache::new(cfg, len.div_ceil(BLOCK), BLOCK, model.dtype(), model.device())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(len as u64);
    let prompt: Vec<u32> = (0..len).map(|_| rng.gen_range(0..cfg.vocab_size as u32)).collect();
    let mut b = PackedBatch::default();
    b.push(&prompt, 0);
    let mut once = || -> anyhow::Result<()> {
        let mut table = BlockTable::default();
        anyhow::ensure!(kv.reserve(&mut table, len), "KV pool too small for the prefill point");
        let logits = model.forward(&b, &mut kv.batch(vec![&mut table]), LogitsAt::Last)?;
        greedy_ids(&logits)?;
        kv.release(&mut table);
        Ok(())
    };
    let s = floor::median_seconds(model.device(), 1, repeats.max(1), &mut once)?;
    Ok(PrefillPoint { len, ms: s * 1e3, flop: floor::prefill_flop(model, len) })
}
