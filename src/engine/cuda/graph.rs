//! Capture and replay of one CUDA graph on the engine's stream (cudarc's graph API).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Device, Layout};

use crate::engine::{EngineError, Result};

/// A captured, instantiated graph.
pub struct Graph(CudaGraph);

impl Graph {
    /// Runs `body` once eagerly, then captures a second run of it.
    ///
    /// The eager run loads every kernel module and cuBLAS picks its kernels; both run under
    /// candle's launch-parameter cache (`enable_cuda_graph_htod_cache`), so the small layout
    /// vectors some kernels upload are uploaded then and only looked up while capturing (an
    /// upload or a device-to-host copy during capture is an error there, not a silent bug).
    /// Everything `body` allocates must be freed before it returns, except into buffers that
    /// outlive the graph.
    pub fn capture(device: &Device, body: impl Fn() -> Result<()>) -> Result<Self> {
        let cuda = device.as_cuda_device()?;
        let _cache = cuda.enable_cuda_graph_htod_cache();
        body()?;
        device.synchronize()?;
        let stream = cuda.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| EngineError::Device(format!("begin graph capture: {e:?}")))?;
        let ran = body();
        // The capture must end whatever happened, or the stream stays unusable.
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        ran?;
        let graph = graph
            .map_err(|e| EngineError::Device(format!("end graph capture: {e:?}")))?
            .ok_or_else(|| EngineError::Device("graph capture recorded nothing".into()))?;
        graph.upload().map_err(|e| EngineError::Device(format!("graph upload: {e:?}")))?;
        Ok(Self(graph))
    }

    /// Queues one replay on the stream it was captured on.
    pub fn launch(&self) -> Result<()> {
        self.0.launch().map_err(|e| EngineError::Device(format!("graph launch: {e:?}")))
    }
}

/// `dst[layout] = src` for a u32 device tensor (the refill of a graph's static inputs), on the
/// device's stream, outside any capture.
pub fn upload_u32(dst: &mut CudaStorage, l: &Layout, src: &[u32]) -> candle_core::Result<()> {
    let stream = dst.device().cuda_stream();
    let o = l.start_offset();
    let slice = dst.as_cuda_slice_mut::<u32>()?;
    let mut view = slice.slice_mut(o..o + src.len());
    stream.memcpy_htod(src, &mut view).w()
}
