//! The mounts measured: our filesystem over a local blob file, overlayfs for the
//! baselines, and the sweep of whatever a failure left mounted.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use estargz::{BlobError, BlobErrorKind, BlobFuture, BlobReader, Layer};
use fusefs::{CacheConfig, FsConfig, MountedLayer, SharedCache};

use crate::Bench;
use crate::tools::run_ok;

impl Bench<'_> {
    pub(crate) fn cache(&self, dir: &Path) -> anyhow::Result<SharedCache> {
        Ok(SharedCache::open(CacheConfig::new(dir))?)
    }

    /// Opens `blob` and mounts it at a fresh directory `name` under the work dir, with
    /// neither prefetch nor background fetch: we measure what a reader causes.
    pub(crate) fn mount(
        &self,
        blob: Arc<dyn BlobReader>,
        cache: &SharedCache,
        name: &str,
    ) -> anyhow::Result<MountedLayer> {
        self.mount_with(blob, cache, name, false)
    }

    /// A mount with FUSE passthrough on or off (off: every read goes through us).
    pub(crate) fn mount_with(
        &self,
        blob: Arc<dyn BlobReader>,
        cache: &SharedCache,
        name: &str,
        passthrough: bool,
    ) -> anyhow::Result<MountedLayer> {
        let layer = self
            .rt
            .block_on(Layer::open(blob, &Default::default()))
            .context("opening the layer")?;
        let mp = self.work.join("mnt").join(name);
        std::fs::create_dir_all(&mp)?;
        let mut config = FsConfig {
            prefetch: false,
            background_fetch: false,
            passthrough,
            ..FsConfig::default()
        };
        if let Some(n) = self.args.fuse_threads {
            config.fuse_threads = n;
        }
        if let Some(kb) = self.args.kernel_readahead_kb {
            config.kernel_readahead = kb * 1024;
        }
        let mounted = fusefs::mount(
            Arc::new(layer),
            &mp,
            None,
            &fusefs::Backing::new(cache.clone(), self.rt.handle().clone(), &config),
            config,
        )
        .with_context(|| format!("mounting at {}", mp.display()))?;
        Ok(mounted)
    }
}

/// A local file as a blob (positioned reads), so the layer is not held in memory.
pub(crate) struct FileBlob {
    file: std::fs::File,
    size: u64,
}

impl FileBlob {
    pub(crate) fn open(path: &Path) -> anyhow::Result<Arc<dyn BlobReader>> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata()?.len();
        Ok(Arc::new(FileBlob { file, size }))
    }
}

impl BlobReader for FileBlob {
    fn size(&self) -> BlobFuture<'_, u64> {
        let size = self.size;
        Box::pin(async move { Ok(size) })
    }

    fn read_at(&self, offset: u64, len: u64) -> BlobFuture<'_, Bytes> {
        let end = offset.saturating_add(len).min(self.size);
        let result = if offset > self.size {
            Err(BlobError::new(
                BlobErrorKind::OutOfRange,
                "read past the end",
            ))
        } else {
            let mut buf = vec![0u8; (end - offset) as usize];
            self.file
                .read_exact_at(&mut buf, offset)
                .map(|()| Bytes::from(buf))
                .map_err(|e| BlobError::new(BlobErrorKind::Transient, e.to_string()))
        };
        Box::pin(async move { result })
    }
}

/// An overlayfs mount (the snapshotter's fallback path), unmounted on drop.
pub(crate) struct Overlay(pub(crate) PathBuf);

impl Overlay {
    pub(crate) fn mount(lower: &Path, dir: &Path) -> anyhow::Result<Overlay> {
        let (upper, workdir, mp) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
        for d in [&upper, &workdir, &mp] {
            std::fs::create_dir_all(d)?;
        }
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.display(),
                    upper.display(),
                    workdir.display()
                ))
                .arg(&mp),
        )?;
        Ok(Overlay(mp))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(e) = run_ok(Command::new("umount").arg(&self.0)) {
            eprintln!("warning: {e}; detaching");
            testkit::containerd::unmount_detach(&self.0);
        }
    }
}

/// Detaches everything still mounted under the work directory (after an error).
pub(crate) struct UnmountAll(pub(crate) PathBuf);

impl Drop for UnmountAll {
    fn drop(&mut self) {
        for m in testkit::containerd::mounts_under(&self.0).into_iter().rev() {
            eprintln!("detaching leftover mount {}", m.display());
            testkit::containerd::unmount_detach(&m);
        }
    }
}
