//! Launch of `kernels/gemv.cu`: `y = x W^T` for the few rows of a decode step.

use candle_core::backend::BackendStorage;
use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Shape};
use half::{bf16, f16};

use crate::engine::attention::paged_ops::contiguous;

const GEMV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx"));
const GEMV_MODULE: &str = "lab_gemv";

/// Rows of `x` the kernel takes at most (more: cuBLAS).
pub const MAX_ROWS: usize = 8;
/// Warps per block (`WARPS` in the kernel).
const WARPS: u32 = 4;

/// Output columns per warp for `m` rows (`NPW` of the kernel's instantiations).
fn columns_per_warp(m: usize) -> u32 {
    if m <= 2 {
        2
    } else {
        4
    }
}

/// `x: [M, K]` times `w: [N, K]` transposed, when the kernel applies (M <= 8, bf16 or f16,
/// both contiguous, K a multiple of 8 and both 16-byte aligned); `None` otherwise. With
/// `early_start`, the kernel may be scheduled before the kernel that writes `x` has finished
/// (see [`super::pdl`]).
pub fn try_gemv(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    early_start: bool,
) -> candle_core::Result<Option<(CudaStorage, Shape)>> {
    let ((m, k), (n, k2)) = (xl.shape().dims2()?, wl.shape().dims2()?);
    let (Some((x0, _)), Some((w0, _))) = (xl.contiguous_offsets(), wl.contiguous_offsets()) else {
        return Ok(None);
    };
    let suffix = match x.dtype() {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => return Ok(None),
    };
    if m == 0 || m > MAX_ROWS || k != k2 || k % 8 != 0 || x0 % 8 != 0 || w0 % 8 != 0 || w.dtype() != x.dtype() {
        return Ok(None);
    }
    let dev = x.device().clone();
    let func = dev.get_or_load_custom_func(&format!("gemv_{suffix}_m{m}"), GEMV_MODULE, GEMV_PTX)?;
    let per_block = WARPS * columns_per_warp(m);
    let cfg = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(per_block), 1, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (nu, ku) = (n as u32, k as u32);
    macro_rules! launch {
        ($t:ty) => {{
            let (_, xn) = contiguous(xl)?;
            let (_, wn) = contiguous(wl)?;
            let xs = x.as_cuda_slice::<$t>()?.slice(x0..x0 + xn);
            let ws = w.as_cuda_slice::<$t>()?.slice(w0..w0 + wn);
            let mut y = unsafe { dev.alloc::<$t>(m * n)? };
            let stream = dev.cuda_stream();
            {
                // Event tracking is off (engine::cuda::open), so the guards record nothing.
                let (yp, _gy) = y.device_ptr_mut(&stream);
                let (xp, _gx) = xs.device_ptr(&stream);
                let (wp, _gw) = ws.device_ptr(&stream);
                let mut params: [*mut c_void; 5] = [
                    &yp as *const _ as *mut c_void,
                    &xp as *const _ as *mut c_void,
                    &wp as *const _ as *mut c_void,
                    &nu as *const _ as *mut c_void,
                    &ku as *const _ as *mut c_void,
                ];
                unsafe { super::pdl::launch(&func, &stream, cfg, &mut params, early_start) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    let y = match x.dtype() {
        DType::BF16 => launch!(bf16),
        _ => launch!(f16),
    };
    Ok(Some((y, Shape::from((m, n)))))
}
