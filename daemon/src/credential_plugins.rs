//! kubelet's credential provider plugins: the exec plugins ECR, GCR and ACR nodes use for
//! registry tokens, run from the kubelet's own `CredentialProviderConfig` (its
//! `--image-credential-provider-config` and `--image-credential-provider-bin-dir`).
//!
//! A plugin whose `matchImages` match an image gets a `CredentialProviderRequest` for it on
//! stdin and prints a `CredentialProviderResponse`; the answer is cached per image,
//! registry or globally, as the plugin asks, for as long as it says. A plugin that fails,
//! hangs or has nothing for the image gives no credentials here, so the other sources
//! (CRI keychain, docker's config) still apply.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use estargz::lock;
use registry::{CredentialFuture, CredentialProvider, Credentials};
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const CONFIG_KIND: &str = "CredentialProviderConfig";
const CONFIG_API_VERSIONS: [&str; 3] = [
    "kubelet.config.k8s.io/v1",
    "kubelet.config.k8s.io/v1beta1",
    "kubelet.config.k8s.io/v1alpha1",
];
/// The versions of the request and response a plugin may speak.
const PLUGIN_API_VERSIONS: [&str; 3] = [
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
];
const REQUEST_KIND: &str = "CredentialProviderRequest";
const RESPONSE_KIND: &str = "CredentialProviderResponse";

/// A plugin that failed for an image is not run again for it this long: lazy reads of a
/// basic-auth registry ask for credentials on every request, and each would wait out the
/// timeout of a hanging plugin.
const FAILURE_BACKOFF: Duration = Duration::from_secs(30);
/// More than any real answer; a plugin printing without end is cut off.
const MAX_RESPONSE_BYTES: u64 = 1 << 20;
const MAX_STDERR_BYTES: u64 = 64 << 10;
/// How much of a failing plugin's stderr reaches the log.
const STDERR_LINES: usize = 3;
const STDERR_LINE_CHARS: usize = 200;

/// kubelet's key for answers with `cacheKeyType: Global`.
const GLOBAL_CACHE_KEY: &str = "global";

/// One plugin of the config, checked as kubelet checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSpec {
    /// The plugin's file name in the bin dir.
    pub name: String,
    pub match_images: Vec<String>,
    /// Used when the plugin's answer names no `cacheDuration`; zero: not cached.
    pub default_cache_duration: Duration,
    /// Of the request and response (`credentialprovider.kubelet.k8s.io/v1`).
    pub api_version: String,
    pub args: Vec<String>,
    /// Added to lazysnapd's environment for the plugin.
    pub env: Vec<(String, String)>,
}

// The file's own form. kubelet decodes it strictly: unknown fields are refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigFile {
    kind: String,
    api_version: String,
    #[serde(default)]
    providers: Vec<ProviderFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ProviderFile {
    name: String,
    #[serde(default)]
    match_images: Vec<String>,
    default_cache_duration: Option<String>,
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvVar {
    name: String,
    value: String,
}

/// Parses and checks a `CredentialProviderConfig`, YAML or JSON as kubelet reads it (JSON
/// when it starts with `{`).
pub fn parse_config(text: &str) -> Result<Vec<PluginSpec>, String> {
    let file: ConfigFile = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| format!("not a valid config (JSON): {e}"))?
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| format!("not a valid config (YAML): {e}"))?
    };
    if file.kind != CONFIG_KIND {
        return Err(format!("kind is {:?}, not {CONFIG_KIND:?}", file.kind));
    }
    if !CONFIG_API_VERSIONS.contains(&file.api_version.as_str()) {
        return Err(format!(
            "apiVersion {:?} is not one of {CONFIG_API_VERSIONS:?}",
            file.api_version
        ));
    }
    if file.providers.is_empty() {
        return Err("providers: at least one provider is required".into());
    }
    let mut plugins: Vec<PluginSpec> = Vec::new();
    for provider in file.providers {
        let name = provider.name;
        let bad = |why: String| format!("provider {name:?}: {why}");
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', ' ']) {
            return Err(bad(
                "name must be a plain file name in the bin dir (no '/', no spaces)".into(),
            ));
        }
        if plugins.iter().any(|p| p.name == name) {
            return Err(bad("name appears twice".into()));
        }
        if !PLUGIN_API_VERSIONS.contains(&provider.api_version.as_str()) {
            return Err(bad(format!(
                "apiVersion {:?} is not one of {PLUGIN_API_VERSIONS:?}",
                provider.api_version
            )));
        }
        if provider.match_images.is_empty() {
            return Err(bad("matchImages: at least one pattern is required".into()));
        }
        if let Some(pattern) = provider
            .match_images
            .iter()
            .find(|p| SchemelessUrl::parse(p).is_none())
        {
            return Err(bad(format!(
                "matchImages: {pattern:?} is not a valid pattern"
            )));
        }
        let Some(duration) = provider.default_cache_duration else {
            return Err(bad("defaultCacheDuration is required".into()));
        };
        let nanos = registry::go_duration::parse_go_duration(&duration)
            .map_err(|e| bad(format!("defaultCacheDuration: {e}")))?;
        if nanos < 0 {
            return Err(bad("defaultCacheDuration must not be negative".into()));
        }
        plugins.push(PluginSpec {
            default_cache_duration: duration_of(nanos),
            match_images: provider.match_images,
            api_version: provider.api_version,
            args: provider.args,
            env: provider
                .env
                .into_iter()
                .map(|e| (e.name, e.value))
                .collect(),
            name,
        });
    }
    Ok(plugins)
}

/// Negative durations count as zero (an answer already expired).
fn duration_of(nanos: i128) -> Duration {
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
}

/// `host[:port][/path]` as kubelet's `ParseSchemelessURL` sees it.
#[derive(Debug, PartialEq, Eq)]
struct SchemelessUrl<'a> {
    host: &'a str,
    port: &'a str,
    path: &'a str,
}

impl<'a> SchemelessUrl<'a> {
    /// None where Go's URL parser would fail: spaces, control characters, a port that is
    /// not a number.
    fn parse(text: &'a str) -> Option<Self> {
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return None;
        }
        let text = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"))
            .unwrap_or(text);
        let text = text.split(['?', '#']).next().unwrap_or(text);
        let (authority, path) = match text.find('/') {
            Some(at) => text.split_at(at),
            None => (text, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => (authority, ""),
        };
        // Go's URL parser takes these in a host name (and `%` escapes); `*`, `[` and
        // `]` among them, so globs pass. A `?` starts the query, so it never globs here.
        let host_char = |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=[]<>\"%".contains(c);
        if !port.bytes().all(|b| b.is_ascii_digit()) || !host.chars().all(host_char) {
            return None;
        }
        Some(SchemelessUrl { host, port, path })
    }
}

/// kubelet's `URLsMatchStr`: does `image` (`host[:port]/repository`) match `pattern`?
/// Each DNS label of the host is a glob (`*` stays within the label, and the number of
/// labels must be the same); the ports must be equal (no port matches only no port); the
/// pattern's path must be a prefix of the image's.
pub fn image_matches(pattern: &str, image: &str) -> bool {
    let (Some(glob), Some(target)) = (SchemelessUrl::parse(pattern), SchemelessUrl::parse(image))
    else {
        return false;
    };
    if glob.port != target.port || !target.path.starts_with(glob.path) {
        return false;
    }
    let globs: Vec<&str> = glob.host.split('.').collect();
    let labels: Vec<&str> = target.host.split('.').collect();
    globs.len() == labels.len()
        && globs.iter().zip(&labels).all(|(g, l)| {
            let g: Vec<char> = g.chars().collect();
            let l: Vec<char> = l.chars().collect();
            glob_matches(&g, &l)
        })
}

/// Go's `filepath.Match` on one label: `*`, `?`, `[a-z]`, `[^a-z]`, `\` escapes. A
/// malformed pattern matches nothing, as kubelet ignores the error.
fn glob_matches(pattern: &[char], text: &[char]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some(('*', rest)) => (0..=text.len()).any(|skip| glob_matches(rest, &text[skip..])),
        Some(('?', rest)) => !text.is_empty() && glob_matches(rest, &text[1..]),
        Some(('[', rest)) => {
            let Some((&c, text_rest)) = text.split_first() else {
                return false;
            };
            match class_matches(rest, c) {
                Some((true, after)) => glob_matches(after, text_rest),
                _ => false,
            }
        }
        Some(('\\', rest)) => match rest.split_first() {
            Some((escaped, rest)) => {
                text.first() == Some(escaped) && glob_matches(rest, &text[1..])
            }
            None => false,
        },
        Some((c, rest)) => text.first() == Some(c) && glob_matches(rest, &text[1..]),
    }
}

/// A `[...]` class after its `[`: whether `c` is in it, and the pattern after the `]`;
/// None when the class is malformed.
fn class_matches(pattern: &[char], c: char) -> Option<(bool, &[char])> {
    let (negated, mut rest) = match pattern.split_first() {
        Some(('^', rest)) => (true, rest),
        _ => (false, pattern),
    };
    let mut found = false;
    let mut ranges = 0;
    loop {
        let (&first, after) = rest.split_first()?;
        if first == ']' && ranges > 0 {
            return Some((found != negated, after));
        }
        let take_char = |p: &'_ [char]| -> Option<(char, usize)> {
            match p.first()? {
                '\\' => Some((*p.get(1)?, 2)),
                ']' | '-' => None,
                other => Some((*other, 1)),
            }
        };
        let (lo, used) = take_char(rest)?;
        rest = &rest[used..];
        let mut hi = lo;
        if rest.first() == Some(&'-') {
            let (h, used) = take_char(&rest[1..])?;
            hi = h;
            rest = &rest[1 + used..];
        }
        found |= lo <= c && c <= hi;
        ranges += 1;
    }
}

/// The `auth` keys of an answer as kubelet's keyring keeps them: no scheme, `/v1/` and
/// `/v2/` dropped, a bare `/` path dropped.
fn auth_key(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let (host, path) = match key.find('/') {
        Some(at) => key.split_at(at),
        None => (key, ""),
    };
    let path = if path.starts_with("/v2/") || path.starts_with("/v1/") {
        &path[3..]
    } else {
        path
    };
    if path.is_empty() || path == "/" {
        host.to_string()
    } else {
        format!("{host}{path}")
    }
}

/// Which answers share a cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheKeyType {
    Image,
    Registry,
    Global,
}

/// A plugin's answer, its `auth` keys in kubelet's order of trying: reverse-sorted, so a
/// longer path of a host comes before the host.
#[derive(Debug)]
struct Answer {
    cache_key_type: CacheKeyType,
    /// Nanoseconds; None: the provider's `defaultCacheDuration`.
    cache_duration: Option<i128>,
    auth: Vec<(String, Credentials)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResponseFile {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    cache_key_type: String,
    #[serde(default)]
    cache_duration: Option<String>,
    #[serde(default)]
    auth: BTreeMap<String, AuthFile>,
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// Reads a plugin's stdout, which must answer in `api_version`.
fn parse_response(stdout: &[u8], api_version: &str) -> Result<Answer, String> {
    // Only where: serde's message may quote a value, and values here are secrets.
    let file: ResponseFile = serde_json::from_slice(stdout).map_err(|e| {
        format!(
            "printed something that is not a {RESPONSE_KIND} (JSON error at line {} column {})",
            e.line(),
            e.column()
        )
    })?;
    if file.kind != RESPONSE_KIND {
        return Err(format!(
            "answered kind {:?}, not {RESPONSE_KIND:?}",
            file.kind
        ));
    }
    if file.api_version != api_version {
        return Err(format!(
            "answered apiVersion {:?}, not the configured {api_version:?}",
            file.api_version
        ));
    }
    let cache_key_type = match file.cache_key_type.as_str() {
        "Image" => CacheKeyType::Image,
        "Registry" => CacheKeyType::Registry,
        "Global" => CacheKeyType::Global,
        other => {
            return Err(format!(
                "answered cacheKeyType {other:?}, not Image, Registry or Global"
            ));
        }
    };
    let cache_duration = match &file.cache_duration {
        Some(d) => Some(
            registry::go_duration::parse_go_duration(d)
                .map_err(|e| format!("cacheDuration: {e}"))?,
        ),
        None => None,
    };
    let mut auth: Vec<(String, Credentials)> = file
        .auth
        .into_iter()
        .map(|(key, a)| (auth_key(&key), Credentials::new(a.username, a.password)))
        .collect();
    auth.sort_by(|a, b| b.0.cmp(&a.0));
    auth.dedup_by(|a, b| a.0 == b.0);
    Ok(Answer {
        cache_key_type,
        cache_duration,
        auth,
    })
}

/// The credentials kubelet's keyring tries first for `image`: the first key that matches,
/// else, for Docker Hub, an `index.docker.io` entry.
fn pick_auth(auth: &[(String, Credentials)], image: &str) -> Option<Credentials> {
    let matched = auth.iter().find(|(key, _)| image_matches(key, image));
    let hub = || {
        (registry_of(image) == "docker.io")
            .then(|| auth.iter().find(|(key, _)| key == "index.docker.io"))
            .flatten()
    };
    matched.or_else(hub).map(|(_, c)| c.clone())
}

/// kubelet's `parseRegistry`: what comes before the first `/`.
fn registry_of(image: &str) -> &str {
    image.split('/').next().unwrap_or(image)
}

/// The image name a plugin is asked about, as kubelet writes it: Docker Hub as
/// `docker.io`, no tag or digest.
pub fn image_name(host: &str, repository: &str) -> String {
    let host = match host {
        "registry-1.docker.io" | "index.docker.io" => "docker.io",
        other => other,
    };
    if repository.is_empty() {
        host.to_string()
    } else {
        format!("{host}/{repository}")
    }
}

type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

struct CachedAnswer {
    expires: Instant,
    auth: Arc<[(String, Credentials)]>,
}

/// One plugin, with its cache.
struct Plugin {
    spec: PluginSpec,
    path: PathBuf,
    /// By image, registry or `global`, as each answer said.
    cache: Mutex<HashMap<String, CachedAnswer>>,
    /// Images the plugin just failed for, and until when it is not run for them again.
    failed: Mutex<HashMap<String, Instant>>,
    /// One run per image at a time; the others wait and take its answer from the cache.
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Plugin {
    fn new(spec: PluginSpec, bin_dir: &Path) -> Self {
        Plugin {
            path: bin_dir.join(&spec.name),
            spec,
            cache: Mutex::default(),
            failed: Mutex::default(),
            flights: Mutex::default(),
        }
    }

    fn wants(&self, image: &str) -> bool {
        self.spec
            .match_images
            .iter()
            .any(|pattern| image_matches(pattern, image))
    }

    /// kubelet's lookup order: the image's entry, the registry's, the global one.
    fn cached(&self, image: &str, now: Instant) -> Option<Arc<[(String, Credentials)]>> {
        let cache = lock(&self.cache);
        [image, registry_of(image), GLOBAL_CACHE_KEY]
            .iter()
            .filter_map(|key| cache.get(*key))
            .find(|entry| entry.expires > now)
            .map(|entry| entry.auth.clone())
    }

    fn keep(&self, image: &str, answer: &Answer, now: Instant) {
        let lifetime = match answer.cache_duration {
            Some(nanos) => duration_of(nanos),
            None => self.spec.default_cache_duration,
        };
        if lifetime.is_zero() {
            return;
        }
        let key = match answer.cache_key_type {
            CacheKeyType::Image => image,
            CacheKeyType::Registry => registry_of(image),
            CacheKeyType::Global => GLOBAL_CACHE_KEY,
        };
        let mut cache = lock(&self.cache);
        cache.retain(|_, entry| entry.expires > now);
        cache.insert(
            key.to_string(),
            CachedAnswer {
                expires: now + lifetime,
                auth: answer.auth.clone().into(),
            },
        );
    }

    fn failed_recently(&self, image: &str, now: Instant) -> bool {
        lock(&self.failed)
            .get(image)
            .is_some_and(|until| *until > now)
    }

    async fn credentials(
        &self,
        image: &str,
        timeout: Duration,
        clock: &Clock,
    ) -> Option<Credentials> {
        if let Some(auth) = self.cached(image, clock()) {
            return pick_auth(&auth, image);
        }
        let flight = lock(&self.flights)
            .entry(image.to_string())
            .or_default()
            .clone();
        let found = {
            let _running = flight.lock().await;
            self.run_once(image, timeout, clock).await
        };
        let mut flights = lock(&self.flights);
        // Only the map and this call hold it: nobody waits for it any more.
        if Arc::strong_count(&flight) == 2 {
            flights.remove(image);
        }
        found
    }

    /// Runs the plugin unless an answer came meanwhile (another caller's run) or it
    /// failed for this image a moment ago.
    async fn run_once(&self, image: &str, timeout: Duration, clock: &Clock) -> Option<Credentials> {
        if let Some(auth) = self.cached(image, clock()) {
            return pick_auth(&auth, image);
        }
        if self.failed_recently(image, clock()) {
            tracing::debug!(plugin = %self.spec.name, %image, "credential provider plugin failed a moment ago; not run again yet");
            return None;
        }
        let answer = match self.exec(image, timeout).await {
            Ok(answer) => answer,
            Err(why) => {
                tracing::warn!(
                    plugin = %self.spec.name,
                    %image,
                    "kubelet credential provider plugin failed; the other credential sources apply: {why}"
                );
                let mut failed = lock(&self.failed);
                let now = clock();
                failed.retain(|_, until| *until > now);
                failed.insert(image.to_string(), now + FAILURE_BACKOFF);
                return None;
            }
        };
        self.keep(image, &answer, clock());
        let found = pick_auth(&answer.auth, image);
        if found.is_none() {
            tracing::warn!(
                plugin = %self.spec.name,
                %image,
                keys = ?answer.auth.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                "kubelet credential provider plugin answered no credentials for the image; the other credential sources apply"
            );
        } else {
            tracing::info!(plugin = %self.spec.name, %image, "credentials from a kubelet credential provider plugin");
        }
        found
    }

    /// Runs the plugin for `image`: the request on stdin, the answer on stdout. After
    /// `timeout` the plugin and whatever it started are killed.
    async fn exec(&self, image: &str, timeout: Duration) -> Result<Answer, String> {
        let request = serde_json::json!({
            "kind": REQUEST_KIND,
            "apiVersion": self.spec.api_version,
            "image": image,
        })
        .to_string();
        let mut child = tokio::process::Command::new(&self.path)
            .args(&self.spec.args)
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // Its own group, so a timeout kills what a script started too.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.path.display()))?;
        let group = child.id();
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let talk = async {
            if let Some(mut stdin) = stdin {
                // A plugin may exit without reading its request (kubelet ignores this too).
                let _ = stdin.write_all(request.as_bytes()).await;
            }
            let mut out = Vec::new();
            let mut err = Vec::new();
            let read_out = async {
                if let Some(s) = stdout {
                    s.take(MAX_RESPONSE_BYTES + 1).read_to_end(&mut out).await?;
                }
                std::io::Result::Ok(())
            };
            let read_err = async {
                if let Some(s) = stderr {
                    s.take(MAX_STDERR_BYTES).read_to_end(&mut err).await?;
                }
                std::io::Result::Ok(())
            };
            let (read_out, read_err) = tokio::join!(read_out, read_err);
            read_out.and(read_err)?;
            let status = child.wait().await?;
            std::io::Result::Ok((status, out, err))
        };
        let (status, out, err) = match tokio::time::timeout(timeout, talk).await {
            Ok(done) => done.map_err(|e| format!("talking to the plugin: {e}"))?,
            Err(_) => {
                if let Some(pid) = group.and_then(|p| i32::try_from(p).ok()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.kill().await;
                return Err(format!("no answer within {timeout:?}; killed"));
            }
        };
        if !status.success() {
            return Err(format!("{status}; stderr: {}", first_lines(&err)));
        }
        if out.len() as u64 > MAX_RESPONSE_BYTES {
            return Err(format!("answered more than {MAX_RESPONSE_BYTES} bytes"));
        }
        parse_response(&out, &self.spec.api_version)
    }
}

/// The start of a plugin's stderr, on one line, for the log.
fn first_lines(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(STDERR_LINES)
        .map(|l| l.chars().take(STDERR_LINE_CHARS).collect())
        .collect();
    if lines.is_empty() {
        "(empty)".into()
    } else {
        lines.join(" | ")
    }
}

/// The plugins of one `CredentialProviderConfig`, asked in the order the file lists them:
/// the first that has credentials for the image gives them.
pub struct CredentialPlugins {
    config: PathBuf,
    bin_dir: PathBuf,
    timeout: Duration,
    /// Replaced whole by [`CredentialPlugins::reload`]; a lookup under way keeps its set.
    plugins: RwLock<Arc<[Arc<Plugin>]>>,
    clock: Clock,
}

impl std::fmt::Debug for CredentialPlugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialPlugins")
            .field("config", &self.config)
            .field("plugins", &self.names())
            .finish_non_exhaustive()
    }
}

impl CredentialPlugins {
    /// Reads kubelet's `config` file; every plugin it names must be in `bin_dir`.
    pub fn load(config: &Path, bin_dir: &Path, timeout: Duration) -> anyhow::Result<Self> {
        Self::load_with_clock(config, bin_dir, timeout, Arc::new(Instant::now))
    }

    fn load_with_clock(
        config: &Path,
        bin_dir: &Path,
        timeout: Duration,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        let plugins = read_plugins(config, bin_dir)?;
        Ok(CredentialPlugins {
            config: config.to_path_buf(),
            bin_dir: bin_dir.to_path_buf(),
            timeout,
            plugins: RwLock::new(plugins),
            clock,
        })
    }

    /// Reads the config file again; the answers cached so far go. A file that is no
    /// longer valid leaves the plugins in force.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = read_plugins(&self.config, &self.bin_dir)?;
        *self.plugins.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// The plugins' names, in the order they are asked.
    pub fn names(&self) -> Vec<String> {
        self.current().iter().map(|p| p.spec.name.clone()).collect()
    }

    fn current(&self) -> Arc<[Arc<Plugin>]> {
        self.plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn lookup(&self, host: &str, repository: &str) -> Option<Credentials> {
        let image = image_name(host, repository);
        for plugin in self.current().iter() {
            if !plugin.wants(&image) {
                continue;
            }
            if let Some(found) = plugin.credentials(&image, self.timeout, &self.clock).await {
                return Some(found);
            }
        }
        None
    }
}

fn read_plugins(config: &Path, bin_dir: &Path) -> anyhow::Result<Arc<[Arc<Plugin>]>> {
    let text = std::fs::read_to_string(config).with_context(|| {
        format!(
            "reading kubelet's credential provider config {}",
            config.display()
        )
    })?;
    let specs = parse_config(&text).map_err(|e| {
        anyhow::anyhow!(
            "kubelet's credential provider config {}: {e}",
            config.display()
        )
    })?;
    specs
        .into_iter()
        .map(|spec| {
            let plugin = Plugin::new(spec, bin_dir);
            // kubelet checks this at start too: a typo must not wait for the first pull.
            let meta = std::fs::metadata(&plugin.path).with_context(|| {
                format!(
                    "credential provider plugin {:?} of {}: {} is not there",
                    plugin.spec.name,
                    config.display(),
                    plugin.path.display()
                )
            })?;
            if !meta.is_file() {
                anyhow::bail!(
                    "credential provider plugin {:?}: {} is not a file",
                    plugin.spec.name,
                    plugin.path.display()
                );
            }
            Ok(Arc::new(plugin))
        })
        .collect()
}

impl CredentialProvider for CredentialPlugins {
    /// Without a repository the image is the host alone: patterns with a path do not match.
    fn credentials<'a>(&'a self, host: &'a str) -> CredentialFuture<'a> {
        Box::pin(async move { Ok(self.lookup(host, "").await) })
    }

    fn credentials_for<'a>(&'a self, host: &'a str, repository: &'a str) -> CredentialFuture<'a> {
        Box::pin(async move { Ok(self.lookup(host, repository).await) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::atomic::{AtomicU64, Ordering};

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
        let clock: Clock =
            Arc::new(move || start + Duration::from_secs(seen.load(Ordering::SeqCst)));
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
        let err =
            CredentialPlugins::load(&s.config(), &s.bin(), Duration::from_secs(1)).unwrap_err();
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
        s.write_config(&[("p", "reg.io", "1m")]);
        let plugins =
            CredentialPlugins::load(&s.config(), &s.bin(), Duration::from_secs(1)).unwrap();
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
}
