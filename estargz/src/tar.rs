//! A small tar reader that keeps every raw byte (so a layer can be re-chunked without
//! changing its tar stream) and a ustar header builder for the entries we add.

use std::io::Read;

use crate::error::{Error, Result};
use crate::toc::Timestamp;

pub(crate) const BLOCK: usize = 512;
/// Largest PAX / GNU long-name extension data we accept; real ones are tiny.
const MAX_EXTENSION: u64 = 1 << 20;

/// One logical tar entry: its metadata, after PAX and GNU extensions are applied.
#[derive(Debug, Clone, Default)]
pub(crate) struct TarHeader {
    /// Every raw byte of the header blocks, extension headers and their data included.
    pub raw: Vec<u8>,
    pub name: String,
    pub typeflag: u8,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    /// Size of the payload that follows in the stream (0 for header-only types).
    pub size: u64,
    pub mtime: Timestamp,
    pub link_name: String,
    pub uname: String,
    pub gname: String,
    pub dev_major: i64,
    pub dev_minor: i64,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl TarHeader {
    /// Bytes of padding after the payload, to the next block boundary.
    pub fn padding(&self) -> u64 {
        (BLOCK as u64 - self.size % BLOCK as u64) % BLOCK as u64
    }
}

#[derive(Default)]
struct Pending {
    path: Option<String>,
    link: Option<String>,
    size: Option<u64>,
    uid: Option<i64>,
    gid: Option<i64>,
    uname: Option<String>,
    gname: Option<String>,
    mtime: Option<Timestamp>,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Reads tar entries from a byte stream, keeping track of the position for errors.
pub(crate) struct TarReader<R> {
    inner: R,
    pos: u64,
    /// Payload bytes of the current entry not read yet.
    data_left: u64,
    /// Padding bytes of the current entry not read yet.
    pad_left: u64,
    /// The raw end-of-archive blocks, once they were seen.
    pub end_raw: Vec<u8>,
}

fn bad(offset: u64, reason: impl Into<String>) -> Error {
    Error::BadTar {
        offset,
        reason: reason.into(),
    }
}

/// Reads exactly `buf.len()` bytes, or returns how many were read before end of stream.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn cstr(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(i) => &field[..i],
        None => field,
    }
}

fn utf8(bytes: &[u8], offset: u64, what: &str) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| bad(offset, format!("{what} is not UTF-8")))
}

/// A numeric header field: octal (space/NUL padded) or GNU base-256.
fn numeric(field: &[u8], offset: u64, what: &str) -> Result<i64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // Base-256: the first byte's top bit flags it, its next bit is the sign.
        let negative = field[0] & 0x40 != 0;
        let mut v: i128 = if negative { -1 } else { 0 };
        for (i, &b) in field.iter().enumerate() {
            let b = if i == 0 { b & 0x7f } else { b };
            let b = if i == 0 && negative { b | 0x80 } else { b };
            v = (v << 8) | b as i128;
            if v > i64::MAX as i128 || v < i64::MIN as i128 {
                return Err(bad(offset, format!("{what} overflows")));
            }
        }
        return Ok(v as i64);
    }
    let s = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == 0)
        .take_while(|&b| b != b' ' && b != 0)
        .collect::<Vec<u8>>();
    if s.is_empty() {
        return Ok(0);
    }
    let text = std::str::from_utf8(&s).map_err(|_| bad(offset, format!("{what} is not octal")))?;
    i64::from_str_radix(text, 8).map_err(|_| bad(offset, format!("{what} {text:?} is not octal")))
}

fn parse_pax(data: &[u8], offset: u64, p: &mut Pending) -> Result<()> {
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad(offset, "PAX record without length"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(offset, "PAX record length is not a number"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad(offset, "PAX record length is wrong"));
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad(offset, "PAX record without '='"))?;
        let key = utf8(&rec[..eq], offset, "PAX key")?;
        let value = &rec[eq + 1..];
        let text = || utf8(value, offset, &format!("PAX {key}"));
        let int = || -> Result<i64> {
            text()?
                .parse()
                .map_err(|_| bad(offset, format!("PAX {key} is not a number")))
        };
        match key.as_str() {
            "path" => p.path = Some(text()?),
            "linkpath" => p.link = Some(text()?),
            "size" => {
                p.size = Some(u64::try_from(int()?).map_err(|_| bad(offset, "negative PAX size"))?)
            }
            "uid" => p.uid = Some(int()?),
            "gid" => p.gid = Some(int()?),
            "uname" => p.uname = Some(text()?),
            "gname" => p.gname = Some(text()?),
            "mtime" => p.mtime = Some(parse_pax_time(&text()?, offset)?),
            k if k.starts_with("GNU.sparse.") => {
                return Err(Error::UnsupportedTar {
                    path: p.path.clone().unwrap_or_default(),
                    reason: "sparse files".into(),
                });
            }
            k => {
                if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                    p.xattrs.push((name.to_string(), value.to_vec()));
                }
            }
        }
        rest = &rest[len..];
    }
    Ok(())
}

fn parse_pax_time(s: &str, offset: u64) -> Result<Timestamp> {
    let badt = || bad(offset, format!("PAX time {s:?} is not a number"));
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let (whole, frac) = body.split_once('.').unwrap_or((body, ""));
    let secs: i64 = whole.parse().map_err(|_| badt())?;
    let mut nanos: u32 = 0;
    for (i, c) in frac.chars().enumerate() {
        let d = c.to_digit(10).ok_or_else(badt)?;
        if i < 9 {
            nanos += d * 10u32.pow(8 - i as u32);
        }
    }
    Ok(if neg {
        if nanos > 0 {
            Timestamp {
                secs: -secs - 1,
                nanos: 1_000_000_000 - nanos,
            }
        } else {
            Timestamp {
                secs: -secs,
                nanos: 0,
            }
        }
    } else {
        Timestamp { secs, nanos }
    })
}

fn checksum_ok(block: &[u8]) -> Result<bool> {
    let stored = numeric(&block[148..156], 0, "checksum")?;
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as i64;
        signed += b as i8 as i64;
    }
    Ok(stored == unsigned || stored == signed)
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader {
            inner,
            pos: 0,
            data_left: 0,
            pad_left: 0,
            end_raw: Vec::new(),
        }
    }

    /// Bytes consumed from the stream so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    fn read_exact_at(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let n = read_full(&mut self.inner, buf)
            .map_err(|e| bad(self.pos, format!("reading {what}: {e}")))?;
        if n < buf.len() {
            return Err(bad(self.pos + n as u64, format!("truncated {what}")));
        }
        self.pos += n as u64;
        Ok(())
    }

    /// Reads payload bytes of the current entry; returns 0 at its end.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = (buf.len() as u64).min(self.data_left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.read_exact_at(&mut buf[..n], "file payload")?;
        self.data_left -= n as u64;
        Ok(n)
    }

    /// Reads the padding after the current payload (after all of it was read).
    pub fn read_padding(&mut self) -> Result<Vec<u8>> {
        self.skip_data()?;
        let mut pad = vec![0u8; self.pad_left as usize];
        self.read_exact_at(&mut pad, "padding")?;
        self.pad_left = 0;
        Ok(pad)
    }

    fn skip_data(&mut self) -> Result<()> {
        let mut buf = [0u8; 8192];
        while self.data_left > 0 {
            self.read_data(&mut buf)?;
        }
        Ok(())
    }

    fn read_block(&mut self, raw: &mut Vec<u8>) -> Result<Option<[u8; BLOCK]>> {
        let mut block = [0u8; BLOCK];
        let n = read_full(&mut self.inner, &mut block)
            .map_err(|e| bad(self.pos, format!("reading a header: {e}")))?;
        if n == 0 {
            return Ok(None);
        }
        if n < BLOCK {
            return Err(bad(self.pos + n as u64, "truncated header block"));
        }
        self.pos += BLOCK as u64;
        raw.extend_from_slice(&block);
        Ok(Some(block))
    }

    fn read_extension(&mut self, size: i64, raw: &mut Vec<u8>) -> Result<Vec<u8>> {
        let size = u64::try_from(size).map_err(|_| bad(self.pos, "negative extension size"))?;
        if size > MAX_EXTENSION {
            return Err(bad(self.pos, format!("{size}-byte extension header")));
        }
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let mut data = vec![0u8; padded as usize];
        self.read_exact_at(&mut data, "extension header data")?;
        raw.extend_from_slice(&data);
        data.truncate(size as usize);
        Ok(data)
    }

    /// The next entry, or `None` at the end of the archive (then `end_raw` holds the
    /// end-of-archive blocks read). Skips whatever of the previous payload was not read.
    pub fn next_header(&mut self) -> Result<Option<TarHeader>> {
        self.read_padding()?;
        let start = self.pos;
        let mut raw = Vec::with_capacity(BLOCK);
        let mut pending = Pending::default();
        loop {
            let block_at = self.pos;
            let Some(block) = self.read_block(&mut raw)? else {
                if raw.is_empty() {
                    // No end-of-archive marker at all; Go's reader accepts that too.
                    return Ok(None);
                }
                return Err(bad(block_at, "archive ends inside an entry's headers"));
            };
            if block.iter().all(|&b| b == 0) {
                if raw.len() > BLOCK {
                    return Err(bad(block_at, "zero block after extension headers"));
                }
                // A second zero block (or the end of the stream) ends the archive.
                let mut second = Vec::new();
                if let Some(b2) = self.read_block(&mut second)?
                    && b2.iter().any(|&b| b != 0)
                {
                    return Err(bad(block_at, "lone zero block inside the archive"));
                }
                raw.extend_from_slice(&second);
                self.end_raw = raw;
                return Ok(None);
            }
            if !checksum_ok(&block)? {
                return Err(bad(block_at, "header checksum mismatch"));
            }
            let typeflag = block[156];
            let size = numeric(&block[124..136], block_at, "size")?;
            match typeflag {
                b'x' => {
                    let data = self.read_extension(size, &mut raw)?;
                    parse_pax(&data, block_at, &mut pending)?;
                    continue;
                }
                b'g' => {
                    // Global PAX headers stay in the raw bytes; their records are rare
                    // (comments, mostly) and are not applied.
                    self.read_extension(size, &mut raw)?;
                    continue;
                }
                b'L' => {
                    let data = self.read_extension(size, &mut raw)?;
                    pending.path = Some(utf8(cstr(&data), block_at, "GNU long name")?);
                    continue;
                }
                b'K' => {
                    let data = self.read_extension(size, &mut raw)?;
                    pending.link = Some(utf8(cstr(&data), block_at, "GNU long link")?);
                    continue;
                }
                _ => {}
            }
            let magic = &block[257..265];
            let ustar = &magic[..6] == b"ustar\0";
            let mut name = utf8(cstr(&block[..100]), block_at, "name")?;
            if ustar {
                let prefix = cstr(&block[345..500]);
                if !prefix.is_empty() {
                    name = format!("{}/{}", utf8(prefix, block_at, "name prefix")?, name);
                }
            }
            let mut h = TarHeader {
                raw: Vec::new(),
                name: pending.path.take().unwrap_or(name),
                typeflag,
                mode: numeric(&block[100..108], block_at, "mode")?,
                uid: numeric(&block[108..116], block_at, "uid")?,
                gid: numeric(&block[116..124], block_at, "gid")?,
                size: 0,
                mtime: Timestamp {
                    secs: numeric(&block[136..148], block_at, "mtime")?,
                    nanos: 0,
                },
                link_name: utf8(cstr(&block[157..257]), block_at, "link name")?,
                uname: utf8(cstr(&block[265..297]), block_at, "user name")?,
                gname: utf8(cstr(&block[297..329]), block_at, "group name")?,
                dev_major: numeric(&block[329..337], block_at, "devmajor")?,
                dev_minor: numeric(&block[337..345], block_at, "devminor")?,
                xattrs: std::mem::take(&mut pending.xattrs),
            };
            if let Some(l) = pending.link.take() {
                h.link_name = l;
            }
            h.uid = pending.uid.unwrap_or(h.uid);
            h.gid = pending.gid.unwrap_or(h.gid);
            if let Some(u) = pending.uname.take() {
                h.uname = u;
            }
            if let Some(g) = pending.gname.take() {
                h.gname = g;
            }
            if let Some(t) = pending.mtime {
                h.mtime = t;
            }
            let size = match pending.size {
                Some(s) => s,
                None => u64::try_from(size).map_err(|_| bad(block_at, "negative size"))?,
            };
            match typeflag {
                b'0' | 0 | b'7' => h.size = size,
                // Header-only types carry no payload whatever their size field says.
                b'1' | b'2' | b'3' | b'4' | b'5' | b'6' => {}
                other => {
                    return Err(Error::UnsupportedTar {
                        path: h.name,
                        reason: format!("tar type {:?}", other as char),
                    });
                }
            }
            h.raw = raw;
            self.data_left = h.size;
            self.pad_left = h.padding();
            debug_assert_eq!(start + h.raw.len() as u64, self.pos);
            return Ok(Some(h));
        }
    }
}

/// A ustar header block for a regular file we add (TOC, landmarks).
pub(crate) fn reg_header(name: &str, size: u64) -> Result<[u8; BLOCK]> {
    if name.len() > 100 || size >= 1 << 33 {
        return Err(Error::BadOption(format!(
            "cannot write a plain ustar header for {name:?} ({size} bytes)"
        )));
    }
    let mut b = [0u8; BLOCK];
    b[..name.len()].copy_from_slice(name.as_bytes());
    b[100..108].copy_from_slice(b"0000644\0");
    b[108..116].copy_from_slice(b"0000000\0");
    b[116..124].copy_from_slice(b"0000000\0");
    b[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    b[136..148].copy_from_slice(b"00000000000\0");
    b[156] = b'0';
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    b[148..156].copy_from_slice(b"        ");
    let sum: u32 = b.iter().map(|&x| x as u32).sum();
    b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(data: &[u8]) -> Result<Vec<(TarHeader, Vec<u8>)>> {
        let mut tr = TarReader::new(data);
        let mut out = Vec::new();
        while let Some(h) = tr.next_header()? {
            let mut body = vec![0u8; h.size as usize];
            let mut got = 0;
            while got < body.len() {
                got += tr.read_data(&mut body[got..])?;
            }
            out.push((h, body));
        }
        Ok(out)
    }

    #[test]
    fn reads_what_the_tar_crate_writes_including_long_names_and_xattrs() {
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/file", "d".repeat(150));
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o600);
        h.set_mtime(1_600_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, &long, &b"hello"[..]).unwrap();
        b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v\x00\xff"[..])])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "link", "target").unwrap();
        let data = b.into_inner().unwrap();
        let entries = read_all(&data).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0.name, long);
        assert_eq!(entries[0].1, b"hello");
        assert_eq!(entries[0].0.mode, 0o600);
        assert_eq!(entries[0].0.mtime.secs, 1_600_000_000);
        assert_eq!(entries[1].0.typeflag, b'2');
        assert_eq!(entries[1].0.link_name, "target");
        assert_eq!(
            entries[1].0.xattrs,
            vec![("user.k".to_string(), b"v\x00\xff".to_vec())]
        );
        // Raw bytes plus payloads and padding rebuild the stream exactly.
        let mut tr = TarReader::new(&data[..]);
        let mut rebuilt = Vec::new();
        while let Some(h) = tr.next_header().unwrap() {
            rebuilt.extend_from_slice(&h.raw);
            let mut body = vec![0u8; h.size as usize];
            tr.read_data(&mut body).unwrap();
            rebuilt.extend_from_slice(&body);
            rebuilt.extend_from_slice(&tr.read_padding().unwrap());
        }
        rebuilt.extend_from_slice(&tr.end_raw);
        assert_eq!(rebuilt, data[..rebuilt.len()]);
    }

    #[test]
    fn rejects_truncated_and_corrupt_archives() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(1000);
        b.append_data(&mut h, "f", &[1u8; 1000][..]).unwrap();
        let data = b.into_inner().unwrap();
        assert!(matches!(read_all(&data[..700]), Err(Error::BadTar { .. })));
        assert!(matches!(read_all(&data[..300]), Err(Error::BadTar { .. })));
        let mut corrupt = data.clone();
        corrupt[10] ^= 0x55;
        assert!(matches!(read_all(&corrupt), Err(Error::BadTar { .. })));
    }

    #[test]
    fn built_headers_are_read_back() {
        let block = reg_header("stargz.index.json", 1234).unwrap();
        let mut data = block.to_vec();
        data.extend_from_slice(&vec![7u8; 1234]);
        data.resize(data.len().div_ceil(512) * 512 + 1024, 0);
        let entries = read_all(&data).unwrap();
        assert_eq!(entries[0].0.name, "stargz.index.json");
        assert_eq!(entries[0].1.len(), 1234);
        assert!(reg_header(&"x".repeat(101), 1).is_err());
    }

    #[test]
    fn parses_negative_and_fractional_pax_times() {
        let t = parse_pax_time("1.5", 0).unwrap();
        assert_eq!((t.secs, t.nanos), (1, 500_000_000));
        let t = parse_pax_time("-1.25", 0).unwrap();
        assert_eq!((t.secs, t.nanos), (-2, 750_000_000));
        assert!(parse_pax_time("x", 0).is_err());
    }
}
