//! Where the requests for a registry go: its mirrors in order, then the registry itself,
//! from lazysnapd's `[resolver]` or from containerd's host directories (`config_path`);
//! each endpoint with its HTTP client (CAs, client certificate, verification), headers,
//! connection limit and what it may be asked. Also which mirrors are left out of range
//! reads for a while after answering one wrongly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::Semaphore;

use crate::Digest;
use crate::config::{HostConfig, HttpConfig, ResolverConfig, is_loopback};
use crate::error::{Error, Result};
use crate::hosts_dir::{self, Capabilities, HostEntry};
use crate::reference::{DOCKER_HUB, DOCKER_HUB_API, Repository, api_host};
use estargz::lock;

/// What a request asks of a registry; an endpoint is used only for what its
/// capabilities allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Purpose {
    /// Blobs, and manifests by digest.
    Pull,
    /// Manifests by tag.
    Resolve,
    Push,
    /// The referrers API and its tag schema.
    Referrers,
}

impl Purpose {
    fn allowed(self, c: Capabilities) -> bool {
        match self {
            Purpose::Pull => c.pull,
            Purpose::Resolve => c.resolve,
            Purpose::Push => c.push,
            Purpose::Referrers => c.referrers,
        }
    }
}

/// Mirrors in order, then the registry itself.
pub(crate) type Endpoints = Arc<[Endpoint]>;

/// One place to send requests for a registry: a mirror or the registry itself.
#[derive(Clone)]
pub(crate) struct Endpoint {
    /// `host[:port]`, for errors and auth state.
    pub host: String,
    /// `scheme://host[:port][/prefix]/v2`, or the configured path with `override_path`.
    pub base: String,
    /// Sent as `ns=<registry>` with every request, as containerd does, when this host
    /// serves another registry's content: P2P mirrors (Spegel) refuse requests without it.
    pub namespace: Option<String>,
    pub client: reqwest::Client,
    pub headers: HeaderMap,
    pub limiter: Arc<Semaphore>,
    pub is_mirror: bool,
}

impl Endpoint {
    /// `<base>/<repository>/blobs/<digest>`: the one place a blob's URL is made.
    pub(crate) fn blob_url(&self, repo: &Repository, digest: &Digest) -> String {
        format!("{}/{}/blobs/{digest}", self.base, repo.name)
    }

    /// `<base>/<repository>/manifests/<tag or digest>`.
    pub(crate) fn manifest_url(&self, repo: &Repository, object: &str) -> String {
        format!("{}/{}/manifests/{object}", self.base, repo.name)
    }
}

/// The client's per-host state: endpoints built so far, HTTP clients by their TLS
/// settings, connection limits, and mirrors left out of range reads.
#[derive(Default)]
pub(crate) struct HostState {
    endpoints: Mutex<HashMap<(String, Purpose), Endpoints>>,
    http_clients: Mutex<HashMap<ClientSettings, reqwest::Client>>,
    limiters: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Until when a mirror (for every blob, or for one it did not have) gets no range
    /// reads.
    range_unfit: Mutex<HashMap<(String, Option<Digest>), Instant>>,
}

/// What an HTTP client is built from; clients are shared by endpoints that agree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientSettings {
    cas: Vec<PathBuf>,
    /// Certificate file and key file (`None`: the key is in the certificate file).
    identity: Option<(PathBuf, Option<PathBuf>)>,
    skip_verify: bool,
    timeout_sec: u64,
    connect_timeout: Option<Duration>,
}

/// An endpoint before its client is built, with what it may be asked.
struct Planned {
    authority: String,
    base: String,
    is_mirror: bool,
    capabilities: Capabilities,
    settings: ClientSettings,
    headers: HeaderMap,
}

/// Loads every CA file `[resolver]` names, so a bad path fails at start (or reload)
/// rather than on the first request. Host directories are read when first used.
pub(crate) fn check_resolver_cas(resolver: &ResolverConfig) -> Result<()> {
    for host in resolver.host.values() {
        for path in host
            .ca
            .iter()
            .chain(host.mirrors.iter().flat_map(|m| m.ca.iter()))
        {
            load_ca(path)?;
        }
    }
    Ok(())
}

impl HostState {
    /// The endpoints for `purpose` at `registry`, mirrors first, as `resolver` and `http`
    /// say.
    pub(crate) fn endpoints(
        &self,
        resolver: &ResolverConfig,
        http: &HttpConfig,
        registry: &str,
        purpose: Purpose,
    ) -> Result<Endpoints> {
        let key = (registry.to_string(), purpose);
        if let Some(found) = lock(&self.endpoints).get(&key) {
            return Ok(found.clone());
        }
        let mut built = Vec::new();
        for p in plan_endpoints(resolver, http, registry)? {
            if purpose.allowed(p.capabilities) {
                built.push(self.endpoint(resolver, http, registry, p)?);
            }
        }
        let built: Endpoints = built.into();
        lock(&self.endpoints).insert(key, built.clone());
        Ok(built)
    }

    /// Forgets endpoints, HTTP clients and range verdicts (after a reload: the hosts and
    /// the files behind them may have changed); connection limits stay.
    pub(crate) fn reset(&self) {
        lock(&self.endpoints).clear();
        lock(&self.http_clients).clear();
        lock(&self.range_unfit).clear();
    }

    fn endpoint(
        &self,
        resolver: &ResolverConfig,
        http: &HttpConfig,
        registry: &str,
        p: Planned,
    ) -> Result<Endpoint> {
        let limit = resolver
            .host(registry)
            .and_then(|h| h.max_concurrent_requests)
            .unwrap_or(http.max_concurrent_requests);
        Ok(Endpoint {
            namespace: namespace_for(&p.authority, registry),
            client: self.http_client(http, p.settings)?,
            limiter: self.limiter(&p.authority, limit),
            host: p.authority,
            base: p.base,
            headers: p.headers,
            is_mirror: p.is_mirror,
        })
    }

    fn limiter(&self, host: &str, limit: usize) -> Arc<Semaphore> {
        lock(&self.limiters)
            .entry(host.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(limit)))
            .clone()
    }

    fn http_client(
        &self,
        http: &HttpConfig,
        mut settings: ClientSettings,
    ) -> Result<reqwest::Client> {
        settings.cas.sort();
        settings.cas.dedup();
        if let Some(c) = lock(&self.http_clients).get(&settings) {
            return Ok(c.clone());
        }
        let connect = settings
            .connect_timeout
            .unwrap_or(Duration::from_secs(http.connect_timeout_sec));
        let mut builder = reqwest::Client::builder()
            // Redirects are followed by hand: bounded, per-blob cached, no auth forwarded.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect)
            .timeout(Duration::from_secs(settings.timeout_sec))
            .read_timeout(Duration::from_millis(http.stall_timeout_msec))
            .pool_max_idle_per_host(http.max_idle_per_host)
            .user_agent(concat!("lazysnap/", env!("CARGO_PKG_VERSION")));
        for path in &settings.cas {
            builder = builder.add_root_certificate(load_ca(path)?);
        }
        if let Some((cert, key)) = &settings.identity {
            builder = builder.identity(load_identity(cert, key.as_deref())?);
        }
        if settings.skip_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let client = builder
            .build()
            .map_err(|e| Error::Config(format!("building the HTTP client: {e}")))?;
        lock(&self.http_clients).insert(settings, client.clone());
        Ok(client)
    }

    /// False while `ep` is left out of range reads of `digest`.
    pub(crate) fn range_fit(&self, ep: &Endpoint, digest: &Digest) -> bool {
        let now = Instant::now();
        let mut unfit = lock(&self.range_unfit);
        unfit.retain(|_, until| *until > now);
        !unfit.contains_key(&(ep.host.clone(), None))
            && !unfit.contains_key(&(ep.host.clone(), Some(digest.clone())))
    }

    /// Leaves a mirror out of range reads for `pause`: of every blob, or (`only`) of one
    /// it said it does not have.
    pub(crate) fn mark_range_unfit(
        &self,
        ep: &Endpoint,
        only: Option<&Digest>,
        why: &str,
        pause: Duration,
    ) {
        tracing::warn!(mirror = %ep.host, blob = ?only.map(|d| d.to_string()), reason = why,
            seconds = pause.as_secs(), "mirror left out of range reads for a while");
        lock(&self.range_unfit).insert((ep.host.clone(), only.cloned()), Instant::now() + pause);
    }
}

/// `[resolver.host."REGISTRY"]` when lazysnapd's config names the registry, else its
/// host directory under `config_path`, else the registry itself on its defaults.
fn plan_endpoints(
    resolver: &ResolverConfig,
    http: &HttpConfig,
    registry: &str,
) -> Result<Vec<Planned>> {
    if let Some(host) = resolver.host(registry) {
        if let Some(dir) = hosts_dir::find_dir(&resolver.config_roots(), registry) {
            tracing::debug!(registry, dir = %dir.display(),
                "[resolver.host] names this registry; its host directory is not read");
        }
        return plan_from_resolver(http, registry, host);
    }
    if let Some(dir) = hosts_dir::find_dir(&resolver.config_roots(), registry) {
        let entries = hosts_dir::load_dir(&dir).or_else(|e| {
            // containerd's way: a file it cannot read leaves docker's certs.d form.
            tracing::error!(registry, error = %e,
                "bad hosts.toml: using the registry itself with the directory's certificates");
            hosts_dir::load_cert_files(&dir).map_err(Error::Config)
        })?;
        return plan_from_hosts_dir(http, registry, &dir, entries);
    }
    plan_from_resolver(http, registry, &HostConfig::default())
}

fn plan_from_resolver(
    http: &HttpConfig,
    registry: &str,
    host_config: &HostConfig,
) -> Result<Vec<Planned>> {
    let origin_host = api_host(registry).to_string();
    let mut origin_plain = host_config
        .plain_http
        .unwrap_or(is_loopback(&origin_host) && host_config.ca.is_empty());
    let mut origin_timeout = host_config
        .request_timeout_sec
        .unwrap_or(http.request_timeout_sec);
    let mut out = Vec::new();
    for mirror in &host_config.mirrors {
        let (scheme, authority, prefix) = split_mirror_host(&mirror.host);
        if authority == registry || authority == origin_host {
            // stargz-snapshotter's way of saying "the registry itself speaks HTTP".
            if mirror.insecure || scheme == Some("http") {
                origin_plain = true;
            }
            if mirror.request_timeout_sec > 0 {
                origin_timeout = mirror.request_timeout_sec;
            }
            continue;
        }
        let plain = match scheme {
            Some(s) => s == "http",
            None => mirror.insecure || (is_loopback(authority) && mirror.ca.is_empty()),
        };
        let timeout_sec = if mirror.request_timeout_sec > 0 {
            mirror.request_timeout_sec
        } else {
            http.request_timeout_sec
        };
        let mut cas = http.ca.clone();
        cas.extend(mirror.ca.iter().cloned());
        let mut headers = HeaderMap::new();
        for (k, v) in &mirror.header {
            add_header(&mut headers, authority, k, v)?;
        }
        out.push(Planned {
            authority: authority.to_string(),
            base: base_url(plain, authority, prefix),
            is_mirror: true,
            // stargz-snapshotter's mirrors serve pulls only.
            capabilities: Capabilities {
                pull: true,
                resolve: true,
                push: false,
                referrers: false,
            },
            settings: ClientSettings {
                cas,
                identity: None,
                skip_verify: false,
                timeout_sec,
                connect_timeout: None,
            },
            headers,
        });
    }
    let mut cas = http.ca.clone();
    cas.extend(host_config.ca.iter().cloned());
    let mut headers = HeaderMap::new();
    for (k, v) in &host_config.header {
        add_header(&mut headers, &origin_host, k, v)?;
    }
    out.push(Planned {
        base: base_url(origin_plain, &origin_host, ""),
        authority: origin_host,
        is_mirror: false,
        capabilities: Capabilities::ALL,
        settings: ClientSettings {
            cas,
            identity: None,
            skip_verify: false,
            timeout_sec: origin_timeout,
            connect_timeout: None,
        },
        headers,
    });
    Ok(out)
}

fn plan_from_hosts_dir(
    http: &HttpConfig,
    registry: &str,
    dir: &Path,
    entries: Vec<HostEntry>,
) -> Result<Vec<Planned>> {
    let last = entries.len().saturating_sub(1);
    let mut out = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        let (plain, authority, path) = match &e.url {
            Some(u) => (u.plain_http, u.authority.clone(), u.path.clone()),
            None => {
                let origin = api_host(registry).to_string();
                let plain = is_loopback(&origin) && e.ca.is_empty() && e.client.is_empty();
                (plain, origin, "/v2".to_string())
            }
        };
        if e.client.len() > 1 {
            tracing::warn!(registry, dir = %dir.display(), host = %authority,
                "several client certificates: the first is presented");
        }
        let mut cas = http.ca.clone();
        cas.extend(e.ca.iter().cloned());
        let mut headers = HeaderMap::new();
        for (k, values) in &e.header {
            for v in values {
                add_header(&mut headers, &authority, k, v)?;
            }
        }
        let scheme = if plain { "http" } else { "https" };
        out.push(Planned {
            base: format!("{scheme}://{authority}{path}"),
            authority,
            is_mirror: i < last,
            capabilities: e.capabilities,
            settings: ClientSettings {
                cas,
                identity: e.client.first().cloned(),
                skip_verify: e.skip_verify.unwrap_or(false),
                timeout_sec: http.request_timeout_sec,
                connect_timeout: e.dial_timeout,
            },
            headers,
        });
    }
    Ok(out)
}
/// containerd's rule: a host other than the registry's own is serving it as a proxy.
fn namespace_for(authority: &str, registry: &str) -> Option<String> {
    let own = authority == registry
        || authority == api_host(registry)
        || (registry == DOCKER_HUB && authority == DOCKER_HUB_API);
    (!own).then(|| registry.to_string())
}

/// `url` with `ns=<namespace>` added to its query.
pub(crate) fn with_namespace(url: &str, namespace: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    let mut out = String::with_capacity(url.len() + namespace.len() + 4);
    out.push_str(url);
    out.push(sep);
    out.push_str("ns=");
    for b in namespace.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn add_header(map: &mut HeaderMap, host: &str, name: &str, value: &str) -> Result<()> {
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| Error::Config(format!("{host}: invalid header name {name:?}")))?;
    let value = HeaderValue::from_str(value)
        .map_err(|_| Error::Config(format!("{host}: invalid value for header {name:?}")))?;
    map.append(name, value);
    Ok(())
}

pub(crate) fn load_ca(path: &Path) -> Result<reqwest::Certificate> {
    let pem = std::fs::read(path)
        .map_err(|e| Error::Config(format!("reading CA certificate {}: {e}", path.display())))?;
    reqwest::Certificate::from_pem(&pem)
        .map_err(|e| Error::Config(format!("CA certificate {}: {e}", path.display())))
}

fn load_identity(cert: &Path, key: Option<&Path>) -> Result<reqwest::Identity> {
    let read = |p: &Path| {
        std::fs::read(p)
            .map_err(|e| Error::Config(format!("reading client certificate {}: {e}", p.display())))
    };
    let mut pem = read(cert)?;
    if let Some(key) = key {
        pem.push(b'\n');
        pem.extend(read(key)?);
    }
    reqwest::Identity::from_pem(&pem)
        .map_err(|e| Error::Config(format!("client certificate {}: {e}", cert.display())))
}

fn split_mirror_host(spec: &str) -> (Option<&str>, &str, &str) {
    let spec = spec.trim();
    let (scheme, rest) = if let Some(r) = spec.strip_prefix("https://") {
        (Some("https"), r)
    } else if let Some(r) = spec.strip_prefix("http://") {
        (Some("http"), r)
    } else {
        (None, spec)
    };
    let rest = rest.trim_end_matches('/');
    match rest.find('/') {
        Some(i) => (scheme, &rest[..i], &rest[i..]),
        None => (scheme, rest, ""),
    }
}

fn base_url(plain: bool, authority: &str, prefix: &str) -> String {
    let scheme = if plain { "http" } else { "https" };
    let prefix = prefix.trim_end_matches('/');
    if prefix.ends_with("/v2") {
        format!("{scheme}://{authority}{prefix}")
    } else {
        format!("{scheme}://{authority}{prefix}/v2")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Client;
    use crate::config::RegistryConfig;

    #[test]
    fn mirror_hosts_and_base_urls() {
        assert_eq!(
            split_mirror_host("m.example.com"),
            (None, "m.example.com", "")
        );
        assert_eq!(
            split_mirror_host("http://m.example.com:5000/pfx/"),
            (Some("http"), "m.example.com:5000", "/pfx")
        );
        assert_eq!(base_url(false, "h", ""), "https://h/v2");
        assert_eq!(base_url(true, "h:1", "/pfx"), "http://h:1/pfx/v2");
        assert_eq!(base_url(false, "h", "/x/v2"), "https://h/x/v2");
    }

    #[test]
    fn a_reloaded_resolver_applies_to_the_next_requests() {
        let client = Client::new(RegistryConfig::default()).unwrap();
        let before = client.endpoints("docker.io", Purpose::Pull).unwrap();
        assert_eq!(before.len(), 1);
        let reloaded: RegistryConfig = toml::from_str(
            r#"
[[resolver.host."docker.io".mirrors]]
host = "mirror.example.com"
"#,
        )
        .unwrap();
        client.reload_resolver(reloaded.resolver).unwrap();
        let after = client.endpoints("docker.io", Purpose::Pull).unwrap();
        let bases: Vec<_> = after.iter().map(|e| e.base.as_str()).collect();
        assert_eq!(
            bases,
            [
                "https://mirror.example.com/v2",
                "https://registry-1.docker.io/v2"
            ]
        );
        // A CA file that is not there: refused, and the settings in force stay.
        let bad: RegistryConfig = toml::from_str(
            r#"
[resolver.host."docker.io"]
ca = ["/nonexistent/ca.pem"]
"#,
        )
        .unwrap();
        assert!(client.reload_resolver(bad.resolver).is_err());
        assert_eq!(
            client.endpoints("docker.io", Purpose::Pull).unwrap().len(),
            2
        );
    }

    #[test]
    fn endpoints_follow_the_config() {
        let config: RegistryConfig = toml::from_str(
            r#"
[[resolver.host."docker.io".mirrors]]
host = "mirror.example.com"
[[resolver.host."docker.io".mirrors]]
host = "127.0.0.1:7000"
[[resolver.host."lan.example:5000".mirrors]]
host = "lan.example:5000"
insecure = true
[resolver.host."127.0.0.1:6000"]
plain_http = false
"#,
        )
        .unwrap();
        let client = Client::new(config).unwrap();
        let hub = client.endpoints("docker.io", Purpose::Pull).unwrap();
        let bases: Vec<_> = hub.iter().map(|e| e.base.as_str()).collect();
        assert_eq!(
            bases,
            [
                "https://mirror.example.com/v2",
                "http://127.0.0.1:7000/v2",
                "https://registry-1.docker.io/v2"
            ]
        );
        assert!(hub[0].is_mirror && !hub[2].is_mirror);
        let push = client.endpoints("docker.io", Purpose::Push).unwrap();
        assert_eq!(push.len(), 1);
        let lan = client.endpoints("lan.example:5000", Purpose::Pull).unwrap();
        assert_eq!(lan.len(), 1);
        assert_eq!(lan[0].base, "http://lan.example:5000/v2");
        let tls_loop = client.endpoints("127.0.0.1:6000", Purpose::Pull).unwrap();
        assert_eq!(tls_loop[0].base, "https://127.0.0.1:6000/v2");
        let plain_loop = client.endpoints("localhost:5000", Purpose::Pull).unwrap();
        assert_eq!(plain_loop[0].base, "http://localhost:5000/v2");
        let other = client.endpoints("ghcr.io", Purpose::Pull).unwrap();
        assert_eq!(other[0].base, "https://ghcr.io/v2");
    }

    #[test]
    fn connection_limits_are_per_host_and_shared() {
        let mut config: RegistryConfig = toml::from_str(
            r#"
[resolver.host."a.example"]
max_concurrent_requests = 3
header = { "Authorization" = "Bearer configured-secret" }
"#,
        )
        .unwrap();
        config.http.max_concurrent_requests = 7;
        let client = Client::new(config).unwrap();
        let a = client.endpoints("a.example", Purpose::Pull).unwrap();
        assert_eq!(a[0].limiter.available_permits(), 3);
        let b = client.endpoints("b.example", Purpose::Pull).unwrap();
        assert_eq!(b[0].limiter.available_permits(), 7);
        // Pull and push endpoints of one host count against the same limit.
        let a_push = client.endpoints("a.example", Purpose::Push).unwrap();
        assert!(Arc::ptr_eq(&a[0].limiter, &a_push[0].limiter));
        assert!(!format!("{client:?}").contains("configured-secret"));
    }

    fn bases(eps: &[Endpoint]) -> Vec<(&str, Option<&str>)> {
        eps.iter()
            .map(|e| (e.base.as_str(), e.namespace.as_deref()))
            .collect()
    }

    #[test]
    fn host_directories_give_endpoints_by_capability() {
        let root = tempfile::tempdir().unwrap();
        let hub = root.path().join("docker.io");
        std::fs::create_dir(&hub).unwrap();
        std::fs::write(
            hub.join("hosts.toml"),
            r#"
server = "https://registry-1.docker.io"
[host."http://127.0.0.1:30020"]
  capabilities = ["pull"]
  [host."http://127.0.0.1:30020".header]
    x-spegel = ["a", "b"]
[host."https://hub-proxy.example.com/cache/v2"]
  capabilities = ["pull", "resolve"]
  override_path = true
"#,
        )
        .unwrap();
        let mut config = RegistryConfig::default();
        config.resolver.config_path = Some(format!("/nonexistent:{}", root.path().display()));
        let client = Client::new(config).unwrap();
        let pull = client.endpoints("docker.io", Purpose::Pull).unwrap();
        assert_eq!(
            bases(&pull),
            [
                ("http://127.0.0.1:30020/v2", Some("docker.io")),
                ("https://hub-proxy.example.com/cache/v2", Some("docker.io")),
                ("https://registry-1.docker.io/v2", None)
            ]
        );
        assert!(pull[0].is_mirror && pull[1].is_mirror && !pull[2].is_mirror);
        let values: Vec<_> = pull[0].headers.get_all("x-spegel").iter().collect();
        assert_eq!(values, ["a", "b"]);
        let resolve = client.endpoints("docker.io", Purpose::Resolve).unwrap();
        assert_eq!(resolve.len(), 2);
        assert_eq!(resolve[0].host, "hub-proxy.example.com");
        let push = client.endpoints("docker.io", Purpose::Push).unwrap();
        assert_eq!(bases(&push), [("https://registry-1.docker.io/v2", None)]);

        // A registry without a directory (and no _default): itself, on its defaults.
        let ghcr = client.endpoints("ghcr.io", Purpose::Pull).unwrap();
        assert_eq!(bases(&ghcr), [("https://ghcr.io/v2", None)]);

        // lazysnapd's own [resolver.host] wins over the directory.
        let mut config = RegistryConfig::default();
        config.resolver.config_path = Some(root.path().display().to_string());
        config
            .resolver
            .host
            .insert("docker.io".into(), HostConfig::default());
        let client = Client::new(config).unwrap();
        assert_eq!(
            client.endpoints("docker.io", Purpose::Pull).unwrap().len(),
            1
        );
    }

    #[test]
    fn a_changed_host_directory_applies_after_a_reload() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("lan.example:5000");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("hosts.toml"),
            "server = \"http://lan.example:5000\"\n",
        )
        .unwrap();
        let mut config = RegistryConfig::default();
        config.resolver.config_path = Some(root.path().display().to_string());
        let client = Client::new(config.clone()).unwrap();
        let before = client.endpoints("lan.example:5000", Purpose::Pull).unwrap();
        assert_eq!(bases(&before), [("http://lan.example:5000/v2", None)]);
        std::fs::write(
            dir.join("hosts.toml"),
            "server = \"http://lan.example:5000\"\n[host.\"m.example\"]\n",
        )
        .unwrap();
        assert_eq!(
            client
                .endpoints("lan.example:5000", Purpose::Pull)
                .unwrap()
                .len(),
            1
        );
        client.reload_resolver(config.resolver).unwrap();
        let after = client.endpoints("lan.example:5000", Purpose::Pull).unwrap();
        assert_eq!(
            bases(&after),
            [
                ("https://m.example/v2", Some("lan.example:5000")),
                ("http://lan.example:5000/v2", None)
            ]
        );
        // A file that does not parse: containerd's fallback, the registry itself.
        std::fs::write(dir.join("hosts.toml"), "[host.\"m\"]\ncapabilities = 3\n").unwrap();
        client
            .reload_resolver(client.resolver().as_ref().clone())
            .unwrap();
        let broken = client.endpoints("lan.example:5000", Purpose::Pull).unwrap();
        assert_eq!(bases(&broken), [("https://lan.example:5000/v2", None)]);
    }

    #[test]
    fn the_namespace_is_for_hosts_serving_another_registry() {
        assert_eq!(namespace_for("registry-1.docker.io", "docker.io"), None);
        assert_eq!(namespace_for("docker.io", "docker.io"), None);
        assert_eq!(namespace_for("ghcr.io", "ghcr.io"), None);
        assert_eq!(
            namespace_for("127.0.0.1:30020", "docker.io").as_deref(),
            Some("docker.io")
        );
        assert_eq!(
            with_namespace("http://m/v2/r/blobs/sha256:ab", "docker.io"),
            "http://m/v2/r/blobs/sha256:ab?ns=docker.io"
        );
        assert_eq!(
            with_namespace("http://m/v2/r/referrers/x?artifactType=a", "lan:5000"),
            "http://m/v2/r/referrers/x?artifactType=a&ns=lan:5000"
        );
        assert_eq!(with_namespace("u", "a b/c"), "u?ns=a%20b%2Fc");
    }
}
