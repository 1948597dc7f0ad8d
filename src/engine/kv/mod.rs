//! KV storage behind the attention: the forward asks a [`KvStore`] to keep a chunk's keys and
//! values and to hand back every position of that sequence so far.

pub mod budget;
pub mod paged;
pub mod prefix;

use candle_core::Tensor;

use crate::engine::Result;

/// Where attention keeps keys/values between steps.
///
/// Entry `seq` is the index of a sequence within the current packed batch. Keys and values are
/// `[tokens, kv_heads, head_dim]`; positions must be appended in order.
pub trait KvStore {
    /// Stores `k`, `v` (this step's tokens) for `seq` in `layer` and returns the keys and values
    /// of all positions `0..past_len + tokens` of that sequence.
    fn store_and_fetch(&mut self, seq: usize, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)>;

    /// The block pool and this batch's block tables, for kernels that read and write the pool
    /// in place (CUDA); `None` for stores without one. A forward that uses the view calls
    /// [`KvStore::commit`] once at its end instead of [`KvStore::store_and_fetch`] per layer.
    fn paged_view(&self) -> Option<PagedView> {
        None
    }

    /// Records that sequence `i` of the batch now holds `new_lens[i]` more positions.
    fn commit(&mut self, _new_lens: &[usize]) {}
}

/// A paged pool as device kernels see it: per layer the key and value pools
/// `[num_blocks * block_size, kv_heads, head_dim]`, and per batch sequence its block ids and the
/// positions already stored.
#[derive(Debug, Clone)]
pub struct PagedView {
    pub block_size: usize,
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub tables: Vec<Vec<u32>>,
    pub past: Vec<usize>,
}

/// No cache: each sequence is processed whole in one forward (training, scoring).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCache;

impl KvStore for NoCache {
    fn store_and_fetch(&mut self, _seq: usize, _layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((k.clone(), v.clone()))
    }
}

/// One sequence's contiguous cache: per layer, a growable buffer (candle's `KvCache`, which
/// grows by whole chunks and writes in place instead of concatenating every step).
#[derive(Debug, Clone)]
pub struct SeqCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
}

impl SeqCache {
    /// A cache for `num_layers` layers that preallocates `chunk` positions at a time.
    pub fn new(num_layers: usize, chunk: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| candle_nn::kv_cache::KvCache::new(0, chunk)).collect() }
    }

    /// An independent copy (its own buffers) of this cache, to continue a shared prefix.
    pub fn fork(&self, chunk: usize) -> Result<Self> {
        let mut out = Self::new(self.layers.len(), chunk);
        for (dst, src) in out.layers.iter_mut().zip(&self.layers) {
            if let (Some(k), Some(v)) = (src.k()?, src.v()?) {
                dst.append(&k, &v)?;
            }
        }
        Ok(out)
    }

    /// Positions stored so far.
    pub fn len(&self) -> usize {
        self.layers.first().map(|l| l.current_seq_len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The caches of the sequences of one packed batch, in batch order.
pub struct BatchCaches<'a>(pub Vec<&'a mut SeqCache>);

impl KvStore for BatchCaches<'_> {
    fn store_and_fetch(&mut self, seq: usize, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(self.0[seq].layers[layer].append(&k.contiguous()?, &v.contiguous()?)?)
    }
}
