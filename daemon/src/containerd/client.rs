//! A client of containerd's gRPC API for what lazysnap does itself (rpull, optimize):
//! namespaced requests under a lease, the content store's Write stream, content labels,
//! snapshot Stat and Remove, as containerd's Go client does them.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use registry::{Descriptor, Reference};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::PollSender;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::labels::{LABEL_GC_EXPIRE, LABEL_GC_FLAT, ingest_ref};

/// Bytes per content Write message (containerd's Go client copies in 1 MiB buffers too).
pub const WRITE_CHUNK: usize = 1 << 20;
/// A crashed rpull's lease still lets GC collect its leftovers eventually.
pub const LEASE_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);
/// A unique part for snapshot keys and lease IDs: nanoseconds and a random number, like
/// containerd's `uniquePart` (random enough to avoid clashing with a concurrent pull).
pub fn unique_part() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS's randomness: a random value without a rand crate.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{nanos}-{:06x}", hasher.finish() & 0xff_ffff)
}

/// `time` as RFC 3339 in UTC, whole seconds: what containerd parses
/// `containerd.io/gc.expire` with.
fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// containerd's gRPC API with the namespace (and the lease, once there is one) attached
/// to every request, as containerd's Go client does through its context.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    lease: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    snapshotter: String,
}

/// Whether a blob had to be written or containerd had it already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    New,
    Existed,
}

/// Where the bytes of a blob come from.
pub enum Source<'a> {
    Memory(Bytes),
    Registry {
        client: &'a registry::Client,
        reference: &'a Reference,
    },
}

impl Containerd {
    /// Connects to containerd at `address`; requests go to `namespace`, snapshot calls
    /// to `snapshotter`.
    pub async fn connect(
        address: &Path,
        namespace: &str,
        snapshotter: &str,
    ) -> anyhow::Result<Self> {
        let namespace = namespace
            .parse()
            .map_err(|_| anyhow::anyhow!("namespace {namespace:?} is not valid"))?;
        let channel = containerd_client::connect(address)
            .await
            .with_context(|| format!("connecting to containerd at {}", address.display()))?;
        Ok(Self {
            channel,
            namespace,
            lease: None,
            snapshotter: snapshotter.to_string(),
        })
    }

    pub fn with_lease(&self, lease: &str) -> Self {
        let mut c = self.clone();
        // Lease IDs are ours (ASCII); a failure here would be a bug, not user input.
        c.lease = lease.parse().ok();
        c
    }

    pub fn req<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let md = request.metadata_mut();
        md.insert("containerd-namespace", self.namespace.clone());
        if let Some(lease) = &self.lease {
            md.insert("containerd-lease", lease.clone());
        }
        request
    }

    pub fn content(&self) -> api::content_client::ContentClient<Channel> {
        api::content_client::ContentClient::new(self.channel.clone())
    }

    /// The snapshotter that snapshot calls go to.
    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    pub fn diff(&self) -> api::diff_client::DiffClient<Channel> {
        api::diff_client::DiffClient::new(self.channel.clone())
    }

    pub fn images(&self) -> api::images_client::ImagesClient<Channel> {
        api::images_client::ImagesClient::new(self.channel.clone())
    }

    pub fn snapshots(&self) -> snap::snapshots_client::SnapshotsClient<Channel> {
        snap::snapshots_client::SnapshotsClient::new(self.channel.clone())
    }

    pub async fn create_lease(&self) -> anyhow::Result<String> {
        let id = format!("lazysnap-rpull-{}", unique_part());
        let labels = HashMap::from([
            (
                LABEL_GC_EXPIRE.to_string(),
                rfc3339(SystemTime::now() + LEASE_EXPIRY),
            ),
            // Flat: the lease holds exactly what this pull writes; the gc.ref labels of
            // what it holds are not followed, so it never pins someone else's blobs.
            (LABEL_GC_FLAT.to_string(), rfc3339(SystemTime::now())),
        ]);
        let mut leases = api::leases_client::LeasesClient::new(self.channel.clone());
        leases
            .create(self.req(api::CreateRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(|s| status_error(s, "creating a lease"))?;
        Ok(id)
    }

    pub async fn delete_lease(&self, id: &str) -> anyhow::Result<()> {
        let mut leases = api::leases_client::LeasesClient::new(self.channel.clone());
        leases
            .delete(self.req(api::DeleteRequest {
                id: id.to_string(),
                sync: false,
            }))
            .await
            .map_err(|s| status_error(s, "deleting the lease"))?;
        Ok(())
    }

    /// Writes a blob into the content store (Write stream: stat, write, commit with the
    /// expected digest and size). A blob containerd already has is not sent again.
    pub async fn write_blob(
        &self,
        desc: &Descriptor,
        source: Source<'_>,
    ) -> anyhow::Result<Written> {
        let r#ref = ingest_ref(desc);
        let result = self.write_blob_inner(&r#ref, desc, source).await;
        if result.is_err() {
            // An aborted ingest would otherwise linger until the lease is gone.
            let _ = self
                .content()
                .abort(self.req(api::AbortRequest { r#ref }))
                .await;
        }
        result.with_context(|| format!("writing {} into containerd's content store", desc.digest))
    }

    pub async fn write_blob_inner(
        &self,
        r#ref: &str,
        desc: &Descriptor,
        source: Source<'_>,
    ) -> anyhow::Result<Written> {
        let size = i64::try_from(desc.size).context("blob size")?;
        let expected = desc.digest.to_string();
        let (requests, rx) = mpsc::channel::<api::WriteContentRequest>(4);
        requests
            .send(api::WriteContentRequest {
                action: api::WriteAction::Stat as i32,
                r#ref: r#ref.to_string(),
                total: size,
                expected: expected.clone(),
                ..Default::default()
            })
            .await
            .context("queueing the stat request")?;
        let mut responses = match self
            .content()
            .write(self.req(ReceiverStream::new(rx)))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(Written::Existed),
            Err(s) => return Err(status_error(s, "opening a content writer")),
        };
        match responses.message().await {
            Ok(Some(_)) => {}
            Ok(None) => bail!("containerd closed the content writer at once"),
            // The metadata store checks the expected digest when opening the writer and
            // leases the existing blob for us.
            Err(s) if s.code() == Code::AlreadyExists => return Ok(Written::Existed),
            Err(s) => return Err(status_error(s, "opening a content writer")),
        }

        let (data_tx, mut data_rx) = mpsc::channel::<Bytes>(4);
        let produce = async move {
            match source {
                Source::Memory(bytes) => {
                    let mut offset = 0;
                    while offset < bytes.len() {
                        let end = (offset + WRITE_CHUNK).min(bytes.len());
                        data_tx
                            .send(bytes.slice(offset..end))
                            .await
                            .map_err(|_| anyhow::anyhow!("content writer went away"))?;
                        offset = end;
                    }
                }
                Source::Registry { client, reference } => {
                    let mut sink = ChannelWriter::new(data_tx);
                    client
                        .fetch_blob_to(&reference.repository, &desc.digest, &mut sink)
                        .await?;
                    sink.flush().await?;
                }
            }
            anyhow::Ok(())
        };
        let send = async {
            let forward = async {
                let mut offset: i64 = 0;
                while let Some(data) = data_rx.recv().await {
                    let len = data.len() as i64;
                    requests
                        .send(api::WriteContentRequest {
                            action: api::WriteAction::Write as i32,
                            r#ref: r#ref.to_string(),
                            offset,
                            data: data.to_vec(),
                            ..Default::default()
                        })
                        .await
                        .map_err(|_| anyhow::anyhow!("containerd closed the content writer"))?;
                    offset += len;
                }
                anyhow::Ok(offset)
            };
            let ((), offset) = tokio::try_join!(produce, forward)?;
            if offset != size {
                bail!("got {offset} bytes, expected {size}");
            }
            // Only after the whole blob arrived (and, from a registry, was verified).
            requests
                .send(api::WriteContentRequest {
                    action: api::WriteAction::Commit as i32,
                    r#ref: r#ref.to_string(),
                    total: size,
                    offset,
                    expected: expected.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|_| anyhow::anyhow!("containerd closed the content writer"))?;
            // Closing our side ends the server's receive loop, and so the response stream.
            drop(requests);
            anyhow::Ok(())
        };
        let drain = async {
            let mut last = None;
            loop {
                match responses.message().await {
                    Ok(Some(m)) => last = Some(m),
                    Ok(None) => break,
                    Err(s) if s.code() == Code::AlreadyExists => return Ok(None),
                    Err(s) => return Err(status_error(s, "writing content")),
                }
            }
            anyhow::Ok(last)
        };
        let ((), last) = tokio::try_join!(send, drain)?;
        match last {
            // Someone committed the same blob meanwhile.
            None => Ok(Written::Existed),
            Some(m) if m.action == api::WriteAction::Commit as i32 && m.digest == expected => {
                Ok(Written::New)
            }
            Some(m) => bail!(
                "containerd's content writer ended with {:?} for digest {:?}",
                api::WriteAction::try_from(m.action).ok(),
                m.digest
            ),
        }
    }

    /// Sets (adds or replaces) labels on a blob in the content store.
    pub async fn label_blob(
        &self,
        digest: &str,
        labels: BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.content()
            .update(self.req(api::UpdateRequest {
                info: Some(api::Info {
                    digest: digest.to_string(),
                    labels: labels.into_iter().collect(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(|s| status_error(s, &format!("labelling content {digest}")))?;
        Ok(())
    }

    pub async fn snapshot_exists(&self, key: &str) -> anyhow::Result<bool> {
        match self
            .snapshots()
            .stat(self.req(snap::StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(status_error(
                s,
                &format!("stat of snapshot {key} in {}", self.snapshotter),
            )),
        }
    }

    pub async fn remove_snapshot(&self, key: &str) {
        let removed = self
            .snapshots()
            .remove(self.req(snap::RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
            }))
            .await;
        if let Err(s) = removed {
            tracing::warn!(key, error = %s.message(), "could not remove the extraction snapshot");
        }
    }
}

pub fn status_error(status: Status, doing: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "containerd: {doing}: {} ({:?})",
        status.message(),
        status.code()
    )
}

/// An [`AsyncWrite`] that hands what is written to a channel in chunks of up to
/// [`WRITE_CHUNK`] bytes, with backpressure from the channel's bound.
pub struct ChannelWriter {
    tx: PollSender<Bytes>,
    buf: BytesMut,
}

impl ChannelWriter {
    pub fn new(tx: mpsc::Sender<Bytes>) -> Self {
        Self {
            tx: PollSender::new(tx),
            buf: BytesMut::new(),
        }
    }

    fn poll_send(&mut self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "content writer went away");
        ready!(self.tx.poll_reserve(cx)).map_err(|_| gone())?;
        let chunk = self.buf.split().freeze();
        self.tx.send_item(chunk).map_err(|_| gone())?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ChannelWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() >= WRITE_CHUNK {
            ready!(this.poll_send(cx))?;
        }
        let n = data.len().min(WRITE_CHUNK);
        this.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() {
            ready!(this.poll_send(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}
