//! A real containerd (Debian's 1.6) with its own config, root, state and socket in a temp
//! dir; stopped on drop, with whatever it left mounted unmounted and its dirs removed.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use testkit::containerd::{Containerd, ContainerdOptions};
//! let options = ContainerdOptions::default()
//!     .proxy_snapshotter("lazysnap", std::path::Path::new("/tmp/x/lazysnap.sock"));
//! let containerd = Containerd::start_with(&options)?;
//! containerd.ctr(["image", "pull", "--plain-http", "127.0.0.1:5000/test/busybox:1"])?;
//! let out = containerd.ctr(["run", "--rm", "127.0.0.1:5000/test/busybox:1", "c1", "echo", "hi"])?;
//! assert!(out.contains("hi"));
//! # Ok(())
//! # }
//! ```

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::process::{ChildGuard, run_with_timeout, send_signal};

/// Unix socket paths are limited to 108 bytes (sun_path); stay well below.
const MAX_SOCKET_PATH: usize = 100;

/// How long `ctr` may take unless the caller says otherwise (pulls of big images included).
pub const DEFAULT_CTR_TIMEOUT: Duration = Duration::from_secs(120);

/// The default runc root of containerd 1.6's runc shim: fixed, outside our temp dir.
const RUNC_ROOT: &str = "/run/containerd/runc";

/// Plugins a test never needs: other snapshotters (they only probe and log errors), tracing.
const ALWAYS_DISABLED: &[&str] = &[
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
];

const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";

/// A proxy snapshotter that containerd reaches over gRPC (`[proxy_plugins.NAME]`).
#[derive(Clone, Debug)]
pub struct ProxySnapshotter {
    pub name: String,
    /// Path of the snapshotter's unix socket.
    pub address: PathBuf,
}

/// How to start containerd; `Default` gives a CRI-less containerd with a fresh namespace.
#[derive(Clone, Debug, Default)]
pub struct ContainerdOptions {
    /// Keep the CRI plugin (`io.containerd.grpc.v1.cri`); it is disabled otherwise.
    pub keep_cri: bool,
    pub proxy_snapshotters: Vec<ProxySnapshotter>,
    /// Namespace that [`Containerd::ctr`] uses; default: unique per instance (`tk<pid>-<n>`),
    /// because runc keeps its state in /run/containerd/runc/NS, shared by every containerd.
    pub namespace: Option<String>,
    /// Raw TOML appended to the generated config.toml (e.g. a `[plugins."..."]` table).
    /// With `keep_cri`, testkit points CRI's CNI dirs into the temp dir unless this text
    /// mentions the CRI plugin, in which case it is the caller's to configure.
    pub extra_config: String,
}

impl ContainerdOptions {
    pub fn keep_cri(mut self) -> Self {
        self.keep_cri = true;
        self
    }

    pub fn proxy_snapshotter(mut self, name: &str, address: &Path) -> Self {
        self.proxy_snapshotters.push(ProxySnapshotter {
            name: name.to_string(),
            address: address.to_path_buf(),
        });
        self
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_string());
        self
    }

    pub fn extra_config(mut self, toml: &str) -> Self {
        self.extra_config.push_str(toml);
        self.extra_config.push('\n');
        self
    }
}

pub struct Containerd {
    /// `ctr` with its absolute path, found at start.
    ctr: PathBuf,
    socket: PathBuf,
    namespace: String,
    process: Option<ChildGuard>,
    /// Dropped last (after [`Drop::drop`] unmounted what was left): removes everything.
    dir: tempfile::TempDir,
}

/// A TOML basic string (quoted, escaped) for a path or name.
fn toml_string(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn unique_namespace() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "tk{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Containerd {
    /// Starts containerd with the default options.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&ContainerdOptions::default())
    }

    pub fn start_with(options: &ContainerdOptions) -> anyhow::Result<Self> {
        let binary = crate::require_program("containerd", "containerd")?;
        let ctr = crate::require_program("ctr", "containerd")?;
        // containerd starts the shim and the shim runc, both looked up on PATH.
        crate::require_program("containerd-shim-runc-v2", "containerd")?;
        crate::require_program("runc", "runc")?;

        let mut dir = tempfile::Builder::new().prefix("ctd-").tempdir()?;
        if dir.path().join("containerd.sock").as_os_str().len() >= MAX_SOCKET_PATH {
            // A long TMPDIR would make the socket path unusable; /tmp is always short.
            dir = tempfile::Builder::new().prefix("ctd-").tempdir_in("/tmp")?;
        }
        let root = dir.path();
        let socket = root.join("containerd.sock");
        let path_str = |p: &Path| -> anyhow::Result<String> {
            p.to_str()
                .map(str::to_string)
                .with_context(|| format!("temp path {} is not UTF-8", p.display()))
        };

        let mut disabled: Vec<&str> = ALWAYS_DISABLED.to_vec();
        if !options.keep_cri {
            disabled.push(CRI_PLUGIN);
        }
        let disabled: Vec<String> = disabled.iter().map(|p| toml_string(p)).collect();
        let mut config = format!(
            "version = 2\n\
             root = {root}\n\
             state = {state}\n\
             disabled_plugins = [{disabled}]\n\n\
             [grpc]\n  address = {socket}\n\n\
             [ttrpc]\n  address = {ttrpc}\n\n\
             # The opt plugin would otherwise create /opt/containerd.\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt}\n",
            root = toml_string(&path_str(&root.join("root"))?),
            state = toml_string(&path_str(&root.join("state"))?),
            disabled = disabled.join(", "),
            socket = toml_string(&path_str(&socket)?),
            ttrpc = toml_string(&format!("{}.ttrpc", path_str(&socket)?)),
            opt = toml_string(&path_str(&root.join("opt"))?),
        );
        for proxy in &options.proxy_snapshotters {
            config.push_str(&format!(
                "\n[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = {address}\n",
                name = toml_string(&proxy.name),
                address = toml_string(&path_str(&proxy.address)?),
            ));
        }
        if options.keep_cri && !options.extra_config.contains(CRI_PLUGIN) {
            // CRI otherwise creates and watches /etc/cni/net.d on the host.
            config.push_str(&format!(
                "\n[plugins.{cri}.cni]\n  conf_dir = {conf}\n  bin_dir = {bin}\n",
                cri = toml_string(CRI_PLUGIN),
                conf = toml_string(&path_str(&root.join("cni/net.d"))?),
                bin = toml_string(&path_str(&root.join("cni/bin"))?),
            ));
        }
        if !options.extra_config.is_empty() {
            config.push('\n');
            config.push_str(&options.extra_config);
        }
        let config_path = root.join("config.toml");
        std::fs::write(&config_path, config)?;

        let mut cmd = Command::new(binary);
        cmd.arg("--config").arg(&config_path);
        let process = ChildGuard::spawn("containerd", cmd, &root.join("containerd.log"))?;
        let namespace = options.namespace.clone().unwrap_or_else(unique_namespace);
        let mut containerd = Self {
            ctr,
            socket,
            namespace,
            process: Some(process),
            dir,
        };
        containerd.wait_ready(Duration::from_secs(30))?;
        Ok(containerd)
    }

    /// Polls `ctr version` (which needs the gRPC server to answer) until it succeeds.
    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let mut last_error = String::new();
        let mut exited = None;
        let ready = crate::wait_until(timeout, || {
            if let Some(process) = self.process.as_mut()
                && let Err(e) = process.check_running()
            {
                exited = Some(e);
                return true;
            }
            match self.ctr_raw(None, ["version"], Duration::from_secs(5)) {
                Ok(_) => true,
                Err(e) => {
                    last_error = e.to_string();
                    false
                }
            }
        });
        if let Some(e) = exited {
            return Err(e);
        }
        if !ready {
            anyhow::bail!(
                "containerd did not answer on {} within {timeout:?} (last: {last_error}); log:\n{}",
                self.socket.display(),
                self.log_tail()
            );
        }
        Ok(())
    }

    /// The gRPC socket (`ctr --address`, a proxy plugin's client, ...).
    pub fn address(&self) -> &Path {
        &self.socket
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The temp dir holding config.toml, containerd.log, root/ and state/.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().map(ChildGuard::pid).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        self.process
            .as_ref()
            .map(ChildGuard::log_tail)
            .unwrap_or_default()
    }

    /// Runs `ctr --address SOCK --namespace NS ARGS...` with [`DEFAULT_CTR_TIMEOUT`]; returns
    /// stdout, or an error with the command, its stderr and containerd's log tail.
    pub fn ctr<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ctr_timeout(args, DEFAULT_CTR_TIMEOUT)
    }

    /// Runs `image` as a throwaway container named `name` on `snapshotter`, again until
    /// its output contains `text` or `timeout` passes (after a lazysnapd restart
    /// containerd redials with back-off, so the first tries may fail); true if it did.
    pub fn runs_and_prints(
        &self,
        snapshotter: &str,
        image: &str,
        name: &str,
        text: &str,
        timeout: Duration,
    ) -> bool {
        crate::wait_until(timeout, || {
            self.ctr(["run", "--rm", "--snapshotter", snapshotter, image, name])
                .is_ok_and(|out| out.contains(text))
        })
    }

    pub fn ctr_timeout<I, S>(&self, args: I, timeout: Duration) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let namespace = self.namespace.clone();
        self.ctr_raw(Some(&namespace), args, timeout)
            .map_err(|e| anyhow::anyhow!("{e}\ncontainerd log tail:\n{}", self.log_tail()))
    }

    fn ctr_raw<I, S>(
        &self,
        namespace: Option<&str>,
        args: I,
        timeout: Duration,
    ) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address").arg(&self.socket);
        if let Some(namespace) = namespace {
            cmd.arg("--namespace").arg(namespace);
        }
        cmd.args(args);
        let what = format!("{cmd:?}");
        let output = run_with_timeout(cmd, timeout)?;
        if !output.status.success() {
            anyhow::bail!(
                "{what} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Mount points under this containerd's temp dir, deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        mounts_under(self.dir.path())
    }

    /// Kills and deletes every task (in every namespace) so no container outlives the test;
    /// returns the namespaces containerd knew, whose host-wide leftovers drop() removes.
    fn remove_tasks(&self) -> Vec<String> {
        let quick = Duration::from_secs(20);
        let mut namespaces = vec![self.namespace.clone()];
        if let Ok(listed) = self.ctr_raw(None, ["namespaces", "ls", "-q"], quick) {
            namespaces.extend(listed.lines().map(str::trim).map(str::to_string));
        }
        namespaces.retain(|ns| !ns.is_empty());
        namespaces.sort();
        namespaces.dedup();
        for ns in &namespaces {
            let Ok(tasks) = self.ctr_raw(Some(ns), ["tasks", "ls", "-q"], quick) else {
                continue;
            };
            for task in tasks.lines().map(str::trim).filter(|l| !l.is_empty()) {
                // --force kills a running task before deleting it; the shim then exits.
                let _ = self.ctr_raw(Some(ns), ["tasks", "delete", "--force", task], quick);
            }
        }
        namespaces
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // A crashed containerd cannot answer ctr; asking would only wait for ctr's timeouts.
        let alive = self
            .process
            .as_mut()
            .is_some_and(|p| p.check_running().is_ok());
        let namespaces = if alive {
            self.remove_tasks()
        } else {
            vec![self.namespace.clone()]
        };
        if let Some(mut process) = self.process.take() {
            // SIGTERM lets containerd close its snapshotters and bolt DBs; SIGKILL after 10 s.
            let _ = process.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
        }
        // Shims reparent to init, so they are not our children; find any left by their
        // `-address` argument (our socket) and kill them by PID.
        for pid in shims_of(&self.socket) {
            send_signal(pid, libc::SIGKILL);
            crate::wait_until(Duration::from_secs(5), || !process_alive(pid));
        }
        for mount in mounts_under(self.dir.path()) {
            unmount_detach(&mount);
        }
        // runc keeps per-namespace state and cgroups (`/<ns>/<id>`) host-wide, outside our
        // temp dir. rmdir only removes empty dirs and idle cgroups, so a namespace another
        // containerd is using is left alone.
        for ns in &namespaces {
            let _ = std::fs::remove_dir(Path::new(RUNC_ROOT).join(ns));
            for hierarchy in cgroup_mounts() {
                remove_empty_dirs(&hierarchy.join(ns));
            }
        }
        // `dir` (the TempDir) is dropped after this and removes the tree.
    }
}

/// Mount points of cgroup (v1 and v2) hierarchies.
fn cgroup_mounts() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let mount = left.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| PathBuf::from(snapshotter::fsutil::unescape_mountinfo(mount)))
        })
        .collect()
}

/// rmdir `dir` after its subdirectories, deepest first; stops quietly at anything non-empty.
fn remove_empty_dirs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Mount points at or under `dir`, deepest first (the snapshotter's own reading of
/// /proc/self/mountinfo).
pub use snapshotter::fsutil::mounts_under;

/// Lazily unmounts `path` (MNT_DETACH: succeeds even if something still has it open);
/// best effort, for cleanup.
pub fn unmount_detach(path: &Path) {
    let _ = snapshotter::fsutil::unmount_detach(path);
}

/// PIDs of containerd-shim processes started for the containerd at `socket`.
pub fn shims_of(socket: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let socket = socket.as_os_str().as_encoded_bytes();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_shim = args
                .first()
                .is_some_and(|a| a.windows(15).any(|w| w == b"containerd-shim"));
            is_shim
                && args
                    .windows(2)
                    .any(|pair| pair[0] == b"-address" && pair[1] == socket)
        })
        .collect()
}

/// True while `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn our_own_process_is_alive() {
        assert!(process_alive(std::process::id()));
    }
}
