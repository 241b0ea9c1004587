//! The seed corpus: small valid inputs of every kind the targets take.

use std::io::Write;
use std::path::Path;

/// Writes the seed corpus: small valid inputs of every kind the targets take.
pub fn write_seeds(root: &Path) -> std::io::Result<()> {
    let tar = seed_tar()?;
    let mut layers = Vec::new();
    for format in [
        estargz::OutputFormat::Estargz,
        estargz::OutputFormat::ZstdChunked,
        estargz::OutputFormat::StargzZstdChunked,
    ] {
        let mut out = Vec::new();
        let opts = estargz::WriterOptions {
            format,
            chunk_size: 64,
            threads: 1,
            ..Default::default()
        };
        estargz::convert(&tar[..], &mut out, &opts).map_err(std::io::Error::other)?;
        layers.push((format!("{format:?}").to_lowercase(), out));
    }
    let write = |target: &str, name: &str, data: &[u8]| -> std::io::Result<()> {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::File::create(dir.join(format!("seed-{name}")))?.write_all(data)
    };
    write("tar", "plain", &[&[0u8][..], &tar].concat())?;
    write("tar", "zstd", &[&[1u8][..], &tar].concat())?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar)?;
    write("tar", "gzip", &[&[2u8][..], &gz.finish()?].concat())?;
    for (i, (name, blob)) in layers.iter().enumerate() {
        write("layer", name, blob)?;
        let tail = &blob[blob.len().saturating_sub(72)..];
        write("footer", name, tail)?;
        let f = estargz::parse_footer(tail, blob.len() as u64).map_err(std::io::Error::other)?;
        let toc_bytes =
            &blob[f.toc_offset as usize..(f.toc_offset + f.toc_compressed_size) as usize];
        let parsed = estargz::parse_toc(&f, toc_bytes, &Default::default())
            .map_err(std::io::Error::other)?;
        let json = serde_json::to_vec(&parsed.toc).map_err(std::io::Error::other)?;
        let format_byte = [0u8, 2, 3][i];
        let mut input = vec![format_byte];
        input.extend_from_slice(&f.payload_end.to_le_bytes());
        input.extend_from_slice(&json);
        write("toc", name, &input)?;
    }
    for (name, request) in fuse_requests() {
        write("fuse", name, &request)?;
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar)?;
    let gz = gz.finish()?;
    write("gzip_span", "gzip", &[&[1u8, 0][..], &gz].concat())?;
    let points = soci::build_checkpoints(&gz[..], 256).map_err(std::io::Error::other)?;
    let blob = soci::checkpoint_blob::encode(&soci::Checkpoints {
        span_size: 256,
        points,
    });
    write("gzip_span", "blob", &[&[0u8][..], &blob].concat())?;
    write(
        "gzip_span",
        "made-up",
        &[&[2u8, 3, 1, 2, 4][..], &gz[10..]].concat(),
    )?;
    let pyc = include_bytes!("../../fusefs/src/tests/data/imports_example.cpython-311.pyc");
    write("pyc", "example", &[&[0u8][..], &pyc[..]].concat())?;
    write("ztoc", "tar", &[&[1u8][..], &tar].concat())?;
    let mut layer = tempfile_in_memory(&gz)?;
    let z = soci::ztoc_builder::build_ztoc(&layer, 256, "lazysnap-fuzz")
        .map_err(std::io::Error::other)?;
    write("ztoc", "ztoc", &[&[0u8][..], &soci::ztoc::encode(&z)].concat())?;
    layer.flush()?;
    Ok(())
}

/// An unnamed file holding `bytes`, for builders that read files.
fn tempfile_in_memory(bytes: &[u8]) -> std::io::Result<std::fs::File> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("lazysnap-fuzz-seed-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    file.write_all(bytes)?;
    Ok(file)
}

/// One FUSE request: the 40-byte header the kernel writes, then `args`.
fn fuse_request(opcode: u32, unique: u64, nodeid: u64, args: &[u8]) -> Vec<u8> {
    let len = (40 + args.len()) as u32;
    let mut v = Vec::with_capacity(len as usize);
    v.extend_from_slice(&len.to_ne_bytes());
    v.extend_from_slice(&opcode.to_ne_bytes());
    v.extend_from_slice(&unique.to_ne_bytes());
    v.extend_from_slice(&nodeid.to_ne_bytes());
    v.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extension length
    v.extend_from_slice(args);
    v
}

/// Requests of each opcode the filesystem answers, on the seed layer's root (1).
fn fuse_requests() -> Vec<(&'static str, Vec<u8>)> {
    let read = |fh: u64, offset: u64, size: u32| {
        let mut a = Vec::new();
        a.extend_from_slice(&fh.to_ne_bytes());
        a.extend_from_slice(&offset.to_ne_bytes());
        a.extend_from_slice(&size.to_ne_bytes());
        a.extend_from_slice(&[0u8; 20]); // read flags, lock owner, flags, padding
        a
    };
    let getxattr = |size: u32, name: &[u8]| {
        let mut a = Vec::new();
        a.extend_from_slice(&size.to_ne_bytes());
        a.extend_from_slice(&0u32.to_ne_bytes());
        a.extend_from_slice(name);
        a.push(0);
        a
    };
    let flags = |f: u32| [f.to_ne_bytes(), 0u32.to_ne_bytes()].concat();
    vec![
        ("lookup", fuse_request(1, 1, 1, b"d\0")),
        ("getattr", fuse_request(3, 2, 1, &[0u8; 16])),
        ("readlink", fuse_request(5, 3, 4, &[])),
        ("open", fuse_request(14, 4, 3, &flags(0))),
        ("read", fuse_request(15, 5, 3, &read(0, 0, 4096))),
        ("statfs", fuse_request(17, 6, 1, &[])),
        ("getxattr", fuse_request(22, 7, 2, &getxattr(64, b"user.k"))),
        ("listxattr", fuse_request(23, 8, 2, &flags(64))),
        ("opendir", fuse_request(27, 9, 1, &flags(0))),
        ("readdir", fuse_request(28, 10, 1, &read(0, 0, 4096))),
        ("readdirplus", fuse_request(44, 11, 2, &read(0, 0, 4096))),
        ("access", fuse_request(34, 12, 1, &flags(4))),
        (
            "mkdir",
            fuse_request(9, 13, 1, b"\x00\x00\x00\x00\x00\x00\x00\x00new\0"),
        ),
    ]
}

/// A small tar with one entry of each kind, a long name and an xattr.
pub fn seed_tar() -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "d/", std::io::empty())?;
    b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..])])?;
    let content: Vec<u8> = (0..200u8).collect();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(content.len() as u64);
    b.append_data(&mut h, "d/f", &content[..])?;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "d/s", "f")?;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "d/h", "d/f")?;
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o600);
    h.set_size(3);
    b.append_data(&mut h, format!("d/{}", "n".repeat(120)), &b"abc"[..])?;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Fifo);
    h.set_size(0);
    b.append_data(&mut h, "d/p", std::io::empty())?;
    b.into_inner()
}
