//! `lazysnap rpull`: pulls an image through containerd's gRPC API so that a remote
//! snapshotter can mount its layers lazily, as `ctr-remote image rpull` does.
//!
//! containerd 1.6 has no server-side pull (the transfer service came with 2.0), so the
//! client does what containerd's Go client does in `Pull(ctx, ref, WithPullUnpack)`:
//!
//! 1. resolve the manifest (through an index, for the platform) with the registry crate;
//! 2. write the index, manifest and config into containerd's content store, labelled
//!    `containerd.io/gc.ref.content.*` so garbage collection keeps each child of a kept
//!    parent, all under a lease so nothing is collected mid-pull;
//! 3. unpack: for each layer, Prepare `extract-<unique> <chainID>` with the remote-snapshot
//!    labels. AlreadyExists means the snapshotter mounted the layer itself (lazily);
//!    otherwise the layer is downloaded into the content store, applied with the diff
//!    service and committed under its chain ID;
//! 4. label the config `containerd.io/gc.ref.snapshot.<snapshotter>` = top chain ID (GC
//!    keeps the snapshots, `ctr run --snapshotter` finds the image unpacked) and create
//!    or update the image record.
//!
//! The lease is deleted at the end whatever happened: on success the image record keeps
//! everything alive, on failure the garbage collector takes what was half written.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::types::{Descriptor as PbDescriptor, Mount};
use registry::{
    CredentialProvider, Descriptor, Digest, FetchedManifest, ImageIndex, ImageManifest, Manifest,
    Platform, Reference, RegistryConfig, Target,
};
use sha2::Digest as _;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::PollSender;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

// The remote-snapshot labels: one definition, shared with the snapshotter that reads them.
pub use snapshotter::remote::{
    LABEL_CRI_IMAGE_LAYERS, LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_CRI_MANIFEST_DIGEST,
    LABEL_STARGZ_DIGEST, LABEL_STARGZ_LAYERS, LABEL_STARGZ_PREFETCH, LABEL_STARGZ_REFERENCE,
    LABEL_TARGET_REF as LABEL_SNAPSHOT_REF,
};
/// Annotations with this prefix are forwarded to the snapshotter as labels
/// (containerd's `snapshots.FilterInheritedLabels`); the TOC digest is one.
const INHERITED_PREFIX: &str = "containerd.io/snapshot/";

const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
const LABEL_GC_FLAT: &str = "containerd.io/gc.flat";
const LABEL_GC_CONFIG: &str = "containerd.io/gc.ref.content.config";
const LABEL_GC_LAYER_PREFIX: &str = "containerd.io/gc.ref.content.l.";
const LABEL_GC_MANIFEST_PREFIX: &str = "containerd.io/gc.ref.content.m.";
const LABEL_GC_OTHER_PREFIX: &str = "containerd.io/gc.ref.content.";
const LABEL_GC_SNAPSHOT_PREFIX: &str = "containerd.io/gc.ref.snapshot.";
const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
const LABEL_DISTRIBUTION_SOURCE_PREFIX: &str = "containerd.io/distribution.source.";

/// containerd refuses a label whose key and value together exceed this (`labels.Validate`).
pub const MAX_LABEL_SIZE: usize = 4096;
/// What `ctr-remote rpull` and nerdctl ask to prefetch when a layer has no landmark.
pub const DEFAULT_PREFETCH_SIZE: u64 = 10 << 20;
/// Image configs are small JSON documents; a bigger one is an error, not a download.
const MAX_CONFIG_SIZE: u64 = 16 << 20;
/// Bytes per content Write message (containerd's Go client copies in 1 MiB buffers too).
const WRITE_CHUNK: usize = 1 << 20;
/// A crashed rpull's lease still lets GC collect its leftovers eventually.
const LEASE_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);
/// containerd's unpacker tries Prepare this many times when AlreadyExists races a Remove.
const PREPARE_TRIES: usize = 3;

/// How and where to pull.
#[derive(Clone)]
pub struct RpullOptions {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    pub namespace: String,
    /// The snapshotter to unpack into (a proxy plugin's name, or `overlayfs`).
    pub snapshotter: String,
    /// Talk plain HTTP to the image's registry (loopback registries are plain by default).
    pub plain_http: bool,
    /// `os/arch[/variant]` picked from an index; default: this machine's.
    pub platform: Option<String>,
    pub registry: RegistryConfig,
    /// Registry credentials; `None` reads docker's config.json (`$DOCKER_CONFIG`, `~/.docker`).
    pub credentials: Option<Arc<dyn CredentialProvider>>,
    /// `containerd.io/snapshot/remote/stargz.prefetch`: bytes to prefetch without a landmark.
    pub prefetch_size: u64,
}

impl Default for RpullOptions {
    fn default() -> Self {
        Self {
            address: PathBuf::from("/run/containerd/containerd.sock"),
            namespace: "default".into(),
            snapshotter: "lazysnap".into(),
            plain_http: false,
            platform: None,
            registry: RegistryConfig::default(),
            credentials: None,
            prefetch_size: DEFAULT_PREFETCH_SIZE,
        }
    }
}

impl std::fmt::Debug for RpullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpullOptions")
            .field("address", &self.address)
            .field("namespace", &self.namespace)
            .field("snapshotter", &self.snapshotter)
            .field("plain_http", &self.plain_http)
            .field("platform", &self.platform)
            .field("prefetch_size", &self.prefetch_size)
            .finish_non_exhaustive()
    }
}

/// What happened to one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerOutcome {
    /// The snapshotter mounted it from the registry (Prepare answered AlreadyExists).
    Lazy,
    /// Downloaded into the content store, applied and committed (the fallback).
    Downloaded,
    /// Its chain ID was already a snapshot: nothing to do.
    Present,
}

impl std::fmt::Display for LayerOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LayerOutcome::Lazy => "lazy",
            LayerOutcome::Downloaded => "downloaded",
            LayerOutcome::Present => "present",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerReport {
    /// The (compressed) blob's digest.
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// The snapshot the layer ended up as.
    pub chain_id: String,
    pub outcome: LayerOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpullReport {
    /// The image record's name (the reference, normalised).
    pub image: String,
    /// What the image record points at: the index when the reference named one.
    pub target_digest: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub snapshotter: String,
    /// The chain ID of the top layer: the image's rootfs snapshot.
    pub chain_id: String,
    /// Bottom layer first.
    pub layers: Vec<LayerReport>,
}

/// Pulls `reference` into containerd and unpacks it into `opts.snapshotter`, letting the
/// snapshotter mount layers lazily where it can.
pub async fn rpull(reference: &str, opts: &RpullOptions) -> anyhow::Result<RpullReport> {
    let reference: Reference = reference.parse()?;
    let name = reference.to_string();
    let platform = match &opts.platform {
        Some(p) => Platform::parse(p).map_err(anyhow::Error::msg)?,
        None => Platform::host(),
    };
    let client = registry_client(&reference, opts, &platform)?;

    let image = resolve(&client, &reference, &platform)
        .await
        .with_context(|| format!("resolving {name}"))?;
    let config = fetch_config(&client, &reference, &image.manifest.config)
        .await
        .with_context(|| format!("fetching the config of {name}"))?;
    let diff_ids = diff_ids(&config, image.manifest.layers.len())
        .with_context(|| format!("reading the config of {name}"))?;
    let chain_ids = chain_ids(&diff_ids);

    let containerd = Containerd::connect(opts).await?;
    let lease = containerd.create_lease().await?;
    let containerd = containerd.with_lease(&lease);
    let pulled = Pull {
        client: &client,
        reference: &reference,
        name: &name,
        opts,
        image: &image,
        config,
        diff_ids: &diff_ids,
        chain_ids: &chain_ids,
        containerd: &containerd,
    }
    .run()
    .await;
    // Always dropped: the image record now holds what succeeded; a failure leaves only
    // unreferenced objects, which GC removes once the lease is gone.
    if let Err(e) = containerd.delete_lease(&lease).await {
        tracing::warn!(lease, error = %e, "could not delete the pull's lease; it expires on its own");
    }
    pulled
}

fn registry_client(
    reference: &Reference,
    opts: &RpullOptions,
    platform: &Platform,
) -> anyhow::Result<registry::Client> {
    let mut config = opts.registry.clone();
    if opts.plain_http {
        config
            .resolver
            .host
            .entry(reference.repository.registry.clone())
            .or_default()
            .plain_http = Some(true);
    }
    config.http.platform = Some(platform.to_string());
    let credentials: Arc<dyn CredentialProvider> = match &opts.credentials {
        Some(c) => c.clone(),
        None => Arc::new(
            registry::DockerConfig::load_default().context("loading registry credentials")?,
        ),
    };
    Ok(registry::Client::new(config)
        .context("registry configuration")?
        .with_credentials(credentials))
}

/// A manifest resolved for one platform, with the exact bytes of everything fetched.
struct Resolved {
    manifest_blob: FetchedManifest,
    manifest_media_type: String,
    manifest: ImageManifest,
    /// The index the reference named, if it named one.
    index: Option<(FetchedManifest, String, ImageIndex)>,
}

impl Resolved {
    /// What the image record points at.
    fn target(&self) -> PbDescriptor {
        match &self.index {
            Some((blob, media_type, _)) => descriptor_of(blob, media_type),
            None => descriptor_of(&self.manifest_blob, &self.manifest_media_type),
        }
    }
}

fn descriptor_of(blob: &FetchedManifest, media_type: &str) -> PbDescriptor {
    PbDescriptor {
        media_type: media_type.to_string(),
        digest: blob.digest.to_string(),
        size: blob.bytes.len() as i64,
        annotations: HashMap::new(),
    }
}

/// The media type a fetched manifest really has: the header's, else the document's own.
fn media_type_of(fetched: &FetchedManifest, parsed: &Manifest) -> String {
    let known = [
        registry::OCI_MANIFEST,
        registry::OCI_INDEX,
        registry::DOCKER_MANIFEST,
        registry::DOCKER_MANIFEST_LIST,
    ];
    if known.contains(&fetched.media_type.as_str()) {
        return fetched.media_type.clone();
    }
    match parsed {
        Manifest::Image(m) => m
            .media_type
            .clone()
            .unwrap_or_else(|| registry::OCI_MANIFEST.into()),
        Manifest::Index(i) => i
            .media_type
            .clone()
            .unwrap_or_else(|| registry::OCI_INDEX.into()),
    }
}

/// Follows an index once, like [`registry::Client::resolve_for`], but keeps the index's
/// bytes: they go into the content store and must hash to the digest the record names.
async fn resolve(
    client: &registry::Client,
    reference: &Reference,
    platform: &Platform,
) -> anyhow::Result<Resolved> {
    let repo = &reference.repository;
    let object = reference.object();
    let top = client.fetch_manifest(repo, &object).await?;
    let target = Target::new(repo.api_host(), &repo.name, &object);
    let parsed = top.parse(&target)?;
    let media_type = media_type_of(&top, &parsed);
    match parsed {
        Manifest::Image(manifest) => Ok(Resolved {
            manifest_blob: top,
            manifest_media_type: media_type,
            manifest: *manifest,
            index: None,
        }),
        Manifest::Index(index) => {
            let chosen = registry::choose_platform(&index, platform).ok_or_else(|| {
                let available: Vec<String> = index
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
                    .collect();
                anyhow::anyhow!(
                    "{target}: no manifest for platform {platform} (available: {})",
                    available.join(", ")
                )
            })?;
            let child = client
                .fetch_manifest(repo, &chosen.digest.to_string())
                .await?;
            let child_target = Target::new(repo.api_host(), &repo.name, &chosen.digest);
            let child_parsed = child.parse(&child_target)?;
            let child_media_type = media_type_of(&child, &child_parsed);
            let Manifest::Image(manifest) = child_parsed else {
                bail!("{child_target}: an index inside an index");
            };
            Ok(Resolved {
                manifest_blob: child,
                manifest_media_type: child_media_type,
                manifest: *manifest,
                index: Some((top, media_type, index)),
            })
        }
    }
}

async fn fetch_config(
    client: &registry::Client,
    reference: &Reference,
    desc: &Descriptor,
) -> anyhow::Result<Bytes> {
    if desc.size > MAX_CONFIG_SIZE {
        bail!(
            "config {} is {} bytes, more than the {MAX_CONFIG_SIZE} allowed",
            desc.digest,
            desc.size
        );
    }
    let bytes = client
        .fetch_blob(&reference.repository, &desc.digest, desc.size)
        .await?;
    if bytes.len() as u64 != desc.size {
        bail!(
            "config {} is {} bytes, the manifest says {}",
            desc.digest,
            bytes.len(),
            desc.size
        );
    }
    Ok(bytes)
}

/// `rootfs.diff_ids` of an image config: the digests of the uncompressed layers.
fn diff_ids(config: &[u8], layers: usize) -> anyhow::Result<Vec<Digest>> {
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    let config: Config = serde_json::from_slice(config).context("image config JSON")?;
    if config.rootfs.diff_ids.len() != layers {
        bail!(
            "the manifest lists {layers} layers but the config {} diff IDs",
            config.rootfs.diff_ids.len()
        );
    }
    config
        .rootfs
        .diff_ids
        .iter()
        .map(|d| {
            d.parse::<Digest>()
                .with_context(|| format!("diff ID {d:?}"))
        })
        .collect()
}

/// OCI chain IDs: the first layer's is its diff ID, then `sha256("<parent> <diff ID>")`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.to_string(),
            Some(parent) => {
                let hash = sha2::Sha256::digest(format!("{parent} {diff_id}").as_bytes());
                format!("sha256:{}", hex(&hash))
            }
        };
        out.push(next);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `key`'s value: as many of `values`, comma-joined, as containerd's label size limit allows
/// (stargz-snapshotter's `appendWithValidation`).
fn bounded_list<'a>(key: &str, values: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for v in values {
        let extra = v.len() + usize::from(!out.is_empty());
        if key.len() + out.len() + extra > MAX_LABEL_SIZE {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(v);
    }
    out
}

/// The labels of the Prepare (and Commit) of layer `i`: inherited annotations, the chain
/// ID, and the stargz and CRI labels that tell a remote snapshotter where the layer is.
pub fn layer_labels(
    image: &str,
    manifest_digest: &str,
    layers: &[Descriptor],
    i: usize,
    chain_id: &str,
    prefetch_size: u64,
) -> BTreeMap<String, String> {
    let layer = &layers[i];
    let mut labels: BTreeMap<String, String> = layer
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(INHERITED_PREFIX) || k.as_str() == LABEL_SNAPSHOT_REF)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let digest = layer.digest.to_string();
    let following: Vec<String> = layers[i..].iter().map(|l| l.digest.to_string()).collect();
    let mut set = |k: &str, v: String| {
        labels.insert(k.to_string(), v);
    };
    set(LABEL_SNAPSHOT_REF, chain_id.to_string());
    set(LABEL_STARGZ_REFERENCE, image.to_string());
    set(LABEL_STARGZ_DIGEST, digest.clone());
    set(
        LABEL_STARGZ_LAYERS,
        bounded_list(LABEL_STARGZ_LAYERS, following.iter().map(String::as_str)),
    );
    set(LABEL_STARGZ_PREFETCH, prefetch_size.to_string());
    set(LABEL_CRI_IMAGE_REF, image.to_string());
    set(LABEL_CRI_LAYER_DIGEST, digest);
    set(LABEL_CRI_MANIFEST_DIGEST, manifest_digest.to_string());
    set(
        LABEL_CRI_IMAGE_LAYERS,
        bounded_list(LABEL_CRI_IMAGE_LAYERS, following.iter().map(String::as_str)),
    );
    labels
}

/// GC labels of a parent: one `containerd.io/gc.ref.content.*` per child, numbered per
/// key as containerd's `images.SetChildrenMappedLabels` with `ChildGCLabels` does.
fn child_gc_labels(children: &[&Descriptor]) -> BTreeMap<String, String> {
    let mut counters: HashMap<&'static str, usize> = HashMap::new();
    let mut labels = BTreeMap::new();
    for child in children {
        let key = gc_label_key(&child.media_type);
        let key = if key.ends_with('.') {
            let n = counters.entry(key).or_default();
            let numbered = format!("{key}{n}");
            *n += 1;
            numbered
        } else {
            key.to_string()
        };
        labels.insert(key, child.digest.to_string());
    }
    labels
}

fn gc_label_key(media_type: &str) -> &'static str {
    match media_type {
        "application/vnd.oci.image.config.v1+json"
        | "application/vnd.docker.container.image.v1+json" => LABEL_GC_CONFIG,
        registry::OCI_MANIFEST | registry::DOCKER_MANIFEST => LABEL_GC_MANIFEST_PREFIX,
        m if is_layer(m) => LABEL_GC_LAYER_PREFIX,
        _ => LABEL_GC_OTHER_PREFIX,
    }
}

/// containerd's `images.IsLayerType`.
fn is_layer(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.")
}

/// containerd's ingest ref for a blob (`remotes.MakeRefKey`): one writer per blob at a time.
fn ingest_ref(desc: &Descriptor) -> String {
    let kind = match gc_label_key(&desc.media_type) {
        LABEL_GC_CONFIG => "config",
        LABEL_GC_MANIFEST_PREFIX => "manifest",
        LABEL_GC_LAYER_PREFIX => "layer",
        _ if desc.media_type == registry::OCI_INDEX
            || desc.media_type == registry::DOCKER_MANIFEST_LIST =>
        {
            "index"
        }
        _ => "unknown",
    };
    format!("{kind}-{}", desc.digest)
}

/// A unique part for snapshot keys and lease IDs: nanoseconds and a random number, like
/// containerd's `uniquePart` (random enough to avoid clashing with a concurrent pull).
fn unique_part() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS's randomness: a random value without a rand crate.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{nanos}-{:06x}", hasher.finish() & 0xff_ffff)
}

/// `time` as RFC 3339 in UTC (what containerd parses `containerd.io/gc.expire` with).
fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// containerd's gRPC API with the namespace (and the lease, once there is one) attached
/// to every request, as containerd's Go client does through its context.
#[derive(Clone)]
struct Containerd {
    channel: Channel,
    namespace: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    lease: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    snapshotter: String,
}

/// Whether a blob had to be written or containerd had it already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    New,
    Existed,
}

/// Where the bytes of a blob come from.
enum Source<'a> {
    Memory(Bytes),
    Registry {
        client: &'a registry::Client,
        reference: &'a Reference,
    },
}

impl Containerd {
    async fn connect(opts: &RpullOptions) -> anyhow::Result<Self> {
        let namespace = opts
            .namespace
            .parse()
            .map_err(|_| anyhow::anyhow!("namespace {:?} is not valid", opts.namespace))?;
        let channel = containerd_client::connect(&opts.address)
            .await
            .with_context(|| format!("connecting to containerd at {}", opts.address.display()))?;
        Ok(Self {
            channel,
            namespace,
            lease: None,
            snapshotter: opts.snapshotter.clone(),
        })
    }

    fn with_lease(&self, lease: &str) -> Self {
        let mut c = self.clone();
        // Lease IDs are ours (ASCII); a failure here would be a bug, not user input.
        c.lease = lease.parse().ok();
        c
    }

    fn req<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let md = request.metadata_mut();
        md.insert("containerd-namespace", self.namespace.clone());
        if let Some(lease) = &self.lease {
            md.insert("containerd-lease", lease.clone());
        }
        request
    }

    fn content(&self) -> api::content_client::ContentClient<Channel> {
        api::content_client::ContentClient::new(self.channel.clone())
    }

    fn snapshots(&self) -> snap::snapshots_client::SnapshotsClient<Channel> {
        snap::snapshots_client::SnapshotsClient::new(self.channel.clone())
    }

    async fn create_lease(&self) -> anyhow::Result<String> {
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

    async fn delete_lease(&self, id: &str) -> anyhow::Result<()> {
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
    async fn write_blob(&self, desc: &Descriptor, source: Source<'_>) -> anyhow::Result<Written> {
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

    async fn write_blob_inner(
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
    async fn label_blob(
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

    async fn snapshot_exists(&self, key: &str) -> anyhow::Result<bool> {
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

    async fn remove_snapshot(&self, key: &str) {
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

fn status_error(status: Status, doing: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "containerd: {doing}: {} ({:?})",
        status.message(),
        status.code()
    )
}

/// An [`AsyncWrite`] that hands what is written to a channel in chunks of up to
/// [`WRITE_CHUNK`] bytes, with backpressure from the channel's bound.
struct ChannelWriter {
    tx: PollSender<Bytes>,
    buf: BytesMut,
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<Bytes>) -> Self {
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

/// One pull, under a lease.
struct Pull<'a> {
    client: &'a registry::Client,
    reference: &'a Reference,
    name: &'a str,
    opts: &'a RpullOptions,
    image: &'a Resolved,
    config: Bytes,
    diff_ids: &'a [Digest],
    chain_ids: &'a [String],
    containerd: &'a Containerd,
}

impl Pull<'_> {
    async fn run(self) -> anyhow::Result<RpullReport> {
        let c = self.containerd;
        let manifest = &self.image.manifest;
        let source_label = || {
            BTreeMap::from([(
                format!(
                    "{LABEL_DISTRIBUTION_SOURCE_PREFIX}{}",
                    self.reference.repository.registry
                ),
                self.reference.repository.name.clone(),
            )])
        };

        // Children before parents, as containerd's fetch handlers do.
        c.write_blob(&manifest.config, Source::Memory(self.config.clone()))
            .await?;
        c.label_blob(&manifest.config.digest.to_string(), source_label())
            .await?;
        let manifest_desc = Descriptor {
            media_type: self.image.manifest_media_type.clone(),
            digest: self.image.manifest_blob.digest.clone(),
            size: self.image.manifest_blob.bytes.len() as u64,
            urls: None,
            annotations: None,
            platform: None,
            artifact_type: None,
        };
        c.write_blob(
            &manifest_desc,
            Source::Memory(self.image.manifest_blob.bytes.clone()),
        )
        .await?;
        let children: Vec<&Descriptor> = std::iter::once(&manifest.config)
            .chain(manifest.layers.iter())
            .collect();
        let mut labels = child_gc_labels(&children);
        labels.extend(source_label());
        c.label_blob(&manifest_desc.digest.to_string(), labels)
            .await?;
        if let Some((blob, media_type, index)) = &self.image.index {
            let desc = Descriptor {
                media_type: media_type.clone(),
                digest: blob.digest.clone(),
                size: blob.bytes.len() as u64,
                ..manifest_desc.clone()
            };
            c.write_blob(&desc, Source::Memory(blob.bytes.clone()))
                .await?;
            let children: Vec<&Descriptor> = index.manifests.iter().collect();
            let mut labels = child_gc_labels(&children);
            labels.extend(source_label());
            c.label_blob(&desc.digest.to_string(), labels).await?;
        }

        let mut layers = Vec::with_capacity(manifest.layers.len());
        for i in 0..manifest.layers.len() {
            let outcome = self
                .unpack_layer(i)
                .await
                .with_context(|| format!("unpacking layer {}", manifest.layers[i].digest))?;
            tracing::info!(layer = %manifest.layers[i].digest, %outcome, "layer unpacked");
            layers.push(LayerReport {
                digest: manifest.layers[i].digest.to_string(),
                media_type: manifest.layers[i].media_type.clone(),
                size: manifest.layers[i].size,
                chain_id: self.chain_ids[i].clone(),
                outcome,
            });
        }
        let top = self
            .chain_ids
            .last()
            .cloned()
            .context("the image has no layers")?;
        c.label_blob(
            &manifest.config.digest.to_string(),
            BTreeMap::from([(
                format!("{LABEL_GC_SNAPSHOT_PREFIX}{}", self.opts.snapshotter),
                top.clone(),
            )]),
        )
        .await?;

        let target = self.image.target();
        self.put_image(&target).await?;
        Ok(RpullReport {
            image: self.name.to_string(),
            target_digest: target.digest,
            manifest_digest: self.image.manifest_blob.digest.to_string(),
            config_digest: manifest.config.digest.to_string(),
            snapshotter: self.opts.snapshotter.clone(),
            chain_id: top,
            layers,
        })
    }

    /// containerd's unpacker, for one layer (`unpacker.go`, 1.6).
    async fn unpack_layer(&self, i: usize) -> anyhow::Result<LayerOutcome> {
        let c = self.containerd;
        let chain_id = &self.chain_ids[i];
        if c.snapshot_exists(chain_id).await? {
            return Ok(LayerOutcome::Present);
        }
        let parent = if i == 0 {
            String::new()
        } else {
            self.chain_ids[i - 1].clone()
        };
        let labels: HashMap<String, String> = layer_labels(
            self.name,
            &self.image.manifest_blob.digest.to_string(),
            &self.image.manifest.layers,
            i,
            chain_id,
            self.opts.prefetch_size,
        )
        .into_iter()
        .collect();

        let mut prepared = None;
        for _ in 0..PREPARE_TRIES {
            let key = format!("extract-{} {chain_id}", unique_part());
            let answer = c
                .snapshots()
                .prepare(c.req(snap::PrepareSnapshotRequest {
                    snapshotter: c.snapshotter.clone(),
                    key: key.clone(),
                    parent: parent.clone(),
                    labels: labels.clone(),
                }))
                .await;
            match answer {
                Ok(r) => {
                    prepared = Some((key, r.into_inner().mounts));
                    break;
                }
                // The remote-snapshot protocol: the snapshotter committed the layer under
                // the chain ID itself. It may also be a concurrent pull that just did.
                Err(s) if s.code() == Code::AlreadyExists => {
                    if c.snapshot_exists(chain_id).await? {
                        return Ok(LayerOutcome::Lazy);
                    }
                    tracing::debug!(key, chain_id, "AlreadyExists, but no snapshot: retrying");
                }
                Err(s) => {
                    return Err(status_error(
                        s,
                        &format!("preparing snapshot {key:?} in {}", c.snapshotter),
                    ));
                }
            }
        }
        let Some((key, mounts)) = prepared else {
            bail!(
                "{} answered AlreadyExists {PREPARE_TRIES} times but has no snapshot {chain_id}",
                c.snapshotter
            );
        };
        match self.fallback(i, &key, mounts, labels).await {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                c.remove_snapshot(&key).await;
                Err(e)
            }
        }
    }

    /// The layer cannot be mounted lazily: download it, apply it onto the prepared
    /// snapshot and commit that under the chain ID.
    async fn fallback(
        &self,
        i: usize,
        key: &str,
        mounts: Vec<Mount>,
        labels: HashMap<String, String>,
    ) -> anyhow::Result<LayerOutcome> {
        let c = self.containerd;
        let layer = &self.image.manifest.layers[i];
        let chain_id = &self.chain_ids[i];
        let diff_id = self.diff_ids[i].to_string();
        c.write_blob(
            layer,
            Source::Registry {
                client: self.client,
                reference: self.reference,
            },
        )
        .await?;
        let mut diff = api::diff_client::DiffClient::new(c.channel.clone());
        let applied = diff
            .apply(
                c.req(api::ApplyRequest {
                    diff: Some(PbDescriptor {
                        media_type: layer.media_type.clone(),
                        digest: layer.digest.to_string(),
                        size: i64::try_from(layer.size).context("layer size")?,
                        annotations: layer
                            .annotations
                            .clone()
                            .unwrap_or_default()
                            .into_iter()
                            .collect(),
                    }),
                    mounts,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|s| status_error(s, "applying the layer"))?
            .into_inner()
            .applied
            .context("containerd's diff service answered without a descriptor")?;
        if applied.digest != diff_id {
            bail!(
                "the layer unpacked to {}, but the config says its diff ID is {diff_id}",
                applied.digest
            );
        }
        let committed = c
            .snapshots()
            .commit(c.req(snap::CommitSnapshotRequest {
                snapshotter: c.snapshotter.clone(),
                name: chain_id.clone(),
                key: key.to_string(),
                labels,
            }))
            .await;
        let outcome = match committed {
            Ok(_) => LayerOutcome::Downloaded,
            // A concurrent pull committed the same chain first; ours is surplus.
            Err(s) if s.code() == Code::AlreadyExists => {
                c.remove_snapshot(key).await;
                LayerOutcome::Present
            }
            Err(s) => return Err(status_error(s, &format!("committing snapshot {chain_id}"))),
        };
        // The uncompressed digest is verified now: record it, as containerd does.
        c.label_blob(
            &layer.digest.to_string(),
            BTreeMap::from([(LABEL_UNCOMPRESSED.to_string(), diff_id)]),
        )
        .await?;
        Ok(outcome)
    }

    /// Creates the image record, or points an existing one at what was pulled.
    async fn put_image(&self, target: &PbDescriptor) -> anyhow::Result<()> {
        let c = self.containerd;
        let mut images = api::images_client::ImagesClient::new(c.channel.clone());
        let image = api::Image {
            name: self.name.to_string(),
            target: Some(target.clone()),
            ..Default::default()
        };
        // Created, else updated; a record removed in between is created again.
        for _ in 0..3 {
            match images
                .create(c.req(api::CreateImageRequest {
                    image: Some(image.clone()),
                    ..Default::default()
                }))
                .await
            {
                Ok(_) => return Ok(()),
                Err(s) if s.code() == Code::AlreadyExists => {}
                Err(s) => return Err(status_error(s, "creating the image record")),
            }
            match images
                .update(c.req(api::UpdateImageRequest {
                    image: Some(image.clone()),
                    ..Default::default()
                }))
                .await
            {
                Ok(_) => return Ok(()),
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(status_error(s, "updating the image record")),
            }
        }
        bail!(
            "the image record {} kept appearing and vanishing",
            self.name
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn digest(s: &str) -> Digest {
        Digest::sha256_of(s.as_bytes())
    }

    fn layer(name: &str, annotations: &[(&str, &str)]) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: digest(name),
            size: 10,
            urls: None,
            annotations: (!annotations.is_empty()).then(|| {
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            platform: None,
            artifact_type: None,
        }
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a: Digest = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
            .parse()
            .unwrap();
        let b: Digest = "sha256:2d3d2ef6d89abf0d6b5d8e6f8f2e44bd4fd1d52d16cb6f4ee1ee37a5cd4c2a3a"
            .parse()
            .unwrap();
        let ids = chain_ids(&[a.clone(), b.clone(), a.clone()]);
        assert_eq!(ids[0], a.to_string());
        // The separator is one space and the digests keep their algorithm prefix.
        let expected = sha2::Sha256::digest(format!("{a} {b}").as_bytes());
        assert_eq!(ids[1], format!("sha256:{}", hex(&expected)));
        let expected = sha2::Sha256::digest(format!("{} {a}", ids[1]).as_bytes());
        assert_eq!(ids[2], format!("sha256:{}", hex(&expected)));
        assert_eq!(chain_ids(&[]), Vec::<String>::new());
    }

    #[test]
    fn layer_labels_carry_the_remote_snapshot_protocol() {
        let layers = vec![
            layer(
                "a",
                &[
                    ("containerd.io/snapshot/stargz/toc.digest", "sha256:toc"),
                    ("org.opencontainers.image.title", "not forwarded"),
                ],
            ),
            layer("b", &[]),
            layer("c", &[]),
        ];
        let labels = layer_labels("r.io/x:1", "sha256:m", &layers, 1, "sha256:chain", 42);
        assert_eq!(labels[LABEL_SNAPSHOT_REF], "sha256:chain");
        assert_eq!(labels[LABEL_STARGZ_REFERENCE], "r.io/x:1");
        assert_eq!(labels[LABEL_CRI_IMAGE_REF], "r.io/x:1");
        assert_eq!(labels[LABEL_STARGZ_DIGEST], layers[1].digest.to_string());
        assert_eq!(labels[LABEL_CRI_LAYER_DIGEST], layers[1].digest.to_string());
        assert_eq!(labels[LABEL_CRI_MANIFEST_DIGEST], "sha256:m");
        let following = format!("{},{}", layers[1].digest, layers[2].digest);
        assert_eq!(labels[LABEL_STARGZ_LAYERS], following);
        assert_eq!(labels[LABEL_CRI_IMAGE_LAYERS], following);
        assert_eq!(labels[LABEL_STARGZ_PREFETCH], "42");
        assert!(!labels.contains_key("containerd.io/snapshot/stargz/toc.digest"));

        let first = layer_labels("r.io/x:1", "sha256:m", &layers, 0, "sha256:c0", 42);
        assert_eq!(
            first["containerd.io/snapshot/stargz/toc.digest"], "sha256:toc",
            "annotations under containerd.io/snapshot/ are forwarded"
        );
        assert!(!first.contains_key("org.opencontainers.image.title"));
    }

    #[test]
    fn layer_lists_stay_under_containerds_label_limit() {
        let layers: Vec<Descriptor> = (0..200).map(|i| layer(&i.to_string(), &[])).collect();
        let labels = layer_labels("r.io/x:1", "sha256:m", &layers, 0, "sha256:c", 1);
        for key in [LABEL_STARGZ_LAYERS, LABEL_CRI_IMAGE_LAYERS] {
            let value = &labels[key];
            assert!(key.len() + value.len() <= MAX_LABEL_SIZE, "{key}");
            let listed: Vec<&str> = value.split(',').collect();
            assert!(listed.len() > 10 && listed.len() < 200, "{}", listed.len());
            // Whole digests only, in order, from this layer on.
            for (i, d) in listed.iter().enumerate() {
                assert_eq!(*d, layers[i].digest.to_string());
            }
        }
    }

    #[test]
    fn gc_labels_are_numbered_per_kind() {
        let config = Descriptor {
            media_type: "application/vnd.oci.image.config.v1+json".into(),
            ..layer("config", &[])
        };
        let (a, b) = (layer("a", &[]), layer("b", &[]));
        let labels = child_gc_labels(&[&config, &a, &b]);
        assert_eq!(labels[LABEL_GC_CONFIG], config.digest.to_string());
        assert_eq!(
            labels["containerd.io/gc.ref.content.l.0"],
            a.digest.to_string()
        );
        assert_eq!(
            labels["containerd.io/gc.ref.content.l.1"],
            b.digest.to_string()
        );
        assert_eq!(labels.len(), 3);

        let m = Descriptor {
            media_type: registry::OCI_MANIFEST.into(),
            ..layer("m", &[])
        };
        let labels = child_gc_labels(&[&m, &m]);
        assert!(labels.contains_key("containerd.io/gc.ref.content.m.0"));
        assert!(labels.contains_key("containerd.io/gc.ref.content.m.1"));
    }

    #[test]
    fn diff_ids_must_match_the_layers() {
        let d = digest("x").to_string();
        let config = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{d}"]}}}}"#);
        assert_eq!(diff_ids(config.as_bytes(), 1).unwrap(), vec![digest("x")]);
        assert!(diff_ids(config.as_bytes(), 2).is_err());
        assert!(diff_ids(br#"{"rootfs":{"diff_ids":["nope"]}}"#, 1).is_err());
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T01:01:01Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_735_689_599); // last second of 2024
        assert_eq!(rfc3339(t), "2024-12-31T23:59:59Z");
    }
}
