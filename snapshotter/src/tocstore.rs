//! Verified layer metadata on local disk: what opening a lazily pulled layer needs
//! (the blob's size, its footer and its compressed TOC; for a SOCI layer its zTOC and
//! prefetch spans), kept once it was fetched from the registry and verified against what
//! the image publishes. A restart, with or
//! without the fd holder, even a reboot, then restores the layer's snapshot without
//! asking the registry anything: with the chunk cache, a wholly local layer needs no
//! registry at all.
//!
//! One file a layer, named after the layer's digest, under `ROOT/tocs`: written to a
//! temp file, fsynced and renamed into place. Each use reads it back and checks it
//! again, first its own checksum, then the TOC against the digest the snapshot's labels
//! name (or else the expectation it was verified against when stored); a file that does
//! not pass is deleted, and the layer is opened from the registry as if it had never
//! been stored. Files of layers no lazy snapshot uses any more go with the chunk cache's
//! sweep ([`TocStore::retain`]).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use estargz::{BlobReader, Cancel, Footer, Format, Layer, OpenOptions, Sha256Sum};
use serde_json::{Value, json};

/// The first word of every file; the version follows it.
const MAGIC: &str = "lazysnap-layer-metadata";
const VERSION: u64 = 1;
/// The header line is small; this bounds what a damaged file makes us read.
const MAX_HEADER_BYTES: usize = 64 << 10;

/// The directory of verified layer metadata. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TocStore {
    dir: PathBuf,
}

impl TocStore {
    /// Uses (and creates, mode 0700) `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<TocStore> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = dir.into();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(TocStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `layer_digest` (`ALGORITHM:HEX`), None for anything else: a digest
    /// from a label never names a path outside the store.
    fn path_of(&self, layer_digest: &str) -> Option<PathBuf> {
        let (algorithm, hex) = layer_digest.split_once(':')?;
        let good = |s: &str, extra: fn(u8) -> bool| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() && extra(b))
        };
        (good(algorithm, |_| true) && good(hex, |b| b <= b'f'))
            .then(|| self.dir.join(format!("{algorithm}-{hex}")))
    }

    /// Keeps `layer`'s metadata under `layer_digest`: its blob size, its footer and
    /// `toc`, the compressed TOC bytes it was opened from, with the expectation (`opts`)
    /// the TOC was verified against. A layer opened without one (skip-verify) is not
    /// kept: every restore would have to trust the file blindly.
    pub fn save(
        &self,
        layer_digest: &str,
        layer: &Layer,
        toc: &[u8],
        opts: &OpenOptions,
    ) -> std::io::Result<PathBuf> {
        let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
        let path = self
            .path_of(layer_digest)
            .ok_or_else(|| invalid(format!("layer digest {layer_digest:?}")))?;
        if opts.expected_toc_digest.is_none() && opts.expected_manifest_checksum.is_none() {
            return Err(invalid(format!(
                "layer {layer_digest} was not verified: nothing to keep"
            )));
        }
        if Sha256Sum::of(toc) != layer.manifest_checksum() {
            return Err(invalid(format!(
                "the TOC bytes given for layer {layer_digest} are not the layer's"
            )));
        }
        let header = json!({
            "layer_digest": layer_digest,
            "blob_size": layer.blob_size(),
            "footer": footer_json(layer.footer()),
            "expected_toc_digest": opts.expected_toc_digest.map(|d| d.to_string()),
            "expected_manifest_checksum": opts.expected_manifest_checksum.map(|d| d.to_string()),
            "toc_digest": layer.toc_digest().to_string(),
        });
        self.write(&path, &header, toc)
    }

    /// Keeps a SOCI layer's metadata under `layer_digest`: its blob size, its zTOC
    /// (verified through the image's SOCI index before it comes here) and the spans the
    /// index's prefetch artifact names.
    pub fn save_ztoc(&self, layer_digest: &str, kept: &KeptZtoc) -> std::io::Result<PathBuf> {
        let path = self.path_of(layer_digest).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("layer digest {layer_digest:?}"),
            )
        })?;
        let header = json!({
            "layer_digest": layer_digest,
            "kind": ZTOC_KIND,
            "blob_size": kept.blob_size,
            "ztoc_digest": Sha256Sum::of(&kept.ztoc).to_string(),
            "prefetch": kept.prefetch.iter().map(|r| [*r.start(), *r.end()]).collect::<Vec<_>>(),
        });
        self.write(&path, &header, &kept.ztoc)
    }

    /// Writes `header` and `payload` to `path`, atomically and durably.
    fn write(&self, path: &Path, header: &Value, payload: &[u8]) -> std::io::Result<PathBuf> {
        let mut body = header.to_string().into_bytes();
        body.push(b'\n');
        body.extend_from_slice(payload);
        let mut file = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.dir)?;
        writeln!(file, "{MAGIC} {VERSION} {}", Sha256Sum::of(&body).hex())?;
        file.write_all(&body)?;
        file.as_file().sync_all()?;
        file.persist(path).map_err(|e| e.error)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(path.to_path_buf())
    }

    /// Opens `layer_digest` from its kept metadata, with `blob` (given the blob's size)
    /// to read chunks from; nothing of the blob is read here. The TOC must verify against
    /// `label_toc_digest` when given (the snapshot's `toc.digest` label), and against the
    /// expectation it was kept with. Ok(None): nothing kept. Err: the file did not pass
    /// (said why) and is deleted.
    /// A parse stops when `cancel` is set (then the file is kept).
    pub fn load(
        &self,
        layer_digest: &str,
        label_toc_digest: Option<Sha256Sum>,
        cancel: &Cancel,
        blob: impl FnOnce(u64) -> Arc<dyn BlobReader>,
    ) -> Result<Option<Layer>, String> {
        let Some(path) = self.path_of(layer_digest) else {
            return Ok(None);
        };
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(format!("reading {}: {e}", path.display()));
            }
        };
        let checked =
            check(&bytes, layer_digest, label_toc_digest, cancel).and_then(|stored| match stored {
                Stored::Toc {
                    blob_size,
                    footer,
                    toc,
                } => Layer::from_json(blob(blob_size), blob_size, footer, &toc, cancel)
                    .map_err(|e| format!("the kept TOC does not index: {e}")),
                Stored::Ztoc {
                    blob_size,
                    ztoc,
                    ztoc_digest,
                    prefetch,
                } => soci::layer::open_layer_prefetching(
                    blob(blob_size),
                    blob_size,
                    ztoc,
                    &ztoc_digest,
                    &prefetch,
                    cancel,
                )
                .map_err(|e| format!("the kept zTOC does not open: {e}")),
            });
        match checked {
            Ok(layer) => Ok(Some(layer)),
            Err(_) if cancel.is_cancelled() => Err("stopped: it ran past its time".into()),
            Err(why) => {
                let _ = std::fs::remove_file(&path);
                Err(format!("{}: {why}", path.display()))
            }
        }
    }

    /// The most memory [`TocStore::load`] may take for `layer_digest` (as
    /// [`estargz::FetchedToc::parse_memory_bound`]), read from the kept file without
    /// checking it; the file's size when it cannot be read that far (loading it then
    /// fails early).
    pub fn parse_memory_bound(&self, layer_digest: &str) -> u64 {
        let Some(bytes) = self
            .path_of(layer_digest)
            .and_then(|p| std::fs::read(p).ok())
        else {
            return 0;
        };
        let bound = || -> Option<u64> {
            let mut lines = bytes.splitn(3, |&b| b == b'\n');
            let (_, header) = (lines.next()?, lines.next()?);
            let toc = lines.next()?;
            let header: Value = serde_json::from_slice(header).ok()?;
            if header["kind"].as_str() == Some(ZTOC_KIND) {
                return Some(toc.len() as u64 * ZTOC_PARSE_FACTOR);
            }
            let footer = parse_footer_json(&header["footer"])?;
            let json = estargz::toc_json_size(&footer, toc).ok()?;
            Some(toc.len() as u64 + json.saturating_mul(1 + estargz::PARSE_MEMORY_FACTOR))
        };
        bound().unwrap_or(bytes.len() as u64)
    }

    /// Whether anything is kept for `layer_digest`.
    pub fn contains(&self, layer_digest: &str) -> bool {
        self.path_of(layer_digest).is_some_and(|p| p.is_file())
    }

    /// Deletes what is kept for every layer not in `keep` that was written before
    /// `written_before` (a layer mounted after the caller listed `keep` may have just
    /// been kept), and leftover temp files as old. Returns how many files went.
    pub fn retain(&self, keep: &HashSet<String>, written_before: SystemTime) -> usize {
        let keep: HashSet<PathBuf> = keep.iter().filter_map(|d| self.path_of(d)).collect();
        // Everything in the store's directory is its own.
        crate::fsutil::remove_unkept(&self.dir, &keep, written_before, |_| true)
    }
}

/// A SOCI layer's metadata, as [`TocStore::save_ztoc`] keeps it.
pub struct KeptZtoc {
    pub blob_size: u64,
    /// The zTOC's bytes, verified through the image's SOCI index.
    pub ztoc: Vec<u8>,
    /// Span ranges its prefetch artifact names.
    pub prefetch: Vec<std::ops::RangeInclusive<u32>>,
}

/// The header's `kind` of a SOCI layer's file (eStargz files have none).
const ZTOC_KIND: &str = "soci-ztoc";

/// Memory a zTOC's parse may take, per byte of it: decoded entries (the FlatBuffers form
/// is tight, a crafted one tighter), the layout, the index. Kept zTOCs and those fetched
/// on the mount path alike.
pub(crate) const ZTOC_PARSE_FACTOR: u64 = 32;

/// What a file holds once it passed every check.
enum Stored<'a> {
    Toc {
        blob_size: u64,
        footer: Footer,
        toc: estargz::TocJson,
    },
    Ztoc {
        blob_size: u64,
        ztoc: &'a [u8],
        ztoc_digest: Sha256Sum,
        prefetch: Vec<std::ops::RangeInclusive<u32>>,
    },
}

/// Checks a file's bytes: magic and version, its checksum, the header, and the TOC
/// against the expectation (the label's TOC digest when given).
fn check<'a>(
    bytes: &'a [u8],
    layer_digest: &str,
    label: Option<Sha256Sum>,
    cancel: &Cancel,
) -> Result<Stored<'a>, String> {
    let first_end = bytes
        .iter()
        .take(256)
        .position(|&b| b == b'\n')
        .ok_or("no first line")?;
    let first = std::str::from_utf8(&bytes[..first_end]).map_err(|_| "first line not UTF-8")?;
    let body = &bytes[first_end + 1..];
    let mut words = first.split(' ');
    if words.next() != Some(MAGIC) {
        return Err("not a layer metadata file".into());
    }
    if words.next() != Some(VERSION.to_string().as_str()) {
        return Err(format!("not version {VERSION}"));
    }
    if words.next() != Some(Sha256Sum::of(body).hex().as_str()) || words.next().is_some() {
        return Err("checksum mismatch (damaged file)".into());
    }
    let header_end = body
        .iter()
        .take(MAX_HEADER_BYTES)
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let header: Value =
        serde_json::from_slice(&body[..header_end]).map_err(|e| format!("header: {e}"))?;
    let toc = &body[header_end + 1..];
    if header["layer_digest"].as_str() != Some(layer_digest) {
        return Err(format!(
            "kept for layer {}, not {layer_digest}",
            header["layer_digest"]
        ));
    }
    let blob_size = header["blob_size"].as_u64().ok_or("no blob_size")?;
    if header["kind"].as_str() == Some(ZTOC_KIND) {
        let ztoc_digest: Sha256Sum = header["ztoc_digest"]
            .as_str()
            .ok_or("no ztoc_digest")?
            .parse()
            .map_err(|e| format!("ztoc_digest: {e}"))?;
        if Sha256Sum::of(toc) != ztoc_digest {
            return Err("the zTOC is not the one verified".into());
        }
        let prefetch = header["prefetch"]
            .as_array()
            .ok_or("no prefetch list")?
            .iter()
            .map(|r| {
                let n = |i: usize| {
                    r.get(i)
                        .and_then(Value::as_u64)
                        .and_then(|v| u32::try_from(v).ok())
                };
                Some(n(0)?..=n(1)?)
            })
            .collect::<Option<Vec<_>>>()
            .ok_or("bad prefetch list")?;
        return Ok(Stored::Ztoc {
            blob_size,
            ztoc: toc,
            ztoc_digest,
            prefetch,
        });
    }
    let footer = parse_footer_json(&header["footer"]).ok_or("bad footer")?;
    let toc_end = footer
        .toc_offset
        .checked_add(footer.toc_compressed_size)
        .ok_or("bad footer")?;
    if footer.payload_end > footer.toc_offset || toc_end > blob_size {
        return Err("the footer does not fit the blob".into());
    }
    let digest = |key: &str| -> Result<Option<Sha256Sum>, String> {
        match &header[key] {
            Value::Null => Ok(None),
            Value::String(s) => s.parse().map(Some).map_err(|e| format!("{key}: {e}")),
            other => Err(format!("{key}: {other}")),
        }
    };
    let opts = OpenOptions {
        expected_toc_digest: label.or(digest("expected_toc_digest")?),
        expected_manifest_checksum: digest("expected_manifest_checksum")?,
        cancel: cancel.clone(),
        ..OpenOptions::default()
    };
    if opts.expected_toc_digest.is_none() && opts.expected_manifest_checksum.is_none() {
        return Err("kept without an expectation to verify against".into());
    }
    let toc = estargz::read_toc_json(&footer, toc, &opts).map_err(|e| format!("TOC: {e}"))?;
    Ok(Stored::Toc {
        blob_size,
        footer,
        toc,
    })
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Estargz => "estargz",
        Format::LegacyStargz => "legacy-stargz",
        Format::ZstdChunked => "zstd-chunked",
        Format::StargzZstdChunked => "stargz-zstd-chunked",
        Format::Soci => "soci",
    }
}

fn footer_json(f: &Footer) -> Value {
    json!({
        "format": format_name(f.format),
        "toc_offset": f.toc_offset,
        "toc_compressed_size": f.toc_compressed_size,
        "toc_uncompressed_size": f.toc_uncompressed_size,
        "payload_end": f.payload_end,
        "tar_split": f.tar_split.map(|(a, b, c)| [a, b, c]),
        "footer_size": f.footer_size,
    })
}

fn parse_footer_json(v: &Value) -> Option<Footer> {
    let format = [
        Format::Estargz,
        Format::LegacyStargz,
        Format::ZstdChunked,
        Format::StargzZstdChunked,
        Format::Soci,
    ]
    .into_iter()
    .find(|f| v["format"].as_str() == Some(format_name(*f)))?;
    let optional = |key: &str| match &v[key] {
        Value::Null => Some(None),
        other => other.as_u64().map(Some),
    };
    let tar_split = match &v["tar_split"] {
        Value::Null => None,
        Value::Array(a) if a.len() == 3 => Some((a[0].as_u64()?, a[1].as_u64()?, a[2].as_u64()?)),
        _ => return None,
    };
    Some(Footer {
        format,
        toc_offset: v["toc_offset"].as_u64()?,
        toc_compressed_size: v["toc_compressed_size"].as_u64()?,
        toc_uncompressed_size: optional("toc_uncompressed_size")?,
        payload_end: v["payload_end"].as_u64()?,
        tar_split,
        footer_size: v["footer_size"].as_u64()?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::preopen::tests::estargz_blob;

    /// A layer opened (and verified) from an in-memory eStargz blob, with its TOC bytes.
    async fn opened(content: &[u8]) -> (Vec<u8>, Layer, Vec<u8>, OpenOptions) {
        let (blob, written) = estargz_blob(content);
        let opts = OpenOptions {
            expected_toc_digest: Some(written.toc_digest),
            ..OpenOptions::default()
        };
        let (layer, toc) =
            Layer::open_keeping_toc(Arc::new(estargz::VecBlob::new(blob.clone())), &opts)
                .await
                .unwrap();
        (blob, layer, toc.to_vec(), opts)
    }

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// A blob of the right size holding only zeros: opening a layer on it succeeds
    /// only if nothing (footer, TOC) is read from it.
    fn zeros(size: u64) -> Arc<dyn BlobReader> {
        Arc::new(estargz::VecBlob::new(vec![0u8; size as usize]))
    }

    #[tokio::test]
    async fn a_kept_layer_opens_again_without_its_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = TocStore::open(dir.path().join("tocs")).unwrap();
        let (blob, layer, toc, opts) = opened(b"kept across restarts\n").await;
        assert!(
            store
                .load(DIGEST, None, &Cancel::new(), |_| unreachable!())
                .unwrap()
                .is_none()
        );
        store.save(DIGEST, &layer, &toc, &opts).unwrap();
        assert!(store.contains(DIGEST));

        // Verified against the expectation it was kept with, and against a label.
        let mut sizes = Vec::new();
        let again = store
            .load(DIGEST, None, &Cancel::new(), |size| {
                sizes.push(size);
                zeros(size)
            })
            .unwrap()
            .unwrap();
        assert_eq!(sizes, vec![blob.len() as u64]);
        assert_eq!(again.toc_digest(), layer.toc_digest());
        assert_eq!(again.manifest_checksum(), layer.manifest_checksum());
        assert_eq!(again.footer(), layer.footer());
        assert_eq!(again.blob_size(), layer.blob_size());
        assert_eq!(again.index().len(), layer.index().len());
        let labelled = store
            .load(DIGEST, Some(layer.toc_digest()), &Cancel::new(), zeros)
            .unwrap();
        assert!(labelled.is_some());

        // The layer reads the same through a real blob.
        let real = store
            .load(DIGEST, None, &Cancel::new(), |_| {
                Arc::new(estargz::VecBlob::new(blob))
            })
            .unwrap()
            .unwrap();
        assert_eq!(
            real.read_file_range("file.txt", 0, 100).await.unwrap(),
            b"kept across restarts\n"
        );
    }

    /// A plain gzip layer (made with tar and gzip) and its zTOC.
    fn gzip_layer_and_ztoc(dir: &Path) -> (Vec<u8>, Vec<u8>) {
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("etc/motd"), "kept zTOC\n").unwrap();
        let layer = dir.join("layer.tar.gz");
        let made = std::process::Command::new("tar")
            .arg("-czf")
            .arg(&layer)
            .arg("-C")
            .arg(&src)
            .arg("etc")
            .status()
            .unwrap();
        assert!(made.success());
        let ztoc =
            soci::ztoc_builder::build_ztoc(&std::fs::File::open(&layer).unwrap(), 1 << 20, "t")
                .unwrap();
        (std::fs::read(&layer).unwrap(), soci::ztoc::encode(&ztoc))
    }

    #[tokio::test]
    async fn a_kept_ztoc_opens_the_soci_layer_again_and_a_damaged_one_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = TocStore::open(dir.path().join("tocs")).unwrap();
        let (blob, ztoc) = gzip_layer_and_ztoc(dir.path());
        let kept = KeptZtoc {
            blob_size: blob.len() as u64,
            ztoc: ztoc.clone(),
            prefetch: vec![0..=0],
        };
        store.save_ztoc(DIGEST, &kept).unwrap();
        assert!(store.parse_memory_bound(DIGEST) >= ztoc.len() as u64 * ZTOC_PARSE_FACTOR);
        let again = store
            .load(DIGEST, None, &Cancel::new(), |size| {
                assert_eq!(size, blob.len() as u64);
                Arc::new(estargz::VecBlob::new(blob.clone())) as Arc<dyn BlobReader>
            })
            .unwrap()
            .unwrap();
        assert_eq!(again.footer().format, Format::Soci);
        assert_eq!(
            again.read_file_range("etc/motd", 0, 100).await.unwrap(),
            b"kept zTOC\n"
        );

        // One byte of the zTOC changed (and the checksum made to match): refused, deleted.
        let path = store.path_of(DIGEST).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let first = bytes.iter().position(|&b| b == b'\n').unwrap();
        let mut body = bytes[first + 1..].to_vec();
        let last = body.len() - 1;
        body[last] ^= 1;
        let mut forged = format!("{MAGIC} {VERSION} {}\n", Sha256Sum::of(&body).hex()).into_bytes();
        forged.extend_from_slice(&body);
        std::fs::write(&path, forged).unwrap();
        let err = store.load(DIGEST, None, &Cancel::new(), zeros).unwrap_err();
        assert!(err.contains("not the one verified"), "{err}");
        assert!(!store.contains(DIGEST));
    }

    #[tokio::test]
    async fn a_damaged_or_mismatching_file_is_refused_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = TocStore::open(dir.path().join("tocs")).unwrap();
        let (_, layer, toc, opts) = opened(b"some layer\n").await;
        let path = store.save(DIGEST, &layer, &toc, &opts).unwrap();
        let good = std::fs::read(&path).unwrap();

        // One flipped byte anywhere: refused, deleted.
        for at in [good.len() / 2, good.len() - 1, 30] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            let err = store
                .load(DIGEST, None, &Cancel::new(), |_| unreachable!())
                .unwrap_err();
            assert!(err.contains("checksum") || err.contains("version"), "{err}");
            assert!(!path.exists(), "a damaged file was kept");
            assert!(
                store
                    .load(DIGEST, None, &Cancel::new(), |_| unreachable!())
                    .unwrap()
                    .is_none()
            );
        }
        // Truncated (a crash mid-write cannot leave this, a full disk elsewhere might).
        std::fs::write(&path, &good[..good.len() - 10]).unwrap();
        assert!(
            store
                .load(DIGEST, None, &Cancel::new(), |_| unreachable!())
                .is_err()
        );
        assert!(!path.exists());

        // Intact, but the snapshot's label names another TOC: refused, deleted.
        std::fs::write(&path, &good).unwrap();
        let (_, other, _, _) = opened(b"another layer\n").await;
        let err = store
            .load(
                DIGEST,
                Some(other.toc_digest()),
                &Cancel::new(),
                |_| unreachable!(),
            )
            .unwrap_err();
        assert!(err.contains("TOC"), "{err}");
        assert!(!path.exists());

        // Kept for another digest (renamed by hand): refused.
        std::fs::write(&path, &good).unwrap();
        let elsewhere = DIGEST.replace("0123", "4567");
        std::fs::rename(&path, store.path_of(&elsewhere).unwrap()).unwrap();
        assert!(
            store
                .load(&elsewhere, None, &Cancel::new(), |_| unreachable!())
                .is_err()
        );
        assert!(!store.contains(&elsewhere));
    }

    #[tokio::test]
    async fn unverified_layers_and_odd_digests_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = TocStore::open(dir.path().join("tocs")).unwrap();
        let (_, layer, toc, _) = opened(b"x\n").await;
        assert!(
            store
                .save(DIGEST, &layer, &toc, &OpenOptions::default())
                .is_err()
        );
        let opts = OpenOptions {
            expected_toc_digest: Some(layer.toc_digest()),
            ..OpenOptions::default()
        };
        // TOC bytes that are not the layer's.
        assert!(store.save(DIGEST, &layer, b"nonsense", &opts).is_err());
        for digest in [
            "sha256:../../etc/passwd",
            "sha256:",
            "nodigest",
            "SHA256:ab",
            "a/b:cd",
        ] {
            assert!(store.save(digest, &layer, &toc, &opts).is_err(), "{digest}");
            assert!(
                store
                    .load(digest, None, &Cancel::new(), |_| unreachable!())
                    .unwrap()
                    .is_none()
            );
        }
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn retain_keeps_what_is_used_and_what_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let store = TocStore::open(dir.path().join("tocs")).unwrap();
        let (_, layer, toc, opts) = opened(b"x\n").await;
        let (a, b) = (DIGEST.to_string(), DIGEST.replace("0123", "4567"));
        store.save(&a, &layer, &toc, &opts).unwrap();
        store.save(&b, &layer, &toc, &opts).unwrap();
        // Both written after this point in time: neither goes.
        let past = SystemTime::now() - std::time::Duration::from_secs(60);
        assert_eq!(store.retain(&HashSet::new(), past), 0);
        let later = SystemTime::now() + std::time::Duration::from_secs(60);
        assert_eq!(store.retain(&HashSet::from([a.clone()]), later), 1);
        assert!(store.contains(&a));
        assert!(!store.contains(&b));
    }
}
