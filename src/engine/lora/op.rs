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
