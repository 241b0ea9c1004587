//! What is fetched without a reader waiting for it, in the link's order of precedence:
//! the neighbours of a miss (beside the demand, sized by how often they turn out to be
//! read), the prefetch of what the layer says its container reads first, and the
//! background fetch of the rest, which only runs when the registry host's link is quiet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use estargz::{Chunk, Digest, NodeId};

use super::blob_order::{self, coalesce};
use super::{Fetcher, Purpose, lock};
use crate::link::Class;

/// Neighbour chunks fetched and not yet read, remembered at most (a bound on memory:
/// a layer read at random forgets them sooner).
const PENDING_MAX: usize = 1 << 16;

/// The neighbour fetch of one layer: its window and how well it has been doing.
pub(crate) struct Neighbours {
    /// Configured window: the largest, and the starting one.
    max: u64,
    judge: Mutex<Judge>,
    /// Whether `judge.pending` may hold anything: every read asks, and most layers
    /// (neighbours off, or all read) never need the lock.
    pending_any: AtomicBool,
}

/// Neighbour fetches pay off when a directory is read file after file (a python import
/// reads a package's modules one after another) and waste the link when a file is read
/// at random. The window halves while fewer than a quarter of the neighbour bytes are
/// read, and doubles back while at least half are.
struct Judge {
    window: u64,
    /// Compressed bytes fetched as neighbours, and of those, read since.
    fetched: u64,
    used: u64,
    /// Neighbour chunks not read yet, with their compressed length.
    pending: HashMap<Digest, u64>,
}

impl Neighbours {
    pub(crate) fn new(max: u64) -> Self {
        Neighbours {
            max,
            judge: Mutex::new(Judge {
                window: max,
                fetched: 0,
                used: 0,
                pending: HashMap::new(),
            }),
            pending_any: AtomicBool::new(false),
        }
    }

    fn min(&self) -> u64 {
        (self.max / 16).max(1)
    }

    /// A read of `wants`: neighbours among them were worth fetching.
    pub(crate) fn note_used(&self, wants: &[(NodeId, Chunk)]) {
        if !self.pending_any.load(Ordering::Relaxed) {
            return;
        }
        let mut j = lock(&self.judge);
        for (_, c) in wants {
            if let Some(len) = j.pending.remove(&c.digest) {
                j.used += len;
            }
        }
        if j.pending.is_empty() {
            self.pending_any.store(false, Ordering::Relaxed);
        }
    }

    /// The window for the next neighbour fetch, judging the ones before once enough
    /// bytes (four windows) have been fetched to tell.
    fn window(&self) -> u64 {
        let mut j = lock(&self.judge);
        if j.window > 0 && j.fetched >= 4 * j.window {
            if j.used * 4 < j.fetched {
                j.window = (j.window / 2).max(self.min());
            } else if j.used * 2 >= j.fetched {
                j.window = (j.window * 2).min(self.max);
            }
            j.fetched = 0;
            j.used = 0;
        }
        j.window
    }

    fn fetching(&self, chunks: impl Iterator<Item = Chunk>) {
        let mut j = lock(&self.judge);
        if j.pending.len() >= PENDING_MAX {
            j.pending.clear();
        }
        for c in chunks {
            j.pending.insert(c.digest, c.comp_len());
            j.fetched += c.comp_len();
        }
        self.pending_any
            .store(!j.pending.is_empty(), Ordering::Relaxed);
    }
}

impl Fetcher {
    /// Prefetch, then the background fetch, as the config says; started once a layer is
    /// mounted. A mount means a container is on its way: the link's quiet period starts
    /// again.
    pub(crate) async fn run_scheduled(self: Arc<Self>) {
        self.link.mounted();
        if self.config.prefetch {
            self.prefetch().await;
        }
        self.prefetch_done.send_replace(true);
        if self.config.background_fetch {
            self.background().await;
        }
        self.background_done.send_replace(true);
    }

    /// Starts a request for the chunks after `wants` in the blob (up to the neighbour
    /// window) that are neither cached nor in flight. It runs beside the demand's own
    /// request, so the reader waits for no extra bytes; a later read of a neighbour
    /// joins it or finds the chunk cached, sparing a round trip.
    pub(super) fn fetch_neighbours(self: &Arc<Self>, wants: &[(NodeId, Chunk)]) {
        let Some(end) = wants
            .iter()
            .filter(|(_, c)| !c.zeros)
            .map(|(_, c)| c.comp_end)
            .max()
        else {
            return;
        };
        if self.neighbours.max == 0 {
            return;
        }
        let window = self.neighbours.window();
        let index = self.layer.index();
        let leads = self.claim_missing(self.order.within(index, end..end.saturating_add(window)));
        self.neighbours.fetching(leads.iter().map(|l| l.chunk));
        self.spawn_ranges(leads, self.config.coalesce_gap, Purpose::Neighbour);
    }

    /// Fetches what the layer says a container reads first: the chunks `lazysnap
    /// optimize` marked, or else the prioritized range (`0..offset of
    /// .prefetch.landmark`), in pieces of at most `prefetch_request_bytes`, in blob
    /// order, each when the link gives it its turn.
    pub(crate) async fn prefetch(self: &Arc<Self>) {
        let marked = self.prefetch_marked;
        if !marked && self.prefetch_end == 0 {
            return;
        }
        let mut todo = blob_order::all_chunks(self.layer.index());
        todo.retain(|(_, c)| !c.zeros && self.prefetches(c) && !self.cache.contains(&c.digest));
        // In blob order, so the first files the command reads arrive first, in pieces,
        // so readers are not held until everything is in and no request outlives
        // `fetch_timeout` on a slow link. The prioritized range is contiguous and
        // bridged whole; marked chunks lie apart (the unread parts of their files
        // between them), so a gap wider than `coalesce_gap` starts a new piece. (The
        // first chunks of a landmark's files before their later ones was tried: on the
        // python image optimized by ctr-remote it was 0.5 s slower, the later chunks
        // then being fetched on demand beside the prefetch.)
        blob_order::sort(&mut todo);
        let gap = if marked {
            self.config.coalesce_gap
        } else {
            u64::MAX
        };
        let pieces = coalesce(todo, gap, self.config.prefetch_request_bytes);
        tracing::debug!(layer = %self.name, marked, requests = pieces.len(), "prefetch");
        let mut tasks = Vec::with_capacity(pieces.len());
        for (span, piece) in pieces {
            self.front.prefetching_from(span.start);
            let turn = self
                .link
                .prefetch_turn(&self.front, span.end - span.start)
                .await;
            // Claimed only now: a reader that wanted one of these chunks meanwhile
            // fetched it itself instead of waiting behind the pieces before this one.
            let leads = self.claim_missing(piece);
            let (Some(first), Some(end)) = (
                leads.iter().map(|l| l.chunk.comp_offset).min(),
                leads.iter().map(|l| l.chunk.comp_end).max(),
            ) else {
                continue;
            };
            // Counted from now, so the next turn sees this one in flight.
            let busy = self.link.busy(Class::Prefetch, end - first);
            let this = Arc::clone(self);
            tasks.push(self.handle.spawn(async move {
                this.fetch_range(first..end, leads, Purpose::Prefetch).await;
                drop((turn, busy));
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Fetches every chunk not yet local, in blob order, one small request at a time
    /// when the link gives the background its turn (see [`crate::link`]). Chunks go to
    /// disk only, so the memory cache keeps what readers use.
    pub(crate) async fn background(self: &Arc<Self>) {
        if !self.cache.disk_enabled() {
            return;
        }
        let mut todo = blob_order::all_chunks(self.layer.index());
        todo.retain(|(_, c)| !c.zeros);
        let todo = blob_order::distinct(todo);
        let mut rest = todo.as_slice();
        while !rest.is_empty() {
            // The next run of chunks not yet local, as one request's worth.
            let start = rest
                .iter()
                .position(|(_, c)| !self.cache.contains(&c.digest))
                .unwrap_or(rest.len());
            rest = &rest[start..];
            let Some((_, first)) = rest.first() else {
                break;
            };
            let max = self.config.background_request_bytes;
            let within = rest
                .iter()
                .take_while(|(_, c)| c.comp_offset < first.comp_offset.saturating_add(max))
                .count();
            let Some(mut batch) = coalesce(rest[..within].to_vec(), self.config.coalesce_gap, max)
                .into_iter()
                .next()
            else {
                break;
            };
            let (span, _) = &batch;
            let bytes = span.end - span.start;
            rest = &rest[batch.1.len()..];
            let _turn = self.link.background_turn(bytes).await;
            // Readers may have fetched some of these while we waited.
            batch.1.retain(|(_, c)| !self.cache.contains(&c.digest));
            if batch.1.is_empty() {
                continue;
            }
            if let Err(e) = self.chunks(&batch.1, Purpose::Background).await {
                tracing::debug!(layer = %self.name, error = %e, "background fetch failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: u64) -> Chunk {
        Chunk {
            comp_offset: 0,
            comp_end: len,
            file_offset: 0,
            size: len,
            digest: Digest([n; 32]),
            inner_offset: 0,
            zeros: false,
            prefetch: false,
        }
    }

    #[test]
    fn the_neighbour_window_shrinks_when_unread_and_grows_back_when_read() {
        let n = Neighbours::new(1 << 20);
        let mut next = 0u8;
        let mut fetch = |n: &Neighbours, read: bool| {
            let w = n.window();
            next = next.wrapping_add(1);
            let c = chunk(next, w);
            n.fetching(std::iter::once(c));
            if read {
                n.note_used(&[(NodeId(0), c)]);
            }
            w
        };
        // Random reads: the neighbours are never read.
        let mut windows = Vec::new();
        for _ in 0..40 {
            windows.push(fetch(&n, false));
        }
        assert_eq!(windows[0], 1 << 20);
        assert_eq!(*windows.last().unwrap(), (1 << 20) / 16, "{windows:?}");
        // A directory scan: every neighbour is read.
        for _ in 0..40 {
            windows.push(fetch(&n, true));
        }
        assert_eq!(*windows.last().unwrap(), 1 << 20);
    }
}
