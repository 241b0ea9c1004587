//! A zTOC: one gzip layer's table of contents in SOCI's FlatBuffers schema (soci's
//! `ztoc.fbs`): every tar entry's metadata and where its data starts in the inflated
//! tar, plus the inflater checkpoints and a digest per span of compressed bytes. Written
//! field by field in the order soci's marshaler writes them, so that the same zTOC
//! encodes to the same bytes as soci's.

use crate::flatbuffer::{Builder, ReadError, Reader, Table};

/// The only zTOC version there is.
pub const VERSION: &str = "0.9";

/// The schema's `CompressionAlgorithm`; a zTOC without one is gzip.
const GZIP: i8 = 1;
const UNCOMPRESSED: i8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    /// A plain tar layer: spans are ranges of the layer itself.
    Uncompressed,
}

/// One tar entry, as the layer's tar header (and PAX records) gave it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileMetadata {
    pub name: Vec<u8>,
    /// `reg`, `dir`, `symlink`, `hardlink`, `char`, `block` or `fifo`.
    pub kind: String,
    /// Where the entry's data starts in the inflated tar.
    pub uncompressed_offset: i64,
    pub uncompressed_size: i64,
    pub linkname: Vec<u8>,
    /// The tar header's mode field as it was (permission bits, maybe type bits too).
    pub mode: i64,
    pub uid: u32,
    pub gid: u32,
    pub uname: Vec<u8>,
    pub gname: Vec<u8>,
    /// RFC 3339 with nanoseconds as Go writes a time, e.g. `2024-05-01T10:00:00Z`.
    pub mod_time: String,
    pub devmajor: i64,
    pub devminor: i64,
    /// Every PAX record of the entry, sorted by key (the schema calls them xattrs; the
    /// extended attributes are the `SCHILY.xattr.` ones).
    pub pax_records: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ztoc {
    pub version: String,
    pub build_tool_identifier: String,
    pub compressed_archive_size: i64,
    pub uncompressed_archive_size: i64,
    pub files: Vec<FileMetadata>,
    pub compression: Compression,
    /// The number of spans less one.
    pub max_span_id: i32,
    /// `sha256:<hex>` of each span's compressed bytes.
    pub span_digests: Vec<String>,
    /// The checkpoint blob ([`crate::checkpoint_blob`]).
    pub checkpoints: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZtocError {
    #[error("not a zTOC: {0}")]
    Layout(#[from] ReadError),
    #[error("the zTOC has no {0}")]
    Missing(&'static str),
    #[error("the zTOC's {0} is not UTF-8")]
    NotText(&'static str),
    #[error("unknown compression algorithm {0}")]
    Compression(i8),
}

/// Field slots, in schema order.
mod slot {
    pub mod ztoc {
        pub const VERSION: usize = 0;
        pub const BUILD_TOOL: usize = 1;
        pub const COMPRESSED_SIZE: usize = 2;
        pub const UNCOMPRESSED_SIZE: usize = 3;
        pub const TOC: usize = 4;
        pub const COMPRESSION_INFO: usize = 5;
        pub const COUNT: usize = 6;
    }
    pub mod toc {
        pub const METADATA: usize = 0;
        pub const COUNT: usize = 1;
    }
    pub mod info {
        pub const ALGORITHM: usize = 0;
        pub const MAX_SPAN_ID: usize = 1;
        pub const SPAN_DIGESTS: usize = 2;
        pub const CHECKPOINTS: usize = 3;
        pub const COUNT: usize = 4;
    }
    pub mod file {
        pub const NAME: usize = 0;
        pub const TYPE: usize = 1;
        pub const UNCOMPRESSED_OFFSET: usize = 2;
        pub const UNCOMPRESSED_SIZE: usize = 3;
        pub const LINKNAME: usize = 4;
        pub const MODE: usize = 5;
        pub const UID: usize = 6;
        pub const GID: usize = 7;
        pub const UNAME: usize = 8;
        pub const GNAME: usize = 9;
        pub const MOD_TIME: usize = 10;
        pub const DEVMAJOR: usize = 11;
        pub const DEVMINOR: usize = 12;
        pub const XATTRS: usize = 13;
        pub const COUNT: usize = 14;
    }
    pub mod xattr {
        pub const KEY: usize = 0;
        pub const VALUE: usize = 1;
        pub const COUNT: usize = 2;
    }
}

pub fn encode(ztoc: &Ztoc) -> Vec<u8> {
    let mut b = Builder::default();
    let version = b.create_string(ztoc.version.as_bytes());
    let build_tool = b.create_string(ztoc.build_tool_identifier.as_bytes());
    let toc = encode_toc(&mut b, &ztoc.files);
    let checkpoints = b.create_byte_vector(&ztoc.checkpoints);
    let digests: Vec<u32> = ztoc
        .span_digests
        .iter()
        .map(|d| b.create_string(d.as_bytes()))
        .collect();
    let digests = b.create_offset_vector(&digests);

    use slot::info;
    b.start_table(info::COUNT);
    b.add_i32(info::MAX_SPAN_ID, ztoc.max_span_id, 0);
    b.add_offset(info::SPAN_DIGESTS, digests);
    b.add_offset(info::CHECKPOINTS, checkpoints);
    let algorithm = match ztoc.compression {
        Compression::Gzip => GZIP,
        Compression::Uncompressed => UNCOMPRESSED,
    };
    b.add_i8(info::ALGORITHM, algorithm, GZIP);
    let compression_info = b.end_table();

    use slot::ztoc as z;
    b.start_table(z::COUNT);
    b.add_offset(z::VERSION, version);
    b.add_offset(z::BUILD_TOOL, build_tool);
    b.add_offset(z::TOC, toc);
    b.add_i64(z::COMPRESSED_SIZE, ztoc.compressed_archive_size, 0);
    b.add_i64(z::UNCOMPRESSED_SIZE, ztoc.uncompressed_archive_size, 0);
    b.add_offset(z::COMPRESSION_INFO, compression_info);
    let root = b.end_table();
    b.finish(root)
}

fn encode_toc(b: &mut Builder, files: &[FileMetadata]) -> u32 {
    // soci writes the entries last first, each with its strings just before it.
    let mut entries = vec![0; files.len()];
    for (i, f) in files.iter().enumerate().rev() {
        entries[i] = encode_file(b, f);
    }
    let metadata = b.create_offset_vector(&entries);
    b.start_table(slot::toc::COUNT);
    b.add_offset(slot::toc::METADATA, metadata);
    b.end_table()
}

fn encode_file(b: &mut Builder, f: &FileMetadata) -> u32 {
    let name = b.create_string(&f.name);
    let kind = b.create_string(f.kind.as_bytes());
    let linkname = b.create_string(&f.linkname);
    let uname = b.create_string(&f.uname);
    let gname = b.create_string(&f.gname);
    let mod_time = b.create_string(f.mod_time.as_bytes());
    let records: Vec<u32> = f
        .pax_records
        .iter()
        .map(|(key, value)| {
            let key = b.create_string(key);
            let value = b.create_string(value);
            b.start_table(slot::xattr::COUNT);
            b.add_offset(slot::xattr::KEY, key);
            b.add_offset(slot::xattr::VALUE, value);
            b.end_table()
        })
        .collect();
    let records = b.create_offset_vector(&records);

    use slot::file as s;
    b.start_table(s::COUNT);
    b.add_offset(s::NAME, name);
    b.add_offset(s::TYPE, kind);
    b.add_i64(s::UNCOMPRESSED_OFFSET, f.uncompressed_offset, 0);
    b.add_i64(s::UNCOMPRESSED_SIZE, f.uncompressed_size, 0);
    b.add_offset(s::LINKNAME, linkname);
    b.add_i64(s::MODE, f.mode, 0);
    b.add_u32(s::UID, f.uid, 0);
    b.add_u32(s::GID, f.gid, 0);
    b.add_offset(s::UNAME, uname);
    b.add_offset(s::GNAME, gname);
    b.add_offset(s::MOD_TIME, mod_time);
    b.add_i64(s::DEVMAJOR, f.devmajor, 0);
    b.add_i64(s::DEVMINOR, f.devminor, 0);
    b.add_offset(s::XATTRS, records);
    b.end_table()
}

/// Reads a zTOC. Only its layout is checked here (every offset inside the buffer, no
/// data shared between fields); whether its entries and spans make sense for a layer is
/// the reader's business.
pub fn decode(buf: &[u8]) -> Result<Ztoc, ZtocError> {
    let r = Reader::new(buf);
    let root = r.root()?;
    use slot::ztoc as z;
    let toc = r
        .table_field(root, z::TOC)?
        .ok_or(ZtocError::Missing("TOC"))?;
    let info = r
        .table_field(root, z::COMPRESSION_INFO)?
        .ok_or(ZtocError::Missing("compression info"))?;
    let files = r
        .tables(toc, slot::toc::METADATA)?
        .into_iter()
        .map(|t| decode_file(&r, t))
        .collect::<Result<_, _>>()?;
    use slot::info as i;
    let compression = match r.i8(info, i::ALGORITHM, GZIP)? {
        GZIP => Compression::Gzip,
        UNCOMPRESSED => Compression::Uncompressed,
        other => return Err(ZtocError::Compression(other)),
    };
    let span_digests = r
        .strings(info, i::SPAN_DIGESTS)?
        .into_iter()
        .map(|d| text(d, "span digest"))
        .collect::<Result<_, _>>()?;
    Ok(Ztoc {
        version: text(r.bytes_field(root, z::VERSION)?, "version")?,
        build_tool_identifier: text(r.bytes_field(root, z::BUILD_TOOL)?, "build tool")?,
        compressed_archive_size: r.i64(root, z::COMPRESSED_SIZE, 0)?,
        uncompressed_archive_size: r.i64(root, z::UNCOMPRESSED_SIZE, 0)?,
        files,
        compression,
        max_span_id: r.u32(info, i::MAX_SPAN_ID, 0)? as i32,
        span_digests,
        checkpoints: r.bytes_field(info, i::CHECKPOINTS)?.to_vec(),
    })
}

fn decode_file(r: &Reader, t: Table) -> Result<FileMetadata, ZtocError> {
    use slot::file as s;
    let pax_records = r
        .tables(t, s::XATTRS)?
        .into_iter()
        .map(|x| {
            Ok((
                r.bytes_field(x, slot::xattr::KEY)?.to_vec(),
                r.bytes_field(x, slot::xattr::VALUE)?.to_vec(),
            ))
        })
        .collect::<Result<_, ReadError>>()?;
    Ok(FileMetadata {
        name: r.bytes_field(t, s::NAME)?.to_vec(),
        kind: text(r.bytes_field(t, s::TYPE)?, "entry type")?,
        uncompressed_offset: r.i64(t, s::UNCOMPRESSED_OFFSET, 0)?,
        uncompressed_size: r.i64(t, s::UNCOMPRESSED_SIZE, 0)?,
        linkname: r.bytes_field(t, s::LINKNAME)?.to_vec(),
        mode: r.i64(t, s::MODE, 0)?,
        uid: r.u32(t, s::UID, 0)?,
        gid: r.u32(t, s::GID, 0)?,
        uname: r.bytes_field(t, s::UNAME)?.to_vec(),
        gname: r.bytes_field(t, s::GNAME)?.to_vec(),
        mod_time: text(r.bytes_field(t, s::MOD_TIME)?, "modification time")?,
        devmajor: r.i64(t, s::DEVMAJOR, 0)?,
        devminor: r.i64(t, s::DEVMINOR, 0)?,
        pax_records,
    })
}

fn text(bytes: &[u8], what: &'static str) -> Result<String, ZtocError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| ZtocError::NotText(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Ztoc {
        let file = |name: &str, kind: &str, offset, size| FileMetadata {
            name: name.into(),
            kind: kind.into(),
            uncompressed_offset: offset,
            uncompressed_size: size,
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            uname: b"user".to_vec(),
            mod_time: "2024-05-01T10:00:00.5Z".into(),
            ..FileMetadata::default()
        };
        let mut link = file("bin/sh", "symlink", 2048, 0);
        link.linkname = b"dash".to_vec();
        link.pax_records = vec![
            (b"SCHILY.xattr.user.a".to_vec(), vec![0, 1, 2]),
            (b"path".to_vec(), b"bin/sh".to_vec()),
        ];
        Ztoc {
            version: VERSION.into(),
            build_tool_identifier: "lazysnap".into(),
            compressed_archive_size: 1234,
            uncompressed_archive_size: 10240,
            files: vec![
                file("bin/", "dir", 512, 0),
                link,
                file("bin/dash", "reg", 3072, 100_000),
            ],
            compression: Compression::Gzip,
            max_span_id: 1,
            span_digests: vec![format!("sha256:{}", "a".repeat(64)); 2],
            checkpoints: vec![7; 100],
        }
    }

    #[test]
    fn a_ztoc_reads_back_as_written() {
        let z = sample();
        assert_eq!(decode(&encode(&z)).unwrap(), z);
        let empty = Ztoc {
            files: Vec::new(),
            span_digests: Vec::new(),
            compression: Compression::Uncompressed,
            ..z
        };
        assert_eq!(decode(&encode(&empty)).unwrap(), empty);
    }

    #[test]
    fn truncated_or_damaged_ztocs_are_errors_not_panics() {
        let buf = encode(&sample());
        for len in 0..buf.len() {
            let _ = decode(&buf[..len]);
        }
        for at in 0..buf.len() {
            let mut bad = buf.clone();
            bad[at] ^= 0x80;
            let _ = decode(&bad);
        }
        assert!(decode(&buf[..buf.len() / 2]).is_err());
    }
}
