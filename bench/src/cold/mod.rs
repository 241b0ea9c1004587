//! lazysnap-bench's parts: image recipes ([`images`]), OCI layouts and their push
//! ([`oci`]), the emulated link ([`link`]), the stargz-snapshotter peer ([`peer`]), one
//! measured cold start ([`measure`]), the floor a perfect lazy snapshotter would reach
//! ([`floor`]), the daemons' memory ([`memory`]) and the reports ([`report`]).

pub mod floor;
pub mod images;
pub mod link;
pub mod memory;
pub mod oci;
pub mod peer;
pub mod report;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Set by SIGINT or SIGTERM; every wait checks it, so the bench stops promptly and its
/// guards clean up on the way out.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT and SIGTERM into [`INTERRUPTED`] instead of death, so drops run.
#[allow(unsafe_code)]
pub fn catch_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs `cmd` to its end (output captured), killing it on timeout or interruption.
pub fn run(mut cmd: Command, timeout: Duration) -> anyhow::Result<String> {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let (status, stdout, stderr) = wait_child(child, timeout, &what, |_| {})?;
    if !status.success() {
        bail!(
            "{what} failed ({status}): {}{}",
            stderr.trim(),
            stdout.trim()
        );
    }
    Ok(stdout)
}

/// Waits for `child`, draining stdout line by line (each line handed to `on_line` as it
/// arrives) and stderr; kills it by PID on timeout or interruption.
fn wait_child(
    mut child: std::process::Child,
    timeout: Duration,
    what: &str,
    mut on_line: impl FnMut(&str),
) -> anyhow::Result<(std::process::ExitStatus, String, String)> {
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out_thread = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let mut out = String::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(line) => {
                on_line(&line);
                out.push_str(&line);
                out.push('\n');
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(status) = child.try_wait()? {
            let _ = out_thread.join();
            for line in rx.try_iter() {
                on_line(&line);
                out.push_str(&line);
                out.push('\n');
            }
            let err = err_thread.join().unwrap_or_default();
            return Ok((status, out, err));
        }
        if INTERRUPTED.load(Ordering::SeqCst) || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            check_interrupted()?;
            bail!("{what} did not finish within {timeout:?}");
        }
    }
}

/// How the bench reaches containerd: the `ctr` client with its address and namespace.
#[derive(Clone, Debug)]
pub struct Ctr {
    pub address: PathBuf,
    pub namespace: String,
}

impl Ctr {
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace);
        cmd
    }

    pub fn run(&self, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let mut cmd = self.command();
        cmd.args(args);
        run(cmd, timeout)
    }

    /// Removes every container and image of the namespace and waits for containerd's
    /// garbage collection, which removes their content and snapshots.
    pub fn clear(&self) -> anyhow::Result<()> {
        let quick = Duration::from_secs(120);
        for task in self.run(&["tasks", "ls", "-q"], quick)?.lines() {
            let _ = self.run(&["tasks", "delete", "--force", task.trim()], quick);
        }
        for c in self.run(&["containers", "ls", "-q"], quick)?.lines() {
            let _ = self.run(&["containers", "delete", c.trim()], quick);
        }
        let images: Vec<String> = self
            .run(&["images", "ls", "-q"], quick)?
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        if !images.is_empty() {
            let mut args = vec!["images", "rm", "--sync"];
            args.extend(images.iter().map(String::as_str));
            self.run(&args, quick)?;
        }
        Ok(())
    }
}

/// How one cold start is made.
pub struct Target<'a> {
    pub ctr: &'a Ctr,
    pub reference: &'a str,
    /// `None`: overlayfs full pull with `ctr image pull`; else the remote snapshotter's
    /// name in containerd (lazysnap's or the peer's), pulled with `lazysnap rpull`.
    pub lazy_snapshotter: Option<&'a str>,
    pub lazysnap: &'a Path,
    pub plain_http: bool,
    pub timeout: Duration,
}

/// What one cold start measured (bytes served are read by the caller from the registry).
pub struct Timing {
    pub pull: Duration,
    pub create: Duration,
    pub first_line: Duration,
    pub run: Duration,
    pub last_line: String,
    /// For a lazy pull: the layers the snapshotter mounted lazily, and all of them (the
    /// others were downloaded whole and unpacked: the remote snapshotter declined them).
    pub lazy_layers: Option<(usize, usize)>,
}

/// Counts the layers `lazysnap rpull` reports as mounted lazily, out of all it lists
/// (its lines `DIGEST  OUTCOME  SIZE`).
pub fn lazy_layers(rpull_out: &str) -> (usize, usize) {
    let outcomes: Vec<&str> = rpull_out
        .lines()
        .filter(|l| l.starts_with("sha256:"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    (
        outcomes.iter().filter(|o| **o == "lazy").count(),
        outcomes.len(),
    )
}

/// Empties the page cache, so that no run reads what an earlier one left in memory.
pub fn drop_caches() -> anyhow::Result<()> {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").context("writing /proc/sys/vm/drop_caches")
}

/// Pull, create, start attached (first output line and exit timed), then delete.
pub fn measure(t: &Target, id: &str) -> anyhow::Result<Timing> {
    let start = Instant::now();
    let lazy = match t.lazy_snapshotter {
        None => {
            let mut args = vec!["images", "pull"];
            if t.plain_http {
                args.push("--plain-http");
            }
            args.push(t.reference);
            t.ctr.run(&args, t.timeout)?;
            None
        }
        Some(snapshotter) => {
            let mut cmd = Command::new(t.lazysnap);
            cmd.arg("rpull").arg("--address").arg(&t.ctr.address).args([
                "--namespace",
                &t.ctr.namespace,
                "--snapshotter",
                snapshotter,
            ]);
            if t.plain_http {
                cmd.arg("--plain-http");
            }
            cmd.arg(t.reference);
            Some(lazy_layers(&run(cmd, t.timeout)?))
        }
    };
    let pull = start.elapsed();
    let snapshotter = t.lazy_snapshotter.unwrap_or("overlayfs");
    let start = Instant::now();
    t.ctr.run(
        &[
            "containers",
            "create",
            "--snapshotter",
            snapshotter,
            t.reference,
            id,
        ],
        t.timeout,
    )?;
    let create = start.elapsed();
    let mut cmd = t.ctr.command();
    cmd.args(["tasks", "start", id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd.spawn().context("starting ctr tasks start")?;
    let mut first = None;
    let (status, out, err) = wait_child(child, t.timeout, "ctr tasks start", |_| {
        first.get_or_insert_with(|| start.elapsed());
    })?;
    let run_time = start.elapsed();
    let _ = t.ctr.run(&["tasks", "delete", id], Duration::from_secs(60));
    t.ctr
        .run(&["containers", "delete", id], Duration::from_secs(60))?;
    if !status.success() {
        bail!(
            "the container of {} exited with {status}: {}{}",
            t.reference,
            out.trim(),
            err.trim()
        );
    }
    Ok(Timing {
        pull,
        create,
        first_line: first.unwrap_or(run_time),
        run: run_time,
        last_line: out.lines().last().unwrap_or("").to_string(),
        lazy_layers: lazy,
    })
}

/// Bytes a registry sent for GET requests in the access-log text `log`.
pub fn bytes_served(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("\"GET "))
        .filter_map(|l| {
            let after = l.split('"').nth(2)?;
            let mut fields = after.split_whitespace();
            let _status = fields.next()?;
            fields.next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Partial-content (206) answers to GETs in the access-log text `log`: the range requests
/// a lazy pull made, whichever snapshotter made them.
pub fn range_responses(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("\"GET "))
        .filter(|l| {
            l.split('"')
                .nth(2)
                .and_then(|after| after.split_whitespace().next())
                == Some("206")
        })
        .count() as u64
}

/// Reads `path` from byte `offset` on (the registry's log since a run began).
pub fn log_since(path: &Path, offset: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let mut s = String::new();
    if f.seek(SeekFrom::Start(offset)).is_ok() {
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        s = String::from_utf8_lossy(&bytes).into_owned();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_layers_counts_rpull_outcomes() {
        let out = "sha256:aa        lazy  1.0 MiB\n\
                   sha256:bb  downloaded  2.0 MiB\n\
                   sha256:cc        lazy  3.0 MiB\n\
                   host/x:y: 3 layers into stargz in 1.00s\n";
        assert_eq!(lazy_layers(out), (2, 3));
    }

    #[test]
    fn bytes_served_sums_get_lines_of_any_status() {
        let log = "10.213.77.1 - - [x] \"GET /v2/a/blobs/sha256:1 HTTP/1.1\" 206 1000 \"\" \"ua\"\n\
                   10.213.77.1 - - [x] \"HEAD /v2/a/blobs/sha256:1 HTTP/1.1\" 200 0 \"\" \"ua\"\n\
                   time=\"x\" level=info msg=\"response completed\"\n\
                   10.213.77.1 - - [x] \"GET /v2/a/manifests/t HTTP/1.1\" 200 523 \"\" \"ua\"\n";
        assert_eq!(bytes_served(log), 1523);
        assert_eq!(range_responses(log), 1);
    }
}
