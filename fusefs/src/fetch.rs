//! Getting verified chunks: cache lookups, coalesced range requests, shared in-flight
//! fetches, sequential read-ahead, prefetch of the prioritized range and the
//! low-priority background fetch of the whole layer.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use estargz::{Chunk, Digest, EntryKind, Layer, NodeId};
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, watch};

use crate::cache::SharedCache;
use crate::config::FsConfig;
use crate::error::{Error, Result};
use crate::stats::{Counters, Stats};

/// What an in-flight fetch ends with; `None` while it runs. Errors are shared as text
/// since every waiter turns them into EIO anyway.
type Slot = Option<std::result::Result<Bytes, Arc<str>>>;

/// One chunk a fetch task has promised to deliver.
struct Lead {
    node: NodeId,
    chunk: Chunk,
    tx: watch::Sender<Slot>,
}

/// Why a range is fetched: for the debug log of range requests, and whether its chunks
/// are kept in memory (all but the background fetch's, so the memory cache keeps what
/// readers use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Demand,
    Neighbour,
    ReadAhead,
    Prefetch,
    Background,
}

impl Purpose {
    fn keep_in_memory(self) -> bool {
        self != Purpose::Background
    }
}

/// The body of one range request as it arrives, and the chunks still waiting for it.
struct Arriving {
    /// Blob offset of `buf`'s first byte.
    base: u64,
    buf: bytes::BytesMut,
    received: u64,
    /// In blob order.
    leads: std::collections::VecDeque<Lead>,
    jobs: Vec<tokio::task::JoinHandle<()>>,
}

impl Arriving {
    /// The leading chunks whose bytes are all in, with those bytes (and the blob offset
    /// they start at); the bytes no waiting chunk needs are dropped from `buf`.
    fn take_ready(&mut self) -> Option<(u64, Bytes, Vec<Lead>)> {
        let have = self.base + self.buf.len() as u64;
        let mut ready = Vec::new();
        while self.leads.front().is_some_and(|l| l.chunk.comp_end <= have) {
            ready.extend(self.leads.pop_front());
        }
        let need = ready.iter().map(|l| l.chunk.comp_end).max()?;
        let start = self.base;
        // Bytes before the next waiting chunk are done with.
        let cut = self
            .leads
            .front()
            .map_or(have, |next| next.chunk.comp_offset)
            .clamp(self.base, have);
        let data = if cut >= need {
            self.buf.split_to((cut - self.base) as usize).freeze()
        } else {
            // The next chunk shares bytes with these (several chunks in one member).
            let copy = Bytes::copy_from_slice(&self.buf[..(need - self.base) as usize]);
            let _ = self.buf.split_to((cut - self.base) as usize);
            copy
        };
        self.base = cut;
        Some((start, data, ready))
    }
}

/// Per-file sequential-access state, keyed by the file's node.
#[derive(Debug, Default, Clone, Copy)]
struct SeqState {
    /// Where the next sequential read is expected.
    next: u64,
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

/// Files tracked for sequential access before the table is reset.
const SEQ_TABLE_MAX: usize = 4096;

pub(crate) struct Fetcher {
    pub(crate) layer: Arc<Layer>,
    /// For logs and errors: the layer's TOC digest.
    name: String,
    cache: SharedCache,
    handle: Handle,
    config: FsConfig,
    pub(crate) counters: Counters,
    inflight: Mutex<HashMap<Digest, watch::Receiver<Slot>>>,
    /// On-demand reads (and their read-ahead) waiting for the network; the background
    /// fetch waits for zero.
    demand: watch::Sender<usize>,
    seq: Mutex<HashMap<NodeId, SeqState>>,
    readahead_slots: Arc<Semaphore>,
    pub(crate) prefetch_done: watch::Sender<bool>,
    pub(crate) background_done: watch::Sender<bool>,
    /// Every chunk in blob order as (file, chunk of the file), for the neighbour fetch;
    /// built on the first miss. 8 bytes a chunk, not a copy of the chunk (80).
    by_offset: OnceLock<Vec<(NodeId, u32)>>,
    /// Whole-file copies being written, by key; the count lets callers wait for them.
    assembling: Mutex<HashSet<Digest>>,
    /// Disk writes under way (fetched chunks, whole copies), so callers can wait for the
    /// cache to settle.
    writes: watch::Sender<usize>,
}

/// Counts one unit of disk-writing work while alive.
struct Busy(watch::Sender<usize>);

impl Busy {
    fn new(tx: &watch::Sender<usize>) -> Self {
        tx.send_modify(|n| *n += 1);
        Busy(tx.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts an on-demand wait for the network while alive.
struct DemandGuard<'a>(&'a watch::Sender<usize>);

impl<'a> DemandGuard<'a> {
    fn new(tx: &'a watch::Sender<usize>) -> Self {
        tx.send_modify(|n| *n += 1);
        DemandGuard(tx)
    }
}

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Fetcher {
    pub(crate) fn new(
        layer: Arc<Layer>,
        cache: SharedCache,
        handle: Handle,
        config: FsConfig,
    ) -> Fetcher {
        let slots = config.readahead_requests.max(1);
        Fetcher {
            name: layer.toc_digest().to_string(),
            layer,
            cache,
            handle,
            config,
            counters: Counters::default(),
            inflight: Mutex::new(HashMap::new()),
            demand: watch::channel(0).0,
            seq: Mutex::new(HashMap::new()),
            readahead_slots: Arc::new(Semaphore::new(slots)),
            prefetch_done: watch::channel(false).0,
            background_done: watch::channel(false).0,
            by_offset: OnceLock::new(),
            assembling: Mutex::new(HashSet::new()),
            writes: watch::channel(0).0,
        }
    }

    fn path(&self, node: NodeId) -> String {
        self.layer.index().path_of(node)
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

    fn layer_error(&self, source: estargz::Error) -> Error {
        Error::Layer {
            layer: self.name.clone(),
            source,
        }
    }

    /// Every chunk from the cache, or `None` if any must be fetched. Never touches the
    /// network: this is what a FUSE thread may call.
    pub(crate) fn try_cached(&self, wants: &[(NodeId, Chunk)]) -> Result<Option<Vec<Bytes>>> {
        let mut out = Vec::with_capacity(wants.len());
        for (node, c) in wants {
            match self.cache.get(&c.digest, c.size) {
                Some(b) => out.push(b),
                None if c.zeros => out.push(self.zeros(*node, c)?),
                None => return Ok(None),
            }
        }
        Counters::add(&self.counters.cache_hits, out.len() as u64);
        Ok(Some(out))
    }

    /// An on-demand read's chunks: counts as demand, so background fetching pauses.
    pub(crate) async fn demand_chunks(
        self: &Arc<Self>,
        wants: &[(NodeId, Chunk)],
    ) -> Result<Vec<Bytes>> {
        let _guard = DemandGuard::new(&self.demand);
        self.fetch_neighbours(wants);
        self.chunks(wants, Purpose::Demand).await
    }

    /// Starts a request for the chunks after `wants` in the blob (up to
    /// `neighbour_fetch_bytes`) that are neither cached nor in flight. It runs beside the
    /// demand's own request, so the reader waits for no extra bytes; a later read of a
    /// neighbour joins it or finds the chunk cached, sparing a round trip.
    fn fetch_neighbours(self: &Arc<Self>, wants: &[(NodeId, Chunk)]) {
        let window = self.config.neighbour_fetch_bytes;
        let Some(end) = wants
            .iter()
            .filter(|(_, c)| !c.zeros)
            .map(|(_, c)| c.comp_end)
            .max()
        else {
            return;
        };
        if window == 0 {
            return;
        }
        let index = self.layer.index();
        let chunk = |&(node, k): &(NodeId, u32)| index.entry(node).chunks()[k as usize];
        let table = self.by_offset.get_or_init(|| {
            let mut all: Vec<(NodeId, u32)> = Vec::new();
            for id in 0..index.len() {
                let e = index.entry(NodeId(id as u32));
                if e.kind() == EntryKind::Reg && e.hardlink_target().is_none() {
                    let real = e.chunks().iter().enumerate().filter(|(_, c)| !c.zeros);
                    all.extend(real.map(|(k, _)| (e.id(), k as u32)));
                }
            }
            all.sort_by_key(|at| {
                let c = chunk(at);
                (c.comp_offset, c.inner_offset)
            });
            all
        });
        let limit = end.saturating_add(window);
        let mut leads = Vec::new();
        let first = table.partition_point(|at| chunk(at).comp_offset < end);
        for at in &table[first..] {
            let (node, c) = (at.0, &chunk(at));
            if c.comp_end > limit {
                break;
            }
            if self.cache.contains(&c.digest) {
                continue;
            }
            if let Joined::Lead(lead, _) = self.join_or_lead(node, c) {
                leads.push(lead);
            }
        }
        for (range, group) in self.group(leads, self.config.max_range_bytes) {
            let this = Arc::clone(self);
            self.handle
                .spawn(async move { this.fetch_range(range, group, Purpose::Neighbour).await });
        }
    }

    /// The whole decompressed, verified chunks, in order: from the cache, from a fetch
    /// already in flight, or from new range requests (coalesced) spawned here.
    pub(crate) async fn chunks(
        self: &Arc<Self>,
        wants: &[(NodeId, Chunk)],
        purpose: Purpose,
    ) -> Result<Vec<Bytes>> {
        let mut out: Vec<Option<Bytes>> = vec![None; wants.len()];
        let mut waits: Vec<(usize, watch::Receiver<Slot>)> = Vec::new();
        let mut leads: Vec<Lead> = Vec::new();
        for (i, (node, c)) in wants.iter().enumerate() {
            if let Some(b) = self.cache.get(&c.digest, c.size) {
                Counters::add(&self.counters.cache_hits, 1);
                out[i] = Some(b);
                continue;
            }
            if c.zeros {
                out[i] = Some(self.zeros(*node, c)?);
                continue;
            }
            match self.join_or_lead(*node, c) {
                Joined::Ready(b) => {
                    Counters::add(&self.counters.cache_hits, 1);
                    out[i] = Some(b);
                }
                Joined::Wait(rx) => {
                    Counters::add(&self.counters.cache_misses, 1);
                    waits.push((i, rx));
                }
                Joined::Lead(lead, rx) => {
                    Counters::add(&self.counters.cache_misses, 1);
                    leads.push(lead);
                    waits.push((i, rx));
                }
            }
        }
        for (range, group) in self.group(leads, self.config.max_range_bytes) {
            let this = Arc::clone(self);
            // A task of its own: the fetch completes for every waiter even if the reader
            // that started it goes away.
            self.handle
                .spawn(async move { this.fetch_range(range, group, purpose).await });
        }
        for (i, mut rx) in waits {
            let res = match rx.wait_for(Option::is_some).await {
                Ok(slot) => slot.clone(),
                Err(_) => Some(Err(Arc::from("fetch task ended without an answer"))),
            };
            match res {
                Some(Ok(b)) => out[i] = Some(b),
                Some(Err(reason)) => {
                    let (_, c) = &wants[i];
                    return Err(Error::Fetch {
                        layer: self.name.clone(),
                        start: c.comp_offset,
                        end: c.comp_end,
                        reason: reason.to_string(),
                    });
                }
                None => {}
            }
        }
        out.into_iter()
            .map(|b| b.ok_or(Error::Invalid("chunk left unanswered")))
            .collect()
    }

    /// Joins the fetch of `c` already in flight, or registers a new one led by the
    /// caller. Checks the memory cache under the lock: a finished fetch stores its chunk
    /// before it leaves the in-flight table, so no fetch is ever started twice.
    fn join_or_lead(&self, node: NodeId, c: &Chunk) -> Joined {
        let mut inflight = lock(&self.inflight);
        if let Some(rx) = inflight.get(&c.digest) {
            // A fetch task that died (runtime shutting down) leaves a closed channel.
            if rx.has_changed().is_ok() || rx.borrow().is_some() {
                return Joined::Wait(rx.clone());
            }
        }
        if let Some(b) = self.cache.get_memory(&c.digest) {
            return Joined::Ready(b);
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(c.digest, rx.clone());
        Joined::Lead(
            Lead {
                node,
                chunk: *c,
                tx,
            },
            rx,
        )
    }

    /// Sorts chunks by blob offset and cuts them into ranges of nearby chunks, each at
    /// most `max` bytes unless a single chunk is larger.
    fn group(&self, mut leads: Vec<Lead>, max: u64) -> Vec<(Range<u64>, Vec<Lead>)> {
        leads.sort_by_key(|l| (l.chunk.comp_offset, l.chunk.inner_offset));
        let mut out: Vec<(Range<u64>, Vec<Lead>)> = Vec::new();
        for lead in leads {
            let (s, e) = (lead.chunk.comp_offset, lead.chunk.comp_end);
            if let Some((range, group)) = out.last_mut() {
                let near = s <= range.end.saturating_add(self.config.coalesce_gap);
                if near && e.max(range.end) - range.start <= max {
                    range.end = range.end.max(e);
                    group.push(lead);
                    continue;
                }
            }
            out.push((s..e, vec![lead]));
        }
        out
    }

    /// One range request. Its body is used as it arrives: as soon as the bytes of the
    /// next chunks are in, they are inflated, verified, cached and handed to their
    /// waiters (off the async workers: inflating 4 MiB takes milliseconds), so a reader
    /// of the first file of a long range waits for that file, not for the range.
    async fn fetch_range(self: Arc<Self>, range: Range<u64>, leads: Vec<Lead>, purpose: Purpose) {
        Counters::add(&self.counters.range_requests, 1);
        let keep = purpose.keep_in_memory();
        let len = range.end - range.start;
        let started = Instant::now();
        let mut leads = leads;
        leads.sort_by_key(|l| (l.chunk.comp_offset, l.chunk.inner_offset));
        let arriving = Mutex::new(Arriving {
            base: range.start,
            // One allocation for the whole body; segments split off it share it.
            buf: bytes::BytesMut::with_capacity(len.min(64 << 20) as usize),
            received: 0,
            leads: leads.into(),
            jobs: Vec::new(),
        });
        let on_data = |piece: Bytes| {
            let mut a = lock(&arriving);
            a.received += piece.len() as u64;
            a.buf.extend_from_slice(&piece);
            if let Some((start, data, ready)) = a.take_ready() {
                let job = self.process(start, data, ready, keep);
                a.jobs.push(job);
            }
        };
        let read = self
            .layer
            .blob()
            .read_at_streaming(range.start, len, &on_data);
        let outcome = tokio::time::timeout(self.config.fetch_timeout, read).await;
        tracing::debug!(layer = %self.name, start = range.start, len, ?purpose,
            ms = started.elapsed().as_millis() as u64, "range fetched");
        let Arriving {
            received,
            leads: rest,
            jobs,
            ..
        } = arriving.into_inner().unwrap_or_else(|p| p.into_inner());
        let failure = match outcome {
            Err(_) => Some(format!("timed out after {:?}", self.config.fetch_timeout)),
            Ok(Err(e)) => Some(e.to_string()),
            Ok(Ok(())) if received != len => Some(format!("got {received} bytes, asked for {len}")),
            // Every chunk lies inside the range, so a complete body leaves none waiting.
            Ok(Ok(())) if !rest.is_empty() => Some("chunks left over after the range".into()),
            Ok(Ok(())) => None,
        };
        match failure {
            Some(reason) => {
                Counters::add(&self.counters.fetch_errors, 1);
                tracing::warn!(layer = %self.name, start = range.start, end = range.end,
                    %reason, "range request failed");
                let reason: Arc<str> = Arc::from(reason);
                for lead in rest {
                    self.finish(lead, Err(reason.clone()));
                }
            }
            None => Counters::add(&self.counters.bytes_fetched, len),
        }
        for job in jobs {
            if let Err(e) = job.await {
                // The leads were dropped with the closure: their waiters see a closed
                // channel and report EIO; the stale table entries are replaced on next use.
                tracing::error!(layer = %self.name, error = %e, "chunk inflation task failed");
            }
        }
    }

    /// Inflates, verifies and caches `leads`, whose bytes are in `data` (which starts at
    /// blob offset `start`), on a blocking thread; then hands each to its waiters.
    fn process(
        self: &Arc<Self>,
        start: u64,
        data: Bytes,
        leads: Vec<Lead>,
        keep: bool,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        let busy = Busy::new(&self.writes);
        self.handle.spawn_blocking(move || {
            let _busy = busy;
            // Waiters first, disk second: a reader should not wait for chunk files to
            // be written. Chunks kept in memory are found there meanwhile; the others
            // (background fetch) go to disk before their waiters hear of them, so a
            // reader never refetches a chunk that is on its way to disk.
            let mut to_disk = Vec::new();
            for lead in leads {
                let res = this.inflate(&lead, &data[..], start, keep);
                match &res {
                    Ok(b) if keep => to_disk.push((lead.chunk.digest, b.clone())),
                    Ok(b) => this.cache.put_disk(lead.chunk.digest, b),
                    Err(_) => {}
                }
                this.finish(lead, res);
            }
            for (digest, b) in to_disk {
                this.cache.put_disk(digest, &b);
            }
        })
    }

    fn inflate(
        &self,
        lead: &Lead,
        data: &[u8],
        start: u64,
        keep: bool,
    ) -> std::result::Result<Bytes, Arc<str>> {
        let c = &lead.chunk;
        let rel = (c.comp_offset - start) as usize;
        let bytes = data.get(rel..).unwrap_or(&[]);
        match self.layer.decompress_chunk(lead.node, c, bytes) {
            Ok(v) => {
                let b = Bytes::from(v);
                if keep {
                    self.cache.put_memory(c.digest, b.clone());
                }
                Ok(b)
            }
            Err(e) => {
                Counters::add(&self.counters.verification_failures, 1);
                tracing::warn!(layer = %self.name, path = %self.path(lead.node),
                    error = %e, "chunk failed verification");
                Err(Arc::from(e.to_string()))
            }
        }
    }

    fn finish(&self, lead: Lead, res: std::result::Result<Bytes, Arc<str>>) {
        {
            let mut inflight = lock(&self.inflight);
            // Only our own entry: compare channels, not just the digest.
            if inflight
                .get(&lead.chunk.digest)
                .is_some_and(|rx| rx.same_channel(&lead.tx.subscribe()))
            {
                inflight.remove(&lead.chunk.digest);
            }
        }
        lead.tx.send_replace(Some(res));
    }

    /// Notes a read of `node` at `offset..end` and, when the file is being read
    /// sequentially, issues read-ahead: a window that doubles on every refill, split
    /// into several range requests fetched in parallel.
    pub(crate) fn note_read(self: &Arc<Self>, node: NodeId, offset: u64, end: u64, size: u64) {
        let issue = {
            let mut seq = lock(&self.seq);
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
                    run: 1,
                    ..SeqState::default()
                };
            }
            // Two sequential reads in a row before spending bandwidth on a guess.
            if st.run < 2 {
                return;
            }
            if st.window == 0 {
                st.window = self.config.readahead_initial;
                st.issued = end;
            }
            // Refill when less than half a window is left ahead of the reader.
            if st.issued >= size || st.issued > end.saturating_add(st.window / 2) {
                return;
            }
            let from = st.issued.max(end);
            let to = end.saturating_add(st.window).min(size);
            st.issued = to;
            st.window = (st.window * 2).min(self.config.readahead_max);
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
            let slots = Arc::clone(&self.readahead_slots);
            self.handle.spawn(async move {
                let Ok(_permit) = slots.acquire_owned().await else {
                    return;
                };
                let _guard = DemandGuard::new(&this.demand);
                if let Err(e) = this.chunks(&part, Purpose::ReadAhead).await {
                    tracing::debug!(layer = %this.name, error = %e, "read-ahead failed");
                }
            });
        }
    }

    /// A read of `node` at `offset` has to wait for the network: from now on its
    /// sequential reads are read ahead from the network too, starting here.
    pub(crate) fn note_miss(&self, node: NodeId, offset: u64) {
        let mut seq = lock(&self.seq);
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
            let slots = Arc::clone(&self.readahead_slots);
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

    /// Every chunk of every regular file, with its node.
    fn all_chunks(&self) -> Vec<(NodeId, Chunk)> {
        let index = self.layer.index();
        let mut out = Vec::with_capacity(index.all_chunks().len());
        for id in 0..index.len() {
            let e = index.entry(NodeId(id as u32));
            if e.kind() == EntryKind::Reg {
                out.extend(e.chunks().iter().map(|c| (e.id(), *c)));
            }
        }
        out
    }

    /// Fetches what the layer says a container reads first: the chunks `lazysnap
    /// optimize` marked, or else the prioritized range (`0..offset of
    /// .prefetch.landmark`), in pieces of at most `max_range_bytes`.
    pub(crate) async fn prefetch(self: &Arc<Self>) {
        let index = self.layer.index();
        let marked = index.has_prefetch_marks();
        let range = match index.prefetch_range() {
            Some(r) => r,
            None if marked => 0..0,
            None => return,
        };
        let wanted = |c: &Chunk| {
            if marked {
                c.prefetch
            } else {
                c.comp_end <= range.end
            }
        };
        let mut leads = Vec::new();
        for (node, c) in self.all_chunks() {
            if c.zeros || !wanted(&c) || self.cache.contains(&c.digest) {
                continue;
            }
            if let Joined::Lead(lead, _) = self.join_or_lead(node, &c) {
                leads.push(lead);
            }
        }
        // Pieces in blob order, a few at a time: the first files the command reads
        // arrive first, readers are not held until everything is in, and no request
        // outlives `fetch_timeout` on a slow link (a 1 GiB range at 100 Mbit/s would
        // not). The prioritized range is contiguous and bridged whole; marked chunks
        // lie apart (the unread parts of their files between them), so a gap wider
        // than `coalesce_gap` starts a new piece.
        let gap = if marked {
            self.config.coalesce_gap
        } else {
            u64::MAX
        };
        leads.sort_by_key(|l| (l.chunk.comp_offset, l.chunk.inner_offset));
        let mut pieces: Vec<(Range<u64>, Vec<Lead>)> = Vec::new();
        for lead in leads {
            let (s, e) = (lead.chunk.comp_offset, lead.chunk.comp_end);
            if let Some((r, group)) = pieces.last_mut()
                && s <= r.end.saturating_add(gap)
                && e.max(r.end) - r.start <= self.config.max_range_bytes
            {
                r.end = r.end.max(e);
                group.push(lead);
                continue;
            }
            pieces.push((s..e, vec![lead]));
        }
        tracing::debug!(layer = %self.name, marked, requests = pieces.len(), "prefetch");
        let slots = Arc::new(Semaphore::new(self.config.readahead_requests.max(1)));
        let mut tasks = Vec::with_capacity(pieces.len());
        for (piece, group) in pieces {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                break;
            };
            let this = Arc::clone(self);
            tasks.push(self.handle.spawn(async move {
                this.fetch_range(piece, group, Purpose::Prefetch).await;
                drop(permit);
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Fetches every chunk not yet local, in blob order, one modest range at a time,
    /// pausing while on-demand reads wait for the network and keeping to the rate
    /// limit. Chunks go to disk only, so the memory cache keeps what readers use.
    pub(crate) async fn background(self: &Arc<Self>) {
        if !self.cache.disk_enabled() {
            return;
        }
        let mut todo = self.all_chunks();
        todo.retain(|(_, c)| !c.zeros);
        todo.sort_by_key(|(_, c)| (c.comp_offset, c.inner_offset));
        let mut seen = HashSet::new();
        todo.retain(|(_, c)| seen.insert(c.digest));
        let mut demand = self.demand.subscribe();
        let mut i = 0;
        while i < todo.len() {
            let mut batch: Vec<(NodeId, Chunk)> = Vec::new();
            let mut span: Option<Range<u64>> = None;
            while i < todo.len() {
                let c = todo[i].1;
                if self.cache.contains(&c.digest) {
                    i += 1;
                    continue;
                }
                if let Some(r) = &span {
                    let far = c.comp_offset > r.end.saturating_add(self.config.coalesce_gap);
                    if far || c.comp_end.max(r.end) - r.start > self.config.background_request_bytes
                    {
                        break;
                    }
                }
                span = Some(match span {
                    Some(r) => r.start..r.end.max(c.comp_end),
                    None => c.comp_offset..c.comp_end,
                });
                batch.push(todo[i]);
                i += 1;
            }
            let Some(span) = span else { break };
            // Yield to readers: wait until no on-demand read waits for the network.
            if demand.wait_for(|n| *n == 0).await.is_err() {
                return;
            }
            let started = Instant::now();
            if let Err(e) = self.chunks(&batch, Purpose::Background).await {
                tracing::debug!(layer = %self.name, error = %e, "background fetch failed");
            }
            if let Some(rate) = self.config.background_rate_limit {
                let due = Duration::from_secs_f64((span.end - span.start) as f64 / rate as f64);
                tokio::time::sleep_until((started + due).into()).await;
            }
        }
    }

    /// The key a whole copy of `node`'s content is stored under: a digest of its chunk
    /// list, so equal files of different layers share one copy.
    fn file_key(&self, node: NodeId) -> Digest {
        let chunks = self.layer.chunks_for_range(node, 0, u64::MAX);
        let mut text = Vec::with_capacity(32 + chunks.len() * 48);
        text.extend_from_slice(b"lazysnap whole file v1\0");
        for c in chunks {
            text.extend_from_slice(&c.digest.0);
            text.extend_from_slice(&c.file_offset.to_le_bytes());
            text.extend_from_slice(&c.size.to_le_bytes());
        }
        Digest::of(&text)
    }

    /// Regular files big enough for passthrough, hardlinks resolved; `None` otherwise.
    fn passthrough_size(&self, node: NodeId) -> Option<(NodeId, u64)> {
        if !self.config.passthrough || !self.cache.disk_enabled() {
            return None;
        }
        let index = self.layer.index();
        let e = index.entry(index.resolve(node));
        (e.kind() == EntryKind::Reg && e.size() >= self.config.passthrough_min_bytes.max(1))
            .then(|| (e.id(), e.size()))
    }

    /// A local copy of the whole file, if one is stored, for the kernel to read directly.
    pub(crate) fn whole_file(&self, node: NodeId) -> Option<std::fs::File> {
        let (node, _) = self.passthrough_size(node)?;
        self.cache.whole_file(&self.file_key(node))
    }

    /// When every chunk of `node` is local and no whole copy exists yet, writes one in
    /// the background (from verified chunks) so that later opens can use passthrough.
    pub(crate) fn maybe_store_whole(self: &Arc<Self>, node: NodeId) {
        let Some((node, size)) = self.passthrough_size(node) else {
            return;
        };
        let chunks = self.layer.chunks_for_range(node, 0, size);
        // In memory counts too: the last chunks a reader got may still be on their way
        // to disk when it closes the file.
        if !chunks
            .iter()
            .all(|c| c.zeros || self.cache.contains(&c.digest))
        {
            return;
        }
        let key = self.file_key(node);
        if self.cache.has_whole_file(&key) || !lock(&self.assembling).insert(key) {
            return;
        }
        let busy = Busy::new(&self.writes);
        let this = Arc::clone(self);
        let job = move || {
            let _busy = busy;
            let res = this.cache.store_whole_file(key, size, |f| {
                use std::io::Write as _;
                for c in this.layer.chunks_for_range(node, 0, size) {
                    let data = if c.zeros {
                        this.zeros(node, c).map_err(std::io::Error::other)?
                    } else {
                        this.cache
                            .get_uncached(&c.digest, c.size)
                            .ok_or_else(|| std::io::Error::other("a chunk left the cache"))?
                    };
                    f.write_all(&data)?;
                }
                Ok(())
            });
            match res {
                Ok(()) => tracing::debug!(layer = %this.name, path = %this.path(node),
                    "stored a whole copy for passthrough"),
                Err(e) => tracing::debug!(layer = %this.name, path = %this.path(node),
                    error = %e, "no whole copy for passthrough"),
            }
            lock(&this.assembling).remove(&key);
        };
        drop(self.handle.spawn_blocking(job));
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
            prefetch_done: *self.prefetch_done.borrow(),
            background_done: *self.background_done.borrow(),
            // Timed by the FUSE adapter, which fills it in.
            op_latency: Vec::new(),
        }
    }
}

enum Joined {
    Ready(Bytes),
    Wait(watch::Receiver<Slot>),
    Lead(Lead, watch::Receiver<Slot>),
}
