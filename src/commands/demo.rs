//! `lab demo`: the whole lab in one command, each stage the real subcommand run as a child
//! process (so its progress bar, logs and errors are exactly what a user running it by hand
//! sees): fetch the default model, train A/B/C (reusing adapters already there), make the
//! customers, start `lab serve`, sweep QPS with `lab loadtest --validate`, print the eval
//! matrix. Everything lands in `--out`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use serde_json::json;

use crate::cli::DemoArgs;
use crate::engine::load::source::{ensure_default_model, lab_home};
use crate::engine::lora::LoraAdapter;

const DOMAINS: [(&str, &str); 3] = [("A", "a"), ("B", "b"), ("C", "c")];

/// Runs `lab demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    if args.customers < 3 {
        bail!("--customers must be at least 3 (the three trained adapters)");
    }
    let t0 = Instant::now();
    let lab = std::env::current_exe().context("locating the lab binary")?;
    let out = &args.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    stage("1/5 default model");
    let gguf = ensure_default_model(&lab_home())?;
    eprintln!("model: {}", gguf.display());
    stage("2/5 train adapters A, B, C");
    for (letter, dir) in DOMAINS {
        let path = out.join("adapters").join(dir);
        if path.join("adapter_model.safetensors").is_file() {
            eprintln!("{letter}: reusing {}", path.display());
            continue;
        }
        let steps = args.train_steps.to_string();
        let p = path.to_str().context("non-UTF-8 path")?;
        let train = ["train-lora", "--domain", letter, "--out", p, "--max-steps", &steps, "--warmup", "5"];
        run_child(&lab, &train)?;
    }
    stage("3/5 customers");
    let customers = make_customers(out, args.customers, &gguf)?;
    stage("4/5 serve + load test");
    let server = start_server(&lab, &customers, args.max_loras)?;
    let qps: Vec<String> = args.qps.iter().map(|q| q.to_string()).collect();
    let models = format!("customer-01=A,customer-02=B,customer-03=C,customer-{{04..{:02}}}", args.customers);
    let results = out.join("loadtest");
    let lt = [
        "loadtest",
        "--url",
        &server.url,
        "--qps",
        &qps.join(","),
        "--duration",
        &args.duration.to_string(),
        "--warmup",
        "10",
        "--models",
        &models,
        "--validate",
        "--out",
        results.to_str().context("non-UTF-8 path")?,
    ];
    let sweep = run_child(&lab, &lt);
    drop(server);
    sweep?;
    stage("5/5 eval matrix (base and adapters on each domain)");
    let adapters: Vec<String> =
        DOMAINS.iter().map(|(l, d)| format!("{l}={}", out.join("adapters").join(d).display())).collect();
    let limit = args.eval_limit.to_string();
    let matrix = ["eval", "--matrix", "--adapters", &adapters.join(","), "--limit", &limit, "--max-tokens", "128"];
    run_child(&lab, &matrix)?;
    eprintln!(
        "\nlab demo: done in {:.1} min; results in {} (loadtest/qps_latency.svg, loadtest/results.json, customers/manifest.json)",
        t0.elapsed().as_secs_f64() / 60.0,
        out.display()
    );
    Ok(())
}

fn stage(name: &str) {
    eprintln!("\n=== lab demo: {name} ===");
}

fn run_child(lab: &Path, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ lab {}", args.join(" "));
    let status = Command::new(lab).args(args).status().context("starting lab")?;
    if !status.success() {
        bail!("`lab {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `customer-01..03` = copies of the trained A, B, C adapters; the rest synthetic random
/// adapters (rank 16, all seven projections), each its own files, listed in `manifest.json`.
fn make_customers(out: &Path, n: usize, gguf: &Path) -> anyhow::Result<PathBuf> {
    let dir = out.join("customers");
    let files = crate::engine::load::source::ModelFiles::Gguf { path: gguf.to_path_buf(), name: "default".into() };
    let (cfg, _) = crate::engine::load::weights::open(&files, DType::F32, &Device::Cpu)?;
    let mut manifest = Vec::new();
    for i in 1..=n {
        let name = format!("customer-{i:02}");
        let path = dir.join(&name);
        let kind = if i <= 3 {
            let (letter, src) = DOMAINS[i - 1];
            if !path.join("adapter_model.safetensors").is_file() {
                std::fs::create_dir_all(&path)?;
                for f in ["adapter_config.json", "adapter_model.safetensors"] {
                    std::fs::copy(out.join("adapters").join(src).join(f), path.join(f))?;
                }
            }
            format!("trained:{letter}")
        } else {
            if !path.join("adapter_model.safetensors").is_file() {
                LoraAdapter::random(&cfg, 16, 1000 + i as u64, DType::F32, &Device::Cpu)?.save(&path)?;
            }
            "synthetic: seeded random weights (traffic only, no task)".to_string()
        };
        manifest.push(json!({"name": name, "path": path, "kind": kind}));
    }
    std::fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(&manifest)?)?;
    eprintln!("{n} customers in {} (3 trained, {} synthetic; see manifest.json)", dir.display(), n - 3);
    Ok(dir)
}

/// A `lab serve` child; killed on drop.
struct ServerChild {
    child: Child,
    url: String,
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(lab: &Path, customers: &Path, max_loras: usize) -> anyhow::Result<ServerChild> {
    let dir = customers.to_str().context("non-UTF-8 path")?;
    let slots = max_loras.to_string();
    let args = ["serve", "--port", "0", "--lora-dir", dir, "--max-loras", &slots, "--max-cpu-loras", "64"];
    eprintln!("$ lab {}", args.join(" "));
    let mut child = Command::new(lab).args(args).stderr(Stdio::piped()).spawn().context("starting lab serve")?;
    let stderr = child.stderr.take().context("server stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
            if !line.contains(" request") {
                eprintln!("[serve] {line}");
            }
        }
    });
    let url = rx.recv_timeout(Duration::from_secs(300)).context("lab serve did not start within 5 minutes")?;
    Ok(ServerChild { child, url: format!("{url}/v1") })
}
