//! Attention of a packed batch: causal SDPA per sequence (the reference, every device), and the
//! paged path that reads and writes the block pool in place ([`PagedPlan`], CUDA).

pub mod paged_ops;

use candle_core::{DType, Device, Tensor, D};

use crate::engine::kv::PagedView;
use crate::engine::model::fused_ops::KvTarget;
use crate::engine::model::layers::{at_least_f32, OpsMode};
use crate::engine::model::PackedBatch;
use crate::engine::{EngineError, Result};
use paged_ops::DecodeMeta;

/// Causal attention of one sequence: `q: [L, H, D]`, `k, v: [S, KVH, D]` with `S = past + L`;
/// returns `[L, H * D]`. `mask` is [`causal_mask`]`(L, S, past)` (ignored when `L == 1`).
///
/// Query heads are grouped per KV head (`[KVH, rep * L, D]`) so keys are never repeated.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, mode: OpsMode) -> Result<Tensor> {
    let (l, nh, hd) = q.dims3()?;
    let (s, nkv, _) = k.dims3()?;
    let rep = nh / nkv;
    let q = q.transpose(0, 1)?.reshape((nkv, rep * l, hd))?.contiguous()?;
    let k = k.transpose(0, 1)?.contiguous()?;
    let v = v.transpose(0, 1)?.contiguous()?;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(mask) = mask.filter(|_| l > 1) {
        scores = scores.reshape((nkv, rep, l, s))?.broadcast_add(mask)?.reshape((nkv, rep * l, s))?;
    }
    let acc = at_least_f32(v.dtype());
    let probs = match mode {
        OpsMode::Fused => candle_nn::ops::softmax_last_dim(&scores.to_dtype(acc)?)?,
        OpsMode::Differentiable => candle_nn::ops::softmax(&scores.to_dtype(acc)?, D::Minus1)?,
    }
    .to_dtype(v.dtype())?;
    let o = probs.matmul(&v)?; // [KVH, rep * L, D]
    Ok(o.reshape((nh, l, hd))?.transpose(0, 1)?.reshape((l, nh * hd))?)
}

/// Score elements (`heads x queries x keys`) one [`causal_sdpa`] chunk may hold: 2^28 f32 =
/// 1 GiB, so a 32k-token prompt runs in chunks of 256 queries instead of needing 137 GB for
/// the scores of the 8B's 32 heads at once.
const SCORE_BUDGET: usize = 1 << 28;

/// Causal attention of `L` new queries (`q: [L, H, D]`, positions `past..past + L`) against
/// `k, v: [S, KVH, D]` (`S = past + L`), in chunks of queries whose scores fit
/// [`SCORE_BUDGET`]; each chunk builds its own `[chunk, S]` mask, so neither the scores nor the
/// mask of the whole prompt is ever held. Short prompts run as one [`sdpa`] call (unchanged).
pub fn causal_sdpa(q: &Tensor, k: &Tensor, v: &Tensor, past: usize, mode: OpsMode) -> Result<Tensor> {
    causal_sdpa_within(q, k, v, past, mode, SCORE_BUDGET)
}

fn causal_sdpa_within(q: &Tensor, k: &Tensor, v: &Tensor, past: usize, mode: OpsMode, budget: usize) -> Result<Tensor> {
    let (l, h, _) = q.dims3()?;
    let s = k.dim(0)?;
    let chunk = (budget / (h * s).max(1)).max(1);
    let (dtype, device) = (k.dtype(), k.device());
    if l <= chunk {
        let mask = (l > 1).then(|| causal_mask(l, s, past, dtype, device)).transpose()?;
        return sdpa(q, k, v, mask.as_ref(), mode);
    }
    let mut outs = Vec::with_capacity(l.div_ceil(chunk));
    for start in (0..l).step_by(chunk) {
        let n = chunk.min(l - start);
        // Keys past the chunk's last position are masked anyway: leave them out.
        let keys = past + start + n;
        let mask = causal_mask(n, keys, past + start, dtype, device)?;
        let (kc, vc) = (k.narrow(0, 0, keys)?, v.narrow(0, 0, keys)?);
        outs.push(sdpa(&q.narrow(0, start, n)?, &kc, &vc, Some(&mask), mode)?);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// `[L, S]` additive mask: query `i` (position `past + i`) sees keys `0..=past + i`.
///
/// Built with device ops (no host array of `L * S` values to upload).
pub fn causal_mask(l: usize, s: usize, past: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let query_pos = Tensor::arange(past as u32, (past + l) as u32, device)?.reshape((l, 1))?;
    let key_pos = Tensor::arange(0u32, s as u32, device)?.reshape((1, s))?;
    let visible = key_pos.broadcast_le(&query_pos)?;
    let zeros = Tensor::zeros((l, s), dtype, device)?;
    let blocked = Tensor::full(f32::NEG_INFINITY, (l, s), device)?.to_dtype(dtype)?;
    Ok(visible.where_cond(&zeros, &blocked)?)
}

/// Prefill chunks with at most this many (query, key) pairs (`len * (past + len)`) attend
/// through the paged decode kernel, one query row per token over its causal prefix, rather than
/// as SDPA. Each row then reads its whole prefix (from L2: a short sequence's keys fit there),
/// which for a serving prompt of 256 tokens is ~130 MB of L2 reads per layer, against the SDPA
/// path's several launches per sequence per layer (a mixed step of eight such prompts spent
/// most of its 25 ms launching those on the H200). Longer chunks keep SDPA, whose GEMMs read
/// each key once per query block.
const SHORT_PREFILL_PAIRS: usize = 256 * 1024;

/// One sequence of the batch with more than one new token (a prefill chunk) that runs as SDPA.
#[derive(Debug)]
struct PrefillSeq {
    start: usize,
    len: usize,
    /// Pool rows of positions `0..past + len` when the chunk continues a cached past; `None`
    /// when it starts at 0 and attends to its own fresh keys only.
    gather: Option<Tensor>,
    past: usize,
}

/// How one forward uses the paged pool, built once and reused by every layer: the pool row of
/// each new token, the decode rows' block tables for the paged kernel, and the prefill chunks
/// that run as SDPA. Everything a layer needs is already on the device.
#[derive(Debug)]
pub struct PagedPlan {
    view: PagedView,
    /// `[N]` u32: pool row of each new token.
    slots: Tensor,
    decode: Option<DecodeMeta>,
    prefill: Vec<PrefillSeq>,
    /// Packed row -> row of `[decode outputs; prefill outputs...]`; `None` when that is the
    /// identity (all decodes, or one prefill chunk).
    order: Option<Tensor>,
    new_lens: Vec<usize>,
}

impl PagedPlan {
    /// Plans `batch` over `view`; fails when a sequence's blocks were not reserved.
    pub fn new(batch: &PackedBatch, view: PagedView, device: &Device, grouped: bool) -> Result<Self> {
        let bs = view.block_size;
        let mut slots = Vec::with_capacity(batch.tokens.len());
        let (mut d_rows, mut d_ctx, mut d_tables) = (Vec::new(), Vec::new(), Vec::new());
        let mut prefill = Vec::new();
        let mut start = 0;
        for (i, span) in batch.seqs.iter().enumerate() {
            let (table, past) = (&view.tables[i], view.past[i]);
            if span.past_len != past {
                return Err(EngineError::Weights(format!(
                    "sequence {i} is at {past} in the pool, batch says {}",
                    span.past_len
                )));
            }
            let end = past + span.len;
            if end.div_ceil(bs) > table.len() {
                return Err(EngineError::Weights(format!("KV blocks for {end} positions were not reserved")));
            }
            let row = |p: usize| table[p / bs] * bs as u32 + (p % bs) as u32;
            slots.extend((past..end).map(row));
            if span.len == 1 || span.len * end <= SHORT_PREFILL_PAIRS {
                // Each new token is a query row over its own causal prefix: one launch per layer
                // serves every short chunk of the step along with its decode rows.
                for i in 0..span.len {
                    d_rows.push((start + i) as u32);
                    d_ctx.push((past + i + 1) as u32);
                    d_tables.push(table.as_slice());
                }
            } else {
                let gather = (past > 0)
                    .then(|| Tensor::from_vec((0..end).map(row).collect::<Vec<u32>>(), end, device))
                    .transpose()?;
                prefill.push(PrefillSeq { start, len: span.len, gather, past });
            }
            start += span.len;
        }
        let decode =
            (!d_rows.is_empty()).then(|| decode_meta(&d_rows, &d_ctx, &d_tables, bs, device, grouped)).transpose()?;
        let order = packed_order(batch, &d_rows, &prefill, device)?;
        let n = slots.len();
        Ok(Self {
            view,
            slots: Tensor::from_vec(slots, n, device)?,
            decode,
            prefill,
            order,
            new_lens: batch.seqs.iter().map(|s| s.len).collect(),
        })
    }

    /// A plan of decode rows only whose metadata already sits on the device at fixed
    /// addresses (a CUDA graph's static buffers): `slots: [B]` (pool row per query, or
    /// [`paged_ops::SKIP_SLOT`] for a padding row), `decode` with `rows = 0..B`.
    pub fn static_decode(k: Vec<Tensor>, v: Vec<Tensor>, block_size: usize, slots: Tensor, decode: DecodeMeta) -> Self {
        let n = slots.dims().first().copied().unwrap_or(0);
        Self {
            view: PagedView { block_size, k, v, tables: Vec::new(), past: Vec::new() },
            slots,
            decode: Some(decode),
            prefill: Vec::new(),
            order: None,
            new_lens: vec![1; n],
        }
    }

    /// Stores this layer's new keys/values in the pool and attends: `q: [N, H, D]`,
    /// `k, v: [N, KVH, D]` -> `[N, H * D]`.
    pub fn attend(&self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, mode: OpsMode) -> Result<Tensor> {
        let (kc, vc) = (&self.view.k[layer], &self.view.v[layer]);
        paged_ops::write_kv(kc, k, &self.slots)?;
        paged_ops::write_kv(vc, v, &self.slots)?;
        self.attend_stored(layer, q, k, v, mode)
    }

    /// Where this layer's new keys and values go (for an op that stores them itself, as
    /// `rope_store` does).
    pub fn kv_target(&self, layer: usize) -> KvTarget<'_> {
        KvTarget { k_cache: &self.view.k[layer], v_cache: &self.view.v[layer], slots: &self.slots }
    }

    /// [`PagedPlan::attend`] once the new keys and values are already in the pool.
    pub fn attend_stored(&self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, mode: OpsMode) -> Result<Tensor> {
        let (kc, vc) = (&self.view.k[layer], &self.view.v[layer]);
        let (n, h, d) = q.dims3()?;
        let mut parts = Vec::with_capacity(1 + self.prefill.len());
        if let Some(meta) = &self.decode {
            parts.push(paged_ops::paged_decode_attention(q, kc, vc, meta)?.reshape(((), h * d))?);
        }
        for p in &self.prefill {
            let (kk, vv) = match &p.gather {
                Some(rows) => (kc.index_select(rows, 0)?, vc.index_select(rows, 0)?),
                None => (k.narrow(0, p.start, p.len)?, v.narrow(0, p.start, p.len)?),
            };
            parts.push(causal_sdpa(&q.narrow(0, p.start, p.len)?, &kk, &vv, p.past, mode)?);
        }
        let o = if parts.len() == 1 { parts.pop().expect("one part") } else { Tensor::cat(&parts, 0)? };
        let o = match &self.order {
            Some(order) => o.index_select(order, 0)?,
            None => o,
        };
        debug_assert_eq!(o.dim(0)?, n);
        Ok(o)
    }

    /// New positions per sequence, for [`crate::engine::kv::KvStore::commit`].
    pub fn new_lens(&self) -> &[usize] {
        &self.new_lens
    }
}

/// Decode metadata on `device`: query rows, their block tables (padded to the longest) and
/// context lengths.
pub fn decode_meta(
    rows: &[u32],
    ctx: &[u32],
    tables: &[&[u32]],
    bs: usize,
    device: &Device,
    grouped: bool,
) -> Result<DecodeMeta> {
    let m = rows.len();
    let max_blocks = tables.iter().map(|t| t.len()).max().unwrap_or(1).max(1);
    let mut flat = vec![0u32; m * max_blocks];
    for (i, t) in tables.iter().enumerate() {
        flat[i * max_blocks..i * max_blocks + t.len()].copy_from_slice(t);
    }
    Ok(DecodeMeta {
        rows: Tensor::from_vec(rows.to_vec(), m, device)?,
        tables: Tensor::from_vec(flat, (m, max_blocks), device)?,
        block_major: false,
        grouped,
        ctx: Tensor::from_vec(ctx.to_vec(), m, device)?,
        max_blocks,
        block_size: bs,
    })
}

/// The permutation that puts `[decode rows; prefill chunks in order]` back in packed order.
fn packed_order(
    batch: &PackedBatch,
    decode_rows: &[u32],
    prefill: &[PrefillSeq],
    device: &Device,
) -> Result<Option<Tensor>> {
    let n = batch.tokens.len();
    let mut order = vec![0u32; n];
    let mut next = 0u32;
    for &r in decode_rows {
        order[r as usize] = next;
        next += 1;
    }
    for p in prefill {
        for i in 0..p.len {
            order[p.start + i] = next;
            next += 1;
        }
    }
    if order.iter().enumerate().all(|(i, &o)| o as usize == i) {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(order, n, device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_causal_attention_equals_one_pass() {
        let dev = Device::Cpu;
        let (l, past, h, kvh, d) = (37, 5, 4, 2, 16);
        let q = Tensor::randn(0f32, 1.0, (l, h, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (past + l, kvh, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (past + l, kvh, d), &dev).unwrap();
        let whole = causal_sdpa_within(&q, &k, &v, past, OpsMode::Fused, usize::MAX).unwrap();
        // 4 heads x 42 keys: a budget of 1400 scores gives chunks of 8 queries (5 chunks).
        let chunked = causal_sdpa_within(&q, &k, &v, past, OpsMode::Fused, 1400).unwrap();
        let err = (&whole - &chunked).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-5, "max abs diff {err}");
        assert_eq!(whole.dims(), &[l, h * d]);
    }
}
