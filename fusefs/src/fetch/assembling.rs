//! Whole-file copies for FUSE passthrough: a file whose chunks are all local is written
//! out once as one plain file (from verified chunks), which the kernel then reads
//! directly at local-disk speed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use estargz::{EntryKind, Index, Layer, NodeId, Sha256Sum};

use super::{Counted, Fetcher, lock};
use crate::config::FsConfig;

/// Which files get whole copies, and which copies are being written.
pub(crate) struct Assembling {
    /// Whole-file copies being written, by key.
    under_way: Mutex<HashSet<Sha256Sum>>,
    /// Files of at least this size get whole copies; `None`: none do (passthrough off,
    /// or no disk cache to keep them in).
    min_bytes: Option<u64>,
}

impl Assembling {
    pub(crate) fn new(config: &FsConfig, disk_enabled: bool) -> Self {
        Assembling {
            under_way: Mutex::default(),
            min_bytes: (config.passthrough && disk_enabled)
                .then(|| config.passthrough_min_bytes.max(1)),
        }
    }

    /// Regular files big enough for passthrough, hardlinks resolved; `None` otherwise.
    fn passthrough_size(&self, index: &Index, node: NodeId) -> Option<(NodeId, u64)> {
        let min = self.min_bytes?;
        let e = index.entry(index.resolve(node));
        (e.kind() == EntryKind::Reg && e.size() >= min).then(|| (e.id(), e.size()))
    }

    /// Claims the writing of the copy under `key`: false when it is under way already.
    fn begin(&self, key: Sha256Sum) -> bool {
        lock(&self.under_way).insert(key)
    }

    fn end(&self, key: &Sha256Sum) {
        lock(&self.under_way).remove(key);
    }
}

/// The key a whole copy of `node`'s content is stored under: a digest of its chunk
/// list, so equal files of different layers share one copy.
fn file_key(layer: &Layer, node: NodeId) -> Sha256Sum {
    let chunks = layer.chunks_for_range(node, 0, u64::MAX);
    let mut text = Vec::with_capacity(32 + chunks.len() * 48);
    text.extend_from_slice(b"lazysnap whole file v1\0");
    for c in chunks {
        text.extend_from_slice(&c.digest.0);
        text.extend_from_slice(&c.file_offset.to_le_bytes());
        text.extend_from_slice(&c.size.to_le_bytes());
    }
    Sha256Sum::of(&text)
}

impl Fetcher {
    /// Adds to `live` what of the cache this layer can use: every chunk digest, and the
    /// key of every whole copy it could serve.
    pub(crate) fn add_live(&self, live: &mut HashSet<Sha256Sum>) {
        let index = self.layer.index();
        live.extend(index.all_chunks().iter().map(|c| c.digest));
        for id in 0..index.len() {
            let node = NodeId(id as u32);
            if let Some((target, _)) = self.assembling.passthrough_size(self.layer.index(), node)
                && target == node
            {
                live.insert(file_key(&self.layer, node));
            }
        }
    }

    /// A local copy of the whole file, if one is stored, for the kernel to read directly.
    pub(crate) fn whole_file(&self, node: NodeId) -> Option<std::fs::File> {
        let (node, _) = self.assembling.passthrough_size(self.layer.index(), node)?;
        self.cache.whole_file(&file_key(&self.layer, node))
    }

    /// When every chunk of `node` is local and no whole copy exists yet, writes one in
    /// the background (from verified chunks) so that later opens can use passthrough.
    pub(crate) fn maybe_store_whole(self: &Arc<Self>, node: NodeId) {
        let Some((node, size)) = self.assembling.passthrough_size(self.layer.index(), node) else {
            return;
        };
        let chunks = self.layer.chunks_for_range(node, 0, size);
        // In memory counts too: the last chunks a reader got may still be on their way
        // to disk when it closes the file.
        if !chunks
            .iter()
            .all(|c| c.zeros || self.cache.contains(&c.digest))
        {
            return;
        }
        let key = file_key(&self.layer, node);
        if self.cache.has_whole_file(&key) || !self.assembling.begin(key) {
            return;
        }
        let busy = Counted::new(&self.writes);
        let this = Arc::clone(self);
        let job = move || {
            let _busy = busy;
            let res = this.cache.store_whole_file(key, size, |f| {
                use std::io::Write as _;
                for c in this.layer.chunks_for_range(node, 0, size) {
                    let data = if c.zeros {
                        this.zeros(node, c).map_err(std::io::Error::other)?
                    } else {
                        this.cache
                            .get_uncached(&c.digest, c.size)
                            .map_err(std::io::Error::other)?
                            .ok_or_else(|| std::io::Error::other("a chunk left the cache"))?
                    };
                    f.write_all(&data)?;
                }
                Ok(())
            });
            match res {
                Ok(()) => tracing::debug!(layer = %this.name, path = %this.path(node),
                    "stored a whole copy for passthrough"),
                Err(e) => tracing::debug!(layer = %this.name, path = %this.path(node),
                    error = %e, "no whole copy for passthrough"),
            }
            this.assembling.end(&key);
        };
        drop(self.handle.spawn_blocking(job));
    }
}
