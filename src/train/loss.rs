//! Masked next-token cross-entropy (candle's `cross_entropy` has no ignore index).

use candle_core::{Tensor, D};

use crate::engine::layers::at_least_f32;

use super::TrainError;

/// Mean of `-log p(target)` over the rows given. `logits: [n, vocab]` are the rows that carry
/// loss (the caller selects them, so masked positions never enter the graph); `targets: [n]`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor, TrainError> {
    let n = targets.len();
    let t = Tensor::from_slice(targets, (n, 1), logits.device())?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(at_least_f32(logits.dtype()))?, D::Minus1)?;
    Ok((logp.gather(&t, 1)?.sum_all()? * (-1.0 / n as f64))?)
}

/// The rows (in packed order) whose next token carries loss, and those targets.
///
/// For sequence `s` starting at packed offset `o`, position `t` predicts `ids[t + 1]`, so row
/// `o + t` is kept when `mask[t + 1]`.
pub fn loss_rows(examples: &[(&[u32], &[bool])]) -> (Vec<u32>, Vec<u32>) {
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    let mut offset = 0u32;
    for (ids, mask) in examples {
        for t in 0..ids.len().saturating_sub(1) {
            if mask[t + 1] {
                rows.push(offset + t as u32);
                targets.push(ids[t + 1]);
            }
        }
        offset += ids.len() as u32;
    }
    (rows, targets)
}
