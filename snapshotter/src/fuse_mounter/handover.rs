//! Connections handed to the fd holder and taken over from it: what the holder keeps
//! beside each fd, the connections an earlier daemon left, and serving one again.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use estargz::lock;
use serde_json::json;

use super::FuseMounter;
use crate::fsutil;
use crate::holder::HolderClient;
use crate::layer_source::LayerSource;
use crate::remote::{MountError, RemoteLayer};

pub(super) struct HeldConnection {
    handover: fusefs::Handover,
    fd: OwnedFd,
}

/// Where a mount's FUSE passthrough backing ids are recorded for a successor: beside
/// the mountpoint in the snapshot's directory (`fs` → `fs.passthrough-ids`).
pub(super) fn passthrough_ids(mountpoint: &Path) -> PathBuf {
    let name = mountpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    mountpoint.with_file_name(format!("{name}.passthrough-ids"))
}

/// What the holder keeps next to each fd: what `fusefs::adopt` needs, and the layer
/// for the logs.
pub(super) fn handover_meta(h: &fusefs::Handover, layer: &RemoteLayer) -> String {
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

impl FuseMounter {
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

    pub(super) fn held(&self) -> MutexGuard<'_, HashMap<PathBuf, HeldConnection>> {
        lock(&self.held)
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

    pub(super) fn forget_held(&self, mountpoint: &Path) {
        if let Some(holder) = &self.holder
            && let Err(e) = holder.forget(&mountpoint.to_string_lossy())
        {
            tracing::warn!(path = %mountpoint.display(), error = %e, "the fd holder did not let go");
        }
    }

    /// Takes over a connection the holder kept, if there is one for `mountpoint`.
    /// Err means there was one and it could not be served (it is then dropped).
    pub(super) async fn take_over(
        &self,
        layer: &LayerSource<'_>,
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
}
