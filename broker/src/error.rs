//! The broker's errors, typed, and their one mapping to gRPC codes ([`BrokerError::code`],
//! `From<BrokerError> for tonic::Status`) and one to HTTP statuses ([`BrokerError::http_status`]).
//!
//! An error that ends a request is a [`BrokerError`]: one variant per outcome a caller can act
//! on (the status code), each holding a sub-enum that says exactly what went wrong, with its data
//! (as rustls' `Error` does). Its `Display` is the message the caller reads; it never contains
//! key material. Details that could help an attacker (which check failed on a wrapped key, the
//! PKCS#11 return value) go to the log only. Unauthentic wrapped data always gets
//! [`UNAUTHENTIC_MESSAGE`], whatever the cause, so the reply is no padding or tag oracle
//! (security invariant 6, `docs/src/security.md`).
//!
//! Errors that stop the broker (or a command) from starting are a
//! [`StartError`](crate::server::StartError).

use tonic::{Code, Status};

pub use crate::model::Invalid;
use crate::model::{Algorithm, KeyName, KeyOp, KeyType, Permission, Reason, VersionId};

/// The one message for a wrapped key that is malformed or fails authentication.
pub const UNAUTHENTIC_MESSAGE: &str = "wrapped key is malformed or not authentic";
/// The one message for an encrypted payload that is malformed or fails authentication.
pub const UNAUTHENTIC_CIPHERTEXT_MESSAGE: &str = "ciphertext is malformed or not authentic";

/// An error that ends a request (or one item of a batch).
#[derive(Clone, Debug, thiserror::Error)]
pub enum BrokerError {
    /// The request is malformed (INVALID_ARGUMENT).
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// A wrapped key failed to parse or authenticate (INVALID_ARGUMENT). Deliberately carries
    /// no detail.
    #[error("{UNAUTHENTIC_MESSAGE}")]
    Unauthentic,
    /// An encrypted payload failed to parse or authenticate (INVALID_ARGUMENT): the payload
    /// counterpart of [`BrokerError::Unauthentic`], as deliberately without detail.
    #[error("{UNAUTHENTIC_CIPHERTEXT_MESSAGE}")]
    UnauthenticCiphertext,
    /// The named thing does not exist (NOT_FOUND).
    #[error(transparent)]
    NotFound(#[from] NotFound),
    /// The caller may not do this (PERMISSION_DENIED).
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The key (or the HSM) cannot do this now (FAILED_PRECONDITION).
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The name is taken (ALREADY_EXISTS).
    #[error(transparent)]
    Exists(#[from] Exists),
    /// The HSM, the store or the audit trail cannot serve right now; retryable (UNAVAILABLE).
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// The broker is at capacity; retryable (RESOURCE_EXHAUSTED).
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
    /// The request's deadline passed before the work could be done (DEADLINE_EXCEEDED).
    #[error(transparent)]
    Deadline(#[from] Deadline),
    /// A bug (INTERNAL). The detail is logged; the caller sees a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What does not exist.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotFound {
    /// No key of this name.
    #[error("key {0} not found")]
    Key(String),
    /// The key has no version of this number.
    #[error("key {key} has no version {version}")]
    Version {
        /// The key.
        key: KeyName,
        /// The version asked for.
        version: u32,
    },
    /// The key is not soft-deleted.
    #[error("key {0} is not deleted")]
    NotDeleted(KeyName),
    /// No such BYOK import key.
    #[error("import key {0:?} not found")]
    ImportKey(String),
    /// A front door's URI path that names nothing it serves.
    #[error("no such path: {0}")]
    UriPath(String),
}

/// Why the caller may not.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The connection carried no verified identity.
    #[error("no verified client identity")]
    NoIdentity,
    /// A request signature (AWS SigV4) that does not verify (UNAUTHENTICATED).
    #[error("request signature refused: {0}")]
    Signature(SignatureFailure),
    /// The connection's client certificate no longer holds (expired, revoked, or no longer
    /// trusted since the TLS files were reloaded) (UNAUTHENTICATED).
    #[error("client certificate no longer valid: {0}")]
    Credential(String),
    /// No binding names the caller.
    #[error("identity {0} has no role on this broker")]
    NoRole(String),
    /// The caller's roles do not give `permission` on `key`.
    #[error("{caller} may not {permission} key {key}")]
    Key {
        /// The caller's identity.
        caller: String,
        /// The permission.
        permission: Permission,
        /// The key.
        key: KeyName,
    },
    /// The caller's roles do not give `permission` in `tenant`.
    #[error("{caller} may not {permission} in tenant {tenant}")]
    Tenant {
        /// The caller's identity.
        caller: String,
        /// The permission.
        permission: Permission,
        /// The tenant.
        tenant: String,
    },
    /// The caller's roles do not give `permission` (scope `all`, or anywhere).
    #[error("{caller} may not {permission}")]
    Permission {
        /// The caller's identity.
        caller: String,
        /// The permission.
        permission: Permission,
    },
    /// A platform-managed key: only the platform may make, change, export or destroy it.
    #[error(
        "{caller} may not {permission} key {key}: it is the tenant's platform-managed key, which only the platform manages"
    )]
    PlatformManaged {
        /// The caller's identity.
        caller: String,
        /// The permission.
        permission: Permission,
        /// The key.
        key: KeyName,
    },
    /// The key owner threw the HYOK kill switch.
    #[error("the key owner has disconnected HYOK service access")]
    HyokDisconnected,
    /// A HYOK service identity gave no access justification.
    #[error(
        "a HYOK service identity must give an access justification (context.justification.reason)"
    )]
    NoJustification,
    /// The key does not accept the justification given.
    #[error("key {key} does not accept the access justification {}", reason.as_str())]
    Justification {
        /// The key.
        key: KeyName,
        /// The reason given.
        reason: Reason,
    },
}

/// Why a request signature (AWS SigV4) was refused. The caller learns which check failed (as
/// AWS services say); a guess at a secret learns nothing from it, the comparison being in
/// constant time.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureFailure {
    /// No `Authorization` header, or one that is not `AWS4-HMAC-SHA256 Credential=...,
    /// SignedHeaders=..., Signature=...`.
    #[error("missing or malformed Authorization header")]
    Malformed,
    /// A credential scope that is not `KEY/DATE/REGION/kms-xks-proxy/aws4_request`, or whose
    /// date is not the request's.
    #[error(
        "credential scope {0:?} is not DATE/REGION/kms-xks-proxy/aws4_request of the request's date"
    )]
    Scope(String),
    /// A signed header list without `host` and `x-amz-date`, or naming a header the request
    /// lacks.
    #[error("signed headers must include host and x-amz-date and be present: {0}")]
    SignedHeaders(String),
    /// A missing or malformed `X-Amz-Date`.
    #[error("missing or malformed X-Amz-Date (YYYYMMDDTHHMMSSZ)")]
    Date,
    /// A request time outside the allowed clock skew.
    #[error("request time is {skew_s} s from this server's clock; at most {max_s} s is accepted")]
    Skew {
        /// How far off, in seconds.
        skew_s: u64,
        /// The most accepted.
        max_s: u64,
    },
    /// An access key id this prefix does not know.
    #[error("unknown access key id {0:?} for this path")]
    UnknownAccessKey(String),
    /// The signature does not match the request.
    #[error("the signature does not match the request")]
    Mismatch,
}

/// Why the key (or the HSM) cannot do this now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The key is soft-deleted.
    #[error(
        "key {key} is deleted (purge scheduled at {purge_at_ms} ms); RecoverKey brings it back"
    )]
    Deleted {
        /// The key.
        key: KeyName,
        /// When it will be purged.
        purge_at_ms: i64,
    },
    /// The key is soft-deleted (for metadata reads).
    #[error("key {0} is deleted; see GetDeletedKey, RecoverKey")]
    DeletedKey(KeyName),
    /// The key failed its integrity check.
    #[error(
        "key {0} is quarantined: it failed its HSM integrity check at start-up; see the broker log"
    )]
    Quarantined(KeyName),
    /// The key is disabled.
    #[error("key {0} is disabled")]
    Disabled(KeyName),
    /// The key does not allow the operation.
    #[error("key {key} does not allow {}", op.as_str())]
    NotAllowed {
        /// The key.
        key: KeyName,
        /// The operation.
        op: KeyOp,
    },
    /// Before the key's not-before time.
    #[error("key {key} is not valid before {not_before_ms} ms")]
    NotYetValid {
        /// The key.
        key: KeyName,
        /// Its not-before time.
        not_before_ms: i64,
    },
    /// The key expired (it still unwraps).
    #[error("key {key} expired at {expires_ms} ms: it still unwraps, but makes no new envelopes")]
    Expired {
        /// The key.
        key: KeyName,
        /// When.
        expires_ms: i64,
    },
    /// The key's newest version expired.
    #[error("version {version} of key {key} expired; rotate the key")]
    VersionExpired {
        /// The key.
        key: KeyName,
        /// The version.
        version: u32,
    },
    /// A version below the key's minimum decryption version.
    #[error("version {version} of key {key} is below its minimum decryption version {min}")]
    BelowMinimum {
        /// The key.
        key: KeyName,
        /// The version.
        version: u32,
        /// The minimum.
        min: u32,
    },
    /// Payload encryption asked of a key whose algorithm cannot do it.
    #[error(
        "key {key} uses {algorithm}, which does not encrypt payloads; use an AES-256-GCM or RSA-OAEP key"
    )]
    NotForPayloads {
        /// The key.
        key: KeyName,
        /// Its algorithm.
        algorithm: Algorithm,
    },
    /// A signing key asked to be backed up.
    #[error(
        "key {0} is a signing key: its private half never leaves the HSM, not even wrapped for a backup"
    )]
    SigningKeyBackup(KeyName),
    /// A signature algorithm the key cannot sign with.
    #[error("key {key} is {} ({algorithm}): it cannot sign with {asked}{}", key_type.as_str(), crate::model::sign_hint(*key_type, *algorithm))]
    SignAlgorithmForKey {
        /// The key.
        key: KeyName,
        /// Its type.
        key_type: KeyType,
        /// Its algorithm.
        algorithm: Algorithm,
        /// What the request asked for.
        asked: crate::model::SignAlgorithm,
    },
    /// A public key asked of a key that has none.
    #[error("key {key} is {}: only RSA and EC keys have a public key", key_type.as_str())]
    NotRsa {
        /// The key.
        key: KeyName,
        /// Its type.
        key_type: KeyType,
    },
    /// No room for another version.
    #[error(
        "key {key} has {max} versions, the most a key may have; raise its minimum decryption version and trim"
    )]
    TooManyVersions {
        /// The key.
        key: KeyName,
        /// The most versions.
        max: usize,
    },
    /// Purge protection cannot be turned off.
    #[error("purge protection of key {0} is on and can never be turned off")]
    PurgeProtectionOn(KeyName),
    /// Purge before the scheduled date under purge protection.
    #[error(
        "key {key} is purge-protected: it can only be purged at its scheduled date ({purge_at_ms} ms)"
    )]
    PurgeProtected {
        /// The key.
        key: KeyName,
        /// The scheduled date.
        purge_at_ms: i64,
    },
    /// This HSM cannot make this key type.
    #[error("this HSM cannot create this key (see `keybroker check-config`): {0}")]
    CannotCreate(String),
    /// This HSM cannot serve this algorithm.
    #[error("this HSM cannot serve {algorithm} (see `keybroker check-config`): {why}")]
    CannotServe {
        /// The algorithm.
        algorithm: Algorithm,
        /// What the capability probe found.
        why: String,
    },
    /// The BYOK import key expired.
    #[error("the import key has expired; create a new one")]
    ImportKeyExpired,
    /// The BYOK import key already served an import (each serves one).
    #[error(
        "import key {0} was already used (an import key serves one ImportKey call); create a new one"
    )]
    ImportKeyUsed(String),
    /// A BYOK import key made before import keys forced the imported key's template.
    #[error(
        "import key {0} was made by an older keybroker without an enforced unwrap template and is not used; create a new one"
    )]
    ImportKeyLegacy(String),
    /// A BYOK import key made under the other backup setting (its forced template differs).
    #[error(
        "import key {0} was made while backup was {1}; [lifecycle] backup has changed since: create a new import key"
    )]
    ImportKeyBackup(String, &'static str),
    /// The HSM refused the operation for this key.
    #[error("the HSM refused this operation for this key")]
    HsmRefused,
    /// The version's AES-GCM invocation budget is spent (random IVs, NIST SP 800-38D).
    #[error(
        "version {version} of key {key} has made its {limit} AES-GCM invocations (the random-IV bound): rotate the key (automatic rotation is due)"
    )]
    GcmBudgetSpent {
        /// The key.
        key: KeyName,
        /// The version.
        version: u32,
        /// Its limit.
        limit: u64,
    },
    /// A backup of another security domain.
    #[error(
        "the backup was made in security domain {backup}, this HSM's domain is {ours}: a backup restores only into the domain that made it"
    )]
    OtherDomain {
        /// The blob's domain.
        backup: VersionId,
        /// This HSM's.
        ours: VersionId,
    },
    /// The security domain cannot do this (none, incomplete, backup off, ...).
    #[error("{0}")]
    Domain(String),
    /// An external key's remote EKM proxy refused (its key disabled, its owner's kill switch
    /// thrown, the call not permitted): the remote's status and `code`, never key material.
    #[error("external proxy {proxy} refused the request (HTTP {status}, {code}): {message}")]
    ExternalRefused {
        /// The `[[external_proxy]]` name.
        proxy: String,
        /// The HTTP status it answered.
        status: u16,
        /// Its `code`.
        code: String,
        /// Its `message` (printable, shortened).
        message: String,
    },
    /// The remote EKM proxy has no such key.
    #[error("external proxy {proxy} has no key {remote_key} (remote key not found)")]
    RemoteKeyNotFound {
        /// The `[[external_proxy]]` name.
        proxy: String,
        /// The key's name there.
        remote_key: String,
    },
    /// No `[[external_proxy]]` of this name is configured.
    #[error("no [[external_proxy]] named {0:?} is configured on this broker")]
    UnknownProxy(String),
    /// The remote key cannot back a keybroker key (its type, size or operations).
    #[error("remote key {remote_key} of external proxy {proxy} cannot be used: {why}")]
    RemoteKeyUnusable {
        /// The `[[external_proxy]]` name.
        proxy: String,
        /// The key's name there.
        remote_key: String,
        /// Why.
        why: String,
    },
    /// The remote EKM proxy refused the TLS handshake (this broker's client certificate), or
    /// its certificate does not verify against the configured CA.
    #[error(
        "external proxy {proxy} refused the TLS handshake or is not the configured server: {why}"
    )]
    ExternalTls {
        /// The `[[external_proxy]]` name.
        proxy: String,
        /// What TLS said.
        why: String,
    },
    /// An external key does not do this (its material is not in this broker's HSM).
    #[error("key {key} is an external key: it cannot {what}")]
    ExternalKey {
        /// The key.
        key: KeyName,
        /// What it was asked to do.
        what: &'static str,
    },
    /// A double key does not do this (its material is its two members').
    #[error("key {key} is a double key: it cannot {what}")]
    DoubleKey {
        /// The key.
        key: KeyName,
        /// What it was asked to do.
        what: &'static str,
    },
    /// A double key cannot be made of this member.
    #[error("double key {key}: member {member} {why}")]
    DoubleMember {
        /// The double key.
        key: KeyName,
        /// The member key.
        member: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// What already exists.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Exists {
    /// A key of this name.
    #[error("key {0} already exists")]
    Key(String),
    /// A soft-deleted key of this name.
    #[error("a deleted key named {0} exists until it is purged (RecoverKey or PurgeKey)")]
    Deleted(KeyName),
    /// A version id of a backup is in use by another key.
    #[error("version id {0} of the backup is in use by another key")]
    VersionId(VersionId),
    /// The HSM holds objects with a backup's version id.
    #[error(
        "the HSM already holds objects with version id {0} of this backup: the key still exists under another name, or its purge has not finished"
    )]
    Objects(VersionId),
}

/// What cannot serve right now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// The HSM is down (re-initialising) or lost the session.
    #[error("the HSM is unavailable; retry later")]
    Hsm,
    /// The HSM failed the call.
    #[error("the HSM could not perform the operation; retry")]
    HsmFailed,
    /// An object handle went stale; the handles are being re-found.
    #[error("the HSM object is being re-opened; retry")]
    Reopening,
    /// The metadata store.
    #[error("the metadata store is unavailable")]
    Store,
    /// The audit trail cannot be written: the request is refused.
    #[error("the audit trail cannot be written; the request was refused")]
    Audit,
    /// The audit trail cannot be read.
    #[error("{0}")]
    AuditRead(String),
    /// Other replicas kept changing the cache while this one read it.
    #[error("the key cache could not settle (changes kept arriving); retry")]
    Unsettled,
    /// An external key's remote EKM proxy could not be reached, did not answer within the
    /// call's budget, or failed (5xx).
    #[error("external proxy {proxy} is unavailable ({why}); retry later")]
    External {
        /// The `[[external_proxy]]` name.
        proxy: String,
        /// What happened (no key material).
        why: String,
    },
}

/// What is at capacity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Exhausted {
    /// The token itself said it is busy.
    #[error("the HSM is at capacity; retry later")]
    Hsm,
    /// Admission to the session pool refused the call (the detail says why).
    #[error("{0}; retry later")]
    Queue(String),
    /// The caller has had too many requests refused lately (`api::limiter`).
    #[error("too many refused requests from {0}; retry later")]
    Refusals(String),
}

/// Where the deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Deadline {
    /// Before the request arrived.
    #[error("the request's deadline had passed when it arrived")]
    OnArrival,
    /// While the request worked.
    #[error("the request's deadline passed before it was done")]
    Passed,
    /// While waiting for other key changes.
    #[error("the deadline passed while waiting for other key changes to finish")]
    WriteLock,
    /// Before the HSM could do the work.
    #[error("the deadline passed before the HSM could do the work")]
    Hsm,
}

impl BrokerError {
    /// INTERNAL with a detail for the log.
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::Internal(msg.into())
    }

    /// Whether this is a bug (INTERNAL).
    pub fn is_internal(&self) -> bool {
        matches!(self, Self::Internal(_))
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid(_) | Self::Unauthentic | Self::UnauthenticCiphertext => {
                Code::InvalidArgument
            }
            Self::NotFound(_) => Code::NotFound,
            Self::Denied(Denied::Signature(_) | Denied::Credential(_)) => Code::Unauthenticated,
            Self::Denied(_) => Code::PermissionDenied,
            Self::Refused(_) => Code::FailedPrecondition,
            Self::Exists(_) => Code::AlreadyExists,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Exhausted(_) => Code::ResourceExhausted,
            Self::Deadline(_) => Code::DeadlineExceeded,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// The HTTP status, for the HTTP front doors: the canonical mapping of the gRPC codes
    /// (`google.rpc.Code`).
    pub fn http_status(&self) -> u16 {
        match self.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::Unauthenticated => 401,
            Code::PermissionDenied => 403,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::ResourceExhausted => 429,
            Code::Cancelled => 499,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::DeadlineExceeded => 504,
            Code::Ok => 200,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
        }
    }

    /// What the caller (and the audit trail) reads: the message, except that an internal
    /// error's detail goes to the log only.
    pub fn public_message(&self) -> String {
        match self {
            Self::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        }
    }
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
        match &e {
            BrokerError::Internal(detail) => {
                tracing::error!(detail = %detail, "internal error");
                Status::internal("internal error (logged by the broker)")
            }
            other => Status::new(other.code(), other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthentic_maps_to_invalid_argument_with_fixed_message() {
        let s: Status = BrokerError::Unauthentic.into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), UNAUTHENTIC_MESSAGE);
    }

    #[test]
    fn internal_detail_is_not_sent() {
        let s: Status = BrokerError::internal("CKR_ARGUMENTS_BAD in C_Encrypt").into();
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("CKR_"));
        assert_eq!(
            BrokerError::internal("CKR_ARGUMENTS_BAD").public_message(),
            "internal error"
        );
    }

    #[test]
    fn each_kind_has_its_grpc_code_and_http_status() {
        let key = KeyName::parse("acme/k").expect("name");
        let cases: Vec<(BrokerError, Code, u16)> = vec![
            (Invalid::AadTooLong.into(), Code::InvalidArgument, 400),
            (BrokerError::Unauthentic, Code::InvalidArgument, 400),
            (NotFound::Key("acme/k".into()).into(), Code::NotFound, 404),
            (Denied::HyokDisconnected.into(), Code::PermissionDenied, 403),
            (
                Refused::Disabled(key.clone()).into(),
                Code::FailedPrecondition,
                400,
            ),
            (Exists::Deleted(key).into(), Code::AlreadyExists, 409),
            (Unavailable::Hsm.into(), Code::Unavailable, 503),
            (Exhausted::Hsm.into(), Code::ResourceExhausted, 429),
            (Deadline::Passed.into(), Code::DeadlineExceeded, 504),
            (BrokerError::internal("x"), Code::Internal, 500),
        ];
        for (e, code, http) in cases {
            assert_eq!(e.code(), code, "{e}");
            assert_eq!(e.http_status(), http, "{e}");
        }
    }

    #[test]
    fn messages_say_what_was_wrong_with_the_data() {
        let key = KeyName::parse("acme/k").expect("name");
        assert_eq!(
            Invalid::Field {
                field: "key",
                error: Box::new(Invalid::Empty("tenant")),
            }
            .to_string(),
            "key: tenant is empty"
        );
        assert_eq!(
            Refused::NotAllowed {
                key: key.clone(),
                op: KeyOp::Wrap,
            }
            .to_string(),
            "key acme/k does not allow wrap"
        );
        assert_eq!(
            Denied::Key {
                caller: "spiffe://x/app".into(),
                permission: Permission::Unwrap,
                key,
            }
            .to_string(),
            "spiffe://x/app may not unwrap key acme/k"
        );
        assert_eq!(
            Invalid::DekLength(20).to_string(),
            "the DEK is 20 bytes; it must be 16 to 64 bytes and a multiple of 8"
        );
    }
}
