//! `lab train-lora`: dataset -> token ids + loss mask -> forward with one trainable adapter ->
//! AdamW -> atomic checkpoints -> PEFT adapter files that `serve`, PEFT and vLLM load.

pub mod checkpoint;
pub mod examples;
pub mod loss;
pub mod optim;
pub mod shared_prefix;
pub mod trainable;
pub mod trainer;

use std::path::PathBuf;

use crate::engine::lora::{LoraError, LoraModule};
use crate::engine::EngineError;

/// Training failures, each one actionable.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("training data: {0}")]
    Data(String),
    #[error("io error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Resolved training settings (built once from CLI flags).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSettings {
    pub rank: usize,
    pub alpha: f64,
    pub modules: Vec<LoraModule>,
    pub use_rslora: bool,
    pub lr: f64,
    /// Optimizer steps (from `--max-steps` or `--epochs`).
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub warmup: usize,
    pub seed: u64,
    pub out: PathBuf,
    pub resume: bool,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    /// Written into `adapter_config.json` as `base_model_name_or_path`.
    pub base_model: String,
    pub progress: bool,
}

impl TrainSettings {
    /// The settings a resumed run must share with the run it continues.
    pub fn fingerprint(&self) -> String {
        let modules: Vec<&str> = self.modules.iter().map(|m| m.name()).collect();
        format!(
            "r={} alpha={} modules={} rslora={} lr={} steps={} batch={} accum={} max_len={} warmup={} seed={} base={}",
            self.rank,
            self.alpha,
            modules.join(","),
            self.use_rslora,
            self.lr,
            self.steps,
            self.batch_size,
            self.grad_accum,
            self.max_seq_len,
            self.warmup,
            self.seed,
            self.base_model
        )
    }
}
