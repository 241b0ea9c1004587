//! The snapshotter's errors; mapped to gRPC status codes in exactly one place (`service`).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0:?} does not exist: not found")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}: failed precondition")]
    FailedPrecondition(String),
    #[error("{0}: invalid argument")]
    InvalidArgument(String),
    /// A lazily pulled layer cannot be served now (its registry, most often).
    #[error("{0}")]
    Unavailable(String),
    #[error("metadata store: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches what was being done, and to which path, to an I/O error.
pub(crate) trait IoContext<T> {
    fn io_context(self, context: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_context(self, context: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            context,
            path: path.to_path_buf(),
            source,
        })
    }
}
