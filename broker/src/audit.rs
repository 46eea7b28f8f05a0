//! The audit trail: one JSON line per request (allowed or refused) and per security event,
//! written **before the reply**; if the record cannot be written the request fails.
//!
//! Tamper evidence: every line carries a sequence number and `prev`, the SHA-256 of the previous
//! line, so an edit, deletion, insertion or reordering breaks the chain where it happened. Every
//! `checkpoint_every` records (and every `checkpoint_interval_ms`, and at shutdown) a checkpoint
//! line carries an HMAC-SHA256 of its position and chain hash, computed inside the HSM with a
//! key that never leaves it: whoever can write the file can recompute the hashes but cannot
//! forge a checkpoint. The broker also records its latest checkpoint in the metadata store, so
//! truncating the file back past a checkpoint is detected. `keybroker audit verify` checks all of
//! this and prints where it breaks.
//!
//! Records never contain key material, DEK bytes or hashes of them.
//!
//! Throughput: one writer takes whatever records are waiting, appends them with one `write`,
//! makes them durable with one `fdatasync` of the log's [`journal`] (a pre-written file whose
//! sync writes no metadata), then acknowledges them all (group commit), so the cost of
//! durability is shared by concurrent requests. The writer has a thread of its own and writes
//! and syncs on it: a request wakes that thread directly, with no task to schedule and no
//! blocking-pool hand-off per batch.

use std::{
    io::{BufRead, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{hsm::Hsm, model::VersionId, store::Store};

pub mod journal;

/// The hash `prev` holds on the first line of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const MAC_DOMAIN: &[u8] = b"keybroker-audit-checkpoint-v1\n";
/// Store setting: the audit HMAC key's id.
pub const SETTING_KEY_ID: &str = "audit.hmac_key_id";
/// Store setting: `seq:sha256-of-line:byte-offset` of the latest checkpoint (see
/// [`checkpoint_setting`]; settings written before the offset was added have no offset).
pub const SETTING_LAST_CHECKPOINT: &str = "audit.last_checkpoint";

/// The store setting that records the latest checkpoint of the audit log at `path`. Each broker
/// process writes its own log; in a store shared by replicas each log gets its own setting,
/// named by host and absolute path (a replica's host name must stay stable across restarts for
/// the truncation check to follow its log, e.g. a StatefulSet pod name).
pub fn checkpoint_setting(store: &Store, path: &Path) -> String {
    if !store.is_shared() {
        return SETTING_LAST_CHECKPOINT.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    format!("{SETTING_LAST_CHECKPOINT}@{host}:{}", abs.display())
}

/// The outcome of an intent record: a change announced before it is made (the request's, or
/// the scheduler's, own record then says how it ended).
pub const INTENT: &str = "INTENT";

/// The outcome's name in the audit trail: `OK`, `INVALID_ARGUMENT`, ... (the gRPC code's name,
/// whatever front door the request came through).
pub fn outcome_name(result: Result<(), &crate::error::BrokerError>) -> String {
    code_name(match result {
        Ok(()) => tonic::Code::Ok,
        Err(e) => e.code(),
    })
}

/// A gRPC code's name as the audit trail writes it: `INVALID_ARGUMENT`.
pub fn code_name(c: tonic::Code) -> String {
    let s = format!("{c:?}");
    // InvalidArgument -> INVALID_ARGUMENT
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

/// One line of the audit log.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// Position in the log, from 1, no gaps.
    pub seq: u64,
    /// UTC time, RFC 3339 with milliseconds.
    pub time: String,
    /// Milliseconds since the epoch (for filtering).
    pub time_ms: i64,
    /// `request`, `event` or `checkpoint`.
    pub kind: String,
    /// The verified caller identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// The RPC (or event name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    /// The tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The key (`tenant/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The key version used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The gRPC outcome (`OK`, `PERMISSION_DENIED`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Why a request was refused, or an event's description (never key material).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The access justification reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    /// The justification's free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification_detail: Option<String>,
    /// The request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The correlation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The cloud request this request served (an XKS request's `requestMetadata`: principal,
    /// KMS operation, KMS request id, via service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<crate::policy::Upstream>,
    /// Time spent on the request before it was audited, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// Structured detail of an event (e.g. a destruction receipt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    /// Checkpoints: HMAC-SHA256 (hex) over the domain, `seq` and `prev`, made in the HSM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// SHA-256 (hex) of the previous line; [`GENESIS`] on the first.
    pub prev: String,
}

impl Record {
    /// A request record.
    pub fn request(op: &str, caller: &str) -> Self {
        Self {
            kind: "request".into(),
            op: Some(op.into()),
            caller: Some(caller.into()),
            ..Default::default()
        }
    }

    /// An event record.
    pub fn event(op: &str, caller: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            kind: "event".into(),
            op: Some(op.into()),
            caller: caller.map(str::to_string),
            message: Some(message.into()),
            ..Default::default()
        }
    }
}

/// Audit settings.
#[derive(Clone, Debug)]
pub struct AuditSettings {
    /// The log file.
    pub path: PathBuf,
    /// Checkpoint after this many records.
    pub checkpoint_every: u64,
    /// ... or after this long with unchecked records.
    pub checkpoint_interval: Duration,
    /// `fdatasync` each batch before acknowledging it.
    pub sync: bool,
    /// Start even when the log lacks the last checkpoint the broker recorded (it was truncated
    /// or rewritten while the broker was stopped). Default false: such a log stops the broker.
    pub allow_truncated: bool,
}

enum Msg {
    Append(Vec<Record>, oneshot::Sender<Result<(), String>>),
    Close(oneshot::Sender<()>),
}

/// The audit log writer handle.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    path: PathBuf,
    /// Why the log cannot take records now (see [`AuditLog::failure`]).
    fault: watch::Receiver<Option<String>>,
    /// Where records start in the file, for queries (grown as the file grows).
    index: std::sync::Arc<std::sync::Mutex<QueryIndex>>,
}

/// The longest the audit writer waits for the HSM to MAC a checkpoint.
const CHECKPOINT_MAC_WAIT: Duration = Duration::from_millis(1_000);
/// How long after a failed checkpoint MAC the next count-triggered attempt waits.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

struct Writer {
    file: Option<std::fs::File>,
    /// Where groups are made durable (`None`: the log is synced itself; see [`journal`]).
    journal: Option<journal::Journal>,
    path: PathBuf,
    seq: u64,
    last_hash: String,
    /// Where the last batch written starts in the file (if the file system said).
    last_write_at: Option<u64>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// After a checkpoint MAC failed (HSM down or hung), count-triggered checkpoints wait until
    /// this instant: appends must not queue behind the HSM.
    mac_retry_after: Option<Instant>,
    settings: AuditSettings,
    hsm: Hsm,
    store: Arc<Store>,
    /// Why the log cannot take records now: set by a failed write, cleared by the next write
    /// that succeeds (a checkpoint is tried each interval meanwhile); for good once a sync
    /// failed.
    fault: watch::Sender<Option<String>>,
    /// Why every group is refused until a restart: a sync of the log failed (without a
    /// journal; the journal keeps its own).
    sync_failed: Option<String>,
}

fn now() -> (String, i64) {
    let t = time::OffsetDateTime::now_utc();
    let ms = (t.unix_timestamp_nanos() / 1_000_000) as i64;
    let s = t
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| ms.to_string());
    (s, ms)
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn mac_input(seq: u64, prev: &str) -> Vec<u8> {
    let mut v = MAC_DOMAIN.to_vec();
    v.extend_from_slice(format!("{seq}\n{prev}").as_bytes());
    v
}

/// What opening an existing log found.
struct Tail {
    seq: u64,
    hash: String,
    len: u64,
    checkpoints: Vec<(u64, String)>,
    problems: Vec<String>,
}

/// The latest checkpoint as recorded in the store: `seq:hash[:offset]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedCheckpoint {
    /// Its sequence number.
    pub seq: u64,
    /// SHA-256 (hex) of its line.
    pub hash: String,
    /// Where its line starts in the file, if recorded.
    pub offset: Option<u64>,
}

impl RecordedCheckpoint {
    /// Parses the store setting (`None` if it is not in either format).
    pub fn parse(v: &str) -> Option<Self> {
        let mut it = v.split(':');
        let seq = it.next()?.parse().ok()?;
        let hash = it.next()?.to_string();
        let offset = match it.next() {
            None => None,
            Some(o) => Some(o.parse().ok()?),
        };
        if it.next().is_some() || hash.len() != 64 {
            return None;
        }
        Some(Self { seq, hash, offset })
    }

    /// Whether `(seq, hash)` is this checkpoint.
    pub fn is(&self, seq: u64, hash: &str) -> bool {
        self.seq == seq && self.hash == hash
    }
}

/// Reads the log to find where it ends: the last sequence number and line hash, and its
/// checkpoints. With `hint` (the last checkpoint the store recorded, with its offset) the
/// scan starts at that line if it is there unchanged, so start-up reads only what was written
/// since the last checkpoint instead of the whole log; otherwise it reads everything (and the
/// caller reports a missing checkpoint). `keybroker audit verify` always reads everything.
fn scan(path: &Path, hint: Option<&RecordedCheckpoint>) -> Result<Tail, String> {
    let mut tail = Tail {
        seq: 0,
        hash: GENESIS.into(),
        len: 0,
        checkpoints: Vec::new(),
        problems: Vec::new(),
    };
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(tail),
        Err(e) => return Err(format!("cannot read audit log {}: {e}", path.display())),
    };
    let mut line = Vec::new();
    if let Some(h) = hint
        && let Some(offset) = h.offset
    {
        use std::io::{Seek, SeekFrom};
        let mut r = std::io::BufReader::new(&mut f);
        let found = r.seek(SeekFrom::Start(offset)).is_ok()
            && r.read_until(b'\n', &mut line).is_ok()
            && line.last() == Some(&b'\n')
            && h.is(
                serde_json::from_slice::<Record>(&line[..line.len() - 1])
                    .map(|r| r.seq)
                    .unwrap_or(0),
                &sha256_hex(&line[..line.len() - 1]),
            );
        if found {
            tail.seq = h.seq;
            tail.hash = h.hash.clone();
            tail.len = offset + line.len() as u64;
            tail.checkpoints.push((h.seq, h.hash.clone()));
        } else {
            tail.len = 0;
        }
        line.clear();
    }
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(tail.len))
        .map_err(|e| format!("read audit log: {e}"))?;
    let mut r = std::io::BufReader::new(f);
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("read audit log: {e}"))?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            // A partial last line: the write of a record that was never acknowledged.
            tail.problems.push(format!(
                "partial last line ({n} bytes) dropped: its request was never answered"
            ));
            break;
        }
        let body = &line[..line.len() - 1];
        tail.len += n as u64;
        tail.hash = sha256_hex(body);
        if let Ok(rec) = serde_json::from_slice::<Record>(body) {
            tail.seq = rec.seq;
            if rec.kind == "checkpoint" {
                tail.checkpoints.push((rec.seq, tail.hash.clone()));
            }
        }
    }
    Ok(tail)
}

impl AuditLog {
    /// Opens (or creates) the log, sets up the HSM MAC key, checks the log against the last
    /// checkpoint the store knows, and starts the writer task.
    pub async fn open(
        settings: AuditSettings,
        hsm: Hsm,
        store: Arc<Store>,
    ) -> Result<Self, String> {
        let st = store.clone();
        let key_id = tokio::task::spawn_blocking(move || st.setting(SETTING_KEY_ID))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let key_id = match key_id {
            Some(h) => Some(
                hex::decode(&h)
                    .ok()
                    .and_then(|b| VersionId::from_slice(&b))
                    .ok_or_else(|| format!("store setting {SETTING_KEY_ID} is malformed"))?,
            ),
            None => None,
        };
        let created = key_id.is_none();
        let id = hsm
            .ensure_audit_key(key_id)
            .await
            .map_err(|e| format!("audit: {e}"))?;
        if created {
            let st = store.clone();
            tokio::task::spawn_blocking(move || st.set_setting(SETTING_KEY_ID, &id.hex()))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        if let Some(dir) = settings.path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create audit directory {}: {e}", dir.display()))?;
        }
        let st = store.clone();
        let setting = checkpoint_setting(&store, &settings.path);
        let recorded = tokio::task::spawn_blocking(move || st.setting(&setting))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let hint = recorded.as_deref().and_then(RecordedCheckpoint::parse);
        let path = settings.path.clone();
        let h = hint.clone();
        // What the journal holds and the log lacks goes back into the log before it is read.
        let (restored, tail) = tokio::task::spawn_blocking(move || {
            let restored = journal::recover(&path)?;
            scan(&path, h.as_ref()).map(|t| (restored, t))
        })
        .await
        .map_err(|e| e.to_string())??;
        // Created private (0600) whatever the umask; an existing log keeps the mode it has.
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&settings.path)
            .map_err(|e| format!("cannot open audit log {}: {e}", settings.path.display()))?;
        if let Ok(m) = file.metadata()
            && m.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %settings.path.display(),
                mode = %format!("{:04o}", m.permissions().mode() & 0o7777),
                "the audit log can be used by group or others (keybroker creates it 0600)"
            );
        }
        if file.metadata().map(|m| m.len()).unwrap_or(0) > tail.len {
            // Synced before the journal starts a round over the old one: the new round's
            // records go where the partial line was, and must find it gone after a power failure.
            file.set_len(tail.len)
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("cannot drop the partial audit line: {e}"))?;
        }
        let journal = if settings.sync {
            let path = settings.path.clone();
            let log = file
                .try_clone()
                .map_err(|e| format!("cannot open audit log {}: {e}", path.display()))?;
            match tokio::task::spawn_blocking(move || journal::Journal::open(&path, &log))
                .await
                .map_err(|e| e.to_string())?
            {
                Ok(j) => Some(j),
                Err(e) => {
                    tracing::warn!(path = %journal::path_for(&settings.path).display(), error = %e,
                        "no audit journal: each group of records syncs the log itself (slower)");
                    None
                }
            }
        } else {
            // `recover` above synced the log: a journal left by a run with `sync` on is spent.
            let _ = std::fs::remove_file(journal::path_for(&settings.path));
            None
        };
        let mut events = Vec::new();
        for p in restored.iter().chain(&tail.problems) {
            tracing::warn!(problem = %p, "audit log");
            events.push(Record::event("AuditLogRecovered", None, p.clone()));
        }
        if let Some(rec) = recorded {
            let present = match &hint {
                Some(h) => tail.checkpoints.iter().any(|(s, hash)| h.is(*s, hash)),
                None => false,
            };
            if !present {
                let m = format!(
                    "the audit log does not contain the last checkpoint the broker recorded ({rec}): it was truncated or rewritten while the broker was stopped"
                );
                tracing::error!(problem = %m, "AUDIT LOG TAMPERING");
                if !settings.allow_truncated {
                    return Err(format!(
                        "refusing to start: {m}. Keep this log as evidence (and `keybroker audit \
                         verify` it); to start anyway, continuing the chain after what is left, set \
                         [audit] allow_truncated = true for this start"
                    ));
                }
                events.push(Record::event("AuditLogTampered", None, m));
            }
        }
        let (tx, rx) = mpsc::channel(4096);
        let (fault, fault_rx) = watch::channel(None);
        let writer = Writer {
            fault,
            sync_failed: None,
            file: Some(file),
            journal,
            path: settings.path.clone(),
            seq: tail.seq,
            last_hash: tail.hash,
            last_write_at: Some(tail.len),
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            mac_retry_after: None,
            settings: settings.clone(),
            hsm,
            store,
        };
        // Its own thread: the write and `fdatasync` block it, nothing else. The loop is async
        // only to wait for records or the checkpoint timer and to ask the HSM for MACs.
        let rt = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("keybroker-audit".into())
            .spawn(move || rt.block_on(writer.run(rx)))
            .map_err(|e| format!("start the audit writer thread: {e}"))?;
        let log = Self {
            tx,
            fault: fault_rx,
            path: settings.path,
            index: Default::default(),
        };
        log.append(Record::event(
            "AuditLogOpened",
            None,
            format!("broker started; log continues after seq {}", tail.seq),
        ))
        .await?;
        for e in events {
            log.append(e).await?;
        }
        Ok(log)
    }

    /// Appends a record and waits until it is written (and synced). `Err` means the record is
    /// not in the log: the caller must fail the request.
    pub async fn append(&self, rec: Record) -> Result<(), String> {
        self.append_many(vec![rec]).await
    }

    /// Appends several records, written together (one batch request's per-item records).
    pub async fn append_many(&self, recs: Vec<Record>) -> Result<(), String> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Msg::Append(recs, ack))
            .await
            .map_err(|_| "the audit writer has stopped".to_string())?;
        done.await
            .map_err(|_| "the audit writer has stopped".to_string())?
    }

    /// Why the log cannot take records now (every request is refused UNAVAILABLE meanwhile), or
    /// `None`: the last write succeeded. A write that fails sets it, the next that succeeds
    /// clears it; a failed sync (or a writer that stopped) sets it until a restart.
    pub fn failure(&self) -> Option<String> {
        match self.fault.has_changed() {
            Ok(_) => self.fault.borrow().clone(),
            Err(_) => Some("the audit writer has stopped".into()),
        }
    }

    /// Changes of [`AuditLog::failure`] (the receiver errs once the writer has stopped).
    pub fn failures(&self) -> watch::Receiver<Option<String>> {
        self.fault.clone()
    }

    /// Writes a final checkpoint and stops the writer.
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Close(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A reader of this log that queries through its index (for a blocking thread).
    pub fn reader(&self) -> AuditReader {
        AuditReader {
            path: self.path.clone(),
            index: self.index.clone(),
        }
    }
}

/// Reads the audit log through its index: a page starts reading near its first record instead
/// of at the start of the file.
pub struct AuditReader {
    path: PathBuf,
    index: std::sync::Arc<std::sync::Mutex<QueryIndex>>,
}

impl AuditReader {
    /// [`query`], through the index. Blocking (file reads): call it on a blocking thread.
    pub fn query(
        &self,
        f: &QueryFilter,
        after: u64,
        limit: usize,
        visible: &dyn Fn(&Record) -> bool,
    ) -> QueryResult {
        let start = {
            let mut ix = self.index.lock().unwrap_or_else(|p| p.into_inner());
            ix.start_for(&self.path, after)
        };
        query_from(&self.path, start, f, after, limit, visible)
    }
}

/// A page of records (as stored) and the seq to continue after, if there may be more.
pub type QueryResult = Result<(Vec<String>, Option<u64>), String>;

/// A sparse index of the audit file: the byte offset of every 256th record,
/// extended from where it stopped each time it is used (the log only grows; a file that shrank
/// or was replaced is indexed again from the start).
#[derive(Default)]
pub struct QueryIndex {
    /// (seq, offset of its line), ascending.
    marks: Vec<(u64, u64)>,
    /// How far the file has been indexed (the end of the last whole line read).
    indexed_to: u64,
    /// Records seen since the last mark.
    since_mark: u64,
    /// The file's inode when indexed.
    inode: u64,
}

impl QueryIndex {
    /// One mark per this many records.
    const EVERY: u64 = 256;

    /// Brings the index up to the end of the file; returns the offset to start reading at for
    /// records after `after` (0 when in doubt: a full scan is always correct).
    fn start_for(&mut self, path: &Path, after: u64) -> u64 {
        if self.extend(path).is_err() {
            *self = Self::default();
            return 0;
        }
        match self.marks.partition_point(|(seq, _)| *seq <= after) {
            0 => 0,
            i => self.marks[i - 1].1,
        }
    }

    fn extend(&mut self, path: &Path) -> std::io::Result<()> {
        use std::{
            io::{Read, Seek, SeekFrom},
            os::unix::fs::MetadataExt,
        };
        let mut f = std::fs::File::open(path)?;
        let meta = f.metadata()?;
        if meta.ino() != self.inode || meta.len() < self.indexed_to {
            *self = Self {
                inode: meta.ino(),
                ..Self::default()
            };
        }
        f.seek(SeekFrom::Start(self.indexed_to))?;
        let mut r = std::io::BufReader::new(f.take(meta.len() - self.indexed_to));
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = r.read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                // End, or a line still being written: index it next time.
                return Ok(());
            }
            let at = self.indexed_to;
            self.indexed_to += n as u64;
            if self.since_mark.is_multiple_of(Self::EVERY)
                && let Some(seq) = leading_seq(&line)
            {
                self.marks.push((seq, at));
            }
            self.since_mark += 1;
        }
    }
}

/// The `seq` of a record line, read from its start (records serialise `seq` first) without
/// parsing the rest; `None` if the line does not start that way.
fn leading_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        loop {
            let deadline = self.last_checkpoint + self.settings.checkpoint_interval;
            let first = tokio::select! {
                m = rx.recv() => m,
                // A checkpoint is due for records written since the last one, or is tried
                // after a failed write (a full volume), so that the failure clears without a
                // request. After a failed sync nothing can be written until a restart: no
                // checkpoint (nor its HSM call) either.
                _ = tokio::time::sleep_until(deadline.into()),
                    if (self.since_checkpoint > 0 || self.fault.borrow().is_some())
                        && self.lasting_failure().is_none() => {
                    self.checkpoint().await;
                    continue;
                }
            };
            let Some(first) = first else {
                self.checkpoint().await;
                self.close_journal();
                return;
            };
            let mut recs = Vec::new();
            let mut acks = Vec::new();
            let mut close = None;
            match first {
                Msg::Append(r, a) => {
                    recs.extend(r);
                    acks.push(a);
                }
                Msg::Close(a) => close = Some(a),
            }
            while close.is_none() && recs.len() < 4096 {
                match rx.try_recv() {
                    Ok(Msg::Append(r, a)) => {
                        recs.extend(r);
                        acks.push(a);
                    }
                    Ok(Msg::Close(a)) => close = Some(a),
                    Err(_) => break,
                }
            }
            if !acks.is_empty() {
                let result = if recs.is_empty() {
                    Ok(())
                } else {
                    self.write(recs)
                };
                for a in acks {
                    let _ = a.send(result.clone());
                }
            }
            if self.since_checkpoint >= self.settings.checkpoint_every
                && self.mac_retry_after.is_none_or(|t| Instant::now() >= t)
            {
                self.checkpoint().await;
            }
            if let Some(a) = close {
                if self.since_checkpoint > 0 {
                    self.checkpoint().await;
                }
                self.close_journal();
                let _ = a.send(());
                return;
            }
        }
    }

    /// Chains, writes and syncs a batch. On failure nothing of the batch stays in the file.
    fn write(&mut self, recs: Vec<Record>) -> Result<(), String> {
        if let Some(why) = &self.sync_failed {
            return Err(why.clone());
        }
        let (seq0, hash0) = (self.seq, self.last_hash.clone());
        let mut buf = Vec::with_capacity(recs.len() * 256);
        let n = recs.len() as u64;
        for mut r in recs {
            self.seq += 1;
            r.seq = self.seq;
            if r.time.is_empty() {
                let (t, ms) = now();
                r.time = t;
                r.time_ms = ms;
            }
            r.prev = std::mem::take(&mut self.last_hash);
            let line = match serde_json::to_vec(&r) {
                Ok(l) => l,
                Err(e) => {
                    self.seq = seq0;
                    self.last_hash = hash0;
                    return Err(format!("serialise audit record: {e}"));
                }
            };
            self.last_hash = sha256_hex(&line);
            buf.extend_from_slice(&line);
            buf.push(b'\n');
        }
        let Some(mut file) = self.file.take() else {
            self.seq = seq0;
            self.last_hash = hash0;
            return Err("audit log is not open".into());
        };
        // On the writer's own thread (see `AuditLog::open`): blocking here delays only
        // the records queued behind this batch, which wait for it anyway.
        let before = file.metadata().map(|m| m.len()).ok();
        let res = crate::failpoint::io_fault("audit.write")
            .and_then(|()| file.write_all(&buf))
            .and_then(|()| {
                if !self.settings.sync {
                    return Ok(());
                }
                match (&mut self.journal, before) {
                    (Some(j), Some(at)) => j.commit(&file, at, &buf),
                    (Some(j), None) => j.sync_log(&file),
                    (None, _) => crate::failpoint::io_fault("audit.sync")
                        .and_then(|()| file.sync_data())
                        .inspect_err(|e| {
                            // As with the journal: a later sync that succeeds would not vouch
                            // for pages whose write-back failed. Refused until a restart.
                            self.sync_failed = Some(format!(
                                "cannot sync the audit log: {e}; audit records are refused \
                                 until the broker restarts"
                            ));
                        }),
                }
            });
        let res = match res {
            Ok(()) => Ok(before),
            Err(e) => {
                // Leave no partial line behind: the next record must chain from the last good one.
                let cut = before.map(|len| file.set_len(len));
                if !matches!(cut, Some(Ok(()))) {
                    // The next group would not follow the journal's last entry in the log: the
                    // log is synced and a round starts (or the journal is failed).
                    if let Some(j) = &mut self.journal {
                        let _ = j.sync_log(&file);
                    }
                }
                Err(e)
            }
        };
        self.file = Some(file);
        match res {
            Ok(at) => {
                self.last_write_at = at;
                self.since_checkpoint += n;
                self.set_fault(None);
                Ok(())
            }
            Err(e) => {
                self.seq = seq0;
                self.last_hash = hash0;
                tracing::error!(path = %self.path.display(), error = %e, "cannot write the audit log: requests are refused until it can be written");
                let e = format!("cannot write the audit log: {e}");
                self.set_fault(Some(e.clone()));
                Err(e)
            }
        }
    }

    /// Publishes why the log cannot take records (`None`: it can), a failed journal's reason
    /// taking precedence: that one holds until a restart.
    fn set_fault(&self, why: Option<String>) {
        let why = self.lasting_failure().or(why);
        self.fault.send_if_modified(|f| {
            let changed = *f != why;
            *f = why;
            changed
        });
    }

    /// A failed sync, of the journal or (without one) of the log: it holds until a restart.
    fn lasting_failure(&self) -> Option<String> {
        match self.journal.as_ref().and_then(journal::Journal::failure) {
            Some(j) => Some(format!("the audit journal failed: {j}")),
            None => self.sync_failed.clone(),
        }
    }

    /// At close: the log synced, the journal emptied.
    fn close_journal(&mut self) {
        if let (Some(j), Some(f)) = (&mut self.journal, &self.file) {
            match j.sync_log(f) {
                Ok(()) => j.clear(),
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "cannot sync the audit log at close (its last records stay in the journal)")
                }
            }
        }
    }

    async fn checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        let seq = self.seq + 1;
        // Bounded: every append waits behind this writer, so a hung HSM must not hold it long.
        let scope = crate::hsm::RequestScope::new(Some(Instant::now() + CHECKPOINT_MAC_WAIT));
        let mac = match scope
            .run(self.hsm.audit_mac(mac_input(seq, &self.last_hash)))
            .await
        {
            Ok(m) => {
                self.mac_retry_after = None;
                hex::encode(m)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot MAC an audit checkpoint (will retry)");
                self.mac_retry_after = Some(Instant::now() + CHECKPOINT_RETRY);
                return;
            }
        };
        let (t, ms) = now();
        let rec = Record {
            kind: "checkpoint".into(),
            time: t,
            time_ms: ms,
            mac: Some(mac),
            ..Default::default()
        };
        if self.write(vec![rec]).is_ok() {
            self.since_checkpoint = 0;
            // The log itself is durable up to every checkpoint (what `audit verify` reads
            // without the journal), and the journal starts a new round.
            if let (Some(j), Some(f)) = (&mut self.journal, &self.file)
                && let Err(e) = j.sync_log(f)
            {
                tracing::error!(path = %self.path.display(), error = %e, "cannot sync the audit log at a checkpoint (its records are in the journal)");
                self.set_fault(None);
            }
            let value = match self.last_write_at {
                Some(at) => format!("{}:{}:{at}", self.seq, self.last_hash),
                None => format!("{}:{}", self.seq, self.last_hash),
            };
            let st = self.store.clone();
            let setting = checkpoint_setting(&self.store, &self.path);
            match tokio::task::spawn_blocking(move || st.set_setting(&setting, &value)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot record the audit checkpoint in the store")
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot record the audit checkpoint in the store")
                }
            }
        }
    }
}

/// The result of verifying a log.
#[derive(Debug, Default, Serialize)]
pub struct Verification {
    /// Lines read.
    pub lines: u64,
    /// Checkpoints found.
    pub checkpoints: u64,
    /// Checkpoints whose MAC the HSM verified.
    pub macs_verified: u64,
    /// The sequence number of the last checkpoint.
    pub last_checkpoint_seq: u64,
    /// Lines after the last checkpoint (chained, not yet MAC-protected).
    pub unchecked_tail: u64,
    /// What is wrong, each with its line number. Empty = intact.
    pub problems: Vec<String>,
}

/// A checkpoint to verify: (line number, data the MAC covers, MAC).
pub type PendingMac = (u64, Vec<u8>, Vec<u8>);

/// Verifies the hash chain and sequence of a log (no HSM needed). Returns the checkpoints whose
/// MACs still need the HSM, and the (seq, line hash) of every checkpoint.
pub fn verify_chain(text: &[u8]) -> (Verification, Vec<PendingMac>, Vec<(u64, String)>) {
    let mut v = Verification::default();
    let mut macs = Vec::new();
    let mut cps = Vec::new();
    let mut prev_hash = GENESIS.to_string();
    let mut prev_seq: Option<u64> = None;
    let mut since_cp = 0u64;
    let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    // `split` leaves an empty last piece after a final newline, or the partial last line.
    let complete = lines.len() - 1;
    for (i, body) in lines.iter().take(complete).enumerate() {
        let ln = i as u64 + 1;
        v.lines = ln;
        let here = sha256_hex(body);
        let rec: Record = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                v.problems.push(format!(
                    "line {ln}: not a valid audit record ({e}): the line was edited"
                ));
                prev_hash = here;
                prev_seq = prev_seq.map(|s| s + 1);
                continue;
            }
        };
        if rec.prev != prev_hash {
            v.problems.push(format!(
                "line {ln} (seq {}): its prev hash does not match line {}: a line at or before {} was edited, inserted or deleted",
                rec.seq,
                ln.saturating_sub(1),
                ln.saturating_sub(1)
            ));
        }
        match prev_seq {
            Some(p) if rec.seq == p + 1 => {}
            Some(p) if rec.seq > p + 1 => v.problems.push(format!(
                "line {ln}: seq jumps from {p} to {}: {} record(s) deleted",
                rec.seq,
                rec.seq - p - 1
            )),
            Some(p) => v.problems.push(format!(
                "line {ln}: seq {} after {p}: records inserted or reordered",
                rec.seq
            )),
            None if ln == 1 && rec.prev != GENESIS => v.problems.push(format!(
                "line 1 (seq {}): the log does not start at its beginning: truncated at the front",
                rec.seq
            )),
            None => {}
        }
        if rec.kind == "checkpoint" {
            v.checkpoints += 1;
            v.last_checkpoint_seq = rec.seq;
            since_cp = 0;
            match rec.mac.as_deref().map(hex::decode) {
                Some(Ok(mac)) => macs.push((ln, mac_input(rec.seq, &rec.prev), mac)),
                _ => v
                    .problems
                    .push(format!("line {ln}: checkpoint without a valid MAC")),
            }
            cps.push((rec.seq, here.clone()));
        } else {
            since_cp += 1;
        }
        prev_hash = here;
        prev_seq = Some(rec.seq);
    }
    if complete < lines.len() && !lines[complete].is_empty() {
        v.problems.push(format!(
            "line {}: partial last line (truncated mid-record)",
            complete + 1
        ));
    }
    v.unchecked_tail = since_cp;
    (v, macs, cps)
}

/// Filters for [`query`].
#[derive(Debug, Default, Clone)]
pub struct QueryFilter {
    /// Records at or after (ms).
    pub since_ms: Option<i64>,
    /// Records before (ms).
    pub until_ms: Option<i64>,
    /// Key.
    pub key: Option<String>,
    /// Caller.
    pub caller: Option<String>,
    /// Outcome code name.
    pub outcome: Option<String>,
}

/// Reads matching records with seq > `after`, at most `limit`; returns them (as stored) and the
/// seq to continue after, if there may be more. `visible` decides per record whether the asker
/// may see it.
pub fn query(
    path: &Path,
    f: &QueryFilter,
    after: u64,
    limit: usize,
    visible: impl Fn(&Record) -> bool,
) -> QueryResult {
    query_from(path, 0, f, after, limit, &visible)
}

/// [`query`], reading from byte `start` (the start of a line at or before the first record
/// with seq > `after`).
fn query_from(
    path: &Path,
    start: u64,
    f: &QueryFilter,
    after: u64,
    limit: usize,
    visible: &dyn Fn(&Record) -> bool,
) -> QueryResult {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot read audit log: {e}"))?;
    file.seek(SeekFrom::Start(start))
        .map_err(|e| format!("cannot read audit log: {e}"))?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(|e| format!("cannot read audit log: {e}"))?;
        if leading_seq(line.as_bytes()).is_some_and(|s| s <= after) {
            continue;
        }
        let Ok(r) = serde_json::from_str::<Record>(&line) else {
            continue;
        };
        if r.seq <= after
            || f.since_ms.is_some_and(|s| r.time_ms < s)
            || f.until_ms.is_some_and(|u| r.time_ms >= u)
            || f.key.as_ref().is_some_and(|k| r.key.as_ref() != Some(k))
            || f.caller
                .as_ref()
                .is_some_and(|c| r.caller.as_ref() != Some(c))
            || f.outcome
                .as_ref()
                .is_some_and(|o| r.outcome.as_ref() != Some(o))
            || !visible(&r)
        {
            continue;
        }
        if out.len() == limit {
            let next = after_of(&out);
            return Ok((out, Some(next)));
        }
        out.push(line);
    }
    Ok((out, None))
}

fn after_of(lines: &[String]) -> u64 {
    lines
        .last()
        .and_then(|l| serde_json::from_str::<Record>(l).ok())
        .map(|r| r.seq)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut prev = GENESIS.to_string();
        for seq in 1..=n {
            let r = Record {
                seq,
                kind: "request".into(),
                op: Some("WrapKey".into()),
                prev,
                ..Default::default()
            };
            let line = serde_json::to_vec(&r).expect("json");
            prev = sha256_hex(&line);
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
        out
    }

    #[test]
    fn indexed_queries_page_like_a_full_scan_as_the_log_grows_and_is_replaced() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit.log");
        let mut ix = QueryIndex::default();
        let all = QueryFilter::default();
        let odd = |r: &Record| r.seq % 2 == 1;
        let check = |ix: &mut QueryIndex, n: u64| {
            for after in [0, 1, 255, 256, 257, 700, n - 1, n, n + 5] {
                for limit in [1, 10, 300] {
                    let start = ix.start_for(&path, after);
                    let fast = query_from(&path, start, &all, after, limit, &odd).expect("q");
                    let slow = query(&path, &all, after, limit, odd).expect("q");
                    assert_eq!(fast, slow, "after {after}, limit {limit}");
                    if after > 300 && after <= n {
                        assert!(start > 0, "after {after}: the index was not used");
                    }
                }
            }
        };
        std::fs::write(&path, chain(1000)).expect("write");
        check(&mut ix, 1000);
        assert_eq!(ix.marks.len(), 4);
        // The log grows (and its last line is half written): the index follows.
        let more = chain(1500);
        let cut = more.len() - 20;
        std::fs::write(&path, &more[..cut]).expect("write");
        let _ = ix.start_for(&path, 0);
        std::fs::write(&path, &more).expect("write");
        check(&mut ix, 1500);
        assert_eq!(ix.marks.len(), 6);
        // A shorter file in its place: indexed again from the start.
        let tmp = dir.path().join("new.log");
        std::fs::write(&tmp, chain(300)).expect("write");
        std::fs::rename(&tmp, &path).expect("replace");
        check(&mut ix, 300);
        assert_eq!(ix.marks.len(), 2);
    }

    /// A log of `n` records where record `cp` is a checkpoint; returns the bytes and the
    /// checkpoint's (hash, offset).
    fn log_with_checkpoint(n: u64, cp: u64) -> (Vec<u8>, String, u64) {
        let mut out = Vec::new();
        let mut prev = GENESIS.to_string();
        let mut at = (String::new(), 0);
        for seq in 1..=n {
            let r = Record {
                seq,
                kind: if seq == cp { "checkpoint" } else { "request" }.into(),
                prev,
                ..Default::default()
            };
            let line = serde_json::to_vec(&r).expect("json");
            prev = sha256_hex(&line);
            if seq == cp {
                at = (prev.clone(), out.len() as u64);
            }
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
        (out, at.0, at.1)
    }

    #[test]
    fn a_scan_from_the_recorded_checkpoint_ends_where_a_full_scan_does() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit.log");
        let (mut log, hash, offset) = log_with_checkpoint(50, 30);
        log.extend_from_slice(b"{\"partial"); // an unacknowledged write
        std::fs::write(&path, &log).expect("write");
        let full = scan(&path, None).expect("scan");
        let hint = RecordedCheckpoint::parse(&format!("30:{hash}:{offset}")).expect("parse");
        let fast = scan(&path, Some(&hint)).expect("scan");
        assert_eq!(
            (fast.seq, &fast.hash, fast.len),
            (full.seq, &full.hash, full.len)
        );
        assert_eq!(full.seq, 50);
        assert_eq!(fast.problems, full.problems);
        assert!(fast.checkpoints.iter().any(|(s, h)| hint.is(*s, h)));
        // A stale offset (the log was rewritten or truncated): a full scan, which does not
        // find the checkpoint's line where the store says.
        let stale = RecordedCheckpoint::parse(&format!("30:{hash}:{}", offset + 7)).expect("p");
        let fallback = scan(&path, Some(&stale)).expect("scan");
        assert_eq!((fallback.seq, fallback.len), (full.seq, full.len));
        let wrong = RecordedCheckpoint::parse(&format!("31:{hash}:{offset}")).expect("p");
        let t = scan(&path, Some(&wrong)).expect("scan");
        assert!(!t.checkpoints.iter().any(|(s, h)| wrong.is(*s, h)));
        // The old setting format (no offset) still parses.
        assert_eq!(
            RecordedCheckpoint::parse(&format!("30:{hash}")).map(|r| r.offset),
            Some(None)
        );
        assert!(RecordedCheckpoint::parse("30:abc:1").is_none());
    }

    #[test]
    fn an_intact_chain_verifies() {
        let (v, macs, _) = verify_chain(&chain(5));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!((v.lines, v.unchecked_tail, macs.len()), (5, 5, 0));
    }

    #[test]
    fn each_kind_of_tampering_is_found_where_it_happened() {
        let text = String::from_utf8(chain(6)).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        let join = |ls: Vec<&str>| format!("{}\n", ls.join("\n"));
        // Edit line 3.
        let edited = text.replacen("\"seq\":3,", "\"seq\":3,\"key\":\"x/y\",", 1);
        let (v, _, _) = verify_chain(edited.as_bytes());
        assert!(v.problems[0].starts_with("line 4 "), "{:?}", v.problems);
        // Delete line 3.
        let mut ls = lines.clone();
        ls.remove(2);
        let (v, _, _) = verify_chain(join(ls).as_bytes());
        assert!(
            v.problems
                .iter()
                .any(|p| p.starts_with("line 3") && p.contains("deleted")),
            "{:?}",
            v.problems
        );
        // Swap lines 2 and 3.
        let mut ls = lines.clone();
        ls.swap(1, 2);
        let (v, _, _) = verify_chain(join(ls).as_bytes());
        assert!(
            v.problems.iter().any(|p| p.starts_with("line 2")),
            "{:?}",
            v.problems
        );
        // Insert a copy of line 2 after it.
        let mut ls = lines.clone();
        ls.insert(2, lines[1]);
        let (v, _, _) = verify_chain(join(ls).as_bytes());
        assert!(
            v.problems
                .iter()
                .any(|p| p.starts_with("line 3") && p.contains("inserted")),
            "{:?}",
            v.problems
        );
        // Cut the front.
        let (v, _, _) = verify_chain(join(lines[2..].to_vec()).as_bytes());
        assert!(
            v.problems
                .iter()
                .any(|p| p.contains("truncated at the front")),
            "{:?}",
            v.problems
        );
        // Cut mid-line.
        let (v, _, _) = verify_chain(&text.as_bytes()[..text.len() - 10]);
        assert!(
            v.problems.iter().any(|p| p.contains("partial")),
            "{:?}",
            v.problems
        );
    }
}
