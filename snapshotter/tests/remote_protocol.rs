//! The remote-snapshot protocol over the real gRPC service, with a fake mounter in place
//! of FUSE: commit under the chain ID and AlreadyExists on success, an ordinary snapshot
//! on any failure, unmount on removal, remount after a restart.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapshotter::Snapshotter;
use snapshotter::lazy_snapshotter::LazySnapshotter;
use snapshotter::proto::snapshots as pb;
use snapshotter::remote::{self, MountError, MountFuture, MountedInfo, RemoteLayer, RemoteMounter};
use snapshotter::service::SnapshotService;
use tonic::Code;

#[derive(Default)]
struct FakeMounter {
    mounted: Mutex<HashSet<PathBuf>>,
    fail: AtomicBool,
    hang: AtomicBool,
    /// Mounts of this one layer never finish (its registry does not answer).
    hang_layer: Mutex<Option<String>>,
    mounts: AtomicUsize,
    unmounts: AtomicUsize,
}

impl RemoteMounter for FakeMounter {
    fn mount<'a>(&'a self, layer: &'a RemoteLayer, mountpoint: &'a Path) -> MountFuture<'a> {
        Box::pin(async move {
            let hangs_here =
                self.hang_layer.lock().unwrap().as_deref() == Some(layer.layer_digest.as_str());
            if self.hang.load(Ordering::SeqCst) || hangs_here {
                std::future::pending::<()>().await;
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(MountError::Registry("unreachable".to_string()));
            }
            self.mounts.fetch_add(1, Ordering::SeqCst);
            std::fs::write(mountpoint.join("served-layer"), &layer.layer_digest).unwrap();
            self.mounted
                .lock()
                .unwrap()
                .insert(mountpoint.to_path_buf());
            Ok(MountedInfo {
                size: 1234,
                entries: 7,
                preopened: false,
            })
        })
    }

    fn unmount(&self, mountpoint: &Path) {
        if self.mounted.lock().unwrap().remove(mountpoint) {
            self.unmounts.fetch_add(1, Ordering::SeqCst);
            let _ = std::fs::remove_file(mountpoint.join("served-layer"));
        }
    }

    fn is_mounted(&self, mountpoint: &Path) -> bool {
        self.mounted.lock().unwrap().contains(mountpoint)
    }
}

struct Server {
    socket: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    lazy: LazySnapshotter,
}

impl Server {
    async fn start(
        root: &Path,
        socket: &Path,
        mounter: Arc<FakeMounter>,
        timeout: Duration,
    ) -> Server {
        let snapshotter = Arc::new(Snapshotter::open(root).unwrap());
        let lazy = LazySnapshotter::with_lazy_pulling(snapshotter, mounter.clone(), timeout);
        let service = SnapshotService::new(lazy.clone());
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = service.into_server();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async {
                        let _ = rx.await;
                    },
                )
                .await
                .unwrap();
        });
        Server {
            socket: socket.to_path_buf(),
            shutdown: Some(tx),
            task,
            lazy,
        }
    }

    async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        self.task.await.unwrap();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn layer_labels(target: &str, digest: &str) -> HashMap<String, String> {
    HashMap::from([
        (remote::LABEL_TARGET_REF.to_string(), target.to_string()),
        (
            remote::LABEL_STARGZ_REFERENCE.to_string(),
            "127.0.0.1:1/img:1".to_string(),
        ),
        (remote::LABEL_STARGZ_DIGEST.to_string(), digest.to_string()),
        (
            remote::LABEL_TOC_DIGEST.to_string(),
            "sha256:toc".to_string(),
        ),
    ])
}

fn prepare(key: &str, parent: &str, labels: HashMap<String, String>) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest {
        key: key.into(),
        parent: parent.into(),
        labels,
        ..Default::default()
    }
}

async fn stat(c: &mut snapshotter::client::Client, key: &str) -> Result<pb::Info, tonic::Status> {
    c.stat(pb::StatSnapshotRequest {
        key: key.into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().info.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn lazily_mounted_layers_follow_containerds_remote_snapshot_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let socket = dir.path().join("s.sock");
    let mounter = Arc::new(FakeMounter::default());
    let server = Server::start(&root, &socket, mounter.clone(), Duration::from_secs(5)).await;
    let mut c = snapshotter::client::connect(&socket).await.unwrap();

    // Layer 1 mounts lazily: AlreadyExists, committed under the chain ID, labelled remote.
    let err = c
        .prepare(prepare(
            "extract-1 chain1",
            "",
            layer_labels("chain1", "sha256:l1"),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let info = stat(&mut c, "chain1").await.unwrap();
    assert_eq!(info.kind, pb::Kind::Committed as i32);
    assert_eq!(
        info.labels.get(remote::LABEL_REMOTE).map(String::as_str),
        Some(remote::REMOTE_LABEL_VALUE)
    );
    assert_eq!(
        stat(&mut c, "extract-1 chain1").await.unwrap_err().code(),
        Code::NotFound
    );
    let usage = c
        .usage(pb::UsageRequest {
            key: "chain1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (usage.size, usage.inodes),
        (1234, 7),
        "usage comes from the layer, not a walk"
    );

    // The same layer again: AlreadyExists at once, no second mount.
    let err = c
        .prepare(prepare(
            "extract-2 chain1",
            "",
            layer_labels("chain1", "sha256:l1"),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(mounter.mounts.load(Ordering::SeqCst), 1);

    // Layer 2 cannot be mounted: an ordinary active snapshot comes back for containerd to fill.
    mounter.fail.store(true, Ordering::SeqCst);
    let mounts = c
        .prepare(prepare(
            "extract-3 chain2",
            "chain1",
            layer_labels("chain2", "sha256:l2"),
        ))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts[0].r#type, "overlay");
    assert_eq!(
        stat(&mut c, "extract-3 chain2").await.unwrap().kind,
        pb::Kind::Active as i32
    );
    assert_eq!(
        stat(&mut c, "chain2").await.unwrap_err().code(),
        Code::NotFound
    );
    c.commit(pb::CommitSnapshotRequest {
        name: "chain2".into(),
        key: "extract-3 chain2".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    mounter.fail.store(false, Ordering::SeqCst);

    // A container's rootfs over them mounts the lazily served layer as a lower dir.
    let rootfs = c
        .prepare(prepare("container", "chain2", HashMap::new()))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let lowerdir = rootfs[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap()
        .to_string();
    let lazily_served = lowerdir.rsplit(':').next().unwrap();
    assert_eq!(
        std::fs::read_to_string(Path::new(lazily_served).join("served-layer")).unwrap(),
        "sha256:l1"
    );

    // Restart: a new daemon (new mounter) serves the layer again on first use.
    drop(c);
    server.stop().await;
    let mounter2 = Arc::new(FakeMounter::default());
    mounter2.fail.store(true, Ordering::SeqCst);
    let server = Server::start(&root, &socket, mounter2.clone(), Duration::from_secs(5)).await;
    server.lazy.restore_all().await; // registry down: logged, daemon keeps going
    let mut c = snapshotter::client::connect(&socket).await.unwrap();
    let err = c
        .mounts(pb::MountsRequest {
            key: "container".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("sha256:l1"), "{}", err.message());
    mounter2.fail.store(false, Ordering::SeqCst);
    c.mounts(pb::MountsRequest {
        key: "container".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(mounter2.is_mounted(Path::new(lazily_served)));

    // Removing the remote snapshot lets go of its mount.
    for key in ["container", "chain2", "chain1"] {
        c.remove(pb::RemoveSnapshotRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert_eq!(mounter2.unmounts.load(Ordering::SeqCst), 1);
    assert!(mounter2.mounted.lock().unwrap().is_empty());
    drop(c);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mount_that_hangs_falls_back_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let mounter = Arc::new(FakeMounter::default());
    mounter.hang.store(true, Ordering::SeqCst);
    let server = Server::start(
        &dir.path().join("root"),
        &socket,
        mounter.clone(),
        Duration::from_millis(300),
    )
    .await;
    let mut c = snapshotter::client::connect(&socket).await.unwrap();
    let started = std::time::Instant::now();
    let mounts = c
        .prepare(prepare(
            "extract chain",
            "",
            layer_labels("chain", "sha256:l"),
        ))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts[0].r#type, "bind");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "Prepare hung for {:?}",
        started.elapsed()
    );
    drop(c);
    server.stop().await;
}

/// After a restart, a layer whose registry does not answer holds up only the requests
/// that need it: a Prepare over another lazily pulled layer goes through meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_that_hangs_holds_up_only_its_own_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let socket = dir.path().join("s.sock");
    let mounter = Arc::new(FakeMounter::default());
    let server = Server::start(&root, &socket, mounter.clone(), Duration::from_secs(5)).await;
    let mut c = snapshotter::client::connect(&socket).await.unwrap();
    for (target, digest) in [("chain-a", "sha256:la"), ("chain-b", "sha256:lb")] {
        let err = c
            .prepare(prepare(
                &format!("extract {target}"),
                "",
                layer_labels(target, digest),
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    }
    drop(c);
    server.stop().await;

    // The new daemon cannot reach layer a's registry; its mounts wait a long time.
    let mounter = Arc::new(FakeMounter::default());
    *mounter.hang_layer.lock().unwrap() = Some("sha256:la".into());
    let server = Server::start(&root, &socket, mounter.clone(), Duration::from_secs(60)).await;
    let mut a = snapshotter::client::connect(&socket).await.unwrap();
    let stuck = tokio::spawn(async move {
        a.prepare(prepare("container-a", "chain-a", HashMap::new()))
            .await
    });
    // Layer a's restore is under way before b's request comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!stuck.is_finished());
    let mut b = snapshotter::client::connect(&socket).await.unwrap();
    let answered = tokio::time::timeout(
        Duration::from_secs(10),
        b.prepare(prepare("container-b", "chain-b", HashMap::new())),
    )
    .await
    .expect("a Prepare over layer b waited for layer a's restore");
    answered.unwrap();
    // Only b's layer was mounted; a's is still waiting.
    assert_eq!(mounter.mounts.load(Ordering::SeqCst), 1);
    stuck.abort();
    server.stop().await;
}

/// After a restart whose restore of a layer fails (registry down, nothing kept), a layer
/// with a native copy still serves new containers: their lower directory is the copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_layer_with_a_native_copy_needs_no_restore_for_new_containers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let socket = dir.path().join("s.sock");
    let mounter = Arc::new(FakeMounter::default());
    let server = Server::start(&root, &socket, mounter.clone(), Duration::from_secs(5)).await;
    let mut c = snapshotter::client::connect(&socket).await.unwrap();
    let err = c
        .prepare(prepare(
            "extract chain-n",
            "",
            layer_labels("chain-n", "sha256:ln"),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    drop(c);
    server.stop().await;
    let fs = mounter
        .mounted
        .lock()
        .unwrap()
        .iter()
        .next()
        .cloned()
        .unwrap();

    let over = |c: &mut snapshotter::client::Client, key: &'static str| {
        let mut c = c.clone();
        async move { c.prepare(prepare(key, "chain-n", HashMap::new())).await }
    };
    // Restores fail: without a native copy, no container on the layer.
    let mounter = Arc::new(FakeMounter::default());
    mounter.fail.store(true, Ordering::SeqCst);
    let server = Server::start(&root, &socket, mounter.clone(), Duration::from_secs(5)).await;
    let mut c = snapshotter::client::connect(&socket).await.unwrap();
    assert!(over(&mut c, "container-1").await.is_err());
    // With one, the container's lower directory is the copy.
    let native = fs.parent().unwrap().join(snapshotter::native::NATIVE_DIR);
    std::fs::create_dir(&native).unwrap();
    let mounts = over(&mut c, "container-2")
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let options = mounts[0].options.join(",");
    assert!(
        options.contains(&format!("lowerdir={}", native.display())),
        "{options}"
    );
    drop(c);
    server.stop().await;
}
