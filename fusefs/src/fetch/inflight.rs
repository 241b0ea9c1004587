//! Fetches in flight, by chunk digest: whoever wants a chunk that is already being
//! fetched waits for that fetch instead of starting another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use estargz::{Chunk, NodeId, Sha256Sum};
use tokio::sync::watch;

use super::lock;
use crate::cache::SharedCache;

/// What an in-flight fetch ends with; `None` while it runs. Errors are shared as text
/// since every waiter turns them into EIO anyway.
pub(crate) type Slot = Option<std::result::Result<Bytes, Arc<str>>>;

/// One chunk a fetch task has promised to deliver.
pub(crate) struct Lead {
    pub(crate) node: NodeId,
    pub(crate) chunk: Chunk,
    tx: watch::Sender<Slot>,
}

impl super::blob_order::InBlob for Lead {
    fn chunk(&self) -> &Chunk {
        &self.chunk
    }
}

pub(crate) enum Joined {
    /// Fetched while we looked: in memory.
    Ready(Bytes),
    /// Someone else fetches it.
    Wait(watch::Receiver<Slot>),
    /// The caller must fetch it and [`InFlight::finish`] the lead.
    Lead(Lead, watch::Receiver<Slot>),
}

#[derive(Default)]
pub(crate) struct InFlight {
    table: Mutex<HashMap<Sha256Sum, watch::Receiver<Slot>>>,
}

impl InFlight {
    /// Chunks being fetched now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.table).len()
    }

    /// Joins the fetch of `c` already in flight, or registers a new one led by the
    /// caller. Checks the memory cache under the lock: a finished fetch stores its chunk
    /// before it leaves the table, so no fetch is ever started twice.
    pub(crate) fn join_or_lead(&self, cache: &SharedCache, node: NodeId, c: &Chunk) -> Joined {
        let mut table = lock(&self.table);
        if let Some(rx) = table.get(&c.digest) {
            // A fetch task that died (runtime shutting down) leaves a closed channel.
            if rx.has_changed().is_ok() || rx.borrow().is_some() {
                return Joined::Wait(rx.clone());
            }
        }
        if let Some(b) = cache.get_memory(&c.digest) {
            return Joined::Ready(b);
        }
        let (tx, rx) = watch::channel(None);
        table.insert(c.digest, rx.clone());
        Joined::Lead(
            Lead {
                node,
                chunk: *c,
                tx,
            },
            rx,
        )
    }

    /// Claims the fetch of each of `chunks` that is neither in flight nor in memory: the
    /// caller must fetch and [`InFlight::finish`] every lead returned. Chunks already
    /// in flight are left to their fetch.
    pub(crate) fn claim(
        &self,
        cache: &SharedCache,
        chunks: impl IntoIterator<Item = (NodeId, Chunk)>,
    ) -> Vec<Lead> {
        chunks
            .into_iter()
            .filter_map(|(node, c)| match self.join_or_lead(cache, node, &c) {
                Joined::Lead(lead, _) => Some(lead),
                _ => None,
            })
            .collect()
    }

    /// Answers everyone waiting for `lead`'s chunk and takes it off the table.
    pub(crate) fn finish(&self, lead: Lead, res: std::result::Result<Bytes, Arc<str>>) {
        {
            let mut table = lock(&self.table);
            // Only our own entry: compare channels, not just the digest.
            if table
                .get(&lead.chunk.digest)
                .is_some_and(|rx| rx.same_channel(&lead.tx.subscribe()))
            {
                table.remove(&lead.chunk.digest);
            }
        }
        lead.tx.send_replace(Some(res));
    }
}

/// Waits for the fetch behind `rx` to end.
pub(crate) async fn wait(mut rx: watch::Receiver<Slot>) -> std::result::Result<Bytes, Arc<str>> {
    match rx.wait_for(Option::is_some).await {
        Ok(slot) => slot
            .clone()
            .unwrap_or_else(|| Err(Arc::from("fetch ended without an answer"))),
        Err(_) => Err(Arc::from("fetch task ended without an answer")),
    }
}
