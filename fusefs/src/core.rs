//! The filesystem core: inodes, attributes, directories, links, xattrs, statfs and
//! reads over one layer's index. No FUSE in here; the adapter in `fuse/session.rs` translates.
//!
//! Inode numbers are `NodeId + 1` (the root is FUSE's 1), hardlinks share their
//! target's inode, and file handles are inode numbers: all derivable from the TOC alone,
//! so another process can take the FUSE connection over without a table from us.
//!
//! Overlay whiteouts: `.wh.NAME` appears as NAME, a 0/0 character device;
//! `.wh..wh..opq` (and every other `.wh..wh.` name) is hidden and its directory carries
//! `trusted.overlay.opaque = y`, which is how overlayfs sees an unpacked layer. The
//! `.prefetch.landmark` / `.no.prefetch.landmark` markers at the root are hidden.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use estargz::{EntryKind, EntryRef, Layer, NodeId, Timestamp};

use crate::cache::SharedCache;
use crate::config::FsConfig;
use crate::error::{Error, Result};
use crate::fetch::{self, Fetcher, assemble};
use crate::link::Link;
use crate::stats::Stats;

const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const BLOCK_SIZE: u32 = 4096;

/// The type of a file as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    RegularFile,
    Symlink,
    CharDevice,
    BlockDevice,
    NamedPipe,
}

impl FileKind {
    /// The `S_IF*` bits.
    pub fn type_bits(self) -> u32 {
        match self {
            FileKind::Directory => libc::S_IFDIR,
            FileKind::RegularFile => libc::S_IFREG,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::CharDevice => libc::S_IFCHR,
            FileKind::BlockDevice => libc::S_IFBLK,
            FileKind::NamedPipe => libc::S_IFIFO,
        }
    }
}

/// Attributes of one inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky.
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    /// Device number in the kernel's 32-bit encoding (0 for non-devices).
    pub rdev: u32,
    pub mtime: Timestamp,
    pub blksize: u32,
}

impl Attr {
    /// `st_mode`: type bits and permission bits.
    pub fn mode(&self) -> u32 {
        self.kind.type_bits() | self.perm as u32
    }
}

/// One directory entry; `offset` is where a listing resumes after it.
#[derive(Debug, Clone, Copy)]
pub struct DirEntry<'a> {
    pub name: &'a str,
    pub offset: u64,
    pub attr: Attr,
}

/// An xattr reply under the size-probe protocol: a size for a probe (size 0), the data
/// otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

/// Filesystem figures for statfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// What a read can answer without the network.
pub enum ReadStart {
    /// All the chunks were cached: the data.
    Ready(Bytes),
    /// Some chunks must be fetched: finish with [`LayerFs::read_fetch`].
    Fetch(PendingRead),
}

/// A read that needs the network; `Send`, to be finished on the runtime.
pub struct PendingRead {
    wants: Vec<(NodeId, estargz::Chunk)>,
    offset: u64,
    end: u64,
    /// A container's read of the file's start: the file may be a program whose
    /// libraries are worth fetching now (see [`crate::Libraries`]).
    examine: bool,
}

/// What a layer's filesystem draws on besides its own blob: the daemon's chunk cache,
/// the link of the registry host the layer comes from (shared by all its layers), and
/// the runtime its fetches run on.
#[derive(Clone)]
pub struct Backing {
    pub cache: SharedCache,
    pub link: Link,
    pub handle: tokio::runtime::Handle,
}

impl Backing {
    /// A backing with a link of its own (one layer, or tests).
    pub fn new(cache: SharedCache, handle: tokio::runtime::Handle, config: &FsConfig) -> Self {
        Backing {
            cache,
            link: Link::for_config(config),
            handle,
        }
    }
}

/// The read-only filesystem over one layer.
pub struct LayerFs {
    layer: Arc<Layer>,
    fetcher: Arc<Fetcher>,
    /// Directory link counts (2 + subdirectories), by node; 0 for non-directories.
    dir_nlink: Vec<u32>,
    /// Sum of regular file sizes, for statfs.
    content_bytes: u64,
    /// Files opened so far, each once, in first-open order: what `lazysnap optimize`
    /// learns a container's reads from, with no tracing inside the container.
    access: Mutex<AccessLog>,
    /// Prefetch and background fetch, started with the filesystem.
    scheduled: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// lazysnapd's own readers of this layer through its mount (a native copy), whose
    /// reads stay out of the access log; while there are none, reads need no check.
    own_readers: std::sync::atomic::AtomicUsize,
}

/// lazysnapd reads a layer through its own mount while this lives ([`LayerFs::own_reads`]).
pub struct OwnReads(Arc<LayerFs>);

impl Drop for OwnReads {
    fn drop(&mut self) {
        self.0
            .own_readers
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for LayerFs {
    fn drop(&mut self) {
        self.stop_fetching();
    }
}

#[derive(Default)]
struct AccessLog {
    /// Position in `order` of each node opened so far.
    position: std::collections::HashMap<NodeId, usize>,
    /// (node, microseconds since the Unix epoch of its first open, bytes read).
    order: Vec<(NodeId, u64, ReadRanges)>,
}

impl AccessLog {
    fn record(&mut self, id: NodeId) {
        if self.position.contains_key(&id) {
            return;
        }
        // Wall-clock time, so records of different layers merge into one order.
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.position.insert(id, self.order.len());
        self.order.push((id, micros, ReadRanges::default()));
    }

    fn read(&mut self, id: NodeId, range: Range<u64>) {
        if let Some(&i) = self.position.get(&id) {
            self.order[i].2.add(range);
        }
    }
}

/// The byte ranges of one file the kernel has read, merged and sorted; bounded, so a
/// container reading a huge file at random cannot grow it without end (the closest
/// ranges are joined instead).
#[derive(Debug, Default, Clone)]
struct ReadRanges(Vec<Range<u64>>);

const MAX_READ_RANGES: usize = 256;

impl ReadRanges {
    fn add(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let v = &mut self.0;
        // First range ending at or after r.start: everything before it stays apart.
        let i = v.partition_point(|x| x.end < r.start);
        let mut merged = r;
        let mut j = i;
        while j < v.len() && v[j].start <= merged.end {
            merged.start = merged.start.min(v[j].start);
            merged.end = merged.end.max(v[j].end);
            j += 1;
        }
        v.splice(i..j, [merged]);
        if v.len() > MAX_READ_RANGES {
            let k = (1..v.len())
                .min_by_key(|&k| v[k].start - v[k - 1].end)
                .unwrap_or(1);
            v[k - 1].end = v[k].end;
            v.remove(k);
        }
    }

    fn bytes(&self) -> u64 {
        self.0.iter().map(|r| r.end - r.start).sum()
    }
}

/// A file of the layer, when it was first opened (microseconds since the Unix epoch),
/// and how many bytes the kernel asked of it: little of a big file means sparse reads
/// (a library mapped and touched here and there), which are better left on demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileAccess {
    pub path: String,
    pub first_open_us: u64,
    pub read_bytes: u64,
    pub size: u64,
    /// What was read, merged: `lazysnap optimize` marks the chunks holding these.
    pub ranges: Vec<Range<u64>>,
}

/// How an entry shows: hidden, a whiteout, or itself.
fn classify(name: &str) -> Option<bool> {
    if name.starts_with(WHITEOUT_META_PREFIX) || name == WHITEOUT_PREFIX {
        None
    } else {
        Some(name.starts_with(WHITEOUT_PREFIX))
    }
}

/// The converter's prefetch markers at the layer root: format artifacts, not content.
fn is_landmark(dir: NodeId, name: &str) -> bool {
    dir == NodeId::ROOT
        && (name == estargz::PREFETCH_LANDMARK || name == estargz::NO_PREFETCH_LANDMARK)
}

/// The kernel's `new_encode_dev`.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

impl LayerFs {
    /// Builds the inode table from the layer's index and starts the prefetch and the
    /// background fetch (as `config` says) on `backing`'s runtime.
    pub fn new(layer: Arc<Layer>, backing: Backing, config: FsConfig) -> Result<LayerFs> {
        config.validate()?;
        let index = layer.index();
        let mut dir_nlink = vec![0u32; index.len()];
        let mut content_bytes = 0u64;
        for (id, nlink) in dir_nlink.iter_mut().enumerate() {
            let e = index.entry(NodeId(id as u32));
            match e.kind() {
                EntryKind::Dir => {
                    let subdirs = e
                        .children()
                        .filter(|c| index.entry(*c).kind() == EntryKind::Dir)
                        .count();
                    *nlink = 2u32.saturating_add(subdirs as u32);
                }
                EntryKind::Reg => content_bytes = content_bytes.saturating_add(e.size()),
                _ => {}
            }
        }
        // The index is built and the TOC's parse is garbage: give its pages back.
        crate::heap::return_free_pages();
        let Backing {
            cache,
            link,
            handle,
        } = backing;
        let fetcher = Arc::new(Fetcher::new(
            Arc::clone(&layer),
            cache,
            link,
            handle.clone(),
            config,
        ));
        let scheduled = handle.spawn(Arc::clone(&fetcher).run_scheduled());
        Ok(LayerFs {
            fetcher,
            layer,
            dir_nlink,
            content_bytes,
            access: Mutex::default(),
            scheduled: Mutex::new(Some(scheduled)),
            own_readers: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Says that lazysnapd itself will read this layer through its mount until the
    /// guard drops: the FUSE edge then keeps its own threads' reads out of the access log.
    pub fn own_reads(self: &Arc<Self>) -> OwnReads {
        self.own_readers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        OwnReads(Arc::clone(self))
    }

    /// Whether lazysnapd is reading this layer through its mount now.
    pub fn has_own_readers(&self) -> bool {
        self.own_readers.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// Any filesystem request: a container that lists directories or reads cached files
    /// is starting too (see [`crate::Link`]).
    pub fn note_activity(&self) {
        self.fetcher.note_op();
    }

    /// Stops the prefetch and background fetch (the layer is going away).
    pub fn stop_fetching(&self) {
        let task = self.scheduled.lock().map(|mut t| t.take()).ok().flatten();
        if let Some(task) = task {
            task.abort();
        }
    }

    /// Who finds, among the image's layers, the libraries this layer's programs need
    /// (see [`crate::Libraries`]); without one, none are fetched ahead.
    pub fn set_libraries(&self, finder: Arc<dyn crate::Libraries>) {
        self.fetcher.set_libraries(finder);
    }

    /// `path` (relative to the root) is a library a program, or a module Python, is
    /// about to load: if it is here, it is fetched with the others found since the last
    /// [`LayerFs::fetch_found_libraries`].
    pub fn fetch_library(&self, path: &str) -> crate::LibraryLookup {
        self.fetcher.fetch_library(path)
    }

    /// Fetches the libraries found here since the last call, in as few range requests as
    /// their places in the blob allow.
    pub fn fetch_found_libraries(&self) {
        self.fetcher.fetch_found_libraries()
    }

    pub fn layer(&self) -> &Arc<Layer> {
        &self.layer
    }

    pub(crate) fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    pub fn stats(&self) -> Stats {
        self.fetcher.stats()
    }

    /// Adds to `live` the chunk digests and whole-copy keys of the shared cache that
    /// this layer can use (for [`crate::SharedCache::sweep`]).
    pub fn add_live_cache_keys(&self, live: &mut std::collections::HashSet<estargz::Sha256Sum>) {
        self.fetcher.add_live(live);
    }

    /// The files opened so far (hard links as their target, which holds the content),
    /// in the order of their first open.
    pub fn accessed(&self) -> Vec<FileAccess> {
        let index = self.layer.index();
        let Ok(log) = self.access.lock() else {
            return Vec::new();
        };
        log.order
            .iter()
            .map(|(id, first_open_us, ranges)| FileAccess {
                path: index.path_of(*id),
                first_open_us: *first_open_us,
                read_bytes: ranges.bytes(),
                size: index.entry(*id).size(),
                ranges: ranges.0.clone(),
            })
            .collect()
    }

    /// The inode number of an entry (hardlinks give their target's).
    pub fn ino_of(&self, id: NodeId) -> u64 {
        self.layer.index().resolve(id).0 as u64 + 1
    }

    /// The entry behind an inode number, hardlinks resolved.
    fn entry(&self, ino: u64) -> Result<EntryRef<'_>> {
        let index = self.layer.index();
        let id = ino
            .checked_sub(1)
            .and_then(|i| u32::try_from(i).ok())
            .map(NodeId)
            .and_then(|id| index.get(id))
            .ok_or(Error::NotFound)?;
        Ok(index.entry(index.resolve(id.id())))
    }

    fn dir(&self, ino: u64) -> Result<EntryRef<'_>> {
        let e = self.entry(ino)?;
        if e.kind() != EntryKind::Dir {
            return Err(Error::NotDir);
        }
        Ok(e)
    }

    fn is_whiteout(e: &EntryRef<'_>) -> bool {
        e.kind() != EntryKind::Dir && classify(e.name()) == Some(true)
    }

    fn attr_of(&self, e: EntryRef<'_>) -> Attr {
        let ino = e.id().0 as u64 + 1;
        let mut attr = Attr {
            ino,
            kind: FileKind::RegularFile,
            perm: (e.mode() & 0o7777) as u16,
            nlink: e.nlink().max(1),
            uid: e.uid(),
            gid: e.gid(),
            size: 0,
            blocks: 0,
            rdev: 0,
            mtime: e.mtime(),
            blksize: BLOCK_SIZE,
        };
        if Self::is_whiteout(&e) {
            // As containerd's applier makes them: mknod(S_IFCHR, 0), no permissions.
            attr.kind = FileKind::CharDevice;
            attr.perm = 0;
            attr.nlink = 1;
            return attr;
        }
        match e.kind() {
            EntryKind::Dir => {
                attr.kind = FileKind::Directory;
                attr.nlink = self.dir_nlink.get(e.id().0 as usize).copied().unwrap_or(2);
                attr.size = BLOCK_SIZE as u64;
            }
            EntryKind::Reg | EntryKind::Hardlink => attr.size = e.size(),
            EntryKind::Symlink => {
                attr.kind = FileKind::Symlink;
                attr.size = e.symlink_target().map_or(0, |t| t.len() as u64);
            }
            EntryKind::Char | EntryKind::Block => {
                attr.kind = if e.kind() == EntryKind::Char {
                    FileKind::CharDevice
                } else {
                    FileKind::BlockDevice
                };
                let (major, minor) = e.device().unwrap_or((0, 0));
                attr.rdev = encode_dev(major, minor);
            }
            EntryKind::Fifo => attr.kind = FileKind::NamedPipe,
        }
        attr.blocks = attr.size.div_ceil(512);
        attr
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        Ok(self.attr_of(self.entry(ino)?))
    }

    /// Looks `name` up in directory `parent`. A whiteout `.wh.NAME` answers for NAME
    /// (unless the layer also has NAME itself); hidden and `.wh.` names are not found.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        let dir = self.dir(parent)?;
        let name = std::str::from_utf8(name).map_err(|_| Error::NotFound)?;
        if name == "." {
            return Ok(self.attr_of(dir));
        }
        if name == ".." {
            return self.getattr(self.ino_of(dir.parent()));
        }
        if name.starts_with(WHITEOUT_PREFIX) || is_landmark(dir.id(), name) {
            return Err(Error::NotFound);
        }
        let index = self.layer.index();
        let id = match index.child(dir.id(), name) {
            Some(id) => id,
            None => index
                .child(dir.id(), &format!("{WHITEOUT_PREFIX}{name}"))
                .ok_or(Error::NotFound)?,
        };
        Ok(self.attr_of(index.entry(index.resolve(id))))
    }

    /// Lists directory `ino` from `offset` (0 = start; then the `offset` of the last
    /// entry returned). Offsets are positions in the TOC's sorted child list, so they
    /// stay valid for the life of the mount and beyond.
    pub fn readdir(&self, ino: u64, offset: u64) -> Result<impl Iterator<Item = DirEntry<'_>>> {
        let dir = self.dir(ino)?;
        let index = self.layer.index();
        let dots = [
            DirEntry {
                name: ".",
                offset: 1,
                attr: self.attr_of(dir),
            },
            DirEntry {
                name: "..",
                offset: 2,
                attr: self.getattr(self.ino_of(dir.parent()))?,
            },
        ];
        let skip = usize::try_from(offset.saturating_sub(2)).unwrap_or(usize::MAX);
        let first_child_offset = offset.max(2).saturating_add(1);
        let children = dir
            .children_from(skip)
            .zip(first_child_offset..)
            .filter_map(move |(id, next)| {
                let e = index.entry(id);
                if is_landmark(dir.id(), e.name()) {
                    return None;
                }
                let name = match classify(e.name())? {
                    false => e.name(),
                    true => {
                        let shown = &e.name()[WHITEOUT_PREFIX.len()..];
                        // The layer's own NAME wins over its whiteout.
                        if index.child(dir.id(), shown).is_some() {
                            return None;
                        }
                        shown
                    }
                };
                Some(DirEntry {
                    name,
                    offset: next,
                    attr: self.attr_of(index.entry(index.resolve(id))),
                })
            });
        Ok(dots
            .into_iter()
            .skip(offset.min(2) as usize)
            .chain(children))
    }

    pub fn readlink(&self, ino: u64) -> Result<&str> {
        self.entry(ino)?
            .symlink_target()
            .ok_or(Error::Invalid("not a symlink"))
    }

    fn xattrs(&self, ino: u64) -> Result<Vec<(&str, &[u8])>> {
        let e = self.entry(ino)?;
        if Self::is_whiteout(&e) {
            return Ok(Vec::new());
        }
        let mut out: Vec<(&str, &[u8])> = e.xattrs().collect();
        if e.kind() == EntryKind::Dir && self.layer.index().child(e.id(), OPAQUE_MARKER).is_some() {
            out.retain(|(k, _)| *k != OPAQUE_XATTR);
            out.push((OPAQUE_XATTR, b"y"));
        }
        Ok(out)
    }

    fn sized(data: Vec<u8>, size: u32) -> Result<XattrReply> {
        if size == 0 {
            let len = u32::try_from(data.len()).map_err(|_| Error::Range {
                given: size,
                needed: data.len(),
            })?;
            return Ok(XattrReply::Size(len));
        }
        if data.len() > size as usize {
            return Err(Error::Range {
                given: size,
                needed: data.len(),
            });
        }
        Ok(XattrReply::Data(data))
    }

    pub fn getxattr(&self, ino: u64, name: &[u8], size: u32) -> Result<XattrReply> {
        let value = self
            .xattrs(ino)?
            .into_iter()
            .find(|(k, _)| k.as_bytes() == name)
            .map(|(_, v)| v.to_vec())
            .ok_or(Error::NoXattr)?;
        Self::sized(value, size)
    }

    /// Names, each followed by a NUL byte.
    pub fn listxattr(&self, ino: u64, size: u32) -> Result<XattrReply> {
        let mut list = Vec::new();
        for (k, _) in self.xattrs(ino)? {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        Self::sized(list, size)
    }

    /// The cache filesystem's real figures (kubelet's image-filesystem accounting and
    /// `df` read them; the layer's bytes land there), or, for a memory-only cache, the
    /// layer's own size with nothing free.
    pub fn statfs(&self) -> StatFs {
        if let Some(fs) = self.fetcher.cache().filesystem() {
            let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
            return StatFs {
                blocks: fs.blocks(),
                bfree: fs.blocks_free(),
                bavail: fs.blocks_available(),
                files: fs.files(),
                ffree: fs.files_free(),
                bsize: clamp(fs.block_size()),
                namelen: 255,
                frsize: clamp(fs.fragment_size()),
            };
        }
        StatFs {
            blocks: self.content_bytes.div_ceil(BLOCK_SIZE as u64),
            bfree: 0,
            bavail: 0,
            files: self.layer.index().len() as u64,
            ffree: 0,
            bsize: BLOCK_SIZE,
            namelen: 255,
            frsize: BLOCK_SIZE,
        }
    }

    /// Checks an open; returns the file handle (the inode number). Opening for writing,
    /// truncating or creating is EROFS.
    pub fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        let e = self.entry(ino)?;
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_CREAT) != 0
        {
            return Err(Error::ReadOnly);
        }
        if e.kind() == EntryKind::Dir {
            return Err(Error::IsDir);
        }
        if let Ok(mut log) = self.access.lock() {
            log.record(e.id());
        }
        Ok(e.id().0 as u64 + 1)
    }

    /// A stored whole copy of the file behind `ino`, for FUSE passthrough: the kernel
    /// reads it directly. `None` when there is none (yet) or passthrough is off.
    pub fn passthrough_file(&self, ino: u64) -> Option<std::fs::File> {
        let e = self.entry(ino).ok()?;
        self.fetcher.whole_file(e.id())
    }

    /// The last open of `ino` was closed: a file now wholly on disk gets a whole copy
    /// written in the background, so that its next open can use passthrough.
    pub fn release(&self, ino: u64) {
        if let Ok(e) = self.entry(ino) {
            self.fetcher.maybe_store_whole(e.id());
        }
    }

    /// Resolves when nothing fetched or copied is still being written to the disk
    /// cache (benchmarks and tests).
    pub async fn writes_settled(&self) {
        self.fetcher.writes_settled().await;
    }

    /// Every operation that would change the layer.
    pub fn write_op(&self) -> Error {
        Error::ReadOnly
    }

    /// Starts a read: answers at once from the cache, or says what must be fetched.
    /// Never waits for the network, so a FUSE thread may call it.
    pub fn read_start(&self, ino: u64, offset: u64, len: u32) -> Result<ReadStart> {
        self.read_start_logged(ino, offset, len, true)
    }

    /// [`LayerFs::read_start`], kept out of the access log when `log_access` is false:
    /// reads lazysnapd makes itself (a native copy) say nothing of what a container
    /// reads, which is what `lazysnap optimize` learns from the log.
    pub fn read_start_logged(
        &self,
        ino: u64,
        offset: u64,
        len: u32,
        log_access: bool,
    ) -> Result<ReadStart> {
        let e = self.entry(ino)?;
        match e.kind() {
            EntryKind::Reg => {}
            EntryKind::Dir => return Err(Error::IsDir),
            _ => return Err(Error::Invalid("not a regular file")),
        }
        let end = offset.saturating_add(len as u64).min(e.size());
        if offset >= end {
            return Ok(ReadStart::Ready(Bytes::new()));
        }
        if log_access && let Ok(mut log) = self.access.lock() {
            // Opens reach the daemon only with passthrough: the first read is the
            // first access the log can see.
            log.record(e.id());
            log.read(e.id(), offset..end);
        }
        // A program (or the kernel loading one) reads its start first.
        let examine = log_access && offset == 0;
        let wants: Vec<_> = self
            .layer
            .chunks_for_range(e.id(), offset, end - offset)
            .iter()
            .map(|c| (e.id(), *c))
            .collect();
        match self.fetcher.read(e.id(), (offset, end, e.size()), &wants)? {
            fetch::ReadStart::Ready(parts) => {
                let bytes = fetch::joined(parts);
                self.fetcher.note_served(&wants, offset, end);
                if examine {
                    self.fetcher.examine_soon(e.id(), &bytes);
                }
                Ok(ReadStart::Ready(bytes))
            }
            fetch::ReadStart::Fetch => Ok(ReadStart::Fetch(PendingRead {
                wants,
                offset,
                end,
                examine,
            })),
        }
    }

    /// Finishes a read that needs the network: fetches (or joins fetches of) the
    /// missing chunks, all verified.
    pub fn read_fetch(&self, pending: PendingRead) -> impl Future<Output = Result<Bytes>> + use<> {
        let fetcher = Arc::clone(&self.fetcher);
        async move {
            let PendingRead {
                wants,
                offset,
                end,
                examine,
            } = pending;
            let chunks = fetcher.fetch_for_read(&wants).await?;
            let bytes = assemble(&wants, &chunks, offset, end);
            fetcher.note_served(&wants, offset, end);
            if examine && let Some((node, _)) = wants.first() {
                fetcher.examine_soon(*node, &bytes);
            }
            Ok(bytes)
        }
    }

    /// A whole read, waiting for the network if needed (tests and non-FUSE callers).
    pub async fn read(&self, ino: u64, offset: u64, len: u32) -> Result<Bytes> {
        match self.read_start(ino, offset, len)? {
            ReadStart::Ready(b) => Ok(b),
            ReadStart::Fetch(p) => self.read_fetch(p).await,
        }
    }
}
