//! kubelet's credential provider plugins: the exec plugins ECR, GCR and ACR nodes use for
//! registry tokens, run from the kubelet's own `CredentialProviderConfig` (its
//! `--image-credential-provider-config` and `--image-credential-provider-bin-dir`).
//!
//! A plugin whose `matchImages` match an image gets a `CredentialProviderRequest` for it on
//! stdin and prints a `CredentialProviderResponse`; the answer is cached per image,
//! registry or globally, as the plugin asks, for as long as it says. A plugin that fails,
//! hangs or has nothing for the image gives no credentials here, so the other sources
//! (CRI keychain, docker's config) still apply.

mod config;
mod exchange;
mod matching;
mod plugin;
#[cfg(test)]
mod tests;

pub use config::{PluginSpec, parse_config};
pub use matching::{image_matches, image_name};

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use registry::{CredentialFuture, CredentialProvider, Credentials};

use plugin::{Clock, Plugin};

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
