//! The neighbours of a miss: the chunks after it in the blob, fetched beside the demand
//! in a window sized by how often they turn out to be read, without the kinds of file
//! the container shows it does not read.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use estargz::{Chunk, NodeId, Sha256Sum};

use super::lock;

/// Neighbour chunks fetched and not yet read, remembered at most (a bound on memory:
/// a layer read at random forgets them sooner).
const PENDING_MAX: usize = 1 << 16;

/// Kinds of file told apart, at most (a bound on memory): neighbours of any other kind
/// are always taken.
const KINDS_MAX: usize = 256;

/// The neighbour fetch of one layer: its window and how well it has been doing.
pub(crate) struct Neighbours {
    /// Configured window: the largest, and the starting one.
    max: u64,
    /// For logs: the layer's TOC digest.
    layer: String,
    judge: Mutex<Judge>,
    /// Whether `judge.pending` may hold anything: every read asks, and most layers
    /// (neighbours off, or all read) never need the lock.
    pending_any: AtomicBool,
}

/// Neighbour fetches pay off when a directory is read file after file (a python import
/// reads a package's modules one after another) and waste the link when a file is read
/// at random. The window halves while fewer than a quarter of the neighbour bytes are
/// read, and doubles back while at least half are.
///
/// Beside the files read lie files of kinds nobody reads: a python import reads a
/// module's compiled `.pyc` and only stats its `.py` source, which comes next in the
/// package's directory. A kind of file (its extension) is left out of neighbour fetches
/// once the smallest window's worth of its bytes came as neighbours and none was read,
/// unless the container ever had to fetch a file of that kind. Left out on evidence of
/// waste, rather than kept to the kinds read so far: the first file of a new kind (a
/// `package.json` after the `.js` files) often comes as a neighbour, and a miss costs a
/// round trip.
struct Judge {
    window: u64,
    /// Compressed bytes fetched as neighbours, and of those, read since.
    fetched: u64,
    used: u64,
    /// Neighbour chunks not read yet, with their compressed length and kind.
    pending: HashMap<Sha256Sum, (u64, Option<KindId>)>,
    kinds: HashMap<Box<str>, KindId>,
    records: Vec<KindRecord>,
    /// The kinds left out now, for choosing neighbours without the lock.
    left_out: Arc<[Box<str>]>,
}

type KindId = u16;

/// How the neighbours of one kind of file did.
#[derive(Default)]
struct KindRecord {
    /// Compressed bytes fetched as neighbours, and of those, read.
    fetched: u64,
    used: u64,
    /// The container had to fetch a file of this kind: it reads this kind.
    missed: bool,
}

impl KindRecord {
    fn left_out(&self, judged_after: u64) -> bool {
        !self.missed && self.used == 0 && self.fetched >= judged_after
    }
}

/// The kind of file `name` is: its last extension that is not a version number
/// (`libc.so.6` is `so`, `m.cpython-311.pyc` is `pyc`), or "" for none.
pub(crate) fn kind_of(name: &str) -> &str {
    let Some((_, extensions)) = name.split_once('.') else {
        return "";
    };
    extensions
        .rsplit('.')
        .find(|part| !part.is_empty() && !part.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or("")
}

/// Whether a neighbour named `name` is taken, with `left_out` from
/// [`Neighbours::note_missed`].
pub(crate) fn takes(left_out: &[Box<str>], name: &str) -> bool {
    left_out.is_empty() || !left_out.iter().any(|k| **k == *kind_of(name))
}

impl Neighbours {
    pub(crate) fn new(max: u64, layer: String) -> Self {
        Neighbours {
            max,
            layer,
            judge: Mutex::new(Judge {
                window: max,
                fetched: 0,
                used: 0,
                pending: HashMap::new(),
                kinds: HashMap::new(),
                records: Vec::new(),
                left_out: Arc::from([]),
            }),
            pending_any: AtomicBool::new(false),
        }
    }

    fn min(&self) -> u64 {
        (self.max / 16).max(1)
    }

    /// Neighbour bytes of a kind fetched without a read before it is left out: the
    /// smallest window's worth.
    fn judged_after(&self) -> u64 {
        self.min()
    }

    /// A read of `wants`: neighbours among them were worth fetching.
    pub(crate) fn note_used(&self, wants: &[(NodeId, Chunk)]) {
        if !self.pending_any.load(Ordering::Relaxed) {
            return;
        }
        let mut j = lock(&self.judge);
        let mut changed = false;
        for (_, c) in wants {
            if let Some((len, kind)) = j.pending.remove(&c.digest) {
                j.used += len;
                if let Some(kind) = kind {
                    changed |= self.update(&mut j, kind, |r| r.used += len);
                }
            }
        }
        if changed {
            self.judge_kinds(&mut j);
        }
        if j.pending.is_empty() {
            self.pending_any.store(false, Ordering::Relaxed);
        }
    }

    /// A read must fetch the files `names`: the container reads their kinds. Returns the
    /// kinds left out of neighbour fetches now (see [`takes`]).
    pub(crate) fn note_missed<'n>(&self, names: impl Iterator<Item = &'n str>) -> Arc<[Box<str>]> {
        let mut j = lock(&self.judge);
        let mut changed = false;
        for name in names {
            if let Some(id) = Self::kind_id(&mut j, kind_of(name)) {
                changed |= self.update(&mut j, id, |r| r.missed = true);
            }
        }
        if changed {
            self.judge_kinds(&mut j);
        }
        j.left_out.clone()
    }

    fn kind_id(j: &mut Judge, kind: &str) -> Option<KindId> {
        if let Some(&id) = j.kinds.get(kind) {
            return Some(id);
        }
        if j.records.len() >= KINDS_MAX {
            return None;
        }
        let id = j.records.len() as KindId;
        j.kinds.insert(kind.into(), id);
        j.records.push(KindRecord::default());
        Some(id)
    }

    /// Applies `change` to the record of kind `id`; true if that left the kind out or
    /// took it back.
    fn update(&self, j: &mut Judge, id: KindId, change: impl FnOnce(&mut KindRecord)) -> bool {
        let record = &mut j.records[id as usize];
        let before = record.left_out(self.judged_after());
        change(record);
        before != record.left_out(self.judged_after())
    }

    /// Sets the kinds left out anew from their records, and logs what changed.
    fn judge_kinds(&self, j: &mut Judge) {
        let after = self.judged_after();
        let left_out: Vec<Box<str>> = j
            .kinds
            .iter()
            .filter(|(_, id)| j.records[**id as usize].left_out(after))
            .map(|(kind, _)| kind.clone())
            .collect();
        for kind in left_out.iter().filter(|k| !j.left_out.contains(k)) {
            tracing::info!(
                layer = %self.layer,
                kind = &**kind,
                "neighbour fetches leave out this kind of file: none of it fetched so far was read"
            );
        }
        for kind in j.left_out.iter().filter(|k| !left_out.contains(k)) {
            tracing::info!(
                layer = %self.layer,
                kind = &**kind,
                "neighbour fetches take this kind of file again: the container reads it"
            );
        }
        j.left_out = left_out.into();
    }

    /// Where in the blob to fetch the neighbours of a read of `wants`: from the end of
    /// its last chunk, as far as the window reaches. `None` when neighbour fetches are
    /// off or the read is all holes.
    pub(crate) fn plan(&self, wants: &[(NodeId, Chunk)]) -> Option<Range<u64>> {
        let end = wants
            .iter()
            .filter(|(_, c)| !c.zeros)
            .map(|(_, c)| c.comp_end)
            .max()?;
        if self.max == 0 {
            return None;
        }
        Some(end..end.saturating_add(self.window()))
    }

    /// The window for the next neighbour fetch, judging the ones before once enough
    /// bytes (four windows) have been fetched to tell.
    fn window(&self) -> u64 {
        let mut j = lock(&self.judge);
        if j.window > 0 && j.fetched >= 4 * j.window {
            if j.used * 4 < j.fetched {
                j.window = (j.window / 2).max(self.min());
            } else if j.used * 2 >= j.fetched {
                j.window = (j.window * 2).min(self.max);
            }
            j.fetched = 0;
            j.used = 0;
        }
        j.window
    }

    /// `chunks`, each with its file's name, are being fetched as neighbours: judged by
    /// whether they are read, and their kinds with them.
    pub(crate) fn fetching<'n>(&self, chunks: impl Iterator<Item = (Chunk, &'n str)>) {
        let mut j = lock(&self.judge);
        if j.pending.len() >= PENDING_MAX {
            j.pending.clear();
        }
        let mut changed = false;
        for (c, name) in chunks {
            let kind = Self::kind_id(&mut j, kind_of(name));
            if let Some(id) = kind {
                changed |= self.update(&mut j, id, |r| r.fetched += c.comp_len());
            }
            j.pending.insert(c.digest, (c.comp_len(), kind));
            j.fetched += c.comp_len();
        }
        if changed {
            self.judge_kinds(&mut j);
        }
        self.pending_any
            .store(!j.pending.is_empty(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: u64) -> Chunk {
        Chunk {
            comp_offset: 0,
            comp_end: len,
            file_offset: 0,
            size: len,
            digest: Sha256Sum([n; 32]),
            inner_offset: 0,
            zeros: false,
            prefetch: false,
        }
    }

    #[test]
    fn a_files_kind_is_its_last_extension_that_is_not_a_version() {
        for (name, kind) in [
            ("os.cpython-311.pyc", "pyc"),
            ("os.py", "py"),
            ("libc.so.6", "so"),
            ("libstdc++.so.6.0.30", "so"),
            ("python3.11", ""),
            ("README", ""),
            (".bashrc", "bashrc"),
            ("changelog.Debian.gz", "gz"),
            ("trailing.", ""),
        ] {
            assert_eq!(kind_of(name), kind, "{name}");
        }
    }

    #[test]
    fn a_kind_never_read_is_left_out_until_the_container_reads_one() {
        let n = Neighbours::new(1 << 20, "test".into());
        let small = n.judged_after() / 4;
        let mut next = 0u8;
        let mut fetch = |name: &str| {
            next += 1;
            let c = chunk(next, small);
            n.fetching(std::iter::once((c, name)));
            c
        };
        // The container reads every .pyc that comes and none of the .py.
        for _ in 0..4 {
            let pyc = fetch("m.cpython-311.pyc");
            n.note_used(&[(NodeId(0), pyc)]);
            assert!(n.note_missed(std::iter::empty()).is_empty());
            fetch("m.py");
        }
        let left_out = n.note_missed(std::iter::empty());
        assert_eq!(&left_out[..], [Box::from("py")]);
        assert!(!takes(&left_out, "n.py") && takes(&left_out, "n.cpython-311.pyc"));
        assert!(takes(&left_out, "n.so"), "a kind not yet judged is taken");
        // A .py the container has to fetch: it reads that kind after all.
        assert!(n.note_missed(["n.py"].into_iter()).is_empty());
        for _ in 0..8 {
            fetch("m.py");
        }
        assert!(
            n.note_missed(std::iter::empty()).is_empty(),
            "a kind once missed is judged no more"
        );
    }

    #[test]
    fn a_left_out_kind_read_from_an_earlier_fetch_is_taken_again() {
        let n = Neighbours::new(1 << 20, "test".into());
        let c = chunk(1, n.judged_after());
        n.fetching(std::iter::once((c, "data.bin")));
        assert_eq!(&n.note_missed(std::iter::empty())[..], [Box::from("bin")]);
        n.note_used(&[(NodeId(0), c)]);
        assert!(n.note_missed(std::iter::empty()).is_empty());
    }

    #[test]
    fn the_neighbour_window_shrinks_when_unread_and_grows_back_when_read() {
        let n = Neighbours::new(1 << 20, "test".into());
        let mut next = 0u8;
        let mut fetch = |n: &Neighbours, read: bool| {
            let w = n.window();
            next = next.wrapping_add(1);
            let c = chunk(next, w);
            n.fetching(std::iter::once((c, "f")));
            if read {
                n.note_used(&[(NodeId(0), c)]);
            }
            w
        };
        // Random reads: the neighbours are never read.
        let mut windows = Vec::new();
        for _ in 0..40 {
            windows.push(fetch(&n, false));
        }
        assert_eq!(windows[0], 1 << 20);
        assert_eq!(*windows.last().unwrap(), (1 << 20) / 16, "{windows:?}");
        // A directory scan: every neighbour is read.
        for _ in 0..40 {
            windows.push(fetch(&n, true));
        }
        assert_eq!(*windows.last().unwrap(), 1 << 20);
    }
}
