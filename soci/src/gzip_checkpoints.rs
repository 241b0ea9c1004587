//! Random access into an ordinary gzip stream. Inflating is sequential, but at the
//! boundary between two deflate blocks the inflater's whole state is small: where the
//! next block starts (a byte offset and, since blocks need not end on a byte, how many
//! bits of the byte before belong to it) and the last 32 KiB of output, which later
//! back-references may reach. A [`Checkpoint`] keeps exactly that, about every `span`
//! bytes of output (zlib's zran; SOCI's zTOC stores the same). From one, any byte after
//! it is reached by inflating only from there.

use std::io::Read;

use crate::raw_inflater::{RawInflater, Step};

/// How far deflate's back-references reach: the window a checkpoint keeps.
pub const WINDOW_SIZE: usize = 32 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the gzip stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("the gzip stream is corrupt near compressed byte {offset} (zlib error {code})")]
    Corrupt { offset: u64, code: i32 },
    #[error("the gzip stream ends early, after {0} compressed bytes")]
    Truncated(u64),
    #[error(
        "the gzip stream goes on after its first member ends at compressed byte {0}: \
         concatenated members are not indexed"
    )]
    TrailingData(u64),
    #[error("bad checkpoint: {0}")]
    BadCheckpoint(&'static str),
    #[error("the compressed span ended {got} bytes into the {wanted} asked for")]
    ShortSpan { wanted: u64, got: u64 },
}

/// The inflater's state at a deflate block boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Offset in the gzip stream of the first whole byte of the block.
    pub compressed_offset: u64,
    /// Offset in the inflated data where the block's output starts.
    pub uncompressed_offset: u64,
    /// How many high bits of the byte before `compressed_offset` are the block's first
    /// bits (0-7).
    pub bits: u8,
    /// The output's last 32 KiB before this point (zeros where there was none yet).
    pub window: Vec<u8>,
}

impl Checkpoint {
    /// Where the compressed bytes inflated from this checkpoint begin: a byte early
    /// when the block starts within it.
    pub fn input_start(&self) -> u64 {
        self.compressed_offset - u64::from(self.bits > 0)
    }
}

/// Inflates the whole single-member gzip stream `gz`, keeping a checkpoint at the
/// start of the first block and then at the first block boundary past every `span`
/// bytes of output since the last one.
pub fn build_checkpoints(gz: impl Read, span: u64) -> Result<Vec<Checkpoint>, Error> {
    build_checkpoints_passing_output(gz, span, |_| Ok(()))
}

/// [`build_checkpoints`], handing every inflated byte to `output` in order on the way
/// (an index needs the tar headers too, and one inflate pass is half the work of two).
/// An error from `output` ends the build.
pub fn build_checkpoints_passing_output(
    mut gz: impl Read,
    span: u64,
    mut output: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<Vec<Checkpoint>, Error> {
    let mut inflater = RawInflater::new(31).map_err(|code| Error::Corrupt { offset: 0, code })?;
    let mut input = vec![0u8; 64 << 10];
    // The last window of output, in a ring: all that a checkpoint keeps. zlib-rs may
    // scribble past what it reports producing in the buffer it writes to, so it writes
    // to a buffer of its own and the ring gets copies.
    let mut ring = vec![0u8; WINDOW_SIZE];
    let mut ring_pos = 0;
    let mut out = vec![0u8; WINDOW_SIZE];
    let (mut total_in, mut total_out, mut last) = (0u64, 0u64, 0u64);
    let mut points = Vec::new();
    loop {
        let n = gz.read(&mut input)?;
        if n == 0 {
            return Err(Error::Truncated(total_in));
        }
        let mut pos = 0;
        while pos < n {
            let step = inflater
                .inflate(&input[pos..n], &mut out, true)
                .map_err(|code| Error::Corrupt {
                    offset: total_in,
                    code,
                })?;
            pos += step.consumed;
            let produced = &out[..step.produced];
            output(produced)?;
            let first = produced.len().min(WINDOW_SIZE - ring_pos);
            ring[ring_pos..ring_pos + first].copy_from_slice(&produced[..first]);
            ring[..produced.len() - first].copy_from_slice(&produced[first..]);
            ring_pos = (ring_pos + produced.len()) % WINDOW_SIZE;
            total_in += step.consumed as u64;
            total_out += step.produced as u64;
            if step.step == Step::End {
                let mut rest = [0u8; 1];
                if pos < n || gz.read(&mut rest)? > 0 {
                    return Err(Error::TrailingData(total_in));
                }
                return Ok(points);
            }
            let data_type = inflater.data_type();
            let at_boundary = data_type & 128 != 0 && data_type & 64 == 0;
            if at_boundary && (total_out == 0 || total_out - last > span) {
                let mut window = Vec::with_capacity(WINDOW_SIZE);
                window.extend_from_slice(&ring[ring_pos..]);
                window.extend_from_slice(&ring[..ring_pos]);
                points.push(Checkpoint {
                    compressed_offset: total_in,
                    uncompressed_offset: total_out,
                    bits: (data_type & 7) as u8,
                    window,
                });
                last = total_out;
            }
            if step.consumed == 0 && step.produced == 0 {
                // Input and room, and no progress: zlib cannot go on from here.
                return Err(Error::Corrupt {
                    offset: total_in,
                    code: libz_rs_sys::Z_BUF_ERROR,
                });
            }
        }
    }
}

/// Inflates `len` bytes starting `skip` bytes after `checkpoint`, from `compressed`:
/// the gzip stream's bytes from [`Checkpoint::input_start`] on (as many as the span
/// needs; the caller verifies them before this is called).
pub fn inflate_from(
    checkpoint: &Checkpoint,
    compressed: &[u8],
    skip: u64,
    len: usize,
) -> Result<Vec<u8>, Error> {
    let mut stream = SpanStream::start(checkpoint, compressed)?;
    stream.skip(skip)?;
    let mut out = vec![0u8; len];
    stream.fill(&mut out)?;
    Ok(out)
}

/// Inflates `len` bytes from `checkpoint` (as [`inflate_from`] without a skip), handing
/// the first `first` of them to `on_first` as soon as they are out, before the rest.
pub fn inflate_staged(
    checkpoint: &Checkpoint,
    compressed: &[u8],
    len: usize,
    first: usize,
    on_first: &mut dyn FnMut(&[u8]),
) -> Result<Vec<u8>, Error> {
    let mut stream = SpanStream::start(checkpoint, compressed)?;
    let mut out = vec![0u8; len];
    let first = first.min(len);
    stream.fill(&mut out[..first])?;
    on_first(&out[..first]);
    stream.fill(&mut out[first..])?;
    Ok(out)
}

/// An inflater set up at a checkpoint, reading from the span's compressed bytes.
struct SpanStream<'a> {
    inflater: RawInflater,
    input: &'a [u8],
    /// Bytes inflated so far, for errors.
    produced: u64,
    start: u64,
}

impl<'a> SpanStream<'a> {
    fn start(checkpoint: &Checkpoint, compressed: &'a [u8]) -> Result<Self, Error> {
        if checkpoint.bits > 7 {
            return Err(Error::BadCheckpoint("more than 7 bits in a byte"));
        }
        if checkpoint.window.len() > WINDOW_SIZE {
            return Err(Error::BadCheckpoint("window over 32 KiB"));
        }
        let corrupt = |code| Error::Corrupt {
            offset: checkpoint.input_start(),
            code,
        };
        let mut inflater = RawInflater::new(-15).map_err(corrupt)?;
        let mut input = compressed;
        if checkpoint.bits > 0 {
            let (&first, rest) = input
                .split_first()
                .ok_or(Error::ShortSpan { wanted: 1, got: 0 })?;
            inflater
                .prime(checkpoint.bits, first >> (8 - checkpoint.bits))
                .map_err(corrupt)?;
            input = rest;
        }
        inflater
            .set_dictionary(&checkpoint.window)
            .map_err(corrupt)?;
        Ok(SpanStream {
            inflater,
            input,
            produced: 0,
            start: checkpoint.input_start(),
        })
    }

    /// Inflates exactly `out.len()` bytes into `out`.
    fn fill(&mut self, out: &mut [u8]) -> Result<(), Error> {
        let mut filled = 0;
        while filled < out.len() {
            let start = self.start;
            let step = self
                .inflater
                .inflate(self.input, &mut out[filled..], false)
                .map_err(|code| Error::Corrupt {
                    offset: start,
                    code,
                })?;
            self.input = &self.input[step.consumed..];
            filled += step.produced;
            self.produced += step.produced as u64;
            let stuck = step.consumed == 0 && step.produced == 0;
            if (step.step == Step::End || stuck) && filled < out.len() {
                return Err(Error::ShortSpan {
                    wanted: self.produced + (out.len() - filled) as u64,
                    got: self.produced,
                });
            }
        }
        Ok(())
    }

    /// Inflates and drops `n` bytes.
    fn skip(&mut self, n: u64) -> Result<(), Error> {
        let mut scratch = vec![0u8; n.min(64 << 10) as usize];
        let mut left = n;
        while left > 0 {
            let step = left.min(scratch.len() as u64) as usize;
            self.fill(&mut scratch[..step])?;
            left -= step as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Text-like bytes with repeats near and far, so blocks use back-references and
    /// their boundaries fall mid-byte.
    fn sample(len: usize, seed: u64) -> Vec<u8> {
        let words = [
            "lazy", "snap", "gzip", "span", "window", "block", "layer", "\n",
        ];
        let mut state = seed;
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = (state >> 33) as usize;
            if r.is_multiple_of(97) && out.len() > 40_000 {
                // A copy from far back (within the window) now and then.
                let from = out.len() - 30_000 - r % 2_000;
                let chunk: Vec<u8> = out[from..from + 200].to_vec();
                out.extend_from_slice(&chunk);
            } else if r.is_multiple_of(13) {
                out.push((r >> 8) as u8);
            } else {
                out.extend_from_slice(words[r % words.len()].as_bytes());
                out.push(b' ');
            }
        }
        out.truncate(len);
        out
    }

    fn gzip(data: &[u8], level: u32) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    fn read_via(points: &[Checkpoint], gz: &[u8], offset: u64, len: usize) -> Vec<u8> {
        let cp = points
            .iter()
            .rev()
            .find(|p| p.uncompressed_offset <= offset)
            .unwrap();
        let start = cp.input_start() as usize;
        inflate_from(cp, &gz[start..], offset - cp.uncompressed_offset, len).unwrap()
    }

    #[test]
    fn every_checkpoint_reads_on_right_at_any_offset() {
        let data = sample(3 << 20, 7);
        // Level 1 (zlib-rs's quick strategy) writes one long block: few boundaries.
        for level in [2, 6, 9] {
            let gz = gzip(&data, level);
            let points = build_checkpoints(&gz[..], 64 << 10).unwrap();
            assert!(points.len() > 5, "level {level}: {} points", points.len());
            assert_eq!(points[0].uncompressed_offset, 0);
            assert!(
                points.iter().any(|p| p.bits != 0),
                "level {level}: no block started mid-byte, so priming went untested"
            );
            for pair in points.windows(2) {
                assert!(pair[1].uncompressed_offset - pair[0].uncompressed_offset > 64 << 10);
            }
            // The window is the output's last 32 KiB exactly (zlib-rs writes scratch
            // past its output: a window inflated in place came out wrong at its start,
            // which only far back-references would notice).
            for p in &points[1..] {
                let at = p.uncompressed_offset as usize;
                assert!(
                    p.window[..] == data[at - WINDOW_SIZE..at],
                    "level {level}, at {at}"
                );
            }
            for (i, cp) in points.iter().enumerate() {
                let at = cp.uncompressed_offset as usize;
                let len = 70_000.min(data.len() - at);
                assert_eq!(
                    read_via(&points, &gz, at as u64, len),
                    &data[at..at + len],
                    "level {level}, checkpoint {i} (bits {})",
                    cp.bits
                );
            }
            for offset in [1u64, 40_000, 1 << 20, 2_000_001, data.len() as u64 - 10] {
                let len = 5_000.min(data.len() - offset as usize);
                let o = offset as usize;
                assert_eq!(read_via(&points, &gz, offset, len), &data[o..o + len]);
            }
        }
    }

    #[test]
    fn stored_blocks_and_empty_streams_are_indexed_too() {
        let data = sample(1 << 20, 3);
        let gz = gzip(&data, 0);
        let points = build_checkpoints(&gz[..], 100_000).unwrap();
        assert!(points.len() > 5);
        assert_eq!(
            read_via(&points, &gz, 500_000, 1000),
            &data[500_000..501_000]
        );
        let empty = gzip(b"", 6);
        let points = build_checkpoints(&empty[..], 100_000).unwrap();
        assert!(points.len() <= 1);
    }

    #[test]
    fn bad_streams_get_errors_not_checkpoints() {
        let data = sample(600_000, 11);
        let gz = gzip(&data, 6);
        assert!(matches!(
            build_checkpoints(&gz[..gz.len() / 2], 64 << 10),
            Err(Error::Truncated(_))
        ));
        let mut corrupt = gz.clone();
        for b in &mut corrupt[1000..1100] {
            *b ^= 0x5a;
        }
        assert!(matches!(
            build_checkpoints(&corrupt[..], 64 << 10),
            Err(Error::Corrupt { .. })
        ));
        let mut two = gz.clone();
        two.extend_from_slice(&gzip(b"more", 6));
        assert!(matches!(
            build_checkpoints(&two[..], 64 << 10),
            Err(Error::TrailingData(_))
        ));
        assert!(build_checkpoints(&b"not gzip at all"[..], 64 << 10).is_err());
    }

    #[test]
    fn a_span_cut_short_or_a_bad_checkpoint_is_an_error() {
        let data = sample(1 << 20, 5);
        let gz = gzip(&data, 6);
        let points = build_checkpoints(&gz[..], 128 << 10).unwrap();
        let cp = &points[2];
        let start = cp.input_start() as usize;
        let short = &gz[start..start + 100];
        assert!(matches!(
            inflate_from(cp, short, 0, 100_000),
            Err(Error::ShortSpan { .. })
        ));
        let mut bad = cp.clone();
        bad.bits = 9;
        assert!(matches!(
            inflate_from(&bad, &gz[start..], 0, 10),
            Err(Error::BadCheckpoint(_))
        ));
        bad = cp.clone();
        bad.window.push(0);
        assert!(matches!(
            inflate_from(&bad, &gz[start..], 0, 10),
            Err(Error::BadCheckpoint(_))
        ));
        // A wrong window inflates to wrong bytes or fails: why spans are verified by
        // digest before use and the output checked by the layer's own digests.
        bad = cp.clone();
        bad.window.iter_mut().for_each(|b| *b = b'x');
        let got = inflate_from(&bad, &gz[start..], 0, 50_000);
        let at = cp.uncompressed_offset as usize;
        assert!(got.is_err() || got.unwrap() != data[at..at + 50_000]);
    }
}
