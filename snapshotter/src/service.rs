//! The `containerd.services.snapshots.v1.Snapshots` gRPC service over a `Snapshotter`.
//! The one place where snapshotter errors become gRPC status codes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::Snapshotter;
use crate::error::Error;
use crate::filter::Filter;
use crate::proto::containerd::types::Mount as PbMount;
use crate::proto::snapshots as pb;
use crate::proto::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use crate::remote::{self, PrepareIntent, RemoteLayer, RemoteMounter};
use crate::types::{Info, Kind, Labels, Mount, UpdateField, Usage};

/// The most common way users lose lazy pulling is a client that passes no labels: say so.
const LAZY_PULL_OFF_WARNING: &str = "LAZY PULLING IS OFF FOR THIS LAYER: it is lazy-pullable (it has a \
TOC digest) but containerd passed no image reference and layer digest labels, so it is downloaded \
in full. For Kubernetes set `disable_snapshot_annotations = false` under \
[plugins.\"io.containerd.grpc.v1.cri\".containerd] in containerd's config; with ctr use \
`lazysnap rpull` or `ctr-remote image rpull`; with nerdctl pass `--snapshotter lazysnap`";

/// containerd's own services send List results in blocks of this many.
const LIST_BATCH: usize = 100;

#[derive(Clone)]
pub struct SnapshotService {
    snapshotter: Arc<Snapshotter>,
    remote: Option<Remote>,
}

/// Lazy pulling: who mounts layers, and how long a mount may take before Prepare gives up
/// on it and lets containerd download the layer instead.
#[derive(Clone)]
struct Remote {
    mounter: Arc<dyn RemoteMounter>,
    mount_timeout: Duration,
    /// One restore at a time, so two requests never mount the same layer twice.
    restoring: Arc<tokio::sync::Mutex<()>>,
}

impl SnapshotService {
    pub fn new(snapshotter: Arc<Snapshotter>) -> Self {
        Self {
            snapshotter,
            remote: None,
        }
    }

    /// Turns lazy pulling on: Prepares that carry remote-snapshot labels are mounted by
    /// `mounter` (the same one the snapshotter was opened with).
    pub fn with_remote(mut self, mounter: Arc<dyn RemoteMounter>, mount_timeout: Duration) -> Self {
        self.remote = Some(Remote {
            mounter,
            mount_timeout,
            restoring: Arc::new(tokio::sync::Mutex::new(())),
        });
        self
    }

    /// Remounts every lazily pulled snapshot, e.g. after a restart. A layer that cannot
    /// be mounted now (registry unreachable) is logged and restored on first use instead.
    /// Returns the mountpoints of the remote snapshots (None if they could not be
    /// listed), so the caller can tell what no snapshot claims any more.
    pub async fn restore_all(&self) -> Option<Vec<std::path::PathBuf>> {
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
                tracing::warn!(snapshot = %snapshot.name, error = %e.message(), "not restored now; will retry on first use");
            }
            mountpoints.push(snapshot.mountpoint);
        }
        Some(mountpoints)
    }

    /// Makes sure a remote snapshot's layer is mounted, mounting it from its labels if not.
    async fn serve(&self, remote: &Remote, snapshot: &crate::RemoteSnapshot) -> Result<(), Status> {
        let _one_at_a_time = remote.restoring.lock().await;
        if remote.mounter.is_mounted(&snapshot.mountpoint) {
            return Ok(());
        }
        let PrepareIntent::Remote(layer) = PrepareIntent::of(&snapshot.labels) else {
            return Err(Status::failed_precondition(format!(
                "remote snapshot {:?} lacks the labels that say where its layer is",
                snapshot.name
            )));
        };
        match tokio::time::timeout(
            remote.mount_timeout,
            remote.mounter.mount(&layer, &snapshot.mountpoint),
        )
        .await
        {
            Ok(Ok(_)) => {
                tracing::info!(snapshot = %snapshot.name, layer = %layer.layer_digest, "remote snapshot restored");
                Ok(())
            }
            Ok(Err(why)) => Err(Status::unavailable(format!(
                "layer {} of snapshot {:?} cannot be served: {why}",
                layer.layer_digest, snapshot.name
            ))),
            Err(_) => {
                remote.mounter.unmount(&snapshot.mountpoint);
                Err(Status::unavailable(format!(
                    "layer {} of snapshot {:?} did not mount within {:?}",
                    layer.layer_digest, snapshot.name, remote.mount_timeout
                )))
            }
        }
    }

    /// Before mounts over `key` are handed out, every lazily pulled layer below it must
    /// be served (after a restart they are remounted on first use).
    async fn serve_chain(&self, key: &str) -> Result<(), Status> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        if key.is_empty() {
            return Ok(());
        }
        let key = key.to_string();
        let chain = self.run("mounts", move |s| s.remote_chain(&key)).await?;
        for snapshot in &chain {
            self.serve(remote, snapshot).await?;
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
    ) -> Result<Vec<Mount>, Status> {
        let target = layer.target.clone();
        let exists = {
            let target = target.clone();
            self.run("prepare", move |s| s.stat(&target)).await.is_ok()
        };
        if exists {
            return Err(Status::already_exists(format!(
                "target snapshot {target:?}: already exists"
            )));
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
                        return Err(Status::already_exists(format!(
                            "target snapshot {target:?}: already exists"
                        )));
                    }
                    Err(status) if status.code() == tonic::Code::AlreadyExists => {
                        // Another Prepare committed the same layer first: ours is surplus.
                        remote.mounter.unmount(&fs);
                        let k = key.clone();
                        let _ = self.run("prepare", move |s| s.remove(&k)).await;
                        return Err(status);
                    }
                    Err(status) => status.message().to_string(),
                }
            }
            Ok(Err(why)) => why,
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

    pub fn into_server(self) -> SnapshotsServer<Self> {
        SnapshotsServer::new(self)
    }

    /// Runs blocking snapshotter work off the async threads; a panic in it becomes an
    /// error for this one request, never a dead daemon.
    async fn run<T, F>(&self, rpc: &'static str, work: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshotter) -> crate::Result<T> + Send + 'static,
    {
        let snapshotter = self.snapshotter.clone();
        match tokio::task::spawn_blocking(move || work(&snapshotter)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                match &e {
                    Error::NotFound(_) | Error::AlreadyExists(_) => {
                        tracing::debug!(rpc, error = %e)
                    }
                    _ => tracing::warn!(rpc, error = %e),
                }
                Err(to_status(e))
            }
            Err(join) => {
                tracing::error!(rpc, error = %join, "request handler panicked");
                Err(Status::internal(format!("{rpc}: internal error")))
            }
        }
    }
}

pub fn to_status(e: Error) -> Status {
    let message = e.to_string();
    match e {
        Error::NotFound(_) => Status::not_found(message),
        Error::AlreadyExists(_) => Status::already_exists(message),
        Error::FailedPrecondition(_) => Status::failed_precondition(message),
        Error::InvalidArgument(_) => Status::invalid_argument(message),
        Error::Store(_) | Error::Io { .. } | Error::Internal(_) => Status::internal(message),
    }
}

fn labels(map: std::collections::HashMap<String, String>) -> Labels {
    map.into_iter().collect()
}

fn mounts(mounts: Vec<Mount>) -> Vec<PbMount> {
    mounts
        .into_iter()
        .map(|m| PbMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn to_pb_info(info: Info) -> pb::Info {
    pb::Info {
        name: info.name,
        parent: info.parent,
        kind: match info.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(info.created.into()),
        updated_at: Some(info.updated.into()),
        labels: info.labels.into_iter().collect(),
    }
}

fn update_fields(mask: Option<prost_types::FieldMask>) -> Result<Vec<UpdateField>, Error> {
    let paths = mask.map(|m| m.paths).unwrap_or_default();
    paths
        .into_iter()
        .map(|path| match path.strip_prefix("labels.") {
            Some(label) if !label.is_empty() => Ok(UpdateField::Label(label.to_string())),
            _ if path == "labels" => Ok(UpdateField::Labels),
            _ => Err(Error::InvalidArgument(format!(
                "cannot update {path:?} field on a snapshot"
            ))),
        })
        .collect()
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let labels = labels(r.labels);
        tracing::debug!(key = %r.key, parent = %r.parent, ?labels, "prepare");
        match (&self.remote, PrepareIntent::of(&labels)) {
            (Some(remote), PrepareIntent::Remote(layer)) => {
                let result = self
                    .prepare_remote(remote, r.key, r.parent, labels, layer)
                    .await?;
                return Ok(Response::new(pb::PrepareSnapshotResponse {
                    mounts: mounts(result),
                }));
            }
            (_, PrepareIntent::LazyWithoutLabels { target }) => {
                tracing::warn!(snapshot = %target, "{LAZY_PULL_OFF_WARNING}");
            }
            _ => {}
        }
        self.serve_chain(&r.parent).await?;
        let result = self
            .run("prepare", move |s| s.prepare(&r.key, &r.parent, &labels))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(result),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, "view");
        self.serve_chain(&r.parent).await?;
        let result = self
            .run("view", move |s| {
                s.view(&r.key, &r.parent, &labels(r.labels))
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(result),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        self.serve_chain(&r.key).await?;
        let result = self.run("mounts", move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: mounts(result),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, name = %r.name, "commit");
        self.run("commit", move |s| {
            s.commit(&r.name, &r.key, &labels(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, "remove");
        self.run("remove", move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = self.run("stat", move |s| s.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(to_pb_info(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let Some(info) = r.info else {
            return Err(Status::invalid_argument("update needs the snapshot's info"));
        };
        let fields = update_fields(r.update_mask).map_err(to_status)?;
        let wanted = Info {
            name: info.name,
            parent: info.parent,
            kind: Kind::Active, // ignored: only labels can change
            created: std::time::SystemTime::UNIX_EPOCH,
            updated: std::time::SystemTime::UNIX_EPOCH,
            labels: labels(info.labels),
        };
        let updated = self
            .run("update", move |s| s.update(&wanted, &fields))
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(to_pb_info(updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let filters = r
            .filters
            .iter()
            .map(|f| Filter::parse(f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_status)?;
        let infos = self.run("list", move |s| s.list(&filters)).await?;
        let mut batches = Vec::new();
        let mut infos = infos.into_iter().map(to_pb_info).peekable();
        while infos.peek().is_some() {
            let info: Vec<pb::Info> = infos.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(pb::ListSnapshotsResponse { info }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let usage = self.run("usage", move |s| s.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: usage.size,
            inodes: usage.inodes,
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let removed = self.run("cleanup", |s| s.cleanup()).await?;
        if !removed.is_empty() {
            tracing::info!(
                count = removed.len(),
                "cleanup removed orphaned snapshot directories"
            );
        }
        Ok(Response::new(()))
    }
}
