//! `--prioritize` lists: the files a workload opens first and the ranges it reads of
//! them, as `lazysnap optimize` writes them, for the converter and the SOCI indexer.

use crate::error::{Error, Result};

/// A `--prioritize` list: paths in first-access order, and the byte ranges of them that
/// were read at start-up where the list says (`lazysnap optimize` writes them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrioritizedList {
    pub files: Vec<String>,
    pub ranges: std::collections::HashMap<String, Vec<std::ops::Range<u64>>>,
}

/// Reads a `--prioritize` list: one path per line, optionally followed by a tab and the
/// ranges read, `START-END[,START-END…]` (end exclusive); blank lines and `#` comments
/// skipped.
pub fn read_prioritized(path: &std::path::Path) -> Result<PrioritizedList> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    parse_prioritized(&text)
        .map_err(|reason| Error::BadOption(format!("{}: {reason}", path.display())))
}

fn parse_prioritized(text: &str) -> std::result::Result<PrioritizedList, String> {
    let mut list = PrioritizedList::default();
    for (n, line) in text.lines().enumerate() {
        // A tab at the end means "read nothing": keep it.
        let line = line
            .trim_start()
            .trim_end_matches(|c: char| c != '\t' && c.is_whitespace());
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((file, ranges)) = line.rsplit_once('\t') else {
            list.files.push(line.to_string());
            continue;
        };
        let file = file.trim_end();
        let mut parsed = Vec::new();
        for r in ranges.split(',').filter(|r| !r.is_empty()) {
            let range = r
                .split_once('-')
                .and_then(|(a, b)| Some(a.parse::<u64>().ok()?..b.parse::<u64>().ok()?))
                .filter(|r| r.start < r.end)
                .ok_or_else(|| format!("line {}: bad range {r:?} (want START-END)", n + 1))?;
            parsed.push(range);
        }
        list.files.push(file.to_string());
        list.ranges
            .entry(file.to_string())
            .or_default()
            .extend(parsed);
    }
    Ok(list)
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one-range lists are meant
mod tests {
    use super::*;

    #[test]
    fn prioritize_lists_take_paths_with_or_without_ranges() {
        let list = parse_prioritized(
            "# comment\n\nusr/bin/python3\t0-4096,8192-12288\netc/passwd\n/lib/x.so\t100-200\r\nopened\t\n",
        )
        .unwrap();
        assert_eq!(
            list.files,
            ["usr/bin/python3", "etc/passwd", "/lib/x.so", "opened"]
        );
        // Opened, never read: listed with no ranges, so none of its chunks is marked.
        assert!(list.ranges["opened"].is_empty());
        assert_eq!(list.ranges["usr/bin/python3"], [0..4096, 8192..12288]);
        assert_eq!(list.ranges["/lib/x.so"], vec![100..200]);
        assert!(!list.ranges.contains_key("etc/passwd"));
        for bad in ["a\t5-5", "a\t7-3", "a\tx-9", "a\t12"] {
            assert!(parse_prioritized(bad).is_err(), "{bad:?}");
        }
    }
}
