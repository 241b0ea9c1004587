//! Crafted TOCs served by a real registry: parsing one never blocks the daemon's other
//! work, stays within the memory bound lazysnapd reserves for it (compressed TOC + the
//! JSON x (1 + estargz::PARSE_MEMORY_FACTOR)), and stops, falling back, at the mount
//! timeout.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use snapshotter::proto::snapshots as pb;
use testkit::containerd::mounts_under;
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::Registry;

use common::LAZYSNAPD;

fn start_daemon(dir: &Path, mount_timeout_sec: u64) -> Lazysnapd {
    let config = dir.join(format!("lazysnapd-{mount_timeout_sec}.toml"));
    std::fs::write(
        &config,
        format!(
            "[lazy]\nmount_timeout_sec = {mount_timeout_sec}\nbackground_fetch = false\n\
             preopen_siblings = false\nnative_copies = false\n"
        ),
    )
    .unwrap();
    Lazysnapd::start_with_args(
        Path::new(LAZYSNAPD),
        &dir.join(format!("ls-{mount_timeout_sec}")),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap()
}

/// A pushed layer and what a Prepare of it carries.
struct Pushed {
    labels: HashMap<String, String>,
    target: String,
    /// What lazysnapd reserves to parse it.
    bound: u64,
}

async fn push(registry: &Registry, repo: &str, blob: Vec<u8>, diff_id: &str, toc: &str) -> Pushed {
    let copy = estargz::VecBlob::new(blob.clone());
    let bound = estargz::fetch_toc(&copy, &estargz::OpenOptions::default())
        .await
        .unwrap()
        .parse_memory_bound()
        .unwrap();
    let pushed = common::push_estargz_blob(registry, repo, blob, diff_id, toc);
    Pushed {
        labels: pushed.labels,
        target: pushed.target,
        bound,
    }
}

/// A TOC a few hundred bytes under the format's 150 MiB cap.
fn toc_at_the_cap(salt: &str) -> Vec<u8> {
    common::fifo_toc(estargz::MAX_TOC_SIZE as usize - 512, salt)
}

async fn push_toc(registry: &Registry, repo: &str, json: &[u8]) -> Pushed {
    let (blob, diff_id, toc) = testkit::image::estargz_of_toc(json).unwrap();
    eprintln!(
        "{repo}: a TOC of {} MB JSON, {} MB compressed",
        json.len() >> 20,
        blob.len() >> 20
    );
    push(registry, repo, blob, &diff_id, &toc).await
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
}

fn rss(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:") << 10
}

fn peak_rss(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:") << 10
}

async fn prepare(
    daemon: &Lazysnapd,
    key: &str,
    labels: HashMap<String, String>,
) -> Result<Vec<snapshotter::proto::containerd::types::Mount>, tonic::Status> {
    let mut c = snapshotter::client::connect(&daemon.address).await.unwrap();
    c.prepare(pb::PrepareSnapshotRequest {
        key: key.into(),
        labels,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().mounts)
}

/// A remote snapshot's Prepare answers AlreadyExists once the layer is mounted.
fn mounted_lazily(
    outcome: &Result<Vec<snapshotter::proto::containerd::types::Mount>, tonic::Status>,
) -> bool {
    matches!(outcome, Err(s) if s.code() == tonic::Code::AlreadyExists)
}

/// Reads 64 KiB of `file` at `offset` after dropping the file's page cache, so the
/// read reaches lazysnapd as a FUSE READ; returns how long it took.
fn uncached_read(file: &std::fs::File, offset: u64) -> Duration {
    let started = Instant::now();
    nix::fcntl::posix_fadvise(
        file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let n = std::os::unix::fs::FileExt::read_at(file, &mut buf, offset).unwrap();
    assert_eq!(n, buf.len());
    assert!(
        buf.iter().all(|&b| b == 0),
        "the one-chunk layer holds zeros"
    );
    started.elapsed()
}

fn the_mount_of(daemon: &Lazysnapd) -> PathBuf {
    let mounts = mounts_under(&daemon.root);
    assert_eq!(mounts.len(), 1, "one lazily mounted layer: {mounts:?}");
    mounts[0].clone()
}

/// A TOC at the cap (150 MiB of JSON, 4.3 million entries): while it parses, another
/// layer's FUSE reads and the gRPC service answer within 100 ms; the parse stays within
/// the memory it reserved; two at once wait for each other's share of the budget
/// instead of adding up; and with a 2 s mount timeout it falls back by 2.5 s and stops.
#[tokio::test(flavor = "multi_thread")]
async fn tocs_at_the_cap_parse_beside_other_work_within_their_bound_and_time() {
    if testkit::skip_unless_root(
        "tocs_at_the_cap_parse_beside_other_work_within_their_bound_and_time",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let daemon = start_daemon(dir.path(), 60);
    let pid = daemon.pid();

    // Another layer, mounted first: 4 MiB of zeros as one chunk.
    let (blob, diff_id, toc) = testkit::image::one_chunk_estargz("data.bin", 4 << 20).unwrap();
    let other = push(&registry, "hostile/other", blob, &diff_id, &toc).await;
    assert!(mounted_lazily(
        &prepare(&daemon, "other", other.labels.clone()).await
    ));
    let data = std::fs::File::open(the_mount_of(&daemon).join("data.bin")).unwrap();
    uncached_read(&data, 0);

    // 1. One TOC at the cap, while the other layer is read and the service asked.
    let cap = push_toc(&registry, "hostile/cap-a", &toc_at_the_cap("a")).await;
    let before = rss(pid);
    let started = Instant::now();
    let parse = tokio::spawn({
        let (address, labels) = (daemon.address.clone(), cap.labels.clone());
        async move {
            let mut c = snapshotter::client::connect(&address).await.unwrap();
            c.prepare(pb::PrepareSnapshotRequest {
                key: "cap-a".into(),
                labels,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().mounts)
        }
    });
    let (mut slowest_read, mut slowest_stat, mut rounds) = (Duration::ZERO, Duration::ZERO, 0u64);
    let mut c = snapshotter::client::connect(&daemon.address).await.unwrap();
    while !parse.is_finished() {
        let offset = (rounds % 64) * (64 << 10);
        slowest_read =
            slowest_read.max(tokio::task::block_in_place(|| uncached_read(&data, offset)));
        let asked = Instant::now();
        c.stat(pb::StatSnapshotRequest {
            key: other.target.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        slowest_stat = slowest_stat.max(asked.elapsed());
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcome = parse.await.unwrap();
    let took = started.elapsed();
    let peak = peak_rss(pid);
    eprintln!(
        "one TOC at the cap: mounted in {took:?}; {rounds} rounds meanwhile, slowest FUSE read \
         {slowest_read:?}, slowest Stat {slowest_stat:?}; RSS {} MB before, peak {} MB, bound {} MB",
        before >> 20,
        peak >> 20,
        cap.bound >> 20
    );
    assert!(mounted_lazily(&outcome), "{outcome:?}");
    assert!(rounds >= 3, "the parse took {took:?}: too short to watch");
    assert!(
        slowest_read <= Duration::from_millis(100),
        "FUSE read took {slowest_read:?}"
    );
    assert!(
        slowest_stat <= Duration::from_millis(100),
        "Stat took {slowest_stat:?}"
    );
    assert!(
        peak.saturating_sub(before) <= cap.bound,
        "peak over the bound"
    );

    // 2. Two at once: the second waits for the first's share (both need over half the
    // default 1536 MB budget), so the peak is one parse's, beside the first index.
    let (b, c2) = (
        push_toc(&registry, "hostile/cap-b", &toc_at_the_cap("b")).await,
        push_toc(&registry, "hostile/cap-c", &toc_at_the_cap("c")).await,
    );
    let before_two = rss(pid);
    let started = Instant::now();
    let (first, second) = tokio::join!(
        prepare(&daemon, "cap-b", b.labels.clone()),
        prepare(&daemon, "cap-c", c2.labels.clone())
    );
    let peak_two = peak_rss(pid);
    let after_two = rss(pid);
    eprintln!(
        "two TOCs at the cap at once: both done in {:?}; RSS {} MB before, peak {} MB, {} MB after \
         (two indexes of 4.3 million entries)",
        started.elapsed(),
        before_two >> 20,
        peak_two >> 20,
        after_two >> 20
    );
    assert!(
        mounted_lazily(&first) && mounted_lazily(&second),
        "{first:?} {second:?}"
    );
    let one_index = (after_two - before_two) / 2;
    assert!(
        peak_two.saturating_sub(before_two) <= b.bound.max(c2.bound) + one_index,
        "two parses added up"
    );

    // 3. A mount timeout of 2 s: the parse overruns it, the layer falls back by 2.5 s,
    // and the parse stops.
    let impatient = start_daemon(dir.path(), 2);
    let started = Instant::now();
    let outcome = prepare(&impatient, "cap-late", cap.labels.clone()).await;
    let took = started.elapsed();
    // Within a second the parse has seen the flag (it looks every MiB and every few
    // thousand entries); in the second after that, the daemon is idle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_then = testkit::process::cpu_time(impatient.pid());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_after = testkit::process::cpu_time(impatient.pid()) - cpu_then;
    eprintln!(
        "a 2 s mount timeout: fell back after {took:?}; CPU one second later, over a second: {cpu_after:?}"
    );
    let mounts = outcome.unwrap();
    assert_eq!(mounts[0].r#type, "bind", "an ordinary snapshot");
    assert!(
        took <= Duration::from_millis(2500),
        "fell back after {took:?}"
    );
    assert!(
        cpu_after < Duration::from_millis(300),
        "the parse went on: {cpu_after:?}"
    );
    let log = impatient.log();
    assert!(
        log.lines()
            .any(|l| l.contains("lazy pull not possible") && l.contains("longer than")),
        "{log}"
    );
    drop(data);
}

/// One entry 60,000 directories deep (a 120 KB name) in a 60 KB TOC: refused at once
/// for its length, with a short log line and no memory to speak of.
#[tokio::test(flavor = "multi_thread")]
async fn a_path_deeper_than_path_max_falls_back() {
    if testkit::skip_unless_root("a_path_deeper_than_path_max_falls_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let daemon = start_daemon(dir.path(), 3);
    let deep = vec!["d"; 60_000].join("/");
    let json = format!(r#"{{"version":1,"entries":[{{"name":"{deep}/f","type":"fifo"}}]}}"#);
    let layer = push_toc(&registry, "hostile/deep", json.as_bytes()).await;
    let before = peak_rss(daemon.pid());
    let started = Instant::now();
    let mounts = prepare(&daemon, "deep", layer.labels).await.unwrap();
    eprintln!(
        "60,000 deep: fell back in {:?}; peak RSS {} MB before, {} MB after",
        started.elapsed(),
        before >> 20,
        peak_rss(daemon.pid()) >> 20
    );
    assert_eq!(mounts[0].r#type, "bind");
    assert!(peak_rss(daemon.pid()) < 256 << 20);
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("lazy pull not possible"))
        .unwrap_or_else(|| panic!("no fallback line:\n{log}"));
    assert!(line.contains("PATH_MAX"), "{line}");
    assert!(
        line.len() < 1000,
        "the log line shows the path shortened: {} bytes",
        line.len()
    );
}
