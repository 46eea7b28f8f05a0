//! BYOK: the RSA key-exchange keys a customer wraps key material for, and the import of that
//! material into a KEK (RSA-OAEP of the 32-byte key itself, unwrapped straight into the KEK).
//!
//! Why not the two-step CKM_RSA_AES_KEY_WRAP construction (RSA-OAEP of an ephemeral AES key,
//! then RFC 5649 of the material)? Done in two `C_UnwrapKey` calls, the ephemeral key is an
//! object the holder of the user PIN can unwrap with a template of their own and then use to
//! unwrap the material readable; only a nested `CKA_UNWRAP_TEMPLATE` would stop that, and
//! neither SoftHSM2 nor Kryoptic accepts one (measured: `docs/src/hsm-notes.md`), while
//! neither implements the one-call mechanism. One RSA-OAEP unwrap under an enforced unwrap
//! template leaves no such object.

use cryptoki::{
    mechanism::Mechanism,
    object::{Attribute, AttributeType, ObjectClass},
};

use super::{
    Hsm, KekHandles, RsaPublic,
    error::{FaultKind, HsmError},
    objects::destroy_handles,
    ops,
    pool::CREATE,
    template::{self, KekSpec},
};
use crate::model::{Algorithm, Origin, VersionId};

/// The label prefix of BYOK key-exchange keys.
pub const IMPORT_KEY_LABEL: &str = "kb-import:";

impl Hsm {
    /// BYOK step 1: generates an RSA key-exchange key (token objects labelled `kb-import:`)
    /// whose private half may only unwrap, with RSA-OAEP, and forces the KEK template of the key
    /// it will import (`algorithm`, with backup as `backup`) on whatever it unwraps
    /// ([`template::byok_forced`]); returns its public key. Refused where the token does not
    /// enforce that template (the probe's BYOK known-answer test).
    pub async fn create_import_key(
        &self,
        id: VersionId,
        bits: u32,
        algorithm: Algorithm,
        backup: bool,
    ) -> Result<RsaPublic, HsmError> {
        let caps = &self.inner.caps;
        if !caps.byok {
            return Err(HsmError::new(
                FaultKind::NotPermitted,
                "create an import key",
                format!(
                    "this token does not enforce an import key's unwrap template ({}), so the \
                     holder of the user PIN could read imported key material: BYOK is refused \
                     on it",
                    caps.test_failures
                        .get(super::probe::BYOK_TEMPLATE)
                        .map_or("known-answer test not passed", String::as_str)
                ),
            ));
        }
        let mech = caps.mechanism_for(algorithm).ok_or_else(|| {
            HsmError::new(
                FaultKind::NotPermitted,
                "create an import key",
                caps.why_not(algorithm),
            )
        })?;
        let forced = template::byok_forced(algorithm, mech, backup, caps.key_attributes);
        let key_attributes = caps.key_attributes;
        self.run("create an import key", CREATE, move |inner, _, s| {
            let _guard = inner.object_lock.lock().unwrap_or_else(|p| p.into_inner());
            let label = format!("{IMPORT_KEY_LABEL}{id}").into_bytes();
            let (public, private) = s
                .generate_key_pair(
                    &Mechanism::RsaPkcsKeyPairGen,
                    &template::byok_import_public(id, &label, bits),
                    &template::for_token(
                        template::byok_import_private(id, &label, forced.clone()),
                        key_attributes,
                    ),
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

    /// BYOK step 2: RSA-OAEP-unwraps the customer's key material directly into a token KEK with
    /// the standard template — the one the import key forces anyway. The new KEK is checked
    /// like any other (as imported).
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
        self.run("import a KEK", CREATE, move |inner, conn, s| {
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
            if modulus.is_empty() || material.len() != modulus.len() {
                return Err(HsmError::new(
                    FaultKind::DataInvalid,
                    "import a KEK",
                    format!(
                        "the wrapped material is {} bytes; RSA-OAEP under this import key gives {}",
                        material.len(),
                        modulus.len()
                    ),
                ));
            }
            // SoftHSM2 reports CKA_VALUE_LEN = 0 for unwrapped keys and refuses it in an unwrap
            // template, so the length is checked after, where the token reports it.
            let mut template = template::aes_template(&spec, mech);
            template.retain(|a| a.attribute_type() != AttributeType::ValueLen);
            let template = template::for_token(template, inner.caps.key_attributes);
            let secret = s
                .unwrap_key(&ops::oaep_mechanism(oaep), *private, &material, &template)
                .map_err(|e| HsmError::from_ck_decrypt("RSA-OAEP unwrap of the key material", e))?;
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
