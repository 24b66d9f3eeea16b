//! A log-bucketed latency histogram in the manner of HdrHistogram: fixed memory, O(1) branch-free record, bounded
//! relative error.
//!
//! Values below 128 have a bucket each. Above, every power of two `[2^k, 2^(k+1))` is cut into 64 equal buckets, so
//! a bucket is at most 1/64 (1.6 %) of the values it holds wide. Every `u64` has a bucket (3,776 of them; the count
//! array is 4,096 long so the index can be masked instead of bounds-checked). Exact count, sum, minimum and maximum
//! are kept beside the buckets.

/// log2 of the buckets per power of two.
const SUB_BITS: u32 = 6;
/// Buckets per power of two.
const SUB: u64 = 1 << SUB_BITS;
/// Length of the count array (a power of two above the 3,776 buckets a `u64` needs).
const SLOTS: usize = 4096;

/// Bucket index of `v`.
#[inline(always)]
fn index_of(v: u64) -> usize {
    // For v < 128, `v | 127` has its top bit at 6, so shift = 0 and the index is v itself.
    let msb = 63 - (v | (2 * SUB - 1)).leading_zeros();
    let shift = msb - SUB_BITS;
    ((u64::from(shift) << SUB_BITS) + (v >> shift)) as usize
}

/// Smallest value in bucket `idx`, and the bucket's width.
fn bucket_range(idx: usize) -> (u64, u64) {
    let idx = idx as u64;
    if idx < 2 * SUB {
        return (idx, 1);
    }
    let shift = idx / SUB - 1;
    let mantissa = idx % SUB + SUB;
    (mantissa << shift, 1u64 << shift)
}

/// Latency histogram (values in TSC ticks, but it does not care).
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64; SLOTS]>,
    count: u64,
    sum: u64,
    min: u64,
    max: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram").field("count", &self.count).field("min", &self.min).field("max", &self.max).finish()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram (32 KiB, allocated here and never again).
    pub fn new() -> Histogram {
        Histogram { counts: Box::new([0; SLOTS]), count: 0, sum: 0, min: u64::MAX, max: 0 }
    }

    /// Record one value.
    #[inline(always)]
    pub fn record(&mut self, v: u64) {
        self.counts[index_of(v) & (SLOTS - 1)] += 1;
        self.count += 1;
        self.sum = self.sum.wrapping_add(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Values recorded.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Smallest value (0 when empty).
    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }
    /// Largest value.
    pub fn max(&self) -> u64 {
        self.max
    }
    /// Mean (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The value at or below which `pct` percent of the values lie: the upper edge of the bucket where the running
    /// count reaches that share, clamped to the exact minimum and maximum. 0 when empty.
    pub fn percentile(&self, pct: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let want = ((pct / 100.0) * self.count as f64).ceil().clamp(1.0, self.count as f64) as u64;
        let mut seen = 0u64;
        for (idx, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                let (lo, width) = bucket_range(idx);
                let hi = lo.saturating_add(width - 1);
                return hi.clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// Add another histogram's values into this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += *b;
        }
        self.count += other.count;
        self.sum = self.sum.wrapping_add(other.sum);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut prev = 0usize;
        for v in (0u64..100_000).chain([u64::MAX / 2, u64::MAX - 1, u64::MAX]) {
            let i = index_of(v);
            assert!(i < SLOTS);
            let (lo, w) = bucket_range(i);
            assert!(lo <= v && v - lo < w, "v {v} idx {i} lo {lo} w {w}");
            if v < 100_000 {
                assert!(i == prev || i == prev + 1, "gap at {v}");
                prev = i;
            }
            if v >= 128 {
                assert!(w * 64 <= lo, "bucket too wide at {v}");
            }
        }
        assert_eq!(index_of(u64::MAX), 3775);
    }

    #[test]
    fn percentiles_match_a_sorted_model() {
        let mut h = Histogram::new();
        let mut model = Vec::new();
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = 100 + (x % 1_000_000);
            h.record(v);
            model.push(v);
        }
        model.sort_unstable();
        for pct in [50.0, 90.0, 99.0, 99.9, 99.99] {
            let exact = model[((pct / 100.0 * model.len() as f64).ceil() as usize).max(1) - 1];
            let got = h.percentile(pct);
            let err = (got as f64 - exact as f64).abs() / exact as f64;
            assert!(err <= 1.0 / 64.0 + 1e-9, "p{pct}: got {got}, exact {exact}");
            assert!(got >= exact);
        }
        assert_eq!(h.min(), model[0]);
        assert_eq!(h.max(), *model.last().unwrap());
        let mean = model.iter().sum::<u64>() as f64 / model.len() as f64;
        assert!((h.mean() - mean).abs() < 1e-6 * mean);
    }

    #[test]
    fn merge_and_empty() {
        let mut a = Histogram::new();
        assert_eq!(a.percentile(50.0), 0);
        assert_eq!(a.min(), 0);
        let mut b = Histogram::new();
        a.record(10);
        b.record(1000);
        b.record(2000);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.min(), 10);
        assert_eq!(a.max(), 2000);
        assert_eq!(a.percentile(100.0), 2000);
        assert_eq!(a.percentile(1.0), 10);
    }
}
