//! The start-up capability probe: which mechanisms the token lists, and known-answer tests that
//! prove the ones keybroker uses actually behave as the standards say — on session objects, so
//! the token is left as it was.
//!
//! * AES-256-GCM: the McGrew–Viega test case 16 (256-bit key, 96-bit IV, AAD), then a flipped
//!   tag and a wrong AAD must both be refused.
//! * RFC 5649 (AES key wrap with padding): the mechanism number differs between tokens
//!   (`CKM_AES_KEY_WRAP_PAD` 0x210A on SoftHSM2, `CKM_AES_KEY_WRAP_KWP` 0x210B on Kryoptic and
//!   Luna), and SoftHSM2's 0x210A zero-pads inputs to a multiple of 8 before applying RFC 5649, so
//!   it matches the RFC only for such lengths. Every listed candidate is tried on an aligned
//!   vector (required; keybroker's DEKs are multiples of 8) and on the RFC's 20-byte vector; the
//!   one that passes both wins, else one that passes the aligned vector, the vendor profile's
//!   order breaking ties. So the tests, not the number, decide: SoftHSM2 → 0x210A (aligned only),
//!   Kryoptic → 0x210B (full RFC 5649).
//! * RFC 3394 (AES key wrap, `CKM_AES_KEY_WRAP` 0x2109, for `aes-kw` keys): RFC 3394 §4.6's
//!   vector (256-bit KEK, 256-bit key data) must wrap byte for byte and unwrap back, and the
//!   same output with one byte flipped must fail its integrity check. A token that does not list
//!   the mechanism, or fails, keeps serving everything else; creating `aes-kw` keys is refused,
//!   naming why.
//! * RSA-OAEP: a fixed RSA-2048 test key is imported as session objects; the token must decrypt
//!   ciphertexts made by OpenSSL (a real known-answer test: `kat_rsa`) and round-trip
//!   its own encryption, with SHA-256/MGF1-SHA-256, falling back to SHA-1 (SoftHSM2 2.6.1 only
//!   has SHA-1 OAEP).
//! * Signatures (`kat_sign`): `CKM_RSA_PKCS` (RS256, byte for byte) and `CKM_RSA_PKCS_PSS`
//!   (PS256) with the RSA test key, `CKM_ECDSA` on P-256 and P-384 with RFC 6979's keys: the
//!   token verifies an independent implementation's signature, verifies its own, and refuses an
//!   altered one. RSA signing keys need both RSA mechanisms (a key signs RS* and PS*); EC keys
//!   need `CKM_EC_KEY_PAIR_GEN` and ECDSA on their curve. A token that fails keeps serving
//!   everything else; creating that key type is refused, naming the test that failed.
//! * HMAC-SHA256 (the audit trail's checkpoint key and the security domain's MAC key): RFC 4231
//!   test case 6 signed and verified with a session key, and a wrong MAC refused; the key is
//!   generated with `CKM_GENERIC_SECRET_KEY_GEN`, which must be listed. Without both, the
//!   broker cannot keep an audit trail and refuses to start, saying so.
//! * The KEK template's PKCS#11 2.40 attributes (`CKA_COPYABLE`, `CKA_DESTROYABLE`,
//!   `CKA_ALLOWED_MECHANISMS`): a session object is made with them. A PKCS#11 2.20 token
//!   (openCryptoki 3.8) refuses them with `CKR_ATTRIBUTE_TYPE_INVALID`; keybroker then makes its
//!   keys without them only when the operator allows it (`[hsm] legacy_template`), because
//!   such a token can neither stop a copy with more roles nor limit a key to one mechanism.
//!
//! What the probe found is turned into the capability report (one row per mechanism keybroker
//! uses, and the key types each algorithm can serve) by [`super::report`].

use cryptoki::{
    context::Pkcs11,
    mechanism::{
        Mechanism, MechanismType,
        aead::GcmParams,
        rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource},
    },
    object::{
        Attribute, AttributeArray, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle,
    },
    session::Session,
    slot::Slot,
};
use serde::Serialize;

use super::{error::HsmError, kat_rsa, kat_sign, ops::KwpMechanism, profile::Profile, template};
use crate::model::{Algorithm, KeyType};

/// How the token implements RFC 5649.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct KwpSupport {
    /// The mechanism number (0x210A or 0x210B).
    pub mechanism: u64,
    /// Its name.
    pub name: &'static str,
    /// Whether it also matches the RFC for lengths that are not multiples of 8.
    pub full_rfc5649: bool,
    /// The mechanism, for the HSM layer.
    #[serde(skip)]
    pub kind: KwpMechanism,
}

/// The outcome of one RFC 5649 candidate's known-answer tests.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct KwpCandidate {
    /// The mechanism number.
    pub mechanism: u64,
    /// Its name.
    pub name: &'static str,
    /// Whether the token lists it.
    pub listed: bool,
    /// Whether it passed the aligned (32-byte) vector, wrapping and unwrapping.
    pub aligned: bool,
    /// Whether it also passed the RFC's 20-byte vector.
    pub full_rfc5649: bool,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// What the token says about one mechanism keybroker uses (`C_GetMechanismInfo`).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MechanismFlags {
    /// The mechanism's name.
    pub name: String,
    /// `ulMinKeySize` (bytes for AES, bits for RSA, as PKCS#11 defines them).
    pub min_key_size: usize,
    /// `ulMaxKeySize`.
    pub max_key_size: usize,
    /// The functions its flags claim (`encrypt`, `decrypt`, `wrap`, `unwrap`, `generate`,
    /// `generate_key_pair`).
    pub functions: Vec<&'static str>,
}

/// The MAC the broker's internal keys use (audit checkpoints, the security domain).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MacSupport {
    /// The MAC mechanism.
    pub mechanism: &'static str,
    /// The key generation mechanism for its keys.
    pub keygen: &'static str,
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
    /// RFC 5649 support: the chosen candidate, if any passed.
    pub kwp: Option<KwpSupport>,
    /// Every RFC 5649 candidate and how it fared.
    pub kwp_candidates: Vec<KwpCandidate>,
    /// RFC 3394 (`CKM_AES_KEY_WRAP`) passed its known-answer test.
    pub aes_kw: bool,
    /// RSA-OAEP with SHA-256 works.
    pub oaep_sha256: bool,
    /// RSA-OAEP with SHA-1 works.
    pub oaep_sha1: bool,
    /// `CKM_EC_KEY_PAIR_GEN` listed.
    pub ec_keygen: bool,
    /// `CKM_ECDSA` on P-256 passed its known-answer test.
    pub ecdsa_p256: bool,
    /// `CKM_ECDSA` on P-384 passed its known-answer test.
    pub ecdsa_p384: bool,
    /// `CKM_RSA_PKCS` signatures (RS256) passed their known-answer test.
    pub rsa_pkcs_sign: bool,
    /// `CKM_RSA_PKCS_PSS` signatures (PS256) passed their known-answer test.
    pub rsa_pss_sign: bool,
    /// BYOK is safe here: the token enforces an import key's `CKA_UNWRAP_TEMPLATE` against a
    /// caller's own template ([`BYOK_TEMPLATE`]'s known-answer test).
    pub byok: bool,
    /// `C_GenerateRandom` works.
    pub rng: bool,
    /// `CKM_SHA256_HMAC` passed its known-answer test.
    pub hmac_sha256: bool,
    /// `CKM_GENERIC_SECRET_KEY_GEN` listed.
    pub generic_secret_keygen: bool,
    /// The MAC for the broker's internal keys, chosen by the probe (`None`: the token has none
    /// that works, and the broker cannot keep an audit trail on it).
    pub mac: Option<MacSupport>,
    /// The token accepts the KEK template's PKCS#11 2.40 attributes (`CKA_COPYABLE`,
    /// `CKA_DESTROYABLE`, `CKA_ALLOWED_MECHANISMS`). When false, keybroker's templates leave
    /// them out (and its read-back checks do not ask for them).
    pub key_attributes: bool,
    /// The flags and key sizes the token reports for the mechanisms keybroker uses.
    pub mechanism_info: Vec<MechanismFlags>,
    /// Why each failed check failed (for the log and `check-config`).
    pub notes: Vec<String>,
    /// Each known-answer test that failed, by what it tested (`CKM_AES_GCM`,
    /// `CKM_RSA_PKCS_OAEP/SHA-256`, ...): the capability report's `test` column.
    pub test_failures: std::collections::BTreeMap<String, String>,
}

impl Capabilities {
    /// The PKCS#11 mechanism that implements `alg` on this token, if it can.
    pub fn mechanism_for(&self, alg: Algorithm) -> Option<MechanismType> {
        match alg {
            Algorithm::Aes256Gcm if self.aes_gcm => Some(MechanismType::AES_GCM),
            Algorithm::AesKeyWrapPad => self.kwp.as_ref().map(|k| k.kind.mechanism_type()),
            Algorithm::AesKeyWrap if self.aes_kw => Some(MechanismType::AES_KEY_WRAP),
            Algorithm::RsaOaepSha256 if self.oaep_sha256 => Some(MechanismType::RSA_PKCS_OAEP),
            Algorithm::RsaOaepSha1 if self.oaep_sha1 => Some(MechanismType::RSA_PKCS_OAEP),
            Algorithm::RsaSign if self.rsa_pkcs_sign && self.rsa_pss_sign => {
                Some(MechanismType::RSA_PKCS)
            }
            Algorithm::Ecdsa if self.ecdsa_p256 || self.ecdsa_p384 => Some(MechanismType::ECDSA),
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
            Algorithm::AesKeyWrap if self.aes_kw => AES_KW.into(),
            Algorithm::RsaOaepSha256 if self.oaep_sha256 => {
                "CKM_RSA_PKCS_OAEP (CKM_SHA256, CKG_MGF1_SHA256)".into()
            }
            Algorithm::RsaOaepSha1 if self.oaep_sha1 => {
                "CKM_RSA_PKCS_OAEP (CKM_SHA_1, CKG_MGF1_SHA1)".into()
            }
            Algorithm::RsaSign if self.mechanism_for(alg).is_some() => {
                "CKM_RSA_PKCS (RS*), CKM_RSA_PKCS_PSS (PS*)".into()
            }
            Algorithm::Ecdsa if self.mechanism_for(alg).is_some() => "CKM_ECDSA".into(),
            _ => "unavailable".into(),
        }
    }

    /// Whether keys of `alg` can be created and used.
    pub fn supports(&self, alg: Algorithm) -> bool {
        self.keygen_for(alg).0 && self.mechanism_for(alg).is_some()
    }

    /// Whether the token lists the key generation mechanism of `alg`'s keys, and its name.
    pub fn keygen_for(&self, alg: Algorithm) -> (bool, &'static str) {
        match alg {
            Algorithm::Ecdsa => (self.ec_keygen, "CKM_EC_KEY_PAIR_GEN"),
            _ if alg.is_rsa() || alg == Algorithm::RsaSign => {
                (self.rsa_keygen, "CKM_RSA_PKCS_KEY_PAIR_GEN")
            }
            _ => (self.aes_keygen, "CKM_AES_KEY_GEN"),
        }
    }

    /// The default algorithm for RSA keys: SHA-256 OAEP where the token has it.
    pub fn default_rsa_algorithm(&self) -> Algorithm {
        if self.oaep_sha256 || !self.oaep_sha1 {
            Algorithm::RsaOaepSha256
        } else {
            Algorithm::RsaOaepSha1
        }
    }

    /// What to tell an operator when `alg` cannot be served: the mechanism(s) it needs and why
    /// the probe found them unusable.
    pub fn why_not(&self, alg: Algorithm) -> String {
        let keygen = self.keygen_for(alg);
        let mech = match alg {
            Algorithm::Aes256Gcm => "CKM_AES_GCM",
            Algorithm::AesKeyWrapPad => {
                "an RFC 5649 mechanism (CKM_AES_KEY_WRAP_KWP or CKM_AES_KEY_WRAP_PAD)"
            }
            Algorithm::AesKeyWrap => "CKM_AES_KEY_WRAP (RFC 3394)",
            Algorithm::RsaOaepSha256 => "CKM_RSA_PKCS_OAEP with SHA-256",
            Algorithm::RsaOaepSha1 => "CKM_RSA_PKCS_OAEP with SHA-1",
            Algorithm::RsaSign => "CKM_RSA_PKCS and CKM_RSA_PKCS_PSS signatures",
            Algorithm::Ecdsa => "CKM_ECDSA on P-256 or P-384",
        };
        let mut why = if self.mechanism_for(alg).is_none() {
            format!(
                "{alg} needs {mech}, which this token lacks or which failed its known-answer test"
            )
        } else if !keygen.0 {
            format!("{alg} needs {}, which this token does not list", keygen.1)
        } else {
            return format!("{alg} is served by {}", self.mechanism_name(alg));
        };
        let related: Vec<&str> = self
            .notes
            .iter()
            .map(String::as_str)
            .filter(|n| {
                let n = n.to_ascii_lowercase();
                match alg {
                    Algorithm::Aes256Gcm => n.contains("gcm"),
                    // Every note about RFC 3394 names it; the RFC 5649 ones never do.
                    Algorithm::AesKeyWrapPad => {
                        (n.contains("5649") || n.contains("key_wrap")) && !n.contains("3394")
                    }
                    Algorithm::AesKeyWrap => n.contains("3394"),
                    Algorithm::RsaSign => n.contains("rsa_pkcs ") || n.contains("pss"),
                    Algorithm::Ecdsa => n.contains("ecdsa") || n.contains("ec_key"),
                    _ => n.contains("oaep"),
                }
            })
            .collect();
        if !related.is_empty() {
            why.push_str(&format!(" ({})", related.join("; ")));
        }
        why
    }

    /// Whether keys of `key_type` fit the key sizes the token reports for their generation
    /// mechanism (`Err` says why not). A token that reports no sizes (0..0) is not held to them.
    pub fn key_type_fits(&self, key_type: KeyType) -> Result<(), String> {
        if let Some(curve) = key_type.curve() {
            let (ok, test) = match curve {
                crate::model::Curve::P256 => (self.ecdsa_p256, ECDSA_P256),
                crate::model::Curve::P384 => (self.ecdsa_p384, ECDSA_P384),
            };
            if ok {
                return Ok(());
            }
            return Err(format!(
                "{} keys need CKM_ECDSA on {}, which {}",
                key_type.as_str(),
                curve.jwk_name(),
                match self.test_failures.get(test) {
                    Some(why) => format!("failed its known-answer test: {why}"),
                    None => "this token does not list".to_string(),
                }
            ));
        }
        let (mech, sizes): (&str, &[usize]) = match key_type.rsa_bits() {
            // PKCS#11 gives RSA sizes in bits.
            Some(bits) => ("CKM_RSA_PKCS_KEY_PAIR_GEN", &[bits as usize][..]),
            // AES sizes are in bytes by the standard; some tokens report bits.
            None => ("CKM_AES_KEY_GEN", &[32, 256][..]),
        };
        let Some(info) = self.mechanism_info.iter().find(|m| m.name == mech) else {
            return Ok(());
        };
        if info.max_key_size == 0
            || sizes
                .iter()
                .any(|s| (info.min_key_size..=info.max_key_size).contains(s))
        {
            return Ok(());
        }
        Err(format!(
            "{} keys need {mech} with a {} key, but the token reports key sizes {}..{}",
            key_type.as_str(),
            if key_type.is_rsa() {
                format!("{}-bit", sizes[0])
            } else {
                "32-byte".to_string()
            },
            info.min_key_size,
            info.max_key_size
        ))
    }
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

// RFC 3394 §4.6: 256 bits of key data wrapped with a 256-bit KEK.
pub(crate) const KW_KEK: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
pub(crate) const KW_KEY: &str = "00112233445566778899aabbccddeeff000102030405060708090a0b0c0d0e0f";
pub(crate) const KW_WRAPPED: &str =
    "28c9f404c4b810f4cbccb35cfb87f8263f5786e2d80ed326cbc7f0e71a99f43bfb988b9b7a02dd21";

/// The capability report's name for RFC 3394 (the mechanism itself) and its test.
pub const AES_KW: &str = "CKM_AES_KEY_WRAP";

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

/// Runs the probe on a logged-in session. `profile` orders the RFC 5649 candidates and adds
/// explanations; it never overrules a test.
pub fn probe(
    ctx: &Pkcs11,
    slot: Slot,
    session: &Session,
    profile: &Profile,
) -> Result<Capabilities, HsmError> {
    let list = ctx
        .get_mechanism_list(slot)
        .map_err(|e| HsmError::from_ck("list the token's mechanisms", e))?;
    let mut caps = Capabilities {
        mechanisms: list.iter().map(|m| m.to_string()).collect(),
        aes_keygen: list.contains(&MechanismType::AES_KEY_GEN),
        rsa_keygen: list.contains(&MechanismType::RSA_PKCS_KEY_PAIR_GEN),
        aes_gcm: false,
        kwp: None,
        kwp_candidates: Vec::new(),
        aes_kw: false,
        oaep_sha256: false,
        oaep_sha1: false,
        ec_keygen: list.contains(&MechanismType::ECC_KEY_PAIR_GEN),
        ecdsa_p256: false,
        ecdsa_p384: false,
        rsa_pkcs_sign: false,
        rsa_pss_sign: false,
        byok: false,
        rng: false,
        hmac_sha256: false,
        generic_secret_keygen: list.contains(&MechanismType::GENERIC_SECRET_KEY_GEN),
        mac: None,
        key_attributes: false,
        mechanism_info: Vec::new(),
        notes: Vec::new(),
        test_failures: Default::default(),
    };
    mechanism_flags(ctx, slot, &list, &mut caps);
    match key_attributes_probe(session) {
        Ok(()) => caps.key_attributes = true,
        Err(why) => {
            caps.test_failures
                .insert(KEY_ATTRIBUTES.into(), why.clone());
            caps.notes.push(format!(
                "the token refuses the KEK template's PKCS#11 2.40 attributes (CKA_COPYABLE, \
             CKA_DESTROYABLE, CKA_ALLOWED_MECHANISMS): {why}; it can neither stop a copy of a \
             key with more roles nor limit a key to one mechanism"
            ));
        }
    }
    if list.contains(&MechanismType::SHA256_HMAC) {
        match hmac_kat(session) {
            Ok(()) => caps.hmac_sha256 = true,
            Err(why) => {
                caps.notes.push(format!(
                    "CKM_SHA256_HMAC failed its known-answer test: {why}"
                ));
                caps.test_failures.insert("CKM_SHA256_HMAC".into(), why);
            }
        }
    } else {
        caps.notes
            .push("CKM_SHA256_HMAC is not in the token's mechanism list".into());
    }
    if !caps.generic_secret_keygen {
        caps.notes.push(
            "CKM_GENERIC_SECRET_KEY_GEN is not in the token's mechanism list (the audit key is \
             generated with it)"
                .into(),
        );
    }
    if caps.hmac_sha256 && caps.generic_secret_keygen {
        caps.mac = Some(MacSupport {
            mechanism: "CKM_SHA256_HMAC",
            keygen: "CKM_GENERIC_SECRET_KEY_GEN",
        });
    }
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
            Err(why) => {
                caps.notes
                    .push(format!("CKM_AES_GCM failed its known-answer test: {why}"));
                caps.test_failures.insert("CKM_AES_GCM".into(), why.clone());
                if profile.gcm_iv != super::profile::GcmIv::Caller {
                    caps.notes.push(format!(
                        "the {} profile says this HSM generates AES-GCM IVs itself ({:?}); \
                         keybroker's envelope format 1 needs caller-chosen IVs",
                        profile.name, profile.gcm_iv
                    ));
                }
            }
        }
    } else {
        caps.notes
            .push("CKM_AES_GCM is not in the token's mechanism list".into());
    }
    probe_kwp(session, &list, profile, &mut caps);
    if list.contains(&MechanismType::AES_KEY_WRAP) {
        match kw_kat(session) {
            Ok(()) => caps.aes_kw = true,
            Err(why) => {
                caps.notes.push(format!(
                    "{AES_KW} failed its RFC 3394 known-answer test: {why}; aes-kw keys cannot be used"
                ));
                caps.test_failures.insert(AES_KW.into(), why);
            }
        }
    } else {
        caps.notes.push(format!(
            "{AES_KW} (RFC 3394) is not in the token's mechanism list; aes-kw keys cannot be used"
        ));
    }
    if list.contains(&MechanismType::RSA_PKCS_OAEP) {
        match oaep_probe(session) {
            Ok((s256, s1, why)) => {
                caps.oaep_sha256 = s256;
                caps.oaep_sha1 = s1;
                if !s256 {
                    caps.test_failures.insert(OAEP_SHA256.into(), why.0.clone());
                }
                if !s1 {
                    caps.test_failures.insert(OAEP_SHA1.into(), why.1.clone());
                }
                if !s256 {
                    caps.notes.push(format!(
                        "RSA-OAEP with SHA-256 failed ({}); RSA keys default to SHA-1 OAEP",
                        why.0
                    ));
                }
                if !s1 {
                    caps.notes
                        .push(format!("RSA-OAEP with SHA-1 failed ({})", why.1));
                }
            }
            Err(why) => {
                caps.test_failures.insert(OAEP_SHA256.into(), why.clone());
                caps.test_failures.insert(OAEP_SHA1.into(), why.clone());
                caps.notes.push(format!("RSA-OAEP probe failed: {why}"));
            }
        }
    } else {
        caps.notes
            .push("CKM_RSA_PKCS_OAEP is not in the token's mechanism list".into());
    }
    if !caps.rsa_keygen {
        caps.notes
            .push("CKM_RSA_PKCS_KEY_PAIR_GEN is not in the token's mechanism list".into());
    }
    probe_signatures(session, &list, &mut caps);
    let oaep = if caps.oaep_sha256 {
        Some(Algorithm::RsaOaepSha256)
    } else if caps.oaep_sha1 {
        Some(Algorithm::RsaOaepSha1)
    } else {
        None
    };
    let byok = match oaep {
        Some(oaep) => byok_kat(
            session,
            &super::ops::oaep_mechanism(oaep),
            caps.key_attributes,
            caps.aes_gcm,
        ),
        None => Err("not run: BYOK needs RSA-OAEP".into()),
    };
    match byok {
        Ok(()) => caps.byok = true,
        Err(why) => {
            caps.notes.push(format!(
                "BYOK import is refused on this token: {why} (the holder of the user PIN could \
                 read imported key material)"
            ));
            caps.test_failures.insert(BYOK_TEMPLATE.into(), why);
        }
    }
    Ok(caps)
}

/// Reads `C_GetMechanismInfo` for the mechanisms keybroker uses and notes any that does not
/// claim a function keybroker needs from it. Only informative: the known-answer tests decide
/// (SoftHSM2, for one, claims wrap for GCM and refuses it).
fn mechanism_flags(ctx: &Pkcs11, slot: Slot, list: &[MechanismType], caps: &mut Capabilities) {
    let wanted: [(MechanismType, &[&'static str]); 11] = [
        (MechanismType::AES_KEY_GEN, &["generate"]),
        (MechanismType::AES_GCM, &["encrypt", "decrypt"]),
        (MechanismType::AES_KEY_WRAP_KWP, &["wrap", "unwrap"]),
        (MechanismType::AES_KEY_WRAP_PAD, &["wrap", "unwrap"]),
        (MechanismType::AES_KEY_WRAP, &["wrap", "unwrap"]),
        (MechanismType::RSA_PKCS_KEY_PAIR_GEN, &["generate_key_pair"]),
        (MechanismType::RSA_PKCS_OAEP, &["encrypt", "decrypt"]),
        (MechanismType::RSA_PKCS, &["sign", "verify"]),
        (MechanismType::RSA_PKCS_PSS, &["sign", "verify"]),
        (MechanismType::ECC_KEY_PAIR_GEN, &["generate_key_pair"]),
        (MechanismType::ECDSA, &["sign", "verify"]),
    ];
    for (m, needs) in wanted {
        if !list.contains(&m) {
            continue;
        }
        let info = match ctx.get_mechanism_info(slot, m) {
            Ok(i) => i,
            Err(e) => {
                caps.notes.push(format!(
                    "C_GetMechanismInfo({m}) failed: {}",
                    HsmError::from_ck("mechanism info", e).detail
                ));
                continue;
            }
        };
        let functions: Vec<&'static str> = [
            ("encrypt", info.encrypt()),
            ("decrypt", info.decrypt()),
            ("wrap", info.wrap()),
            ("unwrap", info.unwrap()), // ok: MechanismInfo::unwrap is the CKF_UNWRAP flag, not Option::unwrap
            ("generate", info.generate()),
            ("generate_key_pair", info.generate_key_pair()),
            ("sign", info.sign()),
            ("verify", info.verify()),
        ]
        .into_iter()
        .filter_map(|(n, on)| on.then_some(n))
        .collect();
        let missing: Vec<&str> = needs
            .iter()
            .copied()
            .filter(|n| !functions.contains(n))
            .collect();
        if !missing.is_empty() {
            caps.notes.push(format!(
                "{m}: the token's flags do not claim {} (the known-answer tests decide)",
                missing.join(", ")
            ));
        }
        caps.mechanism_info.push(MechanismFlags {
            name: m.to_string(),
            min_key_size: info.min_key_size(),
            max_key_size: info.max_key_size(),
            functions,
        });
    }
}

/// Tries every listed RFC 5649 candidate and picks one (see the module docs).
fn probe_kwp(
    session: &Session,
    list: &[MechanismType],
    profile: &Profile,
    caps: &mut Capabilities,
) {
    // The profile's preferred mechanisms first, then the rest.
    let mut order: Vec<KwpMechanism> = profile.kwp.to_vec();
    order.extend(
        KwpMechanism::ALL
            .iter()
            .filter(|k| !profile.kwp.contains(k)),
    );
    for k in order {
        let mut c = KwpCandidate {
            mechanism: k.number(),
            name: k.name(),
            listed: list.contains(&k.mechanism_type()),
            aligned: false,
            full_rfc5649: false,
            error: None,
        };
        if c.listed {
            match kwp_kat(session, &k.mechanism()) {
                Ok(full) => {
                    c.aligned = true;
                    c.full_rfc5649 = full;
                }
                Err(why) => c.error = Some(why),
            }
        }
        caps.kwp_candidates.push(c);
    }
    let pick = |full: bool| {
        caps.kwp_candidates
            .iter()
            .find(|c| c.aligned && (c.full_rfc5649 || !full))
            .cloned()
    };
    let chosen = pick(true).or_else(|| pick(false));
    for c in &caps.kwp_candidates {
        if let Some(e) = &c.error {
            caps.notes.push(format!(
                "{} ({:#x}) failed its RFC 5649 known-answer test: {e}",
                c.name, c.mechanism
            ));
        }
    }
    let Some(c) = chosen else {
        caps.notes.push(
            "no RFC 5649 mechanism passed its known-answer test (CKM_AES_KEY_WRAP_KWP 0x210B or \
             CKM_AES_KEY_WRAP_PAD 0x210A); AES key wrap (AES_KEY_WRAP_PAD) keys cannot be used"
                .into(),
        );
        return;
    };
    let kind = if c.mechanism == KwpMechanism::Kwp.number() {
        KwpMechanism::Kwp
    } else {
        KwpMechanism::Pad
    };
    if !c.full_rfc5649 {
        caps.notes.push(format!(
            "{} matches RFC 5649 only for inputs that are multiples of 8 bytes (it zero-pads \
             first); keybroker's DEKs always are",
            c.name
        ));
    }
    if !profile.kwp.is_empty() && !profile.kwp.contains(&kind) {
        caps.notes.push(format!(
            "the {} profile expects RFC 5649 as {}, but the known-answer tests chose {}",
            profile.name,
            profile
                .kwp
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(" or "),
            c.name
        ));
    }
    caps.kwp = Some(KwpSupport {
        mechanism: c.mechanism,
        name: c.name,
        full_rfc5649: c.full_rfc5649,
        kind,
    });
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

/// The capability report's name for the BYOK known-answer test.
pub const BYOK_TEMPLATE: &str = "CKA_UNWRAP_TEMPLATE (BYOK import keys)";

/// BYOK's known-answer test: an RSA key (the fixed test key, session objects) carrying an
/// import key's `CKA_UNWRAP_TEMPLATE` (an AES-256-GCM KEK's, [`template::byok_forced`]) gets
/// key material wrapped for it with RSA-OAEP, as a customer's blob. The token passes when a
/// caller's own template — not sensitive and extractable, or the forced attributes left out —
/// never gives a key whose value can be read or that is not sensitive and non-extractable,
/// while the broker's KEK template works and (with AES-GCM) gives the material. A token that
/// lets the material out fails: BYOK is then refused there.
fn byok_kat(
    session: &Session,
    oaep: &Mechanism,
    key_attributes: bool,
    gcm: bool,
) -> Result<(), String> {
    const MATERIAL: [u8; 32] = [0xc3; 32];
    let forced = template::byok_forced(
        Algorithm::Aes256Gcm,
        MechanismType::AES_GCM,
        false,
        key_attributes,
    );
    let (public, private) = rsa_test_pair(
        session,
        &[Attribute::Encrypt(true)],
        &[
            Attribute::Extractable(false),
            Attribute::Unwrap(true),
            Attribute::Decrypt(false),
            Attribute::UnwrapTemplate(AttributeArray::new(forced.clone())),
        ],
    )
    .map_err(|e| format!("an RSA key with CKA_UNWRAP_TEMPLATE: {e}"))?;
    // The customer's side: the material under RSA-OAEP.
    let blob = session
        .encrypt(oaep, public.handle, &MATERIAL)
        .map_err(|e| HsmError::from_ck("C_Encrypt", e).detail)?;
    // What a caller may ask for, and must not get.
    let loose = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(CkKeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ];
    let bare = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(CkKeyType::AES),
        Attribute::Token(false),
    ];
    for (how, t) in [
        ("a loose template", &loose[..]),
        ("a bare template", &bare[..]),
    ] {
        let Ok(h) = session.unwrap_key(oaep, private.handle, &blob, t) else {
            continue;
        };
        let h = Temp { session, handle: h };
        let attrs = session
            .get_attributes(
                h.handle,
                &[AttributeType::Sensitive, AttributeType::Extractable],
            )
            .unwrap_or_default();
        let readable = matches!(
            session.get_attributes(h.handle, &[AttributeType::Value]).as_deref(),
            Ok([Attribute::Value(v)]) if !v.is_empty()
        );
        if readable
            || !attrs.contains(&Attribute::Sensitive(true))
            || !attrs.contains(&Attribute::Extractable(false))
        {
            return Err(format!(
                "the key material unwrapped under {how} into a key that is not sensitive and \
                 non-extractable (CKA_UNWRAP_TEMPLATE not enforced)"
            ));
        }
    }
    // The broker's own template (a session object here).
    let mut kek = forced;
    kek.retain(|a| a.attribute_type() != AttributeType::Modifiable);
    kek.extend([Attribute::Token(false), Attribute::Modifiable(false)]);
    let imported = session
        .unwrap_key(oaep, private.handle, &blob, &kek)
        .map_err(|e| {
            format!(
                "unwrapping the key material with the KEK template: {}",
                HsmError::from_ck("C_UnwrapKey", e).detail
            )
        })?;
    let imported = Temp {
        session,
        handle: imported,
    };
    if gcm {
        let reference = session_aes_key(session, &MATERIAL, &[Attribute::Encrypt(true)])?;
        let seal = |k: ObjectHandle| -> Result<Vec<u8>, String> {
            let mut iv = GCM_IV;
            let params = GcmParams::new(&mut iv, &[], 128.into()).map_err(|e| e.to_string())?;
            session
                .encrypt(&Mechanism::AesGcm(params), k, &GCM_AAD)
                .map_err(|e| HsmError::from_ck("C_Encrypt", e).detail)
        };
        if seal(imported.handle)? != seal(reference.handle)? {
            return Err("the imported key is not the key material".into());
        }
    }
    Ok(())
}

/// The report's names for the signature known-answer tests.
pub const RSA_PKCS_SIGN: &str = "CKM_RSA_PKCS/RS256";
/// See [`RSA_PKCS_SIGN`].
pub const RSA_PSS_SIGN: &str = "CKM_RSA_PKCS_PSS/PS256";
/// See [`RSA_PKCS_SIGN`].
pub const ECDSA_P256: &str = "CKM_ECDSA/P-256";
/// See [`RSA_PKCS_SIGN`].
pub const ECDSA_P384: &str = "CKM_ECDSA/P-384";

/// Runs the signature known-answer tests (`kat_sign`) for the listed mechanisms and records
/// the results, and why each failure failed.
fn probe_signatures(session: &Session, list: &[MechanismType], caps: &mut Capabilities) {
    use crate::model::SignAlgorithm as S;
    let mut record = |name: &str, mech: MechanismType, r: Result<(), String>| -> bool {
        let r = if list.contains(&mech) {
            r
        } else {
            Err(format!("{mech} is not in the token's mechanism list"))
        };
        match r {
            Ok(()) => true,
            Err(why) => {
                caps.notes.push(format!(
                    "{name} failed its known-answer test ({why}); keys that need it cannot be created"
                ));
                caps.test_failures.insert(name.into(), why);
                false
            }
        }
    };
    let rsa = |alg: S| -> Result<(), String> {
        let (public, private) = rsa_test_pair(
            session,
            &[Attribute::Verify(true)],
            &[Attribute::Sign(true)],
        )?;
        let (reference, digest) = match alg {
            S::Rs256 => (kat_sign::RS256, kat_sign::DIGEST256),
            _ => (kat_sign::PS256, kat_sign::DIGEST256),
        };
        sign_kat(
            session,
            &public,
            &private,
            alg,
            &unhex(digest),
            &unhex(reference),
            alg == S::Rs256,
        )
    };
    let ec = |alg: S| -> Result<(), String> {
        let (curve, d, point, sig, digest) = match alg {
            S::Es256 => (
                crate::model::Curve::P256,
                kat_sign::P256_D,
                kat_sign::P256_POINT,
                kat_sign::P256_SIG,
                kat_sign::DIGEST256,
            ),
            _ => (
                crate::model::Curve::P384,
                kat_sign::P384_D,
                kat_sign::P384_POINT,
                kat_sign::P384_SIG,
                kat_sign::DIGEST384,
            ),
        };
        let params = template::ec_params(curve);
        // CKA_EC_POINT is a DER OCTET STRING around the point (both points are < 128 bytes).
        let raw = unhex(point);
        let mut ec_point = vec![0x04, raw.len() as u8];
        ec_point.extend_from_slice(&raw);
        let public = session
            .create_object(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(CkKeyType::EC),
                Attribute::Token(false),
                Attribute::Verify(true),
                Attribute::EcParams(params.clone()),
                Attribute::EcPoint(ec_point),
            ])
            .map_err(|e| HsmError::from_ck("import the probe's EC public key", e).detail)?;
        let public = Temp {
            session,
            handle: public,
        };
        let private = session
            .create_object(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(CkKeyType::EC),
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Sign(true),
                Attribute::EcParams(params),
                Attribute::Value(unhex(d)),
            ])
            .map_err(|e| HsmError::from_ck("import the probe's EC private key", e).detail)?;
        let private = Temp {
            session,
            handle: private,
        };
        sign_kat(
            session,
            &public,
            &private,
            alg,
            &unhex(digest),
            &unhex(sig),
            false,
        )
    };
    let pkcs = record(RSA_PKCS_SIGN, MechanismType::RSA_PKCS, rsa(S::Rs256));
    let pss = record(RSA_PSS_SIGN, MechanismType::RSA_PKCS_PSS, rsa(S::Ps256));
    let p256 = record(ECDSA_P256, MechanismType::ECDSA, ec(S::Es256));
    let p384 = record(ECDSA_P384, MechanismType::ECDSA, ec(S::Es384));
    caps.rsa_pkcs_sign = pkcs;
    caps.rsa_pss_sign = pss;
    caps.ecdsa_p256 = p256;
    caps.ecdsa_p384 = p384;
    if !caps.ec_keygen {
        caps.notes.push(
            "CKM_EC_KEY_PAIR_GEN is not in the token's mechanism list: EC keys cannot be created"
                .into(),
        );
    }
}

/// The fixed RSA test key pair (`kat_rsa`) as session objects, the public half with
/// `public_roles` (e.g. `CKA_VERIFY`) and the private half with `private_roles` (`CKA_SIGN`;
/// private and sensitive always).
fn rsa_test_pair<'a>(
    session: &'a Session,
    public_roles: &[Attribute],
    private_roles: &[Attribute],
) -> Result<(Temp<'a>, Temp<'a>), String> {
    let n = unhex(kat_rsa::N);
    let e = unhex(kat_rsa::E);
    let mut template = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(CkKeyType::RSA),
        Attribute::Token(false),
    ];
    template.extend_from_slice(public_roles);
    template.extend([
        Attribute::Modulus(n.clone()),
        Attribute::PublicExponent(e.clone()),
    ]);
    let public = session
        .create_object(&template)
        .map_err(|e| HsmError::from_ck("import the probe's RSA public key", e).detail)?;
    let public = Temp {
        session,
        handle: public,
    };
    let mut template = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(CkKeyType::RSA),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
    ];
    template.extend_from_slice(private_roles);
    template.extend([
        Attribute::Modulus(n),
        Attribute::PublicExponent(e),
        Attribute::PrivateExponent(unhex(kat_rsa::D)),
        Attribute::Prime1(unhex(kat_rsa::P)),
        Attribute::Prime2(unhex(kat_rsa::Q)),
        Attribute::Exponent1(unhex(kat_rsa::DP)),
        Attribute::Exponent2(unhex(kat_rsa::DQ)),
        Attribute::Coefficient(unhex(kat_rsa::QINV)),
    ]);
    let private = session
        .create_object(&template)
        .map_err(|e| HsmError::from_ck("import the probe's RSA private key", e).detail)?;
    let private = Temp {
        session,
        handle: private,
    };
    Ok((public, private))
}

/// One signature known-answer test: the token verifies `reference` (an independent
/// implementation's signature of `digest`), refuses it altered, and verifies its own signature
/// (equal to `reference` when the scheme is `deterministic`).
fn sign_kat(
    session: &Session,
    public: &Temp<'_>,
    private: &Temp<'_>,
    alg: crate::model::SignAlgorithm,
    digest: &[u8],
    reference: &[u8],
    deterministic: bool,
) -> Result<(), String> {
    use super::sign;
    let verify = |sig: &[u8]| {
        sign::verify_raw(session, public.handle, alg, digest, sig)
            .map_err(|e| format!("C_Verify: {}", e.detail))
    };
    if !verify(reference)? {
        return Err(format!(
            "the token does not verify a reference {alg} signature"
        ));
    }
    let mut bad = reference.to_vec();
    if let Some(b) = bad.last_mut() {
        *b ^= 1;
    }
    if verify(&bad)? {
        return Err(format!("the token accepts an altered {alg} signature"));
    }
    let own = sign::sign_raw(session, private.handle, alg, digest)
        .map_err(|e| format!("C_Sign: {}", e.detail))?;
    if deterministic && own != reference {
        return Err(format!(
            "the token's {alg} signature differs from the reference"
        ));
    }
    if !verify(&own)? {
        return Err(format!("the token does not verify its own {alg} signature"));
    }
    Ok(())
}

/// The capability report's name for the KEK template's PKCS#11 2.40 attributes.
pub const KEY_ATTRIBUTES: &str = "CKA_COPYABLE, CKA_DESTROYABLE, CKA_ALLOWED_MECHANISMS";
/// The report's names for the two OAEP tests.
pub const OAEP_SHA256: &str = "CKM_RSA_PKCS_OAEP/SHA-256";
/// See [`OAEP_SHA256`].
pub const OAEP_SHA1: &str = "CKM_RSA_PKCS_OAEP/SHA-1";

// RFC 4231 §4.7, test case 6: a 131-byte key (SoftHSM2 refuses HMAC-SHA256 keys shorter than
// the 32-byte digest, so test case 1's 20-byte key cannot be used).
const HMAC_KEY: [u8; 131] = [0xaa; 131];
const HMAC_DATA: &[u8] = b"Test Using Larger Than Block-Size Key - Hash Key First";
pub(crate) const HMAC_SHA256: &str =
    "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54";

fn hmac_kat(session: &Session) -> Result<(), String> {
    let key = session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(CkKeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::Sign(true),
            Attribute::Verify(true),
            Attribute::Value(HMAC_KEY.to_vec()),
        ])
        .map_err(|e| HsmError::from_ck("create a probe HMAC key", e).detail)?;
    let key = Temp {
        session,
        handle: key,
    };
    let mac = session
        .sign(&Mechanism::Sha256Hmac, key.handle, HMAC_DATA)
        .map_err(|e| HsmError::from_ck("C_Sign", e).detail)?;
    if mac != unhex(HMAC_SHA256) {
        return Err("the MAC does not match RFC 4231's".into());
    }
    session
        .verify(&Mechanism::Sha256Hmac, key.handle, HMAC_DATA, &mac)
        .map_err(|e| HsmError::from_ck("C_Verify", e).detail)?;
    let mut bad = mac;
    bad[0] ^= 1;
    if session
        .verify(&Mechanism::Sha256Hmac, key.handle, HMAC_DATA, &bad)
        .is_ok()
    {
        return Err("a wrong MAC was accepted".into());
    }
    Ok(())
}

/// Makes a session object with the PKCS#11 2.40 attributes of the KEK template.
/// The label of the token object [`key_attributes_probe`] creates and destroys at once (one
/// left behind by a crash is destroyed by the next probe).
const ATTRIBUTES_PROBE_LABEL: &str = "kb-probe:key-attributes";

/// Whether the token keeps the PKCS#11 2.40 attributes on a session object *and* on a token
/// object (KEKs are token objects): NSS's softoken accepts them on a session object but its
/// database cannot store CKA_COPYABLE (C_GenerateKey/C_CreateObject of a token object answer
/// CKR_GENERAL_ERROR, measured on NSS 3.87).
fn key_attributes_probe(session: &Session) -> Result<(), String> {
    let template = |token: bool| {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(CkKeyType::GENERIC_SECRET),
            Attribute::Token(token),
            Attribute::Private(token),
            Attribute::Sensitive(token),
            Attribute::Sign(true),
            Attribute::Value(HMAC_KEY.to_vec()),
            Attribute::Copyable(false),
            Attribute::Destroyable(true),
            Attribute::AllowedMechanisms(vec![MechanismType::SHA256_HMAC]),
            Attribute::Label(ATTRIBUTES_PROBE_LABEL.as_bytes().to_vec()),
        ]
    };
    let h = session
        .create_object(&template(false))
        .map_err(|e| HsmError::from_ck("C_CreateObject", e).detail)?;
    drop(Temp { session, handle: h });
    let leftovers = session
        .find_objects(&[
            Attribute::Token(true),
            Attribute::Label(ATTRIBUTES_PROBE_LABEL.as_bytes().to_vec()),
        ])
        .map_err(|e| HsmError::from_ck("C_FindObjects", e).detail)?;
    for h in leftovers {
        drop(Temp { session, handle: h });
    }
    let h = session
        .create_object(&template(true))
        .map_err(|e| HsmError::from_ck("C_CreateObject (token object)", e).detail)?;
    drop(Temp { session, handle: h });
    Ok(())
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

/// Wraps `value`, as a short-lived generic-secret session object, under `kek` with `mech`.
fn kat_wrap(
    session: &Session,
    mech: &Mechanism,
    kek: ObjectHandle,
    value: &[u8],
) -> Result<Vec<u8>, String> {
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
        .wrap_key(mech, kek, target.handle)
        .map_err(|e| HsmError::from_ck("C_WrapKey", e).detail)
}

/// An AES key wrap's required known-answer test: `key` wraps to exactly `wrapped` under
/// `kek`, and unwraps back. Returns the output (test-vector bytes only).
fn kat_wrap_round_trip(
    session: &Session,
    mech: &Mechanism,
    kek: ObjectHandle,
    (key, wrapped): (&str, &str),
    rfc: &str,
) -> Result<Vec<u8>, String> {
    let key = unhex(key);
    let got = kat_wrap(session, mech, kek, &key)?;
    if got != unhex(wrapped) {
        // Test-vector bytes only: safe to show.
        return Err(format!(
            "wrapping a {}-byte key does not match {rfc} (got {})",
            key.len(),
            hex::encode(&got)
        ));
    }
    let unwrapped = super::ops::unwrap_generic(session, mech, kek, &got).map_err(|e| e.detail)?;
    if unwrapped.expose() != key.as_slice() {
        return Err(format!(
            "unwrapping does not give the {}-byte key back",
            key.len()
        ));
    }
    Ok(got)
}

/// Returns whether the mechanism also passes the RFC's unaligned vector.
fn kwp_kat(session: &Session, mech: &Mechanism) -> Result<bool, String> {
    let kek = session_aes_key(
        session,
        &unhex(KWP_KEK),
        &[Attribute::Wrap(true), Attribute::Unwrap(true)],
    )?;
    kat_wrap_round_trip(
        session,
        mech,
        kek.handle,
        (KWP_ALIGNED_KEY, KWP_ALIGNED_WRAPPED),
        "RFC 5649",
    )?;
    let full = matches!(
        kat_wrap(session, mech, kek.handle, &unhex(KWP_RFC_KEY)),
        Ok(w) if w == unhex(KWP_RFC_WRAPPED)
    );
    Ok(full)
}

/// RFC 3394 (`CKM_AES_KEY_WRAP`): the RFC's vector, and its integrity check must refuse the
/// output with one byte flipped (else a wrong KEK version would "unwrap" to garbage).
fn kw_kat(session: &Session) -> Result<(), String> {
    let kek = session_aes_key(
        session,
        &unhex(KW_KEK),
        &[Attribute::Wrap(true), Attribute::Unwrap(true)],
    )?;
    let mech = Mechanism::AesKeyWrap;
    let mut wrapped =
        kat_wrap_round_trip(session, &mech, kek.handle, (KW_KEY, KW_WRAPPED), "RFC 3394")?;
    wrapped[0] ^= 1;
    if super::ops::unwrap_generic(session, &mech, kek.handle, &wrapped).is_ok() {
        return Err("an altered wrapped key passed the integrity check".into());
    }
    Ok(())
}

/// Imports the fixed test key pair as session objects, then per hash: the token must decrypt
/// OpenSSL's ciphertext to the known message and round-trip its own encryption. Returns
/// (SHA-256 ok, SHA-1 ok, (why SHA-256 failed, why SHA-1 failed)).
fn oaep_probe(session: &Session) -> Result<(bool, bool, (String, String)), String> {
    let (public, private) = rsa_test_pair(
        session,
        &[Attribute::Encrypt(true)],
        &[Attribute::Decrypt(true)],
    )?;
    let check = |hash: MechanismType, mgf: PkcsMgfType, ct: &str| -> Result<(), String> {
        let m = Mechanism::RsaPkcsOaep(PkcsOaepParams::new(hash, mgf, PkcsOaepSource::empty()));
        let pt = session
            .decrypt(&m, private.handle, &unhex(ct))
            .map_err(|e| {
                format!(
                    "decrypting OpenSSL's ciphertext: {}",
                    HsmError::from_ck("C_Decrypt", e).detail
                )
            })?;
        if pt != kat_rsa::OAEP_MESSAGE {
            return Err("decrypting OpenSSL's ciphertext gave the wrong message".into());
        }
        let ct = session
            .encrypt(&m, public.handle, kat_rsa::OAEP_MESSAGE)
            .map_err(|e| format!("encrypting: {}", HsmError::from_ck("C_Encrypt", e).detail))?;
        match session.decrypt(&m, private.handle, &ct) {
            Ok(pt) if pt == kat_rsa::OAEP_MESSAGE => Ok(()),
            Ok(_) => Err("its own ciphertext decrypts to the wrong message".into()),
            Err(e) => Err(format!(
                "decrypting its own ciphertext: {}",
                HsmError::from_ck("C_Decrypt", e).detail
            )),
        }
    };
    let s256 = check(
        MechanismType::SHA256,
        PkcsMgfType::MGF1_SHA256,
        kat_rsa::CT256,
    );
    let s1 = check(MechanismType::SHA1, PkcsMgfType::MGF1_SHA1, kat_rsa::CT1);
    Ok((
        s256.is_ok(),
        s1.is_ok(),
        (s256.err().unwrap_or_default(), s1.err().unwrap_or_default()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps_with(info: Vec<MechanismFlags>) -> Capabilities {
        Capabilities {
            mechanisms: Vec::new(),
            aes_keygen: true,
            rsa_keygen: true,
            aes_gcm: true,
            kwp: None,
            kwp_candidates: Vec::new(),
            aes_kw: true,
            oaep_sha256: true,
            oaep_sha1: true,
            ec_keygen: true,
            ecdsa_p256: true,
            ecdsa_p384: true,
            rsa_pkcs_sign: true,
            rsa_pss_sign: true,
            byok: false,
            rng: true,
            hmac_sha256: true,
            generic_secret_keygen: true,
            mac: Some(MacSupport {
                mechanism: "CKM_SHA256_HMAC",
                keygen: "CKM_GENERIC_SECRET_KEY_GEN",
            }),
            key_attributes: true,
            mechanism_info: info,
            notes: Vec::new(),
            test_failures: Default::default(),
        }
    }

    fn flags(name: &str, min: usize, max: usize) -> MechanismFlags {
        MechanismFlags {
            name: name.into(),
            min_key_size: min,
            max_key_size: max,
            functions: Vec::new(),
        }
    }

    #[test]
    fn key_sizes_the_token_cannot_generate_are_refused_by_name() {
        let c = caps_with(vec![
            flags("CKM_RSA_PKCS_KEY_PAIR_GEN", 1024, 3072),
            flags("CKM_AES_KEY_GEN", 16, 32),
        ]);
        assert!(c.key_type_fits(KeyType::Rsa2048).is_ok());
        assert!(c.key_type_fits(KeyType::Rsa3072).is_ok());
        let e = c.key_type_fits(KeyType::Rsa4096).expect_err("too big");
        assert!(e.contains("4096-bit") && e.contains("1024..3072"), "{e}");
        assert!(c.key_type_fits(KeyType::Aes256).is_ok());
        // AES sizes reported in bits, and tokens that report no sizes at all.
        let c = caps_with(vec![flags("CKM_AES_KEY_GEN", 128, 256)]);
        assert!(c.key_type_fits(KeyType::Aes256).is_ok());
        let c = caps_with(vec![flags("CKM_AES_KEY_GEN", 16, 24)]);
        assert!(c.key_type_fits(KeyType::Aes256).is_err());
        let c = caps_with(vec![flags("CKM_RSA_PKCS_KEY_PAIR_GEN", 0, 0)]);
        assert!(c.key_type_fits(KeyType::Rsa4096).is_ok());
    }

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
    fn oaep_vectors_decrypt_with_an_independent_implementation() {
        use rsa::{BigUint, Oaep, RsaPrivateKey};
        let b = |h: &str| BigUint::from_bytes_be(&unhex(h));
        let key = RsaPrivateKey::from_components(
            b(kat_rsa::N),
            b(kat_rsa::E),
            b(kat_rsa::D),
            vec![b(kat_rsa::P), b(kat_rsa::Q)],
        )
        .expect("valid key");
        key.validate().expect("consistent key");
        let pt = key
            .decrypt(Oaep::new::<sha2::Sha256>(), &unhex(kat_rsa::CT256))
            .expect("SHA-256 ciphertext");
        assert_eq!(pt, kat_rsa::OAEP_MESSAGE);
        let pt = key
            .decrypt(Oaep::new::<sha1::Sha1>(), &unhex(kat_rsa::CT1))
            .expect("SHA-1 ciphertext");
        assert_eq!(pt, kat_rsa::OAEP_MESSAGE);
        use rsa::traits::PrivateKeyParts;
        assert_eq!(key.dp().map(|v| v.to_bytes_be()), Some(unhex(kat_rsa::DP)));
        assert_eq!(key.dq().map(|v| v.to_bytes_be()), Some(unhex(kat_rsa::DQ)));
        assert_eq!(
            key.crt_coefficient().map(|v| v.to_bytes_be()),
            Some(unhex(kat_rsa::QINV))
        );
    }

    #[test]
    fn signature_vectors_verify_with_independent_implementations() {
        use rsa::{BigUint, Pkcs1v15Sign, Pss, RsaPublicKey};
        use sha2::{Digest, Sha256, Sha384};
        let d256 = Sha256::digest(kat_sign::MESSAGE).to_vec();
        let d384 = Sha384::digest(kat_sign::MESSAGE).to_vec();
        assert_eq!(d256, unhex(kat_sign::DIGEST256));
        assert_eq!(d384, unhex(kat_sign::DIGEST384));
        let b = |h: &str| BigUint::from_bytes_be(&unhex(h));
        let rsa = RsaPublicKey::new(b(kat_rsa::N), b(kat_rsa::E)).expect("key");
        rsa.verify(
            Pkcs1v15Sign::new::<sha2::Sha256>(),
            &d256,
            &unhex(kat_sign::RS256),
        )
        .expect("RS256 vector");
        rsa.verify(Pss::new::<sha2::Sha256>(), &d256, &unhex(kat_sign::PS256))
            .expect("PS256 vector");
        // The broker's own DigestInfo prefix, padded by hand, is what RS256 signed.
        let prefixed = crate::hsm::sign::to_be_signed(crate::model::SignAlgorithm::Rs256, &d256);
        assert_eq!(&prefixed[19..], d256.as_slice());
        {
            use p256::ecdsa::{Signature, VerifyingKey, signature::hazmat::PrehashVerifier};
            let k = VerifyingKey::from_sec1_bytes(&unhex(kat_sign::P256_POINT)).expect("point");
            let sig = Signature::from_slice(&unhex(kat_sign::P256_SIG)).expect("r || s");
            k.verify_prehash(&d256, &sig).expect("ES256 vector");
            let sk = p256::ecdsa::SigningKey::from_slice(&unhex(kat_sign::P256_D)).expect("d");
            assert_eq!(VerifyingKey::from(&sk), k, "the scalar is the point's");
        }
        {
            use p384::ecdsa::{Signature, VerifyingKey, signature::hazmat::PrehashVerifier};
            let k = VerifyingKey::from_sec1_bytes(&unhex(kat_sign::P384_POINT)).expect("point");
            let sig = Signature::from_slice(&unhex(kat_sign::P384_SIG)).expect("r || s");
            k.verify_prehash(&d384, &sig).expect("ES384 vector");
            let sk = p384::ecdsa::SigningKey::from_slice(&unhex(kat_sign::P384_D)).expect("d");
            assert_eq!(VerifyingKey::from(&sk), k, "the scalar is the point's");
        }
    }

    #[test]
    fn hmac_vector_matches_an_independent_implementation() {
        // HMAC (RFC 2104) over the sha2 crate: H((K ^ opad) || H((K ^ ipad) || m)).
        use sha2::{Digest, Sha256};
        // A key longer than the block is hashed first.
        let mut k = [0u8; 64];
        k[..32].copy_from_slice(&Sha256::digest(HMAC_KEY));
        let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(HMAC_DATA)
            .finalize();
        let outer = Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize();
        assert_eq!(hex::encode(outer), HMAC_SHA256);
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

    #[test]
    fn kw_vector_matches_an_independent_implementation() {
        let kek = aes_kw::KekAes256::try_from(unhex(KW_KEK).as_slice()).expect("kek");
        let w = kek.wrap_vec(&unhex(KW_KEY)).expect("wrap");
        assert_eq!(hex::encode(w), KW_WRAPPED);
        assert_eq!(
            kek.unwrap_vec(&unhex(KW_WRAPPED)).expect("unwrap"),
            unhex(KW_KEY)
        );
    }
}
