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
//! An entry: `KBAUDJ1\n`, round (u64), the log offset its records start at (u64), their length
//! (u64), the first 8 bytes of SHA-256 over those three and the records, then the records.
//! Entries of one round are contiguous in the log; [`recover`] reads them from the start of the
//! file and stops at the first that is not the next one (another round, a gap, a bad checksum).

use std::{
    fs::File,
    io::ErrorKind,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"KBAUDJ1\n";
const HEADER: usize = 40;
/// The journal's size. A checkpoint (by default every 1,000 records) starts a new round, so a
/// round rarely fills it; when one does, the log is synced instead and a round starts.
pub const CAPACITY: u64 = 4 << 20;

/// The journal of the log at `log`.
pub fn path_for(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

fn checksum(round: u64, at: u64, data: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
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

/// The entries of the journal's current round, in order: (log offset, records).
fn entries(b: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut round = None;
    let mut next_at = None;
    while pos + HEADER <= b.len() && &b[pos..pos + 8] == MAGIC {
        let (r, at, len) = (u64_at(b, pos + 8), u64_at(b, pos + 16), u64_at(b, pos + 24));
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|l| (pos + HEADER).checked_add(l))
            .filter(|e| *e <= b.len())
        else {
            break;
        };
        let data = &b[pos + HEADER..end];
        if round.is_some_and(|x| x != r)
            || next_at.is_some_and(|x| x != at)
            || b[pos + 32..pos + 40] != checksum(r, at, data)
        {
            break;
        }
        round = Some(r);
        next_at = at.checked_add(len);
        out.push((at, data));
        pos = end;
    }
    out
}

/// Puts back into the log at `log` the records its journal holds and the log lacks, and syncs
/// the log. Returns what it did, for the trail, if it did anything.
pub fn recover(log: &Path) -> Result<Option<String>, String> {
    let jpath = path_for(log);
    let bytes = match std::fs::read(&jpath) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot read audit journal {}: {e}",
                jpath.display()
            ));
        }
    };
    let entries = entries(&bytes);
    let Some(&(first_at, _)) = entries.first() else {
        return Ok(None);
    };
    let file = match std::fs::OpenOptions::new().read(true).write(true).open(log) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot open audit log {}: {e}", log.display())),
    };
    let io = |e: std::io::Error| format!("cannot restore the audit log from its journal: {e}");
    let mut len = match &file {
        Some(f) => f.metadata().map_err(io)?.len(),
        None => 0,
    };
    let last_end = entries.last().map_or(0, |(at, d)| at + d.len() as u64);
    if last_end <= len {
        return Ok(None);
    }
    if first_at > len {
        // The log is shorter than the journal's first record: it was cut or replaced while the
        // broker was stopped. That is evidence, left alone (the checkpoint check reports it).
        return Ok(Some(format!(
            "the audit journal holds records from byte {first_at} on but the log has only {len} \
             bytes: nothing restored"
        )));
    }
    let file = match file {
        Some(f) => f,
        None => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .open(log)
            .map_err(io)?,
    };
    let mut restored = 0u64;
    for (at, data) in entries {
        let end = at + data.len() as u64;
        if end <= len {
            continue;
        }
        if at > len {
            break;
        }
        // What the log holds of this entry must be its start; if it is anything else (a torn
        // write), the journal's copy replaces it.
        let have = (len - at) as usize;
        let mut cur = vec![0; have];
        file.read_exact_at(&mut cur, at).map_err(io)?;
        let from = if cur == data[..have] { have } else { 0 };
        if from == 0 {
            file.set_len(at).map_err(io)?;
        }
        file.write_all_at(&data[from..], at + from as u64)
            .map_err(io)?;
        restored += (data.len() - from) as u64;
        len = end;
    }
    file.sync_all().map_err(io)?;
    Ok(Some(format!(
        "{restored} bytes of acknowledged records restored to the log from its journal (they \
         had not reached the disk through the log)"
    )))
}

/// The open journal of a log (see the module docs).
#[derive(Debug)]
pub struct Journal {
    file: File,
    pos: u64,
    round: u64,
}

impl Journal {
    /// Opens the journal of the log at `log`, creating it (written full of zeros and synced) if
    /// it is not there at its full size, and starts a round. Run after [`recover`].
    pub fn open(log: &Path) -> std::io::Result<Self> {
        let path = path_for(log);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        let m = file.metadata()?;
        // Real zeros, not `set_len` (holes) or `fallocate` (unwritten extents): writing into
        // either changes the file's block map, and its sync would write metadata again.
        use std::os::unix::fs::MetadataExt;
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
            pos: 0,
            round: 0,
        };
        j.new_round();
        Ok(j)
    }

    /// Starts a new round: the next entry goes to the start of the file, and every entry already
    /// there is of an older round. Call when everything journalled is durable in the log.
    pub fn new_round(&mut self) {
        self.round = uuid::Uuid::new_v4().as_u64_pair().0;
        self.pos = 0;
    }

    /// Makes `data`, just appended to `log` at offset `at`, durable: through the journal, or,
    /// when it does not fit in this round, by syncing the log and starting a new round.
    pub fn commit(&mut self, log: &File, at: u64, data: &[u8]) -> std::io::Result<()> {
        let need = (HEADER + data.len()) as u64;
        if self.pos + need > CAPACITY {
            log.sync_data()?;
            self.new_round();
            return Ok(());
        }
        let mut entry = Vec::with_capacity(HEADER + data.len());
        entry.extend_from_slice(MAGIC);
        entry.extend_from_slice(&self.round.to_le_bytes());
        entry.extend_from_slice(&at.to_le_bytes());
        entry.extend_from_slice(&(data.len() as u64).to_le_bytes());
        entry.extend_from_slice(&checksum(self.round, at, data));
        entry.extend_from_slice(data);
        let written = self
            .file
            .write_all_at(&entry, self.pos)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.pos += need;
                Ok(())
            }
            Err(e) => {
                // The caller takes the records back out of the log; the entry must not bring
                // them back at the next start.
                let _ = self.file.write_all_at(&[0; HEADER], self.pos);
                self.new_round();
                Err(e)
            }
        }
    }

    /// Syncs the log and starts a new round (at a checkpoint and at close).
    pub fn sync_log(&mut self, log: &File) -> std::io::Result<()> {
        log.sync_data()?;
        self.new_round();
        Ok(())
    }

    /// Marks the journal empty (after the log was synced at close): nothing in it is applied at
    /// the next start.
    pub fn clear(&mut self) {
        let _ = self
            .file
            .write_all_at(&[0; HEADER], 0)
            .and_then(|()| self.file.sync_data());
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

    /// Appends `groups` to the log at `path` and commits each through a fresh journal.
    fn write_groups(path: &Path, groups: &[&[u8]]) -> Journal {
        let mut j = Journal::open(path).expect("journal");
        let mut log = log_file(path);
        for g in groups {
            let at = log.metadata().expect("len").len();
            log.write_all(g).expect("append");
            j.commit(&log, at, g).expect("commit");
        }
        j
    }

    #[test]
    fn the_journal_is_written_zeros_of_its_full_size() {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("audit.log");
        let _j = Journal::open(&log).expect("journal");
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
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("audit.log");
        let groups: [&[u8]; 3] = [
            b"{\"seq\":1}\n",
            b"{\"seq\":2}\n{\"seq\":3}\n",
            b"{\"seq\":4}\n",
        ];
        drop(write_groups(&log, &groups));
        let whole = std::fs::read(&log).expect("read");
        // The power went before the page cache reached the disk: the log lost part of the second
        // group and all of the third; one torn byte of garbage sits where the second went on.
        let cut = groups[0].len() + 5;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .expect("open");
        f.set_len(cut as u64).expect("cut");
        f.write_all_at(b"\0", cut as u64 - 1).expect("tear");
        let said = recover(&log).expect("recover").expect("a report");
        assert!(said.contains("restored"), "{said}");
        assert_eq!(std::fs::read(&log).expect("read"), whole);
        // Recovering again changes nothing and says nothing.
        assert_eq!(recover(&log).expect("again"), None);
        assert_eq!(std::fs::read(&log).expect("read"), whole);
    }

    #[test]
    fn a_damaged_entry_ends_what_is_restored_there_and_nothing_before_it_is_lost() {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("audit.log");
        let groups: [&[u8]; 3] = [b"a\n", b"bb\n", b"ccc\n"];
        drop(write_groups(&log, &groups));
        // Flip one byte of the third entry's records in the journal.
        let jp = path_for(&log);
        let mut j = std::fs::read(&jp).expect("journal");
        let third = 3 * HEADER + groups[0].len() + groups[1].len();
        j[third] ^= 1;
        std::fs::write(&jp, &j).expect("write");
        std::fs::write(&log, b"").expect("lose the log");
        recover(&log).expect("recover");
        assert_eq!(std::fs::read(&log).expect("read"), b"a\nbb\n");
    }

    #[test]
    fn entries_of_an_older_round_are_not_applied_after_a_newer_one() {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("audit.log");
        let mut j = write_groups(&log, &[b"old-1\n", b"old-2\n", b"old-3\n"]);
        let l = log_file(&log);
        j.sync_log(&l).expect("sync");
        // The new round's first entry lands over the old round's first; the old second and
        // third still follow it in the file, contiguous in the log with the old first.
        let mut l = l;
        let at = l.metadata().expect("len").len();
        l.write_all(b"new-4\n").expect("append");
        j.commit(&l, at, b"new-4\n").expect("commit");
        let bytes = std::fs::read(path_for(&log)).expect("journal");
        let e = entries(&bytes);
        assert_eq!(e, vec![(at, &b"new-4\n"[..])]);
    }

    #[test]
    fn a_log_cut_below_the_journal_is_reported_and_left_as_evidence() {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("audit.log");
        let mut j = write_groups(&log, &[b"one\n"]);
        let l = log_file(&log);
        j.sync_log(&l).expect("sync");
        let mut l = l;
        l.write_all(b"two\n").expect("append");
        j.commit(&l, 4, b"two\n").expect("commit");
        std::fs::write(&log, b"").expect("cut");
        let said = recover(&log).expect("recover").expect("a report");
        assert!(said.contains("nothing restored"), "{said}");
        assert_eq!(std::fs::read(&log).expect("read"), b"");
    }

    #[test]
    fn a_cleared_or_reopened_journal_applies_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("audit.log");
        let mut j = write_groups(&log, &[b"x\n"]);
        j.clear();
        std::fs::write(&log, b"").expect("lose");
        assert_eq!(recover(&log).expect("recover"), None);
        drop(write_groups(&log, &[b"y\n"]));
        drop(Journal::open(&log).expect("reopen"));
        std::fs::write(&log, b"").expect("lose");
        assert_eq!(recover(&log).expect("recover"), None);
    }
}
