//! Each vector store's matrix kept in memory between searches, so a search reads its vectors
//! from the store only when the vector store changed or was pushed out. Bounded in bytes,
//! least recently used out first, shared by every worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::vector::Matrix;

/// The matrices of recently searched vector stores, each under its store's id and the version
/// of its contents it was loaded at (a number the store raises whenever a file is added to or
/// removed from the vector store).
///
/// Workers share it: a search takes an `Arc` out and scans it with the lock released. A matrix
/// still in use after it was pushed out lives on until its last reader drops it, and is no
/// longer counted against the bound.
pub(crate) struct MatrixCache {
    max_bytes: usize,
    entries: Mutex<Entries>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// The cache's contents, under its one lock.
#[derive(Default)]
struct Entries {
    by_id: HashMap<String, Entry>,
    /// Sum of the entries' `bytes`, at most `max_bytes`.
    bytes: usize,
    /// Counts every use, to stamp entries with when they were last used.
    clock: u64,
}

struct Entry {
    version: u64,
    matrix: Arc<Matrix>,
    /// The matrix's size when it was put: what it counts against the bound.
    bytes: usize,
    /// The `clock` at its last use: the lowest is the least recently used.
    used: u64,
}

/// The cache's figures, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheStats {
    /// Bytes of the matrices held.
    pub(crate) bytes: usize,
    /// Vector stores whose matrix is held.
    pub(crate) entries: usize,
    /// `get`s that found the version asked for.
    pub(crate) hits: u64,
    /// `get`s that did not: absent, pushed out, or another version.
    pub(crate) misses: u64,
}

impl MatrixCache {
    /// An empty cache that will hold at most `max_bytes` of matrices ([`Matrix::bytes`]).
    pub(crate) fn new(max_bytes: usize) -> MatrixCache {
        MatrixCache {
            max_bytes,
            entries: Mutex::new(Entries::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Vector store `id`'s matrix, if it is held at exactly `version`. A held matrix of an
    /// older version is dropped on the way: the store has moved on and it will not be asked
    /// for again.
    pub(crate) fn get(&self, id: &str, version: u64) -> Option<Arc<Matrix>> {
        let mut entries = self.lock();
        let entries = &mut *entries;
        entries.clock += 1;
        let found = match entries.by_id.get_mut(id) {
            Some(entry) if entry.version == version => {
                entry.used = entries.clock;
                Some(Arc::clone(&entry.matrix))
            }
            Some(entry) if entry.version < version => {
                entries.remove(id);
                None
            }
            _ => None,
        };
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps `matrix` as vector store `id`'s at `version`, pushing out the least recently
    /// used matrices until the cache is within its bound, and hands `matrix` back for the
    /// caller to search.
    ///
    /// A matrix larger than the whole bound is not kept (the caller uses it once), nor is one
    /// older than the version already held (a slow load that lost a race with a newer one).
    pub(crate) fn put(&self, id: &str, version: u64, matrix: Arc<Matrix>) -> Arc<Matrix> {
        let bytes = matrix.bytes();
        let mut entries = self.lock();
        if entries.by_id.get(id).is_some_and(|e| e.version > version) {
            return matrix;
        }
        entries.remove(id);
        if bytes > self.max_bytes {
            return matrix;
        }
        while entries.bytes + bytes > self.max_bytes {
            entries.remove_least_recently_used();
        }
        entries.clock += 1;
        let entry = Entry {
            version,
            matrix: Arc::clone(&matrix),
            bytes,
            used: entries.clock,
        };
        entries.bytes += bytes;
        entries.by_id.insert(id.to_string(), entry);
        matrix
    }

    /// Forgets vector store `id`'s matrix (the vector store was deleted).
    pub(crate) fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let entries = self.lock();
        CacheStats {
            bytes: entries.bytes,
            entries: entries.by_id.len(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// The entries, even if a thread panicked holding the lock: every change to them is
    /// complete before anything that could panic.
    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Entries {
    fn remove(&mut self, id: &str) {
        if let Some(entry) = self.by_id.remove(id) {
            self.bytes -= entry.bytes;
        }
    }

    /// Pushes out the entry used longest ago. A scan of every entry: a cache holds a few
    /// vector stores, not thousands.
    fn remove_least_recently_used(&mut self) {
        let oldest = self
            .by_id
            .iter()
            .min_by_key(|(_, entry)| entry.used)
            .map(|(id, _)| id.clone());
        if let Some(id) = oldest {
            self.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matrix of `rows` rows of 10 dimensions, and its size.
    fn matrix(rows: usize) -> (Arc<Matrix>, usize) {
        let matrix = Matrix::with_capacity(10, rows);
        let bytes = matrix.bytes();
        (Arc::new(matrix), bytes)
    }

    #[test]
    fn a_matrix_put_is_found_at_its_version_and_counted() {
        let cache = MatrixCache::new(1 << 20);
        assert!(cache.get("vs_a", 1).is_none());
        let (m, bytes) = matrix(100);
        let returned = cache.put("vs_a", 1, Arc::clone(&m));
        assert!(Arc::ptr_eq(&returned, &m));
        assert!(Arc::ptr_eq(&cache.get("vs_a", 1).unwrap(), &m));
        assert_eq!(
            cache.stats(),
            CacheStats {
                bytes,
                entries: 1,
                hits: 1,
                misses: 1
            }
        );
    }

    #[test]
    fn another_version_is_a_miss_and_an_older_one_held_is_dropped() {
        let cache = MatrixCache::new(1 << 20);
        cache.put("vs_a", 5, matrix(10).0);
        assert!(cache.get("vs_a", 4).is_none(), "a reader behind the store");
        assert_eq!(cache.stats().entries, 1, "the newer matrix stays");
        assert!(cache.get("vs_a", 6).is_none());
        assert_eq!(cache.stats().entries, 0, "the stale matrix is gone");
        assert_eq!(cache.stats().bytes, 0);
        assert_eq!(cache.stats().misses, 2);
    }

    #[test]
    fn the_least_recently_used_is_pushed_out_first() {
        let (_, bytes) = matrix(100);
        let cache = MatrixCache::new(2 * bytes);
        cache.put("a", 1, matrix(100).0);
        cache.put("b", 1, matrix(100).0);
        assert!(cache.get("a", 1).is_some());
        cache.put("c", 1, matrix(100).0);
        assert!(cache.get("b", 1).is_none(), "b was used longest ago");
        assert!(cache.get("a", 1).is_some());
        assert!(cache.get("c", 1).is_some());
        assert_eq!(cache.stats().bytes, 2 * bytes);
    }

    #[test]
    fn the_cache_stays_within_its_byte_bound() {
        let (_, bytes) = matrix(50);
        let cache = MatrixCache::new(5 * bytes + bytes / 2);
        for i in 0..40 {
            cache.put(&format!("vs_{i}"), 1, matrix(50 + i % 7).0);
            assert!(cache.stats().bytes <= 5 * bytes + bytes / 2);
        }
        assert!(cache.stats().entries >= 3);
        // A new version of a store replaces its old matrix in the count.
        cache.put("vs_39", 2, matrix(50).0);
        let held: usize = cache.lock().by_id.values().map(|e| e.bytes).sum();
        assert_eq!(cache.stats().bytes, held);
    }

    #[test]
    fn a_matrix_larger_than_the_bound_is_returned_but_not_kept() {
        let (_, bytes) = matrix(100);
        let cache = MatrixCache::new(bytes);
        cache.put("vs_a", 1, matrix(100).0);
        let (big, _) = matrix(1000);
        let returned = cache.put("vs_a", 2, Arc::clone(&big));
        assert!(Arc::ptr_eq(&returned, &big));
        assert!(cache.get("vs_a", 2).is_none());
        assert!(
            cache.get("vs_a", 1).is_none(),
            "version 1 is stale all the same"
        );
        assert_eq!(cache.stats().entries, 0);
        assert_eq!(cache.stats().bytes, 0);
    }

    #[test]
    fn a_put_older_than_the_version_held_is_not_kept() {
        let cache = MatrixCache::new(1 << 20);
        let (newer, _) = matrix(10);
        cache.put("vs_a", 3, Arc::clone(&newer));
        cache.put("vs_a", 2, matrix(10).0);
        assert!(Arc::ptr_eq(&cache.get("vs_a", 3).unwrap(), &newer));
    }

    #[test]
    fn remove_forgets_the_store() {
        let cache = MatrixCache::new(1 << 20);
        cache.put("vs_a", 1, matrix(10).0);
        cache.remove("vs_a");
        cache.remove("vs_never");
        assert!(cache.get("vs_a", 1).is_none());
        assert_eq!(cache.stats().bytes, 0);
    }

    #[test]
    fn workers_share_the_cache_and_it_keeps_its_bound() {
        let (_, bytes) = matrix(20);
        let cache = MatrixCache::new(4 * bytes);
        std::thread::scope(|scope| {
            for t in 0..4 {
                let cache = &cache;
                scope.spawn(move || {
                    for i in 0..200u64 {
                        let id = format!("vs_{}", (i + t) % 6);
                        if cache.get(&id, i / 50).is_none() {
                            cache.put(&id, i / 50, matrix(20).0);
                        }
                    }
                });
            }
        });
        let stats = cache.stats();
        assert!(stats.bytes <= 4 * bytes && stats.entries <= 4, "{stats:?}");
        assert_eq!(stats.hits + stats.misses, 800);
    }
}
