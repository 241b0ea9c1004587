//! The converter's state machine: tar entries in, TOC entries and members out, then
//! the TOC, footer and annotations.

mod chunks;
mod finish;
mod reorder;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::ops::Range;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::index::normalize_path;
use crate::tar::{BLOCK, TarHeader, TarReader, reg_header};
use crate::tarsplit::{Crc64, TarSplitWriter};
use crate::toc::{
    LANDMARK_CONTENTS, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, TocEntry,
};
use crate::writer::pipeline::Pipeline;
use crate::writer::{OutputFormat, WriteOutput, WriterOptions};

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
}
