//! `lab serve` under abuse of its front door: floods of big prompts, idle and half-sent
//! connections, more sockets than file descriptors. Real HTTP on loopback, tiny model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::serve_util::*;

const BASE: &str = "synthetic:tiny";

/// Time of one `GET /health` on a fresh connection, and its status.
fn health(s: &Server) -> (Duration, u16) {
    let t0 = Instant::now();
    let status = client().get(format!("{}/health", s.url)).send().map(|r| r.status().as_u16()).unwrap_or(0);
    (t0.elapsed(), status)
}

/// While clients keep sending prompts of ~4 MB (tokenizing one takes about a second),
/// `/health` and `/metrics` answer promptly: rendering and tokenization run off the async
/// workers (before, two such prompts held both workers and `/health` waited seconds).
#[test]
fn health_and_metrics_answer_during_a_flood_of_big_prompts() {
    let s = &Server::tiny(&[]);
    let big = "hello world, ".repeat(300_000);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for i in 0..6 {
            let (big, stop) = (&big, &stop);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (path, body) = if i % 2 == 0 {
                        ("/v1/chat/completions", chat_body(BASE, big, 1))
                    } else {
                        ("/v1/completions", json!({"model": BASE, "prompt": big, "max_tokens": 1}))
                    };
                    let (status, v) = s.post(path, &body);
                    assert_eq!(status, 400, "longer than --max-model-len: {v}");
                }
            });
        }
        std::thread::sleep(Duration::from_millis(1500)); // the flood is under way
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let (took, status) = health(s);
            assert_eq!(status, 200);
            worst = worst.max(took);
            let t0 = Instant::now();
            assert!(s.get_text("/metrics").contains("vllm:num_requests_running"));
            worst = worst.max(t0.elapsed());
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("worst health/metrics latency during the flood: {worst:?}");
        stop.store(true, Ordering::Relaxed);
        assert!(worst < Duration::from_millis(400), "/health or /metrics took {worst:?} during the flood");
    });
}
