//! A request to a registry, described so it can be sent again (after a 401, a redirect or
//! a retry), and built so that each call states only what differs from a plain one.

use bytes::Bytes;
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

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

impl<'a> Req<'a> {
    /// `method` on `url` with the registry's credentials for `scopes`: no headers of its
    /// own, no body, redirects followed.
    fn new(method: Method, url: impl Into<String>, scopes: &'a [String]) -> Self {
        Req {
            method,
            url: url.into(),
            headers: HeaderMap::new(),
            body: None,
            scopes: Some(scopes),
            follow_redirects: true,
        }
    }

    pub(crate) fn get(url: impl Into<String>, scopes: &'a [String]) -> Self {
        Self::new(Method::GET, url, scopes)
    }

    pub(crate) fn head(url: impl Into<String>, scopes: &'a [String]) -> Self {
        Self::new(Method::HEAD, url, scopes)
    }

    pub(crate) fn post(url: impl Into<String>, scopes: &'a [String]) -> Self {
        Self::new(Method::POST, url, scopes)
    }

    pub(crate) fn put(url: impl Into<String>, scopes: &'a [String]) -> Self {
        Self::new(Method::PUT, url, scopes)
    }

    pub(crate) fn patch(url: impl Into<String>, scopes: &'a [String]) -> Self {
        Self::new(Method::PATCH, url, scopes)
    }

    pub(crate) fn delete(url: impl Into<String>, scopes: &'a [String]) -> Self {
        Self::new(Method::DELETE, url, scopes)
    }

    /// A GET of a storage URL the registry redirected to: it is signed, and is sent no
    /// credentials at all.
    pub(crate) fn storage_get(url: impl Into<String>) -> Self {
        Req {
            scopes: None,
            ..Self::new(Method::GET, url, &[])
        }
    }

    /// Sets `name` (replacing a value set before).
    pub(crate) fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    pub(crate) fn body(mut self, body: Bytes) -> Self {
        self.body = Some(body);
        self
    }

    /// Hands a 3xx answer back as it is instead of following it.
    pub(crate) fn no_redirects(mut self) -> Self {
        self.follow_redirects = false;
        self
    }
}
