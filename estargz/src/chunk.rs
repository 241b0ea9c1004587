//! Decompressing and verifying single chunks: the piece the filesystem layer builds its
//! own fetching and caching on.

use std::io::Read;
use std::ops::Range;

use sha2::{Digest as _, Sha256};

use crate::digest::Sha256Sum;
use crate::error::{Error, Result};
use crate::footer::Format;
use crate::index::Chunk;

/// Largest buffer reserved up front for a read, whatever sizes the TOC claims.
pub(crate) const PREALLOC_LIMIT: u64 = 16 << 20;

/// Bytes inflated and hashed at a time (they stay in the CPU cache in between).
const STEP: usize = 64 << 10;

/// A decoder for exactly one gzip member or one zstd frame.
pub(crate) fn member_reader<'a>(
    format: Format,
    compressed: &'a [u8],
) -> Result<Box<dyn Read + 'a>> {
    if format == Format::Soci {
        // Spans are not members: the layer's span source inflates them.
        return Err(Error::Decompress {
            what: "SOCI span".into(),
            reason: "inflated only through its layer's span source".into(),
        });
    }
    if format.is_zstd() {
        let d = zstd::stream::read::Decoder::with_buffer(compressed)
            .map_err(|e| Error::Decompress {
                what: "zstd frame".into(),
                reason: e.to_string(),
            })?
            .single_frame();
        Ok(Box::new(d))
    } else {
        // GzDecoder (not MultiGzDecoder) stops at the end of the first member; the
        // bufread one inflates straight from the slice (the read one copies it into a
        // buffer of its own first).
        Ok(Box::new(flate2::bufread::GzDecoder::new(compressed)))
    }
}

fn read_some(r: &mut dyn Read, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<usize> {
    loop {
        match r.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::Decompress {
                    what: what(),
                    reason: e.to_string(),
                });
            }
        }
    }
}

/// Decompresses `chunk` from `compressed` (the blob bytes starting at
/// `chunk.comp_offset`, at least up to `chunk.comp_end`), hashes the whole chunk, and
/// returns the bytes of `window` (relative to the chunk's start) only if the digest
/// matches. Memory beyond the window stays constant, whatever the chunk's size.
pub fn decompress_chunk_window(
    format: Format,
    path: &str,
    chunk: &Chunk,
    compressed: &[u8],
    window: Range<u64>,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    inflate_window(format, path, chunk, compressed, window, &mut out)?;
    Ok(out)
}

/// Inflates and verifies the `window` of `chunk`, appended to `out`.
fn inflate_window(
    format: Format,
    path: &str,
    chunk: &Chunk,
    compressed: &[u8],
    window: Range<u64>,
    out: &mut Vec<u8>,
) -> Result<()> {
    let window = window.start.min(chunk.size)..window.end.min(chunk.size);
    let what = || format!("chunk of {path:?} at file offset {}", chunk.file_offset);
    let window_len = window.end.saturating_sub(window.start);
    // Sizes come from the TOC: reserve a bounded amount and let real data grow the rest.
    out.reserve(window_len.min(PREALLOC_LIMIT) as usize);
    let mut hasher = Sha256::new();
    if chunk.zeros {
        // zstd:chunked holes: no need to fetch or inflate; still check the digest so a
        // lying TOC cannot make us return zeros for real data.
        let actual = Sha256Sum::of_zeros(chunk.size);
        check(path, chunk, actual)?;
        out.resize(out.len() + window_len as usize, 0);
        return Ok(());
    }
    let need = chunk.comp_len() as usize;
    if compressed.len() < need {
        return Err(Error::Decompress {
            what: what(),
            reason: format!("{} compressed bytes, need {need}", compressed.len()),
        });
    }
    let mut r = member_reader(format, &compressed[..need])?;
    let whole = window.start == 0 && window.end == chunk.size;
    // Skipped bytes and partial windows pass through this; a whole chunk does not.
    let mut buf = if whole && chunk.inner_offset == 0 {
        Vec::new()
    } else {
        vec![0u8; STEP]
    };
    // Skip the bytes of other payloads that share the member.
    let mut skip = chunk.inner_offset as u64;
    while skip > 0 {
        let step = skip.min(STEP as u64) as usize;
        let n = read_some(&mut *r, &mut buf[..step], &what)?;
        if n == 0 {
            return Err(Error::Decompress {
                what: what(),
                reason: "member ends before the chunk starts".into(),
            });
        }
        skip -= n as u64;
    }
    let mut pos = 0u64;
    while pos < chunk.size {
        let want = (chunk.size - pos).min(STEP as u64) as usize;
        if whole {
            // The whole chunk: inflate straight into the output (one copy less), each
            // piece hashed while it is still in the CPU cache.
            let at = out.len();
            out.resize(at + want, 0);
            let n = read_some(&mut *r, &mut out[at..], &what)?;
            out.truncate(at + n);
            if n == 0 {
                return Err(Error::Decompress {
                    what: what(),
                    reason: format!("member ends after {pos} of {} bytes", chunk.size),
                });
            }
            hasher.update(&out[at..]);
            pos += n as u64;
            continue;
        }
        let n = read_some(&mut *r, &mut buf[..want], &what)?;
        if n == 0 {
            return Err(Error::Decompress {
                what: what(),
                reason: format!("member ends after {pos} of {} bytes", chunk.size),
            });
        }
        hasher.update(&buf[..n]);
        let (a, b) = (pos, pos + n as u64);
        let (lo, hi) = (a.max(window.start), b.min(window.end));
        if lo < hi {
            out.extend_from_slice(&buf[(lo - a) as usize..(hi - a) as usize]);
        }
        pos = b;
    }
    check(path, chunk, Sha256Sum::from_hasher(hasher))
}

/// Decompresses and verifies a whole chunk.
pub fn decompress_chunk(
    format: Format,
    path: &str,
    chunk: &Chunk,
    compressed: &[u8],
) -> Result<Vec<u8>> {
    decompress_chunk_window(format, path, chunk, compressed, 0..chunk.size)
}

/// [`decompress_chunk`] appended to `out`, so that a caller can reuse big buffers
/// instead of mapping fresh ones for every chunk, and choose where in them the bytes
/// start. On an error `out` is as it was.
pub fn decompress_chunk_into(
    format: Format,
    path: &str,
    chunk: &Chunk,
    compressed: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    let before = out.len();
    let result = inflate_window(format, path, chunk, compressed, 0..chunk.size, out);
    if result.is_err() {
        out.truncate(before);
    }
    result
}

fn check(path: &str, chunk: &Chunk, actual: Sha256Sum) -> Result<()> {
    if actual != chunk.digest {
        return Err(Error::ChunkVerification {
            path: path.to_string(),
            file_offset: chunk.file_offset,
            expected: chunk.digest.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}
