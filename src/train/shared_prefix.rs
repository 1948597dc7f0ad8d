//! Shared-prefix packing: examples of one micro-batch that start with the same tokens (the
//! domain's system message, typically 80% of each sequence) run that prefix once.
//!
//! The packed batch holds the prefix as sequence 0 and each example's remainder as a sequence
//! at position `P`; [`SharedPrefixKv`] hands every remainder the prefix's keys and values
//! before its own. The loss and its gradients are exactly those of running each example in
//! full (the prefix's activations are the same for all of them); only the repeated work goes.

use candle_core::Tensor;

use crate::engine::kv::KvStore;
use crate::engine::model::PackedBatch;
use crate::engine::Result;

use super::examples::TokenizedExample;

/// Length of the prefix the batch can share: the longest common token prefix, cut so that no
/// row whose prediction carries loss falls inside it (those targets differ per example).
pub fn shared_prefix_len(batch: &[&TokenizedExample]) -> usize {
    let Some(first) = batch.first() else { return 0 };
    let mut p = first.ids.len();
    for e in batch {
        p = p.min(first.ids.iter().zip(&e.ids).take_while(|(a, b)| a == b).count());
        let first_loss = e.mask.iter().position(|m| *m).unwrap_or(e.ids.len());
        // Row p-1 predicts ids[p]: it must not carry loss, and every example keeps >= 1 token.
        p = p.min(first_loss.saturating_sub(1)).min(e.ids.len().saturating_sub(1));
    }
    p
}

/// The packed batch (prefix first, then each remainder) and its loss rows and targets.
pub fn pack(batch: &[&TokenizedExample], prefix: usize, slot: Option<usize>) -> (PackedBatch, Vec<u32>, Vec<u32>) {
    let mut packed = PackedBatch::default();
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    let mut offset = 0u32;
    if prefix > 0 {
        packed.push_with_slot(&batch[0].ids[..prefix], 0, slot);
        offset = prefix as u32;
    }
    for e in batch {
        let rest = &e.ids[prefix..];
        packed.push_with_slot(rest, prefix, slot);
        for j in 0..rest.len().saturating_sub(1) {
            if e.mask[prefix + j + 1] {
                rows.push(offset + j as u32);
                targets.push(e.ids[prefix + j + 1]);
            }
        }
        offset += rest.len() as u32;
    }
    (packed, rows, targets)
}

/// KV store for [`pack`]ed batches: sequence 0 is the shared prefix (when `has_prefix`).
pub struct SharedPrefixKv {
    has_prefix: bool,
    prefix: Vec<Option<(Tensor, Tensor)>>,
}

impl SharedPrefixKv {
    pub fn new(num_layers: usize, has_prefix: bool) -> Self {
        Self { has_prefix, prefix: vec![None; num_layers] }
    }
}

impl KvStore for SharedPrefixKv {
    fn store_and_fetch(&mut self, seq: usize, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if !self.has_prefix {
            return Ok((k.clone(), v.clone()));
        }
        if seq == 0 {
            self.prefix[layer] = Some((k.clone(), v.clone()));
            return Ok((k.clone(), v.clone()));
        }
        let (pk, pv) = self.prefix[layer].as_ref().expect("the prefix is sequence 0 of every layer");
        Ok((Tensor::cat(&[pk, k], 0)?, Tensor::cat(&[pv, v], 0)?))
    }
}
