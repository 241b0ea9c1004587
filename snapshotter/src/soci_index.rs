//! Finding the zTOC of an ordinary gzip layer, as soci-snapshotter finds it: the index
//! named by the `soci.index.digest` label, else the one the image manifest's
//! `com.amazon.soci.index-digest` annotation names (SOCI index manifest v2), else the
//! first SOCI v1 index that refers to the image manifest (the referrers API, or its tag
//! schema). Every manifest is checked against its digest; an image's lookup is
//! remembered, so its other layers make no more requests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use estargz::lock;
use registry::{Client, Descriptor, Digest, ImageManifest, Reference};

use crate::layer_source::LayerSource;
use crate::preopen::{LayerKey, Preopener};
use crate::remote::MountError;
use crate::tocstore::{KeptZtoc, ZTOC_PARSE_FACTOR};

pub use soci::index_names::{
    ANNOTATION_INDEX_DIGEST, ANNOTATION_LAYER_DIGEST, SOCI_INDEX_V1, SOCI_INDEX_V2, ZTOC_MEDIA_TYPE,
};
/// zTOCs bigger than this are refused (a 10 GiB layer of small files makes ~1 GiB...
/// of which most is checkpoints; real ones are a few MB).
pub const MAX_ZTOC_SIZE: u64 = 512 << 20;

/// How a SOCI index was found, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoundBy {
    Label,
    ManifestAnnotation,
    Referrers,
}

/// Where one layer's zTOC is, and the layer as the image manifest lists it.
#[derive(Debug, Clone)]
pub struct ZtocRef {
    pub index_digest: Digest,
    pub found_by: FoundBy,
    pub ztoc: Descriptor,
    pub layer: Descriptor,
    /// The layer's prefetch artifact in the index, if it has one.
    pub prefetch: Option<Descriptor>,
}

/// An image's SOCI index, or why it has none.
#[derive(Debug)]
enum Lookup {
    Index {
        digest: Digest,
        found_by: FoundBy,
        index: Box<ImageManifest>,
        image: Box<ImageManifest>,
    },
    /// The image has no index, or its layer is eStargz / zstd:chunked.
    None(String),
}

/// Why a layer is not read through a zTOC of its image's index.
#[derive(Debug, Clone)]
pub enum NoZtoc {
    /// The image has no SOCI index, or the layer has a TOC of its own.
    NoIndex(String),
    /// The image's index has no zTOC for this layer (soci skips small ones).
    NotInIndex {
        index: Digest,
        layer: Box<Descriptor>,
    },
}

impl std::fmt::Display for NoZtoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoZtoc::NoIndex(why) => f.write_str(why),
            NoZtoc::NotInIndex { index, layer } => write!(
                f,
                "the SOCI index {index} has no zTOC for layer {} (soci indexes no layer \
                 under its minimum size)",
                layer.digest
            ),
        }
    }
}

/// The SOCI indexes of the images whose layers were mounted, by (repository, manifest
/// digest or reference, index label).
#[derive(Default)]
pub struct SociIndexes {
    found: Mutex<HashMap<(String, String, String), Arc<Lookup>>>,
}

/// zTOCs fetched ahead of their layers' Prepare, by (repository, zTOC digest).
/// containerd prepares an image's layers one after another, and each zTOC (megabytes:
/// every span's inflater window) would otherwise wait for the mount before it.
pub type ZtocsAhead = Preopener<Bytes>;

impl SociIndexes {
    /// The zTOC for `layer`, or None when the image has no SOCI index, the index has no
    /// zTOC for this layer (soci skips small ones) or the layer is lazy by its own TOC.
    pub(crate) async fn ztoc_for(
        &self,
        client: &Client,
        layer: &LayerSource<'_>,
    ) -> Result<Result<ZtocRef, NoZtoc>, MountError> {
        let key = lookup_key(layer);
        let cached = lock(&self.found).get(&key).cloned();
        let lookup = match cached {
            Some(lookup) => lookup,
            None => {
                let lookup = Arc::new(look_up(client, layer).await?);
                let mut found = lock(&self.found);
                // A bound on memory: a node pulls a few images at a time.
                if found.len() >= 256 {
                    found.clear();
                }
                found.insert(key, Arc::clone(&lookup));
                lookup
            }
        };
        let (digest, found_by, index, image) = match &*lookup {
            Lookup::Index {
                digest,
                found_by,
                index,
                image,
            } => (digest, found_by, index, image),
            Lookup::None(why) => return Ok(Err(NoZtoc::NoIndex(why.clone()))),
        };
        let wanted = &layer.digest;
        let Some(in_image) = image.layers.iter().find(|d| d.digest == *wanted) else {
            return Err(MountError::Layer(format!(
                "the image's manifest does not list layer {wanted}"
            )));
        };
        let for_layer = |media_type: &str| {
            index.layers.iter().find(|d| {
                (d.media_type == media_type)
                    && d.annotations
                        .as_ref()
                        .and_then(|a| a.get(ANNOTATION_LAYER_DIGEST))
                        .is_some_and(|l| *l == layer.layer_digest)
            })
        };
        Ok(match for_layer(ZTOC_MEDIA_TYPE) {
            Some(ztoc) => Ok(ZtocRef {
                index_digest: digest.clone(),
                found_by: *found_by,
                ztoc: ztoc.clone(),
                layer: in_image.clone(),
                prefetch: for_layer(soci::prefetch_artifact::MEDIA_TYPE).cloned(),
            }),
            None => Err(NoZtoc::NotInIndex {
                index: digest.clone(),
                layer: Box::new(in_image.clone()),
            }),
        })
    }

    /// Starts fetching the zTOCs that the index looked up for `layer` has for
    /// `siblings` (the image's other layers, not mounted yet), a few at a time, so that
    /// their Prepare finds them in. Never waits.
    fn fetch_ahead(
        &self,
        ahead: &ZtocsAhead,
        client: &Client,
        layer: &LayerSource<'_>,
        siblings: &[String],
    ) {
        let Some(lookup) = lock(&self.found).get(&lookup_key(layer)).cloned() else {
            return;
        };
        let Lookup::Index { index, .. } = &*lookup else {
            return;
        };
        let mut started = 0;
        for ztoc in index.layers.iter().filter(|d| {
            d.media_type == ZTOC_MEDIA_TYPE
                && d.size <= MAX_ZTOC_SIZE
                && d.annotations
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_LAYER_DIGEST))
                    .is_some_and(|l| siblings.contains(l))
        }) {
            let repository = layer.reference.repository.clone();
            let key = ztoc_key(&repository, &ztoc.digest);
            let fetch = fetch_ztoc(client.clone(), repository, ztoc.digest.clone());
            started += usize::from(ahead.start(key, fetch));
        }
        if started > 0 {
            tracing::debug!(layer = %layer.layer_digest, ztocs = started,
                "fetching the zTOCs of sibling layers ahead");
        }
    }
}

/// The bytes of the zTOC `desc`: those fetched ahead for it (waiting for them if they
/// are on their way), else (or if that fetch failed) fetched now. Not yet checked
/// against the digest.
async fn ztoc_bytes(
    ahead: Option<&ZtocsAhead>,
    client: &Client,
    repository: &registry::Repository,
    desc: &Descriptor,
) -> Result<Bytes, MountError> {
    if let Some(ahead) = ahead {
        match ahead.claim(&ztoc_key(repository, &desc.digest)).await.0 {
            Some(Ok(bytes)) => return Ok(bytes),
            Some(Err(e)) => tracing::debug!(ztoc = %desc.digest, error = %e,
                "the zTOC fetched ahead did not come: fetching it again"),
            None => {}
        }
    }
    fetch_ztoc(client.clone(), repository.clone(), desc.digest.clone()).await
}

fn ztoc_key(repository: &registry::Repository, digest: &Digest) -> LayerKey {
    LayerKey {
        repository: repository.to_string(),
        digest: digest.to_string(),
    }
}

async fn fetch_ztoc(
    client: Client,
    repository: registry::Repository,
    digest: Digest,
) -> Result<Bytes, MountError> {
    client
        .fetch_blob(&repository, &digest, MAX_ZTOC_SIZE)
        .await
        .map_err(|e| MountError::Registry(e.to_string()))
}

/// Which image's lookup serves `layer`: (repository, manifest digest or reference, index
/// label).
fn lookup_key(layer: &LayerSource<'_>) -> (String, String, String) {
    (
        layer.reference.repository.to_string(),
        layer
            .manifest_digest
            .clone()
            .unwrap_or_else(|| layer.image_ref.clone()),
        layer.soci_index_digest.clone().unwrap_or_default(),
    )
}

async fn look_up(client: &Client, layer: &LayerSource<'_>) -> Result<Lookup, MountError> {
    let reference = &layer.reference;
    let registry = |e: registry::Error| MountError::Registry(e.to_string());
    let (image_digest, image) = match &layer.manifest_digest {
        Some(digest) => {
            let fetched = client
                .fetch_manifest(&reference.repository, digest)
                .await
                .map_err(registry)?;
            let image = serde_json::from_slice::<ImageManifest>(&fetched.bytes)
                .map_err(|e| MountError::Layer(format!("manifest {digest}: {e}")))?;
            (fetched.digest, image)
        }
        None => {
            let resolved = client.resolve(reference).await.map_err(registry)?;
            (resolved.digest, resolved.manifest)
        }
    };
    let has_toc = image.layers.iter().any(|d| {
        d.digest.to_string() == layer.layer_digest
            && d.annotations.as_ref().is_some_and(|a| {
                a.contains_key(estargz::TOC_DIGEST_ANNOTATION)
                    || a.contains_key(estargz::MANIFEST_CHECKSUM_ANNOTATION)
                    || a.contains_key(estargz::LEGACY_MANIFEST_CHECKSUM_ANNOTATION)
            })
    });
    if has_toc {
        return Ok(Lookup::None("the layer carries a TOC of its own".into()));
    }
    let annotated = image
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_INDEX_DIGEST));
    let (digest, found_by) = if let Some(label) = &layer.soci_index_digest {
        (label.clone(), FoundBy::Label)
    } else if let Some(annotated) = annotated {
        (annotated.clone(), FoundBy::ManifestAnnotation)
    } else {
        let referrers = client
            .referrers(&reference.repository, &image_digest, Some(SOCI_INDEX_V1))
            .await
            .map_err(registry)?;
        match referrers.first() {
            Some(first) => (first.digest.to_string(), FoundBy::Referrers),
            None => {
                return Ok(Lookup::None(format!(
                    "the image {image_digest} has no SOCI index (no {ANNOTATION_INDEX_DIGEST} \
                     annotation, no v1 index among its referrers)"
                )));
            }
        }
    };
    let digest: Digest = digest
        .parse()
        .map_err(|e| MountError::Labels(format!("SOCI index digest {digest:?}: {e}")))?;
    let fetched = client
        .fetch_manifest(&reference.repository, &digest.to_string())
        .await
        .map_err(registry)?;
    let index = serde_json::from_slice::<ImageManifest>(&fetched.bytes)
        .map_err(|e| MountError::Layer(format!("SOCI index {digest}: {e}")))?;
    let kind = index
        .artifact_type()
        .unwrap_or(index.config.media_type.as_str());
    if kind != SOCI_INDEX_V1 && kind != SOCI_INDEX_V2 {
        return Err(MountError::Layer(format!(
            "{digest} is not a SOCI index (its type is {kind:?})"
        )));
    }
    Ok(Lookup::Index {
        digest,
        found_by,
        index: Box::new(index),
        image: Box::new(image),
    })
}

/// A layer opened through its image's SOCI index: the layer, how (for the log), and
/// what to keep so that it opens again without the registry (None for a layer fetched
/// whole).
pub type ThroughIndex = (estargz::Layer, String, Option<KeptZtoc>);

/// `layer` opened through its image's SOCI index, or None (with why, for the log) when
/// there is no zTOC to read it through. A zTOC that is found but does not open (not the
/// digest its index names, malformed, not for this layer) is an error: the layer is then
/// pulled in full.
/// `ahead`: where the zTOCs of the image's layers not mounted yet (`siblings`) are
/// fetched ahead, unless that is off.
pub(crate) async fn open_through_index(
    client: &Client,
    indexes: &SociIndexes,
    gate: &crate::parse_gate::ParseGate,
    layer: &LayerSource<'_>,
    local_dir: &Path,
    ahead: Option<(&ZtocsAhead, &[String])>,
) -> Result<Result<ThroughIndex, String>, MountError> {
    let reference = &layer.reference;
    let found = match indexes.ztoc_for(client, layer).await? {
        Ok(found) => found,
        Err(NoZtoc::NotInIndex { index, layer: desc })
            if desc.size <= MAX_WHOLE_LAYER && desc.media_type.ends_with("gzip") =>
        {
            return open_whole(client, gate, layer, index, *desc, local_dir)
                .await
                .map(|(opened, how)| Ok((opened, how, None)));
        }
        Err(why) => return Ok(Err(why.to_string())),
    };
    let bad = |why: String| {
        MountError::Layer(format!(
            "SOCI index {}, zTOC {}: {why}",
            found.index_digest, found.ztoc.digest
        ))
    };
    if found.ztoc.size > MAX_ZTOC_SIZE {
        return Err(bad(format!(
            "{} bytes, over the {MAX_ZTOC_SIZE} lazysnapd reads",
            found.ztoc.size
        )));
    }
    if let Some((ahead, siblings)) = ahead {
        indexes.fetch_ahead(ahead, client, layer, siblings);
    }
    let bytes = ztoc_bytes(
        ahead.map(|(a, _)| a),
        client,
        &reference.repository,
        &found.ztoc,
    )
    .await?;
    let ztoc_digest =
        estargz::Sha256Sum::try_from(&found.ztoc.digest).map_err(|e| bad(format!("{e}")))?;
    let prefetch = match &found.prefetch {
        Some(desc) => prefetch_spans(client, reference, desc).await,
        None => Vec::new(),
    };
    let blob = registry::RemoteBlob::new(
        client.clone(),
        reference.repository.clone(),
        found.layer.digest.clone(),
        found.layer.size,
    );
    let size = found.layer.size;
    let cancel = estargz::Cancel::new();
    let stop = cancel.clone();
    let need = bytes.len() as u64 * ZTOC_PARSE_FACTOR;
    let kept = KeptZtoc {
        blob_size: size,
        ztoc: bytes.to_vec(),
        prefetch: prefetch.clone(),
    };
    let opened = gate
        .run(&layer.layer_digest, need, cancel, move || {
            soci::layer::open_layer_prefetching(
                Arc::new(blob),
                size,
                &bytes,
                &ztoc_digest,
                &prefetch,
                &stop,
            )
        })
        .await?
        .map_err(|e| bad(e.to_string()))?;
    let how = format!(
        "through its SOCI index {} (found by {:?}), zTOC {}",
        found.index_digest, found.found_by, found.ztoc.digest
    );
    Ok(Ok((opened, how, Some(kept))))
}

/// The spans a layer's prefetch artifact names; none (with a log line) when it cannot be
/// had or read: the layer still mounts, only without its prefetch.
async fn prefetch_spans(
    client: &Client,
    reference: &Reference,
    desc: &Descriptor,
) -> Vec<std::ops::RangeInclusive<u32>> {
    const MAX_ARTIFACT: u64 = 1 << 20;
    let fetched = client
        .fetch_blob(&reference.repository, &desc.digest, MAX_ARTIFACT)
        .await
        .map_err(|e| e.to_string())
        .and_then(|bytes| soci::prefetch_artifact::decode(&bytes).map_err(|e| e.to_string()));
    match fetched {
        Ok(spans) => spans,
        Err(e) => {
            tracing::warn!(artifact = %desc.digest, error = %e,
                "the SOCI prefetch artifact is unusable; the layer mounts without its prefetch");
            Vec::new()
        }
    }
}

/// The most of a layer without a zTOC that is fetched whole to be indexed here.
pub const MAX_WHOLE_LAYER: u64 = 256 << 20;

/// A layer of a SOCI-indexed image that the index has no zTOC for: fetched whole into
/// `local_dir` (checked against its digest as it arrives) unless a copy is there already,
/// indexed here, and served from that copy, which stays while a lazily pulled snapshot
/// uses the layer ([`retain_local_copies`]): a restart serves it again without the
/// registry. The image still mounts lazily, and containerd downloads nothing.
async fn open_whole(
    client: &Client,
    gate: &crate::parse_gate::ParseGate,
    layer: &LayerSource<'_>,
    index: Digest,
    desc: Descriptor,
    local_dir: &Path,
) -> Result<(estargz::Layer, String), MountError> {
    let io = |what: &str, e: std::io::Error| MountError::Mount(format!("{what}: {e}"));
    let path = local_copy_path(local_dir, &layer.layer_digest)
        .ok_or_else(|| MountError::Labels(format!("layer digest {:?}", layer.layer_digest)))?;
    if path.is_file() {
        match open_local_copy(gate, &layer.layer_digest, &path).await {
            Ok(opened) => {
                let how = format!(
                    "from its local copy (digest checked): the SOCI index {index} has no zTOC for it"
                );
                return Ok((opened, how));
            }
            Err(e) => tracing::warn!(layer = %layer.layer_digest, error = %e,
                "the layer's local copy is unusable; fetching it again"),
        }
    }
    std::fs::create_dir_all(local_dir)
        .map_err(|e| io("creating the local layers' directory", e))?;
    let copy = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(local_dir)
        .map_err(|e| io("creating a local copy", e))?;
    let mut out = tokio::fs::File::from_std(copy.reopen().map_err(|e| io("opening the copy", e))?);
    let size = client
        .fetch_blob_to(&layer.reference.repository, &desc.digest, &mut out)
        .await
        .map_err(|e| MountError::Registry(e.to_string()))?;
    tokio::io::AsyncWriteExt::flush(&mut out)
        .await
        .map_err(|e| io("writing the copy", e))?;
    drop(out);
    // The digest was checked as the bytes arrived: the copy takes the layer's name.
    copy.persist(&path)
        .map_err(|e| io("keeping the local copy", e.error))?;
    let opened = open_local_copy(gate, &layer.layer_digest, &path).await?;
    let how = format!(
        "fetched whole ({size} bytes, digest checked) and indexed here: the SOCI index \
         {index} has no zTOC for it"
    );
    Ok((opened, how))
}

/// Where the local copy of `layer_digest` is kept: `DIR/<algorithm>-<hex>`; None for a
/// digest that could name anything else.
pub fn local_copy_path(local_dir: &Path, layer_digest: &str) -> Option<PathBuf> {
    let digest: Digest = layer_digest.parse().ok()?;
    Some(local_dir.join(format!("{}-{}", digest.algorithm().name(), digest.hex())))
}

/// Opens a layer from its local copy at `path`, checked against `layer_digest` first
/// (a copy that does not match is deleted), indexed here; no registry.
pub async fn open_local_copy(
    gate: &crate::parse_gate::ParseGate,
    layer_digest: &str,
    path: &Path,
) -> Result<estargz::Layer, MountError> {
    let want: Digest = layer_digest
        .parse()
        .map_err(|e| MountError::Labels(format!("layer digest {layer_digest:?}: {e}")))?;
    let size = std::fs::metadata(path)
        .map_err(|e| MountError::Mount(format!("{}: {e}", path.display())))?
        .len();
    let cancel = estargz::Cancel::new();
    let stop = cancel.clone();
    let path = path.to_path_buf();
    gate.run(layer_digest, size, cancel, move || {
        let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        let mut hasher = registry::Hasher::new(want.algorithm());
        let mut reader = std::io::BufReader::with_capacity(1 << 20, &file);
        loop {
            let buf = std::io::BufRead::fill_buf(&mut reader).map_err(|e| e.to_string())?;
            if buf.is_empty() {
                break;
            }
            hasher.update(buf);
            let n = buf.len();
            std::io::BufRead::consume(&mut reader, n);
        }
        if hasher.finish() != want {
            let _ = std::fs::remove_file(&path);
            return Err(format!("{} is not layer {want}: deleted", path.display()));
        }
        let ztoc = soci::ztoc_builder::build_ztoc(
            &file,
            soci::ztoc_builder::DEFAULT_SPAN_SIZE,
            "lazysnapd",
        )
        .map_err(|e| e.to_string())?;
        let bytes = soci::ztoc::encode(&ztoc);
        let blob = Arc::new(LocalCopy { path, file, size });
        soci::layer::open_layer(blob, size, &bytes, &estargz::Sha256Sum::of(&bytes), &stop)
            .map_err(|e| e.to_string())
    })
    .await?
    .map_err(|e| MountError::Layer(format!("layer {layer_digest}, from its local copy: {e}")))
}

/// Deletes the local copies of layers not in `keep` written before `written_before`
/// (one written since may be of a layer mounted after `keep` was listed), and leftover
/// temp files as old. Returns how many went.
pub fn retain_local_copies(
    local_dir: &Path,
    keep: &std::collections::HashSet<String>,
    written_before: std::time::SystemTime,
) -> usize {
    let keep: std::collections::HashSet<PathBuf> = keep
        .iter()
        .filter_map(|d| local_copy_path(local_dir, d))
        .collect();
    // Only what this module writes there: copies named after a digest, temp files.
    let ours = |name: &str| {
        name.starts_with(".tmp-")
            || name
                .split_once('-')
                .and_then(|(algorithm, hex)| format!("{algorithm}:{hex}").parse::<Digest>().ok())
                .is_some()
    };
    crate::fsutil::remove_unkept(local_dir, &keep, written_before, ours)
}

/// A layer's local copy as the blob it is read from.
struct LocalCopy {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
}

impl estargz::BlobReader for LocalCopy {
    fn size(&self) -> estargz::BlobFuture<'_, u64> {
        let size = self.size;
        Box::pin(async move { Ok(size) })
    }

    fn read_at(&self, offset: u64, len: u64) -> estargz::BlobFuture<'_, bytes::Bytes> {
        use std::os::unix::fs::FileExt as _;
        // A span (a few MB) from a local file, likely in the page cache: read in place.
        let result = (|| {
            if offset > self.size {
                return Err(estargz::BlobError::new(
                    estargz::BlobErrorKind::OutOfRange,
                    format!("read at {offset} past the end of {}", self.path.display()),
                ));
            }
            let mut buf = vec![0u8; len.min(self.size - offset) as usize];
            self.file.read_exact_at(&mut buf, offset).map_err(|e| {
                estargz::BlobError::new(estargz::BlobErrorKind::Fatal, e.to_string())
            })?;
            Ok(bytes::Bytes::from(buf))
        })();
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::{Duration, SystemTime};

    /// A gzip layer made with tar and gzip, and its digest.
    fn gzip_layer(dir: &Path) -> (Vec<u8>, String) {
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("etc/motd"), "local copy\n").unwrap();
        let out = std::process::Command::new("tar")
            .arg("-czf")
            .arg("-")
            .arg("-C")
            .arg(&src)
            .arg("etc")
            .output()
            .unwrap();
        assert!(out.status.success());
        let digest = Digest::sha256_of(&out.stdout).to_string();
        (out.stdout, digest)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_ztoc_fetched_ahead_is_used_once_and_a_failed_one_is_fetched_again() {
        // A registry nobody listens on: any fetch made now fails.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::new(registry::RegistryConfig::default()).unwrap();
        let repository = registry::Repository::new(format!("127.0.0.1:{port}"), "app");
        let desc = |bytes: &[u8]| -> Descriptor {
            serde_json::from_value(serde_json::json!({
                "mediaType": ZTOC_MEDIA_TYPE,
                "digest": Digest::sha256_of(bytes).to_string(),
                "size": bytes.len(),
            }))
            .unwrap()
        };
        let ahead = ZtocsAhead::new(
            tokio::runtime::Handle::current(),
            4,
            Duration::from_secs(60),
        );
        let (arrived, failed) = (desc(b"ztoc one"), desc(b"ztoc two"));
        assert!(ahead.start(ztoc_key(&repository, &arrived.digest), async {
            Ok(Bytes::from_static(b"ztoc one"))
        }));
        assert!(
            !ahead.start(ztoc_key(&repository, &arrived.digest), async {
                Ok(Bytes::from_static(b"again"))
            }),
            "one fetch ahead per zTOC"
        );
        assert!(ahead.start(ztoc_key(&repository, &failed.digest), async {
            Err(MountError::Registry("connection reset".into()))
        }));
        // Let the fetches ahead run (a claim of one still queued would cancel it).
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }

        let got = ztoc_bytes(Some(&ahead), &client, &repository, &arrived)
            .await
            .unwrap();
        assert_eq!(&got[..], b"ztoc one");
        assert!(
            ztoc_bytes(Some(&ahead), &client, &repository, &arrived)
                .await
                .is_err(),
            "taken once: a second open fetches it, from a registry that is not there"
        );
        let again = ztoc_bytes(Some(&ahead), &client, &repository, &failed).await;
        assert!(
            matches!(&again, Err(MountError::Registry(e)) if !e.contains("connection reset")),
            "the failed fetch ahead is not the answer: it is fetched again ({again:?})"
        );
    }

    #[tokio::test]
    async fn a_local_copy_opens_when_it_is_the_layer_and_is_deleted_when_not() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("local-layers");
        std::fs::create_dir_all(&local).unwrap();
        let (bytes, digest) = gzip_layer(dir.path());
        let path = local_copy_path(&local, &digest).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        let gate = crate::parse_gate::ParseGate::new(64 << 20, Duration::from_secs(10));
        let opened = open_local_copy(&gate, &digest, &path).await.unwrap();
        assert_eq!(
            opened.read_file_range("etc/motd", 0, 100).await.unwrap(),
            b"local copy\n"
        );
        // Another layer's bytes under this name: refused and deleted.
        let mut other = bytes.clone();
        let last = other.len() - 1;
        other[last] ^= 1;
        std::fs::write(&path, &other).unwrap();
        let err = open_local_copy(&gate, &digest, &path).await.unwrap_err();
        assert!(err.to_string().contains("is not layer"), "{err}");
        assert!(!path.exists());
        assert_eq!(local_copy_path(&local, "../../etc/passwd"), None);
    }

    #[test]
    fn the_sweep_removes_only_unused_copies_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let used = Digest::sha256_of(b"used").to_string();
        let unused = Digest::sha256_of(b"unused").to_string();
        for d in [&used, &unused] {
            std::fs::write(local_copy_path(dir.path(), d).unwrap(), d).unwrap();
        }
        std::fs::write(dir.path().join(".tmp-x"), "").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not ours").unwrap();
        let keep = [used.clone()].into_iter().collect();
        // Written after the listing: kept, whatever it is.
        assert_eq!(
            retain_local_copies(
                dir.path(),
                &keep,
                SystemTime::now() - Duration::from_secs(60)
            ),
            0
        );
        let later = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(retain_local_copies(dir.path(), &keep, later), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![
            "notes.txt".to_string(),
            local_copy_path(dir.path(), &used)
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        ];
        want.sort();
        assert_eq!(left, want);
    }
}
