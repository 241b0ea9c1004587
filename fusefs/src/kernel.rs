//! The FUSE wire protocol (`linux/fuse.h`), as much of it as a read-only filesystem
//! serves: request headers and arguments decoded from bytes, replies encoded to bytes.
//! Pure: no fd, no syscalls, so it is unit-tested byte for byte.
//!
//! We speak the protocol ourselves instead of through a library because a successor
//! daemon must serve a connection whose INIT an earlier process already answered, and
//! FUSE libraries insist on performing INIT themselves.

use crate::core::{Attr, StatFs};

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;

/// The minor version we answer with at most (7.40: max_stack_depth, backing_id and
/// FUSE_NOTIFY_RESEND exist). Older kernels get their own minor back.
pub const MAX_MINOR: u32 = 40;
/// The oldest kernel protocol served: every reply layout used here is fixed since.
pub const MIN_MINOR: u32 = 23;

pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const TMPFILE: u32 = 51;
}

/// INIT flags (`flags | flags2 << 32`).
pub mod init {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const READDIRPLUS_AUTO: u64 = 1 << 14;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const CACHE_SYMLINKS: u64 = 1 << 23;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const PASSTHROUGH: u64 = 1 << 37;
    /// The kernel re-queues unanswered requests on FUSE_NOTIFY_RESEND (Linux 6.9+).
    pub const HAS_RESEND: u64 = 1 << 39;
    /// Idmapped mounts of this filesystem are allowed (Linux 6.12+, needs
    /// default_permissions): user-namespaced containers see its files owned by their IDs.
    pub const ALLOW_IDMAP: u64 = 1 << 40;
}

pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

const NOTIFY_RESEND: i32 = 7;

/// A request's fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    /// The thread that made the request (for reads the kernel makes ahead, the reader's).
    pub pid: u32,
}

/// Splits a request into its header and its argument bytes; None if malformed.
pub fn parse(buf: &[u8]) -> Option<(InHeader, Args<'_>)> {
    let mut a = Args(buf);
    let len = a.u32()?;
    let opcode = a.u32()?;
    let unique = a.u64()?;
    let nodeid = a.u64()?;
    // uid, gid: permission checks are the kernel's.
    a.skip(8)?;
    let pid = a.u32()?;
    // total_extlen + padding.
    a.skip(4)?;
    let body = buf.get(IN_HEADER_LEN..len as usize)?;
    Some((
        InHeader {
            len,
            opcode,
            unique,
            nodeid,
            pid,
        },
        Args(body),
    ))
}

/// A cursor over argument bytes (native endian, as the kernel writes them).
pub struct Args<'a>(&'a [u8]);

impl<'a> Args<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_ne_bytes(self.take(4)?.try_into().ok()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_ne_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A NUL-terminated name, without the NUL.
    pub fn cstr(&mut self) -> Option<&'a [u8]> {
        let end = self.0.iter().position(|&b| b == 0)?;
        let s = self.take(end + 1)?;
        Some(&s[..end])
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// The arguments of READ and READDIR(PLUS) that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
}

pub fn read_in(a: &mut Args<'_>) -> Option<ReadIn> {
    Some(ReadIn {
        fh: a.u64()?,
        offset: a.u64()?,
        size: a.u32()?,
    })
}

/// What the kernel offers in INIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
}

pub fn init_in(a: &mut Args<'_>) -> Option<InitIn> {
    let major = a.u32()?;
    let minor = a.u32()?;
    let max_readahead = a.u32()?;
    let mut flags = a.u32()? as u64;
    if flags & init::INIT_EXT != 0 {
        flags |= (a.u32()? as u64) << 32;
    }
    Some(InitIn {
        major,
        minor,
        max_readahead,
        flags,
    })
}

/// What we answer INIT with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOut {
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
    pub max_background: u16,
    pub max_write: u32,
    pub max_pages: u16,
    pub max_stack_depth: u32,
}

pub fn init_out(o: &InitOut) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    put32(&mut v, 7);
    put32(&mut v, o.minor);
    put32(&mut v, o.max_readahead);
    put32(&mut v, o.flags as u32);
    put16(&mut v, o.max_background);
    // congestion_threshold: three quarters of max_background, as libfuse does.
    put16(&mut v, o.max_background / 4 * 3);
    put32(&mut v, o.max_write);
    put32(&mut v, 1); // time_gran: nanoseconds
    put16(&mut v, o.max_pages);
    put16(&mut v, 0); // map_alignment
    put32(&mut v, (o.flags >> 32) as u32);
    put32(&mut v, o.max_stack_depth);
    v.resize(64, 0);
    v
}

fn put16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_ne_bytes());
}
fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_ne_bytes());
}
fn put64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_ne_bytes());
}

/// A reply's header: `len` counts the header too; `error` is 0 or a negated errno.
pub fn out_header(len: usize, error: i32, unique: u64) -> [u8; OUT_HEADER_LEN] {
    let mut h = [0u8; OUT_HEADER_LEN];
    h[..4].copy_from_slice(&(len as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..].copy_from_slice(&unique.to_ne_bytes());
    h
}

/// FUSE_NOTIFY_RESEND: the kernel puts every request read but not yet answered on
/// this connection back in its queue (marked with the resend bit in `unique`).
pub fn notify_resend() -> [u8; OUT_HEADER_LEN] {
    out_header(OUT_HEADER_LEN, NOTIFY_RESEND, 0)
}

/// `struct fuse_attr` (88 bytes). Every time is the entry's mtime: the layer is
/// immutable.
fn attr(v: &mut Vec<u8>, a: &Attr) {
    put64(v, a.ino);
    put64(v, a.size);
    put64(v, a.blocks);
    let secs = a.mtime.secs as u64;
    let nanos = a.mtime.nanos;
    for _ in 0..3 {
        put64(v, secs);
    }
    for _ in 0..3 {
        put32(v, nanos);
    }
    put32(v, a.mode());
    put32(v, a.nlink);
    put32(v, a.uid);
    put32(v, a.gid);
    put32(v, a.rdev);
    put32(v, a.blksize);
    put32(v, 0); // flags
}

/// `struct fuse_entry_out` (128 bytes); None is a negative entry (node id 0) that the
/// kernel may cache for `ttl`.
pub fn entry_out(v: &mut Vec<u8>, a: Option<&Attr>, ttl: std::time::Duration) {
    put64(v, a.map_or(0, |a| a.ino));
    put64(v, 0); // generation: inode numbers are never reused within a mount
    for _ in 0..2 {
        put64(v, ttl.as_secs());
    }
    for _ in 0..2 {
        put32(v, ttl.subsec_nanos());
    }
    match a {
        Some(a) => attr(v, a),
        None => v.resize(v.len() + 88, 0),
    }
}

/// `struct fuse_attr_out` (104 bytes).
pub fn attr_out(a: &Attr, ttl: std::time::Duration) -> Vec<u8> {
    let mut v = Vec::with_capacity(104);
    put64(&mut v, ttl.as_secs());
    put32(&mut v, ttl.subsec_nanos());
    put32(&mut v, 0);
    attr(&mut v, a);
    v
}

/// `struct fuse_open_out` (16 bytes).
pub fn open_out(fh: u64, open_flags: u32, backing_id: i32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    put64(&mut v, fh);
    put32(&mut v, open_flags);
    v.extend_from_slice(&backing_id.to_ne_bytes());
    v
}

/// `struct fuse_statfs_out` (80 bytes).
pub fn statfs_out(s: &StatFs) -> Vec<u8> {
    let mut v = Vec::with_capacity(80);
    for x in [s.blocks, s.bfree, s.bavail, s.files, s.ffree] {
        put64(&mut v, x);
    }
    put32(&mut v, s.bsize);
    put32(&mut v, s.namelen);
    put32(&mut v, s.frsize);
    v.resize(80, 0);
    v
}

/// `struct fuse_getxattr_out` (8 bytes): the size a probe asked for.
pub fn xattr_size(size: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(8);
    put32(&mut v, size);
    put32(&mut v, 0);
    v
}

fn dirent_len(name: &str) -> usize {
    (24 + name.len()).next_multiple_of(8)
}

/// Appends a `struct fuse_dirent` unless it would take `v` past `limit` bytes;
/// returns whether it was added.
pub fn dirent(v: &mut Vec<u8>, limit: usize, ino: u64, off: u64, mode: u32, name: &str) -> bool {
    if v.len() + dirent_len(name) > limit {
        return false;
    }
    push_dirent(v, ino, off, mode, name);
    true
}

fn push_dirent(v: &mut Vec<u8>, ino: u64, off: u64, mode: u32, name: &str) {
    let start = v.len();
    put64(v, ino);
    put64(v, off);
    put32(v, name.len() as u32);
    put32(v, (mode & libc::S_IFMT) >> 12);
    v.extend_from_slice(name.as_bytes());
    v.resize(start + dirent_len(name), 0);
}

/// Appends a `struct fuse_direntplus` (entry and dirent) within `limit`, as
/// [`dirent`].
pub fn direntplus(
    v: &mut Vec<u8>,
    limit: usize,
    a: &Attr,
    off: u64,
    name: &str,
    ttl: std::time::Duration,
) -> bool {
    if v.len() + 128 + dirent_len(name) > limit {
        return false;
    }
    entry_out(v, Some(a), ttl);
    push_dirent(v, a.ino, off, a.mode(), name);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::FileKind;
    use std::time::Duration;

    fn sample() -> Attr {
        Attr {
            ino: 7,
            kind: FileKind::RegularFile,
            perm: 0o644,
            nlink: 1,
            uid: 1,
            gid: 2,
            size: 100,
            blocks: 1,
            rdev: 0,
            mtime: estargz::Timestamp {
                secs: 1_700_000_000,
                nanos: 5,
            },
            blksize: 4096,
        }
    }

    #[test]
    fn a_request_is_split_into_header_and_arguments() {
        let mut req = Vec::new();
        put32(&mut req, 40 + 6);
        put32(&mut req, op::LOOKUP);
        put64(&mut req, 99 | 1 << 63);
        put64(&mut req, 1);
        req.resize(40, 0);
        req.extend_from_slice(b"motd\0");
        req.push(0xff); // within len: part of the arguments
        req.extend_from_slice(b"trailing garbage beyond len");
        let (h, mut a) = parse(&req).unwrap();
        assert_eq!(h.opcode, op::LOOKUP);
        assert_eq!(
            h.unique,
            99 | 1 << 63,
            "the resend bit is kept for the reply"
        );
        assert_eq!(h.nodeid, 1);
        assert_eq!(a.cstr().unwrap(), b"motd");
        assert_eq!(a.len(), 1);
        // A length beyond the buffer is malformed, not a panic.
        req[0] = 0xff;
        req[1] = 0xff;
        assert!(parse(&req).is_none());
        assert!(parse(&req[..10]).is_none());
    }

    #[test]
    fn init_reads_flags2_only_with_init_ext() {
        let mut v = Vec::new();
        for x in [7u32, 44, 131072, init::INIT_EXT as u32 | 1, 1 << 7] {
            put32(&mut v, x);
        }
        let i = init_in(&mut Args(&v)).unwrap();
        assert_eq!(i.minor, 44);
        assert_eq!(i.flags, init::INIT_EXT | 1 | init::HAS_RESEND);
        v[12..16].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(init_in(&mut Args(&v)).unwrap().flags, 1);
    }

    #[test]
    fn replies_have_the_kernel_struct_sizes() {
        let a = sample();
        let ttl = Duration::from_millis(1500);
        let mut e = Vec::new();
        entry_out(&mut e, Some(&a), ttl);
        assert_eq!(e.len(), 128);
        assert_eq!(u64::from_ne_bytes(e[16..24].try_into().unwrap()), 1);
        assert_eq!(
            u32::from_ne_bytes(e[32..36].try_into().unwrap()),
            500_000_000
        );
        // mode sits after ino, size, blocks, three times and three nanos.
        let mode_at = 40 + 6 * 8 + 3 * 4;
        assert_eq!(
            u32::from_ne_bytes(e[mode_at..mode_at + 4].try_into().unwrap()),
            libc::S_IFREG | 0o644
        );
        let mut neg = Vec::new();
        entry_out(&mut neg, None, ttl);
        assert_eq!((neg.len(), &neg[..8]), (128, &[0u8; 8][..]));
        assert_eq!(attr_out(&a, ttl).len(), 104);
        assert_eq!(open_out(7, FOPEN_KEEP_CACHE, 0).len(), 16);
        let s = StatFs {
            blocks: 1,
            bfree: 0,
            bavail: 0,
            files: 3,
            ffree: 0,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        };
        assert_eq!(statfs_out(&s).len(), 80);
        let o = InitOut {
            minor: 40,
            max_readahead: 1 << 20,
            flags: init::HAS_RESEND | init::ASYNC_READ,
            max_background: 64,
            max_write: 4096,
            max_pages: 256,
            max_stack_depth: 1,
        };
        let b = init_out(&o);
        assert_eq!(b.len(), 64);
        assert_eq!(u16::from_ne_bytes(b[18..20].try_into().unwrap()), 48);
        assert_eq!(u32::from_ne_bytes(b[32..36].try_into().unwrap()), 1 << 7);
        assert_eq!(u32::from_ne_bytes(b[36..40].try_into().unwrap()), 1);
    }

    #[test]
    fn dirents_are_padded_to_eight_bytes_and_stop_at_the_limit() {
        let mut v = Vec::new();
        assert!(dirent(&mut v, 64, 2, 3, libc::S_IFDIR | 0o755, "abc"));
        assert_eq!(v.len(), 32);
        assert_eq!(u32::from_ne_bytes(v[20..24].try_into().unwrap()), 4); // DT_DIR
        assert_eq!(&v[24..27], b"abc");
        assert!(dirent(&mut v, 64, 3, 4, libc::S_IFREG, "12345678"));
        assert_eq!(v.len(), 64);
        assert!(!dirent(&mut v, 64, 4, 5, libc::S_IFREG, "x"));
        assert_eq!(v.len(), 64, "an entry that does not fit is not written");
        let mut p = Vec::new();
        assert!(direntplus(&mut p, 1000, &sample(), 9, "f", Duration::ZERO));
        assert_eq!(p.len(), 128 + 32);
    }

    #[test]
    fn resend_is_a_notification_with_code_7() {
        let n = notify_resend();
        assert_eq!(u32::from_ne_bytes(n[..4].try_into().unwrap()), 16);
        assert_eq!(i32::from_ne_bytes(n[4..8].try_into().unwrap()), 7);
        assert_eq!(&n[8..], &[0u8; 8]);
    }
}
