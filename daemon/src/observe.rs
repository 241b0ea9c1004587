//! What the daemon tells about itself: Prometheus metrics and a status report of the
//! lazily mounted layers and of the images they belong to, served over HTTP on the
//! root's status socket (always) and on the configured metrics address (when asked).
//! The status socket also takes one request that acts: `POST /fetch?image=REF`
//! (`lazysnap fetch`), which makes an image's lazily mounted layers wholly local now
//! and answers when done; the metrics address never does.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use snapshotter::Snapshotter;
use snapshotter::fuse_mounter::{FetchImageError, FuseMounter, MountedLayerStatus};
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
    /// Its verified metadata (footer, TOC) is kept under ROOT/tocs: a restart restores
    /// it without the registry.
    #[serde(default)]
    pub metadata_stored: bool,
    /// A native copy of the layer is made (`[lazy] native_copies`): containers created
    /// now read it through overlayfs alone.
    #[serde(default)]
    pub native_copy: bool,
    /// How the layer is read lazily: `eStargz`, `zstd:chunked` or `SOCI` (a layer
    /// pulled in full is an ordinary snapshot, not listed).
    #[serde(default)]
    pub format: String,
}

/// One image's lazily mounted layers together (those mounted under its reference, and
/// those its layer labels list that are mounted under another image's name): how much
/// is local, and whether it can run without its registry. containerd's labels list a
/// layer and the layers above it, so a base layer shared with an image pulled earlier
/// counts under that image only.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct ImageStatus {
    pub image: String,
    /// Digests of its lazily mounted layers.
    pub layers: Vec<String>,
    /// Decompressed bytes of those layers held locally, and in all.
    pub local_bytes: u64,
    pub total_bytes: u64,
    /// Of its layers, how many are wholly local, and how many have their metadata kept.
    pub local_layers: usize,
    pub metadata_stored_layers: usize,
    /// Every layer wholly local and its metadata kept: containers of the image start,
    /// even after a restart or a reboot, with the registry unreachable.
    pub offline_ready: bool,
}

impl ImageStatus {
    pub fn percent_local(&self) -> f64 {
        percent(self.local_bytes, self.total_bytes)
    }
}

/// `part` of `whole` in percent; 100 of nothing.
pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// The answer to `POST /fetch?image=REF`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct FetchAnswer {
    pub image: String,
    /// Its lazily mounted layers (digests).
    #[serde(default)]
    pub layers: Vec<String>,
    /// Distinct chunks fetched, and their decompressed bytes.
    #[serde(default)]
    pub chunks: u64,
    #[serde(default)]
    pub bytes: u64,
    /// Why it failed: the whole request, or...
    #[serde(default)]
    pub error: Option<String>,
    /// ...each layer that failed, with its error.
    #[serde(default)]
    pub failed_layers: Vec<(String, String)>,
}

/// The files one mounted layer has had read by containers, in first-read order (`GET /accessed`).
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
    /// The layers by image.
    #[serde(default)]
    pub images: Vec<ImageStatus>,
}

/// What the status tells of one mounted layer.
fn layer_status(l: &MountedLayerStatus) -> LayerStatus {
    LayerStatus {
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
        metadata_stored: l.metadata_stored,
        native_copy: l.native_copy,
        format: l.format.to_string(),
    }
}

/// Groups `layers` (the status of `mounted`, in the same order) by image.
fn images_of(mounted: &[MountedLayerStatus], layers: &[LayerStatus]) -> Vec<ImageStatus> {
    let groups = snapshotter::fuse_mounter::layers_by_image(mounted.iter().map(|m| {
        (
            m.image_ref.as_str(),
            m.layer_digest.as_str(),
            m.image_layers.as_slice(),
        )
    }));
    groups
        .into_iter()
        .map(|(image, members)| {
            let members: Vec<&LayerStatus> =
                members.iter().filter_map(|&i| layers.get(i)).collect();
            let local_layers = members
                .iter()
                .filter(|l| l.local_bytes >= l.total_bytes)
                .count();
            let metadata_stored_layers = members.iter().filter(|l| l.metadata_stored).count();
            ImageStatus {
                image,
                layers: members.iter().map(|l| l.layer.clone()).collect(),
                local_bytes: members.iter().map(|l| l.local_bytes).sum(),
                total_bytes: members.iter().map(|l| l.total_bytes).sum(),
                offline_ready: !members.is_empty()
                    && local_layers == members.len()
                    && metadata_stored_layers == members.len(),
                local_layers,
                metadata_stored_layers,
            }
        })
        .collect()
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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

    /// By layer digest, the digests of the mounted layers below it in its snapshot
    /// chain: an image whose base layer was pulled (and mounted) under another image's
    /// name still counts it.
    fn lower_layers(
        &self,
        mounted: &[MountedLayerStatus],
    ) -> std::collections::HashMap<String, Vec<String>> {
        let digest_at: std::collections::HashMap<&std::path::Path, &str> = mounted
            .iter()
            .map(|m| (m.mountpoint.as_path(), m.layer_digest.as_str()))
            .collect();
        let mut out = std::collections::HashMap::new();
        for snapshot in self.snapshotter.remote_snapshots().unwrap_or_default() {
            let Some(digest) = digest_at.get(snapshot.mountpoint.as_path()) else {
                continue;
            };
            let chain = self
                .snapshotter
                .remote_chain(&snapshot.name)
                .unwrap_or_default();
            let lower: Vec<String> = chain
                .iter()
                .filter(|s| s.mountpoint != snapshot.mountpoint)
                .filter_map(|s| digest_at.get(s.mountpoint.as_path()).map(|d| d.to_string()))
                .collect();
            out.insert(digest.to_string(), lower);
        }
        out
    }

    /// The status given the mounted layers' (so metrics take the layers' stats once).
    fn status_of(&self, mounted: &[MountedLayerStatus]) -> Status {
        let mut snapshots = std::collections::BTreeMap::new();
        for info in self.snapshotter.list(&[]).unwrap_or_default() {
            *snapshots.entry(info.kind.as_str().to_string()).or_insert(0) += 1;
        }
        let layers: Vec<LayerStatus> = mounted.iter().map(layer_status).collect();
        let lower = self.lower_layers(mounted);
        let with_chains: Vec<MountedLayerStatus> = mounted
            .iter()
            .map(|m| MountedLayerStatus {
                image_layers: snapshotter::fuse_mounter::with_lower(
                    &m.image_layers,
                    lower.get(&m.layer_digest),
                ),
                ..m.clone()
            })
            .collect();
        let images = images_of(&with_chains, &layers);
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
            images,
        }
    }

    /// Makes `image`'s lazily mounted layers wholly local now (`POST /fetch`): the HTTP
    /// status and the answer.
    pub async fn fetch_image(&self, image: &str) -> (&'static str, FetchAnswer) {
        let mut answer = FetchAnswer {
            image: image.to_string(),
            ..FetchAnswer::default()
        };
        let Some(mounter) = &self.mounter else {
            answer.error = Some("lazy pulling is off in this lazysnapd".into());
            return ("404 Not Found", answer);
        };
        let lower = self.lower_layers(&self.mounted_layers());
        match mounter.fetch_image(image, &lower).await {
            Ok(done) => {
                answer.layers = done.layers;
                answer.chunks = done.chunks;
                answer.bytes = done.bytes;
                ("200 OK", answer)
            }
            Err(e @ FetchImageError::NotMounted) => {
                answer.error = Some(e.to_string());
                ("404 Not Found", answer)
            }
            Err(e @ FetchImageError::Failed(_)) => {
                answer.error = Some(format!("fetching failed: {e}"));
                if let FetchImageError::Failed(layers) = e {
                    answer.failed_layers = layers;
                }
                ("502 Bad Gateway", answer)
            }
        }
    }

    /// The Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let mounted = self.mounted_layers();
        render_metrics(&self.status_of(&mounted), &mounted)
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

/// The Prometheus text exposition format of `status` (`mounted`: its layers' stats, for
/// the FUSE latency histograms).
fn render_metrics(status: &Status, mounted: &[MountedLayerStatus]) -> String {
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
    let per_layer: [(&str, &str, &str, Field); 12] = [
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
        (
            "lazysnap_layer_metadata_stored",
            "gauge",
            "1 when the layer's verified metadata is kept in ROOT/tocs (restores need no registry).",
            |l| u64::from(l.metadata_stored),
        ),
        (
            "lazysnap_layer_native_copy",
            "gauge",
            "1 when a native copy of the layer is made: new containers read it, not FUSE.",
            |l| u64::from(l.native_copy),
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
    type ImageField = fn(&ImageStatus) -> u64;
    let per_image: [(&str, &str, ImageField); 3] = [
        (
            "lazysnap_image_local_bytes",
            "Decompressed bytes of the image's lazily mounted layers held locally.",
            |i| i.local_bytes,
        ),
        (
            "lazysnap_image_total_bytes",
            "Decompressed bytes of the image's lazily mounted layers.",
            |i| i.total_bytes,
        ),
        (
            "lazysnap_image_offline_ready",
            "1 when every lazily mounted layer of the image is local and its metadata kept: it runs, and restarts, without the registry.",
            |i| u64::from(i.offline_ready),
        ),
    ];
    for (name, help, field) in per_image {
        metric(
            name,
            "gauge",
            help,
            status
                .images
                .iter()
                .map(|i| (format!("{{image=\"{}\"}}", label_value(&i.image)), field(i)))
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

/// Answers one HTTP/1 request (GET only: the metrics address) and closes the connection.
pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(stream: S, observer: &Observer) {
    answer(stream, observer, false).await
}

/// Answers one HTTP/1 request on the status socket: GET, and `POST /fetch?image=REF`,
/// answered once the image is local (or the fetch failed).
pub async fn handle_control<S: AsyncRead + AsyncWrite + Unpin>(stream: S, observer: &Observer) {
    answer(stream, observer, true).await
}

/// The image a `/fetch?image=REF` names (percent-decoded), if any.
fn fetch_target(path: &str) -> Option<Result<String, &'static str>> {
    let query = path.strip_prefix("/fetch")?;
    let query = match query.strip_prefix('?') {
        Some(q) => q,
        None if query.is_empty() => "",
        None => return None,
    };
    let value = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("image="))
        .filter(|v| !v.is_empty());
    Some(
        value
            .ok_or("name the image: POST /fetch?image=REF")
            .and_then(|v| percent_decode(v).ok_or("malformed percent-encoding in the image")),
    )
}

/// `%XX` decoded; None when malformed or not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Everything but letters, digits and `-._~/:@` as `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:@".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(stream: S, observer: &Observer, control: bool) {
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
        (Some("POST"), Some(path)) if control => match fetch_target(path) {
            Some(Ok(image)) => {
                let (status, answer) = observer.fetch_image(&image).await;
                let body = serde_json::to_string(&answer).unwrap_or_default();
                (status, "application/json", body)
            }
            Some(Err(why)) => {
                let answer = FetchAnswer {
                    error: Some(why.to_string()),
                    ..FetchAnswer::default()
                };
                let body = serde_json::to_string(&answer).unwrap_or_default();
                ("400 Bad Request", "application/json", body)
            }
            None => (
                "404 Not Found",
                "text/plain",
                "POST /fetch?image=REF only\n".into(),
            ),
        },
        _ if control => (
            "405 Method Not Allowed",
            "text/plain",
            "GET, or POST /fetch?image=REF\n".into(),
        ),
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
        tokio::spawn(async move { handle_control(stream, &observer).await });
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

/// Asks the daemon at `root` to make `image` wholly local now (`lazysnap fetch`), and
/// waits until it has (or failed). Err: the daemon could not be asked or answered
/// nonsense; a refusal or a failed fetch is an answer with `error` set.
pub async fn request_fetch(root: &Path, image: &str) -> anyhow::Result<FetchAnswer> {
    let what = format!("/fetch?image={}", percent_encode(image));
    let (_, body) = request(root, "POST", &what).await?;
    serde_json::from_str(&body).map_err(|e| {
        anyhow::anyhow!("lazysnapd's answer to POST {what} is not understood ({e}): {body}")
    })
}

/// GETs `what` from the status socket under `root`; returns the body.
async fn get(root: &Path, what: &str) -> anyhow::Result<String> {
    let (status, body) = request(root, "GET", what).await?;
    if status != 200 {
        anyhow::bail!("lazysnapd answered {status} to GET {what}: {}", body.trim());
    }
    Ok(body)
}

/// One request to the status socket under `root`: the status code and the body.
async fn request(root: &Path, method: &str, what: &str) -> anyhow::Result<(u16, String)> {
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
        .write_all(
            format!("{method} {what} HTTP/1.1\r\nHost: lazysnapd\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let malformed = || anyhow::anyhow!("malformed answer from {}", path.display());
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(malformed)?;
    Ok((status, body.to_string()))
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

    fn mounted(
        image: &str,
        digest: &str,
        listed: &[&str],
        local: u64,
        total: u64,
        kept: bool,
    ) -> MountedLayerStatus {
        MountedLayerStatus {
            mountpoint: format!("/root/snapshots/{digest}/fs").into(),
            layer_digest: digest.into(),
            image_ref: image.into(),
            image_layers: listed.iter().map(|s| s.to_string()).collect(),
            metadata_stored: kept,
            native_copy: local == total,
            format: "eStargz",
            stats: fusefs::Stats {
                local_bytes: local,
                total_bytes: total,
                ..fusefs::Stats::default()
            },
        }
    }

    fn status_with(mounted: &[MountedLayerStatus]) -> Status {
        let layers: Vec<LayerStatus> = mounted.iter().map(layer_status).collect();
        Status {
            lazy_pulling: true,
            snapshots: Default::default(),
            cache_memory_bytes: 0,
            cache_disk_bytes: 0,
            preopened_mounts: 0,
            cache_write_errors: 0,
            cache_no_space_errors: 0,
            cache_writes_skipped_full: 0,
            cache_evicted_for_space: 0,
            cache_swept: 0,
            images: images_of(mounted, &layers),
            layers,
        }
    }

    /// a:1 wholly local with its metadata kept; b:1 shares a:1's base layer and has one
    /// of its own, local but whose metadata is not kept; c:1 is half local.
    fn three_images() -> Vec<MountedLayerStatus> {
        vec![
            mounted(
                "reg/a:1",
                "sha256:base",
                &["sha256:base", "sha256:a"],
                100,
                100,
                true,
            ),
            mounted(
                "reg/a:1",
                "sha256:a",
                &["sha256:base", "sha256:a"],
                50,
                50,
                true,
            ),
            mounted(
                "reg/b:1",
                "sha256:b",
                &["sha256:base", "sha256:b"],
                30,
                30,
                false,
            ),
            mounted("reg/c:1", "sha256:c", &[], 10, 20, true),
        ]
    }

    #[test]
    fn images_group_their_layers_and_tell_whether_they_run_offline() {
        let status = status_with(&three_images());
        let image = |name: &str| {
            status
                .images
                .iter()
                .find(|i| i.image == name)
                .unwrap()
                .clone()
        };
        assert_eq!(status.images.len(), 3);
        assert_eq!(
            image("reg/a:1"),
            ImageStatus {
                image: "reg/a:1".into(),
                layers: vec!["sha256:base".into(), "sha256:a".into()],
                local_bytes: 150,
                total_bytes: 150,
                local_layers: 2,
                metadata_stored_layers: 2,
                offline_ready: true,
            }
        );
        let b = image("reg/b:1");
        assert_eq!(
            b.layers,
            vec!["sha256:b".to_string(), "sha256:base".to_string()]
        );
        assert_eq!((b.local_bytes, b.total_bytes), (130, 130));
        assert_eq!((b.local_layers, b.metadata_stored_layers), (2, 1));
        assert!(!b.offline_ready, "b's own layer has no kept metadata");
        let c = image("reg/c:1");
        assert_eq!((c.local_bytes, c.total_bytes, c.local_layers), (10, 20, 0));
        assert!(!c.offline_ready);
        assert_eq!(c.percent_local(), 50.0);
        assert!(status.layers[0].metadata_stored && !status.layers[2].metadata_stored);

        // Older clients' JSON (no images, no metadata_stored) still reads.
        let mut json = serde_json::to_value(&status).unwrap();
        json.as_object_mut().unwrap().remove("images");
        for l in json["layers"].as_array_mut().unwrap() {
            l.as_object_mut().unwrap().remove("metadata_stored");
        }
        let old: Status = serde_json::from_value(json).unwrap();
        assert!(old.images.is_empty() && !old.layers[0].metadata_stored);
    }

    #[test]
    fn metrics_tell_each_images_local_bytes_and_offline_readiness() {
        let mounted = three_images();
        let out = render_metrics(&status_with(&mounted), &mounted);
        for line in [
            "# TYPE lazysnap_image_local_bytes gauge",
            "lazysnap_image_local_bytes{image=\"reg/a:1\"} 150",
            "lazysnap_image_total_bytes{image=\"reg/a:1\"} 150",
            "lazysnap_image_offline_ready{image=\"reg/a:1\"} 1",
            "lazysnap_image_local_bytes{image=\"reg/b:1\"} 130",
            "lazysnap_image_offline_ready{image=\"reg/b:1\"} 0",
            "lazysnap_image_local_bytes{image=\"reg/c:1\"} 10",
            "lazysnap_image_total_bytes{image=\"reg/c:1\"} 20",
            "lazysnap_image_offline_ready{image=\"reg/c:1\"} 0",
            "# TYPE lazysnap_layer_metadata_stored gauge",
            "lazysnap_layer_metadata_stored{layer=\"sha256:base\",mountpoint=\"/root/snapshots/sha256:base/fs\"} 1",
            "lazysnap_layer_metadata_stored{layer=\"sha256:b\",mountpoint=\"/root/snapshots/sha256:b/fs\"} 0",
            "# TYPE lazysnap_layer_native_copy gauge",
            "lazysnap_layer_native_copy{layer=\"sha256:base\",mountpoint=\"/root/snapshots/sha256:base/fs\"} 1",
            "lazysnap_mounted_layers 4",
        ] {
            assert!(
                out.lines().any(|l| l == line),
                "{line} missing from:\n{out}"
            );
        }
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn fetch_requests_name_their_image_percent_encoded() {
        let image = "127.0.0.1:5000/app name@sha256:ab+c";
        let path = format!("/fetch?image={}", percent_encode(image));
        assert_eq!(path, "/fetch?image=127.0.0.1:5000/app%20name@sha256:ab%2Bc");
        assert_eq!(fetch_target(&path), Some(Ok(image.to_string())));
        assert_eq!(
            fetch_target("/fetch?image=reg/a:1"),
            Some(Ok("reg/a:1".to_string()))
        );
        assert!(matches!(fetch_target("/fetch"), Some(Err(_))));
        assert!(matches!(fetch_target("/fetch?image="), Some(Err(_))));
        assert!(matches!(fetch_target("/fetch?image=%zz"), Some(Err(_))));
        assert_eq!(fetch_target("/fetched"), None);
        assert_eq!(fetch_target("/status"), None);
    }

    async fn ask(control: bool, observer: &Observer, request: &str) -> String {
        use tokio::io::AsyncReadExt;
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(request.as_bytes()).await.unwrap();
        if control {
            handle_control(server, observer).await;
        } else {
            handle(server, observer).await;
        }
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn only_the_status_socket_takes_fetch_requests() {
        let dir = tempfile::tempdir().unwrap();
        let observer = Observer {
            snapshotter: Arc::new(Snapshotter::open(dir.path()).unwrap()),
            mounter: None,
            cache: None,
        };
        let post = "POST /fetch?image=reg/a:1 HTTP/1.1\r\nHost: x\r\n\r\n";
        let metrics_address = ask(false, &observer, post).await;
        assert!(
            metrics_address.starts_with("HTTP/1.1 405"),
            "{metrics_address}"
        );
        let socket = ask(true, &observer, post).await;
        assert!(socket.starts_with("HTTP/1.1 404"), "{socket}");
        let (_, body) = socket.split_once("\r\n\r\n").unwrap();
        let answer: FetchAnswer = serde_json::from_str(body).unwrap();
        assert_eq!(answer.image, "reg/a:1");
        assert!(answer.error.unwrap().contains("lazy pulling is off"));
        let bad = ask(true, &observer, "POST /fetch HTTP/1.1\r\n\r\n").await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        let status = ask(true, &observer, "GET /status HTTP/1.1\r\n\r\n").await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
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
