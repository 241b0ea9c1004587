//! A registry host's link, shared by every layer fetched from it: the order of
//! precedence on the network. Demand reads (and what serves the reader: read-ahead,
//! neighbours) come first, then prefetch, then the background fetch, which sends
//! nothing while either of the others has a request in flight or had one within the
//! quiet period, sends one small request at a time for the whole host, and keeps to
//! the host's rate budget. A container that is starting never waits behind bytes
//! nobody asked for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use estargz::lock;
use tokio::time::Instant;

use tokio::sync::{OwnedMutexGuard, oneshot, watch};

use crate::config::FsConfig;

/// Who is using the link right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// A reader waits for these bytes (or will soon: read-ahead, neighbours).
    Demand,
    /// What the layer says its container reads first.
    Prefetch,
}

#[derive(Debug, Clone, Copy)]
struct Activity {
    demand: usize,
    prefetch: usize,
    /// Compressed bytes of the prefetch requests in flight.
    prefetch_bytes: u64,
    /// When demand or prefetch last stopped (or a layer was mounted).
    last: Instant,
    /// When a layer of the host was last mounted.
    mounted: Instant,
}

/// How long after a mount filesystem operations, not only network reads, hold the
/// background back: a container listing a tree or reading cached files is starting
/// too, and the background's inflating, hashing and disk writes would take the CPU it
/// needs. Later, only the network counts, so a busy service does not keep its layers
/// from ever becoming local.
const START_UP: Duration = Duration::from_secs(60);

/// Filesystem operations closer together than this are noted once.
const OP_GRAIN_MS: u64 = 10;

/// One registry host's share of the network, cheap to clone. Every layer from the
/// host gets the same one (see [`Links`]).
#[derive(Clone)]
pub struct Link(Arc<Inner>);

struct Inner {
    activity: watch::Sender<Activity>,
    /// When the link was made, and milliseconds after that of the last filesystem
    /// operation on any of its layers (an atomic: every FUSE request notes it).
    epoch: Instant,
    last_op_ms: AtomicU64,
    quiet: Duration,
    /// Background bytes per second for the whole host; `None`: unlimited.
    rate: Option<u64>,
    /// Held by the one background request in flight; holds the time the rate budget
    /// lets the next one start.
    background: Arc<tokio::sync::Mutex<Instant>>,
    /// Prefetch requests in flight for the whole host, at most.
    prefetch_slots: Arc<PrefetchSlots>,
    /// Prefetch bytes that may be in flight beside a waiting reader's request.
    shared_with_reader: u64,
    /// Bytes the host has delivered so far, and samples of that count over the last
    /// [`RATE_WINDOW`], for the rate the link carries.
    delivered: AtomicU64,
    samples: Mutex<std::collections::VecDeque<(Instant, u64)>>,
    /// Milliseconds after `epoch` when a request the host did not answer in time ended
    /// (0: none did).
    stalled_ms: AtomicU64,
}

/// How far back the link's rate is measured.
const RATE_WINDOW: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = *self.0.activity.borrow();
        f.debug_struct("Link")
            .field("demand", &a.demand)
            .field("prefetch", &a.prefetch)
            .field("quiet", &self.0.quiet)
            .field("rate", &self.0.rate)
            .finish()
    }
}

/// Counts one request (or waiting reader) of a class, and its bytes, on the link while
/// alive.
pub(crate) struct Busy {
    link: Link,
    class: Class,
    bytes: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let (class, bytes) = (self.class, self.bytes);
        self.link.0.activity.send_modify(|a| {
            match class {
                Class::Demand => a.demand = a.demand.saturating_sub(1),
                Class::Prefetch => {
                    a.prefetch = a.prefetch.saturating_sub(1);
                    a.prefetch_bytes = a.prefetch_bytes.saturating_sub(bytes);
                }
            }
            a.last = Instant::now();
        });
    }
}

/// The background's turn on the link: only one at a time per host.
pub(crate) struct BackgroundTurn {
    _slot: OwnedMutexGuard<Instant>,
}

/// A prefetch request's turn on the link.
pub(crate) struct PrefetchTurn {
    _slot: SlotGuard,
}

/// How far one layer's prefetch stands ahead of its container's reads, in blob bytes:
/// the host's prefetch slots go first to the layer whose container is closest to
/// catching up with its prefetch (the layers' prioritized files are in the order their
/// container reads them, but nothing says in which order it moves between layers).
#[derive(Debug, Default)]
pub(crate) struct PrefetchFront {
    /// Where the layer's next prefetch request starts.
    prefetched: AtomicU64,
    /// The furthest a reader has got among the chunks the prefetch fetches.
    read: AtomicU64,
}

impl PrefetchFront {
    pub(crate) fn prefetching_from(&self, offset: u64) {
        self.prefetched.store(offset, Ordering::Relaxed);
    }

    /// Called on every read: a plain load first, so reads behind the furthest one
    /// (most of them) write nothing to the shared cache line.
    pub(crate) fn read_up_to(&self, end: u64) {
        if end > self.read.load(Ordering::Relaxed) {
            self.read.fetch_max(end, Ordering::Relaxed);
        }
    }

    fn lead(&self) -> u64 {
        self.prefetched
            .load(Ordering::Relaxed)
            .saturating_sub(self.read.load(Ordering::Relaxed))
    }
}

/// The host's prefetch slots, given to waiting layers by least lead, then first come.
struct PrefetchSlots {
    state: Mutex<SlotState>,
}

struct SlotState {
    free: usize,
    waiting: Vec<SlotWaiter>,
    seq: u64,
}

struct SlotWaiter {
    front: Arc<PrefetchFront>,
    seq: u64,
    tx: oneshot::Sender<SlotGuard>,
}

/// A slot held; dropping it hands it on.
struct SlotGuard {
    slots: Option<Arc<PrefetchSlots>>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            PrefetchSlots::release(&slots);
        }
    }
}

impl PrefetchSlots {
    async fn acquire(self: &Arc<Self>, front: Arc<PrefetchFront>) -> SlotGuard {
        let rx = {
            let mut s = lock(&self.state);
            if s.free > 0 {
                s.free -= 1;
                return SlotGuard {
                    slots: Some(Arc::clone(self)),
                };
            }
            let (tx, rx) = oneshot::channel();
            s.seq += 1;
            let seq = s.seq;
            s.waiting.push(SlotWaiter { front, seq, tx });
            rx
        };
        // The sender is dropped unsent only with the whole link.
        rx.await.unwrap_or(SlotGuard { slots: None })
    }

    fn release(self: &Arc<Self>) {
        loop {
            let next = {
                let mut s = lock(&self.state);
                let best = s
                    .waiting
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, w)| (w.front.lead(), w.seq))
                    .map(|(i, _)| i);
                match best {
                    Some(i) => s.waiting.swap_remove(i),
                    None => {
                        s.free += 1;
                        return;
                    }
                }
            };
            // Sent outside the lock: a refused guard hands the slot on right here.
            let guard = SlotGuard {
                slots: Some(Arc::clone(self)),
            };
            match next.tx.send(guard) {
                Ok(()) => return,
                Err(mut refused) => {
                    // The waiter gave up: the next one gets the slot.
                    refused.slots = None;
                }
            }
        }
    }
}

impl Link {
    /// `quiet`: how long demand and prefetch must have been idle before a background
    /// request goes out; `rate`: the host's background budget in bytes per second;
    /// `prefetch_requests`: prefetch requests in flight for the host at most;
    /// `shared_with_reader`: prefetch bytes in flight at most while a reader waits.
    pub fn new(
        quiet: Duration,
        rate: Option<u64>,
        prefetch_requests: usize,
        shared_with_reader: u64,
    ) -> Link {
        let now = Instant::now();
        Link(Arc::new(Inner {
            activity: watch::channel(Activity {
                demand: 0,
                prefetch: 0,
                prefetch_bytes: 0,
                last: now,
                mounted: now,
            })
            .0,
            epoch: now,
            last_op_ms: AtomicU64::new(0),
            quiet,
            rate: rate.filter(|r| *r > 0),
            background: Arc::new(tokio::sync::Mutex::new(now)),
            prefetch_slots: Arc::new(PrefetchSlots {
                state: Mutex::new(SlotState {
                    free: prefetch_requests.max(1),
                    waiting: Vec::new(),
                    seq: 0,
                }),
            }),
            shared_with_reader,
            delivered: AtomicU64::new(0),
            stalled_ms: AtomicU64::new(0),
            samples: Mutex::new(std::collections::VecDeque::new()),
        }))
    }

    /// A link with the quiet period and budget of `config`.
    pub fn for_config(config: &FsConfig) -> Link {
        Link::new(
            config.background_quiet,
            config.background_rate_limit,
            config.readahead_requests,
            config.prefetch_request_bytes,
        )
    }

    /// Counts a request of `class` for `bytes` (compressed) until the result is dropped.
    pub(crate) fn busy(&self, class: Class, bytes: u64) -> Busy {
        self.0.activity.send_modify(|a| match class {
            Class::Demand => a.demand += 1,
            Class::Prefetch => {
                a.prefetch += 1;
                a.prefetch_bytes += bytes;
            }
        });
        Busy {
            link: self.clone(),
            class,
            bytes,
        }
    }

    /// A layer was mounted: a container is on its way, and the quiet period starts
    /// again.
    pub(crate) fn mounted(&self) {
        let now = Instant::now();
        self.0.activity.send_modify(|a| {
            a.last = now;
            a.mounted = now;
        });
    }

    /// A filesystem operation on one of the host's layers (cheap: called for every FUSE
    /// request).
    pub(crate) fn note_op(&self) {
        let now = self.0.epoch.elapsed().as_millis() as u64;
        if now >= self.0.last_op_ms.load(Ordering::Relaxed) + OP_GRAIN_MS {
            self.0.last_op_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Resolves when neither demand nor prefetch has used the link for the quiet
    /// period, nor, within [`START_UP`] of a mount, has the filesystem been used.
    async fn quiet(&self) {
        let mut rx = self.0.activity.subscribe();
        loop {
            let a = *rx.borrow_and_update();
            if a.demand == 0 && a.prefetch == 0 {
                let mut idle = a.last.elapsed();
                if a.mounted.elapsed() < START_UP {
                    let op = self.0.epoch
                        + Duration::from_millis(self.0.last_op_ms.load(Ordering::Relaxed));
                    idle = idle.min(op.elapsed());
                }
                if idle >= self.0.quiet {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(self.0.quiet - idle) => {}
                    changed = rx.changed() => if changed.is_err() { return },
                }
            } else if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// `bytes` of a response arrived.
    /// A request to the host timed out: its reads fail at once for a while (see
    /// [`Link::stalled_within`]) instead of each waiting out a timeout of its own.
    pub(crate) fn stalled(&self) {
        let ms = self.0.epoch.elapsed().as_millis() as u64;
        self.0.stalled_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// How long ago a request to the host timed out, if within `window`.
    pub(crate) fn stalled_within(&self, window: Duration) -> Option<Duration> {
        let at = self.0.stalled_ms.load(Ordering::Relaxed);
        if at == 0 {
            return None;
        }
        let ago = self
            .0
            .epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(at));
        (ago < window).then_some(ago)
    }

    pub(crate) fn delivered(&self, bytes: u64) {
        let total = self.0.delivered.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let now = Instant::now();
        let mut samples = lock(&self.0.samples);
        if samples
            .back()
            .is_none_or(|(at, _)| now.duration_since(*at) >= RATE_WINDOW / 20)
        {
            samples.push_back((now, total));
        }
        while samples.len() > 2
            && samples
                .front()
                .is_some_and(|(at, _)| now - *at > RATE_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// Bytes per second the link carried over the last second of deliveries, once a
    /// tenth of a second of them has been seen.
    pub(crate) fn rate(&self) -> Option<f64> {
        let samples = lock(&self.0.samples);
        let ((t0, b0), (t1, b1)) = (*samples.front()?, *samples.back()?);
        let span = t1.duration_since(t0);
        (span >= RATE_WINDOW / 10).then(|| (b1 - b0) as f64 / span.as_secs_f64())
    }

    /// Waits for the turn of a prefetch request for `bytes`: a free slot of the host's
    /// (waiting layers get them by `front`'s lead), and, while a reader waits for the
    /// network, room beside the prefetch bytes in flight within `shared_with_reader`
    /// (one request always may go), so that the reader shares the link with at most
    /// that much. Counting bytes, not requests, lets small pieces (marked chunks lie
    /// apart) go together instead of each waiting for the one before: one at a time,
    /// each cost a round trip of idle link.
    pub(crate) async fn prefetch_turn(
        &self,
        front: &Arc<PrefetchFront>,
        bytes: u64,
    ) -> PrefetchTurn {
        let slot = self.0.prefetch_slots.acquire(Arc::clone(front)).await;
        let mut rx = self.0.activity.subscribe();
        let room = self.0.shared_with_reader;
        loop {
            let a = *rx.borrow_and_update();
            if a.demand == 0
                || a.prefetch == 0
                || a.prefetch_bytes.saturating_add(bytes) <= room
                || rx.changed().await.is_err()
            {
                break;
            }
        }
        PrefetchTurn { _slot: slot }
    }

    /// Waits for the background's turn to send `bytes`: the link quiet, no other
    /// background request of the host in flight, and the rate budget allowing it. The
    /// turn lasts as long as the returned value.
    pub(crate) async fn background_turn(&self, bytes: u64) -> BackgroundTurn {
        let mut slot = Arc::clone(&self.0.background).lock_owned().await;
        loop {
            self.quiet().await;
            let due = *slot;
            if due <= Instant::now() {
                break;
            }
            tokio::time::sleep_until(due).await;
        }
        if let Some(rate) = self.0.rate {
            let now = Instant::now();
            *slot = now + Duration::from_secs_f64(bytes as f64 / rate as f64);
        }
        BackgroundTurn { _slot: slot }
    }
}

/// The links of a daemon, one per registry host.
#[derive(Debug)]
pub struct Links {
    quiet: Duration,
    rate: Option<u64>,
    prefetch_requests: usize,
    shared_with_reader: u64,
    by_host: Mutex<HashMap<String, Link>>,
}

impl Links {
    pub fn new(config: &FsConfig) -> Links {
        Links {
            quiet: config.background_quiet,
            rate: config.background_rate_limit,
            prefetch_requests: config.readahead_requests,
            shared_with_reader: config.prefetch_request_bytes,
            by_host: Mutex::new(HashMap::new()),
        }
    }

    /// The link of `host` (as in an image reference: `registry.example:5000`).
    pub fn for_host(&self, host: &str) -> Link {
        let mut map = lock(&self.by_host);
        map.entry(host.to_string())
            .or_insert_with(|| {
                Link::new(
                    self.quiet,
                    self.rate,
                    self.prefetch_requests,
                    self.shared_with_reader,
                )
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MIB: u64 = 1 << 20;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    }

    #[test]
    fn the_background_waits_for_demand_and_prefetch_and_then_the_quiet_period() {
        rt().block_on(async {
            let link = Link::new(Duration::from_secs(2), None, 4, MIB);
            let demand = link.busy(Class::Demand, 0);
            let prefetch = link.busy(Class::Prefetch, MIB);
            let started = tokio::time::Instant::now();
            let l = link.clone();
            let turn = tokio::spawn(async move {
                let _t = l.background_turn(1).await;
                tokio::time::Instant::now()
            });
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert!(!turn.is_finished());
            drop(demand);
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert!(!turn.is_finished(), "prefetch still runs");
            drop(prefetch);
            let at = turn.await.unwrap();
            assert_eq!(
                at - started,
                Duration::from_secs(12),
                "10 s busy, then 2 s quiet"
            );
        });
    }

    #[test]
    fn one_background_request_per_host_at_a_time_within_the_budget() {
        rt().block_on(async {
            let links = Links::new(&FsConfig {
                background_quiet: Duration::ZERO,
                background_rate_limit: Some(1_000_000),
                ..FsConfig::default()
            });
            let (a, b) = (links.for_host("r:5000"), links.for_host("r:5000"));
            let other = links.for_host("s:5000");
            let started = tokio::time::Instant::now();
            let first = a.background_turn(2_000_000).await;
            // Another host is not held up.
            drop(other.background_turn(2_000_000).await);
            assert_eq!(started.elapsed(), Duration::ZERO);
            let waiting = tokio::spawn(async move {
                let _t = b.background_turn(1).await;
                tokio::time::Instant::now()
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!waiting.is_finished());
            drop(first);
            // 2 MB at 1 MB/s: the next request may start 2 s after the first.
            let at = waiting.await.unwrap();
            assert_eq!(at - started, Duration::from_secs(2));
        });
    }

    #[test]
    fn while_a_reader_waits_prefetch_shares_the_link_with_one_pieces_worth_of_bytes() {
        rt().block_on(async {
            let link = Link::new(Duration::ZERO, None, 4, MIB);
            let first = link.prefetch_turn(&front(), MIB).await;
            let in_flight = link.busy(Class::Prefetch, MIB);
            // No reader: a second prefetch request may go.
            drop(link.prefetch_turn(&front(), MIB).await);
            let reader = link.busy(Class::Demand, 0);
            let l = link.clone();
            let second = tokio::spawn(async move { drop(l.prefetch_turn(&front(), MIB).await) });
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(!second.is_finished());
            drop(in_flight);
            drop(first);
            second.await.unwrap();
            // Small pieces go together while their bytes fit in one piece's worth.
            let small = MIB / 4;
            let mut held = Vec::new();
            for _ in 0..3 {
                let turn = link.prefetch_turn(&front(), small).await;
                held.push((turn, link.busy(Class::Prefetch, small)));
            }
            let l = link.clone();
            let fourth = tokio::spawn(async move { drop(l.prefetch_turn(&front(), MIB).await) });
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(!fourth.is_finished(), "3/4 MiB in flight and 1 MiB more");
            drop(held);
            fourth.await.unwrap();
            drop(reader);
            // The host's slots bound prefetch requests of all its layers.
            let turns: Vec<_> = take_turns(&link, 4).await;
            let l = link.clone();
            let fifth = tokio::spawn(async move { drop(l.prefetch_turn(&front(), MIB).await) });
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(!fifth.is_finished());
            drop(turns);
            fifth.await.unwrap();
        });
    }

    fn front() -> Arc<PrefetchFront> {
        Arc::default()
    }

    #[test]
    fn a_freed_prefetch_slot_goes_to_the_layer_whose_reader_is_closest_behind() {
        rt().block_on(async {
            let link = Link::new(Duration::ZERO, None, 1, MIB);
            let held = link.prefetch_turn(&front(), MIB).await;
            // Three layers wait; their prefetches stand 8, 1 and 4 MB ahead of their
            // containers' reads.
            let (tx, mut order) = tokio::sync::mpsc::unbounded_channel();
            for (name, prefetched, read) in [("a", 8, 0), ("b", 9, 8), ("c", 4, 0)] {
                let f = front();
                f.prefetching_from(prefetched << 20);
                f.read_up_to(read << 20);
                let (l, tx) = (link.clone(), tx.clone());
                tokio::spawn(async move {
                    let turn = l.prefetch_turn(&f, MIB).await;
                    tx.send(name).unwrap();
                    drop(turn);
                });
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            drop(held);
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(order.recv().await.unwrap());
            }
            assert_eq!(got, ["b", "c", "a"]);
        });
    }

    #[test]
    fn a_waiter_that_gives_up_passes_its_slot_on() {
        rt().block_on(async {
            let link = Link::new(Duration::ZERO, None, 1, MIB);
            let held = link.prefetch_turn(&front(), MIB).await;
            let l = link.clone();
            let gave_up = tokio::spawn(async move { drop(l.prefetch_turn(&front(), MIB).await) });
            tokio::time::sleep(Duration::from_millis(10)).await;
            let l = link.clone();
            let patient = tokio::spawn(async move { drop(l.prefetch_turn(&front(), MIB).await) });
            tokio::time::sleep(Duration::from_millis(10)).await;
            gave_up.abort();
            let _ = gave_up.await;
            drop(held);
            patient.await.unwrap();
            // And the slot came back.
            drop(link.prefetch_turn(&front(), MIB).await);
        });
    }

    async fn take_turns(link: &Link, n: usize) -> Vec<PrefetchTurn> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(link.prefetch_turn(&front(), MIB).await);
        }
        out
    }

    #[test]
    fn filesystem_use_holds_the_background_back_while_containers_start() {
        rt().block_on(async {
            let link = Link::new(Duration::from_secs(2), None, 4, MIB);
            link.mounted();
            let started = tokio::time::Instant::now();
            let l = link.clone();
            let turn = tokio::spawn(async move {
                drop(l.background_turn(1).await);
                tokio::time::Instant::now()
            });
            // `ls -lR`: ten seconds of lookups, no network.
            for _ in 0..10 {
                link.note_op();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            link.note_op();
            assert!(!turn.is_finished());
            assert_eq!(turn.await.unwrap() - started, Duration::from_secs(12));
            // Long after the last mount, only the network holds it back.
            tokio::time::sleep(START_UP).await;
            link.note_op();
            let now = tokio::time::Instant::now();
            drop(link.background_turn(1).await);
            assert_eq!(now.elapsed(), Duration::ZERO);
        });
    }

    #[test]
    fn the_rate_is_what_was_delivered_over_the_last_second() {
        rt().block_on(async {
            let link = Link::new(Duration::ZERO, None, 4, MIB);
            assert_eq!(link.rate(), None);
            // 1 MB every 100 ms for 3 s, then 4 MB every 100 ms.
            for _ in 0..30 {
                link.delivered(1_000_000);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let slow = link.rate().unwrap();
            assert!((9e6..=11e6).contains(&slow), "{slow}");
            for _ in 0..30 {
                link.delivered(4_000_000);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let fast = link.rate().unwrap();
            assert!((36e6..=44e6).contains(&fast), "{fast}");
        });
    }

    #[test]
    fn a_mount_restarts_the_quiet_period() {
        rt().block_on(async {
            let link = Link::new(Duration::from_secs(3), None, 4, MIB);
            tokio::time::sleep(Duration::from_secs(2)).await;
            link.mounted();
            let started = tokio::time::Instant::now();
            drop(link.background_turn(1).await);
            assert_eq!(started.elapsed(), Duration::from_secs(3));
        });
    }
}
