//! Paged KV cache: one pool of fixed-size blocks per layer, a block table per sequence.
//!
//! Memory is reserved once (capacity from `--gpu-memory-utilization` / `--kv-cache-memory`);
//! sequences grow block by block and give their blocks back when they finish, are cancelled or
//! are preempted, so fragmentation is bounded by one partial block per sequence.

use candle_core::{DType, Device, Tensor};

use crate::engine::kv::prefix::PrefixIndex;
use crate::engine::kv::{KvStore, PagedView};
use crate::engine::model::config::LlamaConfig;
use crate::engine::{EngineError, Result};

/// Blocks owned by one sequence and how many positions they hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
    len: usize,
    /// Chain hashes of the leading full blocks the prefix cache knows (see [`PrefixIndex`]).
    hashes: Vec<u64>,
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

    /// Forgets the positions past `len`, keeping the blocks (the next writes overwrite those
    /// rows): a benchmark re-times decode steps at the same context. Not for a table whose
    /// blocks the prefix cache holds (their contents would change under their hashes).
    pub fn rewind(&mut self, len: usize) {
        assert!(self.hashes.is_empty(), "rewind of a table in the prefix cache");
        self.len = self.len.min(len);
    }
}

/// The block pool: per layer, keys and values as `[num_blocks * block_size, kv_heads, head_dim]`.
pub struct PagedKvCache {
    block_size: usize,
    num_blocks: usize,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Unreferenced blocks outside the prefix cache.
    free: Vec<u32>,
    prefix: PrefixIndex,
    prefix_caching: bool,
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
        let prefix = PrefixIndex::new(num_blocks);
        Ok(Self { block_size, num_blocks, k, v, free, prefix, prefix_caching: false })
    }

    /// Keeps full blocks for reuse by later sequences with the same prefix (see
    /// [`PrefixIndex`]); off by default (benchmarks and tests of the pool itself).
    pub fn with_prefix_caching(mut self, on: bool) -> Self {
        self.prefix_caching = on;
        self
    }

    /// Attaches to the empty `table` the cached blocks of the longest cached prefix of
    /// `tokens` under `salt` (the adapter generation, 0 = base); returns the positions they
    /// cover (whole blocks, fewer than `tokens.len()`). 0 when caching is off.
    pub fn attach_prefix(&mut self, table: &mut BlockTable, tokens: &[u32], salt: u64) -> usize {
        if !self.prefix_caching || !table.blocks.is_empty() {
            return 0;
        }
        for (b, h) in self.prefix.attach(tokens, salt, self.block_size) {
            table.blocks.push(b);
            table.hashes.push(h);
        }
        table.len = table.blocks.len() * self.block_size;
        table.len
    }

    /// Indexes the full blocks of `table` that hold `tokens` (its computed positions, from 0)
    /// under `salt`, so later sequences can attach them.
    pub fn cache_blocks(&mut self, table: &mut BlockTable, tokens: &[u32], salt: u64) {
        if self.prefix_caching {
            let n = tokens.len().min(table.len);
            self.prefix.register(&table.blocks, &mut table.hashes, &tokens[..n], salt, self.block_size);
        }
    }

    /// Blocks in the prefix cache (referenced or not).
    pub fn num_cached_blocks(&self) -> usize {
        self.prefix.num_cached()
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

    /// Blocks a reservation can take: free ones and unreferenced cached ones.
    pub fn num_free_blocks(&self) -> usize {
        self.free.len() + self.prefix.num_evictable()
    }

    /// Blocks a sequence of `len` positions occupies.
    pub fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.block_size)
    }

    /// Grows `table` so it can hold `new_len` positions; false (and no change) if the pool is
    /// short of blocks.
    pub fn reserve(&mut self, table: &mut BlockTable, new_len: usize) -> bool {
        let need = self.blocks_for(new_len).saturating_sub(table.blocks.len());
        if need > self.num_free_blocks() {
            return false;
        }
        for _ in 0..need {
            let b = match self.free.pop() {
                Some(b) => b,
                None => self.prefix.evict_oldest().expect("counted above"),
            };
            self.prefix.take_fresh(b);
            table.blocks.push(b);
        }
        true
    }

    /// Lets go of every block of `table`: blocks no other table references return to the
    /// pool (cached ones stay findable until the pool needs them).
    pub fn release(&mut self, table: &mut BlockTable) {
        for b in table.blocks.drain(..).rev() {
            if self.prefix.release(b) {
                self.free.push(b);
            }
        }
        table.hashes.clear();
        table.len = 0;
    }

    /// References held on block `b` (invariant checks in tests).
    pub fn block_refs(&self, b: u32) -> u32 {
        self.prefix.refs(b)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize) -> PagedKvCache {
        let cfg = LlamaConfig::preset("tiny").unwrap();
        PagedKvCache::new(&cfg, blocks, 4, DType::F32, &Device::Cpu).unwrap().with_prefix_caching(true)
    }

    #[test]
    fn rewind_keeps_the_blocks_and_forgets_the_positions() {
        let mut kv = pool(4);
        let mut t = BlockTable::default();
        assert!(kv.reserve(&mut t, 10));
        t.len = 10;
        t.rewind(6);
        assert_eq!((t.len(), t.num_blocks()), (6, 3));
        t.rewind(8);
        assert_eq!(t.len(), 6, "never forward");
        assert!(kv.reserve(&mut t, 10), "the rewound rows are reused, no new block");
        assert_eq!(kv.num_free_blocks(), 1);
    }

    #[test]
    fn shared_blocks_are_refcounted_and_cached_ones_are_evicted_only_when_needed() {
        let mut kv = pool(6);
        let toks: Vec<u32> = (0..10).collect();
        let mut a = BlockTable::default();
        assert!(kv.reserve(&mut a, 10));
        a.len = 10;
        kv.cache_blocks(&mut a, &toks, 5);
        let mut b = BlockTable::default();
        assert_eq!(kv.attach_prefix(&mut b, &toks, 5), 8, "two full blocks shared");
        assert!(kv.reserve(&mut b, 10), "one private block for the tail");
        assert_eq!(kv.block_refs(a.blocks[0]), 2);
        assert_eq!(kv.num_free_blocks(), 2);
        kv.release(&mut a);
        assert_eq!(kv.block_refs(b.blocks[0]), 1, "b still holds the shared blocks");
        kv.release(&mut b);
        assert_eq!(kv.num_free_blocks(), 6, "all usable again");
        assert_eq!(kv.num_cached_blocks(), 2, "and the two full blocks stay cached");
        let mut c = BlockTable::default();
        assert_eq!(kv.attach_prefix(&mut c, &toks, 5), 8, "found after release");
        kv.release(&mut c);
        let mut big = BlockTable::default();
        assert!(kv.reserve(&mut big, 24), "six blocks: the cached ones are evicted for it");
        assert_eq!(kv.num_cached_blocks(), 0);
        kv.release(&mut big);
        assert_eq!(kv.attach_prefix(&mut BlockTable::default(), &toks, 5), 0);
    }
}
