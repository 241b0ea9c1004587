//! The plugin set end to end (real plugin programs in a temp dir, a fake clock), and
//! the config, matching and answer checks it rests on.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::config::*;
use super::exchange::*;
use super::matching::*;
use super::plugin::*;
use super::*;

const V1: &str = "credentialprovider.kubelet.k8s.io/v1";

/// kubelet's documented example, as YAML.
const KUBELET_EXAMPLE: &str = r#"
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider
    matchImages:
      - "*.dkr.ecr.*.amazonaws.com"
      - "*.dkr.ecr.*.amazonaws.com.cn"
    defaultCacheDuration: "12h"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args:
      - get-credentials
    env:
      - name: AWS_PROFILE
        value: node
  - name: gcp-credential-provider
    matchImages: ["gcr.io", "*.pkg.dev"]
    defaultCacheDuration: 1h30m
    apiVersion: credentialprovider.kubelet.k8s.io/v1beta1
"#;

#[test]
fn kubelet_configs_are_read_from_yaml_and_json() {
    let plugins = parse_config(KUBELET_EXAMPLE).unwrap();
    assert_eq!(plugins.len(), 2);
    assert_eq!(
        plugins[0],
        PluginSpec {
            name: "ecr-credential-provider".into(),
            match_images: vec![
                "*.dkr.ecr.*.amazonaws.com".into(),
                "*.dkr.ecr.*.amazonaws.com.cn".into()
            ],
            default_cache_duration: Duration::from_secs(12 * 3600),
            api_version: V1.into(),
            args: vec!["get-credentials".into()],
            env: vec![("AWS_PROFILE".into(), "node".into())],
        }
    );
    assert_eq!(plugins[1].default_cache_duration, Duration::from_secs(5400));
    assert!(plugins[1].args.is_empty() && plugins[1].env.is_empty());
    let json = r#"{
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "CredentialProviderConfig",
            "providers": [{
                "name": "acr-credential-provider",
                "matchImages": ["*.azurecr.io"],
                "defaultCacheDuration": "10m",
                "apiVersion": "credentialprovider.kubelet.k8s.io/v1alpha1",
                "args": ["--config", "/etc/azure.json"]
            }]
        }"#;
    let plugins = parse_config(json).unwrap();
    assert_eq!(plugins[0].name, "acr-credential-provider");
    assert_eq!(plugins[0].args, ["--config", "/etc/azure.json"]);
    assert_eq!(plugins[0].default_cache_duration, Duration::from_secs(600));
}

#[test]
fn configs_kubelet_refuses_are_refused_with_the_reason() {
    let provider = |fields: &str| {
        format!(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - {fields}\n"
        )
    };
    let good = "name: p\n    matchImages: [\"a.io\"]\n    defaultCacheDuration: 1m\n    apiVersion: credentialprovider.kubelet.k8s.io/v1";
    assert!(parse_config(&provider(good)).is_ok());
    let cases: Vec<(String, &str)> = vec![
        (good.replace("name: p", "name: ../p"), "plain file name"),
        (good.replace("name: p", "name: \"a b\""), "plain file name"),
        (good.replace("name: p", "name: .."), "plain file name"),
        (
            good.replace("matchImages: [\"a.io\"]", "matchImages: []"),
            "matchImages",
        ),
        (
            good.replace("\n    matchImages: [\"a.io\"]", ""),
            "matchImages",
        ),
        (
            good.replace("[\"a.io\"]", "[\"a.io:http\"]"),
            "not a valid pattern",
        ),
        (
            good.replace("\n    defaultCacheDuration: 1m", ""),
            "defaultCacheDuration is required",
        ),
        (good.replace("1m", "-1m"), "must not be negative"),
        (good.replace("1m", "5"), "defaultCacheDuration"),
        (good.replace("1m", "1 day"), "defaultCacheDuration"),
        (
            good.replace("kubelet.k8s.io/v1", "kubelet.k8s.io/v2"),
            "apiVersion",
        ),
        (
            good.replace("\n    apiVersion: credentialprovider.kubelet.k8s.io/v1", ""),
            "apiVersion",
        ),
        (
            format!("{good}\n    tokenAttributes: {{}}"),
            "tokenAttributes",
        ),
        (format!("{good}\n  - {good}"), "twice"),
    ];
    for (fields, reason) in cases {
        let text = provider(&fields);
        let err = parse_config(&text).unwrap_err();
        assert!(
            err.contains(reason),
            "{text}\nrefused with {err:?}, not {reason:?}"
        );
    }
    for (text, reason) in [
        (
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders: []\n",
            "at least one provider",
        ),
        (
            "apiVersion: kubelet.config.k8s.io/v2\nkind: CredentialProviderConfig\nproviders: []\n",
            "apiVersion",
        ),
        (
            "apiVersion: kubelet.config.k8s.io/v1\nkind: KubeletConfiguration\nproviders: []\n",
            "kind",
        ),
        (
            "kind: CredentialProviderConfig\nproviders: []\n",
            "apiVersion",
        ),
        (
            r#"{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[],"extra":1}"#,
            "extra",
        ),
        ("providers: [", "YAML"),
    ] {
        let err = parse_config(text).unwrap_err();
        assert!(
            err.contains(reason),
            "{text}\nrefused with {err:?}, not {reason:?}"
        );
    }
}

/// kubelet's TestURLsMatch cases and the patterns of its docs.
#[test]
fn match_images_match_as_kubelet_matches() {
    for (pattern, image, expected) in [
        ("*.kubernetes.io", "prefix.kubernetes.io", true),
        ("prefix.*.io", "prefix.kubernetes.io", true),
        ("prefix.kubernetes.*", "prefix.kubernetes.io", true),
        ("*-good.kubernetes.io", "prefix-good.kubernetes.io", true),
        ("*.kubernetes.io/blah", "prefix.kubernetes.io/blah", true),
        ("prefix.*.io/foo", "prefix.kubernetes.io/foo/bar", true),
        (
            "*.kubernetes.io:1111/blah",
            "prefix.kubernetes.io:1111/blah",
            true,
        ),
        (
            "prefix.*.io:1111/foo",
            "prefix.kubernetes.io:1111/foo/bar",
            true,
        ),
        ("*.kubernetes.io", "kubernetes.io", false),
        ("*.*.kubernetes.io", "prefix.kubernetes.io", false),
        ("*.*.kubernetes.io", "kubernetes.io", false),
        ("*kubernetes.io", "a.kubernetes.io", false),
        (
            "*.kubernetes.io:1234/blah",
            "prefix.kubernetes.io/blah",
            false,
        ),
        (
            "prefix.kubernetes.io/foo",
            "prefix.kubernetes.io:1234/foo",
            false,
        ),
        ("*.kubernetes.io/blah", "prefix.kubernetes.io/foo", false),
        (
            "*.kubernetes.io:1111/blah",
            "prefix.kubernetes.io:2222/blah",
            false,
        ),
        // The docs' examples.
        (
            "*.dkr.ecr.*.amazonaws.com",
            "123456789.dkr.ecr.us-east-1.amazonaws.com/app",
            true,
        ),
        (
            "*.dkr.ecr.*.amazonaws.com",
            "dkr.ecr.us-east-1.amazonaws.com/app",
            false,
        ),
        ("*.azurecr.io", "myregistry.azurecr.io/team/app", true),
        ("*.registry.io", "a.b.registry.io/x", false),
        ("gcr.io", "gcr.io/project/app", true),
        ("registry.io:8080/path", "registry.io:8080/path/app", true),
        ("registry.io:8080/path", "registry.io/path/app", false),
        ("127.0.0.1:5000", "127.0.0.1:5000/team/app", true),
        // No port in the pattern matches only no port.
        ("127.0.0.1", "127.0.0.1:5000/team/app", false),
        // The path is a plain prefix, as in kubelet.
        ("reg.io/team", "reg.io/teams/app", true),
        ("reg.io/team/", "reg.io/teams/app", false),
        // Schemes are ignored; globs are Go's.
        ("https://reg.io", "reg.io/app", true),
        ("r*.io", "reg.io/app", true),
        // `?` starts a URL's query in kubelet's parser; `^` and `\` are not taken in
        // a host name.
        ("r?g.io", "reg.io/app", false),
        ("r[a-f]g.io", "reg.io/app", true),
        ("r[x-z]g.io", "reg.io/app", false),
        ("r[^x]g.io", "reg.io/app", false),
        ("r[]g.io", "reg.io/app", false),
        ("r\\eg.io", "reg.io/app", false),
    ] {
        assert_eq!(
            image_matches(pattern, image),
            expected,
            "{pattern} vs {image}"
        );
    }
}

fn answer(auth: &str, cache: &str) -> String {
    format!(
        r#"{{"kind":"CredentialProviderResponse","apiVersion":"{V1}","cacheKeyType":"Registry"{cache},"auth":{auth}}}"#
    )
}

#[test]
fn responses_are_checked_and_the_most_specific_entry_wins() {
    let text = answer(
        r#"{"https://reg.io":{"username":"host","password":"p1"},
                "reg.io/team":{"username":"team","password":"p2"},
                "reg.io/v2/team/app":{"username":"app","password":"p3"},
                "*.other.io":{"username":"glob","password":"p4"},
                "index.docker.io":{"username":"hub","password":"p5"}}"#,
        r#","cacheDuration":"5m""#,
    );
    let parsed = parse_response(text.as_bytes(), V1).unwrap();
    assert_eq!(parsed.cache_key_type, CacheKeyType::Registry);
    assert_eq!(parsed.cache_duration, Some(300_000_000_000));
    let user = |image: &str| pick_auth(&parsed.auth, image).map(|c| c.username);
    assert_eq!(user("reg.io/team/app").as_deref(), Some("app"));
    assert_eq!(user("reg.io/team/db").as_deref(), Some("team"));
    assert_eq!(user("reg.io/solo").as_deref(), Some("host"));
    assert_eq!(user("x.other.io/a").as_deref(), Some("glob"));
    assert_eq!(user("docker.io/library/busybox").as_deref(), Some("hub"));
    assert_eq!(user("elsewhere.io/a"), None);

    for (bad, reason) in [
        (text.replace("CredentialProviderResponse", "Other"), "kind"),
        (
            text.replace(V1, "credentialprovider.kubelet.k8s.io/v1beta1"),
            "apiVersion",
        ),
        (text.replace("Registry", "Host"), "cacheKeyType"),
        (text.replace("5m", "five"), "cacheDuration"),
        (text.replace("\"p1\"", "[\"p1-secret\"]"), "JSON"),
    ] {
        let err = parse_response(bad.as_bytes(), V1).unwrap_err();
        assert!(err.contains(reason), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }
}

/// A fake clock that moves only when told.
fn fake_clock() -> (Clock, Arc<AtomicU64>) {
    let start = Instant::now();
    let offset = Arc::new(AtomicU64::new(0));
    let seen = offset.clone();
    let clock: Clock = Arc::new(move || start + Duration::from_secs(seen.load(Ordering::SeqCst)));
    (clock, offset)
}

/// A bin dir with plugin `name` (a shell script) and a config naming it.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Setup {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    /// The calls the plugins recorded, one line each.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn plugin(&self, name: &str, body: &str) {
        std::fs::create_dir_all(self.bin()).unwrap();
        let path = self.bin().join(name);
        let calls = self.dir.path().join("calls");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"$(cat)\" >> '{}'\n{body}\n",
                calls.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// `providers` entries: (name, matchImages, defaultCacheDuration).
    fn write_config(&self, providers: &[(&str, &str, &str)]) {
        let mut text = String::from(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n",
        );
        for (name, pattern, duration) in providers {
            text += &format!(
                "  - name: {name}\n    matchImages: [\"{pattern}\"]\n    defaultCacheDuration: \"{duration}\"\n    apiVersion: {V1}\n    args: [\"--flag\", \"two words\"]\n    env: [{{name: PLUGIN_MODE, value: test}}]\n"
            );
        }
        std::fs::write(self.config(), text).unwrap();
    }

    fn load(&self, timeout: Duration, clock: Clock) -> CredentialPlugins {
        CredentialPlugins::load_with_clock(&self.config(), &self.bin(), timeout, clock).unwrap()
    }
}

/// A plugin printing `answer` (credentials alice / pw-N for reg.io).
fn printing(key_type: &str, cache: &str) -> String {
    format!(
        "cat <<'EOF'\n{}\nEOF",
        answer(
            r#"{"reg.io":{"username":"alice","password":"pw-1"}}"#,
            cache
        )
        .replace("Registry", key_type)
    )
}

async fn user(plugins: &CredentialPlugins, host: &str, repository: &str) -> Option<String> {
    plugins
        .credentials_for(host, repository)
        .await
        .unwrap()
        .map(|c| format!("{}:{}", c.username, c.expose_secret()))
}

#[tokio::test]
async fn the_plugin_gets_kubelet_s_request_args_and_env() {
    let s = Setup::new();
    s.plugin(
        "p",
        &format!(
            "printf '%s|' \"$@\" \"$PLUGIN_MODE\" \"${{PATH:+has-path}}\" >> '{}'\n{}",
            s.dir.path().join("calls").display(),
            printing("Image", "")
        ),
    );
    s.write_config(&[("p", "reg.io", "1m")]);
    let plugins = s.load(Duration::from_secs(10), Arc::new(Instant::now));
    assert_eq!(plugins.names(), ["p"]);
    assert_eq!(
        user(&plugins, "reg.io", "team/app").await.as_deref(),
        Some("alice:pw-1")
    );
    let calls = s.calls();
    let request: serde_json::Value = serde_json::from_str(&calls[0]).unwrap();
    assert_eq!(
        request,
        serde_json::json!({"kind": "CredentialProviderRequest", "apiVersion": V1, "image": "reg.io/team/app"})
    );
    assert_eq!(calls[1], "--flag|two words|test|has-path|");
    // Not matched by matchImages: not run at all.
    assert_eq!(user(&plugins, "other.io", "team/app").await, None);
    assert_eq!(s.calls().len(), 2);
}

#[tokio::test]
async fn answers_are_cached_per_key_type_for_their_duration() {
    for (key_type, cache, same_registry_cached, lifetime) in [
        ("Registry", r#","cacheDuration":"10s""#, true, Some(10)),
        ("Image", r#","cacheDuration":"10s""#, false, Some(10)),
        ("Global", "", true, Some(60)), // the default, 1m
        ("Registry", r#","cacheDuration":"0s""#, false, None),
    ] {
        let s = Setup::new();
        s.plugin("p", &printing(key_type, cache));
        s.write_config(&[("p", "reg.io", "1m")]);
        let (clock, offset) = fake_clock();
        let plugins = s.load(Duration::from_secs(10), clock);
        let case = format!("{key_type} {cache}");
        assert_eq!(
            user(&plugins, "reg.io", "a").await.as_deref(),
            Some("alice:pw-1")
        );
        assert_eq!(
            user(&plugins, "reg.io", "a").await.as_deref(),
            Some("alice:pw-1")
        );
        let cached = lifetime.is_some();
        assert_eq!(s.calls().len(), if cached { 1 } else { 2 }, "{case}");
        let before = s.calls().len();
        assert!(user(&plugins, "reg.io", "b").await.is_some());
        assert_eq!(s.calls().len() == before, same_registry_cached, "{case}");
        if let Some(secs) = lifetime {
            let before = s.calls().len();
            offset.store(secs - 1, Ordering::SeqCst);
            assert!(user(&plugins, "reg.io", "a").await.is_some());
            assert_eq!(s.calls().len(), before, "{case}: expired early");
            offset.store(secs, Ordering::SeqCst);
            assert!(user(&plugins, "reg.io", "a").await.is_some());
            assert_eq!(s.calls().len(), before + 1, "{case}: not expired");
        }
    }
}

#[tokio::test]
async fn a_failing_plugin_gives_nothing_and_is_not_rerun_at_once() {
    let s = Setup::new();
    s.plugin("p", "echo 'token endpoint said no' >&2\nexit 1");
    s.write_config(&[("p", "reg.io", "1m")]);
    let (clock, offset) = fake_clock();
    let plugins = s.load(Duration::from_secs(10), clock);
    assert_eq!(user(&plugins, "reg.io", "a").await, None);
    assert_eq!(user(&plugins, "reg.io", "a").await, None);
    assert_eq!(s.calls().len(), 1);
    offset.store(FAILURE_BACKOFF.as_secs(), Ordering::SeqCst);
    assert_eq!(user(&plugins, "reg.io", "a").await, None);
    assert_eq!(s.calls().len(), 2);
    // An answer that is not JSON, or names other registries only: nothing either.
    s.plugin("p", "echo not-json");
    assert_eq!(user(&plugins, "reg.io", "b").await, None);
    s.plugin(
        "p",
        &printing("Image", "").replace("\"reg.io\"", "\"else.io\""),
    );
    assert_eq!(user(&plugins, "reg.io", "c").await, None);
    assert_eq!(s.calls().len(), 4);
}

#[tokio::test]
async fn a_hanging_plugin_is_killed_after_the_timeout() {
    let s = Setup::new();
    let pid_file = s.dir.path().join("sleep.pid");
    s.plugin(
        "p",
        &format!("sleep 30 &\necho $! > '{}'\nwait", pid_file.display()),
    );
    s.write_config(&[("p", "reg.io", "1m")]);
    let plugins = s.load(Duration::from_millis(500), Arc::new(Instant::now));
    let started = Instant::now();
    assert_eq!(user(&plugins, "reg.io", "a").await, None);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // What the script started went with it (gone, or a zombie awaiting its reaper).
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()));
    let gone = testkit_free_wait(|| {
        std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    });
    assert!(gone, "the plugin's sleep survived: {stat:?}");
}

fn testkit_free_wait(done: impl Fn() -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_run_the_plugin_once() {
    let s = Setup::new();
    s.plugin("p", &format!("sleep 0.3\n{}", printing("Image", "")));
    s.write_config(&[("p", "reg.io", "1m")]);
    let plugins = Arc::new(s.load(Duration::from_secs(10), Arc::new(Instant::now)));
    let lookups: Vec<_> = (0..4)
        .map(|_| {
            let plugins = plugins.clone();
            tokio::spawn(async move { user(&plugins, "reg.io", "a").await })
        })
        .collect();
    for lookup in lookups {
        assert_eq!(lookup.await.unwrap().as_deref(), Some("alice:pw-1"));
    }
    assert_eq!(s.calls().len(), 1);
}

#[tokio::test]
async fn plugins_are_asked_in_order_and_other_sources_still_apply() {
    let s = Setup::new();
    s.plugin("broken", "exit 3");
    s.plugin("good", &printing("Image", ""));
    s.write_config(&[("broken", "reg.io", "1m"), ("good", "reg.io", "1m")]);
    let plugins = Arc::new(s.load(Duration::from_secs(10), Arc::new(Instant::now)));
    assert_eq!(
        user(&plugins, "reg.io", "a").await.as_deref(),
        Some("alice:pw-1")
    );
    assert_eq!(s.calls().len(), 2);

    // In the daemon's chain, a plugin with nothing leaves docker's config to answer.
    let docker = Arc::new(registry::StaticCredentials(HashMap::from([
        ("other.io".to_string(), Credentials::new("docker", "d")),
        ("reg.io".to_string(), Credentials::new("docker", "d")),
    ])));
    let chain = crate::keychain::FirstOf(vec![plugins, docker]);
    let found = chain
        .credentials_for("other.io", "a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.username, "docker");
    let found = chain.credentials_for("reg.io", "a").await.unwrap().unwrap();
    assert_eq!(found.username, "alice");
    // The host alone (no repository): patterns without a path still match.
    let found = chain.credentials("reg.io").await.unwrap().unwrap();
    assert_eq!(found.username, "alice");
}

#[test]
fn docker_hub_is_asked_about_as_docker_io() {
    assert_eq!(
        image_name("registry-1.docker.io", "library/busybox"),
        "docker.io/library/busybox"
    );
    assert_eq!(
        image_name("127.0.0.1:5000", "team/app"),
        "127.0.0.1:5000/team/app"
    );
    assert_eq!(image_name("reg.io", ""), "reg.io");
}

#[test]
fn load_and_reload_check_the_plugins_are_there() {
    let s = Setup::new();
    s.plugin("p", "exit 0");
    s.write_config(&[("p", "reg.io", "1m"), ("missing", "reg.io", "1m")]);
    let err = CredentialPlugins::load(&s.config(), &s.bin(), Duration::from_secs(1)).unwrap_err();
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
    s.write_config(&[("p", "reg.io", "1m")]);
    let plugins = CredentialPlugins::load(&s.config(), &s.bin(), Duration::from_secs(1)).unwrap();
    s.plugin("q", "exit 0");
    s.write_config(&[("q", "reg.io", "1m"), ("p", "reg.io", "1m")]);
    plugins.reload().unwrap();
    assert_eq!(plugins.names(), ["q", "p"]);
    std::fs::write(s.config(), "kind: Nonsense\n").unwrap();
    assert!(plugins.reload().is_err());
    assert_eq!(
        plugins.names(),
        ["q", "p"],
        "a bad file leaves the plugins in force"
    );
}
