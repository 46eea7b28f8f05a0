//! One writer per file: a `serve` process holds an exclusive lock on its SQLite store and on its
//! audit log for as long as it runs, and takes both before it opens the HSM, the store or the
//! log. Two brokers on one SQLite file drift apart (each caches the keys it loaded; versions
//! collide), and two brokers appending to one audit log interleave two sequences, which
//! `keybroker audit verify` then rightly reports as tampering. A PostgreSQL store is shared by
//! design (replicas), so only the audit log is locked then; each replica has its own log.
//!
//! The lock is `flock(2)` (through `std::fs::File::try_lock`, no extra crate) on a lock file
//! beside the protected file, `FILE.lock`, which also records who holds it (pid, host, since
//! when) for the refusal message. Why a file beside it rather than the file itself: SQLite uses
//! POSIX record locks on the database, and a second descriptor on that file in the same process
//! would cancel them when closed (SQLite's "how to corrupt" notes, section 2.2); on NFS, Linux
//! implements `flock` with those same record locks. One mechanism for both files keeps it simple.
//!
//! The kernel drops the lock when the process ends, however it ends (`kill -9` included): a
//! stale lock file never blocks a restart. Lock files are never deleted (deleting one that
//! another process has just opened would let two processes "hold" it); deleting one by hand
//! while a broker runs defeats the check.
//!
//! Readers take no lock (a shared lock would make them wait for the broker to stop):
//! `keybroker audit verify` reads a live log as it stands (the writer appends each batch of
//! whole lines with one `write`; a read that meets a write in progress reports a partial last
//! line, and a second run passes); `check-config` and `audit verify --config` only read the
//! store, and SQLite lets them. See docs/src/hardening.md.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use crate::config::{Config, StoreLocation};

/// An exclusive lock held until it is dropped (in practice: until the process exits).
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
    path: PathBuf,
}

impl WriterLock {
    /// Locks `target` (the SQLite store or the audit log) for this process. `what` names it in
    /// messages ("store", "audit log"); `hint` says how to give each broker its own file.
    /// Refuses at once, naming the holder, if another process has it.
    pub fn acquire(target: &Path, what: &str, hint: &str) -> Result<Self, String> {
        let path = lock_path(target);
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        // A few rounds only for the race with someone replacing the lock file between our open
        // and our lock (we never delete it ourselves).
        for _ in 0..3 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(|e| {
                    format!(
                        "{what} {}: cannot open {}: {e}",
                        target.display(),
                        path.display()
                    )
                })?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    return Err(format!(
                        "{what} {} is in use by another keybroker ({}; lock {}): {hint}",
                        target.display(),
                        Holder::parse(&text),
                        path.display()
                    ));
                }
                Err(TryLockError::Error(e)) => {
                    return Err(format!(
                        "{what} {}: cannot lock {}: {e} (keybroker needs flock(2) on this file system to keep a second broker off the file)",
                        target.display(),
                        path.display()
                    ));
                }
            }
            let same = match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if !same {
                continue;
            }
            let me = Holder::me().to_file();
            file.set_len(0)
                .and_then(|()| file.seek(SeekFrom::Start(0)))
                .and_then(|_| file.write_all(me.as_bytes()))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            tracing::debug!(lock = %path.display(), "{what} locked for this process");
            return Ok(Self { _file: file, path });
        }
        Err(format!(
            "{what} {}: the lock file {} keeps being replaced; is something deleting it?",
            target.display(),
            path.display()
        ))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock file of `target`: `FILE.lock` beside the real file (symbolic links resolved, so two
/// names of one file share one lock).
pub fn lock_path(target: &Path) -> PathBuf {
    let real = std::fs::canonicalize(target).unwrap_or_else(|_| {
        match (target.parent(), target.file_name()) {
            (Some(dir), Some(name)) => std::fs::canonicalize(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })
            .map(|d| d.join(name))
            .unwrap_or_else(|_| target.to_path_buf()),
            _ => target.to_path_buf(),
        }
    });
    let mut s = real.into_os_string();
    s.push(".lock");
    PathBuf::from(s)
}

/// The locks a broker process takes before it touches anything: its SQLite store (none for
/// PostgreSQL, which replicas share by design) and its audit log.
pub fn lock_local_files(cfg: &Config) -> Result<Vec<WriterLock>, String> {
    let audit = cfg.path(&cfg.audit.path);
    let mut locks = Vec::new();
    if let StoreLocation::Sqlite(db) = cfg.store_location() {
        if lock_path(&db) == lock_path(&audit) {
            return Err(format!(
                "store.path and audit.path name the same file ({})",
                db.display()
            ));
        }
        locks.push(WriterLock::acquire(
            &db,
            "store",
            "one SQLite store serves one broker; give each broker its own store.path, or share a PostgreSQL store (store.url) between replicas",
        )?);
    }
    locks.push(WriterLock::acquire(
        &audit,
        "audit log",
        "each broker writes its own audit log; give each broker its own audit.path",
    )?);
    Ok(locks)
}

/// Who holds a lock, as written into the lock file.
struct Holder {
    pid: Option<u32>,
    host: Option<String>,
    since: Option<String>,
}

impl Holder {
    fn me() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty());
        let since = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .ok();
        Self {
            pid: Some(std::process::id()),
            host,
            since,
        }
    }

    /// Reads `pid=`, `host=` and `since=` lines; whatever is missing (a holder that has not
    /// written yet) is reported as unknown.
    fn parse(text: &str) -> Self {
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        Self {
            pid: field("pid=").and_then(|p| p.parse().ok()),
            host: field("host="),
            since: field("since="),
        }
    }
}

impl std::fmt::Display for Holder {
    /// `pid N on host H since T` in messages (each part only if known).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(p) => write!(f, "pid {p}")?,
            None => write!(f, "pid unknown")?,
        }
        if let Some(h) = &self.host {
            write!(f, " on host {h}")?;
        }
        if let Some(s) = &self.since {
            write!(f, " since {s}")?;
        }
        Ok(())
    }
}

impl Holder {
    fn to_file(&self) -> String {
        format!(
            "pid={}\nhost={}\nsince={}\n",
            self.pid.map(|p| p.to_string()).unwrap_or_default(),
            self.host.as_deref().unwrap_or_default(),
            self.since.as_deref().unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_file_is_refused_naming_the_holder_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("sub").join("keybroker.db");
        let first = WriterLock::acquire(&db, "store", "use another").expect("first lock");
        assert_eq!(first.path(), lock_path(&db));
        let recorded = std::fs::read_to_string(first.path()).expect("lock file");
        assert!(
            recorded.starts_with(&format!("pid={}\n", std::process::id())),
            "{recorded}"
        );
        // flock conflicts between two open file descriptions even within one process.
        let e = WriterLock::acquire(&db, "store", "use another").expect_err("second lock");
        assert!(
            e.starts_with(&format!(
                "store {} is in use by another keybroker (pid {}",
                db.display(),
                std::process::id()
            )),
            "{e}"
        );
        assert!(e.ends_with(": use another"), "{e}");
        // Another name for the same file shares the lock.
        let alias = dir.path().join("alias.db");
        std::fs::write(&db, b"").expect("create the db file");
        std::os::unix::fs::symlink(&db, &alias).expect("symlink");
        assert!(WriterLock::acquire(&alias, "store", "x").is_err());
        drop(first);
        let again = WriterLock::acquire(&db, "store", "x").expect("free again after drop");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(again.path())
            .expect("lock file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    #[test]
    fn an_unknown_holder_is_reported_as_such() {
        assert_eq!(Holder::parse("").to_string(), "pid unknown");
        assert_eq!(
            Holder::parse("pid=42\nhost=kb-0\nsince=2026-01-01T00:00:00Z\n").to_string(),
            "pid 42 on host kb-0 since 2026-01-01T00:00:00Z"
        );
    }
}
