//! `lab serve` when an adapter or a request is bad: what the others and the metrics see.
//! Real HTTP on loopback, tiny model.

use std::path::Path;

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
        assert_ne!(status, 200, "{v}");
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
