//! Op-level checks: candle's device ops on the hot path, our kernels, the greedy sampler.

use candle_core::{DType, Device, Tensor, D};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::{randn, rel_err, tolerance, Outcome};
use crate::engine::attention::paged_ops::{paged_decode_attention, write_kv, DecodeMeta, SKIP_SLOT};
use crate::engine::model::layers::{Proj, Skinny};

/// A random f32 tensor on the CPU and its copy on `device` in `dtype`, the CPU one rounded
/// through `dtype` so both sides see the same inputs.
fn pair(rng: &mut StdRng, shape: &[usize], device: &Device, dtype: DType) -> anyhow::Result<(Tensor, Tensor)> {
    let cpu = randn(rng, shape, 1.0)?.to_dtype(dtype)?.to_dtype(DType::F32)?;
    let dev = cpu.to_dtype(dtype)?.to_device(device)?;
    Ok((cpu, dev))
}

/// The candle ops a forward runs, on the device in `dtype` vs the CPU in f32.
pub fn candle_ops(device: &Device, dtype: DType, seed: u64) -> anyhow::Result<Vec<Outcome>> {
    let rng = &mut StdRng::seed_from_u64(seed ^ 0x0b5);
    let tol = tolerance(dtype);
    let name = |op: &str| format!("{op} {dtype:?}");
    let mut out = Vec::new();
    let (x, xd) = pair(rng, &[37, 4096], device, dtype)?;
    let (w, wd) = pair(rng, &[1024, 4096], device, dtype)?;
    out.push(Outcome::rel(
        name("matmul 37x4096 @ 4096x1024^T"),
        rel_err(&xd.matmul(&wd.t()?)?, &x.matmul(&w.t()?)?)?,
        tol,
    ));
    let (g, gd) = pair(rng, &[4096], device, dtype)?;
    let rms = |x: &Tensor, g: &Tensor| candle_nn::ops::rms_norm(x, g, 1e-5);
    out.push(Outcome::rel(name("rms_norm 37x4096"), rel_err(&rms(&xd, &gd)?, &rms(&x, &g)?)?, tol));
    let (q, qd) = pair(rng, &[1, 37, 8, 128], device, dtype)?;
    let (c, cd) = pair(rng, &[37, 64], device, dtype)?;
    let (s, sd) = pair(rng, &[37, 64], device, dtype)?;
    let rope = |q: &Tensor, c: &Tensor, s: &Tensor| candle_nn::rotary_emb::rope_thd(q, c, s);
    out.push(Outcome::rel(name("rope_thd 37x8x128"), rel_err(&rope(&qd, &cd, &sd)?, &rope(&q, &c, &s)?)?, tol));
    // As attention runs it: scores in the run dtype, softmax in f32.
    let sm = |x: &Tensor| candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?);
    out.push(Outcome::rel(name("softmax_last_dim (f32) of 37x4096"), rel_err(&sm(&xd)?, &sm(&x)?)?, tol));
    out.push(Outcome::rel(
        name("silu 37x4096"),
        rel_err(&candle_nn::ops::silu(&xd)?, &candle_nn::ops::silu(&x)?)?,
        tol,
    ));
    let idx: Vec<u32> = (0..37).rev().map(|i| (i * 7 % 37) as u32).collect();
    let (i, id) = (Tensor::new(idx.as_slice(), &Device::Cpu)?, Tensor::new(idx.as_slice(), device)?);
    let equal = rel_err(&xd.index_select(&id, 0)?, &x.index_select(&i, 0)?)? == 0.0;
    out.push(Outcome::exact(name("index_select 37 rows"), equal, "exact"));
    Ok(out)
}

/// `write_kv` (exact, padding rows skipped) and `paged_decode_attention` (relative error) on the
/// device vs the CPU reference, over the head shapes of the 8B (32/8/128), a head-dim-64 GQA
/// (32/8/64), SmolLM2 (9/3/64) and the tiny preset (4/2/16); queries from 1 to 256 per launch,
/// contexts up to 300, and on CUDA up to 32k; tables row-major (eager) and block-major (graphs).
pub fn paged_kernels(device: &Device, dtype: DType, seed: u64) -> anyhow::Result<Vec<Outcome>> {
    let rng = &mut StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut out = Vec::new();
    for (h, kvh, d) in [(32, 8, 128), (32, 8, 64), (9, 3, 64), (4, 2, 16)] {
        let bs = 16;
        let num_blocks = 64;
        let (kc, kcd) = pair(rng, &[num_blocks * bs, kvh, d], device, dtype)?;
        let (vc, vcd) = pair(rng, &[num_blocks * bs, kvh, d], device, dtype)?;
        // write_kv: 23 rows into distinct random pool rows, two of them padding (not stored).
        let mut rows: Vec<u32> = (0..(num_blocks * bs) as u32).collect();
        rows.shuffle(rng);
        rows.truncate(23);
        rows[3] = SKIP_SLOT;
        rows[17] = SKIP_SLOT;
        let (src, srcd) = pair(rng, &[23, kvh, d], device, dtype)?;
        let (kc2, kcd2) = (kc.copy()?, kcd.copy()?);
        write_kv(&kc2, &src, &Tensor::new(rows.as_slice(), &Device::Cpu)?)?;
        write_kv(&kcd2, &srcd, &Tensor::new(rows.as_slice(), device)?)?;
        let equal = rel_err(&kcd2, &kc2)? == 0.0;
        out.push(Outcome::exact(format!("write_kv {dtype:?} 23 rows of {kvh}x{d}, 2 skipped"), equal, "exact"));
        let mut cases = vec![(7, 300, false)];
        if h == 32 {
            cases.push((256, 80, true));
            if device.is_cuda() {
                cases.push((2, 32_768, true));
            }
        }
        for (m, max_ctx, block_major) in cases {
            // Both kernels: the grouped-lanes one is checked on every case too.
            for grouped in [false, true] {
                let name = format!(
                    "paged_decode_attention{} {dtype:?} H{h}/KV{kvh}/D{d} {m} queries ctx 1..{max_ctx}{}",
                    if grouped { " grouped" } else { "" },
                    if block_major { " (graph tables)" } else { "" }
                );
                let qs = pair(rng, &[m + 3, h, d], device, dtype)?;
                let err =
                    decode_case(rng, (&qs, (&kc, &kcd), (&vc, &vcd)), m, max_ctx, bs, block_major, grouped, device)
                        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
                out.push(Outcome::rel(name, err, tolerance(dtype)));
            }
        }
    }
    Ok(out)
}

/// One decode-attention check: `m` queries (from `m + 3` query rows: rows are looked up) with random contexts (the first 1, one at
/// `max_ctx`) over random block permutations of a pool (re-made large enough for `max_ctx`).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn decode_case(
    rng: &mut StdRng,
    ((q, qd), (kc, kcd), (vc, vcd)): (&(Tensor, Tensor), (&Tensor, &Tensor), (&Tensor, &Tensor)),
    m: usize,
    max_ctx: usize,
    bs: usize,
    block_major: bool,
    grouped: bool,
    device: &Device,
) -> anyhow::Result<f64> {
    let max_blocks = max_ctx.div_ceil(bs);
    let (_, kvh, d) = kc.dims3()?;
    let dtype = kcd.dtype();
    // A pool large enough for the longest context (the 64-block pool serves the short cases).
    let big;
    let ((kc, kcd), (vc, vcd)) = if max_blocks > kc.dim(0)? / bs {
        big = (
            pair(rng, &[max_blocks * bs, kvh, d], device, dtype)?,
            pair(rng, &[max_blocks * bs, kvh, d], device, dtype)?,
        );
        ((&big.0 .0, &big.0 .1), (&big.1 .0, &big.1 .1))
    } else {
        ((kc, kcd), (vc, vcd))
    };
    let num_blocks = kc.dim(0)? / bs;
    let q_rows: Vec<u32> = {
        let mut r: Vec<u32> = (0..(m + 3) as u32).collect();
        r.shuffle(rng);
        r.truncate(m);
        r
    };
    let ctx: Vec<u32> = (0..m)
        .map(|i| match i {
            0 => 1,
            1 => max_ctx as u32,
            _ => rng.gen_range(2..=max_ctx as u32),
        })
        .collect();
    let mut blocks: Vec<u32> = (0..num_blocks as u32).collect();
    let tables: Vec<Vec<u32>> = (0..m)
        .map(|_| {
            blocks.shuffle(rng);
            blocks[..max_blocks].to_vec()
        })
        .collect();
    let row_major: Vec<u32> = tables.iter().flatten().copied().collect();
    let block_major_flat: Vec<u32> = (0..max_blocks).flat_map(|b| tables.iter().map(move |t| t[b])).collect();
    let meta = |dev: &Device, bm: bool, grouped: bool| -> anyhow::Result<DecodeMeta> {
        Ok(DecodeMeta {
            rows: Tensor::new(q_rows.as_slice(), dev)?,
            tables: if bm {
                Tensor::from_vec(block_major_flat.clone(), (max_blocks, m), dev)?
            } else {
                Tensor::from_vec(row_major.clone(), (m, max_blocks), dev)?
            },
            block_major: bm,
            grouped,
            ctx: Tensor::new(ctx.as_slice(), dev)?,
            max_blocks,
            block_size: bs,
        })
    };
    // The reference always reads row-major tables: a block-major device case checks both.
    let want = paged_decode_attention(q, kc, vc, &meta(&Device::Cpu, false, false)?)?;
    let got = paged_decode_attention(qd, kcd, vcd, &meta(device, block_major, grouped)?)?;
    rel_err(&got, &want)
}

/// The projections of a decode step with the skinny GEMM on (`Proj::forward`: on CUDA
/// `kernels/gemv.cu` for up to 8 rows, cuBLAS beyond) vs the CPU f32 product, at the 8B's widths and an odd one; and
/// on the kernel's path, row independence: a row's output is bit-identical alone or among 8.
pub fn projections(device: &Device, dtype: DType, seed: u64) -> anyhow::Result<Vec<Outcome>> {
    let rng = &mut StdRng::seed_from_u64(seed ^ 0x9e);
    let mut out = Vec::new();
    for (k, n, rows) in [(4096, 4096, &[1usize, 2, 3, 5, 8, 9][..]), (14336, 1027, &[1, 8][..])] {
        let (w, wd) = pair(rng, &[n, k], device, dtype)?;
        let (x, xd) = pair(rng, &[9, k], device, dtype)?;
        let proj = Proj::from_weight(wd).with_skinny(Skinny { rows: 8, early_start: true });
        for &m in rows {
            let want = x.narrow(0, 0, m)?.matmul(&w.t()?)?;
            let got = proj.forward(&xd.narrow(0, 0, m)?)?;
            out.push(Outcome::rel(
                format!("projection {dtype:?} {m}x{k} @ {n}x{k}^T"),
                rel_err(&got, &want)?,
                tolerance(dtype),
            ));
        }
        // A property of the CUDA kernel only (cuBLAS and the CPU GEMM pick blockings per shape).
        if !(device.is_cuda() && matches!(dtype, DType::BF16 | DType::F16)) {
            continue;
        }
        let alone = proj.forward(&xd.narrow(0, 4, 1)?)?;
        let among = proj.forward(&xd.narrow(0, 0, 8)?)?.narrow(0, 4, 1)?;
        let same = rel_err(&alone, &among)? == 0.0;
        out.push(Outcome::exact(
            format!("projection {dtype:?} K{k}/N{n}: a row alone = among 8"),
            same,
            "bit-identical",
        ));
        // An early start (kernels/pdl.cuh) changes when the kernel starts, never what it sums;
        // the product right after another kernel (the exp) is where it could start early.
        let plain = Proj::from_weight(proj.weight().clone()).with_skinny(Skinny { rows: 8, early_start: false });
        let xe = xd.exp()?;
        let same = rel_err(&proj.forward(&xe)?, &plain.forward(&xe)?)? == 0.0;
        out.push(Outcome::exact(
            format!("projection {dtype:?} K{k}/N{n}: early start = plain launch"),
            same,
            "bit-identical",
        ));
    }
    Ok(out)
}

/// Greedy picks on the device (only ids come back) equal the CPU argmax.
pub fn greedy_sampler(device: &Device, seed: u64) -> anyhow::Result<Vec<Outcome>> {
    let logits = randn(&mut StdRng::seed_from_u64(seed ^ 0x5a), &[33, 128_256], 3.0)?;
    let got = logits.to_device(device)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let want: Vec<u32> = (0..33)
        .map(|r| Ok(crate::engine::sampling::argmax(&logits.get(r)?.to_vec1::<f32>()?)))
        .collect::<anyhow::Result<_>>()?;
    let same = got.iter().zip(&want).filter(|(a, b)| a == b).count();
    let mut out = vec![Outcome::exact(
        "greedy argmax on the device, 33 x 128256 logits",
        same == want.len(),
        format!("{same}/33 equal"),
    )];
    // The batched sampler (greedy, temperature, top-k, top-p rows mixed) against its CPU
    // reference on the same uniforms: exact by construction (fixed-point masses).
    let (equal, rows) = crate::engine::sampling::op::check_against_reference(device, seed)?;
    out.push(Outcome::exact(
        "sample_on_device (t, top-k, top-p mixed), 33 x 128256 logits",
        equal == rows,
        format!("{equal}/{rows} ids equal to the CPU reference"),
    ));
    Ok(out)
}
