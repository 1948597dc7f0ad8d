//! Model-level checks: a random Llama's logits through the device's paged path vs the CPU
//! per-sequence path, batch invariance of a mixed packed batch, and PEFT parity on the fixture.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use super::{rel_err, tolerance, Outcome};
use crate::engine::kv::paged::{BlockTable, PagedKvCache};
use crate::engine::load::source::local_dir_files;
use crate::engine::load::weights;
use crate::engine::lora::op::LoraWeights;
use crate::engine::lora::slots::SlotBank;
use crate::engine::lora::LoraAdapter;
use crate::engine::model::config::LlamaConfig;
use crate::engine::model::{Llama, LogitsAt, PackedBatch};
use crate::engine::sampling::argmax;

/// Spread of the bf16 logit checks' weights (see [`random_tensors`]).
pub(super) const WIDEN_BF16: f64 = 3.0;

/// Shapes under test: the 8B's attention geometry (head_dim 128, 4 query heads per KV head)
/// at toy width, and the tiny preset (head_dim 16, 2 per group).
pub(super) fn configs() -> Vec<(&'static str, LlamaConfig)> {
    let tiny = LlamaConfig::preset("tiny").expect("preset");
    let eight_b_like = LlamaConfig {
        vocab_size: 512,
        hidden_size: 512,
        intermediate_size: 1024,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 1,
        head_dim: 128,
        rope_scaling: LlamaConfig::preset("llama-3.1-8b").expect("preset").rope_scaling,
        tie_word_embeddings: false,
        ..tiny.clone()
    };
    vec![("H4/KV1/D128", eight_b_like), ("tiny H4/KV2/D16", LlamaConfig { vocab_size: 300, ..tiny })]
}

/// Seeded random weights, `widen` times the synthetic default's spread so logits are far from
/// flat (greedy ties would make token checks flaky). bf16 checks use a milder spread: with
/// very wide weights attention is nearly one-hot and one bf16 rounding can flip which key wins,
/// which measures chaos, not error (x10 gave bf16 logit errors of 0.08-0.18 on the CPU itself).
pub(super) fn random_tensors(cfg: &LlamaConfig, seed: u64, widen: f64) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut t = weights::synthetic_tensors(cfg, seed, DType::F32, &Device::Cpu)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x40);
    for (name, w) in t.iter_mut() {
        if w.rank() == 2 {
            *w = (w.clone() * widen)?;
        } else if name.contains("norm") {
            *w = (super::randn(&mut rng, w.dims(), 0.25)? + 1.0)?;
        }
    }
    Ok(t)
}

/// The model on `device`; `paged` = the fused layer over the in-place paged path (the device
/// path under test; on the CPU its ops run their reference forms, so `--device cpu` checks the
/// plan and the fused layer themselves) rather than the plain per-sequence path (the reference).
pub(super) fn build(
    t: &HashMap<String, Tensor>,
    cfg: &LlamaConfig,
    dtype: DType,
    device: &Device,
    paged: bool,
) -> anyhow::Result<Llama> {
    let moved =
        t.iter().map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?.to_device(device)?))).collect::<anyhow::Result<_>>()?;
    let model = Llama::load(VarBuilder::from_tensors(moved, dtype, device), cfg)?.with_paged_kernels(paged);
    // The paged path under test is the fused layer, as `load_model` sets it up on CUDA.
    Ok(if paged { model.with_fused_projections()? } else { model })
}

/// A paged pool and one table per sequence, reserved for `len` positions.
pub(super) fn pool(model: &Llama, seqs: usize, len: usize) -> anyhow::Result<(PagedKvCache, Vec<BlockTable>)> {
    let mut kv = PagedKvCache::new(model.config(), seqs * len.div_ceil(16) + 1, 16, model.dtype(), model.device())?;
    let mut tables: Vec<BlockTable> = (0..seqs).map(|_| BlockTable::default()).collect();
    for t in &mut tables {
        anyhow::ensure!(kv.reserve(t, len), "selftest pool too small");
    }
    Ok((kv, tables))
}

/// Logits of a 37-token prefill and 6 teacher-forced decode steps: device vs CPU f32.
pub fn logits(device: &Device, dtype: DType, seed: u64) -> anyhow::Result<Vec<Outcome>> {
    let mut out = Vec::new();
    for (label, cfg) in configs() {
        let t = random_tensors(&cfg, seed, if dtype == DType::F32 { 10.0 } else { WIDEN_BF16 })?;
        // The reference gets the same (dtype-rounded) weights, so only the compute differs.
        let rounded = t
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?.to_dtype(DType::F32)?)))
            .collect::<anyhow::Result<_>>()?;
        let (cpu, dev) =
            (build(&rounded, &cfg, DType::F32, &Device::Cpu, false)?, build(&t, &cfg, dtype, device, true)?);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let prompt: Vec<u32> = (0..37).map(|_| rng.gen_range(0..cfg.vocab_size as u32)).collect();
        let (mut kv_c, mut tab_c) = pool(&cpu, 1, 64)?;
        let (mut kv_d, mut tab_d) = pool(&dev, 1, 64)?;
        let (mut worst, mut same_greedy) = (0f64, true);
        let mut input = prompt.clone();
        for _ in 0..7 {
            let mut b = PackedBatch::default();
            b.push(&input, tab_c[0].len());
            let want = cpu.forward(&b, &mut kv_c.batch(tab_c.iter_mut().collect()), LogitsAt::All)?;
            let got = dev.forward(&b, &mut kv_d.batch(tab_d.iter_mut().collect()), LogitsAt::All)?;
            worst = worst.max(rel_err(&got, &want)?);
            let (w, g) = (want.get(want.dim(0)? - 1)?.to_vec1::<f32>()?, got.get(got.dim(0)? - 1)?.to_vec1::<f32>()?);
            same_greedy &= argmax(&w) == argmax(&g);
            input = vec![argmax(&w)];
        }
        out.push(Outcome::rel(
            format!("llama {label} {dtype:?}: prefill 37 + 6 decodes, logits"),
            worst,
            5.0 * tolerance(dtype),
        ));
        if dtype == DType::F32 {
            out.push(Outcome::exact(format!("llama {label} {dtype:?}: greedy tokens"), same_greedy, "equal to CPU"));
        }
    }
    Ok(out)
}

/// Greedy continuation of `(history, next chunk)` sequences, alone vs all in one packed batch.
struct Case {
    history: Vec<u32>,
    chunk: Vec<u32>,
    slot: Option<usize>,
}

/// A packed batch mixing a fresh prefill, a chunk continuing a cached past, decodes with and
/// without adapters gives every sequence the greedy tokens it gets alone.
pub fn batch_invariance(device: &Device, dtype: DType, seed: u64) -> anyhow::Result<Vec<Outcome>> {
    let mut out = Vec::new();
    for (label, cfg) in configs() {
        let model = build(&random_tensors(&cfg, seed ^ 1, 10.0)?, &cfg, dtype, device, true)?;
        let mut bank = SlotBank::new(&cfg, 2, 8, dtype, device)?;
        for s in 0..2 {
            bank.write(s, &LoraAdapter::random(&cfg, 4 + 4 * s, seed + s as u64, dtype, device)?)?;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 2);
        let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.gen_range(0..cfg.vocab_size as u32)).collect() };
        let cases = vec![
            Case { history: vec![], chunk: ids(20), slot: Some(0) },
            Case { history: ids(15), chunk: ids(1), slot: Some(1) },
            Case { history: ids(9), chunk: ids(1), slot: None },
            Case { history: ids(10), chunk: ids(7), slot: Some(0) },
        ];
        let alone: Vec<Vec<u32>> = cases
            .iter()
            .map(|c| continue_greedy(&model, &bank, std::slice::from_ref(c), 6).map(|mut v| v.remove(0)))
            .collect::<anyhow::Result<_>>()?;
        let together = continue_greedy(&model, &bank, &cases, 6)?;
        let same = alone.iter().zip(&together).filter(|(a, b)| a == b).count();
        out.push(Outcome::exact(
            format!("batch invariance {label} {dtype:?}: prefill + chunk + decodes, 2 adapters"),
            same == cases.len(),
            format!("{same}/{} sequences equal alone and batched (6 greedy tokens)", cases.len()),
        ));
    }
    Ok(out)
}

/// Prefills each case's history alone, then runs every case's chunk in one packed step and
/// `n - 1` more greedy decode steps together; returns each case's `n` greedy tokens.
fn continue_greedy(model: &Llama, bank: &SlotBank, cases: &[Case], n: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    let (mut kv, mut tables) = pool(model, cases.len(), 64)?;
    let lora = Some(bank as &dyn LoraWeights);
    for (c, t) in cases.iter().zip(tables.iter_mut()) {
        if !c.history.is_empty() {
            let mut b = PackedBatch::default();
            b.push_with_slot(&c.history, 0, c.slot);
            model.forward_lora(&b, &mut kv.batch(vec![t]), lora, LogitsAt::Last)?;
        }
    }
    let mut inputs: Vec<Vec<u32>> = cases.iter().map(|c| c.chunk.clone()).collect();
    let mut outs = vec![Vec::new(); cases.len()];
    for _ in 0..n {
        let mut b = PackedBatch::default();
        for ((c, t), input) in cases.iter().zip(&tables).zip(&inputs) {
            b.push_with_slot(input, t.len(), c.slot);
        }
        let logits = model.forward_lora(&b, &mut kv.batch(tables.iter_mut().collect()), lora, LogitsAt::Last)?;
        for (i, o) in outs.iter_mut().enumerate() {
            let id = argmax(&logits.get(i)?.to_vec1::<f32>()?);
            o.push(id);
            inputs[i] = vec![id];
        }
    }
    Ok(outs)
}

#[derive(Deserialize)]
struct TinyCase {
    ids: Vec<u32>,
    base: Vec<Vec<f32>>,
    rslora: Vec<Vec<f32>>,
    subset: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct TinyExpected {
    cases: Vec<TinyCase>,
}

/// The tiny HF Llama with two PEFT adapters (made by PEFT itself) on the device, through the
/// fused layer on the paged path, against the logits PEFT computed.
pub fn peft_parity(device: &Device, dtype: DType, fixtures: &Path) -> anyhow::Result<Vec<Outcome>> {
    let files = local_dir_files(&fixtures.join("tiny-llama"), "tiny-llama")?;
    let (cfg, vb) = weights::open(&files, dtype, device)?;
    // The fused layer, as `load_model` sets it up on CUDA; these adapters are a plain list
    // (not a slot bank), so its LoRA takes the grouped GEMMs over column ranges.
    let model = Llama::load(vb, &cfg)?.with_paged_kernels(true).with_fused_projections()?;
    let text = std::fs::read_to_string(fixtures.join("peft-tiny/expected.json"))?;
    let exp: TinyExpected = serde_json::from_str(&text)?;
    let load = |name: &str| LoraAdapter::load(&fixtures.join(format!("peft-tiny/{name}")), &cfg, 16, dtype, device);
    let (rslora, subset) = (load("rslora")?, load("subset")?);
    let mut worst = [0f64; 3];
    for case in &exp.cases {
        for (k, (adapter, want)) in
            [(None, &case.base), (Some(&rslora), &case.rslora), (Some(&subset), &case.subset)].into_iter().enumerate()
        {
            let (mut kv, mut tables) = pool(&model, 1, case.ids.len())?;
            let mut b = PackedBatch::default();
            b.push_with_slot(&case.ids, 0, adapter.map(|_| 0));
            let list: Vec<&LoraAdapter> = adapter.into_iter().collect();
            let got = model.forward_lora(
                &b,
                &mut kv.batch(tables.iter_mut().collect()),
                Some(&list as &dyn LoraWeights),
                LogitsAt::All,
            )?;
            worst[k] = worst[k].max(rel_err(&got, &Tensor::new(want.clone(), &Device::Cpu)?)?);
        }
    }
    let tol = 5.0 * tolerance(dtype);
    Ok(["base", "rslora r8", "subset r4"]
        .iter()
        .zip(worst)
        .map(|(name, err)| {
            Outcome::rel(format!("PEFT parity tiny-llama {name} {dtype:?} ({} cases)", exp.cases.len()), err, tol)
        })
        .collect())
}
