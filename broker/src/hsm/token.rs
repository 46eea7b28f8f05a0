//! Opening the module: loading it, finding the configured token (the error lists what is
//! present), logging in, the capability probe and the first session pool.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicU64},
    },
};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::{Error as CkError, RvError},
    session::{Session, UserType},
    slot::{Limit, Slot, TokenInfo},
};
use secrecy::SecretString;
use serde::Serialize;
use tokio::sync::watch;

use super::{
    Health, Hsm, HsmSettings, Inner, TokenSelector, TokenSummary,
    admission::{Admission, AdmissionSettings},
    conn::Conn,
    error::{FaultKind, HsmError},
    probe,
    profile::{self, Profile},
};

/// Opens a read-write session and logs the user in (already logged in is success).
pub(super) fn open_and_login(
    ctx: &Pkcs11,
    slot: Slot,
    pin: &SecretString,
) -> Result<Session, HsmError> {
    let anchor = ctx
        .open_rw_session(slot)
        .map_err(|e| HsmError::from_ck("open the anchor session", e))?;
    match anchor.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(anchor),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
            let mut e = HsmError::new(
                FaultKind::Login,
                "log in to the token",
                "the PIN is incorrect (CKR_PIN_INCORRECT)",
            );
            e.rv = Some(RvError::PinIncorrect);
            Err(e)
        }
        Err(e) => Err(HsmError::from_ck("log in to the token", e)),
    }
}

pub(super) fn open_pool(ctx: &Pkcs11, slot: Slot, n: usize) -> Result<Vec<Session>, HsmError> {
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(
            ctx.open_rw_session(slot)
                .map_err(|e| HsmError::from_ck("open a pool session", e))?,
        );
    }
    Ok(idle)
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

/// One slot as keybroker saw it while looking for the token (`check-config` shows them all, and
/// start-up logs every slot skipped or read with a tolerated fault).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SlotReport {
    /// The slot id.
    pub slot: u64,
    /// `CK_TOKEN_INFO.label`, when the token info was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `CK_TOKEN_INFO.serialNumber`, when read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// `CK_TOKEN_INFO.manufacturerID` and `model`, when read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Whether the slot holds an initialized token (`CKF_TOKEN_INITIALIZED`).
    pub initialized: bool,
    /// Why the slot was skipped because it could not be read, naming the PKCS#11 call and
    /// field; `None` for a slot that was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Faults in optional fields that were tolerated (a malformed clock), call and field named.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tolerated: Vec<String>,
}

impl std::fmt::Display for SlotReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "slot {}", self.slot)?;
        if let Some(l) = &self.label {
            write!(f, " label {l:?}")?;
        }
        if let Some(s) = &self.serial {
            write!(f, " serial {s:?}")?;
        }
        if let Some(t) = &self.token {
            write!(f, " ({t})")?;
        }
        if let Some(why) = &self.skipped {
            write!(f, ": skipped, {why}")?;
        } else if !self.initialized {
            write!(f, ": no initialized token")?;
        }
        for t in &self.tolerated {
            write!(f, "; tolerated: {t}")?;
        }
        Ok(())
    }
}

/// Reads one slot's token info. `Err` says why the slot cannot be used, naming the call and
/// field (the slot is then skipped, and the others are still read).
fn read_slot(ctx: &Pkcs11, slot: Slot) -> (SlotReport, Option<TokenInfo>) {
    let mut report = SlotReport {
        slot: slot.id(),
        ..SlotReport::default()
    };
    let info = match ctx.get_token_info(slot) {
        Ok(i) => i,
        Err(e @ CkError::Pkcs11(..)) => {
            report.skipped = Some(format!(
                "its token info cannot be read: {}",
                HsmError::from_ck("C_GetTokenInfo", e).detail
            ));
            return (report, None);
        }
        // The one CK_TOKEN_INFO field cryptoki parses, rather than copies, is utcTime; the
        // vendored cryptoki (patch 4, vendor/cryptoki/PATCHES.md) reports a malformed clock
        // instead of failing, so this is only reached if that ever changes.
        Err(e) => {
            report.skipped = Some(format!(
                "C_GetTokenInfo answered, but its utcTime field could not be read ({e})"
            ));
            return (report, None);
        }
    };
    report.label = Some(info.label().trim().to_string());
    report.serial = Some(info.serial_number().trim().to_string());
    report.token = Some(format!(
        "{} {}",
        info.manufacturer_id().trim(),
        info.model().trim()
    ));
    if let Some(raw) = info.malformed_utc_time() {
        report.tolerated.push(format!(
            "C_GetTokenInfo utcTime is {:?}, not YYYYMMDDhhmmss00 (CKF_CLOCK_ON_TOKEN is set); \
             the clock is ignored (keybroker does not use it)",
            String::from_utf8_lossy(raw).trim_end_matches([' ', '\0'])
        ));
    }
    report.initialized = info.token_initialized();
    if !report.initialized {
        return (report, None);
    }
    (report, Some(info))
}

/// What to add to a failed `C_Initialize`'s message: the causes the return value is known to
/// have with some modules.
fn initialize_hint(rv: Option<RvError>, module: &str) -> String {
    let m = module.to_ascii_lowercase();
    let opencryptoki = m.contains("opencryptoki") || m.contains("pkcs11_api");
    match rv {
        Some(RvError::ArgumentsBad) => " (this module may need C_Initialize pReserved arguments, \
            which keybroker cannot pass itself: load it through p11-kit's proxy with \
            x-init-reserved, see the nss-softoken profile and docs/src/portability.md)"
            .into(),
        Some(RvError::HostMemory | RvError::GeneralError | RvError::FunctionFailed)
            if opencryptoki =>
        {
            " (openCryptoki answers so when its slot daemon is not running: start pkcsslotd, \
             as root or a member of the pkcs11 group, and check that this process may use \
             /var/run/pkcsslotd.socket and /var/lock/opencryptoki; docs/src/portability.md)"
                .into()
        }
        Some(RvError::HostMemory) => " (openCryptoki, for one, answers CKR_HOST_MEMORY when its \
            slot daemon pkcsslotd is not running)"
            .into(),
        _ => String::new(),
    }
}

/// Finds the configured token, reading each slot on its own: a slot whose token info cannot be
/// read is reported (slot id, PKCS#11 call and field) and skipped, and the token is selected
/// among the others. Returns every slot's report too. The error lists what is present.
pub(super) fn select_token(
    ctx: &Pkcs11,
    sel: &TokenSelector,
) -> Result<(Slot, TokenInfo, Vec<SlotReport>), HsmError> {
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
    // C_GetSlotList(TRUE) only: cryptoki's get_slots_with_initialized_token reads every slot's
    // token info and fails as a whole if one slot's cannot be read.
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| HsmError::from_ck("C_GetSlotList", e))?;
    let mut reports = Vec::with_capacity(slots.len());
    let mut chosen = None;
    for slot in slots {
        let (mut report, info) = read_slot(ctx, slot);
        if let Some(info) = info {
            let slot_matches = if sel.slot_description.is_some() || sel.slot_manufacturer.is_some()
            {
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
                    Err(e) => {
                        report.skipped = Some(format!(
                            "its slot info cannot be read (the selector names slot attributes): {}",
                            HsmError::from_ck("C_GetSlotInfo", e).detail
                        ));
                        false
                    }
                }
            } else {
                true
            };
            let matches = sel
                .label
                .as_ref()
                .is_none_or(|l| Some(l) == report.label.as_ref())
                && sel
                    .serial
                    .as_ref()
                    .is_none_or(|s| Some(s) == report.serial.as_ref())
                && sel.slot.is_none_or(|id| id == slot.id())
                && sel
                    .manufacturer
                    .as_ref()
                    .is_none_or(|m| m == info.manufacturer_id().trim())
                && sel.model.as_ref().is_none_or(|m| m == info.model().trim())
                && slot_matches;
            if matches && chosen.is_none() {
                chosen = Some((slot, info));
            }
        }
        reports.push(report);
    }
    if let Some((slot, info)) = chosen {
        return Ok((slot, info, reports));
    }
    let present: Vec<String> = reports
        .iter()
        .filter(|r| r.skipped.is_none() && r.initialized)
        .map(ToString::to_string)
        .collect();
    let skipped: Vec<String> = reports
        .iter()
        .filter(|r| r.skipped.is_some())
        .map(ToString::to_string)
        .collect();
    Err(HsmError::setup(
        "find the token",
        format!(
            "no initialized token matches {}; tokens present: {}{}",
            describe(sel),
            if present.is_empty() {
                "none".to_string()
            } else {
                present.join(", ")
            },
            if skipped.is_empty() {
                String::new()
            } else {
                format!("; slots skipped: {}", skipped.join("; "))
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
        // refuse it before loading, whether configured or recognised by its file name — unless
        // the module is p11-kit's proxy, which passes the string itself (`x-init-reserved` in
        // its module configuration).
        let proxied_by_name = profile::is_proxy(&[&module_name]);
        let early = configured.unwrap_or_else(|| profile::detect(&[&module_name]));
        if let Some(reserved) = early.init_reserved
            && !proxied_by_name
        {
            return Err(unsupported_init(early, reserved));
        }
        let ctx = Pkcs11::new(module)
            .map_err(|e| HsmError::from_ck(format!("load {}", module.display()), e))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => {
                let mut err = HsmError::from_ck("C_Initialize", e);
                err.detail.push_str(&initialize_hint(err.rv, &module_name));
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
        let proxied = proxied_by_name || profile::is_proxy(&[&library]);
        let (slot, info, slots) = select_token(&ctx, &settings.token)?;
        for r in slots
            .iter()
            .filter(|r| r.skipped.is_some() || !r.tolerated.is_empty())
        {
            tracing::warn!(slot = r.slot, report = %r, "PKCS#11 slot");
        }
        let profile = configured.unwrap_or_else(|| {
            profile::detect(&[info.manufacturer_id(), info.model(), &library, &module_name])
        });
        if let Some(reserved) = profile.init_reserved {
            if !proxied {
                return Err(unsupported_init(profile, reserved));
            }
            tracing::info!(
                profile = profile.name,
                library = %library,
                "the token is reached through p11-kit's proxy, which passes C_Initialize \
                 pReserved from its module configuration (x-init-reserved); the known-answer \
                 tests decide what it can do"
            );
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
            via_proxy: proxied,
            slots,
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
                pin: Mutex::new(settings.pin.clone()),
                pin_source: OnceLock::new(),
                pin_refused: Mutex::new(None),
                pool_size: sessions,
                summary,
                caps,
                kwp,
                profile,
                conn: RwLock::new(Arc::new(Conn::new(1, slot, idle, anchor))),
                admission,
                call_timeout: settings.call_timeout,
                startup_check_budget: settings.startup_check_budget,
                health,
                known: RwLock::new(HashMap::new()),
                audit_key_id: Mutex::new(None),
                recovering: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                reinitialisations: AtomicU64::new(0),
                search_costs: Mutex::default(),
                object_lock: Mutex::new(()),
                reinit_lock: Mutex::new(()),
                observer: OnceLock::new(),
            }),
        })
    }
}
