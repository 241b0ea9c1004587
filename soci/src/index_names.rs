//! The names a SOCI index is written and found by: its artifact types, the media type of
//! a zTOC in it, and the annotations that tie it to an image and its layers.

/// A v1 index: found among the image manifest's referrers (its `subject`).
pub const SOCI_INDEX_V1: &str = "application/vnd.amazon.soci.index.v1+json";
/// A v2 index: named by the image manifest's [`ANNOTATION_INDEX_DIGEST`].
pub const SOCI_INDEX_V2: &str = "application/vnd.amazon.soci.index.v2+json";
/// The media type of a zTOC in an index.
pub const ZTOC_MEDIA_TYPE: &str = "application/octet-stream";
/// On an image manifest: its SOCI index (v2).
pub const ANNOTATION_INDEX_DIGEST: &str = "com.amazon.soci.index-digest";
/// On a zTOC's (or prefetch artifact's) descriptor: the image layer it is for.
pub const ANNOTATION_LAYER_DIGEST: &str = "com.amazon.soci.image-layer-digest";
pub const ANNOTATION_LAYER_MEDIA_TYPE: &str = "com.amazon.soci.image-layer-mediaType";
pub const ANNOTATION_SPAN_SIZE: &str = "com.amazon.soci.span-size";
pub const ANNOTATION_BUILD_TOOL: &str = "com.amazon.soci.build-tool-identifier";
/// On a v2 index's entry in the image's OCI index: the image manifest it indexes.
pub const ANNOTATION_IMAGE_MANIFEST_DIGEST: &str = "com.amazon.soci.image-manifest-digest";
