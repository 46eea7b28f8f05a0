//! Several replicas on one shared store (PostgreSQL) and one HSM token: keeping each replica's
//! in-memory keyring in step with the others.
//!
//! **Reads are never stale.** Before every request (gRPC and KMS v2) the keyring asks the store
//! for its generation ([`Keyring::sync`]: one indexed single-row read) and, when another replica
//! changed something, fetches exactly what changed and installs it before the request proceeds.
//! A key rotated through replica A and then used through replica B therefore wraps under the new
//! version deterministically, not after a notification happens to arrive. Concurrent requests
//! share one check: a request waits for a check that *started* after it arrived, never for an
//! older one, so the answer is as fresh as a check of its own. `[store] max_staleness_ms` trades
//! this for fewer queries (a check at most that often; LISTEN/NOTIFY still refreshes at once).
//! An envelope naming a version this replica does not know forces a check before it is called
//! unauthentic.
//!
//! **Notifications refresh ahead of time.** Every change in the store sends a `NOTIFY`; a task
//! here refreshes as soon as it arrives (and after the listening connection reconnects), so the
//! per-request check normally finds nothing to do.
//!
//! **Writes are serialised across replicas.** [`Keyring::write`] takes the keyring's own mutex,
//! then the store's cluster-wide lock, then refreshes: create/rotate/import/update/delete/
//! recover/purge/trim decide on a cache that includes every other replica's changes.
//!
//! **New versions are checked before they serve.** A version created by another replica is
//! found in the token by its `CKA_ID`, its template read back and its canary unwrapped — the same
//! checks as at start-up — before this replica uses it (SoftHSM2 and Kryoptic both show another
//! process's new token objects to a session that searches again; the e2e tests prove it). A
//! version that fails quarantines its key on this replica (fail closed), as at start-up.
//!
//! **Local changes win over older snapshots.** A refresh reads a consistent snapshot, checks the
//! HSM objects, then installs under a mutex; if this replica changed its cache in between (its
//! own write, which is newer than the snapshot), the refresh starts again instead of installing
//! older data over it.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    KeyEntry, KeyState, Keyring, Lifecycle, Usage, VersionEntry, blocking,
    integrity::canary_to_check,
};
use crate::{
    error::{BrokerError, Deadline, Unavailable},
    hsm::ExpectedKek,
    model::KeyName,
    store::{StoreLock, StoredKey, StoredLifecycle},
};

type SettingWatcher = Arc<dyn Fn(&str) + Send + Sync>;

/// The keyring's replica bookkeeping.
pub struct ReplicaState {
    /// The store generation the cache reflects.
    applied: AtomicI64,
    /// One generation check at a time; the counters let a request skip checks that started
    /// before it arrived.
    check: tokio::sync::Mutex<()>,
    checks_started: AtomicU64,
    checks_done: AtomicU64,
    /// When the last check finished (for `max_staleness`).
    last_check: Mutex<Option<Instant>>,
    /// `[store] max_staleness_ms`; 0 = check before every request.
    max_staleness_ms: AtomicU64,
    /// Bumped (under `install`) whenever this process changes its own cache.
    local_changes: AtomicU64,
    install: Mutex<()>,
    watchers: RwLock<Vec<(String, SettingWatcher)>>,
}

impl ReplicaState {
    pub(crate) fn new(applied: i64) -> Self {
        Self {
            applied: AtomicI64::new(applied),
            check: tokio::sync::Mutex::new(()),
            checks_started: AtomicU64::new(0),
            checks_done: AtomicU64::new(0),
            last_check: Mutex::new(None),
            max_staleness_ms: AtomicU64::new(0),
            local_changes: AtomicU64::new(0),
            install: Mutex::new(()),
            watchers: RwLock::new(Vec::new()),
        }
    }

    /// The store generation the cache reflects.
    pub fn applied(&self) -> i64 {
        self.applied.load(Ordering::SeqCst)
    }
}

/// Releases a cluster-wide store lock when dropped (on a blocking thread: the release is a
/// database round trip).
pub(crate) struct ReleaseOnDrop(pub(crate) Option<StoreLock>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(l) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(move || l.release());
                }
                Err(_) => l.release(),
            }
        }
    }
}

/// Held while a change that touches the HSM and the store runs: the keyring's mutex and, with a
/// shared store, the cluster-wide lock (released after the mutex guard is dropped... and before
/// the next writer on this replica can take the cluster lock, which waits for it).
pub(crate) struct WriteGuard<'a> {
    _cluster: ReleaseOnDrop,
    _local: tokio::sync::MutexGuard<'a, ()>,
}

impl Keyring {
    /// Takes the write locks and brings the cache up to date (see the module docs).
    pub(crate) async fn write(&self) -> Result<WriteGuard<'_>, BrokerError> {
        // A hung HSM holding the lock must not pile requests up: wait at most until the
        // request's deadline (the caller hears DEADLINE_EXCEEDED); work whose deadline has
        // passed is not started.
        let expired = || BrokerError::from(Deadline::WriteLock);
        let local = match crate::hsm::RequestScope::current_deadline() {
            None => self.write_lock.lock().await,
            Some(d) if d <= std::time::Instant::now() => return Err(expired()),
            Some(d) => tokio::time::timeout_at(d.into(), self.write_lock.lock())
                .await
                .map_err(|_| expired())?,
        };
        let st = self.store.clone();
        let cluster = blocking(move || st.lock_writes().map_err(BrokerError::from)).await?;
        let guard = WriteGuard {
            _cluster: ReleaseOnDrop(cluster),
            _local: local,
        };
        self.sync_now().await?;
        Ok(guard)
    }

    /// Sets `[store] max_staleness_ms`.
    pub fn set_max_staleness(&self, d: Duration) {
        self.replica.max_staleness_ms.store(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Calls `f` with the new value whenever another replica changes the setting `name` (e.g.
    /// the HYOK kill switch).
    pub fn on_setting(&self, name: &str, f: impl Fn(&str) + Send + Sync + 'static) {
        self.replica
            .watchers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_string(), Arc::new(f)));
    }

    /// Brings the cache up to date with the shared store before a request (no-op for SQLite;
    /// at most every `max_staleness_ms` when that is set).
    pub async fn sync(&self) -> Result<(), BrokerError> {
        if !self.store.is_shared() {
            return Ok(());
        }
        let max = self.replica.max_staleness_ms.load(Ordering::Relaxed);
        if max > 0 {
            let fresh = self
                .replica
                .last_check
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < Duration::from_millis(max));
            if fresh {
                return Ok(());
            }
        }
        self.sync_now().await
    }

    /// Brings the cache up to date now (whatever `max_staleness_ms` says).
    pub async fn sync_now(&self) -> Result<(), BrokerError> {
        if !self.store.is_shared() {
            return Ok(());
        }
        let r = &self.replica;
        let arrived = r.checks_started.load(Ordering::SeqCst);
        let _g = r.check.lock().await;
        // A check that started after this request arrived has finished: its answer is as fresh
        // as one of our own.
        if r.checks_done.load(Ordering::SeqCst) > arrived {
            return Ok(());
        }
        let n = r.checks_started.fetch_add(1, Ordering::SeqCst) + 1;
        let result = self.refresh().await;
        if result.is_ok() {
            r.checks_done.store(n, Ordering::SeqCst);
            *r.last_check.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        result
    }

    /// Makes sure a version named by an envelope is known if it exists anywhere: a version
    /// unknown here forces a check before it is called unauthentic.
    pub(crate) async fn ensure_known(
        &self,
        id: crate::model::VersionId,
    ) -> Result<(), BrokerError> {
        if !self.store.is_shared() || self.knows_version(id) {
            return Ok(());
        }
        self.sync_now().await
    }

    /// Whether the cache has this version.
    pub(crate) fn knows_version(&self, id: crate::model::VersionId) -> bool {
        self.versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
    }

    /// Records a change this process made to its own cache (see "Local changes win").
    pub(crate) fn local_change<R>(&self, f: impl FnOnce() -> R) -> R {
        let _g = self
            .replica
            .install
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.replica.local_changes.fetch_add(1, Ordering::SeqCst);
        f()
    }

    async fn refresh(&self) -> Result<(), BrokerError> {
        for _attempt in 0..5 {
            let r = &self.replica;
            let before = r.local_changes.load(Ordering::SeqCst);
            let applied = r.applied();
            let st = self.store.clone();
            let generation = blocking(move || st.generation().map_err(BrokerError::from))
                .await?
                .unwrap_or(applied);
            if generation <= applied {
                return Ok(());
            }
            let st = self.store.clone();
            let changes =
                blocking(move || st.changes_since(applied).map_err(BrokerError::from)).await?;
            let mut prepared = Vec::with_capacity(changes.keys.len());
            for (name, _, stored) in changes.keys {
                let entry = match stored {
                    Some(k) => Some(self.prepare(k).await?),
                    None => None,
                };
                prepared.push((name, entry));
            }
            {
                let _g = r.install.lock().unwrap_or_else(|p| p.into_inner());
                if r.local_changes.load(Ordering::SeqCst) != before {
                    // Our own newer change landed meanwhile: read again.
                    continue;
                }
                for (name, entry) in prepared {
                    self.install(&name, entry);
                }
                r.applied.fetch_max(changes.generation, Ordering::SeqCst);
            }
            let watchers = r.watchers.read().unwrap_or_else(|p| p.into_inner()).clone();
            for (name, value) in &changes.settings {
                for (w, f) in &watchers {
                    if w == name {
                        f(value);
                    }
                }
            }
            tracing::debug!(
                generation = changes.generation,
                "cache refreshed from the shared store"
            );
            return Ok(());
        }
        Err(Unavailable::Unsettled.into())
    }

    /// Builds the cache entry for a key another replica changed, attaching and checking any
    /// version this process has not seen. An HSM fault fails the refresh (retried by the next
    /// request); a failed integrity check quarantines the key here.
    async fn prepare(
        &self,
        k: StoredKey,
    ) -> Result<
        (
            KeyEntry,
            Vec<(crate::model::VersionId, u64, u64, Option<i64>)>,
        ),
        BrokerError,
    > {
        let mut problems = Vec::new();
        for v in &k.versions {
            // An external key's versions have no HSM object to attach.
            if self.hsm.has_handles(v.id) || !k.attributes.in_hsm() {
                continue;
            }
            let canary = match canary_to_check(
                k.algorithm,
                v.id,
                v.canary.as_deref(),
                v.canary_digest.as_deref(),
            ) {
                Ok(c) => c,
                Err(why) => {
                    problems.push(format!("version {}: {why}", v.number));
                    continue;
                }
            };
            let expected = ExpectedKek {
                id: v.id,
                key_type: k.key_type,
                algorithm: k.algorithm,
                origin: v.origin,
                canary: Some(canary),
            };
            match self
                .hsm
                .attach_one(expected)
                .await
                .map_err(BrokerError::from)?
            {
                Ok(()) => {
                    tracing::info!(key = %k.name, version = v.number, version_id = %v.id,
                        "attached a key version made by another replica");
                }
                Err(why) => problems.push(format!("version {}: {why}", v.number)),
            }
        }
        let state = if problems.is_empty() {
            KeyState::Enabled
        } else {
            let why = problems.join("; ");
            tracing::error!(key = %k.name, problems = %why,
                "KEK integrity check failed for a version made by another replica; key quarantined on this replica");
            for v in &k.versions {
                self.hsm.detach(v.id);
            }
            KeyState::Quarantined(why)
        };
        let usage = k
            .versions
            .iter()
            .map(|v| (v.id, v.wraps, v.unwraps, v.last_used_ms))
            .collect();
        Ok((entry_from_stored(&k, state), usage))
    }

    /// Installs (or, for `None`, removes) one key's cache entry, with its version index,
    /// usage counters and HSM handles.
    #[allow(clippy::type_complexity)]
    fn install(
        &self,
        name: &KeyName,
        entry: Option<(
            KeyEntry,
            Vec<(crate::model::VersionId, u64, u64, Option<i64>)>,
        )>,
    ) {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let mut versions = self.versions.write().unwrap_or_else(|p| p.into_inner());
        let mut usage = self.usage.write().unwrap_or_else(|p| p.into_inner());
        let old: HashSet<_> = keys
            .get(name)
            .map(|e| e.versions.iter().map(|v| v.id).collect())
            .unwrap_or_default();
        let new: HashSet<_> = entry
            .as_ref()
            .map(|(e, _)| e.versions.iter().map(|v| v.id).collect())
            .unwrap_or_default();
        for gone in old.difference(&new) {
            versions.remove(gone);
            usage.remove(gone);
            self.hsm.detach(*gone);
        }
        match entry {
            Some((e, counts)) => {
                for v in &e.versions {
                    versions.insert(v.id, (name.clone(), v.number));
                }
                for (id, w, u, last) in counts {
                    usage
                        .entry(id)
                        .or_insert_with(|| Arc::new(Usage::new(0, 0, None)))
                        .set_saved(w, u, last);
                }
                keys.insert(name.clone(), Arc::new(e));
            }
            None => {
                keys.remove(name);
            }
        }
    }

    /// Refreshes as soon as another replica announces a change (shared stores only).
    pub fn spawn_change_listener(self: &Arc<Self>) {
        let Some(notify) = self.store.change_notifications() else {
            return;
        };
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                notify.notified().await;
                let Some(k) = me.upgrade() else { return };
                if let Err(e) = k.sync_now().await {
                    tracing::warn!(error = %e, "refresh after a change notification failed; the next request retries");
                }
            }
        });
    }
}

/// A cache entry from a stored key (its versions as given).
pub(crate) fn entry_from_stored(k: &StoredKey, state: KeyState) -> KeyEntry {
    let lifecycle = match &k.lifecycle {
        StoredLifecycle::Deleted {
            deleted_at_ms,
            purge_at_ms,
            deleted_by,
        } => Lifecycle::Deleted {
            deleted_at_ms: *deleted_at_ms,
            purge_at_ms: *purge_at_ms,
            deleted_by: deleted_by.clone(),
        },
        _ => Lifecycle::Active,
    };
    KeyEntry {
        name: k.name.clone(),
        key_type: k.key_type,
        algorithm: k.algorithm,
        created_at_ms: k.created_at_ms,
        updated_at_ms: k.updated_at_ms,
        state,
        lifecycle,
        attributes: k.attributes.clone(),
        versions: k
            .versions
            .iter()
            .map(|v| VersionEntry {
                number: v.number,
                id: v.id,
                created_at_ms: v.created_at_ms,
                origin: v.origin,
                expires_ms: v.expires_ms,
            })
            .collect(),
    }
}
