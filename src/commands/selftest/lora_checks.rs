//! The batched multi-LoRA kernels (`kernels/lora.cu`) against the CPU oracle
//! (`engine::lora::op::bgmv_reference`), at the 8B's projection widths.
//!
//! Slots of mixed ranks (4, 8, 16, 64, and one adapter that does not touch the projection), an
//! rsLoRA-like scale per slot, base rows interleaved at random; then batch invariance: every
//! row's output, computed alone, must equal its output in the full batch bit for bit.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{randn, rel_err, tolerance, Outcome};
use crate::engine::lora::op::{bgmv, bgmv_columns, bgmv_reference, Stacked, NO_SLOT};

/// Slots of the bank and their ranks for the projection (0: the adapter skips it).
const RANKS: [u32; 8] = [8, 16, 64, 0, 16, 8, 64, 4];
/// Max rank (`--max-lora-rank`).
const R: usize = 64;

/// One outcome per (shape, rows) and one batch-invariance outcome per shape.
pub fn bgmv_kernels(device: &Device, dtype: DType, seed: u64) -> anyhow::Result<Vec<Outcome>> {
    let rng = &mut StdRng::seed_from_u64(seed ^ 0x10ba);
    let mut out = Vec::new();
    let s = RANKS.len();
    // (in, out): q/o, k/v, gate/up, down of the 8B; and a small odd one.
    for (k, n) in [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (72, 40)] {
        let a = randn(rng, &[s, R, k], 1.0 / (k as f32).sqrt())?;
        let bt = randn(rng, &[s, R, n], 0.05)?;
        let mut meta: Vec<u32> = RANKS.to_vec();
        meta.extend(RANKS.iter().map(|&r| (2.0 / (r.max(1) as f32).sqrt()).to_bits()));
        let host = stacked(&a, &bt, &meta, &Device::Cpu, dtype)?;
        let dev = stacked(&a, &bt, &meta, device, dtype)?;
        for m in [1usize, 7, 32, 100] {
            let slots: Vec<u32> =
                (0..m).map(|_| if rng.gen_bool(0.3) { NO_SLOT } else { rng.gen_range(0..s as u32) }).collect();
            let x = randn(rng, &[m, k], 1.0)?.to_dtype(dtype)?;
            let y = randn(rng, &[m, n], 1.0)?.to_dtype(dtype)?;
            let slots_cpu = Tensor::new(slots.as_slice(), &Device::Cpu)?;
            let want = bgmv_reference(&y.to_dtype(DType::F32)?, &x.to_dtype(DType::F32)?, &host, &slots_cpu)?;
            let slots_dev = Tensor::new(slots.as_slice(), device)?;
            let got = bgmv(vec![y.to_device(device)?], &x.to_device(device)?, &[dev.clone()], &slots_dev)?.remove(0);
            let base_rows = slots.iter().filter(|&&s| s == NO_SLOT || RANKS[s as usize] == 0).count();
            out.push(Outcome::rel(
                format!("lora bgmv {dtype:?} {m}x{k} -> {n}, ranks 4..64, {base_rows} base rows"),
                rel_err(&got, &want)?,
                tolerance(dtype),
            ));
            if m == 32 {
                // The update alone (y = 0), so the base output's size cannot hide its error.
                let zero = y.zeros_like()?;
                let want = bgmv_reference(&zero.to_dtype(DType::F32)?, &x.to_dtype(DType::F32)?, &host, &slots_cpu)?;
                let got =
                    bgmv(vec![zero.to_device(device)?], &x.to_device(device)?, &[dev.clone()], &slots_dev)?.remove(0);
                out.push(Outcome::rel(
                    format!("lora bgmv {dtype:?} {m}x{k} -> {n}: the update alone"),
                    rel_err(&got, &want)?,
                    tolerance(dtype),
                ));
                out.push(invariance(&x.to_device(device)?, &y.to_device(device)?, &dev, &slots, (k, n), dtype)?);
            }
        }
    }
    out.extend(group_launch(rng, device, dtype)?);
    Ok(out)
}

/// q/k/v (and gate/up) widths in one launch pair over one fused output, each part its own
/// factors and ranks, vs the oracle part by part.
fn group_launch(rng: &mut StdRng, device: &Device, dtype: DType) -> anyhow::Result<Vec<Outcome>> {
    let s = RANKS.len();
    let mut out = Vec::new();
    for (k, ns) in [(4096usize, &[4096usize, 1024, 1024][..]), (4096, &[14336, 14336][..])] {
        let m = 32;
        let slots: Vec<u32> = (0..m).map(|i| if i % 5 == 4 { NO_SLOT } else { (i % s) as u32 }).collect();
        let x = randn(rng, &[m, k], 1.0)?.to_dtype(dtype)?;
        let (mut hosts, mut devs, mut ys) = (Vec::new(), Vec::new(), Vec::new());
        for (z, &n) in ns.iter().enumerate() {
            let a = randn(rng, &[s, R, k], 1.0 / (k as f32).sqrt())?;
            let bt = randn(rng, &[s, R, n], 0.05)?;
            // Each part its own ranks: rotate them, so a slot's rank differs between parts.
            let mut meta: Vec<u32> = (0..s).map(|i| RANKS[(i + z) % s]).collect();
            meta.extend(meta.clone().iter().map(|&r| (2.0 / (r.max(1) as f32).sqrt()).to_bits()));
            hosts.push(stacked(&a, &bt, &meta, &Device::Cpu, dtype)?);
            devs.push(stacked(&a, &bt, &meta, device, dtype)?);
            ys.push(randn(rng, &[m, n], 1.0)?.to_dtype(dtype)?);
        }
        let slots_cpu = Tensor::new(slots.as_slice(), &Device::Cpu)?;
        // As the fused layer runs it: the parts are column ranges of one product.
        let fused = Tensor::cat(&ys, 1)?.to_device(device)?;
        let cols: Vec<usize> = ns.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
        let parts: Vec<(usize, &Stacked)> = cols.iter().copied().zip(devs.iter()).collect();
        let got = bgmv_columns(fused, &x.to_device(device)?, &parts, &Tensor::new(slots.as_slice(), device)?)?;
        let mut worst = 0f64;
        for (((y, host), &col), &n) in ys.iter().zip(&hosts).zip(&cols).zip(ns) {
            let want = bgmv_reference(&y.to_dtype(DType::F32)?, &x.to_dtype(DType::F32)?, host, &slots_cpu)?;
            worst = worst.max(rel_err(&got.narrow(1, col, n)?, &want)?);
        }
        out.push(Outcome::rel(format!("lora bgmv {dtype:?} one launch for {k} -> {ns:?}"), worst, tolerance(dtype)));
    }
    Ok(out)
}

/// Each row alone through [`bgmv`] vs the same row in the whole batch: equal bit for bit.
fn invariance(
    x: &Tensor,
    y: &Tensor,
    w: &Stacked,
    slots: &[u32],
    (k, n): (usize, usize),
    dtype: DType,
) -> anyhow::Result<Outcome> {
    let device = x.device();
    let whole = bgmv(vec![y.copy()?], x, std::slice::from_ref(w), &Tensor::new(slots, device)?)?.remove(0);
    let whole = whole.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let mut same = 0;
    for (i, &s) in slots.iter().enumerate() {
        let alone = bgmv(
            vec![y.narrow(0, i, 1)?.copy()?],
            &x.narrow(0, i, 1)?,
            std::slice::from_ref(w),
            &Tensor::new(&[s], device)?,
        )?
        .remove(0);
        let alone = alone.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        same += usize::from(rel_err(&alone, &whole.narrow(0, i, 1)?)? == 0.0);
    }
    Ok(Outcome::exact(
        format!("lora bgmv {dtype:?} {k} -> {n}: a row alone = in a batch of {}", slots.len()),
        same == slots.len(),
        format!("{same}/{} rows equal", slots.len()),
    ))
}

/// The factors on `device` in `dtype`, with their metadata.
fn stacked(a: &Tensor, bt: &Tensor, meta: &[u32], device: &Device, dtype: DType) -> anyhow::Result<Stacked> {
    Ok(Stacked {
        a: a.to_dtype(dtype)?.to_device(device)?,
        bt: bt.to_dtype(dtype)?.to_device(device)?,
        meta: Tensor::new(meta, device)?,
        scratch: None,
    })
}

/// A slot written from a page-locked image on the copy stream (`SlotBank::begin_write`, what
/// `lab serve` does on CUDA) holds exactly what the synchronous write from the tensors puts
/// there, is not published before the copy lands, and a write made stale by a later one never
/// publishes. Tiny shape, mixed ranks; on a CPU bank there are no images, so nothing to check.
pub fn slot_writes(device: &Device, dtype: DType, seed: u64) -> anyhow::Result<Vec<Outcome>> {
    use crate::engine::lora::op::LoraWeights;
    use crate::engine::lora::slots::SlotBank;
    use crate::engine::lora::LoraAdapter;
    use crate::engine::model::config::LlamaConfig;
    let cfg = LlamaConfig::preset("tiny").expect("a preset");
    let mut staged = SlotBank::new(&cfg, 3, 16, dtype, device)?;
    let Some(stager) = staged.stager() else { return Ok(Vec::new()) };
    let mut direct = SlotBank::new(&cfg, 3, 16, dtype, device)?;
    let adapters: Vec<LoraAdapter> = [4, 16, 8]
        .iter()
        .enumerate()
        .map(|(i, &r)| LoraAdapter::random(&cfg, r, seed ^ (0x51 + i as u64), dtype, &Device::Cpu))
        .collect::<Result<_, _>>()?;
    let mut unpublished_until_done = true;
    for (slot, a) in adapters.iter().enumerate() {
        let image = stager.stage(a)?;
        let write = staged.begin_write(slot, a, &image)?;
        unpublished_until_done &= staged.lora(slot, a.weights.keys().next().copied().expect("a key"))?.is_none();
        while !staged.poll_write(&write)? {
            std::hint::spin_loop();
        }
        direct.write(slot, a)?;
    }
    let mut same = true;
    for (slot, a) in adapters.iter().enumerate() {
        for &key in a.weights.keys() {
            let (Some((sa, sb, ss)), Some((da, db, ds))) = (staged.lora(slot, key)?, direct.lora(slot, key)?) else {
                same = false;
                continue;
            };
            same &= ss == ds && rel_err(&sa, &da)? == 0.0 && rel_err(&sb, &db)? == 0.0;
        }
    }
    // Slot 0 again: an older write overtaken by a newer one before either is polled.
    let (old, new) = (stager.stage(&adapters[1])?, stager.stage(&adapters[2])?);
    let first = staged.begin_write(0, &adapters[1], &old)?;
    let second = staged.begin_write(0, &adapters[2], &new)?;
    while !(staged.poll_write(&first)? & staged.poll_write(&second)?) {
        std::hint::spin_loop();
    }
    let key = *adapters[2].weights.keys().next().expect("a key");
    let rank = staged.lora(0, key)?.map(|(a, _, _)| a.dim(0)).transpose()?;
    Ok(vec![
        Outcome::exact(
            format!("slot writes {dtype:?}: page-locked image on the copy stream = synchronous write"),
            same && unpublished_until_done,
            "bit-identical; unpublished until landed",
        ),
        Outcome::exact(
            format!("slot writes {dtype:?}: a write overtaken by a newer one never publishes"),
            rank == Some(adapters[2].rank()),
            format!("slot 0 rank {rank:?}, want {}", adapters[2].rank()),
        ),
    ])
}
