//! stargz-snapshotter's `ctr-remote` (Debian package `stargz-snapshotter`) and raw
//! content-store access against a test's containerd: the peer converter that interop
//! tests compare with.

use std::ffi::OsStr;
use std::process::Command;
use std::time::Duration;

use crate::containerd::Containerd;
use crate::process::run_with_timeout;

/// Conversions of small test images finish in seconds; this only bounds a hang.
const TIMEOUT: Duration = Duration::from_secs(300);

fn run(mut cmd: Command) -> anyhow::Result<Vec<u8>> {
    let what = format!("{cmd:?}");
    let output = run_with_timeout(
        {
            cmd.env("PATH", std::env::var_os("PATH").unwrap_or_default());
            cmd
        },
        TIMEOUT,
    )?;
    if !output.status.success() {
        anyhow::bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

/// Runs `ctr-remote --address SOCK --namespace NS ARGS...`; returns stdout.
pub fn ctr_remote<I, S>(containerd: &Containerd, args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let binary = crate::require_program("ctr-remote", "stargz-snapshotter")?;
    let mut cmd = Command::new(binary);
    cmd.arg("--address")
        .arg(containerd.address())
        .arg("--namespace")
        .arg(containerd.namespace())
        .args(args);
    Ok(String::from_utf8_lossy(&run(cmd)?).into_owned())
}

/// The bytes of a blob in containerd's content store (`ctr content get DIGEST`),
/// unaltered (binary layers included).
pub fn content_get(containerd: &Containerd, digest: &str) -> anyhow::Result<Vec<u8>> {
    let binary = crate::require_program("ctr", "containerd")?;
    let mut cmd = Command::new(binary);
    cmd.arg("--address")
        .arg(containerd.address())
        .arg("--namespace")
        .arg(containerd.namespace())
        .args(["content", "get", digest]);
    run(cmd)
}

/// The digest of the manifest or index that image `reference` names in containerd
/// (from `ctr image ls`).
pub fn image_digest(containerd: &Containerd, reference: &str) -> anyhow::Result<String> {
    let list = containerd.ctr(["image", "ls"])?;
    for line in list.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.first() == Some(&reference)
            && let Some(d) = cols.iter().find(|c| c.starts_with("sha256:"))
        {
            return Ok(d.to_string());
        }
    }
    anyhow::bail!("image {reference} not in `ctr image ls`:\n{list}")
}
