//! Kernel launches with an early start (programmatic dependent launch, sm_90+).
//!
//! A decode step at batch 1 is a chain of ~290 kernels in which the weight-streaming GEMMs
//! alternate with small latency-bound ones (RoPE, attention, norms). Launched plainly, each
//! GEMM starts only when the kernel before it has finished, so the memory bus idles through
//! every small kernel and every launch gap. Launched with the programmatic-stream-serialization
//! attribute, it may start as soon as every block of the kernel before has called
//! `griddepcontrol.launch_dependents` (`kernels/pdl.cuh`); its own `griddepcontrol.wait` then
//! holds back everything that reads what that kernel writes. Inside a captured CUDA graph the
//! attribute should become a programmatic edge.
//!
//! Measured on the H200 (BENCHMARKS.md, session 8): no faster inside decode graphs (likely the
//! allocation node candle's per-op output puts between the two kernels), so it is opt-in
//! (`Skinny::early_start`, `lab bench --early-start`).

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaStream, DriverError, LaunchConfig};

/// Launches `func` on `stream` with `params` (one pointer per kernel argument, in order, each
/// pointing at the argument's value), allowed to start before the previous kernel on the
/// stream has finished when `early_start` is set.
///
/// # Safety
/// `params` must match the kernel's signature, and the kernel must call `pdl_wait()` before
/// touching memory that earlier kernels write (or read, if it writes there).
pub unsafe fn launch(
    func: &CudaFunction,
    stream: &CudaStream,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
    early_start: bool,
) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    let mut attr = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value: sys::CUlaunchAttributeValue { programmaticStreamSerializationAllowed: 1 },
    };
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: u32::from(early_start),
    };
    sys::cuLaunchKernelEx(&config, func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()).result()
}
