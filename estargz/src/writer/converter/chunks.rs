//! A file's payload cut into chunks, each its own member (zstd: its own frame), with
//! the chunk fields of its TOC entries.

use std::io::Write;
use std::ops::Range;

use sha2::{Digest as _, Sha256};

use super::{Converter, Payload, PendingChunk};
use crate::digest::Sha256Sum;
use crate::error::{Error, Result};
use crate::index::normalize_path;
use crate::tar::TarHeader;
use crate::toc::TocEntry;
use crate::writer::OutputFormat;

/// Start-up ranges closer than this are joined: a separate chunk (and request) for a
/// gap this small costs more than its bytes.
const JOIN_GAP: u64 = 64 << 10;

/// Cuts a `size`-byte file into chunks of at most `chunk_size`, with extra cuts at the
/// page-aligned edges of `ranges`; a chunk is marked when it lies in a range.
fn plan_chunks(size: u64, chunk_size: u64, ranges: &[Range<u64>]) -> Vec<(u64, bool)> {
    const PAGE: u64 = 4096;
    let mut hot: Vec<Range<u64>> = ranges
        .iter()
        .map(|r| {
            (r.start / PAGE * PAGE).min(size)..r.end.div_ceil(PAGE).saturating_mul(PAGE).min(size)
        })
        .filter(|r| r.start < r.end)
        .collect();
    hot.sort_by_key(|r| r.start);
    let mut joined: Vec<Range<u64>> = Vec::new();
    for r in hot {
        match joined.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(JOIN_GAP) => {
                last.end = last.end.max(r.end)
            }
            _ => joined.push(r),
        }
    }
    let mut plan = Vec::new();
    let mut push = |from: u64, to: u64, marked: bool| {
        let mut at = from;
        while at < to {
            let n = chunk_size.min(to - at);
            plan.push((n, marked));
            at += n;
        }
    };
    let mut at = 0;
    for r in &joined {
        push(at, r.start, false);
        push(r.start, r.end, true);
        at = r.end;
    }
    push(at, size, false);
    plan
}

impl<W: Write> Converter<W> {
    /// The sizes of a file's chunks, each with whether it is marked for prefetch: cut
    /// at `chunk_size`, and also at the edges of the file's start-up ranges so that a
    /// marked chunk holds little that was not read.
    fn chunk_plan(&self, name: &str, size: u64) -> Result<Vec<(u64, bool)>> {
        let path = if self.prefetch_ranges.is_empty() {
            String::new()
        } else {
            normalize_path(name)?
        };
        let whole = self.marked_whole.contains(&path);
        let Some(ranges) = self.prefetch_ranges.get(&path) else {
            let n = size.div_ceil(self.chunk_size);
            return Ok((0..n)
                .map(|i| (self.chunk_size.min(size - i * self.chunk_size), whole))
                .collect());
        };
        Ok(plan_chunks(size, self.chunk_size, ranges))
    }

    pub(super) fn emit_payload(
        &mut self,
        h: &TarHeader,
        size: u64,
        first: usize,
        payload: &mut dyn Payload,
    ) -> Result<()> {
        let zstd = self.format != OutputFormat::Estargz;
        let cstorage = self.format == OutputFormat::ZstdChunked;
        // A file of one chunk has the chunk's digest: hash it once, not twice.
        let plan = self.chunk_plan(&h.name, size)?;
        let multi_chunk = plan.len() > 1;
        let mut file_hash = Sha256::new();
        // Only tar-split records CRC64s.
        let want_crc = self.tar_split.is_some();
        self.crc.reset();
        let mut buf = vec![0u8; 256 << 10];
        let mut file_off = 0u64;
        let mut chunk_meta: Vec<(usize, u64, u64, Sha256Sum, bool)> = Vec::new();
        for &(csize, prefetch) in &plan {
            let seq = self.start_member()?;
            let mut chunk_hash = Sha256::new();
            let mut all_zero = true;
            let mut left = csize;
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                let n = payload.read_payload(&mut buf[..want])?;
                if n == 0 {
                    return Err(Error::BadTar {
                        offset: self.uncompressed,
                        reason: format!("payload of {:?} ends early", h.name),
                    });
                }
                let data = &buf[..n];
                chunk_hash.update(data);
                if multi_chunk {
                    file_hash.update(data);
                }
                if want_crc {
                    self.crc.update(data);
                }
                all_zero = all_zero && data.iter().all(|&b| b == 0);
                self.put(data);
                left -= n as u64;
            }
            let entry = if file_off == 0 {
                first
            } else {
                self.entries.push(TocEntry {
                    name: h.name.clone(),
                    kind: "chunk".into(),
                    chunk_offset: file_off as i64,
                    ..Default::default()
                });
                self.entries.len() - 1
            };
            self.entries[entry].prefetch = prefetch;
            chunk_meta.push((
                entry,
                seq,
                csize,
                Sha256Sum::from_hasher(chunk_hash),
                all_zero,
            ));
            self.chunk_fixups.push(PendingChunk { entry, seq });
            file_off += csize;
            if zstd {
                // zstd:chunked: each payload chunk is exactly one frame.
                self.start_member()?;
            }
        }
        let file_digest = match chunk_meta.as_slice() {
            [(_, _, _, only, _)] if !multi_chunk => *only,
            _ => Sha256Sum::from_hasher(file_hash),
        };
        let n = chunk_meta.len();
        for (i, (entry, seq, csize, digest, zeros)) in chunk_meta.iter().enumerate() {
            let e = &mut self.entries[*entry];
            if cstorage {
                // c/storage omits chunk fields for single-chunk files.
                if n > 1 {
                    e.chunk_size = *csize as i64;
                    e.chunk_digest = digest.to_string();
                    if *zeros {
                        e.chunk_type = "zeros".into();
                    }
                }
            } else {
                e.chunk_size = if i + 1 == n { 0 } else { *csize as i64 };
                e.chunk_digest = digest.to_string();
            }
            if cstorage && i + 1 == n {
                self.end_fixups.push(PendingChunk {
                    entry: first,
                    seq: *seq,
                });
            }
        }
        self.entries[first].digest = file_digest.to_string();
        if let Some(ts) = &mut self.tar_split {
            ts.file(&h.name, size, Some(self.crc.sum()))?;
        }
        Ok(())
    }
}
