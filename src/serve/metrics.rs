//! Prometheus metrics: vLLM's names where vLLM has one (so dashboards and the Gateway API
//! Inference Extension's LoRA-affinity routing work unchanged), `lab_*` for the rest.
//!
//! The text format is small enough to write directly; the engine thread updates the state
//! once per step and per finished request, `/metrics` renders a snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// vLLM's TTFT buckets (seconds).
const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// vLLM's inter-token buckets (seconds).
const TPOT_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// vLLM's request latency buckets (seconds).
const E2E_BUCKETS: &[f64] =
    &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0];

/// Engine step buckets (seconds): a decode replay is milliseconds, a long prefill chunk more.
const STEP_BUCKETS: &[f64] =
    &[0.002, 0.004, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0];

/// A cumulative Prometheus histogram.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    /// Records one observation in seconds.
    pub fn observe(&mut self, secs: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if secs <= *b {
                *c += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Tenants with a series of their own in `lab_tenant_rate_limited_total`: clients name their
/// tenant, so without a cap they could make the scrape as large as they like.
pub const MAX_TENANT_SERIES: usize = 1000;
/// The label the tenants past [`MAX_TENANT_SERIES`] are counted under (it has a space, so no
/// tenant has that name).
pub const OTHER_TENANTS: &str = "other tenants";

/// Counters of one adapter (the base model is listed under its served name).
#[derive(Debug, Clone, Default)]
pub struct AdapterCounters {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
}

/// Everything `/metrics` shows.
#[derive(Debug, Clone)]
pub struct MetricsState {
    pub running: usize,
    /// Preempted sequences waiting to be recomputed (the never-admitted ones are
    /// [`Metrics::queued`]).
    pub requeued: usize,
    pub kv_free_blocks: usize,
    pub kv_total_blocks: usize,
    pub max_loras: usize,
    pub running_adapters: BTreeSet<String>,
    pub waiting_adapters: BTreeSet<String>,
    /// Unix time (seconds) of the engine's last gauge update: `vllm:lora_requests_info`'s
    /// value, which LoRA-affinity routers read as the series' freshness (a wedged engine
    /// must not look fresh, so it is not the scrape time).
    pub engine_updated_at: f64,
    /// False once the engine thread died (`/health` then answers 503).
    pub engine_alive: bool,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    /// Finished requests by `finished_reason` (stop, length, abort, error).
    pub finished: BTreeMap<&'static str, u64>,
    pub preemptions: u64,
    /// Decode steps run as a CUDA graph replay (the rest ran eagerly).
    pub decode_graph_replays: u64,
    /// Wall time the engine spent inside steps (the seed table's "GPU util" column is its rate).
    pub busy: BusyWindow,
    /// Step wall times: decode-only steps, and steps with prefill tokens.
    pub decode_steps: Histogram,
    pub prefill_steps: Histogram,
    /// Prompt tokens of admitted requests, and those the prefix cache supplied.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub adapter_loads: u64,
    pub adapter_evictions: u64,
    pub per_adapter: BTreeMap<String, AdapterCounters>,
    /// Requests refused by `--tenant-rate-limit`, per tenant (at most [`MAX_TENANT_SERIES`]
    /// names; the rest add up under [`OTHER_TENANTS`]).
    pub rate_limited: BTreeMap<String, u64>,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
}

impl MetricsState {
    /// Counts a request of `tenant` refused by the rate limit.
    pub fn count_rate_limited(&mut self, tenant: &str) {
        let full = self.rate_limited.len() >= MAX_TENANT_SERIES && !self.rate_limited.contains_key(tenant);
        *self.rate_limited.entry(if full { OTHER_TENANTS } else { tenant }.to_string()).or_default() += 1;
    }
}

/// Shared metrics (engine writes, HTTP reads).
#[derive(Debug)]
pub struct Metrics {
    model_name: String,
    /// Requests submitted and not yet admitted or ended: the count `--max-waiting` is checked
    /// against (the engine handle increments it, the engine decrements it), read live here so
    /// the waiting gauge is neither a step stale nor a different number from the limit's.
    pub queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    state: Mutex<MetricsState>,
}

impl Metrics {
    pub fn new(model_name: &str, kv_total_blocks: usize, max_loras: usize) -> Self {
        let state = MetricsState {
            running: 0,
            requeued: 0,
            kv_free_blocks: kv_total_blocks,
            kv_total_blocks,
            max_loras,
            running_adapters: BTreeSet::new(),
            waiting_adapters: BTreeSet::new(),
            engine_updated_at: unix_seconds(),
            engine_alive: true,
            prompt_tokens: 0,
            generation_tokens: 0,
            finished: BTreeMap::new(),
            preemptions: 0,
            decode_graph_replays: 0,
            busy: BusyWindow::default(),
            decode_steps: Histogram::new(STEP_BUCKETS),
            prefill_steps: Histogram::new(STEP_BUCKETS),
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
            adapter_loads: 0,
            adapter_evictions: 0,
            per_adapter: BTreeMap::new(),
            rate_limited: BTreeMap::new(),
            ttft: Histogram::new(TTFT_BUCKETS),
            tpot: Histogram::new(TPOT_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
        };
        Self { model_name: model_name.to_string(), queued: Default::default(), state: Mutex::new(state) }
    }

    /// Runs `f` on the state under the lock.
    pub fn update<R>(&self, f: impl FnOnce(&mut MetricsState) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A copy of the state.
    pub fn snapshot(&self) -> MetricsState {
        self.update(|s| s.clone())
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let s = self.snapshot();
        let m = format!("model_name=\"{}\"", escape(&self.model_name));
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{m}}} {v}");
        };
        gauge(&mut out, "vllm:num_requests_running", "Requests in the running batch.", s.running as f64);
        let waiting = self.queued.load(std::sync::atomic::Ordering::SeqCst) + s.requeued;
        gauge(&mut out, "vllm:num_requests_waiting", "Requests waiting to be scheduled.", waiting as f64);
        let used = 1.0 - s.kv_free_blocks as f64 / s.kv_total_blocks.max(1) as f64;
        gauge(&mut out, "vllm:kv_cache_usage_perc", "KV cache usage (1 = full).", used);
        gauge(&mut out, "vllm:gpu_cache_usage_perc", "KV cache usage (1 = full; older vLLM name).", used);
        gauge(&mut out, "lab_kv_free_blocks", "Free KV cache blocks.", s.kv_free_blocks as f64);
        gauge(&mut out, "lab_kv_total_blocks", "KV cache blocks in the pool.", s.kv_total_blocks as f64);
        let join = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(",");
        let _ = writeln!(
            out,
            "# HELP vllm:lora_requests_info Running stats on LoRA requests.\n# TYPE vllm:lora_requests_info gauge\n\
             vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {}",
            s.max_loras,
            escape(&join(&s.running_adapters)),
            escape(&join(&s.waiting_adapters)),
            s.engine_updated_at
        );
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{m}}} {v}");
        };
        counter(&mut out, "vllm:prompt_tokens_total", "Prefill tokens processed.", s.prompt_tokens);
        counter(&mut out, "vllm:generation_tokens_total", "Generation tokens processed.", s.generation_tokens);
        counter(&mut out, "vllm:num_preemptions_total", "Preemptions (recompute).", s.preemptions);
        counter(
            &mut out,
            "vllm:prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            s.prefix_cache_queries,
        );
        counter(
            &mut out,
            "vllm:prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache.",
            s.prefix_cache_hits,
        );
        let busy = "lab_engine_busy_seconds_total";
        let _ = writeln!(
            out,
            "# HELP {busy} Seconds the engine spent inside steps (rate() of it is the busy fraction).\n\
             # TYPE {busy} counter\n{busy}{{{m}}} {}",
            s.busy.total_seconds()
        );
        gauge(
            &mut out,
            "lab_engine_busy_ratio",
            "Share of the last 10 s the engine spent inside steps (1 = never idle).",
            s.busy.ratio(std::time::Instant::now()),
        );
        counter(
            &mut out,
            "lab_decode_graph_replays_total",
            "Decode steps run as a CUDA graph replay.",
            s.decode_graph_replays,
        );
        let _ = writeln!(
            out,
            "# HELP vllm:request_success_total Finished requests.\n# TYPE vllm:request_success_total counter"
        );
        for (reason, n) in &s.finished {
            let _ = writeln!(out, "vllm:request_success_total{{{m},finished_reason=\"{reason}\"}} {n}");
        }
        histogram(&mut out, "vllm:time_to_first_token_seconds", "Time to first token.", &m, &s.ttft);
        histogram(&mut out, "vllm:time_per_output_token_seconds", "Time per output token.", &m, &s.tpot);
        histogram(&mut out, "vllm:inter_token_latency_seconds", "Inter-token latency.", &m, &s.tpot);
        histogram(&mut out, "vllm:e2e_request_latency_seconds", "End-to-end request latency.", &m, &s.e2e);
        let step = "lab_engine_step_seconds";
        let _ = writeln!(
            out,
            "# HELP {step} Engine step wall time, by kind (decode: one token a row).\n# TYPE {step} histogram"
        );
        for (kind, h) in [("decode", &s.decode_steps), ("prefill", &s.prefill_steps)] {
            histogram_series(&mut out, step, &format!("{m},kind=\"{kind}\""), h);
        }
        counter(&mut out, "lab_adapter_loads_total", "Adapter reads from disk.", s.adapter_loads);
        counter(&mut out, "lab_adapter_evictions_total", "Adapters evicted from a device slot.", s.adapter_evictions);
        per_adapter(&mut out, &s.per_adapter);
        let name = "lab_tenant_rate_limited_total";
        let _ =
            writeln!(out, "# HELP {name} Requests refused by --tenant-rate-limit, per tenant.\n# TYPE {name} counter");
        for (tenant, n) in &s.rate_limited {
            let _ = writeln!(out, "{name}{{tenant=\"{}\"}} {n}", escape(tenant));
        }
        out
    }
}

/// Time inside engine steps: a running total and the share of the last
/// [`BusyWindow::SECONDS`] whole seconds (one-second buckets, so the gauge needs no scraper
/// state and two scrapers read the same value).
#[derive(Debug, Clone)]
pub struct BusyWindow {
    origin: std::time::Instant,
    total: Duration,
    /// `(second since origin, busy time in it)`, a ring indexed by the second.
    buckets: [(u64, Duration); 16],
}

impl Default for BusyWindow {
    fn default() -> Self {
        Self { origin: std::time::Instant::now(), total: Duration::ZERO, buckets: [(u64::MAX, Duration::ZERO); 16] }
    }
}

impl BusyWindow {
    /// Whole seconds the ratio is taken over.
    pub const SECONDS: u64 = 10;

    /// Adds a step that ended at `end` and took `took` (counted in the second it ended in: a
    /// step is milliseconds, a bucket a second).
    pub fn record(&mut self, end: std::time::Instant, took: Duration) {
        self.total += took;
        let sec = end.saturating_duration_since(self.origin).as_secs();
        let b = &mut self.buckets[(sec % 16) as usize];
        if b.0 != sec {
            *b = (sec, Duration::ZERO);
        }
        b.1 += took;
    }

    pub fn total_seconds(&self) -> f64 {
        self.total.as_secs_f64()
    }

    /// Busy share of the [`Self::SECONDS`] whole seconds before the one `now` is in.
    pub fn ratio(&self, now: std::time::Instant) -> f64 {
        let cur = now.saturating_duration_since(self.origin).as_secs();
        let first = cur.saturating_sub(Self::SECONDS);
        let busy: Duration = self.buckets.iter().filter(|(s, _)| *s >= first && *s < cur).map(|b| b.1).sum();
        let span = (cur - first).max(1);
        (busy.as_secs_f64() / span as f64).min(1.0)
    }
}

fn histogram(out: &mut String, name: &str, help: &str, labels: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    histogram_series(out, name, labels, h);
}

fn histogram_series(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    for (b, c) in h.bounds.iter().zip(&h.counts) {
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {c}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}\n{name}_count{{{labels}}} {}", h.sum, h.count);
}

fn per_adapter(out: &mut String, map: &BTreeMap<String, AdapterCounters>) {
    let rows: [(&str, &str, fn(&AdapterCounters) -> u64); 3] = [
        ("lab_adapter_requests_total", "Finished requests per adapter.", |c| c.requests),
        ("lab_adapter_prompt_tokens_total", "Prompt tokens per adapter.", |c| c.prompt_tokens),
        ("lab_adapter_generation_tokens_total", "Generated tokens per adapter.", |c| c.generation_tokens),
    ];
    for (name, help, get) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (adapter, c) in map {
            let _ = writeln!(out, "{name}{{adapter=\"{}\"}} {}", escape(adapter), get(c));
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Seconds of a duration, for observations.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Unix time in seconds (fractional, as vLLM's `time.time()`).
pub fn unix_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ratio_is_the_share_of_the_last_ten_whole_seconds() {
        let mut w = BusyWindow::default();
        let origin = w.origin;
        let at = |ms: u64| origin + Duration::from_millis(ms);
        let (t1, t2, t3) = (at(500), at(3_200), at(11_900));
        w.record(t1, Duration::from_millis(400)); // second 0
        w.record(t2, Duration::from_millis(600)); // second 3
        w.record(t3, Duration::from_millis(900)); // second 11: the current one, not counted yet
        assert!((w.total_seconds() - 1.9).abs() < 1e-9);
        // At 11.9 s the window is seconds 1..=10: only the 0.6 s of second 3.
        assert!((w.ratio(at(11_950)) - 0.06).abs() < 1e-9, "{}", w.ratio(at(11_950)));
        // At 12.0 s the window is seconds 2..=11.
        assert!((w.ratio(at(12_000)) - 0.15).abs() < 1e-9);
        // Long idle: nothing in the window, whatever the ring still holds.
        assert_eq!(w.ratio(at(60_000)), 0.0);
        let m = Metrics::new("base", 8, 1);
        m.update(|s| s.busy = w.clone());
        assert!(m.render().contains("lab_engine_busy_seconds_total{model_name=\"base\"} 1.9"), "{}", m.render());
    }

    #[test]
    fn rate_limited_tenants_past_the_cap_add_up_under_one_label() {
        let m = Metrics::new("base", 8, 1);
        m.update(|s| {
            for i in 0..MAX_TENANT_SERIES + 50 {
                s.count_rate_limited(&format!("t{i}"));
            }
            s.count_rate_limited("t0");
        });
        let text = m.render();
        assert!(text.contains("lab_tenant_rate_limited_total{tenant=\"t0\"} 2"), "{text}");
        assert!(text.contains(&format!("lab_tenant_rate_limited_total{{tenant=\"{OTHER_TENANTS}\"}} 50")));
        assert_eq!(text.matches("lab_tenant_rate_limited_total{").count(), MAX_TENANT_SERIES + 1);
    }
}
