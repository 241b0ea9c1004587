//! Opening a layer through a [`BlobReader`]: footer, TOC, index, verified reads.

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;

use crate::blob::{BlobError, BlobErrorKind, BlobReader};
use crate::cancel::Cancel;
use crate::chunk::{decompress_chunk_window, member_reader};
use crate::digest::Sha256Sum;
use crate::error::{Error, Result};
use crate::footer::{Footer, Format, MAX_FOOTER_FETCH, parse_footer};
use crate::index::{Chunk, EntryKind, Index, NodeId, PARSE_MEMORY_FACTOR};
use crate::span_source::SpanSource;
use crate::tar::TarReader;
use crate::toc::{MAX_TOC_SIZE, TOC_TAR_NAME, Toc};

/// What to check while opening a layer.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// sha256 of the uncompressed TOC JSON (`containerd.io/snapshot/stargz/toc.digest`).
    pub expected_toc_digest: Option<Sha256Sum>,
    /// sha256 of the compressed TOC bytes
    /// (`io.github.containers.zstd-chunked.manifest-checksum`).
    pub expected_manifest_checksum: Option<Sha256Sum>,
    /// Largest TOC accepted, compressed and uncompressed.
    pub max_toc_size: u64,
    /// Stops the parse when set (its time ran out).
    pub cancel: Cancel,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            expected_toc_digest: None,
            expected_manifest_checksum: None,
            max_toc_size: MAX_TOC_SIZE,
            cancel: Cancel::default(),
        }
    }
}

/// A parsed TOC with the digests that identify it.
#[derive(Debug, Clone)]
pub struct ParsedToc {
    pub toc: Toc,
    /// sha256 of the uncompressed TOC JSON.
    pub toc_digest: Sha256Sum,
    /// sha256 of the compressed TOC bytes as stored in the blob.
    pub manifest_checksum: Sha256Sum,
}

/// A TOC's JSON, decompressed and checked against the digests asked for.
#[derive(Debug, Clone)]
pub struct TocJson {
    pub json: Vec<u8>,
    /// sha256 of the uncompressed TOC JSON.
    pub toc_digest: Sha256Sum,
    /// sha256 of the compressed TOC bytes as stored in the blob.
    pub manifest_checksum: Sha256Sum,
}

/// Inflated this much at a time, looking at the cancel flag in between.
const INFLATE_STEP: usize = 1 << 20;

/// The size of the TOC's JSON, from the footer (zstd) or the TOC's tar header (gzip),
/// without inflating the JSON: what a caller budgets memory by before parsing.
pub fn toc_json_size(footer: &Footer, compressed: &[u8]) -> Result<u64> {
    if footer.format.is_zstd() {
        return Ok(footer.toc_uncompressed_size.unwrap_or(0));
    }
    let mut tr = TarReader::new(member_reader(footer.format, compressed)?);
    let h = tr
        .next_header()
        .map_err(|e| Error::bad_toc(format!("TOC tar header: {e}")))?
        .ok_or_else(|| Error::bad_toc("TOC member holds no tar entry"))?;
    Ok(h.size)
}

/// Decompresses the TOC bytes located by `footer` and checks the digests that `opts`
/// asks for; stops when `opts.cancel` is set.
pub fn read_toc_json(footer: &Footer, compressed: &[u8], opts: &OpenOptions) -> Result<TocJson> {
    if footer.toc_compressed_size > opts.max_toc_size {
        return Err(Error::TocTooLarge {
            size: footer.toc_compressed_size,
            limit: opts.max_toc_size,
        });
    }
    if compressed.len() as u64 != footer.toc_compressed_size {
        return Err(Error::bad_toc(format!(
            "{} TOC bytes, the footer says {}",
            compressed.len(),
            footer.toc_compressed_size
        )));
    }
    let manifest_checksum = Sha256Sum::of(compressed);
    if let Some(expected) = opts.expected_manifest_checksum
        && expected != manifest_checksum
    {
        return Err(Error::TocDigestMismatch {
            expected: expected.to_string(),
            actual: manifest_checksum.to_string(),
        });
    }
    let json = if footer.format.is_zstd() {
        let ulen = footer.toc_uncompressed_size.unwrap_or(0);
        if ulen > opts.max_toc_size {
            return Err(Error::TocTooLarge {
                size: ulen,
                limit: opts.max_toc_size,
            });
        }
        // One byte more than announced shows a lying footer without inflating a bomb.
        let mut r = member_reader(footer.format, compressed)?.take(ulen + 1);
        let mut json = Vec::with_capacity(ulen as usize);
        loop {
            opts.cancel.check()?;
            let before = json.len();
            (&mut r)
                .take(INFLATE_STEP as u64)
                .read_to_end(&mut json)
                .map_err(|e| Error::Decompress {
                    what: "zstd TOC".into(),
                    reason: e.to_string(),
                })?;
            if json.len() == before {
                break;
            }
        }
        if json.len() as u64 != ulen {
            return Err(Error::bad_toc(format!(
                "TOC inflates to {} bytes or more, the footer says {ulen}",
                json.len()
            )));
        }
        json
    } else {
        let mut tr = TarReader::new(member_reader(footer.format, compressed)?);
        let h = tr
            .next_header()
            .map_err(|e| Error::bad_toc(format!("TOC tar header: {e}")))?
            .ok_or_else(|| Error::bad_toc("TOC member holds no tar entry"))?;
        if h.name != TOC_TAR_NAME {
            return Err(Error::bad_toc(format!(
                "TOC tar entry is {:?}, not {TOC_TAR_NAME}",
                h.name
            )));
        }
        if h.size > opts.max_toc_size {
            return Err(Error::TocTooLarge {
                size: h.size,
                limit: opts.max_toc_size,
            });
        }
        let mut json = vec![0u8; h.size as usize];
        let mut got = 0;
        while got < json.len() {
            opts.cancel.check()?;
            let end = json.len().min(got + INFLATE_STEP);
            let n = tr
                .read_data(&mut json[got..end])
                .map_err(|e| Error::bad_toc(format!("TOC JSON: {e}")))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        json
    };
    // Hashed a step at a time: 150 MB take a few hundred milliseconds.
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    for piece in json.chunks(INFLATE_STEP) {
        opts.cancel.check()?;
        sha2::Digest::update(&mut hasher, piece);
    }
    let toc_digest = Sha256Sum::from_hasher(hasher);
    if let Some(expected) = opts.expected_toc_digest
        && expected != toc_digest
    {
        return Err(Error::TocDigestMismatch {
            expected: expected.to_string(),
            actual: toc_digest.to_string(),
        });
    }
    Ok(TocJson {
        json,
        toc_digest,
        manifest_checksum,
    })
}

/// Decompresses and parses the TOC bytes located by `footer`, checking the digests that
/// `opts` asks for (the whole [`Toc`], for tools; mounting builds its index from the
/// JSON with [`Index::from_json`] instead).
pub fn parse_toc(footer: &Footer, compressed: &[u8], opts: &OpenOptions) -> Result<ParsedToc> {
    let TocJson {
        json,
        toc_digest,
        manifest_checksum,
    } = read_toc_json(footer, compressed, opts)?;
    let toc: Toc =
        serde_json::from_slice(&json).map_err(|e| Error::bad_toc(format!("TOC JSON: {e}")))?;
    Ok(ParsedToc {
        toc,
        toc_digest,
        manifest_checksum,
    })
}

/// A layer's footer and compressed TOC, read from its blob by [`fetch_toc`]: the
/// network part of opening a layer, before the CPU part ([`Layer::build`]).
#[derive(Debug, Clone)]
pub struct FetchedToc {
    pub blob_size: u64,
    pub footer: Footer,
    pub compressed: Bytes,
}

impl FetchedToc {
    /// The most memory building the layer's index from this TOC takes: the compressed
    /// bytes, the JSON, and [`PARSE_MEMORY_FACTOR`] times the JSON.
    pub fn parse_memory_bound(&self) -> Result<u64> {
        let json = toc_json_size(&self.footer, &self.compressed)?;
        Ok(self.compressed.len() as u64 + json.saturating_mul(1 + PARSE_MEMORY_FACTOR))
    }
}

/// Reads the footer and the compressed TOC of `blob` (two range reads).
pub async fn fetch_toc(blob: &dyn BlobReader, opts: &OpenOptions) -> Result<FetchedToc> {
    let blob_size = blob.size().await?;
    let tail_len = blob_size.min(MAX_FOOTER_FETCH);
    let tail = read_exact(blob, blob_size - tail_len, tail_len).await?;
    let footer = parse_footer(&tail, blob_size)?;
    if footer.toc_compressed_size > opts.max_toc_size {
        return Err(Error::TocTooLarge {
            size: footer.toc_compressed_size,
            limit: opts.max_toc_size,
        });
    }
    let compressed = read_exact(blob, footer.toc_offset, footer.toc_compressed_size).await?;
    Ok(FetchedToc {
        blob_size,
        footer,
        compressed,
    })
}

async fn read_exact(blob: &dyn BlobReader, offset: u64, len: u64) -> Result<Bytes> {
    let b = blob.read_at(offset, len).await?;
    if b.len() as u64 != len {
        return Err(BlobError::new(
            BlobErrorKind::ShortRead,
            format!("{} bytes at {offset}, asked for {len}", b.len()),
        )
        .into());
    }
    Ok(b)
}

/// An opened layer: its index plus the blob to fetch chunks from.
pub struct Layer {
    blob: Arc<dyn BlobReader>,
    blob_size: u64,
    footer: Footer,
    index: Index,
    toc_digest: Sha256Sum,
    manifest_checksum: Sha256Sum,
    /// A SOCI layer's spans; None for the formats whose chunks are members or frames.
    spans: Option<Arc<dyn SpanSource>>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("blob_size", &self.blob_size)
            .field("footer", &self.footer)
            .field("entries", &self.index.len())
            .field("toc_digest", &self.toc_digest)
            .finish()
    }
}

impl Layer {
    /// Reads the footer and the TOC (two range reads) and builds the index.
    pub async fn open(blob: Arc<dyn BlobReader>, opts: &OpenOptions) -> Result<Layer> {
        Layer::open_keeping_toc(blob, opts)
            .await
            .map(|(layer, _)| layer)
    }

    /// [`Layer::open`], also handing back the compressed TOC bytes it read, for a
    /// caller that keeps them (with [`Layer::footer`] and [`Layer::blob_size`], what
    /// [`Layer::from_json`] needs to open the layer again without reading the blob).
    pub async fn open_keeping_toc(
        blob: Arc<dyn BlobReader>,
        opts: &OpenOptions,
    ) -> Result<(Layer, Bytes)> {
        let fetched = fetch_toc(&*blob, opts).await?;
        let layer = Layer::build(blob, &fetched, opts)?;
        Ok((layer, fetched.compressed))
    }

    /// The CPU part of opening a layer: inflates, checks and indexes the TOC that
    /// [`fetch_toc`] read; stops when `opts.cancel` is set. Run it off async threads.
    pub fn build(
        blob: Arc<dyn BlobReader>,
        fetched: &FetchedToc,
        opts: &OpenOptions,
    ) -> Result<Layer> {
        let toc = read_toc_json(&fetched.footer, &fetched.compressed, opts)?;
        Layer::from_json(blob, fetched.blob_size, fetched.footer, &toc, &opts.cancel)
    }

    /// Builds a layer from a footer and TOC JSON obtained elsewhere (a local copy of a
    /// TOC fetched and verified earlier), without reading the blob.
    pub fn from_json(
        blob: Arc<dyn BlobReader>,
        blob_size: u64,
        footer: Footer,
        toc: &TocJson,
        cancel: &Cancel,
    ) -> Result<Layer> {
        let index = Index::from_json(&toc.json, footer.payload_end, footer.format, cancel)?;
        Ok(Layer {
            blob,
            blob_size,
            footer,
            index,
            toc_digest: toc.toc_digest,
            manifest_checksum: toc.manifest_checksum,
            spans: None,
        })
    }

    /// Builds a layer from a footer and a parsed TOC, without reading the blob.
    pub fn from_parts(
        blob: Arc<dyn BlobReader>,
        blob_size: u64,
        footer: Footer,
        parsed: &ParsedToc,
    ) -> Result<Layer> {
        let index = Index::from_toc(&parsed.toc, footer.payload_end, footer.format)?;
        Ok(Layer {
            blob,
            blob_size,
            footer,
            index,
            toc_digest: parsed.toc_digest,
            manifest_checksum: parsed.manifest_checksum,
            spans: None,
        })
    }

    /// A SOCI layer: an index built from its zTOC (chunks are span pieces) and the spans
    /// to inflate them from. `ztoc_digest` names the layer where others give the TOC's.
    pub fn from_spans(
        blob: Arc<dyn BlobReader>,
        blob_size: u64,
        index: Index,
        ztoc_digest: Sha256Sum,
        spans: Arc<dyn SpanSource>,
    ) -> Layer {
        Layer {
            blob,
            blob_size,
            footer: Format::soci_footer(blob_size),
            index,
            toc_digest: ztoc_digest,
            manifest_checksum: ztoc_digest,
            spans: Some(spans),
        }
    }

    /// Verifies and inflates the whole span that starts at `comp_offset` (SOCI layers
    /// only: the pieces of many files come out of one span, inflated once).
    pub fn inflate_span(&self, comp_offset: u64, compressed: &[u8]) -> Result<Vec<u8>> {
        match &self.spans {
            Some(spans) => spans.inflate_span(comp_offset, compressed),
            None => Err(Error::Decompress {
                what: format!("span at {comp_offset}"),
                reason: "not a SOCI layer".into(),
            }),
        }
    }

    /// [`Layer::inflate_span`], handing the output's first `first` bytes to `on_first`
    /// as soon as they are out.
    pub fn inflate_span_staged(
        &self,
        comp_offset: u64,
        compressed: &[u8],
        first: usize,
        on_first: &mut dyn FnMut(&[u8]),
    ) -> Result<Vec<u8>> {
        match &self.spans {
            Some(spans) => spans.inflate_span_staged(comp_offset, compressed, first, on_first),
            None => Err(Error::Decompress {
                what: format!("span at {comp_offset}"),
                reason: "not a SOCI layer".into(),
            }),
        }
    }

    /// One chunk of a SOCI layer: its span inflated, the piece cut out of it.
    fn span_piece(&self, chunk: &Chunk, compressed: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let len = compressed.len().min(chunk.comp_len() as usize);
        let span = self.inflate_span(chunk.comp_offset, &compressed[..len])?;
        let start = chunk.inner_offset as usize;
        let piece = span
            .get(start..start + chunk.size as usize)
            .ok_or_else(|| Error::Decompress {
                what: format!("span at {}", chunk.comp_offset),
                reason: format!(
                    "{} bytes, short of the piece at {start} of {} bytes",
                    span.len(),
                    chunk.size
                ),
            })?;
        out.extend_from_slice(piece);
        Ok(())
    }

    pub fn index(&self) -> &Index {
        &self.index
    }
    pub fn format(&self) -> Format {
        self.footer.format
    }
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
    /// The blob the layer reads from, for callers that fetch chunks themselves.
    pub fn blob(&self) -> &Arc<dyn BlobReader> {
        &self.blob
    }
    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }
    /// sha256 of the uncompressed TOC JSON.
    pub fn toc_digest(&self) -> Sha256Sum {
        self.toc_digest
    }
    /// sha256 of the compressed TOC bytes.
    pub fn manifest_checksum(&self) -> Sha256Sum {
        self.manifest_checksum
    }

    /// The chunks of a file (hardlinks resolved) that hold bytes `offset..offset+len`.
    pub fn chunks_for_range(&self, id: NodeId, offset: u64, len: u64) -> &[Chunk] {
        let e = self.index.entry(self.index.resolve(id));
        let chunks = e.chunks();
        let end = offset.saturating_add(len).min(e.size());
        if offset >= end {
            return &[];
        }
        let first = chunks.partition_point(|c| c.file_offset + c.size <= offset);
        let last = chunks.partition_point(|c| c.file_offset < end);
        &chunks[first..last.max(first)]
    }

    /// Decompresses and verifies one chunk of entry `id` from its compressed bytes.
    pub fn decompress_chunk(
        &self,
        id: NodeId,
        chunk: &Chunk,
        compressed: &[u8],
    ) -> Result<Vec<u8>> {
        if self.spans.is_some() {
            let mut out = Vec::new();
            self.span_piece(chunk, compressed, &mut out)?;
            return Ok(out);
        }
        let path = self.index.path_of(id);
        crate::chunk::decompress_chunk(self.footer.format, &path, chunk, compressed)
    }

    /// [`Layer::decompress_chunk`] appended to `out` (a reused buffer).
    pub fn decompress_chunk_into(
        &self,
        id: NodeId,
        chunk: &Chunk,
        compressed: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if self.spans.is_some() {
            return self.span_piece(chunk, compressed, out);
        }
        let path = self.index.path_of(id);
        crate::chunk::decompress_chunk_into(self.footer.format, &path, chunk, compressed, out)
    }

    /// Reads `len` bytes at `offset` of the file at `path` (fewer at the end of the
    /// file), fetching only the chunks involved and verifying each one.
    pub async fn read_file_range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let id = self.index.lookup(path).ok_or_else(|| Error::NotFound {
            path: path.to_string(),
        })?;
        self.read_range(id, offset, len).await
    }

    /// Like [`Layer::read_file_range`] for an entry id.
    pub async fn read_range(&self, id: NodeId, offset: u64, len: u64) -> Result<Vec<u8>> {
        let target = self.index.resolve(id);
        let e = self.index.entry(target);
        let path = self.index.path_of(target);
        if e.kind() != EntryKind::Reg {
            return Err(Error::NotAFile { path });
        }
        let end = offset.saturating_add(len).min(e.size());
        let chunks = self.chunks_for_range(target, offset, len);
        let mut out = Vec::with_capacity(
            end.saturating_sub(offset).min(crate::chunk::PREALLOC_LIMIT) as usize,
        );
        let mut i = 0;
        while i < chunks.len() {
            if chunks[i].zeros {
                let c = &chunks[i];
                let window = offset.saturating_sub(c.file_offset)..end - c.file_offset;
                out.extend(decompress_chunk_window(
                    self.format(),
                    &path,
                    c,
                    &[],
                    window,
                )?);
                i += 1;
                continue;
            }
            // Coalesce chunks whose compressed ranges touch into one fetch.
            let start = chunks[i].comp_offset;
            let mut stop = chunks[i].comp_end;
            let mut j = i + 1;
            while j < chunks.len() && !chunks[j].zeros && chunks[j].comp_offset <= stop {
                stop = stop.max(chunks[j].comp_end);
                j += 1;
            }
            let data = read_exact(&*self.blob, start, stop - start).await?;
            for c in &chunks[i..j] {
                let rel = (c.comp_offset - start) as usize;
                let window = offset.saturating_sub(c.file_offset)..end - c.file_offset;
                if self.spans.is_some() {
                    let mut piece = Vec::new();
                    self.span_piece(c, &data[rel..], &mut piece)?;
                    out.extend_from_slice(
                        &piece[window.start as usize..window.end.min(c.size) as usize],
                    );
                    continue;
                }
                out.extend(decompress_chunk_window(
                    self.format(),
                    &path,
                    c,
                    &data[rel..],
                    window,
                )?);
            }
            i = j;
        }
        Ok(out)
    }
}
