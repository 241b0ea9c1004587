//! The libraries a program is about to load, fetched before the dynamic linker asks for
//! them one after another ([`crate::elf`]), and the modules a Python module is about to
//! import, before the interpreter asks for them one after another ([`crate::pyc`]).
//! When a container first reads a file from its start and the file is a dynamically
//! linked ELF object, its interpreter and needed libraries are looked up (in this layer
//! and the image's other layers, by whoever mounted them: [`Libraries`]) and each found
//! one is fetched now and read the same way, so a program's whole library tree is on its
//! way within a few round trips instead of one round trip per library. A compiled
//! Python module gets the same for the modules its top-level code imports.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use estargz::{Chunk, EntryKind, Index, NodeId};

use super::{Fetcher, Purpose, lock};
use crate::config::FsConfig;
use crate::{elf, pyc};

/// Finds the libraries an object of a layer needs (or the modules a compiled Python
/// module imports) among the image's layers, and has each fetched there
/// ([`crate::LayerFs::fetch_library`], then [`crate::LayerFs::fetch_found_libraries`]).
/// Set per mounted layer by the mounter, who knows the image's layers.
pub trait Libraries: Send + Sync {
    /// For each library an ELF object of this layer needs (or module it imports), the
    /// paths (relative to the root) the dynamic linker (or Python) would try, in its
    /// order. Called from the fetcher's runtime: it must not wait.
    fn wanted(&self, wanted: Vec<Vec<String>>);
}

/// What a layer says of a path asked for as a library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibraryLookup {
    /// A regular file here: fetching (or fetched, or read before).
    Here,
    /// A symbolic link here to this path (relative to the root), maybe in another layer.
    Elsewhere(String),
    /// Not in this layer.
    Absent,
}

/// Which files have been read as ELF objects, which were fetched as libraries, and who
/// finds their libraries.
pub(crate) struct Examined {
    seen: Mutex<HashSet<NodeId>>,
    libraries: Mutex<HashSet<NodeId>>,
    /// Python modules asked for, by the first place they were looked for: the modules
    /// of a package are imported by many of its modules, and looked for once.
    modules: Mutex<HashSet<String>>,
    /// Found and not yet fetched: the finder looks up a whole list, then has each layer
    /// fetch what it found at once, so that neighbours in the blob share a request.
    found: Mutex<Vec<NodeId>>,
    finder: OnceLock<Arc<dyn Libraries>>,
    /// A library of at most this many compressed bytes is fetched whole, a bigger one
    /// its first chunk (`library_fetch_bytes`; 0: libraries are not fetched ahead).
    fetch_bytes: u64,
}

impl Examined {
    pub(crate) fn new(config: &FsConfig) -> Self {
        Examined {
            seen: Mutex::default(),
            libraries: Mutex::default(),
            modules: Mutex::default(),
            found: Mutex::default(),
            finder: OnceLock::new(),
            fetch_bytes: config.library_fetch_bytes,
        }
    }

    fn on(&self) -> bool {
        self.fetch_bytes > 0 && self.finder.get().is_some()
    }

    /// True the first time `node` is asked about.
    fn first_look(&self, node: NodeId) -> bool {
        lock(&self.seen).insert(node)
    }

    fn note_library(&self, node: NodeId) {
        lock(&self.libraries).insert(node);
    }

    /// Whether `node` was fetched as a library.
    fn is_library(&self, node: NodeId) -> bool {
        self.on() && lock(&self.libraries).contains(&node)
    }

    /// How many of a library's chunks (`chunks`, in file order) to fetch at once: all of
    /// them if the file is small, else the first.
    fn start_of(&self, chunks: &[Chunk]) -> usize {
        let compressed: u64 = chunks.iter().map(|c| c.comp_len()).sum();
        if compressed <= self.fetch_bytes {
            chunks.len()
        } else {
            1
        }
    }
}

/// Why a file is read for what it loads next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// The container read it from its start.
    Read,
    /// It was found for another file's library or import, and fetched.
    Found,
}

/// Symbolic links followed within a layer at most, looking up a library.
const MAX_LINKS: usize = 8;

/// Where a path leads in one layer.
enum Walk {
    File(NodeId),
    /// Through a symbolic link: the path to look up instead.
    Link(String),
    Absent,
}

/// Looks `path` up in this layer, stopping at the first symbolic link on the way
/// (a merged-/usr image's `lib` is one).
fn walk(index: &Index, path: &str) -> Walk {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut at = index.root().id();
    for (i, part) in parts.iter().enumerate() {
        let Some(id) = index.child(at, part) else {
            return Walk::Absent;
        };
        let e = index.entry(index.resolve(id));
        match e.kind() {
            EntryKind::Symlink => {
                let target = e.symlink_target().unwrap_or_default();
                let Some(mut next) = elf::resolve(&parts[..i].join("/"), target) else {
                    return Walk::Absent;
                };
                for rest in &parts[i + 1..] {
                    next.push('/');
                    next.push_str(rest);
                }
                return Walk::Link(next);
            }
            EntryKind::Dir if i + 1 < parts.len() => at = e.id(),
            EntryKind::Reg if i + 1 == parts.len() => return Walk::File(e.id()),
            _ => return Walk::Absent,
        }
    }
    Walk::Absent
}

impl Fetcher {
    pub(crate) fn set_libraries(&self, finder: Arc<dyn Libraries>) {
        let _ = self.examined.finder.set(finder);
    }

    /// Whether `node` was fetched as a library: the dynamic linker reads such a file for
    /// itself, and what it needs next is fetched by name, so its misses are no reason
    /// to guess at the files beside it.
    pub(crate) fn is_library(&self, node: NodeId) -> bool {
        self.examined.is_library(node)
    }

    /// A container read `node` from its start, `head`: if it is an ELF object, have its
    /// libraries fetched (once); if it is a compiled Python module, the modules it
    /// imports. Other files cost a look at four bytes.
    pub(crate) fn examine_soon(self: &Arc<Self>, node: NodeId, head: &[u8]) {
        if (elf::is_elf(head) || (pyc::is_pyc(head) && self.reads_imports()))
            && self.examined.on()
            && self.examined.first_look(node)
        {
            let this = Arc::clone(self);
            self.handle
                .spawn(async move { this.examine(node, Why::Read).await });
        }
    }

    /// `path` was asked for as a library or module: if it is a regular file here, fetch
    /// it (whole when it is at most `library_fetch_bytes` compressed, else its first
    /// chunk; the dynamic section is fetched when it is read) and read it for its own
    /// libraries or imports.
    pub(crate) fn fetch_library(self: &Arc<Self>, path: &str) -> LibraryLookup {
        let mut path = path.to_string();
        let mut followed = false;
        for _ in 0..MAX_LINKS {
            match walk(self.layer.index(), &path) {
                Walk::File(node) => {
                    if self.examined.on() {
                        self.examined.note_library(node);
                        if self.examined.first_look(node) {
                            lock(&self.examined.found).push(node);
                        }
                    }
                    return LibraryLookup::Here;
                }
                Walk::Link(next) => {
                    path = next;
                    followed = true;
                }
                // A link may lead into a layer below (or above) this one.
                Walk::Absent if followed => return LibraryLookup::Elsewhere(path),
                Walk::Absent => return LibraryLookup::Absent,
            }
        }
        LibraryLookup::Absent
    }

    /// Starts the fetch of the found libraries' chunks that are neither local nor on
    /// their way (all of a small file's, else its first), together, and reads each
    /// library for its own libraries or imports.
    pub(crate) fn fetch_found_libraries(self: &Arc<Self>) {
        let found = std::mem::take(&mut *lock(&self.examined.found));
        let index = self.layer.index();
        let wants: Vec<(NodeId, Chunk)> = found
            .iter()
            .flat_map(|&node| {
                let chunks = index.entry(node).chunks();
                let take = self.examined.start_of(chunks);
                chunks
                    .iter()
                    .take(take)
                    .filter(|c| !c.zeros)
                    .map(move |c| (node, *c))
            })
            .collect();
        let leads = self.claim_missing(wants);
        self.spawn_ranges(leads, Purpose::Library);
        for node in found {
            let this = Arc::clone(self);
            self.handle
                .spawn(async move { this.examine(node, Why::Found).await });
        }
    }

    /// Bytes `offset..offset + len` of `node` (cut at its end), fetched as a library's
    /// if not local; `None` on any failure (this only guides fetching).
    async fn bytes_of(self: &Arc<Self>, node: NodeId, offset: u64, len: u64) -> Option<Bytes> {
        let size = self.layer.index().entry(node).size();
        let end = offset.checked_add(len)?.min(size);
        if offset >= end {
            return None;
        }
        let wants: Vec<_> = self
            .layer
            .chunks_for_range(node, offset, end - offset)
            .iter()
            .map(|c| (node, *c))
            .collect();
        let chunks = self.chunks(&wants, Purpose::Library).await.ok()?;
        Some(super::assemble(&wants, &chunks, offset, end))
    }

    /// The string at `at` of the string table at `table` (`size` bytes) of `node`.
    async fn string_at(
        self: &Arc<Self>,
        node: NodeId,
        table: u64,
        size: u64,
        at: u64,
    ) -> Option<String> {
        if at >= size {
            return None;
        }
        let len = (size - at).min(elf::MAX_STRING);
        elf::c_string(&self.bytes_of(node, table.checked_add(at)?, len).await?)
    }

    /// Reads `node` for what it has loaded next, an ELF object's libraries or a Python
    /// module's imports, and passes them to the finder.
    async fn examine(self: Arc<Self>, node: NodeId, why: Why) {
        let Some(finder) = self.examined.finder.get().cloned() else {
            return;
        };
        let Some(head) = self.bytes_of(node, 0, elf::HEAD_BYTES).await else {
            return;
        };
        if pyc::is_pyc(&head) {
            if why == Why::Found && self.spans {
                // Through a SOCI index a module found here is read for its imports only
                // once the container reads it: a module fetched for an import that never
                // runs would otherwise cost the spans of its own imports too.
                lock(&self.examined.seen).remove(&node);
                return;
            }
            self.examine_pyc(node, finder.as_ref()).await;
        } else {
            self.examine_elf(node, &head, finder.as_ref()).await;
        }
    }

    /// Whether this layer's compiled modules are read for their imports: not while the
    /// container keeps to an optimized layer's record, which already has what the start
    /// imports (fetches beside it held its prefetch back: python 1.23x).
    fn reads_imports(&self) -> bool {
        !self.prefetch.keeps_to_record()
    }

    /// Reads `node` as a compiled Python module and passes the modules its top-level
    /// code imports (those not asked for before) to the finder.
    async fn examine_pyc(self: &Arc<Self>, node: NodeId, finder: &dyn Libraries) {
        let size = self.layer.index().entry(node).size();
        if !self.reads_imports() || size > pyc::MAX_PYC {
            return;
        }
        let Some(bytes) = self.bytes_of(node, 0, size).await else {
            return;
        };
        let Some(imports) = pyc::imports(&bytes) else {
            return;
        };
        let path = self.path(node);
        let mut wanted = pyc::wanted(&path, &imports);
        {
            let mut asked = lock(&self.examined.modules);
            wanted.retain(|files| asked.insert(files[0].clone()));
        }
        if !wanted.is_empty() {
            tracing::debug!(layer = %self.name, file = %path, modules = wanted.len(), "fetching the modules a Python module imports");
            finder.wanted(wanted);
        }
    }

    /// Reads `node` as an ELF object (its head, dynamic section and string table) and
    /// passes the libraries it needs to the finder.
    async fn examine_elf(self: &Arc<Self>, node: NodeId, head: &[u8], finder: &dyn Libraries) {
        let Some(layout) = elf::layout(head) else {
            return;
        };
        let mut wanted = Vec::new();
        if let Some((offset, len)) = layout.interp
            && let Some(bytes) = self.bytes_of(node, offset, len).await
            && let Some(interp) = elf::interp_path(&bytes)
        {
            wanted.push(vec![interp]);
        }
        if let Some((offset, len)) = layout.dynamic
            && let Some(section) = self.bytes_of(node, offset, len).await
        {
            let dynamic = elf::dynamic(&section);
            if let Some((table, size)) = dynamic.strtab(&layout) {
                let mut needed = Vec::new();
                for &at in dynamic.needed() {
                    if let Some(name) = self.string_at(node, table, size, at).await {
                        needed.push(name);
                    }
                }
                let search = match dynamic.search() {
                    Some(at) => self.string_at(node, table, size, at).await,
                    None => None,
                };
                let path = self.path(node);
                wanted.extend(elf::candidates(
                    &path,
                    layout.machine,
                    &needed,
                    search.as_deref(),
                ));
            }
        }
        if !wanted.is_empty() {
            tracing::debug!(layer = %self.name, file = %self.path(node), libraries = wanted.len(), "fetching the libraries an ELF object needs");
            finder.wanted(wanted);
        }
    }
}
