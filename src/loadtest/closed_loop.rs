//! Closed-loop steps (`--concurrency N`): N clients each send the next request as soon as the
//! last one ends. This measures throughput at a fixed concurrency (vLLM's
//! `--max-concurrency`); latency under offered load is the open-loop steps' job.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{client, prompt_for, record, schedule, LoadtestSettings, Prompt, RequestRecord};

/// Runs `n` clients for warm-up + duration; requests are timed from their send time.
pub async fn run_step(
    s: &LoadtestSettings,
    http: &reqwest::Client,
    pools: &[Vec<Prompt>],
    step: usize,
    n: usize,
) -> Vec<RequestRecord> {
    let total = s.warmup_s + s.duration_s;
    let seed = s.seed.wrapping_add(step as u64 * 1_000_003);
    // Enough model picks for any plausible request count; indices wrap.
    let picks = Arc::new(schedule::pick_models(&s.mix, &super::model_names(s), 100_000, seed));
    let bar = super::progress_bar(s, step, &format!("{n} clients"), 0);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(total);
    // One shared copy of the settings and prompt pools for all clients.
    let shared = Arc::new((s.clone(), pools.to_vec()));
    let mut workers = Vec::new();
    for _ in 0..n.max(1) {
        let (http, picks, next, bar, shared) = (http.clone(), picks.clone(), next.clone(), bar.clone(), shared.clone());
        workers.push(tokio::spawn(async move {
            let (settings, pools) = &*shared;
            let mut out = Vec::new();
            while Instant::now() < end {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let m = picks[i % picks.len()];
                let p = prompt_for(settings, pools, i, m);
                let model = &settings.models[m].0;
                let body = client::chat_body(model, &p.messages, p.max_tokens, p.ignore_eos);
                let sent = Instant::now();
                let (url, key) = (&settings.url, settings.api_key.as_deref());
                let measured = client::send(&http, url, key, &body, sent, settings.timeout).await;
                bar.inc(1);
                out.push(((sent - start).as_secs_f64(), model.clone(), p.gold.clone(), measured));
            }
            out
        }));
    }
    let mut records = Vec::new();
    for w in workers {
        for (t, model, gold, measured) in w.await.expect("client task") {
            records.push(record(s, step, 0.0, t, model, gold, measured));
        }
    }
    records.sort_by(|a, b| a.scheduled_s.total_cmp(&b.scheduled_s));
    bar.finish();
    records
}
