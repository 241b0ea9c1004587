//! Digests of a cached chunk's pieces, so that part of a chunk can be read back from
//! disk and checked without reading and hashing all of it.
//!
//! A chunk's own digest covers all of its bytes (4 MiB in `ctr-remote`'s images): a
//! program that faults 128 KiB of a mapped file here and there would cost a whole
//! chunk's disk read and hash per fault once the chunk has left the memory tier, which
//! is why the tier used to keep such chunks for half a second after each touch. When a
//! chunk read in part leaves the tier, the sha256 of each of its [`PIECE`]s is taken
//! from the bytes in memory (already checked against the chunk's digest); a later read
//! of part of it reads only the pieces it covers and checks them against those.
//! The digests live in memory only: after a restart a chunk is checked whole once more.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use estargz::{Sha256Sum, lock};

/// The grain of a partial read from disk: the kernel's read-ahead for a mapped file
/// asks for 128 KiB, so a fault reads and hashes one or two pieces.
pub(crate) const PIECE: usize = 64 << 10;

/// Chunks no bigger than this are read whole: their pieces would save little.
const MIN_CHUNK: usize = 4 * PIECE;

/// Chunks whose pieces are known, at most: 2 KiB each for a 4 MiB chunk, 2 MiB in all.
const MAX_CHUNKS: usize = 1024;

/// The digests of one chunk's pieces, in order, and the chunk's length.
pub(crate) struct PieceDigests {
    len: u64,
    digests: Box<[Sha256Sum]>,
}

impl PieceDigests {
    /// The pieces of `data`, which must be the chunk's verified bytes; `None` for a
    /// chunk too small to be worth it.
    pub(crate) fn of(data: &[u8]) -> Option<PieceDigests> {
        (data.len() > MIN_CHUNK).then(|| PieceDigests {
            len: data.len() as u64,
            digests: data.chunks(PIECE).map(Sha256Sum::of).collect(),
        })
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The bytes of the chunk to read and check for its bytes `range`: the pieces that
    /// range touches; `None` for a range not within the chunk.
    pub(crate) fn covering(&self, range: &Range<u64>) -> Option<Range<u64>> {
        if range.start >= range.end || range.end > self.len {
            return None;
        }
        let piece = PIECE as u64;
        let end = range
            .end
            .div_ceil(piece)
            .saturating_mul(piece)
            .min(self.len);
        Some((range.start / piece) * piece..end)
    }

    /// Whether `bytes`, read from the chunk's offset `from` (a piece's start) to the end
    /// of a piece or of the chunk, hash to their pieces' digests; the error names the
    /// first that does not.
    pub(crate) fn check(&self, from: u64, bytes: &[u8]) -> Result<(), String> {
        let piece = PIECE as u64;
        let first = (from / piece) as usize;
        let end = from + bytes.len() as u64;
        if !from.is_multiple_of(piece) || !(end == self.len || end.is_multiple_of(piece)) {
            return Err(format!(
                "{} bytes at {from} are not whole pieces",
                bytes.len()
            ));
        }
        for (i, piece) in bytes.chunks(PIECE).enumerate() {
            if self.digests.get(first + i) != Some(&Sha256Sum::of(piece)) {
                return Err(format!("piece {} does not match its digest", first + i));
            }
        }
        Ok(())
    }
}

/// The chunks whose pieces are known, the oldest forgotten first past [`MAX_CHUNKS`].
#[derive(Default)]
pub(crate) struct Pieces {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    map: HashMap<Sha256Sum, Arc<PieceDigests>>,
    order: VecDeque<Sha256Sum>,
}

impl Pieces {
    pub(crate) fn get(&self, digest: &Sha256Sum) -> Option<Arc<PieceDigests>> {
        lock(&self.table).map.get(digest).cloned()
    }

    pub(crate) fn contains(&self, digest: &Sha256Sum) -> bool {
        lock(&self.table).map.contains_key(digest)
    }

    pub(crate) fn insert(&self, digest: Sha256Sum, pieces: PieceDigests) {
        let mut t = lock(&self.table);
        if t.map.insert(digest, Arc::new(pieces)).is_none() {
            t.order.push_back(digest);
        }
        while t.map.len() > MAX_CHUNKS {
            let Some(old) = t.order.pop_front() else {
                break;
            };
            t.map.remove(&old);
        }
    }

    pub(crate) fn remove(&self, digest: &Sha256Sum) {
        let mut t = lock(&self.table);
        if t.map.remove(digest).is_some() {
            t.order.retain(|d| d != digest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn a_range_is_read_as_the_whole_pieces_it_touches() {
        let data = bytes(5 * PIECE + 100);
        let p = PieceDigests::of(&data).unwrap();
        let piece = PIECE as u64;
        assert_eq!(p.covering(&(0..1)), Some(0..piece));
        assert_eq!(p.covering(&(piece - 1..piece + 1)), Some(0..2 * piece));
        // The last piece is short: the span ends with the chunk.
        assert_eq!(
            p.covering(&(5 * piece..5 * piece + 100)),
            Some(5 * piece..5 * piece + 100)
        );
        assert_eq!(p.covering(&(3..3)), None, "empty");
        assert_eq!(p.covering(&(0..5 * piece + 101)), None, "beyond the chunk");
        let span = p.covering(&(piece + 5..3 * piece + 9)).unwrap();
        assert_eq!(
            p.check(span.start, &data[span.start as usize..span.end as usize]),
            Ok(())
        );
    }

    #[test]
    fn a_changed_byte_or_a_piece_cut_short_fails_the_check() {
        let data = bytes(4 * PIECE + 1);
        let p = PieceDigests::of(&data).unwrap();
        let mut bad = data[PIECE..3 * PIECE].to_vec();
        bad[PIECE + 17] ^= 1;
        assert_eq!(
            p.check(PIECE as u64, &bad),
            Err("piece 2 does not match its digest".into())
        );
        assert!(p.check(PIECE as u64, &data[PIECE..2 * PIECE - 1]).is_err());
        assert!(p.check(1, &data[1..PIECE + 1]).is_err());
        assert!(
            PieceDigests::of(&data[..4 * PIECE]).is_none(),
            "too small to be worth it"
        );
    }

    #[test]
    fn the_table_forgets_the_oldest_past_its_bound() {
        let pieces = Pieces::default();
        let data = bytes(4 * PIECE + 1);
        let key = |i: usize| Sha256Sum::of(&i.to_le_bytes());
        for i in 0..=MAX_CHUNKS {
            pieces.insert(key(i), PieceDigests::of(&data).unwrap());
        }
        assert!(!pieces.contains(&key(0)) && pieces.contains(&key(1)));
        assert!(pieces.get(&key(MAX_CHUNKS)).is_some());
        pieces.remove(&key(1));
        assert!(!pieces.contains(&key(1)));
    }
}
