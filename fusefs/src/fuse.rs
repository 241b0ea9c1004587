//! The thin `fuser` edge: translates kernel requests to [`LayerFs`] calls and results
//! to replies, mounts and unmounts.
//!
//! Cache hits are answered on the FUSE thread; a read that needs the network hands its
//! reply object to the tokio runtime, whose task replies once the verified chunks are
//! in. No FUSE thread ever waits for the network.
//!
//! We mount `/dev/fuse` ourselves (mount(2) as root) and give fuser the fd with
//! `Session::from_fd`: that way unmounting is entirely ours (fuser never unmounts a
//! path on its own later), and the fd is the thing a successor process can inherit.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use estargz::Timestamp;
use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;

use crate::cache::SharedCache;
use crate::config::FsConfig;
use crate::core::{Attr, FileKind, LayerFs, ReadStart, XattrReply};
use crate::error::{Error, Result};
use crate::histogram::{Op, OpLatencies};
use crate::stats::Stats;

struct Adapter {
    fs: Arc<LayerFs>,
    /// Open regular files by inode. The kernel refuses (with EIO to the opener) to mix
    /// passthrough and page-cache opens of one inode, and wants one backing id per inode
    /// while it is open, so the mode is chosen per inode, not per open.
    opens: Mutex<HashMap<u64, Opens>>,
    /// Cleared by the first failure to register a backing file (kernel without
    /// passthrough, cache on a stacked filesystem): then every open is a plain one.
    passthrough: AtomicBool,
    /// Attributes sent along with negative entries (the kernel ignores them).
    negative: Attr,
    handle: Handle,
    ttl: Duration,
    max_read: u32,
    latency: Arc<OpLatencies>,
}

/// How an inode is open right now.
enum Opens {
    /// Through the page cache, this many times.
    Cached(u32),
    /// Through passthrough to a local copy, this many times, with its backing id (which
    /// unregisters itself when dropped).
    Passthrough(BackingId, u32),
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn time(t: Timestamp) -> SystemTime {
    let nanos = Duration::from_nanos(t.nanos as u64);
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(t.secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + nanos
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::Directory => FileType::Directory,
        FileKind::RegularFile => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::NamedPipe => FileType::NamedPipe,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let t = time(a.mtime);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Ask for the largest read-ahead the kernel allows, up to max_read.
        if let Err(max) = config.set_max_readahead(self.max_read) {
            let _ = config.set_max_readahead(max);
        }
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_MAX_PAGES,
        ] {
            // Capabilities the kernel lacks are simply not used.
            let _ = config.add_capabilities(cap);
        }
        // Room for the kernel's read-ahead requests to be in flight together.
        let _ = config.set_max_background(64);
        // Depth 1: the backing files must be on a plain filesystem, and overlayfs can
        // still stack on this mount.
        let passthrough = self.passthrough.load(Ordering::Relaxed)
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.passthrough.store(passthrough, Ordering::Relaxed);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = self.latency.start(Op::Lookup);
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            // Node id 0 is ENOENT that the kernel may cache for the entry timeout: the
            // layer never gains names, and containers probe many missing paths (PATH
            // searches, the dynamic loader).
            Err(Error::NotFound) => {
                let mut attr = file_attr(&self.negative);
                attr.ino = INodeNo(0);
                reply.entry(&self.ttl, &attr, Generation(0));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = self.latency.start(Op::Getattr);
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = self.latency.start(Op::Readlink);
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.latency.start(Op::Open);
        let fh = match self.fs.open(ino.0, flags.0) {
            Ok(fh) => FileHandle(fh),
            Err(e) => return reply.error(errno(&e)),
        };
        let mut opens = lock(&self.opens);
        match opens.get_mut(&ino.0) {
            Some(Opens::Passthrough(id, n)) => {
                *n += 1;
                return reply.opened_passthrough(fh, FopenFlags::empty(), id);
            }
            Some(Opens::Cached(n)) => {
                *n += 1;
                return reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE);
            }
            None => {}
        }
        if self.passthrough.load(Ordering::Relaxed)
            && let Some(file) = self.fs.passthrough_file(ino.0)
        {
            match reply.open_backing(&file) {
                Ok(id) => {
                    reply.opened_passthrough(fh, FopenFlags::empty(), &id);
                    opens.insert(ino.0, Opens::Passthrough(id, 1));
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "FUSE passthrough unavailable; reading through the daemon");
                    self.passthrough.store(false, Ordering::Relaxed);
                }
            }
        }
        opens.insert(ino.0, Opens::Cached(1));
        // Immutable content: the page cache stays valid across opens.
        reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let timer = self.latency.start(Op::Read);
        match self.fs.read_start(ino.0, offset, size) {
            Ok(ReadStart::Ready(data)) => reply.data(&data),
            Ok(ReadStart::Fetch(pending)) => {
                let fut = self.fs.read_fetch(pending);
                self.handle.spawn(async move {
                    match fut.await {
                        Ok(data) => reply.data(&data),
                        Err(e) => {
                            tracing::warn!(ino = ino.0, offset, size, error = %e, "read failed");
                            reply.error(errno(&e));
                        }
                    }
                    // A deferred read ends when this task replies, not when the FUSE
                    // thread handed it over.
                    drop(timer);
                });
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
        let mut opens = lock(&self.opens);
        let last = match opens.get_mut(&ino.0) {
            Some(Opens::Cached(n) | Opens::Passthrough(_, n)) => {
                *n -= 1;
                *n == 0
            }
            None => false,
        };
        if last {
            // Dropping a backing id unregisters it; the kernel keeps its own reference
            // for files still mapped.
            let was = opens.remove(&ino.0);
            drop(opens);
            if matches!(was, Some(Opens::Cached(_))) {
                self.fs.release(ino.0);
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.latency.start(Op::Opendir);
        match self.fs.opendir(ino.0, flags.0) {
            Ok(fh) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timer = self.latency.start(Op::Readdir);
        match self.fs.readdir(ino.0, offset) {
            Ok(entries) => {
                for e in entries {
                    let kind = file_type(e.attr.kind);
                    if reply.add(INodeNo(e.attr.ino), e.offset, kind, e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _timer = self.latency.start(Op::Readdirplus);
        match self.fs.readdir(ino.0, offset) {
            Ok(entries) => {
                for e in entries {
                    let attr = file_attr(&e.attr);
                    if reply.add(attr.ino, e.offset, e.name, &self.ttl, &attr, Generation(0)) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timer = self.latency.start(Op::Statfs);
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _timer = self.latency.start(Op::Getxattr);
        match self.fs.getxattr(ino.0, name.as_bytes(), size) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = self.latency.start(Op::Listxattr);
        match self.fs.listxattr(ino.0, size) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let _timer = self.latency.start(Op::Access);
        // Permission bits are the kernel's job (default_permissions); writes are not.
        match self.fs.getattr(ino.0) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    // Everything below would change the layer.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(errno(&self.fs.write_op()));
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno(&self.fs.write_op()));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno(&self.fs.write_op()));
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&self.fs.write_op()));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&self.fs.write_op()));
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(errno(&self.fs.write_op()));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(errno(&self.fs.write_op()));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(errno(&self.fs.write_op()));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(errno(&self.fs.write_op()));
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(errno(&self.fs.write_op()));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&self.fs.write_op()));
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(errno(&self.fs.write_op()));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(errno(&self.fs.write_op()));
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(errno(&self.fs.write_op()));
    }
}

/// A layer mounted with FUSE. Unmounted by [`MountedLayer::unmount`] or, failing that,
/// lazily detached on drop.
pub struct MountedLayer {
    fs: Arc<LayerFs>,
    latency: Arc<OpLatencies>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
    fetch_task: Option<tokio::task::JoinHandle<()>>,
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
/// prefetch and background fetch on `handle`. Needs root (mount(2) with /dev/fuse).
/// Blocks for the FUSE handshake: call it from a blocking context (`spawn_blocking`).
pub fn mount(
    layer: Arc<estargz::Layer>,
    mountpoint: &Path,
    cache: &SharedCache,
    handle: Handle,
    config: FsConfig,
) -> Result<MountedLayer> {
    let fs = Arc::new(LayerFs::new(
        layer,
        cache.clone(),
        handle.clone(),
        config.clone(),
    )?);
    let mount_err = |source| Error::Mount {
        path: mountpoint.to_path_buf(),
        source,
    };
    let mountpoint = mountpoint.canonicalize().map_err(mount_err)?;
    let dev: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(mount_err)?
        .into();
    let options = format!(
        "fd={},rootmode={:o},user_id=0,group_id=0,default_permissions,allow_other,max_read={}",
        dev.as_raw_fd(),
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
    let latency = Arc::new(OpLatencies::default());
    let mut mounted = MountedLayer {
        fs: Arc::clone(&fs),
        latency: Arc::clone(&latency),
        mountpoint: mountpoint.clone(),
        session: None,
        fetch_task: None,
        mounted: true,
    };
    let adapter = Adapter {
        opens: Mutex::new(HashMap::new()),
        passthrough: AtomicBool::new(config.passthrough),
        negative: fs.getattr(1)?,
        fs: Arc::clone(&fs),
        handle: handle.clone(),
        ttl: config.attr_timeout,
        max_read: config.max_read,
        latency,
    };
    let mut fc = fuser::Config::default();
    fc.n_threads = Some(config.fuse_threads);
    fc.clone_fd = true;
    // On error `mounted` drops and unmounts.
    let session = fuser::Session::from_fd(adapter, dev, SessionACL::All, fc)
        .and_then(fuser::Session::spawn)
        .map_err(mount_err)?;
    mounted.session = Some(session);
    raise_bdi_readahead(&mountpoint, config.max_read);

    let fetcher = Arc::clone(fs.fetcher());
    let (prefetch, background) = (config.prefetch, config.background_fetch);
    mounted.fetch_task = Some(handle.spawn(async move {
        if prefetch {
            fetcher.prefetch().await;
        }
        fetcher.prefetch_done.send_replace(true);
        if background {
            fetcher.background().await;
        }
        fetcher.background_done.send_replace(true);
    }));
    Ok(mounted)
}

/// The kernel sizes page-cache read-ahead from the mount's bdi, which FUSE's INIT can
/// only lower; raise it to what we asked for. Best effort.
fn raise_bdi_readahead(mountpoint: &Path, max_read: u32) {
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, format!("{}", max_read / 1024)) {
        tracing::debug!(%path, error = %e, "cannot raise read-ahead");
    }
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
        self.join_session();
        Ok(())
    }

    fn stop_fetching(&mut self) {
        if let Some(task) = self.fetch_task.take() {
            task.abort();
        }
    }

    /// Waits briefly for the session threads, which end when the kernel closes the
    /// connection. An overlay still holding the layer keeps it open; then they end
    /// when it lets go, without us.
    fn join_session(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while !session.guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if session.guard.is_finished() {
            if let Err(e) = session.join() {
                tracing::debug!(error = %e, "FUSE session ended with an error");
            }
        } else {
            tracing::debug!(mountpoint = %self.mountpoint.display(),
                "FUSE connection still in use; its threads end when it is released");
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
            drop(self.session.take());
        }
    }
}
