//! The HSM layer: the only code that touches `cryptoki` (house rule 1, `docs/src/style.md`).
//!
//! It owns the PKCS#11 module (loaded once per process), the login, a pool of sessions, the
//! cache of object handles for every KEK version, the start-up capability probe, and recovery
//! from the faults a real HSM has. Everything above it speaks domain types: [`VersionId`],
//! [`Dek`](crate::model::Dek), [`WrapParams`].
//!
//! Every PKCS#11 call runs on one of the pool's HSM threads (never an async worker) with a
//! session checked out of the pool (house rule 2), after [`admission`] let it in: bounded queues, a wait bounded by the request's
//! deadline and `session_wait_ms`, round-robin between tenants. A call waits in that queue as a
//! job, and the HSM thread that finishes one call runs the next queued one at once (under
//! load a call costs one thread hand-off, its result, not three). Work whose deadline
//! has passed is not started; a call that does not return by its deadline is abandoned by the
//! request (the HSM thread waits for the HSM, and its session returns to the pool when the
//! call does), so a hung HSM cannot hang the server.
//!
//! Faults are classified once ([`error`]) and the class drives recovery (house rule 3):
//! * **session lost** (`CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`): the session is
//!   evicted and the operation runs once more on a fresh one — for operations that are safe to
//!   repeat (every read, wrap, unwrap and destroy; never an object creation, which may have
//!   happened before the session died: that fails, and its two-phase creation rolls back);
//! * **object handle invalid**: the cached handles are re-found (the same attach logic as at
//!   start-up, template check included) and the operation runs once more;
//! * **device or token lost** (`CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`,
//!   `CKR_DEVICE_ERROR`, ...): if the token no longer answers, the HSM is marked unhealthy
//!   ([`Hsm::healthy`], [`Hsm::health`]), every request gets UNAVAILABLE at once, and a
//!   background thread re-initialises with backoff (≤ 100 ms between attempts): `C_Finalize`,
//!   `C_Initialize`, find the token again, log in, open a new pool — then serves again, while
//!   it re-finds every known KEK and the audit key in one pass (a version needed before the
//!   pass reaches it is looked up by its id), each KEK's template and canary checked before
//!   its first use. See `conn` for why a re-initialisation replaces every session and object
//!   handle at once, and `recovery` for the steps.
//!
//! # Layout, one duty per file
//! * this file — the [`Hsm`] handle, its shared state and the types it speaks;
//! * `token` — loading the module, selecting the token, logging in, the first pool;
//! * `pool` — `Hsm::run`: admission, a session on an HSM thread, per-call recovery;
//! * [`admission`] — bounded, deadline-aware, tenant-fair admission to the session pool;
//! * `conn` — the sessions and handles of one initialisation of the module;
//! * `recovery` — health, re-initialisation and handle refresh;
//! * `objects` — KEK objects: generate, find and attach, check, read public halves, destroy;
//! * `crypt` — wrap and unwrap DEKs (lists of items in one session checkout);
//! * `payload` — encrypt and decrypt payloads (the same way);
//! * [`sign`] — sign and verify digests with signing keys, and their identity check;
//! * `mac` — the audit trail's HMAC key;
//! * `import` — BYOK import keys and key material import;
//! * [`domain`] — the security domain that backups are wrapped under;
//! * [`template`] — the fixed KEK template and its read-back check;
//! * [`probe`] — mechanism list and known-answer tests at start-up;
//! * [`report`] — the capability report (a row per mechanism, algorithm and key type) and the
//!   start-up verdict against `[hsm] required_algorithms`;
//! * [`profile`] — the table of vendor quirks (RFC 5649 number, session cap, throttling, ...);
//! * [`ops`] — the blocking operations on one session;
//! * [`error`] — classification of PKCS#11 return values (drives recovery and status codes).

pub mod admission;
mod conn;
mod crypt;
pub mod domain;
pub mod error;
mod import;
pub(crate) mod kat_rsa;
pub(crate) mod kat_sign;
mod mac;
mod objects;
pub mod ops;
mod payload;
mod pool;
pub mod probe;
pub mod profile;
mod recovery;
pub mod report;
pub mod sign;
pub mod template;
mod token;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use cryptoki::{context::Pkcs11, object::ObjectHandle};
use secrecy::SecretString;
use serde::Serialize;
use tokio::sync::watch;

use self::{admission::Admission, conn::Conn};
pub use self::{
    admission::{PoolStats, RequestScope},
    error::{FaultKind, HsmError},
    import::IMPORT_KEY_LABEL,
    mac::AUDIT_KEY_LABEL,
    ops::{KwpMechanism, WrapParams},
    probe::Capabilities,
    profile::Profile,
    recovery::Health,
    template::KekSpec,
    token::SlotReport,
};
use crate::model::{Algorithm, KeyType, Origin, VersionId};

/// Which token to use. Serial number is the most stable (slot ids change on replug). Every
/// field that is set must match (the last ones come from a PKCS #11 URI, `pkcs11_uri`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TokenSelector {
    /// `CK_TOKEN_INFO.label`.
    pub label: Option<String>,
    /// `CK_TOKEN_INFO.serialNumber`.
    pub serial: Option<String>,
    /// The slot id.
    pub slot: Option<u64>,
    /// `CK_TOKEN_INFO.manufacturerID`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manufacturer: Option<String>,
    /// `CK_TOKEN_INFO.model`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `CK_SLOT_INFO.slotDescription`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot_description: Option<String>,
    /// `CK_SLOT_INFO.manufacturerID`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot_manufacturer: Option<String>,
    /// `CK_INFO.manufacturerID` of the module.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library_manufacturer: Option<String>,
    /// `CK_INFO.libraryDescription` of the module.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library_description: Option<String>,
    /// `CK_INFO.libraryVersion` of the module (major, minor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library_version: Option<(u8, u8)>,
}

/// How to open the HSM.
#[derive(Clone, Debug)]
pub struct HsmSettings {
    /// The PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// Which token.
    pub token: TokenSelector,
    /// The user PIN.
    pub pin: SecretString,
    /// How many sessions to keep (capped by the token's maximum).
    pub sessions: usize,
    /// How long a request may wait for a free session before RESOURCE_EXHAUSTED.
    pub acquire_timeout: Duration,
    /// The vendor profile by name; `None` detects it from what the token reports.
    pub profile: Option<String>,
    /// Most requests waiting for a session, all tenants together.
    pub queue_limit: usize,
    /// Most requests of one tenant waiting for a session.
    pub tenant_queue_limit: usize,
    /// Most sessions one tenant may hold at once (`None`: all of them).
    pub tenant_max_sessions: Option<usize>,
    /// How long the broker waits for an HSM call it makes for itself (no request deadline).
    pub call_timeout: Duration,
    /// The longest the start-up identity checks may hold up serving (see `keys::load`).
    pub startup_check_budget: Duration,
}

/// What the token says about itself.
#[derive(Clone, Debug, Serialize)]
pub struct TokenSummary {
    /// The library's description and version.
    pub library: String,
    /// The slot id.
    pub slot: u64,
    /// The token label.
    pub label: String,
    /// The manufacturer.
    pub manufacturer: String,
    /// The model.
    pub model: String,
    /// The serial number.
    pub serial: String,
    /// Sessions in the pool.
    pub sessions: usize,
    /// The vendor profile in use.
    pub profile: &'static str,
    /// Whether the profile was configured (`[hsm] profile`) rather than detected.
    pub profile_configured: bool,
    /// Whether the module is p11-kit's proxy (which passes `C_Initialize` `pReserved` from its
    /// own configuration to the module behind it).
    pub via_proxy: bool,
    /// Every slot with a token, as read while selecting this one: skipped slots say why (the
    /// PKCS#11 call and field), and faults tolerated in optional fields are named.
    pub slots: Vec<SlotReport>,
}

/// The object handles of one KEK version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KekHandles {
    /// The secret key (AES) or private key (RSA).
    pub secret: ObjectHandle,
    /// The public key (RSA only).
    pub public: Option<ObjectHandle>,
}

/// How a key version proves that its HSM objects are the key it was created with.
#[derive(Clone, Debug)]
pub enum Canary {
    /// A wrapping key: a value wrapped under it when it was created, with the SHA-256 of the
    /// value; if it unwraps to that value, the object is the key.
    Wrapped {
        /// How to unwrap it.
        params: WrapParams,
        /// The wrapped value.
        ciphertext: Vec<u8>,
        /// SHA-256 of the value.
        digest: Vec<u8>,
    },
    /// A signing key: the SHA-256 of its public key, recorded when it was created; its public
    /// object must still be that key, and its private object must sign a challenge that the
    /// public object verifies.
    Signing {
        /// What the check signs with (ES256, ES384 or RS256).
        algorithm: crate::model::SignAlgorithm,
        /// SHA-256 of the public key.
        fingerprint: Vec<u8>,
    },
}

/// A KEK version the broker expects to find in the token.
#[derive(Clone, Debug)]
pub struct ExpectedKek {
    /// Its id (`CKA_ID`).
    pub id: VersionId,
    /// Its key type.
    pub key_type: KeyType,
    /// Its algorithm.
    pub algorithm: Algorithm,
    /// Generated or imported.
    pub origin: Origin,
    /// Its canary, checked when the HSM layer re-finds the key after a re-initialisation (at
    /// start-up the keyring checks canaries itself, in parallel).
    pub canary: Option<Canary>,
}

/// The result of matching the store's KEK versions against the token's objects.
#[derive(Debug, Default)]
pub struct AttachReport {
    /// Versions whose objects are missing, duplicated or have the wrong template, with why.
    pub problems: Vec<(VersionId, String)>,
    /// Objects keybroker made (label prefix `kb:`) whose id the store does not know.
    pub orphans: Vec<String>,
    /// How many versions were attached.
    pub attached: usize,
    /// How many key objects (secret, private, public) the pass found on the token at all,
    /// whoever made them. None while the broker expects some is a storage or device fault
    /// (every key vanishing at once), not tampering with each key: see `recovery`.
    pub key_objects: usize,
}

impl AttachReport {
    /// Whether the pass found no key object at all while `expected` versions should be there:
    /// the token's storage is gone (SoftHSM2's token directory moved away, or the process out
    /// of descriptors so it cannot open its object files: it then answers
    /// `CKR_OBJECT_HANDLE_INVALID` and finds nothing), not each key tampered with.
    pub fn storage_lost(&self, expected: usize) -> bool {
        expected > 0 && self.key_objects == 0
    }
}

/// The RSA public key of a version.
#[derive(Clone, Debug)]
pub struct RsaPublic {
    /// The modulus, big-endian.
    pub modulus: Vec<u8>,
    /// The public exponent, big-endian.
    pub exponent: Vec<u8>,
}

/// Told the duration and outcome of every HSM call made through the session pool (metrics).
pub trait HsmObserver: Send + Sync {
    /// `operation` is the pool operation (`"wrap"`, `"unwrap"`, `"health probe"`, ...);
    /// `fault` is `None` on success.
    fn hsm_call(&self, operation: &'static str, elapsed: Duration, fault: Option<FaultKind>);

    /// One item of a call over several items failed with `fault` (the call itself succeeded:
    /// its duration was told to [`HsmObserver::hsm_call`]).
    fn hsm_item_fault(&self, operation: &'static str, fault: FaultKind);
}

/// Reads the user PIN from its source (file or environment variable) again.
pub type PinSource = Box<dyn Fn() -> Result<SecretString, String> + Send + Sync>;

/// A handle to the HSM: cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Pkcs11,
    token: TokenSelector,
    /// The user PIN for the next login: re-read from its source before each re-login and on
    /// SIGHUP (see [`Hsm::set_pin_source`]).
    pin: Mutex<SecretString>,
    /// Reads the PIN source again (set once by the server).
    pin_source: OnceLock<PinSource>,
    /// The PIN value the token refused (`CKR_PIN_INCORRECT`): never tried again, so the broker
    /// cannot lock the user PIN on a token that counts failed logins. Cleared when the source
    /// yields another value.
    pin_refused: Mutex<Option<SecretString>>,
    pool_size: usize,
    summary: TokenSummary,
    caps: Capabilities,
    kwp: Option<KwpMechanism>,
    profile: &'static Profile,
    /// The current generation (see [`conn`]).
    conn: RwLock<Arc<Conn>>,
    admission: Arc<Admission>,
    call_timeout: Duration,
    startup_check_budget: Duration,
    health: watch::Sender<Health>,
    /// Every KEK version that should be attached, to re-find after a re-initialisation or an
    /// invalid handle.
    known: RwLock<HashMap<VersionId, ExpectedKek>>,
    audit_key_id: Mutex<Option<VersionId>>,
    recovering: AtomicBool,
    closed: AtomicBool,
    /// Held by a re-initialisation attempt and by `close`: the module is never finalised by
    /// one while the other initialises it or opens sessions on it (the soak run saw SoftHSM2
    /// crash when SIGTERM arrived during a re-initialisation), and never re-initialised after
    /// a shutdown finalised it.
    reinit_lock: Mutex<()>,
    reinitialisations: AtomicU64,
    /// The measured cost of a pass over the token and of a lookup by id (see `recovery`).
    search_costs: Mutex<recovery::SearchCosts>,
    /// Serialises object creation and destruction: SoftHSM2 2.6.1 races on concurrent object
    /// creation and lookup (upstream #573/#576/#578/#688/#757).
    object_lock: Mutex<()>,
    /// Metrics hook, set once at start-up.
    observer: OnceLock<Arc<dyn HsmObserver>>,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("token", &self.inner.summary)
            .finish_non_exhaustive()
    }
}

impl Hsm {
    /// What the probe found.
    pub fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    /// The token in use.
    pub fn token(&self) -> &TokenSummary {
        &self.inner.summary
    }

    /// The vendor profile in use.
    pub fn profile(&self) -> &'static Profile {
        self.inner.profile
    }

    /// Whether the HSM serves: false from the moment a lost device is confirmed until the
    /// re-initialisation succeeds (and after shutdown). The health service reports this.
    pub fn healthy(&self) -> bool {
        self.inner.health.borrow().serving
    }

    /// Notifications of every health change (for `grpc.health.v1`, metrics, the keyring).
    pub fn health(&self) -> watch::Receiver<Health> {
        self.inner.health.subscribe()
    }

    /// How many times the module was re-initialised after a lost device.
    pub fn reinitialisations(&self) -> u64 {
        self.inner.reinitialisations.load(Ordering::Relaxed)
    }

    /// How long the broker waits for an HSM call it makes for itself.
    pub fn call_timeout(&self) -> Duration {
        self.inner.call_timeout
    }

    /// The longest the start-up identity checks may hold up serving.
    pub fn startup_check_budget(&self) -> Duration {
        self.inner.startup_check_budget
    }

    /// Versions whose identity (canary) was not proven at start-up (the token too slow for
    /// the start-up budget, or a fault that is not a verdict): they are proven before their
    /// first use and by a sweep in the background, and never served unproven.
    pub fn defer_checks(&self, ids: Vec<VersionId>) {
        if ids.is_empty() {
            return;
        }
        self.inner.current().set_unchecked(ids);
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name("kek-canary-sweep".into())
            .spawn(move || inner.sweep_canaries());
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the background canary sweep; each version is proven before its first use");
        }
    }

    /// Installs the function that reads the PIN source again (once; later calls are ignored).
    /// It is called before each re-login and by [`Hsm::reload_pin`].
    pub fn set_pin_source(&self, source: PinSource) {
        let _ = self.inner.pin_source.set(source);
    }

    /// Re-reads the PIN source now (SIGHUP): the next re-login uses what it holds. Logs
    /// whether a PIN the token refused is replaced (never the PIN itself).
    pub fn reload_pin(&self) {
        match self.inner.read_pin_source() {
            None => tracing::info!("SIGHUP: no PIN source to re-read"),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "SIGHUP: cannot re-read the PIN source; keeping the PIN read before");
            }
            Some(Ok(())) => match self.inner.pin_for_login() {
                Ok(_) => tracing::info!("SIGHUP: PIN source re-read"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: PIN source re-read, but it holds the PIN the token refused")
                }
            },
        }
    }

    /// Installs the metrics hook (once; later calls are ignored).
    pub fn set_observer(&self, observer: Arc<dyn HsmObserver>) {
        let _ = self.inner.observer.set(observer);
    }

    /// How busy the session pool is.
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.admission.stats()
    }

    /// Sessions in the pool (how many batch chunks can run at once).
    pub fn sessions(&self) -> usize {
        self.inner.summary.sessions
    }

    /// Closes the HSM for a clean shutdown: refuses new work, lets calls in flight finish
    /// (for at most `drain`), closes every session (which logs out) and calls `C_Finalize`.
    pub async fn close(&self, drain: Duration) {
        let inner = self.inner.clone();
        inner.closed.store(true, Ordering::SeqCst);
        inner.admission.close();
        let done = tokio::task::spawn_blocking(move || {
            let until = Instant::now() + drain;
            while inner.admission.stats().in_use > 0 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            // Waits (within the drain) for a re-initialisation attempt or canary sweep in
            // progress; none starts after this. One that is stuck in the module keeps the lock:
            // then, as with calls still running, no C_Finalize.
            let reinit = loop {
                match inner.reinit_lock.try_lock() {
                    Ok(g) => break Some(g),
                    Err(std::sync::TryLockError::Poisoned(p)) => break Some(p.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(std::sync::TryLockError::WouldBlock) => break None,
                }
            };
            let busy = inner.admission.stats().in_use;
            inner.set_health(false, "shut down");
            if reinit.is_none() {
                tracing::warn!(
                    calls_still_running = busy,
                    "HSM closed without closing sessions or C_Finalize: a re-initialisation is \
                     still inside the module after the drain"
                );
                return;
            }
            let closed = inner.current().close_all();
            if busy > 0 {
                // C_Finalize while another thread is inside the module is undefined behaviour
                // for PKCS#11; the OS releases the sessions when the process exits. The pool's
                // HSM threads are not the runtime's: its shutdown does not wait for them, so a
                // hung call does not hold up the exit.
                tracing::warn!(
                    sessions_closed = closed,
                    calls_still_running = busy,
                    "HSM closed without C_Finalize: calls still inside the module after the drain"
                );
                return;
            }
            let finalized = inner.ctx.clone().finalize();
            match finalized {
                Ok(()) => tracing::info!(
                    sessions_closed = closed,
                    calls_still_running = busy,
                    "HSM closed: sessions closed, logged out, C_Finalize"
                ),
                Err(e) => tracing::warn!(error = %HsmError::from_ck("C_Finalize", e),
                    sessions_closed = closed, "HSM closed, but C_Finalize failed"),
            }
        })
        .await;
        if let Err(e) = done {
            tracing::error!(error = %e, "closing the HSM failed");
        }
    }
}

/// How long a shutdown waits for HSM calls still in flight (the same bound as a
/// re-initialisation).
pub fn recovery_drain() -> Duration {
    recovery::DRAIN
}

impl Inner {
    /// The current generation.
    fn current(&self) -> Arc<Conn> {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The PIN for the next login.
    fn pin(&self) -> SecretString {
        self.pin.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the PIN source into `pin`; `None` without a source.
    fn read_pin_source(&self) -> Option<Result<(), String>> {
        let read = (self.pin_source.get()?)();
        Some(read.map(|p| *self.pin.lock().unwrap_or_else(|e| e.into_inner()) = p))
    }

    /// The PIN to log in with, after re-reading its source; refused (no `C_Login`) while the
    /// source still holds the value the token refused.
    fn pin_for_login(&self) -> Result<SecretString, HsmError> {
        use secrecy::ExposeSecret;
        if let Some(Err(e)) = self.read_pin_source() {
            tracing::warn!(error = %e, "cannot re-read the PIN source; using the PIN read before");
        }
        let pin = self.pin();
        let mut refused = self.pin_refused.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = refused.as_ref() {
            if r.expose_secret() == pin.expose_secret() {
                return Err(HsmError::new(
                    FaultKind::Login,
                    "log in to the token",
                    "the token refused this PIN (CKR_PIN_INCORRECT) and the PIN source still \
                     holds it: not trying it again (a token that counts failed logins would \
                     lock the user PIN); put the new PIN in the PIN source",
                ));
            }
            *refused = None;
            tracing::warn!(
                "the PIN source holds a new PIN since the token refused the last one: logging in with it"
            );
        }
        Ok(pin)
    }

    /// Records a failed login: a PIN the token refused is never tried again.
    fn login_failed(&self, pin: &SecretString, e: &HsmError) {
        if e.rv == Some(cryptoki::error::RvError::PinIncorrect) {
            *self.pin_refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(pin.clone());
            tracing::error!(
                "ALERT: the token refused the user PIN (CKR_PIN_INCORRECT): the HSM is \
                 NOT_SERVING, and this PIN is not tried again until the PIN source (hsm.pin_file, \
                 hsm.pin_env or pin-source in hsm.uri) holds another one; update it (SIGHUP \
                 re-reads it at once, each re-login attempt re-reads it anyway)"
            );
        }
    }

    fn remember(&self, e: ExpectedKek) {
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(e.id, e);
    }

    fn forget(&self, id: VersionId) {
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// What is known of one version (to find and check its objects).
    fn known_one(&self, id: VersionId) -> Option<ExpectedKek> {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Every known version (for a pass over the token).
    fn known_all(&self) -> Vec<ExpectedKek> {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
