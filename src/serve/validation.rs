//! HTTP JSON -> [`ValidRequest`], once: model resolved to the base or an adapter, sampling
//! parameters checked, prompt rendered and tokenized, lengths checked against
//! `--max-model-len`, tenant named ([`super::tenant`]). The engine accepts nothing else.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::catalog::Catalog;
use super::error::ApiError;
use crate::engine::sampling::SamplingParams;
use crate::engine::text::tokenizer::Tokenizer;
use crate::openai::{ChatCompletionRequest, CompletionRequest, Prompt, SamplingFields, Stop};

/// Stop strings per request at most (OpenAI allows 4).
pub const MAX_STOP_STRINGS: usize = 16;
/// Bytes per stop string at most.
pub const MAX_STOP_BYTES: usize = 256;

/// Which OpenAI endpoint a request came through (decides the response shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// A request the engine can run as is.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// `chatcmpl-…` / `cmpl-…`.
    pub id: String,
    pub endpoint: Endpoint,
    /// The `model` the client asked for (echoed in responses).
    pub model: String,
    /// Adapter name; `None` = base model.
    pub adapter: Option<String>,
    /// Whom it is counted for (fair share, per-tenant caps and rate limit): `x-tenant-id`,
    /// else `user`, else `model`.
    pub tenant: String,
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    /// Unix seconds (the responses' `created`).
    pub created: u64,
    pub arrived: Instant,
}

/// Checks requests against the served model's limits.
pub struct Validator {
    pub tokenizer: Arc<Tokenizer>,
    pub catalog: Arc<Catalog>,
    pub max_model_len: usize,
}

/// What identifies a request, resolved before its prompt is tokenized.
struct Head<'a> {
    id: String,
    endpoint: Endpoint,
    model: &'a str,
    adapter: Option<String>,
    tenant: String,
}

impl Validator {
    /// Validates a chat completion: renders the chat template and tokenizes. `tenant_header`
    /// is the checked `x-tenant-id` value, if sent.
    pub fn chat(
        &self,
        req: &ChatCompletionRequest,
        seq: u64,
        tenant_header: Option<String>,
    ) -> Result<ValidRequest, ApiError> {
        let adapter = self.resolve_model(&req.model)?;
        let tenant = super::tenant::resolve(tenant_header, req.user.as_deref(), &req.model)?;
        if req.messages.is_empty() {
            return Err(ApiError::bad("messages", "`messages` must hold at least one message"));
        }
        if let Some(m) = req.messages.iter().find(|m| !["system", "user", "assistant"].contains(&m.role.as_str())) {
            return Err(ApiError::bad(
                "messages",
                format!("unsupported role `{}` (use system, user or assistant)", m.role),
            ));
        }
        let text = self
            .tokenizer
            .apply_chat_template(&req.messages, true)
            .map_err(|e| ApiError::bad("messages", e.to_string()))?;
        let ids = self.encode(&text)?;
        let mut s = req.sampling.clone();
        s.max_tokens = req.max_completion_tokens.or(s.max_tokens);
        let head =
            Head { id: format!("chatcmpl-{seq:x}"), endpoint: Endpoint::Chat, model: &req.model, adapter, tenant };
        self.finish(head, ids, "messages", s)
    }

    /// Validates a completion: the prompt is tokenized as is (no template). `tenant_header`
    /// as for [`Validator::chat`].
    pub fn completion(
        &self,
        req: &CompletionRequest,
        seq: u64,
        tenant_header: Option<String>,
    ) -> Result<ValidRequest, ApiError> {
        let adapter = self.resolve_model(&req.model)?;
        let tenant = super::tenant::resolve(tenant_header, req.user.as_deref(), &req.model)?;
        if req.echo == Some(true) {
            return Err(ApiError::bad("echo", "`echo` is not supported by lab"));
        }
        let ids = match &req.prompt {
            Prompt::Text(t) => self.encode(t)?,
            Prompt::Texts(v) if v.len() == 1 => self.encode(&v[0])?,
            Prompt::Texts(v) => {
                return Err(ApiError::bad("prompt", format!("lab takes one prompt per request, got {}", v.len())))
            }
            Prompt::Tokens(ids) => {
                let vocab = self.tokenizer.vocab_size() as u32;
                if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
                    return Err(ApiError::bad(
                        "prompt",
                        format!("token id {bad} is outside the vocabulary (size {vocab})"),
                    ));
                }
                ids.clone()
            }
        };
        let mut s = req.sampling.clone();
        s.max_tokens = s.max_tokens.or(Some(16)); // OpenAI's default for completions
        let head =
            Head { id: format!("cmpl-{seq:x}"), endpoint: Endpoint::Completion, model: &req.model, adapter, tenant };
        self.finish(head, ids, "prompt", s)
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer.encode(text).map_err(|e| ApiError::Internal(e.to_string()))
    }

    /// `model` -> `None` (base) or `Some(adapter)`; 404 when neither.
    fn resolve_model(&self, model: &str) -> Result<Option<String>, ApiError> {
        if model == self.catalog.base_name() {
            Ok(None)
        } else if self.catalog.contains(model) {
            Ok(Some(model.to_string()))
        } else {
            Err(ApiError::ModelNotFound(model.to_string()))
        }
    }

    fn finish(
        &self,
        head: Head<'_>,
        prompt_ids: Vec<u32>,
        prompt_param: &str,
        s: SamplingFields,
    ) -> Result<ValidRequest, ApiError> {
        if prompt_ids.is_empty() {
            return Err(ApiError::bad(prompt_param, "the prompt is empty"));
        }
        refuse_unimplemented(&s.other)?;
        if s.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("n", "lab returns one choice per request: `n` must be 1"));
        }
        let temperature = s.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad("temperature", format!("`temperature` must be in [0, 2], got {temperature}")));
        }
        let top_p = s.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad("top_p", format!("`top_p` must be in (0, 1], got {top_p}")));
        }
        let top_k = match s.top_k.unwrap_or(-1) {
            k if k == -1 || k == 0 => 0,
            k if k > 0 => k as usize,
            k => return Err(ApiError::bad("top_k", format!("`top_k` must be -1 (off) or positive, got {k}"))),
        };
        let p = prompt_ids.len();
        let limit = self.max_model_len;
        if p >= limit {
            return Err(ApiError::bad(
                prompt_param,
                format!("This model's maximum context length is {limit} tokens. However, your prompt has {p} tokens. Please reduce the length of the prompt (--max-model-len {limit})."),
            ));
        }
        let max_tokens = match s.max_tokens {
            Some(0) => return Err(ApiError::bad("max_tokens", "`max_tokens` must be at least 1")),
            // `m > limit - p`, not `p + m > limit`: a max_tokens near usize::MAX must not wrap.
            Some(m) if m > limit - p => {
                return Err(ApiError::bad(
                    "max_tokens",
                    format!("This model's maximum context length is {limit} tokens. However, you requested {} tokens ({p} in the {prompt_param}, {m} in the completion). Please reduce the length of the {prompt_param} or completion.", p.saturating_add(m)),
                ))
            }
            Some(m) => m,
            None => limit - p,
        };
        let stop = s.stop.map(Stop::into_vec).unwrap_or_default();
        // Stop matching runs on the engine thread for every token of every sequence: bounded.
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::bad("stop", format!("at most {MAX_STOP_STRINGS} stop strings, got {}", stop.len())));
        }
        if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::bad(
                "stop",
                format!("stop strings are at most {MAX_STOP_BYTES} bytes, got one of {}", long.len()),
            ));
        }
        let stream = s.stream.unwrap_or(false);
        let params = SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: s.seed.unwrap_or_else(rand::random),
            max_tokens,
            ignore_eos: s.ignore_eos.unwrap_or(false),
            stop,
        };
        Ok(ValidRequest {
            id: head.id,
            endpoint: head.endpoint,
            model: head.model.to_string(),
            adapter: head.adapter,
            tenant: head.tenant,
            prompt_ids,
            params,
            stream,
            include_usage: stream && s.stream_options.is_some_and(|o| o.include_usage),
            created: unix_now(),
            arrived: Instant::now(),
        })
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// OpenAI / vLLM parameters `lab` does not implement, each with the value that means "off".
/// A request that sets one to anything else gets a 400 naming it (vLLM's convention) rather
/// than a 200 that quietly ignored it; fields not listed here (`metadata`, ...) carry no
/// sampling meaning and are ignored (`user` is not one of them: it names the tenant).
fn refuse_unimplemented(other: &serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError> {
    use serde_json::Value;
    let off = |name: &str, v: &Value| -> bool {
        match (name, v) {
            (_, Value::Null) => true,
            ("logprobs" | "echo" | "use_beam_search", Value::Bool(b)) => !b,
            ("logprobs" | "top_logprobs" | "min_tokens" | "presence_penalty" | "frequency_penalty" | "min_p", n) => {
                n.as_f64() == Some(0.0)
            }
            ("repetition_penalty", n) => n.as_f64() == Some(1.0),
            ("best_of", n) => n.as_f64() == Some(1.0),
            ("tool_choice", Value::String(s)) => s == "none",
            ("response_format", r) => r["type"] == "text",
            ("tools" | "functions" | "stop_token_ids", Value::Array(a)) => a.is_empty(),
            ("logit_bias", Value::Object(o)) => o.is_empty(),
            _ => false,
        }
    };
    const UNIMPLEMENTED: [&str; 20] = [
        "logprobs",
        "top_logprobs",
        "echo",
        "best_of",
        "use_beam_search",
        "suffix",
        "response_format",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "stop_token_ids",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "min_tokens",
        "min_p",
        "guided_json",
        "guided_regex",
    ];
    for name in UNIMPLEMENTED {
        if let Some(v) = other.get(name).filter(|v| !off(name, v)) {
            return Err(ApiError::bad(name, format!("`{name}` is not supported by lab yet (got {v}); leave it out")));
        }
    }
    Ok(())
}
