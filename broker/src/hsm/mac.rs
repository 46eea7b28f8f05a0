//! The audit trail's HMAC key: found by id (or created once, on first start), and checkpoint
//! MACs computed and verified inside the HSM.

use cryptoki::{
    error::{Error as CkError, RvError},
    mechanism::Mechanism,
    object::{Attribute, ObjectClass, ObjectHandle},
    session::Session,
};

use super::{
    Hsm,
    error::HsmError,
    pool::{CREATE, MAINTAIN, READ},
    template,
};
use crate::model::VersionId;

/// The label prefix of the audit HMAC key (not `kb:`, so it is never reported as an orphan KEK).
pub const AUDIT_KEY_LABEL: &str = "kb-audit:hmac-sha256";

/// Finds the audit key by id (exactly one object, or fail closed).
pub(super) fn find_audit_key(s: &Session, id: VersionId) -> Result<ObjectHandle, HsmError> {
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

/// Why the audit trail cannot have its HSM-resident MAC key on this token.
pub fn no_mac(caps: &super::Capabilities) -> String {
    let mut why = vec![];
    if !caps.hmac_sha256 {
        why.push("CKM_SHA256_HMAC is missing or failed its known-answer test");
    }
    if !caps.generic_secret_keygen {
        why.push("CKM_GENERIC_SECRET_KEY_GEN is not listed");
    }
    format!(
        "the audit trail's checkpoints are MACed inside the HSM with HMAC-SHA256 under a key \
         the token generates, and this token has no such mechanism ({}); keybroker cannot keep \
         a tamper-evident audit trail on it",
        why.join(", ")
    )
}

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
                        // The probe chose the MAC (`Capabilities::mac`); without one the
                        // broker refuses to start, so this is only reached by other callers.
                        if inner.caps.mac.is_none() {
                            return Err(HsmError::setup(
                                "create the audit HMAC key",
                                no_mac(&inner.caps),
                            ));
                        }
                        let id = VersionId::random();
                        let h = s
                            .generate_key(
                                &Mechanism::GenericSecretKeyGen,
                                &template::for_token(
                                    template::hmac_key_template(id, AUDIT_KEY_LABEL, None),
                                    inner.caps.key_attributes,
                                ),
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
}
