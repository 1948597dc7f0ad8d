//! `AdapterRegistry`: disk -> CPU LRU (`--max-cpu-loras`) -> device slots (`--max-loras`).
//!
//! The policy is [`RegistryState`], a plain struct with no I/O, unit-tested directly:
//! - every load of a name gets a new generation; a sequence binds the generation current when
//!   it acquires its slot and keeps that slot pinned until it finishes, so a reload never
//!   changes a running sequence; new sequences get the new generation;
//! - eviction is LRU among unpinned slots, stale generations first; a pinned slot is never
//!   evicted; when every slot is pinned, `acquire` answers `Wait` (never fails, never evicts);
//! - disk reads happen on a loader thread: `acquire` answers `Load` once, then `Loading`, so a
//!   step that does not need that adapter never waits for it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::lora::slots::{PendingWrite, SlotBank, SlotImage};
use crate::engine::lora::{LoraAdapter, LoraError};
use crate::engine::Result;

/// Tier sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Device slots (`--max-loras`).
    pub max_loras: usize,
    /// Parsed adapters kept in host memory (`--max-cpu-loras`).
    pub max_cpu_loras: usize,
    /// A failed load is the answer for this long; the next request after it reads the files
    /// again (a failure kept for ever made a fixed adapter need a reload by hand, and
    /// retrying on every request would re-read a broken one at the request rate).
    pub retry_failed_after: Duration,
}

/// One loaded version of a named adapter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AdapterId {
    pub name: String,
    pub generation: u64,
}

/// What `acquire` asks the caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// The adapter is in `slot`, now pinned for the caller.
    Ready { slot: usize, id: AdapterId },
    /// Copy the CPU copy of `id` into `slot` (pinned for the caller); `evicted` left the slot.
    CopyIn { slot: usize, id: AdapterId, evicted: Option<AdapterId> },
    /// Read `id` from `path` in the background, then call `cpu_loaded`.
    Load { id: AdapterId, path: PathBuf },
    /// A load of this adapter is under way.
    Loading,
    /// Every slot is pinned by running sequences: try again after one finishes.
    Wait,
    /// Its last load failed with this message (a new registration clears it).
    Failed(String),
    /// No adapter of that name.
    Unknown,
}

#[derive(Debug, Clone)]
struct Known {
    path: PathBuf,
    generation: u64,
    /// The last load's failure and when it happened.
    error: Option<(String, Instant)>,
}

#[derive(Debug, Clone, Default)]
struct Slot {
    holds: Option<AdapterId>,
    pins: usize,
    last_used: u64,
}

/// The registry's policy state (no tensors, no I/O).
#[derive(Debug, Clone)]
pub struct RegistryState {
    cfg: RegistryConfig,
    known: BTreeMap<String, Known>,
    cpu: BTreeMap<AdapterId, u64>,
    loading: BTreeMap<AdapterId, ()>,
    slots: Vec<Slot>,
    next_generation: u64,
    clock: u64,
}

impl RegistryState {
    pub fn new(cfg: RegistryConfig) -> Self {
        Self {
            cfg,
            known: BTreeMap::new(),
            cpu: BTreeMap::new(),
            loading: BTreeMap::new(),
            slots: vec![Slot::default(); cfg.max_loras],
            next_generation: 1,
            clock: 0,
        }
    }

    /// Registers (or re-registers, i.e. reloads) `name` at `path`; returns its new generation.
    /// Returns the CPU copies that became unreachable, for the caller to drop.
    pub fn register(&mut self, name: &str, path: &Path) -> (AdapterId, Vec<AdapterId>) {
        let generation = self.next_generation;
        self.next_generation += 1;
        self.known.insert(name.to_string(), Known { path: path.to_path_buf(), generation, error: None });
        (AdapterId { name: name.to_string(), generation }, self.drop_stale_cpu(name))
    }

    /// Forgets `name`; running sequences keep their slots until they finish.
    pub fn unregister(&mut self, name: &str) -> Option<Vec<AdapterId>> {
        self.known.remove(name)?;
        Some(self.drop_stale_cpu(name))
    }

    /// Names and current generations of every registered adapter.
    pub fn names(&self) -> Vec<(String, u64)> {
        self.known.iter().map(|(n, k)| (n.clone(), k.generation)).collect()
    }

    /// The current generation of `name`.
    pub fn current(&self, name: &str) -> Option<AdapterId> {
        self.known.get(name).map(|k| AdapterId { name: name.to_string(), generation: k.generation })
    }

    /// Whether the current generation of `name` sits in a slot (the scheduler prefers those).
    pub fn is_resident(&self, name: &str) -> bool {
        self.current(name).is_some_and(|id| self.slots.iter().any(|s| s.holds.as_ref() == Some(&id)))
    }

    /// Asks for a pinned slot holding the current generation of `name`.
    pub fn acquire(&mut self, name: &str) -> Acquire {
        let retry = self.cfg.retry_failed_after;
        let Some(known) = self.known.get_mut(name) else { return Acquire::Unknown };
        match &known.error {
            Some((e, at)) if at.elapsed() < retry => return Acquire::Failed(e.clone()),
            Some(_) => known.error = None, // time to read the files again
            None => {}
        }
        let id = AdapterId { name: name.to_string(), generation: known.generation };
        let path = known.path.clone();
        self.clock += 1;
        if let Some(slot) = self.slots.iter().position(|s| s.holds.as_ref() == Some(&id)) {
            let s = &mut self.slots[slot];
            s.pins += 1;
            s.last_used = self.clock;
            return Acquire::Ready { slot, id };
        }
        if self.cpu.contains_key(&id) {
            let Some(slot) = self.victim_slot() else { return Acquire::Wait };
            self.cpu.insert(id.clone(), self.clock);
            let s = &mut self.slots[slot];
            let evicted = s.holds.replace(id.clone());
            s.pins = 1;
            s.last_used = self.clock;
            return Acquire::CopyIn { slot, id, evicted };
        }
        if self.loading.contains_key(&id) {
            return Acquire::Loading;
        }
        self.loading.insert(id.clone(), ());
        Acquire::Load { id, path }
    }

    /// Unpins one use of `slot`.
    pub fn release(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.pins = s.pins.saturating_sub(1);
        }
    }

    /// Empties `slot` after a failed copy-in (unpinned, holding nothing).
    pub fn vacate(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.pins = 0;
            s.holds = None;
        }
    }

    /// A background load finished: `id` is now in the CPU tier. Returns CPU copies evicted
    /// (least recently used first) to respect `max_cpu_loras`.
    pub fn cpu_loaded(&mut self, id: AdapterId) -> Vec<AdapterId> {
        self.loading.remove(&id);
        if self.current(&id.name).as_ref() != Some(&id) {
            return vec![id]; // reloaded or unregistered meanwhile: nobody can use it
        }
        self.clock += 1;
        self.cpu.insert(id, self.clock);
        let mut evicted = Vec::new();
        while self.cpu.len() > self.cfg.max_cpu_loras.max(1) {
            let oldest = self.cpu.iter().min_by_key(|(_, t)| **t).map(|(id, _)| id.clone()).expect("non-empty");
            self.cpu.remove(&oldest);
            evicted.push(oldest);
        }
        evicted
    }

    /// A background load failed; `acquire`s of that name answer `Failed` for
    /// `retry_failed_after` (or until it is re-registered), then load again.
    pub fn load_failed(&mut self, id: &AdapterId, message: String) {
        self.loading.remove(id);
        if let Some(k) = self.known.get_mut(&id.name).filter(|k| k.generation == id.generation) {
            k.error = Some((message, Instant::now()));
        }
    }

    /// The last load failure of `name`, while it is still the answer.
    pub fn load_error(&self, name: &str) -> Option<&str> {
        let (e, at) = self.known.get(name)?.error.as_ref()?;
        (at.elapsed() < self.cfg.retry_failed_after).then_some(e.as_str())
    }

    /// Pins held on `slot` (for tests and metrics).
    pub fn pins(&self, slot: usize) -> usize {
        self.slots.get(slot).map(|s| s.pins).unwrap_or(0)
    }

    /// What each slot holds.
    pub fn slot_contents(&self) -> Vec<Option<AdapterId>> {
        self.slots.iter().map(|s| s.holds.clone()).collect()
    }

    /// Adapters in the CPU tier.
    pub fn cpu_contents(&self) -> Vec<AdapterId> {
        self.cpu.keys().cloned().collect()
    }

    /// An empty slot, else the least recently used unpinned one (stale generations first).
    fn victim_slot(&self) -> Option<usize> {
        let stale = |s: &Slot| s.holds.as_ref().is_some_and(|id| self.current(&id.name).as_ref() != Some(id));
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.pins == 0)
            .min_by_key(|(_, s)| (s.holds.is_some(), !stale(s), s.last_used))
            .map(|(i, _)| i)
    }

    fn drop_stale_cpu(&mut self, name: &str) -> Vec<AdapterId> {
        let current = self.current(name);
        let stale: Vec<AdapterId> =
            self.cpu.keys().filter(|id| id.name == name && Some(*id) != current.as_ref()).cloned().collect();
        for id in &stale {
            self.cpu.remove(id);
        }
        stale
    }
}

/// Reads an adapter from disk (injected so tests can control timing).
pub type AdapterLoader = dyn Fn(&Path) -> std::result::Result<LoraAdapter, LoraError> + Send + Sync;

/// What a caller gets from [`AdapterRegistry::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotRequest {
    /// Pinned in this slot; call `release(slot)` when the sequence ends.
    Ready {
        slot: usize,
        id: AdapterId,
    },
    /// Not ready yet (loading, or every slot pinned): ask again next step.
    Pending,
    /// The adapter cannot be loaded.
    Failed(String),
    Unknown,
}

/// An adapter of the host tier: its tensors and, for a CUDA bank, its page-locked slot image
/// (built on the loader thread, so a copy into a slot is a DMA that does not stop the batch).
pub struct HostAdapter {
    pub adapter: LoraAdapter,
    pub image: Option<SlotImage>,
}

/// A slot write on the copy stream; the data stays alive until it lands.
struct Copying {
    write: PendingWrite,
    _data: Arc<HostAdapter>,
}

/// The three tiers with their data: policy state, host copies, device slots, loader thread.
pub struct AdapterRegistry {
    state: RegistryState,
    cpu_data: BTreeMap<AdapterId, Arc<HostAdapter>>,
    bank: SlotBank,
    jobs: mpsc::Sender<(AdapterId, PathBuf)>,
    done: mpsc::Receiver<(AdapterId, std::result::Result<HostAdapter, LoraError>)>,
    /// Slot writes in flight: their slots answer `Pending` until [`AdapterRegistry::poll_loads`]
    /// sees them land.
    copying: Vec<Copying>,
    loads: u64,
    evictions: u64,
}

impl AdapterRegistry {
    /// A registry over `bank` whose disk reads run `loader` on a background thread.
    pub fn new(cfg: RegistryConfig, bank: SlotBank, loader: Box<AdapterLoader>) -> Self {
        let (jobs, job_rx) = mpsc::channel::<(AdapterId, PathBuf)>();
        let (done_tx, done) = mpsc::channel();
        let stager = bank.stager();
        std::thread::Builder::new()
            .name("lab-adapter-loader".into())
            .spawn(move || {
                for (id, path) in job_rx {
                    // A loader that panics on one file fails that load, not the thread: a dead
                    // loader would leave every later load pending for ever.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loader(&path)))
                        .unwrap_or_else(|p| Err(LoraError::Config(format!("the loader panicked: {}", panic_text(&p)))))
                        .map(|adapter| {
                            // Without an image (no page-locked memory left, say) the slot copy
                            // takes the synchronous path from the tensors: slower, still right.
                            let image = stager.as_ref().and_then(|s| s.stage(&adapter).ok());
                            HostAdapter { adapter, image }
                        });
                    if done_tx.send((id, result)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn adapter loader thread");
        Self {
            state: RegistryState::new(cfg),
            cpu_data: BTreeMap::new(),
            bank,
            jobs,
            done,
            copying: Vec::new(),
            loads: 0,
            evictions: 0,
        }
    }

    /// The policy state (read-only).
    pub fn state(&self) -> &RegistryState {
        &self.state
    }

    /// The device slots, for `Llama::forward_lora`.
    /// Disk reads started and adapters evicted from a slot, since start.
    pub fn counters(&self) -> (u64, u64) {
        (self.loads, self.evictions)
    }

    pub fn bank(&self) -> &SlotBank {
        &self.bank
    }

    /// Registers or reloads `name` (takes effect for sequences that acquire after this call).
    pub fn register(&mut self, name: &str, path: &Path) -> AdapterId {
        let (id, dropped) = self.state.register(name, path);
        self.drop_cpu(dropped);
        id
    }

    /// Forgets `name`; returns false if it was not registered.
    pub fn unregister(&mut self, name: &str) -> bool {
        match self.state.unregister(name) {
            Some(dropped) => {
                self.drop_cpu(dropped);
                true
            }
            None => false,
        }
    }

    /// Takes finished background loads into the CPU tier and landed slot copies into service
    /// (call once per step); returns each load's adapter name and outcome (the failure's
    /// message), for the caller's catalog.
    pub fn poll_loads(&mut self) -> Vec<(String, std::result::Result<(), String>)> {
        self.poll_copies();
        let mut outcomes = Vec::new();
        while let Ok((id, result)) = self.done.try_recv() {
            match result {
                Ok(host) => {
                    outcomes.push((id.name.clone(), Ok(())));
                    self.cpu_data.insert(id.clone(), Arc::new(host));
                    let evicted = self.state.cpu_loaded(id);
                    self.drop_cpu(evicted);
                }
                Err(e) => {
                    outcomes.push((id.name.clone(), Err(e.to_string())));
                    self.state.load_failed(&id, e.to_string());
                }
            }
        }
        outcomes
    }

    /// Publishes the slots whose copies have landed and drops their copy pins. A copy that
    /// cannot be polled (a device error) leaves its slot empty, as a failed synchronous copy does.
    fn poll_copies(&mut self) {
        let mut i = 0;
        while i < self.copying.len() {
            match self.bank.poll_write(&self.copying[i].write) {
                Ok(false) => i += 1,
                Ok(true) => {
                    let slot = self.copying.swap_remove(i).write.slot();
                    self.state.release(slot);
                }
                Err(_) => {
                    let slot = self.copying.swap_remove(i).write.slot();
                    self.state.vacate(slot);
                }
            }
        }
    }

    /// Whether a copy into `slot` is still in flight.
    fn copying_into(&self, slot: usize) -> bool {
        self.copying.iter().any(|c| c.write.slot() == slot)
    }

    /// Pins a slot with the current generation of `name`, starting a load if needed.
    pub fn acquire(&mut self, name: &str) -> Result<SlotRequest> {
        Ok(match self.state.acquire(name) {
            Acquire::Ready { slot, .. } if self.copying_into(slot) => {
                self.state.release(slot);
                SlotRequest::Pending
            }
            Acquire::Ready { slot, id } => SlotRequest::Ready { slot, id },
            Acquire::CopyIn { slot, id, evicted } => {
                self.evictions += u64::from(evicted.is_some());
                let data = self.cpu_data.get(&id).expect("CPU tier and data agree").clone();
                let outcome = match &data.image {
                    Some(image) => self.bank.begin_write(slot, &data.adapter, image).map(Some),
                    None => self.bank.write(slot, &data.adapter).map(|()| None),
                };
                match outcome {
                    // The slot was promised to `id` before the copy; a failed copy must leave
                    // it empty, or later requests would be "Ready" on a slot with no weights
                    // and run on the base model without a word.
                    Err(e) => {
                        self.state.vacate(slot);
                        return Err(e);
                    }
                    Ok(None) => SlotRequest::Ready { slot, id },
                    // In flight: the caller's pin stays on the slot as the copy's own (an
                    // unpinned slot in flight was evicted by the next miss, and the next, so
                    // copies overwrote each other and 8 slots thrashed), and the slot answers
                    // `Pending` until `poll_copies` sees the copy land and drops that pin.
                    Ok(Some(write)) => {
                        self.copying.push(Copying { write, _data: data });
                        SlotRequest::Pending
                    }
                }
            }
            Acquire::Load { id, path } => {
                self.loads += 1;
                let _ = self.jobs.send((id, path));
                SlotRequest::Pending
            }
            Acquire::Loading | Acquire::Wait => SlotRequest::Pending,
            Acquire::Failed(m) => SlotRequest::Failed(m),
            Acquire::Unknown => SlotRequest::Unknown,
        })
    }

    /// Unpins one use of `slot`.
    pub fn release(&mut self, slot: usize) {
        self.state.release(slot);
    }

    fn drop_cpu(&mut self, ids: Vec<AdapterId>) {
        for id in ids {
            self.cpu_data.remove(&id);
        }
    }
}

/// The message of a caught panic payload.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(max_loras: usize, max_cpu_loras: usize) -> RegistryState {
        RegistryState::new(RegistryConfig { max_loras, max_cpu_loras, retry_failed_after: Duration::from_secs(3600) })
    }

    /// Registers `name`, runs its load to completion, and acquires it: returns the slot.
    fn bring_in(s: &mut RegistryState, name: &str) -> usize {
        if s.current(name).is_none() {
            s.register(name, Path::new(&format!("/adapters/{name}")));
        }
        loop {
            match s.acquire(name) {
                Acquire::Ready { slot, .. } | Acquire::CopyIn { slot, .. } => return slot,
                Acquire::Load { id, .. } => {
                    s.cpu_loaded(id);
                }
                other => panic!("{name}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn lru_evicts_the_least_recently_used_unpinned_slot() {
        let mut s = state(2, 8);
        let a = bring_in(&mut s, "a");
        let b = bring_in(&mut s, "b");
        s.release(a);
        s.release(b);
        // Touch a again so b becomes least recently used.
        let a2 = bring_in(&mut s, "a");
        assert_eq!(a2, a);
        s.release(a);
        bring_in(&mut s, "c");
        let held: Vec<String> = s.slot_contents().into_iter().flatten().map(|id| id.name).collect();
        assert!(held.contains(&"a".to_string()) && held.contains(&"c".to_string()), "{held:?}");
    }

    #[test]
    fn a_pinned_slot_is_never_evicted_and_a_full_bank_waits() {
        let mut s = state(2, 8);
        let a = bring_in(&mut s, "a");
        let b = bring_in(&mut s, "b");
        s.register("c", Path::new("/adapters/c"));
        let Acquire::Load { id, .. } = s.acquire("c") else { panic!("first acquire starts a load") };
        assert_eq!(s.acquire("c"), Acquire::Loading);
        s.cpu_loaded(id);
        assert_eq!(s.acquire("c"), Acquire::Wait, "both slots pinned: wait, do not fail or evict");
        assert_eq!(s.pins(a), 1);
        assert_eq!(s.pins(b), 1);
        s.release(b);
        match s.acquire("c") {
            Acquire::CopyIn { slot, evicted, .. } => {
                assert_eq!(slot, b);
                assert_eq!(evicted.unwrap().name, "b");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.slot_contents()[a].as_ref().unwrap().name, "a", "pinned a untouched");
    }

    #[test]
    fn reload_gives_new_sequences_a_new_generation_and_keeps_running_ones() {
        let mut s = state(2, 8);
        let slot_old = bring_in(&mut s, "x");
        let old = s.slot_contents()[slot_old].clone().unwrap();
        let (new, dropped) = s.register("x", Path::new("/adapters/x-v2"));
        assert!(new.generation > old.generation);
        assert_eq!(dropped, vec![old.clone()], "the old CPU copy is unreachable now");
        let slot_new = bring_in(&mut s, "x");
        assert_ne!(slot_new, slot_old, "the running sequence keeps its pinned old generation");
        assert_eq!(s.slot_contents()[slot_old].as_ref(), Some(&old));
        assert_eq!(s.slot_contents()[slot_new].as_ref(), Some(&new));
        // Once the old sequence ends, its stale slot is the first to be reused.
        s.release(slot_old);
        let y = bring_in(&mut s, "y");
        assert_eq!(y, slot_old);
        // A load of the old generation that finishes late is discarded.
        assert_eq!(s.cpu_loaded(old.clone()), vec![old]);
    }

    #[test]
    fn cpu_tier_evicts_least_recently_used_beyond_its_size() {
        let mut s = state(1, 2);
        for n in ["a", "b"] {
            let slot = bring_in(&mut s, n);
            s.release(slot);
        }
        let slot = bring_in(&mut s, "c");
        s.release(slot);
        let names: Vec<String> = s.cpu_contents().into_iter().map(|id| id.name).collect();
        assert_eq!(names, vec!["b".to_string(), "c".to_string()]);
        // "a" must be read from disk again.
        assert!(matches!(s.acquire("a"), Acquire::Load { .. }));
    }

    #[test]
    fn failures_and_unknown_names_are_reported() {
        let mut s = state(1, 1);
        assert_eq!(s.acquire("nope"), Acquire::Unknown);
        s.register("bad", Path::new("/adapters/bad"));
        let Acquire::Load { id, .. } = s.acquire("bad") else { panic!() };
        s.load_failed(&id, "rank 64 exceeds --max-lora-rank 16".into());
        assert!(matches!(s.acquire("bad"), Acquire::Failed(m) if m.contains("max-lora-rank")));
        assert!(s.load_error("bad").is_some_and(|m| m.contains("max-lora-rank")));
        s.register("bad", Path::new("/adapters/bad-fixed"));
        assert!(matches!(s.acquire("bad"), Acquire::Load { .. }), "re-registering clears the failure");
        assert!(s.unregister("bad").is_some());
        assert_eq!(s.acquire("bad"), Acquire::Unknown);
    }

    #[test]
    fn a_failed_load_is_retried_after_the_interval_not_before() {
        let mut s = RegistryState::new(RegistryConfig {
            max_loras: 1,
            max_cpu_loras: 1,
            retry_failed_after: Duration::from_millis(200),
        });
        s.register("x", Path::new("/adapters/x"));
        let Acquire::Load { id, .. } = s.acquire("x") else { panic!() };
        s.load_failed(&id, "corrupt".into());
        assert_eq!(s.acquire("x"), Acquire::Failed("corrupt".into()));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(s.load_error("x"), None);
        let Acquire::Load { id, .. } = s.acquire("x") else { panic!("after the interval the files are read again") };
        s.cpu_loaded(id);
        assert!(matches!(s.acquire("x"), Acquire::CopyIn { .. }), "the fixed adapter serves");
    }
}
