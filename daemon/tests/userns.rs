//! User-namespaced containers on lazily pulled images, with real parts: containerd 2.x
//! told that lazysnapd can `remap-ids`, an eStargz image in docker-registry mounted
//! lazily over FUSE, runc in a user namespace. containerd passes the mapping as snapshot
//! labels; lazysnapd stacks the container's overlay on idmapped clones of the layers, so
//! the image's files are the container root's without a copy or a chown, what the
//! container writes lands with the host's mapped IDs, and the layers stay lazy. Through
//! `ctr run --remap-labels` and through a CRI pod with a user namespace.
//!
//! containerd 1.6 knows no `remap-ids`: these tests run in the containerd 2.x pass
//! (`LAZYSNAP_CONTAINERD=2`) and say so when skipped.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::{layers_of, push_busybox_app, rpull_lazily, start_lazysnapd};
use testkit::containerd::{Containerd, ContainerdOptions, Release};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::{Registry, bytes_served};

/// The file nobody reads; it must stay in the registry.
const BIG: usize = 16 << 20;
/// Container IDs 0..65536 are these host IDs.
const HOST_UID: u32 = 231_072;
const HOST_GID: u32 = 296_608;

struct Setup {
    containerd: Containerd,
    daemon: Lazysnapd,
    registry: Registry,
    _dir: tempfile::TempDir,
}

fn setup(name: &str) -> Option<Setup> {
    if testkit::skip_unless_root(name) {
        return None;
    }
    if Release::from_env().unwrap() != Release::Sid {
        eprintln!("{name}: skipped: remap-ids needs containerd 2.x (LAZYSNAP_CONTAINERD=2)");
        return None;
    }
    if !snapshotter::idmap::kernel_idmaps_fuse() {
        eprintln!("{name}: skipped: this kernel cannot idmap FUSE mounts (6.12+)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    // No background fetch: what the registry serves is what the pull and container read.
    let daemon = start_lazysnapd(dir.path(), "[lazy]\nbackground_fetch = false\n");
    let containerd = Containerd::start_with(
        &ContainerdOptions::default()
            .proxy_snapshotter("lazysnap", &daemon.address)
            .proxy_capabilities("lazysnap", &["remap-ids"]),
    )
    .unwrap();
    Some(Setup {
        containerd,
        daemon,
        registry,
        _dir: dir,
    })
}

/// Regular files and symlinks under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn ctr_run_with_remap_labels_maps_a_lazy_image_without_copying_it() {
    let Some(s) = setup("ctr_run_with_remap_labels_maps_a_lazy_image_without_copying_it") else {
        return;
    };
    let (_, image) = push_busybox_app(&s.registry, "userns/app", BIG, 41);
    rpull_lazily(&image, &s.containerd).await;
    let uidmap = format!("0:{HOST_UID}:65536");
    let gidmap = format!("0:{HOST_GID}:65536");
    let script = "id -u; id -g; stat -c '%u:%g' /app/motd /app/big.bin /bin/busybox; \
                  cat /app/motd; echo written-inside > /app/new.txt; stat -c '%u:%g' /app/new.txt";
    let out = s
        .containerd
        .ctr([
            "run",
            "--snapshotter",
            "lazysnap",
            "--uidmap",
            &uidmap,
            "--gidmap",
            &gidmap,
            "--remap-labels",
            &image,
            "userns-1",
            "/bin/sh",
            "-c",
            script,
        ])
        .unwrap_or_else(|e| {
            panic!(
                "ctr run: {e}\ncontainerd log:\n{}\nlazysnapd log:\n{}",
                s.containerd.log(),
                s.daemon.log()
            )
        });
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        ["0", "0", "0:0", "0:0", "0:0", "served-lazily", "0:0"],
        "inside the container:\n{out}"
    );

    // The container's upper dir: what it wrote, owned by the mapped root as the host sees
    // it, and nothing else copied up.
    let uppers: Vec<PathBuf> = std::fs::read_dir(s.daemon.root.join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("fs"))
        .filter(|fs| fs.join("app/new.txt").exists())
        .collect();
    assert_eq!(uppers.len(), 1, "{uppers:?}");
    let upper = &uppers[0];
    let written = std::fs::metadata(upper.join("app/new.txt")).unwrap();
    assert_eq!((written.uid(), written.gid()), (HOST_UID, HOST_GID));
    let root = std::fs::metadata(upper).unwrap();
    assert_eq!((root.uid(), root.gid()), (HOST_UID, HOST_GID));
    let copied: Vec<PathBuf> = files_under(upper)
        .into_iter()
        .filter(|p| p != Path::new("app/new.txt"))
        .collect();
    assert_eq!(copied, Vec::<PathBuf>::new(), "copied up without a write");

    // The layers stayed lazy: the big file was never fetched.
    let log = s.registry.log();
    let (big_layer, big_size) = layers_of(&image)
        .await
        .into_iter()
        .max_by_key(|(_, size)| *size)
        .unwrap();
    let served = bytes_served(&log, &big_layer);
    assert!(
        served * 4 < big_size,
        "{served} of {big_size} bytes of layer {big_layer} served"
    );
    s.containerd.ctr(["container", "rm", "userns-1"]).unwrap();
}
