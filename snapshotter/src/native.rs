//! Native copies of wholly local lazy layers.
//!
//! Once every byte of a lazily mounted layer is in the chunk cache, lazysnapd copies the
//! layer's tree, as its FUSE mount shows it (overlayfs's own conventions: whiteouts as 0/0
//! character devices, opaque directories by `trusted.overlay.opaque`), into a plain
//! directory beside the mount, `snapshots/<id>/native`. Containers created after that get
//! the copy as their lower directory instead of the FUSE mount (see
//! `Snapshots::mounts`), so they read at the speed of the full pull with no daemon in the
//! path, and their page cache is the copy's, written by lazysnapd, rather than pages that
//! belong to whichever container read them first. Containers already running keep the
//! FUSE mount. The copy is made in `ROOT/native-staging/<id>` and renamed into place when
//! complete and synced: a `native` directory is always whole, and a snapshot removed
//! while its copy is being made is not held up by it.
//!
//! Every byte copied is read through the FUSE mount, so it was verified against its chunk
//! digest like any other read.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use estargz::lock;

/// The name of a remote snapshot's native copy, beside its FUSE mountpoint `fs`.
pub const NATIVE_DIR: &str = "native";
/// Copies in the making, under the root, by snapshot directory name.
const STAGING_DIR: &str = "native-staging";

/// What a copy wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub entries: u64,
    pub bytes: u64,
}

/// The native copy of the layer mounted at `mountpoint` (`snapshots/<id>/fs`), when one
/// is complete.
pub fn native_of(mountpoint: &Path) -> Option<PathBuf> {
    let dir = mountpoint.parent()?.join(NATIVE_DIR);
    dir.is_dir().then_some(dir)
}

/// The native copies in progress, and the word to stop them. A copy reads through the
/// daemon's own FUSE mount: once the daemon stops serving it (leaving it to the next
/// one), a copy still reading would wait for an answer forever and hold the exiting
/// process with it. So the daemon stops the copies and waits for them first.
#[derive(Debug, Default)]
pub struct NativeCopies {
    stop: AtomicBool,
    running: Mutex<usize>,
    ended: Condvar,
}

/// Held by a copy while it runs.
pub struct CopyRunning<'a>(&'a NativeCopies);

impl Drop for CopyRunning<'_> {
    fn drop(&mut self) {
        let mut running = lock(&self.0.running);
        *running -= 1;
        self.0.ended.notify_all();
    }
}

impl NativeCopies {
    /// Registers a copy about to start; None once stopping.
    pub fn start(&self) -> Option<CopyRunning<'_>> {
        let mut running = lock(&self.running);
        if self.stop.load(Ordering::SeqCst) {
            return None;
        }
        *running += 1;
        Some(CopyRunning(self))
    }

    /// Tells every copy to stop at its next entry and waits, at most `patience`, until
    /// none runs; false if some still did.
    pub fn stop_and_wait(&self, patience: Duration) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        let running = lock(&self.running);
        let (running, _) = self
            .ended
            .wait_timeout_while(running, patience, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        *running == 0
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Copies the tree at `mountpoint` to `native` beside it. Fails, leaving no `native`,
/// on any error (the partial copy is removed), and when `copies` says stop; succeeds
/// at once if a copy exists.
pub fn make_native_copy(mountpoint: &Path, copies: &NativeCopies) -> io::Result<Copied> {
    let no_layout = || io::Error::other("not a snapshot's mountpoint (ROOT/snapshots/ID/fs)");
    let parent = mountpoint.parent().ok_or_else(no_layout)?;
    let snapshots = parent.parent().ok_or_else(no_layout)?;
    let root = snapshots.parent().ok_or_else(no_layout)?;
    let id = parent.file_name().ok_or_else(no_layout)?;
    let done = parent.join(NATIVE_DIR);
    if done.is_dir() {
        return Ok(Copied::default());
    }
    let staging = root.join(STAGING_DIR);
    fs::create_dir_all(&staging)?;
    // Leftovers: this snapshot's from an interrupted copy, and those of snapshots
    // removed meanwhile.
    for entry in fs::read_dir(&staging)?.flatten() {
        if entry.file_name() == id || !snapshots.join(entry.file_name()).exists() {
            fs::remove_dir_all(entry.path())?;
        }
    }
    let partial = staging.join(id);
    let result = copy_tree_until(mountpoint, &partial, copies).and_then(|copied| {
        // Every file's data and metadata on disk before the name says it is whole.
        File::open(&partial).and_then(|d| {
            nix::unistd::syncfs(&d).map_err(io::Error::from)?;
            Ok(())
        })?;
        fs::rename(&partial, &done)?;
        File::open(parent)?.sync_all()?;
        Ok(copied)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    result
}

/// Copies `src` (a directory) to `dst` (which must not exist): every entry with its mode,
/// owner, extended attributes and times; hard links stay hard links; sockets are skipped
/// (a layer cannot carry their state).
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<Copied> {
    copy_tree_until(src, dst, &NativeCopies::default())
}

fn copy_tree_until(src: &Path, dst: &Path, copies: &NativeCopies) -> io::Result<Copied> {
    let mut copier = Copier {
        links: HashMap::new(),
        copied: Copied::default(),
        copies,
    };
    copier.dir(src, dst)?;
    Ok(copier.copied)
}

struct Copier<'a> {
    /// Files with more than one link, by (device, inode), and where the first went.
    links: HashMap<(u64, u64), PathBuf>,
    copied: Copied,
    copies: &'a NativeCopies,
}

impl Copier<'_> {
    fn dir(&mut self, src: &Path, dst: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(src)?;
        fs::create_dir(dst)?;
        for entry in fs::read_dir(src)? {
            if self.copies.stopping() {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "stopped: lazysnapd is leaving its mounts",
                ));
            }
            let entry = entry?;
            let (from, to) = (entry.path(), dst.join(entry.file_name()));
            let m = fs::symlink_metadata(&from)?;
            let kind = m.file_type();
            if kind.is_dir() {
                self.dir(&from, &to)?;
                continue;
            }
            if kind.is_socket() {
                continue;
            }
            if m.nlink() > 1
                && let Some(first) = self.links.get(&(m.dev(), m.ino()))
            {
                fs::hard_link(first, &to)?;
                self.copied.entries += 1;
                continue;
            }
            if kind.is_file() {
                let mut input = File::open(&from)?;
                let mut output = File::create(&to)?;
                self.copied.bytes += io::copy(&mut input, &mut output)?;
            } else if kind.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
            } else {
                use nix::sys::stat::{Mode, SFlag};
                let sflag = if kind.is_char_device() {
                    SFlag::S_IFCHR
                } else if kind.is_block_device() {
                    SFlag::S_IFBLK
                } else {
                    SFlag::S_IFIFO
                };
                nix::sys::stat::mknod(
                    &to,
                    sflag,
                    Mode::from_bits_truncate(m.mode() & 0o7777),
                    m.rdev(),
                )?;
            }
            finish(&from, &to, &m)?;
            if m.nlink() > 1 {
                self.links.insert((m.dev(), m.ino()), to);
            }
            self.copied.entries += 1;
        }
        // Last: creating the children changed the directory's times.
        finish(src, dst, &meta)?;
        self.copied.entries += 1;
        Ok(())
    }
}

/// Owner, mode (after the owner: chown clears set-id bits), extended attributes, times.
fn finish(src: &Path, dst: &Path, m: &fs::Metadata) -> io::Result<()> {
    std::os::unix::fs::lchown(dst, Some(m.uid()), Some(m.gid()))?;
    let symlink = m.file_type().is_symlink();
    if !symlink {
        fs::set_permissions(dst, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    copy_xattrs(src, dst)?;
    let time = |secs: i64, nsecs: i64| nix::sys::time::TimeSpec::new(secs, nsecs);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &time(m.atime(), m.atime_nsec()),
        &time(m.mtime(), m.mtime_nsec()),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

fn copy_xattrs(src: &Path, dst: &Path) -> io::Result<()> {
    let names = match xattr::list(src) {
        Ok(names) => names,
        // A layer without extended attributes says so for the whole mount.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in names {
        if let Some(value) = xattr::get(src, &name)? {
            xattr::set(dst, &name, &value)?;
        }
    }
    Ok(())
}

/// How often a mounted layer is checked for being wholly local.
const LOCAL_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits until every byte of the layer is local (however it got there: reads, prefetch,
/// background fetch, `lazysnap fetch`) and nothing has read it for a poll, then makes
/// its native copy. Ends without one
/// when the layer is unmounted first.
pub(crate) async fn copy_when_local(
    fs: std::sync::Weak<fusefs::LayerFs>,
    mountpoint: PathBuf,
    digest: String,
    copies: Arc<NativeCopies>,
) {
    let mut reads_before = None;
    loop {
        tokio::time::sleep(LOCAL_POLL).await;
        let Some(layer) = fs.upgrade() else { return };
        let stats = layer.stats();
        let reads = stats.cache_hits + stats.cache_misses;
        // Copying a big layer takes seconds of CPU and disk: not while a container is
        // still reading it (the one that just made it local, as a rule).
        let quiet = reads_before.replace(reads) == Some(reads);
        if stats.local_bytes < stats.total_bytes || !quiet {
            continue;
        }
        // The copy reads through the mount; those reads are not a container's.
        let _own = layer.own_reads();
        drop(layer);
        let started = std::time::Instant::now();
        let path = mountpoint.clone();
        let copy = move || {
            let Some(_running) = copies.start() else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "lazysnapd is leaving its mounts",
                ));
            };
            make_native_copy(&path, &copies)
        };
        match tokio::task::spawn_blocking(copy).await {
            Ok(Ok(copied)) => tracing::info!(layer = %digest, path = %mountpoint.display(),
                entries = copied.entries, bytes = copied.bytes,
                seconds = started.elapsed().as_secs_f64(),
                "layer wholly local: native copy made; containers created from now on read it"),
            Ok(Err(e)) => tracing::warn!(layer = %digest, path = %mountpoint.display(), error = %e,
                "no native copy of a wholly local layer; containers keep reading through FUSE"),
            Err(e) => tracing::warn!(layer = %digest, error = %e, "native copy task"),
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_is_copied_with_links_modes_times_and_special_files() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("snapshots/7");
        let src = snapshot.join("fs");
        fs::create_dir_all(src.join("a/b")).unwrap();
        // A leftover of a removed snapshot's copy.
        fs::create_dir_all(dir.path().join("native-staging/3/x")).unwrap();
        fs::write(src.join("a/file"), b"hello").unwrap();
        fs::hard_link(src.join("a/file"), src.join("a/b/link")).unwrap();
        std::os::unix::fs::symlink("../file", src.join("a/b/sym")).unwrap();
        fs::set_permissions(src.join("a/file"), fs::Permissions::from_mode(0o4751)).unwrap();
        nix::unistd::mkfifo(
            &src.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let old = nix::sys::time::TimeSpec::new(1_000_000, 5);
        for p in ["a/b/sym", "a/b", "a"] {
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &src.join(p),
                &old,
                &old,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
        }

        let copied = make_native_copy(&src, &NativeCopies::default()).unwrap();
        let native = native_of(&src).expect("the copy is complete");
        assert_eq!(native, snapshot.join(NATIVE_DIR));
        assert_eq!(
            fs::read_dir(dir.path().join(STAGING_DIR)).unwrap().count(),
            0
        );
        assert_eq!(copied.bytes, 5, "the hard link is not copied twice");
        assert_eq!(copied.entries, 7);
        let m = |p: &str| fs::symlink_metadata(native.join(p)).unwrap();
        assert_eq!(fs::read(native.join("a/b/link")).unwrap(), b"hello");
        assert_eq!(m("a/file").ino(), m("a/b/link").ino());
        assert_eq!(m("a/file").mode() & 0o7777, 0o4751);
        assert_eq!(
            fs::read_link(native.join("a/b/sym")).unwrap(),
            Path::new("../file")
        );
        assert!(m("fifo").file_type().is_fifo());
        for p in ["a/b/sym", "a/b", "a"] {
            assert_eq!((m(p).mtime(), m(p).mtime_nsec()), (1_000_000, 5), "{p}");
        }
        // A second call finds it done.
        assert_eq!(
            make_native_copy(&src, &NativeCopies::default()).unwrap(),
            Copied::default()
        );
    }

    #[test]
    fn a_failed_copy_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("snapshots/4/fs");
        fs::create_dir_all(src.parent().unwrap()).unwrap();
        assert!(
            make_native_copy(&src, &NativeCopies::default()).is_err(),
            "no source tree"
        );
        assert!(native_of(&src).is_none());
        assert_eq!(
            fs::read_dir(dir.path().join(STAGING_DIR)).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_copy_stops_when_told_and_no_new_one_starts() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("snapshots/5/fs");
        fs::create_dir_all(src.join("d")).unwrap();
        fs::write(src.join("d/f"), b"x").unwrap();
        let copies = NativeCopies::default();
        let running = copies.start().unwrap();
        // Waiting while one runs: not done within the patience given.
        assert!(!copies.stop_and_wait(Duration::from_millis(50)));
        let err = make_native_copy(&src, &copies).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted, "{err}");
        assert!(native_of(&src).is_none());
        drop(running);
        assert!(copies.stop_and_wait(Duration::from_millis(50)));
        assert!(copies.start().is_none(), "stopped for good");
    }
}
