//! The one error type of this crate. Every variant that concerns a request names the host,
//! the repository and the object (digest or tag), and none ever carries a credential or a
//! signed URL's query string.

use std::fmt;
use std::time::Duration;

use estargz::{BlobError, BlobErrorKind};

use crate::Digest;

/// Where a request went: host, repository and object (a digest, a tag or an upload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    // Box<str>, not String: keeps `Error` small enough to pass around by value.
    pub host: Box<str>,
    pub repository: Box<str>,
    pub object: Box<str>,
}

impl Target {
    pub fn new(host: &str, repository: &str, object: impl fmt::Display) -> Self {
        Self {
            host: host.into(),
            repository: repository.into(),
            object: object.to_string().into(),
        }
    }

    pub(crate) fn with_host(&self, host: &str) -> Self {
        Self {
            host: host.into(),
            ..self.clone()
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "host {} repository {} object {}",
            self.host, self.repository, self.object
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),

    #[error("invalid registry configuration: {0}")]
    Config(String),

    /// Connection refused or reset, TLS failure, timeout, body cut short by the peer.
    #[error("{target}: {what}: {reason}")]
    Transport {
        target: Target,
        what: &'static str,
        reason: String,
        timeout: bool,
    },

    #[error("{target}: not found (HTTP 404)")]
    NotFound { target: Target },

    #[error("{target}: unauthorized: {reason}")]
    Unauthorized { target: Target, reason: String },

    /// Any other unexpected status; `retry_after` is the server's Retry-After, if any.
    #[error("{target}: {what}: HTTP {status}{}", detail_suffix(.detail))]
    Status {
        target: Target,
        what: &'static str,
        status: u16,
        detail: String,
        retry_after: Option<Duration>,
    },

    /// The registry answered with something malformed or not what was asked for.
    #[error("{target}: bad response: {reason}")]
    BadResponse { target: Target, reason: String },

    #[error("{target}: body cut short: expected {expected} bytes, got {got}")]
    Truncated {
        target: Target,
        expected: u64,
        got: u64,
    },

    #[error("{target}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        target: Target,
        // Boxed: two digests beside the target would make every `Result` 128 bytes.
        expected: Box<Digest>,
        actual: Box<Digest>,
    },

    #[error("{target}: range {offset}+{len} lies outside the {size}-byte blob")]
    OutOfRange {
        target: Target,
        offset: u64,
        len: u64,
        size: u64,
    },

    #[error("{target}: the server ignores Range requests (answered 200 with the whole blob)")]
    RangeNotSupported { target: Target },

    #[error("{target}: more than {limit} redirects")]
    TooManyRedirects { target: Target, limit: usize },

    #[error("{target}: no manifest for platform {platform} (available: {available})")]
    NoMatchingPlatform {
        target: Target,
        platform: String,
        available: String,
    },

    #[error("{target}: unsupported manifest media type {media_type:?}")]
    UnsupportedMediaType { target: Target, media_type: String },

    #[error("credentials for {registry}: {reason}")]
    Credentials { registry: String, reason: String },

    /// Retries ran out; `last` is the final attempt's error.
    #[error("{last} (gave up after {attempts} attempts in {:.1}s)", .elapsed.as_secs_f64())]
    GaveUp {
        attempts: u32,
        elapsed: Duration,
        last: Box<Error>,
    },
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True when a later attempt of the same request may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } | Error::Truncated { .. } => true,
            Error::Status { status, .. } => *status == 429 || (500..600).contains(status),
            Error::GaveUp { last, .. } => last.is_transient(),
            _ => false,
        }
    }

    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The final error underneath retries.
    pub fn root(&self) -> &Error {
        match self {
            Error::GaveUp { last, .. } => last.root(),
            other => other,
        }
    }

    pub(crate) fn transport(target: &Target, what: &'static str, err: reqwest::Error) -> Self {
        let timeout = err.is_timeout();
        // without_url: a redirected storage URL carries signed query parameters.
        let err = err.without_url();
        let mut reason = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            source = s.source();
        }
        Error::Transport {
            target: target.clone(),
            what,
            reason,
            timeout,
        }
    }

    pub(crate) fn bad(target: &Target, reason: impl Into<String>) -> Self {
        Error::BadResponse {
            target: target.clone(),
            reason: reason.into(),
        }
    }
}

impl From<Error> for BlobError {
    fn from(err: Error) -> Self {
        let kind = match err.root() {
            Error::OutOfRange { .. } => BlobErrorKind::OutOfRange,
            Error::Truncated { .. } => BlobErrorKind::ShortRead,
            e if e.is_transient() => BlobErrorKind::Transient,
            _ => BlobErrorKind::Fatal,
        };
        BlobError::new(kind, err.to_string())
    }
}
