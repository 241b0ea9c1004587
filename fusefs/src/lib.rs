//! A read-only filesystem over one eStargz / zstd:chunked layer whose bytes are fetched
//! on demand through a [`estargz::BlobReader`].
//!
//! - [`LayerFs`]: the core (inodes, attributes, directories, xattrs, reads) with no FUSE
//!   in it, unit-tested without root.
//! - [`mount`] / [`MountedLayer`] / [`adopt`]: the FUSE edge (our own protocol loop over
//!   `/dev/fuse`), the mount's lifetime and its handover to a successor process.
//! - [`SharedCache`]: the daemon-wide chunk cache (memory and disk, bounded in bytes,
//!   keyed by chunk digest, verified on load).
//!
//! Reads fetch only the chunks they need, coalescing neighbours into one range request
//! and sharing fetches already in flight; every chunk is verified against its TOC
//! digest before anyone sees it. Sequential readers get growing read-ahead; after
//! mounting, the prioritized files are prefetched in order (in requests of at most
//! `prefetch_request_bytes`, a few in flight) and the rest of the layer follows in the
//! background, in small requests, only while the registry host's [`Link`] is quiet:
//! demand reads first, then prefetch, then background.

mod buffers;
mod cache;
mod config;
mod core;
mod elf;
mod error;
mod fetch;
mod fuse;
pub mod heap;
mod histogram;
mod kernel;
mod link;
mod lru;
pub mod mountinfo;
mod pieces;
pub mod pyc;
mod stats;
#[cfg(test)]
mod tests;

pub use cache::{CacheConfig, CacheWriteStats, SharedCache};
pub use config::FsConfig;
pub use core::{
    Attr, Backing, DirEntry, FileAccess, FileKind, LayerFs, OPAQUE_XATTR, OwnReads, PendingRead,
    ReadStart, StatFs, XattrReply,
};
pub use error::{Error, Result};
pub use fetch::{FetchedNow, Libraries, LibraryLookup};
pub use fuse::{Handover, MountedLayer, RequestSink, adopt, mount, mount_device};
pub use histogram::OpHistogram;
pub use link::{Link, Links};
pub use stats::Stats;
