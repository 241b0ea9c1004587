//! The background fetch on lazysnapd's default config, end to end through a real
//! containerd and registry: layers pulled lazily and then left alone become wholly
//! local once the node is quiet, each chunk fetched once.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::time::Duration;

use common::{containerd_for, convert, rpull_lazily, start_lazysnapd};
use testkit::image::{Entry, ImageBuilder, busybox_entries, noise};
use testkit::registry::Registry;

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_node_makes_lazily_pulled_layers_wholly_local() {
    if testkit::skip_unless_root("an_idle_node_makes_lazily_pulled_layers_wholly_local") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    // lazysnapd's defaults: prefetch, background fetch, its quiet period and budget.
    let daemon = start_lazysnapd(dir.path(), "");
    let containerd = containerd_for(&daemon);
    let image = ImageBuilder::new()
        .entries(&busybox_entries().unwrap())
        .unwrap()
        .entries(&[
            Entry::dir("data"),
            // Several background requests' worth.
            Entry::file("data/a", noise(5 << 20, 7)),
            Entry::file("data/b", noise(3 << 20, 8)),
        ])
        .unwrap()
        .cmd(&["/bin/true"])
        .build()
        .unwrap();
    let plain = registry.push("bg/app", "plain", &image).unwrap();
    let converted = format!("{}/bg/app:estargz", registry.host);
    convert(&plain, &converted, &["--estargz"]);
    rpull_lazily(&converted, &containerd).await;

    let status = wait_for_status(&daemon.root, "layers not local in time", |status| {
        assert_eq!(status.layers.len(), 2, "{status:?}");
        status.layers.iter().all(|l| l.local_bytes == l.total_bytes)
    })
    .await;
    for layer in &status.layers {
        // Each chunk fetched once: no more than the content plus gzip's framing (the
        // noise does not compress).
        let most = layer.total_bytes + layer.total_bytes / 10 + (64 << 10);
        assert!(
            layer.fetched_bytes > 0 && layer.fetched_bytes <= most,
            "{layer:?}"
        );
        assert_eq!(layer.verification_failures, 0);
    }
    drop(containerd);
    drop(daemon);
}

/// Removing an image takes its layers' chunks out of the cache: the cache shrinks to
/// what the remaining image uses (their shared base layer stays).
#[tokio::test(flavor = "multi_thread")]
async fn removing_an_image_shrinks_the_cache_to_what_the_rest_use() {
    if testkit::skip_unless_root("removing_an_image_shrinks_the_cache_to_what_the_rest_use") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let daemon = start_lazysnapd(dir.path(), "");
    let containerd = containerd_for(&daemon);
    let mut references = Vec::new();
    for (name, seed) in [("kept", 1), ("removed", 2)] {
        let image = ImageBuilder::new()
            .entries(&busybox_entries().unwrap())
            .unwrap()
            .entries(&[Entry::file("data", noise(3 << 20, seed))])
            .unwrap()
            .cmd(&["/bin/true"])
            .build()
            .unwrap();
        let plain = registry.push("gc/app", name, &image).unwrap();
        let converted = format!("{}/gc/app:{name}-estargz", registry.host);
        convert(&plain, &converted, &["--estargz"]);
        // The second image's base layer is the first's, already present.
        let report = daemon::rpull::rpull(&converted, &common::rpull_options(&containerd))
            .await
            .unwrap();
        let last = report.layers.last().unwrap();
        assert_eq!(
            last.outcome,
            daemon::rpull::LayerOutcome::Lazy,
            "{report:?}"
        );
        references.push(converted);
    }
    // Both images wholly local (the background fetch on the default config).
    let full = wait_for_status(&daemon.root, "three layers local", |s| {
        s.layers.len() == 3 && s.layers.iter().all(|l| l.local_bytes == l.total_bytes)
    })
    .await;
    eprintln!(
        "cache with both images: {} bytes on disk",
        full.cache_disk_bytes
    );
    containerd
        .ctr(["images", "rm", "--sync", references[1].as_str()])
        .unwrap();
    let after = wait_for_status(&daemon.root, "the removed image's layer swept", |s| {
        s.layers.len() == 2 && s.cache_swept > 0
    })
    .await;
    eprintln!(
        "after removing one: {} bytes on disk, {} entries swept",
        after.cache_disk_bytes, after.cache_swept
    );
    // The removed image's own layer went from the cache, every byte of it; the
    // layers still mounted (the shared base and the kept image's) stayed.
    let removed: u64 = full
        .layers
        .iter()
        .filter(|l| !after.layers.iter().any(|a| a.layer == l.layer))
        .map(|l| l.total_bytes)
        .sum();
    let remaining: u64 = after.layers.iter().map(|l| l.total_bytes).sum();
    assert!(removed >= 3 << 20, "{full:?}\n{after:?}");
    // (Within a page: a tiny chunk may be one both layers hold.)
    assert!(
        full.cache_disk_bytes - after.cache_disk_bytes + 4096 >= removed,
        "{full:?}\n{after:?}"
    );
    assert!(after.cache_disk_bytes + 4096 >= remaining, "{after:?}");
    drop(containerd);
    drop(daemon);
}

/// Polls lazysnapd's status until `done` holds (two minutes at most).
async fn wait_for_status(
    root: &std::path::Path,
    what: &str,
    done: impl Fn(&daemon::observe::Status) -> bool,
) -> daemon::observe::Status {
    let mut last = None;
    let found = testkit::wait_for(Duration::from_secs(120), async || {
        let status = daemon::observe::fetch_status(root).await.unwrap();
        if done(&status) {
            return Some(status);
        }
        last = Some(status);
        None
    })
    .await;
    found.unwrap_or_else(|| panic!("{what}: {last:?}"))
}
