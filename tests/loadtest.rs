//! `lab loadtest`: no coordinated omission against a stalling server, and end to end against
//! `lab serve`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use axum::routing::post;
use lab::loadtest::schedule::{Arrival, Mix};
use lab::loadtest::{LoadtestSettings, PromptSource};

use crate::serve_util::{temp_dir, Server};

/// A fake OpenAI server that answers at once, except that it freezes from 0.5 s to 2.5 s after
/// its first streamed request (every request arriving then is held until the freeze ends).
fn stalling_server() -> (String, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let first: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |body: String| {
            let first = first.clone();
            async move {
                // The clock starts at the first streamed request: the load tester's synthetic
                // prompt calibration probes (not streamed) come before the step.
                let streamed = body.contains("\"stream\":true");
                let t0 = match streamed {
                    true => *first.lock().unwrap().get_or_insert_with(Instant::now),
                    false => Instant::now() + Duration::from_secs(3600),
                };
                let (from, to) = (t0 + Duration::from_millis(500), t0 + Duration::from_millis(2500));
                let now = Instant::now();
                if now >= from && now < to {
                    tokio::time::sleep_until(to.into()).await;
                }
                let body = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"}}]}\n\n\
                            data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\n\
                            data: [DONE]\n\n";
                ([("content-type", "text/event-stream")], body).into_response()
            }
        }),
    );
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rt)
}

fn settings(url: &str, max_in_flight: usize) -> LoadtestSettings {
    LoadtestSettings {
        url: url.to_string(),
        api_key: None,
        qps: vec![20.0],
        concurrency: vec![],
        arrival: Arrival::Constant,
        seed: 1,
        duration_s: 4.0,
        warmup_s: 0.0,
        max_in_flight,
        models: vec![("m".into(), None)],
        mix: Mix::Uniform,
        prompts: PromptSource::Synthetic { input_len: 4, output_len: 1 },
        max_tokens: 1,
        validate: false,
        slo_ms: None,
        until_saturated: false,
        timeout: Duration::from_secs(30),
        out: None,
        progress: false,
    }
}

#[test]
fn a_two_second_stall_shows_in_every_request_scheduled_during_it() {
    let (url, _rt) = stalling_server();
    let r = lab::loadtest::run(&settings(&url, 1024)).unwrap();
    let reqs = &r.requests;
    assert!(reqs.iter().all(|x| x.measured.ok));
    // Schedule time of the server's first request (constant 20 QPS: the first is at 0.05 s).
    let first = reqs.iter().map(|x| x.scheduled_s).fold(f64::MAX, f64::min);
    let (from, to) = (first + 0.5, first + 2.5);
    let during: Vec<_> = reqs.iter().filter(|x| x.scheduled_s > from + 0.05 && x.scheduled_s < to - 0.05).collect();
    assert!(during.len() >= 35, "{} requests during the stall", during.len());
    for x in &during {
        let stall_left = to - x.scheduled_s;
        assert!(
            x.measured.e2e_s >= stall_left - 0.06,
            "request at {:.2}s measured {:.3}s but the server was frozen {:.3}s more",
            x.scheduled_s,
            x.measured.e2e_s,
            stall_left
        );
    }
    let p99 = r.steps[0].e2e.unwrap().p99_ms;
    assert!(p99 > 1500.0, "the stall must reach the tail: P99 {p99} ms");
    assert_eq!(r.steps[0].in_flight_cap_hits, 0);
}

#[test]
fn a_max_in_flight_cap_is_reported_and_still_timed_from_the_schedule() {
    let (url, _rt) = stalling_server();
    let r = lab::loadtest::run(&settings(&url, 1)).unwrap();
    assert!(r.steps[0].in_flight_cap_hits > 10, "{}", r.steps[0].in_flight_cap_hits);
    // Requests queued behind the cap still carry the stall from their scheduled time.
    assert!(r.steps[0].e2e.unwrap().p99_ms > 1500.0);
}

#[test]
fn loadtest_against_lab_serve_writes_table_json_csv_and_svg() {
    let dir = temp_dir("loadtest-e2e");
    let a = crate::serve_util::tiny_adapter(&dir.join("alpha"), 1);
    let s = Server::tiny(&["--lora-modules", &format!("alpha={}", a.display())]);
    let out = dir.join("results");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(["loadtest", "--url", &s.url, "--qps", "2,4", "--duration", "3", "--warmup", "0.5"])
        .args(["--models", "synthetic:tiny,alpha", "--input-len", "64", "--output-len", "8", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("E2E p50/95/99 ms") && stdout.contains("QPS"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let steps = json["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    for st in steps {
        assert!(st["completed"].as_u64().unwrap() > 0);
        assert_eq!(st["errors"].as_object().unwrap().len(), 0, "{st}");
        // The engine-busy counter read at the window's edges: some work, never more than all.
        let busy = st["busy"].as_f64().unwrap_or(-1.0);
        assert!(busy > 0.0 && busy <= 1.0, "{st}");
    }
    // Calibrated on the server's own tokens (byte-level or BPE): within a word of the target.
    let tokens = json["synthetic_prompt_tokens"].as_u64().unwrap() as i64;
    assert!((tokens - 64).abs() <= 6, "{tokens} prompt tokens for --input-len 64");
    let reqs = json["requests"].as_array().unwrap();
    assert!(reqs.iter().any(|r| r["model"] == "alpha") && reqs.iter().any(|r| r["model"] == "synthetic:tiny"));
    assert!(reqs.iter().all(|r| r["ok"] == true && r["output_tokens"] == 8), "every request streamed 8 tokens");
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3);
    let svg = std::fs::read_to_string(out.join("qps_latency.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("P99"), "{}", &svg[..200.min(svg.len())]);
    // Closed loop: throughput at fixed concurrency.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(["loadtest", "--url", &s.url, "--concurrency", "1,4", "--duration", "1.5", "--warmup", "0.2"])
        .args(["--models", "alpha", "--input-len", "16", "--output-len", "8"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && stdout.contains("c=4") && stdout.contains("closed loop"), "{stdout}");
}

#[test]
fn validate_scores_only_models_declared_with_a_domain() {
    let (url, _rt) = stalling_server();
    let mut s = settings(&url, 1024);
    s.duration_s = 1.0;
    s.models = vec![("base".into(), None), ("sql".into(), Some(lab::datasets::Domain::A))];
    s.mix = Mix::RoundRobin;
    s.prompts = PromptSource::Datasets {
        dir: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets"),
        domains: vec![lab::datasets::Domain::A, lab::datasets::Domain::B],
    };
    s.validate = true;
    let r = lab::loadtest::run(&s).unwrap();
    assert!(r.requests.len() >= 10);
    for q in &r.requests {
        match q.model.as_str() {
            "base" => assert_eq!(q.correct, None, "undeclared models are traffic, not scored"),
            _ => {
                assert_eq!(q.domain.as_deref(), Some("A"), "prompts match the declared domain");
                assert_eq!(q.correct, Some(false), "the fake server's `ok` is not SQL");
            }
        }
    }
    assert_eq!(r.steps[0].accuracy.keys().collect::<Vec<_>>(), vec!["A"]);
}

/// A fake OpenAI server whose every stream stops after one token: no `finish_reason`, no
/// `[DONE]` (a crashed server or a cut proxy looks like this).
fn truncating_server() -> (String, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            let body = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"}}]}\n\n";
            ([("content-type", "text/event-stream")], body).into_response()
        }),
    );
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rt)
}

#[test]
fn a_stream_that_stops_without_finishing_counts_as_an_error() {
    let (url, _rt) = truncating_server();
    let mut s = settings(&url, 1024);
    s.duration_s = 0.5;
    let r = lab::loadtest::run(&s).unwrap();
    assert!(!r.requests.is_empty());
    for q in &r.requests {
        assert!(!q.measured.ok, "a truncated stream is not a success");
        assert_eq!(q.measured.error.as_deref(), Some("truncated"));
    }
}
