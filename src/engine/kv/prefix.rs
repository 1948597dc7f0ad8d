//! Automatic prefix caching: full KV blocks indexed by what they hold, so a request whose
//! prompt starts like an earlier one's (the same system message, the same few-shot examples)
//! reuses those blocks instead of prefilling them again.
//!
//! As vLLM's automatic prefix caching: a full block is keyed by (the key hash of the block
//! before it, a salt, its tokens); the salt names the adapter generation the KV was computed
//! under (0 = base model), so a block is never shared across adapters or across two loads of
//! one adapter (a reload must not serve stale KV). Keys are compared exactly (tokens and all),
//! the 64-bit hash only chains them. Blocks are refcounted; an unreferenced cached block stays
//! in the index until the pool needs it back (least recently released first).
//!
//! ```text
//! attach(tokens, salt):  h = 0; for each full block i of tokens[..len - 1]:
//!                            key = (h, salt, tokens[i*bs..(i+1)*bs]); stop unless cached
//!                            take the block (refs += 1), h = hash(key)
//! register(table):       for each full block past those already keyed: index it unless its
//!                        key is cached already (then the table keeps its private copy)
//! ```

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// What one full block holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    parent: u64,
    salt: u64,
    tokens: Box<[u32]>,
}

impl BlockKey {
    fn chain_hash(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

/// Refcounts of every block of a pool and the index of its cached full blocks.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    refs: Vec<u32>,
    by_key: HashMap<BlockKey, u32>,
    key_of: HashMap<u32, BlockKey>,
    /// Cached blocks nobody references, by release time (oldest first).
    evictable: BTreeMap<u64, u32>,
    released_at: HashMap<u32, u64>,
    clock: u64,
}

impl PrefixIndex {
    pub fn new(num_blocks: usize) -> Self {
        Self { refs: vec![0; num_blocks], ..Default::default() }
    }

    /// Unreferenced cached blocks (usable: evicted on demand).
    pub fn num_evictable(&self) -> usize {
        self.evictable.len()
    }

    /// Cached blocks, referenced or not.
    pub fn num_cached(&self) -> usize {
        self.key_of.len()
    }

    /// Takes the oldest unreferenced cached block out of the index, for reuse.
    pub fn evict_oldest(&mut self) -> Option<u32> {
        let (_, b) = self.evictable.pop_first()?;
        self.released_at.remove(&b);
        if let Some(key) = self.key_of.remove(&b) {
            self.by_key.remove(&key);
        }
        Some(b)
    }

    /// A fresh (uncached) block enters a table.
    pub fn take_fresh(&mut self, b: u32) {
        self.refs[b as usize] = 1;
    }

    /// A table lets go of `b`; returns true when `b` is now free and uncached (the caller's
    /// free list gets it), false when it is still referenced or stays cached.
    pub fn release(&mut self, b: u32) -> bool {
        let r = &mut self.refs[b as usize];
        *r = r.saturating_sub(1);
        if *r > 0 {
            return false;
        }
        if self.key_of.contains_key(&b) {
            self.clock += 1;
            self.evictable.insert(self.clock, b);
            self.released_at.insert(b, self.clock);
            return false;
        }
        true
    }

    /// The cached blocks of the longest cached prefix of `tokens` in whole blocks of `bs`,
    /// leaving at least one token uncovered (its logits come from a forward); each returned
    /// block is referenced once more. Also returns the chain hash after each block.
    pub fn attach(&mut self, tokens: &[u32], salt: u64, bs: usize) -> Vec<(u32, u64)> {
        let full = tokens.len().saturating_sub(1) / bs;
        let mut out = Vec::new();
        let mut parent = 0;
        for i in 0..full {
            let key = BlockKey { parent, salt, tokens: tokens[i * bs..(i + 1) * bs].into() };
            let Some(&b) = self.by_key.get(&key) else { break };
            if self.refs[b as usize] == 0 {
                if let Some(t) = self.released_at.remove(&b) {
                    self.evictable.remove(&t);
                }
            }
            self.refs[b as usize] += 1;
            parent = key.chain_hash();
            out.push((b, parent));
        }
        out
    }

    /// Indexes the full blocks `blocks[hashes.len()..]` holding `tokens` (the table's known
    /// positions, block-aligned from 0) under `salt`; extends `hashes` with their chain hashes.
    pub fn register(&mut self, blocks: &[u32], hashes: &mut Vec<u64>, tokens: &[u32], salt: u64, bs: usize) {
        let full = (tokens.len() / bs).min(blocks.len());
        for i in hashes.len()..full {
            let parent = if i == 0 { 0 } else { hashes[i - 1] };
            let key = BlockKey { parent, salt, tokens: tokens[i * bs..(i + 1) * bs].into() };
            hashes.push(key.chain_hash());
            let b = blocks[i];
            if !self.by_key.contains_key(&key) && !self.key_of.contains_key(&b) {
                self.by_key.insert(key.clone(), b);
                self.key_of.insert(b, key);
            }
        }
    }

    /// References held on `b` (tests and invariants).
    pub fn refs(&self, b: u32) -> u32 {
        self.refs[b as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_found_by_content_and_salt_and_leaves_one_token() {
        let mut ix = PrefixIndex::new(8);
        let toks: Vec<u32> = (0..10).collect();
        for b in [3, 5] {
            ix.take_fresh(b);
        }
        let mut hashes = Vec::new();
        ix.register(&[3, 5, 6], &mut hashes, &toks, 7, 4);
        assert_eq!(hashes.len(), 2, "two full blocks of 4 in 10 tokens");
        let got = ix.attach(&toks, 7, 4);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(ix.refs(3), 2);
        assert!(ix.attach(&toks, 8, 4).is_empty(), "another adapter generation shares nothing");
        assert_eq!(ix.attach(&toks[..8], 7, 4).len(), 1, "8 tokens: the last block is recomputed");
        let mut other = toks.clone();
        other[5] = 99;
        assert_eq!(ix.attach(&other, 7, 4).len(), 1, "a different second block stops the match");
    }

    #[test]
    fn unreferenced_blocks_stay_cached_until_evicted_oldest_first() {
        let mut ix = PrefixIndex::new(4);
        let toks: Vec<u32> = (0..9).collect();
        ix.take_fresh(0);
        ix.take_fresh(1);
        ix.register(&[0, 1], &mut Vec::new(), &toks, 0, 4);
        assert!(!ix.release(1) && !ix.release(0), "cached: not handed to the free list");
        assert_eq!(ix.num_evictable(), 2);
        assert_eq!(ix.attach(&toks, 0, 4).len(), 2, "still cached after release");
        assert_eq!(ix.num_evictable(), 0, "referenced again");
        ix.release(0);
        ix.release(1);
        assert_eq!(ix.evict_oldest(), Some(0), "released first, evicted first");
        assert_eq!(ix.attach(&toks, 0, 4).len(), 0, "the chain starts at the evicted block");
        ix.take_fresh(2);
        assert!(ix.release(2), "an uncached block goes back to the free list");
    }
}
