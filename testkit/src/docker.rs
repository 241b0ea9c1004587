//! A real dockerd: Debian sid's Docker Engine (unpacked by `fetch_sid_runtimes`, see
//! `scripts/lib.sh`) on a containerd the test started, with the containerd image store on
//! and a containerd snapshotter as its storage driver. Its data root, exec root, pidfile,
//! socket and the CLI's config dir are in a temp dir; no bridge and no iptables rules, so
//! the host's network and any system Docker stay untouched. Stopped (by PID) on drop.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::containerd::{Containerd, mounts_under, runtimes_dir, unmount_detach};
use crate::process::{ChildGuard, run_with_timeout, stdout_of};

/// How long a `docker` command may take unless the caller says otherwise.
pub const DEFAULT_DOCKER_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Dockerd {
    docker: PathBuf,
    socket: PathBuf,
    /// The CLI's `DOCKER_CONFIG` (credentials from `docker login` land here).
    config_dir: PathBuf,
    process: Option<ChildGuard>,
    dir: tempfile::TempDir,
}

impl Dockerd {
    /// Starts dockerd on `containerd` (which must be 2.x) with `storage_driver`, the name
    /// of one of containerd's snapshotters (a proxy plugin's name). The CLI keeps its
    /// config (`docker login`'s credentials) in `cli_config`, or in the temp dir.
    pub fn start(
        containerd: &Containerd,
        storage_driver: &str,
        cli_config: Option<&Path>,
    ) -> anyhow::Result<Dockerd> {
        let root = runtimes_dir().join("root");
        let dockerd = root.join("usr/sbin/dockerd");
        let docker = root.join("usr/bin/docker");
        if !dockerd.is_file() || !docker.is_file() {
            anyhow::bail!(
                "Docker is not unpacked in {}: run `. scripts/lib.sh; fetch_sid_runtimes` (scripts/test.sh does)",
                runtimes_dir().display()
            );
        }
        let dir = tempfile::Builder::new().prefix("dkr-").tempdir_in("/tmp")?;
        let d = dir.path();
        let socket = d.join("docker.sock");
        let config_dir = cli_config.map_or_else(|| d.join("cli"), Path::to_path_buf);
        std::fs::create_dir_all(&config_dir)?;
        let daemon_json = serde_json::json!({
            "features": { "containerd-snapshotter": true },
            "storage-driver": storage_driver,
        });
        std::fs::write(d.join("daemon.json"), daemon_json.to_string())?;
        let mut cmd = Command::new(&dockerd);
        cmd.arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .arg("--containerd")
            .arg(containerd.address())
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            // No docker0 and no iptables rules on the host; containers run with
            // `--network none` or `--network host`.
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
            .env("PATH", path_with(&root)?);
        let process = ChildGuard::spawn("dockerd", cmd, &d.join("dockerd.log"))?;
        let mut dockerd = Dockerd {
            docker,
            socket,
            config_dir,
            process: Some(process),
            dir,
        };
        let mut last = String::new();
        let ready = crate::wait_until(Duration::from_secs(60), || {
            if let Some(p) = dockerd.process.as_mut()
                && p.check_running().is_err()
            {
                return true;
            }
            match dockerd.docker_timeout(["version"], Duration::from_secs(10)) {
                Ok(_) => true,
                Err(e) => {
                    last = e.to_string();
                    false
                }
            }
        });
        if let Some(p) = dockerd.process.as_mut() {
            p.check_running()?;
        }
        if !ready {
            anyhow::bail!("dockerd did not answer: {last}\n{}", dockerd.log());
        }
        Ok(dockerd)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The CLI's config dir (`DOCKER_CONFIG`).
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// `docker ARGS...` against this daemon; stdout, or an error with stderr.
    pub fn docker<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.docker_timeout(args, DEFAULT_DOCKER_TIMEOUT)
    }

    /// `docker ARGS...` with stdin from `input`.
    pub fn docker_with_stdin<I, S>(&self, args: I, input: &[u8]) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(args);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let what = format!("{cmd:?}");
        let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("no stdin")?;
            stdin.write_all(input)?;
        }
        let output = child.wait_with_output()?;
        stdout_of(&what, output)
    }

    pub fn docker_timeout<I, S>(&self, args: I, timeout: Duration) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let cmd = self.command(args);
        let what = format!("{cmd:?}");
        let output = run_with_timeout(cmd, timeout)?;
        stdout_of(&what, output)
    }

    fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.docker);
        cmd.env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", &self.config_dir)
            // The CLI's own build path: BuildKit would need the buildx plugin.
            .env("DOCKER_BUILDKIT", "0")
            .args(args);
        cmd
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Ok(ids) = self.docker_timeout(["ps", "-aq"], Duration::from_secs(20)) {
            for id in ids.split_whitespace() {
                let _ = self.docker_timeout(["rm", "-f", id], Duration::from_secs(20));
            }
        }
        if let Some(mut process) = self.process.take() {
            let _ = process.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
        }
        for mount in mounts_under(self.dir.path()) {
            unmount_detach(&mount);
        }
    }
}

/// PATH with the unpacked runtimes' bin dirs first (dockerd runs docker-init, docker-proxy).
fn path_with(root: &Path) -> anyhow::Result<std::ffi::OsString> {
    let mut dirs = vec![root.join("usr/bin"), root.join("usr/sbin")];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    Ok(std::env::join_paths(dirs)?)
}
