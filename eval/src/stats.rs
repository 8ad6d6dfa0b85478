//! Seeded resampling: bootstrap confidence intervals of means and paired tests between runs.

/// The workspace's seeded generator (reports are reproducible).
pub use ragway_engine::rng::SplitMix64 as Rng;

pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// The q-quantile of sorted values with linear interpolation (numpy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Percentile bootstrap 95% interval of the mean.
pub fn bootstrap_ci(xs: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = Rng::new(seed);
    let n = xs.len();
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).map(|_| xs[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    (quantile(&means, 0.025), quantile(&means, 0.975))
}

/// A paired comparison of two runs on the same samples (b − a).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Paired {
    pub n: usize,
    pub delta: f64,
    /// Paired bootstrap 95% interval of the mean difference.
    pub ci95: (f64, f64),
    /// Two-sided paired permutation (sign-flip) test of a zero mean difference.
    pub p_value: f64,
}

pub fn paired(a: &[f64], b: &[f64], resamples: usize, seed: u64) -> Paired {
    assert_eq!(a.len(), b.len(), "paired samples");
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let n = d.len();
    if n == 0 {
        return Paired { n, delta: f64::NAN, ci95: (f64::NAN, f64::NAN), p_value: f64::NAN };
    }
    let delta = mean(&d);
    let ci95 = bootstrap_ci(&d, resamples, seed);
    let observed = delta.abs();
    let mut rng = Rng::new(seed ^ 0x5EED);
    let mut extreme = 0usize;
    for _ in 0..resamples {
        let s: f64 = d.iter().map(|x| if rng.next_u64() & 1 == 1 { *x } else { -*x }).sum::<f64>() / n as f64;
        // A small tolerance keeps exact ties (all-zero differences) counted as extreme.
        if s.abs() >= observed - 1e-12 {
            extreme += 1;
        }
    }
    let p_value = (extreme + 1) as f64 / (resamples + 1) as f64;
    Paired { n, delta, ci95, p_value }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert!((quantile(&v, 0.5) - 2.5).abs() < 1e-12);
        // numpy.percentile([1,2,3,4], 2.5) = 1.075
        assert!((quantile(&v, 0.025) - 1.075).abs() < 1e-12);
    }

    #[test]
    fn bootstrap_is_seeded_and_brackets_the_mean() {
        let xs: Vec<f64> = (0..200).map(|i| (i % 2) as f64).collect();
        let a = bootstrap_ci(&xs, 1000, 7);
        assert_eq!(a, bootstrap_ci(&xs, 1000, 7));
        assert!(a.0 < 0.5 && a.1 > 0.5, "{a:?}");
        // Binomial sd of the mean: sqrt(0.25/200) ≈ 0.035; the 95% half-width ≈ 0.069.
        assert!(((a.1 - a.0) / 2.0 - 0.069).abs() < 0.015, "{a:?}");
        let c = bootstrap_ci(&[0.3; 10], 100, 1);
        assert!((c.0 - 0.3).abs() < 1e-12 && (c.1 - 0.3).abs() < 1e-12);
    }

    #[test]
    fn paired_tests_see_real_differences_only() {
        let a: Vec<f64> = (0..100).map(|i| (i % 3) as f64 / 2.0).collect();
        let same = paired(&a, &a, 2000, 3);
        assert_eq!(same.delta, 0.0);
        assert!(same.p_value > 0.99);
        let better: Vec<f64> = a.iter().map(|x| x + 0.1).collect();
        let p = paired(&a, &better, 2000, 3);
        assert!((p.delta - 0.1).abs() < 1e-12 && p.p_value < 0.01 && p.ci95.0 > 0.0, "{p:?}");
        // Noise without a shift: not significant.
        let mut rng = Rng::new(9);
        let noisy: Vec<f64> = a.iter().map(|x| x + if rng.next_u64() & 1 == 0 { 0.2 } else { -0.2 }).collect();
        let q = paired(&a, &noisy, 2000, 3);
        assert!(q.p_value > 0.05 && q.ci95.0 < 0.0 && q.ci95.1 > 0.0, "{q:?}");
    }
}
