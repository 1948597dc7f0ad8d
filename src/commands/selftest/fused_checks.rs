//! The fused layer's ops (`kernels/fused.cu`) on the device against their CPU references
//! (`engine::model::fused_ops`), the references against the plain ops they replace, and the
//! fused layer against the plain one on the same device.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::model_checks::{build, configs, pool, random_tensors};
use super::{randn, rel_err, tolerance, Outcome};
use crate::engine::attention::paged_ops::{write_kv, SKIP_SLOT};
use crate::engine::lora::op::LoraWeights;
use crate::engine::lora::slots::SlotBank;
use crate::engine::lora::LoraAdapter;
use crate::engine::model::fused_ops::{add_rms_norm, rope_store, silu_mul, HeadDims, KvTarget};
use crate::engine::model::layers::{OpsMode, Rope};
use crate::engine::model::{LogitsAt, PackedBatch};

/// Inputs rounded through `dtype` on the CPU (f32) and the same values on `device`.
fn pair(rng: &mut StdRng, shape: &[usize], device: &Device, dtype: DType) -> anyhow::Result<(Tensor, Tensor)> {
    let cpu = randn(rng, shape, 1.0)?.to_dtype(dtype)?.to_dtype(DType::F32)?;
    Ok((cpu.clone(), cpu.to_dtype(dtype)?.to_device(device)?))
}

/// A random f32 LoRA update on the CPU and on `device` (`None` when `on` is false).
fn delta(
    rng: &mut StdRng,
    shape: &[usize],
    device: &Device,
    on: bool,
) -> anyhow::Result<(Option<Tensor>, Option<Tensor>)> {
    if !on {
        return Ok((None, None));
    }
    let d = randn(rng, shape, 0.3)?;
    Ok((Some(d.clone()), Some(d.to_device(device)?)))
}

/// Every fused op at the 8B's widths, device vs CPU reference, with and without the LoRA
/// update of its input.
pub fn fused_ops(device: &Device, dtype: DType, seed: u64) -> anyhow::Result<Vec<Outcome>> {
    let rng = &mut StdRng::seed_from_u64(seed ^ 0xf05e);
    let tol = tolerance(dtype);
    let mut out = Vec::new();
    for (n, with_delta) in [(1usize, false), (37, false), (256, false), (1, true), (37, true)] {
        let (x, xd) = pair(rng, &[n, 4096], device, dtype)?;
        let (a, ad) = pair(rng, &[n, 4096], device, dtype)?;
        let (w, wd) = pair(rng, &[4096], device, dtype)?;
        let (dl, dld) = delta(rng, &[n, 4096], device, with_delta)?;
        let (s, h) = add_rms_norm(&x, &a, dl.as_ref(), &w, 1e-5)?;
        let (sd, hd) = add_rms_norm(&xd, &ad, dld.as_ref(), &wd, 1e-5)?;
        let err = rel_err(&sd, &s.to_dtype(dtype)?)?.max(rel_err(&hd, &h)?);
        let what = if with_delta { ", LoRA delta" } else { "" };
        out.push(Outcome::rel(format!("add_rms_norm {dtype:?} {n}x4096 (sum and norm{what})"), err, tol));
    }
    for (n, with_delta) in [(1usize, false), (37, false), (37, true)] {
        let (gu, gud) = pair(rng, &[n, 2 * 14336], device, dtype)?;
        let (dl, dld) = delta(rng, &[n, 2 * 14336], device, with_delta)?;
        let what = if with_delta { ", LoRA delta" } else { "" };
        out.push(Outcome::rel(
            format!("silu_mul {dtype:?} {n}x(2x14336){what}"),
            rel_err(&silu_mul(&gud, dld.as_ref())?, &silu_mul(&gu, dl.as_ref())?)?,
            tol,
        ));
    }
    for (h, kvh, d, with_delta) in
        [(32usize, 8usize, 128usize, false), (9, 3, 64, false), (4, 2, 16, false), (32, 8, 128, true)]
    {
        out.push(rope_store_check(rng, device, dtype, HeadDims { heads: h, kv_heads: kvh, head_dim: d }, with_delta)?);
    }
    Ok(out)
}

/// `rope_store` on 23 rows (two of them padding, not stored): q, k, v and both pools.
fn rope_store_check(
    rng: &mut StdRng,
    device: &Device,
    dtype: DType,
    dims: HeadDims,
    with_delta: bool,
) -> anyhow::Result<Outcome> {
    let HeadDims { heads: h, kv_heads: kvh, head_dim: d } = dims;
    let (n, pool_rows) = (23, 256);
    let (qkv, qkvd) = pair(rng, &[n, (h + 2 * kvh) * d], device, dtype)?;
    let (c, cd) = pair(rng, &[n, d / 2], device, dtype)?;
    let (s, sd) = pair(rng, &[n, d / 2], device, dtype)?;
    let (kc, kcd) = pair(rng, &[pool_rows, kvh, d], device, dtype)?;
    let (vc, vcd) = pair(rng, &[pool_rows, kvh, d], device, dtype)?;
    let mut rows: Vec<u32> = (0..pool_rows as u32).collect();
    rows.shuffle(rng);
    rows.truncate(n);
    rows[4] = SKIP_SLOT;
    rows[11] = SKIP_SLOT;
    let (slots, slots_d) = (Tensor::new(rows.as_slice(), &Device::Cpu)?, Tensor::new(rows.as_slice(), device)?);
    let (dl, dld) = delta(rng, &[n, (h + 2 * kvh) * d], device, with_delta)?;
    let target = KvTarget { k_cache: &kc, v_cache: &vc, slots: &slots };
    let want = rope_store(&qkv, dl.as_ref(), &c, &s, dims, Some(target))?;
    let target = KvTarget { k_cache: &kcd, v_cache: &vcd, slots: &slots_d };
    let got = rope_store(&qkvd, dld.as_ref(), &cd, &sd, dims, Some(target))?;
    let err = [
        rel_err(&got.0, &want.0)?,
        rel_err(&got.1, &want.1)?,
        rel_err(&got.2, &want.2)?,
        rel_err(&kcd, &kc)?,
        rel_err(&vcd, &vc)?,
    ]
    .into_iter()
    .fold(0f64, f64::max);
    Ok(Outcome::rel(
        format!(
            "rope_store {dtype:?} {n} rows of {h}+2x{kvh} heads x {d}, 2 not stored{}",
            if with_delta { ", LoRA delta" } else { "" }
        ),
        err,
        tolerance(dtype),
    ))
}

/// The CPU references against the plain ops they replace (candle's RoPE, `write_kv`, add and
/// rms_norm, silu and mul), in f32.
pub fn references(seed: u64) -> anyhow::Result<Vec<Outcome>> {
    let rng = &mut StdRng::seed_from_u64(seed ^ 0x9ef);
    let cpu = Device::Cpu;
    let tol = tolerance(DType::F32);
    let mut out = Vec::new();
    let (x, a, w) = (randn(rng, &[5, 64], 1.0)?, randn(rng, &[5, 64], 1.0)?, randn(rng, &[64], 1.0)?);
    let (s, hn) = add_rms_norm(&x, &a, None, &w, 1e-5)?;
    let sum = (&x + &a)?;
    let plain = candle_nn::ops::rms_norm(&sum, &w, 1e-5)?;
    out.push(Outcome::rel(
        "add_rms_norm reference = add, rms_norm",
        rel_err(&s, &sum)?.max(rel_err(&hn, &plain)?),
        tol,
    ));
    let gu = randn(rng, &[5, 2 * 48], 1.0)?;
    let plain = (candle_nn::ops::silu(&gu.narrow(1, 0, 48)?)? * gu.narrow(1, 48, 48)?)?;
    out.push(Outcome::rel("silu_mul reference = silu, mul", rel_err(&silu_mul(&gu, None)?, &plain)?, tol));
    let (h, kvh, d, n) = (4, 2, 16, 6);
    let qkv = randn(rng, &[n, (h + 2 * kvh) * d], 1.0)?;
    let cfg = crate::engine::model::config::LlamaConfig::preset("tiny").expect("preset");
    let positions: Vec<usize> = (0..n).map(|i| 3 * i + 1).collect();
    let (c, s) = Rope::new(&cfg).tables(&positions, DType::F32, &cpu)?;
    let slots = Tensor::new(&[7u32, 2, SKIP_SLOT, 9, 0, 30], &cpu)?;
    let (kc, vc) = (Tensor::zeros((32, kvh, d), DType::F32, &cpu)?, Tensor::zeros((32, kvh, d), DType::F32, &cpu)?);
    let target = KvTarget { k_cache: &kc, v_cache: &vc, slots: &slots };
    let (q, k, v) = rope_store(&qkv, None, &c, &s, HeadDims { heads: h, kv_heads: kvh, head_dim: d }, Some(target))?;
    let part = |at: usize, heads: usize| qkv.narrow(1, at * d, heads * d)?.reshape((n, heads, d));
    let (pq, pk, pv) = (part(0, h)?, part(h, kvh)?, part(h + kvh, kvh)?);
    let (pq, pk) = (Rope::apply(&pq, &c, &s, OpsMode::Fused)?, Rope::apply(&pk, &c, &s, OpsMode::Fused)?);
    let (kc2, vc2) = (Tensor::zeros((32, kvh, d), DType::F32, &cpu)?, Tensor::zeros((32, kvh, d), DType::F32, &cpu)?);
    write_kv(&kc2, &pk, &slots)?;
    write_kv(&vc2, &pv, &slots)?;
    let err = [rel_err(&q, &pq)?, rel_err(&k, &pk)?, rel_err(&v, &pv)?, rel_err(&kc, &kc2)?, rel_err(&vc, &vc2)?]
        .into_iter()
        .fold(0f64, f64::max);
    out.push(Outcome::rel("rope_store reference = rope_thd, write_kv", err, tol));
    Ok(out)
}

/// The fused layer against the plain one on `device`, same weights and pool: logits of a
/// 37-token prefill and 6 teacher-forced decodes, on the base and with an adapter of a slot
/// bank (on CUDA the fused layer adds it from the side stream, the plain one in place).
pub fn fused_layer(device: &Device, dtype: DType, seed: u64) -> anyhow::Result<Vec<Outcome>> {
    let mut out = Vec::new();
    for (label, cfg) in configs() {
        let t = random_tensors(&cfg, seed ^ 0xfu64, 3.0)?;
        let fused = build(&t, &cfg, dtype, device, true)?;
        anyhow::ensure!(fused.fused_projections(), "the paged model under test has no fused layer");
        let plain = fused.clone().without_fused_projections();
        let mut bank = SlotBank::new(&cfg, 2, 16, dtype, device)?;
        for (slot, rank) in [8usize, 16].into_iter().enumerate() {
            bank.write(slot, &LoraAdapter::random(&cfg, rank, seed ^ (slot as u64 + 3), dtype, device)?)?;
        }
        for slot in [None, Some(1)] {
            let (mut kv_f, mut tab_f) = pool(&fused, 1, 64)?;
            let (mut kv_p, mut tab_p) = pool(&plain, 1, 64)?;
            let mut input: Vec<u32> = (0..37).map(|i| (i * 13 % cfg.vocab_size) as u32).collect();
            let mut worst = 0f64;
            let lora = slot.map(|_| &bank as &dyn LoraWeights);
            for _ in 0..7 {
                let mut b = PackedBatch::default();
                b.push_with_slot(&input, tab_f[0].len(), slot);
                let want = plain.forward_lora(&b, &mut kv_p.batch(tab_p.iter_mut().collect()), lora, LogitsAt::All)?;
                let got = fused.forward_lora(&b, &mut kv_f.batch(tab_f.iter_mut().collect()), lora, LogitsAt::All)?;
                worst = worst.max(rel_err(&got, &want)?);
                let last = want.get(want.dim(0)? - 1)?.to_vec1::<f32>()?;
                input = vec![crate::engine::sampling::argmax(&last)];
            }
            let what = if slot.is_some() { "a rank-16 adapter" } else { "base" };
            out.push(Outcome::rel(
                format!("fused layer = plain layer, llama {label} {dtype:?}, {what}: prefill 37 + 6 decodes"),
                worst,
                5.0 * tolerance(dtype),
            ));
        }
    }
    Ok(out)
}
