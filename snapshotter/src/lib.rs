//! containerd's snapshots as lazysnapd serves them: the core (`snapshots`: snapshot
//! semantics over overlayfs and the metadata store, no mounter in it), lazy pulling
//! (`lazy_snapshotter`: the remote-snapshot protocol, one owner of a remote snapshot's
//! life; `fuse_mounter`: finding, verifying and serving layers with FUSE) and the
//! snapshots gRPC service that translates for containerd.

pub mod client;
mod error;
pub mod filter;
pub mod fsutil;
pub mod fuse_mounter;
pub mod holder;
pub mod idmap;
mod idmapped_lowers;
mod layer_source;
pub mod lazy_snapshotter;
pub mod libraries;
pub mod native;
pub mod parse_gate;
pub mod preopen;
pub mod proto;
pub mod remote;
pub mod service;
mod snapshots;
pub mod soci_index;
mod store;
pub mod tocstore;
mod types;

pub use error::{Error, Result};
pub use snapshots::{PreparedForLayer, RemoteSnapshot, Removed, Snapshotter};
pub use types::{Info, Kind, Labels, Mount, UpdateField, Usage};
