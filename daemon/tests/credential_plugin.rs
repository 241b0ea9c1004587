//! kubelet's credential provider plugins give lazysnapd the credentials of a private
//! registry (docker-registry with htpasswd basic auth) it has no other credentials for:
//! a plugin of the test's own (a shell script in a bin dir, named by a kubelet
//! `CredentialProviderConfig`) prints them, every layer mounts lazily, and its answer is
//! cached for the duration it gives (a second image's mounts do not run it again). A
//! plugin that hangs is killed after `timeout_sec` and logged; the layers fall back to
//! downloading, and once docker's config has the credentials they mount lazily with them.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{LAZYSNAPD, convert, push_busybox_app, rpull_options};
use daemon::rpull::{LayerOutcome, RpullReport, rpull};
use testkit::containerd::{Containerd, mounts_under};
use testkit::image::{Entry, ImageBuilder, noise};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::{Registry, bytes_served};

const USER: &str = "plugin-user";
const PLUGIN: &str = "lazysnap-test-provider";
/// Longest any pull may take here: a hanging plugin must not hang it.
const PULL_LIMIT: Duration = Duration::from_secs(120);

/// Fields drop in this order: containerd, lazysnapd, the registries, then the temp dir.
struct Setup {
    containerd: Containerd,
    daemon: Lazysnapd,
    private: Registry,
    /// Holds the images the private twin serves.
    _public: Registry,
    dir: tempfile::TempDir,
    password: String,
    /// `DOCKER_CONFIG` of lazysnapd: empty unless a test writes config.json into it.
    docker: PathBuf,
}

impl Setup {
    /// The requests the plugin got, one JSON line each.
    fn plugin_calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn credentials(&self) -> Arc<dyn registry::CredentialProvider> {
        Arc::new(registry::StaticCredentials(
            [(
                self.private.host.clone(),
                registry::Credentials::new(USER, &self.password),
            )]
            .into(),
        ))
    }

    /// Pulls with the client's own credentials (containerd's side of a pull).
    async fn pull(&self, reference: &str) -> RpullReport {
        let mut opts = rpull_options(&self.containerd);
        opts.credentials = Some(self.credentials());
        tokio::time::timeout(PULL_LIMIT, rpull(reference, &opts))
            .await
            .unwrap_or_else(|_| panic!("rpull {reference} hung for {PULL_LIMIT:?}"))
            .unwrap()
    }

    fn assert_outcome(&self, report: &RpullReport, outcome: LayerOutcome) {
        assert!(!report.layers.is_empty());
        for layer in &report.layers {
            assert_eq!(
                layer.outcome,
                outcome,
                "layer {}; lazysnapd log:\n{}",
                layer.digest,
                self.daemon.log()
            );
        }
    }

    fn assert_no_secret(&self) {
        let log = self.daemon.log();
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{}", self.password));
        assert!(
            !log.contains(&self.password) && !log.contains(&basic),
            "lazysnapd's log holds the registry password:\n{log}"
        );
    }

    /// Removes the images; nothing may stay mounted once everything is stopped.
    fn finish(self, references: &[&str]) {
        let mut args = vec!["image", "rm", "--sync"];
        args.extend_from_slice(references);
        self.containerd.ctr(args).unwrap();
        let dirs = [
            self.dir.path().to_path_buf(),
            self.containerd.dir().to_path_buf(),
        ];
        drop(self);
        let left: Vec<PathBuf> = dirs.iter().flat_map(|d| mounts_under(d)).collect();
        assert_eq!(left, Vec::<PathBuf>::new());
    }
}

/// A registry with `team/app:estargz` (busybox and a motd) and `team/data:estargz`, and
/// its password-protected twin; lazysnapd runs `plugin_body` as its credential provider
/// plugin, for images of the twin, killed after `timeout_sec`.
fn setup(name: &str, plugin_body: &str, timeout_sec: u64) -> Option<Setup> {
    if testkit::skip_unless_root(name) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let password = format!("cp-{}-Wk3v", std::process::id());
    let public = Registry::start(&d.join("public")).unwrap();
    push_busybox_app(&public, "team/app", 8 << 20, 31);
    let data = ImageBuilder::new()
        .entries(&[
            Entry::dir("data"),
            Entry::file("data/blob", noise(1 << 20, 32)),
        ])
        .unwrap()
        .build()
        .unwrap();
    let data_plain = public.push("team/data", "plain", &data).unwrap();
    convert(
        &data_plain,
        &format!("{}/team/data:estargz", public.host),
        &["--estargz"],
    );
    let private = public
        .private_twin(&d.join("private"), USER, &password, None)
        .unwrap();

    // The plugin records each request (its stdin) before doing what the test says.
    let bin = d.join("plugins");
    std::fs::create_dir_all(&bin).unwrap();
    let plugin = bin.join(PLUGIN);
    let body = plugin_body
        .replace("@HOST@", &private.host)
        .replace("@PASSWORD@", &password);
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\necho \"$(cat)\" >> '{}'\n{body}\n",
            d.join("calls").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let kubelet_config = d.join("credential-provider.yaml");
    std::fs::write(
        &kubelet_config,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1\n\
             kind: CredentialProviderConfig\n\
             providers:\n\
             \x20 - name: {PLUGIN}\n\
             \x20   matchImages: [\"{}\"]\n\
             \x20   defaultCacheDuration: 1m\n\
             \x20   apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
            private.host
        ),
    )
    .unwrap();

    let docker = d.join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    let config = d.join("lazysnapd.toml");
    // No background fetch: what the registry serves is what the pull and container read.
    std::fs::write(
        &config,
        format!(
            "[lazy]\nbackground_fetch = false\n\n[credential_provider]\nconfig = \"{}\"\n\
             bin_dir = \"{}\"\ntimeout_sec = {timeout_sec}\n",
            kubelet_config.display(),
            bin.display()
        ),
    )
    .unwrap();
    let daemon = Lazysnapd::start_with_env(
        Path::new(LAZYSNAPD),
        &d.join("ls"),
        &["--config", config.to_str().unwrap()],
        &[("DOCKER_CONFIG", docker.to_str().unwrap())],
    )
    .unwrap();
    let containerd = common::containerd_for(&daemon);
    Some(Setup {
        containerd,
        daemon,
        private,
        _public: public,
        dir,
        password,
        docker,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_s_credentials_mount_layers_lazily_and_are_cached() {
    // Cached per registry for 5 minutes: every layer of both images is one run.
    let answer = r#"cat <<EOF
{"kind":"CredentialProviderResponse","apiVersion":"credentialprovider.kubelet.k8s.io/v1","cacheKeyType":"Registry","cacheDuration":"5m","auth":{"@HOST@":{"username":"plugin-user","password":"@PASSWORD@"}}}
EOF"#;
    let Some(s) = setup(
        "a_plugin_s_credentials_mount_layers_lazily_and_are_cached",
        answer,
        5,
    ) else {
        return;
    };
    let app = format!("{}/team/app:estargz", s.private.host);
    let report = s.pull(&app).await;
    assert_eq!(report.layers.len(), 2);
    s.assert_outcome(&report, LayerOutcome::Lazy);
    let calls = s.plugin_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let request: serde_json::Value = serde_json::from_str(&calls[0]).unwrap();
    assert_eq!(
        request,
        serde_json::json!({
            "kind": "CredentialProviderRequest",
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
            "image": format!("{}/team/app", s.private.host),
        })
    );

    let out = s
        .containerd
        .ctr(["run", "--rm", "--snapshotter", "lazysnap", &app, "plugin-1"])
        .unwrap();
    assert!(out.contains("served-lazily"), "container printed {out:?}");
    // The big file stayed in the registry: the layers really are lazy.
    let registry_log = s.private.log();
    let served: u64 = report
        .layers
        .iter()
        .map(|l| bytes_served(&registry_log, &l.digest))
        .sum();
    let size: u64 = report.layers.iter().map(|l| l.size).sum();
    assert!(
        served > 0 && served * 4 < size,
        "{served} of {size} bytes served"
    );

    // Another image of the registry within the cache duration: no new run.
    let data = format!("{}/team/data:estargz", s.private.host);
    let report = s.pull(&data).await;
    s.assert_outcome(&report, LayerOutcome::Lazy);
    assert_eq!(s.plugin_calls().len(), 1, "the cached answer was not used");
    assert!(
        s.daemon
            .log()
            .contains("credentials from a kubelet credential provider plugin"),
        "{}",
        s.daemon.log()
    );
    s.assert_no_secret();
    s.finish(&[&app, &data]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_plugin_times_out_and_other_sources_still_apply() {
    let Some(s) = setup(
        "a_hanging_plugin_times_out_and_other_sources_still_apply",
        "sleep 60",
        1,
    ) else {
        return;
    };
    // No other credentials: the mounts fail cleanly and the layers are downloaded.
    let data = format!("{}/team/data:estargz", s.private.host);
    let started = Instant::now();
    let report = s.pull(&data).await;
    s.assert_outcome(&report, LayerOutcome::Downloaded);
    eprintln!("pull with a hanging plugin took {:?}", started.elapsed());
    let log = s.daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("credential provider plugin failed")
                && l.contains(PLUGIN)
                && l.contains("no answer within 1s")),
        "the timeout was not logged:\n{log}"
    );
    assert!(
        log.contains("lazy pull not possible"),
        "no fallback logged:\n{log}"
    );

    // docker's config has them now (read when it changes): the plugin still hangs, and
    // the next image's layers mount lazily with docker's credentials.
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{}", s.password));
    std::fs::write(
        s.docker.join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#,
            s.private.host
        ),
    )
    .unwrap();
    let app = format!("{}/team/app:estargz", s.private.host);
    let report = s.pull(&app).await;
    s.assert_outcome(&report, LayerOutcome::Lazy);
    let calls = s.plugin_calls();
    assert!(
        calls.iter().any(|c| c.contains("/team/app")),
        "the plugin was not asked about the second image: {calls:?}"
    );
    let timeouts = s.daemon.log().matches("no answer within 1s").count();
    assert!(timeouts >= 2, "{}", s.daemon.log());
    s.assert_no_secret();
    s.finish(&[&data, &app]);
}
