//! The real `RemoteMounter`: finds a layer in its registry, checks its TOC against the
//! digest the image published, and serves it with FUSE.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::fsutil;
use crate::remote::{MountFuture, MountedInfo, RemoteLayer, RemoteMounter};

pub struct FuseMounter {
    client: registry::Client,
    cache: fusefs::SharedCache,
    config: fusefs::FsConfig,
    handle: tokio::runtime::Handle,
    /// Mount a layer whose TOC cannot be verified when the client asked for it
    /// (`stargz.skipverify`); off by default, as in stargz-snapshotter.
    allow_no_verification: bool,
    mounts: Mutex<HashMap<PathBuf, Served>>,
}

/// A layer this process serves, and where it came from.
struct Served {
    mounted: fusefs::MountedLayer,
    layer_digest: String,
    image_ref: String,
}

/// One mounted layer, for status and metrics.
#[derive(Debug, Clone)]
pub struct MountedLayerStatus {
    pub mountpoint: PathBuf,
    pub layer_digest: String,
    pub image_ref: String,
    pub stats: fusefs::Stats,
}

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
            config,
            handle,
            allow_no_verification,
            mounts: Mutex::new(HashMap::new()),
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
                stats: served.mounted.stats(),
            })
            .collect();
        out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        out
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

    /// Unmounts every layer (daemon shutdown): nothing is left mounted after exit.
    pub fn unmount_all(&self) {
        let drained: Vec<_> = self.mounts().drain().collect();
        for (path, mut served) in drained {
            if let Err(e) = served.mounted.unmount() {
                tracing::warn!(path = %path.display(), error = %e, "unmount failed");
            }
        }
    }

    /// Opens the layer's blob and TOC, verified against what the image published.
    async fn open_layer(&self, layer: &RemoteLayer) -> Result<estargz::Layer, String> {
        let reference: registry::Reference = layer
            .image_ref
            .parse()
            .map_err(|e| format!("image reference {:?}: {e}", layer.image_ref))?;
        let digest: registry::Digest = layer
            .layer_digest
            .parse()
            .map_err(|e| format!("layer digest {:?}: {e}", layer.layer_digest))?;
        let opts = self.verification(layer, &reference, &digest).await?;
        let blob =
            registry::RemoteBlob::open(self.client.clone(), reference.repository.clone(), digest)
                .await
                .map_err(|e| e.to_string())?;
        estargz::Layer::open(Arc::new(blob), &opts)
            .await
            .map_err(|e| format!("layer {}: {e}", layer.layer_digest))
    }

    /// What the TOC must hash to. eStargz layers carry `toc.digest` as a label;
    /// containers/storage zstd:chunked layers only have annotations, which containerd does
    /// not forward, so they are read from the manifest.
    async fn verification(
        &self,
        layer: &RemoteLayer,
        reference: &registry::Reference,
        digest: &registry::Digest,
    ) -> Result<estargz::OpenOptions, String> {
        let mut opts = estargz::OpenOptions::default();
        if let Some(toc) = &layer.toc_digest {
            opts.expected_toc_digest = Some(
                toc.parse()
                    .map_err(|e| format!("toc.digest label {toc:?}: {e}"))?,
            );
            return Ok(opts);
        }
        let annotations = self.layer_annotations(layer, reference, digest).await?;
        let get = |key: &str| annotations.get(key).map(|v| v.parse::<estargz::Digest>());
        if let Some(toc) = get(estargz::TOC_DIGEST_ANNOTATION) {
            opts.expected_toc_digest =
                Some(toc.map_err(|e| format!("toc.digest annotation: {e}"))?);
        } else if let Some(sum) = get(estargz::MANIFEST_CHECKSUM_ANNOTATION)
            .or_else(|| get(estargz::LEGACY_MANIFEST_CHECKSUM_ANNOTATION))
        {
            opts.expected_manifest_checksum =
                Some(sum.map_err(|e| format!("manifest-checksum annotation: {e}"))?);
        } else if !(layer.skip_verify && self.allow_no_verification) {
            return Err(
                "the image publishes no TOC digest for this layer, so it cannot be verified \
                        (not eStargz / zstd:chunked, or converted without annotations)"
                    .to_string(),
            );
        }
        Ok(opts)
    }

    async fn layer_annotations(
        &self,
        layer: &RemoteLayer,
        reference: &registry::Reference,
        digest: &registry::Digest,
    ) -> Result<std::collections::BTreeMap<String, String>, String> {
        let manifest = match &layer.manifest_digest {
            Some(manifest_digest) => {
                let fetched = self
                    .client
                    .fetch_manifest(&reference.repository, manifest_digest)
                    .await
                    .map_err(|e| e.to_string())?;
                serde_json::from_slice::<registry::ImageManifest>(&fetched.bytes)
                    .map_err(|e| format!("manifest {manifest_digest}: {e}"))?
            }
            None => {
                self.client
                    .resolve(reference)
                    .await
                    .map_err(|e| e.to_string())?
                    .manifest
            }
        };
        let descriptor = manifest
            .layers
            .iter()
            .find(|d| d.digest == *digest)
            .ok_or_else(|| format!("the image's manifest does not list layer {digest}"))?;
        Ok(descriptor.annotations.clone().unwrap_or_default())
    }
}

impl RemoteMounter for FuseMounter {
    fn mount<'a>(&'a self, layer: &'a RemoteLayer, mountpoint: &'a Path) -> MountFuture<'a> {
        Box::pin(async move {
            let opened = Arc::new(self.open_layer(layer).await?);
            let index = opened.index();
            let info = MountedInfo {
                size: (0..index.len())
                    .map(|i| index.entry(estargz::NodeId(i as u32)).size())
                    .sum(),
                entries: index.len() as u64,
            };
            // A FUSE mount left behind by a daemon that died is dead (ENOTCONN): detach it.
            for stale in fsutil::mounts_under(mountpoint) {
                let _ = fsutil::unmount_detach(&stale);
            }
            let (cache, handle, config, path) = (
                self.cache.clone(),
                self.handle.clone(),
                self.config.clone(),
                mountpoint.to_path_buf(),
            );
            // Mounting waits for the kernel's handshake: keep it off the async threads.
            let mounted = tokio::task::spawn_blocking(move || {
                fusefs::mount(opened, &path, &cache, handle, config)
            })
            .await
            .map_err(|e| format!("mount task: {e}"))?
            .map_err(|e| format!("FUSE mount at {}: {e}", mountpoint.display()))?;
            let served = Served {
                mounted,
                layer_digest: layer.layer_digest.clone(),
                image_ref: layer.image_ref.clone(),
            };
            if let Some(mut previous) = self.mounts().insert(mountpoint.to_path_buf(), served) {
                let _ = previous.mounted.unmount();
            }
            Ok(info)
        })
    }

    fn unmount(&self, mountpoint: &Path) {
        let removed = self.mounts().remove(mountpoint);
        if let Some(mut served) = removed
            && let Err(e) = served.mounted.unmount()
        {
            tracing::warn!(path = %mountpoint.display(), error = %e, "unmount failed");
        }
    }

    fn is_mounted(&self, mountpoint: &Path) -> bool {
        self.mounts().contains_key(mountpoint)
    }
}
