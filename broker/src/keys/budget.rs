//! The AES-GCM invocation budget of each key version.
//!
//! An AES-256-GCM version wraps with a random 96-bit IV per call. NIST SP 800-38D §8.3 bounds
//! the invocations of one key with random IVs to 2^32: past it the chance of two calls sharing
//! an IV passes 2^-32, and one shared IV gives away both plaintexts' XOR and the GHASH key
//! (forgeries). `WrapKey` takes caller-chosen DEKs, so a collision would leak another caller's
//! DEK. At the measured 15–18k wraps/s one version would pass 2^32 in about three days.
//!
//! So each version has a budget (`[lifecycle] gcm_invocation_limit`, default 2^32) that holds
//! across replicas: a broker reserves invocations in blocks (`gcm_reservation_block`) in the
//! store, which never grants past the limit, and spends them from memory. A crash loses the
//! unspent part of a block, which errs on the safe side. When a reservation passes half the
//! limit the maintenance task rotates the key; a version whose budget is spent wraps no more
//! (FAILED_PRECONDITION naming the key), unwrapping what it wrapped as before.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use crate::{error::BrokerError, model::VersionId, store::Store};

/// NIST SP 800-38D's bound on random-IV invocations of one key.
pub const NIST_LIMIT: u64 = 1 << 32;
/// Invocations reserved in the store at a time, by default.
pub const DEFAULT_BLOCK: u64 = 1 << 16;

/// What a version's budget granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    /// Invocations granted (at most the number asked for).
    pub count: u64,
    /// The version's limit.
    pub limit: u64,
}

#[derive(Default)]
struct Lease {
    next: u64,
    end: u64,
}

/// The budgets of every AES-GCM version this broker wraps with.
pub struct GcmBudget {
    limit: u64,
    block: u64,
    leases: Mutex<HashMap<VersionId, Arc<tokio::sync::Mutex<Lease>>>>,
    rotate: Mutex<HashSet<VersionId>>,
}

impl GcmBudget {
    /// Budgets of `limit` invocations per version, reserved `block` at a time.
    pub fn new(limit: u64, block: u64) -> Self {
        Self {
            limit: limit.max(1),
            block: block.clamp(1, limit.max(1)),
            leases: Mutex::new(HashMap::new()),
            rotate: Mutex::new(HashSet::new()),
        }
    }

    /// The per-version limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Takes `n` invocations of version `id`, reserving more in `store` when this broker's share
    /// runs out; fewer than `n` once the budget is spent.
    pub async fn take(
        &self,
        store: &Arc<Store>,
        id: VersionId,
        n: u64,
    ) -> Result<Granted, BrokerError> {
        let lease = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone();
        let mut l = lease.lock().await;
        let mut count = 0;
        loop {
            let t = (l.end - l.next).min(n - count);
            l.next += t;
            count += t;
            if count == n {
                break;
            }
            let want = self.block.max(n - count);
            let (st, limit) = (store.clone(), self.limit);
            let (start, end) =
                super::blocking(move || Ok(st.reserve_gcm(id, want, limit)?)).await?;
            if end.saturating_mul(2) >= self.limit {
                self.rotate
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id);
            }
            if start >= end {
                break;
            }
            *l = Lease { next: start, end };
        }
        Ok(Granted {
            count,
            limit: self.limit,
        })
    }

    /// Whether version `id` has reserved half its budget or more (the key is due a rotation).
    pub fn wants_rotation(&self, id: VersionId) -> bool {
        self.rotate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_version(dir: &std::path::Path) -> (Arc<Store>, VersionId) {
        let store = Arc::new(Store::open(&dir.join("s.db")).expect("store"));
        let id = VersionId::random();
        let name = crate::model::KeyName::parse("t/k").expect("name");
        store
            .begin_create(
                &name,
                crate::model::KeyType::Aes256,
                crate::model::Algorithm::Aes256Gcm,
                &Default::default(),
                crate::model::Origin::Generated,
                id,
                1,
            )
            .expect("create");
        (store, id)
    }

    #[tokio::test]
    async fn a_budget_is_spent_in_blocks_never_past_its_limit_and_asks_for_rotation_at_half() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, id) = store_with_version(dir.path());
        let b = GcmBudget::new(40, 8);
        assert_eq!(b.take(&store, id, 5).await.expect("take").count, 5);
        assert_eq!(
            store.reserve_gcm(id, 0, 40).expect("peek"),
            (8, 8),
            "one block"
        );
        // 3 left of the block, then 9 more reserved for the rest of the call.
        assert_eq!(b.take(&store, id, 12).await.expect("take").count, 12);
        assert_eq!(store.reserve_gcm(id, 0, 40).expect("peek"), (17, 17));
        assert!(!b.wants_rotation(id), "17 of 40 is under half");
        // A second broker on the same store gets what the first has not reserved.
        let other = GcmBudget::new(40, 8);
        assert_eq!(other.take(&store, id, 10).await.expect("take").count, 10);
        assert!(other.wants_rotation(id), "27 of 40 is past half");
        // The rest of the limit, and nothing past it.
        let g = b.take(&store, id, 100).await.expect("take");
        assert_eq!(
            g,
            Granted {
                count: 13,
                limit: 40
            }
        );
        assert!(b.wants_rotation(id));
        assert_eq!(other.take(&store, id, 100).await.expect("take").count, 0);
        assert_eq!(
            5 + 12 + 10 + g.count,
            40,
            "every invocation of the limit is granted once, none past it"
        );
        assert_eq!(b.take(&store, id, 1).await.expect("take").count, 0);
    }
}
