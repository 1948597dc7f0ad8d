//! Property tests: random and mutated input thrown at request validation (over real HTTP:
//! bodies, parameter values, headers, raw request heads) and at the PEFT loader (truncated,
//! flipped, NaN, huge shapes, wrong dtypes, non-JSON configs). The properties: nothing panics,
//! every refusal is a 4xx OpenAI error or a `LoraError`, the server answers normally after.
//! Case counts are fixed so the whole file runs in seconds.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device};
use lab::engine::lora::LoraAdapter;
use lab::engine::LlamaConfig;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};

use crate::serve_util::*;

const BASE: &str = "synthetic:tiny";

fn runner(cases: u32) -> TestRunner {
    // No regression files written next to the sources: a failure prints its minimal case.
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

/// Numbers where validation arithmetic breaks: zero, signs, huge, tiny, fractional.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![0.0, -0.0, 1e-39, 1e-300, 1e300, -1.0, 0.5, 2.0000001, f64::MAX, f64::MIN_POSITIVE])
            .prop_map(Value::from),
        (-5i64..5000).prop_map(Value::from),
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf =
        prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::from), number(), ".{0,12}".prop_map(Value::from),];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Fields a request may carry, valid names with any value.
const FIELDS: [&str; 22] = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "ignore_eos",
    "logprobs",
    "top_logprobs",
    "echo",
    "logit_bias",
    "presence_penalty",
    "response_format",
    "tools",
    "min_tokens",
];

/// A valid body with some fields replaced by arbitrary values (or the body itself replaced).
fn body(chat: bool) -> impl Strategy<Value = Value> {
    let valid = if chat {
        json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    } else {
        json!({"model": BASE, "prompt": "hi", "max_tokens": 4})
    };
    let mutated =
        prop::collection::vec((prop::sample::select(FIELDS.to_vec()), json_value()), 1..4).prop_map(move |edits| {
            let mut b = valid.clone();
            for (k, v) in edits {
                b[k] = v;
            }
            b
        });
    prop_oneof![4 => mutated, 1 => json_value()]
}

/// The OpenAI error shape every refusal must have.
fn is_openai_error(text: &str) -> bool {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()) && v["error"]["type"].is_string()
}

#[test]
fn random_bodies_and_headers_get_a_200_or_a_4xx_openai_error_never_a_5xx() {
    let s = Server::tiny(&["--max-model-len", "256", "--header-timeout", "2"]);
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let url = s.url.clone();
    let post = |path: &str, ct: &str, body: Vec<u8>| -> Result<(), TestCaseError> {
        let resp = http.post(format!("{url}{path}")).header("content-type", ct).body(body).send();
        let resp = resp.map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        prop_assert!(status == 200 || (400..500).contains(&status), "{status}: {text}");
        if status != 200 {
            prop_assert!(is_openai_error(&text), "{status} without an OpenAI error body: {text}");
        } else if text.starts_with("data:") {
            // A stream ends with [DONE]; an error event inside it must be an OpenAI error too.
            prop_assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        }
        Ok(())
    };
    for (chat, path) in [(true, "/v1/chat/completions"), (false, "/v1/completions")] {
        runner(150).run(&body(chat), |b| post(path, "application/json", serde_json::to_vec(&b).unwrap())).unwrap();
    }
    // Bytes that are not JSON (or barely), under content types right and wrong.
    let junk = (prop::collection::vec(any::<u8>(), 0..64), "[ -~]{0,30}");
    runner(100)
        .run(&junk, |(bytes, ct)| {
            post("/v1/chat/completions", &ct, bytes.clone())?;
            post("/v1/completions", "application/json", bytes)
        })
        .unwrap();
    // Random headers on a valid body: known names with junk values, and made-up names.
    let names = prop_oneof![
        prop::sample::select(vec![
            "authorization",
            "accept",
            "accept-encoding",
            "content-encoding",
            "user-agent",
            "x-request-id"
        ])
        .prop_map(String::from),
        "x-[a-z0-9-]{1,12}",
    ];
    let headers = prop::collection::vec((names, "[ -~]{0,40}"), 1..5);
    runner(100)
        .run(&headers, |hs| {
            let mut req = http.post(format!("{url}/v1/chat/completions")).json(&chat_body(BASE, "hi", 2));
            for (k, v) in &hs {
                req = req.header(k.as_str(), v.trim());
            }
            let resp = req.send().map_err(|e| TestCaseError::fail(format!("no answer to {hs:?}: {e}")))?;
            let status = resp.status().as_u16();
            let text = resp.text().unwrap_or_default();
            prop_assert!(
                status == 200 || ((400..500).contains(&status) && is_openai_error(&text)),
                "{hs:?}: {status} {text}"
            );
            Ok(())
        })
        .unwrap();
    // Raw request heads of random bytes: a 4xx or a close, never a hang or a dead server.
    let addr = s.url.trim_start_matches("http://").to_string();
    runner(60)
        .run(&prop::collection::vec(any::<u8>(), 1..200), |bytes| {
            let mut sock = std::net::TcpStream::connect(&addr).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = sock.write_all(&bytes);
            let _ = sock.shutdown(std::net::Shutdown::Write);
            let mut reply = Vec::new();
            let read = sock.read_to_end(&mut reply);
            let reply = String::from_utf8_lossy(&reply);
            prop_assert!(read.is_ok() || reply.is_empty() || reply.starts_with("HTTP/1.1 4"), "{reply}");
            prop_assert!(!reply.starts_with("HTTP/1.1 5"), "{reply}");
            Ok(())
        })
        .unwrap();
    assert_eq!(s.chat(BASE, "still fine", 4).1, "length");
    assert!(wait_until(10, || s.metric("vllm:num_requests_running") == 0.0));
    assert!(!s.log.lock().unwrap().iter().any(|l| l.contains("panicked")), "a panic in the log");
}

/// One way to break an adapter's files.
#[derive(Debug, Clone)]
enum Damage {
    Truncate(f64),
    Flip(Vec<(f64, u8)>),
    HeaderLen(u64),
    Dtype(String),
    Shape(Vec<u64>),
    NonFinite(f32),
    ConfigField(String, Value),
    ConfigText(String),
}

fn damage() -> impl Strategy<Value = Damage> {
    let config_keys = prop::sample::select(vec![
        "r",
        "lora_alpha",
        "target_modules",
        "use_rslora",
        "use_dora",
        "modules_to_save",
        "peft_type",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "fan_in_fan_out",
    ]);
    prop_oneof![
        (0.0..1.0f64).prop_map(Damage::Truncate),
        prop::collection::vec((0.0..1.0f64, any::<u8>()), 1..8).prop_map(Damage::Flip),
        prop_oneof![any::<u64>(), 0..4096u64].prop_map(Damage::HeaderLen),
        prop::sample::select(vec!["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "Q4"])
            .prop_map(|d| Damage::Dtype(d.to_string())),
        prop::collection::vec(prop_oneof![0..20u64, Just(1u64 << 40), any::<u64>()], 0..4).prop_map(Damage::Shape),
        prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e38]).prop_map(Damage::NonFinite),
        (config_keys, json_value()).prop_map(|(k, v)| Damage::ConfigField(k.to_string(), v)),
        ".{0,40}".prop_map(Damage::ConfigText),
    ]
}

/// The header and data of a safetensors file (`None` once earlier damage broke it).
fn split(file: &[u8]) -> Option<(Map<String, Value>, Vec<u8>)> {
    let n = usize::try_from(u64::from_le_bytes(file.get(..8)?.try_into().ok()?)).ok()?;
    let header = serde_json::from_slice(file.get(8..8usize.checked_add(n)?)?).ok()?;
    Some((header, file[8 + n..].to_vec()))
}

fn join(header: &Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    [&(h.len() as u64).to_le_bytes()[..], &h, data].concat()
}

/// Applies `d` to the adapter files in `dir`.
fn apply(dir: &Path, d: &Damage) {
    let wpath = dir.join("adapter_model.safetensors");
    let cpath = dir.join("adapter_config.json");
    let mut file = std::fs::read(&wpath).unwrap();
    let first_tensor = |h: &Map<String, Value>| h.keys().find(|k| *k != "__metadata__").cloned();
    match d {
        Damage::Truncate(f) => file.truncate((file.len() as f64 * f) as usize),
        Damage::Flip(flips) => {
            for (at, b) in flips {
                let i = ((file.len() - 1) as f64 * at) as usize;
                file[i] = *b;
            }
        }
        Damage::HeaderLen(n) => file[..8].copy_from_slice(&n.to_le_bytes()),
        Damage::Dtype(_) | Damage::Shape(_) | Damage::NonFinite(_) => {
            // Header edits need a header that still parses.
            let Some((mut h, mut data)) = split(&file) else { return };
            let Some(k) = first_tensor(&h) else { return };
            match d {
                Damage::Dtype(t) => h[&k]["dtype"] = json!(t),
                Damage::Shape(s) => h[&k]["shape"] = json!(s),
                Damage::NonFinite(x) => {
                    let start = h[&k]["data_offsets"][0].as_u64().unwrap_or(0) as usize;
                    if let Some(w) = data.get_mut(start..start + 4) {
                        w.copy_from_slice(&x.to_le_bytes());
                    }
                }
                _ => unreachable!(),
            }
            file = join(&h, &data);
        }
        Damage::ConfigField(k, v) => {
            let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cpath).unwrap()).unwrap_or(json!({}));
            if c.is_object() {
                c[k] = v.clone();
            }
            std::fs::write(&cpath, c.to_string()).unwrap();
        }
        Damage::ConfigText(t) => std::fs::write(&cpath, t).unwrap(),
    }
    std::fs::write(&wpath, file).unwrap();
}

#[test]
fn damaged_adapter_files_are_a_lora_error_never_a_panic() {
    let cfg = LlamaConfig::preset("tiny").unwrap();
    let root = temp_dir("props-peft");
    let pristine = tiny_adapter(&root.join("pristine"), 7);
    let work = root.join("work");
    let refused = std::cell::Cell::new(0u32);
    runner(300)
        .run(&prop::collection::vec(damage(), 1..4), |damages| {
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&work).unwrap();
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(pristine.join(f), work.join(f)).unwrap();
            }
            for d in &damages {
                apply(&work, d);
            }
            for dtype in [DType::F32, DType::F16] {
                let loaded = std::panic::catch_unwind(|| LoraAdapter::load(&work, &cfg, 16, dtype, &Device::Cpu));
                match loaded {
                    Err(_) => return Err(TestCaseError::fail(format!("the loader panicked on {damages:?}"))),
                    Ok(Err(e)) => {
                        prop_assert!(!e.to_string().is_empty());
                        refused.set(refused.get() + 1);
                    }
                    // What loads must be servable: rank in range, every weight finite and
                    // within the bound on factors.
                    Ok(Ok(a)) => {
                        prop_assert!((1..=16).contains(&a.rank()), "{damages:?}");
                        for (a_w, b_w) in a.weights.values() {
                            for t in [a_w, b_w] {
                                let v =
                                    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                                let bound = lab::engine::lora::MAX_LORA_WEIGHT as f32;
                                let ok = |x: &f32| x.is_finite() && x.abs() <= bound;
                                prop_assert!(v.iter().all(ok), "non-finite or huge weights loaded: {damages:?}");
                            }
                        }
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(refused.get() > 300, "most damage is refused ({} of 600 loads)", refused.get());
}
