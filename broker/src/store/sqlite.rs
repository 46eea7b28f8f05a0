//! The embedded metadata store: one SQLite file, for one broker process (the default).
//!
//! Durability: WAL journal with `synchronous = FULL`, so a committed change survives a crash or
//! power loss. The intent rows that make HSM changes crash-safe are described in [`super`].
//!
//! Schema versions are tracked with `PRAGMA user_version` and migrated forward at open.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    BackupRecord, PendingDestruction, StoreError, StoredKey, StoredLifecycle, StoredVersion,
    VersionState,
};
use crate::model::{Algorithm, KeyAttributes, KeyName, KeyType, Origin, VersionId};

/// The SQLite store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// Schema version 1: keys and versions.
const SCHEMA_V1: &str = "
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

/// Schema version 2: attributes, lifecycle, version origin/expiry/usage, destruction intents.
const SCHEMA_V2: &str = "
ALTER TABLE keys ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}';
ALTER TABLE keys ADD COLUMN updated_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN lifecycle TEXT NOT NULL DEFAULT 'active';
ALTER TABLE keys ADD COLUMN deleted_at_ms INTEGER;
ALTER TABLE keys ADD COLUMN purge_at_ms INTEGER;
ALTER TABLE keys ADD COLUMN deleted_by TEXT;
ALTER TABLE key_versions ADD COLUMN origin TEXT NOT NULL DEFAULT 'generated';
ALTER TABLE key_versions ADD COLUMN expires_ms INTEGER;
ALTER TABLE key_versions ADD COLUMN wraps INTEGER NOT NULL DEFAULT 0;
ALTER TABLE key_versions ADD COLUMN unwraps INTEGER NOT NULL DEFAULT 0;
ALTER TABLE key_versions ADD COLUMN last_used_ms INTEGER;
CREATE TABLE destructions (
    object_id     BLOB PRIMARY KEY,
    tenant        TEXT NOT NULL,
    name          TEXT NOT NULL,
    version       INTEGER NOT NULL,
    reason        TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    requested_at_ms INTEGER NOT NULL
);
";

/// Schema version 3: AES-GCM invocations reserved per version (the random-IV budget). A version
/// written before it starts from its wrap count, an upper bound of its GCM invocations so far.
const SCHEMA_V3: &str = "
ALTER TABLE key_versions ADD COLUMN gcm_reserved INTEGER NOT NULL DEFAULT 0;
UPDATE key_versions SET gcm_reserved = wraps;
";

/// Schema version 4: the backup blobs made of each key (purge receipts name those that hold a
/// destroyed version).
const SCHEMA_V4: &str = "
CREATE TABLE backups (
    sha256      TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    name        TEXT NOT NULL,
    version_ids TEXT NOT NULL,
    made_at_ms  INTEGER NOT NULL,
    made_by     TEXT NOT NULL
);
CREATE INDEX backups_key ON backups (tenant, name);
";

const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4];

/// The schema version this keybroker writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Creates the database file empty with mode 0600 (SQLite would create it 0644 less the umask;
/// it gives its `-wal` and `-shm` files the database file's mode). An existing file keeps its
/// mode (with a warning if group or others have any permission). The descriptor is closed
/// before SQLite opens the file: SQLite's POSIX locks do not exist yet, so closing it cancels
/// none.
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if let Ok(m) = std::fs::metadata(path)
                && m.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    mode = %format!("{:04o}", m.permissions().mode() & 0o7777),
                    "the metadata store can be used by group or others (keybroker creates it 0600)"
                );
            }
            Ok(())
        }
        Err(e) => Err(StoreError::Corrupt(format!(
            "cannot create {}: {e}",
            path.display()
        ))),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` and migrates its schema forward.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Corrupt(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        create_private(path)?;
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let mut version = usize::try_from(v).unwrap_or(usize::MAX);
        // A v1 store written before user_version was set has the tables but version 0.
        let has_keys: bool = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'keys'",
                [],
                |_| Ok(true),
            )
            .optional()?
            .unwrap_or(false);
        if version == 0 && has_keys {
            version = 1;
        }
        if version > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "schema version {version} is newer than this keybroker understands ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::info!(schema_version = i + 1, "metadata store migrated");
        }
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every key (including soft-deleted and purging ones) with its versions.
    pub fn load_all(&self) -> Result<Vec<StoredKey>, StoreError> {
        let conn = self.conn();
        let mut keys: Vec<(i64, StoredKey)> = Vec::new();
        let mut stmt = conn.prepare(
            "SELECT id, tenant, name, key_type, algorithm, created_at_ms, updated_at_ms, attributes,
                    lifecycle, deleted_at_ms, purge_at_ms, deleted_by
             FROM keys ORDER BY tenant, name",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let tenant: String = r.get(1)?;
            let name: String = r.get(2)?;
            let kt: String = r.get(3)?;
            let alg: String = r.get(4)?;
            let name = KeyName::new(&tenant, &name)
                .map_err(|e| StoreError::Corrupt(format!("key name {tenant}/{name}: {e}")))?;
            let key_type = KeyType::parse(&kt)
                .ok_or_else(|| StoreError::Corrupt(format!("key {name}: key type {kt:?}")))?;
            let algorithm = Algorithm::parse(&alg)
                .ok_or_else(|| StoreError::Corrupt(format!("key {name}: algorithm {alg:?}")))?;
            let attributes: KeyAttributes = serde_json::from_str(&r.get::<_, String>(7)?)
                .map_err(|e| StoreError::Corrupt(format!("key {name}: attributes: {e}")))?;
            let lifecycle = match r.get::<_, String>(8)?.as_str() {
                "active" => StoredLifecycle::Active,
                "deleted" => StoredLifecycle::Deleted {
                    deleted_at_ms: r.get::<_, Option<i64>>(9)?.unwrap_or(0),
                    purge_at_ms: r.get::<_, Option<i64>>(10)?.unwrap_or(0),
                    deleted_by: r.get::<_, Option<String>>(11)?.unwrap_or_default(),
                },
                "purging" => StoredLifecycle::Purging,
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "key {name}: lifecycle {other:?}"
                    )));
                }
            };
            keys.push((
                id,
                StoredKey {
                    name,
                    key_type,
                    algorithm,
                    created_at_ms: r.get(5)?,
                    updated_at_ms: r.get(6)?,
                    attributes,
                    lifecycle,
                    versions: Vec::new(),
                    stamp: 0,
                },
            ));
        }
        drop(rows);
        drop(stmt);
        let index: std::collections::HashMap<i64, usize> = keys
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (*id, i))
            .collect();
        let mut stmt = conn.prepare(
            "SELECT key_id, version, object_id, state, created_at_ms, canary, canary_digest,
                    origin, expires_ms, wraps, unwraps, last_used_ms
             FROM key_versions ORDER BY key_id, version",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let key_id: i64 = r.get(0)?;
            let oid: Vec<u8> = r.get(2)?;
            let id = VersionId::from_slice(&oid)
                .ok_or_else(|| StoreError::Corrupt(format!("object id of length {}", oid.len())))?;
            let state = match r.get::<_, String>(3)?.as_str() {
                "pending" => VersionState::Pending,
                "active" => VersionState::Active,
                other => return Err(StoreError::Corrupt(format!("version state {other:?}"))),
            };
            let origin_s: String = r.get(7)?;
            let origin = Origin::parse(&origin_s)
                .ok_or_else(|| StoreError::Corrupt(format!("version origin {origin_s:?}")))?;
            let Some(&i) = index.get(&key_id) else {
                return Err(StoreError::Corrupt(format!(
                    "version of unknown key row {key_id}"
                )));
            };
            keys[i].1.versions.push(StoredVersion {
                number: r.get(1)?,
                id,
                state,
                created_at_ms: r.get(4)?,
                canary: r.get(5)?,
                canary_digest: r.get(6)?,
                origin,
                expires_ms: r.get(8)?,
                wraps: r.get::<_, i64>(9)?.max(0) as u64,
                unwraps: r.get::<_, i64>(10)?.max(0) as u64,
                last_used_ms: r.get(11)?,
                owner: None,
            });
        }
        Ok(keys.into_iter().map(|(_, k)| k).collect())
    }

    fn key_id(
        tx: &rusqlite::Transaction<'_>,
        name: &KeyName,
    ) -> Result<Option<(i64, String)>, StoreError> {
        Ok(tx
            .query_row(
                "SELECT id, lifecycle FROM keys WHERE tenant = ?1 AND name = ?2",
                params![name.tenant(), name.name()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Phase 1 of rotating a key: inserts the next version as pending; returns its number.
    pub fn begin_rotate(
        &self,
        name: &KeyName,
        id: VersionId,
        now_ms: i64,
        expires_ms: Option<i64>,
    ) -> Result<u32, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let (key_id, _) =
            Self::key_id(&tx, name)?.ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        let next: u32 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM key_versions WHERE key_id = ?1",
            params![key_id],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO key_versions (key_id, version, object_id, state, created_at_ms, expires_ms)
             VALUES (?1, ?2, ?3, 'pending', ?4, ?5)",
            params![key_id, next, id.as_bytes().as_slice(), now_ms, expires_ms],
        )?;
        tx.commit()?;
        Ok(next)
    }

    /// Phase 1 of a restore: the key and all its versions, pending.
    pub fn begin_restore(&self, key: &super::RestoredKey) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if Self::key_id(&tx, &key.name)?.is_some() {
            return Err(StoreError::AlreadyExists(key.name.to_string()));
        }
        let attrs = serde_json::to_string(&key.attributes)
            .map_err(|e| StoreError::Corrupt(format!("attributes: {e}")))?;
        tx.execute(
            "INSERT INTO keys (tenant, name, key_type, algorithm, created_at_ms, updated_at_ms, attributes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![key.name.tenant(), key.name.name(), key.key_type.as_str(), key.algorithm.as_str(), key.created_at_ms, key.now_ms, attrs],
        )?;
        let key_id = tx.last_insert_rowid();
        for (number, id, created, origin, expires) in &key.versions {
            tx.execute(
                "INSERT INTO key_versions (key_id, version, object_id, state, created_at_ms, origin, expires_ms)
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6)",
                params![key_id, number, id.as_bytes().as_slice(), created, origin.as_str(), expires],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Phase 3 of a restore, in one transaction.
    pub fn commit_versions(
        &self,
        versions: &[(VersionId, Vec<u8>, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for (id, canary, digest) in versions {
            let n = tx.execute(
                "UPDATE key_versions SET state = 'active', canary = ?2, canary_digest = ?3
                 WHERE object_id = ?1 AND state = 'pending'",
                params![id.as_bytes().as_slice(), canary, digest],
            )?;
            if n != 1 {
                return Err(StoreError::Corrupt(format!(
                    "pending version {id} vanished"
                )));
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Phase 3: the version's HSM object exists and passed its checks.
    pub fn commit_version(
        &self,
        id: VersionId,
        canary: &[u8],
        digest: &[u8],
    ) -> Result<(), StoreError> {
        self.commit_versions(&[(id, canary.to_vec(), digest.to_vec())])
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

    /// Replaces a key's attributes.
    pub fn update_attributes(
        &self,
        name: &KeyName,
        attributes: &KeyAttributes,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let attrs = serde_json::to_string(attributes)
            .map_err(|e| StoreError::Corrupt(format!("attributes: {e}")))?;
        let n = self.conn().execute(
            "UPDATE keys SET attributes = ?3, updated_at_ms = ?4 WHERE tenant = ?1 AND name = ?2",
            params![name.tenant(), name.name(), attrs, now_ms],
        )?;
        if n != 1 {
            return Err(StoreError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// Sets a key's lifecycle to active or deleted.
    pub fn set_lifecycle(&self, name: &KeyName, lc: &StoredLifecycle) -> Result<(), StoreError> {
        let (state, deleted_at, purge_at, by) = match lc {
            StoredLifecycle::Active => ("active", None, None, None),
            StoredLifecycle::Deleted {
                deleted_at_ms,
                purge_at_ms,
                deleted_by,
            } => (
                "deleted",
                Some(*deleted_at_ms),
                Some(*purge_at_ms),
                Some(deleted_by.clone()),
            ),
            StoredLifecycle::Purging => ("purging", None, None, None),
        };
        let n = self.conn().execute(
            "UPDATE keys SET lifecycle = ?3, deleted_at_ms = ?4, purge_at_ms = ?5, deleted_by = ?6
             WHERE tenant = ?1 AND name = ?2",
            params![name.tenant(), name.name(), state, deleted_at, purge_at, by],
        )?;
        if n != 1 {
            return Err(StoreError::NotFound(name.to_string()));
        }
        Ok(())
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
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for (n, id) in versions {
            tx.execute(
                "INSERT OR IGNORE INTO destructions (object_id, tenant, name, version, reason, requested_by, requested_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![id.as_bytes().as_slice(), name.tenant(), name.name(), n, reason, by, now_ms],
            )?;
        }
        if reason == "purge" {
            tx.execute(
                "UPDATE keys SET lifecycle = 'purging' WHERE tenant = ?1 AND name = ?2",
                params![name.tenant(), name.name()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The destruction intents still open (after a crash).
    pub fn pending_destructions(&self) -> Result<Vec<PendingDestruction>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT object_id, tenant, name, version, reason, requested_by FROM destructions ORDER BY tenant, name, version",
        )?;
        let mut out = Vec::new();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let oid: Vec<u8> = r.get(0)?;
            let tenant: String = r.get(1)?;
            let name: String = r.get(2)?;
            out.push(PendingDestruction {
                id: VersionId::from_slice(&oid)
                    .ok_or_else(|| StoreError::Corrupt("destruction object id".into()))?,
                key: KeyName::new(&tenant, &name)
                    .map_err(|e| StoreError::Corrupt(format!("destruction key: {e}")))?,
                version: r.get(3)?,
                reason: r.get(4)?,
                requested_by: r.get(5)?,
                owner: None,
            });
        }
        Ok(out)
    }

    /// The HSM objects are gone: removes the versions and the intents, and for a purge the key.
    pub fn finish_destroy(
        &self,
        name: &KeyName,
        ids: &[VersionId],
        purge: bool,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for id in ids {
            tx.execute(
                "DELETE FROM key_versions WHERE object_id = ?1",
                params![id.as_bytes().as_slice()],
            )?;
            tx.execute(
                "DELETE FROM destructions WHERE object_id = ?1",
                params![id.as_bytes().as_slice()],
            )?;
        }
        if purge {
            tx.execute(
                "DELETE FROM key_versions WHERE key_id = (SELECT id FROM keys WHERE tenant = ?1 AND name = ?2)",
                params![name.tenant(), name.name()],
            )?;
            tx.execute(
                "DELETE FROM keys WHERE tenant = ?1 AND name = ?2",
                params![name.tenant(), name.name()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Adds usage counted since the last save.
    pub fn add_usage(
        &self,
        usage: &[(VersionId, u64, u64, Option<i64>)],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for (id, w, u, last) in usage {
            tx.execute(
                "UPDATE key_versions SET wraps = wraps + ?2, unwraps = unwraps + ?3,
                        last_used_ms = CASE WHEN ?4 IS NULL THEN last_used_ms
                                            ELSE MAX(COALESCE(last_used_ms, 0), ?4) END
                 WHERE object_id = ?1",
                params![
                    id.as_bytes().as_slice(),
                    i64::try_from(*w).unwrap_or(i64::MAX),
                    i64::try_from(*u).unwrap_or(i64::MAX),
                    last
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Reserves up to `want` AES-GCM invocations of version `id`, never past `limit` in all:
    /// the range `[start, end)` granted (empty when the budget is spent).
    pub fn reserve_gcm(
        &self,
        id: VersionId,
        want: u64,
        limit: u64,
    ) -> Result<(u64, u64), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let used: Option<i64> = tx
            .query_row(
                "SELECT gcm_reserved FROM key_versions WHERE object_id = ?1",
                params![id.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .optional()?;
        let Some(used) = used else {
            return Err(StoreError::Corrupt(format!(
                "version {id} is not in the store"
            )));
        };
        let start = u64::try_from(used).unwrap_or(0);
        let end = start.saturating_add(want).min(limit).max(start);
        tx.execute(
            "UPDATE key_versions SET gcm_reserved = ?2 WHERE object_id = ?1",
            params![
                id.as_bytes().as_slice(),
                i64::try_from(end).unwrap_or(i64::MAX)
            ],
        )?;
        tx.commit()?;
        Ok((start, end))
    }

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

    /// Records a backup blob (committed before this returns).
    pub fn record_backup(&self, name: &KeyName, b: &BackupRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO backups (sha256, tenant, name, version_ids, made_at_ms, made_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                b.sha256,
                name.tenant(),
                name.name(),
                b.version_ids.join(","),
                b.made_at_ms,
                b.made_by
            ],
        )?;
        Ok(())
    }

    /// The backup blobs made of keys named `name`, oldest first.
    pub fn backups(&self, name: &KeyName) -> Result<Vec<BackupRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT sha256, version_ids, made_at_ms, made_by FROM backups
             WHERE tenant = ?1 AND name = ?2 ORDER BY made_at_ms, sha256",
        )?;
        let rows = stmt.query_map(params![name.tenant(), name.name()], |r| {
            let ids: String = r.get(1)?;
            Ok(BackupRecord {
                sha256: r.get(0)?,
                version_ids: ids
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                made_at_ms: r.get(2)?,
                made_by: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
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

    fn create(s: &SqliteStore, n: &str, v: VersionId) -> Result<(), StoreError> {
        s.begin_restore(&crate::store::RestoredKey::new_key(
            &name(n),
            KeyType::Aes256,
            Algorithm::Aes256Gcm,
            &KeyAttributes::default(),
            Origin::Generated,
            v,
            1,
        ))
    }

    #[test]
    fn create_commit_rotate_and_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.db");
        let v1 = VersionId::random();
        let v2 = VersionId::random();
        {
            let s = SqliteStore::open(&path).expect("open");
            create(&s, "t/k", v1).expect("create");
            assert!(matches!(
                create(&s, "t/k", VersionId::random()),
                Err(StoreError::AlreadyExists(_))
            ));
            s.commit_version(v1, b"c", b"d").expect("commit");
            assert_eq!(
                s.begin_rotate(&name("t/k"), v2, 2, None).expect("rotate"),
                2
            );
        }
        let s = SqliteStore::open(&path).expect("reopen");
        let all = s.load_all().expect("load");
        assert_eq!(all.len(), 1);
        let k = &all[0];
        assert_eq!(k.attributes, KeyAttributes::default());
        assert_eq!(k.lifecycle, StoredLifecycle::Active);
        assert_eq!(k.versions.len(), 2);
        assert_eq!(k.versions[0].state, VersionState::Active);
        assert_eq!(k.versions[1].state, VersionState::Pending);
        assert_eq!(k.versions[1].id, v2);
        s.abort_version(v2).expect("abort");
        assert_eq!(s.load_all().expect("load")[0].versions.len(), 1);
    }

    #[test]
    fn a_new_store_and_its_wal_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.db");
        let s = SqliteStore::open(&path).expect("open");
        create(&s, "t/k", VersionId::random()).expect("a write, so the WAL exists");
        for f in ["m.db", "m.db-wal", "m.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap_or_else(|e| panic!("{f}: {e}"))
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}: {mode:o}");
        }
    }

    #[test]
    fn aborting_the_only_version_removes_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(&dir.path().join("m.db")).expect("open");
        let v = VersionId::random();
        create(&s, "k", v).expect("create");
        s.abort_version(v).expect("abort");
        assert!(s.load_all().expect("load").is_empty());
        assert!(matches!(
            s.begin_rotate(&name("k"), VersionId::random(), 1, None),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn a_version_1_store_is_migrated_and_keeps_its_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.db");
        {
            let c = Connection::open(&path).expect("open");
            c.execute_batch(SCHEMA_V1).expect("v1");
            c.execute("INSERT INTO keys (tenant, name, key_type, algorithm, created_at_ms) VALUES ('t', 'old', 'aes-256', 'aes-256-gcm', 5)", [])
                .expect("row");
            c.execute("INSERT INTO key_versions (key_id, version, object_id, state, created_at_ms) VALUES (1, 1, x'00112233445566778899aabbccddeeff', 'active', 5)", [])
                .expect("row");
        }
        let s = SqliteStore::open(&path).expect("migrate");
        let all = s.load_all().expect("load");
        assert_eq!(all[0].name.to_string(), "t/old");
        assert_eq!(all[0].attributes, KeyAttributes::default());
        assert_eq!(all[0].versions[0].origin, Origin::Generated);
        let v: i64 = s
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(v, 4);
    }

    #[test]
    fn backup_records_are_kept_per_key_name_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.db");
        let s = SqliteStore::open(&path).expect("open");
        let rec = |sha: &str, ids: &[&str], at| BackupRecord {
            sha256: sha.into(),
            version_ids: ids.iter().map(|s| s.to_string()).collect(),
            made_at_ms: at,
            made_by: "spiffe://acme/ops".into(),
        };
        s.record_backup(&name("t/k"), &rec("bb", &["01", "02"], 20))
            .expect("record");
        s.record_backup(&name("t/k"), &rec("aa", &["01"], 10))
            .expect("record");
        s.record_backup(&name("t/other"), &rec("cc", &["03"], 5))
            .expect("record");
        // The same blob recorded twice (a retried request) is one record.
        s.record_backup(&name("t/k"), &rec("aa", &["01"], 10))
            .expect("record again");
        drop(s);
        let s = SqliteStore::open(&path).expect("reopen");
        assert_eq!(
            s.backups(&name("t/k")).expect("read"),
            [rec("aa", &["01"], 10), rec("bb", &["01", "02"], 20)]
        );
        assert!(s.backups(&name("u/k")).expect("read").is_empty());
    }

    #[test]
    fn gcm_reservations_persist_and_never_pass_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.db");
        let id = VersionId::from_slice(&[7; 16]).expect("id");
        {
            let c = Connection::open(&path).expect("open");
            c.execute_batch(SCHEMA_V1).expect("v1");
            c.execute_batch(SCHEMA_V2).expect("v2");
            c.pragma_update(None, "user_version", 2).expect("v2");
            c.execute("INSERT INTO keys (tenant, name, key_type, algorithm, created_at_ms) VALUES ('t', 'k', 'aes-256', 'aes-256-gcm', 5)", [])
                .expect("row");
            c.execute("INSERT INTO key_versions (key_id, version, object_id, state, created_at_ms, wraps) VALUES (1, 1, ?1, 'active', 5, 12)", params![id.as_bytes().as_slice()])
                .expect("row");
        }
        // The migration starts the budget from the wraps already made.
        let s = SqliteStore::open(&path).expect("migrate");
        assert_eq!(s.reserve_gcm(id, 10, 40).expect("reserve"), (12, 22));
        assert_eq!(s.reserve_gcm(id, 10, 40).expect("reserve"), (22, 32));
        drop(s);
        // A reopened store (a restart) goes on from what was reserved, not from zero.
        let s = SqliteStore::open(&path).expect("reopen");
        assert_eq!(s.reserve_gcm(id, 10, 40).expect("reserve"), (32, 40));
        assert_eq!(s.reserve_gcm(id, 10, 40).expect("spent"), (40, 40));
        let unknown = VersionId::from_slice(&[8; 16]).expect("id");
        assert!(s.reserve_gcm(unknown, 1, 40).is_err());
    }

    #[test]
    fn destruction_intents_survive_until_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.db");
        let v = VersionId::random();
        {
            let s = SqliteStore::open(&path).expect("open");
            create(&s, "t/k", v).expect("create");
            s.commit_version(v, b"c", b"d").expect("commit");
            s.begin_destroy(&name("t/k"), &[(1, v)], "purge", "alice", 9)
                .expect("intent");
        }
        let s = SqliteStore::open(&path).expect("reopen");
        let p = s.pending_destructions().expect("pending");
        assert_eq!((p.len(), p[0].id, p[0].reason.as_str()), (1, v, "purge"));
        assert_eq!(
            s.load_all().expect("load")[0].lifecycle,
            StoredLifecycle::Purging
        );
        s.finish_destroy(&name("t/k"), &[v], true).expect("finish");
        assert!(s.pending_destructions().expect("pending").is_empty());
        assert!(s.load_all().expect("load").is_empty());
    }
}
