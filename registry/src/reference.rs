//! Image references as users write them, normalised the way docker and containerd do.

use std::fmt;
use std::str::FromStr;

use crate::Digest;

/// The registry name users write for Docker Hub.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's distribution API actually lives.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A repository on a registry: where blobs and manifests live.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Repository {
    /// Registry as normalised (`docker.io`, `ghcr.io`, `127.0.0.1:5000`); see [`Repository::api_host`].
    pub registry: String,
    /// Path inside the registry (`library/ubuntu`).
    pub name: String,
}

impl Repository {
    pub fn new(registry: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            registry: registry.into(),
            name: name.into(),
        }
    }

    /// The host to send requests to (Docker Hub's API host differs from its name).
    pub fn api_host(&self) -> &str {
        api_host(&self.registry)
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// Maps a registry name to the host its API is served from.
pub fn api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_API
    } else {
        registry
    }
}

/// A parsed image reference: `registry/repository[:tag][@digest]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    pub repository: Repository,
    /// The tag; `latest` when neither a tag nor a digest was written.
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    pub input: String,
    pub reason: String,
}

impl Reference {
    /// What to ask the registry for: the digest when there is one, else the tag.
    pub fn object(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        parse(input).map_err(|reason| ReferenceError {
            input: input.to_string(),
            reason,
        })
    }
}

fn parse(input: &str) -> Result<Reference, String> {
    if input.is_empty() {
        return Err("empty".into());
    }
    if input.len() > 4096 {
        return Err("too long".into());
    }
    let (rest, digest) = match input.split_once('@') {
        Some((rest, d)) => (rest, Some(d.parse::<Digest>().map_err(|e| e.to_string())?)),
        None => (input, None),
    };
    // The registry is the first component when it looks like a host (docker's rule:
    // contains '.' or ':' or is `localhost`); otherwise the reference is on Docker Hub.
    let (registry, remainder) = match rest.split_once('/') {
        Some((first, remainder))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            validate_registry(first)?;
            (first.to_string(), remainder)
        }
        _ => (DOCKER_HUB.to_string(), rest),
    };
    // A tag is a ':' in the last path component (a ':' earlier belongs to a port).
    let last_slash = remainder.rfind('/').map_or(0, |i| i + 1);
    let (path, tag) = match remainder[last_slash..].rfind(':') {
        Some(i) => {
            let i = last_slash + i;
            (&remainder[..i], Some(remainder[i + 1..].to_string()))
        }
        None => (remainder, None),
    };
    if let Some(tag) = &tag {
        validate_tag(tag)?;
    }
    validate_path(path)?;
    let registry = if registry == "index.docker.io" || registry == DOCKER_HUB_API {
        DOCKER_HUB.to_string()
    } else {
        registry
    };
    let name = if registry == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    let tag = match (tag, &digest) {
        (None, None) => Some("latest".to_string()),
        (tag, _) => tag,
    };
    Ok(Reference {
        repository: Repository { registry, name },
        tag,
        digest,
    })
}

fn validate_registry(host: &str) -> Result<(), String> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("registry {host:?}: unclosed '['"))?;
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("registry {host:?}: bad IPv6 address"));
        }
        match after {
            "" => (v6, None),
            _ => (
                v6,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| format!("registry {host:?}: junk after ']'"))?,
                ),
            ),
        }
    } else {
        match host.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    if !host.starts_with('[') {
        let ok = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !ok {
            return Err(format!("registry {host:?}: bad host name"));
        }
    }
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Err(format!("registry {host:?}: bad port"));
    }
    Ok(())
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("bad tag {tag:?}"))
    }
}

/// Path components: lowercase alphanumerics joined by `.`, `_`, `__` or runs of `-`.
fn validate_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("missing repository name".into());
    }
    if path.len() > 255 {
        return Err("repository name longer than 255 characters".into());
    }
    for component in path.split('/') {
        if !valid_component(component) {
            return Err(format!(
                "bad repository component {component:?} (lowercase letters, digits and separators)"
            ));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_short_forms() {
        let u = r("ubuntu");
        assert_eq!(u.repository.registry, "docker.io");
        assert_eq!(u.repository.name, "library/ubuntu");
        assert_eq!(u.tag.as_deref(), Some("latest"));
        assert_eq!(u.repository.api_host(), "registry-1.docker.io");
        assert_eq!(u.to_string(), "docker.io/library/ubuntu:latest");

        let u = r("library/ubuntu:22.04");
        assert_eq!(u.repository.name, "library/ubuntu");
        assert_eq!(u.tag.as_deref(), Some("22.04"));
        assert_eq!(u.object(), "22.04");

        let u = r("docker.io/ubuntu:22.04");
        assert_eq!(u.repository.name, "library/ubuntu");
        let u = r("index.docker.io/foo/bar");
        assert_eq!(u.repository.registry, "docker.io");
        assert_eq!(u.repository.name, "foo/bar");
        let u = r("someuser/app");
        assert_eq!(u.repository.registry, "docker.io");
        assert_eq!(u.repository.name, "someuser/app");
    }

    #[test]
    fn hosts_ports_and_digests() {
        let d = Digest::sha256_of(b"x");
        let u = r(&format!("127.0.0.1:5000/ns/repo:v1@{d}"));
        assert_eq!(u.repository.registry, "127.0.0.1:5000");
        assert_eq!(u.repository.api_host(), "127.0.0.1:5000");
        assert_eq!(u.repository.name, "ns/repo");
        assert_eq!(u.tag.as_deref(), Some("v1"));
        assert_eq!(u.digest.as_ref(), Some(&d));
        assert_eq!(u.object(), d.to_string());

        let u = r(&format!("localhost/repo@{d}"));
        assert_eq!(u.repository.registry, "localhost");
        assert_eq!(u.tag, None);
        let u = r("localhost:5000/a/b/c");
        assert_eq!(u.repository.name, "a/b/c");
        assert_eq!(u.tag.as_deref(), Some("latest"));
        let u = r("[::1]:5000/repo:tag");
        assert_eq!(u.repository.registry, "[::1]:5000");
        let u = r("ghcr.io/owner/image_name.x-y__z:1.0-rc_1");
        assert_eq!(u.repository.name, "owner/image_name.x-y__z");
        // A docker.io path with no host-like first part keeps the user's namespace.
        let u = r("registry-1.docker.io/library/alpine");
        assert_eq!(u.repository.registry, "docker.io");
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "Ubuntu",
            "ubuntu:",
            "ubuntu:-bad",
            "ubuntu@sha256:1234",
            "host:notaport/repo",
            "host/repo//x",
            "repo_",
            "a..b",
            "[::1/repo",
            "-host.com/repo",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad:?} parsed");
        }
    }
}
