//! lazysnapd as a process: flags, config file, socket mode, lock, signals, bad requests.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use snapshotter::proto::snapshots as pb;
use testkit::lazysnapd::Lazysnapd;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnapd");

fn prepare(key: &str, parent: &str) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest {
        snapshotter: "lazysnap".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_on_flags_and_stops_cleanly_on_signals() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Lazysnapd::start(Path::new(BIN), dir.path()).unwrap();
    for (round, signal) in [libc::SIGTERM, libc::SIGINT].into_iter().enumerate() {
        let mode = std::fs::metadata(&daemon.address)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");
        let mut client = snapshotter::client::connect(&daemon.address).await.unwrap();
        let mounts = client
            .prepare(prepare(&format!("k{signal}"), ""))
            .await
            .unwrap();
        assert_eq!(mounts.into_inner().mounts[0].r#type, "bind");
        drop(client);
        let status = daemon.signal_and_wait(signal).unwrap();
        assert!(
            status.success(),
            "exit status {status} after signal {signal}"
        );
        // The fd holder keeps the socket for the next daemon, which takes it over.
        assert!(
            std::os::unix::net::UnixStream::connect(&daemon.address).is_ok(),
            "the socket was not kept after signal {signal}"
        );
        daemon.restart().unwrap();
        // (The status socket that `restart` waits for comes up just before.)
        let took_over = testkit::wait_until(Duration::from_secs(10), || {
            daemon
                .log()
                .matches("took over the listening socket from the fd holder")
                .count()
                == round + 1
        });
        assert!(took_over, "{}", daemon.log());
    }
    // State survives the restarts.
    let mut client = snapshotter::client::connect(&daemon.address).await.unwrap();
    let list = client
        .list(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(list.info.len(), 2);
    drop(client);
    // `--unmount-all` lets go of the socket: nothing is left at the address.
    daemon.stop().unwrap();
    daemon.unmount_all().unwrap();
    assert!(!daemon.address.exists(), "a stale socket file was left");
}

/// A call made while no lazysnapd runs (stopped, or killed) waits in the kept socket's
/// backlog and is answered by the next daemon, on its first try.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_made_between_two_daemons_waits_for_the_second() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Lazysnapd::start(Path::new(BIN), dir.path()).unwrap();
    for (round, signal) in [libc::SIGTERM, libc::SIGKILL].into_iter().enumerate() {
        still_serves(&daemon, &format!("before-{round}")).await;
        daemon.signal_and_wait(signal).unwrap();
        let address = daemon.address.clone();
        let key = format!("during-gap-{round}");
        let call = tokio::spawn(async move {
            let mut client = snapshotter::client::connect(&address).await?;
            client.prepare(prepare(&key, "")).await.map_err(Into::into)
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!call.is_finished(), "a call with no daemon did not wait");
        daemon.restart().unwrap();
        let answered: anyhow::Result<_> = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .expect("the call made in the gap was never answered")
            .unwrap();
        let mounts = answered.unwrap_or_else(|e| panic!("after signal {signal}: {e:#}"));
        assert_eq!(mounts.into_inner().mounts[0].r#type, "bind");
    }
}

/// With `[lazy] handover = false` nothing is kept: the socket goes with the daemon.
#[tokio::test(flavor = "multi_thread")]
async fn without_handover_the_socket_is_removed_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[lazy]\nhandover = false\n").unwrap();
    let mut daemon = Lazysnapd::start_with_args(
        Path::new(BIN),
        dir.path(),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    still_serves(&daemon, "k").await;
    daemon.stop().unwrap();
    assert!(!daemon.address.exists(), "socket left behind");
}

/// Waits for `text` in the daemon's log; panics with the log when it does not come.
fn wait_for_log(daemon: &Lazysnapd, text: &str) {
    if !testkit::wait_until(Duration::from_secs(10), || daemon.log().contains(text)) {
        panic!("no {text:?} in the log:\n{}", daemon.log());
    }
}

async fn still_serves(daemon: &Lazysnapd, key: &str) {
    let mut client = snapshotter::client::connect(&daemon.address).await.unwrap();
    client.prepare(prepare(key, "")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn hup_reloads_usr1_logs_the_status_and_quit_stops() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "log_level = \"info\"\n").unwrap();
    let config_arg = config.to_str().unwrap();
    // An empty RUST_LOG: the configured level decides, so a reload can change it.
    let daemon = Lazysnapd::start_with_env(
        Path::new(BIN),
        dir.path(),
        &["--config", config_arg],
        &[("RUST_LOG", "")],
    )
    .unwrap();
    let mut daemon = daemon;
    let send = |daemon: &Lazysnapd, signal: i32| {
        testkit::process::send_signal(daemon.pid(), signal);
    };
    still_serves(&daemon, "before").await;
    assert!(!daemon.log().contains("DEBUG"), "debug lines at level info");

    std::fs::write(
        &config,
        r#"log_level = "debug"
[cache]
disk_bytes = 12345678
[[resolver.host."registry.example.com".mirrors]]
host = "mirror.example.com"
"#,
    )
    .unwrap();
    send(&daemon, libc::SIGHUP);
    wait_for_log(&daemon, "SIGHUP: log level changed");
    wait_for_log(&daemon, "SIGHUP: registry hosts reloaded");
    wait_for_log(&daemon, "SIGHUP: read docker's config.json again");
    wait_for_log(&daemon, "take effect only after a restart");
    assert!(daemon.log().contains("[\"cache\"]"), "{}", daemon.log());
    still_serves(&daemon, "after-hup").await;
    assert!(
        daemon.log().contains("DEBUG"),
        "no debug lines after the reload"
    );

    // A broken file: the daemon keeps what it has and says why.
    std::fs::write(&config, "log_level = [\n").unwrap();
    send(&daemon, libc::SIGHUP);
    wait_for_log(&daemon, "SIGHUP: the configuration is kept as it was");
    still_serves(&daemon, "after-bad-hup").await;

    send(&daemon, libc::SIGUSR1);
    wait_for_log(&daemon, "SIGUSR1: status");
    send(&daemon, libc::SIGUSR2);
    wait_for_log(&daemon, "SIGUSR2: ignored");
    send(&daemon, libc::SIGPIPE);
    still_serves(&daemon, "after-usr-pipe").await;

    let status = daemon.signal_and_wait(libc::SIGQUIT).unwrap();
    assert!(status.success(), "exit status {status} after SIGQUIT");
    assert!(
        std::os::unix::net::UnixStream::connect(&daemon.address).is_ok(),
        "the socket was not kept after SIGQUIT"
    );
    assert!(daemon.log().contains("SIGQUIT: shutting down"));
}

/// Prepare's cost grows with its labels linearly (a probe found 10,000 labels took 2.2 s
/// and 30,000 took 17.5 s). The bound is loose: it catches quadratic growth, not noise;
/// the median is printed as the figure.
#[tokio::test(flavor = "multi_thread")]
async fn prepare_with_30000_labels_stays_fast() {
    let dir = tempfile::tempdir().unwrap();
    let daemon =
        Lazysnapd::start_with_env(Path::new(BIN), dir.path(), &[], &[("RUST_LOG", "info")])
            .unwrap();
    let mut client = snapshotter::client::connect(&daemon.address).await.unwrap();
    let labels: HashMap<String, String> = (0..30_000)
        .map(|i| {
            (
                format!("containerd.io/gc.ref.content.l.{i}"),
                format!("sha256:{i:064x}"),
            )
        })
        .collect();
    let mut times = Vec::new();
    for n in 0..5 {
        let mut request = prepare(&format!("many-labels-{n}"), "");
        request.labels = labels.clone();
        let started = std::time::Instant::now();
        client.prepare(request).await.unwrap();
        times.push(started.elapsed());
    }
    let info = client
        .stat(pb::StatSnapshotRequest {
            snapshotter: "lazysnap".into(),
            key: "many-labels-0".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.labels.len(), 30_000);
    times.sort();
    eprintln!(
        "Prepare with 30,000 labels: median {:?} (of {times:?})",
        times[2]
    );
    assert!(times[2] < Duration::from_secs(3), "{times:?}");
}

#[test]
fn a_second_daemon_on_the_same_root_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let first = Lazysnapd::start(Path::new(BIN), dir.path()).unwrap();
    let out = Command::new(BIN)
        .arg("--root")
        .arg(&first.root)
        .arg("--address")
        .arg(dir.path().join("other.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("already using root"),
        "unclear refusal: {stderr}"
    );
    assert!(stderr.contains(&first.pid().to_string()), "{stderr}");
    // The first daemon's socket is untouched and still serves.
    assert!(std::os::unix::net::UnixStream::connect(&first.address).is_ok());
}

#[test]
fn a_second_daemon_on_the_same_socket_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let first = Lazysnapd::start(Path::new(BIN), dir.path()).unwrap();
    let out = Command::new(BIN)
        .arg("--root")
        .arg(dir.path().join("other-root"))
        .arg("--address")
        .arg(&first.address)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use"), "unclear refusal: {stderr}");
    assert!(std::os::unix::net::UnixStream::connect(&first.address).is_ok());
}

#[test]
fn config_file_sets_root_and_address() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state");
    let sock = dir.path().join("from-config.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "root = \"{}\"\naddress = \"{}\"\nlog_level = \"debug\"\n",
            root.display(),
            sock.display()
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let up = testkit::wait_until(Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    testkit::process::send_signal(child.id(), libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert!(
        up,
        "no socket at the configured address: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    assert!(root.join("metadata.db").exists());
    // Kept by the fd holder until the operator lets it go.
    assert!(sock.exists());
    let released = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--unmount-all")
        .output()
        .unwrap();
    assert!(
        released.status.success(),
        "{}",
        String::from_utf8_lossy(&released.stderr)
    );
    assert!(!sock.exists());
    // log_level = "debug" took effect.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("DEBUG")
            || std::env::var_os("RUST_LOG").is_some()
    );
}

#[test]
fn a_bad_config_file_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "rooot = \"/tmp/x\"\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rooot"), "{stderr}");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_the_codes_containerd_expects_and_never_kill_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Lazysnapd::start(Path::new(BIN), dir.path()).unwrap();
    let mut c = snapshotter::client::connect(&daemon.address).await.unwrap();

    assert_eq!(
        code(c.prepare(prepare("", "")).await),
        Code::InvalidArgument
    );
    assert_eq!(code(c.prepare(prepare("a", "nope")).await), Code::NotFound);
    c.prepare(prepare("a", "")).await.unwrap();
    assert_eq!(code(c.prepare(prepare("a", "")).await), Code::AlreadyExists);
    assert_eq!(
        code(c.prepare(prepare("b", "a")).await),
        Code::InvalidArgument,
        "parent not committed"
    );
    let commit = |name: &str, key: &str| pb::CommitSnapshotRequest {
        name: name.into(),
        key: key.into(),
        ..Default::default()
    };
    c.commit(commit("base", "a")).await.unwrap();
    assert_eq!(
        code(c.commit(commit("base", "a")).await),
        Code::AlreadyExists
    );
    assert_eq!(code(c.commit(commit("x", "missing")).await), Code::NotFound);
    c.prepare(prepare("child", "base")).await.unwrap();
    let view = pb::ViewSnapshotRequest {
        key: "v".into(),
        parent: "base".into(),
        ..Default::default()
    };
    c.view(view).await.unwrap();
    assert_eq!(
        code(c.commit(commit("y", "v")).await),
        Code::FailedPrecondition,
        "views cannot be committed"
    );
    let remove = |key: &str| pb::RemoveSnapshotRequest {
        key: key.into(),
        ..Default::default()
    };
    let err = c.remove(remove("base")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("remove"), "{}", err.message());
    let mounts = |key: &str| pb::MountsRequest {
        key: key.into(),
        ..Default::default()
    };
    assert_eq!(
        code(c.mounts(mounts("base")).await),
        Code::FailedPrecondition
    );
    assert_eq!(code(c.mounts(mounts("zzz")).await), Code::NotFound);
    let stat = pb::StatSnapshotRequest {
        key: "zzz".into(),
        ..Default::default()
    };
    assert_eq!(code(c.stat(stat).await), Code::NotFound);
    let update = pb::UpdateSnapshotRequest {
        info: Some(pb::Info {
            name: "base".into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["parent".into()],
        }),
        ..Default::default()
    };
    assert_eq!(code(c.update(update).await), Code::InvalidArgument);
    assert_eq!(
        code(
            c.update(pb::UpdateSnapshotRequest::default())
                .await
                .map(|_| ())
        ),
        Code::InvalidArgument
    );
    let list = pb::ListSnapshotsRequest {
        filters: vec!["name==\"open".into()],
        ..Default::default()
    };
    assert_eq!(code(c.list(list).await), Code::InvalidArgument);
    let usage = pb::UsageRequest {
        key: "zzz".into(),
        ..Default::default()
    };
    assert_eq!(code(c.usage(usage).await), Code::NotFound);

    // Garbage on the socket is dropped, not fatal.
    {
        use std::io::Write;
        let mut raw = std::os::unix::net::UnixStream::connect(&daemon.address).unwrap();
        let _ = raw.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\x01garbage");
    }
    let mut c = snapshotter::client::connect(&daemon.address).await.unwrap();
    let stat = pb::StatSnapshotRequest {
        key: "base".into(),
        ..Default::default()
    };
    let info = c.stat(stat).await.unwrap().into_inner().info.unwrap();
    assert_eq!(info.kind, pb::Kind::Committed as i32);
    assert!(daemon.log().contains("serving"), "daemon still up");
}

/// Socket activation: the socket systemd passes as fd 3 (`LISTEN_FDS`, `LISTEN_PID`) is
/// served, outlives the daemon (systemd holds it) and holds a call made in the gap.
#[tokio::test(flavor = "multi_thread")]
async fn a_socket_passed_by_systemd_is_served_and_outlives_the_daemon() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let address = dir.path().join("activated.sock");
    // This test plays systemd: it binds the socket and keeps it.
    let listener = std::os::unix::net::UnixListener::bind(&address).unwrap();
    let listener_fd = listener.as_raw_fd();
    let root = dir.path().join("root");
    let log = dir.path().join("lazysnapd.log");
    let start = || {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("export LISTEN_FDS=1 LISTEN_PID=$$; exec \"$0\" \"$@\"")
            .arg(BIN)
            .arg("--root")
            .arg(&root)
            // Not where systemd's socket is: systemd's wins, with a warning.
            .arg("--address")
            .arg(dir.path().join("configured.sock"))
            .env("RUST_LOG", "info");
        // As systemd does: the socket becomes the child's fd 3 (dup2 clears its
        // close-on-exec flag there, and only there).
        // SAFETY: dup2 is async-signal-safe, and both fds stay open until exec.
        #[allow(unsafe_code)]
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::dup2(listener_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut daemon = testkit::process::ChildGuard::spawn("lazysnapd", cmd, &log).unwrap();
        let status = root.join("status.sock");
        let up = testkit::wait_until(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&status).is_ok()
        });
        daemon.check_running().unwrap();
        assert!(up, "{}", daemon.log_tail());
        daemon
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut daemon = start();
    let mut client = snapshotter::client::connect(&address).await.unwrap();
    client.prepare(prepare("first", "")).await.unwrap();
    drop(client);
    assert!(log_text().contains("origin=Systemd"), "{}", log_text());
    assert!(log_text().contains("serving on the socket systemd passed"));
    assert!(!dir.path().join("configured.sock").exists());

    let status = daemon
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(30))
        .unwrap();
    assert!(status.success());
    assert!(address.exists(), "the daemon removed systemd's socket");
    let gap_address = address.clone();
    let call = tokio::spawn(async move {
        let mut client = snapshotter::client::connect(&gap_address).await?;
        client
            .prepare(prepare("in-the-gap", ""))
            .await
            .map_err(anyhow::Error::from)
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!call.is_finished(), "a call with no daemon did not wait");
    let mut daemon = start();
    tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the call made in the gap was never answered")
        .unwrap()
        .unwrap();
    daemon
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(30))
        .unwrap();
    let out = Command::new(BIN)
        .arg("--root")
        .arg(&root)
        .arg("--unmount-all")
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// A child process killed, and waited for, when the test is done with it or fails.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The signals in a `/proc/PID/status` mask line (`SigBlk:` or `SigCgt:`), by number.
fn signal_mask(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

/// SIGHUP, SIGTERM and SIGINT sent 0, 1 and 2 ms after lazysnapd's own code starts
/// (it holds them back from its first instruction, before `main`) are handled, never
/// fatal: HUP reloads and the daemon serves; TERM and INT stop it with exit status 0.
/// (Between exec and that first instruction, the dynamic loader's 2-3 ms here, no
/// program can handle a signal; see the README.)
#[tokio::test(flavor = "multi_thread")]
async fn signals_from_the_first_instruction_are_handled_not_fatal() {
    for (signal, name) in [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
    ] {
        for delay_ms in [0, 1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let config = dir.path().join("config.toml");
            std::fs::write(&config, "[lazy]\nhandover = false\n").unwrap();
            let log = dir.path().join("log");
            let socket = dir.path().join("s.sock");
            // lazysnapd's first instruction holds the signals back until its handlers are
            // in place, milliseconds later: seen held back, its code has begun. A loaded
            // machine can keep this thread from looking within that window: start again.
            let hup = 1u64 << (libc::SIGHUP - 1);
            let spawn = || {
                KilledOnDrop(
                    Command::new(BIN)
                        .args(["--root", dir.path().join("root").to_str().unwrap()])
                        .args(["--address", socket.to_str().unwrap()])
                        .args(["--config", config.to_str().unwrap()])
                        .stdout(std::process::Stdio::null())
                        .stderr(std::fs::File::create(&log).unwrap())
                        .spawn()
                        .unwrap(),
                )
            };
            let mut child = (0..5)
                .map(|_| spawn())
                .find(|c| (0..200_000).any(|_| signal_mask(c.0.id(), "SigBlk:") & hup != 0))
                .expect("the signals were never seen held back in five starts");
            let child = &mut child.0;
            let pid = child.id();
            std::thread::sleep(Duration::from_millis(delay_ms));
            testkit::process::send_signal(pid, signal);
            let what = format!("{name} {delay_ms} ms after start");
            if signal == libc::SIGHUP {
                let reloaded = testkit::wait_until(Duration::from_secs(10), || {
                    std::fs::read_to_string(&log).is_ok_and(|l| l.contains("SIGHUP: reloading"))
                });
                assert!(
                    reloaded,
                    "{what}: {:?}; log:\n{}",
                    child.try_wait(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                assert!(child.try_wait().unwrap().is_none(), "{what}: it exited");
                // The file appears at bind(2), before listen(2): wait for a connect that
                // goes through, not for the file.
                assert!(testkit::wait_until(Duration::from_secs(10), || {
                    std::os::unix::net::UnixStream::connect(&socket).is_ok()
                }));
                let mut c = snapshotter::client::connect(&socket).await.unwrap();
                c.prepare(prepare("k", "")).await.unwrap();
                testkit::process::send_signal(pid, libc::SIGTERM);
            }
            let status = child.wait().unwrap();
            assert_eq!(
                status.code(),
                Some(0),
                "{what}: {status:?}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
}
