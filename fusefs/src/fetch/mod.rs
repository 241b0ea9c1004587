//! Getting verified chunks for one layer. Each job's type holds its state and says
//! what to fetch; the [`Fetcher`] holds what they share (the layer, the cache, the
//! link, the runtime) and spawns the fetches. One type a file:
//! - [`blob_order`]: chunks in the order of the blob ([`blob_order::BlobOrder`]), and
//!   cut into range requests;
//! - [`inflight`]: fetches in flight, shared by everyone who wants the same chunk;
//! - [`arriving`]: one range request, its chunks inflated and verified as its body
//!   arrives;
//! - [`sequential`]: sequential readers get growing read-ahead;
//! - what is fetched without a reader waiting, in the link's order of precedence
//!   ([`crate::link`]): [`neighbours`] of a miss, the [`prefetch`] of what a container
//!   reads first, and the [`background`] fetch of the whole layer;
//! - [`served`]: chunks read whole leave the memory tier;
//! - [`assembling`]: whole-file copies for FUSE passthrough;
//! - [`fetched_now`]: the whole layer made local at once, when asked (`lazysnap fetch`);
//! - [`libraries`]: the libraries a program is about to load, fetched at once.
//!
//! This file holds the fetcher itself and its one entry for reads.

mod arriving;
mod assembling;
mod background;
mod blob_order;
mod fetched_now;
mod inflight;
mod libraries;
mod neighbours;
mod prefetch;
mod sequential;
mod served;

use std::collections::HashSet;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use estargz::{Chunk, Layer, NodeId, Sha256Sum, lock};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::cache::{SharedCache, expect_len};
use crate::config::FsConfig;
use crate::error::{Error, Result};
use crate::link::{Class, Link};
use crate::stats::{Counters, Stats};

use assembling::Assembling;
use background::Background;
use blob_order::BlobOrder;
use inflight::InFlight;
use neighbours::Neighbours;
use prefetch::Prefetch;
use sequential::{Ahead, Sequential};

pub use fetched_now::FetchedNow;
pub use libraries::{Libraries, LibraryLookup};

/// Why a range is fetched: for the debug log of range requests, the link's order of
/// precedence, and whether its chunks are kept in memory (all but those of the
/// background fetch and of a fetch made now, so the memory cache keeps what readers use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Demand,
    Neighbour,
    ReadAhead,
    Prefetch,
    Background,
    /// The whole layer at once, asked for ([`fetched_now`]).
    Now,
    /// A library a program is about to load ([`libraries`]).
    Library,
}

impl Purpose {
    fn keep_in_memory(self) -> bool {
        !matches!(self, Purpose::Background | Purpose::Now)
    }

    /// How a request of this purpose counts on the link (the background, not at all:
    /// it waits for its turn instead).
    fn class(self) -> Option<Class> {
        match self {
            Purpose::Demand | Purpose::Neighbour | Purpose::ReadAhead | Purpose::Library => {
                Some(Class::Demand)
            }
            // Asked for now: it holds the background back as a prefetch does.
            Purpose::Prefetch | Purpose::Now => Some(Class::Prefetch),
            Purpose::Background => None,
        }
    }
}

/// What a read finds: its bytes, a part per chunk in order (see [`joined`]), or that
/// it must wait for the network.
pub(crate) enum ReadStart {
    Ready(Vec<Bytes>),
    Fetch,
}

pub(crate) struct Fetcher {
    pub(crate) layer: Arc<Layer>,
    /// For logs and errors: the layer's TOC digest.
    name: String,
    /// A SOCI layer: chunks are pieces of spans, inflated a span at a time.
    spans: bool,
    cache: SharedCache,
    link: Link,
    handle: Handle,
    config: FsConfig,
    pub(crate) counters: Counters,
    /// Disk writes under way (fetched chunks, whole copies), so callers can wait for the
    /// cache to settle.
    writes: watch::Sender<usize>,
    inflight: InFlight,
    /// Every chunk in blob order, for the neighbours of a miss and the pieces of a span.
    order: BlobOrder,
    // Each job's own state.
    seq: Sequential,
    neighbours: Neighbours,
    pub(crate) prefetch: Prefetch,
    pub(crate) background: Background,
    served: served::Served,
    assembling: Assembling,
    /// Files read as ELF objects for their libraries.
    examined: libraries::Examined,
}

/// Counts one unit of work on a watched counter while alive.
pub(crate) struct Counted(watch::Sender<usize>);

impl Counted {
    pub(crate) fn new(tx: &watch::Sender<usize>) -> Self {
        tx.send_modify(|n| *n += 1);
        Counted(tx.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The bytes `offset..end` of a file from its chunks (whole chunks, in order).
pub(crate) fn assemble(
    wants: &[(NodeId, estargz::Chunk)],
    chunks: &[Bytes],
    offset: u64,
    end: u64,
) -> Bytes {
    let parts = wants
        .iter()
        .zip(chunks)
        .map(|((_, c), data)| {
            let part = part_of(c, offset, end);
            let len = data.len() as u64;
            data.slice(part.start.min(len) as usize..part.end.min(len) as usize)
        })
        .collect();
    joined(parts)
}

/// The bytes of chunk `c` that a read of file bytes `offset..end` wants, as offsets in
/// the chunk.
fn part_of(c: &Chunk, offset: u64, end: u64) -> std::ops::Range<u64> {
    let lo = offset.saturating_sub(c.file_offset).min(c.size);
    let hi = end.saturating_sub(c.file_offset).min(c.size);
    lo..hi.max(lo)
}

/// A read's parts, one after another.
pub(crate) fn joined(parts: Vec<Bytes>) -> Bytes {
    if let [one] = parts.as_slice() {
        // One chunk: a slice of the cached buffer, no copy.
        return one.clone();
    }
    let mut out = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
    for p in &parts {
        out.extend_from_slice(p);
    }
    out.freeze()
}

impl Fetcher {
    pub(crate) fn new(
        layer: Arc<Layer>,
        cache: SharedCache,
        link: Link,
        handle: Handle,
        config: FsConfig,
    ) -> Fetcher {
        Fetcher {
            spans: layer.format() == estargz::Format::Soci,
            name: layer.toc_digest().to_string(),
            seq: Sequential::new(&config, cache.memory_capacity()),
            neighbours: Neighbours::new(
                config.neighbour_fetch_bytes,
                layer.toc_digest().to_string(),
            ),
            prefetch: Prefetch::new(layer.index(), &config),
            background: Background::new(&config),
            assembling: Assembling::new(&config, cache.disk_enabled()),
            examined: libraries::Examined::new(&config),
            served: served::Served::default(),
            layer,
            cache,
            link,
            handle,
            config,
            counters: Counters::default(),
            inflight: InFlight::default(),
            order: BlobOrder::default(),
            writes: watch::channel(0).0,
        }
    }

    fn path(&self, node: NodeId) -> String {
        self.layer.index().path_of(node)
    }

    fn layer_error(&self, source: estargz::Error) -> Error {
        Error::Layer {
            layer: self.name.clone(),
            source,
        }
    }

    /// A zstd:chunked hole: nothing to fetch, but the digest is still checked so a lying
    /// TOC cannot turn data into zeros.
    fn zeros(&self, node: NodeId, chunk: &Chunk) -> Result<Bytes> {
        let data = self
            .layer
            .decompress_chunk(node, chunk, &[])
            .map_err(|source| self.layer_error(source))?;
        let data = Bytes::from(data);
        self.cache.put_memory(chunk.digest, data.clone());
        Ok(data)
    }

    /// A read of `wants` (the chunks of `node`'s bytes `offset..end`; the file is `size`
    /// bytes): notes it for read-ahead and for judging neighbour fetches, and answers
    /// from the cache if it can. Never touches the network: this is what a FUSE thread
    /// calls. On [`ReadStart::Fetch`], [`Fetcher::fetch_for_read`] finishes the read.
    pub(crate) fn read(
        self: &Arc<Self>,
        node: NodeId,
        (offset, end, size): (u64, u64, u64),
        wants: &[(NodeId, Chunk)],
    ) -> Result<ReadStart> {
        if let Some(ahead) = self
            .seq
            .note_read(node, (offset, end, size), || self.link.rate())
        {
            self.read_ahead(node, ahead);
        }
        self.neighbours.note_used(wants);
        self.prefetch.note_read(wants);
        let mut out = Vec::with_capacity(wants.len());
        for (node, c) in wants {
            let part = part_of(c, offset, end);
            match self.cache.get_part(&c.digest, c.size, part.clone())? {
                Some(b) => out.push(b),
                None if c.zeros => out.push(
                    self.zeros(*node, c)?
                        .slice(part.start as usize..part.end as usize),
                ),
                None => {
                    self.seq.note_miss(*node, offset);
                    if self.prefetch.note_miss(c) {
                        self.seq.rewind(*node, offset);
                        tracing::info!(layer = %self.name, path = %self.path(*node),
                            "read outside the chunks `lazysnap optimize` marked: read-ahead \
                             and neighbour fetches no longer keep to them");
                    }
                    return Ok(ReadStart::Fetch);
                }
            }
        }
        Counters::add(&self.counters.cache_hits, out.len() as u64);
        Ok(ReadStart::Ready(out))
    }

    /// Issues read-ahead of `node`'s bytes `ahead.range`: chunks on disk are loaded into
    /// memory, and once a read of the file has missed, the others are fetched, in
    /// several requests at once.
    fn read_ahead(self: &Arc<Self>, node: NodeId, ahead: Ahead) {
        let Ahead { range, missed } = ahead;
        let mut chunks: Vec<(NodeId, Chunk)> = Vec::new();
        let mut on_disk: Vec<Chunk> = Vec::new();
        for c in self
            .layer
            .chunks_for_range(node, range.start, range.end - range.start)
        {
            if c.zeros || self.cache.in_memory(&c.digest) {
                continue;
            }
            if self.cache.contains(&c.digest) {
                on_disk.push(*c);
            } else if missed && self.prefetch.may_guess(c) {
                chunks.push((node, *c));
            }
        }
        self.load_ahead(&on_disk);
        if chunks.is_empty() {
            return;
        }
        for part in self.seq.parts(chunks) {
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

    /// Read-ahead of chunks that are in the disk cache but not in memory: loads them
    /// into memory on blocking threads (as many at once as read-ahead requests), so the
    /// reader's FUSE requests find them there instead of each waiting for a chunk file
    /// to be read and hashed; disk and CPU work then overlap with the reader's.
    fn load_ahead(&self, chunks: &[Chunk]) {
        for part in self.seq.disk_parts(chunks) {
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

    pub(crate) fn cache(&self) -> &SharedCache {
        &self.cache
    }

    /// Chunks being fetched now: claimed, their requests sent or about to be.
    #[cfg(test)]
    pub(crate) fn chunks_in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// A filesystem operation: while containers start, it holds the background back.
    pub(crate) fn note_op(&self) {
        self.link.note_op();
    }

    /// The network part of a read: fetches the chunks' neighbours with it (unless the
    /// file was fetched as a library: see [`Fetcher::is_library`]), and waits for the
    /// chunks. Its own requests count as demand on the link; waiting for a prefetch
    /// piece that holds its chunk does not, so that piece's neighbours in the prefetch
    /// are not held back for the reader's sake.
    pub(crate) async fn fetch_for_read(
        self: &Arc<Self>,
        wants: &[(NodeId, Chunk)],
    ) -> Result<Vec<Bytes>> {
        let neighbours = if wants.iter().all(|(node, _)| self.is_library(*node)) {
            Vec::new()
        } else {
            self.claim_neighbours(wants)
        };
        self.chunks_and_riders(wants, Purpose::Demand, neighbours)
            .await
    }

    /// Claims the chunks after `wants` in the blob (up to the neighbour window) that are
    /// neither local nor in flight. They ride in the demand's own request, behind its
    /// bytes: the reader's chunks arrive first and are served as they come, and no second
    /// request competes with them for the link. A later read of a neighbour joins the
    /// fetch or finds the chunk cached, sparing a round trip.
    fn claim_neighbours(self: &Arc<Self>, wants: &[(NodeId, Chunk)]) -> Vec<inflight::Lead> {
        let Some(window) = self.neighbours.plan(wants) else {
            return Vec::new();
        };
        let index = self.layer.index();
        let name = |node: NodeId| index.entry(node).name();
        let left_out = self
            .neighbours
            .note_missed(wants.iter().map(|(node, _)| name(*node)));
        let guesses = self
            .order
            .within(index, window)
            .filter(|(_, c)| self.prefetch.may_guess(c))
            .filter(|(node, _)| neighbours::takes(&left_out, name(*node)));
        let leads = self.claim_missing(guesses);
        self.neighbours
            .fetching(leads.iter().map(|l| (l.chunk, name(l.node))));
        leads
    }

    /// The whole decompressed, verified chunks, in order: from the cache, from a fetch
    /// already in flight, or from new range requests (coalesced) spawned here.
    pub(crate) async fn chunks(
        self: &Arc<Self>,
        wants: &[(NodeId, Chunk)],
        purpose: Purpose,
    ) -> Result<Vec<Bytes>> {
        self.chunks_and_riders(wants, purpose, Vec::new()).await
    }

    /// [`Fetcher::chunks`], with `riders` (claimed fetches nobody waits for yet)
    /// coalesced into the same requests after `wants`' own chunks.
    async fn chunks_and_riders(
        self: &Arc<Self>,
        wants: &[(NodeId, Chunk)],
        purpose: Purpose,
        riders: Vec<inflight::Lead>,
    ) -> Result<Vec<Bytes>> {
        let mut out: Vec<Option<Bytes>> = vec![None; wants.len()];
        let mut waits = Vec::new();
        let mut leads = Vec::new();
        for (i, (node, c)) in wants.iter().enumerate() {
            if let Some(b) = self.cache.get(&c.digest, c.size)? {
                Counters::add(&self.counters.cache_hits, 1);
                out[i] = Some(b);
                continue;
            }
            if c.zeros {
                out[i] = Some(self.zeros(*node, c)?);
                continue;
            }
            match self.inflight.join_or_lead(&self.cache, *node, c) {
                inflight::Joined::Ready(b) => {
                    Counters::add(&self.counters.cache_hits, 1);
                    out[i] = Some(expect_len(&c.digest, c.size, b)?);
                }
                inflight::Joined::Wait(rx) => {
                    Counters::add(&self.counters.cache_misses, 1);
                    waits.push((i, rx));
                }
                inflight::Joined::Lead(lead, rx) => {
                    Counters::add(&self.counters.cache_misses, 1);
                    leads.push(lead);
                    waits.push((i, rx));
                }
            }
        }
        // A task of its own for each range: the fetch completes for every waiter even
        // if the reader that started it goes away.
        self.spawn_ranges_with_riders(leads, purpose, riders);
        for (i, rx) in waits {
            match inflight::wait(rx).await {
                // Another file's fetch of the same digest: its length is checked too.
                Ok(b) => out[i] = Some(expect_len(&wants[i].1.digest, wants[i].1.size, b)?),
                Err(reason) => {
                    let (_, c) = &wants[i];
                    return Err(Error::Fetch {
                        layer: self.name.clone(),
                        start: c.comp_offset,
                        end: c.comp_end,
                        reason: reason.to_string(),
                    });
                }
            }
        }
        out.into_iter()
            .map(|b| b.ok_or(Error::Invalid("chunk left unanswered")))
            .collect()
    }

    /// Claims the fetch of each of `chunks` that is not local (on disk or in memory)
    /// and not in flight; see [`InFlight::claim`].
    fn claim_missing(
        &self,
        chunks: impl IntoIterator<Item = (NodeId, Chunk)>,
    ) -> Vec<inflight::Lead> {
        let missing = chunks
            .into_iter()
            .filter(|(_, c)| !self.cache.contains(&c.digest));
        self.inflight.claim(&self.cache, missing)
    }

    /// Coalesces `leads` into range requests of at most `max_range_bytes` and runs each
    /// in a task of its own.
    fn spawn_ranges(self: &Arc<Self>, leads: Vec<inflight::Lead>, purpose: Purpose) {
        self.spawn_ranges_with_riders(leads, purpose, Vec::new());
    }

    /// [`Fetcher::spawn_ranges`] for `leads` and their neighbour `riders` together: a
    /// request that holds only riders is fetched (and logged) as a neighbour fetch.
    fn spawn_ranges_with_riders(
        self: &Arc<Self>,
        leads: Vec<inflight::Lead>,
        purpose: Purpose,
        riders: Vec<inflight::Lead>,
    ) {
        // Only a read with riders needs to tell its own leads from them.
        let own: Option<HashSet<Sha256Sum>> =
            (!riders.is_empty()).then(|| leads.iter().map(|l| l.chunk.digest).collect());
        let mut leads = leads;
        leads.extend(riders);
        blob_order::sort(&mut leads);
        let (gap, max) = (self.config.coalesce_gap, self.config.max_range_bytes);
        for (range, group) in blob_order::coalesce(leads, gap, max) {
            let riders_only = own
                .as_ref()
                .is_some_and(|own| !group.iter().any(|l| own.contains(&l.chunk.digest)));
            let purpose = if riders_only {
                Purpose::Neighbour
            } else {
                purpose
            };
            let this = Arc::clone(self);
            self.handle
                .spawn(async move { this.fetch_range(range, group, purpose).await });
        }
    }

    /// Prefetch, then the background fetch, as the config says; started once a layer is
    /// mounted. A mount means a container is on its way: the link's quiet period starts
    /// again.
    pub(crate) async fn run_scheduled(self: Arc<Self>) {
        self.link.mounted();
        if self.config.prefetch {
            self.prefetch().await;
        }
        self.prefetch.done.send_replace(true);
        if self.config.background_fetch {
            self.background().await;
        }
        self.background.done.send_replace(true);
    }

    /// A read of file bytes `offset..end` was answered from `wants` (the chunks that
    /// hold them, in order); see [`served`].
    pub(crate) fn note_served(&self, wants: &[(NodeId, Chunk)], offset: u64, end: u64) {
        self.served.note(&self.cache, wants, offset, end);
    }

    /// Resolves when no fetched chunk or whole-file copy is being written to disk.
    pub(crate) async fn writes_settled(&self) {
        let _ = self.writes.subscribe().wait_for(|n| *n == 0).await;
    }

    /// Counters plus how much of the layer is local.
    pub(crate) fn stats(&self) -> Stats {
        let mut seen = HashSet::new();
        let (mut local, mut total) = (0, 0);
        for c in self.layer.index().all_chunks() {
            if !seen.insert(c.digest) {
                continue;
            }
            total += c.size;
            if c.zeros || self.cache.contains(&c.digest) {
                local += c.size;
            }
        }
        let k = &self.counters;
        Stats {
            bytes_fetched: Counters::get(&k.bytes_fetched),
            range_requests: Counters::get(&k.range_requests),
            cache_hits: Counters::get(&k.cache_hits),
            cache_misses: Counters::get(&k.cache_misses),
            verification_failures: Counters::get(&k.verification_failures),
            fetch_errors: Counters::get(&k.fetch_errors),
            local_bytes: local,
            total_bytes: total,
            prefetch_done: *self.prefetch.done.borrow(),
            background_done: *self.background.done.borrow(),
            // Timed by the FUSE adapter, which fills it in.
            op_latency: Vec::new(),
        }
    }
}
