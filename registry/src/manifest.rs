//! Manifests and indexes (OCI and Docker schema2), platform choice, digest-checked fetches.

use std::collections::BTreeMap;

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::body::read_limited;
use crate::client::Client;
use crate::endpoints::Purpose;
use crate::error::{Error, Result, Target};
use crate::media_types::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use crate::platform::Platform;
use crate::reference::{Reference, Repository};
use crate::request::Req;
use crate::retry::status_error;

/// Manifests larger than this are refused (the distribution spec suggests 4 MiB).
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

/// The fields of a descriptor, manifest or index that are not typed here (`urls`,
/// `artifactType`, `subject`, `data`, ...).
pub type Extra = BTreeMap<String, serde_json::Value>;

/// A content descriptor.
///
/// The descriptor, manifest and index model is the workspace's one: the converter
/// re-serialises manifests it did not build, and image digests depend on those bytes, so
/// each struct keeps every field it does not type in `other` and writes it back (after
/// the typed fields, in key order) instead of dropping it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(flatten)]
    pub other: Extra,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            annotations: None,
            platform: None,
            other: Extra::new(),
        }
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }

    /// The `artifactType` of the content described (an artifact such as a SOCI index).
    pub fn artifact_type(&self) -> Option<&str> {
        artifact_type(&self.other)
    }
}

/// An image manifest (OCI or Docker schema2: the same JSON shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub other: Extra,
}

impl ImageManifest {
    /// The manifest's own `artifactType` (an artifact manifest such as a SOCI index).
    pub fn artifact_type(&self) -> Option<&str> {
        artifact_type(&self.other)
    }
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub other: Extra,
}

impl ImageIndex {
    pub fn artifact_type(&self) -> Option<&str> {
        artifact_type(&self.other)
    }
}

fn artifact_type(other: &Extra) -> Option<&str> {
    other
        .get("artifactType")
        .and_then(serde_json::Value::as_str)
}

/// A manifest or index as fetched: the verified bytes, their digest and media type.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub media_type: String,
    pub digest: Digest,
    pub bytes: Bytes,
}

/// What a fetched manifest turned out to be.
#[derive(Debug, Clone)]
pub enum Manifest {
    Image(Box<ImageManifest>),
    Index(ImageIndex),
}

impl FetchedManifest {
    pub fn parse(&self, target: &Target) -> Result<Manifest> {
        let bad = |e: serde_json::Error| Error::bad(target, format!("manifest JSON: {e}"));
        // The media type may come from the header or, failing that, from the JSON itself.
        let media_type = if self.media_type.is_empty()
            || self.media_type == "application/json"
            || self.media_type.starts_with("text/plain")
        {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Probe {
                #[serde(default)]
                media_type: Option<String>,
                #[serde(default)]
                manifests: Option<serde_json::Value>,
            }
            let probe: Probe = serde_json::from_slice(&self.bytes).map_err(bad)?;
            match (probe.media_type, probe.manifests) {
                (Some(m), _) => m,
                (None, Some(_)) => OCI_INDEX.to_string(),
                (None, None) => OCI_MANIFEST.to_string(),
            }
        } else {
            self.media_type.clone()
        };
        match media_type.as_str() {
            OCI_MANIFEST | DOCKER_MANIFEST => Ok(Manifest::Image(Box::new(
                serde_json::from_slice(&self.bytes).map_err(bad)?,
            ))),
            OCI_INDEX | DOCKER_MANIFEST_LIST => Ok(Manifest::Index(
                serde_json::from_slice(&self.bytes).map_err(bad)?,
            )),
            other => Err(Error::UnsupportedMediaType {
                target: target.clone(),
                media_type: other.to_string(),
            }),
        }
    }
}

/// An image resolved to one platform's manifest.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub reference: Reference,
    /// The digest of the manifest (not of the index).
    pub digest: Digest,
    pub media_type: String,
    pub manifest: ImageManifest,
    /// The verified manifest bytes, exactly as the registry served them.
    pub bytes: Bytes,
    /// The index the manifest was chosen from, if the reference named one.
    pub index: Option<(Digest, ImageIndex)>,
}

fn accept_header() -> HeaderValue {
    HeaderValue::from_static(
        "application/vnd.oci.image.index.v1+json, \
         application/vnd.docker.distribution.manifest.list.v2+json, \
         application/vnd.oci.image.manifest.v1+json, \
         application/vnd.docker.distribution.manifest.v2+json",
    )
}

pub(crate) fn pull_scope(repo: &Repository) -> Vec<String> {
    vec![format!("repository:{}:pull", repo.name)]
}

impl Client {
    /// Fetches a manifest or index by tag or digest and checks it against its digest
    /// (the one asked for, else the registry's `Docker-Content-Digest`).
    pub async fn fetch_manifest(&self, repo: &Repository, object: &str) -> Result<FetchedManifest> {
        let expected: Option<Digest> = object.parse().ok();
        let scopes = pull_scope(repo);
        // A tag asks for resolution, a digest only for content.
        let purpose = match expected {
            Some(_) => Purpose::Pull,
            None => Purpose::Resolve,
        };
        let endpoints = self.endpoints(&repo.registry, purpose)?;
        self.on_endpoints(&endpoints, |ep| {
            self.fetch_manifest_at(ep, repo, object, expected.as_ref(), &scopes)
        })
        .await
    }

    async fn fetch_manifest_at(
        &self,
        ep: &crate::endpoints::Endpoint,
        repo: &Repository,
        object: &str,
        expected: Option<&Digest>,
        scopes: &[String],
    ) -> Result<FetchedManifest> {
        let target = Target::new(&ep.host, &repo.name, object);
        let req =
            Req::get(ep.manifest_url(repo, object), scopes).header(header::ACCEPT, accept_header());
        let sent = self.send(ep, &target, req).await?;
        let resp = sent.resp;
        if resp.status() != StatusCode::OK {
            return Err(status_error(resp, &target, "fetching manifest").await);
        }
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
            .unwrap_or_default();
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let bytes = read_limited(resp, &target, MAX_MANIFEST_SIZE).await?;
        let digest = match (expected, &header_digest) {
            (Some(d), _) => d.clone(),
            (None, Some(d)) => d.clone(),
            (None, None) => Digest::sha256_of(&bytes),
        };
        let actual = digest.compute_like(&bytes);
        if actual != digest {
            return Err(Error::DigestMismatch {
                target,
                expected: Box::new(digest),
                actual: Box::new(actual),
            });
        }
        if let (Some(asked), Some(said)) = (expected, header_digest)
            && said.algorithm() == asked.algorithm()
            && &said != asked
        {
            return Err(Error::bad(
                &target,
                format!("Docker-Content-Digest {said} differs from the digest asked for"),
            ));
        }
        Ok(FetchedManifest {
            media_type,
            digest,
            bytes,
        })
    }

    /// Resolves a reference to the manifest for this client's platform.
    pub async fn resolve(&self, reference: &Reference) -> Result<ResolvedImage> {
        let platform = self.platform().clone();
        self.resolve_for(reference, &platform).await
    }

    /// Resolves a reference to the manifest for `platform` (indexes are followed once).
    pub async fn resolve_for(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedImage> {
        let repo = &reference.repository;
        let object = reference.object();
        let top = self.fetch_manifest(repo, &object).await?;
        let target = Target::new(repo.api_host(), &repo.name, &object);
        match top.parse(&target)? {
            Manifest::Image(manifest) => Ok(ResolvedImage {
                manifest: *manifest.clone(),
                reference: reference.clone(),
                digest: top.digest,
                media_type: manifest.media_type.clone().unwrap_or(top.media_type),
                bytes: top.bytes,
                index: None,
            }),
            Manifest::Index(index) => {
                let chosen =
                    choose_platform(&index, platform).ok_or_else(|| Error::NoMatchingPlatform {
                        target: target.clone(),
                        platform: platform.to_string(),
                        available: index
                            .manifests
                            .iter()
                            .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
                let child = self
                    .fetch_manifest(repo, &chosen.digest.to_string())
                    .await?;
                let child_target = Target::new(repo.api_host(), &repo.name, &chosen.digest);
                let manifest = match child.parse(&child_target)? {
                    Manifest::Image(m) => *m,
                    Manifest::Index(_) => {
                        return Err(Error::bad(&child_target, "an index inside an index"));
                    }
                };
                Ok(ResolvedImage {
                    reference: reference.clone(),
                    digest: child.digest,
                    media_type: manifest.media_type.clone().unwrap_or(child.media_type),
                    manifest,
                    bytes: child.bytes,
                    index: Some((top.digest, index)),
                })
            }
        }
    }
}

/// The image manifest of the index to run on `platform` ([`crate::platform::choose`]).
pub fn choose_platform<'a>(index: &'a ImageIndex, platform: &Platform) -> Option<&'a Descriptor> {
    let images = index
        .manifests
        .iter()
        // An artifact (a SOCI index, an attestation) may name a platform too; it is not
        // an image to run.
        .filter(|d| d.media_type == OCI_MANIFEST || d.media_type == DOCKER_MANIFEST)
        .filter(|d| d.artifact_type().is_none());
    crate::platform::choose(platform, images.map(|d| (d, d.platform.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(media_type: &str, platform: Option<&str>, data: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: Digest::sha256_of(data),
            size: data.len() as u64,
            annotations: None,
            platform: platform.map(|p| Platform::parse(p).unwrap()),
            other: Default::default(),
        }
    }

    #[test]
    fn platform_choice() {
        let index = ImageIndex {
            schema_version: 2,
            media_type: Some(OCI_INDEX.into()),
            other: Default::default(),
            manifests: vec![
                desc("application/vnd.in-toto+json", Some("linux/amd64"), b"att"),
                desc(OCI_MANIFEST, Some("linux/arm/v6"), b"armv6"),
                desc(OCI_MANIFEST, Some("linux/arm/v7"), b"armv7"),
                desc(DOCKER_MANIFEST, Some("linux/arm64"), b"arm64"),
                desc(OCI_MANIFEST, Some("linux/amd64"), b"amd64"),
            ],
            annotations: None,
        };
        let pick = |p: &str| {
            choose_platform(&index, &Platform::parse(p).unwrap()).map(|d| d.digest.clone())
        };
        assert_eq!(pick("linux/amd64"), Some(Digest::sha256_of(b"amd64")));
        assert_eq!(pick("linux/arm64/v8"), Some(Digest::sha256_of(b"arm64")));
        assert_eq!(pick("linux/arm/v7"), Some(Digest::sha256_of(b"armv7")));
        assert_eq!(pick("linux/arm"), Some(Digest::sha256_of(b"armv7")));
        assert_eq!(pick("linux/arm/v6"), Some(Digest::sha256_of(b"armv6")));
        assert_eq!(pick("windows/amd64"), None);
        assert_eq!(pick("linux/s390x"), None);
    }

    #[test]
    fn untyped_fields_are_kept_byte_for_byte() {
        // Typed fields first, the others after them in key order (and untyped objects with
        // their keys in order): what the converter writes back for manifests it did not
        // build.
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"c","digest":"{}","size":1,"annotations":{{"a":"b"}},"data":"e30=","urls":["u"]}},"layers":[],"artifactType":"x","subject":{{"digest":"{}","mediaType":"m","size":2}}}}"#,
            Digest::sha256_of(b"c"),
            Digest::sha256_of(b"s"),
        );
        let m: ImageManifest = serde_json::from_str(&json).unwrap();
        assert_eq!(m.artifact_type(), Some("x"));
        assert_eq!(m.config.other["urls"], serde_json::json!(["u"]));
        assert_eq!(serde_json::to_string(&m).unwrap(), json);
    }

    #[test]
    fn host_platform_is_sane() {
        let p = Platform::host();
        assert_eq!(p.os, std::env::consts::OS);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(p.to_string(), "linux/amd64");
        }
    }

    #[test]
    fn manifest_kinds_from_header_or_body() {
        let target = Target::new("h", "r", "t");
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": Digest::sha256_of(b"c").to_string(), "size": 1},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "digest": Digest::sha256_of(b"l").to_string(), "size": 1,
                        "annotations": {"containerd.io/snapshot/stargz/toc.digest": "x"}}]
        });
        let bytes = Bytes::from(serde_json::to_vec(&manifest).unwrap());
        let fetched = FetchedManifest {
            media_type: "application/json".into(),
            digest: Digest::sha256_of(&bytes),
            bytes,
        };
        match fetched.parse(&target).unwrap() {
            Manifest::Image(m) => {
                assert_eq!(m.layers.len(), 1);
                assert_eq!(
                    m.layers[0].annotations.as_ref().unwrap()["containerd.io/snapshot/stargz/toc.digest"],
                    "x"
                );
            }
            Manifest::Index(_) => panic!("parsed as an index"),
        }
        let index = FetchedManifest {
            media_type: String::new(),
            digest: Digest::sha256_of(b"{}"),
            bytes: Bytes::from_static(br#"{"schemaVersion":2,"manifests":[]}"#),
        };
        assert!(matches!(index.parse(&target).unwrap(), Manifest::Index(_)));
        let schema1 = FetchedManifest {
            media_type: "application/vnd.docker.distribution.manifest.v1+prettyjws".into(),
            digest: Digest::sha256_of(b"{}"),
            bytes: Bytes::from_static(b"{}"),
        };
        let err = schema1.parse(&target).unwrap_err().to_string();
        assert!(err.contains("unsupported manifest media type"), "{err}");
    }
}
