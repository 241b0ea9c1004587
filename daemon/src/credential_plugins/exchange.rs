//! What a plugin prints: a `CredentialProviderResponse`, checked, and how its answer is
//! cached.

use std::collections::BTreeMap;

use registry::Credentials;
use serde::Deserialize;

use super::matching::auth_key;

pub(super) const RESPONSE_KIND: &str = "CredentialProviderResponse";

/// kubelet's key for answers with `cacheKeyType: Global`.
pub(super) const GLOBAL_CACHE_KEY: &str = "global";

/// Which answers share a cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CacheKeyType {
    Image,
    Registry,
    Global,
}

/// A plugin's answer, its `auth` keys in kubelet's order of trying: reverse-sorted, so a
/// longer path of a host comes before the host.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) cache_key_type: CacheKeyType,
    /// Nanoseconds; None: the provider's `defaultCacheDuration`.
    pub(super) cache_duration: Option<i128>,
    pub(super) auth: Vec<(String, Credentials)>,
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
pub(super) fn parse_response(stdout: &[u8], api_version: &str) -> Result<Answer, String> {
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
