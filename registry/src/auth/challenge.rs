//! `WWW-Authenticate` challenges, and what a host's challenges teach the client.

use std::collections::BTreeMap;

use super::cache::Scheme;
use crate::endpoints::Endpoint;

/// One challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased: `bearer`, `basic`, ...
    pub scheme: String,
    /// Parameter names lowercased, values unquoted.
    pub params: BTreeMap<String, String>,
}

/// Parses every challenge of a `WWW-Authenticate` value (RFC 7235: several challenges may
/// share one header, each with comma-separated `name=value` or `name="quoted"` params).
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let s = header.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t' || s[*i] == b',') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= s.len() {
            break;
        }
        let start = i;
        while i < s.len() && is_tchar(s[i]) {
            i += 1;
        }
        if start == i {
            // Not a token: skip the byte so malformed input cannot loop forever.
            i += 1;
            continue;
        }
        let word = &header[start..i];
        // Is this `name=` (a parameter of the current challenge) or a new scheme?
        let mut j = i;
        while j < s.len() && (s[j] == b' ' || s[j] == b'\t') {
            j += 1;
        }
        let is_param = j < s.len() && s[j] == b'=' && !out.is_empty() && {
            // token68 values end with '=' padding followed by ',' or end: treat `x=` with
            // nothing after as padding, not a parameter.
            let mut k = j + 1;
            while k < s.len() && s[k] == b'=' {
                k += 1;
            }
            k == j + 1
        };
        if !is_param {
            if j < s.len() && s[j] == b'=' {
                // token68 (e.g. `Negotiate abc==`): skip to the next comma.
                while i < s.len() && s[i] != b',' {
                    i += 1;
                }
                continue;
            }
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
            continue;
        }
        i = j + 1;
        while i < s.len() && (s[i] == b' ' || s[i] == b'\t') {
            i += 1;
        }
        let value = if i < s.len() && s[i] == b'"' {
            i += 1;
            let mut v = String::new();
            while i < s.len() && s[i] != b'"' {
                if s[i] == b'\\' && i + 1 < s.len() {
                    i += 1;
                }
                // Push whole UTF-8 characters.
                let ch_len = utf8_len(s[i]);
                let end = (i + ch_len).min(s.len());
                v.push_str(&String::from_utf8_lossy(&s[i..end]));
                i = end;
            }
            i += 1; // closing quote (or past the end)
            v
        } else {
            let vs = i;
            while i < s.len() && s[i] != b',' && s[i] != b' ' {
                i += 1;
            }
            header[vs..i].to_string()
        };
        if let Some(last) = out.last_mut() {
            last.params.insert(word.to_ascii_lowercase(), value);
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

impl super::Auth {
    /// Records what the host's challenges ask for; false when none is usable.
    pub(crate) fn learn_scheme(&self, ep: &Endpoint, challenges: &[Challenge]) -> bool {
        let bearer = challenges.iter().find(|c| c.scheme == "bearer");
        if let Some(c) = bearer
            && let Some(realm) = c.params.get("realm")
        {
            self.cache.set_scheme(
                &ep.host,
                Scheme::Bearer {
                    realm: realm.clone(),
                    service: c.params.get("service").cloned(),
                },
            );
            return true;
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            self.cache.set_scheme(&ep.host, Scheme::Basic);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.docker.io/token");
        assert_eq!(c[0].params["service"], "registry.docker.io");
        assert_eq!(c[0].params["scope"], "repository:samalba/my-app:pull,push");

        let c = parse_challenges(r#"Basic realm="lazysnap-test""#);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].params["realm"], "lazysnap-test");

        // Two challenges in one header, odd spacing, unquoted and escaped values.
        let c = parse_challenges(
            r#"Negotiate abc==, Basic realm=simple , BEARER Realm = "http://x/t\"q\"", error="invalid_token""#,
        );
        let schemes: Vec<_> = c.iter().map(|c| c.scheme.as_str()).collect();
        assert_eq!(schemes, ["negotiate", "basic", "bearer"]);
        assert_eq!(c[1].params["realm"], "simple");
        assert_eq!(c[2].params["realm"], "http://x/t\"q\"");
        assert_eq!(c[2].params["error"], "invalid_token");

        assert!(parse_challenges("").is_empty());
        // Malformed input must not panic or loop.
        let _ = parse_challenges(r#"Bearer realm="unterminated"#);
        let _ = parse_challenges("=,=,\"\"");
    }
}
