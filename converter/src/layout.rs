//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/<algorithm>/<hex>`).
//!
//! Blobs are written to a temp file in the blobs directory and renamed into place, so
//! a blob file, once it has its digest for a name, is complete. `index.json` is written
//! the same way and last, so an interrupted conversion never leaves a reference to a
//! half-written image.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::oci::{Descriptor, Digest, Hasher, Index, OCI_INDEX, REF_NAME_ANNOTATION};

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Opens an existing layout (it must have `oci-layout` and `index.json`).
    pub fn open(root: &Path) -> Result<Self> {
        for f in ["oci-layout", "index.json"] {
            if !root.join(f).is_file() {
                return Err(Error::layout(
                    root,
                    format!("no {f}: not an OCI image layout"),
                ));
            }
        }
        Ok(Layout {
            root: root.to_path_buf(),
        })
    }

    /// Opens a layout to write into, creating the directory and `oci-layout` as needed.
    pub fn create(root: &Path) -> Result<Self> {
        let blobs = root.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs)
            .map_err(|e| Error::io(format!("creating {}", blobs.display()), e))?;
        let marker = root.join("oci-layout");
        if !marker.exists() {
            write_atomic(root, &marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        Ok(Layout {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// The index (`index.json`); an empty one when the file does not exist yet.
    pub fn read_index(&self) -> Result<Index> {
        let path = self.root.join("index.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Index {
                    schema_version: 2,
                    media_type: Some(OCI_INDEX.to_string()),
                    manifests: Vec::new(),
                    annotations: None,
                    other: Default::default(),
                });
            }
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::layout(&self.root, format!("index.json: {e}")))
    }

    /// The descriptor `index.json` lists under `tag` (`org.opencontainers.image.ref.name`),
    /// or its only entry when no tag is given.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor> {
        let index = self.read_index()?;
        let names = || {
            let v: Vec<&str> = index
                .manifests
                .iter()
                .filter_map(|d| d.annotation(REF_NAME_ANNOTATION))
                .collect();
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        match tag {
            Some(tag) => index
                .manifests
                .iter()
                .find(|d| d.annotation(REF_NAME_ANNOTATION) == Some(tag))
                .cloned()
                .ok_or_else(|| {
                    Error::layout(
                        &self.root,
                        format!("no image tagged {tag:?} (tags: {})", names()),
                    )
                }),
            None => match index.manifests.as_slice() {
                [only] => Ok(only.clone()),
                [] => Err(Error::layout(&self.root, "index.json lists no image")),
                _ => Err(Error::layout(
                    &self.root,
                    format!(
                        "index.json lists {} images: name one with oci:DIR:TAG (tags: {})",
                        index.manifests.len(),
                        names()
                    ),
                )),
            },
        }
    }

    /// Opens the blob of `desc`, checking that it exists and has the size announced.
    pub fn open_blob(&self, desc: &Descriptor, what: &'static str) -> Result<File> {
        let path = self.blob_path(&desc.digest);
        let file = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::MissingBlob {
                    what,
                    digest: desc.digest.clone(),
                    location: format!("OCI layout {}", self.root.display()),
                }
            } else {
                Error::io(format!("opening {}", path.display()), e)
            }
        })?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(format!("stat of {}", path.display()), e))?
            .len();
        if size != desc.size {
            return Err(Error::SizeMismatch {
                what,
                digest: desc.digest.clone(),
                expected: desc.size,
                actual: size,
            });
        }
        Ok(file)
    }

    /// Reads a small blob (manifest, config) whole and checks its digest.
    pub fn read_blob(&self, desc: &Descriptor, what: &'static str, limit: u64) -> Result<Vec<u8>> {
        if desc.size > limit {
            return Err(Error::TooLarge {
                what,
                digest: desc.digest.clone(),
                size: desc.size,
                limit,
            });
        }
        let file = self.open_blob(desc, what)?;
        let mut data = Vec::with_capacity(desc.size as usize);
        file.take(limit + 1)
            .read_to_end(&mut data)
            .map_err(|e| Error::io(format!("reading {what} {}", desc.digest), e))?;
        let actual = desc.digest.compute_like(&data);
        if actual != desc.digest {
            return Err(Error::DigestMismatch {
                what,
                digest: desc.digest.clone(),
                actual,
            });
        }
        Ok(data)
    }

    /// A temp file next to the blobs, to be renamed into place by [`Layout::commit_blob`].
    pub fn temp_blob(&self) -> Result<tempfile::NamedTempFile> {
        let dir = self.root.join("blobs").join("sha256");
        tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&dir)
            .map_err(|e| Error::io(format!("creating a temp file in {}", dir.display()), e))
    }

    /// Moves a finished temp file into place under its digest.
    pub fn commit_blob(&self, tmp: tempfile::NamedTempFile, digest: &Digest) -> Result<()> {
        tmp.as_file()
            .sync_all()
            .map_err(|e| Error::io("syncing a blob", e))?;
        let path = self.blob_path(digest);
        if let Some(dir) = path.parent().filter(|d| !d.is_dir()) {
            // Blobs of another algorithm than sha256 (the directory `create` makes).
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        tmp.persist(&path)
            .map_err(|e| Error::io(format!("renaming a blob to {}", path.display()), e.error))?;
        Ok(())
    }

    /// Writes a small blob (manifest, config, index) unless it is there already.
    pub fn write_blob(&self, data: &[u8]) -> Result<Digest> {
        let digest = Digest::sha256_of(data);
        if !self.has_blob(&digest) {
            let mut tmp = self.temp_blob()?;
            tmp.write_all(data)
                .map_err(|e| Error::io("writing a blob", e))?;
            self.commit_blob(tmp, &digest)?;
        }
        Ok(digest)
    }

    /// Copies a blob from `file` into this layout, checking its digest and size.
    pub fn copy_blob_from(
        &self,
        mut file: &File,
        desc: &Descriptor,
        what: &'static str,
    ) -> Result<()> {
        if self.has_blob(&desc.digest) {
            return Ok(());
        }
        let mut tmp = self.temp_blob()?;
        let mut hashing = HashWriter {
            inner: tmp.as_file_mut(),
            hasher: Hasher::new(desc.digest.algorithm()),
            count: 0,
        };
        std::io::copy(&mut file, &mut hashing)
            .map_err(|e| Error::io(format!("copying {what} {}", desc.digest), e))?;
        let (hasher, count) = (hashing.hasher, hashing.count);
        let actual = hasher.finish();
        if actual != desc.digest {
            return Err(Error::DigestMismatch {
                what,
                digest: desc.digest.clone(),
                actual,
            });
        }
        if count != desc.size {
            return Err(Error::SizeMismatch {
                what,
                digest: desc.digest.clone(),
                expected: desc.size,
                actual: count,
            });
        }
        self.commit_blob(tmp, &desc.digest)
    }

    /// Lists `desc` in `index.json` under `tag` (replacing what had that tag), or adds it
    /// untagged. Written atomically: the last step of a conversion into a layout.
    pub fn set_ref(&self, mut desc: Descriptor, tag: Option<&str>) -> Result<()> {
        let mut index = self.read_index()?;
        match tag {
            Some(tag) => {
                index
                    .manifests
                    .retain(|d| d.annotation(REF_NAME_ANNOTATION) != Some(tag));
                desc.annotations
                    .get_or_insert_with(Default::default)
                    .insert(REF_NAME_ANNOTATION.to_string(), tag.to_string());
            }
            None => index.manifests.retain(|d| {
                !(d.digest == desc.digest && d.annotation(REF_NAME_ANNOTATION).is_none())
            }),
        }
        index.manifests.push(desc);
        let json = serde_json::to_vec_pretty(&index)
            .map_err(|e| Error::Internal(format!("serialising index.json: {e}")))?;
        write_atomic(&self.root, &self.root.join("index.json"), &json)
    }
}

struct HashWriter<W> {
    inner: W,
    hasher: Hasher,
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

/// Temp file in `dir`, fsync, rename over `path`.
fn write_atomic(dir: &Path, path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(format!("creating a temp file in {}", dir.display()), e))?;
    tmp.write_all(data)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    tmp.persist(path)
        .map_err(|e| Error::io(format!("renaming to {}", path.display()), e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::oci::OCI_MANIFEST;

    #[test]
    fn refs_replace_and_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        let a = layout.write_blob(b"{}").unwrap();
        let b = layout.write_blob(b"{ }").unwrap();
        layout
            .set_ref(Descriptor::new(OCI_MANIFEST, a.clone(), 2), Some("t"))
            .unwrap();
        assert_eq!(
            Layout::open(dir.path())
                .unwrap()
                .resolve(None)
                .unwrap()
                .digest,
            a
        );
        layout
            .set_ref(Descriptor::new(OCI_MANIFEST, b.clone(), 3), Some("t"))
            .unwrap();
        layout
            .set_ref(Descriptor::new(OCI_MANIFEST, a.clone(), 2), Some("u"))
            .unwrap();
        assert_eq!(layout.resolve(Some("t")).unwrap().digest, b);
        assert_eq!(layout.resolve(Some("u")).unwrap().digest, a);
        let err = layout.resolve(None).unwrap_err().to_string();
        assert!(err.contains("2 images") && err.contains("t, u"), "{err}");
        assert!(layout.resolve(Some("v")).is_err());
        // No temp files left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn sha512_blobs_live_under_their_algorithm_and_are_verified() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (src, dst) = (
            Layout::create(src.path()).unwrap(),
            Layout::create(dst.path()).unwrap(),
        );
        let data = b"a blob named by its sha512";
        let sha512: Digest = format!("sha512:{}", "0".repeat(128)).parse().unwrap();
        let digest = sha512.compute_like(data);
        let desc = Descriptor::new("x", digest.clone(), data.len() as u64);
        let path = src.blob_path(&digest);
        assert!(path.ends_with(format!("blobs/sha512/{}", digest.hex())));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
        assert_eq!(src.read_blob(&desc, "config", 100).unwrap(), data);
        dst.copy_blob_from(&src.open_blob(&desc, "config").unwrap(), &desc, "config")
            .unwrap();
        assert_eq!(std::fs::read(dst.blob_path(&digest)).unwrap(), data);
        std::fs::write(&path, b"a blob named by its sha512!").unwrap();
        let wrong = Descriptor::new("x", digest, data.len() as u64 + 1);
        assert!(matches!(
            src.read_blob(&wrong, "config", 100),
            Err(Error::DigestMismatch { .. })
        ));
    }

    #[test]
    fn blobs_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        let d = layout.write_blob(b"hello").unwrap();
        let desc = Descriptor::new("x", d.clone(), 5);
        assert_eq!(layout.read_blob(&desc, "config", 100).unwrap(), b"hello");
        std::fs::write(layout.blob_path(&d), b"hellO").unwrap();
        assert!(matches!(
            layout.read_blob(&desc, "config", 100),
            Err(Error::DigestMismatch { .. })
        ));
        std::fs::write(layout.blob_path(&d), b"hello!").unwrap();
        assert!(matches!(
            layout.read_blob(&desc, "config", 100),
            Err(Error::SizeMismatch { .. })
        ));
        let missing = Descriptor::new("x", Digest::sha256_of(b"nope"), 4);
        assert!(matches!(
            layout.open_blob(&missing, "layer"),
            Err(Error::MissingBlob { .. })
        ));
    }
}
