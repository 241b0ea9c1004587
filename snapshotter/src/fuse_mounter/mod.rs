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

mod handover;
mod images;
mod kept_blob;
mod opening;
mod status;
mod sweep;

pub use images::{FetchImageError, ImageFetched, layers_by_image, with_lower};
pub use kept_blob::FAILURE_HOLD;
pub use status::{LayerAccess, MountedLayerStatus, format_name};

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use estargz::lock;

use crate::fsutil;
use crate::holder::HolderClient;
use crate::layer_source::LayerSource;
use crate::libraries::LibraryFinder;
use crate::parse_gate::ParseGate;
use crate::preopen::{self, Preopener};
use crate::remote::{MountError, MountFuture, MountedInfo, RemoteLayer, RemoteMounter};
use crate::tocstore::TocStore;
use handover::{HeldConnection, handover_meta, passthrough_ids};
use images::image_layers_of;

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
    /// Fetches the zTOCs of a SOCI image's other layers while its earlier layers mount;
    /// None as `preopener`.
    ztocs_ahead: Option<crate::soci_index::ZtocsAhead>,
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
            ztocs_ahead: None,
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
    fn backing(&self, layer: &LayerSource<'_>) -> fusefs::Backing {
        fusefs::Backing {
            cache: self.cache.clone(),
            link: self.links.for_host(layer.api_host()),
            handle: self.handle.clone(),
        }
    }

    /// On a layer's mount, pre-opens the TOCs (or fetches the zTOCs) of its image's
    /// other layers (a few at a time), to be used by their own Prepares once verified.
    pub fn with_sibling_preopen(mut self) -> FuseMounter {
        self.preopener = Some(Preopener::new(
            self.handle.clone(),
            preopen::DEFAULT_CONCURRENCY,
            preopen::DEFAULT_UNCLAIMED_TTL,
        ));
        self.ztocs_ahead = Some(Preopener::new(
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

    fn mounts(&self) -> MutexGuard<'_, HashMap<PathBuf, Served>> {
        lock(&self.mounts)
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
}

impl FuseMounter {
    fn insert(
        &self,
        mountpoint: &Path,
        mounted: fusefs::MountedLayer,
        layer: &LayerSource<'_>,
        handed_over: bool,
    ) {
        let served = Served {
            mounted,
            layer_digest: layer.layer_digest.clone(),
            image_ref: layer.image_ref.clone(),
            repository: layer.repository(),
            image_layers: layer.image_layers.clone(),
            handed_over,
        };
        let table = Arc::downgrade(&self.mounts);
        let digest = layer.layer_digest.clone();
        let finder = LibraryFinder::new(move || {
            table
                .upgrade()
                .map_or_else(Vec::new, |mounts| image_layers_of(&lock(&mounts), &digest))
        });
        served.mounted.fs().set_libraries(Arc::new(finder));
        let fs = Arc::downgrade(served.mounted.fs());
        if let Some(mut previous) = self.mounts().insert(mountpoint.to_path_buf(), served) {
            let _ = previous.mounted.unmount();
        }
        if self.native_copies && crate::native::native_of(mountpoint).is_none() {
            self.handle.spawn(crate::native::copy_when_local(
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
        layer: &LayerSource<'_>,
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
        let layer_meta = RemoteLayer::clone(layer);
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

impl FuseMounter {
    /// Opens the layer from its registry (through a SOCI index if it has one) and
    /// serves it.
    async fn mount_from_registry(
        &self,
        layer: &LayerSource<'_>,
        mountpoint: &Path,
    ) -> Result<MountedInfo, MountError> {
        // A layer without a TOC label may be plain gzip with a SOCI index.
        if layer.toc_digest.is_none() {
            let siblings = self.siblings_to_open(layer);
            let through_index = crate::soci_index::open_through_index(
                &self.client,
                &self.soci,
                &self.parse_gate,
                layer,
                &self.local_layers,
                self.ztocs_ahead
                    .as_ref()
                    .map(|ahead| (ahead, &siblings[..])),
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
    }

    /// The layer opened from what is on disk, with no network, and what that was; None
    /// when nothing usable is.
    async fn open_local(
        &self,
        layer: &LayerSource<'_>,
    ) -> Result<Option<(Arc<estargz::Layer>, &'static str)>, MountError> {
        // A SOCI image's layer without a zTOC that was fetched whole: its copy is
        // checked against the layer digest, which needs no index and no registry.
        let local_copy =
            crate::soci_index::local_copy_path(&self.local_layers, &layer.layer_digest)
                .filter(|p| layer.toc_digest.is_none() && p.is_file());
        if let Some(path) = local_copy {
            match crate::soci_index::open_local_copy(&self.parse_gate, &layer.layer_digest, &path)
                .await
            {
                Ok(opened) => return Ok(Some((Arc::new(opened), "local copy"))),
                Err(e) => tracing::warn!(layer = %layer.layer_digest, error = %e,
                    "the layer's local copy is unusable; opening it from its registry"),
            }
        }
        Ok(self
            .open_kept(layer)
            .await?
            .map(|kept| (kept, "kept metadata")))
    }
}

impl RemoteMounter for FuseMounter {
    fn mount<'a>(&'a self, layer: &'a RemoteLayer, mountpoint: &'a Path) -> MountFuture<'a> {
        Box::pin(async move {
            self.mount_from_registry(&LayerSource::of(layer)?, mountpoint)
                .await
        })
    }

    /// From the layer's kept metadata when it verifies, with no network: its chunks
    /// come from the cache, and from the registry only when a read misses it.
    fn restore<'a>(&'a self, layer: &'a RemoteLayer, mountpoint: &'a Path) -> MountFuture<'a> {
        Box::pin(async move {
            let layer = LayerSource::of(layer)?;
            match self.open_local(&layer).await? {
                Some((opened, from)) => {
                    let info = self.serve_layer(&layer, opened, mountpoint, false).await?;
                    tracing::info!(layer = %layer.layer_digest, path = %mountpoint.display(),
                        "layer opened from its {from}, without the registry");
                    Ok(info)
                }
                None => self.mount_from_registry(&layer, mountpoint).await,
            }
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

    /// The background sweep in `sweep.rs`.
    fn release_unused(&self, remaining: Vec<PathBuf>) {
        self.sweep_unused(remaining);
    }
}
