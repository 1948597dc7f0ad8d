//! `lab serve` when an adapter or a request is bad: what the others and the metrics see.
//! Real HTTP on loopback, tiny model.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::serve_util::*;

const BASE: &str = "synthetic:tiny";

/// Overwrites an adapter's weights with bytes that are not safetensors.
fn corrupt(dir: &Path) {
    std::fs::write(dir.join("adapter_model.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}").unwrap();
}

/// Requests that fail on their adapter's load leave nothing counted as waiting: the gauge
/// reads 0 once they are answered and `--max-waiting` still admits others (each failure
/// leaked one place in the queue count, so after `--max-waiting` of them every request got
/// 503 for ever).
#[test]
fn failed_adapter_loads_do_not_leak_waiting_places() {
    let dir = temp_dir("faults-leak");
    let a = tiny_adapter(&dir.join("flaky"), 1);
    let s = Server::tiny(&["--lora-modules", &format!("flaky={}", a.display()), "--max-waiting", "2"]);
    corrupt(&a); // after the start-up check, before the first (lazy) load
    for _ in 0..3 {
        let (status, v) = s.post("/v1/chat/completions", &chat_body("flaky", "hi", 4));
        assert_eq!(status, 400, "{v}");
    }
    assert!(wait_until(5, || s.metric("vllm:num_requests_waiting") == 0.0), "{}", s.get_text("/metrics"));
    assert_eq!(s.chat(BASE, "still admitted", 4).1, "length");
}

/// An unloaded adapter's per-adapter series leave `/metrics` (they stayed for ever, so a
/// server that cycles through many adapters grew its scrape without bound).
#[test]
fn an_unloaded_adapters_series_leave_the_metrics() {
    let dir = temp_dir("faults-unload-metrics");
    let b = tiny_adapter(&dir.join("beta"), 2);
    let s = Server::tiny(&["--enable-lora-runtime-updates", "--allowed-lora-dirs", dir.to_str().unwrap()]);
    let (status, v) = s.post("/v1/load_lora_adapter", &json!({"lora_name": "beta", "lora_path": b}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(s.chat("beta", "hello", 4).1, "length");
    assert_eq!(s.chat(BASE, "hello", 4).1, "length");
    let series = "lab_adapter_requests_total{adapter=\"beta\"}";
    assert!(s.get_text("/metrics").contains(series));
    let (status, v) = s.post("/v1/unload_lora_adapter", &json!({"lora_name": "beta"}));
    assert_eq!(status, 200, "{v}");
    assert!(wait_until(5, || !s.get_text("/metrics").contains(series)), "{}", s.get_text("/metrics"));
    assert!(s.get_text("/metrics").contains(&format!("lab_adapter_requests_total{{adapter=\"{BASE}\"}}")));
}

fn model_ids(s: &Server) -> Vec<String> {
    let v: Value = serde_json::from_str(&s.get_text("/v1/models")).unwrap();
    v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()
}

/// An adapter whose files turn corrupt gets a 400 naming the adapter and the cause (it was a
/// 503 "overloaded", which clients retry for ever), leaves `/v1/models`, and is not failed
/// for ever: once its files are fixed, a request after the retry interval loads it again.
#[test]
fn a_corrupt_adapter_is_a_400_naming_the_cause_until_its_files_are_fixed() {
    let dir = temp_dir("faults-corrupt");
    let a = tiny_adapter(&dir.join("flaky"), 3);
    let s = Server::tiny(&["--lora-modules", &format!("flaky={}", a.display())]);
    let good = s.chat(BASE, "hello there", 8).0;
    corrupt(&a);
    let check = |e: &Value| {
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains("flaky") && msg.contains("header"), "names the adapter and the cause: {msg}");
        assert_eq!(e["error"]["param"], "model", "{e}");
        assert_eq!(e["error"]["code"], "adapter_load_failed", "{e}");
    };
    let (status, v) = s.post("/v1/chat/completions", &chat_body("flaky", "hello there", 8));
    assert_eq!(status, 400, "{v}");
    check(&v);
    // Streamed: the status is sent before the engine runs it, so the error is the last event.
    let mut body = chat_body("flaky", "hello there", 8);
    body["stream"] = json!(true);
    let (_, _, events) = s.chat_stream(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    check(&serde_json::from_str(&events[events.len() - 2]).unwrap());
    assert_eq!(model_ids(&s), vec![BASE.to_string()], "a corrupt adapter is not listed");
    assert_eq!(s.chat(BASE, "hello there", 8).0, good, "the base model is untouched");
    tiny_adapter(&a, 3); // fixed
    let t0 = std::time::Instant::now();
    assert!(
        wait_until(15, || s.post("/v1/chat/completions", &chat_body("flaky", "hello there", 8)).0 == 200),
        "a fixed adapter serves again"
    );
    assert!(t0.elapsed() >= Duration::from_secs(3), "retried at most every 5 s, not on every request");
    assert_eq!(model_ids(&s), vec![BASE.to_string(), "flaky".to_string()]);
}

/// A tiny adapter whose MLP factors are all at the load bound (1e4) with scale 1000 (its
/// attention factors 0): it loads, every value finite and within the bounds, and overflows f32
/// in its first forward (gate * up ~ 1e24, then down ~ 1e38 * S^2, S the sum of a normed
/// hidden state), so a row on it has non-finite logits and cannot be sampled.
pub fn overflowing_adapter(dir: &Path) -> std::path::PathBuf {
    let a = tiny_adapter(dir, 21);
    crate::util::edit_tensors(&a, |t| {
        for (k, w) in t.iter_mut() {
            let v = if k.contains(".mlp.") { 1e4 } else { 0.0 };
            *w = (w.ones_like().unwrap() * v).unwrap();
        }
    });
    crate::util::edit_config(&a, |v| v["lora_alpha"] = json!(8000.0)); // r = 8: scale 1000
    a
}

/// 4 greedy streams on the base model, with `poison` run meanwhile; their texts and finish
/// reasons, and whether `poison` was over before the first of them ended.
fn four_streams(s: &Server, poison: impl FnOnce()) -> (Vec<(String, String)>, bool) {
    std::thread::scope(|scope| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let mut b = chat_body(BASE, &format!("neighbour {i}"), 1000);
                b["stream"] = json!(true);
                scope.spawn(move || (s.chat_stream(&b), std::time::Instant::now()))
            })
            .collect();
        assert!(wait_until(60, || s.metric("vllm:num_requests_running") >= 4.0), "the 4 are running");
        poison();
        let poisoned = std::time::Instant::now();
        let mut overlapped = true;
        let outs = hs
            .into_iter()
            .map(|h| {
                let ((text, finish, events), ended) = h.join().unwrap();
                assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
                overlapped &= poisoned < ended;
                (text, finish)
            })
            .collect();
        (outs, overlapped)
    })
}

/// An adapter that loads but overflows at run time: its request (sampled, temperature 1) gets
/// a one-line 500 while 4 neighbours finish with the text they have without it, and /health
/// stays 200 (the row's failure panicked the engine thread: the step indexed the ended row).
#[test]
fn a_request_whose_logits_overflow_at_run_time_fails_alone() {
    let dir = temp_dir("faults-overflow");
    let a = overflowing_adapter(&dir.join("overflow"));
    let s = &Server::tiny(&["--lora-modules", &format!("overflow={}", a.display())]);
    let (clean, _) = four_streams(s, || {});
    let (poisoned, overlapped) = four_streams(s, || {
        for _ in 0..3 {
            let mut body = chat_body("overflow", "hello", 8);
            body["temperature"] = json!(1.0);
            let (status, v) = s.post("/v1/chat/completions", &body);
            assert_eq!(status, 500, "{v}");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains("sampling failed for this request") && !msg.contains('\n'), "{msg}");
        }
    });
    assert_eq!(clean, poisoned, "the neighbours' text changed");
    assert!(overlapped, "the poison must be answered while the 4 still run (make them longer)");
    assert_eq!(client().get(format!("{}/health", s.url)).send().unwrap().status().as_u16(), 200);
    assert_eq!(s.chat(BASE, "neighbour 0", 4).1, "length", "the server answers normally afterwards");
}

/// With the fault hook `LAB_FAULT_PANIC_ON_MODEL=boom`, a request for `boom` panics the engine
/// thread: a stream running meanwhile gets an error event and `[DONE]`, the `boom` request a
/// 503 saying so, `/health` answers 503, and the process exits with code 70 (the requests
/// used to hang until the exit cut their connections).
#[test]
fn when_the_engine_thread_dies_every_request_is_answered_and_the_process_exits_70() {
    let dir = temp_dir("faults-death");
    let a = tiny_adapter(&dir.join("boom"), 5);
    let boom = format!("boom={}", a.display());
    let mut s = Server::start_after(
        "export LAB_FAULT_PANIC_ON_MODEL=boom",
        &["serve", "--model", "synthetic:tiny", "--port", "0", "--kv-cache-memory", "64MiB", "--lora-modules", &boom],
    );
    let health = std::sync::Mutex::new(Vec::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sr = &s;
        let stream = scope.spawn(move || {
            let mut b = chat_body(BASE, "a long answer", 1500);
            b["stream"] = json!(true);
            sr.chat_stream(&b).2
        });
        assert!(wait_until(60, || sr.metric("vllm:num_requests_running") >= 1.0), "the stream is running");
        let (health, stop) = (&health, &stop);
        scope.spawn(move || {
            let t0 = std::time::Instant::now(); // bounded, so a failed assertion cannot hang the scope
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(120) {
                match client().get(format!("{}/health", sr.url)).send() {
                    Ok(r) => health.lock().unwrap().push(r.status().as_u16()),
                    Err(_) => break, // the process is gone
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let (status, v) = sr.post("/v1/chat/completions", &chat_body("boom", "hello", 4));
        assert_eq!(status, 503, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("engine thread died"), "{v}");
        let events = stream.join().unwrap();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
        let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert!(err["error"]["message"].as_str().unwrap().contains("engine thread died"), "{err}");
        assert!(wait_until(30, || health.lock().unwrap().contains(&503)), "/health never answered 503");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(s.wait_exit(60), Some(70));
}

/// A runtime-loaded adapter whose weights file is swapped for a symlink out of the allowed
/// roots after the load: the next read (after an eviction from the one host and device slot)
/// is refused, naming the cause, and the adapter is no longer served (the roots were checked
/// once at load and every later read followed the symlink).
#[test]
fn a_symlink_swapped_in_after_a_runtime_load_is_refused_at_the_next_read() {
    let root = temp_dir("faults-swap");
    let outside = temp_dir("faults-swap-outside");
    let a = tiny_adapter(&root.join("a"), 1);
    let b = tiny_adapter(&root.join("b"), 2);
    let x = tiny_adapter(&outside.join("x"), 3);
    let s = Server::tiny(&[
        "--enable-lora-runtime-updates",
        "--allowed-lora-dirs",
        root.to_str().unwrap(),
        "--max-loras",
        "1",
        "--max-cpu-loras",
        "1",
    ]);
    for (name, path) in [("a", &a), ("b", &b)] {
        let (status, v) = s.post("/v1/load_lora_adapter", &json!({"lora_name": name, "lora_path": path}));
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(s.chat("a", "hello", 4).1, "length");
    let weights = a.join("adapter_model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    std::os::unix::fs::symlink(x.join("adapter_model.safetensors"), &weights).unwrap();
    assert_eq!(s.chat("b", "hello", 4).1, "length", "b takes the only slot and host place");
    let (status, v) = s.post("/v1/chat/completions", &chat_body("a", "hello", 4));
    assert_eq!((status, v["error"]["code"].as_str()), (400, Some("adapter_load_failed")), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("outside the allowed roots") && msg.contains("adapter_model.safetensors"), "{msg}");
    assert_eq!(model_ids(&s), vec![BASE.to_string(), "b".to_string()], "a is not listed");
}
