//! Which manifests refer to a manifest (OCI 1.1's `subject`): the referrers API, and the
//! tag schema registries without it are given (a `<algorithm>-<hex>` tag on an index).

use reqwest::StatusCode;
use reqwest::header::{self, HeaderValue};

use crate::Digest;
use crate::body::read_limited;
use crate::client::Client;
use crate::endpoints::Purpose;
use crate::error::{Error, Result, Target};
use crate::manifest::{Descriptor, ImageIndex, MAX_MANIFEST_SIZE, Manifest, pull_scope};
use crate::media_types::OCI_INDEX;
use crate::reference::Repository;
use crate::request::Req;
use crate::retry::status_error;

impl Client {
    /// The manifests whose subject is `subject`, only those of `artifact_type` when one
    /// is given (the registry may filter; this filters again). Asks the referrers API,
    /// and the tag schema when the registry has no such API; none at all is an empty list.
    pub async fn referrers(
        &self,
        repo: &Repository,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>> {
        let found = match self.referrers_api(repo, subject, artifact_type).await {
            Ok(index) => index,
            Err(Error::NotFound { .. }) => match self.referrers_tag(repo, subject).await {
                Ok(index) => index,
                Err(Error::NotFound { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        };
        Ok(found
            .manifests
            .into_iter()
            .filter(|d| artifact_type.is_none_or(|t| d.artifact_type() == Some(t)))
            .collect())
    }

    /// Whether the registry answers the referrers API (else its clients keep
    /// referrers under the tag schema).
    pub async fn has_referrers_api(&self, repo: &Repository, subject: &Digest) -> Result<bool> {
        match self.referrers_api(repo, subject, None).await {
            Ok(_) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The tag under which the tag schema keeps `subject`'s referrers.
    pub fn referrers_tag_of(subject: &Digest) -> String {
        format!("{}-{}", subject.algorithm().name(), subject.hex())
    }

    async fn referrers_api(
        &self,
        repo: &Repository,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ImageIndex> {
        let scopes = pull_scope(repo);
        // Only hosts that may be asked: stargz-snapshotter's mirrors hold blobs and
        // manifests, not the registry's view of what refers to what.
        let endpoints = self.endpoints(&repo.registry, Purpose::Referrers)?;
        self.on_endpoints(&endpoints, |ep| {
            let scopes = &scopes;
            async move {
                let target = Target::new(&ep.host, &repo.name, format!("referrers of {subject}"));
                let mut url = format!("{}/{}/referrers/{subject}", ep.base, repo.name);
                if let Some(t) = artifact_type {
                    url.push_str("?artifactType=");
                    url.push_str(&t.replace('+', "%2B"));
                }
                let req = Req::get(url, scopes)
                    .header(header::ACCEPT, HeaderValue::from_static(OCI_INDEX));
                let sent = self.send(ep, &target, req).await?;
                let resp = sent.resp;
                if resp.status() != StatusCode::OK {
                    return Err(status_error(resp, &target, "listing referrers").await);
                }
                let bytes = read_limited(resp, &target, MAX_MANIFEST_SIZE).await?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| Error::bad(&target, format!("referrers index: {e}")))
            }
        })
        .await
    }

    /// The index tagged `<algorithm>-<hex>` of `subject`, as clients without the API
    /// keep referrers.
    async fn referrers_tag(&self, repo: &Repository, subject: &Digest) -> Result<ImageIndex> {
        let tag = Client::referrers_tag_of(subject);
        let fetched = self.fetch_manifest(repo, &tag).await?;
        let target = Target::new(repo.api_host(), &repo.name, &tag);
        match fetched.parse(&target)? {
            Manifest::Index(index) => Ok(index),
            Manifest::Image(_) => Err(Error::bad(&target, "the referrers tag is not an index")),
        }
    }
}
