//! Ordinary gzip images pulled lazily through SOCI indexes, with real parts: a plain
//! image pushed to docker-registry, indexed by `lazysnap convert --soci` (v2: the image
//! manifest annotated; v1: found through the referrers tag schema, which this registry
//! needs), pulled through containerd, served by lazysnapd over FUSE, run by runc. Every
//! file reads back as pushed; the registry serves the spans the command reads, not the
//! layers. A SOCI
//! index whose zTOC is not one gets its layer an ordinary pull, and the image still runs;
//! a layer the index has no zTOC for is fetched whole and indexed by lazysnapd.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::collections::BTreeMap;

use common::{convert, file_digests, layers_of, rpull_options, start_lazysnapd};
use daemon::rpull::{LayerOutcome, rpull};
use testkit::containerd::{Containerd, ContainerdOptions};
use testkit::image::{Entry, ImageBuilder, busybox_entries, noise};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::{Registry, bytes_served};

struct Setup {
    registry: Registry,
    daemon: Lazysnapd,
    containerd: Containerd,
    _dir: tempfile::TempDir,
}

fn setup(name: &str) -> Option<Setup> {
    if testkit::skip_unless_root(name) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    // No background fetch: what the registry serves is what the container read.
    let daemon = start_lazysnapd(dir.path(), "[lazy]\nbackground_fetch = false\n");
    let containerd = Containerd::start_with(
        &ContainerdOptions::default().proxy_snapshotter("lazysnap", &daemon.address),
    )
    .unwrap();
    Some(Setup {
        registry,
        daemon,
        containerd,
        _dir: dir,
    })
}

/// A plain image's layers: two over soci's 10 MiB minimum (busybox with data no one
/// reads; an app layer with a small file the command prints and a big one), and a small
/// one soci gives no zTOC.
fn plain_layers() -> [Vec<Entry>; 3] {
    let mut base = busybox_entries().unwrap();
    base.push(Entry::dir("usr"));
    base.push(Entry::dir("usr/share"));
    base.push(Entry::file("usr/share/base-data.bin", noise(12 << 20, 21)));
    let app = vec![
        Entry::dir("app"),
        Entry::file("app/motd", "served-through-soci\n"),
        Entry::file("app/big.bin", noise(16 << 20, 22)),
        Entry::file("app/small.txt", "a small file beside the big one\n"),
    ];
    let small = vec![
        Entry::dir("etc"),
        Entry::file("etc/small-layer.conf", noise(100_000, 23)),
    ];
    [base, app, small]
}

/// The image of [`plain_layers`] (the same bytes every time: nothing in it varies).
fn plain_image() -> testkit::image::Image {
    let [base, app, small] = plain_layers();
    ImageBuilder::new()
        .entries(&base)
        .unwrap()
        .entries(&app)
        .unwrap()
        .entries(&small)
        .unwrap()
        .cmd(&["/bin/cat", "/app/motd"])
        .build()
        .unwrap()
}

/// Pushes [`plain_image`] as `REPO:plain`; returns its reference and the sha256 of every
/// regular file by path.
fn push_plain_image(registry: &Registry, repo: &str) -> (String, BTreeMap<String, String>) {
    let mut digests = BTreeMap::new();
    for layer in plain_layers() {
        file_digests(&layer, &mut digests);
    }
    (
        registry.push(repo, "plain", &plain_image()).unwrap(),
        digests,
    )
}

/// Pulls `reference` (every layer must be mounted lazily), runs its command, checks the
/// registry served little of each layer, then reads every file back in a container.
async fn pull_run_and_read_back(s: &Setup, reference: &str, files: &BTreeMap<String, String>) {
    // Indexing downloaded the layers: count only what is served from here on.
    let logged_before = s.registry.log().len();
    let report = rpull(reference, &rpull_options(&s.containerd))
        .await
        .unwrap();
    for layer in &report.layers {
        assert_eq!(
            layer.outcome,
            LayerOutcome::Lazy,
            "layer {} was not mounted lazily; lazysnapd log:\n{}",
            layer.digest,
            s.daemon.log()
        );
    }
    assert!(
        s.daemon.log().contains("through its SOCI index sha256:"),
        "{}",
        s.daemon.log()
    );
    // Status says how each layer is read.
    let status = daemon::observe::fetch_status(&s.daemon.root).await.unwrap();
    let formats: Vec<&str> = status.layers.iter().map(|l| l.format.as_str()).collect();
    assert!(
        !formats.is_empty() && formats.iter().all(|f| *f == "SOCI"),
        "{formats:?}"
    );
    let out = s
        .containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            reference,
            "soci-1",
        ])
        .unwrap();
    assert!(
        out.contains("served-through-soci"),
        "the command printed {out:?}; lazysnapd log:\n{}",
        s.daemon.log()
    );
    let log = s.registry.log();
    let log = &log[logged_before..];
    // The small layer has no zTOC: lazysnapd fetched it whole and indexed it itself.
    assert!(
        s.daemon.log().contains("fetched whole"),
        "{}",
        s.daemon.log()
    );
    for (digest, size) in layers_of(reference).await {
        if size < 10 << 20 {
            continue;
        }
        let served = bytes_served(log, &digest);
        eprintln!(
            "layer {digest}: {served} of {size} compressed bytes served before the first output ({:.1}%)",
            served as f64 * 100.0 / size as f64
        );
        // A read fetches its whole span (2 MiB of tar, here about as much compressed):
        // a few of a layer's six or more spans.
        assert!(
            served * 2 < size,
            "layer {digest}: {served} of {size} bytes served"
        );
    }
    let paths: Vec<&str> = files.keys().map(String::as_str).collect();
    let mut args = vec![
        "run",
        "--rm",
        "--snapshotter",
        "lazysnap",
        reference,
        "soci-2",
        "/bin/sha256sum",
    ];
    args.extend(&paths);
    let out = s.containerd.ctr(args).unwrap();
    let got: BTreeMap<String, String> = out
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, path)| (path.to_string(), sum.to_string()))
        .collect();
    assert_eq!(&got, files, "files read through the SOCI layers differ");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gzip_image_indexed_as_soci_v2_is_pulled_lazily_and_reads_back() {
    let Some(s) = setup("a_gzip_image_indexed_as_soci_v2_is_pulled_lazily_and_reads_back") else {
        return;
    };
    let (plain, files) = push_plain_image(&s.registry, "app/soci2");
    let indexed = format!("{}/app/soci2:soci", s.registry.host);
    convert(&plain, &indexed, &["--soci"]);
    // The layers are the plain image's own: nothing was recompressed.
    assert_eq!(layers_of(&indexed).await, layers_of(&plain).await);
    pull_run_and_read_back(&s, &indexed, &files).await;
    // The local copy of the small layer goes when the layer is unmounted.
    let local = s.daemon.root.join("local-layers");
    let copies = || std::fs::read_dir(&local).map_or(0, |d| d.count());
    assert_eq!(copies(), 1);
    s.containerd
        .ctr(["image", "rm", "--sync", indexed.as_str()])
        .unwrap();
    assert!(
        testkit::wait_until(std::time::Duration::from_secs(30), || copies() == 0),
        "the local copy outlived its layer"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_soci_v1_index_is_found_through_referrers_and_the_image_keeps_its_digest() {
    let Some(s) =
        setup("a_soci_v1_index_is_found_through_referrers_and_the_image_keeps_its_digest")
    else {
        return;
    };
    let (plain, files) = push_plain_image(&s.registry, "app/soci1");
    let client = registry::Client::new(registry::RegistryConfig::default()).unwrap();
    let before = client
        .resolve(&plain.parse().unwrap())
        .await
        .unwrap()
        .digest;
    convert(&plain, &plain, &["--soci", "--soci-version", "v1"]);
    let after = client
        .resolve(&plain.parse().unwrap())
        .await
        .unwrap()
        .digest;
    assert_eq!(before, after, "a v1 index leaves the image as it was");
    // docker-registry 2.8 has no referrers API: the index is listed under the tag schema.
    let reference: registry::Reference = plain.parse().unwrap();
    let referrers = client
        .referrers(
            &reference.repository,
            &after,
            Some("application/vnd.amazon.soci.index.v1+json"),
        )
        .await
        .unwrap();
    assert_eq!(referrers.len(), 1, "{referrers:?}");
    pull_run_and_read_back(&s, &plain, &files).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_soci_index_whose_ztoc_is_not_one_gets_an_ordinary_pull() {
    let Some(s) = setup("a_soci_index_whose_ztoc_is_not_one_gets_an_ordinary_pull") else {
        return;
    };
    let (plain, files) = push_plain_image(&s.registry, "app/bad");
    let client = registry::Client::new(registry::RegistryConfig::default()).unwrap();
    let reference: registry::Reference = plain.parse().unwrap();
    let repo = &reference.repository;
    let image = client.resolve(&reference).await.unwrap();
    // A v1 index naming, for the app layer, a zTOC that is bytes of noise.
    let junk = bytes::Bytes::from(noise(50_000, 5));
    let junk_digest = registry::Digest::sha256_of(&junk);
    client
        .push_blob(repo, &junk_digest, junk.clone(), None)
        .await
        .unwrap();
    let empty = bytes::Bytes::from_static(b"{}");
    let empty_digest = registry::Digest::sha256_of(&empty);
    client
        .push_blob(repo, &empty_digest, empty, None)
        .await
        .unwrap();
    let app_layer = &image.manifest.layers[1];
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.amazon.soci.index.v1+json",
                   "digest": empty_digest.to_string(), "size": 2},
        "layers": [{"mediaType": "application/octet-stream",
                    "digest": junk_digest.to_string(), "size": junk.len(),
                    "annotations": {"com.amazon.soci.image-layer-digest": app_layer.digest.to_string()}}],
        "subject": {"mediaType": image.media_type, "digest": image.digest.to_string(),
                    "size": image.bytes.len()},
    });
    let index = bytes::Bytes::from(serde_json::to_vec(&index).unwrap());
    let index_digest = registry::Digest::sha256_of(&index);
    client
        .push_manifest(
            repo,
            &index_digest.to_string(),
            "application/vnd.oci.image.manifest.v1+json",
            index.clone(),
        )
        .await
        .unwrap();
    let listing = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": index_digest.to_string(), "size": index.len(),
                       "artifactType": "application/vnd.amazon.soci.index.v1+json"}],
    });
    let tag = registry::Client::referrers_tag_of(&image.digest);
    client
        .push_manifest(
            repo,
            &tag,
            "application/vnd.oci.image.index.v1+json",
            serde_json::to_vec(&listing).unwrap().into(),
        )
        .await
        .unwrap();

    let report = rpull(&plain, &rpull_options(&s.containerd)).await.unwrap();
    let outcome = |digest: &registry::Digest| {
        report
            .layers
            .iter()
            .find(|l| l.digest == digest.to_string())
            .map(|l| l.outcome)
    };
    assert_eq!(
        outcome(&app_layer.digest),
        Some(LayerOutcome::Downloaded),
        "{report:?}"
    );
    let log = s.daemon.log();
    assert!(
        log.contains(&format!("zTOC {junk_digest}")),
        "no log line names the zTOC:\n{log}"
    );
    // The base layer has no zTOC in that index: lazysnapd fetches it whole and indexes
    // it itself, so it is mounted lazily all the same.
    assert_eq!(
        outcome(&image.manifest.layers[0].digest),
        Some(LayerOutcome::Lazy)
    );
    let out = s
        .containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            plain.as_str(),
            "bad-1",
            "/bin/sha256sum",
            "/app/big.bin",
        ])
        .unwrap();
    assert!(out.contains(&files["/app/big.bin"]), "{out}");
}

/// An image indexed by soci's own code (its `soci` package's `Convert`, built outside
/// this repository as a test peer; LAZYSNAP_SOCI_REF names the binary, whose
/// `index-build LAYOUT MANIFEST_DIGEST OUTDIR` writes every blob and manifest it makes as
/// OUTDIR/sha256:<hex>) mounts lazily and reads back. Unset, the test says so and passes.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_indexed_by_socis_own_code_mounts_lazily_and_reads_back() {
    let Some(peer) = std::env::var_os("LAZYSNAP_SOCI_REF") else {
        eprintln!("skipped: LAZYSNAP_SOCI_REF does not name soci's reference binary");
        return;
    };
    let Some(s) = setup("an_image_indexed_by_socis_own_code_mounts_lazily_and_reads_back") else {
        return;
    };
    let (_, files) = push_plain_image(&s.registry, "app/ref");
    let image = plain_image();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    image.write_oci_layout(&layout, Some("plain")).unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let digest = image.manifest_descriptor()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let run = std::process::Command::new(peer)
        .arg("index-build")
        .arg(&layout)
        .arg(&digest)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "soci: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    // Blobs first, then manifests by digest, the OCI index last under a tag.
    let client = registry::Client::new(registry::RegistryConfig::default()).unwrap();
    let reference: registry::Reference = format!("{}/app/ref:soci-ref", s.registry.host)
        .parse()
        .unwrap();
    let repo = &reference.repository;
    let mut manifests = Vec::new();
    let mut top = None;
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        let bytes = bytes::Bytes::from(std::fs::read(&path).unwrap());
        let digest = registry::Digest::sha256_of(&bytes);
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(str::to_string));
        match media_type.as_deref() {
            Some("application/vnd.oci.image.index.v1+json") => top = Some(bytes),
            Some(m) if m.ends_with("manifest.v1+json") => {
                manifests.push((digest, m.to_string(), bytes))
            }
            _ => {
                client.push_blob(repo, &digest, bytes, None).await.unwrap();
            }
        }
    }
    for blob in image.blobs() {
        let digest: registry::Digest = format!("sha256:{}", blob.hex()).parse().unwrap();
        client
            .push_blob(repo, &digest, blob.data.clone().into(), None)
            .await
            .unwrap();
    }
    for (digest, media_type, bytes) in manifests {
        client
            .push_manifest(repo, &digest.to_string(), &media_type, bytes)
            .await
            .unwrap();
    }
    client
        .push_manifest(
            repo,
            "soci-ref",
            "application/vnd.oci.image.index.v1+json",
            top.unwrap(),
        )
        .await
        .unwrap();
    pull_run_and_read_back(&s, &reference.to_string(), &files).await;
}

/// `lazysnap optimize --soci`: the command's reads become a prefetch artifact per layer
/// in the SOCI index (the layers untouched), and a fresh node prefetches those spans: the
/// container's reads then need nothing more from the registry.
#[tokio::test(flavor = "multi_thread")]
async fn optimize_with_soci_writes_prefetch_artifacts_that_a_fresh_node_prefetches() {
    let Some(first) = setup("optimize_with_soci_writes_prefetch_artifacts") else {
        return;
    };
    const MIB: usize = 1 << 20;
    let cmd = "cat /app/small; dd if=/app/big bs=4096 skip=1536 count=64 2>/dev/null | sha256sum";
    let big = noise(16 * MIB, 31);
    let image = ImageBuilder::new()
        .entries(&busybox_entries().unwrap())
        .unwrap()
        .entries(&[
            Entry::dir("app"),
            Entry::file("app/small", "hello from small\n"),
            Entry::file("app/big", big.clone()),
            Entry::file("app/unread", noise(4 * MIB, 32)),
        ])
        .unwrap()
        .cmd(&["/bin/sh", "-c", cmd])
        .build()
        .unwrap();
    let src = first.registry.push("app/sociopt", "plain", &image).unwrap();
    let dst = format!("{}/app/sociopt:optimized", first.registry.host);
    let out = std::process::Command::new(common::LAZYSNAP)
        .arg("optimize")
        .arg("--address")
        .arg(first.containerd.address())
        .args(["--namespace", first.containerd.namespace()])
        .args(["--snapshotter", "lazysnap"])
        .arg("--root")
        .arg(&first.daemon.root)
        .args(["--soci", "--no-progress-bars", &src, &dst])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "optimize failed: {}\nlazysnapd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        first.daemon.log()
    );

    // The index lists a prefetch artifact for the app layer: some of its spans, not all.
    let client = registry::Client::new(registry::RegistryConfig::default()).unwrap();
    let reference: registry::Reference = dst.parse().unwrap();
    let repo = &reference.repository;
    let top = client.fetch_manifest(repo, "optimized").await.unwrap();
    let top: serde_json::Value = serde_json::from_slice(&top.bytes).unwrap();
    let index_digest = top["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["artifactType"] == "application/vnd.amazon.soci.index.v2+json")
        .and_then(|m| m["digest"].as_str())
        .unwrap()
        .to_string();
    let index = client.fetch_manifest(repo, &index_digest).await.unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index.bytes).unwrap();
    let artifacts: Vec<&serde_json::Value> = index["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["mediaType"] == soci::prefetch_artifact::MEDIA_TYPE)
        .collect();
    assert!(!artifacts.is_empty(), "{index}");
    let app_layer = client.resolve(&reference).await.unwrap().manifest.layers[1]
        .digest
        .to_string();
    let app = artifacts
        .iter()
        .find(|a| a["annotations"]["com.amazon.soci.image-layer-digest"] == app_layer.as_str())
        .unwrap_or_else(|| panic!("no prefetch artifact for the app layer: {index}"));
    let digest: registry::Digest = app["digest"].as_str().unwrap().parse().unwrap();
    let spans =
        soci::prefetch_artifact::decode(&client.fetch_blob(repo, &digest, 1 << 20).await.unwrap())
            .unwrap();
    let listed: u32 = spans.iter().map(|r| r.end() - r.start() + 1).sum();
    assert!((1..=3).contains(&listed), "{spans:?}");
    // A fresh node (the same registry) prefetches them; the command's reads then fetch
    // nothing more.
    let Setup {
        registry,
        daemon,
        containerd,
        _dir,
    } = first;
    drop((containerd, daemon));
    let node_dir = tempfile::tempdir().unwrap();
    let daemon = start_lazysnapd(node_dir.path(), "[lazy]\nbackground_fetch = false\n");
    let containerd = Containerd::start_with(
        &ContainerdOptions::default().proxy_snapshotter("lazysnap", &daemon.address),
    )
    .unwrap();
    let second = Setup {
        registry,
        daemon,
        containerd,
        _dir,
    };
    let report = rpull(&dst, &rpull_options(&second.containerd))
        .await
        .unwrap();
    assert!(
        report
            .layers
            .iter()
            .all(|l| l.outcome == LayerOutcome::Lazy),
        "{report:?}"
    );
    let root = second.daemon.root.clone();
    let prefetched = tokio::task::spawn_blocking(move || {
        testkit::wait_until(std::time::Duration::from_secs(30), || {
            let status = tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(daemon::observe::fetch_status(&root));
            status.is_ok_and(|s| s.layers.iter().all(|l| l.prefetch_done))
        })
    })
    .await
    .unwrap();
    assert!(prefetched, "prefetch did not finish");
    let fetched = |status: &daemon::observe::Status| -> u64 {
        status
            .layers
            .iter()
            .filter(|l| l.layer == app_layer)
            .map(|l| l.fetched_bytes)
            .sum()
    };
    let before = fetched(
        &daemon::observe::fetch_status(&second.daemon.root)
            .await
            .unwrap(),
    );
    assert!(before > 0, "nothing of the app layer was prefetched");
    let printed = second
        .containerd
        .ctr(["run", "--rm", "--snapshotter", "lazysnap", &dst, "opt-1"])
        .unwrap();
    assert!(printed.contains("hello from small"), "{printed}");
    let want = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(&big[1536 * 4096..1600 * 4096]))
    };
    assert!(printed.contains(&want), "{printed}");
    let after = fetched(
        &daemon::observe::fetch_status(&second.daemon.root)
            .await
            .unwrap(),
    );
    assert_eq!(before, after, "the command read what was not prefetched");
}
