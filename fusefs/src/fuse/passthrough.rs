//! FUSE passthrough on one connection: which inodes the kernel reads from a backing
//! file without asking us, and the record of their ids a successor needs.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// FUSE passthrough state of one connection.
///
/// The kernel refuses (EIO, ETXTBSY or EBUSY to the opener) to mix passthrough and
/// page-cache opens of one inode, and a second backing file for an inode that is
/// open. So an inode that got a backing id keeps it for the life of the connection and
/// is always opened through it, and the ids are recorded in a file the mount's owner
/// names: a successor that takes the connection over opens those inodes with the same
/// ids (which stay registered in the kernel when a daemon dies) instead of colliding
/// with opens that outlived the previous daemon.
pub(super) struct Passthrough {
    enabled: bool,
    backing: HashMap<u64, u32>,
    /// Page-cache opens by this process, by inode.
    cached: HashMap<u64, u32>,
    /// Where backing ids are recorded for a successor; without one the connection
    /// cannot be handed over once it has used passthrough.
    record: Option<PathBuf>,
}

/// How an open is answered.
pub(super) enum OpenedAs {
    /// Through the backing file registered with this id.
    Backing(u32),
    /// Through the page cache.
    PageCache,
}

impl Passthrough {
    /// A connection this process mounted: ids recorded for an earlier one mean nothing
    /// to it.
    pub(super) fn fresh(enabled: bool, record: Option<PathBuf>) -> Passthrough {
        if let Some(record) = &record {
            let _ = std::fs::remove_file(record);
        }
        Passthrough {
            enabled,
            backing: HashMap::new(),
            cached: HashMap::new(),
            record,
        }
    }

    /// A connection taken over: passthrough as the kernel agreed to at INIT, with the
    /// backing ids the previous daemon registered. No new ids, though: opens through
    /// the page cache from before the handover are unknown here, and the kernel fails
    /// a passthrough open of such an inode.
    pub(super) fn taken_over(record: Option<PathBuf>) -> Passthrough {
        Passthrough {
            enabled: false,
            backing: record.as_deref().map(read_record).unwrap_or_default(),
            cached: HashMap::new(),
            record,
        }
    }

    /// Whether INIT should offer passthrough to the kernel.
    pub(super) fn wanted(&self) -> bool {
        self.enabled
    }

    /// INIT's answer: passthrough stays on only if the kernel offered it. Returns
    /// whether it is on.
    pub(super) fn settle(&mut self, kernel_offers: bool) -> bool {
        self.enabled &= kernel_offers;
        self.enabled
    }

    /// Decides how an open of `ino` is answered: through its backing id if it has
    /// one, through a new one if `local_file` gives the file wholly on disk, else
    /// through the page cache (counted, for [`Passthrough::released`]).
    pub(super) fn open(
        &mut self,
        dev: &File,
        ino: u64,
        local_file: impl FnOnce() -> Option<File>,
    ) -> OpenedAs {
        if let Some(&id) = self.backing.get(&ino) {
            return OpenedAs::Backing(id);
        }
        if self.enabled
            && !self.cached.contains_key(&ino)
            && let Some(file) = local_file()
        {
            match backing_open(dev, &file) {
                Ok(id) => {
                    if let Err(e) = self.remember(ino, id) {
                        // A successor would not know the id: opens of this inode that
                        // outlive us would collide with its own. Not worth the risk.
                        tracing::warn!(error = %e, path = ?self.record,
                            "cannot record a passthrough backing id; passthrough off for this mount");
                        self.enabled = false;
                    } else {
                        return OpenedAs::Backing(id);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "FUSE passthrough unavailable; reading through the daemon");
                    self.enabled = false;
                }
            }
        }
        *self.cached.entry(ino).or_default() += 1;
        OpenedAs::PageCache
    }

    /// A RELEASE of `ino`: true if it was the last page-cache open of it.
    pub(super) fn released(&mut self, ino: u64) -> bool {
        let Some(n) = self.cached.get_mut(&ino) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            self.cached.remove(&ino);
            return true;
        }
        false
    }

    /// Whether backing ids are recorded where a successor finds them.
    pub(super) fn has_record(&self) -> bool {
        self.record.is_some()
    }

    fn remember(&mut self, ino: u64, id: u32) -> std::io::Result<()> {
        if let Some(record) = &self.record {
            let mut f = File::options().create(true).append(true).open(record)?;
            writeln!(f, "{ino} {id}")?;
            f.sync_data()?;
        }
        self.backing.insert(ino, id);
        Ok(())
    }
}

fn read_record(path: &Path) -> HashMap<u64, u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (ino, id) = l.split_once(' ')?;
            Some((ino.parse().ok()?, id.parse().ok()?))
        })
        .collect()
}

/// FUSE_DEV_IOC_BACKING_OPEN: registers `file` as a backing file on the connection.
#[allow(unsafe_code)]
fn backing_open(dev: &File, file: &File) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct BackingMap {
        fd: i32,
        flags: u32,
        padding: u64,
    }
    // _IOW(229, 1, struct fuse_backing_map)
    const FUSE_DEV_IOC_BACKING_OPEN: u64 = 0x4010_e501;
    let map = BackingMap {
        fd: file.as_raw_fd(),
        flags: 0,
        padding: 0,
    };
    // SAFETY: the ioctl reads one fuse_backing_map, which `map` is (repr(C), the
    // kernel's layout), for the duration of the call; both fds are open.
    let id = unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_OPEN as _, &map) };
    if id < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(id as u32)
}
