//! The TOC JSON model shared by eStargz (`JTOC`) and zstd:chunked (the "manifest").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Name of the tar entry holding the eStargz TOC.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Marks the end of the prioritized files.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Says that the layer has no prioritized files.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The one byte a landmark file holds.
pub const LANDMARK_CONTENTS: u8 = 0x0f;
/// Largest TOC accepted, compressed or not (containers/storage's `maxTocSize`).
pub const MAX_TOC_SIZE: u64 = 150 << 20;

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// The TOC document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Toc {
    pub version: i64,
    #[serde(default)]
    pub entries: Vec<TocEntry>,
    /// zstd:chunked (c/storage): digest of the compressed tar-split frame.
    #[serde(
        rename = "tarSplitDigest",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub tar_split_digest: String,
}

/// One TOC entry. Field names are exactly those of the Go structs; empty values are
/// omitted as Go's `omitempty` does.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub modtime: String,
    #[serde(rename = "linkName", default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mode: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: i64,
    #[serde(rename = "userName", default, skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    #[serde(
        rename = "groupName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub group_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: i64,
    #[serde(rename = "endOffset", default, skip_serializing_if = "is_zero")]
    pub end_offset: i64,
    #[serde(rename = "devMajor", default, skip_serializing_if = "is_zero")]
    pub dev_major: i64,
    #[serde(rename = "devMinor", default, skip_serializing_if = "is_zero")]
    pub dev_minor: i64,
    /// Values are base64 (Go's `[]byte` JSON encoding).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(rename = "chunkOffset", default, skip_serializing_if = "is_zero")]
    pub chunk_offset: i64,
    #[serde(rename = "chunkSize", default, skip_serializing_if = "is_zero")]
    pub chunk_size: i64,
    #[serde(
        rename = "chunkDigest",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_digest: String,
    #[serde(
        rename = "chunkType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_type: String,
    #[serde(rename = "innerOffset", default, skip_serializing_if = "is_zero")]
    pub inner_offset: i64,
    /// lazysnap's own field: this chunk was read by the image's command when the image
    /// was optimized, so lazysnapd prefetches it. Other readers ignore unknown fields;
    /// a layer where no chunk has it is prefetched by its landmark as usual.
    #[serde(
        rename = "lazysnapPrefetch",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub prefetch: bool,
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

// Howard Hinnant's civil-from-days and days-from-civil, valid far beyond any file time.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl Timestamp {
    /// RFC 3339 in UTC, with a fraction only when there are nanoseconds (a valid
    /// RFC3339Nano string, which Go parses into `time.Time`).
    pub fn to_rfc3339(self) -> String {
        let days = self.secs.div_euclid(86400);
        let sod = self.secs.rem_euclid(86400);
        let (y, m, d) = civil_from_days(days);
        let mut s = format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            sod / 3600,
            sod % 3600 / 60,
            sod % 60
        );
        if self.nanos != 0 {
            let frac = format!("{:09}", self.nanos);
            s.push('.');
            s.push_str(frac.trim_end_matches('0'));
        }
        s.push('Z');
        s
    }

    /// Parses RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`).
    pub fn parse_rfc3339(s: &str) -> Result<Self> {
        let bad = || Error::bad_toc(format!("bad RFC 3339 time {s:?}"));
        let b = s.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| -> Result<i64> {
            let part = &b[r];
            if !part.iter().all(u8::is_ascii_digit) {
                return Err(bad());
            }
            std::str::from_utf8(part)
                .ok()
                .and_then(|p| p.parse::<i64>().ok())
                .ok_or_else(bad)
        };
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        if b[13] != b':' || b[16] != b':' {
            return Err(bad());
        }
        let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
            return Err(bad());
        }
        let mut i = 19;
        let mut nanos: u32 = 0;
        if b[i] == b'.' {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                if i - start < 9 {
                    nanos = nanos * 10 + (b[i] - b'0') as u32;
                }
                i += 1;
            }
            let digits = i - start;
            if digits == 0 {
                return Err(bad());
            }
            for _ in digits..9 {
                nanos *= 10;
            }
        }
        let offset = match b.get(i) {
            Some(b'Z') | Some(b'z') if i + 1 == b.len() => 0,
            Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
                let off = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
                if *sign == b'+' { off } else { -off }
            }
            _ => return Err(bad()),
        };
        let secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset;
        Ok(Timestamp { secs, nanos })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        for (s, secs, nanos) in [
            ("1970-01-01T00:00:00Z", 0, 0),
            ("2020-02-29T12:34:56Z", 1582979696, 0),
            ("1969-12-31T23:59:59.5Z", -1, 500_000_000),
            ("2023-08-01T10:00:00.123456789Z", 1690884000, 123_456_789),
        ] {
            let t = Timestamp::parse_rfc3339(s).unwrap();
            assert_eq!((t.secs, t.nanos), (secs, nanos), "{s}");
            assert_eq!(t.to_rfc3339(), s);
        }
        let t = Timestamp::parse_rfc3339("2020-01-01T02:00:00+02:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2020-01-01T00:00:00Z");
        for bad in [
            "",
            "2020-01-01",
            "2020-13-01T00:00:00Z",
            "2020-01-01T00:00:00",
            "2020-01-01T00:00:00.Z",
            "2020-01-01T0a:00:00Z",
            "2020-01-01T00:00:00+0200",
        ] {
            assert!(Timestamp::parse_rfc3339(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn entries_omit_empty_fields_and_ignore_unknown_ones() {
        let e = TocEntry {
            name: "bin/".into(),
            kind: "dir".into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"name":"bin/","type":"dir"}"#
        );
        let parsed: TocEntry =
            serde_json::from_str(r#"{"name":"a","type":"reg","NumLink":0,"size":3}"#).unwrap();
        assert_eq!(parsed.size, 3);
    }
}
