//! Lazy pulling end to end with real parts: an image converted to eStargz / zstd:chunked
//! by `lazysnap convert`, pulled through containerd with remote-snapshot labels (by our
//! rpull and by stargz-snapshotter's ctr-remote), served by lazysnapd over FUSE, run by
//! runc; the registry serves only a small part of each layer before the first output.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::process::Command;
use std::time::Duration;

use common::{LAZYSNAP, convert, layers_of, rpull_options, start_lazysnapd};
use daemon::rpull::{LayerOutcome, rpull};
use testkit::containerd::{Containerd, ContainerdOptions, mounts_under};
use testkit::image::noise;
use testkit::image::{Entry, ImageBuilder, busybox_entries};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::Registry;
use testkit::registry::bytes_served;

fn http_get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    out
}

struct Setup {
    metrics: String,
    registry: Registry,
    daemon: Lazysnapd,
    containerd: Containerd,
    // Last: removed after everything that lives in it has stopped.
    _dir: tempfile::TempDir,
}

fn setup(name: &str) -> Option<Setup> {
    if testkit::skip_unless_root(name) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    // No background fetch: what the registry serves is what the container read.
    let metrics = format!("127.0.0.1:{}", testkit::free_port());
    let daemon = start_lazysnapd(
        dir.path(),
        &format!("metrics_address = \"{metrics}\"\n[lazy]\nbackground_fetch = false\n"),
    );
    let containerd = Containerd::start_with(
        &ContainerdOptions::default()
            .proxy_snapshotter("lazysnap", &daemon.address)
            .proxy_snapshotter("stargz", &daemon.address),
    )
    .unwrap();
    Some(Setup {
        _dir: dir,
        metrics,
        registry,
        daemon,
        containerd,
    })
}

/// A base layer (busybox and data no one reads, as a real base image has) and an app layer
/// with a small file the command reads and a big one it does not.
fn push_app_image(registry: &Registry, repo: &str) -> String {
    let mut base = busybox_entries().unwrap();
    base.push(Entry::dir("usr"));
    base.push(Entry::dir("usr/share"));
    base.push(Entry::file("usr/share/base-data.bin", noise(12 << 20, 11)));
    let image = ImageBuilder::new()
        .entries(&base)
        .unwrap()
        .entries(&[
            Entry::dir("app"),
            Entry::file("app/motd", "served-lazily\n"),
            Entry::file("app/big.bin", noise(24 << 20, 7)),
        ])
        .unwrap()
        .cmd(&["/bin/cat", "/app/motd"])
        .build()
        .unwrap();
    registry.push(repo, "plain", &image).unwrap()
}

async fn lazy_pull_and_run(s: &Setup, reference: &str) {
    let report = rpull(reference, &rpull_options(&s.containerd))
        .await
        .unwrap();
    for layer in &report.layers {
        assert_ne!(
            layer.outcome,
            LayerOutcome::Downloaded,
            "layer {} was not mounted lazily; lazysnapd log:\n{}",
            layer.digest,
            s.daemon.log()
        );
    }
    assert_runs(s, "lazysnap", reference, "lazy-1");

    // The container ran busybox and read a tiny file: each layer stayed mostly remote.
    let log = s.registry.log();
    for (digest, size) in layers_of(reference).await {
        let served = bytes_served(&log, &digest);
        eprintln!(
            "layer {digest}: {served} of {size} compressed bytes served before the first output ({:.1}%)",
            served as f64 * 100.0 / size as f64
        );
        assert!(
            served * 4 < size,
            "layer {digest}: {served} of {size} bytes served before the first output"
        );
    }
    // A file read through FUSE matches what was pushed, byte for byte.
    let out = s
        .containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            reference,
            "lazy-2",
            "/bin/sh",
            "-c",
            "sha256sum /app/big.bin",
        ])
        .unwrap();
    let want = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(noise(24 << 20, 7)))
    };
    assert!(
        out.contains(&want),
        "big file read through FUSE differs: {out}"
    );
}

/// Runs the app image's command on `snapshotter` and checks it printed what it reads.
fn assert_runs(s: &Setup, snapshotter: &str, reference: &str, name: &str) {
    let out = s
        .containerd
        .ctr(["run", "--rm", "--snapshotter", snapshotter, reference, name])
        .unwrap();
    assert!(
        out.contains("served-lazily"),
        "container {name} printed {out:?}"
    );
}

async fn remove_and_check_clean(s: &Setup, reference: &str) {
    s.containerd
        .ctr(["image", "rm", "--sync", reference])
        .unwrap();
    let clean = testkit::wait_until(Duration::from_secs(30), || {
        mounts_under(&s.daemon.root).is_empty()
            && std::fs::read_dir(s.daemon.root.join("snapshots")).map_or(0, |d| d.count()) == 0
    });
    assert!(clean, "left mounted: {:?}", mounts_under(&s.daemon.root));
}

#[tokio::test(flavor = "multi_thread")]
async fn estargz_image_is_pulled_lazily_and_runs() {
    let Some(mut s) = setup("estargz_image_is_pulled_lazily_and_runs") else {
        return;
    };
    let plain = push_app_image(&s.registry, "app/esgz");
    let converted = format!("{}/app/esgz:estargz", s.registry.host);
    convert(&plain, &converted, &["--estargz"]);
    lazy_pull_and_run(&s, &converted).await;

    // Status and metrics show the mounted layers and what they fetched.
    let status = daemon::observe::fetch_status(&s.daemon.root).await.unwrap();
    assert!(status.lazy_pulling);
    assert_eq!(status.layers.len(), 2, "{status:?}");
    for layer in &status.layers {
        assert!(
            layer.fetched_bytes > 0 && layer.local_bytes <= layer.total_bytes,
            "{layer:?}"
        );
        assert_eq!(layer.verification_failures, 0);
    }
    let metrics = http_get(&s.metrics, "/metrics");
    assert!(metrics.contains("lazysnap_mounted_layers 2"), "{metrics}");
    assert!(
        metrics.contains("lazysnap_fetched_bytes_total{layer=\"sha256:"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lazysnap_snapshots{kind=\"committed\"} 2"),
        "{metrics}"
    );
    // Reading the files went through FUSE reads, which were timed.
    let reads = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("lazysnap_fuse_operation_duration_seconds_count{op=\"read\"} ")
        })
        .and_then(|n| n.parse::<u64>().ok());
    assert!(reads.is_some_and(|n| n > 0), "{metrics}");

    // lazysnapd restarts: SIGTERM leaves the layers mounted (the fd holder keeps their
    // connections) and the new daemon takes them over; no new pull needed.
    let mounted = mounts_under(&s.daemon.root);
    assert_eq!(mounted.len(), 2, "{mounted:?}");
    s.daemon.stop().unwrap();
    assert_eq!(
        mounts_under(&s.daemon.root),
        mounted,
        "SIGTERM must leave the layers to the fd holder"
    );
    s.daemon.restart().unwrap();
    let ran = s.containerd.runs_and_prints(
        "lazysnap",
        &converted,
        "after-restart",
        "served-lazily",
        Duration::from_secs(30),
    );
    assert!(ran, "no container after restart; log:\n{}", s.daemon.log());
    remove_and_check_clean(&s, &converted).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn zstd_chunked_image_is_pulled_lazily_and_runs() {
    let Some(s) = setup("zstd_chunked_image_is_pulled_lazily_and_runs") else {
        return;
    };
    let plain = push_app_image(&s.registry, "app/zstd");
    let converted = format!("{}/app/zstd:zstdchunked", s.registry.host);
    convert(&plain, &converted, &["--zstdchunked"]);
    // Through the CLI this time: `lazysnap rpull` and `lazysnap status`.
    let out = Command::new(LAZYSNAP)
        .arg("rpull")
        .arg("--address")
        .arg(s.containerd.address())
        .args(["--namespace", s.containerd.namespace(), &converted])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rpull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches(" lazy ").count(),
        2,
        "both layers lazy:\n{stdout}"
    );
    let out = Command::new(LAZYSNAP)
        .arg("status")
        .arg("--root")
        .arg(&s.daemon.root)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        status.contains("lazy pulling on") && status.contains(&converted),
        "{status}"
    );
    lazy_pull_and_run(&s, &converted).await;
    remove_and_check_clean(&s, &converted).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_gzip_image_falls_back_and_runs() {
    let Some(s) = setup("plain_gzip_image_falls_back_and_runs") else {
        return;
    };
    let plain = push_app_image(&s.registry, "app/plain");
    let report = rpull(&plain, &rpull_options(&s.containerd)).await.unwrap();
    assert!(
        report
            .layers
            .iter()
            .all(|l| l.outcome == LayerOutcome::Downloaded),
        "{report:?}"
    );
    assert!(
        s.daemon.log().contains("lazy pull not possible"),
        "no fallback reason logged"
    );
    assert_runs(&s, "lazysnap", &plain, "plain-1");
    remove_and_check_clean(&s, &plain).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ctr_remote_rpull_works_unchanged() {
    let Some(s) = setup("ctr_remote_rpull_works_unchanged") else {
        return;
    };
    testkit::require_program("ctr-remote", "stargz-snapshotter").unwrap();
    let plain = push_app_image(&s.registry, "app/ctrremote");
    let converted = format!("{}/app/ctrremote:estargz", s.registry.host);
    convert(&plain, &converted, &["--estargz"]);
    // ctr-remote's default snapshotter name is `stargz`; containerd knows lazysnapd by it too.
    let out = Command::new("ctr-remote")
        .arg("--address")
        .arg(s.containerd.address())
        .args([
            "--namespace",
            s.containerd.namespace(),
            "image",
            "rpull",
            "--plain-http",
            &converted,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctr-remote rpull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = s.daemon.log();
    assert!(
        log.contains("layer mounted lazily"),
        "ctr-remote's pull was not lazy; log:\n{log}"
    );
    assert_runs(&s, "stargz", &converted, "ctr-remote-1");
    remove_and_check_clean(&s, &converted).await;
}

/// What README says about crashes: a container running on a lazy layer keeps reading it
/// across a SIGKILL of lazysnapd (the fd holder keeps the connection, the new daemon
/// takes it over), and new containers start at once without pulling again.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_crash_running_containers_keep_their_layers_and_new_ones_start() {
    let Some(mut s) =
        setup("after_a_crash_running_containers_keep_their_layers_and_new_ones_start")
    else {
        return;
    };
    let plain = push_app_image(&s.registry, "app/crash");
    let converted = format!("{}/app/crash:estargz", s.registry.host);
    convert(&plain, &converted, &["--estargz"]);
    let report = rpull(&converted, &rpull_options(&s.containerd))
        .await
        .unwrap();
    assert!(
        report
            .layers
            .iter()
            .all(|l| l.outcome == LayerOutcome::Lazy)
    );
    s.containerd
        .ctr([
            "run",
            "-d",
            "--snapshotter",
            "lazysnap",
            &converted,
            "long",
            "sleep",
            "600",
        ])
        .unwrap();
    let tasks = s.containerd.ctr(["task", "ls"]).unwrap();
    let pid: u32 = tasks
        .lines()
        .find(|l| l.starts_with("long "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid for task long in {tasks}"));
    let rootfs = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/motd")).unwrap(),
        "served-lazily\n"
    );

    s.daemon.kill().unwrap();
    s.daemon.restart().unwrap();

    // A file never read before the crash is fetched by the new daemon, correct.
    let unread = std::fs::read(rootfs.join("app/big.bin")).unwrap();
    assert!(
        unread == noise(24 << 20, 7),
        "app/big.bin differs after the crash"
    );
    assert!(
        s.daemon.log().contains("took over the FUSE connection"),
        "log:\n{}",
        s.daemon.log()
    );
    // New containers work too.
    let ran = s.containerd.runs_and_prints(
        "lazysnap",
        &converted,
        "fresh",
        "served-lazily",
        Duration::from_secs(30),
    );
    assert!(
        ran,
        "no new container after the crash; log:\n{}",
        s.daemon.log()
    );
    s.containerd
        .ctr(["task", "kill", "-s", "SIGKILL", "long"])
        .unwrap();
    let _ = testkit::wait_until(Duration::from_secs(20), || {
        s.containerd.ctr(["task", "rm", "long"]).is_ok()
    });
    s.containerd.ctr(["container", "rm", "long"]).unwrap();
    remove_and_check_clean(&s, &converted).await;
}

/// A client-side `ctr image pull` (1.6's only kind, 2.x's `--local`) passes no labels:
/// the lazy-pullable image is downloaded and unpacked like any other, and runs. containerd
/// 2.x's transfer service passes them, and the same image is mounted lazily.
#[tokio::test(flavor = "multi_thread")]
async fn a_plain_ctr_pull_falls_back_and_a_transfer_service_pull_is_lazy() {
    let Some(s) = setup("a_plain_ctr_pull_falls_back_and_a_transfer_service_pull_is_lazy") else {
        return;
    };
    let plain = push_app_image(&s.registry, "app/nolabels");
    let converted = format!("{}/app/nolabels:estargz", s.registry.host);
    convert(&plain, &converted, &["--estargz"]);
    let v2 = s.containerd.release().is_v2();
    // containerd 2.x's `ctr image pull` goes through the transfer service, which labels
    // the snapshots (the proxy plugin exports enable_remote_snapshot_annotations);
    // `--local`, its client-side pull, does not. 1.6 has only the latter.
    let local: &[&str] = if v2 { &["--local"] } else { &[] };
    let pull = |how: &[&str]| {
        let mut args = vec!["image", "pull", "--plain-http"];
        args.extend_from_slice(how);
        args.extend_from_slice(&["--snapshotter", "lazysnap", &converted]);
        s.containerd.ctr(args).unwrap();
    };
    pull(local);
    assert!(!s.daemon.log().contains("layer mounted lazily"));
    assert_runs(&s, "lazysnap", &converted, "nolabels");
    remove_and_check_clean(&s, &converted).await;
    if v2 {
        pull(&[]);
        assert!(
            s.daemon.log().contains("layer mounted lazily"),
            "the transfer service's pull was not lazy:\n{}",
            s.daemon.log()
        );
        assert_runs(&s, "lazysnap", &converted, "transfer");
        remove_and_check_clean(&s, &converted).await;
    }
}

/// Images converted by stargz-snapshotter's `ctr-remote` (eStargz, and its zstd:chunked
/// form) are pulled lazily by lazysnapd and run.
#[tokio::test(flavor = "multi_thread")]
async fn images_converted_by_ctr_remote_are_pulled_lazily_and_run() {
    let Some(s) = setup("images_converted_by_ctr_remote_are_pulled_lazily_and_run") else {
        return;
    };
    let plain = push_app_image(&s.registry, "app/peer");
    // ctr-remote converts what is in containerd's content store: fetch the plain image there.
    s.containerd
        .ctr(["image", "pull", "--plain-http", &plain])
        .unwrap();
    for (flag, tag) in [("--estargz", "peer-esgz"), ("--zstdchunked", "peer-zstd")] {
        let converted = format!("{}/app/peer:{tag}", s.registry.host);
        testkit::ctr_remote::ctr_remote(
            &s.containerd,
            ["image", "convert", "--oci", flag, &plain, &converted],
        )
        .unwrap();
        s.containerd.push_plain_http(&converted).unwrap();
        // Forget it locally, so that what follows is a real pull from the registry.
        s.containerd
            .ctr(["image", "rm", "--sync", &converted])
            .unwrap();
        lazy_pull_and_run(&s, &converted).await;
        remove_and_check_clean(&s, &converted).await;
    }
    s.containerd.ctr(["image", "rm", "--sync", &plain]).unwrap();
}
