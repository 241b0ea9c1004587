//! Remote snapshots: the labels containerd's clients send when a layer may be pulled
//! lazily, and the seam through which the snapshotter has such a layer mounted.
//!
//! containerd's unpacker calls Prepare with `containerd.io/snapshot.ref` set to the
//! layer's chain ID; clients that support lazy pulling add the image reference and layer
//! digest (stargz-snapshotter's `…/remote/stargz.*` labels, or CRI's `…/cri.*` labels).
//! When the layer can be mounted, the snapshot is committed under the chain ID and
//! Prepare answers AlreadyExists, so containerd neither downloads nor unpacks it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use crate::types::Labels;

pub const LABEL_TARGET_REF: &str = "containerd.io/snapshot.ref";
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";
pub const REMOTE_LABEL_VALUE: &str = "remote snapshot";
pub const LABEL_STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
pub const LABEL_STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
pub const LABEL_STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
pub const LABEL_STARGZ_PREFETCH: &str = "containerd.io/snapshot/remote/stargz.prefetch";
pub const LABEL_STARGZ_SKIP_VERIFY: &str = "containerd.io/snapshot/remote/stargz.skipverify";
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const LABEL_CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
pub const LABEL_CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const LABEL_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// soci-snapshotter's label naming the SOCI index to read an image's gzip layers through.
pub const LABEL_SOCI_INDEX_DIGEST: &str = "containerd.io/snapshot/remote/soci.index.digest";

/// Everything needed to find and verify one lazily pulled layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayer {
    /// The chain ID the snapshot is committed under.
    pub target: String,
    pub image_ref: String,
    pub layer_digest: String,
    /// Digests of the image's other layers, for resolving and prefetching siblings.
    pub image_layers: Vec<String>,
    /// `containerd.io/snapshot/stargz/toc.digest`, when the image annotated the layer.
    pub toc_digest: Option<String>,
    /// The manifest's digest (CRI), for layers whose annotations containerd drops.
    pub manifest_digest: Option<String>,
    /// Bytes to prefetch when the layer has no landmark (`stargz.prefetch`).
    pub prefetch_size: Option<u64>,
    pub skip_verify: bool,
    /// The SOCI index to read the layer through, when the client names one.
    pub soci_index_digest: Option<String>,
}

/// What the labels of one Prepare say about lazy pulling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrepareIntent {
    /// An ordinary Prepare (a container's rootfs, a client that does not unpack).
    Local,
    /// containerd unpacks a layer and the client told us where to find it.
    Remote(RemoteLayer),
    /// containerd unpacks a layer that looks lazy-pullable (it carries a TOC digest),
    /// but the labels that say where to fetch it from are missing.
    LazyWithoutLabels { target: String },
}

impl PrepareIntent {
    pub fn of(labels: &Labels) -> PrepareIntent {
        let Some(target) = labels.get(LABEL_TARGET_REF).filter(|t| !t.is_empty()) else {
            return PrepareIntent::Local;
        };
        let get = |stargz: &str, cri: &str| {
            labels
                .get(stargz)
                .or_else(|| labels.get(cri))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let image_ref = get(LABEL_STARGZ_REFERENCE, LABEL_CRI_IMAGE_REF);
        let layer_digest = get(LABEL_STARGZ_DIGEST, LABEL_CRI_LAYER_DIGEST);
        let toc_digest = labels
            .get(LABEL_TOC_DIGEST)
            .filter(|v| !v.is_empty())
            .cloned();
        match (image_ref, layer_digest) {
            (Some(image_ref), Some(layer_digest)) => PrepareIntent::Remote(RemoteLayer {
                target: target.clone(),
                image_ref,
                layer_digest,
                image_layers: get(LABEL_STARGZ_LAYERS, LABEL_CRI_IMAGE_LAYERS)
                    .map(|l| {
                        l.split(',')
                            .map(str::to_string)
                            .filter(|s| !s.is_empty())
                            .collect()
                    })
                    .unwrap_or_default(),
                toc_digest,
                manifest_digest: labels.get(LABEL_CRI_MANIFEST_DIGEST).cloned(),
                prefetch_size: labels
                    .get(LABEL_STARGZ_PREFETCH)
                    .and_then(|v| v.parse().ok()),
                skip_verify: labels.contains_key(LABEL_STARGZ_SKIP_VERIFY),
                soci_index_digest: labels
                    .get(LABEL_SOCI_INDEX_DIGEST)
                    .filter(|v| !v.is_empty())
                    .cloned(),
            }),
            _ if toc_digest.is_some() => PrepareIntent::LazyWithoutLabels {
                target: target.clone(),
            },
            _ => PrepareIntent::Local,
        }
    }
}

/// Whether a committed snapshot's labels mark it as lazily mounted.
pub fn is_remote(labels: &Labels) -> bool {
    labels
        .get(LABEL_REMOTE)
        .is_some_and(|v| v == REMOTE_LABEL_VALUE)
}

/// Facts about a mounted layer the snapshotter records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MountedInfo {
    /// Uncompressed size of the layer's files, reported as the snapshot's usage.
    pub size: u64,
    pub entries: u64,
    /// Its TOC was fetched ahead of its Prepare, while a sibling layer mounted.
    pub preopened: bool,
}

/// Why a layer was not mounted lazily. Prepare falls back to a full pull on any of them
/// (the log line says which); a restore of an existing snapshot reports the first two as
/// "unavailable" (worth retrying) and the last two as a failed precondition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    /// The registry did not serve the layer, its TOC or its manifest (network, auth, 404).
    #[error("registry: {0}")]
    Registry(String),
    /// Mounting failed on this host (FUSE, taking over a held connection).
    #[error("mount: {0}")]
    Mount(String),
    /// The labels do not name a layer that can be fetched (bad reference or digest).
    #[error("labels: {0}")]
    Labels(String),
    /// The layer is not one to mount lazily: no eStargz / zstd:chunked TOC, one that does
    /// not verify against what the image publishes, or one outside lazysnapd's bounds.
    #[error("layer: {0}")]
    Layer(String),
}

impl MountError {
    /// Opening a layer failed: reading its bytes is the registry's part, the rest the layer's.
    pub fn opening(layer_digest: &str, e: estargz::Error) -> MountError {
        match e {
            estargz::Error::Blob(_) | estargz::Error::Io { .. } => {
                MountError::Registry(format!("layer {layer_digest}: {e}"))
            }
            other => MountError::Layer(format!("layer {layer_digest}: {other}")),
        }
    }

    /// Whether trying again later may succeed (the layer itself was fine).
    pub fn is_transient(&self) -> bool {
        matches!(self, MountError::Registry(_) | MountError::Mount(_))
    }
}

pub type MountFuture<'a> =
    Pin<Box<dyn Future<Output = Result<MountedInfo, MountError>> + Send + 'a>>;

/// Mounts lazily pulled layers; implemented with FUSE by the daemon, with fakes in tests.
pub trait RemoteMounter: Send + Sync {
    /// Mounts `layer` read-only at `mountpoint` (an empty directory); resolves only when
    /// the layer is verified and served. The error says why, for the fallback's log line.
    fn mount<'a>(&'a self, layer: &'a RemoteLayer, mountpoint: &'a Path) -> MountFuture<'a>;
    /// Mounts again the layer of an existing snapshot (after a restart, on first use):
    /// as `mount`, but what was verified when it was first mounted may be used again
    /// without asking the registry.
    fn restore<'a>(&'a self, layer: &'a RemoteLayer, mountpoint: &'a Path) -> MountFuture<'a> {
        self.mount(layer, mountpoint)
    }
    /// Unmounts whatever this mounter serves at `mountpoint`; idempotent.
    fn unmount(&self, mountpoint: &Path);
    /// Whether this process currently serves `mountpoint`.
    fn is_mounted(&self, mountpoint: &Path) -> bool;
    /// A lazily pulled snapshot was removed; `remaining` are the mountpoints of those
    /// left. Cached data that none of them uses may go.
    fn release_unused(&self, remaining: Vec<PathBuf>) {
        let _ = remaining;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn stargz_labels_make_a_remote_prepare() {
        let l = labels(&[
            (LABEL_TARGET_REF, "sha256:chain"),
            (LABEL_STARGZ_REFERENCE, "127.0.0.1:5000/a:1"),
            (LABEL_STARGZ_DIGEST, "sha256:l1"),
            (LABEL_STARGZ_LAYERS, "sha256:l1,sha256:l2"),
            (LABEL_STARGZ_PREFETCH, "10485760"),
            (LABEL_TOC_DIGEST, "sha256:toc"),
        ]);
        let PrepareIntent::Remote(r) = PrepareIntent::of(&l) else {
            panic!("not remote")
        };
        assert_eq!(r.target, "sha256:chain");
        assert_eq!(r.image_ref, "127.0.0.1:5000/a:1");
        assert_eq!(r.layer_digest, "sha256:l1");
        assert_eq!(r.image_layers, vec!["sha256:l1", "sha256:l2"]);
        assert_eq!(r.toc_digest.as_deref(), Some("sha256:toc"));
        assert_eq!(r.prefetch_size, Some(10 << 20));
        assert!(!r.skip_verify);
    }

    #[test]
    fn cri_labels_make_a_remote_prepare() {
        let l = labels(&[
            (LABEL_TARGET_REF, "sha256:chain"),
            (LABEL_CRI_IMAGE_REF, "reg/a:1"),
            (LABEL_CRI_LAYER_DIGEST, "sha256:l1"),
            (LABEL_CRI_MANIFEST_DIGEST, "sha256:m"),
        ]);
        let PrepareIntent::Remote(r) = PrepareIntent::of(&l) else {
            panic!("not remote")
        };
        assert_eq!(r.manifest_digest.as_deref(), Some("sha256:m"));
        assert!(r.image_layers.is_empty());
        assert_eq!(r.soci_index_digest, None);
    }

    #[test]
    fn soci_snapshotters_index_label_names_the_index() {
        let l = labels(&[
            (LABEL_TARGET_REF, "sha256:chain"),
            (LABEL_CRI_IMAGE_REF, "reg/a:1"),
            (LABEL_CRI_LAYER_DIGEST, "sha256:l1"),
            (LABEL_SOCI_INDEX_DIGEST, "sha256:index"),
        ]);
        let PrepareIntent::Remote(r) = PrepareIntent::of(&l) else {
            panic!("not remote")
        };
        assert_eq!(r.soci_index_digest.as_deref(), Some("sha256:index"));
    }

    #[test]
    fn missing_labels_are_told_apart() {
        assert_eq!(PrepareIntent::of(&labels(&[])), PrepareIntent::Local);
        assert_eq!(
            PrepareIntent::of(&labels(&[(LABEL_TARGET_REF, "sha256:c")])),
            PrepareIntent::Local
        );
        assert_eq!(
            PrepareIntent::of(&labels(&[
                (LABEL_TARGET_REF, "sha256:c"),
                (LABEL_TOC_DIGEST, "sha256:t")
            ])),
            PrepareIntent::LazyWithoutLabels {
                target: "sha256:c".into()
            }
        );
    }
}
