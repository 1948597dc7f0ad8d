//! Next-token choice: greedy, temperature, top-k, top-p, seeded; and when to stop.

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::Serialize;

use super::Result;

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

/// Picks tokens from logits according to [`SamplingParams`].
pub struct Sampler {
    greedy: bool,
    processor: LogitsProcessor,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        let t = p.temperature;
        let top_p = (p.top_p > 0.0 && p.top_p < 1.0).then_some(p.top_p);
        let top_k = (p.top_k > 0).then_some(p.top_k);
        let sampling = match (top_k, top_p) {
            _ if t <= 0.0 => Sampling::ArgMax,
            (None, None) => Sampling::All { temperature: t },
            (Some(k), None) => Sampling::TopK { k, temperature: t },
            (None, Some(p)) => Sampling::TopP { p, temperature: t },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature: t },
        };
        Self { greedy: t <= 0.0, processor: LogitsProcessor::from_sampling(p.seed, sampling) }
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

/// The greedy token of every row of `logits: [rows, vocab]`, picked on the device in one
/// launch so only the ids come back (CUDA); on the CPU nothing is precomputed and greedy rows go
/// through [`Sampler::sample`] (the reference: first index on ties, as `torch.argmax`).
///
/// Sampled rows (temperature > 0) still copy their logits row to the host, where the seeded
/// [`Sampler`] draws them.
pub struct DeviceGreedy(Option<Vec<u32>>);

impl DeviceGreedy {
    /// `any_greedy`: whether some row will use it (otherwise nothing is launched).
    pub fn new(logits: &Tensor, any_greedy: bool) -> Result<Self> {
        if any_greedy && logits.device().is_cuda() {
            return Ok(Self(Some(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?)));
        }
        Ok(Self(None))
    }
}

impl Sampler {
    /// Next token of row `row` of `logits: [rows, vocab]`, using `greedy`'s device pick where
    /// there is one.
    pub fn sample_row(&mut self, logits: &Tensor, row: usize, greedy: &DeviceGreedy) -> Result<u32> {
        match &greedy.0 {
            Some(ids) if self.greedy => Ok(ids[row]),
            _ => self.sample(&logits.get(row)?),
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
}
