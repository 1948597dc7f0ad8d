//! Batched next-token sampling as one op: every row of `logits: [rows, vocab]` (greedy or
//! sampled) picks its id in one launch of `kernels/sampling.cu` on CUDA, so only the ids come
//! back; the CPU form below ([`sample_row_reference`]) computes the same function in plain
//! loops and is the oracle the kernel is checked against ([`check_against_reference`]): the
//! two agree bit for bit, because every float step is one IEEE-rounded operation and the
//! masses are integers.
//!
//! Per row r, with `key(x)` the order-preserving uint32 encoding of a float
//! (`bits ^ (sign ? 0xffffffff : 0x80000000)`, so `x < y <=> key(x) < key(y)`):
//!
//! ```text
//! 1. t = temperature[r]; if !(t >= f32::MIN_POSITIVE) (t <= 0, subnormal, NaN):
//!        the argmax of the logits (first index on ties, NaN counts as -inf).
//! 2. x_i = clean(clean(logit_i) / t)     clean: NaN -> -inf, zero and subnormals -> +0
//!    m   = max_i x_i
//! 3. top-k (k = top_k[r]; 0 or >= vocab = off): tau_k = the exact k-th largest x
//!    (radix select over key(x) on the device: 4 passes of 8 bits with count histograms,
//!    the same value as 32 bisection passes; here: select_nth);
//!    keep x_i >= tau_k (ties at the threshold all kept).
//! 4. w_i = W(d_i), d_i = clean(x_i - m), for kept i;  Z = sum w_i      (u64, exact)
//!    W(d) = exp(d) in 2^-40 fixed point, truncated: 0 unless d >= -30; else
//!           k = rint(d * log2 e); r = d - k ln2 (Cody-Waite, two fmas);
//!           p = degree-7 Taylor polynomial of exp(r) (Horner, fmas); W = trunc(p * 2^(k + 40))
//!    (every step f32, each result flushed to zero if subnormal, as the kernel's ftz does).
//! 5. top-p (p = top_p[r]; p >= 1, p < f32::MIN_POSITIVE or Z == 0 = off):
//!    need = (f64) p * (f64) Z; tau_p = the largest key among kept values with
//!    (f64) sum_{kept, x_i >= tau_p} w_i >= need (radix select over key(x) with mass
//!    histograms on the device; here: sort descending and keep the shortest prefix with mass
//!    >= need, ties kept together); keep x_i >= tau_p.
//! 6. Z' = sum of kept w; target = trunc((f64) u * (f64) Z'), u = u[r] (NaN or < 0: 0);
//!    walk i in index order accumulating kept w_i; the sample is the first i whose running sum
//!    exceeds target (if none: Z' == 0, or u >= 1: the last kept i).
//! ```
//!
//! On an H200 (harness over `random_case` logits, kernel time per launch): 33 x 128256 rows of
//! mixed kinds 200 us; all greedy 19 us; temperature alone 80 us; top-k 50 125 us; top-p 0.9
//! 190 us; a single row costs about as much as 33 (one block per row: latency, not throughput).
//!
//! Fixed-point masses cost nothing that matters (a token below 2^-40 of the top one is never
//! drawn; the total mass lost is under vocab * 2^-40 of the top token's) and make every sum exact:
//! the kernel is deterministic run to run and order-free, and the CPU twin agrees exactly.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::engine::attention::paged_ops::contiguous;
use crate::engine::Result;

/// What one row asks of [`sample_on_device`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowParam {
    /// `<= 0` (below `f32::MIN_POSITIVE`): greedy.
    pub temperature: f32,
    /// 0 or `>= vocab`: off.
    pub top_k: u32,
    /// `>= 1` or `<= 0`: off.
    pub top_p: f32,
    /// The row's uniform draw, in `[0, 1)`.
    pub u: f32,
}

impl RowParam {
    /// The argmax row.
    pub const GREEDY: RowParam = RowParam { temperature: 0.0, top_k: 0, top_p: 1.0, u: 0.0 };
}

/// One [`RowParam`] per row of the logits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowParams(pub Vec<RowParam>);

/// The id each row of `logits: [rows, vocab]` samples (see the module docs); one launch on
/// CUDA, [`sample_row_reference`] per row on the CPU.
pub fn sample_on_device(logits: &Tensor, params: &RowParams) -> Result<Vec<u32>> {
    let (rows, vocab) = logits.dims2()?;
    if rows != params.0.len() || vocab == 0 || vocab > u32::MAX as usize / 2 {
        return Err(candle_core::Error::Msg(format!(
            "sample_on_device: logits [{rows}, {vocab}] with {} row parameters (want one per row, vocab 1..2^31)",
            params.0.len()
        ))
        .into());
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let packed = pack(params);
    let params = Tensor::from_vec(packed, (4, rows), logits.device())?;
    Ok(logits.apply_op1_no_bwd(&SampleRows { params })?.to_vec1::<u32>()?)
}

/// [`sample_on_device`] with the parameters already on the device (`params: [4, rows]` u32, as
/// [`pack`] lays them out) and the ids left there: `[rows]` u32. Nothing moves between host and
/// device, so a CUDA graph can replay it. `logits` must be f32 and contiguous.
pub fn sample_ids(logits: &Tensor, params: &Tensor) -> Result<Tensor> {
    Ok(logits.apply_op1_no_bwd(&SampleRows { params: params.clone() })?)
}

/// `[4, rows]` u32, uploaded in one copy: temperature bits, top_k, top_p bits, u bits.
pub fn pack(params: &RowParams) -> Vec<u32> {
    let p = &params.0;
    let mut v = Vec::with_capacity(4 * p.len());
    v.extend(p.iter().map(|r| r.temperature.to_bits()));
    v.extend(p.iter().map(|r| r.top_k));
    v.extend(p.iter().map(|r| r.top_p.to_bits()));
    v.extend(p.iter().map(|r| r.u.to_bits()));
    v
}

struct SampleRows {
    /// `[4, rows]` u32 (see [`pack`]), on the logits' device.
    params: Tensor,
}

impl CustomOp1 for SampleRows {
    fn name(&self) -> &'static str {
        "sample-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let (o, _) = contiguous(l)?;
        let CpuStorage::F32(x) = s else { candle_core::bail!("sample-rows: logits must be f32") };
        let p = self.params.flatten_all()?.to_vec1::<u32>()?;
        let ids = (0..rows)
            .map(|r| {
                let param = RowParam {
                    temperature: f32::from_bits(p[r]),
                    top_k: p[rows + r],
                    top_p: f32::from_bits(p[2 * rows + r]),
                    u: f32::from_bits(p[3 * rows + r]),
                };
                sample_row_reference(&x[o + r * vocab..][..vocab], param)
            })
            .collect();
        Ok((CpuStorage::U32(ids), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::engine::cuda::kernels::sample_rows(s, l, &self.params)
    }
}

/// `key(-inf)`: every cleaned x is at or above it.
const NEG_INF_KEY: u32 = 0x007f_ffff;

/// The order-preserving uint32 encoding of a float.
fn key(x: f32) -> u32 {
    let b = x.to_bits();
    b ^ if b & 0x8000_0000 != 0 { 0xffff_ffff } else { 0x8000_0000 }
}

fn unkey(k: u32) -> f32 {
    f32::from_bits(k ^ if k & 0x8000_0000 != 0 { 0x8000_0000 } else { 0xffff_ffff })
}

/// NaN -> -inf; zero and subnormals -> +0.
fn clean(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x.to_bits() & 0x7f80_0000 == 0 {
        0.0
    } else {
        x
    }
}

/// Subnormal -> signed zero (what the kernel's `.ftz` arithmetic does to a result).
fn ftz(x: f32) -> f32 {
    if x.to_bits() & 0x7f80_0000 == 0 {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// `W(d)`: exp(d) in 2^-40 fixed point, step for step as `wfix` in the kernel.
fn wfix(d: f32) -> u64 {
    if !(d >= -30.0) {
        return 0;
    }
    let c = f32::from_bits;
    let k = ftz(d * c(0x3fb8_aa3b)).round_ties_even();
    let r = ftz(k.mul_add(-c(0x3f31_8000), d));
    let r = ftz(k.mul_add(-c(0xb95e_8083), r));
    let mut p = c(0x3950_0d01);
    for coef in [c(0x3ab6_0b61), c(0x3c08_8889), c(0x3d2a_aaab), c(0x3e2a_aaab), 0.5, 1.0, 1.0] {
        p = ftz(p.mul_add(r, coef));
    }
    let e = k as i32 + 40;
    (p * f32::from_bits(((e + 127) as u32) << 23)) as u64
}

/// The argmax the kernel takes for greedy rows: the largest value, NaN as -inf, the first index
/// on ties (`-0 == +0`).
fn greedy_argmax(logits: &[f32]) -> u32 {
    let canon = |x: f32| {
        if x.is_nan() {
            f32::NEG_INFINITY
        } else if x == 0.0 {
            0.0
        } else {
            x
        }
    };
    let mut best = 0;
    let mut best_key = 0;
    for (i, &x) in logits.iter().enumerate() {
        let k = key(canon(x));
        if i == 0 || k > best_key {
            best = i;
            best_key = k;
        }
    }
    best as u32
}

/// The sampling of one row of logits in plain loops (see the module docs): the CPU twin of
/// `kernels/sampling.cu`, and the CPU form of [`sample_on_device`].
pub fn sample_row_reference(logits: &[f32], p: RowParam) -> u32 {
    let t = p.temperature;
    if !(t >= f32::MIN_POSITIVE) || logits.is_empty() {
        return greedy_argmax(logits);
    }
    let x: Vec<f32> = logits.iter().map(|&l| clean(clean(l) / t)).collect();
    let keys: Vec<u32> = x.iter().map(|&v| key(v)).collect();
    let m = unkey(*keys.iter().max().expect("a non-empty row"));
    let vocab = x.len();
    let mut tau = NEG_INF_KEY;
    if p.top_k > 0 && (p.top_k as usize) < vocab {
        let mut sorted = keys.clone();
        let (_, kth, _) = sorted.select_nth_unstable_by(p.top_k as usize - 1, |a, b| b.cmp(a));
        tau = *kth;
    }
    let w: Vec<u64> = x.iter().zip(&keys).map(|(&xi, &ki)| if ki >= tau { wfix(clean(xi - m)) } else { 0 }).collect();
    let z: u64 = w.iter().sum();
    if p.top_p >= f32::MIN_POSITIVE && p.top_p < 1.0 && z > 0 {
        let need = p.top_p as f64 * z as f64;
        let mut kept: Vec<(u32, u64)> =
            keys.iter().zip(&w).filter(|(k, _)| **k >= tau).map(|(&k, &w)| (k, w)).collect();
        kept.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        let (mut cum, mut i) = (0u64, 0);
        while i < kept.len() {
            let k = kept[i].0;
            while i < kept.len() && kept[i].0 == k {
                cum += kept[i].1;
                i += 1;
            }
            if cum as f64 >= need {
                tau = k;
                break;
            }
        }
    }
    let zp: u64 = keys.iter().zip(&w).filter(|(k, _)| **k >= tau).map(|(_, w)| w).sum();
    let u = if p.u > 0.0 { p.u } else { 0.0 };
    let target = (u as f64 * zp as f64) as u64;
    let (mut run, mut last) = (0u64, 0usize);
    for (i, (&k, &wi)) in keys.iter().zip(&w).enumerate() {
        if k >= tau {
            last = i;
            run += wi;
            if run > target {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Random logits `[rows, vocab]` (on the CPU) and parameters of every kind, from `seed`:
/// greedy rows, temperature alone, top-k, top-p, both, and rows with many ties.
pub fn random_case(seed: u64, rows: usize, vocab: usize) -> Result<(Tensor, RowParams)> {
    use rand_distr::Distribution;
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0f32, 1.0).expect("a valid normal");
    let mut data = Vec::with_capacity(rows * vocab);
    let mut params = Vec::with_capacity(rows);
    for r in 0..rows {
        let kind = r % 6;
        let scale = [1.0f32, 3.0, 8.0][r % 3];
        for _ in 0..vocab {
            let v = normal.sample(&mut rng) * scale;
            // Ties rows: logits on a coarse grid, so thresholds land on runs of equal values.
            data.push(if kind == 5 { (v * 2.0).round() / 2.0 } else { v });
        }
        let temperature = if kind == 0 { 0.0 } else { rng.gen_range(0.3f32..1.6) };
        let ks = [1u32, 2, 20, 50, 1000, vocab as u32 + 5];
        let ps = [0.3f32, 0.8, 0.9, 0.95, 0.999];
        let top_k = if matches!(kind, 2 | 4 | 5) { ks[rng.gen_range(0..ks.len())] } else { 0 };
        let top_p = if matches!(kind, 3 | 4 | 5) { ps[rng.gen_range(0..ps.len())] } else { 1.0 };
        params.push(RowParam { temperature, top_k, top_p, u: rng.gen::<f32>() });
    }
    Ok((Tensor::from_vec(data, (rows, vocab), &Device::Cpu)?, RowParams(params)))
}

/// Runs [`sample_on_device`] on `device` and on the CPU over [`random_case`]`(seed, 33,
/// 128256)` and returns `(#rows equal, #rows)`; the two agree exactly unless the kernel is wrong.
pub fn check_against_reference(device: &Device, seed: u64) -> Result<(usize, usize)> {
    let (logits, params) = random_case(seed, 33, 128_256)?;
    let want = sample_on_device(&logits, &params)?;
    let got = sample_on_device(&logits.to_device(device)?, &params)?;
    Ok((got.iter().zip(&want).filter(|(a, b)| a == b).count(), want.len()))
}

#[cfg(test)]
mod sampler_tests {
    use super::*;
    use crate::engine::sampling::argmax;

    fn p(temperature: f32, top_k: u32, top_p: f32, u: f32) -> RowParam {
        RowParam { temperature, top_k, top_p, u }
    }

    fn randn(seed: u64, n: usize, std: f32) -> Vec<f32> {
        use rand_distr::Distribution;
        let mut rng = StdRng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(0f32, std).unwrap();
        (0..n).map(|_| normal.sample(&mut rng)).collect()
    }

    /// softmax(x / t) restricted to top-k then top-p and renormalised, in f64 by sorting: an
    /// independent statement of what the op samples from.
    fn expected(logits: &[f32], t: f64, k: usize, top_p: f64) -> Vec<f64> {
        let x: Vec<f64> = logits.iter().map(|&l| l as f64 / t).collect();
        let mut order: Vec<usize> = (0..x.len()).collect();
        order.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
        let k = if k == 0 || k >= x.len() { x.len() } else { k };
        let tau_k = x[order[k - 1]];
        let m = x[order[0]];
        let w: Vec<f64> = x.iter().map(|&v| if v >= tau_k { (v - m).exp() } else { 0.0 }).collect();
        let z: f64 = w.iter().sum();
        let mut tau = tau_k;
        if top_p > 0.0 && top_p < 1.0 {
            let mut cum = 0.0;
            for (j, &i) in order.iter().enumerate() {
                cum += w[i];
                let run_ends = j + 1 == order.len() || x[order[j + 1]] != x[i];
                if run_ends && cum >= top_p * z {
                    tau = x[i];
                    break;
                }
            }
        }
        let kept: Vec<f64> = x.iter().zip(&w).map(|(&v, &wi)| if v >= tau { wi } else { 0.0 }).collect();
        let zp: f64 = kept.iter().sum();
        kept.iter().map(|w| w / zp).collect()
    }

    #[test]
    fn fixed_point_exp_is_accurate() {
        for i in 0..=3000 {
            let d = -(i as f32) * 0.01;
            let want = (d as f64).exp() * 2f64.powi(40);
            let got = wfix(d) as f64;
            assert!((got - want).abs() <= want * 3e-7 + 1.0, "W({d}) = {got}, exp = {want}");
        }
        assert_eq!(wfix(0.0), 1 << 40);
        assert_eq!(wfix(-30.01), 0);
        assert_eq!(wfix(f32::NEG_INFINITY), 0);
        assert_eq!(wfix(f32::NAN), 0);
    }

    #[test]
    fn keys_preserve_order() {
        let v = [f32::NEG_INFINITY, -3.5, -1e-30, 0.0, 1e-30, 2.0, f32::INFINITY];
        for w in v.windows(2) {
            assert!(key(w[0]) < key(w[1]), "{w:?}");
            assert_eq!(unkey(key(w[0])), w[0]);
        }
        assert_eq!(key(f32::NEG_INFINITY), NEG_INF_KEY);
    }

    #[test]
    fn temperature_zero_and_top_k_one_are_argmax() {
        let logits = randn(1, 5000, 2.0);
        let want = argmax(&logits);
        for u in [0.0, 0.3, 0.999_999] {
            assert_eq!(sample_row_reference(&logits, p(0.0, 0, 1.0, u)), want);
            assert_eq!(sample_row_reference(&logits, p(-1.0, 7, 0.5, u)), want);
            assert_eq!(sample_row_reference(&logits, p(0.7, 1, 1.0, u)), want);
            assert_eq!(sample_row_reference(&logits, p(1.3, 1, 0.9, u)), want);
            assert_eq!(sample_row_reference(&logits, p(1.0, 0, 1e-6, u)), want, "a tiny nucleus is the top token");
        }
        let ties = [0.5f32, 3.0, -1.0, 3.0, 2.0];
        assert_eq!(sample_row_reference(&ties, RowParam::GREEDY), 1, "first index on ties");
        assert_eq!(sample_row_reference(&[f32::NAN, 1.0, -0.0], RowParam::GREEDY), 1, "NaN never wins");
        assert_eq!(sample_row_reference(&[-0.0, 0.0], RowParam::GREEDY), 0, "-0 == +0");
    }

    #[test]
    fn top_k_samples_only_among_the_k_largest() {
        let logits = randn(2, 1000, 1.0);
        let mut order: Vec<usize> = (0..1000).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let top: Vec<u32> = order[..10].iter().map(|&i| i as u32).collect();
        let mut seen = std::collections::HashSet::new();
        for j in 0..2000 {
            let id = sample_row_reference(&logits, p(1.0, 10, 1.0, (j as f32 + 0.5) / 2000.0));
            assert!(top.contains(&id), "{id} not among the top 10");
            seen.insert(id);
        }
        assert_eq!(seen.len(), 10, "every one of the top 10 is drawn");
    }

    #[test]
    fn top_k_keeps_every_tie_at_the_threshold() {
        let logits = [1.0f32, 3.0, 3.0, 2.0, 3.0, 0.0];
        let ids: std::collections::BTreeSet<u32> =
            (0..300).map(|j| sample_row_reference(&logits, p(1.0, 2, 1.0, j as f32 / 300.0))).collect();
        assert_eq!(ids, [1, 2, 4].into_iter().collect(), "k = 2 lands on a run of three 3.0s");
    }

    #[test]
    fn top_p_samples_only_the_nucleus() {
        let logits = randn(3, 1000, 2.0);
        let probs = expected(&logits, 1.0, 0, 0.5);
        let nucleus: Vec<u32> = (0..1000).filter(|&i| probs[i] > 0.0).map(|i| i as u32).collect();
        assert!(nucleus.len() > 1 && nucleus.len() < 100, "{} tokens in the nucleus", nucleus.len());
        let mut seen = std::collections::HashSet::new();
        for j in 0..4000 {
            let id = sample_row_reference(&logits, p(1.0, 0, 0.5, (j as f32 + 0.5) / 4000.0));
            assert!(nucleus.contains(&id), "{id} outside the nucleus");
            seen.insert(id);
        }
        assert_eq!(seen.len(), nucleus.len());
        // Ties kept together: with four equal tops of mass 1/4 each, p = 0.3 keeps all four.
        let flat = [5.0f32, 1.0, 5.0, 5.0, -2.0, 5.0];
        let ids: std::collections::BTreeSet<u32> =
            (0..400).map(|j| sample_row_reference(&flat, p(1.0, 0, 0.3, j as f32 / 400.0))).collect();
        assert_eq!(ids, [0, 2, 3, 5].into_iter().collect());
    }

    #[test]
    fn u_near_zero_picks_the_first_kept_index_and_near_one_the_last() {
        let logits = [0.0f32, 4.0, 1.0, 3.9, 3.8, 5.0, -1.0, 3.95];
        // top-k 4 keeps ids 1, 3, 5, 7.
        let just_below_one = 1.0 - f32::EPSILON / 2.0;
        assert_eq!(sample_row_reference(&logits, p(1.0, 4, 1.0, 0.0)), 1);
        assert_eq!(sample_row_reference(&logits, p(1.0, 4, 1.0, just_below_one)), 7);
        // No filter: all kept.
        assert_eq!(sample_row_reference(&logits, p(0.5, 0, 1.0, 0.0)), 0);
        assert_eq!(sample_row_reference(&logits, p(20.0, 0, 1.0, just_below_one)), 7);
        // u >= 1 falls back to the last kept index.
        assert_eq!(sample_row_reference(&logits, p(1.0, 4, 1.0, 1.0)), 7);
        // All -inf: nothing has mass; the last kept index.
        assert_eq!(sample_row_reference(&[f32::NEG_INFINITY; 4], p(1.0, 0, 0.9, 0.5)), 3);
    }

    /// Over many draws the empirical distribution is softmax(x / t) restricted by top-k and
    /// top-p and renormalised: with stratified u (u_j = (j + 1/2) / N) every frequency is within
    /// 1/N of its probability (+ 1e-6 for the fixed-point exp); with seeded random u the
    /// chi-square statistic stays under 29.9 (p = 1e-4 at 7 degrees of freedom, the most here).
    #[test]
    fn frequencies_match_the_restricted_softmax() {
        let logits = [1.2f32, -0.3, 2.5, 0.7, 2.4, -2.0, 1.9, 0.1, 3.0, 2.2, -0.8, 1.0];
        for (t, k, top_p) in [(1.0f32, 0u32, 1.0f32), (0.8, 8, 1.0), (1.3, 0, 0.9), (0.7, 6, 0.95), (2.0, 10, 0.8)] {
            let want = expected(&logits, t as f64, k as usize, top_p as f64);
            let n = 100_000;
            let mut grid = vec![0usize; logits.len()];
            for j in 0..n {
                grid[sample_row_reference(&logits, p(t, k, top_p, ((j as f64 + 0.5) / n as f64) as f32)) as usize] += 1;
            }
            for (i, (&c, &w)) in grid.iter().zip(&want).enumerate() {
                let f = c as f64 / n as f64;
                assert!((f - w).abs() <= 1.0 / n as f64 + 1e-6, "t {t} k {k} p {top_p}: id {i} {f} vs {w}");
            }
            let mut rng = StdRng::seed_from_u64(11);
            let mut counts = vec![0usize; logits.len()];
            for _ in 0..n {
                counts[sample_row_reference(&logits, p(t, k, top_p, rng.gen::<f32>())) as usize] += 1;
            }
            let mut chi2 = 0.0;
            for (&c, &w) in counts.iter().zip(&want) {
                if w == 0.0 {
                    assert_eq!(c, 0, "a token outside the kept set was drawn");
                } else {
                    chi2 += (c as f64 - n as f64 * w).powi(2) / (n as f64 * w);
                }
            }
            let dof = want.iter().filter(|&&w| w > 0.0).count() - 1;
            assert!(
                dof <= 11 && chi2 < if dof <= 7 { 29.9 } else { 37.0 },
                "t {t} k {k} p {top_p}: chi2 {chi2} at {dof} dof"
            );
        }
    }

    #[test]
    fn op_on_a_tensor_matches_the_reference_per_row() {
        let (logits, params) = random_case(5, 12, 3000).unwrap();
        let got = sample_on_device(&logits, &params).unwrap();
        for (r, &id) in got.iter().enumerate() {
            let row = logits.get(r).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(id, sample_row_reference(&row, params.0[r]), "row {r}");
        }
        assert!(sample_on_device(&logits, &RowParams(vec![RowParam::GREEDY])).is_err(), "one param per row");
    }

    #[test]
    fn check_against_reference_on_the_cpu_is_exact() {
        assert_eq!(check_against_reference(&Device::Cpu, 9).unwrap(), (33, 33));
    }
}
