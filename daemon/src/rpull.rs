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
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::types::{Descriptor as PbDescriptor, Mount};
use registry::{
    CredentialProvider, Descriptor, Digest, FetchedManifest, ImageIndex, ImageManifest, Manifest,
    Platform, Reference, RegistryConfig, Target,
};
use tonic::Code;

use crate::containerd::Containerd;
use crate::containerd::client::{Source, status_error, unique_part};
pub use crate::containerd::labels::{
    LABEL_CRI_IMAGE_LAYERS, LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_CRI_MANIFEST_DIGEST,
    LABEL_SNAPSHOT_REF, LABEL_STARGZ_DIGEST, LABEL_STARGZ_LAYERS, LABEL_STARGZ_PREFETCH,
    LABEL_STARGZ_REFERENCE, MAX_LABEL_SIZE, chain_ids, layer_labels,
};
use crate::containerd::labels::{
    LABEL_DISTRIBUTION_SOURCE_PREFIX, LABEL_GC_SNAPSHOT_PREFIX, LABEL_UNCOMPRESSED, child_gc_labels,
};
/// What `ctr-remote rpull` and nerdctl ask to prefetch when a layer has no landmark.
pub const DEFAULT_PREFETCH_SIZE: u64 = 10 << 20;
/// Image configs are small JSON documents; a bigger one is an error, not a download.
const MAX_CONFIG_SIZE: u64 = 16 << 20;
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

    let containerd = Containerd::connect(&opts.address, &opts.namespace, &opts.snapshotter).await?;
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
            annotations: None,
            platform: None,
            other: Default::default(),
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
                    snapshotter: c.snapshotter().to_string(),
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
                        &format!("preparing snapshot {key:?} in {}", c.snapshotter()),
                    ));
                }
            }
        }
        let Some((key, mounts)) = prepared else {
            bail!(
                "{} answered AlreadyExists {PREPARE_TRIES} times but has no snapshot {chain_id}",
                c.snapshotter()
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
        let mut diff = c.diff();
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
                snapshotter: c.snapshotter().to_string(),
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
        let mut images = c.images();
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

    #[test]
    fn diff_ids_must_match_the_layers() {
        let d = digest("x").to_string();
        let config = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{d}"]}}}}"#);
        assert_eq!(diff_ids(config.as_bytes(), 1).unwrap(), vec![digest("x")]);
        assert!(diff_ids(config.as_bytes(), 2).is_err());
        assert!(diff_ids(br#"{"rootfs":{"diff_ids":["nope"]}}"#, 1).is_err());
    }
}
