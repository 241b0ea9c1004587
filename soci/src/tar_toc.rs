//! The TOC part of a zTOC: every entry of an (inflated) tar stream, read as Go's
//! `archive/tar` reads it, since soci records what that reader returns: names joined
//! from the USTAR prefix or taken from GNU long-name entries and PAX records, numeric
//! fields in octal or base-256, the PAX records themselves, and where each entry's data
//! starts. Sparse files and entry types soci does not index are errors.

use std::collections::BTreeMap;
use std::io::{self, Read};

use crate::ztoc::FileMetadata;

const BLOCK: u64 = 512;
/// Go's cap on PAX and GNU long-name entries.
const MAX_SPECIAL_FILE_SIZE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("reading the tar stream: {0}")]
    Io(#[from] io::Error),
    #[error("the tar stream ends inside an entry at byte {0}")]
    Truncated(u64),
    #[error("bad tar header at byte {0}: {1}")]
    Header(u64, &'static str),
    #[error("tar entry type {0:?} at byte {1} is not indexed")]
    Unsupported(char, u64),
}

/// A reader that counts what it has read.
struct Counted<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Counted<R> {
    /// Fills `buf`: Ok(false) at a clean end before the first byte.
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool, TarError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(TarError::Truncated(self.pos)),
                Ok(n) => {
                    got += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    fn skip(&mut self, mut n: u64) -> Result<(), TarError> {
        let mut scratch = [0u8; 8192];
        while n > 0 {
            let want = n.min(scratch.len() as u64) as usize;
            if !self.fill(&mut scratch[..want])? {
                return Err(TarError::Truncated(self.pos));
            }
            n -= want as u64;
        }
        Ok(())
    }

    fn read_special(&mut self, size: i64) -> Result<Vec<u8>, TarError> {
        let at = self.pos;
        if size < 0 || size as u64 > MAX_SPECIAL_FILE_SIZE {
            return Err(TarError::Header(at, "PAX or long-name entry over 1 MiB"));
        }
        let mut content = vec![0; size as usize];
        if !content.is_empty() && !self.fill(&mut content)? {
            return Err(TarError::Truncated(self.pos));
        }
        self.skip(padding(size as u64))?;
        Ok(content)
    }
}

fn padding(size: u64) -> u64 {
    size.wrapping_neg() % BLOCK
}

/// One header block's fields, before PAX records and long names apply.
struct RawHeader {
    typeflag: u8,
    name: Vec<u8>,
    linkname: Vec<u8>,
    size: i64,
    mode: i64,
    uid: i64,
    gid: i64,
    mtime: i64,
    uname: Vec<u8>,
    gname: Vec<u8>,
    devmajor: i64,
    devminor: i64,
}

/// Reads the TOC of the tar stream `tar`: its entries, and how many bytes of the
/// stream the tar takes (up to and with its end-of-archive blocks).
pub fn read_tar_toc(tar: impl Read) -> Result<(Vec<FileMetadata>, u64), TarError> {
    let mut r = Counted { inner: tar, pos: 0 };
    let mut files = Vec::new();
    let mut block = [0u8; BLOCK as usize];
    let mut pax: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let (mut long_name, mut long_link) = (None, None);
    loop {
        let at = r.pos;
        if !r.fill(&mut block)? {
            break;
        }
        if block.iter().all(|&b| b == 0) {
            // One zero block and the end, or two: the end of the archive.
            if !r.fill(&mut block)? {
                break;
            }
            if block.iter().all(|&b| b == 0) {
                break;
            }
            return Err(TarError::Header(at, "a zero block, then a header"));
        }
        let header = parse_header(&block, at)?;
        match header.typeflag {
            b'x' => {
                pax = parse_pax(&r.read_special(header.size)?, at)?;
                continue;
            }
            b'L' => {
                long_name = Some(cut_at_nul(&r.read_special(header.size)?).to_vec());
                continue;
            }
            b'K' => {
                long_link = Some(cut_at_nul(&r.read_special(header.size)?).to_vec());
                continue;
            }
            _ => {}
        }
        let records = std::mem::take(&mut pax);
        let file = merge(header, &records, long_name.take(), long_link.take(), at)?;
        let data_offset = r.pos;
        // Header-only types carry no data whatever their size field says.
        let data = if matches!(file.kind.as_str(), "reg") {
            file.uncompressed_size as u64
        } else {
            0
        };
        files.push(FileMetadata {
            uncompressed_offset: data_offset as i64,
            ..file
        });
        r.skip(data + padding(data))?;
    }
    Ok((files, r.pos))
}

fn merge(
    h: RawHeader,
    records: &BTreeMap<Vec<u8>, Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    at: u64,
) -> Result<FileMetadata, TarError> {
    let bad = |what| TarError::Header(at, what);
    let mut f = FileMetadata {
        name: h.name,
        linkname: h.linkname,
        uncompressed_size: h.size,
        mode: h.mode,
        uid: h.uid as u32,
        gid: h.gid as u32,
        uname: h.uname,
        gname: h.gname,
        devmajor: h.devmajor,
        devminor: h.devminor,
        ..FileMetadata::default()
    };
    let (mut secs, mut nanos) = (h.mtime, 0u32);
    for (key, value) in records {
        let text = std::str::from_utf8(value).ok();
        let int = || text.and_then(|t| t.parse::<i64>().ok());
        match key.as_slice() {
            b"path" => f.name = value.clone(),
            b"linkpath" => f.linkname = value.clone(),
            b"uname" => f.uname = value.clone(),
            b"gname" => f.gname = value.clone(),
            b"uid" => f.uid = int().ok_or(bad("PAX uid"))? as u32,
            b"gid" => f.gid = int().ok_or(bad("PAX gid"))? as u32,
            b"size" => {
                f.uncompressed_size = int().filter(|&s| s >= 0).ok_or(bad("PAX size"))?;
            }
            b"mtime" => (secs, nanos) = text.and_then(parse_pax_time).ok_or(bad("PAX mtime"))?,
            key if key.starts_with(b"GNU.sparse.") => {
                return Err(TarError::Unsupported('S', at));
            }
            _ => {}
        }
    }
    f.pax_records = records
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(name) = long_name.filter(|n| !n.is_empty()) {
        f.name = name;
    }
    if let Some(link) = long_link.filter(|l| !l.is_empty()) {
        f.linkname = link;
    }
    f.kind = match h.typeflag {
        b'0' => "reg",
        // The oldest archives mark directories by a trailing slash only.
        0 if f.name.ends_with(b"/") => "dir",
        0 => "reg",
        b'1' => "hardlink",
        b'2' => "symlink",
        b'3' => "char",
        b'4' => "block",
        b'5' => "dir",
        b'6' => "fifo",
        other => return Err(TarError::Unsupported(char::from(other), at)),
    }
    .to_string();
    f.mod_time = mod_time_text(secs, nanos);
    Ok(f)
}

/// A time as Go's `MarshalText` writes it in UTC: RFC 3339, fraction trimmed; nothing
/// for years Go refuses to write (soci then stores "").
fn mod_time_text(secs: i64, nanos: u32) -> String {
    // 0000-01-01 and 10000-01-01 in seconds since the epoch.
    if !(-62_167_219_200..253_402_300_800).contains(&secs) {
        return String::new();
    }
    estargz::Timestamp { secs, nanos }.to_rfc3339()
}

/// A PAX time, `seconds[.fraction]`, as Go reads it (fraction cut to nanoseconds).
fn parse_pax_time(text: &str) -> Option<(i64, u32)> {
    let (secs, fraction) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    if fraction.is_empty() {
        return Some((secs, 0));
    }
    if !fraction.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let digits: String = fraction
        .chars()
        .chain(std::iter::repeat('0'))
        .take(9)
        .collect();
    let nanos: i64 = digits.parse().ok()?;
    // "-1.5" is 1.5 s before the epoch: Go's time.Unix(-1, -500000000).
    let nanos = if text.starts_with('-') { -nanos } else { nanos };
    let total = i128::from(secs) * 1_000_000_000 + i128::from(nanos);
    let secs = total.div_euclid(1_000_000_000);
    Some((
        i64::try_from(secs).ok()?,
        total.rem_euclid(1_000_000_000) as u32,
    ))
}

fn parse_pax(content: &[u8], at: u64) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, TarError> {
    let mut records = BTreeMap::new();
    let mut rest = content;
    while !rest.is_empty() {
        let space = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or(TarError::Header(at, "bad PAX record"))?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .filter(|l| !l.is_empty() && l.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|l| l.parse().ok())
            .ok_or(TarError::Header(at, "bad PAX record length"))?;
        if len <= space || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(TarError::Header(at, "bad PAX record length"));
        }
        let record = &rest[space + 1..len - 1];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or(TarError::Header(at, "PAX record without '='"))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        let path_like = matches!(key, b"path" | b"linkpath" | b"uname" | b"gname");
        if key.is_empty() || key.contains(&0) || (path_like && value.contains(&0)) {
            return Err(TarError::Header(at, "bad PAX record key or value"));
        }
        if key.starts_with(b"GNU.sparse.") {
            return Err(TarError::Unsupported('S', at));
        }
        records.insert(key.to_vec(), value.to_vec());
        rest = &rest[len..];
    }
    Ok(records)
}

fn parse_header(b: &[u8; BLOCK as usize], at: u64) -> Result<RawHeader, TarError> {
    let bad = |what| TarError::Header(at, what);
    let checksum = parse_octal(&b[148..156]).ok_or(bad("checksum field"))?;
    let unsigned: i64 = b
        .iter()
        .enumerate()
        .map(|(i, &c)| i64::from(if (148..156).contains(&i) { b' ' } else { c }))
        .sum();
    let signed: i64 = b
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            i64::from(if (148..156).contains(&i) {
                b' ' as i8
            } else {
                c as i8
            })
        })
        .sum();
    if checksum != unsigned && checksum != signed {
        return Err(bad("checksum mismatch"));
    }
    let magic = &b[257..263];
    let ustar = magic == b"ustar\0";
    let star = ustar && &b[508..512] == b"tar\0";
    let gnu = magic == b"ustar " && &b[263..265] == b" \0";
    let num = |range: std::ops::Range<usize>| parse_numeric(&b[range]).ok_or(bad("numeric field"));
    let mut h = RawHeader {
        typeflag: b[156],
        name: cut_at_nul(&b[0..100]).to_vec(),
        linkname: cut_at_nul(&b[157..257]).to_vec(),
        size: num(124..136)?,
        mode: num(100..108)?,
        uid: num(108..116)?,
        gid: num(116..124)?,
        mtime: num(136..148)?,
        uname: Vec::new(),
        gname: Vec::new(),
        devmajor: 0,
        devminor: 0,
    };
    if ustar || gnu {
        h.uname = cut_at_nul(&b[265..297]).to_vec();
        h.gname = cut_at_nul(&b[297..329]).to_vec();
        h.devmajor = num(329..337)?;
        h.devminor = num(337..345)?;
        let prefix = if star {
            cut_at_nul(&b[345..476])
        } else if ustar {
            cut_at_nul(&b[345..500])
        } else {
            &[]
        };
        if !prefix.is_empty() {
            h.name = [prefix, b"/", &h.name].concat();
        }
    }
    if h.typeflag == b'S' || h.typeflag == b'g' {
        return Err(TarError::Unsupported(char::from(h.typeflag), at));
    }
    Ok(h)
}

fn cut_at_nul(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]
}

/// A numeric field: base-256 when its top bit is set, else octal padded with spaces
/// or NULs.
fn parse_numeric(b: &[u8]) -> Option<i64> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        let inv = if b[0] & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, &c) in b.iter().enumerate() {
            let mut c = c ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 > 0 {
                return None;
            }
            x = x << 8 | u64::from(c);
        }
        if x >> 63 > 0 {
            return None;
        }
        return Some(if inv == 0xff { !(x as i64) } else { x as i64 });
    }
    parse_octal(b)
}

fn parse_octal(b: &[u8]) -> Option<i64> {
    let trimmed = trim(b, b" \0");
    let digits = cut_at_nul(trimmed);
    if trimmed.is_empty() {
        return Some(0);
    }
    let text = std::str::from_utf8(digits).ok()?;
    u64::from_str_radix(text, 8).ok().map(|x| x as i64)
}

fn trim<'a>(b: &'a [u8], set: &[u8]) -> &'a [u8] {
    let start = b.iter().position(|c| !set.contains(c)).unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !set.contains(c))
        .map_or(start, |e| e + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, kind: u8, size: u64, mtime: u64) -> Vec<u8> {
        let mut h = tar_header_base(name, kind, size, mtime);
        set_checksum(&mut h);
        h
    }

    fn tar_header_base(name: &str, kind: u8, size: u64, mtime: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0001750\0");
        h[116..124].copy_from_slice(b"0001750\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(format!("{mtime:011o}\0").as_bytes());
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"user");
        h
    }

    fn set_checksum(h: &mut [u8]) {
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    fn entry(out: &mut Vec<u8>, h: Vec<u8>, data: &[u8]) {
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len() + padding(data.len() as u64) as usize, 0);
    }

    fn pax(records: &[(&str, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, v) in records {
            let rest = format!(" {k}={v}\n");
            let mut len = rest.len() + 1;
            while format!("{len}{rest}").len() != len {
                len = format!("{len}{rest}").len();
            }
            body.extend_from_slice(format!("{len}{rest}").as_bytes());
        }
        body
    }

    #[test]
    fn entries_get_go_archive_tar_s_view_of_them() {
        let mut tar = Vec::new();
        entry(&mut tar, header("etc/", b'5', 0, 1_700_000_000), &[]);
        entry(
            &mut tar,
            header("etc/hosts", b'0', 5, 1_700_000_000),
            b"hello",
        );
        let records = pax(&[
            ("path", "etc/a-name-from-pax"),
            ("mtime", "1700000000.25"),
            ("SCHILY.xattr.user.x", "1"),
        ]);
        entry(
            &mut tar,
            header("PaxHeaders/x", b'x', records.len() as u64, 0),
            &records,
        );
        entry(&mut tar, header("short", b'0', 3, 1), b"abc");
        let mut link = tar_header_base("etc/link", b'2', 0, 0);
        link[157..162].copy_from_slice(b"hosts");
        set_checksum(&mut link);
        entry(&mut tar, link, &[]);
        tar.resize(tar.len() + 1024, 0);
        let archive_end = tar.len() as u64;
        tar.resize(tar.len() + 8192, 0); // record padding after the end blocks

        let (files, size) = read_tar_toc(&tar[..]).unwrap();
        assert_eq!(
            size, archive_end,
            "the size ends with the second zero block"
        );
        let names: Vec<&[u8]> = files.iter().map(|f| f.name.as_slice()).collect();
        assert_eq!(
            names,
            [
                &b"etc/"[..],
                b"etc/hosts",
                b"etc/a-name-from-pax",
                b"etc/link"
            ]
        );
        assert_eq!(files[1].uncompressed_offset, 1024);
        assert_eq!(files[1].uncompressed_size, 5);
        assert_eq!(files[1].mode, 0o644);
        assert_eq!((files[1].uid, files[1].gid), (1000, 1000));
        assert_eq!(files[1].uname, b"user");
        assert_eq!(files[1].mod_time, "2023-11-14T22:13:20Z");
        assert_eq!(files[2].mod_time, "2023-11-14T22:13:20.25Z");
        assert_eq!(files[2].uncompressed_offset, 1536 + 1024 + 512);
        assert_eq!(files[2].pax_records.len(), 3, "every record is kept");
        assert_eq!(files[2].pax_records[0].0, b"SCHILY.xattr.user.x");
        assert_eq!(
            (files[3].kind.as_str(), files[3].linkname.as_slice()),
            ("symlink", &b"hosts"[..])
        );
    }

    #[test]
    fn bad_archives_get_errors() {
        let mut tar = Vec::new();
        entry(&mut tar, header("f", b'0', 600, 0), &[1; 600]);
        assert!(matches!(
            read_tar_toc(&tar[..300]),
            Err(TarError::Truncated(_))
        ));
        let mut bad_sum = tar.clone();
        bad_sum[0] = b'g';
        assert!(matches!(
            read_tar_toc(&bad_sum[..]),
            Err(TarError::Header(0, _))
        ));
        let mut sparse = Vec::new();
        entry(&mut sparse, header("s", b'S', 0, 0), &[]);
        assert!(matches!(
            read_tar_toc(&sparse[..]),
            Err(TarError::Unsupported('S', 0))
        ));
        let mut zero_then_header = vec![0u8; 512];
        zero_then_header.extend(header("f", b'0', 0, 0));
        assert!(read_tar_toc(&zero_then_header[..]).is_err());
    }

    #[test]
    fn times_are_written_as_go_writes_them() {
        assert_eq!(mod_time_text(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(
            mod_time_text(1_714_557_600, 500_000_000),
            "2024-05-01T10:00:00.5Z"
        );
        assert_eq!(mod_time_text(-1, 0), "1969-12-31T23:59:59Z");
        assert_eq!(mod_time_text(-62_167_219_200, 0), "0000-01-01T00:00:00Z");
        assert_eq!(mod_time_text(253_402_300_800, 0), "", "year 10000");
    }

    #[test]
    fn numbers_read_as_go_reads_them() {
        assert_eq!(parse_numeric(b"0000644\0"), Some(0o644));
        assert_eq!(parse_numeric(b"  644 \0"), Some(0o644));
        assert_eq!(parse_numeric(b"\0\0\0\0"), Some(0));
        assert_eq!(
            parse_numeric(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]),
            Some(1 << 32)
        );
        assert_eq!(parse_numeric(&[0xff; 8]), Some(-1));
        assert_eq!(parse_numeric(b"0009\0"), None);
        assert_eq!(parse_pax_time("1.5"), Some((1, 500_000_000)));
        assert_eq!(parse_pax_time("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time("12.1234567891"), Some((12, 123_456_789)));
        assert_eq!(parse_pax_time("x"), None);
    }
}
