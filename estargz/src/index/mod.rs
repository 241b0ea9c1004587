//! A compact in-memory index of a layer built from its TOC: flat sorted arrays and one
//! string table, so that 100,000 files cost a few megabytes, not a heap of nodes.

mod build;

use crate::digest::Sha256Sum;
use crate::error::{Error, Result};
use crate::toc::Timestamp;

pub use build::{BYTES_PER_IMPLIED_DIR, MAX_PATH_LEN, PARSE_MEMORY_FACTOR};

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
    pub digest: Sha256Sum,
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
    pub fn children(&self) -> impl ExactSizeIterator<Item = NodeId> + use<'a> {
        self.children_from(0)
    }
    /// Children of a directory from the `skip`th on, found without walking the first
    /// ones (a listing resumes in the middle of a million names).
    pub fn children_from(&self, skip: usize) -> impl ExactSizeIterator<Item = NodeId> + use<'a> {
        let (first, count) = if self.node.kind == EntryKind::Dir {
            (self.node.a, self.node.b)
        } else {
            (0, 0)
        };
        let skip = u32::try_from(skip).unwrap_or(u32::MAX).min(count);
        (first + skip..first + count).map(NodeId)
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
        path: shortened(name),
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
                if out.len() > MAX_PATH_LEN {
                    return Err(unsafe_path(&format!(
                        "a path of over {MAX_PATH_LEN} bytes (Linux's PATH_MAX)"
                    )));
                }
            }
        }
    }
    Ok(out)
}

/// A name as error messages show it: a crafted one may be megabytes long.
fn shortened(name: &str) -> String {
    const SHOWN: usize = 200;
    if name.len() <= SHOWN {
        return name.to_string();
    }
    let end = (0..=SHOWN)
        .rev()
        .find(|&i| name.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}... ({} bytes)", &name[..end], name.len())
}

impl Index {
    fn str_at(&self, off: u32, len: u32) -> &str {
        let bytes = &self.strings[off as usize..off as usize + len as usize];
        // Only valid UTF-8 is ever pushed as a name or link target.
        std::str::from_utf8(bytes).unwrap_or("")
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
