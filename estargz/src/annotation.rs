//! Annotations on a layer's descriptor that mark it eStargz or zstd:chunked and pin
//! its TOC: the writer sets them, and the snapshotter reads them to pick the layers
//! it mounts lazily.

/// Layer annotation: sha256 of the uncompressed TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation: size of the uncompressed tar stream.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// containers/storage zstd:chunked annotations.
pub const MANIFEST_CHECKSUM_ANNOTATION: &str =
    "io.github.containers.zstd-chunked.manifest-checksum";
pub const MANIFEST_POSITION_ANNOTATION: &str =
    "io.github.containers.zstd-chunked.manifest-position";
pub const TARSPLIT_POSITION_ANNOTATION: &str =
    "io.github.containers.zstd-chunked.tarsplit-position";
/// The older names stargz-snapshotter's zstd:chunked converter writes.
pub const LEGACY_MANIFEST_CHECKSUM_ANNOTATION: &str =
    "io.containers.zstd-chunked.manifest-checksum";
pub const LEGACY_MANIFEST_POSITION_ANNOTATION: &str =
    "io.containers.zstd-chunked.manifest-position";
