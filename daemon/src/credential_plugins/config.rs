//! kubelet's `CredentialProviderConfig`: read, and checked as kubelet checks it.

use std::time::Duration;

use serde::Deserialize;

use super::matching::SchemelessUrl;

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
pub(super) fn duration_of(nanos: i128) -> Duration {
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
}
