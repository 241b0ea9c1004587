//! The converter's state machine: tar entries in, TOC entries and members out, then
//! the TOC, footer and annotations.

mod chunks;
mod reorder;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::ops::Range;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::pipeline::{Pipeline, compress};
use super::{OutputFormat, WriteOutput, WriterOptions};
use crate::annotation::{
    LEGACY_MANIFEST_CHECKSUM_ANNOTATION, LEGACY_MANIFEST_POSITION_ANNOTATION,
    MANIFEST_CHECKSUM_ANNOTATION, MANIFEST_POSITION_ANNOTATION, TARSPLIT_POSITION_ANNOTATION,
    TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION,
};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::footer::{
    SKIPPABLE_HEADER_SIZE, estargz_footer, skippable_frame, stargz_zstd_footer, zstd_chunked_footer,
};
use crate::index::normalize_path;
use crate::tar::{BLOCK, TarHeader, TarReader, reg_header};
use crate::tarsplit::{Crc64, TarSplitWriter};
use crate::toc::{
    LANDMARK_CONTENTS, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, Toc, TocEntry,
};

/// Where a chunk's member is, before offsets are known.
struct PendingChunk {
    entry: usize,
    seq: u64,
}

pub(super) struct Converter<W> {
    format: OutputFormat,
    chunk_size: u64,
    level: i32,
    prioritized: Vec<String>,
    /// Normalized path -> ranges read at start-up; empty when nothing is marked.
    prefetch_ranges: HashMap<String, Vec<Range<u64>>>,
    /// Normalized paths of the prioritized files, when chunks are marked.
    marked_whole: HashSet<String>,
    /// Normalized paths written so far: a hard link must name one of them...
    written: HashSet<String>,
    /// ...and not one of these, the directories among them.
    written_dirs: HashSet<String>,
    add_landmarks: bool,
    pub(super) pipeline: Pipeline<W>,
    segment: Vec<u8>,
    next_seq: u64,
    diff: Sha256,
    uncompressed: u64,
    entries: Vec<TocEntry>,
    /// Offsets to fill in once members are written: `offset` of entries.
    chunk_fixups: Vec<PendingChunk>,
    /// `endOffset` of zstd:chunked entries: the member after this sequence number.
    end_fixups: Vec<PendingChunk>,
    tar_split: Option<TarSplitWriter>,
    crc: Crc64,
    /// Padding of the previous entry, not yet written.
    pending_pad: Vec<u8>,
}

/// A source of one entry's payload.
trait Payload {
    fn read_payload(&mut self, buf: &mut [u8]) -> Result<usize>;
    fn padding(&mut self) -> Result<Vec<u8>>;
}

impl<R: Read> Payload for TarReader<R> {
    fn read_payload(&mut self, buf: &mut [u8]) -> Result<usize> {
        self.read_data(buf)
    }
    fn padding(&mut self) -> Result<Vec<u8>> {
        self.read_padding()
    }
}

struct SlicePayload<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Payload for SlicePayload<'_> {
    fn read_payload(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = buf.len().min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
    fn padding(&mut self) -> Result<Vec<u8>> {
        Ok(vec![0u8; (BLOCK - self.data.len() % BLOCK) % BLOCK])
    }
}

fn toc_type(typeflag: u8) -> Option<&'static str> {
    Some(match typeflag {
        b'0' | 0 | b'7' => "reg",
        b'1' => "hardlink",
        b'2' => "symlink",
        b'3' => "char",
        b'4' => "block",
        b'5' => "dir",
        b'6' => "fifo",
        _ => return None,
    })
}

fn landmark(name: &str) -> Result<TarHeader> {
    Ok(TarHeader {
        raw: reg_header(name, 1)?.to_vec(),
        name: name.to_string(),
        typeflag: b'0',
        mode: 0o644,
        size: 1,
        ..Default::default()
    })
}

fn is_special(name: &str) -> bool {
    matches!(
        normalize_path(name).as_deref(),
        Ok(PREFETCH_LANDMARK) | Ok(NO_PREFETCH_LANDMARK) | Ok(TOC_TAR_NAME)
    )
}

impl<W: Write> Converter<W> {
    pub(super) fn new(opts: &WriterOptions, level: i32, pipeline: Pipeline<W>) -> Result<Self> {
        let cstorage = opts.format == OutputFormat::ZstdChunked;
        let mut prefetch_ranges = HashMap::new();
        for (path, ranges) in &opts.prefetch_ranges {
            prefetch_ranges.insert(
                normalize_path(path.trim_start_matches('/'))?,
                ranges.clone(),
            );
        }
        let mut marked_whole = HashSet::new();
        if !prefetch_ranges.is_empty() {
            for p in &opts.prioritized_files {
                marked_whole.insert(normalize_path(p.trim_start_matches('/'))?);
            }
        }
        Ok(Converter {
            format: opts.format,
            chunk_size: opts.chunk_size,
            level,
            prioritized: opts.prioritized_files.clone(),
            prefetch_ranges,
            marked_whole,
            written: HashSet::new(),
            written_dirs: HashSet::new(),
            // c/storage keeps the input tar as it is unless files are reordered.
            add_landmarks: !cstorage || !opts.prioritized_files.is_empty(),
            pipeline,
            segment: Vec::new(),
            next_seq: 0,
            diff: Sha256::new(),
            uncompressed: 0,
            entries: Vec::new(),
            chunk_fixups: Vec::new(),
            end_fixups: Vec::new(),
            tar_split: if cstorage {
                Some(TarSplitWriter::new(level)?)
            } else {
                None
            },
            crc: Crc64::new(),
            pending_pad: Vec::new(),
        })
    }

    pub(super) fn run(&mut self, tar: Box<dyn Read + '_>) -> Result<WriteOutput> {
        if self.prioritized.is_empty() {
            if self.add_landmarks {
                self.emit_landmark(NO_PREFETCH_LANDMARK)?;
            }
            let mut tr = TarReader::new(tar);
            while let Some(h) = tr.next_header()? {
                if self.add_landmarks && is_special(&h.name) {
                    continue;
                }
                self.emit_entry(&h, &mut tr)?;
            }
            let end_raw = std::mem::take(&mut tr.end_raw);
            self.finish_tar(end_raw, tr.into_inner())
        } else {
            self.run_reordered(tar)
        }
    }

    /// Appends tar bytes to the current member.
    fn put(&mut self, data: &[u8]) {
        self.diff.update(data);
        self.uncompressed += data.len() as u64;
        self.segment.extend_from_slice(data);
    }

    /// Tar bytes that are not payload; long runs of them are cut into several members so
    /// that no member grows without bound.
    fn put_meta(&mut self, data: &[u8]) -> Result<()> {
        self.put(data);
        if self.segment.len() as u64 >= self.chunk_size {
            self.start_member()?;
        }
        Ok(())
    }

    /// Ends the current member (if it holds anything); returns the sequence number of
    /// the member the next bytes go into.
    fn start_member(&mut self) -> Result<u64> {
        if !self.segment.is_empty() {
            let data = std::mem::take(&mut self.segment);
            self.pipeline.submit(self.next_seq, data)?;
            self.next_seq += 1;
        }
        Ok(self.next_seq)
    }

    fn emit_landmark(&mut self, name: &str) -> Result<()> {
        let h = landmark(name)?;
        self.emit_entry(
            &h,
            &mut SlicePayload {
                data: &[LANDMARK_CONTENTS],
                pos: 0,
            },
        )
    }

    fn emit_entry(&mut self, h: &TarHeader, payload: &mut dyn Payload) -> Result<()> {
        let kind = toc_type(h.typeflag).ok_or_else(|| Error::UnsupportedTar {
            path: h.name.clone(),
            reason: format!("tar type {:?}", h.typeflag as char),
        })?;
        // Refuse to write a layer our own reader (and any careful one) would reject.
        if normalize_path(&h.name)?.is_empty() && kind != "dir" {
            return Err(Error::UnsafePath {
                path: h.name.clone(),
                reason: "a non-directory entry names the layer root".into(),
            });
        }
        if kind == "hardlink" {
            // A link to a name no earlier entry has: tar cannot extract it, and no
            // TOC reader can resolve it (found by fuzzing).
            let target = normalize_path(&h.link_name)?;
            if !self.written.contains(&target) {
                return Err(Error::UnsupportedTar {
                    path: h.name.clone(),
                    reason: format!(
                        "hard link to {:?}, which no earlier entry names",
                        h.link_name
                    ),
                });
            }
            if self.written_dirs.contains(&target) {
                return Err(Error::UnsupportedTar {
                    path: h.name.clone(),
                    reason: format!("hard link to the directory {:?}", h.link_name),
                });
            }
        }
        let name = normalize_path(&h.name)?;
        if kind == "dir" {
            self.written_dirs.insert(name.clone());
        } else {
            self.written_dirs.remove(&name);
        }
        self.written.insert(name);
        let pad = std::mem::take(&mut self.pending_pad);
        if let Some(ts) = &mut self.tar_split {
            let mut seg = pad.clone();
            seg.extend_from_slice(&h.raw);
            ts.segment(&seg)?;
        }
        self.put_meta(&pad)?;
        self.put_meta(&h.raw)?;

        let estargz_toc = self.format != OutputFormat::ZstdChunked;
        let mut e = TocEntry {
            name: h.name.clone(),
            kind: kind.to_string(),
            mode: h.mode,
            uid: h.uid,
            gid: h.gid,
            ..Default::default()
        };
        if h.mtime.secs != 0 || h.mtime.nanos != 0 {
            e.modtime = h.mtime.to_rfc3339();
        }
        if estargz_toc {
            e.user_name = h.uname.clone();
            e.group_name = h.gname.clone();
        }
        if kind == "symlink" || kind == "hardlink" {
            e.link_name = h.link_name.clone();
        }
        if kind == "char" || kind == "block" {
            e.dev_major = h.dev_major;
            e.dev_minor = h.dev_minor;
        }
        for (k, v) in &h.xattrs {
            e.xattrs.insert(
                k.clone(),
                base64::engine::general_purpose::STANDARD.encode(v),
            );
        }
        let size = h.size;
        e.size = i64::try_from(size).map_err(|_| Error::UnsupportedTar {
            path: h.name.clone(),
            reason: "file too large".into(),
        })?;
        let first = self.entries.len();
        self.entries.push(e);
        if size > 0 {
            self.emit_payload(h, size, first, payload)?;
        } else if let Some(ts) = &mut self.tar_split {
            ts.file(&h.name, 0, None)?;
        }
        self.pending_pad = payload.padding()?;
        if self.tar_split.is_none() {
            // eStargz / stargz zstd: padding trails the payload in the same member.
            let pad = std::mem::take(&mut self.pending_pad);
            self.put_meta(&pad)?;
        }
        Ok(())
    }

    /// Writes the end of the tar stream (and, for eStargz, the TOC entry before it),
    /// then the TOC, footer and annotations.
    fn finish_tar(
        &mut self,
        end_raw: Vec<u8>,
        mut rest: Box<dyn Read + '_>,
    ) -> Result<WriteOutput> {
        let pad = std::mem::take(&mut self.pending_pad);
        match self.format {
            OutputFormat::ZstdChunked => {
                // Keep the input's end of archive and trailing bytes, byte for byte.
                let mut tail = pad;
                tail.extend_from_slice(&end_raw);
                if tail.len() < 2 * BLOCK {
                    tail.resize(2 * BLOCK, 0);
                }
                if let Some(ts) = &mut self.tar_split {
                    ts.segment(&tail)?;
                }
                self.put(&tail);
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = rest
                        .read(&mut buf)
                        .map_err(|e| Error::io("reading the input's trailing bytes", e))?;
                    if n == 0 {
                        break;
                    }
                    if let Some(ts) = &mut self.tar_split {
                        ts.segment(&buf[..n])?;
                    }
                    self.put(&buf[..n]);
                }
            }
            OutputFormat::StargzZstdChunked | OutputFormat::Estargz => {
                // Read the input to its end anyway so that a gzip or zstd checksum in a
                // compressed input is verified.
                std::io::copy(&mut rest, &mut std::io::sink())
                    .map_err(|e| Error::io("reading the input's trailing bytes", e))?;
                self.put(&pad);
                if self.format == OutputFormat::StargzZstdChunked {
                    self.put(&[0u8; 2 * BLOCK]);
                }
            }
        }
        self.start_member()?;
        self.pipeline.drain()?;
        let spans = std::mem::take(&mut self.pipeline.spans);
        let span = |seq: u64| -> Result<(u64, u64)> {
            spans
                .get(seq as usize)
                .copied()
                .ok_or_else(|| Error::Worker(format!("member {seq} was never written")))
        };
        for f in &self.chunk_fixups {
            self.entries[f.entry].offset = span(f.seq)?.0 as i64;
        }
        for f in &self.end_fixups {
            let (off, len) = span(f.seq)?;
            self.entries[f.entry].end_offset = (off + len) as i64;
        }
        let entries = std::mem::take(&mut self.entries);
        check_tree(&entries)?;
        match self.format {
            OutputFormat::Estargz => self.finish_estargz(entries),
            _ => self.finish_zstd(entries),
        }
    }

    fn finish_estargz(&mut self, entries: Vec<TocEntry>) -> Result<WriteOutput> {
        let toc = Toc {
            version: 1,
            entries,
            tar_split_digest: String::new(),
        };
        let json = toc_json(&toc, true)?;
        let mut member = reg_header(TOC_TAR_NAME, json.len() as u64)?.to_vec();
        member.extend_from_slice(&json);
        member.resize(member.len().div_ceil(BLOCK) * BLOCK + 2 * BLOCK, 0);
        self.diff.update(&member);
        self.uncompressed += member.len() as u64;
        let compressed = compress(&member, true, self.level)?;
        let out = &mut self.pipeline.out;
        let toc_offset = out.count;
        out.put(&compressed)?;
        out.put(&estargz_footer(toc_offset))?;
        let toc_digest = Digest::of(&json);
        let mut annotations = BTreeMap::new();
        annotations.insert(TOC_DIGEST_ANNOTATION.to_string(), toc_digest.to_string());
        annotations.insert(
            UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
            self.uncompressed.to_string(),
        );
        Ok(self.output(toc_digest, Digest::of(&compressed), annotations))
    }

    fn finish_zstd(&mut self, entries: Vec<TocEntry>) -> Result<WriteOutput> {
        let cstorage = self.format == OutputFormat::ZstdChunked;
        let ts = match self.tar_split.take() {
            Some(ts) => Some(ts.finish()?),
            None => None,
        };
        let toc = Toc {
            version: 1,
            entries,
            tar_split_digest: ts
                .as_ref()
                .map(|(data, _)| Digest::of(data).to_string())
                .unwrap_or_default(),
        };
        let json = toc_json(&toc, !cstorage)?;
        let compressed = zstd::bulk::compress(&json, self.level)
            .map_err(|e| Error::io("compressing the TOC", e))?;
        let manifest_checksum = Digest::of(&compressed);
        let toc_digest = Digest::of(&json);
        let out = &mut self.pipeline.out;
        let toc_offset = out.count + SKIPPABLE_HEADER_SIZE;
        out.put(&skippable_frame(&compressed)?)?;
        let (clen, ulen) = (compressed.len() as u64, json.len() as u64);
        let mut annotations = BTreeMap::new();
        let position = format!("{toc_offset}:{clen}:{ulen}:1");
        if let Some((ts_data, ts_ulen)) = ts {
            let ts_offset = out.count + SKIPPABLE_HEADER_SIZE;
            out.put(&skippable_frame(&ts_data)?)?;
            let ts_span = (ts_offset, ts_data.len() as u64, ts_ulen);
            out.put(&zstd_chunked_footer(toc_offset, clen, ulen, ts_span))?;
            annotations.insert(
                TARSPLIT_POSITION_ANNOTATION.to_string(),
                format!("{}:{}:{}", ts_span.0, ts_span.1, ts_span.2),
            );
        } else {
            out.put(&stargz_zstd_footer(toc_offset, clen, ulen))?;
        }
        if cstorage {
            annotations.insert(
                MANIFEST_CHECKSUM_ANNOTATION.to_string(),
                manifest_checksum.to_string(),
            );
            annotations.insert(MANIFEST_POSITION_ANNOTATION.to_string(), position);
        } else {
            annotations.insert(
                LEGACY_MANIFEST_CHECKSUM_ANNOTATION.to_string(),
                manifest_checksum.to_string(),
            );
            annotations.insert(LEGACY_MANIFEST_POSITION_ANNOTATION.to_string(), position);
            annotations.insert(TOC_DIGEST_ANNOTATION.to_string(), toc_digest.to_string());
            annotations.insert(
                UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
                self.uncompressed.to_string(),
            );
        }
        Ok(self.output(toc_digest, manifest_checksum, annotations))
    }

    fn output(
        &mut self,
        toc_digest: Digest,
        manifest_checksum: Digest,
        annotations: BTreeMap<String, String>,
    ) -> WriteOutput {
        let out = &mut self.pipeline.out;
        WriteOutput {
            blob_digest: Digest::from_hasher(std::mem::take(&mut out.hasher)),
            blob_size: out.count,
            diff_id: Digest::from_hasher(std::mem::take(&mut self.diff)),
            toc_digest,
            manifest_checksum,
            uncompressed_size: self.uncompressed,
            annotations,
        }
    }
}

/// Refuses a tar whose final tree has an entry below a non-directory (`d/` then a
/// file `d` then `d/x`): readers reject such a TOC, so the layer would not mount.
fn check_tree(entries: &[TocEntry]) -> Result<()> {
    let mut kinds: HashMap<String, &str> = HashMap::new();
    for e in entries.iter().filter(|e| e.kind != "chunk") {
        // Later entries replace earlier ones, as when extracting.
        kinds.insert(normalize_path(&e.name)?, e.kind.as_str());
    }
    for name in kinds.keys() {
        let mut parent = name.as_str();
        while let Some(i) = parent.rfind('/') {
            parent = &parent[..i];
            if let Some(kind) = kinds.get(parent)
                && *kind != "dir"
            {
                return Err(Error::UnsupportedTar {
                    path: name.clone(),
                    reason: format!("its parent {parent:?} is a {kind}, not a directory"),
                });
            }
        }
    }
    Ok(())
}

/// eStargz writes the TOC as Go's `json.MarshalIndent(toc, "", "\t")`; c/storage
/// writes it compact.
fn toc_json(toc: &Toc, indent: bool) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let res = if indent {
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        serde::Serialize::serialize(toc, &mut ser)
    } else {
        serde_json::to_writer(&mut out, toc)
    };
    res.map_err(|e| Error::bad_toc(format!("serializing the TOC: {e}")))?;
    Ok(out)
}
