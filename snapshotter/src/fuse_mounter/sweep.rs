//! The sweep after a snapshot is removed: the chunk cache, the kept metadata and the
//! local layer copies shrink to what the mounted layers use.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use super::FuseMounter;

/// The chunk cache's sweep leaves the kept metadata of layers it did not list as
/// mounted if it was written after the listing: a layer is kept only once it is mounted,
/// so such a file is of a layer mounted since. This much earlier counts as after, for
/// file times come from the kernel's coarse clock (a tick behind at most).
const KEPT_METADATA_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

impl FuseMounter {
    /// Sweeps the chunk cache down to what the mounted layers use, in the background.
    /// Only when every remaining lazy snapshot is mounted: one not yet restored (after
    /// a restart) would lose its cached chunks, though it still uses them.
    pub(super) fn sweep_unused(&self, remaining: Vec<PathBuf>) {
        // Kept metadata written from now on may be of a layer mounted after this listing.
        let listed_at = std::time::SystemTime::now() - KEPT_METADATA_GRACE;
        let (layers, digests): (Vec<_>, HashSet<String>) = {
            let mounts = self.mounts();
            if let Some(missing) = remaining.iter().find(|m| !mounts.contains_key(*m)) {
                tracing::debug!(mountpoint = %missing.display(),
                    "cache sweep put off: a lazy snapshot's layer is not mounted yet");
                return;
            }
            (
                mounts
                    .values()
                    .map(|s| Arc::clone(s.mounted.fs()))
                    .collect(),
                mounts.values().map(|s| s.layer_digest.clone()).collect(),
            )
        };
        let cache = self.cache.clone();
        let store = self.store.clone();
        let local_layers = self.local_layers.clone();
        self.handle.spawn_blocking(move || {
            if let Some(store) = store {
                let removed = store.retain(&digests, listed_at);
                if removed > 0 {
                    tracing::info!(
                        removed,
                        "kept layer metadata: removed what no lazily pulled snapshot uses"
                    );
                }
            }
            let removed =
                crate::soci_index::retain_local_copies(&local_layers, &digests, listed_at);
            if removed > 0 {
                tracing::info!(
                    removed,
                    "local layer copies: removed those no lazily pulled snapshot uses"
                );
            }
            let mut live = std::collections::HashSet::new();
            for fs in &layers {
                fs.add_live_cache_keys(&mut live);
            }
            let (entries, bytes) = cache.sweep(&live);
            if entries > 0 {
                tracing::info!(
                    entries,
                    bytes,
                    layers = layers.len(),
                    "chunk cache: removed what no lazily pulled snapshot uses"
                );
            }
        });
    }
}
