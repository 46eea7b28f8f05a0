//! The metadata store: key names, types, algorithms, versions and their canaries — never key
//! material (the HSM holds that). The embedded default is one SQLite file.
//!
//! Durability: WAL journal with `synchronous = FULL`, so a committed create/rotate survives a
//! crash or power loss. Creation is two-phase so that a crash between the HSM and the store
//! loses nothing that was acknowledged and leaves nothing unexplained:
//!
//! 1. a version row is inserted as `pending` (with the id the HSM object will carry) and
//!    committed;
//! 2. the HSM object is generated and checked, and its canary made;
//! 3. the row becomes `active` — only then is the request acknowledged.
//!
//! At start-up a `pending` row means step 3 never happened: its HSM object (if any) is destroyed
//! and the row removed (see `keyring::Keyring::load`).
//!
//! All calls are blocking; the keyring runs them on blocking threads.

use std::{
    path::Path,
    sync::{Mutex, MutexGuard},
};

use rusqlite::{Connection, OptionalExtension, params};

use crate::{
    error::BrokerError,
    model::{Algorithm, KeyName, KeyType, VersionId},
};

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
    /// The versions, oldest first.
    pub versions: Vec<StoredVersion>,
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
    /// The stored data is not what this version of keybroker understands.
    #[error("metadata store is corrupt: {0}")]
    Corrupt(String),
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(m) => {
                BrokerError::AlreadyExists(format!("key {m} already exists"))
            }
            StoreError::NotFound(m) => BrokerError::NotFound(format!("key {m} not found")),
            StoreError::Db(e) => {
                tracing::error!(error = %e, "metadata store failed");
                BrokerError::Unavailable("the metadata store is unavailable".into())
            }
            StoreError::Corrupt(m) => {
                BrokerError::internal(format!("metadata store is corrupt: {m}"))
            }
        }
    }
}

/// The SQLite store.
pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    id            INTEGER PRIMARY KEY,
    tenant        TEXT NOT NULL,
    name          TEXT NOT NULL,
    key_type      TEXT NOT NULL,
    algorithm     TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    UNIQUE (tenant, name)
);
CREATE TABLE IF NOT EXISTS key_versions (
    key_id        INTEGER NOT NULL REFERENCES keys(id),
    version       INTEGER NOT NULL,
    object_id     BLOB NOT NULL UNIQUE,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'active')),
    created_at_ms INTEGER NOT NULL,
    canary        BLOB,
    canary_digest BLOB,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Corrupt(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every key with its versions.
    pub fn load_all(&self) -> Result<Vec<StoredKey>, StoreError> {
        let conn = self.conn();
        let mut keys: Vec<(i64, StoredKey)> = Vec::new();
        let mut stmt = conn.prepare(
            "SELECT id, tenant, name, key_type, algorithm, created_at_ms FROM keys ORDER BY tenant, name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        for row in rows {
            let (id, tenant, name, kt, alg, created) = row?;
            let name = KeyName::new(&tenant, &name)
                .map_err(|e| StoreError::Corrupt(format!("key name {tenant}/{name}: {e}")))?;
            let key_type = KeyType::parse(&kt)
                .ok_or_else(|| StoreError::Corrupt(format!("key {name}: key type {kt:?}")))?;
            let algorithm = Algorithm::parse(&alg)
                .ok_or_else(|| StoreError::Corrupt(format!("key {name}: algorithm {alg:?}")))?;
            keys.push((
                id,
                StoredKey {
                    name,
                    key_type,
                    algorithm,
                    created_at_ms: created,
                    versions: Vec::new(),
                },
            ));
        }
        let mut stmt = conn.prepare(
            "SELECT key_id, version, object_id, state, created_at_ms, canary, canary_digest
             FROM key_versions ORDER BY key_id, version",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<Vec<u8>>>(5)?,
                r.get::<_, Option<Vec<u8>>>(6)?,
            ))
        })?;
        let index: std::collections::HashMap<i64, usize> = keys
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (*id, i))
            .collect();
        for row in rows {
            let (key_id, number, oid, state, created, canary, digest) = row?;
            let id = VersionId::from_slice(&oid)
                .ok_or_else(|| StoreError::Corrupt(format!("object id of length {}", oid.len())))?;
            let state = match state.as_str() {
                "pending" => VersionState::Pending,
                "active" => VersionState::Active,
                other => return Err(StoreError::Corrupt(format!("version state {other:?}"))),
            };
            let Some(&i) = index.get(&key_id) else {
                return Err(StoreError::Corrupt(format!(
                    "version of unknown key row {key_id}"
                )));
            };
            keys[i].1.versions.push(StoredVersion {
                number,
                id,
                state,
                created_at_ms: created,
                canary,
                canary_digest: digest,
            });
        }
        Ok(keys.into_iter().map(|(_, k)| k).collect())
    }

    /// Phase 1 of creating a key: inserts the key and its version 1 as pending.
    pub fn begin_create(
        &self,
        name: &KeyName,
        key_type: KeyType,
        algorithm: Algorithm,
        id: VersionId,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let exists: Option<i64> = tx
            .query_row(
                "SELECT id FROM keys WHERE tenant = ?1 AND name = ?2",
                params![name.tenant(), name.name()],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::AlreadyExists(name.to_string()));
        }
        tx.execute(
            "INSERT INTO keys (tenant, name, key_type, algorithm, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name.tenant(), name.name(), key_type.as_str(), algorithm.as_str(), now_ms],
        )?;
        let key_id = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO key_versions (key_id, version, object_id, state, created_at_ms)
             VALUES (?1, 1, ?2, 'pending', ?3)",
            params![key_id, id.as_bytes().as_slice(), now_ms],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Phase 1 of rotating a key: inserts the next version as pending; returns its number.
    pub fn begin_rotate(
        &self,
        name: &KeyName,
        id: VersionId,
        now_ms: i64,
    ) -> Result<u32, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let key_id: i64 = tx
            .query_row(
                "SELECT id FROM keys WHERE tenant = ?1 AND name = ?2",
                params![name.tenant(), name.name()],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        let next: u32 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM key_versions WHERE key_id = ?1",
            params![key_id],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO key_versions (key_id, version, object_id, state, created_at_ms)
             VALUES (?1, ?2, ?3, 'pending', ?4)",
            params![key_id, next, id.as_bytes().as_slice(), now_ms],
        )?;
        tx.commit()?;
        Ok(next)
    }

    /// Phase 3: the version's HSM object exists and passed its checks.
    pub fn commit_version(
        &self,
        id: VersionId,
        canary: &[u8],
        digest: &[u8],
    ) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE key_versions SET state = 'active', canary = ?2, canary_digest = ?3
             WHERE object_id = ?1 AND state = 'pending'",
            params![id.as_bytes().as_slice(), canary, digest],
        )?;
        if n != 1 {
            return Err(StoreError::Corrupt(format!(
                "pending version {id} vanished"
            )));
        }
        Ok(())
    }

    /// Undoes phase 1: removes a pending version, and its key if that leaves the key with no
    /// versions.
    pub fn abort_version(&self, id: VersionId) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let key_id: Option<i64> = tx
            .query_row(
                "SELECT key_id FROM key_versions WHERE object_id = ?1 AND state = 'pending'",
                params![id.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(key_id) = key_id {
            tx.execute(
                "DELETE FROM key_versions WHERE object_id = ?1",
                params![id.as_bytes().as_slice()],
            )?;
            tx.execute(
                "DELETE FROM keys WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM key_versions WHERE key_id = ?1)",
                params![key_id],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl Store {
    /// A broker-wide setting (HYOK state, audit key id, last audit checkpoint...).
    pub fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT value FROM settings WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Sets a setting durably (committed with `synchronous = FULL` before this returns).
    pub fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO settings (name, value) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            params![name, value],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> KeyName {
        KeyName::parse(s).expect("valid name")
    }

    #[test]
    fn create_commit_rotate_and_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.db");
        let v1 = VersionId::random();
        let v2 = VersionId::random();
        {
            let s = Store::open(&path).expect("open");
            s.begin_create(&name("t/k"), KeyType::Aes256, Algorithm::Aes256Gcm, v1, 1)
                .expect("create");
            assert!(matches!(
                s.begin_create(
                    &name("t/k"),
                    KeyType::Aes256,
                    Algorithm::Aes256Gcm,
                    VersionId::random(),
                    1
                ),
                Err(StoreError::AlreadyExists(_))
            ));
            s.commit_version(v1, b"c", b"d").expect("commit");
            assert_eq!(s.begin_rotate(&name("t/k"), v2, 2).expect("rotate"), 2);
        }
        let s = Store::open(&path).expect("reopen");
        let all = s.load_all().expect("load");
        assert_eq!(all.len(), 1);
        let k = &all[0];
        assert_eq!(k.versions.len(), 2);
        assert_eq!(k.versions[0].state, VersionState::Active);
        assert_eq!(k.versions[1].state, VersionState::Pending);
        assert_eq!(k.versions[1].id, v2);
        s.abort_version(v2).expect("abort");
        assert_eq!(s.load_all().expect("load")[0].versions.len(), 1);
    }

    #[test]
    fn aborting_the_only_version_removes_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("m.db")).expect("open");
        let v = VersionId::random();
        s.begin_create(&name("k"), KeyType::Rsa2048, Algorithm::RsaOaepSha1, v, 1)
            .expect("create");
        s.abort_version(v).expect("abort");
        assert!(s.load_all().expect("load").is_empty());
        assert!(matches!(
            s.begin_rotate(&name("k"), VersionId::random(), 1),
            Err(StoreError::NotFound(_))
        ));
    }
}
