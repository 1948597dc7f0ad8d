//! Training: gradients against finite differences, the loss mask, checkpoints and resume.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use lab::engine::config::LlamaConfig;
use lab::engine::layers::OpsMode;
use lab::engine::lora::{AdapterConfig, LoraAdapter, LoraModule, ProjKey};
use lab::engine::model::Llama;
use lab::engine::weights;
use lab::train::examples::TokenizedExample;
use lab::train::loss::{cross_entropy, loss_rows};
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
                let mut set = |delta: f64| {
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
    let (rows, targets) = loss_rows(&[(&ids, &mask)]);
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
