//! Pre-opening sibling layers: containerd prepares an image's layers one after another,
//! and each lazy mount first fetches its layer's footer and TOC (a few round trips). The
//! first remote Prepare already names the image's other layers, so their TOCs are
//! fetched in the background, a few at a time, while the earlier layers mount.
//!
//! A pre-open knows no TOC digest to check against (the sibling's labels have not arrived
//! yet), and the blob's digest says nothing about its TOC, so a pre-opened layer is only
//! handed to the sibling's own Prepare once its TOC matches what that Prepare requires
//! ([`accept`]); otherwise the layer is opened afresh and verified as usual.
//!
//! The same mechanism, holding bytes instead of opened layers, fetches the zTOCs of a
//! SOCI image's other layers ahead (`soci_index.rs`); a zTOC is keyed by its own digest
//! from the verified index, and checked against it when its layer opens.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use estargz::lock;
use tokio::sync::{Semaphore, watch};

use crate::parse_gate::ParseGate;
use crate::remote::MountError;

/// What a pre-open ends with; the error is only ever logged at debug (a sibling that is
/// not lazy-pullable fails here, and that is normal).
pub type Outcome<T = Opened> = Result<T, MountError>;

/// A layer opened from its blob, with the compressed TOC bytes it was built from (kept,
/// once the TOC is verified, in the local store of layer metadata).
#[derive(Clone)]
pub struct Opened {
    pub layer: Arc<estargz::Layer>,
    pub toc: Arc<[u8]>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("layer", &self.layer)
            .field("toc_bytes", &self.toc.len())
            .finish()
    }
}

impl Opened {
    /// Reads the footer and the TOC of `blob` and builds its index through `gate` (off
    /// the async threads, within the parse budget and time), checked as `opts` asks.
    /// `layer` names the layer in errors.
    pub async fn open(
        blob: Arc<dyn estargz::BlobReader>,
        opts: &estargz::OpenOptions,
        gate: &ParseGate,
        layer: &str,
    ) -> Result<Opened, MountError> {
        let fetched = estargz::fetch_toc(&*blob, opts)
            .await
            .map_err(|e| MountError::opening(layer, e))?;
        let need = fetched
            .parse_memory_bound()
            .map_err(|e| MountError::opening(layer, e))?;
        let cancel = estargz::Cancel::new();
        let opts = estargz::OpenOptions {
            cancel: cancel.clone(),
            ..opts.clone()
        };
        let toc: Arc<[u8]> = Arc::from(&fetched.compressed[..]);
        let built = gate
            .run(layer, need, cancel, move || {
                estargz::Layer::build(blob, &fetched, &opts)
            })
            .await?;
        let layer = built.map_err(|e| MountError::opening(layer, e))?;
        Ok(Opened {
            layer: Arc::new(layer),
            toc,
        })
    }
}

/// A blob in one repository (a layer, or a zTOC): pre-opens are shared only where the
/// same registry would serve the same bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerKey {
    /// `registry/name`, as in [`registry::Repository`]'s Display.
    pub repository: String,
    pub digest: String,
}

/// Pre-opens at most this many layers at a time by default: enough to hide the round
/// trips of a typical image, few enough not to crowd out the mount being waited for.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Pre-opened layers that no Prepare claims within this long are dropped.
pub const DEFAULT_UNCLAIMED_TTL: Duration = Duration::from_secs(120);

/// Pre-opens of `T` (opened layers, or a zTOC's bytes), by blob.
pub struct Preopener<T = Opened> {
    handle: tokio::runtime::Handle,
    permits: Arc<Semaphore>,
    unclaimed_ttl: Duration,
    state: Arc<Mutex<State<T>>>,
}

struct State<T> {
    entries: HashMap<LayerKey, Entry<T>>,
    /// Layers whose own Prepare is opening them now (count of concurrent openers).
    opening: HashMap<LayerKey, usize>,
    next_id: u64,
}

impl<T> Default for State<T> {
    fn default() -> Self {
        State {
            entries: HashMap::new(),
            opening: HashMap::new(),
            next_id: 0,
        }
    }
}

struct Entry<T> {
    /// Tells this entry from a later one under the same key.
    id: u64,
    phase: watch::Receiver<Phase<T>>,
}

#[derive(Clone)]
enum Phase<T> {
    /// Waiting for a permit; nothing fetched yet.
    Queued,
    Fetching,
    Done(Outcome<T>),
}

/// Held by a Prepare while it opens and mounts a layer, so no pre-open of the same layer
/// starts meanwhile.
pub struct Opening<T = Opened> {
    key: LayerKey,
    state: Arc<Mutex<State<T>>>,
}

impl<T> Drop for Opening<T> {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        if let Some(n) = state.opening.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                state.opening.remove(&self.key);
            }
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Preopener<T> {
    pub fn new(
        handle: tokio::runtime::Handle,
        concurrency: usize,
        unclaimed_ttl: Duration,
    ) -> Preopener<T> {
        Preopener {
            handle,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            unclaimed_ttl,
            state: Arc::default(),
        }
    }

    /// Whether `key` is pre-opened, being pre-opened, or being opened by its Prepare.
    pub fn knows(&self, key: &LayerKey) -> bool {
        let state = lock(&self.state);
        state.entries.contains_key(key) || state.opening.contains_key(key)
    }

    /// Starts pre-opening `key` with `open` unless it is already known; returns whether it
    /// started. `open` runs on the runtime, after a permit, and only if no Prepare has
    /// claimed the entry while it was queued.
    pub fn start<F>(&self, key: LayerKey, open: F) -> bool
    where
        F: Future<Output = Outcome<T>> + Send + 'static,
    {
        let (tx, rx) = watch::channel(Phase::Queued);
        let id = {
            let mut state = lock(&self.state);
            if state.entries.contains_key(&key) || state.opening.contains_key(&key) {
                return false;
            }
            state.next_id += 1;
            let id = state.next_id;
            state.entries.insert(key.clone(), Entry { id, phase: rx });
            id
        };
        let (permits, state, ttl) = (
            Arc::clone(&self.permits),
            Arc::clone(&self.state),
            self.unclaimed_ttl,
        );
        self.handle.spawn(async move {
            let Ok(permit) = permits.acquire_owned().await else {
                return;
            };
            {
                // Claimed (or dropped) while queued: its Prepare opens it itself.
                let state = lock(&state);
                if state.entries.get(&key).is_none_or(|e| e.id != id) {
                    return;
                }
                tx.send_replace(Phase::Fetching);
            }
            let outcome = open.await;
            if let Err(e) = &outcome {
                tracing::debug!(layer = %key.digest, repository = %key.repository, error = %e,
                    "pre-opening a sibling layer failed (fine if it is not lazy-pullable)");
            }
            tx.send_replace(Phase::Done(outcome));
            drop(permit);
            // Claiming drops the receiver, which ends this wait at once.
            tokio::select! {
                _ = tokio::time::sleep(ttl) => {
                    let mut state = lock(&state);
                    if state.entries.get(&key).is_some_and(|e| e.id == id) {
                        state.entries.remove(&key);
                        tracing::debug!(layer = %key.digest, "pre-opened layer not claimed in time; dropped");
                    }
                }
                _ = tx.closed() => {}
            }
        });
        true
    }

    /// Called by the Prepare of `key`: marks it as being opened (until the returned guard
    /// drops) and takes its pre-open, waiting for one in flight. None when there is no
    /// pre-open, or it was still queued (it is then cancelled: a fresh open is as quick).
    pub async fn claim(&self, key: &LayerKey) -> (Option<Outcome<T>>, Opening<T>) {
        let entry = {
            let mut state = lock(&self.state);
            *state.opening.entry(key.clone()).or_insert(0) += 1;
            state.entries.remove(key)
        };
        let opening = Opening {
            key: key.clone(),
            state: Arc::clone(&self.state),
        };
        let Some(mut entry) = entry else {
            return (None, opening);
        };
        if matches!(*entry.phase.borrow(), Phase::Queued) {
            return (None, opening);
        }
        let outcome = match entry.phase.wait_for(|p| matches!(p, Phase::Done(_))).await {
            Ok(phase) => match &*phase {
                Phase::Done(outcome) => Some(outcome.clone()),
                _ => None,
            },
            // The task is gone (runtime shutting down): nothing to use.
            Err(_) => None,
        };
        (outcome, opening)
    }

    /// Pre-opens held or in flight, for tests and logs.
    pub fn pending(&self) -> usize {
        lock(&self.state).entries.len()
    }
}

/// Whether a pre-opened layer's TOC is what this Prepare requires (`opts` as its own
/// fresh open would check). Err says why not, for the debug log.
pub fn accept(layer: &estargz::Layer, opts: &estargz::OpenOptions) -> Result<(), String> {
    if let Some(expected) = opts.expected_manifest_checksum
        && expected != layer.manifest_checksum()
    {
        return Err(format!(
            "pre-opened TOC has manifest checksum {}, the image publishes {expected}",
            layer.manifest_checksum()
        ));
    }
    if let Some(expected) = opts.expected_toc_digest
        && expected != layer.toc_digest()
    {
        return Err(format!(
            "pre-opened TOC has digest {}, the image publishes {expected}",
            layer.toc_digest()
        ));
    }
    // Neither set: the caller allowed an unverified layer (skip_verify), as a fresh open
    // would be.
    Ok(())
}

/// Uses the claimed pre-open if it verifies against `opts`, else opens afresh with
/// `fresh` (which must verify against `opts` itself). Returns the layer and whether it
/// was pre-opened.
pub async fn use_or_open<Fresh>(
    claimed: Option<Outcome>,
    opts: &estargz::OpenOptions,
    layer_digest: &str,
    fresh: Fresh,
) -> Result<(Opened, bool), MountError>
where
    Fresh: Future<Output = Outcome>,
{
    match claimed {
        Some(Ok(opened)) => match accept(&opened.layer, opts) {
            Ok(()) => return Ok((opened, true)),
            Err(why) => {
                tracing::debug!(layer = %layer_digest, "not using the pre-opened TOC, fetching it again: {why}")
            }
        },
        Some(Err(e)) => {
            tracing::debug!(layer = %layer_digest, error = %e, "pre-open had failed; opening afresh")
        }
        None => {}
    }
    Ok((fresh.await?, false))
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A one-file uncompressed tar, enough for `estargz::convert`.
    fn tar_with(name: &str, data: &[u8]) -> Vec<u8> {
        let mut h = [0u8; 512];
        let field = |h: &mut [u8; 512], at: usize, value: &[u8]| {
            h[at..at + value.len()].copy_from_slice(value);
        };
        field(&mut h, 0, name.as_bytes());
        field(&mut h, 100, b"0000644\0");
        field(&mut h, 108, b"0000000\0");
        field(&mut h, 116, b"0000000\0");
        field(&mut h, 124, format!("{:011o}\0", data.len()).as_bytes());
        field(&mut h, 136, b"14544000000\0");
        field(&mut h, 148, b"        ");
        h[156] = b'0';
        field(&mut h, 257, b"ustar\x0000");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        field(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
        let mut tar = h.to_vec();
        tar.extend_from_slice(data);
        tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
        tar
    }

    /// An eStargz blob holding one file, and its TOC digests.
    pub(crate) fn estargz_blob(content: &[u8]) -> (Vec<u8>, estargz::WriteOutput) {
        let mut out = Vec::new();
        let written = estargz::convert(
            &tar_with("file.txt", content)[..],
            &mut out,
            &estargz::WriterOptions {
                threads: 1,
                ..Default::default()
            },
        )
        .unwrap();
        (out, written)
    }

    async fn open(blob: Vec<u8>, opts: estargz::OpenOptions) -> Outcome {
        let gate = ParseGate::new(1 << 30, Duration::from_secs(30));
        Opened::open(Arc::new(estargz::VecBlob::new(blob)), &opts, &gate, "test").await
    }

    fn expecting_toc(digest: estargz::Sha256Sum) -> estargz::OpenOptions {
        estargz::OpenOptions {
            expected_toc_digest: Some(digest),
            ..Default::default()
        }
    }

    fn key(digest: &str) -> LayerKey {
        LayerKey {
            repository: "127.0.0.1:5000/app".into(),
            digest: digest.into(),
        }
    }

    fn preopener(concurrency: usize, ttl: Duration) -> Preopener {
        Preopener::new(tokio::runtime::Handle::current(), concurrency, ttl)
    }

    #[tokio::test]
    async fn a_preopened_layer_is_used_only_when_its_toc_matches() {
        let (blob_a, a) = estargz_blob(b"sibling a\n");
        let (_, b) = estargz_blob(b"sibling b\n");
        let layer = open(blob_a, Default::default()).await.unwrap().layer;

        assert!(accept(&layer, &expecting_toc(a.toc_digest)).is_ok());
        assert!(accept(&layer, &expecting_toc(b.toc_digest)).is_err());
        let checksum = |sum| estargz::OpenOptions {
            expected_manifest_checksum: Some(sum),
            ..Default::default()
        };
        assert!(accept(&layer, &checksum(a.manifest_checksum)).is_ok());
        assert!(accept(&layer, &checksum(b.manifest_checksum)).is_err());
        // Both required: both must match.
        let both = estargz::OpenOptions {
            expected_toc_digest: Some(a.toc_digest),
            expected_manifest_checksum: Some(b.manifest_checksum),
            ..Default::default()
        };
        assert!(accept(&layer, &both).is_err());
        // No verification required (skip_verify allowed): as a fresh open would be.
        assert!(accept(&layer, &Default::default()).is_ok());
    }

    #[tokio::test]
    async fn a_mismatching_preopen_is_refetched_and_verified() {
        let (blob_a, _) = estargz_blob(b"what the registry served before\n");
        let (blob_b, b) = estargz_blob(b"what the label vouches for\n");
        let preopened = open(blob_a.clone(), Default::default()).await.unwrap();
        let opts = expecting_toc(b.toc_digest);

        // The pre-opened TOC is not B's: a fresh, verified open is used instead.
        let fresh_opens = AtomicUsize::new(0);
        let (layer, was_preopened) =
            use_or_open(Some(Ok(preopened.clone())), &opts, "sha256:b", async {
                fresh_opens.fetch_add(1, Ordering::SeqCst);
                open(blob_b.clone(), opts.clone()).await
            })
            .await
            .unwrap();
        assert!(!was_preopened);
        assert_eq!(fresh_opens.load(Ordering::SeqCst), 1);
        assert_eq!(layer.layer.toc_digest(), b.toc_digest);

        // If the registry still serves the wrong TOC, the fresh open's verification fails:
        // the unverified TOC is never served.
        let err = use_or_open(Some(Ok(preopened)), &opts, "sha256:b", {
            open(blob_a, opts.clone())
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("digest"), "{err}");

        // A matching pre-open is used without fetching anything.
        let matching = open(blob_b, Default::default()).await.unwrap();
        let (layer, was_preopened) = use_or_open(Some(Ok(matching)), &opts, "sha256:b", async {
            panic!("fetched although the pre-opened TOC matched")
        })
        .await
        .unwrap();
        assert!(was_preopened);
        assert_eq!(layer.layer.toc_digest(), b.toc_digest);

        // A failed pre-open (not lazy-pullable, registry error) falls back too.
        let (blob_c, c) = estargz_blob(b"c\n");
        let (layer, was_preopened) = use_or_open(
            Some(Err(MountError::Layer("no footer".into()))),
            &expecting_toc(c.toc_digest),
            "sha256:c",
            open(blob_c, expecting_toc(c.toc_digest)),
        )
        .await
        .unwrap();
        assert!(!was_preopened);
        assert_eq!(layer.layer.toc_digest(), c.toc_digest);
    }

    #[tokio::test]
    async fn a_claim_waits_for_the_preopen_in_flight_instead_of_fetching_again() {
        let pre = preopener(4, Duration::from_secs(120));
        let (blob, written) = estargz_blob(b"x\n");
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let opens = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&opens);
        assert!(pre.start(key("sha256:x"), async move {
            counted.fetch_add(1, Ordering::SeqCst);
            released.await.unwrap();
            open(blob, Default::default()).await
        }));
        // Known now: a second start (another Prepare naming the same sibling) is a no-op.
        assert!(!pre.start(key("sha256:x"), async { unreachable!() }));
        assert!(pre.knows(&key("sha256:x")));
        while opens.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let x = key("sha256:x");
        let claim = pre.claim(&x);
        tokio::pin!(claim);
        tokio::select! {
            _ = &mut claim => panic!("the claim did not wait for the pre-open"),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        release.send(()).unwrap();
        let (outcome, opening) = claim.await;
        assert_eq!(
            outcome.unwrap().unwrap().layer.toc_digest(),
            written.toc_digest
        );
        assert_eq!(opens.load(Ordering::SeqCst), 1);
        // Claimed entries leave the table; while the Prepare opens it, it stays known.
        assert_eq!(pre.pending(), 0);
        assert!(pre.knows(&key("sha256:x")));
        drop(opening);
        assert!(!pre.knows(&key("sha256:x")));
    }

    #[tokio::test]
    async fn a_queued_preopen_that_is_claimed_never_fetches() {
        let pre = preopener(1, Duration::from_secs(120));
        let (hold, held) = tokio::sync::oneshot::channel::<()>();
        let first_started = Arc::new(AtomicUsize::new(0));
        let started = Arc::clone(&first_started);
        assert!(pre.start(key("sha256:first"), async move {
            started.fetch_add(1, Ordering::SeqCst);
            let _ = held.await;
            Err(MountError::Layer("done".to_string()))
        }));
        // The first holds the only permit, so the second stays queued.
        while first_started.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let fetched = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&fetched);
        assert!(pre.start(key("sha256:second"), async move {
            counted.fetch_add(1, Ordering::SeqCst);
            Err(MountError::Layer("fetched".to_string()))
        }));
        let (outcome, _opening) = pre.claim(&key("sha256:second")).await;
        assert!(outcome.is_none(), "a queued pre-open is not waited for");
        hold.send(()).unwrap();
        let (outcome, _opening) = pre.claim(&key("sha256:first")).await;
        assert_eq!(
            outcome.unwrap().unwrap_err(),
            MountError::Layer("done".into())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(fetched.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn unclaimed_preopens_expire() {
        let pre = preopener(4, Duration::from_millis(100));
        let (blob, _) = estargz_blob(b"x\n");
        assert!(pre.start(key("sha256:x"), open(blob, Default::default())));
        assert_eq!(pre.pending(), 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while pre.pending() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (outcome, _opening) = pre.claim(&key("sha256:x")).await;
        assert!(outcome.is_none());
    }
}
