//! Launches of `kernels/lora.cu`: the batched multi-LoRA update of one projection, in place.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Storage, Tensor};
use half::{bf16, f16};

use crate::engine::attention::paged_ops::contiguous;

const LORA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));
const LORA_MODULE: &str = "lab_lora";
/// Threads per block of both kernels (`THREADS` in the kernel).
const THREADS: u32 = 128;
/// Ranks the expand kernel keeps in shared memory.
pub const MAX_RANK: usize = 256;

/// The operands of [`bgmv_cuda`] other than `y`.
pub struct BgmvArgs<'a> {
    /// `[M, K]`.
    pub x: &'a Tensor,
    /// `[S, R, K]`.
    pub a: &'a Tensor,
    /// `[S, R, N]`.
    pub bt: &'a Tensor,
    /// `[M]` u32.
    pub slot: &'a Tensor,
    /// `[2S]` u32: ranks, then scales as f32 bits.
    pub meta: &'a Tensor,
}

struct Expand<'a>(&'a BgmvArgs<'a>);

impl candle_core::InplaceOp1 for Expand<'_> {
    fn name(&self) -> &'static str {
        "lora-bgmv"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("lora-bgmv: the CUDA kernel only (the CPU runs engine::lora::op::bgmv_reference)")
    }

    fn cuda_fwd(&self, y: &mut CudaStorage, yl: &Layout) -> candle_core::Result<()> {
        launch(y, yl, self.0)
    }
}

/// `y += LoRA(x)` row by row in place (see `kernels/lora.cu`). Every operand contiguous, on
/// the device, in `y`'s dtype; `K` and `N` multiples of 8.
pub fn bgmv_cuda(y: &Tensor, args: &BgmvArgs) -> candle_core::Result<()> {
    y.inplace_op1(&Expand(args))
}

macro_rules! cuda_of {
    ($t:expr) => {{
        let (s, l) = $t.storage_and_layout();
        let l = l.clone();
        (s, l)
    }};
}

fn launch(y: &mut CudaStorage, yl: &Layout, args: &BgmvArgs) -> candle_core::Result<()> {
    let (m, n) = yl.shape().dims2()?;
    let (s_count, r, k) = args.a.dims3()?;
    if m == 0 {
        return Ok(());
    }
    if k % 8 != 0 || n % 8 != 0 || r > MAX_RANK || args.bt.dims3()? != (s_count, r, n) {
        candle_core::bail!("lora-bgmv: shapes x [{m}, {k}] a [{s_count}, {r}, {k}] y [{m}, {n}] (K, N % 8, R <= 256)");
    }
    let (xs, xl) = cuda_of!(args.x);
    let (as_, al) = cuda_of!(args.a);
    let (bs, bl) = cuda_of!(args.bt);
    let (ss, sl) = cuda_of!(args.slot);
    let (ms, ml) = cuda_of!(args.meta);
    let (Storage::Cuda(xs), Storage::Cuda(as_), Storage::Cuda(bs), Storage::Cuda(ss), Storage::Cuda(ms)) =
        (&*xs, &*as_, &*bs, &*ss, &*ms)
    else {
        candle_core::bail!("lora-bgmv: every operand on the CUDA device");
    };
    let dev = y.device().clone();
    let dtype = y.dtype();
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => candle_core::bail!("lora-bgmv: no kernel for {d:?}"),
    };
    let (x0, xn) = contiguous(&xl)?;
    let (a0, an) = contiguous(&al)?;
    let (b0, bn) = contiguous(&bl)?;
    let (y0, yn) = contiguous(yl)?;
    let (s0, sn) = contiguous(&sl)?;
    let (m0, mn) = contiguous(&ml)?;
    if [x0, a0, b0, y0].iter().any(|o| o % 8 != 0) {
        candle_core::bail!("lora-bgmv: operands must start on 8-element boundaries");
    }
    let slot = ss.as_cuda_slice::<u32>()?.slice(s0..s0 + sn);
    let meta = ms.as_cuda_slice::<u32>()?.slice(m0..m0 + mn);
    let t = unsafe { dev.alloc::<f32>(m * r)? };
    let shrink = dev.get_or_load_custom_func(&format!("lora_shrink_{suffix}"), LORA_MODULE, LORA_PTX)?;
    let expand = dev.get_or_load_custom_func(&format!("lora_expand_{suffix}"), LORA_MODULE, LORA_PTX)?;
    let (su, ku, nu, ru) = (s_count as u32, k as u32, n as u32, r as u32);
    let shrink_cfg = LaunchConfig { grid_dim: (r as u32, m as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let expand_cfg = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(THREADS * 8), m as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! go {
        ($ty:ty) => {{
            let x = xs.as_cuda_slice::<$ty>()?.slice(x0..x0 + xn);
            let a = as_.as_cuda_slice::<$ty>()?.slice(a0..a0 + an);
            let bt = bs.as_cuda_slice::<$ty>()?.slice(b0..b0 + bn);
            let mut b = shrink.builder();
            b.arg(&t).arg(&x).arg(&a).arg(&slot).arg(&meta).arg(&su).arg(&ku).arg(&ru);
            unsafe { b.launch(shrink_cfg) }.w()?;
            let mut yv = y.as_cuda_slice_mut::<$ty>()?.slice_mut(y0..y0 + yn);
            let mut b = expand.builder();
            b.arg(&mut yv).arg(&t).arg(&bt).arg(&slot).arg(&meta).arg(&su).arg(&nu).arg(&ru);
            unsafe { b.launch(expand_cfg) }.w()?;
        }};
    }
    match dtype {
        DType::F32 => go!(f32),
        DType::BF16 => go!(bf16),
        _ => go!(f16),
    }
    Ok(())
}

/// Host values in one of the run dtypes, for [`upload_at`].
pub enum HostValues {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl HostValues {
    /// The values of the host tensor `t` (row-major) as they are.
    pub fn of(t: &Tensor) -> candle_core::Result<Self> {
        let t = t.flatten_all()?;
        Ok(match t.dtype() {
            DType::F32 => Self::F32(t.to_vec1()?),
            DType::BF16 => Self::BF16(t.to_vec1()?),
            DType::F16 => Self::F16(t.to_vec1()?),
            d => candle_core::bail!("no slot upload for {d:?}"),
        })
    }
}

struct UploadAt<'a> {
    offset: usize,
    values: &'a HostValues,
}

impl candle_core::InplaceOp1 for UploadAt<'_> {
    fn name(&self) -> &'static str {
        "upload-at"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("upload-at: a CUDA tensor only")
    }

    fn cuda_fwd(&self, dst: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let stream = dst.device().cuda_stream();
        let (o, n) = contiguous(l)?;
        macro_rules! copy {
            ($t:ty, $v:expr) => {{
                if self.offset + $v.len() > n {
                    candle_core::bail!("upload-at: {} values at {} into {n}", $v.len(), self.offset);
                }
                let at = o + self.offset;
                let mut view = dst.as_cuda_slice_mut::<$t>()?.slice_mut(at..at + $v.len());
                stream.memcpy_htod($v.as_slice(), &mut view).w()
            }};
        }
        match (&self.values, dst.dtype()) {
            (HostValues::F32(v), DType::F32) => copy!(f32, v),
            (HostValues::BF16(v), DType::BF16) => copy!(bf16, v),
            (HostValues::F16(v), DType::F16) => copy!(f16, v),
            (_, d) => candle_core::bail!("upload-at: host values of another dtype than the {d:?} tensor"),
        }
    }
}

/// `dst.flat[offset..offset + values.len()] = values`: one host-to-device copy straight into
/// a contiguous CUDA tensor (an adapter into its slot: no staging tensor, no kernel).
pub fn upload_at(dst: &Tensor, offset: usize, values: &HostValues) -> candle_core::Result<()> {
    dst.inplace_op1(&UploadAt { offset, values })
}
