//! The CUDA side of the engine: device start-up and the launches of `kernels/*.cu`.
//!
//! Only built with `--features cuda`; every op here has a CPU twin that is its reference.

pub mod fused;
pub mod gemv;
pub mod graph;
pub mod kernels;
pub mod lora;
pub mod pdl;
pub mod pinned;

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::Device;

use crate::engine::{EngineError, Result};

/// Opens CUDA device `ordinal` the way the engine needs it.
///
/// - its own stream (`new_cuda_with_stream`): the legacy/per-thread default stream cannot be
///   captured into a CUDA graph, which the decode path will need;
/// - the default memory pool keeps freed memory (release threshold = max): cudarc allocates
///   with `cuMemAllocAsync`, and with the default threshold of 0 every synchronize hands memory
///   back, so the next large allocation maps fresh pages (measured: ops on large tensors at
///   about half the copy bandwidth).
/// - no cudarc event tracking: a stream of its own puts cudarc in multi-stream mode, where it
///   records events on every tensor at every launch for cross-stream safety; the engine runs
///   everything on this one stream, so those events are pure host overhead per launch.
pub fn open_device(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda_with_stream(ordinal)?;
    // SAFETY: every tensor the engine makes lives on this device's single stream, so there is
    // no cross-stream use for events to order (see cudarc's `disable_event_tracking`).
    unsafe { device.as_cuda_device()?.disable_event_tracking() };
    let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
    // SAFETY: plain driver calls on the context's own device; `thr` outlives the call.
    unsafe {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(|e| EngineError::Device(format!("default memory pool: {e:?}")))?;
        let mut thr = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut thr as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .map_err(|e| EngineError::Device(format!("memory pool release threshold: {e:?}")))?;
    }
    Ok(device)
}

/// `(free, total)` device memory in bytes.
pub fn mem_info(device: &Device) -> Result<(usize, usize)> {
    let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
    ctx.mem_get_info().map_err(|e| EngineError::Device(format!("cuMemGetInfo: {e:?}")))
}

/// Name of the device (`NVIDIA H200`).
pub fn device_name(device: &Device) -> Result<String> {
    let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
    ctx.name().map_err(|e| EngineError::Device(format!("device name: {e:?}")))
}
