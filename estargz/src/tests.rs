//! Writer → reader round trips over `VecBlob`, interop with the `tar` crate, GNU tar and
//! the zstd CLI, and bad-input tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Read;
use std::process::Command;
use std::sync::Arc;

use crate::*;

fn block_on<F: Future>(f: F) -> F::Output {
    // VecBlob's futures are ready at once, so polling once is enough.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("future not ready"),
    }
}

fn large_file() -> Vec<u8> {
    // Noise, a run of zeros spanning whole chunks, noise again; not a multiple of the
    // chunk size.
    let mut v = testkit::image::noise(700_000, 1);
    v.extend(std::iter::repeat_n(0u8, 600_000));
    v.extend(testkit::image::noise(300_001, 2));
    v
}

const CHUNK: u64 = 128 << 10;

fn header(kind: ::tar::EntryType, mode: u32) -> ::tar::Header {
    let mut h = ::tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(100);
    h.set_mtime(1_700_000_000);
    h.set_size(0);
    h
}

/// A tar with every entry type, long names (GNU and PAX), xattrs, whiteouts.
fn sample_tar() -> Vec<u8> {
    let mut b = ::tar::Builder::new(Vec::new());
    let dir = |b: &mut ::tar::Builder<Vec<u8>>, name: &str| {
        let mut h = header(::tar::EntryType::Directory, 0o755);
        b.append_data(&mut h, name, &[][..]).unwrap();
    };
    let file = |b: &mut ::tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut h = header(::tar::EntryType::Regular, 0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    };
    dir(&mut b, "a/");
    file(&mut b, "a/small.txt", b"hello, world\n");
    file(&mut b, "a/empty", b"");
    dir(&mut b, "b/");
    file(&mut b, "b/large.bin", &large_file());
    let long_gnu = format!("a/{}/deep.txt", "g".repeat(120));
    file(&mut b, &long_gnu, b"gnu long name");
    // A PAX long name and xattrs.
    let long_pax = format!("a/{}.txt", "p".repeat(130));
    b.append_pax_extensions([
        ("path", long_pax.as_bytes()),
        ("SCHILY.xattr.user.mime", &b"text/plain"[..]),
        (
            "SCHILY.xattr.security.capability",
            &b"\x01\x00\x00\x02\xff"[..],
        ),
    ])
    .unwrap();
    let mut h = ::tar::Header::new_ustar();
    h.set_entry_type(::tar::EntryType::Regular);
    h.set_mode(0o4755);
    h.set_size(8);
    h.set_mtime(1_700_000_001);
    h.set_path("a/truncated-name.txt").unwrap();
    h.set_cksum();
    b.append(&h, &b"pax data"[..]).unwrap();
    let mut h = header(::tar::EntryType::Symlink, 0o777);
    b.append_link(&mut h, "a/sym", "../b/large.bin").unwrap();
    let mut h = header(::tar::EntryType::Link, 0o644);
    b.append_link(&mut h, "a/hl", "a/small.txt").unwrap();
    dir(&mut b, "dev/");
    let mut h = header(::tar::EntryType::Char, 0o666);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "dev/null", &[][..]).unwrap();
    let mut h = header(::tar::EntryType::Block, 0o660);
    h.set_device_major(8).unwrap();
    h.set_device_minor(1).unwrap();
    b.append_data(&mut h, "dev/sda1", &[][..]).unwrap();
    let mut h = header(::tar::EntryType::Fifo, 0o600);
    b.append_data(&mut h, "a/fifo", &[][..]).unwrap();
    // Whiteouts: a deleted file and an opaque directory.
    file(&mut b, "a/.wh.gone", b"");
    dir(&mut b, "opaque/");
    file(&mut b, "opaque/.wh..wh..opq", b"");
    b.into_inner().unwrap()
}

fn convert_to(format: OutputFormat, input: &[u8], prioritized: &[&str]) -> (Vec<u8>, WriteOutput) {
    let opts = WriterOptions {
        format,
        chunk_size: CHUNK,
        compression_level: Some(1),
        prioritized_files: prioritized.iter().map(|s| s.to_string()).collect(),
        threads: 2,
        ..Default::default()
    };
    let mut out = Vec::new();
    let res = convert(input, &mut out, &opts).unwrap();
    (out, res)
}

fn open(blob: &[u8], opts: &OpenOptions) -> Result<Layer> {
    block_on(Layer::open(Arc::new(VecBlob::new(blob.to_vec())), opts))
}

fn gunzip_all(blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(blob)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn unzstd_all(blob: &[u8]) -> Vec<u8> {
    zstd::stream::decode_all(blob).unwrap()
}

/// Entries of a tar as (path, type, content, link name) with the tar crate.
fn tar_entries(data: &[u8]) -> Vec<(String, ::tar::EntryType, Vec<u8>, Option<String>)> {
    let mut a = ::tar::Archive::new(data);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let kind = e.header().entry_type();
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            (path, kind, body, link)
        })
        .collect()
}

fn check_layer_contents(layer: &Layer) {
    let idx = layer.index();
    let read = |p: &str, off: u64, len: u64| block_on(layer.read_file_range(p, off, len)).unwrap();
    assert_eq!(read("a/small.txt", 0, 100), b"hello, world\n");
    assert_eq!(read("a/small.txt", 7, 5), b"world");
    assert_eq!(read("a/empty", 0, 10), b"");
    let large = large_file();
    assert_eq!(read("b/large.bin", 0, u64::MAX), large);
    // Ranges that start and end inside chunks and cross boundaries.
    for (off, len) in [
        (0, 1),
        (CHUNK - 3, 10),
        (5 * CHUNK + 17, 3 * CHUNK),
        (1_599_990, 100),
    ] {
        let want = &large[off as usize..(off + len).min(large.len() as u64) as usize];
        assert_eq!(read("b/large.bin", off, len), want, "range {off}+{len}");
    }
    let big = idx.lookup("b/large.bin").unwrap();
    let e = idx.entry(big);
    assert_eq!(e.size(), large.len() as u64);
    // At least this many; more when start-up ranges add cuts.
    assert!(e.chunks().len() >= large.len().div_ceil(CHUNK as usize));
    assert!(e.chunks().iter().all(|c| c.size <= CHUNK));
    // The chunk-level API: fetch, decompress and verify each chunk by hand.
    let mut rebuilt = Vec::new();
    for c in e.chunks() {
        let comp = block_on(layer.blob().read_at(c.comp_offset, c.comp_len())).unwrap();
        rebuilt.extend(layer.decompress_chunk(big, c, &comp).unwrap());
    }
    assert_eq!(rebuilt, large);
    let long_gnu = format!("a/{}/deep.txt", "g".repeat(120));
    assert_eq!(read(&long_gnu, 0, 100), b"gnu long name");
    let long_pax = format!("a/{}.txt", "p".repeat(130));
    assert_eq!(read(&long_pax, 0, 100), b"pax data");
    let pax = idx.entry(idx.lookup(&long_pax).unwrap());
    assert_eq!(pax.mode(), 0o4755);
    let xattrs: BTreeMap<&str, &[u8]> = pax.xattrs().collect();
    assert_eq!(xattrs["user.mime"], b"text/plain");
    assert_eq!(xattrs["security.capability"], b"\x01\x00\x00\x02\xff");

    let small = idx.entry(idx.lookup("a/small.txt").unwrap());
    assert_eq!((small.uid(), small.gid(), small.mode()), (1000, 100, 0o644));
    assert_eq!(small.mtime().secs, 1_700_000_000);
    assert_eq!(small.nlink(), 2);
    let hl = idx.lookup("a/hl").unwrap();
    assert_eq!(idx.resolve(hl), small.id());
    assert_eq!(read("a/hl", 0, 100), b"hello, world\n");
    assert_eq!(
        idx.entry(idx.lookup("a/sym").unwrap()).symlink_target(),
        Some("../b/large.bin")
    );
    assert_eq!(
        idx.entry(idx.lookup("dev/null").unwrap()).kind(),
        EntryKind::Char
    );
    assert_eq!(
        idx.entry(idx.lookup("dev/null").unwrap()).device(),
        Some((1, 3))
    );
    assert_eq!(
        idx.entry(idx.lookup("dev/sda1").unwrap()).device(),
        Some((8, 1))
    );
    assert_eq!(
        idx.entry(idx.lookup("a/fifo").unwrap()).kind(),
        EntryKind::Fifo
    );
    assert!(idx.lookup("a/.wh.gone").is_some());
    assert!(idx.lookup("opaque/.wh..wh..opq").is_some());
    assert!(matches!(
        block_on(layer.read_file_range("a", 0, 1)),
        Err(Error::NotAFile { .. })
    ));
    assert!(matches!(
        block_on(layer.read_file_range("nope", 0, 1)),
        Err(Error::NotFound { .. })
    ));
}

fn toc_json_of(blob: &[u8], layer: &Layer) -> Vec<u8> {
    let f = layer.footer();
    let comp = &blob[f.toc_offset as usize..(f.toc_offset + f.toc_compressed_size) as usize];
    if f.format.is_zstd() {
        unzstd_all(comp)
    } else {
        let mut a = ::tar::Archive::new(flate2::read::GzDecoder::new(comp));
        let mut e = a.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str(), Some(TOC_TAR_NAME));
        let mut v = Vec::new();
        e.read_to_end(&mut v).unwrap();
        v
    }
}

#[test]
fn estargz_round_trip_and_tar_gz_validity() {
    let input = sample_tar();
    let (blob, out) = convert_to(OutputFormat::Estargz, &input, &[]);
    assert_eq!(out.blob_digest, Digest::of(&blob));
    assert_eq!(out.blob_size, blob.len() as u64);
    let opts = OpenOptions {
        expected_toc_digest: Some(out.toc_digest),
        ..Default::default()
    };
    let layer = open(&blob, &opts).unwrap();
    assert_eq!(layer.format(), Format::Estargz);
    assert_eq!(layer.toc_digest(), out.toc_digest);
    assert_eq!(Digest::of(&toc_json_of(&blob, &layer)), out.toc_digest);
    assert_eq!(
        out.annotations[TOC_DIGEST_ANNOTATION],
        out.toc_digest.to_string()
    );
    assert!(layer.index().has_no_prefetch_landmark());
    check_layer_contents(&layer);

    // A valid tar.gz: the diffID is the sha256 of the whole gunzipped stream, and the
    // tar crate sees the same tree plus the landmark and the TOC.
    let plain = gunzip_all(&blob);
    assert_eq!(out.diff_id, Digest::of(&plain));
    assert_eq!(out.uncompressed_size, plain.len() as u64);
    assert_eq!(
        out.annotations[UNCOMPRESSED_SIZE_ANNOTATION],
        plain.len().to_string()
    );
    let orig = tar_entries(&input);
    let got = tar_entries(&plain);
    assert_eq!(
        got.first().map(|e| e.0.as_str()),
        Some(NO_PREFETCH_LANDMARK)
    );
    assert_eq!(
        got.first().map(|e| e.2.clone()),
        Some(vec![LANDMARK_CONTENTS])
    );
    assert_eq!(got.last().map(|e| e.0.as_str()), Some(TOC_TAR_NAME));
    assert_eq!(&got[1..got.len() - 1], &orig[..]);

    // GNU tar extracts it (devices need root, so they are left out).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.tar.gz");
    std::fs::write(&path, &blob).unwrap();
    let outdir = dir.path().join("x");
    std::fs::create_dir(&outdir).unwrap();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(&path)
        .arg("-C")
        .arg(&outdir)
        .arg("--exclude=dev/*")
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::read(outdir.join("b/large.bin")).unwrap(),
        large_file()
    );
    assert_eq!(
        std::fs::read(outdir.join("a/hl")).unwrap(),
        b"hello, world\n"
    );
    assert_eq!(
        std::fs::read_link(outdir.join("a/sym")).unwrap().to_str(),
        Some("../b/large.bin")
    );
    let long_pax = format!("a/{}.txt", "p".repeat(130));
    assert_eq!(std::fs::read(outdir.join(long_pax)).unwrap(), b"pax data");
}

#[test]
fn zstd_chunked_round_trip_keeps_the_tar_and_its_tar_split() {
    let input = sample_tar();
    let (blob, out) = convert_to(OutputFormat::ZstdChunked, &input, &[]);
    let opts = OpenOptions {
        expected_manifest_checksum: Some(out.manifest_checksum),
        expected_toc_digest: Some(out.toc_digest),
        ..Default::default()
    };
    let layer = open(&blob, &opts).unwrap();
    assert_eq!(layer.format(), Format::ZstdChunked);
    check_layer_contents(&layer);
    assert_eq!(Digest::of(&toc_json_of(&blob, &layer)), out.toc_digest);
    // Whole zero chunks are marked as holes and read back without a fetch.
    let big = layer
        .index()
        .entry(layer.index().lookup("b/large.bin").unwrap());
    assert!(big.chunks().iter().any(|c| c.zeros));
    assert!(big.chunks().iter().any(|c| !c.zeros));

    // The uncompressed stream is the input tar, byte for byte.
    let plain = unzstd_all(&blob);
    assert_eq!(plain, input);
    assert_eq!(out.diff_id, Digest::of(&input));

    // Annotations say where the manifest and the tar-split are.
    let f = layer.footer();
    assert_eq!(
        out.annotations[MANIFEST_POSITION_ANNOTATION],
        format!(
            "{}:{}:{}:1",
            f.toc_offset,
            f.toc_compressed_size,
            f.toc_uncompressed_size.unwrap()
        )
    );
    assert_eq!(
        out.annotations[MANIFEST_CHECKSUM_ANNOTATION],
        out.manifest_checksum.to_string()
    );
    assert!(!out.annotations.contains_key(TOC_DIGEST_ANNOTATION));
    let (ts_off, ts_clen, ts_ulen) = f.tar_split.unwrap();
    assert_eq!(
        out.annotations[TARSPLIT_POSITION_ANNOTATION],
        format!("{ts_off}:{ts_clen}:{ts_ulen}")
    );
    let ts_comp = &blob[ts_off as usize..(ts_off + ts_clen) as usize];
    let toc: Toc = serde_json::from_slice(&toc_json_of(&blob, &layer)).unwrap();
    assert_eq!(toc.tar_split_digest, Digest::of(ts_comp).to_string());
    // Rebuilding the tar from the tar-split and the files gives the input back.
    let ts = unzstd_all(ts_comp);
    assert_eq!(ts.len() as u64, ts_ulen);
    let files: BTreeMap<String, Vec<u8>> = tar_entries(&input)
        .into_iter()
        .map(|e| (e.0, e.2))
        .collect();
    let mut rebuilt = Vec::new();
    let b64 = |v: &serde_json::Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    };
    for line in ts.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        match v["type"].as_u64() {
            Some(2) => rebuilt.extend(b64(&v["payload"])),
            Some(1) => {
                let name = v["name"].as_str().unwrap();
                let size = v["size"].as_u64().unwrap_or(0);
                if size > 0 {
                    let data = &files[name];
                    assert_eq!(data.len() as u64, size);
                    let mut crc = crate::tarsplit::Crc64::new();
                    crc.update(data);
                    assert_eq!(b64(&v["payload"]), crc.sum());
                    rebuilt.extend_from_slice(data);
                }
            }
            other => panic!("unknown tar-split entry type {other:?}"),
        }
    }
    assert_eq!(rebuilt, input);

    // The zstd CLI decompresses it to a tar that GNU tar lists.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.tar.zst");
    std::fs::write(&path, &blob).unwrap();
    let unz = Command::new("zstd").arg("-dc").arg(&path).output().unwrap();
    assert!(unz.status.success());
    assert_eq!(unz.stdout, input);
    let tarpath = dir.path().join("layer.tar");
    std::fs::write(&tarpath, &unz.stdout).unwrap();
    let list = Command::new("tar")
        .arg("-tf")
        .arg(&tarpath)
        .output()
        .unwrap();
    assert!(list.status.success());
    let names = String::from_utf8(list.stdout).unwrap();
    assert!(names.lines().any(|l| l == "b/large.bin"));
    assert!(names.lines().any(|l| l == "opaque/.wh..wh..opq"));
}

#[test]
fn stargz_zstd_chunked_round_trip() {
    let input = sample_tar();
    let (blob, out) = convert_to(OutputFormat::StargzZstdChunked, &input, &[]);
    let opts = OpenOptions {
        expected_toc_digest: Some(out.toc_digest),
        expected_manifest_checksum: Some(out.manifest_checksum),
        ..Default::default()
    };
    let layer = open(&blob, &opts).unwrap();
    assert_eq!(layer.format(), Format::StargzZstdChunked);
    assert_eq!(layer.footer().footer_size, 48);
    check_layer_contents(&layer);
    assert_eq!(
        out.annotations[LEGACY_MANIFEST_CHECKSUM_ANNOTATION],
        out.manifest_checksum.to_string()
    );
    assert_eq!(
        out.annotations[TOC_DIGEST_ANNOTATION],
        out.toc_digest.to_string()
    );
    let plain = unzstd_all(&blob);
    assert_eq!(out.diff_id, Digest::of(&plain));
    let got = tar_entries(&plain);
    assert_eq!(got[0].0, NO_PREFETCH_LANDMARK);
    assert_eq!(&got[1..], &tar_entries(&input)[..]);
}

#[test]
fn legacy_stargz_footer_is_read() {
    let (mut blob, out) = convert_to(OutputFormat::Estargz, &sample_tar(), &[]);
    let layer = open(&blob, &OpenOptions::default()).unwrap();
    let toc_offset = layer.footer().toc_offset;
    blob.truncate(blob.len() - ESTARGZ_FOOTER_SIZE as usize);
    blob.extend_from_slice(&legacy_stargz_footer(toc_offset));
    let opts = OpenOptions {
        expected_toc_digest: Some(out.toc_digest),
        ..Default::default()
    };
    let layer = open(&blob, &opts).unwrap();
    assert_eq!(layer.format(), Format::LegacyStargz);
    check_layer_contents(&layer);
}

#[test]
fn prioritized_files_come_first_with_their_parents_and_the_landmark() {
    let input = sample_tar();
    for format in [
        OutputFormat::Estargz,
        OutputFormat::ZstdChunked,
        OutputFormat::StargzZstdChunked,
    ] {
        let (blob, out) = convert_to(format, &input, &["/b/large.bin", "a/hl"]);
        let layer = open(&blob, &OpenOptions::default()).unwrap();
        check_layer_contents(&layer);
        let plain = if format == OutputFormat::Estargz {
            gunzip_all(&blob)
        } else {
            unzstd_all(&blob)
        };
        assert_eq!(out.diff_id, Digest::of(&plain));
        let names: Vec<String> = tar_entries(&plain).into_iter().map(|e| e.0).collect();
        assert_eq!(
            &names[..6],
            [
                "b/",
                "b/large.bin",
                "a/",
                "a/small.txt",
                "a/hl",
                PREFETCH_LANDMARK
            ],
            "{format:?}"
        );
        assert!(!names.iter().any(|n| n == NO_PREFETCH_LANDMARK));
        // Everything else follows, each entry once.
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        let idx = layer.index();
        let range = idx.prefetch_range().unwrap();
        let big = idx.entry(idx.lookup("b/large.bin").unwrap());
        assert!(big.chunks().iter().all(|c| c.comp_end <= range.end));
        let other = idx.entry(idx.lookup("a/fifo").unwrap());
        assert!(other.chunks().is_empty());
        let pax = format!("a/{}.txt", "p".repeat(130));
        let late = idx.entry(idx.lookup(&pax).unwrap());
        assert!(late.chunks()[0].comp_offset >= range.end);
    }
    let opts = WriterOptions {
        prioritized_files: vec!["no/such/file".into()],
        ..Default::default()
    };
    assert!(matches!(
        convert(&input[..], Vec::new(), &opts),
        Err(Error::PrioritizedNotFound { .. })
    ));
}

#[test]
fn start_up_ranges_cut_chunks_and_mark_them_for_prefetch() {
    let input = sample_tar();
    let size = large_file().len() as u64;
    let ranges = vec![10_000..20_000, 300_000..301_000, 302_000..303_000];
    for format in [
        OutputFormat::Estargz,
        OutputFormat::ZstdChunked,
        OutputFormat::StargzZstdChunked,
    ] {
        let opts = WriterOptions {
            format,
            chunk_size: CHUNK,
            compression_level: Some(1),
            prioritized_files: vec!["b/large.bin".into(), "a/small.txt".into()],
            prefetch_ranges: [("/b/large.bin".to_string(), ranges.clone())].into(),
            threads: 2,
        };
        let mut blob = Vec::new();
        convert(&input[..], &mut blob, &opts).unwrap();
        let layer = open(&blob, &OpenOptions::default()).unwrap();
        check_layer_contents(&layer);
        let idx = layer.index();
        assert!(idx.has_prefetch_marks(), "{format:?}");
        let big = idx.entry(idx.lookup("b/large.bin").unwrap());
        let marked: Vec<(u64, u64)> = big
            .chunks()
            .iter()
            .filter(|c| c.prefetch)
            .map(|c| (c.file_offset, c.file_offset + c.size))
            .collect();
        // Page-aligned, the two close ranges joined, nothing else marked.
        assert_eq!(marked, [(8192, 20480), (299_008, 303_104)], "{format:?}");
        let cuts: Vec<u64> = big.chunks().iter().map(|c| c.size).collect();
        assert!(cuts.iter().all(|&c| c <= CHUNK), "{cuts:?}");
        assert_eq!(cuts.iter().sum::<u64>(), size);
        // A prioritized file without ranges is marked whole; others not at all.
        let small = idx.entry(idx.lookup("a/small.txt").unwrap());
        assert!(small.chunks().iter().all(|c| c.prefetch));
        let pax = format!("a/{}.txt", "p".repeat(130));
        let late = idx.entry(idx.lookup(&pax).unwrap());
        assert!(late.chunks().iter().all(|c| !c.prefetch));
    }
    // Without ranges nothing is marked: the landmark alone says what to prefetch.
    let (blob, _) = convert_to(OutputFormat::Estargz, &input, &["b/large.bin"]);
    let layer = open(&blob, &OpenOptions::default()).unwrap();
    assert!(!layer.index().has_prefetch_marks());
}

#[test]
fn compressed_inputs_are_detected() {
    let input = sample_tar();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &input).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::stream::encode_all(&input[..], 1).unwrap();
    for compressed in [gz, zst] {
        let (blob, out) = convert_to(OutputFormat::ZstdChunked, &compressed, &[]);
        assert_eq!(unzstd_all(&blob), input);
        assert_eq!(out.diff_id, Digest::of(&input));
    }
}

#[test]
fn bad_inputs_fail_cleanly() {
    let input = sample_tar();
    let opts = WriterOptions {
        compression_level: Some(1),
        ..Default::default()
    };
    let run = |data: &[u8]| convert(data, Vec::new(), &opts);
    // Corrupt gzip and zstd input.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &input).unwrap();
    let mut gz = gz.finish().unwrap();
    let mid = gz.len() / 2;
    gz[mid..mid + 64].fill(0xaa);
    assert!(run(&gz).is_err());
    // zstd input as the zstd CLI writes it, with a content checksum.
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    enc.include_checksum(true).unwrap();
    std::io::Write::write_all(&mut enc, &input).unwrap();
    let zst = enc.finish().unwrap();
    assert!(run(&zst).is_ok());
    let mut bad = zst.clone();
    let mid = bad.len() / 2;
    bad[mid..mid + 64].fill(0xaa);
    assert!(run(&bad).is_err());
    // A zstd stream cut short.
    assert!(run(&zst[..zst.len() - 100]).is_err());
    // Truncated tar, inside a payload and inside a header.
    assert!(matches!(run(&input[..5000]), Err(Error::BadTar { .. })));
    assert!(matches!(run(&input[..1300]), Err(Error::BadTar { .. })));
    // `..` and absolute names.
    for bad in ["../etc/passwd", "/etc/passwd"] {
        let mut h = ::tar::Header::new_gnu();
        h.set_size(1);
        h.as_gnu_mut().unwrap().name[..bad.len()].copy_from_slice(bad.as_bytes());
        h.set_cksum();
        let mut b = ::tar::Builder::new(Vec::new());
        b.append(&h, &b"x"[..]).unwrap();
        let t = b.into_inner().unwrap();
        assert!(matches!(run(&t), Err(Error::UnsafePath { .. })), "{bad}");
    }
    // A non-directory naming the root (found by fuzzing: the reader rejects such a TOC).
    for (bad, kind) in [
        ("", ::tar::EntryType::Fifo),
        ("./", ::tar::EntryType::Regular),
        (".", ::tar::EntryType::Symlink),
    ] {
        let mut h = ::tar::Header::new_gnu();
        h.set_size(0);
        h.set_entry_type(kind);
        h.as_gnu_mut().unwrap().name[..bad.len()].copy_from_slice(bad.as_bytes());
        h.set_cksum();
        let mut b = ::tar::Builder::new(Vec::new());
        b.append(&h, &b""[..]).unwrap();
        let t = b.into_inner().unwrap();
        assert!(matches!(run(&t), Err(Error::UnsafePath { .. })), "{bad:?}");
    }
    // An entry below what the tar turned into a file (found by fuzzing).
    let mut b = ::tar::Builder::new(Vec::new());
    for (name, kind) in [
        ("d/", ::tar::EntryType::Directory),
        ("d", ::tar::EntryType::Regular),
        ("d/p", ::tar::EntryType::Fifo),
    ] {
        let mut h = ::tar::Header::new_gnu();
        h.set_size(0);
        h.set_entry_type(kind);
        b.append_data(&mut h, name, &b""[..]).unwrap();
    }
    let t = b.into_inner().unwrap();
    assert!(matches!(run(&t), Err(Error::UnsupportedTar { .. })));
    // A hard link to a name no earlier entry has (found by fuzzing): refused, rather
    // than written into a layer no reader can resolve.
    let mut b = ::tar::Builder::new(Vec::new());
    let mut h = ::tar::Header::new_gnu();
    h.set_size(0);
    h.set_entry_type(::tar::EntryType::Link);
    b.append_link(&mut h, "h", "missing").unwrap();
    let t = b.into_inner().unwrap();
    assert!(matches!(run(&t), Err(Error::UnsupportedTar { .. })));
    // A hard link to a directory (found by fuzzing): no reader takes one.
    let mut b = ::tar::Builder::new(Vec::new());
    let mut h = ::tar::Header::new_gnu();
    h.set_size(0);
    h.set_entry_type(::tar::EntryType::Directory);
    b.append_data(&mut h, "d/", &b""[..]).unwrap();
    let mut h = ::tar::Header::new_gnu();
    h.set_size(0);
    h.set_entry_type(::tar::EntryType::Link);
    b.append_link(&mut h, "d/h", "d").unwrap();
    let t = b.into_inner().unwrap();
    assert!(matches!(run(&t), Err(Error::UnsupportedTar { .. })));
    // Bad options.
    let zero_chunk = WriterOptions {
        chunk_size: 0,
        ..Default::default()
    };
    assert!(convert(&input[..], Vec::new(), &zero_chunk).is_err());
}

#[test]
fn bad_blobs_fail_to_open() {
    let (blob, out) = convert_to(OutputFormat::Estargz, &sample_tar(), &[]);
    // Wrong expected digests.
    let wrong = OpenOptions {
        expected_toc_digest: Some(Digest::of(b"other")),
        ..Default::default()
    };
    assert!(matches!(
        open(&blob, &wrong),
        Err(Error::TocDigestMismatch { .. })
    ));
    // A TOC larger than allowed.
    let small = OpenOptions {
        max_toc_size: 100,
        ..Default::default()
    };
    assert!(matches!(
        open(&blob, &small),
        Err(Error::TocTooLarge { .. })
    ));
    // A damaged footer.
    let mut bad = blob.clone();
    let n = bad.len();
    bad[n - 30] = b'x';
    assert!(open(&bad, &OpenOptions::default()).is_err());
    // A footer pointing at something that is not the TOC.
    let mut bad = blob.clone();
    bad.truncate(n - ESTARGZ_FOOTER_SIZE as usize);
    bad.extend_from_slice(&estargz_footer(0));
    assert!(open(&bad, &OpenOptions::default()).is_err());
    // A corrupt TOC member.
    let mut bad = blob.clone();
    let layer = open(&blob, &OpenOptions::default()).unwrap();
    let at = layer.footer().toc_offset as usize + 40;
    bad[at] ^= 0xff;
    assert!(open(&bad, &OpenOptions::default()).is_err());
    // Truncated blobs of every small size and a few big ones never panic.
    for len in (0..200).chain([blob.len() / 2, blob.len() - 1]) {
        assert!(open(&blob[..len], &OpenOptions::default()).is_err());
    }
    let _ = out;

    // zstd:chunked footers claiming an absurd TOC.
    let (zblob, _) = convert_to(OutputFormat::ZstdChunked, &sample_tar(), &[]);
    let layer = open(&zblob, &OpenOptions::default()).unwrap();
    let f = *layer.footer();
    let (ts_off, ts_clen, ts_ulen) = f.tar_split.unwrap();
    let mut bad = zblob.clone();
    bad.truncate(zblob.len() - 72);
    bad.extend_from_slice(&zstd_chunked_footer(
        f.toc_offset,
        f.toc_compressed_size,
        1 << 40,
        (ts_off, ts_clen, ts_ulen),
    ));
    assert!(matches!(
        open(&bad, &OpenOptions::default()),
        Err(Error::TocTooLarge { .. })
    ));
    // ...or a smaller one than it is: the extra byte shows the lie.
    let mut bad = zblob.clone();
    bad.truncate(zblob.len() - 72);
    bad.extend_from_slice(&zstd_chunked_footer(
        f.toc_offset,
        f.toc_compressed_size,
        10,
        (ts_off, ts_clen, ts_ulen),
    ));
    assert!(matches!(
        open(&bad, &OpenOptions::default()),
        Err(Error::BadToc(_))
    ));
}

/// A TOC naming a file with a component longer than Linux allows (255 bytes): the layer
/// does not open (so it is not mounted lazily), rather than listing a name no open can
/// reach.
#[test]
fn a_name_component_over_255_bytes_is_refused() {
    let (blob, _) = convert_to(OutputFormat::Estargz, &sample_tar(), &[]);
    let layer = open(&blob, &OpenOptions::default()).unwrap();
    let mut toc: Toc = serde_json::from_slice(&toc_json_of(&blob, &layer)).unwrap();
    let parsed = |toc: &Toc| ParsedToc {
        toc: toc.clone(),
        toc_digest: layer.toc_digest(),
        manifest_checksum: layer.manifest_checksum(),
    };
    let blob_arc: Arc<dyn BlobReader> = Arc::new(VecBlob::new(blob.clone()));
    let file = toc.entries.iter().position(|e| e.kind == "reg").unwrap();
    let dir = toc.entries[file]
        .name
        .rsplit_once('/')
        .map_or("", |(d, _)| d)
        .to_string();
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    toc.entries[file].name = format!("{prefix}{}", "n".repeat(255));
    Layer::from_parts(
        blob_arc.clone(),
        blob.len() as u64,
        *layer.footer(),
        &parsed(&toc),
    )
    .unwrap();
    toc.entries[file].name = format!("{prefix}{}", "n".repeat(256));
    let err =
        Layer::from_parts(blob_arc, blob.len() as u64, *layer.footer(), &parsed(&toc)).unwrap_err();
    assert!(matches!(err, Error::UnsafePath { .. }), "{err}");
    assert!(err.to_string().contains("256 bytes"), "{err}");
}

/// Flips one byte inside the stored chunk data: the read must fail verification.
#[test]
fn a_wrong_chunk_byte_is_never_returned() {
    let mut b = ::tar::Builder::new(Vec::new());
    let data = testkit::image::noise(300_000, 9);
    let mut h = header(::tar::EntryType::Regular, 0o644);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, "f", &data[..]).unwrap();
    let input = b.into_inner().unwrap();
    for (format, level) in [
        (OutputFormat::Estargz, 0),
        (OutputFormat::ZstdChunked, 1),
        (OutputFormat::StargzZstdChunked, 1),
    ] {
        let opts = WriterOptions {
            format,
            chunk_size: CHUNK,
            compression_level: Some(level),
            ..Default::default()
        };
        let mut blob = Vec::new();
        convert(&input[..], &mut blob, &opts).unwrap();
        let layer = open(&blob, &OpenOptions::default()).unwrap();
        let id = layer.index().lookup("f").unwrap();
        let c = layer.index().entry(id).chunks()[1];
        // Noise is stored verbatim by gzip level 0 and zstd's raw blocks: find a
        // byte of the chunk in the blob and change it.
        let needle = &data[c.file_offset as usize + 1000..c.file_offset as usize + 1032];
        let span = &blob[c.comp_offset as usize..c.comp_end as usize];
        let pos = span
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("chunk bytes stored verbatim")
            + c.comp_offset as usize;
        let mut bad = blob.clone();
        bad[pos + 5] ^= 0x01;
        let layer = open(&bad, &OpenOptions::default()).unwrap();
        let err = block_on(layer.read_file_range("f", c.file_offset + 2000, 10)).unwrap_err();
        assert!(
            matches!(err, Error::ChunkVerification { .. }),
            "{format:?}: {err}"
        );
        // Chunks before it still read fine.
        assert_eq!(
            block_on(layer.read_file_range("f", 0, 100)).unwrap(),
            &data[..100]
        );
    }
}

/// Random byte changes anywhere in a blob never cause a panic, and with the TOC digest
/// checked, every read that succeeds returns the original bytes.
#[test]
fn mutated_blobs_never_panic_or_return_wrong_data() {
    let input = sample_tar();
    let originals: Vec<(String, Vec<u8>)> = tar_entries(&input)
        .into_iter()
        .filter(|e| e.1 == ::tar::EntryType::Regular)
        .map(|e| (e.0, e.2))
        .collect();
    for format in [OutputFormat::Estargz, OutputFormat::ZstdChunked] {
        let (blob, out) = convert_to(format, &input, &[]);
        let checked = OpenOptions {
            expected_toc_digest: Some(out.toc_digest),
            ..Default::default()
        };
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..120 {
            let mut bad = blob.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() % bad.len() as u64) as usize;
                bad[at] ^= 1 << (next() % 8);
            }
            let opts = if round % 2 == 0 {
                checked.clone()
            } else {
                OpenOptions::default()
            };
            let Ok(layer) = open(&bad, &opts) else {
                continue;
            };
            for (name, data) in &originals {
                if let Ok(got) = block_on(layer.read_file_range(name, 0, u64::MAX))
                    && opts.expected_toc_digest.is_some()
                {
                    assert_eq!(&got, data, "{format:?} round {round}: {name}");
                }
            }
        }
    }
}

#[test]
fn output_does_not_depend_on_the_thread_count() {
    let input = sample_tar();
    for format in [OutputFormat::Estargz, OutputFormat::ZstdChunked] {
        let mut outs = Vec::new();
        for threads in [1, 3] {
            let opts = WriterOptions {
                format,
                chunk_size: CHUNK,
                compression_level: Some(1),
                threads,
                ..Default::default()
            };
            let mut blob = Vec::new();
            let res = convert(&input[..], &mut blob, &opts).unwrap();
            outs.push((blob, res.blob_digest));
        }
        assert_eq!(outs[0], outs[1], "{format:?}");
    }
}

/// A writer that fails after some bytes: the conversion reports it instead of hanging.
#[test]
fn a_failing_output_is_reported() {
    struct Failing(usize);
    impl std::io::Write for Failing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0 < buf.len() {
                return Err(std::io::Error::other("disk full"));
            }
            self.0 -= buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let input = sample_tar();
    let opts = WriterOptions {
        chunk_size: CHUNK,
        compression_level: Some(1),
        threads: 2,
        ..Default::default()
    };
    let err = convert(&input[..], Failing(100_000), &opts).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

/// Two files in one gzip member, told apart by `innerOffset` (what stargz-snapshotter's
/// `--estargz-min-chunk-size` writes), built by hand.
#[test]
fn inner_offsets_share_a_member() {
    use crate::tar::reg_header;
    let gz = |data: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, data).unwrap();
        e.finish().unwrap()
    };
    let (one, two) = (b"first file".to_vec(), b"second, longer file".to_vec());
    let mut blob = gz(&reg_header("one", one.len() as u64).unwrap());
    let member_at = blob.len() as u64;
    let mut shared = one.clone();
    shared.resize(512, 0);
    let inner = shared.len() + 512;
    shared.extend_from_slice(&reg_header("two", two.len() as u64).unwrap());
    shared.extend_from_slice(&two);
    shared.resize(inner + 512, 0);
    blob.extend(gz(&shared));
    let entry = |name: &str, data: &[u8], inner: i64| TocEntry {
        name: name.into(),
        kind: "reg".into(),
        size: data.len() as i64,
        offset: member_at as i64,
        inner_offset: inner,
        digest: Digest::of(data).to_string(),
        chunk_digest: Digest::of(data).to_string(),
        ..Default::default()
    };
    let toc = Toc {
        version: 1,
        entries: vec![entry("one", &one, 0), entry("two", &two, inner as i64)],
        tar_split_digest: String::new(),
    };
    let json = serde_json::to_vec(&toc).unwrap();
    let mut toc_member = reg_header(TOC_TAR_NAME, json.len() as u64)
        .unwrap()
        .to_vec();
    toc_member.extend_from_slice(&json);
    toc_member.resize(toc_member.len().div_ceil(512) * 512 + 1024, 0);
    let toc_offset = blob.len() as u64;
    blob.extend(gz(&toc_member));
    blob.extend_from_slice(&estargz_footer(toc_offset));

    let layer = open(&blob, &OpenOptions::default()).unwrap();
    assert_eq!(block_on(layer.read_file_range("one", 0, 100)).unwrap(), one);
    assert_eq!(block_on(layer.read_file_range("two", 0, 100)).unwrap(), two);
    assert_eq!(
        block_on(layer.read_file_range("two", 8, 6)).unwrap(),
        b"longer"
    );
    // The whole blob is still a tar.gz with both files.
    let names: Vec<String> = tar_entries(&gunzip_all(&blob))
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(names, ["one", "two", TOC_TAR_NAME]);
}
