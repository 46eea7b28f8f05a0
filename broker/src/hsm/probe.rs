//! The start-up capability probe: which mechanisms the token lists, and known-answer tests that
//! prove the ones keybroker uses actually behave as the standards say — on session objects, so
//! the token is left as it was.
//!
//! * AES-256-GCM: the McGrew–Viega test case 16 (256-bit key, 96-bit IV, AAD), then a flipped
//!   tag and a wrong AAD must both be refused.
//! * RFC 5649 (AES key wrap with padding): the mechanism number differs between tokens
//!   (`CKM_AES_KEY_WRAP_PAD` 0x210A on SoftHSM2, `CKM_AES_KEY_WRAP_KWP` 0x210B on Kryoptic and
//!   Luna), and SoftHSM2's 0x210A zero-pads inputs to a multiple of 8 before applying RFC 5649, so
//!   it matches the RFC only for such lengths. Each candidate is tried on an aligned vector
//!   (required; keybroker's DEKs are multiples of 8) and on the RFC's 20-byte vector (reported).
//! * RSA-OAEP: a round trip with SHA-256/MGF1-SHA-256 on a fresh session key pair, falling back
//!   to SHA-1 (SoftHSM2 2.6.1 only has SHA-1 OAEP).

use cryptoki::{
    context::Pkcs11,
    mechanism::{
        Mechanism, MechanismType,
        aead::GcmParams,
        rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource},
    },
    object::{Attribute, KeyType as CkKeyType, ObjectClass, ObjectHandle},
    session::Session,
    slot::Slot,
};
use serde::Serialize;

use super::error::HsmError;
use crate::model::Algorithm;

/// How the token implements RFC 5649.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct KwpSupport {
    /// The mechanism number (0x210A or 0x210B).
    pub mechanism: u64,
    /// Its name.
    pub name: &'static str,
    /// Whether it also matches the RFC for lengths that are not multiples of 8.
    pub full_rfc5649: bool,
}

/// What the token can do for keybroker, as proven by the probe.
#[derive(Clone, Debug, Serialize)]
pub struct Capabilities {
    /// The token's mechanism list (names; unknown numbers in hex).
    pub mechanisms: Vec<String>,
    /// `CKM_AES_KEY_GEN` listed.
    pub aes_keygen: bool,
    /// `CKM_RSA_PKCS_KEY_PAIR_GEN` listed.
    pub rsa_keygen: bool,
    /// AES-256-GCM passed its known-answer test.
    pub aes_gcm: bool,
    /// RFC 5649 support, if any candidate passed.
    pub kwp: Option<KwpSupport>,
    /// RSA-OAEP with SHA-256 works.
    pub oaep_sha256: bool,
    /// RSA-OAEP with SHA-1 works.
    pub oaep_sha1: bool,
    /// `C_GenerateRandom` works.
    pub rng: bool,
    /// Why each failed check failed (for the log and `check-config`).
    pub notes: Vec<String>,
}

impl Capabilities {
    /// The PKCS#11 mechanism that implements `alg` on this token, if it can.
    pub fn mechanism_for(&self, alg: Algorithm) -> Option<MechanismType> {
        match alg {
            Algorithm::Aes256Gcm if self.aes_gcm => Some(MechanismType::AES_GCM),
            Algorithm::AesKeyWrapPad => match &self.kwp {
                Some(k) if k.mechanism == cryptoki_sys_kwp::PAD => {
                    Some(MechanismType::AES_KEY_WRAP_PAD)
                }
                _ => None,
            },
            Algorithm::RsaOaepSha256 if self.oaep_sha256 => Some(MechanismType::RSA_PKCS_OAEP),
            Algorithm::RsaOaepSha1 if self.oaep_sha1 => Some(MechanismType::RSA_PKCS_OAEP),
            _ => None,
        }
    }

    /// The name of the mechanism for `alg` (for GetKey), or why there is none.
    pub fn mechanism_name(&self, alg: Algorithm) -> String {
        match alg {
            Algorithm::Aes256Gcm if self.aes_gcm => "CKM_AES_GCM".into(),
            Algorithm::AesKeyWrapPad => match &self.kwp {
                Some(k) => k.name.into(),
                None => "unavailable".into(),
            },
            Algorithm::RsaOaepSha256 if self.oaep_sha256 => {
                "CKM_RSA_PKCS_OAEP (CKM_SHA256, CKG_MGF1_SHA256)".into()
            }
            Algorithm::RsaOaepSha1 if self.oaep_sha1 => {
                "CKM_RSA_PKCS_OAEP (CKM_SHA_1, CKG_MGF1_SHA1)".into()
            }
            _ => "unavailable".into(),
        }
    }

    /// Whether keys of `alg` can be created and used.
    pub fn supports(&self, alg: Algorithm) -> bool {
        let keygen = if alg.is_rsa() {
            self.rsa_keygen
        } else {
            self.aes_keygen
        };
        keygen && self.mechanism_for(alg).is_some()
    }

    /// The default algorithm for RSA keys: SHA-256 OAEP where the token has it.
    pub fn default_rsa_algorithm(&self) -> Algorithm {
        if self.oaep_sha256 || !self.oaep_sha1 {
            Algorithm::RsaOaepSha256
        } else {
            Algorithm::RsaOaepSha1
        }
    }

    /// The mechanisms keybroker cannot serve at all without: AES key generation, AES-GCM, RSA
    /// key-pair generation, RSA-OAEP (some hash), and the RNG. Returns the missing ones by name.
    pub fn missing_required(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.aes_keygen {
            m.push("CKM_AES_KEY_GEN");
        }
        if !self.aes_gcm {
            m.push("CKM_AES_GCM");
        }
        if !self.rsa_keygen {
            m.push("CKM_RSA_PKCS_KEY_PAIR_GEN");
        }
        if !self.oaep_sha256 && !self.oaep_sha1 {
            m.push("CKM_RSA_PKCS_OAEP");
        }
        if !self.rng {
            m.push("C_GenerateRandom");
        }
        m
    }
}

/// Mechanism numbers cryptoki 0.12 has no constant for.
pub(crate) mod cryptoki_sys_kwp {
    /// `CKM_AES_KEY_WRAP_PAD`.
    pub const PAD: u64 = 0x210A;
    /// `CKM_AES_KEY_WRAP_KWP` (PKCS#11 3.0).
    pub const KWP: u64 = 0x210B;
}

// McGrew & Viega, "The Galois/Counter Mode of Operation", test case 16.
const GCM_KEY: [u8; 32] = hex32("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
const GCM_IV: [u8; 12] = [
    0xca, 0xfe, 0xba, 0xbe, 0xfa, 0xce, 0xdb, 0xad, 0xde, 0xca, 0xf8, 0x88,
];
const GCM_AAD: [u8; 20] = [
    0xfe, 0xed, 0xfa, 0xce, 0xde, 0xad, 0xbe, 0xef, 0xfe, 0xed, 0xfa, 0xce, 0xde, 0xad, 0xbe, 0xef,
    0xab, 0xad, 0xda, 0xd2,
];
pub(crate) const GCM_PT: &str = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39";
pub(crate) const GCM_CT_TAG: &str = "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f66276fc6ece0f4e1768cddf8853bb2d551b";

// RFC 5649 §6: the 192-bit KEK and the 20-byte vector.
pub(crate) const KWP_KEK: &str = "5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8";
pub(crate) const KWP_RFC_KEY: &str = "c37b7e6492584340bed12207808941155068f738";
pub(crate) const KWP_RFC_WRAPPED: &str =
    "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a";
// An aligned (32-byte) input under the same KEK; the expected output is computed with an
// independent RFC 5649 implementation (the `aes-kw` crate) in this module's tests.
pub(crate) const KWP_ALIGNED_KEY: &str =
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
pub(crate) const KWP_ALIGNED_WRAPPED: &str =
    "fe6a0320617d94d5abcd3cadbb5a15ee23574ad2a6509b3f5a2b3b9d96fda766e6d1204253503895";

const fn hex32(s: &str) -> [u8; 32] {
    let b = s.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = (nib(b[2 * i]) << 4) | nib(b[2 * i + 1]);
        i += 1;
    }
    out
}

const fn nib(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => 0,
    }
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap_or_default()
}

/// Runs the probe on a logged-in session.
pub fn probe(ctx: &Pkcs11, slot: Slot, session: &Session) -> Result<Capabilities, HsmError> {
    let list = ctx
        .get_mechanism_list(slot)
        .map_err(|e| HsmError::from_ck("list the token's mechanisms", e))?;
    let mut caps = Capabilities {
        mechanisms: list.iter().map(|m| m.to_string()).collect(),
        aes_keygen: list.contains(&MechanismType::AES_KEY_GEN),
        rsa_keygen: list.contains(&MechanismType::RSA_PKCS_KEY_PAIR_GEN),
        aes_gcm: false,
        kwp: None,
        oaep_sha256: false,
        oaep_sha1: false,
        rng: false,
        notes: Vec::new(),
    };
    caps.rng = match session.generate_random_vec(16) {
        Ok(v) => v.len() == 16,
        Err(e) => {
            caps.notes.push(format!(
                "C_GenerateRandom failed: {}",
                HsmError::from_ck("rng", e)
            ));
            false
        }
    };
    if list.contains(&MechanismType::AES_GCM) {
        match gcm_kat(session) {
            Ok(()) => caps.aes_gcm = true,
            Err(why) => caps
                .notes
                .push(format!("CKM_AES_GCM failed its known-answer test: {why}")),
        }
    } else {
        caps.notes
            .push("CKM_AES_GCM is not in the token's mechanism list".into());
    }
    if list.contains(&MechanismType::AES_KEY_WRAP_PAD) {
        match kwp_kat(session, &Mechanism::AesKeyWrapPad) {
            Ok(full) => {
                caps.kwp = Some(KwpSupport {
                    mechanism: cryptoki_sys_kwp::PAD,
                    name: "CKM_AES_KEY_WRAP_PAD",
                    full_rfc5649: full,
                });
                if !full {
                    caps.notes.push(
                        "CKM_AES_KEY_WRAP_PAD matches RFC 5649 only for inputs that are multiples of 8 bytes \
                         (it zero-pads first); keybroker's DEKs always are"
                            .into(),
                    );
                }
            }
            Err(why) => caps.notes.push(format!(
                "CKM_AES_KEY_WRAP_PAD failed its RFC 5649 known-answer test: {why}"
            )),
        }
    }
    if caps.kwp.is_none() {
        caps.notes.push(format!(
            "no RFC 5649 mechanism usable (CKM_AES_KEY_WRAP_KWP {:#x} is not yet driven by this build); \
             AES key wrap keys cannot be created",
            cryptoki_sys_kwp::KWP
        ));
    }
    if caps.rsa_keygen && list.contains(&MechanismType::RSA_PKCS_OAEP) {
        match oaep_probe(session) {
            Ok((s256, s1)) => {
                caps.oaep_sha256 = s256;
                caps.oaep_sha1 = s1;
                if !s256 {
                    caps.notes.push(
                        "RSA-OAEP with SHA-256 is refused by this token; RSA keys default to SHA-1 OAEP".into(),
                    );
                }
            }
            Err(why) => caps.notes.push(format!("RSA-OAEP probe failed: {why}")),
        }
    } else {
        caps.notes
            .push("CKM_RSA_PKCS_OAEP or CKM_RSA_PKCS_KEY_PAIR_GEN is not listed".into());
    }
    Ok(caps)
}

/// Destroys a session object when dropped.
struct Temp<'a> {
    session: &'a Session,
    handle: ObjectHandle,
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        // Session objects vanish with the session anyway; a failure here is only logged.
        if let Err(e) = self.session.destroy_object(self.handle) {
            tracing::debug!(error = %e, "destroying a probe object failed");
        }
    }
}

fn session_aes_key<'a>(
    session: &'a Session,
    value: &[u8],
    roles: &[Attribute],
) -> Result<Temp<'a>, String> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(CkKeyType::AES),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Value(value.to_vec()),
    ];
    t.extend_from_slice(roles);
    let handle = session
        .create_object(&t)
        .map_err(|e| HsmError::from_ck("create a probe key", e).detail)?;
    Ok(Temp { session, handle })
}

fn gcm_kat(session: &Session) -> Result<(), String> {
    let key = session_aes_key(
        session,
        &GCM_KEY,
        &[Attribute::Encrypt(true), Attribute::Decrypt(true)],
    )?;
    let pt = unhex(GCM_PT);
    let want = unhex(GCM_CT_TAG);
    let mut iv = GCM_IV;
    let params = GcmParams::new(&mut iv, &GCM_AAD, 128.into()).map_err(|e| e.to_string())?;
    let got = session
        .encrypt(&Mechanism::AesGcm(params), key.handle, &pt)
        .map_err(|e| HsmError::from_ck("C_Encrypt", e).detail)?;
    if got != want {
        return Err("encryption does not match the test vector".into());
    }
    let mut iv = GCM_IV;
    let params = GcmParams::new(&mut iv, &GCM_AAD, 128.into()).map_err(|e| e.to_string())?;
    let back = session
        .decrypt(&Mechanism::AesGcm(params), key.handle, &want)
        .map_err(|e| HsmError::from_ck("C_Decrypt", e).detail)?;
    if back != pt {
        return Err("decryption does not match the test vector".into());
    }
    let mut bad = want.clone();
    if let Some(last) = bad.last_mut() {
        *last ^= 1;
    }
    let mut iv = GCM_IV;
    let params = GcmParams::new(&mut iv, &GCM_AAD, 128.into()).map_err(|e| e.to_string())?;
    if session
        .decrypt(&Mechanism::AesGcm(params), key.handle, &bad)
        .is_ok()
    {
        return Err("a flipped tag bit was accepted".into());
    }
    let mut iv = GCM_IV;
    let params = GcmParams::new(&mut iv, &GCM_AAD[..19], 128.into()).map_err(|e| e.to_string())?;
    if session
        .decrypt(&Mechanism::AesGcm(params), key.handle, &want)
        .is_ok()
    {
        return Err("a wrong AAD was accepted".into());
    }
    Ok(())
}

/// Returns whether the mechanism also passes the RFC's unaligned vector.
fn kwp_kat(session: &Session, mech: &Mechanism) -> Result<bool, String> {
    let kek = session_aes_key(
        session,
        &unhex(KWP_KEK),
        &[Attribute::Wrap(true), Attribute::Unwrap(true)],
    )?;
    let wrap_one = |value: &[u8]| -> Result<Vec<u8>, String> {
        let target = session
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(CkKeyType::GENERIC_SECRET),
                Attribute::Token(false),
                Attribute::Private(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Value(value.to_vec()),
            ])
            .map_err(|e| HsmError::from_ck("create a probe target", e).detail)?;
        let target = Temp {
            session,
            handle: target,
        };
        session
            .wrap_key(mech, kek.handle, target.handle)
            .map_err(|e| HsmError::from_ck("C_WrapKey", e).detail)
    };
    let got = wrap_one(&unhex(KWP_ALIGNED_KEY))?;
    if got != unhex(KWP_ALIGNED_WRAPPED) {
        // Test-vector bytes only: safe to show.
        return Err(format!(
            "wrapping a 32-byte key does not match RFC 5649 (got {})",
            hex::encode(&got)
        ));
    }
    let unwrapped =
        super::ops::unwrap_generic(session, mech, kek.handle, &got).map_err(|e| e.detail)?;
    if unwrapped.expose() != unhex(KWP_ALIGNED_KEY).as_slice() {
        return Err("unwrapping does not give the 32-byte key back".into());
    }
    let full = matches!(wrap_one(&unhex(KWP_RFC_KEY)), Ok(w) if w == unhex(KWP_RFC_WRAPPED));
    Ok(full)
}

fn oaep_probe(session: &Session) -> Result<(bool, bool), String> {
    let (public, private) = session
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::Private(false),
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
                Attribute::Encrypt(true),
            ],
            &[
                Attribute::Token(false),
                Attribute::Private(false),
                Attribute::Decrypt(true),
            ],
        )
        .map_err(|e| HsmError::from_ck("C_GenerateKeyPair", e).detail)?;
    let _pub = Temp {
        session,
        handle: public,
    };
    let _priv = Temp {
        session,
        handle: private,
    };
    let round_trip = |hash: MechanismType, mgf: PkcsMgfType| -> bool {
        let m = Mechanism::RsaPkcsOaep(PkcsOaepParams::new(hash, mgf, PkcsOaepSource::empty()));
        let msg = [0x5au8; 32];
        match session.encrypt(&m, public, &msg) {
            Ok(ct) => matches!(session.decrypt(&m, private, &ct), Ok(pt) if pt == msg),
            Err(_) => false,
        }
    };
    Ok((
        round_trip(MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
        round_trip(MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcm_vector_matches_an_independent_implementation() {
        use aes_gcm::{
            Aes256Gcm, KeyInit,
            aead::{Aead, Payload},
        };
        let c = Aes256Gcm::new_from_slice(&GCM_KEY).expect("key");
        let ct = c
            .encrypt(
                (&GCM_IV).into(),
                Payload {
                    msg: &unhex(GCM_PT),
                    aad: &GCM_AAD,
                },
            )
            .expect("encrypt");
        assert_eq!(hex::encode(ct), GCM_CT_TAG);
    }

    #[test]
    fn kwp_vectors_match_an_independent_implementation() {
        let kek = aes_kw::KekAes192::try_from(unhex(KWP_KEK).as_slice()).expect("kek");
        let w = kek
            .wrap_with_padding_vec(&unhex(KWP_RFC_KEY))
            .expect("wrap");
        assert_eq!(hex::encode(w), KWP_RFC_WRAPPED);
        let w = kek
            .wrap_with_padding_vec(&unhex(KWP_ALIGNED_KEY))
            .expect("wrap");
        assert_eq!(hex::encode(w), KWP_ALIGNED_WRAPPED);
    }
}
