//! The DEK cache: plaintext DEKs by wrapped DEK, so that opening many messages sealed under one
//! DEK makes one `UnwrapKey` call.
//!
//! Bounded three ways: by age (`max_age`: how long a DEK may be used after the broker last
//! unwrapped it — this is also how long a key that was disabled or cut off at the broker stays
//! usable for data whose DEK is cached), by uses (`max_uses` opens per unwrap), and by size
//! (`capacity` entries; the oldest goes first). Evicted DEKs are erased ([`DataKey`] zeroizes on
//! drop). Each entry remembers the broker key that unwrapped it, and is served only to an open
//! that accepts that key ([`crate::OpenKeys`]): clients made with
//! [`Client::with_open_keys`](crate::Client::with_open_keys) share one cache, and a DEK unwrapped
//! for one of them must not open another's message under a key it refuses. A std mutex guards the map: it is held only for a lookup or an insert, never across
//! an `.await` (the same reasoning as mini-redis's `db.rs`).

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{format::DataKey, pinning::Accepted};

/// How the DEK cache is bounded.
#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    /// Longest a DEK is used after its unwrap. Default 60 s.
    pub max_age: Duration,
    /// Most opens served by one unwrap (the first included). Default 1000.
    pub max_uses: u64,
    /// Most DEKs held. 0 turns the cache off. Default 1000.
    pub capacity: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(60),
            max_uses: 1000,
            capacity: 1000,
        }
    }
}

impl CacheConfig {
    /// No caching: every open unwraps.
    pub fn disabled() -> Self {
        Self {
            capacity: 0,
            ..Self::default()
        }
    }
}

struct Entry {
    key: DataKey,
    /// The broker key that unwrapped it (`tenant/name`, as the broker reported it).
    kek: String,
    inserted: Instant,
    uses: u64,
}

/// What the cache has for a wrapped DEK, for one open.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Cached {
    /// The DEK, unwrapped under a key the open accepts (a hit).
    Hit(DataKey),
    /// The DEK was unwrapped under a key the open does not accept: not served (and neither a hit
    /// nor a use). The same envelope always names the same key, so the broker would not give
    /// another answer: the open is refused.
    NotAccepted,
    /// Nothing usable cached.
    Miss,
}

impl Cached {
    /// What an open does with it: use the DEK, refuse the message (as any other unauthentic
    /// one), or unwrap.
    pub(crate) fn served(self) -> crate::Result<Option<DataKey>> {
        match self {
            Cached::Hit(key) => Ok(Some(key)),
            Cached::NotAccepted => Err(crate::Error::Unauthentic),
            Cached::Miss => Ok(None),
        }
    }
}

/// Counters, for tests and dashboards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Opens served from the cache.
    pub hits: u64,
    /// Opens that had to unwrap (concurrent opens of one DEK share one miss and one unwrap).
    pub misses: u64,
    /// DEKs erased because of age, use count or capacity.
    pub evictions: u64,
    /// DEKs held now.
    pub entries: usize,
}

pub(crate) struct DekCache {
    cfg: CacheConfig,
    map: Mutex<HashMap<Vec<u8>, Entry>>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl DekCache {
    pub(crate) fn new(cfg: CacheConfig) -> Self {
        Self {
            cfg,
            map: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn expired(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.inserted) >= self.cfg.max_age || e.uses >= self.cfg.max_uses
    }

    /// The DEK of `wrapped` for an open that accepts `accepted`, counting a hit when served. (A
    /// miss is counted by [`DekCache::record_miss`] when the caller really unwraps.)
    pub(crate) fn get(&self, wrapped: &[u8], accepted: &Accepted, now: Instant) -> Cached {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let found = match map.get_mut(wrapped) {
            Some(e) if !self.expired(e, now) && !accepted.allows(&e.kek) => {
                return Cached::NotAccepted;
            }
            Some(e) if !self.expired(e, now) => {
                e.uses += 1;
                let key = e.key.clone();
                if e.uses >= self.cfg.max_uses {
                    map.remove(wrapped);
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                Some(key)
            }
            Some(_) => {
                map.remove(wrapped);
                self.evictions.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => None,
        };
        match found {
            Some(key) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Cached::Hit(key)
            }
            None => Cached::Miss,
        }
    }

    /// Counts an open that has to unwrap.
    pub(crate) fn record_miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `wrapped` is cached and usable (no counting).
    pub(crate) fn contains(&self, wrapped: &[u8], now: Instant) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(wrapped).is_some_and(|e| !self.expired(e, now))
    }

    /// Caches the DEK of `wrapped`, which broker key `kek` unwrapped, after an unwrap (which
    /// counts as its first use).
    pub(crate) fn insert(&self, wrapped: &[u8], key: DataKey, kek: &str, now: Instant) {
        if self.cfg.capacity == 0 || self.cfg.max_uses <= 1 || self.cfg.max_age.is_zero() {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.cfg.capacity && !map.contains_key(wrapped) {
            let before = map.len();
            map.retain(|_, e| !self.expired(e, now));
            let mut evicted = (before - map.len()) as u64;
            if map.len() >= self.cfg.capacity {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, e)| e.inserted)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    map.remove(&k);
                    evicted += 1;
                }
            }
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
        map.insert(
            wrapped.to_vec(),
            Entry {
                key,
                kek: kek.to_string(),
                inserted: now,
                uses: 1,
            },
        );
    }

    /// Erases every cached DEK.
    pub(crate) fn clear(&self) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        self.evictions
            .fetch_add(map.len() as u64, Ordering::Relaxed);
        map.clear();
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let entries = self.map.lock().map(|m| m.len()).unwrap_or(0);
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> DataKey {
        DataKey::take(&mut vec![b; 32]).expect("32 bytes")
    }

    const KEK: &str = "acme/a";

    fn any() -> Accepted {
        Accepted::Any
    }

    fn cache(max_age_s: u64, max_uses: u64, capacity: usize) -> DekCache {
        DekCache::new(CacheConfig {
            max_age: Duration::from_secs(max_age_s),
            max_uses,
            capacity,
        })
    }

    #[test]
    fn hit_until_the_use_bound_then_miss() {
        let c = cache(60, 3, 10);
        let t = Instant::now();
        assert_eq!(c.get(b"w", &any(), t), Cached::Miss);
        c.record_miss();
        c.insert(b"w", key(1), KEK, t); // use 1
        assert_eq!(c.get(b"w", &any(), t), Cached::Hit(key(1))); // use 2
        assert_eq!(c.get(b"w", &any(), t), Cached::Hit(key(1))); // use 3: evicted after serving
        assert_eq!(c.get(b"w", &any(), t), Cached::Miss);
        c.record_miss();
        assert_eq!(
            c.stats(),
            CacheStats {
                hits: 2,
                misses: 2,
                evictions: 1,
                entries: 0
            }
        );
    }

    #[test]
    fn entries_expire_by_age() {
        let c = cache(60, 100, 10);
        let t = Instant::now();
        c.insert(b"w", key(1), KEK, t);
        assert_eq!(
            c.get(b"w", &any(), t + Duration::from_secs(59)),
            Cached::Hit(key(1))
        );
        assert!(c.contains(b"w", t + Duration::from_secs(59)));
        assert!(!c.contains(b"w", t + Duration::from_secs(60)));
        assert_eq!(
            c.get(b"w", &any(), t + Duration::from_secs(60)),
            Cached::Miss
        );
        assert_eq!(c.stats().evictions, 1);
        assert_eq!(c.stats().entries, 0);
    }

    #[test]
    fn capacity_evicts_the_oldest_and_zero_capacity_caches_nothing() {
        let c = cache(60, 100, 2);
        let t = Instant::now();
        c.insert(b"a", key(1), KEK, t);
        c.insert(b"b", key(2), KEK, t + Duration::from_secs(1));
        c.insert(b"c", key(3), KEK, t + Duration::from_secs(2));
        let now = t + Duration::from_secs(3);
        assert!(!c.contains(b"a", now));
        assert!(c.contains(b"b", now) && c.contains(b"c", now));
        assert_eq!(c.stats().evictions, 1);
        c.clear();
        assert_eq!(c.stats().entries, 0);

        let off = DekCache::new(CacheConfig::disabled());
        off.insert(b"a", key(1), KEK, t);
        assert_eq!(off.get(b"a", &any(), t), Cached::Miss);
    }

    #[test]
    fn a_dek_is_served_only_to_an_open_that_accepts_the_key_that_unwrapped_it() {
        let c = cache(60, 100, 10);
        let t = Instant::now();
        c.insert(b"w", key(1), "evil/inbox", t);
        let strict = Accepted::new(&crate::OpenKeys::only(["acme/a", "acme/b"])).expect("keys");
        assert_eq!(c.get(b"w", &strict, t), Cached::NotAccepted);
        // Refused entries are neither hits nor uses, and stay for the opens that accept them.
        assert_eq!(c.stats().hits, 0);
        let evil = Accepted::new(&crate::OpenKeys::only(["evil/inbox"])).expect("keys");
        assert_eq!(c.get(b"w", &evil, t), Cached::Hit(key(1)));
        assert_eq!(c.get(b"w", &any(), t), Cached::Hit(key(1)));
        assert_eq!(c.get(b"w", &strict, t), Cached::NotAccepted);
        assert_eq!((c.stats().hits, c.stats().entries), (2, 1));
    }
}
