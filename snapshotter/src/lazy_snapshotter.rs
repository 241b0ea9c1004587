//! The snapshotter as containerd's snapshots API needs it: the core (`Snapshotter`:
//! blocking, SQLite and directories) run off the async threads, plus lazy pulling, the
//! remote-snapshot protocol over a `RemoteMounter`. This is the one owner of a remote
//! snapshot's life: it mounts the layer on Prepare, serves it again after a restart,
//! and unmounts it on Remove and Cleanup; the core holds no mounter. Every operation
//! returns the crate's own error; the gRPC service (`service`) only translates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::remote::{PrepareIntent, RemoteLayer, RemoteMounter};
use crate::snapshots::{PreparedForLayer, Removed};
use crate::types::{Labels, Mount, Usage};
use crate::{RemoteSnapshot, Snapshotter, remote};

/// The most common way users lose lazy pulling is a client that passes no labels: say so.
const LAZY_PULL_OFF_WARNING: &str = "LAZY PULLING IS OFF FOR THIS LAYER: it is lazy-pullable (it has a \
TOC digest) but containerd passed no image reference and layer digest labels, so it is downloaded \
in full. For Kubernetes set `disable_snapshot_annotations = false` under \
[plugins.\"io.containerd.grpc.v1.cri\".containerd] in containerd's config (containerd 2.x: export \
`enable_remote_snapshot_annotations` from the proxy plugin); with ctr use `lazysnap rpull` or \
`ctr-remote image rpull`; with nerdctl pass `--snapshotter lazysnap`";

/// What a Prepare made.
#[derive(Debug)]
pub enum Prepared {
    /// An ordinary active snapshot, mounted with these.
    Mounts(Vec<Mount>),
    /// The layer is mounted lazily and its snapshot committed under `target`:
    /// containerd neither downloads nor unpacks it (the wire says AlreadyExists).
    Remote { target: String },
}

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
    /// Ordinary snapshots only: remote-snapshot labels are ignored.
    pub fn without_lazy_pulling(core: Arc<Snapshotter>) -> Self {
        Self { core, remote: None }
    }

    /// Lazy pulling: Prepares that carry remote-snapshot labels are mounted by
    /// `mounter`, or fall back after `mount_timeout`.
    pub fn with_lazy_pulling(
        core: Arc<Snapshotter>,
        mounter: Arc<dyn RemoteMounter>,
        mount_timeout: Duration,
    ) -> Self {
        let remote = Remote {
            mounter,
            mount_timeout,
            restoring: Arc::default(),
        };
        Self {
            core,
            remote: Some(remote),
        }
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

    /// Prepare: a layer with remote-snapshot labels is mounted lazily, anything else is an
    /// ordinary snapshot over a parent chain whose lazy layers are served first.
    pub async fn prepare(&self, key: String, parent: String, labels: Labels) -> Result<Prepared> {
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
            .map(Prepared::Mounts)
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

    /// Remove: a lazily pulled layer is unmounted before its snapshot's directory goes,
    /// and the cache then drops what no remaining snapshot uses.
    pub async fn remove(&self, key: String) -> Result<()> {
        let mounter = self.remote.as_ref().map(|r| Arc::clone(&r.mounter));
        self.run("remove", move |s| {
            let removed: Removed = s.remove(&key)?;
            let unmounted = match (&removed.lazy_mountpoint, &mounter) {
                (Some(mountpoint), Some(mounter)) => {
                    mounter.unmount(mountpoint);
                    Some(mounter)
                }
                _ => None,
            };
            removed.delete_files();
            if let Some(mounter) = unmounted {
                release_unused(s, mounter.as_ref());
            }
            Ok(())
        })
        .await
    }

    /// Cleanup: orphan directories go, a layer still mounted in one unmounted first.
    /// Returns the directories removed.
    pub async fn cleanup(&self) -> Result<Vec<PathBuf>> {
        let mounter = self.remote.as_ref().map(|r| Arc::clone(&r.mounter));
        self.run("cleanup", move |s| {
            let removed = s.cleanup(|fs: &Path| {
                if let Some(mounter) = &mounter {
                    mounter.unmount(fs);
                }
            })?;
            if let Some(mounter) = mounter {
                release_unused(s, mounter.as_ref());
            }
            Ok(removed)
        })
        .await
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

    /// Removes a snapshot this Prepare made and gives up on; nothing is mounted in it.
    async fn discard(&self, key: String) {
        let _ = self
            .run("prepare", move |s| {
                s.remove(&key)?.delete_files();
                Ok(())
            })
            .await;
    }

    /// The remote-snapshot protocol: prepare the snapshot, mount the layer into it and
    /// commit it under the chain ID. Any failure falls back to the ordinary snapshot,
    /// which containerd then fills by downloading the layer.
    async fn prepare_remote(
        &self,
        remote: &Remote,
        key: String,
        parent: String,
        labels: Labels,
        layer: RemoteLayer,
    ) -> Result<Prepared> {
        let target = layer.target.clone();
        let done = || Prepared::Remote {
            target: target.clone(),
        };
        let prepared = {
            let (key, parent, labels, target) =
                (key.clone(), parent.clone(), labels.clone(), target.clone());
            self.run("prepare", move |s| {
                s.prepare_for_layer(&key, &parent, &labels, &target)
            })
            .await?
        };
        let (mounts, fs) = match prepared {
            PreparedForLayer::TargetExists => return Ok(done()),
            PreparedForLayer::Prepared { mounts, fs_dir } => (mounts, fs_dir),
        };
        if let Err(e) = self.serve_chain(&parent).await {
            self.discard(key.clone()).await;
            return Err(e);
        }
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
                        return Ok(done());
                    }
                    Err(Error::AlreadyExists(_)) => {
                        // Another Prepare committed the same layer first: ours is surplus.
                        remote.mounter.unmount(&fs);
                        self.discard(key.clone()).await;
                        return Ok(done());
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
        Ok(Prepared::Mounts(mounts))
    }
}

/// Tells the mounter which lazily pulled snapshots remain, so it can drop cached data
/// none of them uses.
fn release_unused(core: &Snapshotter, mounter: &dyn RemoteMounter) {
    match core.remote_snapshots() {
        Ok(remaining) => {
            mounter.release_unused(remaining.into_iter().map(|s| s.mountpoint).collect())
        }
        Err(e) => tracing::warn!(error = %e, "listing lazy snapshots for the cache sweep"),
    }
}
