//! `lab selftest --device cuda`: CI has no GPU, so this is how the GPU path is proven correct.
//!
//! Every check draws fresh random inputs (seed printed; `--seed` repeats a run), runs the op or
//! the model on the device and compares it with the CPU f32 path on the same inputs:
//! relative error `||out - ref|| / ||ref||` against a stated tolerance (f32 1e-4 for ops, bf16
//! 2e-2: bf16 keeps 8 mantissa bits, so one rounding of an output is already ~4e-3), exact
//! agreement for copies, ids and greedy tokens. Exits non-zero on any failure.

mod fused_checks;
mod graph_checks;
mod lora_checks;
mod model_checks;
mod op_checks;

use candle_core::{DType, Device, Tensor};

use super::device_and_dtype;
use crate::cli::{ModelArgs, SelftestArgs};

/// One check's outcome.
pub struct Outcome {
    pub name: String,
    /// What was compared and how close, e.g. `rel 3.1e-3 (tol 2e-2)`.
    pub detail: String,
    pub pass: bool,
}

impl Outcome {
    /// A relative-error check: passes when `err` is finite and within `tol`.
    pub fn rel(name: impl Into<String>, err: f64, tol: f64) -> Self {
        Self {
            name: name.into(),
            detail: format!("rel {err:.2e} (tol {tol:.0e})"),
            pass: err.is_finite() && err <= tol,
        }
    }

    /// An exact check (copies, ids, greedy tokens).
    pub fn exact(name: impl Into<String>, equal: bool, detail: impl Into<String>) -> Self {
        Self { name: name.into(), detail: detail.into(), pass: equal }
    }
}

/// Runs `lab selftest`.
pub fn run(args: &SelftestArgs) -> anyhow::Result<()> {
    let model_args = ModelArgs { model: None, dtype: Some("f32".into()), device: args.device.clone() };
    let (device, _) = device_and_dtype(&model_args)?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    println!("lab selftest on {} (seed {seed}; rerun with --seed {seed})", describe(&device));
    let dtypes = [DType::F32, DType::BF16];
    let mut outcomes = Vec::new();
    let mut run = |group: &str, r: anyhow::Result<Vec<Outcome>>| match r {
        Ok(v) => outcomes.extend(v),
        Err(e) => outcomes.push(Outcome::exact(group, false, format!("error: {}", super::one_line(&e)))),
    };
    for &dt in &dtypes {
        run("ops", op_checks::candle_ops(&device, dt, seed));
        run("kernels", op_checks::paged_kernels(&device, dt, seed));
        run("projections", op_checks::projections(&device, dt, seed));
        run("lora kernels", lora_checks::bgmv_kernels(&device, dt, seed));
        run("lora slot writes", lora_checks::slot_writes(&device, dt, seed));
        run("fused ops", fused_checks::fused_ops(&device, dt, seed));
    }
    run("fused references", fused_checks::references(seed));
    run("sampler", op_checks::greedy_sampler(&device, seed));
    for &dt in &dtypes {
        run("tiny llama", model_checks::logits(&device, dt, seed));
        run("fused layer", fused_checks::fused_layer(&device, dt, seed));
    }
    run("batch invariance", model_checks::batch_invariance(&device, DType::F32, seed));
    for &dt in &dtypes {
        run("decode graphs", graph_checks::graph_replay(&device, dt, seed));
    }
    for &dt in &dtypes {
        run("peft parity", model_checks::peft_parity(&device, dt, &args.fixtures));
    }
    let failed = outcomes.iter().filter(|o| !o.pass).count();
    for o in &outcomes {
        println!("{} {:<64} {}", if o.pass { "ok  " } else { "FAIL" }, o.name, o.detail);
    }
    println!("{} checks, {} failed", outcomes.len(), failed);
    anyhow::ensure!(failed == 0, "{failed} of {} selftest checks failed (seed {seed})", outcomes.len());
    Ok(())
}

fn describe(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return crate::engine::cuda::device_name(device).unwrap_or_else(|_| "cuda".into());
    }
    format!("{device:?}")
}

/// `||a - b||_F / ||b||_F` in f64 on the host; NaN or Inf anywhere gives Inf.
pub fn rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    anyhow::ensure!(a.len() == b.len(), "shapes differ: {} vs {} elements", a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        if !x.is_finite() || !y.is_finite() {
            return Ok(f64::INFINITY);
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    Ok((num / den.max(1e-300)).sqrt())
}

/// Seeded normal samples `N(0, std^2)` as a CPU f32 tensor (candle's CPU rng cannot be
/// seeded, and `--seed` must repeat a run).
pub fn randn(rng: &mut rand::rngs::StdRng, shape: &[usize], std: f32) -> anyhow::Result<Tensor> {
    use rand_distr::Distribution;
    let normal = rand_distr::Normal::new(0f32, std)?;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| normal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Tolerance of a relative-error check in `dtype` (see the module docs).
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-4,
        _ => 2e-2,
    }
}
