//! The neighbours of a miss: the chunks after it in the blob, fetched beside the demand
//! in a window sized by how often they turn out to be read.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use estargz::{Chunk, NodeId, Sha256Sum};

use super::lock;

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
    pending: HashMap<Sha256Sum, u64>,
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

    /// Where in the blob to fetch the neighbours of a read of `wants`: from the end of
    /// its last chunk, as far as the window reaches. `None` when neighbour fetches are
    /// off or the read is all holes.
    pub(crate) fn plan(&self, wants: &[(NodeId, Chunk)]) -> Option<Range<u64>> {
        let end = wants
            .iter()
            .filter(|(_, c)| !c.zeros)
            .map(|(_, c)| c.comp_end)
            .max()?;
        if self.max == 0 {
            return None;
        }
        Some(end..end.saturating_add(self.window()))
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

    /// `chunks` are being fetched as neighbours: judged by whether they are read.
    pub(crate) fn fetching(&self, chunks: impl Iterator<Item = Chunk>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: u64) -> Chunk {
        Chunk {
            comp_offset: 0,
            comp_end: len,
            file_offset: 0,
            size: len,
            digest: Sha256Sum([n; 32]),
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
