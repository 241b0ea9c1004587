//! The converter's error type: every variant names the object (layer digest, path,
//! reference) a user needs to find the problem.

use std::path::PathBuf;

use registry::Digest;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("layer {digest}: {source}")]
    Layer {
        digest: Digest,
        #[source]
        source: estargz::Error,
    },

    #[error("layer {digest}: {context}: {source}")]
    LayerIo {
        digest: Digest,
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{what} {digest}: content hashes to {actual}")]
    DigestMismatch {
        what: &'static str,
        digest: Digest,
        actual: Digest,
    },

    #[error("{what} {digest}: the descriptor says {expected} bytes, the content has {actual}")]
    SizeMismatch {
        what: &'static str,
        digest: Digest,
        expected: u64,
        actual: u64,
    },

    #[error(
        "layer {digest}: its uncompressed content hashes to {actual}, but the config's diff_id is {expected}"
    )]
    DiffIdMismatch {
        digest: Digest,
        expected: String,
        actual: Digest,
    },

    #[error("{what} {digest} is missing from {location}")]
    MissingBlob {
        what: &'static str,
        digest: Digest,
        location: String,
    },

    #[error("{what} {digest} is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        what: &'static str,
        digest: Digest,
        size: u64,
        limit: u64,
    },

    #[error("manifest {digest}: {reason}")]
    BadManifest { digest: Digest, reason: String },

    #[error("config {digest}: {reason}")]
    BadConfig { digest: Digest, reason: String },

    /// A digest that does not parse (the message says why).
    #[error("{0}")]
    BadDigest(String),

    #[error("OCI layout {path}: {reason}")]
    Layout { path: PathBuf, reason: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("bad image reference {input:?}: {reason}")]
    BadReference { input: String, reason: String },

    #[error("{image}: no manifest for platform {platform} (the index has: {available})")]
    NoMatchingPlatform {
        image: String,
        platform: String,
        available: String,
    },

    #[error("invalid option: {0}")]
    BadOption(String),

    #[error(transparent)]
    Registry(#[from] registry::Error),

    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn layout(path: &std::path::Path, reason: impl Into<String>) -> Self {
        Error::Layout {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
