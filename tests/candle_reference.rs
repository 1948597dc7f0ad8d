//! Logit parity against an implementation no one here wrote: candle-transformers'
//! `quantized_llama` on the default GGUF, with every weight dequantized to f32
//! (`CANDLE_DEQUANTIZE_ALL`; its default quantized matmul also quantizes activations).

mod util;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use lab::engine::kv::{BatchCaches, SeqCache};
use lab::engine::load::gguf::GgufFile;
use lab::engine::model::{Llama, LogitsAt, PackedBatch};
use lab::engine::sampling::argmax;
use lab::engine::text::tokenizer::{ChatMessage, Tokenizer};

const PROMPTS: [&str; 5] = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "List three colours of the rainbow.",
    "Explain in one sentence what a GPU is.",
    "Translate 'good morning' into German.",
];
const STEPS: usize = 32;

fn reference_greedy(path: &std::path::Path, prompt: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let mut f = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut model = ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let mut input = prompt.to_vec();
    let (mut out, mut first) = (Vec::new(), Vec::new());
    let mut pos = 0;
    for _ in 0..STEPS {
        let x = Tensor::new(input.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&x, pos).unwrap().squeeze(0).unwrap().to_dtype(DType::F32).unwrap();
        let v = logits.to_vec1::<f32>().unwrap();
        if first.is_empty() {
            first = v.clone();
        }
        pos += input.len();
        let id = argmax(&v);
        out.push(id);
        input = vec![id];
    }
    (out, first)
}

fn lab_greedy(model: &Llama, prompt: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let mut cache = SeqCache::new(model.config().num_hidden_layers, 64);
    let mut input = prompt.to_vec();
    let (mut out, mut first) = (Vec::new(), Vec::new());
    for _ in 0..STEPS {
        let mut b = PackedBatch::default();
        b.push(&input, cache.len());
        let logits = model.forward(&b, &mut BatchCaches(vec![&mut cache]), LogitsAt::Last).unwrap();
        let v = logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        if first.is_empty() {
            first = v.clone();
        }
        let id = argmax(&v);
        out.push(id);
        input = vec![id];
    }
    (out, first)
}

#[test]
fn default_gguf_matches_candle_quantized_llama_dequantized() {
    // SAFETY of the env write: this test binary has this single test, nothing reads env concurrently.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let path = util::default_gguf();
    let gguf = GgufFile::open(&path).unwrap();
    let cfg = gguf.config().unwrap();
    let tensors = gguf.hf_tensors(&cfg, DType::F32, &Device::Cpu).unwrap();
    let model = Llama::load(candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), &cfg).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    for p in PROMPTS {
        let text = tok.apply_chat_template(&[ChatMessage::new("user", p)], true).unwrap();
        let ids = tok.encode(&text).unwrap();
        let (want_ids, want_first) = reference_greedy(&path, &ids);
        let (got_ids, got_first) = lab_greedy(&model, &ids);
        let diff = got_first.iter().zip(&want_first).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = want_first.iter().map(|v| v.abs()).fold(0f32, f32::max);
        assert!(diff / scale < 1e-3, "{p:?}: first-step logits rel err {}", diff / scale);
        assert_eq!(got_ids, want_ids, "{p:?}: greedy continuation");
        eprintln!("{p:?}: rel err {:.2e}, continuation {:?}", diff / scale, tok.decode(&got_ids, true).unwrap());
    }
}
