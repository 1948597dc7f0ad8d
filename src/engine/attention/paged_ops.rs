//! Two ops on the paged KV pool, in place: [`write_kv`] (new keys/values into their cache rows)
//! and [`paged_decode_attention`] (one query row against its sequence's cached keys, read through
//! the block table). On CUDA each is one launch of `kernels/paged_attention.cu`; the CPU forms
//! below compute the same function in f32 and are the oracle `lab selftest` checks the kernels
//! against.
//!
//! ```text
//! write_kv:   for t in 0..N: cache[slots[t]] = src[t]  unless slots[t] == SKIP_SLOT  (rows of KVH * D)
//! decode:     for m in 0..M, h in 0..H (g = h / (H / KVH)):
//!                 s[j] = dot(q[rows[m], h], k[r_j, g]) / sqrt(D),  r_j = tables[m][j / bs] * bs + j % bs
//!                 out[m, h] = sum_j softmax(s)[j] * v[r_j, g]        for j in 0..ctx[m]
//! ```

use candle_core::{CpuStorage, CustomOp3, DType, InplaceOp3, Layout, Shape, Tensor};

use crate::engine::Result;

/// Per-forward metadata of the decode rows, on the model's device, reused by every layer.
#[derive(Debug, Clone)]
pub struct DecodeMeta {
    /// `[M]` u32: packed-batch row of each decode query.
    pub rows: Tensor,
    /// u32 block table of each decode query's sequence (padded): `[M, max_blocks]`, or
    /// `[max_blocks, M]` when `block_major` (a CUDA graph's buffer, whose used blocks are a
    /// contiguous prefix, so one short upload refills it).
    pub tables: Tensor,
    pub block_major: bool,
    /// Run the grouped-lanes kernel (`kernels/paged_attention_grouped.cu`) where it applies;
    /// off by default until the H200 selftest has passed it.
    pub grouped: bool,
    /// `[M]` u32: keys each query attends to (its position + 1).
    pub ctx: Tensor,
    pub max_blocks: usize,
    pub block_size: usize,
}

impl DecodeMeta {
    /// `(row stride, block stride)` of `tables`: block `b` of query `m` is
    /// `tables[m * row + b * block]`.
    pub fn table_strides(&self) -> (usize, usize) {
        if self.block_major {
            (1, self.rows.dims().first().copied().unwrap_or(0))
        } else {
            (self.max_blocks, 1)
        }
    }
}

/// The slot of a row whose keys are not stored (a padding row of a CUDA graph bucket).
pub const SKIP_SLOT: u32 = u32::MAX;

/// `cache[slots[t]] = src[t]` for every row `t` of `src: [N, KVH, D]` (cache `[R, KVH, D]`);
/// rows whose slot is [`SKIP_SLOT`] are not stored.
pub fn write_kv(cache: &Tensor, src: &Tensor, slots: &Tensor) -> Result<()> {
    let src = src.contiguous()?;
    Ok(cache.inplace_op3(&src, slots, &WriteKv)?)
}

/// Attention of the decode rows `meta.rows` of `q: [N, H, D]` against the paged pool of one
/// layer (`k_cache`, `v_cache`: `[R, KVH, D]`); returns `[M, H, D]`.
pub fn paged_decode_attention(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, meta: &DecodeMeta) -> Result<Tensor> {
    let q = q.contiguous()?;
    Ok(q.apply_op3_no_bwd(k_cache, v_cache, &PagedDecode { meta: meta.clone() })?)
}

struct WriteKv;

impl InplaceOp3 for WriteKv {
    fn name(&self) -> &'static str {
        "write-kv"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
        slots: &CpuStorage,
        ol: &Layout,
    ) -> candle_core::Result<()> {
        let width = row_width(cl)?;
        let slots = u32_slice(slots, ol)?;
        let (s0, _) = contiguous(sl)?;
        let (c0, _) = contiguous(cl)?;
        macro_rules! copy_rows {
            ($dst:expr, $src:expr) => {{
                for (t, &r) in slots.iter().enumerate().filter(|(_, &r)| r != SKIP_SLOT) {
                    let (d, s) = (c0 + r as usize * width, s0 + t * width);
                    $dst[d..d + width].copy_from_slice(&$src[s..s + width]);
                }
            }};
        }
        match (cache, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => copy_rows!(d, s),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => copy_rows!(d, s),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => copy_rows!(d, s),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => copy_rows!(d, s),
            _ => candle_core::bail!("write-kv: cache and keys must share a float dtype"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
        slots: &candle_core::CudaStorage,
        ol: &Layout,
    ) -> candle_core::Result<()> {
        crate::engine::cuda::kernels::write_kv(cache, cl, src, sl, slots, ol)
    }
}

struct PagedDecode {
    meta: DecodeMeta,
}

impl CustomOp3 for PagedDecode {
    fn name(&self) -> &'static str {
        "paged-decode-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, h, d) = ql.shape().dims3()?;
        let kvh = kl.shape().dims3()?.1;
        let op = "paged-decode-attention";
        let (qf, kf, vf) = (host_f32(q, ql, op)?, host_f32(k, kl, op)?, host_f32(v, vl, op)?);
        let meta = &self.meta;
        let rows = meta.rows.to_vec1::<u32>()?;
        let tables = meta.tables.flatten_all()?.to_vec1::<u32>()?;
        let ctx = meta.ctx.to_vec1::<u32>()?;
        let out =
            decode_reference(&qf, &kf, &vf, &rows, &tables, &ctx, (meta.table_strides(), meta.block_size), (h, kvh, d));
        let shape = Shape::from((rows.len(), h, d));
        let storage = storage_like(q, out);
        Ok((storage, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::engine::cuda::kernels::paged_decode(q, ql, k, kl, v, vl, &self.meta)
    }
}

/// The values of a contiguous float operand as f32.
pub(crate) fn host_f32(s: &CpuStorage, l: &Layout, op: &str) -> candle_core::Result<Vec<f32>> {
    let (o, n) = contiguous(l)?;
    Ok(match s {
        CpuStorage::F32(x) => x[o..o + n].to_vec(),
        CpuStorage::BF16(x) => x[o..o + n].iter().map(|v| v.to_f32()).collect(),
        CpuStorage::F16(x) => x[o..o + n].iter().map(|v| v.to_f32()).collect(),
        CpuStorage::F64(x) => x[o..o + n].iter().map(|&v| v as f32).collect(),
        _ => candle_core::bail!("{op}: float tensors only"),
    })
}

/// f32 values rounded once to `like`'s dtype.
pub(crate) fn storage_like(like: &CpuStorage, v: Vec<f32>) -> CpuStorage {
    match like {
        CpuStorage::BF16(_) => CpuStorage::BF16(v.iter().map(|&x| half::bf16::from_f32(x)).collect()),
        CpuStorage::F16(_) => CpuStorage::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect()),
        CpuStorage::F64(_) => CpuStorage::F64(v.iter().map(|&x| x as f64).collect()),
        _ => CpuStorage::F32(v),
    }
}

/// The decode attention in plain f32 loops (see the module docs).
#[allow(clippy::too_many_arguments)]
fn decode_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rows: &[u32],
    tables: &[u32],
    ctx: &[u32],
    ((row_stride, block_stride), bs): ((usize, usize), usize),
    (h, kvh, d): (usize, usize, usize),
) -> Vec<f32> {
    let rep = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; rows.len() * h * d];
    for (m, &row) in rows.iter().enumerate() {
        let n = ctx[m] as usize;
        let kv_row = |j: usize| tables[m * row_stride + (j / bs) * block_stride] as usize * bs + j % bs;
        for head in 0..h {
            let g = head / rep;
            let qh = &q[(row as usize * h + head) * d..][..d];
            let scores: Vec<f32> = (0..n)
                .map(|j| scale * qh.iter().zip(&k[(kv_row(j) * kvh + g) * d..][..d]).map(|(a, b)| a * b).sum::<f32>())
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f32 = p.iter().sum();
            let o = &mut out[(m * h + head) * d..][..d];
            for (j, pj) in p.iter().enumerate() {
                let vr = &v[(kv_row(j) * kvh + g) * d..][..d];
                o.iter_mut().zip(vr).for_each(|(o, x)| *o += pj / total * x);
            }
        }
    }
    out
}

/// Elements per cache row (`KVH * D`) of a contiguous `[R, KVH, D]` layout.
fn row_width(l: &Layout) -> candle_core::Result<usize> {
    let (_, kvh, d) = l.shape().dims3()?;
    Ok(kvh * d)
}

/// `(start offset, element count)` of a contiguous layout; an error otherwise.
pub(crate) fn contiguous(l: &Layout) -> candle_core::Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok((a, b - a)),
        None => candle_core::bail!("paged ops need contiguous tensors"),
    }
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let (o, n) = contiguous(l)?;
    match s {
        CpuStorage::U32(x) => Ok(&x[o..o + n]),
        _ => candle_core::bail!("slot indices must be u32"),
    }
}

/// Dtypes the CUDA kernels are built for.
pub fn kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}
