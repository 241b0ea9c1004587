//! The OCI image types the converter rewrites (the registry client's model) and how it
//! parses, chooses among and writes them.

use serde::Serialize;

use crate::error::{Error, Result};

/// The media type names are the workspace's one set, the registry client's.
pub use registry::media_types::{
    DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST,
    LAYER_GZIP, LAYER_TAR, LAYER_ZSTD, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST,
};

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

/// The content digest, platform, descriptor, manifest and index types are the registry
/// client's: one model across the workspace, which keeps the fields it does not know (in
/// `other`) so a conversion never drops content it does not understand, and a converted
/// image is pushed with the same types it was read with.
pub use registry::{
    Descriptor, Digest, Extra, Hasher, ImageIndex as Index, ImageManifest as Manifest, Platform,
};

/// Parses a digest written in a manifest, config or layout.
pub fn parse_digest(s: &str) -> Result<Digest> {
    s.parse()
        .map_err(|e: registry::DigestParseError| Error::BadDigest(e.to_string()))
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

/// The image manifest of `index` to run on `platform` ([`registry::platform::choose`]).
pub fn choose_platform<'a>(index: &'a Index, platform: &Platform) -> Option<&'a Descriptor> {
    let images = index
        .manifests
        .iter()
        // Artifacts (a SOCI index) may name a platform too; they are not images.
        .filter(|d| is_manifest_type(&d.media_type) && !d.other.contains_key("artifactType"));
    registry::platform::choose(platform, images.map(|d| (d, d.platform.as_ref())))
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
        let d = Digest::sha256_of(json);
        let Object::Manifest(m) = parse_object(json, "", &d).unwrap() else {
            panic!("not a manifest")
        };
        let back: serde_json::Value = serde_json::from_slice(&to_json(&m).unwrap()).unwrap();
        let orig: serde_json::Value = serde_json::from_slice(json).unwrap();
        assert_eq!(back, orig);
    }

    #[test]
    fn digests_are_checked() {
        assert!(parse_digest("sha256:abc").is_err());
        assert!(parse_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(parse_digest(&format!("md5:{}", "a".repeat(64))).is_err());
        let d = parse_digest(&format!("sha256:{}", "a".repeat(64))).unwrap();
        assert_eq!(d.hex(), "a".repeat(64));
    }
}
