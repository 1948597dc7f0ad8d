//! One entry point per subcommand: turn CLI args into settings once, call the engine.
//! `anyhow` lives here and in `main` only.

pub mod bench;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod loadtest;
pub mod selftest;
pub mod serve;
pub mod train;

use candle_core::{DType, Device};

use crate::cli::{DatasetsAction, DatasetsArgs, ModelArgs};
use crate::engine::load::LoadedModel;

/// The error and its causes on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}

/// Device and dtype from `--device` / `--dtype`.
pub fn device_and_dtype(args: &ModelArgs) -> anyhow::Result<(Device, DType)> {
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        d if d.starts_with("cuda") => {
            let ordinal = d.strip_prefix("cuda:").map(|n| n.parse::<usize>()).transpose()?.unwrap_or(0);
            open_cuda(ordinal).map_err(|e| anyhow::anyhow!("cannot open {d}: {e}"))?
        }
        other => anyhow::bail!("unknown --device {other} (use cpu, cuda or cuda:N)"),
    };
    let dtype = match args.dtype.as_deref() {
        None if device.is_cuda() => DType::BF16,
        None | Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(other) => anyhow::bail!("unknown --dtype {other} (use f32, bf16 or f16)"),
    };
    Ok((device, dtype))
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> anyhow::Result<Device> {
    Ok(crate::engine::cuda::open_device(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> anyhow::Result<Device> {
    anyhow::bail!("this binary was built without CUDA (rebuild with `cargo build --release --features cuda`, see bench/setup-cuda-toolchain.sh)")
}

/// One stderr line naming the model, its size and, for random weights, that they are synthetic.
pub fn report_loaded(m: &LoadedModel) {
    let tag = if m.synthetic { " [synthetic: seeded random weights, for speed/memory only]" } else { "" };
    eprintln!(
        "lab: model {} ({} parameters, {:?}, tokenizer: {}){tag}",
        m.name,
        group_digits(m.model.num_parameters()),
        m.model.dtype(),
        m.tokenizer_label
    );
}

/// `8030261248` -> `8,030,261,248`.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `lab datasets generate --out DIR`.
pub fn datasets(args: &DatasetsArgs) -> anyhow::Result<()> {
    match &args.action {
        DatasetsAction::Generate { out } => {
            for s in crate::datasets::generate_all(out)? {
                println!("{}: {} examples, {} bytes", s.path.display(), s.examples, s.bytes);
            }
        }
    }
    Ok(())
}
