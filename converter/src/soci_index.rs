//! SOCI indexes for an image's ordinary gzip layers, the layers untouched: a zTOC per
//! layer (soci's minimum size and span size by default), listed in an index manifest.
//! Version 2 (as `soci convert` writes it): the image manifest gains the index's digest
//! as an annotation (a new image digest), and the destination names an OCI index of the
//! image and its SOCI index. Version 1: the index refers to the image manifest as its
//! subject and is found through the registry's referrers (or their tag schema); the
//! image's digest does not change.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::endpoint::{Dst, Src};
use crate::error::{Error, Result};
use crate::image::{LayerAction, LayerSummary, Location, Summary};
use crate::oci::{
    self, Descriptor, Digest, Extra, Index, LayerCompression, Manifest, OCI_INDEX, OCI_MANIFEST,
    Object, Platform,
};
use crate::prioritized::PrioritizedList;
use crate::progress::Progress;

pub use soci::index_names::{
    ANNOTATION_BUILD_TOOL, ANNOTATION_IMAGE_MANIFEST_DIGEST, ANNOTATION_INDEX_DIGEST,
    ANNOTATION_LAYER_DIGEST, ANNOTATION_LAYER_MEDIA_TYPE, ANNOTATION_SPAN_SIZE, SOCI_INDEX_V1,
    SOCI_INDEX_V2, ZTOC_MEDIA_TYPE,
};
/// soci's default: layers smaller than this get no zTOC (they are pulled whole).
pub const DEFAULT_MIN_LAYER_SIZE: u64 = 10 << 20;

/// Uncompressed tar between two checkpoints of the zTOCs `convert --soci` builds: half of
/// soci's 4 MiB. A lazy read fetches its whole span (its digest covers it), while each span
/// adds a 32 KiB window to the zTOC fetched at mount. Measured on the bench's python, node
/// and JRE images (cold starts over 100 Mbit/s, 10 ms): 2 MiB spans start them 3-14%
/// sooner than 4 MiB, and 1 MiB spans later (python: 34.5 MB of zTOCs against 14.3 MB).
/// `--span-size 4194304` gives soci's own zTOCs, byte for byte.
pub const DEFAULT_SPAN_SIZE: u64 = 2 << 20;
/// `{}`, the config of every SOCI index.
const EMPTY_JSON: &[u8] = b"{}";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SociVersion {
    V1,
    V2,
}

#[derive(Debug, Clone)]
pub struct SociOptions {
    pub version: SociVersion,
    pub span_size: u64,
    pub min_layer_size: u64,
    pub build_tool: String,
    pub plain_http: bool,
    /// The platform to index from a multi-platform image (default: this machine's).
    pub platform: Option<Platform>,
    /// zTOCs built at once (default: one per core).
    pub threads: usize,
    /// What the image's command read (`lazysnap optimize`): each layer's spans holding
    /// it go into a prefetch artifact.
    pub prefetch: Option<PrioritizedList>,
}

impl Default for SociOptions {
    fn default() -> Self {
        SociOptions {
            version: SociVersion::V2,
            span_size: DEFAULT_SPAN_SIZE,
            min_layer_size: DEFAULT_MIN_LAYER_SIZE,
            build_tool: format!("lazysnap {}", env!("CARGO_PKG_VERSION")),
            plain_http: false,
            platform: None,
            threads: 0,
            prefetch: None,
        }
    }
}

/// The index manifest, field by field as soci writes it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexManifest {
    schema_version: u32,
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<Descriptor>,
    annotations: BTreeMap<String, String>,
}

/// Builds and stores the SOCI index of the image at `src`; `dst` is where the result
/// goes (for v1, the image's own repository).
pub async fn index_image(
    src: &Location,
    dst: &Location,
    opts: &SociOptions,
    progress: &Progress,
) -> Result<Summary> {
    if opts.version == SociVersion::V1 && !matches!(dst, Location::Registry(_)) {
        return Err(Error::BadOption(
            "a SOCI v1 index is found through a registry's referrers: its destination is a \
             registry repository"
                .into(),
        ));
    }
    let src_end = Src::open(src, opts.plain_http).await?;
    let dst_end = Dst::open(dst, opts.plain_http).await?;
    let (mut image_desc, image_bytes) = image_manifest(&src_end, opts).await?;
    let manifest =
        match oci::parse_object(&image_bytes, &image_desc.media_type, &image_desc.digest)? {
            Object::Manifest(m) => *m,
            Object::Index(_) => {
                return Err(Error::BadOption("an index inside an index".into()));
            }
        };
    if image_desc.platform.is_none() {
        image_desc.platform = platform_of(&src_end, &manifest.config).await;
    }
    dst_end
        .copy_from(&src_end, &manifest.config, "config")
        .await?;
    let (ztocs, layers) = build_ztocs(&src_end, &dst_end, &manifest, opts, progress).await?;

    let empty = dst_end.put_blob(EMPTY_JSON.to_vec()).await?;
    let (kind, subject) = match opts.version {
        SociVersion::V1 => (SOCI_INDEX_V1, Some(bare(&image_desc))),
        SociVersion::V2 => (SOCI_INDEX_V2, None),
    };
    let index = IndexManifest {
        schema_version: 2,
        media_type: OCI_MANIFEST,
        config: Descriptor::new(kind, empty, EMPTY_JSON.len() as u64),
        layers: ztocs,
        subject,
        annotations: BTreeMap::from([(ANNOTATION_BUILD_TOOL.into(), opts.build_tool.clone())]),
    };
    let index_bytes = oci::to_json(&index)?;
    let index_desc = Descriptor::new(
        OCI_MANIFEST,
        Digest::sha256_of(&index_bytes),
        index_bytes.len() as u64,
    );
    dst_end.put_child(&index_bytes, OCI_MANIFEST).await?;
    progress.message(&format!(
        "SOCI index {} ({} zTOCs)",
        index_desc.digest,
        index.layers.len()
    ));

    let root = match opts.version {
        SociVersion::V1 => {
            dst_end
                .put_child(&image_bytes, &image_desc.media_type)
                .await?;
            let mut listed = index_desc.clone();
            listed
                .other
                .insert("artifactType".into(), SOCI_INDEX_V1.into());
            listed.annotations = Some(index.annotations.clone());
            dst_end.add_referrer(&image_desc.digest, listed).await?;
            dst_end.finish(&bare(&image_desc), &image_bytes).await?;
            bare(&image_desc)
        }
        SociVersion::V2 => {
            let mut annotated = manifest;
            annotated
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(
                    ANNOTATION_INDEX_DIGEST.into(),
                    index_desc.digest.to_string(),
                );
            let annotated_bytes = oci::to_json(&annotated)?;
            dst_end
                .put_child(&annotated_bytes, &image_desc.media_type)
                .await?;
            let mut image_entry = Descriptor::new(
                &image_desc.media_type,
                Digest::sha256_of(&annotated_bytes),
                annotated_bytes.len() as u64,
            );
            image_entry.platform = image_desc.platform.clone();
            image_entry.annotations = Some(BTreeMap::from([(
                ANNOTATION_INDEX_DIGEST.into(),
                index_desc.digest.to_string(),
            )]));
            let mut index_entry = index_desc.clone();
            index_entry.platform = image_desc.platform.clone();
            index_entry.annotations = Some(BTreeMap::from([(
                ANNOTATION_IMAGE_MANIFEST_DIGEST.into(),
                image_entry.digest.to_string(),
            )]));
            index_entry
                .other
                .insert("artifactType".into(), SOCI_INDEX_V2.into());
            let top = Index {
                schema_version: 2,
                media_type: Some(OCI_INDEX.into()),
                manifests: vec![image_entry, index_entry],
                annotations: None,
                other: Extra::new(),
            };
            let top_bytes = oci::to_json(&top)?;
            let top_desc = Descriptor::new(
                OCI_INDEX,
                Digest::sha256_of(&top_bytes),
                top_bytes.len() as u64,
            );
            dst_end.finish(&top_desc, &top_bytes).await?;
            top_desc
        }
    };
    progress.message(&format!("wrote {} ({})", root.digest, root.media_type));
    Ok(Summary {
        root,
        manifests: 1,
        layers,
        soci_index: Some(index_desc),
    })
}

/// A descriptor with only what identifies the content (a subject's form).
fn bare(desc: &Descriptor) -> Descriptor {
    Descriptor::new(&desc.media_type, desc.digest.clone(), desc.size)
}

/// The image manifest the source names (this platform's, from an index).
async fn image_manifest(src: &Src, opts: &SociOptions) -> Result<(Descriptor, Vec<u8>)> {
    let (root_desc, root_bytes) = src.root().await?;
    match oci::parse_object(&root_bytes, &root_desc.media_type, &root_desc.digest)? {
        Object::Manifest(_) => Ok((root_desc, root_bytes)),
        Object::Index(index) => {
            let platform = opts.platform.clone().unwrap_or_else(Platform::host);
            let chosen = oci::choose_platform(&index, &platform)
                .ok_or_else(|| Error::NoMatchingPlatform {
                    image: src.name(),
                    platform: platform.to_string(),
                    available: index
                        .manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                        .collect::<Vec<_>>()
                        .join(", "),
                })?
                .clone();
            let bytes = src.object(&chosen).await?;
            Ok((chosen, bytes))
        }
    }
}

/// The platform an image's config names, for the index entries.
async fn platform_of(src: &Src, config: &Descriptor) -> Option<Platform> {
    let bytes = src.small(config, "config", 64 << 20).await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let (os, arch) = (v["os"].as_str()?, v["architecture"].as_str()?);
    let mut text = format!("{os}/{arch}");
    if let Some(variant) = v["variant"].as_str() {
        text.push('/');
        text.push_str(variant);
    }
    Platform::parse(&text).ok()
}

/// The zTOC of every gzip layer of at least the minimum size, stored in `dst`; every
/// layer copied there too.
async fn build_ztocs(
    src: &Src,
    dst: &Dst,
    manifest: &Manifest,
    opts: &SociOptions,
    progress: &Progress,
) -> Result<(Vec<Descriptor>, Vec<LayerSummary>)> {
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let mut ztocs = Vec::new();
    let mut layers = Vec::new();
    let mut builds = tokio::task::JoinSet::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(threads));
    for (i, desc) in manifest.layers.iter().enumerate() {
        dst.copy_from(src, desc, "layer").await?;
        let gzip = oci::layer_compression(&desc.media_type) == Some(LayerCompression::Gzip);
        if !gzip || desc.size < opts.min_layer_size {
            let why = if gzip {
                format!("under {} bytes, pulled whole", opts.min_layer_size)
            } else {
                format!("{}, not gzip", desc.media_type)
            };
            progress.message(&format!("layer {}: no zTOC ({why})", desc.digest));
            layers.push(LayerSummary {
                source: desc.digest.clone(),
                source_size: desc.size,
                result: desc.digest.clone(),
                result_size: desc.size,
                action: LayerAction::Copied,
            });
            continue;
        }
        let local = src.local(desc, "layer").await?;
        let file = local.try_clone()?;
        let task = progress.task(&format!("zTOC of {}", desc.digest), desc.size);
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .map_err(|e| Error::Internal(format!("zTOC builds: {e}")))?;
        let (span, tool) = (opts.span_size, opts.build_tool.clone());
        let digest = desc.digest.clone();
        let prefetch = opts.prefetch.clone();
        builds.spawn_blocking(move || {
            let _permit = permit;
            let _local = local;
            let report = |n: u64| task.inc(n);
            let built = soci::ztoc_builder::build_ztoc_reporting(&file, span, &tool, &report)
                .map_err(|e| Error::Internal(format!("zTOC of layer {digest}: {e}")));
            task.finish(if built.is_ok() {
                "zTOC built"
            } else {
                "failed"
            });
            let built = built.and_then(|z| {
                let artifact = match &prefetch {
                    Some(list) => prefetch_artifact(&z, list)?,
                    None => None,
                };
                Ok((soci::ztoc::encode(&z), artifact))
            });
            (i, built)
        });
    }
    let mut built = Vec::new();
    while let Some(done) = builds.join_next().await {
        let (i, bytes) = done.map_err(|e| Error::Internal(format!("zTOC task: {e}")))?;
        built.push((i, bytes?));
    }
    built.sort_by_key(|(i, _)| *i);
    for (i, (bytes, artifact)) in built {
        let layer = &manifest.layers[i];
        let size = bytes.len() as u64;
        let digest = dst.put_blob(bytes).await?;
        let artifact = match artifact {
            Some(artifact) => {
                let len = artifact.len() as u64;
                let mut desc = Descriptor::new(
                    soci::prefetch_artifact::MEDIA_TYPE,
                    dst.put_blob(artifact).await?,
                    len,
                );
                desc.annotations = Some(BTreeMap::from([(
                    ANNOTATION_LAYER_DIGEST.into(),
                    layer.digest.to_string(),
                )]));
                Some(desc)
            }
            None => None,
        };
        let mut ztoc = Descriptor::new(ZTOC_MEDIA_TYPE, digest.clone(), size);
        ztoc.annotations = Some(BTreeMap::from([
            (ANNOTATION_LAYER_DIGEST.into(), layer.digest.to_string()),
            (ANNOTATION_LAYER_MEDIA_TYPE.into(), layer.media_type.clone()),
            (ANNOTATION_SPAN_SIZE.into(), opts.span_size.to_string()),
        ]));
        ztocs.push(ztoc);
        ztocs.extend(artifact);
        layers.push(LayerSummary {
            source: layer.digest.clone(),
            source_size: layer.size,
            result: digest,
            result_size: size,
            action: LayerAction::Indexed,
        });
    }
    Ok((ztocs, layers))
}

/// The prefetch artifact of a layer (its zTOC `ztoc`): the spans holding the byte
/// ranges `list` names of the layer's files; None when the list names none of them.
fn prefetch_artifact(ztoc: &soci::ztoc::Ztoc, list: &PrioritizedList) -> Result<Option<Vec<u8>>> {
    let layout = soci::layout::Layout::check(ztoc.clone())
        .map_err(|e| Error::Internal(format!("a zTOC just built: {e}")))?;
    let mut spans = Vec::new();
    for (i, f) in layout.files.iter().enumerate() {
        let name = String::from_utf8_lossy(&f.name);
        let path = name.trim_start_matches("./").trim_start_matches('/');
        let Some(ranges) = list
            .ranges
            .get(path)
            .or_else(|| list.ranges.get(&format!("/{path}")))
        else {
            continue;
        };
        for p in layout.pieces(i) {
            let piece = p.file_offset..p.file_offset + p.len;
            if ranges
                .iter()
                .any(|r| r.start < piece.end && piece.start < r.end)
            {
                spans.push(p.span as u32);
            }
        }
    }
    Ok((!spans.is_empty()).then(|| soci::prefetch_artifact::encode(&spans)))
}
