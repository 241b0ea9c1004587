//! One FUSE connection's request loop: reads requests from `/dev/fuse` (protocol in
//! `kernel.rs`), translates them to [`LayerFs`] calls and the results to replies.
//!
//! Cache hits are answered on the FUSE thread; a read that needs the network hands its
//! reply to the tokio runtime, whose task replies once the verified chunks are in. No
//! FUSE thread ever waits for the network.

use std::io::{IoSlice, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, mpsc};
use std::time::Duration;

use std::fs::File;

use estargz::lock;
use tokio::runtime::Handle;

use super::passthrough::{OpenedAs, Passthrough};
use crate::core::{LayerFs, ReadStart, XattrReply};
use crate::error::{Error, Result};
use crate::histogram::{Op, OpLatencies};
use crate::kernel::{self, Args, init, op};

/// Requests are small (we take no writes: max_write is one page); the largest the
/// kernel may send a read-only filesystem is a setxattr with a 64 KiB value.
const REQUEST_BUFFER: usize = (64 << 10) + 4096;
/// Ours to choose; writes never reach a read-only mount.
const MAX_WRITE: u32 = 4096;
const MAX_BACKGROUND: u16 = 64;

/// What INIT settled on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Negotiated {
    pub(super) minor: u32,
    pub(super) kernel_flags: u64,
    pub(super) flags: u64,
}

/// How a session's connection came to be.
pub(super) enum Connection {
    /// Mounted by this process: INIT is still to come, and `init_done` hears when it
    /// has been answered.
    Fresh { init_done: mpsc::Sender<()> },
    /// Mounted and initialised by an earlier process, with what its INIT settled on.
    TakenOver(Negotiated),
}

pub(super) struct Session {
    fs: Arc<LayerFs>,
    pub(super) dev: File,
    handle: Handle,
    ttl: Duration,
    max_read: u32,
    latency: Arc<OpLatencies>,
    pub(super) negotiated: OnceLock<Negotiated>,
    init_done: Mutex<Option<mpsc::Sender<()>>>,
    /// Set once the connection is left to a successor: an unanswered request must
    /// then stay unanswered (it is resent to the successor), not fail with EIO.
    pub(super) leaving: AtomicBool,
    passthrough: Mutex<Passthrough>,
}

/// What a session needs besides its connection.
pub(super) struct SessionParts {
    pub(super) fs: Arc<LayerFs>,
    pub(super) dev: File,
    pub(super) handle: Handle,
    pub(super) ttl: Duration,
    pub(super) max_read: u32,
    pub(super) latency: Arc<OpLatencies>,
    pub(super) passthrough: Passthrough,
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
        let parts = SessionParts {
            fs,
            dev,
            handle,
            ttl: Duration::from_secs(1),
            max_read: 128 << 10,
            latency: Arc::default(),
            passthrough: Passthrough::fresh(false, None),
        };
        let initialised = Negotiated {
            minor: 31,
            kernel_flags: 0,
            flags: 0,
        };
        Ok(RequestSink(Arc::new(Session::new(
            parts,
            Connection::TakenOver(initialised),
        ))))
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
    pub(super) fn new(parts: SessionParts, connection: Connection) -> Session {
        let session = Session {
            fs: parts.fs,
            dev: parts.dev,
            handle: parts.handle,
            ttl: parts.ttl,
            max_read: parts.max_read,
            latency: parts.latency,
            negotiated: OnceLock::new(),
            init_done: Mutex::new(None),
            leaving: AtomicBool::new(false),
            passthrough: Mutex::new(parts.passthrough),
        };
        match connection {
            Connection::Fresh { init_done } => *session.lock_init() = Some(init_done),
            Connection::TakenOver(n) => {
                let _ = session.negotiated.set(n);
            }
        }
        session
    }

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
    pub(super) fn serve(self: Arc<Self>) {
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
        if pt.wanted() {
            wanted |= init::PASSTHROUGH;
        }
        let passthrough = pt.settle(i.flags & init::PASSTHROUGH != 0);
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

    pub(super) fn passthrough(&self) -> MutexGuard<'_, Passthrough> {
        lock(&self.passthrough)
    }

    /// Answers an open: through the inode's backing file if it has one or can get
    /// one, through the page cache otherwise.
    fn opened(&self, u: u64, ino: u64, fh: u64) {
        let opened = self
            .passthrough()
            .open(&self.dev, ino, || self.fs.passthrough_file(ino));
        match opened {
            OpenedAs::Backing(id) => self.ok(
                u,
                &kernel::open_out(fh, kernel::FOPEN_PASSTHROUGH, id as i32),
            ),
            // Immutable content: the page cache stays valid across opens.
            OpenedAs::PageCache => self.ok(u, &kernel::open_out(fh, kernel::FOPEN_KEEP_CACHE, 0)),
        }
    }

    /// The last page-cache close of a file wholly on disk makes a whole copy of it,
    /// for passthrough on later opens.
    fn released(&self, ino: u64) {
        let last = self.passthrough().released(ino);
        if last {
            self.fs.release(ino);
        }
    }

    fn lock_init(&self) -> MutexGuard<'_, Option<mpsc::Sender<()>>> {
        lock(&self.init_done)
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
