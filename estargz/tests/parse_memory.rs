//! The memory an index build takes, measured by a counting allocator: crafted TOCs of
//! every shape that costs the builder most per byte of JSON must stay within
//! `PARSE_MEMORY_FACTOR` times the JSON (the bound lazysnapd reserves before a parse).

// A counting allocator needs `unsafe impl GlobalAlloc`: only this test binary has it.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use estargz::{Cancel, Format, Index, PARSE_MEMORY_FACTOR};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One measurement at a time: the counters are global.
static SERIAL: Mutex<()> = Mutex::new(());

/// Peak bytes allocated while building an index from `json`, over what was live before.
fn build_peak(json: &[u8]) -> (usize, estargz::Result<Index>) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let built = Index::from_json(json, u64::MAX / 2, Format::Estargz, &Cancel::new());
    (PEAK.load(Ordering::Relaxed) - before, built)
}

fn toc_of(entries: impl Iterator<Item = String>) -> Vec<u8> {
    let mut json = br#"{"version":1,"entries":["#.to_vec();
    for (i, e) in entries.enumerate() {
        if i > 0 {
            json.push(b',');
        }
        json.extend_from_slice(e.as_bytes());
    }
    json.extend_from_slice(b"]}");
    json
}

fn digest(i: usize) -> String {
    format!("sha256:{i:064x}")
}

/// Each test holds it throughout: another test's allocations would count in its peak.
fn alone() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn check(shape: &str, json: &[u8], must_build: bool) {
    let (peak, built) = build_peak(json);
    let factor = peak as f64 / json.len() as f64;
    eprintln!(
        "{shape}: {} bytes of JSON, peak {peak} bytes ({factor:.2}x), {}",
        json.len(),
        match &built {
            Ok(idx) => format!(
                "{} entries, {:.0} bytes each",
                idx.len(),
                idx.bytes_per_entry()
            ),
            Err(e) => format!("refused: {e}"),
        }
    );
    assert_eq!(built.is_ok(), must_build, "{shape}: {:?}", built.err());
    assert!(
        peak as u64 <= PARSE_MEMORY_FACTOR * json.len() as u64,
        "{shape}: peak {peak} bytes is {factor:.2}x the JSON, over {PARSE_MEMORY_FACTOR}x"
    );
}

#[test]
fn the_smallest_entries_stay_within_the_bound() {
    let _alone = alone();
    let n = 200_000;
    let json = toc_of((0..n).map(|i| format!(r#"{{"name":"{i:x}","type":"dir"}}"#)));
    check("tiny directories", &json, true);
}

#[test]
fn one_chunk_files_stay_within_the_bound() {
    let _alone = alone();
    let n = 100_000;
    let json = toc_of((0..n).map(|i| {
        format!(
            r#"{{"name":"{i:x}","type":"reg","size":1,"offset":{},"chunkDigest":"{}"}}"#,
            i + 1,
            digest(i)
        )
    }));
    check("one-chunk files", &json, true);
}

#[test]
fn many_small_chunks_stay_within_the_bound() {
    let _alone = alone();
    let n = 100_000;
    let json = toc_of(
        std::iter::once(format!(
            r#"{{"name":"f","type":"reg","size":{n},"offset":1,"chunkSize":1,"chunkDigest":"{}"}}"#,
            digest(0)
        ))
        .chain((1..n).map(|i| {
            format!(
                r#"{{"name":"f","type":"chunk","offset":{},"chunkOffset":{i},"chunkSize":1,"chunkDigest":"{}"}}"#,
                i + 1,
                digest(i)
            )
        })),
    );
    check("many chunks", &json, true);
}

#[test]
fn implied_directories_stay_within_the_bound() {
    let _alone = alone();
    // Each entry names a fresh chain of one-letter directories: as many implied
    // directories per byte as a name can carry, until the builder refuses.
    let depth = 1000;
    let chain = vec!["d"; depth].join("/");
    let json = toc_of((0..2000).map(|i| format!(r#"{{"name":"{i:x}/{chain}/f","type":"fifo"}}"#)));
    check("implied directories", &json, false);
}

#[test]
fn xattrs_stay_within_the_bound() {
    let _alone = alone();
    let n = 50_000;
    let json = toc_of((0..n).map(|i| {
        format!(r#"{{"name":"{i:x}","type":"fifo","xattrs":{{"a":"","b":"","c":"","d":""}}}}"#)
    }));
    check("xattrs", &json, true);
}

#[test]
fn hardlinks_and_symlinks_stay_within_the_bound() {
    let _alone = alone();
    let n = 100_000;
    let json = toc_of(
        std::iter::once(r#"{"name":"t","type":"fifo"}"#.to_string()).chain((0..n).map(|i| {
            if i % 2 == 0 {
                format!(r#"{{"name":"{i:x}","type":"hardlink","linkName":"t"}}"#)
            } else {
                format!(r#"{{"name":"{i:x}","type":"symlink","linkName":"t"}}"#)
            }
        })),
    );
    check("links", &json, true);
}
