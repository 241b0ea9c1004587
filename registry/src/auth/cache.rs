//! The client's authentication state: schemes learnt per host, tokens per scope.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use estargz::lock;

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
