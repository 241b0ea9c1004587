//! The crate's single error type.

use crate::blob::BlobError;

/// Everything that can go wrong while reading or writing a layer.
///
/// Variants carry the context a user needs (path, offsets, digests); data from a blob or a
/// TOC never causes a panic, only one of these.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading blob: {0}")]
    Blob(#[from] BlobError),

    #[error("I/O: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("no eStargz, stargz or zstd:chunked footer found in a {blob_size}-byte blob")]
    NoFooter { blob_size: u64 },

    #[error("bad {kind} footer: {reason}")]
    BadFooter { kind: &'static str, reason: String },

    #[error("TOC size {size} bytes exceeds the limit of {limit} bytes")]
    TocTooLarge { size: u64, limit: u64 },

    #[error("bad TOC: {0}")]
    BadToc(String),

    #[error("parsing the TOC was stopped: it ran past its time")]
    Cancelled,

    #[error("TOC digest mismatch: expected {expected}, got {actual}")]
    TocDigestMismatch { expected: String, actual: String },

    #[error("bad digest {0:?}: expected sha256:<64 hex digits>")]
    BadDigest(String),

    #[error("TOC entry {path:?}: {reason}")]
    BadEntry { path: String, reason: String },

    #[error("unsafe path {path:?} in layer: {reason}")]
    UnsafePath { path: String, reason: String },

    #[error("{path:?}: no such entry in layer")]
    NotFound { path: String },

    #[error("{path:?}: not a regular file")]
    NotAFile { path: String },

    #[error("decompressing {what}: {reason}")]
    Decompress { what: String, reason: String },

    #[error(
        "chunk of {path:?} at file offset {file_offset} failed verification: expected {expected}, got {actual}"
    )]
    ChunkVerification {
        path: String,
        file_offset: u64,
        expected: String,
        actual: String,
    },

    #[error("bad tar input at byte {offset}: {reason}")]
    BadTar { offset: u64, reason: String },

    #[error("unsupported tar entry {path:?}: {reason}")]
    UnsupportedTar { path: String, reason: String },

    #[error("invalid writer option: {0}")]
    BadOption(String),

    #[error("prioritized file {path:?} is not in the layer")]
    PrioritizedNotFound { path: String },

    #[error("compression worker failed: {0}")]
    Worker(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn bad_toc(reason: impl Into<String>) -> Self {
        Error::BadToc(reason.into())
    }

    pub fn bad_entry(path: &str, reason: impl Into<String>) -> Self {
        Error::BadEntry {
            path: path.to_string(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
