//! Test support shared by the integration tests of every crate: real peers (registry,
//! containerd, lazysnapd) started in their own temp dirs on free loopback ports and
//! stopped on drop, by PID.
//!
//! - [`registry`]: docker-registry on a free port; [`registry::push`] uploads an image with curl.
//! - [`containerd`]: containerd (1.6, or 2.x from Debian sid) in a temp dir, a `ctr`
//!   wrapper, thorough cleanup on drop.
//! - [`docker`]: dockerd (Debian sid's) on such a containerd, with a snapshotter as its
//!   storage driver.
//! - [`tls`]: a CA with server and client certificates, made with openssl.
//! - [`image`]: small OCI images (layers from entries, busybox, pre-compressed blobs), as
//!   blobs with digests or as an OCI image layout directory.

pub mod containerd;
pub mod ctr_remote;
pub mod docker;
pub mod image;
pub mod lazysnapd;
pub mod process;
pub mod registry;
pub mod tls;

use std::net::TcpListener;
use std::time::{Duration, Instant};

/// True when running as root. Tests that need root, FUSE or mounts call this first and
/// skip with a clear message otherwise (CI runs as root, so there they always run).
pub fn is_root() -> bool {
    // geteuid(2) cannot fail; its one unsafe call is wrapped below.
    nix_geteuid() == 0
}

#[allow(unsafe_code)]
fn nix_geteuid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Prints why a test is skipped and returns true when it must skip for lack of root.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIP {test}: needs root (mounts, FUSE, containerd); CI runs it as root");
    true
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it next).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Polls `ready` until it returns true or `timeout` passes; no fixed sleeps as synchronisation.
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// The async form of [`wait_until`]: polls `check` until it yields a value or `timeout`
/// passes (then None).
pub async fn wait_for<T>(
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Path of a program on PATH, or an error naming the Debian package that provides it.
pub fn require_program(program: &str, package: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!("{program} not found on PATH: install the Debian package {package}")
}
