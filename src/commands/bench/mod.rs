//! `lab bench`: decode step time per batch size and number of distinct adapters, prefill
//! tokens/s per prompt length, adapter load time (PEFT files -> usable slot) and device memory;
//! with `--floor`, each decode step beside its floor measured in the same process.
//!
//! Sequences live in the paged KV pool, as the server runs them; prompts are random token ids
//! (seeded); benchmark adapters are random rank-`--lora-rank` LoRAs on all seven projections.

mod floor;
mod points;
mod profile;
mod report;
mod stock;

use std::time::Instant;

use candle_core::{DType, Device};

use super::{device_and_dtype, report_loaded};
use crate::cli::BenchArgs;
use crate::engine::load::source::{lab_home, ModelSource};
use crate::engine::load::{load_model, LoadedModel};
use crate::engine::lora::slots::SlotBank;
use crate::engine::lora::LoraAdapter;
use crate::engine::model::Skinny;
use points::{DecodePoint, PrefillPoint};

/// Everything one `lab bench` run measured.
pub struct BenchRun {
    pub model: String,
    pub synthetic: bool,
    pub device: String,
    pub device_name: String,
    pub dtype: DType,
    pub load_s: f64,
    pub ceilings: Option<floor::Ceilings>,
    pub weight_bytes: f64,
    pub decode: Vec<DecodePoint>,
    pub prefill: Vec<PrefillPoint>,
    /// Hot load, total and its two halves (median of each).
    pub adapter_load: AdapterLoad,
    pub profile: Vec<profile::StepProfile>,
    /// `--stock-candle`: the candle-transformers Llama's batch-1 step and its floor bytes.
    pub stock: Option<(stock::StockPoint, f64)>,
    /// Device memory in use at the end (the caching pool keeps its high-water mark), bytes.
    pub device_mem_used: Option<usize>,
}

/// Runs `lab bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let (device, dtype) = device_and_dtype(&args.model)?;
    let source = ModelSource::parse(args.model.model.as_deref())?;
    let t = Instant::now();
    let mut loaded = load_model(&source, &lab_home(), dtype, &device)?;
    let load_s = t.elapsed().as_secs_f64();
    if let Some(rows) = args.skinny_gemm_rows {
        anyhow::ensure!(rows <= 8, "--skinny-gemm-rows {rows}: the kernel takes at most 8 rows");
        let skinny = loaded.model.skinny();
        loaded.model = loaded.model.with_skinny(Skinny { rows, ..skinny });
    }
    if args.early_start {
        let skinny = loaded.model.skinny();
        loaded.model = loaded.model.with_skinny(Skinny { early_start: true, ..skinny });
    }
    if args.no_grouped_attention {
        loaded.model = loaded.model.with_grouped_attention(false);
    }
    if args.no_fused_layers {
        loaded.model = loaded.model.without_fused_projections();
    }
    report_loaded(&loaded);
    let ceilings = if args.floor { Some(floor::measure(&device, dtype)?) } else { None };
    let max_adapters = args.adapters.iter().copied().max().unwrap_or(0);
    let bank = adapter_bank(&loaded, max_adapters, args.lora_rank, dtype, &device)?;
    let mut decode = Vec::new();
    for &b in &args.batch {
        decode.extend(points::decode_points(&loaded, &bank, b, args)?);
    }
    let prefill = args
        .prefill_len
        .iter()
        .filter(|&&l| l > 0)
        .map(|&l| points::prefill_point(&loaded, l, args.repeats))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let stock = if args.stock_candle {
        let p = stock::decode_point(&loaded, args.prompt_len, args.decode_steps, args.repeats)?;
        let cfg = loaded.model.config();
        let bytes = floor::weight_bytes_read(&loaded.model) + floor::kv_bytes_read(cfg, p.context, dtype);
        Some((p, bytes))
    } else {
        None
    };
    let adapter_load = adapter_load(&loaded, args.lora_rank, dtype, &device)?;
    let profile = if args.profile {
        args.batch
            .iter()
            .map(|&b| {
                let n = max_adapters.min(b);
                profile::profile_step(&loaded, &bank, n, b, args.prompt_len, args.repeats.max(3))
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        Vec::new()
    };
    let run = BenchRun {
        model: loaded.name.clone(),
        synthetic: loaded.synthetic,
        device: args.model.device.clone(),
        device_name: device_name(&device),
        dtype,
        load_s,
        ceilings,
        weight_bytes: floor::weight_bytes_read(&loaded.model),
        decode,
        prefill,
        adapter_load,
        profile,
        stock,
        device_mem_used: device_mem_used(&device),
    };
    let lines = report::json_lines(&run, &loaded, args);
    if args.json {
        lines.iter().for_each(|l| println!("{l}"));
    } else {
        report::print_table(&run, &loaded, args);
    }
    if let Some(path) = &args.json_out {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(path, text).map_err(|e| anyhow::anyhow!("--json-out {}: {e}", path.display()))?;
    }
    Ok(())
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

/// Saves one random adapter as PEFT files in the run dtype (84 MB for rank 16 on the 8B in
/// bf16), then times what `lab serve` does for a hot load: read + validate into host memory
/// (the `--max-cpu-loras` tier), lay it out in page-locked memory (CUDA: what the loader
/// thread does), then copy it into a device slot until the slot is published (median of 5;
/// the files sit in the page cache after the first read).
fn adapter_load(m: &LoadedModel, rank: usize, dtype: DType, device: &Device) -> anyhow::Result<AdapterLoad> {
    let cfg = m.model.config();
    let dir = std::env::temp_dir().join(format!("lab-bench-adapter-{}", std::process::id()));
    LoraAdapter::random(cfg, rank, 7, dtype, &Device::Cpu)?.save_as(&dir, dtype)?;
    let mut bank = SlotBank::new(cfg, 1, rank, dtype, device)?;
    let stager = bank.stager();
    let (mut total, mut read, mut stage, mut copy) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..6 {
        device.synchronize()?;
        let t = Instant::now();
        let a = LoraAdapter::load(&dir, cfg, rank, dtype, &Device::Cpu)?;
        let t_read = t.elapsed().as_secs_f64();
        let image = stager.as_ref().map(|s| s.stage(&a)).transpose()?;
        let t_stage = t.elapsed().as_secs_f64();
        match &image {
            Some(image) => {
                let write = bank.begin_write(0, &a, image)?;
                while !bank.poll_write(&write)? {
                    std::hint::spin_loop();
                }
            }
            None => bank.write(0, &a)?,
        }
        device.synchronize()?;
        let t_all = t.elapsed().as_secs_f64();
        total.push(t_all * 1e3);
        read.push(t_read * 1e3);
        stage.push((t_stage - t_read) * 1e3);
        copy.push((t_all - t_stage) * 1e3);
    }
    let _ = std::fs::remove_dir_all(&dir);
    // The first run reads the file from disk; the rest find it in the page cache.
    let med = |v: &mut Vec<f64>| floor::median(&mut v[1..]);
    Ok(AdapterLoad {
        stage_first_ms: stage[0],
        total_ms: med(&mut total),
        read_ms: med(&mut read),
        stage_ms: med(&mut stage),
        copy_ms: med(&mut copy),
        pinned: stager.is_some(),
    })
}

/// An adapter hot load (PEFT files -> usable slot), median of 5 warm runs, in ms.
#[derive(Debug, Clone, Copy)]
pub struct AdapterLoad {
    pub total_ms: f64,
    /// Read + validate into host memory (the `--max-cpu-loras` tier).
    pub read_ms: f64,
    /// Laid out in page-locked memory for the slot (CUDA; 0 elsewhere), into a buffer that an
    /// earlier image left in the pool.
    pub stage_ms: f64,
    /// The same for the first run, which pins a new buffer.
    pub stage_first_ms: f64,
    /// Host memory -> the device slot, until the slot is published.
    pub copy_ms: f64,
    /// Whether the copy came from a page-locked image (asynchronous, on the copy stream).
    pub pinned: bool,
}

#[cfg(feature = "cuda")]
fn device_name(device: &Device) -> String {
    match device {
        Device::Cuda(_) => crate::engine::cuda::device_name(device).unwrap_or_else(|_| "cuda".into()),
        _ => "cpu".into(),
    }
}

#[cfg(not(feature = "cuda"))]
fn device_name(_device: &Device) -> String {
    "cpu".into()
}

#[cfg(feature = "cuda")]
fn device_mem_used(device: &Device) -> Option<usize> {
    device.is_cuda().then(|| crate::engine::cuda::mem_info(device).ok().map(|(free, total)| total - free)).flatten()
}

#[cfg(not(feature = "cuda"))]
fn device_mem_used(_device: &Device) -> Option<usize> {
    None
}
