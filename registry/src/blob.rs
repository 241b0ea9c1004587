//! Blob reads: size, single and multi-range GETs, whole-blob fetches, and the
//! [`estargz::BlobReader`] for a remote blob.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use estargz::{BlobError, BlobFuture, BlobReader};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::client::{Client, Endpoint, Req, lock, on_endpoints, read_exact, status_error};
use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result, Target};
use crate::manifest::pull_scope;
use crate::reference::Repository;

/// When a server ignores `Range` and sends the whole blob, we still use its answer if
/// what we need ends within this many bytes; otherwise the body is dropped at once.
pub const RANGELESS_PREFIX_LIMIT: u64 = 1 << 20;

/// Bytes of headers and delimiters allowed per part of a multipart answer.
const MULTIPART_PART_OVERHEAD: u64 = 512;

impl Client {
    /// The size of a blob: `HEAD`, or when that fails, `GET Range: bytes=0-0` and the total
    /// from `Content-Range`.
    pub async fn blob_size(&self, repo: &Repository, digest: &Digest) -> Result<u64> {
        let scopes = pull_scope(repo);
        let endpoints = self.endpoints(&repo.registry, true)?;
        on_endpoints!(self, endpoints, |ep| self
            .blob_size_at(ep, repo, digest, &scopes))
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
        let mut state = Download {
            hasher: Hasher::new(digest.algorithm()),
            written: 0,
        };
        on_endpoints!(self, endpoints, |ep| self
            .download_at(ep, repo, digest, &scopes, &mut state, out))
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

/// The boundary of a `multipart/byteranges` Content-Type, if it is one.
pub fn multipart_boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    let kind = parts.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
            .filter(|b| !b.is_empty())
    })
}

/// One part of a multipart answer: where it starts in the blob and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub start: u64,
    pub data: Bytes,
}

/// Parses a `multipart/byteranges` body. Each part's length comes from its Content-Range,
/// never from searching the boundary (blob bytes may contain it), and must be followed by
/// the next delimiter.
pub fn parse_multipart(
    body: &Bytes,
    boundary: &str,
    blob_size: u64,
) -> std::result::Result<Vec<Part>, String> {
    let delimiter = format!("--{boundary}");
    let d = delimiter.as_bytes();
    let mut pos = find(body, d, 0).ok_or("no multipart delimiter")?;
    let mut parts = Vec::new();
    loop {
        pos += d.len();
        if body[pos..].starts_with(b"--") {
            return Ok(parts);
        }
        // Transport padding, then CRLF.
        let eol = find(body, b"\n", pos).ok_or("unterminated delimiter line")?;
        if !body[pos..eol]
            .iter()
            .all(|b| matches!(b, b' ' | b'\t' | b'\r'))
        {
            return Err("junk after a delimiter".into());
        }
        pos = eol + 1;
        let mut range = None;
        loop {
            let eol = find(body, b"\n", pos).ok_or("unterminated part headers")?;
            let line = &body[pos..eol];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            pos = eol + 1;
            if line.is_empty() {
                break;
            }
            let line = std::str::from_utf8(line).map_err(|_| "part header is not text")?;
            if let Some((name, value)) = line.split_once(':')
                && name.trim().eq_ignore_ascii_case("content-range")
            {
                range = Some(
                    parse_content_range(value)
                        .ok_or_else(|| format!("bad part Content-Range {value:?}"))?,
                );
            }
        }
        let range = range.ok_or("part without Content-Range")?;
        if range.total.is_some_and(|t| t != blob_size) {
            return Err(format!(
                "part says the blob has {:?} bytes, not {blob_size}",
                range.total
            ));
        }
        let len = usize::try_from(range.end - range.start + 1).map_err(|_| "part too large")?;
        let end = pos
            .checked_add(len)
            .filter(|&e| e <= body.len())
            .ok_or("part shorter than its Content-Range")?;
        parts.push(Part {
            start: range.start,
            data: body.slice(pos..end),
        });
        pos = end;
        // Exactly CRLF then the next delimiter: any slack would hide a length mismatch.
        if !body[pos..].starts_with(b"\r\n") || !body[pos + 2..].starts_with(d) {
            return Err("part length differs from its Content-Range".into());
        }
        pos += 2;
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() || needle.is_empty() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
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

enum MultiAnswer {
    Parts(Vec<Part>),
    /// The server does not do multi-range; ask for ranges one by one.
    Unsupported,
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
        on_endpoints!(self.client, endpoints, |ep| self
            .range_via_registry(ep, offset, len, body))
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

    /// Reads several ranges, with one multi-range request when the server supports it.
    /// Returns one `Bytes` per requested `(offset, len)`, in the order given.
    pub async fn read_ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Bytes>> {
        let mut clamped = Vec::with_capacity(ranges.len());
        for &(offset, len) in ranges {
            clamped.push(self.clamp(offset, len)?);
        }
        let mut wanted: Vec<(u64, u64)> = clamped.iter().flatten().copied().collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut parts: Vec<Part> = Vec::new();
        if wanted.len() > 1 && !self.client.http().single_range_only {
            let endpoints = self.client.endpoints(&self.repo.registry, true)?;
            let answer = on_endpoints!(self.client, endpoints, |ep| self.multi_once(ep, &wanted))?;
            if let MultiAnswer::Parts(p) = answer {
                parts = p;
            }
        }
        let mut out = Vec::with_capacity(ranges.len());
        for range in clamped {
            let Some((offset, len)) = range else {
                out.push(Bytes::new());
                continue;
            };
            let found = parts.iter().find_map(|p| {
                let p_end = p.start + p.data.len() as u64;
                (p.start <= offset && offset + len <= p_end).then(|| {
                    p.data
                        .slice((offset - p.start) as usize..(offset - p.start + len) as usize)
                })
            });
            match found {
                Some(data) => out.push(data),
                None => {
                    let data = self.read(offset, len).await?;
                    parts.push(Part {
                        start: offset,
                        data: data.clone(),
                    });
                    out.push(data);
                }
            }
        }
        Ok(out)
    }

    async fn multi_once(&self, ep: &Endpoint, wanted: &[(u64, u64)]) -> Result<MultiAnswer> {
        let host_key = ep.host.clone();
        if lock(&self.client.inner.no_multi_range).contains(&host_key) {
            return Ok(MultiAnswer::Unsupported);
        }
        let target = self.target(&ep.host);
        let spec: Vec<String> = wanted
            .iter()
            .map(|(o, l)| format!("{o}-{}", o + l - 1))
            .collect();
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_str(&format!("bytes={}", spec.join(",")))
            .map_err(|_| Error::bad(&target, "range header"))?;
        headers.insert(header::RANGE, value);
        let (url, scopes, ep_used) = match self.cached_location() {
            Some(loc) => (loc.url.to_string(), None, loc.endpoint),
            None => (
                blob_url(ep, &self.repo, &self.digest),
                Some(&self.scopes[..]),
                ep.clone(),
            ),
        };
        let sent = match self
            .client
            .send(
                &ep_used,
                &target,
                Req {
                    method: Method::GET,
                    url,
                    headers,
                    body: None,
                    scopes,
                    follow_redirects: true,
                },
            )
            .await
        {
            Ok(sent) => sent,
            Err(e) if scopes.is_none() => {
                *lock(&self.location) = None;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if let Some(url) = sent.redirected.clone() {
            self.remember_location(ep, url);
        }
        let resp = sent.resp;
        let mark_unsupported = || {
            lock(&self.client.inner.no_multi_range).insert(host_key.clone());
        };
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let content_type = resp
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let total: u64 = wanted.iter().map(|(_, l)| l).sum();
                let cap = total + MULTIPART_PART_OVERHEAD * (wanted.len() as u64 + 1);
                if let Some(boundary) = multipart_boundary(&content_type) {
                    let body = read_capped(resp, &target, cap).await?;
                    return match parse_multipart(&body, &boundary, self.size) {
                        Ok(parts) => Ok(MultiAnswer::Parts(parts)),
                        Err(e) => {
                            // A server that frames multipart answers badly gets single ranges.
                            tracing::warn!(target = %target, error = %e, "bad multipart/byteranges answer");
                            mark_unsupported();
                            Ok(MultiAnswer::Unsupported)
                        }
                    };
                }
                // One range back: the server merged ours or answered only the first.
                let got = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range)
                    .ok_or_else(|| Error::bad(&target, "206 without a valid Content-Range"))?;
                if got.total.is_some_and(|t| t != self.size) {
                    return Err(Error::bad(
                        &target,
                        "Content-Range disagrees with the blob size",
                    ));
                }
                let len = got.end - got.start + 1;
                if len > cap {
                    mark_unsupported();
                    return Ok(MultiAnswer::Unsupported);
                }
                let data = read_exact(resp, &target, len).await?;
                let covers_all = wanted
                    .iter()
                    .all(|(o, l)| got.start <= *o && o + l <= got.end + 1);
                if !covers_all {
                    mark_unsupported();
                }
                Ok(MultiAnswer::Parts(vec![Part {
                    start: got.start,
                    data,
                }]))
            }
            // Whole body (Range ignored) or refused (GCS answers 400): single ranges from now on.
            StatusCode::OK
            | StatusCode::BAD_REQUEST
            | StatusCode::RANGE_NOT_SATISFIABLE
            | StatusCode::NOT_IMPLEMENTED => {
                tracing::debug!(host = %host_key, status = resp.status().as_u16(), "no multi-range support");
                drop(resp);
                mark_unsupported();
                Ok(MultiAnswer::Unsupported)
            }
            _ => Err(status_error(resp, &target, "multi-range read").await),
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

async fn read_capped(mut resp: reqwest::Response, target: &Target, cap: u64) -> Result<Bytes> {
    if content_length(resp.headers()).is_some_and(|l| l > cap) {
        return Err(Error::bad(
            target,
            format!("multipart answer larger than the {cap} bytes expected"),
        ));
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::transport(target, "reading the response body", e))?
    {
        if (buf.len() + chunk.len()) as u64 > cap {
            return Err(Error::bad(
                target,
                format!("multipart answer larger than the {cap} bytes expected"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
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

    #[test]
    fn boundary_from_content_type() {
        assert_eq!(
            multipart_boundary("multipart/byteranges; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            multipart_boundary("Multipart/Byteranges;boundary=\"q r\"").as_deref(),
            Some("q r")
        );
        assert_eq!(multipart_boundary("application/octet-stream"), None);
        assert_eq!(multipart_boundary("multipart/byteranges"), None);
    }

    fn multipart(boundary: &str, parts: &[(u64, &[u8])], size: u64) -> Bytes {
        let mut body = Vec::new();
        body.extend_from_slice(b"preamble\r\n");
        for (start, data) in parts {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {}-{}/{size}\r\n\r\n",
                    start,
                    start + data.len() as u64 - 1
                )
                .as_bytes(),
            );
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        Bytes::from(body)
    }

    #[test]
    fn parses_multipart_even_when_data_contains_the_boundary() {
        let tricky: &[u8] = b"xx\r\n--BOUND\r\nContent-Range: bytes 0-0/9\r\n\r\n";
        let body = multipart("BOUND", &[(0, b"abc"), (100, tricky)], 1000);
        let parts = parse_multipart(&body, "BOUND", 1000).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            parts[0],
            Part {
                start: 0,
                data: Bytes::from_static(b"abc")
            }
        );
        assert_eq!(parts[1].start, 100);
        assert_eq!(&parts[1].data[..], tricky);
    }

    #[test]
    fn rejects_inconsistent_multipart() {
        let good = multipart("B", &[(0, b"abcd")], 10);
        assert!(parse_multipart(&good, "B", 10).is_ok());
        // Wrong blob size.
        assert!(parse_multipart(&good, "B", 11).is_err());
        // Part longer than its Content-Range says.
        let long = Bytes::from(
            String::from_utf8(good.to_vec())
                .unwrap()
                .replace("bytes 0-3/10", "bytes 0-2/10"),
        );
        assert!(
            parse_multipart(&long, "B", 10)
                .unwrap_err()
                .contains("differs")
        );
        // Truncated body.
        let cut = good.slice(..good.len() - 12);
        assert!(parse_multipart(&cut, "B", 10).is_err());
        // No Content-Range.
        let bare = Bytes::from_static(b"--B\r\n\r\nabcd\r\n--B--");
        assert!(
            parse_multipart(&bare, "B", 10)
                .unwrap_err()
                .contains("Content-Range")
        );
        assert!(parse_multipart(&Bytes::from_static(b"nothing"), "B", 10).is_err());
    }
}
