//! Layers written straight to an OCI image layout on disk, streaming (a 1 GiB layer never
//! sits in memory), with deterministic tar headers so a recipe always gives the same
//! digests; and a push of such a layout to a registry with curl.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use flate2::write::GzEncoder;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Every entry's mtime (2025-05-20, the Debian snapshot the recipes name): fixed so that
/// rebuilding gives the same bytes.
pub const MTIME: u64 = 1_747_699_200;

/// The workspace's media type names, the registry client's.
pub use registry::media_types::LAYER_GZIP;
use registry::media_types::{OCI_CONFIG, OCI_INDEX, OCI_MANIFEST};

/// Counts and hashes what passes through it.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn hash_writer<W>(inner: W) -> HashWriter<W> {
    HashWriter {
        inner,
        hasher: Sha256::new(),
        count: 0,
    }
}

/// A finished layer blob in a layout's `blobs/sha256`.
#[derive(Clone, Debug)]
pub struct LayerFile {
    pub digest: String,
    pub size: u64,
    pub diff_id: String,
}

type Sink = HashWriter<GzEncoder<HashWriter<BufWriter<File>>>>;

/// One gzip layer being written into `DIR/blobs/sha256`.
pub struct LayerBuilder {
    tar: tar::Builder<Sink>,
    tmp: PathBuf,
    blobs: PathBuf,
    /// (dev, inode) of regular files already in this layer, for hard links.
    links: HashMap<(u64, u64), String>,
}

impl LayerBuilder {
    pub fn new(layout: &Path, level: u32) -> anyhow::Result<Self> {
        let blobs = layout.join("blobs/sha256");
        std::fs::create_dir_all(&blobs)?;
        let tmp = blobs.join(format!(".layer-{}", std::process::id()));
        let file = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        let gz = GzEncoder::new(hash_writer(file), flate2::Compression::new(level));
        let mut tar = tar::Builder::new(hash_writer(gz));
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(Self {
            tar,
            tmp,
            blobs,
            links: HashMap::new(),
        })
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> anyhow::Result<()> {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.tar.append_data(
            &mut h,
            format!("{}/", path.trim_end_matches('/')),
            std::io::empty(),
        )?;
        Ok(())
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> anyhow::Result<()> {
        self.file_from(path, mode, data.len() as u64, data)
    }

    pub fn file_from(
        &mut self,
        path: &str,
        mode: u32,
        size: u64,
        data: impl Read,
    ) -> anyhow::Result<()> {
        let mut h = Self::header(tar::EntryType::Regular, mode, size);
        self.tar.append_data(&mut h, path, data)?;
        Ok(())
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut h, path, target)?;
        Ok(())
    }

    /// Copies the entry at `root/rel` (file, dir, symlink; hard links within the layer
    /// stay hard links) with its mode and owner; device nodes and sockets are skipped,
    /// because a container gets its own /dev.
    pub fn copy_from(&mut self, root: &Path, rel: &str) -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let path = root.join(rel);
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let ft = meta.file_type();
        let mode = meta.mode() & 0o7777;
        let kind = if ft.is_dir() {
            tar::EntryType::Directory
        } else if ft.is_symlink() {
            tar::EntryType::Symlink
        } else if ft.is_file() {
            tar::EntryType::Regular
        } else {
            return Ok(());
        };
        let mut h = Self::header(kind, mode, 0);
        h.set_uid(meta.uid().into());
        h.set_gid(meta.gid().into());
        // Python checks a .pyc against its source's mtime and recompiles on a mismatch,
        // so sources keep theirs (from the .deb, so still reproducible); everything else
        // is clamped, which evens out the install-time stamps of generated files.
        let real = u64::try_from(meta.mtime()).unwrap_or(0);
        h.set_mtime(if rel.ends_with(".py") {
            real
        } else {
            real.min(MTIME)
        });
        match kind {
            tar::EntryType::Directory => {
                self.tar
                    .append_data(&mut h, format!("{rel}/"), std::io::empty())?;
            }
            tar::EntryType::Symlink => {
                let target = std::fs::read_link(&path)?;
                self.tar.append_link(&mut h, rel, &target)?;
            }
            _ => {
                let key = (meta.dev(), meta.ino());
                if meta.nlink() > 1 {
                    if let Some(first) = self.links.get(&key) {
                        h.set_entry_type(tar::EntryType::Link);
                        let first = first.clone();
                        self.tar.append_link(&mut h, rel, &first)?;
                        return Ok(());
                    }
                    self.links.insert(key, rel.to_string());
                }
                h.set_size(meta.len());
                self.tar.append_data(&mut h, rel, File::open(&path)?)?;
            }
        }
        Ok(())
    }

    /// Ends the tar stream and the gzip member, and names the blob by its digest.
    pub fn finish(self) -> anyhow::Result<LayerFile> {
        let outer = self.tar.into_inner()?;
        let diff_id = format!("sha256:{:x}", outer.hasher.finalize());
        let inner = outer.inner.finish()?;
        let size = inner.count;
        let hex = format!("{:x}", inner.hasher.finalize());
        let mut file = inner.inner;
        file.flush()?;
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&self.tmp, self.blobs.join(&hex))?;
        Ok(LayerFile {
            digest: format!("sha256:{hex}"),
            size,
            diff_id,
        })
    }
}

/// Writes a blob into the layout; returns its descriptor fields.
fn put_blob(layout: &Path, data: &[u8]) -> anyhow::Result<(String, u64)> {
    let hex = format!("{:x}", Sha256::digest(data));
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    std::fs::write(blobs.join(&hex), data)?;
    Ok((format!("sha256:{hex}"), data.len() as u64))
}

/// Writes config, manifest, `index.json` (with `tag` as the ref name) and `oci-layout`.
pub fn write_layout(
    layout: &Path,
    layers: &[LayerFile],
    cmd: &[String],
    env: &[String],
    tag: &str,
) -> anyhow::Result<()> {
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2025-05-20T00:00:00Z",
        "config": {"Env": env, "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
        "history": layers.iter().map(|_| json!({"created_by": "lazysnap-bench"})).collect::<Vec<_>>(),
    });
    let (config_digest, config_size) = put_blob(layout, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layers.iter().map(|l| json!({"mediaType": LAYER_GZIP, "digest": l.digest, "size": l.size})).collect::<Vec<_>>(),
    });
    let (manifest_digest, manifest_size) = put_blob(layout, &serde_json::to_vec(&manifest)?)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(())
}

/// The layout's image manifest (the first in `index.json`), with its media type.
pub fn read_manifest(layout: &Path) -> anyhow::Result<(Value, Vec<u8>, String)> {
    let (root, bytes, media_type) = read_root(layout)?;
    if media_type != OCI_INDEX {
        return Ok((root, bytes, media_type));
    }
    // An index (a SOCI v2 image): its image manifest, not the artifacts beside it.
    let desc = root["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d.get("artifactType").is_none())
        .context("an index without an image manifest")?;
    let digest = desc["digest"]
        .as_str()
        .context("a manifest without a digest")?;
    let media_type = desc["mediaType"]
        .as_str()
        .unwrap_or(OCI_MANIFEST)
        .to_string();
    let bytes = std::fs::read(blob_path(layout, digest))?;
    Ok((serde_json::from_slice(&bytes)?, bytes, media_type))
}

/// What the layout's index.json names: JSON, bytes and media type.
pub fn read_root(layout: &Path) -> anyhow::Result<(Value, Vec<u8>, String)> {
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let desc = &index["manifests"][0];
    let digest = desc["digest"]
        .as_str()
        .context("index.json without a manifest digest")?;
    let media_type = desc["mediaType"]
        .as_str()
        .unwrap_or(OCI_MANIFEST)
        .to_string();
    let bytes = std::fs::read(blob_path(layout, digest))?;
    Ok((serde_json::from_slice(&bytes)?, bytes, media_type))
}

pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs").join(digest.replace(':', "/"))
}

/// Sum of the layer sizes of the layout's image: what a full pull downloads.
pub fn compressed_size(layout: &Path) -> anyhow::Result<u64> {
    let (manifest, _, _) = read_manifest(layout)?;
    Ok(manifest["layers"]
        .as_array()
        .map(|ls| ls.iter().filter_map(|l| l["size"].as_u64()).sum())
        .unwrap_or(0))
}

/// Pushes the layout's image to `host/repo:tag` over plain HTTP (blobs the registry has
/// already are skipped), with curl uploading from the files.
pub fn push_layout(layout: &Path, host: &str, repo: &str, tag: &str) -> anyhow::Result<()> {
    let (root, bytes, media_type) = read_root(layout)?;
    if media_type != OCI_INDEX {
        return push_manifest(layout, host, repo, tag, &root, &bytes, &media_type);
    }
    // Each manifest of the index (an image, a SOCI index) by digest, then the index.
    for desc in root["manifests"].as_array().into_iter().flatten() {
        let digest = desc["digest"]
            .as_str()
            .context("a manifest without a digest")?;
        let child_type = desc["mediaType"].as_str().unwrap_or(OCI_MANIFEST);
        let child_bytes = std::fs::read(blob_path(layout, digest))?;
        let child: Value = serde_json::from_slice(&child_bytes)?;
        push_manifest(layout, host, repo, digest, &child, &child_bytes, child_type)?;
    }
    put_manifest(host, repo, tag, &bytes, &media_type)
}

/// Pushes a manifest's config and layers (those the registry lacks), then the manifest
/// under `reference` (a tag or its digest).
fn push_manifest(
    layout: &Path,
    host: &str,
    repo: &str,
    reference: &str,
    manifest: &Value,
    bytes: &[u8],
    media_type: &str,
) -> anyhow::Result<()> {
    let mut digests = vec![
        manifest["config"]["digest"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    ];
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        digests.push(layer["digest"].as_str().unwrap_or("").to_string());
    }
    let base = format!("http://{host}/v2/{repo}");
    for digest in digests {
        let (code, _) = curl(&["--head", &format!("{base}/blobs/{digest}")])?;
        if code == 200 {
            continue;
        }
        let (code, headers) = curl(&["-X", "POST", &format!("{base}/blobs/uploads/")])?;
        if code != 202 {
            bail!("registry {host}: upload POST for {digest} answered {code}");
        }
        let location = headers
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case("location"))
            .map(|(_, v)| v.trim().to_string())
            .context("upload POST without Location")?;
        let mut url = if location.starts_with('/') {
            format!("http://{host}{location}")
        } else {
            location
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={}", digest.replace(':', "%3A")));
        let file = blob_path(layout, &digest);
        let file = file.to_str().context("non-UTF-8 path")?;
        let (code, _) = curl(&[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--upload-file",
            file,
            &url,
        ])?;
        if code != 201 {
            bail!("registry {host}: uploading {digest} answered {code}");
        }
    }
    put_manifest(host, repo, reference, bytes, media_type)
}

/// PUTs manifest or index `bytes` as `host/repo:reference`.
fn put_manifest(
    host: &str,
    repo: &str,
    reference: &str,
    bytes: &[u8],
    media_type: &str,
) -> anyhow::Result<()> {
    let manifest_file = tempfile::NamedTempFile::new()?;
    std::fs::write(manifest_file.path(), bytes)?;
    let path = manifest_file.path().to_str().context("non-UTF-8 path")?;
    let (code, _) = curl(&[
        "-X",
        "PUT",
        "-H",
        &format!("Content-Type: {media_type}"),
        "--upload-file",
        path,
        &format!("http://{host}/v2/{repo}/manifests/{reference}"),
    ])?;
    if code != 201 {
        bail!("registry {host}: putting the manifest {repo}:{reference} answered {code}");
    }
    Ok(())
}

/// Runs curl; returns the HTTP status and the response headers.
fn curl(args: &[&str]) -> anyhow::Result<(u16, String)> {
    let headers = tempfile::NamedTempFile::new()?;
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--output", "/dev/null"])
        .args(["--write-out", "%{http_code}", "--dump-header"])
        .arg(headers.path())
        .args(args)
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!(
            "curl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let code = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok((
        code,
        std::fs::read_to_string(headers.path()).unwrap_or_default(),
    ))
}
