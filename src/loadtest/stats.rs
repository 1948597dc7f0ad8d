//! Per-step summaries: latency percentiles from hdrhistogram, rates, errors, accuracy, and the
//! saturation rule.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// P50 / P95 / P99 in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

/// Percentiles of values in seconds, recorded in microseconds with 3 significant digits.
pub fn percentiles(secs: impl IntoIterator<Item = f64>) -> Option<Percentiles> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
    for s in secs {
        h.saturating_record((s * 1e6).round().max(1.0) as u64);
    }
    if h.is_empty() {
        return None;
    }
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1e3;
    Some(Percentiles { p50_ms: q(0.50), p95_ms: q(0.95), p99_ms: q(0.99) })
}

/// One QPS step's row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepSummary {
    /// The nominal rate of the step (closed loop: the achieved rate).
    pub offered_qps: f64,
    /// Closed-loop step: clients sending back to back.
    pub concurrency: Option<usize>,
    /// The rate the drawn schedule offered: the window's arrivals over the span they arrived in.
    pub scheduled_qps: f64,
    pub achieved_qps: f64,
    /// Requests scheduled in the measured window.
    pub sent: usize,
    pub completed: usize,
    pub errors: BTreeMap<String, usize>,
    pub e2e: Option<Percentiles>,
    pub ttft: Option<Percentiles>,
    pub tpot: Option<Percentiles>,
    pub output_tokens_per_s: f64,
    /// Times a request waited for `--max-in-flight` (the test was closed-loop then).
    pub in_flight_cap_hits: usize,
    /// `--validate`: correct / scored per domain letter.
    pub accuracy: BTreeMap<String, (usize, usize)>,
    pub saturated: bool,
    /// The server's busy share over the measured window (`lab_engine_busy_seconds_total`'s
    /// rate; the seed table's "GPU util"), when the server exports it.
    pub busy: Option<f64>,
    /// The same latencies per model (tenant), when the step sent to more than one.
    pub per_model: BTreeMap<String, ModelSummary>,
}

/// One model's share of a step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelSummary {
    pub sent: usize,
    pub completed: usize,
    pub errors: usize,
    pub e2e: Option<Percentiles>,
    pub ttft: Option<Percentiles>,
    pub tpot: Option<Percentiles>,
}

impl StepSummary {
    pub fn error_count(&self) -> usize {
        self.errors.values().sum()
    }

    pub fn error_rate(&self) -> f64 {
        self.error_count() as f64 / self.sent.max(1) as f64
    }
}

/// What the summary needs of one request.
pub struct Sample<'a> {
    pub scheduled_s: f64,
    pub ok: bool,
    pub error: Option<&'a str>,
    pub e2e_s: f64,
    pub ttft_s: Option<f64>,
    pub tpot_s: Option<f64>,
    pub output_tokens: usize,
    pub capped: bool,
    /// `(domain letter, correct)` when validated.
    pub scored: Option<(String, bool)>,
    pub model: &'a str,
}

/// Summarizes the measured window `[0, duration_s)` of a step (warm-up already excluded;
/// times relative to the window start).
pub fn summarize(offered_qps: f64, duration_s: f64, samples: &[Sample]) -> StepSummary {
    let mut s = StepSummary {
        offered_qps,
        scheduled_qps: samples.len() as f64 / duration_s,
        sent: samples.len(),
        ..Default::default()
    };
    let ok: Vec<&Sample> = samples.iter().filter(|x| x.ok).collect();
    s.completed = ok.len();
    for x in samples.iter().filter(|x| !x.ok) {
        *s.errors.entry(x.error.unwrap_or("unknown").to_string()).or_default() += 1;
    }
    // Achieved: the completions' rate over the span they completed in, beside the arrivals'
    // rate over the span they arrived in (`scheduled_qps`). A server that keeps up completes
    // as fast as requests arrive, one latency later; one that falls behind spreads the same
    // completions over a longer span. (Completions over window + tail, as before, read a
    // server that keeps up with 1 s requests in a 15 s step as 7% behind: "saturated".)
    let ends: Vec<f64> = ok.iter().map(|x| x.scheduled_s + x.e2e_s).collect();
    let span = |v: &[f64]| v.iter().copied().fold(f64::MIN, f64::max) - v.iter().copied().fold(f64::MAX, f64::min);
    let rate = |v: &[f64]| {
        if v.len() >= 2 && span(v) > 0.0 {
            (v.len() - 1) as f64 / span(v)
        } else {
            v.len() as f64 / duration_s
        }
    };
    let arrivals: Vec<f64> = samples.iter().map(|x| x.scheduled_s).collect();
    s.scheduled_qps = rate(&arrivals);
    s.achieved_qps = rate(&ends);
    let tokens = ok.iter().map(|x| x.output_tokens).sum::<usize>() as f64;
    s.output_tokens_per_s = if s.completed > 0 { tokens * s.achieved_qps / s.completed as f64 } else { 0.0 };
    s.e2e = percentiles(ok.iter().map(|x| x.e2e_s));
    s.ttft = percentiles(ok.iter().filter_map(|x| x.ttft_s));
    s.tpot = percentiles(ok.iter().filter_map(|x| x.tpot_s));
    s.in_flight_cap_hits = samples.iter().filter(|x| x.capped).count();
    for (d, correct) in samples.iter().filter_map(|x| x.scored.clone()) {
        let e = s.accuracy.entry(d).or_default();
        e.0 += usize::from(correct);
        e.1 += 1;
    }
    let models: std::collections::BTreeSet<&str> = samples.iter().map(|x| x.model).collect();
    if models.len() > 1 {
        for m in models {
            let mine: Vec<&Sample> = samples.iter().filter(|x| x.model == m).collect();
            let ok: Vec<&&Sample> = mine.iter().filter(|x| x.ok).collect();
            let summary = ModelSummary {
                sent: mine.len(),
                completed: ok.len(),
                errors: mine.len() - ok.len(),
                e2e: percentiles(ok.iter().map(|x| x.e2e_s)),
                ttft: percentiles(ok.iter().filter_map(|x| x.ttft_s)),
                tpot: percentiles(ok.iter().filter_map(|x| x.tpot_s)),
            };
            s.per_model.insert(m.to_string(), summary);
        }
    }
    s
}

/// Marks the first saturated step (achieved < 95% of the rate its schedule offered, or P99
/// E2E above `slo_ms`) and returns the recommended limit: 70% of that step's offered QPS.
/// The schedule's own rate is the reference, not the nominal one, so Poisson noise in a short
/// step is not mistaken for saturation.
pub fn mark_saturation(steps: &mut [StepSummary], slo_ms: Option<f64>) -> Option<(usize, f64)> {
    let idx = steps.iter().position(|s| {
        let slow = match (slo_ms, s.e2e) {
            (Some(slo), Some(p)) => p.p99_ms > slo,
            _ => false,
        };
        s.achieved_qps < 0.95 * s.scheduled_qps || slow
    })?;
    steps[idx].saturated = true;
    Some((idx, 0.7 * steps[idx].offered_qps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hdr_percentiles_equal_exact_order_statistics_within_precision() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut v: Vec<f64> = (0..10_000).map(|_| rng.gen_range(0.001..5.0f64).powi(2)).collect();
        let p = percentiles(v.iter().copied()).unwrap();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        // Exact nearest-rank order statistic.
        let exact = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] * 1e3;
        for (got, q) in [(p.p50_ms, 0.5), (p.p95_ms, 0.95), (p.p99_ms, 0.99)] {
            let want = exact(q);
            assert!((got - want).abs() <= want * 1e-3 + 1e-3, "q{q}: hdr {got} ms vs exact {want} ms");
        }
    }

    #[test]
    fn a_server_that_keeps_up_with_long_requests_is_not_behind_and_one_whose_queue_grows_is() {
        let sample = |t: f64, e2e: f64| Sample {
            scheduled_s: t,
            ok: true,
            error: None,
            e2e_s: e2e,
            ttft_s: Some(0.05),
            tpot_s: Some(0.01),
            output_tokens: 128,
            capped: false,
            scored: None,
            model: "m",
        };
        // 5 QPS for 15 s, every request 1.2 s: keeps up (the old rate read 93% of the offer).
        let steady: Vec<Sample> = (0..75).map(|i| sample(i as f64 * 0.2, 1.2)).collect();
        let s = summarize(5.0, 15.0, &steady);
        assert!((s.achieved_qps / s.scheduled_qps - 1.0).abs() < 1e-9, "{} vs {}", s.achieved_qps, s.scheduled_qps);
        // The same arrivals served 4 a second: the queue grows, completions spread out.
        let behind: Vec<Sample> = (0..75).map(|i| sample(i as f64 * 0.2, 1.2 + i as f64 * (0.25 - 0.2))).collect();
        let b = summarize(5.0, 15.0, &behind);
        assert!((b.achieved_qps - 4.0).abs() < 1e-9 && b.achieved_qps < 0.95 * b.scheduled_qps, "{}", b.achieved_qps);
    }

    #[test]
    fn saturation_is_the_first_step_that_falls_behind_or_breaks_the_slo() {
        let step = |offered: f64, achieved: f64, p99: f64| StepSummary {
            offered_qps: offered,
            scheduled_qps: offered,
            achieved_qps: achieved,
            e2e: Some(Percentiles { p50_ms: 1.0, p95_ms: 1.0, p99_ms: p99 }),
            ..Default::default()
        };
        let mut steps = vec![step(1.0, 1.0, 100.0), step(2.0, 1.98, 300.0), step(4.0, 3.0, 900.0)];
        assert_eq!(mark_saturation(&mut steps, None), Some((2, 2.8)));
        assert!(steps[2].saturated && !steps[1].saturated);
        let mut steps = vec![step(1.0, 1.0, 100.0), step(2.0, 1.98, 300.0)];
        assert_eq!(mark_saturation(&mut steps, Some(250.0)).map(|x| x.0), Some(1));
        let mut steps = vec![step(1.0, 1.0, 100.0)];
        assert_eq!(mark_saturation(&mut steps, None), None);
    }
}
