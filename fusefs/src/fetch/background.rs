//! The background fetch: every chunk not yet local, in blob order, one small request at
//! a time, each when the registry host's link is quiet (see [`crate::link`]).

use std::sync::Arc;

use estargz::{Chunk, NodeId};
use tokio::sync::watch;

use super::blob_order::{self, coalesce};
use super::{Fetcher, Purpose};
use crate::config::FsConfig;

/// The background fetch of one layer: how it cuts its requests, and whether it is over.
pub(crate) struct Background {
    /// The largest request (`background_request_bytes`).
    max: u64,
    /// Bytes between chunks bridged within a request (`coalesce_gap`).
    gap: u64,
    /// Set once the background fetch is over (or was never to run).
    pub(crate) done: watch::Sender<bool>,
}

/// Chunks in blob order.
type Chunks = [(NodeId, Chunk)];

/// One request of the background fetch, and what is left after it.
struct Batch<'a> {
    /// Its bytes in the blob.
    bytes: u64,
    chunks: Vec<(NodeId, Chunk)>,
    rest: &'a Chunks,
}

impl Background {
    pub(crate) fn new(config: &FsConfig) -> Self {
        Background {
            max: config.background_request_bytes,
            gap: config.coalesce_gap,
            done: watch::channel(false).0,
        }
    }

    /// Of `rest` (distinct chunks in blob order), the next run of chunks not yet
    /// `local` as one request's worth.
    fn next<'a>(&self, rest: &'a Chunks, local: impl Fn(&Chunk) -> bool) -> Option<Batch<'a>> {
        let start = rest
            .iter()
            .position(|(_, c)| !local(c))
            .unwrap_or(rest.len());
        let rest = &rest[start..];
        let (_, first) = rest.first()?;
        let max = self.max;
        let within = rest
            .iter()
            .take_while(|(_, c)| c.comp_offset < first.comp_offset.saturating_add(max))
            .count();
        let (span, chunks) = coalesce(rest[..within].to_vec(), self.gap, max)
            .into_iter()
            .next()?;
        Some(Batch {
            bytes: span.end - span.start,
            rest: &rest[chunks.len()..],
            chunks,
        })
    }
}

impl Fetcher {
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
        let local = |c: &Chunk| self.cache.contains(&c.digest);
        let mut rest = todo.as_slice();
        while let Some(batch) = self.background.next(rest, local) {
            rest = batch.rest;
            let _turn = self.link.background_turn(batch.bytes).await;
            // Readers may have fetched some of these while we waited.
            let mut chunks = batch.chunks;
            chunks.retain(|(_, c)| !local(c));
            if chunks.is_empty() {
                continue;
            }
            if let Err(e) = self.chunks(&chunks, Purpose::Background).await {
                tracing::debug!(layer = %self.name, error = %e, "background fetch failed");
            }
        }
    }
}
