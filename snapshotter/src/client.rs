//! A client of the snapshots API over a unix socket, for the CLI and for tests, and the
//! workspace's one connector for gRPC over a unix socket.

use std::future::Future;
use std::path::Path;

use crate::proto::snapshots::snapshots_client::SnapshotsClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub type Client = SnapshotsClient<Channel>;

/// Connects to a snapshotter serving the snapshots API on `socket`.
pub async fn connect(socket: &Path) -> Result<Client, tonic::transport::Error> {
    // The URI is only a placeholder: the connector ignores it and dials the socket.
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(unix_connector(socket))
        .await?;
    Ok(SnapshotsClient::new(channel))
}

/// A connector for tonic's `Endpoint::connect_with_connector(_lazy)` that dials the unix
/// socket `socket` for every connection, whatever the endpoint's (placeholder) URI says.
pub fn unix_connector(
    socket: &Path,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<UnixStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<TokioIo<UnixStream>>> + Send + 'static,
> + Clone
+ Send
+ 'static {
    let path = socket.to_path_buf();
    tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok(TokioIo::new(UnixStream::connect(path).await?)) }
    })
}
