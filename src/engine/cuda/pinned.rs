//! The host tier of a CUDA bank in page-locked memory, and the copy stream that moves an
//! adapter from it into a device slot without stopping the running batch.
//!
//! From pageable memory a host-to-device copy runs at ~4.4 GB/s on the H200 (the driver stages
//! it through its own pinned buffers, and the call returns only when it is done): 19 ms for a
//! rank-16 adapter of the 8B shape, with the engine thread, and so every tenant's next step,
//! waiting. An adapter's [`PinnedImage`] is built once, on the loader thread, when it enters
//! the host tier: each factor already in the slot's dtype and layout (A `[r, in]`, B^T
//! `[r, out]`), in one page-locked buffer. A slot write is then one DMA per factor on a stream
//! of its own ([`SlotCopier`]), which returns at once; the slot is published to the kernels
//! only after the copy's event has completed (see `SlotBank::poll_write`).

use std::ffi::c_void;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, CudaStream, DevicePtr, PinnedHostSlice};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::engine::lora::{LoraAdapter, ProjKey};

/// One adapter in page-locked host memory, laid out as a slot holds it.
pub struct PinnedImage {
    /// Always `Some` until dropped (then back to `pool`).
    buf: Option<PinnedHostSlice<u8>>,
    /// Per projection: the byte ranges of A `[r, in]` and B^T `[r, out]` in `buf`.
    parts: Vec<(ProjKey, Range<usize>, Range<usize>)>,
    dtype: DType,
    pool: PinnedPool,
}

impl std::fmt::Debug for PinnedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedImage").field("bytes", &self.bytes()).field("dtype", &self.dtype).finish()
    }
}

impl Drop for PinnedImage {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.put(buf);
        }
    }
}

/// Page-locked buffers of dropped images, for the next ones: pinning 84 MB takes longer than
/// filling it, and a serving host tier turns adapters over at the request rate.
#[derive(Clone, Default)]
pub struct PinnedPool(Arc<Mutex<Vec<PinnedHostSlice<u8>>>>);

impl std::fmt::Debug for PinnedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let spares = self.0.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("PinnedPool").field("spares", &spares).finish()
    }
}

/// Spare buffers a pool keeps at most (more are freed).
const POOL_SPARES: usize = 4;

impl PinnedPool {
    /// A spare buffer of at least `bytes` (the smallest such), else a new one.
    fn take(&self, bytes: usize, device: &candle_core::CudaDevice) -> candle_core::Result<PinnedHostSlice<u8>> {
        let mut spares = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let best =
            spares.iter().enumerate().filter(|(_, b)| b.len() >= bytes).min_by_key(|(_, b)| b.len()).map(|(i, _)| i);
        if let Some(i) = best {
            return Ok(spares.swap_remove(i));
        }
        drop(spares);
        // Write-combined (cudarc's default): the host only writes it, in order, and never reads.
        unsafe { device.cuda_stream().context().alloc_pinned::<u8>(bytes.max(1)) }.w()
    }

    fn put(&self, buf: PinnedHostSlice<u8>) {
        let mut spares = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if spares.len() < POOL_SPARES {
            spares.push(buf);
        }
    }
}

impl PinnedImage {
    /// Lays `adapter` out in `dtype` in a page-locked buffer of `device`'s context (one from
    /// `pool` when it has one): one pass over the factors, in parallel, straight from the host
    /// tensors (A copied, B transposed).
    pub fn stage(adapter: &LoraAdapter, dtype: DType, device: &Device, pool: &PinnedPool) -> candle_core::Result<Self> {
        let Device::Cuda(dev) = device else { candle_core::bail!("a pinned image needs a CUDA device") };
        let size = dtype.size_in_bytes();
        // Factors not yet in the run dtype and contiguous are converted first (the loader reads
        // them in the run dtype, so normally none is).
        let factors: Vec<(ProjKey, Tensor, Tensor)> = adapter
            .weights
            .par_iter()
            .map(|(key, (a, b))| Ok((*key, a.to_dtype(dtype)?.contiguous()?, b.to_dtype(dtype)?.contiguous()?)))
            .collect::<candle_core::Result<_>>()?;
        let mut parts = Vec::with_capacity(factors.len());
        let mut at = 0;
        for (key, a, b) in &factors {
            let (na, nb) = (a.elem_count() * size, b.elem_count() * size);
            parts.push((*key, at..at + na, at + na..at + na + nb));
            at += na + nb;
        }
        let mut buf = pool.take(at, dev)?;
        let host = buf.as_mut_slice().w()?;
        // Disjoint ranges in order, so the writes can run in parallel.
        let mut rest: &mut [u8] = &mut host[..at];
        let mut jobs = Vec::with_capacity(factors.len());
        for ((_, a, b), (_, ra, rb)) in factors.iter().zip(&parts) {
            let (chunk, tail) = rest.split_at_mut(ra.len() + rb.len());
            jobs.push((chunk, a, b));
            rest = tail;
        }
        jobs.into_par_iter().try_for_each(|(chunk, a, b)| {
            let (ca, cb) = chunk.split_at_mut(a.elem_count() * size);
            let (out, r) = b.dims2()?;
            with_host_bytes(a, |src| ca.copy_from_slice(src))?;
            with_host_bytes(b, |src| transpose_bytes(src, out, r, size, cb))
        })?;
        Ok(Self { buf: Some(buf), parts, dtype, pool: pool.clone() })
    }

    fn host(&self) -> &PinnedHostSlice<u8> {
        self.buf.as_ref().expect("held until dropped")
    }

    /// Page-locked bytes held.
    pub fn bytes(&self) -> usize {
        self.host().len()
    }

    /// The dtype the factors are laid out in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Per projection, the byte ranges of A and B^T.
    pub fn parts(&self) -> &[(ProjKey, Range<usize>, Range<usize>)] {
        &self.parts
    }
}

/// Runs `f` on the bytes of a contiguous CPU tensor, in place.
fn with_host_bytes<R>(t: &Tensor, f: impl FnOnce(&[u8]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("a staged factor must be contiguous")
    };
    macro_rules! bytes {
        ($v:expr, $t:ty) => {{
            let v = &$v[start..end];
            // SAFETY: a slice of plain numbers viewed as its bytes.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }};
    }
    Ok(match &*storage {
        Storage::Cpu(CpuStorage::BF16(v)) => f(bytes!(v, half::bf16)),
        Storage::Cpu(CpuStorage::F16(v)) => f(bytes!(v, half::f16)),
        Storage::Cpu(CpuStorage::F32(v)) => f(bytes!(v, f32)),
        _ => candle_core::bail!("a staged factor must be a bf16, f16 or f32 host tensor"),
    })
}

/// `src`, a `[rows, cols]` matrix of `size`-byte elements (2 or 4), transposed into `dst`
/// (`[cols, rows]`), writing `dst` in order (it is write-combined memory).
fn transpose_bytes(src: &[u8], rows: usize, cols: usize, size: usize, dst: &mut [u8]) {
    assert!(src.len() >= rows * cols * size && dst.len() >= rows * cols * size);
    macro_rules! transpose {
        ($t:ty) => {{
            let (s, d) = (src.as_ptr() as *const $t, dst.as_mut_ptr() as *mut $t);
            for c in 0..cols {
                for r in 0..rows {
                    // SAFETY: both indices are below rows * cols, within the asserted lengths;
                    // unaligned accesses, so no alignment is assumed.
                    unsafe { d.add(c * rows + r).write_unaligned(s.add(r * cols + c).read_unaligned()) };
                }
            }
        }};
    }
    match size {
        2 => transpose!(u16),
        _ => transpose!(u32),
    }
}

/// Where one factor of a slot lives: `len` elements of `tensor` (contiguous) from `offset`.
pub struct SlotRegion {
    pub tensor: Tensor,
    pub offset: usize,
    pub len: usize,
}

/// A stream for slot writes, beside the compute stream.
pub struct SlotCopier {
    stream: Arc<CudaStream>,
    main: Arc<CudaStream>,
}

impl SlotCopier {
    pub fn new(device: &Device) -> candle_core::Result<Self> {
        let Device::Cuda(dev) = device else { candle_core::bail!("a slot copier needs a CUDA device") };
        let main = dev.cuda_stream();
        Ok(Self { stream: main.context().new_stream().w()?, main })
    }

    /// Queues `image` into the slot regions `targets` gives per projection (for A and for
    /// B^T: the bank's tensor, the slot's first element and its element count), after
    /// everything queued so far on the compute stream (a step that still reads the slot's old
    /// adapter); returns the event that completes with the copy. `image` must outlive it.
    pub fn copy(
        &self,
        image: &PinnedImage,
        targets: impl Fn(ProjKey) -> Option<[SlotRegion; 2]>,
    ) -> candle_core::Result<CudaEvent> {
        let before = self.main.record_event(None).w()?;
        self.stream.wait(&before).w()?;
        let host = image.host().as_slice().w()?.as_ptr();
        let (mut dsts, mut srcs, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
        for (key, a, bt) in image.parts() {
            let Some([ra, rb]) = targets(*key) else {
                candle_core::bail!("the slot bank has no storage for {}", key.peft_prefix())
            };
            for (region, bytes) in [(ra, a), (rb, bt)] {
                let SlotRegion { tensor: t, offset, len } = region;
                if bytes.len() > len * t.dtype().size_in_bytes() || t.dtype() != image.dtype {
                    candle_core::bail!("{}: the slot does not fit the staged factor", key.peft_prefix());
                }
                dsts.push(device_ptr_at(&t, offset, &self.stream)?);
                // SAFETY: inside `image`'s buffer (its ranges were laid out in it).
                srcs.push(unsafe { host.add(bytes.start) } as sys::CUdeviceptr);
                sizes.push(bytes.len());
            }
        }
        // SAFETY: every `dst` has room for its size (checked above); the host ranges lie in the
        // image, which the caller keeps alive until the returned event completes.
        unsafe { self.copy_all(&mut dsts, &mut srcs, &mut sizes) }?;
        self.stream.record_event(None).w()
    }

    /// The copies as one batched call (CUDA 12.8+: 448 copies for an adapter of the 8B shape,
    /// which as separate calls cost the engine thread over a millisecond of driver time), or one
    /// call each where the driver refuses the batch.
    unsafe fn copy_all(
        &self,
        dsts: &mut [sys::CUdeviceptr],
        srcs: &mut [sys::CUdeviceptr],
        sizes: &mut [usize],
    ) -> candle_core::Result<()> {
        use sys::CUmemLocationType::{CU_MEM_LOCATION_TYPE_DEVICE, CU_MEM_LOCATION_TYPE_HOST};
        let mut attrs = sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: sys::CUmemLocation { type_: CU_MEM_LOCATION_TYPE_HOST, id: 0 },
            dstLocHint: sys::CUmemLocation {
                type_: CU_MEM_LOCATION_TYPE_DEVICE,
                id: self.stream.context().ordinal() as i32,
            },
            flags: sys::CUmemcpyFlags::CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE as u32,
        };
        let mut first = 0usize;
        let batched = sys::cuMemcpyBatchAsync_v2(
            dsts.as_mut_ptr(),
            srcs.as_mut_ptr(),
            sizes.as_mut_ptr(),
            dsts.len(),
            &mut attrs,
            &mut first,
            1,
            self.stream.cu_stream(),
        );
        if batched == sys::CUresult::CUDA_SUCCESS {
            return Ok(());
        }
        for ((&dst, &src), &n) in dsts.iter().zip(srcs.iter()).zip(sizes.iter()) {
            sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, n, self.stream.cu_stream()).result().w()?;
        }
        Ok(())
    }
}

impl Drop for SlotCopier {
    fn drop(&mut self) {
        // Images in flight are freed after this; the copies must not outlive them.
        let _ = self.stream.synchronize();
    }
}

/// The device address of element `offset` of a contiguous CUDA tensor.
fn device_ptr_at(t: &Tensor, offset: usize, stream: &CudaStream) -> candle_core::Result<sys::CUdeviceptr> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(c) = &*storage else { candle_core::bail!("slot storage must be on the CUDA device") };
    let Some((start, _)) = layout.contiguous_offsets() else { candle_core::bail!("slot storage must be contiguous") };
    let at = start + offset;
    macro_rules! ptr {
        ($t:ty) => {{
            let (p, _guard) = c.as_cuda_slice::<$t>()?.device_ptr(stream);
            p + (at * std::mem::size_of::<$t>()) as u64
        }};
    }
    Ok(match t.dtype() {
        DType::BF16 => ptr!(half::bf16),
        DType::F16 => ptr!(half::f16),
        DType::F32 => ptr!(f32),
        d => candle_core::bail!("slot storage of {d:?}"),
    })
}
