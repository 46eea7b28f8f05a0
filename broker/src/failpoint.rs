//! Test-only crash points, compiled in only with the `failpoints` feature (the test build;
//! never a release). With it, `KEYBROKER_FAILPOINTS=create.after_hsm,destroy.after_hsm` makes the
//! broker abort (as `kill -9` would) when it reaches one of the named points, so the tests can
//! prove that every interrupted create/rotate/import/restore/purge/trim is reconciled at the next
//! start. Without the feature, [`hit`] is an empty inline function and the variable is ignored
//! (with a warning at start-up, see [`ignored`]).
//!
//! Points: `create.after_pending`, `create.after_hsm`, `rotate.after_hsm`, `import.after_hsm`,
//! `restore.after_pending`, `restore.after_hsm`, `destroy.after_intent`, `destroy.after_hsm`.
//!
//! I/O faults ([`io_fault`]) make a call fail instead of aborting, while a file of the point's
//! name exists in the directory `KEYBROKER_FAILPOINT_TRIGGERS` names (always, if it is not set):
//! `audit.write` (each write of a group of audit records), `audit.sync` (every `fdatasync` of
//! the audit log and its journal), `audit.journal` (opening the journal at start-up).

/// The environment variable that arms failpoints.
pub const ENV: &str = "KEYBROKER_FAILPOINTS";

#[cfg(feature = "failpoints")]
fn points() -> &'static std::collections::HashSet<String> {
    static P: std::sync::OnceLock<std::collections::HashSet<String>> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        std::env::var(ENV)
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// The armed failpoints (sorted; always empty without the `failpoints` feature).
pub fn armed() -> Vec<String> {
    #[cfg(feature = "failpoints")]
    {
        let mut v: Vec<String> = points().iter().cloned().collect();
        v.sort();
        v
    }
    #[cfg(not(feature = "failpoints"))]
    Vec::new()
}

/// Whether `KEYBROKER_FAILPOINTS` is set in a build that has no failpoints (it does nothing).
pub fn ignored() -> bool {
    !cfg!(feature = "failpoints") && std::env::var_os(ENV).is_some_and(|v| !v.is_empty())
}

/// Aborts the process if the failpoint `name` is armed.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    if points().contains(name) {
        eprintln!("keybroker: failpoint {name} reached: aborting ({ENV})");
        std::process::abort();
    }
}

/// Does nothing: this build has no failpoints.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// The environment variable naming the directory where a file of an armed I/O fault's name
/// makes it fire.
pub const TRIGGER_ENV: &str = "KEYBROKER_FAILPOINT_TRIGGERS";

/// An injected I/O error if the I/O fault `name` is armed and its trigger holds (see the module
/// docs).
#[cfg(feature = "failpoints")]
pub fn io_fault(name: &str) -> std::io::Result<()> {
    let fires = points().contains(name)
        && std::env::var_os(TRIGGER_ENV)
            .is_none_or(|dir| std::path::Path::new(&dir).join(name).exists());
    if fires {
        return Err(std::io::Error::other(format!("failpoint {name}")));
    }
    Ok(())
}

/// Never fails: this build has no failpoints.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn io_fault(_name: &str) -> std::io::Result<()> {
    Ok(())
}
