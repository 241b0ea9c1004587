//! Idmapped clones of a user-namespaced snapshot's lower layers, under
//! `ROOT/idmapped/<snapshot id>/<layer id>`: the overlay containerd mounts for the
//! container stacks on them, so the image's files appear owned by the container's IDs.
//!
//! lazysnapd makes them itself rather than handing `uidmap=` to containerd: containerd
//! before 2.3 idmaps only the lower layers' common parent directory, without the mounts
//! under it, so lazily mounted (FUSE) layers would look empty through it. A clone is made
//! with `open_tree(OPEN_TREE_CLONE)`, `mount_setattr(MOUNT_ATTR_IDMAP)` with a user
//! namespace holding the mapping, then `move_mount`; it lives until its snapshot is
//! removed. FUSE layers allow it on Linux 6.12+, directories on ext4, xfs and btrfs too.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use estargz::lock;

use crate::error::{Error, IoContext, Result};
use crate::idmap::{IdMapping, IdRange};

pub struct IdmappedLowers {
    dir: PathBuf,
    /// One user namespace per mapping, kept: making one takes a process.
    namespaces: Mutex<HashMap<IdMapping, Arc<OwnedFd>>>,
}

impl IdmappedLowers {
    pub fn new(root: &Path) -> Self {
        IdmappedLowers {
            dir: root.join("idmapped"),
            namespaces: Mutex::new(HashMap::new()),
        }
    }

    /// `source` (lower layer `layer` of snapshot `snapshot`) as `mapping` shows it: an
    /// idmapped clone, made now unless one of the same filesystem is there already.
    pub fn lower(
        &self,
        snapshot: i64,
        layer: i64,
        source: &Path,
        mapping: &IdMapping,
    ) -> Result<PathBuf> {
        let target = self.dir.join(snapshot.to_string()).join(layer.to_string());
        if is_mount_point(&target) {
            // The same superblock: still the layer it was cloned from (a layer mounted
            // again after a restart is a new one).
            let same = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
            if same(&target).is_some() && same(&target) == same(source) {
                return Ok(target);
            }
            detach(&target)?;
        }
        std::fs::create_dir_all(&target).io_context("create", &target)?;
        let userns = self.namespace(mapping)?;
        syscalls::clone_idmapped(source, &target, userns.as_fd()).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EINVAL) {
                " (this filesystem or kernel cannot idmap it: FUSE needs Linux 6.12+)"
            } else {
                ""
            };
            let _ = std::fs::remove_dir(&target);
            let err = Error::FailedPrecondition(format!(
                "idmapped mount of {} at {} for a user-namespaced snapshot: {e}{hint}",
                source.display(),
                target.display()
            ));
            tracing::error!(error = %err, "user-namespaced snapshot not prepared");
            err
        })?;
        Ok(target)
    }

    /// Unmounts and removes the clones of `snapshot`, once it is gone.
    pub fn release(&self, snapshot: i64) {
        let dir = self.dir.join(snapshot.to_string());
        if !dir.exists() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if is_mount_point(&path)
                && let Err(err) = detach(&path)
            {
                // Never remove a directory that may still show a layer's files.
                tracing::warn!(path = %path.display(), error = %err, "idmapped clone left mounted");
                return;
            }
            let _ = std::fs::remove_dir(&path);
        }
        let _ = std::fs::remove_dir(&dir);
    }

    /// Releases the clones of every snapshot not in `live` (after a crash between a
    /// removal and its release).
    pub fn release_orphans(&self, live: &std::collections::HashSet<i64>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_str().and_then(|n| n.parse::<i64>().ok());
            if let Some(id) = id
                && !live.contains(&id)
            {
                self.release(id);
            }
        }
    }

    fn namespace(&self, mapping: &IdMapping) -> Result<Arc<OwnedFd>> {
        let mut known = lock(&self.namespaces);
        if let Some(fd) = known.get(mapping) {
            return Ok(fd.clone());
        }
        let fd = Arc::new(user_namespace(mapping)?);
        known.insert(mapping.clone(), fd.clone());
        Ok(fd)
    }
}

fn is_mount_point(path: &Path) -> bool {
    crate::fsutil::mounts_under(path).iter().any(|m| m == path)
}

fn detach(path: &Path) -> Result<()> {
    crate::fsutil::unmount_detach(path).io_context("unmount", path)
}

/// A user namespace with `mapping`, as an fd: a child process enters a new one
/// (`unshare --user`), lazysnapd writes its ID maps and keeps the namespace's fd.
fn user_namespace(mapping: &IdMapping) -> Result<OwnedFd> {
    let self_ns = Path::new("/proc/self/ns/user");
    let own = std::fs::read_link(self_ns).io_context("read", self_ns)?;
    let mut child = Command::new("unshare")
        .args(["--user", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::Internal(format!("starting unshare(1) for a user namespace: {e}")))?;
    let result = (|| {
        let ns = PathBuf::from(format!("/proc/{}/ns/user", child.id()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(&ns).ok().as_ref() == Some(&own) || !ns.exists() {
            if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                return Err(Error::Internal(
                    "unshare(1) did not enter a new user namespace".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let write = |file: &str, ranges: &[IdRange]| {
            let text: String = ranges
                .iter()
                .map(|r| format!("{} {} {}\n", r.container, r.host, r.size))
                .collect();
            let path = PathBuf::from(format!("/proc/{}/{file}", child.id()));
            std::fs::write(&path, text).io_context("write", &path)
        };
        write("uid_map", mapping.uid_ranges())?;
        write("gid_map", mapping.gid_ranges())?;
        std::fs::File::open(&ns)
            .map(OwnedFd::from)
            .io_context("open", &ns)
    })();
    end(&mut child);
    result
}

/// Ends the namespace's first process: its stdin closes, `cat` exits.
fn end(child: &mut Child) {
    drop(child.stdin.take());
    if child.wait().is_err() {
        let _ = child.kill();
    }
}

/// The new mount API's calls that neither nix nor rustix wrap (mount_setattr), with the
/// two around it, as raw syscalls.
#[allow(unsafe_code)]
mod syscalls {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

    /// `struct mount_attr`.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }

    fn cstr(p: &Path) -> std::io::Result<CString> {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn check(ret: libc::c_long) -> std::io::Result<libc::c_long> {
        if ret < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    /// Mounts a read-only clone of the mount at `source` (not the mounts under it) on
    /// `target`, its IDs mapped through the user namespace `userns`.
    pub fn clone_idmapped(
        source: &Path,
        target: &Path,
        userns: BorrowedFd<'_>,
    ) -> std::io::Result<()> {
        let (source, target) = (cstr(source)?, cstr(target)?);
        // SAFETY: open_tree(2) reads the NUL-terminated path and returns a new fd or -1;
        // the fd is owned from here on.
        let tree = unsafe {
            let fd = check(libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                source.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            ))?;
            OwnedFd::from_raw_fd(fd as i32)
        };
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: libc::MS_PRIVATE,
            userns_fd: userns.as_raw_fd() as u64,
        };
        let empty = c"";
        // SAFETY: mount_setattr(2) reads `attr` (its size passed) and the empty path; all
        // live across the call.
        check(unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        })?;
        // SAFETY: move_mount(2) reads the two NUL-terminated paths, which outlive it.
        check(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Labels;

    fn mapping(uid: &str, gid: &str) -> IdMapping {
        let mut l = Labels::new();
        l.insert(crate::idmap::LABEL_UID_MAPPING.into(), uid.into());
        l.insert(crate::idmap::LABEL_GID_MAPPING.into(), gid.into());
        IdMapping::from_labels(&l).unwrap().unwrap()
    }

    #[test]
    fn a_directory_appears_owned_by_the_mapped_ids_until_released() {
        if !testkit_is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let layer = root.path().join("layer");
        std::fs::create_dir_all(layer.join("etc")).unwrap();
        std::fs::write(layer.join("etc/motd"), "hi").unwrap();
        std::os::unix::fs::lchown(layer.join("etc/motd"), Some(0), Some(0)).unwrap();
        std::os::unix::fs::lchown(layer.join("etc"), Some(1000), Some(1000)).unwrap();
        let lowers = IdmappedLowers::new(root.path());
        let m = mapping("0:231072:65536", "0:296608:1001");
        let clone = lowers.lower(7, 3, &layer, &m).unwrap();
        let motd = std::fs::metadata(clone.join("etc/motd")).unwrap();
        assert_eq!((motd.uid(), motd.gid()), (231072, 296608));
        let etc = std::fs::metadata(clone.join("etc")).unwrap();
        assert_eq!((etc.uid(), etc.gid()), (232072, 297608));
        assert_eq!(std::fs::read(clone.join("etc/motd")).unwrap(), b"hi");
        // Read-only: nothing reaches the layer through it.
        assert!(std::fs::write(clone.join("etc/new"), "x").is_err());
        // Asked again: the same clone.
        assert_eq!(lowers.lower(7, 3, &layer, &m).unwrap(), clone);
        assert_eq!(
            fusefs::mountinfo::mounts()
                .iter()
                .filter(|x| x.mount_point == clone)
                .count(),
            1
        );
        // A filesystem that cannot be idmapped (procfs, as FUSE before 6.12): a clear
        // error, nothing left mounted.
        let err = lowers.lower(7, 4, Path::new("/proc/sys"), &m).unwrap_err();
        assert!(err.to_string().contains("cannot idmap it"), "{err}");
        assert!(!root.path().join("idmapped/7/4").exists());
        lowers.release_orphans(&[8].into_iter().collect());
        assert!(!clone.exists());
        // The layer itself is untouched.
        assert_eq!(std::fs::read(layer.join("etc/motd")).unwrap(), b"hi");
        assert_eq!(std::fs::metadata(layer.join("etc")).unwrap().uid(), 1000);
    }

    fn testkit_is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }
}
