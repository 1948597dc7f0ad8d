//! A `lab serve` child process on loopback, and small HTTP helpers over it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use lab::engine::lora::LoraAdapter;
use lab::engine::LlamaConfig;
use serde_json::{json, Value};

/// A running server; killed on drop.
pub struct Server {
    child: Child,
    pub url: String,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// `lab serve --model synthetic:tiny --port 0 <extra>`; waits for the listening line.
    pub fn tiny(extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--model", "synthetic:tiny", "--port", "0"];
        if !extra.contains(&"--kv-cache-memory") {
            args.extend(["--kv-cache-memory", "64MiB"]);
        }
        args.extend_from_slice(extra);
        Server::start(&args)
    }

    pub fn start(args: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lab"));
        cmd.args(args);
        Server::spawn(cmd)
    }

    /// `lab serve` run by a shell after `prelude` (e.g. `ulimit -Sn 256`), with `args`.
    pub fn start_after(prelude: &str, args: &[&str]) -> Server {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!("{prelude} && exec \"$0\" \"$@\"")).arg(env!("CARGO_BIN_EXE_lab")).args(args);
        Server::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Server {
        let mut child = cmd
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lab serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
                log2.lock().unwrap().push(line);
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("lab serve did not start: {:?}", log.lock().unwrap())
        });
        Server { child, url, log }
    }

    /// Sends SIGTERM to the server process.
    pub fn sigterm(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    /// Waits up to `secs` for the process to exit; its exit code if it did.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = client().post(format!("{}{path}", self.url)).json(body).send().expect("POST");
        let status = resp.status().as_u16();
        let text = resp.text().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub fn get_text(&self, path: &str) -> String {
        client().get(format!("{}{path}", self.url)).send().expect("GET").text().unwrap()
    }

    /// A metric's value (first sample whose line starts with `name{` or `name `).
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get_text("/metrics");
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
    }

    /// Greedy chat completion text and finish reason (panics on an HTTP error).
    pub fn chat(&self, model: &str, content: &str, max_tokens: usize) -> (String, String) {
        let (status, v) = self.post("/v1/chat/completions", &chat_body(model, content, max_tokens));
        assert_eq!(status, 200, "{v}");
        let c = &v["choices"][0];
        (c["message"]["content"].as_str().unwrap().to_string(), c["finish_reason"].as_str().unwrap().to_string())
    }

    /// Streams a chat completion; returns the concatenated deltas, the finish reason and the
    /// raw `data:` payloads.
    pub fn chat_stream(&self, body: &Value) -> (String, String, Vec<String>) {
        let resp = client().post(format!("{}/v1/chat/completions", self.url)).json(body).send().expect("POST");
        assert_eq!(resp.status().as_u16(), 200);
        let mut text = String::new();
        let mut finish = String::new();
        let mut events = Vec::new();
        for line in BufReader::new(resp).lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data: ") else { continue };
            events.push(data.to_string());
            if data == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(c) = v["choices"].get(0) {
                text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
                if let Some(f) = c["finish_reason"].as_str() {
                    finish = f.to_string();
                }
            }
        }
        (text, finish, events)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

pub fn chat_body(model: &str, content: &str, max_tokens: usize) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

/// Writes a random PEFT adapter for `synthetic:tiny` into `dir`.
pub fn tiny_adapter(dir: &Path, seed: u64) -> PathBuf {
    let cfg = LlamaConfig::preset("tiny").unwrap();
    let mut a = LoraAdapter::random(&cfg, 8, seed, DType::F32, &Device::Cpu).unwrap();
    // Larger B than the random default, so the adapter visibly changes greedy outputs.
    for (_, (_, b)) in a.weights.iter_mut() {
        *b = (b.clone() * 30.0).unwrap();
    }
    a.save(dir).unwrap();
    dir.to_path_buf()
}

/// Polls `cond` every 50 ms for up to `secs`.
pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `q`-quantile (nearest rank) of `v`.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// A fresh temp directory under the target dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
