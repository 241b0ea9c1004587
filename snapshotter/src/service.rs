//! The `containerd.services.snapshots.v1.Snapshots` gRPC service over a
//! `LazySnapshotter`: requests in, status codes out. The one place where snapshotter
//! errors become gRPC status codes.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::Snapshotter;
use crate::error::Error;
use crate::filter::Filter;
use crate::lazy_snapshotter::{LazySnapshotter, Prepared};
use crate::proto::containerd::types::Mount as PbMount;
use crate::proto::snapshots as pb;
use crate::proto::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use crate::types::{Info, Kind, Labels, Mount, UpdateField};

/// containerd's own services send List results in blocks of this many.
const LIST_BATCH: usize = 100;

#[derive(Clone)]
pub struct SnapshotService {
    lazy: LazySnapshotter,
}

impl SnapshotService {
    pub fn new(lazy: LazySnapshotter) -> Self {
        Self { lazy }
    }

    pub fn into_server(self) -> SnapshotsServer<Self> {
        SnapshotsServer::new(self)
    }

    /// Core work off the async threads, its error as a status.
    async fn run<T, F>(&self, op: &'static str, work: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshotter) -> crate::Result<T> + Send + 'static,
    {
        self.lazy.run(op, work).await.map_err(to_status)
    }
}

pub fn to_status(e: Error) -> Status {
    let message = e.to_string();
    match e {
        Error::NotFound(_) => Status::not_found(message),
        Error::AlreadyExists(_) => Status::already_exists(message),
        Error::FailedPrecondition(_) => Status::failed_precondition(message),
        Error::InvalidArgument(_) => Status::invalid_argument(message),
        Error::Unavailable(_) => Status::unavailable(message),
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
        let prepared = self
            .lazy
            .prepare(r.key, r.parent, labels)
            .await
            .map_err(to_status)?;
        match prepared {
            Prepared::Mounts(result) => Ok(Response::new(pb::PrepareSnapshotResponse {
                mounts: mounts(result),
            })),
            // The remote-snapshot protocol's "done": the layer is there, committed under
            // its target, and containerd is to neither download nor unpack it.
            Prepared::Remote { target } => Err(to_status(Error::AlreadyExists(format!(
                "target snapshot {target:?}"
            )))),
        }
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, "view");
        let result = self
            .lazy
            .view(r.key, r.parent, labels(r.labels))
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(result),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let result = self.lazy.mounts(r.key).await.map_err(to_status)?;
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
        self.lazy.remove(r.key).await.map_err(to_status)?;
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
        let removed = self.lazy.cleanup().await.map_err(to_status)?;
        if !removed.is_empty() {
            tracing::info!(
                count = removed.len(),
                "cleanup removed orphaned snapshot directories"
            );
        }
        Ok(Response::new(()))
    }
}
