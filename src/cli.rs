//! Command-line definitions (clap). The only module that knows clap; flag names follow vLLM
//! and the OpenAI API where one exists.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// One binary for multi-tenant LoRA: train PEFT adapters, serve many on one base model, load-test.
#[derive(Debug, Parser)]
#[command(name = "lab", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands; each maps to one entry point in `commands`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt with the base model (optionally an adapter).
    Generate(GenerateArgs),
    /// Fine-tune a LoRA adapter on a domain dataset and write it in the PEFT format.
    TrainLora(PendingArgs),
    /// Serve the base model and many adapters over the OpenAI HTTP API.
    Serve(PendingArgs),
    /// Open-loop Poisson load test against any OpenAI-compatible server.
    Loadtest(PendingArgs),
    /// Score the base model or an adapter on a domain's eval split.
    Eval(PendingArgs),
    /// Measure the engine: prefill and decode throughput at several batch sizes.
    Bench(BenchArgs),
}

/// `lab bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch sizes (concurrent sequences), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Decode steps timed per batch size (after one warm-up step).
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    /// Distinct adapters in the batch (rows spread round-robin; 0 = base only), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub adapters: Vec<usize>,
    /// Rank of the random benchmark adapters (all seven projections).
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    /// Print one JSON object per batch size instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags shared by every command that loads a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model: a local HF directory, a .gguf file, an HF repo id `org/name[@rev]`,
    /// `synthetic:NAME` (llama-3.1-8b, llama-3.2-1b, smollm2-135m, tiny), or nothing for the
    /// embedded default SmolLM2-135M-Instruct.
    #[arg(long)]
    pub model: Option<String>,
    /// Weight and activation dtype: f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `lab generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// User message, wrapped in the model's chat template as one user turn.
    #[arg(long, group = "input")]
    pub prompt: Option<String>,
    /// JSON file with an OpenAI `messages` array (or `{"messages": [...]}`).
    #[arg(long, group = "input")]
    pub messages: Option<PathBuf>,
    /// Raw text, tokenized as is (no chat template).
    #[arg(long, group = "input")]
    pub raw: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Stop string (repeatable); not included in the output.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Named adapters, `NAME=PATH` (repeatable; PEFT directories).
    #[arg(long = "lora", value_name = "NAME=PATH")]
    pub loras: Vec<String>,
    /// Adapter to apply: a name from --lora, or a PEFT directory.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Largest adapter rank accepted.
    #[arg(long, default_value_t = 64)]
    pub max_lora_rank: usize,
}

/// Arguments of a subcommand that is not built yet.
#[derive(Debug, Clone, Args)]
pub struct PendingArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}
