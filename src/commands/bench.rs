//! `lab bench`: prefill and decode throughput of the engine per batch size and number of
//! distinct adapters, plus adapter load time (file to usable slot).
//!
//! Prompts are random token ids (the same for every run); each sequence gets its own KV cache
//! and all sequences run in one packed forward per step, as the server runs them. Benchmark
//! adapters are random rank-`--lora-rank` LoRAs on all seven projections.

use std::time::Instant;

use candle_core::{DType, Device};
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::{device_and_dtype, report_loaded};
use crate::cli::BenchArgs;
use crate::engine::kv_cache::{BatchCaches, SeqCache};
use crate::engine::loader::{load_model, LoadedModel};
use crate::engine::lora::LoraAdapter;
use crate::engine::lora_slots::SlotBank;
use crate::engine::model::{LogitsAt, PackedBatch};
use crate::engine::source::{lab_home, ModelSource};

/// Timings of one (batch size, adapters) point.
struct Row {
    batch: usize,
    adapters: usize,
    prefill_ms: f64,
    step_ms: f64,
}

/// Runs `lab bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let (device, dtype) = device_and_dtype(&args.model)?;
    let source = ModelSource::parse(args.model.model.as_deref())?;
    let loaded = load_model(&source, &lab_home(), dtype, &device)?;
    report_loaded(&loaded);
    let max_adapters = args.adapters.iter().copied().max().unwrap_or(0);
    let bank = adapter_bank(&loaded, max_adapters, args.lora_rank, dtype, &device)?;
    let mut rows = Vec::new();
    for &b in &args.batch {
        for &n in &args.adapters {
            let row = bench_point(&loaded, &bank, b, n, args)?;
            if args.json {
                println!(
                    "{}",
                    json!({"model": loaded.name, "synthetic": loaded.synthetic, "device": args.model.device,
                           "dtype": format!("{dtype:?}"), "batch": row.batch, "adapters": row.adapters,
                           "lora_rank": args.lora_rank, "prompt_len": args.prompt_len, "prefill_ms": row.prefill_ms,
                           "prefill_tokens_per_s": (b * args.prompt_len) as f64 / (row.prefill_ms / 1e3),
                           "decode_step_ms": row.step_ms, "decode_tokens_per_s": b as f64 / (row.step_ms / 1e3)})
                );
            }
            rows.push(row);
        }
    }
    let load_ms = adapter_load_ms(&loaded, args.lora_rank, dtype, &device)?;
    if !args.json {
        print_table(&loaded, args, dtype, &rows);
        println!(
            "adapter load (rank {}, all 7 projections, safetensors file -> usable slot): {load_ms:.1} ms",
            args.lora_rank
        );
    }
    Ok(())
}

fn print_table(m: &LoadedModel, args: &BenchArgs, dtype: DType, rows: &[Row]) {
    let tag = if m.synthetic { " [synthetic weights]" } else { "" };
    println!(
        "model {}{tag} ({dtype:?}, {}), prompt {} tokens, {} decode steps, adapters rank {}",
        m.name, args.model.device, args.prompt_len, args.decode_steps, args.lora_rank
    );
    println!("| batch | adapters | prefill ms | prefill tok/s | decode step ms | decode tok/s |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let prefill = (r.batch * args.prompt_len) as f64 / (r.prefill_ms / 1e3);
        let decode = r.batch as f64 / (r.step_ms / 1e3);
        println!(
            "| {} | {} | {:.1} | {prefill:.0} | {:.2} | {decode:.1} |",
            r.batch, r.adapters, r.prefill_ms, r.step_ms
        );
    }
}

/// A slot bank holding `n` distinct random adapters in slots `0..n`.
fn adapter_bank(m: &LoadedModel, n: usize, rank: usize, dtype: DType, device: &Device) -> anyhow::Result<SlotBank> {
    let cfg = m.model.config();
    let mut bank = SlotBank::new(cfg, n.max(1), rank, dtype, device)?;
    for slot in 0..n {
        bank.write(slot, &LoraAdapter::random(cfg, rank, 1000 + slot as u64, dtype, device)?)?;
    }
    Ok(bank)
}

/// Saves one random adapter as PEFT files, then times load + validation + copy into a slot.
fn adapter_load_ms(m: &LoadedModel, rank: usize, dtype: DType, device: &Device) -> anyhow::Result<f64> {
    let cfg = m.model.config();
    let dir = std::env::temp_dir().join(format!("lab-bench-adapter-{}", std::process::id()));
    LoraAdapter::random(cfg, rank, 7, DType::F32, &Device::Cpu)?.save(&dir)?;
    let mut bank = SlotBank::new(cfg, 1, rank, dtype, device)?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let a = LoraAdapter::load(&dir, cfg, rank, dtype, device)?;
        bank.write(0, &a)?;
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(best)
}

fn bench_point(
    m: &LoadedModel,
    bank: &SlotBank,
    batch: usize,
    adapters: usize,
    args: &BenchArgs,
) -> anyhow::Result<Row> {
    let cfg = m.model.config();
    let mut rng = rand::rngs::StdRng::seed_from_u64(batch as u64);
    let vocab = m.tokenizer.vocab_size().min(cfg.vocab_size) as u32;
    let slot = |i: usize| (adapters > 0).then_some(i % adapters.max(1));
    let mut caches: Vec<SeqCache> = (0..batch).map(|_| SeqCache::new(cfg.num_hidden_layers, 512)).collect();
    let mut prefill = PackedBatch::default();
    for i in 0..batch {
        let prompt: Vec<u32> = (0..args.prompt_len).map(|_| rng.gen_range(0..vocab)).collect();
        prefill.push_with_slot(&prompt, 0, slot(i));
    }
    let device = m.model.device();
    let t = Instant::now();
    m.model.forward_lora(&prefill, &mut BatchCaches(caches.iter_mut().collect()), Some(bank), LogitsAt::Last)?;
    device.synchronize()?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut step = |pos: usize| -> anyhow::Result<()> {
        let mut b = PackedBatch::default();
        for i in 0..batch {
            b.push_with_slot(&[(pos as u32 + i as u32) % vocab], pos, slot(i));
        }
        m.model.forward_lora(&b, &mut BatchCaches(caches.iter_mut().collect()), Some(bank), LogitsAt::Last)?;
        Ok(())
    };
    step(args.prompt_len)?; // warm-up
    device.synchronize()?;
    let t = Instant::now();
    for s in 0..args.decode_steps {
        step(args.prompt_len + 1 + s)?;
    }
    device.synchronize()?;
    let step_ms = t.elapsed().as_secs_f64() * 1e3 / args.decode_steps.max(1) as f64;
    Ok(Row { batch, adapters, prefill_ms, step_ms })
}
