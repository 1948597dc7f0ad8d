//! `SlotBank`: `--max-loras` preallocated device slots of `--max-lora-rank`.
//!
//! Per projection one stacked `A: [slots, R, in]` and `B^T: [slots, R, out]` (R = max rank),
//! allocated once. Loading an adapter overwrites its slot in place (no allocation, no effect on
//! other slots); a slot of rank `r < R` is read as its first `r` rows, so it costs rank `r`.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device, Tensor};

use crate::engine::lora::op::{shrink_scratch_len, LoraWeights, Stacked};
use crate::engine::lora::{LoraAdapter, LoraModule, ProjKey};
use crate::engine::model::config::LlamaConfig;
use crate::engine::{EngineError, Result};

/// An adapter laid out for a slot in page-locked host memory (CUDA banks): writing it into a
/// slot is one asynchronous DMA per factor ([`SlotBank::begin_write`]).
#[cfg(feature = "cuda")]
pub use crate::engine::cuda::pinned::PinnedImage as SlotImage;
/// Never built without CUDA: a CPU bank copies from host tensors.
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub enum SlotImage {}

/// Builds [`SlotImage`]s for one bank, on any thread (the adapter loader's).
#[derive(Debug, Clone)]
pub struct Stager {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    dtype: DType,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: Device,
    #[cfg(feature = "cuda")]
    pool: crate::engine::cuda::pinned::PinnedPool,
}

impl Stager {
    /// `adapter` (a host copy) laid out for the bank's slots in page-locked memory.
    pub fn stage(&self, adapter: &LoraAdapter) -> Result<SlotImage> {
        #[cfg(feature = "cuda")]
        return Ok(SlotImage::stage(adapter, self.dtype, &self.device, &self.pool)?);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = adapter;
            Err(EngineError::Weights("pinned slot images need the cuda build".into()))
        }
    }
}

/// A slot write in flight on the bank's copy stream; [`SlotBank::poll_write`] publishes the
/// slot once it has landed.
#[derive(Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct PendingWrite {
    slot: usize,
    /// The bank's write count for `slot` when this one began: a later write or clear of the
    /// slot makes this one stale, and a stale write never publishes.
    seq: u64,
    meta: SlotMeta,
    #[cfg(feature = "cuda")]
    done: candle_core::cuda_backend::cudarc::driver::CudaEvent,
}

impl PendingWrite {
    /// The slot being written.
    pub fn slot(&self) -> usize {
        self.slot
    }
}

#[derive(Debug, Clone)]
struct SlotMeta {
    rank: usize,
    scale: f64,
    keys: BTreeSet<ProjKey>,
}

/// Fixed device storage for the adapters the running batch may use.
pub struct SlotBank {
    max_rank: usize,
    a: BTreeMap<ProjKey, Tensor>,
    bt: BTreeMap<ProjKey, Tensor>,
    meta: Vec<Option<SlotMeta>>,
    /// `[keys, 2 * slots]` u32 on the device, row `key` = the ranks of every slot for that
    /// projection then their scales as f32 bits (the batched kernels read it; rewritten in
    /// place on every write or clear, so a captured graph keeps reading the live values).
    device_meta: Tensor,
    /// Row of each projection in `device_meta`.
    key_rows: BTreeMap<ProjKey, usize>,
    /// f32 scratch of the batched kernels, sized for their largest launch (see [`Stacked`]).
    scratch: Tensor,
    /// Writes begun per slot (see [`PendingWrite::seq`]).
    writes: Vec<u64>,
    /// The stream of asynchronous slot writes (CUDA banks).
    #[cfg(feature = "cuda")]
    copier: Option<crate::engine::cuda::pinned::SlotCopier>,
    /// Page-locked buffers of dropped images, shared with every [`Stager`] of the bank.
    #[cfg(feature = "cuda")]
    pool: crate::engine::cuda::pinned::PinnedPool,
}

/// Rows the bank's scratch covers per launch (a forward of more rows allocates its own).
pub const SCRATCH_ROWS: usize = 1024;
/// Projections per launch the scratch covers (q/k/v).
const SCRATCH_PARTS: usize = 3;

impl SlotBank {
    /// Allocates `slots` slots of rank `max_rank` for every projection of `cfg`.
    pub fn new(cfg: &LlamaConfig, slots: usize, max_rank: usize, dtype: DType, device: &Device) -> Result<Self> {
        let mut a = BTreeMap::new();
        let mut bt = BTreeMap::new();
        for layer in 0..cfg.num_hidden_layers {
            for module in LoraModule::ALL {
                let (inp, out) = module.dims(cfg);
                let key = ProjKey { layer, module };
                a.insert(key, Tensor::zeros((slots, max_rank, inp), dtype, device)?);
                bt.insert(key, Tensor::zeros((slots, max_rank, out), dtype, device)?);
            }
        }
        let key_rows: BTreeMap<ProjKey, usize> = a.keys().enumerate().map(|(i, k)| (*k, i)).collect();
        let device_meta = Tensor::zeros((key_rows.len(), 2 * slots), DType::U32, device)?;
        let widest_input = LoraModule::ALL.iter().map(|m| m.dims(cfg).0).max().unwrap_or(0);
        let scratch_len = shrink_scratch_len(SCRATCH_PARTS, SCRATCH_ROWS, widest_input, max_rank.max(1));
        let scratch = Tensor::zeros(scratch_len, DType::F32, device)?;
        #[cfg(feature = "cuda")]
        let copier = if device.is_cuda() { Some(crate::engine::cuda::pinned::SlotCopier::new(device)?) } else { None };
        Ok(Self {
            max_rank,
            a,
            bt,
            meta: vec![None; slots],
            device_meta,
            key_rows,
            scratch,
            writes: vec![0; slots],
            #[cfg(feature = "cuda")]
            copier,
            #[cfg(feature = "cuda")]
            pool: Default::default(),
        })
    }

    /// The host values of `device_meta` for the slots as they are now.
    fn meta_rows(&self) -> Vec<u32> {
        let s = self.meta.len();
        let mut v = vec![0u32; self.key_rows.len() * 2 * s];
        for (key, &row) in &self.key_rows {
            for (slot, m) in self.meta.iter().enumerate() {
                let Some(m) = m else { continue };
                if m.keys.contains(key) {
                    v[row * 2 * s + slot] = m.rank as u32;
                    v[row * 2 * s + s + slot] = (m.scale as f32).to_bits();
                }
            }
        }
        v
    }

    /// Copies the slots' ranks and scales into `device_meta`, in place.
    fn publish(&self) -> Result<()> {
        let host = Tensor::from_vec(self.meta_rows(), self.device_meta.dims2()?, self.device_meta.device())?;
        self.device_meta.slice_set(&host, 0, 0)?;
        Ok(())
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.meta.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// Device bytes a bank of `slots` slots of rank `max_rank` holds (what [`SlotBank::new`]
    /// will allocate, for sizing the KV pool before the bank exists).
    pub fn bytes_for(cfg: &LlamaConfig, slots: usize, max_rank: usize, dtype: DType) -> usize {
        let per_layer: usize = LoraModule::ALL.iter().map(|m| m.dims(cfg)).map(|(i, o)| i + o).sum();
        cfg.num_hidden_layers * per_layer * slots * max_rank * dtype.size_in_bytes()
    }

    /// Device bytes held by the bank.
    pub fn bytes(&self) -> usize {
        self.a.values().chain(self.bt.values()).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    /// A [`Stager`] for this bank where slot writes can come from page-locked images (CUDA).
    pub fn stager(&self) -> Option<Stager> {
        #[cfg(feature = "cuda")]
        if self.copier.is_some() {
            return Some(Stager {
                dtype: self.device_meta_dtype(),
                device: self.device_meta.device().clone(),
                pool: self.pool.clone(),
            });
        }
        None
    }

    /// Checks that `adapter` fits `slot`, then unpublishes the slot (the kernels must never
    /// read a half-written one) and counts a new write of it.
    fn start_write(&mut self, slot: usize, adapter: &LoraAdapter) -> Result<u64> {
        let r = adapter.rank();
        if r > self.max_rank || slot >= self.meta.len() {
            return Err(EngineError::Weights(format!("adapter rank {r} / slot {slot} does not fit the slot bank")));
        }
        self.meta[slot] = None;
        self.writes[slot] += 1;
        self.publish()?;
        if let Some(key) = adapter.weights.keys().find(|k| !self.a.contains_key(k)) {
            return Err(EngineError::Weights(format!("{} has no slot storage", key.peft_prefix())));
        }
        Ok(self.writes[slot])
    }

    fn slot_meta(adapter: &LoraAdapter) -> SlotMeta {
        SlotMeta { rank: adapter.rank(), scale: adapter.scale(), keys: adapter.weights.keys().copied().collect() }
    }

    /// Queues `image` (of `adapter`) into `slot` on the copy stream and returns at once; the
    /// slot stays unpublished until [`SlotBank::poll_write`] sees the copy done. The caller
    /// keeps `image` alive until then.
    pub fn begin_write(&mut self, slot: usize, adapter: &LoraAdapter, image: &SlotImage) -> Result<PendingWrite> {
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (slot, adapter);
            match *image {}
        }
        #[cfg(feature = "cuda")]
        {
            use crate::engine::cuda::pinned::SlotRegion;
            let seq = self.start_write(slot, adapter)?;
            let copier =
                self.copier.as_ref().ok_or_else(|| EngineError::Weights("a CPU bank takes no images".into()))?;
            let done = copier.copy(image, |key| {
                let (a, bt) = (self.a.get(&key)?, self.bt.get(&key)?);
                let (_, r, inp) = a.dims3().ok()?;
                let out = bt.dim(2).ok()?;
                Some([
                    SlotRegion { tensor: a.clone(), offset: slot * r * inp, len: r * inp },
                    SlotRegion { tensor: bt.clone(), offset: slot * r * out, len: r * out },
                ])
            })?;
            Ok(PendingWrite { slot, seq, meta: Self::slot_meta(adapter), done })
        }
    }

    /// Whether `write` has landed; the first time it is seen done, its slot is published
    /// (unless a later write or clear of the slot made it stale).
    pub fn poll_write(&mut self, write: &PendingWrite) -> Result<bool> {
        #[cfg(feature = "cuda")]
        if !write.done.is_complete() {
            return Ok(false);
        }
        if self.writes[write.slot] == write.seq && self.meta[write.slot].is_none() {
            self.meta[write.slot] = Some(write.meta.clone());
            self.publish()?;
        }
        Ok(true)
    }

    /// Copies `adapter` into `slot`, replacing whatever was there.
    pub fn write(&mut self, slot: usize, adapter: &LoraAdapter) -> Result<()> {
        self.start_write(slot, adapter)?;
        #[cfg(feature = "cuda")]
        if self.device_meta.device().is_cuda() && adapter.weights.values().all(|(a, _)| a.device().is_cpu()) {
            self.upload_from_host(slot, adapter)?;
        } else {
            self.copy_on_device(slot, adapter)?;
        }
        #[cfg(not(feature = "cuda"))]
        self.copy_on_device(slot, adapter)?;
        self.meta[slot] = Some(Self::slot_meta(adapter));
        self.publish()
    }

    /// Copies every factor into `slot` with tensor ops (adapter and bank on one device).
    fn copy_on_device(&self, slot: usize, adapter: &LoraAdapter) -> Result<()> {
        for (key, (a, b)) in &adapter.weights {
            let (dst_a, dst_bt) = (&self.a[key], &self.bt[key]);
            dst_a.slice_set(&pad_rows(a, self.max_rank, dst_a.dtype())?.unsqueeze(0)?, 0, slot)?;
            dst_bt.slice_set(&pad_rows(&b.t()?, self.max_rank, dst_bt.dtype())?.unsqueeze(0)?, 0, slot)?;
        }
        Ok(())
    }

    /// An adapter held on the host (the `--max-cpu-loras` tier) into a CUDA slot: the factors
    /// are laid out as the slot wants them on the host (run dtype, B transposed; rows past the
    /// adapter's rank are never read, so they are not written), in parallel, then each goes
    /// in with one host-to-device copy straight into the slot's rows.
    #[cfg(feature = "cuda")]
    fn upload_from_host(&self, slot: usize, adapter: &LoraAdapter) -> Result<()> {
        use crate::engine::cuda::lora::upload_at;
        use rayon::prelude::*;
        let dtype = self.device_meta_dtype();
        // A as it is (already the run dtype and contiguous: no copy); B transposed.
        let staged: Vec<(ProjKey, Tensor, Tensor)> = adapter
            .weights
            .par_iter()
            .map(|(key, (a, b))| Ok((*key, a.to_dtype(dtype)?.contiguous()?, b.to_dtype(dtype)?.t()?.contiguous()?)))
            .collect::<Result<_>>()?;
        for (key, a, bt) in &staged {
            let (dst_a, dst_bt) = (&self.a[key], &self.bt[key]);
            let (_, r, inp) = dst_a.dims3()?;
            let out = dst_bt.dim(2)?;
            upload_at(dst_a, slot * r * inp, a)?;
            upload_at(dst_bt, slot * r * out, bt)?;
        }
        Ok(())
    }

    /// The dtype of the slots' factors.
    #[cfg(feature = "cuda")]
    fn device_meta_dtype(&self) -> DType {
        self.a.values().next().map_or(DType::F32, |t| t.dtype())
    }

    /// Marks `slot` empty (its storage is simply overwritten by the next write).
    pub fn clear(&mut self, slot: usize) -> Result<()> {
        if let Some(m) = self.meta.get_mut(slot) {
            *m = None;
            self.writes[slot] += 1;
        }
        self.publish()
    }
}

/// `[r, n]` -> `[R, n]` with zero rows below, contiguous, in `dtype`.
fn pad_rows(t: &Tensor, rows: usize, dtype: DType) -> Result<Tensor> {
    let (r, n) = t.dims2()?;
    let t = t.to_dtype(dtype)?;
    if r == rows {
        return Ok(t.contiguous()?);
    }
    let zeros = Tensor::zeros((rows - r, n), dtype, t.device())?;
    Ok(Tensor::cat(&[&t, &zeros], 0)?)
}

impl LoraWeights for SlotBank {
    fn lora(&self, slot: usize, key: ProjKey) -> Result<Option<(Tensor, Tensor, f64)>> {
        let Some(Some(meta)) = self.meta.get(slot) else { return Ok(None) };
        if !meta.keys.contains(&key) {
            return Ok(None);
        }
        let a = self.a[&key].get(slot)?.narrow(0, 0, meta.rank)?;
        let bt = self.bt[&key].get(slot)?.narrow(0, 0, meta.rank)?;
        Ok(Some((a, bt, meta.scale)))
    }

    fn stacked(&self, key: ProjKey) -> Option<Stacked> {
        let row = *self.key_rows.get(&key)?;
        Some(Stacked {
            a: self.a.get(&key)?.clone(),
            bt: self.bt.get(&key)?.clone(),
            meta: self.device_meta.get(row).ok()?,
            scratch: Some(self.scratch.clone()),
        })
    }
}
