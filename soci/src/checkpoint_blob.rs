//! The checkpoints as a SOCI zTOC carries them (`CompressionInfo.checkpoints`, soci's
//! "zinfo" blob): a header of the checkpoint count (4 bytes) and the span size (8),
//! then per checkpoint its compressed offset (8), uncompressed offset (8), bits (1) and
//! 32 KiB window, all integers little-endian. The first version of the format left the
//! first checkpoint out (it was assumed to start right after a 10-byte gzip header); a
//! blob one checkpoint short of its count is read that way, as soci reads it.

use crate::gzip_checkpoints::{Checkpoint, WINDOW_SIZE};

const HEADER_SIZE: usize = 4 + 8;
const CHECKPOINT_SIZE: usize = 8 + 8 + 1 + WINDOW_SIZE;
/// Where version 1 put the implied first checkpoint: past a gzip header without
/// optional fields.
const V1_FIRST_COMPRESSED_OFFSET: u64 = 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlobError {
    #[error("{len} bytes do not hold a header and {count} checkpoints of {CHECKPOINT_SIZE} bytes")]
    Size { len: usize, count: i64 },
    #[error("no checkpoints")]
    Empty,
    #[error("checkpoint {0}: {1}")]
    Checkpoint(usize, &'static str),
}

/// The span size the checkpoints were built for, and the checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoints {
    pub span_size: u64,
    pub points: Vec<Checkpoint>,
}

/// The blob of `checkpoints` (the current version, every checkpoint in it).
pub fn encode(checkpoints: &Checkpoints) -> Vec<u8> {
    let points = &checkpoints.points;
    let mut blob = Vec::with_capacity(HEADER_SIZE + points.len() * CHECKPOINT_SIZE);
    blob.extend_from_slice(&(points.len() as u32).to_le_bytes());
    blob.extend_from_slice(&checkpoints.span_size.to_le_bytes());
    for p in points {
        blob.extend_from_slice(&p.compressed_offset.to_le_bytes());
        blob.extend_from_slice(&p.uncompressed_offset.to_le_bytes());
        blob.push(p.bits);
        // Shorter windows (none are built so) are padded as the inflater would see them.
        let window = &p.window[..p.window.len().min(WINDOW_SIZE)];
        blob.resize(blob.len() + WINDOW_SIZE - window.len(), 0);
        blob.extend_from_slice(window);
    }
    blob
}

/// Reads a blob, refusing anything that could not have come from a gzip stream:
/// counts that disagree with the size, bits over 7, offsets that go back, a first
/// checkpoint anywhere but at the start of the output.
pub fn decode(blob: &[u8]) -> Result<Checkpoints, BlobError> {
    if blob.len() < HEADER_SIZE {
        return Err(BlobError::Size {
            len: blob.len(),
            count: 0,
        });
    }
    let count = i64::from(i32::from_le_bytes(
        blob[0..4].try_into().unwrap_or_default(),
    ));
    let span_size = u64::from_le_bytes(blob[4..12].try_into().unwrap_or_default());
    let stored = (blob.len() - HEADER_SIZE) / CHECKPOINT_SIZE;
    let whole = (blob.len() - HEADER_SIZE).is_multiple_of(CHECKPOINT_SIZE);
    let version_one = match count - stored as i64 {
        0 if whole => false,
        1 if whole => true,
        _ => {
            return Err(BlobError::Size {
                len: blob.len(),
                count,
            });
        }
    };
    if count < 1 {
        return Err(BlobError::Empty);
    }
    let mut points = Vec::with_capacity(count as usize);
    if version_one {
        points.push(Checkpoint {
            compressed_offset: V1_FIRST_COMPRESSED_OFFSET,
            uncompressed_offset: 0,
            bits: 0,
            window: vec![0; WINDOW_SIZE],
        });
    }
    for raw in blob[HEADER_SIZE..].chunks_exact(CHECKPOINT_SIZE) {
        let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().unwrap_or_default());
        points.push(Checkpoint {
            compressed_offset: u64_at(0),
            uncompressed_offset: u64_at(8),
            bits: raw[16],
            window: raw[17..].to_vec(),
        });
    }
    for (i, p) in points.iter().enumerate() {
        if p.bits > 7 {
            return Err(BlobError::Checkpoint(i, "more than 7 bits"));
        }
        if p.bits > 0 && p.compressed_offset == 0 {
            return Err(BlobError::Checkpoint(i, "bits before the first byte"));
        }
        if i == 0 && p.uncompressed_offset != 0 {
            return Err(BlobError::Checkpoint(0, "does not start the output"));
        }
        if i > 0 {
            let before = &points[i - 1];
            if p.uncompressed_offset < before.uncompressed_offset
                || p.compressed_offset < before.compressed_offset
            {
                return Err(BlobError::Checkpoint(i, "goes back"));
            }
        }
    }
    Ok(Checkpoints { span_size, points })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(compressed: u64, uncompressed: u64, bits: u8, fill: u8) -> Checkpoint {
        Checkpoint {
            compressed_offset: compressed,
            uncompressed_offset: uncompressed,
            bits,
            window: vec![fill; WINDOW_SIZE],
        }
    }

    fn sample() -> Checkpoints {
        Checkpoints {
            span_size: 4 << 20,
            points: vec![
                point(10, 0, 0, 0),
                point(1_000_123, 4_200_000, 3, 7),
                point(2_000_999, 8_500_000, 7, 9),
            ],
        }
    }

    #[test]
    fn a_blob_reads_back_as_written_in_soci_layout() {
        let c = sample();
        let blob = encode(&c);
        assert_eq!(blob.len(), 12 + 3 * (17 + 32768));
        assert_eq!(&blob[0..4], &3u32.to_le_bytes());
        assert_eq!(&blob[4..12], &(4u64 << 20).to_le_bytes());
        // The second checkpoint: compressed offset first, then uncompressed, then bits.
        let second = 12 + 17 + 32768;
        assert_eq!(&blob[second..second + 8], &1_000_123u64.to_le_bytes());
        assert_eq!(&blob[second + 8..second + 16], &4_200_000u64.to_le_bytes());
        assert_eq!(blob[second + 16], 3);
        assert_eq!(decode(&blob), Ok(c));
    }

    #[test]
    fn a_version_one_blob_gets_its_implied_first_checkpoint() {
        let c = sample();
        let blob = encode(&c);
        // Version 1: the count says 3, two are stored.
        let mut v1 = blob[..12].to_vec();
        v1.extend_from_slice(&blob[12 + 17 + 32768..]);
        let read = decode(&v1).unwrap();
        assert_eq!(read.points.len(), 3);
        assert_eq!(read.points[0], point(10, 0, 0, 0));
        assert_eq!(read.points[1..], c.points[1..]);
    }

    #[test]
    fn blobs_that_no_gzip_stream_makes_are_refused() {
        let blob = encode(&sample());
        assert!(matches!(decode(&blob[..5]), Err(BlobError::Size { .. })));
        assert!(matches!(
            decode(&blob[..blob.len() - 1]),
            Err(BlobError::Size { .. })
        ));
        let mut wrong_count = blob.clone();
        wrong_count[0..4].copy_from_slice(&9u32.to_le_bytes());
        assert!(matches!(decode(&wrong_count), Err(BlobError::Size { .. })));
        let mut negative = blob[..12].to_vec();
        negative[0..4].copy_from_slice(&(-1i32).to_le_bytes());
        assert!(matches!(decode(&negative), Err(BlobError::Size { .. })));
        let empty = encode(&Checkpoints {
            span_size: 1,
            points: vec![],
        });
        assert_eq!(decode(&empty), Err(BlobError::Empty));
        type Spoil = fn(&mut Checkpoints);
        let cases: [(Spoil, &str); 4] = [
            (|c| c.points[1].bits = 8, "more than 7 bits"),
            (
                |c| c.points[0].uncompressed_offset = 5,
                "does not start the output",
            ),
            (|c| c.points[2].uncompressed_offset = 1, "goes back"),
            (
                |c| {
                    c.points[0].compressed_offset = 0;
                    c.points[0].bits = 2;
                },
                "bits before the first byte",
            ),
        ];
        for (spoil, why) in cases {
            let mut c = sample();
            spoil(&mut c);
            assert!(
                matches!(decode(&encode(&c)), Err(BlobError::Checkpoint(_, w)) if w == why),
                "{why}"
            );
        }
    }
}
