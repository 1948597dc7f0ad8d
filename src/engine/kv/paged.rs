//! Paged KV cache: one pool of fixed-size blocks per layer, a block table per sequence.
//!
//! Memory is reserved once (capacity from `--gpu-memory-utilization` / `--kv-cache-memory`);
//! sequences grow block by block and give their blocks back when they finish, are cancelled or
//! are preempted, so fragmentation is bounded by one partial block per sequence.

use candle_core::{DType, Device, Tensor};

use crate::engine::kv::{KvStore, PagedView};
use crate::engine::model::config::LlamaConfig;
use crate::engine::{EngineError, Result};

/// Blocks owned by one sequence and how many positions they hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
    len: usize,
}

impl BlockTable {
    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks held.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
}

/// The block pool: per layer, keys and values as `[num_blocks * block_size, kv_heads, head_dim]`.
pub struct PagedKvCache {
    block_size: usize,
    num_blocks: usize,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    free: Vec<u32>,
}

impl PagedKvCache {
    /// Reserves `num_blocks` blocks of `block_size` positions for every layer of `cfg`.
    pub fn new(cfg: &LlamaConfig, num_blocks: usize, block_size: usize, dtype: DType, device: &Device) -> Result<Self> {
        let shape = (num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim);
        let mut k = Vec::with_capacity(cfg.num_hidden_layers);
        let mut v = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            k.push(Tensor::zeros(shape, dtype, device)?);
            v.push(Tensor::zeros(shape, dtype, device)?);
        }
        // Hand out low block ids first (pop from the back).
        let free = (0..num_blocks as u32).rev().collect();
        Ok(Self { block_size, num_blocks, k, v, free })
    }

    /// Bytes one block takes across all layers (keys and values).
    pub fn block_bytes(cfg: &LlamaConfig, block_size: usize, dtype: DType) -> usize {
        2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * dtype.size_in_bytes()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks a sequence of `len` positions occupies.
    pub fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.block_size)
    }

    /// Grows `table` so it can hold `new_len` positions; false (and no change) if the pool is
    /// short of blocks.
    pub fn reserve(&mut self, table: &mut BlockTable, new_len: usize) -> bool {
        let need = self.blocks_for(new_len).saturating_sub(table.blocks.len());
        if need > self.free.len() {
            return false;
        }
        for _ in 0..need {
            table.blocks.push(self.free.pop().expect("checked above"));
        }
        true
    }

    /// Returns every block of `table` to the pool.
    pub fn release(&mut self, table: &mut BlockTable) {
        self.free.extend(table.blocks.drain(..).rev());
        table.len = 0;
    }

    /// A [`KvStore`] for one forward over sequences with these tables (in batch order).
    pub fn batch<'a>(&'a mut self, tables: Vec<&'a mut BlockTable>) -> PagedBatch<'a> {
        PagedBatch { cache: self, tables }
    }

    /// The pool and these tables as device kernels see them.
    pub fn view<'a>(&self, tables: impl IntoIterator<Item = &'a BlockTable>) -> PagedView {
        let (blocks, past) = tables.into_iter().map(|t| (t.blocks.clone(), t.len)).unzip();
        PagedView { block_size: self.block_size, k: self.k.clone(), v: self.v.clone(), tables: blocks, past }
    }

    fn row(&self, table: &BlockTable, pos: usize) -> usize {
        table.blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }
}

/// The paged cache seen by one forward.
pub struct PagedBatch<'a> {
    cache: &'a mut PagedKvCache,
    tables: Vec<&'a mut BlockTable>,
}

impl KvStore for PagedBatch<'_> {
    fn store_and_fetch(&mut self, seq: usize, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = &*self.cache;
        let table = &*self.tables[seq];
        let n = k.dim(0)?;
        let past = table.len;
        if c.blocks_for(past + n) > table.blocks.len() {
            return Err(EngineError::Weights(format!("KV blocks for {} positions were not reserved", past + n)));
        }
        // Write block-contiguous runs in place.
        let mut i = 0;
        while i < n {
            let pos = past + i;
            let run = (c.block_size - pos % c.block_size).min(n - i);
            let row = c.row(table, pos);
            c.k[layer].slice_set(&k.narrow(0, i, run)?.contiguous()?, 0, row)?;
            c.v[layer].slice_set(&v.narrow(0, i, run)?.contiguous()?, 0, row)?;
            i += run;
        }
        let rows: Vec<u32> = (0..past + n).map(|p| c.row(table, p) as u32).collect();
        let idx = Tensor::from_vec(rows, past + n, k.device())?;
        let out = (c.k[layer].index_select(&idx, 0)?, c.v[layer].index_select(&idx, 0)?);
        if layer + 1 == c.k.len() {
            self.tables[seq].len = past + n;
        }
        Ok(out)
    }

    fn paged_view(&self) -> Option<PagedView> {
        Some(self.cache.view(self.tables.iter().map(|t| &**t)))
    }

    fn commit(&mut self, new_lens: &[usize]) {
        for (t, n) in self.tables.iter_mut().zip(new_lens) {
            t.len += n;
        }
    }
}
