//! Whole blobs: their size, and fetches checked against their digest (an interrupted
//! download resumes where it stopped).

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderValue};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::body::{content_length, parse_content_range};
use crate::client::Client;
use crate::endpoints::{Endpoint, Purpose};
use crate::error::{Error, Result, Target};
use crate::manifest::pull_scope;
use crate::reference::Repository;
use crate::request::Req;
use crate::retry::status_error;
use crate::{Digest, Hasher};

impl Client {
    /// The size of a blob: `HEAD`, or when that fails, `GET Range: bytes=0-0` and the total
    /// from `Content-Range`.
    pub async fn blob_size(&self, repo: &Repository, digest: &Digest) -> Result<u64> {
        let scopes = pull_scope(repo);
        let endpoints = self.endpoints(&repo.registry, Purpose::Pull)?;
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
        let url = ep.blob_url(repo, digest);
        let head = self.send(ep, &target, Req::head(&url, scopes)).await;
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
        let first_byte =
            Req::get(url, scopes).header(header::RANGE, HeaderValue::from_static("bytes=0-0"));
        let sent = self.send(ep, &target, first_byte).await?;
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
        let endpoints = self.endpoints(&repo.registry, Purpose::Pull)?;
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
        let mut req = Req::get(ep.blob_url(repo, digest), scopes);
        if state.written > 0 {
            let v = HeaderValue::from_str(&format!("bytes={}-", state.written))
                .map_err(|_| Error::bad(&target, "range header"))?;
            req = req.header(header::RANGE, v);
        }
        let sent = self.send(ep, &target, req).await?;
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
                expected: Box::new(digest.clone()),
                actual: Box::new(actual),
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
