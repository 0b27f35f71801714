//! Publish-to-receive latency histograms in shared memory (issue 17.1).
//!
//! One histogram per subscriber record, written by that subscriber's
//! consumer only, on its receive path: the latency of a received tensor is
//! the consumer's `CLOCK_MONOTONIC` now minus the timestamp the producer
//! stamped at publish. Every `sample_every`-th receive is recorded (the
//! broker's `[broker] latency_sample_every`, a power of two; a clock read
//! costs ~35 ns on the machines we measured, which every receive would
//! pay), so the counts are samples of the receives.
//!
//! Buckets are log-linear: four per octave from 128 ns to 2^34 ns
//! (~17 s), plus one below 128 ns and one above (109 in all, see
//! [`upper_bound_ns`]), so every bucket is at most 25 % wide. The single
//! writer updates with plain load + store (no locked instruction); a
//! reader (the broker, for stats) may see a count one sample ahead of the
//! sum or the buckets, which a statistics snapshot tolerates.

use std::sync::atomic::{AtomicU64, Ordering};

/// Buckets of a histogram: [`upper_bound_ns`] of the last is infinite.
pub const BUCKETS: usize = 110;

/// Sample mask of a histogram that records nothing.
pub const OFF: u64 = u64::MAX;

/// One subscriber's histogram.
#[repr(C)]
#[derive(Debug)]
pub struct LatencyHistogram {
    /// A receive is recorded when the consumer's delivered count `n` has
    /// `n & sample_mask == 0` (`sample_every - 1`; [`OFF`] records none).
    /// Written by the broker when it activates the record.
    pub sample_mask: AtomicU64,
    /// Samples recorded.
    pub count: AtomicU64,
    /// Sum of the recorded latencies, nanoseconds.
    pub sum_ns: AtomicU64,
    /// Samples per bucket.
    pub buckets: [AtomicU64; BUCKETS],
}

/// The bucket of a latency of `ns` nanoseconds.
#[inline]
pub fn bucket_of(ns: u64) -> usize {
    if ns < 128 {
        return 0;
    }
    let k = 63 - ns.leading_zeros() as usize; // floor(log2), >= 7
    let sub = ((ns >> (k - 2)) & 3) as usize;
    (1 + (k - 7) * 4 + sub).min(BUCKETS - 1)
}

/// The exclusive upper bound of bucket `i` in nanoseconds (`u64::MAX` for
/// the last, which has none).
pub fn upper_bound_ns(i: usize) -> u64 {
    if i == 0 {
        return 128;
    }
    if i >= BUCKETS - 1 {
        return u64::MAX;
    }
    let k = 7 + (i - 1) / 4;
    let sub = ((i - 1) % 4) as u64;
    (1u64 << k) + (sub + 1) * (1u64 << (k - 2))
}

impl LatencyHistogram {
    /// Clears the histogram and sets its sampling (broker, at activation,
    /// before the consumer learns of the record).
    pub fn reset(&self, sample_every: u32) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
        self.count.store(0, Ordering::Relaxed);
        self.sum_ns.store(0, Ordering::Relaxed);
        let mask = match sample_every {
            0 => OFF,
            n => u64::from(n.next_power_of_two()) - 1,
        };
        self.sample_mask.store(mask, Ordering::Relaxed);
    }

    /// Records one latency (the record's consumer only: single writer).
    #[inline]
    pub fn record(&self, ns: u64) {
        // Relaxed load + store: this consumer is the only writer, so no
        // update is lost; readers only take statistics snapshots.
        let b = &self.buckets[bucket_of(ns)];
        b.store(b.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        self.sum_ns.store(
            self.sum_ns.load(Ordering::Relaxed).wrapping_add(ns),
            Ordering::Relaxed,
        );
        self.count.store(
            self.count.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
    }

    /// The bucket counts, the count and the sum (a snapshot).
    pub fn snapshot(&self) -> (Vec<u64>, u64, u64) {
        let b = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        (
            b,
            self.count.load(Ordering::Relaxed),
            self.sum_ns.load(Ordering::Relaxed),
        )
    }
}

/// The `q`-quantile (0..=1) of bucket counts, as the upper bound of the
/// bucket it falls in (`None` without samples; `u64::MAX` in the last).
pub fn quantile(buckets: &[u64], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, &n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(upper_bound_ns(i));
        }
    }
    Some(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_100ns_to_10s_log_linearly() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(127), 0);
        assert_eq!(bucket_of(128), 1);
        // Every value lies below its bucket's bound and at or above the
        // previous one's, and buckets are at most 25 % wide.
        let mut ns = 1u64;
        while ns < 40_000_000_000 {
            let b = bucket_of(ns);
            assert!(ns < upper_bound_ns(b), "{ns} in {b}");
            if b > 0 {
                assert!(ns >= upper_bound_ns(b - 1), "{ns} in {b}");
            }
            if (1..BUCKETS - 1).contains(&b) {
                let lo = upper_bound_ns(b - 1);
                assert!((upper_bound_ns(b) - lo) * 4 <= lo, "bucket {b}");
            }
            ns = ns * 9 / 8 + 1;
        }
        assert!(upper_bound_ns(BUCKETS - 2) >= 10_000_000_000);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_come_from_the_buckets() {
        let h = LatencyHistogram {
            sample_mask: AtomicU64::new(0),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        };
        h.reset(1);
        for _ in 0..99 {
            h.record(1_000);
        }
        h.record(1_000_000);
        let (b, count, sum) = h.snapshot();
        assert_eq!((count, sum), (100, 99 * 1_000 + 1_000_000));
        let p50 = quantile(&b, 0.5).unwrap();
        assert!((1_000..=1_250).contains(&p50), "{p50}");
        assert_eq!(quantile(&b, 0.99), Some(p50));
        let p999 = quantile(&b, 0.999).unwrap();
        assert!((1_000_000..=1_250_000).contains(&p999), "{p999}");
        assert_eq!(quantile(&[0; BUCKETS], 0.5), None);
        h.reset(0);
        assert_eq!(h.sample_mask.load(Ordering::Relaxed), OFF);
        h.reset(10);
        assert_eq!(h.sample_mask.load(Ordering::Relaxed), 15);
    }
}
