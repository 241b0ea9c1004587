//! The chunk cache as a citizen of the node: it drops what no mounted layer uses, keeps
//! its filesystem below the fill limit, and counts the writes it could not make while
//! reads go on.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::*;
use crate::CacheConfig;

#[test]
fn a_sweep_keeps_what_mounted_layers_use_and_drops_the_rest() {
    let (a, src) = fixture(OutputFormat::Estargz);
    assert_eq!(a.read_all("data/big").unwrap(), src.files["data/big"]);
    assert_eq!(a.read_all("bin/tool").unwrap(), src.files["bin/tool"]);
    let used = a.cache.disk_bytes_used();
    assert!(used > 0);
    // A chunk of another layer, since removed.
    let other = Bytes::from(pattern(50_000, 99));
    let other_digest = estargz::Sha256Sum::of(&other);
    a.cache.put_disk(other_digest, &other);
    a.cache.put_memory(other_digest, other.clone());
    assert!(a.cache.contains(&other_digest));

    let mut live = HashSet::new();
    a.fs.add_live_cache_keys(&mut live);
    let (entries, bytes) = a.cache.sweep(&live);
    assert_eq!((entries, bytes), (1, other.len() as u64));
    assert!(!a.cache.contains(&other_digest));
    assert!(!a.cache.chunk_file(&other_digest).exists());
    assert_eq!(a.cache.disk_bytes_used(), used);
    assert_eq!(a.cache.write_stats().swept, 1);

    // The layer goes too: nothing is left, and its reads fetch again.
    let (entries, _) = a.cache.sweep(&HashSet::new());
    assert!(entries > 0);
    assert_eq!(a.cache.disk_bytes_used(), 0);
    let requests = a.blob.request_count();
    assert_eq!(a.read_all("bin/tool").unwrap(), src.files["bin/tool"]);
    assert!(a.blob.request_count() > requests);
}

/// A tmpfs of `size` mounted for the test, unmounted on drop.
struct SmallFs {
    path: PathBuf,
}

impl SmallFs {
    fn mount(path: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(path).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .unwrap();
        SmallFs {
            path: path.to_path_buf(),
        }
    }

    fn used_percent(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.path).unwrap();
        let total = s.blocks();
        (total - s.blocks_available()) * 100 / total
    }
}

/// A cache on `fs` with no memory tier, bounded only by the fill limit.
fn disk_only(fs: &SmallFs, max_fill_percent: u8) -> CacheConfig {
    CacheConfig {
        dir: fs.path.join("cache"),
        memory_bytes: 0,
        disk_bytes: 1 << 30,
        max_fill_percent,
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn on_a_small_filesystem_the_cache_stays_below_its_fill_limit_and_reads_go_on() {
    if testkit::skip_unless_root("on_a_small_filesystem_the_cache_stays_below_its_fill_limit") {
        return;
    }
    let (tar, src) = sample_tar();
    let blob = convert(&tar, OutputFormat::Estargz, &[]);
    let dir = tempfile::tempdir().unwrap();
    // 256 KiB: less than the layer's files (about 650 KB), so the cache must evict.
    let small = SmallFs::mount(&dir.path().join("small"), "256k");
    let f = fixture_on(
        FaultBlob::new(blob.clone()),
        quiet_config(),
        disk_only(&small, 75),
        dir,
    );
    for _ in 0..2 {
        for (path, data) in &src.files {
            assert_eq!(&f.read_all(path).unwrap(), data, "{path}");
            assert!(
                small.used_percent() <= 75,
                "{path}: {}%",
                small.used_percent()
            );
        }
    }
    let stats = f.cache.write_stats();
    assert!(stats.evicted_for_space > 0, "{stats:?}");
    assert_eq!(stats.write_errors, 0, "{stats:?}");
    // The tmpfs goes before the temp dir it is mounted in, or that dir stays behind.
    drop(small);
    drop(f);

    // No limit but the disk's, and the disk full: writes fail with ENOSPC, are
    // counted, and reads are answered all the same.
    let dir = tempfile::tempdir().unwrap();
    let full = SmallFs::mount(&dir.path().join("full"), "256k");
    let f = fixture_on(
        FaultBlob::new(blob),
        quiet_config(),
        disk_only(&full, 100),
        dir,
    );
    let filler = vec![7u8; 64 << 10];
    let mut n = 0;
    while std::fs::write(full.path.join(format!("filler-{n}")), &filler).is_ok() {
        n += 1;
    }
    // Whatever small files still fit: fill the last blocks too.
    let mut k = 0;
    while std::fs::write(full.path.join(format!("crumb-{k}")), [1u8; 512]).is_ok() && k < 10_000 {
        k += 1;
    }
    for (path, data) in &src.files {
        assert_eq!(&f.read_all(path).unwrap(), data, "{path}");
    }
    let stats = f.cache.write_stats();
    assert!(stats.no_space_errors > 0, "{stats:?}");
    assert_eq!(stats.no_space_errors, stats.write_errors, "{stats:?}");
    drop(full);
    drop(f);
}

#[test]
fn chunk_files_hold_their_bytes_whether_or_not_the_bytes_start_on_a_block() {
    use crate::cache::{DIRECT_ALIGN, write_uncached};
    let dir = tempfile::tempdir().unwrap();
    let mut backing = vec![0u8; 5 * DIRECT_ALIGN];
    let lead_in = backing.as_ptr().align_offset(DIRECT_ALIGN);
    for (i, b) in backing.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    for (n, (skip, len)) in [
        (0, 3 * DIRECT_ALIGN + 100),
        (0, 2 * DIRECT_ALIGN),
        (0, 100),
        (1, 3 * DIRECT_ALIGN + 100),
        (0, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let data = &backing[lead_in + skip..lead_in + skip + len];
        let path = dir.path().join(format!("chunk-{n}"));
        write_uncached(&path, data).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data, "{skip}+{len}");
    }
}

#[test]
fn unused_chunks_leave_the_memory_tier_once_the_disk_holds_them() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::open(CacheConfig::new(dir.path())).unwrap();
    let (on_disk, only_in_memory) = (vec![1u8; 5000], vec![2u8; 7000]);
    let (a, b) = (
        estargz::Sha256Sum::of(&on_disk),
        estargz::Sha256Sum::of(&only_in_memory),
    );
    cache.put_memory(a, Bytes::from(on_disk.clone()));
    cache.put_disk(a, &on_disk);
    cache.put_memory(b, Bytes::from(only_in_memory));
    // Used a moment ago: kept.
    assert_eq!(
        cache.release_unused_memory(Duration::from_secs(3600), Duration::from_secs(3600)),
        0
    );
    assert_eq!(cache.memory_bytes_used(), 12_000);
    // Unused: what the disk holds goes; what it does not is kept.
    assert_eq!(
        cache.release_unused_memory(Duration::ZERO, Duration::ZERO),
        5000
    );
    assert_eq!(cache.memory_bytes_used(), 7000);
    assert_eq!(
        cache.get(&a, 5000).unwrap().unwrap(),
        on_disk,
        "read back from disk"
    );

    // Without a disk tier the memory tier is all there is: never emptied.
    let memory_only = SharedCache::open(CacheConfig {
        disk_bytes: 0,
        ..CacheConfig::new(dir.path().join("m"))
    })
    .unwrap();
    memory_only.put_memory(a, Bytes::from(on_disk));
    assert_eq!(
        memory_only.release_unused_memory(Duration::ZERO, Duration::ZERO),
        0
    );
    assert_eq!(memory_only.memory_bytes_used(), 5000);
}

#[test]
fn a_chunk_read_lately_stays_and_one_left_unread_goes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::open(CacheConfig::new(dir.path())).unwrap();
    let (read, unread) = (vec![3u8; 4000], vec![4u8; 6000]);
    let (r, u) = (
        estargz::Sha256Sum::of(&read),
        estargz::Sha256Sum::of(&unread),
    );
    let absent = estargz::Sha256Sum::of(b"never stored");
    for (digest, data) in [(r, &read), (u, &unread)] {
        cache.put_memory(digest, Bytes::from(data.clone()));
        cache.put_disk(digest, data);
    }
    let (pause, idle) = (Duration::from_millis(300), Duration::from_millis(250));

    std::thread::sleep(pause);
    // A hit is a use; the background fetch's misses are not.
    assert!(cache.get_memory(&r).is_some());
    assert!(cache.get_memory(&absent).is_none());
    assert_eq!(
        cache.release_unused_memory(idle, idle),
        6000,
        "only the unread one"
    );
    assert!(cache.in_memory(&r) && !cache.in_memory(&u));

    std::thread::sleep(pause);
    assert_eq!(
        cache.release_unused_memory(idle, idle),
        4000,
        "then the other"
    );
    assert_eq!(cache.memory_bytes_used(), 0);
}

/// Turns one bit of a file, as a disk's rot would.
fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 1;
    std::fs::write(path, &bytes).unwrap();
}

/// A 1 MiB chunk of varied bytes, on disk and in memory.
fn chunk_in_both(cache: &SharedCache, seed: u64) -> (estargz::Sha256Sum, Vec<u8>) {
    let data = pattern(1 << 20, seed);
    let digest = estargz::Sha256Sum::of(&data);
    cache.put_memory(digest, Bytes::from(data.clone()));
    cache.put_disk(digest, &data);
    (digest, data)
}

#[test]
fn a_chunk_read_in_part_leaves_sooner_and_is_read_back_a_piece_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::open(CacheConfig::new(dir.path())).unwrap();
    let (part, part_data) = chunk_in_both(&cache, 1);
    let (unread, _) = chunk_in_both(&cache, 2);
    cache.read_in_part(part);
    let (idle, part_idle) = (Duration::from_secs(3600), Duration::ZERO);
    assert_eq!(
        cache.release_unused_memory(idle, part_idle),
        1 << 20,
        "the chunk read in part goes, the unread one stays"
    );
    assert!(!cache.in_memory(&part) && cache.in_memory(&unread));
    assert_eq!(
        cache.release_unused_memory(Duration::ZERO, part_idle),
        1 << 20
    );
    assert!(!cache.in_memory(&unread), "unused long enough, it goes too");

    // A part of it comes back from its pieces: right bytes, and not into memory.
    let got = cache.get_part(&part, 1 << 20, 200_000..330_000).unwrap();
    assert_eq!(got.unwrap(), &part_data[200_000..330_000]);
    assert!(!cache.in_memory(&part));

    // A piece gone bad on disk is never served: the read misses and the file goes.
    let path = cache.chunk_file(&part);
    flip_byte(&path, 300_000);
    assert_eq!(
        cache.get_part(&part, 1 << 20, 0..10).unwrap().unwrap(),
        &part_data[..10],
        "an untouched piece still reads"
    );
    assert!(
        cache
            .get_part(&part, 1 << 20, 290_000..300_001)
            .unwrap()
            .is_none()
    );
    assert!(!cache.contains(&part) && !path.exists());
}

#[test]
fn without_its_pieces_a_part_is_read_from_the_whole_chunk_checked() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::open(CacheConfig::new(dir.path())).unwrap();
    let (bad, _) = chunk_in_both(&cache, 3);
    let (good, data) = chunk_in_both(&cache, 4);
    let path = cache.chunk_file(&bad);
    flip_byte(&path, 900_000);
    // After a restart the pieces' digests are gone: the chunk is checked whole, so a
    // bad byte far from the part read is caught too.
    drop(cache);
    let cache = SharedCache::open(CacheConfig::new(dir.path())).unwrap();
    assert!(cache.get_part(&bad, 1 << 20, 0..10).unwrap().is_none());
    assert!(!path.exists());

    assert_eq!(
        cache.get_part(&good, 1 << 20, 5..70_000).unwrap().unwrap(),
        &data[5..70_000]
    );
    assert!(
        cache.in_memory(&good),
        "read whole, it is kept in memory again"
    );
    // A TOC that gives the chunk another length answers no read.
    assert!(cache.get_part(&good, 1 << 19, 0..10).is_err());
}

#[test]
fn named_chunks_read_back_checked_and_a_corrupt_one_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        SharedCache::open(CacheConfig {
            dir: dir.path().join("cache"),
            memory_bytes: 0,
            disk_bytes: 1 << 20,
            max_fill_percent: 100,
        })
        .unwrap()
    };
    let cache = open();
    let data = pattern(10_000, 5);
    // A name that is not the content's digest, as a SOCI span piece's is not.
    let key = estargz::Sha256Sum::of(b"a piece's name");
    cache.put_disk_named(key, &data);
    assert_eq!(
        &cache.get(&key, data.len() as u64).unwrap().unwrap()[..],
        &data[..]
    );
    // Found again after a restart, and a flipped byte makes it a miss, not bad data.
    let cache = open();
    assert!(cache.contains(&key));
    let path = dir.path().join("cache").join("named");
    let file = walk(&path).into_iter().next().unwrap();
    flip_byte(&file, 100);
    assert!(cache.get(&key, data.len() as u64).unwrap().is_none());
    assert!(!cache.contains(&key));
}
