//! Unit tests of the core and the fetcher over in-memory layers made with
//! `estargz::convert`, read through a recording, fault-injecting blob.
#![allow(clippy::unwrap_used)]
// One-range lists are what these tests mean, not a mistaken `vec![0; n]`.
#![allow(clippy::single_range_in_vec_init)]

mod cache_tests;
mod core_tests;
mod fetch_ahead_tests;
mod fetch_tests;
mod libraries_tests;
mod link_tests;
mod soci_tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use estargz::{BlobError, BlobErrorKind, BlobFuture, BlobReader, Layer, OutputFormat};
use tokio::sync::Semaphore;

use crate::{CacheConfig, FsConfig, LayerFs, SharedCache};

/// A blob that records every range request and injects faults on demand.
pub(crate) struct FaultBlob {
    data: Bytes,
    /// (offset, len) of every `read_at`, in order.
    pub requests: Mutex<Vec<(u64, u64)>>,
    pub started: AtomicU64,
    /// The next N reads fail with a transient error.
    pub fail_next: AtomicU32,
    /// Every read fails (the network is gone).
    pub fail_all: AtomicBool,
    /// The next N reads return one byte less than asked for.
    pub short_next: AtomicU32,
    /// The next N reads return the right length with one byte flipped.
    pub corrupt_next: AtomicU32,
    /// While `held`, each read waits for a permit of `gate`: tests hold reads in flight.
    pub held: AtomicBool,
    pub gate: Semaphore,
    /// When non-zero, a streamed read hands over this many bytes, then waits for a
    /// permit of `rest_gate` before the rest: a body that is still arriving.
    pub pause_after: AtomicU64,
    pub rest_gate: Semaphore,
}

impl FaultBlob {
    pub fn new(data: Vec<u8>) -> Self {
        FaultBlob {
            data: Bytes::from(data),
            requests: Mutex::new(Vec::new()),
            started: AtomicU64::new(0),
            fail_next: AtomicU32::new(0),
            fail_all: AtomicBool::new(false),
            short_next: AtomicU32::new(0),
            corrupt_next: AtomicU32::new(0),
            held: AtomicBool::new(false),
            gate: Semaphore::new(0),
            pause_after: AtomicU64::new(0),
            rest_gate: Semaphore::new(0),
        }
    }

    /// From now on reads wait until [`FaultBlob::release`].
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

impl BlobReader for FaultBlob {
    fn size(&self) -> BlobFuture<'_, u64> {
        let n = self.data.len() as u64;
        Box::pin(async move { Ok(n) })
    }

    fn read_at(&self, offset: u64, len: u64) -> BlobFuture<'_, Bytes> {
        Box::pin(async move {
            self.requests.lock().unwrap().push((offset, len));
            self.started.fetch_add(1, Ordering::SeqCst);
            if self.held.load(Ordering::SeqCst) {
                self.gate.acquire().await.unwrap().forget();
            }
            if self.fail_all.load(Ordering::SeqCst) || Self::take(&self.fail_next) {
                return Err(BlobError::new(BlobErrorKind::Transient, "injected failure"));
            }
            let size = self.data.len() as u64;
            let end = offset.saturating_add(len).min(size);
            if offset > size {
                return Err(BlobError::new(BlobErrorKind::OutOfRange, "past the end"));
            }
            let mut out = self.data.slice(offset as usize..end as usize);
            if Self::take(&self.short_next) && !out.is_empty() {
                out = out.slice(..out.len() - 1);
            }
            if Self::take(&self.corrupt_next) && !out.is_empty() {
                let mut v = out.to_vec();
                let mid = v.len() / 2;
                v[mid] ^= 0x55;
                out = Bytes::from(v);
            }
            Ok(out)
        })
    }

    fn read_at_streaming<'a>(
        &'a self,
        offset: u64,
        len: u64,
        on_data: &'a (dyn Fn(Bytes) + Send + Sync),
    ) -> BlobFuture<'a, ()> {
        Box::pin(async move {
            let data = self.read_at(offset, len).await?;
            let pause = self.pause_after.load(Ordering::SeqCst) as usize;
            if pause > 0 && pause < data.len() {
                on_data(data.slice(..pause));
                self.rest_gate.acquire().await.unwrap().forget();
                on_data(data.slice(pause..));
            } else {
                on_data(data);
            }
            Ok(())
        })
    }
}

/// Every file under `dir`, recursively.
pub(crate) fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Deterministic incompressible-ish bytes.
pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub(crate) const CHUNK: u64 = 64 << 10;
pub(crate) const MTIME: u64 = 1_700_000_000;

/// A test layer's source: files by path.
pub(crate) struct Source {
    pub files: BTreeMap<String, Vec<u8>>,
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// A tar with every kind of entry, multi-chunk files, xattrs, a whiteout and an opaque
/// directory.
pub(crate) fn sample_tar() -> (Vec<u8>, Source) {
    let mut b = tar::Builder::new(Vec::new());
    let mut files = BTreeMap::new();
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| {
        let h = header(tar::EntryType::Directory, mode, 0);
        b.append_data(&mut h.clone(), path, std::io::empty())
            .unwrap();
    };
    dir(&mut b, "bin/", 0o755);
    dir(&mut b, "etc/", 0o755);
    dir(&mut b, "data/", 0o700);
    dir(&mut b, "opaque/", 0o755);
    let mut file = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: Vec<u8>, mode: u32| {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(1000);
        h.set_gid(100);
        b.append_data(&mut h, path, &data[..]).unwrap();
        files.insert(path.to_string(), data);
    };
    file(&mut b, "bin/tool", pattern(5000, 1), 0o4755);
    file(&mut b, "etc/empty", Vec::new(), 0o600);
    file(
        &mut b,
        "data/big",
        pattern(5 * CHUNK as usize + 17, 2),
        0o644,
    );
    file(&mut b, "data/zeros", vec![0u8; 3 * CHUNK as usize], 0o644);
    file(&mut b, "data/exact", pattern(2 * CHUNK as usize, 3), 0o640);
    file(&mut b, "opaque/kept", b"kept".to_vec(), 0o644);
    // Whiteout of a lower "etc/gone" and the opaque marker of "opaque".
    file(&mut b, "etc/.wh.gone", Vec::new(), 0o644);
    file(&mut b, "opaque/.wh..wh..opq", Vec::new(), 0o644);
    files.remove("etc/.wh.gone");
    files.remove("opaque/.wh..wh..opq");
    // xattrs through PAX.
    b.append_pax_extensions([
        ("SCHILY.xattr.user.color", &b"blue"[..]),
        ("SCHILY.xattr.user.bin", &b"\x00\x01\xff"[..]),
    ])
    .unwrap();
    let data = b"with xattrs".to_vec();
    let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
    b.append_data(&mut h, "etc/attrs", &data[..]).unwrap();
    files.insert("etc/attrs".into(), data);
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, "bin/link", "tool").unwrap();
    let mut h = header(tar::EntryType::Link, 0o644, 0);
    b.append_link(&mut h, "etc/hard", "data/exact").unwrap();
    let mut h = header(tar::EntryType::Fifo, 0o644, 0);
    b.append_data(&mut h, "etc/fifo", std::io::empty()).unwrap();
    let mut h = header(tar::EntryType::Char, 0o666, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "etc/null", std::io::empty()).unwrap();
    let mut h = header(tar::EntryType::Block, 0o660, 0);
    h.set_device_major(259).unwrap();
    h.set_device_minor(300).unwrap();
    b.append_data(&mut h, "etc/blk", std::io::empty()).unwrap();
    (b.into_inner().unwrap(), Source { files })
}

pub(crate) fn convert(tar: &[u8], format: OutputFormat, prioritized: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    let opts = estargz::WriterOptions {
        format,
        chunk_size: CHUNK,
        prioritized_files: prioritized.iter().map(|s| s.to_string()).collect(),
        threads: 1,
        ..Default::default()
    };
    estargz::convert(tar, &mut out, &opts).unwrap();
    out
}

pub(crate) const FORMATS: [OutputFormat; 2] = [OutputFormat::Estargz, OutputFormat::ZstdChunked];

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Config for tests: nothing in the background unless a test starts it.
pub(crate) fn quiet_config() -> FsConfig {
    FsConfig {
        prefetch: false,
        background_fetch: false,
        background_rate_limit: None,
        // Tests that run the background fetch want it to start at once.
        background_quiet: Duration::ZERO,
        fetch_timeout: Duration::from_secs(20),
        // Reads 4 KiB apart are no longer "sequential": tests control read-ahead.
        max_read: 4096,
        // Misses fetch only what they need, so tests can count requests.
        neighbour_fetch_bytes: 0,
        ..FsConfig::default()
    }
}

/// A backing over `cache` with a link of its own, as `config` says.
pub(crate) fn backing(
    cache: &SharedCache,
    rt: &tokio::runtime::Runtime,
    config: &FsConfig,
) -> crate::Backing {
    crate::Backing::new(cache.clone(), rt.handle().clone(), config)
}

pub(crate) struct Fixture {
    pub rt: tokio::runtime::Runtime,
    pub blob: Arc<FaultBlob>,
    pub fs: Arc<LayerFs>,
    pub cache: SharedCache,
    pub dir: tempfile::TempDir,
}

pub(crate) fn fixture_with(blob: FaultBlob, config: FsConfig, disk_bytes: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cache = CacheConfig {
        dir: dir.path().join("cache"),
        memory_bytes: 64 << 20,
        disk_bytes,
        max_fill_percent: 100,
    };
    fixture_on(blob, config, cache, dir)
}

/// A fixture whose cache is as `cache` says (`dir` is kept for the fixture's life).
pub(crate) fn fixture_on(
    blob: FaultBlob,
    config: FsConfig,
    cache: CacheConfig,
    dir: tempfile::TempDir,
) -> Fixture {
    let rt = runtime();
    let blob = Arc::new(blob);
    let layer = rt
        .block_on(Layer::open(blob.clone(), &Default::default()))
        .unwrap();
    fixture_of(rt, blob, layer, config, cache, dir)
}

/// A fixture serving `layer` (read from `blob`) as `config` and `cache` say.
pub(crate) fn fixture_of(
    rt: tokio::runtime::Runtime,
    blob: Arc<FaultBlob>,
    layer: Layer,
    config: FsConfig,
    cache: CacheConfig,
    dir: tempfile::TempDir,
) -> Fixture {
    // Opening the layer read footer and TOC: count only what the filesystem fetches.
    blob.requests.lock().unwrap().clear();
    blob.started.store(0, Ordering::SeqCst);
    let cache = SharedCache::open(cache).unwrap();
    let fs = LayerFs::new(Arc::new(layer), backing(&cache, &rt, &config), config).unwrap();
    Fixture {
        rt,
        blob,
        fs: Arc::new(fs),
        cache,
        dir,
    }
}

pub(crate) fn fixture(format: OutputFormat) -> (Fixture, Source) {
    let (tar, src) = sample_tar();
    let blob = FaultBlob::new(convert(&tar, format, &[]));
    (fixture_with(blob, quiet_config(), 1 << 30), src)
}

impl Fixture {
    pub fn ino(&self, path: &str) -> u64 {
        let mut ino = 1;
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            ino = self.fs.lookup(ino, comp.as_bytes()).unwrap().ino;
        }
        ino
    }

    /// A read, and then the disk writes it caused, so tests see a settled cache.
    pub fn read(&self, path: &str, offset: u64, len: u32) -> crate::Result<Bytes> {
        let ino = self.ino(path);
        let res = self.rt.block_on(self.fs.read(ino, offset, len));
        self.rt.block_on(self.fs.writes_settled());
        res
    }

    pub fn read_all(&self, path: &str) -> crate::Result<Vec<u8>> {
        let size = self.fs.getattr(self.ino(path)).unwrap().size;
        let mut out = Vec::new();
        while (out.len() as u64) < size {
            let got = self.read(path, out.len() as u64, 1 << 20)?;
            assert!(!got.is_empty(), "short read of {path}");
            out.extend_from_slice(&got);
        }
        Ok(out)
    }
}

/// The sample tree as one layer of `format`, and what it holds.
pub(super) fn sample_blob(format: OutputFormat) -> (Vec<u8>, Source) {
    let (tar, src) = sample_tar();
    (convert(&tar, format, &[]), src)
}
