//! The scheduler's policy as plain state, against a fake [`Resources`].

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
        fair_preemption: false,
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

/// The tenant given to `add_for` (the server's `user` / `x-tenant-id`), not the adapter, is
/// what `--max-running-per-tenant` caps and what the fair counters charge.
#[test]
fn the_tenant_given_at_add_is_what_the_cap_and_the_fair_counters_see() {
    let mut c = cfg(8, 100);
    c.policy = Policy::Fair;
    c.max_running_per_tenant = Some(1);
    let mut s = Scheduler::new(c);
    let mut res = Fake::new(100, 4);
    s.add_for(1, vec![1; 8], Some("a".into()), "alice".into());
    s.add_for(2, vec![1; 2], Some("a".into()), "bob".into());
    s.add_for(3, vec![1; 8], Some("b".into()), "alice".into());
    let p = step(&mut s, &mut res);
    let ids: Vec<SeqId> = p.batch.iter().map(|c| c.id).collect();
    assert_eq!(ids, vec![1, 2], "one adapter, two tenants: both run; alice's second waits on another adapter");
    // alice has been served 8 + 2 (one output token), bob 2 + 2. Both of the next requests run
    // adapter b, so counting per adapter would admit the earlier one (alice's) first.
    s.add_for(4, vec![1; 8], Some("b".into()), "bob".into());
    s.finish(1, &mut res);
    s.finish(2, &mut res);
    let p = step(&mut s, &mut res);
    let ids: Vec<SeqId> = p.batch.iter().map(|c| c.id).collect();
    assert_eq!(ids, vec![4, 3], "the less-served tenant first, though it arrived later");
}

#[test]
fn with_fair_preemption_a_tenant_below_its_share_preempts_the_one_furthest_above_it() {
    // Two places, both held by the noisy tenant; a quiet request arrives.
    for (policy, fair_preemption) in [(Policy::Fcfs, true), (Policy::Fair, false), (Policy::Fair, true)] {
        let mut res = Fake::new(1000, 4);
        let mut s = Scheduler::new(SchedulerConfig { policy, fair_preemption, ..cfg(2, 64) });
        s.add(0, vec![1; 8], Some("noisy".into()));
        s.add(1, vec![1; 8], Some("noisy".into()));
        step(&mut s, &mut res);
        step(&mut s, &mut res);
        s.add(100, vec![1; 8], Some("quiet".into()));
        let p = step(&mut s, &mut res);
        let ids: BTreeSet<SeqId> = p.batch.iter().map(|c| c.id).collect();
        if policy == Policy::Fcfs || !fair_preemption {
            assert_eq!((ids, p.preempted), ([0, 1].into(), vec![]), "{policy:?}: the quiet request waits");
            continue;
        }
        assert_eq!(p.preempted, vec![1], "the noisy tenant's newest goes");
        assert_eq!(ids, [0, 100].into(), "its place goes to the quiet request this step");
        assert_eq!(res.held.get(&1), None, "the victim's KV is freed");
        // One each now (the share of two tenants on two places): nobody preempts anybody.
        s.add(2, vec![1; 8], Some("noisy".into()));
        s.add(101, vec![1; 8], Some("quiet".into()));
        for _ in 0..3 {
            assert!(step(&mut s, &mut res).preempted.is_empty(), "at their shares, no preemption");
        }
        // The victim comes back when places free, recomputing its prompt and its tokens.
        for id in [0, 100, 101] {
            s.finish(id, &mut res);
        }
        let p = step(&mut s, &mut res);
        let back = p.batch.iter().find(|c| c.id == 1).expect("the victim is re-admitted");
        assert_eq!((back.past, back.tokens.len()), (0, 10), "8 prompt + 2 sampled tokens");
    }
}

#[test]
fn with_fair_preemption_a_request_that_cannot_run_yet_preempts_nobody() {
    let mut res = Fake::new(1000, 1);
    let mut s = Scheduler::new(SchedulerConfig { fair_preemption: true, ..fair(2, 64) });
    s.add(0, vec![1; 8], None);
    s.add(1, vec![1; 8], None);
    step(&mut s, &mut res);
    // Its adapter is still loading: no slot, so no place is taken from the base tenant.
    res.loading.insert("quiet".into());
    s.add(100, vec![1; 8], Some("quiet".into()));
    for _ in 0..3 {
        let p = step(&mut s, &mut res);
        assert!(p.preempted.is_empty() && p.batch.len() == 2, "{p:?}");
    }
}
