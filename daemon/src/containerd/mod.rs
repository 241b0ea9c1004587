//! lazysnap's own containerd client: what `lazysnap rpull` and `lazysnap optimize` need
//! of containerd's API and labels, the way containerd's Go client does it.

pub mod client;
pub mod labels;

pub use client::Containerd;
