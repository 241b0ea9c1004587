//! What is fetched without a reader asking for it: prefetch, the background fetch,
//! read-ahead, the neighbours of a miss, and whole-file copies for passthrough.

use super::*;

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
fn the_prefetch_takes_each_prioritized_file_up_to_its_bound_and_the_rest_when_read() {
    // The rest of a file is never bridged over, not even when it is local already.
    for (format, rest_local) in FORMATS.into_iter().flat_map(|f| [(f, false), (f, true)]) {
        let (tar, src) = sample_tar();
        // data/big (5 chunks and 17 bytes) comes first in the range, bin/tool after it.
        let blob = FaultBlob::new(convert(&tar, format, &["data/big", "bin/tool"]));
        let config = FsConfig {
            prefetch_file_bytes: 2 * CHUNK,
            ..quiet_config()
        };
        let f = fixture_with(blob, config, 1 << 30);
        let idx = f.fs.layer().index();
        let big = idx.entry(idx.lookup("data/big").unwrap());
        let rest = big.chunks()[2].comp_offset..big.chunks().last().unwrap().comp_end;
        assert_eq!(big.chunks()[2].file_offset, 2 * CHUNK, "{format:?}");
        let big_src = &src.files["data/big"];
        if rest_local {
            let tail = f.read("data/big", 2 * CHUNK, 4 * CHUNK as u32).unwrap();
            assert_eq!(&tail[..], &big_src[2 * CHUNK as usize..]);
        }
        let before = f.blob.request_count();
        f.rt.block_on(f.fs.fetcher().prefetch());
        let requests = f.blob.requests.lock().unwrap()[before..].to_vec();
        // No request reaches into data/big's chunks past the bound, and bin/tool, after
        // them in the range, came all the same.
        for &(offset, len) in &requests {
            assert!(
                offset + len <= rest.start || offset >= rest.end,
                "{format:?}: {requests:?} reaches into {rest:?}"
            );
        }
        let prefetched = f.blob.request_count();
        assert_eq!(f.read_all("bin/tool").unwrap(), src.files["bin/tool"]);
        let head = f.read("data/big", 0, 2 * CHUNK as u32).unwrap();
        assert_eq!(&head[..], &big_src[..2 * CHUNK as usize]);
        assert_eq!(
            f.blob.request_count(),
            prefetched,
            "{format:?}: heads were local"
        );
        // The rest is fetched when read.
        assert_eq!(f.read_all("data/big").unwrap(), *big_src);
        assert_eq!(
            f.blob.request_count() > prefetched,
            !rest_local,
            "{format:?}, rest local: {rest_local}"
        );
    }
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
    let (out, big) = big_file_marked(vec![0..8 * CHUNK]);
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
fn a_miss_also_fetches_the_next_files_in_the_blob_in_the_demands_request() {
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
    let tool = f.fs.layer().index().lookup("bin/tool").unwrap();
    let tool_start = f.fs.layer().index().entry(tool).chunks()[0].comp_offset;
    let tool_end =
        f.fs.layer()
            .index()
            .entry(tool)
            .chunks()
            .iter()
            .map(|c| c.comp_end)
            .max()
            .unwrap();
    // The body stops after the demand's bytes: the reader is answered before any
    // neighbour byte arrives.
    f.blob
        .pause_after
        .store(tool_end - tool_start, Ordering::SeqCst);
    let read = std::thread::scope(|s| {
        let reader = s.spawn(|| f.read_all("bin/tool"));
        let answered = testkit::wait_until(Duration::from_secs(10), || reader.is_finished());
        f.blob.rest_gate.add_permits(1);
        assert!(answered, "the reader waited for its neighbours' bytes");
        reader.join().unwrap()
    });
    assert_eq!(read.unwrap(), src.files["bin/tool"]);
    // One request: the demand's chunks first, then the rest of this small layer.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let answered = |f: &Fixture| {
        let asked: u64 = f.blob.requests.lock().unwrap().iter().map(|r| r.1).sum();
        f.fs.stats().bytes_fetched == asked
    };
    while !answered(&f) {
        assert!(
            std::time::Instant::now() < deadline,
            "neighbours never arrived"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(f.blob.request_count(), 1);
    let (start, len) = f.blob.requests.lock().unwrap()[0];
    assert_eq!(start, tool_start);
    assert!(start + len > tool_end, "the request carried no neighbours");
    for path in ["data/big", "data/exact", "etc/attrs", "opaque/kept"] {
        assert_eq!(f.read_all(path).unwrap(), src.files[path], "{path}");
    }
    assert_eq!(
        f.blob.request_count(),
        1,
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

/// `big` of [`one_big_file`], converted with its start-up reads at `ranges` marked.
fn big_file_marked(ranges: Vec<std::ops::Range<u64>>) -> (Vec<u8>, Vec<u8>) {
    let (tar, big) = one_big_file();
    let mut out = Vec::new();
    let opts = estargz::WriterOptions {
        format: OutputFormat::Estargz,
        chunk_size: CHUNK,
        prioritized_files: vec!["big".into()],
        prefetch_ranges: [("big".to_string(), ranges)].into(),
        threads: 1,
        ..Default::default()
    };
    estargz::convert(&tar[..], &mut out, &opts).unwrap();
    (out, big)
}

impl Fixture {
    /// Whether a range request so far covered any byte of the chunk holding `big`'s
    /// byte `offset`.
    fn fetched_chunk_at(&self, offset: u64) -> bool {
        let node = estargz::NodeId(self.ino("big") as u32 - 1);
        self.requested(&self.fs.layer().chunks_for_range(node, offset, 1)[0])
    }

    /// Whether a range request so far covered any byte of chunk `c`.
    fn requested(&self, c: &estargz::Chunk) -> bool {
        let requests = self.blob.requests.lock().unwrap();
        requests
            .iter()
            .any(|&(start, len)| start < c.comp_end && start + len > c.comp_offset)
    }

    /// Waits until nothing is fetched: no chunk claimed for a fetch, and every byte
    /// asked for delivered. (Bytes alone were not enough: a fetch cut into several range
    /// requests sends the next once the one before is in, and between the two the
    /// counts agree.)
    fn settle(&self) {
        assert!(testkit::wait_until(Duration::from_secs(20), || {
            let asked: u64 = self.blob.requests.lock().unwrap().iter().map(|r| r.1).sum();
            self.fs.fetcher().chunks_in_flight() == 0 && self.fs.stats().bytes_fetched == asked
        }));
    }
}

#[test]
fn neighbours_keep_to_the_marked_chunks_until_the_container_leaves_them() {
    // Marked: the first chunk and the fourth; the second and third were never read.
    let (blob, big) = big_file_marked(vec![0..CHUNK, 3 * CHUNK..4 * CHUNK]);
    let config = FsConfig {
        neighbour_fetch_bytes: 8 * CHUNK,
        ..quiet_config()
    };
    let f = fixture_with(FaultBlob::new(blob), config, 1 << 30);
    assert_eq!(&f.read("big", 0, 100).unwrap()[..], &big[..100]);
    f.settle();
    assert!(
        f.fetched_chunk_at(3 * CHUNK),
        "the marked neighbour was not fetched"
    );
    assert!(!f.fetched_chunk_at(CHUNK) && !f.fetched_chunk_at(2 * CHUNK));
    // An unmarked chunk read: this is not the recorded run, guesses take anything.
    let at = CHUNK + 7;
    assert_eq!(
        &f.read("big", at, 100).unwrap()[..],
        &big[at as usize..at as usize + 100]
    );
    f.settle();
    assert!(f.fetched_chunk_at(2 * CHUNK) && f.fetched_chunk_at(4 * CHUNK));
}

#[test]
fn readahead_keeps_to_the_marked_chunks_until_the_container_leaves_them() {
    let (blob, big) = big_file_marked(vec![0..2 * CHUNK, 8 * CHUNK..9 * CHUNK]);
    let config = FsConfig {
        readahead_initial: 4 * CHUNK,
        readahead_max: 16 * CHUNK,
        ..quiet_config()
    };
    let f = fixture_with(FaultBlob::new(blob), config, 1 << 30);
    let read_to = |from: u64, to: u64| {
        let mut off = from;
        while off < to {
            let got = f.read("big", off, 16 << 10).unwrap();
            assert_eq!(&got[..], &big[off as usize..off as usize + got.len()]);
            off += got.len() as u64;
        }
    };
    // A sequential reader of the marked start: what follows it was never read.
    read_to(0, 2 * CHUNK);
    f.settle();
    for k in 2..8 {
        assert!(
            !f.fetched_chunk_at(k * CHUNK),
            "unmarked chunk {k} read ahead"
        );
    }
    // It reads on past the marks: read-ahead runs ahead of it again from where it
    // left them, unmarked chunks too.
    read_to(2 * CHUNK, 4 * CHUNK);
    f.settle();
    let ahead: Vec<u64> = (4..8).filter(|&k| f.fetched_chunk_at(k * CHUNK)).collect();
    assert_eq!(ahead, [4, 5, 6, 7], "read ahead after leaving the marks");
}

/// `pairs` files of each of two kinds in a package directory, side by side in the blob
/// as a python package's `.py` sources and their compiled modules lie: `pkg/NN.bin` and
/// `pkg/NN.src`, 48 KiB each (more than the gap a range request bridges).
fn package_of_two_kinds(pairs: usize) -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
    let mut b = tar::Builder::new(Vec::new());
    let mut files = BTreeMap::new();
    for i in 0..pairs {
        for (k, kind) in ["bin", "src"].iter().enumerate() {
            let path = format!("pkg/{i:02}.{kind}");
            let data = pattern(48 << 10, (2 * i + k) as u64 + 100);
            let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
            b.append_data(&mut h, &path, &data[..]).unwrap();
            files.insert(path, data);
        }
    }
    (
        convert(&b.into_inner().unwrap(), OutputFormat::Estargz, &[]),
        files,
    )
}

impl Fixture {
    /// Whether a range request so far covered any byte of the file at `path`.
    fn fetched_file(&self, path: &str) -> bool {
        let index = self.fs.layer().index();
        let node = index.lookup(path).unwrap();
        index.entry(node).chunks().iter().any(|c| self.requested(c))
    }
}

#[test]
fn neighbours_leave_out_a_kind_of_file_the_container_does_not_read() {
    let (blob, files) = package_of_two_kinds(48);
    // A window of about ten pairs; a kind is judged after 64 KiB of it, two files.
    let config = FsConfig {
        neighbour_fetch_bytes: 1 << 20,
        ..quiet_config()
    };
    let f = fixture_with(FaultBlob::new(blob), config, 1 << 30);
    let read = |path: &str| {
        assert_eq!(f.read_all(path).unwrap(), files[path], "{path}");
        f.settle();
    };
    // The container reads the .bin files only: the first miss brings .src neighbours
    // too, and none of them is read.
    read("pkg/00.bin");
    assert!(f.fetched_file("pkg/03.src"), "no neighbours fetched at all");
    for i in 1..5 {
        read(&format!("pkg/{i:02}.bin"));
    }
    let before = f.blob.request_count();
    read("pkg/20.bin");
    assert!(f.blob.request_count() > before, "pkg/20.bin was no miss");
    assert!(
        f.fetched_file("pkg/22.bin"),
        "the .bin neighbours were not fetched"
    );
    for i in 20..24 {
        assert!(
            !f.fetched_file(&format!("pkg/{i:02}.src")),
            "pkg/{i:02}.src fetched as a neighbour after none of its kind was read"
        );
    }
    // The container turns out to read .src files too: neighbours take them again.
    read("pkg/30.src");
    assert!(
        f.fetched_file("pkg/32.src"),
        "the .src kind was not taken again"
    );
}
