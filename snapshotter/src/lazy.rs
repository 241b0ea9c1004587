//! The real `RemoteMounter`: finds a layer in its registry, checks its TOC against the
//! digest the image published, and serves it with FUSE.
//!
//! What was verified is kept on disk ([`TocStore`]): a restore (after a restart, a
//! reboot) opens the layer from it without the registry, which is then asked only for
//! chunks that are not in the cache.
//!
//! With an fd holder, every connection it mounts is also handed to the holder, and a
//! connection the holder kept from an earlier daemon is taken over (served again
//! without unmounting) instead of remounted, so running containers never notice.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::json;

use crate::fsutil;
use crate::holder::HolderClient;
use crate::libraries::LibraryFinder;
use crate::parse_gate::ParseGate;
use crate::preopen::{self, LayerKey, Opened, Preopener};
use crate::remote::{MountError, MountFuture, MountedInfo, RemoteLayer, RemoteMounter};
use crate::tocstore::TocStore;

pub struct FuseMounter {
    client: registry::Client,
    cache: fusefs::SharedCache,
    config: fusefs::FsConfig,
    handle: tokio::runtime::Handle,
    /// One link per registry host: background fetches of all its layers share it and
    /// hold back while any of them is read.
    links: fusefs::Links,
    /// Mount a layer whose TOC cannot be verified when the client asked for it
    /// (`stargz.skipverify`); off by default, as in stargz-snapshotter.
    allow_no_verification: bool,
    /// Shared with each layer's library finder, which looks up the image's layers.
    mounts: Arc<Mutex<HashMap<PathBuf, Served>>>,
    holder: Option<HolderClient>,
    /// Connections the holder kept from an earlier daemon, until their snapshot is
    /// served again (taken over) or removed.
    held: Mutex<HashMap<PathBuf, HeldConnection>>,
    /// Fetches the TOCs of an image's other layers while its earlier layers mount; None
    /// when `[lazy] preopen_siblings = false`.
    preopener: Option<Preopener>,
    /// Every TOC parse (mounts, pre-opens, restores) runs through it.
    parse_gate: ParseGate,
    /// Mounts that used a pre-opened TOC, since start.
    preopened_mounts: AtomicU64,
    /// Verified layer metadata kept on disk, so restores need no registry; None: every
    /// layer is opened from its registry.
    store: Option<TocStore>,
    /// Copy each layer into a plain directory once it is wholly local, for the
    /// containers created after that ([`crate::native`]).
    native_copies: bool,
    /// Native copies in progress: stopped before the mounts are left or unmounted.
    copies: Arc<crate::native::NativeCopies>,
    /// The SOCI indexes of images whose plain gzip layers were asked for.
    soci: crate::soci_index::SociIndexes,
    /// Where the layers of SOCI-indexed images that have no zTOC are kept while mounted.
    local_layers: PathBuf,
}

/// The chunk cache's sweep leaves the kept metadata of layers it did not list as
/// mounted if it was written after the listing: a layer is kept only once it is mounted,
/// so such a file is of a layer mounted since. This much earlier counts as after, for
/// file times come from the kernel's coarse clock (a tick behind at most).
const KEPT_METADATA_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// The blob of a layer opened from its kept metadata. Its size is kept too, so it is
/// opened without asking the registry anything: the registry is first reached (and
/// authenticated with) on the first read that misses the chunk cache. A read the
/// registry does not serve fails (the FUSE read gets EIO) after the registry client's
/// retries, bounded by `fetch_timeout`, with a log line naming the layer and the
/// registry's error; the next read (after [`FAILURE_HOLD`]) tries again, so reads work
/// again once the registry is back.
struct KeptBlob {
    layer_digest: String,
    image_ref: String,
    size: u64,
    /// The registry's blob ([`registry::RemoteBlob`]).
    remote: Arc<dyn estargz::BlobReader>,
    /// The last failure, for [`FAILURE_HOLD`].
    failed: Mutex<Option<(std::time::Instant, estargz::BlobError)>>,
}

/// Reads of a layer restored from its kept metadata that start this soon after one of
/// its reads failed at the registry fail at once, with that error: the kernel follows a
/// failed read-ahead with a read of the page itself at once, and without this a read(2)
/// would wait for the registry twice. Reads after it try the registry again.
pub const FAILURE_HOLD: std::time::Duration = std::time::Duration::from_millis(250);

impl KeptBlob {
    fn new(
        layer_digest: String,
        image_ref: String,
        size: u64,
        remote: Arc<dyn estargz::BlobReader>,
    ) -> KeptBlob {
        KeptBlob {
            layer_digest,
            image_ref,
            size,
            remote,
            failed: Mutex::new(None),
        }
    }

    fn failed(&self) -> MutexGuard<'_, Option<(std::time::Instant, estargz::BlobError)>> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The error of a failure just now, if there was one.
    fn held_failure(&self) -> Option<estargz::BlobError> {
        match &*self.failed() {
            Some((at, e)) if at.elapsed() < FAILURE_HOLD => Some(e.clone()),
            _ => None,
        }
    }

    fn outcome<T>(
        &self,
        offset: u64,
        len: u64,
        read: Result<T, estargz::BlobError>,
    ) -> Result<T, estargz::BlobError> {
        match &read {
            Ok(_) => *self.failed() = None,
            Err(e) => {
                tracing::warn!(layer = %self.layer_digest, image = %self.image_ref, offset, len,
                    error = %e, "the registry did not serve a read of a layer restored from its \
                    kept metadata: the read fails (EIO), the next one tries again");
                *self.failed() = Some((std::time::Instant::now(), e.clone()));
            }
        }
        read
    }
}

impl estargz::BlobReader for KeptBlob {
    fn size(&self) -> estargz::BlobFuture<'_, u64> {
        let size = self.size;
        Box::pin(async move { Ok(size) })
    }

    fn read_at(&self, offset: u64, len: u64) -> estargz::BlobFuture<'_, bytes::Bytes> {
        Box::pin(async move {
            if let Some(e) = self.held_failure() {
                return Err(e);
            }
            let read = self.remote.read_at(offset, len).await;
            self.outcome(offset, len, read)
        })
    }

    fn read_at_streaming<'a>(
        &'a self,
        offset: u64,
        len: u64,
        on_data: &'a (dyn Fn(bytes::Bytes) + Send + Sync),
    ) -> estargz::BlobFuture<'a, ()> {
        Box::pin(async move {
            if let Some(e) = self.held_failure() {
                return Err(e);
            }
            let read = self.remote.read_at_streaming(offset, len, on_data).await;
            self.outcome(offset, len, read)
        })
    }
}

/// A layer this process serves, and where it came from.
struct Served {
    mounted: fusefs::MountedLayer,
    layer_digest: String,
    image_ref: String,
    /// `registry/name` of the image, to tell which siblings need no pre-open.
    repository: String,
    /// Digests of the image's layers its labels list (`stargz.layers`: this one and
    /// those above it), so an image also counts those mounted under another's name.
    image_layers: Vec<String>,
    /// The holder has its connection: at shutdown it is left to the next daemon.
    handed_over: bool,
}

struct HeldConnection {
    handover: fusefs::Handover,
    fd: OwnedFd,
}

/// Where a mount's FUSE passthrough backing ids are recorded for a successor: beside
/// the mountpoint in the snapshot's directory (`fs` → `fs.passthrough-ids`).
fn passthrough_ids(mountpoint: &Path) -> PathBuf {
    let name = mountpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    mountpoint.with_file_name(format!("{name}.passthrough-ids"))
}

/// What the holder keeps next to each fd: what `fusefs::adopt` needs, and the layer
/// for the logs.
fn handover_meta(h: &fusefs::Handover, layer: &RemoteLayer) -> String {
    json!({
        "version": 1,
        "proto_minor": h.proto_minor,
        "kernel_flags": h.kernel_flags,
        "flags": h.flags,
        "device": h.device,
        "layer_digest": layer.layer_digest,
        "image_ref": layer.image_ref,
    })
    .to_string()
}

fn parse_handover_meta(meta: &str) -> Option<fusefs::Handover> {
    let v: serde_json::Value = serde_json::from_str(meta).ok()?;
    if v["version"] != json!(1) {
        return None;
    }
    Some(fusefs::Handover {
        proto_minor: u32::try_from(v["proto_minor"].as_u64()?).ok()?,
        kernel_flags: v["kernel_flags"].as_u64()?,
        flags: v["flags"].as_u64()?,
        device: v["device"].as_str()?.to_string(),
    })
}

/// One mounted layer, for status and metrics.
#[derive(Debug, Clone)]
pub struct MountedLayerStatus {
    pub mountpoint: PathBuf,
    pub layer_digest: String,
    pub image_ref: String,
    /// Digests of the image's layers, as its labels list them (may be empty).
    pub image_layers: Vec<String>,
    /// Its verified metadata is kept ([`TocStore`]): a restore needs no registry.
    pub metadata_stored: bool,
    /// A native copy of it is made: containers created now read that, not FUSE.
    pub native_copy: bool,
    /// How it is read: `eStargz`, `zstd:chunked` or `SOCI`.
    pub format: &'static str,
    pub stats: fusefs::Stats,
}

/// A lazily mounted layer's format as status shows it.
pub fn format_name(format: estargz::Format) -> &'static str {
    match format {
        estargz::Format::Estargz => "eStargz",
        estargz::Format::LegacyStargz => "stargz",
        estargz::Format::ZstdChunked | estargz::Format::StargzZstdChunked => "zstd:chunked",
        estargz::Format::Soci => "SOCI",
    }
}

/// The mounted layers of each image, by image reference (sorted), as indices into the
/// list given: the layers mounted under the image's name, and those mounted under
/// another image's name whose digest the image's layers list. (A layer shared with an
/// image pulled before is mounted once, under the first image's name; containerd's
/// labels list a layer and those above it, so a shared base layer is not listed and
/// counts under the first image only.) A digest mounted more than once counts once.
pub fn layers_by_image<'a>(
    layers: impl IntoIterator<Item = (&'a str, &'a str, &'a [String])>,
) -> Vec<(String, Vec<usize>)> {
    let layers: Vec<(&str, &str, &[String])> = layers.into_iter().collect();
    let mut images: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, (image, _, _)) in layers.iter().enumerate() {
        images.entry(image).or_default().push(i);
    }
    images
        .into_iter()
        .map(|(image, own)| {
            let listed: HashSet<&str> = own
                .iter()
                .flat_map(|&i| layers[i].2.iter().map(String::as_str))
                .collect();
            let mut seen = HashSet::new();
            let members = own
                .iter()
                .copied()
                .chain(
                    (0..layers.len())
                        .filter(|&j| layers[j].0 != image && listed.contains(layers[j].1)),
                )
                .filter(|&i| seen.insert(layers[i].1))
                .collect();
            (image.to_string(), members)
        })
        .collect()
}

/// The mounted layer `digest` first, then the other mounted layers of its image (by
/// image name, or by the layer lists of their labels), those that list fewer layers
/// first: nearer the top.
fn image_layers_of(mounts: &HashMap<PathBuf, Served>, digest: &str) -> Vec<Arc<fusefs::LayerFs>> {
    let Some(me) = mounts.values().find(|s| s.layer_digest == digest) else {
        return Vec::new();
    };
    let mut others: Vec<&Served> = mounts
        .values()
        .filter(|s| s.layer_digest != digest)
        .filter(|s| {
            s.image_ref == me.image_ref
                || s.image_layers.iter().any(|d| d == digest)
                || me.image_layers.contains(&s.layer_digest)
        })
        .collect();
    others.sort_by(|a, b| {
        (a.image_layers.len(), &a.layer_digest).cmp(&(b.image_layers.len(), &b.layer_digest))
    });
    others.dedup_by(|a, b| a.layer_digest == b.layer_digest);
    std::iter::once(me)
        .chain(others)
        .map(|s| Arc::clone(s.mounted.fs()))
        .collect()
}

/// An image's layer list (its labels') with the layers below in its snapshot chain.
pub fn with_lower(listed: &[String], lower: Option<&Vec<String>>) -> Vec<String> {
    let mut out = listed.to_vec();
    for d in lower.into_iter().flatten() {
        if !out.contains(d) {
            out.push(d.clone());
        }
    }
    out
}

/// Why an image could not be made local.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchImageError {
    /// No layer of that image is mounted lazily here.
    NotMounted,
    /// A fetch failed: each failing layer with its error.
    Failed(Vec<(String, String)>),
}

impl std::fmt::Display for FetchImageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchImageError::NotMounted => {
                f.write_str("no layer of this image is mounted lazily by this lazysnapd")
            }
            FetchImageError::Failed(layers) => {
                let each: Vec<String> = layers.iter().map(|(l, e)| format!("{l}: {e}")).collect();
                write!(f, "{}", each.join("; "))
            }
        }
    }
}

/// What [`FuseMounter::fetch_image`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageFetched {
    /// The image's lazily mounted layers (digests).
    pub layers: Vec<String>,
    /// Distinct chunks fetched, and their decompressed bytes.
    pub chunks: u64,
    pub bytes: u64,
}

/// Range requests in flight at most for one [`FuseMounter::fetch_image`], over all the
/// image's layers.
const FETCH_IMAGE_REQUESTS: usize = 8;

/// The files a mounted layer has had opened, in first-open order.
#[derive(Debug, Clone)]
pub struct LayerAccess {
    pub layer_digest: String,
    pub image_ref: String,
    pub files: Vec<fusefs::FileAccess>,
}

impl FuseMounter {
    pub fn new(
        client: registry::Client,
        cache: fusefs::SharedCache,
        config: fusefs::FsConfig,
        handle: tokio::runtime::Handle,
        allow_no_verification: bool,
    ) -> FuseMounter {
        FuseMounter {
            client,
            cache,
            links: fusefs::Links::new(&config),
            config,
            handle,
            allow_no_verification,
            mounts: Arc::new(Mutex::new(HashMap::new())),
            holder: None,
            held: Mutex::new(HashMap::new()),
            preopener: None,
            parse_gate: ParseGate::new(
                crate::parse_gate::DEFAULT_PARSE_MEMORY,
                std::time::Duration::from_secs(30),
            ),
            preopened_mounts: AtomicU64::new(0),
            store: None,
            native_copies: false,
            copies: Arc::default(),
            soci: Default::default(),
            local_layers: std::env::temp_dir().join("lazysnap-local-layers"),
        }
    }

    /// Keeps the local copies of layers that SOCI indexes have no zTOC for in `dir`:
    /// they outlive the daemon, so that a restart serves them without the registry; the
    /// cache sweep removes those no lazy snapshot uses.
    pub fn with_local_layers(mut self, dir: PathBuf) -> FuseMounter {
        self.local_layers = dir;
        self
    }

    /// Copies each mounted layer into a plain directory beside its mount once every
    /// byte of it is local; later containers are given the copy ([`crate::native`]).
    pub fn with_native_copies(mut self) -> FuseMounter {
        self.native_copies = true;
        self
    }

    /// Parses layers' metadata through `gate` (its memory budget and time limit).
    pub fn with_parse_gate(mut self, gate: ParseGate) -> FuseMounter {
        self.parse_gate = gate;
        self
    }

    /// Keeps the metadata (footer, TOC) of every layer opened from a registry and
    /// verified in `store`, and restores snapshots from it without the registry.
    pub fn with_toc_store(mut self, store: TocStore) -> FuseMounter {
        self.store = Some(store);
        self
    }

    /// The cache, runtime and registry host's link a layer's filesystem uses.
    fn backing(&self, layer: &RemoteLayer) -> fusefs::Backing {
        let host = layer
            .image_ref
            .parse::<registry::Reference>()
            .map(|r| r.repository.api_host().to_string())
            .unwrap_or_default();
        fusefs::Backing {
            cache: self.cache.clone(),
            link: self.links.for_host(&host),
            handle: self.handle.clone(),
        }
    }

    /// On a layer's mount, pre-opens the TOCs of its image's other layers (a few at a
    /// time), to be used by their own Prepares once verified.
    pub fn with_sibling_preopen(mut self) -> FuseMounter {
        self.preopener = Some(Preopener::new(
            self.handle.clone(),
            preopen::DEFAULT_CONCURRENCY,
            preopen::DEFAULT_UNCLAIMED_TTL,
        ));
        self
    }

    /// Mounts since start whose TOC had been pre-opened.
    pub fn preopened_mounts(&self) -> u64 {
        self.preopened_mounts.load(Ordering::Relaxed)
    }

    /// Hands every connection mounted from now on to `holder`, and takes what it kept
    /// from an earlier daemon, to be served again when its snapshot is restored.
    pub fn with_holder(mut self, holder: HolderClient) -> std::io::Result<FuseMounter> {
        let mut held = HashMap::new();
        for h in holder.list()? {
            if h.key == crate::holder::LISTENER_KEY {
                continue; // the daemon's, not a mount's
            }
            match parse_handover_meta(&h.meta) {
                Some(handover) => {
                    held.insert(PathBuf::from(&h.key), HeldConnection { handover, fd: h.fd });
                }
                None => {
                    tracing::warn!(mountpoint = %h.key, "the fd holder's entry is not understood; dropping it");
                    let _ = holder.forget(&h.key);
                }
            }
        }
        if !held.is_empty() {
            tracing::info!(
                connections = held.len(),
                "the fd holder kept FUSE connections of an earlier lazysnapd; taking them over"
            );
        }
        self.held = Mutex::new(held);
        self.holder = Some(holder);
        Ok(self)
    }

    fn held(&self) -> MutexGuard<'_, HashMap<PathBuf, HeldConnection>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections kept from an earlier daemon that are not served yet (their layer
    /// could not be opened so far): reads on them wait.
    pub fn held_waiting(&self) -> usize {
        self.held().len()
    }

    /// Lets go of held connections whose snapshot is gone (removed by a daemon that
    /// died before it unmounted): their mounts serve no one.
    pub fn release_unclaimed(&self, snapshots: &[PathBuf]) {
        let unclaimed: Vec<PathBuf> = self
            .held()
            .keys()
            .filter(|k| !snapshots.contains(k))
            .cloned()
            .collect();
        for mountpoint in unclaimed {
            tracing::info!(path = %mountpoint.display(), "held FUSE connection of no snapshot; unmounting it");
            self.held().remove(&mountpoint);
            let _ = fsutil::unmount_detach(&mountpoint);
            self.forget_held(&mountpoint);
        }
    }

    fn forget_held(&self, mountpoint: &Path) {
        if let Some(holder) = &self.holder
            && let Err(e) = holder.forget(&mountpoint.to_string_lossy())
        {
            tracing::warn!(path = %mountpoint.display(), error = %e, "the fd holder did not let go");
        }
    }

    fn mounts(&self) -> MutexGuard<'_, HashMap<PathBuf, Served>> {
        self.mounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> Vec<MountedLayerStatus> {
        let mut out: Vec<_> = self
            .mounts()
            .iter()
            .map(|(path, served)| MountedLayerStatus {
                mountpoint: path.clone(),
                layer_digest: served.layer_digest.clone(),
                image_ref: served.image_ref.clone(),
                image_layers: served.image_layers.clone(),
                metadata_stored: self
                    .store
                    .as_ref()
                    .is_some_and(|s| s.contains(&served.layer_digest))
                    || crate::soci_index::local_copy_path(&self.local_layers, &served.layer_digest)
                        .is_some_and(|p| p.is_file()),
                native_copy: crate::native::native_of(path).is_some(),
                format: format_name(served.mounted.fs().layer().format()),
                stats: served.mounted.stats(),
            })
            .collect();
        out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        out
    }

    /// Makes every lazily mounted layer of `image_ref` (as [`layers_by_image`] groups
    /// them) wholly local now: each chunk not in the cache is fetched, verified and
    /// written to disk, at full speed (no quiet wait, no rate limit: see
    /// [`fusefs::LayerFs::fetch_all_now`]), the layers side by side. Fails when the image
    /// has no such layer, or with every layer whose fetch failed.
    ///
    /// `lower_layers` gives, by layer digest, the digests of the lazily mounted layers
    /// below it in its snapshot chain: a base layer shared with an image pulled earlier
    /// is mounted under that image's name, and only the chain says it is this one's too.
    pub async fn fetch_image(
        &self,
        image_ref: &str,
        lower_layers: &HashMap<String, Vec<String>>,
    ) -> Result<ImageFetched, FetchImageError> {
        let layers: Vec<(String, Arc<fusefs::LayerFs>)> = {
            let mounts = self.mounts();
            let mut served: Vec<&Served> = mounts.values().collect();
            served.sort_by(|a, b| a.layer_digest.cmp(&b.layer_digest));
            let listed: Vec<Vec<String>> = served
                .iter()
                .map(|s| with_lower(&s.image_layers, lower_layers.get(&s.layer_digest)))
                .collect();
            let groups = layers_by_image(served.iter().zip(&listed).map(|(s, listed)| {
                (
                    s.image_ref.as_str(),
                    s.layer_digest.as_str(),
                    listed.as_slice(),
                )
            }));
            let Some((_, members)) = groups.into_iter().find(|(image, _)| image == image_ref)
            else {
                return Err(FetchImageError::NotMounted);
            };
            members
                .into_iter()
                .map(|i| {
                    (
                        served[i].layer_digest.clone(),
                        Arc::clone(served[i].mounted.fs()),
                    )
                })
                .collect()
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(FETCH_IMAGE_REQUESTS));
        let mut tasks = tokio::task::JoinSet::new();
        for (digest, fs) in &layers {
            let (digest, fs, slots) = (digest.clone(), Arc::clone(fs), Arc::clone(&slots));
            tasks.spawn_on(
                async move { (digest, fs.fetch_all_now(slots).await) },
                &self.handle,
            );
        }
        let mut done = ImageFetched {
            layers: layers.iter().map(|(d, _)| d.clone()).collect(),
            ..ImageFetched::default()
        };
        let mut failed = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, Ok(fetched))) => {
                    done.chunks += fetched.chunks;
                    done.bytes += fetched.bytes;
                }
                Ok((digest, Err(e))) => failed.push((digest, e.to_string())),
                Err(e) => failed.push((String::from("?"), format!("fetch task: {e}"))),
            }
        }
        if failed.is_empty() {
            tracing::info!(image = %image_ref, layers = done.layers.len(), chunks = done.chunks,
                bytes = done.bytes, "image made local");
            Ok(done)
        } else {
            failed.sort();
            tracing::warn!(image = %image_ref, failed = failed.len(), "making the image local failed");
            Err(FetchImageError::Failed(failed))
        }
    }

    /// Each mounted layer's access log (for `lazysnap optimize`).
    pub fn accessed(&self) -> Vec<LayerAccess> {
        self.mounts()
            .values()
            .map(|served| LayerAccess {
                layer_digest: served.layer_digest.clone(),
                image_ref: served.image_ref.clone(),
                files: served.mounted.fs().accessed(),
            })
            .collect()
    }

    /// Unmounts every layer: nothing is left mounted after exit.
    pub fn unmount_all(&self) {
        self.stop_native_copies();
        let drained: Vec<_> = self.mounts().drain().collect();
        for (path, mut served) in drained {
            if let Err(e) = served.mounted.unmount() {
                tracing::warn!(path = %path.display(), error = %e, "unmount failed");
            }
            self.forget_held(&path);
        }
    }

    /// Daemon shutdown with an fd holder: layers the holder has stay mounted, their
    /// requests left for the next daemon; the others are unmounted, as they would be
    /// dead without us.
    pub fn leave_all(&self) {
        self.stop_native_copies();
        let drained: Vec<_> = self.mounts().drain().collect();
        let mut left = 0;
        for (path, mut served) in drained {
            if served.handed_over {
                served.mounted.leave();
                left += 1;
            } else if let Err(e) = served.mounted.unmount() {
                tracing::warn!(path = %path.display(), error = %e, "unmount failed");
            }
        }
        tracing::info!(
            layers = left,
            "lazily mounted layers left mounted for the next lazysnapd (the fd holder keeps them)"
        );
    }

    /// Stops the native copies: each reads through a mount this daemon is about to stop
    /// serving, and would otherwise wait for an answer forever.
    fn stop_native_copies(&self) {
        if !self
            .copies
            .stop_and_wait(std::time::Duration::from_secs(10))
        {
            tracing::warn!("a native copy did not stop within 10 s; leaving the mounts anyway");
        }
    }

    /// Takes over a connection the holder kept, if there is one for `mountpoint`.
    /// Err means there was one and it could not be served (it is then dropped).
    async fn take_over(
        &self,
        layer: &RemoteLayer,
        opened: &Arc<estargz::Layer>,
        mountpoint: &Path,
    ) -> Result<Option<fusefs::MountedLayer>, MountError> {
        let Some(held) = self.held().remove(mountpoint) else {
            return Ok(None);
        };
        let (opened, backing, config, path) = (
            Arc::clone(opened),
            self.backing(layer),
            self.config.clone(),
            mountpoint.to_path_buf(),
        );
        let adopted = tokio::task::spawn_blocking(move || {
            let ids = passthrough_ids(&path);
            fusefs::adopt(
                opened,
                &path,
                Some(&ids),
                held.fd,
                &held.handover,
                &backing,
                config,
            )
        })
        .await
        .map_err(|e| MountError::Mount(format!("take-over task: {e}")))?;
        match adopted {
            Ok(mounted) => {
                tracing::info!(path = %mountpoint.display(), layer = %layer.layer_digest,
                    "took over the FUSE connection an earlier lazysnapd left: running containers keep their mount");
                Ok(Some(mounted))
            }
            Err(e) => {
                self.forget_held(mountpoint);
                Err(MountError::Mount(e.to_string()))
            }
        }
    }

    /// Starts pre-opening the siblings of `layer` that are neither served, pre-opened
    /// nor being opened. Never waits: the pre-opens run on the runtime.
    fn preopen_siblings(&self, layer: &RemoteLayer) {
        let Some(preopener) = &self.preopener else {
            return;
        };
        let Ok(reference) = layer.image_ref.parse::<registry::Reference>() else {
            return;
        };
        let repository = reference.repository.to_string();
        let served: HashSet<String> = self
            .mounts()
            .values()
            .filter(|s| s.repository == repository)
            .map(|s| s.layer_digest.clone())
            .collect();
        let mut started = 0;
        for sibling in &layer.image_layers {
            if *sibling == layer.layer_digest || served.contains(sibling) {
                continue;
            }
            let Ok(digest) = sibling.parse::<registry::Digest>() else {
                continue;
            };
            let key = LayerKey {
                repository: repository.clone(),
                digest: sibling.clone(),
            };
            let (client, repo) = (self.client.clone(), reference.repository.clone());
            // No TOC digest is known yet: the sibling's own Prepare checks it (preopen::accept).
            let (sibling, gate) = (sibling.clone(), self.parse_gate.clone());
            let open = async move {
                let blob = registry::RemoteBlob::open(client, repo, digest)
                    .await
                    .map_err(|e| MountError::Registry(e.to_string()))?;
                Opened::open(
                    Arc::new(blob),
                    &estargz::OpenOptions::default(),
                    &gate,
                    &sibling,
                )
                .await
            };
            started += usize::from(preopener.start(key, open));
        }
        if started > 0 {
            tracing::debug!(layer = %layer.layer_digest, siblings = started, "pre-opening sibling layers");
        }
    }

    /// Opens the layer's blob and TOC, verified against what the image published: a
    /// pre-opened TOC when it verifies, else fetched now. Also returns whether it was
    /// pre-opened, what it was verified against, and a guard that marks the layer as
    /// being opened until the mount is done.
    async fn open_layer(
        &self,
        layer: &RemoteLayer,
    ) -> Result<(Opened, bool, estargz::OpenOptions, Option<preopen::Opening>), MountError> {
        let reference: registry::Reference = layer.image_ref.parse().map_err(|e| {
            MountError::Labels(format!("image reference {:?}: {e}", layer.image_ref))
        })?;
        let digest: registry::Digest = layer.layer_digest.parse().map_err(|e| {
            MountError::Labels(format!("layer digest {:?}: {e}", layer.layer_digest))
        })?;
        let claim = async {
            let Some(preopener) = &self.preopener else {
                return Ok((None, None));
            };
            let key = LayerKey {
                repository: reference.repository.to_string(),
                digest: layer.layer_digest.clone(),
            };
            let (claimed, opening) = preopener.claim(&key).await;
            Ok::<_, MountError>((claimed, Some(opening)))
        };
        let verification = async {
            let opts = self.verification(layer, &reference, &digest).await?;
            // Only an image that publishes TOC digests is worth pre-opening: a plain
            // image's siblings would all fail.
            self.preopen_siblings(layer);
            Ok::<_, MountError>(opts)
        };
        // A manifest fetch for the annotations (zstd:chunked) overlaps the pre-open's wait;
        // a layer that cannot be verified does not wait for its pre-open.
        let (opts, (claimed, opening)) = tokio::try_join!(verification, claim)?;
        let fresh = async {
            let blob = registry::RemoteBlob::open(
                self.client.clone(),
                reference.repository.clone(),
                digest,
            )
            .await
            .map_err(|e| MountError::Registry(e.to_string()))?;
            Opened::open(Arc::new(blob), &opts, &self.parse_gate, &layer.layer_digest).await
        };
        let (opened, preopened) =
            preopen::use_or_open(claimed, &opts, &layer.layer_digest, fresh).await?;
        Ok((opened, preopened, opts, opening))
    }

    /// Keeps the verified metadata of a layer just opened from its registry, so that
    /// the next restore needs no registry (off the async threads: it fsyncs). A layer
    /// mounted without verification (skip-verify) is not kept.
    fn keep_metadata(&self, layer: &RemoteLayer, opened: Opened, opts: estargz::OpenOptions) {
        let Some(store) = self.store.clone() else {
            return;
        };
        if opts.expected_toc_digest.is_none() && opts.expected_manifest_checksum.is_none() {
            return;
        }
        let digest = layer.layer_digest.clone();
        self.handle.spawn_blocking(move || {
            match store.save(&digest, &opened.layer, &opened.toc, &opts) {
                Ok(path) => tracing::debug!(layer = %digest, path = %path.display(),
                    "kept the layer's verified metadata: it is restored without the registry"),
                Err(e) => tracing::warn!(layer = %digest, error = %e,
                    "cannot keep the layer's verified metadata: restoring it will need the registry"),
            }
        });
    }

    /// Keeps a SOCI layer's verified zTOC, so that a restart opens it without the
    /// registry.
    fn keep_ztoc(&self, layer: &RemoteLayer, kept: crate::tocstore::KeptZtoc) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let digest = layer.layer_digest.clone();
        self.handle
            .spawn_blocking(move || match store.save_ztoc(&digest, &kept) {
                Ok(path) => tracing::debug!(layer = %digest, path = %path.display(),
                "kept the layer's verified zTOC: it is restored without the registry"),
                Err(e) => tracing::warn!(layer = %digest, error = %e,
                "cannot keep the layer's zTOC: restoring it will need the registry"),
            });
    }

    /// The layer opened from its kept metadata, with no network at all; None when
    /// nothing is kept, or what is kept does not verify (it is then deleted, and the
    /// caller opens the layer from its registry).
    async fn open_kept(
        &self,
        layer: &RemoteLayer,
    ) -> Result<Option<Arc<estargz::Layer>>, MountError> {
        let Some(store) = self.store.clone() else {
            return Ok(None);
        };
        let reference: registry::Reference = layer.image_ref.parse().map_err(|e| {
            MountError::Labels(format!("image reference {:?}: {e}", layer.image_ref))
        })?;
        let digest: registry::Digest = layer.layer_digest.parse().map_err(|e| {
            MountError::Labels(format!("layer digest {:?}: {e}", layer.layer_digest))
        })?;
        let label = match &layer.toc_digest {
            Some(toc) => Some(
                toc.parse::<estargz::Digest>()
                    .map_err(|e| MountError::Labels(format!("toc.digest label {toc:?}: {e}")))?,
            ),
            None => None,
        };
        let need = {
            let (store, digest) = (store.clone(), layer.layer_digest.clone());
            tokio::task::spawn_blocking(move || store.parse_memory_bound(&digest))
                .await
                .map_err(|e| MountError::Mount(format!("reading kept metadata: {e}")))?
        };
        let (client, layer_digest) = (self.client.clone(), layer.layer_digest.clone());
        let image_ref = layer.image_ref.clone();
        let cancel = estargz::Cancel::new();
        let stop = cancel.clone();
        let loaded = self
            .parse_gate
            .run(&layer.layer_digest, need, cancel, move || {
                store.load(&layer_digest, label, &stop, |size| {
                    let remote =
                        registry::RemoteBlob::new(client, reference.repository, digest, size);
                    Arc::new(KeptBlob::new(
                        layer_digest.clone(),
                        image_ref,
                        size,
                        Arc::new(remote),
                    )) as Arc<dyn estargz::BlobReader>
                })
            })
            .await?;
        match loaded {
            Ok(kept) => Ok(kept.map(Arc::new)),
            Err(why) => {
                tracing::warn!(layer = %layer.layer_digest,
                    "kept metadata refused and deleted; opening the layer from its registry: {why}");
                Ok(None)
            }
        }
    }

    /// What the TOC must hash to. eStargz layers carry `toc.digest` as a label;
    /// containers/storage zstd:chunked layers only have annotations, which containerd does
    /// not forward, so they are read from the manifest.
    async fn verification(
        &self,
        layer: &RemoteLayer,
        reference: &registry::Reference,
        digest: &registry::Digest,
    ) -> Result<estargz::OpenOptions, MountError> {
        let mut opts = estargz::OpenOptions::default();
        if let Some(toc) = &layer.toc_digest {
            opts.expected_toc_digest = Some(
                toc.parse()
                    .map_err(|e| MountError::Labels(format!("toc.digest label {toc:?}: {e}")))?,
            );
            return Ok(opts);
        }
        let annotations = self.layer_annotations(layer, reference, digest).await?;
        let get = |key: &str| annotations.get(key).map(|v| v.parse::<estargz::Digest>());
        if let Some(toc) = get(estargz::TOC_DIGEST_ANNOTATION) {
            opts.expected_toc_digest =
                Some(toc.map_err(|e| MountError::Layer(format!("toc.digest annotation: {e}")))?);
        } else if let Some(sum) = get(estargz::MANIFEST_CHECKSUM_ANNOTATION)
            .or_else(|| get(estargz::LEGACY_MANIFEST_CHECKSUM_ANNOTATION))
        {
            opts.expected_manifest_checksum =
                Some(sum.map_err(|e| {
                    MountError::Layer(format!("manifest-checksum annotation: {e}"))
                })?);
        } else if !(layer.skip_verify && self.allow_no_verification) {
            return Err(MountError::Layer(
                "the image publishes no TOC digest for this layer, so it cannot be verified \
                        (not eStargz / zstd:chunked, or converted without annotations)"
                    .to_string(),
            ));
        }
        Ok(opts)
    }

    async fn layer_annotations(
        &self,
        layer: &RemoteLayer,
        reference: &registry::Reference,
        digest: &registry::Digest,
    ) -> Result<std::collections::BTreeMap<String, String>, MountError> {
        let manifest = match &layer.manifest_digest {
            Some(manifest_digest) => {
                let fetched = self
                    .client
                    .fetch_manifest(&reference.repository, manifest_digest)
                    .await
                    .map_err(|e| MountError::Registry(e.to_string()))?;
                serde_json::from_slice::<registry::ImageManifest>(&fetched.bytes)
                    .map_err(|e| MountError::Layer(format!("manifest {manifest_digest}: {e}")))?
            }
            None => {
                self.client
                    .resolve(reference)
                    .await
                    .map_err(|e| MountError::Registry(e.to_string()))?
                    .manifest
            }
        };
        let descriptor = manifest
            .layers
            .iter()
            .find(|d| d.digest == *digest)
            .ok_or_else(|| {
                MountError::Layer(format!("the image's manifest does not list layer {digest}"))
            })?;
        Ok(descriptor.annotations.clone().unwrap_or_default())
    }
}

impl FuseMounter {
    fn insert(
        &self,
        mountpoint: &Path,
        mounted: fusefs::MountedLayer,
        layer: &RemoteLayer,
        handed_over: bool,
    ) {
        let served = Served {
            mounted,
            layer_digest: layer.layer_digest.clone(),
            image_ref: layer.image_ref.clone(),
            repository: layer
                .image_ref
                .parse::<registry::Reference>()
                .map(|r| r.repository.to_string())
                .unwrap_or_default(),
            image_layers: layer.image_layers.clone(),
            handed_over,
        };
        let table = Arc::downgrade(&self.mounts);
        let digest = layer.layer_digest.clone();
        let finder = LibraryFinder::new(move || {
            table.upgrade().map_or_else(Vec::new, |mounts| {
                image_layers_of(&mounts.lock().unwrap_or_else(|p| p.into_inner()), &digest)
            })
        });
        served.mounted.fs().set_libraries(Arc::new(finder));
        let fs = Arc::downgrade(served.mounted.fs());
        if let Some(mut previous) = self.mounts().insert(mountpoint.to_path_buf(), served) {
            let _ = previous.mounted.unmount();
        }
        if self.native_copies && crate::native::native_of(mountpoint).is_none() {
            self.handle.spawn(copy_when_local(
                fs,
                mountpoint.to_path_buf(),
                layer.layer_digest.clone(),
                Arc::clone(&self.copies),
            ));
        }
    }

    fn count_preopened(&self, info: &MountedInfo) {
        if info.preopened {
            self.preopened_mounts.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl FuseMounter {
    /// Serves an opened layer at `mountpoint`: takes over the connection the fd holder
    /// kept for it, or else mounts it.
    async fn serve_layer(
        &self,
        layer: &RemoteLayer,
        opened: Arc<estargz::Layer>,
        mountpoint: &Path,
        preopened: bool,
    ) -> Result<MountedInfo, MountError> {
        let index = opened.index();
        let info = MountedInfo {
            size: (0..index.len())
                .map(|i| index.entry(estargz::NodeId(i as u32)).size())
                .sum(),
            entries: index.len() as u64,
            preopened,
        };
        match self.take_over(layer, &opened, mountpoint).await {
            Ok(Some(mounted)) => {
                self.insert(mountpoint, mounted, layer, true);
                self.count_preopened(&info);
                return Ok(info);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(path = %mountpoint.display(), error = %e,
                "cannot take over the held FUSE connection; remounting (running containers lose it)"),
        }
        // A FUSE mount left behind by a daemon that died is dead (ENOTCONN): detach it.
        for stale in fsutil::mounts_under(mountpoint) {
            let _ = fsutil::unmount_detach(&stale);
        }
        let (backing, config, path) = (
            self.backing(layer),
            self.config.clone(),
            mountpoint.to_path_buf(),
        );
        let holder = self.holder.clone();
        let layer_meta = layer.clone();
        // Mounting waits for the kernel's handshake, and the holder is a blocking
        // socket: keep both off the async threads.
        let (mounted, handed_over) = tokio::task::spawn_blocking(move || {
            let mounted = fusefs::mount(opened, &path, Some(&passthrough_ids(&path)), &backing, config)?;
            let handed_over = holder.is_some_and(|holder| {
                let Some((fd, handover)) = mounted.handover() else {
                    return false;
                };
                let meta = handover_meta(&handover, &layer_meta);
                match holder.put(&path.to_string_lossy(), &meta, fd.as_fd()) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e,
                            "the fd holder did not take the connection: containers on this layer will not survive a restart");
                        false
                    }
                }
            });
            Ok::<_, fusefs::Error>((mounted, handed_over))
        })
        .await
        .map_err(|e| MountError::Mount(format!("mount task: {e}")))?
        .map_err(|e| MountError::Mount(format!("FUSE at {}: {e}", mountpoint.display())))?;
        self.insert(mountpoint, mounted, layer, handed_over);
        self.count_preopened(&info);
        Ok(info)
    }
}

impl RemoteMounter for FuseMounter {
    fn mount<'a>(&'a self, layer: &'a RemoteLayer, mountpoint: &'a Path) -> MountFuture<'a> {
        Box::pin(async move {
            // A layer without a TOC label may be plain gzip with a SOCI index.
            if layer.toc_digest.is_none() {
                let through_index = crate::soci_index::open_through_index(
                    &self.client,
                    &self.soci,
                    &self.parse_gate,
                    layer,
                    &self.local_layers,
                )
                .await?;
                match through_index {
                    Ok((opened, how, kept)) => {
                        tracing::info!(layer = %layer.layer_digest,
                            "mounting the gzip layer lazily, {how}");
                        let info = self
                            .serve_layer(layer, Arc::new(opened), mountpoint, false)
                            .await?;
                        if let Some(kept) = kept {
                            self.keep_ztoc(layer, kept);
                        }
                        return Ok(info);
                    }
                    Err(why) => tracing::debug!(layer = %layer.layer_digest, %why,
                        "not through a SOCI index"),
                }
            }
            // `_opening` lasts until the layer is served (or the mount fails), so no
            // pre-open of it starts meanwhile.
            let (opened, preopened, opts, _opening) = self.open_layer(layer).await?;
            let info = self
                .serve_layer(layer, Arc::clone(&opened.layer), mountpoint, preopened)
                .await?;
            self.keep_metadata(layer, opened, opts);
            Ok(info)
        })
    }

    /// From the layer's kept metadata when it verifies, with no network: its chunks
    /// come from the cache, and from the registry only when a read misses it.
    fn restore<'a>(&'a self, layer: &'a RemoteLayer, mountpoint: &'a Path) -> MountFuture<'a> {
        Box::pin(async move {
            // A SOCI image's layer without a zTOC that was fetched whole: its copy is
            // checked against the layer digest, which needs no index and no registry.
            let local_copy =
                crate::soci_index::local_copy_path(&self.local_layers, &layer.layer_digest)
                    .filter(|p| layer.toc_digest.is_none() && p.is_file());
            if let Some(path) = local_copy {
                match crate::soci_index::open_local_copy(
                    &self.parse_gate,
                    &layer.layer_digest,
                    &path,
                )
                .await
                {
                    Ok(opened) => {
                        let info = self
                            .serve_layer(layer, Arc::new(opened), mountpoint, false)
                            .await?;
                        tracing::info!(layer = %layer.layer_digest, path = %mountpoint.display(),
                            "layer opened from its local copy, without the registry");
                        return Ok(info);
                    }
                    Err(e) => tracing::warn!(layer = %layer.layer_digest, error = %e,
                        "the layer's local copy is unusable; opening it from its registry"),
                }
            }
            if let Some(kept) = self.open_kept(layer).await? {
                let info = self.serve_layer(layer, kept, mountpoint, false).await?;
                tracing::info!(layer = %layer.layer_digest, path = %mountpoint.display(),
                    "layer opened from its kept metadata, without the registry");
                return Ok(info);
            }
            self.mount(layer, mountpoint).await
        })
    }

    fn unmount(&self, mountpoint: &Path) {
        let removed = self.mounts().remove(mountpoint);
        if let Some(mut served) = removed
            && let Err(e) = served.mounted.unmount()
        {
            tracing::warn!(path = %mountpoint.display(), error = %e, "unmount failed");
        }
        // A connection still held from an earlier daemon and never taken over: its
        // mount is of no use to anyone now.
        if self.held().remove(mountpoint).is_some() {
            let _ = fsutil::unmount_detach(mountpoint);
        }
        self.forget_held(mountpoint);
    }

    fn is_mounted(&self, mountpoint: &Path) -> bool {
        self.mounts().contains_key(mountpoint)
    }

    /// Sweeps the chunk cache down to what the mounted layers use, in the background.
    /// Only when every remaining lazy snapshot is mounted: one not yet restored (after
    /// a restart) would lose its cached chunks, though it still uses them.
    fn release_unused(&self, remaining: Vec<PathBuf>) {
        // Kept metadata written from now on may be of a layer mounted after this listing.
        let listed_at = std::time::SystemTime::now() - KEPT_METADATA_GRACE;
        let (layers, digests): (Vec<_>, HashSet<String>) = {
            let mounts = self.mounts();
            if let Some(missing) = remaining.iter().find(|m| !mounts.contains_key(*m)) {
                tracing::debug!(mountpoint = %missing.display(),
                    "cache sweep put off: a lazy snapshot's layer is not mounted yet");
                return;
            }
            (
                mounts
                    .values()
                    .map(|s| Arc::clone(s.mounted.fs()))
                    .collect(),
                mounts.values().map(|s| s.layer_digest.clone()).collect(),
            )
        };
        let cache = self.cache.clone();
        let store = self.store.clone();
        let local_layers = self.local_layers.clone();
        self.handle.spawn_blocking(move || {
            if let Some(store) = store {
                let removed = store.retain(&digests, listed_at);
                if removed > 0 {
                    tracing::info!(
                        removed,
                        "kept layer metadata: removed what no lazily pulled snapshot uses"
                    );
                }
            }
            let removed =
                crate::soci_index::retain_local_copies(&local_layers, &digests, listed_at);
            if removed > 0 {
                tracing::info!(
                    removed,
                    "local layer copies: removed those no lazily pulled snapshot uses"
                );
            }
            let mut live = std::collections::HashSet::new();
            for fs in &layers {
                fs.add_live_cache_keys(&mut live);
            }
            let (entries, bytes) = cache.sweep(&live);
            if entries > 0 {
                tracing::info!(
                    entries,
                    bytes,
                    layers = layers.len(),
                    "chunk cache: removed what no lazily pulled snapshot uses"
                );
            }
        });
    }
}

/// How often a mounted layer is checked for being wholly local.
const LOCAL_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits until every byte of the layer is local (however it got there: reads, prefetch,
/// background fetch, `lazysnap fetch`) and nothing has read it for a poll, then makes
/// its native copy. Ends without one
/// when the layer is unmounted first.
async fn copy_when_local(
    fs: std::sync::Weak<fusefs::LayerFs>,
    mountpoint: PathBuf,
    digest: String,
    copies: Arc<crate::native::NativeCopies>,
) {
    let mut reads_before = None;
    loop {
        tokio::time::sleep(LOCAL_POLL).await;
        let Some(layer) = fs.upgrade() else { return };
        let stats = layer.stats();
        let reads = stats.cache_hits + stats.cache_misses;
        // Copying a big layer takes seconds of CPU and disk: not while a container is
        // still reading it (the one that just made it local, as a rule).
        let quiet = reads_before.replace(reads) == Some(reads);
        if stats.local_bytes < stats.total_bytes || !quiet {
            continue;
        }
        // The copy reads through the mount; those reads are not a container's.
        let _own = layer.own_reads();
        drop(layer);
        let started = std::time::Instant::now();
        let path = mountpoint.clone();
        let copy = move || {
            let Some(_running) = copies.start() else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "lazysnapd is leaving its mounts",
                ));
            };
            crate::native::make_native_copy(&path, &copies)
        };
        match tokio::task::spawn_blocking(copy).await {
            Ok(Ok(copied)) => tracing::info!(layer = %digest, path = %mountpoint.display(),
                entries = copied.entries, bytes = copied.bytes,
                seconds = started.elapsed().as_secs_f64(),
                "layer wholly local: native copy made; containers created from now on read it"),
            Ok(Err(e)) => tracing::warn!(layer = %digest, path = %mountpoint.display(), error = %e,
                "no native copy of a wholly local layer; containers keep reading through FUSE"),
            Err(e) => tracing::warn!(layer = %digest, error = %e, "native copy task"),
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn an_images_layers_gain_those_below_in_its_snapshot_chain_once() {
        let listed = vec!["sha256:top".to_string(), "sha256:mid".to_string()];
        let lower = vec!["sha256:mid".to_string(), "sha256:base".to_string()];
        assert_eq!(
            with_lower(&listed, Some(&lower)),
            ["sha256:top", "sha256:mid", "sha256:base"]
        );
        assert_eq!(with_lower(&listed, None), listed);
    }

    #[test]
    fn layers_are_grouped_by_image_with_the_layers_they_share() {
        let list = |d: &[&str]| d.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // b:1 was pulled after a:1 and shares its base layer `base`, mounted once under
        // a:1's name; c:1 lists no layers (labels without stargz.layers).
        let a_layers = list(&["base", "a-top"]);
        let b_layers = list(&["base", "b-top", "b-more"]);
        let none: Vec<String> = Vec::new();
        let layers: Vec<(&str, &str, &[String])> = vec![
            ("reg/a:1", "base", &a_layers),
            ("reg/b:1", "b-top", &b_layers),
            ("reg/a:1", "a-top", &a_layers),
            ("reg/c:1", "c-only", &none),
            ("reg/b:1", "b-more", &b_layers),
            // The same digest mounted twice (another chain) counts once.
            ("reg/b:1", "b-top", &b_layers),
        ];
        let groups = layers_by_image(layers.iter().copied());
        assert_eq!(
            groups,
            vec![
                ("reg/a:1".to_string(), vec![0, 2]),
                ("reg/b:1".to_string(), vec![1, 4, 0]),
                ("reg/c:1".to_string(), vec![3]),
            ]
        );
        assert!(layers_by_image(std::iter::empty()).is_empty());
    }

    /// A blob whose reads fail while `down` is set, counting the reads that reach it.
    struct Registry {
        down: std::sync::atomic::AtomicBool,
        reads: AtomicUsize,
    }

    impl estargz::BlobReader for Registry {
        fn size(&self) -> estargz::BlobFuture<'_, u64> {
            Box::pin(async { Ok(100) })
        }
        fn read_at(&self, _: u64, len: u64) -> estargz::BlobFuture<'_, bytes::Bytes> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let down = self.down.load(Ordering::SeqCst);
            Box::pin(async move {
                if down {
                    return Err(estargz::BlobError::new(
                        estargz::BlobErrorKind::Transient,
                        "connection refused",
                    ));
                }
                Ok(bytes::Bytes::from(vec![7u8; len as usize]))
            })
        }
    }

    #[tokio::test]
    async fn a_kept_layers_blob_fails_while_its_registry_is_down_and_tries_again_after() {
        let registry = Arc::new(Registry {
            down: true.into(),
            reads: AtomicUsize::new(0),
        });
        let blob = KeptBlob::new(
            "sha256:layer".into(),
            "127.0.0.1:5000/app:1".into(),
            100,
            Arc::clone(&registry) as Arc<dyn estargz::BlobReader>,
        );
        use estargz::BlobReader as _;
        // Its size is known: the registry is not asked.
        assert_eq!(blob.size().await.unwrap(), 100);
        assert_eq!(registry.reads.load(Ordering::SeqCst), 0);
        let err = blob.read_at(0, 10).await.unwrap_err();
        assert!(err.message.contains("connection refused"), "{err}");
        assert_eq!(registry.reads.load(Ordering::SeqCst), 1);
        // The kernel's immediate second try fails at once, without the registry.
        let delivered = Mutex::new(0);
        let on_data = |b: bytes::Bytes| *delivered.lock().unwrap() += b.len();
        assert!(blob.read_at_streaming(0, 10, &on_data).await.is_err());
        assert_eq!(registry.reads.load(Ordering::SeqCst), 1);
        // Later reads try again, and work once the registry is back.
        tokio::time::sleep(FAILURE_HOLD + std::time::Duration::from_millis(50)).await;
        assert!(blob.read_at(0, 10).await.is_err());
        assert_eq!(registry.reads.load(Ordering::SeqCst), 2);
        registry.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(FAILURE_HOLD + std::time::Duration::from_millis(50)).await;
        blob.read_at_streaming(0, 10, &on_data).await.unwrap();
        assert_eq!(*delivered.lock().unwrap(), 10);
        assert_eq!(&blob.read_at(5, 3).await.unwrap()[..], &[7, 7, 7]);
        assert_eq!(registry.reads.load(Ordering::SeqCst), 4);
    }
}
