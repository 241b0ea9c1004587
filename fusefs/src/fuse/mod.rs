//! The FUSE edge: our own request loop over `/dev/fuse` (protocol in `kernel.rs`) and
//! the mount's lifetime.
//!
//! - `session`: one connection's requests, dispatched to [`LayerFs`](crate::LayerFs)
//!   calls, and their replies;
//! - `passthrough`: which inodes the kernel reads from backing files, and the record
//!   of their ids a successor needs;
//! - `mount`: mounting, adopting a connection another process mounted, handing it
//!   over, unmounting.

mod mount;
mod passthrough;
mod session;

pub use mount::{Handover, MountedLayer, adopt, mount, mount_device};
pub use session::RequestSink;
