//! Credentials and where they come from: the provider trait, anonymous access and fixed
//! credentials per host. Secrets never reach logs or `Debug` output.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::error::Result;

/// A user name and a secret (password, token or identity token).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    secret: String,
}

/// docker's convention: this user name means the secret is an OAuth2 refresh token.
const IDENTITY_TOKEN_USER: &str = "<token>";

impl Credentials {
    pub fn new(username: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            secret: secret.into(),
        }
    }

    /// An identity (refresh) token, as `docker login` stores for some registries.
    pub fn identity_token(token: impl Into<String>) -> Self {
        Self::new(IDENTITY_TOKEN_USER, token)
    }

    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }

    /// The secret itself, for a keychain that must keep it across restarts (in a
    /// root-only file); never for logs.
    pub fn expose_secret(&self) -> &str {
        &self.secret
    }

    pub(crate) fn is_identity_token(&self) -> bool {
        self.username == IDENTITY_TOKEN_USER
    }

    pub(crate) fn basic_header(&self) -> String {
        format!(
            "Basic {}",
            BASE64.encode(format!("{}:{}", self.username, self.secret))
        )
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .finish()
    }
}

pub type CredentialFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Credentials>>> + Send + 'a>>;

/// Where credentials for a registry host come from.
pub trait CredentialProvider: Send + Sync {
    /// Credentials for `host` (`registry-1.docker.io`, `ghcr.io`, `127.0.0.1:5000`), if any.
    fn credentials<'a>(&'a self, host: &'a str) -> CredentialFuture<'a>;

    /// Credentials for `repository` (`library/busybox`) on `host`. The registry client
    /// asks this way; providers that answer per image (kubelet's credential provider
    /// plugins) override it, the others answer per host.
    fn credentials_for<'a>(&'a self, host: &'a str, repository: &'a str) -> CredentialFuture<'a> {
        let _ = repository;
        self.credentials(host)
    }
}

/// Anonymous access everywhere.
#[derive(Debug, Default, Clone)]
pub struct Anonymous;

impl CredentialProvider for Anonymous {
    fn credentials<'a>(&'a self, _host: &'a str) -> CredentialFuture<'a> {
        Box::pin(async { Ok(None) })
    }
}

/// Fixed credentials per host (for tests and for callers that got them elsewhere).
#[derive(Debug, Default, Clone)]
pub struct StaticCredentials(pub HashMap<String, Credentials>);

impl CredentialProvider for StaticCredentials {
    fn credentials<'a>(&'a self, host: &'a str) -> CredentialFuture<'a> {
        let found = hub_aliases(host)
            .iter()
            .find_map(|h| self.0.get(*h))
            .or_else(|| self.0.get(host))
            .cloned();
        Box::pin(async move { Ok(found) })
    }
}

pub(super) fn is_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

fn hub_aliases(host: &str) -> &'static [&'static str] {
    if is_hub(host) {
        &["docker.io", "index.docker.io", "registry-1.docker.io"]
    } else {
        &[]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_show_their_secret() {
        let c = Credentials::new("alice", "hunter2-secret");
        let shown = format!("{c:?}");
        assert!(shown.contains("alice"));
        assert!(!shown.contains("hunter2"));
        assert_eq!(
            c.basic_header(),
            format!("Basic {}", BASE64.encode("alice:hunter2-secret"))
        );
    }
}
