//! `--tenant-rate-limit TOKENS_PER_S[:BURST]`: one token bucket per tenant, checked where a
//! request enters the waiting queue (before it costs the engine anything).
//!
//! What a request costs: its prompt tokens plus its `max_tokens`, charged when it is admitted
//! to the queue, as OpenAI counts `max_tokens` against a tokens-per-minute limit at request
//! time: only that bound is known before the request runs, and charging it up front is what
//! keeps a burst of concurrent requests from overshooting the rate. When the request ends,
//! the part of `max_tokens` it did not generate is given back, so over time a tenant is
//! limited by the tokens it really used (a chat request without `max_tokens` may run to the
//! context length; without the refund it would cost that much every time).
//!
//! The bucket may go into debt: a request passes when the bucket holds its cost or is full,
//! and then takes its whole cost. So a request larger than the burst is not refused for ever
//! (it waits for a full bucket), and the long-run rate still holds exactly, since the debt is
//! paid back at the rate before the next request passes.
//!
//! Refill, in pseudocode: `level = min(burst, level + rate * (now - then))`; a request of
//! cost `c` passes iff `level >= min(c, burst)`, then `level -= c`; a refused one waits
//! `(min(c, burst) - level) / rate` seconds (the `Retry-After`, rounded up).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limit every tenant gets: tokens per second and the bucket size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub tokens_per_s: f64,
    /// Tokens a bucket holds at most (default: one second's worth).
    pub burst: f64,
}

/// A `--tenant-rate-limit` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "expected TOKENS_PER_S[:BURST] with TOKENS_PER_S in 0.001..=1e9 and BURST in 1..=1e12 (e.g. 500 or 500:4000), got `{0}`"
)]
pub struct BadRateLimit(String);

impl FromStr for RateLimit {
    type Err = BadRateLimit;
    fn from_str(s: &str) -> Result<Self, BadRateLimit> {
        let bad = || BadRateLimit(s.to_string());
        let (rate, burst) = match s.split_once(':') {
            Some((r, b)) => (r, Some(b)),
            None => (s, None),
        };
        let rate: f64 = rate.trim().parse().map_err(|_| bad())?;
        let burst: f64 = match burst {
            Some(b) => b.trim().parse().map_err(|_| bad())?,
            None => rate.max(1.0),
        };
        // Bounded both ways: a rate near 0 made a refusal's wait (burst / rate seconds)
        // overflow `Duration`, and a huge one or burst means no limit at all.
        if !((1e-3..=1e9).contains(&rate) && (1.0..=1e12).contains(&burst)) {
            return Err(bad());
        }
        Ok(RateLimit { tokens_per_s: rate, burst })
    }
}

/// One tenant's bucket, as plain state: every call says what time it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    /// Tokens available at `at` (negative: debt).
    level: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket (a tenant never seen has its whole burst).
    pub fn full(limit: &RateLimit, now: Instant) -> Self {
        Self { level: limit.burst, at: now }
    }

    /// Takes `cost` tokens, or says how long until the bucket holds enough for them.
    pub fn take(&mut self, limit: &RateLimit, cost: f64, now: Instant) -> Result<(), Duration> {
        self.refill(limit, now);
        let need = cost.min(limit.burst);
        if self.level >= need {
            self.level -= cost;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((need - self.level) / limit.tokens_per_s))
        }
    }

    /// Gives back `tokens` a request was charged and did not use (never above the burst).
    pub fn give_back(&mut self, limit: &RateLimit, tokens: f64, now: Instant) {
        self.refill(limit, now);
        self.level = (self.level + tokens).min(limit.burst);
    }

    /// Whether the bucket is full at `now` (then it is the same as a bucket never seen).
    pub fn is_full(&self, limit: &RateLimit, now: Instant) -> bool {
        let mut b = *self;
        b.refill(limit, now);
        b.level >= limit.burst
    }

    /// Tokens available at `now`.
    pub fn level(&self, limit: &RateLimit, now: Instant) -> f64 {
        let mut b = *self;
        b.refill(limit, now);
        b.level
    }

    fn refill(&mut self, limit: &RateLimit, now: Instant) {
        // A time before the last one (callers' clocks read out of order across threads)
        // adds nothing rather than draining the bucket.
        if now > self.at {
            let dt = (now - self.at).as_secs_f64();
            self.level = (self.level + dt * limit.tokens_per_s).min(limit.burst);
            self.at = now;
        }
    }
}

/// A request refused by the limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refused {
    /// Whole seconds until a retry can pass (at least 1: `Retry-After` has no fractions).
    pub retry_after_s: u64,
    pub cost: f64,
    pub limit: RateLimit,
}

/// Buckets whose count triggers a sweep of the full ones.
const SWEEP_AT: usize = 1024;

/// Every tenant's bucket (`None` limit: no rate limit, everything passes).
#[derive(Debug)]
pub struct RateLimiter {
    limit: Option<RateLimit>,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    map: HashMap<String, TokenBucket>,
    /// Size at which the next sweep runs: twice what the last one kept, so sweeping stays
    /// amortized O(1) per request however many tenants are active.
    sweep_at: usize,
}

impl RateLimiter {
    pub fn new(limit: Option<RateLimit>) -> Self {
        Self { limit, buckets: Mutex::new(Buckets { map: HashMap::new(), sweep_at: SWEEP_AT }) }
    }

    /// The limit, if any.
    pub fn limit(&self) -> Option<RateLimit> {
        self.limit
    }

    /// Charges `tenant` `cost` tokens at `now`, or refuses with the wait.
    pub fn take(&self, tenant: &str, cost: usize, now: Instant) -> Result<(), Refused> {
        let Some(limit) = self.limit else { return Ok(()) };
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let cost = cost as f64;
        let result = match b.map.get_mut(tenant) {
            Some(bucket) => bucket.take(&limit, cost, now),
            None => {
                let mut bucket = TokenBucket::full(&limit, now);
                let r = bucket.take(&limit, cost, now);
                b.map.insert(tenant.to_string(), bucket);
                r
            }
        };
        if b.map.len() >= b.sweep_at {
            // A full bucket is the same as none: dropping them bounds the map by the tenants
            // active in the last burst / rate seconds, whatever names clients send.
            b.map.retain(|_, bucket| !bucket.is_full(&limit, now));
            b.sweep_at = (2 * b.map.len()).max(SWEEP_AT);
        }
        result.map_err(|wait| Refused { retry_after_s: (wait.as_secs_f64().ceil() as u64).max(1), cost, limit })
    }

    /// Gives back `tokens` that `tenant` was charged and did not use.
    pub fn give_back(&self, tenant: &str, tokens: usize, now: Instant) {
        let Some(limit) = self.limit else { return };
        if tokens == 0 {
            return;
        }
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = b.map.get_mut(tenant) {
            bucket.give_back(&limit, tokens as f64, now);
        } // no bucket: it was swept because it was full; nothing to give back to
    }

    /// Buckets held now (tests: the sweep bounds them).
    pub fn tenants(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: f64, burst: f64) -> RateLimit {
        RateLimit { tokens_per_s: rate, burst }
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn the_flag_parses_rate_and_optional_burst() {
        assert_eq!("500".parse::<RateLimit>().unwrap(), limit(500.0, 500.0));
        assert_eq!("100:4000".parse::<RateLimit>().unwrap(), limit(100.0, 4000.0));
        assert_eq!("0.5".parse::<RateLimit>().unwrap(), limit(0.5, 1.0), "the burst holds one token at least");
        for bad in ["", "0", "-1", "abc", "10:0", "10:x", "inf", "NaN", "10:inf", "1:2:3"] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bucket_refills_at_the_rate_up_to_the_burst() {
        let (l, t0) = (limit(100.0, 300.0), Instant::now());
        let mut b = TokenBucket::full(&l, t0);
        assert!(b.take(&l, 200.0, t0).is_ok());
        assert_eq!(b.take(&l, 200.0, t0), Err(Duration::from_secs(1)), "100 left, 100 more at 100/s");
        assert!(b.take(&l, 200.0, at(t0, 999)).is_err());
        assert!(b.take(&l, 200.0, at(t0, 1000)).is_ok());
        assert_eq!(b.level(&l, at(t0, 1000)), 0.0);
        assert_eq!(b.level(&l, at(t0, 60_000)), 300.0, "never above the burst, however long idle");
        assert!(b.is_full(&l, at(t0, 4000)) && !b.is_full(&l, at(t0, 2000)));
        // A clock read earlier than the last one adds nothing and takes nothing.
        let mut b = TokenBucket::full(&l, at(t0, 10));
        assert!(b.take(&l, 300.0, at(t0, 10)).is_ok());
        assert_eq!(b.level(&l, t0), 0.0);
    }

    #[test]
    fn a_request_larger_than_the_burst_passes_a_full_bucket_and_leaves_a_debt() {
        let (l, t0) = (limit(100.0, 100.0), Instant::now());
        let mut b = TokenBucket::full(&l, t0);
        assert!(b.take(&l, 500.0, t0).is_ok(), "never refused for ever");
        assert_eq!(b.level(&l, t0), -400.0);
        assert_eq!(b.take(&l, 1.0, t0), Err(Duration::from_secs_f64(4.01)), "the debt is paid at the rate first");
        assert_eq!(b.take(&l, 500.0, at(t0, 4000)), Err(Duration::from_secs(1)), "then it waits for a full bucket");
        assert!(b.take(&l, 500.0, at(t0, 5000)).is_ok());
    }

    #[test]
    fn unused_tokens_come_back_up_to_the_burst() {
        let (l, t0) = (limit(10.0, 100.0), Instant::now());
        let mut b = TokenBucket::full(&l, t0);
        assert!(b.take(&l, 80.0, t0).is_ok());
        b.give_back(&l, 50.0, t0);
        assert_eq!(b.level(&l, t0), 70.0);
        b.give_back(&l, 500.0, t0);
        assert_eq!(b.level(&l, t0), 100.0);
    }

    #[test]
    fn one_tenant_limited_leaves_the_others_their_whole_bucket() {
        let (r, t0) = (RateLimiter::new(Some(limit(10.0, 100.0))), Instant::now());
        assert!(r.take("noisy", 100, t0).is_ok());
        let refused = r.take("noisy", 50, t0).unwrap_err();
        assert_eq!((refused.retry_after_s, refused.cost), (5, 50.0));
        assert!(r.take("quiet", 100, t0).is_ok(), "another tenant is not touched");
        r.give_back("noisy", 60, at(t0, 1000));
        assert!(r.take("noisy", 70, at(t0, 1000)).is_ok(), "10 refilled + 60 given back");
        assert_eq!(r.take("quiet", 1, at(t0, 50)).unwrap_err().retry_after_s, 1, "0.05 s rounded up to 1");
        r.give_back("never-seen", 5, t0);
        let off = RateLimiter::new(None);
        assert!((0..100).all(|_| off.take("x", usize::MAX, t0).is_ok()), "no limit: everything passes");
        assert_eq!(off.tenants(), 0);
    }

    #[test]
    fn full_buckets_are_swept_so_tenant_names_cannot_grow_the_map_unbounded() {
        let (r, t0) = (RateLimiter::new(Some(limit(1000.0, 1000.0))), Instant::now());
        r.take("busy", 1 << 30, t0).unwrap(); // in debt for days: never full during the test
        for i in 0..10 * SWEEP_AT {
            // Each name costs 1 token and is full again 1 ms later.
            r.take(&format!("user-{i}"), 1, at(t0, 2 * i as u64)).unwrap();
        }
        assert!(r.tenants() <= SWEEP_AT, "{} buckets held", r.tenants());
        assert!(r.take("busy", 1, at(t0, 30_000)).is_err(), "a bucket not full is never swept");
    }
}
