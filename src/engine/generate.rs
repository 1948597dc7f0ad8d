//! Single-sequence generation (`lab generate`): prefill, then decode token by token.

use std::time::Instant;

use crate::engine::kv::{BatchCaches, SeqCache};
use crate::engine::lora::op::LoraWeights;
use crate::engine::lora::LoraAdapter;
use crate::engine::model::{Llama, LogitsAt, PackedBatch};
use crate::engine::sampling::op::RowParams;
use crate::engine::sampling::{DeviceSampling, FinishReason, Sampler, SamplingParams};
use crate::engine::text::detokenizer::Detokenizer;
use crate::engine::text::tokenizer::Tokenizer;
use crate::engine::{EngineError, Result};

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
        let picks = DeviceSampling::new(&logits, &RowParams(vec![sampler.device_param()]))?;
        let id = sampler.sample_row(&logits, 0, &picks)?;
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

/// One prompt of a batched greedy/sampled generation.
#[derive(Debug, Clone)]
pub struct BatchPrompt {
    pub ids: Vec<u32>,
    /// Adapter slot in the `lora` weights passed to [`generate_batch`] (`None` = base).
    pub slot: Option<usize>,
}

/// Generates for many prompts at once: one packed prefill, then one packed decode step per
/// token for every unfinished sequence (each with its own KV cache and sampler). A token
/// prefix shared by prompts of the same adapter (a system message) is computed once.
pub fn generate_batch(
    model: &Llama,
    lora: Option<&dyn LoraWeights>,
    tok: &Tokenizer,
    prompts: &[BatchPrompt],
    params: &SamplingParams,
) -> Result<Vec<Generation>> {
    let max_len = model.config().max_position_embeddings;
    let (mut caches, mut inputs) = prefill_shared_prefixes(model, lora, prompts)?;
    let mut samplers: Vec<Sampler> = prompts.iter().map(|_| Sampler::new(params)).collect();
    let mut detoks: Vec<Detokenizer> = prompts.iter().map(|_| Detokenizer::new(params.stop.clone())).collect();
    let mut outs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut finish = vec![None; prompts.len()];
    let t0 = Instant::now();
    loop {
        let live: Vec<usize> = (0..prompts.len()).filter(|&i| finish[i].is_none()).collect();
        if live.is_empty() {
            break;
        }
        let mut batch = PackedBatch::default();
        for &i in &live {
            batch.push_with_slot(&inputs[i], caches[i].len(), prompts[i].slot);
        }
        let mut live_caches: Vec<&mut SeqCache> =
            caches.iter_mut().enumerate().filter(|(i, _)| finish[*i].is_none()).map(|(_, c)| c).collect();
        let logits =
            model.forward_lora(&batch, &mut BatchCaches(std::mem::take(&mut live_caches)), lora, LogitsAt::Last)?;
        let picks =
            DeviceSampling::new(&logits, &RowParams(live.iter().map(|&i| samplers[i].device_param()).collect()))?;
        for (row, &i) in live.iter().enumerate() {
            let id = samplers[i].sample_row(&logits, row, &picks)?;
            if !params.ignore_eos && tok.eos_ids().contains(&id) {
                finish[i] = Some(FinishReason::Stop);
                continue;
            }
            outs[i].push(id);
            detoks[i].push(tok, id)?;
            if detoks[i].stopped() {
                finish[i] = Some(FinishReason::Stop);
            } else if outs[i].len() >= params.max_tokens || caches[i].len() + 1 > max_len {
                finish[i] = Some(FinishReason::Length);
            }
            inputs[i] = vec![id];
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let total: usize = outs.iter().map(|o| o.len()).sum();
    Ok(outs
        .into_iter()
        .zip(detoks)
        .zip(finish)
        .map(|((output_ids, d), f)| Generation {
            text: d.text().to_string(),
            output_ids,
            finish_reason: f.unwrap_or(FinishReason::Length),
            prefill_ms: 0.0,
            decode_tokens_per_s: total as f64 / secs.max(1e-9),
        })
        .collect())
}

/// Per prompt: a KV cache holding the prefix it shares with the other prompts of its adapter
/// slot (computed once, then copied), and the tokens still to prefill.
fn prefill_shared_prefixes(
    model: &Llama,
    lora: Option<&dyn LoraWeights>,
    prompts: &[BatchPrompt],
) -> Result<(Vec<SeqCache>, Vec<Vec<u32>>)> {
    if let Some(i) = prompts.iter().position(|p| p.ids.is_empty()) {
        return Err(EngineError::Tokenizer(format!("prompt {i} is empty")));
    }
    let layers = model.config().num_hidden_layers;
    let mut caches: Vec<SeqCache> = prompts.iter().map(|_| SeqCache::new(layers, 128)).collect();
    let mut inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let mut slots: Vec<Option<usize>> = prompts.iter().map(|p| p.slot).collect();
    slots.sort();
    slots.dedup();
    for slot in slots {
        let group: Vec<usize> = (0..prompts.len()).filter(|&i| prompts[i].slot == slot).collect();
        let first = &prompts[group[0]].ids;
        // Keep at least one token per prompt to prefill (its logits start generation).
        let shared = group.iter().map(|&i| {
            let ids = &prompts[i].ids;
            first.iter().zip(ids).take_while(|(a, b)| a == b).count().min(ids.len() - 1)
        });
        let p = shared.min().unwrap_or(0);
        if group.len() < 2 || p < 8 {
            continue;
        }
        let mut prefix_cache = SeqCache::new(layers, 128);
        let mut b = PackedBatch::default();
        b.push_with_slot(&first[..p], 0, slot);
        model.forward_lora(&b, &mut BatchCaches(vec![&mut prefix_cache]), lora, LogitsAt::Last)?;
        for &i in &group {
            caches[i] = prefix_cache.fork(128)?;
            inputs[i] = prompts[i].ids[p..].to_vec();
        }
    }
    Ok((caches, inputs))
}
