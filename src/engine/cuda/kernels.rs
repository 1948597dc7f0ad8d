//! Launches of `kernels/*.cu` (PTX built by `build.rs`), one function per kernel, each the
//! CUDA half of an op whose CPU half (the reference) lives beside the op's definition.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Shape};
use half::{bf16, f16};

use crate::engine::attention::paged_ops::{contiguous, DecodeMeta};

/// PTX of `kernels/paged_attention.cu`.
const PAGED_ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const PAGED_ATTENTION_MODULE: &str = "lab_paged_attention";

/// PTX of `kernels/paged_attention_grouped.cu`.
const GROUPED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention_grouped.ptx"));
const GROUPED_MODULE: &str = "lab_paged_attention_grouped";
/// Warps per block of `paged_decode_grouped` (`WARPS` in the kernel).
const GROUPED_WARPS: u32 = 4;

/// Lanes per key row of the grouped kernel for head dim `d` in `dtype` (one 16-byte run per
/// lane), when it has an instantiation for it.
fn grouped_lanes(d: usize, dtype: DType) -> Option<u32> {
    let epl = 16 / dtype.size_in_bytes();
    let g = d / epl;
    (d % epl == 0 && matches!(g, 2 | 4 | 8 | 16 | 32)).then_some(g as u32)
}

/// Warps per block of `paged_decode_attention` (at most `MAX_WARPS` in the kernel).
const DECODE_WARPS: u32 = 8;
/// Blocks that keep the H200's 132 multiprocessors busy (two per SM).
const TARGET_BLOCKS: usize = 264;
/// Shared memory a block may use without opting in.
const SHARED_LIMIT: u32 = 48 * 1024;

/// The kernels' name suffix for `dtype` (`_f32`, `_bf16`, `_f16` instantiations).
pub(crate) fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => candle_core::bail!("no CUDA kernel for {d:?} (run in bf16, f16 or f32)"),
    })
}

/// A device view of a contiguous u32 tensor.
macro_rules! u32_view {
    ($storage:expr, $layout:expr) => {{
        let (o, n) = contiguous($layout)?;
        $storage.as_cuda_slice::<u32>()?.slice(o..o + n)
    }};
}

/// `cache[slots[t]] = src[t]` (see `paged_ops::write_kv`).
pub fn write_kv(
    cache: &mut CudaStorage,
    cl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
    slots: &CudaStorage,
    ol: &Layout,
) -> candle_core::Result<()> {
    let (_, kvh, d) = cl.shape().dims3()?;
    let width = (kvh * d) as u32;
    let n = ol.shape().elem_count() as u32;
    if n == 0 {
        return Ok(());
    }
    let dev = src.device().clone();
    let func = dev.get_or_load_custom_func(
        &format!("write_kv_{}", suffix(src.dtype())?),
        PAGED_ATTENTION_MODULE,
        PAGED_ATTENTION_PTX,
    )?;
    let slots = u32_view!(slots, ol);
    let (c0, cn) = contiguous(cl)?;
    let (s0, sn) = contiguous(sl)?;
    let total = n * width;
    let cfg =
        LaunchConfig { grid_dim: (total.div_ceil(256).min(65_535), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    macro_rules! launch {
        ($t:ty) => {{
            let src = src.as_cuda_slice::<$t>()?.slice(s0..s0 + sn);
            let mut dst = cache.as_cuda_slice_mut::<$t>()?.slice_mut(c0..c0 + cn);
            let mut b = func.builder();
            b.arg(&mut dst).arg(&src).arg(&slots).arg(&n).arg(&width);
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match src.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => candle_core::bail!("write-kv: no kernel for {d:?}"),
    }
    Ok(())
}

/// Paged decode attention (see `paged_ops::paged_decode_attention`): `[M, H, D]` out.
pub fn paged_decode(
    q: &CudaStorage,
    ql: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
    meta: &DecodeMeta,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (_, h, d) = ql.shape().dims3()?;
    let kvh = kl.shape().dims3()?.1;
    let m = meta.rows.dim(0)?;
    if d > 256 || h % kvh != 0 || h / kvh > 8 {
        candle_core::bail!(
            "paged decode kernel: head_dim {d} (max 256), {h} heads over {kvh} kv heads (max 8 per group)"
        );
    }
    let npl = match d.div_ceil(32) {
        1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    };
    let dev = q.device().clone();
    let rep = (h / kvh) as u32;
    let rep_variant = if h / kvh <= 4 { 4 } else { 8 };
    let (q0, qn) = contiguous(ql)?;
    let (k0, kn) = contiguous(kl)?;
    let (v0, vn) = contiguous(vl)?;
    let epl = 16 / q.dtype().size_in_bytes();
    let grouped = grouped_lanes(d, q.dtype())
        .filter(|_| meta.grouped && [q0, k0, v0].iter().all(|o| o % epl == 0))
        .filter(|_| GROUPED_WARPS * rep * (d as u32 + 2) * 4 <= SHARED_LIMIT);
    let func = match grouped {
        Some(g) => dev.get_or_load_custom_func(
            &format!("paged_decode_grouped_{}_g{g}_rep{rep_variant}", suffix(q.dtype())?),
            GROUPED_MODULE,
            GROUPED_PTX,
        )?,
        None => dev.get_or_load_custom_func(
            &format!("paged_decode_attention_{}_npl{npl}_rep{rep_variant}", suffix(q.dtype())?),
            PAGED_ATTENTION_MODULE,
            PAGED_ATTENTION_PTX,
        )?,
    };
    let mut warps = if grouped.is_some() { GROUPED_WARPS } else { DECODE_WARPS };
    while grouped.is_none() && warps > 1 && warps * rep * (d as u32 + 2) * 4 > SHARED_LIMIT {
        warps /= 2;
    }
    // Split each query's keys into `splits` slices (one block each) when the batch alone would
    // leave most multiprocessors idle. The count depends on the batch shape only, never on
    // the contexts: a CUDA graph fixes the grid at capture while contexts grow (the kernel
    // divides each query's actual keys over the slices), and eager steps use the same count,
    // so a graph replay sums in the same order as the eager step it replaces.
    // Rows count as their decode-graph bucket, so an eager step of 29 rows splits as the
    // replay of bucket 32 does.
    let rows = crate::engine::graph::BUCKETS.iter().copied().find(|&b| b >= m).unwrap_or(m);
    let splits = TARGET_BLOCKS.div_ceil((rows * kvh).max(1)).clamp(1, 64) as u32;
    let cfg = LaunchConfig {
        grid_dim: (m as u32, kvh as u32, splits),
        block_dim: (32 * warps, 1, 1),
        shared_mem_bytes: warps * rep * (d as u32 + 2) * 4,
    };
    let (rows_s, rows_l) = meta.rows.storage_and_layout();
    let (tab_s, tab_l) = meta.tables.storage_and_layout();
    let (ctx_s, ctx_l) = meta.ctx.storage_and_layout();
    let (candle_core::Storage::Cuda(rows_s), candle_core::Storage::Cuda(tab_s), candle_core::Storage::Cuda(ctx_s)) =
        (&*rows_s, &*tab_s, &*ctx_s)
    else {
        candle_core::bail!("paged decode metadata must be on the CUDA device");
    };
    let rows = u32_view!(rows_s, rows_l);
    let tables = u32_view!(tab_s, tab_l);
    let ctx = u32_view!(ctx_s, ctx_l);
    let (row_stride, block_stride) = meta.table_strides();
    let (row_stride, block_stride, bs) = (row_stride as u32, block_stride as u32, meta.block_size as u32);
    let (hu, kvhu, du) = (h as u32, kvh as u32, d as u32);
    let scale = 1.0f32 / (d as f32).sqrt();
    // Per-slice (acc, max, sum) of every query head; a 1-element stand-in when unsplit.
    let part = unsafe { dev.alloc::<f32>(if splits > 1 { m * h * splits as usize * (d + 2) } else { 1 })? };
    let merge = if splits > 1 {
        Some(dev.get_or_load_custom_func(
            &format!("paged_decode_merge_{}", suffix(q.dtype())?),
            PAGED_ATTENTION_MODULE,
            PAGED_ATTENTION_PTX,
        )?)
    } else {
        None
    };
    macro_rules! launch {
        ($t:ty) => {{
            let out = unsafe { dev.alloc::<$t>(m * h * d)? };
            let qs = q.as_cuda_slice::<$t>()?.slice(q0..q0 + qn);
            let ks = k.as_cuda_slice::<$t>()?.slice(k0..k0 + kn);
            let vs = v.as_cuda_slice::<$t>()?.slice(v0..v0 + vn);
            let mut b = func.builder();
            b.arg(&out).arg(&part).arg(&qs).arg(&ks).arg(&vs).arg(&rows).arg(&tables).arg(&ctx);
            b.arg(&row_stride).arg(&block_stride).arg(&bs).arg(&hu).arg(&kvhu);
            if grouped.is_none() {
                b.arg(&du); // the grouped kernel's D is its template's
            }
            b.arg(&scale);
            unsafe { b.launch(cfg) }.w()?;
            if let Some(merge) = &merge {
                let cfg = LaunchConfig {
                    grid_dim: ((m * h) as u32, 1, 1),
                    block_dim: (du.min(256), 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = merge.builder();
                b.arg(&out).arg(&part).arg(&splits).arg(&du);
                unsafe { b.launch(cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match q.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        d => candle_core::bail!("paged decode: no kernel for {d:?}"),
    };
    Ok((out, Shape::from((m, h, d))))
}

/// PTX of `kernels/sampling.cu`.
const SAMPLING_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));
const SAMPLING_MODULE: &str = "lab_sampling";

/// Threads per block of `sample_rows` (`BLOCK` in the kernel; one block per row).
const SAMPLING_BLOCK: u32 = 1024;

/// The sampled id of every row of `logits: [rows, vocab]` f32 (see `sampling_op`): `[rows]` u32.
/// `params` is `[4, rows]` u32 on the same device: temperature (f32 bits), top_k, top_p (f32
/// bits), u (f32 bits); the kernel reads the float rows through `float*`. A `[rows, vocab]` u32
/// scratch (the rows' float keys, L2-resident while the block re-reads them) lives for the launch.
pub fn sample_rows(
    logits: &CudaStorage,
    ll: &Layout,
    params: &candle_core::Tensor,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (rows, vocab) = ll.shape().dims2()?;
    if logits.dtype() != DType::F32 {
        candle_core::bail!("sample-rows: logits must be f32, got {:?}", logits.dtype());
    }
    let dev = logits.device().clone();
    let func = dev.get_or_load_custom_func("sample_rows", SAMPLING_MODULE, SAMPLING_PTX)?;
    let (ps, pl) = params.storage_and_layout();
    let candle_core::Storage::Cuda(ps) = &*ps else {
        candle_core::bail!("sampling parameters must be on the CUDA device");
    };
    let (p0, pn) = contiguous(pl)?;
    if pn != 4 * rows {
        candle_core::bail!("sample-rows: {pn} parameters for {rows} rows (want 4 per row)");
    }
    let all = ps.as_cuda_slice::<u32>()?;
    let temperature = all.slice(p0..p0 + rows);
    let top_k = all.slice(p0 + rows..p0 + 2 * rows);
    let top_p = all.slice(p0 + 2 * rows..p0 + 3 * rows);
    let u = all.slice(p0 + 3 * rows..p0 + 4 * rows);
    let (l0, ln) = contiguous(ll)?;
    let x = logits.as_cuda_slice::<f32>()?.slice(l0..l0 + ln);
    // The kernel's key rows: vocab rounded up to 4 entries, so every row is 16-byte aligned.
    let scratch = unsafe { dev.alloc::<u32>(rows * vocab.next_multiple_of(4))? };
    let vocab = vocab as u32;
    let out = unsafe { dev.alloc::<u32>(rows)? };
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (SAMPLING_BLOCK, 1, 1), shared_mem_bytes: 0 };
    let mut b = func.builder();
    b.arg(&out).arg(&scratch).arg(&x).arg(&temperature).arg(&top_k).arg(&top_p).arg(&u).arg(&vocab);
    unsafe { b.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
}
