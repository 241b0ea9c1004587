//! Platforms, `os/arch[/variant]`: parsing, this host's, and which images run here.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// An OS/architecture pair, with optional variant and OS version. Fields this type does
/// not name are kept in `other`, so a converted index says what its source said.
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
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
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
        Self::new(std::env::consts::OS, arch, variant)
    }

    fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Self {
            architecture: architecture.to_string(),
            os: os.to_string(),
            variant: variant.map(str::to_string),
            os_version: None,
            os_features: None,
            other: BTreeMap::new(),
        }
    }

    /// `os/arch[/variant]`, e.g. `linux/amd64`, `linux/arm64/v8`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &&str| !p.is_empty();
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Self::new(os, arch, None)),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => {
                Ok(Self::new(os, arch, Some(variant)))
            }
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

/// Of the `candidates` (an item and the platform it is for), the one to run on `wanted`:
/// the first with exactly the wanted variant, else the first that runs there at all. The
/// one chooser behind every index lookup (pulls, rpull, the converter).
pub fn choose<'a, T>(
    wanted: &Platform,
    candidates: impl IntoIterator<Item = (T, Option<&'a Platform>)>,
) -> Option<T> {
    let mut compatible = None;
    for (item, platform) in candidates {
        let Some(platform) = platform.filter(|p| wanted.matches(p)) else {
            continue;
        };
        if platform.variant == wanted.variant {
            return Some(item);
        }
        compatible.get_or_insert(item);
    }
    compatible
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

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[test]
    fn parses_os_arch_and_variant() {
        assert_eq!(platform("linux/arm64/v8").to_string(), "linux/arm64/v8");
        assert_eq!(platform("linux/amd64").variant, None);
        for bad in ["linux", "linux//v7", "/amd64", "a/b/c/d"] {
            assert!(Platform::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn a_missing_variant_is_the_architecture_default() {
        let arm64 = platform("linux/arm64");
        let v8 = platform("linux/arm64/v8");
        assert!(arm64.matches(&v8) && v8.matches(&arm64));
        assert!(!v8.matches(&platform("linux/arm64/v9")));
        assert!(!platform("linux/amd64").matches(&v8));
        assert!(!platform("windows/amd64").matches(&platform("linux/amd64")));
    }

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let json = r#"{"architecture":"amd64","os":"linux","os.version":"1","features":["x"]}"#;
        let p: Platform = serde_json::from_str(json).unwrap();
        assert_eq!(p.os_version.as_deref(), Some("1"));
        let back: serde_json::Value = serde_json::to_value(&p).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(json).unwrap()
        );
    }

    #[test]
    fn the_exact_variant_wins_over_an_earlier_compatible_one() {
        let v7 = platform("linux/arm/v7");
        let bare = platform("linux/arm");
        let v6 = platform("linux/arm/v6");
        let amd = platform("linux/amd64");
        let items = [
            ("amd", Some(&amd)),
            ("none", None),
            ("bare", Some(&bare)),
            ("v6", Some(&v6)),
            ("v7", Some(&v7)),
        ];
        assert_eq!(choose(&v7, items), Some("v7"));
        assert_eq!(choose(&v6, items), Some("v6"));
        assert_eq!(choose(&platform("linux/arm/v5"), items), None);
        assert_eq!(choose(&platform("linux/arm64"), items), None);
        assert_eq!(choose(&amd, items), Some("amd"));
    }
}
