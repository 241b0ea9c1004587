//! The background fetch on lazysnapd's default config, end to end through a real
//! containerd and registry: layers pulled lazily and then left alone become wholly
//! local once the node is quiet, each chunk fetched once.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::time::{Duration, Instant};

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

    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status = daemon::observe::fetch_status(&daemon.root).await.unwrap();
        assert_eq!(status.layers.len(), 2, "{status:?}");
        if status.layers.iter().all(|l| l.local_bytes == l.total_bytes) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "layers not local in time: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
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
