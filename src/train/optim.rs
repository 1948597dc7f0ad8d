//! AdamW with its state exposed (so checkpoints can save and restore the moments), and the
//! learning-rate schedule (linear warm-up, cosine decay to zero).

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use super::TrainError;

/// AdamW hyper-parameters (defaults as Hugging Face's Trainer: betas 0.9/0.999, eps 1e-8, wd 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Decoupled-weight-decay Adam over named vars.
pub struct AdamW {
    cfg: AdamWConfig,
    /// Completed optimizer steps (bias correction uses it).
    pub step: usize,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        Self { cfg, step: 0, m: HashMap::new(), v: HashMap::new() }
    }

    /// One update of every var that has a gradient in `grads` (by var name), at rate `lr`.
    pub fn step(
        &mut self,
        vars: &[(String, &Var)],
        grads: &HashMap<String, Tensor>,
        lr: f64,
    ) -> Result<(), TrainError> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            let m_prev = match self.m.get(name) {
                Some(m) => m.clone(),
                None => g.zeros_like()?,
            };
            let v_prev = match self.v.get(name) {
                Some(v) => v.clone(),
                None => g.zeros_like()?,
            };
            let m = ((m_prev * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((v_prev * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let m = self.m.iter().map(|(k, t)| (format!("m.{k}"), t.clone()));
        let v = self.v.iter().map(|(k, t)| (format!("v.{k}"), t.clone()));
        m.chain(v).collect()
    }

    /// Restores moments saved by [`AdamW::state_tensors`] at optimizer step `step`.
    pub fn restore(cfg: AdamWConfig, step: usize, tensors: HashMap<String, Tensor>) -> Self {
        let mut opt = Self::new(cfg);
        opt.step = step;
        for (k, t) in tensors {
            if let Some(n) = k.strip_prefix("m.") {
                opt.m.insert(n.to_string(), t);
            } else if let Some(n) = k.strip_prefix("v.") {
                opt.v.insert(n.to_string(), t);
            }
        }
        opt
    }
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warm-up over `warmup`
/// steps, then cosine decay to 0 (as transformers' `get_cosine_schedule_with_warmup`).
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!((lr_at(0, 100, 10, 1.0) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0) - 0.5).abs() < 1e-12);
        assert!(lr_at(99, 100, 10, 1.0) < 0.01);
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        let x = Var::new(&[3.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(AdamWConfig::default());
        for _ in 0..500 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let g = HashMap::from([("x".to_string(), grads.get(x.as_tensor()).unwrap().clone())]);
            opt.step(&[("x".into(), &x)], &g, 0.05).unwrap();
        }
        let v = x.as_tensor().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.abs() < 1e-2), "{v:?}");
    }
}
