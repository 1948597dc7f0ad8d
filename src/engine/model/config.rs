//! `LlamaConfig`: the model's shape, built once from `config.json`, GGUF metadata or a synthetic preset.

use serde::Deserialize;

use crate::engine::EngineError;

/// Llama-3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    /// Ratio between the new and the original context.
    pub factor: f64,
    /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled fully.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// Context length the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

/// The shape and numerics of a Llama-family decoder; the engine's single config type.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as Hugging Face writes it (only the fields we use).
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes `rope_theta` and the scaling here instead.
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

impl LlamaConfig {
    /// Parses a Hugging Face `config.json`; refuses architectures the engine does not implement.
    pub fn from_hf_json(text: &str) -> Result<Self, EngineError> {
        let hf: HfConfig = serde_json::from_str(text).map_err(|e| EngineError::Config(format!("config.json: {e}")))?;
        let arch_ok =
            hf.architectures.iter().any(|a| a == "LlamaForCausalLM") || hf.model_type.as_deref() == Some("llama");
        if !arch_ok {
            let got = hf.architectures.first().cloned().or(hf.model_type).unwrap_or_default();
            return Err(EngineError::UnsupportedArchitecture(got));
        }
        if hf.attention_bias || hf.mlp_bias {
            return Err(EngineError::UnsupportedArchitecture("llama with attention/mlp bias".into()));
        }
        let rope_scaling = parse_rope_scaling(hf.rope_scaling.as_ref().or(hf.rope_parameters.as_ref()))?;
        let rope_theta = match (&hf.rope_scaling, &hf.rope_parameters) {
            (None, Some(p)) => p.get("rope_theta").and_then(|v| v.as_f64()).unwrap_or(hf.rope_theta),
            _ => hf.rope_theta,
        };
        let eos_token_ids = match hf.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
            _ => vec![],
        };
        let cfg = LlamaConfig {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads),
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            bos_token_id: hf.bos_token_id,
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the invariants the forward relies on (GQA grouping, even head dim).
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: &str| Err(EngineError::Config(m.to_string()));
        if self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad("num_attention_heads must be a multiple of num_key_value_heads");
        }
        if self.head_dim % 2 != 0 {
            return bad("head_dim must be even for rotary embeddings");
        }
        Ok(())
    }

    /// Query heads per KV head (grouped-query attention).
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Output width of `q_proj`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Output width of `k_proj` and `v_proj`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// A named preset with the exact shapes of a published model (`synthetic:NAME`).
    pub fn preset(name: &str) -> Option<Self> {
        let llama3_scaling = |orig| {
            Some(Llama3RopeScaling {
                factor: if orig == 8192 { 8.0 } else { 32.0 },
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: orig,
            })
        };
        let base = LlamaConfig {
            vocab_size: 128_256,
            hidden_size: 4096,
            intermediate_size: 14_336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: llama3_scaling(8192),
            max_position_embeddings: 131_072,
            tie_word_embeddings: false,
            bos_token_id: Some(128_000),
            eos_token_ids: vec![128_001, 128_008, 128_009],
        };
        match name {
            "llama-3.1-8b" => Some(base),
            "llama-3.2-1b" => Some(LlamaConfig {
                hidden_size: 2048,
                intermediate_size: 8192,
                num_hidden_layers: 16,
                num_attention_heads: 32,
                head_dim: 64,
                rope_scaling: llama3_scaling(8192),
                tie_word_embeddings: true,
                ..base
            }),
            "smollm2-135m" => Some(LlamaConfig {
                vocab_size: 49_152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                head_dim: 64,
                rope_theta: 100_000.0,
                rope_scaling: None,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
                ..base
            }),
            "tiny" => Some(LlamaConfig {
                vocab_size: 49_152,
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 16,
                rope_theta: 10_000.0,
                rope_scaling: None,
                max_position_embeddings: 2048,
                tie_word_embeddings: true,
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
                ..base
            }),
            _ => None,
        }
    }

    /// Names accepted by [`LlamaConfig::preset`].
    pub const PRESETS: [&'static str; 4] = ["llama-3.1-8b", "llama-3.2-1b", "smollm2-135m", "tiny"];
}

fn parse_rope_scaling(v: Option<&serde_json::Value>) -> Result<Option<Llama3RopeScaling>, EngineError> {
    let Some(v) = v else { return Ok(None) };
    if v.is_null() {
        return Ok(None);
    }
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("");
    match kind {
        "llama3" => {
            serde_json::from_value(v.clone()).map(Some).map_err(|e| EngineError::Config(format!("rope_scaling: {e}")))
        }
        "default" => Ok(None),
        other => Err(EngineError::UnsupportedArchitecture(format!("rope_scaling type '{other}'"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama3_scaling_and_gqa() {
        let text = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":256,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-5,"rope_theta":500000.0,"eos_token_id":[1,2],
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":64}}"#;
        let cfg = LlamaConfig::from_hf_json(text).unwrap();
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.group_size(), 2);
        assert_eq!(cfg.eos_token_ids, vec![1, 2]);
        assert_eq!(cfg.rope_scaling.unwrap().original_max_position_embeddings, 64);
    }

    #[test]
    fn refuses_other_architectures() {
        let text = r#"{"architectures":["MistralForCausalLM"],"vocab_size":1,"hidden_size":4,
            "intermediate_size":4,"num_hidden_layers":1,"num_attention_heads":1,"rms_norm_eps":1e-5}"#;
        let err = LlamaConfig::from_hf_json(text).unwrap_err();
        assert!(err.to_string().contains("MistralForCausalLM"), "{err}");
    }
}
