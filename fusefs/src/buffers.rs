//! Big buffers kept for reuse.
//!
//! Reading a big file fills a range body and inflates a chunk of megabytes every few
//! milliseconds. A big buffer gets a mapping of its own ([`crate::heap`]), so each new
//! one costs a page fault and a cgroup charge per 4 KiB page and an unmap when it goes:
//! perf over a 1 GiB read put about a third of lazysnapd's CPU time there. Buffers no
//! longer in use wait here, up to a bounded total, for the next body or chunk; the rest
//! are freed as before.

use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use estargz::lock;

/// Below this, buffers come from the heap's free lists anyway (glibc's mmap threshold,
/// as [`crate::heap::unmap_big_frees`] fixes it).
const BIG: usize = crate::heap::MMAP_THRESHOLD;

pub(crate) struct BufferPool {
    kept: Mutex<Vec<Vec<u8>>>,
    max_bytes: usize,
}

/// Range bodies and inflated chunks, shared by every layer of the process.
pub(crate) static BIG_BUFFERS: BufferPool = BufferPool::new(16 << 20);

/// A pool that keeps nothing: buffers from it are freed when done with, as usual.
pub(crate) static UNPOOLED: BufferPool = BufferPool::new(0);

impl BufferPool {
    pub(crate) const fn new(max_bytes: usize) -> Self {
        Self {
            kept: Mutex::new(Vec::new()),
            max_bytes,
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        lock(&self.kept)
    }

    /// An empty buffer with room for `len` bytes: a kept one if one fits without being
    /// more than twice as big, else a new one.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        if len >= BIG {
            let mut kept = self.kept();
            let fits = kept
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len && b.capacity() / 2 <= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            if let Some(i) = fits {
                return kept.swap_remove(i);
            }
        }
        // Room to spare, so that a chunk's buffer fits the body it came in (a little
        // bigger: headers) and the other way round.
        Vec::with_capacity(if len >= BIG { roomy(len) } else { len })
    }

    /// Keeps `buf` for the next [`BufferPool::take`] if it is big and there is room.
    pub(crate) fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() < BIG {
            return;
        }
        buf.clear();
        let mut kept = self.kept();
        let total: usize = kept.iter().map(Vec::capacity).sum();
        if total + buf.capacity() <= self.max_bytes {
            kept.push(buf);
        }
    }

    /// Frees every kept buffer (nothing is being read).
    pub(crate) fn release(&self) {
        let freed = std::mem::take(&mut *self.kept());
        drop(freed);
    }

    #[cfg(test)]
    pub(crate) fn kept_bytes(&self) -> usize {
        self.kept().iter().map(Vec::capacity).sum()
    }
}

/// An empty [`BytesMut`] with room for `len` bytes, from `pool` (see
/// [`BufferPool::take`]); hand it back with [`BufferPool::give_back`] once no [`Bytes`]
/// split off it is left.
pub(crate) fn take_mut(pool: &'static BufferPool, len: usize) -> BytesMut {
    // Bytes from a Vec and BytesMut from a unique Bytes keep the allocation (no copy).
    BytesMut::from(Bytes::from(pool.take(len)))
}

/// `buf` as [`Bytes`]; the buffer goes back to `pool` when the last clone is dropped.
pub(crate) fn into_bytes(pool: &'static BufferPool, buf: Vec<u8>) -> Bytes {
    if buf.capacity() < BIG {
        return Bytes::from(buf);
    }
    Bytes::from_owner(Returned { buf, pool })
}

/// `len` plus an eighth, in whole 64 KiB.
fn roomy(len: usize) -> usize {
    (len + len / 8).next_multiple_of(64 << 10)
}

struct Returned {
    buf: Vec<u8>,
    pool: &'static BufferPool,
}

impl AsRef<[u8]> for Returned {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Returned {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_big_buffer_comes_back_once_its_last_bytes_are_dropped() {
        static POOL: BufferPool = BufferPool::new(32 << 20);
        let mut buf = POOL.take(BIG);
        buf.extend_from_slice(&vec![7u8; BIG]);
        let at = buf.as_ptr();
        let bytes = into_bytes(&POOL, buf);
        let part = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(POOL.kept_bytes(), 0, "a slice still holds it");
        assert_eq!(&part[..], &[7u8; 10]);
        drop(part);
        assert!(POOL.kept_bytes() >= BIG);
        let again = POOL.take(BIG);
        assert_eq!(again.as_ptr(), at, "the same buffer, reused");
        assert!(again.is_empty());
    }

    #[test]
    fn new_buffers_have_room_for_a_slightly_bigger_next_use() {
        static POOL: BufferPool = BufferPool::new(32 << 20);
        // A chunk's buffer serves the next body, which is a little bigger (headers).
        let chunk = POOL.take(4 << 20);
        let at = chunk.as_ptr();
        POOL.give_back(chunk);
        let body = POOL.take((4 << 20) + 1300);
        assert_eq!(body.as_ptr(), at);
        // Small ones are exactly as asked: the heap has them.
        assert_eq!(POOL.take(1000).capacity(), 1000);
    }

    #[test]
    fn the_pool_keeps_a_bounded_total_and_only_fitting_buffers() {
        static POOL: BufferPool = BufferPool::new(6 * BIG);
        for _ in 0..3 {
            POOL.give_back(Vec::with_capacity(2 * BIG));
        }
        assert_eq!(POOL.kept_bytes(), 6 * BIG);
        POOL.give_back(Vec::with_capacity(2 * BIG));
        assert_eq!(POOL.kept_bytes(), 6 * BIG, "over the bound: freed");
        // Small buffers are the heap's business.
        POOL.give_back(Vec::with_capacity(BIG / 2));
        assert_eq!(POOL.kept_bytes(), 6 * BIG);
        // Nothing kept is big enough for 3 BIG.
        assert!(POOL.take(3 * BIG).capacity() >= 3 * BIG);
        assert_eq!(POOL.kept_bytes(), 6 * BIG);
        // Twice as big as asked is still taken...
        assert_eq!(POOL.take(BIG).capacity(), 2 * BIG);
        assert_eq!(POOL.kept_bytes(), 4 * BIG);
        POOL.release();
        assert_eq!(POOL.kept_bytes(), 0);
        // ... more than that is not.
        POOL.give_back(Vec::with_capacity(5 * BIG));
        assert!(POOL.take(2 * BIG).capacity() < 5 * BIG);
        assert_eq!(POOL.kept_bytes(), 5 * BIG);
        POOL.release();
    }

    #[test]
    fn a_body_buffer_is_reused_once_its_segments_are_gone() {
        static POOL: BufferPool = BufferPool::new(32 << 20);
        let mut body = take_mut(&POOL, 2 * BIG);
        assert!(body.capacity() >= 2 * BIG);
        let at = body.as_ptr();
        body.extend_from_slice(&vec![1u8; BIG]);
        let segment = body.split_to(BIG / 2).freeze();
        drop(segment);
        body.clear();
        POOL.give_back(body.into());
        let again = POOL.take(2 * BIG);
        assert_eq!(again.as_ptr(), at);
    }
}
