//! Native copies: once a lazily pulled image is wholly local, lazysnapd copies each layer
//! into a plain directory (`snapshots/<id>/native`), and containers created after that
//! get the copies as overlayfs lower directories instead of the FUSE mounts. They see the
//! same tree (whiteouts, opaque directories, hard links, modes and owners included) and
//! read the same bytes; a container started before the copy keeps its FUSE mounts.
//! (`lazysnap fetch` makes the image local here; the background fetch does it too.)

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::path::Path;
use std::time::Duration;

use common::{containerd_for, convert, rpull_lazily, start_lazysnapd};
use testkit::image::{Entry, ImageBuilder, busybox_entries, noise};
use testkit::registry::Registry;

/// The native copies made under `root` so far.
fn native_copies(root: &Path) -> usize {
    std::fs::read_dir(root.join("snapshots"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("native").is_dir())
                .count()
        })
        .unwrap_or(0)
}

/// The lower directories of the overlay mounted as a running task's root filesystem.
fn lowerdirs_of(pid: u32) -> String {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/") && l.contains(" - overlay "))
        .and_then(|l| l.split("lowerdir=").nth(1))
        .map(|s| s.split(',').next().unwrap_or("").to_string())
        .unwrap_or_else(|| panic!("no overlay root in {pid}'s mountinfo"))
}

fn task_pid(containerd: &testkit::containerd::Containerd, id: &str) -> u32 {
    let tasks = containerd.ctr(["task", "ls"]).unwrap();
    tasks
        .lines()
        .find(|l| l.starts_with(&format!("{id} ")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no task {id}: {tasks}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_created_once_an_image_is_local_read_native_copies_of_its_layers() {
    let name = "containers_created_once_an_image_is_local_read_native_copies_of_its_layers";
    if testkit::skip_unless_root(name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    // No background fetch: the layers become wholly local when `lazysnap fetch` says so,
    // after a container has started on the FUSE mounts.
    let daemon = start_lazysnapd(dir.path(), "[lazy]\nbackground_fetch = false\n");
    let containerd = containerd_for(&daemon);

    let mut base = busybox_entries().unwrap();
    base.extend([
        Entry::dir("etc/app"),
        Entry::file("etc/app/old.conf", "old\n"),
        Entry::file("etc/gone", "deleted above\n"),
    ]);
    let app = vec![
        Entry::dir("app"),
        Entry::file("app/big.bin", noise(5 << 20, 41)),
        // Read by no container: only the native copy reads it.
        Entry::file("app/unread.bin", noise(300 << 10, 42)),
        Entry::file_mode("app/tool", "#!/bin/sh\necho tool\n", 0o4755),
        Entry::hardlink("app/tool-link", "app/tool"),
        Entry::symlink("app/latest", "big.bin"),
        Entry::whiteout("etc/gone"),
        Entry::dir("etc/app"),
        Entry::opaque("etc/app"),
        Entry::file("etc/app/new.conf", "new\n"),
    ];
    let image = ImageBuilder::new()
        .entries(&base)
        .unwrap()
        .entries(&app)
        .unwrap()
        .cmd(&["/bin/sleep", "600"])
        .build()
        .unwrap();
    let plain = registry.push("native/app", "plain", &image).unwrap();
    let converted = format!("{}/native/app:estargz", registry.host);
    convert(&plain, &converted, &["--estargz"]);
    rpull_lazily(&converted, &containerd).await;

    // The script every container runs: the tree as it sees it, and the bytes.
    let look = "cd /; ls -A etc/app; ls etc/gone 2>&1 | wc -l; test -e etc/gone && echo GONE-PRESENT; \
                stat -c '%a %h %u' app/tool app/tool-link; readlink app/latest; \
                sha256sum app/big.bin app/tool etc/app/new.conf";
    let first = containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            &converted,
            "before",
            "/bin/sh",
            "-c",
            look,
        ])
        .unwrap();
    // One container from before the copies, kept running.
    containerd
        .ctr([
            "run",
            "-d",
            "--snapshotter",
            "lazysnap",
            &converted,
            "early",
        ])
        .unwrap();
    let early = task_pid(&containerd, "early");
    assert!(
        !lowerdirs_of(early).contains("/native"),
        "{}",
        lowerdirs_of(early)
    );

    assert_eq!(native_copies(&daemon.root), 0, "not local yet");
    let fetched = std::process::Command::new(common::LAZYSNAP)
        .arg("fetch")
        .arg("--root")
        .arg(&daemon.root)
        .args(["--no-progress", &converted])
        .output()
        .unwrap();
    assert!(fetched.status.success(), "{fetched:?}");
    assert!(
        testkit::wait_until(Duration::from_secs(120), || native_copies(&daemon.root)
            == 2),
        "no native copies of the two layers; log:\n{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("native copy made"),
        "{}",
        daemon.log()
    );
    let status = daemon::observe::fetch_status(&daemon.root).await.unwrap();
    assert!(
        status.layers.len() == 2 && status.layers.iter().all(|l| l.native_copy),
        "{status:?}"
    );
    // The copy's own reads stay out of the access log `lazysnap optimize` learns from.
    let accessed = daemon::observe::fetch_accessed(&daemon.root).await.unwrap();
    let read: Vec<&str> = accessed
        .iter()
        .flat_map(|l| l.files.iter().map(|f| f.path.as_str()))
        .collect();
    assert!(read.iter().any(|p| p.ends_with("app/big.bin")), "{read:?}");
    assert!(
        !read.iter().any(|p| p.ends_with("app/unread.bin")),
        "{read:?}"
    );

    let after = containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            &converted,
            "after",
            "/bin/sh",
            "-c",
            look,
        ])
        .unwrap();
    assert_eq!(first, after, "the native copies show another tree");
    assert!(
        after.contains("new.conf") && !after.contains("old.conf"),
        "{after}"
    );
    assert!(!after.contains("GONE-PRESENT"), "{after}");
    assert!(
        after.contains("4755 2 0"),
        "set-uid bit and hard link kept: {after}"
    );

    // A new container's lower directories are the copies; the early one keeps FUSE
    // and still reads.
    containerd
        .ctr(["run", "-d", "--snapshotter", "lazysnap", &converted, "late"])
        .unwrap();
    let late = lowerdirs_of(task_pid(&containerd, "late"));
    assert_eq!(late.matches("/native").count(), 2, "{late}");
    let read_early = std::fs::read(format!("/proc/{early}/root/app/big.bin")).unwrap();
    assert_eq!(read_early, noise(5 << 20, 41));
    for id in ["early", "late"] {
        let _ = containerd.ctr(["task", "kill", "-s", "KILL", id]);
        testkit::wait_until(Duration::from_secs(10), || {
            containerd.ctr(["task", "delete", id]).is_ok()
        });
        containerd.ctr(["container", "delete", id]).unwrap();
    }

    // Removing the image removes the copies with the snapshots.
    containerd
        .ctr(["image", "rm", "--sync", &converted])
        .unwrap();
    assert!(
        testkit::wait_until(Duration::from_secs(30), || native_copies(&daemon.root) == 0),
        "native copies left after the image went"
    );
}

/// lazysnapd stopped while it copies a layer natively: the copy reads through a FUSE
/// mount lazysnapd is about to leave to the fd holder, and a read nobody answers would
/// hold the exiting process forever. The copy stops, lazysnapd exits at once, and no
/// partial copy is taken for a whole one.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_during_a_native_copy_ends_it_and_exits_promptly() {
    if testkit::skip_unless_root("a_stop_during_a_native_copy_ends_it_and_exits_promptly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let mut daemon = start_lazysnapd(dir.path(), "[lazy]\nbackground_fetch = false\n");
    // A layer of about 300,000 fifos and no payload: wholly local once mounted, and long to copy.
    let json = common::fifo_toc(10 << 20, "");
    let (blob, diff_id, toc) = testkit::image::estargz_of_toc(&json).unwrap();
    let layer = common::push_estargz_blob(&registry, "native/fifos", blob, &diff_id, &toc);
    common::prepare_lazily(&daemon, "fifos", layer.labels).await;
    let staging = daemon.root.join("native-staging");
    let copying = testkit::wait_until(Duration::from_secs(30), || {
        std::fs::read_dir(&staging).is_ok_and(|mut d| d.next().is_some())
    });
    assert!(copying, "no native copy started");
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    daemon.stop().unwrap();
    let took = started.elapsed();
    eprintln!("stopped during a native copy in {took:?}");
    assert!(
        took < Duration::from_secs(12),
        "lazysnapd took {took:?} to exit"
    );
    assert_eq!(
        native_copies(&daemon.root),
        0,
        "a partial copy was taken for whole"
    );
}
