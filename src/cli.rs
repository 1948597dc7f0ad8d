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
    TrainLora(TrainArgs),
    /// Serve the base model and many adapters over the OpenAI HTTP API.
    Serve(ServeArgs),
    /// Open-loop Poisson load test against any OpenAI-compatible server.
    Loadtest(LoadtestArgs),
    /// Score the base model or an adapter on a domain's eval split.
    Eval(EvalArgs),
    /// The whole lab in one command: fetch the model, train A/B/C, serve 50 customers, sweep QPS.
    Demo(DemoArgs),
    /// Measure the engine: prefill and decode throughput at several batch sizes.
    Bench(BenchArgs),
    /// Check the device's kernels and the engine on it against the CPU reference (fresh random
    /// inputs); exits non-zero on any failure.
    Selftest(SelftestArgs),
    /// Regenerate the built-in domain datasets (seeded, byte for byte).
    Datasets(DatasetsArgs),
}

/// A `usize` flag within `range`: every count `lab serve` takes has a floor (0 divides by zero
/// or schedules nothing) and a ceiling far past any real deployment (a huge value overflowed
/// sizes and deadlines computed from it).
fn count(range: std::ops::RangeInclusive<u64>) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(range)
}

/// `--kv-cache-memory`: a size (as `commands::serve` parses it) from 1 byte to 16 TiB; a
/// pool too small for one KV block is refused once the model's block size is known.
fn kv_cache_memory(s: &str) -> Result<String, String> {
    const MAX: usize = 16 << 40;
    match crate::commands::serve::parse_bytes(s) {
        Ok(n) if (1..=MAX).contains(&n) => Ok(s.to_string()),
        Ok(n) => Err(format!("{n} bytes is not in 1 B..=16 TiB")),
        Err(e) => Err(e.to_string()),
    }
}

/// `lab datasets generate`.
#[derive(Debug, Clone, Args)]
pub struct DatasetsArgs {
    #[command(subcommand)]
    pub action: DatasetsAction,
}

/// What `lab datasets` does.
#[derive(Debug, Clone, Subcommand)]
pub enum DatasetsAction {
    /// Write `{a-sql,b-triage,c-tools}/{train,eval}.jsonl` and their READMEs.
    Generate {
        #[arg(long, default_value = "datasets")]
        out: PathBuf,
    },
}

/// `lab serve` (flag names follow vLLM's `vllm serve`).
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed on stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Name clients use for the base model (default: the model's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Adapters to serve from the start, `NAME=PATH` (space- or repeat-separated).
    #[arg(long, value_name = "NAME=PATH", num_args = 1..)]
    pub lora_modules: Vec<String>,
    /// Serve every PEFT adapter directory under DIR (named after its folder); runtime loads
    /// may read from DIR.
    #[arg(long)]
    pub lora_dir: Option<PathBuf>,
    /// More roots runtime loads may read adapters from.
    #[arg(long, num_args = 1..)]
    pub allowed_lora_dirs: Vec<PathBuf>,
    /// Allow `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`.
    #[arg(long)]
    pub enable_lora_runtime_updates: bool,
    /// Adapter slots on the device (adapters in one batch at most).
    #[arg(long, default_value_t = 8, value_parser = count(1..=1024))]
    pub max_loras: usize,
    /// Parsed adapters kept in host memory (default: 4 x --max-loras).
    #[arg(long, value_parser = count(1..=65_536))]
    pub max_cpu_loras: Option<usize>,
    #[arg(long, default_value_t = 16, value_parser = count(1..=1024))]
    pub max_lora_rank: usize,
    /// Sequences in the running batch at most.
    #[arg(long, default_value_t = 256, value_parser = count(1..=65_536))]
    pub max_num_seqs: usize,
    /// Context length (prompt + output) at most (default: the model's, capped by the KV cache).
    #[arg(long, value_parser = count(1..=1 << 24))]
    pub max_model_len: Option<usize>,
    /// Tokens in one step at most (prefill chunks + decode tokens).
    #[arg(long, default_value_t = 512, value_parser = count(1..=1 << 20))]
    pub max_num_batched_tokens: usize,
    /// Share of device memory the server may hold (CUDA): the KV cache gets what the weights,
    /// the adapter slots and a profiled peak step leave of it. --kv-cache-memory overrides it.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// KV cache size, e.g. 2GiB or 512MiB (default on CPU: 1GiB).
    #[arg(long, value_parser = kv_cache_memory)]
    pub kv_cache_memory: Option<String>,
    /// Positions per KV block.
    #[arg(long, default_value_t = 16, value_parser = count(1..=1024))]
    pub block_size: usize,
    /// Waiting requests at most; beyond, 503 with Retry-After (0: every request gets it).
    #[arg(long, default_value_t = 1024, value_parser = count(0..=1 << 20))]
    pub max_waiting: usize,
    /// Waiting requests per tenant (the model, the base or one adapter, unless the request
    /// sends `x-tenant-id` or `user`) at most; beyond, 429 with Retry-After, so one tenant's
    /// burst cannot take every place (default: --max-waiting).
    #[arg(long, visible_alias = "max-waiting-per-tenant", value_parser = count(1..=1 << 20))]
    pub max_waiting_per_model: Option<usize>,
    /// Token bucket per tenant: TOKENS_PER_S[:BURST] (burst default: one second's worth). A
    /// request costs its prompt + max_tokens when it is queued (the unused max_tokens come back
    /// when it ends); one its tenant's bucket cannot pay for gets 429 + Retry-After.
    #[arg(long, value_name = "TOKENS_PER_S[:BURST]")]
    pub tenant_rate_limit: Option<crate::serve::ratelimit::RateLimit>,
    /// Times a request may be passed over (a later arrival admitted first, e.g. for a resident
    /// adapter) before it goes first and no new request may pin a slot until it has one.
    #[arg(long, default_value_t = 32, value_parser = count(0..=1_000_000))]
    pub max_wait_steps: usize,
    /// Bearer token required on /v1/*.
    #[arg(long, env = "LAB_API_KEY")]
    pub api_key: Option<String>,
    /// Request body size limit in bytes (413 beyond).
    #[arg(long, default_value_t = 4 << 20, value_parser = count(1024..=1 << 30))]
    pub max_body_bytes: usize,
    /// Seconds in-flight requests get after SIGTERM / Ctrl-C.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub shutdown_timeout: u64,
    /// Run every decode step eagerly (no CUDA graphs), as vLLM's flag.
    #[arg(long)]
    pub enforce_eager: bool,
    /// Reuse the KV blocks of cached prompt prefixes, keyed by adapter generation (vLLM's
    /// automatic prefix caching). On by default; accepted for vLLM compatibility.
    #[arg(long, conflicts_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Turn the prefix cache off: every prompt is prefilled in full.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Admission order: fcfs (vLLM's default) or fair (least-served tenant first; tenant =
    /// `x-tenant-id` header, else `user`, else the model; the Virtual Token Counter).
    #[arg(long, default_value = "fcfs")]
    pub scheduling_policy: crate::engine::scheduler::fair::Policy,
    /// Running sequences of one tenant (`x-tenant-id`, else `user`, else the model) at most.
    #[arg(long, value_parser = count(1..=65_536))]
    pub max_running_per_tenant: Option<usize>,
    /// Under `--scheduling-policy fair`, with every running place taken, a request of a tenant
    /// running fewer than its share (`--max-num-seqs` / tenants with work) preempts the newest
    /// request of the tenant furthest above its share (recomputed later). Quiet tenants then
    /// wait one step, not for a noisy response to end; the price is the victims' recompute.
    #[arg(long)]
    pub fair_preemption: bool,
    /// Seconds a client has to send a request's line and headers (from its first byte), and
    /// again its body (after the headers); the connection is closed (or the request gets a
    /// 400) past it.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout: u64,
    /// Seconds a connection may stay open with no request in flight and none arriving.
    #[arg(long, default_value_t = 75, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout: u64,
    /// Open connections at most (kept below the file-descriptor limit); beyond, a new
    /// connection gets a 503 at once.
    #[arg(long, default_value_t = 4096, value_parser = count(1..=1 << 20))]
    pub max_connections: usize,
}

/// `lab loadtest` (open loop; names follow vLLM's benchmark_serving where it has one).
#[derive(Debug, Clone, Args)]
pub struct LoadtestArgs {
    /// Server base URL (`/v1` is appended when missing).
    #[arg(long, default_value = "http://127.0.0.1:8000/v1")]
    pub url: String,
    /// Offered request rates, one step each, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,5,10,20,30")]
    pub qps: Vec<f64>,
    /// Closed-loop steps instead of --qps: this many clients sending back to back (throughput
    /// at a fixed concurrency), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Inter-arrival times: poisson, constant or gamma:K.
    #[arg(long, default_value = "poisson")]
    pub arrival: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Measured seconds per step.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Seconds per step sent but not measured, before the measured window.
    #[arg(long, default_value_t = 5.0)]
    pub warmup: f64,
    /// Safety cap on requests in flight; when hit the test is closed-loop and the table says so.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Models (adapters or the base), comma-separated; patterns like customer-{01..50}; with
    /// --validate write NAME=DOMAIN (e.g. lab-a=A) so prompts match each adapter's domain and
    /// its answers are scored (models without a domain are sent, not scored).
    #[arg(long, value_delimiter = ',', required = true)]
    pub models: Vec<String>,
    /// How requests pick a model: uniform, zipf:S, round-robin, or weights:NAME=W,... (named
    /// models at weight W, the rest at 1; e.g. weights:noisy=10 for a tenant at 10x the others).
    #[arg(long, default_value = "uniform")]
    pub mix: String,
    /// Prompt domains from datasets/ (eval splits), comma-separated (default A,B,C unless
    /// --input-len is given).
    #[arg(long, value_delimiter = ',')]
    pub prompts: Vec<String>,
    #[arg(long, default_value = "datasets")]
    pub datasets_dir: PathBuf,
    /// Synthetic prompts of about this many tokens (instead of datasets).
    #[arg(long)]
    pub input_len: Option<usize>,
    /// Output tokens of synthetic prompts (sent with ignore_eos).
    #[arg(long, default_value_t = 64)]
    pub output_len: usize,
    /// Output cap for dataset prompts.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Score every answer as `lab eval` does and report accuracy per domain.
    #[arg(long)]
    pub validate: bool,
    /// P99 end-to-end latency objective in ms; a step above it counts as saturated.
    #[arg(long)]
    pub slo: Option<f64>,
    /// Stop after the first saturated step (for --qps lists that climb past the server's limit:
    /// the steps beyond would only queue for minutes).
    #[arg(long)]
    pub until_saturated: bool,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Folder for results.json, results.csv and qps_latency.svg.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Exit non-zero when any step's error share exceeds this.
    #[arg(long, default_value_t = 0.01)]
    pub max_error_rate: f64,
    #[arg(long, env = "OPENAI_API_KEY")]
    pub api_key: Option<String>,
}

/// `lab demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Results folder (adapters, customers, loadtest results, eval matrix).
    #[arg(long, default_value = "lab-demo")]
    pub out: PathBuf,
    /// Training steps per domain (batch 8; adapters already in OUT/adapters are reused).
    #[arg(long, default_value_t = 45)]
    pub train_steps: usize,
    /// Customers served (the three trained adapters plus synthetic ones).
    #[arg(long, default_value_t = 50)]
    pub customers: usize,
    /// Offered rates of the sweep (CPU-sized by default).
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.2,0.4")]
    pub qps: Vec<f64>,
    /// Measured seconds per QPS step.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Eval examples per matrix cell.
    #[arg(long, default_value_t = 40)]
    pub eval_limit: usize,
    /// Device slots of the server.
    #[arg(long, default_value_t = 8)]
    pub max_loras: usize,
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
    /// Prompt lengths of the prefill points (batch 1, base only), comma-separated; empty = none.
    #[arg(long, value_delimiter = ',')]
    pub prefill_len: Vec<usize>,
    /// Timed samples per point; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Measure copy bandwidth (and the matmul rate) in this process and print every decode step
    /// as a ratio to its floor: (weight + KV + adapter bytes read) / bandwidth.
    #[arg(long)]
    pub floor: bool,
    /// Also break a base decode step down per batch size: host enqueue time, its GEMMs alone,
    /// its attention launches alone.
    #[arg(long)]
    pub profile: bool,
    /// Print JSON lines (one per point, then a summary) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON lines to this file (the table still goes to stdout).
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
    /// Time base decode steps eagerly only (by default on CUDA they are also timed as CUDA
    /// graph replays, as `lab serve` runs them).
    #[arg(long)]
    pub enforce_eager: bool,
    /// Also time the stock candle-transformers Llama (its own KV cache) on the same weights at
    /// batch 1 and `--prompt-len` context.
    #[arg(long)]
    pub stock_candle: bool,
    /// Projections of at most this many rows (0..=8) run through lab's skinny GEMM kernel
    /// instead of cuBLAS [default: 1, what measured faster on the H200].
    #[arg(long, value_name = "ROWS")]
    pub skinny_gemm_rows: Option<usize>,
    /// Launch the skinny GEMM kernel with an early start (programmatic dependent launch: it
    /// may be scheduled while the kernel before it finishes; off by default, measured no
    /// faster), to compare them.
    #[arg(long)]
    pub early_start: bool,
    /// Time every graph decode point again while adapter hot loads run back to back on the
    /// copy stream (CUDA), to see what loads cost the running batch.
    #[arg(long)]
    pub load_while_decoding: bool,
    /// Run decode attention through the split-keys kernel instead of the grouped-lanes one
    /// (the default), to compare them.
    #[arg(long)]
    pub no_grouped_attention: bool,
    /// Run the plain layer (separate q/k/v and gate/up GEMMs, unfused norms, RoPE and KV
    /// writes) instead of the fused one (the CUDA default), to compare them.
    #[arg(long)]
    pub no_fused_layers: bool,
}

/// `lab selftest`.
#[derive(Debug, Clone, Args)]
pub struct SelftestArgs {
    /// Device whose kernels are checked against the CPU f32 reference: cuda or cuda:N (cpu
    /// checks the reference paths against each other).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Seed of the random inputs (default: from the clock, so every run draws fresh inputs).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Folder with the tiny HF Llama and the PEFT adapters made by the real tools (PEFT parity).
    #[arg(long, default_value = "tests/fixtures")]
    pub fixtures: std::path::PathBuf,
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

/// `lab train-lora` (names follow PEFT / HF Trainer).
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Built-in domain: A (sql), B (triage) or C (tools); trains on datasets/<domain>/train.jsonl.
    #[arg(long, required_unless_present = "data")]
    pub domain: Option<String>,
    /// JSONL file of chat examples (`{"messages": [...]}`); the last assistant turn is the target.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out JSONL for --eval-every (default: the domain's eval.jsonl).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Folder of the built-in datasets.
    #[arg(long, default_value = "datasets")]
    pub datasets_dir: PathBuf,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Projections to adapt (comma-separated PEFT names).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")]
    pub target_modules: Vec<String>,
    /// Scale by alpha/sqrt(r) instead of alpha/r.
    #[arg(long)]
    pub use_rslora: bool,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Sequences per micro-batch (packed, no padding).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    /// Linear warm-up steps before the cosine decay.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder: adapter_config.json, adapter_model.safetensors, metrics.jsonl, checkpoints/.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from the newest checkpoint in --out (same flags required).
    #[arg(long)]
    pub resume: bool,
    /// Held-out loss every N steps (0 = off).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
}

/// `lab eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Domain to score: A (sql), B (triage) or C (tools).
    #[arg(long, required_unless_present = "matrix")]
    pub domain: Option<String>,
    /// JSONL to score (default: the domain's eval.jsonl); system message inserted when absent.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value = "datasets")]
    pub datasets_dir: PathBuf,
    /// PEFT adapter directory (default: the base model).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Score an OpenAI-compatible server instead of a local model.
    #[arg(long)]
    pub server: Option<String>,
    /// `model` to request from --server.
    #[arg(long)]
    pub served_model: Option<String>,
    /// Only the first N examples.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 192)]
    pub max_tokens: usize,
    /// Sequences generated together (local) or requests in flight (--server).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Per-example results (JSONL).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print every miss: the question, the expected answer, the answer given and why it
    /// scored 0.
    #[arg(long)]
    pub show_errors: bool,
    /// Print the base+adapters x domains accuracy table.
    #[arg(long)]
    pub matrix: bool,
    /// Adapters for --matrix: `A=DIR,B=DIR,C=DIR`.
    #[arg(long, value_delimiter = ',')]
    pub adapters: Vec<String>,
}

/// Arguments of a subcommand that is not built yet.
#[derive(Debug, Clone, Args)]
pub struct PendingArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}
