//! The metadata store: key names, types, algorithms, attributes, lifecycle, versions, usage and
//! canaries — never key material (the HSM holds that).
//!
//! Two back ends behind one interface ([`Store`]), chosen by the configuration (`[store] path`
//! or `[store] url`); the keyring does not know which it has:
//! * [`sqlite`] — the embedded default: one file, one broker process.
//! * [`postgres`] — several broker replicas sharing one database (and one HSM token).
//!
//! Crash safety is the same in both. Changes that touch both the HSM and the store are written
//! as intents first, so a crash at any point loses nothing acknowledged and leaves nothing
//! unexplained:
//!
//! * create/rotate/import: a version row is inserted as `pending` (with the id the HSM object
//!   will carry) and committed; the HSM object is made and checked, its canary made; the row
//!   becomes `active` — only then is the request acknowledged. At start-up a `pending` row whose
//!   creator is gone means the last step never happened: its HSM object (if any) is destroyed
//!   and the row removed.
//! * purge/trim: a `destructions` row per version is committed (and a purged key's lifecycle set
//!   to `purging`) before any HSM object is destroyed; the rows go when the objects are gone. At
//!   start-up the remaining rows (of replicas that are gone) are finished.
//!
//! Replicas (PostgreSQL only): every change bumps one store-wide **generation** in the same
//! transaction (a single-row counter whose row lock also orders the commits), stamps the rows it
//! touched with it and sends a `NOTIFY`. A replica compares the generation with the one its
//! cache reflects ([`Store::generation`], one indexed read) and fetches what changed since
//! ([`Store::changes_since`]). Writers across replicas are serialised by a cluster-wide lock
//! ([`Store::lock_writes`]). See `postgres` for the details.
//!
//! All calls are blocking; the keyring runs them on blocking threads.

pub mod postgres;
pub mod sqlite;

use std::path::Path;

use crate::{
    error::{BrokerError, Exists, NotFound, Unavailable},
    model::{Algorithm, KeyAttributes, KeyName, KeyType, Origin, VersionId},
};

pub use self::{postgres::PgStore, sqlite::SqliteStore};

/// A stored version's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionState {
    /// Being created; not acknowledged.
    Pending,
    /// Created, checked and acknowledged.
    Active,
}

/// One stored version.
#[derive(Clone, Debug)]
pub struct StoredVersion {
    /// The version number.
    pub number: u32,
    /// The version id (`CKA_ID`).
    pub id: VersionId,
    /// Pending or active.
    pub state: VersionState,
    /// Creation time (ms since the epoch).
    pub created_at_ms: i64,
    /// The canary envelope (a random value wrapped at creation).
    pub canary: Option<Vec<u8>>,
    /// SHA-256 of the canary's plaintext.
    pub canary_digest: Option<Vec<u8>>,
    /// Generated or imported.
    pub origin: Origin,
    /// When this version stops wrapping.
    pub expires_ms: Option<i64>,
    /// Usage: wraps.
    pub wraps: u64,
    /// Usage: unwraps.
    pub unwraps: u64,
    /// Usage: last use (ms).
    pub last_used_ms: Option<i64>,
    /// For a pending version in a shared store: the replica creating it (its presence lock;
    /// `None` in SQLite, where the only process is the one starting).
    pub owner: Option<i64>,
}

/// A key's lifecycle as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredLifecycle {
    /// In use.
    Active,
    /// Soft-deleted.
    Deleted {
        /// When.
        deleted_at_ms: i64,
        /// When it will be purged.
        purge_at_ms: i64,
        /// Who.
        deleted_by: String,
    },
    /// Being purged (destruction rows exist).
    Purging,
}

/// One stored key with its versions (oldest first).
#[derive(Clone, Debug)]
pub struct StoredKey {
    /// The full name.
    pub name: KeyName,
    /// The key type.
    pub key_type: KeyType,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Creation time (ms since the epoch).
    pub created_at_ms: i64,
    /// Last attribute change (ms).
    pub updated_at_ms: i64,
    /// Attributes.
    pub attributes: KeyAttributes,
    /// Lifecycle.
    pub lifecycle: StoredLifecycle,
    /// The versions, oldest first.
    pub versions: Vec<StoredVersion>,
    /// The store generation of the key's last change (0 in SQLite, which has no other writer).
    pub stamp: i64,
}

/// A key being restored from a backup (`begin_restore`).
#[derive(Clone, Debug)]
pub struct RestoredKey {
    /// The full name (as backed up).
    pub name: KeyName,
    /// The key type.
    pub key_type: KeyType,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// The original creation time (ms).
    pub created_at_ms: i64,
    /// When it is restored (ms): its `updated_at_ms`.
    pub now_ms: i64,
    /// The attributes, as backed up.
    pub attributes: KeyAttributes,
    /// (number, id, created_at_ms, origin, expires_ms) of each version, oldest first.
    pub versions: Vec<(u32, VersionId, i64, Origin, Option<i64>)>,
}

impl RestoredKey {
    /// A new key: a one-version restore with everything "now", so creating and restoring share
    /// one code path in every store.
    pub fn new_key(
        name: &KeyName,
        key_type: KeyType,
        algorithm: Algorithm,
        attributes: &KeyAttributes,
        origin: Origin,
        id: VersionId,
        now_ms: i64,
    ) -> Self {
        Self {
            name: name.clone(),
            key_type,
            algorithm,
            created_at_ms: now_ms,
            now_ms,
            attributes: attributes.clone(),
            versions: vec![(1, id, now_ms, origin, None)],
        }
    }
}

/// A destruction that was started and may not have finished.
#[derive(Clone, Debug)]
pub struct PendingDestruction {
    /// The version's id.
    pub id: VersionId,
    /// The key.
    pub key: KeyName,
    /// The version number.
    pub version: u32,
    /// `purge` or `trim`.
    pub reason: String,
    /// Who asked.
    pub requested_by: String,
    /// The replica doing it (shared stores; `None` in SQLite).
    pub owner: Option<i64>,
}

/// A backup blob made of a key: it can bring the versions it holds back after they are
/// destroyed, so a purge or trim receipt names it (the broker cannot know whether the blob was
/// since destroyed, only that it was made).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BackupRecord {
    /// SHA-256 of the blob (hex), as `BackupKey` returned it.
    pub sha256: String,
    /// The version ids it holds (hex).
    pub version_ids: Vec<String>,
    /// When it was made (ms).
    pub made_at_ms: i64,
    /// Who made it.
    pub made_by: String,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key name is taken.
    #[error("key {0} already exists")]
    AlreadyExists(String),
    /// No such key.
    #[error("key {0} not found")]
    NotFound(String),
    /// SQLite failed.
    #[error("metadata store: {0}")]
    Db(#[from] rusqlite::Error),
    /// PostgreSQL failed (or could not be reached).
    #[error("metadata store (PostgreSQL): {0}")]
    Postgres(String),
    /// The stored data is not what this version of keybroker understands.
    #[error("metadata store is corrupt: {0}")]
    Corrupt(String),
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(m) => Exists::Key(m).into(),
            StoreError::NotFound(m) => NotFound::Key(m).into(),
            StoreError::Db(e) => {
                tracing::error!(error = %e, "metadata store failed");
                Unavailable::Store.into()
            }
            StoreError::Postgres(e) => {
                tracing::error!(error = %e, "metadata store failed");
                Unavailable::Store.into()
            }
            StoreError::Corrupt(m) => {
                BrokerError::internal(format!("metadata store is corrupt: {m}"))
            }
        }
    }
}

/// What changed in a shared store since a generation: the keys (as the keyring should serve
/// them: active versions without destruction intents; `None` when the key is gone or being
/// purged) and the settings.
#[derive(Debug, Default)]
pub struct Changes {
    /// The generation these changes bring the reader to.
    pub generation: i64,
    /// Changed keys, each with the generation of its change.
    pub keys: Vec<(KeyName, i64, Option<StoredKey>)>,
    /// Changed settings.
    pub settings: Vec<(String, String)>,
}

/// The cluster-wide write lock of a shared store (see [`Store::lock_writes`]). Release it with
/// [`StoreLock::release`] on a blocking thread; dropping it releases it too, by closing its
/// connection.
pub struct StoreLock(pub(crate) postgres::PgLock);

impl StoreLock {
    /// Releases the lock (blocking).
    pub fn release(self) {
        self.0.release();
    }
}

/// The metadata store.
pub enum Store {
    /// The embedded single-file store (one broker process).
    Sqlite(SqliteStore),
    /// PostgreSQL, shared by several broker replicas.
    Postgres(PgStore),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Sqlite($s) => $e,
            Store::Postgres($s) => $e,
        }
    };
}

impl Store {
    /// Opens (creating if needed) the SQLite store at `path` and migrates its schema forward.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        SqliteStore::open(path).map(Store::Sqlite)
    }

    /// Whether other broker processes may write to this store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    /// What kind of store and where (for logs and `check-config`; never a password).
    pub fn describe(&self) -> String {
        match self {
            Store::Sqlite(s) => format!("sqlite:{}", s.path().display()),
            Store::Postgres(p) => p.describe(),
        }
    }

    /// The schema version in use.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        each!(self, s => s.schema_version())
    }

    /// Every key (including soft-deleted and purging ones) with its versions.
    pub fn load_all(&self) -> Result<Vec<StoredKey>, StoreError> {
        each!(self, s => s.load_all())
    }

    /// Phase 1 of creating (or importing) a key: inserts the key and its version 1 as pending.
    #[allow(clippy::too_many_arguments)]
    pub fn begin_create(
        &self,
        name: &KeyName,
        key_type: KeyType,
        algorithm: Algorithm,
        attributes: &KeyAttributes,
        origin: Origin,
        id: VersionId,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.begin_restore(&RestoredKey::new_key(
            name, key_type, algorithm, attributes, origin, id, now_ms,
        ))
    }

    /// Phase 1 of rotating a key: inserts the next version as pending; returns its number.
    pub fn begin_rotate(
        &self,
        name: &KeyName,
        id: VersionId,
        now_ms: i64,
        expires_ms: Option<i64>,
    ) -> Result<u32, StoreError> {
        each!(self, s => s.begin_rotate(name, id, now_ms, expires_ms))
    }

    /// Phase 1 of restoring a key from a backup: inserts the key and every version (with its
    /// original number and id) as pending.
    pub fn begin_restore(&self, key: &RestoredKey) -> Result<(), StoreError> {
        each!(self, s => s.begin_restore(key))
    }

    /// Phase 3 of a restore: every version's object exists and passed its checks; all of them
    /// become active in one transaction (a restore is all or nothing).
    pub fn commit_versions(
        &self,
        versions: &[(VersionId, Vec<u8>, Vec<u8>)],
    ) -> Result<(), StoreError> {
        each!(self, s => s.commit_versions(versions))
    }

    /// Phase 3: the version's HSM object exists and passed its checks.
    pub fn commit_version(
        &self,
        id: VersionId,
        canary: &[u8],
        digest: &[u8],
    ) -> Result<(), StoreError> {
        each!(self, s => s.commit_version(id, canary, digest))
    }

    /// Undoes phase 1: removes a pending version, and its key if that leaves the key with no
    /// versions.
    pub fn abort_version(&self, id: VersionId) -> Result<(), StoreError> {
        each!(self, s => s.abort_version(id))
    }

    /// Replaces a key's attributes.
    pub fn update_attributes(
        &self,
        name: &KeyName,
        attributes: &KeyAttributes,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        each!(self, s => s.update_attributes(name, attributes, now_ms))
    }

    /// Sets a key's lifecycle to active or deleted.
    pub fn set_lifecycle(&self, name: &KeyName, lc: &StoredLifecycle) -> Result<(), StoreError> {
        each!(self, s => s.set_lifecycle(name, lc))
    }

    /// Records the intent to destroy versions of a key (and, for a purge, marks the key
    /// `purging`), before any HSM object is touched.
    pub fn begin_destroy(
        &self,
        name: &KeyName,
        versions: &[(u32, VersionId)],
        reason: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        each!(self, s => s.begin_destroy(name, versions, reason, by, now_ms))
    }

    /// The destruction intents still open (after a crash).
    pub fn pending_destructions(&self) -> Result<Vec<PendingDestruction>, StoreError> {
        each!(self, s => s.pending_destructions())
    }

    /// The HSM objects are gone: removes the versions and the intents, and for a purge the key.
    pub fn finish_destroy(
        &self,
        name: &KeyName,
        ids: &[VersionId],
        purge: bool,
    ) -> Result<(), StoreError> {
        each!(self, s => s.finish_destroy(name, ids, purge))
    }

    /// Records a backup blob made of `name`, durably, before the blob is handed out.
    pub fn record_backup(&self, name: &KeyName, b: &BackupRecord) -> Result<(), StoreError> {
        each!(self, s => s.record_backup(name, b))
    }

    /// Every backup blob made of a key named `name` (of this key or of an earlier key of the
    /// same name), oldest first.
    pub fn backups(&self, name: &KeyName) -> Result<Vec<BackupRecord>, StoreError> {
        each!(self, s => s.backups(name))
    }

    /// Adds usage counted since the last save: (version, wraps, unwraps, last use). Adding, not
    /// overwriting, so replicas that count the same version do not undo each other's counts.
    pub fn add_usage(
        &self,
        usage: &[(VersionId, u64, u64, Option<i64>)],
    ) -> Result<(), StoreError> {
        each!(self, s => s.add_usage(usage))
    }

    /// Reserves up to `want` AES-GCM invocations of version `id` (its random-IV budget), never
    /// past `limit` across every process sharing the store: the range `[start, end)` granted,
    /// empty once the budget is spent. A crash loses the unused part of a reservation, which
    /// only ever errs on the safe side.
    pub fn reserve_gcm(
        &self,
        id: VersionId,
        want: u64,
        limit: u64,
    ) -> Result<(u64, u64), StoreError> {
        each!(self, s => s.reserve_gcm(id, want, limit))
    }

    /// A broker-wide setting (HYOK state, audit key id, last audit checkpoint...).
    pub fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        each!(self, s => s.setting(name))
    }

    /// Sets a setting durably (committed before this returns).
    pub fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        each!(self, s => s.set_setting(name, value))
    }

    /// The store-wide generation (`None`: no other process writes to this store, so a cache of
    /// it never goes stale).
    pub fn generation(&self) -> Result<Option<i64>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(p) => p.generation().map(Some),
        }
    }

    /// What changed since generation `since` (shared stores only; SQLite reports nothing).
    pub fn changes_since(&self, since: i64) -> Result<Changes, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(Changes {
                generation: since,
                ..Default::default()
            }),
            Store::Postgres(p) => p.changes_since(since),
        }
    }

    /// Takes the cluster-wide write lock (blocking; `None` for SQLite, where the keyring's own
    /// mutex is enough). Every change that touches the HSM and the store runs under it, so the
    /// check-then-act steps of create/rotate/delete/purge see every other replica's changes.
    pub fn lock_writes(&self) -> Result<Option<StoreLock>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(p) => p.lock_writes().map(|l| Some(StoreLock(l))),
        }
    }

    /// Whether the replica that recorded `owner` on a pending version or destruction intent is
    /// still running (then its work is not to be rolled back or finished by another).
    pub fn owner_alive(&self, owner: Option<i64>) -> Result<bool, StoreError> {
        match (self, owner) {
            (Store::Postgres(p), Some(o)) => p.owner_alive(o),
            _ => Ok(false),
        }
    }

    /// A future that resolves each time another replica announces a change (PostgreSQL
    /// `LISTEN`), and after a reconnect (changes may have been missed). `None` for SQLite.
    pub fn change_notifications(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        match self {
            Store::Sqlite(_) => None,
            Store::Postgres(p) => Some(p.notifications()),
        }
    }
}
