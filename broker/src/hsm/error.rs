//! The one place that classifies PKCS#11 failures (house rule 3,
//! `docs/src/style.md`). The class drives recovery:
//! a lost session is evicted and the operation retried once; a lost device makes callers see
//! UNAVAILABLE; data errors keep the session.

use cryptoki::error::{Error as CkError, RvError};

use crate::error::{BrokerError, Deadline, Exhausted, Refused, Unavailable};

/// What kind of failure an HSM call had, as far as recovery and callers are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The session is gone (handle invalid, closed) or unusable (an operation left active):
    /// evict it, retry once on a fresh one.
    SessionLost,
    /// The device or token is gone, or the library lost its state: callers get UNAVAILABLE.
    DeviceLost,
    /// The HSM is busy or throttling, or no session could be had in time.
    Busy,
    /// The input to a decrypt/unwrap is not authentic or malformed.
    DataInvalid,
    /// An object handle is no longer valid (refresh cached handles).
    HandleInvalid,
    /// The PIN is wrong, locked or expired; or login is required.
    Login,
    /// The token refuses the mechanism or the key for this operation.
    NotPermitted,
    /// The token or its configuration is not what we need (start-up).
    Setup,
    /// The call failed for a reason the token does not say (`CKR_FUNCTION_FAILED`), but the
    /// session and the device are fine: the caller may retry (UNAVAILABLE).
    Transient,
    /// The request's deadline passed before the HSM work could start or finish.
    Deadline,
    /// Anything else.
    Other,
}

/// A failed HSM call: the class, and for the log the PKCS#11 function and return value.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{context}: {detail}")]
pub struct HsmError {
    /// The class of fault.
    pub kind: FaultKind,
    /// What the broker was doing.
    pub context: String,
    /// The PKCS#11 function and return value (`C_Decrypt: GeneralError`), or another
    /// explanation. Never key material.
    pub detail: String,
    /// The PKCS#11 return value, when there was one.
    pub rv: Option<RvError>,
    /// Whether the failed call was a decrypt/unwrap of caller-supplied data (so a vendor
    /// profile may know that a return value there means "not authentic").
    pub caller_data: bool,
    /// The key version whose object a failed decrypt of caller data used: a device error the
    /// vendor profile reads as "not authentic" is checked against that version's canary
    /// before the caller is told so (see `hsm::pool`).
    pub version: Option<crate::model::VersionId>,
    /// Whether the HSM was never asked (refused before the call: unhealthy, queue full,
    /// deadline passed), so nothing can have changed in the token.
    pub not_started: bool,
}

impl HsmError {
    /// A fault of a given kind with an explanation.
    pub fn new(kind: FaultKind, context: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            kind,
            context: context.into(),
            detail: detail.into(),
            rv: None,
            caller_data: false,
            version: None,
            not_started: false,
        }
    }

    /// A refusal before the HSM was asked anything.
    pub fn refused(kind: FaultKind, context: impl Into<String>, detail: impl Into<String>) -> Self {
        let mut e = Self::new(kind, context, detail);
        e.not_started = true;
        e
    }

    /// A start-up/configuration problem.
    pub fn setup(context: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(FaultKind::Setup, context, detail)
    }

    /// Classifies a cryptoki error.
    pub fn from_ck(context: impl Into<String>, e: CkError) -> Self {
        let (kind, rv, detail) = match &e {
            CkError::Pkcs11(rv, f) => (
                classify(*rv),
                Some(*rv),
                format!("{} returned {rv:?}", function_name(*f)),
            ),
            CkError::LibraryLoading(_) | CkError::MissingSymbol(_) => {
                (FaultKind::Setup, None, e.to_string())
            }
            _ => (FaultKind::Other, None, e.to_string()),
        };
        Self {
            kind,
            context: context.into(),
            detail,
            rv,
            caller_data: false,
            version: None,
            not_started: false,
        }
    }

    /// Like [`HsmError::from_ck`], but for a decrypt/unwrap of caller data: every return value
    /// that can mean "this ciphertext is not authentic" becomes [`FaultKind::DataInvalid`].
    /// SoftHSM2 answers a bad AES-GCM tag with `CKR_GENERAL_ERROR` (docs/src/hsm-notes.md), Kryoptic with
    /// `CKR_ENCRYPTED_DATA_INVALID`; RFC 5649 integrity failures come back as
    /// `CKR_WRAPPED_KEY_INVALID` or `CKR_ENCRYPTED_DATA_INVALID`. Kryoptic answers a failed
    /// RFC 5649 or OAEP integrity check with `CKR_DEVICE_ERROR`: that is left as a device fault
    /// here and re-classified by the HSM layer under the Kryoptic profile, after checking that
    /// the session still works (see `hsm::Inner::apply_profile`). `CKR_FUNCTION_FAILED` is not
    /// taken to mean "not authentic": no tested token reports a bad tag with it, and a caller
    /// told that a valid envelope is corrupt may throw data away; it is a retryable failure.
    pub fn from_ck_decrypt(context: impl Into<String>, e: CkError) -> Self {
        let mut err = Self::from_ck(context, e);
        err.caller_data = true;
        if let Some(rv) = err.rv
            && matches!(
                rv,
                RvError::EncryptedDataInvalid
                    | RvError::EncryptedDataLenRange
                    | RvError::WrappedKeyInvalid
                    | RvError::WrappedKeyLenRange
                    | RvError::DataInvalid
                    | RvError::DataLenRange
                    | RvError::GeneralError
            )
        {
            err.kind = FaultKind::DataInvalid;
        }
        err
    }

    /// The caller-facing error for this fault. Details stay in the log.
    pub fn into_broker(self) -> BrokerError {
        match self.kind {
            FaultKind::DataInvalid => BrokerError::Unauthentic,
            FaultKind::SessionLost | FaultKind::DeviceLost | FaultKind::Login => {
                tracing::warn!(context = %self.context, detail = %self.detail, "HSM unavailable");
                Unavailable::Hsm.into()
            }
            FaultKind::Busy => {
                tracing::debug!(context = %self.context, detail = %self.detail, "HSM busy");
                // An admission refusal says why (queue full, wait too long); a token's own
                // "busy" return value stays in the log.
                if self.rv.is_none() {
                    Exhausted::Queue(self.detail).into()
                } else {
                    Exhausted::Hsm.into()
                }
            }
            FaultKind::Transient => {
                tracing::warn!(context = %self.context, detail = %self.detail, "HSM call failed");
                Unavailable::HsmFailed.into()
            }
            FaultKind::Deadline => Deadline::Hsm.into(),
            FaultKind::HandleInvalid => {
                tracing::warn!(context = %self.context, detail = %self.detail, "HSM object handle invalid");
                Unavailable::Reopening.into()
            }
            FaultKind::NotPermitted => {
                tracing::error!(context = %self.context, detail = %self.detail, "HSM refused operation");
                Refused::HsmRefused.into()
            }
            FaultKind::Setup | FaultKind::Other => {
                BrokerError::internal(format!("{}: {}", self.context, self.detail))
            }
        }
    }
}

impl From<HsmError> for BrokerError {
    fn from(e: HsmError) -> Self {
        e.into_broker()
    }
}

/// Maps a PKCS#11 return value to its class.
pub fn classify(rv: RvError) -> FaultKind {
    use RvError::*;
    match rv {
        // An operation left active (a module that did not end it after a failure) makes the
        // session unusable for anything else: evict it like a lost one.
        SessionHandleInvalid | SessionClosed | OperationActive => FaultKind::SessionLost,
        DeviceRemoved
        | TokenNotPresent
        | TokenNotRecognized
        | CryptokiNotInitialized
        | DeviceMemory
        | DeviceError => FaultKind::DeviceLost,
        SessionCount | FunctionCanceled | Cancel | HostMemory => FaultKind::Busy,
        // CKR_GENERAL_ERROR outside a decrypt (where SoftHSM2 means a bad GCM tag: see
        // `from_ck_decrypt`) is the token failing the call: SoftHSM2 2.6.1 returns it now and
        // then from C_GenerateKey under concurrent load (its object-store races, docs/src/hsm-notes.md). The
        // caller can retry (a half-made key is rolled back); it is not a broker bug (INTERNAL).
        FunctionFailed | GeneralError => FaultKind::Transient,
        EncryptedDataInvalid
        | EncryptedDataLenRange
        | WrappedKeyInvalid
        | WrappedKeyLenRange
        | DataInvalid
        | DataLenRange => FaultKind::DataInvalid,
        ObjectHandleInvalid
        | KeyHandleInvalid
        | WrappingKeyHandleInvalid
        | UnwrappingKeyHandleInvalid => FaultKind::HandleInvalid,
        PinIncorrect
        | PinInvalid
        | PinLenRange
        | PinExpired
        | PinLocked
        | UserNotLoggedIn
        | UserPinNotInitialized => FaultKind::Login,
        KeyFunctionNotPermitted
        | MechanismInvalid
        | MechanismParamInvalid
        | KeyTypeInconsistent
        | KeyUnextractable
        | KeyNotWrappable
        | ActionProhibited
        | FunctionNotSupported => FaultKind::NotPermitted,
        _ => FaultKind::Other,
    }
}

/// `Function::Decrypt` → `C_Decrypt`.
fn function_name(f: cryptoki::context::Function) -> String {
    format!("C_{f:?}")
}
