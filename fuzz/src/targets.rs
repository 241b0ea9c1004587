//! The fuzz targets: each takes arbitrary bytes, must never panic, and returns a short
//! outcome label (used as cheap feedback: inputs with a new label join the corpus).

use std::future::Future;
use std::sync::Arc;

use estargz::{
    BlobReader, Cancel, EntryKind, Error, Format, Index, Layer, NodeId, OpenOptions, OutputFormat,
    PARSE_MEMORY_FACTOR, Toc, VecBlob, WriterOptions,
};

/// Polls a future once: futures over a `VecBlob` are always ready.
fn ready<F: Future>(f: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("a VecBlob future was pending"),
    }
}

/// The first words of an error: its kind, without the data-dependent details.
fn label(prefix: &str, e: &estargz::Error) -> String {
    let s = e.to_string();
    // Up to the first quoted name or number: the kind of error, not its data.
    let kind = s
        .split(['"', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'])
        .next()
        .unwrap_or("");
    let words: Vec<&str> = kind
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| w.len() > 2)
        .take(4)
        .collect();
    format!("{prefix}:{}", words.join(" "))
}

pub const TARGETS: &[&str] = &["footer", "toc", "layer", "tar", "fuse", "gzip_span", "ztoc"];

pub fn run(target: &str, data: &[u8]) -> String {
    match target {
        "footer" => footer(data),
        "toc" => toc(data),
        "layer" => layer(data),
        "tar" => tar(data),
        "fuse" => fuse(data),
        "gzip_span" => gzip_span(data),
        "ztoc" => ztoc(data),
        other => panic!("unknown target {other}"),
    }
}

/// Footer parsing: the input is a blob's tail, the blob a little or much bigger.
pub fn footer(data: &[u8]) -> String {
    let mut out = String::new();
    for extra in [0u64, 1, 1 << 20, u64::MAX - data.len() as u64] {
        let size = data.len() as u64 + extra;
        match estargz::parse_footer(data, size) {
            Ok(f) => {
                // What a footer promises must fit in the blob.
                assert!(f.toc_offset <= size, "toc offset past the blob: {f:?}");
                assert!(f.payload_end <= size, "payload end past the blob: {f:?}");
                assert!(f.footer_size <= size, "footer larger than the blob: {f:?}");
                out = format!("ok:{:?}", f.format);
            }
            Err(e) if out.is_empty() => out = label("footer", &e),
            Err(_) => {}
        }
    }
    out
}

fn format_of(b: u8) -> Format {
    match b % 4 {
        0 => Format::Estargz,
        1 => Format::LegacyStargz,
        2 => Format::ZstdChunked,
        _ => Format::StargzZstdChunked,
    }
}

/// Heap a parse may take beyond its bound's multiple of the JSON: a few fixed
/// allocations (the root, an error message) that tiny inputs cannot amortize.
const PARSE_SLACK: u64 = 64 << 10;

/// TOC JSON → index, as lazysnapd builds it (streamed, `Index::from_json`), within its
/// memory bound; and the same index as from a parsed `Toc`. Input: format byte, payload
/// end (8 bytes LE), JSON.
pub fn toc(data: &[u8]) -> String {
    if data.len() < 9 {
        return "short".into();
    }
    let format = format_of(data[0]);
    let mut pe = [0u8; 8];
    pe.copy_from_slice(&data[1..9]);
    let payload_end = u64::from_le_bytes(pe);
    let json = &data[9..];
    let (streamed, peak) =
        crate::alloc_count::measure(|| Index::from_json(json, payload_end, format, &Cancel::new()));
    if let Some(peak) = peak {
        let bound = PARSE_MEMORY_FACTOR * json.len() as u64 + PARSE_SLACK;
        assert!(
            peak as u64 <= bound,
            "the parse took {peak} bytes, over its bound of {bound} for {} bytes of JSON",
            json.len()
        );
    }
    // The streamed build agrees with the one from a whole Toc (which has no cap on the
    // directories a TOC implies) wherever the JSON makes a Toc.
    let whole = serde_json::from_slice::<Toc>(json)
        .ok()
        .map(|toc| Index::from_toc(&toc, payload_end, format));
    match (&streamed, &whole) {
        (Ok(a), Some(Ok(b))) => {
            assert_eq!(a.len(), b.len(), "streamed and whole builds differ");
            for i in 0..a.len() as u32 {
                assert_eq!(a.path_of(NodeId(i)), b.path_of(NodeId(i)), "node {i}");
            }
        }
        (Ok(_), Some(Err(e))) => panic!("streamed build accepted what the whole one refused: {e}"),
        // Fields the index does not use are skipped unchecked (a tarSplitDigest that is
        // not UTF-8, say), where a whole Toc refuses them.
        (Ok(_), None) => {}
        // serde's derive also takes a struct as a JSON array; TOCs are objects.
        (Err(e), Some(Ok(_))) => assert!(
            e.to_string().contains("implies over") || e.to_string().contains("TOC object"),
            "streamed build refused what the whole one accepted: {e}"
        ),
        (Err(_), _) => {}
    }
    match streamed {
        Ok(index) => {
            walk(&index);
            format!("ok:{:?}", format)
        }
        Err(Error::BadToc(m)) if m.starts_with("TOC JSON") => "json".into(),
        Err(e) => label("index", &e),
    }
}

/// Visits every entry of an index through the public accessors.
fn walk(index: &Index) {
    for i in 0..index.len() as u32 {
        let e = index.entry(NodeId(i));
        let path = index.path_of(e.id());
        let _ = index.lookup(&path);
        let _ = (e.kind(), e.mode(), e.size(), e.nlink(), e.mtime());
        let _ = e.xattrs().count();
        let _ = e.children().count();
        if e.kind() == EntryKind::Hardlink {
            let _ = index.resolve(e.id());
        }
        let mut end = 0;
        for c in e.chunks() {
            assert!(
                c.comp_offset <= c.comp_end,
                "chunk range reversed in {path}"
            );
            end = c.file_offset + c.size;
        }
        if e.kind() == EntryKind::Reg && !e.chunks().is_empty() {
            assert!(
                end <= e.size() || e.size() == 0,
                "chunks past the end of {path}"
            );
        }
    }
    let _ = index.prefetch_range();
}

/// A whole blob: open it, then read every file back (verified reads).
pub fn layer(data: &[u8]) -> String {
    let blob: Arc<dyn BlobReader> = Arc::new(VecBlob::new(data.to_vec()));
    let opts = OpenOptions {
        max_toc_size: 1 << 20,
        ..OpenOptions::default()
    };
    let layer = match ready(Layer::open(blob, &opts)) {
        Ok(l) => l,
        Err(e) => return label("open", &e),
    };
    walk(layer.index());
    let mut outcome = format!("ok:{:?}", layer.format());
    for i in 0..layer.index().len() as u32 {
        let e = layer.index().entry(NodeId(i));
        if e.kind() != EntryKind::Reg {
            continue;
        }
        // Bounded: a lying TOC may claim huge sizes.
        let len = e.size().min(1 << 20);
        match ready(layer.read_range(e.id(), 0, len)) {
            Ok(bytes) => assert!(bytes.len() as u64 <= len, "read returned more than asked"),
            Err(err) => outcome = label("read", &err),
        }
    }
    outcome
}

/// The writer's tar parsing: convert arbitrary input; whatever it accepts must read
/// back, file by file, as the same bytes.
pub fn tar(data: &[u8]) -> String {
    let format = match data.first().map(|b| b % 3) {
        Some(0) | None => OutputFormat::Estargz,
        Some(1) => OutputFormat::ZstdChunked,
        _ => OutputFormat::StargzZstdChunked,
    };
    let input = data.get(1..).unwrap_or_default();
    let opts = WriterOptions {
        format,
        chunk_size: 64,
        compression_level: Some(1),
        threads: 1,
        ..WriterOptions::default()
    };
    let mut out = Vec::new();
    match estargz::convert(input, &mut out, &opts) {
        Ok(w) => {
            assert_eq!(w.blob_size, out.len() as u64);
            let blob: Arc<dyn BlobReader> = Arc::new(VecBlob::new(out));
            let open = OpenOptions {
                expected_toc_digest: Some(w.toc_digest),
                ..OpenOptions::default()
            };
            let layer = match ready(Layer::open(blob, &open)) {
                Ok(l) => l,
                Err(e) => panic!("our own output does not open: {e}"),
            };
            for i in 0..layer.index().len() as u32 {
                let e = layer.index().entry(NodeId(i));
                if e.kind() == EntryKind::Reg
                    && let Err(err) = ready(layer.read_range(e.id(), 0, e.size()))
                {
                    panic!("our own output does not read back: {err}");
                }
            }
            format!("ok:{format:?}")
        }
        Err(e) => label("convert", &e),
    }
}

/// What `fuse` feeds requests to: a session over a small layer, on a runtime of its own.
struct FuseTarget {
    sink: fusefs::RequestSink,
    _runtime: tokio::runtime::Runtime,
    _cache_dir: std::path::PathBuf,
}

fn fuse_target() -> &'static FuseTarget {
    static TARGET: std::sync::OnceLock<FuseTarget> = std::sync::OnceLock::new();
    TARGET.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let tar = crate::seeds::seed_tar().expect("the seed tar");
        let mut blob = Vec::new();
        let opts = WriterOptions {
            chunk_size: 64,
            threads: 1,
            ..WriterOptions::default()
        };
        estargz::convert(&tar[..], &mut blob, &opts).expect("the seed layer");
        let blob: Arc<dyn BlobReader> = Arc::new(VecBlob::new(blob));
        let layer =
            ready(Layer::open(blob, &OpenOptions::default())).expect("the seed layer opens");
        let cache_dir = std::env::temp_dir().join(format!("lazysnap-fuzz-{}", std::process::id()));
        let cache = fusefs::SharedCache::open(fusefs::CacheConfig {
            dir: cache_dir.clone(),
            memory_bytes: 1 << 20,
            disk_bytes: 0,
            max_fill_percent: 100,
        })
        .expect("a cache");
        let config = fusefs::FsConfig {
            prefetch: false,
            background_fetch: false,
            ..fusefs::FsConfig::default()
        };
        let backing = fusefs::Backing::new(cache, runtime.handle().clone(), &config);
        let fs = fusefs::LayerFs::new(Arc::new(layer), backing, config).expect("the filesystem");
        let sink = fusefs::RequestSink::new(Arc::new(fs), runtime.handle().clone())
            .expect("a request sink");
        FuseTarget {
            sink,
            _runtime: runtime,
            _cache_dir: cache_dir,
        }
    })
}

/// Raw FUSE requests, as `/dev/fuse` hands them over, decoded and handled by a session
/// over a small layer (replies go to /dev/null): nothing may panic or hang.
pub fn fuse(data: &[u8]) -> String {
    fuse_target().sink.request(data);
    match data.get(4..8) {
        Some(op) => format!("op:{}", u32::from_ne_bytes([op[0], op[1], op[2], op[3]])),
        None => "short".into(),
    }
}

/// SOCI's random access into gzip: the first byte picks what the rest is.
/// - 0: a checkpoint blob, decoded; what decodes encodes back to the same checkpoints.
/// - 1: a gzip stream (after a span byte), indexed; every checkpoint must read on exactly
///   as flate2's own decoder reads the whole stream.
/// - 2: a made-up checkpoint (bits, a short window) over arbitrary compressed bytes: an
///   error or at most the bytes asked for, never a panic.
pub fn gzip_span(data: &[u8]) -> String {
    use std::io::Read;
    let Some((&mode, rest)) = data.split_first() else {
        return "empty".into();
    };
    match mode % 3 {
        0 => match soci::checkpoint_blob::decode(rest) {
            Ok(c) => {
                let again = soci::checkpoint_blob::decode(&soci::checkpoint_blob::encode(&c));
                assert_eq!(again.as_ref(), Ok(&c), "a decoded blob did not encode back");
                format!("blob:ok:{}", c.points.len().min(4))
            }
            Err(e) => format!("blob:{}", e.to_string().split(' ').next().unwrap_or("")),
        },
        1 => {
            let Some((&span, gz)) = rest.split_first() else {
                return "gzip:short".into();
            };
            // Streams that inflate past 16 MiB are skipped: bombs cost time, not coverage.
            let mut whole = Vec::new();
            let limit = 16 << 20;
            let decoded = flate2::read::GzDecoder::new(gz)
                .take(limit + 1)
                .read_to_end(&mut whole);
            if whole.len() as u64 > limit {
                return "gzip:big".into();
            }
            let points = match soci::build_checkpoints(gz, (u64::from(span) + 1) * 256) {
                Ok(points) => points,
                Err(e) => return format!("gzip:{}", e.to_string().split(' ').nth(3).unwrap_or("")),
            };
            // flate2 stops at the first member's end as the index does.
            assert!(
                decoded.is_ok(),
                "indexed, but flate2 cannot inflate it: {decoded:?}"
            );
            for p in &points {
                let at = p.uncompressed_offset as usize;
                let len = (whole.len() - at).min(4096);
                let got = soci::inflate_from(p, &gz[p.input_start() as usize..], 0, len)
                    .expect("a checkpoint of a stream that inflates must read on");
                assert_eq!(
                    got,
                    &whole[at..at + len],
                    "checkpoint at {at} reads wrong bytes"
                );
            }
            format!("gzip:ok:{}", points.len().min(4))
        }
        _ => {
            if rest.len() < 4 {
                return "made-up:short".into();
            }
            let window_len = usize::from(rest[1]) * 128;
            let (window, compressed) = rest[4..].split_at(window_len.min(rest.len() - 4));
            let point = soci::Checkpoint {
                compressed_offset: 1,
                uncompressed_offset: 0,
                bits: rest[0] % 9,
                window: window.to_vec(),
            };
            let skip = u64::from(rest[2]) * 64;
            let len = usize::from(rest[3]) * 64;
            match soci::inflate_from(&point, compressed, skip, len) {
                Ok(out) => {
                    assert_eq!(out.len(), len, "asked for {len}, got {}", out.len());
                    "made-up:ok".into()
                }
                Err(e) => format!("made-up:{}", e.to_string().split(' ').nth(1).unwrap_or("")),
            }
        }
    }
}

/// SOCI's zTOC: the first byte picks what the rest is.
/// - 0: a zTOC, decoded; what decodes encodes to bytes that decode the same, and what
///   passes the layout check has pieces that tile each file inside its spans.
/// - 1: an inflated tar stream, its entries read as soci records them: each entry's data
///   starts after its header and lies inside the stream.
pub fn ztoc(data: &[u8]) -> String {
    let Some((&mode, rest)) = data.split_first() else {
        return "empty".into();
    };
    if mode % 2 == 1 {
        return match soci::tar_toc::read_tar_toc(rest) {
            Ok((files, size)) => {
                assert!(size <= rest.len() as u64, "archive size past the stream");
                let mut end = 0i64;
                for f in &files {
                    assert!(f.uncompressed_offset >= end + 512, "data before its header");
                    end = f.uncompressed_offset;
                    if f.kind == "reg" {
                        end += f.uncompressed_size;
                        assert!(end as u64 <= size, "data past the archive");
                    }
                }
                format!("tar:ok:{}", files.len().min(4))
            }
            Err(e) => format!("tar:{}", e.to_string().split(' ').take(3).collect::<Vec<_>>().join(" ")),
        };
    }
    let z = match soci::ztoc::decode(rest) {
        Ok(z) => z,
        Err(e) => return format!("ztoc:{}", e.to_string().split(' ').take(3).collect::<Vec<_>>().join(" ")),
    };
    let again = soci::ztoc::decode(&soci::ztoc::encode(&z));
    assert_eq!(again.as_ref(), Ok(&z), "a decoded zTOC did not encode back");
    let layout = match soci::layout::Layout::check(z) {
        Ok(layout) => layout,
        Err(e) => return format!("layout:{}", e.to_string().split(' ').take(3).collect::<Vec<_>>().join(" ")),
    };
    for (i, f) in layout.files.iter().enumerate() {
        let mut at = 0;
        for p in layout.pieces(i) {
            assert_eq!(p.file_offset, at, "pieces of {i} leave a gap");
            let span = &layout.spans[p.span].uncompressed;
            assert!(span.start + p.span_offset + p.len <= span.end, "piece past its span");
            at += p.len;
        }
        assert_eq!(at as i64, f.uncompressed_size, "pieces of {i} do not add up");
    }
    format!("layout:ok:{}", layout.spans.len().min(4))
}

/// A compiled Python module read for its imports (`fusefs::pyc`), as if at one of a few
/// places (the first byte picks which): no panic, and every file it would look for lies
/// below the root, named without `..` or empty parts.
pub fn pyc(data: &[u8]) -> String {
    const PLACES: [&str; 4] = [
        "usr/lib/python3/dist-packages/pkg/sub/__pycache__/mod.cpython-311.pyc",
        "usr/lib/python3.11/__pycache__/os.cpython-311.pyc",
        "app/__init__.pyc",
        "__pycache__/top.cpython-38.opt-1.pyc",
    ];
    let Some((&place, rest)) = data.split_first() else {
        return "empty".into();
    };
    let Some(imports) = fusefs::pyc::imports(rest) else {
        return "none".into();
    };
    let wanted = fusefs::pyc::wanted(PLACES[place as usize % PLACES.len()], &imports);
    for path in wanted.iter().flatten() {
        assert!(
            !path.starts_with('/') && path.split('/').all(|p| !p.is_empty() && p != ".."),
            "a module looked for outside the root: {path}"
        );
    }
    format!("imports:{}:wanted:{}", imports.len().min(4), wanted.len().min(4))
}
