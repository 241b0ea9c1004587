//! End to end with real parts: containerd 1.6 with lazysnapd as its `lazysnap` proxy
//! snapshotter pulls a busybox image from a real registry and runs containers on it;
//! removing them leaves no snapshot directory and no mount behind.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

use std::path::Path;
use std::time::Duration;

use snapshotter::proto::snapshots as pb;
use testkit::containerd::{Containerd, ContainerdOptions, mounts_under};
use testkit::image::{Entry, ImageBuilder, busybox_layer};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::Registry;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnapd");

async fn snapshot_count(address: &Path) -> usize {
    let mut c = snapshotter::client::connect(address).await.unwrap();
    let mut stream = c
        .list(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(batch) = stream.message().await.unwrap() {
        n += batch.info.len();
    }
    n
}

fn snapshot_dirs(root: &Path) -> usize {
    std::fs::read_dir(root.join("snapshots")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_and_runs_images_through_lazysnapd() {
    if testkit::skip_unless_root("containerd_pulls_and_runs_images_through_lazysnapd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let mut daemon = Lazysnapd::start(Path::new(BIN), &dir.path().join("ls")).unwrap();
    let containerd = Containerd::start_with(
        &ContainerdOptions::default().proxy_snapshotter("lazysnap", &daemon.address),
    )
    .unwrap();

    // Two layers, so containerd stacks an overlay over a committed parent.
    let image = ImageBuilder::new()
        .layer(busybox_layer().unwrap())
        .entries(&[
            Entry::dir("etc"),
            Entry::file("etc/motd", "layer-two-says-hi\n"),
            Entry::whiteout("etc/group"),
        ])
        .unwrap()
        .cmd(&["/bin/cat", "/etc/motd"])
        .build()
        .unwrap();
    let reference = registry.push("test/busybox", "1", &image).unwrap();

    containerd
        .ctr([
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "lazysnap",
            &reference,
        ])
        .unwrap();
    let snapshots = containerd
        .ctr(["snapshots", "--snapshotter", "lazysnap", "ls"])
        .unwrap();
    assert_eq!(
        snapshots.matches("Committed").count(),
        2,
        "one committed snapshot per layer:\n{snapshots}"
    );

    let out = containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            &reference,
            "first",
        ])
        .unwrap();
    assert!(
        out.contains("layer-two-says-hi"),
        "first container printed {out:?}"
    );
    let out = containerd
        .ctr([
            "run", "--rm", "--snapshotter", "lazysnap", &reference, "second", "/bin/sh", "-c",
            "echo second-container; test ! -e /etc/group && echo whiteout-honoured; echo x > /tmp/w && cat /tmp/w",
        ])
        .unwrap();
    assert!(out.contains("second-container"), "{out:?}");
    assert!(out.contains("whiteout-honoured"), "{out:?}");

    // The daemon restarts under a live containerd. A pull made while no daemon runs
    // waits on the socket the fd holder keeps, and goes through on its first try.
    // (containerd 1.6 waits for the new daemon's handshake as long as its first back-off
    // step, 0.8-1.2 s; lazysnapd is back within a tenth of that.)
    let other = ImageBuilder::new()
        .layer(busybox_layer().unwrap())
        .entries(&[Entry::file("gap.txt", "pulled-in-the-gap\n")])
        .unwrap()
        .cmd(&["/bin/cat", "/gap.txt"])
        .build()
        .unwrap();
    let other_reference = registry.push("test/gap", "1", &other).unwrap();
    daemon.stop().unwrap();
    std::thread::scope(|scope| {
        let pull = scope.spawn(|| {
            containerd.ctr([
                "image",
                "pull",
                "--plain-http",
                "--snapshotter",
                "lazysnap",
                &other_reference,
            ])
        });
        std::thread::sleep(Duration::from_millis(300));
        if pull.is_finished() {
            panic!(
                "the pull did not wait for lazysnapd: {:?}",
                pull.join().unwrap()
            );
        }
        daemon.restart().unwrap();
        pull.join()
            .unwrap()
            .expect("a pull made while lazysnapd restarted failed");
    });
    let out = containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            &other_reference,
            "gap",
        ])
        .unwrap();
    assert!(out.contains("pulled-in-the-gap"), "{out:?}");
    containerd
        .ctr(["image", "rm", "--sync", &other_reference])
        .unwrap();
    let out = containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            &reference,
            "third",
        ])
        .unwrap();
    assert!(out.contains("layer-two-says-hi"), "{out:?}");

    containerd
        .ctr(["image", "rm", "--sync", &reference])
        .unwrap();
    // containerd's garbage collector removes the snapshots; wait for it rather than sleep.
    let mut remaining = usize::MAX;
    testkit::wait_for(Duration::from_secs(30), async || {
        remaining = snapshot_count(&daemon.address).await;
        (remaining == 0).then_some(())
    })
    .await;
    assert_eq!(remaining, 0, "snapshots left after removing the image");
    let mut c = snapshotter::client::connect(&daemon.address).await.unwrap();
    c.cleanup(pb::CleanupRequest::default()).await.unwrap();
    assert_eq!(snapshot_dirs(&daemon.root), 0, "snapshot directories left");
    assert!(
        mounts_under(&daemon.root).is_empty(),
        "mounts left under the root"
    );
    assert!(
        mounts_under(containerd.dir()).is_empty(),
        "mounts left under containerd"
    );
    let status = daemon.stop().unwrap();
    assert!(status.success());
}
