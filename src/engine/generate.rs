//! Single-sequence generation (`lab generate`): prefill, then decode token by token.

use std::time::Instant;

use super::detokenizer::Detokenizer;
use super::kv_cache::{BatchCaches, SeqCache};
use super::lora::LoraAdapter;
use super::lora_op::LoraWeights;
use super::model::{Llama, LogitsAt, PackedBatch};
use super::sampler::{FinishReason, Sampler, SamplingParams};
use super::tokenizer::Tokenizer;
use super::{EngineError, Result};

/// What one generation produced, with its timings.
#[derive(Debug, Clone)]
pub struct Generation {
    pub output_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// Wall time of the prompt's forward, ms.
    pub prefill_ms: f64,
    /// Generated tokens per second after the first one.
    pub decode_tokens_per_s: f64,
}

/// Generates from `prompt_ids` (with `adapter` applied, if any), calling `on_text` with each
/// piece of text as it becomes final.
pub fn generate(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    params: &SamplingParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    if prompt_ids.is_empty() {
        return Err(EngineError::Tokenizer("empty prompt: nothing to generate from".into()));
    }
    let max_len = model.config().max_position_embeddings;
    let adapters: Vec<&LoraAdapter> = adapter.into_iter().collect();
    let slot = adapter.map(|_| 0);
    let mut cache = SeqCache::new(model.config().num_hidden_layers, 256);
    let mut sampler = Sampler::new(params);
    let mut detok = Detokenizer::new(params.stop.clone());
    let mut out = Vec::new();
    let mut next_input = prompt_ids.to_vec();
    let mut finish = FinishReason::Length;
    let t0 = Instant::now();
    let mut prefill_ms = 0.0;
    let mut t_decode = t0;
    while out.len() < params.max_tokens && cache.len() + next_input.len() <= max_len {
        let mut batch = PackedBatch::default();
        batch.push_with_slot(&next_input, cache.len(), slot);
        let lora = Some(&adapters as &dyn LoraWeights);
        let logits = model.forward_lora(&batch, &mut BatchCaches(vec![&mut cache]), lora, LogitsAt::Last)?;
        if out.is_empty() {
            prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
            t_decode = Instant::now();
        }
        let id = sampler.sample(&logits.squeeze(0)?)?;
        if !params.ignore_eos && tok.eos_ids().contains(&id) {
            finish = FinishReason::Stop;
            break;
        }
        out.push(id);
        on_text(&detok.push(tok, id)?);
        if detok.stopped() {
            finish = FinishReason::Stop;
            break;
        }
        next_input = vec![id];
    }
    on_text(&detok.flush());
    let decoded = out.len().saturating_sub(1);
    let secs = t_decode.elapsed().as_secs_f64();
    Ok(Generation {
        text: detok.text().to_string(),
        output_ids: out,
        finish_reason: finish,
        prefill_ms,
        decode_tokens_per_s: if secs > 0.0 && decoded > 0 { decoded as f64 / secs } else { 0.0 },
    })
}
