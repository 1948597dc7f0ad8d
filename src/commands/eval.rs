//! `lab eval`: greedy answers to a domain's eval split, scored exactly (SQL by execution, JSON
//! by fields, tool calls by name and arguments). Local model + adapter, or any OpenAI server.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

use super::{device_and_dtype, report_loaded};
use crate::cli::EvalArgs;
use crate::datasets::{read_jsonl, with_system, Domain, Example};
use crate::engine::generate::{generate_batch, BatchPrompt};
use crate::engine::load::source::{lab_home, ModelSource};
use crate::engine::load::{load_model, LoadedModel};
use crate::engine::lora::op::LoraWeights;
use crate::engine::lora::LoraAdapter;
use crate::engine::sampling::SamplingParams;
use crate::engine::text::tokenizer::ChatMessage;
use crate::eval::Scorer;

/// One scored example.
struct Scored {
    prediction: String,
    correct: bool,
    detail: String,
}

/// Runs `lab eval`.
pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    if args.matrix {
        return run_matrix(args);
    }
    let domain: Domain = args.domain.as_deref().context("--domain is required")?.parse()?;
    let examples = load_split(args, domain)?;
    let predictions = match &args.server {
        Some(url) => predict_server(url, args, domain, &examples)?,
        None => {
            let loaded = load(args)?;
            let adapter = args.adapter.as_deref().map(|d| load_adapter(&loaded, d)).transpose()?;
            predict_local(&loaded, adapter.as_ref(), args, domain, &examples)?
        }
    };
    let scored = judge_all(&Scorer::new()?, domain, &examples, predictions);
    let correct = scored.iter().filter(|s| s.correct).count();
    let who =
        args.adapter.as_ref().map(|p| p.display().to_string()).or(args.served_model.clone()).unwrap_or("base".into());
    println!(
        "domain {} ({}), {who}: accuracy {:.1}% ({correct}/{})",
        domain.letter(),
        domain.name(),
        100.0 * correct as f64 / scored.len().max(1) as f64,
        scored.len()
    );
    if args.show_errors {
        print!("{}", errors_table(&examples, &scored));
    }
    if let Some(out) = &args.out {
        write_results(out, &examples, &scored)?;
    }
    Ok(())
}

/// Widest a question, answer or reason cell of `--show-errors` gets (longer ones end in `...`).
const CELL: usize = 60;

/// The misses as a plain-text table: the question, what was expected, what came back, why.
fn errors_table(examples: &[Example], scored: &[Scored]) -> String {
    let cut = |s: &str| {
        let s = s.replace('\n', " ");
        if s.chars().count() <= CELL {
            s
        } else {
            format!("{}...", s.chars().take(CELL - 3).collect::<String>())
        }
    };
    let misses: Vec<(usize, &Example, &Scored)> =
        examples.iter().zip(scored).enumerate().filter(|(_, (_, s))| !s.correct).map(|(i, (e, s))| (i, e, s)).collect();
    let mut out = format!("{} misses:\n", misses.len());
    for (i, ex, s) in misses {
        out.push_str(&format!(
            "#{i:<4} question  {}\n      expected  {}\n      got       {}\n      why       {}\n",
            cut(ex.user()),
            cut(ex.answer()),
            cut(s.prediction.trim()),
            cut(&s.detail)
        ));
    }
    out
}

fn load(args: &EvalArgs) -> anyhow::Result<LoadedModel> {
    let (device, dtype) = device_and_dtype(&args.model)?;
    let loaded = load_model(&ModelSource::parse(args.model.model.as_deref())?, &lab_home(), dtype, &device)?;
    report_loaded(&loaded);
    Ok(loaded)
}

fn load_adapter(m: &LoadedModel, dir: &Path) -> anyhow::Result<LoraAdapter> {
    LoraAdapter::load(dir, m.model.config(), 256, m.model.dtype(), m.model.device())
        .with_context(|| format!("adapter {}", dir.display()))
}

fn load_split(args: &EvalArgs, domain: Domain) -> anyhow::Result<Vec<Example>> {
    let path = args.data.clone().unwrap_or_else(|| args.datasets_dir.join(domain.dir_name()).join("eval.jsonl"));
    let mut examples = read_jsonl(&path).with_context(|| format!("reading {}", path.display()))?;
    if let Some(n) = args.limit {
        examples.truncate(n);
    }
    Ok(examples)
}

/// The conversation up to (not including) the target answer, system message inserted.
fn prompt_messages(ex: &Example, domain: Domain) -> Vec<ChatMessage> {
    let mut msgs: Vec<ChatMessage> =
        with_system(ex, domain).into_iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
    if msgs.last().is_some_and(|m| m.role == "assistant") {
        msgs.pop();
    }
    msgs
}

/// Greedy answers from the local model (batched generation).
fn predict_local(
    m: &LoadedModel,
    adapter: Option<&LoraAdapter>,
    args: &EvalArgs,
    domain: Domain,
    examples: &[Example],
) -> anyhow::Result<Vec<String>> {
    let params = SamplingParams { max_tokens: args.max_tokens, ..Default::default() };
    let list: Vec<&LoraAdapter> = adapter.into_iter().collect();
    let bar = indicatif::ProgressBar::new(examples.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("eval {bar:30} {pos}/{len} | ETA {eta}").expect("valid template"),
    );
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(args.batch_size.max(1)) {
        let prompts = chunk
            .iter()
            .map(|ex| {
                let text = m.tokenizer.apply_chat_template(&prompt_messages(ex, domain), true)?;
                Ok(BatchPrompt { ids: m.tokenizer.encode(&text)?, slot: adapter.map(|_| 0) })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let gens = generate_batch(&m.model, Some(&list as &dyn LoraWeights), &m.tokenizer, &prompts, &params)?;
        out.extend(gens.into_iter().map(|g| g.text));
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

fn judge_all(scorer: &Scorer, domain: Domain, examples: &[Example], predictions: Vec<String>) -> Vec<Scored> {
    examples
        .iter()
        .zip(predictions)
        .map(|(ex, prediction)| {
            let s = scorer.score(domain, ex.answer(), &prediction);
            Scored { prediction, correct: s.correct, detail: s.detail }
        })
        .collect()
}

/// Greedy chat completions from an OpenAI-compatible server, `--batch-size` requests in flight.
fn predict_server(url: &str, args: &EvalArgs, domain: Domain, examples: &[Example]) -> anyhow::Result<Vec<String>> {
    let model = args.served_model.clone().context("--server needs --served-model NAME")?;
    let endpoint = format!("{}/v1/chat/completions", url.trim_end_matches('/'));
    let results: Vec<anyhow::Result<String>> = std::thread::scope(|scope| {
        let chunks: Vec<&[Example]> = examples.chunks(examples.len().div_ceil(args.batch_size.max(1)).max(1)).collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let (endpoint, model) = (&endpoint, &model);
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|ex| {
                            let body = json!({"model": model, "messages": prompt_messages(ex, domain),
                                              "max_tokens": args.max_tokens, "temperature": 0.0});
                            let resp: serde_json::Value = ureq::post(endpoint)
                                .send_json(body)
                                .with_context(|| format!("POST {endpoint}"))?
                                .into_json()?;
                            Ok(resp["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("eval thread")).collect()
    });
    results.into_iter().collect()
}

fn write_results(out: &Path, examples: &[Example], scored: &[Scored]) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    for (i, (ex, s)) in examples.iter().zip(scored).enumerate() {
        let line = json!({"index": i, "user": ex.user(), "gold": ex.answer(), "prediction": s.prediction,
                          "correct": s.correct, "detail": s.detail});
        writeln!(f, "{line}")?;
    }
    Ok(())
}

/// `--matrix`: base and each adapter, on each domain.
fn run_matrix(args: &EvalArgs) -> anyhow::Result<()> {
    if args.data.is_some() || args.server.is_some() {
        anyhow::bail!("--matrix scores the built-in eval splits with local adapters: drop --data/--server");
    }
    let loaded = load(args)?;
    let mut rows: Vec<(String, Option<LoraAdapter>)> = vec![("base".into(), None)];
    for spec in &args.adapters {
        let (name, dir) = spec.split_once('=').with_context(|| format!("--adapters {spec}: expected NAME=DIR"))?;
        rows.push((name.to_string(), Some(load_adapter(&loaded, &PathBuf::from(dir))?)));
    }
    let scorer = Scorer::new()?;
    println!("| model | A (sql) | B (triage) | C (tools) |");
    println!("|---|---:|---:|---:|");
    for (name, adapter) in &rows {
        let mut cells = Vec::new();
        for domain in Domain::ALL {
            let examples = load_split(args, domain)?;
            let predictions = predict_local(&loaded, adapter.as_ref(), args, domain, &examples)?;
            let scored = judge_all(&scorer, domain, &examples, predictions);
            let correct = scored.iter().filter(|s| s.correct).count();
            cells.push(format!("{:.1}%", 100.0 * correct as f64 / scored.len().max(1) as f64));
        }
        println!("| {name} | {} |", cells.join(" | "));
    }
    Ok(())
}
