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
/// Blocks of the shrink per row and projection (`SHRINK_GROUPS` in the kernel).
const SHRINK_GROUPS: u32 = 4;
/// Ranks the expand kernel keeps in shared memory.
pub const MAX_RANK: usize = 256;

/// Projections one launch takes at most (the kernels' segments).
pub const MAX_PARTS: usize = 3;

/// The operands of [`bgmv_cuda`]: projections that share their input rows.
pub struct BgmvArgs<'a> {
    /// `[M, K]`.
    pub x: &'a Tensor,
    /// `[M]` u32.
    pub slot: &'a Tensor,
    /// Per projection (1..=3): `y [M, N]` (updated in place; distinct tensors, none a view of
    /// another), `a [S, R, K]`, `bt [S, R, N]`, `meta [2S]` u32 (ranks, then scales as f32 bits).
    pub parts: Vec<(&'a Tensor, &'a Tensor, &'a Tensor, &'a Tensor)>,
    /// f32 scratch reused across launches when large enough (else one is allocated).
    pub scratch: Option<&'a Tensor>,
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

/// `y_z += LoRA_z(x)` row by row in place for every part z (see `kernels/lora.cu`), one
/// shrink and one expand launch for all of them. Every operand contiguous, on the device, in
/// the ys' dtype; `K` and every `N` multiples of 8.
pub fn bgmv_cuda(args: &BgmvArgs) -> candle_core::Result<()> {
    let n = args.parts.len();
    if n == 0 || n > MAX_PARTS {
        candle_core::bail!("lora-bgmv: 1 to {MAX_PARTS} projections per launch, not {n}");
    }
    let first = args.parts[0].0;
    if args.parts[1..].iter().any(|p| p.0.id() == first.id()) {
        candle_core::bail!("lora-bgmv: the outputs must be distinct tensors");
    }
    first.inplace_op1(&Expand(args))
}

/// A read-locked contiguous CUDA operand: its storage guard, offset and length.
type Operand<'a> = (candle_core::StorageRef<'a>, usize, usize);

fn operand(t: &Tensor) -> candle_core::Result<Operand<'_>> {
    let (s, l) = t.storage_and_layout();
    if !matches!(&*s, Storage::Cuda(_)) {
        candle_core::bail!("lora-bgmv: every operand on the CUDA device");
    }
    let (o, n) = contiguous(l)?;
    Ok((s, o, n))
}

/// The device view of an operand as `T`.
fn slice<'a, T: candle_core::cuda_backend::CudaDType>(
    op: &'a Operand<'_>,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Storage::Cuda(c) = &*op.0 else { candle_core::bail!("lora-bgmv: not a CUDA operand") };
    Ok(c.as_cuda_slice::<T>()?.slice(op.1..op.1 + op.2))
}

/// One projection's operands; part 0's output is the write-locked tensor of the in-place op.
struct Part<'a> {
    y: Option<Operand<'a>>,
    a: Operand<'a>,
    bt: Operand<'a>,
    meta: Operand<'a>,
}

fn launch(y0: &mut CudaStorage, y0l: &Layout, args: &BgmvArgs) -> candle_core::Result<()> {
    let (m, _) = y0l.shape().dims2()?;
    let (s_count, r, k) = args.parts[0].1.dims3()?;
    if m == 0 {
        return Ok(());
    }
    let mut ns = [0u32; MAX_PARTS];
    for (i, (y, a, bt, _)) in args.parts.iter().enumerate() {
        let (ym, n) = y.dims2()?;
        if ym != m || a.dims3()? != (s_count, r, k) || bt.dims3()? != (s_count, r, n) || n % 8 != 0 {
            candle_core::bail!("lora-bgmv: y [{ym}, {n}] a {:?} bt {:?} for x [{m}, {k}]", a.dims(), bt.dims());
        }
        ns[i] = n as u32;
    }
    if k % 8 != 0 || r > MAX_RANK {
        candle_core::bail!("lora-bgmv: K = {k} (a multiple of 8), R = {r} (at most {MAX_RANK})");
    }
    let dev = y0.device().clone();
    let dtype = y0.dtype();
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => candle_core::bail!("lora-bgmv: no kernel for {d:?}"),
    };
    let (x, slot) = (operand(args.x)?, operand(args.slot)?);
    // The other parts' outputs are read-locked here and written by the kernel: device memory
    // of distinct fresh tensors that no other op reads or writes meanwhile (one stream).
    let parts: Vec<Part> = args
        .parts
        .iter()
        .enumerate()
        .map(|(i, (y, a, bt, meta))| {
            Ok(Part {
                y: (i > 0).then(|| operand(y)).transpose()?,
                a: operand(a)?,
                bt: operand(bt)?,
                meta: operand(meta)?,
            })
        })
        .collect::<candle_core::Result<_>>()?;
    let np = parts.len();
    // Unused segments name part 0's operands; their blocks do not exist (grid z = np).
    let part = |z: usize| &parts[z.min(np - 1)];
    let (y0o, y0n) = contiguous(y0l)?;
    let scratch = args.scratch.map(operand).transpose()?.filter(|s| s.2 >= np * m * r);
    let owned = match scratch {
        Some(_) => None,
        None => Some(unsafe { dev.alloc::<f32>(np * m * r)? }),
    };
    let t = match (&scratch, &owned) {
        (Some(s), _) => slice::<f32>(s)?,
        (None, Some(o)) => o.slice(0..),
        (None, None) => unreachable!("allocated above"),
    };
    let ts: Vec<_> = (0..MAX_PARTS).map(|z| t.slice(z.min(np - 1) * m * r..)).collect();
    let shrink = dev.get_or_load_custom_func(&format!("lora_shrink_{suffix}"), LORA_MODULE, LORA_PTX)?;
    let expand = dev.get_or_load_custom_func(&format!("lora_expand_{suffix}"), LORA_MODULE, LORA_PTX)?;
    let (su, ku, ru) = (s_count as u32, k as u32, r as u32);
    let n_max = ns.iter().copied().max().unwrap_or(0);
    let grid = |x: u32| (x, m as u32, np as u32);
    let shrink_cfg = LaunchConfig { grid_dim: grid(SHRINK_GROUPS), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let expand_cfg =
        LaunchConfig { grid_dim: grid(n_max.div_ceil(THREADS * 8)), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let slot = slice::<u32>(&slot)?;
    let metas = [slice::<u32>(&part(0).meta)?, slice::<u32>(&part(1).meta)?, slice::<u32>(&part(2).meta)?];
    macro_rules! go {
        ($ty:ty) => {{
            let x = slice::<$ty>(&x)?;
            let a = [slice::<$ty>(&part(0).a)?, slice::<$ty>(&part(1).a)?, slice::<$ty>(&part(2).a)?];
            let bt = [slice::<$ty>(&part(0).bt)?, slice::<$ty>(&part(1).bt)?, slice::<$ty>(&part(2).bt)?];
            let ys: Vec<_> = (1..MAX_PARTS)
                .map(|z| match parts.get(z).and_then(|p| p.y.as_ref()) {
                    Some(y) => slice::<$ty>(y),
                    None => slice::<$ty>(&part(0).a), // an unused segment's stand-in, never written
                })
                .collect::<candle_core::Result<_>>()?;
            let mut b = shrink.builder();
            b.arg(&ts[0]).arg(&ts[1]).arg(&ts[2]).arg(&x).arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(&slot);
            b.arg(&metas[0]).arg(&metas[1]).arg(&metas[2]).arg(&su).arg(&ku).arg(&ru);
            unsafe { b.launch(shrink_cfg) }.w()?;
            let mut y0v = y0.as_cuda_slice_mut::<$ty>()?.slice_mut(y0o..y0o + y0n);
            let mut b = expand.builder();
            b.arg(&mut y0v).arg(&ys[0]).arg(&ys[1]);
            b.arg(&ts[0]).arg(&ts[1]).arg(&ts[2]).arg(&bt[0]).arg(&bt[1]).arg(&bt[2]).arg(&slot);
            b.arg(&metas[0]).arg(&metas[1]).arg(&metas[2]).arg(&su).arg(&ns[0]).arg(&ns[1]).arg(&ns[2]).arg(&ru);
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

struct UploadAt<'a> {
    offset: usize,
    src: &'a Tensor,
}

impl candle_core::InplaceOp1 for UploadAt<'_> {
    fn name(&self) -> &'static str {
        "upload-at"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("upload-at: a CUDA tensor only")
    }

    fn cuda_fwd(&self, dst: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        let stream = dst.device().cuda_stream();
        let (o, n) = contiguous(l)?;
        let (src, sl) = self.src.storage_and_layout();
        let (s0, sn) = contiguous(sl)?;
        if self.offset + sn > n {
            candle_core::bail!("upload-at: {sn} values at {} into {n}", self.offset);
        }
        let at = o + self.offset;
        macro_rules! copy {
            ($t:ty, $v:expr) => {{
                let mut view = dst.as_cuda_slice_mut::<$t>()?.slice_mut(at..at + sn);
                stream.memcpy_htod(&$v[s0..s0 + sn], &mut view).w()
            }};
        }
        match (&*src, dst.dtype()) {
            (Storage::Cpu(CpuStorage::F32(v)), DType::F32) => copy!(f32, v),
            (Storage::Cpu(CpuStorage::BF16(v)), DType::BF16) => copy!(bf16, v),
            (Storage::Cpu(CpuStorage::F16(v)), DType::F16) => copy!(f16, v),
            (_, d) => candle_core::bail!("upload-at: want a host tensor of the {d:?} destination's dtype"),
        }
    }
}

/// `dst.flat[offset..offset + src.len()] = src`: one host-to-device copy from the host tensor
/// `src` (contiguous, `dst`'s dtype) straight into a contiguous CUDA tensor (an adapter into
/// its slot: no staging copy, no kernel).
pub fn upload_at(dst: &Tensor, offset: usize, src: &Tensor) -> candle_core::Result<()> {
    dst.inplace_op1(&UploadAt { offset, src })
}
