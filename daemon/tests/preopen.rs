//! Pre-opening sibling layers end to end: a multi-layer eStargz image pulled with
//! `rpull` through a real containerd; the layers after the first are mounted from TOCs
//! fetched while the first mounted, each still verified against its own toc.digest label.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::time::Instant;

use common::{containerd_for, convert, rpull_options, start_lazysnapd};
use daemon::rpull::{LayerOutcome, rpull};
use testkit::containerd::Containerd;
use testkit::image::{Blob, Entry, ImageBuilder, busybox_entries, noise};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::Registry;

const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The app layers on top of busybox, each with one file of its own.
const APP_LAYERS: u64 = 3;

struct Setup {
    registry: Registry,
    daemon: Lazysnapd,
    containerd: Containerd,
    // Last: removed after everything that lives in it has stopped.
    _dir: tempfile::TempDir,
}

fn setup(name: &str, preopen_siblings: bool) -> Option<Setup> {
    if testkit::skip_unless_root(name) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    // Debug for the snapshotter: why a pre-opened TOC was not used is logged there.
    let daemon = start_lazysnapd(
        dir.path(),
        &format!(
            "log_level = \"info,snapshotter=debug\"\n[lazy]\nbackground_fetch = false\n\
             preopen_siblings = {preopen_siblings}\n"
        ),
    );
    let containerd = containerd_for(&daemon);
    Some(Setup {
        _dir: dir,
        registry,
        daemon,
        containerd,
    })
}

fn layer_file(i: u64) -> Vec<u8> {
    noise(3 << 20, 100 + i)
}

/// busybox, then `APP_LAYERS` layers with `/lI/data` each, converted to eStargz.
fn push_estargz_image(registry: &Registry, repo: &str) -> String {
    let mut image = ImageBuilder::new()
        .entries(&busybox_entries().unwrap())
        .unwrap();
    for i in 1..=APP_LAYERS {
        let dir = format!("l{i}");
        image = image
            .entries(&[
                Entry::dir(&dir),
                Entry::file(&format!("{dir}/data"), layer_file(i)),
            ])
            .unwrap();
    }
    let image = image
        .cmd(&["/bin/sh", "-c", "sha256sum /l*/data"])
        .build()
        .unwrap();
    let plain = registry.push(repo, "plain", &image).unwrap();
    let converted = format!("{}/{repo}:estargz", registry.host);
    convert(&plain, &converted, &["--estargz"]);
    converted
}

/// The log lines of lazy mounts, in order.
fn mount_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("layer mounted lazily"))
        .collect()
}

/// Seconds since midnight of a log line's RFC 3339 timestamp (`…T03:16:54.123456Z`).
fn seconds_of(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split('T').nth(1)?;
    let mut parts = time.trim_end_matches('Z').split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// Pulls `reference`, checks every layer is lazy, and reports how long the pull and the
/// chain of mounts took (loopback, no delay: what pre-opening saves here is small).
async fn pull_lazily(s: &Setup, reference: &str, what: &str) {
    let started = Instant::now();
    let report = rpull(reference, &rpull_options(&s.containerd))
        .await
        .unwrap();
    let took = started.elapsed();
    for layer in &report.layers {
        assert_eq!(
            layer.outcome,
            LayerOutcome::Lazy,
            "layer {} was not mounted lazily; lazysnapd log:\n{}",
            layer.digest,
            s.daemon.log()
        );
    }
    let log = s.daemon.log();
    let times: Vec<f64> = mount_lines(&log)
        .iter()
        .filter_map(|l| seconds_of(l))
        .collect();
    let gaps: Vec<String> = times
        .windows(2)
        .map(|w| format!("{:.0} ms", (w[1] - w[0]) * 1000.0))
        .collect();
    eprintln!(
        "{what}: rpull of {} layers took {:.0} ms; between consecutive mounts: {}",
        report.layers.len(),
        took.as_secs_f64() * 1000.0,
        gaps.join(", ")
    );
}

/// Runs the image and checks every app layer's file reads back as pushed.
fn assert_runs_and_reads_correct_bytes(s: &Setup, reference: &str, name: &str) {
    let out = s
        .containerd
        .ctr(["run", "--rm", "--snapshotter", "lazysnap", reference, name])
        .unwrap();
    for i in 1..=APP_LAYERS {
        let want = {
            use sha2::Digest;
            format!("{:x}  /l{i}/data", sha2::Sha256::digest(layer_file(i)))
        };
        assert!(out.contains(&want), "/l{i}/data differs: {out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn later_layers_are_mounted_from_preopened_tocs() {
    let Some(s) = setup("later_layers_are_mounted_from_preopened_tocs", true) else {
        return;
    };
    let reference = push_estargz_image(&s.registry, "app/preopen");
    pull_lazily(&s, &reference, "pre-open on").await;

    // The first layer's mount pre-opened the others: each later one used its TOC.
    let log = s.daemon.log();
    let mounts = mount_lines(&log);
    assert_eq!(mounts.len() as u64, APP_LAYERS + 1, "log:\n{log}");
    assert!(mounts[0].contains("preopened=false"), "{}", mounts[0]);
    for line in &mounts[1..] {
        assert!(line.contains("preopened=true"), "{line}\nlog:\n{log}");
    }
    assert!(
        !log.contains("not using the pre-opened TOC"),
        "a matching TOC was refused; log:\n{log}"
    );
    let status = daemon::observe::fetch_status(&s.daemon.root).await.unwrap();
    assert_eq!(status.preopened_mounts, APP_LAYERS, "{status:?}");
    // No pre-open failed (every sibling is eStargz).
    assert!(!log.contains("pre-opening a sibling layer failed"), "{log}");

    assert_runs_and_reads_correct_bytes(&s, &reference, "preopen-1");

    // A plain image publishes no TOC digests: its siblings are not even tried.
    let before = s.daemon.log().matches("pre-opening sibling layers").count();
    let plain = reference.replace(":estargz", ":plain");
    let report = rpull(&plain, &rpull_options(&s.containerd)).await.unwrap();
    assert!(
        report
            .layers
            .iter()
            .all(|l| l.outcome == LayerOutcome::Downloaded),
        "{report:?}"
    );
    let log = s.daemon.log();
    assert_eq!(
        log.matches("pre-opening sibling layers").count(),
        before,
        "{log}"
    );
    assert!(!log.contains("pre-opening a sibling layer failed"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn preopen_siblings_can_be_switched_off() {
    let Some(s) = setup("preopen_siblings_can_be_switched_off", false) else {
        return;
    };
    let reference = push_estargz_image(&s.registry, "app/nopreopen");
    pull_lazily(&s, &reference, "pre-open off").await;
    let log = s.daemon.log();
    let mounts = mount_lines(&log);
    assert_eq!(mounts.len() as u64, APP_LAYERS + 1, "log:\n{log}");
    assert!(
        mounts.iter().all(|l| l.contains("preopened=false")),
        "{log}"
    );
    assert!(!log.contains("pre-opening sibling layers"), "{log}");
    let status = daemon::observe::fetch_status(&s.daemon.root).await.unwrap();
    assert_eq!(status.preopened_mounts, 0);
    assert_runs_and_reads_correct_bytes(&s, &reference, "nopreopen-1");
}

/// The registry's blob is authentic (its digest), but the image vouches for another TOC:
/// the pre-opened TOC is not used, the fresh open's verification fails too, and the layer
/// is downloaded instead. An unverified TOC is never served.
#[tokio::test(flavor = "multi_thread")]
async fn a_preopened_toc_that_does_not_match_the_label_is_not_served() {
    let Some(s) = setup(
        "a_preopened_toc_that_does_not_match_the_label_is_not_served",
        true,
    ) else {
        return;
    };
    let reference = push_estargz_image(&s.registry, "app/tampered");
    // The same image, with layer 2's toc.digest annotation replaced by layer 1's.
    let client = registry::Client::new(registry::RegistryConfig::default()).unwrap();
    let resolved = client.resolve(&reference.parse().unwrap()).await.unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&resolved.bytes).unwrap();
    let toc_of = |m: &serde_json::Value, i: usize| {
        m["layers"][i]["annotations"][TOC_DIGEST]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (wrong, right) = (toc_of(&manifest, 1), toc_of(&manifest, 2));
    manifest["layers"][2]["annotations"][TOC_DIGEST] = wrong.clone().into();
    let tampered_layer = manifest["layers"][2]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = Blob::new(&resolved.media_type, serde_json::to_vec(&manifest).unwrap());
    testkit::registry::push_manifest(&s.registry.host, "app/tampered", "tampered", &blob).unwrap();
    let tampered = format!("{}/app/tampered:tampered", s.registry.host);

    let report = rpull(&tampered, &rpull_options(&s.containerd))
        .await
        .unwrap();
    let log = s.daemon.log();
    for (i, layer) in report.layers.iter().enumerate() {
        let want = if i == 2 {
            LayerOutcome::Downloaded
        } else {
            LayerOutcome::Lazy
        };
        assert_eq!(layer.outcome, want, "layer {i}; log:\n{log}");
    }
    let refused = log
        .lines()
        .find(|l| l.contains("not using the pre-opened TOC"))
        .unwrap_or_else(|| panic!("the pre-opened TOC was not refused; log:\n{log}"));
    assert!(
        refused.contains(&tampered_layer) && refused.contains(&right) && refused.contains(&wrong),
        "{refused}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("lazy pull not possible") && l.contains(&tampered_layer)),
        "the refetched TOC was not verified against the label; log:\n{log}"
    );
    assert!(
        !mount_lines(&log)
            .iter()
            .any(|l| l.contains(&tampered_layer)),
        "{log}"
    );
    // Layers 1 and 3 (after the first) still came from pre-opened TOCs.
    let status = daemon::observe::fetch_status(&s.daemon.root).await.unwrap();
    assert_eq!(status.preopened_mounts, APP_LAYERS - 1, "{status:?}");
    assert_runs_and_reads_correct_bytes(&s, &tampered, "tampered-1");
}
