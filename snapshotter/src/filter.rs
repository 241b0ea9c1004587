//! containerd's filter language, as List requests carry it.
//!
//! A filter is selectors joined by `,` (all must match); a request's several filters
//! are alternatives (any may match). A selector is a field path (`name`, `parent`,
//! `kind`, `labels.KEY`, components quoted with `"` when they hold dots) with an
//! optional operator (`==`, `!=`, `~=` regex) and value (bare or quoted with `"` or `/`).

use crate::error::{Error, Result};
use crate::types::Info;

#[derive(Debug, Clone)]
pub struct Filter {
    selectors: Vec<Selector>,
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(regex_lite::Regex),
}

impl Filter {
    pub fn parse(input: &str) -> Result<Filter> {
        Parser { input, pos: 0 }
            .filter()
            .map_err(|why| Error::InvalidArgument(format!("filter {input:?}: {why}")))
    }

    pub fn matches(&self, info: &Info) -> bool {
        self.selectors.iter().all(|s| s.matches(info))
    }
}

/// True when any filter matches (no filters match everything).
pub fn any_matches(filters: &[Filter], info: &Info) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(info))
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let (value, present) = field(info, &self.path);
        match &self.op {
            Op::Present => present,
            Op::Equal(v) => present && value == *v,
            Op::NotEqual(v) => value != *v,
            Op::Matches(re) => re.is_match(value),
        }
    }
}

/// The value of a field path and whether it is present (containerd's snapshot adaptor).
fn field<'a>(info: &'a Info, path: &[String]) -> (&'a str, bool) {
    let Some((first, rest)) = path.split_first() else {
        return ("", false);
    };
    match first.as_str() {
        // containerd counts name and parent as present even when empty: its unpacker
        // finds a base layer with `parent==""`.
        "name" if rest.is_empty() => (&info.name, true),
        "parent" if rest.is_empty() => (&info.parent, true),
        "kind" if rest.is_empty() => (info.kind.as_str(), true),
        "labels" if !rest.is_empty() => match info.labels.get(&rest.join(".")) {
            Some(v) => (v, true),
            None => ("", false),
        },
        _ => ("", false),
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn filter(mut self) -> std::result::Result<Filter, String> {
        let mut selectors = Vec::new();
        loop {
            self.skip_space();
            selectors.push(self.selector()?);
            self.skip_space();
            match self.peek() {
                None => break,
                Some(',') => self.pos += 1,
                Some(c) => return Err(self.err(&format!("unexpected {c:?}"))),
            }
        }
        Ok(Filter { selectors })
    }

    fn selector(&mut self) -> std::result::Result<Selector, String> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        self.skip_space();
        let rest = &self.input[self.pos..];
        let op = if rest.starts_with("==") || rest.starts_with("!=") || rest.starts_with("~=") {
            let operator = &rest[..2];
            self.pos += 2;
            self.skip_space();
            let value = self.value()?;
            match operator {
                "==" => Op::Equal(value),
                "!=" => Op::NotEqual(value),
                _ => Op::Matches(
                    regex_lite::Regex::new(&value)
                        .map_err(|e| self.err(&format!("bad regular expression: {e}")))?,
                ),
            }
        } else {
            Op::Present
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> std::result::Result<String, String> {
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let start = self.pos;
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == '_') {
                    self.pos += 1;
                }
                Ok(self.input[start..self.pos].to_string())
            }
            Some(c) => Err(self.err(&format!("expected a field name, found {c:?}"))),
            None => Err(self.err("expected a field name, found the end")),
        }
    }

    fn value(&mut self) -> std::result::Result<String, String> {
        match self.peek() {
            Some(q @ ('"' | '/')) => self.quoted(q),
            _ => {
                let start = self.pos;
                while matches!(self.peek(), Some(c) if c != ',' && !c.is_whitespace()) {
                    self.pos += self.peek().map_or(1, char::len_utf8);
                }
                if start == self.pos {
                    return Err(self.err("expected a value"));
                }
                Ok(self.input[start..self.pos].to_string())
            }
        }
    }

    /// A string between `quote` characters; `"` strings take Go-style escapes.
    fn quoted(&mut self, quote: char) -> std::result::Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.input[self.pos..].char_indices();
        while let Some((i, c)) = chars.next() {
            if c == quote {
                self.pos += i + 1;
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let Some((_, escaped)) = chars.next() else {
                break;
            };
            match (quote, escaped) {
                ('"', 'n') => out.push('\n'),
                ('"', 't') => out.push('\t'),
                ('"', 'r') => out.push('\r'),
                ('"', '\\') => out.push('\\'),
                (_, c) if c == quote => out.push(c),
                // Regex values keep their escapes for the regex engine.
                ('/', c) => {
                    out.push('\\');
                    out.push(c);
                }
                (_, c) => return Err(self.err(&format!("unknown escape \\{c}"))),
            }
        }
        Err(self.err("unterminated quoted string"))
    }

    fn peek(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(c) if c.is_whitespace()) {
            self.pos += 1;
        }
    }

    fn err(&self, what: &str) -> String {
        format!("{what} at byte {}", self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Kind;
    use std::time::SystemTime;

    fn info(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.into(),
            kind,
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn m(filter: &str, info: &Info) -> bool {
        Filter::parse(filter).unwrap().matches(info)
    }

    #[test]
    fn selectors_match_like_containerd() {
        let a = info(
            "a-np",
            "",
            Kind::Active,
            &[("containerd.io/gc.root", "check-walk"), ("l", "2")],
        );
        let c = info("c", "p", Kind::Committed, &[("l", "")]);
        assert!(m(r#"labels."containerd.io/gc.root"==check-walk"#, &a));
        assert!(!m(r#"labels."containerd.io/gc.root"==check-walk"#, &c));
        assert!(m("kind==active,labels.l==2", &a));
        assert!(!m("kind==view,labels.l==2", &a));
        assert!(m("labels.l", &c), "an empty label is present");
        assert!(!m("labels.missing", &c));
        assert!(m(r#"parent!="""#, &c));
        assert!(!m(r#"parent!="""#, &a));
        assert!(m("parent==p", &c));
        assert!(
            m(r#"labels.l==2,parent=="""#, &a),
            "an empty parent matches ==\"\""
        );
        assert!(!m(r#"parent=="""#, &c));
        assert!(m("name~=/^a-/", &a));
        assert!(m("name~=^a-n", &a));
        assert!(!m("name~=^c", &a));
        assert!(m("name", &a));
        assert!(m(" kind == active , name == a-np ", &a));
    }

    #[test]
    fn several_filters_are_alternatives() {
        let a = info("p", "", Kind::Committed, &[]);
        let filters = vec![
            Filter::parse("name==p").unwrap(),
            Filter::parse("name==q").unwrap(),
        ];
        assert!(any_matches(&filters, &a));
        assert!(any_matches(&[], &a));
        assert!(!any_matches(&filters[1..], &a));
    }

    #[test]
    fn malformed_filters_are_invalid_arguments() {
        for bad in [
            "",
            "==x",
            "name==",
            "name==\"open",
            "name~=(",
            "labels.\"x",
            "name==a b",
            ".name",
        ] {
            let err = Filter::parse(bad).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument(_)),
                "{bad:?} gave {err:?}"
            );
        }
    }
}
