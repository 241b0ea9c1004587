//! Blobs in a registry: whole-blob fetches (`fetch`), range reads of a `RemoteBlob`
//! (`remote`, also the [`estargz::BlobReader`] of lazily mounted layers); their bodies
//! are read by `crate::body`.

mod fetch;
mod remote;

pub use remote::RemoteBlob;

/// When a server ignores `Range` and sends the whole blob, we still use its answer if
/// what we need ends within this many bytes; otherwise the body is dropped at once.
pub const RANGELESS_PREFIX_LIMIT: u64 = 1 << 20;
