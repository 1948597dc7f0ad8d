//! GGUF files: metadata -> [`LlamaConfig`], tensors -> Hugging Face names and layout.
//!
//! llama.cpp's converter permutes the rows of `q_proj`/`k_proj` so that RoPE can rotate
//! interleaved pairs; we undo that permutation (as transformers' GGUF loader does) so the
//! in-memory layout is HF's and PEFT adapters line up with the right rows.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use crate::engine::model::config::LlamaConfig;
use crate::engine::{EngineError, Result};

/// An opened GGUF file: its parsed header and the path to read tensors from.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = BufReader::new(File::open(path).map_err(|e| EngineError::io(path, e))?);
        let content = Content::read(&mut f)
            .map_err(|e| EngineError::UnknownFormat(format!("{}: not a readable GGUF file ({e})", path.display())))?;
        Ok(Self { path: path.to_path_buf(), content })
    }

    /// A metadata value, if present.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A metadata string, if present.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key).and_then(|v| v.to_string().ok()).map(|s| s.as_str())
    }

    /// A metadata integer of any GGUF integer type.
    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        as_u64(self.meta(key)?)
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        match self.meta(key)? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            v => as_u64(v).map(|x| x as f64),
        }
    }

    fn required(&self, key: &str) -> Result<u64> {
        self.meta_u64(key).ok_or_else(|| EngineError::Config(format!("GGUF metadata lacks {key}")))
    }

    /// The model shape from `llama.*` metadata.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.meta_str("general.architecture").unwrap_or("").to_string();
        if arch != "llama" {
            return Err(EngineError::UnsupportedArchitecture(format!("GGUF general.architecture={arch}")));
        }
        let k = |s: &str| format!("llama.{s}");
        let heads = self.required(&k("attention.head_count"))? as usize;
        let hidden = self.required(&k("embedding_length"))? as usize;
        let vocab = match self.meta_u64(&k("vocab_size")) {
            Some(v) => v as usize,
            None => self.meta("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()).map(|v| v.len()).unwrap_or(0),
        };
        let cfg = LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.required(&k("feed_forward_length"))? as usize,
            num_hidden_layers: self.required(&k("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: self.meta_u64(&k("attention.head_count_kv")).unwrap_or(heads as u64) as usize,
            head_dim: self.meta_u64(&k("rope.dimension_count")).map(|d| d as usize).unwrap_or(hidden / heads),
            rms_norm_eps: self.meta_f64(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            rope_theta: self.meta_f64(&k("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling: None,
            max_position_embeddings: self.meta_u64(&k("context_length")).unwrap_or(4096) as usize,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: self.meta_u64("tokenizer.ggml.bos_token_id").map(|v| v as u32),
            eos_token_ids: self.meta_u64("tokenizer.ggml.eos_token_id").map(|v| vec![v as u32]).unwrap_or_default(),
        };
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            // Llama-3.1 GGUFs bake the llama3 scaling into a tensor; its metadata is lost.
            return Err(EngineError::UnsupportedArchitecture(
                "GGUF with rope_freqs (llama3 rope scaling): pass the safetensors directory instead".into(),
            ));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every tensor dequantized to `dtype` on `device`, under its Hugging Face name.
    pub fn hf_tensors(&self, cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut f = BufReader::new(File::open(&self.path).map_err(|e| EngineError::io(&self.path, e))?);
        let mut out = HashMap::new();
        for name in self.content.tensor_infos.keys() {
            let Some(hf) = hf_name(name) else { continue };
            let q = self.content.tensor(&mut f, name, device)?;
            let mut t = q.dequantize(device)?;
            if hf.ends_with("q_proj.weight") {
                t = unpermute_rows(&t, cfg.num_attention_heads)?;
            } else if hf.ends_with("k_proj.weight") {
                t = unpermute_rows(&t, cfg.num_key_value_heads)?;
            }
            out.insert(hf, t.to_dtype(dtype)?);
        }
        Ok(out)
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    Some(match v {
        Value::U8(x) => *x as u64,
        Value::I8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::I16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::I32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I64(x) => *x as u64,
        _ => return None,
    })
}

/// Maps a llama.cpp tensor name to the Hugging Face one; `None` for tensors we do not use.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let module = match part {
        "attn_norm.weight" => "input_layernorm",
        "ffn_norm.weight" => "post_attention_layernorm",
        "attn_q.weight" => "self_attn.q_proj",
        "attn_k.weight" => "self_attn.k_proj",
        "attn_v.weight" => "self_attn.v_proj",
        "attn_output.weight" => "self_attn.o_proj",
        "ffn_gate.weight" => "mlp.gate_proj",
        "ffn_up.weight" => "mlp.up_proj",
        "ffn_down.weight" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.weight"))
}

/// Inverse of llama.cpp's `permute` (GGUF -> HF row order): GGUF rows are `[heads, half, 2]`
/// (interleaved rotary pairs), HF rows `[heads, 2, half]`; exactly transformers'
/// `reverse_permute_weights`.
pub fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?.transpose(1, 2)?.reshape((out, inp))?)
}

/// llama.cpp's `permute` (HF -> GGUF row order); the inverse of [`unpermute_rows`].
pub fn permute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, 2, half, inp))?.transpose(1, 2)?.reshape((out, inp))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_roundtrip_and_names() {
        let w = Tensor::arange(0f32, 48., &Device::Cpu).unwrap().reshape((12, 4)).unwrap();
        let p = permute_rows(&w, 3).unwrap();
        assert_ne!(p.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        let back = unpermute_rows(&p, 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // llama.cpp: row r of head h, half-dim j, pair element e: gguf row = h*4 + j*2 + e.
        // HF row for (h, e, j) = h*4 + e*2 + j. Head 0: HF rows [0,1,2,3] -> gguf [0,2,1,3].
        assert_eq!(p.narrow(0, 0, 4).unwrap().to_vec2::<f32>().unwrap()[1][0], 8.0);
        assert_eq!(hf_name("blk.3.attn_k.weight").unwrap(), "model.layers.3.self_attn.k_proj.weight");
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
