//! The snapshotter as containerd's snapshots API needs it: the core (`Snapshotter`:
//! blocking, SQLite and directories) run off the async threads, plus lazy pulling, the
//! remote-snapshot protocol over a `RemoteMounter`. Every operation returns the crate's
//! own error; the gRPC service (`service`) only translates.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::remote::{PrepareIntent, RemoteLayer, RemoteMounter};
use crate::types::{Labels, Mount, Usage};
use crate::{RemoteSnapshot, Snapshotter, remote};

/// The most common way users lose lazy pulling is a client that passes no labels: say so.
const LAZY_PULL_OFF_WARNING: &str = "LAZY PULLING IS OFF FOR THIS LAYER: it is lazy-pullable (it has a \
TOC digest) but containerd passed no image reference and layer digest labels, so it is downloaded \
in full. For Kubernetes set `disable_snapshot_annotations = false` under \
[plugins.\"io.containerd.grpc.v1.cri\".containerd] in containerd's config (containerd 2.x: export \
`enable_remote_snapshot_annotations` from the proxy plugin); with ctr use `lazysnap rpull` or \
`ctr-remote image rpull`; with nerdctl pass `--snapshotter lazysnap`";

#[derive(Clone)]
pub struct LazySnapshotter {
    core: Arc<Snapshotter>,
    remote: Option<Remote>,
}

/// Lazy pulling: who mounts layers, and how long a mount may take before Prepare gives up
/// on it and lets containerd download the layer instead.
#[derive(Clone)]
struct Remote {
    mounter: Arc<dyn RemoteMounter>,
    mount_timeout: Duration,
    restoring: Arc<RestoreLocks>,
}

/// One restore of a snapshot at a time, so two requests never mount the same layer twice.
/// Snapshots restore independently: a layer whose registry does not answer delays only
/// the requests that need that layer.
#[derive(Default)]
struct RestoreLocks(Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>);

impl RestoreLocks {
    fn of(&self, mountpoint: &std::path::Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(mountpoint.to_path_buf()).or_default().clone()
    }

    /// Forgets `mountpoint`'s lock once nobody holds or waits for it.
    fn release(&self, mountpoint: &std::path::Path, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference and ours: no other request is using it.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(mountpoint);
        }
    }
}

impl LazySnapshotter {
    /// Lazy pulling, when the core was opened with a mounter: Prepares that carry
    /// remote-snapshot labels are mounted by it, or fall back after `mount_timeout`.
    pub fn with_lazy_pulling(core: Arc<Snapshotter>, mount_timeout: Duration) -> Self {
        let remote = core.mounter().map(|mounter| Remote {
            mounter: Arc::clone(mounter),
            mount_timeout,
            restoring: Arc::default(),
        });
        Self { core, remote }
    }

    pub fn core(&self) -> &Arc<Snapshotter> {
        &self.core
    }

    /// Runs blocking core work off the async threads; a panic in it becomes an error
    /// for this one request, never a dead daemon. `op` names it in the log.
    pub async fn run<T, F>(&self, op: &'static str, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshotter) -> Result<T> + Send + 'static,
    {
        let core = self.core.clone();
        match tokio::task::spawn_blocking(move || work(&core)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                match &e {
                    Error::NotFound(_) | Error::AlreadyExists(_) => tracing::debug!(op, error = %e),
                    _ => tracing::warn!(op, error = %e),
                }
                Err(e)
            }
            Err(join) => {
                tracing::error!(op, error = %join, "request handler panicked");
                Err(Error::Internal(format!("{op}: internal error")))
            }
        }
    }

    /// Prepare: a layer with remote-snapshot labels is mounted lazily (and answered with
    /// AlreadyExists, the protocol's "done"), anything else is an ordinary snapshot over
    /// a parent chain whose lazy layers are served first.
    pub async fn prepare(&self, key: String, parent: String, labels: Labels) -> Result<Vec<Mount>> {
        match (&self.remote, PrepareIntent::of(&labels)) {
            (Some(remote), PrepareIntent::Remote(layer)) => {
                return self
                    .prepare_remote(remote, key, parent, labels, layer)
                    .await;
            }
            (_, PrepareIntent::LazyWithoutLabels { target }) => {
                tracing::warn!(snapshot = %target, "{LAZY_PULL_OFF_WARNING}");
            }
            _ => {}
        }
        self.serve_chain(&parent).await?;
        self.run("prepare", move |s| s.prepare(&key, &parent, &labels))
            .await
    }

    pub async fn view(&self, key: String, parent: String, labels: Labels) -> Result<Vec<Mount>> {
        self.serve_chain(&parent).await?;
        self.run("view", move |s| s.view(&key, &parent, &labels))
            .await
    }

    pub async fn mounts(&self, key: String) -> Result<Vec<Mount>> {
        self.serve_chain(&key).await?;
        self.run("mounts", move |s| s.mounts(&key)).await
    }

    /// Remounts every lazily pulled snapshot, e.g. after a restart. A layer that cannot
    /// be mounted now (registry unreachable) is logged and restored on first use instead.
    /// Returns the mountpoints of the remote snapshots (None if they could not be
    /// listed), so the caller can tell what no snapshot claims any more.
    pub async fn restore_all(&self) -> Option<Vec<PathBuf>> {
        let remote = self.remote.as_ref()?;
        let snapshots = match self.run("restore", |s| s.remote_snapshots()).await {
            Ok(list) => list,
            Err(e) => {
                tracing::error!(error = %e, "listing remote snapshots to restore");
                return None;
            }
        };
        let mut mountpoints = Vec::with_capacity(snapshots.len());
        for snapshot in snapshots {
            if let Err(e) = self.serve(remote, &snapshot).await {
                tracing::warn!(snapshot = %snapshot.name, error = %e, "not restored now; will retry on first use");
            }
            mountpoints.push(snapshot.mountpoint);
        }
        Some(mountpoints)
    }

    /// Makes sure a remote snapshot's layer is mounted, mounting it from its labels if not.
    async fn serve(&self, remote: &Remote, snapshot: &RemoteSnapshot) -> Result<()> {
        let lock = remote.restoring.of(&snapshot.mountpoint);
        let served = {
            let _this_snapshot = lock.lock().await;
            self.mount_again(remote, snapshot).await
        };
        remote.restoring.release(&snapshot.mountpoint, lock);
        served
    }

    async fn mount_again(&self, remote: &Remote, snapshot: &RemoteSnapshot) -> Result<()> {
        if remote.mounter.is_mounted(&snapshot.mountpoint) {
            return Ok(());
        }
        let PrepareIntent::Remote(layer) = PrepareIntent::of(&snapshot.labels) else {
            return Err(Error::FailedPrecondition(format!(
                "remote snapshot {:?} lacks the labels that say where its layer is",
                snapshot.name
            )));
        };
        match tokio::time::timeout(
            remote.mount_timeout,
            remote.mounter.restore(&layer, &snapshot.mountpoint),
        )
        .await
        {
            Ok(Ok(_)) => {
                tracing::info!(snapshot = %snapshot.name, layer = %layer.layer_digest, "remote snapshot restored");
                Ok(())
            }
            Ok(Err(why)) => {
                let message = format!(
                    "layer {} of snapshot {:?} cannot be served: {why}",
                    layer.layer_digest, snapshot.name
                );
                Err(if why.is_transient() {
                    Error::Unavailable(message)
                } else {
                    Error::FailedPrecondition(message)
                })
            }
            Err(_) => {
                remote.mounter.unmount(&snapshot.mountpoint);
                Err(Error::Unavailable(format!(
                    "layer {} of snapshot {:?} did not mount within {:?}",
                    layer.layer_digest, snapshot.name, remote.mount_timeout
                )))
            }
        }
    }

    /// Before mounts over `key` are handed out, every lazily pulled layer below it must
    /// be served (after a restart they are remounted on first use).
    async fn serve_chain(&self, key: &str) -> Result<()> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        if key.is_empty() {
            return Ok(());
        }
        let key = key.to_string();
        let chain = self.run("mounts", move |s| s.remote_chain(&key)).await?;
        for snapshot in &chain {
            match self.serve(remote, snapshot).await {
                Ok(()) => {}
                // New containers read a layer's native copy, not its FUSE mount: a
                // layer that has one needs no registry, no kept metadata, no mount.
                Err(e) if crate::native::native_of(&snapshot.mountpoint).is_some() => {
                    tracing::warn!(snapshot = %snapshot.name, error = %e,
                        "lazy layer not served again; containers read its native copy");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The remote-snapshot protocol: prepare the snapshot, mount the layer into it,
    /// commit it under the chain ID and answer AlreadyExists. Any failure falls back to
    /// the ordinary snapshot, which containerd then fills by downloading the layer.
    async fn prepare_remote(
        &self,
        remote: &Remote,
        key: String,
        parent: String,
        labels: Labels,
        layer: RemoteLayer,
    ) -> Result<Vec<Mount>> {
        let target = layer.target.clone();
        let exists = {
            let target = target.clone();
            self.run("prepare", move |s| s.stat(&target)).await.is_ok()
        };
        let done = || Error::AlreadyExists(format!("target snapshot {target:?}"));
        if exists {
            return Err(done());
        }
        self.serve_chain(&parent).await?;
        let mounts = {
            let (key, parent, labels) = (key.clone(), parent.clone(), labels.clone());
            self.run("prepare", move |s| s.prepare(&key, &parent, &labels))
                .await?
        };
        let fs = {
            let key = key.clone();
            self.run("prepare", move |s| s.fs_dir_of(&key)).await?
        };
        let why = match tokio::time::timeout(
            remote.mount_timeout,
            remote.mounter.mount(&layer, &fs),
        )
        .await
        {
            Ok(Ok(info)) => {
                let mut committed_labels = labels.clone();
                committed_labels.insert(
                    remote::LABEL_REMOTE.into(),
                    remote::REMOTE_LABEL_VALUE.into(),
                );
                let usage = Usage {
                    size: i64::try_from(info.size).unwrap_or(i64::MAX),
                    inodes: i64::try_from(info.entries).unwrap_or(i64::MAX),
                };
                let (t, k) = (target.clone(), key.clone());
                let committed = self
                    .run("prepare", move |s| {
                        s.commit_remote(&t, &k, &committed_labels, usage)
                    })
                    .await;
                match committed {
                    Ok(()) => {
                        tracing::info!(layer = %layer.layer_digest, image = %layer.image_ref, snapshot = %target, preopened = info.preopened, "layer mounted lazily");
                        return Err(done());
                    }
                    Err(e @ Error::AlreadyExists(_)) => {
                        // Another Prepare committed the same layer first: ours is surplus.
                        remote.mounter.unmount(&fs);
                        let k = key.clone();
                        let _ = self.run("prepare", move |s| s.remove(&k)).await;
                        return Err(e);
                    }
                    Err(e) => e.to_string(),
                }
            }
            Ok(Err(why)) => why.to_string(),
            Err(_) => format!("mounting took longer than {:?}", remote.mount_timeout),
        };
        remote.mounter.unmount(&fs);
        tracing::warn!(
            layer = %layer.layer_digest,
            image = %layer.image_ref,
            "lazy pull not possible, containerd will download and unpack the layer: {why}"
        );
        Ok(mounts)
    }
}
