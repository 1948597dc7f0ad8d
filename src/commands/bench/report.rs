//! `lab bench` output: a markdown table (what BENCHMARKS.md pastes) or JSON lines.

use serde_json::json;

use super::BenchRun;
use crate::cli::BenchArgs;
use crate::engine::load::LoadedModel;

const GB: f64 = 1e9;

fn floor_ms(run: &BenchRun, bytes: f64) -> Option<f64> {
    run.ceilings.map(|c| bytes / c.copy_bytes_per_s * 1e3)
}

pub fn print_table(run: &BenchRun, m: &LoadedModel, args: &BenchArgs) {
    let tag = if run.synthetic { " [synthetic weights: seeded random, for speed only]" } else { "" };
    println!(
        "model {}{tag}, {:?}, device {} ({}), load {:.1} s, adapters rank {} on all 7 projections",
        run.model, run.dtype, run.device, run.device_name, run.load_s, args.lora_rank
    );
    println!("weights read per decode step: {:.2} GB ({} parameters)", run.weight_bytes / GB, m.model.num_parameters());
    if let Some(c) = run.ceilings {
        let mm = c
            .matmul_flop_per_s
            .map(|f| format!(", {:?} matmul 8192^3 {:.0} TFLOP/s", run.dtype, f / 1e12))
            .unwrap_or_default();
        println!("measured here: copy {:.0} GB/s (read + write){mm}", c.copy_bytes_per_s / GB);
    }
    println!();
    println!("| batch | adapters | mode | context | decode step ms | floor ms | x floor | decode tok/s |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|");
    for p in &run.decode {
        let (f, x) = match floor_ms(run, p.floor_bytes) {
            Some(f) => (format!("{f:.2}"), format!("{:.2}", p.step_ms / f)),
            None => ("-".into(), "-".into()),
        };
        let tps = p.batch as f64 / (p.step_ms / 1e3);
        let mode = if p.graph { "graph" } else { "eager" };
        println!("| {} | {} | {mode} | {} | {:.2} | {f} | {x} | {tps:.0} |", p.batch, p.adapters, p.context, p.step_ms);
    }
    let loaded: Vec<_> = run.decode.iter().filter_map(|p| p.loading.map(|l| (p, l))).collect();
    if !loaded.is_empty() {
        println!();
        println!("decode steps while adapter hot loads run back to back (graph points):");
        println!("| batch | adapters | step ms | with loads ms | ratio | loads landed |");
        println!("|---:|---:|---:|---:|---:|---:|");
        for (p, (ms, landed)) in loaded {
            println!(
                "| {} | {} | {:.2} | {ms:.2} | {:.3} | {landed} |",
                p.batch,
                p.adapters,
                p.step_ms,
                ms / p.step_ms
            );
        }
    }
    if let Some((p, bytes)) = &run.stock {
        let x = floor_ms(run, *bytes)
            .map(|f| format!(", {:.2} x its floor ({f:.2} ms)", p.step_ms / f))
            .unwrap_or_default();
        println!();
        println!(
            "stock candle-transformers llama (same weights, its own KV cache), batch 1, context {}: {:.2} ms per step{x}",
            p.context, p.step_ms
        );
    }
    if !run.prefill.is_empty() {
        println!();
        println!("| prefill tokens | ms | tokens/s | matmul floor ms | x floor |");
        println!("|---:|---:|---:|---:|---:|");
        for p in &run.prefill {
            let tps = p.len as f64 / (p.ms / 1e3);
            let (f, x) = match run.ceilings.and_then(|c| c.matmul_flop_per_s) {
                Some(rate) => (format!("{:.2}", p.flop / rate * 1e3), format!("{:.2}", p.ms / (p.flop / rate * 1e3))),
                None => ("-".into(), "-".into()),
            };
            println!("| {} | {:.1} | {tps:.0} | {f} | {x} |", p.len, p.ms);
        }
    }
    if !run.profile.is_empty() {
        println!();
        println!("where a base decode step goes (isolated re-runs; rest = other ops and launch gaps):");
        println!(
            "| batch | context | step ms | host enqueue ms | GEMMs alone ms | (cuBLAS: ms) | attention alone ms | rest ms |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        for p in &run.profile {
            let rest = p.step_ms - p.gemm_ms - p.attention_ms;
            println!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {rest:.2} |",
                p.batch, p.context, p.step_ms, p.enqueue_ms, p.gemm_ms, p.cublas_ms, p.attention_ms
            );
        }
        for p in run.profile.iter().filter(|p| p.lora_ms.is_some()) {
            let (on, off) = p.lora_ms.expect("filtered");
            println!(
                "batch {}: the step's batched LoRA launches alone, {} adapters: {on:.2} ms (all rows base-only, i.e. their fixed cost: {off:.2} ms)",
                p.batch,
                args.adapters.iter().copied().max().unwrap_or(0).min(p.batch)
            );
        }
    }
    println!();
    println!(
        "adapter load (rank {}, all 7 projections, PEFT safetensors in the page cache -> usable slot, median of 5): {:.1} ms = read + validate into host memory {:.1} ms + page-locked image {:.1} ms + copy into the slot {:.1} ms ({})",
        args.lora_rank,
        run.adapter_load.total_ms,
        run.adapter_load.read_ms,
        run.adapter_load.stage_ms,
        run.adapter_load.copy_ms,
        if run.adapter_load.pinned { "DMA from the image on the copy stream" } else { "synchronous copy from the tensors" }
    );
    if run.adapter_load.pinned {
        println!(
            "  (the image reuses a page-locked buffer of an earlier one; the first, which pins a new buffer: {:.1} ms)",
            run.adapter_load.stage_first_ms
        );
    }
    if let Some(b) = run.device_mem_used {
        println!("device memory in use at the end (caching pool high-water mark): {:.1} GB", b as f64 / GB);
    }
}

/// One JSON object per point, then a summary.
pub fn json_lines(run: &BenchRun, m: &LoadedModel, args: &BenchArgs) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    let common = json!({"model": run.model, "synthetic": run.synthetic, "device": run.device,
        "device_name": run.device_name, "dtype": format!("{:?}", run.dtype), "lora_rank": args.lora_rank});
    for p in &run.decode {
        let f = floor_ms(run, p.floor_bytes);
        lines.push(
            json!({"what": "decode", "run": common, "batch": p.batch, "adapters": p.adapters, "graph": p.graph, "context": p.context,
                   "step_ms": p.step_ms, "floor_ms": f, "floor_ratio": f.map(|f| p.step_ms / f),
                   "floor_GB": p.floor_bytes / GB, "tokens_per_s": p.batch as f64 / (p.step_ms / 1e3),
                   "step_ms_with_loads": p.loading.map(|l| l.0), "loads_landed": p.loading.map(|l| l.1)}),
        );
    }
    for p in &run.prefill {
        let rate = run.ceilings.and_then(|c| c.matmul_flop_per_s);
        lines.push(json!({"what": "prefill", "run": common, "tokens": p.len, "ms": p.ms,
                   "tokens_per_s": p.len as f64 / (p.ms / 1e3), "flop": p.flop,
                   "matmul_floor_ms": rate.map(|r| p.flop / r * 1e3)}));
    }
    if let Some((p, bytes)) = &run.stock {
        let f = floor_ms(run, *bytes);
        lines.push(json!({"what": "stock_candle_decode", "run": common, "batch": 1, "context": p.context,
                   "step_ms": p.step_ms, "floor_ms": f, "floor_ratio": f.map(|f| p.step_ms / f)}));
    }
    for p in &run.profile {
        lines.push(
            json!({"what": "profile", "run": common, "batch": p.batch, "context": p.context, "step_ms": p.step_ms,
                          "enqueue_ms": p.enqueue_ms, "gemm_ms": p.gemm_ms, "cublas_ms": p.cublas_ms, "attention_ms": p.attention_ms}),
        );
    }
    lines.push(json!({"what": "summary", "run": common, "load_s": run.load_s, "parameters": m.model.num_parameters(),
               "weight_GB_read_per_step": run.weight_bytes / GB,
               "copy_GBps": run.ceilings.map(|c| c.copy_bytes_per_s / GB),
               "matmul_TFLOPs": run.ceilings.and_then(|c| c.matmul_flop_per_s).map(|f| f / 1e12),
               "adapter_load_ms": run.adapter_load.total_ms,
               "adapter_read_ms": run.adapter_load.read_ms, "adapter_stage_ms": run.adapter_load.stage_ms,
               "adapter_stage_first_ms": run.adapter_load.stage_first_ms,
               "adapter_copy_ms": run.adapter_load.copy_ms, "adapter_copy_pinned": run.adapter_load.pinned,
               "device_mem_used_GB": run.device_mem_used.map(|b| b as f64 / GB)}));
    lines
}
