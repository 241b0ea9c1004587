//! Credentials from docker's config file and its credential helpers.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use super::credentials::{CredentialFuture, CredentialProvider, Credentials, is_hub};
use crate::error::{Error, Result};
use estargz::lock;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

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
