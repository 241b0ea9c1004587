//! A real registry (Debian's `docker-registry`, distribution v2) on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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
}

impl Registry {
    /// Starts a plain-HTTP registry storing its data under `dir`.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, &RegistryOptions::default())
    }

    pub fn start_with(dir: &Path, options: &RegistryOptions) -> anyhow::Result<Self> {
        let binary = crate::require_program("docker-registry", "docker-registry")?;
        std::fs::create_dir_all(dir.join("data"))?;
        let port = crate::free_port();
        let host = format!("127.0.0.1:{port}");
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
        }
        if let Some(htpasswd) = &options.htpasswd {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: lazysnap-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new(binary);
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

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The registry's log: access lines with status and bytes sent, one per request.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.process.log_path()).unwrap_or_default()
    }
}
