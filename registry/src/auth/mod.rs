//! Authentication: `WWW-Authenticate` challenges, bearer tokens, basic auth and credentials
//! from the docker config file and credential helpers. Secrets never reach logs, `Debug`
//! output or error messages.

mod cache;
mod challenge;
mod credentials;
mod docker_config;
mod token;

use std::sync::Arc;

use crate::endpoints::Endpoint;
use crate::error::{Result, Target};

pub(crate) use cache::{AuthCache, Scheme};
pub use challenge::{Challenge, parse_challenges};
pub use credentials::{
    Anonymous, CredentialFuture, CredentialProvider, Credentials, StaticCredentials,
};
pub use docker_config::DockerConfig;

/// A client's authentication: where credentials come from, and per host the scheme
/// and the tokens learnt.
pub(crate) struct Auth {
    pub(crate) credentials: Arc<dyn CredentialProvider>,
    pub(crate) cache: AuthCache,
}

impl Auth {
    pub(crate) fn new(credentials: Arc<dyn CredentialProvider>) -> Auth {
        Auth {
            credentials,
            cache: AuthCache::default(),
        }
    }

    /// The Authorization value for a request, fetching a token when the host wants one.
    /// Before the host's scheme is known (first request) nothing is sent. `rejected` is
    /// what the host just refused, so that it is not offered again.
    pub(crate) async fn header(
        &self,
        ep: &Endpoint,
        target: &Target,
        scopes: &[String],
        rejected: Option<&str>,
    ) -> Result<Option<String>> {
        let Some(scheme) = self.cache.scheme(&ep.host) else {
            return Ok(None);
        };
        match scheme {
            Scheme::Basic => Ok(self
                .credentials
                .credentials_for(&ep.host, &target.repository)
                .await?
                .filter(|c| !c.is_identity_token())
                .map(|c| c.basic_header())),
            Scheme::Bearer { realm, service } => {
                let key = scopes.join(" ");
                // One fetch at a time: concurrent misses (a burst of first reads) wait
                // and then share the token the first one got.
                let _fetching = self.cache.fetch_lock.lock().await;
                if let Some(token) = self.cache.token(&ep.host, &key) {
                    let value = format!("Bearer {token}");
                    if rejected != Some(value.as_str()) {
                        return Ok(Some(value));
                    }
                }
                let (token, lifetime) = self
                    .fetch_token(ep, target, &realm, service.as_deref(), scopes)
                    .await?;
                self.cache
                    .put_token(&ep.host, &key, token.clone(), lifetime);
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }
}
