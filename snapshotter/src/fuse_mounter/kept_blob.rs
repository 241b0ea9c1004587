//! The blob of a layer opened from its kept metadata: it reaches the registry only for
//! reads that miss the cache, and holds a failure briefly so the kernel's retry does not
//! wait for the registry twice.

use std::sync::{Arc, Mutex, MutexGuard};

use estargz::lock;

/// The blob of a layer opened from its kept metadata. Its size is kept too, so it is
/// opened without asking the registry anything: the registry is first reached (and
/// authenticated with) on the first read that misses the chunk cache. A read the
/// registry does not serve fails (the FUSE read gets EIO) after the registry client's
/// retries, bounded by `fetch_timeout`, with a log line naming the layer and the
/// registry's error; the next read (after [`FAILURE_HOLD`]) tries again, so reads work
/// again once the registry is back.
pub(super) struct KeptBlob {
    layer_digest: String,
    image_ref: String,
    size: u64,
    /// The registry's blob ([`registry::RemoteBlob`]).
    remote: Arc<dyn estargz::BlobReader>,
    /// The last failure, for [`FAILURE_HOLD`].
    failed: Mutex<Option<(std::time::Instant, estargz::BlobError)>>,
}

/// Reads of a layer restored from its kept metadata that start this soon after one of
/// its reads failed at the registry fail at once, with that error: the kernel follows a
/// failed read-ahead with a read of the page itself at once, and without this a read(2)
/// would wait for the registry twice. Reads after it try the registry again.
pub const FAILURE_HOLD: std::time::Duration = std::time::Duration::from_millis(250);

impl KeptBlob {
    pub(super) fn new(
        layer_digest: String,
        image_ref: String,
        size: u64,
        remote: Arc<dyn estargz::BlobReader>,
    ) -> KeptBlob {
        KeptBlob {
            layer_digest,
            image_ref,
            size,
            remote,
            failed: Mutex::new(None),
        }
    }

    fn failed(&self) -> MutexGuard<'_, Option<(std::time::Instant, estargz::BlobError)>> {
        lock(&self.failed)
    }

    /// The error of a failure just now, if there was one.
    fn held_failure(&self) -> Option<estargz::BlobError> {
        match &*self.failed() {
            Some((at, e)) if at.elapsed() < FAILURE_HOLD => Some(e.clone()),
            _ => None,
        }
    }

    fn outcome<T>(
        &self,
        offset: u64,
        len: u64,
        read: Result<T, estargz::BlobError>,
    ) -> Result<T, estargz::BlobError> {
        match &read {
            Ok(_) => *self.failed() = None,
            Err(e) => {
                tracing::warn!(layer = %self.layer_digest, image = %self.image_ref, offset, len,
                    error = %e, "the registry did not serve a read of a layer restored from its \
                    kept metadata: the read fails (EIO), the next one tries again");
                *self.failed() = Some((std::time::Instant::now(), e.clone()));
            }
        }
        read
    }
}

impl estargz::BlobReader for KeptBlob {
    fn size(&self) -> estargz::BlobFuture<'_, u64> {
        let size = self.size;
        Box::pin(async move { Ok(size) })
    }

    fn read_at(&self, offset: u64, len: u64) -> estargz::BlobFuture<'_, bytes::Bytes> {
        Box::pin(async move {
            if let Some(e) = self.held_failure() {
                return Err(e);
            }
            let read = self.remote.read_at(offset, len).await;
            self.outcome(offset, len, read)
        })
    }

    fn read_at_streaming<'a>(
        &'a self,
        offset: u64,
        len: u64,
        on_data: &'a (dyn Fn(bytes::Bytes) + Send + Sync),
    ) -> estargz::BlobFuture<'a, ()> {
        Box::pin(async move {
            if let Some(e) = self.held_failure() {
                return Err(e);
            }
            let read = self.remote.read_at_streaming(offset, len, on_data).await;
            self.outcome(offset, len, read)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A blob whose reads fail while `down` is set, counting the reads that reach it.
    struct Registry {
        down: std::sync::atomic::AtomicBool,
        reads: AtomicUsize,
    }

    impl estargz::BlobReader for Registry {
        fn size(&self) -> estargz::BlobFuture<'_, u64> {
            Box::pin(async { Ok(100) })
        }
        fn read_at(&self, _: u64, len: u64) -> estargz::BlobFuture<'_, bytes::Bytes> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let down = self.down.load(Ordering::SeqCst);
            Box::pin(async move {
                if down {
                    return Err(estargz::BlobError::new(
                        estargz::BlobErrorKind::Transient,
                        "connection refused",
                    ));
                }
                Ok(bytes::Bytes::from(vec![7u8; len as usize]))
            })
        }
    }

    #[tokio::test]
    async fn a_kept_layers_blob_fails_while_its_registry_is_down_and_tries_again_after() {
        let registry = Arc::new(Registry {
            down: true.into(),
            reads: AtomicUsize::new(0),
        });
        let blob = KeptBlob::new(
            "sha256:layer".into(),
            "127.0.0.1:5000/app:1".into(),
            100,
            Arc::clone(&registry) as Arc<dyn estargz::BlobReader>,
        );
        use estargz::BlobReader as _;
        // Its size is known: the registry is not asked.
        assert_eq!(blob.size().await.unwrap(), 100);
        assert_eq!(registry.reads.load(Ordering::SeqCst), 0);
        let err = blob.read_at(0, 10).await.unwrap_err();
        assert!(err.message.contains("connection refused"), "{err}");
        assert_eq!(registry.reads.load(Ordering::SeqCst), 1);
        // The kernel's immediate second try fails at once, without the registry.
        let delivered = Mutex::new(0);
        let on_data = |b: bytes::Bytes| *delivered.lock().unwrap() += b.len();
        assert!(blob.read_at_streaming(0, 10, &on_data).await.is_err());
        assert_eq!(registry.reads.load(Ordering::SeqCst), 1);
        // Later reads try again, and work once the registry is back.
        tokio::time::sleep(FAILURE_HOLD + std::time::Duration::from_millis(50)).await;
        assert!(blob.read_at(0, 10).await.is_err());
        assert_eq!(registry.reads.load(Ordering::SeqCst), 2);
        registry.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(FAILURE_HOLD + std::time::Duration::from_millis(50)).await;
        blob.read_at_streaming(0, 10, &on_data).await.unwrap();
        assert_eq!(*delivered.lock().unwrap(), 10);
        assert_eq!(&blob.read_at(5, 3).await.unwrap()[..], &[7, 7, 7]);
        assert_eq!(registry.reads.load(Ordering::SeqCst), 4);
    }
}
