//! A lazysnapd started by a test: own root and socket in a temp dir, stopped on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::ChildGuard;

pub struct Lazysnapd {
    pub root: PathBuf,
    pub address: PathBuf,
    binary: PathBuf,
    log: PathBuf,
    extra_args: Vec<String>,
    /// Environment set for the daemon on top of the test's (e.g. `DOCKER_CONFIG`).
    envs: Vec<(String, String)>,
    process: Option<ChildGuard>,
}

impl Lazysnapd {
    /// Starts `binary` (tests pass `env!("CARGO_BIN_EXE_lazysnapd")`) with its root and
    /// socket under `dir`, and waits until the socket accepts connections.
    pub fn start(binary: &Path, dir: &Path) -> anyhow::Result<Lazysnapd> {
        Self::start_with_args(binary, dir, &[])
    }

    pub fn start_with_args(binary: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<Lazysnapd> {
        Self::start_with_env(binary, dir, args, &[])
    }

    /// As [`Lazysnapd::start_with_args`], with `envs` added to the daemon's environment.
    pub fn start_with_env(
        binary: &Path,
        dir: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Lazysnapd> {
        std::fs::create_dir_all(dir)?;
        let mut daemon = Lazysnapd {
            root: dir.join("root"),
            address: dir.join("lazysnap.sock"),
            binary: binary.to_path_buf(),
            log: dir.join("lazysnapd.log"),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            process: None,
        };
        daemon.restart()?;
        Ok(daemon)
    }

    /// Sets (or replaces) a variable of the daemon's environment, for the next `restart`.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.to_string(), value.to_string()));
    }

    /// Runs another binary on the next `restart`: an upgrade.
    pub fn set_binary(&mut self, binary: &Path) {
        self.binary = binary.to_path_buf();
    }

    /// `lazysnapd --unmount-all` on this root: stops the fd holder and unmounts what it
    /// kept alive. The daemon must be stopped.
    pub fn unmount_all(&self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.address)
            .arg("--unmount-all")
            .args(&self.extra_args);
        let out = crate::process::run_with_timeout(cmd, Duration::from_secs(30))?;
        if !out.status.success() {
            anyhow::bail!(
                "lazysnapd --unmount-all failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts the daemon again (after `stop` or `kill`) on the same root and socket.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.process.is_some() {
            anyhow::bail!("lazysnapd is already running");
        }
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.address)
            .args(&self.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
            )
            // The test's own variables win (an empty RUST_LOG lets the config decide).
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        let mut process = ChildGuard::spawn("lazysnapd", cmd, &self.log)?;
        let address = self.address.clone();
        // The snapshots socket may be the fd holder's, kept from the previous run: the
        // status socket (never held) says this daemon is up.
        let status = self.root.join("status.sock");
        let up = crate::wait_until(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&address).is_ok()
                && std::os::unix::net::UnixStream::connect(&status).is_ok()
        });
        process.check_running()?;
        if !up {
            anyhow::bail!(
                "lazysnapd did not open {}; log:\n{}",
                address.display(),
                process.log_tail()
            );
        }
        self.process = Some(process);
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, ChildGuard::pid)
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.signal_and_wait(libc::SIGTERM)
    }

    /// SIGKILL: the crash case.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.signal_and_wait(libc::SIGKILL).map(|_| ())
    }

    pub fn signal_and_wait(&mut self, signal: i32) -> anyhow::Result<std::process::ExitStatus> {
        let mut process = self
            .process
            .take()
            .ok_or_else(|| anyhow::anyhow!("lazysnapd is not running"))?;
        process.signal_and_wait(signal, Duration::from_secs(30))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Lazysnapd {
    fn drop(&mut self) {
        if self.process.is_some() {
            let _ = self.stop();
        }
        // The fd holder it started outlives it by design: stop it the operator's way.
        if let Err(e) = self.unmount_all() {
            eprintln!("{e:#}");
        }
        // Whatever a crashed daemon left mounted under its root must not outlive the test.
        for mount_point in crate::containerd::mounts_under(&self.root) {
            crate::containerd::unmount_detach(&mount_point);
        }
    }
}
