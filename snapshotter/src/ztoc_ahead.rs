//! zTOCs fetched ahead of their layer's Prepare. containerd prepares an image's layers one
//! after another, and a SOCI layer's mount begins with its whole zTOC (megabytes: a 32 KiB
//! inflater window per span); fetched one Prepare at a time, the link idles through each
//! round trip, parse and mount in between. Once a layer has found its image's index, the
//! other layers' zTOCs are fetched at once, and each layer's own Prepare takes its zTOC
//! from here or waits for the fetch under way. The bytes are checked against the zTOC's
//! digest as they stream in, whoever fetches them, and parsed by the layer's own Prepare
//! as before.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use estargz::lock;
use tokio::sync::{OnceCell, Semaphore};

/// A zTOC's bytes, or why they could not be had.
pub(crate) type Fetched = Result<Bytes, String>;

/// zTOCs fetched at once.
pub(crate) const DEFAULT_CONCURRENCY: usize = 4;
/// Bytes of zTOCs held for Prepares that have not come yet, at most.
pub(crate) const DEFAULT_BUDGET: u64 = 128 << 20;
/// How long a zTOC fetched ahead waits for its Prepare (the image's pull may stop).
pub(crate) const DEFAULT_UNCLAIMED_TTL: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ZtocKey {
    pub(crate) repository: String,
    pub(crate) digest: registry::Digest,
}

pub(crate) struct ZtocsAhead {
    handle: tokio::runtime::Handle,
    entries: Arc<Mutex<HashMap<ZtocKey, Entry>>>,
    permits: Arc<Semaphore>,
    budget: u64,
    unclaimed_ttl: Duration,
}

struct Entry {
    fetched: Arc<OnceCell<Fetched>>,
    size: u64,
}

impl ZtocsAhead {
    pub(crate) fn new(
        handle: tokio::runtime::Handle,
        concurrency: usize,
        budget: u64,
        unclaimed_ttl: Duration,
    ) -> Self {
        ZtocsAhead {
            handle,
            entries: Arc::default(),
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            budget,
            unclaimed_ttl,
        }
    }

    /// Starts `fetch` of the zTOC `key` (`size` bytes, as its descriptor says) in the
    /// background, unless it is held or under way already, or holding it would exceed the
    /// budget. Never waits.
    pub(crate) fn start<F>(&self, key: ZtocKey, size: u64, fetch: F) -> bool
    where
        F: Future<Output = Fetched> + Send + 'static,
    {
        let fetched = Arc::new(OnceCell::new());
        {
            let mut entries = lock(&self.entries);
            let held: u64 = entries.values().map(|e| e.size).sum();
            if entries.contains_key(&key) || held.saturating_add(size) > self.budget {
                return false;
            }
            let entry = Entry {
                fetched: Arc::clone(&fetched),
                size,
            };
            entries.insert(key.clone(), entry);
        }
        let (permits, entries, ttl) = (
            Arc::clone(&self.permits),
            Arc::clone(&self.entries),
            self.unclaimed_ttl,
        );
        self.handle.spawn(async move {
            if let Ok(_permit) = permits.acquire_owned().await {
                // Its Prepare may have come first and fetched it itself.
                let outcome = fetched.get_or_init(|| fetch).await;
                if let Err(e) = outcome {
                    tracing::debug!(ztoc = %key.digest, error = %e,
                        "fetching a zTOC ahead of its layer failed; its Prepare fetches it again");
                }
            }
            tokio::time::sleep(ttl).await;
            let mut entries = lock(&entries);
            if entries
                .get(&key)
                .is_some_and(|e| Arc::ptr_eq(&e.fetched, &fetched))
            {
                entries.remove(&key);
                tracing::debug!(ztoc = %key.digest, "zTOC fetched ahead was not claimed in time; dropped");
            }
        });
        true
    }

    /// The zTOC `key`: fetched ahead (waiting for that fetch if it is under way), else by
    /// `fetch_now`, which also makes again a fetch ahead that failed.
    pub(crate) async fn take<F, Fut>(&self, key: &ZtocKey, fetch_now: F) -> Fetched
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Fetched>,
    {
        let ahead = lock(&self.entries).remove(key);
        if let Some(entry) = ahead {
            let mut fetched_here = false;
            let outcome = entry
                .fetched
                .get_or_init(|| {
                    fetched_here = true;
                    fetch_now()
                })
                .await;
            if outcome.is_ok() || fetched_here {
                return outcome.clone();
            }
        }
        fetch_now().await
    }

    /// zTOCs held or under way.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.entries).len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(name: &str) -> ZtocKey {
        ZtocKey {
            repository: "library/app".into(),
            digest: registry::Digest::sha256_of(name.as_bytes()),
        }
    }

    fn ahead(budget: u64) -> ZtocsAhead {
        ZtocsAhead::new(
            tokio::runtime::Handle::current(),
            2,
            budget,
            Duration::from_secs(120),
        )
    }

    /// A fetch that counts its calls and answers `bytes` once `gate` opens.
    fn counted(
        calls: &Arc<AtomicUsize>,
        gate: &Arc<tokio::sync::Notify>,
        outcome: Fetched,
    ) -> impl Future<Output = Fetched> + Send + 'static {
        let (calls, gate) = (Arc::clone(calls), Arc::clone(gate));
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
            outcome
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prepare_takes_the_ztoc_fetched_ahead_and_waits_for_one_under_way() {
        let ahead = ahead(1 << 20);
        let (calls, gate) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(tokio::sync::Notify::new()),
        );
        assert!(ahead.start(
            key("a"),
            10,
            counted(&calls, &gate, Ok(Bytes::from_static(b"zTOC a")))
        ));
        assert!(
            !ahead.start(key("a"), 10, counted(&calls, &gate, Ok(Bytes::new()))),
            "started twice"
        );
        // The fetch ahead is under way: the Prepare waits for it instead of fetching again.
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let now_calls = Arc::new(AtomicUsize::new(0));
        let a = key("a");
        let take = ahead.take(&a, || {
            now_calls.fetch_add(1, Ordering::SeqCst);
            async { Ok(Bytes::from_static(b"fetched now")) }
        });
        let opener = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            gate.notify_one();
        };
        let (got, ()) = tokio::join!(take, opener);
        assert_eq!(got.unwrap(), Bytes::from_static(b"zTOC a"));
        assert_eq!(now_calls.load(Ordering::SeqCst), 0);
        assert_eq!(ahead.len(), 0, "a zTOC is handed over once");

        // Not fetched ahead: fetched now.
        let got = ahead
            .take(&key("b"), || async { Ok(Bytes::from_static(b"b now")) })
            .await;
        assert_eq!(got.unwrap(), Bytes::from_static(b"b now"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_ahead_that_failed_is_made_again_by_its_prepare() {
        let ahead = ahead(1 << 20);
        let (calls, gate) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(tokio::sync::Notify::new()),
        );
        gate.notify_one();
        assert!(ahead.start(
            key("a"),
            10,
            counted(&calls, &gate, Err("registry down".into()))
        ));
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let now_calls = AtomicUsize::new(0);
        let got = ahead
            .take(&key("a"), || {
                now_calls.fetch_add(1, Ordering::SeqCst);
                async { Ok(Bytes::from_static(b"back up")) }
            })
            .await;
        assert_eq!(got.unwrap(), Bytes::from_static(b"back up"));
        assert_eq!(now_calls.load(Ordering::SeqCst), 1, "fetched again once");

        // A Prepare's own fetch that fails is not made twice.
        let now_calls = AtomicUsize::new(0);
        let never = Arc::new(tokio::sync::Notify::new());
        let blocked = Arc::new(AtomicUsize::new(0));
        let one_permit = ZtocsAhead::new(
            tokio::runtime::Handle::current(),
            1,
            1 << 20,
            Duration::from_secs(120),
        );
        // The only permit is held by a fetch that never ends, so "c" waits in line and its
        // Prepare fetches it itself.
        assert!(one_permit.start(key("b"), 1, counted(&blocked, &never, Ok(Bytes::new()))));
        assert!(one_permit.start(key("c"), 1, async { Ok(Bytes::from_static(b"never used")) }));
        let got = one_permit
            .take(&key("c"), || {
                now_calls.fetch_add(1, Ordering::SeqCst);
                async { Err("no".to_string()) }
            })
            .await;
        assert!(got.is_err());
        assert_eq!(now_calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ztocs_over_the_budget_are_left_to_their_prepares() {
        let ahead = ahead(100);
        let ok = || async { Ok(Bytes::new()) };
        assert!(ahead.start(key("a"), 60, ok()));
        assert!(!ahead.start(key("b"), 60, ok()), "over the budget");
        assert!(ahead.start(key("c"), 40, ok()));
        assert_eq!(ahead.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unclaimed_ztoc_is_dropped_after_its_time() {
        let ahead = ZtocsAhead::new(
            tokio::runtime::Handle::current(),
            2,
            1 << 20,
            Duration::from_secs(120),
        );
        assert!(ahead.start(key("a"), 10, async { Ok(Bytes::from_static(b"a")) }));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(ahead.len(), 1);
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(ahead.len(), 0);
    }
}
