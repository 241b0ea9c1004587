//! Finding the zTOC of an ordinary gzip layer, as soci-snapshotter finds it: the index
//! named by the `soci.index.digest` label, else the one the image manifest's
//! `com.amazon.soci.index-digest` annotation names (SOCI index manifest v2), else the
//! first SOCI v1 index that refers to the image manifest (the referrers API, or its tag
//! schema). Every manifest is checked against its digest; an image's lookup is
//! remembered, so its other layers make no more requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use registry::{Client, Descriptor, Digest, ImageManifest, Reference};

use crate::remote::{MountError, RemoteLayer};

pub const SOCI_INDEX_V1: &str = "application/vnd.amazon.soci.index.v1+json";
pub const SOCI_INDEX_V2: &str = "application/vnd.amazon.soci.index.v2+json";
/// On an image manifest: its SOCI index (v2).
pub const ANNOTATION_INDEX_DIGEST: &str = "com.amazon.soci.index-digest";
/// On a zTOC's descriptor in an index: the image layer it is for.
pub const ANNOTATION_LAYER_DIGEST: &str = "com.amazon.soci.image-layer-digest";
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
    ) -> Result<Result<ZtocRef, String>, MountError> {
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
            Lookup::None(why) => return Ok(Err(why.clone())),
        };
        let wanted: Digest = layer.layer_digest.parse().map_err(|e| {
            MountError::Labels(format!("layer digest {:?}: {e}", layer.layer_digest))
        })?;
        let Some(in_image) = image.layers.iter().find(|d| d.digest == wanted) else {
            return Err(MountError::Layer(format!(
                "the image's manifest does not list layer {wanted}"
            )));
        };
        let ztoc = index.layers.iter().find(|d| {
            d.annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_LAYER_DIGEST))
                .is_some_and(|l| *l == layer.layer_digest)
        });
        Ok(match ztoc {
            Some(ztoc) => Ok(ZtocRef {
                index_digest: digest.clone(),
                found_by: *found_by,
                ztoc: ztoc.clone(),
                layer: in_image.clone(),
            }),
            None => Err(format!(
                "the SOCI index {digest} has no zTOC for this layer (soci indexes no \
                 layer under its minimum size)"
            )),
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
const ZTOC_PARSE_FACTOR: u64 = 32;

/// `layer` opened through its image's SOCI index, or None (with why, for the log) when
/// there is no zTOC to read it through. A zTOC that is found but does not open (not the
/// digest its index names, malformed, not for this layer) is an error: the layer is then
/// pulled in full.
pub async fn open_through_index(
    client: &Client,
    indexes: &SociIndexes,
    gate: &crate::parse_gate::ParseGate,
    layer: &RemoteLayer,
) -> Result<Result<(estargz::Layer, ZtocRef), String>, MountError> {
    let reference: Reference = layer
        .image_ref
        .parse()
        .map_err(|e| MountError::Labels(format!("image reference {:?}: {e}", layer.image_ref)))?;
    let found = match indexes.ztoc_for(client, layer, &reference).await? {
        Ok(found) => found,
        Err(why) => return Ok(Err(why)),
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
    let opened = gate
        .run(&layer.layer_digest, need, cancel, move || {
            soci::layer::open_layer(Arc::new(blob), size, &bytes, &ztoc_digest, &stop)
        })
        .await?
        .map_err(|e| bad(e.to_string()))?;
    Ok(Ok((opened, found)))
}
