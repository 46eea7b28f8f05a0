//! One initialisation of the PKCS#11 module: its slot, its logged-in anchor session, its pool
//! of idle sessions and the object handles found through it.
//!
//! Session and object handles are numbers that mean something only within one initialisation
//! of the module: after `C_Finalize` and `C_Initialize` the module may hand the same numbers
//! out again for other sessions and objects. So everything that holds such a number lives here,
//! and a re-initialisation replaces the whole [`Conn`] (a new *generation*) instead of patching
//! it. An old `Conn` is *retired* first: from then on its sessions are never closed (closing a
//! stale number after the re-initialisation could close someone else's new session) — they are
//! forgotten, and `C_Finalize` has already released them inside the module.

use std::{
    collections::HashMap,
    sync::{
        Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use cryptoki::{
    context::Pkcs11,
    object::ObjectHandle,
    session::{Session, SessionState},
    slot::Slot,
};

use super::{FaultKind, HsmError, KekHandles, KwpMechanism, WrapParams};
use crate::model::VersionId;

/// Whether a version's identity is proven on this generation.
#[derive(Clone, Debug)]
pub(super) enum Check {
    /// Not checked yet.
    Pending,
    /// Its canary failed: never served on this generation.
    Failed(String),
}

struct Pool {
    idle: Vec<Session>,
    retired: bool,
}

/// The sessions and handles of one initialisation of the module.
pub(super) struct Conn {
    /// Counts initialisations: 1 at start-up, +1 per re-initialisation.
    pub(super) generation: u64,
    pub(super) slot: Slot,
    /// Idle sessions. A std mutex: held only to push/pop (and to close a lost session, so a
    /// retirement cannot interleave), never across an operation.
    pool: Mutex<Pool>,
    /// Kept open for the life of the generation: object handles die when an application's last
    /// session closes (docs/src/hsm-notes.md), and the login belongs to the application.
    anchor: Mutex<Option<Session>>,
    pub(super) handles: RwLock<HashMap<VersionId, KekHandles>>,
    /// The audit trail's HMAC key.
    pub(super) audit_key: RwLock<Option<ObjectHandle>>,
    /// Bumped each time the handles are re-found (so concurrent callers refresh once).
    pub(super) handle_epoch: Mutex<u64>,
    /// Versions whose identity (canary) is not proven on this generation yet, or failed: after
    /// a re-initialisation they are checked before first use and swept in the background.
    checks: Mutex<HashMap<VersionId, Check>>,
    /// Whether `checks` may be non-empty (the hot path skips the lock when not).
    any_checks: AtomicBool,
    /// Whether the pass that re-finds every known version's objects after a
    /// re-initialisation is still running: meanwhile a version with no cached handles is
    /// looked up by its own `CKA_ID` before its first use (see `recovery`).
    resolving: AtomicBool,
    /// Held by the one lookup by id allowed at a time while `resolving`: each is a scan of the
    /// whole token (~15 µs per object on SoftHSM2), so many at once would cost more than the
    /// pass they stand in for and take every session from the keys that are ready.
    pub(super) lookup: Mutex<()>,
    /// When the pass over the token re-finding every version started, while it runs.
    pass_started: Mutex<Option<Instant>>,
    /// Whether the pass gave up on this generation (its session or its searches kept
    /// failing): lookups by id then judge a version whose objects are missing themselves, as
    /// no pass will.
    pass_abandoned: AtomicBool,
}

impl Conn {
    pub(super) fn new(generation: u64, slot: Slot, idle: Vec<Session>, anchor: Session) -> Self {
        Self {
            generation,
            slot,
            pool: Mutex::new(Pool {
                idle,
                retired: false,
            }),
            anchor: Mutex::new(Some(anchor)),
            handles: RwLock::new(HashMap::new()),
            audit_key: RwLock::new(None),
            handle_epoch: Mutex::new(0),
            checks: Mutex::new(HashMap::new()),
            any_checks: AtomicBool::new(false),
            resolving: AtomicBool::new(false),
            lookup: Mutex::new(()),
            pass_started: Mutex::new(None),
            pass_abandoned: AtomicBool::new(false),
        }
    }

    /// Whether the pass re-finding every version gave up on this generation.
    pub(super) fn pass_abandoned(&self) -> bool {
        self.pass_abandoned.load(Ordering::SeqCst)
    }

    pub(super) fn set_pass_abandoned(&self) {
        self.pass_abandoned.store(true, Ordering::SeqCst);
    }

    /// Whether this generation's handles are still being re-found (see [`Conn::resolving`]).
    pub(super) fn resolving(&self) -> bool {
        self.resolving.load(Ordering::SeqCst)
    }

    pub(super) fn set_resolving(&self, on: bool) {
        self.resolving.store(on, Ordering::SeqCst);
    }

    /// When the running pass over the token started (see `recovery`), if one runs.
    pub(super) fn pass_started(&self) -> Option<Instant> {
        *self.pass_started.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn set_pass_started(&self, at: Option<Instant>) {
        *self.pass_started.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }

    fn checks(&self) -> std::sync::MutexGuard<'_, HashMap<VersionId, Check>> {
        self.checks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks versions as not yet proven on this generation.
    pub(super) fn set_unchecked(&self, ids: impl IntoIterator<Item = VersionId>) {
        let mut c = self.checks();
        c.extend(ids.into_iter().map(|id| (id, Check::Pending)));
        self.any_checks.store(!c.is_empty(), Ordering::SeqCst);
    }

    /// Where `id` stands: `None` proven (or never in doubt).
    pub(super) fn check_of(&self, id: VersionId) -> Option<Check> {
        if !self.any_checks.load(Ordering::SeqCst) {
            return None;
        }
        self.checks().get(&id).cloned()
    }

    /// Records the verdict on `id`: proven (`None`) or failed (why).
    pub(super) fn set_verdict(&self, id: VersionId, failed: Option<String>) {
        let mut c = self.checks();
        match failed {
            None => {
                c.remove(&id);
            }
            Some(why) => {
                c.insert(id, Check::Failed(why));
            }
        }
        self.any_checks.store(!c.is_empty(), Ordering::SeqCst);
    }

    /// The versions still to prove.
    pub(super) fn unchecked(&self) -> Vec<VersionId> {
        self.checks()
            .iter()
            .filter(|(_, c)| matches!(c, Check::Pending))
            .map(|(id, _)| *id)
            .collect()
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this generation has been replaced (or is being).
    pub(super) fn retired(&self) -> bool {
        self.pool().retired
    }

    /// An idle session, or a new one when none is idle.
    pub(super) fn checkout(&self, ctx: &Pkcs11, what: &'static str) -> Result<Session, HsmError> {
        {
            let mut p = self.pool();
            if p.retired {
                return Err(HsmError::new(
                    FaultKind::DeviceLost,
                    what,
                    "the HSM connection is being re-initialised",
                ));
            }
            if let Some(s) = p.idle.pop() {
                return Ok(s);
            }
        }
        ctx.open_rw_session(self.slot)
            .map_err(|e| HsmError::from_ck(format!("{what}: open a session"), e))
    }

    /// Returns a session to the pool (or forgets it if this generation is retired).
    pub(super) fn checkin(&self, s: Session) {
        let mut p = self.pool();
        if p.retired {
            std::mem::forget(s);
        } else {
            p.idle.push(s);
        }
    }

    /// Evicts a lost session: closes it (harmless if the module already dropped it), unless
    /// this generation is retired.
    pub(super) fn discard(&self, s: Session) {
        let p = self.pool();
        if p.retired {
            std::mem::forget(s);
        } else {
            drop(s);
        }
        drop(p);
    }

    /// Marks this generation retired and hands back its sessions (idle ones and the anchor).
    pub(super) fn retire(&self) -> (Vec<Session>, Option<Session>) {
        let idle = {
            let mut p = self.pool();
            p.retired = true;
            std::mem::take(&mut p.idle)
        };
        let anchor = self.anchor.lock().unwrap_or_else(|p| p.into_inner()).take();
        (idle, anchor)
    }

    /// Whether the anchor session still answers `C_GetSessionInfo` and is still logged in as
    /// the user (a token reset can keep the session but drop the login).
    pub(super) fn anchor_answers(&self) -> bool {
        self.anchor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|a| a.get_session_info().ok())
            .is_some_and(|i| {
                matches!(
                    i.session_state(),
                    SessionState::RwUser | SessionState::RoUser
                )
            })
    }

    pub(super) fn handle_epoch(&self) -> u64 {
        *self.handle_epoch.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn handles_of(&self, id: VersionId) -> Result<KekHandles, HsmError> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied()
            .ok_or_else(|| {
                HsmError::new(
                    FaultKind::HandleInvalid,
                    "find a KEK",
                    format!("no attached HSM object for version {id}"),
                )
            })
    }

    pub(super) fn audit_handle(&self) -> Result<ObjectHandle, HsmError> {
        self.audit_key
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| {
                HsmError::new(FaultKind::Setup, "audit key", "the audit key is not loaded")
            })
    }

    /// The handle to use for `params` (public key for RSA wraps) and the RFC 5649 mechanism.
    pub(super) fn key_for(
        &self,
        kwp: Option<KwpMechanism>,
        id: VersionId,
        params: &WrapParams,
        wrapping: bool,
    ) -> Result<(ObjectHandle, KwpMechanism), HsmError> {
        let h = self.handles_of(id)?;
        let kwp = match (params, kwp) {
            (WrapParams::Kwp, None) => {
                return Err(HsmError::new(
                    FaultKind::NotPermitted,
                    "AES key wrap",
                    "the token has no usable RFC 5649 mechanism",
                ));
            }
            (_, k) => k.unwrap_or(KwpMechanism::Pad),
        };
        let handle = match (params, wrapping) {
            (WrapParams::OaepSha256 | WrapParams::OaepSha1, true) => h.public.ok_or_else(|| {
                HsmError::new(FaultKind::Other, "RSA wrap", "no public key object cached")
            })?,
            _ => h.secret,
        };
        Ok((handle, kwp))
    }

    /// Closes every idle session and the anchor (which logs out), for a clean shutdown.
    /// Returns how many sessions were closed.
    pub(super) fn close_all(&self) -> usize {
        let (idle, anchor) = self.retire();
        let mut n = 0;
        for s in idle {
            n += usize::from(s.close().is_ok());
        }
        if let Some(a) = anchor {
            let _ = a.logout();
            n += usize::from(a.close().is_ok());
        }
        n
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Never close sessions here: whether the module was re-initialised since is unknown
        // (see the module docs). A clean shutdown closes them first (`close_all`).
        let (idle, anchor) = self.retire();
        for s in idle {
            std::mem::forget(s);
        }
        if let Some(a) = anchor {
            std::mem::forget(a);
        }
    }
}
