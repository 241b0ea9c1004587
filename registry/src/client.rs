//! The HTTP core: the client and its shared state, and one request sent to one endpoint
//! (its connection limit, the 401 challenge answered, redirects followed by hand).

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{self, HeaderValue};
use reqwest::{StatusCode, Url};
use tokio::sync::OwnedSemaphorePermit;

use crate::Digest;
use crate::auth::{Anonymous, Auth, Challenge, CredentialProvider, parse_challenges};
use crate::config::{HttpConfig, RegistryConfig, ResolverConfig};
use crate::endpoints::{
    Endpoint, Endpoints, HostState, Purpose, check_resolver_cas, load_ca, with_namespace,
};
use crate::error::{Error, Result, Target};
use crate::platform::Platform;
use crate::request::Req;

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
    pub(crate) auth: Auth,
    pub(crate) hosts: HostState,
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
                auth: Auth::new(Arc::new(Anonymous)),
                hosts: HostState::default(),
            }),
        })
    }

    /// Uses `provider` for credentials (e.g. [`crate::DockerConfig::load_default`]).
    /// Call before sharing the client: it replaces the shared state.
    pub fn with_credentials(self, provider: Arc<dyn CredentialProvider>) -> Self {
        let inner = match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                inner.auth.credentials = provider;
                inner
            }
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
                auth: Auth::new(provider),
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

    /// The endpoints for `purpose` at `registry`, mirrors first, per the settings in force.
    pub(crate) fn endpoints(&self, registry: &str, purpose: Purpose) -> Result<Endpoints> {
        self.inner
            .hosts
            .endpoints(&self.resolver(), self.http(), registry, purpose)
    }

    /// False while `ep` is left out of range reads of `digest`.
    pub(crate) fn range_fit(&self, ep: &Endpoint, digest: &Digest) -> bool {
        self.inner.hosts.range_fit(ep, digest)
    }

    /// Leaves a mirror out of range reads for `http.mirror_range_retry_sec`: of every
    /// blob, or (`only`) of one it said it does not have.
    pub(crate) fn mark_range_unfit(&self, ep: &Endpoint, only: Option<&Digest>, why: &str) {
        let pause = Duration::from_secs(self.http().mirror_range_retry_sec);
        self.inner.hosts.mark_range_unfit(ep, only, why, pause);
    }

    /// Drops the registry tokens got so far, so the next requests authenticate with the
    /// credentials the provider gives now (after a reload of docker's config).
    pub fn forget_tokens(&self) {
        self.inner.auth.cache.clear();
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
            Some(scopes) => self.inner.auth.header(ep, target, scopes, None).await?,
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
            let learnt = self.inner.auth.learn_scheme(ep, &challenges);
            if !learnt {
                return Err(Error::Unauthorized {
                    target: target.clone(),
                    reason: "HTTP 401 without a usable WWW-Authenticate challenge".into(),
                });
            }
            drop(resp);
            let rejected = auth.take();
            auth = self
                .inner
                .auth
                .header(ep, target, scopes, rejected.as_deref())
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
                    self.inner.auth.cache.drop_token(&ep.host, key);
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
