//! The fd holder: a tiny process that keeps the daemon's `/dev/fuse` connections (and its
//! listening socket, under `LISTENER_KEY`) open while lazysnapd is down (stopped, crashed,
//! being upgraded), so the kernel keeps the mounts alive and queues their requests (and
//! containerd's connections) instead of failing them. A new lazysnapd takes copies of the
//! fds back and serves them (see `fusefs::adopt`).
//!
//! The holder does nothing but hold: fds keyed by mountpoint, each with an opaque line of
//! metadata, over a unix SEQPACKET socket with SCM_RIGHTS. It never reads a connection
//! and never needs restarting on upgrade. It is `lazysnapd --hold-fds SOCKET`, started
//! by the daemon in its own process group so that it outlives it.
//!
//! Protocol, one JSON request per connection: `put` {key, meta} + one fd; `list` →
//! one message per entry {key, meta} + its fd, then {end}; `drop` {key}; `exit`.

// Received fds arrive as raw numbers and must be wrapped; nothing else is unsafe.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept4, bind, connect, listen, recvmsg, sendmsg, setsockopt, socket, sockopt,
};
use serde_json::{Value, json};

/// The key of the daemon's listening socket (every other key is a mountpoint).
pub const LISTENER_KEY: &str = "listener:snapshots";

const MAX_MESSAGE: usize = 64 << 10;
/// A client that stalls must not wedge the holder: it serves one at a time.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

fn timeout() -> nix::sys::time::TimeVal {
    nix::sys::time::TimeVal::new(CLIENT_TIMEOUT.as_secs() as _, 0)
}

/// One held connection.
#[derive(Debug)]
pub struct Held {
    pub key: String,
    pub meta: String,
    pub fd: OwnedFd,
}

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn seqpacket() -> io::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(errno)
}

fn send(sock: &OwnedFd, msg: &Value, fd: Option<RawFd>) -> io::Result<()> {
    let bytes = msg.to_string();
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes.as_bytes())],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(errno)?;
    Ok(())
}

/// One message and the fd it carried; None at end of stream.
fn recv(sock: &OwnedFd) -> io::Result<Option<(Value, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(errno)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(errno)? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these fds in this process for us;
                // nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    if n == 0 {
        return Ok(None);
    }
    let value = serde_json::from_slice(&buf[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((value, fds.into_iter().next())))
}

fn connect_to(path: &Path) -> io::Result<OwnedFd> {
    let sock = seqpacket()?;
    connect(sock.as_raw_fd(), &UnixAddr::new(path).map_err(errno)?).map_err(errno)?;
    setsockopt(&sock, sockopt::ReceiveTimeout, &timeout()).map_err(errno)?;
    Ok(sock)
}

/// The lock a holder keeps for its life beside its socket, `fdholder.lock` for
/// `fdholder.sock`.
fn lock_path(socket: &Path) -> PathBuf {
    socket.with_extension("lock")
}

/// Runs the holder on `path` until asked to exit. Returns at once if another holder
/// runs or is starting there: two holders racing to bind would each remove the other's
/// socket file, and the fds put into the loser would be lost with it.
pub fn serve(path: &Path) -> io::Result<()> {
    let lock = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock_path(path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(()),
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    if connect_to(path).is_ok() {
        return Ok(());
    }
    // A socket file no holder answers on is a dead holder's (the lock says none runs).
    let _ = std::fs::remove_file(path);
    let listener = seqpacket()?;
    bind(listener.as_raw_fd(), &UnixAddr::new(path).map_err(errno)?).map_err(errno)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listen(&listener, Backlog::new(16).map_err(errno)?).map_err(errno)?;
    let ours = std::fs::metadata(path)?.ino();
    // accept(2) gives up after this, to look at the socket file.
    setsockopt(
        &listener,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(1, 0),
    )
    .map_err(errno)?;
    let mut held: BTreeMap<String, (String, OwnedFd)> = BTreeMap::new();
    loop {
        let conn = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new fd that nothing else owns.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(nix::Error::EAGAIN) => {
                // No daemon can reach a holder whose socket file is gone (its root was
                // deleted): holding on would only keep dead mounts around.
                if std::fs::metadata(path).map(|m| m.ino()).ok() != Some(ours) {
                    return Ok(());
                }
                continue;
            }
            Err(nix::Error::EINTR | nix::Error::ECONNABORTED) => continue,
            Err(e) => return Err(errno(e)),
        };
        let _ = setsockopt(&conn, sockopt::ReceiveTimeout, &timeout());
        let _ = setsockopt(&conn, sockopt::SendTimeout, &timeout());
        match answer(&conn, &mut held) {
            Ok(true) => {}
            Ok(false) => {
                let _ = std::fs::remove_file(path);
                return Ok(());
            }
            // A bad client costs only its own connection.
            Err(e) => eprintln!("lazysnapd fd holder: {e}"),
        }
    }
}

/// Serves one request; false after `exit`.
fn answer(conn: &OwnedFd, held: &mut BTreeMap<String, (String, OwnedFd)>) -> io::Result<bool> {
    let Some((req, fd)) = recv(conn)? else {
        return Ok(true);
    };
    let key = req["key"].as_str().unwrap_or_default().to_string();
    match req["op"].as_str() {
        Some("put") => {
            let fd = fd.ok_or_else(|| io::Error::other("put without an fd"))?;
            let meta = req["meta"].as_str().unwrap_or_default().to_string();
            // A replaced connection's fd closes here; the daemon replaces only dead ones.
            held.insert(key, (meta, fd));
            send(conn, &json!({"ok": true}), None)?;
        }
        Some("list") => {
            for (key, (meta, fd)) in held.iter() {
                send(
                    conn,
                    &json!({"key": key, "meta": meta}),
                    Some(fd.as_raw_fd()),
                )?;
            }
            send(conn, &json!({"end": true}), None)?;
        }
        Some("drop") => {
            held.remove(&key);
            send(conn, &json!({"ok": true}), None)?;
        }
        Some("exit") => {
            // Closing the fds ends connections no daemon serves: their mounts fail
            // with ENOTCONN from here on, so only an operator asks for this.
            held.clear();
            send(conn, &json!({"ok": true}), None)?;
            return Ok(false);
        }
        other => send(
            conn,
            &json!({"error": format!("unknown op {other:?}")}),
            None,
        )?,
    }
    Ok(true)
}

/// The daemon's side: talks to the holder at `socket`, starting it (as `exe
/// --hold-fds socket`) when a connection is to be put and none answers.
#[derive(Debug, Clone)]
pub struct HolderClient {
    socket: PathBuf,
    exe: PathBuf,
}

impl HolderClient {
    pub fn new(socket: PathBuf, exe: PathBuf) -> HolderClient {
        HolderClient { socket, exe }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn request(&self, sock: &OwnedFd, req: &Value, fd: Option<RawFd>) -> io::Result<()> {
        send(sock, req, fd)?;
        match recv(sock)? {
            Some((v, _)) if v["ok"] == json!(true) => Ok(()),
            Some((v, _)) => Err(io::Error::other(format!("fd holder: {v}"))),
            None => Err(io::Error::other("fd holder closed the connection")),
        }
    }

    /// `fdholder.log` beside the holder's socket (the daemon's private root).
    fn log_file(&self) -> std::process::Stdio {
        let path = self.socket.with_file_name("fdholder.log");
        match std::fs::File::options()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(file) => file.into(),
            Err(_) => std::process::Stdio::null(),
        }
    }

    fn connect_or_start(&self) -> io::Result<OwnedFd> {
        if let Ok(sock) = connect_to(&self.socket) {
            return Ok(sock);
        }
        // One start at a time in this process: the listener and the layers restored
        // beside it would otherwise each start a holder.
        static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _starting = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(sock) = connect_to(&self.socket) {
            return Ok(sock);
        }
        let mut child = std::process::Command::new(&self.exe)
            .arg("--hold-fds")
            .arg(&self.socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            // Not the daemon's stderr: a parent reading that pipe to its end (a test, a
            // supervisor's log pipe) would wait for the holder, which outlives the daemon.
            .stderr(self.log_file())
            // Its own process group: a signal to the daemon's group (a terminal's ^C,
            // a service manager's kill of the group) must not reach it.
            .process_group(0)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(sock) = connect_to(&self.socket) {
                if matches!(child.try_wait(), Ok(None)) {
                    tracing::info!(pid = child.id(), socket = %self.socket.display(), "started the fd holder");
                }
                // Reaped if it ever exits while we run; otherwise it outlives us.
                std::thread::spawn(move || child.wait());
                return Ok(sock);
            }
            match child.try_wait() {
                // Another process's holder has the lock and is about to answer.
                Ok(Some(status)) if status.success() => {}
                Ok(Some(status)) => {
                    return Err(io::Error::other(format!("fd holder exited: {status}")));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::other("fd holder did not open its socket"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Hands the holder a copy of `fd` under `key` (replacing what it held there).
    pub fn put(&self, key: &str, meta: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        let sock = self.connect_or_start()?;
        self.request(
            &sock,
            &json!({"op": "put", "key": key, "meta": meta}),
            Some(fd.as_raw_fd()),
        )
    }

    /// Copies of everything held (the holder keeps its own); empty when no holder runs.
    pub fn list(&self) -> io::Result<Vec<Held>> {
        let Ok(sock) = connect_to(&self.socket) else {
            return Ok(Vec::new());
        };
        send(&sock, &json!({"op": "list"}), None)?;
        let mut out = Vec::new();
        loop {
            match recv(&sock)? {
                Some((v, _)) if v["end"] == json!(true) => return Ok(out),
                Some((v, Some(fd))) => out.push(Held {
                    key: v["key"].as_str().unwrap_or_default().to_string(),
                    meta: v["meta"].as_str().unwrap_or_default().to_string(),
                    fd,
                }),
                Some((v, None)) => return Err(io::Error::other(format!("fd holder: {v}"))),
                None => return Err(io::Error::other("fd holder closed the connection")),
            }
        }
    }

    /// Lets go of `key`'s fd (its layer was unmounted); fine when none is held.
    pub fn forget(&self, key: &str) -> io::Result<()> {
        let Ok(sock) = connect_to(&self.socket) else {
            return Ok(());
        };
        self.request(&sock, &json!({"op": "drop", "key": key}), None)
    }

    /// Stops the holder, closing every fd it held; false when none ran.
    pub fn exit(&self) -> io::Result<bool> {
        let Ok(sock) = connect_to(&self.socket) else {
            return Ok(false);
        };
        self.request(&sock, &json!({"op": "exit"}), None)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    /// The holder keeps an fd's open file (not a number): what a client gets back
    /// reads the same file, after the client's own copy is closed.
    #[test]
    fn held_fds_outlive_their_sender_and_come_back_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("holder.sock");
        let server = {
            let socket = socket.clone();
            std::thread::spawn(move || serve(&socket))
        };
        let client = HolderClient::new(socket.clone(), PathBuf::from("/nonexistent"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while connect_to(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the holder did not open its socket"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"held bytes").unwrap();
        client
            .put("/a", "meta-a", std::os::fd::AsFd::as_fd(&file))
            .unwrap();
        drop(file);
        let held = client.list().unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(
            (held[0].key.as_str(), held[0].meta.as_str()),
            ("/a", "meta-a")
        );
        let mut back = std::fs::File::from(held.into_iter().next().unwrap().fd);
        back.rewind().unwrap();
        let mut text = String::new();
        back.read_to_string(&mut text).unwrap();
        assert_eq!(text, "held bytes");
        // Listing again still finds it: the holder gave out copies.
        assert_eq!(client.list().unwrap().len(), 1);
        client.forget("/a").unwrap();
        assert!(client.list().unwrap().is_empty());
        assert!(client.exit().unwrap());
        server.join().unwrap().unwrap();
        assert!(!socket.exists());
        assert!(!client.exit().unwrap(), "no holder runs any more");
    }

    /// A second holder started while the first one is still binding must step aside:
    /// binding too, it would remove the first one's socket file.
    #[test]
    fn a_holder_steps_aside_while_another_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("holder.sock");
        let first = std::fs::File::create(lock_path(&socket)).unwrap();
        first.try_lock().unwrap();
        let second = {
            let socket = socket.clone();
            std::thread::spawn(move || serve(&socket))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !second.is_finished() {
            assert!(Instant::now() < deadline, "the second holder kept running");
            std::thread::sleep(Duration::from_millis(5));
        }
        second.join().unwrap().unwrap();
        assert!(!socket.exists(), "the second holder bound the socket");
    }

    /// A holder nobody can reach any more (its root was deleted) goes away.
    #[test]
    fn the_holder_exits_when_its_socket_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("holder.sock");
        let server = {
            let socket = socket.clone();
            std::thread::spawn(move || serve(&socket))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while connect_to(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the holder did not open its socket"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::remove_file(&socket).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.is_finished() {
            assert!(Instant::now() < deadline, "the holder is still running");
            std::thread::sleep(Duration::from_millis(20));
        }
        server.join().unwrap().unwrap();
    }
}
