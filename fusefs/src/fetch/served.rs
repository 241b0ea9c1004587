//! Chunks a container has read to the last byte leave the memory tier; those it has
//! read in part are marked, to leave it sooner once unused (see `cache.rs`).
//!
//! The memory tier bridges a chunk's arrival and its reads: the kernel asks for a 4 MiB
//! chunk in pieces, and read-ahead or the prefetch brings chunks before anyone asks.
//! Once every byte of a chunk has been handed to the kernel, its page cache holds them
//! and the disk has the chunk, so keeping it in memory too only adds to the daemon's
//! resident set (about 20 MB after a cold start that read what was prefetched).

use std::collections::HashMap;
use std::sync::Mutex;

use estargz::{Chunk, NodeId, Sha256Sum};

use super::lock;
use crate::cache::SharedCache;

/// Chunks read in part, and how many of their bytes were handed out.
#[derive(Default)]
pub(crate) struct Served {
    partial: Mutex<HashMap<Sha256Sum, u64>>,
}

/// Past this many partly read chunks (a random reader's), the count starts over: the
/// chunks it forgets stay in memory until evicted, as before.
const MAX_PARTIAL: usize = 16_384;

impl Served {
    /// A read of file bytes `offset..end` was answered from `wants` (the chunks that
    /// hold them, in order): the chunks now read whole leave `cache`'s memory tier.
    pub(crate) fn note(
        &self,
        cache: &SharedCache,
        wants: &[(NodeId, Chunk)],
        offset: u64,
        end: u64,
    ) {
        for (_, c) in wants {
            let lo = offset.max(c.file_offset);
            let hi = end.min(c.file_offset + c.size);
            if hi <= lo || c.size == 0 {
                continue;
            }
            let whole = if hi - lo >= c.size {
                true
            } else {
                let mut partial = lock(&self.partial);
                if partial.len() >= MAX_PARTIAL && !partial.contains_key(&c.digest) {
                    partial.clear();
                }
                let n = partial.entry(c.digest).or_default();
                *n += hi - lo;
                let done = *n >= c.size;
                if done {
                    partial.remove(&c.digest);
                }
                done
            };
            if whole {
                cache.read_through(c.digest);
            } else {
                cache.read_in_part(c.digest);
            }
        }
    }
}
