//! Next-token choice: greedy, temperature, top-k, top-p, seeded; and when to stop.

pub mod op;

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::engine::sampling::op::{sample_on_device, RowParam, RowParams};
use crate::engine::Result;

/// What a request asks of sampling and stopping (OpenAI / vLLM semantics).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus mass; 1.0 = off.
    pub top_p: f64,
    /// Keep only the k most likely tokens; 0 = off.
    pub top_k: usize,
    pub seed: u64,
    pub max_tokens: usize,
    /// Keep generating past EOS (fixed-length benchmarks).
    pub ignore_eos: bool,
    /// Strings that end generation; they are not part of the output.
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, max_tokens: 256, ignore_eos: false, stop: vec![] }
    }
}

/// Why a sequence ended (OpenAI `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}

/// Temperatures below this sample greedily.
pub const GREEDY_BELOW: f64 = 1e-5;
/// Smallest nucleus mass kept by top-p (smaller values act as this one).
const MIN_TOP_P: f64 = 1e-6;

/// Picks tokens from logits according to [`SamplingParams`].
///
/// On the CPU, [`Sampler::sample`] (candle's `LogitsProcessor`, seeded by `seed`). On CUDA the
/// batch's rows are drawn together by [`DeviceSampling`], each with [`Sampler::device_param`]:
/// its settings and one uniform per step from its own `StdRng` seeded by `seed`, so the seed still
/// fixes the draws (a different stream than the CPU's: the same seed gives the same tokens on
/// the same device, not across devices).
pub struct Sampler {
    greedy: bool,
    processor: LogitsProcessor,
    device: RowParam,
    rng: StdRng,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        // Below GREEDY_BELOW, `logits / t` overflows to inf/NaN (1e-39 did, failing the whole
        // batch): such a temperature means greedy, as in vLLM (`_SAMPLING_EPS`).
        let t = if p.temperature < GREEDY_BELOW { 0.0 } else { p.temperature };
        // A tiny nucleus keeps the top token; clamped so f32 (the device path) cannot round it
        // to 0, which would mean "off". 1e-6 is below the top token's share of any vocabulary
        // under a million tokens, so the set is unchanged.
        let top_p = (p.top_p > 0.0 && p.top_p < 1.0).then_some(p.top_p.max(MIN_TOP_P));
        let top_k = (p.top_k > 0).then_some(p.top_k);
        let sampling = match (top_k, top_p) {
            _ if t <= 0.0 => Sampling::ArgMax,
            (None, None) => Sampling::All { temperature: t },
            (Some(k), None) => Sampling::TopK { k, temperature: t },
            (None, Some(p)) => Sampling::TopP { p, temperature: t },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature: t },
        };
        let device = RowParam {
            temperature: if t > 0.0 { t as f32 } else { 0.0 },
            top_k: top_k.map_or(0, |k| k.min(u32::MAX as usize) as u32),
            top_p: top_p.map_or(1.0, |p| p as f32),
            u: 0.0,
        };
        Self {
            greedy: t <= 0.0,
            processor: LogitsProcessor::from_sampling(p.seed, sampling),
            device,
            rng: StdRng::seed_from_u64(p.seed),
        }
    }

    /// This sampler's row of one [`DeviceSampling`] step: its settings and the next uniform of
    /// its seeded stream (one per step, greedy or not).
    pub fn device_param(&mut self) -> RowParam {
        RowParam { u: self.rng.gen::<f32>(), ..self.device }
    }

    /// True when this sampler takes the argmax (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.greedy
    }

    /// Next token from one row of logits `[vocab]`.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        if self.greedy {
            return Ok(argmax(&logits.to_vec1::<f32>()?));
        }
        Ok(self.processor.sample(logits)?)
    }
}

/// The token of every row of `logits: [rows, vocab]` (greedy and sampled alike), picked on
/// the device in one launch of [`sample_on_device`] so only the ids come back (CUDA); on the CPU
/// nothing is precomputed and every row goes through [`Sampler::sample`] (candle's
/// `LogitsProcessor`; greedy: first index on ties, as `torch.argmax`).
pub struct DeviceSampling(Option<Vec<u32>>);

impl DeviceSampling {
    /// `params`: one [`Sampler::device_param`] per row of `logits`, in row order (empty: no
    /// row is sampled, nothing is launched).
    pub fn new(logits: &Tensor, params: &RowParams) -> Result<Self> {
        if !params.0.is_empty() && logits.device().is_cuda() {
            return Ok(Self(Some(sample_on_device(logits, params)?)));
        }
        Ok(Self(None))
    }
}

impl Sampler {
    /// Next token of row `row` of `logits: [rows, vocab]`: `picks`' device pick where there is
    /// one, else [`Sampler::sample`] on that row.
    pub fn sample_row(&mut self, logits: &Tensor, row: usize, picks: &DeviceSampling) -> Result<u32> {
        match &picks.0 {
            Some(ids) => Ok(ids[row]),
            None => self.sample(&logits.get(row)?),
        }
    }
}

/// Index of the largest value; the first one on ties (as `torch.argmax`).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn greedy_takes_first_max_and_seeded_sampling_repeats() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        let logits = Tensor::new(&[1.0f32, 2.0, 0.5, 1.5, 0.0], &Device::Cpu).unwrap();
        let p = SamplingParams { temperature: 1.0, top_p: 0.9, top_k: 3, seed: 42, ..Default::default() };
        let run = || {
            let mut s = Sampler::new(&p);
            (0..50).map(|_| s.sample(&logits).unwrap()).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run(), "same seed, same draws");
        assert!(a.iter().all(|t| [0, 1, 3].contains(t)), "top-k 3 keeps ids 1, 3, 0: {a:?}");
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1, "sampling varies");
    }

    #[test]
    fn cpu_rows_still_go_through_the_logits_processor() {
        let logits = Tensor::new(&[[1.0f32, 2.0, 0.5, 1.5, 0.0], [0.0, 0.1, 3.0, 0.2, 2.9]], &Device::Cpu).unwrap();
        let greedy = SamplingParams::default();
        let sampled = SamplingParams { temperature: 0.9, top_p: 0.95, top_k: 4, seed: 7, ..Default::default() };
        let (mut a, mut b) = (Sampler::new(&greedy), Sampler::new(&sampled));
        let mut plain = LogitsProcessor::from_sampling(7, Sampling::TopKThenTopP { k: 4, p: 0.95, temperature: 0.9 });
        for _ in 0..40 {
            let params = RowParams(vec![a.device_param(), b.device_param()]);
            let picks = DeviceSampling::new(&logits, &params).unwrap();
            assert!(picks.0.is_none(), "nothing runs on the CPU ahead of the rows");
            assert_eq!(a.sample_row(&logits, 0, &picks).unwrap(), 1);
            let want = plain.sample(&logits.get(1).unwrap()).unwrap();
            assert_eq!(b.sample_row(&logits, 1, &picks).unwrap(), want, "exactly candle's LogitsProcessor");
        }
    }

    #[test]
    fn device_params_follow_the_request_and_its_seed() {
        let sp = SamplingParams { temperature: 0.7, top_p: 0.9, top_k: 40, seed: 3, ..Default::default() };
        let draws = |seed| {
            let mut s = Sampler::new(&SamplingParams { seed, ..sp.clone() });
            (0..20).map(|_| s.device_param()).collect::<Vec<_>>()
        };
        let a = draws(3);
        assert_eq!(a, draws(3), "the seed fixes the uniforms");
        assert_ne!(a, draws(4));
        assert!(a.iter().all(|p| p.temperature == 0.7 && p.top_k == 40 && p.top_p == 0.9 && (0.0..1.0).contains(&p.u)));
        let off = Sampler::new(&SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, ..Default::default() })
            .device_param();
        assert_eq!((off.top_k, off.top_p), (0, 1.0), "filters off");
        assert_eq!(Sampler::new(&SamplingParams::default()).device_param().temperature, 0.0, "greedy");
    }
}
