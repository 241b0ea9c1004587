//! `lazysnap fetch IMAGE...`: with the background fetch off, a lazily pulled image is
//! not local and not offline-ready; `lazysnap fetch` makes it wholly local at once
//! (status, metrics and `lazysnap status` then say offline-ready), and a container
//! reads every file of it back with the registry stopped. Fetching an image that is not
//! mounted, or one whose registry is down, fails clearly.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{LAZYSNAP, containerd_for, convert, file_digests, rpull_lazily, start_lazysnapd};
use testkit::image::{Entry, ImageBuilder, busybox_entries, noise};
use testkit::registry::Registry;

fn lazysnap(root: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(LAZYSNAP);
    cmd.args(args).arg("--root").arg(root);
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// GET `what` on lazysnapd's status socket.
async fn get(root: &Path, what: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(root.join(daemon::observe::STATUS_SOCKET))
        .await
        .unwrap();
    s.write_all(format!("GET {what} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn image(status: &daemon::observe::Status, name: &str) -> daemon::observe::ImageStatus {
    status
        .images
        .iter()
        .find(|i| i.image == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in {status:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_makes_an_image_wholly_local_and_offline_ready() {
    let name = "fetch_makes_an_image_wholly_local_and_offline_ready";
    if testkit::skip_unless_root(name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let host = registry.host.clone();
    // Nothing is fetched unless read or asked for.
    let daemon = start_lazysnapd(
        dir.path(),
        "[lazy]\nprefetch = false\nbackground_fetch = false\n",
    );
    let containerd = containerd_for(&daemon);
    let root = daemon.root.clone();

    let base = busybox_entries().unwrap();
    let app = vec![
        Entry::dir("app"),
        Entry::file("app/motd", "fetched ahead\n"),
        // Several chunks, several requests.
        Entry::file("app/big.bin", noise(9 << 20, 41)),
        Entry::file("app/mid.bin", noise(300 << 10, 42)),
        Entry::file("app/empty", ""),
    ];
    let mut expected = BTreeMap::new();
    file_digests(&base, &mut expected);
    file_digests(&app, &mut expected);
    let build = |app: &[Entry]| {
        ImageBuilder::new()
            .entries(&base)
            .unwrap()
            .entries(app)
            .unwrap()
            .cmd(&["/bin/cat", "/app/motd"])
            .build()
            .unwrap()
    };
    let plain = registry.push("fetch/app", "plain", &build(&app)).unwrap();
    let converted = format!("{host}/fetch/app:estargz");
    convert(&plain, &converted, &["--estargz"]);
    // A second image on the same base layer, pulled and never fetched.
    let other_app = vec![Entry::file("other.bin", noise(2 << 20, 43))];
    let plain = registry
        .push("fetch/other", "plain", &build(&other_app))
        .unwrap();
    let other = format!("{host}/fetch/other:estargz");
    convert(&plain, &other, &["--estargz"]);

    let report = rpull_lazily(&converted, &containerd).await;
    assert_eq!(report.layers.len(), 2, "{report:?}");
    // Its base layer is the first image's (already there); its own is mounted lazily.
    let report = daemon::rpull::rpull(&other, &common::rpull_options(&containerd))
        .await
        .unwrap();
    assert_eq!(
        report.layers.last().unwrap().outcome,
        daemon::rpull::LayerOutcome::Lazy,
        "{report:?}"
    );

    // Pulled lazily, metadata kept, but not local: not offline-ready.
    let status = testkit::wait_for(Duration::from_secs(30), async || {
        let s = daemon::observe::fetch_status(&root).await.ok()?;
        (s.layers.len() == 3 && s.layers.iter().all(|l| l.metadata_stored)).then_some(s)
    })
    .await
    .expect("three layers with their metadata kept");
    let before = image(&status, &converted);
    eprintln!("before: {before:?}");
    assert_eq!(before.layers.len(), 2, "{status:?}");
    assert!(before.local_bytes < before.total_bytes, "{before:?}");
    assert!(!before.offline_ready);
    assert_eq!(before.metadata_stored_layers, 2);
    // The other image's base layer is mounted once, under the first image's name (its
    // labels list only the layers from its own upward); its snapshot chain makes it the
    // other image's too.
    assert_eq!(image(&status, &other).layers.len(), 2, "{status:?}");

    // An image that is not mounted: a clear refusal, nothing fetched.
    let missing = format!("{host}/fetch/nothere:1");
    let out = lazysnap(&root, &["fetch", "--no-progress", &missing]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not mounted lazily") && stderr.contains(&missing),
        "{}",
        text(&out)
    );

    let out = lazysnap(&root, &["fetch", "--no-progress", &converted]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}", text(&out));
    assert!(
        stdout.contains(&format!("{converted}: ")) && stdout.contains("(100.0%)"),
        "{}",
        text(&out)
    );
    assert!(stdout.contains("offline-ready"), "{}", text(&out));

    let status = daemon::observe::fetch_status(&root).await.unwrap();
    let after = image(&status, &converted);
    assert_eq!(after.local_bytes, after.total_bytes, "{after:?}");
    assert_eq!(after.local_layers, 2);
    assert!(after.offline_ready, "{after:?}");
    assert!(!image(&status, &other).offline_ready, "{status:?}");
    let metrics = get(&root, "/metrics").await;
    for line in [
        format!("lazysnap_image_offline_ready{{image=\"{converted}\"}} 1"),
        format!("lazysnap_image_offline_ready{{image=\"{other}\"}} 0"),
        format!(
            "lazysnap_image_local_bytes{{image=\"{converted}\"}} {}",
            after.total_bytes
        ),
        format!(
            "lazysnap_image_total_bytes{{image=\"{converted}\"}} {}",
            after.total_bytes
        ),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }
    let out = lazysnap(&root, &["status"]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.contains("100.0%") && l.contains("ready") && l.ends_with(&converted)),
        "{table}"
    );

    // The registry goes: every file of the fetched image reads back.
    drop(registry);
    assert!(std::net::TcpStream::connect(&host).is_err());
    let mut cmd = vec![
        "run".to_string(),
        "--rm".into(),
        "--snapshotter".into(),
        "lazysnap".into(),
        converted.clone(),
        "fetch-1".into(),
        "/bin/busybox".into(),
        "sha256sum".into(),
    ];
    cmd.extend(expected.keys().cloned());
    let out = containerd
        .ctr(&cmd)
        .unwrap_or_else(|e| panic!("no container without the registry: {e}\n{}", daemon.log()));
    let got: BTreeMap<String, String> = out
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, path)| (path.trim().to_string(), sum.to_string()))
        .collect();
    assert_eq!(got, expected);
    let status = daemon::observe::fetch_status(&root).await.unwrap();
    let layers: Vec<_> = status
        .layers
        .iter()
        .filter(|l| after.layers.contains(&l.layer))
        .collect();
    assert!(layers.iter().all(|l| l.fetch_errors == 0), "{layers:?}");

    // With the registry down, the other image cannot be made local: a clear failure.
    let out = lazysnap(&root, &["fetch", "--no-progress", &other]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not made local") && stderr.contains(&other),
        "{}",
        text(&out)
    );
    eprintln!("{}", text(&out));
}
