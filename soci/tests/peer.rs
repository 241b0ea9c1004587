//! lazysnap's zTOCs against soci's own code (its `ztoc` package, built outside this
//! repository as a test peer: LAZYSNAP_SOCI_REF names the binary, with the subcommands
//! `ztoc-build [--span-size N] LAYER OUT` and `ztoc-extract ZTOC LAYER DIR`; unset, these
//! tests say so and pass). On layers of every tar form GNU tar and tar-rs write:
//! - the zTOC lazysnap builds is byte for byte the one soci builds (UTC, the same build
//!   tool string and span size);
//! - soci extracts every file right through lazysnap's zTOC;
//! - lazysnap reads every file right through soci's.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use soci::layout::Layout;

const SOCI_BUILD_TOOL: &str = "AWS SOCI CLI v0.2";

fn peer() -> Option<PathBuf> {
    match std::env::var_os("LAZYSNAP_SOCI_REF") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: LAZYSNAP_SOCI_REF does not name soci's reference binary");
            None
        }
    }
}

/// Layers to compare on: GNU tar in its pax, gnu and ustar forms over a tree with long
/// names, links, a fifo, a device, an xattr, a setuid file and sub-second times; and a
/// tar-rs archive.
fn layers(dir: &Path) -> Vec<PathBuf> {
    let src = dir.join("src");
    let long = "d".repeat(120);
    std::fs::create_dir_all(src.join(&long).join("deep")).unwrap();
    std::fs::write(src.join(&long).join("deep").join("y".repeat(90)), "hi\n").unwrap();
    let mut state = 7u64;
    let noise: Vec<u8> = (0..6_000_000)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        })
        .collect();
    std::fs::write(src.join("noise.bin"), &noise).unwrap();
    let text: String = (0..400_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(src.join("text.txt"), text).unwrap();
    std::fs::hard_link(src.join("text.txt"), src.join("hard.txt")).unwrap();
    std::os::unix::fs::symlink("text.txt", src.join("sym")).unwrap();
    let run = |cmd: &mut Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
    run(Command::new("mkfifo").arg(src.join("fifo")));
    run(Command::new("mknod")
        .arg(src.join("null"))
        .args(["c", "1", "3"]));
    run(Command::new("chmod")
        .args(["4755"])
        .arg(src.join("noise.bin")));
    run(Command::new("touch")
        .args(["-d", "2021-03-04 05:06:07.123456789"])
        .arg(src.join("text.txt")));
    let _ = Command::new("setfattr")
        .args(["-n", "user.note", "-v", "hello"])
        .arg(src.join("text.txt"))
        .status();
    let mut out = Vec::new();
    for form in ["pax", "gnu"] {
        let layer = dir.join(format!("{form}.tar.gz"));
        run(Command::new("tar")
            .arg(format!("--format={form}"))
            .args(["--xattrs", "-czf"])
            .arg(&layer)
            .arg("-C")
            .arg(&src)
            .arg("."));
        out.push(layer);
    }
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all("tree", &src).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&b.into_inner().unwrap()).unwrap();
    let layer = dir.join("tar-rs.tar.gz");
    std::fs::write(&layer, gz.finish().unwrap()).unwrap();
    out.push(layer);
    out
}

/// Every regular file of the tar inside `layer`, by path, with its sha256.
fn untarred(layer: &Path, dir: &Path) -> BTreeMap<String, String> {
    std::fs::create_dir_all(dir).unwrap();
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(layer)
        .arg("-C")
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
    let mut sums = BTreeMap::new();
    walk(dir, dir, &mut sums);
    sums
}

fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<String, String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let kind = e.file_type().unwrap();
        if kind.is_dir() {
            walk(root, &e.path(), into);
        } else if kind.is_file() {
            let rel = e
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            into.insert(
                rel,
                format!("{:x}", Sha256::digest(std::fs::read(e.path()).unwrap())),
            );
        }
    }
}

#[test]
fn ztocs_are_byte_identical_to_socis_and_each_reads_the_others_layers() {
    let Some(peer) = peer() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for layer in layers(dir.path()) {
        let name = layer.file_name().unwrap().to_string_lossy().into_owned();
        let want = untarred(&layer, &dir.path().join(format!("{name}.x")));
        for span in [4u64 << 20, 64 << 10] {
            let theirs_path = dir.path().join(format!("{name}.{span}.theirs"));
            let status = Command::new(&peer)
                .env("TZ", "UTC")
                .args(["ztoc-build", "--span-size", &span.to_string()])
                .arg(&layer)
                .arg(&theirs_path)
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "soci could not index {name}");
            let theirs = std::fs::read(&theirs_path).unwrap();
            let file = std::fs::File::open(&layer).unwrap();
            let ours = soci::ztoc::encode(
                &soci::ztoc_builder::build_ztoc(&file, span, SOCI_BUILD_TOOL).unwrap(),
            );
            assert!(ours == theirs, "{name}, span {span}: the zTOCs differ");

            // soci reads the layer through lazysnap's zTOC...
            let ours_path = dir.path().join(format!("{name}.{span}.ours"));
            std::fs::write(&ours_path, &ours).unwrap();
            let extracted = dir.path().join(format!("{name}.{span}.soci"));
            let status = Command::new(&peer)
                .arg("ztoc-extract")
                .arg(&ours_path)
                .arg(&layer)
                .arg(&extracted)
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "soci refused lazysnap's zTOC of {name}");
            let mut got = BTreeMap::new();
            walk(&extracted, &extracted, &mut got);
            // Hardlinks are entries of their own, not files soci extracts.
            let regular: std::collections::BTreeSet<String> = soci::ztoc::decode(&ours)
                .unwrap()
                .files
                .iter()
                .filter(|f| f.kind == "reg")
                .map(|f| {
                    String::from_utf8_lossy(&f.name)
                        .trim_start_matches("./")
                        .to_string()
                })
                .collect();
            let regular_once: BTreeMap<_, _> = want
                .iter()
                .filter(|(path, _)| regular.contains(*path))
                .map(|(p, s)| (p.clone(), s.clone()))
                .collect();
            assert_eq!(got, regular_once, "{name}: soci's extraction");

            // ...and lazysnap reads it through soci's.
            let layout = Layout::check(soci::ztoc::decode(&theirs).unwrap()).unwrap();
            let gz = std::fs::read(&layer).unwrap();
            let spans: Vec<Vec<u8>> = (0..layout.spans.len())
                .map(|i| {
                    let r = &layout.spans[i].compressed;
                    layout
                        .inflate_span(i, &gz[r.start as usize..r.end as usize])
                        .unwrap()
                })
                .collect();
            for (i, f) in layout.files.iter().enumerate() {
                if f.kind != "reg" {
                    continue;
                }
                let mut data = Vec::new();
                for p in layout.pieces(i) {
                    data.extend_from_slice(
                        &spans[p.span][p.span_offset as usize..(p.span_offset + p.len) as usize],
                    );
                }
                let path = String::from_utf8_lossy(&f.name)
                    .trim_start_matches("./")
                    .to_string();
                assert_eq!(
                    Some(&format!("{:x}", Sha256::digest(&data))),
                    want.get(&path),
                    "{name}: {path} through soci's zTOC"
                );
            }
        }
    }
}
