//! The Llama decoder over a packed batch: many sequences of different lengths, each at its own
//! position, in one forward (prefill chunks and decode tokens mixed).

pub mod config;
mod fused;
pub mod fused_ops;
pub mod layers;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::engine::attention::{causal_sdpa, paged_ops, PagedPlan};
use crate::engine::kv::KvStore;
use crate::engine::lora::op::{apply_lora, bgmv, row_slots, LoraWeights, RowGroups};
use crate::engine::lora::{LoraModule, ProjKey};
use crate::engine::model::config::LlamaConfig;
pub use crate::engine::model::layers::Skinny;
use crate::engine::model::layers::{at_least_f32, OpsMode, Proj, RmsNorm, Rope, RopeTable};
use crate::engine::Result;

/// One sequence's slice of a packed batch: `len` new tokens starting at position `past_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan {
    /// New tokens of this sequence in this forward.
    pub len: usize,
    /// Tokens of this sequence already in its KV cache (= position of its first new token).
    pub past_len: usize,
    /// Adapter slot of this sequence (`None` = base model only).
    pub slot: Option<usize>,
}

/// A packed batch: the new tokens of every sequence, concatenated in `seqs` order.
#[derive(Debug, Clone, Default)]
pub struct PackedBatch {
    pub tokens: Vec<u32>,
    pub seqs: Vec<SeqSpan>,
}

impl PackedBatch {
    /// Appends a base-model sequence's new tokens at position `past_len`.
    pub fn push(&mut self, tokens: &[u32], past_len: usize) {
        self.push_with_slot(tokens, past_len, None);
    }

    /// Appends a sequence's new tokens at position `past_len`, using adapter `slot`.
    pub fn push_with_slot(&mut self, tokens: &[u32], past_len: usize, slot: Option<usize>) {
        self.tokens.extend_from_slice(tokens);
        self.seqs.push(SeqSpan { len: tokens.len(), past_len, slot });
    }

    /// Absolute position of every packed token.
    pub fn positions(&self) -> Vec<usize> {
        self.seqs.iter().flat_map(|s| s.past_len..s.past_len + s.len).collect()
    }

    /// Index in the packed token list of each sequence's last new token.
    pub fn last_indices(&self) -> Vec<u32> {
        let mut end = 0;
        self.seqs
            .iter()
            .map(|s| {
                end += s.len;
                (end - 1) as u32
            })
            .collect()
    }
}

/// Which positions the forward returns logits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsAt {
    /// `[num_seqs, vocab]`: each sequence's last new token (generation).
    Last,
    /// `[num_tokens, vocab]`: every packed token (scoring).
    All,
    /// `[rows.len(), vocab]`: these packed token indices only (training: the tokens that have a
    /// loss), which spares the lm_head and its activations on every other row.
    Rows(Vec<u32>),
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// A Llama-family decoder in the Hugging Face weight layout.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Proj,
    rope: RopeTable,
    mode: OpsMode,
    /// Attention reads and writes a paged pool in place (see [`PagedPlan`]) when the KV store
    /// has one; on by default where that path has kernels (CUDA).
    paged_kernels: bool,
    /// [`Llama::with_skinny`]).
    /// [`Llama::with_skinny_rows`]).
    skinny: Skinny,
    /// Decode attention through the grouped-lanes kernel (see [`Llama::with_grouped_attention`]).
    grouped_attention: bool,
    /// Each layer's fused q|k|v and gate|up weights (empty: the plain layer); see
    /// [`Llama::with_fused_projections`].
    fused: Vec<fused::FusedBlock>,
    /// Where the fused layer runs its LoRA kernels (CUDA), concurrent with the base GEMMs.
    lora_stream: Option<crate::engine::lora::op::SideStream>,
    dtype: DType,
    device: Device,
}

impl Llama {
    /// Builds the model from HF-named tensors (`model.layers.{i}.self_attn.q_proj.weight`, ...).
    pub fn load(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let vm = vb.pp("model");
        let embed_tokens = vm.pp("embed_tokens").get((cfg.vocab_size, h), "weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let vl = vm.pp(format!("layers.{l}"));
            let va = vl.pp("self_attn");
            let vmlp = vl.pp("mlp");
            layers.push(Block {
                input_layernorm: RmsNorm::load(vl.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
                self_attn: Attention {
                    q_proj: Proj::load(va.pp("q_proj"), h, cfg.q_dim())?,
                    k_proj: Proj::load(va.pp("k_proj"), h, cfg.kv_dim())?,
                    v_proj: Proj::load(va.pp("v_proj"), h, cfg.kv_dim())?,
                    o_proj: Proj::load(va.pp("o_proj"), cfg.q_dim(), h)?,
                },
                post_attention_layernorm: RmsNorm::load(vl.pp("post_attention_layernorm"), h, cfg.rms_norm_eps)?,
                mlp: Mlp {
                    gate_proj: Proj::load(vmlp.pp("gate_proj"), h, i)?,
                    up_proj: Proj::load(vmlp.pp("up_proj"), h, i)?,
                    down_proj: Proj::load(vmlp.pp("down_proj"), i, h)?,
                },
            });
        }
        let lm_head = if cfg.tie_word_embeddings {
            Proj::from_weight(embed_tokens.clone())
        } else {
            Proj::load(vb.pp("lm_head"), h, cfg.vocab_size)?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm: RmsNorm::load(vm.pp("norm"), h, cfg.rms_norm_eps)?,
            lm_head,
            rope: RopeTable::new(&Rope::new(cfg), cfg.max_position_embeddings, vb.dtype(), vb.device())?,
            mode: OpsMode::Fused,
            paged_kernels: vb.device().is_cuda()
                && paged_ops::kernel_dtype(vb.dtype())
                && cfg.head_dim <= 256
                && cfg.num_attention_heads / cfg.num_key_value_heads <= 8,
            skinny: Skinny::OFF,
            grouped_attention: true,
            fused: Vec::new(),
            lora_stream: None,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        }
        .with_skinny(Skinny { rows: DEFAULT_SKINNY_ROWS, early_start: false }))
    }

    /// Switches between fused kernels (inference) and differentiable ops (training).
    pub fn with_mode(mut self, mode: OpsMode) -> Self {
        self.mode = mode;
        self
    }

    /// Which CUDA projections take the skinny GEMM kernel, and how it launches (see [`Skinny`]).
    pub fn with_skinny(mut self, skinny: Skinny) -> Self {
        for b in &mut self.layers {
            let (a, m) = (&mut b.self_attn, &mut b.mlp);
            for p in [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ] {
                *p = p.clone().with_skinny(skinny);
            }
        }
        self.lm_head = self.lm_head.clone().with_skinny(skinny);
        self.fused = std::mem::take(&mut self.fused).into_iter().map(|f| f.with_skinny(skinny)).collect();
        self.skinny = skinny;
        self
    }

    /// Runs paged decode attention through `kernels/paged_attention_grouped.cu` (several key
    /// rows per warp in flight) where its shapes allow, else `paged_attention.cu`. On by
    /// default: on the H200 (bench/results/h200-2026-12-01-s5) it took the batch-32 graph step
    /// from 8.74 to 7.26 ms and batch 256 from 26.99 to 21.26 ms, and passed the selftest.
    pub fn with_grouped_attention(mut self, on: bool) -> Self {
        self.grouped_attention = on;
        self
    }

    /// Whether decode attention uses the grouped-lanes kernel.
    pub fn grouped_attention(&self) -> bool {
        self.grouped_attention
    }

    /// Which projections use the skinny GEMM kernel, and how it launches.
    pub fn skinny(&self) -> Skinny {
        self.skinny
    }

    /// Forces the in-place paged attention path on or off (tests run it on the CPU, where its
    /// ops have reference implementations, against the per-sequence path).
    pub fn with_paged_kernels(mut self, on: bool) -> Self {
        self.paged_kernels = on;
        self
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// One forward over a packed batch. `kv` keeps each sequence's keys/values between calls.
    ///
    /// Returns f32 logits (f64 for an f64 model), `[num_seqs, vocab]` for [`LogitsAt::Last`] or `[num_tokens, vocab]`
    /// for [`LogitsAt::All`].
    pub fn forward(&self, batch: &PackedBatch, kv: &mut dyn KvStore, at: LogitsAt) -> Result<Tensor> {
        self.forward_lora(batch, kv, None, at)
    }

    /// [`Llama::forward`] with adapters: sequence `i` uses slot `batch.seqs[i].slot` of `lora`
    /// on every projection that adapter targets (see [`crate::engine::lora::op`] for the semantics).
    pub fn forward_lora(
        &self,
        batch: &PackedBatch,
        kv: &mut dyn KvStore,
        lora: Option<&dyn LoraWeights>,
        at: LogitsAt,
    ) -> Result<Tensor> {
        let lens: Vec<usize> = batch.seqs.iter().map(|s| s.len).collect();
        let slots: Vec<Option<usize>> = batch.seqs.iter().map(|s| s.slot).collect();
        let groups = RowGroups::new(&lens, &slots, &self.device)?;
        let lora = match lora {
            Some(w) if !groups.is_empty() => {
                // The batched kernels serve steps of few rows (decode, short chunks); long
                // prefills keep the grouped GEMMs, which read each adapter once.
                let per_row =
                    self.device.is_cuda() && self.mode == OpsMode::Fused && batch.tokens.len() <= BGMV_MAX_ROWS;
                let row_slots = per_row.then(|| row_slots(&lens, &slots, &self.device)).transpose()?;
                Some(LoraCtx { weights: w, rows: groups, row_slots, mode: self.mode })
            }
            _ => None,
        };
        let lora = lora.as_ref();
        let n = batch.tokens.len();
        let ids = Tensor::from_slice(&batch.tokens, n, &self.device)?;
        let x = self.embed_tokens.index_select(&ids, 0)?;
        let (cos, sin) = self.rope.at(&batch.positions(), &self.device)?;
        let plan = match kv.paged_view() {
            Some(view) if self.paged_kernels && self.mode == OpsMode::Fused => {
                Some(PagedPlan::new(batch, view, &self.device, self.grouped_attention)?)
            }
            _ => None,
        };
        let mut x = match &plan {
            Some(plan) => self.layers_forward(x, (&cos, &sin), &mut Attend::Paged(plan), lora)?,
            None => self.layers_forward(x, (&cos, &sin), &mut Attend::PerSeq { batch, kv: &mut *kv }, lora)?,
        };
        if let Some(plan) = &plan {
            kv.commit(plan.new_lens());
        }
        let rows = match at {
            LogitsAt::Last => Some(batch.last_indices()),
            LogitsAt::Rows(r) => Some(r),
            LogitsAt::All => None,
        };
        if let Some(rows) = rows {
            x = x.index_select(&Tensor::new(rows, &self.device)?, 0)?;
        }
        self.logits(&x)
    }

    /// A decode step whose inputs already sit on the device (one token per row, base model,
    /// paged pool): nothing is uploaded or read back, so the whole step can be captured into a
    /// CUDA graph and replayed with new values in the same buffers ([`crate::engine::graph`]).
    /// `ids`, `positions`: `[B]` u32. Returns `[B, vocab]` f32 logits. The caller commits the
    /// new positions to its KV store.
    /// With `lora` = (the slot bank, `[B]` u32 slot of each row, [`crate::engine::lora::op::NO_SLOT`] for base rows) every
    /// projection adds its rows' adapters through the batched kernels ([`bgmv`]), reading the
    /// slots on the device too.
    pub fn forward_static_decode(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        plan: &PagedPlan,
        lora: Option<(&dyn LoraWeights, &Tensor)>,
    ) -> Result<Tensor> {
        let x = self.embed_tokens.index_select(ids, 0)?;
        let (cos, sin) = self.rope.at_device(positions)?;
        let lora = lora.map(|(weights, slots)| LoraCtx {
            weights,
            rows: RowGroups::none(),
            row_slots: Some(slots.clone()),
            mode: self.mode,
        });
        let x = self.layers_forward(x, (&cos, &sin), &mut Attend::Paged(plan), lora.as_ref())?;
        self.logits(&x)
    }

    /// Positions a decode step may reach with [`Llama::forward_static_decode`] (its RoPE table).
    pub fn static_positions(&self) -> usize {
        self.rope.cached_len()
    }

    /// Every decoder layer over the packed hidden states `x: [N, hidden]`.
    fn layers_forward(
        &self,
        mut x: Tensor,
        rope: (&Tensor, &Tensor),
        attend: &mut Attend<'_>,
        lora: Option<&LoraCtx>,
    ) -> Result<Tensor> {
        if let (true, Attend::Paged(plan)) = (self.takes_fused(attend), &*attend) {
            return self.fused_layers_forward(x, rope, plan, lora);
        }
        for (l, block) in self.layers.iter().enumerate() {
            let h = block.input_layernorm.forward(&x, self.mode)?;
            let a = self.attention(l, &block.self_attn, &h, rope, attend, lora)?;
            x = (x + a)?;
            let h = block.post_attention_layernorm.forward(&x, self.mode)?;
            let m = &block.mlp;
            let gate_up = [(&m.gate_proj, LoraModule::Gate), (&m.up_proj, LoraModule::Up)];
            let [gate, up]: [Tensor; 2] = proj_group(&gate_up, &h, l, lora)?.try_into().expect("two projections");
            let gate = candle_nn::ops::silu(&gate)?;
            x = (x + proj(&m.down_proj, &(gate * up)?, l, LoraModule::Down, lora)?)?;
        }
        Ok(x)
    }

    /// Final norm and lm_head: f32 logits (f64 for an f64 model).
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(x, self.mode)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(at_least_f32(self.dtype))?)
    }

    /// Grouped-query attention of every sequence against its own cached past.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        attn: &Attention,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        attend: &mut Attend<'_>,
        lora: Option<&LoraCtx>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let n = x.dim(0)?;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let qkv = [(&attn.q_proj, LoraModule::Q), (&attn.k_proj, LoraModule::K), (&attn.v_proj, LoraModule::V)];
        let [q, k, v]: [Tensor; 3] = proj_group(&qkv, x, layer, lora)?.try_into().expect("three projections");
        let q = q.reshape((n, nh, hd))?;
        let k = k.reshape((n, nkv, hd))?;
        let v = v.reshape((n, nkv, hd))?;
        let q = Rope::apply(&q, cos, sin, self.mode)?;
        let k = Rope::apply(&k, cos, sin, self.mode)?;
        let (batch, kv) = match attend {
            Attend::Paged(plan) => {
                let o = plan.attend(layer, &q, &k, &v, self.mode)?;
                return proj(&attn.o_proj, &o, layer, LoraModule::O, lora);
            }
            Attend::PerSeq { batch, kv } => (*batch, &mut **kv),
        };
        let mut outs = Vec::with_capacity(batch.seqs.len());
        let mut start = 0;
        for (s, span) in batch.seqs.iter().enumerate() {
            let (k_all, v_all) =
                kv.store_and_fetch(s, layer, &k.narrow(0, start, span.len)?, &v.narrow(0, start, span.len)?)?;
            outs.push(causal_sdpa(&q.narrow(0, start, span.len)?, &k_all, &v_all, span.past_len, self.mode)?);
            start += span.len;
        }
        let o = Tensor::cat(&outs, 0)?;
        proj(&attn.o_proj, &o, layer, LoraModule::O, lora)
    }
}

/// How a forward's layers reach the KV cache.
enum Attend<'a> {
    /// In place on the paged pool, planned once per forward.
    Paged(&'a PagedPlan),
    /// Per sequence through the store (CPU, training, contiguous caches).
    PerSeq { batch: &'a PackedBatch, kv: &'a mut dyn KvStore },
}

/// Adapters of one forward: the weights and the batch rows grouped by slot.
struct LoraCtx<'a> {
    weights: &'a dyn LoraWeights,
    rows: RowGroups,
    /// `[N]` u32 slot per row: projections whose weights are stacked take [`bgmv`].
    row_slots: Option<Tensor>,
    mode: OpsMode,
}

/// Rows up to which CUDA projections take `kernels/gemv.cu` rather than cuBLAS by default.
/// Measured on the H200 (bench/results/h200-2026-12-01-s5, GEMMs of a decode step alone): 1
/// row 4.76 ms vs cuBLAS 4.93; 4 rows 5.55 vs 4.95; 8 rows 6.76 vs 4.95. So one row only.
pub const DEFAULT_SKINNY_ROWS: usize = 1;

/// Rows a forward may have and still take [`bgmv`] (see `forward_lora`).
const BGMV_MAX_ROWS: usize = 1024;

/// A base projection plus, where the batch uses adapters, their LoRA updates.
fn proj(p: &Proj, x: &Tensor, layer: usize, module: LoraModule, lora: Option<&LoraCtx>) -> Result<Tensor> {
    Ok(proj_group(&[(p, module)], x, layer, lora)?.remove(0))
}

/// Projections of one input (q/k/v, gate/up) plus their LoRA updates: through the batched
/// kernels, the whole group takes one launch pair ([`bgmv`]).
fn proj_group(ps: &[(&Proj, LoraModule)], x: &Tensor, layer: usize, lora: Option<&LoraCtx>) -> Result<Vec<Tensor>> {
    let ys = ps
        .iter()
        .map(|(p, _)| match lora {
            Some(ctx) if ctx.mode == OpsMode::Differentiable => p.forward_frozen(x),
            _ => p.forward(x),
        })
        .collect::<Result<Vec<_>>>()?;
    let Some(ctx) = lora else { return Ok(ys) };
    let keys: Vec<ProjKey> = ps.iter().map(|&(_, module)| ProjKey { layer, module }).collect();
    let stacked: Option<Vec<_>> = keys.iter().map(|&k| ctx.weights.stacked(k)).collect();
    match (&ctx.row_slots, stacked) {
        (Some(slots), Some(ws)) => bgmv(ys, x, &ws, slots),
        _ => ys.into_iter().zip(keys).map(|(y, key)| apply_lora(y, x, key, &ctx.rows, ctx.weights)).collect(),
    }
}

impl Llama {
    /// Every weight a decode step multiplies by: seven projections per layer and the lm_head
    /// (benchmarks time them alone).
    pub fn matmul_weights(&self) -> Vec<&Tensor> {
        if let Some(fused) = self.fused_matmul_weights() {
            return fused;
        }
        let mut out = Vec::with_capacity(7 * self.layers.len() + 1);
        for b in &self.layers {
            let (a, m) = (&b.self_attn, &b.mlp);
            out.extend(
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                    .map(|p| p.weight()),
            );
        }
        out.push(self.lm_head.weight());
        out
    }

    /// Parameters of the built model (tied embeddings counted once).
    pub fn num_parameters(&self) -> u64 {
        let mut n = self.embed_tokens.elem_count() + self.cfg.hidden_size; // + final norm
        for b in &self.layers {
            let a = &b.self_attn;
            let m = &b.mlp;
            n += [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                .iter()
                .map(|p| p.weight().elem_count())
                .sum::<usize>();
            n += 2 * self.cfg.hidden_size;
        }
        if !self.cfg.tie_word_embeddings {
            n += self.lm_head.weight().elem_count();
        }
        n as u64
    }
}
