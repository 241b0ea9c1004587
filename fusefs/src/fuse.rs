//! The FUSE edge: our own request loop over `/dev/fuse` (protocol in `kernel.rs`) that
//! translates kernel requests to [`LayerFs`] calls and results to replies, and the
//! mount's lifetime.
//!
//! Cache hits are answered on the FUSE thread; a read that needs the network hands its
//! reply to the tokio runtime, whose task replies once the verified chunks are in. No
//! FUSE thread ever waits for the network.
//!
//! The connection can change hands: [`MountedLayer::handover`] gives out a duplicate of
//! the `/dev/fuse` fd and what INIT negotiated, and [`adopt`] serves such an fd in
//! another process without a new INIT (no FUSE library allows that), after asking the
//! kernel to resend what the previous process read but never answered. Every thread
//! reads the one fd, not clones of it: a cloned fd's unanswered requests are failed
//! with ECONNABORTED when its process dies, while those of a shared fd wait for the
//! resend.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

use crate::config::FsConfig;
use crate::core::{Backing, LayerFs, ReadStart, XattrReply};
use crate::error::{Error, Result};
use crate::histogram::{Op, OpLatencies};
use crate::kernel::{self, Args, init, op};
use crate::stats::Stats;

/// Requests are small (we take no writes: max_write is one page); the largest the
/// kernel may send a read-only filesystem is a setxattr with a 64 KiB value.
const REQUEST_BUFFER: usize = (64 << 10) + 4096;
/// Ours to choose; writes never reach a read-only mount.
const MAX_WRITE: u32 = 4096;
const MAX_BACKGROUND: u16 = 64;

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

#[derive(Debug, Clone, Copy)]
struct Negotiated {
    minor: u32,
    kernel_flags: u64,
    flags: u64,
}

/// FUSE passthrough state of one connection.
///
/// The kernel refuses (EIO, ETXTBSY or EBUSY to the opener) to mix passthrough and
/// page-cache opens of one inode, and a second backing file for an inode that is
/// open. So an inode that got a backing id keeps it for the life of the connection and
/// is always opened through it, and the ids are recorded in a file beside the
/// mountpoint: a successor that takes the connection over opens those inodes with the
/// same ids (which stay registered in the kernel when a daemon dies) instead of
/// colliding with opens that outlived the previous daemon.
struct Passthrough {
    enabled: bool,
    backing: HashMap<u64, u32>,
    /// Page-cache opens by this process, by inode.
    cached: HashMap<u64, u32>,
    record: PathBuf,
}

/// Where a mount's backing ids are recorded: `fs` → `fs.passthrough-ids` beside it.
fn backing_record(mountpoint: &Path) -> PathBuf {
    let name = mountpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    mountpoint.with_file_name(format!("{name}.passthrough-ids"))
}

fn read_backing_record(path: &Path) -> HashMap<u64, u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (ino, id) = l.split_once(' ')?;
            Some((ino.parse().ok()?, id.parse().ok()?))
        })
        .collect()
}

/// FUSE_DEV_IOC_BACKING_OPEN: registers `file` as a backing file on the connection.
#[allow(unsafe_code)]
fn backing_open(dev: &File, file: &File) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct BackingMap {
        fd: i32,
        flags: u32,
        padding: u64,
    }
    // _IOW(229, 1, struct fuse_backing_map)
    const FUSE_DEV_IOC_BACKING_OPEN: u64 = 0x4010_e501;
    let map = BackingMap {
        fd: file.as_raw_fd(),
        flags: 0,
        padding: 0,
    };
    // SAFETY: the ioctl reads one fuse_backing_map, which `map` is (repr(C), the
    // kernel's layout), for the duration of the call; both fds are open.
    let id = unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_OPEN as _, &map) };
    if id < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(id as u32)
}

struct Session {
    fs: Arc<LayerFs>,
    dev: File,
    handle: Handle,
    ttl: Duration,
    max_read: u32,
    latency: Arc<OpLatencies>,
    negotiated: OnceLock<Negotiated>,
    init_done: Mutex<Option<mpsc::Sender<()>>>,
    /// Set once the connection is left to a successor: an unanswered request must
    /// then stay unanswered (it is resent to the successor), not fail with EIO.
    leaving: AtomicBool,
    passthrough: Mutex<Passthrough>,
}

/// For fuzzing the request decoder and handlers: a session over `fs` that takes raw
/// request bytes, as `/dev/fuse` hands them over, and writes its replies to
/// `/dev/null`. The connection counts as initialised (protocol 7.31, no flags), so every
/// opcode reaches its handler.
#[doc(hidden)]
pub struct RequestSink(Arc<Session>);

impl RequestSink {
    pub fn new(fs: Arc<LayerFs>, handle: Handle) -> std::io::Result<RequestSink> {
        let dev = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
        let session = Session {
            fs,
            dev,
            handle,
            ttl: Duration::from_secs(1),
            max_read: 128 << 10,
            latency: Arc::default(),
            negotiated: OnceLock::new(),
            init_done: Mutex::new(None),
            leaving: AtomicBool::new(false),
            passthrough: Mutex::new(Passthrough {
                enabled: false,
                backing: HashMap::new(),
                cached: HashMap::new(),
                record: PathBuf::from("/nonexistent/lazysnap-fuzz"),
            }),
        };
        let _ = session.negotiated.set(Negotiated {
            minor: 31,
            kernel_flags: 0,
            flags: 0,
        });
        Ok(RequestSink(Arc::new(session)))
    }

    pub fn request(&self, buf: &[u8]) {
        self.0.dispatch(buf);
    }
}

fn errno(e: &Error) -> i32 {
    e.errno()
}

/// A reply owed by a task on the runtime; EIO if the task ends without one (a
/// panic), unless the connection is being handed over.
struct Deferred {
    session: Arc<Session>,
    unique: u64,
    answered: bool,
}

impl Deferred {
    fn data(mut self, data: &[u8]) {
        self.answered = true;
        self.session.send(self.unique, 0, &[data]);
    }

    fn error(mut self, e: i32) {
        self.answered = true;
        self.session.send(self.unique, e, &[]);
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        if !self.answered && !self.session.leaving.load(Ordering::Relaxed) {
            self.session.send(self.unique, libc::EIO, &[]);
        }
    }
}

impl Session {
    /// Writes one reply: header and parts in one write, as the device requires.
    /// `error` is a positive errno or 0.
    fn send(&self, unique: u64, error: i32, parts: &[&[u8]]) {
        let len = kernel::OUT_HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
        let header = kernel::out_header(len, -error, unique);
        let mut iov = Vec::with_capacity(parts.len() + 1);
        iov.push(IoSlice::new(&header));
        iov.extend(parts.iter().map(|p| IoSlice::new(p)));
        match (&self.dev).write_vectored(&iov) {
            Ok(n) if n == len => {}
            Ok(n) => tracing::warn!(unique, n, len, "short FUSE reply"),
            // ENOENT: the request was interrupted, or its caller is gone.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => tracing::debug!(unique, error = %e, "FUSE reply not delivered"),
        }
    }

    fn ok(&self, unique: u64, data: &[u8]) {
        self.send(unique, 0, &[data]);
    }

    fn err(&self, unique: u64, e: i32) {
        if e != libc::ENOSYS && e != libc::ENODATA {
            tracing::debug!(unique, errno = e, "FUSE error reply");
        }
        self.send(unique, e, &[]);
    }

    /// Reads and serves requests until the connection ends (unmount or abort).
    fn serve(self: Arc<Self>) {
        let mut buf = vec![0u8; REQUEST_BUFFER];
        loop {
            match (&self.dev).read(&mut buf) {
                Ok(n) => self.dispatch(&buf[..n]),
                Err(e) => match e.raw_os_error() {
                    // Interrupted before we got it, or a signal: just read again.
                    Some(libc::ENOENT | libc::EINTR | libc::EAGAIN) => {}
                    // Unmounted or aborted: the connection is over.
                    Some(libc::ENODEV) => return,
                    _ => {
                        tracing::warn!(error = %e, "reading /dev/fuse; this thread stops");
                        return;
                    }
                },
            }
        }
    }

    fn dispatch(self: &Arc<Self>, buf: &[u8]) {
        let Some((h, mut a)) = kernel::parse(buf) else {
            tracing::warn!(len = buf.len(), "malformed FUSE request dropped");
            return;
        };
        let u = h.unique;
        if u & (1 << 63) != 0 {
            tracing::debug!(opcode = h.opcode, nodeid = h.nodeid, "resent FUSE request");
        }
        if h.opcode == op::INIT {
            return self.init(u, &mut a);
        }
        if self.negotiated.get().is_none() {
            return self.err(u, libc::EIO);
        }
        self.fs.note_activity();
        let ino = h.nodeid;
        match h.opcode {
            // Nothing is kept per lookup (inodes come from the TOC), and an interrupted
            // read simply completes: none of these has a reply.
            op::FORGET | op::BATCH_FORGET | op::INTERRUPT => {}
            op::LOOKUP => {
                let _t = self.latency.start(Op::Lookup);
                let Some(name) = a.cstr() else {
                    return self.err(u, libc::EINVAL);
                };
                let mut out = Vec::with_capacity(128);
                match self.fs.lookup(ino, name) {
                    Ok(attr) => kernel::entry_out(&mut out, Some(&attr), self.ttl),
                    // Node id 0 is ENOENT that the kernel may cache for the entry
                    // timeout: the layer never gains names, and containers probe many
                    // missing paths (PATH searches, the dynamic loader).
                    Err(Error::NotFound) => kernel::entry_out(&mut out, None, self.ttl),
                    Err(e) => return self.err(u, errno(&e)),
                }
                self.ok(u, &out);
            }
            op::GETATTR => {
                let _t = self.latency.start(Op::Getattr);
                self.attr_reply(u, ino);
            }
            op::READLINK => {
                let _t = self.latency.start(Op::Readlink);
                match self.fs.readlink(ino) {
                    Ok(t) => self.ok(u, t.as_bytes()),
                    Err(e) => self.err(u, errno(&e)),
                }
            }
            // Without passthrough an open has nothing to hand the kernel that it does
            // not know: ENOSYS once, and it opens every file of this connection without
            // asking (no OPEN, no RELEASE), keeping the page cache across opens.
            op::OPEN if !self.answers_opens() => self.err(u, libc::ENOSYS),
            op::OPEN => {
                let _t = self.latency.start(Op::Open);
                let flags = a.u32().unwrap_or(0) as i32;
                match self.fs.open(ino, flags) {
                    Ok(fh) => self.opened(u, ino, fh),
                    Err(e) => self.err(u, errno(&e)),
                }
            }
            op::READ => self.read(u, ino, h.pid, &mut a),
            // Likewise for directories: the kernel then opens them itself and caches
            // their listings (it defaults to FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR).
            op::OPENDIR => {
                let _t = self.latency.start(Op::Opendir);
                self.err(u, libc::ENOSYS)
            }
            op::READDIR | op::READDIRPLUS => self.readdir(u, ino, h.opcode, &mut a),
            op::RELEASE => {
                self.ok(u, &[]);
                self.released(ino);
            }
            op::RELEASEDIR | op::DESTROY => self.ok(u, &[]),
            // ENOSYS once and the kernel never sends them again: close(2) and fsync(2)
            // then need no daemon, which matters while lazysnapd is being replaced.
            op::FLUSH | op::FSYNC | op::FSYNCDIR => self.err(u, libc::ENOSYS),
            op::STATFS => {
                let _t = self.latency.start(Op::Statfs);
                self.ok(u, &kernel::statfs_out(&self.fs.statfs()));
            }
            // Always answered, even for a layer without extended attributes: ENOSYS would
            // spare the requests (the kernel would answer EOPNOTSUPP itself), but
            // containerd's diff (docker build, commit) fails on EOPNOTSUPP from a lower
            // layer, where it expects ENODATA.
            op::GETXATTR => {
                let _t = self.latency.start(Op::Getxattr);
                let size = a.u32().unwrap_or(0);
                let _padding = a.u32();
                let Some(name) = a.cstr() else {
                    return self.err(u, libc::EINVAL);
                };
                self.xattr_reply(u, self.fs.getxattr(ino, name, size));
            }
            op::LISTXATTR => {
                let _t = self.latency.start(Op::Listxattr);
                let size = a.u32().unwrap_or(0);
                self.xattr_reply(u, self.fs.listxattr(ino, size));
            }
            op::ACCESS => {
                let _t = self.latency.start(Op::Access);
                let mask = a.u32().unwrap_or(0) as i32;
                // Permission bits are the kernel's job (default_permissions); writes
                // are not.
                match self.fs.getattr(ino) {
                    Ok(_) if mask & libc::W_OK != 0 => self.err(u, libc::EROFS),
                    Ok(_) => self.ok(u, &[]),
                    Err(e) => self.err(u, errno(&e)),
                }
            }
            // Everything that would change the layer.
            op::SETATTR
            | op::SYMLINK
            | op::MKNOD
            | op::MKDIR
            | op::UNLINK
            | op::RMDIR
            | op::RENAME
            | op::RENAME2
            | op::LINK
            | op::WRITE
            | op::SETXATTR
            | op::REMOVEXATTR
            | op::CREATE
            | op::TMPFILE
            | op::FALLOCATE
            | op::COPY_FILE_RANGE => self.err(u, errno(&self.fs.write_op())),
            // Locks, ioctl, poll, lseek, statx, ...: the kernel falls back on its own.
            _ => self.err(u, libc::ENOSYS),
        }
    }

    fn init(&self, u: u64, a: &mut Args<'_>) {
        let Some(i) = kernel::init_in(a) else {
            return self.err(u, libc::EINVAL);
        };
        if i.major != 7 || i.minor < kernel::MIN_MINOR {
            tracing::error!(
                major = i.major,
                minor = i.minor,
                "FUSE protocol of this kernel not supported"
            );
            return self.err(u, libc::EPROTO);
        }
        let mut wanted = init::ASYNC_READ
            | init::DO_READDIRPLUS
            | init::READDIRPLUS_AUTO
            | init::CACHE_SYMLINKS
            | init::PARALLEL_DIROPS
            | init::MAX_PAGES
            | init::INIT_EXT
            // Read-only with default_permissions: an idmapped view changes nothing we do.
            | init::ALLOW_IDMAP;
        let mut pt = self.passthrough();
        if pt.enabled {
            wanted |= init::PASSTHROUGH;
        }
        pt.enabled = i.flags & init::PASSTHROUGH != 0 && pt.enabled;
        let passthrough = pt.enabled;
        drop(pt);
        let out = kernel::InitOut {
            minor: i.minor.min(kernel::MAX_MINOR),
            // The largest read-ahead the kernel allows, up to max_read.
            max_readahead: i.max_readahead.min(self.max_read),
            // Capabilities the kernel lacks are simply not used.
            flags: wanted & i.flags,
            // Room for the kernel's read-ahead requests to be in flight together.
            max_background: MAX_BACKGROUND,
            max_write: MAX_WRITE,
            max_pages: (self.max_read / 4096).clamp(1, u16::MAX as u32) as u16,
            // Depth 1: the backing files must be on a plain filesystem, and overlayfs
            // can still stack on this mount.
            max_stack_depth: u32::from(passthrough),
        };
        let _ = self.negotiated.set(Negotiated {
            minor: out.minor,
            kernel_flags: i.flags,
            flags: out.flags,
        });
        self.ok(u, &kernel::init_out(&out));
        if let Some(tx) = self.lock_init().take() {
            let _ = tx.send(());
        }
    }

    /// Whether OPEN is answered: only where passthrough was negotiated, whose backing
    /// ids an open hands out (by this process, or by the one it took over from).
    fn answers_opens(&self) -> bool {
        self.negotiated
            .get()
            .is_some_and(|n| n.flags & init::PASSTHROUGH != 0)
    }

    fn passthrough(&self) -> MutexGuard<'_, Passthrough> {
        self.passthrough.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers an open: through the inode's backing file if it has one or can get
    /// one, through the page cache otherwise.
    fn opened(&self, u: u64, ino: u64, fh: u64) {
        let mut pt = self.passthrough();
        if let Some(&id) = pt.backing.get(&ino) {
            drop(pt);
            return self.ok(
                u,
                &kernel::open_out(fh, kernel::FOPEN_PASSTHROUGH, id as i32),
            );
        }
        if pt.enabled
            && !pt.cached.contains_key(&ino)
            && let Some(file) = self.fs.passthrough_file(ino)
        {
            match backing_open(&self.dev, &file) {
                Ok(id) => {
                    let recorded = std::fs::File::options()
                        .create(true)
                        .append(true)
                        .open(&pt.record)
                        .and_then(|mut f| {
                            writeln!(f, "{ino} {id}")?;
                            f.sync_data()
                        });
                    if let Err(e) = recorded {
                        // A successor would not know the id: opens of this inode that
                        // outlive us would collide with its own. Not worth the risk.
                        tracing::warn!(error = %e, path = %pt.record.display(),
                            "cannot record a passthrough backing id; passthrough off for this mount");
                        pt.enabled = false;
                    } else {
                        pt.backing.insert(ino, id);
                        drop(pt);
                        return self.ok(
                            u,
                            &kernel::open_out(fh, kernel::FOPEN_PASSTHROUGH, id as i32),
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "FUSE passthrough unavailable; reading through the daemon");
                    pt.enabled = false;
                }
            }
        }
        *pt.cached.entry(ino).or_default() += 1;
        drop(pt);
        // Immutable content: the page cache stays valid across opens.
        self.ok(u, &kernel::open_out(fh, kernel::FOPEN_KEEP_CACHE, 0));
    }

    /// The last page-cache close of a file wholly on disk makes a whole copy of it,
    /// for passthrough on later opens.
    fn released(&self, ino: u64) {
        let mut pt = self.passthrough();
        let Some(n) = pt.cached.get_mut(&ino) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            pt.cached.remove(&ino);
            drop(pt);
            self.fs.release(ino);
        }
    }

    fn lock_init(&self) -> std::sync::MutexGuard<'_, Option<mpsc::Sender<()>>> {
        self.init_done.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attr_reply(&self, u: u64, ino: u64) {
        match self.fs.getattr(ino) {
            Ok(a) => self.ok(u, &kernel::attr_out(&a, self.ttl)),
            Err(e) => self.err(u, errno(&e)),
        }
    }

    fn xattr_reply(&self, u: u64, r: Result<XattrReply>) {
        match r {
            Ok(XattrReply::Size(n)) => self.ok(u, &kernel::xattr_size(n)),
            Ok(XattrReply::Data(d)) => self.ok(u, &d),
            Err(e) => self.err(u, errno(&e)),
        }
    }

    fn read(self: &Arc<Self>, u: u64, ino: u64, pid: u32, a: &mut Args<'_>) {
        let timer = self.latency.start(Op::Read);
        let Some(r) = kernel::read_in(a) else {
            return self.err(u, libc::EINVAL);
        };
        // Reads by this process's own threads (a native copy) stay out of the access
        // log; only while such a reader is announced is the requester looked up.
        let log_access = !(self.fs.has_own_readers() && is_own_thread(pid));
        match self.fs.read_start_logged(ino, r.offset, r.size, log_access) {
            Ok(ReadStart::Ready(data)) => self.ok(u, &data),
            Ok(ReadStart::Fetch(pending)) => {
                let fut = self.fs.read_fetch(pending);
                let reply = Deferred {
                    session: Arc::clone(self),
                    unique: u,
                    answered: false,
                };
                self.handle.spawn(async move {
                    match fut.await {
                        Ok(data) => reply.data(&data),
                        Err(e) => {
                            tracing::warn!(ino, offset = r.offset, size = r.size, error = %e, "read failed");
                            reply.error(errno(&e));
                        }
                    }
                    // A deferred read ends when this task replies, not when the FUSE
                    // thread handed it over.
                    drop(timer);
                });
            }
            Err(e) => self.err(u, errno(&e)),
        }
    }

    fn readdir(&self, u: u64, ino: u64, opcode: u32, a: &mut Args<'_>) {
        let plus = opcode == op::READDIRPLUS;
        let _t = self
            .latency
            .start(if plus { Op::Readdirplus } else { Op::Readdir });
        let Some(r) = kernel::read_in(a) else {
            return self.err(u, libc::EINVAL);
        };
        let limit = r.size as usize;
        let entries = match self.fs.readdir(ino, r.offset) {
            Ok(entries) => entries,
            Err(e) => return self.err(u, errno(&e)),
        };
        let mut out = Vec::with_capacity(limit.min(64 << 10));
        for e in entries {
            let added = if plus {
                kernel::direntplus(&mut out, limit, &e.attr, e.offset, e.name, self.ttl)
            } else {
                kernel::dirent(&mut out, limit, e.attr.ino, e.offset, e.attr.mode(), e.name)
            };
            if !added {
                break;
            }
        }
        self.ok(u, &out);
    }
}

/// Whether thread `pid` (as FUSE names the requester) is one of this process's.
fn is_own_thread(pid: u32) -> bool {
    pid != 0 && Path::new("/proc/self/task").join(pid.to_string()).exists()
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
pub fn mount(
    layer: Arc<estargz::Layer>,
    mountpoint: &Path,
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
    let (tx, rx) = mpsc::channel();
    // On error `mounted` drops and unmounts.
    let mounted = start(fs, mountpoint.clone(), dev, handle, &config, None, Some(tx))?;
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
pub fn adopt(
    layer: Arc<estargz::Layer>,
    mountpoint: &Path,
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
        fs,
        mountpoint,
        File::from(dev),
        handle,
        &config,
        Some(negotiated),
        None,
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

/// Starts the FUSE threads and the layer's fetch tasks on an open connection.
fn start(
    fs: Arc<LayerFs>,
    mountpoint: PathBuf,
    dev: File,
    handle: Handle,
    config: &FsConfig,
    negotiated: Option<Negotiated>,
    init_done: Option<mpsc::Sender<()>>,
) -> Result<MountedLayer> {
    let latency = Arc::new(OpLatencies::default());
    let record = backing_record(&mountpoint);
    let passthrough = match negotiated {
        // A connection taken over: passthrough as the kernel agreed to at INIT, with
        // the backing ids the previous daemon registered.
        // No new ids, though: opens through the page cache from before the handover
        // are unknown here, and the kernel fails a passthrough open of such an inode.
        Some(_) => Passthrough {
            enabled: false,
            backing: read_backing_record(&record),
            cached: HashMap::new(),
            record,
        },
        // A new connection: ids recorded for an earlier one mean nothing to it.
        None => {
            let _ = std::fs::remove_file(&record);
            Passthrough {
                enabled: config.passthrough,
                backing: HashMap::new(),
                cached: HashMap::new(),
                record,
            }
        }
    };
    let session = Arc::new(Session {
        fs: Arc::clone(&fs),
        dev,
        handle: handle.clone(),
        ttl: config.attr_timeout,
        max_read: config.max_read,
        latency: Arc::clone(&latency),
        negotiated: OnceLock::new(),
        init_done: Mutex::new(init_done),
        leaving: AtomicBool::new(false),
        passthrough: Mutex::new(passthrough),
    });
    if let Some(n) = negotiated {
        let _ = session.negotiated.set(n);
    }
    let mut mounted = MountedLayer {
        fs: Arc::clone(&fs),
        latency,
        mountpoint,
        session: Some(Arc::clone(&session)),
        threads: Vec::new(),
        mounted: true,
    };
    for i in 0..config.fuse_threads {
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
        let mut rx = self.fs.fetcher().prefetch_done.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Resolves once the background fetch has gone through the whole layer.
    pub async fn background_done(&self) {
        let mut rx = self.fs.fetcher().background_done.subscribe();
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
