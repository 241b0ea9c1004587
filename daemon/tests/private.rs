//! A private registry (docker-registry with htpasswd basic auth) and docker's config file:
//! `lazysnap convert` pushes with the credentials in `$DOCKER_CONFIG/config.json`,
//! `rpull` pulls with them, and lazysnapd mounts the layers lazily with the same file.
//! Without credentials lazysnapd's mount fails cleanly and containerd's side falls back
//! to downloading; with none anywhere the pull fails at once with an auth error. No
//! secret ever reaches lazysnapd's log.
//!
//! The registry speaks plain HTTP: distribution accepts htpasswd without TLS, and loopback
//! registries are plain HTTP for every lazysnap client. TLS with a private CA (hosts
//! config `ca`) is exercised by cri_keychain.rs.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use daemon::rpull::{LayerOutcome, RpullOptions, rpull};
use testkit::containerd::{Containerd, ContainerdOptions, mounts_under};
use testkit::image::noise;
use testkit::image::{Entry, ImageBuilder, busybox_layer};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::bytes_served;
use testkit::registry::{Registry, RegistryOptions};

const LAZYSNAPD: &str = env!("CARGO_BIN_EXE_lazysnapd");
const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
const USER: &str = "alice";

/// Longest any pull may take here: an auth failure must end it, not hang it.
const PULL_LIMIT: Duration = Duration::from_secs(120);

/// A bcrypt htpasswd file with one user, as `htpasswd -Bbn` writes it.
fn htpasswd(dir: &Path, user: &str, password: &str) -> PathBuf {
    let program = testkit::require_program("htpasswd", "apache2-utils").unwrap();
    let out = Command::new(program)
        .args(["-Bbn", user, password])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join("htpasswd");
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

/// A directory holding docker's `config.json` with an `auths` entry for `host`.
fn docker_config_dir(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    std::fs::write(
        dir.join("config.json"),
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    dir.to_path_buf()
}

/// Runs `lazysnap convert` with `DOCKER_CONFIG=docker_config`.
fn convert(src: &str, dst: &str, docker_config: &Path) -> std::process::Output {
    Command::new(LAZYSNAP)
        .args(["convert", "--no-progress-bars", "--estargz", src, dst])
        .env("DOCKER_CONFIG", docker_config)
        .output()
        .unwrap()
}

/// Fields drop in this order: containerd, lazysnapd, the registries, then the temp dir.
struct Setup {
    containerd: Containerd,
    daemon: Lazysnapd,
    private: Registry,
    public: Registry,
    dir: tempfile::TempDir,
    password: String,
    /// Holds config.json with the credentials.
    docker: PathBuf,
    /// Exists but holds no config.json: no credentials at all.
    no_docker: PathBuf,
}

fn setup(name: &str) -> Option<Setup> {
    if testkit::skip_unless_root(name) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let password = format!("pw-{}-Zq8x", std::process::id());
    let public = Registry::start(&dir.path().join("public")).unwrap();
    let private = Registry::start_with(
        &dir.path().join("private"),
        &RegistryOptions {
            htpasswd: Some(htpasswd(dir.path(), USER, &password)),
            tls: None,
            ..RegistryOptions::default()
        },
    )
    .unwrap();
    let docker = docker_config_dir(&dir.path().join("docker"), &private.host, USER, &password);
    let no_docker = dir.path().join("no-docker");
    std::fs::create_dir_all(&no_docker).unwrap();
    let config = dir.path().join("lazysnapd.toml");
    // No background fetch: what the registry serves is what the pull and container read.
    std::fs::write(&config, "[lazy]\nbackground_fetch = false\n").unwrap();
    // First without credentials; the test restarts it with them.
    let daemon = Lazysnapd::start_with_env(
        Path::new(LAZYSNAPD),
        &dir.path().join("ls"),
        &["--config", config.to_str().unwrap()],
        &[("DOCKER_CONFIG", no_docker.to_str().unwrap())],
    )
    .unwrap();
    let containerd = Containerd::start_with(
        &ContainerdOptions::default().proxy_snapshotter("lazysnap", &daemon.address),
    )
    .unwrap();
    Some(Setup {
        containerd,
        daemon,
        private,
        public,
        dir,
        password,
        docker,
        no_docker,
    })
}

fn rpull_options(s: &Setup, credentials: Arc<dyn registry::CredentialProvider>) -> RpullOptions {
    RpullOptions {
        address: s.containerd.address().to_path_buf(),
        namespace: s.containerd.namespace().to_string(),
        snapshotter: "lazysnap".into(),
        credentials: Some(credentials),
        ..RpullOptions::default()
    }
}

fn docker_credentials(s: &Setup) -> Arc<dyn registry::CredentialProvider> {
    Arc::new(registry::DockerConfig::load(&s.docker.join("config.json")).unwrap())
}

async fn pull(
    s: &Setup,
    reference: &str,
    credentials: Arc<dyn registry::CredentialProvider>,
) -> anyhow::Result<daemon::rpull::RpullReport> {
    let opts = rpull_options(s, credentials);
    tokio::time::timeout(PULL_LIMIT, rpull(reference, &opts))
        .await
        .unwrap_or_else(|_| panic!("rpull {reference} hung for {PULL_LIMIT:?}"))
}

fn assert_no_secret(s: &Setup, what: &str, text: &str) {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{}", s.password));
    assert!(
        !text.contains(&s.password) && !text.contains(&basic),
        "{what} holds the registry password:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn private_registry_with_docker_config() {
    let Some(mut s) = setup("private_registry_with_docker_config") else {
        return;
    };
    // Plain images in a public registry; `lazysnap convert` writes them to the private one.
    let app = ImageBuilder::new()
        .layer(busybox_layer().unwrap())
        .entries(&[
            Entry::dir("app"),
            Entry::file("app/motd", "private-and-lazy\n"),
            Entry::file("app/big.bin", noise(16 << 20, 11)),
        ])
        .unwrap()
        .cmd(&["/bin/cat", "/app/motd"])
        .build()
        .unwrap();
    let app_plain = s.public.push("app", "plain", &app).unwrap();
    let data = ImageBuilder::new()
        .entries(&[
            Entry::dir("data"),
            Entry::file("data/blob", noise(1 << 20, 12)),
        ])
        .unwrap()
        .build()
        .unwrap();
    let data_plain = s.public.push("data", "plain", &data).unwrap();
    let app_ref = format!("{}/team/app:estargz", s.private.host);
    let data_ref = format!("{}/team/data:estargz", s.private.host);

    // convert needs the credentials to push, and says so when it has none.
    let refused = convert(&app_plain, &app_ref, &s.no_docker);
    let stderr = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(!refused.status.success(), "pushed without credentials");
    assert!(
        stderr.contains("credentials") && stderr.contains(&s.private.host),
        "unclear error: {stderr}"
    );
    for (src, dst) in [(&app_plain, &app_ref), (&data_plain, &data_ref)] {
        let out = convert(src, dst, &s.docker);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "convert {src} → {dst}: {stderr}");
        assert_no_secret(&s, "convert's output", &stderr);
    }

    // No credentials anywhere: the pull fails at once, and says why.
    let err = pull(&s, &app_ref, Arc::new(registry::Anonymous))
        .await
        .expect_err("pulled a private image anonymously");
    let text = format!("{err:#}");
    assert!(
        text.contains("credentials") && text.contains(&s.private.host),
        "unclear error: {text}"
    );

    // lazysnapd has no credentials, the client does: each lazy mount fails on auth and
    // the layer is downloaded instead; the pull succeeds.
    let report = pull(&s, &data_ref, docker_credentials(&s)).await.unwrap();
    assert!(!report.layers.is_empty());
    let log = s.daemon.log();
    for layer in &report.layers {
        assert_eq!(
            layer.outcome,
            LayerOutcome::Downloaded,
            "layer {}; lazysnapd log:\n{log}",
            layer.digest
        );
        assert!(
            log.lines().any(|l| l.contains("lazy pull not possible")
                && l.contains(&layer.digest)
                && l.contains("credentials")),
            "no auth failure logged for {}:\n{log}",
            layer.digest
        );
    }

    // With the docker config, every layer of the app is mounted lazily and it runs.
    s.daemon.stop().unwrap();
    let docker = s.docker.to_str().unwrap().to_string();
    s.daemon.set_env("DOCKER_CONFIG", &docker);
    s.daemon.restart().unwrap();
    // containerd redials the proxy plugin with backoff: wait until it is through.
    let reconnected = testkit::wait_until(Duration::from_secs(30), || {
        s.containerd
            .ctr(["snapshots", "--snapshotter", "lazysnap", "ls"])
            .is_ok()
    });
    assert!(reconnected, "containerd did not reconnect to lazysnapd");
    let report = pull(&s, &app_ref, docker_credentials(&s)).await.unwrap();
    assert_eq!(report.layers.len(), 2);
    for layer in &report.layers {
        assert_eq!(
            layer.outcome,
            LayerOutcome::Lazy,
            "layer {} was not mounted lazily; lazysnapd log:\n{}",
            layer.digest,
            s.daemon.log()
        );
    }
    let out = s
        .containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            &app_ref,
            "private-1",
        ])
        .unwrap();
    assert!(
        out.contains("private-and-lazy"),
        "container printed {out:?}"
    );
    // The big file stayed in the registry: the layers really are lazy.
    let registry_log = s.private.log();
    let (served, size): (u64, u64) = report
        .layers
        .iter()
        .map(|l| (bytes_served(&registry_log, &l.digest), l.size))
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    eprintln!("{served} of {size} compressed bytes served before the first output");
    assert!(
        served > 0 && served * 4 < size,
        "{served} of {size} bytes served"
    );
    assert_no_secret(&s, "lazysnapd's log", &s.daemon.log());

    s.containerd
        .ctr(["image", "rm", "--sync", &app_ref, &data_ref])
        .unwrap();
    let dirs = [s.dir.path().to_path_buf(), s.containerd.dir().to_path_buf()];
    drop(s);
    let left: Vec<PathBuf> = dirs.iter().flat_map(|d| mounts_under(d)).collect();
    assert_eq!(left, Vec::<PathBuf>::new());
}
