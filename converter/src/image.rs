//! Whole-image conversion: resolve the source, convert each platform's layers, rewrite
//! configs, manifests and indexes, write the destination with the reference last.

use std::collections::HashMap;

use estargz::{OutputFormat, WriterOptions};

pub use crate::endpoint::Location;
use crate::endpoint::{Dst, Src, reopen};
use crate::error::{Error, Result};
use crate::layer::{self, LayerResult};
use crate::oci::{
    self, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Descriptor, Digest, Index,
    Manifest, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Object, Platform,
};
use crate::progress::Progress;

/// Largest image config accepted (configs with long histories can be big).
const MAX_CONFIG_SIZE: u64 = 64 << 20;

/// How to convert.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// Format, chunk size, compression level, prioritized files, threads.
    pub writer: WriterOptions,
    /// Platforms to convert from an index; empty means this machine's.
    pub platforms: Vec<Platform>,
    /// Convert every manifest of an index (and write an index).
    pub all_platforms: bool,
    /// Speak plain HTTP to the registries named (loopback ones do by default).
    pub plain_http: bool,
}

/// What happened to one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerAction {
    Converted,
    /// Already in the target format, with its annotations.
    Kept,
    /// Already in the target format by its footer; annotations added.
    Annotated,
    /// Not a layer the converter handles (foreign, artifact): copied as it is.
    Copied,
    /// Left as it is, with a SOCI zTOC made for it.
    Indexed,
}

#[derive(Debug, Clone)]
pub struct LayerSummary {
    pub source: Digest,
    pub source_size: u64,
    pub result: Digest,
    pub result_size: u64,
    pub action: LayerAction,
}

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The descriptor of what the destination reference now points at.
    pub root: Descriptor,
    /// Image manifests written.
    pub manifests: usize,
    /// Each distinct source layer, once.
    pub layers: Vec<LayerSummary>,
    /// The SOCI index written (`--soci`), which `root` leads to.
    pub soci_index: Option<Descriptor>,
}

struct Converter<'a> {
    src: Src,
    dst: Dst,
    opts: &'a ConvertOptions,
    progress: &'a Progress,
    /// Source layer digest → result, so a layer shared by platforms converts once.
    done: HashMap<Digest, (LayerResult, LayerAction)>,
    layers: Vec<LayerSummary>,
    manifests: usize,
}

/// Converts the image at `src` and writes it to `dst`.
pub async fn convert_image(
    src: &Location,
    dst: &Location,
    opts: &ConvertOptions,
    progress: &Progress,
) -> Result<Summary> {
    if opts.all_platforms && !opts.platforms.is_empty() {
        return Err(Error::BadOption(
            "--all-platforms and --platform exclude each other".into(),
        ));
    }
    let mut c = Converter {
        src: Src::open(src, opts.plain_http).await?,
        dst: Dst::open(dst, opts.plain_http).await?,
        opts,
        progress,
        done: HashMap::new(),
        layers: Vec::new(),
        manifests: 0,
    };
    let (root_desc, root_bytes) = c.src.root().await?;
    let (root, bytes) =
        match oci::parse_object(&root_bytes, &root_desc.media_type, &root_desc.digest)? {
            Object::Manifest(m) => c.manifest(&root_desc, &root_bytes, *m).await?,
            Object::Index(index) => c.index(&root_desc, &root_bytes, index).await?,
        };
    c.dst.finish(&root, &bytes).await?;
    progress.message(&format!("wrote {} ({})", root.digest, root.media_type));
    Ok(Summary {
        root,
        manifests: c.manifests,
        layers: c.layers,
        soci_index: None,
    })
}

impl Converter<'_> {
    fn format(&self) -> OutputFormat {
        self.opts.writer.format
    }

    /// An index: convert the chosen platforms; write an index unless one manifest was
    /// asked for.
    async fn index(
        &mut self,
        desc: &Descriptor,
        bytes: &[u8],
        index: Index,
    ) -> Result<(Descriptor, Vec<u8>)> {
        let chosen: Vec<Descriptor> = if self.opts.all_platforms {
            index.manifests.clone()
        } else {
            let wanted = if self.opts.platforms.is_empty() {
                vec![Platform::host()]
            } else {
                self.opts.platforms.clone()
            };
            let mut chosen = Vec::new();
            for p in &wanted {
                let d =
                    oci::choose_platform(&index, p).ok_or_else(|| Error::NoMatchingPlatform {
                        image: self.src.name(),
                        platform: p.to_string(),
                        available: index
                            .manifests
                            .iter()
                            .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
                if !chosen.iter().any(|c: &Descriptor| c.digest == d.digest) {
                    chosen.push(d.clone());
                }
            }
            if let [one] = chosen.as_slice() {
                let child = self.src.object(one).await?;
                let m = match oci::parse_object(&child, &one.media_type, &one.digest)? {
                    Object::Manifest(m) => *m,
                    Object::Index(_) => {
                        return Err(Error::BadManifest {
                            digest: one.digest.clone(),
                            reason: "an index inside an index".into(),
                        });
                    }
                };
                let (mut out, bytes) = self.manifest(one, &child, m).await?;
                out.platform = one.platform.clone();
                return Ok((out, bytes));
            }
            chosen
        };
        let mut new_index = index.clone();
        new_index.manifests.clear();
        let mut changed = !self.opts.all_platforms;
        for child_desc in chosen {
            if !oci::is_manifest_type(&child_desc.media_type) {
                return Err(Error::BadManifest {
                    digest: desc.digest.clone(),
                    reason: format!(
                        "entry {} has media type {:?}: nested indexes are not supported",
                        child_desc.digest, child_desc.media_type
                    ),
                });
            }
            let child = self.src.object(&child_desc).await?;
            let m = match oci::parse_object(&child, &child_desc.media_type, &child_desc.digest)? {
                Object::Manifest(m) => *m,
                Object::Index(_) => {
                    return Err(Error::BadManifest {
                        digest: child_desc.digest.clone(),
                        reason: "an index inside an index".into(),
                    });
                }
            };
            let (out, out_bytes) = self.manifest(&child_desc, &child, m).await?;
            self.dst.put_child(&out_bytes, &out.media_type).await?;
            changed |= out.digest != child_desc.digest;
            new_index.manifests.push(out);
        }
        if !changed {
            return Ok((desc.clone(), bytes.to_vec()));
        }
        if new_index.media_type.as_deref() == Some(DOCKER_MANIFEST_LIST)
            && new_index
                .manifests
                .iter()
                .any(|d| d.media_type == OCI_MANIFEST)
        {
            new_index.media_type = Some(OCI_INDEX.to_string());
        }
        let media_type = new_index
            .media_type
            .clone()
            .unwrap_or_else(|| OCI_INDEX.to_string());
        let out_bytes = oci::to_json(&new_index)?;
        let mut out = desc.clone();
        out.media_type = media_type;
        out.digest = Digest::sha256_of(&out_bytes);
        out.size = out_bytes.len() as u64;
        Ok((out, out_bytes))
    }

    /// One image manifest: layers, config, manifest. Returns the new descriptor (the
    /// source's, with digest, size and media type updated) and bytes; the caller stores
    /// the manifest.
    async fn manifest(
        &mut self,
        desc: &Descriptor,
        bytes: &[u8],
        manifest: Manifest,
    ) -> Result<(Descriptor, Vec<u8>)> {
        self.manifests += 1;
        let config_type = manifest.config.media_type.as_str();
        if config_type != OCI_CONFIG && config_type != oci::DOCKER_CONFIG {
            // An artifact (attestation, signature): nothing to convert.
            self.dst
                .copy_from(&self.src, &manifest.config, "config")
                .await?;
            for l in &manifest.layers {
                self.dst.copy_from(&self.src, l, "blob").await?;
            }
            return Ok((desc.clone(), bytes.to_vec()));
        }
        let config_bytes = self
            .src
            .small(&manifest.config, "config", MAX_CONFIG_SIZE)
            .await?;
        let mut config: serde_json::Value =
            serde_json::from_slice(&config_bytes).map_err(|e| Error::BadConfig {
                digest: manifest.config.digest.clone(),
                reason: format!("not JSON: {e}"),
            })?;
        let diff_ids: Vec<String> = config
            .pointer("/rootfs/diff_ids")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| Error::BadConfig {
                digest: manifest.config.digest.clone(),
                reason: "no rootfs.diff_ids array".into(),
            })?
            .ok_or_else(|| Error::BadConfig {
                digest: manifest.config.digest.clone(),
                reason: "rootfs.diff_ids holds a non-string".into(),
            })?;
        if diff_ids.len() != manifest.layers.len() {
            return Err(Error::BadConfig {
                digest: manifest.config.digest.clone(),
                reason: format!(
                    "{} diff_ids for {} layers",
                    diff_ids.len(),
                    manifest.layers.len()
                ),
            });
        }
        let docker = manifest.media_type.as_deref() == Some(DOCKER_MANIFEST)
            || desc.media_type == DOCKER_MANIFEST;
        // Docker schema 2 has no zstd layer type: a zstd:chunked image becomes OCI.
        let to_oci = docker && self.format() != OutputFormat::Estargz;
        let mut new_layers = Vec::with_capacity(manifest.layers.len());
        let mut new_diff_ids = Vec::with_capacity(diff_ids.len());
        for (l, diff_id) in manifest.layers.iter().zip(&diff_ids) {
            let (mut r, _) = self.layer(l, diff_id).await?;
            if docker && !to_oci && r.desc.media_type == oci::LAYER_GZIP {
                r.desc.media_type = DOCKER_LAYER_GZIP.to_string();
            }
            new_diff_ids.push(serde_json::Value::String(r.diff_id.to_string()));
            new_layers.push(r.desc);
        }
        let unchanged = new_layers == manifest.layers && !to_oci;
        if unchanged {
            self.dst
                .copy_from(&self.src, &manifest.config, "config")
                .await?;
            return Ok((desc.clone(), bytes.to_vec()));
        }
        if let Some(rootfs) = config.get_mut("rootfs").and_then(|v| v.as_object_mut()) {
            rootfs.insert("diff_ids".into(), serde_json::Value::Array(new_diff_ids));
        }
        let config_out = oci::to_json(&config)?;
        let config_digest = self.dst.put_blob(config_out.clone()).await?;
        let mut m = manifest.clone();
        m.config.digest = config_digest;
        m.config.size = config_out.len() as u64;
        m.layers = new_layers;
        let media_type = if to_oci {
            m.config.media_type = OCI_CONFIG.to_string();
            m.media_type = Some(OCI_MANIFEST.to_string());
            OCI_MANIFEST.to_string()
        } else {
            m.media_type.clone().unwrap_or_else(|| {
                if oci::is_manifest_type(&desc.media_type) {
                    desc.media_type.clone()
                } else {
                    OCI_MANIFEST.to_string()
                }
            })
        };
        let out_bytes = oci::to_json(&m)?;
        let mut out = desc.clone();
        out.media_type = media_type;
        out.digest = Digest::sha256_of(&out_bytes);
        out.size = out_bytes.len() as u64;
        Ok((out, out_bytes))
    }

    /// One layer: keep, annotate or convert; stores the result in the destination.
    async fn layer(
        &mut self,
        desc: &Descriptor,
        diff_id: &str,
    ) -> Result<(LayerResult, LayerAction)> {
        if let Some(r) = self.done.get(&desc.digest) {
            return Ok(r.clone());
        }
        let format = self.format();
        let label = format!("layer {}", short(&desc.digest));
        let (result, action) = if oci::layer_compression(&desc.media_type).is_none()
            || desc.other.contains_key("urls")
        {
            // Foreign and non-distributable layers stay where they are.
            if !desc.other.contains_key("urls") {
                self.dst.copy_from(&self.src, desc, "blob").await?;
            }
            self.progress.message(&format!(
                "{label}: media type {} kept as it is",
                desc.media_type
            ));
            (self.kept(desc, diff_id)?, LayerAction::Copied)
        } else if layer::annotated_as(desc, format) {
            self.dst.copy_from(&self.src, desc, "layer").await?;
            self.progress
                .message(&format!("{label}: already {}, kept", format_name(format)));
            (self.kept(desc, diff_id)?, LayerAction::Kept)
        } else {
            let local = self.src.local(desc, "layer").await?;
            let task = self.progress.task(&label, desc.size);
            let file = local.try_clone()?;
            let d = desc.clone();
            let expected = diff_id.to_string();
            let existing = tokio::task::spawn_blocking(move || {
                layer::footer_says(&file, &d, format).map(|e| (e, file))
            })
            .await
            .map_err(|e| Error::Internal(format!("layer task: {e}")))?;
            if let Some((existing, file)) = existing {
                let d = desc.clone();
                let t = task.clone();
                let r = tokio::task::spawn_blocking(move || {
                    layer::annotate_existing(&file, &d, &existing, format, Some(&expected), &t)
                })
                .await
                .map_err(|e| Error::Internal(format!("layer task: {e}")))??;
                self.dst.copy_from(&self.src, desc, "layer").await?;
                task.finish(&format!(
                    "already {}, annotations added",
                    format_name(format)
                ));
                (r, LayerAction::Annotated)
            } else {
                let tmp = self.dst.temp()?;
                let mut out = reopen(&tmp)?;
                let file = local.try_clone()?;
                let d = desc.clone();
                let t = task.clone();
                let writer = self.opts.writer.clone();
                let r = tokio::task::spawn_blocking(move || {
                    layer::convert(&file, &d, Some(&expected), &writer, &mut out, &t)
                })
                .await
                .map_err(|e| Error::Internal(format!("layer task: {e}")))??;
                drop(local);
                self.dst.put_temp(tmp, &r.desc.digest).await?;
                task.finish(&format!(
                    "{} → {} ({})",
                    crate::progress::human(desc.size),
                    short(&r.desc.digest),
                    crate::progress::human(r.desc.size)
                ));
                (r, LayerAction::Converted)
            }
        };
        self.layers.push(LayerSummary {
            source: desc.digest.clone(),
            source_size: desc.size,
            result: result.desc.digest.clone(),
            result_size: result.desc.size,
            action,
        });
        self.done
            .insert(desc.digest.clone(), (result.clone(), action));
        Ok((result, action))
    }

    fn kept(&self, desc: &Descriptor, diff_id: &str) -> Result<LayerResult> {
        Ok(LayerResult {
            desc: desc.clone(),
            diff_id: oci::parse_digest(diff_id)?,
            converted: false,
        })
    }
}

fn short(d: &Digest) -> String {
    format!("{}:{}", d.algorithm().name(), &d.hex()[..12])
}

pub fn format_name(f: OutputFormat) -> &'static str {
    match f {
        OutputFormat::Estargz => "eStargz",
        OutputFormat::ZstdChunked => "zstd:chunked",
        OutputFormat::StargzZstdChunked => "zstd:chunked (stargz form)",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn locations_parse() {
        assert_eq!(
            "oci:/tmp/x:v1".parse::<Location>().unwrap(),
            Location::Layout {
                dir: "/tmp/x".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            "oci:/tmp/x".parse::<Location>().unwrap(),
            Location::Layout {
                dir: "/tmp/x".into(),
                tag: None
            }
        );
        assert_eq!(
            "oci:/a:b/c".parse::<Location>().unwrap(),
            Location::Layout {
                dir: "/a:b/c".into(),
                tag: None
            }
        );
        assert!("oci:".parse::<Location>().is_err());
        assert_eq!(
            "127.0.0.1:5000/a/b:c".parse::<Location>().unwrap(),
            Location::Registry("127.0.0.1:5000/a/b:c".into())
        );
    }
}
