//! One layer: is it already in the target format, and if not, convert it. Runs on a
//! blocking thread; reads the source blob from a local file and writes the result to
//! another, so memory stays bounded whatever the layer size.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt as _;

use estargz::{Format, OutputFormat, WriterOptions};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::oci::{Descriptor, Digest, Hasher, LAYER_GZIP, LAYER_ZSTD};
use crate::progress::Task;

/// Annotations that describe a layer's format; dropped from a descriptor whose blob
/// changes, since they would describe the old blob.
const FORMAT_ANNOTATIONS: &[&str] = &[
    estargz::TOC_DIGEST_ANNOTATION,
    estargz::UNCOMPRESSED_SIZE_ANNOTATION,
    estargz::MANIFEST_CHECKSUM_ANNOTATION,
    estargz::MANIFEST_POSITION_ANNOTATION,
    estargz::TARSPLIT_POSITION_ANNOTATION,
    estargz::LEGACY_MANIFEST_CHECKSUM_ANNOTATION,
    estargz::LEGACY_MANIFEST_POSITION_ANNOTATION,
    "io.github.containers.zstd-chunked.tarsplit-checksum",
];

/// The footer format a target format writes.
pub fn footer_format(target: OutputFormat) -> Format {
    match target {
        OutputFormat::Estargz => Format::Estargz,
        OutputFormat::ZstdChunked => Format::ZstdChunked,
        OutputFormat::StargzZstdChunked => Format::StargzZstdChunked,
    }
}

/// The media type of a converted layer.
pub fn target_media_type(target: OutputFormat) -> &'static str {
    match target {
        OutputFormat::Estargz => LAYER_GZIP,
        OutputFormat::ZstdChunked | OutputFormat::StargzZstdChunked => LAYER_ZSTD,
    }
}

/// True when the descriptor's annotations already say the layer is in `target` form.
pub fn annotated_as(desc: &Descriptor, target: OutputFormat) -> bool {
    let has = |k: &str| desc.annotation(k).is_some();
    let gzip =
        crate::oci::layer_compression(&desc.media_type) == Some(crate::oci::LayerCompression::Gzip);
    let zstd = desc.media_type == LAYER_ZSTD;
    match target {
        OutputFormat::Estargz => {
            gzip && has(estargz::TOC_DIGEST_ANNOTATION)
                && has(estargz::UNCOMPRESSED_SIZE_ANNOTATION)
        }
        OutputFormat::ZstdChunked => {
            zstd && has(estargz::MANIFEST_CHECKSUM_ANNOTATION)
                && has(estargz::MANIFEST_POSITION_ANNOTATION)
        }
        OutputFormat::StargzZstdChunked => {
            zstd && has(estargz::LEGACY_MANIFEST_CHECKSUM_ANNOTATION)
                && has(estargz::TOC_DIGEST_ANNOTATION)
        }
    }
}

/// What was done to one layer.
#[derive(Debug, Clone)]
pub struct LayerResult {
    /// The descriptor to put in the new manifest.
    pub desc: Descriptor,
    /// The layer's DiffID (sha256 of its uncompressed tar).
    pub diff_id: Digest,
    /// True when the blob is new (converted); false when the source blob is reused.
    pub converted: bool,
}

/// Reads the source blob, hashing and counting what goes through, reporting progress.
struct Verifying<'a> {
    inner: BufReader<&'a File>,
    hasher: Hasher,
    count: u64,
    task: &'a Task,
}

impl Read for Verifying<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        self.task.inc(n as u64);
        Ok(n)
    }
}

impl Verifying<'_> {
    /// Reads to the end and checks the blob against its descriptor.
    fn finish(mut self, desc: &Descriptor) -> Result<()> {
        std::io::copy(&mut self, &mut std::io::sink()).map_err(|e| Error::LayerIo {
            digest: desc.digest.clone(),
            context: "reading the layer blob".into(),
            source: e,
        })?;
        let actual = self.hasher.finish();
        if actual != desc.digest {
            return Err(Error::DigestMismatch {
                what: "layer",
                digest: desc.digest.clone(),
                actual,
            });
        }
        if self.count != desc.size {
            return Err(Error::SizeMismatch {
                what: "layer",
                digest: desc.digest.clone(),
                expected: desc.size,
                actual: self.count,
            });
        }
        Ok(())
    }
}

/// Hashes and counts an uncompressed stream (the DiffID).
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A decompressor chosen by the blob's magic bytes (media types are sometimes wrong).
fn decompressor<'a, R: Read + 'a>(raw: R) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut br = std::io::BufReader::with_capacity(1 << 16, raw);
    let head = std::io::BufRead::fill_buf(&mut br)?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(br)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(br)?))
    } else {
        Ok(Box::new(br))
    }
}

fn rewind(file: &File, desc: &Descriptor) -> Result<()> {
    let mut f = file;
    f.seek(SeekFrom::Start(0)).map_err(|e| Error::LayerIo {
        digest: desc.digest.clone(),
        context: "rewinding the layer blob".into(),
        source: e,
    })?;
    Ok(())
}

fn check_diff_id(desc: &Descriptor, expected: Option<&str>, actual: &Digest) -> Result<()> {
    match expected {
        Some(e) if e != actual.to_string() => Err(Error::DiffIdMismatch {
            digest: desc.digest.clone(),
            expected: e.to_string(),
            actual: actual.clone(),
        }),
        _ => Ok(()),
    }
}

/// Reads the footer and TOC of `file`; `Some` when the blob already is `target`.
pub fn footer_says(file: &File, desc: &Descriptor, target: OutputFormat) -> Option<Existing> {
    let size = file.metadata().ok()?.len();
    let tail_len = size.min(estargz::MAX_FOOTER_FETCH);
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact_at(&mut tail, size - tail_len).ok()?;
    let footer = estargz::parse_footer(&tail, size).ok()?;
    if footer.format != footer_format(target) {
        return None;
    }
    // A TOC that the footer points at must exist and parse, or the blob is not usable.
    let opts = estargz::OpenOptions::default();
    if footer.toc_compressed_size > opts.max_toc_size {
        return None;
    }
    let mut toc = vec![0u8; footer.toc_compressed_size as usize];
    file.read_exact_at(&mut toc, footer.toc_offset).ok()?;
    let parsed = estargz::parse_toc(&footer, &toc, &opts).ok()?;
    tracing::debug!(layer = %desc.digest, format = ?footer.format, "layer already in the target format");
    Some(Existing { footer, parsed })
}

/// A layer found, by its footer, to be in the target format already.
pub struct Existing {
    footer: estargz::Footer,
    parsed: estargz::ParsedToc,
}

/// Adds the annotations of the target format to a layer that has the format but lacks
/// them (built by a tool that does not annotate); checks digest and DiffID on the way.
pub fn annotate_existing(
    file: &File,
    desc: &Descriptor,
    existing: &Existing,
    target: OutputFormat,
    expected_diff_id: Option<&str>,
    task: &Task,
) -> Result<LayerResult> {
    rewind(file, desc)?;
    let layer_err = |context: &str, e: std::io::Error| Error::LayerIo {
        digest: desc.digest.clone(),
        context: context.to_string(),
        source: e,
    };
    let mut raw = Verifying {
        inner: BufReader::with_capacity(1 << 20, file),
        hasher: Hasher::new(desc.digest.algorithm()),
        count: 0,
        task,
    };
    let (diff_id, uncompressed) = {
        let dec = decompressor(&mut raw).map_err(|e| layer_err("starting decompression", e))?;
        let mut h = Hashing {
            inner: dec,
            hasher: Sha256::new(),
            count: 0,
        };
        std::io::copy(&mut h, &mut std::io::sink())
            .map_err(|e| layer_err("decompressing the layer", e))?;
        (Digest::from_sha256(h.hasher), h.count)
    };
    raw.finish(desc)?;
    check_diff_id(desc, expected_diff_id, &diff_id)?;
    let f = &existing.footer;
    let p = &existing.parsed;
    let mut ann = BTreeMap::new();
    let position = format!(
        "{}:{}:{}:1",
        f.toc_offset,
        f.toc_compressed_size,
        f.toc_uncompressed_size.unwrap_or(0)
    );
    match target {
        OutputFormat::Estargz => {
            ann.insert(
                estargz::TOC_DIGEST_ANNOTATION.to_string(),
                p.toc_digest.to_string(),
            );
            ann.insert(
                estargz::UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
                uncompressed.to_string(),
            );
        }
        OutputFormat::ZstdChunked => {
            ann.insert(
                estargz::MANIFEST_CHECKSUM_ANNOTATION.to_string(),
                p.manifest_checksum.to_string(),
            );
            ann.insert(estargz::MANIFEST_POSITION_ANNOTATION.to_string(), position);
            if let Some((o, c, u)) = f.tar_split {
                ann.insert(
                    estargz::TARSPLIT_POSITION_ANNOTATION.to_string(),
                    format!("{o}:{c}:{u}"),
                );
            }
        }
        OutputFormat::StargzZstdChunked => {
            ann.insert(
                estargz::LEGACY_MANIFEST_CHECKSUM_ANNOTATION.to_string(),
                p.manifest_checksum.to_string(),
            );
            ann.insert(
                estargz::LEGACY_MANIFEST_POSITION_ANNOTATION.to_string(),
                position,
            );
            ann.insert(
                estargz::TOC_DIGEST_ANNOTATION.to_string(),
                p.toc_digest.to_string(),
            );
            ann.insert(
                estargz::UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
                uncompressed.to_string(),
            );
        }
    }
    let mut out = desc.clone();
    out.media_type = target_media_type(target).to_string();
    out.annotations
        .get_or_insert_with(BTreeMap::new)
        .extend(ann);
    Ok(LayerResult {
        desc: out,
        diff_id,
        converted: false,
    })
}

/// Names (normalised) of the entries of the layer in `file`: lets `--prioritize` lists
/// that span several layers give each layer only the files it has.
fn entry_names(file: &File, desc: &Descriptor) -> Result<HashSet<String>> {
    rewind(file, desc)?;
    let layer_err = |context: &str, e: std::io::Error| Error::LayerIo {
        digest: desc.digest.clone(),
        context: context.to_string(),
        source: e,
    };
    let dec =
        decompressor(BufReader::new(file)).map_err(|e| layer_err("starting decompression", e))?;
    let mut archive = tar::Archive::new(dec);
    let mut names = HashSet::new();
    for entry in archive
        .entries()
        .map_err(|e| layer_err("reading the tar", e))?
    {
        let entry = entry.map_err(|e| layer_err("reading the tar", e))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if let Ok(name) = estargz::normalize_path(&raw) {
            names.insert(name);
        }
    }
    Ok(names)
}

/// Converts the layer in `file` (described by `desc`) into `out`.
pub fn convert(
    file: &File,
    desc: &Descriptor,
    expected_diff_id: Option<&str>,
    opts: &WriterOptions,
    out: &mut File,
    task: &Task,
) -> Result<LayerResult> {
    let mut opts = opts.clone();
    if !opts.prioritized_files.is_empty() {
        let names = entry_names(file, desc)?;
        opts.prioritized_files.retain(|p| {
            estargz::normalize_path(p.trim_start_matches('/')).is_ok_and(|n| names.contains(&n))
        });
    }
    rewind(file, desc)?;
    let layer_err = |context: &str, e: std::io::Error| Error::LayerIo {
        digest: desc.digest.clone(),
        context: context.to_string(),
        source: e,
    };
    let mut raw = Verifying {
        inner: BufReader::with_capacity(1 << 20, file),
        hasher: Hasher::new(desc.digest.algorithm()),
        count: 0,
        task,
    };
    let converted = {
        let dec = decompressor(&mut raw).map_err(|e| layer_err("starting decompression", e))?;
        let mut input = Hashing {
            inner: dec,
            hasher: Sha256::new(),
            count: 0,
        };
        let mut w = BufWriter::with_capacity(1 << 20, &mut *out);
        let res = estargz::convert(&mut input, &mut w, &opts).and_then(|o| {
            w.flush()
                .map_err(|e| estargz::Error::Io {
                    context: "writing the converted layer".into(),
                    source: e,
                })
                .map(|_| o)
        });
        match res {
            Ok(o) => {
                // The writer reads its input to the end; make sure of it so the DiffID
                // covers every byte.
                std::io::copy(&mut input, &mut std::io::sink())
                    .map_err(|e| layer_err("decompressing the layer", e))?;
                Ok((o, Digest::from_sha256(input.hasher)))
            }
            Err(e) => Err(e),
        }
    };
    let (output, input_diff_id) = match converted {
        Ok(v) => v,
        Err(e) => {
            // A blob that does not match its digest is the root cause of any parse
            // error it produced: report that first.
            let whole = raw.finish(desc);
            whole?;
            return Err(Error::Layer {
                digest: desc.digest.clone(),
                source: e,
            });
        }
    };
    raw.finish(desc)?;
    check_diff_id(desc, expected_diff_id, &input_diff_id)?;
    out.sync_all()
        .map_err(|e| layer_err("syncing the converted layer", e))?;
    let mut new = desc.clone();
    new.media_type = target_media_type(opts.format).to_string();
    new.digest = output.blob_digest.into();
    new.size = output.blob_size;
    let ann = new.annotations.get_or_insert_with(BTreeMap::new);
    for k in FORMAT_ANNOTATIONS {
        ann.remove(*k);
    }
    ann.extend(output.annotations);
    // `urls` point at the old blob.
    new.other.remove("urls");
    Ok(LayerResult {
        desc: new,
        diff_id: output.diff_id.into(),
        converted: true,
    })
}
