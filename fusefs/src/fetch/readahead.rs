//! Read-ahead for sequential readers: a window that doubles on every refill, split into
//! several range requests fetched in parallel; chunks already on disk are loaded into
//! memory ahead of the reader instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use estargz::{Chunk, NodeId};
use tokio::sync::Semaphore;

use super::{Fetcher, Purpose, lock};

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

pub(crate) struct Sequential {
    files: Mutex<HashMap<NodeId, SeqState>>,
    /// Read-ahead requests (and disk loads) in flight at most.
    slots: Arc<Semaphore>,
}

impl Sequential {
    pub(crate) fn new(requests: usize) -> Self {
        Sequential {
            files: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(requests.max(1))),
        }
    }
}

impl Fetcher {
    /// Notes a read of `node` at `offset..end` and, when the file is being read
    /// sequentially, issues read-ahead.
    pub(super) fn note_read(self: &Arc<Self>, node: NodeId, offset: u64, end: u64, size: u64) {
        let issue = {
            let mut seq = lock(&self.seq.files);
            if seq.len() >= SEQ_TABLE_MAX && !seq.contains_key(&node) {
                seq.clear();
            }
            let st = seq.entry(node).or_default();
            // Within one maximal read of the expected offset still counts: the kernel's
            // read-ahead reaches us from several FUSE threads, slightly out of order.
            let tolerance = self.config.max_read as u64;
            if end <= st.next && offset.saturating_add(tolerance) >= st.next {
                // Re-reading just behind the front: neither progress nor a jump.
                return;
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
                return;
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
            let max = self
                .config
                .readahead_max
                .min(self.cache.memory_capacity() / 2)
                .max(self.config.readahead_initial);
            let cap = self.link.rate().map_or(max, |rate| {
                let by_rate = (rate * AHEAD_SECONDS) as u64;
                let by_run = st.next.saturating_sub(st.start) / 8;
                by_rate
                    .max(by_run)
                    .clamp(self.config.readahead_initial, max)
            });
            if st.window == 0 {
                st.window = self.config.readahead_initial;
                st.issued = end;
            }
            st.window = st.window.min(cap);
            // Refill when less than half a window is left ahead of the reader.
            if st.issued >= size || st.issued > end.saturating_add(st.window / 2) {
                return;
            }
            let from = st.issued.max(end);
            let to = end.saturating_add(st.window).min(size);
            st.issued = to;
            st.window = (st.window * 2).min(cap);
            (from..to, st.missed)
        };
        if issue.0.is_empty() {
            return;
        }
        let (issue, missed) = issue;
        let mut chunks: Vec<(NodeId, Chunk)> = Vec::new();
        let mut on_disk: Vec<Chunk> = Vec::new();
        for c in self
            .layer
            .chunks_for_range(node, issue.start, issue.end - issue.start)
        {
            if c.zeros || self.cache.in_memory(&c.digest) {
                continue;
            }
            if self.cache.contains(&c.digest) {
                on_disk.push(*c);
            } else if missed {
                chunks.push((node, *c));
            }
        }
        self.load_ahead(on_disk);
        if chunks.is_empty() {
            return;
        }
        let total: u64 = chunks.iter().map(|(_, c)| c.comp_len()).sum();
        let part = total.div_ceil(self.config.readahead_requests.max(1) as u64);
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
        for part in parts {
            let this = Arc::clone(self);
            let slots = Arc::clone(&self.seq.slots);
            self.handle.spawn(async move {
                let Ok(_permit) = slots.acquire_owned().await else {
                    return;
                };
                if let Err(e) = this.chunks(&part, Purpose::ReadAhead).await {
                    tracing::debug!(layer = %this.name, error = %e, "read-ahead failed");
                }
            });
        }
    }

    /// A read of `node` at `offset` has to wait for the network: from now on its
    /// sequential reads are read ahead from the network too, starting here.
    pub(super) fn note_miss(&self, node: NodeId, offset: u64) {
        let mut seq = lock(&self.seq.files);
        if let Some(st) = seq.get_mut(&node)
            && !st.missed
        {
            st.missed = true;
            st.issued = st.issued.min(offset);
        }
    }

    /// Read-ahead of chunks that are in the disk cache but not in memory: loads them
    /// into memory on blocking threads (as many at once as read-ahead requests), so the
    /// reader's FUSE requests find them there instead of each waiting for a chunk file
    /// to be read and hashed; disk and CPU work then overlap with the reader's.
    fn load_ahead(self: &Arc<Self>, chunks: Vec<Chunk>) {
        if chunks.is_empty() {
            return;
        }
        let parts = self.config.readahead_requests.max(1);
        let per = chunks.len().div_ceil(parts);
        for part in chunks.chunks(per) {
            let part = part.to_vec();
            let cache = self.cache.clone();
            let slots = Arc::clone(&self.seq.slots);
            self.handle.spawn(async move {
                let Ok(_permit) = slots.acquire_owned().await else {
                    return;
                };
                let load = move || {
                    for c in part {
                        // A miss (evicted, corrupt) is left to the reader, who fetches.
                        let _ = cache.get(&c.digest, c.size);
                    }
                };
                if let Err(e) = tokio::task::spawn_blocking(load).await {
                    tracing::debug!(error = %e, "disk read-ahead task failed");
                }
            });
        }
    }
}
