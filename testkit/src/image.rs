//! Small OCI images built in memory: layers from lists of entries (or caller-supplied,
//! pre-compressed blobs such as eStargz), an image config and an OCI manifest, all with
//! their sha256 digests; written out as an OCI image layout directory on request.
//!
//! Everything is deterministic (fixed mtimes, uid/gid 0, no gzip timestamp), so the same
//! entries always give the same digests.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

// The workspace's media type names (the registry client's), under the names tests use.
pub use registry::media_types::{
    LAYER_GZIP as MEDIA_TYPE_LAYER_GZIP, LAYER_TAR as MEDIA_TYPE_LAYER_TAR,
    LAYER_ZSTD as MEDIA_TYPE_LAYER_ZSTD, OCI_CONFIG as MEDIA_TYPE_CONFIG,
    OCI_INDEX as MEDIA_TYPE_INDEX, OCI_MANIFEST as MEDIA_TYPE_MANIFEST,
};

/// The PATH that images built here set, so `ctr run IMAGE echo` finds `/bin/echo`.
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Modification time of every tar entry (2020-01-01T00:00:00Z): fixed for reproducible digests.
const MTIME: u64 = 1_577_836_800;

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// One entry of a layer tar. Paths are relative to the image root (`bin/sh`, not `/bin/sh`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        content: Vec<u8>,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// A hard link to `target`, an earlier entry of the same layer.
    Hardlink {
        path: String,
        target: String,
    },
    /// Deletes `path` from lower layers: packed as an empty file `DIR/.wh.NAME`.
    Whiteout {
        path: String,
    },
    /// Hides everything lower layers have in directory `dir`: packed as `DIR/.wh..wh..opq`.
    Opaque {
        dir: String,
    },
}

impl Entry {
    pub fn dir(path: &str) -> Self {
        Entry::Dir {
            path: path.to_string(),
            mode: 0o755,
        }
    }

    pub fn dir_mode(path: &str, mode: u32) -> Self {
        Entry::Dir {
            path: path.to_string(),
            mode,
        }
    }

    /// A regular file with mode 0644.
    pub fn file(path: &str, content: impl Into<Vec<u8>>) -> Self {
        Self::file_mode(path, content, 0o644)
    }

    pub fn file_mode(path: &str, content: impl Into<Vec<u8>>, mode: u32) -> Self {
        Entry::File {
            path: path.to_string(),
            content: content.into(),
            mode,
        }
    }

    pub fn symlink(path: &str, target: &str) -> Self {
        Entry::Symlink {
            path: path.to_string(),
            target: target.to_string(),
        }
    }

    pub fn hardlink(path: &str, target: &str) -> Self {
        Entry::Hardlink {
            path: path.to_string(),
            target: target.to_string(),
        }
    }

    pub fn whiteout(path: &str) -> Self {
        Entry::Whiteout {
            path: path.to_string(),
        }
    }

    pub fn opaque(dir: &str) -> Self {
        Entry::Opaque {
            dir: dir.to_string(),
        }
    }
}

/// Strips leading `/` and `./` and trailing `/`, so callers may write paths either way.
fn clean(path: &str) -> anyhow::Result<String> {
    let trimmed = path.trim_start_matches("./").trim_matches('/');
    if trimmed.is_empty() || trimmed.split('/').any(|c| c == ".." || c.is_empty()) {
        anyhow::bail!("bad layer entry path {path:?}");
    }
    Ok(trimmed.to_string())
}

/// `dir/.wh.name` (or `.wh.name` at the root) for a whiteout of `path`.
fn whiteout_name(path: &str, prefix_of_name: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/{prefix_of_name}{name}"),
        None => format!("{prefix_of_name}{path}"),
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    // GNU headers: the tar crate then writes long names and link targets as GNU extensions,
    // which containerd's and Go's archive/tar readers both understand.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// The uncompressed tar of `entries`, in the given order.
pub fn tar_bytes(entries: &[Entry]) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        match entry {
            Entry::Dir { path, mode } => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                // Directories carry a trailing slash in tar, as docker and buildkit write them.
                builder.append_data(&mut h, format!("{}/", clean(path)?), std::io::empty())?;
            }
            Entry::File {
                path,
                content,
                mode,
            } => {
                let mut h = header(tar::EntryType::Regular, *mode, content.len() as u64);
                builder.append_data(&mut h, clean(path)?, content.as_slice())?;
            }
            Entry::Symlink { path, target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                builder.append_link(&mut h, clean(path)?, target)?;
            }
            Entry::Hardlink { path, target } => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                builder.append_link(&mut h, clean(path)?, clean(target)?)?;
            }
            Entry::Whiteout { path } => {
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                let name = whiteout_name(&clean(path)?, ".wh.");
                builder.append_data(&mut h, name, std::io::empty())?;
            }
            Entry::Opaque { dir } => {
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                let name = format!("{}/.wh..wh..opq", clean(dir)?);
                builder.append_data(&mut h, name, std::io::empty())?;
            }
        }
    }
    Ok(builder.into_inner()?)
}

/// gzip of `data` with no timestamp or file name in the header (reproducible).
pub fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    encoder.write_all(data)?;
    Ok(encoder.finish()?)
}

/// An eStargz layer built by hand holding one file, `name`, of `size` zero bytes as a
/// single chunk (a hostile layer when the chunk is huge or the name too long: no
/// converter writes those). Streams the
/// zeros, so a 2 GiB file costs seconds, not memory. Returns the blob, its diff ID and
/// its TOC digest.
pub fn one_chunk_estargz(name: &str, size: u64) -> anyhow::Result<(Vec<u8>, String, String)> {
    let member = |data: &[u8]| -> anyhow::Result<Vec<u8>> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data)?;
        Ok(gz.finish()?)
    };
    let mut blob = Vec::new();
    let mut diff = Sha256::new();
    let mut headers = Vec::new();
    let mut h = header(tar::EntryType::Regular, 0o644, size);
    if name.len() > 100 {
        // GNU's long name: a `././@LongLink` entry holding it, then the header.
        let mut long = header(tar::EntryType::GNULongName, 0o644, name.len() as u64 + 1);
        long.set_path("././@LongLink")?;
        long.set_cksum();
        headers.extend_from_slice(long.as_bytes());
        let mut data = name.as_bytes().to_vec();
        data.resize((name.len() + 1).div_ceil(512) * 512, 0);
        headers.extend_from_slice(&data);
        h.as_gnu_mut()
            .ok_or_else(|| anyhow::anyhow!("not a GNU header"))?
            .name
            .copy_from_slice(&name.as_bytes()[..100]);
    } else {
        h.set_path(name)?;
    }
    h.set_cksum();
    headers.extend_from_slice(h.as_bytes());
    diff.update(&headers);
    blob.extend(member(&headers)?);
    // The payload's own member, as eStargz puts each chunk.
    let payload_offset = blob.len();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let zeros = vec![0u8; 1 << 20];
    let mut file = Sha256::new();
    let mut left = size;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        gz.write_all(&zeros[..n])?;
        diff.update(&zeros[..n]);
        file.update(&zeros[..n]);
        left -= n as u64;
    }
    let pad = ((512 - size % 512) % 512) as usize;
    gz.write_all(&zeros[..pad])?;
    diff.update(&zeros[..pad]);
    blob.extend(gz.finish()?);
    let file_digest = format!("sha256:{:x}", file.finalize());
    let toc = serde_json::to_vec(&json!({
        "version": 1,
        "entries": [{
            "name": name, "type": "reg", "size": size, "mode": 0o644,
            "offset": payload_offset, "digest": file_digest, "chunkDigest": file_digest,
        }],
    }))?;
    let toc_offset = blob.len() as u64;
    let mut toc_tar = tar::Builder::new(Vec::new());
    let mut th = header(tar::EntryType::Regular, 0o444, toc.len() as u64);
    toc_tar.append_data(&mut th, "stargz.index.json", &toc[..])?;
    let toc_tar = toc_tar.into_inner()?;
    diff.update(&toc_tar);
    blob.extend(member(&toc_tar)?);
    // The footer: an empty gzip member whose extra field says where the TOC is.
    blob.extend(estargz::estargz_footer(toc_offset));
    Ok((
        blob,
        format!("sha256:{:x}", diff.finalize()),
        sha256_digest(&toc),
    ))
}

/// An eStargz layer made of nothing but the TOC `toc_json` (entries without payload:
/// directories, fifos, symlinks), whatever it says: a hostile TOC's carrier. Returns the
/// blob, its diff ID and the TOC digest that verifies it.
pub fn estargz_of_toc(toc_json: &[u8]) -> anyhow::Result<(Vec<u8>, String, String)> {
    let mut toc_tar = tar::Builder::new(Vec::new());
    let mut th = header(tar::EntryType::Regular, 0o444, toc_json.len() as u64);
    toc_tar.append_data(&mut th, "stargz.index.json", toc_json)?;
    let toc_tar = toc_tar.into_inner()?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&toc_tar)?;
    let mut blob = gz.finish()?;
    blob.extend(estargz::estargz_footer(0));
    Ok((
        blob,
        format!("sha256:{:x}", Sha256::digest(&toc_tar)),
        sha256_digest(toc_json),
    ))
}

/// A content-addressed blob and its media type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub media_type: String,
    /// `sha256:<hex>` of `data`.
    pub digest: String,
    pub size: u64,
    pub data: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, data: Vec<u8>) -> Self {
        Self {
            media_type: media_type.to_string(),
            digest: sha256_digest(&data),
            size: data.len() as u64,
            data,
        }
    }

    /// The hex part of the digest, as used in `blobs/sha256/<hex>`.
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    /// An OCI descriptor (`mediaType`, `digest`, `size`) for this blob.
    pub fn descriptor(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

/// One image layer: the (compressed) blob, the digest of its uncompressed tar, and the
/// annotations its manifest descriptor carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    pub blob: Blob,
    /// `sha256:<hex>` of the uncompressed tar: goes into the config's `rootfs.diff_ids`.
    pub diff_id: String,
    pub annotations: BTreeMap<String, String>,
}

impl Layer {
    /// A tar+gzip layer of `entries`.
    pub fn from_entries(entries: &[Entry]) -> anyhow::Result<Self> {
        let tar = tar_bytes(entries)?;
        let diff_id = sha256_digest(&tar);
        Ok(Self {
            blob: Blob::new(MEDIA_TYPE_LAYER_GZIP, gzip(&tar)?),
            diff_id,
            annotations: BTreeMap::new(),
        })
    }

    /// A layer blob the caller compressed itself (an eStargz or zstd:chunked blob, say);
    /// `diff_id` is the sha256 of its uncompressed tar.
    pub fn precompressed(data: Vec<u8>, media_type: &str, diff_id: &str) -> Self {
        Self {
            blob: Blob::new(media_type, data),
            diff_id: diff_id.to_string(),
            annotations: BTreeMap::new(),
        }
    }

    pub fn with_annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }

    /// The manifest descriptor, with annotations when there are any.
    pub fn descriptor(&self) -> Value {
        let mut descriptor = self.blob.descriptor();
        if !self.annotations.is_empty() {
            descriptor["annotations"] = json!(self.annotations);
        }
        descriptor
    }
}

/// Names under `bin/` that [`busybox_entries`] links to `/bin/busybox`.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh",
    "ash",
    "echo",
    "cat",
    "ls",
    "sleep",
    "true",
    "false",
    "test",
    "[",
    "env",
    "id",
    "mkdir",
    "rm",
    "rmdir",
    "cp",
    "mv",
    "ln",
    "touch",
    "stat",
    "head",
    "tail",
    "wc",
    "grep",
    "find",
    "readlink",
    "sha256sum",
    "md5sum",
    "dd",
    "uname",
    "ps",
    "mount",
    "df",
    "du",
    "od",
    "hexdump",
    "diff",
    "sort",
    "tr",
    "cut",
    "sync",
    "kill",
    "date",
    "printf",
    "pwd",
    "tee",
];

/// Entries of a minimal busybox root: `bin/busybox` (the host's static `/bin/busybox`,
/// from the Debian package busybox-static), applet symlinks and the usual empty dirs.
pub fn busybox_entries() -> anyhow::Result<Vec<Entry>> {
    let source = Path::new("/bin/busybox");
    let binary = std::fs::read(source).with_context(|| {
        format!(
            "reading {}: install the Debian package busybox-static",
            source.display()
        )
    })?;
    let mut entries = vec![
        Entry::dir("bin"),
        Entry::file_mode("bin/busybox", binary, 0o755),
    ];
    for applet in BUSYBOX_APPLETS {
        entries.push(Entry::symlink(&format!("bin/{applet}"), "busybox"));
    }
    for dir in ["dev", "proc", "sys", "run", "root", "var"] {
        entries.push(Entry::dir(dir));
    }
    entries.push(Entry::dir_mode("tmp", 0o1777));
    entries.push(Entry::dir("etc"));
    entries.push(Entry::file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"));
    entries.push(Entry::file("etc/group", "root:x:0:\n"));
    Ok(entries)
}

/// A tar+gzip layer of [`busybox_entries`].
pub fn busybox_layer() -> anyhow::Result<Layer> {
    Layer::from_entries(&busybox_entries()?)
}

/// Builds an [`Image`]: layers bottom first, then the config's process settings.
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    layers: Vec<Layer>,
    architecture: String,
    os: String,
    env: Vec<String>,
    cmd: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    working_dir: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

impl ImageBuilder {
    /// No layers yet; linux on the host's architecture (amd64 here); Env is [`DEFAULT_PATH_ENV`].
    pub fn new() -> Self {
        Self {
            layers: Vec::new(),
            architecture: registry::Platform::host().architecture,
            os: "linux".to_string(),
            env: vec![DEFAULT_PATH_ENV.to_string()],
            cmd: None,
            entrypoint: None,
            working_dir: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }

    /// Appends a layer (on top of those added before).
    pub fn layer(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }

    /// Appends a tar+gzip layer of `entries`.
    pub fn entries(self, entries: &[Entry]) -> anyhow::Result<Self> {
        Ok(self.layer(Layer::from_entries(entries)?))
    }

    pub fn architecture(mut self, architecture: &str) -> Self {
        self.architecture = architecture.to_string();
        self
    }

    /// Adds `KEY=VALUE` to the config's Env (a `PATH=` entry replaces the default PATH).
    pub fn env(mut self, key_value: &str) -> Self {
        if let Some((key, _)) = key_value.split_once('=') {
            let prefix = format!("{key}=");
            self.env.retain(|e| !e.starts_with(&prefix));
        }
        self.env.push(key_value.to_string());
        self
    }

    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = Some(strings(cmd));
        self
    }

    pub fn entrypoint(mut self, entrypoint: &[&str]) -> Self {
        self.entrypoint = Some(strings(entrypoint));
        self
    }

    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = Some(dir.to_string());
        self
    }

    /// A config label (`config.Labels`).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// A manifest annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }

    pub fn build(self) -> anyhow::Result<Image> {
        if self.layers.is_empty() {
            anyhow::bail!("an image needs at least one layer");
        }
        let mut process = serde_json::Map::new();
        process.insert("Env".into(), json!(self.env));
        if let Some(cmd) = &self.cmd {
            process.insert("Cmd".into(), json!(cmd));
        }
        if let Some(entrypoint) = &self.entrypoint {
            process.insert("Entrypoint".into(), json!(entrypoint));
        }
        if let Some(dir) = &self.working_dir {
            process.insert("WorkingDir".into(), json!(dir));
        }
        if !self.labels.is_empty() {
            process.insert("Labels".into(), json!(self.labels));
        }
        let diff_ids: Vec<&str> = self.layers.iter().map(|l| l.diff_id.as_str()).collect();
        let history: Vec<Value> = self
            .layers
            .iter()
            .map(|_| json!({ "created": "2020-01-01T00:00:00Z", "created_by": "testkit" }))
            .collect();
        let config = json!({
            "created": "2020-01-01T00:00:00Z",
            "architecture": self.architecture,
            "os": self.os,
            "config": process,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": history,
        });
        let config = Blob::new(MEDIA_TYPE_CONFIG, serde_json::to_vec(&config)?);

        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": config.descriptor(),
            "layers": self.layers.iter().map(Layer::descriptor).collect::<Vec<_>>(),
        });
        if !self.annotations.is_empty() {
            manifest["annotations"] = json!(self.annotations);
        }
        let manifest = Blob::new(MEDIA_TYPE_MANIFEST, serde_json::to_vec(&manifest)?);
        Ok(Image {
            config,
            layers: self.layers,
            manifest,
            architecture: self.architecture,
            os: self.os,
        })
    }
}

/// A built image: every blob with its digest and size.
#[derive(Clone, Debug)]
pub struct Image {
    pub config: Blob,
    pub layers: Vec<Layer>,
    pub manifest: Blob,
    architecture: String,
    os: String,
}

impl Image {
    /// Config and layer blobs: what must be in a registry before the manifest.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(self.layers.iter().map(|l| &l.blob))
    }

    /// The manifest's descriptor as an index lists it (with the platform).
    pub fn manifest_descriptor(&self) -> Value {
        let mut descriptor = self.manifest.descriptor();
        descriptor["platform"] = json!({ "architecture": self.architecture, "os": self.os });
        descriptor
    }

    /// Writes an OCI image layout at `dir` (created if missing): `oci-layout`, `index.json`
    /// listing this manifest (annotated `org.opencontainers.image.ref.name` = `ref_name` when
    /// given) and `blobs/sha256/<hex>` for the manifest, config and layers.
    pub fn write_oci_layout(&self, dir: &Path, ref_name: Option<&str>) -> anyhow::Result<()> {
        let blobs = dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
        for blob in self.blobs().chain(std::iter::once(&self.manifest)) {
            let path = blobs.join(blob.hex());
            std::fs::write(&path, &blob.data)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        std::fs::write(
            dir.join("oci-layout"),
            serde_json::to_vec(&json!({ "imageLayoutVersion": "1.0.0" }))?,
        )?;
        let mut descriptor = self.manifest_descriptor();
        if let Some(name) = ref_name {
            descriptor["annotations"] = json!({ "org.opencontainers.image.ref.name": name });
        }
        let index = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [descriptor],
        });
        std::fs::write(dir.join("index.json"), serde_json::to_vec_pretty(&index)?)?;
        Ok(())
    }
}

/// Deterministic incompressible bytes (xorshift), so a file of them really costs its size
/// to fetch: the lazy-pulling tests put such files where a container must not read them.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tar: &[u8]) -> Vec<(String, tar::EntryType, Option<String>)> {
        let mut archive = tar::Archive::new(tar);
        archive
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                let link = e
                    .link_name()
                    .expect("link name")
                    .map(|l| l.to_string_lossy().into_owned());
                (
                    e.path().expect("path").to_string_lossy().into_owned(),
                    e.header().entry_type(),
                    link,
                )
            })
            .collect()
    }

    #[test]
    fn tar_has_every_kind_of_entry() {
        let long = format!("d/{}", "x".repeat(150));
        let tar = tar_bytes(&[
            Entry::dir("/d/"),
            Entry::file_mode("d/f", "hi", 0o600),
            Entry::symlink("d/s", "f"),
            Entry::hardlink("d/h", "d/f"),
            Entry::whiteout("d/gone"),
            Entry::whiteout("top"),
            Entry::opaque("d"),
            Entry::file(&long, "long"),
        ])
        .expect("tar");
        let got = names(&tar);
        let kinds: Vec<(&str, tar::EntryType)> =
            got.iter().map(|(n, k, _)| (n.as_str(), *k)).collect();
        assert_eq!(
            kinds,
            vec![
                ("d/", tar::EntryType::Directory),
                ("d/f", tar::EntryType::Regular),
                ("d/s", tar::EntryType::Symlink),
                ("d/h", tar::EntryType::Link),
                ("d/.wh.gone", tar::EntryType::Regular),
                (".wh.top", tar::EntryType::Regular),
                ("d/.wh..wh..opq", tar::EntryType::Regular),
                (long.as_str(), tar::EntryType::Regular),
            ]
        );
        assert_eq!(got[2].2.as_deref(), Some("f"));
        assert_eq!(got[3].2.as_deref(), Some("d/f"));
        assert!(tar_bytes(&[Entry::file("../escape", "")]).is_err());
    }

    #[test]
    fn layers_and_images_are_reproducible_and_consistent() {
        let entries = [Entry::dir("a"), Entry::file("a/b", "content")];
        let one = Layer::from_entries(&entries).expect("layer");
        let two = Layer::from_entries(&entries).expect("layer");
        assert_eq!(one, two);
        assert_eq!(
            one.diff_id,
            sha256_digest(&tar_bytes(&entries).expect("tar"))
        );

        let image = ImageBuilder::new()
            .layer(one.with_annotation("k", "v"))
            .cmd(&["/bin/sh"])
            .build()
            .expect("image");
        let manifest: Value = serde_json::from_slice(&image.manifest.data).expect("json");
        assert_eq!(manifest["mediaType"], MEDIA_TYPE_MANIFEST);
        assert_eq!(manifest["config"]["digest"], image.config.digest.as_str());
        assert_eq!(manifest["layers"][0]["mediaType"], MEDIA_TYPE_LAYER_GZIP);
        assert_eq!(manifest["layers"][0]["annotations"]["k"], "v");
        let config: Value = serde_json::from_slice(&image.config.data).expect("json");
        assert_eq!(config["rootfs"]["diff_ids"][0], two.diff_id.as_str());
        assert_eq!(config["config"]["Cmd"][0], "/bin/sh");
        assert_eq!(config["config"]["Env"][0], DEFAULT_PATH_ENV);
        assert_eq!(image.blobs().count(), 2);
    }

    #[test]
    fn oci_layout_has_index_and_blobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = ImageBuilder::new()
            .layer(Layer::precompressed(
                b"not really zstd".to_vec(),
                MEDIA_TYPE_LAYER_ZSTD,
                "sha256:00",
            ))
            .build()
            .expect("image");
        image
            .write_oci_layout(dir.path(), Some("latest"))
            .expect("layout");
        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).expect("read"))
                .expect("json");
        assert_eq!(
            index["manifests"][0]["digest"],
            image.manifest.digest.as_str()
        );
        assert_eq!(
            index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
            "latest"
        );
        for blob in image.blobs().chain([&image.manifest]) {
            let data =
                std::fs::read(dir.path().join("blobs/sha256").join(blob.hex())).expect("blob file");
            assert_eq!(sha256_digest(&data), blob.digest);
        }
        assert!(dir.path().join("oci-layout").is_file());
    }
}
