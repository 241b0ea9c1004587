//! Shared by the converter's integration tests: the test image, tree models of layers
//! (from a tar, from an eStargz/zstd:chunked reader, from a directory) to compare.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use estargz::{EntryKind, Layer, NodeId, OpenOptions, VecBlob};
use testkit::image::{Entry, Image, ImageBuilder, busybox_entries};

/// What the test image's command prints.
pub const GREETING: &str = "hello from a converted image";

/// A file bigger than the small chunk size tests use, with non-repeating content.
pub fn big_content() -> Vec<u8> {
    let mut x: u32 = 12345;
    (0..300_000)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect()
}

/// Entries of the layers on top of busybox: files, a big file, symlinks, hardlinks,
/// whiteouts and an opaque directory.
pub fn upper_layers() -> Vec<Vec<Entry>> {
    vec![
        vec![
            Entry::dir("etc/app"),
            Entry::file("etc/app/greeting", format!("{GREETING}\n")),
            Entry::file_mode("etc/app/run.sh", "#!/bin/sh\necho run\n", 0o755),
            Entry::file("etc/app/big.bin", big_content()),
            Entry::file("etc/app/empty", ""),
            Entry::hardlink("etc/app/greeting.link", "etc/app/greeting"),
            Entry::symlink("etc/app/current", "greeting"),
            Entry::dir("data/cache"),
            Entry::file("data/cache/old", "stale"),
            Entry::dir_mode("data/private", 0o700),
        ],
        vec![
            Entry::whiteout("bin/vi"),
            Entry::opaque("data/cache"),
            Entry::file("data/cache/new", "fresh"),
            Entry::file(&format!("data/{}", "long-name-".repeat(12)), "long"),
            Entry::hardlink("data/new.again", "data/cache/new"),
        ],
    ]
}

/// busybox plus [`upper_layers`], `cat /etc/app/greeting` as command.
pub fn test_image() -> Image {
    let mut b = ImageBuilder::new()
        .entries(&busybox_entries().unwrap())
        .unwrap();
    for l in upper_layers() {
        b = b.entries(&l).unwrap();
    }
    b.cmd(&["/bin/cat", "/etc/app/greeting"])
        .label("org.example.label", "kept")
        .annotation("org.example.annotation", "kept too")
        .build()
        .unwrap()
}

/// One entry as both tar and TOC can describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: char,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub link: String,
    pub content: Vec<u8>,
}

/// Names a tar or TOC gives directories (`a/`) normalised to `a`, without `./`.
fn norm(name: &str) -> String {
    name.trim_start_matches("./")
        .trim_end_matches('/')
        .to_string()
}

/// Names the eStargz writer adds.
pub fn is_stargz_meta(name: &str) -> bool {
    matches!(
        name,
        "stargz.index.json" | ".prefetch.landmark" | ".no.prefetch.landmark"
    )
}

pub fn gunzip_or_unzstd(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if data.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(data)
            .read_to_end(&mut out)
            .unwrap();
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::read::Decoder::new(data)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
    } else {
        out = data.to_vec();
    }
    out
}

/// The tree a tar describes (hardlink link names normalised).
pub fn tree_of_tar(tar: &[u8]) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut archive = tar::Archive::new(tar);
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = norm(&String::from_utf8_lossy(&e.path_bytes()));
        let h = e.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Regular | tar::EntryType::Continuous => 'f',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            tar::EntryType::Char => 'c',
            tar::EntryType::Block => 'b',
            tar::EntryType::Fifo => 'p',
            other => panic!("unexpected tar entry type {other:?}"),
        };
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        let link = if kind == 'h' { norm(&link) } else { link };
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        out.insert(
            name,
            Node {
                kind,
                mode: h.mode().unwrap() & 0o7777,
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mtime: h.mtime().unwrap(),
                link,
                content,
            },
        );
    }
    out
}

/// The tree an eStargz / zstd:chunked layer's reader sees, with every file read back
/// through verified chunk reads. Directories the TOC does not list explicitly (implied
/// parents) are left out, as they are from a tar.
pub async fn tree_of_layer(layer: &Layer, explicit: &[String]) -> BTreeMap<String, Node> {
    let index = layer.index();
    let mut out = BTreeMap::new();
    for i in 1..index.len() as u32 {
        let e = index.entry(NodeId(i));
        let path = index.path_of(e.id());
        if is_stargz_meta(&path) || (e.kind() == EntryKind::Dir && !explicit.contains(&path)) {
            continue;
        }
        let (kind, link, content) = match e.kind() {
            EntryKind::Dir => ('d', String::new(), Vec::new()),
            EntryKind::Reg => (
                'f',
                String::new(),
                layer.read_range(e.id(), 0, e.size()).await.unwrap(),
            ),
            EntryKind::Symlink => ('l', e.symlink_target().unwrap().to_string(), Vec::new()),
            EntryKind::Hardlink => ('h', index.path_of(e.hardlink_target().unwrap()), Vec::new()),
            EntryKind::Char => ('c', String::new(), Vec::new()),
            EntryKind::Block => ('b', String::new(), Vec::new()),
            EntryKind::Fifo => ('p', String::new(), Vec::new()),
        };
        out.insert(
            path,
            Node {
                kind,
                mode: e.mode(),
                uid: e.uid() as u64,
                gid: e.gid() as u64,
                mtime: e.mtime().secs as u64,
                link,
                content,
            },
        );
    }
    out
}

/// Opens a layer blob held in memory, checking the TOC digest when given.
pub async fn open_layer(blob: Vec<u8>, toc_digest: Option<&str>) -> Layer {
    let opts = OpenOptions {
        expected_toc_digest: toc_digest.map(|d| d.parse().unwrap()),
        ..OpenOptions::default()
    };
    Layer::open(Arc::new(VecBlob::new(blob)), &opts)
        .await
        .unwrap()
}

/// Checks that `layer` holds exactly the entries of `tar`, metadata and content.
pub async fn assert_layer_matches_tar(layer: &Layer, tar: &[u8]) {
    let want = tree_of_tar(tar);
    let dirs: Vec<String> = want
        .iter()
        .filter(|(_, n)| n.kind == 'd')
        .map(|(p, _)| p.clone())
        .collect();
    let got = tree_of_layer(layer, &dirs).await;
    let want_names: Vec<&String> = want.keys().collect();
    let got_names: Vec<&String> = got.keys().collect();
    assert_eq!(got_names, want_names, "entry names differ");
    for (path, w) in &want {
        assert_eq!(&got[path], w, "entry {path} differs");
    }
}

/// A directory tree as files on disk: type, mode, content, link target, and which
/// link count of files (hardlinks).
pub fn tree_of_dir(root: &Path) -> BTreeMap<String, (char, u32, Vec<u8>, String, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if is_stargz_meta(&rel) {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let (kind, content, link) = if ft.is_dir() {
                stack.push(p.clone());
                ('d', Vec::new(), String::new())
            } else if ft.is_symlink() {
                (
                    'l',
                    Vec::new(),
                    std::fs::read_link(&p)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                )
            } else {
                ('f', std::fs::read(&p).unwrap(), String::new())
            };
            // Hardlinks show as link counts above one.
            let nlink = if kind == 'f' { md.nlink() } else { 0 };
            out.insert(
                rel,
                (kind, md.permissions().mode() & 0o7777, content, link, nlink),
            );
        }
    }
    out
}
