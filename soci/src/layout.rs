//! A zTOC checked and laid out for serving a layer: the spans (compressed range, digest,
//! checkpoint), and for each file the pieces of it that each span holds. Everything a
//! crafted zTOC could get wrong without being malformed FlatBuffers is refused here,
//! before any byte is served: spans that go back or past the layer, checkpoint and digest
//! counts that disagree, files that overlap, run past the tar or start before their
//! header could end. A span's bytes are checked against its digest before they are
//! inflated, and its inflated end against the next checkpoint's window.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use estargz::{Cancel, Format, Index, Sha256Sum, SpanSource, TocEntry};
use sha2::Digest as _;
use sha2::Sha256;

use crate::checkpoint_blob::{self, BlobError};
use crate::gzip_checkpoints::{self, Checkpoint, WINDOW_SIZE};
use crate::ztoc::{Compression, FileMetadata, Ztoc};

/// Largest span accepted: its whole output is inflated at once.
pub const MAX_SPAN_OUTPUT: u64 = 64 << 20;
const TAR_BLOCK: i64 = 512;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("the zTOC's checkpoints: {0}")]
    Checkpoints(#[from] BlobError),
    #[error("only gzip layers are served lazily")]
    NotGzip,
    #[error("the zTOC says {digests} span digests and {points} checkpoints, max span id {max}")]
    SpanCount {
        digests: usize,
        points: usize,
        max: i32,
    },
    #[error("span digest {0} is not sha256:<64 hex digits>")]
    Digest(usize),
    #[error("span {0}: {1}")]
    Span(usize, &'static str),
    #[error("entry {index} ({name}): {what}")]
    Entry {
        index: usize,
        name: String,
        what: &'static str,
    },
    #[error("archive sizes {compressed} / {uncompressed} are impossible")]
    Sizes { compressed: i64, uncompressed: i64 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpanError {
    #[error("span {0}: its compressed bytes do not match the span digest")]
    Digest(usize),
    #[error("span {0}: {1}")]
    Inflate(usize, String),
    #[error("span {0} does not end where the next checkpoint starts")]
    Window(usize),
}

#[derive(Debug, Clone)]
pub struct Span {
    /// Compressed range to fetch: from the checkpoint's first input byte to the next
    /// checkpoint (the layer's end for the last).
    pub compressed: std::ops::Range<u64>,
    /// The part of the tar the span inflates to.
    pub uncompressed: std::ops::Range<u64>,
    pub digest: [u8; 32],
    checkpoint: Checkpoint,
}

/// Part of a file that one span holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub span: usize,
    /// Where the piece starts in the span's output.
    pub span_offset: u64,
    /// Where the piece starts in the file.
    pub file_offset: u64,
    pub len: u64,
}

#[derive(Debug)]
pub struct Layout {
    pub files: Vec<FileMetadata>,
    pub spans: Vec<Span>,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
}

impl Layout {
    pub fn check(ztoc: Ztoc) -> Result<Layout, LayoutError> {
        if ztoc.compression != Compression::Gzip {
            return Err(LayoutError::NotGzip);
        }
        let (compressed_size, uncompressed_size) = match (
            u64::try_from(ztoc.compressed_archive_size),
            u64::try_from(ztoc.uncompressed_archive_size),
        ) {
            (Ok(c), Ok(u)) if c > 0 => (c, u),
            _ => {
                return Err(LayoutError::Sizes {
                    compressed: ztoc.compressed_archive_size,
                    uncompressed: ztoc.uncompressed_archive_size,
                });
            }
        };
        let points = checkpoint_blob::decode(&ztoc.checkpoints)?.points;
        let count_error = LayoutError::SpanCount {
            digests: ztoc.span_digests.len(),
            points: points.len(),
            max: ztoc.max_span_id,
        };
        if points.len() != ztoc.span_digests.len()
            || i64::from(ztoc.max_span_id) + 1 != points.len() as i64
        {
            return Err(count_error);
        }
        let spans = lay_spans(
            points,
            &ztoc.span_digests,
            compressed_size,
            uncompressed_size,
        )?;
        check_files(&ztoc.files, uncompressed_size)?;
        Ok(Layout {
            files: ztoc.files,
            spans,
            compressed_size,
            uncompressed_size,
        })
    }

    /// The span holding byte `offset` of the tar.
    pub fn span_at(&self, offset: u64) -> usize {
        self.spans
            .partition_point(|s| s.uncompressed.start <= offset)
            .saturating_sub(1)
    }

    /// The pieces of file `index`'s data, one per span it touches, in order.
    pub fn pieces(&self, index: usize) -> Vec<Piece> {
        let f = &self.files[index];
        let (start, len) = (f.uncompressed_offset as u64, f.uncompressed_size as u64);
        let mut pieces = Vec::new();
        let mut at = start;
        while at < start + len {
            let span = self.span_at(at);
            let s = &self.spans[span];
            let end = (start + len).min(s.uncompressed.end);
            pieces.push(Piece {
                span,
                span_offset: at - s.uncompressed.start,
                file_offset: at - start,
                len: end - at,
            });
            at = end;
        }
        pieces
    }

    /// Checks `compressed` (span `i`'s whole compressed range) against its digest and
    /// inflates the span; the output's end must be the next checkpoint's window.
    pub fn inflate_span(&self, i: usize, compressed: &[u8]) -> Result<Vec<u8>, SpanError> {
        self.inflate_span_staged(i, compressed, 0, &mut |_| {})
    }

    /// [`Layout::inflate_span`], handing the output's first `first` bytes to `on_first`
    /// as soon as they are out (the span's bytes checked against its digest already),
    /// before the rest is inflated and the end checked against the next window.
    pub fn inflate_span_staged(
        &self,
        i: usize,
        compressed: &[u8],
        first: usize,
        on_first: &mut dyn FnMut(&[u8]),
    ) -> Result<Vec<u8>, SpanError> {
        let span = &self.spans[i];
        let want_len = span.compressed.end - span.compressed.start;
        if compressed.len() as u64 != want_len || Sha256::digest(compressed)[..] != span.digest {
            return Err(SpanError::Digest(i));
        }
        let len = (span.uncompressed.end - span.uncompressed.start) as usize;
        let out =
            gzip_checkpoints::inflate_staged(&span.checkpoint, compressed, len, first, on_first)
                .map_err(|e| SpanError::Inflate(i, e.to_string()))?;
        if let Some(next) = self.spans.get(i + 1) {
            // The window ends with this span's output (and the previous window before it).
            let window = &next.checkpoint.window;
            let from_out = len.min(WINDOW_SIZE);
            let ours = &out[len - from_out..];
            let carried =
                &span.checkpoint.window[span.checkpoint.window.len() - (WINDOW_SIZE - from_out)..];
            if window.len() != WINDOW_SIZE
                || window[WINDOW_SIZE - from_out..] != *ours
                || window[..WINDOW_SIZE - from_out] != *carried
            {
                return Err(SpanError::Window(i));
            }
        }
        Ok(out)
    }
}

impl Layout {
    /// The span whose compressed range starts at `comp_offset`.
    pub fn span_starting_at(&self, comp_offset: u64) -> Option<usize> {
        self.spans
            .binary_search_by_key(&comp_offset, |s| s.compressed.start)
            .ok()
    }

    /// The layer's file tree as an estargz index whose chunks are span pieces: a piece's
    /// compressed range is its span's, its inner offset where it starts in the span's
    /// output, and its digest a name for the piece (the cache's key), made from the
    /// zTOC's digest, the span and the piece's place in it. `source_len` (the zTOC's
    /// size) bounds the directories the entries may imply.
    /// Pieces of the spans in `prefetch` (span ids, from a prefetch artifact) are marked
    /// for the prefetch.
    pub fn index(
        &self,
        ztoc_digest: &Sha256Sum,
        source_len: u64,
        prefetch: &[std::ops::RangeInclusive<u32>],
        cancel: &Cancel,
    ) -> Result<Index, estargz::Error> {
        let mut failure = None;
        let stream =
            (0..self.files.len()).flat_map(|i| match self.entries_of(i, ztoc_digest, prefetch) {
                Ok(entries) => entries,
                Err(e) => {
                    failure.get_or_insert(e);
                    Vec::new()
                }
            });
        let index = Index::from_entries(
            stream,
            self.compressed_size,
            Format::Soci,
            source_len,
            cancel,
        );
        match failure {
            Some(e) => Err(e),
            None => index,
        }
    }

    /// File `i` as TOC entries: one for the file and its first piece, one per further
    /// piece.
    fn entries_of(
        &self,
        i: usize,
        ztoc_digest: &Sha256Sum,
        prefetch: &[std::ops::RangeInclusive<u32>],
    ) -> Result<Vec<TocEntry>, estargz::Error> {
        let f = &self.files[i];
        let name = String::from_utf8(f.name.clone()).map_err(|_| {
            estargz::Error::bad_entry(&String::from_utf8_lossy(&f.name), "name is not UTF-8")
        })?;
        let text = |b: &[u8], what: &str| {
            String::from_utf8(b.to_vec())
                .map_err(|_| estargz::Error::bad_entry(&name, format!("{what} is not UTF-8")))
        };
        let mut xattrs = std::collections::BTreeMap::new();
        for (key, value) in &f.pax_records {
            if let Some(attr) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.insert(text(attr, "xattr name")?, BASE64.encode(value));
            }
        }
        let mut file = TocEntry {
            name: name.clone(),
            kind: f.kind.clone(),
            size: if f.kind == "reg" {
                f.uncompressed_size
            } else {
                0
            },
            modtime: f.mod_time.clone(),
            link_name: text(&f.linkname, "link name")?,
            mode: f.mode,
            uid: i64::from(f.uid),
            gid: i64::from(f.gid),
            user_name: text(&f.uname, "user name")?,
            group_name: text(&f.gname, "group name")?,
            dev_major: f.devmajor,
            dev_minor: f.devminor,
            xattrs,
            ..TocEntry::default()
        };
        if f.kind != "reg" {
            return Ok(vec![file]);
        }
        let pieces = self.pieces(i);
        let mut entries = Vec::with_capacity(pieces.len());
        for (n, p) in pieces.iter().enumerate() {
            let span = &self.spans[p.span];
            let mut key = Vec::with_capacity(32 + 24);
            key.extend_from_slice(&ztoc_digest.0);
            key.extend_from_slice(&(p.span as u64).to_le_bytes());
            key.extend_from_slice(&p.span_offset.to_le_bytes());
            key.extend_from_slice(&p.len.to_le_bytes());
            let chunk = TocEntry {
                offset: span.compressed.start as i64,
                end_offset: span.compressed.end as i64,
                chunk_offset: p.file_offset as i64,
                chunk_size: p.len as i64,
                chunk_digest: Sha256Sum::of(&key).to_string(),
                inner_offset: p.span_offset as i64,
                prefetch: prefetch.iter().any(|r| r.contains(&(p.span as u32))),
                ..TocEntry::default()
            };
            entries.push(if n == 0 {
                TocEntry {
                    offset: chunk.offset,
                    end_offset: chunk.end_offset,
                    chunk_offset: chunk.chunk_offset,
                    chunk_size: chunk.chunk_size,
                    chunk_digest: chunk.chunk_digest,
                    inner_offset: chunk.inner_offset,
                    prefetch: chunk.prefetch,
                    ..std::mem::take(&mut file)
                }
            } else {
                TocEntry {
                    name: name.clone(),
                    kind: "chunk".into(),
                    ..chunk
                }
            });
        }
        if entries.is_empty() {
            entries.push(file);
        }
        Ok(entries)
    }
}

impl SpanSource for Layout {
    fn inflate_span(&self, comp_offset: u64, compressed: &[u8]) -> estargz::Result<Vec<u8>> {
        SpanSource::inflate_span_staged(self, comp_offset, compressed, 0, &mut |_| {})
    }

    fn inflate_span_staged(
        &self,
        comp_offset: u64,
        compressed: &[u8],
        first: usize,
        on_first: &mut dyn FnMut(&[u8]),
    ) -> estargz::Result<Vec<u8>> {
        let span =
            self.span_starting_at(comp_offset)
                .ok_or_else(|| estargz::Error::Decompress {
                    what: format!("span at {comp_offset}"),
                    reason: "no span starts there".into(),
                })?;
        Layout::inflate_span_staged(self, span, compressed, first, on_first).map_err(|e| {
            estargz::Error::Decompress {
                what: format!("span {span} at {comp_offset}"),
                reason: e.to_string(),
            }
        })
    }
}

fn lay_spans(
    points: Vec<Checkpoint>,
    digests: &[String],
    compressed_size: u64,
    uncompressed_size: u64,
) -> Result<Vec<Span>, LayoutError> {
    let mut spans: Vec<Span> = Vec::with_capacity(points.len());
    let starts: Vec<(u64, u64)> = points
        .iter()
        .map(|p| (p.compressed_offset, p.uncompressed_offset))
        .collect();
    for (i, (point, digest)) in points.into_iter().zip(digests).enumerate() {
        let digest = parse_digest(digest).ok_or(LayoutError::Digest(i))?;
        let (compressed_end, uncompressed_end) = match starts.get(i + 1) {
            Some(&(c, u)) => (c, u),
            None => (
                compressed_size,
                uncompressed_size.max(point.uncompressed_offset),
            ),
        };
        let compressed = point.input_start()..compressed_end;
        let uncompressed = point.uncompressed_offset..uncompressed_end;
        if i == 0 && point.uncompressed_offset != 0 {
            return Err(LayoutError::Span(
                i,
                "the first span does not start the tar",
            ));
        }
        let after_previous = spans
            .last()
            .is_none_or(|previous| previous.compressed.start < compressed.start);
        if !after_previous || compressed.start >= compressed.end || compressed.end > compressed_size
        {
            return Err(LayoutError::Span(
                i,
                "compressed range empty, reversed or past the layer",
            ));
        }
        if uncompressed.start > uncompressed.end
            || (i + 1 < starts.len() && uncompressed.start == uncompressed.end)
        {
            return Err(LayoutError::Span(i, "uncompressed range empty or reversed"));
        }
        if uncompressed.end - uncompressed.start > MAX_SPAN_OUTPUT {
            return Err(LayoutError::Span(i, "inflates to more than 64 MiB"));
        }
        spans.push(Span {
            compressed,
            uncompressed,
            digest,
            checkpoint: point,
        });
    }
    Ok(spans)
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).filter(|_| !c.is_ascii_uppercase());
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

/// Files in tar order, each after the header that must precede it, none past the tar.
fn check_files(files: &[FileMetadata], uncompressed_size: u64) -> Result<(), LayoutError> {
    let mut next_header = 0i64;
    for (index, f) in files.iter().enumerate() {
        let bad = |what| LayoutError::Entry {
            index,
            name: String::from_utf8_lossy(&f.name).into_owned(),
            what,
        };
        if f.uncompressed_offset < 0 || f.uncompressed_size < 0 {
            return Err(bad("negative offset or size"));
        }
        if f.uncompressed_offset < next_header + TAR_BLOCK {
            return Err(bad("data starts before its header could end"));
        }
        let end = f
            .uncompressed_offset
            .checked_add(f.uncompressed_size)
            .filter(|&e| e as u64 <= uncompressed_size)
            .ok_or(bad("data runs past the tar"))?;
        if f.kind != "reg" && f.uncompressed_size != 0 && f.kind != "hardlink" {
            return Err(bad("a non-file entry with data"));
        }
        next_header = end + (TAR_BLOCK - end % TAR_BLOCK) % TAR_BLOCK;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ztoc_builder::build_ztoc;
    use std::io::{Read, Write};

    fn layer(files: &[(&str, Vec<u8>)]) -> (tempfile::NamedTempFile, Vec<u8>) {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, &data[..]).unwrap();
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(&tar.into_inner().unwrap()).unwrap();
        let gz = gz.finish().unwrap();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&gz).unwrap();
        (file, gz)
    }

    /// Letters from a few, at random: compressible, with many short blocks.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 59) as u8 % 7 + b'a'
            })
            .collect()
    }

    #[test]
    fn every_file_reads_back_from_its_pieces() {
        let files = [
            ("a", noise(100, 1)),
            ("big", noise(2_000_000, 2)),
            ("b", noise(70_000, 3)),
            ("empty", Vec::new()),
        ];
        let (file, gz) = layer(&files);
        let layout = Layout::check(build_ztoc(file.as_file(), 256 << 10, "t").unwrap()).unwrap();
        assert!(layout.spans.len() > 3);
        let spans: Vec<Vec<u8>> = (0..layout.spans.len())
            .map(|i| {
                let r = &layout.spans[i].compressed;
                layout
                    .inflate_span(i, &gz[r.start as usize..r.end as usize])
                    .unwrap()
            })
            .collect();
        for (index, (name, data)) in files.iter().enumerate() {
            assert_eq!(layout.files[index].name, name.as_bytes());
            let mut got = Vec::new();
            for p in layout.pieces(index) {
                assert_eq!(p.file_offset as usize, got.len());
                let s = &spans[p.span];
                got.extend_from_slice(&s[p.span_offset as usize..(p.span_offset + p.len) as usize]);
            }
            assert_eq!(&got, data, "{name}");
        }
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(spans.concat(), tar[..layout.uncompressed_size as usize]);
    }

    #[test]
    fn bad_spans_and_crafted_ztocs_are_refused() {
        let (file, gz) = layer(&[("big", noise(1_000_000, 9))]);
        let z = build_ztoc(file.as_file(), 128 << 10, "t").unwrap();
        let layout = Layout::check(z.clone()).unwrap();
        let r = layout.spans[1].compressed.clone();
        let mut bytes = gz[r.start as usize..r.end as usize].to_vec();
        bytes[10] ^= 1;
        assert_eq!(layout.inflate_span(1, &bytes), Err(SpanError::Digest(1)));

        let refused = |change: &dyn Fn(&mut Ztoc)| {
            let mut bad = z.clone();
            change(&mut bad);
            Layout::check(bad).unwrap_err()
        };
        refused(&|z| z.max_span_id += 1);
        refused(&|z| z.span_digests[0] = "sha256:00".into());
        refused(&|z| z.compressed_archive_size = 100);
        refused(&|z| z.files[0].uncompressed_offset = 0);
        refused(&|z| z.files[0].uncompressed_size = z.uncompressed_archive_size);
        refused(&|z| z.checkpoints.truncate(100));
        let mut two = z.clone();
        two.files.push(two.files[0].clone());
        assert!(Layout::check(two).is_err(), "overlapping files");

        // A checkpoint whose window is not what the span before it ends with.
        let mut points = checkpoint_blob::decode(&z.checkpoints).unwrap();
        points.points[2].window[WINDOW_SIZE - 1] ^= 1;
        let mut crafted = z.clone();
        crafted.checkpoints = checkpoint_blob::encode(&points);
        let layout = Layout::check(crafted).unwrap();
        let r = layout.spans[1].compressed.clone();
        assert_eq!(
            layout.inflate_span(1, &gz[r.start as usize..r.end as usize]),
            Err(SpanError::Window(1))
        );
    }
}
