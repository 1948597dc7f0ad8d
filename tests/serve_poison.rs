//! The poisoned batch: 8 greedy streams run (base and an adapter); every kind of bad request
//! and bad adapter known from issue 2/8 arrives meanwhile. The 8 must end with exactly the text
//! they have without the poison, and each poison must get its own clear answer.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::serve_util::*;
use crate::util::{edit_config, edit_tensors};

const BASE: &str = "synthetic:tiny";
const TOKENS: usize = 600;

/// The 8 neighbours' bodies: greedy streams, half on the base and half on adapter `good`.
fn neighbours() -> Vec<Value> {
    (0..8)
        .map(|i| {
            let mut b = chat_body(if i % 2 == 0 { BASE } else { "good" }, &format!("neighbour {i} says"), TOKENS);
            b["stream"] = json!(true);
            b
        })
        .collect()
}

/// What goes wrong with an adapter's files, applied to a copy of a good one.
fn bad_adapters(root: &Path) -> Vec<(&'static str, std::path::PathBuf)> {
    let make = |name: &str, seed: u64| tiny_adapter(&root.join(name), seed);
    let r0 = make("r0", 11);
    edit_config(&r0, |v| v["r"] = 0.into());
    let alpha = make("alpha", 12);
    edit_config(&alpha, |v| v["lora_alpha"] = 1e30.into());
    let nan = make("nan", 13);
    edit_tensors(&nan, |t| {
        for w in t.values_mut() {
            *w = (w.clone() * f64::NAN).unwrap();
        }
    });
    let notjson = make("notjson", 14);
    std::fs::write(notjson.join("adapter_config.json"), "{ not json").unwrap();
    let truncated = make("truncated", 15);
    let bytes = std::fs::read(truncated.join("adapter_model.safetensors")).unwrap();
    std::fs::write(truncated.join("adapter_model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    vec![("r0", r0), ("alpha", alpha), ("nan", nan), ("notjson", notjson), ("truncated", truncated)]
}

/// A chat body with `extra` fields merged in.
fn with(extra: Value) -> Value {
    let mut b = chat_body(BASE, "poison", 8);
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

/// Sends every poison; checks each answer.
fn poison(s: &Server, greedy: &str, bad: &[(&str, std::path::PathBuf)]) {
    // Accepted, numerically dangerous: greedy, as vLLM below 1e-5.
    for extra in [json!({"temperature": 1e-39}), json!({"temperature": 1.0, "top_p": 1e-300})] {
        let (status, v) = s.post("/v1/chat/completions", &with(extra.clone()));
        assert_eq!(status, 200, "{extra}: {v}");
        assert_eq!(v["choices"][0]["message"]["content"], greedy, "{extra}");
    }
    // Refused with a 400 naming the parameter.
    let refused = [
        (json!({"max_tokens": u64::MAX}), "max_tokens"),
        (json!({"stop": (0..17).map(|i| i.to_string()).collect::<Vec<_>>()}), "stop"),
        (json!({"stop": ["x".repeat(257)]}), "stop"),
        (json!({"logprobs": true}), "logprobs"),
        (json!({"n": 2}), "n"),
        (json!({"temperature": f64::MAX}), "temperature"),
        (json!({"top_k": -7}), "top_k"),
        (json!({"messages": [{"role": "tool", "content": "x"}]}), "messages"),
        (json!({"messages": [{"role": "user", "content": "long ".repeat(3000)}]}), "messages"),
    ];
    for (extra, param) in refused {
        let (status, v) = s.post("/v1/chat/completions", &with(extra.clone()));
        assert_eq!((status, v["error"]["param"].as_str()), (400, Some(param)), "{extra}: {v}");
    }
    let (status, v) = s.post("/v1/completions", &json!({"model": BASE, "prompt": [7, 4_000_000_000u64]}));
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("prompt")), "{v}");
    let resp = client()
        .post(format!("{}/v1/chat/completions", s.url))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400, "malformed JSON");
    // An adapter that loads but overflows at run time: its sampled row fails alone.
    let mut body = chat_body("overflow", "poison", 8);
    body["temperature"] = json!(1.0);
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 500, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("sampling failed"), "{v}");
    // An adapter whose files turned corrupt after start.
    let (status, v) = s.post("/v1/chat/completions", &chat_body("flaky", "poison", 8));
    assert_eq!((status, v["error"]["code"].as_str()), (400, Some("adapter_load_failed")), "{v}");
    // Bad adapters offered at run time: refused at load with the cause, never served.
    for (name, path) in bad {
        let (status, v) = s.post("/v1/load_lora_adapter", &json!({"lora_name": name, "lora_path": path}));
        assert_eq!((status, v["error"]["param"].as_str()), (400, Some("lora_path")), "{name}: {v}");
    }
    // A client that leaves mid-stream.
    let mut body = chat_body(BASE, "leaving early", TOKENS);
    body["stream"] = json!(true);
    let resp = client().post(format!("{}/v1/chat/completions", s.url)).json(&body).send().unwrap();
    let mut lines = BufReader::new(resp).lines();
    for _ in 0..6 {
        lines.next();
    }
    drop(lines);
}

#[test]
fn eight_streams_end_with_the_same_text_whatever_poison_arrives_meanwhile() {
    let dir = temp_dir("serve-poison");
    let good = tiny_adapter(&dir.join("good"), 1);
    let flaky = tiny_adapter(&dir.join("flaky"), 2);
    let overflow = crate::serve_faults::overflowing_adapter(&dir.join("overflow"));
    let s = &Server::tiny(&[
        "--lora-modules",
        &format!("good={}", good.display()),
        &format!("flaky={}", flaky.display()),
        &format!("overflow={}", overflow.display()),
        "--enable-lora-runtime-updates",
        "--allowed-lora-dirs",
        dir.to_str().unwrap(),
    ]);
    std::fs::write(flaky.join("adapter_model.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}").unwrap();
    let bad = bad_adapters(&dir);
    let greedy = s.chat(BASE, "poison", 8).0;
    // The 8 outputs, and whether the poison was all sent before the first of them ended.
    let run = |with_poison: bool| -> (Vec<(String, String)>, bool) {
        std::thread::scope(|scope| {
            let hs: Vec<_> =
                neighbours().into_iter().map(|b| scope.spawn(move || (s.chat_stream(&b), Instant::now()))).collect();
            let mut poisoned_at = None;
            if with_poison {
                std::thread::sleep(Duration::from_millis(50)); // the 8 are running
                poison(s, &greedy, &bad);
                poisoned_at = Some(Instant::now());
            }
            let mut first_end: Option<Instant> = None;
            let outs = hs
                .into_iter()
                .map(|h| {
                    let ((text, finish, events), ended) = h.join().unwrap();
                    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
                    first_end = Some(first_end.map_or(ended, |f| f.min(ended)));
                    (text, finish)
                })
                .collect();
            (outs, poisoned_at.is_some_and(|p| Some(p) < first_end))
        })
    };
    let (clean, _) = run(false);
    assert!(clean.iter().all(|(t, f)| f == "length" && !t.is_empty()), "{clean:?}");
    let (poisoned, overlapped) = run(true);
    for (i, (a, b)) in clean.iter().zip(&poisoned).enumerate() {
        assert_eq!(a, b, "neighbour {i} changed under the poison");
    }
    assert!(overlapped, "every poison must arrive while all 8 still run (make the streams longer)");
    assert_eq!(s.chat(BASE, "poison", 8).0, greedy, "the server answers normally afterwards");
    assert!(wait_until(5, || s.metric("vllm:num_requests_running") == 0.0));
    assert!(wait_until(5, || s.metric("lab_kv_free_blocks") == s.metric("lab_kv_total_blocks")));
}
