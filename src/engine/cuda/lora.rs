//! Launches of `kernels/lora.cu`: the batched multi-LoRA update of one projection, in place.

use candle_core::backend::BackendStorage;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Storage, Tensor};
use half::{bf16, f16};

use crate::engine::attention::paged_ops::contiguous;

const LORA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));
const LORA_MODULE: &str = "lab_lora";
/// Threads per block of the expand (`THREADS` in the kernel).
const THREADS: u32 = 128;
/// Threads per block of the shrink (`SHRINK_THREADS` in the kernel).
const SHRINK_THREADS: u32 = 512;
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
    /// Per projection (1..=3): its first column in the output, `a [S, R, K]`, `bt [S, R, N]`,
    /// `meta [2S]` u32 (ranks, then scales as f32 bits).
    pub parts: Vec<(usize, &'a Tensor, &'a Tensor, &'a Tensor)>,
    /// f32 scratch reused across launches when large enough (else one is allocated).
    pub scratch: Option<&'a Tensor>,
}

struct Bgmv<'a>(&'a BgmvArgs<'a>);

impl candle_core::InplaceOp1 for Bgmv<'_> {
    fn name(&self) -> &'static str {
        "lora-bgmv"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("lora-bgmv: the CUDA kernel only (the CPU runs engine::lora::op::bgmv_reference)")
    }

    fn cuda_fwd(&self, y: &mut CudaStorage, yl: &Layout) -> candle_core::Result<()> {
        let main = y.device().cuda_stream();
        launch(Out::InPlace(y, yl), self.0, &main)
    }
}

/// `y[:, col_z .. col_z + N_z] += LoRA_z(x)` row by row in place for every part z (see
/// `kernels/lora.cu`), one shrink and one expand launch for all of them. `y: [M, W]`
/// contiguous; every operand on the device in `y`'s dtype; `K` and every `N` multiples of 8.
pub fn bgmv_cuda(y: &Tensor, args: &BgmvArgs) -> candle_core::Result<()> {
    let n = args.parts.len();
    if n == 0 || n > MAX_PARTS {
        candle_core::bail!("lora-bgmv: 1 to {MAX_PARTS} projections per launch, not {n}");
    }
    y.inplace_op1(&Bgmv(args))
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

/// One projection's factors.
struct Part<'a> {
    a: Operand<'a>,
    bt: Operand<'a>,
    meta: Operand<'a>,
}

/// Checks the parts against `y: [m, width]` and returns each one's `(column, N)`.
fn part_columns(args: &BgmvArgs, m: usize, width: usize) -> candle_core::Result<[(u32, u32); MAX_PARTS]> {
    let (s_count, r, k) = args.parts[0].1.dims3()?;
    let mut cols = [(0u32, 0u32); MAX_PARTS];
    for (i, &(col, a, bt, _)) in args.parts.iter().enumerate() {
        let (_, _, n) = bt.dims3()?;
        if a.dims3()? != (s_count, r, k) || bt.dims3()? != (s_count, r, n) || n % 8 != 0 || col + n > width {
            candle_core::bail!("lora-bgmv: y [{m}, {width}] at column {col}: a {:?} bt {:?}", a.dims(), bt.dims());
        }
        cols[i] = (col as u32, n as u32);
    }
    if k % 8 != 0 || r > MAX_RANK || args.x.dims2()? != (m, k) {
        candle_core::bail!(
            "lora-bgmv: x {:?} for K = {k} (a multiple of 8), R = {r} (at most {MAX_RANK})",
            args.x.dims()
        );
    }
    Ok(cols)
}

/// Where the expand writes: in place into the base output (`T`), or the update alone as f32.
enum Out<'a> {
    InPlace(&'a mut CudaStorage, &'a Layout),
    Delta(&'a mut CudaStorage, &'a Layout),
}

fn launch(out: Out, args: &BgmvArgs, stream: &Arc<CudaStream>) -> candle_core::Result<()> {
    let (storage, yl, delta) = match out {
        Out::InPlace(s, l) => (s, l, false),
        Out::Delta(s, l) => (s, l, true),
    };
    let (m, width) = yl.shape().dims2()?;
    if m == 0 {
        return Ok(());
    }
    let cols = part_columns(args, m, width)?;
    let (s_count, r, k) = args.parts[0].1.dims3()?;
    let dev = storage.device().clone();
    let dtype = args.parts[0].1.dtype();
    if !delta && storage.dtype() != dtype {
        candle_core::bail!("lora-bgmv: output {:?}, factors {dtype:?}", storage.dtype());
    }
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => candle_core::bail!("lora-bgmv: no kernel for {d:?}"),
    };
    let (x, slot) = (operand(args.x)?, operand(args.slot)?);
    let parts: Vec<Part> = args
        .parts
        .iter()
        .map(|&(_, a, bt, meta)| Ok(Part { a: operand(a)?, bt: operand(bt)?, meta: operand(meta)? }))
        .collect::<candle_core::Result<_>>()?;
    let np = parts.len();
    // Unused segments name part 0's operands; their blocks do not exist (grid z = np).
    let part = |z: usize| &parts[z.min(np - 1)];
    let (y0, yn) = contiguous(yl)?;
    let need = crate::engine::lora::op::shrink_scratch_len(np, m, k, r);
    let scratch = args.scratch.map(operand).transpose()?.filter(|s| s.2 >= need);
    let owned = match scratch {
        Some(_) => None,
        None => Some(unsafe { dev.alloc::<f32>(need.max(1))? }),
    };
    let tp = match (&scratch, &owned) {
        (Some(s), _) => slice::<f32>(s)?,
        (None, Some(o)) => o.slice(0..),
        (None, None) => unreachable!("allocated above"),
    };
    let func = |name: &str| -> candle_core::Result<_> {
        Ok(dev.get_or_load_custom_func(&format!("{name}_{suffix}"), LORA_MODULE, LORA_PTX)?.into_cuda_function())
    };
    let shrink = func("lora_shrink")?;
    let expand = func(if delta { "lora_delta" } else { "lora_expand" })?;
    let ks = k.div_ceil(crate::engine::lora::op::SHRINK_CHUNK) as u32;
    let (su, ku, ru, ld) = (s_count as u32, k as u32, r as u32, width as u32);
    let n_max = cols.iter().map(|c| c.1).max().unwrap_or(0);
    let grid = |x: u32| (x, m as u32, np as u32);
    let shrink_cfg = LaunchConfig { grid_dim: grid(ks), block_dim: (SHRINK_THREADS, 1, 1), shared_mem_bytes: 0 };
    let expand_cfg =
        LaunchConfig { grid_dim: grid(n_max.div_ceil(THREADS * 8)), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let slot = slice::<u32>(&slot)?;
    let metas = [slice::<u32>(&part(0).meta)?, slice::<u32>(&part(1).meta)?, slice::<u32>(&part(2).meta)?];
    macro_rules! go {
        ($ty:ty) => {{
            let x = slice::<$ty>(&x)?;
            let a = [slice::<$ty>(&part(0).a)?, slice::<$ty>(&part(1).a)?, slice::<$ty>(&part(2).a)?];
            let bt = [slice::<$ty>(&part(0).bt)?, slice::<$ty>(&part(1).bt)?, slice::<$ty>(&part(2).bt)?];
            let mut b = stream.launch_builder(&shrink);
            b.arg(&tp).arg(&x).arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(&slot);
            b.arg(&metas[0]).arg(&metas[1]).arg(&metas[2]).arg(&su).arg(&ku).arg(&ru);
            unsafe { b.launch(shrink_cfg) }.w()?;
            let mut b = stream.launch_builder(&expand);
            let mut yv_t;
            let mut yv_f;
            if delta {
                yv_f = storage.as_cuda_slice_mut::<f32>()?.slice_mut(y0..y0 + yn);
                b.arg(&mut yv_f);
            } else {
                yv_t = storage.as_cuda_slice_mut::<$ty>()?.slice_mut(y0..y0 + yn);
                b.arg(&mut yv_t);
            }
            b.arg(&ld).arg(&cols[0].0).arg(&cols[1].0).arg(&cols[2].0).arg(&tp);
            b.arg(&bt[0]).arg(&bt[1]).arg(&bt[2]).arg(&slot).arg(&metas[0]).arg(&metas[1]).arg(&metas[2]);
            b.arg(&su).arg(&cols[0].1).arg(&cols[1].1).arg(&cols[2].1).arg(&ru).arg(&ks);
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

struct Delta<'a>(&'a BgmvArgs<'a>, Option<&'a Arc<CudaStream>>);

impl candle_core::InplaceOp1 for Delta<'_> {
    fn name(&self) -> &'static str {
        "lora-delta"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("lora-delta: the CUDA kernel only")
    }

    fn cuda_fwd(&self, out: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let main = out.device().cuda_stream();
        match self.1 {
            Some(side) => {
                // Everything queued so far (the input, the output's allocation) first.
                side.join(&main).w()?;
                launch(Out::Delta(out, l), self.0, side)
            }
            None => launch(Out::Delta(out, l), self.0, &main),
        }
    }
}

/// The update alone into `delta: [M, W]` f32 (see `engine::lora::op::bgmv_delta`), on `side`
/// when given (the caller joins it back with [`join_side`]).
pub fn bgmv_delta_cuda(delta: &Tensor, args: &BgmvArgs, side: Option<&Arc<CudaStream>>) -> candle_core::Result<()> {
    let n = args.parts.len();
    if n == 0 || n > MAX_PARTS {
        candle_core::bail!("lora-delta: 1 to {MAX_PARTS} projections per launch, not {n}");
    }
    delta.inplace_op1(&Delta(args, side))
}

/// The device's stream waits for everything queued on `side` so far.
pub fn join_side(dev: &candle_core::CudaDevice, side: &Arc<CudaStream>) -> candle_core::Result<()> {
    dev.cuda_stream().join(side).w()
}

/// A new stream of `dev`'s context at the greatest priority the device offers.
pub fn high_priority_stream(dev: &candle_core::CudaDevice) -> candle_core::Result<Arc<CudaStream>> {
    let (_, greatest) = candle_core::cuda_backend::cudarc::driver::result::stream::get_priority_range().w()?;
    dev.cuda_stream().context().new_stream_with_priority(greatest).w()
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
