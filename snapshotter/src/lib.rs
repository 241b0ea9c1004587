//! containerd snapshot semantics, the metadata store and the snapshots gRPC service.

mod error;
pub mod filter;
mod fsutil;
pub mod proto;
pub mod service;
mod snapshots;
mod store;
mod types;

pub use error::{Error, Result};
pub use snapshots::Snapshotter;
pub use types::{Info, Kind, Labels, Mount, UpdateField, Usage};
