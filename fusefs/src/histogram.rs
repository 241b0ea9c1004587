//! Lock-free latency histograms of FUSE operations, for metrics.
//!
//! Fixed buckets keep recording to two relaxed atomic adds (no lock on the FUSE
//! threads) and let the daemon sum histograms across layers bucket by bucket.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the finite buckets, in nanoseconds; a last bucket takes the rest.
const BOUNDS_NANOS: [u64; 10] = [
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
];

/// A snapshot of one operation's latency histogram, in the Prometheus shape.
#[derive(Debug, Clone, PartialEq)]
pub struct OpHistogram {
    /// The FUSE operation ("lookup", "read", ...).
    pub op: &'static str,
    /// Cumulative counts by upper bound in seconds, ascending; the last bound is +∞.
    pub buckets: Vec<(f64, u64)>,
    /// Operations recorded (equals the +∞ bucket).
    pub count: u64,
    /// Total time of the recorded operations.
    pub sum_seconds: f64,
}

impl OpHistogram {
    /// Adds `other`'s observations (same operation and bounds) to this one.
    pub fn merge(&mut self, other: &OpHistogram) {
        debug_assert_eq!(self.op, other.op);
        debug_assert_eq!(self.buckets.len(), other.buckets.len());
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            mine.1 += theirs.1;
        }
        self.count += other.count;
        self.sum_seconds += other.sum_seconds;
    }
}

/// One operation's histogram: a count per bucket (not cumulative) and the sum.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    counts: [AtomicU64; BOUNDS_NANOS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub(crate) fn record(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // Prometheus buckets are `le`: a value equal to a bound belongs to it.
        let i = BOUNDS_NANOS.partition_point(|&b| b < nanos);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, op: &'static str) -> OpHistogram {
        let mut cumulative = 0;
        let buckets = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                cumulative += c.load(Ordering::Relaxed);
                let le = BOUNDS_NANOS
                    .get(i)
                    .map_or(f64::INFINITY, |&b| b as f64 / 1e9);
                (le, cumulative)
            })
            .collect();
        OpHistogram {
            op,
            buckets,
            // From the buckets rather than a separate counter, so the two always agree.
            count: cumulative,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// The FUSE operations whose latency is recorded.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    Lookup,
    Getattr,
    Readlink,
    Open,
    Read,
    Opendir,
    Readdir,
    Readdirplus,
    Statfs,
    Getxattr,
    Listxattr,
    Access,
}

const OPS: [(Op, &str); 12] = [
    (Op::Lookup, "lookup"),
    (Op::Getattr, "getattr"),
    (Op::Readlink, "readlink"),
    (Op::Open, "open"),
    (Op::Read, "read"),
    (Op::Opendir, "opendir"),
    (Op::Readdir, "readdir"),
    (Op::Readdirplus, "readdirplus"),
    (Op::Statfs, "statfs"),
    (Op::Getxattr, "getxattr"),
    (Op::Listxattr, "listxattr"),
    (Op::Access, "access"),
];

/// A histogram per operation of one mounted layer.
#[derive(Debug, Default)]
pub(crate) struct OpLatencies {
    ops: [Histogram; OPS.len()],
}

impl OpLatencies {
    pub(crate) fn record(&self, op: Op, d: Duration) {
        self.ops[op as usize].record(d);
    }

    pub(crate) fn snapshot(&self) -> Vec<OpHistogram> {
        OPS.iter()
            .map(|&(op, name)| self.ops[op as usize].snapshot(name))
            .collect()
    }

    /// Starts timing one request; it is recorded when the timer drops, which the
    /// adapter arranges to be after the reply (in the replying task for deferred reads).
    pub(crate) fn start(self: &Arc<Self>, op: Op) -> OpTimer {
        OpTimer {
            latencies: Arc::clone(self),
            op,
            start: Instant::now(),
        }
    }
}

pub(crate) struct OpTimer {
    latencies: Arc<OpLatencies>,
    op: Op,
    start: Instant,
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        self.latencies.record(self.op, self.start.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_le() {
        let h = Histogram::default();
        for d in [
            Duration::from_micros(50),  // <= 0.0001
            Duration::from_micros(100), // exactly on a bound: that bucket
            Duration::from_micros(101), // <= 0.0005
            Duration::from_millis(3),   // <= 0.005
            Duration::from_secs(2),     // <= 5
            Duration::from_secs(60),    // +Inf only
        ] {
            h.record(d);
        }
        let s = h.snapshot("read");
        assert_eq!(s.op, "read");
        let expected = [
            (0.0001, 2),
            (0.0005, 3),
            (0.001, 3),
            (0.005, 4),
            (0.01, 4),
            (0.05, 4),
            (0.1, 4),
            (0.5, 4),
            (1.0, 4),
            (5.0, 5),
            (f64::INFINITY, 6),
        ];
        assert_eq!(s.buckets, expected);
        assert_eq!(s.count, 6);
        let sum = 0.000_05 + 0.000_1 + 0.000_101 + 0.003 + 2.0 + 60.0;
        assert!((s.sum_seconds - sum).abs() < 1e-9, "{}", s.sum_seconds);
    }

    #[test]
    fn merge_adds_bucketwise() {
        let (a, b) = (Histogram::default(), Histogram::default());
        a.record(Duration::from_micros(10));
        b.record(Duration::from_millis(20));
        b.record(Duration::from_millis(20));
        let mut m = a.snapshot("lookup");
        m.merge(&b.snapshot("lookup"));
        assert_eq!(m.count, 3);
        assert_eq!(m.buckets[0], (0.0001, 1));
        assert_eq!(m.buckets[4], (0.01, 1));
        assert_eq!(m.buckets[5], (0.05, 3));
        assert!((m.sum_seconds - 0.040_01).abs() < 1e-9);
    }

    #[test]
    fn timer_records_each_op_separately() {
        let l = Arc::new(OpLatencies::default());
        drop(l.start(Op::Read));
        drop(l.start(Op::Read));
        drop(l.start(Op::Lookup));
        let snap = l.snapshot();
        let count = |name| snap.iter().find(|h| h.op == name).unwrap().count;
        assert_eq!(
            (count("read"), count("lookup"), count("getattr")),
            (2, 1, 0)
        );
        assert_eq!(snap.len(), OPS.len());
    }
}
