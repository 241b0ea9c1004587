//! A blob read with range requests: storage redirects remembered, servers that ignore
//! `Range` cut off, bodies streamed as they arrive. The lazy path's [`BlobReader`].

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use estargz::{BlobError, BlobFuture, BlobReader};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};

use crate::Digest;
use crate::body::{
    Body, StreamSink, content_length, parse_content_range, read_exact, read_prefix, stream_exact,
};
use crate::client::Client;
use crate::endpoints::{Endpoint, Purpose};
use crate::error::{Error, Result, Target};
use crate::manifest::pull_scope;
use crate::reference::Repository;
use crate::request::Req;
use crate::retry::status_error;
use estargz::lock;

use super::RANGELESS_PREFIX_LIMIT;

/// A blob in a registry, read with range requests. Implements [`BlobReader`].
pub struct RemoteBlob {
    client: Client,
    repo: Repository,
    digest: Digest,
    size: u64,
    scopes: Vec<String>,
    /// Where the registry last redirected reads of this blob, until it expires or fails.
    location: Mutex<Option<Location>>,
}

#[derive(Clone)]
struct Location {
    url: Url,
    endpoint: Endpoint,
    expires: Instant,
}

impl std::fmt::Debug for RemoteBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBlob")
            .field("repository", &self.repo)
            .field("digest", &self.digest)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl RemoteBlob {
    /// A blob whose size is known (from a manifest descriptor).
    pub fn new(client: Client, repo: Repository, digest: Digest, size: u64) -> Self {
        let scopes = pull_scope(&repo);
        Self {
            client,
            repo,
            digest,
            size,
            scopes,
            location: Mutex::new(None),
        }
    }

    /// A blob whose size is asked of the registry.
    pub async fn open(client: Client, repo: Repository, digest: Digest) -> Result<Self> {
        let size = client.blob_size(&repo, &digest).await?;
        Ok(Self::new(client, repo, digest, size))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    fn target(&self, host: &str) -> Target {
        Target::new(host, &self.repo.name, &self.digest)
    }

    /// Clamps a request to the blob: `None` for an empty read, an error past the end.
    fn clamp(&self, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
        if offset > self.size {
            return Err(Error::OutOfRange {
                target: self.target(self.repo.api_host()),
                offset,
                len,
                size: self.size,
            });
        }
        let end = offset.saturating_add(len).min(self.size);
        Ok((end > offset).then_some((offset, end - offset)))
    }

    /// Reads `len` bytes at `offset` (fewer only past the end of the blob).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.read_into(offset, len, &Body::Collect).await
    }

    /// Like [`RemoteBlob::read`], but hands the bytes to `on_data` as they arrive (see
    /// `BlobReader::read_at_streaming`).
    pub async fn read_streaming(
        &self,
        offset: u64,
        len: u64,
        on_data: &(dyn Fn(Bytes) + Send + Sync),
    ) -> Result<()> {
        let sink = Body::Stream(StreamSink::new(on_data));
        self.read_into(offset, len, &sink).await.map(|_| ())
    }

    async fn read_into(&self, offset: u64, len: u64, body: &Body<'_>) -> Result<Bytes> {
        let Some((offset, len)) = self.clamp(offset, len)? else {
            return Ok(Bytes::new());
        };
        if let Some(loc) = self.cached_location() {
            let target = self.target(loc.url.host_str().unwrap_or("storage"));
            match self
                .range_once(
                    &loc.endpoint,
                    &target,
                    Req::storage_get(loc.url.as_str()),
                    (offset, len),
                    body,
                )
                .await
            {
                Ok((data, _)) => return Ok(data),
                Err(e) => {
                    // Expired signature or storage trouble: ask the registry again.
                    tracing::debug!(error = %e, "cached blob URL failed; dropping it");
                    *lock(&self.location) = None;
                }
            }
        }
        let endpoints = self.client.endpoints(&self.repo.registry, Purpose::Pull)?;
        // Mirrors that answered a range read wrongly a moment ago are passed over.
        let fit: Vec<Endpoint>;
        let endpoints: &[Endpoint] = if endpoints
            .iter()
            .all(|ep| !ep.is_mirror || self.client.range_fit(ep, &self.digest))
        {
            &endpoints
        } else {
            fit = endpoints
                .iter()
                .filter(|ep| !ep.is_mirror || self.client.range_fit(ep, &self.digest))
                .cloned()
                .collect();
            &fit
        };
        self.client
            .on_endpoints(endpoints, |ep| async move {
                let result = self.range_via_registry(ep, offset, len, body).await;
                if ep.is_mirror
                    && let Err(e) = &result
                {
                    // A mirror without the blob may well have others.
                    let only = matches!(e, Error::NotFound { .. }).then_some(&self.digest);
                    self.client.mark_range_unfit(ep, only, &e.to_string());
                }
                result
            })
            .await
    }

    async fn range_via_registry(
        &self,
        ep: &Endpoint,
        offset: u64,
        len: u64,
        body: &Body<'_>,
    ) -> Result<Bytes> {
        let target = self.target(&ep.host);
        let req = Req::get(ep.blob_url(&self.repo, &self.digest), &self.scopes);
        let (data, redirected) = self
            .range_once(ep, &target, req, (offset, len), body)
            .await?;
        if let Some(url) = redirected {
            self.remember_location(ep, url);
        }
        Ok(data)
    }

    fn cached_location(&self) -> Option<Location> {
        let mut loc = lock(&self.location);
        match &*loc {
            Some(l) if l.expires > Instant::now() => Some(l.clone()),
            Some(_) => {
                *loc = None;
                None
            }
            None => None,
        }
    }

    fn remember_location(&self, ep: &Endpoint, url: Url) {
        let ttl = Duration::from_secs(self.client.http().redirect_ttl_sec);
        if ttl.is_zero() {
            return;
        }
        *lock(&self.location) = Some(Location {
            url,
            endpoint: ep.clone(),
            expires: Instant::now() + ttl,
        });
    }

    /// One GET (`req`) of one range; checks Content-Range and length.
    async fn range_once(
        &self,
        ep: &Endpoint,
        target: &Target,
        req: Req<'_>,
        (offset, len): (u64, u64),
        body: &Body<'_>,
    ) -> Result<(Bytes, Option<Url>)> {
        let last = offset + len - 1;
        let range = HeaderValue::from_str(&format!("bytes={offset}-{last}"))
            .map_err(|_| Error::bad(target, "range header"))?;
        let sent = self
            .client
            .send(ep, target, req.header(header::RANGE, range))
            .await?;
        let redirected = sent.redirected.clone();
        let resp = sent.resp;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT if is_multipart(resp.headers()) => Err(Error::bad(
                target,
                format!("asked for bytes {offset}-{last}, got several ranges (multipart)"),
            )),
            StatusCode::PARTIAL_CONTENT => {
                let got = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range)
                    .ok_or_else(|| Error::bad(target, "206 without a valid Content-Range"))?;
                if got.start != offset || got.end != last {
                    return Err(Error::bad(
                        target,
                        format!(
                            "asked for bytes {offset}-{last}, got Content-Range {}-{}",
                            got.start, got.end
                        ),
                    ));
                }
                if got.total.is_some_and(|t| t != self.size) {
                    return Err(Error::bad(
                        target,
                        format!(
                            "Content-Range says the blob has {:?} bytes, expected {}",
                            got.total, self.size
                        ),
                    ));
                }
                match body {
                    Body::Collect => Ok((read_exact(resp, target, len).await?, redirected)),
                    Body::Stream(sink) => {
                        stream_exact(resp, target, len, sink).await?;
                        Ok((Bytes::new(), redirected))
                    }
                }
            }
            StatusCode::OK => {
                if let Some(l) = content_length(resp.headers())
                    && l != self.size
                {
                    return Err(Error::bad(
                        target,
                        format!("whole-blob answer of {l} bytes, expected {}", self.size),
                    ));
                }
                if ep.is_mirror {
                    // Its answer is still good for what a small read needs; the next
                    // reads go elsewhere rather than pull the whole blob again.
                    self.client.mark_range_unfit(
                        ep,
                        None,
                        "answered a range read with the whole blob",
                    );
                }
                let need = offset + len;
                if need > RANGELESS_PREFIX_LIMIT {
                    // Dropping the response aborts the body: no gigabytes for a few bytes.
                    return Err(Error::RangeNotSupported {
                        target: target.clone(),
                    });
                }
                let prefix = read_prefix(resp, target, need).await?;
                let data = prefix.slice(offset as usize..need as usize);
                match body {
                    Body::Collect => Ok((data, redirected)),
                    Body::Stream(sink) => {
                        sink.deliver(0, data);
                        Ok((Bytes::new(), redirected))
                    }
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE => Err(Error::bad(
                target,
                format!(
                    "range {offset}-{last} not satisfiable: the blob is not {} bytes",
                    self.size
                ),
            )),
            _ => Err(status_error(resp, target, "range read").await),
        }
    }
}

impl BlobReader for RemoteBlob {
    fn size(&self) -> BlobFuture<'_, u64> {
        let size = self.size;
        Box::pin(async move { Ok(size) })
    }

    fn read_at(&self, offset: u64, len: u64) -> BlobFuture<'_, Bytes> {
        Box::pin(async move { self.read(offset, len).await.map_err(BlobError::from) })
    }

    fn read_at_streaming<'a>(
        &'a self,
        offset: u64,
        len: u64,
        on_data: &'a (dyn Fn(Bytes) + Send + Sync),
    ) -> BlobFuture<'a, ()> {
        Box::pin(async move {
            self.read_streaming(offset, len, on_data)
                .await
                .map_err(BlobError::from)
        })
    }
}

fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/")
        })
}
