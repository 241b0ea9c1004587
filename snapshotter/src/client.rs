//! A client of the snapshots API over a unix socket, for the CLI and for tests.

use std::path::Path;

use crate::proto::snapshots::snapshots_client::SnapshotsClient;
use tonic::transport::{Channel, Endpoint};

pub type Client = SnapshotsClient<Channel>;

/// Connects to a snapshotter serving the snapshots API on `socket`.
pub async fn connect(socket: &Path) -> Result<Client, tonic::transport::Error> {
    let path = socket.to_path_buf();
    // The URI is only a placeholder: the connector below ignores it and dials the socket.
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(SnapshotsClient::new(channel))
}
