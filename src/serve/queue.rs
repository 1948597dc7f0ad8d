//! Places in the waiting queue, counted where requests are submitted (so the limits hold
//! exactly under a burst) and given back by the engine when a request is first admitted or
//! ends: `--max-waiting` for all, `--max-waiting-per-model` for each model (the base or one
//! adapter), so one tenant's burst cannot take every place and lock the others out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::error::ApiError;

/// The two limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitLimits {
    pub total: usize,
    pub per_model: usize,
}

/// Waiting requests, in all and per model.
#[derive(Debug)]
pub struct WaitQueue {
    limits: WaitLimits,
    /// Shared with `/metrics` (`vllm:num_requests_waiting`).
    total: Arc<AtomicUsize>,
    per_model: Mutex<HashMap<String, usize>>,
}

impl WaitQueue {
    pub fn new(total: Arc<AtomicUsize>, limits: WaitLimits) -> Self {
        Self { limits, total, per_model: Mutex::new(HashMap::new()) }
    }

    /// Takes a place for a request to `model`, or says which limit is full: 503 for the
    /// server's (checked first, so with no share of its own a full queue stays a 503), 429
    /// for the model's own (both with `Retry-After`).
    pub fn enter(&self, model: &str) -> Result<(), ApiError> {
        let mut per = self.per_model.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.total.fetch_add(1, Ordering::SeqCst);
        if before >= self.limits.total {
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::Overloaded { waiting: before, limit: self.limits.total });
        }
        let mine = per.get(model).copied().unwrap_or(0);
        if mine >= self.limits.per_model {
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::ModelOverloaded {
                model: model.to_string(),
                waiting: mine,
                limit: self.limits.per_model,
            });
        }
        *per.entry(model.to_string()).or_default() += 1;
        Ok(())
    }

    /// Gives back the place of a request to `model`.
    pub fn leave(&self, model: &str) {
        let mut per = self.per_model.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(model) {
            *n -= 1;
            if *n == 0 {
                per.remove(model); // the map holds only models with someone waiting
            }
            self.total.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_models_limit_leaves_room_for_the_others() {
        let q = WaitQueue::new(Arc::default(), WaitLimits { total: 4, per_model: 2 });
        assert!(q.enter("a").is_ok() && q.enter("a").is_ok());
        assert!(matches!(q.enter("a"), Err(ApiError::ModelOverloaded { .. })));
        assert!(q.enter("b").is_ok() && q.enter("b").is_ok());
        assert!(matches!(q.enter("c"), Err(ApiError::Overloaded { .. })), "the server's limit still holds");
        q.leave("a");
        assert!(q.enter("c").is_ok());
        for m in ["a", "b", "b", "c"] {
            q.leave(m);
        }
        q.leave("never-entered");
        assert_eq!(q.total.load(Ordering::SeqCst), 0);
        assert!(q.per_model.lock().unwrap().is_empty());
        let q = WaitQueue::new(Arc::default(), WaitLimits { total: 1, per_model: 1 });
        assert!(q.enter("a").is_ok());
        assert!(matches!(q.enter("a"), Err(ApiError::Overloaded { .. })), "no share of its own: a 503");
    }
}
