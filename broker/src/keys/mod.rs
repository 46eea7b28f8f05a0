//! Keys: every key's metadata cached in memory, backed by the store, with the key material in
//! the HSM. [`Keyring`] implements every key operation in domain terms; its state is private and
//! reached only through its methods. The request pipeline (`api`) authorises first and hands
//! the keyring a [`Grant`] for the key it acts on.
//!
//! # Layout
//! * this file — the keyring's state, the key model in memory, lookups;
//! * `load` — start-up: reconcile the store with the HSM, prove every KEK's identity;
//! * `integrity` — canaries: proving that an HSM object is the key a version was made with;
//! * `crypt` — the data plane: wrap, generate, unwrap, rewrap (a single call is a batch of
//!   one), public keys;
//! * `payload` — payload encryption: encrypt and decrypt small payloads (format-2
//!   envelopes), and detached AES-256-GCM for the AWS XKS door;
//! * `lifecycle` — create, import, rotate, update, delete, recover, purge, trim, and the
//!   maintenance task;
//! * `sign` — sign and verify digests with signing keys;
//! * `backup` — backup and restore under the security domain;
//! * `replica` — keeping the cache in step with other replicas on a shared store.
//!
//! The hot path (wrap/unwrap) reads the in-memory maps under a read lock and makes exactly one
//! HSM call; it never touches the store or searches the token.

pub mod backup;
pub mod budget;
mod crypt;
mod integrity;
mod lifecycle;
mod load;
mod payload;
mod public;
mod replica;
mod sign;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

pub use self::{
    backup::{Made, claimed_name},
    crypt::{
        Ciphertext, GenerateItem, MAX_BATCH, Resolved, RewrapItem, Rewrapped, UnwrapInput,
        UnwrapItem, WrapItem, check_aad_for,
    },
    lifecycle::{AttributePatch, IMPORT_KEY_TTL_MS, ImportKeyInfo, Times},
    load::{LoadError, LoadReport},
    payload::{
        DETACHED_DOMAIN, DecryptInput, DecryptItem, Decrypted, DoorAad, EncryptItem, Encrypted,
        MAX_DETACHED_AAD, OpenItem, Opened, PayloadResolved, SealItem, Sealed, check_payload_len,
        rsa_payload_max,
    },
    public::public_key_formats,
    replica::ReplicaState,
    sign::{SignItem, Signed, Verified, check_digest},
};
use crate::{
    audit::AuditLog,
    error::{BrokerError, NotFound, Refused},
    hsm::Hsm,
    model::{Algorithm, Dek, KeyAttributes, KeyName, KeyOp, KeyType, Origin, VersionId, now_ms},
    policy::{Grant, Permission},
    store::{BackupRecord, Store},
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

    /// Version `number`, or the newest for 0 (as `GetPublicKey` and `Verify` take it);
    /// NOT_FOUND naming the version when there is none.
    pub fn version_or_current(&self, number: u32) -> Result<&VersionEntry, BrokerError> {
        if number == 0 {
            return self.current();
        }
        self.version(number).ok_or_else(|| {
            NotFound::Version {
                key: self.name.clone(),
                version: number,
            }
            .into()
        })
    }

    /// Refuses a quarantined or deleted key.
    pub(crate) fn usable(&self) -> Result<(), BrokerError> {
        if let Lifecycle::Deleted { purge_at_ms, .. } = &self.lifecycle {
            return Err(Refused::Deleted {
                key: self.name.clone(),
                purge_at_ms: *purge_at_ms,
            }
            .into());
        }
        match &self.state {
            KeyState::Enabled => Ok(()),
            KeyState::Quarantined(_) => Err(Refused::Quarantined(self.name.clone()).into()),
        }
    }

    /// Whether `v` may still unwrap (at or above the minimum decryption version).
    pub fn decryptable(&self, v: &VersionEntry) -> bool {
        v.number >= self.attributes.min_decryption_version
    }

    /// Checks that the key may do `op` with version `v` now (security invariant 9,
    /// `docs/src/security.md`): usable, enabled, the operation allowed, inside not-before; for
    /// new ciphertexts (wrap, generate, encrypt) not expired (expired keys still unwrap and
    /// decrypt, as in Azure Key Vault; signing is refused, verifying still works); for
    /// unwrapping, decrypting and verifying, not below the minimum decryption version.
    pub fn check(&self, op: KeyOp, v: &VersionEntry, now: i64) -> Result<(), BrokerError> {
        self.usable()?;
        let a = &self.attributes;
        if !a.enabled {
            return Err(Refused::Disabled(self.name.clone()).into());
        }
        if !a.operations.contains(&op) {
            return Err(Refused::NotAllowed {
                key: self.name.clone(),
                op,
            }
            .into());
        }
        if a.not_before_ms.is_some_and(|nb| now < nb) {
            return Err(Refused::NotYetValid {
                key: self.name.clone(),
                not_before_ms: a.not_before_ms.unwrap_or(0),
            }
            .into());
        }
        match op {
            KeyOp::Wrap | KeyOp::GenerateDataKey | KeyOp::Encrypt | KeyOp::Sign => {
                if a.expires_ms.is_some_and(|e| now >= e) {
                    return Err(Refused::Expired {
                        key: self.name.clone(),
                        expires_ms: a.expires_ms.unwrap_or(0),
                    }
                    .into());
                }
                if v.expires_ms.is_some_and(|e| now >= e) {
                    return Err(Refused::VersionExpired {
                        key: self.name.clone(),
                        version: v.number,
                    }
                    .into());
                }
            }
            KeyOp::Unwrap | KeyOp::Rewrap | KeyOp::Decrypt | KeyOp::Verify => {
                if !self.decryptable(v) {
                    return Err(Refused::BelowMinimum {
                        key: self.name.clone(),
                        version: v.number,
                        min: a.min_decryption_version,
                    }
                    .into());
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
    /// AES-GCM invocations one version may make (random IVs; see [`budget`]).
    pub gcm_limit: u64,
    /// AES-GCM invocations reserved in the store at a time.
    pub gcm_block: u64,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        Self {
            retention_ms: 90 * 24 * 3600 * 1000,
            purge_protection: false,
            maintenance_interval: Duration::from_secs(60),
            backup: false,
            gcm_limit: budget::NIST_LIMIT,
            gcm_block: budget::DEFAULT_BLOCK,
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
    /// The version's id (its HSM object's `CKA_ID`).
    pub version_id: VersionId,
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
    /// The version's id (its HSM object's `CKA_ID`).
    pub version_id: VersionId,
    /// The algorithm.
    pub algorithm: Algorithm,
}

/// A key as callers see it: its metadata, the HSM mechanism that serves it, and each version's
/// usage counters (in the order of `entry.versions`).
#[derive(Debug)]
pub struct KeyInfo {
    /// The metadata.
    pub entry: Arc<KeyEntry>,
    /// The PKCS#11 mechanism that serves the key's algorithm on this token.
    pub mechanism: String,
    /// Usage per version.
    pub usage: Vec<UsageCount>,
}

/// One version's usage counters, read at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct UsageCount {
    /// Wraps.
    pub wraps: u64,
    /// Unwraps.
    pub unwraps: u64,
    /// Last use (ms; 0 = never).
    pub last_used_ms: i64,
}

/// The public key of one version (RSA: `modulus` and `exponent`; EC: `ec_point`).
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
    /// An EC key's curve and uncompressed point `04 || x || y` (RSA keys: `None`).
    pub ec_point: Option<(crate::model::Curve, Vec<u8>)>,
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
    /// The backup blobs made earlier that hold any of these versions: until they are destroyed
    /// too, `RestoreKey` (or a holder of the HSM user PIN) can bring the versions back.
    pub backups: Vec<BackupRecord>,
    /// Whether the destruction is final: no backup blob of these versions was ever made.
    #[serde(rename = "final")]
    pub is_final: bool,
}

impl Receipt {
    /// The receipt for `versions` of `key`; `backups` are every blob made of a key of that name,
    /// of which those holding one of these versions are kept.
    pub fn new(
        key: &KeyName,
        reason: &str,
        versions: &[(u32, VersionId)],
        objects_destroyed: usize,
        by: &str,
        backups: Vec<BackupRecord>,
    ) -> Self {
        let object_ids: Vec<String> = versions.iter().map(|v| v.1.hex()).collect();
        let backups: Vec<BackupRecord> = backups
            .into_iter()
            .filter(|b| b.version_ids.iter().any(|id| object_ids.contains(id)))
            .collect();
        Self {
            key: key.to_string(),
            reason: reason.to_string(),
            versions: versions.iter().map(|v| v.0).collect(),
            object_ids,
            objects_destroyed,
            at_ms: now_ms(),
            by: by.to_string(),
            is_final: backups.is_empty(),
            backups,
        }
    }

    /// What the receipt means, in words: what was destroyed and, while backups of it exist,
    /// that it is not final.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} of {}: versions {:?} destroyed in the HSM",
            self.reason, self.key, self.versions
        );
        if !self.is_final {
            s.push_str(&format!(
                "; not final while {} backup blob(s) holding them exist",
                self.backups.len()
            ));
        }
        s
    }
}

/// The keyring.
pub struct Keyring {
    hsm: Hsm,
    store: Arc<Store>,
    keys: RwLock<BTreeMap<KeyName, Arc<KeyEntry>>>,
    versions: RwLock<HashMap<VersionId, (KeyName, u32)>>,
    usage: RwLock<HashMap<VersionId, Arc<Usage>>>,
    /// Serialises every change that touches the HSM and the store (two-phase writes); with a
    /// shared store, together with the store's cluster-wide lock ([`Keyring::write`]).
    write_lock: tokio::sync::Mutex<()>,
    /// Keeping the cache in step with other replicas (shared stores; see `replica`).
    replica: ReplicaState,
    settings: LifecycleSettings,
    /// The AES-GCM invocation budget of each version.
    budget: budget::GcmBudget,
    /// Where destruction receipts from the maintenance task go.
    audit: OnceLock<AuditLog>,
    /// Versions whose failed creation could not be rolled back yet (id, whether an HSM object
    /// may exist): retried by the maintenance task and when the HSM serves again.
    pending_rollbacks: std::sync::Mutex<Vec<(VersionId, bool)>>,
    /// The remote EKM proxies external keys live behind (`[[external_proxy]]`; see `external`).
    external: OnceLock<crate::external::ExternalProxies>,
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BrokerError> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BrokerError::internal(format!("blocking task failed: {e}")))?
}

impl Keyring {
    /// The HSM.
    pub fn hsm(&self) -> &Hsm {
        &self.hsm
    }

    /// Sets the remote EKM proxies external keys use (once, at start-up).
    pub fn attach_external(&self, proxies: crate::external::ExternalProxies) {
        let _ = self.external.set(proxies);
    }

    /// The proxy an external key lives behind (FAILED_PRECONDITION when not configured).
    pub(crate) fn proxy(&self, name: &str) -> Result<Arc<crate::external::Proxy>, BrokerError> {
        match self.external.get() {
            Some(p) => p.get(name),
            None => Err(Refused::UnknownProxy(name.to_string()).into()),
        }
    }

    /// `len` random bytes from the HSM (no key involved; the caller checked the `random`
    /// permission).
    pub async fn random(&self, len: usize) -> Result<crate::model::Dek, BrokerError> {
        self.hsm.random(len).await.map_err(BrokerError::from)
    }

    /// The metadata store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A key that is not soft-deleted, for reading its metadata (FAILED_PRECONDITION for a
    /// deleted one).
    pub fn live(&self, grant: &Grant) -> Result<Arc<KeyEntry>, BrokerError> {
        self.get_live(grant.key_for(Permission::ReadMetadata)?)
    }

    /// What callers see of a key (see [`KeyInfo`]).
    pub fn describe(&self, entry: Arc<KeyEntry>) -> KeyInfo {
        use std::sync::atomic::Ordering::Relaxed;
        let usage = entry
            .versions
            .iter()
            .map(|v| {
                self.usage(v.id)
                    .map(|u| UsageCount {
                        wraps: u.wraps.load(Relaxed),
                        unwraps: u.unwraps.load(Relaxed),
                        last_used_ms: u.last_used_ms.load(Relaxed),
                    })
                    .unwrap_or_default()
            })
            .collect();
        // An external key's mechanism is its proxy's (the remote does the work).
        let mechanism = match (&entry.attributes.external, &entry.attributes.double) {
            (Some(x), _) => format!("external proxy {}", x.proxy),
            (None, Some(d)) => format!("double key: {} and {}", d.local, d.external),
            (None, None) => self.hsm.capabilities().mechanism_name(entry.algorithm),
        };
        KeyInfo {
            mechanism,
            usage,
            entry,
        }
    }

    /// A key that is not soft-deleted (FAILED_PRECONDITION for a deleted one).
    pub(crate) fn get_live(&self, name: &KeyName) -> Result<Arc<KeyEntry>, BrokerError> {
        let k = self.get(name)?;
        if let Lifecycle::Deleted { .. } = k.lifecycle {
            return Err(Refused::DeletedKey(name.clone()).into());
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

    /// The number and id of the version of `name` that wraps now, or why none does (missing,
    /// quarantined, disabled, deleted, expired): for health reports.
    pub fn wrapping_version(&self, name: &KeyName) -> Result<(u32, VersionId), String> {
        let entry = self
            .get(name)
            .map_err(|_| format!("key {name} does not exist"))?;
        if let KeyState::Quarantined(_) = entry.state {
            return Err(format!("key {name} is quarantined (see the broker log)"));
        }
        let v = entry.current().map_err(|e| e.to_string())?;
        entry
            .check(KeyOp::Wrap, v, now_ms())
            .map_err(|e| e.to_string())?;
        Ok((v.number, v.id))
    }

    /// A key by name (soft-deleted ones included).
    pub fn get(&self, name: &KeyName) -> Result<Arc<KeyEntry>, BrokerError> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| NotFound::Key(name.to_string()).into())
    }

    /// One page of the tenant's keys that `visible` lets the caller see, ordered by name,
    /// starting after `after`. The filter runs before the page is cut, so neither the page nor
    /// its token (the last name on it) ever names a key the caller may not see.
    pub fn list(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
        visible: impl Fn(&KeyName) -> bool,
    ) -> (Vec<Arc<KeyEntry>>, Option<String>) {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let mut next = None;
        for (name, entry) in keys.iter() {
            if name.tenant() != tenant || entry.lifecycle != Lifecycle::Active || !visible(name) {
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
}
