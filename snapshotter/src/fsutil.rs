//! Filesystem helpers: disk usage, mount table, unmount.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{IoContext, Result};
use crate::types::Usage;

/// Disk usage of a tree: allocated bytes and inodes, each hardlinked inode counted once
/// (what containerd's overlay snapshotter reports).
pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).io_context("stat", &path)?;
        if seen.insert((meta.dev(), meta.ino())) {
            usage.inodes += 1;
            usage.size += i64::try_from(meta.blocks() * 512).unwrap_or(i64::MAX);
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).io_context("read directory", &path)? {
                stack.push(entry.io_context("read directory", &path)?.path());
            }
        }
    }
    Ok(usage)
}

// One mountinfo parser for the workspace: fusefs's.
pub use fusefs::mountinfo::mounts_under;

/// Detaches a mount (`umount -l`): the mount point becomes free at once even if busy.
pub fn unmount_detach(path: &Path) -> std::io::Result<()> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(std::io::Error::from)
}

/// Deletes the files in `dir` that `ours` claims (by name), that are not in `keep`, and
/// that were last written before `written_before` (one written since may belong to
/// something the caller had not listed yet). Returns how many went.
pub fn remove_unkept(
    dir: &Path,
    keep: &std::collections::HashSet<std::path::PathBuf>,
    written_before: std::time::SystemTime,
    ours: impl Fn(&str) -> bool,
) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if keep.contains(&path) || !ours(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < written_before);
        if old && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Removes a snapshot directory, first detaching anything still mounted inside it
/// (a container's leftover mount must not make a snapshot unremovable).
pub fn remove_tree(dir: &Path) -> Result<()> {
    for mount_point in mounts_under(dir) {
        if let Err(e) = unmount_detach(&mount_point) {
            tracing::warn!(path = %mount_point.display(), error = %e, "unmount before removal failed");
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).io_context("remove", dir),
    }
}

/// Whether the kernel's overlayfs has the `index` feature, which must be turned off for
/// snapshot stacks whose lower layers are shared (containerd does the same).
pub fn overlay_has_index_option() -> bool {
    Path::new("/sys/module/overlay/parameters/index").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_usage_counts_hardlinks_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 10_000]).unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let usage = disk_usage(dir.path()).unwrap();
        assert_eq!(usage.inodes, 3, "root, d and one inode for a/b");
        assert!(
            usage.size >= 10_000,
            "size {} counts the file's blocks",
            usage.size
        );
        assert!(
            usage.size < 2 * 10_000 + 8192 * 2,
            "hardlink counted twice: {}",
            usage.size
        );
    }
}
