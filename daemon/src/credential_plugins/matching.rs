//! Which images a plugin serves and which of its answer's entries applies: kubelet's
//! `matchImages` globs, its keyring's keys, and the image name a plugin is asked about.

use registry::Credentials;

/// `host[:port][/path]` as kubelet's `ParseSchemelessURL` sees it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct SchemelessUrl<'a> {
    host: &'a str,
    port: &'a str,
    path: &'a str,
}

impl<'a> SchemelessUrl<'a> {
    /// None where Go's URL parser would fail: spaces, control characters, a port that is
    /// not a number.
    pub(super) fn parse(text: &'a str) -> Option<Self> {
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return None;
        }
        let text = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"))
            .unwrap_or(text);
        let text = text.split(['?', '#']).next().unwrap_or(text);
        let (authority, path) = match text.find('/') {
            Some(at) => text.split_at(at),
            None => (text, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => (authority, ""),
        };
        // Go's URL parser takes these in a host name (and `%` escapes); `*`, `[` and
        // `]` among them, so globs pass. A `?` starts the query, so it never globs here.
        let host_char = |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=[]<>\"%".contains(c);
        if !port.bytes().all(|b| b.is_ascii_digit()) || !host.chars().all(host_char) {
            return None;
        }
        Some(SchemelessUrl { host, port, path })
    }
}

/// kubelet's `URLsMatchStr`: does `image` (`host[:port]/repository`) match `pattern`?
/// Each DNS label of the host is a glob (`*` stays within the label, and the number of
/// labels must be the same); the ports must be equal (no port matches only no port); the
/// pattern's path must be a prefix of the image's.
pub fn image_matches(pattern: &str, image: &str) -> bool {
    let (Some(glob), Some(target)) = (SchemelessUrl::parse(pattern), SchemelessUrl::parse(image))
    else {
        return false;
    };
    if glob.port != target.port || !target.path.starts_with(glob.path) {
        return false;
    }
    let globs: Vec<&str> = glob.host.split('.').collect();
    let labels: Vec<&str> = target.host.split('.').collect();
    globs.len() == labels.len()
        && globs.iter().zip(&labels).all(|(g, l)| {
            let g: Vec<char> = g.chars().collect();
            let l: Vec<char> = l.chars().collect();
            glob_matches(&g, &l)
        })
}

/// Go's `filepath.Match` on one label: `*`, `?`, `[a-z]`, `[^a-z]`, `\` escapes. A
/// malformed pattern matches nothing, as kubelet ignores the error.
fn glob_matches(pattern: &[char], text: &[char]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some(('*', rest)) => (0..=text.len()).any(|skip| glob_matches(rest, &text[skip..])),
        Some(('?', rest)) => !text.is_empty() && glob_matches(rest, &text[1..]),
        Some(('[', rest)) => {
            let Some((&c, text_rest)) = text.split_first() else {
                return false;
            };
            match class_matches(rest, c) {
                Some((true, after)) => glob_matches(after, text_rest),
                _ => false,
            }
        }
        Some(('\\', rest)) => match rest.split_first() {
            Some((escaped, rest)) => {
                text.first() == Some(escaped) && glob_matches(rest, &text[1..])
            }
            None => false,
        },
        Some((c, rest)) => text.first() == Some(c) && glob_matches(rest, &text[1..]),
    }
}

/// A `[...]` class after its `[`: whether `c` is in it, and the pattern after the `]`;
/// None when the class is malformed.
fn class_matches(pattern: &[char], c: char) -> Option<(bool, &[char])> {
    let (negated, mut rest) = match pattern.split_first() {
        Some(('^', rest)) => (true, rest),
        _ => (false, pattern),
    };
    let mut found = false;
    let mut ranges = 0;
    loop {
        let (&first, after) = rest.split_first()?;
        if first == ']' && ranges > 0 {
            return Some((found != negated, after));
        }
        let take_char = |p: &'_ [char]| -> Option<(char, usize)> {
            match p.first()? {
                '\\' => Some((*p.get(1)?, 2)),
                ']' | '-' => None,
                other => Some((*other, 1)),
            }
        };
        let (lo, used) = take_char(rest)?;
        rest = &rest[used..];
        let mut hi = lo;
        if rest.first() == Some(&'-') {
            let (h, used) = take_char(&rest[1..])?;
            hi = h;
            rest = &rest[1 + used..];
        }
        found |= lo <= c && c <= hi;
        ranges += 1;
    }
}

/// The `auth` keys of an answer as kubelet's keyring keeps them: no scheme, `/v1/` and
/// `/v2/` dropped, a bare `/` path dropped.
pub(super) fn auth_key(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let (host, path) = match key.find('/') {
        Some(at) => key.split_at(at),
        None => (key, ""),
    };
    let path = if path.starts_with("/v2/") || path.starts_with("/v1/") {
        &path[3..]
    } else {
        path
    };
    if path.is_empty() || path == "/" {
        host.to_string()
    } else {
        format!("{host}{path}")
    }
}

/// The credentials kubelet's keyring tries first for `image`: the first key that matches,
/// else, for Docker Hub, an `index.docker.io` entry.
pub(super) fn pick_auth(auth: &[(String, Credentials)], image: &str) -> Option<Credentials> {
    let matched = auth.iter().find(|(key, _)| image_matches(key, image));
    let hub = || {
        (registry_of(image) == "docker.io")
            .then(|| auth.iter().find(|(key, _)| key == "index.docker.io"))
            .flatten()
    };
    matched.or_else(hub).map(|(_, c)| c.clone())
}

/// kubelet's `parseRegistry`: what comes before the first `/`.
pub(super) fn registry_of(image: &str) -> &str {
    image.split('/').next().unwrap_or(image)
}

/// The image name a plugin is asked about, as kubelet writes it: Docker Hub as
/// `docker.io`, no tag or digest.
pub fn image_name(host: &str, repository: &str) -> String {
    let host = match host {
        "registry-1.docker.io" | "index.docker.io" => "docker.io",
        other => other,
    };
    if repository.is_empty() {
        host.to_string()
    } else {
        format!("{host}/{repository}")
    }
}
