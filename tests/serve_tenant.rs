//! Tenants named by the request (`user`, `x-tenant-id`) and `--tenant-rate-limit`, over real
//! HTTP on loopback with the tiny model.

use std::io::{BufRead, BufReader};

use serde_json::{json, Value};

use crate::serve_util::*;

const BASE: &str = "synthetic:tiny";
/// A model slow enough on the CPU (random weights of SmolLM2-135M's shape, ~20 ms a token)
/// that a 2000-token stream holds its slot for far longer than a test's checks take, on any
/// machine: the tiny model's 2000 tokens took under a second on a fast one, and the slot came
/// free mid-test.
const SLOW: &str = "synthetic:smollm2-135m";

/// Status, JSON body and `Retry-After` of a POST with extra headers.
fn post_with(s: &Server, path: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value, Option<String>) {
    let mut req = client().post(format!("{}{path}", s.url)).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().expect("POST");
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), retry)
}

/// A chat body for the base model sent as `user` (when given).
fn chat_as(user: Option<&str>, content: &str) -> Value {
    chat_for(BASE, user, content)
}

/// A chat body for `model` sent as `user` (when given).
fn chat_for(model: &str, user: Option<&str>, content: &str) -> Value {
    let mut b = chat_body(model, content, 2);
    if let Some(u) = user {
        b["user"] = json!(u);
    }
    b
}

/// A stream on `model` that holds the only running slot until it is dropped (read up to its
/// first token, so it has been admitted): 2000 tokens.
fn hold_the_slot(s: &Server, model: &str) -> BufReader<reqwest::blocking::Response> {
    let mut body = chat_body(model, "keep the slot busy", 2000);
    body["stream"] = json!(true);
    let resp = client().post(format!("{}/v1/chat/completions", s.url)).json(&body).send().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut lines = BufReader::new(resp);
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(lines.read_line(&mut line).unwrap() > 0, "the stream ended early");
    }
    lines
}

/// `--max-waiting-per-model 1` counts places per tenant: with the slot busy, requests to the
/// same model as `user` alice and as `user` bob each get a place, a second one of alice's
/// gets 429, and so does one whose `x-tenant-id: alice` header overrides its `user`.
#[test]
fn the_user_field_and_the_header_choose_the_tenant_of_the_waiting_places() {
    let s = &Server::start(&[
        "serve",
        "--model",
        SLOW,
        "--port",
        "0",
        "--kv-cache-memory",
        "256MiB",
        "--max-num-seqs",
        "1",
        "--max-waiting-per-model",
        "1",
    ]);
    let slot = hold_the_slot(s, SLOW);
    std::thread::scope(|scope| {
        let alice = scope.spawn(|| s.post("/v1/chat/completions", &chat_for(SLOW, Some("alice"), "first of alice")));
        assert!(wait_until(20, || s.metric("vllm:num_requests_waiting") == 1.0), "alice's request waits");
        let (status, v, retry) = post_with(s, "/v1/chat/completions", &chat_for(SLOW, Some("alice"), "again"), &[]);
        assert_eq!((status, retry.as_deref()), (429, Some("1")), "{v}");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("tenant `alice`"), "{v}");
        let (status, v, _) = post_with(
            s,
            "/v1/completions",
            &json!({"model": SLOW, "prompt": "hi", "max_tokens": 2, "user": "alice"}),
            &[],
        );
        assert_eq!(status, 429, "completions read `user` too: {v}");
        let headed =
            post_with(s, "/v1/chat/completions", &chat_for(SLOW, Some("bob"), "x"), &[("x-tenant-id", "alice")]);
        assert_eq!(headed.0, 429, "the header wins over `user`: {}", headed.1);
        let bob = scope.spawn(|| s.post("/v1/chat/completions", &chat_for(SLOW, Some("bob"), "first of bob")));
        // No `user`: the tenant is the model, whose running request holds no waiting place.
        let model = scope.spawn(|| s.post("/v1/chat/completions", &chat_for(SLOW, None, "no user")));
        // Alice's first request still waiting here also proves the slot was held throughout.
        assert!(wait_until(20, || s.metric("vllm:num_requests_waiting") == 3.0), "bob's and the model's wait too");
        drop(slot);
        for h in [alice, bob, model] {
            let (status, v) = h.join().unwrap();
            assert_eq!(status, 200, "{v}");
        }
    });
}

/// `--tenant-rate-limit 0.5:1`: a tenant's first request passes its full bucket and leaves it
/// in debt; its next one gets 429 `rate_limit_exceeded` with `Retry-After` in whole seconds,
/// whether it names the tenant in `user` or the header, while other tenants are served and the
/// refusals are counted per tenant.
#[test]
fn a_rate_limited_tenant_gets_429_with_retry_after_and_the_others_are_served() {
    let s = &Server::tiny(&["--tenant-rate-limit", "0.5:1"]);
    let (status, v, _) = post_with(s, "/v1/chat/completions", &chat_as(Some("alice"), "hello"), &[]);
    assert_eq!(status, 200, "{v}");
    let cost = v["usage"]["prompt_tokens"].as_u64().unwrap() + 2;
    let (status, v, retry) = post_with(s, "/v1/chat/completions", &chat_as(Some("alice"), "hello"), &[]);
    assert_eq!(status, 429, "{v}");
    assert_eq!(
        (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
        (Some("tokens"), Some("rate_limit_exceeded"))
    );
    let retry: u64 = retry.expect("Retry-After").parse().expect("whole seconds");
    // The debt is cost - 1 tokens at 0.5/s, and one more token is needed: about 2 x cost s.
    assert!((cost..=2 * cost + 2).contains(&retry), "Retry-After {retry} for a debt of {cost} tokens at 0.5/s");
    assert!(v["error"]["message"].as_str().unwrap().contains(&format!("try again in {retry}s")), "{v}");
    let (status, v, _) =
        post_with(s, "/v1/chat/completions", &chat_as(Some("bob"), "hello"), &[("x-tenant-id", "alice")]);
    assert_eq!(status, 429, "the header names the limited tenant: {v}");
    assert_eq!(post_with(s, "/v1/chat/completions", &chat_as(Some("bob"), "hello"), &[]).0, 200, "bob is served");
    let headed = post_with(s, "/v1/chat/completions", &chat_as(None, "hello"), &[("x-tenant-id", "carol")]);
    assert_eq!(headed.0, 200, "{}", headed.1);
    let no_user = post_with(s, "/v1/completions", &json!({"model": BASE, "prompt": "hi", "max_tokens": 2}), &[]);
    assert_eq!(no_user.0, 200, "the model's own tenant is not alice: {}", no_user.1);
    let text = s.get_text("/metrics");
    assert!(text.contains("lab_tenant_rate_limited_total{tenant=\"alice\"} 2"), "{text}");
    assert!(!text.contains("tenant=\"bob\"") && !text.contains("tenant=\"carol\""), "{text}");
    assert_eq!(s.metric("vllm:num_requests_waiting"), 0.0, "a refused request holds no waiting place");
}

/// A tenant that could break a metric label or a log line is a 400 naming where it came from;
/// without any limit flag, a good `user` is simply accepted.
#[test]
fn bad_tenant_values_get_400_naming_the_field_or_header() {
    let s = &Server::tiny(&[]);
    let long = "u".repeat(129);
    for (user, header) in
        [(Some("a b"), None), (Some("a,b"), None), (Some("say \"hi\""), None), (Some(long.as_str()), None)]
            .into_iter()
            .chain([(None, Some("a,b")), (None, Some("")), (Some("ok"), Some("x'y"))])
    {
        let headers: Vec<(&str, &str)> = header.map(|h| ("x-tenant-id", h)).into_iter().collect();
        for (path, mut body) in [
            ("/v1/chat/completions", chat_body(BASE, "hi", 2)),
            ("/v1/completions", json!({"model": BASE, "prompt": "hi", "max_tokens": 2})),
        ] {
            if let Some(u) = user {
                body["user"] = json!(u);
            }
            let (status, v, _) = post_with(s, path, &body, &headers);
            assert_eq!(status, 400, "{path} user {user:?} header {header:?}: {v}");
            let want = if header.is_some() { "x-tenant-id" } else { "user" };
            assert_eq!(v["error"]["param"], want, "{v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        }
    }
    for user in ["alice@example.com", "", "550e8400-e29b-41d4-a716-446655440000"] {
        let (status, v, _) = post_with(s, "/v1/chat/completions", &chat_as(Some(user), "hi"), &[]);
        assert_eq!(status, 200, "user {user:?}: {v}");
    }
}
