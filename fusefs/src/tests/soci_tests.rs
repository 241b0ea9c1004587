//! SOCI layers (ordinary gzip read through a zTOC) through the same fetcher: span pieces
//! come out of one verified inflation of their span, a span's other files are kept
//! once its bytes are in, and a corrupt span is EIO, never wrong bytes.

use std::io::Write;

use super::*;
use estargz::{Cancel, Sha256Sum};

/// The sample tar as an ordinary gzip layer with a zTOC of 64 KiB spans.
fn soci_fixture() -> (Fixture, Source) {
    let (tar, src) = sample_tar();
    (soci_fixture_of(&tar, quiet_config()), src)
}

/// `tar` as an ordinary gzip layer with a zTOC of 64 KiB spans.
pub(super) fn soci_fixture_of(tar: &[u8], config: FsConfig) -> Fixture {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(tar).unwrap();
    let gz = gz.finish().unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&gz).unwrap();
    let ztoc = soci::ztoc_builder::build_ztoc(file.as_file(), 64 << 10, "test").unwrap();
    let ztoc = soci::ztoc::encode(&ztoc);
    let blob = Arc::new(FaultBlob::new(gz.clone()));
    let layer = soci::layer::open_layer(
        blob.clone(),
        gz.len() as u64,
        &ztoc,
        &Sha256Sum::of(&ztoc),
        &Cancel::new(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = CacheConfig {
        dir: dir.path().join("cache"),
        memory_bytes: 64 << 20,
        disk_bytes: 1 << 30,
        max_fill_percent: 100,
    };
    fixture_of(runtime(), blob, layer, config, cache, dir)
}

#[test]
fn every_file_of_a_soci_layer_reads_back_with_its_metadata() {
    let (f, src) = soci_fixture();
    for (path, data) in &src.files {
        assert!(f.read_all(path).unwrap() == *data, "{path}");
    }
    assert_eq!(f.read_all("etc/hard").unwrap(), src.files["data/exact"]);
    let tool = f.fs.getattr(f.ino("bin/tool")).unwrap();
    assert_eq!((tool.perm, tool.uid, tool.gid), (0o4755, 1000, 100));
    assert_eq!(f.fs.readlink(f.ino("bin/link")).unwrap(), "tool");
    let big = f.fs.layer().index().lookup("data/big").unwrap();
    assert!(
        f.fs.layer().index().entry(big).chunks().len() > 1,
        "one piece per span"
    );
}

#[test]
fn the_other_files_of_a_fetched_span_come_from_the_cache() {
    let (f, src) = soci_fixture();
    assert_eq!(f.read_all("bin/tool").unwrap(), src.files["bin/tool"]);
    assert_eq!(f.blob.request_count(), 1);
    let index = f.fs.layer().index();
    let span_of = |path: &str| index.entry(index.lookup(path).unwrap()).chunks()[0].comp_offset;
    // data/big starts in bin/tool's span: that piece of it is local now.
    assert_eq!(span_of("data/big"), span_of("bin/tool"));
    f.blob.fail_all.store(true, Ordering::SeqCst);
    assert_eq!(
        &f.read("data/big", 0, 4096).unwrap()[..],
        &src.files["data/big"][..4096]
    );
    assert_eq!(
        f.blob.request_count(),
        1,
        "no request for the span's other pieces"
    );
}

#[test]
fn a_corrupt_span_is_eio_and_a_retry_reads_right() {
    let (f, src) = soci_fixture();
    f.blob.corrupt_next.store(1, Ordering::SeqCst);
    assert_eq!(f.read("data/big", 0, 4096).unwrap_err().errno(), libc::EIO);
    assert_eq!(f.fs.stats().verification_failures, 1);
    let got = f.read("data/big", 0, 4096).unwrap();
    assert_eq!(&got[..], &src.files["data/big"][..4096]);
}
