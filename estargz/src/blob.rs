//! Random access to one blob: the seam between the formats and whoever fetches bytes.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

/// A boxed future so that `BlobReader` stays object-safe (`Arc<dyn BlobReader>`).
pub type BlobFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BlobError>> + Send + 'a>>;

/// Random access to the bytes of one blob (a registry layer, a local file, a `Vec<u8>`).
///
/// `read_at` returns exactly `len` bytes, or fewer only when the range runs past the end
/// of the blob; anything else is an error, never short data.
pub trait BlobReader: Send + Sync {
    fn size(&self) -> BlobFuture<'_, u64>;
    fn read_at(&self, offset: u64, len: u64) -> BlobFuture<'_, Bytes>;

    /// `read_at`, handing the bytes to `on_data` as they arrive instead: in order, each
    /// byte once (a retried request skips what was handed over already), so that the
    /// start of a long range can be used before its end arrives. Resolves when the
    /// range is complete, or with the error that cut it short. The default hands over
    /// the whole range at once.
    fn read_at_streaming<'a>(
        &'a self,
        offset: u64,
        len: u64,
        on_data: &'a (dyn Fn(Bytes) + Send + Sync),
    ) -> BlobFuture<'a, ()> {
        Box::pin(async move {
            let data = self.read_at(offset, len).await?;
            on_data(data);
            Ok(())
        })
    }
}

/// What went wrong while reading a blob; lets callers decide whether a retry can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobErrorKind {
    /// The range lies outside the blob.
    OutOfRange,
    /// The source answered with fewer or other bytes than asked for.
    ShortRead,
    /// Network, registry or local I/O failure; a later attempt may succeed.
    Transient,
    /// The source refused for good (not found, unauthorized, ...).
    Fatal,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BlobError {
    pub kind: BlobErrorKind,
    pub message: String,
}

impl BlobError {
    pub fn new(kind: BlobErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// An in-memory blob, for tests and for the converter's small buffers.
#[derive(Debug, Clone, Default)]
pub struct VecBlob(pub Bytes);

impl VecBlob {
    pub fn new(data: impl Into<Bytes>) -> Self {
        Self(data.into())
    }
}

impl BlobReader for VecBlob {
    fn size(&self) -> BlobFuture<'_, u64> {
        let size = self.0.len() as u64;
        Box::pin(async move { Ok(size) })
    }

    fn read_at(&self, offset: u64, len: u64) -> BlobFuture<'_, Bytes> {
        let result = slice_range(&self.0, offset, len);
        Box::pin(async move { result })
    }
}

fn slice_range(data: &Bytes, offset: u64, len: u64) -> Result<Bytes, BlobError> {
    let size = data.len() as u64;
    if offset > size {
        return Err(BlobError::new(
            BlobErrorKind::OutOfRange,
            format!("read at {offset} past the end of a {size}-byte blob"),
        ));
    }
    let end = offset.saturating_add(len).min(size);
    // Both bounds are <= data.len(), which fits in usize.
    Ok(data.slice(offset as usize..end as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        // A tiny executor: VecBlob's futures are ready at once.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("VecBlob future was not ready"),
        }
    }

    #[test]
    fn vec_blob_reads_ranges_and_clamps_at_end() {
        let blob = VecBlob::new(b"0123456789".to_vec());
        assert_eq!(block_on(blob.size()).unwrap(), 10);
        assert_eq!(&block_on(blob.read_at(2, 3)).unwrap()[..], b"234");
        assert_eq!(&block_on(blob.read_at(8, 100)).unwrap()[..], b"89");
        assert_eq!(block_on(blob.read_at(10, 1)).unwrap().len(), 0);
        let err = block_on(blob.read_at(11, 1)).unwrap_err();
        assert_eq!(err.kind, BlobErrorKind::OutOfRange);
    }
}
