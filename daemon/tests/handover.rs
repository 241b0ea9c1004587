//! Issue 8 with real parts: containers reading a lazily pulled layer (containerd, runc,
//! docker-registry, lazysnapd over FUSE) keep reading correct bytes while lazysnapd is
//! stopped with SIGTERM and started again, killed with SIGKILL (with reads in flight in
//! the dying daemon) and started again, and replaced by another binary. The longest
//! stall any read saw is measured and printed.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{LAZYSNAPD, containerd_for, convert, rpull_lazily, start_lazysnapd};
use sha2::Digest;
use testkit::containerd::mounts_under;
use testkit::image::{Entry, ImageBuilder, busybox_entries, noise};
use testkit::process::send_signal;
use testkit::registry::Registry;

/// Files the container reads, one per step, each once (a second read would come from
/// the page cache and prove nothing).
const CONTAINER_FILES: usize = 150;
const CONTAINER_FILE: usize = 32 << 10;
/// What the container reads from its file held open across all the restarts, per step.
const HELD_STEP: usize = 32 << 10;
/// Files the test reads through the container's root, timing each read.
const PROBE_FILES: usize = 800;
const PROBE_FILE: usize = 8 << 10;
const PROBE_HELD_STEP: usize = 8 << 10;
const BIG: usize = 8 << 20;

fn container_file(i: usize) -> Vec<u8> {
    noise(CONTAINER_FILE, 2000 + i as u64)
}
fn probe_file(i: usize) -> Vec<u8> {
    noise(PROBE_FILE, 5000 + i as u64)
}
fn held() -> Vec<u8> {
    noise(BIG, 7)
}
fn probe_held() -> Vec<u8> {
    noise(BIG, 9)
}
fn inflight() -> Vec<u8> {
    noise(1 << 20, 13)
}
fn passthrough() -> Vec<u8> {
    noise(2 << 20, 17)
}

/// Whether any layer under `root` has a passthrough backing id recorded.
fn passthrough_recorded(root: &Path) -> bool {
    std::fs::read_dir(root.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read_to_string(e.path().join("fs.passthrough-ids"))
                .is_ok_and(|t| !t.is_empty())
        })
}

fn hex(data: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(data))
}

/// The container: reads file i and the next block of its held-open file, logs their
/// sha256 in its own /tmp, and goes on until the files run out.
const SCRIPT: &str = r#"
exec 3</app/held.bin
i=0
while [ -e /app/c/$i ]; do
  sha256sum /app/c/$i >> /tmp/files.log || echo "FAIL $i" >> /tmp/files.log
  dd bs=32768 count=1 <&3 2>/dev/null | sha256sum >> /tmp/held.log
  i=$((i+1))
  sleep 0.05
done
echo done >> /tmp/files.log
sleep 600
"#;

fn push_image(registry: &Registry) -> String {
    let mut entries = busybox_entries().unwrap();
    entries.push(Entry::dir("app"));
    entries.push(Entry::dir("app/c"));
    entries.push(Entry::dir("app/t"));
    for i in 0..CONTAINER_FILES {
        entries.push(Entry::file(&format!("app/c/{i}"), container_file(i)));
    }
    for i in 0..PROBE_FILES {
        entries.push(Entry::file(&format!("app/t/{i}"), probe_file(i)));
    }
    entries.push(Entry::file("app/held.bin", held()));
    entries.push(Entry::file("app/probe-held.bin", probe_held()));
    entries.push(Entry::file("app/inflight.bin", inflight()));
    entries.push(Entry::file("app/passthrough.bin", passthrough()));
    let image = ImageBuilder::new()
        .entries(&entries)
        .unwrap()
        .cmd(&["/bin/sh", "-c", SCRIPT])
        .build()
        .unwrap();
    registry.push("app/handover", "plain", &image).unwrap()
}

/// The pids of fd holders serving `root`.
fn holders_of(root: &Path) -> Vec<u32> {
    let want = root.join("fdholder.sock");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.windows(2).any(|w| {
            w[0] == b"--hold-fds" && Path::new(std::str::from_utf8(w[1]).unwrap_or("")) == want
        }) {
            out.push(pid);
        }
    }
    out
}

/// One timed read.
#[derive(Debug, Clone)]
struct Sample {
    start: Instant,
    took: Duration,
    what: String,
}

#[derive(Default)]
struct Samples {
    reads: Mutex<Vec<Sample>>,
    failures: Mutex<Vec<String>>,
}

impl Samples {
    fn record(&self, start: Instant, what: String, result: Result<bool, std::io::Error>) {
        let took = start.elapsed();
        match result {
            Ok(true) => {}
            Ok(false) => self
                .failures
                .lock()
                .unwrap()
                .push(format!("{what}: wrong bytes")),
            Err(e) => self.failures.lock().unwrap().push(format!("{what}: {e}")),
        }
        self.reads
            .lock()
            .unwrap()
            .push(Sample { start, took, what });
    }
}

/// Reads each probe file once, every 10 ms, through the container's root.
fn probe_files(rootfs: PathBuf, samples: Arc<Samples>, stop: Arc<AtomicBool>) {
    for i in 0..PROBE_FILES {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let start = Instant::now();
        let r = std::fs::read(rootfs.join(format!("app/t/{i}"))).map(|d| d == probe_file(i));
        samples.record(start, format!("app/t/{i}"), r);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads a file opened before any restart, step by step, every 10 ms.
fn probe_held_open(mut file: std::fs::File, samples: Arc<Samples>, stop: Arc<AtomicBool>) {
    let want = probe_held();
    let mut at = 0;
    while at < want.len() && !stop.load(Ordering::Relaxed) {
        let mut buf = vec![0u8; PROBE_HELD_STEP];
        let start = Instant::now();
        let r = file
            .read_exact(&mut buf)
            .map(|()| buf[..] == want[at..at + PROBE_HELD_STEP]);
        samples.record(start, format!("app/probe-held.bin@{at}"), r);
        at += PROBE_HELD_STEP;
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// When lazysnapd was away: from the signal to the new daemon's socket answering.
struct Gap {
    name: &'static str,
    down: Instant,
    up: Instant,
}

#[tokio::test(flavor = "multi_thread")]
async fn running_containers_keep_reading_through_restarts_crashes_and_upgrades() {
    let name = "running_containers_keep_reading_through_restarts_crashes_and_upgrades";
    if testkit::skip_unless_root(name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    // No background fetch: every file read first during a gap needs the registry.
    // Passthrough on: a file served through it is held open across the handovers.
    let mut daemon = start_lazysnapd(
        dir.path(),
        "[lazy]\nbackground_fetch = false\npassthrough = true\n",
    );
    let containerd = containerd_for(&daemon);

    let plain = push_image(&registry);
    let converted = format!("{}/app/handover:estargz", registry.host);
    convert(&plain, &converted, &["--estargz"]);
    rpull_lazily(&converted, &containerd).await;
    containerd
        .ctr([
            "run",
            "-d",
            "--snapshotter",
            "lazysnap",
            &converted,
            "reader",
        ])
        .unwrap();
    let tasks = containerd.ctr(["task", "ls"]).unwrap();
    let pid: u32 = tasks
        .lines()
        .find(|l| l.starts_with("reader "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid for task reader in {tasks}"));
    let rootfs = PathBuf::from(format!("/proc/{pid}/root"));
    let files_log = rootfs.join("tmp/files.log");
    let going = testkit::wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&files_log).is_ok_and(|t| t.lines().count() >= 3)
    });
    assert!(
        going,
        "the container is not reading; log:\n{}",
        daemon.log()
    );
    let holders = holders_of(&daemon.root);
    assert_eq!(holders.len(), 1, "one fd holder: {holders:?}");

    // A file read whole is served through FUSE passthrough from then on: hold one such
    // open across everything (as a mapped shared library is), and open it again after.
    let passthrough_path = rootfs.join("app/passthrough.bin");
    let mut passthrough_held = None;
    let served = testkit::wait_until(Duration::from_secs(30), || {
        let mut f = std::fs::File::open(&passthrough_path).unwrap();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        assert!(data == passthrough(), "app/passthrough.bin differs");
        let recorded = passthrough_recorded(&daemon.root);
        if recorded {
            passthrough_held = Some(f);
        }
        recorded
    });
    assert!(served, "no passthrough open; log:\n{}", daemon.log());
    let mut passthrough_held = passthrough_held.unwrap();
    let again = std::fs::read(&passthrough_path);
    assert!(
        again.as_ref().is_ok_and(|d| *d == passthrough()),
        "a second passthrough open before any handover: {:?}",
        again.err()
    );

    let samples = Arc::new(Samples::default());
    let stop = Arc::new(AtomicBool::new(false));
    let held_open = std::fs::File::open(rootfs.join("app/probe-held.bin")).unwrap();
    let readers = [
        {
            let (r, s, x) = (rootfs.clone(), samples.clone(), stop.clone());
            std::thread::spawn(move || probe_files(r, s, x))
        },
        {
            let (s, x) = (samples.clone(), stop.clone());
            std::thread::spawn(move || probe_held_open(held_open, s, x))
        },
    ];
    let mut gaps = Vec::new();
    std::thread::sleep(Duration::from_secs(1));

    // (a) SIGTERM, then the same binary again.
    let layers = mounts_under(&daemon.root);
    assert!(!layers.is_empty());
    let down = Instant::now();
    assert!(daemon.stop().unwrap().success());
    assert_eq!(
        mounts_under(&daemon.root),
        layers,
        "SIGTERM left the layers"
    );
    daemon.restart().unwrap();
    gaps.push(Gap {
        name: "SIGTERM + restart",
        down,
        up: Instant::now(),
    });
    std::thread::sleep(Duration::from_millis(1500));

    // (b) SIGKILL while reads are in flight in the daemon: the registry is frozen, so
    // the read of app/inflight.bin was taken by the daemon and waits for its fetch
    // when the daemon dies. The kernel must resend it to the next daemon.
    send_signal(registry.pid(), libc::SIGSTOP);
    let inflight_reader = {
        let path = rootfs.join("app/inflight.bin");
        std::thread::spawn(move || {
            let start = Instant::now();
            let r = std::fs::File::open(&path)
                .map_err(|e| {
                    std::io::Error::other(format!("open after {:?}: {e}", start.elapsed()))
                })
                .and_then(|mut f| {
                    let mut d = Vec::new();
                    f.read_to_end(&mut d).map_err(|e| {
                        std::io::Error::other(format!("read after {:?}: {e}", start.elapsed()))
                    })?;
                    Ok(d)
                });
            (start.elapsed(), r)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let down = Instant::now();
    daemon.kill().unwrap();
    send_signal(registry.pid(), libc::SIGCONT);
    daemon.restart().unwrap();
    gaps.push(Gap {
        name: "SIGKILL + restart",
        down,
        up: Instant::now(),
    });
    let (took, read) = inflight_reader.join().unwrap();
    let read = read.unwrap_or_else(|e| {
        let log = daemon.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("FUSE"))
            .collect();
        panic!("a read in flight during SIGKILL failed: {e}; {lines:#?}")
    });
    assert!(
        read == inflight(),
        "a read in flight during SIGKILL returned wrong bytes"
    );
    eprintln!("read in flight in the killed daemon completed after {took:?}");
    std::thread::sleep(Duration::from_millis(1500));

    // (c) Upgrade: another binary takes over.
    let new_binary = dir.path().join("upgrade/lazysnapd");
    std::fs::create_dir_all(new_binary.parent().unwrap()).unwrap();
    std::fs::copy(LAZYSNAPD, &new_binary).unwrap();
    let down = Instant::now();
    assert!(daemon.stop().unwrap().success());
    daemon.set_binary(&new_binary);
    daemon.restart().unwrap();
    gaps.push(Gap {
        name: "upgrade",
        down,
        up: Instant::now(),
    });
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", daemon.pid())).unwrap(),
        new_binary
    );
    std::thread::sleep(Duration::from_millis(1500));
    // Passthrough opens across the handovers: the held one still reads, and a new one
    // (which must get the same backing file from the new daemon) too.
    use std::io::Seek;
    passthrough_held.rewind().unwrap();
    let mut data = Vec::new();
    passthrough_held.read_to_end(&mut data).unwrap();
    assert!(
        data == passthrough(),
        "held passthrough open reads wrong bytes"
    );
    let again = std::fs::read(&passthrough_path).unwrap_or_else(|e| {
        let records: Vec<String> = std::fs::read_dir(daemon.root.join("snapshots"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("fs.passthrough-ids")).ok())
            .collect();
        let log = daemon.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("FUSE") || l.contains("resent") || l.contains("backing"))
            .collect();
        panic!("opening a passthrough file again after the handovers: {e}; records {records:?}; {lines:#?}")
    });
    assert!(again == passthrough(), "reopened passthrough file differs");
    drop(passthrough_held);
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }

    // The holder was never restarted, and every layer was taken over each time.
    assert_eq!(holders_of(&daemon.root), holders, "the fd holder changed");
    let log = daemon.log();
    assert_eq!(
        log.matches("took over the FUSE connection").count(),
        3 * layers.len(),
        "every layer taken over three times; log:\n{log}"
    );

    // The test's own reads: none failed, and the longest stall.
    let failures = samples.failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "reads failed: {failures:?}");
    let reads = samples.reads.lock().unwrap().clone();
    assert!(reads.len() > 100, "only {} reads", reads.len());
    let longest = reads.iter().max_by_key(|s| s.took).unwrap();
    eprintln!(
        "{} timed reads; longest stall {:?} ({})",
        reads.len(),
        longest.took,
        longest.what
    );
    for gap in &gaps {
        let overlapping: Vec<&Sample> = reads
            .iter()
            .filter(|s| s.start <= gap.up && s.start + s.took >= gap.down)
            .collect();
        let worst = overlapping.iter().map(|s| s.took).max().unwrap_or_default();
        eprintln!(
            "{}: lazysnapd away for {:?}; {} reads overlapped it, the longest took {worst:?}",
            gap.name,
            gap.up - gap.down,
            overlapping.len()
        );
    }
    assert!(
        longest.took < Duration::from_secs(20),
        "a read stalled {:?}",
        longest.took
    );

    // The container's reads: every file and every block of its held-open file right.
    let finished = testkit::wait_until(Duration::from_secs(120), || {
        std::fs::read_to_string(&files_log).is_ok_and(|t| t.contains("done"))
    });
    let files = std::fs::read_to_string(&files_log).unwrap();
    assert!(finished, "the container did not finish: {files}");
    let lines: Vec<&str> = files.lines().collect();
    assert_eq!(lines.len(), CONTAINER_FILES + 1, "{files}");
    for (i, line) in lines[..CONTAINER_FILES].iter().enumerate() {
        assert_eq!(
            *line,
            format!("{}  /app/c/{i}", hex(&container_file(i))),
            "container read of /app/c/{i}"
        );
    }
    let held_log = std::fs::read_to_string(rootfs.join("tmp/held.log")).unwrap();
    let held_want = held();
    for (i, line) in held_log.lines().enumerate() {
        let block = &held_want[i * HELD_STEP..(i + 1) * HELD_STEP];
        assert_eq!(
            line.split_whitespace().next(),
            Some(hex(block).as_str()),
            "container read of block {i} of its held-open file"
        );
    }
    assert_eq!(held_log.lines().count(), CONTAINER_FILES);

    containerd
        .ctr(["task", "kill", "-s", "SIGKILL", "reader"])
        .unwrap();
    let _ = testkit::wait_until(Duration::from_secs(20), || {
        containerd.ctr(["task", "rm", "reader"]).is_ok()
    });
    containerd.ctr(["container", "rm", "reader"]).unwrap();
    containerd
        .ctr(["image", "rm", "--sync", &converted])
        .unwrap();
    let clean = testkit::wait_until(Duration::from_secs(30), || {
        mounts_under(&daemon.root).is_empty()
    });
    assert!(clean, "left mounted: {:?}", mounts_under(&daemon.root));
    drop(containerd);
    drop(daemon);
    assert!(
        holders_of(&dir.path().join("ls/root")).is_empty(),
        "the fd holder outlived --unmount-all"
    );
}

/// The fallback when nothing can be handed over: with the fd holder gone too (killed
/// along with lazysnapd), the next daemon remounts the layers from its metadata, new
/// containers start, and `--unmount-all` leaves nothing behind.
#[tokio::test(flavor = "multi_thread")]
async fn without_the_holder_the_layers_are_remounted() {
    let name = "without_the_holder_the_layers_are_remounted";
    if testkit::skip_unless_root(name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let mut daemon = start_lazysnapd(dir.path(), "[lazy]\npassthrough = true\n");
    let containerd = containerd_for(&daemon);
    let image = ImageBuilder::new()
        .entries(&busybox_entries().unwrap())
        .unwrap()
        .entries(&[Entry::dir("app"), Entry::file("app/motd", "still here\n")])
        .unwrap()
        .cmd(&["/bin/cat", "/app/motd"])
        .build()
        .unwrap();
    let plain = registry.push("app/fallback", "plain", &image).unwrap();
    let converted = format!("{}/app/fallback:estargz", registry.host);
    convert(&plain, &converted, &["--estargz"]);
    rpull_lazily(&converted, &containerd).await;
    let holders = holders_of(&daemon.root);
    assert_eq!(holders.len(), 1);

    daemon.kill().unwrap();
    send_signal(holders[0], libc::SIGKILL);
    assert!(testkit::wait_until(Duration::from_secs(10), || {
        holders_of(&daemon.root).is_empty()
    }));
    daemon.restart().unwrap();
    let ran = containerd.runs_and_prints(
        "lazysnap",
        &converted,
        "after",
        "still here",
        Duration::from_secs(30),
    );
    let log = daemon.log();
    assert!(ran, "no container after losing the holder; log:\n{log}");
    assert!(!log.contains("took over the FUSE connection"), "{log}");
    assert!(log.contains("remote snapshot restored"), "{log}");
    // The remounted layers went to a new holder.
    assert_eq!(holders_of(&daemon.root).len(), 1);

    // The operator's way to remove everything: stop, then --unmount-all.
    let layers = mounts_under(&daemon.root);
    assert!(daemon.stop().unwrap().success());
    assert_eq!(mounts_under(&daemon.root), layers);
    daemon.unmount_all().unwrap();
    assert!(mounts_under(&daemon.root).is_empty());
    assert!(holders_of(&daemon.root).is_empty());
    daemon.restart().unwrap();
    let ran = containerd.runs_and_prints(
        "lazysnap",
        &converted,
        "after-unmount",
        "still here",
        Duration::from_secs(30),
    );
    assert!(
        ran,
        "no container after --unmount-all; log:\n{}",
        daemon.log()
    );
    containerd
        .ctr(["image", "rm", "--sync", &converted])
        .unwrap();
    let clean = testkit::wait_until(Duration::from_secs(30), || {
        mounts_under(&daemon.root).is_empty()
    });
    assert!(clean, "left mounted: {:?}", mounts_under(&daemon.root));
}

/// A file served through FUSE passthrough (read whole once, so the kernel reads a
/// local copy) and held open across a handover can still be opened again afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn passthrough_files_open_again_after_a_handover() {
    let name = "passthrough_files_open_again_after_a_handover";
    if testkit::skip_unless_root(name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let mut daemon = start_lazysnapd(dir.path(), "[lazy]\npassthrough = true\n");
    let containerd = containerd_for(&daemon);
    let image = ImageBuilder::new()
        .entries(&busybox_entries().unwrap())
        .unwrap()
        .entries(&[
            Entry::dir("app"),
            Entry::file("app/passthrough.bin", passthrough()),
        ])
        .unwrap()
        .cmd(&["/bin/sleep", "600"])
        .build()
        .unwrap();
    let plain = registry.push("app/pt", "plain", &image).unwrap();
    let converted = format!("{}/app/pt:estargz", registry.host);
    convert(&plain, &converted, &["--estargz"]);
    rpull_lazily(&converted, &containerd).await;
    containerd
        .ctr(["run", "-d", "--snapshotter", "lazysnap", &converted, "pt"])
        .unwrap();
    let tasks = containerd.ctr(["task", "ls"]).unwrap();
    let pid: u32 = tasks
        .lines()
        .find(|l| l.starts_with("pt "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap();
    let path = PathBuf::from(format!("/proc/{pid}/root/app/passthrough.bin"));
    let mut held = None;
    assert!(testkit::wait_until(Duration::from_secs(30), || {
        let f = std::fs::File::open(&path).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data == passthrough());
        let recorded = passthrough_recorded(&daemon.root);
        if recorded {
            held = Some(f);
        }
        recorded
    }));
    let mut held = held.unwrap();
    for (round, kill) in [(1, false), (2, true)] {
        if kill {
            daemon.kill().unwrap();
        } else {
            assert!(daemon.stop().unwrap().success());
        }
        daemon.restart().unwrap();
        let again = std::fs::read(&path);
        assert!(
            again.as_ref().is_ok_and(|d| *d == passthrough()),
            "round {round}: opening again: {:?}; records {:?}",
            again.err(),
            std::fs::read_dir(daemon.root.join("snapshots"))
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("fs.passthrough-ids")).ok())
                .collect::<Vec<_>>()
        );
        use std::io::Seek;
        held.rewind().unwrap();
        let mut data = Vec::new();
        held.read_to_end(&mut data).unwrap();
        assert!(data == passthrough(), "round {round}: held open");
    }
    drop(held);
    containerd
        .ctr(["task", "kill", "-s", "SIGKILL", "pt"])
        .unwrap();
    let _ = testkit::wait_until(Duration::from_secs(20), || {
        containerd.ctr(["task", "rm", "pt"]).is_ok()
    });
    containerd.ctr(["container", "rm", "pt"]).unwrap();
    containerd
        .ctr(["image", "rm", "--sync", &converted])
        .unwrap();
}

/// What the daemon does at a restart with no holder running: the listener and each
/// restored layer put their fds from threads of their own at once. Exactly one holder
/// must start and keep them all; a second one would remove the first one's socket and
/// whatever was put into the first would not come back at the next handover.
#[test]
fn fds_put_at_once_by_many_threads_go_to_one_holder() {
    const THREADS: usize = 8;
    // Rounds, each on a fresh socket: a race lost once in a few tries must show.
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let client = snapshotter::holder::HolderClient::new(
            dir.path().join("fdholder.sock"),
            PathBuf::from(LAZYSNAPD),
        );
        let file = tempfile::tempfile().unwrap();
        let together = Arc::new(std::sync::Barrier::new(THREADS));
        let putters: Vec<_> = (0..THREADS)
            .map(|i| {
                let client = client.clone();
                let file = file.try_clone().unwrap();
                let together = together.clone();
                std::thread::spawn(move || {
                    together.wait();
                    client.put(&format!("/layer/{i}"), "", std::os::fd::AsFd::as_fd(&file))
                })
            })
            .collect();
        for putter in putters {
            putter.join().unwrap().unwrap();
        }
        let holders = holders_of(dir.path());
        let held = client.list().unwrap();
        assert!(client.exit().unwrap());
        for &extra in &holders {
            // Ends whichever holders the exit did not reach (only when the test fails).
            if std::fs::metadata(format!("/proc/{extra}")).is_ok() {
                send_signal(extra, libc::SIGKILL);
            }
        }
        assert_eq!(
            holders.len(),
            1,
            "round {round}: holders started: {holders:?}"
        );
        assert_eq!(
            held.len(),
            THREADS,
            "round {round}: the holder kept {} fds",
            held.len()
        );
    }
}
