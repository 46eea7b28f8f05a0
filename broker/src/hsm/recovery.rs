//! Recovery from a lost device or token, and from invalid object handles.
//!
//! A call that fails with a device-class fault (`CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`,
//! `CKR_DEVICE_ERROR`, `CKR_CRYPTOKI_NOT_INITIALIZED`, ...) or finds the user logged out starts
//! a recovery thread, unless one runs already or the fault came from a generation that has
//! been replaced. The thread first asks whether the token still answers (`C_GetTokenInfo` and
//! the anchor session's `C_GetSessionInfo`): one failed call can be transient, and then the
//! caller alone gets UNAVAILABLE. If the token does not answer, the HSM is marked unhealthy —
//! every request gets UNAVAILABLE at once, health reports NOT_SERVING — and the thread
//! re-initialises until it works, with backoff from 25 ms doubling to at most 250 ms, so the
//! broker serves again well within a second of the device coming back:
//!
//! 1. retire the current generation (its sessions are forgotten, never closed: see `conn`);
//! 2. let calls in flight finish, for at most [`DRAIN`];
//! 3. `C_Finalize`, `C_Initialize`, find the token again (by the configured selector: its slot
//!    may have changed), open and log in the anchor session, open the pool;
//! 4. re-find every known KEK version in one pass (id and class: the same checks for missing
//!    and duplicated objects as at start-up); find the audit key;
//! 5. install the new generation and report SERVING;
//! 6. check each version's template and prove its identity by unwrapping its canary (DESIGN
//!    §3.3: after every re-login) — lazily, before a version's first use on the new
//!    generation, and in a sweep in the background — so that serving again does not wait for
//!    two attribute reads and one unwrap per version (which takes seconds with thousands of
//!    versions). A version that fails is never served (its
//!    handles are dropped, callers get FAILED_PRECONDITION) and the failure is logged as an
//!    integrity alert.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags},
    error::{Error as CkError, RvError},
};

use cryptoki::session::Session;

use super::{
    AttachReport, FaultKind, HsmError, Inner, canary_verdict, check_template,
    conn::{Check, Conn},
    find_audit_key, find_keks, open_and_login, open_pool, select_token,
};
use crate::model::VersionId;

/// The longest a re-initialisation waits for calls in flight on the old generation. PKCS#11
/// cannot cancel a call: one still hung in the module after this is abandoned.
pub const DRAIN: Duration = Duration::from_secs(2);
/// The first pause between re-initialisation attempts.
const BACKOFF_START: Duration = Duration::from_millis(25);
/// The longest pause between attempts (bounds the time to serve after the device returns).
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// The HSM's health, as published to [`super::Hsm::health`] subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Whether requests are served.
    pub serving: bool,
    /// The generation (initialisation of the module) in use.
    pub generation: u64,
    /// Why not serving (or "ok").
    pub detail: String,
}

impl Health {
    pub(super) fn serving(generation: u64) -> Self {
        Self {
            serving: true,
            generation,
            detail: "ok".into(),
        }
    }
}

impl Inner {
    pub(super) fn set_health(&self, serving: bool, detail: impl Into<String>) {
        let generation = self.current().generation;
        let detail = detail.into();
        self.health.send_if_modified(|h| {
            let new = Health {
                serving,
                generation,
                detail,
            };
            let changed = *h != new;
            *h = new;
            changed
        });
    }

    /// Starts recovery if `e` means the device, the token or the login is gone.
    pub(super) fn note_fault(self: &Arc<Self>, conn: &Conn, e: &HsmError) {
        let lost = match e.kind {
            FaultKind::DeviceLost => true,
            FaultKind::Login => e.rv == Some(RvError::UserNotLoggedIn),
            _ => false,
        };
        if !lost || self.closed.load(Ordering::SeqCst) {
            return;
        }
        if conn.generation != self.current().generation {
            return; // a straggler from a generation already replaced
        }
        if self.recovering.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = self.clone();
        let cause = e.clone();
        let spawned = std::thread::Builder::new()
            .name("hsm-recovery".into())
            .spawn(move || inner.recover(cause));
        if let Err(err) = spawned {
            self.recovering.store(false, Ordering::SeqCst);
            tracing::error!(error = %err, "cannot start the HSM recovery thread");
        }
    }

    /// Whether the token still answers on the current generation.
    fn answers(&self) -> bool {
        let conn = self.current();
        !conn.retired() && self.ctx.get_token_info(conn.slot).is_ok() && conn.anchor_answers()
    }

    fn recover(self: Arc<Self>, cause: HsmError) {
        let answers = {
            // Not while a shutdown finalises the module.
            let _reinit = self.reinit_lock.lock().unwrap_or_else(|p| p.into_inner());
            !self.closed.load(Ordering::SeqCst) && self.answers()
        };
        if self.closed.load(Ordering::SeqCst) {
            self.recovering.store(false, Ordering::SeqCst);
            return;
        }
        if answers {
            tracing::warn!(context = %cause.context, detail = %cause.detail,
                "an HSM call reported a device fault, but the token still answers: not re-initialising");
            self.recovering.store(false, Ordering::SeqCst);
            return;
        }
        tracing::error!(context = %cause.context, detail = %cause.detail,
            "HSM device or token lost: requests get UNAVAILABLE; re-initialising in the background");
        self.set_health(false, format!("{cause}"));
        let started = Instant::now();
        let mut delay = BACKOFF_START;
        let mut attempt = 0u32;
        while !self.closed.load(Ordering::SeqCst) {
            attempt += 1;
            let t = Instant::now();
            match self.reinitialise() {
                Ok(report) => {
                    self.reinitialisations.fetch_add(1, Ordering::Relaxed);
                    self.set_health(true, "ok");
                    tracing::warn!(
                        attempts = attempt,
                        outage_ms = started.elapsed().as_millis() as u64,
                        reinit_ms = t.elapsed().as_millis() as u64,
                        generation = self.current().generation,
                        keks = report.attached,
                        problems = report.problems.len(),
                        "HSM re-initialised: serving again"
                    );
                    self.sweep_canaries();
                    break;
                }
                Err(e) => {
                    if attempt == 1 || attempt.is_multiple_of(20) {
                        tracing::warn!(attempt, error = %e, "HSM re-initialisation failed; retrying with backoff");
                    }
                }
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(BACKOFF_MAX);
        }
        self.recovering.store(false, Ordering::SeqCst);
    }

    /// One re-initialisation attempt (see the module docs).
    fn reinitialise(self: &Arc<Self>) -> Result<AttachReport, HsmError> {
        let _reinit = self.reinit_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(Ordering::SeqCst) {
            return Err(HsmError::refused(
                FaultKind::DeviceLost,
                "re-initialise the HSM",
                "the HSM is closed (shutting down)",
            ));
        }
        let old = self.current();
        let old_retired = Instant::now();
        let (idle, anchor) = old.retire();
        // C_Finalize releases them inside the module; closing them after a re-initialisation
        // could close someone else's session.
        for s in idle {
            std::mem::forget(s);
        }
        if let Some(a) = anchor {
            std::mem::forget(a);
        }
        let until = Instant::now() + DRAIN;
        while self.admission.stats().in_use > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        let busy = self.admission.stats().in_use;
        if busy > 0 {
            tracing::warn!(
                calls = busy,
                "re-initialising the HSM while calls are still inside the module (they are abandoned)"
            );
        }
        let drained = Instant::now();
        if let Err(e) = self.ctx.clone().finalize() {
            tracing::debug!(error = %HsmError::from_ck("C_Finalize", e), "C_Finalize before re-initialising");
        }
        match self
            .ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(HsmError::from_ck("C_Initialize", e)),
        }
        let (slot, _) = select_token(&self.ctx, &self.token)?;
        let initialised = Instant::now();
        let anchor = open_and_login(&self.ctx, slot, &self.pin)?;
        let idle = open_pool(&self.ctx, slot, self.pool_size)?;
        let logged_in = Instant::now();
        let conn = Conn::new(old.generation + 1, slot, idle, anchor);
        let expected: Vec<_> = self
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let s = conn.checkout(&self.ctx, "re-find the KEKs")?;
        let found = find_keks(self, &s, &expected, false);
        let audit_id = *self.audit_key_id.lock().unwrap_or_else(|p| p.into_inner());
        let audit = audit_id.map(|id| find_audit_key(&s, id));
        conn.checkin(s);
        let (report, handles) = found?;
        tracing::warn!(
            drain_ms = (drained - old_retired).as_millis() as u64,
            initialise_ms = (initialised - drained).as_millis() as u64,
            login_ms = (logged_in - initialised).as_millis() as u64,
            find_ms = logged_in.elapsed().as_millis() as u64,
            versions = expected.len(),
            "re-initialisation phases"
        );
        for (id, why) in &report.problems {
            tracing::error!(version_id = %id, problem = %why,
                "KEK integrity check failed after re-initialising the HSM: this version is not served");
        }
        // Templates and identities are checked before first use and by the sweep (see the
        // module docs).
        conn.set_unchecked(
            expected
                .iter()
                .filter(|e| handles.contains_key(&e.id))
                .map(|e| e.id),
        );
        *conn.handles.write().unwrap_or_else(|p| p.into_inner()) = handles;
        match audit {
            Some(Ok(h)) => *conn.audit_key.write().unwrap_or_else(|p| p.into_inner()) = Some(h),
            Some(Err(e)) => {
                tracing::error!(error = %e, "the audit key was not found after re-initialising the HSM: checkpoints fail until it is");
            }
            None => {}
        }
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(conn);
        Ok(report)
    }

    /// Re-finds every known KEK's objects on `conn` (after `CKR_OBJECT_HANDLE_INVALID` and
    /// friends), unless another caller did since `epoch`.
    pub(super) fn refresh_handles(&self, conn: &Conn, epoch: u64) -> Result<(), HsmError> {
        let mut current = conn.handle_epoch.lock().unwrap_or_else(|p| p.into_inner());
        if *current != epoch {
            return Ok(());
        }
        let expected: Vec<_> = self
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let s = conn.checkout(&self.ctx, "re-find the KEKs")?;
        let found = find_keks(self, &s, &expected, true);
        let audit_id = *self.audit_key_id.lock().unwrap_or_else(|p| p.into_inner());
        let audit = audit_id.map(|id| find_audit_key(&s, id));
        match &found {
            Err(e) if e.kind == FaultKind::SessionLost => conn.discard(s),
            _ => conn.checkin(s),
        }
        let (report, handles) = found?;
        for (id, why) in &report.problems {
            tracing::error!(version_id = %id, problem = %why,
                "KEK integrity check failed while re-finding objects: this version is not served");
        }
        // A version whose object is not the one it had (another handle, or newly found) must
        // prove its identity again before use: the object behind an id can have been replaced.
        let changed: Vec<VersionId> = {
            let old = conn.handles.read().unwrap_or_else(|p| p.into_inner());
            handles
                .iter()
                .filter(|(id, h)| old.get(*id) != Some(*h))
                .map(|(id, _)| *id)
                .collect()
        };
        conn.set_unchecked(changed);
        *conn.handles.write().unwrap_or_else(|p| p.into_inner()) = handles;
        if let Some(Ok(h)) = audit {
            *conn.audit_key.write().unwrap_or_else(|p| p.into_inner()) = Some(h);
        }
        *current += 1;
        tracing::warn!(
            keks = report.attached,
            "re-found the KEK objects after an invalid object handle"
        );
        Ok(())
    }

    /// Proves that `id`'s object is the key the version was created with (its canary), if this
    /// generation has not yet. A version that fails loses its handles for good.
    pub(super) fn ensure_verified(
        &self,
        conn: &Conn,
        s: &Session,
        id: VersionId,
    ) -> Result<(), HsmError> {
        let failed = |why: &str| {
            HsmError::new(
                FaultKind::NotPermitted,
                "prove a KEK's identity",
                format!("version {id} failed its integrity check after re-initialisation: {why}"),
            )
        };
        match conn.check_of(id) {
            None => return Ok(()),
            Some(Check::Failed(why)) => return Err(failed(&why)),
            Some(Check::Pending) => {}
        }
        let expected = self
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        let (Some(e), Ok(h)) = (expected, conn.handles_of(id)) else {
            conn.set_verdict(id, None);
            return Ok(());
        };
        let verdict = match self.caps.mechanism_for(e.algorithm) {
            None => Some(format!(
                "the token cannot serve its algorithm: {}",
                self.caps.why_not(e.algorithm)
            )),
            Some(mech) => {
                let problems = check_template(s, &h, e.algorithm, mech, e.origin)?;
                if !problems.is_empty() {
                    Some(format!("wrong template: {}", problems.join("; ")))
                } else if let Some(c) = &e.canary {
                    canary_verdict(self, s, &h, c)?
                } else {
                    None
                }
            }
        };
        conn.set_verdict(id, verdict.clone());
        match verdict {
            None => Ok(()),
            Some(why) => {
                tracing::error!(version_id = %id, problem = %why,
                    "KEK integrity check failed after re-initialising the HSM: this version is not served");
                Err(failed(&why))
            }
        }
    }

    /// Proves every version not yet proven on the current generation (after a
    /// re-initialisation, while requests are served again).
    fn sweep_canaries(&self) {
        // Its session is outside admission, so a shutdown waits for it here (see `close`);
        // it stops early once the HSM is closed.
        let _reinit = self.reinit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let conn = self.current();
        let ids = conn.unchecked();
        if ids.is_empty() {
            return;
        }
        let t = Instant::now();
        let s = match conn.checkout(&self.ctx, "prove the KEKs' identities") {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot sweep the KEK canaries now; they are checked before first use");
                return;
            }
        };
        let (mut failed, n) = (0, ids.len());
        for id in ids {
            if self.closed.load(Ordering::SeqCst) {
                break;
            }
            match self.ensure_verified(&conn, &s, id) {
                Ok(()) => {}
                Err(e) if e.kind == FaultKind::NotPermitted => failed += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "the KEK canary sweep stopped; the rest are checked before first use");
                    conn.discard(s);
                    return;
                }
            }
        }
        conn.checkin(s);
        tracing::info!(
            versions = n,
            failed,
            millis = t.elapsed().as_millis() as u64,
            "KEK identities proven after re-initialising the HSM"
        );
    }
}
