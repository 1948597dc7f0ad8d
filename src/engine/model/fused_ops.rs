//! Fused steps of a Llama layer (`kernels/fused.cu` on CUDA): each does in one launch what the
//! plain forward does in two to four, which is what keeps a batch-1 decode step near its memory
//! floor (launch gaps, not bytes, are most of the rest). The CPU forms below compute the same
//! function with f32 loops and are the oracle `lab selftest` checks the kernels against.
//!
//! ```text
//! add_rms_norm(x, a, w): s = x + a;  h = s / sqrt(mean(s^2) + eps) * w        -> (s, h)
//! silu_mul(gu):          gu = [gate | up] per row;  silu(gate) * up
//! rope_store(qkv):       qkv = [q | k | v] per row;  q, k rotated (HF rotate_half), v as is;
//!                        with a cache: kc[slots[t]] = k[t], vc[slots[t]] = v[t]
//! ```
//!
//! Each takes an optional `delta` (f32, the shape of the input it applies to: `a`, `gu`,
//! `qkv`): the LoRA update of the projection that produced that input, computed on the side
//! stream (`engine::lora::op::bgmv_delta`), added and rounded once before the op proper.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};

use crate::engine::attention::paged_ops::{self, host_f32, storage_like};
use crate::engine::Result;

/// `(s, h)` with `s = x + a` (the new residual stream) and `h = rmsnorm(s) * w`; `x, a: [N, W]`,
/// `w: [W]`, all contiguous of one dtype. `delta`: `[N, W]` f32 LoRA update of `a`, added
/// (and rounded) first.
pub fn add_rms_norm(x: &Tensor, a: &Tensor, delta: Option<&Tensor>, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (a, delta) = split_delta(a, delta)?;
    let out = x.contiguous()?.apply_op3_no_bwd(&a.contiguous()?, w, &AddRmsNorm { eps: eps as f32, delta })?;
    Ok((out.get(0)?, out.get(1)?))
}

/// `silu(gate) * up` of `gu = [gate | up]: [N, 2I]` -> `[N, I]` (`delta`: as for
/// [`add_rms_norm`], of `gu`).
pub fn silu_mul(gu: &Tensor, delta: Option<&Tensor>) -> Result<Tensor> {
    let (gu, delta) = split_delta(gu, delta)?;
    Ok(gu.contiguous()?.apply_op1_no_bwd(&SiluMul { delta })?)
}

/// `round(t + delta)`: on the CPU applied here; on CUDA handed to the kernel, which adds it as
/// it reads `t` (no extra launch). Returns the op's input and the delta it is left to add.
fn split_delta(t: &Tensor, delta: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
    let Some(d) = delta else { return Ok((t.clone(), None)) };
    if d.dims() != t.dims() || d.dtype() != DType::F32 {
        return Err(crate::engine::EngineError::Weights(format!(
            "LoRA delta {:?} {:?} for an input {:?}",
            d.dims(),
            d.dtype(),
            t.dims()
        )));
    }
    if t.device().is_cuda() {
        return Ok((t.clone(), Some(d.contiguous()?)));
    }
    Ok(((t.to_dtype(DType::F32)? + d)?.to_dtype(t.dtype())?, None))
}

/// Head counts of [`rope_store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Where [`rope_store`] puts the new keys and values: `[R, KVH, D]` pool rows of one layer
/// and the `[N]` u32 row of each token ([`paged_ops::SKIP_SLOT`]: not stored).
pub struct KvTarget<'a> {
    pub k_cache: &'a Tensor,
    pub v_cache: &'a Tensor,
    pub slots: &'a Tensor,
}

/// Splits the fused projection `qkv: [N, (H + 2 KVH) D]` (plus its LoRA `delta`, as for
/// [`add_rms_norm`]) into rotated `q: [N, H, D]`, rotated `k: [N, KVH, D]` and `v: [N, KVH, D]`
/// (`cos`, `sin`: `[N, D / 2]` per row), storing `k`, `v` in `target`'s pool rows. One launch on CUDA (the write included); on the CPU the write is
/// [`paged_ops::write_kv`].
pub fn rope_store(
    qkv: &Tensor,
    delta: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    dims: HeadDims,
    target: Option<KvTarget>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (qkv, delta) = split_delta(qkv, delta)?;
    let n = qkv.dim(0)?;
    let HeadDims { heads: h, kv_heads: kvh, head_dim: d } = dims;
    let on_device = qkv.device().is_cuda();
    let cache = target.as_ref().filter(|_| on_device).map(|t| (t.k_cache.clone(), t.v_cache.clone(), t.slots.clone()));
    let op = RopeStore { dims, cache, delta };
    let out = qkv.contiguous()?.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)?;
    let q = out.narrow(0, 0, n * h * d)?.reshape((n, h, d))?;
    let k = out.narrow(0, n * h * d, n * kvh * d)?.reshape((n, kvh, d))?;
    let v = out.narrow(0, n * (h + kvh) * d, n * kvh * d)?.reshape((n, kvh, d))?;
    if let (Some(t), false) = (&target, on_device) {
        paged_ops::write_kv(t.k_cache, &k, t.slots)?;
        paged_ops::write_kv(t.v_cache, &v, t.slots)?;
    }
    Ok((q, k, v))
}

/// Rounds `v` to `like`'s dtype and back (the kernels round `s` before squaring it).
fn round_like(like: &CpuStorage, v: f32) -> f32 {
    match like {
        CpuStorage::BF16(_) => half::bf16::from_f32(v).to_f32(),
        CpuStorage::F16(_) => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// The ops below carry the LoRA delta of their input on CUDA only (see [`split_delta`]).
struct AddRmsNorm {
    eps: f32,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    delta: Option<Tensor>,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, width) = xl.shape().dims2()?;
        let (xv, av, wv) = (host_f32(x, xl, "add-rms-norm")?, host_f32(a, al, "add-rms-norm")?, host_f32(w, wl, "")?);
        if av.len() != xv.len() || wv.len() != width {
            candle_core::bail!("add-rms-norm: x {:?}, a {:?}, w {:?}", xl.dims(), al.dims(), wl.dims());
        }
        let mut out = vec![0f32; 2 * n * width];
        for t in 0..n {
            let row = t * width..(t + 1) * width;
            let s: Vec<f32> = row.clone().map(|i| round_like(x, xv[i] + av[i])).collect();
            let inv = 1.0 / (s.iter().map(|v| v * v).sum::<f32>() / width as f32 + self.eps).sqrt();
            out[row.clone()].copy_from_slice(&s);
            for (i, v) in s.iter().enumerate() {
                out[n * width + t * width + i] = v * inv * wv[i];
            }
        }
        Ok((storage_like(x, out), Shape::from((2, n, width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::engine::cuda::fused::add_rms_norm(x, xl, a, al, w, wl, self.eps, self.delta.as_ref())
    }
}

struct SiluMul {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    delta: Option<Tensor>,
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, gu: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, two_i) = l.shape().dims2()?;
        let i = two_i / 2;
        let v = host_f32(gu, l, "silu-mul")?;
        let mut out = Vec::with_capacity(n * i);
        for t in 0..n {
            for c in 0..i {
                let (g, u) = (v[t * two_i + c], v[t * two_i + i + c]);
                out.push(g / (1.0 + (-g).exp()) * u);
            }
        }
        Ok((storage_like(gu, out), Shape::from((n, i))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gu: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::engine::cuda::fused::silu_mul(gu, l, self.delta.as_ref())
    }
}

/// The op of [`rope_store`]; `cache` = (k pool, v pool, slots), written by the CUDA kernel.
struct RopeStore {
    dims: HeadDims,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    cache: Option<(Tensor, Tensor, Tensor)>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    delta: Option<Tensor>,
}

impl CustomOp3 for RopeStore {
    fn name(&self) -> &'static str {
        "rope-store"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        ql: &Layout,
        cos: &CpuStorage,
        cl: &Layout,
        sin: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let HeadDims { heads: h, kv_heads: kvh, head_dim: d } = self.dims;
        let (n, width) = ql.shape().dims2()?;
        let half = d / 2;
        if width != (h + 2 * kvh) * d || d % 2 != 0 || cl.shape().dims2()? != (n, half) {
            candle_core::bail!("rope-store: qkv {:?} for {h}+2x{kvh} heads of {d}, cos {:?}", ql.dims(), cl.dims());
        }
        let (x, c, s) = (host_f32(qkv, ql, "rope-store")?, host_f32(cos, cl, "")?, host_f32(sin, sl, "")?);
        let mut out = vec![0f32; n * width];
        let (q_len, kv_len) = (n * h * d, n * kvh * d);
        for t in 0..n {
            let row = &x[t * width..(t + 1) * width];
            for head in 0..h + kvh {
                let dst = if head < h { t * h * d + head * d } else { q_len + t * kvh * d + (head - h) * d };
                for i in 0..half {
                    let (x1, x2) = (row[head * d + i], row[head * d + i + half]);
                    let (ci, si) = (c[t * half + i], s[t * half + i]);
                    out[dst + i] = x1 * ci - x2 * si;
                    out[dst + i + half] = x1 * si + x2 * ci;
                }
            }
            let v0 = q_len + kv_len + t * kvh * d;
            out[v0..v0 + kvh * d].copy_from_slice(&row[(h + kvh) * d..]);
        }
        Ok((storage_like(qkv, out), Shape::from(n * width)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        ql: &Layout,
        cos: &candle_core::CudaStorage,
        cl: &Layout,
        sin: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let inputs =
            crate::engine::cuda::fused::RopeInputs { cos: (cos, cl), sin: (sin, sl), delta: self.delta.as_ref() };
        crate::engine::cuda::fused::rope_store(qkv, ql, inputs, self.dims, self.cache.as_ref())
    }
}

/// Whether the fused kernels have `dtype` (f64 runs the plain ops).
pub fn kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}
