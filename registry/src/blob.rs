//! Blob reads: size, range GETs, whole-blob fetches, and the
//! [`estargz::BlobReader`] for a remote blob.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use estargz::{BlobError, BlobFuture, BlobReader};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::client::{Client, Endpoint, Req, lock, read_exact, status_error};
use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result, Target};
use crate::manifest::pull_scope;
use crate::reference::Repository;

/// When a server ignores `Range` and sends the whole blob, we still use its answer if
/// what we need ends within this many bytes; otherwise the body is dropped at once.
pub const RANGELESS_PREFIX_LIMIT: u64 = 1 << 20;

impl Client {
    /// The size of a blob: `HEAD`, or when that fails, `GET Range: bytes=0-0` and the total
    /// from `Content-Range`.
    pub async fn blob_size(&self, repo: &Repository, digest: &Digest) -> Result<u64> {
        let scopes = pull_scope(repo);
        let endpoints = self.endpoints(&repo.registry, true)?;
        self.on_endpoints(&endpoints, |ep| {
            self.blob_size_at(ep, repo, digest, &scopes)
        })
        .await
    }

    async fn blob_size_at(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        digest: &Digest,
        scopes: &[String],
    ) -> Result<u64> {
        let target = Target::new(&ep.host, &repo.name, digest);
        let url = blob_url(ep, repo, digest);
        let head = self
            .send(
                ep,
                &target,
                Req {
                    method: Method::HEAD,
                    url: url.clone(),
                    headers: HeaderMap::new(),
                    body: None,
                    scopes: Some(scopes),
                    follow_redirects: true,
                },
            )
            .await;
        let head_err = match head {
            Ok(sent) if sent.resp.status() == StatusCode::OK => {
                // The header itself: for HEAD the body is empty, so body-based lengths lie.
                match content_length(sent.resp.headers()) {
                    Some(len) => return Ok(len),
                    None => Error::bad(&target, "HEAD answer without Content-Length"),
                }
            }
            Ok(sent) if sent.resp.status() == StatusCode::NOT_FOUND => {
                return Err(Error::NotFound { target });
            }
            Ok(sent) => status_error(sent.resp, &target, "HEAD of blob").await,
            Err(e) => e,
        };
        if matches!(head_err, Error::Unauthorized { .. }) {
            return Err(head_err);
        }
        tracing::debug!(error = %head_err, "HEAD failed; asking for the first byte instead");
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, HeaderValue::from_static("bytes=0-0"));
        let sent = self
            .send(
                ep,
                &target,
                Req {
                    method: Method::GET,
                    url,
                    headers,
                    body: None,
                    scopes: Some(scopes),
                    follow_redirects: true,
                },
            )
            .await?;
        match sent.resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let range = sent
                    .resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range)
                    .ok_or_else(|| Error::bad(&target, "206 without a valid Content-Range"))?;
                range
                    .total
                    .ok_or_else(|| Error::bad(&target, "Content-Range does not give the blob size"))
            }
            // A whole-body answer gives the size in its length; the body itself is dropped.
            StatusCode::OK => content_length(sent.resp.headers())
                .ok_or_else(|| Error::bad(&target, "200 without Content-Length")),
            _ => Err(status_error(sent.resp, &target, "GET of the first byte").await),
        }
    }

    /// Downloads a whole blob into memory and checks its digest.
    pub async fn fetch_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        max_size: u64,
    ) -> Result<Bytes> {
        let mut sink = LimitedVec {
            buf: BytesMut::new(),
            limit: max_size,
        };
        self.fetch_blob_to(repo, digest, &mut sink).await?;
        Ok(sink.buf.freeze())
    }

    /// Streams a whole blob into `out`, checking its digest; an interrupted download
    /// resumes with a range request where it stopped. Returns the blob size.
    pub async fn fetch_blob_to<W: AsyncWrite + Unpin + Send>(
        &self,
        repo: &Repository,
        digest: &Digest,
        out: &mut W,
    ) -> Result<u64> {
        let scopes = pull_scope(repo);
        let endpoints = self.endpoints(&repo.registry, true)?;
        let state = Download {
            hasher: Hasher::new(digest.algorithm()),
            written: 0,
        };
        // Each attempt resumes where the last stopped: they share the download's state
        // (one attempt at a time, so the lock is never contended).
        let shared = tokio::sync::Mutex::new((state, out));
        let shared = &shared;
        self.on_endpoints(&endpoints, |ep| {
            let scopes = &scopes;
            async move {
                let mut guard = shared.lock().await;
                let (state, out) = &mut *guard;
                self.download_at(ep, repo, digest, scopes, state, *out)
                    .await
            }
        })
        .await
    }

    async fn download_at<W: AsyncWrite + Unpin + Send>(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        digest: &Digest,
        scopes: &[String],
        state: &mut Download,
        out: &mut W,
    ) -> Result<u64> {
        let target = Target::new(&ep.host, &repo.name, digest);
        let mut headers = HeaderMap::new();
        if state.written > 0 {
            let v = HeaderValue::from_str(&format!("bytes={}-", state.written))
                .map_err(|_| Error::bad(&target, "range header"))?;
            headers.insert(header::RANGE, v);
        }
        let sent = self
            .send(
                ep,
                &target,
                Req {
                    method: Method::GET,
                    url: blob_url(ep, repo, digest),
                    headers,
                    body: None,
                    scopes: Some(scopes),
                    follow_redirects: true,
                },
            )
            .await?;
        let mut resp = sent.resp;
        let mut skip = match resp.status() {
            StatusCode::OK => state.written,
            StatusCode::PARTIAL_CONTENT => {
                let range = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range)
                    .ok_or_else(|| Error::bad(&target, "206 without a valid Content-Range"))?;
                if range.start != state.written {
                    return Err(Error::bad(
                        &target,
                        format!(
                            "asked to resume at {} but got {}",
                            state.written, range.start
                        ),
                    ));
                }
                0
            }
            _ => return Err(status_error(resp, &target, "downloading blob").await),
        };
        let expected_total = content_length(resp.headers())
            .map(|l| l.saturating_add(state.written).saturating_sub(skip));
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| Error::transport(&target, "reading the blob", e))?
        {
            let mut chunk = &chunk[..];
            if skip > 0 {
                let n = usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
                chunk = &chunk[n..];
                skip -= n as u64;
            }
            if chunk.is_empty() {
                continue;
            }
            out.write_all(chunk)
                .await
                .map_err(|e| Error::bad(&target, format!("writing the blob locally: {e}")))?;
            state.hasher.update(chunk);
            state.written += chunk.len() as u64;
        }
        if let Some(total) = expected_total
            && state.written < total
        {
            return Err(Error::Truncated {
                target,
                expected: total,
                got: state.written,
            });
        }
        out.flush()
            .await
            .map_err(|e| Error::bad(&target, format!("writing the blob locally: {e}")))?;
        let hasher = std::mem::replace(&mut state.hasher, Hasher::new(digest.algorithm()));
        let actual = hasher.finish();
        if &actual != digest {
            return Err(Error::DigestMismatch {
                target,
                expected: digest.clone(),
                actual,
            });
        }
        Ok(state.written)
    }
}

struct Download {
    hasher: Hasher,
    written: u64,
}

/// An in-memory sink that refuses to grow past its limit.
struct LimitedVec {
    buf: BytesMut,
    limit: u64,
}

impl AsyncWrite for LimitedVec {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.buf.len() as u64 + data.len() as u64 > self.limit {
            return std::task::Poll::Ready(Err(std::io::Error::other(format!(
                "blob larger than the {} bytes allowed",
                self.limit
            ))));
        }
        self.buf.extend_from_slice(data);
        std::task::Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

fn blob_url(ep: &Endpoint, repo: &Repository, digest: &Digest) -> String {
    format!("{}/{}/blobs/{digest}", ep.base, repo.name)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// A parsed `Content-Range: bytes start-end/total` (`total` is `None` for `*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    pub start: u64,
    /// Inclusive.
    pub end: u64,
    pub total: Option<u64>,
}

pub fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.trim().split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    // end == u64::MAX would overflow every length computed from it.
    if end < start || end == u64::MAX || total.is_some_and(|t| end >= t) {
        return None;
    }
    Some(ContentRange { start, end, total })
}

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
        let sink = Body::Stream(StreamSink {
            on_data,
            delivered: AtomicU64::new(0),
        });
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
                    loc.url.as_str(),
                    None,
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
        let endpoints = self.client.endpoints(&self.repo.registry, true)?;
        self.client
            .on_endpoints(&endpoints, |ep| {
                self.range_via_registry(ep, offset, len, body)
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
        let url = blob_url(ep, &self.repo, &self.digest);
        let (data, redirected) = self
            .range_once(ep, &target, &url, Some(&self.scopes), (offset, len), body)
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

    /// One GET of one range; checks Content-Range and length.
    async fn range_once(
        &self,
        ep: &Endpoint,
        target: &Target,
        url: &str,
        scopes: Option<&[String]>,
        (offset, len): (u64, u64),
        body: &Body<'_>,
    ) -> Result<(Bytes, Option<Url>)> {
        let last = offset + len - 1;
        let mut headers = HeaderMap::new();
        let range = HeaderValue::from_str(&format!("bytes={offset}-{last}"))
            .map_err(|_| Error::bad(target, "range header"))?;
        headers.insert(header::RANGE, range);
        let sent = self
            .client
            .send(
                ep,
                target,
                Req {
                    method: Method::GET,
                    url: url.to_string(),
                    headers,
                    body: None,
                    scopes,
                    follow_redirects: true,
                },
            )
            .await?;
        let redirected = sent.redirected.clone();
        let resp = sent.resp;
        match resp.status() {
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

/// What a range read does with the body: collect it, or hand it over as it arrives.
enum Body<'a> {
    Collect,
    Stream(StreamSink<'a>),
}

struct StreamSink<'a> {
    on_data: &'a (dyn Fn(Bytes) + Send + Sync),
    /// Bytes of the range handed over so far, across retries.
    delivered: AtomicU64,
}

impl StreamSink<'_> {
    /// Hands over what of `data` (which starts `at` bytes into the range) is new.
    fn deliver(&self, at: u64, data: Bytes) {
        let done = self.delivered.load(Ordering::Relaxed);
        let end = at + data.len() as u64;
        if end > done {
            let skip = done.saturating_sub(at) as usize;
            (self.on_data)(data.slice(skip..));
            self.delivered.store(end, Ordering::Relaxed);
        }
    }
}

/// Streams exactly `expected` bytes of a body into `sink`.
async fn stream_exact(
    mut resp: reqwest::Response,
    target: &Target,
    expected: u64,
    sink: &StreamSink<'_>,
) -> Result<()> {
    let mut at = 0u64;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::transport(target, "reading the response body", e))?
    {
        if at + chunk.len() as u64 > expected {
            return Err(Error::bad(
                target,
                format!("server sent more than the {expected} bytes asked for"),
            ));
        }
        let n = chunk.len() as u64;
        sink.deliver(at, chunk);
        at += n;
    }
    if at < expected {
        return Err(Error::Truncated {
            target: target.clone(),
            expected,
            got: at,
        });
    }
    Ok(())
}

/// Reads the first `need` bytes of a body and drops the rest unread.
async fn read_prefix(mut resp: reqwest::Response, target: &Target, need: u64) -> Result<Bytes> {
    let mut buf = BytesMut::with_capacity(need as usize);
    while (buf.len() as u64) < need {
        match resp
            .chunk()
            .await
            .map_err(|e| Error::transport(target, "reading the response body", e))?
        {
            Some(chunk) => buf.extend_from_slice(&chunk),
            None => {
                return Err(Error::Truncated {
                    target: target.clone(),
                    expected: need,
                    got: buf.len() as u64,
                });
            }
        }
    }
    buf.truncate(need as usize);
    Ok(buf.freeze())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_forms() {
        assert_eq!(
            parse_content_range("bytes 0-99/1234"),
            Some(ContentRange {
                start: 0,
                end: 99,
                total: Some(1234)
            })
        );
        assert_eq!(
            parse_content_range("bytes 5-5/*"),
            Some(ContentRange {
                start: 5,
                end: 5,
                total: None
            })
        );
        for bad in [
            "bytes 10-5/100",
            "bytes 0-18446744073709551615/*",
            "bytes 0-100/100",
            "items 0-1/2",
            "bytes */100",
            "bytes 0-1",
            "",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }
}
