//! Recovery from a lost device or token, and from invalid object handles.
//!
//! A call that fails with a device-class fault (`CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`,
//! `CKR_DEVICE_ERROR`, `CKR_CRYPTOKI_NOT_INITIALIZED`, ...) or finds the user logged out starts
//! a recovery thread, unless one runs already or the fault came from a generation that has
//! been replaced. The thread first asks whether the token still answers (`C_GetTokenInfo` and
//! the anchor session's `C_GetSessionInfo`): one failed call can be transient, and then the
//! caller alone gets UNAVAILABLE. If the token does not answer, the HSM is marked unhealthy —
//! every request gets UNAVAILABLE at once, health reports NOT_SERVING — and the thread
//! re-initialises until it works, with backoff from 25 ms doubling to at most 100 ms, so the
//! broker serves again well within a second of the device coming back:
//!
//! 1. retire the current generation (its sessions are forgotten, never closed: see `conn`);
//! 2. let calls in flight finish, for at most [`DRAIN`];
//! 3. `C_Finalize`, `C_Initialize`, find the token again (by the configured selector: its slot
//!    may have changed), open and log in the anchor session, open the pool;
//! 4. install the new generation and report SERVING — before any object is looked up, so the
//!    outage does not grow with the number of keys (a pass over a token of 6,500 versions
//!    takes over a second on SoftHSM2: two attribute reads per object, each re-checking the
//!    object's file);
//! 5. re-find every known KEK version in one pass over the token, in the background (id and
//!    class: the same checks for missing and duplicated objects as at start-up), and the audit
//!    key. Until the pass is done, a version asked for that it has not reached is looked up by
//!    its own `CKA_ID` (one search, with the same checks) and cached — one such lookup at a
//!    time (each scans the whole token); a request that would need a second one meanwhile waits
//!    for it or for the pass (at most [`LOOKUP_WAIT`], then UNAVAILABLE). A lookup starts only
//!    if it is expected to end before the pass does ([`pass_is_sooner`], from the measured
//!    durations of the last pass and the last lookup): on a token where every search reads
//!    every object (SoftHSM2: a lookup costs a quarter of the pass over 13,600 objects),
//!    lookups late in the pass would only slow it down for everyone; on one that finds an id
//!    without reading every object (a hardware HSM), the pass costs thousands of lookups and
//!    each request goes on looking its version up;
//! 6. check each version's template and prove its identity by unwrapping its canary (DESIGN
//!    §3.3: after every re-login) — lazily, before a version's first use on the new
//!    generation, and in a sweep in the background after the pass. A version that fails any
//!    check is never served on the generation (callers get FAILED_PRECONDITION) and the
//!    failure is logged as an integrity alert.
//!
//! **Storage loss.** Every key object vanishing at once — SoftHSM2's token directory moved
//! away, or the process out of descriptors so the module cannot open its object files — is a
//! storage or device fault, not tampering with each key: the module answers
//! `CKR_OBJECT_HANDLE_INVALID` and a search finds nothing, while `C_GetTokenInfo` still
//! answers. When a pass over the token (after an invalid handle, or after a re-initialisation)
//! finds no key object at all while the broker expects some ([`AttachReport::storage_lost`]),
//! no version gets an integrity verdict: the HSM is marked unhealthy at once (UNAVAILABLE,
//! NOT_SERVING) and recovery re-initialises with the same backoff — and, this time, installs a
//! generation only once the objects are found again (a few known versions looked up by their
//! ids: one found is enough), so the broker serves by itself as soon as the storage is back,
//! however many keys it holds; the pass over every version then runs behind it, as after a
//! lost device (and if it finds no object after all, the storage is lost again). Tampering with one key (its object deleted, duplicated or replaced
//! while the others are there) still fails that key closed.

use std::{
    collections::HashMap,
    sync::{Arc, TryLockError, atomic::Ordering},
    time::{Duration, Instant},
};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags},
    error::{Error as CkError, RvError},
    object::ObjectHandle,
    session::Session,
};

use super::{
    AttachReport, ExpectedKek, FaultKind, HsmError, Inner, KekHandles,
    conn::{Check, Conn},
    mac::find_audit_key,
    objects::{NOTHING_FOUND, canary_verdict, check_template, find_keks, find_one},
    token::{open_and_login, open_pool, select_token},
};
use crate::model::VersionId;

/// The longest a re-initialisation waits for calls in flight on the old generation. PKCS#11
/// cannot cancel a call: one still hung in the module after this is abandoned.
pub const DRAIN: Duration = Duration::from_secs(2);
/// The longest a request waits for another's lookup by id, or for the pass over the token,
/// to find its version after a re-initialisation (then UNAVAILABLE: retry).
const LOOKUP_WAIT: Duration = Duration::from_secs(5);
/// The first pause between re-initialisation attempts.
const BACKOFF_START: Duration = Duration::from_millis(25);
/// The longest pause between attempts (bounds the time to serve after the device returns).
const BACKOFF_MAX: Duration = Duration::from_millis(100);
/// How many known versions a re-initialisation after a storage loss looks up by id to decide
/// that the key objects are back (one found is enough; a version deleted meanwhile must not
/// keep the broker down).
const STORAGE_PROBES: usize = 3;

/// How long the last pass over the token and the last lookup of one version by its id took
/// (see [`pass_is_sooner`]).
#[derive(Debug, Default)]
pub(super) struct SearchCosts {
    pub(super) pass: Option<Duration>,
    pub(super) lookup: Option<Duration>,
}

/// Whether a request should wait for the pass over the token, running for `elapsed`, rather
/// than look its version up by id: when the pass (expected to take `pass`, like the last one)
/// is due before a lookup (expected to take `lookup`) would end. A pass that overruns its
/// expected time by more than half again is not waited for: lookups resume.
pub(super) fn pass_is_sooner(elapsed: Duration, pass: Duration, lookup: Duration) -> bool {
    elapsed <= pass + pass / 2 && pass.saturating_sub(elapsed) <= lookup
}

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
        self.spawn_recovery(e.clone(), false);
    }

    /// Every key object is gone at once (see the module docs): marks the HSM unhealthy now and
    /// starts a recovery that re-initialises until the objects are found again. Returns the
    /// error for the caller (UNAVAILABLE: retry).
    pub(super) fn note_storage_lost(self: &Arc<Self>) -> HsmError {
        let e = HsmError::new(FaultKind::DeviceLost, "find the KEKs", STORAGE_LOST);
        if !self.closed.load(Ordering::SeqCst) && !self.recovering.swap(true, Ordering::SeqCst) {
            self.set_health(false, STORAGE_LOST);
            self.spawn_recovery(e.clone(), true);
        }
        e
    }

    /// Runs [`Inner::recover`] on its own thread (`recovering` is already set).
    fn spawn_recovery(self: &Arc<Self>, cause: HsmError, storage: bool) {
        let inner = self.clone();
        let spawned = std::thread::Builder::new()
            .name("hsm-recovery".into())
            .spawn(move || inner.recover(cause, storage));
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

    /// Re-initialises until it works. With `storage` (every key object was gone), the token
    /// is not asked whether it answers (it does: its storage is what failed), and a generation
    /// is installed only once a pass over the token finds the key objects again.
    fn recover(self: Arc<Self>, cause: HsmError, mut storage: bool) {
        let answers = !storage && {
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
        if storage {
            tracing::error!(context = %cause.context, detail = %cause.detail,
                "HSM storage lost: every key object is gone at once (a storage or device fault, \
                 not tampering): requests get UNAVAILABLE; re-initialising in the background \
                 until the objects are back");
        } else {
            tracing::error!(context = %cause.context, detail = %cause.detail,
                "HSM device or token lost: requests get UNAVAILABLE; re-initialising in the background");
        }
        self.set_health(false, format!("{cause}"));
        let started = Instant::now();
        let mut delay = BACKOFF_START;
        let mut attempt = 0u32;
        while !self.closed.load(Ordering::SeqCst) {
            attempt += 1;
            let t = Instant::now();
            match self.reinitialise(storage) {
                Ok(versions) => {
                    self.reinitialisations.fetch_add(1, Ordering::Relaxed);
                    self.set_health(true, "ok");
                    tracing::warn!(
                        attempts = attempt,
                        outage_ms = started.elapsed().as_millis() as u64,
                        reinit_ms = t.elapsed().as_millis() as u64,
                        generation = self.current().generation,
                        versions,
                        "HSM re-initialised: serving again"
                    );
                    if self.refind() {
                        // The module came back without the objects: a storage fault after all.
                        storage = true;
                        self.set_health(false, STORAGE_LOST);
                        tracing::error!(
                            "HSM storage lost: the re-initialised token holds none of the key \
                             objects; re-initialising again until they are back"
                        );
                    } else {
                        self.sweep_canaries();
                        break;
                    }
                }
                Err(e) => {
                    if e.kind == FaultKind::Login {
                        self.set_health(false, format!("{e}"));
                    }
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

    /// One re-initialisation attempt (see the module docs). With `storage`, the new generation
    /// is installed only if a pass over the token finds key objects (and with their handles).
    /// Returns how many known versions are to be found again.
    fn reinitialise(self: &Arc<Self>, storage: bool) -> Result<usize, HsmError> {
        let _reinit = self.reinit_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(Ordering::SeqCst) {
            return Err(HsmError::refused(
                FaultKind::DeviceLost,
                "re-initialise the HSM",
                "the HSM is closed (shutting down)",
            ));
        }
        // Before touching the module: a PIN the token refused is not tried again.
        let pin = self.pin_for_login()?;
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
        let (slot, _, _) = select_token(&self.ctx, &self.token)?;
        let initialised = Instant::now();
        let anchor = open_and_login(&self.ctx, slot, &pin).inspect_err(|e| {
            self.login_failed(&pin, e);
        })?;
        let idle = open_pool(&self.ctx, slot, self.pool_size)?;
        let logged_in = Instant::now();
        let conn = Conn::new(old.generation + 1, slot, idle, anchor);
        // Serve at once: the handles are re-found by a pass over the token after the new
        // generation is installed (`refind`), and a version asked for before the pass reaches
        // it is looked up by its own id. Every known version proves its template and identity
        // again before its first use either way.
        let known: Vec<VersionId> = self
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        conn.set_resolving(true);
        conn.set_unchecked(known.iter().copied());
        if storage {
            // After a storage loss, serve only once the objects are back. A few known versions
            // looked up by their ids say so (one search each), so the return to service does
            // not wait for a pass over every version: that pass runs after the generation is
            // installed (`refind`), as after a lost device, and a version asked for before it
            // gets there is looked up by its own id; each is proven before its first use.
            let s = conn.checkout(&self.ctx, "re-find the KEKs")?;
            let back = match self.storage_back(&conn, &s) {
                Ok(back) => back,
                Err(e) => {
                    conn.checkin(s);
                    return Err(e);
                }
            };
            if !back {
                conn.checkin(s);
                return Err(HsmError::new(
                    FaultKind::DeviceLost,
                    "re-initialise the HSM",
                    "the token answers, but its key objects are still missing",
                ));
            }
            if let Err(e) = self.audit_handle(&conn, &s) {
                tracing::error!(error = %e, "the audit key was not found after the storage came back: checkpoints fail until it is");
            }
            conn.checkin(s);
        }
        tracing::warn!(
            drain_ms = (drained - old_retired).as_millis() as u64,
            initialise_ms = (initialised - drained).as_millis() as u64,
            login_ms = logged_in.duration_since(initialised).as_millis() as u64,
            versions = known.len(),
            "re-initialisation phases"
        );
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(conn);
        Ok(known.len())
    }

    /// Whether the token's key objects are back after a storage loss: up to
    /// [`STORAGE_PROBES`] known versions are looked up by their ids, and one found (its
    /// handles cached on `conn`) is enough. With no version known there is nothing to wait for.
    fn storage_back(&self, conn: &Conn, s: &Session) -> Result<bool, HsmError> {
        let probes: Vec<ExpectedKek> = self
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .take(STORAGE_PROBES)
            .cloned()
            .collect();
        if probes.is_empty() {
            return Ok(true);
        }
        for e in &probes {
            let t = Instant::now();
            let found = find_one(s, e)?;
            self.search_costs().lookup = Some(t.elapsed());
            if let Ok(h) = found {
                conn.handles
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(e.id, h);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// After a re-initialisation, while requests are served: re-finds every known version's
    /// objects in one pass over the token (the same checks for missing and duplicated objects
    /// as at start-up) and the audit key, then ends the per-version lookups. Returns true if
    /// the pass found no key object at all (a storage fault: nothing is marked failed).
    fn refind(&self) -> bool {
        // Its session is outside admission, so a shutdown waits for it here (see `close`);
        // `find_keks` stops early once the HSM is closed.
        let _reinit = self.reinit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let conn = self.current();
        let t = Instant::now();
        for attempt in 1..=3u64 {
            if self.closed.load(Ordering::SeqCst) || !conn.resolving() || conn.retired() {
                return false;
            }
            let expected = self.known_all();
            let s = match conn.checkout(&self.ctx, "re-find the KEKs") {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot re-find the KEK objects now; each is looked up before its first use");
                    conn.set_pass_abandoned();
                    return false;
                }
            };
            let pass = Instant::now();
            conn.set_pass_started(Some(pass));
            let found = find_keks(self, &s, &expected, false);
            conn.set_pass_started(None);
            if found.is_ok() {
                self.search_costs().pass = Some(pass.elapsed());
            }
            if conn.audit_handle().is_err()
                && let Err(e) = self.audit_handle(&conn, &s)
            {
                tracing::error!(error = %e, "the audit key was not found after re-initialising the HSM: checkpoints fail until it is");
            }
            match found {
                Ok((report, handles)) => {
                    conn.checkin(s);
                    if report.storage_lost(expected.len()) {
                        return true;
                    }
                    self.merge_found(&conn, &expected, &report, handles);
                    conn.set_resolving(false);
                    tracing::warn!(
                        versions = expected.len(),
                        problems = report.problems.len(),
                        find_ms = t.elapsed().as_millis() as u64,
                        "KEK objects re-found after re-initialising the HSM"
                    );
                    return false;
                }
                Err(e) => {
                    conn.discard(s);
                    tracing::warn!(attempt, error = %e, "re-finding the KEK objects failed; each is looked up before its first use meanwhile");
                    std::thread::sleep(Duration::from_millis(100 * attempt));
                }
            }
        }
        conn.set_pass_abandoned();
        tracing::error!(
            "re-finding the KEK objects gave up after 3 attempts: until the next re-initialisation each version is looked up, and judged, before its first use"
        );
        false
    }

    /// Installs handles found by a pass over the token for the versions in `expected` (those
    /// still known: one destroyed meanwhile stays gone). A version whose handle changed must
    /// prove its identity again (the object behind an id can have been replaced); one with a
    /// problem (missing, duplicated, wrong template) is never served on this generation.
    fn merge_found(
        &self,
        conn: &Conn,
        expected: &[ExpectedKek],
        report: &AttachReport,
        found: HashMap<VersionId, KekHandles>,
    ) {
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        let mut changed = Vec::new();
        {
            let mut handles = conn.handles.write().unwrap_or_else(|p| p.into_inner());
            for e in expected.iter().filter(|e| known.contains_key(&e.id)) {
                match found.get(&e.id) {
                    Some(h) => {
                        if handles.insert(e.id, *h) != Some(*h) {
                            changed.push(e.id);
                        }
                    }
                    None => {
                        handles.remove(&e.id);
                    }
                }
            }
        }
        conn.set_unchecked(changed);
        for (id, why) in report
            .problems
            .iter()
            .filter(|(id, _)| known.contains_key(id))
        {
            tracing::error!(version_id = %id, problem = %why,
                "KEK integrity check failed while re-finding objects: this version is not served");
            conn.set_verdict(*id, Some(why.clone()));
        }
    }

    /// A version's handles on `conn`; while the re-find after a re-initialisation runs, a
    /// version it has not reached yet is looked up by its own id (and cached). Missing or
    /// duplicated objects fail the version for this generation (FAILED_PRECONDITION).
    fn handles_for(
        &self,
        conn: &Conn,
        s: &Session,
        id: VersionId,
    ) -> Result<Option<KekHandles>, HsmError> {
        if let Ok(h) = conn.handles_of(id) {
            return Ok(Some(h));
        }
        if !conn.resolving() {
            return Ok(None);
        }
        let expected = self.known_one(id);
        let Some(e) = expected else {
            return Ok(None);
        };
        // One lookup at a time; the others wait for it, or for the pass, to find their version
        // (holding their sessions: right after a re-initialisation nearly every request is in
        // the same position, and a refusal only makes the caller retry).
        let started = Instant::now();
        let _one = loop {
            if let Ok(h) = conn.handles_of(id) {
                return Ok(Some(h));
            }
            if let Some(Check::Failed(why)) = conn.check_of(id) {
                return Err(integrity_failed(id, &why));
            }
            if !conn.resolving() {
                return Ok(None);
            }
            if !self.pass_due_first(conn) {
                match conn.lookup.try_lock() {
                    Ok(g) => break g,
                    Err(TryLockError::Poisoned(p)) => break p.into_inner(),
                    Err(TryLockError::WouldBlock) => {}
                }
            }
            if started.elapsed() >= LOOKUP_WAIT {
                return Err(HsmError::new(
                    FaultKind::Transient,
                    "find a KEK",
                    format!(
                        "version {id}'s objects are still being found again after the HSM was re-initialised"
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if let Ok(h) = conn.handles_of(id) {
            return Ok(Some(h));
        }
        let t = Instant::now();
        let found = find_one(s, &e)?;
        self.search_costs().lookup = Some(t.elapsed());
        tracing::debug!(version_id = %id, millis = t.elapsed().as_millis() as u64,
            "looked up a version by its id before the re-find reached it");
        match found {
            Ok(h) => Ok(Some(
                *conn
                    .handles
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(id)
                    .or_insert(h),
            )),
            // Nothing at all under its id: what a storage fault looks like for every key (the soak
            // saw it when a storage loss began while this pass ran). Not a verdict on the key:
            // the pass over the token tells one missing key from a lost storage, and judges it;
            // until then the caller is told to retry. A pass that gave up judges nothing, so
            // then the lookup does.
            Err(why) if why == NOTHING_FOUND && !conn.pass_abandoned() => {
                tracing::warn!(version_id = %id,
                    "a search by a KEK's id found nothing while the objects are being found again after a re-initialisation: not served until the pass over the token has judged it");
                Err(HsmError::new(
                    FaultKind::Transient,
                    "find a KEK",
                    format!(
                        "version {id}'s objects were not found while the HSM's objects are being found again after a re-initialisation"
                    ),
                ))
            }
            Err(why) => {
                tracing::error!(version_id = %id, problem = %why,
                    "KEK integrity check failed after re-initialising the HSM: this version is not served");
                conn.set_verdict(id, Some(why.clone()));
                Err(integrity_failed(id, &why))
            }
        }
    }

    pub(super) fn search_costs(&self) -> std::sync::MutexGuard<'_, SearchCosts> {
        self.search_costs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the pass over the token running on `conn` is due before a lookup by id would
    /// end (see [`pass_is_sooner`]); false when no pass runs or either cost is not known yet.
    fn pass_due_first(&self, conn: &Conn) -> bool {
        let Some(started) = conn.pass_started() else {
            return false;
        };
        match *self.search_costs() {
            SearchCosts {
                pass: Some(pass),
                lookup: Some(lookup),
            } => pass_is_sooner(started.elapsed(), pass, lookup),
            _ => false,
        }
    }

    /// The audit key's handle on `conn`, found by its id if this generation has not yet.
    pub(super) fn audit_handle(&self, conn: &Conn, s: &Session) -> Result<ObjectHandle, HsmError> {
        if let Ok(h) = conn.audit_handle() {
            return Ok(h);
        }
        let id = *self.audit_key_id.lock().unwrap_or_else(|p| p.into_inner());
        let Some(id) = id else {
            return conn.audit_handle();
        };
        let h = find_audit_key(s, id)?;
        *conn.audit_key.write().unwrap_or_else(|p| p.into_inner()) = Some(h);
        Ok(h)
    }

    /// Re-finds every known KEK's objects on `conn` (after `CKR_OBJECT_HANDLE_INVALID` and
    /// friends), unless another caller did since `epoch`.
    /// If the pass finds no key object at all, nothing is marked failed: the storage is lost
    /// (see the module docs) and recovery starts.
    pub(super) fn refresh_handles(
        self: &Arc<Self>,
        conn: &Conn,
        epoch: u64,
    ) -> Result<(), HsmError> {
        let mut current = conn.handle_epoch.lock().unwrap_or_else(|p| p.into_inner());
        if *current != epoch {
            return Ok(());
        }
        let expected = self.known_all();
        let s = conn.checkout(&self.ctx, "re-find the KEKs")?;
        let t = Instant::now();
        let found = find_keks(self, &s, &expected, true);
        if found.is_ok() {
            self.search_costs().pass = Some(t.elapsed());
        }
        let audit_id = *self.audit_key_id.lock().unwrap_or_else(|p| p.into_inner());
        let audit = audit_id.map(|id| find_audit_key(&s, id));
        match &found {
            Err(e) if e.kind == FaultKind::SessionLost => conn.discard(s),
            _ => conn.checkin(s),
        }
        let (report, handles) = found?;
        if report.storage_lost(expected.len()) {
            return Err(self.note_storage_lost());
        }
        self.merge_found(conn, &expected, &report, handles);
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
        match conn.check_of(id) {
            None => return Ok(()),
            Some(Check::Failed(why)) => return Err(integrity_failed(id, &why)),
            Some(Check::Pending) => {}
        }
        let h = self.handles_for(conn, s, id)?;
        let expected = self.known_one(id);
        let (Some(e), Some(h)) = (expected, h) else {
            conn.set_verdict(id, None);
            return Ok(());
        };
        let verdict = match self.caps.mechanism_for(e.algorithm) {
            None => Some(format!(
                "the token cannot serve its algorithm: {}",
                self.caps.why_not(e.algorithm)
            )),
            Some(mech) => {
                let problems =
                    check_template(s, &h, e.algorithm, mech, e.origin, self.caps.key_attributes)?;
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
                Err(integrity_failed(id, &why))
            }
        }
    }

    /// Proves every version not yet proven on the current generation (after a
    /// re-initialisation, while requests are served again; after a start-up whose checks did
    /// not all fit in their budget). Stops early for a shutdown or a recovery (the new
    /// generation proves its own).
    pub(super) fn sweep_canaries(&self) {
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
        let (mut failed, mut proven, n) = (0, 0, ids.len());
        for id in ids {
            // Its session is outside admission, so a shutdown waits for the check in progress
            // here (see `close`); taken per version, so a recovery or a shutdown never waits
            // for the whole sweep (on a slow token it can take minutes).
            let _reinit = self.reinit_lock.lock().unwrap_or_else(|p| p.into_inner());
            if self.closed.load(Ordering::SeqCst) || conn.retired() || !self.health.borrow().serving
            {
                break;
            }
            match self.ensure_verified(&conn, &s, id) {
                Ok(()) => proven += 1,
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
            proven,
            failed,
            millis = t.elapsed().as_millis() as u64,
            "KEK identities proven in the background"
        );
    }
}

/// Why the HSM is not serving after every key object vanished at once.
const STORAGE_LOST: &str = "every key object on the token is gone at once: the token's storage \
    or the device failed (not tampering with each key); re-initialising until they are back";

/// The error for a version that failed its integrity check on this generation.
fn integrity_failed(id: VersionId, why: &str) -> HsmError {
    HsmError::new(
        FaultKind::NotPermitted,
        "prove a KEK's identity",
        format!("version {id} failed its integrity check after re-initialisation: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_lookup_starts_only_if_it_ends_before_the_pass() {
        // SoftHSM2 with 13,600 objects: a pass ~860 ms, a lookup ~190 ms.
        let (pass, lookup) = (860 * MS, 190 * MS);
        assert!(!pass_is_sooner(Duration::ZERO, pass, lookup));
        assert!(!pass_is_sooner(600 * MS, pass, lookup));
        assert!(pass_is_sooner(700 * MS, pass, lookup));
        assert!(pass_is_sooner(860 * MS, pass, lookup));
        // Overrunning: still waited for up to half again its expected time, then not.
        assert!(pass_is_sooner(1290 * MS, pass, lookup));
        assert!(!pass_is_sooner(1300 * MS, pass, lookup));
        // A token that finds an id without reading every object: the pass costs thousands of
        // lookups, and each request looks its own version up almost to the end.
        let (pass, lookup) = (7_000 * MS, 2 * MS);
        assert!(!pass_is_sooner(6_990 * MS, pass, lookup));
        assert!(pass_is_sooner(6_999 * MS, pass, lookup));
    }
}
