//! The fused layer forward: q|k|v and gate|up as one GEMM each, and the elementwise steps
//! between GEMMs as single launches ([`crate::engine::model::fused_ops`]).
//!
//! A layer of the plain forward is ~17 launches at decode (norm, q, k, v, two RoPEs, two KV
//! writes, attention, o, add, norm, gate, up, silu, mul, down, add); this one is 8 (qkv,
//! rope+store, attention, o, add+norm, gate|up, silu*up, down, then the next layer's add+norm).
//! At batch 1 on the H200 the plain step was 5.3 ms against a 3.6 ms floor, most of it launch
//! boundaries (gap, ramp, tail of each of ~550 kernels); fused it is 4.8 ms (BENCHMARKS.md,
//! session 7), so this path serves every paged forward of an inference model that has it
//! ([`Llama::with_fused_projections`]).
//! The weights of q, k, v (gate, up) become row ranges of one tensor; the per-projection
//! [`Proj`]s stay as views of it, so training and the per-sequence path are unchanged.

use candle_core::Tensor;

use super::layers::{OpsMode, Proj, Skinny};
use super::{Attend, Llama, LoraCtx};
use crate::engine::attention::PagedPlan;
use crate::engine::lora::op::{apply_lora, bgmv_delta, PendingDelta, SideStream, Stacked};
use crate::engine::lora::{LoraModule, ProjKey};
use crate::engine::model::fused_ops::{self, add_rms_norm, rope_store, silu_mul, HeadDims};
use crate::engine::Result;

/// One layer's fused projections (their weights; the layer's own `Proj`s are views of them).
#[derive(Debug, Clone)]
pub(super) struct FusedBlock {
    qkv: Proj,
    gate_up: Proj,
}

impl FusedBlock {
    pub(super) fn with_skinny(self, skinny: Skinny) -> Self {
        Self { qkv: self.qkv.with_skinny(skinny), gate_up: self.gate_up.with_skinny(skinny) }
    }
}

impl Llama {
    /// Concatenates each layer's q/k/v and gate/up weights into one tensor each, so the
    /// paged forward runs the fused layer ([`crate::engine::model::fused`]); memory stays the
    /// same (the separate projections become views). `load_model` does this on CUDA.
    pub fn with_fused_projections(mut self) -> Result<Self> {
        let skinny = self.skinny;
        let mut fused = Vec::with_capacity(self.layers.len());
        for b in &mut self.layers {
            let (a, m) = (&mut b.self_attn, &mut b.mlp);
            let qkv = Tensor::cat(&[a.q_proj.weight(), a.k_proj.weight(), a.v_proj.weight()], 0)?;
            let gate_up = Tensor::cat(&[m.gate_proj.weight(), m.up_proj.weight()], 0)?;
            let split = |w: &Tensor, sizes: &[usize]| -> Result<Vec<Proj>> {
                let mut at = 0;
                let mut out = Vec::with_capacity(sizes.len());
                for &n in sizes {
                    out.push(Proj::from_weight(w.narrow(0, at, n)?).with_skinny(skinny));
                    at += n;
                }
                Ok(out)
            };
            let (qd, kvd) = (a.q_proj.weight().dim(0)?, a.k_proj.weight().dim(0)?);
            let mut qkv_views = split(&qkv, &[qd, kvd, kvd])?.into_iter();
            (a.q_proj, a.k_proj, a.v_proj) = (next(&mut qkv_views), next(&mut qkv_views), next(&mut qkv_views));
            let i = m.gate_proj.weight().dim(0)?;
            let mut gu_views = split(&gate_up, &[i, i])?.into_iter();
            (m.gate_proj, m.up_proj) = (next(&mut gu_views), next(&mut gu_views));
            fused.push(FusedBlock {
                qkv: Proj::from_weight(qkv).with_skinny(skinny),
                gate_up: Proj::from_weight(gate_up).with_skinny(skinny),
            });
        }
        self.fused = fused;
        self.lora_stream = SideStream::new(&self.device)?;
        Ok(self)
    }

    /// Back to the plain layer (the weights stay concatenated, the projections views of
    /// them), for benchmarks that compare the two in one process.
    pub fn without_fused_projections(mut self) -> Self {
        self.fused.clear();
        self
    }

    /// Whether forwards over a paged pool take the fused layer.
    pub fn fused_projections(&self) -> bool {
        !self.fused.is_empty()
    }

    /// The fused projections' weights in step order (`[qkv, o, gate_up, down]` per layer),
    /// when the model has them.
    pub(super) fn fused_matmul_weights(&self) -> Option<Vec<&Tensor>> {
        if self.fused.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(4 * self.layers.len() + 1);
        for (b, f) in self.layers.iter().zip(&self.fused) {
            out.extend([f.qkv.weight(), b.self_attn.o_proj.weight(), f.gate_up.weight(), b.mlp.down_proj.weight()]);
        }
        out.push(self.lm_head.weight());
        Some(out)
    }

    /// Whether this forward can take the fused layer.
    pub(super) fn takes_fused(&self, attend: &Attend<'_>) -> bool {
        self.fused.len() == self.layers.len()
            && !self.layers.is_empty()
            && self.mode == OpsMode::Fused
            && fused_ops::kernel_dtype(self.dtype)
            && matches!(attend, Attend::Paged(_))
    }

    /// Every decoder layer, fused, over `x: [N, hidden]` (the residual stream before the final
    /// norm is returned, as the plain forward does).
    ///
    /// With adapters through the batched kernels, each projection group's LoRA update is queued
    /// on the side stream before its base GEMM (both read the same input, so they run at the
    /// same time) and added by the op that consumes the GEMM's output: the adapters' small,
    /// latency-bound kernels leave the critical path.
    pub(super) fn fused_layers_forward(
        &self,
        mut x: Tensor,
        (cos, sin): (&Tensor, &Tensor),
        plan: &PagedPlan,
        lora: Option<&LoraCtx>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let dims =
            HeadDims { heads: cfg.num_attention_heads, kv_heads: cfg.num_key_value_heads, head_dim: cfg.head_dim };
        let (qd, kvd, inter, hidden) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size, cfg.hidden_size);
        let side = self.lora_stream.as_ref();
        let mut h = self.layers[0].input_layernorm.forward(&x, self.mode)?;
        for (l, (block, fused)) in self.layers.iter().zip(&self.fused).enumerate() {
            let qkv_parts = [(LoraModule::Q, qd), (LoraModule::K, kvd), (LoraModule::V, kvd)];
            let pending = LoraStep::start(lora, &h, l, &qkv_parts, side)?;
            let (qkv, delta) = pending.finish(fused.qkv.forward(&h)?, &h)?;
            let (q, k, v) = rope_store(&qkv, delta.as_ref(), cos, sin, dims, Some(plan.kv_target(l)))?;
            let o = plan.attend_stored(l, &q, &k, &v, self.mode)?.contiguous()?;
            let pending = LoraStep::start(lora, &o, l, &[(LoraModule::O, hidden)], side)?;
            let (a, delta) = pending.finish(block.self_attn.o_proj.forward(&o)?, &o)?;
            let post = &block.post_attention_layernorm;
            let (x1, h1) = add_rms_norm(&x, &a, delta.as_ref(), post.weight(), post.eps())?;
            let pending = LoraStep::start(lora, &h1, l, &[(LoraModule::Gate, inter), (LoraModule::Up, inter)], side)?;
            let (gu, delta) = pending.finish(fused.gate_up.forward(&h1)?, &h1)?;
            let m = silu_mul(&gu, delta.as_ref())?;
            let pending = LoraStep::start(lora, &m, l, &[(LoraModule::Down, hidden)], side)?;
            let (d, delta) = pending.finish(block.mlp.down_proj.forward(&m)?, &m)?;
            match self.layers.get(l + 1) {
                Some(next) => {
                    let norm = &next.input_layernorm;
                    (x, h) = add_rms_norm(&x1, &d, delta.as_ref(), norm.weight(), norm.eps())?;
                }
                None => {
                    let d = match delta {
                        Some(delta) => (d.to_dtype(candle_core::DType::F32)? + delta)?.to_dtype(d.dtype())?,
                        None => d,
                    };
                    x = (x1 + d)?;
                }
            }
        }
        Ok(x)
    }
}

/// The LoRA work of one projection group (`parts`: module and width, in column order of the
/// group's fused output) of one layer.
enum LoraStep<'a> {
    /// No adapters in this forward.
    Base,
    /// Through the batched kernels: the update, in flight.
    Delta(PendingDelta),
    /// Through the grouped GEMMs (long prefills, weights not stacked), after the base GEMM.
    Grouped { ctx: &'a LoraCtx<'a>, layer: usize, parts: Vec<(LoraModule, usize)> },
}

impl<'a> LoraStep<'a> {
    fn start(
        lora: Option<&'a LoraCtx<'a>>,
        x: &Tensor,
        layer: usize,
        parts: &[(LoraModule, usize)],
        side: Option<&SideStream>,
    ) -> Result<Self> {
        let Some(ctx) = lora else { return Ok(Self::Base) };
        let stacked: Option<Vec<Stacked>> =
            parts.iter().map(|&(module, _)| ctx.weights.stacked(ProjKey { layer, module })).collect();
        match (&ctx.row_slots, stacked) {
            (Some(slots), Some(ws)) => {
                let cols = columns(parts);
                let with_cols: Vec<(usize, &Stacked)> = cols.iter().copied().zip(ws.iter()).collect();
                let width = parts.iter().map(|p| p.1).sum();
                Ok(Self::Delta(bgmv_delta(x, &with_cols, width, slots, side)?))
            }
            _ => Ok(Self::Grouped { ctx, layer, parts: parts.to_vec() }),
        }
    }

    /// The group's output `y` (base GEMM of `x`) and the update its consumer adds, if any.
    fn finish(self, y: Tensor, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Self::Base => Ok((y, None)),
            Self::Delta(pending) => Ok((y, Some(pending.finish()?))),
            Self::Grouped { ctx, layer, parts } => {
                let mut pieces = Vec::with_capacity(parts.len());
                for (&(module, n), col) in parts.iter().zip(columns(&parts)) {
                    let key = ProjKey { layer, module };
                    pieces.push(apply_lora(y.narrow(1, col, n)?.contiguous()?, x, key, &ctx.rows, ctx.weights)?);
                }
                Ok((Tensor::cat(&pieces, 1)?, None))
            }
        }
    }
}

/// First column of each part.
fn columns(parts: &[(LoraModule, usize)]) -> Vec<usize> {
    parts.iter().scan(0, |at, &(_, n)| Some(std::mem::replace(at, *at + n))).collect()
}

fn next(it: &mut impl Iterator<Item = Proj>) -> Proj {
    it.next().expect("one view per size")
}
