//! Blobs in a registry: whole-blob fetches (`fetch`), range reads of a `RemoteBlob`
//! (`remote`, also the [`estargz::BlobReader`] of lazily mounted layers); their bodies
//! are read by `crate::body`.

mod fetch;
mod remote;

use crate::digest::Digest;
use crate::endpoints::Endpoint;
use crate::reference::Repository;

pub use remote::RemoteBlob;

/// When a server ignores `Range` and sends the whole blob, we still use its answer if
/// what we need ends within this many bytes; otherwise the body is dropped at once.
pub const RANGELESS_PREFIX_LIMIT: u64 = 1 << 20;

fn blob_url(ep: &Endpoint, repo: &Repository, digest: &Digest) -> String {
    format!("{}/{}/blobs/{digest}", ep.base, repo.name)
}
