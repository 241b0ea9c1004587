//! What the writer's output does not depend on (threads), how a failing output is
//! reported, and where chunks share a compressed member.

use super::*;

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
        digest: Sha256Sum::of(data).to_string(),
        chunk_digest: Sha256Sum::of(data).to_string(),
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
