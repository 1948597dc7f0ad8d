//! Places in the waiting queue, counted where requests are submitted (so the limits hold
//! exactly under a burst) and given back by the engine when a request is first admitted or
//! ends: `--max-waiting` for all, `--max-waiting-per-model` for each tenant (the model, the
//! base or one adapter, unless the request names its tenant: `user` or `x-tenant-id`), so one
//! tenant's burst cannot take every place and lock the others out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::error::ApiError;
use super::metrics::Metrics;
use super::ratelimit::{RateLimit, RateLimiter};
use super::validation::ValidRequest;

/// The two limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitLimits {
    pub total: usize,
    /// `--max-waiting-per-model`: places one tenant may hold.
    pub per_tenant: usize,
}

/// Waiting requests, in all and per tenant.
#[derive(Debug)]
pub struct WaitQueue {
    limits: WaitLimits,
    /// Shared with `/metrics` (`vllm:num_requests_waiting`).
    total: Arc<AtomicUsize>,
    per_tenant: Mutex<HashMap<String, usize>>,
}

impl WaitQueue {
    pub fn new(total: Arc<AtomicUsize>, limits: WaitLimits) -> Self {
        Self { limits, total, per_tenant: Mutex::new(HashMap::new()) }
    }

    /// Takes a place for a request of `tenant`, or says which limit is full: 503 for the
    /// server's (checked first, so with no share of its own a full queue stays a 503), 429
    /// for the tenant's own (both with `Retry-After`).
    pub fn enter(&self, tenant: &str) -> Result<(), ApiError> {
        let mut per = self.per_tenant.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.total.fetch_add(1, Ordering::SeqCst);
        if before >= self.limits.total {
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::Overloaded { waiting: before, limit: self.limits.total });
        }
        let mine = per.get(tenant).copied().unwrap_or(0);
        if mine >= self.limits.per_tenant {
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::TenantOverloaded {
                tenant: tenant.to_string(),
                waiting: mine,
                limit: self.limits.per_tenant,
            });
        }
        *per.entry(tenant.to_string()).or_default() += 1;
        Ok(())
    }

    /// Gives back the place of a request of `tenant`.
    pub fn leave(&self, tenant: &str) {
        let mut per = self.per_tenant.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                per.remove(tenant); // the map holds only tenants with someone waiting
            }
            self.total.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The door of the waiting queue: a request passes its tenant's rate limit, then takes a
/// place; what it was charged and did not use comes back when it ends.
#[derive(Debug)]
pub struct Admission {
    places: WaitQueue,
    rate: RateLimiter,
    /// Where refusals by the rate limit are counted.
    metrics: Arc<Metrics>,
}

impl Admission {
    /// `places`' total is the waiting count `/metrics` reads.
    pub fn new(places: WaitQueue, rate: Option<RateLimit>, metrics: Arc<Metrics>) -> Self {
        Self { places, rate: RateLimiter::new(rate), metrics }
    }

    /// Charges `req`'s tenant its cost ([`cost`]) and takes a place, or refuses it: 429 +
    /// `Retry-After` when the tenant's bucket is short (counted in
    /// `lab_tenant_rate_limited_total`), else [`WaitQueue::enter`]'s answer (and the charge
    /// is given back, the request never ran).
    pub fn enter(&self, req: &ValidRequest) -> Result<(), ApiError> {
        let (tenant, cost, now) = (req.tenant.as_str(), cost(req), Instant::now());
        if let Err(r) = self.rate.take(tenant, cost, now) {
            self.metrics.update(|m| m.count_rate_limited(tenant));
            return Err(ApiError::RateLimited {
                tenant: tenant.to_string(),
                cost: r.cost,
                rate: r.limit.tokens_per_s,
                burst: r.limit.burst,
                retry_after_s: r.retry_after_s,
            });
        }
        self.places.enter(tenant).inspect_err(|_| self.rate.give_back(tenant, cost, now))
    }

    /// Gives back `tenant`'s place (admitted into the running batch, or ended while waiting).
    pub fn leave(&self, tenant: &str) {
        self.places.leave(tenant);
    }

    /// `req` has ended: gives its tenant back what it was charged and did not use (all of it
    /// if it never ran, `waited_only`; else the `max_tokens` it did not generate).
    pub fn refund(&self, req: &ValidRequest, generated: usize, waited_only: bool) {
        let unused = if waited_only { cost(req) } else { req.params.max_tokens.saturating_sub(generated) };
        self.rate.give_back(&req.tenant, unused, Instant::now());
    }
}

/// What a request costs its tenant's bucket: its prompt plus `max_tokens` (the most it can
/// use; see [`super::ratelimit`] for why).
pub fn cost(req: &ValidRequest) -> usize {
    req.prompt_ids.len().saturating_add(req.params.max_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_limit_leaves_room_for_the_others() {
        let q = WaitQueue::new(Arc::default(), WaitLimits { total: 4, per_tenant: 2 });
        assert!(q.enter("a").is_ok() && q.enter("a").is_ok());
        assert!(matches!(q.enter("a"), Err(ApiError::TenantOverloaded { .. })));
        assert!(q.enter("b").is_ok() && q.enter("b").is_ok());
        assert!(matches!(q.enter("c"), Err(ApiError::Overloaded { .. })), "the server's limit still holds");
        q.leave("a");
        assert!(q.enter("c").is_ok());
        for m in ["a", "b", "b", "c"] {
            q.leave(m);
        }
        q.leave("never-entered");
        assert_eq!(q.total.load(Ordering::SeqCst), 0);
        assert!(q.per_tenant.lock().unwrap().is_empty());
        let q = WaitQueue::new(Arc::default(), WaitLimits { total: 1, per_tenant: 1 });
        assert!(q.enter("a").is_ok());
        assert!(matches!(q.enter("a"), Err(ApiError::Overloaded { .. })), "no share of its own: a 503");
    }

    fn request(tenant: &str, prompt: usize, max_tokens: usize) -> ValidRequest {
        use crate::engine::sampling::SamplingParams;
        let params = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            max_tokens,
            ignore_eos: false,
            stop: Vec::new(),
        };
        ValidRequest {
            id: "cmpl-0".into(),
            endpoint: super::super::validation::Endpoint::Completion,
            model: "base".into(),
            adapter: None,
            tenant: tenant.into(),
            prompt_ids: vec![1; prompt],
            params,
            stream: false,
            include_usage: false,
            created: 0,
            arrived: Instant::now(),
        }
    }

    /// A request refused by the rate limit holds no place; one refused by the queue after
    /// paying is paid back; an ended one gets its ungenerated `max_tokens` back.
    #[test]
    fn admission_charges_prompt_plus_max_tokens_and_gives_back_what_was_not_used() {
        let metrics = Arc::new(Metrics::new("base", 8, 1));
        let places = WaitQueue::new(metrics.queued.clone(), WaitLimits { total: 8, per_tenant: 1 });
        let rate = RateLimit { tokens_per_s: 1e-3, burst: 100.0 }; // no refill within the test
        let a = Admission::new(places, Some(rate), metrics.clone());
        let req = request("t", 30, 20);
        assert!(a.enter(&req).is_ok(), "50 of 100");
        assert!(matches!(a.enter(&req), Err(ApiError::TenantOverloaded { .. })), "its one place is taken");
        a.leave("t");
        assert!(a.enter(&req).is_ok(), "the refused one was paid back: 50 left, not 0");
        a.leave("t");
        let Err(ApiError::RateLimited { retry_after_s, .. }) = a.enter(&req) else { panic!("bucket empty") };
        assert!(retry_after_s > 1000, "{retry_after_s}");
        assert_eq!(metrics.queued.load(Ordering::SeqCst), 0, "a rate-limited request holds no place");
        assert_eq!(metrics.snapshot().rate_limited.get("t"), Some(&1));
        a.refund(&req, 5, false); // generated 5 of its 20
        a.refund(&req, 20, false); // generated all: nothing back
        assert!(a.enter(&request("t", 10, 5)).is_ok(), "15 given back pays for 15");
        a.leave("t");
        a.refund(&req, 0, true); // never ran: all 50 back
        assert!(a.enter(&request("t", 40, 10)).is_ok());
    }
}
