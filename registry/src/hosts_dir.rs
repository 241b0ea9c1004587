//! containerd's registry host directories (`config_path`, e.g. `/etc/containerd/certs.d`):
//! `DIR/<host>/hosts.toml` read the way containerd reads it, so that a node configures
//! mirrors, CAs and client certificates once for containerd and lazysnapd alike.
//!
//! The directory of a registry is `DIR/<host>_<port>_` (for `host:port`), else
//! `DIR/<host:port>`, else `DIR/_default`. In `hosts.toml`, the `[host."URL"]` tables are
//! tried in the order they appear, then `server` (the registry itself). A directory
//! without `hosts.toml` is docker's `certs.d` form: `*.crt` are CAs, `*.cert` with their
//! `*.key` client certificates, both for the registry itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::go_duration::parse_timeout;

/// What a host may be asked, as containerd's `capabilities` say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub pull: bool,
    pub resolve: bool,
    pub push: bool,
    pub referrers: bool,
}

impl Capabilities {
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
        referrers: true,
    };

    fn parse(names: &[String]) -> Result<Self, String> {
        if names.is_empty() {
            return Ok(Self::ALL);
        }
        let mut c = Capabilities {
            pull: false,
            resolve: false,
            push: false,
            referrers: false,
        };
        for name in names {
            match name.to_ascii_lowercase().as_str() {
                "pull" => c.pull = true,
                "resolve" => c.resolve = true,
                "push" => c.push = true,
                "referrers" => c.referrers = true,
                other => return Err(format!("unknown capability {other:?}")),
            }
        }
        Ok(c)
    }
}

/// One host of a registry's directory: a mirror (`[host."URL"]`) or the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    /// `None` for a server the file does not name: the registry itself, on its defaults.
    pub url: Option<HostUrl>,
    pub capabilities: Capabilities,
    /// CA files trusted besides the system's.
    pub ca: Vec<PathBuf>,
    /// Client certificates: the certificate file and its key file (`None`: the key is in
    /// the certificate file).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    pub skip_verify: Option<bool>,
    /// Headers sent to this host (sorted by name), each with its values in order.
    pub header: Vec<(String, Vec<String>)>,
    pub dial_timeout: Option<Duration>,
}

/// Where a host is: scheme, `host[:port]` and the API path (`/v2`, or the configured path
/// itself with `override_path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostUrl {
    pub plain_http: bool,
    pub authority: String,
    pub path: String,
}

/// The first of `roots`' directories that exists for `registry`, as containerd looks.
pub fn find_dir(roots: &[PathBuf], registry: &str) -> Option<PathBuf> {
    let mut names = Vec::new();
    if let Some((host, port)) = registry.rsplit_once(':')
        && !host.is_empty()
    {
        names.push(format!("{host}_{port}_"));
    }
    names.push(registry.to_string());
    names.push("_default".to_string());
    names.iter().find_map(|name| {
        roots
            .iter()
            .map(|root| root.join(name))
            .find(|dir| dir.is_dir())
    })
}

/// The hosts of one directory, mirrors first, the server last.
pub fn load_dir(dir: &Path) -> Result<Vec<HostEntry>, String> {
    let file = dir.join("hosts.toml");
    match std::fs::read_to_string(&file) {
        Ok(text) if !text.trim().is_empty() => {
            parse_hosts_file(dir, &text).map_err(|e| format!("{}: {e}", file.display()))
        }
        Ok(_) => load_cert_files(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => load_cert_files(dir),
        Err(e) => Err(format!("reading {}: {e}", file.display())),
    }
}

/// One table of hosts.toml: the top level (the server's, flattened beside `server` and
/// `host`) or a `[host."URL"]`.
#[derive(Debug, Default, Deserialize)]
struct HostFileConfig {
    #[serde(default)]
    capabilities: Vec<String>,
    ca: Option<OneOrMany>,
    client: Option<ClientCerts>,
    skip_verify: Option<bool>,
    #[serde(default)]
    header: std::collections::BTreeMap<String, OneOrMany>,
    #[serde(default)]
    override_path: bool,
    dial_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `client = "both.pem"`, `client = ["a.pem", ["cert.pem", "key.pem"]]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ClientCerts {
    One(String),
    Many(Vec<OneOrMany>),
}

#[derive(Debug, Deserialize)]
struct HostsFile {
    #[serde(default)]
    server: String,
    #[serde(default)]
    host: InOrder<toml::Spanned<HostFileConfig>>,
    #[serde(flatten)]
    top: HostFileConfig,
}

/// A TOML table's entries as a list (the `host` tables, put back in file order by their
/// spans: mirrors are tried in that order).
#[derive(Debug)]
struct InOrder<T>(Vec<(String, T)>);

impl<T> Default for InOrder<T> {
    fn default() -> Self {
        InOrder(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for InOrder<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = InOrder<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, T>()? {
                    out.push((k, v));
                }
                Ok(InOrder(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

fn parse_hosts_file(dir: &Path, text: &str) -> Result<Vec<HostEntry>, String> {
    let file: HostsFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
    let mut out = Vec::new();
    // The TOML reader hands tables over sorted; their place in the file says the order.
    let mut hosts = file.host.0;
    hosts.sort_by_key(|(_, config)| config.span().start);
    for (url, config) in hosts {
        out.push(host_entry(dir, Some(&url), config.into_inner())?);
    }
    let server = (!file.server.is_empty()).then_some(file.server.as_str());
    out.push(host_entry(dir, server, file.top)?);
    Ok(out)
}

fn host_entry(dir: &Path, url: Option<&str>, c: HostFileConfig) -> Result<HostEntry, String> {
    let url = url
        .map(|u| parse_url(u, c.override_path))
        .transpose()
        .map_err(|e| format!("host {}: {e}", url.unwrap_or("server")))?;
    let abs = |p: String| {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { dir.join(p) }
    };
    let client = match c.client {
        None => Vec::new(),
        Some(ClientCerts::One(both)) => vec![(abs(both), None)],
        Some(ClientCerts::Many(list)) => list
            .into_iter()
            .map(|item| match item {
                OneOrMany::One(both) => Ok((abs(both), None)),
                OneOrMany::Many(pair) => match <[String; 2]>::try_from(pair) {
                    Ok([cert, key]) => Ok((abs(cert), Some(abs(key)))),
                    Err(p) => Err(format!("client pair {p:?} is not [cert, key]")),
                },
            })
            .collect::<Result<_, _>>()?,
    };
    let dial_timeout = c
        .dial_timeout
        .map(|t| parse_timeout(&t).ok_or(format!("dial_timeout {t:?} is not a duration")))
        .transpose()?;
    Ok(HostEntry {
        url,
        capabilities: Capabilities::parse(&c.capabilities)?,
        ca: c
            .ca
            .map(|v| v.into_vec().into_iter().map(abs).collect())
            .unwrap_or_default(),
        client,
        skip_verify: c.skip_verify,
        header: c
            .header
            .into_iter()
            .map(|(k, v)| (k, v.into_vec()))
            .collect(),
        dial_timeout,
    })
}

/// `https://host[:port][/path]`; no scheme means HTTPS; the path gets `/v2` unless it
/// ends so or `override_path` says to use it as it is.
fn parse_url(spec: &str, override_path: bool) -> Result<HostUrl, String> {
    let (plain_http, rest) = if let Some(r) = spec.strip_prefix("http://") {
        (true, r)
    } else if let Some(r) = spec.strip_prefix("https://") {
        (false, r)
    } else if spec.contains("://") {
        return Err("only http and https URLs".into());
    } else {
        (false, spec)
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains(['?', '#', '@', ' ']) {
        return Err(format!("{spec:?} has no usable host"));
    }
    let path = clean_path(path);
    let path = if override_path || path.ends_with("/v2") {
        path
    } else {
        format!("{path}/v2")
    };
    Ok(HostUrl {
        plain_http,
        authority: authority.to_string(),
        path,
    })
}

/// Go's `path.Clean` for what URLs hold: no empty, `.` or trailing segments; `..` pops.
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("/{}", parts.join("/"))
    }
}

/// docker's `certs.d` form, for the registry itself.
pub fn load_cert_files(dir: &Path) -> Result<Vec<HostEntry>, String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut entry = HostEntry {
        url: None,
        capabilities: Capabilities::ALL,
        ca: Vec::new(),
        client: Vec::new(),
        skip_verify: None,
        header: Vec::new(),
        dial_timeout: None,
    };
    for name in &names {
        if name.ends_with(".crt") {
            entry.ca.push(dir.join(name));
        }
        if let Some(stem) = name.strip_suffix(".cert") {
            let key = dir.join(format!("{stem}.key"));
            let key = key.exists().then_some(key);
            entry.client.push((dir.join(name), key));
        }
    }
    Ok(vec![entry])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_in_file_order_then_the_server() {
        let dir = Path::new("/etc/containerd/certs.d/docker.io");
        let text = r#"
server = "https://registry-1.docker.io"
ca = "server-ca.pem"

[host."https://zz-mirror.example.com"]
  capabilities = ["pull", "resolve"]
  ca = ["/abs/ca.pem", "rel/ca2.pem"]
  client = [["/c/cert.pem", "key.pem"], "/c/both.pem"]
  skip_verify = true
  dial_timeout = "1.5s"
  [host."https://zz-mirror.example.com".header]
    x-b = "2"
    x-a = ["1", "one"]

[host."http://aa-spegel.local:5000"]
  capabilities = ["pull"]

[host."https://proxy.example.com/v2/hub"]
  override_path = true
"#;
        let hosts = parse_hosts_file(dir, text).unwrap();
        let urls: Vec<_> = hosts.iter().map(|h| h.url.clone().unwrap()).collect();
        assert_eq!(
            urls.iter()
                .map(|u| u.authority.as_str())
                .collect::<Vec<_>>(),
            [
                "zz-mirror.example.com",
                "aa-spegel.local:5000",
                "proxy.example.com",
                "registry-1.docker.io"
            ]
        );
        assert_eq!(
            urls.iter().map(|u| u.path.as_str()).collect::<Vec<_>>(),
            ["/v2", "/v2", "/v2/hub", "/v2"]
        );
        assert_eq!(
            urls.iter().map(|u| u.plain_http).collect::<Vec<_>>(),
            [false, true, false, false]
        );
        let m = &hosts[0];
        assert_eq!(
            m.capabilities,
            Capabilities {
                pull: true,
                resolve: true,
                push: false,
                referrers: false
            }
        );
        assert_eq!(
            m.ca,
            [PathBuf::from("/abs/ca.pem"), dir.join("rel/ca2.pem")]
        );
        assert_eq!(
            m.client,
            [
                (PathBuf::from("/c/cert.pem"), Some(dir.join("key.pem"))),
                (PathBuf::from("/c/both.pem"), None)
            ]
        );
        assert_eq!(m.skip_verify, Some(true));
        assert_eq!(m.dial_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(
            m.header,
            [
                ("x-a".to_string(), vec!["1".to_string(), "one".to_string()]),
                ("x-b".to_string(), vec!["2".to_string()])
            ]
        );
        assert!(!hosts[1].capabilities.resolve && hosts[1].capabilities.pull);
        assert_eq!(hosts[2].capabilities, Capabilities::ALL);
        let server = &hosts[3];
        assert_eq!(server.capabilities, Capabilities::ALL);
        assert_eq!(server.ca, [dir.join("server-ca.pem")]);
    }

    #[test]
    fn a_file_without_server_leaves_the_registry_on_its_defaults() {
        let hosts =
            parse_hosts_file(Path::new("/d"), "[host.\"mirror.example.com:8443/pfx/\"]\n").unwrap();
        assert_eq!(hosts.len(), 2);
        let u = hosts[0].url.as_ref().unwrap();
        assert_eq!(
            (u.plain_http, u.authority.as_str(), u.path.as_str()),
            (false, "mirror.example.com:8443", "/pfx/v2")
        );
        assert_eq!(hosts[1].url, None);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, want) in [
            (
                "[host.\"m\"]\ncapabilities = [\"fly\"]\n",
                "unknown capability",
            ),
            (
                "[host.\"m\"]\nclient = [[\"a\", \"b\", \"c\"]]\n",
                "client pair",
            ),
            ("[host.\"m\"]\ndial_timeout = \"soon\"\n", "dial_timeout"),
            ("[host.\"ftp://m\"]\n", "only http and https"),
            ("server = \"https://\"\n", "no usable host"),
            ("server = 5\n", ""),
        ] {
            let err = parse_hosts_file(Path::new("/d"), text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn directories_are_found_as_containerd_finds_them() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        assert_eq!(find_dir(&[r.to_path_buf()], "ghcr.io"), None);
        std::fs::create_dir(r.join("_default")).unwrap();
        assert_eq!(
            find_dir(&[r.to_path_buf()], "ghcr.io"),
            Some(r.join("_default"))
        );
        std::fs::create_dir(r.join("ghcr.io")).unwrap();
        assert_eq!(
            find_dir(&[r.to_path_buf()], "ghcr.io"),
            Some(r.join("ghcr.io"))
        );
        std::fs::create_dir(r.join("lan:5000")).unwrap();
        assert_eq!(
            find_dir(&[r.to_path_buf()], "lan:5000"),
            Some(r.join("lan:5000"))
        );
        std::fs::create_dir(r.join("lan_5000_")).unwrap();
        assert_eq!(
            find_dir(&[r.to_path_buf()], "lan:5000"),
            Some(r.join("lan_5000_"))
        );
    }

    #[test]
    fn a_certs_dir_without_hosts_toml_is_dockers_form() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "ca.crt",
            "client.cert",
            "client.key",
            "lonely.cert",
            "README",
        ] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let hosts = load_dir(d.path()).unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].url, None);
        assert_eq!(hosts[0].ca, [d.path().join("ca.crt")]);
        assert_eq!(
            hosts[0].client,
            [
                (
                    d.path().join("client.cert"),
                    Some(d.path().join("client.key"))
                ),
                (d.path().join("lonely.cert"), None)
            ]
        );
        std::fs::write(
            d.path().join("hosts.toml"),
            "server = \"https://r.example\"\n",
        )
        .unwrap();
        let hosts = load_dir(d.path()).unwrap();
        assert_eq!(hosts[0].url.as_ref().unwrap().authority, "r.example");
        assert!(hosts[0].ca.is_empty());
    }
}
