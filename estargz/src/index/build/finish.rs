//! The builder's nodes put in the index's order, with their names, chunks and
//! hardlink targets in place.

use super::{Builder, push_bytes};
use crate::error::{Error, Result};
use crate::index::{EntryKind, Index, NodeId};

impl Builder<'_> {
    /// Orders the nodes as the index keeps them (the root, then every directory's
    /// children sorted by name, directories in the order of their paths as strings),
    /// and places chunks and hardlinks.
    pub(super) fn finish(mut self, payload_end: u64) -> Result<Index> {
        self.close_file()?;
        drop(std::mem::take(&mut self.table));
        // What the parse grew by doubling is given back before the index is made beside it.
        self.nodes.shrink_to_fit();
        self.raw_chunks.shrink_to_fit();
        self.names.shrink_to_fit();
        let n = self.nodes.len();
        // Children lists by arrival index: counts, then offsets, then fill.
        let mut first = vec![0u32; n + 1];
        for (i, node) in self.nodes.iter().enumerate().skip(1) {
            self.check_cancel(i)?;
            first[node.parent as usize + 1] += 1;
        }
        for i in 0..n {
            first[i + 1] += first[i];
        }
        let mut children = vec![0u32; n.saturating_sub(1)];
        let mut fill = first.clone();
        for (i, node) in self.nodes.iter().enumerate().skip(1) {
            let p = node.parent as usize;
            if self.nodes[p].kind != EntryKind::Dir {
                return Err(Error::bad_entry(
                    &self.path_of(i as u32),
                    "parent is not a directory",
                ));
            }
            children[fill[p] as usize] = i as u32;
            fill[p] += 1;
        }
        drop(fill);
        let kids = |d: u32| first[d as usize] as usize..first[d as usize + 1] as usize;
        for d in 0..n {
            self.check_cancel(d)?;
            let range = kids(d as u32);
            if range.len() > 1 {
                let (nodes, names) = (&self.nodes, &self.names);
                let name = |i: u32| {
                    let n = &nodes[i as usize];
                    &names[n.name_off as usize..n.name_off as usize + n.name_len as usize]
                };
                children[range].sort_unstable_by(|&x, &y| name(x).cmp(name(y)));
            }
        }
        // Directories in the order of their paths as strings: a directory's own path
        // sorts by its name, its descendants' by its name and a '/' (so "a", "a-b",
        // "a-b/c", "a/c": '-' sorts before '/').
        enum Step {
            Group(u32),
            Below(u32),
        }
        let has_children = |d: u32| !kids(d).is_empty();
        let mut order: Vec<u32> = Vec::with_capacity(n);
        let mut dir_first = vec![0u32; n];
        order.push(0);
        let mut stack = vec![Step::Below(0), Step::Group(0)];
        let mut items: Vec<(u32, bool)> = Vec::new();
        let mut steps = 0usize;
        while let Some(step) = stack.pop() {
            steps += 1;
            self.check_cancel(steps)?;
            match step {
                Step::Group(d) => {
                    dir_first[d as usize] = order.len() as u32;
                    order.extend_from_slice(&children[kids(d)]);
                }
                Step::Below(d) => {
                    items.clear();
                    for &c in &children[kids(d)] {
                        if self.nodes[c as usize].kind == EntryKind::Dir && has_children(c) {
                            items.push((c, false));
                            items.push((c, true));
                        }
                    }
                    let key = |&(c, below): &(u32, bool)| {
                        self.name_of(c)
                            .iter()
                            .chain(below.then_some(&b'/'))
                            .copied()
                    };
                    items.sort_by(|x, y| key(x).cmp(key(y)));
                    stack.extend(items.iter().rev().map(|&(c, below)| {
                        if below {
                            Step::Below(c)
                        } else {
                            Step::Group(c)
                        }
                    }));
                }
            }
        }
        drop(stack);
        let mut final_id = vec![0u32; n];
        for (pos, &i) in order.iter().enumerate() {
            final_id[i as usize] = pos as u32;
        }
        // The index's nodes, names and chunks, in final order.
        let mut idx = Index {
            nodes: Vec::with_capacity(n),
            chunks: Vec::new(),
            xattrs: std::mem::take(&mut self.xattrs),
            strings: std::mem::take(&mut self.strings),
            prefetch_landmark: self.prefetch_landmark.map(|i| NodeId(final_id[i as usize])),
            no_prefetch_landmark: self.no_prefetch_landmark,
        };
        let mut starts: Vec<u64> = Vec::new();
        let mut hardlinks: Vec<u32> = Vec::new();
        for (pos, &i) in order.iter().enumerate() {
            self.check_cancel(pos)?;
            let mut node = self.nodes[i as usize];
            let name = self.name_of(i);
            let (off, _) = push_bytes(&mut idx.strings, name, "")?;
            node.name_off = off;
            node.parent = final_id[node.parent as usize];
            match node.kind {
                EntryKind::Dir => {
                    node.a = dir_first[i as usize];
                    node.b = kids(i).len() as u32;
                }
                EntryKind::Reg => {
                    let raw = &self.raw_chunks[node.a as usize..(node.a + node.b) as usize];
                    starts.extend(raw.iter().map(|c| c.offset));
                }
                EntryKind::Hardlink => hardlinks.push(pos as u32),
                _ => {}
            }
            idx.nodes.push(node);
        }
        drop((order, final_id, dir_first, children, first));
        drop(std::mem::take(&mut self.names));
        self.place_chunks(&mut idx, starts, payload_end)?;
        self.link_hardlinks(&mut idx, &hardlinks)?;
        idx.nodes.shrink_to_fit();
        idx.chunks.shrink_to_fit();
        idx.xattrs.shrink_to_fit();
        idx.strings.shrink_to_fit();
        Ok(idx)
    }

    /// Hardlinks point at the node of their (non-directory) target.
    fn link_hardlinks(&self, idx: &mut Index, hardlinks: &[u32]) -> Result<()> {
        let target_of = |idx: &Index, id: u32| -> Result<NodeId> {
            let n = idx.nodes[id as usize];
            let bytes = &self.links[n.a as usize..(n.a + n.b) as usize];
            let text = std::str::from_utf8(bytes).unwrap_or("");
            idx.lookup(text).ok_or_else(|| {
                Error::bad_entry(
                    &idx.path_of(NodeId(id)),
                    format!("hardlink target {text:?} missing"),
                )
            })
        };
        // Resolve every target before any node's `a` changes meaning.
        let mut resolved = Vec::with_capacity(hardlinks.len());
        for (i, &id) in hardlinks.iter().enumerate() {
            self.check_cancel(i)?;
            resolved.push(target_of(idx, id)?);
        }
        let first_target = |id: u32| resolved[hardlinks.binary_search(&id).unwrap_or(0)];
        let mut finals = Vec::with_capacity(hardlinks.len());
        for (i, &id) in hardlinks.iter().enumerate() {
            self.check_cancel(i)?;
            let mut t = first_target(id);
            let mut hops = 0;
            while idx.nodes[t.0 as usize].kind == EntryKind::Hardlink {
                if hops >= 64 {
                    return Err(Error::bad_entry(
                        &idx.path_of(NodeId(id)),
                        "hardlink chain does not end",
                    ));
                }
                t = first_target(t.0);
                hops += 1;
            }
            let target = idx.nodes[t.0 as usize];
            if target.kind == EntryKind::Dir {
                return Err(Error::bad_entry(
                    &idx.path_of(NodeId(id)),
                    "hardlink to a directory",
                ));
            }
            let tn = &mut idx.nodes[t.0 as usize];
            tn.nlink = tn.nlink.saturating_add(1);
            finals.push(t);
        }
        // Only now: until every chain was followed, `a` held the link's target text.
        for (&id, &t) in hardlinks.iter().zip(&finals) {
            let target = idx.nodes[t.0 as usize];
            let n = &mut idx.nodes[id as usize];
            n.a = t.0;
            n.size = target.size;
        }
        for &id in hardlinks {
            let t = idx.nodes[id as usize].a as usize;
            idx.nodes[id as usize].nlink = idx.nodes[t].nlink;
        }
        Ok(())
    }
}
