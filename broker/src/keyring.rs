//! The keyring: key metadata cached in memory, backed by the store, with key material in the
//! HSM. It implements every key operation in domain terms; the gRPC layer only converts.
//!
//! The hot path (wrap/unwrap) reads the in-memory maps under a read lock and makes exactly one
//! HSM call; it never touches the store or searches the token.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{StreamExt, stream};
use sha2::{Digest, Sha256};

use crate::{
    audit::AuditLog,
    envelope::{self, GCM_IV_LEN},
    error::BrokerError,
    hsm::{Canary, ExpectedKek, Hsm, WrapParams},
    model::{
        Algorithm, DEFAULT_DEK_LEN, Dek, KeyAttributes, KeyName, KeyOp, KeyType, MAX_AAD_LEN,
        Origin, VersionId, check_dek_len, now_ms,
    },
    store::{Store, StoredKey, StoredLifecycle, VersionState},
};

/// What to do with a key that fails its start-up integrity check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntegrityPolicy {
    /// Refuse to start (the default: fail closed, loudly).
    Fail,
    /// Start, but refuse every operation on the affected key (state QUARANTINED).
    Quarantine,
}

/// A key's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// Serves requests.
    Enabled,
    /// Failed an integrity check; refuses everything. Carries the reason (for operators).
    Quarantined(String),
}

/// One version of a key.
#[derive(Clone, Debug)]
pub struct VersionEntry {
    /// The version number (1, 2, ...).
    pub number: u32,
    /// The version id (`CKA_ID`).
    pub id: VersionId,
    /// Creation time (ms).
    pub created_at_ms: i64,
    /// Generated or imported.
    pub origin: Origin,
    /// When this version stops wrapping (rotation policy).
    pub expires_ms: Option<i64>,
}

/// A key's lifecycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// In use.
    Active,
    /// Soft-deleted: refuses everything, name reserved until purged.
    Deleted {
        /// When.
        deleted_at_ms: i64,
        /// When it will be purged.
        purge_at_ms: i64,
        /// Who deleted it.
        deleted_by: String,
    },
}

/// A key's metadata.
#[derive(Clone, Debug)]
pub struct KeyEntry {
    /// The full name.
    pub name: KeyName,
    /// The key type.
    pub key_type: KeyType,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Creation time (ms).
    pub created_at_ms: i64,
    /// Last attribute change (ms).
    pub updated_at_ms: i64,
    /// Integrity state.
    pub state: KeyState,
    /// Active or soft-deleted.
    pub lifecycle: Lifecycle,
    /// Attributes.
    pub attributes: KeyAttributes,
    /// The versions, oldest first (never empty).
    pub versions: Vec<VersionEntry>,
}

impl KeyEntry {
    /// The newest version (the one that wraps).
    pub fn current(&self) -> Result<&VersionEntry, BrokerError> {
        self.versions
            .last()
            .ok_or_else(|| BrokerError::internal(format!("key {} has no versions", self.name)))
    }

    /// A version by number.
    pub fn version(&self, number: u32) -> Option<&VersionEntry> {
        self.versions.iter().find(|v| v.number == number)
    }

    /// Refuses a quarantined or deleted key.
    pub(crate) fn usable(&self) -> Result<(), BrokerError> {
        if let Lifecycle::Deleted { purge_at_ms, .. } = &self.lifecycle {
            return Err(BrokerError::precondition(format!(
                "key {} is deleted (purge scheduled at {} ms); RecoverKey brings it back",
                self.name, purge_at_ms
            )));
        }
        match &self.state {
            KeyState::Enabled => Ok(()),
            KeyState::Quarantined(_) => Err(BrokerError::precondition(format!(
                "key {} is quarantined: it failed its HSM integrity check at start-up; see the broker log",
                self.name
            ))),
        }
    }

    /// Whether `v` may still unwrap (at or above the minimum decryption version).
    pub fn decryptable(&self, v: &VersionEntry) -> bool {
        v.number >= self.attributes.min_decryption_version
    }

    /// Checks that the key may do `op` with version `v` now (DESIGN §3.9): usable, enabled,
    /// the operation allowed, inside not-before; for new envelopes not expired (expired keys
    /// still unwrap, as in Azure Key Vault); for unwrapping, not below the minimum decryption
    /// version.
    pub fn check(&self, op: KeyOp, v: &VersionEntry, now: i64) -> Result<(), BrokerError> {
        self.usable()?;
        let a = &self.attributes;
        if !a.enabled {
            return Err(BrokerError::precondition(format!(
                "key {} is disabled",
                self.name
            )));
        }
        if !a.operations.contains(&op) {
            return Err(BrokerError::precondition(format!(
                "key {} does not allow {}",
                self.name,
                op.as_str()
            )));
        }
        if a.not_before_ms.is_some_and(|nb| now < nb) {
            return Err(BrokerError::precondition(format!(
                "key {} is not valid before {} ms",
                self.name,
                a.not_before_ms.unwrap_or(0)
            )));
        }
        match op {
            KeyOp::Wrap | KeyOp::GenerateDataKey => {
                if a.expires_ms.is_some_and(|e| now >= e) {
                    return Err(BrokerError::precondition(format!(
                        "key {} expired at {} ms: it still unwraps, but makes no new envelopes",
                        self.name,
                        a.expires_ms.unwrap_or(0)
                    )));
                }
                if v.expires_ms.is_some_and(|e| now >= e) {
                    return Err(BrokerError::precondition(format!(
                        "version {} of key {} expired; rotate the key",
                        v.number, self.name
                    )));
                }
            }
            KeyOp::Unwrap | KeyOp::Rewrap => {
                if !self.decryptable(v) {
                    return Err(BrokerError::precondition(format!(
                        "version {} of key {} is below its minimum decryption version {}",
                        v.number, self.name, a.min_decryption_version
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Usage counters of one version (telemetry: is an old version still used before trimming?).
#[derive(Debug, Default)]
pub struct Usage {
    /// Wraps.
    pub wraps: AtomicU64,
    /// Unwraps.
    pub unwraps: AtomicU64,
    /// Last use (ms).
    pub last_used_ms: AtomicI64,
    /// Counted here and not yet added to the store (wraps, unwraps).
    unsaved_wraps: AtomicU64,
    unsaved_unwraps: AtomicU64,
}

impl Usage {
    pub(crate) fn new(wraps: u64, unwraps: u64, last: Option<i64>) -> Self {
        Self {
            wraps: AtomicU64::new(wraps),
            unwraps: AtomicU64::new(unwraps),
            last_used_ms: AtomicI64::new(last.unwrap_or(0)),
            unsaved_wraps: AtomicU64::new(0),
            unsaved_unwraps: AtomicU64::new(0),
        }
    }

    /// Takes what was counted since the last save: (wraps, unwraps), or `None` if nothing.
    pub(crate) fn take_unsaved(&self) -> Option<(u64, u64)> {
        let w = self.unsaved_wraps.swap(0, Ordering::Relaxed);
        let u = self.unsaved_unwraps.swap(0, Ordering::Relaxed);
        (w > 0 || u > 0).then_some((w, u))
    }

    /// Gives back counts whose save failed (they go out with the next one).
    pub(crate) fn restore_unsaved(&self, wraps: u64, unwraps: u64) {
        self.unsaved_wraps.fetch_add(wraps, Ordering::Relaxed);
        self.unsaved_unwraps.fetch_add(unwraps, Ordering::Relaxed);
    }

    /// Takes the store's totals (which include other replicas' saved counts) plus what this
    /// process has counted and not saved yet.
    pub(crate) fn set_saved(&self, wraps: u64, unwraps: u64, last: Option<i64>) {
        let w = wraps.saturating_add(self.unsaved_wraps.load(Ordering::Relaxed));
        let u = unwraps.saturating_add(self.unsaved_unwraps.load(Ordering::Relaxed));
        self.wraps.store(w, Ordering::Relaxed);
        self.unwraps.store(u, Ordering::Relaxed);
        if let Some(l) = last {
            self.last_used_ms.fetch_max(l, Ordering::Relaxed);
        }
    }

    fn bump(&self, wrap: bool) {
        if wrap {
            self.wraps.fetch_add(1, Ordering::Relaxed);
            self.unsaved_wraps.fetch_add(1, Ordering::Relaxed);
        } else {
            self.unwraps.fetch_add(1, Ordering::Relaxed);
            self.unsaved_unwraps.fetch_add(1, Ordering::Relaxed);
        }
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// Deployment-wide lifecycle settings (`[lifecycle]`).
#[derive(Clone, Debug)]
pub struct LifecycleSettings {
    /// Soft-delete retention (7-90 days), ms.
    pub retention_ms: i64,
    /// Purge protection for every key.
    pub purge_protection: bool,
    /// How often the maintenance task runs (scheduled purge, auto-rotation, usage flush).
    pub maintenance_interval: Duration,
    /// New KEK versions can be backed up (extractable only under a trusted key).
    pub backup: bool,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        Self {
            retention_ms: 90 * 24 * 3600 * 1000,
            purge_protection: false,
            maintenance_interval: Duration::from_secs(60),
            backup: false,
        }
    }
}

/// The result of a wrap.
#[derive(Debug)]
pub struct Wrapped {
    /// The envelope.
    pub envelope: Vec<u8>,
    /// The key.
    pub key: KeyName,
    /// The version number used.
    pub version: u32,
    /// The algorithm.
    pub algorithm: Algorithm,
}

/// The result of an unwrap.
#[derive(Debug)]
pub struct Unwrapped {
    /// The DEK.
    pub dek: Dek,
    /// The key.
    pub key: KeyName,
    /// The version number used.
    pub version: u32,
    /// The algorithm.
    pub algorithm: Algorithm,
}

/// An RSA public key of one version.
#[derive(Debug)]
pub struct PublicKeyInfo {
    /// The key.
    pub key: KeyName,
    /// The version number.
    pub version: u32,
    /// The version id.
    pub version_id: VersionId,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// The modulus (big-endian).
    pub modulus: Vec<u8>,
    /// The public exponent (big-endian).
    pub exponent: Vec<u8>,
}

/// What start-up found.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Keys loaded.
    pub keys: usize,
    /// Versions attached and verified.
    pub versions: usize,
    /// Pending (unacknowledged) versions rolled back.
    pub rolled_back: usize,
    /// Keys quarantined, with why.
    pub quarantined: Vec<(String, String)>,
    /// Objects made by keybroker that no key references.
    pub orphans: Vec<String>,
    /// Destructions (purge/trim) interrupted by a crash and finished now; their receipts still
    /// have to go into the audit trail.
    pub finished_destructions: Vec<Receipt>,
    /// Time spent finding the KEK objects and checking their templates.
    pub attach_ms: u64,
    /// Time spent proving the KEKs' identities (canaries).
    pub canaries_ms: u64,
}

/// Proof of destruction of key versions (purge or trim).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Receipt {
    /// The key.
    pub key: String,
    /// `purge` or `trim`.
    pub reason: String,
    /// The version numbers destroyed.
    pub versions: Vec<u32>,
    /// Their object ids (CKA_ID, hex).
    pub object_ids: Vec<String>,
    /// HSM objects destroyed now (0 for objects already gone before a crash).
    pub objects_destroyed: usize,
    /// When (ms).
    pub at_ms: i64,
    /// Who.
    pub by: String,
}

/// The keyring.
pub struct Keyring {
    pub(crate) hsm: Hsm,
    pub(crate) store: Arc<Store>,
    pub(crate) keys: RwLock<BTreeMap<KeyName, Arc<KeyEntry>>>,
    pub(crate) versions: RwLock<HashMap<VersionId, (KeyName, u32)>>,
    pub(crate) usage: RwLock<HashMap<VersionId, Arc<Usage>>>,
    /// Serialises every change that touches the HSM and the store (two-phase writes); with a
    /// shared store, together with the store's cluster-wide lock ([`Keyring::write`]).
    pub(crate) write_lock: tokio::sync::Mutex<()>,
    /// Keeping the cache in step with other replicas (shared stores; see `replica`).
    pub(crate) replica: crate::replica::ReplicaState,
    pub(crate) settings: LifecycleSettings,
    /// Where destruction receipts from the maintenance task go.
    pub(crate) audit: OnceLock<AuditLog>,
    /// Versions whose failed creation could not be rolled back yet (id, whether an HSM object
    /// may exist): retried by the maintenance task and when the HSM serves again.
    pub(crate) pending_rollbacks: std::sync::Mutex<Vec<(VersionId, bool)>>,
}

pub(crate) const CANARY_AAD: &[u8] = b"keybroker canary v1";

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BrokerError> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BrokerError::internal(format!("blocking task failed: {e}")))?
}

impl Keyring {
    /// Loads every key from the store, finishes destructions and rolls back creations that a
    /// crash interrupted, attaches the HSM objects, checks their templates and canaries, and
    /// reports orphans. With [`IntegrityPolicy::Fail`], any integrity problem is an error
    /// naming every affected key.
    pub async fn load(
        hsm: Hsm,
        store: Arc<Store>,
        policy: IntegrityPolicy,
        settings: LifecycleSettings,
    ) -> Result<(Self, LoadReport), BrokerError> {
        let mut report = LoadReport::default();

        // With a shared store, recovery runs under the cluster-wide write lock, and only for the
        // work of replicas that are gone: another replica may be in the middle of a creation.
        let st = store.clone();
        let cluster = blocking(move || st.lock_writes().map_err(BrokerError::from)).await?;
        let cluster = crate::replica::ReleaseOnDrop(cluster);
        let st = store.clone();
        let applied_generation =
            blocking(move || st.generation().map_err(BrokerError::from)).await?;
        let applied_generation = applied_generation.unwrap_or(0);

        // Finish destructions that were started (their intent is durable) before anything else.
        let st = store.clone();
        let pending =
            blocking(move || st.pending_destructions().map_err(BrokerError::from)).await?;
        let mut in_progress = std::collections::HashSet::new();
        let mut by_key: BTreeMap<(KeyName, String, String), Vec<(u32, VersionId)>> =
            BTreeMap::new();
        for p in pending {
            let st = store.clone();
            let owner = p.owner;
            if blocking(move || st.owner_alive(owner).map_err(BrokerError::from)).await? {
                in_progress.insert(p.id);
                continue;
            }
            by_key
                .entry((p.key, p.reason, p.requested_by))
                .or_default()
                .push((p.version, p.id));
        }
        for ((key, reason, by), versions) in by_key {
            let mut destroyed = 0;
            for (_, id) in &versions {
                destroyed += hsm.destroy_kek(*id).await.map_err(BrokerError::from)?;
            }
            let (st, k, ids) = (
                store.clone(),
                key.clone(),
                versions.iter().map(|v| v.1).collect::<Vec<_>>(),
            );
            let purge = reason == "purge";
            blocking(move || {
                st.finish_destroy(&k, &ids, purge)
                    .map_err(BrokerError::from)
            })
            .await?;
            tracing::warn!(key = %key, %reason, versions = versions.len(), objects_destroyed = destroyed,
                "finished a destruction interrupted by a crash");
            report.finished_destructions.push(Receipt {
                key: key.to_string(),
                reason,
                versions: versions.iter().map(|v| v.0).collect(),
                object_ids: versions.iter().map(|v| v.1.hex()).collect(),
                objects_destroyed: destroyed,
                at_ms: now_ms(),
                by,
            });
        }

        let st = store.clone();
        let stored = blocking(move || st.load_all().map_err(BrokerError::from)).await?;

        // Roll back creations that were never acknowledged (and whose replica is gone).
        for k in &stored {
            for v in k
                .versions
                .iter()
                .filter(|v| v.state == VersionState::Pending)
            {
                let st = store.clone();
                let owner = v.owner;
                if blocking(move || st.owner_alive(owner).map_err(BrokerError::from)).await? {
                    continue;
                }
                let destroyed = hsm.destroy_kek(v.id).await.map_err(BrokerError::from)?;
                let st = store.clone();
                let id = v.id;
                blocking(move || st.abort_version(id).map_err(BrokerError::from)).await?;
                tracing::warn!(key = %k.name, version = v.number, objects_destroyed = destroyed,
                    "rolled back a key version whose creation was interrupted (never acknowledged)");
                report.rolled_back += 1;
            }
        }
        drop(cluster);
        let stored: Vec<StoredKey> = stored
            .into_iter()
            .filter(|k| k.lifecycle != StoredLifecycle::Purging)
            .map(|mut k| {
                k.versions
                    .retain(|v| v.state == VersionState::Active && !in_progress.contains(&v.id));
                k
            })
            .filter(|k| !k.versions.is_empty())
            .collect();

        let expected = stored
            .iter()
            .flat_map(|k| {
                k.versions.iter().map(|v| ExpectedKek {
                    id: v.id,
                    key_type: k.key_type,
                    algorithm: k.algorithm,
                    origin: v.origin,
                    canary: canary_of(v.canary.as_deref(), v.canary_digest.as_deref()),
                })
            })
            .collect();
        let t_attach = std::time::Instant::now();
        let attach = hsm.attach(expected).await.map_err(BrokerError::from)?;
        report.attach_ms = t_attach.elapsed().as_millis() as u64;
        report.orphans = attach.orphans;
        let mut bad: HashMap<VersionId, String> = attach.problems.into_iter().collect();

        // Canaries: prove each attached object is the key the version was created with, in
        // chunks (one HSM call each, not one per version), one chunk per session at a time.
        let t_canaries = std::time::Instant::now();
        let mut to_check = Vec::new();
        for k in &stored {
            for v in &k.versions {
                if bad.contains_key(&v.id) {
                    continue;
                }
                match canary_to_check(
                    k.algorithm,
                    v.id,
                    v.canary.as_deref(),
                    v.canary_digest.as_deref(),
                ) {
                    Ok(c) => to_check.push((v.id, c)),
                    Err(why) => {
                        bad.insert(v.id, why);
                    }
                }
            }
        }
        let parallel = hsm.token().sessions.max(1);
        // Small enough that a chunk of slow RSA-4096 unwraps stays far inside call_timeout.
        let chunk = to_check.len().div_ceil(parallel * 4).clamp(1, 64);
        let mut chunks = Vec::new();
        let mut it = to_check.into_iter().peekable();
        while it.peek().is_some() {
            chunks.push(it.by_ref().take(chunk).collect::<Vec<_>>());
        }
        let results: Vec<_> = stream::iter(chunks)
            .map(|c| {
                let hsm = hsm.clone();
                async move {
                    match hsm.check_canaries(c.clone()).await {
                        Ok(v) => v,
                        // An HSM fault in a chunk: each of its versions alone, and one that
                        // still cannot be checked is quarantined (as before chunks existed).
                        Err(_) => {
                            let mut out = Vec::with_capacity(c.len());
                            for item in c {
                                let id = item.0;
                                out.push(match hsm.check_canaries(vec![item]).await {
                                    Ok(mut v) => {
                                        v.pop().unwrap_or((id, Some("canary not checked".into())))
                                    }
                                    Err(e) => (id, Some(format!("canary check failed: {e}"))),
                                });
                            }
                            out
                        }
                    }
                }
            })
            .buffer_unordered(parallel)
            .collect()
            .await;
        for (id, verdict) in results.into_iter().flatten() {
            if let Some(why) = verdict {
                bad.insert(id, why);
            }
        }
        report.canaries_ms = t_canaries.elapsed().as_millis() as u64;

        let mut keys = BTreeMap::new();
        let mut versions = HashMap::new();
        let mut usage = HashMap::new();
        for k in stored {
            let problems: Vec<String> = k
                .versions
                .iter()
                .filter_map(|v| {
                    bad.get(&v.id)
                        .map(|why| format!("version {}: {why}", v.number))
                })
                .collect();
            let state = if problems.is_empty() {
                KeyState::Enabled
            } else {
                let why = problems.join("; ");
                tracing::error!(key = %k.name, problems = %why, "KEK integrity check failed");
                report.quarantined.push((k.name.to_string(), why.clone()));
                for v in &k.versions {
                    hsm.detach(v.id);
                }
                KeyState::Quarantined(why)
            };
            report.versions += k.versions.len();
            for v in &k.versions {
                versions.insert(v.id, (k.name.clone(), v.number));
                usage.insert(
                    v.id,
                    Arc::new(Usage::new(v.wraps, v.unwraps, v.last_used_ms)),
                );
            }
            let lifecycle = match k.lifecycle {
                StoredLifecycle::Deleted {
                    deleted_at_ms,
                    purge_at_ms,
                    deleted_by,
                } => Lifecycle::Deleted {
                    deleted_at_ms,
                    purge_at_ms,
                    deleted_by,
                },
                _ => Lifecycle::Active,
            };
            let entry = KeyEntry {
                name: k.name.clone(),
                key_type: k.key_type,
                algorithm: k.algorithm,
                created_at_ms: k.created_at_ms,
                updated_at_ms: k.updated_at_ms,
                state,
                lifecycle,
                attributes: k.attributes,
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
            };
            keys.insert(k.name, Arc::new(entry));
        }
        report.keys = keys.len();
        for o in &report.orphans {
            tracing::warn!(object = %o, "HSM object made by keybroker is not referenced by any key (orphan)");
        }
        if policy == IntegrityPolicy::Fail && !report.quarantined.is_empty() {
            let list: Vec<String> = report
                .quarantined
                .iter()
                .map(|(k, why)| format!("{k}: {why}"))
                .collect();
            return Err(BrokerError::precondition(format!(
                "refusing to start: {} key(s) failed the HSM integrity check (keys are never re-created silently; \
                 investigate, or set hsm.on_integrity_failure = \"quarantine\" to serve the others): {}",
                list.len(),
                list.join(" | ")
            )));
        }
        Ok((
            Self {
                hsm,
                store,
                keys: RwLock::new(keys),
                versions: RwLock::new(versions),
                usage: RwLock::new(usage),
                write_lock: tokio::sync::Mutex::new(()),
                replica: crate::replica::ReplicaState::new(applied_generation),
                settings,
                audit: OnceLock::new(),
                pending_rollbacks: std::sync::Mutex::new(Vec::new()),
            },
            report,
        ))
    }

    /// The HSM.
    pub fn hsm(&self) -> &Hsm {
        &self.hsm
    }

    /// The metadata store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A key that is not soft-deleted (FAILED_PRECONDITION for a deleted one).
    pub fn get_live(&self, name: &KeyName) -> Result<Arc<KeyEntry>, BrokerError> {
        let k = self.get(name)?;
        if let Lifecycle::Deleted { .. } = k.lifecycle {
            return Err(BrokerError::precondition(format!(
                "key {name} is deleted; see GetDeletedKey, RecoverKey"
            )));
        }
        Ok(k)
    }

    /// The usage counters of a version.
    pub fn usage(&self, id: VersionId) -> Option<Arc<Usage>> {
        self.usage
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    pub(crate) fn bump(&self, id: VersionId, wrap: bool) {
        if let Some(u) = self.usage(id) {
            u.bump(wrap);
        }
    }

    /// A key by name (soft-deleted ones included).
    pub fn get(&self, name: &KeyName) -> Result<Arc<KeyEntry>, BrokerError> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::NotFound(format!("key {name} not found")))
    }

    /// One page of a tenant's keys, ordered by name, starting after `after`.
    pub fn list(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<Arc<KeyEntry>>, Option<String>) {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let mut next = None;
        for (name, entry) in keys.iter() {
            if name.tenant() != tenant || entry.lifecycle != Lifecycle::Active {
                continue;
            }
            if let Some(a) = after
                && name.name() <= a
            {
                continue;
            }
            if out.len() == limit {
                next = out
                    .last()
                    .map(|e: &Arc<KeyEntry>| e.name.name().to_string());
                break;
            }
            out.push(entry.clone());
        }
        (out, next)
    }

    /// Number of keys and versions.
    pub fn counts(&self) -> (usize, usize) {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        (keys.len(), keys.values().map(|k| k.versions.len()).sum())
    }

    /// Wraps a caller-supplied DEK under the newest version of `name`.
    pub async fn wrap(&self, name: &KeyName, dek: Dek, aad: &[u8]) -> Result<Wrapped, BrokerError> {
        check_dek_len(dek.len())?;
        let entry = self.get(name)?;
        check_aad(&entry, aad)?;
        let v = entry.current()?;
        entry.check(KeyOp::Wrap, v, now_ms())?;
        let (params, header) = new_params(entry.algorithm, v.id, aad)?;
        let ct = self
            .hsm
            .wrap(v.id, params, dek)
            .await
            .map_err(BrokerError::from)?;
        self.bump(v.id, true);
        Ok(Wrapped {
            envelope: envelope::seal(header, &ct),
            key: entry.name.clone(),
            version: v.number,
            algorithm: entry.algorithm,
        })
    }

    /// Draws a DEK from the HSM's RNG and wraps it under the newest version of `name`.
    pub async fn generate_data_key(
        &self,
        name: &KeyName,
        len: usize,
        aad: &[u8],
    ) -> Result<(Dek, Wrapped), BrokerError> {
        let len = if len == 0 { DEFAULT_DEK_LEN } else { len };
        check_dek_len(len)?;
        let entry = self.get(name)?;
        check_aad(&entry, aad)?;
        let v = entry.current()?;
        entry.check(KeyOp::GenerateDataKey, v, now_ms())?;
        let (params, header) = new_params(entry.algorithm, v.id, aad)?;
        let (dek, ct) = self
            .hsm
            .generate_and_wrap(v.id, params, len)
            .await
            .map_err(BrokerError::from)?;
        self.bump(v.id, true);
        Ok((
            dek,
            Wrapped {
                envelope: envelope::seal(header, &ct),
                key: entry.name.clone(),
                version: v.number,
                algorithm: entry.algorithm,
            },
        ))
    }

    /// Resolves an envelope to its key and version, checking it against `expected` (if the
    /// caller named a key). Every mismatch is [`BrokerError::Unauthentic`].
    pub(crate) fn resolve<'a>(
        &self,
        expected: Option<&KeyName>,
        env: &envelope::Envelope<'a>,
        aad: &[u8],
    ) -> Result<(Arc<KeyEntry>, VersionEntry), BrokerError> {
        let found = self
            .versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&env.version)
            .cloned();
        let Some((name, number)) = found else {
            return Err(BrokerError::Unauthentic);
        };
        if expected.is_some_and(|e| *e != name) {
            return Err(BrokerError::Unauthentic);
        }
        let entry = self.get(&name)?;
        if entry.algorithm != env.algorithm || (!aad.is_empty() && !env.algorithm.supports_aad()) {
            return Err(BrokerError::Unauthentic);
        }
        let v = entry
            .version(number)
            .cloned()
            .ok_or(BrokerError::Unauthentic)?;
        Ok((entry, v))
    }

    /// Unwraps an envelope.
    ///
    /// `authorize` is called with the key the envelope belongs to, after it is known and before
    /// the HSM is asked: policy is decided at the edge, but only the envelope names the key.
    pub async fn unwrap(
        &self,
        expected: Option<&KeyName>,
        envelope_bytes: &[u8],
        aad: &[u8],
        authorize: impl FnOnce(&KeyName) -> Result<(), BrokerError>,
    ) -> Result<Unwrapped, BrokerError> {
        if aad.len() > MAX_AAD_LEN {
            return Err(BrokerError::invalid(format!(
                "aad is longer than {MAX_AAD_LEN} bytes"
            )));
        }
        if let Some(name) = expected {
            self.get(name)?;
        }
        let env = envelope::parse(envelope_bytes)?;
        self.ensure_known(env.version).await?;
        let (entry, v) = self.resolve(expected, &env, aad)?;
        authorize(&entry.name)?;
        entry.check(KeyOp::Unwrap, &v, now_ms())?;
        let params = params_for(&env, aad)?;
        let dek = self
            .hsm
            .unwrap(v.id, params, env.ciphertext.to_vec())
            .await
            .map_err(BrokerError::from)?;
        if check_dek_len(dek.len()).is_err() {
            return Err(BrokerError::Unauthentic);
        }
        self.bump(v.id, false);
        Ok(Unwrapped {
            dek,
            key: entry.name.clone(),
            version: v.number,
            algorithm: entry.algorithm,
        })
    }

    /// Unwraps a raw RSA-OAEP ciphertext made with an exported public key.
    pub async fn unwrap_raw(
        &self,
        name: &KeyName,
        version: u32,
        algorithm: Algorithm,
        ciphertext: &[u8],
    ) -> Result<Unwrapped, BrokerError> {
        let entry = self.get(name)?;
        if !algorithm.is_rsa() {
            return Err(BrokerError::invalid(
                "a raw ciphertext must name RSA_OAEP_SHA256 or RSA_OAEP_SHA1",
            ));
        }
        if entry.algorithm != algorithm {
            return Err(BrokerError::invalid(format!(
                "key {name} uses {}; a raw ciphertext for it must use the same algorithm",
                entry.algorithm
            )));
        }
        let bits = entry.key_type.rsa_bits().unwrap_or(0) as usize;
        if version == 0 {
            return Err(BrokerError::invalid(
                "a raw ciphertext must name its key version (from GetPublicKey)",
            ));
        }
        let v = entry
            .version(version)
            .cloned()
            .ok_or_else(|| BrokerError::NotFound(format!("key {name} has no version {version}")))?;
        entry.check(KeyOp::Unwrap, &v, now_ms())?;
        if ciphertext.len() != bits / 8 {
            return Err(BrokerError::Unauthentic);
        }
        let params = if algorithm == Algorithm::RsaOaepSha1 {
            WrapParams::OaepSha1
        } else {
            WrapParams::OaepSha256
        };
        let dek = self
            .hsm
            .unwrap(v.id, params, ciphertext.to_vec())
            .await
            .map_err(BrokerError::from)?;
        if dek.is_empty() {
            return Err(BrokerError::Unauthentic);
        }
        self.bump(v.id, false);
        Ok(Unwrapped {
            dek,
            key: entry.name.clone(),
            version: v.number,
            algorithm,
        })
    }

    /// Unwraps an envelope and wraps its DEK under the newest version of `destination` (or of
    /// the same key), with `new_aad` if given.
    ///
    /// `authorize_source` and `authorize_destination` are called with the two keys before the
    /// HSM is asked (as in [`Keyring::unwrap`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn rewrap(
        &self,
        expected: Option<&KeyName>,
        envelope_bytes: &[u8],
        aad: &[u8],
        destination: Option<&KeyName>,
        new_aad: Option<&[u8]>,
        authorize_source: impl FnOnce(&KeyName) -> Result<(), BrokerError>,
        authorize_destination: impl FnOnce(&KeyName) -> Result<(), BrokerError>,
    ) -> Result<(Wrapped, u32), BrokerError> {
        if aad.len() > MAX_AAD_LEN {
            return Err(BrokerError::invalid(format!(
                "aad is longer than {MAX_AAD_LEN} bytes"
            )));
        }
        if let Some(name) = expected {
            self.get(name)?;
        }
        let env = envelope::parse(envelope_bytes)?;
        self.ensure_known(env.version).await?;
        let (src, sv) = self.resolve(expected, &env, aad)?;
        authorize_source(&src.name)?;
        let now = now_ms();
        src.check(KeyOp::Rewrap, &sv, now)?;
        let dst_name = destination.cloned().unwrap_or_else(|| src.name.clone());
        authorize_destination(&dst_name)?;
        let dst = self.get(&dst_name)?;
        let out_aad = new_aad.unwrap_or(aad);
        check_aad(&dst, out_aad)?;
        let dv = dst.current()?;
        dst.check(KeyOp::Wrap, dv, now)?;
        let from = params_for(&env, aad)?;
        let (to, header) = new_params(dst.algorithm, dv.id, out_aad)?;
        let ct = self
            .hsm
            .rewrap((sv.id, from, env.ciphertext.to_vec()), (dv.id, to))
            .await
            .map_err(BrokerError::from)?;
        self.bump(sv.id, false);
        self.bump(dv.id, true);
        Ok((
            Wrapped {
                envelope: envelope::seal(header, &ct),
                key: dst.name.clone(),
                version: dv.number,
                algorithm: dst.algorithm,
            },
            sv.number,
        ))
    }

    /// The public key of an RSA key version (0 = newest).
    pub async fn public_key(
        &self,
        name: &KeyName,
        version: u32,
    ) -> Result<PublicKeyInfo, BrokerError> {
        let entry = self.get(name)?;
        if !entry.key_type.is_rsa() {
            return Err(BrokerError::precondition(format!(
                "key {name} is {}: only RSA keys have a public key",
                entry.key_type.as_str()
            )));
        }
        entry.usable()?;
        let v = if version == 0 {
            entry.current()?.clone()
        } else {
            entry.version(version).cloned().ok_or_else(|| {
                BrokerError::NotFound(format!("key {name} has no version {version}"))
            })?
        };
        let pk = self.hsm.public_key(v.id).await.map_err(BrokerError::from)?;
        Ok(PublicKeyInfo {
            key: entry.name.clone(),
            version: v.number,
            version_id: v.id,
            algorithm: entry.algorithm,
            modulus: pk.modulus,
            exponent: pk.exponent,
        })
    }
}

pub(crate) fn check_aad(entry: &KeyEntry, aad: &[u8]) -> Result<(), BrokerError> {
    if aad.len() > MAX_AAD_LEN {
        return Err(BrokerError::invalid(format!(
            "aad is longer than {MAX_AAD_LEN} bytes"
        )));
    }
    if !aad.is_empty() && !entry.algorithm.supports_aad() {
        return Err(BrokerError::invalid(format!(
            "key {} uses {}, which cannot bind aad; send no aad or use an AES-256-GCM key",
            entry.name, entry.algorithm
        )));
    }
    Ok(())
}

pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), BrokerError> {
    getrandom::fill(buf)
        .map_err(|e| BrokerError::internal(format!("OS random number generator failed: {e}")))
}

/// Fresh parameters and the envelope header for wrapping under `id`.
pub(crate) fn new_params(
    alg: Algorithm,
    id: VersionId,
    aad: &[u8],
) -> Result<(WrapParams, Vec<u8>), BrokerError> {
    Ok(match alg {
        Algorithm::Aes256Gcm => {
            // A random 96-bit IV per wrap (NIST SP 800-38D §8.2.2): the token's RNG is not
            // needed for IVs; the OS RNG is cheaper and as good.
            let mut iv = [0u8; GCM_IV_LEN];
            fill_random(&mut iv)?;
            let header = envelope::header(alg, id, &iv);
            let aad = envelope::gcm_aad(&header, aad);
            (WrapParams::Gcm { iv, aad }, header)
        }
        Algorithm::AesKeyWrapPad => (WrapParams::Kwp, envelope::header(alg, id, &[])),
        Algorithm::RsaOaepSha256 => (WrapParams::OaepSha256, envelope::header(alg, id, &[])),
        Algorithm::RsaOaepSha1 => (WrapParams::OaepSha1, envelope::header(alg, id, &[])),
    })
}

/// Parameters to unwrap a parsed envelope.
pub(crate) fn params_for(
    env: &envelope::Envelope<'_>,
    aad: &[u8],
) -> Result<WrapParams, BrokerError> {
    Ok(match env.algorithm {
        Algorithm::Aes256Gcm => WrapParams::Gcm {
            iv: env.nonce.try_into().map_err(|_| BrokerError::Unauthentic)?,
            aad: envelope::gcm_aad(env.header, aad),
        },
        Algorithm::AesKeyWrapPad => WrapParams::Kwp,
        Algorithm::RsaOaepSha256 => WrapParams::OaepSha256,
        Algorithm::RsaOaepSha1 => WrapParams::OaepSha1,
    })
}

/// A version's stored canary, ready for the HSM, or why it cannot prove anything (the same
/// verdicts as [`check_canary`]).
pub(crate) fn canary_to_check(
    alg: Algorithm,
    id: VersionId,
    canary: Option<&[u8]>,
    digest: Option<&[u8]>,
) -> Result<Canary, String> {
    let (Some(canary), Some(digest)) = (canary, digest) else {
        return Err("no canary recorded".into());
    };
    let Ok(env) = envelope::parse(canary) else {
        return Err("canary envelope is malformed".to_string());
    };
    if env.version != id || env.algorithm != alg {
        return Err("canary belongs to another key version".into());
    }
    Ok(Canary {
        params: params_for(&env, CANARY_AAD).map_err(|e| e.to_string())?,
        ciphertext: env.ciphertext.to_vec(),
        digest: digest.to_vec(),
    })
}

/// A stored canary in the form the HSM layer re-checks after a re-initialisation.
pub(crate) fn canary_of(envelope: Option<&[u8]>, digest: Option<&[u8]>) -> Option<Canary> {
    let env = envelope::parse(envelope?).ok()?;
    Some(Canary {
        params: params_for(&env, CANARY_AAD).ok()?,
        ciphertext: env.ciphertext.to_vec(),
        digest: digest?.to_vec(),
    })
}

/// Unwraps a version's canary and compares it: `Ok(Ok(()))` it is the key the version was
/// created with, `Ok(Err(why))` it is not (or there is no usable canary), `Err` the HSM could
/// not answer (a fault, not a verdict).
pub(crate) async fn check_canary(
    hsm: &Hsm,
    alg: Algorithm,
    id: VersionId,
    canary: Option<Vec<u8>>,
    digest: Option<Vec<u8>>,
) -> Result<Result<(), String>, crate::hsm::HsmError> {
    let c = match canary_to_check(alg, id, canary.as_deref(), digest.as_deref()) {
        Ok(c) => c,
        Err(why) => return Ok(Err(why)),
    };
    match hsm.unwrap(id, c.params, c.ciphertext).await {
        Ok(dek) if Sha256::digest(dek.expose()).as_slice() == c.digest.as_slice() => Ok(Ok(())),
        Ok(_) => Ok(Err("canary decrypts to the wrong value: the HSM object is not the key this version was created with".into())),
        Err(e) if e.kind == crate::hsm::FaultKind::DataInvalid => Ok(Err(
            "canary does not decrypt: the HSM object is not the key this version was created with".into(),
        )),
        Err(e) => Err(e),
    }
}
