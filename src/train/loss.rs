//! Masked next-token cross-entropy (candle's `cross_entropy` has no ignore index).

use candle_core::{Tensor, D};

use crate::engine::model::layers::at_least_f32;

use super::TrainError;

/// Mean of `-log p(target)` over the rows given. `logits: [n, vocab]` are the rows that carry
/// loss (the caller selects them, so masked positions never enter the graph); `targets: [n]`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor, TrainError> {
    let n = targets.len();
    let t = Tensor::from_slice(targets, (n, 1), logits.device())?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(at_least_f32(logits.dtype()))?, D::Minus1)?;
    Ok((logp.gather(&t, 1)?.sum_all()? * (-1.0 / n as f64))?)
}
