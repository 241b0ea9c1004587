//! What the mounter reports: each mounted layer's status and counters, and the files
//! each has had opened (for `lazysnap optimize`).

use std::path::PathBuf;

use super::FuseMounter;

/// One mounted layer, for status and metrics.
#[derive(Debug, Clone)]
pub struct MountedLayerStatus {
    pub mountpoint: PathBuf,
    pub layer_digest: String,
    pub image_ref: String,
    /// Digests of the image's layers, as its labels list them (may be empty).
    pub image_layers: Vec<String>,
    /// Its verified metadata is kept ([`TocStore`](crate::tocstore::TocStore)): a restore
    /// needs no registry.
    pub metadata_stored: bool,
    /// A native copy of it is made: containers created now read that, not FUSE.
    pub native_copy: bool,
    /// How it is read: `eStargz`, `zstd:chunked` or `SOCI`.
    pub format: &'static str,
    pub stats: fusefs::Stats,
}

/// A lazily mounted layer's format as status shows it.
pub fn format_name(format: estargz::Format) -> &'static str {
    match format {
        estargz::Format::Estargz => "eStargz",
        estargz::Format::LegacyStargz => "stargz",
        estargz::Format::ZstdChunked | estargz::Format::StargzZstdChunked => "zstd:chunked",
        estargz::Format::Soci => "SOCI",
    }
}

/// The files a mounted layer has had opened, in first-open order.
#[derive(Debug, Clone)]
pub struct LayerAccess {
    pub layer_digest: String,
    pub image_ref: String,
    pub files: Vec<fusefs::FileAccess>,
}

impl FuseMounter {
    pub fn status(&self) -> Vec<MountedLayerStatus> {
        let mut out: Vec<_> = self
            .mounts()
            .iter()
            .map(|(path, served)| MountedLayerStatus {
                mountpoint: path.clone(),
                layer_digest: served.layer_digest.clone(),
                image_ref: served.image_ref.clone(),
                image_layers: served.image_layers.clone(),
                metadata_stored: self
                    .store
                    .as_ref()
                    .is_some_and(|s| s.contains(&served.layer_digest))
                    || crate::soci_index::local_copy_path(&self.local_layers, &served.layer_digest)
                        .is_some_and(|p| p.is_file()),
                native_copy: crate::native::native_of(path).is_some(),
                format: format_name(served.mounted.fs().layer().format()),
                stats: served.mounted.stats(),
            })
            .collect();
        out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        out
    }

    /// Each mounted layer's access log (for `lazysnap optimize`).
    pub fn accessed(&self) -> Vec<LayerAccess> {
        self.mounts()
            .values()
            .map(|served| LayerAccess {
                layer_digest: served.layer_digest.clone(),
                image_ref: served.image_ref.clone(),
                files: served.mounted.fs().accessed(),
            })
            .collect()
    }
}
