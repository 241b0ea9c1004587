//! Wiring of the lazysnap programs: configuration, the daemon's lifecycle.

pub mod authority;
pub mod config;
pub mod containerd;
pub mod credential_plugins;
pub mod cri;
pub mod fetch;
pub mod keychain;
pub mod listener;
pub mod observe;
pub mod optimize;
pub mod reload;
pub mod rpull;
pub mod server;
