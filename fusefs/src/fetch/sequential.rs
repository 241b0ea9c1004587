//! Read-ahead for sequential readers: a window that doubles on every refill, split into
//! several range requests fetched in parallel; chunks already on disk are loaded into
//! memory ahead of the reader instead. [`Sequential`] follows each file's reads and
//! says what to fetch next; the fetcher spawns it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use estargz::{Chunk, NodeId};
use tokio::sync::Semaphore;

use super::lock;
use crate::config::FsConfig;

/// Per-file sequential-access state, keyed by the file's node.
#[derive(Debug, Default, Clone, Copy)]
struct SeqState {
    /// Where the next sequential read is expected.
    next: u64,
    /// Where this run of sequential reads began.
    start: u64,
    /// Sequential reads in a row.
    run: u32,
    /// Read-ahead window, doubled on every refill.
    window: u64,
    /// File offset up to which read-ahead has been issued.
    issued: u64,
    /// A read of the file has waited for the network. Until then the file is being
    /// served from the cache (prefetched), and fetching ahead of it would be a guess:
    /// the kernel's own read-around of a mapped library looks sequential too.
    missed: bool,
}

/// Read-ahead stays this many seconds of the link's rate ahead of the reader.
const AHEAD_SECONDS: f64 = 0.25;

/// Files tracked for sequential access before the table is reset.
const SEQ_TABLE_MAX: usize = 4096;

/// Read-ahead to issue for one file.
pub(crate) struct Ahead {
    /// The file's bytes to have ahead of the reader.
    pub(crate) range: Range<u64>,
    /// Whether a read of the file has waited for the network: only then are chunks not
    /// local fetched ahead (those on disk are loaded into memory either way).
    pub(crate) missed: bool,
}

pub(crate) struct Sequential {
    files: Mutex<HashMap<NodeId, SeqState>>,
    /// Read-ahead requests (and disk loads) in flight at most.
    pub(crate) slots: Arc<Semaphore>,
    /// Read-ahead requests (and disk loads) a refill is split into.
    requests: usize,
    /// A read this close to the expected offset is still sequential (`max_read`).
    tolerance: u64,
    /// The first window.
    initial: u64,
    /// The largest window: the configured maximum, and at most half the memory cache
    /// (see [`Sequential::note_read`]).
    max: u64,
}

impl Sequential {
    /// Read-ahead as `config` says, for a memory cache of `memory_capacity` bytes.
    pub(crate) fn new(config: &FsConfig, memory_capacity: u64) -> Self {
        Sequential {
            files: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(config.readahead_requests.max(1))),
            requests: config.readahead_requests.max(1),
            tolerance: config.max_read as u64,
            initial: config.readahead_initial,
            max: config
                .readahead_max
                .min(memory_capacity / 2)
                .max(config.readahead_initial),
        }
    }

    /// Notes a read of `node` at `offset..end` (the file is `size` bytes); when the file
    /// is being read sequentially, returns the read-ahead to issue. `rate` is the link's
    /// rate in bytes a second, if known (asked only for a sequential read).
    pub(crate) fn note_read(
        &self,
        node: NodeId,
        (offset, end, size): (u64, u64, u64),
        rate: impl FnOnce() -> Option<f64>,
    ) -> Option<Ahead> {
        let mut seq = lock(&self.files);
        if seq.len() >= SEQ_TABLE_MAX && !seq.contains_key(&node) {
            seq.clear();
        }
        let st = seq.entry(node).or_default();
        // Within one maximal read of the expected offset still counts: the kernel's
        // read-ahead reaches us from several FUSE threads, slightly out of order.
        let tolerance = self.tolerance;
        if end <= st.next && offset.saturating_add(tolerance) >= st.next {
            // Re-reading just behind the front: neither progress nor a jump.
            return None;
        }
        if offset.abs_diff(st.next) <= tolerance {
            st.run = st.run.saturating_add(1);
            st.next = st.next.max(end);
        } else {
            *st = SeqState {
                next: end,
                start: offset,
                run: 1,
                ..SeqState::default()
            };
        }
        // Two sequential reads in a row before spending bandwidth on a guess.
        if st.run < 2 {
            return None;
        }
        // Ahead of the reader by what the link carries in a quarter of a second, or
        // by an eighth of what this run has read so far, whichever is more (at least
        // the first window, at most the configured maximum): enough to keep the
        // link busy, larger requests for a reader that goes on and on (a model
        // loaded whole), and little fetched in vain when a reader stops (32 MiB of
        // a 1 GiB file read over a slow link). On a fast link the maximum rules,
        // and half the memory cache: chunks fetched ahead wait there for the
        // reader, and a window the cache cannot hold would push them out to disk
        // before they are read (each then loaded and hashed again).
        let max = self.max;
        let cap = rate().map_or(max, |rate| {
            let by_rate = (rate * AHEAD_SECONDS) as u64;
            let by_run = st.next.saturating_sub(st.start) / 8;
            by_rate.max(by_run).clamp(self.initial, max)
        });
        if st.window == 0 {
            st.window = self.initial;
            st.issued = end;
        }
        st.window = st.window.min(cap);
        // Refill when less than half a window is left ahead of the reader.
        if st.issued >= size || st.issued > end.saturating_add(st.window / 2) {
            return None;
        }
        let from = st.issued.max(end);
        let to = end.saturating_add(st.window).min(size);
        st.issued = to;
        st.window = (st.window * 2).min(cap);
        (from < to).then_some(Ahead {
            range: from..to,
            missed: st.missed,
        })
    }

    /// A read of `node` at `offset` has to wait for the network: from now on its
    /// sequential reads are read ahead from the network too, starting here.
    pub(crate) fn note_miss(&self, node: NodeId, offset: u64) {
        let mut seq = lock(&self.files);
        if let Some(st) = seq.get_mut(&node)
            && !st.missed
        {
            st.missed = true;
            st.issued = st.issued.min(offset);
        }
    }

    /// Read-ahead of `node` passed over chunks it may fetch now (the container left its
    /// layer's record): from `offset` on, it fetches ahead again.
    pub(crate) fn rewind(&self, node: NodeId, offset: u64) {
        if let Some(st) = lock(&self.files).get_mut(&node) {
            st.issued = st.issued.min(offset);
        }
    }

    /// `chunks` (to fetch ahead, in file order) as one request's worth each, about equal
    /// in compressed bytes, so that they arrive in parallel.
    pub(crate) fn parts(&self, chunks: Vec<(NodeId, Chunk)>) -> Vec<Vec<(NodeId, Chunk)>> {
        let total: u64 = chunks.iter().map(|(_, c)| c.comp_len()).sum();
        let part = total.div_ceil(self.requests as u64);
        let mut parts: Vec<Vec<(NodeId, Chunk)>> = vec![Vec::new()];
        let mut acc = 0;
        for w in chunks {
            if acc >= part && parts.last().is_some_and(|p| !p.is_empty()) {
                parts.push(Vec::new());
                acc = 0;
            }
            acc += w.1.comp_len();
            if let Some(p) = parts.last_mut() {
                p.push(w);
            }
        }
        parts
    }

    /// `chunks` (on disk, to load into memory ahead of the reader) as one disk load's
    /// worth each, about equal in number.
    pub(crate) fn disk_parts(&self, chunks: &[Chunk]) -> Vec<Vec<Chunk>> {
        if chunks.is_empty() {
            return Vec::new();
        }
        let per = chunks.len().div_ceil(self.requests);
        chunks.chunks(per).map(<[Chunk]>::to_vec).collect()
    }
}
