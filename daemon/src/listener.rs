//! The snapshots API's listening socket, kept open across restarts. A call containerd
//! makes while no lazysnapd runs then waits in the socket's backlog for the next daemon,
//! instead of failing with "connection refused" and putting containerd's client of the
//! plugin into gRPC back-off (seconds of failed pulls after every restart).
//!
//! Where the socket comes from, first match wins:
//! 1. systemd socket activation (`LISTEN_FDS`, packaging/lazysnapd.socket): systemd holds it;
//! 2. the fd holder's copy, left by an earlier lazysnapd on the same root and address;
//! 3. a fresh bind, whose copy then goes to the fd holder (when handover is on).

// systemd passes the socket as fd 3, a bare number that must be wrapped.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, getsockname, getsockopt, socket,
    sockopt,
};
use serde::{Deserialize, Serialize};
use snapshotter::holder::{HolderClient, LISTENER_KEY};
use tokio::net::UnixListener;

/// The first fd systemd passes (sd_listen_fds(3)).
const SYSTEMD_FIRST_FD: i32 = 3;

/// Where the listener came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Systemd,
    /// Taken over from the fd holder: an earlier daemon bound it.
    Holder,
    /// Bound now; `held` when the fd holder keeps a copy for the next daemon.
    Bound {
        held: bool,
    },
}

/// The listener and what happens to its socket file at exit.
pub struct Listening {
    pub listener: UnixListener,
    pub origin: Origin,
    /// Removes the socket file at exit unless something keeps the socket open.
    pub socket_file: Option<SocketFile>,
}

/// What the holder keeps next to the listener: which file it was bound to, so that a
/// listener whose file was since removed or replaced is never served again.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
struct HeldListener {
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// With the inode number, which a file made after a removal may reuse.
    ctime_ns: i128,
}

impl HeldListener {
    fn of(path: &Path) -> std::io::Result<HeldListener> {
        let m = std::fs::metadata(path)?;
        Ok(HeldListener {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// The listener for `address`: inherited from systemd, taken over from `holder`, or bound
/// (and then given to `holder`).
pub fn listen(address: &Path, holder: Option<&HolderClient>) -> anyhow::Result<Listening> {
    if let Some(fd) = systemd_listener()? {
        let path = listening_path(fd.as_fd()).context(
            "the socket systemd passed (LISTEN_FDS) is not a listening unix stream socket",
        )?;
        if path != address {
            tracing::warn!(systemd = %path.display(), configured = %address.display(),
                "serving on the socket systemd passed, not the configured address");
        }
        return Ok(Listening {
            listener: to_tokio(fd)?,
            origin: Origin::Systemd,
            socket_file: None,
        });
    }
    if let Some(holder) = holder
        && let Some(fd) = take_held(holder, address)?
    {
        return Ok(Listening {
            listener: to_tokio(fd)?,
            origin: Origin::Holder,
            socket_file: None,
        });
    }
    let listener = bind_socket(address)?;
    let held = match holder {
        Some(holder) => match give_to_holder(holder, address, &listener) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "the fd holder did not take the listening socket: calls made during a restart will be refused");
                false
            }
        },
        None => false,
    };
    Ok(Listening {
        listener,
        origin: Origin::Bound { held },
        socket_file: (!held).then(|| SocketFile(address.to_path_buf())),
    })
}

/// fd 3 when systemd started this process with a socket (`LISTEN_PID` is ours).
fn systemd_listener() -> anyhow::Result<Option<OwnedFd>> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !ours || count < 1 {
        return Ok(None);
    }
    if count > 1 {
        anyhow::bail!("systemd passed {count} sockets (LISTEN_FDS); lazysnapd serves one");
    }
    // SAFETY: with LISTEN_PID naming this process, systemd's protocol gives it fd 3, which
    // nothing else in this process has taken (it is read once, at start-up).
    let fd = unsafe { OwnedFd::from_raw_fd(SYSTEMD_FIRST_FD) };
    // The holder and the FUSE sessions this daemon starts must not inherit it.
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD)?;
    let flags = nix::fcntl::FdFlag::from_bits_retain(flags) | nix::fcntl::FdFlag::FD_CLOEXEC;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(flags))?;
    Ok(Some(fd))
}

/// The path a listening unix stream socket is bound to; an error for any other fd.
fn listening_path(fd: BorrowedFd<'_>) -> anyhow::Result<PathBuf> {
    if getsockopt(&fd, sockopt::SockType)? != SockType::Stream {
        anyhow::bail!("not a stream socket");
    }
    if !getsockopt(&fd, sockopt::AcceptConn)? {
        anyhow::bail!("not listening");
    }
    let addr: UnixAddr = getsockname(fd.as_raw_fd())?;
    match addr.path() {
        Some(path) => Ok(path.to_path_buf()),
        None => anyhow::bail!("not bound to a path"),
    }
}

/// The holder's listener for `address`, if it is still the one the socket file names;
/// a stale one is dropped from the holder.
fn take_held(holder: &HolderClient, address: &Path) -> anyhow::Result<Option<OwnedFd>> {
    let held = holder
        .list()
        .context("asking the fd holder for the listening socket")?;
    let Some(entry) = held.into_iter().find(|h| h.key == LISTENER_KEY) else {
        return Ok(None);
    };
    let kept: Option<HeldListener> = serde_json::from_str(&entry.meta).ok();
    let current = HeldListener::of(address).ok();
    let usable = kept.is_some()
        && kept == current
        && listening_path(entry.fd.as_fd()).is_ok_and(|p| p == address);
    if !usable {
        tracing::info!(address = %address.display(),
            "the fd holder's listening socket is not the one at this address; binding anew");
        holder
            .forget(LISTENER_KEY)
            .context("dropping a stale listening socket from the fd holder")?;
        return Ok(None);
    }
    tracing::info!(address = %address.display(),
        "took over the listening socket from the fd holder (calls made while no daemon ran are served now)");
    Ok(Some(entry.fd))
}

fn give_to_holder(
    holder: &HolderClient,
    address: &Path,
    listener: &UnixListener,
) -> anyhow::Result<()> {
    let meta = serde_json::to_string(&HeldListener::of(address)?)?;
    holder.put(LISTENER_KEY, &meta, listener.as_fd())?;
    Ok(())
}

fn to_tokio(fd: OwnedFd) -> anyhow::Result<UnixListener> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    // O_NONBLOCK belongs to the open file, which an inherited fd shares with whoever
    // passed it: set it rather than trust it.
    listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(listener)?)
}

/// Binds the socket, refusing to steal one that a live process still answers on.
fn bind_socket(address: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    if address.exists() {
        if std::os::unix::net::UnixStream::connect(address).is_ok() {
            anyhow::bail!(
                "socket {} is in use by another process; stop it or choose another --address",
                address.display()
            );
        }
        std::fs::remove_file(address)
            .with_context(|| format!("removing stale socket {}", address.display()))?;
    }
    // Bind, set the mode, then listen: until listen(2) a connect is refused, so no
    // client reaches the socket while it still has the umask's mode.
    let socket = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .context("creating a unix socket")?;
    let binding = || format!("binding socket {}", address.display());
    let unix_address = UnixAddr::new(address).with_context(binding)?;
    bind(socket.as_raw_fd(), &unix_address).with_context(binding)?;
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of {}", address.display()))?;
    nix::sys::socket::listen(&socket, Backlog::MAXCONN)
        .with_context(|| format!("listening on {}", address.display()))?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(socket))
        .with_context(|| format!("registering {}", address.display()))
}

/// Removes the socket file when the daemon stops, however it stops.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bound_listener_is_described_by_its_path_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let address = dir.path().join("s.sock");
        let listener = bind_socket(&address).unwrap();
        assert_eq!(listening_path(listener.as_fd()).unwrap(), address);
        let mode = std::fs::metadata(&address).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660, "{mode:o}");
        let kept = HeldListener::of(&address).unwrap();
        // A socket file replaced at the same path is another socket.
        drop(listener);
        std::fs::remove_file(&address).unwrap();
        // Past the file system's timestamp granularity (a coarse clock tick).
        std::thread::sleep(std::time::Duration::from_millis(20));
        let _again = bind_socket(&address).unwrap();
        assert_ne!(HeldListener::of(&address).unwrap(), kept);
    }

    #[test]
    fn a_file_or_a_connected_socket_is_not_a_listener() {
        let file = tempfile::tempfile().unwrap();
        assert!(listening_path(file.as_fd()).is_err());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(listening_path(a.as_fd()).is_err());
    }
}
