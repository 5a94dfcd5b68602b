//! Order statistics and logarithmic histograms of detour (or lost-time) durations.

/// Summary of a set of durations in nanoseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct DurationStats {
    /// How many.
    pub count: usize,
    /// Sum, ns.
    pub total_ns: u64,
    /// Median, ns.
    pub p50_ns: u64,
    /// 99th percentile, ns.
    pub p99_ns: u64,
    /// 99.9th percentile, ns.
    pub p999_ns: u64,
    /// Largest, ns.
    pub max_ns: u64,
}

/// Nearest-rank percentile of sorted data (`q` in 0..=1).
pub fn percentile_sorted(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarise durations.
pub fn duration_stats(durations: &[u64]) -> DurationStats {
    let mut v = durations.to_vec();
    v.sort_unstable();
    DurationStats {
        count: v.len(),
        total_ns: v.iter().sum(),
        p50_ns: percentile_sorted(&v, 0.5),
        p99_ns: percentile_sorted(&v, 0.99),
        p999_ns: percentile_sorted(&v, 0.999),
        max_ns: v.last().copied().unwrap_or(0),
    }
}

/// A histogram with logarithmic bins (`per_decade` bins per factor of ten).
#[derive(Debug, Clone, PartialEq)]
pub struct LogHistogram {
    /// `(lower_ns, upper_ns, count)` per bin, ascending, covering the data.
    pub bins: Vec<(f64, f64, u64)>,
}

/// Build a logarithmic histogram of durations (zeros are left out).
pub fn log_histogram(durations: &[u64], per_decade: u32) -> LogHistogram {
    let pos: Vec<f64> = durations
        .iter()
        .filter(|&&d| d > 0)
        .map(|&d| d as f64)
        .collect();
    if pos.is_empty() {
        return LogHistogram { bins: Vec::new() };
    }
    let step = 1.0 / f64::from(per_decade.max(1));
    let lo = pos.iter().cloned().fold(f64::INFINITY, f64::min).log10();
    let hi = pos.iter().cloned().fold(0.0, f64::max).log10();
    let first = (lo / step).floor() as i64;
    let last = (hi / step).floor() as i64;
    let mut bins: Vec<(f64, f64, u64)> = (first..=last)
        .map(|k| {
            (
                10f64.powf(k as f64 * step),
                10f64.powf((k + 1) as f64 * step),
                0,
            )
        })
        .collect();
    for d in pos {
        let k = ((d.log10() / step).floor() as i64 - first).clamp(0, bins.len() as i64 - 1);
        bins[k as usize].2 += 1;
    }
    LogHistogram { bins }
}

/// Human form of a duration in nanoseconds.
pub fn human_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} us", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_histogram() {
        let d: Vec<u64> = (1..=1000).collect();
        let s = duration_stats(&d);
        assert_eq!(
            (s.p50_ns, s.p99_ns, s.p999_ns, s.max_ns),
            (500, 990, 999, 1000)
        );
        assert_eq!(s.total_ns, 500_500);
        let h = log_histogram(&[10, 20, 150, 999, 1000, 0], 1);
        let counts: Vec<u64> = h.bins.iter().map(|b| b.2).collect();
        assert_eq!(counts, vec![2, 2, 1]);
        assert_eq!(duration_stats(&[]).max_ns, 0);
    }
}
