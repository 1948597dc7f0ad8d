//! Building blocks of the Llama forward: RMSNorm, rotary embeddings, projections, SwiGLU MLP.
//!
//! Each op has a fused form (fast, no backward) and a differentiable form built from plain
//! tensor ops, chosen by [`OpsMode`]. candle's fused `rms_norm`, `softmax_last_dim` and
//! `rope*` record no gradient, so training must use [`OpsMode::Differentiable`].

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::engine::model::config::{Llama3RopeScaling, LlamaConfig};
use crate::engine::Result;

/// Which kernels the forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsMode {
    /// candle's fused CPU/CUDA kernels; inference only (gradients stop there).
    Fused,
    /// Plain tensor ops that record the backward graph; for training and gradient checks.
    Differentiable,
}

/// Root-mean-square layer norm, `y = x / sqrt(mean(x^2) + eps) * w`, computed in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    pub fn forward(&self, x: &Tensor, mode: OpsMode) -> Result<Tensor> {
        Ok(match mode {
            OpsMode::Fused => candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)?,
            OpsMode::Differentiable => {
                let dtype = x.dtype();
                let xf = x.to_dtype(at_least_f32(dtype))?;
                let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = xf.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
                normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?
            }
        })
    }
}

/// Accumulation dtype for reductions: f32, or f64 when the model runs in f64 (gradient checks).
pub fn at_least_f32(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Rotary position embedding (HF "rotate_half" layout) with optional Llama-3 frequency scaling.
///
/// Angles are computed per token from its absolute position, so a packed batch can mix
/// sequences at arbitrary positions.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(cfg: &LlamaConfig) -> Self {
        let d = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64)).collect();
        if let Some(s) = &cfg.rope_scaling {
            inv_freq.iter_mut().for_each(|f| *f = llama3_scale(*f, s));
        }
        Self { inv_freq }
    }

    /// `cos`, `sin` tables of shape `[positions.len(), head_dim / 2]` in `dtype`.
    pub fn tables(&self, positions: &[usize], dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let shape = (positions.len(), half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Rotates `x` of shape `[tokens, heads, head_dim]` by the per-token tables.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, mode: OpsMode) -> Result<Tensor> {
        Ok(match mode {
            OpsMode::Fused => candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)?,
            OpsMode::Differentiable => {
                let half = x.dim(D::Minus1)? / 2;
                let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
                let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
                let x1 = x.narrow(D::Minus1, 0, half)?;
                let x2 = x.narrow(D::Minus1, half, half)?;
                let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
                (x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?
            }
        })
    }
}

/// cos/sin of every position below `len`, computed once (in f64, as [`Rope::tables`]) and kept
/// on the model's device, so a forward only uploads its positions and gathers rows.
#[derive(Debug, Clone)]
pub struct RopeTable {
    rope: Rope,
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
}

impl RopeTable {
    /// Positions precomputed at most (longer contexts compute their tables per forward).
    const MAX_CACHED: usize = 131_072;

    pub fn new(rope: &Rope, len: usize, dtype: DType, device: &Device) -> Result<Self> {
        let positions: Vec<usize> = (0..len.clamp(1, Self::MAX_CACHED)).collect();
        let (cos, sin) = rope.tables(&positions, dtype, device)?;
        Ok(Self { rope: rope.clone(), cos, sin, dtype })
    }

    /// `cos`, `sin` of shape `[positions.len(), head_dim / 2]`.
    pub fn at(&self, positions: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let cached = self.cos.dim(0)?;
        if positions.iter().any(|&p| p >= cached) {
            return self.rope.tables(positions, self.dtype, device);
        }
        let idx: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let idx = Tensor::from_vec(idx, positions.len(), device)?;
        Ok((self.cos.index_select(&idx, 0)?, self.sin.index_select(&idx, 0)?))
    }

    /// `cos`, `sin` rows of the device positions `positions: [N]` u32, each below
    /// [`RopeTable::cached_len`] (nothing is uploaded: CUDA graphs replay this).
    pub fn at_device(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.cos.index_select(positions, 0)?, self.sin.index_select(positions, 0)?))
    }

    /// Positions the precomputed table covers.
    pub fn cached_len(&self) -> usize {
        self.cos.dims()[0]
    }
}

/// Llama-3 frequency scaling of one inverse frequency (as in HF `_compute_llama3_parameters`).
fn llama3_scale(freq: f64, s: &Llama3RopeScaling) -> f64 {
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

/// How CUDA products of few rows (a decode step's) run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skinny {
    /// Products of at most this many rows go through `kernels/gemv.cu` instead of cuBLAS (0:
    /// never; at most 8). See [`crate::engine::model::DEFAULT_SKINNY_ROWS`].
    pub rows: usize,
    /// Launch that kernel with an early start (`kernels/pdl.cuh`: it may be scheduled while the
    /// kernel before it finishes). Off by default: no faster in the H200's decode graphs.
    pub early_start: bool,
}

impl Skinny {
    /// cuBLAS for every product.
    pub const OFF: Skinny = Skinny { rows: 0, early_start: false };
}

/// A bias-free linear projection `y = x W^T`, `W: [out, in]` in the Hugging Face layout.
#[derive(Debug, Clone)]
pub struct Proj {
    weight: Tensor,
    /// Which CUDA products take the skinny GEMM kernel.
    skinny: Skinny,
}

impl Proj {
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self { weight: vb.get((out_dim, in_dim), "weight")?, skinny: Skinny::OFF })
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Self { weight, skinny: Skinny::OFF }
    }

    /// Which products take the skinny GEMM kernel (see [`Skinny`]).
    pub fn with_skinny(mut self, skinny: Skinny) -> Self {
        self.skinny = skinny;
        self
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `x: [tokens, in]` -> `[tokens, out]`.
    ///
    /// With the skinny GEMM on, CUDA products go through [`FrozenMatmul`], whose few-row case
    /// (a decode step) is `kernels/gemv.cu` rather than cuBLAS; the gradient still reaches `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.skinny.rows > 0 && x.device().is_cuda() && x.rank() == 2 {
            return self.forward_frozen(x);
        }
        Ok(candle_nn::Linear::new(self.weight.clone(), None).forward(x)?)
    }

    /// [`Proj::forward`] whose backward skips the (frozen) weight's gradient.
    pub fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op2(&self.weight, FrozenMatmul { skinny: self.skinny })?)
    }
}

/// `y = x W^T` for a frozen `W`: the backward returns the input's gradient only.
///
/// candle's matmul backward always computes both operands' gradients, so training a LoRA on a
/// plain `matmul` would also build a full `[out, in]` gradient for every frozen base weight
/// (one extra GEMM per projection per step) and throw it away.
struct FrozenMatmul {
    /// Which CUDA products take `kernels/gemv.cu` (read by the CUDA forward only).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    skinny: Skinny,
}

impl candle_core::CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        w: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let ((m, k), (n, _)) = (xl.shape().dims2()?, wl.shape().dims2()?);
        let out = x.matmul(w, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
        Ok((out, (m, n).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &candle_core::Layout,
        w: &candle_core::CudaStorage,
        wl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        if xl.shape().dims2()?.0 <= self.skinny.rows {
            if let Some(out) = crate::engine::cuda::gemv::try_gemv(x, xl, w, wl, self.skinny.early_start)? {
                return Ok(out);
            }
        }
        let ((m, k), (n, _)) = (xl.shape().dims2()?, wl.shape().dims2()?);
        let out = x.matmul(w, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
        Ok((out, (m, n).into()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}
