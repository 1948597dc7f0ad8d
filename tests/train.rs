//! Training: gradients against finite differences, the loss mask, checkpoints and resume.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use lab::engine::load::weights;
use lab::engine::lora::{AdapterConfig, LoraAdapter, LoraModule, ProjKey};
use lab::engine::model::config::LlamaConfig;
use lab::engine::model::layers::OpsMode;
use lab::engine::model::Llama;
use lab::train::examples::TokenizedExample;
use lab::train::loss::cross_entropy;
use lab::train::shared_prefix::pack;
use lab::train::trainer::batch_loss;
use rand::{Rng, SeedableRng};

fn f64_model() -> Llama {
    let mut cfg = LlamaConfig::preset("tiny").unwrap();
    cfg.vocab_size = 97;
    cfg.num_hidden_layers = 2;
    cfg.rope_scaling = LlamaConfig::preset("llama-3.1-8b").unwrap().rope_scaling;
    let mut t = weights::synthetic_tensors(&cfg, 3, DType::F64, &Device::Cpu).unwrap();
    for w in t.values_mut() {
        if w.rank() == 2 {
            *w = (w.clone() * 10.0).unwrap();
        }
    }
    Llama::load(candle_nn::VarBuilder::from_tensors(t, DType::F64, &Device::Cpu), &cfg)
        .unwrap()
        .with_mode(OpsMode::Differentiable)
}

fn example(ids: Vec<u32>, prompt_len: usize) -> TokenizedExample {
    let mask = (0..ids.len()).map(|t| t >= prompt_len).collect();
    TokenizedExample { ids, mask }
}

#[test]
fn lora_gradients_match_central_finite_differences_for_every_module() {
    let model = f64_model();
    let cfg = model.config().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let r = 3;
    let mut vars: BTreeMap<ProjKey, (Var, Var)> = BTreeMap::new();
    for layer in 0..cfg.num_hidden_layers {
        for module in LoraModule::ALL {
            let (inp, out) = module.dims(&cfg);
            let mut rand_var = |rows, cols| {
                let v: Vec<f64> = (0..rows * cols).map(|_| rng.gen_range(-0.3..0.3)).collect();
                Var::from_tensor(&Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()).unwrap()
            };
            vars.insert(ProjKey { layer, module }, (rand_var(r, inp), rand_var(out, r)));
        }
    }
    let adapter = || LoraAdapter {
        config: AdapterConfig::new(r, 6.0, &LoraModule::ALL, false, "test"),
        weights: vars.iter().map(|(k, (a, b))| (*k, (a.as_tensor().clone(), b.as_tensor().clone()))).collect(),
    };
    let batch = [example(vec![5, 9, 33, 2, 71, 14, 8], 3), example(vec![40, 41, 42, 43, 44], 2)];
    let refs: Vec<&TokenizedExample> = batch.iter().collect();
    let loss_of = || batch_loss(&model, &adapter(), &refs).unwrap().to_scalar::<f64>().unwrap();
    let grads = batch_loss(&model, &adapter(), &refs).unwrap().backward().unwrap();
    let h = 1e-5;
    let mut checked = 0;
    for (key, (a, b)) in &vars {
        for var in [a, b] {
            let g = grads
                .get(var.as_tensor())
                .expect("every LoRA var gets a gradient")
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for idx in [0, base.len() / 2, base.len() - 1] {
                let set = |delta: f64| {
                    let mut v = base.clone();
                    v[idx] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                };
                set(h);
                let up = loss_of();
                set(-h);
                let down = loss_of();
                set(0.0);
                let fd = (up - down) / (2.0 * h);
                let tol = 1e-6 + 1e-4 * fd.abs().max(g[idx].abs());
                assert!((fd - g[idx]).abs() < tol, "{key:?} idx {idx}: backprop {} vs finite difference {fd}", g[idx]);
                checked += 1;
            }
        }
    }
    assert_eq!(checked, cfg.num_hidden_layers * 7 * 2 * 3);
}

#[test]
fn masked_prompt_tokens_contribute_nothing_to_the_loss() {
    let ids: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let mask = vec![false, false, false, false, false, true, true, true];
    let ex = TokenizedExample { ids: ids.clone(), mask: mask.clone() };
    let (_, rows, targets) = pack(&[&ex], 0, None);
    assert_eq!(rows, vec![4, 5, 6], "row t predicts ids[t+1]; only answer targets are kept");
    assert_eq!(targets, vec![9, 2, 6]);
    // Gradient w.r.t. all-position logits: zero on every masked row, non-zero on the others.
    let logits = Var::from_tensor(&Tensor::randn(0f32, 1.0, (ids.len(), 10), &Device::Cpu).unwrap()).unwrap();
    let rows_t = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
    let loss = cross_entropy(&logits.as_tensor().index_select(&rows_t, 0).unwrap(), &targets).unwrap();
    let g = loss
        .backward()
        .unwrap()
        .get(logits.as_tensor())
        .unwrap()
        .abs()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (t, gt) in g.iter().enumerate() {
        if rows.contains(&(t as u32)) {
            assert!(*gt > 0.0, "row {t} carries loss");
        } else {
            assert_eq!(*gt, 0.0, "row {t} is masked");
        }
    }
}

fn write_chat_jsonl(path: &std::path::Path, n: usize) {
    let mut lines = String::new();
    for i in 0..n {
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": format!("What is {i} plus {}?", i * 3)},
            {"role": "assistant", "content": format!("{i} plus {} is {}.", i * 3, i * 4)}
        ]});
        lines.push_str(&format!("{line}\n"));
    }
    std::fs::write(path, lines).unwrap();
}

fn train_cmd(data: &std::path::Path, out: &std::path::Path, resume: bool) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_lab"));
    c.args(["train-lora", "--model", "synthetic:tiny", "--data"]).arg(data).arg("--out").arg(out);
    c.args(["--max-steps", "300", "--checkpoint-every", "20", "--batch-size", "2", "--rank", "4", "--seed", "3"]);
    if resume {
        c.arg("--resume");
    }
    c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    c
}

fn adapter_tensors(dir: &std::path::Path) -> std::collections::HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn kill_9_then_resume_ends_with_the_uninterrupted_adapter() {
    let root = std::env::temp_dir().join(format!("lab-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let data = root.join("data.jsonl");
    write_chat_jsonl(&data, 24);
    let (straight, killed) = (root.join("straight"), root.join("killed"));
    assert!(train_cmd(&data, &straight, false).status().unwrap().success());

    let mut child = train_cmd(&data, &killed, false).spawn().unwrap();
    let latest = killed.join("checkpoints/latest");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&latest).map(|s| s.trim() < "step-0000100").unwrap_or(true) {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("adapter_model.safetensors").exists(), "killed before the end: no final adapter yet");
    for entry in std::fs::read_dir(killed.join("checkpoints")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("step-") {
            for f in ["adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "trainer_state.json"]
            {
                assert!(p.join(f).is_file(), "{name} is complete ({f})");
            }
        }
    }
    assert!(train_cmd(&data, &killed, true).status().unwrap().success());
    let (a, b) = (adapter_tensors(&straight), adapter_tensors(&killed));
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        let w = &b[k];
        let max = v.iter().zip(w).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert_eq!(max, 0.0, "{k}: resumed run differs by {max}");
    }
}

#[test]
fn shared_prefix_packing_gives_the_same_loss_and_gradients() {
    use lab::train::trainer::batch_loss_with;
    let model = f64_model();
    let cfg = model.config().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let mut weights = BTreeMap::new();
    let mut vars = Vec::new();
    for module in [LoraModule::Q, LoraModule::V, LoraModule::Down] {
        let (inp, out) = module.dims(&cfg);
        let mut rv = |rows, cols| {
            let v: Vec<f64> = (0..rows * cols).map(|_| rng.gen_range(-0.3..0.3)).collect();
            Var::from_tensor(&Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()).unwrap()
        };
        let (a, b) = (rv(2, inp), rv(out, 2));
        weights.insert(ProjKey { layer: 1, module }, (a.as_tensor().clone(), b.as_tensor().clone()));
        vars.push(a);
        vars.push(b);
    }
    let adapter = LoraAdapter { config: AdapterConfig::new(2, 4.0, &[LoraModule::Q], false, "t"), weights };
    // A shared 6-token "system prompt", then different prompts and answers.
    let sys = vec![11u32, 12, 13, 14, 15, 16];
    let mk = |tail: &[u32], prompt_extra: usize| {
        let ids: Vec<u32> = sys.iter().chain(tail).copied().collect();
        example(ids, sys.len() + prompt_extra)
    };
    let batch = [mk(&[20, 21, 22, 23], 2), mk(&[30, 31, 32], 1), mk(&[40, 41, 42, 43, 44], 3)];
    let refs: Vec<&TokenizedExample> = batch.iter().collect();
    assert_eq!(lab::train::shared_prefix::shared_prefix_len(&refs), 6);
    let full = batch_loss_with(&model, &adapter, &refs, false).unwrap();
    let shared = batch_loss_with(&model, &adapter, &refs, true).unwrap();
    let (lf, ls) = (full.to_scalar::<f64>().unwrap(), shared.to_scalar::<f64>().unwrap());
    assert!((lf - ls).abs() < 1e-12 * lf.abs().max(1.0), "loss {lf} vs {ls}");
    let (gf, gs) = (full.backward().unwrap(), shared.backward().unwrap());
    for v in &vars {
        let a = gf.get(v.as_tensor()).unwrap();
        let b = gs.get(v.as_tensor()).unwrap();
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(d < 1e-10, "gradient differs by {d}");
    }
}

/// Trains a few steps on the tiny HF Llama through `lab::train`, saves the PEFT files and lab's
/// logits with the adapter. With LAB_PEFT_CHECK=1 it also runs
/// `tests/fixtures/check_peft_roundtrip.py`, which loads the adapter with PEFT itself.
#[test]
fn lab_trained_adapter_loads_in_peft() {
    use lab::engine::kv::NoCache;
    use lab::engine::model::{LogitsAt, PackedBatch};
    use lab::train::{trainer, TrainSettings};
    let model = crate::util::tiny_hf_llama().with_mode(OpsMode::Differentiable);
    let out = std::env::temp_dir().join(format!("lab-peft-roundtrip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let data: Vec<TokenizedExample> =
        (0..16u32).map(|i| example((0..12).map(|t| (i * 7 + t * 13) % 256).collect(), 6)).collect();
    let settings = TrainSettings {
        rank: 4,
        alpha: 8.0,
        modules: LoraModule::ALL.to_vec(),
        use_rslora: true,
        lr: 5e-3,
        steps: 8,
        batch_size: 4,
        grad_accum: 2,
        max_seq_len: 64,
        warmup: 2,
        seed: 1,
        out: out.join("adapter"),
        resume: false,
        eval_every: 0,
        checkpoint_every: 0,
        base_model: "tiny-llama".into(),
        progress: false,
    };
    std::fs::create_dir_all(&settings.out).unwrap();
    let report = trainer::train(&model, &data, &[], &settings).unwrap();
    assert!(report.final_loss.is_finite());
    let adapter = LoraAdapter::load(&settings.out, model.config(), 16, DType::F32, &Device::Cpu).unwrap();
    assert!(
        adapter.weights.values().any(|(_, b)| b.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0),
        "B moved off zero"
    );
    let ids: Vec<u32> = (0..20).map(|t| (t * 11 + 3) % 256).collect();
    let mut b = PackedBatch::default();
    b.push_with_slot(&ids, 0, Some(0));
    let list = vec![&adapter];
    let logits = model.forward_lora(&b, &mut NoCache, Some(&list), LogitsAt::All).unwrap();
    let json = serde_json::json!({"ids": ids, "logits": logits.to_vec2::<f32>().unwrap()});
    std::fs::write(out.join("lab_logits.json"), json.to_string()).unwrap();
    if std::env::var("LAB_PEFT_CHECK").is_ok_and(|v| v == "1") {
        let status = std::process::Command::new("python3")
            .arg(crate::util::fixture("check_peft_roundtrip.py"))
            .arg(crate::util::fixture("tiny-llama"))
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "PEFT's logits differ from lab's");
    }
}
