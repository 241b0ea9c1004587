//! A layer to mount with where it comes from parsed once: the image reference and the
//! layer's digest its labels give.

use crate::remote::{MountError, RemoteLayer};

/// A [`RemoteLayer`] whose image reference and layer digest have been parsed. It
/// dereferences to the layer's labels.
pub(crate) struct LayerSource<'a> {
    labels: &'a RemoteLayer,
    pub(crate) reference: registry::Reference,
    pub(crate) digest: registry::Digest,
}

impl<'a> LayerSource<'a> {
    /// Fails with a labels error when either does not parse: such a layer cannot be
    /// fetched from anywhere.
    pub(crate) fn of(labels: &'a RemoteLayer) -> Result<LayerSource<'a>, MountError> {
        let reference = labels.image_ref.parse().map_err(|e| {
            MountError::Labels(format!("image reference {:?}: {e}", labels.image_ref))
        })?;
        let digest = labels.layer_digest.parse().map_err(|e| {
            MountError::Labels(format!("layer digest {:?}: {e}", labels.layer_digest))
        })?;
        Ok(LayerSource {
            labels,
            reference,
            digest,
        })
    }

    /// `registry/name` of the image.
    pub(crate) fn repository(&self) -> String {
        self.reference.repository.to_string()
    }

    /// The registry host its API is reached at, which names its link.
    pub(crate) fn api_host(&self) -> &str {
        self.reference.repository.api_host()
    }
}

impl std::ops::Deref for LayerSource<'_> {
    type Target = RemoteLayer;

    fn deref(&self) -> &RemoteLayer {
        self.labels
    }
}
