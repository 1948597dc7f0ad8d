//! `lab serve`: CLI flags -> [`ServeSettings`] once, load the model, run the server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use super::device_and_dtype;
use crate::cli::ServeArgs;
use crate::engine::graph::GraphConfig;
use crate::engine::kv::budget::{self as kv_budget, StepShape};
use crate::engine::kv::paged::PagedKvCache;
use crate::engine::load::load_model;
use crate::engine::load::source::{lab_home, ModelSource};
use crate::engine::lora::slots::SlotBank;
use crate::engine::scheduler::SchedulerConfig;
use crate::serve::ServeSettings;

/// Runs `lab serve`.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let (device, dtype) = device_and_dtype(&args.model)?;
    let lora_modules = parse_lora_modules(&args.lora_modules)?;
    let mut allowed_roots = args.allowed_lora_dirs.clone();
    let mut lora_dir_modules = Vec::new();
    if let Some(dir) = &args.lora_dir {
        lora_dir_modules = scan_lora_dir(dir)?;
        allowed_roots.push(dir.clone());
    }
    if args.max_loras == 0 {
        bail!("--max-loras must be at least 1");
    }
    // Every flag is checked before the (slow) model load.
    let fixed_kv_bytes = match &args.kv_cache_memory {
        Some(s) => Some(parse_bytes(s).with_context(|| format!("--kv-cache-memory {s}"))?),
        None if device.is_cuda() => None, // sized from --gpu-memory-utilization once the model is in
        None => Some(1 << 30),
    };
    if !(args.gpu_memory_utilization > 0.0 && args.gpu_memory_utilization <= 1.0) {
        bail!("--gpu-memory-utilization {} must be in (0, 1], e.g. 0.9", args.gpu_memory_utilization);
    }
    let source = ModelSource::parse(args.model.model.as_deref())?;
    let loaded = load_model(&source, &lab_home(), dtype, &device)?;
    super::report_loaded(&loaded);
    let cfg = loaded.model.config().clone();
    let kv_bytes = match fixed_kv_bytes {
        Some(b) => b,
        None => {
            let shape = StepShape {
                max_num_batched_tokens: args.max_num_batched_tokens,
                max_num_seqs: args.max_num_seqs,
                block_size: args.block_size,
            };
            let slots = SlotBank::bytes_for(&cfg, args.max_loras, args.max_lora_rank, dtype);
            let budget = kv_budget::profile(&loaded.model, dtype, shape, args.gpu_memory_utilization, slots)?;
            eprintln!("lab serve: {budget} ({:.1} GiB of adapter slots counted)", slots as f64 / (1u64 << 30) as f64);
            budget.kv_bytes
        }
    };
    let block_bytes = PagedKvCache::block_bytes(&cfg, args.block_size, dtype);
    let kv_blocks = kv_bytes / block_bytes;
    let kv_tokens = kv_blocks * args.block_size;
    if kv_blocks == 0 {
        bail!(
            "the KV cache holds no block (one of {} positions takes {block_bytes} bytes): raise --kv-cache-memory",
            args.block_size
        );
    }
    let max_model_len = args.max_model_len.unwrap_or(cfg.max_position_embeddings.min(kv_tokens));
    if max_model_len > kv_tokens {
        bail!(
            "--max-model-len {max_model_len} needs more KV cache than {kv_tokens} positions: raise --kv-cache-memory or --gpu-memory-utilization"
        );
    }
    if max_model_len > cfg.max_position_embeddings {
        bail!("--max-model-len {max_model_len} exceeds the model's {} positions", cfg.max_position_embeddings);
    }
    let settings = ServeSettings {
        host: args.host.clone(),
        port: args.port,
        served_model_name: args.served_model_name.clone().unwrap_or_else(|| loaded.name.clone()),
        lora_modules,
        lora_dir_modules,
        allowed_roots,
        runtime_updates: args.enable_lora_runtime_updates,
        max_loras: args.max_loras,
        max_cpu_loras: args.max_cpu_loras.unwrap_or(4 * args.max_loras),
        max_lora_rank: args.max_lora_rank,
        max_model_len,
        scheduler: SchedulerConfig {
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: args.max_num_batched_tokens.max(1),
            max_wait_steps: args.max_wait_steps,
            policy: args.scheduling_policy,
            max_running_per_tenant: args.max_running_per_tenant,
            fair_preemption: args.fair_preemption,
        },
        kv_blocks,
        block_size: args.block_size,
        max_waiting: args.max_waiting,
        max_waiting_per_model: args.max_waiting_per_model.unwrap_or(args.max_waiting),
        tenant_rate_limit: args.tenant_rate_limit,
        api_key: args.api_key.clone(),
        max_body_bytes: args.max_body_bytes,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        prefix_caching: !args.no_enable_prefix_caching,
        graphs: (!args.enforce_eager)
            .then_some(GraphConfig { max_batch: args.max_num_seqs, max_context: max_model_len }),
        conn: crate::serve::conn::ConnLimits {
            header_timeout: Duration::from_secs(args.header_timeout),
            idle_timeout: Duration::from_secs(args.idle_timeout),
            max_connections: args.max_connections,
        },
    };
    eprintln!(
        "lab serve: KV cache {kv_blocks} blocks x {} positions ({} MiB), max model len {max_model_len}, {} adapter slots, {} adapters (+ {} found in --lora-dir)",
        args.block_size,
        kv_blocks * block_bytes >> 20,
        settings.max_loras,
        settings.lora_modules.len(),
        settings.lora_dir_modules.len()
    );
    crate::serve::run(settings, loaded, device, dtype)?;
    Ok(())
}

/// `NAME=PATH` pairs.
fn parse_lora_modules(specs: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    specs
        .iter()
        .map(|spec| {
            let (name, path) =
                spec.split_once('=').with_context(|| format!("--lora-modules {spec}: expected NAME=PATH"))?;
            if let Some(why) = crate::serve::catalog::invalid_adapter_name(name) {
                bail!("--lora-modules {spec}: {why}");
            }
            Ok((name.to_string(), PathBuf::from(path)))
        })
        .collect()
}

/// Every subdirectory of `dir` holding an `adapter_config.json`, named after the folder.
fn scan_lora_dir(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("--lora-dir {}", dir.display()))?;
    for e in entries {
        let path = e?.path();
        if path.join("adapter_config.json").is_file() {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match crate::serve::catalog::invalid_adapter_name(&name) {
                None => out.push((name, path)),
                Some(why) => eprintln!("lab serve: skipping {} in --lora-dir: {why}", path.display()),
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `2GiB`, `512MiB`, `1.5GB`, `1073741824`.
pub(crate) fn parse_bytes(s: &str) -> anyhow::Result<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().context("expected a number with an optional unit (KiB, MiB, GiB, KB, MB, GB)")?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        u => bail!("unknown unit {u} (use KiB, MiB, GiB, KB, MB or GB)"),
    };
    Ok((n * mult) as usize)
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(super::parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(super::parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(super::parse_bytes("1000").unwrap(), 1000);
        assert_eq!(super::parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert!(super::parse_bytes("lots").is_err());
    }
}
