//! Runs offline once local: a lazily pulled layer whose footer and TOC lazysnapd keeps
//! (`ROOT/tocs`) is restored after a restart without its registry. With the layer
//! wholly in the chunk cache, a container starts on it with the registry gone, after a
//! restart of everything (lazysnapd without its fd holder, containerd, as a reboot
//! leaves them); with part of it not local, the reads that need the registry fail with
//! EIO within `fetch_timeout_sec`, and work again once the registry is back, without
//! restarting lazysnapd.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{containerd_for, convert, file_digests, rpull_lazily, start_lazysnapd};
use testkit::containerd::mounts_under;
use testkit::image::{Entry, ImageBuilder, busybox_entries, noise, sha256_digest};
use testkit::registry::{Registry, RegistryOptions};

/// Polls lazysnapd's status (what `lazysnap status --json` prints) until `done` holds.
async fn wait_for_status(
    root: &Path,
    what: &str,
    done: impl Fn(&daemon::observe::Status) -> bool,
) -> daemon::observe::Status {
    let mut last = None;
    let found = testkit::wait_for(Duration::from_secs(120), async || {
        let status = daemon::observe::fetch_status(root).await.ok()?;
        if done(&status) {
            return Some(status);
        }
        last = Some(status);
        None
    })
    .await;
    found.unwrap_or_else(|| panic!("{what}: {last:?}"))
}

/// What lazysnapd keeps to restore layers without the registry: their metadata
/// (`tocs`), or for a SOCI image's layer without a zTOC its whole copy (`local-layers`).
fn kept(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = ["tocs", "local-layers"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(root.join(dir)).into_iter().flatten())
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Layers restored after the restart without asking the registry.
fn restored_offline(log: &str) -> usize {
    log.matches("layer opened from its kept metadata, without the registry")
        .count()
        + log
            .matches("layer opened from its local copy, without the registry")
            .count()
}

/// The file name lazysnapd keeps a layer's metadata under.
fn kept_name(layer_digest: &str) -> String {
    layer_digest.replace(':', "-")
}

fn registry_is_down(host: &str) -> bool {
    std::net::TcpStream::connect(host).is_err()
}

/// Wholly local, then everything restarted as after a reboot (containerd too, the fd
/// holder gone, the layers unmounted) with the registry stopped: the snapshots are
/// restored from the kept metadata, and a container reads every file of the image back
/// byte for byte. Removing the image then removes the kept metadata too.
#[tokio::test(flavor = "multi_thread")]
async fn a_wholly_local_image_runs_after_a_reboot_without_its_registry() {
    runs_after_a_reboot_without_its_registry(
        "a_wholly_local_image_runs_after_a_reboot_without_its_registry",
        &["--estargz"],
    )
    .await;
}

/// The same for a plain gzip image pulled lazily through a SOCI index: the app layer
/// has a zTOC, which lazysnapd keeps; the base layer is under the index's minimum size
/// and has none, so lazysnapd fetched it whole and keeps that copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_wholly_local_soci_indexed_image_runs_after_a_reboot_without_its_registry() {
    runs_after_a_reboot_without_its_registry(
        "a_wholly_local_soci_indexed_image_runs_after_a_reboot_without_its_registry",
        &["--soci", "--min-layer-size", "4000000"],
    )
    .await;
}

async fn runs_after_a_reboot_without_its_registry(name: &str, convert_with: &[&str]) {
    if testkit::skip_unless_root(name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let host = registry.host.clone();
    // The background fetch makes the layers wholly local; quickly, once the pull is over.
    let mut daemon = start_lazysnapd(
        dir.path(),
        "[lazy]\n# Reads go through FUSE and the chunk cache, not native copies.\nnative_copies = false\nbackground_quiet_ms = 100\n",
    );
    let mut containerd = containerd_for(&daemon);

    let base = busybox_entries().unwrap();
    let app = vec![
        Entry::dir("app"),
        Entry::file("app/motd", "runs offline\n"),
        // Several chunks, several background requests.
        Entry::file("app/big.bin", noise(6 << 20, 31)),
        Entry::file("app/mid.bin", noise(300 << 10, 32)),
        Entry::file("app/empty", ""),
    ];
    let mut expected = BTreeMap::new();
    file_digests(&base, &mut expected);
    file_digests(&app, &mut expected);
    let image = ImageBuilder::new()
        .entries(&base)
        .unwrap()
        .entries(&app)
        .unwrap()
        .cmd(&["/bin/cat", "/app/motd"])
        .build()
        .unwrap();
    let plain = registry.push("offline/app", "plain", &image).unwrap();
    let converted = format!("{host}/offline/app:converted");
    convert(&plain, &converted, convert_with);
    let report = rpull_lazily(&converted, &containerd).await;
    let layers: Vec<String> = report.layers.iter().map(|l| l.digest.clone()).collect();
    assert_eq!(layers.len(), 2, "{report:?}");

    let status = wait_for_status(&daemon.root, "layers not local in time", |s| {
        s.layers.len() == 2 && s.layers.iter().all(|l| l.local_bytes == l.total_bytes)
    })
    .await;
    eprintln!("wholly local: {:?}", status.layers);
    // Each layer's verified metadata is kept, under its digest.
    let mut want: Vec<String> = layers.iter().map(|d| kept_name(d)).collect();
    want.sort();
    assert!(
        testkit::wait_until(Duration::from_secs(10), || kept(&daemon.root) == want),
        "kept: {:?}, layers: {want:?}",
        kept(&daemon.root)
    );

    // Down everything, as a reboot does, and keep the registry down.
    containerd.stop().unwrap();
    assert!(daemon.stop().unwrap().success());
    daemon.unmount_all().unwrap();
    assert!(mounts_under(&daemon.root).is_empty());
    drop(registry);
    assert!(registry_is_down(&host));
    let before_restart = daemon.log().len();
    daemon.restart().unwrap();
    containerd.start_again(true).unwrap();

    let mut cmd = vec![
        "run".to_string(),
        "--rm".into(),
        "--snapshotter".into(),
        "lazysnap".into(),
        converted.clone(),
        "offline-1".into(),
        "/bin/busybox".into(),
        "sha256sum".into(),
    ];
    cmd.extend(expected.keys().cloned());
    let started = Instant::now();
    let out = containerd.ctr(&cmd);
    let log = daemon.log()[before_restart..].to_string();
    let out = out.unwrap_or_else(|e| panic!("no container without the registry: {e}\nlog:\n{log}"));
    eprintln!(
        "container ran {:?} after the restart, without the registry",
        started.elapsed()
    );
    let got: BTreeMap<String, String> = out
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, path)| (path.trim().to_string(), sum.to_string()))
        .collect();
    assert_eq!(got, expected, "files read back differ; log:\n{log}");
    assert_eq!(restored_offline(&log), 2, "{log}");
    assert!(!log.contains("not restored now"), "{log}");
    assert!(
        !log.contains("did not serve a read of a layer restored"),
        "{log}"
    );
    assert!(registry_is_down(&host));
    // The restored layers are still wholly local.
    let status = daemon::observe::fetch_status(&daemon.root).await.unwrap();
    assert_eq!(status.layers.len(), 2, "{status:?}");
    assert!(
        status
            .layers
            .iter()
            .all(|l| l.local_bytes == l.total_bytes && l.fetch_errors == 0),
        "{status:?}"
    );

    // Removing the image removes what was kept for its layers, with their chunks.
    containerd
        .ctr(["images", "rm", "--sync", &converted])
        .unwrap();
    assert!(
        testkit::wait_until(Duration::from_secs(30), || kept(&daemon.root).is_empty()),
        "kept after the image was removed: {:?}; log:\n{}",
        kept(&daemon.root),
        daemon.log()
    );
    drop(containerd);
    drop(daemon);
}

/// The mountpoint of the mounted layer that holds `path`.
async fn layer_with(root: &Path, path: &str) -> PathBuf {
    let status = daemon::observe::fetch_status(root).await.unwrap();
    status
        .layers
        .iter()
        .map(|l| PathBuf::from(&l.mountpoint))
        .find(|m| m.join(path).exists())
        .unwrap_or_else(|| panic!("no mounted layer holds {path}: {status:?}"))
}

/// Reads `path` on a blocking thread; returns what it gave and how long it took.
async fn timed_read(path: PathBuf) -> (std::io::Result<Vec<u8>>, Duration) {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let read = std::fs::read(&path);
        (read, started.elapsed())
    })
    .await
    .unwrap()
}

/// Part of a layer local, lazysnapd restarted (its fd holder keeps the mounts) with the
/// registry down: restored from the kept metadata, the local file reads, the missing one
/// fails with EIO within `fetch_timeout_sec`, and once the registry is back (same
/// storage, same port) the same read works, with no restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_that_needs_a_registry_that_is_down_fails_in_time_and_works_once_it_is_back() {
    let name = "a_read_that_needs_a_registry_that_is_down_fails_in_time_and_works_once_it_is_back";
    if testkit::skip_unless_root(name) {
        return;
    }
    const BOUND: Duration = Duration::from_secs(3);
    const MARGIN: Duration = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    let registry_dir = dir.path().join("registry");
    let registry = Registry::start(&registry_dir).unwrap();
    let host = registry.host.clone();
    // Nothing fetched but what is read: no background fetch, no neighbours of a miss.
    let mut daemon = start_lazysnapd(
        dir.path(),
        &format!(
            "[lazy]\nbackground_fetch = false\nneighbour_fetch_kb = 0\nfetch_timeout_sec = {}\n",
            BOUND.as_secs()
        ),
    );
    let containerd = containerd_for(&daemon);
    let missing = noise(2 << 20, 41);
    let image = ImageBuilder::new()
        .entries(&busybox_entries().unwrap())
        .unwrap()
        .entries(&[
            Entry::dir("app"),
            Entry::file("app/local.txt", "read before the restart\n"),
            Entry::file("app/missing.bin", missing.clone()),
        ])
        .unwrap()
        .cmd(&["/bin/cat", "/app/local.txt"])
        .build()
        .unwrap();
    let plain = registry.push("offline/partial", "plain", &image).unwrap();
    let converted = format!("{host}/offline/partial:estargz");
    convert(&plain, &converted, &["--estargz"]);
    rpull_lazily(&converted, &containerd).await;
    // busybox whole and the local file: what the container after the restart needs.
    let out = containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            &converted,
            "partial-1",
            "/bin/sh",
            "-c",
            "cat /bin/busybox >/dev/null && cat /app/local.txt",
        ])
        .unwrap();
    assert_eq!(out, "read before the restart\n");
    assert!(testkit::wait_until(Duration::from_secs(10), || kept(
        &daemon.root
    )
    .len()
        == 2));

    // Restart lazysnapd with the registry down; the fd holder keeps the layers mounted.
    assert!(daemon.stop().unwrap().success());
    drop(registry);
    assert!(registry_is_down(&host));
    let before_restart = daemon.log().len();
    daemon.restart().unwrap();
    let restored = testkit::wait_until(Duration::from_secs(30), || {
        daemon.log()[before_restart..]
            .matches("layer opened from its kept metadata, without the registry")
            .count()
            == 2
    });
    let log = daemon.log()[before_restart..].to_string();
    assert!(restored, "not restored from the kept metadata; log:\n{log}");
    assert!(
        log.contains("took over the FUSE connection"),
        "the held connections were not taken over; log:\n{log}"
    );

    // The local file: a new container reads it without the registry.
    let out = containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            &converted,
            "partial-2",
        ])
        .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", daemon.log()));
    assert_eq!(out, "read before the restart\n");

    // The missing file: EIO, within the bound.
    let mountpoint = layer_with(&daemon.root, "app/missing.bin").await;
    let (read, took) = timed_read(mountpoint.join("app/missing.bin")).await;
    eprintln!("read of a chunk with the registry down failed after {took:?}: {read:?}");
    let err = read.expect_err("read a file that is not local with the registry down");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        took < BOUND + MARGIN,
        "the read waited {took:?}, bound {BOUND:?}"
    );
    // A registry that refuses connections fails the read before the bound: the client's
    // few quick retries, once (the kernel's second try fails at once).
    assert!(took < BOUND, "a refused connection waited {took:?}");
    // Inside a container too.
    let failed = containerd.ctr([
        "run",
        "--rm",
        "--snapshotter",
        "lazysnap",
        &converted,
        "partial-3",
        "/bin/cat",
        "/app/missing.bin",
    ]);
    let failed = failed.expect_err("a container read a file that is not local");
    assert!(
        failed.to_string().contains("Input/output error"),
        "{failed}\nlog:\n{}",
        daemon.log()
    );
    let log = daemon.log();
    let digest_named = log.lines().any(|l| {
        l.contains("did not serve a read of a layer restored from its kept metadata")
            && l.contains("sha256:")
            && l.contains(&host)
            && l.contains("onnect")
    });
    assert!(
        digest_named,
        "no log line naming the layer and the registry's error:\n{log}"
    );

    // The registry back, same storage and port: the same read works, no restart.
    let registry = Registry::start_with(
        &registry_dir,
        &RegistryOptions {
            listen: Some(host.clone()),
            ..RegistryOptions::default()
        },
    )
    .unwrap();
    // (A read that starts within this long of a failed one fails with it, so that the
    // kernel's immediate second try of a failed read-ahead does not wait again.)
    tokio::time::sleep(snapshotter::fuse_mounter::FAILURE_HOLD).await;
    let (read, took) = timed_read(mountpoint.join("app/missing.bin")).await;
    eprintln!("read with the registry back took {took:?}");
    let read = read.unwrap_or_else(|e| panic!("{e}; log:\n{}", daemon.log()));
    assert!(read == missing, "the file read back differs");
    let out = containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            &converted,
            "partial-4",
            "/bin/busybox",
            "sha256sum",
            "/app/missing.bin",
        ])
        .unwrap();
    assert!(
        out.starts_with(sha256_digest(&missing).trim_start_matches("sha256:")),
        "{out}"
    );
    drop(containerd);
    drop(daemon);
    drop(registry);
}
