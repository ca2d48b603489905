//! `ReadCache`: the rows every send reads (its chat, its participants' devices and their keys), kept in memory.
//!
//! `SqliteStore` is the only writer of its database, so it can keep a cache
//! coherent by forgetting an entry once a write that touches it has
//! committed. A fill races such a write: the read may have seen the row from
//! before the commit. Every forget moves an epoch on, and a fill whose read
//! began in an older epoch is dropped, so no stale row outlives its write.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

/// Entries kept at most; past it the cache starts over (it only saves reads).
const CAPACITY: usize = 100_000;

pub(super) struct ReadCache<K, V> {
    state: Mutex<State<K, V>>,
}

struct State<K, V> {
    entries: HashMap<K, V>,
    epoch: u64,
}

impl<K: Eq + Hash, V: Clone> ReadCache<K, V> {
    pub(super) fn new() -> Self {
        Self { state: Mutex::new(State { entries: HashMap::new(), epoch: 0 }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State<K, V>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn get(&self, key: &K) -> Option<V> {
        self.state().entries.get(key).cloned()
    }

    /// Take before reading the rows a fill will hold.
    pub(super) fn epoch(&self) -> u64 {
        self.state().epoch
    }

    /// Keeps `value`, read from the database since `epoch`, unless a write committed meanwhile.
    pub(super) fn fill(&self, epoch: u64, entries: impl IntoIterator<Item = (K, V)>) {
        let mut state = self.state();
        if state.epoch != epoch {
            return;
        }
        if state.entries.len() >= CAPACITY {
            state.entries.clear();
        }
        state.entries.extend(entries);
    }

    /// Call after a write that changed `key`'s rows has committed.
    pub(super) fn forget(&self, key: &K) {
        let mut state = self.state();
        state.entries.remove(key);
        state.epoch += 1;
    }

    /// Call after a write that may have changed any entry has committed.
    pub(super) fn forget_all(&self) {
        let mut state = self.state();
        state.entries.clear();
        state.epoch += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fill_read_before_a_write_committed_is_dropped() {
        let cache = ReadCache::new();
        let epoch = cache.epoch();
        // A write to "chat" commits while the fill's read is under way.
        cache.forget(&"chat");
        cache.fill(epoch, [("chat", 1)]);
        assert_eq!(cache.get(&"chat"), None, "the stale read is not kept");

        let epoch = cache.epoch();
        cache.fill(epoch, [("chat", 2)]);
        assert_eq!(cache.get(&"chat"), Some(2));
        cache.forget(&"chat");
        assert_eq!(cache.get(&"chat"), None, "a committed write empties its entry");
    }

    #[test]
    fn forget_all_empties_every_entry() {
        let cache = ReadCache::new();
        cache.fill(cache.epoch(), [("a", 1), ("b", 2)]);
        cache.forget_all();
        assert_eq!((cache.get(&"a"), cache.get(&"b")), (None, None));
    }
}
