//! Registry sources and destinations, through the `registry` crate.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use bytes::Bytes;
use estargz::{BlobError, BlobErrorKind, BlobFuture, BlobReader};

use crate::error::{Error, Result};
use crate::oci::{Descriptor, Digest};

/// Upload chunk size: big enough to keep request overhead low, small enough that the
/// memory held per upload stays modest.
const PUSH_CHUNK: u64 = 16 << 20;

/// One repository on a registry, with the client that talks to it.
#[derive(Clone)]
pub struct Remote {
    pub client: registry::Client,
    pub reference: registry::Reference,
}

/// A client for `reference`'s registry; `plain_http` forces HTTP (loopback registries
/// use it by default). Credentials come from the docker config when there is one.
pub fn client_for(reference: &registry::Reference, plain_http: bool) -> Result<registry::Client> {
    let mut config = registry::RegistryConfig::default();
    if plain_http {
        config
            .resolver
            .host
            .entry(reference.repository.registry.clone())
            .or_default()
            .plain_http = Some(true);
    }
    let client = registry::Client::new(config)?;
    Ok(match registry::DockerConfig::load_default() {
        Ok(creds) => client.with_credentials(Arc::new(creds)),
        Err(e) => {
            tracing::debug!(error = %e, "no docker credentials; anonymous access");
            client
        }
    })
}

pub fn parse_reference(input: &str) -> Result<registry::Reference> {
    input
        .parse()
        .map_err(|e: registry::ReferenceError| Error::BadReference {
            input: input.to_string(),
            reason: e.reason,
        })
}

impl Remote {
    fn repo(&self) -> &registry::Repository {
        &self.reference.repository
    }

    /// The manifest or index `object` (tag or digest): bytes, media type, digest.
    pub async fn fetch_object(&self, object: &str) -> Result<(Bytes, String, Digest)> {
        let m = self.client.fetch_manifest(self.repo(), object).await?;
        Ok((m.bytes, m.media_type, m.digest))
    }

    /// A small blob (config), whole, digest-checked by the registry crate.
    pub async fn fetch_small(&self, desc: &Descriptor, limit: u64) -> Result<Bytes> {
        Ok(self
            .client
            .fetch_blob(self.repo(), &desc.digest, limit)
            .await?)
    }

    /// Downloads a blob into a temp file (digest-checked while streaming).
    pub async fn fetch_to(&self, desc: &Descriptor, out: File) -> Result<File> {
        let mut f = tokio::fs::File::from_std(out);
        let size = self
            .client
            .fetch_blob_to(self.repo(), &desc.digest, &mut f)
            .await?;
        tokio::io::AsyncWriteExt::flush(&mut f)
            .await
            .map_err(|e| Error::io(format!("writing blob {}", desc.digest), e))?;
        if size != desc.size {
            return Err(Error::SizeMismatch {
                what: "blob",
                digest: desc.digest.clone(),
                expected: desc.size,
                actual: size,
            });
        }
        Ok(f.into_std().await)
    }

    pub async fn has_blob(&self, digest: &Digest) -> Result<bool> {
        Ok(self
            .client
            .blob_exists(self.repo(), digest)
            .await?
            .is_some())
    }

    /// Mounts `digest` from `from` (same registry); false when the registry would not.
    pub async fn mount_from(&self, from: &Remote, digest: &Digest) -> Result<bool> {
        if from.repo().registry != self.repo().registry {
            return Ok(false);
        }
        if from.repo().name == self.repo().name {
            return self.has_blob(digest).await;
        }
        Ok(self
            .client
            .mount_blob(self.repo(), from.repo(), digest)
            .await?)
    }

    /// Uploads a blob from a local file, in chunks (memory stays bounded).
    pub async fn push_file(&self, digest: &Digest, file: File) -> Result<()> {
        let size = file
            .metadata()
            .map_err(|e| Error::io("stat of a local blob", e))?
            .len();
        let blob = FileBlob { file, size };
        self.client
            .push_blob_chunked(self.repo(), digest, &blob, PUSH_CHUNK)
            .await?;
        Ok(())
    }

    pub async fn push_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.client
            .push_blob(self.repo(), digest, data, None)
            .await?;
        Ok(())
    }

    /// PUTs a manifest or index under `tag_or_digest`.
    pub async fn push_manifest(
        &self,
        tag_or_digest: &str,
        media_type: &str,
        data: Bytes,
    ) -> Result<()> {
        self.client
            .push_manifest(self.repo(), tag_or_digest, media_type, data)
            .await?;
        Ok(())
    }
}

/// A local file as a [`BlobReader`], for chunked uploads.
struct FileBlob {
    file: File,
    size: u64,
}

impl BlobReader for FileBlob {
    fn size(&self) -> BlobFuture<'_, u64> {
        let size = self.size;
        Box::pin(async move { Ok(size) })
    }

    fn read_at(&self, offset: u64, len: u64) -> BlobFuture<'_, Bytes> {
        // A local read of one upload chunk: short enough to do in place.
        let result = (|| {
            if offset > self.size {
                return Err(BlobError::new(
                    BlobErrorKind::OutOfRange,
                    format!("read at {offset} past the end of a {}-byte file", self.size),
                ));
            }
            let len = len.min(self.size - offset);
            let mut buf = vec![0u8; len as usize];
            self.file
                .read_exact_at(&mut buf, offset)
                .map_err(|e| BlobError::new(BlobErrorKind::Fatal, e.to_string()))?;
            Ok(Bytes::from(buf))
        })();
        Box::pin(async move { result })
    }
}
