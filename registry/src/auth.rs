//! Authentication: `WWW-Authenticate` challenges, bearer tokens, basic auth and credentials
//! from the docker config file and credential helpers. Secrets never reach logs, `Debug`
//! output or error messages.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::lock::lock;

/// A user name and a secret (password, token or identity token).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    secret: String,
}

/// docker's convention: this user name means the secret is an OAuth2 refresh token.
const IDENTITY_TOKEN_USER: &str = "<token>";

impl Credentials {
    pub fn new(username: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            secret: secret.into(),
        }
    }

    /// An identity (refresh) token, as `docker login` stores for some registries.
    pub fn identity_token(token: impl Into<String>) -> Self {
        Self::new(IDENTITY_TOKEN_USER, token)
    }

    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }

    /// The secret itself, for a keychain that must keep it across restarts (in a
    /// root-only file); never for logs.
    pub fn expose_secret(&self) -> &str {
        &self.secret
    }

    pub(crate) fn is_identity_token(&self) -> bool {
        self.username == IDENTITY_TOKEN_USER
    }

    pub(crate) fn basic_header(&self) -> String {
        format!(
            "Basic {}",
            BASE64.encode(format!("{}:{}", self.username, self.secret))
        )
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .finish()
    }
}

pub type CredentialFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Credentials>>> + Send + 'a>>;

/// Where credentials for a registry host come from.
pub trait CredentialProvider: Send + Sync {
    /// Credentials for `host` (`registry-1.docker.io`, `ghcr.io`, `127.0.0.1:5000`), if any.
    fn credentials<'a>(&'a self, host: &'a str) -> CredentialFuture<'a>;

    /// Credentials for `repository` (`library/busybox`) on `host`. The registry client
    /// asks this way; providers that answer per image (kubelet's credential provider
    /// plugins) override it, the others answer per host.
    fn credentials_for<'a>(&'a self, host: &'a str, repository: &'a str) -> CredentialFuture<'a> {
        let _ = repository;
        self.credentials(host)
    }
}

/// Anonymous access everywhere.
#[derive(Debug, Default, Clone)]
pub struct Anonymous;

impl CredentialProvider for Anonymous {
    fn credentials<'a>(&'a self, _host: &'a str) -> CredentialFuture<'a> {
        Box::pin(async { Ok(None) })
    }
}

/// Fixed credentials per host (for tests and for callers that got them elsewhere).
#[derive(Debug, Default, Clone)]
pub struct StaticCredentials(pub HashMap<String, Credentials>);

impl CredentialProvider for StaticCredentials {
    fn credentials<'a>(&'a self, host: &'a str) -> CredentialFuture<'a> {
        let found = hub_aliases(host)
            .iter()
            .find_map(|h| self.0.get(*h))
            .or_else(|| self.0.get(host))
            .cloned();
        Box::pin(async move { Ok(found) })
    }
}

fn is_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

fn hub_aliases(host: &str) -> &'static [&'static str] {
    if is_hub(host) {
        &["docker.io", "index.docker.io", "registry-1.docker.io"]
    } else {
        &[]
    }
}

/// The server address docker uses as the key for Docker Hub.
const HUB_SERVER_URL: &str = "https://index.docker.io/v1/";

/// `https://host/path` → `host`: config keys may be written as URLs.
fn key_host(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    key.split('/').next().unwrap_or(key)
}

fn same_registry(key: &str, host: &str) -> bool {
    let k = key_host(key);
    k == host || (is_hub(k) && is_hub(host))
}

/// Where docker keeps its config: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
fn default_path(
    docker_config: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    let dir = match docker_config.filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(home.filter(|h| !h.is_empty())?).join(".docker"),
    };
    Some(dir.join("config.json"))
}

#[derive(Deserialize, Default, Clone)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

/// Credentials from docker's `config.json`: `auths` entries, `credHelpers` per registry
/// and a default `credsStore`, the helpers run as `docker-credential-<name> get`.
pub struct DockerConfig {
    file: ConfigFile,
    helper_dir: Option<PathBuf>,
    helper_timeout: Duration,
    /// Helper answers, kept briefly so one pull does not spawn a helper per request.
    cache: Mutex<HashMap<String, (Instant, Option<Credentials>)>>,
}

const HELPER_CACHE_TTL: Duration = Duration::from_secs(60);

impl fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerConfig")
            .field("auths", &self.file.auths.keys().collect::<Vec<_>>())
            .field("creds_store", &self.file.creds_store)
            .field("cred_helpers", &self.file.cred_helpers)
            .finish()
    }
}

impl DockerConfig {
    /// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`; a missing file
    /// means no credentials.
    pub fn load_default() -> Result<Self> {
        match Self::default_path() {
            Some(path) => Self::load(&path),
            None => Ok(Self::empty()),
        }
    }

    /// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json` (None without either).
    pub fn default_path() -> Option<PathBuf> {
        default_path(std::env::var_os("DOCKER_CONFIG"), std::env::var_os("HOME"))
    }

    /// Reads `path`; a missing file means no credentials.
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => Self::from_json(&bytes).map_err(|e| match e {
                Error::Credentials { reason, .. } => Error::Credentials {
                    registry: "*".into(),
                    reason: format!("{}: {reason}", path.display()),
                },
                other => other,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::empty()),
            Err(e) => Err(Error::Credentials {
                registry: "*".into(),
                reason: format!("reading {}: {e}", path.display()),
            }),
        }
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        // serde_json's error says where, not what: no secret leaks through it.
        let file: ConfigFile = serde_json::from_slice(bytes).map_err(|e| Error::Credentials {
            registry: "*".into(),
            reason: format!(
                "docker config is not valid JSON: line {} column {}",
                e.line(),
                e.column()
            ),
        })?;
        Ok(Self {
            file,
            helper_dir: None,
            helper_timeout: Duration::from_secs(30),
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn empty() -> Self {
        Self {
            file: ConfigFile::default(),
            helper_dir: None,
            helper_timeout: Duration::from_secs(30),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Looks for `docker-credential-*` in `dir` instead of on `PATH`.
    pub fn with_helper_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.helper_dir = Some(dir.into());
        self
    }

    async fn lookup(&self, host: &str) -> Result<Option<Credentials>> {
        let helper = self
            .file
            .cred_helpers
            .iter()
            .find(|(key, _)| same_registry(key, host))
            .map(|(_, name)| name.clone())
            .or_else(|| self.file.creds_store.clone());
        if let Some(helper) = helper {
            let cached = self.cache_get(host);
            let found = match cached {
                Some(found) => found,
                None => {
                    let found = self.run_helper(&helper, host).await?;
                    self.cache_put(host, found.clone());
                    found
                }
            };
            if found.is_some() {
                return Ok(found);
            }
        }
        let entry = self
            .file
            .auths
            .iter()
            .find(|(key, _)| same_registry(key, host))
            .map(|(_, e)| e.clone());
        let Some(entry) = entry else {
            return Ok(None);
        };
        if let Some(token) = entry.identity_token.filter(|t| !t.is_empty()) {
            return Ok(Some(Credentials::identity_token(token)));
        }
        if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
            let bad = || Error::Credentials {
                registry: host.to_string(),
                reason: "the `auth` entry in the docker config is not base64 of user:password"
                    .into(),
            };
            let decoded = BASE64.decode(auth.trim()).map_err(|_| bad())?;
            let text = String::from_utf8(decoded).map_err(|_| bad())?;
            let (user, pass) = text.split_once(':').ok_or_else(bad)?;
            return Ok(Some(Credentials::new(user, pass)));
        }
        match (entry.username, entry.password) {
            (Some(u), Some(p)) => Ok(Some(Credentials::new(u, p))),
            _ => Ok(None),
        }
    }

    fn cache_get(&self, host: &str) -> Option<Option<Credentials>> {
        let cache = lock(&self.cache);
        cache
            .get(host)
            .filter(|(at, _)| at.elapsed() < HELPER_CACHE_TTL)
            .map(|(_, c)| c.clone())
    }

    fn cache_put(&self, host: &str, found: Option<Credentials>) {
        let mut cache = lock(&self.cache);
        cache.retain(|_, (at, _)| at.elapsed() < HELPER_CACHE_TTL);
        cache.insert(host.to_string(), (Instant::now(), found));
    }

    async fn run_helper(&self, name: &str, host: &str) -> Result<Option<Credentials>> {
        let err = |reason: String| Error::Credentials {
            registry: host.to_string(),
            reason,
        };
        if name.is_empty() || name.contains('/') {
            return Err(err(format!("invalid credential helper name {name:?}")));
        }
        let program = format!("docker-credential-{name}");
        let path = match &self.helper_dir {
            Some(dir) => dir.join(&program),
            None => PathBuf::from(&program),
        };
        let server = if is_hub(host) { HUB_SERVER_URL } else { host };
        let mut child = tokio::process::Command::new(&path)
            .arg("get")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| err(format!("running {program}: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            use tokio::io::AsyncWriteExt as _;
            stdin
                .write_all(server.as_bytes())
                .await
                .map_err(|e| err(format!("writing to {program}: {e}")))?;
        }
        let output = tokio::time::timeout(self.helper_timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                err(format!(
                    "{program} did not answer within {:?}",
                    self.helper_timeout
                ))
            })?
            .map_err(|e| err(format!("waiting for {program}: {e}")))?;
        if !output.status.success() {
            // The helpers' protocol: this message on stdout means "nothing stored".
            if String::from_utf8_lossy(&output.stdout).contains("credentials not found") {
                return Ok(None);
            }
            // Output is not quoted: a misbehaving helper might print a secret.
            return Err(err(format!("{program} get failed ({})", output.status)));
        }
        #[derive(Deserialize)]
        struct HelperAnswer {
            #[serde(rename = "Username", default)]
            username: String,
            #[serde(rename = "Secret", default)]
            secret: String,
        }
        let answer: HelperAnswer = serde_json::from_slice(&output.stdout).map_err(|_| {
            err(format!(
                "{program} get printed something that is not its JSON answer"
            ))
        })?;
        if answer.secret.is_empty() {
            return Ok(None);
        }
        Ok(Some(Credentials::new(answer.username, answer.secret)))
    }
}

impl CredentialProvider for DockerConfig {
    fn credentials<'a>(&'a self, host: &'a str) -> CredentialFuture<'a> {
        Box::pin(self.lookup(host))
    }
}

/// One challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased: `bearer`, `basic`, ...
    pub scheme: String,
    /// Parameter names lowercased, values unquoted.
    pub params: BTreeMap<String, String>,
}

/// Parses every challenge of a `WWW-Authenticate` value (RFC 7235: several challenges may
/// share one header, each with comma-separated `name=value` or `name="quoted"` params).
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let s = header.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t' || s[*i] == b',') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= s.len() {
            break;
        }
        let start = i;
        while i < s.len() && is_tchar(s[i]) {
            i += 1;
        }
        if start == i {
            // Not a token: skip the byte so malformed input cannot loop forever.
            i += 1;
            continue;
        }
        let word = &header[start..i];
        // Is this `name=` (a parameter of the current challenge) or a new scheme?
        let mut j = i;
        while j < s.len() && (s[j] == b' ' || s[j] == b'\t') {
            j += 1;
        }
        let is_param = j < s.len() && s[j] == b'=' && !out.is_empty() && {
            // token68 values end with '=' padding followed by ',' or end: treat `x=` with
            // nothing after as padding, not a parameter.
            let mut k = j + 1;
            while k < s.len() && s[k] == b'=' {
                k += 1;
            }
            k == j + 1
        };
        if !is_param {
            if j < s.len() && s[j] == b'=' {
                // token68 (e.g. `Negotiate abc==`): skip to the next comma.
                while i < s.len() && s[i] != b',' {
                    i += 1;
                }
                continue;
            }
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
            continue;
        }
        i = j + 1;
        while i < s.len() && (s[i] == b' ' || s[i] == b'\t') {
            i += 1;
        }
        let value = if i < s.len() && s[i] == b'"' {
            i += 1;
            let mut v = String::new();
            while i < s.len() && s[i] != b'"' {
                if s[i] == b'\\' && i + 1 < s.len() {
                    i += 1;
                }
                // Push whole UTF-8 characters.
                let ch_len = utf8_len(s[i]);
                let end = (i + ch_len).min(s.len());
                v.push_str(&String::from_utf8_lossy(&s[i..end]));
                i = end;
            }
            i += 1; // closing quote (or past the end)
            v
        } else {
            let vs = i;
            while i < s.len() && s[i] != b',' && s[i] != b' ' {
                i += 1;
            }
            header[vs..i].to_string()
        };
        if let Some(last) = out.last_mut() {
            last.params.insert(word.to_ascii_lowercase(), value);
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

/// How a host wants to be authenticated, learnt from its challenges.
#[derive(Debug, Clone)]
pub(crate) enum Scheme {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

struct Token {
    value: String,
    expires: Instant,
}

#[derive(Default)]
struct HostAuth {
    scheme: Option<Scheme>,
    /// Bearer tokens by scope set.
    tokens: HashMap<String, Token>,
}

/// Per-client authentication state: schemes learnt per host and tokens per scope.
#[derive(Default)]
pub(crate) struct AuthCache {
    hosts: Mutex<HashMap<String, HostAuth>>,
    /// Held while a token is fetched.
    pub(crate) fetch_lock: tokio::sync::Mutex<()>,
}

/// Most hosts a client talks to; past it, state of the least useful is dropped.
const MAX_TOKENS_PER_HOST: usize = 256;

impl AuthCache {
    pub(crate) fn scheme(&self, host: &str) -> Option<Scheme> {
        let hosts = lock(&self.hosts);
        hosts.get(host).and_then(|h| h.scheme.clone())
    }

    pub(crate) fn set_scheme(&self, host: &str, scheme: Scheme) {
        let mut hosts = lock(&self.hosts);
        hosts.entry(host.to_string()).or_default().scheme = Some(scheme);
    }

    /// Forgets every token (the schemes stay: they are the registries', not ours).
    pub(crate) fn clear(&self) {
        let mut hosts = lock(&self.hosts);
        for host in hosts.values_mut() {
            host.tokens.clear();
        }
    }

    pub(crate) fn token(&self, host: &str, scope: &str) -> Option<String> {
        let hosts = lock(&self.hosts);
        let token = hosts.get(host)?.tokens.get(scope)?;
        (Instant::now() < token.expires).then(|| token.value.clone())
    }

    pub(crate) fn put_token(&self, host: &str, scope: &str, value: String, lifetime: Duration) {
        let mut hosts = lock(&self.hosts);
        let entry = hosts.entry(host.to_string()).or_default();
        let now = Instant::now();
        entry.tokens.retain(|_, t| t.expires > now);
        if entry.tokens.len() >= MAX_TOKENS_PER_HOST {
            entry.tokens.clear();
        }
        entry.tokens.insert(
            scope.to_string(),
            Token {
                value,
                expires: now + lifetime,
            },
        );
    }

    pub(crate) fn drop_token(&self, host: &str, scope: &str) {
        let mut hosts = lock(&self.hosts);
        if let Some(h) = hosts.get_mut(host) {
            h.tokens.remove(scope);
        }
    }
}

/// The useful life of a token that the server says lasts `expires_in` seconds: a margin
/// is kept so that a token is not sent in its last seconds.
pub(crate) fn token_lifetime(expires_in: Option<u64>) -> Duration {
    // The distribution spec: a token without expires_in lasts 60 seconds.
    // Capped at a day: a huge expires_in must not overflow Instant arithmetic.
    let secs = expires_in.unwrap_or(60).min(86_400);
    let margin = (secs / 10).min(30);
    Duration::from_secs(secs.saturating_sub(margin))
}

#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.docker.io/token");
        assert_eq!(c[0].params["service"], "registry.docker.io");
        assert_eq!(c[0].params["scope"], "repository:samalba/my-app:pull,push");

        let c = parse_challenges(r#"Basic realm="lazysnap-test""#);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].params["realm"], "lazysnap-test");

        // Two challenges in one header, odd spacing, unquoted and escaped values.
        let c = parse_challenges(
            r#"Negotiate abc==, Basic realm=simple , BEARER Realm = "http://x/t\"q\"", error="invalid_token""#,
        );
        let schemes: Vec<_> = c.iter().map(|c| c.scheme.as_str()).collect();
        assert_eq!(schemes, ["negotiate", "basic", "bearer"]);
        assert_eq!(c[1].params["realm"], "simple");
        assert_eq!(c[2].params["realm"], "http://x/t\"q\"");
        assert_eq!(c[2].params["error"], "invalid_token");

        assert!(parse_challenges("").is_empty());
        // Malformed input must not panic or loop.
        let _ = parse_challenges(r#"Bearer realm="unterminated"#);
        let _ = parse_challenges("=,=,\"\"");
    }

    #[test]
    fn credentials_never_show_their_secret() {
        let c = Credentials::new("alice", "hunter2-secret");
        let shown = format!("{c:?}");
        assert!(shown.contains("alice"));
        assert!(!shown.contains("hunter2"));
        assert_eq!(
            c.basic_header(),
            format!("Basic {}", BASE64.encode("alice:hunter2-secret"))
        );
    }

    #[test]
    fn token_lifetime_keeps_a_margin() {
        assert_eq!(token_lifetime(None), Duration::from_secs(54));
        assert_eq!(token_lifetime(Some(300)), Duration::from_secs(270));
        assert_eq!(token_lifetime(Some(3600)), Duration::from_secs(3570));
        assert_eq!(token_lifetime(Some(0)), Duration::ZERO);
        assert_eq!(token_lifetime(Some(u64::MAX)), Duration::from_secs(86_370));
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("test runtime")
            .block_on(f)
    }

    #[test]
    fn docker_config_auths() {
        let json = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "ghcr.io": {{"username": "bob", "password": "pw"}},
                "http://127.0.0.1:5000/ignored/path": {{"auth": "{}"}},
                "quay.io": {{"identitytoken": "refresh-me"}},
                "bad.example": {{"auth": "!!!"}}
            }}}}"#,
            BASE64.encode("hubuser:hubpass"),
            BASE64.encode("local:pa:ss"),
        );
        let config = DockerConfig::from_json(json.as_bytes()).unwrap();
        let get = |h: &str| block_on(config.credentials(h));
        assert_eq!(
            get("registry-1.docker.io").unwrap(),
            Some(Credentials::new("hubuser", "hubpass"))
        );
        assert_eq!(get("ghcr.io").unwrap(), Some(Credentials::new("bob", "pw")));
        // Only the first ':' separates the user from a password that contains ':'.
        assert_eq!(
            get("127.0.0.1:5000").unwrap(),
            Some(Credentials::new("local", "pa:ss"))
        );
        let quay = get("quay.io").unwrap().unwrap();
        assert!(quay.is_identity_token());
        assert_eq!(get("other.example").unwrap(), None);
        let err = get("bad.example").unwrap_err().to_string();
        assert!(
            err.contains("bad.example") && err.contains("base64"),
            "{err}"
        );
        assert!(!format!("{config:?}").contains("pw"));
    }

    fn write_helper(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn credential_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls");
        // Answers for two hosts, records its argument and stdin, "not found" otherwise.
        write_helper(
            dir.path(),
            "fake",
            &format!(
                r#"read server
echo "$1 $server" >> {log}
case "$server" in
  https://index.docker.io/v1/) echo '{{"ServerURL":"x","Username":"hubby","Secret":"s3cret"}}';;
  private.example:5000) echo '{{"ServerURL":"x","Username":"p","Secret":"q"}}';;
  *) echo "credentials not found in native keychain"; exit 1;;
esac"#,
                log = log.display()
            ),
        );
        write_helper(dir.path(), "broken", "echo 'leaky-secret'; exit 3");
        let json = format!(
            r#"{{"credsStore": "fake",
                "credHelpers": {{"broken.example": "broken"}},
                "auths": {{"fallback.example": {{"auth": "{}"}}}}}}"#,
            BASE64.encode("fb:fbpass")
        );
        let config = DockerConfig::from_json(json.as_bytes())
            .unwrap()
            .with_helper_dir(dir.path());
        let get = |h: &str| block_on(config.credentials(h));
        assert_eq!(
            get("registry-1.docker.io").unwrap(),
            Some(Credentials::new("hubby", "s3cret"))
        );
        // Cached: a second lookup does not run the helper again.
        get("registry-1.docker.io").unwrap();
        assert_eq!(
            get("private.example:5000").unwrap(),
            Some(Credentials::new("p", "q"))
        );
        // Not in the store: falls back to auths.
        assert_eq!(
            get("fallback.example").unwrap(),
            Some(Credentials::new("fb", "fbpass"))
        );
        assert_eq!(get("nothing.example").unwrap(), None);
        let err = get("broken.example").unwrap_err().to_string();
        assert!(
            err.contains("docker-credential-broken") && err.contains("broken.example"),
            "{err}"
        );
        assert!(!err.contains("leaky"), "{err}");
        let calls = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<_> = calls.lines().collect();
        assert_eq!(
            lines,
            [
                "get https://index.docker.io/v1/",
                "get private.example:5000",
                "get fallback.example",
                "get nothing.example"
            ]
        );
    }

    #[test]
    fn default_config_location() {
        assert_eq!(
            default_path(Some("/etc/dc".into()), Some("/home/u".into())),
            Some(PathBuf::from("/etc/dc/config.json"))
        );
        assert_eq!(
            default_path(None, Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.docker/config.json"))
        );
        assert_eq!(
            default_path(Some("".into()), Some("/root".into())),
            Some(PathBuf::from("/root/.docker/config.json"))
        );
        assert_eq!(default_path(None, None), None);
    }

    #[test]
    fn missing_config_file_means_anonymous() {
        let dir = tempfile::tempdir().unwrap();
        let config = DockerConfig::load(&dir.path().join("config.json")).unwrap();
        assert_eq!(block_on(config.credentials("ghcr.io")).unwrap(), None);
        std::fs::write(
            dir.path().join("bad.json"),
            b"{\"auths\": {\"x\": {\"auth\": \"secret-here",
        )
        .unwrap();
        let err = DockerConfig::load(&dir.path().join("bad.json"))
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("secret-here") && err.contains("bad.json"),
            "{err}"
        );
    }
}
