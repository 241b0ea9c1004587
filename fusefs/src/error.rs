//! The crate's single error type and its one translation to errno.

use std::path::PathBuf;

/// Everything the filesystem, its cache and its mount can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such entry")]
    NotFound,

    #[error("not a directory")]
    NotDir,

    #[error("is a directory")]
    IsDir,

    #[error("invalid request: {0}")]
    Invalid(&'static str),

    #[error("read-only filesystem")]
    ReadOnly,

    #[error("no such extended attribute")]
    NoXattr,

    #[error("buffer of {given} bytes is smaller than the {needed} bytes of the reply")]
    Range { given: u32, needed: usize },

    #[error("layer {layer}: fetching blob range {start}..{end}: {reason}")]
    Fetch {
        layer: String,
        start: u64,
        end: u64,
        reason: String,
    },

    #[error("layer {layer}: {source}")]
    Layer {
        layer: String,
        #[source]
        source: estargz::Error,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("mounting {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("unmounting {path}: {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid configuration: {0}")]
    Config(String),

    /// The TOC gives a chunk a length that the chunk with its digest does not have.
    #[error(
        "chunk {digest}: the TOC says {expected} bytes, the chunk with that digest has {found}"
    )]
    ChunkLength {
        digest: String,
        expected: u64,
        found: u64,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno a FUSE reply carries for this error: the only translation point.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound => libc::ENOENT,
            Error::NotDir => libc::ENOTDIR,
            Error::IsDir => libc::EISDIR,
            Error::Invalid(_) | Error::Config(_) => libc::EINVAL,
            Error::ReadOnly => libc::EROFS,
            Error::NoXattr => libc::ENODATA,
            Error::Range { .. } => libc::ERANGE,
            // Whatever went wrong getting or checking bytes, the reader sees EIO, never
            // wrong data.
            Error::Fetch { .. }
            | Error::Layer { .. }
            | Error::ChunkLength { .. }
            | Error::Io { .. }
            | Error::Mount { .. }
            | Error::Unmount { .. } => libc::EIO,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
