//! The scheduler's [`Resources`] over the real things: the paged KV cache's blocks and the
//! adapter registry's slots.

use std::collections::BTreeMap;

use crate::engine::kv::paged::{BlockTable, PagedKvCache};
use crate::engine::lora::registry::{AdapterRegistry, SlotRequest};
use crate::engine::scheduler::{Grant, Resources, SeqId};

/// KV blocks and adapter slots, borrowed for one scheduling pass.
pub struct EngineResources<'a> {
    pub kv: &'a mut PagedKvCache,
    pub tables: &'a mut BTreeMap<SeqId, BlockTable>,
    pub registry: &'a mut AdapterRegistry,
}

impl Resources for EngineResources<'_> {
    fn reserve(&mut self, id: SeqId, len: usize) -> bool {
        self.kv.reserve(self.tables.entry(id).or_default(), len)
    }

    fn release(&mut self, id: SeqId) {
        if let Some(mut t) = self.tables.remove(&id) {
            self.kv.release(&mut t);
        }
    }

    fn acquire_adapter(&mut self, adapter: &str) -> Grant {
        match self.registry.acquire(adapter) {
            Ok(SlotRequest::Ready { slot, .. }) => Grant::Ready(slot),
            Ok(SlotRequest::Pending) => Grant::NotYet,
            Ok(SlotRequest::Failed(m)) => Grant::Failed(format!("adapter `{adapter}` failed to load: {m}")),
            Ok(SlotRequest::Unknown) => Grant::Failed(format!("adapter `{adapter}` was unloaded")),
            Err(e) => Grant::Failed(format!("adapter `{adapter}`: {e}")),
        }
    }

    fn release_adapter(&mut self, slot: usize) {
        self.registry.release(slot);
    }

    fn is_resident(&self, adapter: &str) -> bool {
        self.registry.state().is_resident(adapter)
    }

    fn attach_prefix(&mut self, id: SeqId, tokens: &[u32], slot: Option<usize>) -> usize {
        let salt = self.salt(slot);
        self.kv.attach_prefix(self.tables.entry(id).or_default(), tokens, salt)
    }

    fn cache_computed(&mut self, id: SeqId, tokens: &[u32], slot: Option<usize>) {
        let salt = self.salt(slot);
        if let Some(t) = self.tables.get_mut(&id) {
            self.kv.cache_blocks(t, tokens, salt);
        }
    }
}

impl EngineResources<'_> {
    /// The prefix-cache salt of KV computed with `slot`: the generation of the adapter it
    /// holds (unique per load, so a reload never meets its old KV); 0 for the base model.
    fn salt(&self, slot: Option<usize>) -> u64 {
        slot.and_then(|s| self.registry.state().slot_contents().get(s).cloned().flatten()).map_or(0, |a| a.generation)
    }
}
