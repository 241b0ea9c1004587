//! Digests of a cached chunk's pieces, so that part of a chunk can be read back from
//! disk and checked without reading and hashing all of it.
//!
//! A chunk's own digest covers all of its bytes (4 MiB in `ctr-remote`'s images): a
//! program that faults 128 KiB of a mapped file here and there would cost a whole
//! chunk's disk read and hash per fault once the chunk has left the memory tier, which
//! is why the tier used to keep such chunks for half a second after each touch. When a
//! chunk read in part leaves the tier, the sha256 of each of its [`PIECE`]s is taken
//! from the bytes in memory (already checked against the chunk's digest); a later read
//! of part of it reads only the pieces it covers and checks them against those.
//! The digests live in memory only: after a restart a chunk is checked whole once more.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use estargz::{Sha256Sum, lock};

use crate::cache::DIRECT_ALIGN;

/// The grain of a partial read from disk: the kernel's read-ahead for a mapped file
/// asks for 128 KiB, so a fault reads and hashes one or two pieces.
pub(crate) const PIECE: usize = 64 << 10;

/// Chunks no bigger than this are read whole: their pieces would save little.
const MIN_CHUNK: usize = 4 * PIECE;

/// Chunks whose pieces are known, at most: 2 KiB each for a 4 MiB chunk, 2 MiB in all.
const MAX_CHUNKS: usize = 1024;

/// The digests of one chunk's pieces, in order, and the chunk's length.
pub(crate) struct PieceDigests {
    len: u64,
    digests: Box<[Sha256Sum]>,
}

impl PieceDigests {
    /// The pieces of `data`, which must be the chunk's verified bytes; `None` for a
    /// chunk too small to be worth it.
    pub(crate) fn of(data: &[u8]) -> Option<PieceDigests> {
        (data.len() > MIN_CHUNK).then(|| PieceDigests {
            len: data.len() as u64,
            digests: data.chunks(PIECE).map(Sha256Sum::of).collect(),
        })
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The chunk's bytes `range` from the file at `path` (its data starts at offset 0),
    /// if every piece they touch hashes to its digest; the error says what went wrong.
    pub(crate) fn read(&self, path: &Path, range: Range<u64>) -> Result<Bytes, String> {
        if range.start >= range.end || range.end > self.len {
            return Err(format!(
                "range {range:?} is not within the chunk's {} bytes",
                self.len
            ));
        }
        let first = (range.start / PIECE as u64) as usize;
        let last = range.end.div_ceil(PIECE as u64) as usize;
        let from = (first * PIECE) as u64;
        let to = ((last * PIECE) as u64).min(self.len);
        let bytes = read_direct(path, from, (to - from) as usize).map_err(|e| e.to_string())?;
        if bytes.len() as u64 != to - from {
            return Err(format!(
                "the file ends {} bytes early",
                to - from - bytes.len() as u64
            ));
        }
        for (i, piece) in bytes.chunks(PIECE).enumerate() {
            if Sha256Sum::of(piece) != self.digests[first + i] {
                return Err(format!("piece {} does not match its digest", first + i));
            }
        }
        let at = (range.start - from) as usize;
        Ok(bytes.slice(at..at + (range.end - range.start) as usize))
    }
}

/// The chunks whose pieces are known, the oldest forgotten first past [`MAX_CHUNKS`].
#[derive(Default)]
pub(crate) struct Pieces {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    map: HashMap<Sha256Sum, Arc<PieceDigests>>,
    order: VecDeque<Sha256Sum>,
}

impl Pieces {
    pub(crate) fn get(&self, digest: &Sha256Sum) -> Option<Arc<PieceDigests>> {
        lock(&self.table).map.get(digest).cloned()
    }

    pub(crate) fn contains(&self, digest: &Sha256Sum) -> bool {
        lock(&self.table).map.contains_key(digest)
    }

    pub(crate) fn insert(&self, digest: Sha256Sum, pieces: PieceDigests) {
        let mut t = lock(&self.table);
        if t.map.insert(digest, Arc::new(pieces)).is_none() {
            t.order.push_back(digest);
        }
        while t.map.len() > MAX_CHUNKS {
            let Some(old) = t.order.pop_front() else {
                break;
            };
            t.map.remove(&old);
        }
    }

    pub(crate) fn remove(&self, digest: &Sha256Sum) {
        let mut t = lock(&self.table);
        if t.map.remove(digest).is_some() {
            t.order.retain(|d| d != digest);
        }
    }
}

/// `len` bytes at `offset` (a multiple of [`DIRECT_ALIGN`]) of the file at `path`,
/// read with O_DIRECT as whole chunks are (the mount's page cache will hold them);
/// buffered where O_DIRECT is refused. Fewer bytes where the file ends.
fn read_direct(path: &Path, offset: u64, len: usize) -> std::io::Result<Bytes> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    let (file, aligned) = match direct {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (std::fs::File::open(path)?, false),
        Err(e) => return Err(e),
    };
    let padded = if aligned {
        len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
    } else {
        len
    };
    let mut buf = vec![0u8; padded + DIRECT_ALIGN];
    let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
    let mut got = 0;
    while got < len {
        match file.read_at(&mut buf[start + got..start + padded], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Bytes::from(buf).slice(start..start + got.min(len)))
}
