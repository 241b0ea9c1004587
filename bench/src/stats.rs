//! Summaries of repeated timings: median and range, which say more than a mean on a
//! shared, noisy machine.

use std::time::Duration;

/// Repeated measurements of one thing.
#[derive(Clone, Debug, Default)]
pub struct Samples(pub Vec<Duration>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn sorted(&self) -> Vec<Duration> {
        let mut v = self.0.clone();
        v.sort();
        v
    }

    /// The middle sample (mean of the two middle ones for an even count); zero if empty.
    pub fn median(&self) -> Duration {
        let v = self.sorted();
        match v.len() {
            0 => Duration::ZERO,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2,
        }
    }

    pub fn min(&self) -> Duration {
        self.sorted().first().copied().unwrap_or_default()
    }

    pub fn max(&self) -> Duration {
        self.sorted().last().copied().unwrap_or_default()
    }
}

/// MB/s (10^6 bytes) of `bytes` in `d`.
pub fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let s = |ms: &[u64]| Samples(ms.iter().map(|&m| Duration::from_millis(m)).collect());
        assert_eq!(s(&[30, 10, 20]).median(), Duration::from_millis(20));
        assert_eq!(s(&[40, 10, 20, 30]).median(), Duration::from_millis(25));
        assert_eq!(s(&[30, 10, 20]).min(), Duration::from_millis(10));
        assert_eq!(s(&[30, 10, 20]).max(), Duration::from_millis(30));
        assert_eq!(s(&[]).median(), Duration::ZERO);
        assert!((mb_per_s(50_000_000, Duration::from_secs(2)) - 25.0).abs() < 1e-9);
    }
}
