//! Test-only crash points. `KEYBROKER_FAILPOINTS=create.after_hsm,purge.after_destroy` makes the
//! broker abort (as `kill -9` would) when it reaches one of the named points, so the tests can
//! prove that every interrupted create/rotate/import/purge/trim is reconciled at the next start.
//! Unset in production; the broker logs a loud warning at start-up if it is set.
//!
//! Points: `create.after_pending`, `create.after_hsm`, `rotate.after_hsm`, `import.after_hsm`,
//! `destroy.after_intent`, `destroy.after_hsm`.

use std::{collections::HashSet, sync::OnceLock};

fn points() -> &'static HashSet<String> {
    static P: OnceLock<HashSet<String>> = OnceLock::new();
    P.get_or_init(|| {
        std::env::var("KEYBROKER_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Whether any failpoint is armed.
pub fn armed() -> Vec<String> {
    let mut v: Vec<String> = points().iter().cloned().collect();
    v.sort();
    v
}

/// Aborts the process if the failpoint `name` is armed.
pub fn hit(name: &str) {
    if points().contains(name) {
        eprintln!("keybroker: failpoint {name} reached: aborting (KEYBROKER_FAILPOINTS)");
        std::process::abort();
    }
}
