//! The four footers that say where a layer's TOC is.

use crate::error::{Error, Result};

/// Size of the eStargz footer (an empty gzip member with an `SG` extra subfield).
pub const ESTARGZ_FOOTER_SIZE: u64 = 51;
/// Size of the CRFS (legacy stargz) footer.
pub const LEGACY_FOOTER_SIZE: u64 = 47;
/// Size of the containers/storage zstd:chunked footer data (inside an 8-byte frame header).
pub const ZSTD_CHUNKED_FOOTER_SIZE: u64 = 64;
/// Size of the stargz-snapshotter zstd:chunked footer data (inside an 8-byte frame header).
pub const STARGZ_ZSTD_FOOTER_SIZE: u64 = 40;
/// Bytes to fetch from the end of a blob to recognise any footer.
pub const MAX_FOOTER_FETCH: u64 = ZSTD_CHUNKED_FOOTER_SIZE + SKIPPABLE_HEADER_SIZE;

pub(crate) const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
pub(crate) const SKIPPABLE_HEADER_SIZE: u64 = 8;
const GNULINUX_MAGIC: &[u8; 8] = b"GNUlInUx";
const GNULINUX_OLD_MAGIC: &[u8; 8] = b"GnUlInUx";
const MANIFEST_TYPE_CRFS: u64 = 1;

/// The layer's format, as told by its footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// eStargz: gzip members, 51-byte footer.
    Estargz,
    /// CRFS stargz: gzip members, 47-byte footer.
    LegacyStargz,
    /// containers/storage zstd:chunked, 64-byte `GNUlInUx` footer.
    ZstdChunked,
    /// stargz-snapshotter's zstd:chunked, 40-byte `GnUlInUx` footer.
    StargzZstdChunked,
    /// An ordinary gzip layer read through a SOCI zTOC: no footer (a layer of this format
    /// has a made-up one: no TOC in the blob, payload to its end), and chunks are pieces
    /// of spans that the layer's [`crate::SpanSource`] inflates.
    Soci,
}

impl Format {
    pub fn is_zstd(self) -> bool {
        matches!(self, Format::ZstdChunked | Format::StargzZstdChunked)
    }

    /// The footer a SOCI layer of `blob_size` bytes stands behind: payload to the end.
    pub fn soci_footer(blob_size: u64) -> Footer {
        Footer {
            format: Format::Soci,
            toc_offset: blob_size,
            toc_compressed_size: 0,
            toc_uncompressed_size: None,
            payload_end: blob_size,
            tar_split: None,
            footer_size: 0,
        }
    }
}

/// What a footer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub format: Format,
    /// Offset of the TOC bytes: the gzip member (stargz) or the zstd-compressed manifest
    /// just after its skippable-frame header (zstd:chunked).
    pub toc_offset: u64,
    /// Compressed TOC length.
    pub toc_compressed_size: u64,
    /// Uncompressed TOC length, when the footer says it (zstd:chunked only).
    pub toc_uncompressed_size: Option<u64>,
    /// Where file payloads end and the TOC region begins.
    pub payload_end: u64,
    /// tar-split (offset, compressed length, uncompressed length), c/storage form only.
    pub tar_split: Option<(u64, u64, u64)>,
    /// Size of the footer in bytes, frame header included.
    pub footer_size: u64,
}

/// Parses the footer from `tail`, the last bytes of a blob of `blob_size` bytes (at most
/// [`MAX_FOOTER_FETCH`] are looked at). Tries the four forms, newest first.
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<Footer> {
    if (tail.len() as u64) > blob_size {
        return Err(Error::BadFooter {
            kind: "any",
            reason: format!("{} tail bytes from a {blob_size}-byte blob", tail.len()),
        });
    }
    let ends_with = |magic: &[u8]| tail.len() >= magic.len() && tail.ends_with(magic);
    if ends_with(GNULINUX_MAGIC) {
        return parse_zstd_chunked(tail, blob_size);
    }
    if ends_with(GNULINUX_OLD_MAGIC) {
        return parse_stargz_zstd(tail, blob_size);
    }
    if tail.len() as u64 >= ESTARGZ_FOOTER_SIZE {
        let f = &tail[tail.len() - ESTARGZ_FOOTER_SIZE as usize..];
        if f[10..12] == [26, 0] && &f[12..14] == b"SG" {
            return parse_gzip_footer(f, blob_size, Format::Estargz);
        }
    }
    if tail.len() as u64 >= LEGACY_FOOTER_SIZE {
        let f = &tail[tail.len() - LEGACY_FOOTER_SIZE as usize..];
        if f[10..12] == [22, 0] && &f[28..34] == b"STARGZ" {
            return parse_gzip_footer(f, blob_size, Format::LegacyStargz);
        }
    }
    Err(Error::NoFooter { blob_size })
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn check_skippable_header(tail: &[u8], data_len: u64, kind: &'static str) -> Result<()> {
    let need = (data_len + SKIPPABLE_HEADER_SIZE) as usize;
    if tail.len() < need {
        return Err(Error::BadFooter {
            kind,
            reason: format!("blob too small for a {need}-byte footer frame"),
        });
    }
    let h = &tail[tail.len() - need..];
    if h[..4] != SKIPPABLE_MAGIC || h[4..8] != (data_len as u32).to_le_bytes() {
        return Err(Error::BadFooter {
            kind,
            reason: "footer is not inside a zstd skippable frame of the right size".into(),
        });
    }
    Ok(())
}

fn check_toc_range(kind: &'static str, toc_offset: u64, toc_len: u64, limit: u64) -> Result<u64> {
    if toc_offset < SKIPPABLE_HEADER_SIZE {
        return Err(Error::BadFooter {
            kind,
            reason: format!("TOC offset {toc_offset} leaves no room for its frame header"),
        });
    }
    match toc_offset.checked_add(toc_len) {
        Some(end) if end <= limit => Ok(end),
        _ => Err(Error::BadFooter {
            kind,
            reason: format!("TOC range {toc_offset}+{toc_len} runs past the footer at {limit}"),
        }),
    }
}

fn parse_zstd_chunked(tail: &[u8], blob_size: u64) -> Result<Footer> {
    const KIND: &str = "zstd:chunked (GNUlInUx)";
    check_skippable_header(tail, ZSTD_CHUNKED_FOOTER_SIZE, KIND)?;
    let f = &tail[tail.len() - ZSTD_CHUNKED_FOOTER_SIZE as usize..];
    let (toc_offset, clen, ulen, mtype) = (le64(f, 0), le64(f, 8), le64(f, 16), le64(f, 24));
    let (ts_off, ts_clen, ts_ulen) = (le64(f, 32), le64(f, 40), le64(f, 48));
    if mtype != MANIFEST_TYPE_CRFS {
        return Err(Error::BadFooter {
            kind: KIND,
            reason: format!("manifest type {mtype}, only 1 (CRFS) is known"),
        });
    }
    let footer_size = ZSTD_CHUNKED_FOOTER_SIZE + SKIPPABLE_HEADER_SIZE;
    let footer_start = blob_size - footer_size;
    let toc_end = check_toc_range(KIND, toc_offset, clen, footer_start)?;
    // The tar-split frame, when there is one, sits between the manifest and the footer.
    let tar_split = if ts_off == 0 && ts_clen == 0 {
        None
    } else {
        match ts_off.checked_add(ts_clen) {
            Some(end) if ts_off >= toc_end + SKIPPABLE_HEADER_SIZE && end <= footer_start => {
                Some((ts_off, ts_clen, ts_ulen))
            }
            _ => {
                return Err(Error::BadFooter {
                    kind: KIND,
                    reason: format!("tar-split range {ts_off}+{ts_clen} is outside the blob"),
                });
            }
        }
    };
    Ok(Footer {
        format: Format::ZstdChunked,
        toc_offset,
        toc_compressed_size: clen,
        toc_uncompressed_size: Some(ulen),
        payload_end: toc_offset - SKIPPABLE_HEADER_SIZE,
        tar_split,
        footer_size,
    })
}

fn parse_stargz_zstd(tail: &[u8], blob_size: u64) -> Result<Footer> {
    const KIND: &str = "zstd:chunked (GnUlInUx)";
    check_skippable_header(tail, STARGZ_ZSTD_FOOTER_SIZE, KIND)?;
    let f = &tail[tail.len() - STARGZ_ZSTD_FOOTER_SIZE as usize..];
    let (toc_offset, clen, ulen, mtype) = (le64(f, 0), le64(f, 8), le64(f, 16), le64(f, 24));
    if mtype != MANIFEST_TYPE_CRFS {
        return Err(Error::BadFooter {
            kind: KIND,
            reason: format!("manifest type {mtype}, only 1 (CRFS) is known"),
        });
    }
    let footer_size = STARGZ_ZSTD_FOOTER_SIZE + SKIPPABLE_HEADER_SIZE;
    check_toc_range(KIND, toc_offset, clen, blob_size - footer_size)?;
    Ok(Footer {
        format: Format::StargzZstdChunked,
        toc_offset,
        toc_compressed_size: clen,
        toc_uncompressed_size: Some(ulen),
        payload_end: toc_offset - SKIPPABLE_HEADER_SIZE,
        tar_split: None,
        footer_size,
    })
}

fn parse_gzip_footer(f: &[u8], blob_size: u64, format: Format) -> Result<Footer> {
    let kind = match format {
        Format::Estargz => "eStargz",
        _ => "legacy stargz",
    };
    let bad = |reason: &str| Error::BadFooter {
        kind,
        reason: reason.to_string(),
    };
    // MTIME, XFL and OS vary between gzip writers; the rest is fixed.
    if f[0] != 0x1f || f[1] != 0x8b || f[2] != 8 || f[3] != 4 {
        return Err(bad("not a gzip header with only FEXTRA set"));
    }
    let payload = if format == Format::Estargz {
        if f[14..16] != [22, 0] {
            return Err(bad("SG subfield length is not 22"));
        }
        &f[16..38]
    } else {
        &f[12..34]
    };
    if &payload[16..22] != b"STARGZ" {
        return Err(bad("subfield does not end in STARGZ"));
    }
    let hex = std::str::from_utf8(&payload[..16]).map_err(|_| bad("TOC offset is not hex"))?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("TOC offset is not hex"));
    }
    let toc_offset = u64::from_str_radix(hex, 16).map_err(|_| bad("TOC offset is not hex"))?;
    let footer_size = f.len() as u64;
    let footer_start = blob_size - footer_size;
    if toc_offset >= footer_start {
        return Err(Error::BadFooter {
            kind,
            reason: format!("TOC offset {toc_offset} is not before the footer at {footer_start}"),
        });
    }
    Ok(Footer {
        format,
        toc_offset,
        toc_compressed_size: footer_start - toc_offset,
        toc_uncompressed_size: None,
        payload_end: toc_offset,
        tar_split: None,
        footer_size,
    })
}

/// The 51-byte eStargz footer pointing at `toc_offset`.
pub fn estargz_footer(toc_offset: u64) -> [u8; 51] {
    let mut f = [0u8; 51];
    f[..10].copy_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff]);
    f[10..12].copy_from_slice(&26u16.to_le_bytes());
    f[12..14].copy_from_slice(b"SG");
    f[14..16].copy_from_slice(&22u16.to_le_bytes());
    f[16..38].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // An empty final stored block, then CRC32 = 0 and ISIZE = 0.
    f[38..43].copy_from_slice(&[1, 0, 0, 0xff, 0xff]);
    f
}

/// The 47-byte CRFS footer pointing at `toc_offset` (written only by tests; readers
/// still meet it in old images).
pub fn legacy_stargz_footer(toc_offset: u64) -> [u8; 47] {
    let mut f = [0u8; 47];
    f[..10].copy_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff]);
    f[10..12].copy_from_slice(&22u16.to_le_bytes());
    f[12..34].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    f[34..39].copy_from_slice(&[1, 0, 0, 0xff, 0xff]);
    f
}

/// A zstd skippable frame holding `data`.
pub(crate) fn skippable_frame(data: &[u8]) -> Result<Vec<u8>> {
    let len = u32::try_from(data.len())
        .map_err(|_| Error::BadOption("skippable frame over 4 GiB".into()))?;
    let mut v = Vec::with_capacity(data.len() + 8);
    v.extend_from_slice(&SKIPPABLE_MAGIC);
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(data);
    Ok(v)
}

/// The containers/storage 64-byte footer, inside its skippable frame (72 bytes).
pub fn zstd_chunked_footer(
    toc_offset: u64,
    toc_clen: u64,
    toc_ulen: u64,
    tar_split: (u64, u64, u64),
) -> [u8; 72] {
    let mut f = [0u8; 72];
    f[..4].copy_from_slice(&SKIPPABLE_MAGIC);
    f[4..8].copy_from_slice(&64u32.to_le_bytes());
    let vals = [
        toc_offset,
        toc_clen,
        toc_ulen,
        MANIFEST_TYPE_CRFS,
        tar_split.0,
        tar_split.1,
        tar_split.2,
    ];
    for (i, v) in vals.iter().enumerate() {
        f[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
    }
    f[64..72].copy_from_slice(GNULINUX_MAGIC);
    f
}

/// The stargz-snapshotter 40-byte footer, inside its skippable frame (48 bytes).
pub fn stargz_zstd_footer(toc_offset: u64, toc_clen: u64, toc_ulen: u64) -> [u8; 48] {
    let mut f = [0u8; 48];
    f[..4].copy_from_slice(&SKIPPABLE_MAGIC);
    f[4..8].copy_from_slice(&40u32.to_le_bytes());
    for (i, v) in [toc_offset, toc_clen, toc_ulen, MANIFEST_TYPE_CRFS]
        .iter()
        .enumerate()
    {
        f[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
    }
    f[40..48].copy_from_slice(GNULINUX_OLD_MAGIC);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob_with(footer: &[u8], before: usize) -> Vec<u8> {
        let mut b = vec![0u8; before];
        b.extend_from_slice(footer);
        b
    }

    #[test]
    fn estargz_footer_round_trips_and_is_valid_gzip() {
        let f = estargz_footer(0x1234);
        let b = blob_with(&f, 0x2000);
        let p = parse_footer(&b[b.len() - 72..], b.len() as u64).unwrap();
        assert_eq!(p.format, Format::Estargz);
        assert_eq!(p.toc_offset, 0x1234);
        assert_eq!(p.toc_compressed_size, 0x2000 - 0x1234);
        // The footer is an empty gzip member that any gzip reader accepts.
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&f[..]), &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn legacy_footer_round_trips() {
        let f = legacy_stargz_footer(77);
        let b = blob_with(&f, 100);
        let p = parse_footer(&b[b.len() - 72..], b.len() as u64).unwrap();
        assert_eq!(p.format, Format::LegacyStargz);
        assert_eq!(p.toc_offset, 77);
        assert_eq!(p.footer_size, 47);
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&f[..]), &mut out).unwrap();
    }

    #[test]
    fn zstd_footers_round_trip() {
        let f = zstd_chunked_footer(108, 50, 200, (166, 20, 90));
        let b = blob_with(&f, 200);
        let p = parse_footer(&b[b.len() - 72..], b.len() as u64).unwrap();
        assert_eq!(p.format, Format::ZstdChunked);
        assert_eq!((p.toc_offset, p.toc_compressed_size), (108, 50));
        assert_eq!(p.toc_uncompressed_size, Some(200));
        assert_eq!(p.tar_split, Some((166, 20, 90)));
        assert_eq!(p.payload_end, 100);

        let f = stargz_zstd_footer(108, 50, 200);
        let b = blob_with(&f, 200);
        let p = parse_footer(&b[b.len() - 72..], b.len() as u64).unwrap();
        assert_eq!(p.format, Format::StargzZstdChunked);
        assert_eq!(p.toc_offset, 108);
    }

    #[test]
    fn bad_footers_are_rejected() {
        // Nothing recognisable.
        let b = [7u8; 100];
        assert!(matches!(
            parse_footer(&b[28..], 100),
            Err(Error::NoFooter { .. })
        ));
        // Non-hex offset.
        let mut f = estargz_footer(5);
        f[20] = b'z';
        let b = blob_with(&f, 10);
        assert!(matches!(
            parse_footer(&b, b.len() as u64),
            Err(Error::BadFooter { .. })
        ));
        // TOC offset pointing past the footer.
        let f = estargz_footer(1 << 40);
        let b = blob_with(&f, 10);
        assert!(matches!(
            parse_footer(&b, b.len() as u64),
            Err(Error::BadFooter { .. })
        ));
        // zstd manifest running past the footer.
        let f = zstd_chunked_footer(108, 5000, 200, (0, 0, 0));
        let b = blob_with(&f, 200);
        assert!(matches!(
            parse_footer(&b, b.len() as u64),
            Err(Error::BadFooter { .. })
        ));
        // Magic without its skippable frame header.
        let mut f = zstd_chunked_footer(108, 5, 20, (0, 0, 0));
        f[0] = 0;
        let b = blob_with(&f, 200);
        assert!(matches!(
            parse_footer(&b, b.len() as u64),
            Err(Error::BadFooter { .. })
        ));
        // A blob shorter than any footer.
        assert!(parse_footer(b"GnUlInUx", 8).is_err());
        assert!(parse_footer(b"", 0).is_err());
    }
}
