//! Text <-> token ids (`tokenizers`), and the model's chat template (`minijinja`).
//!
//! Nothing adds BOS: chat templates write their own control tokens, and control tokens written
//! in text are matched as single ids (they are added tokens).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::gguf::GgufFile;
use super::{EngineError, Result};

/// One chat turn, as in the OpenAI `messages` array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

/// The model's tokenizer plus its chat template and end-of-sequence ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: Option<minijinja::Environment<'static>>,
    bos_token: String,
    eos_token: String,
    eos_ids: Vec<u32>,
}

/// Llama-3's pre-tokenizer regex (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tokenizer {
    /// From a Hugging Face model directory's `tokenizer.json` (+ `tokenizer_config.json`).
    pub fn from_hf_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>, config_eos: &[u32]) -> Result<Self> {
        if !tokenizer_json.is_file() {
            return Err(EngineError::MissingFile(tokenizer_json.to_path_buf()));
        }
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
        let tc: serde_json::Value = match tokenizer_config {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| EngineError::io(p, e))?;
                serde_json::from_str(&text).map_err(|e| EngineError::Tokenizer(format!("{}: {e}", p.display())))?
            }
            None => serde_json::Value::Null,
        };
        let token_str = |key: &str| match &tc[key] {
            serde_json::Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or_default().to_string(),
        };
        let mut template = template_from_config(&tc);
        if let Some(jinja) = tokenizer_json.parent().map(|d| d.join("chat_template.jinja")).filter(|p| p.is_file()) {
            template = Some(std::fs::read_to_string(&jinja).map_err(|e| EngineError::io(&jinja, e))?);
        }
        Self::assemble(inner, template, token_str("bos_token"), token_str("eos_token"), config_eos)
    }

    /// Built from GGUF metadata so that ids equal the model's own HF tokenizer's.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.meta_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(EngineError::Tokenizer(format!(
                "GGUF tokenizer.ggml.model={model} is not supported (byte-level BPE 'gpt2' is); pass the HF directory with tokenizer.json"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            let v = gguf.meta(key).ok_or_else(|| EngineError::Tokenizer(format!("GGUF lacks {key}")))?;
            let list = v.to_vec().map_err(|e| EngineError::Tokenizer(format!("{key}: {e}")))?;
            list.iter().map(|x| x.to_string().cloned().map_err(|e| EngineError::Tokenizer(e.to_string()))).collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect();
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| EngineError::Tokenizer(format!("BPE from GGUF: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(gguf.meta_str("tokenizer.ggml.pre").unwrap_or("default"))?));
        inner.with_decoder(Some(ByteLevel::default()));
        let tok_err = |e: tokenizers::Error| EngineError::Tokenizer(e.to_string());
        inner.add_tokens(added_tokens(gguf, &tokens, 4, false)).map_err(tok_err)?;
        inner.add_special_tokens(added_tokens(gguf, &tokens, 3, true)).map_err(tok_err)?;
        let id_token = |key: &str| gguf.meta_u64(key).and_then(|i| tokens.get(i as usize)).cloned().unwrap_or_default();
        let mut eos_ids: Vec<u32> = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            eos_ids.extend(gguf.meta_u64(key).map(|v| v as u32));
        }
        let template = gguf.meta_str("tokenizer.chat_template").map(String::from);
        Self::assemble(
            inner,
            template,
            id_token("tokenizer.ggml.bos_token_id"),
            id_token("tokenizer.ggml.eos_token_id"),
            &eos_ids,
        )
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        template: Option<String>,
        bos_token: String,
        eos_token: String,
        extra_eos: &[u32],
    ) -> Result<Self> {
        let mut eos_ids: Vec<u32> = extra_eos.to_vec();
        eos_ids.extend(inner.token_to_id(&eos_token));
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let template = template.map(compile_template).transpose()?;
        Ok(Self { inner, template, bos_token, eos_token, eos_ids })
    }

    /// Token ids of `text`; nothing is added, control tokens in the text are matched.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Ids that end generation (from the model's config and tokenizer files).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders `messages` with the model's chat template (HF semantics: trim/lstrip blocks).
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = self
            .template
            .as_ref()
            .ok_or_else(|| EngineError::Template("the model has no chat template; use raw text instead".into()))?;
        let tmpl = env.get_template("chat").map_err(|e| EngineError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| EngineError::Template(e.to_string()))
    }
}

fn template_from_config(tc: &serde_json::Value) -> Option<String> {
    match &tc["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .or(list.first())
            .and_then(|t| t["template"].as_str().map(String::from)),
        _ => None,
    }
}

fn compile_template(src: String) -> Result<minijinja::Environment<'static>> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template_owned("chat", src).map_err(|e| EngineError::Template(e.to_string()))?;
    Ok(env)
}

/// The pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |regex: bool| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, regex));
    Ok(match pre {
        // SmolLM's tokenizer.json (and llama.cpp's `smollm`): digits one by one, then GPT-2.
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ])),
        "gpt2" | "default" => byte_level(true),
        "llama-bpe" | "llama3" => {
            let split = Split::new(SplitPattern::Regex(LLAMA3_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
            PreTokenizerWrapper::Sequence(Sequence::new(vec![PreTokenizerWrapper::Split(split), byte_level(false)]))
        }
        other => {
            return Err(EngineError::Tokenizer(format!(
                "GGUF tokenizer.ggml.pre={other} is not supported; pass the HF directory with tokenizer.json"
            )))
        }
    })
}

/// Tokens of GGUF `token_type == kind` (3 = control, 4 = user-defined) as added tokens.
fn added_tokens(gguf: &GgufFile, tokens: &[String], kind: i64, special: bool) -> Vec<AddedToken> {
    let Some(types) = gguf.meta("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) else {
        return vec![];
    };
    types
        .iter()
        .enumerate()
        .filter(|(_, t)| t.to_i32().map(|v| v as i64 == kind).unwrap_or(false))
        .filter_map(|(i, _)| tokens.get(i))
        .map(|t| AddedToken::from(t.clone(), special))
        .collect()
}
