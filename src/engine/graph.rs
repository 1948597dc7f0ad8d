//! Decode steps as CUDA graphs: one graph per batch-size bucket, replayed with new inputs in
//! the same device buffers.
//!
//! A batch-1 decode step of the 8B model is ~1,000 kernel launches; queuing them from the host
//! takes longer than the GPU needs to run them (measured: 5.8 ms of host enqueue for a 4.9 ms
//! step of GEMMs). A graph is queued in one call.
//!
//! ```text
//! bucket B (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256; at most the batch cap),
//! twice: base only, and with adapters:
//!   meta [10B + MB*B] u32 = ids[B] | positions[B] | slots[B] | rows[B] | ctx[B] | sampling[4B]
//!                           | adapters[B] | tables[MB, B]
//!   capture:  logits = forward_static_decode(meta views [, slot bank + adapters]);
//!             out[B] = sample_ids(logits, sampling)
//! step of m <= B decode rows:
//!   meta <- the m rows, then B - m padding rows (token 0, slot SKIP: no KV write, ctx 0: no
//!           keys read, greedy, adapter NO_SLOT: no LoRA); one upload, of the fields and the
//!           tables' first blocks only
//!           (tables are block-major, so the blocks in use are a prefix; stale entries past a
//!           row's context are never read)
//!   launch the graph; read out[..m]; commit one position per sequence
//! ```
//! `MB` (blocks per table) covers the longest context the server allows, so a table always fits
//! and the kernels' grids do not depend on the step; the paged decode kernel splits each query's
//! actual keys (read from `ctx` on the device) over its fixed grid.
//!
//! Rows are independent in every op of a decode step (GEMMs, norms, attention, sampling), so a
//! request's tokens do not depend on its bucket or its neighbours; `lab selftest` checks replay
//! against the eager path. A step with adapters replays the adapter graph, whose LoRA kernels
//! read each row's slot and each slot's rank from the device (`kernels/lora.cu`), so one graph
//! serves every mix of adapters and a load between steps needs no new capture. Steps with
//! prefill chunks run eagerly.
//!
//! On the CPU the same static path runs eagerly (no graph), which lets the tests check the
//! padding and buffer layout without a GPU.

use std::collections::BTreeMap;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor, TensorId};

use crate::engine::attention::paged_ops::{DecodeMeta, SKIP_SLOT};
use crate::engine::attention::PagedPlan;
use crate::engine::kv::{KvStore, PagedView};
use crate::engine::lora::op::{LoraWeights, NO_SLOT};
use crate::engine::model::{Llama, PackedBatch};
use crate::engine::sampling::op::{pack, sample_ids, RowParam, RowParams};
use crate::engine::Result;

/// Batch sizes that get a graph (vLLM-like spacing: exact for tiny batches, then coarser).
pub const BUCKETS: [usize; 13] = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256];

/// How decode graphs are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphConfig {
    /// Largest decode batch that replays a graph (rounded up to a bucket; larger batches run
    /// eagerly).
    pub max_batch: usize,
    /// Longest context (positions) a replayed sequence may reach.
    pub max_context: usize,
}

/// The decode graphs of one model over one KV pool.
pub struct DecodeGraphs {
    cfg: GraphConfig,
    sizes: Vec<usize>,
    /// The pool the graphs write into (its first key tensor); a different pool drops them.
    pool: Option<TensorId>,
    /// By (bucket, with adapters).
    steps: BTreeMap<(usize, bool), StaticStep>,
    replays: u64,
}

/// One bucket: its static buffers and, on CUDA, the captured graph.
struct StaticStep {
    size: usize,
    /// Captured with the LoRA kernels (reading the slot bank) on every projection.
    lora: bool,
    /// Blocks per table row.
    max_blocks: usize,
    meta: Tensor,
    out: Tensor,
    plan: PagedPlan,
    #[cfg(feature = "cuda")]
    graph: Option<crate::engine::cuda::graph::Graph>,
}

impl DecodeGraphs {
    pub fn new(cfg: GraphConfig) -> Self {
        let cap = BUCKETS.iter().copied().find(|&b| b >= cfg.max_batch).unwrap_or(BUCKETS[BUCKETS.len() - 1]);
        let sizes = BUCKETS.iter().copied().filter(|&b| b <= cap).collect();
        Self { cfg, sizes, pool: None, steps: BTreeMap::new(), replays: 0 }
    }

    /// The largest batch that replays a graph.
    pub fn max_batch(&self) -> usize {
        self.sizes.last().copied().unwrap_or(0)
    }

    /// Steps served by a graph replay so far.
    pub fn replays(&self) -> u64 {
        self.replays
    }

    /// Buckets built so far.
    pub fn num_captured(&self) -> usize {
        self.steps.len()
    }

    /// Builds (on CUDA: captures) every bucket over the pool `k`/`v` now, so no request waits for
    /// a capture: base-only, and with `bank`'s adapters when given. The bank's storage must
    /// stay where it is for the graphs' lifetime (a [`crate::engine::lora::slots::SlotBank`]
    /// allocates once and writes in place). Returns how many were built.
    pub fn build_all(&mut self, model: &Llama, pool: &PagedView, bank: Option<&dyn LoraWeights>) -> Result<usize> {
        for size in self.sizes.clone() {
            self.bucket(model, pool, size, None)?;
            if bank.is_some() {
                self.bucket(model, pool, size, bank)?;
            }
        }
        Ok(self.steps.len())
    }

    /// Runs `batch` as a graph replay when it is a decode step that fits a bucket (rows with
    /// adapters need `bank`, the slots they name): returns every sequence's next token (sampled
    /// with `params`, one per sequence) and commits one position per sequence to `kv`.
    /// `Ok(None)`: not a graph step; run it eagerly.
    pub fn decode(
        &mut self,
        model: &Llama,
        batch: &PackedBatch,
        kv: &mut dyn KvStore,
        params: &RowParams,
        bank: Option<&dyn LoraWeights>,
    ) -> Result<Option<Vec<u32>>> {
        let m = batch.seqs.len();
        let adapters = batch.seqs.iter().any(|s| s.slot.is_some());
        let graphable = m > 0
            && params.0.len() == m
            && batch.seqs.iter().all(|s| s.len == 1)
            && (!adapters || bank.is_some())
            && batch.seqs.iter().all(|s| s.past_len < self.cfg.max_context.min(model.static_positions()));
        let Some(size) = self.sizes.iter().copied().find(|&b| b >= m).filter(|_| graphable) else {
            return Ok(None);
        };
        let Some(view) = kv.paged_view() else { return Ok(None) };
        let bank = if adapters { bank } else { None };
        let step = self.bucket(model, &view, size, bank)?;
        if view.tables.iter().any(|t| t.len() > step.max_blocks) {
            return Ok(None);
        }
        let used = view.tables.iter().map(|t| t.len()).max().unwrap_or(0);
        step.meta.inplace_op1(&Upload(fill(step.size, used, batch, &view, params)))?;
        step.run(model, bank)?;
        let ids = step.out.narrow(0, 0, m)?.to_vec1::<u32>()?;
        kv.commit(&vec![1; m]);
        self.replays += 1;
        Ok(Some(ids))
    }

    /// The bucket of `size` over `pool` (with `bank`'s adapters when given), built on first use.
    fn bucket(
        &mut self,
        model: &Llama,
        pool: &PagedView,
        size: usize,
        bank: Option<&dyn LoraWeights>,
    ) -> Result<&mut StaticStep> {
        let id = pool.k.first().map(|t| t.id());
        if self.pool != id {
            self.steps.clear();
            self.pool = id;
        }
        let key = (size, bank.is_some());
        if !self.steps.contains_key(&key) {
            let max_blocks = self.cfg.max_context.div_ceil(pool.block_size).max(1);
            let step = StaticStep::build(model, pool, size, max_blocks, bank)?;
            self.steps.insert(key, step);
        }
        Ok(self.steps.get_mut(&key).expect("inserted above"))
    }
}

/// Offsets of the fields of a bucket's `meta` buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MetaLayout {
    b: usize,
    mb: usize,
}

impl MetaLayout {
    const IDS: usize = 0;
    const POSITIONS: usize = 1;
    const SLOTS: usize = 2;
    const ROWS: usize = 3;
    const CTX: usize = 4;
    const SAMPLING: usize = 5;
    const ADAPTERS: usize = 9;
    const TABLES: usize = 10;

    fn len(&self) -> usize {
        Self::TABLES * self.b + self.b * self.mb
    }
}

/// The first entries of `meta` for `batch` in a bucket of `b` rows: every field and the first
/// `mb` blocks of each table (at least every block in use).
fn fill(b: usize, mb: usize, batch: &PackedBatch, view: &PagedView, params: &RowParams) -> Vec<u32> {
    let lay = MetaLayout { b, mb };
    let mut v = vec![0u32; lay.len()];
    let bs = view.block_size;
    for (i, (span, table)) in batch.seqs.iter().zip(&view.tables).enumerate() {
        let p = span.past_len;
        v[MetaLayout::IDS * b + i] = batch.tokens[i];
        v[MetaLayout::POSITIONS * b + i] = p as u32;
        v[MetaLayout::SLOTS * b + i] = table[p / bs] * bs as u32 + (p % bs) as u32;
        v[MetaLayout::CTX * b + i] = p as u32 + 1;
        v[MetaLayout::ADAPTERS * b + i] = span.slot.map_or(NO_SLOT, |s| s as u32);
        for (j, &block) in table.iter().enumerate().take(mb) {
            v[MetaLayout::TABLES * b + j * b + i] = block;
        }
    }
    for i in batch.seqs.len()..b {
        v[MetaLayout::SLOTS * b + i] = SKIP_SLOT;
        v[MetaLayout::ADAPTERS * b + i] = NO_SLOT;
    }
    for (i, r) in v[MetaLayout::ROWS * b..][..b].iter_mut().enumerate() {
        *r = i as u32;
    }
    let mut rows = params.0.clone();
    rows.resize(b, RowParam::GREEDY);
    v[MetaLayout::SAMPLING * b..][..4 * b].copy_from_slice(&pack(&RowParams(rows)));
    v
}

/// The static buffers of a padding-only step (what a bucket holds before its first replay).
fn padding(b: usize, mb: usize, block_size: usize) -> Vec<u32> {
    let view = PagedView { block_size, k: vec![], v: vec![], tables: vec![], past: vec![] };
    fill(b, mb, &PackedBatch::default(), &view, &RowParams::default())
}

impl StaticStep {
    fn build(model: &Llama, pool: &PagedView, b: usize, mb: usize, bank: Option<&dyn LoraWeights>) -> Result<Self> {
        let dev = model.device();
        let lay = MetaLayout { b, mb };
        let meta = Tensor::from_vec(padding(b, mb, pool.block_size), lay.len(), dev)?;
        let field = |f: usize, n: usize| meta.narrow(0, f * b, n);
        let decode = DecodeMeta {
            rows: field(MetaLayout::ROWS, b)?,
            tables: field(MetaLayout::TABLES, b * mb)?.reshape((mb, b))?,
            block_major: true,
            grouped: model.grouped_attention(),
            ctx: field(MetaLayout::CTX, b)?,
            max_blocks: mb,
            block_size: pool.block_size,
        };
        let slots = field(MetaLayout::SLOTS, b)?;
        let plan = PagedPlan::static_decode(pool.k.clone(), pool.v.clone(), pool.block_size, slots, decode);
        let out = Tensor::zeros(b, DType::U32, dev)?;
        #[allow(unused_mut)]
        let mut step = Self {
            size: b,
            lora: bank.is_some(),
            max_blocks: mb,
            meta,
            out,
            plan,
            #[cfg(feature = "cuda")]
            graph: None,
        };
        #[cfg(feature = "cuda")]
        if dev.is_cuda() {
            let graph = crate::engine::cuda::graph::Graph::capture(dev, || step.body(model, bank))?;
            step.graph = Some(graph);
        }
        Ok(step)
    }

    /// The step itself: forward over the static inputs, sampling, ids into `out`.
    fn body(&self, model: &Llama, bank: Option<&dyn LoraWeights>) -> Result<()> {
        let b = self.size;
        let ids = self.meta.narrow(0, MetaLayout::IDS * b, b)?;
        let positions = self.meta.narrow(0, MetaLayout::POSITIONS * b, b)?;
        let sampling = self.meta.narrow(0, MetaLayout::SAMPLING * b, 4 * b)?.reshape((4, b))?;
        let adapters = self.meta.narrow(0, MetaLayout::ADAPTERS * b, b)?;
        let lora = bank.filter(|_| self.lora).map(|w| (w, &adapters));
        let logits = model.forward_static_decode(&ids, &positions, &self.plan, lora)?;
        let picked = sample_ids(&logits.contiguous()?, &sampling)?;
        self.out.slice_set(&picked, 0, 0)?;
        Ok(())
    }

    fn run(&self, model: &Llama, bank: Option<&dyn LoraWeights>) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.graph {
            return g.launch();
        }
        self.body(model, bank)
    }
}

/// Copies host values into a u32 tensor in place (the refill of a bucket's static inputs).
struct Upload(Vec<u32>);

impl InplaceOp1 for Upload {
    fn name(&self) -> &'static str {
        "upload"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let CpuStorage::U32(dst) = s else { candle_core::bail!("upload: want a u32 tensor") };
        let o = l.start_offset();
        dst[o..o + self.0.len()].copy_from_slice(&self.0);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> candle_core::Result<()> {
        crate::engine::cuda::graph::upload_u32(s, l, &self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_layout_puts_rows_then_padding() {
        let view =
            PagedView { block_size: 4, k: vec![], v: vec![], tables: vec![vec![7, 2], vec![5]], past: vec![5, 0] };
        let mut batch = PackedBatch::default();
        batch.push(&[11], 5);
        batch.push(&[12], 0);
        let p = RowParam { temperature: 0.5, top_k: 3, top_p: 0.9, u: 0.25 };
        let v = fill(4, 3, &batch, &view, &RowParams(vec![p, p]));
        assert_eq!(v.len(), 10 * 4 + 4 * 3);
        assert_eq!(&v[0..4], &[11, 12, 0, 0], "ids");
        assert_eq!(&v[4..8], &[5, 0, 0, 0], "positions");
        assert_eq!(&v[8..12], &[2 * 4 + 1, 5 * 4, SKIP_SLOT, SKIP_SLOT], "slots: block 2 row 1, block 5 row 0");
        assert_eq!(&v[12..16], &[0, 1, 2, 3], "rows");
        assert_eq!(&v[16..20], &[6, 1, 0, 0], "ctx: padding reads no keys");
        assert_eq!(&v[20..24], &[0.5f32.to_bits(), 0.5f32.to_bits(), 0, 0], "temperature: padding greedy");
        assert_eq!(&v[36..40], &[NO_SLOT; 4], "adapters: none");
        assert_eq!(&v[40..52], &[7, 5, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0], "tables, block-major");
    }
}
