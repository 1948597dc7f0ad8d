//! `lab loadtest`: open-loop load against any OpenAI-compatible server.
//!
//! Per QPS step the whole schedule ([`schedule`]) is drawn first; each request is sent at its
//! scheduled time whatever the server does and timed from that time ([`client`]), so a slow
//! server cannot hide its tail (no coordinated omission). [`stats`] turns the step into
//! percentiles and the saturation rule, [`report`] into the table, JSON, CSV and SVG.

pub mod client;
mod closed_loop;
pub mod report;
pub mod schedule;
pub mod stats;
pub mod synthetic;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::datasets::{read_jsonl, with_system, Domain, Example};
use crate::engine::text::tokenizer::ChatMessage;
use schedule::{Arrival, Mix};
use stats::{Sample, StepSummary};

/// Where prompts come from.
#[derive(Debug, Clone)]
pub enum PromptSource {
    /// Eval examples of these domains (`--prompts A,B,C`).
    Datasets { dir: PathBuf, domains: Vec<Domain> },
    /// A user message of about `input_len` tokens, `output_len` tokens out with `ignore_eos`.
    Synthetic { input_len: usize, output_len: usize },
}

/// Resolved `lab loadtest` settings.
#[derive(Debug, Clone)]
pub struct LoadtestSettings {
    /// Base URL ending in `/v1`.
    pub url: String,
    pub api_key: Option<String>,
    pub qps: Vec<f64>,
    /// Closed-loop steps instead of `qps`: this many clients sending back to back (a
    /// throughput measurement, not a latency-under-load one).
    pub concurrency: Vec<usize>,
    pub arrival: Arrival,
    pub seed: u64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub max_in_flight: usize,
    /// Models, each with its domain when `--validate` matches prompts to adapters.
    pub models: Vec<(String, Option<Domain>)>,
    pub mix: Mix,
    pub prompts: PromptSource,
    /// Output cap for dataset prompts.
    pub max_tokens: usize,
    pub validate: bool,
    pub slo_ms: Option<f64>,
    /// Stop after the first saturated `qps` step.
    pub until_saturated: bool,
    pub timeout: Duration,
    pub out: Option<PathBuf>,
    pub progress: bool,
}

/// Errors that stop a load test before it runs.
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Dataset(#[from] crate::datasets::DatasetError),
    #[error("writing {path}: {msg}")]
    Output { path: PathBuf, msg: String },
}

/// One request as recorded in `results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub step: usize,
    pub offered_qps: f64,
    /// Seconds from the step start (warm-up included).
    pub scheduled_s: f64,
    pub warmup: bool,
    pub model: String,
    pub domain: Option<String>,
    pub example: Option<usize>,
    pub correct: Option<bool>,
    #[serde(flatten)]
    pub measured: client::Measured,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct LoadtestResult {
    pub url: String,
    /// Synthetic prompts: their length in the server's tokens, as it reported them.
    pub synthetic_prompt_tokens: Option<usize>,
    pub steps: Vec<StepSummary>,
    pub saturation_step: Option<usize>,
    pub recommended_qps: Option<f64>,
    pub requests: Vec<RequestRecord>,
}

/// The models' names, in `--models` order.
fn model_names(s: &LoadtestSettings) -> Vec<String> {
    s.models.iter().map(|(m, _)| m.clone()).collect()
}

/// A prompt ready to send, with what validation needs.
#[derive(Debug, Clone)]
pub(crate) struct Prompt {
    pub(crate) messages: Vec<ChatMessage>,
    pub(crate) max_tokens: usize,
    pub(crate) ignore_eos: bool,
    pub(crate) gold: Option<(Domain, usize, String)>,
}

/// Runs every step in order.
pub fn run(s: &LoadtestSettings) -> Result<LoadtestResult, LoadtestError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| LoadtestError::Config(format!("tokio runtime: {e}")))?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .map_err(|e| LoadtestError::Config(format!("HTTP client: {e}")))?;
    let (pool, prompt_tokens) = rt.block_on(load_prompts(s, &client))?;
    let mut steps = Vec::new();
    let mut requests = Vec::new();
    for (i, &qps) in s.qps.iter().enumerate().filter(|_| s.concurrency.is_empty()) {
        let (records, busy) = rt.block_on(run_step(s, &client, &pool, i, qps));
        let mut summary = summarize_step(s, qps, &records);
        summary.busy = busy;
        steps.push(summary);
        requests.extend(records);
        if s.until_saturated && stats::mark_saturation(&mut steps.clone(), s.slo_ms).is_some() {
            break;
        }
    }
    for (i, &n) in s.concurrency.iter().enumerate() {
        let records = rt.block_on(closed_loop::run_step(s, &client, &pool, i, n));
        let mut summary = summarize_step(s, 0.0, &records);
        summary.concurrency = Some(n);
        summary.offered_qps = summary.achieved_qps;
        steps.push(summary);
        requests.extend(records);
    }
    let sat = if s.concurrency.is_empty() { stats::mark_saturation(&mut steps, s.slo_ms) } else { None };
    Ok(LoadtestResult {
        url: s.url.clone(),
        synthetic_prompt_tokens: prompt_tokens,
        steps,
        saturation_step: sat.map(|x| x.0),
        recommended_qps: sat.map(|x| x.1),
        requests,
    })
}

/// The prompt pools (one per domain; one synthetic prompt) and, for synthetic prompts, their
/// length in the server's tokens.
async fn load_prompts(
    s: &LoadtestSettings,
    client: &reqwest::Client,
) -> Result<(Vec<Vec<Prompt>>, Option<usize>), LoadtestError> {
    match &s.prompts {
        PromptSource::Synthetic { input_len, output_len } => {
            let model = &s.models[0].0;
            let c = synthetic::calibrate(client, &s.url, s.api_key.as_deref(), model, *input_len)
                .await
                .map_err(LoadtestError::Config)?;
            if s.progress {
                match c.prompt_tokens {
                    Some(t) => eprintln!(
                        "lab loadtest: synthetic prompt of {} words = {t} prompt tokens on the server",
                        c.words
                    ),
                    None => eprintln!(
                        "lab loadtest: the server reports no usage: {} words taken as {input_len} tokens",
                        c.words
                    ),
                }
            }
            let p =
                Prompt { messages: synthetic::message(c.words), max_tokens: *output_len, ignore_eos: true, gold: None };
            Ok((vec![vec![p]], c.prompt_tokens))
        }
        PromptSource::Datasets { dir, domains } => {
            let mut pools = Vec::new();
            for &d in domains {
                let examples: Vec<Example> = read_jsonl(&dir.join(d.dir_name()).join("eval.jsonl"))?;
                let prompts = examples
                    .iter()
                    .enumerate()
                    .map(|(i, ex)| {
                        let mut msgs = with_system(ex, d);
                        if msgs.last().is_some_and(|m| m.role == "assistant") {
                            msgs.pop();
                        }
                        Prompt {
                            messages: msgs.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect(),
                            max_tokens: s.max_tokens,
                            ignore_eos: false,
                            gold: Some((d, i, ex.answer().to_string())),
                        }
                    })
                    .collect();
                pools.push(prompts);
            }
            Ok((pools, None))
        }
    }
}

/// The prompt of request `i` to model `m`: from the model's domain under `--validate`, else
/// cycling through all pools.
pub(crate) fn prompt_for<'a>(s: &LoadtestSettings, pools: &'a [Vec<Prompt>], i: usize, m: usize) -> &'a Prompt {
    let pool = match (&s.prompts, s.models[m].1) {
        (PromptSource::Datasets { domains, .. }, Some(d)) if s.validate => {
            &pools[domains.iter().position(|x| *x == d).unwrap_or(0)]
        }
        _ => &pools[i % pools.len()],
    };
    &pool[(i / pools.len().max(1)) % pool.len()]
}

async fn run_step(
    s: &LoadtestSettings,
    client: &reqwest::Client,
    pools: &[Vec<Prompt>],
    step: usize,
    qps: f64,
) -> (Vec<RequestRecord>, Option<f64>) {
    let total = s.warmup_s + s.duration_s;
    let seed = s.seed.wrapping_add(step as u64 * 1_000_003);
    let times = schedule::arrivals(s.arrival, qps, total, seed);
    let picks = schedule::pick_models(&s.mix, &model_names(s), times.len(), seed);
    let bar = progress_bar(s, step, &format!("{qps} QPS"), times.len());
    let permits = Arc::new(tokio::sync::Semaphore::new(s.max_in_flight.max(1)));
    let start = Instant::now() + Duration::from_millis(50);
    let busy =
        tokio::spawn(busy_share(client.clone(), s.url.clone(), s.api_key.clone(), start, s.warmup_s, s.duration_s));
    let mut tasks = Vec::with_capacity(times.len());
    for (i, (&t, &m)) in times.iter().zip(&picks).enumerate() {
        let p = prompt_for(s, pools, i, m).clone();
        let model = s.models[m].0.clone();
        let body = client::chat_body(&model, &p.messages, p.max_tokens, p.ignore_eos);
        let (client, url, key, permits, bar) =
            (client.clone(), s.url.clone(), s.api_key.clone(), permits.clone(), bar.clone());
        let scheduled = start + Duration::from_secs_f64(t);
        let timeout = s.timeout;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(scheduled.into()).await;
            let (permit, capped_s) = match permits.clone().try_acquire_owned() {
                Ok(p) => (p, 0.0),
                Err(_) => {
                    let p = permits.acquire_owned().await.expect("semaphore open");
                    (p, scheduled.elapsed().as_secs_f64().max(1e-9))
                }
            };
            let mut measured = client::send(&client, &url, key.as_deref(), &body, scheduled, timeout).await;
            drop(permit);
            measured.capped_s = capped_s;
            bar.inc(1);
            (model, p.gold, measured)
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for (i, task) in tasks.into_iter().enumerate() {
        let (model, gold, measured) = task.await.expect("request task");
        out.push(record(s, step, qps, times[i], model, gold, measured));
    }
    bar.finish();
    (out, busy.await.ok().flatten())
}

/// The server's busy share over the measured window (its engine-busy counter read at the
/// window's two edges), when the server exports one.
async fn busy_share(
    client: reqwest::Client,
    url: String,
    key: Option<String>,
    start: Instant,
    warmup_s: f64,
    duration_s: f64,
) -> Option<f64> {
    tokio::time::sleep_until((start + Duration::from_secs_f64(warmup_s)).into()).await;
    let (b0, t0) = (client::busy_seconds(&client, &url, key.as_deref()).await?, Instant::now());
    tokio::time::sleep_until((start + Duration::from_secs_f64(warmup_s + duration_s)).into()).await;
    let (b1, t1) = (client::busy_seconds(&client, &url, key.as_deref()).await?, Instant::now());
    Some(((b1 - b0) / (t1 - t0).as_secs_f64().max(1e-9)).clamp(0.0, 1.0))
}

/// One finished request as recorded (scored when `--validate`).
pub(crate) fn record(
    s: &LoadtestSettings,
    step: usize,
    qps: f64,
    scheduled_s: f64,
    model: String,
    gold: Option<(Domain, usize, String)>,
    measured: client::Measured,
) -> RequestRecord {
    // Only a model declared with a domain (`NAME=A`) is scored: the others (the base, synthetic
    // customers) get dataset prompts as traffic, but no one claims they can answer them.
    let declared = s.models.iter().any(|(name, d)| *name == model && d.is_some());
    let correct = match (&gold, s.validate && measured.ok && declared) {
        (Some((d, _, g)), true) => Some(crate::eval::score(*d, g, &measured.text).correct),
        _ => None,
    };
    RequestRecord {
        step,
        offered_qps: qps,
        scheduled_s,
        warmup: scheduled_s < s.warmup_s,
        model,
        domain: gold.as_ref().map(|g| g.0.letter().to_string()),
        example: gold.as_ref().map(|g| g.1),
        correct,
        measured,
    }
}

fn summarize_step(s: &LoadtestSettings, qps: f64, records: &[RequestRecord]) -> StepSummary {
    let samples: Vec<Sample> = records
        .iter()
        .filter(|r| !r.warmup)
        .map(|r| Sample {
            scheduled_s: r.scheduled_s - s.warmup_s,
            ok: r.measured.ok,
            error: r.measured.error.as_deref(),
            e2e_s: r.measured.e2e_s,
            ttft_s: r.measured.ttft_s,
            tpot_s: r.measured.tpot_s,
            output_tokens: r.measured.output_tokens,
            capped: r.measured.capped_s > 0.0,
            scored: r.correct.zip(r.domain.clone()).map(|(c, d)| (d, c)),
            model: &r.model,
        })
        .collect();
    stats::summarize(qps, s.duration_s, &samples)
}

pub(crate) fn progress_bar(s: &LoadtestSettings, step: usize, label: &str, n: usize) -> indicatif::ProgressBar {
    if !s.progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} requests {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let steps = if s.concurrency.is_empty() { s.qps.len() } else { s.concurrency.len() };
    bar.set_prefix(format!("step {}/{steps} {label}", step + 1));
    bar
}

/// Writes `results.json`, `results.csv` and `qps_latency.svg` into `dir`.
pub fn write_outputs(dir: &std::path::Path, r: &LoadtestResult, title: &str) -> Result<(), LoadtestError> {
    let err = |path: PathBuf, msg: String| LoadtestError::Output { path, msg };
    std::fs::create_dir_all(dir).map_err(|e| err(dir.to_path_buf(), e.to_string()))?;
    let json = serde_json::to_string_pretty(r).expect("results serialize");
    for (name, text) in [("results.json", json), ("results.csv", report::csv(&r.steps))] {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &path)).map_err(|e| err(path, e.to_string()))?;
    }
    let svg = dir.join("qps_latency.svg");
    report::svg(&svg, &r.steps, title).map_err(|m| err(svg, m))
}
