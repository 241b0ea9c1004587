//! Opening a layer for its mount: from its kept metadata (no network), or from its
//! registry with its TOC verified against what the image published, pre-opened while
//! its siblings mount; and keeping what was verified for the next restore.

use std::collections::HashSet;
use std::sync::Arc;

use super::FuseMounter;
use super::kept_blob::KeptBlob;
use crate::layer_source::LayerSource;
use crate::preopen::{self, LayerKey, Opened};
use crate::remote::MountError;

impl FuseMounter {
    /// The other layers of `layer`'s image (by its labels) that are not served yet;
    /// none when pre-opening is off (`[lazy] preopen_siblings = false`).
    pub(super) fn siblings_to_open(&self, layer: &LayerSource<'_>) -> Vec<String> {
        if self.preopener.is_none() {
            return Vec::new();
        }
        let repository = layer.repository();
        let served: HashSet<String> = self
            .mounts()
            .values()
            .filter(|s| s.repository == repository)
            .map(|s| s.layer_digest.clone())
            .collect();
        layer
            .image_layers
            .iter()
            .filter(|s| **s != layer.layer_digest && !served.contains(*s))
            .cloned()
            .collect()
    }

    /// Starts pre-opening the siblings of `layer` that are neither served, pre-opened
    /// nor being opened. Never waits: the pre-opens run on the runtime.
    fn preopen_siblings(&self, layer: &LayerSource<'_>) {
        let Some(preopener) = &self.preopener else {
            return;
        };
        let repository = layer.repository();
        let mut started = 0;
        for sibling in &self.siblings_to_open(layer) {
            let Ok(digest) = sibling.parse::<registry::Digest>() else {
                continue;
            };
            let key = LayerKey {
                repository: repository.clone(),
                digest: sibling.clone(),
            };
            let (client, repo) = (self.client.clone(), layer.reference.repository.clone());
            // No TOC digest is known yet: the sibling's own Prepare checks it (preopen::accept).
            let (sibling, gate) = (sibling.clone(), self.parse_gate.clone());
            let open = async move {
                let blob = registry::RemoteBlob::open(client, repo, digest)
                    .await
                    .map_err(|e| MountError::Registry(e.to_string()))?;
                Opened::open(
                    Arc::new(blob),
                    &estargz::OpenOptions::default(),
                    &gate,
                    &sibling,
                )
                .await
            };
            started += usize::from(preopener.start(key, open));
        }
        if started > 0 {
            tracing::debug!(layer = %layer.layer_digest, siblings = started, "pre-opening sibling layers");
        }
    }

    /// Opens the layer's blob and TOC, verified against what the image published: a
    /// pre-opened TOC when it verifies, else fetched now. Also returns whether it was
    /// pre-opened, what it was verified against, and a guard that marks the layer as
    /// being opened until the mount is done.
    pub(super) async fn open_layer(
        &self,
        layer: &LayerSource<'_>,
    ) -> Result<(Opened, bool, estargz::OpenOptions, Option<preopen::Opening>), MountError> {
        let claim = async {
            let Some(preopener) = &self.preopener else {
                return Ok((None, None));
            };
            let key = LayerKey {
                repository: layer.repository(),
                digest: layer.layer_digest.clone(),
            };
            let (claimed, opening) = preopener.claim(&key).await;
            Ok::<_, MountError>((claimed, Some(opening)))
        };
        let verification = async {
            let opts = self.verification(layer).await?;
            // Only an image that publishes TOC digests is worth pre-opening: a plain
            // image's siblings would all fail.
            self.preopen_siblings(layer);
            Ok::<_, MountError>(opts)
        };
        // A manifest fetch for the annotations (zstd:chunked) overlaps the pre-open's wait;
        // a layer that cannot be verified does not wait for its pre-open.
        let (opts, (claimed, opening)) = tokio::try_join!(verification, claim)?;
        let fresh = async {
            let blob = registry::RemoteBlob::open(
                self.client.clone(),
                layer.reference.repository.clone(),
                layer.digest.clone(),
            )
            .await
            .map_err(|e| MountError::Registry(e.to_string()))?;
            Opened::open(Arc::new(blob), &opts, &self.parse_gate, &layer.layer_digest).await
        };
        let (opened, preopened) =
            preopen::use_or_open(claimed, &opts, &layer.layer_digest, fresh).await?;
        Ok((opened, preopened, opts, opening))
    }

    /// Keeps the verified metadata of a layer just opened from its registry, so that
    /// the next restore needs no registry (off the async threads: it fsyncs). A layer
    /// mounted without verification (skip-verify) is not kept.
    pub(super) fn keep_metadata(
        &self,
        layer: &LayerSource<'_>,
        opened: Opened,
        opts: estargz::OpenOptions,
    ) {
        let Some(store) = self.store.clone() else {
            return;
        };
        if opts.expected_toc_digest.is_none() && opts.expected_manifest_checksum.is_none() {
            return;
        }
        let digest = layer.layer_digest.clone();
        self.handle.spawn_blocking(move || {
            match store.save(&digest, &opened.layer, &opened.toc, &opts) {
                Ok(path) => tracing::debug!(layer = %digest, path = %path.display(),
                    "kept the layer's verified metadata: it is restored without the registry"),
                Err(e) => tracing::warn!(layer = %digest, error = %e,
                    "cannot keep the layer's verified metadata: restoring it will need the registry"),
            }
        });
    }

    /// Keeps a SOCI layer's verified zTOC, so that a restart opens it without the
    /// registry.
    pub(super) fn keep_ztoc(&self, layer: &LayerSource<'_>, kept: crate::tocstore::KeptZtoc) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let digest = layer.layer_digest.clone();
        self.handle
            .spawn_blocking(move || match store.save_ztoc(&digest, &kept) {
                Ok(path) => tracing::debug!(layer = %digest, path = %path.display(),
                "kept the layer's verified zTOC: it is restored without the registry"),
                Err(e) => tracing::warn!(layer = %digest, error = %e,
                "cannot keep the layer's zTOC: restoring it will need the registry"),
            });
    }

    /// The layer opened from its kept metadata, with no network at all; None when
    /// nothing is kept, or what is kept does not verify (it is then deleted, and the
    /// caller opens the layer from its registry).
    pub(super) async fn open_kept(
        &self,
        layer: &LayerSource<'_>,
    ) -> Result<Option<Arc<estargz::Layer>>, MountError> {
        let Some(store) = self.store.clone() else {
            return Ok(None);
        };
        let (repository, digest) = (layer.reference.repository.clone(), layer.digest.clone());
        let label = match &layer.toc_digest {
            Some(toc) => Some(
                toc.parse::<estargz::Sha256Sum>()
                    .map_err(|e| MountError::Labels(format!("toc.digest label {toc:?}: {e}")))?,
            ),
            None => None,
        };
        let need = {
            let (store, digest) = (store.clone(), layer.layer_digest.clone());
            tokio::task::spawn_blocking(move || store.parse_memory_bound(&digest))
                .await
                .map_err(|e| MountError::Mount(format!("reading kept metadata: {e}")))?
        };
        let (client, layer_digest) = (self.client.clone(), layer.layer_digest.clone());
        let image_ref = layer.image_ref.clone();
        let cancel = estargz::Cancel::new();
        let stop = cancel.clone();
        let loaded = self
            .parse_gate
            .run(&layer.layer_digest, need, cancel, move || {
                store.load(&layer_digest, label, &stop, |size| {
                    let remote = registry::RemoteBlob::new(client, repository, digest, size);
                    Arc::new(KeptBlob::new(
                        layer_digest.clone(),
                        image_ref,
                        size,
                        Arc::new(remote),
                    )) as Arc<dyn estargz::BlobReader>
                })
            })
            .await?;
        match loaded {
            Ok(kept) => Ok(kept.map(Arc::new)),
            Err(why) => {
                tracing::warn!(layer = %layer.layer_digest,
                    "kept metadata refused and deleted; opening the layer from its registry: {why}");
                Ok(None)
            }
        }
    }

    /// What the TOC must hash to. eStargz layers carry `toc.digest` as a label;
    /// containers/storage zstd:chunked layers only have annotations, which containerd does
    /// not forward, so they are read from the manifest.
    async fn verification(
        &self,
        layer: &LayerSource<'_>,
    ) -> Result<estargz::OpenOptions, MountError> {
        let mut opts = estargz::OpenOptions::default();
        if let Some(toc) = &layer.toc_digest {
            opts.expected_toc_digest = Some(
                toc.parse()
                    .map_err(|e| MountError::Labels(format!("toc.digest label {toc:?}: {e}")))?,
            );
            return Ok(opts);
        }
        let annotations = self.layer_annotations(layer).await?;
        let get = |key: &str| {
            annotations
                .get(key)
                .map(|v| v.parse::<estargz::Sha256Sum>())
        };
        if let Some(toc) = get(estargz::TOC_DIGEST_ANNOTATION) {
            opts.expected_toc_digest =
                Some(toc.map_err(|e| MountError::Layer(format!("toc.digest annotation: {e}")))?);
        } else if let Some(sum) = get(estargz::MANIFEST_CHECKSUM_ANNOTATION)
            .or_else(|| get(estargz::LEGACY_MANIFEST_CHECKSUM_ANNOTATION))
        {
            opts.expected_manifest_checksum =
                Some(sum.map_err(|e| {
                    MountError::Layer(format!("manifest-checksum annotation: {e}"))
                })?);
        } else if !(layer.skip_verify && self.allow_no_verification) {
            return Err(MountError::Layer(
                "the image publishes no TOC digest for this layer, so it cannot be verified \
                        (not eStargz / zstd:chunked, or converted without annotations)"
                    .to_string(),
            ));
        }
        Ok(opts)
    }

    async fn layer_annotations(
        &self,
        layer: &LayerSource<'_>,
    ) -> Result<std::collections::BTreeMap<String, String>, MountError> {
        let (reference, digest) = (&layer.reference, &layer.digest);
        let manifest = match &layer.manifest_digest {
            Some(manifest_digest) => {
                let fetched = self
                    .client
                    .fetch_manifest(&reference.repository, manifest_digest)
                    .await
                    .map_err(|e| MountError::Registry(e.to_string()))?;
                serde_json::from_slice::<registry::ImageManifest>(&fetched.bytes)
                    .map_err(|e| MountError::Layer(format!("manifest {manifest_digest}: {e}")))?
            }
            None => {
                self.client
                    .resolve(reference)
                    .await
                    .map_err(|e| MountError::Registry(e.to_string()))?
                    .manifest
            }
        };
        let descriptor = manifest
            .layers
            .iter()
            .find(|d| d.digest == *digest)
            .ok_or_else(|| {
                MountError::Layer(format!("the image's manifest does not list layer {digest}"))
            })?;
        Ok(descriptor.annotations.clone().unwrap_or_default())
    }
}
