//! Making a whole layer local now, because someone asked (`lazysnap fetch`): the same
//! walk as the background fetch (every chunk not yet local, in blob order, each
//! verified and written to the disk cache before it counts), without its wait for a
//! quiet link and without its rate budget. Its requests count as prefetch on the
//! link, so the layer's own background fetch stands aside meanwhile, and demand reads
//! still go first (they never wait for anything).

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::blob_order::{self, coalesce};
use super::{Fetcher, Purpose};
use crate::core::LayerFs;
use crate::error::{Error, Result};

/// The largest range request of a fetch made now: smaller than `max_range_bytes`, so
/// the requests in flight of several layers hold little memory, and large enough that
/// round trips do not matter.
const NOW_REQUEST_BYTES: u64 = 4 << 20;

/// What [`LayerFs::fetch_all_now`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchedNow {
    /// Distinct chunks that were not local when it started.
    pub chunks: u64,
    /// Their decompressed bytes.
    pub bytes: u64,
}

impl Fetcher {
    /// Fetches every chunk of the layer that is not local, `slots` range requests in
    /// flight at most (shared with whoever else holds the semaphore). Stops at the first
    /// failure and returns it; Ok once every chunk is on disk.
    pub(crate) async fn fetch_all_now(
        self: &Arc<Self>,
        slots: Arc<Semaphore>,
    ) -> Result<FetchedNow> {
        if !self.cache.disk_enabled() {
            return Err(Error::Invalid(
                "the chunk cache has no disk tier: a layer cannot be made local",
            ));
        }
        let mut todo = blob_order::all_chunks(self.layer.index());
        todo.retain(|(_, c)| !c.zeros && !self.cache.contains(&c.digest));
        let todo = blob_order::distinct(todo);
        let wanted = FetchedNow {
            chunks: todo.len() as u64,
            bytes: todo.iter().map(|(_, c)| c.size).sum(),
        };
        let max = self.config.max_range_bytes.min(NOW_REQUEST_BYTES);
        let batches = coalesce(todo, self.config.coalesce_gap, max);
        tracing::info!(layer = %self.name, chunks = wanted.chunks, bytes = wanted.bytes,
            requests = batches.len(), "fetching the rest of the layer now");
        let mut tasks = JoinSet::new();
        let mut failed: Option<Error> = None;
        let note = |failed: &mut Option<Error>, done: std::result::Result<Result<()>, _>| {
            let err = match done {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(e) => Error::Fetch {
                    layer: self.name.clone(),
                    start: 0,
                    end: 0,
                    reason: format!("fetch task: {e}"),
                },
            };
            failed.get_or_insert(err);
        };
        for (_, batch) in batches {
            // The semaphore is never closed.
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                break;
            };
            while let Some(done) = tasks.try_join_next() {
                note(&mut failed, done);
            }
            if failed.is_some() {
                break;
            }
            let this = Arc::clone(self);
            tasks.spawn_on(
                async move {
                    let _permit = permit;
                    // Readers may have fetched some of these meanwhile: chunks() takes
                    // those from the cache, and joins fetches in flight.
                    this.chunks(&batch, Purpose::Now).await.map(|_| ())
                },
                &self.handle,
            );
        }
        while let Some(done) = tasks.join_next().await {
            note(&mut failed, done);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        // Every chunk went to disk before its waiters heard of it, unless the write
        // failed or was skipped (cache full): then the layer is not local.
        let stats = self.stats();
        if stats.local_bytes < stats.total_bytes {
            return Err(Error::Fetch {
                layer: self.name.clone(),
                start: 0,
                end: self.layer.blob_size(),
                reason: format!(
                    "fetched and verified, but {} bytes could not be kept in the chunk cache \
                     (full, or failing writes: see lazysnap status)",
                    stats.total_bytes - stats.local_bytes
                ),
            });
        }
        Ok(wanted)
    }
}

impl LayerFs {
    /// Makes the whole layer local now, at full speed: every chunk not yet in the
    /// cache is fetched (at most `slots` range requests in flight), verified and
    /// written to the disk cache, as the background fetch does, but without waiting
    /// for a quiet link and without its rate limit. Fails with the first failed fetch.
    pub async fn fetch_all_now(&self, slots: Arc<Semaphore>) -> Result<FetchedNow> {
        self.fetcher().fetch_all_now(slots).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::tests::*;

    #[test]
    fn a_layer_is_made_local_without_the_background_fetch() {
        let (tar, src) = sample_tar();
        let blob = FaultBlob::new(convert(&tar, estargz::OutputFormat::Estargz, &[]));
        // Background fetch off, and a link that would never let it run anyway.
        let config = crate::config::FsConfig {
            background_rate_limit: Some(1),
            background_quiet: std::time::Duration::from_secs(3600),
            ..quiet_config()
        };
        let f = fixture_with(blob, config, 1 << 30);
        let before = f.fs.stats();
        assert!(before.local_bytes < before.total_bytes, "{before:?}");
        let slots = Arc::new(Semaphore::new(2));
        let done =
            f.rt.block_on(f.fs.fetch_all_now(Arc::clone(&slots)))
                .unwrap();
        assert_eq!(done.bytes, before.total_bytes - before.local_bytes);
        let after = f.fs.stats();
        assert_eq!(after.local_bytes, after.total_bytes, "{after:?}");
        assert!(!after.background_done || after.total_bytes == after.local_bytes);
        // Everything reads from the cache now: no more requests.
        let requests = f.blob.request_count();
        for (path, want) in &src.files {
            assert_eq!(&f.read_all(path).unwrap(), want, "{path}");
        }
        assert_eq!(f.blob.request_count(), requests);
        // Nothing left to do the second time.
        let again = f.rt.block_on(f.fs.fetch_all_now(slots)).unwrap();
        assert_eq!(again, FetchedNow::default());
        assert_eq!(f.blob.request_count(), requests);
    }

    #[test]
    fn a_failed_fetch_is_reported() {
        let (tar, _) = sample_tar();
        let blob = FaultBlob::new(convert(&tar, estargz::OutputFormat::ZstdChunked, &[]));
        let f = fixture_with(blob, quiet_config(), 1 << 30);
        f.blob.fail_all.store(true, Ordering::SeqCst);
        let err =
            f.rt.block_on(f.fs.fetch_all_now(Arc::new(Semaphore::new(4))))
                .unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        let stats = f.fs.stats();
        assert!(stats.local_bytes < stats.total_bytes);
        // The blob is back: a second try completes.
        f.blob.fail_all.store(false, Ordering::SeqCst);
        f.rt.block_on(f.fs.fetch_all_now(Arc::new(Semaphore::new(4))))
            .unwrap();
        let stats = f.fs.stats();
        assert_eq!(stats.local_bytes, stats.total_bytes);
    }

    #[test]
    fn without_a_disk_cache_nothing_can_be_made_local() {
        let (tar, _) = sample_tar();
        let blob = FaultBlob::new(convert(&tar, estargz::OutputFormat::Estargz, &[]));
        let f = fixture_with(blob, quiet_config(), 0);
        let err =
            f.rt.block_on(f.fs.fetch_all_now(Arc::new(Semaphore::new(4))))
                .unwrap_err();
        assert!(err.to_string().contains("no disk tier"), "{err}");
    }
}
