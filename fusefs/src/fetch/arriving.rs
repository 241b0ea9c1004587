//! One range request, its body used as it arrives: as soon as the bytes of the next
//! chunks are in, they are inflated, verified, cached and handed to their waiters, so a
//! reader of the first file of a long range waits for that file, not for the range.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::inflight::Lead;
use super::{Counted, Fetcher, Purpose, lock};
use crate::buffers::{self, BIG_BUFFERS, BufferPool, UNPOOLED};
use crate::cache::DIRECT_ALIGN;
use crate::stats::Counters;

/// The most a chunk's buffer is given up front; a bigger chunk grows it as it inflates.
const MAX_RESERVE: u64 = 16 << 20;

/// Chunks from this size on are aligned for O_DIRECT (smaller ones are copied: the
/// copy is cheap, the alignment would waste memory).
const BIG_CHUNK: usize = 256 << 10;

/// Range requests of the whole process whose bodies are arriving in pooled buffers, and
/// how many ever started (so that an idle spell can tell it was not interrupted).
static RANGES_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static RANGES_STARTED: AtomicUsize = AtomicUsize::new(0);

/// How long no pooled body must arrive anywhere before kept buffers go back to the
/// kernel: longer than a sequential reader's gaps between requests, short against a
/// container's life.
const IDLE_RELEASE: Duration = Duration::from_millis(200);

/// Where a range's buffers come from. Only what a container waits for, or soon will
/// (`keep`: kept in memory), reuses buffers: the background fetch goes on after the
/// container's exit and has no hurry, and a pool kept busy by it would stay resident
/// all that time.
fn pool_for(keep: bool) -> &'static BufferPool {
    if keep { &BIG_BUFFERS } else { &UNPOOLED }
}

/// One of [`RANGES_IN_FLIGHT`], also when its request is given up (a dropped future).
struct PooledRange;

impl PooledRange {
    fn new() -> Self {
        RANGES_STARTED.fetch_add(1, Ordering::Relaxed);
        RANGES_IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for PooledRange {
    fn drop(&mut self) {
        if RANGES_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed) != 1 {
            return;
        }
        let started = RANGES_STARTED.load(Ordering::Relaxed);
        let release = move || {
            let idle = RANGES_IN_FLIGHT.load(Ordering::Relaxed) == 0
                && RANGES_STARTED.load(Ordering::Relaxed) == started;
            if idle {
                BIG_BUFFERS.release();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    tokio::time::sleep(IDLE_RELEASE).await;
                    release();
                });
            }
            Err(_) => release(),
        }
    }
}

/// The body of one range request as it arrives, and the chunks still waiting for it.
struct Arriving {
    /// Blob offset of `buf`'s first byte.
    base: u64,
    buf: BytesMut,
    received: u64,
    /// In blob order.
    leads: VecDeque<Lead>,
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

impl Fetcher {
    /// One range request for `leads` (all inside `range`), counted on the link as its
    /// purpose says (a prefetch piece is counted by the prefetch from its turn on).
    /// Inflation runs off the async workers (4 MiB take milliseconds).
    pub(crate) async fn fetch_range(
        self: Arc<Self>,
        range: Range<u64>,
        leads: Vec<Lead>,
        purpose: Purpose,
    ) {
        let len = range.end - range.start;
        // The host just left a request unanswered for a whole timeout: a reader's new
        // request fails now, so that one read never waits out several timeouts in turn
        // (the kernel retries a failed page, and queues reads behind busy ones). The
        // background waits its turn instead, and tries again after the window.
        if purpose != Purpose::Background
            && let Some(ago) = self.link.stalled_within(self.config.fetch_timeout)
        {
            let reason: Arc<str> = Arc::from(format!(
                "the registry left a request unanswered for {:?} {:.1} s ago; not asked \
                 again for {:.1} s",
                self.config.fetch_timeout,
                ago.as_secs_f64(),
                (self.config.fetch_timeout - ago).as_secs_f64()
            ));
            Counters::add(&self.counters.fetch_errors, 1);
            for lead in leads {
                self.inflight.finish(lead, Err(reason.clone()));
            }
            return;
        }
        let _busy = purpose
            .class()
            .filter(|_| purpose != Purpose::Prefetch)
            .map(|class| self.link.busy(class, len));
        Counters::add(&self.counters.range_requests, 1);
        let keep = purpose.keep_in_memory();
        let pool = pool_for(keep);
        let _pooled = keep.then(PooledRange::new);
        let started = Instant::now();
        let mut leads = leads;
        super::blob_order::sort(&mut leads);
        let arriving = Mutex::new(Arriving {
            base: range.start,
            // One buffer for the whole body; segments split off it share it.
            buf: buffers::take_mut(pool, len.min(64 << 20) as usize),
            received: 0,
            leads: leads.into(),
            jobs: Vec::new(),
        });
        let on_data = |piece: Bytes| {
            self.link.delivered(piece.len() as u64);
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
            mut buf,
            received,
            leads: rest,
            jobs,
            ..
        } = arriving.into_inner().unwrap_or_else(|p| p.into_inner());
        let failure = match outcome {
            Err(_) => {
                if purpose != Purpose::Background {
                    self.link.stalled();
                }
                Some(format!("timed out after {:?}", self.config.fetch_timeout))
            }
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
                    self.inflight.finish(lead, Err(reason.clone()));
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
        // The jobs are done with their segments: the body's buffer is ours alone again.
        buf.clear();
        pool.give_back(buf.into());
        crate::heap::return_free_pages();
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
        let busy = Counted::new(&self.writes);
        self.handle.spawn_blocking(move || {
            let _busy = busy;
            // Waiters first, disk second: a reader should not wait for chunk files to
            // be written. Chunks kept in memory are found there meanwhile; the others
            // (background fetch) go to disk before their waiters hear of them, so a
            // reader never refetches a chunk that is on its way to disk.
            let mut to_disk = Vec::new();
            let mut leads = leads.into_iter().peekable();
            while let Some(lead) = leads.next() {
                if this.spans {
                    // The pieces of one span come out of one inflation of it.
                    let mut group = vec![lead];
                    while let Some(next) =
                        leads.next_if(|l| l.chunk.comp_offset == group[0].chunk.comp_offset)
                    {
                        group.push(next);
                    }
                    this.serve_span(group, &data[..], start, keep, &mut to_disk);
                    continue;
                }
                let res = this.inflate(&lead, &data[..], start, keep);
                match &res {
                    Ok(b) if keep => to_disk.push((lead.chunk.digest, b.clone())),
                    Ok(b) => this.cache.put_disk(lead.chunk.digest, b),
                    Err(_) => {}
                }
                this.inflight.finish(lead, res);
            }
            for (digest, b) in to_disk {
                if this.spans {
                    this.cache.put_disk_named(digest, &b);
                } else {
                    this.cache.put_disk(digest, &b);
                }
            }
        })
    }

    /// Serves `group` (pieces of one span, whose bytes are in `data` from blob offset
    /// `start`) from one verified inflation of the span: its waiters get their pieces as
    /// soon as the inflater has produced them, and the span's other pieces (made leads
    /// first, so that a reader of the file beside waits for this inflation instead of
    /// fetching the span again) when the rest is out. Pieces kept in memory go to disk
    /// through `to_disk` afterwards; the others (background fetch) to disk at once.
    fn serve_span(
        self: &Arc<Self>,
        group: Vec<Lead>,
        data: &[u8],
        start: u64,
        keep: bool,
        to_disk: &mut Vec<(estargz::Sha256Sum, Bytes)>,
    ) {
        let span_at = group[0].chunk.comp_offset;
        let rel = (span_at - start) as usize;
        let bytes = data
            .get(rel..rel + group[0].chunk.comp_len() as usize)
            .unwrap_or(&[]);
        let others = self
            .order
            .span_pieces(self.layer.index(), span_at)
            .into_iter()
            .filter(|(_, c)| group.iter().all(|l| l.chunk.digest != c.digest));
        let siblings = self.inflight.claim(&self.cache, others);
        let need = group
            .iter()
            .map(|l| l.chunk.inner_offset as usize + l.chunk.size as usize)
            .max()
            .unwrap_or(0);
        let mut waiting = Some(group);
        let hand_over = |span: &[u8], leads: Vec<Lead>, to_disk: &mut Vec<_>| {
            for lead in leads {
                let c = &lead.chunk;
                let from = c.inner_offset as usize;
                let res = match span.get(from..from + c.size as usize) {
                    Some(piece) => {
                        let pool = pool_for(keep);
                        let mut out = pool.take(piece.len());
                        out.extend_from_slice(piece);
                        let b = buffers::into_bytes(pool, out);
                        if keep {
                            self.cache.put_memory(c.digest, b.clone());
                            to_disk.push((c.digest, b.clone()));
                        } else {
                            self.cache.put_disk_named(c.digest, &b);
                        }
                        Ok(b)
                    }
                    None => Err(Arc::from(format!(
                        "the span at {span_at} inflates to {} bytes, short of a piece at \
                         {from} of {}",
                        span.len(),
                        c.size
                    ))),
                };
                self.inflight.finish(lead, res);
            }
        };
        let inflated = self
            .layer
            .inflate_span_staged(span_at, bytes, need, &mut |prefix| {
                if let Some(leads) = waiting.take() {
                    hand_over(prefix, leads, to_disk);
                }
            });
        match inflated {
            Ok(span) => hand_over(&span, siblings, to_disk),
            Err(e) => {
                Counters::add(&self.counters.verification_failures, 1);
                tracing::warn!(layer = %self.name, offset = span_at, error = %e,
                    "span failed verification");
                let reason: Arc<str> = Arc::from(e.to_string());
                for lead in waiting.take().into_iter().flatten().chain(siblings) {
                    self.inflight.finish(lead, Err(reason.clone()));
                }
            }
        }
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
        // A hostile TOC's size reserves no more than a real chunk's.
        let size = c.size.min(MAX_RESERVE) as usize;
        // A big chunk starts on a disk block, so that the disk cache can write it with
        // O_DIRECT from here instead of from a copy.
        let aligned = size >= BIG_CHUNK;
        let pool = pool_for(keep);
        let mut out = pool.take(if aligned { size + DIRECT_ALIGN } else { size });
        let lead_in = if aligned {
            out.as_ptr().align_offset(DIRECT_ALIGN)
        } else {
            0
        };
        out.resize(lead_in, 0);
        match self
            .layer
            .decompress_chunk_into(lead.node, c, bytes, &mut out)
        {
            Ok(()) => {
                let b = buffers::into_bytes(pool, out).slice(lead_in..);
                if keep {
                    self.cache.put_memory(c.digest, b.clone());
                }
                Ok(b)
            }
            Err(e) => {
                pool.give_back(out);
                Counters::add(&self.counters.verification_failures, 1);
                tracing::warn!(layer = %self.name, path = %self.path(lead.node),
                    error = %e, "chunk failed verification");
                Err(Arc::from(e.to_string()))
            }
        }
    }
}
