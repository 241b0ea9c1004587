//! The chunk cache shared by every mounted layer of the daemon: verified, decompressed
//! chunks keyed by chunk digest (so identical chunks are shared across layers and
//! images), in a memory LRU in front of a disk LRU, both bounded in bytes.
//!
//! On disk a chunk lives at `chunks/<2 hex>/<64 hex>`, named by its sha256. It is written
//! to `tmp/` and renamed into place, so a crash never leaves a torn file under its final
//! name; it is not fsynced, because every load re-hashes what it reads (the whole file,
//! or the pieces a read wants against digests taken from verified bytes, see
//! [`crate::pieces`]) and drops the file on a mismatch (a torn or bit-rotted file is a
//! miss, never wrong data).
//!
//! Whole files assembled from verified chunks (for FUSE passthrough, where the kernel
//! reads the file itself and nobody can re-hash) live at `files/<2 hex>/<64 hex>`, named
//! by a key of their chunk list. They are fsynced before they are renamed into place, so
//! a crash cannot leave a torn one under its name. Both kinds share one disk budget.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
// Poison-tolerant: a panic while holding the lock leaves a consistent LRU (no multi-step
// invariants span an unwind), so poisoning is not a reason to stop serving.
use estargz::{Sha256Sum, lock};

use crate::buffers::BIG_BUFFERS;
use crate::error::{Error, Result};
use crate::lru::Lru;
use crate::pieces::{PieceDigests, Pieces};

/// Where and how much the shared cache keeps.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Directory of the disk cache (created if missing), e.g. `/var/lib/lazysnap/cache`.
    pub dir: PathBuf,
    /// Bytes of decompressed chunks kept in memory across all layers. Default 32 MiB:
    /// the kernel's page cache keeps what containers read again, so this only has to
    /// hold chunks between their fetch and their last read (a 4 MiB chunk is read in
    /// several FUSE reads; fetched ahead, it waits here for its reader). With 256 MiB,
    /// lazysnapd's resident set after a cold start was 2-4x stargz-snapshotter's.
    pub memory_bytes: u64,
    /// Bytes of decompressed chunks kept on disk across all layers; 0 disables the disk
    /// cache. Default 10 GiB.
    pub disk_bytes: u64,
    /// The cache never fills the filesystem it is on past this percentage of its size:
    /// before a write that would, it evicts its own oldest files, and if that is not
    /// enough it skips the write (the chunk is served all the same). 100: no limit
    /// but the disk's. Default 90.
    pub max_fill_percent: u8,
}

impl CacheConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CacheConfig {
            dir: dir.into(),
            memory_bytes: 32 << 20,
            disk_bytes: 10 << 30,
            max_fill_percent: 90,
        }
    }
}

/// What the disk cache has had to give up, for status and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheWriteStats {
    /// Writes that failed, and of those, how many for want of space (ENOSPC, EDQUOT).
    pub write_errors: u64,
    pub no_space_errors: u64,
    /// Writes skipped because the filesystem was at `max_fill_percent` and nothing of
    /// the cache's was left to evict.
    pub skipped_full: u64,
    /// Entries evicted to keep the filesystem below `max_fill_percent`.
    pub evicted_for_space: u64,
    /// Entries removed because no mounted layer uses them any more.
    pub swept: u64,
}

/// The daemon-wide chunk cache; cheap to clone.
#[derive(Clone)]
pub struct SharedCache {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    disk_enabled: bool,
    memory: Mutex<Lru<Bytes>>,
    #[cfg_attr(not(test), allow(dead_code))]
    memory_capacity: u64,
    /// Which chunks and whole files are on disk and their recency; the files are the
    /// data.
    disk: Mutex<Lru<Stored>>,
    /// One gate per chunk being loaded from disk: the kernel's read-ahead sends several
    /// reads of one chunk at once from different FUSE threads, and without the gate each
    /// would read and hash the whole chunk file.
    loading: Mutex<HashMap<Sha256Sum, Arc<Mutex<()>>>>,
    tmp_seq: AtomicU64,
    max_fill_percent: u8,
    write_errors: AtomicU64,
    no_space_errors: AtomicU64,
    skipped_full: AtomicU64,
    evicted_for_space: AtomicU64,
    swept: AtomicU64,
    /// Chunks read through whose disk write has not finished: they leave the memory
    /// tier once it has.
    read_through: Mutex<std::collections::HashSet<Sha256Sum>>,
    pieces: Pieces,
}

/// Read-through chunks waiting for their disk writes, at most (they are written within
/// moments; a bound keeps a failing disk from growing the set).
const MAX_READ_THROUGH: usize = 4096;

/// How long a chunk nobody has read yet (prefetched, or fetched ahead of a reader)
/// stays in the memory tier unused once the disk holds it too (see
/// [`SharedCache::release_unused_memory`]); a read of it after this reads the pieces
/// it wants from disk. With whole chunks read back and hashed, 250 ms made cold starts
/// about 2% slower than 500 ms (`bench/results/memory-tier-unused.md`); with pieces,
/// 250 ms is as fast (`bench/results/memory-pieces.md`).
const CHUNK_IDLE: std::time::Duration = std::time::Duration::from_millis(250);

/// How long a chunk read in part stays in the memory tier unused once the disk holds
/// it: the kernel asks for the rest of a piece it is reading within moments, and a read
/// after this costs a piece or two from disk (see [`crate::pieces`]).
const PART_IDLE: std::time::Duration = std::time::Duration::from_millis(100);

/// How often, at most, memory let go is handed back to the kernel. Measured both ways:
/// handing the buffer pool and free heap pages back after the tier lets go of chunks,
/// even while containers read, costs no cold-start time at this pace and keeps up to
/// 11 MB less resident at a container's exit than doing it only once the whole tier is
/// unused (`bench/results/memory-tier-unused.md`). With a hand-back at every pass of
/// the release (25 ms) the JVM started 1.04x and 1.10x slower in one A/B run of two
/// starts a side; at this pace, 1.00x and 0.97x in four (`bench/results/memory-pieces.md`).
const HAND_BACK_EVERY: std::time::Duration = std::time::Duration::from_millis(125);

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache")
            .field("dir", &self.inner.dir)
            .field("memory_bytes_used", &self.memory_bytes_used())
            .field("disk_bytes_used", &self.disk_bytes_used())
            .finish()
    }
}

/// A named chunk file's content, if the digest after it is the content's.
fn named_content(data: Bytes) -> Option<Bytes> {
    let content_len = data.len().checked_sub(32)?;
    let content = data.slice(..content_len);
    (Sha256Sum::of(&content).0[..] == data[content_len..]).then_some(content)
}

/// What a disk cache entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// A chunk under its content's digest.
    Chunk,
    /// A chunk under a name (a SOCI span piece), its content's digest after it.
    Named,
    File,
}

impl Stored {
    fn dir(self) -> &'static str {
        match self {
            Stored::Chunk => "chunks",
            Stored::Named => "named",
            Stored::File => "files",
        }
    }

    fn is_chunk(self) -> bool {
        matches!(self, Stored::Chunk | Stored::Named)
    }
}

impl SharedCache {
    /// Opens (or creates) the cache directory: removes temp files a crash left, and
    /// indexes the chunks present, oldest modification first, trimming to the budget.
    pub fn open(config: CacheConfig) -> Result<SharedCache> {
        let dir = config.dir.clone();
        let disk_enabled = config.disk_bytes > 0;
        let mut disk = Lru::new(config.disk_bytes);
        if disk_enabled {
            let tmp = dir.join("tmp");
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)
                    .map_err(|e| Error::io(format!("cleaning {}", tmp.display()), e))?;
            }
            for d in [
                dir.join("chunks"),
                dir.join("named"),
                dir.join("files"),
                tmp,
            ] {
                std::fs::create_dir_all(&d)
                    .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
            }
            let mut found = Vec::new();
            for kind in [Stored::Chunk, Stored::Named, Stored::File] {
                found.extend(
                    scan(&dir.join(kind.dir()))?
                        .into_iter()
                        .map(|(digest, size, mtime)| (digest, size, mtime, kind)),
                );
            }
            found.sort_by_key(|(_, _, mtime, _)| *mtime);
            for (digest, size, _, kind) in found {
                for (victim, kind) in disk.insert(digest, kind, size) {
                    remove_stored(&dir, &victim, kind);
                }
            }
        }
        Ok(SharedCache {
            inner: Arc::new(Inner {
                dir,
                disk_enabled,
                memory: Mutex::new(Lru::new(config.memory_bytes)),
                memory_capacity: config.memory_bytes,
                disk: Mutex::new(disk),
                loading: Mutex::new(HashMap::new()),
                tmp_seq: AtomicU64::new(0),
                max_fill_percent: config.max_fill_percent.clamp(1, 100),
                write_errors: AtomicU64::new(0),
                no_space_errors: AtomicU64::new(0),
                skipped_full: AtomicU64::new(0),
                evicted_for_space: AtomicU64::new(0),
                swept: AtomicU64::new(0),
                read_through: Mutex::new(std::collections::HashSet::new()),
                pieces: Pieces::default(),
            }),
        })
    }

    pub(crate) fn disk_enabled(&self) -> bool {
        self.inner.disk_enabled
    }

    /// The memory tier's size in bytes.
    pub(crate) fn memory_capacity(&self) -> u64 {
        self.inner.memory_capacity
    }

    pub fn memory_bytes_used(&self) -> u64 {
        lock(&self.inner.memory).bytes()
    }

    pub fn disk_bytes_used(&self) -> u64 {
        lock(&self.inner.disk).bytes()
    }

    /// The figures of the filesystem the disk cache lives on, which is where a lazy
    /// layer's bytes end up: what statfs on a lazy mount reports. `None` for a cache kept
    /// in memory only.
    pub fn filesystem(&self) -> Option<nix::sys::statvfs::Statvfs> {
        if !self.inner.disk_enabled {
            return None;
        }
        nix::sys::statvfs::statvfs(&self.inner.dir).ok()
    }

    /// True when the chunk is in memory or on disk (without reading it).
    pub fn contains(&self, digest: &Sha256Sum) -> bool {
        lock(&self.inner.memory).contains(digest)
            || lock(&self.inner.disk)
                .peek(digest)
                .is_some_and(Stored::is_chunk)
    }

    /// The chunk if it is in memory; a hit counts as a use of it (a miss touches
    /// nothing, so the background fetch's lookups keep no chunk resident).
    pub(crate) fn get_memory(&self, digest: &Sha256Sum) -> Option<Bytes> {
        lock(&self.inner.memory).get(digest)
    }

    /// Takes the chunk out of the memory tier; its buffer is freed (or goes back to its
    /// pool) after the lock is let go.
    fn drop_from_memory(&self, digest: &Sha256Sum) -> Option<Bytes> {
        lock(&self.inner.memory).remove(digest)
    }

    /// Lets go of the memory tier's chunks that the disk holds too and that nobody has
    /// used for `idle` (those read in part, for `part_idle`); returns the bytes let go.
    /// Their pieces' digests are taken first, so a later read of part of one reads only
    /// that part from disk. The tier bridges a chunk's fetch and its reads; a container
    /// that reads the chunk again later finds it in its mount's page cache or on disk, so
    /// the daemon need not keep what a container stopped reading (the rest of a chunk
    /// read in part, a prefetched chunk not read yet).
    pub fn release_unused_memory(
        &self,
        idle: std::time::Duration,
        part_idle: std::time::Duration,
    ) -> u64 {
        if !self.inner.disk_enabled {
            return 0;
        }
        let idle_ms = idle.as_millis() as u64;
        let unused: Vec<Sha256Sum> = lock(&self.inner.memory)
            .unused_for(part_idle.min(idle))
            .into_iter()
            .filter(|(_, unused_ms, read_in_part)| *unused_ms >= idle_ms || *read_in_part)
            .map(|(d, ..)| d)
            .collect();
        let on_disk: Vec<Sha256Sum> = {
            let disk = lock(&self.inner.disk);
            unused
                .into_iter()
                .filter(|digest| disk.peek(digest).is_some_and(Stored::is_chunk))
                .collect()
        };
        let mut released = 0;
        for digest in on_disk {
            let Some(data) = self.drop_from_memory(&digest) else {
                continue;
            };
            if !self.inner.pieces.contains(&digest)
                && let Some(pieces) = PieceDigests::of(&data)
            {
                self.inner.pieces.insert(digest, pieces);
            }
            released += data.len() as u64;
        }
        released
    }

    /// A reader has read part of the chunk (see `fetch::served`): unused, it leaves the
    /// memory tier sooner.
    pub(crate) fn read_in_part(&self, digest: Sha256Sum) {
        lock(&self.inner.memory).mark(&digest);
    }

    /// Every byte of the chunk has been read (see `fetch::served`): it leaves the memory
    /// tier, now if the disk holds it, else once its disk write is done. A chunk the disk
    /// will not take stays, as the only copy.
    pub(crate) fn read_through(&self, digest: Sha256Sum) {
        if !self.inner.disk_enabled || !lock(&self.inner.memory).contains(&digest) {
            return;
        }
        if lock(&self.inner.disk)
            .peek(&digest)
            .is_some_and(Stored::is_chunk)
        {
            self.drop_from_memory(&digest);
            return;
        }
        let mut pending = lock(&self.inner.read_through);
        if pending.len() >= MAX_READ_THROUGH {
            pending.clear();
        }
        pending.insert(digest);
    }

    /// Runs [`SharedCache::release_unused_memory`] for the daemon's life, four times
    /// within the time a chunk read in part stays unused (100 ms). What was let go goes
    /// back to the kernel (the buffer pool, free heap pages) at most every 125 ms.
    pub async fn release_unused_memory_forever(self) {
        let mut since_hand_back = 0u64;
        let mut last_hand_back = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(PART_IDLE / 4).await;
            if self.memory_bytes_used() == 0 && since_hand_back == 0 {
                continue;
            }
            let this = self.clone();
            let released = tokio::task::spawn_blocking(move || {
                this.release_unused_memory(CHUNK_IDLE, PART_IDLE)
            })
            .await
            .unwrap_or(0);
            if released > 0 {
                tracing::debug!(bytes = released, "unused chunks left the memory tier");
            }
            since_hand_back += released;
            if since_hand_back > 0 && last_hand_back.elapsed() >= HAND_BACK_EVERY {
                BIG_BUFFERS.release();
                crate::heap::return_free_pages();
                since_hand_back = 0;
                last_hand_back = tokio::time::Instant::now();
            }
        }
    }

    /// True when the chunk is in memory (a read of it costs no I/O).
    pub(crate) fn in_memory(&self, digest: &Sha256Sum) -> bool {
        lock(&self.inner.memory).contains(digest)
    }

    /// The chunk from memory, or from disk after checking its sha256 (then kept in
    /// memory too). `None` is a miss; a chunk whose length is not the `size` the TOC
    /// gives is an error (the TOC is wrong: no read of it may be answered).
    pub(crate) fn get(&self, digest: &Sha256Sum, size: u64) -> Result<Option<Bytes>> {
        if let Some(b) = self.get_memory(digest) {
            return expect_len(digest, size, b).map(Some);
        }
        if !self.inner.disk_enabled
            || !lock(&self.inner.disk)
                .get(digest)
                .is_some_and(Stored::is_chunk)
        {
            return Ok(None);
        }
        let gate = Arc::clone(lock(&self.inner.loading).entry(*digest).or_default());
        let loaded = {
            let _held = lock(&gate);
            // Whoever held the gate before us may have loaded it already.
            match self.get_memory(digest) {
                Some(b) => Some(b),
                None => self.load(digest),
            }
        };
        let mut loading = lock(&self.inner.loading);
        // The table's reference and ours: nobody else is waiting, the entry can go.
        if Arc::strong_count(&gate) == 2 {
            loading.remove(digest);
        }
        drop(loading);
        loaded.map(|b| expect_len(digest, size, b)).transpose()
    }

    /// The chunk's bytes `range` (within its `size`): from memory, else the pieces they
    /// touch from disk if their digests are known (see [`crate::pieces`]), else the
    /// whole chunk from disk as [`SharedCache::get`] does. `None` is a miss.
    pub(crate) fn get_part(
        &self,
        digest: &Sha256Sum,
        size: u64,
        range: std::ops::Range<u64>,
    ) -> Result<Option<Bytes>> {
        let slice = |b: Bytes| b.slice(range.start as usize..range.end as usize);
        if let Some(b) = self.get_memory(digest) {
            return expect_len(digest, size, b).map(|b| Some(slice(b)));
        }
        let kind = if self.inner.disk_enabled {
            lock(&self.inner.disk).get(digest).filter(|k| k.is_chunk())
        } else {
            None
        };
        let Some(kind) = kind else {
            return Ok(None);
        };
        if let Some(pieces) = self.inner.pieces.get(digest)
            && pieces.len() == size
            && let Some(span) = pieces.covering(&range)
        {
            let path = stored_path(&self.inner.dir, digest, kind);
            let len = (span.end - span.start) as usize;
            let read = read_uncached(&path, span.start, len)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    if b.len() < len {
                        return Err(format!("the file ends {} bytes early", len - b.len()));
                    }
                    pieces.check(span.start, &b).map(|()| b)
                });
            match read {
                Ok(b) => {
                    let at = (range.start - span.start) as usize;
                    return Ok(Some(b.slice(at..at + (range.end - range.start) as usize)));
                }
                Err(e) => {
                    if path.exists() {
                        tracing::warn!(path = %path.display(), error = %e,
                            "cached chunk is corrupt; dropping it");
                    } else {
                        // Evicted by another thread since the index said it was there.
                        tracing::debug!(path = %path.display(), "cached chunk is gone");
                    }
                    self.inner.pieces.remove(digest);
                    lock(&self.inner.disk).remove(digest);
                    remove_stored(&self.inner.dir, digest, kind);
                    return Ok(None);
                }
            }
        }
        Ok(self.get(digest, size)?.map(slice))
    }

    /// Reads a chunk file, checks it and keeps it in memory.
    fn load(&self, digest: &Sha256Sum) -> Option<Bytes> {
        let data = self.read_checked(digest)?;
        self.put_memory(*digest, data.clone());
        Some(data)
    }

    /// The chunk from memory or disk, verified, without adding it to the memory cache
    /// (for copying a whole file without flushing what readers use).
    pub(crate) fn get_uncached(&self, digest: &Sha256Sum, size: u64) -> Result<Option<Bytes>> {
        if let Some(b) = self.get_memory(digest) {
            return expect_len(digest, size, b).map(Some);
        }
        if !self.inner.disk_enabled
            || !lock(&self.inner.disk)
                .get(digest)
                .is_some_and(Stored::is_chunk)
        {
            return Ok(None);
        }
        self.read_checked(digest)
            .map(|b| expect_len(digest, size, b))
            .transpose()
    }

    /// A chunk file's bytes if their sha256 is right; a bad file is dropped. (A right
    /// file of another length than a TOC says is kept: the TOC is what is wrong.)
    fn read_checked(&self, digest: &Sha256Sum) -> Option<Bytes> {
        let kind = lock(&self.inner.disk).peek(digest).unwrap_or(Stored::Chunk);
        let path = stored_path(&self.inner.dir, digest, kind);
        let data = match read_whole_uncached(&path) {
            Ok(d) => d,
            Err(e) => {
                // Evicted by another thread between the index check and the read, or
                // removed by hand: a miss.
                tracing::debug!(path = %path.display(), error = %e, "cached chunk unreadable");
                lock(&self.inner.disk).remove(digest);
                return None;
            }
        };
        let content = match kind {
            Stored::Named => named_content(data),
            _ => Some(data).filter(|data| Sha256Sum::of(data) == *digest),
        };
        if content.is_none() {
            tracing::warn!(path = %path.display(), "cached chunk is corrupt; dropping it");
            lock(&self.inner.disk).remove(digest);
            remove_stored(&self.inner.dir, digest, kind);
        }
        content
    }

    /// The whole file stored under `key`, opened for reading, or `None`.
    pub(crate) fn whole_file(&self, key: &Sha256Sum) -> Option<std::fs::File> {
        if !self.inner.disk_enabled || lock(&self.inner.disk).get(key) != Some(Stored::File) {
            return None;
        }
        let path = stored_path(&self.inner.dir, key, Stored::File);
        match std::fs::File::open(&path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "stored file unreadable");
                lock(&self.inner.disk).remove(key);
                None
            }
        }
    }

    /// True when a whole file is stored under `key`.
    pub(crate) fn has_whole_file(&self, key: &Sha256Sum) -> bool {
        lock(&self.inner.disk).peek(key) == Some(Stored::File)
    }

    /// Stores a whole file of `size` bytes under `key`: `fill` writes it to a temp file,
    /// which is fsynced and renamed into place, then indexed (evicting to the budget).
    pub(crate) fn store_whole_file(
        &self,
        key: Sha256Sum,
        size: u64,
        fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        if !self.inner.disk_enabled {
            return Err(std::io::Error::other("the disk cache is disabled"));
        }
        if !self.make_room(size) {
            return Err(std::io::Error::other(
                "the cache's filesystem is at its fill limit",
            ));
        }
        let final_path = stored_path(&self.inner.dir, &key, Stored::File);
        if let Some(parent) = final_path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = self.tmp_path(&key);
        let res = std::fs::File::create(&tmp).and_then(|mut f| {
            fill(&mut f)?;
            if f.metadata()?.len() != size {
                return Err(std::io::Error::other("assembled file has the wrong size"));
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &final_path)
        });
        if let Err(e) = &res {
            let _ = std::fs::remove_file(&tmp);
            self.count_write_error(e);
            return res;
        }
        self.index(key, Stored::File, size);
        Ok(())
    }

    /// Makes sure writing `size` more bytes leaves the filesystem within its fill limit,
    /// evicting the cache's own least recently used files if needed; false when even an
    /// empty cache would not do.
    fn make_room(&self, size: u64) -> bool {
        if self.inner.max_fill_percent >= 100 {
            return true;
        }
        loop {
            let Ok(fs) = nix::sys::statvfs::statvfs(&self.inner.dir) else {
                return true;
            };
            let block = fs.fragment_size().max(1);
            let total = fs.blocks() * block;
            let free = fs.blocks_available() * block;
            let used_after = total.saturating_sub(free) + size;
            if used_after.saturating_mul(100) <= total * u64::from(self.inner.max_fill_percent) {
                return true;
            }
            let Some((victim, kind)) = lock(&self.inner.disk).pop_oldest() else {
                self.inner.skipped_full.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            remove_stored(&self.inner.dir, &victim, kind);
            self.inner.evicted_for_space.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn count_write_error(&self, e: &std::io::Error) {
        self.inner.write_errors.fetch_add(1, Ordering::Relaxed);
        if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
            self.inner.no_space_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What the disk cache has had to give up so far.
    pub fn write_stats(&self) -> CacheWriteStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheWriteStats {
            write_errors: get(&self.inner.write_errors),
            no_space_errors: get(&self.inner.no_space_errors),
            skipped_full: get(&self.inner.skipped_full),
            evicted_for_space: get(&self.inner.evicted_for_space),
            swept: get(&self.inner.swept),
        }
    }

    /// Removes every chunk and whole file whose digest (or key) is not in `live`, from
    /// memory and disk: what no mounted layer uses any more. Returns the entries and
    /// bytes removed from disk.
    pub fn sweep(&self, live: &std::collections::HashSet<Sha256Sum>) -> (u64, u64) {
        let before = self.disk_bytes_used();
        let dead: Vec<(Sha256Sum, Stored)> = lock(&self.inner.disk)
            .entries()
            .into_iter()
            .filter(|(d, _)| !live.contains(d))
            .collect();
        for (digest, kind) in &dead {
            lock(&self.inner.disk).remove(digest);
            remove_stored(&self.inner.dir, digest, *kind);
        }
        {
            let mut memory = lock(&self.inner.memory);
            for (digest, _) in memory.entries() {
                if !live.contains(&digest) {
                    memory.remove(&digest);
                }
            }
        }
        self.inner
            .swept
            .fetch_add(dead.len() as u64, Ordering::Relaxed);
        (
            dead.len() as u64,
            before.saturating_sub(self.disk_bytes_used()),
        )
    }

    /// Records a file now on disk, removing what the budget evicts (or the file itself
    /// when it alone exceeds the budget).
    fn index(&self, key: Sha256Sum, kind: Stored, size: u64) {
        let evicted = lock(&self.inner.disk).insert(key, kind, size);
        if evicted.is_empty() && !lock(&self.inner.disk).contains(&key) {
            remove_stored(&self.inner.dir, &key, kind);
        }
        for (victim, kind) in evicted {
            remove_stored(&self.inner.dir, &victim, kind);
        }
    }

    fn tmp_path(&self, key: &Sha256Sum) -> PathBuf {
        let seq = self.inner.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.inner
            .dir
            .join("tmp")
            .join(format!("{}.{}.{seq}", key.hex(), std::process::id()))
    }

    pub(crate) fn put_memory(&self, digest: Sha256Sum, data: Bytes) {
        let size = data.len() as u64;
        lock(&self.inner.memory).insert(digest, data, size);
    }

    /// Stores a verified chunk on disk (temp file, then rename). Errors are logged and
    /// swallowed: a cache that cannot write only costs refetches.
    pub(crate) fn put_disk(&self, digest: Sha256Sum, data: &[u8]) {
        self.put_stored(digest, data, Stored::Chunk);
    }

    fn put_stored(&self, digest: Sha256Sum, data: &[u8], kind: Stored) {
        if !self.inner.disk_enabled {
            return;
        }
        if lock(&self.inner.disk).get(&digest).is_some() {
            return;
        }
        if !self.make_room(data.len() as u64) {
            tracing::debug!(chunk = %digest, "the cache's filesystem is at its fill limit: chunk not kept on disk");
            return;
        }
        if let Err(e) = self.write_file(&digest, data, kind) {
            self.count_write_error(&e);
            tracing::warn!(chunk = %digest, error = %e, "cannot write chunk to the disk cache");
            return;
        }
        self.index(digest, kind, data.len() as u64);
        if lock(&self.inner.read_through).remove(&digest) {
            self.drop_from_memory(&digest);
        }
    }

    /// Stores a verified chunk whose key is a name, not its content's digest (a SOCI
    /// span piece): the file carries its content's digest after it, checked on load.
    pub(crate) fn put_disk_named(&self, key: Sha256Sum, data: &[u8]) {
        let mut with_digest = Vec::with_capacity(data.len() + 32);
        with_digest.extend_from_slice(data);
        with_digest.extend_from_slice(&Sha256Sum::of(data).0);
        self.put_stored(key, &with_digest, Stored::Named);
    }

    fn write_file(&self, digest: &Sha256Sum, data: &[u8], kind: Stored) -> std::io::Result<()> {
        let final_path = stored_path(&self.inner.dir, digest, kind);
        if let Some(parent) = final_path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = self.tmp_path(digest);
        let res = write_uncached(&tmp, data).and_then(|()| std::fs::rename(&tmp, &final_path));
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    #[cfg(test)]
    pub(crate) fn chunk_file(&self, digest: &Sha256Sum) -> PathBuf {
        stored_path(&self.inner.dir, digest, Stored::Chunk)
    }

    /// Chunks with a disk load in progress (or waiters still leaving).
    #[cfg(test)]
    pub(crate) fn loading_len(&self) -> usize {
        lock(&self.inner.loading).len()
    }

    #[cfg(test)]
    pub(crate) fn forget_memory(&self) {
        *lock(&self.inner.memory) = Lru::new(self.inner.memory_capacity);
    }
}

/// `data`, the chunk named `digest`, if it is the `size` bytes a TOC gives it; else the
/// mismatch, logged.
pub(crate) fn expect_len(digest: &Sha256Sum, size: u64, data: Bytes) -> Result<Bytes> {
    if data.len() as u64 == size {
        return Ok(data);
    }
    tracing::warn!(chunk = %digest, expected = size, found = data.len(),
        "a TOC gives this chunk a length its bytes do not have: the read fails");
    Err(Error::ChunkLength {
        digest: digest.to_string(),
        expected: size,
        found: data.len() as u64,
    })
}

/// Alignment O_DIRECT asks of buffers, offsets and lengths (a page covers every disk).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// Writes `data` to a new file with O_DIRECT: a fetched chunk is read back through its
/// mount's page cache, so copying it into the page cache of its chunk file too would
/// only cost CPU (a third of a cold read's, measured) and evict other pages. Falls back
/// to a buffered write where O_DIRECT is refused (tmpfs).
pub(crate) fn write_uncached(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    let mut file = match direct {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return std::fs::write(path, data),
        Err(e) => return Err(e),
    };
    // A big chunk is inflated to start on a block boundary (see fetch::arriving): its
    // whole blocks go to disk from where they are. The rest goes through a zero-padded
    // copy.
    let direct = if data.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
        data.len() - data.len() % DIRECT_ALIGN
    } else {
        0
    };
    file.write_all(&data[..direct])?;
    let rest = &data[direct..];
    if !rest.is_empty() {
        let padded = rest.len().div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mut buf = BIG_BUFFERS.take(padded + DIRECT_ALIGN);
        buf.resize(padded + DIRECT_ALIGN, 0);
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        buf[start..start + rest.len()].copy_from_slice(rest);
        let written = file.write_all(&buf[start..start + padded]);
        BIG_BUFFERS.give_back(buf);
        written?;
    }
    // The padding was only there for O_DIRECT.
    file.set_len(data.len() as u64)
}

/// Reads a whole chunk file with O_DIRECT (see [`read_uncached`]).
fn read_whole_uncached(path: &Path) -> std::io::Result<Bytes> {
    let len = std::fs::metadata(path)?.len() as usize;
    read_uncached(path, 0, len)
}

/// Reads `len` bytes at `offset` (a multiple of [`DIRECT_ALIGN`]) of a chunk file with
/// O_DIRECT, straight into the buffer that is then used (no page-cache copy: the mount's
/// page cache will hold these bytes); fewer where the file ends. Falls back to a
/// buffered read where O_DIRECT is refused.
fn read_uncached(path: &Path, offset: u64, len: usize) -> std::io::Result<Bytes> {
    use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    let (file, padded) = match direct {
        Ok(f) => (f, len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (std::fs::File::open(path)?, len),
        Err(e) => return Err(e),
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

fn stored_path(dir: &Path, digest: &Sha256Sum, kind: Stored) -> PathBuf {
    let hex = digest.hex();
    dir.join(kind.dir()).join(&hex[..2]).join(hex)
}

fn remove_stored(dir: &Path, digest: &Sha256Sum, kind: Stored) {
    let path = stored_path(dir, digest, kind);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a cached file");
    }
}

/// Every `chunks/xx/<hex>` file: digest, size, modification time.
fn scan(chunks: &Path) -> Result<Vec<(Sha256Sum, u64, std::time::SystemTime)>> {
    let mut out = Vec::new();
    let read = |p: &Path| {
        std::fs::read_dir(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))
    };
    for sub in read(chunks)? {
        let sub = sub.map_err(|e| Error::io("reading the cache directory", e))?;
        if !sub.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        for f in read(&sub.path())? {
            let f = f.map_err(|e| Error::io("reading the cache directory", e))?;
            let name = f.file_name();
            let Some(digest) = name
                .to_str()
                .and_then(|n| format!("sha256:{n}").parse::<Sha256Sum>().ok())
            else {
                continue;
            };
            let Ok(meta) = f.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            out.push((digest, meta.len(), mtime));
        }
    }
    Ok(out)
}
