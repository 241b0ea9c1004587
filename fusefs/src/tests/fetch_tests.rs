//! The fetcher on demand: faults become EIO and never wrong data, retries work,
//! identical fetches are shared, neighbours are coalesced, caches hold and verify.

use super::*;
use crate::ReadStart;

#[test]
fn fetch_faults_give_eio_never_wrong_data_and_a_retry_succeeds() {
    for format in FORMATS {
        let (blob, src) = sample_blob(format);
        let f = fixture_with(FaultBlob::new(blob), quiet_config(), 1 << 30);
        let want = &src.files["data/big"];
        let read = |off: u64| f.read("data/big", off, CHUNK as u32);

        // Offsets far apart, so no read-ahead fetches what the next step corrupts.
        let [a, b, c] = [2 * CHUNK, 0, 4 * CHUNK];
        let want_at = |off: u64| &want[off as usize..(off + CHUNK) as usize];
        f.blob.fail_next.store(1, Ordering::SeqCst);
        assert_eq!(read(a).unwrap_err().errno(), libc::EIO);
        assert_eq!(f.fs.stats().fetch_errors, 1);
        assert_eq!(&read(a).unwrap()[..], want_at(a));

        f.blob.short_next.store(1, Ordering::SeqCst);
        assert_eq!(read(b).unwrap_err().errno(), libc::EIO);
        assert_eq!(f.fs.stats().fetch_errors, 2);
        assert_eq!(&read(b).unwrap()[..], want_at(b));

        f.blob.corrupt_next.store(1, Ordering::SeqCst);
        assert_eq!(read(c).unwrap_err().errno(), libc::EIO);
        assert_eq!(f.fs.stats().verification_failures, 1);
        // Nothing bad was cached: the retry fetches again and gets the right bytes.
        let before = f.blob.request_count();
        assert_eq!(&read(c).unwrap()[..], want_at(c));
        assert_eq!(f.blob.request_count(), before + 1);
    }
}

#[test]
fn a_stalled_fetch_times_out_with_eio() {
    let (blob, _) = sample_blob(OutputFormat::Estargz);
    let config = FsConfig {
        fetch_timeout: Duration::from_millis(100),
        ..quiet_config()
    };
    let f = fixture_with(FaultBlob::new(blob), config, 0);
    f.blob.hold();
    assert_eq!(f.read("bin/tool", 0, 10).unwrap_err().errno(), libc::EIO);
    assert_eq!(f.fs.stats().fetch_errors, 1);
}

/// After a request the registry left unanswered, a reader's next request fails at
/// once for the rest of that timeout (the kernel retries a failed page, and reads queue
/// behind the stalled ones: each must not wait a timeout of its own), and one after the
/// window asks the registry again and reads right once it answers.
#[test]
fn after_a_stall_reads_fail_at_once_until_the_timeout_has_passed_again() {
    let (blob, src) = sample_blob(OutputFormat::Estargz);
    let timeout = Duration::from_millis(400);
    let config = FsConfig {
        fetch_timeout: timeout,
        ..quiet_config()
    };
    let f = fixture_with(FaultBlob::new(blob), config, 0);
    f.blob.hold();
    let started = std::time::Instant::now();
    assert_eq!(f.read("bin/tool", 0, 10).unwrap_err().errno(), libc::EIO);
    assert!(started.elapsed() >= timeout);
    let asked = f.blob.request_count();
    // Another file, another chunk: no request, no wait.
    let again = std::time::Instant::now();
    assert_eq!(f.read("data/big", 0, 10).unwrap_err().errno(), libc::EIO);
    assert!(
        again.elapsed() < timeout / 2,
        "waited {:?}",
        again.elapsed()
    );
    assert_eq!(
        f.blob.request_count(),
        asked,
        "the stalled registry was asked again"
    );
    // The window passes and the registry answers: read right.
    std::thread::sleep(timeout);
    f.blob.release();
    assert_eq!(
        &f.read("data/big", 0, 10).unwrap()[..],
        &src.files["data/big"][..10]
    );
}

#[test]
fn concurrent_identical_reads_fetch_once() {
    let (blob, src) = sample_blob(OutputFormat::ZstdChunked);
    let f = fixture_with(FaultBlob::new(blob), quiet_config(), 1 << 30);
    f.blob.hold();
    let ino = f.ino("data/big");
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let fs = Arc::clone(&f.fs);
            f.rt.spawn(async move { fs.read(ino, 10, 100).await })
        })
        .collect();
    // Every reader has registered its miss (and so joined or led the fetch) before the
    // blob may answer.
    assert!(testkit::wait_until(Duration::from_secs(10), || {
        f.fs.stats().cache_misses == 8
    }));
    f.blob.release();
    for r in readers {
        let got = f.rt.block_on(r).unwrap().unwrap();
        assert_eq!(&got[..], &src.files["data/big"][10..110]);
    }
    assert_eq!(f.blob.request_count(), 1);
    assert_eq!(f.fs.stats().range_requests, 1);
}

#[test]
fn adjacent_chunks_are_coalesced_into_one_range_request() {
    for format in FORMATS {
        let (blob, src) = sample_blob(format);
        let f = fixture_with(FaultBlob::new(blob), quiet_config(), 0);
        let got = f.read("data/big", CHUNK / 2, 3 * CHUNK as u32).unwrap();
        let want = &src.files["data/big"];
        assert_eq!(&got[..], &want[CHUNK as usize / 2..CHUNK as usize * 7 / 2]);
        // Four chunks, one request covering all of them.
        let ino = f.ino("data/big");
        let index = f.fs.layer().index();
        let chunks = f.fs.layer().chunks_for_range(
            index.resolve(estargz::NodeId(ino as u32 - 1)),
            CHUNK / 2,
            3 * CHUNK,
        );
        assert_eq!(chunks.len(), 4);
        let reqs = f.blob.requests.lock().unwrap().clone();
        assert_eq!(reqs.len(), 1, "{format:?}: {reqs:?}");
        assert_eq!(reqs[0].0, chunks[0].comp_offset);
        assert_eq!(reqs[0].0 + reqs[0].1, chunks[3].comp_end);
        let s = f.fs.stats();
        assert_eq!((s.range_requests, s.cache_misses), (1, 4));
    }
}

#[test]
fn cached_reads_are_answered_without_the_network() {
    let (blob, src) = sample_blob(OutputFormat::Estargz);
    let f = fixture_with(FaultBlob::new(blob), quiet_config(), 0);
    let ino = f.ino("bin/tool");
    assert!(matches!(
        f.fs.read_start(ino, 0, 100).unwrap(),
        ReadStart::Fetch(_)
    ));
    f.read("bin/tool", 0, 100).unwrap();
    f.blob.fail_all.store(true, Ordering::SeqCst);
    match f.fs.read_start(ino, 100, 100).unwrap() {
        ReadStart::Ready(b) => assert_eq!(&b[..], &src.files["bin/tool"][100..200]),
        ReadStart::Fetch(_) => panic!("a cached chunk needed a fetch"),
    }
    // zstd:chunked-style zero chunks or not, a file of zeros reads as zeros.
    f.blob.fail_all.store(false, Ordering::SeqCst);
    assert_eq!(f.read_all("data/zeros").unwrap(), src.files["data/zeros"]);
    assert!(f.fs.stats().cache_hits >= 1);
}

#[test]
fn disk_cache_survives_reopen_and_corrupt_files_are_refetched() {
    let (blob, src) = sample_blob(OutputFormat::Estargz);
    let f = fixture_with(FaultBlob::new(blob.clone()), quiet_config(), 1 << 30);
    assert_eq!(f.read_all("data/big").unwrap(), src.files["data/big"]);
    let used = f.cache.disk_bytes_used();
    assert_eq!(used, src.files["data/big"].len() as u64);

    // A new cache over the same directory (a restarted daemon) with the network gone.
    let cache_dir = f.dir.path().join("cache");
    std::fs::write(cache_dir.join("tmp").join("leftover"), b"torn").unwrap();
    let cache = SharedCache::open(CacheConfig {
        dir: cache_dir.clone(),
        memory_bytes: 64 << 20,
        disk_bytes: 1 << 30,
        max_fill_percent: 100,
    })
    .unwrap();
    assert!(!cache_dir.join("tmp").join("leftover").exists());
    assert_eq!(cache.disk_bytes_used(), used);
    let offline = Arc::new(FaultBlob::new(blob));
    let layer =
        f.rt.block_on(Layer::open(offline.clone(), &Default::default()))
            .unwrap();
    offline.requests.lock().unwrap().clear();
    offline.fail_all.store(true, Ordering::SeqCst);
    let layer = Arc::new(layer);
    let fs2 = LayerFs::new(
        layer,
        backing(&cache, &f.rt, &quiet_config()),
        quiet_config(),
    )
    .unwrap();
    let ino = f.ino("data/big");
    let read2 = |off: u64| {
        let res = f.rt.block_on(fs2.read(ino, off, CHUNK as u32));
        f.rt.block_on(fs2.writes_settled());
        res
    };
    assert_eq!(
        &read2(0).unwrap()[..],
        &src.files["data/big"][..CHUNK as usize]
    );
    assert_eq!(offline.request_count(), 0);

    // Flip a byte of a cached chunk file: detected on load, never served.
    let chunk =
        f.fs.layer()
            .chunks_for_range(estargz::NodeId(ino as u32 - 1), CHUNK, 1)[0];
    let path = cache.chunk_file(&chunk.digest);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[7] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(read2(CHUNK).unwrap_err().errno(), libc::EIO);
    assert!(!path.exists(), "the corrupt file is dropped");
    offline.fail_all.store(false, Ordering::SeqCst);
    assert_eq!(
        &read2(CHUNK).unwrap()[..],
        &src.files["data/big"][CHUNK as usize..2 * CHUNK as usize]
    );
    assert!(path.exists(), "refetched and cached again");
}

#[test]
fn disk_cache_stays_within_its_budget() {
    let (blob, src) = sample_blob(OutputFormat::ZstdChunked);
    let budget = 3 * CHUNK;
    let f = fixture_with(FaultBlob::new(blob), quiet_config(), budget);
    assert_eq!(f.read_all("data/big").unwrap(), src.files["data/big"]);
    assert_eq!(f.read_all("data/exact").unwrap(), src.files["data/exact"]);
    assert!(f.cache.disk_bytes_used() <= budget);
    let files: u64 = walk(&f.dir.path().join("cache/chunks"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(files, f.cache.disk_bytes_used());
    assert!(files > 0);
}

#[test]
fn identical_chunks_are_shared_across_layers_through_the_disk_cache() {
    let (tar, src) = sample_tar();
    let a = fixture_with(
        FaultBlob::new(convert(&tar, OutputFormat::Estargz, &[])),
        quiet_config(),
        1 << 30,
    );
    assert_eq!(a.read_all("data/big").unwrap(), src.files["data/big"]);
    // The same content in another format: other blob, same chunk digests.
    let blob = Arc::new(FaultBlob::new(convert(
        &tar,
        OutputFormat::ZstdChunked,
        &[],
    )));
    let layer =
        a.rt.block_on(Layer::open(blob.clone(), &Default::default()))
            .unwrap();
    blob.requests.lock().unwrap().clear();
    let fs = LayerFs::new(
        Arc::new(layer),
        backing(&a.cache, &a.rt, &quiet_config()),
        quiet_config(),
    )
    .unwrap();
    let ino = fs
        .lookup(fs.lookup(1, b"data").unwrap().ino, b"big")
        .unwrap()
        .ino;
    let got = a.rt.block_on(fs.read(ino, 0, 1 << 20)).unwrap();
    assert_eq!(&got[..], &src.files["data/big"][..]);
    assert_eq!(blob.request_count(), 0);
}

/// A TOC that gives a chunk already cached (from an honest layer) another length: the
/// read fails with EIO instead of returning the cached bytes as the whole file, from
/// memory and from disk, and the honest layer's chunk is kept.
#[test]
fn a_toc_giving_a_cached_chunk_another_length_gets_eio_not_short_data() {
    let (blob, src) = sample_blob(OutputFormat::Estargz);
    let honest = fixture_with(FaultBlob::new(blob.clone()), quiet_config(), 1 << 30);
    assert_eq!(
        honest.read_all("opaque/kept").unwrap(),
        src.files["opaque/kept"]
    );
    honest.rt.block_on(honest.fs.writes_settled());

    let size = blob.len() as u64;
    let tail_len = blob.len().min(1 << 10);
    let footer = estargz::parse_footer(&blob[blob.len() - tail_len..], size).unwrap();
    let toc = &blob[footer.toc_offset as usize..][..footer.toc_compressed_size as usize];
    let mut parsed = estargz::parse_toc(&footer, toc, &Default::default()).unwrap();
    let entry = parsed
        .toc
        .entries
        .iter_mut()
        .find(|e| e.name == "opaque/kept")
        .unwrap();
    // Within the chunk bound, so the layer opens and the cache is what is asked.
    entry.size = 8 << 20;
    let lying = Layer::from_parts(Arc::new(FaultBlob::new(blob)), size, footer, &parsed).unwrap();
    let fs = LayerFs::new(
        Arc::new(lying),
        backing(&honest.cache, &honest.rt, &quiet_config()),
        quiet_config(),
    )
    .unwrap();
    let dir = fs.lookup(1, b"opaque").unwrap().ino;
    let kept = fs.lookup(dir, b"kept").unwrap();
    assert_eq!(kept.size, 8 << 20);
    let from_memory = honest
        .rt
        .block_on(fs.read(kept.ino, 0, 1 << 20))
        .unwrap_err();
    assert_eq!(from_memory.errno(), libc::EIO, "{from_memory}");
    assert!(
        from_memory.to_string().contains("the TOC says"),
        "{from_memory}"
    );

    honest.cache.forget_memory();
    let from_disk = honest
        .rt
        .block_on(fs.read(kept.ino, 0, 1 << 20))
        .unwrap_err();
    assert_eq!(from_disk.errno(), libc::EIO, "{from_disk}");
    honest.cache.forget_memory();
    assert_eq!(
        honest.read_all("opaque/kept").unwrap(),
        src.files["opaque/kept"]
    );
}

#[test]
fn a_chunk_read_to_its_last_byte_leaves_the_memory_tier_and_reads_back_from_disk() {
    let (f, src) = fixture(OutputFormat::Estargz);
    let ino = f.ino("data/big");
    let first =
        f.fs.layer()
            .chunks_for_range(estargz::NodeId(ino as u32 - 1), 0, 1)[0];
    let want = &src.files["data/big"];
    let quarter = CHUNK / 4;
    for i in 0..3 {
        let got = f.read("data/big", i * quarter, quarter as u32).unwrap();
        assert_eq!(
            &got[..],
            &want[(i * quarter) as usize..((i + 1) * quarter) as usize]
        );
        assert!(f.cache.in_memory(&first.digest), "read in part: kept");
    }
    f.read("data/big", 3 * quarter, quarter as u32).unwrap();
    assert!(!f.cache.in_memory(&first.digest), "read through: let go");
    assert!(f.cache.contains(&first.digest), "still on disk");
    // Read again (as after the kernel dropped its pages): from disk, not fetched again.
    let fetches_of_first = || {
        let requests = f.blob.requests.lock().unwrap();
        requests
            .iter()
            .filter(|&&(offset, len)| {
                offset <= first.comp_offset && first.comp_offset < offset + len
            })
            .count()
    };
    let before = fetches_of_first();
    let again = f.read("data/big", 100, 1000).unwrap();
    assert_eq!(&again[..], &want[100..1100]);
    assert_eq!(fetches_of_first(), before);
}

#[test]
fn a_chunk_read_through_before_its_disk_write_leaves_memory_once_written() {
    let (f, _) = fixture(OutputFormat::Estargz);
    let digest = estargz::Sha256Sum::of(b"not yet written");
    let data = bytes::Bytes::from_static(b"not yet written");
    f.cache.put_memory(digest, data.clone());
    f.cache.read_through(digest);
    assert!(f.cache.in_memory(&digest), "the only copy: kept");
    f.cache.put_disk(digest, &data);
    assert!(!f.cache.in_memory(&digest));
    assert!(f.cache.contains(&digest));
}
