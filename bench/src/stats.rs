//! Order statistics of repeated measurements.

use serde_json::{Value, json};

#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p25: f64,
    pub median: f64,
    pub p75: f64,
    pub p99: f64,
    pub max: f64,
}

/// Linear-interpolated quantile of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Summary {
    pub fn of(values: &[f64]) -> Summary {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Summary { median: f64::NAN, ..Summary::default() };
        }
        Summary {
            n: v.len(),
            min: v[0],
            p25: quantile(&v, 0.25),
            median: quantile(&v, 0.5),
            p75: quantile(&v, 0.75),
            p99: quantile(&v, 0.99),
            max: v[v.len() - 1],
        }
    }

    /// Interquartile range relative to the median, in percent.
    pub fn iqr_pct(&self) -> f64 {
        if self.median > 0.0 { (self.p75 - self.p25) / self.median * 100.0 } else { f64::NAN }
    }

    pub fn json(&self) -> Value {
        json!({"n": self.n, "min": self.min, "p25": self.p25, "median": self.median, "p75": self.p75, "p99": self.p99, "max": self.max})
    }
}

/// A distribution-free 95% confidence interval of the median: the order
/// statistics at ranks n/2 − 0.98·√n and 1 + n/2 + 0.98·√n, rounded (the
/// normal approximation of the binomial). None below 6 values, where it
/// would be the whole range.
pub fn median_ci95(values: &[f64]) -> Option<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.len() < 6 {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let half = 0.98 * n.sqrt();
    // 1-based ranks, clamped to the sample.
    let lo = ((n / 2.0 - half).round() as usize).max(1);
    let hi = ((1.0 + n / 2.0 + half).round() as usize).min(v.len());
    Some((v[lo - 1], v[hi - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(s.median, 3.0);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 5.0);
        assert_eq!(s.p25, 2.0);
        assert!(Summary::of(&[]).median.is_nan());
    }

    #[test]
    fn median_ci_uses_the_binomial_ranks() {
        // The ranks tables of the sign test give: 14 and 27 for n = 40, 6
        // and 15 for n = 20 (values 1..=n, so a value is its rank).
        let v: Vec<f64> = (1..=40).map(f64::from).collect();
        assert_eq!(median_ci95(&v), Some((14.0, 27.0)));
        let v: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(median_ci95(&v), Some((6.0, 15.0)));
        assert_eq!(median_ci95(&[1.0, 2.0, 3.0, 4.0, 5.0]), None);
    }
}
