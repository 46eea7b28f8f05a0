//! The HSM layer: the only code that touches `cryptoki` (STYLE rule 1).
//!
//! It owns the PKCS#11 module (loaded once per process), the login, a pool of sessions, the
//! cache of object handles for every KEK version, the start-up capability probe, and recovery
//! from the faults a real HSM has. Everything above it speaks domain types: [`VersionId`],
//! [`Dek`], [`WrapParams`].
//!
//! Every PKCS#11 call runs on a blocking thread with a session checked out of the pool (STYLE
//! rule 2), after [`admission`] let it in: bounded queues, a wait bounded by the request's
//! deadline and `session_wait_ms`, round-robin between tenants. A call waits in that queue as a
//! job, and the blocking thread that finishes one call runs the next queued one at once (under
//! load a call costs one thread hand-off, its result, not three). Work whose deadline
//! has passed is not started; a call that does not return by its deadline is abandoned by the
//! request (the blocking thread waits for the HSM, and its session returns to the pool when the
//! call does), so a hung HSM cannot hang the server.
//!
//! Faults are classified once ([`error`]) and the class drives recovery (STYLE rule 3):
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
//!   its first use. See [`conn`] for why a re-initialisation replaces every session and object
//!   handle at once, and [`recovery`] for the steps.
//!
//! Layout:
//! * [`error`] — classification of PKCS#11 return values (drives recovery and status codes);
//! * [`admission`] — bounded, deadline-aware, tenant-fair admission to the session pool;
//! * [`conn`] — the sessions and handles of one initialisation of the module;
//! * [`recovery`] — health, re-initialisation and handle refresh;
//! * [`template`] — the fixed KEK template and its read-back check;
//! * [`probe`] — mechanism list and known-answer tests at start-up;
//! * [`profile`] — the table of vendor quirks (RFC 5649 number, session cap, throttling, ...);
//! * [`ops`] — the blocking operations on one session.

pub mod admission;
mod conn;
pub mod domain;
pub mod error;
pub(crate) mod kat_rsa;
pub mod ops;
pub mod probe;
pub mod profile;
mod recovery;
mod replica;
pub mod template;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::{Error as CkError, RvError},
    mechanism::Mechanism,
    object::{Attribute, AttributeType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    slot::{Limit, Slot},
};
use secrecy::SecretString;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};

use self::{
    admission::{Admission, AdmissionSettings, Refused, SYSTEM_TENANT},
    conn::Conn,
};
pub use self::{
    admission::{PoolStats, RequestScope},
    error::{FaultKind, HsmError},
    ops::{KwpMechanism, WrapParams},
    probe::Capabilities,
    profile::Profile,
    recovery::Health,
    template::KekSpec,
};
use crate::model::{Algorithm, Dek, KeyType, Origin, VersionId};

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
}

/// The object handles of one KEK version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KekHandles {
    /// The secret key (AES) or private key (RSA).
    pub secret: ObjectHandle,
    /// The public key (RSA only).
    pub public: Option<ObjectHandle>,
}

/// A value wrapped under a KEK version when it was created, with the SHA-256 of the value: if
/// it unwraps to that value, the object is the key the version was created with.
#[derive(Clone, Debug)]
pub struct Canary {
    /// How to unwrap it.
    pub params: WrapParams,
    /// The wrapped value.
    pub ciphertext: Vec<u8>,
    /// SHA-256 of the value.
    pub digest: Vec<u8>,
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
}

/// A handle to the HSM: cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Pkcs11,
    token: TokenSelector,
    pin: SecretString,
    pool_size: usize,
    summary: TokenSummary,
    caps: Capabilities,
    kwp: Option<KwpMechanism>,
    profile: &'static Profile,
    /// The current generation (see [`conn`]).
    conn: RwLock<Arc<Conn>>,
    admission: Arc<Admission>,
    call_timeout: Duration,
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

/// How an operation may be retried and abandoned.
#[derive(Clone, Copy, Debug)]
struct CallKind {
    /// Safe to run again after a lost session or an invalid handle (no object is created).
    retry: bool,
    /// The caller may stop waiting at its deadline (nothing is left half-done in the broker's
    /// own state if the call completes later).
    abandon: bool,
}

/// Reads, wraps and unwraps: repeatable, and abandoned at the deadline.
const READ: CallKind = CallKind {
    retry: true,
    abandon: true,
};
/// Object creation: never repeated (the object may exist), never abandoned once started.
const CREATE: CallKind = CallKind {
    retry: false,
    abandon: false,
};
/// Finding and destroying objects: repeatable, never abandoned once started.
const MAINTAIN: CallKind = CallKind {
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

impl Hsm {
    /// Loads the module, finds the token, logs in, runs the capability probe and opens the
    /// session pool. Blocking: call it from a blocking thread.
    pub fn open(settings: &HsmSettings) -> Result<Self, HsmError> {
        let module = &settings.module;
        if !module.exists() {
            return Err(HsmError::setup(
                "load the PKCS#11 module",
                format!("{} does not exist", module.display()),
            ));
        }
        let configured = match settings.profile.as_deref() {
            None => None,
            Some(name) => Some(profile::by_name(name).ok_or_else(|| {
                HsmError::setup(
                    "select the vendor profile",
                    format!(
                        "unknown profile {name:?}; known: auto, {}",
                        profile::names().join(", ")
                    ),
                )
            })?),
        };
        let module_name = module.display().to_string();
        // A module that needs C_Initialize's pReserved cannot be driven without unsafe code:
        // refuse it before loading, whether configured or recognised by its file name.
        let early = configured.unwrap_or_else(|| profile::detect(&[&module_name]));
        if let Some(reserved) = early.init_reserved {
            return Err(unsupported_init(early, reserved));
        }
        let ctx = Pkcs11::new(module)
            .map_err(|e| HsmError::from_ck(format!("load {}", module.display()), e))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => {
                let mut err = HsmError::from_ck("C_Initialize", e);
                if err.rv == Some(RvError::ArgumentsBad) {
                    err.detail.push_str(
                        " (this module may need C_Initialize pReserved arguments, which keybroker \
                         cannot pass: see the nss-softoken profile)",
                    );
                }
                return Err(err);
            }
        }
        let library = ctx
            .get_library_info()
            .map(|i| {
                format!(
                    "{} {} ({})",
                    i.library_description().trim(),
                    i.library_version(),
                    i.manufacturer_id().trim()
                )
            })
            .unwrap_or_else(|_| "unknown".into());
        let (slot, info) = select_token(&ctx, &settings.token)?;
        let profile = configured.unwrap_or_else(|| {
            profile::detect(&[info.manufacturer_id(), info.model(), &library, &module_name])
        });
        if let Some(reserved) = profile.init_reserved {
            return Err(unsupported_init(profile, reserved));
        }
        let anchor = open_and_login(&ctx, slot, &settings.pin)?;
        let caps = probe::probe(&ctx, slot, &anchor, profile)?;
        // One session is the anchor; the token's own limit and the profile's both cap the pool.
        let token_max = match info.max_session_count() {
            Limit::Max(n) if n > 1 => usize::try_from(n - 1).unwrap_or(usize::MAX),
            _ => usize::MAX,
        };
        let profile_max = profile
            .max_sessions
            .map(|n| n.saturating_sub(1).max(1))
            .unwrap_or(usize::MAX);
        let sessions = settings.sessions.clamp(1, token_max.min(profile_max));
        let idle = open_pool(&ctx, slot, sessions)?;
        let summary = TokenSummary {
            library,
            slot: slot.id(),
            label: info.label().trim().to_string(),
            manufacturer: info.manufacturer_id().trim().to_string(),
            model: info.model().trim().to_string(),
            serial: info.serial_number().trim().to_string(),
            sessions,
            profile: profile.name,
            profile_configured: configured.is_some(),
        };
        let kwp = caps.kwp.as_ref().map(|k| k.kind);
        let admission = Admission::new(AdmissionSettings {
            slots: sessions,
            max_wait: settings.acquire_timeout,
            queue_limit: settings.queue_limit.max(1),
            tenant_queue_limit: settings.tenant_queue_limit.max(1),
            tenant_max_slots: settings.tenant_max_sessions.unwrap_or(sessions),
        });
        let (health, _) = watch::channel(Health::serving(1));
        Ok(Self {
            inner: Arc::new(Inner {
                ctx,
                token: settings.token.clone(),
                pin: settings.pin.clone(),
                pool_size: sessions,
                summary,
                caps,
                kwp,
                profile,
                conn: RwLock::new(Arc::new(Conn::new(1, slot, idle, anchor))),
                admission,
                call_timeout: settings.call_timeout,
                health,
                known: RwLock::new(HashMap::new()),
                audit_key_id: Mutex::new(None),
                recovering: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                reinitialisations: AtomicU64::new(0),
                object_lock: Mutex::new(()),
                reinit_lock: Mutex::new(()),
                observer: OnceLock::new(),
            }),
        })
    }

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

    /// Installs the metrics hook (once; later calls are ignored).
    pub fn set_observer(&self, observer: Arc<dyn HsmObserver>) {
        let _ = self.inner.observer.set(observer);
    }

    /// How busy the session pool is.
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.admission.stats()
    }

    /// Runs `f` with a pooled session on a blocking thread, after admission (see the module
    /// docs). Recovery from lost sessions, invalid handles and lost devices happens inside.
    async fn run<T, F>(&self, what: &'static str, kind: CallKind, f: F) -> Result<T, HsmError>
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
        // The call waits in the admission queue as a job; whichever blocking thread frees a
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

    /// Generates a KEK version inside the token from the fixed template, reads its attributes
    /// back and checks them, and caches its handles. On any failure the new objects are
    /// destroyed. Never retried after a lost session (the object may exist: the caller's
    /// two-phase creation rolls it back by id).
    pub async fn generate_kek(&self, spec: KekSpec) -> Result<(), HsmError> {
        let mech = self
            .inner
            .caps
            .mechanism_for(spec.algorithm)
            .ok_or_else(|| {
                HsmError::new(
                    FaultKind::NotPermitted,
                    "generate a KEK",
                    self.inner.caps.why_not(spec.algorithm),
                )
            })?;
        self.run("generate a KEK", CREATE, move |inner, conn, s| {
            let _guard = inner.object_lock.lock().unwrap_or_else(|p| p.into_inner());
            let handles = if let Some(bits) = spec.key_type.rsa_bits() {
                let (pubt, privt) = template::rsa_templates(&spec, bits, mech);
                let (public, private) = s
                    .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &pubt, &privt)
                    .map_err(|e| HsmError::from_ck("C_GenerateKeyPair", e))?;
                KekHandles {
                    secret: private,
                    public: Some(public),
                }
            } else {
                let secret = s
                    .generate_key(&Mechanism::AesKeyGen, &template::aes_template(&spec, mech))
                    .map_err(|e| HsmError::from_ck("C_GenerateKey", e))?;
                KekHandles {
                    secret,
                    public: None,
                }
            };
            inner.install(conn, s, &spec, handles, mech, Origin::Generated)?;
            Ok(())
        })
        .await
    }

    /// Destroys every object with this id (an aborted creation, or a purge) and forgets its
    /// handles. Returns how many objects were destroyed.
    pub async fn destroy_kek(&self, id: VersionId) -> Result<usize, HsmError> {
        self.run("destroy a KEK", MAINTAIN, move |inner, conn, s| {
            let _guard = inner.object_lock.lock().unwrap_or_else(|p| p.into_inner());
            let found = s
                .find_objects(&[Attribute::Id(id.as_bytes().to_vec())])
                .map_err(|e| HsmError::from_ck("C_FindObjects", e))?;
            let mut n = 0;
            for h in found {
                // Kryoptic lists mechanism objects too; only key objects carry our ids, but
                // filter on class to be sure.
                if is_key_object(s, h) {
                    s.destroy_object(h)
                        .map_err(|e| HsmError::from_ck("C_DestroyObject", e))?;
                    n += 1;
                }
            }
            conn.handles
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            inner.forget(id);
            Ok(n)
        })
        .await
    }

    /// Finds the objects of every expected KEK version in one pass over the token (never one
    /// search per key: `C_FindObjects` costs ~15 µs per object scanned on SoftHSM2), checks
    /// each one's template, and caches the handles of those that pass. They are also the
    /// versions re-found after a re-initialisation.
    pub async fn attach(&self, expected: Vec<ExpectedKek>) -> Result<AttachReport, HsmError> {
        self.run("attach the KEKs", MAINTAIN, move |inner, conn, s| {
            let (report, handles) = find_keks(inner, s, &expected, true)?;
            {
                let mut known = inner.known.write().unwrap_or_else(|p| p.into_inner());
                known.clear();
                for e in &expected {
                    if handles.contains_key(&e.id) {
                        known.insert(e.id, e.clone());
                    }
                }
            }
            *conn.handles.write().unwrap_or_else(|p| p.into_inner()) = handles;
            Ok(report)
        })
        .await
    }

    /// Forgets the handles of a version (it will refuse to serve).
    pub fn detach(&self, id: VersionId) {
        self.inner
            .current()
            .handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.inner.forget(id);
    }

    /// Records the canary of a version (made after its object), so that a re-initialisation
    /// re-checks its identity.
    pub fn set_canary(&self, id: VersionId, canary: Canary) {
        if let Some(e) = self
            .inner
            .known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id)
        {
            e.canary = Some(canary);
        }
    }

    /// Wraps a DEK under a version.
    pub async fn wrap(
        &self,
        id: VersionId,
        params: WrapParams,
        dek: Dek,
    ) -> Result<Vec<u8>, HsmError> {
        self.run("wrap", READ, move |inner, conn, s| {
            let (h, kwp) = inner.key_for(conn, s, id, &params, true)?;
            ops::wrap(s, h, kwp, &params, &dek)
        })
        .await
    }

    /// Unwraps a DEK with a version.
    pub async fn unwrap(
        &self,
        id: VersionId,
        params: WrapParams,
        ciphertext: Vec<u8>,
    ) -> Result<Dek, HsmError> {
        self.run("unwrap", READ, move |inner, conn, s| {
            let (h, kwp) = inner.key_for(conn, s, id, &params, false)?;
            ops::unwrap(s, h, kwp, &params, &ciphertext)
        })
        .await
    }

    /// Draws a DEK of `len` bytes from the token's RNG and wraps it, in one session checkout.
    pub async fn generate_and_wrap(
        &self,
        id: VersionId,
        params: WrapParams,
        len: usize,
    ) -> Result<(Dek, Vec<u8>), HsmError> {
        self.run("generate a data key", READ, move |inner, conn, s| {
            let (h, kwp) = inner.key_for(conn, s, id, &params, true)?;
            let dek = ops::random(s, len)?;
            let wrapped = ops::wrap(s, h, kwp, &params, &dek)?;
            Ok((dek, wrapped))
        })
        .await
    }

    /// Unwraps with one version and wraps again with another, in one session checkout; the
    /// DEK never leaves this call.
    pub async fn rewrap(
        &self,
        from: (VersionId, WrapParams, Vec<u8>),
        to: (VersionId, WrapParams),
    ) -> Result<Vec<u8>, HsmError> {
        self.run("rewrap", READ, move |inner, conn, s| {
            let (h_from, kwp) = inner.key_for(conn, s, from.0, &from.1, false)?;
            let dek = ops::unwrap(s, h_from, kwp, &from.1, &from.2)?;
            let (h_to, kwp) = inner.key_for(conn, s, to.0, &to.1, true)?;
            ops::wrap(s, h_to, kwp, &to.1, &dek)
        })
        .await
    }

    /// Wraps many DEKs in one session checkout (a batch chunk). The outer error is a session-
    /// level fault (the whole chunk is retried once on a lost session); each item has its own
    /// result.
    pub async fn wrap_many(
        &self,
        items: Vec<(VersionId, WrapParams, Dek)>,
    ) -> Result<Vec<Result<Vec<u8>, HsmError>>, HsmError> {
        self.run("wrap (batch)", READ, move |inner, conn, s| {
            let mut out = Vec::with_capacity(items.len());
            for (id, params, dek) in &items {
                let r = inner
                    .key_for(conn, s, *id, params, true)
                    .and_then(|(h, kwp)| ops::wrap(s, h, kwp, params, dek));
                if let Err(e) = &r
                    && chunk_fault(e)
                {
                    return Err(e.clone());
                }
                out.push(r);
            }
            Ok(out)
        })
        .await
    }

    /// Unwraps many ciphertexts in one session checkout, as [`Hsm::wrap_many`].
    pub async fn unwrap_many(
        &self,
        items: Vec<(VersionId, WrapParams, Vec<u8>)>,
    ) -> Result<Vec<Result<Dek, HsmError>>, HsmError> {
        self.run("unwrap (batch)", READ, move |inner, conn, s| {
            let mut out = Vec::with_capacity(items.len());
            for (id, params, ct) in &items {
                let r = inner
                    .key_for(conn, s, *id, params, false)
                    .and_then(|(h, kwp)| ops::unwrap(s, h, kwp, params, ct));
                if let Err(e) = &r
                    && chunk_fault(e)
                {
                    return Err(e.clone());
                }
                out.push(r);
            }
            Ok(out)
        })
        .await
    }

    /// Draws and wraps many DEKs in one session checkout, as [`Hsm::wrap_many`].
    pub async fn generate_many(
        &self,
        items: Vec<(VersionId, WrapParams, usize)>,
    ) -> Result<Vec<Result<(Dek, Vec<u8>), HsmError>>, HsmError> {
        self.run("generate data keys (batch)", READ, move |inner, conn, s| {
            let mut out = Vec::with_capacity(items.len());
            for (id, params, len) in &items {
                let r = inner
                    .key_for(conn, s, *id, params, true)
                    .and_then(|(h, kwp)| {
                        let dek = ops::random(s, *len)?;
                        let ct = ops::wrap(s, h, kwp, params, &dek)?;
                        Ok((dek, ct))
                    });
                if let Err(e) = &r
                    && chunk_fault(e)
                {
                    return Err(e.clone());
                }
                out.push(r);
            }
            Ok(out)
        })
        .await
    }

    /// Sessions in the pool (how many batch chunks can run at once).
    pub fn sessions(&self) -> usize {
        self.inner.summary.sessions
    }

    /// Proves many versions' identities in one HSM call (start-up): for each, `None` if its
    /// canary unwraps to the recorded value, else why not. An HSM fault fails the whole call.
    pub async fn check_canaries(
        &self,
        items: Vec<(VersionId, Canary)>,
    ) -> Result<Vec<(VersionId, Option<String>)>, HsmError> {
        let items = Arc::new(items);
        self.run("prove KEK identities", READ, move |inner, conn, s| {
            items
                .iter()
                .map(|(id, c)| {
                    let verdict = match conn.handles_of(*id) {
                        Ok(h) => canary_verdict(inner, s, &h, c)?,
                        Err(_) => Some("its HSM object is not attached".to_string()),
                    };
                    Ok((*id, verdict))
                })
                .collect()
        })
        .await
    }

    /// Reads the public key of an RSA version.
    pub async fn public_key(&self, id: VersionId) -> Result<RsaPublic, HsmError> {
        self.run("read a public key", READ, move |inner, conn, s| {
            inner.ensure_verified(conn, s, id)?;
            let h = conn.handles_of(id)?.public.ok_or_else(|| {
                HsmError::new(
                    FaultKind::NotPermitted,
                    "read a public key",
                    "not an RSA key",
                )
            })?;
            let attrs = s
                .get_attributes(h, &[AttributeType::Modulus, AttributeType::PublicExponent])
                .map_err(|e| HsmError::from_ck("C_GetAttributeValue", e))?;
            let mut pk = RsaPublic {
                modulus: Vec::new(),
                exponent: Vec::new(),
            };
            for a in attrs {
                match a {
                    Attribute::Modulus(m) => pk.modulus = m,
                    Attribute::PublicExponent(e) => pk.exponent = e,
                    _ => {}
                }
            }
            if pk.modulus.is_empty() || pk.exponent.is_empty() {
                return Err(HsmError::new(
                    FaultKind::Other,
                    "read a public key",
                    "token returned no modulus/exponent",
                ));
            }
            Ok(pk)
        })
        .await
    }

    /// A cheap liveness check: one `C_GenerateRandom` through the pool.
    pub async fn ping(&self) -> Result<(), HsmError> {
        self.run("ping the HSM", READ, |_, _, s| {
            ops::random(s, 8).map(|_| ())
        })
        .await
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
                // for PKCS#11; the OS releases the sessions when the process exits.
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

/// The label prefix of BYOK key-exchange keys.
pub const IMPORT_KEY_LABEL: &str = "kb-import:";

/// The label prefix of the audit HMAC key (not `kb:`, so it is never reported as an orphan KEK).
pub const AUDIT_KEY_LABEL: &str = "kb-audit:hmac-sha256";

impl Hsm {
    /// Finds the audit trail's HMAC key by id, or creates it when `id` is `None` (first start).
    /// The key is a token object: sensitive, never extractable, not modifiable or copyable,
    /// SIGN+VERIFY only, `CKA_ALLOWED_MECHANISMS` = `CKM_SHA256_HMAC`. Someone who can write the
    /// audit file cannot forge a checkpoint without this key. Fails if `id` names a key that is
    /// missing or duplicated (fail closed: never silently re-created).
    pub async fn ensure_audit_key(&self, id: Option<VersionId>) -> Result<VersionId, HsmError> {
        let kind = if id.is_some() { MAINTAIN } else { CREATE };
        self.run(
            "find or create the audit key",
            kind,
            move |inner, conn, s| {
                let _guard = inner.object_lock.lock().unwrap_or_else(|p| p.into_inner());
                let (id, handle) = match id {
                    Some(id) => (id, find_audit_key(s, id)?),
                    None => {
                        let id = VersionId::random();
                        let h = s
                            .generate_key(
                                &Mechanism::GenericSecretKeyGen,
                                &template::hmac_key_template(id, AUDIT_KEY_LABEL, None),
                            )
                            .map_err(|e| HsmError::from_ck("generate the audit HMAC key", e))?;
                        (id, h)
                    }
                };
                *conn.audit_key.write().unwrap_or_else(|p| p.into_inner()) = Some(handle);
                *inner.audit_key_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
                Ok(id)
            },
        )
        .await
    }

    /// HMAC-SHA256 of `data` with the audit key, computed inside the HSM.
    pub async fn audit_mac(&self, data: Vec<u8>) -> Result<Vec<u8>, HsmError> {
        self.run("MAC an audit checkpoint", READ, move |inner, conn, s| {
            let h = inner.audit_handle(conn, s)?;
            s.sign(&Mechanism::Sha256Hmac, h, &data)
                .map_err(|e| HsmError::from_ck("C_Sign (HMAC)", e))
        })
        .await
    }

    /// Verifies an audit checkpoint MAC inside the HSM.
    pub async fn audit_verify(&self, data: Vec<u8>, mac: Vec<u8>) -> Result<bool, HsmError> {
        self.run("verify an audit checkpoint", READ, move |inner, conn, s| {
            let h = inner.audit_handle(conn, s)?;
            match s.verify(&Mechanism::Sha256Hmac, h, &data, &mac) {
                Ok(()) => Ok(true),
                Err(CkError::Pkcs11(RvError::SignatureInvalid | RvError::SignatureLenRange, _)) => {
                    Ok(false)
                }
                Err(e) => Err(HsmError::from_ck("C_Verify (HMAC)", e)),
            }
        })
        .await
    }

    /// BYOK step 1: generates an RSA key-exchange key (token objects labelled `kb-import:`)
    /// whose private half may only unwrap, with RSA-OAEP, and returns its public key.
    pub async fn create_import_key(&self, id: VersionId, bits: u32) -> Result<RsaPublic, HsmError> {
        self.run("create an import key", CREATE, move |inner, _, s| {
            use cryptoki::object::KeyType as CkKeyType;
            let _guard = inner.object_lock.lock().unwrap_or_else(|p| p.into_inner());
            let label = format!("{IMPORT_KEY_LABEL}{id}").into_bytes();
            let oaep = cryptoki::mechanism::MechanismType::RSA_PKCS_OAEP;
            let (public, private) = s
                .generate_key_pair(
                    &Mechanism::RsaPkcsKeyPairGen,
                    &[
                        Attribute::Class(ObjectClass::PUBLIC_KEY),
                        Attribute::KeyType(CkKeyType::RSA),
                        Attribute::ModulusBits(u64::from(bits).into()),
                        Attribute::PublicExponent(vec![1, 0, 1]),
                        Attribute::Token(true),
                        Attribute::Private(false),
                        Attribute::Modifiable(false),
                        Attribute::Encrypt(false),
                        Attribute::Wrap(false),
                        Attribute::Verify(false),
                        Attribute::Derive(false),
                        Attribute::Id(id.as_bytes().to_vec()),
                        Attribute::Label(label.clone()),
                    ],
                    &[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::KeyType(CkKeyType::RSA),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Modifiable(false),
                        Attribute::Copyable(false),
                        Attribute::Unwrap(true),
                        Attribute::Decrypt(false),
                        Attribute::Sign(false),
                        Attribute::SignRecover(false),
                        Attribute::Derive(false),
                        Attribute::AllowedMechanisms(vec![oaep]),
                        Attribute::Id(id.as_bytes().to_vec()),
                        Attribute::Label(label),
                    ],
                )
                .map_err(|e| HsmError::from_ck("generate the import key", e))?;
            let attrs = s
                .get_attributes(
                    public,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .map_err(|e| HsmError::from_ck("read the import key", e));
            let attrs = match attrs {
                Ok(a) => a,
                Err(e) => {
                    ops::destroy_quietly(s, public);
                    ops::destroy_quietly(s, private);
                    return Err(e);
                }
            };
            let mut pk = RsaPublic {
                modulus: Vec::new(),
                exponent: Vec::new(),
            };
            for a in attrs {
                match a {
                    Attribute::Modulus(m) => pk.modulus = m,
                    Attribute::PublicExponent(e) => pk.exponent = e,
                    _ => {}
                }
            }
            Ok(pk)
        })
        .await
    }

    /// BYOK step 2, the CKM_RSA_AES_KEY_WRAP construction done in two steps inside the HSM
    /// (SoftHSM2 lacks the combined mechanism): RSA-OAEP-unwrap the customer's ephemeral AES key
    /// into a short-lived session object that may only unwrap, then RFC 5649-unwrap the key
    /// material with it into a token KEK with the standard template. The ephemeral key is
    /// destroyed whatever happens; the new KEK is checked like any other (as imported).
    pub async fn import_kek(
        &self,
        import_id: VersionId,
        oaep: Algorithm,
        material: Vec<u8>,
        spec: KekSpec,
    ) -> Result<(), HsmError> {
        let mech = self
            .inner
            .caps
            .mechanism_for(spec.algorithm)
            .ok_or_else(|| {
                HsmError::new(
                    FaultKind::NotPermitted,
                    "import a KEK",
                    self.inner.caps.why_not(spec.algorithm),
                )
            })?;
        let kwp = self.inner.kwp.ok_or_else(|| {
            HsmError::new(
                FaultKind::NotPermitted,
                "import a KEK",
                "the token has no usable RFC 5649 mechanism",
            )
        })?;
        self.run("import a KEK", CREATE, move |inner, conn, s| {
            use cryptoki::object::KeyType as CkKeyType;
            let _guard = inner.object_lock.lock().unwrap_or_else(|p| p.into_inner());
            let found = s
                .find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Id(import_id.as_bytes().to_vec()),
                ])
                .map_err(|e| HsmError::from_ck("C_FindObjects", e))?;
            let [private] = found.as_slice() else {
                return Err(HsmError::new(
                    FaultKind::NotPermitted,
                    "import a KEK",
                    "no such import key",
                ));
            };
            let modulus = s
                .get_attributes(*private, &[AttributeType::Modulus])
                .map_err(|e| HsmError::from_ck("read the import key", e))?
                .into_iter()
                .find_map(|a| {
                    if let Attribute::Modulus(m) = a {
                        Some(m)
                    } else {
                        None
                    }
                })
                .unwrap_or_default();
            let k = modulus.len();
            if k == 0 || material.len() < k + 24 {
                return Err(HsmError::new(
                    FaultKind::DataInvalid,
                    "import a KEK",
                    "wrapped material is too short",
                ));
            }
            let (rsa_part, kwp_part) = material.split_at(k);
            // RFC 5649 of a 256-bit key is 40 bytes. (SoftHSM2 reports CKA_VALUE_LEN = 0 for
            // unwrapped keys and refuses it in an unwrap template, so the length is checked here
            // and, where the token reports it, again below.)
            if kwp_part.len() != 40 {
                return Err(HsmError::new(
                    FaultKind::DataInvalid,
                    "import a KEK",
                    format!(
                        "the AES key wrap part is {} bytes; a 256-bit key wraps to 40",
                        kwp_part.len()
                    ),
                ));
            }
            let ephemeral = s
                .unwrap_key(
                    &ops::oaep_mechanism(oaep),
                    *private,
                    rsa_part,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(CkKeyType::AES),
                        Attribute::Token(false),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Unwrap(true),
                        Attribute::Wrap(false),
                        Attribute::Encrypt(false),
                        Attribute::Decrypt(false),
                        Attribute::Sign(false),
                        Attribute::Verify(false),
                        Attribute::Derive(false),
                    ],
                )
                .map_err(|e| {
                    HsmError::from_ck_decrypt("RSA-OAEP unwrap of the ephemeral key", e)
                })?;
            let mut template = template::aes_template(&spec, mech);
            template.retain(|a| a.attribute_type() != AttributeType::ValueLen);
            let unwrapped = s.unwrap_key(&kwp.mechanism(), ephemeral, kwp_part, &template);
            ops::destroy_quietly(s, ephemeral);
            let secret = unwrapped
                .map_err(|e| HsmError::from_ck_decrypt("AES key unwrap of the key material", e))?;
            let handles = KekHandles {
                secret,
                public: None,
            };
            let len = s
                .get_attributes(secret, &[AttributeType::ValueLen])
                .map_err(|e| HsmError::from_ck("read the imported key", e))?
                .into_iter()
                .find_map(|a| {
                    if let Attribute::ValueLen(l) = a {
                        Some(u64::from(l))
                    } else {
                        None
                    }
                });
            if !matches!(len, Some(32) | Some(0)) {
                destroy_handles(s, &handles);
                return Err(HsmError::new(
                    FaultKind::DataInvalid,
                    "import a KEK",
                    "the key material is not a 256-bit AES key",
                ));
            }
            inner.install(conn, s, &spec, handles, mech, Origin::Imported)?;
            Ok(())
        })
        .await
    }
}

impl Inner {
    /// The last step of making a KEK (generated, imported or restored): reads its template back
    /// and checks it (destroying the new objects if the token did not honour it), caches its
    /// handles and remembers it for re-initialisations.
    fn install(
        &self,
        conn: &Conn,
        s: &Session,
        spec: &KekSpec,
        handles: KekHandles,
        mech: cryptoki::mechanism::MechanismType,
        origin: Origin,
    ) -> Result<(), HsmError> {
        let problems = check_template(s, &handles, spec.algorithm, mech, origin)?;
        if !problems.is_empty() {
            destroy_handles(s, &handles);
            return Err(HsmError::new(
                FaultKind::Setup,
                "check a new KEK's template",
                format!(
                    "the token did not honour the KEK template ({}): {}",
                    origin.as_str(),
                    problems.join("; ")
                ),
            ));
        }
        conn.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.id, handles);
        self.remember(ExpectedKek {
            id: spec.id,
            key_type: spec.key_type,
            algorithm: spec.algorithm,
            origin,
            canary: None,
        });
        Ok(())
    }

    /// Tells the metrics hook about one call that got a session.
    fn observe<T>(&self, what: &'static str, started: Instant, result: &Result<T, HsmError>) {
        if let Some(o) = self.observer.get() {
            o.hsm_call(
                what,
                started.elapsed(),
                result.as_ref().err().map(|e| e.kind),
            );
        }
    }

    /// The handle to use for `params` and the RFC 5649 mechanism, once the version's identity
    /// is proven on this generation (see [`Inner::ensure_verified`]).
    fn key_for(
        &self,
        conn: &Conn,
        s: &Session,
        id: VersionId,
        params: &WrapParams,
        wrapping: bool,
    ) -> Result<(ObjectHandle, KwpMechanism), HsmError> {
        self.ensure_verified(conn, s, id)?;
        conn.key_for(self.kwp, id, params, wrapping)
    }

    /// The current generation.
    fn current(&self) -> Arc<Conn> {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Refuses at once while the HSM is known to be down (UNAVAILABLE) or shut down.
    fn usable(&self, what: &'static str) -> Result<(), HsmError> {
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

    /// Runs `f` on a session of the current generation. A lost session is evicted and `f` runs
    /// once more on a fresh one; an invalid object handle makes the handles be re-found and `f`
    /// run once more (both only for `kind.retry`). A lost device starts recovery.
    fn with_session<T>(
        self: &Arc<Self>,
        what: &'static str,
        kind: CallKind,
        f: impl Fn(&Conn, &Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let conn = self.current();
        let mut session_retry = kind.retry;
        let mut handle_retry = kind.retry;
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

    /// Re-classifies a fault where the vendor profile knows better (see [`reclassify`]).
    fn apply_profile(&self, session: &Session, e: HsmError) -> HsmError {
        if e.rv != Some(RvError::DeviceError) {
            return e;
        }
        let alive = || session.get_session_info().is_ok();
        reclassify(self.profile, e, alive)
    }
}

/// A fault in one item of a batch chunk that is really about the session or the device: the
/// whole chunk fails with it, so that the session is evicted (and the chunk retried once), the
/// handles re-found, or the device recovered — as for a single call.
fn chunk_fault(e: &HsmError) -> bool {
    matches!(e.kind, FaultKind::SessionLost | FaultKind::DeviceLost)
        || (e.kind == FaultKind::HandleInvalid && e.rv.is_some())
}

/// The caller-facing error for a refused admission: RESOURCE_EXHAUSTED (retry later), or
/// UNAVAILABLE while shutting down.
fn refused(what: &'static str, r: Refused) -> HsmError {
    let kind = match r {
        Refused::Closed => FaultKind::DeviceLost,
        _ => FaultKind::Busy,
    };
    HsmError::refused(kind, what, r.to_string())
}

/// Opens a read-write session and logs the user in (already logged in is success).
fn open_and_login(ctx: &Pkcs11, slot: Slot, pin: &SecretString) -> Result<Session, HsmError> {
    let anchor = ctx
        .open_rw_session(slot)
        .map_err(|e| HsmError::from_ck("open the anchor session", e))?;
    match anchor.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(anchor),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(HsmError::new(
            FaultKind::Login,
            "log in to the token",
            "the PIN is incorrect (CKR_PIN_INCORRECT)",
        )),
        Err(e) => Err(HsmError::from_ck("log in to the token", e)),
    }
}

fn open_pool(ctx: &Pkcs11, slot: Slot, n: usize) -> Result<Vec<Session>, HsmError> {
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(
            ctx.open_rw_session(slot)
                .map_err(|e| HsmError::from_ck("open a pool session", e))?,
        );
    }
    Ok(idle)
}

/// Finds the audit key by id (exactly one object, or fail closed).
fn find_audit_key(s: &Session, id: VersionId) -> Result<ObjectHandle, HsmError> {
    let found = s
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(id.as_bytes().to_vec()),
        ])
        .map_err(|e| HsmError::from_ck("C_FindObjects", e))?;
    match found.as_slice() {
        [h] => Ok(*h),
        [] => Err(HsmError::setup(
            "find the audit key",
            format!(
                "the audit HMAC key {id} is missing from the token; checkpoints cannot be made or verified"
            ),
        )),
        more => Err(HsmError::setup(
            "find the audit key",
            format!(
                "{} objects share the audit HMAC key's CKA_ID {id}",
                more.len()
            ),
        )),
    }
}

/// Unwraps a canary with `h`: `None` if it gives the recorded value, `Some(why)` if not; `Err`
/// when the HSM could not answer.
fn canary_verdict(
    inner: &Inner,
    s: &Session,
    h: &KekHandles,
    c: &Canary,
) -> Result<Option<String>, HsmError> {
    let kwp = inner.kwp.unwrap_or(KwpMechanism::Pad);
    match ops::unwrap(s, h.secret, kwp, &c.params, &c.ciphertext) {
        Ok(v) if Sha256::digest(v.expose()).as_slice() == c.digest.as_slice() => Ok(None),
        Ok(_) => Ok(Some(
            "canary decrypts to the wrong value: the HSM object is not the key this version was created with".into(),
        )),
        Err(err) if err.kind == FaultKind::DataInvalid => Ok(Some(
            "canary does not decrypt: the HSM object is not the key this version was created with".into(),
        )),
        Err(err) => Err(err),
    }
}

/// Matches expected KEK versions to the token's objects in one pass and, with `templates`,
/// checks each one's template (a re-initialisation defers that to before first use: see
/// `recovery`). Returns the report and the handles of the versions that passed.
fn find_keks(
    inner: &Inner,
    s: &Session,
    expected: &[ExpectedKek],
    templates: bool,
) -> Result<(AttachReport, HashMap<VersionId, KekHandles>), HsmError> {
    // One search over the token, not one per class: SoftHSM2 reads every object for each
    // search (~15 µs per object), and this pass is most of a re-initialisation's time.
    // With `templates`, each object's template attributes come in the same read (one
    // C_GetAttributeValue pair per object, not two).
    type Found = (ObjectHandle, ObjectClass, String, Vec<Attribute>);
    let mut by_id: HashMap<Vec<u8>, Vec<Found>> = HashMap::new();
    let mut wanted = vec![
        AttributeType::Class,
        AttributeType::Id,
        AttributeType::Label,
    ];
    if templates {
        wanted.extend_from_slice(template::SECRET_CHECK);
    }
    let found = s
        .find_objects(&[Attribute::Token(true)])
        .map_err(|e| HsmError::from_ck("C_FindObjects", e))?;
    for (i, h) in found.into_iter().enumerate() {
        // A pass over a large token takes a second or more: a shutdown does not wait for it.
        if i % 256 == 255 && inner.closed.load(Ordering::SeqCst) {
            return Err(HsmError::refused(
                FaultKind::DeviceLost,
                "find the KEKs",
                "the HSM is closed (shutting down)",
            ));
        }
        let attrs = match s.get_attributes(h, &wanted) {
            Ok(a) => a,
            // Objects that are not keys (Kryoptic lists mechanism and profile objects) may
            // lack these attributes; a key always has them.
            Err(cryptoki::error::Error::Pkcs11(
                RvError::AttributeTypeInvalid | RvError::AttributeSensitive,
                _,
            )) => continue,
            Err(e) => return Err(HsmError::from_ck("C_GetAttributeValue", e)),
        };
        let (mut class, mut id, mut label) = (None, Vec::new(), String::new());
        for a in &attrs {
            match a {
                Attribute::Class(c) => class = Some(*c),
                Attribute::Id(v) => id.clone_from(v),
                Attribute::Label(v) => label = String::from_utf8_lossy(v).into_owned(),
                _ => {}
            }
        }
        match class {
            Some(c)
                if [
                    ObjectClass::SECRET_KEY,
                    ObjectClass::PRIVATE_KEY,
                    ObjectClass::PUBLIC_KEY,
                ]
                .contains(&c) =>
            {
                by_id.entry(id).or_default().push((h, c, label, attrs));
            }
            _ => {}
        }
    }
    let mut report = AttachReport::default();
    let mut handles = HashMap::with_capacity(expected.len());
    for e in expected {
        let objs = by_id.remove(e.id.as_bytes().as_slice()).unwrap_or_default();
        let classes: Vec<_> = objs.iter().map(|o| (o.0, o.1)).collect();
        let h = match match_objects(e, &classes) {
            Ok(h) => h,
            Err(p) => {
                report.problems.push((e.id, p));
                continue;
            }
        };
        let Some(mech) = inner.caps.mechanism_for(e.algorithm) else {
            report.problems.push((
                e.id,
                format!(
                    "the token cannot serve its algorithm: {}",
                    inner.caps.why_not(e.algorithm)
                ),
            ));
            continue;
        };
        let problems = if templates {
            let attrs_of = |c: ObjectClass| {
                objs.iter()
                    .find(|o| o.1 == c)
                    .map(|o| o.3.as_slice())
                    .unwrap_or_default()
            };
            let secret_class = if e.key_type.is_rsa() {
                ObjectClass::PRIVATE_KEY
            } else {
                ObjectClass::SECRET_KEY
            };
            let imported = e.origin == Origin::Imported;
            let mut p = template::check_secret(e.algorithm, mech, attrs_of(secret_class), imported);
            if h.public.is_some() {
                p.extend(template::check_public(
                    mech,
                    attrs_of(ObjectClass::PUBLIC_KEY),
                ));
            }
            p
        } else {
            Vec::new()
        };
        if !problems.is_empty() {
            report
                .problems
                .push((e.id, format!("wrong template: {}", problems.join("; "))));
            continue;
        }
        handles.insert(e.id, h);
    }
    for (id, objs) in by_id {
        for (_, _, label, _) in objs {
            if label.starts_with(template::LABEL_PREFIX) {
                report
                    .orphans
                    .push(format!("{label} (CKA_ID {})", hex::encode(&id)));
            }
        }
    }
    report.attached = handles.len();
    Ok((report, handles))
}

/// Picks a version's handles from the key objects that carry its `CKA_ID`: exactly one secret
/// (or private) key, and for RSA exactly one public key; anything else is why not.
fn match_objects(
    e: &ExpectedKek,
    objs: &[(ObjectHandle, ObjectClass)],
) -> Result<KekHandles, String> {
    let pick = |c: ObjectClass| -> Vec<ObjectHandle> {
        objs.iter().filter(|o| o.1 == c).map(|o| o.0).collect()
    };
    let (secrets, publics) = if e.key_type.is_rsa() {
        (
            pick(ObjectClass::PRIVATE_KEY),
            pick(ObjectClass::PUBLIC_KEY),
        )
    } else {
        (pick(ObjectClass::SECRET_KEY), Vec::new())
    };
    let want_public = usize::from(e.key_type.is_rsa());
    match secrets.as_slice() {
        [] => Err("its HSM object is missing".to_string()),
        _ if secrets.len() > 1 || publics.len() > want_public || objs.len() != 1 + want_public => {
            Err(format!("{} HSM objects share its CKA_ID", objs.len()))
        }
        _ if publics.len() != want_public => Err("its public key object is missing".to_string()),
        [secret, ..] => Ok(KekHandles {
            secret: *secret,
            public: publics.first().copied(),
        }),
    }
}

/// Finds one version's objects with a search by its `CKA_ID` (one scan of the token: for a
/// single version, never for all of them). The outer error is an HSM fault, the inner one an
/// integrity problem (missing or duplicated objects).
fn find_one(s: &Session, e: &ExpectedKek) -> Result<Result<KekHandles, String>, HsmError> {
    let found = s
        .find_objects(&[
            Attribute::Id(e.id.as_bytes().to_vec()),
            Attribute::Token(true),
        ])
        .map_err(|err| HsmError::from_ck("C_FindObjects", err))?;
    let mut objs = Vec::with_capacity(found.len());
    for h in found {
        let class = s
            .get_attributes(h, &[AttributeType::Class])
            .map_err(|err| HsmError::from_ck("C_GetAttributeValue", err))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Class(c) => Some(c),
                _ => None,
            });
        if let Some(c) = class
            && [
                ObjectClass::SECRET_KEY,
                ObjectClass::PRIVATE_KEY,
                ObjectClass::PUBLIC_KEY,
            ]
            .contains(&c)
        {
            objs.push((h, c));
        }
    }
    Ok(match_objects(e, &objs))
}

fn is_key_object(s: &Session, h: ObjectHandle) -> bool {
    matches!(
        s.get_attributes(h, &[AttributeType::Class]).as_deref(),
        Ok([Attribute::Class(c)]) if [ObjectClass::SECRET_KEY, ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY].contains(c)
    )
}

fn check_template(
    s: &Session,
    h: &KekHandles,
    alg: Algorithm,
    mech: cryptoki::mechanism::MechanismType,
    origin: Origin,
) -> Result<Vec<String>, HsmError> {
    let attrs = s
        .get_attributes(h.secret, template::SECRET_CHECK)
        .map_err(|e| HsmError::from_ck("read back KEK attributes", e))?;
    let mut problems = template::check_secret(alg, mech, &attrs, origin == Origin::Imported);
    if let Some(p) = h.public {
        let attrs = s
            .get_attributes(p, template::PUBLIC_CHECK)
            .map_err(|e| HsmError::from_ck("read back public key attributes", e))?;
        problems.extend(template::check_public(mech, &attrs));
    }
    Ok(problems)
}

fn destroy_handles(s: &Session, h: &KekHandles) {
    ops::destroy_quietly(s, h.secret);
    if let Some(p) = h.public {
        ops::destroy_quietly(s, p);
    }
}

/// Re-classifies a `CKR_DEVICE_ERROR` where the vendor profile knows better:
/// * Kryoptic reports a failed integrity check on decrypt/unwrap (OAEP padding, RFC 5649 check
///   value) as a device error. If the call was on caller data and the session still answers
///   (`session_alive`), the data was not authentic (one error for every cause: no oracle).
/// * On CloudHSM a device error can mean the cluster is throttling: "busy, retry"
///   (RESOURCE_EXHAUSTED), not "device lost" (UNAVAILABLE).
fn reclassify(
    profile: &Profile,
    mut e: HsmError,
    session_alive: impl FnOnce() -> bool,
) -> HsmError {
    if e.rv != Some(RvError::DeviceError) {
        return e;
    }
    if profile.device_error_on_bad_ciphertext && e.caller_data && session_alive() {
        e.kind = FaultKind::DataInvalid;
        e.detail
            .push_str(" (a failed integrity check, per the vendor profile)");
    } else if profile.device_error_is_throttling {
        e.kind = FaultKind::Busy;
        e.detail.push_str(" (throttling, per the vendor profile)");
    }
    e
}

fn unsupported_init(p: &Profile, reserved: &str) -> HsmError {
    HsmError::setup(
        "initialise the PKCS#11 module",
        format!(
            "the {} profile ({}) needs C_Initialize pReserved = {reserved:?}; keybroker cannot pass \
             it (cryptoki offers only an unsafe constructor for it and keybroker forbids unsafe \
             code), so this module is unsupported",
            p.name, p.product
        ),
    )
}

/// Finds the configured token; the error lists what is present.
fn select_token(
    ctx: &Pkcs11,
    sel: &TokenSelector,
) -> Result<(Slot, cryptoki::slot::TokenInfo), HsmError> {
    // Attributes of the module itself (from a PKCS #11 URI): it is the wrong module, whatever
    // its tokens are.
    if sel.library_manufacturer.is_some()
        || sel.library_description.is_some()
        || sel.library_version.is_some()
    {
        let info = ctx
            .get_library_info()
            .map_err(|e| HsmError::from_ck("C_GetInfo", e))?;
        let (maj, min) = (
            info.library_version().major(),
            info.library_version().minor(),
        );
        let man = info.manufacturer_id().trim().to_string();
        let desc = info.library_description().trim().to_string();
        if sel.library_manufacturer.as_ref().is_some_and(|m| *m != man)
            || sel.library_description.as_ref().is_some_and(|d| *d != desc)
            || sel.library_version.is_some_and(|v| v != (maj, min))
        {
            return Err(HsmError::setup(
                "find the token",
                format!(
                    "the module is {desc:?} {maj}.{min} by {man:?}, not the library the PKCS #11 URI names"
                ),
            ));
        }
    }
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| HsmError::from_ck("C_GetSlotList", e))?;
    let mut present = Vec::new();
    for slot in slots {
        let info = match ctx.get_token_info(slot) {
            Ok(i) => i,
            Err(e) => {
                present.push(format!("slot {}: unreadable ({e})", slot.id()));
                continue;
            }
        };
        let label = info.label().trim().to_string();
        let serial = info.serial_number().trim().to_string();
        let slot_matches = if sel.slot_description.is_some() || sel.slot_manufacturer.is_some() {
            match ctx.get_slot_info(slot) {
                Ok(si) => {
                    sel.slot_description
                        .as_ref()
                        .is_none_or(|d| d == si.slot_description().trim())
                        && sel
                            .slot_manufacturer
                            .as_ref()
                            .is_none_or(|m| m == si.manufacturer_id().trim())
                }
                Err(_) => false,
            }
        } else {
            true
        };
        let matches = sel.label.as_ref().is_none_or(|l| *l == label)
            && sel.serial.as_ref().is_none_or(|s| *s == serial)
            && sel.slot.is_none_or(|id| id == slot.id())
            && sel
                .manufacturer
                .as_ref()
                .is_none_or(|m| m == info.manufacturer_id().trim())
            && sel.model.as_ref().is_none_or(|m| m == info.model().trim())
            && slot_matches;
        if matches {
            return Ok((slot, info));
        }
        present.push(format!(
            "slot {} label {label:?} serial {serial:?} ({} {})",
            slot.id(),
            info.manufacturer_id().trim(),
            info.model().trim()
        ));
    }
    Err(HsmError::setup(
        "find the token",
        format!(
            "no initialized token matches {}; tokens present: {}",
            describe(sel),
            if present.is_empty() {
                "none".to_string()
            } else {
                present.join(", ")
            }
        ),
    ))
}

fn describe(sel: &TokenSelector) -> String {
    let mut parts = Vec::new();
    if let Some(l) = &sel.label {
        parts.push(format!("label {l:?}"));
    }
    if let Some(s) = &sel.serial {
        parts.push(format!("serial {s:?}"));
    }
    if let Some(id) = sel.slot {
        parts.push(format!("slot {id}"));
    }
    for (what, v) in [
        ("manufacturer", &sel.manufacturer),
        ("model", &sel.model),
        ("slot description", &sel.slot_description),
        ("slot manufacturer", &sel.slot_manufacturer),
    ] {
        if let Some(v) = v {
            parts.push(format!("{what} {v:?}"));
        }
    }
    if parts.is_empty() {
        "any token".into()
    } else {
        parts.join(" and ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
