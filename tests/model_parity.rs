//! The Llama forward against transformers' logits, and packed batches against single runs.

use candle_core::{Device, Tensor};
use lab::engine::kv::{BatchCaches, NoCache, SeqCache};
use lab::engine::model::layers::OpsMode;
use lab::engine::model::{Llama, LogitsAt, PackedBatch};
use lab::engine::sampling::argmax;
use serde::Deserialize;

use crate::util::{fixture, random_llama, rel_err, tiny_hf_llama};

#[derive(Deserialize)]
struct Case {
    ids: Vec<u32>,
    positions: Vec<usize>,
    logits: Vec<Vec<f32>>,
    #[serde(default)]
    greedy_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Expected {
    cases: Vec<Case>,
}

fn expected() -> Expected {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama/expected.json")).unwrap()).unwrap()
}

fn all_logits(model: &Llama, ids: &[u32]) -> Tensor {
    let mut batch = PackedBatch::default();
    batch.push(ids, 0);
    model.forward(&batch, &mut NoCache, LogitsAt::All).unwrap()
}

#[test]
fn tiny_llama_matches_transformers_at_every_position() {
    let exp = expected();
    for mode in [OpsMode::Fused, OpsMode::Differentiable] {
        let model = tiny_hf_llama().with_mode(mode);
        for case in &exp.cases {
            let got = all_logits(&model, &case.ids);
            let pos = Tensor::new(case.positions.iter().map(|&p| p as u32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
            let got = got.index_select(&pos, 0).unwrap();
            let want = Tensor::new(case.logits.clone(), &Device::Cpu).unwrap();
            let err = rel_err(&got, &want);
            assert!(err < 1e-4, "{mode:?} len {}: rel err {err}", case.ids.len());
        }
    }
}

#[test]
fn tiny_llama_greedy_with_kv_cache_matches_transformers() {
    let exp = expected();
    let case = &exp.cases[0];
    let model = tiny_hf_llama();
    let mut cache = SeqCache::new(2, 8);
    let mut input = case.ids.clone();
    let mut out = Vec::new();
    for _ in 0..case.greedy_ids.len() {
        let mut batch = PackedBatch::default();
        batch.push(&input, cache.len());
        let logits = model.forward(&batch, &mut BatchCaches(vec![&mut cache]), LogitsAt::Last).unwrap();
        let id = argmax(&logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        out.push(id);
        input = vec![id];
    }
    assert_eq!(out, case.greedy_ids);
}

/// Runs `prefix` then `chunk` for one sequence alone; returns the chunk's last-position logits
/// and the cache after the prefix (so the same past can be used in a packed batch).
fn alone(model: &Llama, prefix: &[u32], chunk: &[u32]) -> (Tensor, SeqCache) {
    let mut cache = SeqCache::new(model.config().num_hidden_layers, 4);
    if !prefix.is_empty() {
        let mut b = PackedBatch::default();
        b.push(prefix, 0);
        model.forward(&b, &mut BatchCaches(vec![&mut cache]), LogitsAt::Last).unwrap();
    }
    let before = cache.clone();
    let mut b = PackedBatch::default();
    b.push(chunk, prefix.len());
    let logits = model.forward(&b, &mut BatchCaches(vec![&mut cache]), LogitsAt::All).unwrap();
    (logits, before)
}

#[test]
fn packed_batch_equals_each_sequence_alone() {
    let model = random_llama(11);
    let ids = |seed: u32, n: usize| (0..n as u32).map(|i| (i * 37 + seed * 101) % 300).collect::<Vec<u32>>();
    // (prefix already cached, new tokens): prefill, decode, chunked prefill, decode.
    let seqs = [(ids(1, 0), ids(2, 9)), (ids(3, 7), ids(4, 1)), (ids(5, 4), ids(6, 3)), (ids(7, 12), ids(8, 1))];
    let mut singles = Vec::new();
    let mut caches = Vec::new();
    for (prefix, chunk) in &seqs {
        let (logits, cache) = alone(&model, prefix, chunk);
        singles.push(logits);
        caches.push(cache);
    }
    let mut batch = PackedBatch::default();
    for (prefix, chunk) in &seqs {
        batch.push(chunk, prefix.len());
    }
    let packed = model.forward(&batch, &mut BatchCaches(caches.iter_mut().collect()), LogitsAt::All).unwrap();
    let mut start = 0;
    for (i, single) in singles.iter().enumerate() {
        let n = single.dim(0).unwrap();
        let err = rel_err(&packed.narrow(0, start, n).unwrap(), single);
        assert!(err < 1e-4, "sequence {i}: rel err {err}");
        start += n;
    }
    // Last-position logits pick the same rows.
    let mut caches2: Vec<SeqCache> = seqs.iter().map(|(p, c)| alone(&model, p, c).1).collect();
    let last = model.forward(&batch, &mut BatchCaches(caches2.iter_mut().collect()), LogitsAt::Last).unwrap();
    for (i, single) in singles.iter().enumerate() {
        let n = single.dim(0).unwrap();
        let err = rel_err(&last.get(i).unwrap(), &single.get(n - 1).unwrap());
        assert!(err < 1e-4, "sequence {i} last: rel err {err}");
    }
}

#[test]
fn paged_cache_gives_the_contiguous_cache_logits_and_frees_its_blocks() {
    use lab::engine::kv::paged::{BlockTable, PagedKvCache};
    let model = random_llama(12);
    let cfg = model.config().clone();
    let mut paged = PagedKvCache::new(&cfg, 16, 4, candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut tables = vec![BlockTable::default(), BlockTable::default()];
    let mut contiguous = vec![SeqCache::new(cfg.num_hidden_layers, 4), SeqCache::new(cfg.num_hidden_layers, 4)];
    // Chunked prefill of 6 and 9 tokens, then three decode steps, crossing block boundaries.
    let steps: Vec<[Vec<u32>; 2]> = vec![
        [vec![1, 2, 3, 4, 5, 6], vec![7, 8, 9, 10, 11, 12, 13, 14, 15]],
        [vec![16], vec![17]],
        [vec![18], vec![19]],
        [vec![20], vec![21]],
    ];
    for step in &steps {
        let mut batch = PackedBatch::default();
        for (s, toks) in step.iter().enumerate() {
            let past = tables[s].len();
            assert!(paged.reserve(&mut tables[s], past + toks.len()));
            batch.push(toks, past);
        }
        let want = model.forward(&batch, &mut BatchCaches(contiguous.iter_mut().collect()), LogitsAt::All).unwrap();
        let got = model.forward(&batch, &mut paged.batch(tables.iter_mut().collect()), LogitsAt::All).unwrap();
        assert!(rel_err(&got, &want) < 1e-6);
    }
    assert_eq!(tables[0].len(), 9);
    assert_eq!(paged.num_free_blocks(), 16 - 3 - 3);
    for t in tables.iter_mut() {
        paged.release(t);
    }
    assert_eq!(paged.num_free_blocks(), 16);
    let mut big = BlockTable::default();
    assert!(!paged.reserve(&mut big, 65), "more positions than the pool holds");
    assert_eq!(paged.num_free_blocks(), 16, "a failed reserve takes nothing");
}

/// The in-place paged path (the CUDA path's plan, run here with its ops' CPU reference forms)
/// gives the per-sequence path's logits on mixed steps: fresh prefills, chunks continuing a
/// cached past, decodes, with and without adapters; and it leaves the tables at the same lengths.
#[test]
fn in_place_paged_attention_equals_the_per_sequence_path() {
    use lab::engine::kv::paged::{BlockTable, PagedKvCache};
    use lab::engine::lora::op::LoraWeights;
    use lab::engine::lora::{LoraAdapter, LoraModule};
    let reference = random_llama(21);
    let in_place = reference.clone().with_paged_kernels(true);
    let cfg = reference.config().clone();
    let a = crate::util::random_adapter(&cfg, 4, &LoraModule::ALL, false, 5);
    let b = crate::util::random_adapter(&cfg, 2, &[LoraModule::Q, LoraModule::V], true, 6);
    let list: Vec<&LoraAdapter> = vec![&a, &b];
    let lora = Some(&list as &dyn LoraWeights);
    let new_pool = || PagedKvCache::new(&cfg, 32, 4, candle_core::DType::F32, &Device::Cpu).unwrap();
    let (mut p_ref, mut p_new) = (new_pool(), new_pool());
    let mut t_ref = vec![BlockTable::default(); 3];
    let mut t_new = vec![BlockTable::default(); 3];
    let steps: Vec<[(Vec<u32>, Option<usize>); 3]> = vec![
        [(vec![1, 2, 3, 4, 5, 6], Some(0)), (vec![7, 8, 9], None), (vec![10], Some(1))],
        [(vec![11, 12, 13, 14, 15], Some(0)), (vec![16], None), (vec![17], Some(1))],
        [(vec![18], Some(0)), (vec![19, 20, 21, 22, 23, 24, 25], None), (vec![26], Some(1))],
        [(vec![27], Some(0)), (vec![28], None), (vec![29], Some(1))],
    ];
    for step in &steps {
        let mut batch = PackedBatch::default();
        for (s, (toks, slot)) in step.iter().enumerate() {
            let past = t_ref[s].len();
            assert!(p_ref.reserve(&mut t_ref[s], past + toks.len()) && p_new.reserve(&mut t_new[s], past + toks.len()));
            batch.push_with_slot(toks, past, *slot);
        }
        let want =
            reference.forward_lora(&batch, &mut p_ref.batch(t_ref.iter_mut().collect()), lora, LogitsAt::All).unwrap();
        let got =
            in_place.forward_lora(&batch, &mut p_new.batch(t_new.iter_mut().collect()), lora, LogitsAt::All).unwrap();
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "rel err {err}");
        assert_eq!(
            t_ref.iter().map(|t| t.len()).collect::<Vec<_>>(),
            t_new.iter().map(|t| t.len()).collect::<Vec<_>>()
        );
    }
}
