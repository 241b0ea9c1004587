//! A FUSE mount's lifetime: mounting a layer (the kernel's handshake), adopting a
//! connection another process mounted, handing it over, unmounting.
//!
//! The connection can change hands: [`MountedLayer::handover`] gives out a duplicate of
//! the `/dev/fuse` fd and what INIT negotiated, and [`adopt`] serves such an fd in
//! another process without a new INIT (no FUSE library allows that), after asking the
//! kernel to resend what the previous process read but never answered. Every thread
//! reads the one fd, not clones of it: a cloned fd's unanswered requests are failed
//! with ECONNABORTED when its process dies, while those of a shared fd wait for the
//! resend.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::passthrough::Passthrough;
use super::session::{Connection, Negotiated, Session, SessionParts};
use crate::config::FsConfig;
use crate::core::{Backing, LayerFs};
use crate::error::{Error, Result};
use crate::histogram::OpLatencies;
use crate::kernel::{self, init};
use crate::stats::Stats;

/// What a successor needs, besides the fd, to serve a connection whose INIT was
/// answered by an earlier process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// The protocol minor version INIT settled on.
    pub proto_minor: u32,
    /// The flags the kernel offered at INIT (`flags | flags2 << 32`).
    pub kernel_flags: u64,
    /// The flags we took (passthrough among them).
    pub flags: u64,
    /// The mount's device (`major:minor` as in mountinfo), to tell the connection's
    /// own mount from a later one at the same path.
    pub device: String,
}

/// A layer mounted with FUSE. Unmounted by [`MountedLayer::unmount`], left to a
/// successor by [`MountedLayer::leave`], or, failing both, lazily detached on drop.
pub struct MountedLayer {
    fs: Arc<LayerFs>,
    latency: Arc<OpLatencies>,
    mountpoint: PathBuf,
    session: Option<Arc<Session>>,
    threads: Vec<JoinHandle<()>>,
    mounted: bool,
}

impl std::fmt::Debug for MountedLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountedLayer")
            .field("mountpoint", &self.mountpoint)
            .field("mounted", &self.mounted)
            .finish()
    }
}

/// Mounts `layer` read-only at `mountpoint` (an existing directory) and starts the
/// prefetch and background fetch on `backing`'s runtime. Needs root (mount(2) with /dev/fuse).
/// Blocks for the FUSE handshake: call it from a blocking context (`spawn_blocking`).
///
/// `passthrough_ids` is the file where FUSE passthrough's backing ids are recorded for
/// a successor that [`adopt`]s the connection; without it a connection that
/// negotiated passthrough cannot be handed over.
pub fn mount(
    layer: Arc<estargz::Layer>,
    mountpoint: &Path,
    passthrough_ids: Option<&Path>,
    backing: &Backing,
    config: FsConfig,
) -> Result<MountedLayer> {
    let handle = backing.handle.clone();
    let fs = Arc::new(LayerFs::new(layer, backing.clone(), config.clone())?);
    let mount_err = |source| Error::Mount {
        path: mountpoint.to_path_buf(),
        source,
    };
    let mountpoint = mountpoint.canonicalize().map_err(mount_err)?;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(mount_err)?;
    let options = format!(
        "fd={},rootmode={:o},user_id=0,group_id=0,default_permissions,allow_other,max_read={}",
        std::os::fd::AsRawFd::as_raw_fd(&dev),
        libc::S_IFDIR,
        config.max_read
    );
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some(config.fsname.as_str()),
        &mountpoint,
        Some(format!("fuse.{}", config.subtype).as_str()),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOATIME,
        Some(options.as_str()),
    )
    .map_err(|e| mount_err(e.into()))?;
    let (init_done, rx) = mpsc::channel();
    let passthrough =
        Passthrough::fresh(config.passthrough, passthrough_ids.map(Path::to_path_buf));
    // On error `mounted` drops and unmounts.
    let mounted = start(
        SessionParts {
            fs,
            dev,
            handle,
            ttl: config.attr_timeout,
            max_read: config.max_read,
            latency: Arc::default(),
            passthrough,
        },
        mountpoint.clone(),
        Connection::Fresh { init_done },
        config.fuse_threads,
    )?;
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        return Err(mount_err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the kernel's FUSE handshake did not complete",
        )));
    }
    set_bdi_readahead(&mountpoint, config.kernel_readahead.min(config.max_read));
    Ok(mounted)
}

/// Serves a connection that another process mounted and initialised: `dev` is its
/// `/dev/fuse` fd and `handover` what [`MountedLayer::handover`] said about it. The
/// kernel is asked to resend every request the other process read but did not answer.
/// Fails, leaving the mount alone, if `mountpoint` no longer holds that connection.
/// `passthrough_ids` is where the other process recorded its backing ids (see [`mount`]).
pub fn adopt(
    layer: Arc<estargz::Layer>,
    mountpoint: &Path,
    passthrough_ids: Option<&Path>,
    dev: OwnedFd,
    handover: &Handover,
    backing: &Backing,
    config: FsConfig,
) -> Result<MountedLayer> {
    let handle = backing.handle.clone();
    // Only the parent is resolved: resolving the mountpoint itself would ask the
    // filesystem, which nobody serves until we do.
    let mountpoint = match (mountpoint.parent(), mountpoint.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .map(|p| p.join(name))
            .unwrap_or_else(|_| mountpoint.to_path_buf()),
        _ => mountpoint.to_path_buf(),
    };
    if mount_device(&mountpoint).as_deref() != Some(handover.device.as_str()) {
        return Err(Error::Mount {
            path: mountpoint,
            source: std::io::Error::other(
                "the FUSE connection held for this path is no longer mounted there",
            ),
        });
    }
    let fs = Arc::new(LayerFs::new(layer, backing.clone(), config.clone())?);
    let negotiated = Negotiated {
        minor: handover.proto_minor,
        kernel_flags: handover.kernel_flags,
        flags: handover.flags,
    };
    let mut mounted = start(
        SessionParts {
            fs,
            dev: File::from(dev),
            handle,
            ttl: config.attr_timeout,
            max_read: config.max_read,
            latency: Arc::default(),
            passthrough: Passthrough::taken_over(passthrough_ids.map(Path::to_path_buf)),
        },
        mountpoint,
        Connection::TakenOver(negotiated),
        config.fuse_threads,
    )?;
    if let Some(session) = &mounted.session {
        if handover.kernel_flags & init::HAS_RESEND != 0 {
            (&session.dev)
                .write_all(&kernel::notify_resend())
                .map_err(|source| Error::Mount {
                    path: mounted.mountpoint.clone(),
                    source,
                })?;
        } else {
            tracing::warn!(mountpoint = %mounted.mountpoint.display(),
                "this kernel cannot resend requests (Linux < 6.9): reads in flight during the handover hang");
        }
    }
    // The successor does not own the mount until it says so (the caller may still
    // decide to leave it), but a failure from here on must not unmount it either.
    mounted.mounted = true;
    Ok(mounted)
}

/// Starts the FUSE threads on an open connection.
fn start(
    parts: SessionParts,
    mountpoint: PathBuf,
    connection: Connection,
    threads: usize,
) -> Result<MountedLayer> {
    let (fs, latency) = (Arc::clone(&parts.fs), Arc::clone(&parts.latency));
    let session = Arc::new(Session::new(parts, connection));
    let mut mounted = MountedLayer {
        fs,
        latency,
        mountpoint,
        session: Some(Arc::clone(&session)),
        threads: Vec::new(),
        mounted: true,
    };
    for i in 0..threads {
        let s = Arc::clone(&session);
        let thread = std::thread::Builder::new()
            .name(format!("fuse-{i}"))
            .spawn(move || s.serve())
            .map_err(|source| Error::Mount {
                path: mounted.mountpoint.clone(),
                source,
            })?;
        mounted.threads.push(thread);
    }
    Ok(mounted)
}

/// The `major:minor` of the FUSE mount at `path`, from mountinfo: a stat would ask
/// the filesystem, which nobody may be serving yet.
pub fn mount_device(path: &Path) -> Option<String> {
    crate::mountinfo::mounts()
        .into_iter()
        .rev()
        // The topmost of stacked mounts (listed last) is the one path lookups reach.
        .find(|m| m.fs_type.starts_with("fuse") && m.mount_point == path)
        .map(|m| m.device)
}

impl MountedLayer {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The filesystem core behind the mount.
    pub fn fs(&self) -> &Arc<LayerFs> {
        &self.fs
    }

    /// The layer's counters, with the latency of the FUSE operations served so far.
    pub fn stats(&self) -> Stats {
        Stats {
            op_latency: self.latency.snapshot(),
            ..self.fs.stats()
        }
    }

    /// A duplicate of the connection's fd and what a successor needs to serve it with
    /// [`adopt`]; None before INIT completed or after unmounting.
    pub fn handover(&self) -> Option<(OwnedFd, Handover)> {
        let session = self.session.as_ref().filter(|_| self.mounted)?;
        let n = session.negotiated.get()?;
        // A successor that does not know the backing ids would collide with them.
        if n.flags & init::PASSTHROUGH != 0 && !session.passthrough().has_record() {
            return None;
        }
        let device = mount_device(&self.mountpoint)?;
        let fd = session.dev.try_clone().ok()?;
        Some((
            fd.into(),
            Handover {
                proto_minor: n.minor,
                kernel_flags: n.kernel_flags,
                flags: n.flags,
                device,
            },
        ))
    }

    /// Stops serving without unmounting: requests this process has not answered stay
    /// with the kernel for a successor that [`adopt`]s the connection. The FUSE
    /// threads keep answering until the process exits.
    pub fn leave(mut self) {
        if let Some(session) = &self.session {
            session.leaving.store(true, Ordering::Relaxed);
        }
        self.stop_fetching();
        self.mounted = false;
        // Not joined: they block in read(2) until the process exits.
        self.threads.clear();
    }

    /// Resolves once the prioritized range has been fetched (or failed, or there was
    /// none); containers start faster when they wait for it.
    pub async fn prefetch_done(&self) {
        let mut rx = self.fs.fetcher().prefetch.done.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Resolves once the background fetch has gone through the whole layer.
    pub async fn background_done(&self) {
        let mut rx = self.fs.fetcher().background.done.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Unmounts; fails with EBUSY (and stays mounted) while files are open. Stops the
    /// layer's fetch tasks. Idempotent.
    pub fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()).map_err(|e| {
            Error::Unmount {
                path: self.mountpoint.clone(),
                source: e.into(),
            }
        })?;
        self.mounted = false;
        self.stop_fetching();
        self.join_threads();
        Ok(())
    }

    fn stop_fetching(&mut self) {
        self.fs.stop_fetching();
    }

    /// Waits briefly for the FUSE threads, which end when the kernel closes the
    /// connection. An overlay still holding the layer keeps it open; then they end
    /// when it lets go, without us.
    fn join_threads(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.threads.iter().all(|t| t.is_finished()) {
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        } else {
            tracing::debug!(mountpoint = %self.mountpoint.display(),
                "FUSE connection still in use; its threads end when it is released");
            self.threads.clear();
        }
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::warn!(error = %e, "unmount failed; detaching lazily");
            if let Err(e) = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
            {
                tracing::error!(mountpoint = %self.mountpoint.display(), error = %e,
                    "cannot detach");
            }
            self.mounted = false;
            self.stop_fetching();
            // Not joined: the threads end once the last user of the detached mount goes.
            self.threads.clear();
        }
    }
}

/// The kernel sizes page-cache read-ahead from the mount's bdi, which FUSE's INIT can
/// only lower; set it to what we want. Best effort.
fn set_bdi_readahead(mountpoint: &Path, bytes: u32) {
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, format!("{}", (bytes / 1024).max(4))) {
        tracing::debug!(%path, error = %e, "cannot raise read-ahead");
    }
}
