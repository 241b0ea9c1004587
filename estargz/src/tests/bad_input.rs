//! Bad tars, bad blobs and mutated bytes: clear errors, never a panic or a wrong byte.

use super::*;

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
        expected_toc_digest: Some(Sha256Sum::of(b"other")),
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
