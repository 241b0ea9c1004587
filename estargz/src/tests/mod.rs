//! Writer → reader round trips over `VecBlob`, interop with the `tar` crate, GNU tar and
//! the zstd CLI, and bad-input tests; the helpers they share are here.

mod bad_input;
mod round_trips;
mod writer_output;

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
