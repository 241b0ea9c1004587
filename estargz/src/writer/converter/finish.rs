//! The end of the layer: the tar's end, member offsets filled in, then the TOC, the
//! footer and the annotations.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};

use sha2::Digest as _;

use super::Converter;
use crate::annotation::{
    LEGACY_MANIFEST_CHECKSUM_ANNOTATION, LEGACY_MANIFEST_POSITION_ANNOTATION,
    MANIFEST_CHECKSUM_ANNOTATION, MANIFEST_POSITION_ANNOTATION, TARSPLIT_POSITION_ANNOTATION,
    TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION,
};
use crate::digest::Sha256Sum;
use crate::error::{Error, Result};
use crate::footer::{
    SKIPPABLE_HEADER_SIZE, estargz_footer, skippable_frame, stargz_zstd_footer, zstd_chunked_footer,
};
use crate::index::normalize_path;
use crate::tar::{BLOCK, reg_header};
use crate::toc::{TOC_TAR_NAME, Toc, TocEntry};
use crate::writer::pipeline::compress;
use crate::writer::{OutputFormat, WriteOutput};

impl<W: Write> Converter<W> {
    /// Writes the end of the tar stream (and, for eStargz, the TOC entry before it),
    /// then the TOC, footer and annotations.
    pub(super) fn finish_tar(
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
        let toc_digest = Sha256Sum::of(&json);
        let mut annotations = BTreeMap::new();
        annotations.insert(TOC_DIGEST_ANNOTATION.to_string(), toc_digest.to_string());
        annotations.insert(
            UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
            self.uncompressed.to_string(),
        );
        Ok(self.output(toc_digest, Sha256Sum::of(&compressed), annotations))
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
                .map(|(data, _)| Sha256Sum::of(data).to_string())
                .unwrap_or_default(),
        };
        let json = toc_json(&toc, !cstorage)?;
        let compressed = zstd::bulk::compress(&json, self.level)
            .map_err(|e| Error::io("compressing the TOC", e))?;
        let manifest_checksum = Sha256Sum::of(&compressed);
        let toc_digest = Sha256Sum::of(&json);
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
        toc_digest: Sha256Sum,
        manifest_checksum: Sha256Sum,
        annotations: BTreeMap<String, String>,
    ) -> WriteOutput {
        let out = &mut self.pipeline.out;
        WriteOutput {
            blob_digest: Sha256Sum::from_hasher(std::mem::take(&mut out.hasher)),
            blob_size: out.count,
            diff_id: Sha256Sum::from_hasher(std::mem::take(&mut self.diff)),
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
