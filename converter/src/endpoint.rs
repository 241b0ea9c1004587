//! Where a conversion reads an image from and writes one to: an OCI image layout or a
//! registry repository, behind one interface for blobs, manifests and the final tag.

use std::fs::File;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::oci::{self, Descriptor, Digest, MAX_METADATA_SIZE};
use crate::remote::Remote;

/// Where an image comes from or goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `oci:DIR[:TAG]`: an OCI image layout directory.
    Layout { dir: PathBuf, tag: Option<String> },
    /// A registry reference (`host/repo:tag`, `host/repo@sha256:...`).
    Registry(String),
}

impl FromStr for Location {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let Some(rest) = s.strip_prefix("oci:") else {
            if s.is_empty() {
                return Err(Error::BadReference {
                    input: s.into(),
                    reason: "empty".into(),
                });
            }
            return Ok(Location::Registry(s.to_string()));
        };
        // The tag follows the last ':' unless that ':' is part of the directory path.
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((dir, tag)) if !dir.is_empty() && !tag.is_empty() && !tag.contains('/') => {
                (dir, Some(tag.to_string()))
            }
            _ => (rest, None),
        };
        if dir.is_empty() {
            return Err(Error::BadReference {
                input: s.into(),
                reason: "oci: needs a directory (oci:DIR[:TAG])".into(),
            });
        }
        Ok(Location::Layout {
            dir: PathBuf::from(dir),
            tag,
        })
    }
}

pub(crate) enum Src {
    Layout(Layout, Option<String>),
    Remote(Remote),
}

pub(crate) enum Dst {
    Layout(Layout, Option<String>),
    Remote(Remote, String),
}

/// A blob available as a local file; a downloaded one is deleted on drop.
pub(crate) struct LocalBlob {
    file: File,
    _temp: Option<tempfile::NamedTempFile>,
}

impl LocalBlob {
    pub(crate) fn try_clone(&self) -> Result<File> {
        self.file
            .try_clone()
            .map_err(|e| Error::io("duplicating a file handle", e))
    }
}

pub(crate) fn reopen(tmp: &tempfile::NamedTempFile) -> Result<File> {
    tmp.reopen()
        .map_err(|e| Error::io("reopening a temp file", e))
}

impl Src {
    pub(crate) async fn open(loc: &Location, plain_http: bool) -> Result<Self> {
        match loc {
            Location::Layout { dir, tag } => Ok(Src::Layout(Layout::open(dir)?, tag.clone())),
            Location::Registry(r) => {
                let reference = crate::remote::parse_reference(r)?;
                let client = crate::remote::client_for(&reference, plain_http)?;
                Ok(Src::Remote(Remote { client, reference }))
            }
        }
    }

    pub(crate) fn name(&self) -> String {
        match self {
            Src::Layout(l, tag) => match tag {
                Some(t) => format!("oci:{}:{t}", l.root().display()),
                None => format!("oci:{}", l.root().display()),
            },
            Src::Remote(r) => r.reference.to_string(),
        }
    }

    /// The descriptor and bytes of what the source reference names.
    pub(crate) async fn root(&self) -> Result<(Descriptor, Vec<u8>)> {
        match self {
            Src::Layout(l, tag) => {
                let desc = l.resolve(tag.as_deref())?;
                let bytes = l.read_blob(&desc, "manifest", MAX_METADATA_SIZE)?;
                Ok((desc, bytes))
            }
            Src::Remote(r) => {
                let (bytes, media_type, digest) = r.fetch_object(&r.reference.object()).await?;
                let desc = Descriptor::new(&media_type, digest, bytes.len() as u64);
                Ok((desc, bytes.to_vec()))
            }
        }
    }

    /// A manifest named by a descriptor of an index.
    pub(crate) async fn object(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        match self {
            Src::Layout(l, _) => l.read_blob(desc, "manifest", MAX_METADATA_SIZE),
            Src::Remote(r) => {
                let (bytes, _, digest) = r.fetch_object(&desc.digest.to_string()).await?;
                if digest != desc.digest {
                    return Err(Error::DigestMismatch {
                        what: "manifest",
                        digest: desc.digest.clone(),
                        actual: digest,
                    });
                }
                Ok(bytes.to_vec())
            }
        }
    }

    pub(crate) async fn small(
        &self,
        desc: &Descriptor,
        what: &'static str,
        limit: u64,
    ) -> Result<Vec<u8>> {
        match self {
            Src::Layout(l, _) => l.read_blob(desc, what, limit),
            Src::Remote(r) => {
                if desc.size > limit {
                    return Err(Error::TooLarge {
                        what,
                        digest: desc.digest.clone(),
                        size: desc.size,
                        limit,
                    });
                }
                Ok(r.fetch_small(desc, limit).await?.to_vec())
            }
        }
    }

    /// The blob as a local file: the layout's own file, or a downloaded temp file.
    pub(crate) async fn local(&self, desc: &Descriptor, what: &'static str) -> Result<LocalBlob> {
        match self {
            Src::Layout(l, _) => Ok(LocalBlob {
                file: l.open_blob(desc, what)?,
                _temp: None,
            }),
            Src::Remote(r) => {
                let tmp = tempfile::NamedTempFile::new()
                    .map_err(|e| Error::io("creating a temp file", e))?;
                let file = r.fetch_to(desc, reopen(&tmp)?).await?;
                Ok(LocalBlob {
                    file,
                    _temp: Some(tmp),
                })
            }
        }
    }
}

impl Dst {
    pub(crate) async fn open(loc: &Location, plain_http: bool) -> Result<Self> {
        match loc {
            Location::Layout { dir, tag } => Ok(Dst::Layout(Layout::create(dir)?, tag.clone())),
            Location::Registry(r) => {
                let reference = crate::remote::parse_reference(r)?;
                if reference.digest.is_some() {
                    return Err(Error::BadReference {
                        input: r.clone(),
                        reason: "a destination needs a tag, not a digest".into(),
                    });
                }
                let tag = reference.tag.clone().unwrap_or_else(|| "latest".into());
                let client = crate::remote::client_for(&reference, plain_http)?;
                Ok(Dst::Remote(Remote { client, reference }, tag))
            }
        }
    }

    pub(crate) async fn has(&self, digest: &Digest) -> Result<bool> {
        match self {
            Dst::Layout(l, _) => Ok(l.has_blob(digest)),
            Dst::Remote(r, _) => r.has_blob(digest).await,
        }
    }

    /// Makes the source's blob `desc` available in the destination, unchanged.
    pub(crate) async fn copy_from(
        &self,
        src: &Src,
        desc: &Descriptor,
        what: &'static str,
    ) -> Result<()> {
        if self.has(&desc.digest).await? {
            return Ok(());
        }
        match (self, src) {
            (Dst::Layout(dst, _), Src::Layout(l, _)) => {
                let file = l.open_blob(desc, what)?;
                dst.copy_blob_from(&file, desc, what)
            }
            (Dst::Layout(dst, _), Src::Remote(r)) => {
                let tmp = dst.temp_blob()?;
                r.fetch_to(desc, reopen(&tmp)?).await?;
                dst.commit_blob(tmp, &desc.digest)
            }
            (Dst::Remote(dst, _), Src::Layout(l, _)) => {
                dst.push_file(&desc.digest, l.open_blob(desc, what)?).await
            }
            (Dst::Remote(dst, _), Src::Remote(r)) => {
                if dst.mount_from(r, &desc.digest).await? {
                    return Ok(());
                }
                let local = src.local(desc, what).await?;
                dst.push_file(&desc.digest, local.try_clone()?).await
            }
        }
    }

    /// A temp file to write a converted layer into.
    pub(crate) fn temp(&self) -> Result<tempfile::NamedTempFile> {
        match self {
            Dst::Layout(l, _) => l.temp_blob(),
            Dst::Remote(..) => {
                tempfile::NamedTempFile::new().map_err(|e| Error::io("creating a temp file", e))
            }
        }
    }

    pub(crate) async fn put_temp(
        &self,
        tmp: tempfile::NamedTempFile,
        digest: &Digest,
    ) -> Result<()> {
        match self {
            Dst::Layout(l, _) => l.commit_blob(tmp, digest),
            Dst::Remote(r, _) => r.push_file(digest, reopen(&tmp)?).await,
        }
    }

    /// Stores a config blob.
    pub(crate) async fn put_blob(&self, data: Vec<u8>) -> Result<Digest> {
        match self {
            Dst::Layout(l, _) => l.write_blob(&data),
            Dst::Remote(r, _) => {
                let digest = Digest::sha256_of(&data);
                r.push_bytes(&digest, data.into()).await?;
                Ok(digest)
            }
        }
    }

    /// Stores a manifest that an index will list (by digest).
    pub(crate) async fn put_child(&self, bytes: &[u8], media_type: &str) -> Result<()> {
        match self {
            Dst::Layout(l, _) => l.write_blob(bytes).map(|_| ()),
            Dst::Remote(r, _) => {
                let digest = Digest::sha256_of(bytes);
                r.push_manifest(&digest.to_string(), media_type, bytes.to_vec().into())
                    .await
            }
        }
    }

    /// The last step: the reference now names `root`.
    pub(crate) async fn finish(&self, root: &Descriptor, bytes: &[u8]) -> Result<()> {
        match self {
            Dst::Layout(l, tag) => {
                l.write_blob(bytes)?;
                let mut desc = root.clone();
                // index.json lists the image itself; a platform belongs to index entries.
                desc.platform = None;
                l.set_ref(desc, tag.as_deref())
            }
            Dst::Remote(r, tag) => {
                r.push_manifest(tag, &root.media_type, bytes.to_vec().into())
                    .await
            }
        }
    }

    /// Lists `referrer` among the manifests that refer to `subject`: a registry with the
    /// referrers API did so when the referrer was pushed; for one without, the index
    /// under the tag schema's tag gains it.
    pub(crate) async fn add_referrer(&self, subject: &Digest, referrer: Descriptor) -> Result<()> {
        let Dst::Remote(r, _) = self else {
            return Err(Error::BadOption(
                "referrers are kept by registries, not OCI layouts".into(),
            ));
        };
        let repo = &r.reference.repository;
        if r.client.has_referrers_api(repo, subject).await? {
            return Ok(());
        }
        let tag = registry::Client::referrers_tag_of(subject);
        let mut index = match r.fetch_object(&tag).await {
            Ok((bytes, media_type, digest)) => {
                match oci::parse_object(&bytes, &media_type, &digest)? {
                    oci::Object::Index(index) => index,
                    oci::Object::Manifest(_) => {
                        return Err(Error::BadOption(format!("the tag {tag} is not an index")));
                    }
                }
            }
            Err(Error::Registry(registry::Error::NotFound { .. })) => oci::Index {
                schema_version: 2,
                media_type: Some(oci::OCI_INDEX.into()),
                manifests: Vec::new(),
                annotations: None,
                other: oci::Extra::new(),
            },
            Err(e) => return Err(e),
        };
        if index.manifests.iter().all(|d| d.digest != referrer.digest) {
            index.manifests.push(referrer);
        }
        let bytes = oci::to_json(&index)?;
        r.push_manifest(&tag, oci::OCI_INDEX, bytes.into()).await
    }
}
