//! Docker Engine on lazysnap: a dockerd of the test's own (Debian sid's Docker 28, see
//! testkit::docker) with the containerd image store on and `"storage-driver": "lazysnap"`,
//! on a containerd 2.x whose proxy plugin `lazysnap` is lazysnapd. Docker labels the
//! snapshots it prepares as CRI does (`containerd.io/snapshot/cri.*`), not as
//! stargz-snapshotter's tools do: those labels are all lazysnapd gets. The system's
//! Docker, if any, is never touched (own socket, data root, exec root, no bridge).

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::path::Path;
use std::time::Duration;

use common::{LAZYSNAPD, layers_of, push_busybox_app};
use testkit::containerd::{Containerd, ContainerdOptions, Release, mounts_under};
use testkit::docker::Dockerd;
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::{Registry, bytes_served};

/// The file no container reads: it must stay in the registry.
const BIG: usize = 24 << 20;
const USER: &str = "docker-user";

/// Fields drop in this order: dockerd, containerd, lazysnapd, the registries, the dir.
struct Setup {
    dockerd: Dockerd,
    containerd: Containerd,
    daemon: Lazysnapd,
    public: Registry,
    /// The same images behind basic auth.
    private: Registry,
    password: String,
    _dir: tempfile::TempDir,
}

fn setup(name: &str) -> Option<Setup> {
    if testkit::skip_unless_root(name) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let password = format!("dk-{}-Qx7p", std::process::id());
    let public = Registry::start(&d.join("public")).unwrap();
    // The same images behind a password.
    let private = public
        .private_twin(&d.join("private"), USER, &password, None)
        .unwrap();

    // lazysnapd's docker config is the one the docker CLI logs in to, as for a user
    // running both as root (/root/.docker/config.json).
    let cli_config = d.join("docker-cli");
    std::fs::create_dir_all(&cli_config).unwrap();
    let config = d.join("lazysnapd.toml");
    // No background fetch: what the registry serves is what the pull and containers read.
    std::fs::write(&config, "[lazy]\nbackground_fetch = false\n").unwrap();
    let daemon = Lazysnapd::start_with_env(
        Path::new(LAZYSNAPD),
        &d.join("ls"),
        &["--config", config.to_str().unwrap()],
        &[("DOCKER_CONFIG", cli_config.to_str().unwrap())],
    )
    .unwrap();
    let containerd = Containerd::start_with(
        &ContainerdOptions::default()
            .release(Release::Sid)
            .proxy_snapshotter("lazysnap", &daemon.address),
    )
    .unwrap();
    let dockerd = Dockerd::start(&containerd, "lazysnap", Some(&cli_config)).unwrap();
    Some(Setup {
        dockerd,
        containerd,
        daemon,
        public,
        private,
        password,
        _dir: dir,
    })
}

fn lazily_mounted(s: &Setup) -> usize {
    s.daemon.log().matches("layer mounted lazily").count()
}

fn fuse_mounts(s: &Setup) -> usize {
    fusefs::mountinfo::mounts()
        .iter()
        .filter(|m| m.fs_type.starts_with("fuse") && m.mount_point.starts_with(&s.daemon.root))
        .count()
}

fn run(s: &Setup, image: &str, cmd: &[&str]) -> String {
    let mut args = vec!["run", "--rm", "--network", "none", image];
    args.extend_from_slice(cmd);
    s.dockerd.docker(args).unwrap()
}

/// Every image and container removed through Docker: nothing of lazysnapd's stays.
fn remove_all_and_check_clean(s: &Setup) {
    let containers = s.dockerd.docker(["ps", "-aq"]).unwrap();
    for id in containers.split_whitespace() {
        s.dockerd.docker(["rm", "-f", id]).unwrap();
    }
    let images = s.dockerd.docker(["images", "-q", "--no-trunc"]).unwrap();
    let mut ids: Vec<&str> = images.split_whitespace().collect();
    ids.sort();
    ids.dedup();
    for id in ids {
        s.dockerd.docker(["rmi", "-f", id]).unwrap();
    }
    let clean = testkit::wait_until(Duration::from_secs(30), || {
        mounts_under(&s.daemon.root).is_empty()
            && std::fs::read_dir(s.daemon.root.join("snapshots")).map_or(0, |d| d.count()) == 0
    });
    assert!(
        clean,
        "left behind: mounts {:?}, snapshots {:?}\n{}",
        mounts_under(&s.daemon.root),
        std::fs::read_dir(s.daemon.root.join("snapshots"))
            .map(|d| d.count())
            .ok(),
        s.containerd
            .ctr([
                "--namespace",
                "moby",
                "snapshots",
                "--snapshotter",
                "lazysnap",
                "ls"
            ])
            .unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_pulls_estargz_lazily_runs_builds_and_commits() {
    let Some(s) = setup("docker_pulls_estargz_lazily_runs_builds_and_commits") else {
        return;
    };
    let (_, image) = push_busybox_app(&s.public, "docker/app", BIG, 5);

    let started = std::time::Instant::now();
    let pulled = s.dockerd.docker(["pull", &image]).unwrap();
    eprintln!("docker pull ({:?}):\n{pulled}", started.elapsed());
    eprintln!("{}", s.dockerd.docker(["images"]).unwrap());
    // Docker labels its snapshots as CRI does; stargz-snapshotter's labels never come.
    let log = s.daemon.log();
    assert!(
        log.contains(snapshotter::remote::LABEL_CRI_LAYER_DIGEST),
        "{log}"
    );
    assert!(
        log.contains(snapshotter::remote::LABEL_CRI_IMAGE_REF),
        "{log}"
    );
    assert!(
        !log.contains(snapshotter::remote::LABEL_STARGZ_REFERENCE),
        "{log}"
    );
    let layers = layers_of(&image).await;
    assert_eq!(
        lazily_mounted(&s),
        layers.len(),
        "not every layer was mounted lazily:\n{}",
        s.daemon.log()
    );
    assert_eq!(fuse_mounts(&s), layers.len(), "FUSE mounts of the layers");

    for attempt in ["first", "second"] {
        let out = run(&s, &image, &[]);
        assert!(
            out.contains("served-lazily"),
            "{attempt} run printed {out:?}"
        );
    }
    // The big file stayed in the registry (busybox's layer is one binary, read whole).
    let log = s.public.log();
    for (digest, size) in &layers {
        let served = bytes_served(&log, digest);
        eprintln!(
            "layer {digest}: {served} of {size} compressed bytes served ({:.1}%)",
            served as f64 * 100.0 / *size as f64
        );
    }
    let (digest, size) = layers.iter().max_by_key(|(_, size)| *size).unwrap();
    let served = bytes_served(&log, digest);
    assert!(
        served * 4 < *size,
        "layer {digest}: {served} of {size} served"
    );

    // `docker build` on top of the lazy image (Docker's own builder: BuildKit needs the
    // buildx plugin, which the test does not install).
    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        format!("FROM {image}\nRUN cp /app/motd /app/built && echo built-here >> /app/built\n"),
    )
    .unwrap();
    s.dockerd
        .docker([
            "build",
            "--network",
            "none",
            "-t",
            "lazysnap-test/built:1",
            context.path().to_str().unwrap(),
        ])
        .unwrap();
    let out = run(&s, "lazysnap-test/built:1", &["cat", "/app/built"]);
    assert!(
        out.contains("served-lazily") && out.contains("built-here"),
        "{out:?}"
    );

    // `docker commit` of a container running on the lazy image.
    s.dockerd
        .docker([
            "run",
            "--name",
            "to-commit",
            "--network",
            "none",
            &image,
            "sh",
            "-c",
            "echo committed-here > /app/new",
        ])
        .unwrap();
    s.dockerd
        .docker(["commit", "to-commit", "lazysnap-test/committed:1"])
        .unwrap();
    let out = run(
        &s,
        "lazysnap-test/committed:1",
        &["cat", "/app/new", "/app/motd"],
    );
    assert!(
        out.contains("committed-here") && out.contains("served-lazily"),
        "{out:?}"
    );
    remove_all_and_check_clean(&s);
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_falls_back_for_gzip_and_uses_docker_login_credentials() {
    let Some(s) = setup("docker_falls_back_for_gzip_and_uses_docker_login_credentials") else {
        return;
    };
    let (plain, _) = push_busybox_app(&s.public, "docker/app", BIG, 5);

    // A plain gzip image: downloaded and unpacked, no lazy mount, runs.
    s.dockerd.docker(["pull", &plain]).unwrap();
    assert_eq!(lazily_mounted(&s), 0, "{}", s.daemon.log());
    let out = run(&s, &plain, &[]);
    assert!(out.contains("served-lazily"), "{out:?}");
    remove_all_and_check_clean(&s);

    // A private registry: `docker login` writes the credentials that lazysnapd reads.
    let private = format!("{}/docker/app:estargz", s.private.host);
    let refused = s.dockerd.docker(["pull", &private]).unwrap_err();
    assert!(
        refused.to_string().contains("no basic auth credentials")
            || refused.to_string().to_lowercase().contains("unauthorized"),
        "{refused:#}"
    );
    s.dockerd
        .docker_with_stdin(
            [
                "login",
                "--username",
                USER,
                "--password-stdin",
                &s.private.host,
            ],
            s.password.as_bytes(),
        )
        .unwrap();
    s.dockerd.docker(["pull", &private]).unwrap();
    let layers = layers_of(&format!("{}/docker/app:estargz", s.public.host)).await;
    assert_eq!(
        lazily_mounted(&s),
        layers.len(),
        "the private image's layers were not all mounted lazily:\n{}",
        s.daemon.log()
    );
    let out = run(&s, &private, &[]);
    assert!(out.contains("served-lazily"), "{out:?}");
    // lazysnapd fetched from the private registry with the password docker login saved.
    let log = s.private.log();
    let served: u64 = layers.iter().map(|(d, _)| bytes_served(&log, d)).sum();
    assert!(
        served > 0,
        "lazysnapd fetched nothing from the private registry"
    );
    remove_all_and_check_clean(&s);
}
