//! containerd snapshot semantics, the metadata store and the snapshots gRPC service.

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
pub use snapshots::{RemoteSnapshot, Snapshotter};
pub use types::{Info, Kind, Labels, Mount, UpdateField, Usage};
