//! What SIGHUP changes in a running lazysnapd: the configuration file is read again and
//! the settings that can change under running mounts are applied (docker credentials,
//! kubelet's credential provider config, registry hosts); the others are named in the log
//! as needing a restart.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use estargz::lock;
use registry::{CredentialFuture, CredentialProvider, DockerConfig};

use crate::config::Config;
use crate::credential_plugins::CredentialPlugins;

/// Docker's config file, read again on reload and whenever it changed on disk (a
/// `docker login` before a `docker pull` must not need a SIGHUP). A file that fails to
/// parse leaves the credentials in force.
pub struct ReloadableDockerConfig {
    current: RwLock<Arc<DockerConfig>>,
    load: Box<dyn Fn() -> registry::Result<DockerConfig> + Send + Sync>,
    /// The file watched for changes, and what it looked like when last read.
    watched: Option<PathBuf>,
    seen: Mutex<Option<FileStamp>>,
}

/// Enough of a file's metadata to tell that it was written or replaced.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

impl ReloadableDockerConfig {
    /// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
    pub fn load_default() -> registry::Result<Self> {
        Self::with_loader(
            Box::new(DockerConfig::load_default),
            DockerConfig::default_path(),
        )
    }

    pub fn load(path: PathBuf) -> registry::Result<Self> {
        let watched = Some(path.clone());
        Self::with_loader(Box::new(move || DockerConfig::load(&path)), watched)
    }

    fn with_loader(
        load: Box<dyn Fn() -> registry::Result<DockerConfig> + Send + Sync>,
        watched: Option<PathBuf>,
    ) -> registry::Result<Self> {
        let seen = watched.as_deref().and_then(stamp);
        Ok(ReloadableDockerConfig {
            current: RwLock::new(Arc::new(load()?)),
            load,
            watched,
            seen: Mutex::new(seen),
        })
    }

    pub fn reload(&self) -> registry::Result<()> {
        let seen = self.watched.as_deref().and_then(stamp);
        let fresh = Arc::new((self.load)()?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        *lock(&self.seen) = seen;
        Ok(())
    }

    /// Reads the file again if it changed since it was last read (one stat).
    fn refresh(&self) {
        let Some(path) = &self.watched else {
            return;
        };
        let now = stamp(path);
        // Held while the file is read: a lookup that comes meanwhile waits for what it
        // holds instead of taking the old credentials for the new file (two requests
        // right after `docker login` did: one got none).
        let mut seen = lock(&self.seen);
        if *seen == now {
            return;
        }
        // A broken file is not read again until it changes once more.
        *seen = now;
        match (self.load)() {
            Ok(fresh) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
                tracing::info!(path = %path.display(), "docker's config.json changed: read it again");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "docker's config.json changed but does not parse; the credentials read before stay: {e}");
            }
        }
    }

    fn get(&self) -> Arc<DockerConfig> {
        self.refresh();
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl CredentialProvider for ReloadableDockerConfig {
    fn credentials<'a>(&'a self, host: &'a str) -> CredentialFuture<'a> {
        let config = self.get();
        Box::pin(async move { config.credentials(host).await })
    }
}

/// The parts of a running daemon a reload reaches.
pub struct Reloader {
    pub config: Config,
    /// The lazy mounts' registry client and credentials; None with lazy pulling off.
    pub registry: Option<(registry::Client, Arc<ReloadableDockerConfig>)>,
    /// kubelet's credential provider plugins, when configured.
    pub credential_plugins: Option<Arc<CredentialPlugins>>,
}

impl Reloader {
    /// Applies `fresh`, logging each thing done; returns what could not be applied.
    pub fn apply(&mut self, fresh: Config) -> Vec<String> {
        let mut failed = Vec::new();
        if let Some((client, docker)) = &self.registry {
            match docker.reload() {
                Ok(()) => {
                    client.forget_tokens();
                    tracing::info!("SIGHUP: read docker's config.json again");
                }
                Err(e) => failed.push(format!("docker credentials kept: {e}")),
            }
            // Read from the path lazysnapd started with: a changed path needs a restart.
            if let Some(plugins) = &self.credential_plugins {
                match plugins.reload() {
                    Ok(()) => {
                        client.forget_tokens();
                        tracing::info!(
                            plugins = ?plugins.names(),
                            "SIGHUP: read kubelet's credential provider config again"
                        );
                    }
                    Err(e) => {
                        failed.push(format!("kubelet credential provider plugins kept: {e:#}"))
                    }
                }
            }
            if fresh.resolver != self.config.resolver {
                match client.reload_resolver(fresh.resolver.clone()) {
                    Ok(()) => {
                        tracing::info!(
                            hosts = fresh.resolver.host.len(),
                            "SIGHUP: registry hosts reloaded"
                        );
                        self.config.resolver = fresh.resolver.clone();
                    }
                    Err(e) => failed.push(format!("registry hosts kept: {e}")),
                }
            }
        }
        if fresh.log_level != self.config.log_level {
            // The binary owns the log filter and has applied it already.
            self.config.log_level = fresh.log_level.clone();
        }
        let needs_restart = restart_only_changes(&self.config, &fresh);
        if !needs_restart.is_empty() {
            tracing::warn!(
                settings = ?needs_restart,
                "SIGHUP: these settings changed but take effect only after a restart"
            );
        }
        for problem in &failed {
            tracing::error!("SIGHUP: {problem}");
        }
        failed
    }
}

/// The top-level settings that differ and that a reload does not apply.
fn restart_only_changes(running: &Config, fresh: &Config) -> Vec<&'static str> {
    let (r, f) = (running, fresh);
    [
        ("root", r.root != f.root),
        ("address", r.address != f.address),
        ("metrics_address", r.metrics_address != f.metrics_address),
        ("lazy", r.lazy != f.lazy),
        ("cache", r.cache != f.cache),
        ("http", r.http != f.http),
        ("cri_keychain", r.cri_keychain != f.cri_keychain),
        (
            "credential_provider",
            r.credential_provider != f.credential_provider,
        ),
        ("resolver", r.resolver != f.resolver),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_a_reload_cannot_apply_are_named() {
        let running = Config::default();
        let mut fresh = Config::default();
        assert!(restart_only_changes(&running, &fresh).is_empty());
        fresh.cache.disk_bytes += 1;
        fresh.lazy.prefetch = !fresh.lazy.prefetch;
        fresh.log_level = "debug".into();
        assert_eq!(restart_only_changes(&running, &fresh), ["lazy", "cache"]);
    }

    #[tokio::test]
    async fn docker_credentials_follow_the_file_and_survive_a_broken_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let write = |user: &str| {
            let auth = base64_auth(user);
            std::fs::write(
                &path,
                format!(r#"{{"auths":{{"reg.example":{{"auth":"{auth}"}}}}}}"#),
            )
            .unwrap();
        };
        let user_of = |docker: &ReloadableDockerConfig| {
            let docker = docker.get();
            async move {
                let found = docker.credentials("reg.example").await.unwrap();
                found.map(|c| c.username)
            }
        };
        write("alice");
        let docker = ReloadableDockerConfig::load(path.clone()).unwrap();
        let first = user_of(&docker).await.unwrap();
        assert!(first.contains("alice"), "{first}");
        write("bob");
        docker.reload().unwrap();
        let second = user_of(&docker).await.unwrap();
        assert!(second.contains("bob"), "{second}");
        std::fs::write(&path, "{not json").unwrap();
        assert!(docker.reload().is_err());
        let kept = user_of(&docker).await.unwrap();
        assert!(kept.contains("bob"), "{kept}");
    }

    /// Two lookups right after the file changed: the second waits for the first's read
    /// of it, and neither gets the credentials of before.
    #[test]
    fn a_lookup_during_a_reread_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let write = |user: &str| {
            let auth = base64_auth(user);
            let body = format!(r#"{{"auths":{{"reg.example":{{"auth":"{auth}"}}}}}}"#);
            std::fs::write(&path, body).unwrap();
        };
        write("alice");
        let slow_path = path.clone();
        let docker = Arc::new(
            ReloadableDockerConfig::with_loader(
                Box::new(move || {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    DockerConfig::load(&slow_path)
                }),
                Some(path.clone()),
            )
            .unwrap(),
        );
        write("bob-with-a-longer-name");
        let user = |docker: Arc<ReloadableDockerConfig>| {
            std::thread::spawn(move || {
                let config = docker.get();
                tokio::runtime::Runtime::new()
                    .unwrap()
                    .block_on(config.credentials("reg.example"))
                    .unwrap()
                    .map(|c| c.username)
            })
        };
        let first = user(Arc::clone(&docker));
        std::thread::sleep(std::time::Duration::from_millis(50));
        let second = user(Arc::clone(&docker));
        for lookup in [first, second] {
            let name = lookup.join().unwrap().unwrap();
            assert!(name.contains("bob"), "{name}");
        }
    }

    /// As after `docker login`: the file appears, then is replaced (the CLI writes a
    /// temp file and renames it); each change is seen on the next lookup, no SIGHUP.
    #[tokio::test]
    async fn docker_credentials_written_after_start_are_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let docker = ReloadableDockerConfig::load(path.clone()).unwrap();
        let user = async |docker: &ReloadableDockerConfig| {
            let found = docker.credentials("reg.example").await.unwrap();
            found.map(|c| c.username)
        };
        assert_eq!(user(&docker).await, None);
        let login = |name: &str| {
            let auth = base64_auth(name);
            let tmp = dir.path().join("config.json.tmp");
            std::fs::write(
                &tmp,
                format!(r#"{{"auths":{{"reg.example":{{"auth":"{auth}"}}}}}}"#),
            )
            .unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        login("alice");
        assert!(user(&docker).await.unwrap().contains("alice"));
        login("carol");
        assert!(user(&docker).await.unwrap().contains("carol"));
    }

    fn base64_auth(user: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:secret"))
    }

    #[test]
    fn sighup_reads_kubelet_s_credential_provider_config_again() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for name in ["first", "second"] {
            std::fs::write(bin.join(name), "#!/bin/sh\nexit 1\n").unwrap();
            std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        let config = dir.path().join("credential-provider.yaml");
        let write = |names: &[&str]| {
            let mut text = String::from(
                "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n",
            );
            for name in names {
                text += &format!(
                    "  - name: {name}\n    matchImages: [\"reg.example\"]\n    \
                     defaultCacheDuration: 1m\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n"
                );
            }
            std::fs::write(&config, text).unwrap();
        };
        write(&["first"]);
        let plugins = Arc::new(
            CredentialPlugins::load(&config, &bin, std::time::Duration::from_secs(1)).unwrap(),
        );
        let client = registry::Client::new(registry::RegistryConfig::default()).unwrap();
        let docker = Arc::new(ReloadableDockerConfig::load(dir.path().join("none.json")).unwrap());
        let mut reloader = Reloader {
            config: Config::default(),
            registry: Some((client, docker)),
            credential_plugins: Some(plugins.clone()),
        };
        write(&["second", "first"]);
        assert!(reloader.apply(Config::default()).is_empty());
        assert_eq!(plugins.names(), ["second", "first"]);
        // A plugin that is not there: refused, the plugins in force stay.
        write(&["third"]);
        let failed = reloader.apply(Config::default());
        assert!(
            failed.len() == 1 && failed[0].contains("third"),
            "{failed:?}"
        );
        assert_eq!(plugins.names(), ["second", "first"]);
    }

    #[test]
    fn without_lazy_pulling_the_resolver_is_not_applied() {
        let mut reloader = Reloader {
            config: Config::default(),
            registry: None,
            credential_plugins: None,
        };
        let mut fresh = Config {
            log_level: "debug".into(),
            ..Config::default()
        };
        fresh
            .resolver
            .host
            .insert("example.com".into(), Default::default());
        assert!(reloader.apply(fresh).is_empty());
        assert_eq!(reloader.config.log_level, "debug");
        assert!(reloader.config.resolver.host.is_empty());
    }
}
