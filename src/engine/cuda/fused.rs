//! Launches of `kernels/fused.cu` (see `engine::model::fused_ops` for the semantics and the
//! CPU reference of each).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};

use crate::engine::attention::paged_ops::contiguous;
use crate::engine::cuda::kernels::suffix;
use crate::engine::model::fused_ops::HeadDims;

const FUSED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const FUSED_MODULE: &str = "lab_fused";
/// Threads per block of `add_rmsnorm` (`NORM_THREADS` in the kernel).
const NORM_THREADS: u32 = 512;
/// Threads per block of `rope_store` (one block per row).
const ROPE_THREADS: u32 = 256;

fn cfg(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// `[s; h]` = add + RMSNorm (`kernels/fused.cu`): `[2, N, W]`.
pub fn add_rms_norm(
    x: &CudaStorage,
    xl: &Layout,
    a: &CudaStorage,
    al: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f32,
    delta: Option<&Tensor>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, width) = xl.shape().dims2()?;
    if al.shape().dims2()? != (n, width) || wl.shape().elem_count() != width {
        candle_core::bail!("add-rms-norm: x {:?}, a {:?}, w {:?}", xl.dims(), al.dims(), wl.dims());
    }
    let dev = x.device().clone();
    let func = dev.get_or_load_custom_func(&format!("add_rmsnorm_{}", suffix(x.dtype())?), FUSED_MODULE, FUSED_PTX)?;
    let ((x0, xn), (a0, an), (w0, wn)) = (contiguous(xl)?, contiguous(al)?, contiguous(wl)?);
    let (nu, wu) = (n as u32, width as u32);
    let guard = delta_operand(delta, n, width)?;
    let dview = guard.as_ref().map(view::<f32>).transpose()?;
    let null = 0u64;
    macro_rules! launch {
        ($t:ty) => {{
            let out = unsafe { dev.alloc::<$t>(2 * n * width)? };
            if n > 0 {
                let xs = x.as_cuda_slice::<$t>()?.slice(x0..x0 + xn);
                let as_ = a.as_cuda_slice::<$t>()?.slice(a0..a0 + an);
                let ws = w.as_cuda_slice::<$t>()?.slice(w0..w0 + wn);
                let mut b = func.builder();
                b.arg(&out).arg(&xs).arg(&as_);
                match &dview {
                    Some(d) => b.arg(d),
                    None => b.arg(&null),
                };
                b.arg(&ws).arg(&nu).arg(&wu).arg(&eps);
                unsafe { b.launch(cfg(nu, NORM_THREADS)) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match x.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        _ => launch!(f16),
    };
    Ok((out, Shape::from((2, n, width))))
}

/// `silu(gate) * up` (`kernels/fused.cu`): `[N, I]`.
pub fn silu_mul(gu: &CudaStorage, l: &Layout, delta: Option<&Tensor>) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, two_i) = l.shape().dims2()?;
    let guard = delta_operand(delta, n, two_i)?;
    let dview = guard.as_ref().map(view::<f32>).transpose()?;
    let null = 0u64;
    let i = two_i / 2;
    let dev = gu.device().clone();
    let func = dev.get_or_load_custom_func(&format!("silu_mul_{}", suffix(gu.dtype())?), FUSED_MODULE, FUSED_PTX)?;
    let (g0, gn) = contiguous(l)?;
    let (nu, iu) = (n as u32, i as u32);
    let blocks = ((n * i).div_ceil(256) as u32).clamp(1, 4096);
    macro_rules! launch {
        ($t:ty) => {{
            let out = unsafe { dev.alloc::<$t>(n * i)? };
            if n * i > 0 {
                let gs = gu.as_cuda_slice::<$t>()?.slice(g0..g0 + gn);
                let mut b = func.builder();
                b.arg(&out).arg(&gs);
                match &dview {
                    Some(d) => b.arg(d),
                    None => b.arg(&null),
                };
                b.arg(&nu).arg(&iu);
                unsafe { b.launch(cfg(blocks, 256)) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match gu.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        _ => launch!(f16),
    };
    Ok((out, Shape::from((n, i))))
}

/// A read-locked contiguous CUDA tensor: its storage guard, offset and length.
type Operand<'a> = (candle_core::StorageRef<'a>, usize, usize);

fn operand<'a>(t: &'a Tensor, what: &str) -> candle_core::Result<Operand<'a>> {
    let (s, l) = t.storage_and_layout();
    if !matches!(&*s, Storage::Cuda(_)) {
        candle_core::bail!("fused op: the {what} must be on the CUDA device");
    }
    let (o, n) = contiguous(l)?;
    Ok((s, o, n))
}

/// The read-locked f32 LoRA update `[n, width]` of an op's input, if any.
fn delta_operand(delta: Option<&Tensor>, n: usize, width: usize) -> candle_core::Result<Option<Operand<'_>>> {
    let Some(d) = delta else { return Ok(None) };
    if d.dims() != [n, width] || d.dtype() != DType::F32 {
        candle_core::bail!("fused op: LoRA delta {:?} {:?} for [{n}, {width}]", d.dims(), d.dtype());
    }
    Ok(Some(operand(d, "LoRA delta")?))
}

/// The device view of an operand as `T`.
fn view<'a, T: candle_core::cuda_backend::CudaDType>(
    op: &'a Operand<'_>,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Storage::Cuda(c) = &*op.0 else { candle_core::bail!("rope-store: not a CUDA operand") };
    Ok(c.as_cuda_slice::<T>()?.slice(op.1..op.1 + op.2))
}

/// The operands of [`rope_store`] besides the projection: the rows' RoPE tables and the
/// projection's LoRA update (f32, same shape), if any.
pub struct RopeInputs<'a> {
    pub cos: (&'a CudaStorage, &'a Layout),
    pub sin: (&'a CudaStorage, &'a Layout),
    pub delta: Option<&'a Tensor>,
}

/// Rotated q | rotated k | v of the fused projection (`kernels/fused.cu`), the keys and values
/// also stored into `cache` = (k pool, v pool, slots) when given.
pub fn rope_store(
    qkv: &CudaStorage,
    ql: &Layout,
    inputs: RopeInputs,
    dims: HeadDims,
    cache: Option<&(Tensor, Tensor, Tensor)>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let RopeInputs { cos: (cos, cl), sin: (sin, sl), delta } = inputs;
    let HeadDims { heads: h, kv_heads: kvh, head_dim: d } = dims;
    let (n, width) = ql.shape().dims2()?;
    if width != (h + 2 * kvh) * d || d % 2 != 0 || cl.shape().dims2()? != (n, d / 2) {
        candle_core::bail!("rope-store: qkv {:?} for {h}+2x{kvh} heads of {d}, cos {:?}", ql.dims(), cl.dims());
    }
    let dev = qkv.device().clone();
    let func = dev.get_or_load_custom_func(&format!("rope_store_{}", suffix(qkv.dtype())?), FUSED_MODULE, FUSED_PTX)?;
    // The pools are read-locked here and written by the kernel: each is a distinct tensor that
    // no other op touches while this one runs (one stream).
    let pools = match cache {
        Some((kc, vc, slots)) => {
            if slots.dims() != [n] || kc.dims().last() != Some(&d) || vc.dims() != kc.dims() {
                candle_core::bail!("rope-store: pools {:?} / {:?}, slots {:?}", kc.dims(), vc.dims(), slots.dims());
            }
            Some((operand(kc, "key pool")?, operand(vc, "value pool")?, operand(slots, "slots")?))
        }
        None => None,
    };
    let ((q0, qn), (c0, cn), (s0, sn)) = (contiguous(ql)?, contiguous(cl)?, contiguous(sl)?);
    let guard = delta_operand(delta, n, width)?;
    let dview = guard.as_ref().map(view::<f32>).transpose()?;
    let null = 0u64;
    let (nu, hu, kvhu, du) = (n as u32, h as u32, kvh as u32, d as u32);
    // Without a cache, every slot is SKIP_SLOT: a device buffer of that value stands in.
    let skip = match &pools {
        Some(_) => None,
        None => Some(dev.clone_htod(&vec![u32::MAX; n.max(1)])?),
    };
    macro_rules! launch {
        ($t:ty) => {{
            let out = unsafe { dev.alloc::<$t>(n * width)? };
            if n > 0 {
                let xs = qkv.as_cuda_slice::<$t>()?.slice(q0..q0 + qn);
                let cs = cos.as_cuda_slice::<$t>()?.slice(c0..c0 + cn);
                let ss = sin.as_cuda_slice::<$t>()?.slice(s0..s0 + sn);
                let (pool_views, slots) = match (&pools, &skip) {
                    (Some((kc, vc, sl)), _) => {
                        let Storage::Cuda(c) = &*sl.0 else { candle_core::bail!("rope-store: slots on the host") };
                        (Some((view::<$t>(kc)?, view::<$t>(vc)?)), c.as_cuda_slice::<u32>()?.slice(sl.1..sl.1 + sl.2))
                    }
                    (None, Some(s)) => (None, s.slice(0..)),
                    (None, None) => unreachable!("one of the two is set above"),
                };
                let mut b = func.builder();
                b.arg(&out);
                match &pool_views {
                    Some((kv, vv)) => b.arg(kv).arg(vv),
                    // Never written (every slot is SKIP_SLOT): the output stands in for both pools.
                    None => b.arg(&out).arg(&out),
                };
                b.arg(&xs);
                match &dview {
                    Some(d) => b.arg(d),
                    None => b.arg(&null),
                };
                b.arg(&cs).arg(&ss).arg(&slots).arg(&nu).arg(&hu).arg(&kvhu).arg(&du);
                unsafe { b.launch(cfg(nu, ROPE_THREADS)) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match qkv.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        _ => launch!(f16),
    };
    Ok((out, Shape::from(n * width)))
}
