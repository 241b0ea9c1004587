//! `lazysnap optimize` end to end, through a real containerd, docker-registry and FUSE:
//! the command's reads are recorded with their byte ranges, the optimized image marks
//! just the chunks holding them, and a fresh node prefetches those and nothing else of
//! a big file the command read only a little of.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::process::Command;
use std::time::Duration;

use common::{LAZYSNAP, containerd_for, rpull_lazily, start_lazysnapd};
use testkit::containerd::Containerd;
use testkit::image::{Entry, ImageBuilder, busybox_entries, noise};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::Registry;
const MIB: u64 = 1 << 20;
/// The command reads 256 KiB of /app/big at this offset, and nothing else of it.
const READ_AT: u64 = 5 * MIB;

/// A lazysnapd (no background fetch: what it fetches is what was asked for) and a
/// containerd that uses it.
struct Node {
    daemon: Lazysnapd,
    containerd: Containerd,
    _dir: tempfile::TempDir,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_lazysnapd(dir.path(), "[lazy]\nbackground_fetch = false\n");
    let containerd = containerd_for(&daemon);
    Node {
        daemon,
        containerd,
        _dir: dir,
    }
}

fn big() -> Vec<u8> {
    noise(16 * MIB as usize, 41)
}

fn expected_output() -> String {
    use sha2::Digest;
    let part = &big()[READ_AT as usize..(READ_AT + 256 * 1024) as usize];
    format!("{:x}", sha2::Sha256::digest(part))
}

/// Marked (prefetched) and all bytes of /app/big in the image's TOC, compressed.
async fn big_file_chunks(reference: &str) -> (u64, u64) {
    let client = registry::Client::new(registry::RegistryConfig::default()).unwrap();
    let reference: registry::Reference = reference.parse().unwrap();
    let resolved = client.resolve(&reference).await.unwrap();
    for d in &resolved.manifest.layers {
        let blob = registry::RemoteBlob::open(
            client.clone(),
            reference.repository.clone(),
            d.digest.clone(),
        )
        .await
        .unwrap();
        let layer = estargz::Layer::open(std::sync::Arc::new(blob), &Default::default())
            .await
            .unwrap();
        let index = layer.index();
        if let Some(id) = index.lookup("app/big") {
            let chunks = index.entry(id).chunks();
            let marked = chunks.iter().filter(|c| c.prefetch).map(|c| c.comp_len());
            return (marked.sum(), chunks.iter().map(|c| c.comp_len()).sum());
        }
    }
    panic!("no layer holds app/big")
}

#[tokio::test(flavor = "multi_thread")]
async fn optimize_marks_what_the_command_read_and_a_fresh_node_prefetches_just_that() {
    if testkit::skip_unless_root("optimize_marks_what_the_command_read") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let cmd = format!(
        "cat /app/small; dd if=/app/big bs=4096 skip={} count=64 2>/dev/null | sha256sum",
        READ_AT / 4096
    );
    let image = ImageBuilder::new()
        .entries(&busybox_entries().unwrap())
        .unwrap()
        .entries(&[
            Entry::dir("app"),
            Entry::file("app/small", "hello from small\n"),
            Entry::file("app/big", big()),
            Entry::file("app/unread", noise(MIB as usize, 42)),
        ])
        .unwrap()
        .cmd(&["/bin/sh", "-c", &cmd])
        .build()
        .unwrap();
    let src = registry.push("app/opt", "plain", &image).unwrap();
    let dst = format!("{}/app/opt:optimized", registry.host);

    // 1. Optimize on one node.
    let first = node();
    let list = dir.path().join("read.list");
    let out = Command::new(LAZYSNAP)
        .arg("optimize")
        .arg("--address")
        .arg(first.containerd.address())
        .args(["--namespace", first.containerd.namespace()])
        .args(["--snapshotter", "lazysnap"])
        .arg("--root")
        .arg(&first.daemon.root)
        .arg("--record")
        .arg(&list)
        .args(["--no-progress-bars", &src, &dst])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "optimize failed: {}\nlazysnapd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        first.daemon.log()
    );
    drop(first);

    // The list: files in first-open order, each with the ranges read.
    let list = std::fs::read_to_string(&list).unwrap();
    let line = |path: &str| list.lines().find(|l| l.starts_with(&format!("{path}\t")));
    assert!(line("app/small").is_some(), "{list}");
    assert!(line("app/unread").is_none(), "{list}");
    let big_line = line("app/big").unwrap_or_else(|| panic!("app/big not listed:\n{list}"));
    for range in big_line.split('\t').nth(1).unwrap().split(',') {
        let (s, e) = range.split_once('-').unwrap();
        let (s, e): (u64, u64) = (s.parse().unwrap(), e.parse().unwrap());
        // What dd read, widened by at most the kernel's read-ahead.
        assert!(
            s >= READ_AT - MIB && e <= READ_AT + 2 * MIB,
            "{range} is not near what was read:\n{list}"
        );
    }

    // 2. The optimized image marks a small part of the big file.
    let (marked, total) = big_file_chunks(&dst).await;
    assert!(marked > 0 && marked <= MIB, "marked {marked} of {total}");
    assert!(total >= 16 * MIB, "{total}");

    // 3. A fresh node: prefetch fetches the marked chunks, the command runs correctly.
    let second = node();
    rpull_lazily(&dst, &second.containerd).await;
    let root = second.daemon.root.clone();
    let prefetched = tokio::task::spawn_blocking(move || {
        testkit::wait_until(Duration::from_secs(30), || {
            let status = tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(daemon::observe::fetch_status(&root));
            status.is_ok_and(|s| s.layers.iter().all(|l| l.prefetch_done))
        })
    })
    .await
    .unwrap();
    assert!(prefetched, "prefetch did not finish");
    let status = daemon::observe::fetch_status(&second.daemon.root)
        .await
        .unwrap();
    let fetched: u64 = status.layers.iter().map(|l| l.fetched_bytes).sum();
    // busybox and the small files, plus the marked part of app/big: far from its 16 MiB.
    assert!(fetched < 4 * MIB, "prefetch fetched {fetched} bytes");
    let printed = second
        .containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            &dst,
            "optimized-1",
        ])
        .unwrap();
    assert!(printed.contains("hello from small"), "{printed}");
    assert!(printed.contains(&expected_output()), "{printed}");
    let after = daemon::observe::fetch_status(&second.daemon.root)
        .await
        .unwrap();
    let fetched_after: u64 = after.layers.iter().map(|l| l.fetched_bytes).sum();
    assert!(
        fetched_after < 6 * MIB,
        "the run fetched {fetched_after} bytes in all"
    );
}
