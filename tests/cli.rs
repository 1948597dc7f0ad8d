//! The `lab` binary: clear one-line errors with exit code 2, never a panic.

use std::process::Command;

fn lab(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), s(&out.stdout), s(&out.stderr))
}

fn assert_one_line_error(args: &[&str], needle: &str) {
    let (code, _, err) = lab(args);
    assert_eq!(code, 2, "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_models_give_one_line_and_exit_2() {
    assert_one_line_error(&["generate", "--model", "/nope/model.gguf", "--prompt", "hi"], "not found");
    assert_one_line_error(&["generate", "--model", "synthetic:gpt-9", "--prompt", "hi"], "unknown synthetic");
    assert_one_line_error(&["generate", "--model", "Cargo.toml", "--prompt", "hi"], "unknown model format");
    assert_one_line_error(&["generate", "--model", "nobody/no-such-model", "--prompt", "hi"], "Hub unavailable");
    let dir = std::env::temp_dir().join(format!("lab-cli-arch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["MistralForCausalLM"],"vocab_size":8,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":1,"rms_norm_eps":1e-5}"#,
    )
    .unwrap();
    std::fs::write(dir.join("model.safetensors"), [0u8; 16]).unwrap();
    assert_one_line_error(
        &["generate", "--model", dir.to_str().unwrap(), "--prompt", "hi"],
        "unsupported architecture",
    );
    let gguf = dir.join("broken.gguf");
    std::fs::write(&gguf, b"not a gguf at all").unwrap();
    assert_one_line_error(&["generate", "--model", gguf.to_str().unwrap(), "--prompt", "hi"], "GGUF");
}

#[test]
fn serve_and_loadtest_explain_bad_flags_in_one_line() {
    assert_one_line_error(&["loadtest", "--models", "m", "--qps", "0"], "--qps needs positive rates");
    assert_one_line_error(&["loadtest", "--models", "m", "--arrival", "weibull"], "unknown arrival");
    assert_one_line_error(&["loadtest", "--models", "m", "--mix", "zipf:x"], "unknown mix");
    assert_one_line_error(&["loadtest", "--models", "m", "--validate"], "NAME=A");
    assert_one_line_error(&["loadtest", "--models", "m=Q", "--validate"], "--models m=Q");
    assert_one_line_error(&["serve", "--model", "synthetic:tiny", "--lora-modules", "nopath"], "expected NAME=PATH");
    assert_one_line_error(&["serve", "--model", "synthetic:tiny", "--kv-cache-memory", "lots"], "--kv-cache-memory");
}

#[test]
fn train_and_eval_explain_bad_input_in_one_line() {
    assert_one_line_error(&["train-lora", "--domain", "Z", "--out", "/tmp/x"], "domain");
    assert_one_line_error(&["train-lora", "--data", "/nope/data.jsonl", "--out", "/tmp/x"], "not found");
    assert_one_line_error(&["eval", "--domain", "A", "--data", "/nope/eval.jsonl"], "/nope/eval.jsonl");
}

/// `lab selftest --device cpu` runs every check the H200 runs, with the CPU reference forms of
/// the device ops (so the in-place paged plan is checked against the per-sequence path, the
/// sampler op against its reference, PEFT parity through the paged path) and passes.
#[test]
fn selftest_on_the_cpu_passes_every_check() {
    let (code, out, err) = lab(&["selftest", "--device", "cpu"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let last = out.trim().lines().last().unwrap_or_default();
    assert!(last.ends_with("checks, 0 failed"), "{out}");
    assert!(out.lines().filter(|l| l.starts_with("ok")).count() >= 48, "{out}");
}

/// On a build without the `cuda` feature, asking for CUDA is one line saying how to get it.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_one_line() {
    assert_one_line_error(&["selftest", "--device", "cuda"], "without CUDA");
    assert_one_line_error(
        &["generate", "--device", "cuda", "--model", "synthetic:tiny", "--prompt", "hi"],
        "without CUDA",
    );
}

/// `--gpu-memory-utilization` outside (0, 1] is one line, before any model is loaded (it was
/// accepted and ignored before the KV pool was sized from it).
#[test]
fn gpu_memory_utilization_outside_zero_to_one_is_one_line() {
    for v in ["0", "1.5", "NaN", "inf"] {
        assert_one_line_error(
            &["serve", "--model", "synthetic:tiny", "--gpu-memory-utilization", v],
            "--gpu-memory-utilization",
        );
    }
}

/// `lab <args>` given at most `secs` (then killed: code -1), for flags that a server which
/// accepted them would serve on for ever.
fn lab_within(args: &[&str], secs: u64) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code().unwrap_or(-1);
        }
        if t0.elapsed() > std::time::Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            break -1;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (code, err)
}

/// Every numeric serve flag has a range, refused by the parser in one line naming the flag,
/// with clap's exit code 2: 0 where 0 means nothing (it divided by zero or left
/// every request waiting) and a huge value (a huge --block-size overflowed the block's bytes,
/// a huge --idle-timeout `Instant + Duration`, others started a server that could not work).
#[test]
fn zero_sized_serve_flags_are_refused() {
    let huge = ["100000000000", "18446744073709551615"];
    let flags: [(&str, bool); 19] = [
        ("--block-size", false),
        ("--max-num-seqs", false),
        ("--max-num-batched-tokens", false),
        ("--max-lora-rank", false),
        ("--max-loras", false),
        ("--max-cpu-loras", false),
        ("--max-model-len", false),
        ("--kv-cache-memory", false),
        ("--max-waiting", true), // 0: a 503 for every request (tests/serve.rs uses it)
        ("--max-waiting-per-model", false),
        ("--max-running-per-tenant", false),
        ("--max-body-bytes", false),
        ("--header-timeout", false),
        ("--idle-timeout", false),
        ("--max-connections", false),
        ("--tenant-rate-limit", false),
        ("--max-wait-steps", true),
        ("--shutdown-timeout", true),
        ("--port", true),
    ];
    for (flag, zero_ok) in flags {
        // Sizes with a unit: 20000 GiB is past the 16 TiB ceiling.
        let huge = if flag == "--kv-cache-memory" { ["20000GiB", huge[1]] } else { huge };
        let tries = huge.into_iter().chain((!zero_ok).then_some("0"));
        for value in tries {
            let mut args = vec!["serve", "--model", "synthetic:tiny"];
            if flag != "--port" {
                args.extend(["--port", "0"]);
            }
            args.extend([flag, value]);
            let (code, err) = lab_within(&args, 60);
            assert_eq!(code, 2, "{flag} {value}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{flag} {value}: one line: {err}");
            assert!(err.starts_with("error:") && err.contains(flag), "{flag} {value}: {err}");
            assert!(!err.contains("panicked"), "{flag} {value}: {err}");
        }
    }
    for rate in ["1e-300", "1e300", "5:1e300"] {
        let (code, err) = lab_within(&["serve", "--model", "synthetic:tiny", "--tenant-rate-limit", rate], 60);
        assert!(code == 2 && err.contains("--tenant-rate-limit"), "{rate}: {err}");
    }
    // A pool smaller than one KV block is refused once the block's size is known.
    let (code, err) =
        lab_within(&["serve", "--model", "synthetic:tiny", "--port", "0", "--kv-cache-memory", "100"], 60);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!((code, errors.len()), (2, 1), "{err}");
    assert!(errors[0].contains("holds no block") && errors[0].contains("--kv-cache-memory"), "{err}");
}

/// `lab eval --show-errors` lists every miss with the question, the expected answer, what came
/// back and why (the random tiny model misses all three).
#[test]
fn eval_show_errors_lists_each_miss() {
    let (code, out, err) = lab(&[
        "eval",
        "--model",
        "synthetic:tiny",
        "--domain",
        "C",
        "--limit",
        "3",
        "--max-tokens",
        "4",
        "--show-errors",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("accuracy 0.0% (0/3)") && out.contains("3 misses:"), "{out}");
    assert_eq!(out.matches("      expected  {\"name\": ").count(), 3, "{out}");
    assert_eq!(out.matches("      why       ").count(), 3, "{out}");
}
