//! `lab bench`: prefill and decode throughput of the engine, per batch size.
//!
//! Prompts are random token ids (the same for every run); each sequence gets its own KV cache
//! and all sequences run in one packed forward per step, as the server will run them.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde_json::json;

use super::{device_and_dtype, report_loaded};
use crate::cli::BenchArgs;
use crate::engine::kv_cache::{BatchCaches, SeqCache};
use crate::engine::loader::{load_model, LoadedModel};
use crate::engine::model::{LogitsAt, PackedBatch};
use crate::engine::source::{lab_home, ModelSource};

/// Timings of one batch size.
struct Row {
    batch: usize,
    prefill_ms: f64,
    prefill_tok_s: f64,
    step_ms: f64,
    decode_tok_s: f64,
}

/// Runs `lab bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let (device, dtype) = device_and_dtype(&args.model)?;
    let source = ModelSource::parse(args.model.model.as_deref())?;
    let loaded = load_model(&source, &lab_home(), dtype, &device)?;
    report_loaded(&loaded);
    let mut rows = Vec::new();
    for &b in &args.batch {
        let row = bench_batch(&loaded, b, args)?;
        if args.json {
            println!(
                "{}",
                json!({"model": loaded.name, "synthetic": loaded.synthetic, "device": args.model.device,
                       "dtype": format!("{dtype:?}"), "batch": row.batch, "prompt_len": args.prompt_len,
                       "prefill_ms": row.prefill_ms, "prefill_tokens_per_s": row.prefill_tok_s,
                       "decode_step_ms": row.step_ms, "decode_tokens_per_s": row.decode_tok_s})
            );
        }
        rows.push(row);
    }
    if !args.json {
        println!(
            "model {} ({dtype:?}, {}), prompt {} tokens, {} decode steps",
            loaded.name, args.model.device, args.prompt_len, args.decode_steps
        );
        println!("| batch | prefill ms | prefill tok/s | decode step ms | decode tok/s |");
        println!("|---:|---:|---:|---:|---:|");
        for r in rows {
            println!(
                "| {} | {:.1} | {:.0} | {:.2} | {:.1} |",
                r.batch, r.prefill_ms, r.prefill_tok_s, r.step_ms, r.decode_tok_s
            );
        }
    }
    Ok(())
}

fn bench_batch(m: &LoadedModel, batch: usize, args: &BenchArgs) -> anyhow::Result<Row> {
    let cfg = m.model.config();
    let mut rng = rand::rngs::StdRng::seed_from_u64(batch as u64);
    let vocab = m.tokenizer.vocab_size().min(cfg.vocab_size) as u32;
    let mut caches: Vec<SeqCache> = (0..batch).map(|_| SeqCache::new(cfg.num_hidden_layers, 512)).collect();
    let mut prefill = PackedBatch::default();
    for _ in 0..batch {
        let prompt: Vec<u32> = (0..args.prompt_len).map(|_| rng.gen_range(0..vocab)).collect();
        prefill.push(&prompt, 0);
    }
    let t = Instant::now();
    m.model.forward(&prefill, &mut BatchCaches(caches.iter_mut().collect()), LogitsAt::Last)?;
    sync(m)?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut step = |pos: usize| -> anyhow::Result<()> {
        let mut b = PackedBatch::default();
        for i in 0..batch {
            b.push(&[(pos as u32 + i as u32) % vocab], pos);
        }
        m.model.forward(&b, &mut BatchCaches(caches.iter_mut().collect()), LogitsAt::Last)?;
        Ok(())
    };
    step(args.prompt_len)?; // warm-up
    sync(m)?;
    let t = Instant::now();
    for s in 0..args.decode_steps {
        step(args.prompt_len + 1 + s)?;
    }
    sync(m)?;
    let step_ms = t.elapsed().as_secs_f64() * 1e3 / args.decode_steps.max(1) as f64;
    Ok(Row {
        batch,
        prefill_ms,
        prefill_tok_s: (batch * args.prompt_len) as f64 / (prefill_ms / 1e3),
        step_ms,
        decode_tok_s: batch as f64 / (step_ms / 1e3),
    })
}

fn sync(m: &LoadedModel) -> anyhow::Result<()> {
    Ok(m.model.device().synchronize()?)
}
