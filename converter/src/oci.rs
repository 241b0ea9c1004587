//! The OCI image types the converter rewrites. Every struct keeps the fields it does not
//! know in `other`, so a conversion never drops content it does not understand.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// `org.opencontainers.image.ref.name`: the tag of a manifest in an OCI layout.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Manifests, indexes and configs larger than this are refused.
pub const MAX_METADATA_SIZE: u64 = 4 << 20;

/// How a layer blob is compressed, as its media type says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

/// The compression of a layer media type, or `None` when it is not a layer we convert
/// (foreign / non-distributable layers, artifacts, encrypted layers).
pub fn layer_compression(media_type: &str) -> Option<LayerCompression> {
    match media_type {
        LAYER_TAR | DOCKER_LAYER_TAR => Some(LayerCompression::None),
        LAYER_GZIP | DOCKER_LAYER_GZIP => Some(LayerCompression::Gzip),
        LAYER_ZSTD => Some(LayerCompression::Zstd),
        _ => None,
    }
}

/// A sha256 digest as written in descriptors: `sha256:<64 lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| Error::BadDigest(s.to_string()))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Error::BadDigest(s.to_string()));
        }
        Ok(Digest(s.to_string()))
    }

    pub fn of(data: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(data))
    }

    pub fn from_hasher(h: Sha256) -> Self {
        Digest(format!("sha256:{:x}", h.finalize()))
    }

    /// The 64 hex digits (the file name in an OCI layout).
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl From<estargz::Digest> for Digest {
    fn from(d: estargz::Digest) -> Self {
        Digest(d.to_string())
    }
}

pub type Extra = BTreeMap<String, serde_json::Value>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl Platform {
    /// `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(Error::BadOption(format!(
                "platform {s:?} is not os/arch[/variant]"
            )));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
            other: BTreeMap::new(),
        })
    }

    /// This machine's platform, in OCI's names.
    pub fn host() -> Self {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            other => (other, None),
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: arch.to_string(),
            variant: variant.map(str::to_string),
            other: BTreeMap::new(),
        }
    }

    /// Whether an image for `candidate` satisfies a request for `self`; a missing
    /// variant on either side matches (arm64 and v8 are the same thing).
    pub fn matches(&self, candidate: &Platform) -> bool {
        self.os == candidate.os
            && self.architecture == candidate.architecture
            && (self.variant.is_none()
                || candidate.variant.is_none()
                || self.variant == candidate.variant)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image manifest (OCI or Docker schema 2: the same shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
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

/// An image index (OCI) or manifest list (Docker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub other: Extra,
}

/// A parsed manifest or index.
#[derive(Debug, Clone)]
pub enum Object {
    Manifest(Box<Manifest>),
    Index(Index),
}

pub fn is_manifest_type(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

pub fn is_index_type(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// Parses manifest or index bytes; the media type comes from the descriptor (or the
/// registry), else from the JSON's own `mediaType`, else from its shape.
pub fn parse_object(bytes: &[u8], media_type: &str, digest: &Digest) -> Result<Object> {
    let bad = |reason: String| Error::BadManifest {
        digest: digest.clone(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let own = value.get("mediaType").and_then(|v| v.as_str());
    let kind = if is_manifest_type(media_type) || is_index_type(media_type) {
        media_type
    } else if let Some(own) = own {
        own
    } else if value.get("manifests").is_some() {
        OCI_INDEX
    } else {
        OCI_MANIFEST
    };
    if is_manifest_type(kind) {
        let m: Manifest =
            serde_json::from_value(value).map_err(|e| bad(format!("manifest JSON: {e}")))?;
        Ok(Object::Manifest(Box::new(m)))
    } else if is_index_type(kind) {
        let i: Index =
            serde_json::from_value(value).map_err(|e| bad(format!("index JSON: {e}")))?;
        Ok(Object::Index(i))
    } else {
        Err(bad(format!("unsupported media type {kind:?}")))
    }
}

/// The manifest of `index` for `platform`: an exact variant first, then a compatible one.
pub fn choose_platform<'a>(index: &'a Index, platform: &Platform) -> Option<&'a Descriptor> {
    let candidates: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| is_manifest_type(&d.media_type))
        .filter(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
        .collect();
    candidates
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.variant == platform.variant)
        })
        .or_else(|| candidates.first())
        .copied()
}

/// Serialises a manifest, index or config the way registries expect (compact JSON).
pub fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Internal(format!("serialising JSON: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let json = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"x","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2,"urls":["u"]},"layers":[],"subject":{"k":1}}"#;
        let d = Digest::of(json);
        let Object::Manifest(m) = parse_object(json, "", &d).unwrap() else {
            panic!("not a manifest")
        };
        let back: serde_json::Value = serde_json::from_slice(&to_json(&m).unwrap()).unwrap();
        let orig: serde_json::Value = serde_json::from_slice(json).unwrap();
        assert_eq!(back, orig);
    }

    #[test]
    fn digests_are_checked() {
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(Digest::parse(&format!("md5:{}", "a".repeat(64))).is_err());
        let d = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
        assert_eq!(d.hex(), "a".repeat(64));
        assert_eq!(
            Digest::of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn platforms_match_with_optional_variants() {
        let arm = Platform::parse("linux/arm64").unwrap();
        let v8 = Platform::parse("linux/arm64/v8").unwrap();
        assert!(arm.matches(&v8) && v8.matches(&arm));
        assert!(!Platform::parse("linux/amd64").unwrap().matches(&v8));
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux//v7").is_err());
        assert_eq!(v8.to_string(), "linux/arm64/v8");
    }
}
