//! Building an [`Index`] from TOC entries as they are parsed, one at a time: no entry is
//! kept as parsed, no path is kept whole, and the work is linear in the TOC's size, so
//! that a hostile TOC costs memory and time in proportion to its bytes (see
//! [`PARSE_MEMORY_FACTOR`]), and a parse can be stopped ([`Cancel`]).

mod chunks;
mod finish;
mod json;

use std::hash::BuildHasher;

use base64::Engine as _;
use hashbrown::HashTable;
use serde::de::DeserializeSeed;

use super::{EntryKind, Index, Node, Xattr, normalize_path};
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::footer::Format;
use crate::toc::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, Timestamp, Toc, TocEntry};
use chunks::{OpenFile, RawChunk};
use json::TocSeed;

/// Longest path an entry may have, in bytes: the kernel's `PATH_MAX` (4096) with its NUL.
/// No open inside a container can reach a file below it, and the limit bounds the
/// directories one entry can imply.
pub const MAX_PATH_LEN: usize = 4095;

/// A TOC may imply (name as parents without entries of their own) at most one
/// directory per this many bytes of its JSON: tar writers list directories, so real
/// layers imply few, and a crafted one cannot turn a short name into many nodes.
pub const BYTES_PER_IMPLIED_DIR: u64 = 64;

/// Building an index takes at most this many times the TOC JSON's size, besides the
/// JSON itself and the compressed TOC (measured worst case: entries of ~30 bytes, each
/// a node; see the README's "Hostile images").
pub const PARSE_MEMORY_FACTOR: u64 = 8;

/// How many entries or nodes go by between two looks at the [`Cancel`] flag.
const CANCEL_EVERY: usize = 4096;

/// Collects nodes as entries arrive; [`Builder::finish`] orders them into an [`Index`].
pub(super) struct Builder<'c> {
    format: Format,
    cancel: &'c Cancel,
    /// Every node so far, in arrival order; 0 is the root. While building, `parent` is an
    /// arrival index, `name_off`/`name_len` point into `names`, and `a`/`b` hold, for a
    /// file, its range in `raw_chunks` and, for a hardlink, its target in `links`.
    nodes: Vec<Node>,
    names: Vec<u8>,
    links: Vec<u8>,
    /// (parent, name) → arrival index.
    table: HashTable<u32>,
    hasher: std::hash::RandomState,
    raw_chunks: Vec<RawChunk>,
    /// The final index's strings and xattrs; link targets and xattrs go straight there.
    strings: Vec<u8>,
    xattrs: Vec<Xattr>,
    file: Option<OpenFile>,
    implied: u64,
    max_implied: u64,
    seen: usize,
    prefetch_landmark: Option<u32>,
    no_prefetch_landmark: bool,
}

fn nonneg_u32(v: i64, path: &str, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::bad_entry(path, format!("{what} {v} out of range")))
}

fn nonneg_u64(v: i64, path: &str, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::bad_entry(path, format!("negative {what} {v}")))
}

fn push_bytes(table: &mut Vec<u8>, s: &[u8], path: &str) -> Result<(u32, u32)> {
    let off = u32::try_from(table.len())
        .map_err(|_| Error::bad_entry(path, "string table over 4 GiB"))?;
    let len = u32::try_from(s.len()).map_err(|_| Error::bad_entry(path, "string over 4 GiB"))?;
    table.extend_from_slice(s);
    Ok((off, len))
}

fn new_dir(parent: u32, name_off: u32, name_len: u16) -> Node {
    Node {
        size: 0,
        mtime_secs: 0,
        name_off,
        parent,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_nanos: 0,
        a: 0,
        b: 0,
        xattr_first: 0,
        name_len,
        xattr_count: 0,
        nlink: 1,
        kind: EntryKind::Dir,
    }
}

impl<'c> Builder<'c> {
    /// `json_len` is the TOC's size, which bounds the directories it may imply (None:
    /// not bounded, for TOCs this program wrote).
    pub(super) fn new(format: Format, json_len: Option<u64>, cancel: &'c Cancel) -> Self {
        let max_implied = json_len.map_or(u64::MAX, |len| {
            (len / BYTES_PER_IMPLIED_DIR).max(CANCEL_EVERY as u64)
        });
        // Room for as many nodes as the JSON can name (an entry takes 24 bytes or more,
        // an implied directory 64): growing the table would hash every name again.
        let slots = json_len.map_or(0, |len| len / 24 + len / BYTES_PER_IMPLIED_DIR);
        Builder {
            format,
            cancel,
            nodes: vec![new_dir(0, 0, 0)],
            names: Vec::new(),
            links: Vec::new(),
            table: HashTable::with_capacity(usize::try_from(slots).unwrap_or(0)),
            hasher: std::hash::RandomState::new(),
            raw_chunks: Vec::new(),
            strings: Vec::new(),
            xattrs: Vec::new(),
            file: None,
            implied: 0,
            max_implied,
            seen: 0,
            prefetch_landmark: None,
            no_prefetch_landmark: false,
        }
    }

    fn name_of(&self, i: u32) -> &[u8] {
        let n = &self.nodes[i as usize];
        &self.names[n.name_off as usize..n.name_off as usize + n.name_len as usize]
    }

    fn find(&self, parent: u32, name: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash_one((parent, name));
        self.table
            .find(hash, |&i| {
                self.nodes[i as usize].parent == parent && self.name_of(i) == name
            })
            .copied()
    }

    /// A new node under `parent` named `name`, with `node`'s attributes.
    fn insert(&mut self, parent: u32, name: &str, mut node: Node, path: &str) -> Result<u32> {
        let id = u32::try_from(self.nodes.len()).map_err(|_| Error::bad_toc("too many entries"))?;
        let (off, len) = push_bytes(&mut self.names, name.as_bytes(), path)?;
        node.parent = parent;
        node.name_off = off;
        node.name_len =
            u16::try_from(len).map_err(|_| Error::bad_entry(path, "name component too long"))?;
        self.nodes.push(node);
        let hash = self.hasher.hash_one((parent, name.as_bytes()));
        let (nodes, names) = (&self.nodes, &self.names);
        self.table.insert_unique(hash, id, |&i| {
            let n = &nodes[i as usize];
            let name = &names[n.name_off as usize..n.name_off as usize + n.name_len as usize];
            self.hasher.hash_one((n.parent, name))
        });
        Ok(id)
    }

    /// The node of `path`'s parent directory, made (implied) where the TOC has none.
    fn parent_of(&mut self, path: &str) -> Result<(u32, usize)> {
        let mut parent = 0u32;
        let Some(last_slash) = path.rfind('/') else {
            return Ok((0, 0));
        };
        let mut start = 0;
        for comp in path[..last_slash].split('/') {
            parent = match self.find(parent, comp.as_bytes()) {
                Some(i) => i,
                None => {
                    self.implied += 1;
                    if self.implied > self.max_implied {
                        return Err(Error::bad_toc(format!(
                            "it implies over {} directories that have no entry of their own \
                             (at most one per {BYTES_PER_IMPLIED_DIR} bytes of TOC)",
                            self.max_implied
                        )));
                    }
                    self.insert(parent, comp, new_dir(0, 0, 0), &path[..start + comp.len()])?
                }
            };
            start += comp.len() + 1;
        }
        Ok((parent, last_slash + 1))
    }

    /// Takes one TOC entry, in TOC order.
    pub(super) fn push(&mut self, e: &TocEntry) -> Result<()> {
        self.seen += 1;
        if self.seen.is_multiple_of(CANCEL_EVERY) {
            self.cancel.check()?;
        }
        if e.kind == "chunk" {
            return self.push_chunk_entry(e);
        }
        self.close_file()?;
        let kind = EntryKind::from_toc(&e.kind)
            .ok_or_else(|| Error::bad_entry(&e.name, format!("unknown type {:?}", e.kind)))?;
        let path = normalize_path(&e.name)?;
        let node = self.node_of(kind, e, &path)?;
        let id = if path.is_empty() {
            if kind != EntryKind::Dir {
                return Err(Error::bad_entry(&e.name, "root is not a directory"));
            }
            self.nodes[0] = Node {
                parent: 0,
                name_off: 0,
                name_len: 0,
                ..node
            };
            0
        } else {
            let (parent, base_at) = self.parent_of(&path)?;
            let base = &path[base_at..];
            match self.find(parent, base.as_bytes()) {
                // A later entry for the same path replaces the earlier one (or the
                // directory an earlier entry implied).
                Some(i) => {
                    let old = self.nodes[i as usize];
                    self.nodes[i as usize] = Node {
                        parent: old.parent,
                        name_off: old.name_off,
                        name_len: old.name_len,
                        ..node
                    };
                    i
                }
                None => self.insert(parent, base, node, &path)?,
            }
        };
        if id != 0 && self.nodes[id as usize].parent == 0 {
            let base = path.as_str();
            if base == PREFETCH_LANDMARK {
                self.prefetch_landmark = Some(id);
            } else if base == NO_PREFETCH_LANDMARK {
                self.no_prefetch_landmark = true;
            }
        }
        if kind == EntryKind::Reg {
            self.open_file(id, e, path)?;
        }
        Ok(())
    }

    /// The node an entry describes (parent and name are set by the caller).
    fn node_of(&mut self, kind: EntryKind, e: &TocEntry, path: &str) -> Result<Node> {
        let mut node = new_dir(0, 0, 0);
        node.kind = kind;
        node.mode = (nonneg_u64(e.mode, path, "mode")? & 0o7777) as u32;
        node.uid = nonneg_u32(e.uid, path, "uid")?;
        node.gid = nonneg_u32(e.gid, path, "gid")?;
        if !e.modtime.is_empty() {
            let t = Timestamp::parse_rfc3339(&e.modtime)
                .map_err(|_| Error::bad_entry(path, format!("bad modtime {:?}", e.modtime)))?;
            node.mtime_secs = t.secs;
            node.mtime_nanos = t.nanos;
        }
        match kind {
            EntryKind::Reg => node.size = nonneg_u64(e.size, path, "size")?,
            EntryKind::Symlink => {
                if e.link_name.is_empty() {
                    return Err(Error::bad_entry(path, "symlink without linkName"));
                }
                (node.a, node.b) = push_bytes(&mut self.strings, e.link_name.as_bytes(), path)?;
            }
            EntryKind::Hardlink => {
                if e.link_name.is_empty() {
                    return Err(Error::bad_entry(path, "hardlink without linkName"));
                }
                (node.a, node.b) = push_bytes(&mut self.links, e.link_name.as_bytes(), path)?;
            }
            EntryKind::Char | EntryKind::Block => {
                node.a = nonneg_u32(e.dev_major, path, "devMajor")?;
                node.b = nonneg_u32(e.dev_minor, path, "devMinor")?;
            }
            EntryKind::Dir | EntryKind::Fifo => {}
        }
        node.xattr_count =
            u16::try_from(e.xattrs.len()).map_err(|_| Error::bad_entry(path, "too many xattrs"))?;
        node.xattr_first = u32::try_from(self.xattrs.len())
            .map_err(|_| Error::bad_entry(path, "too many xattrs"))?;
        for (k, v) in &e.xattrs {
            let value = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|_| Error::bad_entry(path, format!("xattr {k:?} is not base64")))?;
            let (off, key_len) = push_bytes(&mut self.strings, k.as_bytes(), path)?;
            let (_, val_len) = push_bytes(&mut self.strings, &value, path)?;
            self.xattrs.push(Xattr {
                off,
                key_len,
                val_len,
            });
        }
        Ok(node)
    }

    fn check_cancel(&self, i: usize) -> Result<()> {
        if i.is_multiple_of(CANCEL_EVERY) {
            self.cancel.check()?;
        }
        Ok(())
    }

    /// A node's path, for error messages.
    fn path_of(&self, mut i: u32) -> String {
        let mut parts = Vec::new();
        while i != 0 && parts.len() < self.nodes.len() {
            parts.push(String::from_utf8_lossy(self.name_of(i)).into_owned());
            i = self.nodes[i as usize].parent;
        }
        parts.reverse();
        parts.join("/")
    }
}

impl Index {
    /// Builds the index from a parsed TOC. `payload_end` is where file payloads end in
    /// the blob (the TOC's offset); every chunk must lie before it.
    pub fn from_toc(toc: &Toc, payload_end: u64, format: Format) -> Result<Index> {
        if toc.version != 1 {
            return Err(Error::bad_toc(format!(
                "version {}, only 1 is known",
                toc.version
            )));
        }
        let cancel = Cancel::default();
        let mut builder = Builder::new(format, None, &cancel);
        for e in &toc.entries {
            builder.push(e)?;
        }
        builder.finish(payload_end)
    }

    /// Builds the index from entries in TOC order made elsewhere (a SOCI zTOC's),
    /// `source_len` (the size they were read from) bounding the directories they may
    /// imply as a TOC's size does.
    pub fn from_entries(
        entries: impl IntoIterator<Item = TocEntry>,
        payload_end: u64,
        format: Format,
        source_len: u64,
        cancel: &Cancel,
    ) -> Result<Index> {
        let mut builder = Builder::new(format, Some(source_len), cancel);
        for e in entries {
            builder.push(&e)?;
        }
        builder.finish(payload_end)
    }

    /// Builds the index straight from the TOC's JSON, an entry at a time (no [`Toc`] is
    /// made): memory and time in proportion to the JSON's size, stopped when `cancel`
    /// is set.
    pub fn from_json(
        json: &[u8],
        payload_end: u64,
        format: Format,
        cancel: &Cancel,
    ) -> Result<Index> {
        let mut builder = Builder::new(format, Some(json.len() as u64), cancel);
        let mut failed = None;
        let mut de = serde_json::Deserializer::from_slice(json);
        let parsed = TocSeed {
            builder: &mut builder,
            failed: &mut failed,
        }
        .deserialize(&mut de)
        .and_then(|version| de.end().map(|()| version));
        let version = match (parsed, failed) {
            (_, Some(e)) => return Err(e),
            (Err(e), None) => return Err(Error::bad_toc(format!("TOC JSON: {e}"))),
            (Ok(v), None) => v,
        };
        if version != 1 {
            return Err(Error::bad_toc(format!(
                "version {version}, only 1 is known"
            )));
        }
        builder.finish(payload_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Sha256Sum;
    use crate::index::{MAX_CHUNK_SIZE, NodeId};

    fn reg(name: &str, size: i64, offset: i64, digest: &Sha256Sum) -> TocEntry {
        TocEntry {
            name: name.into(),
            kind: "reg".into(),
            size,
            offset,
            chunk_digest: digest.to_string(),
            digest: digest.to_string(),
            mode: 0o644,
            ..Default::default()
        }
    }

    fn toc(entries: Vec<TocEntry>) -> Toc {
        Toc {
            version: 1,
            entries,
            tar_split_digest: String::new(),
        }
    }

    #[test]
    fn normalizes_and_rejects_unsafe_names() {
        assert_eq!(normalize_path("./a//b/./c/").unwrap(), "a/b/c");
        assert_eq!(normalize_path("./").unwrap(), "");
        assert!(normalize_path("a/../../etc").is_err());
        assert!(normalize_path("/etc/passwd").is_err());
        assert!(normalize_path("..").is_err());
        let longest = "n".repeat(255);
        assert_eq!(
            normalize_path(&format!("d/{longest}")).unwrap(),
            format!("d/{longest}")
        );
        let err = normalize_path(&format!("d/{longest}x/f")).unwrap_err();
        assert!(err.to_string().contains("256 bytes"), "{err}");
        assert!(normalize_path("a\0b").is_err());
    }

    #[test]
    fn builds_tree_with_implicit_dirs_hardlinks_and_lookup() {
        let d = Sha256Sum::of(b"x");
        let mut link = TocEntry {
            name: "c/hl".into(),
            kind: "hardlink".into(),
            link_name: "a/b/f".into(),
            ..Default::default()
        };
        let t = toc(vec![
            reg("a/b/f", 1, 100, &d),
            TocEntry {
                name: "a/".into(),
                kind: "dir".into(),
                mode: 0o700,
                ..Default::default()
            },
            link.clone(),
            TocEntry {
                name: "c/sym".into(),
                kind: "symlink".into(),
                link_name: "../a".into(),
                ..Default::default()
            },
            TocEntry {
                name: "dev/null".into(),
                kind: "char".into(),
                dev_major: 1,
                dev_minor: 3,
                ..Default::default()
            },
        ]);
        let idx = Index::from_toc(&t, 1000, Format::Estargz).unwrap();
        let f = idx.lookup("a/b/f").unwrap();
        assert_eq!(idx.entry(f).size(), 1);
        assert_eq!(idx.entry(f).nlink(), 2);
        assert_eq!(idx.path_of(f), "a/b/f");
        assert_eq!(idx.entry(idx.lookup("a").unwrap()).mode(), 0o700);
        // Implicit "a/b" and "c" directories exist.
        assert_eq!(
            idx.entry(idx.lookup("/a/b").unwrap_or(NodeId(999))).kind(),
            EntryKind::Dir
        );
        let hl = idx.lookup("c/hl").unwrap();
        assert_eq!(idx.resolve(hl), f);
        assert_eq!(
            idx.entry(idx.lookup("c/sym").unwrap()).symlink_target(),
            Some("../a")
        );
        assert_eq!(
            idx.entry(idx.lookup("dev/null").unwrap()).device(),
            Some((1, 3))
        );
        let names: Vec<&str> = idx.root().children().map(|c| idx.entry(c).name()).collect();
        assert_eq!(names, ["a", "c", "dev"]);
        assert!(idx.lookup("a/nope").is_none());
        assert!(idx.lookup("../a").is_none());
        // The chunk runs to the TOC since nothing follows it.
        assert_eq!(idx.entry(f).chunks()[0].comp_end, 1000);

        link.link_name = "missing".into();
        let t = toc(vec![link]);
        assert!(Index::from_toc(&t, 1000, Format::Estargz).is_err());
    }

    #[test]
    fn rejects_bad_chunk_tables() {
        let d = Sha256Sum::of(b"x");
        let chunk = |off: i64, coff: i64, size: i64| TocEntry {
            name: "f".into(),
            kind: "chunk".into(),
            offset: off,
            chunk_offset: coff,
            chunk_size: size,
            chunk_digest: d.to_string(),
            ..Default::default()
        };
        let first = |size: i64| {
            let mut r = reg("f", 10, 100, &d);
            r.chunk_size = size;
            r
        };
        let ok = toc(vec![first(4), chunk(200, 4, 0)]);
        let idx = Index::from_toc(&ok, 1000, Format::Estargz).unwrap();
        let biggest = toc(vec![reg("f", MAX_CHUNK_SIZE as i64, 100, &d)]);
        Index::from_toc(&biggest, 1000, Format::Estargz).unwrap();
        let cs = idx.entry(idx.lookup("f").unwrap()).chunks();
        assert_eq!((cs[0].comp_end, cs[1].size), (200, 6));

        for (what, t, end) in [
            (
                "sizes do not add up",
                toc(vec![first(4), chunk(200, 4, 3)]),
                1000,
            ),
            ("gap", toc(vec![first(4), chunk(200, 5, 0)]), 1000),
            ("out of blob", toc(vec![first(4), chunk(2000, 4, 0)]), 1000),
            ("backwards", toc(vec![first(4), chunk(50, 4, 0)]), 1000),
            ("orphan chunk", toc(vec![chunk(200, 4, 0)]), 1000),
            ("negative size", toc(vec![reg("f", -1, 100, &d)]), 1000),
            ("no offset", toc(vec![reg("f", 3, 0, &d)]), 1000),
            ("dotdot", toc(vec![reg("../f", 1, 100, &d)]), 1000),
            ("absolute", toc(vec![reg("/f", 1, 100, &d)]), 1000),
            (
                "one chunk over the bound",
                toc(vec![reg("f", MAX_CHUNK_SIZE as i64 + 1, 100, &d)]),
                1000,
            ),
        ] {
            assert!(Index::from_toc(&t, end, Format::Estargz).is_err(), "{what}");
        }
        // zstd:chunked endOffset past the next file's frame overlaps it.
        let mut a = reg("a", 1, 100, &d);
        a.end_offset = 250;
        let b = reg("b", 1, 200, &d);
        let t = toc(vec![a, b]);
        assert!(Index::from_toc(&t, 1000, Format::ZstdChunked).is_err());
        // Two files claiming the same bytes of one member overlap.
        let t = toc(vec![reg("a", 5, 100, &d), reg("b", 5, 100, &d)]);
        assert!(Index::from_toc(&t, 1000, Format::Estargz).is_err());
        // Bad version.
        let mut t = toc(vec![]);
        t.version = 2;
        assert!(Index::from_toc(&t, 1000, Format::Estargz).is_err());
    }

    #[test]
    fn hundred_thousand_entries_stay_under_200_bytes_each() {
        let n = 100_000;
        let mut entries = Vec::with_capacity(n);
        for d in 0..100 {
            entries.push(TocEntry {
                name: format!("usr/share/dir{d:03}/"),
                kind: "dir".into(),
                mode: 0o755,
                modtime: "2024-01-01T00:00:00Z".into(),
                ..Default::default()
            });
        }
        for i in 0..n - 100 {
            let dg = Sha256Sum::of(&(i as u64).to_le_bytes());
            let mut e = reg(
                &format!("usr/share/dir{:03}/file-{i:06}.txt", i % 100),
                1000,
                100 + i as i64 * 600,
                &dg,
            );
            e.modtime = "2024-01-01T00:00:00Z".into();
            entries.push(e);
        }
        let t = toc(entries);
        let idx = Index::from_toc(&t, 100 + n as u64 * 600, Format::Estargz).unwrap();
        let per_entry = idx.bytes_per_entry();
        assert_eq!(per_entry, idx.heap_bytes() as f64 / idx.len() as f64);
        eprintln!("index: {} entries, {per_entry:.1} bytes/entry", idx.len());
        assert!(per_entry < 200.0, "{per_entry} bytes per entry");
        let f = idx.lookup("usr/share/dir007/file-000507.txt").unwrap();
        assert_eq!(idx.entry(f).size(), 1000);
        assert_eq!(
            idx.entry(idx.lookup("usr/share/dir007").unwrap())
                .children()
                .count(),
            999
        );
    }

    fn dir(name: &str) -> TocEntry {
        TocEntry {
            name: name.into(),
            kind: "dir".into(),
            ..Default::default()
        }
    }

    fn fifo(name: &str) -> TocEntry {
        TocEntry {
            name: name.into(),
            kind: "fifo".into(),
            ..Default::default()
        }
    }

    fn json_of(t: &Toc) -> Vec<u8> {
        serde_json::to_vec(t).unwrap()
    }

    #[test]
    fn nodes_are_ordered_by_parent_path_then_name_as_strings() {
        // '-' and '.' sort before '/': "a-b/c" comes before "a/c" although "a" < "a-b".
        let names = [
            "a/c", "a-b/c", "a", "a.b/x", "b", "a/b/c", "x/y/z", "a-b", "a/b", "a/b/d/e", "a0/q",
        ];
        let mut entries: Vec<TocEntry> = names.iter().map(|n| fifo(n)).collect();
        for d in ["a", "a-b", "a/b"] {
            let i = names.iter().position(|n| *n == d).unwrap();
            entries[i] = dir(d);
        }
        let t = toc(entries);
        let idx = Index::from_toc(&t, 1000, Format::Estargz).unwrap();
        let by_json =
            Index::from_json(&json_of(&t), 1000, Format::Estargz, &Cancel::new()).unwrap();
        let paths: Vec<String> = (0..idx.len())
            .map(|i| idx.path_of(NodeId(i as u32)))
            .collect();
        let json_paths: Vec<String> = (0..by_json.len())
            .map(|i| by_json.path_of(NodeId(i as u32)))
            .collect();
        assert_eq!(paths, json_paths);
        // The order as defined: the root, then (parent path, name) as strings.
        let mut expected = paths.clone();
        let split = |p: &str| match p.rfind('/') {
            Some(i) => (p[..i].to_string(), p[i + 1..].to_string()),
            None => (String::new(), p.to_string()),
        };
        expected[1..].sort_by_key(|p| split(p));
        assert_eq!(paths[0], "");
        assert_eq!(paths, expected);
        for p in ["a/b/d", "x", "x/y", "a.b", "a0"] {
            assert!(paths.iter().any(|q| q == p), "implied {p}");
        }
        for (i, p) in paths.iter().enumerate() {
            assert_eq!(idx.lookup(p), Some(NodeId(i as u32)), "{p}");
        }
    }

    #[test]
    fn a_later_entry_replaces_an_earlier_one_and_its_chunks() {
        let (d1, d2) = (Sha256Sum::of(b"1"), Sha256Sum::of(b"2"));
        let t = toc(vec![
            TocEntry {
                chunk_size: 5,
                ..reg("f", 10, 100, &d1)
            },
            TocEntry {
                name: "f".into(),
                kind: "chunk".into(),
                offset: 900,
                chunk_offset: 5,
                chunk_size: 5,
                chunk_digest: d1.to_string(),
                ..Default::default()
            },
            reg("f", 3, 300, &d2),
            reg("g", 4, 400, &d2),
        ]);
        let idx = Index::from_json(&json_of(&t), 1000, Format::Estargz, &Cancel::new()).unwrap();
        let f = idx.entry(idx.lookup("f").unwrap());
        assert_eq!(f.size(), 3);
        assert_eq!(f.chunks().len(), 1);
        // The replaced file's member at 900 no longer ends anyone's member: f's ends at g's.
        assert_eq!(
            (f.chunks()[0].comp_offset, f.chunks()[0].comp_end),
            (300, 400)
        );
        assert_eq!(
            idx.entry(idx.lookup("g").unwrap()).chunks()[0].comp_end,
            1000
        );
    }

    #[test]
    fn paths_over_path_max_are_refused_and_up_to_it_kept() {
        let longest = vec!["d"; MAX_PATH_LEN / 2 + 1].join("/");
        assert_eq!(longest.len(), MAX_PATH_LEN);
        let ok = toc(vec![fifo(&longest)]);
        let idx = Index::from_json(&json_of(&ok), 1000, Format::Estargz, &Cancel::new()).unwrap();
        assert_eq!(idx.len(), 2 + MAX_PATH_LEN / 2);
        let over = toc(vec![fifo(&format!("{longest}/ee"))]);
        let err =
            Index::from_json(&json_of(&over), 1000, Format::Estargz, &Cancel::new()).unwrap_err();
        assert!(err.to_string().contains("PATH_MAX"), "{err}");
        assert!(
            err.to_string().len() < 400,
            "the message shows a shortened path: {err}"
        );
    }

    #[test]
    fn a_cancelled_build_stops_with_cancelled() {
        let t = toc((0..10_000).map(|i| fifo(&format!("f{i}"))).collect());
        let cancel = Cancel::new();
        cancel.cancel();
        let err = Index::from_json(&json_of(&t), 1000, Format::Estargz, &cancel).unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err}");
        let dropped = Cancel::new();
        drop(dropped.on_drop());
        assert!(dropped.is_cancelled());
    }

    #[test]
    fn json_faults_are_bad_tocs() {
        for (json, says) in [
            (&br#"{"entries":[]}"#[..], "version"),
            (br#"{"version":2,"entries":[]}"#, "version 2"),
            (br#"{"version":1,"entries":[{"name":"a"}]}"#, "type"),
            (br#"{"version":1,"version":1}"#, "duplicate"),
            (br#"{"version":1,"entries":[]} x"#, "trailing"),
            (
                br#"{"version":1,"entries":[{"name":"a","type":"what"}]}"#,
                "unknown type",
            ),
        ] {
            let err = Index::from_json(json, 1000, Format::Estargz, &Cancel::new()).unwrap_err();
            assert!(err.to_string().contains(says), "{err} lacks {says:?}");
        }
        // Unknown fields are ignored, as Go's encoding/json does.
        let idx = Index::from_json(
            br#"{"version":1,"x":[1,{"y":2}],"entries":[{"name":"a","type":"dir","z":0}]}"#,
            1000,
            Format::Estargz,
            &Cancel::new(),
        )
        .unwrap();
        assert_eq!(idx.len(), 2);
    }
}
