//! `lab train-lora`: flags -> `TrainSettings`, data -> tokenized examples, then `train::train`.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{device_and_dtype, report_loaded};
use crate::cli::TrainArgs;
use crate::datasets::{read_jsonl, with_system, Domain};
use crate::engine::load::load_model;
use crate::engine::load::source::{lab_home, ModelSource};
use crate::engine::lora::LoraModule;
use crate::engine::model::layers::OpsMode;
use crate::engine::text::tokenizer::{ChatMessage, Tokenizer};
use crate::train::examples::{tokenize_example, TokenizedExample};
use crate::train::{trainer, TrainSettings};

/// Runs `lab train-lora`.
pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    let (device, dtype) = device_and_dtype(&args.model)?;
    let domain = args.domain.as_deref().map(str::parse::<Domain>).transpose()?;
    let (train_path, eval_path) = data_paths(args, domain)?;
    let source = ModelSource::parse(args.model.model.as_deref())?;
    let loaded = load_model(&source, &lab_home(), dtype, &device)?;
    report_loaded(&loaded);
    let train_set = load_examples(&train_path, domain, &loaded.tokenizer, args.max_seq_len)?;
    let eval_set = match &eval_path {
        Some(p) if args.eval_every > 0 => load_examples(p, domain, &loaded.tokenizer, args.max_seq_len)?,
        _ => vec![],
    };
    let settings = settings(args, train_set.len(), &loaded.name)?;
    std::fs::create_dir_all(&settings.out).with_context(|| format!("creating --out {}", settings.out.display()))?;
    let answer_tokens: usize = train_set.iter().map(|e| e.loss_tokens()).sum();
    eprintln!(
        "lab: {} examples ({} tokens, {answer_tokens} with loss) from {}; {} steps of {}x{}",
        train_set.len(),
        train_set.iter().map(|e| e.ids.len()).sum::<usize>(),
        train_path.display(),
        settings.steps,
        settings.batch_size,
        settings.grad_accum
    );
    let model = loaded.model.with_mode(OpsMode::Differentiable);
    let report = trainer::train(&model, &train_set, &eval_set, &settings)?;
    println!(
        "trained {} steps in {:.1} s ({:.0} tokens/s), final loss {:.4}; adapter written to {}",
        report.steps,
        report.seconds,
        report.tokens_per_s,
        report.final_loss,
        settings.out.display()
    );
    Ok(())
}

/// Train and eval files from `--data`/`--eval-data` or the domain's split files.
fn data_paths(args: &TrainArgs, domain: Option<Domain>) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    let dir = domain.map(|d| args.datasets_dir.join(d.dir_name()));
    let train = match (&args.data, &dir) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => d.join("train.jsonl"),
        (None, None) => anyhow::bail!("pass --domain A|B|C or --data FILE"),
    };
    let eval = args.eval_data.clone().or_else(|| dir.map(|d| d.join("eval.jsonl")));
    if !train.is_file() {
        anyhow::bail!(
            "training data not found: {} (run from the repo root, or pass --datasets-dir / --data)",
            train.display()
        );
    }
    Ok((train, eval))
}

fn load_examples(
    path: &Path,
    domain: Option<Domain>,
    tok: &Tokenizer,
    max_len: usize,
) -> anyhow::Result<Vec<TokenizedExample>> {
    let examples = read_jsonl(path)?;
    examples
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            let messages: Vec<ChatMessage> = match domain {
                Some(d) => with_system(ex, d),
                None => ex.messages.clone(),
            }
            .into_iter()
            .map(|m| ChatMessage::new(&m.role, &m.content))
            .collect();
            tokenize_example(tok, &messages, max_len).with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

fn settings(args: &TrainArgs, n_examples: usize, base: &str) -> anyhow::Result<TrainSettings> {
    let modules = args
        .target_modules
        .iter()
        .map(|m| LoraModule::from_name(m).with_context(|| format!("--target-modules: unknown module {m} (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.batch_size == 0 || args.grad_accum == 0 || args.rank == 0 {
        anyhow::bail!("--batch-size, --grad-accum and --rank must be at least 1");
    }
    let per_step = args.batch_size * args.grad_accum;
    let steps = match args.max_steps {
        Some(s) => s,
        None => ((args.epochs * n_examples as f64) / per_step as f64).ceil() as usize,
    };
    Ok(TrainSettings {
        rank: args.rank,
        alpha: args.alpha,
        modules,
        use_rslora: args.use_rslora,
        lr: args.lr,
        steps: steps.max(1),
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        max_seq_len: args.max_seq_len,
        warmup: args.warmup,
        seed: args.seed,
        out: args.out.clone(),
        resume: args.resume,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        base_model: base.to_string(),
        progress: true,
    })
}
