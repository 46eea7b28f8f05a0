//! The shared metadata store: PostgreSQL, for several broker replicas in front of one HSM token.
//!
//! Same rows as the SQLite store (tables prefixed `kb_`), plus what replicas need:
//!
//! * **Generation.** `kb_generation` holds one counter. Every change runs in a transaction that
//!   first increments it (`UPDATE ... RETURNING`), stamps the key or setting rows it touches with
//!   the new value (column `gen`) and calls `pg_notify('keybroker_changes', gen)`. The counter row's lock
//!   is held until commit, so generations commit in order: a reader that sees generation N sees
//!   every change up to N. A replica remembers the generation its cache reflects; one indexed read
//!   ([`PgStore::generation`]) tells whether anything changed, and [`PgStore::changes_since`]
//!   returns exactly what did (purged keys leave a row in `kb_purged_keys`). Usage counters are
//!   telemetry and do not bump the generation.
//! * **Write lock.** [`PgStore::lock_writes`] takes a session advisory lock
//!   (`pg_advisory_lock`) that every replica takes around every change that also touches the HSM
//!   (create, rotate, import, update, delete, recover, purge, trim): the check-then-act steps run
//!   on a cache refreshed under the lock, so two replicas can never both take one name or one
//!   version number. Version numbers also have a primary key, and an allocation that loses a
//!   race anyway is retried.
//! * **Presence.** Each process holds an advisory lock on a random id for its whole life (on its
//!   `LISTEN` connection) and records that id on the pending versions and destruction intents it
//!   writes. At start-up a replica rolls back only the pending rows whose owner no longer holds
//!   its lock (it crashed): never the creation another live replica is in the middle of.
//! * **Migrations.** `kb_schema` holds the schema version; [`PgStore::open`] applies the missing
//!   migrations in one transaction under an advisory lock, so replicas starting together migrate
//!   once. A newer schema than this keybroker knows is refused.
//!
//! Calls are blocking (like the SQLite store's): each runs its queries on the broker's tokio
//! runtime with `Handle::block_on`, from the blocking thread the keyring already uses. No
//! password is ever taken from the URL (see `config`).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use tokio::{runtime::Handle, sync::Notify};
use tokio_postgres::{AsyncMessage, Client, Config, IsolationLevel, NoTls, Transaction};

use super::{
    BackupRecord, Changes, PendingDestruction, StoreError, StoredKey, StoredLifecycle,
    StoredVersion, VersionState,
};
use crate::model::{Algorithm, KeyAttributes, KeyName, KeyType, Origin, VersionId};

/// Advisory lock (bigint key space) serialising migrations.
const MIGRATION_LOCK: i64 = 0x6b62_0000_0001;
/// Advisory lock (bigint key space) serialising changes across replicas.
const WRITE_LOCK: i64 = 0x6b62_0000_0002;
/// Class of the replicas' presence locks (two-int key space, which never overlaps the bigint one).
const PRESENCE_CLASS: i32 = 0x6b62;
/// The notification channel.
pub const CHANNEL: &str = "keybroker_changes";
/// Idle connections kept for reuse.
const MAX_IDLE: usize = 16;

/// Schema version 1: keys, versions, settings, destruction intents (the SQLite store's rows).
const SCHEMA_V1: &str = "
CREATE TABLE kb_keys (
    id            BIGSERIAL PRIMARY KEY,
    tenant        TEXT NOT NULL,
    name          TEXT NOT NULL,
    key_type      TEXT NOT NULL,
    algorithm     TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    attributes    TEXT NOT NULL DEFAULT '{}',
    lifecycle     TEXT NOT NULL DEFAULT 'active' CHECK (lifecycle IN ('active', 'deleted', 'purging')),
    deleted_at_ms BIGINT,
    purge_at_ms   BIGINT,
    deleted_by    TEXT,
    UNIQUE (tenant, name)
);
CREATE TABLE kb_key_versions (
    key_id        BIGINT NOT NULL REFERENCES kb_keys(id) ON DELETE CASCADE,
    version       INTEGER NOT NULL CHECK (version > 0),
    object_id     BYTEA NOT NULL UNIQUE,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'active')),
    created_at_ms BIGINT NOT NULL,
    canary        BYTEA,
    canary_digest BYTEA,
    origin        TEXT NOT NULL DEFAULT 'generated',
    expires_ms    BIGINT,
    wraps         BIGINT NOT NULL DEFAULT 0,
    unwraps       BIGINT NOT NULL DEFAULT 0,
    last_used_ms  BIGINT,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE kb_settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE kb_destructions (
    object_id       BYTEA PRIMARY KEY,
    tenant          TEXT NOT NULL,
    name            TEXT NOT NULL,
    version         INTEGER NOT NULL,
    reason          TEXT NOT NULL,
    requested_by    TEXT NOT NULL,
    requested_at_ms BIGINT NOT NULL
);
";

/// Schema version 2: what replicas need — the generation, per-row change stamps, tombstones of
/// purged keys, and the owner of in-flight work.
const SCHEMA_V2: &str = "
CREATE TABLE kb_generation (
    id    BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    value BIGINT NOT NULL
);
INSERT INTO kb_generation (id, value) VALUES (TRUE, 1);
ALTER TABLE kb_keys ADD COLUMN gen BIGINT NOT NULL DEFAULT 1;
ALTER TABLE kb_settings ADD COLUMN gen BIGINT NOT NULL DEFAULT 1;
ALTER TABLE kb_key_versions ADD COLUMN owner BIGINT;
ALTER TABLE kb_destructions ADD COLUMN owner BIGINT;
CREATE TABLE kb_purged_keys (
    tenant TEXT NOT NULL,
    name   TEXT NOT NULL,
    gen    BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE INDEX kb_keys_gen ON kb_keys (gen);
CREATE INDEX kb_settings_gen ON kb_settings (gen);
CREATE INDEX kb_purged_keys_gen ON kb_purged_keys (gen);
";

/// Schema version 3: AES-GCM invocations reserved per version (the random-IV budget), from the
/// wrap count for versions written before it.
const SCHEMA_V3: &str = "
ALTER TABLE kb_key_versions ADD COLUMN gcm_reserved BIGINT NOT NULL DEFAULT 0;
UPDATE kb_key_versions SET gcm_reserved = wraps;
";

/// Schema version 4: the backup blobs made of each key (purge receipts name those that hold a
/// destroyed version).
const SCHEMA_V4: &str = "
CREATE TABLE kb_backups (
    sha256      TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    name        TEXT NOT NULL,
    version_ids TEXT NOT NULL,
    made_at_ms  BIGINT NOT NULL,
    made_by     TEXT NOT NULL
);
CREATE INDEX kb_backups_key ON kb_backups (tenant, name);
";

/// The migrations, in order; the schema version is the number applied.
pub const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4];

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres(pg_message(&e))
    }
}

fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut m = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                m.push_str(": ");
                m.push_str(&s.to_string());
                src = s.source();
            }
            m
        }
    }
}

fn sqlstate(e: &StoreError) -> Option<&str> {
    match e {
        StoreError::Postgres(m) => m.rsplit_once('(').map(|(_, c)| c.trim_end_matches(')')),
        _ => None,
    }
}

/// TLS to the server: the CA bundle (PEM) that issues its certificate. With it, every
/// connection requires TLS and verifies the certificate and host name (rustls, TLS 1.2/1.3).
pub type Tls = tokio_postgres_rustls::MakeRustlsConnect;

/// Builds the TLS connector from a CA bundle (PEM file).
pub fn tls_from_ca_file(path: &std::path::Path) -> Result<Tls, StoreError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| StoreError::Postgres(format!("store.ca_file {}: {e}", path.display())))?;
    for c in certs {
        let c =
            c.map_err(|e| StoreError::Postgres(format!("store.ca_file {}: {e}", path.display())))?;
        roots
            .add(c)
            .map_err(|e| StoreError::Postgres(format!("store.ca_file {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(StoreError::Postgres(format!(
            "store.ca_file {} holds no certificate",
            path.display()
        )));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Postgres(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Connects (with TLS when `tls` is given) and spawns the task that drives the connection;
/// notifications go to `notifications` when given.
async fn connect_with(
    config: &Config,
    tls: Option<&Tls>,
    notifications: Option<tokio::sync::mpsc::UnboundedSender<()>>,
) -> Result<(Client, tokio::task::JoinHandle<()>), StoreError> {
    fn drive<S, T>(
        mut conn: tokio_postgres::Connection<S, T>,
        tx: Option<tokio::sync::mpsc::UnboundedSender<()>>,
    ) -> tokio::task::JoinHandle<()>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(_)) => {
                        if let Some(tx) = &tx
                            && tx.send(()).is_err()
                        {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if tx.is_some() {
                            tracing::warn!(error = %pg_message(&e), "metadata store: listening connection lost");
                        } else {
                            tracing::debug!(error = %pg_message(&e), "metadata store connection ended");
                        }
                        break;
                    }
                }
            }
        })
    }
    match tls {
        None => {
            let (client, conn) = config.connect(NoTls).await?;
            Ok((client, drive(conn, notifications)))
        }
        Some(t) => {
            let (client, conn) = config.connect(t.clone()).await?;
            Ok((client, drive(conn, notifications)))
        }
    }
}

struct Shared {
    config: Config,
    tls: Option<Tls>,
    handle: Handle,
    idle: Mutex<Vec<Client>>,
}

impl Shared {
    async fn connect(&self) -> Result<Client, StoreError> {
        let (client, _driver) = connect_with(&self.config, self.tls.as_ref(), None).await?;
        // A write-lock wait or a stuck query fails (UNAVAILABLE) instead of hanging a request.
        client
            .batch_execute("SET lock_timeout = '30s'; SET statement_timeout = '60s'")
            .await?;
        Ok(client)
    }

    fn checkout(&self) -> Option<Client> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if !c.is_closed() {
                return Some(c);
            }
        }
        None
    }

    fn checkin(&self, c: Client) {
        if c.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(c);
        }
    }

    /// Runs `f` with a pooled connection (blocking the calling thread, which must not be an
    /// async worker).
    fn exec<T>(
        &self,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.handle.block_on(async {
            let mut c = match self.checkout() {
                Some(c) => c,
                None => self.connect().await?,
            };
            let r = f(&mut c).await;
            self.checkin(c);
            r
        })
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    shared: Arc<Shared>,
    describe: String,
    owner: i32,
    notify: Arc<Notify>,
    listener: Option<tokio::task::JoinHandle<()>>,
    /// A runtime of our own when opened outside one (unit tests, tools); the broker uses its own.
    _runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(l) = self.listener.take() {
            l.abort();
        }
    }
}

/// The cluster-wide write lock, held on one connection.
pub struct PgLock {
    shared: Arc<Shared>,
    client: Option<Client>,
}

impl PgLock {
    /// Unlocks and returns the connection to the pool (blocking).
    pub fn release(mut self) {
        if let Some(c) = self.client.take() {
            let shared = self.shared.clone();
            shared.handle.clone().block_on(async move {
                match c
                    .execute("SELECT pg_advisory_unlock($1)", &[&WRITE_LOCK])
                    .await
                {
                    Ok(_) => shared.checkin(c),
                    // Dropping the connection ends the session, which releases the lock.
                    Err(e) => tracing::warn!(error = %pg_message(&e), "write lock release failed; closing its connection"),
                }
            });
        }
    }
}

impl PgStore {
    /// Connects, applies missing migrations, takes this process's presence lock and starts
    /// listening for other replicas' changes. Blocking: call it from a blocking thread (or from
    /// outside any tokio runtime).
    pub fn open(url: &str, password: Option<&str>, tls: Option<Tls>) -> Result<Self, StoreError> {
        let mut config: Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Postgres(format!("store.url: {e}")))?;
        if tls.is_some() {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        if config.get_password().is_some() {
            return Err(StoreError::Postgres(
                "store.url carries a password: give it with store.password_file or store.password_env instead".into(),
            ));
        }
        if let Some(p) = password {
            config.password(p);
        }
        if config.get_application_name().is_none() {
            config.application_name("keybroker");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let describe = describe_config(&config);
        let (handle, runtime) = match Handle::try_current() {
            Ok(h) => (h, None),
            Err(_) => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .map_err(|e| StoreError::Postgres(format!("runtime: {e}")))?;
                (rt.handle().clone(), Some(rt))
            }
        };
        let shared = Arc::new(Shared {
            config,
            tls,
            handle: handle.clone(),
            idle: Mutex::new(Vec::new()),
        });
        shared.exec(async |c| migrate(c).await)?;
        let mut b = [0u8; 4];
        getrandom::fill(&mut b).map_err(|e| StoreError::Postgres(format!("random: {e}")))?;
        let owner = i32::from_be_bytes(b) & 0x7fff_ffff;
        let notify = Arc::new(Notify::new());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let listener = handle.spawn(listen(
            shared.clone(),
            owner,
            notify.clone(),
            Some(ready_tx),
        ));
        match handle
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), ready_rx).await })
        {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                listener.abort();
                return Err(e);
            }
            _ => {
                listener.abort();
                return Err(StoreError::Postgres(
                    "could not take this replica's presence lock within 30 s".into(),
                ));
            }
        }
        Ok(Self {
            shared,
            describe,
            owner,
            notify,
            listener: Some(listener),
            _runtime: runtime,
        })
    }

    /// Connects without changing anything (`check-config`): the server's version and the
    /// schema version found (`None`: no keybroker schema yet). Blocking, like `open`.
    pub fn probe(
        url: &str,
        password: Option<&str>,
        tls: Option<Tls>,
    ) -> Result<(String, Option<i64>, bool), StoreError> {
        let mut config: Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Postgres(format!("store.url: {e}")))?;
        if tls.is_some() {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        if let Some(p) = password {
            config.password(p);
        }
        config.connect_timeout(Duration::from_secs(10));
        let rt;
        let handle = match Handle::try_current() {
            Ok(h) => h,
            Err(_) => {
                rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| StoreError::Postgres(format!("runtime: {e}")))?;
                rt.handle().clone()
            }
        };
        handle.block_on(async {
            let (client, driver) = connect_with(&config, tls.as_ref(), None).await?;
            let server: String = client.query_one("SHOW server_version", &[]).await?.get(0);
            let encrypted: bool = client
                .query_one(
                    "SELECT COALESCE((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
                    &[],
                )
                .await?
                .get(0);
            let has: bool = client
                .query_one("SELECT to_regclass('kb_schema') IS NOT NULL", &[])
                .await?
                .get(0);
            let schema = if has {
                client
                    .query_opt("SELECT version FROM kb_schema", &[])
                    .await?
                    .map(|r| i64::from(r.get::<_, i32>(0)))
            } else {
                None
            };
            drop(client);
            driver.abort();
            Ok((server, schema, encrypted))
        })
    }

    /// `postgres://user@host:port/db` (never the password).
    pub fn describe(&self) -> String {
        self.describe.clone()
    }

    /// This process's presence id (recorded on its pending work).
    pub fn owner(&self) -> i64 {
        i64::from(self.owner)
    }

    /// Resolves each time another replica announces a change, and after the listening
    /// connection reconnects.
    pub fn notifications(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    fn exec<T>(
        &self,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.shared.exec(f)
    }

    /// The schema version applied.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.exec(async |c| {
            Ok(i64::from(
                c.query_one("SELECT version FROM kb_schema", &[])
                    .await?
                    .get::<_, i32>(0),
            ))
        })
    }

    /// The store-wide generation.
    pub fn generation(&self) -> Result<i64, StoreError> {
        self.exec(async |c| {
            Ok(c.query_one("SELECT value FROM kb_generation", &[])
                .await?
                .get(0))
        })
    }

    /// Every key with every version (pending ones included).
    pub fn load_all(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.exec(async |c| {
            let tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let keys = read_keys(&tx, None, false).await?;
            tx.commit().await?;
            Ok(keys.into_iter().map(|(_, k)| k).collect())
        })
    }

    /// What changed since `since`, in one consistent snapshot.
    pub fn changes_since(&self, since: i64) -> Result<Changes, StoreError> {
        self.exec(async |c| {
            let tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let generation: i64 = tx
                .query_one("SELECT value FROM kb_generation", &[])
                .await?
                .get(0);
            let mut out = Changes {
                generation,
                ..Default::default()
            };
            if generation <= since {
                tx.commit().await?;
                return Ok(out);
            }
            for (stamp, k) in read_keys(&tx, Some(since), true).await? {
                let name = k.name.clone();
                let servable = (k.lifecycle != StoredLifecycle::Purging && !k.versions.is_empty())
                    .then_some(k);
                out.keys.push((name, stamp, servable));
            }
            for r in tx
                .query(
                    "SELECT tenant, name, gen FROM kb_purged_keys WHERE gen > $1",
                    &[&since],
                )
                .await?
            {
                let (t, n): (String, String) = (r.get(0), r.get(1));
                let name = KeyName::new(&t, &n)
                    .map_err(|e| StoreError::Corrupt(format!("purged key {t}/{n}: {e}")))?;
                let stamp: i64 = r.get(2);
                // A key purged and then created again under the same name: the newer wins.
                match out.keys.iter_mut().find(|(k, _, _)| *k == name) {
                    Some(existing) if existing.1 >= stamp => {}
                    Some(existing) => *existing = (name, stamp, None),
                    None => out.keys.push((name, stamp, None)),
                }
            }
            for r in tx
                .query(
                    "SELECT name, value FROM kb_settings WHERE gen > $1 ORDER BY gen",
                    &[&since],
                )
                .await?
            {
                out.settings.push((r.get(0), r.get(1)));
            }
            tx.commit().await?;
            Ok(out)
        })
    }

    /// Phase 1 of rotating: the next version number, allocated in the database (the primary key
    /// on (key, version) refuses a duplicate; a lost race is retried).
    pub fn begin_rotate(
        &self,
        name: &KeyName,
        id: VersionId,
        now_ms: i64,
        expires_ms: Option<i64>,
    ) -> Result<u32, StoreError> {
        let owner = self.owner();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = self.exec(async |c| {
                let tx = c.transaction().await?;
                let stamp = bump(&tx).await?;
                let key_id: i64 = tx
                    .query_opt(
                        "UPDATE kb_keys SET gen = $3 WHERE tenant = $1 AND name = $2 RETURNING id",
                        &[&name.tenant(), &name.name(), &stamp],
                    )
                    .await?
                    .ok_or_else(|| StoreError::NotFound(name.to_string()))?
                    .get(0);
                let next: i32 = tx
                    .query_one(
                        "SELECT COALESCE(MAX(version), 0) + 1 FROM kb_key_versions WHERE key_id = $1",
                        &[&key_id],
                    )
                    .await?
                    .get(0);
                tx.execute(
                    "INSERT INTO kb_key_versions (key_id, version, object_id, state, created_at_ms, expires_ms, owner)
                     VALUES ($1, $2, $3, 'pending', $4, $5, $6)",
                    &[&key_id, &next, &id.as_bytes().as_slice(), &now_ms, &expires_ms, &owner],
                )
                .await?;
                tx.commit().await?;
                u32::try_from(next).map_err(|_| StoreError::Corrupt(format!("version {next}")))
            });
            match r {
                Err(e) if attempt < 5 && matches!(sqlstate(&e), Some("23505") | Some("40001")) => {
                    tracing::info!(key = %name, attempt, "version number taken by another replica; retrying");
                }
                other => return other,
            }
        }
    }

    /// Phase 1 of a restore: the key and all its versions, pending.
    pub fn begin_restore(&self, key: &super::RestoredKey) -> Result<(), StoreError> {
        let attrs = serde_json::to_string(&key.attributes)
            .map_err(|e| StoreError::Corrupt(format!("attributes: {e}")))?;
        let owner = self.owner();
        let r = self.exec(async |c| {
            let tx = c.transaction().await?;
            let stamp = bump(&tx).await?;
            let key_id: i64 = tx
                .query_one(
                    "INSERT INTO kb_keys (tenant, name, key_type, algorithm, created_at_ms, updated_at_ms, attributes, gen)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                    &[&key.name.tenant(), &key.name.name(), &key.key_type.as_str(), &key.algorithm.as_str(), &key.created_at_ms, &key.now_ms, &attrs, &stamp],
                )
                .await?
                .get(0);
            for (number, id, created, origin, expires) in &key.versions {
                let number = i32::try_from(*number)
                    .map_err(|_| StoreError::Corrupt(format!("version {number}")))?;
                tx.execute(
                    "INSERT INTO kb_key_versions (key_id, version, object_id, state, created_at_ms, origin, expires_ms, owner)
                     VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7)",
                    &[&key_id, &number, &id.as_bytes().as_slice(), created, &origin.as_str(), expires, &owner],
                )
                .await?;
            }
            tx.execute(
                "DELETE FROM kb_purged_keys WHERE tenant = $1 AND name = $2",
                &[&key.name.tenant(), &key.name.name()],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        });
        match r {
            Err(e) if sqlstate(&e) == Some("23505") => {
                Err(StoreError::AlreadyExists(key.name.to_string()))
            }
            other => other,
        }
    }

    /// Phase 3 of a restore, in one transaction.
    pub fn commit_versions(
        &self,
        versions: &[(VersionId, Vec<u8>, Vec<u8>)],
    ) -> Result<(), StoreError> {
        self.exec(async |c| {
            let tx = c.transaction().await?;
            let stamp = bump(&tx).await?;
            for (id, canary, digest) in versions {
                let n = tx
                    .execute(
                        "UPDATE kb_key_versions SET state = 'active', canary = $2, canary_digest = $3, owner = NULL
                         WHERE object_id = $1 AND state = 'pending'",
                        &[&id.as_bytes().as_slice(), canary, digest],
                    )
                    .await?;
                if n != 1 {
                    return Err(StoreError::Corrupt(format!("pending version {id} vanished")));
                }
                touch_key_of_version(&tx, *id, stamp).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Phase 3.
    pub fn commit_version(
        &self,
        id: VersionId,
        canary: &[u8],
        digest: &[u8],
    ) -> Result<(), StoreError> {
        self.commit_versions(&[(id, canary.to_vec(), digest.to_vec())])
    }

    /// Undoes phase 1.
    pub fn abort_version(&self, id: VersionId) -> Result<(), StoreError> {
        self.exec(async |c| {
            let tx = c.transaction().await?;
            let stamp = bump(&tx).await?;
            let key_id: Option<i64> = tx
                .query_opt(
                    "SELECT key_id FROM kb_key_versions WHERE object_id = $1 AND state = 'pending'",
                    &[&id.as_bytes().as_slice()],
                )
                .await?
                .map(|r| r.get(0));
            if let Some(key_id) = key_id {
                tx.execute(
                    "DELETE FROM kb_key_versions WHERE object_id = $1",
                    &[&id.as_bytes().as_slice()],
                )
                .await?;
                tx.execute("UPDATE kb_keys SET gen = $2 WHERE id = $1", &[&key_id, &stamp])
                    .await?;
                let gone = tx
                    .query_opt(
                        "DELETE FROM kb_keys WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM kb_key_versions WHERE key_id = $1)
                         RETURNING tenant, name",
                        &[&key_id],
                    )
                    .await?;
                if let Some(r) = gone {
                    tombstone(&tx, r.get(0), r.get(1), stamp).await?;
                }
            }
            tx.commit().await?;
            Ok(())
        })
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
        self.exec(async |c| {
            let tx = c.transaction().await?;
            let stamp = bump(&tx).await?;
            let n = tx
                .execute(
                    "UPDATE kb_keys SET attributes = $3, updated_at_ms = $4, gen = $5 WHERE tenant = $1 AND name = $2",
                    &[&name.tenant(), &name.name(), &attrs, &now_ms, &stamp],
                )
                .await?;
            if n != 1 {
                return Err(StoreError::NotFound(name.to_string()));
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Sets a key's lifecycle.
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
        self.exec(async |c| {
            let tx = c.transaction().await?;
            let stamp = bump(&tx).await?;
            let n = tx
                .execute(
                    "UPDATE kb_keys SET lifecycle = $3, deleted_at_ms = $4, purge_at_ms = $5, deleted_by = $6, gen = $7
                     WHERE tenant = $1 AND name = $2",
                    &[&name.tenant(), &name.name(), &state, &deleted_at, &purge_at, &by, &stamp],
                )
                .await?;
            if n != 1 {
                return Err(StoreError::NotFound(name.to_string()));
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Records destruction intents.
    pub fn begin_destroy(
        &self,
        name: &KeyName,
        versions: &[(u32, VersionId)],
        reason: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let owner = self.owner();
        self.exec(async |c| {
            let tx = c.transaction().await?;
            let stamp = bump(&tx).await?;
            for (n, id) in versions {
                let n = i32::try_from(*n).map_err(|_| StoreError::Corrupt(format!("version {n}")))?;
                tx.execute(
                    "INSERT INTO kb_destructions (object_id, tenant, name, version, reason, requested_by, requested_at_ms, owner)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (object_id) DO NOTHING",
                    &[&id.as_bytes().as_slice(), &name.tenant(), &name.name(), &n, &reason, &by, &now_ms, &owner],
                )
                .await?;
            }
            if reason == "purge" {
                tx.execute(
                    "UPDATE kb_keys SET lifecycle = 'purging', gen = $3 WHERE tenant = $1 AND name = $2",
                    &[&name.tenant(), &name.name(), &stamp],
                )
                .await?;
            } else {
                tx.execute(
                    "UPDATE kb_keys SET gen = $3 WHERE tenant = $1 AND name = $2",
                    &[&name.tenant(), &name.name(), &stamp],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Open destruction intents.
    pub fn pending_destructions(&self) -> Result<Vec<PendingDestruction>, StoreError> {
        self.exec(async |c| {
            let mut out = Vec::new();
            for r in c
                .query(
                    "SELECT object_id, tenant, name, version, reason, requested_by, owner
                     FROM kb_destructions ORDER BY tenant, name, version",
                    &[],
                )
                .await?
            {
                let oid: Vec<u8> = r.get(0);
                let (t, n): (String, String) = (r.get(1), r.get(2));
                let version: i32 = r.get(3);
                out.push(PendingDestruction {
                    id: VersionId::from_slice(&oid)
                        .ok_or_else(|| StoreError::Corrupt("destruction object id".into()))?,
                    key: KeyName::new(&t, &n)
                        .map_err(|e| StoreError::Corrupt(format!("destruction key: {e}")))?,
                    version: u32::try_from(version).unwrap_or(0),
                    reason: r.get(4),
                    requested_by: r.get(5),
                    owner: r.get(6),
                });
            }
            Ok(out)
        })
    }

    /// The HSM objects are gone.
    pub fn finish_destroy(
        &self,
        name: &KeyName,
        ids: &[VersionId],
        purge: bool,
    ) -> Result<(), StoreError> {
        self.exec(async |c| {
            let tx = c.transaction().await?;
            let stamp = bump(&tx).await?;
            for id in ids {
                tx.execute(
                    "DELETE FROM kb_key_versions WHERE object_id = $1",
                    &[&id.as_bytes().as_slice()],
                )
                .await?;
                tx.execute(
                    "DELETE FROM kb_destructions WHERE object_id = $1",
                    &[&id.as_bytes().as_slice()],
                )
                .await?;
            }
            if purge {
                let n = tx
                    .execute(
                        "DELETE FROM kb_keys WHERE tenant = $1 AND name = $2",
                        &[&name.tenant(), &name.name()],
                    )
                    .await?;
                if n > 0 {
                    tombstone(
                        &tx,
                        name.tenant().to_string(),
                        name.name().to_string(),
                        stamp,
                    )
                    .await?;
                }
            } else {
                tx.execute(
                    "UPDATE kb_keys SET gen = $3 WHERE tenant = $1 AND name = $2",
                    &[&name.tenant(), &name.name(), &stamp],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Adds usage deltas (telemetry: no generation bump).
    pub fn add_usage(
        &self,
        usage: &[(VersionId, u64, u64, Option<i64>)],
    ) -> Result<(), StoreError> {
        self.exec(async |c| {
            let tx = c.transaction().await?;
            for (id, w, u, last) in usage {
                let (w, u) = (
                    i64::try_from(*w).unwrap_or(i64::MAX),
                    i64::try_from(*u).unwrap_or(i64::MAX),
                );
                tx.execute(
                    "UPDATE kb_key_versions SET wraps = wraps + $2, unwraps = unwraps + $3,
                            last_used_ms = GREATEST(last_used_ms, $4)
                     WHERE object_id = $1",
                    &[&id.as_bytes().as_slice(), &w, &u, last],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Reserves up to `want` AES-GCM invocations of version `id`, never past `limit` in all
    /// replicas together (the row is locked for the update): the range `[start, end)` granted.
    pub fn reserve_gcm(
        &self,
        id: VersionId,
        want: u64,
        limit: u64,
    ) -> Result<(u64, u64), StoreError> {
        self.exec(async |c| {
            let tx = c.transaction().await?;
            let row = tx
                .query_opt(
                    "SELECT gcm_reserved FROM kb_key_versions WHERE object_id = $1 FOR UPDATE",
                    &[&id.as_bytes().as_slice()],
                )
                .await?;
            let Some(row) = row else {
                return Err(StoreError::Corrupt(format!(
                    "version {id} is not in the store"
                )));
            };
            let used: i64 = row.get(0);
            let start = u64::try_from(used).unwrap_or(0);
            let end = start.saturating_add(want).min(limit).max(start);
            let stored = i64::try_from(end).unwrap_or(i64::MAX);
            tx.execute(
                "UPDATE kb_key_versions SET gcm_reserved = $2 WHERE object_id = $1",
                &[&id.as_bytes().as_slice(), &stored],
            )
            .await?;
            tx.commit().await?;
            Ok((start, end))
        })
    }

    /// Records a backup blob (committed before this returns).
    pub fn record_backup(&self, name: &KeyName, b: &BackupRecord) -> Result<(), StoreError> {
        let ids = b.version_ids.join(",");
        self.exec(async |c| {
            c.execute(
                "INSERT INTO kb_backups (sha256, tenant, name, version_ids, made_at_ms, made_by)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (sha256) DO NOTHING",
                &[
                    &b.sha256,
                    &name.tenant(),
                    &name.name(),
                    &ids,
                    &b.made_at_ms,
                    &b.made_by,
                ],
            )
            .await?;
            Ok(())
        })
    }

    /// The backup blobs made of keys named `name`, oldest first.
    pub fn backups(&self, name: &KeyName) -> Result<Vec<BackupRecord>, StoreError> {
        self.exec(async |c| {
            let rows = c
                .query(
                    "SELECT sha256, version_ids, made_at_ms, made_by FROM kb_backups
                     WHERE tenant = $1 AND name = $2 ORDER BY made_at_ms, sha256",
                    &[&name.tenant(), &name.name()],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    let ids: String = r.get(1);
                    BackupRecord {
                        sha256: r.get(0),
                        version_ids: ids
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect(),
                        made_at_ms: r.get(2),
                        made_by: r.get(3),
                    }
                })
                .collect())
        })
    }

    /// A setting.
    pub fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.exec(async |c| {
            Ok(
                c.query_opt("SELECT value FROM kb_settings WHERE name = $1", &[&name])
                    .await?
                    .map(|r| r.get(0)),
            )
        })
    }

    /// Sets a setting (and tells the other replicas).
    pub fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.exec(async |c| {
            let tx = c.transaction().await?;
            let stamp = bump(&tx).await?;
            tx.execute(
                "INSERT INTO kb_settings (name, value, gen) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value, gen = excluded.gen",
                &[&name, &value, &stamp],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Takes the cluster-wide write lock (waits at most `lock_timeout`, 30 s).
    pub fn lock_writes(&self) -> Result<PgLock, StoreError> {
        let shared = self.shared.clone();
        let client = shared.handle.block_on(async {
            let c = match shared.checkout() {
                Some(c) => c,
                None => shared.connect().await?,
            };
            c.execute("SELECT pg_advisory_lock($1)", &[&WRITE_LOCK])
                .await?;
            Ok::<_, StoreError>(c)
        })?;
        Ok(PgLock {
            shared,
            client: Some(client),
        })
    }

    /// Whether the replica with presence id `owner` is running.
    pub fn owner_alive(&self, owner: i64) -> Result<bool, StoreError> {
        if owner == self.owner() {
            return Ok(true);
        }
        let Ok(owner) = i32::try_from(owner) else {
            return Ok(false);
        };
        self.exec(async |c| {
            let got: bool = c
                .query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&PRESENCE_CLASS, &owner],
                )
                .await?
                .get(0);
            if got {
                c.execute(
                    "SELECT pg_advisory_unlock($1, $2)",
                    &[&PRESENCE_CLASS, &owner],
                )
                .await?;
            }
            Ok(!got)
        })
    }
}

/// Runs the migrations this database lacks, in one transaction under an advisory lock.
async fn migrate(c: &mut Client) -> Result<(), StoreError> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS kb_schema (
             id      BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
             version INTEGER NOT NULL
         )",
    )
    .await?;
    let version: i32 = tx
        .query_opt("SELECT version FROM kb_schema", &[])
        .await?
        .map(|r| r.get(0))
        .unwrap_or(0);
    let known = MIGRATIONS.len();
    let from = usize::try_from(version).unwrap_or(usize::MAX);
    if from > known {
        return Err(StoreError::Corrupt(format!(
            "schema version {version} is newer than this keybroker understands ({known})"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from) {
        tx.batch_execute(sql).await?;
        tracing::info!(
            schema_version = i + 1,
            "metadata store (PostgreSQL) migrated"
        );
    }
    if from < known {
        let v = known as i32;
        tx.execute(
            "INSERT INTO kb_schema (id, version) VALUES (TRUE, $1)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            &[&v],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Increments the generation (taking its row lock until commit) and announces it at commit.
async fn bump(tx: &Transaction<'_>) -> Result<i64, StoreError> {
    let stamp: i64 = tx
        .query_one(
            "UPDATE kb_generation SET value = value + 1 RETURNING value",
            &[],
        )
        .await?
        .get(0);
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &stamp.to_string()])
        .await?;
    Ok(stamp)
}

async fn touch_key_of_version(
    tx: &Transaction<'_>,
    id: VersionId,
    stamp: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE kb_keys SET gen = $2 WHERE id = (SELECT key_id FROM kb_key_versions WHERE object_id = $1)",
        &[&id.as_bytes().as_slice(), &stamp],
    )
    .await?;
    Ok(())
}

async fn tombstone(
    tx: &Transaction<'_>,
    tenant: String,
    name: String,
    stamp: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO kb_purged_keys (tenant, name, gen) VALUES ($1, $2, $3)
         ON CONFLICT (tenant, name) DO UPDATE SET gen = excluded.gen",
        &[&tenant, &name, &stamp],
    )
    .await?;
    Ok(())
}

/// Reads keys (all, or those changed after `since`) with their versions (all, or only the
/// servable ones: active and without a destruction intent).
async fn read_keys(
    tx: &Transaction<'_>,
    since: Option<i64>,
    servable_only: bool,
) -> Result<Vec<(i64, StoredKey)>, StoreError> {
    let rows = tx
        .query(
            "SELECT id, tenant, name, key_type, algorithm, created_at_ms, updated_at_ms, attributes,
                    lifecycle, deleted_at_ms, purge_at_ms, deleted_by, gen
             FROM kb_keys WHERE $1::BIGINT IS NULL OR gen > $1 ORDER BY tenant, name",
            &[&since],
        )
        .await?;
    let mut keys: Vec<(i64, StoredKey)> = Vec::with_capacity(rows.len());
    let mut index = std::collections::HashMap::with_capacity(rows.len());
    for r in rows {
        let id: i64 = r.get(0);
        let (tenant, name, kt, alg): (String, String, String, String) =
            (r.get(1), r.get(2), r.get(3), r.get(4));
        let name = KeyName::new(&tenant, &name)
            .map_err(|e| StoreError::Corrupt(format!("key name {tenant}/{name}: {e}")))?;
        let key_type = KeyType::parse(&kt)
            .ok_or_else(|| StoreError::Corrupt(format!("key {name}: key type {kt:?}")))?;
        let algorithm = Algorithm::parse(&alg)
            .ok_or_else(|| StoreError::Corrupt(format!("key {name}: algorithm {alg:?}")))?;
        let attributes: KeyAttributes = serde_json::from_str(r.get::<_, &str>(7))
            .map_err(|e| StoreError::Corrupt(format!("key {name}: attributes: {e}")))?;
        let lifecycle = match r.get::<_, &str>(8) {
            "active" => StoredLifecycle::Active,
            "deleted" => StoredLifecycle::Deleted {
                deleted_at_ms: r.get::<_, Option<i64>>(9).unwrap_or(0),
                purge_at_ms: r.get::<_, Option<i64>>(10).unwrap_or(0),
                deleted_by: r.get::<_, Option<String>>(11).unwrap_or_default(),
            },
            "purging" => StoredLifecycle::Purging,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "key {name}: lifecycle {other:?}"
                )));
            }
        };
        let stamp: i64 = r.get(12);
        index.insert(id, keys.len());
        keys.push((
            stamp,
            StoredKey {
                name,
                key_type,
                algorithm,
                created_at_ms: r.get(5),
                updated_at_ms: r.get(6),
                attributes,
                lifecycle,
                versions: Vec::new(),
                stamp,
            },
        ));
    }
    if keys.is_empty() {
        return Ok(keys);
    }
    let ids: Vec<i64> = index.keys().copied().collect();
    let rows = tx
        .query(
            "SELECT v.key_id, v.version, v.object_id, v.state, v.created_at_ms, v.canary, v.canary_digest,
                    v.origin, v.expires_ms, v.wraps, v.unwraps, v.last_used_ms, v.owner
             FROM kb_key_versions v
             WHERE v.key_id = ANY($1)
               AND (NOT $2 OR (v.state = 'active'
                    AND NOT EXISTS (SELECT 1 FROM kb_destructions d WHERE d.object_id = v.object_id)))
             ORDER BY v.key_id, v.version",
            &[&ids, &servable_only],
        )
        .await?;
    for r in rows {
        let key_id: i64 = r.get(0);
        let oid: Vec<u8> = r.get(2);
        let id = VersionId::from_slice(&oid)
            .ok_or_else(|| StoreError::Corrupt(format!("object id of length {}", oid.len())))?;
        let state = match r.get::<_, &str>(3) {
            "pending" => VersionState::Pending,
            "active" => VersionState::Active,
            other => return Err(StoreError::Corrupt(format!("version state {other:?}"))),
        };
        let origin_s: &str = r.get(7);
        let origin = Origin::parse(origin_s)
            .ok_or_else(|| StoreError::Corrupt(format!("version origin {origin_s:?}")))?;
        let Some(&i) = index.get(&key_id) else {
            return Err(StoreError::Corrupt(format!(
                "version of unknown key row {key_id}"
            )));
        };
        let number: i32 = r.get(1);
        keys[i].1.versions.push(StoredVersion {
            number: u32::try_from(number)
                .map_err(|_| StoreError::Corrupt(format!("version number {number}")))?,
            id,
            state,
            created_at_ms: r.get(4),
            canary: r.get(5),
            canary_digest: r.get(6),
            origin,
            expires_ms: r.get(8),
            wraps: r.get::<_, i64>(9).max(0) as u64,
            unwraps: r.get::<_, i64>(10).max(0) as u64,
            last_used_ms: r.get(11),
            owner: r.get(12),
        });
    }
    Ok(keys)
}

/// Holds this replica's presence lock and forwards other replicas' change notifications, for the
/// life of the store; reconnects (and reports a change, since notifications may have been missed)
/// when the connection drops.
async fn listen(
    shared: Arc<Shared>,
    owner: i32,
    notify: Arc<Notify>,
    mut ready: Option<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = async {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (client, driver) =
                connect_with(&shared.config, shared.tls.as_ref(), Some(tx)).await?;
            let setup = async {
                client
                    .execute(
                        "SELECT pg_advisory_lock($1, $2)",
                        &[&PRESENCE_CLASS, &owner],
                    )
                    .await?;
                client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
                Ok::<_, StoreError>(())
            };
            if let Err(e) = setup.await {
                driver.abort();
                return Err(e);
            }
            Ok::<_, StoreError>((client, driver, rx))
        };
        match attempt.await {
            Ok((client, driver, mut rx)) => {
                backoff = Duration::from_millis(200);
                if let Some(r) = ready.take() {
                    let _ = r.send(Ok(()));
                }
                // Anything may have changed while this connection was down.
                notify.notify_one();
                while rx.recv().await.is_some() {
                    notify.notify_one();
                }
                drop(client);
                driver.abort();
            }
            Err(e) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(e));
                    return;
                }
                tracing::warn!(error = %e, "metadata store: cannot listen for changes; retrying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// `postgres://user@host:port/db` for a connection config (never the password).
pub fn describe_config(c: &Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{}:{port}/{}",
        c.get_user().unwrap_or(""),
        hosts.join(","),
        c.get_dbname().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use hsm_fixtures::postgres::PgServer;

    use super::*;

    fn name(s: &str) -> KeyName {
        KeyName::parse(s).expect("valid name")
    }

    fn server_db(db: &str) -> (PgServer, String, String) {
        let pg = PgServer::start().expect("start PostgreSQL (tests/run installs it)");
        pg.create_database(db).expect("create database");
        let url = pg.url(db);
        let pw = pg.password().to_string();
        (pg, url, pw)
    }

    fn create(s: &PgStore, n: &str, v: VersionId) -> Result<(), StoreError> {
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
    fn a_version_1_database_is_migrated_keeps_its_keys_and_a_newer_one_is_refused() {
        let (pg, url, pw) = server_db("migrate");
        // A database as schema version 1 left it, with a key.
        pg.psql(
            "migrate",
            &format!(
                "BEGIN; {SCHEMA_V1}
                 CREATE TABLE kb_schema (id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id), version INTEGER NOT NULL);
                 INSERT INTO kb_schema VALUES (TRUE, 1);
                 INSERT INTO kb_keys (tenant, name, key_type, algorithm, created_at_ms, updated_at_ms)
                   VALUES ('t', 'old', 'aes-256', 'aes-256-gcm', 5, 5);
                 INSERT INTO kb_key_versions (key_id, version, object_id, state, created_at_ms)
                   VALUES (1, 1, '\\x00112233445566778899aabbccddeeff', 'active', 5);
                 COMMIT;"
            ),
        )
        .expect("version 1 schema");
        let s = PgStore::open(&url, Some(&pw), None).expect("migrate");
        assert_eq!(s.schema_version().expect("version"), 4);
        let all = s.load_all().expect("load");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].name.to_string(), "t/old");
        assert_eq!(all[0].versions[0].origin, Origin::Generated);
        assert_eq!(all[0].versions[0].owner, None);
        assert_eq!(s.generation().expect("generation"), 1);
        // Opening again applies nothing.
        drop(s);
        let s = PgStore::open(&url, Some(&pw), None).expect("reopen");
        assert_eq!(s.schema_version().expect("version"), 4);
        drop(s);
        pg.psql("migrate", "UPDATE kb_schema SET version = 5")
            .expect("pretend a newer keybroker ran");
        let e = PgStore::open(&url, Some(&pw), None)
            .err()
            .expect("a newer schema is refused");
        assert_eq!(
            e.to_string(),
            "metadata store is corrupt: schema version 5 is newer than this keybroker understands (4)"
        );
    }

    #[test]
    fn backup_records_are_kept_per_key_name_and_survive_reopening() {
        let (_pg, url, pw) = server_db("backups");
        let s = PgStore::open(&url, Some(&pw), None).expect("open");
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
        let s = PgStore::open(&url, Some(&pw), None).expect("reopen");
        assert_eq!(
            s.backups(&name("t/k")).expect("read"),
            [rec("aa", &["01"], 10), rec("bb", &["01", "02"], 20)]
        );
        assert!(s.backups(&name("u/k")).expect("read").is_empty());
    }

    #[test]
    fn replicas_share_one_gcm_budget_and_never_pass_its_limit() {
        let (_pg, url, pw) = server_db("gcm");
        let a = PgStore::open(&url, Some(&pw), None).expect("open");
        let b = PgStore::open(&url, Some(&pw), None).expect("open");
        let v = VersionId::random();
        create(&a, "t/k", v).expect("create");
        // Two replicas reserving at once get disjoint ranges that add up to the limit.
        let ranges: Vec<(u64, u64)> = std::thread::scope(|sc| {
            let hs: Vec<_> = [&a, &b]
                .into_iter()
                .map(|s| {
                    sc.spawn(move || {
                        (0..10)
                            .map(|_| s.reserve_gcm(v, 7, 100).expect("reserve"))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        let mut got: Vec<u64> = ranges.iter().flat_map(|&(s, e)| s..e).collect();
        got.sort_unstable();
        assert_eq!(
            got,
            (0..100).collect::<Vec<_>>(),
            "each invocation granted once"
        );
        assert_eq!(a.reserve_gcm(v, 7, 100).expect("spent"), (100, 100));
    }

    #[test]
    fn replicas_starting_together_migrate_once_and_see_each_others_changes() {
        let (_pg, url, pw) = server_db("replicas");
        let opened: Vec<PgStore> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|_| sc.spawn(|| PgStore::open(&url, Some(&pw), None).expect("open")))
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        let (a, b) = (&opened[0], &opened[1]);
        assert_eq!(a.schema_version().expect("v"), 4);
        let g0 = b.generation().expect("generation");
        let v1 = VersionId::random();
        create(a, "t/k", v1).expect("create");
        assert!(matches!(
            create(b, "t/k", VersionId::random()),
            Err(StoreError::AlreadyExists(_))
        ));
        // Pending versions are not servable.
        let c = b.changes_since(g0).expect("changes");
        assert!(c.generation > g0);
        assert_eq!(c.keys.len(), 1);
        assert!(c.keys[0].2.is_none(), "{:?}", c.keys[0]);
        a.commit_version(v1, b"c", b"d").expect("commit");
        let c = b.changes_since(g0).expect("changes");
        let k = c.keys[0].2.as_ref().expect("servable");
        assert_eq!((k.versions.len(), k.versions[0].id), (1, v1));
        // Rotations through both replicas get consecutive numbers.
        let mut numbers = Vec::new();
        for (i, s) in [a, b, a, b].into_iter().enumerate() {
            numbers.push(
                s.begin_rotate(&name("t/k"), VersionId::random(), 2 + i as i64, None)
                    .expect("rotate"),
            );
        }
        assert_eq!(numbers, vec![2, 3, 4, 5]);
        // A setting written by one is reported to the other.
        let g1 = b.generation().expect("generation");
        a.set_setting("hyok.state", "x").expect("set");
        let c = b.changes_since(g1).expect("changes");
        assert_eq!(
            c.settings,
            vec![("hyok.state".to_string(), "x".to_string())]
        );
        assert!(c.keys.is_empty());
        // Each replica's pending work belongs to it while it runs.
        let all = b.load_all().expect("load");
        let owners: std::collections::BTreeSet<_> =
            all[0].versions.iter().filter_map(|v| v.owner).collect();
        assert_eq!(owners, [a.owner(), b.owner()].into_iter().collect());
        assert!(b.owner_alive(a.owner()).expect("alive"));
        let gone = opened[2].owner();
        drop(opened);
        let s = PgStore::open(&url, Some(&pw), None).expect("open");
        assert!(!s.owner_alive(gone).expect("gone"));
    }

    #[test]
    fn a_password_in_the_url_is_refused() {
        let e = PgStore::open("postgres://kb:secret@127.0.0.1:1/db", None, None)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("password_file"), "{e}");
    }
}
