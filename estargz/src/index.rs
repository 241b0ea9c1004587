//! A compact in-memory index of a layer built from its TOC: flat sorted arrays and one
//! string table, so that 100,000 files cost a few megabytes, not a heap of nodes.

use std::collections::HashMap;

use base64::Engine as _;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::footer::Format;
use crate::toc::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, Timestamp, Toc, TocEntry};

/// An entry's position in the index. The root directory is [`NodeId::ROOT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl NodeId {
    pub const ROOT: NodeId = NodeId(0);
}

/// The type of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EntryKind {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

impl EntryKind {
    fn from_toc(kind: &str) -> Option<EntryKind> {
        Some(match kind {
            "dir" => EntryKind::Dir,
            "reg" => EntryKind::Reg,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char" => EntryKind::Char,
            "block" => EntryKind::Block,
            "fifo" => EntryKind::Fifo,
            _ => return None,
        })
    }
}

/// One chunk of a regular file: where its compressed bytes are and what they hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Blob offset of the gzip member / zstd frame that holds the chunk.
    pub comp_offset: u64,
    /// End of the compressed range to fetch (exclusive).
    pub comp_end: u64,
    /// Offset of the chunk inside the file.
    pub file_offset: u64,
    /// Decompressed size of the chunk.
    pub size: u64,
    /// sha256 of the chunk's decompressed bytes.
    pub digest: Digest,
    /// Decompressed bytes to skip in the member before the chunk starts.
    pub inner_offset: u32,
    /// zstd:chunked `chunkType: "zeros"`: the chunk is all zero bytes.
    pub zeros: bool,
    /// Marked by `lazysnap optimize` as read at start-up (`lazysnapPrefetch`).
    pub prefetch: bool,
}

impl Chunk {
    pub fn comp_len(&self) -> u64 {
        self.comp_end - self.comp_offset
    }
}

// Field order keeps the struct at 64 bytes. `a`/`b` mean, by kind: dir = first child and
// child count; reg = first chunk and chunk count; char/block = major and minor;
// symlink = target offset and length in the string table; hardlink = target node.
#[derive(Debug, Clone, Copy)]
struct Node {
    size: u64,
    mtime_secs: i64,
    name_off: u32,
    parent: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_nanos: u32,
    a: u32,
    b: u32,
    xattr_first: u32,
    name_len: u16,
    xattr_count: u16,
    nlink: u16,
    kind: EntryKind,
}

#[derive(Debug, Clone, Copy)]
struct Xattr {
    off: u32,
    key_len: u32,
    val_len: u32,
}

/// The layer's file tree and chunk table.
#[derive(Debug, Clone)]
pub struct Index {
    nodes: Vec<Node>,
    chunks: Vec<Chunk>,
    xattrs: Vec<Xattr>,
    strings: Vec<u8>,
    prefetch_landmark: Option<NodeId>,
    no_prefetch_landmark: bool,
}

/// A borrowed view of one entry.
#[derive(Clone, Copy)]
pub struct EntryRef<'a> {
    index: &'a Index,
    id: NodeId,
    node: &'a Node,
}

impl<'a> EntryRef<'a> {
    pub fn id(&self) -> NodeId {
        self.id
    }
    /// Base name; empty for the root.
    pub fn name(&self) -> &'a str {
        self.index
            .str_at(self.node.name_off, self.node.name_len as u32)
    }
    pub fn kind(&self) -> EntryKind {
        self.node.kind
    }
    /// Permission bits (with setuid, setgid, sticky), without the file type.
    pub fn mode(&self) -> u32 {
        self.node.mode
    }
    pub fn uid(&self) -> u32 {
        self.node.uid
    }
    pub fn gid(&self) -> u32 {
        self.node.gid
    }
    /// File size (regular files; the target's size for hardlinks; 0 otherwise).
    pub fn size(&self) -> u64 {
        self.node.size
    }
    pub fn mtime(&self) -> Timestamp {
        Timestamp {
            secs: self.node.mtime_secs,
            nanos: self.node.mtime_nanos,
        }
    }
    pub fn parent(&self) -> NodeId {
        NodeId(self.node.parent)
    }
    /// Number of names of a regular file (1 + hardlinks to it); 1 for other kinds.
    pub fn nlink(&self) -> u32 {
        self.node.nlink as u32
    }
    pub fn symlink_target(&self) -> Option<&'a str> {
        (self.node.kind == EntryKind::Symlink).then(|| self.index.str_at(self.node.a, self.node.b))
    }
    /// The regular file a hardlink names.
    pub fn hardlink_target(&self) -> Option<NodeId> {
        (self.node.kind == EntryKind::Hardlink).then_some(NodeId(self.node.a))
    }
    /// (major, minor) of a device node.
    pub fn device(&self) -> Option<(u32, u32)> {
        matches!(self.node.kind, EntryKind::Char | EntryKind::Block)
            .then_some((self.node.a, self.node.b))
    }
    /// Chunks of a regular file in file order (empty for other kinds and empty files).
    pub fn chunks(&self) -> &'a [Chunk] {
        if self.node.kind != EntryKind::Reg {
            return &[];
        }
        let (a, b) = (self.node.a as usize, self.node.b as usize);
        &self.index.chunks[a..a + b]
    }
    pub fn xattrs(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let index = self.index;
        let first = self.node.xattr_first as usize;
        index.xattrs[first..first + self.node.xattr_count as usize]
            .iter()
            .map(move |x| {
                let key = index.str_at(x.off, x.key_len);
                let v0 = x.off as usize + x.key_len as usize;
                (key, &index.strings[v0..v0 + x.val_len as usize])
            })
    }
    /// Children of a directory, sorted by name.
    pub fn children(&self) -> impl Iterator<Item = NodeId> + 'a {
        let range = if self.node.kind == EntryKind::Dir {
            self.node.a..self.node.a + self.node.b
        } else {
            0..0
        };
        range.map(NodeId)
    }
}

/// The largest chunk (uncompressed) a layer may have: each chunk is inflated and
/// verified whole in memory, so this bounds what one read costs. Converters write
/// 4 MiB (ctr-remote, lazysnap) or less (containers/storage); a layer with bigger
/// chunks is refused, and containerd pulls it the ordinary way.
pub const MAX_CHUNK_SIZE: u64 = 16 << 20;

/// Normalises a TOC or tar name: strips `./` and trailing `/`, drops `.` components;
/// rejects `..`, absolute names, NUL bytes and components longer than Linux allows (a
/// tree showing a name that no open can reach). The root is "".
pub fn normalize_path(name: &str) -> Result<String> {
    const NAME_MAX: usize = 255;
    let unsafe_path = |reason: &str| Error::UnsafePath {
        path: name.to_string(),
        reason: reason.to_string(),
    };
    if name.contains('\0') {
        return Err(unsafe_path("NUL byte in name"));
    }
    let trimmed = name.trim_start_matches("./");
    if trimmed.starts_with('/') {
        return Err(unsafe_path("absolute name"));
    }
    let mut out = String::with_capacity(trimmed.len());
    for comp in trimmed.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(unsafe_path("'..' component")),
            c if c.len() > NAME_MAX => {
                return Err(unsafe_path(&format!(
                    "a component of {} bytes (Linux allows {NAME_MAX})",
                    c.len()
                )));
            }
            c => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    Ok(out)
}

fn split_parent(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

fn nonneg_u32(v: i64, path: &str, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::bad_entry(path, format!("{what} {v} out of range")))
}

fn nonneg_u64(v: i64, path: &str, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::bad_entry(path, format!("negative {what} {v}")))
}

struct TmpFile {
    path: String,
    entry: usize,
    /// TOC indices of the `chunk` entries that follow a `reg`.
    chunk_entries: Vec<usize>,
}

/// A chunk before its compressed end is known.
struct RawChunk {
    offset: u64,
    explicit_end: Option<u64>,
    file_offset: u64,
    size: u64,
    inner: u32,
    digest: Digest,
    zeros: bool,
    prefetch: bool,
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
        // 1. Group chunk entries with their file; later duplicates replace earlier ones.
        let mut files: Vec<TmpFile> = Vec::new();
        let mut by_path: HashMap<String, usize> = HashMap::new();
        let mut last_reg: Option<usize> = None;
        for (i, e) in toc.entries.iter().enumerate() {
            if e.kind == "chunk" {
                let path = normalize_path(&e.name)?;
                match last_reg {
                    Some(f) if files[f].path == path => files[f].chunk_entries.push(i),
                    _ => return Err(Error::bad_entry(&e.name, "chunk entry without its file")),
                }
                continue;
            }
            if EntryKind::from_toc(&e.kind).is_none() {
                return Err(Error::bad_entry(
                    &e.name,
                    format!("unknown type {:?}", e.kind),
                ));
            }
            let path = normalize_path(&e.name)?;
            let tmp = TmpFile {
                path: path.clone(),
                entry: i,
                chunk_entries: Vec::new(),
            };
            let slot = match by_path.get(&path) {
                Some(&old) => {
                    files[old] = tmp;
                    old
                }
                None => {
                    files.push(tmp);
                    by_path.insert(path, files.len() - 1);
                    files.len() - 1
                }
            };
            last_reg = (e.kind == "reg").then_some(slot);
        }
        // 2. Implicit parent directories; the root always exists.
        let mut implicit: Vec<String> = Vec::new();
        let mut known: std::collections::HashSet<&str> =
            by_path.keys().map(String::as_str).collect();
        for f in &files {
            let mut p = f.path.as_str();
            while !p.is_empty() {
                p = split_parent(p).0;
                if !known.insert(p) {
                    break;
                }
                implicit.push(p.to_string());
            }
        }
        if !known.contains("") {
            implicit.push(String::new());
        }
        drop(known);
        for f in &files {
            if f.path.is_empty() && toc.entries[f.entry].kind != "dir" {
                return Err(Error::bad_entry(
                    &toc.entries[f.entry].name,
                    "root is not a directory",
                ));
            }
        }
        // 3. Sort by (parent path, name) so each directory's children are contiguous and
        //    sorted; the root comes first as node 0.
        enum Src {
            File(usize),
            Implicit,
        }
        let mut order: Vec<(&str, Src)> = Vec::with_capacity(files.len() + implicit.len());
        for (i, f) in files.iter().enumerate() {
            order.push((f.path.as_str(), Src::File(i)));
        }
        for p in &implicit {
            order.push((p.as_str(), Src::Implicit));
        }
        order.sort_by(|x, y| {
            (!x.0.is_empty(), split_parent(x.0)).cmp(&(!y.0.is_empty(), split_parent(y.0)))
        });
        if u32::try_from(order.len()).is_err() {
            return Err(Error::bad_toc("too many entries"));
        }
        let id_of: HashMap<&str, u32> = order
            .iter()
            .enumerate()
            .map(|(i, (p, _))| (*p, i as u32))
            .collect();

        let mut idx = Index {
            nodes: Vec::with_capacity(order.len()),
            chunks: Vec::new(),
            xattrs: Vec::new(),
            strings: Vec::new(),
            prefetch_landmark: None,
            no_prefetch_landmark: false,
        };
        let mut raw_chunks: Vec<(u32, Vec<RawChunk>)> = Vec::new();
        let mut hardlinks: Vec<(u32, String)> = Vec::new();
        for (i, (path, src)) in order.iter().enumerate() {
            let (parent_path, base) = split_parent(path);
            let parent = if path.is_empty() {
                0
            } else {
                *id_of
                    .get(parent_path)
                    .ok_or_else(|| Error::bad_entry(path, "parent missing"))?
            };
            let (name_off, name_len) = idx.push_str(base.as_bytes(), path)?;
            let name_len = u16::try_from(name_len)
                .map_err(|_| Error::bad_entry(path, "name component too long"))?;
            let mut node = Node {
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
                xattr_first: idx.xattrs.len() as u32,
                name_len,
                xattr_count: 0,
                nlink: 1,
                kind: EntryKind::Dir,
            };
            if let Src::File(f) = src {
                let file = &files[*f];
                let e = &toc.entries[file.entry];
                idx.fill_node(&mut node, e, path)?;
                match node.kind {
                    EntryKind::Reg => {
                        let chunks: Vec<&TocEntry> = std::iter::once(e)
                            .chain(file.chunk_entries.iter().map(|&c| &toc.entries[c]))
                            .collect();
                        raw_chunks.push((i as u32, file_chunks(&chunks, node.size, path, format)?));
                    }
                    EntryKind::Hardlink => hardlinks.push((i as u32, e.link_name.clone())),
                    _ => {}
                }
                if parent == 0 && !path.is_empty() {
                    if base == PREFETCH_LANDMARK {
                        idx.prefetch_landmark = Some(NodeId(i as u32));
                    } else if base == NO_PREFETCH_LANDMARK {
                        idx.no_prefetch_landmark = true;
                    }
                }
            }
            idx.nodes.push(node);
        }
        // 4. Children ranges: order puts siblings next to each other.
        let mut i = 1;
        while i < idx.nodes.len() {
            let p = idx.nodes[i].parent as usize;
            let start = i;
            while i < idx.nodes.len() && idx.nodes[i].parent as usize == p {
                i += 1;
            }
            let parent = &mut idx.nodes[p];
            if parent.kind != EntryKind::Dir {
                let path = idx.path_of(NodeId(start as u32));
                return Err(Error::bad_entry(&path, "parent is not a directory"));
            }
            parent.a = start as u32;
            parent.b = (i - start) as u32;
        }
        // 5. Chunks: compressed ends and overlap checks need all of them at once.
        idx.place_chunks(raw_chunks, payload_end)?;
        // 6. Hardlinks point at the node of their (non-directory) target.
        let link_of: HashMap<u32, &str> =
            hardlinks.iter().map(|(id, t)| (*id, t.as_str())).collect();
        for (id, target) in &hardlinks {
            let path = idx.path_of(NodeId(*id));
            let mut target: &str = target;
            let mut hops = 0;
            let t = loop {
                let norm = normalize_path(target)?;
                let t = *id_of.get(norm.as_str()).ok_or_else(|| {
                    Error::bad_entry(&path, format!("hardlink target {target:?} missing"))
                })?;
                match link_of.get(&t) {
                    Some(next) if hops < 64 => {
                        target = next;
                        hops += 1;
                    }
                    Some(_) => return Err(Error::bad_entry(&path, "hardlink chain does not end")),
                    None => break t,
                }
            };
            let target_node = idx.nodes[t as usize];
            if target_node.kind == EntryKind::Dir {
                return Err(Error::bad_entry(&path, "hardlink to a directory"));
            }
            let n = &mut idx.nodes[*id as usize];
            n.a = t;
            n.size = target_node.size;
            let tn = &mut idx.nodes[t as usize];
            tn.nlink = tn.nlink.saturating_add(1);
        }
        for id in 0..idx.nodes.len() {
            if idx.nodes[id].kind == EntryKind::Hardlink {
                let t = idx.nodes[id].a as usize;
                idx.nodes[id].nlink = idx.nodes[t].nlink;
            }
        }
        idx.nodes.shrink_to_fit();
        idx.chunks.shrink_to_fit();
        idx.xattrs.shrink_to_fit();
        idx.strings.shrink_to_fit();
        Ok(idx)
    }

    fn push_str(&mut self, s: &[u8], path: &str) -> Result<(u32, u32)> {
        let off = u32::try_from(self.strings.len())
            .map_err(|_| Error::bad_entry(path, "string table over 4 GiB"))?;
        let len =
            u32::try_from(s.len()).map_err(|_| Error::bad_entry(path, "string over 4 GiB"))?;
        self.strings.extend_from_slice(s);
        Ok((off, len))
    }

    fn str_at(&self, off: u32, len: u32) -> &str {
        let bytes = &self.strings[off as usize..off as usize + len as usize];
        // Only valid UTF-8 is ever pushed as a name or link target.
        std::str::from_utf8(bytes).unwrap_or("")
    }

    fn fill_node(&mut self, node: &mut Node, e: &TocEntry, path: &str) -> Result<()> {
        node.kind = EntryKind::from_toc(&e.kind)
            .ok_or_else(|| Error::bad_entry(path, format!("unknown type {:?}", e.kind)))?;
        node.mode = (nonneg_u64(e.mode, path, "mode")? & 0o7777) as u32;
        node.uid = nonneg_u32(e.uid, path, "uid")?;
        node.gid = nonneg_u32(e.gid, path, "gid")?;
        if !e.modtime.is_empty() {
            let t = Timestamp::parse_rfc3339(&e.modtime)
                .map_err(|_| Error::bad_entry(path, format!("bad modtime {:?}", e.modtime)))?;
            node.mtime_secs = t.secs;
            node.mtime_nanos = t.nanos;
        }
        match node.kind {
            EntryKind::Reg => node.size = nonneg_u64(e.size, path, "size")?,
            EntryKind::Symlink => {
                if e.link_name.is_empty() {
                    return Err(Error::bad_entry(path, "symlink without linkName"));
                }
                let (off, len) = self.push_str(e.link_name.as_bytes(), path)?;
                node.a = off;
                node.b = len;
            }
            EntryKind::Hardlink => {
                if e.link_name.is_empty() {
                    return Err(Error::bad_entry(path, "hardlink without linkName"));
                }
            }
            EntryKind::Char | EntryKind::Block => {
                node.a = nonneg_u32(e.dev_major, path, "devMajor")?;
                node.b = nonneg_u32(e.dev_minor, path, "devMinor")?;
            }
            EntryKind::Dir | EntryKind::Fifo => {}
        }
        let count =
            u16::try_from(e.xattrs.len()).map_err(|_| Error::bad_entry(path, "too many xattrs"))?;
        for (k, v) in &e.xattrs {
            let value = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|_| Error::bad_entry(path, format!("xattr {k:?} is not base64")))?;
            let (off, key_len) = self.push_str(k.as_bytes(), path)?;
            let (_, val_len) = self.push_str(&value, path)?;
            self.xattrs.push(Xattr {
                off,
                key_len,
                val_len,
            });
        }
        node.xattr_count = count;
        Ok(())
    }

    fn place_chunks(&mut self, files: Vec<(u32, Vec<RawChunk>)>, payload_end: u64) -> Result<()> {
        // Every distinct member start, to find where a member ends when the TOC does not
        // say (eStargz: the next larger offset, or the TOC).
        let mut starts: Vec<u64> = files
            .iter()
            .flat_map(|(_, cs)| cs.iter().map(|c| c.offset))
            .collect();
        starts.sort_unstable();
        starts.dedup();
        let next_start = |off: u64| -> u64 {
            let i = starts.partition_point(|&s| s <= off);
            starts.get(i).copied().unwrap_or(payload_end)
        };
        let total: usize = files.iter().map(|(_, c)| c.len()).sum();
        self.chunks.reserve_exact(total);
        for (id, raw) in files {
            let path = self.path_of(NodeId(id));
            let first =
                u32::try_from(self.chunks.len()).map_err(|_| Error::bad_toc("too many chunks"))?;
            for c in &raw {
                if c.offset >= payload_end {
                    return Err(Error::bad_entry(
                        &path,
                        format!(
                            "chunk offset {} is not before the TOC at {payload_end}",
                            c.offset
                        ),
                    ));
                }
                let natural = next_start(c.offset);
                let end = match c.explicit_end {
                    Some(e) if e > natural => {
                        return Err(Error::bad_entry(
                            &path,
                            format!(
                                "chunk range {}..{e} overlaps the member at {natural}",
                                c.offset
                            ),
                        ));
                    }
                    Some(e) if e <= c.offset => {
                        return Err(Error::bad_entry(
                            &path,
                            format!("chunk range {}..{e} is empty or reversed", c.offset),
                        ));
                    }
                    Some(e) => e,
                    None => natural,
                };
                if c.size > MAX_CHUNK_SIZE {
                    return Err(Error::bad_entry(
                        &path,
                        format!(
                            "a chunk of {} bytes: lazy mounts take chunks of at most \
                             {MAX_CHUNK_SIZE} bytes (converters write 4 MiB)",
                            c.size
                        ),
                    ));
                }
                self.chunks.push(Chunk {
                    comp_offset: c.offset,
                    comp_end: end,
                    file_offset: c.file_offset,
                    size: c.size,
                    digest: c.digest,
                    inner_offset: c.inner,
                    zeros: c.zeros,
                    prefetch: c.prefetch,
                });
            }
            let n = &mut self.nodes[id as usize];
            n.a = first;
            n.b = raw.len() as u32;
        }
        // Chunks that share a member must not claim the same decompressed bytes.
        let mut by_member: Vec<(u64, u64, u64)> = self
            .chunks
            .iter()
            .map(|c| (c.comp_offset, c.inner_offset as u64, c.size))
            .collect();
        by_member.sort_unstable();
        for w in by_member.windows(2) {
            let (a, b) = (w[0], w[1]);
            if a.0 == b.0 && a.1 + a.2 > b.1 {
                return Err(Error::bad_toc(format!(
                    "chunks overlap inside the member at {}",
                    a.0
                )));
            }
        }
        Ok(())
    }

    /// The number of entries, root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    pub fn root(&self) -> EntryRef<'_> {
        self.entry(NodeId::ROOT)
    }

    /// The entry with this id (ids come from this index; others give the root).
    pub fn entry(&self, id: NodeId) -> EntryRef<'_> {
        let id = if (id.0 as usize) < self.nodes.len() {
            id
        } else {
            NodeId::ROOT
        };
        EntryRef {
            index: self,
            id,
            node: &self.nodes[id.0 as usize],
        }
    }

    pub fn get(&self, id: NodeId) -> Option<EntryRef<'_>> {
        ((id.0 as usize) < self.nodes.len()).then(|| self.entry(id))
    }

    /// Looks a name up in a directory.
    pub fn child(&self, dir: NodeId, name: &str) -> Option<NodeId> {
        let d = self.get(dir)?;
        if d.kind() != EntryKind::Dir {
            return None;
        }
        let (a, b) = (d.node.a as usize, d.node.b as usize);
        let range = &self.nodes[a..a + b];
        range
            .binary_search_by(|n| self.str_at(n.name_off, n.name_len as u32).cmp(name))
            .ok()
            .map(|i| NodeId((a + i) as u32))
    }

    /// Looks a path up from the root (hardlinks are returned as themselves).
    pub fn lookup(&self, path: &str) -> Option<NodeId> {
        let norm = normalize_path(path).ok()?;
        let mut cur = NodeId::ROOT;
        if norm.is_empty() {
            return Some(cur);
        }
        for comp in norm.split('/') {
            cur = self.child(cur, comp)?;
        }
        Some(cur)
    }

    /// Follows a hardlink to the regular file it names; other entries map to themselves.
    pub fn resolve(&self, id: NodeId) -> NodeId {
        match self.get(id) {
            Some(e) if e.kind() == EntryKind::Hardlink => NodeId(e.node.a),
            _ => id,
        }
    }

    /// The full path of an entry, without a leading slash ("" for the root).
    pub fn path_of(&self, id: NodeId) -> String {
        let mut parts = Vec::new();
        let mut cur = self.entry(id);
        while cur.id != NodeId::ROOT && parts.len() < self.nodes.len() {
            parts.push(cur.name());
            cur = self.entry(cur.parent());
        }
        parts.reverse();
        parts.join("/")
    }

    /// `.prefetch.landmark`, when the layer has prioritized files.
    pub fn prefetch_landmark(&self) -> Option<NodeId> {
        self.prefetch_landmark
    }

    /// True when the layer says it has no prioritized files.
    pub fn has_no_prefetch_landmark(&self) -> bool {
        self.no_prefetch_landmark
    }

    /// The blob range holding the prioritized files: `0..offset of .prefetch.landmark`.
    pub fn prefetch_range(&self) -> Option<std::ops::Range<u64>> {
        let id = self.prefetch_landmark?;
        let c = self.entry(id).chunks().first()?;
        Some(0..c.comp_offset)
    }

    /// Whether `lazysnap optimize` marked the chunks the image's command read: then
    /// those, not the whole prioritized range, are what to prefetch.
    pub fn has_prefetch_marks(&self) -> bool {
        self.chunks.iter().any(|c| c.prefetch)
    }

    /// Every chunk of the layer, grouped by file.
    pub fn all_chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Average heap bytes per entry, root included.
    pub fn bytes_per_entry(&self) -> f64 {
        self.heap_bytes() as f64 / self.nodes.len().max(1) as f64
    }

    /// Heap bytes held by the index.
    pub fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + self.xattrs.capacity() * std::mem::size_of::<Xattr>()
            + self.strings.capacity()
    }
}

/// Turns a file's `reg` entry and its `chunk` entries into chunks, checking that they
/// tile the file exactly.
fn file_chunks(
    entries: &[&TocEntry],
    size: u64,
    path: &str,
    format: Format,
) -> Result<Vec<RawChunk>> {
    let reg = entries[0];
    if size == 0 {
        if entries.len() > 1 {
            return Err(Error::bad_entry(path, "empty file with chunks"));
        }
        return Ok(Vec::new());
    }
    let mut out: Vec<RawChunk> = Vec::with_capacity(entries.len());
    let mut expect_off = 0u64;
    for (i, e) in entries.iter().enumerate() {
        let offset = nonneg_u64(e.offset, path, "offset")?;
        if offset == 0 {
            return Err(Error::bad_entry(path, "chunk without an offset"));
        }
        let file_offset = nonneg_u64(e.chunk_offset, path, "chunkOffset")?;
        if file_offset != expect_off {
            return Err(Error::bad_entry(
                path,
                format!("chunk at file offset {file_offset}, expected {expect_off}"),
            ));
        }
        let last = i + 1 == entries.len();
        let declared = nonneg_u64(e.chunk_size, path, "chunkSize")?;
        let rest = size - file_offset;
        // eStargz writes chunkSize 0 for "to the end of the file".
        let csize = if declared == 0 && last {
            rest
        } else {
            declared
        };
        if csize == 0 || csize > rest {
            return Err(Error::bad_entry(
                path,
                format!("chunk sizes do not add up to the file size {size}"),
            ));
        }
        let digest_text = if e.chunk_digest.is_empty() && entries.len() == 1 {
            // zstd:chunked omits chunk fields for single-chunk files: the file digest is
            // the chunk digest.
            &reg.digest
        } else {
            &e.chunk_digest
        };
        if digest_text.is_empty() {
            return Err(Error::bad_entry(path, "chunk without chunkDigest"));
        }
        let digest: Digest = digest_text
            .parse()
            .map_err(|_| Error::bad_entry(path, format!("bad chunkDigest {digest_text:?}")))?;
        let inner = u32::try_from(e.inner_offset)
            .map_err(|_| Error::bad_entry(path, format!("innerOffset {}", e.inner_offset)))?;
        let zeros = match e.chunk_type.as_str() {
            "" => false,
            "zeros" => true,
            other => {
                return Err(Error::bad_entry(
                    path,
                    format!("unknown chunkType {other:?}"),
                ));
            }
        };
        if let Some(prev) = out.last()
            && (offset < prev.offset || (offset == prev.offset && inner <= prev.inner))
        {
            return Err(Error::bad_entry(path, "chunk offsets go backwards"));
        }
        out.push(RawChunk {
            offset,
            explicit_end: None,
            file_offset,
            size: csize,
            inner,
            digest,
            zeros,
            prefetch: e.prefetch,
        });
        expect_off = file_offset + csize;
    }
    if expect_off != size {
        return Err(Error::bad_entry(
            path,
            format!("chunks cover {expect_off} bytes of a {size}-byte file"),
        ));
    }
    // zstd:chunked says where each frame ends: the next chunk's frame, or endOffset.
    if format.is_zstd() {
        let n = out.len();
        for i in 0..n {
            let end = if i + 1 < n {
                Some(out[i + 1].offset).filter(|&e| e > out[i].offset)
            } else {
                Some(nonneg_u64(reg.end_offset, path, "endOffset")?).filter(|&e| e != 0)
            };
            out[i].explicit_end = end;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, size: i64, offset: i64, digest: &Digest) -> TocEntry {
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
        let d = Digest::of(b"x");
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
        let d = Digest::of(b"x");
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
            let dg = Digest::of(&(i as u64).to_le_bytes());
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
}
