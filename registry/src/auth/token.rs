//! Bearer tokens from a registry's token service, and how long one may be used.

use std::time::Duration;

use reqwest::header::{self, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::Deserialize;

use crate::body::read_limited;
use crate::config::is_loopback;
use crate::endpoints::Endpoint;
use crate::error::{Error, Result, Target};
use crate::retry::status_error;

/// The useful life of a token that the server says lasts `expires_in` seconds: a margin
/// is kept so that a token is not sent in its last seconds.
pub(crate) fn token_lifetime(expires_in: Option<u64>) -> Duration {
    // The distribution spec: a token without expires_in lasts 60 seconds.
    // Capped at a day: a huge expires_in must not overflow Instant arithmetic.
    let secs = expires_in.unwrap_or(60).min(86_400);
    let margin = (secs / 10).min(30);
    Duration::from_secs(secs.saturating_sub(margin))
}

#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl super::Auth {
    pub(super) async fn fetch_token(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lifetime_keeps_a_margin() {
        assert_eq!(token_lifetime(None), Duration::from_secs(54));
        assert_eq!(token_lifetime(Some(300)), Duration::from_secs(270));
        assert_eq!(token_lifetime(Some(3600)), Duration::from_secs(3570));
        assert_eq!(token_lifetime(Some(0)), Duration::ZERO);
        assert_eq!(token_lifetime(Some(u64::MAX)), Duration::from_secs(86_370));
    }
}
