//! `lab loadtest`: CLI flags -> [`LoadtestSettings`] once, run the steps, print and write.

use std::time::Duration;

use anyhow::bail;

use crate::cli::LoadtestArgs;
use crate::datasets::Domain;
use crate::loadtest::{self, schedule, LoadtestSettings, PromptSource};

/// Runs `lab loadtest`.
pub fn run(args: &LoadtestArgs) -> anyhow::Result<()> {
    let s = settings(args)?;
    eprintln!(
        "lab loadtest: {} | {} models | {:?} arrivals | {} s warm-up + {} s per step",
        s.url,
        s.models.len(),
        s.arrival,
        s.warmup_s,
        s.duration_s
    );
    let result = loadtest::run(&s)?;
    let title = format!("lab loadtest: {} models, {:?} arrivals", s.models.len(), s.arrival);
    println!("{}", loadtest::report::table(&result.steps, result.recommended_qps));
    if let Some(dir) = &s.out {
        loadtest::write_outputs(dir, &result, &title)?;
        eprintln!("lab loadtest: wrote {}/{{results.json,results.csv,qps_latency.svg}}", dir.display());
    }
    if let Some(bad) = result.steps.iter().find(|st| st.error_rate() > args.max_error_rate) {
        let first = result.requests.iter().find_map(|r| r.measured.error_detail.clone()).unwrap_or_default();
        bail!(
            "{:.1}% of the requests at {} QPS failed (--max-error-rate {}); first error: {first}",
            100.0 * bad.error_rate(),
            bad.offered_qps,
            args.max_error_rate
        );
    }
    Ok(())
}

fn settings(args: &LoadtestArgs) -> anyhow::Result<LoadtestSettings> {
    if args.concurrency.contains(&0) {
        bail!("--concurrency needs positive client counts, e.g. --concurrency 1,4,16");
    }
    if args.qps.is_empty() || args.qps.iter().any(|q| !(*q > 0.0)) {
        bail!("--qps needs positive rates, e.g. --qps 1,2,4");
    }
    if !(args.duration > 0.0) || args.warmup < 0.0 {
        bail!("--duration must be > 0 and --warmup >= 0 seconds");
    }
    let arrival: schedule::Arrival = args.arrival.parse().map_err(anyhow::Error::msg)?;
    let mix: schedule::Mix = args.mix.parse().map_err(anyhow::Error::msg)?;
    let mut names = Vec::new();
    let mut domains = Vec::new();
    for spec in &args.models {
        let (name, domain) = match spec.split_once('=') {
            Some((n, d)) => {
                (n.to_string(), Some(d.parse::<Domain>().map_err(|e| anyhow::anyhow!("--models {spec}: {e}"))?))
            }
            None => (spec.clone(), None),
        };
        for n in schedule::expand_models(&[name]).map_err(anyhow::Error::msg)? {
            names.push(n);
            domains.push(domain);
        }
    }
    let prompts = match args.input_len {
        Some(n) => {
            if args.validate {
                bail!("--validate needs dataset prompts: drop --input-len");
            }
            PromptSource::Synthetic { input_len: n.max(1), output_len: args.output_len.max(1) }
        }
        None => {
            let list =
                if args.prompts.is_empty() { vec!["A".into(), "B".into(), "C".into()] } else { args.prompts.clone() };
            let domains = list
                .iter()
                .map(|d| d.parse::<Domain>().map_err(|e| anyhow::anyhow!("--prompts {d}: {e}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            PromptSource::Datasets { dir: args.datasets_dir.clone(), domains }
        }
    };
    if args.validate && domains.iter().all(Option::is_none) {
        bail!("--validate needs the domain of the models to score: write --models NAME=A,NAME=B,... (models without one are sent but not scored)");
    }
    let url = args.url.trim_end_matches('/');
    let url = if url.ends_with("/v1") { url.to_string() } else { format!("{url}/v1") };
    Ok(LoadtestSettings {
        url,
        api_key: args.api_key.clone(),
        qps: args.qps.clone(),
        concurrency: args.concurrency.clone(),
        arrival,
        seed: args.seed,
        duration_s: args.duration,
        warmup_s: args.warmup,
        max_in_flight: args.max_in_flight,
        models: names.into_iter().zip(domains).collect(),
        mix,
        prompts,
        max_tokens: args.max_tokens,
        validate: args.validate,
        slo_ms: args.slo,
        until_saturated: args.until_saturated,
        timeout: Duration::from_secs_f64(args.timeout.max(1.0)),
        out: args.out.clone(),
        progress: true,
    })
}
