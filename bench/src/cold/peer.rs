//! The benchmark's peer: stargz-snapshotter's snapshots service, built from Debian's
//! packaged Go library by `bench/peer/build.sh` (a small `main` of ours in
//! `bench/peer/stargz/`). One fresh daemon per run, on an empty root (cold cache), with
//! stargz-snapshotter's default settings plus the resolver entry that reaches the
//! bench's plain-HTTP registry.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use testkit::process::ChildGuard;

/// The peer binary's file name, next to lazysnap-bench in the release directory.
pub const BINARY: &str = "lazysnap-bench-stargz";

/// The build script, from the source tree this bench was built from.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peer/build.sh")
}

/// Builds the peer into `out` with `bench/peer/build.sh` (Go in GOPATH mode against
/// /usr/share/gocode: no module downloads).
pub fn build(out: &Path) -> anyhow::Result<()> {
    let script = build_script();
    if !script.is_file() {
        bail!("{} is missing", script.display());
    }
    let status = Command::new("sh")
        .arg(&script)
        .arg(out)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!(
            "{} {} failed ({status}); it needs golang-go and golang-github-containerd-stargz-snapshotter-dev",
            script.display(),
            out.display()
        );
    }
    Ok(())
}

/// stargz-snapshotter's configuration for the bench: its defaults (prefetch, background
/// fetch, cache), and plain HTTP to the bench's registry. Its resolver tries the
/// configured mirrors first, then the host itself over HTTPS; the mirror is the host.
pub fn config(registry_host: &str) -> String {
    format!(
        "# lazysnap-bench: stargz-snapshotter's defaults, plus plain HTTP to the bench's registry.\n\
         [[resolver.host.\"{registry_host}\".mirrors]]\nhost = \"{registry_host}\"\ninsecure = true\n"
    )
}

/// A running peer daemon; stopped (SIGTERM: it unmounts its layers) on drop, and
/// anything left mounted under its directory is unmounted.
pub struct StargzPeer {
    pub address: PathBuf,
    pub root: PathBuf,
    dir: PathBuf,
    process: Option<ChildGuard>,
}

impl StargzPeer {
    /// Starts `binary` with its socket, root, config and log under `dir`; waits until the
    /// socket accepts connections.
    pub fn start(binary: &Path, dir: &Path, registry_host: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("stargz.toml");
        std::fs::write(&config, self::config(registry_host))?;
        let address = dir.join("stargz.sock");
        let root = dir.join("stargz-root");
        let mut cmd = Command::new(binary);
        cmd.arg("--address")
            .arg(&address)
            .arg("--root")
            .arg(&root)
            .arg("--config")
            .arg(&config);
        let mut process = ChildGuard::spawn("stargz-snapshotter", cmd, &dir.join("stargz.log"))?;
        let up = testkit::wait_until(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&address).is_ok()
        });
        process.check_running()?;
        if !up {
            bail!(
                "stargz-snapshotter did not open {}; log:\n{}",
                address.display(),
                process.log_tail()
            );
        }
        Ok(Self {
            address,
            root,
            dir: dir.to_path_buf(),
            process: Some(process),
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stargz.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, ChildGuard::pid)
    }

    /// FUSE mounts of this peer's layers now (mount points under its root).
    pub fn fuse_mounts(&self) -> usize {
        fusefs::mountinfo::mounts()
            .iter()
            .filter(|m| m.fs_type.starts_with("fuse") && m.mount_point.starts_with(&self.root))
            .count()
    }
}

impl Drop for StargzPeer {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take()
            && let Err(e) = process.signal_and_wait(libc::SIGTERM, Duration::from_secs(30))
        {
            eprintln!("lazysnap-bench: stopping stargz-snapshotter: {e:#}");
        }
        for mount_point in testkit::containerd::mounts_under(&self.dir) {
            testkit::containerd::unmount_detach(&mount_point);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reaches_the_registry_over_plain_http_and_keeps_the_defaults() {
        let c = config("10.213.77.2:5000");
        assert!(c.contains("[[resolver.host.\"10.213.77.2:5000\".mirrors]]"));
        assert!(c.contains("insecure = true"));
        // Nothing else is set: prefetch, background fetch and the cache are stargz's own.
        assert!(!c.contains("noprefetch") && !c.contains("no_background_fetch"));
    }
}
