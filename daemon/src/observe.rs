//! What the daemon tells about itself: Prometheus metrics and a status report of the
//! lazily mounted layers, served over HTTP on the root's status socket (always) and on
//! the configured metrics address (when asked).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use snapshotter::Snapshotter;
use snapshotter::lazy::FuseMounter;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// File name of the status socket inside the daemon's root.
pub const STATUS_SOCKET: &str = "status.sock";

pub struct Observer {
    pub snapshotter: Arc<Snapshotter>,
    pub mounter: Option<Arc<FuseMounter>>,
    pub cache: Option<fusefs::SharedCache>,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct LayerStatus {
    pub mountpoint: String,
    pub layer: String,
    pub image: String,
    pub local_bytes: u64,
    pub total_bytes: u64,
    pub fetched_bytes: u64,
    pub range_requests: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub verification_failures: u64,
    pub fetch_errors: u64,
    pub prefetch_done: bool,
    pub background_done: bool,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Status {
    pub lazy_pulling: bool,
    pub snapshots: std::collections::BTreeMap<String, u64>,
    pub cache_memory_bytes: u64,
    pub cache_disk_bytes: u64,
    pub layers: Vec<LayerStatus>,
}

impl Observer {
    pub fn status(&self) -> Status {
        let mut snapshots = std::collections::BTreeMap::new();
        for info in self.snapshotter.list(&[]).unwrap_or_default() {
            *snapshots.entry(info.kind.as_str().to_string()).or_insert(0) += 1;
        }
        let layers = self
            .mounter
            .iter()
            .flat_map(|m| m.status())
            .map(|l| LayerStatus {
                mountpoint: l.mountpoint.display().to_string(),
                layer: l.layer_digest,
                image: l.image_ref,
                local_bytes: l.stats.local_bytes,
                total_bytes: l.stats.total_bytes,
                fetched_bytes: l.stats.bytes_fetched,
                range_requests: l.stats.range_requests,
                cache_hits: l.stats.cache_hits,
                cache_misses: l.stats.cache_misses,
                verification_failures: l.stats.verification_failures,
                fetch_errors: l.stats.fetch_errors,
                prefetch_done: l.stats.prefetch_done,
                background_done: l.stats.background_done,
            })
            .collect();
        Status {
            lazy_pulling: self.mounter.is_some(),
            snapshots,
            cache_memory_bytes: self.cache.as_ref().map_or(0, |c| c.memory_bytes_used()),
            cache_disk_bytes: self.cache.as_ref().map_or(0, |c| c.disk_bytes_used()),
            layers,
        }
    }

    /// The Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let status = self.status();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        metric(
            "lazysnap_mounted_layers",
            "gauge",
            "Layers served lazily over FUSE.",
            vec![(String::new(), status.layers.len() as u64)],
        );
        metric(
            "lazysnap_snapshots",
            "gauge",
            "Snapshots by kind.",
            status
                .snapshots
                .iter()
                .map(|(kind, n)| (format!("{{kind=\"{kind}\"}}"), *n))
                .collect(),
        );
        metric(
            "lazysnap_cache_bytes",
            "gauge",
            "Verified chunk bytes held by the shared cache.",
            vec![
                ("{tier=\"memory\"}".into(), status.cache_memory_bytes),
                ("{tier=\"disk\"}".into(), status.cache_disk_bytes),
            ],
        );
        type Field = fn(&LayerStatus) -> u64;
        let per_layer: [(&str, &str, &str, Field); 10] = [
            (
                "lazysnap_fetched_bytes_total",
                "counter",
                "Compressed bytes fetched from the registry.",
                |l| l.fetched_bytes,
            ),
            (
                "lazysnap_range_requests_total",
                "counter",
                "Range requests sent to the registry.",
                |l| l.range_requests,
            ),
            (
                "lazysnap_cache_hits_total",
                "counter",
                "Chunk reads served from the cache.",
                |l| l.cache_hits,
            ),
            (
                "lazysnap_cache_misses_total",
                "counter",
                "Chunk reads that had to fetch.",
                |l| l.cache_misses,
            ),
            (
                "lazysnap_verification_failures_total",
                "counter",
                "Chunks that failed digest verification.",
                |l| l.verification_failures,
            ),
            (
                "lazysnap_fetch_errors_total",
                "counter",
                "Range requests that failed.",
                |l| l.fetch_errors,
            ),
            (
                "lazysnap_layer_local_bytes",
                "gauge",
                "Decompressed bytes of the layer held locally.",
                |l| l.local_bytes,
            ),
            (
                "lazysnap_layer_bytes",
                "gauge",
                "Decompressed bytes of the layer.",
                |l| l.total_bytes,
            ),
            (
                "lazysnap_prefetch_done",
                "gauge",
                "1 when the prioritized files have been fetched.",
                |l| u64::from(l.prefetch_done),
            ),
            (
                "lazysnap_background_fetch_done",
                "gauge",
                "1 when the whole layer is local.",
                |l| u64::from(l.background_done),
            ),
        ];
        for (name, kind, help, field) in per_layer {
            metric(
                name,
                kind,
                help,
                status
                    .layers
                    .iter()
                    .map(|l| {
                        (
                            format!("{{layer=\"{}\",mountpoint=\"{}\"}}", l.layer, l.mountpoint),
                            field(l),
                        )
                    })
                    .collect(),
            );
        }
        out
    }

    fn respond(&self, path: &str) -> (&'static str, &'static str, String) {
        match path {
            "/metrics" => ("200 OK", "text/plain; version=0.0.4", self.prometheus()),
            "/status" => (
                "200 OK",
                "application/json",
                serde_json::to_string_pretty(&self.status()).unwrap_or_default(),
            ),
            _ => (
                "404 Not Found",
                "text/plain",
                "try /metrics or /status\n".into(),
            ),
        }
    }
}

/// Answers one HTTP/1 request (GET only) and closes the connection.
pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(stream: S, observer: &Observer) {
    let mut reader = BufReader::new(stream);
    let mut request = String::new();
    if reader.read_line(&mut request).await.is_err() {
        return;
    }
    // Skip the headers; a bounded number of them.
    let mut line = String::new();
    for _ in 0..100 {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(n) if n > 2 => {}
            _ => break,
        }
    }
    let mut parts = request.split_whitespace();
    let (status, kind, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => observer.respond(path),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut stream = reader.into_inner();
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Binds the status socket under `root` (the root is private to root, and so is it).
pub fn bind_status(root: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let path = root.join(STATUS_SOCKET);
    let _ = std::fs::remove_file(&path);
    tokio::net::UnixListener::bind(&path)
}

/// Serves the status socket until the task is dropped.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    observer: Arc<Observer>,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let observer = observer.clone();
        tokio::spawn(async move { handle(stream, &observer).await });
    }
}

/// Serves metrics and status on a TCP address until the task is dropped.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    observer: Arc<Observer>,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let observer = observer.clone();
        tokio::spawn(async move { handle(stream, &observer).await });
    }
}

/// Reads the status of the daemon whose root is `root` (for `lazysnap status`).
pub async fn fetch_status(root: &Path) -> anyhow::Result<Status> {
    use tokio::io::AsyncReadExt;
    let path = root.join(STATUS_SOCKET);
    let mut stream = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
        anyhow::anyhow!(
            "connecting to {}: {e} (is lazysnapd running with --root {}?)",
            path.display(),
            root.display()
        )
    })?;
    stream
        .write_all(b"GET /status HTTP/1.1\r\nHost: lazysnapd\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .ok_or_else(|| anyhow::anyhow!("malformed answer from {}", path.display()))?;
    Ok(serde_json::from_str(body)?)
}
