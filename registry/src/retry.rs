//! Retries: the policy and backoff of one operation on one endpoint, the walk over
//! endpoints (mirrors, then the registry), and the error an unexpected status makes
//! (with the server's Retry-After and its own message).

use std::time::{Duration, Instant, SystemTime};

use reqwest::header;

use crate::body::read_limited;
use crate::client::Client;
use crate::endpoints::Endpoint;
use crate::error::{Error, Result, Target};

impl Client {
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
