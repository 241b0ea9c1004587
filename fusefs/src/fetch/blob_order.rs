//! The order of the blob: range requests are cut from chunks in the order their bytes
//! lie in the blob, so everything that plans requests sorts (and coalesces) here.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::OnceLock;

use estargz::{Chunk, EntryKind, Index, NodeId};

/// Something with a chunk: where it lies in the blob.
pub(crate) trait InBlob {
    fn chunk(&self) -> &Chunk;

    fn span(&self) -> (u64, u64) {
        let c = self.chunk();
        (c.comp_offset, c.comp_end)
    }
}

impl InBlob for Chunk {
    fn chunk(&self) -> &Chunk {
        self
    }
}

impl InBlob for (NodeId, Chunk) {
    fn chunk(&self) -> &Chunk {
        &self.1
    }
}

/// Blob order: by the member (or span) a chunk is in, then by where in it the chunk
/// starts (several chunks, or SOCI pieces, share one).
fn key(c: &Chunk) -> (u64, u32) {
    (c.comp_offset, c.inner_offset)
}

/// Sorts `items` into blob order (stable: equal keys keep their order).
pub(crate) fn sort<T: InBlob>(items: &mut [T]) {
    items.sort_by_key(|i| key(i.chunk()));
}

/// `todo` in blob order, each digest once (its first chunk in that order): a digest
/// fetched once is local for every file that holds it.
pub(crate) fn distinct(mut todo: Vec<(NodeId, Chunk)>) -> Vec<(NodeId, Chunk)> {
    sort(&mut todo);
    let mut seen = HashSet::new();
    todo.retain(|(_, c)| seen.insert(c.digest));
    todo
}

/// Every chunk of every regular file, with its node, in the index's order.
pub(crate) fn all_chunks(index: &Index) -> Vec<(NodeId, Chunk)> {
    let mut out = Vec::with_capacity(index.all_chunks().len());
    for id in 0..index.len() {
        let e = index.entry(NodeId(id as u32));
        if e.kind() == EntryKind::Reg {
            out.extend(e.chunks().iter().map(|c| (e.id(), *c)));
        }
    }
    out
}

/// One range request: its bytes in the blob, and what it holds in blob order.
pub(crate) type Request<T> = (Range<u64>, Vec<T>);

/// Cuts `items` (in the order they are wanted, usually blob order) into ranges for
/// range requests: an item joins the range before it when it starts inside it or at
/// most `gap` bytes after its end (the bytes between are cheaper than a round trip) and
/// the range stays within `max` bytes; a single item larger than `max` is a range of
/// its own.
pub(crate) fn coalesce<T: InBlob>(items: Vec<T>, gap: u64, max: u64) -> Vec<Request<T>> {
    let mut out: Vec<Request<T>> = Vec::new();
    for item in items {
        let (s, e) = item.span();
        if let Some((range, group)) = out.last_mut()
            && s >= range.start
            && s <= range.end.saturating_add(gap)
            && e.max(range.end) - range.start <= max
        {
            range.end = range.end.max(e);
            group.push(item);
            continue;
        }
        out.push((s..e, vec![item]));
    }
    out
}

/// Every chunk of a layer in blob order as (file, chunk of the file), built on first
/// use (the first neighbour fetch, or the first span of a SOCI layer). 8 bytes a
/// chunk, not a copy of the chunk (80).
#[derive(Default)]
pub(crate) struct BlobOrder(OnceLock<Vec<(NodeId, u32)>>);

fn chunk_at(index: &Index, &(node, k): &(NodeId, u32)) -> Chunk {
    index.entry(node).chunks()[k as usize]
}

impl BlobOrder {
    fn table(&self, index: &Index) -> &[(NodeId, u32)] {
        self.0.get_or_init(|| {
            let mut all: Vec<(NodeId, u32)> = Vec::new();
            for id in 0..index.len() {
                let e = index.entry(NodeId(id as u32));
                if e.kind() == EntryKind::Reg && e.hardlink_target().is_none() {
                    let real = e.chunks().iter().enumerate().filter(|(_, c)| !c.zeros);
                    all.extend(real.map(|(k, _)| (e.id(), k as u32)));
                }
            }
            all.sort_by_key(|at| key(&chunk_at(index, at)));
            all
        })
    }

    /// The chunks from the first that starts at `window.start` or later, up to the first
    /// that ends past `window.end`, in blob order. Holes are not in the table.
    pub(crate) fn within<'a>(
        &'a self,
        index: &'a Index,
        window: Range<u64>,
    ) -> impl Iterator<Item = (NodeId, Chunk)> + 'a {
        let table = self.table(index);
        let first = table.partition_point(|at| chunk_at(index, at).comp_offset < window.start);
        table[first..]
            .iter()
            .map(move |at| (at.0, chunk_at(index, at)))
            .take_while(move |(_, c)| c.comp_end <= window.end)
    }

    /// The pieces of the SOCI span that starts at `comp_offset`.
    pub(crate) fn span_pieces(&self, index: &Index, comp_offset: u64) -> Vec<(NodeId, Chunk)> {
        let table = self.table(index);
        let first = table.partition_point(|at| chunk_at(index, at).comp_offset < comp_offset);
        table[first..]
            .iter()
            .take_while(|at| chunk_at(index, at).comp_offset == comp_offset)
            .map(|at| (at.0, chunk_at(index, at)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(s: u64, e: u64) -> Chunk {
        Chunk {
            comp_offset: s,
            comp_end: e,
            file_offset: 0,
            size: 0,
            digest: estargz::Sha256Sum([0; 32]),
            inner_offset: 0,
            zeros: false,
            prefetch: false,
        }
    }

    #[test]
    fn coalescing_bridges_small_gaps_and_keeps_ranges_within_the_maximum() {
        let items = vec![span(0, 10), span(12, 20), span(100, 110), span(110, 300)];
        let got: Vec<_> = coalesce(items, 5, 150)
            .into_iter()
            .map(|(r, g)| (r, g.len()))
            .collect();
        assert_eq!(got, vec![(0..20, 2), (100..110, 1), (110..300, 1)]);
        // Out of order: an item before the range starts a new one.
        let items = vec![span(100, 110), span(90, 100)];
        assert_eq!(coalesce(items, 5, 150).len(), 2);
    }
}
