//! What the daemon's integration tests share: lazysnapd started with a config, the
//! containerd that uses it, `lazysnap convert`, and a pull every layer of which must be
//! mounted lazily.

// Each test binary compiles this module and uses its own part of it.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use daemon::cri::CriClient;
use daemon::rpull::{LayerOutcome, RpullOptions, RpullReport, rpull};
use testkit::containerd::{Containerd, ContainerdOptions, Release};
use testkit::image::{Entry, ImageBuilder, busybox_layer, noise, sha256_digest};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::Registry;

pub const LAZYSNAPD: &str = env!("CARGO_BIN_EXE_lazysnapd");
pub const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

/// Starts lazysnapd with root under `dir/ls` and `config` (TOML) as its config file.
pub fn start_lazysnapd(dir: &Path, config: &str) -> Lazysnapd {
    let path = dir.join("lazysnapd.toml");
    std::fs::write(&path, config).unwrap();
    Lazysnapd::start_with_args(
        Path::new(LAZYSNAPD),
        &dir.join("ls"),
        &["--config", path.to_str().unwrap()],
    )
    .unwrap()
}

/// A containerd whose proxy snapshotter `lazysnap` is `daemon`.
pub fn containerd_for(daemon: &Lazysnapd) -> Containerd {
    Containerd::start_with(
        &ContainerdOptions::default().proxy_snapshotter("lazysnap", &daemon.address),
    )
    .unwrap()
}

/// `lazysnap convert --no-progress-bars EXTRA… SRC DST`, which must succeed.
pub fn convert(src: &str, dst: &str, extra: &[&str]) {
    let out = Command::new(LAZYSNAP)
        .args(["convert", "--no-progress-bars"])
        .args(extra)
        .args([src, dst])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "convert failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `lazysnap rpull` onto the `lazysnap` snapshotter of `containerd`.
pub fn rpull_options(containerd: &Containerd) -> RpullOptions {
    RpullOptions {
        address: containerd.address().to_path_buf(),
        namespace: containerd.namespace().to_string(),
        snapshotter: "lazysnap".into(),
        ..RpullOptions::default()
    }
}

/// Pulls `reference` and checks that every layer was mounted lazily.
pub async fn rpull_lazily(reference: &str, containerd: &Containerd) -> RpullReport {
    let report = rpull(reference, &rpull_options(containerd)).await.unwrap();
    assert!(
        report
            .layers
            .iter()
            .all(|l| l.outcome == LayerOutcome::Lazy),
        "not every layer of {reference} was mounted lazily: {report:?}"
    );
    report
}

/// The (digest, compressed size) of each layer of `reference`, from the registry.
pub async fn layers_of(reference: &str) -> Vec<(String, u64)> {
    let client = registry::Client::new(registry::RegistryConfig::default()).unwrap();
    let resolved = client.resolve(&reference.parse().unwrap()).await.unwrap();
    resolved
        .manifest
        .layers
        .iter()
        .map(|l| (l.digest.to_string(), l.size))
        .collect()
}

/// busybox and a layer with `/app/motd` (the command prints it) and `/app/big.bin`
/// (`big` bytes of noise nobody reads), pushed plain as `REPO:plain` and converted to
/// eStargz as `REPO:estargz` by `lazysnap convert`; returns both references.
pub fn push_busybox_app(
    registry: &Registry,
    repo: &str,
    big: usize,
    seed: u64,
) -> (String, String) {
    let image = ImageBuilder::new()
        .layer(busybox_layer().unwrap())
        .entries(&[
            Entry::dir("app"),
            Entry::file("app/motd", "served-lazily\n"),
            Entry::file("app/big.bin", noise(big, seed)),
        ])
        .unwrap()
        .cmd(&["/bin/cat", "/app/motd"])
        .build()
        .unwrap();
    let plain = registry.push(repo, "plain", &image).unwrap();
    let estargz = format!("{}/{repo}:estargz", registry.host);
    convert(&plain, &estargz, &["--estargz"]);
    (plain, estargz)
}

/// The regular files of `entries`, by absolute path, with their sha256 (hex): what a
/// container's `sha256sum` of those paths prints.
pub fn file_digests(entries: &[Entry], into: &mut BTreeMap<String, String>) {
    for entry in entries {
        if let Entry::File { path, content, .. } = entry {
            let digest = sha256_digest(content);
            into.insert(
                format!("/{path}"),
                digest.trim_start_matches("sha256:").to_string(),
            );
        }
    }
}

/// A layer pushed as a one-layer image, and the labels a Prepare of it carries (as
/// containerd's remote-snapshot handler sets them).
pub struct PushedLayer {
    pub labels: std::collections::HashMap<String, String>,
    /// The committed snapshot's name (`containerd.io/snapshot.ref`).
    pub target: String,
}

/// Pushes a hand-made eStargz `blob` (its diff ID and TOC digest as given) as the only
/// layer of `REPO:esgz`.
pub fn push_estargz_blob(
    registry: &Registry,
    repo: &str,
    blob: Vec<u8>,
    diff_id: &str,
    toc: &str,
) -> PushedLayer {
    use snapshotter::remote;
    let layer =
        testkit::image::Layer::precompressed(blob, testkit::image::MEDIA_TYPE_LAYER_GZIP, diff_id)
            .with_annotation(remote::LABEL_TOC_DIGEST, toc);
    let digest = format!("sha256:{}", layer.blob.hex());
    let image = ImageBuilder::new().layer(layer).build().unwrap();
    let reference = registry.push(repo, "esgz", &image).unwrap();
    let target = format!("chain-of-{digest}");
    let labels = std::collections::HashMap::from([
        (remote::LABEL_TARGET_REF.to_string(), target.clone()),
        (remote::LABEL_STARGZ_REFERENCE.to_string(), reference),
        (remote::LABEL_STARGZ_DIGEST.to_string(), digest),
        (remote::LABEL_TOC_DIGEST.to_string(), toc.to_string()),
    ]);
    PushedLayer { labels, target }
}

/// Prepares snapshot `key` with `labels` (a layer's, as containerd sends them) and
/// asserts that lazysnapd mounted it lazily (AlreadyExists: nothing for containerd to
/// pull).
pub async fn prepare_lazily(
    daemon: &Lazysnapd,
    key: &str,
    labels: std::collections::HashMap<String, String>,
) {
    let mut c = snapshotter::client::connect(&daemon.address).await.unwrap();
    let prepared = c
        .prepare(snapshotter::proto::snapshots::PrepareSnapshotRequest {
            key: key.into(),
            labels,
            ..Default::default()
        })
        .await;
    assert!(
        matches!(&prepared, Err(s) if s.code() == tonic::Code::AlreadyExists),
        "mounted lazily: {prepared:?}\nlog:\n{}",
        daemon.log()
    );
}

/// A TOC of fifos, 1,000 to a directory, as long as fits in `bytes`: about 35 bytes of
/// JSON each, the most nodes per byte a real-looking TOC holds. `salt` makes each TOC
/// distinct.
pub fn fifo_toc(bytes: usize, salt: &str) -> Vec<u8> {
    let mut json = Vec::with_capacity(bytes);
    json.extend_from_slice(br#"{"version":1,"entries":["#);
    for i in 0.. {
        let entry = format!(r#"{{"name":"{salt}{:x}/{i:x}","type":"fifo"}}"#, i / 1000);
        if json.len() + entry.len() + 3 > bytes {
            break;
        }
        if i > 0 {
            json.push(b',');
        }
        json.extend_from_slice(entry.as_bytes());
    }
    json.extend_from_slice(b"]}");
    json
}

/// `HOST/cri/pause:1` pushed to `registry`: busybox sleeping, a pod's sandbox image.
pub fn push_pause_image(registry: &Registry) -> String {
    let image = ImageBuilder::new()
        .layer(busybox_layer().unwrap())
        .entrypoint(&["/bin/sleep", "3600"])
        .build()
        .unwrap();
    registry.push("cri/pause", "1", &image).unwrap()
}

/// Connects to `containerd`'s CRI and waits for the plugin, which answers "not
/// initialized" for a while after containerd's own API is up.
pub async fn cri_client(containerd: &Containerd) -> CriClient {
    let mut last = String::new();
    let client = testkit::wait_for(Duration::from_secs(30), async || {
        let mut client = match CriClient::connect(containerd.address()).await {
            Ok(client) => client,
            Err(e) => {
                last = e.to_string();
                return None;
            }
        };
        match client.version().await {
            Ok(version) => {
                eprintln!(
                    "CRI: {} {} (API {})",
                    version.runtime_name, version.runtime_version, version.runtime_api_version
                );
                Some(client)
            }
            Err(status) => {
                last = status.to_string();
                None
            }
        }
    })
    .await;
    client.unwrap_or_else(|| {
        panic!(
            "CRI did not answer: {last}\ncontainerd log:\n{}",
            containerd.log()
        )
    })
}

/// A containerd with CRI whose snapshotter is `daemon` (told it can do `capabilities`),
/// its sandbox image `pause`, pulling plain HTTP from `registry`; its CNI dirs and
/// registry hosts under `dir`.
pub fn containerd_with_cri(
    dir: &Path,
    daemon: &Lazysnapd,
    registry: &Registry,
    pause: &str,
    capabilities: &[&str],
) -> Containerd {
    let cri = testkit::containerd::cri_config(
        Release::from_env().unwrap(),
        &testkit::containerd::CriSettings {
            dir,
            snapshotter: "lazysnap",
            sandbox_image: Some(pause),
            registry_host: &registry.host,
            registry_ca: None,
        },
    )
    .unwrap();
    Containerd::start_with(
        &ContainerdOptions::default()
            .keep_cri()
            .proxy_snapshotter("lazysnap", &daemon.address)
            .proxy_capabilities("lazysnap", capabilities)
            .extra_config(&cri),
    )
    .unwrap()
}
