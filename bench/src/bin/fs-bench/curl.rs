//! curl against the local registry: streaming uploads and the download baseline.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail, ensure};
use sha2::{Digest as _, Sha256};

/// Uploads a blob from a file with a streaming `curl --upload-file` (testkit's
/// `push_blob` passes the body with `--data-binary`, which curl holds in memory and
/// refuses at 1 GiB). Returns its digest and size.
pub(crate) fn push_file(host: &str, repo: &str, path: &Path) -> anyhow::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut f = std::fs::File::open(path)?;
    let size = std::io::copy(&mut f, &mut hasher)?;
    let digest = format!("sha256:{:x}", hasher.finalize());
    let out = Command::new("curl")
        .args(["-sS", "-f", "-X", "POST", "-D", "-", "-o", "/dev/null"])
        .arg(format!("http://{host}/v2/{repo}/blobs/uploads/"))
        .output()
        .context("running curl")?;
    ensure!(
        out.status.success(),
        "starting an upload to {host}/{repo}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let headers = String::from_utf8_lossy(&out.stdout);
    let location = headers
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location")
                .then(|| v.trim().to_string())
        })
        .context("the registry answered the upload POST without a Location")?;
    let mut url = if location.starts_with('/') {
        format!("http://{host}{location}")
    } else {
        location
    };
    url.push(if url.contains('?') { '&' } else { '?' });
    url.push_str(&format!("digest={}", digest.replace(':', "%3A")));
    let out = Command::new("curl")
        .args([
            "-sS",
            "-f",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
        ])
        .arg("--upload-file")
        .arg(path)
        .arg(&url)
        .output()
        .context("running curl")?;
    ensure!(
        out.status.success(),
        "uploading {} to {host}/{repo}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok((digest, size))
}

/// `curl -o /dev/null URL`: (bytes, seconds) as curl reports them.
pub(crate) fn curl_download(url: &str) -> anyhow::Result<(u64, f64)> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-f",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total}",
        ])
        .arg(url)
        .output()
        .context("running curl")?;
    ensure!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8(out.stdout)?;
    let mut it = text.split_whitespace();
    let bytes = it.next().and_then(|b| b.parse().ok());
    let secs = it.next().and_then(|s| s.parse().ok());
    match (bytes, secs) {
        (Some(b), Some(s)) => Ok((b, s)),
        _ => bail!("unexpected curl -w output {text:?}"),
    }
}
