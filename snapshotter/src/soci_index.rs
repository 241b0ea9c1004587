//! Finding the zTOC of an ordinary gzip layer, as soci-snapshotter finds it: the index
//! named by the `soci.index.digest` label, else the one the image manifest's
//! `com.amazon.soci.index-digest` annotation names (SOCI index manifest v2), else the
//! first SOCI v1 index that refers to the image manifest (the referrers API, or its tag
//! schema). Every manifest is checked against its digest; an image's lookup is
//! remembered, so its other layers make no more requests.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use registry::{Client, Descriptor, Digest, ImageManifest, Reference};

use crate::remote::{MountError, RemoteLayer};
use crate::tocstore::KeptZtoc;

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

impl SociIndexes {
    /// The zTOC for `layer`, or None when the image has no SOCI index, the index has no
    /// zTOC for this layer (soci skips small ones) or the layer is lazy by its own TOC.
    pub async fn ztoc_for(
        &self,
        client: &Client,
        layer: &RemoteLayer,
        reference: &Reference,
    ) -> Result<Result<ZtocRef, NoZtoc>, MountError> {
        let key = (
            reference.repository.to_string(),
            layer
                .manifest_digest
                .clone()
                .unwrap_or_else(|| layer.image_ref.clone()),
            layer.soci_index_digest.clone().unwrap_or_default(),
        );
        let cached = self
            .found
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let lookup = match cached {
            Some(lookup) => lookup,
            None => {
                let lookup = Arc::new(look_up(client, layer, reference).await?);
                let mut found = self.found.lock().unwrap_or_else(|p| p.into_inner());
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
        let wanted: Digest = layer.layer_digest.parse().map_err(|e| {
            MountError::Labels(format!("layer digest {:?}: {e}", layer.layer_digest))
        })?;
        let Some(in_image) = image.layers.iter().find(|d| d.digest == wanted) else {
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
}

async fn look_up(
    client: &Client,
    layer: &RemoteLayer,
    reference: &Reference,
) -> Result<Lookup, MountError> {
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
        .artifact_type
        .as_deref()
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

/// Memory a zTOC's parse may take, per byte of it: decoded entries (the FlatBuffers form
/// is tight, a crafted one tighter), the layout, the index.
pub(crate) const ZTOC_PARSE_FACTOR: u64 = 32;

/// A layer opened through its image's SOCI index: the layer, how (for the log), and
/// what to keep so that it opens again without the registry (None for a layer fetched
/// whole).
pub type ThroughIndex = (estargz::Layer, String, Option<KeptZtoc>);

/// `layer` opened through its image's SOCI index, or None (with why, for the log) when
/// there is no zTOC to read it through. A zTOC that is found but does not open (not the
/// digest its index names, malformed, not for this layer) is an error: the layer is then
/// pulled in full.
pub async fn open_through_index(
    client: &Client,
    indexes: &SociIndexes,
    gate: &crate::parse_gate::ParseGate,
    layer: &RemoteLayer,
    local_dir: &Path,
) -> Result<Result<ThroughIndex, String>, MountError> {
    let reference: Reference = layer
        .image_ref
        .parse()
        .map_err(|e| MountError::Labels(format!("image reference {:?}: {e}", layer.image_ref)))?;
    let found = match indexes.ztoc_for(client, layer, &reference).await? {
        Ok(found) => found,
        Err(NoZtoc::NotInIndex { index, layer: desc })
            if desc.size <= MAX_WHOLE_LAYER && desc.media_type.ends_with("gzip") =>
        {
            return open_whole(client, gate, layer, &reference, index, *desc, local_dir)
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
    let bytes = client
        .fetch_blob(&reference.repository, &found.ztoc.digest, MAX_ZTOC_SIZE)
        .await
        .map_err(|e| MountError::Registry(e.to_string()))?;
    let ztoc_digest: estargz::Digest = found
        .ztoc
        .digest
        .to_string()
        .parse()
        .map_err(|e| bad(format!("{e}")))?;
    let prefetch = match &found.prefetch {
        Some(desc) => prefetch_spans(client, &reference, desc).await,
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
/// `local_dir` (checked against its digest as it arrives), indexed here, and served
/// from that copy, which goes when the layer does. The image still mounts lazily, and
/// containerd downloads nothing.
async fn open_whole(
    client: &Client,
    gate: &crate::parse_gate::ParseGate,
    layer: &RemoteLayer,
    reference: &Reference,
    index: Digest,
    desc: Descriptor,
    local_dir: &Path,
) -> Result<(estargz::Layer, String), MountError> {
    let io = |what: &str, e: std::io::Error| MountError::Mount(format!("{what}: {e}"));
    std::fs::create_dir_all(local_dir)
        .map_err(|e| io("creating the local layers' directory", e))?;
    let copy = tempfile::Builder::new()
        .prefix("layer-")
        .tempfile_in(local_dir)
        .map_err(|e| io("creating a local copy", e))?;
    let mut out = tokio::fs::File::from_std(copy.reopen().map_err(|e| io("opening the copy", e))?);
    let size = client
        .fetch_blob_to(&reference.repository, &desc.digest, &mut out)
        .await
        .map_err(|e| MountError::Registry(e.to_string()))?;
    tokio::io::AsyncWriteExt::flush(&mut out)
        .await
        .map_err(|e| io("writing the copy", e))?;
    drop(out);
    let cancel = estargz::Cancel::new();
    let stop = cancel.clone();
    let digest = layer.layer_digest.clone();
    let opened = gate
        .run(&layer.layer_digest, size, cancel, move || {
            let file = copy.reopen().map_err(|e| e.to_string())?;
            let ztoc = soci::ztoc_builder::build_ztoc(
                &file,
                soci::ztoc_builder::DEFAULT_SPAN_SIZE,
                "lazysnapd",
            )
            .map_err(|e| e.to_string())?;
            let bytes = soci::ztoc::encode(&ztoc);
            let blob = Arc::new(LocalCopy { copy, file, size });
            soci::layer::open_layer(blob, size, &bytes, &estargz::Digest::of(&bytes), &stop)
                .map_err(|e| e.to_string())
        })
        .await?
        .map_err(|e| MountError::Layer(format!("layer {digest}, fetched whole: {e}")))?;
    let how = format!(
        "fetched whole ({size} bytes, digest checked) and indexed here: the SOCI index \
         {index} has no zTOC for it"
    );
    Ok((opened, how))
}

/// A layer's local copy as the blob it is read from; the file goes with it.
struct LocalCopy {
    copy: tempfile::NamedTempFile,
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
                    format!(
                        "read at {offset} past the end of {}",
                        self.copy.path().display()
                    ),
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
