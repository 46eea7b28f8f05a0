//! File descriptors: the broker's connections must never take the ones the HSM and the store
//! need.
//!
//! Every client connection costs a descriptor, and so does every file a PKCS #11 module opens
//! (SoftHSM2 opens, locks and reads an object's file on every use of a token object), the
//! metadata store, the audit log and the certificate reloads. When connections take them all,
//! accepts fail with `EMFILE` and — worse — the module cannot open its object files, which
//! looks exactly like the token's storage going away (`docs/src/reliability.md`). So at start
//! the broker reads `RLIMIT_NOFILE` (raising the soft limit to the hard one, as far as
//! [`RAISE_TO`]), logs it, and caps its client connections well below it: a quarter of the
//! limit, and at least [`RESERVE_MIN`] descriptors, stay for the HSM, the store and the rest.
//! A connection over the cap is accepted and closed at once (the client sees the connection
//! reset, and can retry elsewhere) before it can starve the HSM.

/// The fewest descriptors kept out of the connections' reach.
pub const RESERVE_MIN: u64 = 128;
/// The soft limit is raised towards the hard one, but not past this.
pub const RAISE_TO: u64 = 1 << 20;
/// The fewest connections the cap allows, however low the limit (then with a warning).
pub const CONNECTIONS_MIN: usize = 16;

/// The descriptor limit and what the broker makes of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The soft `RLIMIT_NOFILE` in force (after raising it), `None` for unlimited.
    pub limit: Option<u64>,
    /// The hard limit, `None` for unlimited.
    pub hard: Option<u64>,
    /// Most client connections at once on the gRPC listener.
    pub max_connections: usize,
}

/// The connection cap for a descriptor limit: the limit minus a reserve of a quarter of it
/// (at least [`RESERVE_MIN`]), at least [`CONNECTIONS_MIN`]; `configured` may lower it.
pub fn connection_cap(limit: Option<u64>, configured: Option<usize>) -> usize {
    let derived = match limit {
        None => usize::MAX,
        Some(l) => {
            let reserve = (l / 4).max(RESERVE_MIN);
            usize::try_from(l.saturating_sub(reserve)).unwrap_or(usize::MAX)
        }
    };
    configured
        .map_or(derived, |c| c.min(derived))
        .max(CONNECTIONS_MIN)
}

/// Reads `RLIMIT_NOFILE`, raises the soft limit towards the hard one, logs both and the
/// connection cap.
pub fn budget(configured: Option<usize>) -> Budget {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let mut r = getrlimit(Resource::Nofile);
    let target = r.maximum.map_or(RAISE_TO, |h| h.min(RAISE_TO));
    if r.current.is_some_and(|s| s < target) {
        let raised = Rlimit {
            current: Some(target),
            maximum: r.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => r = getrlimit(Resource::Nofile),
            Err(e) => tracing::warn!(error = %e, "cannot raise the soft RLIMIT_NOFILE"),
        }
    }
    let max_connections = connection_cap(r.current, configured);
    let b = Budget {
        limit: r.current,
        hard: r.maximum,
        max_connections,
    };
    let reserved = b.limit.map(|l| l.saturating_sub(max_connections as u64));
    tracing::info!(
        nofile = ?b.limit,
        nofile_hard = ?b.hard,
        max_connections,
        reserved_for_hsm_and_store = ?reserved,
        "file descriptors: client connections are capped below RLIMIT_NOFILE"
    );
    if reserved.is_some_and(|r| r < RESERVE_MIN) {
        tracing::warn!(
            nofile = ?b.limit,
            "RLIMIT_NOFILE is too low to reserve descriptors for the HSM and the store: raise it (ulimit -n, LimitNOFILE=)"
        );
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_a_quarter_of_the_limit_and_at_least_the_minimum() {
        assert_eq!(connection_cap(Some(1024), None), 768);
        assert_eq!(connection_cap(Some(256), None), 128);
        assert_eq!(connection_cap(Some(65536), None), 49152);
        assert_eq!(connection_cap(Some(65536), Some(1000)), 1000);
        assert_eq!(connection_cap(Some(1024), Some(5000)), 768);
        assert_eq!(connection_cap(Some(100), None), CONNECTIONS_MIN);
        assert_eq!(connection_cap(None, None), usize::MAX);
    }
}
