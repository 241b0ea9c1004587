//! The HTTP core: endpoints (mirrors, then the origin), connection limits, authentication,
//! manual redirects and retries with backoff.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::{
    Anonymous, AuthCache, Challenge, CredentialProvider, Scheme, TokenResponse, parse_challenges,
    token_lifetime,
};
use crate::body::read_limited;
use crate::config::{HttpConfig, RegistryConfig, ResolverConfig, is_loopback};
use crate::endpoints::{Endpoint, HostState, check_resolver_cas, load_ca, with_namespace};
use crate::error::{Error, Result, Target};
use crate::platform::Platform;

/// A registry client: cheap to clone, shares connections, tokens and caches.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    http: HttpConfig,
    /// Replaced by [`Client::reload_resolver`] (SIGHUP).
    resolver: std::sync::RwLock<Arc<ResolverConfig>>,
    pub(crate) platform: Platform,
    credentials: Arc<dyn CredentialProvider>,
    auth: AuthCache,
    pub(crate) hosts: HostState,
}

/// A request, described so it can be sent again (after a 401, a redirect or a retry).
pub(crate) struct Req<'a> {
    pub method: Method,
    pub url: String,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
    /// Token scopes (`repository:NAME:pull`); `None` sends no credentials at all
    /// (a cached storage URL must not receive the registry's token).
    pub scopes: Option<&'a [String]>,
    pub follow_redirects: bool,
}

/// A response, with the semaphore permit that counts it against the host's limit.
pub(crate) struct Sent {
    pub resp: reqwest::Response,
    /// The final URL when redirects were followed.
    pub redirected: Option<Url>,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the whole config: configured headers may carry tokens.
        f.debug_struct("Client")
            .field(
                "hosts",
                &self.resolver().host.keys().cloned().collect::<Vec<_>>(),
            )
            .field("platform", &self.inner.platform)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client with anonymous access; see [`Client::with_credentials`].
    pub fn new(config: RegistryConfig) -> Result<Self> {
        config.validate().map_err(Error::Config)?;
        let platform = match &config.http.platform {
            Some(p) => Platform::parse(p).map_err(Error::Config)?,
            None => Platform::host(),
        };
        // Fail early on unreadable CA files rather than on the first request.
        for path in &config.http.ca {
            load_ca(path)?;
        }
        check_resolver_cas(&config.resolver)?;
        Ok(Self {
            inner: Arc::new(Inner {
                http: config.http,
                resolver: std::sync::RwLock::new(Arc::new(config.resolver)),
                platform,
                credentials: Arc::new(Anonymous),
                auth: AuthCache::default(),
                hosts: HostState::default(),
            }),
        })
    }

    /// Uses `provider` for credentials (e.g. [`crate::DockerConfig::load_default`]).
    /// Call before sharing the client: it replaces the shared state.
    pub fn with_credentials(self, provider: Arc<dyn CredentialProvider>) -> Self {
        let inner = match Arc::try_unwrap(self.inner) {
            Ok(inner) => Inner {
                credentials: provider,
                ..inner
            },
            Err(shared) => Inner {
                http: shared.http.clone(),
                resolver: std::sync::RwLock::new(
                    shared
                        .resolver
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                ),
                platform: shared.platform.clone(),
                credentials: provider,
                auth: AuthCache::default(),
                hosts: HostState::default(),
            },
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The platform picked from image indexes.
    pub fn platform(&self) -> &Platform {
        &self.inner.platform
    }

    pub(crate) fn http(&self) -> &HttpConfig {
        &self.inner.http
    }

    pub(crate) fn resolver(&self) -> Arc<ResolverConfig> {
        self.inner
            .resolver
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the per-registry settings (mirrors, plain HTTP, CAs, headers) for the
    /// requests that follow; requests in flight finish on the old ones. The HTTP settings
    /// are not reloadable: they shape connections already open.
    pub fn reload_resolver(&self, resolver: ResolverConfig) -> Result<()> {
        RegistryConfig {
            resolver: resolver.clone(),
            http: self.inner.http.clone(),
        }
        .validate()
        .map_err(Error::Config)?;
        check_resolver_cas(&resolver)?;
        *self
            .inner
            .resolver
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(resolver);
        self.inner.hosts.reset();
        Ok(())
    }

    /// Drops the registry tokens got so far, so the next requests authenticate with the
    /// credentials the provider gives now (after a reload of docker's config).
    pub fn forget_tokens(&self) {
        self.inner.auth.clear();
    }

    pub(crate) fn retry_policy(&self, is_mirror: bool) -> Retry {
        let h = self.http();
        Retry {
            // A failing mirror is skipped at once: the next host is the recovery.
            max_retries: if is_mirror { 0 } else { h.max_retries },
            min_wait: Duration::from_millis(h.min_wait_msec),
            max_wait: Duration::from_millis(h.max_wait_msec),
            max_time: Duration::from_secs(h.max_retry_time_sec),
            start: Instant::now(),
            attempts: 0,
        }
    }

    /// Mirrors (when `with_mirrors`) then the registry itself.
    /// Runs `attempt` against each endpoint in turn (mirrors first), retrying on each as
    /// its retry policy allows: the first success wins, else the last endpoint's error.
    pub(crate) async fn on_endpoints<'e, T, Attempt>(
        &self,
        endpoints: &'e [Endpoint],
        mut attempt: impl FnMut(&'e Endpoint) -> Attempt,
    ) -> Result<T>
    where
        Attempt: std::future::Future<Output = Result<T>>,
    {
        let mut outcome = Err(Error::Config("no endpoint".into()));
        for ep in endpoints {
            let mut retry = self.retry_policy(ep.is_mirror);
            let result = loop {
                match attempt(ep).await {
                    Ok(v) => break Ok(v),
                    Err(e) => {
                        if let Err(e) = retry.wait(e).await {
                            break Err(e);
                        }
                    }
                }
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if ep.is_mirror {
                        tracing::warn!(mirror = %ep.host, error = %e, "mirror failed, trying the next host");
                    }
                    outcome = Err(e);
                }
            }
        }
        outcome
    }

    /// Sends `req` to `ep`, answering auth challenges and following redirects.
    pub(crate) async fn send(&self, ep: &Endpoint, target: &Target, req: Req<'_>) -> Result<Sent> {
        let permit = ep
            .limiter
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Config("connection limiter closed".into()))?;
        let scope_key = req.scopes.map(|s| s.join(" "));
        let mut auth = match req.scopes {
            Some(scopes) => self.auth_header(ep, target, scopes, None).await?,
            None => None,
        };
        let mut resp = self
            .send_once(ep, target, &req, &req.url, auth.as_deref(), true)
            .await?;
        if resp.status() == StatusCode::UNAUTHORIZED
            && let Some(scopes) = req.scopes
        {
            let challenges: Vec<Challenge> = resp
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(parse_challenges)
                .collect();
            let learnt = self.learn_scheme(ep, &challenges);
            if !learnt {
                return Err(Error::Unauthorized {
                    target: target.clone(),
                    reason: "HTTP 401 without a usable WWW-Authenticate challenge".into(),
                });
            }
            drop(resp);
            let rejected = auth.take();
            auth = self
                .auth_header(ep, target, scopes, rejected.as_deref())
                .await?;
            if auth.is_none() {
                return Err(Error::Unauthorized {
                    target: target.clone(),
                    reason: "the registry requires credentials and none are configured".into(),
                });
            }
            resp = self
                .send_once(ep, target, &req, &req.url, auth.as_deref(), true)
                .await?;
            if resp.status() == StatusCode::UNAUTHORIZED {
                if let Some(key) = &scope_key {
                    self.inner.auth.drop_token(&ep.host, key);
                }
                return Err(Error::Unauthorized {
                    target: target.clone(),
                    reason: "the registry refused the credentials".into(),
                });
            }
        }
        let mut redirected = None;
        let mut current: Url = req
            .url
            .parse()
            .map_err(|_| Error::bad(target, "request URL does not parse"))?;
        let mut hops = 0;
        while req.follow_redirects && resp.status().is_redirection() {
            hops += 1;
            if hops > self.http().max_redirects {
                return Err(Error::TooManyRedirects {
                    target: target.clone(),
                    limit: self.http().max_redirects,
                });
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    Error::bad(target, format!("HTTP {} without Location", resp.status()))
                })?;
            let next = current
                .join(location)
                .map_err(|_| Error::bad(target, "redirect Location is not a URL"))?;
            if next.scheme() != "https" && next.scheme() != "http" {
                return Err(Error::bad(target, "redirect to a non-HTTP URL"));
            }
            tracing::debug!(target = %target, to = %redacted_url(&next), "following redirect");
            // The registry's credentials stay with the registry: storage URLs are signed.
            resp = self
                .send_once(ep, target, &req, next.as_str(), None, false)
                .await?;
            current = next;
            redirected = Some(current.clone());
        }
        Ok(Sent {
            resp,
            redirected,
            _permit: permit,
        })
    }

    async fn send_once(
        &self,
        ep: &Endpoint,
        target: &Target,
        req: &Req<'_>,
        url: &str,
        auth: Option<&str>,
        to_endpoint: bool,
    ) -> Result<reqwest::Response> {
        let mut builder = match (&ep.namespace, to_endpoint) {
            (Some(ns), true) => ep
                .client
                .request(req.method.clone(), with_namespace(url, ns)),
            _ => ep.client.request(req.method.clone(), url),
        };
        if to_endpoint {
            builder = builder.headers(ep.headers.clone());
        }
        builder = builder.headers(req.headers.clone());
        if let Some(auth) = auth {
            let mut value = HeaderValue::from_str(auth).map_err(|_| Error::Credentials {
                registry: ep.host.clone(),
                reason: "credentials contain characters not allowed in a header".into(),
            })?;
            value.set_sensitive(true);
            builder = builder.header(header::AUTHORIZATION, value);
        }
        if let Some(body) = &req.body {
            builder = builder.body(body.clone());
        }
        builder
            .send()
            .await
            .map_err(|e| Error::transport(target, "sending request", e))
    }

    /// Records what the host's challenges ask for; false when none is usable.
    fn learn_scheme(&self, ep: &Endpoint, challenges: &[Challenge]) -> bool {
        let bearer = challenges.iter().find(|c| c.scheme == "bearer");
        if let Some(c) = bearer
            && let Some(realm) = c.params.get("realm")
        {
            self.inner.auth.set_scheme(
                &ep.host,
                Scheme::Bearer {
                    realm: realm.clone(),
                    service: c.params.get("service").cloned(),
                },
            );
            return true;
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            self.inner.auth.set_scheme(&ep.host, Scheme::Basic);
            return true;
        }
        false
    }

    /// The Authorization value for a request, fetching a token when the host wants one.
    /// Before the host's scheme is known (first request) nothing is sent. `rejected` is
    /// what the host just refused, so that it is not offered again.
    async fn auth_header(
        &self,
        ep: &Endpoint,
        target: &Target,
        scopes: &[String],
        rejected: Option<&str>,
    ) -> Result<Option<String>> {
        let Some(scheme) = self.inner.auth.scheme(&ep.host) else {
            return Ok(None);
        };
        match scheme {
            Scheme::Basic => Ok(self
                .inner
                .credentials
                .credentials_for(&ep.host, &target.repository)
                .await?
                .filter(|c| !c.is_identity_token())
                .map(|c| c.basic_header())),
            Scheme::Bearer { realm, service } => {
                let key = scopes.join(" ");
                // One fetch at a time: concurrent misses (a burst of first reads) wait
                // and then share the token the first one got.
                let _fetching = self.inner.auth.fetch_lock.lock().await;
                if let Some(token) = self.inner.auth.token(&ep.host, &key) {
                    let value = format!("Bearer {token}");
                    if rejected != Some(value.as_str()) {
                        return Ok(Some(value));
                    }
                }
                let (token, lifetime) = self
                    .fetch_token(ep, target, &realm, service.as_deref(), scopes)
                    .await?;
                self.inner
                    .auth
                    .put_token(&ep.host, &key, token.clone(), lifetime);
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        target: &Target,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<(String, Duration)> {
        let realm_url: Url = realm
            .parse()
            .map_err(|_| Error::bad(target, "token realm is not a URL"))?;
        let realm_host = realm_url.host_str().unwrap_or_default().to_string();
        if realm_url.scheme() == "http"
            && !is_loopback(&realm_host)
            && !ep.base.starts_with("http:")
        {
            // Credentials must not cross the network in clear text to a TLS registry's realm.
            return Err(Error::bad(
                target,
                "token realm uses plain HTTP for a TLS registry",
            ));
        }
        let creds = self
            .inner
            .credentials
            .credentials_for(&ep.host, &target.repository)
            .await?;
        let token_target = target.with_host(&format!("{realm_host} (token service)"));
        let mut params: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = service {
            params.push(("service", s));
        }
        for s in scopes {
            params.push(("scope", s));
        }
        let builder = match &creds {
            // docker's identity tokens are OAuth2 refresh tokens: POST form, not GET.
            Some(c) if c.is_identity_token() => {
                params.push(("grant_type", "refresh_token"));
                params.push(("refresh_token", c.secret()));
                params.push(("client_id", "lazysnap"));
                ep.client.post(realm_url.clone()).form(&params)
            }
            Some(c) => {
                let mut value =
                    HeaderValue::from_str(&c.basic_header()).map_err(|_| Error::Credentials {
                        registry: ep.host.clone(),
                        reason: "credentials contain characters not allowed in a header".into(),
                    })?;
                value.set_sensitive(true);
                ep.client
                    .get(realm_url.clone())
                    .query(&params)
                    .header(header::AUTHORIZATION, value)
            }
            None => ep.client.get(realm_url.clone()).query(&params),
        };
        let resp = builder
            .send()
            .await
            .map_err(|e| Error::transport(&token_target, "requesting a token", e))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Error::Unauthorized {
                target: target.clone(),
                reason: format!("the token service refused (HTTP {})", status.as_u16()),
            });
        }
        if !status.is_success() {
            return Err(status_error(resp, &token_target, "requesting a token").await);
        }
        let body = read_limited(resp, &token_target, 1 << 20).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| Error::bad(&token_target, "token response is not JSON"))?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::bad(&token_target, "token response has no token"))?;
        Ok((token, token_lifetime(parsed.expires_in)))
    }
}

/// Backoff state for one operation on one endpoint.
pub(crate) struct Retry {
    max_retries: u32,
    min_wait: Duration,
    max_wait: Duration,
    max_time: Duration,
    start: Instant,
    attempts: u32,
}

impl Retry {
    /// Sleeps before the next attempt, or returns the error when retrying cannot help or
    /// the budget (count or time) is spent.
    pub(crate) async fn wait(&mut self, err: Error) -> Result<()> {
        let give_up = |this: &Self, err: Error| {
            if this.attempts == 0 {
                err
            } else {
                Error::GaveUp {
                    attempts: this.attempts + 1,
                    elapsed: this.start.elapsed(),
                    last: Box::new(err),
                }
            }
        };
        if !err.is_transient() || self.attempts >= self.max_retries {
            return Err(give_up(self, err));
        }
        let delay = match err.retry_after() {
            Some(asked) if asked > self.max_wait => return Err(give_up(self, err)),
            Some(asked) => asked,
            None => backoff(self.min_wait, self.max_wait, self.attempts),
        };
        if self.start.elapsed() + delay > self.max_time {
            return Err(give_up(self, err));
        }
        tracing::debug!(error = %err, delay_ms = delay.as_millis() as u64, "retrying");
        tokio::time::sleep(delay).await;
        self.attempts += 1;
        Ok(())
    }
}

/// Exponential backoff with "equal jitter": half fixed, half random.
pub(crate) fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = min.saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
    let capped = exp.min(max);
    let half = capped / 2;
    half + half.mul_f64(random_unit())
}

/// A number in [0, 1) from the std hasher's random keys: jitter needs no crypto.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Retry-After: delay-seconds or an HTTP date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// An error for an unexpected status, with the registry's own error message if short.
pub(crate) async fn status_error(
    resp: reqwest::Response,
    target: &Target,
    what: &'static str,
) -> Error {
    let status = resp.status().as_u16();
    match status {
        404 => {
            return Error::NotFound {
                target: target.clone(),
            };
        }
        401 | 403 => {
            return Error::Unauthorized {
                target: target.clone(),
                reason: format!("HTTP {status} {what}"),
            };
        }
        _ => {}
    }
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    // The distribution spec's error body: {"errors":[{"code":..,"message":..}]}.
    let detail = match read_limited(resp, target, 4096).await {
        Ok(body) => registry_error_detail(&body),
        Err(_) => String::new(),
    };
    Error::Status {
        target: target.clone(),
        what,
        status,
        detail,
        retry_after,
    }
}

fn registry_error_detail(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(e) => e
            .errors
            .iter()
            .map(|i| format!("{} {}", i.code, i.message).trim().to_string())
            .collect::<Vec<_>>()
            .join("; ")
            .chars()
            .take(300)
            .collect(),
        Err(_) => String::new(),
    }
}

/// A URL fit for logs: no query (signed storage URLs carry credentials there).
pub(crate) fn redacted_url(url: &Url) -> String {
    format!(
        "{}://{}{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.path()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 0..40 {
            let d = backoff(min, max, attempt);
            let full = min.saturating_mul(1 << attempt.min(20)).min(max);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(120);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn registry_error_bodies() {
        let body = br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":"x"}]}"#;
        assert_eq!(
            registry_error_detail(body),
            "BLOB_UNKNOWN blob unknown to registry"
        );
        assert_eq!(registry_error_detail(b"<html>"), "");
    }
}
