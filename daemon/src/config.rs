//! lazysnapd's configuration: a TOML file turned into a validated struct, every field
//! with a documented default, so the daemon runs with no file at all.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_ROOT: &str = "/var/lib/lazysnap";
pub const DEFAULT_ADDRESS: &str = "/run/lazysnap/lazysnap.sock";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where snapshots, metadata and the chunk cache live.
    pub root: PathBuf,
    /// The unix socket containerd's proxy plugin connects to.
    pub address: PathBuf,
    /// Log filter (tracing's env-filter syntax, e.g. `info` or `snapshotter=debug`);
    /// `RUST_LOG` wins when set.
    pub log_level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            address: PathBuf::from(DEFAULT_ADDRESS),
            log_level: "info".to_string(),
        }
    }
}

impl Config {
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.root.is_absolute() {
            anyhow::bail!("root must be an absolute path, not {}", self.root.display());
        }
        if self.address.as_os_str().len() >= 108 {
            anyhow::bail!(
                "socket path {} is too long for a unix socket (limit 107 bytes)",
                self.address.display()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn fields_override_defaults() {
        let c =
            Config::parse("root = \"/srv/ls\"\naddress = \"/tmp/x.sock\"\nlog_level = \"debug\"\n")
                .unwrap();
        assert_eq!(c.root, PathBuf::from("/srv/ls"));
        assert_eq!(c.address, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.log_level, "debug");
    }

    #[test]
    fn mistakes_are_reported() {
        let err = Config::parse("roots = \"/x\"").unwrap_err().to_string();
        assert!(err.contains("roots"), "{err}");
        assert!(Config::parse("root = \"relative\"").is_err());
        assert!(Config::parse("root = 5").is_err());
    }
}
