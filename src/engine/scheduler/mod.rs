//! Continuous batching policy as plain state (no tokio, no tensors): which sequences run in the
//! next step, how many tokens each, and who is preempted. Unit-tested with a fake
//! [`Resources`]; the server's engine task implements it with the paged KV cache and the
//! adapter registry.
//!
//! Policy, every step:
//! 1. running sequences first, oldest first: one decode token each, or the next chunk of a
//!    chunked prefill, within `max_num_batched_tokens`; when KV blocks run out, the newest
//!    running sequence is preempted (its blocks freed, recomputed later; it keeps its pinned
//!    adapter slot so the recomputation uses the same adapter version);
//! 2. then waiting sequences are admitted while `max_num_seqs`, the token budget, KV blocks and
//!    adapter slots allow. Requests whose adapter is already resident go first, so a bank
//!    smaller than the set of active adapters does not thrash; a request passed over
//!    `max_wait_steps` times (a later arrival admitted before it) goes first regardless, and
//!    while it finds every slot pinned no new request may pin one, so a slot drains for it
//!    (no starvation). A request whose adapter is
//!    still loading is skipped this step (the load runs in the background) without blocking
//!    the others.
//!
//! With `--scheduling-policy fair`, step 2 orders the waiting requests by their tenant's
//! service instead of arrival ([`fair`]: the Virtual Token Counter), after the starving ones;
//! `--max-running-per-tenant` caps one tenant's running sequences under either policy.

pub mod fair;

use std::collections::{BTreeMap, VecDeque};

use fair::{Policy, TokenCounters};

/// A sequence's identity (the server's request id).
pub type SeqId = u64;

/// Limits (vLLM names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Steps a waiting request may be passed over for residency before it goes first.
    pub max_wait_steps: usize,
    pub policy: Policy,
    /// Running sequences of one tenant at most (`None`: no cap).
    pub max_running_per_tenant: Option<usize>,
}

/// What a step may use: KV blocks and adapter slots.
pub trait Resources {
    /// Grows `id`'s KV reservation to `len` positions; false (no change) if short of blocks.
    fn reserve(&mut self, id: SeqId, len: usize) -> bool;
    /// Frees every KV block of `id`.
    fn release(&mut self, id: SeqId);
    /// Pins a slot holding `adapter`.
    fn acquire_adapter(&mut self, adapter: &str) -> Grant;
    /// Unpins a slot.
    fn release_adapter(&mut self, slot: usize);
    /// Whether `adapter` sits in a slot now.
    fn is_resident(&self, adapter: &str) -> bool;
    /// Gives `id` (holding no KV yet) the cached KV of the longest cached prefix of `tokens`
    /// computed under the adapter in `slot` (or the base model); returns the positions covered
    /// (fewer than `tokens.len()`). Stores without a prefix cache cover nothing.
    fn attach_prefix(&mut self, _id: SeqId, _tokens: &[u32], _slot: Option<usize>) -> usize {
        0
    }
    /// `id`'s KV now holds `tokens` (from position 0): its full blocks may be cached.
    fn cache_computed(&mut self, _id: SeqId, _tokens: &[u32], _slot: Option<usize>) {}
}

/// Answer to [`Resources::acquire_adapter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    Ready(usize),
    /// Loading, or every slot pinned: try next step.
    NotYet,
    Failed(String),
}

/// One sequence's work in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    /// Tokens to run now.
    pub tokens: Vec<u32>,
    /// Tokens already in the KV cache.
    pub past: usize,
    pub slot: Option<usize>,
    /// This chunk ends the known tokens: sample the next one from its last logits.
    pub sample: bool,
}

/// The plan of one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub batch: Vec<Scheduled>,
    /// Sequences sent back to the waiting queue (to be recomputed).
    pub preempted: Vec<SeqId>,
    /// Requests that cannot run (their adapter failed to load), with the reason.
    pub failed: Vec<(SeqId, String)>,
    /// Prompt tokens of the sequences admitted this step, and how many of them the prefix
    /// cache supplied (vLLM's `prefix_cache_queries` / `prefix_cache_hits`, in tokens).
    pub prefix_queries: usize,
    pub prefix_hits: usize,
}

#[derive(Debug, Clone)]
struct Seq {
    tokens: Vec<u32>,
    computed: usize,
    adapter: Option<String>,
    slot: Option<usize>,
    /// Times a later arrival was admitted while this one waited.
    passed_over: usize,
    arrival: u64,
}

/// Waiting and running sequences.
#[derive(Debug, Clone)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    seqs: BTreeMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    arrivals: u64,
    /// Service per tenant (used by [`Policy::Fair`]).
    service: TokenCounters,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            seqs: BTreeMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            arrivals: 0,
            service: TokenCounters::default(),
        }
    }

    /// Queues a validated request (prompt already tokenized and checked against the limits).
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>, adapter: Option<String>) {
        let tenant = adapter.clone().unwrap_or_default();
        if !self.seqs.values().any(|s| tenant_of(s) == tenant) {
            let active: Vec<String> = self.seqs.values().map(|s| tenant_of(s).to_string()).collect();
            self.service.activate(&tenant, active.iter().map(String::as_str));
        }
        self.arrivals += 1;
        let seq = Seq { tokens: prompt, computed: 0, adapter, slot: None, passed_over: 0, arrival: self.arrivals };
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Running sequences, in admission order.
    pub fn running_ids(&self) -> &[SeqId] {
        &self.running
    }

    /// Waiting sequences, in queue order.
    pub fn waiting_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.waiting.iter().copied()
    }

    /// Whether `id` is known (waiting or running).
    pub fn contains(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id)
    }

    /// Plans the next step.
    pub fn schedule(&mut self, res: &mut dyn Resources) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        // Oldest first; a preemption victim is the newest, so it was not scheduled yet
        // (or is the current sequence).
        let mut order = self.running.clone();
        order.sort_by_key(|id| self.seqs[id].arrival);
        for id in order {
            if !self.running.contains(&id) {
                continue; // preempted earlier in this loop
            }
            let seq = &self.seqs[&id];
            let n = (seq.tokens.len() - seq.computed).min(budget);
            if n == 0 {
                continue;
            }
            let want = seq.computed + n;
            let mut ok = res.reserve(id, want);
            while !ok {
                let victim = *self.running.iter().max_by_key(|v| self.seqs[v].arrival).expect("id is running");
                self.preempt(victim, res);
                plan.preempted.push(victim);
                if victim == id {
                    break;
                }
                ok = res.reserve(id, want);
            }
            if ok {
                plan.batch.push(self.chunk(id, n));
                budget -= n;
            }
        }
        let admitted = self.admit(res, &mut budget, &mut plan);
        self.count_passed_over(&admitted);
        plan
    }

    /// Records a step's sampled tokens (`None` for chunks that did not sample); the computed
    /// positions go to `res`'s prefix cache.
    pub fn complete(&mut self, plan: &StepPlan, sampled: &[(SeqId, u32)], res: &mut dyn Resources) {
        for s in &plan.batch {
            if let Some(seq) = self.seqs.get_mut(&s.id) {
                seq.computed = s.past + s.tokens.len();
                res.cache_computed(s.id, &seq.tokens[..seq.computed], seq.slot);
            }
        }
        for (id, tok) in sampled {
            if let Some(seq) = self.seqs.get_mut(id) {
                seq.tokens.push(*tok);
                let tenant = seq.adapter.clone().unwrap_or_default();
                self.service.charge_output(&tenant, 1);
            }
        }
    }

    /// Removes a finished, cancelled or failed sequence and frees what it holds.
    pub fn finish(&mut self, id: SeqId, res: &mut dyn Resources) {
        if let Some(seq) = self.seqs.remove(&id) {
            if let Some(slot) = seq.slot {
                res.release_adapter(slot);
            }
            res.release(id);
        }
        self.running.retain(|r| *r != id);
        self.waiting.retain(|w| *w != id);
    }

    fn chunk(&self, id: SeqId, n: usize) -> Scheduled {
        let seq = &self.seqs[&id];
        let end = seq.computed + n;
        Scheduled {
            id,
            tokens: seq.tokens[seq.computed..end].to_vec(),
            past: seq.computed,
            slot: seq.slot,
            sample: end == seq.tokens.len(),
        }
    }

    /// Frees `id`'s KV blocks and sends it back to the front of the queue. Its adapter slot
    /// stays pinned: the recomputed sequence must use the adapter version it started with
    /// (a reload meanwhile must not change a running response), and re-admitting it never
    /// waits for a load.
    fn preempt(&mut self, id: SeqId, res: &mut dyn Resources) {
        res.release(id);
        let seq = self.seqs.get_mut(&id).expect("running seq exists");
        seq.computed = 0;
        self.running.retain(|r| *r != id);
        self.waiting.push_front(id);
    }

    /// Admission order: starving requests (by arrival), then under FCFS resident adapters (or
    /// base) before the rest, FIFO within each; under `fair` the least-served tenant first,
    /// then the tenant with fewer running sequences (residency, then arrival, break ties).
    fn admission_order(&self, res: &dyn Resources) -> Vec<SeqId> {
        let mut order: Vec<SeqId> = self.waiting.iter().copied().collect();
        let running = self.running_per_tenant();
        order.sort_by_key(|id| self.rank(*id, res, &running));
        order
    }

    /// Sort key of a waiting request (see [`Scheduler::admission_order`]).
    fn rank(&self, id: SeqId, res: &dyn Resources, running: &BTreeMap<String, usize>) -> (bool, u64, usize, bool, u64) {
        let s = &self.seqs[&id];
        if s.passed_over >= self.cfg.max_wait_steps {
            return (false, 0, 0, false, s.arrival);
        }
        let resident = s.adapter.as_deref().is_none_or(|a| res.is_resident(a));
        // Counters are finite and non-negative, so their bit patterns sort as the values.
        let (service, runs) = match self.cfg.policy {
            Policy::Fcfs => (0, 0),
            Policy::Fair => {
                let t = tenant_of(s);
                (self.service.get(t).to_bits(), running.get(t).copied().unwrap_or(0))
            }
        };
        (true, service, runs, !resident, s.arrival)
    }

    /// Running sequences per tenant.
    fn running_per_tenant(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for id in &self.running {
            *m.entry(tenant_of(&self.seqs[id]).to_string()).or_insert(0) += 1;
        }
        m
    }

    /// Running sequences of `tenant`.
    fn running_of(&self, tenant: &str) -> usize {
        self.running.iter().filter(|id| tenant_of(&self.seqs[id]) == tenant).count()
    }

    /// Every waiting request that arrived before an admitted one was passed over once more
    /// (counting steps instead would call every request under load "starving" and turn
    /// resident-first admission into FIFO, thrashing the slots).
    ///
    /// Under `fair`, admitting a later request of a less-served tenant is the policy, not a
    /// pass-over: only admissions at no less service than the waiting request's tenant count
    /// (else a noisy tenant's backlog would all turn "starving" and jump the fair order).
    fn count_passed_over(&mut self, admitted: &[(u64, f64)]) {
        let fair = self.cfg.policy == Policy::Fair;
        for id in &self.waiting {
            let own = self.seqs.get(id).map(|s| self.service.get(tenant_of(s))).unwrap_or(0.0);
            if let Some(s) = self.seqs.get_mut(id) {
                s.passed_over += admitted.iter().filter(|(a, svc)| *a > s.arrival && (!fair || *svc >= own)).count();
            }
        }
    }

    /// Admits what fits; returns the arrival number of each request it admitted and its
    /// tenant's service before admission.
    fn admit(&mut self, res: &mut dyn Resources, budget: &mut usize, plan: &mut StepPlan) -> Vec<(u64, f64)> {
        let mut admitted = Vec::new();
        // Set once a starving request cannot get a slot: from then on this step admits no
        // request that would pin a slot, so running sequences drain the pins and a slot comes
        // free for it. Without this, steady traffic on resident adapters re-pins every slot
        // each step and the starving request waits for ever.
        let mut slots_held_for_starving = false;
        let mut order = self.admission_order(res);
        let mut next = 0;
        while next < order.len() {
            let id = order[next];
            next += 1;
            if self.running.len() >= self.cfg.max_num_seqs || *budget == 0 {
                break;
            }
            let seq = &self.seqs[&id];
            let (adapter, pinned) = (seq.adapter.clone(), seq.slot);
            let starving = seq.passed_over >= self.cfg.max_wait_steps;
            let tenant = adapter.clone().unwrap_or_default();
            if self.cfg.max_running_per_tenant.is_some_and(|cap| self.running_of(&tenant) >= cap) {
                continue;
            }
            if slots_held_for_starving && adapter.is_some() && pinned.is_none() {
                continue;
            }
            let slot = match adapter.as_deref().filter(|_| pinned.is_none()).map(|a| res.acquire_adapter(a)) {
                None => pinned,
                Some(Grant::Ready(slot)) => Some(slot),
                Some(Grant::NotYet) => {
                    slots_held_for_starving |= starving;
                    continue;
                }
                Some(Grant::Failed(msg)) => {
                    plan.failed.push((id, msg));
                    self.seqs.remove(&id);
                    self.waiting.retain(|w| *w != id);
                    continue;
                }
            };
            let len = self.seqs[&id].tokens.len();
            let cached = res.attach_prefix(id, &self.seqs[&id].tokens, slot);
            let n = (len - cached).min(*budget);
            if !res.reserve(id, cached + n) {
                res.release(id);
                if let Some(s) = slot.filter(|_| pinned.is_none()) {
                    res.release_adapter(s);
                }
                break; // out of KV blocks: admit nobody else this step
            }
            plan.prefix_queries += len;
            plan.prefix_hits += cached;
            let service = self.service.get(&tenant);
            self.service.charge_prompt(&tenant, len);
            let seq = self.seqs.get_mut(&id).expect("waiting seq exists");
            seq.slot = slot;
            seq.computed = cached;
            admitted.push((seq.arrival, service));
            self.waiting.retain(|w| *w != id);
            self.running.push(id);
            plan.batch.push(self.chunk(id, n));
            *budget -= n;
            if self.cfg.policy == Policy::Fair {
                // The admitted tenant's service grew: the rest of the queue re-sorts.
                let mut rest = order.split_off(next);
                let running = self.running_per_tenant();
                rest.sort_by_key(|id| self.rank(*id, res, &running));
                order.extend(rest);
            }
        }
        admitted
    }
}

/// The tenant a sequence's service is counted for: its adapter, `""` for the base model.
fn tenant_of(s: &Seq) -> &str {
    s.adapter.as_deref().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// Blocks of 4 positions from a fixed pool; adapters resident in `slots`, or loading.
    #[derive(Default)]
    struct Fake {
        free_blocks: usize,
        held: BTreeMap<SeqId, usize>,
        slots: Vec<Option<String>>,
        pins: Vec<usize>,
        loading: BTreeSet<String>,
        broken: BTreeSet<String>,
        /// Positions a prefix cache would supply to every admitted sequence (whole blocks).
        cached_prefix: usize,
        /// `(id, positions)` reported computed, in order.
        computed: Vec<(SeqId, usize)>,
    }

    impl Fake {
        fn new(blocks: usize, slots: usize) -> Self {
            Fake { free_blocks: blocks, slots: vec![None; slots], pins: vec![0; slots], ..Default::default() }
        }
    }

    impl Resources for Fake {
        fn reserve(&mut self, id: SeqId, len: usize) -> bool {
            let have = self.held.get(&id).copied().unwrap_or(0);
            let need = len.div_ceil(4).saturating_sub(have);
            if need > self.free_blocks {
                return false;
            }
            self.free_blocks -= need;
            self.held.insert(id, have + need);
            true
        }
        fn release(&mut self, id: SeqId) {
            self.free_blocks += self.held.remove(&id).unwrap_or(0);
        }
        fn acquire_adapter(&mut self, a: &str) -> Grant {
            if self.broken.contains(a) {
                return Grant::Failed(format!("{a}: bad file"));
            }
            if self.loading.contains(a) {
                return Grant::NotYet;
            }
            if let Some(i) = self.slots.iter().position(|s| s.as_deref() == Some(a)) {
                self.pins[i] += 1;
                return Grant::Ready(i);
            }
            match (0..self.slots.len()).find(|&i| self.pins[i] == 0) {
                Some(i) => {
                    self.slots[i] = Some(a.to_string());
                    self.pins[i] = 1;
                    Grant::Ready(i)
                }
                None => Grant::NotYet,
            }
        }
        fn release_adapter(&mut self, slot: usize) {
            self.pins[slot] -= 1;
        }
        fn is_resident(&self, a: &str) -> bool {
            self.slots.iter().any(|s| s.as_deref() == Some(a))
        }
        fn attach_prefix(&mut self, id: SeqId, tokens: &[u32], _slot: Option<usize>) -> usize {
            let n = self.cached_prefix.min(tokens.len().saturating_sub(1)) / 4 * 4;
            self.held.insert(id, n / 4); // shared blocks: not taken from the free count
            n
        }
        fn cache_computed(&mut self, id: SeqId, tokens: &[u32], _slot: Option<usize>) {
            self.computed.push((id, tokens.len()));
        }
    }

    fn cfg(seqs: usize, tokens: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: seqs,
            max_num_batched_tokens: tokens,
            max_wait_steps: 3,
            policy: Policy::Fcfs,
            max_running_per_tenant: None,
        }
    }

    /// Runs one step, "sampling" token 7 for every chunk that asks for it.
    fn step(s: &mut Scheduler, res: &mut Fake) -> StepPlan {
        let plan = s.schedule(res);
        let sampled: Vec<(SeqId, u32)> = plan.batch.iter().filter(|c| c.sample).map(|c| (c.id, 7)).collect();
        s.complete(&plan, &sampled, res);
        plan
    }

    #[test]
    fn long_prompts_are_chunked_within_the_token_budget_and_decodes_go_first() {
        let mut s = Scheduler::new(cfg(8, 10));
        let mut res = Fake::new(100, 2);
        s.add(1, vec![1; 4], None);
        let p = step(&mut s, &mut res);
        assert_eq!(p.batch[0].tokens.len(), 4);
        assert!(p.batch[0].sample);
        s.add(2, vec![2; 25], None);
        let p = step(&mut s, &mut res);
        assert_eq!((p.batch[0].id, p.batch[0].tokens.len()), (1, 1), "decode first");
        assert_eq!((p.batch[1].id, p.batch[1].tokens.len(), p.batch[1].sample), (2, 9, false));
        let p = step(&mut s, &mut res);
        assert_eq!((p.batch[1].past, p.batch[1].tokens.len()), (9, 9));
        let p = step(&mut s, &mut res);
        assert_eq!((p.batch[1].past, p.batch[1].tokens.len(), p.batch[1].sample), (18, 7, true));
        assert!(p.batch.iter().map(|c| c.tokens.len()).sum::<usize>() <= 10);
    }

    #[test]
    fn a_cached_prefix_is_not_recomputed_and_computed_positions_are_reported() {
        let mut res = Fake::new(100, 0);
        res.cached_prefix = 8;
        let mut s = Scheduler::new(cfg(4, 64));
        s.add(1, (0..20).collect(), None);
        s.add(2, (0..6).collect(), None);
        let p = step(&mut s, &mut res);
        assert_eq!((p.batch[0].past, p.batch[0].tokens.len()), (8, 12), "positions 8.. only");
        assert_eq!((p.batch[1].past, p.batch[1].tokens.len()), (4, 2), "at least one token is computed");
        assert_eq!((p.prefix_queries, p.prefix_hits), (26, 12));
        assert_eq!(res.computed, vec![(1, 20), (2, 6)]);
        let p = step(&mut s, &mut res);
        assert_eq!((p.batch[0].past, p.prefix_queries), (20, 0), "decodes: no new lookups");
        // Preempted and re-admitted: the prefix is attached again.
        s.preempt(1, &mut res);
        let p = step(&mut s, &mut res);
        let again = p.batch.iter().find(|c| c.id == 1).unwrap();
        assert_eq!((again.past, again.tokens.len()), (8, 14), "20 prompt + 2 sampled tokens, 8 cached");
    }

    fn fair(seqs: usize, tokens: usize) -> SchedulerConfig {
        SchedulerConfig { policy: Policy::Fair, ..cfg(seqs, tokens) }
    }

    /// A noisy tenant queues 10 requests, then a quiet one queues 1; two run at a time.
    fn noisy_then_quiet(c: SchedulerConfig) -> (Scheduler, Fake) {
        let mut s = Scheduler::new(c);
        for i in 0..10 {
            s.add(i, vec![1; 8], Some("noisy".into()));
        }
        s.add(100, vec![1; 8], Some("quiet".into()));
        (s, Fake::new(1000, 4))
    }

    #[test]
    fn fair_admits_the_least_served_tenant_first_fcfs_by_arrival() {
        let (mut s, mut res) = noisy_then_quiet(cfg(2, 64));
        let ids: Vec<SeqId> = step(&mut s, &mut res).batch.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![0, 1], "fcfs: arrival order");
        let (mut s, mut res) = noisy_then_quiet(fair(2, 64));
        let ids: Vec<SeqId> = step(&mut s, &mut res).batch.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![0, 100], "fair: the quiet tenant goes before noisy's second request");
    }

    #[test]
    fn fair_is_work_conserving_and_the_per_tenant_cap_holds() {
        let (mut s, mut res) = noisy_then_quiet(fair(8, 256));
        let p = step(&mut s, &mut res);
        assert_eq!(p.batch.len(), 8, "capacity the quiet tenant leaves goes to the noisy one");
        let capped = SchedulerConfig { max_running_per_tenant: Some(3), ..fair(8, 256) };
        let (mut s, mut res) = noisy_then_quiet(capped);
        let p = step(&mut s, &mut res);
        let noisy = p.batch.iter().filter(|c| c.id < 100).count();
        assert_eq!((noisy, p.batch.len()), (3, 4), "3 noisy + the quiet one");
    }

    #[test]
    fn under_fair_a_quiet_tenant_waits_for_one_slot_not_for_the_noisy_backlog() {
        // One running sequence at a time; the noisy tenant keeps 20 requests queued, the quiet
        // one sends a request every few steps: each quiet request runs next.
        let mut res = Fake::new(1000, 4);
        let mut s = Scheduler::new(fair(1, 64));
        let mut next_noisy = 0;
        for _ in 0..20 {
            s.add(next_noisy, vec![1; 4], Some("noisy".into()));
            next_noisy += 1;
        }
        for q in 0..5u64 {
            let id = 1000 + q;
            s.add(id, vec![1; 4], Some("quiet".into()));
            let mut waited = 0;
            loop {
                let p = step(&mut s, &mut res);
                let running: Vec<SeqId> = s.running_ids().to_vec();
                if p.batch.iter().any(|c| c.id == id) {
                    break;
                }
                waited += 1;
                assert!(waited <= 3, "quiet request {id} waited {waited} steps");
                for r in running {
                    s.finish(r, &mut res); // one token each: done
                    s.add(next_noisy, vec![1; 4], Some("noisy".into()));
                    next_noisy += 1;
                }
            }
            for r in s.running_ids().to_vec() {
                s.finish(r, &mut res);
            }
        }
    }

    #[test]
    fn max_num_seqs_caps_the_running_set() {
        let mut s = Scheduler::new(cfg(2, 100));
        let mut res = Fake::new(100, 2);
        for id in 1..=3 {
            s.add(id, vec![1, 2], None);
        }
        let p = step(&mut s, &mut res);
        assert_eq!(p.batch.len(), 2);
        assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
        s.finish(1, &mut res);
        let p = step(&mut s, &mut res);
        assert!(p.batch.iter().any(|c| c.id == 3));
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_recomputes_it_later() {
        let mut s = Scheduler::new(cfg(8, 100));
        let mut res = Fake::new(2, 1); // 8 positions in all
        s.add(1, vec![1; 4], None);
        s.add(2, vec![2; 4], None);
        step(&mut s, &mut res); // both prefilled, 4 positions each: pool full
        let p = step(&mut s, &mut res); // seq 1 needs a 5th position -> preempt 2
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(p.batch.len(), 1);
        assert_eq!(p.batch[0].id, 1);
        assert_eq!(s.num_waiting(), 1);
        s.finish(1, &mut res);
        let p = step(&mut s, &mut res);
        assert_eq!((p.batch[0].id, p.batch[0].past, p.batch[0].tokens.len()), (2, 0, 5), "recomputed with its output");
        assert_eq!(res.free_blocks, 0);
    }

    #[test]
    fn resident_adapters_go_first_but_nobody_starves() {
        let mut s = Scheduler::new(cfg(1, 100));
        let mut res = Fake::new(100, 1);
        res.slots[0] = Some("a".into());
        s.add(1, vec![1], Some("b".into())); // not resident
        for id in 2..=6 {
            s.add(id, vec![1], Some("a".into()));
        }
        let mut order = Vec::new();
        for _ in 0..6 {
            let p = step(&mut s, &mut res);
            for c in &p.batch {
                if c.past == 0 {
                    order.push(c.id);
                }
            }
            let running: Vec<SeqId> = p.batch.iter().map(|c| c.id).collect();
            for id in running {
                s.finish(id, &mut res);
            }
        }
        assert_eq!(order[0], 2, "resident adapter first");
        let pos = order.iter().position(|&id| id == 1).expect("b ran");
        assert!(pos <= 3, "b waited at most max_wait_steps: {order:?}");
    }

    /// 2 slots, steady traffic on adapters a and b that keeps both slots pinned every step
    /// (each sequence runs 4 steps; two new ones a step), and one request for c: c runs within
    /// max_wait_steps (3) + a sequence's lifetime (4) + 2 steps.
    #[test]
    fn a_non_resident_adapter_gets_a_slot_under_steady_traffic_on_the_others() {
        let mut s = Scheduler::new(cfg(64, 1000));
        let mut res = Fake::new(10_000, 2);
        let mut admitted_at: BTreeMap<SeqId, usize> = BTreeMap::new();
        let mut next = 1;
        let arrives = 5; // once a and b hold both slots
        for t in 0..60 {
            if t == arrives {
                s.add(0, vec![1], Some("c".into()));
            }
            for a in ["a", "b"] {
                s.add(next, vec![1], Some(a.into()));
                next += 1;
            }
            let p = step(&mut s, &mut res);
            for c in p.batch.iter().filter(|c| c.past == 0) {
                admitted_at.insert(c.id, t);
            }
            if let Some(&at) = admitted_at.get(&0) {
                assert!(at - arrives <= 3 + 4 + 2, "c admitted {} steps after it arrived", at - arrives);
                return;
            }
            let done: Vec<SeqId> = admitted_at.iter().filter(|(_, &at)| t >= at + 3).map(|(id, _)| *id).collect();
            for id in done {
                if s.contains(id) {
                    s.finish(id, &mut res);
                }
            }
        }
        panic!("c never got a slot");
    }

    #[test]
    fn loading_adapters_do_not_block_others_and_failures_are_reported() {
        let mut s = Scheduler::new(cfg(8, 100));
        let mut res = Fake::new(100, 2);
        res.loading.insert("slow".into());
        res.broken.insert("bad".into());
        s.add(1, vec![1], Some("slow".into()));
        s.add(2, vec![1], Some("bad".into()));
        s.add(3, vec![1], None);
        let p = step(&mut s, &mut res);
        assert_eq!(p.batch.iter().map(|c| c.id).collect::<Vec<_>>(), vec![3]);
        assert_eq!(p.failed.len(), 1);
        assert!(p.failed[0].1.contains("bad file"));
        res.loading.clear();
        let p = step(&mut s, &mut res);
        assert!(p.batch.iter().any(|c| c.id == 1 && c.slot.is_some()));
    }

    #[test]
    fn finish_frees_blocks_and_slots() {
        let mut s = Scheduler::new(cfg(8, 100));
        let mut res = Fake::new(10, 1);
        s.add(1, vec![1; 9], Some("a".into()));
        step(&mut s, &mut res);
        assert_eq!((res.free_blocks, res.pins[0]), (7, 1));
        s.finish(1, &mut res);
        assert_eq!((res.free_blocks, res.pins[0]), (10, 0));
    }

    #[test]
    fn a_preempted_sequence_keeps_its_pinned_adapter_slot_and_resumes_on_it() {
        let mut s = Scheduler::new(cfg(8, 100));
        let mut res = Fake::new(2, 2); // 8 positions in all
        s.add(1, vec![1; 4], Some("x".into()));
        s.add(2, vec![2; 4], Some("y".into()));
        step(&mut s, &mut res);
        let y_slot = res.slots.iter().position(|a| a.as_deref() == Some("y")).unwrap();
        let p = step(&mut s, &mut res);
        assert_eq!(p.preempted, vec![2]);
        // Still pinned while it waits: a reload of `y` meanwhile cannot reach it, and nobody
        // can evict the version it started with.
        assert_eq!(res.pins[y_slot], 1);
        res.slots[y_slot] = Some("y-old-version".into());
        s.finish(1, &mut res);
        let p = step(&mut s, &mut res);
        let resumed = p.batch.iter().find(|c| c.id == 2).expect("re-admitted");
        assert_eq!(resumed.slot, Some(y_slot), "resumes on the slot it pinned, not a fresh acquire");
        assert_eq!(res.pins[y_slot], 1);
        s.finish(2, &mut res);
        assert_eq!(res.pins[y_slot], 0);
    }
}
