//! A least-recently-used map bounded in bytes, not entries (stargz's caches count
//! entries, which bounds nothing when chunks are 4 MiB), that knows when each entry was
//! last used.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use estargz::Sha256Sum;

pub(crate) struct Lru<V> {
    map: HashMap<Sha256Sum, Slot<V>>,
    /// Recency order: tick → key; the smallest tick is the least recently used.
    order: BTreeMap<u64, Sha256Sum>,
    tick: u64,
    bytes: u64,
    capacity: u64,
}

struct Slot<V> {
    value: V,
    tick: u64,
    size: u64,
    /// When it was inserted or last got, in milliseconds of [`clock_ms`]; grows with
    /// `tick`, so the recency order is also the order of these.
    used_at: u64,
    /// Set by the owner ([`Lru::mark`]) until the entry is inserted again.
    marked: bool,
}

/// Milliseconds since the first call: a monotonic clock that fits a `u64`.
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl<V: Clone> Lru<V> {
    pub(crate) fn new(capacity: u64) -> Self {
        Lru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            capacity,
        }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn contains(&self, key: &Sha256Sum) -> bool {
        self.map.contains_key(key)
    }

    /// The value, without touching its recency.
    pub(crate) fn peek(&self, key: &Sha256Sum) -> Option<V> {
        self.map.get(key).map(|s| s.value.clone())
    }

    /// The value, marked as most recently used.
    pub(crate) fn get(&mut self, key: &Sha256Sum) -> Option<V> {
        self.tick += 1;
        let slot = self.map.get_mut(key)?;
        self.order.remove(&slot.tick);
        slot.tick = self.tick;
        slot.used_at = clock_ms();
        self.order.insert(self.tick, *key);
        Some(slot.value.clone())
    }

    /// Inserts (or refreshes) `key` and returns the entries evicted to stay within the
    /// capacity. A value larger than the whole capacity is not kept.
    pub(crate) fn insert(&mut self, key: Sha256Sum, value: V, size: u64) -> Vec<(Sha256Sum, V)> {
        if size > self.capacity {
            return Vec::new();
        }
        self.remove(&key);
        self.tick += 1;
        self.order.insert(self.tick, key);
        self.map.insert(
            key,
            Slot {
                value,
                tick: self.tick,
                size,
                used_at: clock_ms(),
                marked: false,
            },
        );
        self.bytes += size;
        let mut evicted = Vec::new();
        while self.bytes > self.capacity {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            if let Some(slot) = self.map.remove(&victim) {
                self.bytes -= slot.size;
                evicted.push((victim, slot.value));
            }
        }
        evicted
    }

    /// Every entry, in no particular order.
    pub(crate) fn entries(&self) -> Vec<(Sha256Sum, V)> {
        self.map
            .iter()
            .map(|(k, s)| (*k, s.value.clone()))
            .collect()
    }

    /// Marks the entry, if present (what the mark means is the owner's).
    pub(crate) fn mark(&mut self, key: &Sha256Sum) {
        if let Some(slot) = self.map.get_mut(key) {
            slot.marked = true;
        }
    }

    /// The keys neither inserted nor got for at least `idle`, least recently used first,
    /// each with the milliseconds since its last use and whether it is marked.
    pub(crate) fn unused_for(&self, idle: Duration) -> Vec<(Sha256Sum, u64, bool)> {
        let now = clock_ms();
        let idle = idle.as_millis() as u64;
        self.order
            .values()
            .map_while(|key| {
                let slot = &self.map[key];
                let unused = now.saturating_sub(slot.used_at);
                (unused >= idle).then_some((*key, unused, slot.marked))
            })
            .collect()
    }

    /// Takes out the least recently used entry.
    pub(crate) fn pop_oldest(&mut self) -> Option<(Sha256Sum, V)> {
        let (_, key) = self.order.pop_first()?;
        let slot = self.map.remove(&key)?;
        self.bytes -= slot.size;
        Some((key, slot.value))
    }

    pub(crate) fn remove(&mut self, key: &Sha256Sum) -> Option<V> {
        let slot = self.map.remove(key)?;
        self.order.remove(&slot.tick);
        self.bytes -= slot.size;
        Some(slot.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u8) -> Sha256Sum {
        Sha256Sum::of(&[i])
    }

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let mut lru = Lru::new(10);
        assert!(lru.insert(d(1), 1, 4).is_empty());
        assert!(lru.insert(d(2), 2, 4).is_empty());
        assert_eq!(lru.get(&d(1)), Some(1)); // 2 is now the oldest
        let ev = lru.insert(d(3), 3, 4);
        assert_eq!(ev, vec![(d(2), 2)]);
        assert_eq!(lru.bytes(), 8);
        assert!(lru.contains(&d(1)) && lru.contains(&d(3)) && !lru.contains(&d(2)));
        // Too large to ever fit: not kept, nothing evicted.
        assert!(lru.insert(d(4), 4, 11).is_empty());
        assert!(!lru.contains(&d(4)));
        // Re-inserting replaces the size instead of adding to it.
        lru.insert(d(1), 1, 2);
        assert_eq!(lru.bytes(), 6);
        assert_eq!(lru.remove(&d(3)), Some(3));
        assert_eq!(lru.bytes(), 2);
    }

    #[test]
    fn knows_which_entries_went_unused() {
        let mut lru = Lru::new(100);
        lru.insert(d(1), 1, 1);
        lru.insert(d(2), 2, 1);
        lru.insert(d(3), 3, 1);
        assert!(lru.unused_for(Duration::from_secs(3600)).is_empty());
        let keys =
            |v: Vec<(Sha256Sum, u64, bool)>| v.into_iter().map(|(k, ..)| k).collect::<Vec<_>>();
        assert_eq!(keys(lru.unused_for(Duration::ZERO)), vec![d(1), d(2), d(3)]);
        std::thread::sleep(Duration::from_millis(60));
        // A get is a use; peek and contains are not.
        assert_eq!(lru.get(&d(1)), Some(1));
        assert_eq!(lru.peek(&d(2)), Some(2));
        assert!(lru.contains(&d(3)));
        let unused = lru.unused_for(Duration::from_millis(50));
        assert_eq!(keys(unused.clone()), vec![d(2), d(3)]);
        assert!(
            unused.iter().all(|(_, ms, _)| *ms >= 50),
            "with how long: {unused:?}"
        );
        // A mark shows until the entry is inserted again.
        let marked = |lru: &Lru<i32>| {
            lru.unused_for(Duration::ZERO)
                .into_iter()
                .filter(|(_, _, m)| *m)
                .map(|(k, ..)| k)
                .collect::<Vec<_>>()
        };
        lru.mark(&d(2));
        assert_eq!(marked(&lru), vec![d(2)]);
        lru.insert(d(2), 2, 1);
        assert!(marked(&lru).is_empty());
    }
}
