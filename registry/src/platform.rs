//! Platforms, `os/arch[/variant]`: parsing, this host's, and which images run here.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An OS/architecture pair, with optional variant and OS version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        default,
        rename = "os.version",
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(
        default,
        rename = "os.features",
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
}

impl Platform {
    /// This machine's platform, in OCI's names.
    pub fn host() -> Self {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Self {
            architecture: arch.to_string(),
            os: std::env::consts::OS.to_string(),
            variant: variant.map(str::to_string),
            os_version: None,
            os_features: None,
        }
    }

    /// `os/arch[/variant]`, e.g. `linux/amd64`, `linux/arm64/v8`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &&str| !p.is_empty();
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
                os_version: None,
                os_features: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
                os_version: None,
                os_features: None,
            }),
            _ => Err(format!("platform {s:?} is not os/arch[/variant]")),
        }
    }

    /// Whether an image for `candidate` runs here. A missing variant matches the
    /// architecture's default (arm64 → v8, arm → v7), as containerd's matcher does.
    pub fn matches(&self, candidate: &Platform) -> bool {
        if self.os != candidate.os || self.architecture != candidate.architecture {
            return false;
        }
        let default = match self.architecture.as_str() {
            "arm64" => Some("v8"),
            "arm" => Some("v7"),
            _ => None,
        };
        let want = self.variant.as_deref().or(default);
        let have = candidate.variant.as_deref().or(default);
        want == have || (want.is_none() || have.is_none())
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}
