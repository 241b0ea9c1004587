//! Pushing for the converter: existence checks, monolithic and chunked uploads,
//! cross-repository mounts, manifest and index PUT. Pushes go to the registry itself,
//! never to a mirror.

use bytes::Bytes;
use estargz::BlobReader;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};

use crate::client::Client;
use crate::endpoints::{Endpoint, Purpose};
use crate::error::{Error, Result, Target};
use crate::reference::Repository;
use crate::request::Req;
use crate::retry::status_error;
use crate::{Digest, Hasher};

/// What [`Client::push_blob`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The registry already had the blob.
    Exists,
    /// Mounted from another repository of the same registry.
    Mounted,
    Uploaded,
}

fn push_scopes(repo: &Repository, from: Option<&Repository>) -> Vec<String> {
    let mut scopes = vec![format!("repository:{}:pull,push", repo.name)];
    if let Some(from) = from {
        scopes.push(format!("repository:{}:pull", from.name));
    }
    scopes
}

impl Client {
    /// `HEAD` of a blob in the destination registry: its size if present.
    pub async fn blob_exists(&self, repo: &Repository, digest: &Digest) -> Result<Option<u64>> {
        let scopes = push_scopes(repo, None);
        let endpoints = self.endpoints(&repo.registry, Purpose::Push)?;
        self.on_endpoints(&endpoints, |ep| {
            self.blob_exists_at(ep, repo, digest, &scopes)
        })
        .await
    }

    async fn blob_exists_at(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        digest: &Digest,
        scopes: &[String],
    ) -> Result<Option<u64>> {
        let target = Target::new(&ep.host, &repo.name, digest);
        let sent = self
            .send(ep, &target, Req::head(ep.blob_url(repo, digest), scopes))
            .await?;
        match sent.resp.status() {
            StatusCode::OK => Ok(Some(
                sent.resp
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| Error::bad(&target, "HEAD answer without Content-Length"))?,
            )),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(status_error(sent.resp, &target, "checking for blob").await),
        }
    }

    /// Uploads `data` unless the registry has it, mounting it from `mount_from` when that
    /// repository is on the same registry. `data` must hash to `digest`.
    pub async fn push_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        data: Bytes,
        mount_from: Option<&Repository>,
    ) -> Result<PushOutcome> {
        let target = Target::new(repo.api_host(), &repo.name, digest);
        let actual = digest.compute_like(&data);
        if &actual != digest {
            return Err(Error::DigestMismatch {
                target,
                expected: Box::new(digest.clone()),
                actual: Box::new(actual),
            });
        }
        if self.blob_exists(repo, digest).await?.is_some() {
            return Ok(PushOutcome::Exists);
        }
        if let Some(from) =
            mount_from.filter(|f| f.registry == repo.registry && f.name != repo.name)
            && self.mount_blob(repo, from, digest).await?
        {
            return Ok(PushOutcome::Mounted);
        }
        let scopes = push_scopes(repo, None);
        let endpoints = self.endpoints(&repo.registry, Purpose::Push)?;
        self.on_endpoints(&endpoints, |ep| {
            self.upload_monolithic(ep, repo, digest, &data, &scopes)
        })
        .await?;
        Ok(PushOutcome::Uploaded)
    }

    /// Asks the registry to mount `digest` from `from` into `repo`; false when it would
    /// not (the upload session it opened instead is cancelled).
    pub async fn mount_blob(
        &self,
        repo: &Repository,
        from: &Repository,
        digest: &Digest,
    ) -> Result<bool> {
        let scopes = push_scopes(repo, Some(from));
        let endpoints = self.endpoints(&repo.registry, Purpose::Push)?;
        self.on_endpoints(&endpoints, |ep| {
            self.mount_at(ep, repo, from, digest, &scopes)
        })
        .await
    }

    async fn mount_at(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        from: &Repository,
        digest: &Digest,
        scopes: &[String],
    ) -> Result<bool> {
        let target = Target::new(&ep.host, &repo.name, digest);
        let mut url = upload_start_url(ep, repo, &target)?;
        url.query_pairs_mut()
            .append_pair("mount", &digest.to_string())
            .append_pair("from", &from.name);
        let mount = Req::post(url.to_string(), scopes)
            .body(Bytes::new())
            .no_redirects();
        let sent = self.send(ep, &target, mount).await?;
        match sent.resp.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                // Not mounted: an upload session was opened; close it rather than leak it.
                if let Ok(loc) = upload_location(&sent.resp, &url, &target) {
                    drop(sent);
                    let cancel = Req::delete(loc.to_string(), scopes).no_redirects();
                    let _ = self.send(ep, &target, cancel).await;
                }
                Ok(false)
            }
            _ => Err(status_error(sent.resp, &target, "mounting blob").await),
        }
    }

    async fn start_upload(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        target: &Target,
        scopes: &[String],
    ) -> Result<Url> {
        let url = upload_start_url(ep, repo, target)?;
        let start = Req::post(url.to_string(), scopes)
            .body(Bytes::new())
            .no_redirects();
        let sent = self.send(ep, target, start).await?;
        if sent.resp.status() != StatusCode::ACCEPTED {
            return Err(status_error(sent.resp, target, "starting upload").await);
        }
        upload_location(&sent.resp, &url, target)
    }

    async fn upload_monolithic(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        digest: &Digest,
        data: &Bytes,
        scopes: &[String],
    ) -> Result<()> {
        let target = Target::new(&ep.host, &repo.name, digest);
        let location = self.start_upload(ep, repo, &target, scopes).await?;
        self.finish_upload(ep, &target, location, digest, data.clone(), scopes)
            .await
    }

    async fn finish_upload(
        &self,
        ep: &Endpoint,
        target: &Target,
        mut location: Url,
        digest: &Digest,
        body: Bytes,
        scopes: &[String],
    ) -> Result<()> {
        location
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let finish = Req::put(location.to_string(), scopes)
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            )
            .body(body)
            .no_redirects();
        let sent = self.send(ep, target, finish).await?;
        if sent.resp.status() != StatusCode::CREATED {
            return Err(status_error(sent.resp, target, "completing upload").await);
        }
        check_digest_header(sent.resp.headers(), digest, target)
    }

    /// Uploads a blob read from `source` in chunks of `chunk_size` bytes (POST, PATCH per
    /// chunk, PUT), checking the digest as it goes. A failed chunk restarts the upload.
    pub async fn push_blob_chunked(
        &self,
        repo: &Repository,
        digest: &Digest,
        source: &dyn BlobReader,
        chunk_size: u64,
    ) -> Result<PushOutcome> {
        if chunk_size == 0 {
            return Err(Error::Config("chunk_size must be positive".into()));
        }
        if self.blob_exists(repo, digest).await?.is_some() {
            return Ok(PushOutcome::Exists);
        }
        let scopes = push_scopes(repo, None);
        let endpoints = self.endpoints(&repo.registry, Purpose::Push)?;
        self.on_endpoints(&endpoints, |ep| {
            self.upload_chunked(ep, repo, digest, source, chunk_size, &scopes)
        })
        .await?;
        Ok(PushOutcome::Uploaded)
    }

    async fn upload_chunked(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        digest: &Digest,
        source: &dyn BlobReader,
        chunk_size: u64,
        scopes: &[String],
    ) -> Result<()> {
        let target = Target::new(&ep.host, &repo.name, digest);
        let local =
            |e: estargz::BlobError| Error::bad(&target, format!("reading the local blob: {e}"));
        let size = source.size().await.map_err(local)?;
        let mut location = self.start_upload(ep, repo, &target, scopes).await?;
        let mut hasher = Hasher::new(digest.algorithm());
        let mut offset = 0u64;
        while offset < size {
            let len = chunk_size.min(size - offset);
            let chunk = source.read_at(offset, len).await.map_err(local)?;
            if chunk.len() as u64 != len {
                return Err(Error::bad(
                    &target,
                    "the local blob is shorter than it says",
                ));
            }
            hasher.update(&chunk);
            // The distribution spec's PATCH Content-Range has no "bytes " prefix.
            let range = HeaderValue::from_str(&format!("{offset}-{}", offset + len - 1))
                .map_err(|_| Error::bad(&target, "range header"))?;
            let patch = Req::patch(location.to_string(), scopes)
                .header(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                )
                .header(header::CONTENT_RANGE, range)
                .body(chunk)
                .no_redirects();
            let sent = self.send(ep, &target, patch).await?;
            if sent.resp.status() != StatusCode::ACCEPTED {
                return Err(status_error(sent.resp, &target, "uploading chunk").await);
            }
            // The registry's Range says how much it holds: it must be all we sent.
            if let Some(r) = sent
                .resp
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
            {
                let end = r
                    .trim()
                    .trim_start_matches("bytes=")
                    .split_once('-')
                    .and_then(|(_, e)| e.parse::<u64>().ok());
                if end != Some(offset + len - 1) {
                    return Err(Error::bad(
                        &target,
                        format!(
                            "after a chunk ending at {}, the registry holds {r:?}",
                            offset + len - 1
                        ),
                    ));
                }
            }
            location = upload_location(&sent.resp, &location, &target)?;
            offset += len;
        }
        let actual = hasher.finish();
        if &actual != digest {
            return Err(Error::DigestMismatch {
                target,
                expected: Box::new(digest.clone()),
                actual: Box::new(actual),
            });
        }
        self.finish_upload(ep, &target, location, digest, Bytes::new(), scopes)
            .await
    }

    /// PUTs a manifest or index under `tag_or_digest`; returns its digest.
    pub async fn push_manifest(
        &self,
        repo: &Repository,
        tag_or_digest: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest> {
        let digest = match tag_or_digest.parse::<Digest>() {
            Ok(d) => {
                let actual = d.compute_like(&bytes);
                if actual != d {
                    let target = Target::new(repo.api_host(), &repo.name, &d);
                    return Err(Error::DigestMismatch {
                        target,
                        expected: Box::new(d),
                        actual: Box::new(actual),
                    });
                }
                d
            }
            Err(_) => Digest::sha256_of(&bytes),
        };
        let content_type = HeaderValue::from_str(media_type)
            .map_err(|_| Error::Config(format!("invalid media type {media_type:?}")))?;
        let scopes = push_scopes(repo, None);
        let endpoints = self.endpoints(&repo.registry, Purpose::Push)?;
        self.on_endpoints(&endpoints, |ep| {
            self.put_manifest_at(
                ep,
                repo,
                tag_or_digest,
                &content_type,
                &bytes,
                &digest,
                &scopes,
            )
        })
        .await?;
        Ok(digest)
    }

    #[allow(clippy::too_many_arguments)]
    async fn put_manifest_at(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        object: &str,
        content_type: &HeaderValue,
        bytes: &Bytes,
        digest: &Digest,
        scopes: &[String],
    ) -> Result<()> {
        let target = Target::new(&ep.host, &repo.name, object);
        let put = Req::put(ep.manifest_url(repo, object), scopes)
            .header(header::CONTENT_TYPE, content_type.clone())
            .body(bytes.clone())
            .no_redirects();
        let sent = self.send(ep, &target, put).await?;
        if sent.resp.status() != StatusCode::CREATED {
            return Err(status_error(sent.resp, &target, "pushing manifest").await);
        }
        check_digest_header(sent.resp.headers(), digest, &target)
    }
}

fn upload_start_url(ep: &Endpoint, repo: &Repository, target: &Target) -> Result<Url> {
    format!("{}/{}/blobs/uploads/", ep.base, repo.name)
        .parse()
        .map_err(|_| Error::bad(target, "upload URL does not parse"))
}

/// The next upload URL from `Location` (absolute or relative to the request).
fn upload_location(resp: &reqwest::Response, base: &Url, target: &Target) -> Result<Url> {
    let loc = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Error::bad(target, "upload answer without Location"))?;
    base.join(loc)
        .map_err(|_| Error::bad(target, "upload Location is not a URL"))
}

fn check_digest_header(headers: &HeaderMap, digest: &Digest, target: &Target) -> Result<()> {
    if let Some(said) = headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok())
        && said.algorithm() == digest.algorithm()
        && &said != digest
    {
        return Err(Error::DigestMismatch {
            target: target.clone(),
            expected: Box::new(digest.clone()),
            actual: Box::new(said),
        });
    }
    Ok(())
}
