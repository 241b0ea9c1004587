//! The prefetch: what the layer says its container reads first, fetched once the layer
//! is mounted, in blob order, each piece when the link gives it its turn (after demand,
//! before the background; see [`crate::link`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use estargz::{Chunk, Index, NodeId};
use tokio::sync::watch;

use super::blob_order::{self, Request, coalesce};
use super::{Fetcher, Purpose};
use crate::config::FsConfig;
use crate::link::{Class, PrefetchFront};

/// The prefetch of one layer: which chunks it fetches, and how far it has come.
pub(crate) struct Prefetch {
    /// Which chunks the prefetch fetches: those marked by `lazysnap optimize`, or else
    /// those before this end of the prioritized range (0: none), each file's up to
    /// `file_bytes` (`prefetch_file_bytes`; 0: whole files).
    marked: bool,
    end: u64,
    file_bytes: u64,
    /// The container read a chunk the marks leave out: its run is not the recorded one.
    left_record: AtomicBool,
    /// How far the prefetch stands ahead of the container's reads, for the link.
    front: Arc<PrefetchFront>,
    /// Set once the prefetch is over (or was never to run).
    pub(crate) done: watch::Sender<bool>,
}

impl Prefetch {
    pub(crate) fn new(index: &Index, config: &FsConfig) -> Self {
        Prefetch {
            marked: index.has_prefetch_marks(),
            end: index.prefetch_range().map_or(0, |r| r.end),
            file_bytes: config.prefetch_file_bytes,
            left_record: AtomicBool::new(false),
            front: Arc::default(),
            done: watch::channel(false).0,
        }
    }

    /// Whether the prefetch fetches `c`.
    fn wants(&self, c: &Chunk) -> bool {
        if self.marked {
            c.prefetch
        } else {
            c.comp_end <= self.end && !self.past_file_bytes(c)
        }
    }

    /// Whether `c` lies past what the prefetch takes of its file. `ctr-remote`
    /// prioritizes every file its container opened, whole, in the order they were
    /// opened; a big one opened at the start is mostly not read there (a JVM's
    /// `modules`: 2% of 129 MB; a BLAS built for every CPU: 6% of 37 MB), and fetched
    /// whole it holds back every prioritized file after it.
    /// Its later chunks come when read (read-ahead, neighbours) and with the
    /// background fetch.
    fn past_file_bytes(&self, c: &Chunk) -> bool {
        self.file_bytes > 0 && c.file_offset >= self.file_bytes
    }

    /// Whether `c` is in the prioritized range but left to reads: past what the
    /// prefetch takes of its file.
    fn left_to_reads(&self, c: &Chunk) -> bool {
        !self.marked && c.comp_end <= self.end && self.past_file_bytes(c)
    }

    /// Whether a guess (read-ahead, the neighbours of a miss) may fetch `c`. A layer
    /// `lazysnap optimize` marked says which chunks its container reads: while the
    /// container keeps to them, a guess takes only marked chunks (the rest, such as the
    /// unread parts of a mapped library or the files beside a marked one, the recorded
    /// run never read); once it reads an unmarked chunk, guesses take anything again.
    pub(crate) fn may_guess(&self, c: &Chunk) -> bool {
        !self.marked || c.prefetch || self.left_record.load(Ordering::Relaxed)
    }

    /// Whether the layer says what its container reads first (marks or a prioritized
    /// range) and, as far as marks tell, the container keeps to that.
    pub(crate) fn keeps_to_record(&self) -> bool {
        if self.marked {
            !self.left_record.load(Ordering::Relaxed)
        } else {
            self.end > 0
        }
    }

    /// A read must fetch `c`: if the marks leave it out, the container has left the
    /// recorded run. True the first time, for the log.
    pub(crate) fn note_miss(&self, c: &Chunk) -> bool {
        self.marked && !c.prefetch && !c.zeros && !self.left_record.swap(true, Ordering::Relaxed)
    }

    /// A read of `wants`: the container has read this far into what the prefetch
    /// fetches, which the link weighs against the prefetch's own front.
    pub(crate) fn note_read(&self, wants: &[(NodeId, Chunk)]) {
        if let Some(furthest) = wants
            .iter()
            .filter(|(_, c)| self.wants(c))
            .map(|(_, c)| c.comp_end)
            .max()
        {
            self.front.read_up_to(furthest);
        }
    }

    /// The pieces to fetch of `todo` (every chunk of the layer): those the prefetch
    /// wants that are not `local`, in pieces of at most `prefetch_request_bytes`, in
    /// blob order.
    fn pieces(
        &self,
        mut todo: Vec<(NodeId, Chunk)>,
        local: impl Fn(&Chunk) -> bool,
        config: &FsConfig,
    ) -> Vec<Request<(NodeId, Chunk)>> {
        // Chunks left to reads stay in for now, local or not: the range is bridged
        // whole, but not across them.
        todo.retain(|(_, c)| !c.zeros && (self.left_to_reads(c) || (self.wants(c) && !local(c))));
        // In blob order, so the first files the command reads arrive first, in pieces,
        // so readers are not held until everything is in and no request outlives
        // `fetch_timeout` on a slow link. The prioritized range is contiguous and
        // bridged whole; marked chunks lie apart (the unread parts of their files
        // between them), so a gap wider than `coalesce_gap` starts a new piece. (The
        // first chunks of a landmark's files before their later ones was tried: on the
        // python image optimized by ctr-remote it was 0.5 s slower, the later chunks
        // then being fetched on demand beside the prefetch.)
        blob_order::sort(&mut todo);
        let gap = if self.marked {
            config.coalesce_gap
        } else {
            u64::MAX
        };
        todo.split(|(_, c)| self.left_to_reads(c))
            .flat_map(|run| coalesce(run.to_vec(), gap, config.prefetch_request_bytes))
            .collect()
    }
}

impl Fetcher {
    /// Fetches what the layer says a container reads first: the chunks `lazysnap
    /// optimize` marked, or else the prioritized range (`0..offset of
    /// .prefetch.landmark`), in pieces of at most `prefetch_request_bytes`, in blob
    /// order, each when the link gives it its turn.
    pub(crate) async fn prefetch(self: &Arc<Self>) {
        let p = &self.prefetch;
        if !p.marked && p.end == 0 {
            return;
        }
        let all = blob_order::all_chunks(self.layer.index());
        let pieces = p.pieces(all, |c| self.cache.contains(&c.digest), &self.config);
        tracing::debug!(layer = %self.name, marked = p.marked, requests = pieces.len(), "prefetch");
        let mut tasks = Vec::with_capacity(pieces.len());
        for (span, piece) in pieces {
            p.front.prefetching_from(span.start);
            let turn = self
                .link
                .prefetch_turn(&p.front, span.end - span.start)
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
}
