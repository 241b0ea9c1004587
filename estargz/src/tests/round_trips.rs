//! Round trips through the writer and the reader, in every format, and what the
//! converter puts first.

use super::*;

#[test]
fn estargz_round_trip_and_tar_gz_validity() {
    let input = sample_tar();
    let (blob, out) = convert_to(OutputFormat::Estargz, &input, &[]);
    assert_eq!(out.blob_digest, Sha256Sum::of(&blob));
    assert_eq!(out.blob_size, blob.len() as u64);
    let opts = OpenOptions {
        expected_toc_digest: Some(out.toc_digest),
        ..Default::default()
    };
    let layer = open(&blob, &opts).unwrap();
    assert_eq!(layer.format(), Format::Estargz);
    assert_eq!(layer.toc_digest(), out.toc_digest);
    assert_eq!(Sha256Sum::of(&toc_json_of(&blob, &layer)), out.toc_digest);
    assert_eq!(
        out.annotations[TOC_DIGEST_ANNOTATION],
        out.toc_digest.to_string()
    );
    assert!(layer.index().has_no_prefetch_landmark());
    check_layer_contents(&layer);

    // A valid tar.gz: the diffID is the sha256 of the whole gunzipped stream, and the
    // tar crate sees the same tree plus the landmark and the TOC.
    let plain = gunzip_all(&blob);
    assert_eq!(out.diff_id, Sha256Sum::of(&plain));
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
    assert_eq!(Sha256Sum::of(&toc_json_of(&blob, &layer)), out.toc_digest);
    // Whole zero chunks are marked as holes and read back without a fetch.
    let big = layer
        .index()
        .entry(layer.index().lookup("b/large.bin").unwrap());
    assert!(big.chunks().iter().any(|c| c.zeros));
    assert!(big.chunks().iter().any(|c| !c.zeros));

    // The uncompressed stream is the input tar, byte for byte.
    let plain = unzstd_all(&blob);
    assert_eq!(plain, input);
    assert_eq!(out.diff_id, Sha256Sum::of(&input));

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
    assert_eq!(toc.tar_split_digest, Sha256Sum::of(ts_comp).to_string());
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
    assert_eq!(out.diff_id, Sha256Sum::of(&plain));
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
        assert_eq!(out.diff_id, Sha256Sum::of(&plain));
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
        assert_eq!(out.diff_id, Sha256Sum::of(&input));
    }
}
