//! What the daemon tells about itself: Prometheus metrics and a status report of the
//! lazily mounted layers, served over HTTP on the root's status socket (always) and on
//! the configured metrics address (when asked).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use snapshotter::Snapshotter;
use snapshotter::lazy::{FuseMounter, MountedLayerStatus};
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

/// The files one mounted layer has had opened, in first-open order (`GET /accessed`).
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct LayerAccess {
    pub layer: String,
    pub image: String,
    /// In first-open order.
    pub files: Vec<AccessedFile>,
}

/// One file a layer has had opened.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct AccessedFile {
    /// The path in the layer.
    pub path: String,
    /// Microseconds since the Unix epoch of its first open.
    pub first_open_us: u64,
    /// Bytes the kernel read of it (at most its size).
    pub read_bytes: u64,
    pub size: u64,
    /// The byte ranges read, `[start, end)`, merged.
    #[serde(default)]
    pub ranges: Vec<[u64; 2]>,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Status {
    pub lazy_pulling: bool,
    pub snapshots: std::collections::BTreeMap<String, u64>,
    pub cache_memory_bytes: u64,
    pub cache_disk_bytes: u64,
    /// Lazy mounts since start whose TOC was fetched ahead, while a sibling mounted.
    #[serde(default)]
    pub preopened_mounts: u64,
    /// What the disk cache gave up since start: failed writes (and of those, for want
    /// of space), writes skipped at the fill limit, entries evicted for space, entries
    /// swept because no lazy snapshot used them.
    #[serde(default)]
    pub cache_write_errors: u64,
    #[serde(default)]
    pub cache_no_space_errors: u64,
    #[serde(default)]
    pub cache_writes_skipped_full: u64,
    #[serde(default)]
    pub cache_evicted_for_space: u64,
    #[serde(default)]
    pub cache_swept: u64,
    pub layers: Vec<LayerStatus>,
}

impl Observer {
    pub fn status(&self) -> Status {
        self.status_of(&self.mounted_layers())
    }

    /// Every mounted layer's access log.
    pub fn accessed(&self) -> Vec<LayerAccess> {
        let mut out: Vec<LayerAccess> = self
            .mounter
            .iter()
            .flat_map(|m| m.accessed())
            .map(|a| LayerAccess {
                layer: a.layer_digest,
                image: a.image_ref,
                files: a
                    .files
                    .into_iter()
                    .map(|f| AccessedFile {
                        path: f.path,
                        first_open_us: f.first_open_us,
                        read_bytes: f.read_bytes,
                        size: f.size,
                        ranges: f.ranges.iter().map(|r| [r.start, r.end]).collect(),
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.layer.cmp(&b.layer));
        out
    }

    fn mounted_layers(&self) -> Vec<MountedLayerStatus> {
        self.mounter.iter().flat_map(|m| m.status()).collect()
    }

    /// The status given the mounted layers' (so metrics take the layers' stats once).
    fn status_of(&self, mounted: &[MountedLayerStatus]) -> Status {
        let mut snapshots = std::collections::BTreeMap::new();
        for info in self.snapshotter.list(&[]).unwrap_or_default() {
            *snapshots.entry(info.kind.as_str().to_string()).or_insert(0) += 1;
        }
        let layers = mounted
            .iter()
            .map(|l| LayerStatus {
                mountpoint: l.mountpoint.display().to_string(),
                layer: l.layer_digest.clone(),
                image: l.image_ref.clone(),
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
        let writes = self
            .cache
            .as_ref()
            .map(|c| c.write_stats())
            .unwrap_or_default();
        Status {
            cache_write_errors: writes.write_errors,
            cache_no_space_errors: writes.no_space_errors,
            cache_writes_skipped_full: writes.skipped_full,
            cache_evicted_for_space: writes.evicted_for_space,
            cache_swept: writes.swept,
            lazy_pulling: self.mounter.is_some(),
            snapshots,
            cache_memory_bytes: self.cache.as_ref().map_or(0, |c| c.memory_bytes_used()),
            cache_disk_bytes: self.cache.as_ref().map_or(0, |c| c.disk_bytes_used()),
            preopened_mounts: self.mounter.as_ref().map_or(0, |m| m.preopened_mounts()),
            layers,
        }
    }

    /// The Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let mounted = self.mounted_layers();
        let status = self.status_of(&mounted);
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
        metric(
            "lazysnap_cache_write_errors_total",
            "counter",
            "Chunk cache writes that failed (reads are served all the same), by cause.",
            vec![
                ("{cause=\"no_space\"}".into(), status.cache_no_space_errors),
                (
                    "{cause=\"other\"}".into(),
                    status.cache_write_errors - status.cache_no_space_errors,
                ),
            ],
        );
        metric(
            "lazysnap_cache_writes_skipped_total",
            "counter",
            "Chunk cache writes skipped: the filesystem was at max_disk_fill_percent.",
            vec![(String::new(), status.cache_writes_skipped_full)],
        );
        metric(
            "lazysnap_cache_removed_total",
            "counter",
            "Chunk cache entries removed, by reason.",
            vec![
                ("{reason=\"space\"}".into(), status.cache_evicted_for_space),
                ("{reason=\"unused\"}".into(), status.cache_swept),
            ],
        );
        metric(
            "lazysnap_preopened_mounts_total",
            "counter",
            "Lazy mounts whose TOC was fetched ahead, while a sibling layer mounted.",
            vec![(String::new(), status.preopened_mounts)],
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
        let latency = sum_histograms(mounted.iter().flat_map(|l| &l.stats.op_latency));
        render_histograms(
            &mut out,
            "lazysnap_fuse_operation_duration_seconds",
            "FUSE operations from request to reply, over all mounted layers.",
            &latency,
        );
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
            "/accessed" => (
                "200 OK",
                "application/json",
                serde_json::to_string(&self.accessed()).unwrap_or_default(),
            ),
            _ => (
                "404 Not Found",
                "text/plain",
                "try /metrics, /status or /accessed\n".into(),
            ),
        }
    }
}

/// Sums histograms of the same operation (per-layer labels would multiply the series
/// by the number of layers), keeping the order in which operations first appear.
fn sum_histograms<'a>(
    hists: impl IntoIterator<Item = &'a fusefs::OpHistogram>,
) -> Vec<fusefs::OpHistogram> {
    let mut sums: Vec<fusefs::OpHistogram> = Vec::new();
    for h in hists {
        match sums.iter_mut().find(|s| s.op == h.op) {
            Some(s) => s.merge(h),
            None => sums.push(h.clone()),
        }
    }
    sums
}

/// Writes `hists` as one Prometheus histogram labelled by operation.
fn render_histograms(out: &mut String, name: &str, help: &str, hists: &[fusefs::OpHistogram]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for h in hists {
        let op = h.op;
        for &(le, n) in &h.buckets {
            // Prometheus spells the last bound +Inf; Rust's Display says "inf".
            let le = if le.is_infinite() {
                "+Inf".to_string()
            } else {
                le.to_string()
            };
            let _ = writeln!(out, "{name}_bucket{{op=\"{op}\",le=\"{le}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_sum{{op=\"{op}\"}} {}", h.sum_seconds);
        let _ = writeln!(out, "{name}_count{{op=\"{op}\"}} {}", h.count);
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
    Ok(serde_json::from_str(&get(root, "/status").await?)?)
}

/// Reads the access logs of the layers the daemon at `root` serves (`lazysnap optimize`).
pub async fn fetch_accessed(root: &Path) -> anyhow::Result<Vec<LayerAccess>> {
    Ok(serde_json::from_str(&get(root, "/accessed").await?)?)
}

/// GETs `what` from the status socket under `root`; returns the body.
async fn get(root: &Path, what: &str) -> anyhow::Result<String> {
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
        .write_all(format!("GET {what} HTTP/1.1\r\nHost: lazysnapd\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .ok_or_else(|| anyhow::anyhow!("malformed answer from {}", path.display()))?;
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(op: &'static str, counts: [u64; 3], sum_seconds: f64) -> fusefs::OpHistogram {
        fusefs::OpHistogram {
            op,
            buckets: vec![
                (0.001, counts[0]),
                (0.5, counts[1]),
                (f64::INFINITY, counts[2]),
            ],
            count: counts[2],
            sum_seconds,
        }
    }

    #[test]
    fn histograms_are_summed_over_layers_and_rendered() {
        let layer_a = [
            hist("read", [1, 2, 3], 1.5),
            hist("lookup", [4, 4, 4], 0.002),
        ];
        let layer_b = [hist("read", [0, 1, 1], 0.25)];
        let sums = sum_histograms(layer_a.iter().chain(&layer_b));
        let mut out = String::new();
        render_histograms(&mut out, "x_seconds", "Help.", &sums);
        let expected = "\
# HELP x_seconds Help.
# TYPE x_seconds histogram
x_seconds_bucket{op=\"read\",le=\"0.001\"} 1
x_seconds_bucket{op=\"read\",le=\"0.5\"} 3
x_seconds_bucket{op=\"read\",le=\"+Inf\"} 4
x_seconds_sum{op=\"read\"} 1.75
x_seconds_count{op=\"read\"} 4
x_seconds_bucket{op=\"lookup\",le=\"0.001\"} 4
x_seconds_bucket{op=\"lookup\",le=\"0.5\"} 4
x_seconds_bucket{op=\"lookup\",le=\"+Inf\"} 4
x_seconds_sum{op=\"lookup\"} 0.002
x_seconds_count{op=\"lookup\"} 4
";
        assert_eq!(out, expected);
    }

    #[test]
    fn metrics_without_layers_declare_the_histogram() {
        let dir = tempfile::tempdir().unwrap();
        let observer = Observer {
            snapshotter: Arc::new(Snapshotter::open(dir.path()).unwrap()),
            mounter: None,
            cache: None,
        };
        let out = observer.prometheus();
        assert!(
            out.contains("# TYPE lazysnap_fuse_operation_duration_seconds histogram"),
            "{out}"
        );
        assert!(out.contains("lazysnap_mounted_layers 0"), "{out}");
    }
}
