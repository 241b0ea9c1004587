//! The fetcher: faults become EIO and never wrong data, retries work, identical
//! fetches are shared, neighbours are coalesced, caches hold and verify, prefetch,
//! background fetch and read-ahead.

use super::*;
use crate::ReadStart;

fn sample_blob(format: OutputFormat) -> (Vec<u8>, Source) {
    let (tar, src) = sample_tar();
    (convert(&tar, format, &[]), src)
}

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

#[test]
fn prefetch_fetches_the_prioritized_range_in_one_request() {
    for format in [OutputFormat::Estargz, OutputFormat::StargzZstdChunked] {
        let (tar, src) = sample_tar();
        let blob = FaultBlob::new(convert(&tar, format, &["bin/tool", "data/exact"]));
        let f = fixture_with(blob, quiet_config(), 1 << 30);
        assert!(f.fs.layer().index().prefetch_range().is_some());
        f.rt.block_on(f.fs.fetcher().prefetch());
        assert_eq!(f.blob.request_count(), 1, "{format:?}");
        assert_eq!(f.fs.stats().range_requests, 1);
        assert_eq!(f.read_all("bin/tool").unwrap(), src.files["bin/tool"]);
        assert_eq!(f.read_all("data/exact").unwrap(), src.files["data/exact"]);
        assert_eq!(f.blob.request_count(), 1, "prioritized files were local");
        f.read_all("data/big").unwrap();
        assert!(f.blob.request_count() > 1);
    }
}

#[test]
fn marked_chunks_are_prefetched_and_nothing_else() {
    for format in FORMATS {
        let (tar, src) = sample_tar();
        let mut out = Vec::new();
        // data/big is 5 chunks and 17 bytes; its start-up reads were at its start and in
        // its fourth chunk; bin/tool is prioritized whole.
        let opts = estargz::WriterOptions {
            format,
            chunk_size: CHUNK,
            prioritized_files: vec!["data/big".into(), "bin/tool".into()],
            prefetch_ranges: [(
                "data/big".to_string(),
                vec![0..100, 3 * CHUNK + 5..3 * CHUNK + 9],
            )]
            .into(),
            threads: 1,
            ..Default::default()
        };
        estargz::convert(&tar[..], &mut out, &opts).unwrap();
        let f = fixture_with(FaultBlob::new(out), quiet_config(), 1 << 30);
        assert!(f.fs.layer().index().has_prefetch_marks());
        f.rt.block_on(f.fs.fetcher().prefetch());
        let prefetched = f.blob.request_count();
        assert!(prefetched >= 1, "{format:?}");
        let big = &src.files["data/big"];
        let at = |off: u64, len: u64| &big[off as usize..(off + len) as usize];
        assert_eq!(&f.read("data/big", 0, 100).unwrap()[..], at(0, 100));
        let off = 3 * CHUNK + 5;
        assert_eq!(&f.read("data/big", off, 4).unwrap()[..], at(off, 4));
        assert_eq!(f.read_all("bin/tool").unwrap(), src.files["bin/tool"]);
        assert_eq!(
            f.blob.request_count(),
            prefetched,
            "marked chunks were local"
        );
        // The unread middle of data/big was left to be fetched on demand.
        let fetched = f.fs.stats().bytes_fetched;
        assert_eq!(
            &f.read("data/big", CHUNK + 1, 10).unwrap()[..],
            at(CHUNK + 1, 10)
        );
        assert!(f.blob.request_count() > prefetched, "{format:?}");
        // The reader is answered as the body arrives; the range counts its bytes once
        // the body is complete, a moment later.
        let counted = std::time::Instant::now();
        while f.fs.stats().bytes_fetched == fetched && counted.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(f.fs.stats().bytes_fetched > fetched);
    }
}

#[test]
fn chunks_are_served_as_the_body_arrives_not_when_the_range_is_complete() {
    let (tar, src) = sample_tar();
    let blob = FaultBlob::new(convert(
        &tar,
        OutputFormat::Estargz,
        &["bin/tool", "data/big"],
    ));
    let f = fixture_with(blob, quiet_config(), 1 << 30);
    let idx = f.fs.layer().index();
    let tool = idx.entry(idx.lookup("bin/tool").unwrap());
    let tool_end = tool.chunks().iter().map(|c| c.comp_end).max().unwrap();
    // The prefetch's body stops after bin/tool's bytes until the test lets it go on.
    f.blob.pause_after.store(tool_end, Ordering::SeqCst);
    let fs = Arc::clone(&f.fs);
    let prefetch = f.rt.spawn(async move { fs.fetcher().prefetch().await });
    assert!(testkit::wait_until(Duration::from_secs(10), || {
        f.blob.request_count() == 1
    }));
    let ino = f.ino("bin/tool");
    let fs = Arc::clone(&f.fs);
    let tool =
        f.rt.block_on(async move { fs.read(ino, 0, 1 << 20).await })
            .unwrap();
    assert_eq!(&tool[..], &src.files["bin/tool"][..]);
    assert!(!prefetch.is_finished(), "the range was still arriving");
    // A reader of the rest waits for its bytes, then gets them from the same request.
    let ino = f.ino("data/big");
    let fs = Arc::clone(&f.fs);
    let big = f.rt.spawn(async move { fs.read(ino, 0, 1 << 20).await });
    std::thread::sleep(Duration::from_millis(50));
    assert!(!big.is_finished());
    f.blob.rest_gate.add_permits(1);
    let big = f.rt.block_on(big).unwrap().unwrap();
    assert_eq!(&big[..], &src.files["data/big"][..big.len()]);
    f.rt.block_on(prefetch).unwrap();
    assert_eq!(f.blob.request_count(), 1);
}

#[test]
fn a_prioritized_range_larger_than_a_request_is_prefetched_in_pieces_in_order() {
    let (tar, src) = sample_tar();
    let blob = FaultBlob::new(convert(
        &tar,
        OutputFormat::Estargz,
        &["data/big", "data/exact", "bin/tool"],
    ));
    let config = FsConfig {
        prefetch_request_bytes: 2 * CHUNK,
        ..quiet_config()
    };
    let f = fixture_with(blob, config, 1 << 30);
    let range = f.fs.layer().index().prefetch_range().unwrap();
    f.rt.block_on(f.fs.fetcher().prefetch());
    let requests = f.blob.requests.lock().unwrap().clone();
    assert!(requests.len() > 1, "{requests:?}");
    // Together they cover the range without overlap; none is larger than asked unless
    // one chunk is.
    let fetched: u64 = requests.iter().map(|r| r.1).sum();
    assert!(fetched <= range.end - range.start);
    for path in ["data/big", "data/exact", "bin/tool"] {
        assert_eq!(f.read_all(path).unwrap(), src.files[path], "{path}");
    }
    assert_eq!(
        f.blob.request_count(),
        requests.len(),
        "prioritized files were local"
    );
}

#[test]
fn background_fetch_makes_the_whole_layer_local() {
    for format in FORMATS {
        let (blob, src) = sample_blob(format);
        let config = FsConfig {
            background_request_bytes: 2 * CHUNK,
            ..quiet_config()
        };
        let f = fixture_with(FaultBlob::new(blob), config, 1 << 30);
        let before = f.fs.stats();
        assert!(before.local_bytes < before.total_bytes);
        f.rt.block_on(f.fs.fetcher().background());
        let after = f.fs.stats();
        assert_eq!(after.local_bytes, after.total_bytes, "{format:?}");
        // Requests were bounded in size, so there were several.
        assert!(after.range_requests > 2);
        f.blob.fail_all.store(true, Ordering::SeqCst);
        f.cache.forget_memory();
        for (path, data) in &src.files {
            assert_eq!(&f.read_all(path).unwrap(), data, "{path}");
        }
    }
}

#[test]
fn background_fetch_waits_for_on_demand_reads() {
    let (blob, _) = sample_blob(OutputFormat::Estargz);
    let f = fixture_with(FaultBlob::new(blob), quiet_config(), 1 << 30);
    f.blob.hold();
    let ino = f.ino("bin/tool");
    let fs = Arc::clone(&f.fs);
    let reader = f.rt.spawn(async move { fs.read(ino, 0, 10).await });
    assert!(
        testkit::wait_until(Duration::from_secs(10), || {
            f.blob.started.load(Ordering::SeqCst) == 1
        }),
        "{:?}",
        f.blob.requests.lock().unwrap()
    );
    let fetcher = Arc::clone(f.fs.fetcher());
    let background = f.rt.spawn(async move { fetcher.background().await });
    // While the on-demand read is stuck, the background fetch sends nothing. Give it
    // every chance to (a bounded wait that must time out).
    assert!(!testkit::wait_until(Duration::from_millis(300), || {
        f.blob.started.load(Ordering::SeqCst) > 1
    }));
    f.blob.release();
    f.rt.block_on(reader).unwrap().unwrap();
    f.rt.block_on(background).unwrap();
    let s = f.fs.stats();
    assert_eq!(s.local_bytes, s.total_bytes);
}

fn one_big_file() -> (Vec<u8>, Vec<u8>) {
    let big = pattern(64 * CHUNK as usize, 9);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, 0o644, big.len() as u64);
    b.append_data(&mut h, "big", &big[..]).unwrap();
    (b.into_inner().unwrap(), big)
}

#[test]
fn sequential_readers_get_growing_parallel_readahead() {
    let (tar, big) = one_big_file();
    let config = FsConfig {
        readahead_initial: 4 * CHUNK,
        readahead_max: 16 * CHUNK,
        readahead_requests: 4,
        ..quiet_config()
    };
    let f = fixture_with(
        FaultBlob::new(convert(&tar, OutputFormat::ZstdChunked, &[])),
        config,
        0,
    );
    let mut off = 0;
    while off < big.len() as u64 {
        let got = f.read("big", off, 32 << 10).unwrap();
        assert_eq!(&got[..], &big[off as usize..off as usize + got.len()]);
        off += got.len() as u64;
    }
    let reqs = f.blob.requests.lock().unwrap().clone();
    // 64 chunks in fewer requests, the later ones larger than the first one. How far the
    // window grows depends on how the reader races the fetches (a loaded machine keeps it
    // smaller), so only the first doubling is asserted.
    assert!(reqs.len() < 48, "{} requests", reqs.len());
    let first = reqs[0].1;
    let largest = reqs.iter().map(|r| r.1).max().unwrap();
    assert!(largest >= 2 * first, "request sizes did not grow: {reqs:?}");
    // The second 32 KiB read of every 64 KiB chunk finds it cached, however the read-ahead
    // raced the reader (a read that waits for an in-flight fetch counts as a miss).
    let s = f.fs.stats();
    assert!(s.cache_hits >= 64, "{s:?}");
}

#[test]
fn a_reader_served_from_prefetched_chunks_fetches_nothing_ahead_until_it_misses() {
    let (tar, big) = one_big_file();
    let mut out = Vec::new();
    let opts = estargz::WriterOptions {
        format: OutputFormat::Estargz,
        chunk_size: CHUNK,
        prioritized_files: vec!["big".into()],
        prefetch_ranges: [("big".to_string(), vec![0..8 * CHUNK])].into(),
        threads: 1,
        ..Default::default()
    };
    estargz::convert(&tar[..], &mut out, &opts).unwrap();
    let config = FsConfig {
        readahead_initial: 4 * CHUNK,
        readahead_max: 16 * CHUNK,
        ..quiet_config()
    };
    let f = fixture_with(FaultBlob::new(out), config, 1 << 30);
    f.rt.block_on(f.fs.fetcher().prefetch());
    let prefetched = f.blob.request_count();
    // Sequential, but every read is a hit: a mapped library's read-around looks like
    // this, and fetching ahead of it would fetch what the command never reads.
    let mut off = 0;
    while off < 8 * CHUNK {
        let got = f.read("big", off, 16 << 10).unwrap();
        assert_eq!(&got[..], &big[off as usize..off as usize + got.len()]);
        off += got.len() as u64;
    }
    assert_eq!(f.blob.request_count(), prefetched);
    // The first miss turns read-ahead on from where it missed.
    while off < 10 * CHUNK {
        let got = f.read("big", off, 16 << 10).unwrap();
        assert_eq!(&got[..], &big[off as usize..off as usize + got.len()]);
        off += got.len() as u64;
    }
    let fetched_to = f
        .blob
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.0 + r.1)
        .max()
        .unwrap();
    let layer = f.fs.layer();
    let ino = f.ino("big");
    let tenth = layer.chunks_for_range(estargz::NodeId(ino as u32 - 1), 11 * CHUNK, 1)[0];
    assert!(
        fetched_to >= tenth.comp_end,
        "no read-ahead past the reader after its miss"
    );
}

#[test]
fn a_random_reader_gets_no_readahead() {
    let (tar, big) = one_big_file();
    let blob = convert(&tar, OutputFormat::Estargz, &[]);
    let f = fixture_with(FaultBlob::new(blob), quiet_config(), 0);
    // Each read is more than max_read (1 MiB) away from where the last one ended.
    for off in [3_500_000u64, 200_000, 2_000_000, 900_000] {
        let got = f.read("big", off, 100).unwrap();
        assert_eq!(&got[..], &big[off as usize..off as usize + 100]);
    }
    assert_eq!(f.blob.request_count(), 4);
}

#[test]
fn background_fetch_keeps_to_its_rate_limit() {
    let (blob, _) = sample_blob(OutputFormat::Estargz);
    let rate = 4_000_000;
    let config = FsConfig {
        background_rate_limit: Some(rate),
        background_request_bytes: 2 * CHUNK,
        ..quiet_config()
    };
    let f = fixture_with(FaultBlob::new(blob), config, 1 << 30);
    let started = std::time::Instant::now();
    f.rt.block_on(f.fs.fetcher().background());
    let elapsed = started.elapsed().as_secs_f64();
    let fetched = f.fs.stats().bytes_fetched as f64;
    assert!(fetched > 0.0);
    // Each request waits until the ones before it fit the rate; nothing waits after
    // the last one (at most one request's bytes). Without the limit this takes ms.
    let before_last = fetched - (2 * CHUNK) as f64;
    assert!(
        elapsed >= before_last / rate as f64 * 0.95,
        "{fetched} bytes in {elapsed} s"
    );
    let s = f.fs.stats();
    assert_eq!(s.local_bytes, s.total_bytes);
}

#[test]
fn sequential_readers_over_the_disk_cache_get_chunks_loaded_ahead_into_memory() {
    let (tar, big) = one_big_file();
    let config = FsConfig {
        readahead_initial: 4 * CHUNK,
        readahead_max: 16 * CHUNK,
        ..quiet_config()
    };
    let f = fixture_with(
        FaultBlob::new(convert(&tar, OutputFormat::Estargz, &[])),
        config,
        1 << 30,
    );
    assert_eq!(f.read_all("big").unwrap(), big);
    // Everything on disk, nothing in memory, no network: a restarted daemon.
    f.cache.forget_memory();
    f.blob.requests.lock().unwrap().clear();
    f.blob.fail_all.store(true, Ordering::SeqCst);
    let fetched = f.fs.stats().range_requests;
    let ino = f.ino("big");
    let node = estargz::NodeId(ino as u32 - 1);
    let chunks =
        f.fs.layer()
            .chunks_for_range(node, 0, big.len() as u64)
            .to_vec();
    let mut off = 0;
    for _ in 0..4 {
        let got = f.read("big", off, 32 << 10).unwrap();
        assert_eq!(&got[..], &big[off as usize..off as usize + got.len()]);
        off += got.len() as u64;
    }
    // The next chunks were never read, yet they arrive in memory (loaded and verified
    // on blocking threads), so the reader's next requests are memory hits. (The two
    // read to their ends have left memory again.)
    let ahead = &chunks[2..4];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ahead.iter().all(|c| f.cache.in_memory(&c.digest)) {
        assert!(std::time::Instant::now() < deadline, "no disk read-ahead");
        std::thread::yield_now();
    }
    assert!(
        !f.cache.in_memory(&chunks[40].digest),
        "read-ahead went too far"
    );
    assert_eq!(f.blob.request_count(), 0);
    while off < big.len() as u64 {
        let got = f.read("big", off, 1 << 20).unwrap();
        assert_eq!(&got[..], &big[off as usize..off as usize + got.len()]);
        off += got.len() as u64;
    }
    assert_eq!(f.fs.stats().range_requests, fetched);
}

#[test]
fn concurrent_disk_loads_of_one_chunk_agree_and_leave_no_gates() {
    let (blob, src) = sample_blob(OutputFormat::Estargz);
    let f = fixture_with(FaultBlob::new(blob), quiet_config(), 1 << 30);
    assert_eq!(f.read_all("data/big").unwrap(), src.files["data/big"]);
    let node = estargz::NodeId(f.ino("data/big") as u32 - 1);
    let chunk = f.fs.layer().chunks_for_range(node, 0, 1)[0];
    for _ in 0..5 {
        f.cache.forget_memory();
        let got: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| f.cache.get(&chunk.digest, chunk.size)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for b in got {
            assert_eq!(
                &b.unwrap().unwrap()[..],
                &src.files["data/big"][..chunk.size as usize]
            );
        }
        assert_eq!(f.cache.loading_len(), 0);
    }
}

#[test]
fn a_miss_also_fetches_the_next_files_in_the_blob_beside_the_demand() {
    let (tar, src) = sample_tar();
    let config = FsConfig {
        neighbour_fetch_bytes: 1 << 20,
        ..quiet_config()
    };
    let f = fixture_with(
        FaultBlob::new(convert(&tar, OutputFormat::Estargz, &[])),
        config,
        1 << 30,
    );
    assert_eq!(f.read_all("bin/tool").unwrap(), src.files["bin/tool"]);
    // The neighbours' request runs on its own: wait for it to be answered (later reads
    // find its chunks cached or join their inflation).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let answered = |f: &Fixture| {
        let asked: u64 = f.blob.requests.lock().unwrap().iter().map(|r| r.1).sum();
        f.blob.request_count() == 2 && f.fs.stats().bytes_fetched == asked
    };
    while !answered(&f) {
        assert!(
            std::time::Instant::now() < deadline,
            "neighbours never arrived"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The demand's own request, and one for the rest of this small layer.
    assert_eq!(f.blob.request_count(), 2);
    let (first, second) = {
        let r = f.blob.requests.lock().unwrap();
        (r[0], r[1])
    };
    assert!(first.0 + first.1 <= second.0 || second.0 + second.1 <= first.0);
    for path in ["data/big", "data/exact", "etc/attrs", "opaque/kept"] {
        assert_eq!(f.read_all(path).unwrap(), src.files[path], "{path}");
    }
    assert_eq!(
        f.blob.request_count(),
        2,
        "neighbours were served from the cache"
    );
}

#[test]
fn files_read_whole_get_a_verified_local_copy_for_passthrough() {
    let (blob, src) = sample_blob(OutputFormat::ZstdChunked);
    let config = FsConfig {
        passthrough: true,
        passthrough_min_bytes: 2 * CHUNK,
        ..quiet_config()
    };
    let f = fixture_with(FaultBlob::new(blob.clone()), config.clone(), 1 << 30);
    let (big, zeros, exact) = (f.ino("data/big"), f.ino("data/zeros"), f.ino("etc/hard"));
    let small = f.ino("bin/tool");
    // Partly read: no copy (it would need the network).
    f.rt.block_on(f.fs.read(big, 0, CHUNK as u32)).unwrap();
    f.fs.release(big);
    f.rt.block_on(f.fs.writes_settled());
    assert!(f.fs.passthrough_file(big).is_none());
    // Wholly read and closed: a copy, byte for byte, zero chunks included; a hardlink
    // resolves to its target; files under the threshold get none.
    for path in ["data/big", "data/zeros", "data/exact", "bin/tool"] {
        assert_eq!(f.read_all(path).unwrap(), src.files[path]);
    }
    let before = f.cache.disk_bytes_used();
    for ino in [big, zeros, exact, small] {
        f.fs.release(ino);
    }
    f.rt.block_on(f.fs.writes_settled());
    let copy = |fs: &LayerFs, ino| {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut fs.passthrough_file(ino)?, &mut out).unwrap();
        Some(out)
    };
    assert_eq!(copy(&f.fs, big).unwrap(), src.files["data/big"]);
    assert_eq!(copy(&f.fs, zeros).unwrap(), src.files["data/zeros"]);
    assert_eq!(copy(&f.fs, exact).unwrap(), src.files["data/exact"]);
    assert!(copy(&f.fs, small).is_none());
    let copied = (src.files["data/big"].len() + src.files["data/zeros"].len()) as u64
        + src.files["data/exact"].len() as u64;
    assert_eq!(f.cache.disk_bytes_used(), before + copied);

    // A restarted daemon finds the copies (and counts them in the budget).
    let cache = SharedCache::open(CacheConfig {
        dir: f.dir.path().join("cache"),
        memory_bytes: 64 << 20,
        disk_bytes: 1 << 30,
        max_fill_percent: 100,
    })
    .unwrap();
    assert_eq!(cache.disk_bytes_used(), before + copied);
    let layer = Arc::new(
        f.rt.block_on(Layer::open(
            Arc::new(FaultBlob::new(blob)),
            &Default::default(),
        ))
        .unwrap(),
    );
    let fs2 = LayerFs::new(layer.clone(), backing(&cache, &f.rt, &config), config).unwrap();
    assert_eq!(copy(&fs2, big).unwrap(), src.files["data/big"]);
    // Passthrough off: never a copy.
    let off = FsConfig {
        passthrough: false,
        ..quiet_config()
    };
    let fs3 = LayerFs::new(layer, backing(&cache, &f.rt, &off), off).unwrap();
    assert!(fs3.passthrough_file(big).is_none());
}

#[test]
fn a_reader_does_not_wait_behind_prefetch_pieces_not_yet_sent() {
    let (tar, src) = sample_tar();
    let blob = FaultBlob::new(convert(
        &tar,
        OutputFormat::Estargz,
        &["data/big", "bin/tool"],
    ));
    let config = FsConfig {
        prefetch_request_bytes: CHUNK,
        readahead_requests: 1,
        ..quiet_config()
    };
    let f = fixture_with(blob, config, 1 << 30);
    f.blob.hold();
    let fs = Arc::clone(&f.fs);
    let prefetch = f.rt.spawn(async move { fs.fetcher().prefetch().await });
    assert!(testkit::wait_until(Duration::from_secs(10), || {
        f.blob.started.load(Ordering::SeqCst) == 1
    }));
    // bin/tool comes after data/big's pieces, one of which is in flight (and stuck):
    // the reader fetches it itself rather than queue behind them.
    let ino = f.ino("bin/tool");
    let fs = Arc::clone(&f.fs);
    let reader = f.rt.spawn(async move { fs.read(ino, 0, 1 << 20).await });
    assert!(
        testkit::wait_until(Duration::from_secs(10), || {
            f.blob.started.load(Ordering::SeqCst) == 2
        }),
        "{:?}",
        f.blob.requests.lock().unwrap()
    );
    f.blob.release();
    let got = f.rt.block_on(reader).unwrap().unwrap();
    assert_eq!(&got[..], &src.files["bin/tool"][..]);
    f.rt.block_on(prefetch).unwrap();
    assert_eq!(f.read_all("data/big").unwrap(), src.files["data/big"]);
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
    let digest = estargz::Digest::of(b"not yet written");
    let data = bytes::Bytes::from_static(b"not yet written");
    f.cache.put_memory(digest, data.clone());
    f.cache.read_through(digest);
    assert!(f.cache.in_memory(&digest), "the only copy: kept");
    f.cache.put_disk(digest, &data);
    assert!(!f.cache.in_memory(&digest));
    assert!(f.cache.contains(&digest));
}
