//! The floor: the cold start a perfect lazy snapshotter would need on the link, so that
//! the report can say how far each snapshotter is from it, not only from the other.
//!
//! A perfect snapshotter fetches only what cannot be avoided, each byte once, and waits
//! only for the round trips that depend on an earlier answer:
//!
//! - bytes: the image manifest and config, every layer's TOC (compressed, with its
//!   footer), and the chunks the workload's reads touch (their compressed ranges, each
//!   counted once even when chunks share a gzip member or reads share a chunk), taken
//!   from lazysnapd's access log (`GET /accessed`: per layer, each file's byte ranges the
//!   kernel read) mapped through the layer's TOC;
//! - round trips ([`ROUND_TRIPS`]): the manifest; then the config and all the TOCs at
//!   once (their digests are in the manifest); then all the chunks at once (their offsets
//!   are in the TOCs). Every dependent read chain of the workload (an import that needs
//!   the previous one's bytes) is assumed prefetched with the rest, and the container's
//!   create, start and CPU time count as zero;
//!
//! so `floor = ROUND_TRIPS * rtt + bytes / rate`, with the link's rate and round trip
//! measured once per run over the link ([`measure_link`]).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use estargz::{EntryKind, Index, OpenOptions};
use serde_json::Value;

use super::oci::{blob_path, read_manifest};
use soci::index_names as names;

/// Round trips a perfect lazy pull waits for: manifest; config and TOCs in parallel;
/// the chunks the workload reads, all at once.
pub const ROUND_TRIPS: u32 = 3;

/// What the link carries, measured: goodput of one long range GET, and the round trip of
/// an HTTP request for one byte (the smallest of a few).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkRate {
    pub bytes_per_s: f64,
    pub rtt: Duration,
}

/// The time, in seconds, a perfect lazy snapshotter needs to fetch `bytes` over `link`
/// with [`ROUND_TRIPS`] round trips.
pub fn floor_secs(bytes: u64, link: &LinkRate) -> f64 {
    f64::from(ROUND_TRIPS) * link.rtt.as_secs_f64() + bytes as f64 / link.bytes_per_s.max(1.0)
}

/// The bytes the floor counts for one lazy run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloorBytes {
    /// Manifest and config.
    pub meta: u64,
    /// Every layer's compressed TOC and footer.
    pub tocs: u64,
    /// The compressed ranges of the chunks the workload's reads touched.
    pub chunks: u64,
    /// How many distinct compressed ranges (gzip members, zstd frames) those are.
    pub chunk_count: u64,
    /// Files in the access log the TOC did not have (0 expected).
    pub unmatched_files: u64,
}

impl FloorBytes {
    pub fn total(&self) -> u64 {
        self.meta + self.tocs + self.chunks
    }
}

/// One layer's TOC: its compressed size (with the footer) and its index.
pub struct LayerToc {
    pub digest: String,
    pub toc_bytes: u64,
    pub index: Index,
}

/// Reads the footer and TOC of the layer blob at `path`.
pub fn read_layer_toc(path: &Path, digest: &str) -> anyhow::Result<LayerToc> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata()?.len();
    let tail_len = size.min(estargz::MAX_FOOTER_FETCH);
    let mut tail = vec![0; tail_len as usize];
    f.seek(SeekFrom::Start(size - tail_len))?;
    f.read_exact(&mut tail)?;
    let footer = estargz::parse_footer(&tail, size)
        .with_context(|| format!("layer {digest}: no eStargz or zstd:chunked footer"))?;
    let mut toc = vec![0; footer.toc_compressed_size as usize];
    f.seek(SeekFrom::Start(footer.toc_offset))?;
    f.read_exact(&mut toc)?;
    let parsed = estargz::parse_toc(&footer, &toc, &OpenOptions::default())
        .with_context(|| format!("layer {digest}: reading its TOC"))?;
    let index = Index::from_toc(&parsed.toc, footer.payload_end, footer.format)
        .with_context(|| format!("layer {digest}: indexing its TOC"))?;
    Ok(LayerToc {
        digest: digest.to_string(),
        toc_bytes: footer.toc_compressed_size + footer.footer_size,
        index,
    })
}

/// Every layer's TOC of the image in the OCI layout, and the manifest's and config's
/// sizes.
pub fn layout_tocs(layout: &Path) -> anyhow::Result<(Vec<LayerToc>, u64)> {
    if let Some(soci) = layout_ztocs(layout)? {
        return Ok(soci);
    }
    let (manifest, manifest_bytes, _) = read_manifest(layout)?;
    let config = manifest["config"]["size"].as_u64().unwrap_or(0);
    let mut tocs = Vec::new();
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        let digest = layer["digest"]
            .as_str()
            .context("a layer without a digest")?;
        tocs.push(read_layer_toc(&blob_path(layout, digest), digest)?);
    }
    Ok((tocs, manifest_bytes.len() as u64 + config))
}

/// A SOCI form's layout (the image and its SOCI index under one OCI index): each layer's
/// zTOC as a TOC whose chunks are span pieces (a read touches its whole span), and a layer
/// without a zTOC as fetched whole; None for any other layout.
fn layout_ztocs(layout: &Path) -> anyhow::Result<Option<(Vec<LayerToc>, u64)>> {
    let (root, root_bytes, _) = super::oci::read_root(layout)?;
    let Some(entries) = root["manifests"].as_array() else {
        return Ok(None);
    };
    let Some(index_desc) = entries
        .iter()
        .find(|d| d["artifactType"] == names::SOCI_INDEX_V2)
    else {
        return Ok(None);
    };
    let read_json = |digest: &str| -> anyhow::Result<(Value, u64)> {
        let bytes = std::fs::read(blob_path(layout, digest))?;
        Ok((serde_json::from_slice(&bytes)?, bytes.len() as u64))
    };
    let (index, index_size) = read_json(index_desc["digest"].as_str().context("no digest")?)?;
    let (manifest, manifest_bytes, _) = read_manifest(layout)?;
    let meta = root_bytes.len() as u64
        + manifest_bytes.len() as u64
        + index_size
        + manifest["config"]["size"].as_u64().unwrap_or(0);
    let mut tocs = Vec::new();
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        let digest = layer["digest"]
            .as_str()
            .context("a layer without a digest")?;
        let ztoc = index["layers"].as_array().into_iter().flatten().find(|z| {
            z["mediaType"] == names::ZTOC_MEDIA_TYPE
                && z["annotations"][names::ANNOTATION_LAYER_DIGEST] == digest
        });
        let cancel = estargz::Cancel::new();
        let toc = match ztoc {
            Some(z) => {
                let z_digest = z["digest"].as_str().context("a zTOC without a digest")?;
                let bytes = std::fs::read(blob_path(layout, z_digest))?;
                let spans = soci::layout::Layout::check(soci::ztoc::decode(&bytes)?)?;
                let index = spans.index(
                    &estargz::Sha256Sum::of(&bytes),
                    bytes.len() as u64,
                    &[],
                    &cancel,
                )?;
                LayerToc {
                    digest: digest.to_string(),
                    toc_bytes: bytes.len() as u64,
                    index,
                }
            }
            // Fetched whole when it mounts.
            None => LayerToc {
                digest: digest.to_string(),
                toc_bytes: layer["size"].as_u64().unwrap_or(0),
                index: Index::from_entries([], 0, estargz::Format::Soci, 0, &cancel)?,
            },
        };
        tocs.push(toc);
    }
    Ok(Some((tocs, meta)))
}

/// One file of lazysnapd's access log: its path in the layer and the ranges read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileReads {
    pub path: String,
    pub ranges: Vec<(u64, u64)>,
}

/// lazysnapd's `GET /accessed` answer: per layer digest, the files read.
pub fn parse_accessed(json: &str) -> anyhow::Result<HashMap<String, Vec<FileReads>>> {
    let v: Value = serde_json::from_str(json).context("parsing lazysnapd's access log")?;
    let mut out: HashMap<String, Vec<FileReads>> = HashMap::new();
    for layer in v.as_array().context("the access log is not a list")? {
        let digest = layer["layer"]
            .as_str()
            .context("an access-log layer without a digest")?;
        let files = out.entry(digest.to_string()).or_default();
        for f in layer["files"].as_array().into_iter().flatten() {
            let path = f["path"].as_str().unwrap_or_default().to_string();
            let ranges = f["ranges"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| Some((r[0].as_u64()?, r[1].as_u64()?)))
                .collect();
            files.push(FileReads { path, ranges });
        }
    }
    Ok(out)
}

/// The compressed ranges `[start, end)` of the chunks of `index` that the reads touch,
/// merged (chunks sharing a member, reads sharing a chunk, count once); and the files
/// the index does not have.
pub fn touched_ranges(index: &Index, files: &[FileReads]) -> (Vec<(u64, u64)>, u64) {
    let mut ranges = Vec::new();
    let mut unmatched = 0;
    for file in files {
        let Some(id) = index.lookup(&file.path) else {
            unmatched += 1;
            continue;
        };
        let entry = index.entry(index.resolve(id));
        if entry.kind() != EntryKind::Reg {
            continue;
        }
        let chunks = entry.chunks();
        for &(start, end) in &file.ranges {
            let end = end.min(entry.size());
            if start >= end {
                continue;
            }
            let first = chunks.partition_point(|c| c.file_offset + c.size <= start);
            let last = chunks.partition_point(|c| c.file_offset < end);
            for c in &chunks[first..last.max(first)] {
                if c.comp_end > c.comp_offset {
                    ranges.push((c.comp_offset, c.comp_end));
                }
            }
        }
    }
    (merge(ranges), unmatched)
}

/// Sorts and merges overlapping or touching ranges.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The floor's bytes for a run of the image in `tocs` whose access log is `accessed`.
pub fn floor_bytes(
    tocs: &[LayerToc],
    meta: u64,
    accessed: &HashMap<String, Vec<FileReads>>,
) -> FloorBytes {
    let mut b = FloorBytes {
        meta,
        ..FloorBytes::default()
    };
    for layer in tocs {
        b.tocs += layer.toc_bytes;
        if let Some(files) = accessed.get(&layer.digest) {
            let (ranges, unmatched) = touched_ranges(&layer.index, files);
            b.chunks += ranges.iter().map(|(s, e)| e - s).sum::<u64>();
            b.chunk_count += ranges.len() as u64;
            b.unmatched_files += unmatched;
        }
    }
    b
}

/// Runs curl with `-w FORMAT` on `url` (body discarded); returns its output fields.
fn curl_timed(url: &str, range: &str) -> anyhow::Result<Vec<f64>> {
    let out = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--fail",
            "--output",
            "/dev/null",
        ])
        .args(["--range", range, "--write-out"])
        .arg("%{size_download} %{time_pretransfer} %{time_starttransfer} %{time_total}")
        .arg(url)
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!(
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|f| f.parse::<f64>().context("curl's --write-out"))
        .collect()
}

/// Measures the link to the registry at `base` (`http://HOST/v2/REPO`) with the blob
/// `digest` of `size` bytes: the round trip is the smallest of five one-byte range GETs
/// (request sent to first byte back), the rate the best of two GETs of up to 32 MiB
/// (bytes over the time from the first byte to the last: the transfer alone).
pub fn measure_link(base: &str, digest: &str, size: u64) -> anyhow::Result<LinkRate> {
    let url = format!("{base}/blobs/{digest}");
    let mut rtt = f64::MAX;
    for _ in 0..5 {
        let f = curl_timed(&url, "0-0")?;
        rtt = rtt.min(f[2] - f[1]);
    }
    let len = size.min(32 << 20);
    if len < 1 << 20 {
        bail!("the blob {digest} is too small ({size} bytes) to measure the link's rate");
    }
    let mut rate = 0.0f64;
    for _ in 0..2 {
        let f = curl_timed(&url, &format!("0-{}", len - 1))?;
        let transfer = (f[3] - f[2]).max(1e-6);
        rate = rate.max(f[0] / transfer);
    }
    Ok(LinkRate {
        bytes_per_s: rate,
        rtt: Duration::from_secs_f64(rtt.max(0.0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use estargz::{Format, Toc, TocEntry};

    fn digest() -> String {
        estargz::Sha256Sum::of(b"x").to_string()
    }

    fn reg(name: &str, size: i64, offset: i64, chunk_size: i64) -> TocEntry {
        TocEntry {
            name: name.into(),
            kind: "reg".into(),
            size,
            offset,
            chunk_size,
            mode: 0o644,
            digest: digest(),
            chunk_digest: digest(),
            ..TocEntry::default()
        }
    }

    fn chunk(name: &str, offset: i64, chunk_offset: i64, chunk_size: i64) -> TocEntry {
        TocEntry {
            name: name.into(),
            kind: "chunk".into(),
            offset,
            chunk_offset,
            chunk_size,
            chunk_digest: digest(),
            ..TocEntry::default()
        }
    }

    /// `a`: 3 chunks of 100 bytes, compressed at 1000, 1040, 1100 (ends 1040, 1100,
    /// 1150); `b`: one chunk at 1150..1200; `h`: a hard link to `a`; the TOC at 1200.
    fn index() -> Index {
        let mut entries = vec![TocEntry {
            name: "d/".into(),
            kind: "dir".into(),
            mode: 0o755,
            ..TocEntry::default()
        }];
        entries.push(reg("d/a", 300, 1000, 100));
        entries.push(chunk("d/a", 1040, 100, 100));
        entries.push(chunk("d/a", 1100, 200, 100));
        entries.push(reg("d/b", 50, 1150, 0));
        entries.push(TocEntry {
            name: "h".into(),
            kind: "hardlink".into(),
            link_name: "d/a".into(),
            ..TocEntry::default()
        });
        let toc = Toc {
            version: 1,
            entries,
            tar_split_digest: String::new(),
        };
        Index::from_toc(&toc, 1200, Format::Estargz).expect("index")
    }

    fn reads(path: &str, ranges: &[(u64, u64)]) -> FileReads {
        FileReads {
            path: path.into(),
            ranges: ranges.to_vec(),
        }
    }

    #[test]
    fn reads_map_to_the_compressed_ranges_of_the_chunks_they_touch() {
        let idx = index();
        // One byte of the first chunk, and the last byte of the second to the first of
        // the third: chunks 1-3, contiguous in the blob, merged.
        let (r, missing) = touched_ranges(&idx, &[reads("d/a", &[(0, 1), (199, 201)])]);
        assert_eq!((r, missing), (vec![(1000, 1150)], 0));
        // The second chunk alone, read twice (directly and through the hard link).
        let (r, _) = touched_ranges(
            &idx,
            &[reads("d/a", &[(100, 150)]), reads("h", &[(120, 200)])],
        );
        assert_eq!(r, vec![(1040, 1100)]);
        // Reads past the end are cut at the file's size; empty ones touch nothing; a
        // file the TOC lacks is counted apart.
        let (r, missing) = touched_ranges(
            &idx,
            &[
                reads("d/b", &[(10, 5000)]),
                reads("d/a", &[(300, 400), (5, 5)]),
                reads("nope", &[(0, 1)]),
            ],
        );
        assert_eq!((r, missing), (vec![(1150, 1200)], 1));
        // Two distinct chunks apart in the blob stay two ranges.
        let (r, _) = touched_ranges(&idx, &[reads("d/a", &[(0, 1), (250, 260)])]);
        assert_eq!(r, vec![(1000, 1040), (1100, 1150)]);
    }

    #[test]
    fn floor_bytes_add_metadata_every_toc_and_the_chunks_of_read_layers() {
        let tocs = vec![
            LayerToc {
                digest: "sha256:aa".into(),
                toc_bytes: 500,
                index: index(),
            },
            LayerToc {
                digest: "sha256:bb".into(),
                toc_bytes: 70,
                index: index(),
            },
        ];
        let accessed = parse_accessed(
            r#"[{"layer":"sha256:aa","image":"x","files":[
                  {"path":"d/a","first_open_us":1,"read_bytes":2,"size":300,"ranges":[[0,1],[250,251]]},
                  {"path":"gone","first_open_us":2,"read_bytes":1,"size":1,"ranges":[[0,1]]}]},
                {"layer":"sha256:zz","image":"x","files":[]}]"#,
        )
        .expect("access log");
        let b = floor_bytes(&tocs, 900, &accessed);
        assert_eq!(
            b,
            FloorBytes {
                meta: 900,
                tocs: 570,
                chunks: 40 + 50,
                chunk_count: 2,
                unmatched_files: 1,
            }
        );
        assert_eq!(b.total(), 900 + 570 + 90);
    }

    #[test]
    fn the_floor_is_the_round_trips_plus_the_bytes_at_the_rate() {
        let link = LinkRate {
            bytes_per_s: 12_500_000.0,
            rtt: Duration::from_millis(20),
        };
        // 3 x 20 ms + 25 MB at 12.5 MB/s = 0.06 + 2.0.
        assert!((floor_secs(25_000_000, &link) - 2.06).abs() < 1e-9);
        assert!((floor_secs(0, &link) - 0.06).abs() < 1e-9);
    }

    #[test]
    fn ranges_merge_when_they_overlap_or_touch() {
        assert_eq!(
            merge(vec![(5, 7), (0, 2), (2, 3), (6, 9), (10, 11)]),
            vec![(0, 3), (5, 9), (10, 11)]
        );
    }

    /// A SOCI layout: the image (one gzip layer) and its v2 index under one OCI index.
    fn soci_layout(dir: &Path) -> (String, u64, Vec<u8>) {
        use std::io::Write;
        let mut tar = tar::Builder::new(Vec::new());
        let mut state = 3u64;
        for (name, len) in [("a", 10usize), ("big", 600_000), ("z", 10)] {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    (state >> 59) as u8 % 7 + b'a'
                })
                .collect();
            let mut h = tar::Header::new_ustar();
            h.set_size(len as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, &data[..]).unwrap();
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(&tar.into_inner().unwrap()).unwrap();
        let gz = gz.finish().unwrap();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&gz).unwrap();
        let ztoc = soci::ztoc::encode(
            &soci::ztoc_builder::build_ztoc(file.as_file(), 128 << 10, "t").unwrap(),
        );
        let blobs = dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |bytes: &[u8]| {
            let d = estargz::Sha256Sum::of(bytes).to_string();
            std::fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes).unwrap();
            d
        };
        let layer = put(&gz);
        let ztoc_digest = put(&ztoc);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "c", "digest": put(b"{}"), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer, "size": gz.len()}],
        }))
        .unwrap();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.amazon.soci.index.v2+json",
                       "digest": put(b"{}"), "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": ztoc_digest,
                        "size": ztoc.len(),
                        "annotations": {"com.amazon.soci.image-layer-digest": layer}}],
        }))
        .unwrap();
        let top = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": put(&manifest), "size": manifest.len()},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": put(&index), "size": index.len(),
                 "artifactType": "application/vnd.amazon.soci.index.v2+json"},
            ],
        }))
        .unwrap();
        let root = serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.index.v1+json",
             "digest": put(&top), "size": top.len()}]});
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&root).unwrap()).unwrap();
        (layer, ztoc.len() as u64, ztoc)
    }

    #[test]
    fn a_soci_layouts_floor_counts_whole_spans_and_the_ztocs() {
        let dir = tempfile::tempdir().unwrap();
        let (layer, ztoc_len, ztoc) = soci_layout(dir.path());
        let (tocs, meta) = layout_tocs(dir.path()).unwrap();
        assert_eq!(tocs.len(), 1);
        assert_eq!(tocs[0].toc_bytes, ztoc_len);
        assert!(meta > 0);
        // A read of 10 bytes of "a" costs the whole first span.
        let accessed = HashMap::from([(
            layer,
            vec![FileReads {
                path: "a".into(),
                ranges: vec![(0, 10)],
            }],
        )]);
        let b = floor_bytes(&tocs, meta, &accessed);
        let spans = soci::layout::Layout::check(soci::ztoc::decode(&ztoc).unwrap()).unwrap();
        let first = &spans.spans[0].compressed;
        assert!(spans.spans.len() > 2);
        assert_eq!((b.chunks, b.chunk_count), (first.end - first.start, 1));
        assert_eq!(b.tocs, ztoc_len);
    }
}
