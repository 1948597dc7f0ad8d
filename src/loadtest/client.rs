//! One streamed chat completion against any OpenAI-compatible server, timed from its
//! *scheduled* send time (so a stalled server shows up in every request it delayed).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

use crate::engine::text::tokenizer::ChatMessage;

/// What one request measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Measured {
    pub ok: bool,
    /// Error kind (`http_503`, `http_4xx`, `connect`, `timeout`, `stream`), when not ok.
    pub error: Option<String>,
    pub error_detail: Option<String>,
    /// Seconds from the scheduled send time to the first content token.
    pub ttft_s: Option<f64>,
    /// Seconds from the scheduled send time to the end of the stream.
    pub e2e_s: f64,
    /// Mean seconds between output tokens after the first.
    pub tpot_s: Option<f64>,
    pub output_tokens: usize,
    pub text: String,
    /// Seconds from the scheduled time to sending when the request had to wait for a
    /// `--max-in-flight` permit (0 = sent on schedule).
    pub capped_s: f64,
}

/// The request body: a streamed chat completion asking for usage.
pub fn chat_body(model: &str, messages: &[ChatMessage], max_tokens: usize, ignore_eos: bool) -> Value {
    let mut b = json!({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if ignore_eos {
        b["ignore_eos"] = json!(true);
    }
    b
}

/// Sends `body` to `{base}/chat/completions` and reads the stream to the end.
pub async fn send(
    client: &reqwest::Client,
    base: &str,
    api_key: Option<&str>,
    body: &Value,
    scheduled: Instant,
    timeout: Duration,
) -> Measured {
    let mut m = Measured::default();
    let mut req = client.post(format!("{base}/chat/completions")).json(body).timeout(timeout);
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    }
    let fail = |m: &mut Measured, kind: &str, detail: String| {
        m.error = Some(kind.to_string());
        m.error_detail = Some(detail);
        m.e2e_s = scheduled.elapsed().as_secs_f64();
    };
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            fail(&mut m, if e.is_timeout() { "timeout" } else { "connect" }, e.to_string());
            return m;
        }
    };
    let status = resp.status().as_u16();
    if status != 200 {
        let text = resp.text().await.unwrap_or_default();
        let kind = if status >= 500 { format!("http_{status}") } else { "http_4xx".to_string() };
        fail(&mut m, &kind, format!("HTTP {status}: {}", text.chars().take(300).collect::<String>()));
        return m;
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    let mut chunks = 0usize;
    let mut usage_tokens = None;
    // A stream is complete once it sent `[DONE]` or a `finish_reason`; one that just stops
    // (server crash, proxy cut) is an error, not a short success.
    let mut complete = false;
    while let Some(item) = stream.next().await {
        let bytes = match item {
            Ok(b) => b,
            Err(e) => {
                fail(&mut m, if e.is_timeout() { "timeout" } else { "stream" }, e.to_string());
                return m;
            }
        };
        buf.extend_from_slice(&bytes);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:").map(str::trim) else { continue };
            if data == "[DONE]" {
                complete = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
            if let Some(e) = v.get("error") {
                fail(&mut m, "stream", e.to_string());
                return m;
            }
            if v["choices"][0]["finish_reason"].is_string() {
                complete = true;
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage_tokens = Some(n as usize);
            }
            let piece = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            if !piece.is_empty() {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                chunks += 1;
                m.text.push_str(piece);
            }
        }
    }
    if !complete {
        fail(&mut m, "truncated", "the stream ended without a finish_reason or [DONE]".into());
        return m;
    }
    let end = Instant::now();
    m.ok = true;
    m.e2e_s = (end - scheduled).as_secs_f64();
    m.output_tokens = usage_tokens.unwrap_or(chunks);
    m.ttft_s = first.map(|f| (f - scheduled).as_secs_f64());
    if let (Some(f), Some(l)) = (first, last) {
        if m.output_tokens > 1 {
            m.tpot_s = Some((l - f).as_secs_f64() / (m.output_tokens - 1) as f64);
        }
    }
    m
}

/// The server's `lab_engine_busy_seconds_total` from `/metrics` (next to `/v1`), or `None`
/// when the server does not export it (vLLM, SGLang) or cannot be reached.
pub async fn busy_seconds(client: &reqwest::Client, base: &str, api_key: Option<&str>) -> Option<f64> {
    let root = base.trim_end_matches('/').trim_end_matches("/v1");
    let mut req = client.get(format!("{root}/metrics")).timeout(Duration::from_secs(5));
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    }
    let text = req.send().await.ok()?.text().await.ok()?;
    parse_busy_seconds(&text)
}

/// The first sample of `lab_engine_busy_seconds_total` in a Prometheus text exposition.
pub fn parse_busy_seconds(text: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with("lab_engine_busy_seconds_total"))
        .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.trim().parse().ok()))
}

#[cfg(test)]
mod busy_tests {
    #[test]
    fn the_busy_counter_is_read_from_the_exposition() {
        let text = "# HELP lab_engine_busy_seconds_total x\n# TYPE lab_engine_busy_seconds_total counter\n\
                    lab_engine_busy_seconds_total{model_name=\"m\"} 12.5\nlab_engine_busy_ratio{model_name=\"m\"} 0.4\n";
        assert_eq!(super::parse_busy_seconds(text), Some(12.5));
        assert_eq!(super::parse_busy_seconds("vllm:num_requests_running 3\n"), None);
    }
}
