//! `lab serve` end to end over real HTTP on loopback, with the tiny synthetic model.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::serve_util::*;

const BASE: &str = "synthetic:tiny";

#[test]
fn chat_and_completions_streamed_or_not_with_usage_and_stop_strings() {
    let s = Server::tiny(&[]);
    let (text, finish) = s.chat(BASE, "Tell me a story", 24);
    assert_eq!(finish, "length");
    assert!(!text.is_empty());
    // Streaming gives the same text, starts with the role, ends with [DONE], and reports usage.
    let mut body = chat_body(BASE, "Tell me a story", 24);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (streamed, sfinish, events) = s.chat_stream(&body);
    assert_eq!(streamed, text);
    assert_eq!(sfinish, "length");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 24);
    // Usage of the non-streamed request.
    let (_, v) = s.post("/v1/chat/completions", &chat_body(BASE, "Tell me a story", 24));
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 24);
    assert!(u["prompt_tokens"].as_u64().unwrap() > 5);
    assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + 24);
    // A stop string cuts the output before it, with finish_reason "stop".
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "{text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = text.find(&stop).unwrap();
    let mut body = chat_body(BASE, "Tell me a story", 24);
    body["stop"] = json!([stop.clone()]);
    let (_, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(v["choices"][0]["message"]["content"], text[..cut]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Completions: raw prompt, same text streamed and not.
    let cbody = json!({"model": BASE, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (status, v) = s.post("/v1/completions", &cbody);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    let mut sbody = cbody.clone();
    sbody["stream"] = json!(true);
    let resp = client().post(format!("{}/v1/completions", s.url)).json(&sbody).send().unwrap();
    let mut streamed = String::new();
    for line in BufReader::new(resp).lines().map_while(Result::ok) {
        match line.strip_prefix("data: ") {
            Some("[DONE]") => break,
            Some(d) => {
                streamed.push_str(serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap())
            }
            None => {}
        }
    }
    assert_eq!(streamed, full);
}

#[test]
fn models_lora_runtime_updates_and_path_refusals() {
    let dir = temp_dir("serve-lora");
    let root = dir.join("allowed");
    std::fs::create_dir_all(&root).unwrap();
    let a = tiny_adapter(&root.join("alpha"), 1);
    let outside = tiny_adapter(&dir.join("outside"), 2);
    std::os::unix::fs::symlink(&outside, root.join("sneaky")).unwrap();
    let s = Server::tiny(&[
        "--lora-modules",
        &format!("alpha={}", a.display()),
        "--enable-lora-runtime-updates",
        "--allowed-lora-dirs",
        root.to_str().unwrap(),
    ]);
    let models: Value = serde_json::from_str(&s.get_text("/v1/models")).unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![BASE, "alpha"]);
    assert_eq!(models["data"][1]["parent"], BASE);
    let base = s.chat(BASE, "hello there", 16).0;
    assert_ne!(s.chat("alpha", "hello there", 16).0, base, "the adapter changes the output");
    // Refusals: outside the roots, through `..`, through a symlink, a missing dir.
    for path in [
        outside.display().to_string(),
        format!("{}/../outside", root.display()),
        root.join("sneaky").display().to_string(),
        root.join("missing").display().to_string(),
    ] {
        let (status, v) = s.post("/v1/load_lora_adapter", &json!({"lora_name": "beta", "lora_path": path}));
        assert_eq!(status, 400, "{path}: {v}");
        assert_eq!(v["error"]["param"], "lora_path", "{v}");
    }
    // A folder inside the root whose weights file is a symlink to a file outside.
    let linked = root.join("linked");
    std::fs::create_dir_all(&linked).unwrap();
    std::fs::copy(outside.join("adapter_config.json"), linked.join("adapter_config.json")).unwrap();
    std::os::unix::fs::symlink(outside.join("adapter_model.safetensors"), linked.join("adapter_model.safetensors"))
        .unwrap();
    let (status, v) = s.post("/v1/load_lora_adapter", &json!({"lora_name": "linked", "lora_path": linked}));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("adapter_model.safetensors"), "{v}");
    // Names that would corrupt metric labels or logs.
    for bad in ["a,b", "quote\"d", "", &"x".repeat(129)] {
        let (status, v) = s.post("/v1/load_lora_adapter", &json!({"lora_name": bad, "lora_path": a}));
        assert_eq!(status, 400, "{bad}: {v}");
        assert_eq!(v["error"]["param"], "lora_name", "{v}");
    }
    // Load at run time, use it, unload it.
    let b = tiny_adapter(&root.join("beta"), 3);
    let (status, v) = s.post("/v1/load_lora_adapter", &json!({"lora_name": "beta", "lora_path": b}));
    assert_eq!(status, 200, "{v}");
    let (status, _) = s.post("/v1/load_lora_adapter", &json!({"lora_name": "beta", "lora_path": b}));
    assert_eq!(status, 400, "a second load of the same name without load_inplace is refused");
    let beta = s.chat("beta", "hello there", 16).0;
    assert_ne!(beta, base);
    let models: Value = serde_json::from_str(&s.get_text("/v1/models")).unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 3);
    let (status, _) = s.post("/v1/unload_lora_adapter", &json!({"lora_name": "beta"}));
    assert_eq!(status, 200);
    let (status, v) = s.post("/v1/chat/completions", &chat_body("beta", "hello", 4));
    assert_eq!(status, 404, "{v}");
    let (status, _) = s.post("/v1/unload_lora_adapter", &json!({"lora_name": "beta"}));
    assert_eq!(status, 404);
    // Without --enable-lora-runtime-updates the routes refuse.
    let plain = Server::tiny(&[]);
    let (status, v) = plain.post("/v1/load_lora_adapter", &json!({"lora_name": "beta", "lora_path": b}));
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("--enable-lora-runtime-updates"));
}

#[test]
fn metrics_use_the_vllm_names_and_count_requests() {
    let dir = temp_dir("serve-metrics");
    let a = tiny_adapter(&dir.join("alpha"), 1);
    let s = Server::tiny(&["--lora-modules", &format!("alpha={}", a.display())]);
    s.chat(BASE, "hi", 5);
    s.chat("alpha", "hi", 7);
    let text = s.get_text("/metrics");
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:time_per_output_token_seconds_sum",
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
        "vllm:request_success_total",
        "lab_kv_free_blocks",
        "lab_adapter_requests_total{adapter=\"alpha\"} 1",
        "lab_adapter_generation_tokens_total{adapter=\"alpha\"} 7",
        "lab_adapter_loads_total",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert_eq!(s.metric("vllm:generation_tokens_total"), 12.0);
    assert_eq!(s.metric("vllm:e2e_request_latency_seconds_count"), 2.0);
    assert_eq!(s.metric("lab_adapter_loads_total"), 1.0);
    // vllm:lora_requests_info's value is when the engine last updated it, not the scrape
    // time: an idle (or wedged) engine's series does not look fresher on every scrape.
    let info = |s: &Server| s.metric("vllm:lora_requests_info");
    let first = info(&s);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(info(&s), first, "idle engine: same timestamp");
    s.chat(BASE, "one more", 2);
    assert!(info(&s) > first, "a step refreshes it");
}

#[test]
fn bad_requests_get_openai_errors_with_the_right_status() {
    let s = Server::tiny(&["--max-model-len", "64", "--max-body-bytes", "2000"]);
    let cases = [
        (
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "temperature": 5}),
            400,
            Some("temperature"),
        ),
        (json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}), 400, Some("top_p")),
        (json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "n": 2}), 400, Some("n")),
        (json!({"model": BASE, "messages": []}), 400, Some("messages")),
        (json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}), 404, Some("model")),
        (json!({"model": BASE, "messages": [{"role": "user", "content": "word ".repeat(100)}]}), 400, Some("messages")),
        (
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60}),
            400,
            Some("max_tokens"),
        ),
        // u64::MAX: `prompt + max_tokens` must not wrap past the context check.
        (
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": u64::MAX}),
            400,
            Some("max_tokens"),
        ),
        // Stop matching runs per token on the engine thread: bounded count and length.
        (
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "stop": vec!["x"; 17]}),
            400,
            Some("stop"),
        ),
        (
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "stop": "y".repeat(257)}),
            400,
            Some("stop"),
        ),
        // Not implemented: refused by name, never silently ignored.
        (
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "logprobs": true}),
            400,
            Some("logprobs"),
        ),
        (
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}),
            400,
            Some("presence_penalty"),
        ),
        (
            json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
            400,
            Some("tools"),
        ),
        (json!({"model": BASE, "messages": "not a list"}), 400, None),
        (json!({"model": BASE, "messages": [{"role": "user", "content": "x".repeat(3000)}]}), 413, None),
    ];
    for (body, status, param) in cases {
        let (got, v) = s.post("/v1/chat/completions", &body);
        assert_eq!(got, status, "{body}: {v}");
        let err = &v["error"];
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(err["type"].is_string(), "{v}");
        if let Some(p) = param {
            assert_eq!(err["param"], p, "{v}");
        }
    }
    let (_, v) = s.post(
        "/v1/chat/completions",
        &json!({"model": BASE, "messages": [{"role": "user", "content": "word ".repeat(100)}]}),
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("maximum context length is 64"), "{v}");
    // The "off" values of unimplemented parameters, and fields with no sampling meaning, pass.
    let mut body = chat_body(BASE, "hi", 2);
    for (k, v) in [
        ("logprobs", json!(false)),
        ("presence_penalty", json!(0)),
        ("frequency_penalty", json!(0.0)),
        ("tool_choice", json!("none")),
        ("response_format", json!({"type": "text"})),
        ("user", json!("tenant-7")),
    ] {
        body[k] = v;
    }
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    // Bearer auth.
    let auth = Server::tiny(&["--api-key", "sekrit"]);
    let (status, v) = auth.post("/v1/chat/completions", &chat_body(BASE, "hi", 2));
    assert_eq!(status, 401, "{v}");
    let ok = client()
        .post(format!("{}/v1/chat/completions", auth.url))
        .bearer_auth("sekrit")
        .json(&chat_body(BASE, "hi", 2))
        .send()
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    // A full queue answers 503 with Retry-After.
    let full = Server::tiny(&["--max-waiting", "0"]);
    let resp =
        client().post(format!("{}/v1/chat/completions", full.url)).json(&chat_body(BASE, "hi", 2)).send().unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().get("retry-after").is_some());
}

/// Greedy outputs of `(model, prompt)` requests, all sent at once from threads.
fn concurrent_chats(s: &Server, reqs: &[(String, String)], max_tokens: usize) -> Vec<String> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = reqs.iter().map(|(m, p)| scope.spawn(move || s.chat(m, p, max_tokens).0)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn sixty_four_concurrent_requests_over_eight_adapters_equal_each_alone() {
    let dir = temp_dir("serve-invariance");
    let mut args: Vec<String> = vec!["--max-loras".into(), "8".into(), "--lora-modules".into()];
    for i in 0..8 {
        args.push(format!("ad{i}={}", tiny_adapter(&dir.join(format!("ad{i}")), 10 + i).display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = Server::tiny(&args);
    let reqs: Vec<(String, String)> = (0..64)
        .map(|i| {
            let model = if i % 9 == 8 { BASE.to_string() } else { format!("ad{}", i % 9) };
            (model, format!("Request number {i}: write something {}", "long ".repeat(i % 7)))
        })
        .collect();
    let alone: Vec<String> = reqs.iter().map(|(m, p)| s.chat(m, p, 16).0).collect();
    let together = concurrent_chats(&s, &reqs, 16);
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i} ({}) differs when batched", reqs[i].0);
    }
    let distinct: std::collections::HashSet<&String> = alone.iter().collect();
    assert!(distinct.len() > 32, "outputs should differ across adapters/prompts");
}

#[test]
fn reloading_an_adapter_under_traffic_never_changes_an_in_flight_response() {
    let dir = temp_dir("serve-hotswap");
    let root = dir.join("adapters");
    let v1 = tiny_adapter(&root.join("x-v1"), 100);
    let v2 = tiny_adapter(&root.join("x-v2"), 200);
    let y = tiny_adapter(&root.join("y"), 300);
    let s = Server::tiny(&[
        "--lora-modules",
        &format!("x={}", v1.display()),
        &format!("y={}", y.display()),
        "--enable-lora-runtime-updates",
        "--allowed-lora-dirs",
        root.to_str().unwrap(),
        "--max-loras",
        "2",
    ]);
    let n_tokens = 400;
    let prompt = "Stream a long answer";
    let mut body = chat_body("x", prompt, n_tokens);
    body["stream"] = json!(true);
    let expect_v1 = s.chat("x", prompt, n_tokens).0;
    let (reloaded_tx, reloaded_rx) = std::sync::mpsc::channel::<Instant>();
    let results = std::thread::scope(|scope| {
        let streams: Vec<_> = (0..6).map(|_| scope.spawn(|| (s.chat_stream(&body), Instant::now()))).collect();
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            let (st, v) =
                s.post("/v1/load_lora_adapter", &json!({"lora_name": "x", "lora_path": v2, "load_inplace": true}));
            assert_eq!(st, 200, "{v}");
            reloaded_tx.send(Instant::now()).unwrap();
            let (st, _) = s.post("/v1/unload_lora_adapter", &json!({"lora_name": "y"}));
            assert_eq!(st, 200);
            let (st, _) = s.post("/v1/load_lora_adapter", &json!({"lora_name": "y", "lora_path": y}));
            assert_eq!(st, 200);
        });
        streams.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    let reloaded_at = reloaded_rx.recv().unwrap();
    let mut in_flight = 0;
    for ((text, finish, _), done_at) in &results {
        assert_eq!(finish, "length");
        assert_eq!(text, &expect_v1, "an in-flight response changed");
        in_flight += usize::from(*done_at > reloaded_at);
    }
    assert!(in_flight > 0, "the reload happened after every stream ended: the test proved nothing");
    let after = s.chat("x", prompt, n_tokens).0;
    assert_ne!(after, expect_v1, "new requests use the new weights");
    let fresh = Server::tiny(&["--lora-modules", &format!("x={}", v2.display())]);
    assert_eq!(after, fresh.chat("x", prompt, n_tokens).0);
}

/// Latencies (s) of `n` requests over `adapters` adapters sent at a fixed rate; panics on any failure.
/// Output tokens of each spread-traffic request: enough that requests overlap and the server
/// is busy (an idle server makes any wait for a slot look large next to a bare request).
const TOKENS: usize = 48;

fn spread_traffic(s: &Server, adapters: usize, n: usize, gap: Duration) -> Vec<f64> {
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for i in 0..n {
            std::thread::sleep(gap);
            let model = format!("c{:02}", (i * 7) % adapters);
            handles.push(scope.spawn(move || {
                let t0 = Instant::now();
                let (status, v) =
                    s.post("/v1/chat/completions", &chat_body(&model, &format!("customer request {i}"), TOKENS));
                assert_eq!(status, 200, "{model}: {v}");
                t0.elapsed().as_secs_f64()
            }));
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn twenty_four_adapters_on_four_slots_all_complete_within_3x_of_24_slots() {
    let dir = temp_dir("serve-slots");
    let mut modules = Vec::new();
    for i in 0..24 {
        modules.push(format!("c{i:02}={}", tiny_adapter(&dir.join(format!("c{i:02}")), 500 + i as u64).display()));
    }
    let run = |slots: &str| {
        let mut args = vec!["--max-loras", slots, "--max-cpu-loras", "24", "--lora-modules"];
        args.extend(modules.iter().map(String::as_str));
        let s = Server::tiny(&args);
        let mut lat = spread_traffic(&s, 24, 144, Duration::from_millis(5));
        let evictions = s.metric("lab_adapter_evictions_total");
        (quantile(&mut lat, 0.99), quantile(&mut lat, 0.5), evictions)
    };
    let (p99_4, p50_4, ev4) = run("4");
    let (p99_24, p50_24, ev24) = run("24");
    eprintln!(
        "24 adapters, 144 requests: --max-loras 4: P50 {:.1} ms P99 {:.1} ms ({ev4} evictions); --max-loras 24: P50 {:.1} ms P99 {:.1} ms ({ev24} evictions)",
        p50_4 * 1e3, p99_4 * 1e3, p50_24 * 1e3, p99_24 * 1e3
    );
    assert!(ev4 > 0.0, "4 slots for 24 adapters must evict");
    assert!(p99_4 <= 3.0 * p99_24, "P99 {p99_4:.3}s on 4 slots vs {p99_24:.3}s on 24");
}

#[test]
fn dropped_streams_give_their_kv_blocks_back() {
    let s = Server::tiny(&[]);
    let total = s.metric("lab_kv_total_blocks");
    assert_eq!(s.metric("lab_kv_free_blocks"), total);
    let mut body = chat_body(BASE, "Stream until I hang up", 1800);
    body["stream"] = json!(true);
    let mut readers: Vec<_> = (0..16)
        .map(|_| {
            let resp = client().post(format!("{}/v1/chat/completions", s.url)).json(&body).send().unwrap();
            BufReader::new(resp)
        })
        .collect();
    for r in readers.iter_mut() {
        let mut line = String::new();
        for _ in 0..6 {
            line.clear();
            r.read_line(&mut line).unwrap();
        }
    }
    assert!(s.metric("lab_kv_free_blocks") < total, "the streams hold blocks");
    assert!(s.metric("vllm:num_requests_running") > 0.0);
    drop(readers);
    assert!(
        wait_until(20, || s.metric("lab_kv_free_blocks") == total && s.metric("vllm:num_requests_running") == 0.0),
        "blocks not returned: {} of {total} free",
        s.metric("lab_kv_free_blocks")
    );
    let text = s.get_text("/metrics");
    assert!(text.contains("finished_reason=\"abort\"} 16"), "{text}");
}

#[test]
fn the_openai_python_client_drives_the_server() {
    let script = crate::util::fixture("openai_client_check.py");
    let have = std::process::Command::new("python3").args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    if !have {
        assert!(std::env::var_os("CI").is_none(), "CI must install the openai package (pip install openai)");
        eprintln!("skipped: python3 -m pip install openai to run this test");
        return;
    }
    let dir = temp_dir("serve-openai");
    let a = tiny_adapter(&dir.join("alpha"), 1);
    let s = Server::tiny(&["--lora-modules", &format!("alpha={}", a.display())]);
    let out = std::process::Command::new("python3").arg(&script).arg(format!("{}/v1", s.url)).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("openai client: all checks passed"), "{stdout}");
}

#[test]
fn running_out_of_kv_blocks_preempts_and_recomputes_without_changing_outputs() {
    // 8 KiB blocks for the tiny model: 256 KiB = 32 blocks = 512 positions, for 8 requests of
    // ~100 positions each.
    let s = Server::tiny(&["--kv-cache-memory", "256KiB", "--max-model-len", "256"]);
    let reqs: Vec<(String, String)> =
        (0..8).map(|i| (BASE.to_string(), format!("Preemption test {i}: {}", "go on ".repeat(i)))).collect();
    let alone: Vec<String> = reqs.iter().map(|(m, p)| s.chat(m, p, 70).0).collect();
    assert_eq!(s.metric("vllm:num_preemptions_total"), 0.0);
    let together = concurrent_chats(&s, &reqs, 70);
    assert!(s.metric("vllm:num_preemptions_total") > 0.0, "the pool was meant to run out");
    assert_eq!(alone, together);
    assert!(wait_until(10, || s.metric("lab_kv_free_blocks") == s.metric("lab_kv_total_blocks")));
}

#[test]
fn sigterm_stops_accepting_and_lets_in_flight_streams_finish() {
    let mut s = Server::tiny(&["--shutdown-timeout", "30"]);
    let mut body = chat_body(BASE, "A long goodbye", 600);
    body["stream"] = json!(true);
    let ((text, finish, _), done_at, term_at) = std::thread::scope(|scope| {
        let stream = scope.spawn(|| (s.chat_stream(&body), Instant::now()));
        std::thread::sleep(Duration::from_millis(150));
        s.sigterm();
        let term_at = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
        let refused = client().post(format!("{}/v1/chat/completions", s.url)).json(&chat_body(BASE, "hi", 2)).send();
        assert!(refused.is_err(), "a new connection after SIGTERM must be refused");
        let (r, done_at) = stream.join().unwrap();
        (r, done_at, term_at)
    });
    assert!(done_at > term_at, "the stream ended before SIGTERM: the test proved nothing");
    assert_eq!(finish, "length", "the in-flight stream ran to its end");
    assert!(!text.is_empty());
    assert_eq!(s.wait_exit(20), Some(0), "the server exits once in-flight work is done");
    assert!(s.log.lock().unwrap().iter().any(|l| l.contains("shutting down")));
}

/// When `--shutdown-timeout` expires, streams still running end with an error event and
/// `[DONE]` (not a silent cut) and the process exits non-zero (it exited 0, looking clean).
#[test]
fn an_expired_shutdown_timeout_ends_streams_with_an_error_and_exits_non_zero() {
    let mut s = Server::tiny(&["--shutdown-timeout", "0"]);
    let mut body = chat_body(BASE, "A very long goodbye", 2000);
    body["stream"] = json!(true);
    let (text, finish, events) = std::thread::scope(|scope| {
        let stream = scope.spawn(|| s.chat_stream(&body));
        std::thread::sleep(Duration::from_millis(150));
        s.sigterm();
        stream.join().unwrap()
    });
    assert!(!text.is_empty(), "the stream was running");
    assert_ne!(finish, "length", "it was cut, not finished");
    let n = events.len();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{:?}", &events[n.saturating_sub(3)..]);
    let err: Value = serde_json::from_str(&events[n - 2]).unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("shutdown-timeout"), "{err}");
    let code = s.wait_exit(20);
    assert!(code.is_some_and(|c| c != 0), "a forced shutdown is not a clean exit: {code:?}");
}

/// A request with a temperature or nucleus too small for floating point (`1e-39`, `1e-300`)
/// samples greedily, as vLLM does below 1e-5, and its neighbours in the batch are untouched
/// (before: `logits / 1e-39` overflowed, the sampling error failed every running request).
#[test]
fn vanishing_temperature_or_top_p_is_greedy_and_hurts_no_neighbour() {
    let s = &Server::tiny(&[]);
    let prompt = "Tell me about tiny numbers";
    let greedy = s.chat(BASE, prompt, 12).0;
    std::thread::scope(|scope| {
        let neighbours: Vec<_> = (0..4)
            .map(|i| {
                let mut body = chat_body(BASE, &format!("stream {i}"), 24);
                body["stream"] = json!(true);
                scope.spawn(move || s.chat_stream(&body))
            })
            .collect();
        for poison in [json!({"temperature": 1e-39}), json!({"temperature": 1.0, "top_p": 1e-300})] {
            let mut body = chat_body(BASE, prompt, 12);
            body.as_object_mut().unwrap().extend(poison.as_object().unwrap().clone());
            let (status, v) = s.post("/v1/chat/completions", &body);
            assert_eq!(status, 200, "{poison}: {v}");
            assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), greedy, "{poison} is greedy");
        }
        for h in neighbours {
            let (_, finish, events) = h.join().unwrap();
            assert_eq!(finish, "length");
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        }
    });
}

/// One broken folder under `--lora-dir` is skipped with a warning; the server starts and
/// serves the good ones.
#[test]
fn a_bad_folder_under_lora_dir_is_skipped_not_fatal() {
    let dir = temp_dir("serve-lora-dir");
    tiny_adapter(&dir.join("good"), 5);
    let bad = dir.join("broken");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("adapter_config.json"), "{ not json").unwrap();
    std::fs::write(bad.join("adapter_model.safetensors"), "nope").unwrap();
    let s = Server::tiny(&["--lora-dir", dir.to_str().unwrap()]);
    let models: Value = serde_json::from_str(&s.get_text("/v1/models")).unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![BASE, "good"]);
    assert_eq!(s.chat("good", "hi", 4).1, "length");
}

/// `--max-waiting N` is exact under a burst: with one running slot busy on a long request, of
/// 20 requests sent at once at most N (+1 for the one that may be admitted meanwhile) are
/// accepted and the rest get 503 + Retry-After (the limit read a gauge one engine step stale,
/// so a burst passed it whole).
#[test]
fn max_waiting_holds_exactly_under_a_burst() {
    let s = &Server::tiny(&["--max-waiting", "4", "--max-num-seqs", "1"]);
    let mut long = chat_body(BASE, "keep the slot busy", 1500);
    long["stream"] = json!(true);
    std::thread::scope(|scope| {
        let busy = scope.spawn(|| s.chat_stream(&long));
        std::thread::sleep(Duration::from_millis(100));
        let results: Vec<u16> = (0..20)
            .map(|i| scope.spawn(move || s.post("/v1/chat/completions", &chat_body(BASE, &format!("burst {i}"), 2)).0))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let accepted = results.iter().filter(|&&c| c == 200).count();
        let refused = results.iter().filter(|&&c| c == 503).count();
        assert_eq!(accepted + refused, 20, "{results:?}");
        assert!((1..=5).contains(&accepted), "accepted {accepted} of a burst of 20 with --max-waiting 4: {results:?}");
        let (_, finish, _) = busy.join().unwrap();
        assert_eq!(finish, "length");
    });
}
