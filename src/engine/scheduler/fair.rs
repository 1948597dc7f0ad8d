//! Per-tenant fair share: the Virtual Token Counter of "Fairness in Serving Large Language
//! Models" (Sheng et al., OSDI 2024), as plain state.
//!
//! A tenant is the name the server gives a request: the `user` field or `x-tenant-id` header
//! when the client sends one, else its adapter (the base model is one tenant; the scheduler's
//! own default for it is `""`). Each tenant's counter is
//! the service it has received in weighted tokens (prompt tokens charged at admission, each
//! output token at twice that, the paper's weights). Admission goes to the backlogged tenant
//! with the least service; a tenant that becomes backlogged after being idle starts at the
//! least counter of the active tenants, so idle time is not banked as credit. The policy is
//! work-conserving: whatever capacity the least-served tenants leave, others still get.

use std::collections::BTreeMap;
use std::str::FromStr;

/// `--scheduling-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// First come, first served (vLLM's default), resident adapters first.
    #[default]
    Fcfs,
    /// Virtual Token Counter across tenants.
    Fair,
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fcfs" => Ok(Policy::Fcfs),
            "fair" => Ok(Policy::Fair),
            _ => Err(format!("unknown scheduling policy `{s}` (use fcfs or fair)")),
        }
    }
}

/// Weight of one prompt token.
const PROMPT_WEIGHT: f64 = 1.0;
/// Weight of one output token.
const OUTPUT_WEIGHT: f64 = 2.0;

/// Service counters per tenant.
#[derive(Debug, Clone, Default)]
pub struct TokenCounters {
    counters: BTreeMap<String, f64>,
}

impl TokenCounters {
    /// Service `tenant` has received (0 for one never seen).
    pub fn get(&self, tenant: &str) -> f64 {
        self.counters.get(tenant).copied().unwrap_or(0.0)
    }

    /// `tenant` becomes backlogged while `active` tenants are: it starts no lower than the
    /// least of them (no credit for idle time), and never goes down.
    pub fn activate<'a>(&mut self, tenant: &str, active: impl Iterator<Item = &'a str>) {
        let floor = active.filter(|t| *t != tenant).map(|t| self.get(t)).fold(f64::INFINITY, f64::min);
        let c = self.counters.entry(tenant.to_string()).or_insert(0.0);
        if floor.is_finite() && *c < floor {
            *c = floor;
        }
    }

    pub fn charge_prompt(&mut self, tenant: &str, tokens: usize) {
        *self.counters.entry(tenant.to_string()).or_insert(0.0) += PROMPT_WEIGHT * tokens as f64;
    }

    pub fn charge_output(&mut self, tenant: &str, tokens: usize) {
        *self.counters.entry(tenant.to_string()).or_insert(0.0) += OUTPUT_WEIGHT * tokens as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_charge_weighted_tokens_and_an_idle_tenant_banks_nothing() {
        let mut c = TokenCounters::default();
        c.charge_prompt("a", 100);
        c.charge_output("a", 10);
        c.charge_prompt("b", 50);
        assert_eq!((c.get("a"), c.get("b")), (120.0, 50.0));
        c.activate("z", ["a", "b"].into_iter());
        assert_eq!(c.get("z"), 50.0, "lifted to the least active counter, not 0");
        c.activate("a", ["b", "z"].into_iter());
        assert_eq!(c.get("a"), 120.0, "never lowered");
        c.activate("q", std::iter::empty());
        assert_eq!(c.get("q"), 0.0, "nobody active: nothing to lift to");
        assert!("fair".parse::<Policy>().is_ok() && "lifo".parse::<Policy>().is_err());
    }
}
