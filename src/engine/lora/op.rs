//! The batched multi-LoRA op: many adapters in one forward, each row with its own slot.
//!
//! This CPU implementation is the oracle the CUDA kernels are tested against. Semantics, for
//! one projection with base weight `W: [out, in]`, input `x: [T, in]` (the packed rows of the
//! batch), base output `y = x W^T: [T, out]`, and `slot[t]` the adapter slot of row `t`
//! (`None` = base only):
//!
//! ```text
//! for t in 0..T:
//!     if let Some(s) = slot[t] and adapter s has (A_s: [r_s, in], B_s: [out, r_s], scale_s) here:
//!         y[t] += scale_s * (x[t] @ A_s^T) @ B_s^T        // shrink to r_s, expand to out
//! ```
//!
//! Rows of one sequence share a slot (prefill segments: SGMV); decode rows gather per row
//! (BGMV). Both are served by grouping: all rows (of any sequences) with the same slot form one
//! group and run as one pair of GEMMs at that adapter's own rank `r_s`, so mixed ranks never
//! cost the largest rank for everyone, and base rows are never touched (bit-identical to a run
//! without adapters).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use crate::engine::lora::{LoraAdapter, ProjKey};
use crate::engine::Result;

/// Where the forward finds adapter weights by slot.
pub trait LoraWeights {
    /// `(A: [r, in], B^T: [r, out], scale)` of `slot` for projection `key`, or `None` when that
    /// adapter does not touch `key`. `B^T` rather than `B`: both factors are then row slices.
    fn lora(&self, slot: usize, key: ProjKey) -> Result<Option<(Tensor, Tensor, f64)>>;

    /// Every slot's factors of `key` stacked for the batched kernels ([`bgmv`]), when the
    /// weights are kept that way (the serving slot bank); `None`: use [`apply_lora`].
    fn stacked(&self, _key: ProjKey) -> Option<Stacked> {
        None
    }
}

/// One projection's factors of every slot, as [`bgmv`] reads them.
#[derive(Debug, Clone)]
pub struct Stacked {
    /// `[S, R, in]`, slot `s`'s A in its first `rank[s]` rows.
    pub a: Tensor,
    /// `[S, R, out]`, slot `s`'s B^T in its first `rank[s]` rows.
    pub bt: Tensor,
    /// `[2S]` u32: `rank[s]` for this projection (0: the adapter does not touch it), then
    /// `scale[s]` as f32 bits.
    pub meta: Tensor,
    /// f32 scratch for the kernels' shrunk rows, allocated once by the bank (the same buffer
    /// for every launch: they run one after another on one stream); `None`: per launch.
    pub scratch: Option<Tensor>,
}

/// Slot value of a row with no adapter (`NO_SLOT` of `kernels/lora.cu`).
pub const NO_SLOT: u32 = u32::MAX;

/// Elements of the input one shrink block reduces (`CHUNK` of `kernels/lora.cu`).
pub const SHRINK_CHUNK: usize = 1024;

/// f32 values of the shrink's partial sums (the kernels' scratch) for `parts` projections of
/// `rows` rows over `k` inputs at rank `r`.
pub fn shrink_scratch_len(parts: usize, rows: usize, k: usize, r: usize) -> usize {
    parts * rows * k.div_ceil(SHRINK_CHUNK) * r
}

/// Batched multi-LoRA with a per-row slot (BGMV) for projections that share their input `x`
/// (one to three: q/k/v, gate/up): `ys[z][t] += scale_s * (x[t] A_{z,s}^T) B_{z,s}^T` for
/// `s = row_slot[t]` (`NO_SLOT`: nothing), the semantics of [`apply_lora`] without grouping
/// rows, so the slots may live on the device (a CUDA graph replays it for any adapter mix). On
/// CUDA the `ys` are updated in place (`kernels/lora.cu`, one launch pair each) and returned;
/// elsewhere [`bgmv_reference`] computes new tensors. Inference only (no gradient).
pub fn bgmv(ys: Vec<Tensor>, x: &Tensor, ws: &[Stacked], row_slot: &Tensor) -> Result<Vec<Tensor>> {
    ys.into_iter().zip(ws).map(|(y, w)| bgmv_columns(y, x, &[(0, w)], row_slot)).collect()
}

/// [`bgmv`] for projections whose outputs are column ranges of one tensor `y: [T, W]` (a fused
/// q|k|v or gate|up product): `parts[z] = (first column of projection z, its factors)`. One
/// launch pair on CUDA for all of them.
pub fn bgmv_columns(y: Tensor, x: &Tensor, parts: &[(usize, &Stacked)], row_slot: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let (x, y) = (x.contiguous()?, y.contiguous()?);
        let scratch = parts.first().and_then(|(_, w)| w.scratch.as_ref());
        let args = crate::engine::cuda::lora::BgmvArgs {
            x: &x,
            slot: row_slot,
            parts: parts.iter().map(|&(col, w)| (col, &w.a, &w.bt, &w.meta)).collect(),
            scratch,
        };
        crate::engine::cuda::lora::bgmv_cuda(&y, &args)?;
        return Ok(y);
    }
    let width = y.dim(1)?;
    let mut pieces = Vec::with_capacity(2 * parts.len() + 1);
    let mut at = 0;
    let mut sorted: Vec<_> = parts.to_vec();
    sorted.sort_by_key(|p| p.0);
    for (col, w) in sorted {
        let n = w.bt.dim(2)?;
        if col > at {
            pieces.push(y.narrow(1, at, col - at)?);
        }
        pieces.push(bgmv_reference(&y.narrow(1, col, n)?.contiguous()?, x, w, row_slot)?);
        at = col + n;
    }
    if at < width {
        pieces.push(y.narrow(1, at, width - at)?);
    }
    Ok(Tensor::cat(&pieces, 1)?)
}

/// A second stream of the model's device on which LoRA kernels run concurrently with the base
/// GEMM that reads the same input (CUDA; see [`bgmv_delta`]).
#[derive(Clone)]
pub struct SideStream {
    #[cfg(feature = "cuda")]
    pub(crate) stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
}

impl std::fmt::Debug for SideStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SideStream")
    }
}

impl SideStream {
    /// A new stream of `device` at the highest priority (its small kernels then take a
    /// multiprocessor as soon as one frees, rather than queueing behind a GEMM's blocks);
    /// `None` off CUDA.
    pub fn new(device: &Device) -> Result<Option<Self>> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            return Ok(Some(Self { stream: crate::engine::cuda::lora::high_priority_stream(dev)? }));
        }
        let _ = device;
        Ok(None)
    }
}

/// The LoRA update of a fused projection, in flight on a side stream ([`bgmv_delta`]).
pub struct PendingDelta {
    delta: Tensor,
    side: Option<SideStream>,
}

impl PendingDelta {
    /// `[M, W]` f32: the update, once the model's stream has waited for the side stream (the
    /// consumer adds it to the base output).
    pub fn finish(self) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Some(side), Device::Cuda(dev)) = (&self.side, self.delta.device()) {
            crate::engine::cuda::lora::join_side(dev, &side.stream)?;
        }
        let _ = &self.side;
        Ok(self.delta)
    }
}

/// The LoRA update alone of projections whose outputs are the consecutive column ranges
/// `parts` of a `[M, width]` product (the parts cover it all), as f32: the semantics of
/// [`bgmv_columns`] on a zero output. On CUDA with `side`, the kernels are queued on the side
/// stream after everything queued so far on the model's stream (so they may run while the base
/// GEMM that follows runs), and [`PendingDelta::finish`] joins them back.
pub fn bgmv_delta(
    x: &Tensor,
    parts: &[(usize, &Stacked)],
    width: usize,
    row_slot: &Tensor,
    side: Option<&SideStream>,
) -> Result<PendingDelta> {
    let covered: usize = parts.iter().map(|(_, w)| w.bt.dims().get(2).copied().unwrap_or(0)).sum();
    if covered != width {
        return Err(crate::engine::EngineError::Weights(format!(
            "LoRA delta: parts cover {covered} of {width} columns"
        )));
    }
    let m = x.dim(0)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let x = x.contiguous()?;
        // SAFETY: the delta kernel writes every element (the parts cover every column, rows
        // without an adapter get zeros) before anything reads it.
        let delta = unsafe { Tensor::empty((m, width), candle_core::DType::F32, x.device())? };
        let args = crate::engine::cuda::lora::BgmvArgs {
            x: &x,
            slot: row_slot,
            parts: parts.iter().map(|&(col, w)| (col, &w.a, &w.bt, &w.meta)).collect(),
            scratch: parts.first().and_then(|(_, w)| w.scratch.as_ref()),
        };
        crate::engine::cuda::lora::bgmv_delta_cuda(&delta, &args, side.map(|s| &s.stream))?;
        return Ok(PendingDelta { delta, side: side.cloned() });
    }
    let _ = side;
    let zeros = Tensor::zeros((m, width), candle_core::DType::F32, x.device())?;
    Ok(PendingDelta { delta: bgmv_columns(zeros, x, parts, row_slot)?, side: None })
}

/// The plain loops of [`bgmv`] on the host, f32 sums, one rounding to `y`'s dtype per output
/// (the oracle the kernel is checked against).
pub fn bgmv_reference(y: &Tensor, x: &Tensor, w: &Stacked, row_slot: &Tensor) -> Result<Tensor> {
    use candle_core::DType;
    let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
    let (m, n) = y.dims2()?;
    let (s_count, r_max, k) = w.a.dims3()?;
    let (mut out, xv, av, bv) = (host(y)?, host(x)?, host(&w.a)?, host(&w.bt)?);
    let slots = row_slot.to_vec1::<u32>()?;
    let meta = w.meta.to_vec1::<u32>()?;
    for (row, &s) in slots.iter().enumerate().take(m) {
        let s = s as usize;
        if s >= s_count || meta[s] == 0 {
            continue;
        }
        let (rank, scale) = (meta[s] as usize, f32::from_bits(meta[s_count + s]));
        let xr = &xv[row * k..][..k];
        let t: Vec<f32> = (0..rank)
            .map(|j| scale * xr.iter().zip(&av[(s * r_max + j) * k..][..k]).map(|(a, b)| a * b).sum::<f32>())
            .collect();
        for (col, o) in out[row * n..][..n].iter_mut().enumerate() {
            *o += (0..rank).map(|j| t[j] * bv[(s * r_max + j) * n + col]).sum::<f32>();
        }
    }
    Ok(Tensor::from_vec(out, (m, n), y.device())?.to_dtype(y.dtype())?)
}

/// The per-row slots of a packed batch for [`bgmv`]: `rows_per_seq[i]` rows of `slots[i]`.
pub fn row_slots(rows_per_seq: &[usize], slots: &[Option<usize>], device: &Device) -> Result<Tensor> {
    let v: Vec<u32> = rows_per_seq
        .iter()
        .zip(slots)
        .flat_map(|(&n, s)| std::iter::repeat_n(s.map_or(NO_SLOT, |s| s as u32), n))
        .collect();
    let n = v.len();
    Ok(Tensor::from_vec(v, n, device)?)
}

/// A plain list of adapters, slot = index (training, tests, `lab generate --adapter`).
impl LoraWeights for Vec<&LoraAdapter> {
    fn lora(&self, slot: usize, key: ProjKey) -> Result<Option<(Tensor, Tensor, f64)>> {
        let Some(adapter) = self.get(slot) else { return Ok(None) };
        match adapter.weights.get(&key) {
            Some((a, b)) => Ok(Some((a.clone(), b.t()?, adapter.scale()))),
            None => Ok(None),
        }
    }
}

/// Rows of the packed batch grouped by adapter slot (built once per forward).
#[derive(Debug, Clone)]
pub struct RowGroups {
    total_rows: usize,
    /// Slot -> row indices (ascending), `u32` on the model's device.
    groups: Vec<(usize, Tensor, usize)>,
}

impl RowGroups {
    /// Groups `rows_per_seq[i]` rows of sequence `i` by `slots[i]`.
    pub fn new(rows_per_seq: &[usize], slots: &[Option<usize>], device: &Device) -> Result<Self> {
        let mut by_slot: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        let mut start = 0u32;
        for (&n, slot) in rows_per_seq.iter().zip(slots) {
            if let Some(s) = slot {
                by_slot.entry(*s).or_default().extend(start..start + n as u32);
            }
            start += n as u32;
        }
        let groups = by_slot
            .into_iter()
            .map(|(s, rows)| {
                let n = rows.len();
                Ok((s, Tensor::from_vec(rows, n, device)?, n))
            })
            .collect::<Result<_>>()?;
        Ok(Self { total_rows: start as usize, groups })
    }

    /// No groups (a forward whose adapters all go through [`bgmv`]).
    pub fn none() -> Self {
        Self { total_rows: 0, groups: Vec::new() }
    }

    /// True when no row uses an adapter.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

/// `y + LoRA(x)` for every group (see the module docs for the exact semantics).
pub fn apply_lora(y: Tensor, x: &Tensor, key: ProjKey, rows: &RowGroups, weights: &dyn LoraWeights) -> Result<Tensor> {
    let mut y = y;
    for (slot, idx, n) in &rows.groups {
        let Some((a, bt, scale)) = weights.lora(*slot, key)? else { continue };
        let whole = *n == rows.total_rows;
        let xs = if whole { x.clone() } else { x.index_select(idx, 0)? };
        let xs = xs.to_dtype(a.dtype())?;
        let delta = (xs.matmul(&a.t()?)? * scale)?.matmul(&bt)?.to_dtype(y.dtype())?;
        y = if whole { (y + delta)? } else { y.index_add(idx, &delta, 0)? };
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::engine::lora::slots::SlotBank;
    use crate::engine::lora::LoraModule;
    use crate::engine::model::config::LlamaConfig;

    /// The per-row op over a slot bank (stacked factors, device metadata) computes what the
    /// grouped oracle computes: mixed ranks, an adapter on a module subset, base rows between.
    #[test]
    fn bgmv_over_the_slot_bank_matches_apply_lora() {
        let cfg = LlamaConfig::preset("tiny").unwrap();
        let dev = Device::Cpu;
        let mut bank = SlotBank::new(&cfg, 4, 16, DType::F32, &dev).unwrap();
        for (slot, rank) in [(0, 4), (1, 16), (3, 8)] {
            let mut a = LoraAdapter::random(&cfg, rank, slot as u64 + 1, DType::F32, &dev).unwrap();
            if rank == 8 {
                a.weights.retain(|k, _| k.module == LoraModule::Down || k.module == LoraModule::Q);
            }
            bank.write(slot, &a).unwrap();
        }
        // Slot 2 stays empty: rows naming it get nothing, like base rows.
        let seq_slots = [Some(1), None, Some(0), Some(3), Some(2), Some(1), None, Some(3)];
        let lens = [1, 1, 3, 1, 1, 2, 1, 1];
        let rows: usize = lens.iter().sum();
        let groups = RowGroups::new(&lens, &seq_slots, &dev).unwrap();
        let per_row = row_slots(&lens, &seq_slots, &dev).unwrap();
        assert_eq!(per_row.to_vec1::<u32>().unwrap()[..4], [1, NO_SLOT, 0, 0]);
        for module in LoraModule::ALL {
            let key = ProjKey { layer: 1, module };
            let (inp, out) = module.dims(&cfg);
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev).unwrap();
            let y = Tensor::randn(0f32, 1.0, (rows, out), &dev).unwrap();
            let want = apply_lora(y.clone(), &x, key, &groups, &bank).unwrap();
            let got = bgmv(vec![y.clone()], &x, &[bank.stacked(key).unwrap()], &per_row).unwrap().remove(0);
            let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-5, "{module:?}: max abs error {err}");
            let moved = (want - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(moved > 1e-4, "{module:?}: the adapters changed the output");
        }
        // Clearing a slot takes it out of the kernels' metadata at once.
        bank.clear(1).unwrap();
        let key = ProjKey { layer: 0, module: LoraModule::Up };
        let meta = bank.stacked(key).unwrap().meta.to_vec1::<u32>().unwrap();
        assert_eq!(&meta[..4], &[4, 0, 0, 0], "ranks: slot 0 rank 4, slot 1 cleared, slot 3 skips up_proj");
    }
}
