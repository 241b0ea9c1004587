//! A real containerd with its own config, root, state and socket in a temp dir; stopped
//! on drop, with whatever it left mounted unmounted and its dirs removed. Which containerd
//! is a [`Release`]: Debian 12's 1.6 by default, or the 2.x from Debian's unstable suite
//! that `scripts/lib.sh` (`fetch_sid_runtimes`) unpacks, with `LAZYSNAP_CONTAINERD=2`.
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

use crate::process::{ChildGuard, run_with_timeout, send_signal, stdout_of};

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
/// containerd 2.x splits CRI into these, beside `CRI_PLUGIN`.
const CRI_PLUGINS_V2: &[&str] = &[
    "io.containerd.cri.v1.images",
    "io.containerd.cri.v1.runtime",
    "io.containerd.podsandbox.controller.v1.podsandbox",
];

/// Which containerd runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Debian 12's containerd 1.6, on PATH.
    System,
    /// containerd 2.x from Debian's unstable suite, unpacked under [`runtimes_dir`].
    Sid,
}

impl Release {
    /// `LAZYSNAP_CONTAINERD`: unset or `1` for [`Release::System`], `2` for [`Release::Sid`].
    pub fn from_env() -> anyhow::Result<Release> {
        match std::env::var("LAZYSNAP_CONTAINERD").as_deref() {
            Err(_) | Ok("") | Ok("1") => Ok(Release::System),
            Ok("2") => Ok(Release::Sid),
            Ok(other) => anyhow::bail!("LAZYSNAP_CONTAINERD={other:?}: say 1 or 2"),
        }
    }

    /// containerd 2.x: config version 3, the transfer service, CRI split in plugins.
    pub fn is_v2(self) -> bool {
        self == Release::Sid
    }

    /// The directory holding `containerd`, `ctr` and the runc shim.
    fn bin_dir(self) -> anyhow::Result<Option<PathBuf>> {
        match self {
            Release::System => Ok(None),
            Release::Sid => {
                let dir = runtimes_dir().join("root/usr/bin");
                if !dir.join("containerd").is_file() {
                    anyhow::bail!(
                        "containerd 2.x is not unpacked in {}: run `. scripts/lib.sh; fetch_sid_runtimes` (scripts/test.sh does)",
                        runtimes_dir().display()
                    );
                }
                Ok(Some(dir))
            }
        }
    }
}

/// Where `fetch_sid_runtimes` unpacks Debian sid's runtimes (`LAZYSNAP_RUNTIMES_DIR`).
pub fn runtimes_dir() -> PathBuf {
    std::env::var_os("LAZYSNAP_RUNTIMES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/lazysnap-runtimes"))
}

/// A proxy snapshotter that containerd reaches over gRPC (`[proxy_plugins.NAME]`).
#[derive(Clone, Debug)]
pub struct ProxySnapshotter {
    pub name: String,
    /// Path of the snapshotter's unix socket.
    pub address: PathBuf,
    /// What containerd 2.x is told the snapshotter can do (`remap-ids`); 1.6 has no such
    /// setting.
    pub capabilities: Vec<String>,
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
    /// Which containerd; default: [`Release::from_env`].
    pub release: Option<Release>,
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
            capabilities: Vec::new(),
        });
        self
    }

    /// Tells containerd 2.x that the proxy snapshotter `name` (added before) can do
    /// `capabilities`.
    pub fn proxy_capabilities(mut self, name: &str, capabilities: &[&str]) -> Self {
        for p in &mut self.proxy_snapshotters {
            if p.name == name {
                p.capabilities
                    .extend(capabilities.iter().map(|c| c.to_string()));
            }
        }
        self
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_string());
        self
    }

    pub fn release(mut self, release: Release) -> Self {
        self.release = Some(release);
        self
    }

    pub fn extra_config(mut self, toml: &str) -> Self {
        self.extra_config.push_str(toml);
        self.extra_config.push('\n');
        self
    }
}

pub struct Containerd {
    release: Release,
    /// `ctr` with its absolute path, found at start.
    ctr: PathBuf,
    /// The command it was started with, for [`Containerd::start_again`].
    binary: PathBuf,
    path_env: Option<std::ffi::OsString>,
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
        let release = match options.release {
            Some(release) => release,
            None => Release::from_env()?,
        };
        let bin_dir = release.bin_dir()?;
        let (binary, ctr) = match &bin_dir {
            Some(dir) => (dir.join("containerd"), dir.join("ctr")),
            None => (
                crate::require_program("containerd", "containerd")?,
                crate::require_program("ctr", "containerd")?,
            ),
        };
        // containerd starts the shim and the shim runc, both looked up on PATH.
        if bin_dir.is_none() {
            crate::require_program("containerd-shim-runc-v2", "containerd")?;
        }
        crate::require_program("runc", "runc")?;

        let mut dir = tempfile::Builder::new().prefix("ctd-").tempdir()?;
        if dir.path().join("containerd.sock").as_os_str().len() >= MAX_SOCKET_PATH {
            // A long TMPDIR would make the socket path unusable; /tmp is always short.
            dir = tempfile::Builder::new().prefix("ctd-").tempdir_in("/tmp")?;
        }
        let root = dir.path();
        let socket = root.join("containerd.sock");
        let config = if release.is_v2() {
            config_v3(root, &socket, options)?
        } else {
            config_v2(root, &socket, options)?
        };
        let config_path = root.join("config.toml");
        std::fs::write(&config_path, config)?;

        let path_env = match &bin_dir {
            Some(dir) => {
                // Its own shim first.
                let path = std::env::var_os("PATH").unwrap_or_default();
                let mut dirs = vec![dir.clone()];
                dirs.extend(std::env::split_paths(&path));
                Some(std::env::join_paths(dirs)?)
            }
            None => None,
        };
        let namespace = options.namespace.clone().unwrap_or_else(unique_namespace);
        let mut containerd = Self {
            release,
            ctr,
            binary,
            path_env,
            socket,
            namespace,
            process: None,
            dir,
        };
        containerd.spawn()?;
        // The server, not only the binary we started, is the release asked for.
        let version = containerd.ctr_raw(None, ["version"], Duration::from_secs(10))?;
        let server = version.split("Server:").nth(1).unwrap_or_default();
        let major = if release.is_v2() { "2." } else { "1." };
        if !server.contains(&format!("Version:  {major}"))
            && !server.contains(&format!("Version: {major}"))
        {
            anyhow::bail!("asked for containerd {release:?}, got:\n{version}");
        }
        Ok(containerd)
    }

    pub fn release(&self) -> Release {
        self.release
    }

    /// Starts the containerd process on this instance's config and waits until it answers.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--config").arg(self.dir.path().join("config.toml"));
        if let Some(path) = &self.path_env {
            cmd.env("PATH", path);
        }
        let log = self.dir.path().join("containerd.log");
        self.process = Some(ChildGuard::spawn("containerd", cmd, &log)?);
        self.wait_ready(Duration::from_secs(30))
    }

    /// Stops containerd (SIGTERM) and leaves its root and state on disk, for
    /// [`Containerd::start_again`]. Tasks still running are not touched (their shims
    /// outlive containerd, as with `systemctl restart containerd`).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let mut process = self
            .process
            .take()
            .ok_or_else(|| anyhow::anyhow!("containerd is not running"))?;
        process.signal_and_wait(libc::SIGTERM, Duration::from_secs(30))?;
        Ok(())
    }

    /// Starts containerd again after [`Containerd::stop`], on the same config, root and
    /// socket. With `reboot`, its state directory (a tmpfs under /run on a real host) is
    /// emptied first, as a reboot leaves it; it must then have no tasks.
    pub fn start_again(&mut self, reboot: bool) -> anyhow::Result<()> {
        if self.process.is_some() {
            anyhow::bail!("containerd is already running");
        }
        if reboot {
            let state = self.dir.path().join("state");
            if !mounts_under(&state).is_empty() {
                anyhow::bail!(
                    "containerd's state still has mounts: {:?}",
                    mounts_under(&state)
                );
            }
            if state.exists() {
                std::fs::remove_dir_all(&state)?;
            }
        }
        self.spawn()
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

    /// Pushes `reference` (an image in this containerd) to its plain-HTTP registry. A
    /// push that ends in "unexpected EOF" is tried again, up to twice: containerd 1.6's
    /// pusher gives up when the registry drops an upload's connection, which a test
    /// registry on a loaded machine did once (seen in CI); other errors fail at once.
    pub fn push_plain_http(&self, reference: &str) -> anyhow::Result<String> {
        let push = || self.ctr(["image", "push", "--plain-http", reference, reference]);
        let mut tries = 1;
        loop {
            match push() {
                Err(e) if tries < 3 && format!("{e:#}").contains("unexpected EOF") => {
                    eprintln!("pushing {reference} again after: {e:#}");
                    tries += 1;
                }
                other => return other,
            }
        }
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
        stdout_of(&what, run_with_timeout(cmd, timeout)?)
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

fn path_str(p: &Path) -> anyhow::Result<String> {
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("temp path {} is not UTF-8", p.display()))
}

/// What both config versions start with: where containerd keeps its state and listens,
/// and the plugins it must not load.
fn config_head(
    version: u32,
    root: &Path,
    socket: &Path,
    disabled: &[&str],
) -> anyhow::Result<String> {
    let disabled: Vec<String> = disabled.iter().map(|p| toml_string(p)).collect();
    Ok(format!(
        "version = {version}\n\
         root = {root}\n\
         state = {state}\n\
         disabled_plugins = [{disabled}]\n\n\
         [grpc]\n  address = {socket}\n\n\
         [ttrpc]\n  address = {ttrpc}\n",
        root = toml_string(&path_str(&root.join("root"))?),
        state = toml_string(&path_str(&root.join("state"))?),
        disabled = disabled.join(", "),
        socket = toml_string(&path_str(socket)?),
        ttrpc = toml_string(&format!("{}.ttrpc", path_str(socket)?)),
    ))
}

/// containerd 1.6's config (version 2).
fn config_v2(root: &Path, socket: &Path, options: &ContainerdOptions) -> anyhow::Result<String> {
    let mut disabled: Vec<&str> = ALWAYS_DISABLED.to_vec();
    if !options.keep_cri {
        disabled.push(CRI_PLUGIN);
    }
    let mut config = config_head(2, root, socket, &disabled)?;
    config.push_str(&format!(
        "\n# The opt plugin would otherwise create /opt/containerd.\n\
         [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt}\n",
        opt = toml_string(&path_str(&root.join("opt"))?),
    ));
    for proxy in &options.proxy_snapshotters {
        config.push_str(&format!(
            "\n[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = {address}\n",
            name = toml_string(&proxy.name),
            address = toml_string(&path_str(&proxy.address)?),
        ));
    }
    config_tail(config, root, CRI_PLUGIN, options)
}

/// What both config versions end with: CRI's CNI dirs in the temp dir (unless the
/// caller's text configures `cni_plugin`, the plugin that owns them), then that text.
fn config_tail(
    mut config: String,
    root: &Path,
    cni_plugin: &str,
    options: &ContainerdOptions,
) -> anyhow::Result<String> {
    if options.keep_cri && !options.extra_config.contains(cni_plugin) {
        // CRI otherwise creates and watches /etc/cni/net.d on the host.
        config.push_str(&format!(
            "\n[plugins.{plugin}.cni]\n  conf_dir = {conf}\n  bin_dir = {bin}\n",
            plugin = toml_string(cni_plugin),
            conf = toml_string(&path_str(&root.join("cni/net.d"))?),
            bin = toml_string(&path_str(&root.join("cni/bin"))?),
        ));
    }
    if !options.extra_config.is_empty() {
        config.push('\n');
        config.push_str(&options.extra_config);
    }
    Ok(config)
}

/// containerd 2.x's config (version 3). Its transfer service (`ctr image pull`, and CRI
/// pulls unless told otherwise) unpacks only onto the snapshotters its `unpack_config`
/// names, and passes the remote-snapshot labels only to a proxy plugin that exports
/// `enable_remote_snapshot_annotations`.
fn config_v3(root: &Path, socket: &Path, options: &ContainerdOptions) -> anyhow::Result<String> {
    let mut disabled: Vec<&str> = ALWAYS_DISABLED.to_vec();
    if !options.keep_cri {
        disabled.push(CRI_PLUGIN);
        disabled.extend(CRI_PLUGINS_V2);
    }
    let mut config = config_head(3, root, socket, &disabled)?;
    let transfer = toml_string("io.containerd.transfer.v1.local");
    let mut snapshotters = vec!["overlayfs".to_string()];
    snapshotters.extend(options.proxy_snapshotters.iter().map(|p| p.name.clone()));
    for snapshotter in &snapshotters {
        config.push_str(&format!(
            "\n[[plugins.{transfer}.unpack_config]]\n  platform = \"linux/{arch}\"\n  snapshotter = {name}\n",
            arch = std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            name = toml_string(snapshotter),
        ));
    }
    for proxy in &options.proxy_snapshotters {
        let capabilities: Vec<String> = proxy.capabilities.iter().map(|c| toml_string(c)).collect();
        config.push_str(&format!(
            "\n[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = {address}\n  \
             capabilities = [{capabilities}]\n\
             [proxy_plugins.{name}.exports]\n  enable_remote_snapshot_annotations = \"true\"\n",
            name = toml_string(&proxy.name),
            address = toml_string(&path_str(&proxy.address)?),
            capabilities = capabilities.join(", "),
        ));
    }
    config_tail(config, root, "io.containerd.cri.v1.runtime", options)
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
    fusefs::mountinfo::mounts()
        .into_iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
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

/// What a test asks of containerd's CRI plugin, written in either release's format.
pub struct CriSettings<'a> {
    /// CNI dirs and (for 2.x) the registry hosts dir go under it, never into /etc.
    pub dir: &'a Path,
    pub snapshotter: &'a str,
    /// The pod sandbox image, if the test runs pods.
    pub sandbox_image: Option<&'a str>,
    /// The test registry (`HOST:PORT`), reached over HTTPS with this CA, or plain HTTP.
    pub registry_host: &'a str,
    pub registry_ca: Option<&'a Path>,
}

/// The CRI part of containerd's config for `release`.
///
/// - 1.6 (config version 2): `disable_snapshot_annotations = false` makes CRI label the
///   snapshots it prepares (`containerd.io/snapshot/cri.*`); registries are `mirrors`.
/// - 2.x (version 3): CRI pulls through the transfer service, which labels snapshots for a
///   proxy plugin exporting `enable_remote_snapshot_annotations` (see `config_v3`); the
///   registry is a `hosts.toml` under `config_path`, written here.
pub fn cri_config(release: Release, s: &CriSettings<'_>) -> anyhow::Result<String> {
    let conf = toml_string(&path_str(&s.dir.join("cni/net.d"))?);
    let bin = toml_string(&path_str(&s.dir.join("cni/bin"))?);
    let snapshotter = toml_string(s.snapshotter);
    let host = s.registry_host;
    if !release.is_v2() {
        let cri = format!("plugins.{}", toml_string(CRI_PLUGIN));
        let mut out = format!(
            "[{cri}]\n\
             \x20 # The sandbox gets oom_score_adj -998 otherwise, which needs CAP_SYS_RESOURCE.\n\
             \x20 restrict_oom_score_adj = true\n"
        );
        if let Some(image) = s.sandbox_image {
            out.push_str(&format!("  sandbox_image = {}\n", toml_string(image)));
        }
        out.push_str(&format!(
            "[{cri}.containerd]\n\
             \x20 snapshotter = {snapshotter}\n\
             \x20 # CRI passes the cri.* labels (image ref, layer digest) only when this is false.\n\
             \x20 disable_snapshot_annotations = false\n\
             [{cri}.cni]\n  conf_dir = {conf}\n  bin_dir = {bin}\n"
        ));
        match s.registry_ca {
            Some(ca) => out.push_str(&format!(
                "[{cri}.registry.mirrors.\"{host}\"]\n  endpoint = [\"https://{host}\"]\n\
                 [{cri}.registry.configs.\"{host}\".tls]\n  ca_file = {ca}\n",
                ca = toml_string(&path_str(ca)?),
            )),
            // containerd 1.6 would try HTTPS first.
            None => out.push_str(&format!(
                "[{cri}.registry.mirrors.\"{host}\"]\n  endpoint = [\"http://{host}\"]\n"
            )),
        }
        return Ok(out);
    }
    let hosts_dir = s.dir.join("certs.d");
    let scheme = if s.registry_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let mut hosts = format!(
        "server = \"{scheme}://{host}\"\n[host.\"{scheme}://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    );
    if let Some(ca) = s.registry_ca {
        hosts.push_str(&format!("  ca = {}\n", toml_string(&path_str(ca)?)));
    }
    std::fs::create_dir_all(hosts_dir.join(host))?;
    std::fs::write(hosts_dir.join(host).join("hosts.toml"), hosts)?;
    let hosts_dir = toml_string(&path_str(&hosts_dir)?);
    let images = format!("plugins.{}", toml_string("io.containerd.cri.v1.images"));
    let runtime = format!("plugins.{}", toml_string("io.containerd.cri.v1.runtime"));
    let transfer = format!("plugins.{}", toml_string("io.containerd.transfer.v1.local"));
    let mut out = format!(
        "[{images}]\n  snapshotter = {snapshotter}\n\
         [{images}.registry]\n  config_path = {hosts_dir}\n\
         [{transfer}]\n  config_path = {hosts_dir}\n\
         [{runtime}]\n\
         \x20 # The sandbox gets oom_score_adj -998 otherwise, which needs CAP_SYS_RESOURCE.\n\
         \x20 restrict_oom_score_adj = true\n\
         \x20 # A pod's network namespace under containerd's state dir, not /var/run/netns.\n\
         \x20 netns_mounts_under_state_dir = true\n\
         [{runtime}.cni]\n  conf_dir = {conf}\n  bin_dir = {bin}\n"
    );
    if let Some(image) = s.sandbox_image {
        out.push_str(&format!(
            "[{images}.pinned_images]\n  sandbox = {}\n",
            toml_string(image)
        ));
    }
    Ok(out)
}

/// A CNI network for pods that need a network namespace of their own (user-namespaced
/// pods cannot use the host's), in `cri_config`'s CNI dirs under `dir`: each pod gets
/// `eth0`, a macvlan on one end of a veth pair made here (no address, no route
/// anywhere), and its loopback. Dropping the guard deletes the pair. Plugins from
/// Debian's containernetworking-plugins.
pub fn install_pod_cni(dir: &Path) -> anyhow::Result<VethPair> {
    let plugins = Path::new("/usr/lib/cni");
    std::fs::create_dir_all(dir.join("cni/bin"))?;
    std::fs::create_dir_all(dir.join("cni/net.d"))?;
    for plugin in ["loopback", "macvlan", "static"] {
        let from = plugins.join(plugin);
        if !from.exists() {
            anyhow::bail!(
                "{} is missing: apt install containernetworking-plugins",
                from.display()
            );
        }
        std::fs::copy(&from, dir.join("cni/bin").join(plugin))?;
    }
    let link = VethPair::create(&format!("lzs{}", std::process::id() % 1_000_000))?;
    std::fs::write(
        dir.join("cni/net.d/10-pods.conflist"),
        format!(
            r#"{{"cniVersion": "1.0.0", "name": "lazysnap-pods", "plugins": [{{"type": "macvlan",
 "master": "{}", "mode": "bridge", "ipam": {{"type": "static",
 "addresses": [{{"address": "10.231.0.2/24"}}]}}}}]}}"#,
            link.name
        ),
    )?;
    Ok(link)
}

/// A veth pair on the host (`NAME` and `NAMEp`), deleted on drop. (Not a dummy link:
/// some kernels here have no dummy driver.)
pub struct VethPair {
    pub name: String,
}

impl VethPair {
    fn create(name: &str) -> anyhow::Result<Self> {
        let peer = format!("{name}p");
        let out = Command::new("ip")
            .args(["link", "add", name, "type", "veth", "peer", "name", &peer])
            .output()?;
        if !out.status.success() {
            anyhow::bail!(
                "ip link add {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let link = VethPair {
            name: name.to_string(),
        };
        let up = Command::new("ip")
            .args(["link", "set", name, "up"])
            .output()?;
        if !up.status.success() {
            anyhow::bail!(
                "ip link set {name} up: {}",
                String::from_utf8_lossy(&up.stderr)
            );
        }
        Ok(link)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
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
