//! Each regular file's chunk table: chunks taken from its `reg` and `chunk` entries and
//! checked to tile the file, then placed in the index with their compressed ends.

use super::{Builder, nonneg_u64};
use crate::digest::Sha256Sum;
use crate::error::{Error, Result};
use crate::footer::Format;
use crate::index::{Chunk, EntryKind, Index, MAX_CHUNK_SIZE, NodeId, normalize_path};
use crate::toc::TocEntry;

/// A chunk before its compressed end is known.
#[derive(Clone, Copy)]
pub(super) struct RawChunk {
    pub(super) offset: u64,
    /// zstd:chunked: where the frame ends (0: not said).
    explicit_end: u64,
    file_offset: u64,
    size: u64,
    digest: Sha256Sum,
    inner: u32,
    zeros: bool,
    prefetch: bool,
}

/// The regular file whose `chunk` entries may follow.
pub(super) struct OpenFile {
    node: u32,
    path: String,
    size: u64,
    first_chunk: usize,
    /// The `reg` entry's own digest: the chunk digest of a one-chunk zstd:chunked file.
    file_digest: Option<Sha256Sum>,
    end_offset: u64,
    /// The last chunk said "to the end of the file" (chunkSize 0): none may follow.
    open_ended: bool,
    /// The first chunk came without a chunkDigest (only right for a one-chunk file).
    first_undigested: bool,
}

impl Builder<'_> {
    pub(super) fn open_file(&mut self, node: u32, e: &TocEntry, path: String) -> Result<()> {
        let size = self.nodes[node as usize].size;
        let file_digest = if e.digest.is_empty() {
            None
        } else {
            e.digest.parse().ok()
        };
        let end_offset = nonneg_u64(e.end_offset, &path, "endOffset")?;
        self.file = Some(OpenFile {
            node,
            path,
            size,
            first_chunk: self.raw_chunks.len(),
            file_digest,
            end_offset,
            open_ended: false,
            first_undigested: false,
        });
        if size == 0 {
            return Ok(());
        }
        self.push_chunk(e)
    }

    pub(super) fn push_chunk_entry(&mut self, e: &TocEntry) -> Result<()> {
        let Some(file) = &self.file else {
            return Err(Error::bad_entry(&e.name, "chunk entry without its file"));
        };
        if normalize_path(&e.name)? != file.path {
            return Err(Error::bad_entry(&e.name, "chunk entry without its file"));
        }
        if file.size == 0 {
            return Err(Error::bad_entry(&file.path, "empty file with chunks"));
        }
        self.push_chunk(e)
    }

    /// One chunk of the open file, checked against the ones before it.
    fn push_chunk(&mut self, e: &TocEntry) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Err(Error::bad_entry(&e.name, "chunk entry without its file"));
        };
        let path = file.path.as_str();
        let previous = self.raw_chunks[file.first_chunk..].last().copied();
        if file.open_ended || (previous.is_some() && file.first_undigested) {
            return Err(Error::bad_entry(
                path,
                if file.open_ended {
                    format!("chunk sizes do not add up to the file size {}", file.size)
                } else {
                    "chunk without chunkDigest".to_string()
                },
            ));
        }
        let offset = nonneg_u64(e.offset, path, "offset")?;
        if offset == 0 {
            return Err(Error::bad_entry(path, "chunk without an offset"));
        }
        let expect_off = previous.map_or(0, |p| p.file_offset + p.size);
        let file_offset = nonneg_u64(e.chunk_offset, path, "chunkOffset")?;
        if file_offset != expect_off {
            return Err(Error::bad_entry(
                path,
                format!("chunk at file offset {file_offset}, expected {expect_off}"),
            ));
        }
        let declared = nonneg_u64(e.chunk_size, path, "chunkSize")?;
        let rest = file.size - file_offset;
        // eStargz writes chunkSize 0 for "to the end of the file": only the last may.
        let size = if declared == 0 {
            file.open_ended = true;
            rest
        } else {
            declared
        };
        if size == 0 || size > rest {
            return Err(Error::bad_entry(
                path,
                format!("chunk sizes do not add up to the file size {}", file.size),
            ));
        }
        let digest = if e.chunk_digest.is_empty() {
            // zstd:chunked omits chunk fields for single-chunk files: the file digest is
            // the chunk digest (checked once the file is known to have one chunk).
            if previous.is_some() {
                return Err(Error::bad_entry(path, "chunk without chunkDigest"));
            }
            file.first_undigested = true;
            Sha256Sum::default()
        } else {
            e.chunk_digest.parse().map_err(|_| {
                Error::bad_entry(path, format!("bad chunkDigest {:?}", e.chunk_digest))
            })?
        };
        let inner = u32::try_from(e.inner_offset)
            .map_err(|_| Error::bad_entry(path, format!("innerOffset {}", e.inner_offset)))?;
        let zeros = match e.chunk_type.as_str() {
            "" => false,
            "zeros" => true,
            other => {
                return Err(Error::bad_entry(
                    path,
                    format!("unknown chunkType {other:?}"),
                ));
            }
        };
        if let Some(prev) = previous
            && (offset < prev.offset || (offset == prev.offset && inner <= prev.inner))
        {
            return Err(Error::bad_entry(path, "chunk offsets go backwards"));
        }
        // A SOCI span piece says where its span ends: spans that start mid-byte begin
        // a byte before the span in front of them ends, so no end can be inferred.
        let explicit_end = if self.format == Format::Soci {
            nonneg_u64(e.end_offset, path, "endOffset")?
        } else {
            0
        };
        self.raw_chunks.push(RawChunk {
            offset,
            explicit_end,
            file_offset,
            size,
            digest,
            inner,
            zeros,
            prefetch: e.prefetch,
        });
        Ok(())
    }

    /// The open file's chunks are all in: check that they tile it, and say where
    /// zstd:chunked frames end.
    pub(super) fn close_file(&mut self) -> Result<()> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let path = file.path.as_str();
        let chunks = &mut self.raw_chunks[file.first_chunk..];
        let covered = chunks.last().map_or(0, |c| c.file_offset + c.size);
        if covered != file.size {
            return Err(Error::bad_entry(
                path,
                format!("chunks cover {covered} bytes of a {}-byte file", file.size),
            ));
        }
        if file.first_undigested {
            chunks[0].digest = file
                .file_digest
                .ok_or_else(|| Error::bad_entry(path, "chunk without chunkDigest"))?;
        }
        // zstd:chunked says where each frame ends: the next chunk's frame, or endOffset.
        if self.format.is_zstd() {
            let n = chunks.len();
            for i in 0..n {
                chunks[i].explicit_end = if i + 1 < n {
                    Some(chunks[i + 1].offset)
                        .filter(|&e| e > chunks[i].offset)
                        .unwrap_or(0)
                } else {
                    file.end_offset
                };
            }
        }
        let count = u32::try_from(chunks.len()).map_err(|_| Error::bad_toc("too many chunks"))?;
        let node = &mut self.nodes[file.node as usize];
        node.a = u32::try_from(file.first_chunk).map_err(|_| Error::bad_toc("too many chunks"))?;
        node.b = count;
        Ok(())
    }

    /// Every file's chunks into the index, with their compressed ends.
    pub(super) fn place_chunks(
        &self,
        idx: &mut Index,
        mut starts: Vec<u64>,
        payload_end: u64,
    ) -> Result<()> {
        // Every distinct member start, to find where a member ends when the TOC does not
        // say (eStargz: the next larger offset, or the TOC).
        starts.sort_unstable();
        starts.dedup();
        let next_start = |off: u64| -> u64 {
            let i = starts.partition_point(|&s| s <= off);
            starts.get(i).copied().unwrap_or(payload_end)
        };
        let total: usize = idx
            .nodes
            .iter()
            .filter(|n| n.kind == EntryKind::Reg)
            .map(|n| n.b as usize)
            .sum();
        idx.chunks.reserve_exact(total);
        for id in 0..idx.nodes.len() {
            self.check_cancel(id)?;
            let node = idx.nodes[id];
            if node.kind != EntryKind::Reg {
                continue;
            }
            let raw = &self.raw_chunks[node.a as usize..(node.a + node.b) as usize];
            let first =
                u32::try_from(idx.chunks.len()).map_err(|_| Error::bad_toc("too many chunks"))?;
            for c in raw {
                if c.offset >= payload_end {
                    return Err(Error::bad_entry(
                        &idx.path_of(NodeId(id as u32)),
                        format!(
                            "chunk offset {} is not before the TOC at {payload_end}",
                            c.offset
                        ),
                    ));
                }
                let natural = match self.format {
                    Format::Soci if c.explicit_end > payload_end => {
                        return Err(Error::bad_entry(
                            &idx.path_of(NodeId(id as u32)),
                            format!("span ends at {}, past the blob", c.explicit_end),
                        ));
                    }
                    // Its end is the span's, and must be given (0 fails as reversed).
                    Format::Soci => c.explicit_end.max(c.offset + 1),
                    _ => next_start(c.offset),
                };
                let end = match c.explicit_end {
                    0 if self.format != Format::Soci => natural,
                    e if e > natural => {
                        return Err(Error::bad_entry(
                            &idx.path_of(NodeId(id as u32)),
                            format!(
                                "chunk range {}..{e} overlaps the member at {natural}",
                                c.offset
                            ),
                        ));
                    }
                    e if e <= c.offset => {
                        return Err(Error::bad_entry(
                            &idx.path_of(NodeId(id as u32)),
                            format!("chunk range {}..{e} is empty or reversed", c.offset),
                        ));
                    }
                    e => e,
                };
                if c.size > MAX_CHUNK_SIZE {
                    return Err(Error::bad_entry(
                        &idx.path_of(NodeId(id as u32)),
                        format!(
                            "a chunk of {} bytes: lazy mounts take chunks of at most \
                             {MAX_CHUNK_SIZE} bytes (converters write 4 MiB)",
                            c.size
                        ),
                    ));
                }
                idx.chunks.push(Chunk {
                    comp_offset: c.offset,
                    comp_end: end,
                    file_offset: c.file_offset,
                    size: c.size,
                    digest: c.digest,
                    inner_offset: c.inner,
                    zeros: c.zeros,
                    prefetch: c.prefetch,
                });
            }
            idx.nodes[id].a = first;
        }
        // Chunks that share a member must not claim the same decompressed bytes.
        let mut by_member: Vec<(u64, u64, u64)> = idx
            .chunks
            .iter()
            .map(|c| (c.comp_offset, c.inner_offset as u64, c.size))
            .collect();
        by_member.sort_unstable();
        for w in by_member.windows(2) {
            let (a, b) = (w[0], w[1]);
            if a.0 == b.0 && a.1 + a.2 > b.1 {
                return Err(Error::bad_toc(format!(
                    "chunks overlap inside the member at {}",
                    a.0
                )));
            }
        }
        Ok(())
    }
}
