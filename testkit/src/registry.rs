//! A real registry (Debian's `docker-registry`, distribution v2) on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::image::{Blob, Image};
use crate::process::ChildGuard;

pub struct Registry {
    /// `127.0.0.1:PORT`, the host part of references to this registry.
    pub host: String,
    pub dir: PathBuf,
    process: ChildGuard,
}

/// Extra configuration for a registry started by a test.
#[derive(Default, Clone)]
pub struct RegistryOptions {
    /// htpasswd file for basic auth (bcrypt entries, as `htpasswd -B` writes).
    pub htpasswd: Option<PathBuf>,
    /// TLS certificate and key (PEM).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// With `tls`: require a client certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
    /// Run inside this network namespace (`ip netns exec`), listening on `listen`.
    pub netns: Option<String>,
    /// `IP:PORT` to listen on instead of a free loopback port.
    pub listen: Option<String>,
}

impl Registry {
    /// Starts a plain-HTTP registry storing its data under `dir`.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, &RegistryOptions::default())
    }

    pub fn start_with(dir: &Path, options: &RegistryOptions) -> anyhow::Result<Self> {
        let binary = crate::require_program("docker-registry", "docker-registry")?;
        std::fs::create_dir_all(dir.join("data"))?;
        let host = match &options.listen {
            Some(listen) => listen.clone(),
            None => format!("127.0.0.1:{}", crate::free_port()),
        };
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
             http:\n  addr: {host}\n",
            data = dir.join("data").display()
        );
        if let Some((cert, key)) = &options.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
            if let Some(ca) = &options.client_ca {
                config.push_str(&format!("    clientcas:\n      - {}\n", ca.display()));
            }
        }
        if let Some(htpasswd) = &options.htpasswd {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: lazysnap-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config)?;
        let mut cmd = match &options.netns {
            Some(netns) => {
                // `ip netns exec` execs the registry, so the PID stays the registry's.
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns]).arg(binary);
                cmd
            }
            None => Command::new(binary),
        };
        cmd.arg("serve").arg(&config_path);
        let mut process = ChildGuard::spawn("docker-registry", cmd, &dir.join("registry.log"))?;
        let up = crate::wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(&host).is_ok()
        });
        process.check_running()?;
        if !up {
            anyhow::bail!(
                "docker-registry did not listen on {host}; log:\n{}",
                process.log_tail()
            );
        }
        Ok(Self {
            host,
            dir: dir.to_path_buf(),
            process,
        })
    }

    /// A second registry serving this one's storage behind basic auth for `user` (and
    /// TLS with `tls`'s certificate and key, if given): what is pushed to this one, a
    /// client needs the password to pull there. Its state goes under `dir`.
    pub fn private_twin(
        &self,
        dir: &Path,
        user: &str,
        password: &str,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> anyhow::Result<Registry> {
        let htpasswd = crate::require_program("htpasswd", "apache2-utils")?;
        let out = Command::new(htpasswd)
            .args(["-Bbn", user, password])
            .output()?;
        if !out.status.success() {
            anyhow::bail!("htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("htpasswd"), &out.stdout)?;
        std::os::unix::fs::symlink(self.dir.join("data"), dir.join("data"))?;
        Registry::start_with(
            dir,
            &RegistryOptions {
                htpasswd: Some(dir.join("htpasswd")),
                tls,
                ..RegistryOptions::default()
            },
        )
    }

    /// A mirror of this registry (the same storage) over TLS with `pki`'s server
    /// certificate, that answers only clients presenting a certificate `pki`'s CA signed.
    /// Its state goes under `dir`.
    pub fn tls_mirror(&self, dir: &Path, pki: &crate::tls::TestPki) -> anyhow::Result<Registry> {
        std::fs::create_dir_all(dir)?;
        std::os::unix::fs::symlink(self.dir.join("data"), dir.join("data"))?;
        Registry::start_with(
            dir,
            &RegistryOptions {
                tls: Some(pki.server()),
                client_ca: Some(pki.ca()),
                ..RegistryOptions::default()
            },
        )
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The registry's log: access lines with status and bytes sent, one per request.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.process.log_path()).unwrap_or_default()
    }
}

impl Registry {
    /// Pushes `image` to this registry as `repo:tag`; returns `HOST/repo:tag`.
    pub fn push(&self, repo: &str, tag: &str, image: &Image) -> anyhow::Result<String> {
        push(&self.host, repo, tag, image)
    }
}

/// Pushes `image` (blobs, then the manifest) over plain HTTP to `registry_host`
/// (`127.0.0.1:PORT`) as `repo:tag`, with `curl`. Returns the reference `HOST/repo:tag`.
pub fn push(registry_host: &str, repo: &str, tag: &str, image: &Image) -> anyhow::Result<String> {
    for blob in image.blobs() {
        push_blob(registry_host, repo, blob)?;
    }
    push_manifest(registry_host, repo, tag, &image.manifest)?;
    Ok(format!("{registry_host}/{repo}:{tag}"))
}

/// Uploads one blob (monolithic upload: POST for a session, then PUT with the digest).
/// A blob the registry already has is not sent again.
pub fn push_blob(registry_host: &str, repo: &str, blob: &Blob) -> anyhow::Result<()> {
    let base = format!("http://{registry_host}");
    let head = curl(
        &["--head", &format!("{base}/v2/{repo}/blobs/{}", blob.digest)],
        None,
    )?;
    if head.status == 200 {
        return Ok(());
    }
    let start = curl(
        &["-X", "POST", &format!("{base}/v2/{repo}/blobs/uploads/")],
        None,
    )?;
    start.expect(
        202,
        &format!("starting the upload of {} to {repo}", blob.digest),
    )?;
    let location = start.header("location").ok_or_else(|| {
        anyhow::anyhow!("registry {registry_host} answered the upload POST without a Location")
    })?;
    // distribution answers with an absolute URL, but the spec also allows a path.
    let mut url = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location.to_string()
    };
    url.push(if url.contains('?') { '&' } else { '?' });
    url.push_str(&format!("digest={}", blob.digest.replace(':', "%3A")));
    let put = curl(
        &[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            &url,
        ],
        Some(&blob.data),
    )?;
    put.expect(
        201,
        &format!("uploading {} ({} bytes) to {repo}", blob.digest, blob.size),
    )
}

/// PUTs a manifest (or index) under `reference` (a tag or a digest) with its media type.
pub fn push_manifest(
    registry_host: &str,
    repo: &str,
    reference: &str,
    manifest: &Blob,
) -> anyhow::Result<()> {
    let url = format!("http://{registry_host}/v2/{repo}/manifests/{reference}");
    let content_type = format!("Content-Type: {}", manifest.media_type);
    let put = curl(
        &["-X", "PUT", "-H", &content_type, &url],
        Some(&manifest.data),
    )?;
    put.expect(201, &format!("putting the manifest {repo}:{reference}"))
}

struct CurlResponse {
    status: u16,
    /// Lower-cased names with their values, of the last response (after any 100 Continue).
    headers: Vec<(String, String)>,
    body: String,
    what: String,
}

impl CurlResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn expect(&self, status: u16, doing: &str) -> anyhow::Result<()> {
        if self.status != status {
            anyhow::bail!(
                "{doing}: {} answered HTTP {} (expected {status}): {}",
                self.what,
                self.status,
                self.body.trim()
            );
        }
        Ok(())
    }
}

/// Runs curl with `args` (the URL last), sending `body` from a temp file when given.
fn curl(args: &[&str], body: Option<&[u8]>) -> anyhow::Result<CurlResponse> {
    let binary = crate::require_program("curl", "curl")?;
    let scratch = tempfile::tempdir()?;
    let headers_path = scratch.path().join("headers");
    let body_path = scratch.path().join("body");
    let mut cmd = Command::new(binary);
    cmd.args(["--silent", "--show-error", "--max-time", "120"])
        .args(["--write-out", "%{http_code}"])
        .arg("--dump-header")
        .arg(&headers_path)
        .arg("--output")
        .arg(&body_path);
    if let Some(data) = body {
        let upload = scratch.path().join("upload");
        std::fs::write(&upload, data)?;
        // --data-binary sends the bytes untouched (no newline stripping, unlike --data).
        cmd.arg("--data-binary")
            .arg(format!("@{}", upload.display()));
    }
    cmd.args(args);
    let what = format!("curl {}", args.join(" "));
    let output = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("running {what}: {e}"))?;
    if !output.status.success() {
        anyhow::bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let code = String::from_utf8_lossy(&output.stdout);
    let status = code
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("{what}: unexpected --write-out output {code:?}"))?;
    let raw_headers = std::fs::read_to_string(&headers_path).unwrap_or_default();
    // With `Expect: 100-continue` the dump holds several responses; keep the last block.
    let last_block = raw_headers
        .split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .last()
        .unwrap_or("");
    let headers = last_block
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(CurlResponse {
        status,
        headers,
        body: std::fs::read_to_string(&body_path).unwrap_or_default(),
        what,
    })
}

/// Bytes a registry sent for GETs of `digest`, summed from its access log
/// (`"GET …" STATUS BYTES`): what a lazy pull really fetched.
pub fn bytes_served(registry_log: &str, digest: &str) -> u64 {
    registry_log
        .lines()
        .filter(|l| l.contains("\"GET ") && l.contains(digest))
        .filter_map(|l| {
            // After the quoted request line, whatever its HTTP version (TLS gives HTTP/2).
            let after = l.split('"').nth(2)?;
            let mut fields = after.split_whitespace();
            let _status = fields.next()?;
            fields.next()?.parse::<u64>().ok()
        })
        .sum()
}
