//! The core without FUSE: inodes, attributes, directories, links, xattrs, statfs,
//! whiteouts, read-only answers, and reads that match the source.

use super::*;
use crate::{Error, FileKind, OPAQUE_XATTR, XattrReply};

#[test]
fn attributes_links_and_devices_match_the_tar() {
    for format in FORMATS {
        let (f, src) = fixture(format);
        let root = f.fs.getattr(1).unwrap();
        assert_eq!((root.ino, root.kind), (1, FileKind::Directory));
        // bin, etc, data, opaque: 2 + 4 subdirectories.
        assert_eq!(root.nlink, 6);

        let tool = f.fs.getattr(f.ino("bin/tool")).unwrap();
        assert_eq!(tool.kind, FileKind::RegularFile);
        assert_eq!(tool.mode(), libc::S_IFREG | 0o4755);
        assert_eq!((tool.uid, tool.gid, tool.size), (1000, 100, 5000));
        assert_eq!(tool.blocks, 5000u64.div_ceil(512));
        assert_eq!(tool.mtime.secs, MTIME as i64);

        let data = f.fs.getattr(f.ino("data")).unwrap();
        assert_eq!(data.mode(), libc::S_IFDIR | 0o700);

        // Hardlinks share the target's inode and count both names.
        let exact = f.fs.getattr(f.ino("data/exact")).unwrap();
        let hard = f.fs.getattr(f.ino("etc/hard")).unwrap();
        assert_eq!(exact.ino, hard.ino);
        assert_eq!((exact.nlink, hard.nlink), (2, 2));
        assert_eq!(hard.size, 2 * CHUNK);
        assert_eq!(f.read_all("etc/hard").unwrap(), src.files["data/exact"]);

        let link = f.fs.getattr(f.ino("bin/link")).unwrap();
        assert_eq!((link.kind, link.size), (FileKind::Symlink, 4));
        assert_eq!(f.fs.readlink(link.ino).unwrap(), "tool");
        assert_eq!(f.fs.readlink(tool.ino).unwrap_err().errno(), libc::EINVAL);

        let null = f.fs.getattr(f.ino("etc/null")).unwrap();
        assert_eq!(null.mode(), libc::S_IFCHR | 0o666);
        assert_eq!(null.rdev, (1 << 8) | 3);
        let blk = f.fs.getattr(f.ino("etc/blk")).unwrap();
        assert_eq!(blk.kind, FileKind::BlockDevice);
        // new_encode_dev(259, 300): minor's high bits move above the major.
        assert_eq!(blk.rdev, (300 & 0xff) | (259 << 8) | ((300 & !0xff) << 12));
        let fifo = f.fs.getattr(f.ino("etc/fifo")).unwrap();
        assert_eq!(fifo.mode(), libc::S_IFIFO | 0o644);

        // Lookups: missing names, non-directories, ".." and bad inode numbers.
        assert_eq!(f.fs.lookup(1, b"nope").unwrap_err().errno(), libc::ENOENT);
        assert_eq!(
            f.fs.lookup(tool.ino, b"x").unwrap_err().errno(),
            libc::ENOTDIR
        );
        assert_eq!(f.fs.lookup(data.ino, b"..").unwrap().ino, 1);
        assert_eq!(f.fs.lookup(1, b"..").unwrap().ino, 1);
        assert!(matches!(f.fs.getattr(0), Err(Error::NotFound)));
        assert!(matches!(f.fs.getattr(1 << 40), Err(Error::NotFound)));
        assert!(matches!(f.fs.lookup(1, b"\xff"), Err(Error::NotFound)));
        // The converter's landmark exists in the TOC but not in the filesystem.
        let toc_has_it =
            f.fs.layer()
                .index()
                .lookup(".no.prefetch.landmark")
                .is_some();
        assert_eq!(toc_has_it, format == OutputFormat::Estargz);
        assert!(matches!(
            f.fs.lookup(1, b".no.prefetch.landmark"),
            Err(Error::NotFound)
        ));
        let names: Vec<String> =
            f.fs.readdir(1, 0)
                .unwrap()
                .map(|e| e.name.to_string())
                .collect();
        assert_eq!(names, [".", "..", "bin", "data", "etc", "opaque"]);
    }
}

#[test]
fn inode_numbers_are_deterministic() {
    let (tar, _) = sample_tar();
    let blob = convert(&tar, OutputFormat::Estargz, &[]);
    let a = fixture_with(FaultBlob::new(blob.clone()), quiet_config(), 0);
    let b = fixture_with(FaultBlob::new(blob), quiet_config(), 0);
    for path in [
        "bin",
        "bin/tool",
        "etc/hard",
        "data/big",
        "etc/gone",
        "opaque/kept",
    ] {
        assert_eq!(a.ino(path), b.ino(path), "{path}");
    }
    // Inode = TOC node + 1: derivable without any table of ours.
    let index = a.fs.layer().index();
    let id = index.lookup("data/big").unwrap();
    assert_eq!(a.ino("data/big"), id.0 as u64 + 1);
}

fn listing(f: &Fixture, ino: u64, offset: u64) -> Vec<(String, u64, u64)> {
    f.fs.readdir(ino, offset)
        .unwrap()
        .map(|e| (e.name.to_string(), e.offset, e.attr.ino))
        .collect()
}

#[test]
fn readdir_lists_sorted_names_and_resumes_at_every_offset() {
    let (f, _) = fixture(OutputFormat::Estargz);
    let etc = f.ino("etc");
    let all = listing(&f, etc, 0);
    let names: Vec<&str> = all.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        // TOC order: the whiteout sorts by its stored name, ".wh.gone".
        [
            ".", "..", "gone", "attrs", "blk", "empty", "fifo", "hard", "null"
        ]
    );
    assert_eq!(all[1].2, 1, ".. of etc is the root");
    // Resuming after any entry yields exactly the rest.
    for (i, (_, off, _)) in all.iter().enumerate() {
        assert_eq!(listing(&f, etc, *off), all[i + 1..].to_vec());
    }
    // Inode numbers agree with lookup (hardlink shows its target's).
    for (name, _, ino) in &all[2..] {
        assert_eq!(f.fs.lookup(etc, name.as_bytes()).unwrap().ino, *ino);
    }
    assert!(listing(&f, etc, 1000).is_empty());
    let tool = f.ino("bin/tool");
    assert!(matches!(f.fs.readdir(tool, 0), Err(Error::NotDir)));
}

#[test]
fn whiteouts_and_opaque_directories_look_like_unpacked_overlay_layers() {
    for format in FORMATS {
        let (f, _) = fixture(format);
        let etc = f.ino("etc");
        let gone = f.fs.lookup(etc, b"gone").unwrap();
        assert_eq!(gone.kind, FileKind::CharDevice);
        assert_eq!((gone.rdev, gone.perm), (0, 0));
        // The raw names are hidden.
        for hidden in [&b".wh.gone"[..], b".wh..wh..opq"] {
            assert!(f.fs.lookup(etc, hidden).is_err());
        }
        let opaque = f.ino("opaque");
        let names: Vec<String> = listing(&f, opaque, 0).into_iter().map(|e| e.0).collect();
        assert_eq!(names, [".", "..", "kept"]);
        assert!(f.fs.lookup(opaque, b".wh..wh..opq").is_err());
        assert_eq!(
            f.fs.getxattr(opaque, OPAQUE_XATTR.as_bytes(), 10).unwrap(),
            XattrReply::Data(b"y".to_vec())
        );
        let mut list = OPAQUE_XATTR.as_bytes().to_vec();
        list.push(0);
        assert_eq!(f.fs.listxattr(opaque, 100).unwrap(), XattrReply::Data(list));
        // Other directories are not opaque.
        assert!(matches!(
            f.fs.getxattr(etc, OPAQUE_XATTR.as_bytes(), 10),
            Err(Error::NoXattr)
        ));
    }
}

#[test]
fn xattrs_follow_the_size_probe_protocol() {
    let (f, _) = fixture(OutputFormat::ZstdChunked);
    let ino = f.ino("etc/attrs");
    assert_eq!(
        f.fs.getxattr(ino, b"user.bin", 0).unwrap(),
        XattrReply::Size(3)
    );
    assert_eq!(
        f.fs.getxattr(ino, b"user.bin", 3).unwrap(),
        XattrReply::Data(b"\x00\x01\xff".to_vec())
    );
    assert_eq!(
        f.fs.getxattr(ino, b"user.bin", 2).unwrap_err().errno(),
        libc::ERANGE
    );
    assert_eq!(
        f.fs.getxattr(ino, b"user.none", 10).unwrap_err().errno(),
        libc::ENODATA
    );
    let names = b"user.bin\0user.color\0".to_vec();
    assert_eq!(
        f.fs.listxattr(ino, 0).unwrap(),
        XattrReply::Size(names.len() as u32)
    );
    assert_eq!(f.fs.listxattr(ino, 100).unwrap(), XattrReply::Data(names));
    assert_eq!(f.fs.listxattr(ino, 5).unwrap_err().errno(), libc::ERANGE);
    assert_eq!(
        f.fs.listxattr(f.ino("bin/tool"), 0).unwrap(),
        XattrReply::Size(0)
    );
}

#[test]
fn statfs_reports_the_cache_filesystem_and_writes_are_erofs() {
    // On a disk cache: the cache filesystem's own figures.
    let (f, _) = fixture(OutputFormat::Estargz);
    let s = f.fs.statfs();
    let disk = nix::sys::statvfs::statvfs(&f.dir.path().join("cache")).unwrap();
    assert_eq!((s.blocks, s.files), (disk.blocks(), disk.files()));
    assert_eq!(u64::from(s.frsize), disk.fragment_size());
    assert!(s.bfree > 0 && s.bavail > 0 && s.ffree > 0, "{s:?}");
    assert!(s.bavail <= s.bfree && s.bfree <= s.blocks && s.ffree <= s.files);
    // The free figures move with whatever else writes there: only roughly equal.
    let near = |a: u64, b: u64| a.abs_diff(b) <= a.max(b) / 100 + 1024;
    assert!(near(s.bavail, disk.blocks_available()), "{s:?} {disk:?}");
    assert!(near(s.ffree, disk.files_free()), "{s:?} {disk:?}");

    // A memory-only cache has no filesystem: the layer's own size, nothing free.
    let (tar, src) = sample_tar();
    let memory_only = fixture_with(
        FaultBlob::new(convert(&tar, OutputFormat::Estargz, &[])),
        quiet_config(),
        0,
    );
    let s = memory_only.fs.statfs();
    let content: u64 = src.files.values().map(|v| v.len() as u64).sum();
    assert_eq!(s.blocks, content.div_ceil(4096));
    assert_eq!(s.files, memory_only.fs.layer().index().len() as u64);
    assert_eq!((s.bsize, s.namelen, s.bfree, s.bavail), (4096, 255, 0, 0));

    let tool = f.ino("bin/tool");
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(f.fs.open(tool, flags).unwrap_err().errno(), libc::EROFS);
    }
    assert_eq!(f.fs.open(tool, libc::O_RDONLY).unwrap(), tool);
    assert_eq!(
        f.fs.open(1, libc::O_RDONLY).unwrap_err().errno(),
        libc::EISDIR
    );
    assert_eq!(f.fs.write_op().errno(), libc::EROFS);
}

#[test]
fn reads_return_exactly_the_source_bytes() {
    for format in FORMATS {
        let (f, src) = fixture(format);
        for (path, data) in &src.files {
            assert_eq!(&f.read_all(path).unwrap(), data, "{path} ({format:?})");
        }
        let big = &src.files["data/big"];
        let n = big.len() as u64;
        // Windows across chunk boundaries, at the end and past it.
        for (off, len) in [
            (0, 1),
            (CHUNK - 3, 10),
            (CHUNK, CHUNK as u32),
            (3 * CHUNK - 1, 2 * CHUNK as u32 + 2),
            (n - 5, 100),
            (n, 10),
            (n + 100, 10),
        ] {
            let got = f.read("data/big", off, len).unwrap();
            let lo = off.min(n) as usize;
            let hi = (off + len as u64).min(n) as usize;
            assert_eq!(&got[..], &big[lo..hi], "{off}+{len}");
        }
        assert_eq!(f.read("bin", 0, 10).unwrap_err().errno(), libc::EISDIR);
        assert_eq!(f.read("bin/link", 0, 10).unwrap_err().errno(), libc::EINVAL);
    }
}

#[test]
fn opens_are_logged_once_each_in_first_open_order_with_links_as_their_target() {
    let (f, _) = fixture(OutputFormat::Estargz);
    assert!(f.fs.accessed().is_empty());
    f.fs.open(f.ino("bin/tool"), libc::O_RDONLY).unwrap();
    f.fs.open(f.ino("etc/hard"), libc::O_RDONLY).unwrap();
    f.fs.open(f.ino("bin/tool"), libc::O_RDONLY).unwrap();
    // A refused open is no access.
    let _ = f.fs.open(f.ino("data/exact"), libc::O_WRONLY);
    let log = f.fs.accessed();
    let paths: Vec<&str> = log.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["bin/tool", "data/exact"]);
    assert!(log[0].first_open_us <= log[1].first_open_us && log[0].first_open_us > 0);
    assert_eq!((log[0].read_bytes, log[0].size), (0, 5000));
    // Reads count what the kernel asked for, within the file.
    f.read("bin/tool", 4000, 4096).unwrap();
    f.read("etc/hard", 0, 100).unwrap();
    let log = f.fs.accessed();
    assert_eq!((log[0].read_bytes, log[1].read_bytes), (1000, 100));
    assert_eq!(log[0].ranges, [4000..5000]);
    // Ranges merge where they touch or overlap and stay apart otherwise.
    f.read("bin/tool", 0, 10).unwrap();
    f.read("bin/tool", 3000, 1000).unwrap();
    f.read("bin/tool", 5, 10).unwrap();
    let log = f.fs.accessed();
    assert_eq!(log[0].ranges, [0..15, 3000..5000]);
    assert_eq!(log[0].read_bytes, 2015);
}

#[test]
fn a_file_read_at_random_keeps_a_bounded_list_of_ranges() {
    let (f, _) = fixture(OutputFormat::Estargz);
    f.fs.open(f.ino("data/big"), libc::O_RDONLY).unwrap();
    for i in 0..1000u64 {
        f.read("data/big", i * 300, 1).unwrap();
    }
    let log = f.fs.accessed();
    assert!(log[0].ranges.len() <= 256, "{}", log[0].ranges.len());
    // Joining keeps every byte read covered.
    for i in 0..1000u64 {
        assert!(log[0].ranges.iter().any(|r| r.contains(&(i * 300))));
    }
}
