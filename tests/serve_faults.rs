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
