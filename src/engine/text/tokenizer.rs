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

use crate::engine::load::gguf::GgufFile;
use crate::engine::{EngineError, Result};

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
    /// Ids from here on decode as ASCII letters (the built-in byte-level tokenizer only; see
    /// [`Tokenizer::byte_level`]).
    letters_from: Option<u32>,
}

/// ChatML, as SmolLM2's template writes it (without SmolLM2's default system prompt).
const CHATML_TEMPLATE: &str = r"{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Special tokens of [`Tokenizer::byte_level`], in id order from 256.
const BYTE_LEVEL_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

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

    /// A model-free tokenizer: one token per byte (ids 0..=255) plus `<|endoftext|>` (256),
    /// `<|im_start|>` (257) and `<|im_end|>` (258), with a ChatML template; EOS = {256, 258}.
    ///
    /// For synthetic models on a machine without the default model: any UTF-8 text round-trips,
    /// and every id is below the vocabulary of every preset. A synthetic model samples from its
    /// whole vocabulary (128,256 ids for the 8B shape), so ids past these 259 decode as the
    /// ASCII letter `a + id % 26`: every generated token shows as text, and a client timing
    /// tokens by the stream's content (TTFT, TPOT) sees each one.
    pub fn byte_level() -> Result<Self> {
        let tok_err = |e: tokenizers::Error| EngineError::Tokenizer(format!("byte-level tokenizer: {e}"));
        // Byte b is spelled as GPT-2's printable stand-in for b, which is what the ByteLevel
        // pre-tokenizer emits; with no merges, BPE then maps each of those chars to its byte id.
        let vocab: tokenizers::models::bpe::Vocab =
            gpt2_byte_chars().iter().enumerate().map(|(b, c)| (c.to_string(), b as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, vec![]).build().map_err(tok_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))));
        inner.with_decoder(Some(ByteLevel::default()));
        inner.add_special_tokens(BYTE_LEVEL_SPECIALS.map(|t| AddedToken::from(t, true))).map_err(tok_err)?;
        for (i, t) in BYTE_LEVEL_SPECIALS.iter().enumerate() {
            if inner.token_to_id(t) != Some(256 + i as u32) {
                return Err(EngineError::Tokenizer(format!("byte-level tokenizer: {t} did not get id {}", 256 + i)));
            }
        }
        let mut tok = Self::assemble(
            inner,
            Some(CHATML_TEMPLATE.to_string()),
            "<|im_start|>".to_string(),
            "<|im_end|>".to_string(),
            &[256],
        )?;
        tok.letters_from = Some(256 + BYTE_LEVEL_SPECIALS.len() as u32);
        Ok(tok)
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
        Ok(Self { inner, template, bos_token, eos_token, eos_ids, letters_from: None })
    }

    /// Token ids of `text`; nothing is added, control tokens in the text are matched.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let err = |e: tokenizers::Error| EngineError::Tokenizer(e.to_string());
        match self.letters_from {
            Some(from) if ids.iter().any(|&i| i >= from) => {
                let ids: Vec<u32> = ids.iter().map(|&i| if i >= from { u32::from(b'a') + i % 26 } else { i }).collect();
                self.inner.decode(&ids, skip_special).map_err(err)
            }
            _ => self.inner.decode(ids, skip_special).map_err(err),
        }
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

/// GPT-2's `bytes_to_unicode`: the char that stands for each byte in byte-level BPE vocabularies.
///
/// Printable Latin-1 bytes stand for themselves; the other 68 map, in byte order, to U+0100 on.
fn gpt2_byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        out[b as usize] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are chars")
        };
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_ids_past_its_vocabulary_decode_as_letters() {
        let tok = Tokenizer::byte_level().unwrap();
        assert_eq!(tok.decode(&[104, 105, 259, 260, 259 + 26, 128_255], true).unwrap(), "hizazx");
        assert_eq!(tok.decode(&[256, 104], true).unwrap(), "h", "specials are still skipped");
    }

    #[test]
    fn byte_level_round_trips_any_text_one_id_per_byte() {
        let tok = Tokenizer::byte_level().unwrap();
        assert_eq!(tok.vocab_size(), 259);
        for text in [
            "hello world",
            "  leading and trailing spaces  ",
            "digits 0123456789 and 3.14159",
            "line one\nline two\r\n\ttabbed\n\n",
            "héllo 世界 🚀",
            "\u{0}\u{7f} control bytes",
            "",
        ] {
            let ids = tok.encode(text).unwrap();
            let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
            assert_eq!(ids, bytes, "{text:?}: one id per byte, the byte's value");
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
    }

    #[test]
    fn byte_level_specials_are_single_ids_and_end_generation() {
        let tok = Tokenizer::byte_level().unwrap();
        let ids = tok.encode("<|im_start|>user\nhi<|im_end|><|endoftext|>").unwrap();
        let mut want = vec![257];
        want.extend("user\nhi".bytes().map(u32::from));
        want.extend([258, 256]);
        assert_eq!(ids, want);
        assert_eq!(tok.eos_ids(), &[256, 258]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>user\nhi<|im_end|><|endoftext|>");
    }

    #[test]
    fn byte_level_renders_chatml() {
        let tok = Tokenizer::byte_level().unwrap();
        let msgs = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi\nthere")];
        assert_eq!(
            tok.apply_chat_template(&msgs, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\nthere<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(tok.apply_chat_template(&msgs[1..], false).unwrap(), "<|im_start|>user\nHi\nthere<|im_end|>\n");
    }
}
