//! One throwaway prefill and decode before anything is timed or served: on CUDA the driver
//! JIT-compiles candle's and our PTX modules at first use (~10-25 s on a fresh machine), and
//! cuBLAS picks its kernels; none of that should land on the first request.

use std::time::{Duration, Instant};

use crate::engine::kv::paged::{BlockTable, PagedKvCache};
use crate::engine::model::{Llama, LogitsAt, PackedBatch};
use crate::engine::Result;

/// Runs a 32-token prefill and two decode steps of two sequences through `kv`, then gives
/// their blocks back. Returns how long it took.
pub fn warm_up(model: &Llama, kv: &mut PagedKvCache) -> Result<Duration> {
    let t = Instant::now();
    let len = 32.min(model.config().max_position_embeddings.saturating_sub(3)).max(2);
    let mut tables = [BlockTable::default(), BlockTable::default()];
    if !tables.iter_mut().all(|t| kv.reserve(t, len + 2)) {
        tables.iter_mut().for_each(|t| kv.release(t));
        return Ok(t.elapsed()); // a pool this small serves nothing long enough to matter
    }
    let vocab = model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..len as u32).map(|i| (i * 7919) % vocab).collect();
    let mut b = PackedBatch::default();
    b.push(&prompt, 0);
    b.push(&prompt[..len / 2], 0);
    let run = |b: &PackedBatch, kv: &mut PagedKvCache, tables: &mut [BlockTable; 2]| -> Result<()> {
        let logits = model.forward(b, &mut kv.batch(tables.iter_mut().collect()), LogitsAt::Last)?;
        logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
        Ok(())
    };
    run(&b, kv, &mut tables)?;
    for _ in 0..2 {
        let mut d = PackedBatch::default();
        for t in &tables {
            d.push(&[1], t.len());
        }
        run(&d, kv, &mut tables)?;
    }
    tables.iter_mut().for_each(|t| kv.release(t));
    model.device().synchronize()?;
    Ok(t.elapsed())
}
