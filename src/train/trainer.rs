//! The training loop: packed micro-batches -> masked loss -> gradient accumulation -> AdamW,
//! with progress, metrics, atomic checkpoints and exact resume.

use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;

use crate::engine::lora::{AdapterConfig, LoraAdapter};
use crate::engine::model::{Llama, LogitsAt};

use super::examples::TokenizedExample;
use super::loss::cross_entropy;
use super::optim::{lr_at, AdamW, AdamWConfig};
use super::shared_prefix::{pack, shared_prefix_len, SharedPrefixKv};
use super::trainable::TrainableLora;
use super::{checkpoint, TrainError, TrainSettings};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub steps: usize,
    pub final_loss: f64,
    pub seconds: f64,
    /// All tokens (prompt + answer) processed per second, this process only.
    pub tokens_per_s: f64,
    pub resumed_from: Option<usize>,
}

/// Example order: one seeded permutation per epoch, concatenated.
struct Order {
    n: usize,
    seed: u64,
    perms: HashMap<usize, Vec<usize>>,
}

impl Order {
    fn example(&mut self, global: usize) -> usize {
        let (epoch, i) = (global / self.n, global % self.n);
        let (n, seed) = (self.n, self.seed);
        self.perms.entry(epoch).or_insert_with(|| {
            let mut p: Vec<usize> = (0..n).collect();
            p.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch as u64)));
            p
        })[i]
    }
}

/// Trains a LoRA on `model` (which must be in `OpsMode::Differentiable`) and writes the PEFT
/// adapter to `settings.out`.
pub fn train(
    model: &Llama,
    train_set: &[TokenizedExample],
    eval_set: &[TokenizedExample],
    s: &TrainSettings,
) -> Result<TrainReport, TrainError> {
    if train_set.is_empty() {
        return Err(TrainError::Data("no training examples".into()));
    }
    let device = model.device();
    let config = AdapterConfig::new(s.rank, s.alpha, &s.modules, s.use_rslora, &s.base_model);
    let (lora, mut opt, start) = match resume_point(model, s)? {
        Some(r) => r,
        None => (
            TrainableLora::init(model.config(), config, &s.modules, s.seed, device)?,
            AdamW::new(AdamWConfig::default()),
            0,
        ),
    };
    let vars = lora.named_vars();
    let mut order = Order { n: train_set.len(), seed: s.seed, perms: HashMap::new() };
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.out.join("metrics.jsonl"))
        .map_err(|e| TrainError::Io { path: s.out.join("metrics.jsonl"), source: e })?;
    let bar = progress_bar(s, start);
    let t0 = Instant::now();
    let (mut tokens, mut last_loss) = (0usize, f64::NAN);
    for step in start..s.steps {
        let lr = lr_at(step, s.steps, s.warmup, s.lr);
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut step_loss = 0.0;
        for micro in 0..s.grad_accum {
            let first = (step * s.grad_accum + micro) * s.batch_size;
            let batch: Vec<&TokenizedExample> =
                (first..first + s.batch_size).map(|g| &train_set[order.example(g)]).collect();
            tokens += batch.iter().map(|e| e.ids.len()).sum::<usize>();
            let loss = batch_loss(model, &lora.as_adapter(), &batch)?;
            step_loss += loss.to_scalar::<f32>()? as f64 / s.grad_accum as f64;
            let g = (loss / s.grad_accum as f64)?.backward()?;
            for (name, var) in &vars {
                if let Some(gv) = g.get(var.as_tensor()) {
                    let sum = match grads.remove(name) {
                        Some(prev) => (prev + gv)?,
                        None => gv.clone(),
                    };
                    grads.insert(name.clone(), sum);
                }
            }
        }
        opt.step(&vars, &grads, lr)?;
        last_loss = step_loss;
        let done = step + 1;
        let secs = t0.elapsed().as_secs_f64();
        let tps = tokens as f64 / secs.max(1e-9);
        let line = json!({"step": done, "loss": step_loss, "lr": lr, "tokens": tokens, "tokens_per_s": tps, "elapsed_s": secs});
        writeln!(metrics, "{line}").map_err(|e| TrainError::Io { path: s.out.join("metrics.jsonl"), source: e })?;
        bar.set_message(format!("loss {step_loss:.4} | {tps:.0} tok/s"));
        bar.inc(1);
        if s.eval_every > 0 && (done % s.eval_every == 0 || done == s.steps) && !eval_set.is_empty() {
            let el = eval_loss(model, &lora, eval_set, s.batch_size)?;
            writeln!(metrics, "{}", json!({"step": done, "eval_loss": el})).ok();
            bar.println(format!("step {done}: eval loss {el:.4}"));
        }
        if s.checkpoint_every > 0 && (done % s.checkpoint_every == 0 || done == s.steps) {
            let state = checkpoint::TrainerState { step: done, total_steps: s.steps, fingerprint: s.fingerprint() };
            checkpoint::save(&s.out, &lora.as_adapter(), opt.state_tensors(), &state, 2)?;
        }
    }
    bar.finish_and_clear();
    lora.as_adapter().save(&s.out)?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(TrainReport {
        steps: s.steps,
        final_loss: last_loss,
        seconds,
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
        resumed_from: (start > 0).then_some(start),
    })
}

/// Mean masked loss of one packed micro-batch under `adapter` (slot 0 for every sequence).
/// A token prefix common to the whole batch runs once (see [`super::shared_prefix`]).
pub fn batch_loss(model: &Llama, adapter: &LoraAdapter, batch: &[&TokenizedExample]) -> Result<Tensor, TrainError> {
    batch_loss_with(model, adapter, batch, true)
}

/// [`batch_loss`] with prefix sharing on or off (off = every example runs in full).
pub fn batch_loss_with(
    model: &Llama,
    adapter: &LoraAdapter,
    batch: &[&TokenizedExample],
    share: bool,
) -> Result<Tensor, TrainError> {
    let prefix = if share && batch.len() > 1 { shared_prefix_len(batch) } else { 0 };
    let (packed, rows, targets) = pack(batch, prefix, Some(0));
    let weights = vec![adapter];
    let mut kv = SharedPrefixKv::new(model.config().num_hidden_layers, prefix > 0);
    let logits = model.forward_lora(&packed, &mut kv, Some(&weights), LogitsAt::Rows(rows))?;
    cross_entropy(&logits, &targets)
}

fn eval_loss(model: &Llama, lora: &TrainableLora, eval: &[TokenizedExample], batch: usize) -> Result<f64, TrainError> {
    let mut adapter = lora.as_adapter();
    for (a, b) in adapter.weights.values_mut() {
        *a = a.detach();
        *b = b.detach();
    }
    let subset: Vec<&TokenizedExample> = eval.iter().take(64).collect();
    let (mut sum, mut n) = (0.0, 0);
    for chunk in subset.chunks(batch.max(1)) {
        sum += batch_loss(model, &adapter, chunk)?.to_scalar::<f32>()? as f64;
        n += 1;
    }
    Ok(sum / n.max(1) as f64)
}

/// Restores adapter, optimizer and step from the newest checkpoint when `--resume` is set.
fn resume_point(model: &Llama, s: &TrainSettings) -> Result<Option<(TrainableLora, AdamW, usize)>, TrainError> {
    if !s.resume {
        return Ok(None);
    }
    let Some((dir, moments, state)) = checkpoint::load_latest(&s.out, model.device())? else {
        return Err(TrainError::Data(format!("--resume: no checkpoint in {}", s.out.join("checkpoints").display())));
    };
    if state.fingerprint != s.fingerprint() {
        return Err(TrainError::Data(format!(
            "--resume: {} was made with other settings ({}); rerun with the same flags or drop --resume",
            dir.display(),
            state.fingerprint
        )));
    }
    let adapter = LoraAdapter::load(&dir, model.config(), s.rank, candle_core::DType::F32, model.device())?;
    let lora = TrainableLora::from_adapter(&adapter, model.device())?;
    eprintln!("lab: resuming from {} (step {} of {})", dir.display(), state.step, state.total_steps);
    Ok(Some((lora, AdamW::restore(AdamWConfig::default(), state.step, moments), state.step)))
}

fn progress_bar(s: &TrainSettings, start: usize) -> indicatif::ProgressBar {
    let bar = if s.progress { indicatif::ProgressBar::new(s.steps as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("train {bar:30} step {pos}/{len} | {msg} | ETA {eta}")
            .expect("valid template"),
    );
    bar.set_position(start as u64);
    bar
}
