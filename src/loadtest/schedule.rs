//! The open-loop plan of one step, drawn whole before anything is sent: arrival offsets
//! (Poisson, constant or gamma inter-arrival times) and which model each request targets.

use std::str::FromStr;

use rand::distributions::Distribution;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Inter-arrival distribution (`--arrival`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// Exponential gaps: a Poisson process.
    Poisson,
    /// Equal gaps of 1/qps.
    Constant,
    /// Gamma gaps with shape k and mean 1/qps (k < 1 burstier than Poisson, k > 1 smoother).
    Gamma(f64),
}

impl FromStr for Arrival {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "poisson" => Ok(Arrival::Poisson),
            "constant" => Ok(Arrival::Constant),
            _ => match s.strip_prefix("gamma:").map(str::parse::<f64>) {
                Some(Ok(k)) if k > 0.0 => Ok(Arrival::Gamma(k)),
                _ => Err(format!("unknown arrival `{s}` (use poisson, constant or gamma:K with K > 0)")),
            },
        }
    }
}

/// How requests pick a model (`--mix`).
#[derive(Debug, Clone, PartialEq)]
pub enum Mix {
    Uniform,
    /// Model i (0-based) with probability proportional to 1/(i+1)^s.
    Zipf(f64),
    RoundRobin,
    /// `weights:NAME=W,...`: each named model with weight W, the others weight 1 (a noisy
    /// tenant at 10x the others: `weights:customer-01=10`).
    Weights(Vec<(String, f64)>),
}

impl FromStr for Mix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uniform" => Ok(Mix::Uniform),
            "round-robin" => Ok(Mix::RoundRobin),
            _ if s.starts_with("weights:") => parse_weights(&s["weights:".len()..]).map(Mix::Weights),
            _ => match s.strip_prefix("zipf:").map(str::parse::<f64>) {
                Some(Ok(v)) if v > 0.0 => Ok(Mix::Zipf(v)),
                _ => Err(format!(
                    "unknown mix `{s}` (use uniform, round-robin, zipf:S with S > 0 or weights:NAME=W,...)"
                )),
            },
        }
    }
}

/// `NAME=W,NAME=W`: finite positive weights.
fn parse_weights(spec: &str) -> Result<Vec<(String, f64)>, String> {
    spec.split(',')
        .map(|kv| {
            let (name, w) = kv.split_once('=').ok_or_else(|| format!("`{kv}` in --mix weights: expected NAME=W"))?;
            match w.parse::<f64>() {
                Ok(w) if w.is_finite() && w > 0.0 => Ok((name.to_string(), w)),
                _ => Err(format!("`{kv}` in --mix weights: W must be a positive number")),
            }
        })
        .collect()
}

/// Arrival offsets in seconds from the step's start, covering `[0, secs)` at `qps` on average.
pub fn arrivals(arrival: Arrival, qps: f64, secs: f64, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mean = 1.0 / qps;
    let mut gap = || match arrival {
        Arrival::Constant => mean,
        Arrival::Poisson => rand_distr::Exp::new(qps).expect("qps > 0").sample(&mut rng),
        Arrival::Gamma(k) => rand_distr::Gamma::new(k, mean / k).expect("k > 0").sample(&mut rng),
    };
    let mut out = Vec::new();
    // The first request goes at one gap, not at 0, so every gap follows the distribution.
    let mut t = gap();
    while t < secs {
        out.push(t);
        t += gap();
    }
    out
}

/// Model index (into `models`) per request.
pub fn pick_models(mix: &Mix, models: &[String], n: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0f_u64);
    let n_models = models.len();
    let weighted = |w: Vec<f64>, rng: &mut ChaCha8Rng| {
        let dist = rand::distributions::WeightedIndex::new(&w).expect("positive weights");
        (0..n).map(|_| dist.sample(rng)).collect()
    };
    match mix {
        Mix::RoundRobin => (0..n).map(|i| i % n_models).collect(),
        Mix::Uniform => (0..n).map(|_| rng.gen_range(0..n_models)).collect(),
        Mix::Zipf(s) => weighted((0..n_models).map(|i| 1.0 / ((i + 1) as f64).powf(*s)).collect(), &mut rng),
        Mix::Weights(named) => {
            let w = models.iter().map(|m| named.iter().find(|(n, _)| n == m).map_or(1.0, |(_, w)| *w)).collect();
            weighted(w, &mut rng)
        }
    }
}

/// Expands `customer-{01..50}` (zero padding follows the first bound) and comma lists.
pub fn expand_models(specs: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for spec in specs {
        let Some((pre, rest)) = spec.split_once('{') else {
            out.push(spec.clone());
            continue;
        };
        let (range, post) = rest.split_once('}').ok_or_else(|| format!("`{spec}`: missing `}}`"))?;
        let (a, b) = range.split_once("..").ok_or_else(|| format!("`{spec}`: expected {{A..B}}"))?;
        let bad = || format!("`{spec}`: {{A..B}} needs two integers");
        let (lo, hi): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if lo > hi {
            return Err(format!("`{spec}`: empty range"));
        }
        for i in lo..=hi {
            out.push(format!("{pre}{i:0width$}{post}", width = a.len()));
        }
    }
    if out.is_empty() {
        return Err("no models: pass --models NAME[,NAME...] or a pattern like customer-{01..50}".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kolmogorov-Smirnov statistic of `xs` against Exp(rate).
    fn ks_exponential(xs: &mut [f64], rate: f64) -> f64 {
        xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = xs.len() as f64;
        xs.iter()
            .enumerate()
            .map(|(i, x)| {
                let f = 1.0 - (-rate * x).exp();
                (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
            })
            .fold(0.0, f64::max)
    }

    fn gaps(t: &[f64]) -> Vec<f64> {
        let mut prev = 0.0;
        t.iter()
            .map(|&x| {
                let g = x - prev;
                prev = x;
                g
            })
            .collect()
    }

    #[test]
    fn poisson_gaps_are_exponential_with_the_right_mean() {
        let t = arrivals(Arrival::Poisson, 20.0, 500.0, 7);
        let mut g = gaps(&t);
        let n = g.len() as f64;
        let mean = g.iter().sum::<f64>() / n;
        assert!((n - 10_000.0).abs() < 400.0, "{n} arrivals for 20 qps x 500 s");
        assert!((mean - 0.05).abs() < 0.05 * 0.05, "mean gap {mean}");
        let d = ks_exponential(&mut g, 20.0);
        // 1% critical value 1.63/sqrt(n).
        assert!(d < 1.63 / n.sqrt(), "KS D = {d}");
        // And the test has power: the same gaps are not Exp(25).
        assert!(ks_exponential(&mut g, 25.0) > 1.63 / n.sqrt());
    }

    #[test]
    fn constant_and_gamma_keep_the_rate_and_a_seed_repeats() {
        let c = arrivals(Arrival::Constant, 4.0, 10.0, 1);
        assert_eq!(c.len(), 39); // 0.25, 0.5, ..., 9.75
        let g = arrivals(Arrival::Gamma(0.5), 10.0, 1000.0, 3);
        assert!((g.len() as f64 - 10_000.0).abs() < 500.0, "{}", g.len());
        let gp = gaps(&g);
        let mean = gp.iter().sum::<f64>() / gp.len() as f64;
        let var = gp.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / gp.len() as f64;
        // Gamma(k) gaps: CV^2 = 1/k = 2 (burstier than Poisson's 1).
        assert!((var / (mean * mean) - 2.0).abs() < 0.25, "cv2 {}", var / (mean * mean));
        assert_eq!(arrivals(Arrival::Poisson, 3.0, 50.0, 9), arrivals(Arrival::Poisson, 3.0, 50.0, 9));
    }

    #[test]
    fn model_patterns_and_mixes() {
        let m = expand_models(&["customer-{01..50}".into()]).unwrap();
        assert_eq!((m.len(), m[0].as_str(), m[49].as_str()), (50, "customer-01", "customer-50"));
        assert_eq!(expand_models(&["a".into(), "b{1..2}".into()]).unwrap(), vec!["a", "b1", "b2"]);
        assert!(expand_models(&["x{3..1}".into()]).is_err());
        let names = |n: usize| (0..n).map(|i| format!("m{i}")).collect::<Vec<_>>();
        assert_eq!(pick_models(&Mix::RoundRobin, &names(3), 5, 0), vec![0, 1, 2, 0, 1]);
        let w: Mix = "weights:m2=10".parse().unwrap();
        let picks = pick_models(&w, &names(5), 14_000, 0);
        let share = picks.iter().filter(|&&i| i == 2).count() as f64 / picks.len() as f64;
        assert!((share - 10.0 / 14.0).abs() < 0.02, "weighted share of m2: {share}");
        assert!("weights:a=0".parse::<Mix>().is_err() && "weights:a".parse::<Mix>().is_err());
        let z = pick_models(&Mix::Zipf(1.0), &names(10), 20_000, 0);
        let first = z.iter().filter(|&&i| i == 0).count() as f64 / 20_000.0;
        let h: f64 = (1..=10).map(|i| 1.0 / i as f64).sum();
        assert!((first - 1.0 / h).abs() < 0.02, "zipf share of model 0: {first}");
        assert!("zipf:0".parse::<Mix>().is_err() && "gamma:x".parse::<Arrival>().is_err());
    }
}
