//! BYOK: the RSA key-exchange keys a customer wraps key material for, and the import of that
//! material into a KEK (RSA-OAEP of an ephemeral AES key, then RFC 5649 of the material).

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
