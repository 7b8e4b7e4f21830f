//! A latency histogram for the load generator: fixed log-linear buckets in nanoseconds (exact
//! below 256 ns, then 128 buckets per power of two, so any percentile is within 0.8 %), one
//! per client thread with no allocation after creation, merged when the threads are joined.

use std::time::Duration;

/// Sub-buckets per power of two: 2^7 = 128, a relative error under 1/128.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Largest value kept apart: 2^40 ns, about 18 minutes; longer values land in the last bucket.
const MAX_BITS: u32 = 40;
const BUCKETS: usize = (2 * SUB + (MAX_BITS - SUB_BITS - 1) as u64 * SUB) as usize;

#[derive(Clone)]
pub(crate) struct Histogram {
    counts: Vec<u32>,
    total: u64,
    sum_ns: u64,
    max_ns: u64,
}

impl Histogram {
    pub(crate) fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }

    pub(crate) fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[index(ns)] += 1;
        self.total += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Samples recorded.
    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    /// The value below which a share `q` (0..=1) of the samples lie, as the middle of its
    /// bucket; zero when there are no samples.
    pub(crate) fn quantile(&self, q: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                let (low, width) = bounds(i);
                return Duration::from_nanos((low + width / 2).min(self.max_ns));
            }
        }
        Duration::from_nanos(self.max_ns)
    }

    pub(crate) fn p50(&self) -> Duration {
        self.quantile(0.50)
    }

    pub(crate) fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    pub(crate) fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    pub(crate) fn mean(&self) -> Duration {
        match self.total {
            0 => Duration::ZERO,
            n => Duration::from_nanos(self.sum_ns / n),
        }
    }
}

/// The bucket of `ns`.
fn index(ns: u64) -> usize {
    let ns = ns.min((1 << MAX_BITS) - 1);
    if ns < 2 * SUB {
        return ns as usize;
    }
    let msb = 63 - ns.leading_zeros();
    let shift = msb - SUB_BITS;
    let sub = (ns >> shift) - SUB;
    (2 * SUB + u64::from(shift - 1) * SUB + sub) as usize
}

/// The lowest value of bucket `i` and its width.
fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < 2 * SUB {
        return (i, 1);
    }
    let j = i - 2 * SUB;
    let shift = j / SUB + 1;
    ((SUB + j % SUB) << shift, 1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_the_bucket_that_holds_it() {
        for ns in (0..5000).chain([123_456, 1 << 20, 987_654_321, (1 << MAX_BITS) - 1]) {
            let (low, width) = bounds(index(ns));
            assert!(low <= ns && ns < low + width, "{ns} in [{low}, +{width})");
        }
        assert_eq!(index((1 << MAX_BITS) - 1), BUCKETS - 1);
    }

    #[test]
    fn quantiles_are_within_one_percent() {
        let mut h = Histogram::new();
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        let near = |got: Duration, want_us: f64| {
            let got = got.as_nanos() as f64 / 1000.0;
            assert!(
                (got - want_us).abs() / want_us < 0.01,
                "{got} µs vs {want_us} µs"
            );
        };
        near(h.p50(), 5000.0);
        near(h.p99(), 9900.0);
        near(h.mean(), 5000.5);
        assert_eq!(h.max(), Duration::from_millis(10));
        let mut other = Histogram::new();
        other.record(Duration::from_secs(1));
        h.merge(&other);
        assert_eq!(h.count(), 10_001);
        assert_eq!(h.quantile(1.0), Duration::from_secs(1));
        assert_eq!(Histogram::new().p99(), Duration::ZERO);
    }
}
