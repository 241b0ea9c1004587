//! Counters of one mounted layer, for metrics.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::histogram::OpHistogram;

/// A snapshot of a layer's counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Compressed bytes received from the blob.
    pub bytes_fetched: u64,
    /// Range requests sent to the blob.
    pub range_requests: u64,
    /// Chunks served from memory or disk.
    pub cache_hits: u64,
    /// Chunks that had to be fetched (or waited for while another reader fetched them).
    pub cache_misses: u64,
    /// Chunks whose bytes did not inflate or did not match their digest.
    pub verification_failures: u64,
    /// Range requests that failed (error, short read, timeout).
    pub fetch_errors: u64,
    /// Decompressed bytes of the layer's distinct chunks held locally.
    pub local_bytes: u64,
    /// Decompressed bytes of all the layer's distinct chunks.
    pub total_bytes: u64,
    /// The prioritized range has been handled (fetched, failed, or there was none).
    pub prefetch_done: bool,
    /// The background fetch has gone through the whole layer (or is disabled).
    pub background_done: bool,
    /// Latency of the FUSE operations, from the request's arrival to its reply; empty
    /// for a [`crate::LayerFs`] that is not mounted.
    pub op_latency: Vec<OpHistogram>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub bytes_fetched: AtomicU64,
    pub range_requests: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub verification_failures: AtomicU64,
    pub fetch_errors: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
