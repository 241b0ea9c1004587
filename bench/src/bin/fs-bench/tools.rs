//! The tools the measurements use: commands run to success, caches dropped, timed
//! reads, walks and listings, and this process's CPU time and memory.

use std::io::{BufRead, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use sha2::{Digest as _, Sha256};

pub(crate) fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub(crate) fn drop_caches() -> anyhow::Result<()> {
    // Dirty pages cannot be dropped: write them out first.
    run_ok(&mut Command::new("sync"))?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

/// Reads `path` front to back with 1 MiB reads; returns (bytes, seconds, sha256 when
/// asked).
pub(crate) fn read_file(path: &Path, hash: bool) -> anyhow::Result<(u64, f64, Option<String>)> {
    let t = Instant::now();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut hasher = hash.then(Sha256::new);
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {} at {total}", path.display()))?;
        if n == 0 {
            break;
        }
        if let Some(h) = hasher.as_mut() {
            h.update(&buf[..n]);
        }
        total += n as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok((total, secs, hasher.map(|h| format!("{:x}", h.finalize()))))
}

/// `find ROOT -printf` with fields that need an lstat of every entry; returns (entries,
/// seconds).
pub(crate) fn find_walk(root: &Path) -> anyhow::Result<(usize, f64)> {
    let t = Instant::now();
    let mut child = Command::new("find")
        .arg(root)
        .args(["-printf", "%i %s %m %U %T@\\n"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running find")?;
    let stdout = child.stdout.take().context("find's stdout")?;
    let mut lines = 0;
    for line in std::io::BufReader::new(stdout).split(b'\n') {
        line?;
        lines += 1;
    }
    let out = child.wait_with_output()?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "find {} failed: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((lines, secs))
}

/// `ls FLAG DIR` in the C locale, output counted and dropped; returns (lines, seconds).
pub(crate) fn ls(dir: &Path, flag: &str) -> anyhow::Result<(usize, f64)> {
    let t = Instant::now();
    let out = Command::new("ls")
        .arg(flag)
        .arg(dir)
        .env("LC_ALL", "C")
        .stderr(Stdio::piped())
        .output()
        .context("running ls")?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "ls {flag} {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((out.stdout.split(|&b| b == b'\n').count() - 1, secs))
}

/// User plus system CPU time of this process so far, all threads.
pub(crate) fn process_cpu_secs() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').context("odd /proc/self/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on every Linux architecture we run on.
    Ok(ticks / 100.0)
}

pub(crate) fn vm_rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")
}
