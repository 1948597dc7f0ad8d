//! Automatic prefix caching end to end over HTTP (tiny synthetic model): the same outputs
//! with the cache on and off, no KV shared across adapter generations, and every block back in
//! the pool after preemption and cancellation.

use std::io::{BufRead, BufReader};

use serde_json::{json, Value};

use crate::serve_util::*;

const BASE: &str = "synthetic:tiny";

/// A domain's long system message (several KV blocks of the tiny model's tokens).
fn system(domain: usize) -> String {
    let topic = ["orders and shipping", "support tickets", "calendar tools"][domain % 3];
    format!(
        "You are the assistant for {topic}. Answer in one short line. The catalogue: {}",
        (0..12).map(|i| format!("item {i} of {topic} costs {} euros; ", 3 * i + domain)).collect::<String>()
    )
}

fn body(model: &str, system: Option<&str>, user: &str, max_tokens: usize) -> Value {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(json!({"role": "system", "content": s}));
    }
    messages.push(json!({"role": "user", "content": user}));
    json!({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

fn text(s: &Server, b: &Value) -> String {
    let (status, v) = s.post("/v1/chat/completions", b);
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

/// Sends every body at once from threads; the texts in order.
fn concurrent(s: &Server, bodies: &[Value]) -> Vec<String> {
    std::thread::scope(|scope| {
        let hs: Vec<_> = bodies.iter().map(|b| scope.spawn(move || text(s, b))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn idle(s: &Server) -> bool {
    wait_until(20, || {
        s.metric("lab_kv_free_blocks") == s.metric("lab_kv_total_blocks")
            && s.metric("vllm:num_requests_running") == 0.0
    })
}

#[test]
fn outputs_are_the_same_with_the_prefix_cache_on_and_off() {
    let dir = temp_dir("prefix-on-off");
    let mods = [
        format!("a={}", tiny_adapter(&dir.join("a"), 41).display()),
        format!("b={}", tiny_adapter(&dir.join("b"), 42).display()),
    ];
    let args = ["--lora-modules", &mods[0], &mods[1], "--max-loras", "2"];
    let on = Server::tiny(&args);
    let off = Server::tiny(&[&args[..], &["--no-enable-prefix-caching"]].concat());
    // 64 requests over the base model and 2 adapters; three in four share a domain's system
    // message, the rest are unique.
    let models = [BASE, "a", "b"];
    let bodies: Vec<Value> = (0..64)
        .map(|i| {
            let model = models[i % 3];
            let sys = (i % 4 != 3).then(|| system(i % 3));
            body(model, sys.as_deref(), &format!("Question {i}: what is item {} worth?", i % 12), 12)
        })
        .collect();
    // A first request per (model, domain) warms the cache, then everything at once.
    let warm: Vec<String> = bodies[..9].iter().map(|b| text(&on, b)).collect();
    let got = concurrent(&on, &bodies);
    let want = concurrent(&off, &bodies);
    assert_eq!(&got[..9], &warm[..], "the same request, cached or not");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i} ({}) differs with the prefix cache on", bodies[i]["model"]);
    }
    let (hits, queries) = (on.metric("vllm:prefix_cache_hits_total"), on.metric("vllm:prefix_cache_queries_total"));
    assert!(hits > 0.25 * queries, "hits {hits} of {queries} prompt tokens");
    assert_eq!(off.metric("vllm:prefix_cache_hits_total"), 0.0);
    assert!(idle(&on) && idle(&off), "blocks back in the pool");
}

#[test]
fn a_reloaded_adapter_never_reuses_the_old_versions_kv() {
    let dir = temp_dir("prefix-reload");
    let root = dir.join("adapters");
    let (v1, v2) = (tiny_adapter(&root.join("x-v1"), 7), tiny_adapter(&root.join("x-v2"), 8));
    let s = Server::tiny(&[
        "--lora-modules",
        &format!("x={}", v1.display()),
        "--enable-lora-runtime-updates",
        "--allowed-lora-dirs",
        root.to_str().unwrap(),
    ]);
    let sys = system(0);
    let q = body("x", Some(&sys), "What is item 3 worth?", 12);
    let old = text(&s, &q);
    assert_eq!(text(&s, &q), old, "cached, same version: same answer");
    let hits_before = s.metric("vllm:prefix_cache_hits_total");
    assert!(hits_before > 0.0, "the second request hit the cache");
    let (st, v) = s.post("/v1/load_lora_adapter", &json!({"lora_name": "x", "lora_path": v2, "load_inplace": true}));
    assert_eq!(st, 200, "{v}");
    let new = text(&s, &q);
    assert_eq!(s.metric("vllm:prefix_cache_hits_total"), hits_before, "no hit on the old version's blocks");
    let fresh = Server::tiny(&["--lora-modules", &format!("x={}", v2.display()), "--no-enable-prefix-caching"]);
    assert_eq!(new, text(&fresh, &q), "the reloaded adapter answers as a fresh server with v2");
    assert_ne!(new, old);
}

#[test]
fn shared_blocks_come_back_after_preemption_and_cancellation() {
    // 32 blocks of 16 positions for 8 requests of ~10 blocks each sharing a system message:
    // preemption is certain.
    let s = Server::tiny(&["--kv-cache-memory", "256KiB", "--max-model-len", "256"]);
    let sys = system(1);
    let bodies: Vec<Value> =
        (0..8).map(|i| body(BASE, Some(&sys), &format!("Ticket {i}: printer on fire"), 40)).collect();
    let alone: Vec<String> = bodies.iter().map(|b| text(&s, b)).collect();
    let together = concurrent(&s, &bodies);
    assert!(s.metric("vllm:num_preemptions_total") > 0.0, "the pool was meant to run out");
    assert!(s.metric("vllm:prefix_cache_hits_total") > 0.0);
    assert_eq!(alone, together);
    assert!(idle(&s), "every reference released after preemption");
    // Streams that share the cached prefix, dropped mid-way.
    let mut stream = body(BASE, Some(&sys), "Stream until I hang up", 200);
    stream["stream"] = json!(true);
    let mut readers: Vec<_> = (0..4)
        .map(|_| BufReader::new(client().post(format!("{}/v1/chat/completions", s.url)).json(&stream).send().unwrap()))
        .collect();
    for r in readers.iter_mut() {
        let mut line = String::new();
        for _ in 0..4 {
            line.clear();
            r.read_line(&mut line).unwrap();
        }
    }
    drop(readers);
    assert!(idle(&s), "every reference released after cancellation");
    assert_eq!(text(&s, &bodies[0]), alone[0], "and the cache still serves the same answer");
}
