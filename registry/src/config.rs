//! Hosts configuration: mirrors, plain HTTP, CAs, timeouts, limits and retry policy.
//!
//! The daemon embeds [`RegistryConfig`] in its TOML. `[resolver]` accepts
//! stargz-snapshotter's form unchanged:
//!
//! ```toml
//! [[resolver.host."docker.io".mirrors]]
//! host = "mirror.example.com"
//! request_timeout_sec = 10
//!
//! # A mirror naming the host itself with insecure = true: the host speaks plain HTTP.
//! [[resolver.host."registry.lan:5000".mirrors]]
//! host = "registry.lan:5000"
//! insecure = true
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct RegistryConfig {
    pub resolver: ResolverConfig,
    pub http: HttpConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct ResolverConfig {
    /// Per registry, keyed by the name users write (`docker.io`, `ghcr.io`, `host:port`).
    /// A registry named here uses these settings and not its host directory.
    pub host: BTreeMap<String, HostConfig>,
    /// containerd's registry host directories (`/etc/containerd/certs.d`), several
    /// separated by `:`: `DIR/<registry>/hosts.toml` gives mirrors, capabilities, CAs,
    /// client certificates, `skip_verify`, `override_path` and headers, read as
    /// containerd reads them (see `hosts_dir`). Off unless set.
    pub config_path: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct HostConfig {
    /// Tried in order before the registry itself, for pulls only (pushes go to the origin).
    pub mirrors: Vec<MirrorConfig>,
    /// Speak plain HTTP to the registry itself. Default: false, except for loopback
    /// addresses (127.0.0.0/8, ::1, localhost), which default to plain HTTP unless `ca`
    /// is set or this is `false`.
    pub plain_http: Option<bool>,
    /// Extra CA certificates (PEM files) trusted for this registry, besides the system's.
    pub ca: Vec<PathBuf>,
    /// Overrides `http.request_timeout_sec` for this registry.
    pub request_timeout_sec: Option<u64>,
    /// Overrides `http.max_concurrent_requests` for this registry.
    pub max_concurrent_requests: Option<usize>,
    /// Extra headers sent to this registry.
    pub header: BTreeMap<String, String>,
}

/// One mirror, as stargz-snapshotter writes it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct MirrorConfig {
    /// `host[:port]`, optionally with a path prefix (`mirror.example.com/v2-proxy`) or an
    /// explicit `http://` / `https://` scheme.
    pub host: String,
    /// Plain HTTP (stargz-snapshotter's meaning of `insecure`).
    pub insecure: bool,
    /// Per-request timeout for this mirror; 0 means the default.
    pub request_timeout_sec: u64,
    /// Extra headers sent to this mirror.
    pub header: BTreeMap<String, String>,
    /// Extra CA certificates for this mirror (our extension).
    pub ca: Vec<PathBuf>,
}

/// Client-wide HTTP settings; each has a documented default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct HttpConfig {
    /// Whole-request timeout (headers and body), seconds. Default 30.
    pub request_timeout_sec: u64,
    /// TCP + TLS connect timeout, seconds. Default 10.
    pub connect_timeout_sec: u64,
    /// Longest pause between two reads of a body before the request counts as stalled,
    /// milliseconds. Default 15000.
    pub stall_timeout_msec: u64,
    /// Requests in flight to one host at once. Default 32.
    pub max_concurrent_requests: usize,
    /// Idle connections kept per host. Default 16.
    pub max_idle_per_host: usize,
    /// Retries after the first attempt, for transient failures. Default 5.
    pub max_retries: u32,
    /// First backoff, milliseconds; doubles each retry, with jitter. Default 50.
    pub min_wait_msec: u64,
    /// Longest single backoff (and longest Retry-After honoured), milliseconds. Default 10000.
    pub max_wait_msec: u64,
    /// Total time one operation may spend retrying, seconds. Default 120.
    pub max_retry_time_sec: u64,
    /// Longest redirect chain followed. Default 5.
    pub max_redirects: usize,
    /// How long a blob's redirected (storage) URL is reused, seconds. Default 300.
    pub redirect_ttl_sec: u64,
    /// How long a mirror that answered a range read wrongly (the whole blob, several
    /// ranges, an error) gets no range reads, seconds; the next host serves them.
    /// Whole-blob downloads still use it. Default 300.
    pub mirror_range_retry_sec: u64,
    /// CA certificates (PEM files) trusted for every registry, besides the system's.
    pub ca: Vec<PathBuf>,
    /// Platform picked from image indexes, `os/arch[/variant]`. Default: this machine's.
    pub platform: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            request_timeout_sec: 30,
            connect_timeout_sec: 10,
            stall_timeout_msec: 15_000,
            max_concurrent_requests: 32,
            max_idle_per_host: 16,
            max_retries: 5,
            min_wait_msec: 50,
            max_wait_msec: 10_000,
            max_retry_time_sec: 120,
            max_redirects: 5,
            redirect_ttl_sec: 300,
            mirror_range_retry_sec: 300,
            ca: Vec::new(),
            platform: None,
        }
    }
}

impl HttpConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_sec)
    }
}

impl ResolverConfig {
    /// The host directory roots `config_path` names.
    pub fn config_roots(&self) -> Vec<PathBuf> {
        self.config_path
            .iter()
            .flat_map(|p| p.split(':'))
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect()
    }

    /// The configuration for a registry, looked up by name, then by API host.
    pub fn host(&self, registry: &str) -> Option<&HostConfig> {
        self.host
            .get(registry)
            .or_else(|| self.host.get(crate::reference::api_host(registry)))
    }
}

impl RegistryConfig {
    /// The configuration for a registry, looked up by name, then by API host.
    pub fn host(&self, registry: &str) -> Option<&HostConfig> {
        self.resolver.host(registry)
    }

    /// Checks what serde cannot: values that would make the client misbehave.
    pub fn validate(&self) -> Result<(), String> {
        let h = &self.http;
        if h.request_timeout_sec == 0 || h.connect_timeout_sec == 0 || h.stall_timeout_msec == 0 {
            return Err("http timeouts must be positive".into());
        }
        if h.max_concurrent_requests == 0 {
            return Err("http.max_concurrent_requests must be positive".into());
        }
        if h.min_wait_msec > h.max_wait_msec {
            return Err("http.min_wait_msec exceeds http.max_wait_msec".into());
        }
        if h.max_redirects == 0 {
            return Err(
                "http.max_redirects must be positive (registries redirect to storage)".into(),
            );
        }
        if let Some(p) = &h.platform {
            crate::platform::Platform::parse(p).map_err(|e| format!("http.platform: {e}"))?;
        }
        for (name, host) in &self.resolver.host {
            if host.max_concurrent_requests == Some(0) {
                return Err(format!(
                    "resolver.host.{name:?}: max_concurrent_requests is 0"
                ));
            }
            for m in &host.mirrors {
                if m.host.trim().is_empty() {
                    return Err(format!(
                        "resolver.host.{name:?}: a mirror has an empty host"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// True for 127.0.0.0/8, ::1 and localhost, with or without a port.
pub fn is_loopback(host: &str) -> bool {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').map_or(host, |(n, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                n
            } else {
                host
            }
        })
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stargz_form_parses_unchanged() {
        let toml_text = r#"
[[resolver.host."docker.io".mirrors]]
host = "mirror.example.com"
request_timeout_sec = 7
header = { "X-Dragonfly-Registry" = "https://index.docker.io" }

[[resolver.host."docker.io".mirrors]]
host = "http://second.example.com/prefix"

[[resolver.host."registry.lan:5000".mirrors]]
host = "registry.lan:5000"
insecure = true
"#;
        let config: RegistryConfig = toml::from_str(toml_text).unwrap();
        let hub = config.host("docker.io").unwrap();
        assert_eq!(hub.mirrors.len(), 2);
        assert_eq!(hub.mirrors[0].host, "mirror.example.com");
        assert_eq!(hub.mirrors[0].request_timeout_sec, 7);
        assert_eq!(
            hub.mirrors[0]
                .header
                .get("X-Dragonfly-Registry")
                .map(String::as_str),
            Some("https://index.docker.io")
        );
        assert!(!hub.mirrors[0].insecure);
        let lan = config.host("registry.lan:5000").unwrap();
        assert!(lan.mirrors[0].insecure);
        assert_eq!(config.http, HttpConfig::default());
        config.validate().unwrap();
    }

    #[test]
    fn our_extensions_and_validation() {
        let json = serde_json::json!({
            "resolver": {"host": {"127.0.0.1:5000": {"ca": ["/tmp/ca.pem"], "plain_http": false,
                "max_concurrent_requests": 4}}},
            "http": {"max_retries": 2, "platform": "linux/arm64/v8"}
        });
        let config: RegistryConfig = serde_json::from_value(json).unwrap();
        let h = config.host("127.0.0.1:5000").unwrap();
        assert_eq!(h.plain_http, Some(false));
        assert_eq!(h.ca, vec![PathBuf::from("/tmp/ca.pem")]);
        assert_eq!(config.http.max_retries, 2);
        assert_eq!(config.http.request_timeout_sec, 30);
        config.validate().unwrap();

        let mut bad = config.clone();
        bad.http.platform = Some("linux".into());
        assert!(bad.validate().is_err());
        let mut bad = config;
        bad.http.min_wait_msec = bad.http.max_wait_msec + 1;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn loopback_detection() {
        for yes in [
            "127.0.0.1",
            "127.1.2.3:5000",
            "localhost:80",
            "[::1]:5000",
            "::1",
            "LOCALHOST",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "10.0.0.1:5000",
            "example.com",
            "localhost.example.com",
            "[::2]:1",
            "128.0.0.1",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }
}
