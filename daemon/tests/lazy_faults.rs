//! Bad input on the lazy path: each gets a clear log line and an ordinary snapshot for
//! containerd to fill (never a hung Prepare, never a mount of unverified data).

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use snapshotter::proto::snapshots as pb;
use snapshotter::remote;
use testkit::containerd::mounts_under;
use testkit::image::{Entry, ImageBuilder, busybox_layer};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::Registry;

const LAZYSNAPD: &str = env!("CARGO_BIN_EXE_lazysnapd");
const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

fn start_daemon(dir: &Path) -> Lazysnapd {
    let config = dir.join("lazysnapd.toml");
    std::fs::write(&config, "[lazy]\nmount_timeout_sec = 3\nbackground_fetch = false\n\n[http]\nrequest_timeout_sec = 2\n").unwrap();
    Lazysnapd::start_with_args(
        Path::new(LAZYSNAPD),
        &dir.join("ls"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap()
}

fn labels(image: &str, layer: &str, toc: Option<&str>) -> HashMap<String, String> {
    let mut l = HashMap::from([
        (
            remote::LABEL_TARGET_REF.to_string(),
            format!("chain-of-{layer}"),
        ),
        (
            remote::LABEL_STARGZ_REFERENCE.to_string(),
            image.to_string(),
        ),
        (remote::LABEL_STARGZ_DIGEST.to_string(), layer.to_string()),
    ]);
    if let Some(toc) = toc {
        l.insert(remote::LABEL_TOC_DIGEST.to_string(), toc.to_string());
    }
    l
}

/// Prepare must come back, within the mount timeout and some slack, with an ordinary
/// snapshot; and the log must say why lazy pulling was not possible.
async fn assert_falls_back(
    daemon: &Lazysnapd,
    key: &str,
    labels: HashMap<String, String>,
    why: &str,
) {
    let mut c = snapshotter::client::connect(&daemon.address).await.unwrap();
    let started = Instant::now();
    let mounts = c
        .prepare(pb::PrepareSnapshotRequest {
            key: key.into(),
            labels,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{key}: Prepare failed instead of falling back: {e:?}"))
        .into_inner()
        .mounts;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{key}: Prepare took {:?}",
        started.elapsed()
    );
    assert_eq!(
        mounts[0].r#type, "bind",
        "{key}: an ordinary snapshot for containerd to fill"
    );
    assert!(
        mounts_under(&daemon.root).is_empty(),
        "{key}: something stayed mounted"
    );
    let found = testkit::wait_until(Duration::from_secs(5), || {
        daemon
            .log()
            .lines()
            .any(|l| l.contains("lazy pull not possible") && l.contains(why))
    });
    assert!(
        found,
        "{key}: no log line saying {why:?}; log:\n{}",
        daemon.log()
    );
    let log = daemon.log();
    let line = log
        .lines()
        .rfind(|l| l.contains("lazy pull not possible") && l.contains(why));
    eprintln!("{key}: {}", line.unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_images_wrong_toc_digests_and_plain_layers_fall_back() {
    if testkit::skip_unless_root("missing_images_wrong_toc_digests_and_plain_layers_fall_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let daemon = start_daemon(dir.path());
    let image = ImageBuilder::new()
        .layer(busybox_layer().unwrap())
        .entries(&[Entry::file("hello", "hi\n")])
        .unwrap()
        .build()
        .unwrap();
    let plain = registry.push("faults/app", "plain", &image).unwrap();
    let converted = format!("{}/faults/app:esgz", registry.host);
    let out = std::process::Command::new(LAZYSNAP)
        .args(["convert", "--no-progress-bars", &plain, &converted])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = registry::Client::new(registry::RegistryConfig::default()).unwrap();
    let resolved = client.resolve(&converted.parse().unwrap()).await.unwrap();
    let layer = &resolved.manifest.layers[1];
    let toc = layer.annotations.as_ref().unwrap()[remote::LABEL_TOC_DIGEST].clone();
    let digest = layer.digest.to_string();

    let missing = format!("sha256:{}", "0".repeat(64));
    assert_falls_back(
        &daemon,
        "missing-layer",
        labels(&converted, &missing, Some(&toc)),
        "not found",
    )
    .await;
    let nowhere = format!("{}/faults/nothing:1", registry.host);
    assert_falls_back(
        &daemon,
        "missing-image",
        labels(&nowhere, &digest, Some(&toc)),
        "not found",
    )
    .await;
    let wrong_toc = format!("sha256:{}", "1".repeat(64));
    assert_falls_back(
        &daemon,
        "wrong-toc",
        labels(&converted, &digest, Some(&wrong_toc)),
        "TOC",
    )
    .await;
    let plain_layer = client
        .resolve(&plain.parse().unwrap())
        .await
        .unwrap()
        .manifest
        .layers[1]
        .digest
        .to_string();
    assert_falls_back(
        &daemon,
        "plain-gzip",
        labels(&plain, &plain_layer, None),
        "TOC digest",
    )
    .await;

    // The right labels do mount, so the fallbacks above were for the reasons given.
    let mut c = snapshotter::client::connect(&daemon.address).await.unwrap();
    let err = c
        .prepare(pb::PrepareSnapshotRequest {
            key: "good".into(),
            labels: labels(&converted, &digest, Some(&toc)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
}

/// A registry that answers the size of any blob, then sends a few bytes and stalls.
fn stalling_registry() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(false).unwrap();
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        for stream in listener.incoming() {
            if Instant::now() > deadline {
                return;
            }
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                let _ = reader.read_line(&mut request);
                let mut range = (0u64, 99_999u64);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    let lower = line.to_ascii_lowercase();
                    if let Some((a, b)) = lower
                        .strip_prefix("range: bytes=")
                        .and_then(|spec| spec.trim().split_once('-'))
                    {
                        range = (a.parse().unwrap_or(0), b.parse().unwrap_or(99_999));
                    }
                    line.clear();
                }
                if request.starts_with("HEAD") {
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
                } else {
                    // A correct start of the answer, then nothing: the body stalls.
                    let (a, b) = range;
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/100000\r\n\r\n\x1f",
                        b - a + 1
                    );
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.flush();
                    std::thread::sleep(Duration::from_secs(15));
                }
            });
        }
    });
    (host, handle)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_that_stalls_mid_toc_does_not_hang_prepare() {
    if testkit::skip_unless_root("a_registry_that_stalls_mid_toc_does_not_hang_prepare") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path());
    let (host, _server) = stalling_registry();
    let layer = format!("sha256:{}", "2".repeat(64));
    let toc = format!("sha256:{}", "3".repeat(64));
    assert_falls_back(
        &daemon,
        "stalled",
        labels(&format!("{host}/stall/app:1"), &layer, Some(&toc)),
        "took longer than",
    )
    .await;
}

/// What containerd's unpacker sends when CRI annotations are disabled: the chain ID and the
/// layer's TOC digest, but no image reference. Lazy pulling is lost; lazysnapd says so loudly,
/// naming the setting, and containerd gets an ordinary snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn a_lazy_layer_without_reference_labels_gets_a_loud_warning() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path());
    let mut c = snapshotter::client::connect(&daemon.address).await.unwrap();
    let labels = HashMap::from([
        (
            remote::LABEL_TARGET_REF.to_string(),
            "sha256:chain".to_string(),
        ),
        (
            remote::LABEL_TOC_DIGEST.to_string(),
            format!("sha256:{}", "4".repeat(64)),
        ),
    ]);
    let mounts = c
        .prepare(pb::PrepareSnapshotRequest {
            key: "extract-1 sha256:chain".into(),
            labels,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts[0].r#type, "bind");
    let log = daemon.log();
    let warning = log
        .lines()
        .find(|l| l.contains("LAZY PULLING IS OFF"))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(
        warning.contains("WARN") && warning.contains("disable_snapshot_annotations = false"),
        "{warning}"
    );
}

/// Pushes an image of one hand-made eStargz layer (`testkit::image::one_chunk_estargz`)
/// and returns the labels a Prepare of that layer carries.
fn push_one_chunk_layer(
    registry: &Registry,
    repo: &str,
    name: &str,
    size: u64,
) -> HashMap<String, String> {
    let (blob, diff_id, toc) = testkit::image::one_chunk_estargz(name, size).unwrap();
    eprintln!("{repo}: crafted layer of {} bytes compressed", blob.len());
    let layer =
        testkit::image::Layer::precompressed(blob, testkit::image::MEDIA_TYPE_LAYER_GZIP, &diff_id)
            .with_annotation(remote::LABEL_TOC_DIGEST, &toc);
    let digest = format!("sha256:{}", layer.blob.hex());
    let image = ImageBuilder::new().layer(layer).build().unwrap();
    let reference = registry.push(repo, "esgz", &image).unwrap();
    labels(&reference, &digest, Some(&toc))
}

/// lazysnapd's peak resident memory so far (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// A layer holding one 2 GiB file as a single chunk (2 MB compressed, right digests):
/// lazysnapd refuses to mount it lazily (each chunk is inflated whole in memory), says
/// why, and containerd gets an ordinary snapshot to fill, with lazysnapd's memory
/// untouched.
#[tokio::test(flavor = "multi_thread")]
async fn a_layer_with_a_chunk_over_the_bound_falls_back() {
    if testkit::skip_unless_root("a_layer_with_a_chunk_over_the_bound_falls_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let daemon = start_daemon(dir.path());
    let labels = push_one_chunk_layer(&registry, "faults/huge-chunk", "zeros.bin", 2 << 30);
    let before = peak_rss(daemon.pid());
    assert_falls_back(&daemon, "huge-chunk", labels, "a chunk of 2147483648 bytes").await;
    let after = peak_rss(daemon.pid());
    eprintln!(
        "lazysnapd peak RSS: {} MiB before the Prepare, {} MiB after",
        before >> 20,
        after >> 20
    );
    assert!(after < 256 << 20, "peak RSS {} MiB", after >> 20);
}

/// A layer naming a file with a 256-byte component: not mounted lazily (the tree would
/// list a name no open can reach); containerd gets an ordinary snapshot, and the log
/// says why.
#[tokio::test(flavor = "multi_thread")]
async fn a_layer_with_a_name_over_255_bytes_falls_back() {
    if testkit::skip_unless_root("a_layer_with_a_name_over_255_bytes_falls_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let daemon = start_daemon(dir.path());
    let name = "n".repeat(256);
    let labels = push_one_chunk_layer(&registry, "faults/long-name", &name, 10);
    assert_falls_back(&daemon, "long-name", labels, "a component of 256 bytes").await;
}

/// A TCP proxy to `target` that stops passing bytes, both ways and on every connection,
/// while its flag is set: a registry that stalls mid-way, as a hung backend or a
/// black-holed network does.
struct StallingProxy {
    host: String,
    stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    async fn start(target: String) -> StallingProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let stall = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stall.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (in_r, in_w) = inbound.into_split();
                let (out_r, out_w) = outbound.into_split();
                for (mut from, mut to, stall) in [
                    (
                        Box::new(in_r) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(out_w) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                        flag.clone(),
                    ),
                    (Box::new(out_r), Box::new(in_w), flag.clone()),
                ] {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let Ok(n) = from.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                let _ = to.shutdown().await;
                                return;
                            }
                            while stall.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        StallingProxy { host, stall, task }
    }

    fn set_stalled(&self, stalled: bool) {
        self.stall
            .store(stalled, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How long a range request may go unanswered in the stall tests.
const TIMEOUT: Duration = Duration::from_secs(3);

/// A one-file lazy layer (4 MiB of zeros, nothing of it local) served through a
/// [`StallingProxy`], mounted by a lazysnapd whose fetch timeout is [`TIMEOUT`].
struct StallingLayer {
    daemon: Lazysnapd,
    proxy: StallingProxy,
    file: std::path::PathBuf,
    _registry: Registry,
}

impl StallingLayer {
    async fn mount(dir: &Path) -> StallingLayer {
        let registry = Registry::start(&dir.join("registry")).unwrap();
        let proxy = StallingProxy::start(registry.host.clone()).await;
        let config = dir.join("lazysnapd.toml");
        std::fs::write(
            &config,
            format!(
                "[lazy]\nfetch_timeout_sec = {}\nbackground_fetch = false\nneighbour_fetch_kb = 0\n\
                 native_copies = false\npreopen_siblings = false\n",
                TIMEOUT.as_secs()
            ),
        )
        .unwrap();
        let daemon = Lazysnapd::start_with_args(
            Path::new(LAZYSNAPD),
            &dir.join("ls"),
            &["--config", config.to_str().unwrap()],
        )
        .unwrap();
        let (blob, diff_id, toc) = testkit::image::one_chunk_estargz("zeros.bin", 4 << 20).unwrap();
        let mut layer = common::push_estargz_blob(&registry, "stall/app", blob, &diff_id, &toc);
        // The image as the proxy serves it.
        layer.labels.insert(
            remote::LABEL_STARGZ_REFERENCE.to_string(),
            format!("{}/stall/app:esgz", proxy.host),
        );
        common::prepare_lazily(&daemon, "stall", layer.labels).await;
        let file = mounts_under(&daemon.root)[0].join("zeros.bin");
        StallingLayer {
            daemon,
            proxy,
            file,
            _registry: registry,
        }
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A layer mounted lazily through a registry that then stalls: a read of a chunk that
/// is not local fails with EIO after one `fetch_timeout_sec` (not one per request the
/// kernel queues or retries), another read fails at once while the registry has just
/// left one unanswered, and once it answers again (and the timeout has passed) the same
/// file reads right.
#[tokio::test(flavor = "multi_thread")]
async fn a_registry_that_stalls_after_the_mount_gives_eio_in_one_timeout() {
    if testkit::skip_unless_root("a_registry_that_stalls_after_the_mount_gives_eio_in_one_timeout")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let stalling = StallingLayer::mount(dir.path()).await;
    let (proxy, daemon, file) = (&stalling.proxy, &stalling.daemon, stalling.file.clone());
    let timed_read = |path: std::path::PathBuf| async move {
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            (std::fs::read(&path), started.elapsed())
        })
        .await
        .unwrap()
    };

    proxy.set_stalled(true);
    let (read, took) = timed_read(file.clone()).await;
    eprintln!("a read with the registry stalled: {took:?}, {read:?}");
    assert_eq!(read.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(took >= TIMEOUT, "failed before the timeout: {took:?}");
    assert!(
        took < TIMEOUT + Duration::from_millis(1500),
        "waited {took:?}: more than one timeout of {TIMEOUT:?}"
    );
    let (read, took) = timed_read(file.clone()).await;
    eprintln!("the next read: {took:?}");
    assert_eq!(read.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(took < Duration::from_secs(1), "waited {took:?} again");
    let log = daemon.log();
    assert!(log.contains("left a request unanswered"), "{log}");

    proxy.set_stalled(false);
    tokio::time::sleep(TIMEOUT).await;
    let (read, took) = timed_read(file).await;
    eprintln!("with the registry answering again: {took:?}");
    let read = read.unwrap_or_else(|e| panic!("{e}; log:\n{}", daemon.log()));
    assert!(read.len() == 4 << 20 && read.iter().all(|&b| b == 0));
}

/// A reader stuck on a stalled registry dies at once when killed, and what was being
/// fetched for it ends within one `fetch_timeout_sec`: after that the daemon is idle,
/// and once the registry answers the file reads right.
#[tokio::test(flavor = "multi_thread")]
async fn a_reader_killed_while_the_registry_stalls_dies_at_once() {
    if testkit::skip_unless_root("a_reader_killed_while_the_registry_stalls_dies_at_once") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let stalling = StallingLayer::mount(dir.path()).await;
    let (proxy, daemon) = (&stalling.proxy, &stalling.daemon);
    proxy.set_stalled(true);
    let mut reader = std::process::Command::new("cat")
        .arg(&stalling.file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        reader.try_wait().unwrap().is_none(),
        "the read did not wait"
    );
    let killed = Instant::now();
    reader.kill().unwrap();
    let died = testkit::wait_until(Duration::from_secs(TIMEOUT.as_secs() * 2), || {
        reader.try_wait().unwrap().is_some()
    });
    let took = killed.elapsed();
    eprintln!("the killed reader was gone after {took:?}");
    assert!(
        died && took < Duration::from_secs(1),
        "killed, gone after {took:?}"
    );
    // Its request ends by the timeout, counted from when it was made.
    let ended = testkit::wait_until(TIMEOUT, || daemon.log().contains("range request failed"));
    assert!(ended, "{}", daemon.log());
    let before = testkit::process::cpu_time(daemon.pid());
    std::thread::sleep(Duration::from_secs(1));
    let spent = testkit::process::cpu_time(daemon.pid()) - before;
    assert!(
        spent < Duration::from_millis(100),
        "the daemon still worked {spent:?} in a second"
    );

    proxy.set_stalled(false);
    tokio::time::sleep(TIMEOUT).await;
    let read =
        std::fs::read(&stalling.file).unwrap_or_else(|e| panic!("{e}; log:\n{}", daemon.log()));
    assert!(read.len() == 4 << 20 && read.iter().all(|&b| b == 0));
}
