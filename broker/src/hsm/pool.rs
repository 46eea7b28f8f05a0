//! The session pool's one entry point, [`Hsm::run`]: admission (a job in a bounded,
//! deadline-aware, tenant-fair queue, see [`super::admission`]), a session checked out on an
//! HSM thread, and recovery from the faults of that call — a lost session is evicted and
//! the call repeated once, an invalid handle makes the handles be re-found, a lost device
//! starts a re-initialisation ([`super::recovery`]). Every other file of this module reaches the
//! token only through it.

use std::{
    sync::{Arc, OnceLock, atomic::Ordering},
    time::Instant,
};

use cryptoki::{error::RvError, session::Session};
use tokio::sync::oneshot;

use super::{
    Hsm, Inner, RequestScope,
    admission::{self, Refused, SYSTEM_TENANT},
    conn::Conn,
    error::{FaultKind, HsmError},
    objects::canary_verdict,
    profile::Profile,
};
use crate::model::VersionId;

/// How many more times a decrypt of caller data runs, each on a fresh session, after a device
/// error the vendor profile reads as "not authentic" (Kryoptic): bad data fails every time the
/// same way, while a passing device fault (one call in fifty failing, in the soak run) fails
/// four times in a row about once in six million calls — and then the version's canary is
/// tried as well (see [`Inner::with_session`]).
pub(super) const INTEGRITY_RETRIES: u8 = 3;

/// How an operation may be retried and abandoned.
#[derive(Clone, Copy, Debug)]
pub(super) struct CallKind {
    /// Safe to run again after a lost session or an invalid handle (no object is created).
    retry: bool,
    /// The caller may stop waiting at its deadline (nothing is left half-done in the broker's
    /// own state if the call completes later).
    abandon: bool,
}

/// Reads, wraps and unwraps: repeatable, and abandoned at the deadline.
pub(super) const READ: CallKind = CallKind {
    retry: true,
    abandon: true,
};

/// Object creation: never repeated (the object may exist), never abandoned once started.
pub(super) const CREATE: CallKind = CallKind {
    retry: false,
    abandon: false,
};

/// Finding and destroying objects: repeatable, never abandoned once started.
pub(super) const MAINTAIN: CallKind = CallKind {
    retry: true,
    abandon: false,
};

fn deadline_passed(what: &'static str) -> HsmError {
    HsmError::refused(
        FaultKind::Deadline,
        what,
        "the request's deadline passed before the HSM work could start",
    )
}

/// A fault in one item of a batch chunk that is really about the session or the device: the
/// whole chunk fails with it, so that the session is evicted (and the chunk retried once), the
/// handles re-found, or the device recovered — as for a single call.
pub(super) fn chunk_fault(e: &HsmError) -> bool {
    matches!(e.kind, FaultKind::SessionLost | FaultKind::DeviceLost)
        || (e.kind == FaultKind::HandleInvalid && e.rv.is_some())
}

/// The caller-facing error for a refused admission: RESOURCE_EXHAUSTED (retry later), or
/// UNAVAILABLE while shutting down.
pub(super) fn refused(what: &'static str, r: Refused) -> HsmError {
    let kind = match r {
        Refused::Closed => FaultKind::DeviceLost,
        _ => FaultKind::Busy,
    };
    HsmError::refused(kind, what, r.to_string())
}

/// Re-classifies a `CKR_DEVICE_ERROR` where the vendor profile knows better:
/// * Kryoptic reports a failed integrity check on decrypt/unwrap (OAEP padding, RFC 5649 check
///   value) as a device error. If the call was on caller data and the session still answers
///   (`session_alive`), the data was not authentic (one error for every cause: no oracle).
/// * On CloudHSM a device error can mean the cluster is throttling: "busy, retry"
///   (RESOURCE_EXHAUSTED), not "device lost" (UNAVAILABLE).
pub(super) fn reclassify(
    profile: &Profile,
    mut e: HsmError,
    session_alive: impl FnOnce() -> bool,
) -> HsmError {
    let integrity = match e.rv {
        Some(RvError::DeviceError) => profile.device_error_on_bad_ciphertext,
        // openCryptoki 3.8.1: a bad RSA-OAEP padding.
        Some(RvError::FunctionFailed) => profile.function_failed_on_bad_ciphertext,
        _ => return e,
    };
    if integrity && e.caller_data && session_alive() {
        e.kind = FaultKind::DataInvalid;
        e.detail
            .push_str(" (a failed integrity check, per the vendor profile)");
    } else if e.rv == Some(RvError::DeviceError) && profile.device_error_is_throttling {
        e.kind = FaultKind::Busy;
        e.detail.push_str(" (throttling, per the vendor profile)");
    }
    e
}

/// Whether `e` is a device error or failed function that the vendor profile re-classified as a
/// failed integrity check of caller data.
pub(super) fn reclassified(e: &HsmError) -> bool {
    e.kind == FaultKind::DataInvalid
        && matches!(e.rv, Some(RvError::DeviceError | RvError::FunctionFailed))
}

impl Hsm {
    /// Runs `f` with a pooled session on an HSM thread, after admission (see the module
    /// docs). Recovery from lost sessions, invalid handles and lost devices happens inside.
    pub(super) async fn run<T, F>(
        &self,
        what: &'static str,
        kind: CallKind,
        f: F,
    ) -> Result<T, HsmError>
    where
        F: Fn(&Inner, &Conn, &Session) -> Result<T, HsmError> + Send + 'static,
        T: Send + 'static,
    {
        let inner = &self.inner;
        inner.usable(what)?;
        let scope = RequestScope::current();
        let deadline = scope.as_ref().and_then(RequestScope::deadline);
        let tenant: Arc<str> = scope
            .as_ref()
            .map_or_else(|| Arc::from(SYSTEM_TENANT), RequestScope::tenant);
        let budget = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(deadline_passed(what));
                }
                Some(left)
            }
            None => None,
        };
        // The call waits in the admission queue as a job; whichever HSM thread frees a
        // session runs it next (see `admission`), and its result comes back here.
        let (tx, mut rx) = oneshot::channel::<Result<T, HsmError>>();
        let started: Arc<OnceLock<Instant>> = Arc::default();
        let job: admission::Job = {
            let (worker, started) = (inner.clone(), started.clone());
            Box::new(move |slot| {
                if tx.is_closed() {
                    // The request ended while the job waited: nothing to do.
                    slot.unused();
                    return;
                }
                let now = *started.get_or_init(Instant::now);
                let result = if deadline.is_some_and(|d| now >= d) {
                    slot.unused();
                    Err(deadline_passed(what))
                } else if let Err(e) = worker.usable(what) {
                    // The device was lost (or the HSM closed) while the job waited.
                    slot.unused();
                    Err(e)
                } else {
                    worker.with_session(what, kind, |conn, s| f(&worker, conn, s))
                };
                let _ = tx.send(result);
            })
        };
        let submitted = Instant::now();
        let ticket = inner
            .admission
            .submit(&tenant, budget, job)
            .map_err(|r| refused(what, r))?;
        // When the call started (for the metrics and the call timeout); the submission time
        // for a job that never reported starting.
        let since = || started.get().copied().unwrap_or(submitted);
        let mut received = None;
        if let Some(ticket) = ticket {
            // Still queued: wait for a turn, at most what admission allows.
            match tokio::time::timeout(ticket.allowed(), &mut rx).await {
                Ok(r) => received = Some(r),
                Err(_) => {
                    if ticket.withdraw() {
                        return Err(refused(what, Refused::TimedOut(ticket.allowed())));
                    }
                    // It started meanwhile: wait for it as for a call that started at once.
                }
            }
        }
        let received = match received {
            Some(r) => r,
            None if kind.abandon => {
                let until = deadline.unwrap_or_else(|| since() + inner.call_timeout);
                match tokio::time::timeout_at(until.into(), &mut rx).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(
                            operation = what,
                            "an HSM call did not return by its deadline; the request gives up, \
                             the call keeps its session until the HSM answers"
                        );
                        let result = Err(HsmError::new(
                            FaultKind::Deadline,
                            what,
                            "the HSM did not answer before the deadline",
                        ));
                        inner.observe(what, since(), &result);
                        return result;
                    }
                }
            }
            None => (&mut rx).await,
        };
        // A closed channel: the job was dropped unrun (shutdown) or panicked.
        let result = received.unwrap_or_else(|_| {
            Err(if inner.admission.is_closed() {
                refused(what, Refused::Closed)
            } else {
                HsmError::new(
                    FaultKind::Other,
                    what,
                    "the HSM worker ended without an answer",
                )
            })
        });
        inner.observe(what, since(), &result);
        result
    }
}

impl Inner {
    /// Tells the metrics hook about the items of a call over several items that failed.
    pub(super) fn observe_items<T>(&self, what: &'static str, items: &[Result<T, HsmError>]) {
        if let Some(o) = self.observer.get() {
            for e in items.iter().filter_map(|r| r.as_ref().err()) {
                o.hsm_item_fault(what, e.kind);
            }
        }
    }

    /// Tells the metrics hook about one call that got a session.
    pub(super) fn observe<T>(
        &self,
        what: &'static str,
        started: Instant,
        result: &Result<T, HsmError>,
    ) {
        if let Some(o) = self.observer.get() {
            o.hsm_call(
                what,
                started.elapsed(),
                result.as_ref().err().map(|e| e.kind),
            );
        }
    }

    /// Refuses at once while the HSM is known to be down (UNAVAILABLE) or shut down.
    pub(super) fn usable(&self, what: &'static str) -> Result<(), HsmError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(HsmError::refused(
                FaultKind::DeviceLost,
                what,
                "the HSM is closed (shutting down)",
            ));
        }
        if !self.health.borrow().serving {
            return Err(HsmError::refused(
                FaultKind::DeviceLost,
                what,
                "the HSM is unavailable; re-initialising in the background",
            ));
        }
        Ok(())
    }

    /// Runs `f` on a session of the current generation. A lost session is evicted and `f` runs
    /// once more on a fresh one; an invalid object handle makes the handles be re-found and `f`
    /// run once more (both only for `kind.retry`). A lost device starts recovery.
    pub(super) fn with_session<T>(
        self: &Arc<Self>,
        what: &'static str,
        kind: CallKind,
        f: impl Fn(&Conn, &Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let conn = self.current();
        let mut session_retry = kind.retry;
        let mut handle_retry = kind.retry;
        let mut integrity_retries = if kind.retry { INTEGRITY_RETRIES } else { 0 };
        loop {
            let epoch = conn.handle_epoch();
            let session = match conn.checkout(&self.ctx, what) {
                Ok(s) => s,
                Err(e) => {
                    self.note_fault(&conn, &e);
                    return Err(e);
                }
            };
            match f(&conn, &session).map_err(|e| self.apply_profile(&session, e)) {
                Err(e) if e.kind == FaultKind::SessionLost => {
                    conn.discard(session);
                    if session_retry {
                        session_retry = false;
                        tracing::warn!(operation = what, context = %e.context, detail = %e.detail,
                            "HSM session lost: evicted it; running the operation once more on a fresh session");
                        continue;
                    }
                    tracing::warn!(operation = what, context = %e.context, detail = %e.detail,
                        "HSM session lost: evicted it");
                    return Err(e);
                }
                // A device error the vendor profile reads as a failed integrity check (Kryoptic)
                // is also what a real, passing device fault looks like: the call runs once more
                // on a fresh session. Bad data fails again the same way (deterministic), so it
                // is still refused; a valid envelope that met a transient fault is served
                // instead of being called unauthentic.
                Err(e) if reclassified(&e) && integrity_retries > 0 => {
                    conn.discard(session);
                    integrity_retries -= 1;
                    tracing::debug!(operation = what, context = %e.context, detail = %e.detail,
                        "a device error read as a failed integrity check: running the operation once more to tell it from a passing fault");
                }
                // Failed every time: before the caller is told its data is not authentic, the
                // version's canary (a ciphertext known to be good) must still decrypt on this
                // device. If it does not, the device is failing, not the data.
                Err(e) if reclassified(&e) && kind.retry => {
                    let fault = e
                        .version
                        .and_then(|id| self.canary_fails(&conn, &session, id));
                    conn.discard(session);
                    let Some(fault) = fault else {
                        return Err(e);
                    };
                    tracing::warn!(operation = what, context = %fault.context, detail = %fault.detail,
                        "a device error read as a failed integrity check, but the key's canary fails too: a device fault, not the caller's data");
                    self.note_fault(&conn, &fault);
                    return Err(fault);
                }
                Err(e) if e.kind == FaultKind::HandleInvalid && e.rv.is_some() && handle_retry => {
                    conn.checkin(session);
                    handle_retry = false;
                    tracing::warn!(operation = what, context = %e.context, detail = %e.detail,
                        "HSM object handle invalid: re-finding the KEK objects; running the operation once more");
                    if let Err(r) = self.refresh_handles(&conn, epoch) {
                        self.note_fault(&conn, &r);
                        return Err(r);
                    }
                }
                Err(e) => {
                    // After a failure the module is not trusted to have ended the operation:
                    // a session that saw anything but a data error is not reused.
                    if e.kind == FaultKind::DataInvalid || e.rv.is_none() {
                        conn.checkin(session);
                    } else {
                        conn.discard(session);
                    }
                    self.note_fault(&conn, &e);
                    return Err(e);
                }
                Ok(v) => {
                    conn.checkin(session);
                    return Ok(v);
                }
            }
        }
    }

    /// The fault that keeps version `id`'s canary from decrypting on `s`, if any (`None` also
    /// when the version has no canary or no handles to try).
    pub(super) fn canary_fails(&self, conn: &Conn, s: &Session, id: VersionId) -> Option<HsmError> {
        let canary = self.known_one(id)?.canary?;
        let h = conn.handles_of(id).ok()?;
        match canary_verdict(self, s, &h, &canary) {
            Ok(None) => None,
            // Not the key it was: that is the integrity sweep's to report, not a device fault.
            Ok(Some(_)) => None,
            Err(e) => Some(HsmError {
                detail: format!("{} (the key's canary does not decrypt either)", e.detail),
                caller_data: false,
                ..e
            }),
        }
    }

    /// Re-classifies a fault where the vendor profile knows better (see [`reclassify`]).
    fn apply_profile(&self, session: &Session, e: HsmError) -> HsmError {
        if !matches!(e.rv, Some(RvError::DeviceError | RvError::FunctionFailed)) {
            return e;
        }
        let alive = || session.get_session_info().is_ok();
        reclassify(self.profile, e, alive)
    }
}

#[cfg(test)]
mod tests {
    use cryptoki::error::Error as CkError;

    use super::*;
    use crate::hsm::profile;

    fn device_error(caller_data: bool) -> HsmError {
        let mut e = HsmError::from_ck(
            "unwrap",
            CkError::Pkcs11(RvError::DeviceError, cryptoki::context::Function::Decrypt),
        );
        e.caller_data = caller_data;
        e
    }

    fn profile(name: &str) -> &'static Profile {
        profile::by_name(name).expect("profile")
    }

    #[test]
    fn a_device_error_is_a_lost_device_unless_the_profile_says_otherwise() {
        assert_eq!(device_error(true).kind, FaultKind::DeviceLost);
        for p in ["softhsm2", "generic", "luna"] {
            assert_eq!(
                reclassify(profile(p), device_error(true), || true).kind,
                FaultKind::DeviceLost,
                "{p}"
            );
        }
        // CloudHSM: throttling, whatever the call.
        assert_eq!(
            reclassify(profile("cloudhsm"), device_error(false), || true).kind,
            FaultKind::Busy
        );
        // Kryoptic: unauthentic caller data, but only while the session still answers, and
        // never for the broker's own calls.
        let k = profile("kryoptic");
        assert_eq!(
            reclassify(k, device_error(true), || true).kind,
            FaultKind::DataInvalid
        );
        assert_eq!(
            reclassify(k, device_error(true), || false).kind,
            FaultKind::DeviceLost
        );
        assert_eq!(
            reclassify(k, device_error(false), || true).kind,
            FaultKind::DeviceLost
        );
        // openCryptoki: CKR_FUNCTION_FAILED on caller data from a live session is "not
        // authentic"; elsewhere it stays a retryable fault.
        let failed = |caller: bool| {
            let mut e = HsmError::from_ck(
                "unwrap",
                CkError::Pkcs11(
                    RvError::FunctionFailed,
                    cryptoki::context::Function::Decrypt,
                ),
            );
            e.caller_data = caller;
            e
        };
        let ock = profile("opencryptoki");
        assert_eq!(
            reclassify(ock, failed(true), || true).kind,
            FaultKind::DataInvalid
        );
        assert_eq!(
            reclassify(ock, failed(true), || false).kind,
            FaultKind::Transient
        );
        assert_eq!(
            reclassify(ock, failed(false), || true).kind,
            FaultKind::Transient
        );
        assert_eq!(
            reclassify(profile("softhsm2"), failed(true), || true).kind,
            FaultKind::Transient
        );
        // Other return values are left alone.
        let other = HsmError::from_ck(
            "unwrap",
            CkError::Pkcs11(RvError::GeneralError, cryptoki::context::Function::Decrypt),
        );
        assert_eq!(reclassify(k, other, || true).kind, FaultKind::Transient);
        // A token failing a key creation is a retryable UNAVAILABLE, never INTERNAL.
        let generate = HsmError::from_ck(
            "C_GenerateKey",
            CkError::Pkcs11(
                RvError::GeneralError,
                cryptoki::context::Function::GenerateKey,
            ),
        );
        assert_eq!(generate.kind, FaultKind::Transient);
        assert!(matches!(
            generate.into_broker(),
            crate::error::BrokerError::Unavailable(_)
        ));
    }
}
