//! The audit log's journal: how a group of records becomes durable without `fdatasync`ing the
//! log itself.
//!
//! Appending to the log changes its size, so an `fdatasync` of the log writes the inode as well as
//! the data: a second synchronous disk write (ext4 without a journal) or a journal commit (ext4
//! with one). The journal is a file of fixed size beside the log (`<log>.journal`), written full
//! of zeros once, so that overwriting it changes no metadata and its `fdatasync` flushes the data
//! block only. Each group is appended to the log (page cache, no sync) and written, with a
//! header, to the journal, which is synced: the group is durable once the journal is. The log
//! keeps its format (JSON lines, nothing else); readers and log shippers see no change.
//!
//! The log itself is synced at every checkpoint, when the journal is full and at close, and a
//! new *round* of the journal starts each time (entries from an earlier round are never applied
//! after a newer one). At start-up, before the log is read, [`recover`] puts back into the log
//! whatever acknowledged records the journal holds and the log lacks (the log's tail was still
//! in the page cache when the power went).
//!
//! A sync that fails is not retried in the hope that the next one covers it (Linux reports a
//! failed write-back once, and drops the pages): once a sync of the log or the journal fails and
//! the journal cannot vouch for every answered record, the journal is *failed* and every later
//! group fails (requests are refused, as when the log cannot be written) until a restart, whose
//! [`recover`] writes the journal's records into the log again.
//!
//! An entry: `KBAUDJ2\n`, the log's inode number, the round, the log offset its records start
//! at, their length (each a little-endian u64), the first 8 bytes of SHA-256 over those four and
//! the records, then the records. Entries of one round are contiguous in the log; [`recover`]
//! reads them from the start of the file and stops at the first that is not the next one
//! (another round, a gap, a bad checksum).

use std::{
    fs::File,
    io::{ErrorKind, Read},
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"KBAUDJ2\n";
const HEADER: usize = 48;
/// The journal's size. A checkpoint (by default every 1,000 records) starts a new round, so a
/// round rarely fills it; when one does, the log is synced instead and a round starts.
pub const CAPACITY: u64 = 4 << 20;

/// The journal of the log at `log`.
pub fn path_for(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

fn checksum(log_id: u64, round: u64, at: u64, data: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(log_id.to_le_bytes());
    h.update(round.to_le_bytes());
    h.update(at.to_le_bytes());
    h.update((data.len() as u64).to_le_bytes());
    h.update(data);
    let d = h.finalize();
    let mut out = [0; 8];
    out.copy_from_slice(&d[..8]);
    out
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

/// One entry of the journal's current round.
#[derive(Debug, PartialEq, Eq)]
struct Entry<'a> {
    log_id: u64,
    at: u64,
    data: &'a [u8],
}

/// The entries of the journal's current round, in order.
fn entries(b: &[u8]) -> Vec<Entry<'_>> {
    let mut out: Vec<Entry<'_>> = Vec::new();
    let mut pos = 0usize;
    let mut round = None;
    while pos + HEADER <= b.len() && &b[pos..pos + 8] == MAGIC {
        let f = |i: usize| u64_at(b, pos + 8 + 8 * i);
        let (log_id, r, at, len) = (f(0), f(1), f(2), f(3));
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|l| (pos + HEADER).checked_add(l))
            .filter(|e| *e <= b.len())
        else {
            break;
        };
        let data = &b[pos + HEADER..end];
        let follows = out
            .last()
            .is_none_or(|p| p.log_id == log_id && p.at + p.data.len() as u64 == at);
        if round.is_some_and(|x| x != r)
            || !follows
            || at.checked_add(len).is_none()
            || b[pos + 40..pos + 48] != checksum(log_id, r, at, data)
        {
            break;
        }
        round = Some(r);
        out.push(Entry { log_id, at, data });
        pos = end;
    }
    out
}

/// Reads a journal: a regular file of this user's, at most [`CAPACITY`] bytes, never through a
/// symbolic link (nor blocking on a FIFO put there). Returns its bytes and mode.
fn read_journal(path: &Path) -> std::io::Result<(Vec<u8>, u32, u32)> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let mut b = Vec::new();
    f.take(CAPACITY).read_to_end(&mut b)?;
    Ok((b, m.permissions().mode(), m.uid()))
}

/// The SHA-256 (hex) of the log's line that ends at `at` (the `prev` of the record written
/// there), or the genesis hash at 0; `None` if no such line ends there.
fn hash_of_line_ending_at(log: &File, at: u64) -> std::io::Result<Option<String>> {
    if at == 0 {
        return Ok(Some(super::GENESIS.to_string()));
    }
    // Records are a few hundred bytes; a line longer than this window is not one of ours.
    let from = at.saturating_sub(1 << 20);
    let mut buf = vec![0; (at - from) as usize];
    log.read_exact_at(&mut buf, from)?;
    if buf.last() != Some(&b'\n') {
        return Ok(None);
    }
    let body = &buf[..buf.len() - 1];
    match body.iter().rposition(|b| *b == b'\n') {
        Some(i) => Ok(Some(super::sha256_hex(&body[i + 1..]))),
        None if from == 0 => Ok(Some(super::sha256_hex(body))),
        None => Ok(None),
    }
}

/// The `prev` of the first record in `data`.
fn first_prev(data: &[u8]) -> Option<String> {
    let line = data.split(|b| *b == b'\n').next()?;
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    v.get("prev")?.as_str().map(str::to_string)
}

/// Moves a journal that does not fit its log aside (kept as evidence, never applied again) and
/// says where it went.
fn set_aside(jpath: &Path, why: String) -> Result<Option<String>, String> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut to = jpath.as_os_str().to_owned();
    to.push(format!(".unrestored-{secs}"));
    let to = PathBuf::from(to);
    std::fs::rename(jpath, &to).map_err(|e| {
        format!(
            "{why}; cannot move the audit journal {} aside: {e}",
            jpath.display()
        )
    })?;
    if let Some(dir) = jpath.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(Some(format!(
        "{why}: nothing restored; the journal is kept as {}",
        to.display()
    )))
}

/// How many bytes of records the journal of the log at `log` holds beyond the log's end (what
/// the broker's next start puts back), for `keybroker audit verify`.
pub fn pending(log: &Path) -> u64 {
    let Ok((bytes, _, _)) = read_journal(&path_for(log)) else {
        return 0;
    };
    let len = std::fs::metadata(log).map_or(0, |m| m.len());
    entries(&bytes)
        .last()
        .map_or(0, |e| (e.at + e.data.len() as u64).saturating_sub(len))
}

/// Puts back into the log at `log` the records its journal holds (a tail lost or torn by a power
/// failure, or pages whose write-back failed), then syncs the log: whatever the journal holds is
/// then durable in the log itself, and the journal may be reused. Run at start-up, before the
/// log is read.
///
/// The journal is applied only to its own log: same inode, the first record it holds must chain
/// from the log's line before it, and where the log already holds bytes of an entry they must be
/// the entry's own or zeros (a torn write). A journal that does not fit (the log cut, replaced or
/// edited while the broker was stopped; a journal another user could have written) is moved
/// aside as evidence, the log left as it is. Returns what it did, for the trail.
pub fn recover(log: &Path) -> Result<Option<String>, String> {
    let jpath = path_for(log);
    let (bytes, mode, uid) = match read_journal(&jpath) {
        Ok(r) => r,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot read audit journal {}: {e}",
                jpath.display()
            ));
        }
    };
    let entries = entries(&bytes);
    let Some(first) = entries.first() else {
        return Ok(None);
    };
    if mode & 0o077 != 0 || uid != rustix::process::geteuid().as_raw() {
        // Whoever else could write it could have put records in it.
        return set_aside(
            &jpath,
            format!(
                "the audit journal {} is another user's or can be used by group or others \
                 (mode {:04o}, uid {uid})",
                jpath.display(),
                mode & 0o7777
            ),
        );
    }
    let io = |e: std::io::Error| format!("cannot restore the audit log from its journal: {e}");
    // Opened as the writer opens it (a log that is a symbolic link is followed).
    let file = match std::fs::OpenOptions::new().read(true).write(true).open(log) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return set_aside(
                &jpath,
                format!(
                    "the audit journal holds records but the log {} is gone",
                    log.display()
                ),
            );
        }
        Err(e) => return Err(format!("cannot open audit log {}: {e}", log.display())),
    };
    let m = file.metadata().map_err(io)?;
    let len = m.len();
    if first.log_id != m.ino() {
        return set_aside(
            &jpath,
            format!(
                "the audit journal belongs to another file than the log {} (it was replaced \
                 while the broker was stopped)",
                log.display()
            ),
        );
    }
    if first.at > len {
        return set_aside(
            &jpath,
            format!(
                "the audit journal holds records from byte {} on but the log has only {len} \
                 bytes (it was cut while the broker was stopped)",
                first.at
            ),
        );
    }
    if hash_of_line_ending_at(&file, first.at).map_err(io)? != first_prev(first.data) {
        return set_aside(
            &jpath,
            format!(
                "the audit journal's records at byte {} do not chain from the log's line before \
                 them (the log was replaced or edited while the broker was stopped)",
                first.at
            ),
        );
    }
    // Check every entry against what the log holds before changing anything.
    let mut missing = 0u64;
    for e in &entries {
        let have = len.saturating_sub(e.at).min(e.data.len() as u64) as usize;
        let mut cur = vec![0; have];
        file.read_exact_at(&mut cur, e.at).map_err(io)?;
        if !cur.iter().zip(e.data).all(|(c, d)| c == d || *c == 0) {
            return set_aside(
                &jpath,
                format!(
                    "the audit log's bytes at {} differ from its journal's (the log was edited \
                     while the broker was stopped)",
                    e.at
                ),
            );
        }
        missing += (e.data.len() - have) as u64
            + cur.iter().zip(e.data).filter(|(c, d)| c != d).count() as u64;
    }
    // Every entry is written again, not only what is missing: pages whose write-back failed
    // still read back right from the page cache, and must reach the disk.
    for e in &entries {
        file.write_all_at(e.data, e.at).map_err(io)?;
    }
    file.sync_all().map_err(io)?;
    Ok((missing > 0).then(|| {
        format!(
            "{missing} bytes of acknowledged records restored to the log from its journal (they \
             had not reached the disk through the log)"
        )
    }))
}

/// The open journal of a log (see the module docs).
#[derive(Debug)]
pub struct Journal {
    file: File,
    log_id: u64,
    pos: u64,
    round: u64,
    /// Why the journal can no longer vouch for every answered record (a sync failed).
    failed: Option<String>,
}

impl Journal {
    /// Opens the journal of the log at `log_path` (open as `log`), creating it (written full of
    /// zeros and synced) if it is not there at its full size, and starts a round. Run after
    /// [`recover`], and after the log's partial last line (if any) was cut and the log synced.
    pub fn open(log_path: &Path, log: &File) -> std::io::Result<Self> {
        crate::failpoint::io_fault("audit.journal")?;
        let path = path_for(log_path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
            )
            .open(&path)?;
        let m = file.metadata()?;
        if !m.is_file() || m.permissions().mode() & 0o077 != 0 {
            // Whoever else can write it can put records into the log at the next start.
            return Err(std::io::Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "{} is not a regular file of mode 0600 (mode {:04o}; keybroker creates it so)",
                    path.display(),
                    m.permissions().mode() & 0o7777
                ),
            ));
        }
        // Real zeros, not `set_len` (holes) or `fallocate` (unwritten extents): writing into
        // either changes the file's block map, and its sync would write metadata again.
        if m.len() != CAPACITY || m.blocks() * 512 < CAPACITY {
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < CAPACITY {
                file.write_all_at(&zeros, at)?;
                at += zeros.len() as u64;
            }
            file.set_len(CAPACITY)?;
        } else {
            file.write_all_at(&[0; HEADER], 0)?;
        }
        file.sync_all()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The new file's name must survive a power failure too.
            File::open(dir)?.sync_all()?;
        }
        let mut j = Self {
            file,
            log_id: log.metadata()?.ino(),
            pos: 0,
            round: 0,
            failed: None,
        };
        j.new_round();
        Ok(j)
    }

    fn new_round(&mut self) {
        self.round = uuid::Uuid::new_v4().as_u64_pair().0;
        self.pos = 0;
    }

    fn fail(&mut self, what: &str, e: &std::io::Error) -> std::io::Error {
        let why = format!("{what}: {e}; audit records are refused until the broker restarts");
        tracing::error!(error = %why, "the audit journal failed");
        self.failed = Some(why.clone());
        std::io::Error::other(why)
    }

    fn check(&self) -> std::io::Result<()> {
        match &self.failed {
            Some(why) => Err(std::io::Error::other(why.clone())),
            None => Ok(()),
        }
    }

    /// Why the journal can no longer vouch for every answered record, once a sync failed.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Syncs the log, then starts a new round: every entry so far is durable in the log itself.
    pub fn sync_log(&mut self, log: &File) -> std::io::Result<()> {
        self.check()?;
        if let Err(e) = crate::failpoint::io_fault("audit.sync").and_then(|()| log.sync_data()) {
            return Err(self.fail("cannot sync the audit log", &e));
        }
        self.new_round();
        Ok(())
    }

    /// Makes `data`, just appended to `log` at offset `at`, durable: through the journal, or,
    /// when it does not fit in this round or the journal cannot take it, by syncing the log
    /// (then a new round starts). An error means the group is not durable: the caller cuts it
    /// back out of the log and fails its requests.
    pub fn commit(&mut self, log: &File, at: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        let need = (HEADER + data.len()) as u64;
        if self.pos + need > CAPACITY {
            return self.sync_log(log);
        }
        let mut entry = Vec::with_capacity(HEADER + data.len());
        entry.extend_from_slice(MAGIC);
        for v in [self.log_id, self.round, at, data.len() as u64] {
            entry.extend_from_slice(&v.to_le_bytes());
        }
        entry.extend_from_slice(&checksum(self.log_id, self.round, at, data));
        entry.extend_from_slice(data);
        let written = self
            .file
            .write_all_at(&entry, self.pos)
            .and_then(|()| crate::failpoint::io_fault("audit.sync"))
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.pos += need;
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write the audit journal: syncing the log instead");
                // The entry may be on disk in part or whole. If the log is synced its records
                // are the log's own and it is harmless. If not, the group fails and the entry
                // must not bring it back at the next start (if even this fails, on a failing
                // disk, that start may put the refused group's records in the log).
                let synced = self.sync_log(log);
                if synced.is_err() {
                    let _ = self
                        .file
                        .write_all_at(&[0; HEADER], self.pos)
                        .and_then(|()| self.file.sync_data());
                }
                synced
            }
        }
    }

    /// Marks the journal empty, once the log was synced at close: nothing in it is applied at
    /// the next start. A failed journal is left as it is, for that start to apply.
    pub fn clear(&mut self) {
        if self.failed.is_none() {
            let _ = self
                .file
                .write_all_at(&[0; HEADER], 0)
                .and_then(|()| self.file.sync_data());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn log_file(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("log")
    }

    /// `n` chained records (each `prev` the SHA-256 of the line before), as the writer makes.
    fn records(n: usize) -> Vec<Vec<u8>> {
        let mut prev = crate::audit::GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let line = format!(r#"{{"seq":{seq},"prev":"{prev}"}}"#);
                prev = crate::audit::sha256_hex(line.as_bytes());
                format!("{line}\n").into_bytes()
            })
            .collect()
    }

    /// Appends `groups` to the log at `path` and commits each through `j`.
    fn write_groups(j: &mut Journal, path: &Path, groups: &[Vec<u8>]) {
        let mut log = log_file(path);
        for g in groups {
            let at = log.metadata().expect("len").len();
            log.write_all(g).expect("append");
            j.commit(&log, at, g).expect("commit");
        }
    }

    fn setup(groups: &[Vec<u8>]) -> (tempfile::TempDir, PathBuf, Journal) {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("audit.log");
        let mut j = Journal::open(&log, &log_file(&log)).expect("journal");
        write_groups(&mut j, &log, groups);
        (dir, log, j)
    }

    fn cut(log: &Path, len: usize) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(log)
            .expect("open");
        f.set_len(len as u64).expect("cut");
    }

    fn set_aside_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .expect("dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().contains(".unrestored-"))
            })
            .count()
    }

    #[test]
    fn the_journal_is_written_zeros_of_its_full_size() {
        let (_dir, log, _j) = setup(&[]);
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path_for(&log)).expect("meta");
        assert_eq!(m.len(), CAPACITY);
        assert!(
            m.blocks() * 512 >= CAPACITY,
            "no holes: {} blocks",
            m.blocks()
        );
        assert_eq!(m.mode() & 0o777, 0o600);
    }

    #[test]
    fn a_log_that_lost_its_tail_gets_it_back_byte_for_byte() {
        let r = records(4);
        let groups = [
            r[0].clone(),
            [r[1].clone(), r[2].clone()].concat(),
            r[3].clone(),
        ];
        let (_dir, log, j) = setup(&groups);
        drop(j);
        let whole = std::fs::read(&log).expect("read");
        assert_eq!(pending(&log), 0);
        // The power went before the page cache reached the disk: the log lost part of the second
        // group and all of the third; zeros sit where the second went on (a torn write).
        let keep = groups[0].len() + 5;
        cut(&log, keep + 7);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .expect("open")
            .write_all_at(&[0; 7], keep as u64)
            .expect("tear");
        assert_eq!(pending(&log) as usize, whole.len() - keep - 7);
        let said = recover(&log).expect("recover").expect("a report");
        assert!(said.contains("restored"), "{said}");
        assert_eq!(std::fs::read(&log).expect("read"), whole);
        // Recovering again changes nothing and says nothing.
        assert_eq!(recover(&log).expect("again"), None);
        assert_eq!(std::fs::read(&log).expect("read"), whole);
    }

    #[test]
    fn a_damaged_entry_ends_what_is_restored_there_and_nothing_before_it_is_lost() {
        let groups = records(3);
        let (_dir, log, j) = setup(&groups);
        drop(j);
        // Flip one byte of the third entry's records in the journal.
        let jp = path_for(&log);
        let mut bytes = std::fs::read(&jp).expect("journal");
        let third = 3 * HEADER + groups[0].len() + groups[1].len();
        bytes[third] ^= 1;
        std::fs::write(&jp, &bytes).expect("write");
        cut(&log, 0);
        recover(&log).expect("recover");
        assert_eq!(
            std::fs::read(&log).expect("read"),
            [groups[0].clone(), groups[1].clone()].concat()
        );
    }

    #[test]
    fn entries_of_an_older_round_are_not_applied_after_a_newer_one() {
        let r = records(4);
        let (_dir, log, mut j) = setup(&r[..3]);
        let mut l = log_file(&log);
        j.sync_log(&l).expect("sync");
        // The new round's first entry lands over the old round's first; the old second and
        // third still follow it in the file, contiguous in the log with the old first.
        let at = l.metadata().expect("len").len();
        l.write_all(&r[3]).expect("append");
        j.commit(&l, at, &r[3]).expect("commit");
        let bytes = std::fs::read(path_for(&log)).expect("journal");
        let e = entries(&bytes);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].at, e[0].data), (at, &r[3][..]));
    }

    #[test]
    fn a_log_cut_below_the_journal_is_left_as_it_is_and_the_journal_kept_aside() {
        let r = records(2);
        let (dir, log, mut j) = setup(&r[..1]);
        let mut l = log_file(&log);
        j.sync_log(&l).expect("sync");
        let at = l.metadata().expect("len").len();
        l.write_all(&r[1]).expect("append");
        j.commit(&l, at, &r[1]).expect("commit");
        cut(&log, 0);
        let said = recover(&log).expect("recover").expect("a report");
        assert!(said.contains("nothing restored"), "{said}");
        assert_eq!(std::fs::read(&log).expect("read"), b"");
        assert_eq!(set_aside_files(dir.path()), 1);
        assert!(!path_for(&log).exists());
    }

    #[test]
    fn another_logs_journal_or_an_edited_log_is_not_applied() {
        // A journal whose records do not chain from the line before them (the log was
        // replaced by another of the same length while the broker was stopped).
        let r = records(3);
        let (dir, log, mut j) = setup(&r[..1]);
        j.sync_log(&log_file(&log)).expect("sync");
        write_groups(&mut j, &log, &r[1..]);
        drop(j);
        let mut replaced = b"{\"seq\":1,\"prev\":\"x\"}".to_vec();
        replaced.resize(r[0].len() - 1, b' ');
        replaced.push(b'\n');
        std::fs::write(&log, &replaced).expect("replace");
        let said = recover(&log).expect("recover").expect("a report");
        assert!(said.contains("do not chain"), "{said}");
        assert_eq!(std::fs::read(&log).expect("read"), replaced);
        assert_eq!(set_aside_files(dir.path()), 1);
        // Bytes an entry covers that are neither its own nor zeros: edited, left alone.
        let (dir, log, j) = setup(&r);
        drop(j);
        let mut edited = std::fs::read(&log).expect("read");
        let at = r[0].len() + 3;
        edited[at] = b'Z';
        edited.truncate(at + 4);
        std::fs::write(&log, &edited).expect("edit");
        let said = recover(&log).expect("recover").expect("a report");
        assert!(said.contains("differ"), "{said}");
        assert_eq!(std::fs::read(&log).expect("read"), edited);
        assert_eq!(set_aside_files(dir.path()), 1);
        // The log moved away and a new file put in its place, even one that starts the same.
        let (dir, log, j) = setup(&r);
        drop(j);
        std::fs::rename(&log, dir.path().join("old.log")).expect("move");
        std::fs::write(&log, &r[0]).expect("new log");
        let said = recover(&log).expect("recover").expect("a report");
        assert!(said.contains("another file"), "{said}");
        assert_eq!(std::fs::read(&log).expect("read"), r[0]);
        assert_eq!(set_aside_files(dir.path()), 1);
    }

    #[test]
    fn once_a_sync_fails_every_later_group_fails_and_the_journal_is_kept() {
        let r = records(3);
        let (_dir, log, mut j) = setup(&r[..1]);
        // The journal cannot be written (a read-only handle) and the log cannot be synced (a
        // pipe: fsync says EINVAL).
        let jp = path_for(&log);
        let good = std::mem::replace(&mut j.file, File::open(&jp).expect("read-only"));
        let (_rx, tx) = std::io::pipe().expect("pipe");
        let unsyncable = File::from(std::os::fd::OwnedFd::from(tx));
        assert!(j.commit(&unsyncable, 0, &r[1]).is_err());
        // Everything after fails too, even with both files working again: the first entry
        // (the only durable copy of its records) must stay where the next start finds it.
        j.file = good;
        let l = log_file(&log);
        let e = j.commit(&l, r[0].len() as u64, &r[1]).expect_err("failed");
        assert!(e.to_string().contains("until the broker restarts"), "{e}");
        assert!(j.sync_log(&l).is_err());
        j.clear();
        drop(j);
        cut(&log, 0);
        recover(&log).expect("recover");
        assert_eq!(std::fs::read(&log).expect("read"), r[0]);
    }

    #[test]
    fn a_journal_write_that_fails_is_covered_by_a_sync_of_the_log() {
        let r = records(2);
        let (_dir, log, mut j) = setup(&r[..1]);
        let jp = path_for(&log);
        let good = std::mem::replace(&mut j.file, File::open(&jp).expect("read-only"));
        let mut l = log_file(&log);
        l.write_all(&r[1]).expect("append");
        j.commit(&l, r[0].len() as u64, &r[1])
            .expect("the log was synced instead");
        assert_eq!(j.pos, 0, "a new round");
        j.file = good;
        assert!(j.failed.is_none());
    }

    #[test]
    fn a_journal_others_could_write_is_not_applied() {
        let r = records(2);
        let (dir, log, j) = setup(&r);
        drop(j);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path_for(&log), std::fs::Permissions::from_mode(0o666))
            .expect("chmod");
        cut(&log, r[0].len());
        let said = recover(&log).expect("recover").expect("a report");
        assert!(said.contains("group or others"), "{said}");
        assert_eq!(std::fs::read(&log).expect("read"), r[0]);
        assert_eq!(set_aside_files(dir.path()), 1);
    }

    #[test]
    fn a_cleared_or_reopened_journal_applies_nothing() {
        let r = records(2);
        let (_dir, log, mut j) = setup(&r[..1]);
        j.clear();
        cut(&log, 0);
        assert_eq!(recover(&log).expect("recover"), None);
        write_groups(&mut j, &log, &r[..1]);
        drop(Journal::open(&log, &log_file(&log)).expect("reopen"));
        cut(&log, 0);
        assert_eq!(recover(&log).expect("recover"), None);
    }
}
