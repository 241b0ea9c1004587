//! `rpull` against real parts: a registry, containerd 1.6 and lazysnapd.
//!
//! containerd reaches lazysnapd through a recording proxy (a snapshots gRPC server that
//! forwards every call), so the tests see exactly what containerd passed to Prepare. In
//! "remote" mode the proxy also plays a remote snapshotter for chosen layers: it fills
//! the snapshot itself, commits it under the chain ID and answers AlreadyExists, which is
//! the protocol lazysnapd follows once its FUSE mounts are wired in.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};

use daemon::rpull::{self, LayerOutcome, RpullOptions, RpullReport};
use snapshotter::proto::snapshots as pb;
use snapshotter::proto::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use testkit::containerd::{Containerd, ContainerdOptions};
use testkit::image::{Blob, Entry, Image, ImageBuilder, MEDIA_TYPE_INDEX, busybox_layer};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::Registry;
use tonic::{Request, Response, Status};

const BIN: &str = env!("CARGO_BIN_EXE_lazysnapd");
const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";

/// One Prepare as containerd sent it.
#[derive(Clone, Debug)]
struct Prepared {
    key: String,
    parent: String,
    labels: HashMap<String, String>,
}

/// Forwards the snapshots API to lazysnapd and records Prepare calls; for the layers in
/// `remote` (by blob digest, with the blob) it answers like a remote snapshotter.
#[derive(Clone)]
struct Proxy {
    upstream: PathBuf,
    prepares: Arc<Mutex<Vec<Prepared>>>,
    remote: Arc<HashMap<String, Vec<u8>>>,
    scratch: PathBuf,
}

impl Proxy {
    async fn client(&self) -> Result<snapshotter::client::Client, Status> {
        snapshotter::client::connect(&self.upstream)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    /// What a remote snapshotter does: make the layer's contents appear in the prepared
    /// snapshot (here by extracting the blob), commit it under the chain ID, and answer
    /// AlreadyExists so containerd neither downloads nor applies the layer.
    async fn prepare_remote(
        &self,
        r: pb::PrepareSnapshotRequest,
        blob: &[u8],
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let target = r.labels["containerd.io/snapshot.ref"].clone();
        let mut c = self.client().await?;
        let mounts = c.prepare(r.clone()).await?.into_inner().mounts;
        let dir = upper_dir(&mounts).ok_or_else(|| Status::internal("no upper dir"))?;
        let file = self.scratch.join(target.replace(':', "-"));
        std::fs::write(&file, blob).map_err(|e| Status::internal(e.to_string()))?;
        let out = Command::new("tar")
            .arg("-xzf")
            .arg(&file)
            .arg("-C")
            .arg(&dir)
            .output()
            .map_err(|e| Status::internal(e.to_string()))?;
        if !out.status.success() {
            return Err(Status::internal(String::from_utf8_lossy(&out.stderr)));
        }
        // Not lazysnapd's own remote marker: lazysnapd would then try to serve the layer
        // itself (it is a plain layer here, filled by this proxy).
        let mut labels = r.labels.clone();
        labels.insert("test.rpull/filled-by-proxy".into(), "true".into());
        c.commit(pb::CommitSnapshotRequest {
            snapshotter: r.snapshotter.clone(),
            name: target.clone(),
            key: r.key.clone(),
            labels,
        })
        .await?;
        Err(Status::already_exists(format!(
            "target snapshot {target:?}: already exists"
        )))
    }
}

/// The directory a snapshot's mounts write into (bind source, or overlay upperdir).
fn upper_dir(mounts: &[snapshotter::proto::containerd::types::Mount]) -> Option<PathBuf> {
    let m = mounts.first()?;
    if m.r#type == "bind" {
        return Some(PathBuf::from(&m.source));
    }
    m.options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(PathBuf::from)
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Proxy {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.prepares.lock().unwrap().push(Prepared {
            key: r.key.clone(),
            parent: r.parent.clone(),
            labels: r.labels.clone(),
        });
        let remote_blob = r
            .labels
            .get(rpull::LABEL_STARGZ_DIGEST)
            .and_then(|d| self.remote.get(d));
        if let Some(blob) = remote_blob {
            return self.prepare_remote(r.clone(), blob).await;
        }
        self.client().await?.prepare(r).await
    }
    async fn view(
        &self,
        r: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        self.client().await?.view(r.into_inner()).await
    }
    async fn mounts(
        &self,
        r: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        self.client().await?.mounts(r.into_inner()).await
    }
    async fn commit(&self, r: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        self.client().await?.commit(r.into_inner()).await
    }
    async fn remove(&self, r: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        self.client().await?.remove(r.into_inner()).await
    }
    async fn stat(
        &self,
        r: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        self.client().await?.stat(r.into_inner()).await
    }
    async fn update(
        &self,
        r: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        self.client().await?.update(r.into_inner()).await
    }
    type ListStream = ListStream;
    async fn list(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<ListStream>, Status> {
        // containerd 1.6 finds a remote snapshot with the filter
        // `labels."containerd.io/snapshot.ref"==TARGET,parent==""` for a bottom layer. In
        // containerd a snapshot's parent is always "present" (possibly empty), but
        // lazysnapd's filter treats an empty parent as absent and matches nothing, so this
        // proxy applies that clause itself. (Reported; lazysnapd's filter.rs needs fixing.)
        let mut r = r.into_inner();
        let mut bottom_only = false;
        for f in &mut r.filters {
            if let Some(rest) = f.strip_suffix(r#",parent=="""#) {
                *f = rest.to_string();
                bottom_only = true;
            }
        }
        // Collected here: the stream would not outlive the client it came from.
        let mut c = self.client().await?;
        let mut stream = c.list(r).await?.into_inner();
        let mut batches = Vec::new();
        while let Some(mut batch) = stream.message().await? {
            batch.info.retain(|i| !bottom_only || i.parent.is_empty());
            batches.push(Ok(batch));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }
    async fn usage(
        &self,
        r: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        self.client().await?.usage(r.into_inner()).await
    }
    async fn cleanup(&self, r: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.client().await?.cleanup(r.into_inner()).await
    }
}

/// Serves `proxy` on `socket` until the test's runtime ends.
fn serve(proxy: Proxy, socket: &Path) {
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        |conn| conn.map(daemon::authority::relay),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SnapshotsServer::new(proxy))
            .serve_with_incoming(incoming),
    );
}

/// A registry, lazysnapd, the proxy in front of it and containerd using it as `lazysnap`.
struct Setup {
    registry: Registry,
    daemon: Lazysnapd,
    containerd: Containerd,
    prepares: Arc<Mutex<Vec<Prepared>>>,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn start(remote: HashMap<String, Vec<u8>>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::start(&dir.path().join("registry")).unwrap();
        let daemon = Lazysnapd::start(Path::new(BIN), &dir.path().join("ls")).unwrap();
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        let prepares = Arc::new(Mutex::new(Vec::new()));
        let socket = dir.path().join("proxy.sock");
        serve(
            Proxy {
                upstream: daemon.address.clone(),
                prepares: prepares.clone(),
                remote: Arc::new(remote),
                scratch,
            },
            &socket,
        );
        let containerd = Containerd::start_with(
            &ContainerdOptions::default().proxy_snapshotter("lazysnap", &socket),
        )
        .unwrap();
        Setup {
            registry,
            daemon,
            containerd,
            prepares,
            _dir: dir,
        }
    }

    fn options(&self, snapshotter: &str) -> RpullOptions {
        options(&self.containerd, snapshotter)
    }

    /// Snapshots lazysnapd itself holds, as (name, kind).
    async fn daemon_snapshots(&self) -> Vec<(String, i32)> {
        let mut c = snapshotter::client::connect(&self.daemon.address)
            .await
            .unwrap();
        let mut stream = c
            .list(pb::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.message().await.unwrap() {
            out.extend(batch.info.into_iter().map(|i| (i.name, i.kind)));
        }
        out
    }
}

fn options(containerd: &Containerd, snapshotter: &str) -> RpullOptions {
    RpullOptions {
        address: containerd.address().to_path_buf(),
        namespace: containerd.namespace().to_string(),
        snapshotter: snapshotter.to_string(),
        // Not the machine's docker config: the test registry is anonymous.
        credentials: Some(Arc::new(registry::Anonymous)),
        ..RpullOptions::default()
    }
}

/// Two layers, the second annotated with a TOC digest (which must reach the snapshotter).
fn two_layer_image() -> Image {
    let second = testkit::image::Layer::from_entries(&[
        Entry::dir("etc"),
        Entry::file("etc/motd", "rpull-says-hi\n"),
    ])
    .unwrap()
    .with_annotation(TOC_DIGEST, "sha256:0123456789abcdef");
    ImageBuilder::new()
        .layer(busybox_layer().unwrap())
        .layer(second)
        .cmd(&["/bin/cat", "/etc/motd"])
        .build()
        .unwrap()
}

fn committed(containerd: &Containerd, snapshotter: &str) -> usize {
    containerd
        .ctr(["snapshots", "--snapshotter", snapshotter, "ls"])
        .unwrap()
        .matches("Committed")
        .count()
}

/// Runs containerd's garbage collector now: deleting a lease with --sync waits for GC.
fn collect_garbage(containerd: &Containerd) {
    containerd
        .ctr(["leases", "create", "--id", "gc-trigger"])
        .unwrap();
    containerd
        .ctr(["leases", "delete", "--sync", "gc-trigger"])
        .unwrap();
}

fn image_names(containerd: &Containerd) -> Vec<String> {
    containerd
        .ctr(["images", "ls", "-q"])
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn leases(containerd: &Containerd) -> String {
    containerd.ctr(["leases", "ls"]).unwrap()
}

/// The line `ctr content ls` shows for `digest` (size, age, labels), if it has the blob.
fn content_labels(containerd: &Containerd, digest: &str) -> Option<String> {
    let listing = containerd.ctr(["content", "ls"]).unwrap();
    listing
        .lines()
        .find(|l| l.starts_with(digest))
        .map(str::to_string)
}

fn check_report(report: &RpullReport, image: &Image, reference: &str, outcome: LayerOutcome) {
    assert_eq!(report.image, reference);
    assert_eq!(report.manifest_digest, image.manifest.digest);
    assert_eq!(report.config_digest, image.config.digest);
    assert_eq!(report.layers.len(), image.layers.len());
    for (got, want) in report.layers.iter().zip(&image.layers) {
        assert_eq!(got.digest, want.blob.digest);
        assert_eq!(got.outcome, outcome, "{report:#?}");
    }
    assert_eq!(report.layers[0].chain_id, image.layers[0].diff_id);
    assert_eq!(report.chain_id, report.layers.last().unwrap().chain_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn rpull_through_lazysnapd_falls_back_to_download_and_runs() {
    if testkit::skip_unless_root("rpull_through_lazysnapd_falls_back_to_download_and_runs") {
        return;
    }
    let setup = Setup::start(HashMap::new());
    let ctr = &setup.containerd;
    let image = two_layer_image();
    let reference = setup.registry.push("test/rpull", "1", &image).unwrap();

    let report = rpull::rpull(&reference, &setup.options("lazysnap"))
        .await
        .unwrap();
    check_report(&report, &image, &reference, LayerOutcome::Downloaded);

    // Each layer was prepared once, with the remote-snapshot labels.
    let prepares = setup.prepares.lock().unwrap().clone();
    assert_eq!(prepares.len(), 2, "{prepares:#?}");
    let all_layers: Vec<&str> = image
        .layers
        .iter()
        .map(|l| l.blob.digest.as_str())
        .collect();
    for (i, p) in prepares.iter().enumerate() {
        let chain_id = &report.layers[i].chain_id;
        let digest = &image.layers[i].blob.digest;
        // containerd's metadata layer hands the snapshotter namespaced names
        // (`<namespace>/<sequence>/<name>`), so the key and parent end with ours.
        assert!(p.key.contains("/extract-"), "{}", p.key);
        assert!(p.key.ends_with(&format!(" {chain_id}")), "{}", p.key);
        if i == 0 {
            assert_eq!(p.parent, "");
        } else {
            assert!(
                p.parent
                    .ends_with(&format!("/{}", report.layers[i - 1].chain_id)),
                "{}",
                p.parent
            );
        }
        let l = &p.labels;
        let following = all_layers[i..].join(",");
        for (key, want) in [
            ("containerd.io/snapshot.ref", chain_id.as_str()),
            (rpull::LABEL_STARGZ_REFERENCE, reference.as_str()),
            (rpull::LABEL_STARGZ_DIGEST, digest.as_str()),
            (rpull::LABEL_STARGZ_LAYERS, following.as_str()),
            (rpull::LABEL_STARGZ_PREFETCH, "10485760"),
            (rpull::LABEL_CRI_IMAGE_REF, reference.as_str()),
            (rpull::LABEL_CRI_LAYER_DIGEST, digest.as_str()),
            (
                rpull::LABEL_CRI_MANIFEST_DIGEST,
                image.manifest.digest.as_str(),
            ),
            (rpull::LABEL_CRI_IMAGE_LAYERS, following.as_str()),
        ] {
            assert_eq!(
                l.get(key).map(String::as_str),
                Some(want),
                "{key} of layer {i}"
            );
        }
        // The layer annotation is forwarded as a label, only for the layer carrying it.
        assert_eq!(l.get(TOC_DIGEST).is_some(), i == 1, "{l:#?}");
    }
    // The commit carried them too: containerd keeps them on the committed snapshot.
    let info = ctr
        .ctr([
            "snapshots",
            "--snapshotter",
            "lazysnap",
            "info",
            &report.chain_id,
        ])
        .unwrap();
    assert!(info.contains(rpull::LABEL_STARGZ_REFERENCE), "{info}");

    assert!(image_names(ctr).contains(&reference));
    assert!(
        !leases(ctr).contains("lazysnap-rpull"),
        "the pull's lease is gone"
    );
    let manifest_labels = content_labels(ctr, &image.manifest.digest).unwrap();
    for want in [
        format!(
            "containerd.io/gc.ref.content.config={}",
            image.config.digest
        ),
        format!(
            "containerd.io/gc.ref.content.l.0={}",
            image.layers[0].blob.digest
        ),
        format!(
            "containerd.io/gc.ref.content.l.1={}",
            image.layers[1].blob.digest
        ),
    ] {
        assert!(
            manifest_labels.contains(&want),
            "{want} in {manifest_labels}"
        );
    }
    let config_labels = content_labels(ctr, &image.config.digest).unwrap();
    let snapshot_label = format!("containerd.io/gc.ref.snapshot.lazysnap={}", report.chain_id);
    assert!(config_labels.contains(&snapshot_label), "{config_labels}");

    // Garbage collection keeps it all: the image record roots the manifest, the GC labels
    // the rest, the config's snapshot label the snapshots.
    collect_garbage(ctr);
    assert_eq!(committed(ctr, "lazysnap"), 2);
    for blob in image.blobs() {
        assert!(
            content_labels(ctr, &blob.digest).is_some(),
            "{} collected",
            blob.digest
        );
    }

    // containerd finds the image unpacked: running it makes no new layer snapshots (a
    // wrong chain ID would have it unpack the layers again, under the right names).
    let out = ctr
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            &reference,
            "c1",
            "echo",
            "hi",
        ])
        .unwrap();
    assert_eq!(out.trim(), "hi");
    let out = ctr
        .ctr(["run", "--rm", "--snapshotter", "lazysnap", &reference, "c2"])
        .unwrap();
    assert_eq!(out.trim(), "rpull-says-hi", "the upper layer is there");
    assert_eq!(committed(ctr, "lazysnap"), 2);

    // Pulling again finds everything in place.
    let prepared = setup.prepares.lock().unwrap().len();
    let again = rpull::rpull(&reference, &setup.options("lazysnap"))
        .await
        .unwrap();
    check_report(&again, &image, &reference, LayerOutcome::Present);
    assert_eq!(
        setup.prepares.lock().unwrap().len(),
        prepared,
        "no new Prepare"
    );

    ctr.ctr(["image", "rm", "--sync", &reference]).unwrap();
    assert!(!image_names(ctr).contains(&reference));
    assert_eq!(committed(ctr, "lazysnap"), 0);
    assert_eq!(setup.daemon_snapshots().await, Vec::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn rpull_skips_layers_the_snapshotter_mounts_itself() {
    if testkit::skip_unless_root("rpull_skips_layers_the_snapshotter_mounts_itself") {
        return;
    }
    let image = two_layer_image();
    let remote = image
        .layers
        .iter()
        .map(|l| (l.blob.digest.clone(), l.blob.data.clone()))
        .collect();
    let setup = Setup::start(remote);
    let ctr = &setup.containerd;
    let reference = setup.registry.push("test/lazy", "1", &image).unwrap();

    let report = match rpull::rpull(&reference, &setup.options("lazysnap")).await {
        Ok(r) => r,
        Err(e) => panic!("{e:#}\nDAEMON\n{}\nCTD\n{}", setup.daemon.log(), ctr.log()),
    };
    check_report(&report, &image, &reference, LayerOutcome::Lazy);

    // No layer blob was downloaded, by rpull or by containerd.
    for layer in &image.layers {
        assert_eq!(content_labels(ctr, &layer.blob.digest), None);
        assert!(
            !setup
                .registry
                .log()
                .contains(&format!("GET /v2/test/lazy/blobs/{}", layer.blob.digest)),
            "layer {} was fetched from the registry",
            layer.blob.digest
        );
    }
    let snapshots = setup.daemon_snapshots().await;
    let names: HashSet<&str> = snapshots.iter().map(|(n, _)| n.as_str()).collect();
    let chain_ids: HashSet<&str> = report.layers.iter().map(|l| l.chain_id.as_str()).collect();
    assert_eq!(
        names, chain_ids,
        "only the committed layers, no extract-* leftovers"
    );

    let out = ctr
        .ctr(["run", "--rm", "--snapshotter", "lazysnap", &reference, "c1"])
        .unwrap();
    assert_eq!(out.trim(), "rpull-says-hi");
    ctr.ctr(["image", "rm", "--sync", &reference]).unwrap();
    assert_eq!(setup.daemon_snapshots().await, Vec::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn rpull_is_a_general_pull_into_overlayfs_through_an_index() {
    if testkit::skip_unless_root("rpull_is_a_general_pull_into_overlayfs_through_an_index") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let ctr = Containerd::start().unwrap();
    let image = two_layer_image();
    registry.push("test/multi", "single", &image).unwrap();
    // An index with this machine's manifest and one for another platform, never fetched.
    let other = ImageBuilder::new()
        .architecture("s390x")
        .entries(&[Entry::file("other", "x")])
        .unwrap()
        .build()
        .unwrap();
    registry.push("test/multi", "other", &other).unwrap();
    let index = Blob::new(
        MEDIA_TYPE_INDEX,
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [other.manifest_descriptor(), image.manifest_descriptor()],
        }))
        .unwrap(),
    );
    testkit::registry::push_manifest(&registry.host, "test/multi", "1", &index).unwrap();
    let reference = format!("{}/test/multi:1", registry.host);

    let report = rpull::rpull(&reference, &options(&ctr, "overlayfs"))
        .await
        .unwrap();
    check_report(&report, &image, &reference, LayerOutcome::Downloaded);
    assert_eq!(
        report.target_digest, index.digest,
        "the record names the index"
    );
    let listing = ctr.ctr(["images", "ls"]).unwrap();
    assert!(
        listing.contains(&index.digest) && listing.contains(MEDIA_TYPE_INDEX),
        "{listing}"
    );
    let index_labels = content_labels(&ctr, &index.digest).unwrap();
    assert!(
        index_labels.contains(&format!(
            "containerd.io/gc.ref.content.m.1={}",
            image.manifest.digest
        )),
        "{index_labels}"
    );

    collect_garbage(&ctr);
    assert_eq!(committed(&ctr, "overlayfs"), 2);
    let out = ctr
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "overlayfs",
            &reference,
            "c1",
            "echo",
            "hi",
        ])
        .unwrap();
    assert_eq!(out.trim(), "hi");
    assert_eq!(
        committed(&ctr, "overlayfs"),
        2,
        "containerd found it unpacked"
    );
    ctr.ctr(["image", "rm", "--sync", &reference]).unwrap();
    assert_eq!(committed(&ctr, "overlayfs"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn rpull_failures_are_clear_and_leave_nothing_behind() {
    if testkit::skip_unless_root("rpull_failures_are_clear_and_leave_nothing_behind") {
        return;
    }
    let setup = Setup::start(HashMap::new());
    let ctr = &setup.containerd;
    let host = &setup.registry.host;

    // A repository the registry has never heard of.
    let missing = format!("{host}/test/nothing-here:1");
    let err = rpull::rpull(&missing, &setup.options("lazysnap"))
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("not found") && msg.contains("test/nothing-here"),
        "{msg}"
    );

    // A registry that is not there.
    let down = format!("127.0.0.1:{}/test/busybox:1", testkit::free_port());
    let mut opts = setup.options("lazysnap");
    opts.registry.http.max_retries = 1;
    let err = rpull::rpull(&down, &opts).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("resolving") && msg.contains("127.0.0.1"),
        "{msg}"
    );

    // A layer that vanished from the registry after the manifest was pushed: the pull
    // fails mid-way, after containerd has content, a lease and a prepared snapshot.
    let image = two_layer_image();
    let reference = setup.registry.push("test/broken", "1", &image).unwrap();
    let gone = &image.layers[1].blob.digest;
    let out = Command::new("curl")
        .args(["-sf", "-X", "DELETE"])
        .arg(format!("http://{host}/v2/test/broken/blobs/{gone}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = rpull::rpull(&reference, &opts).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(gone.as_str()), "{msg}");

    assert_eq!(image_names(ctr), Vec::<String>::new(), "no image record");
    assert!(!leases(ctr).contains("lazysnap-rpull"), "lease deleted");
    collect_garbage(ctr);
    // The first layer was committed, but nothing refers to it: GC removed it; the second
    // layer's extraction snapshot was removed on the spot.
    assert_eq!(setup.daemon_snapshots().await, Vec::new());
    assert_eq!(content_labels(ctr, &image.manifest.digest), None);
    assert_eq!(content_labels(ctr, &image.layers[0].blob.digest), None);
}
