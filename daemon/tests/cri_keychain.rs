//! Kubernetes image-pull secrets reach lazy mounts through the CRI keychain: lazysnapd
//! serves `runtime.v1.ImageService` on its socket (where the kubelet's
//! `--image-service-endpoint` would point), keeps the credentials of each PullImage in
//! memory and forwards the call to containerd's CRI plugin (`snapshotter = "lazysnap"`).
//! The registry is private (TLS with a CA made here, htpasswd basic auth) and lazysnapd
//! has no docker config at all: every layer still mounts lazily, with the pod's
//! credentials, over TLS trusted through the hosts config (`[resolver.host."H"] ca`).

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use daemon::cri::{AuthConfig, CriClient};
use testkit::containerd::{
    Containerd, ContainerdOptions, CriSettings, Release, cri_config, mounts_under,
};
use testkit::image::noise;
use testkit::image::{Entry, ImageBuilder, busybox_layer};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::Registry;
use testkit::registry::bytes_served;

const LAZYSNAPD: &str = env!("CARGO_BIN_EXE_lazysnapd");
const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
const USER: &str = "kube-puller";

/// Size of the file nobody reads; it must stay in the registry.
const BIG: usize = 16 << 20;

/// Host paths CRI would use by default; the test configures them all into temp dirs.
const HOST_PATHS: &[&str] = &[
    "/etc/cni",
    "/etc/containerd",
    "/opt/cni",
    "/var/lib/containerd",
    "/var/log/pods",
];

/// Fields drop in this order: lazysnapd's CRI clients first (in the test), then
/// containerd, lazysnapd, the registries and last the temp dir.
struct Setup {
    containerd: Containerd,
    daemon: Lazysnapd,
    private: Registry,
    public: Registry,
    dir: tempfile::TempDir,
    password: String,
    /// `PRIVATE/cri/app:estargz`.
    app: String,
}

fn setup(name: &str) -> Option<Setup> {
    if testkit::skip_unless_root(name) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    testkit::tls::TestPki::new(d).expect("test certificates");
    let password = format!("kc-{}-Vb3w", std::process::id());

    // `lazysnap convert` cannot be told about a private CA, and loopback registries are
    // plain HTTP to it: it writes to a public plain-HTTP registry whose storage the
    // private TLS one serves too.
    let public = Registry::start(&d.join("public")).unwrap();
    let private = public
        .private_twin(
            &d.join("private"),
            USER,
            &password,
            Some((d.join("server.pem"), d.join("server.key"))),
        )
        .unwrap();
    let image = ImageBuilder::new()
        .layer(busybox_layer().unwrap())
        .entries(&[
            Entry::dir("app"),
            Entry::file("app/motd", "served-lazily\n"),
            Entry::file("app/big.bin", noise(BIG, 9)),
        ])
        .unwrap()
        .cmd(&["/bin/cat", "/app/motd"])
        .build()
        .unwrap();
    let plain = public.push("cri/app", "plain", &image).unwrap();
    let out = Command::new(LAZYSNAP)
        .args(["convert", "--no-progress-bars", "--estargz", &plain])
        .arg(format!("{}/cri/app:estargz", public.host))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let app = format!("{}/cri/app:estargz", private.host);

    // containerd first: lazysnapd's config names containerd's socket. containerd's proxy
    // plugin dials lazysnapd's (future) socket only when used.
    let ls_dir = d.join("ls");
    let containerd = Containerd::start_with(
        &ContainerdOptions::default()
            .keep_cri()
            .proxy_snapshotter("lazysnap", &ls_dir.join("lazysnap.sock"))
            .extra_config(
                &cri_config(
                    Release::from_env().unwrap(),
                    &CriSettings {
                        dir: d,
                        snapshotter: "lazysnap",
                        sandbox_image: None,
                        registry_host: &private.host,
                        registry_ca: Some(&d.join("ca.pem")),
                    },
                )
                .unwrap(),
            ),
    )
    .unwrap();
    let config = d.join("lazysnapd.toml");
    std::fs::write(
        &config,
        format!(
            "[lazy]\nbackground_fetch = false\n\
             [cri_keychain]\nenable_keychain = true\nimage_service_path = \"{socket}\"\n\
             [resolver.host.\"{host}\"]\nca = [\"{ca}\"]\n",
            socket = containerd.address().display(),
            host = private.host,
            ca = d.join("ca.pem").display(),
        ),
    )
    .unwrap();
    // An empty DOCKER_CONFIG: lazysnapd has no docker credentials at all.
    let no_docker = d.join("no-docker");
    std::fs::create_dir_all(&no_docker).unwrap();
    let daemon = Lazysnapd::start_with_env(
        Path::new(LAZYSNAPD),
        &ls_dir,
        &["--config", config.to_str().unwrap()],
        &[("DOCKER_CONFIG", no_docker.to_str().unwrap())],
    )
    .unwrap();
    Some(Setup {
        containerd,
        daemon,
        private,
        public,
        dir,
        password,
        app,
    })
}

/// A CRI client of lazysnapd's socket, once the CRI behind it answers (containerd's CRI
/// plugin says "not initialized" for a while after start).
async fn cri_client(s: &Setup) -> CriClient {
    let mut last = String::new();
    let client = testkit::wait_for(Duration::from_secs(30), async || {
        let mut client = match CriClient::connect(&s.daemon.address).await {
            Ok(client) => client,
            Err(e) => {
                last = e.to_string();
                return None;
            }
        };
        match client.image_fs_info().await {
            Ok(filesystems) if !filesystems.is_empty() => Some(client),
            Ok(_) => {
                last = "ImageFsInfo listed no filesystem".into();
                None
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
            "CRI through lazysnapd did not answer: {last}\nlazysnapd log:\n{}\ncontainerd log:\n{}",
            s.daemon.log(),
            s.containerd.log()
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn cri_pull_secrets_reach_lazy_mounts() {
    let host_paths_before: Vec<bool> = HOST_PATHS.iter().map(|p| Path::new(p).exists()).collect();
    let Some(mut s) = setup("cri_pull_secrets_reach_lazy_mounts") else {
        return;
    };
    let mut cri = cri_client(&s).await;

    // Without credentials the private registry refuses containerd, and the error comes
    // back through the proxy unchanged.
    let refused = cri
        .pull_image(&s.app, None)
        .await
        .expect_err("pulled a private image without credentials");
    let text = refused.message().to_lowercase();
    assert!(
        // 1.6 passes the registry's 401 on; 2.x says "authorization failed".
        text.contains("401")
            || text.contains("unauthorized")
            || text.contains("authorization failed"),
        "{refused:?}"
    );

    // With the pod's credentials, as the kubelet sends them: pulled, every layer lazily.
    let auth = AuthConfig {
        username: USER.into(),
        password: s.password.clone(),
        server_address: format!("https://{}", s.private.host),
        ..AuthConfig::default()
    };
    let image_id = cri
        .pull_image_with_auth(&s.app, Some(auth), None)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PullImage {}: {e}\nlazysnapd log:\n{}\ncontainerd log:\n{}",
                s.app,
                s.daemon.log(),
                s.containerd.log()
            )
        });
    let log = s.daemon.log();
    assert!(
        log.contains("keeping the credentials of a CRI PullImage"),
        "{log}"
    );
    let client = registry::Client::new(registry::RegistryConfig::default()).unwrap();
    let public_ref = s.app.replace(&s.private.host, &s.public.host);
    let layers = client
        .resolve(&public_ref.parse().unwrap())
        .await
        .unwrap()
        .manifest
        .layers;
    assert_eq!(layers.len(), 2);
    for layer in &layers {
        let digest = layer.digest.to_string();
        assert!(
            log.lines()
                .any(|l| l.contains("layer mounted lazily") && l.contains(&digest)),
            "layer {digest} was not mounted lazily; lazysnapd log:\n{log}"
        );
    }

    // The other ImageService calls go through too.
    let status = cri.image_status(&s.app).await.unwrap();
    assert_eq!(status.map(|i| i.id), Some(image_id.clone()));
    let listed = cri.list_images().await.unwrap();
    assert!(listed.iter().any(|i| i.id == image_id), "{listed:?}");

    // A file read through the lazily mounted layer is fetched with the pod's credentials.
    let motd = mounts_under(&s.daemon.root)
        .into_iter()
        .find_map(|m| std::fs::read_to_string(m.join("app/motd")).ok());
    assert_eq!(motd.as_deref(), Some("served-lazily\n"));
    let registry_log = s.private.log();
    let big = layers.iter().max_by_key(|l| l.size).unwrap();
    let served = bytes_served(&registry_log, &big.digest.to_string());
    eprintln!("{served} of {} bytes of the big layer served", big.size);
    // Some (the TOC, the file read) but far from all of it.
    assert!(
        served > 0 && served * 10 < big.size,
        "{served} of {} bytes served",
        big.size
    );

    // A crashed lazysnapd's successor takes the layers over and keeps fetching the
    // unread parts from the private registry: the pod's credentials survived in the
    // root-only file (there are no others: no docker config, no hosts credentials).
    s.daemon.kill().unwrap();
    s.daemon.restart().unwrap();
    // containerd redials its proxy plugin with back-off, and the garbage collection
    // after the image removal below must reach lazysnapd: wait until a call that
    // containerd passes to the plugin (Prepare; listing is answered from containerd's
    // own metadata) goes through.
    let snap = |verb: &str| {
        s.containerd.ctr([
            "snapshots",
            "--snapshotter",
            "lazysnap",
            verb,
            "reconnect-probe",
        ])
    };
    let reconnected = testkit::wait_until(Duration::from_secs(60), || {
        snap("prepare").is_ok() && snap("rm").is_ok()
    });
    assert!(
        reconnected,
        "containerd did not reach the restarted lazysnapd"
    );
    let mounted = mounts_under(&s.daemon.root);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let read = mounted
            .iter()
            .find_map(|m| std::fs::read(m.join("app/big.bin")).ok());
        let _ = tx.send(read);
    });
    let read = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no read after the restart; log:\n{}", s.daemon.log()));
    assert!(
        read == Some(noise(BIG, 9)),
        "big.bin differs after the restart"
    );
    let served_after = bytes_served(&s.private.log(), &big.digest.to_string());
    assert!(
        served_after > served + (BIG as u64) / 2,
        "{served_after} bytes served after the restart, {served} before"
    );

    // The secret is nowhere in lazysnapd's log, not even base64-encoded.
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{}", s.password));
    let log = s.daemon.log();
    assert!(
        !log.contains(&s.password) && !log.contains(&basic),
        "lazysnapd logged the password:\n{log}"
    );

    cri.remove_image(&s.app).await.unwrap();
    assert!(cri.image_status(&s.app).await.unwrap().is_none());
    // Removing the image garbage-collects its snapshots: lazysnapd unmounts the layers.
    let clean = testkit::wait_until(Duration::from_secs(30), || {
        mounts_under(&s.daemon.root).is_empty()
    });
    assert!(
        clean,
        "still mounted: {:?}\nlazysnapd log:\n{}\ncontainerd log:\n{}",
        mounts_under(&s.daemon.root),
        s.daemon.log(),
        s.containerd.log()
    );

    let dirs = [s.containerd.dir().to_path_buf(), s.dir.path().to_path_buf()];
    drop(cri);
    drop(s);
    let left: Vec<PathBuf> = dirs.iter().flat_map(|d| mounts_under(d)).collect();
    assert_eq!(left, Vec::<PathBuf>::new());
    let host_paths_after: Vec<bool> = HOST_PATHS.iter().map(|p| Path::new(p).exists()).collect();
    assert_eq!(
        host_paths_before, host_paths_after,
        "host paths {HOST_PATHS:?} changed"
    );
}
