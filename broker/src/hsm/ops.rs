//! The blocking PKCS#11 operations, each on one borrowed session. Called only from the session
//! pool's HSM threads (never on an async worker).

use cryptoki::{
    mechanism::{
        Mechanism, MechanismType,
        aead::GcmParams,
        rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource},
    },
    object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle},
    session::Session,
};
use serde::Serialize;
use zeroize::Zeroize;

use super::error::{FaultKind, HsmError};
use crate::{
    envelope::{GCM_IV_LEN, GCM_TAG_LEN},
    model::{Algorithm, Dek},
};

/// The largest RSA block (4096-bit modulus).
const MAX_RSA_BLOCK: usize = 512;

/// The parameters of one wrap or unwrap.
#[derive(Clone, Debug)]
pub enum WrapParams {
    /// AES-256-GCM with this IV and AAD (the full AAD: envelope header || caller AAD).
    Gcm {
        /// The 96-bit IV.
        iv: [u8; GCM_IV_LEN],
        /// The additional authenticated data.
        aad: Vec<u8>,
    },
    /// RFC 5649 with the mechanism the probe chose.
    Kwp,
    /// RFC 3394 (`CKM_AES_KEY_WRAP`, no padding: DEKs are multiples of 8 bytes).
    Kw,
    /// RSA-OAEP with SHA-256.
    OaepSha256,
    /// RSA-OAEP with SHA-1.
    OaepSha1,
}

impl WrapParams {
    /// The algorithm these parameters belong to.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            WrapParams::Gcm { .. } => Algorithm::Aes256Gcm,
            WrapParams::Kwp => Algorithm::AesKeyWrapPad,
            WrapParams::Kw => Algorithm::AesKeyWrap,
            WrapParams::OaepSha256 => Algorithm::RsaOaepSha256,
            WrapParams::OaepSha1 => Algorithm::RsaOaepSha1,
        }
    }

    /// The `C_WrapKey`/`C_UnwrapKey` mechanism of an AES key wrap: RFC 3394's one number, or
    /// the RFC 5649 mechanism the probe chose (`kwp`). Only asked of `Kw` and `Kwp`.
    fn key_wrap_mechanism(&self, kwp: KwpMechanism) -> Mechanism<'static> {
        match self {
            WrapParams::Kw => Mechanism::AesKeyWrap,
            _ => kwp.mechanism(),
        }
    }
}

/// Which PKCS#11 mechanism implements RFC 5649 on this token, decided by the probe's
/// known-answer tests (the number alone proves nothing: SoftHSM2's 0x210A is RFC 5649 for
/// aligned input, NSS's 0x210A is RFC 3394 over PKCS#7 padding, and PKCS#11 3.0 defines 0x210A
/// as that PKCS#7 variant and 0x210B as RFC 5649).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum KwpMechanism {
    /// `CKM_AES_KEY_WRAP_KWP` (0x210B, PKCS#11 3.0): Kryoptic, Thales Luna, Entrust nShield.
    Kwp,
    /// `CKM_AES_KEY_WRAP_PAD` (0x210A): SoftHSM2 (RFC 5649 after zero-padding to a multiple of
    /// 8, so equal to RFC 5649 only for aligned input; keybroker's DEKs always are).
    Pad,
}

impl KwpMechanism {
    /// Every RFC 5649 candidate the probe knows, in its default order of preference.
    pub const ALL: [KwpMechanism; 2] = [KwpMechanism::Kwp, KwpMechanism::Pad];

    /// The cryptoki mechanism.
    pub fn mechanism(self) -> Mechanism<'static> {
        match self {
            KwpMechanism::Kwp => Mechanism::AesKeyWrapKwp,
            KwpMechanism::Pad => Mechanism::AesKeyWrapPad,
        }
    }

    /// The mechanism type (for `CKA_ALLOWED_MECHANISMS` and the mechanism list).
    pub fn mechanism_type(self) -> MechanismType {
        match self {
            KwpMechanism::Kwp => MechanismType::AES_KEY_WRAP_KWP,
            KwpMechanism::Pad => MechanismType::AES_KEY_WRAP_PAD,
        }
    }

    /// The PKCS#11 name.
    pub fn name(self) -> &'static str {
        match self {
            KwpMechanism::Kwp => "CKM_AES_KEY_WRAP_KWP",
            KwpMechanism::Pad => "CKM_AES_KEY_WRAP_PAD",
        }
    }

    /// The PKCS#11 number.
    pub fn number(self) -> u64 {
        match self {
            KwpMechanism::Kwp => 0x210B,
            KwpMechanism::Pad => 0x210A,
        }
    }
}

/// The RSA-OAEP mechanism for an OAEP algorithm (SHA-256 or SHA-1, MGF1 of the same hash,
/// empty label).
pub fn oaep_mechanism(hash: Algorithm) -> Mechanism<'static> {
    oaep(hash)
}

fn oaep(hash: Algorithm) -> Mechanism<'static> {
    let (h, mgf) = if hash == Algorithm::RsaOaepSha1 {
        (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1)
    } else {
        (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256)
    };
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(h, mgf, PkcsOaepSource::empty()))
}

/// Wraps `dek`. `key` is the secret key (AES) or the public key (RSA).
pub fn wrap(
    session: &Session,
    key: ObjectHandle,
    kwp: KwpMechanism,
    params: &WrapParams,
    dek: &Dek,
) -> Result<Vec<u8>, HsmError> {
    match params {
        WrapParams::Gcm { iv, aad } => {
            let mut iv = *iv;
            let p = GcmParams::new(&mut iv, aad, 128.into())
                .map_err(|e| HsmError::from_ck("AES-GCM parameters", e))?;
            let out = session
                .encrypt_sized(
                    &Mechanism::AesGcm(p),
                    key,
                    dek.expose(),
                    dek.len() + GCM_TAG_LEN,
                )
                .map_err(|e| HsmError::from_ck("AES-GCM encrypt", e))?;
            if out.len() != dek.len() + GCM_TAG_LEN {
                return Err(HsmError::new(
                    FaultKind::Other,
                    "AES-GCM encrypt",
                    format!(
                        "token returned {} bytes, expected {}",
                        out.len(),
                        dek.len() + GCM_TAG_LEN
                    ),
                ));
            }
            Ok(out)
        }
        WrapParams::Kwp | WrapParams::Kw => {
            // C_WrapKey needs the DEK as a key object: a short-lived session object holding only
            // the value, with no roles, destroyed before we return (security invariant 2,
            // docs/src/security.md).
            let mut template = dek_object_template();
            template.push(Attribute::Value(dek.expose().to_vec()));
            let made = session.create_object(&template);
            // The template's copy of the DEK is wiped like every other.
            for a in &mut template {
                if let Attribute::Value(v) = a {
                    v.zeroize();
                }
            }
            let obj = made.map_err(|e| HsmError::from_ck("create the DEK session object", e))?;
            let r = session
                .wrap_key(&params.key_wrap_mechanism(kwp), key, obj)
                .map_err(|e| HsmError::from_ck("AES key wrap", e));
            destroy_quietly(session, obj);
            r
        }
        WrapParams::OaepSha256 | WrapParams::OaepSha1 => session
            .encrypt_sized(&oaep(params.algorithm()), key, dek.expose(), MAX_RSA_BLOCK)
            .map_err(|e| HsmError::from_ck("RSA-OAEP encrypt", e)),
    }
}

/// Unwraps `ciphertext`. `key` is the secret key (AES) or the private key (RSA). Any failure
/// that can mean "not authentic" is [`FaultKind::DataInvalid`].
pub fn unwrap(
    session: &Session,
    key: ObjectHandle,
    kwp: KwpMechanism,
    params: &WrapParams,
    ciphertext: &[u8],
) -> Result<Dek, HsmError> {
    match params {
        WrapParams::Gcm { iv, aad } => {
            let mut iv = *iv;
            let p = GcmParams::new(&mut iv, aad, 128.into())
                .map_err(|e| HsmError::from_ck("AES-GCM parameters", e))?;
            session
                .decrypt_sized(&Mechanism::AesGcm(p), key, ciphertext, ciphertext.len())
                .map(Dek::new)
                .map_err(|e| HsmError::from_ck_decrypt("AES-GCM decrypt", e))
        }
        WrapParams::Kwp | WrapParams::Kw => {
            unwrap_generic(session, &params.key_wrap_mechanism(kwp), key, ciphertext)
        }
        WrapParams::OaepSha256 | WrapParams::OaepSha1 => session
            .decrypt_sized(&oaep(params.algorithm()), key, ciphertext, ciphertext.len())
            .map(Dek::new)
            .map_err(|e| HsmError::from_ck_decrypt("RSA-OAEP decrypt", e)),
    }
}

/// The template of the short-lived session object a DEK passes through when a mechanism works
/// only on key objects (AES key wrap): a generic secret with no role at all, readable only so
/// that its value can be taken out, destroyed at once (security invariant 2,
/// `docs/src/security.md`).
fn dek_object_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(CkKeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ]
}

/// Unwraps into a short-lived generic-secret session object, reads its value, destroys it.
pub fn unwrap_generic(
    session: &Session,
    mech: &Mechanism,
    kek: ObjectHandle,
    wrapped: &[u8],
) -> Result<Dek, HsmError> {
    let obj = session
        .unwrap_key(mech, kek, wrapped, &dek_object_template())
        .map_err(|e| HsmError::from_ck_decrypt("AES key unwrap", e))?;
    let value = session.get_attributes(obj, &[AttributeType::Value]);
    destroy_quietly(session, obj);
    let attrs = value.map_err(|e| HsmError::from_ck("read the unwrapped DEK", e))?;
    let mut out = None;
    for a in attrs {
        if let Attribute::Value(mut v) = a {
            out = Some(Dek::new(std::mem::take(&mut v)));
            v.zeroize();
        }
    }
    out.ok_or_else(|| {
        HsmError::new(
            FaultKind::Other,
            "AES key unwrap",
            "token returned no CKA_VALUE",
        )
    })
}

/// Draws `len` random bytes from the token's RNG.
pub fn random(session: &Session, len: usize) -> Result<Dek, HsmError> {
    let mut buf = vec![0u8; len];
    session
        .generate_random_slice(&mut buf)
        .map_err(|e| HsmError::from_ck("C_GenerateRandom", e))?;
    Ok(Dek::new(buf))
}

/// Destroys a session object; failure is logged (it dies with the session anyway).
pub fn destroy_quietly(session: &Session, obj: ObjectHandle) {
    if let Err(e) = session.destroy_object(obj) {
        tracing::warn!(error = %HsmError::from_ck("destroy a session object", e), "leaked a session object until the session closes");
    }
}
