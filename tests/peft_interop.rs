//! Adapters made by PEFT itself (fixtures from `tests/fixtures/make_peft_fixtures.py`).

use candle_core::{DType, Device, Tensor};
use lab::engine::kv::{BatchCaches, NoCache, SeqCache};
use lab::engine::load::gguf::GgufFile;
use lab::engine::lora::op::LoraWeights;
use lab::engine::lora::LoraAdapter;
use lab::engine::model::{Llama, LogitsAt, PackedBatch};
use lab::engine::sampling::argmax;
use serde::Deserialize;

use crate::util::{default_gguf, fixture, rel_err, tiny_hf_llama};

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

fn logits(model: &Llama, ids: &[u32], adapter: Option<&LoraAdapter>) -> Tensor {
    let mut b = PackedBatch::default();
    b.push_with_slot(ids, 0, adapter.map(|_| 0));
    let list: Vec<&LoraAdapter> = adapter.into_iter().collect();
    model.forward_lora(&b, &mut NoCache, Some(&list as &dyn LoraWeights), LogitsAt::All).unwrap()
}

#[test]
fn peft_adapters_on_the_tiny_llama_match_peft_logits() {
    let model = tiny_hf_llama();
    let exp: TinyExpected =
        serde_json::from_str(&std::fs::read_to_string(fixture("peft-tiny/expected.json")).unwrap()).unwrap();
    let load = |name: &str| {
        LoraAdapter::load(&fixture(&format!("peft-tiny/{name}")), model.config(), 16, DType::F32, &Device::Cpu).unwrap()
    };
    let (rslora, subset) = (load("rslora"), load("subset"));
    assert!(rslora.config.use_rslora && rslora.rank() == 8 && subset.rank() == 4);
    for case in &exp.cases {
        for (adapter, want) in [(None, &case.base), (Some(&rslora), &case.rslora), (Some(&subset), &case.subset)] {
            let want = Tensor::new(want.clone(), &Device::Cpu).unwrap();
            let err = rel_err(&logits(&model, &case.ids, adapter), &want);
            assert!(err < 1e-4, "len {} adapter {:?}: rel err {err}", case.ids.len(), adapter.map(|a| a.rank()));
        }
    }
}

#[derive(Deserialize)]
struct SmolExpected {
    prompt_ids: Vec<u32>,
    adapter_greedy_ids: Vec<u32>,
    base_greedy_ids: Vec<u32>,
}

fn greedy(model: &Llama, prompt: &[u32], n: usize, adapter: Option<&LoraAdapter>) -> Vec<u32> {
    let list: Vec<&LoraAdapter> = adapter.into_iter().collect();
    let mut cache = SeqCache::new(model.config().num_hidden_layers, 64);
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let mut b = PackedBatch::default();
        b.push_with_slot(&input, cache.len(), adapter.map(|_| 0));
        let l =
            model.forward_lora(&b, &mut BatchCaches(vec![&mut cache]), Some(&list as &dyn LoraWeights), LogitsAt::Last);
        let id = argmax(&l.unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        out.push(id);
        input = vec![id];
    }
    out
}

/// Proves the GGUF q/k un-permutation: PEFT's q/k LoRA rows (HF layout) land on the right rows.
#[test]
fn peft_adapter_on_the_default_gguf_gives_peft_greedy_continuation() {
    let gguf = GgufFile::open(&default_gguf()).unwrap();
    let cfg = gguf.config().unwrap();
    let tensors = gguf.hf_tensors(&cfg, DType::F32, &Device::Cpu).unwrap();
    let model = Llama::load(candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), &cfg).unwrap();
    let exp: SmolExpected =
        serde_json::from_str(&std::fs::read_to_string(fixture("peft-smollm2/expected.json")).unwrap()).unwrap();
    let adapter = LoraAdapter::load(&fixture("peft-smollm2/adapter"), &cfg, 16, DType::F32, &Device::Cpu).unwrap();
    let n = exp.adapter_greedy_ids.len();
    assert_eq!(greedy(&model, &exp.prompt_ids, n, None), exp.base_greedy_ids);
    assert_eq!(greedy(&model, &exp.prompt_ids, n, Some(&adapter)), exp.adapter_greedy_ids);
    assert_ne!(exp.adapter_greedy_ids, exp.base_greedy_ids, "the adapter matters");
}
