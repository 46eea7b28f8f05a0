//! The one fixed KEK template (security invariant 1, `docs/src/security.md`) and the read-back check that a KEK still has it
//! (§3.3).
//!
//! Every KEK is created inside the token as a token object that is private, sensitive, never
//! extractable, not modifiable, not copyable, with no derive/sign/verify, with exactly one role
//! pair and `CKA_ALLOWED_MECHANISMS` limited to its one mechanism:
//!
//! | algorithm        | object          | roles set TRUE      | roles forced FALSE                    |
//! |------------------|-----------------|---------------------|---------------------------------------|
//! | AES-256-GCM      | secret key      | ENCRYPT, DECRYPT    | WRAP, UNWRAP, SIGN, VERIFY, DERIVE    |
//! | AES-KWP, AES-KW  | secret key      | WRAP, UNWRAP        | ENCRYPT, DECRYPT, SIGN, VERIFY, DERIVE|
//! | RSA-OAEP         | private key     | DECRYPT             | UNWRAP, SIGN, SIGN_RECOVER, DERIVE    |
//! |                  | public key      | ENCRYPT             | WRAP, VERIFY, VERIFY_RECOVER, DERIVE  |
//! | RSA signing      | private key     | SIGN                | DECRYPT, UNWRAP, SIGN_RECOVER, DERIVE |
//! |                  | public key      | VERIFY              | ENCRYPT, WRAP, VERIFY_RECOVER, DERIVE |
//! | ECDSA (P-256/384)| private key     | SIGN                | DECRYPT, UNWRAP, SIGN_RECOVER, DERIVE |
//! |                  | public key      | VERIFY              | ENCRYPT, WRAP, VERIFY_RECOVER, DERIVE |
//!
//! A signing key's `CKA_ALLOWED_MECHANISMS` is `CKM_ECDSA` (EC) or `CKM_RSA_PKCS` and
//! `CKM_RSA_PKCS_PSS` (RSA: RS* and PS* with one key, as Managed HSM's RSA keys sign both); the
//! broker builds the PKCS#1 v1.5 `DigestInfo` itself, so the token only ever pads and signs.
//! A signing key is never extractable, whatever `[lifecycle] backup` says, and a wrapping key
//! never signs: a key that could both sign and decrypt with `CKM_RSA_PKCS` would turn a signing
//! request into a decryption oracle (the same raw RSA operation), so the two are separate key
//! types with separate templates.
//!
//! Why no key may both wrap and decrypt (or unwrap and encrypt): with such a key, anyone holding
//! a session can `C_WrapKey` a sensitive key under it and `C_Decrypt` the result, reading the
//! sensitive key in the clear (Clulow, "On the Security of PKCS #11", CHES 2003). SoftHSM2 2.6.1
//! does not prevent it (docs/src/hsm-notes.md), so the template must. `CKA_MODIFIABLE` and `CKA_COPYABLE`
//! FALSE stop an attacker from adding the missing role later with `C_SetAttributeValue` or
//! `C_CopyObject`.

use cryptoki::{
    mechanism::MechanismType,
    object::{Attribute, AttributeArray, AttributeType, KeyType as CkKeyType, ObjectClass},
};

use crate::model::{Algorithm, Curve, KeyType, VersionId};

/// The PKCS#11 2.40 attributes a PKCS#11 2.20 token (openCryptoki 3.8) does not know.
const V240: [AttributeType; 3] = [
    AttributeType::Copyable,
    AttributeType::Destroyable,
    AttributeType::AllowedMechanisms,
];

/// `template` as the token can take it: unchanged when it knows the PKCS#11 2.40 attributes
/// (`key_attributes`, from the probe), else without `CKA_COPYABLE`, `CKA_DESTROYABLE` and
/// `CKA_ALLOWED_MECHANISMS` — which the broker does only when the operator allowed it
/// (`[hsm] legacy_template`; the security consequences are in docs/src/portability.md).
/// `CKA_WRAP_WITH_TRUSTED` is never left out: a backup-enabled KEK fails closed on such a token.
pub fn for_token(mut template: Vec<Attribute>, key_attributes: bool) -> Vec<Attribute> {
    if !key_attributes {
        template.retain(|a| !V240.contains(&a.attribute_type()));
    }
    template
}

/// The label prefix of every object keybroker creates (used to report orphans).
pub const LABEL_PREFIX: &str = "kb:";

/// What to create.
#[derive(Clone, Debug)]
pub struct KekSpec {
    /// The version id, used as `CKA_ID`.
    pub id: VersionId,
    /// A human-readable label (`kb:tenant/name:vN`).
    pub label: String,
    /// The key type.
    pub key_type: KeyType,
    /// The algorithm (decides the role pair).
    pub algorithm: Algorithm,
    /// Backup enabled (`[backup] enabled`): the object is `CKA_EXTRACTABLE` but
    /// `CKA_WRAP_WITH_TRUSTED`, so only a trusted key (made by the token's security officer: the
    /// security domain's wrap keys) can ever wrap it. Otherwise never extractable.
    pub backup: bool,
}

/// `CKA_EXTRACTABLE` and, for a backup-enabled KEK, `CKA_WRAP_WITH_TRUSTED`.
fn extractability(backup: bool) -> Vec<Attribute> {
    if backup {
        vec![
            Attribute::Extractable(true),
            Attribute::WrapWithTrusted(true),
        ]
    } else {
        vec![Attribute::Extractable(false)]
    }
}

/// The role pair of an algorithm: (encrypt, decrypt, wrap, unwrap) on the secret/private object
/// (a signing key has none of them: its role is CKA_SIGN).
fn roles(alg: Algorithm) -> (bool, bool, bool, bool) {
    match alg {
        Algorithm::Aes256Gcm => (true, true, false, false),
        Algorithm::AesKeyWrapPad | Algorithm::AesKeyWrap => (false, false, true, true),
        Algorithm::RsaOaepSha256 | Algorithm::RsaOaepSha1 => (false, true, false, false),
        Algorithm::RsaSign | Algorithm::Ecdsa => (false, false, false, false),
    }
}

/// `CKA_ALLOWED_MECHANISMS` of a key of `alg` whose mechanism (from the probe) is `mechanism`:
/// that one mechanism, except for RSA signing keys, which sign with PKCS#1 v1.5 and PSS.
pub fn allowed_mechanisms(alg: Algorithm, mechanism: MechanismType) -> Vec<MechanismType> {
    if alg == Algorithm::RsaSign {
        vec![MechanismType::RSA_PKCS, MechanismType::RSA_PKCS_PSS]
    } else {
        vec![mechanism]
    }
}

/// The DER `CKA_EC_PARAMS` of a curve: its named-curve OID (RFC 5480).
pub fn ec_params(curve: Curve) -> Vec<u8> {
    match curve {
        // 1.2.840.10045.3.1.7
        Curve::P256 => vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
        // 1.3.132.0.34
        Curve::P384 => vec![0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
    }
}

/// The (public, private) templates of a signing key pair (RSA signing or EC): the private half
/// a token object, private, sensitive, never extractable, not modifiable or copyable, SIGN
/// only; the public half VERIFY only. Never extractable, whatever `spec.backup` says.
pub fn signing_templates(
    spec: &KekSpec,
    mechanism: MechanismType,
) -> (Vec<Attribute>, Vec<Attribute>) {
    let allowed = allowed_mechanisms(spec.algorithm, mechanism);
    let (kind, shape): (CkKeyType, Vec<Attribute>) =
        match (spec.key_type.curve(), spec.key_type.rsa_bits()) {
            (Some(curve), _) => (CkKeyType::EC, vec![Attribute::EcParams(ec_params(curve))]),
            (None, Some(bits)) => (
                CkKeyType::RSA,
                vec![
                    Attribute::ModulusBits(u64::from(bits).into()),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                ],
            ),
            (None, None) => (CkKeyType::AES, Vec::new()),
        };
    let mut public = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(kind),
    ];
    public.extend(shape);
    public.extend([
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Destroyable(true),
        Attribute::Derive(false),
        Attribute::Verify(true),
        Attribute::VerifyRecover(false),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::AllowedMechanisms(allowed.clone()),
        Attribute::Id(spec.id.as_bytes().to_vec()),
        Attribute::Label(spec.label.as_bytes().to_vec()),
    ]);
    let private = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(kind),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Copyable(false),
        Attribute::Destroyable(true),
        Attribute::Derive(false),
        Attribute::Sign(true),
        Attribute::SignRecover(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::AllowedMechanisms(allowed),
        Attribute::Id(spec.id.as_bytes().to_vec()),
        Attribute::Label(spec.label.as_bytes().to_vec()),
        Attribute::Modifiable(false),
    ];
    (public, private)
}

/// The template of an AES KEK.
pub fn aes_template(spec: &KekSpec, mechanism: MechanismType) -> Vec<Attribute> {
    let (enc, dec, wrap, unwrap) = roles(spec.algorithm);
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(CkKeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
    ];
    t.extend(extractability(spec.backup));
    t.extend([
        Attribute::Copyable(false),
        Attribute::Destroyable(true),
        Attribute::Derive(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Encrypt(enc),
        Attribute::Decrypt(dec),
        Attribute::Wrap(wrap),
        Attribute::Unwrap(unwrap),
        Attribute::AllowedMechanisms(vec![mechanism]),
        Attribute::Id(spec.id.as_bytes().to_vec()),
        Attribute::Label(spec.label.as_bytes().to_vec()),
        // Last: SoftHSM2 applies an unwrap template in order, and once CKA_MODIFIABLE is FALSE
        // every later attribute is read-only (CKR_ATTRIBUTE_READ_ONLY) — measured, 2.6.1.
        Attribute::Modifiable(false),
    ]);
    t
}

/// The attributes an unwrap template forces (`CKA_UNWRAP_TEMPLATE`): every security
/// attribute of a KEK template, none of its names (`CKA_ID`, `CKA_LABEL`), `CKA_TOKEN` or
/// `CKA_VALUE_LEN` (SoftHSM2 refuses the latter in an unwrap template). Used for the security
/// domain's wrap keys (restore) and BYOK import keys.
pub fn forced(template: Vec<Attribute>) -> Vec<Attribute> {
    const FORCED: &[AttributeType] = &[
        AttributeType::Class,
        AttributeType::KeyType,
        AttributeType::Private,
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::WrapWithTrusted,
        AttributeType::Copyable,
        AttributeType::Derive,
        AttributeType::Sign,
        AttributeType::SignRecover,
        AttributeType::Verify,
        AttributeType::Encrypt,
        AttributeType::Decrypt,
        AttributeType::Wrap,
        AttributeType::Unwrap,
        AttributeType::AllowedMechanisms,
        AttributeType::Destroyable,
        AttributeType::Modifiable,
    ];
    template
        .into_iter()
        .filter(|a| FORCED.contains(&a.attribute_type()))
        .collect()
}

/// BYOK: the import key's `CKA_UNWRAP_TEMPLATE` — the KEK template of the key it will import
/// (`algorithm`, with backup on or off), forced on anything the import key unwraps, whoever
/// asks. So even the holder of the user PIN, taking a customer's blob to the token with a
/// template of their own, gets only a sensitive, non-extractable key with that one role pair
/// (security invariant 11, `docs/src/security.md`).
pub fn byok_forced(
    algorithm: Algorithm,
    mechanism: MechanismType,
    backup: bool,
    key_attributes: bool,
) -> Vec<Attribute> {
    let spec = KekSpec {
        id: VersionId::random(),
        label: String::new(),
        key_type: KeyType::Aes256,
        algorithm,
        backup,
    };
    for_token(forced(aes_template(&spec, mechanism)), key_attributes)
}

/// BYOK: the import key's private half (the public half is [`byok_import_public`]): a token
/// object that is sensitive, never extractable, not modifiable or copyable, may only unwrap,
/// with RSA-OAEP, and forces `forced` ([`byok_forced`]) on what it unwraps.
pub fn byok_import_private(id: VersionId, label: &[u8], forced: Vec<Attribute>) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(CkKeyType::RSA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Copyable(false),
        Attribute::Unwrap(true),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::SignRecover(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::RSA_PKCS_OAEP]),
        Attribute::UnwrapTemplate(AttributeArray::new(forced)),
        Attribute::Id(id.as_bytes().to_vec()),
        Attribute::Label(label.to_vec()),
        Attribute::Modifiable(false),
    ]
}

/// BYOK: the import key's public half: encrypt nothing on the token, only published.
pub fn byok_import_public(id: VersionId, label: &[u8], bits: u32) -> Vec<Attribute> {
    vec![
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
        Attribute::Label(label.to_vec()),
    ]
}

/// The (public, private) templates of an RSA KEK pair.
pub fn rsa_templates(
    spec: &KekSpec,
    bits: u32,
    mechanism: MechanismType,
) -> (Vec<Attribute>, Vec<Attribute>) {
    let public = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(CkKeyType::RSA),
        Attribute::ModulusBits(u64::from(bits).into()),
        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Destroyable(true),
        Attribute::Derive(false),
        Attribute::Verify(false),
        Attribute::VerifyRecover(false),
        Attribute::Encrypt(true),
        Attribute::Wrap(false),
        Attribute::AllowedMechanisms(vec![mechanism]),
        Attribute::Id(spec.id.as_bytes().to_vec()),
        Attribute::Label(spec.label.as_bytes().to_vec()),
    ];
    let mut private = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(CkKeyType::RSA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
    ];
    private.extend(extractability(spec.backup));
    private.extend([
        Attribute::Copyable(false),
        Attribute::Destroyable(true),
        Attribute::Derive(false),
        Attribute::Sign(false),
        Attribute::SignRecover(false),
        Attribute::Decrypt(true),
        Attribute::Unwrap(false),
        Attribute::AllowedMechanisms(vec![mechanism]),
        Attribute::Id(spec.id.as_bytes().to_vec()),
        Attribute::Label(spec.label.as_bytes().to_vec()),
        // Last, as in the AES template (an unwrap applies it in order).
        Attribute::Modifiable(false),
    ]);
    (public, private)
}

/// An HMAC-SHA256 key generated in the token (the audit trail's checkpoint key, the security
/// domain's MAC key): a private token object, sensitive, never extractable, not modifiable or
/// copyable, SIGN+VERIFY only, `CKA_ALLOWED_MECHANISMS` = `CKM_SHA256_HMAC`. `destroyable`
/// adds `CKA_DESTROYABLE` when given (left out otherwise: PKCS#11 2.20 tokens do not know it).
pub fn hmac_key_template(id: VersionId, label: &str, destroyable: Option<bool>) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(CkKeyType::GENERIC_SECRET),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Copyable(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::SHA256_HMAC]),
        Attribute::Id(id.as_bytes().to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    t.extend(destroyable.map(Attribute::Destroyable));
    t.push(Attribute::Modifiable(false));
    t
}

/// The attributes read back from a secret or private KEK object to check its template.
pub const SECRET_CHECK: &[AttributeType] = &[
    AttributeType::Token,
    AttributeType::Private,
    AttributeType::Sensitive,
    AttributeType::AlwaysSensitive,
    AttributeType::Extractable,
    AttributeType::NeverExtractable,
    AttributeType::WrapWithTrusted,
    AttributeType::Modifiable,
    AttributeType::Copyable,
    AttributeType::Derive,
    AttributeType::Sign,
    AttributeType::Verify,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::AllowedMechanisms,
];

/// The attributes read back from a public KEK object.
pub const PUBLIC_CHECK: &[AttributeType] = &[
    AttributeType::Token,
    AttributeType::Modifiable,
    AttributeType::Copyable,
    AttributeType::Derive,
    AttributeType::Verify,
    AttributeType::Encrypt,
    AttributeType::Wrap,
    AttributeType::AllowedMechanisms,
];

/// Compares attributes read back from the secret/private object of a KEK with what the
/// template demands; returns one line per difference (empty = good). An imported key (BYOK)
/// existed outside the HSM before, so PKCS#11 rightly reports it neither always-sensitive nor
/// never-extractable; everything else is the same.
pub fn check_secret(
    alg: Algorithm,
    mechanism: MechanismType,
    attrs: &[Attribute],
    imported: bool,
    key_attributes: bool,
) -> Vec<String> {
    let (enc, dec, wrap, unwrap) = roles(alg);
    let mut problems = Vec::new();
    let mut want = |name: &str, got: Option<bool>, expect: bool| match got {
        Some(v) if v == expect => {}
        Some(v) => problems.push(format!("{name} is {}, must be {}", tf(v), tf(expect))),
        None => problems.push(format!("{name} is missing, must be {}", tf(expect))),
    };
    let b = |t: AttributeType| find_bool(attrs, t);
    want("CKA_TOKEN", b(AttributeType::Token), true);
    want("CKA_PRIVATE", b(AttributeType::Private), true);
    want("CKA_SENSITIVE", b(AttributeType::Sensitive), true);
    // A backup-enabled KEK is extractable, but only under a trusted key (the security domain's,
    // made by the SO); it was then never extractable by anyone else, but PKCS#11 reports it
    // neither never-extractable nor (once restored) always-sensitive.
    let backup = b(AttributeType::Extractable) == Some(true);
    if backup {
        want(
            "CKA_WRAP_WITH_TRUSTED (of an extractable KEK)",
            b(AttributeType::WrapWithTrusted),
            true,
        );
    } else {
        want("CKA_EXTRACTABLE", b(AttributeType::Extractable), false);
    }
    if !imported && !backup {
        want(
            "CKA_ALWAYS_SENSITIVE",
            b(AttributeType::AlwaysSensitive),
            true,
        );
        want(
            "CKA_NEVER_EXTRACTABLE",
            b(AttributeType::NeverExtractable),
            true,
        );
    }
    want("CKA_MODIFIABLE", b(AttributeType::Modifiable), false);
    if key_attributes {
        want("CKA_COPYABLE", b(AttributeType::Copyable), false);
    }
    want("CKA_DERIVE", b(AttributeType::Derive), false);
    want("CKA_SIGN", b(AttributeType::Sign), alg.is_signing());
    // A private RSA or EC key has no CKA_VERIFY/CKA_ENCRYPT/CKA_WRAP meaning; tokens may report
    // them absent. When present they must be FALSE.
    if !alg.is_rsa() && !alg.is_signing() {
        want("CKA_VERIFY", b(AttributeType::Verify), false);
        want("CKA_ENCRYPT", b(AttributeType::Encrypt), enc);
        want("CKA_WRAP", b(AttributeType::Wrap), wrap);
    } else {
        for (name, t) in [
            ("CKA_VERIFY", AttributeType::Verify),
            ("CKA_ENCRYPT", AttributeType::Encrypt),
            ("CKA_WRAP", AttributeType::Wrap),
        ] {
            if b(t) == Some(true) {
                want(name, Some(true), false);
            }
        }
    }
    want("CKA_DECRYPT", b(AttributeType::Decrypt), dec);
    want("CKA_UNWRAP", b(AttributeType::Unwrap), unwrap);
    if key_attributes {
        check_mechanisms(attrs, &allowed_mechanisms(alg, mechanism), &mut problems);
    }
    problems
}

/// Compares attributes read back from the public object of an RSA or EC key pair.
pub fn check_public(
    alg: Algorithm,
    mechanism: MechanismType,
    attrs: &[Attribute],
    key_attributes: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut want = |name: &str, got: Option<bool>, expect: bool| match got {
        Some(v) if v == expect => {}
        Some(v) => problems.push(format!(
            "public {name} is {}, must be {}",
            tf(v),
            tf(expect)
        )),
        None => problems.push(format!("public {name} is missing, must be {}", tf(expect))),
    };
    let b = |t: AttributeType| find_bool(attrs, t);
    want("CKA_TOKEN", b(AttributeType::Token), true);
    want("CKA_MODIFIABLE", b(AttributeType::Modifiable), false);
    if key_attributes {
        want("CKA_COPYABLE", b(AttributeType::Copyable), false);
    }
    want("CKA_DERIVE", b(AttributeType::Derive), false);
    want("CKA_VERIFY", b(AttributeType::Verify), alg.is_signing());
    want("CKA_ENCRYPT", b(AttributeType::Encrypt), !alg.is_signing());
    want("CKA_WRAP", b(AttributeType::Wrap), false);
    if key_attributes {
        check_mechanisms(attrs, &allowed_mechanisms(alg, mechanism), &mut problems);
    }
    problems
}

fn check_mechanisms(attrs: &[Attribute], want: &[MechanismType], problems: &mut Vec<String>) {
    let allowed = attrs.iter().find_map(|a| match a {
        Attribute::AllowedMechanisms(m) => Some(m.clone()),
        _ => None,
    });
    let names = || {
        want.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match allowed {
        Some(mut m) => {
            m.sort_by_key(|x| u64::from(*x));
            let mut w = want.to_vec();
            w.sort_by_key(|x| u64::from(*x));
            if m != w {
                problems.push(format!(
                    "CKA_ALLOWED_MECHANISMS is {m:?}, must be exactly [{}]",
                    names()
                ));
            }
        }
        None => problems.push(format!(
            "CKA_ALLOWED_MECHANISMS is missing, must be exactly [{}]",
            names()
        )),
    }
}

fn find_bool(attrs: &[Attribute], t: AttributeType) -> Option<bool> {
    attrs.iter().find_map(|a| {
        if a.attribute_type() != t {
            return None;
        }
        match a {
            Attribute::Token(v)
            | Attribute::Private(v)
            | Attribute::Sensitive(v)
            | Attribute::AlwaysSensitive(v)
            | Attribute::Extractable(v)
            | Attribute::NeverExtractable(v)
            | Attribute::WrapWithTrusted(v)
            | Attribute::Trusted(v)
            | Attribute::Modifiable(v)
            | Attribute::Copyable(v)
            | Attribute::Derive(v)
            | Attribute::Sign(v)
            | Attribute::Verify(v)
            | Attribute::Encrypt(v)
            | Attribute::Decrypt(v)
            | Attribute::Wrap(v)
            | Attribute::Unwrap(v) => Some(*v),
            _ => None,
        }
    })
}

fn tf(v: bool) -> &'static str {
    if v { "TRUE" } else { "FALSE" }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a token reports for a KEK generated from `aes_template` (backup on or off).
    #[test]
    fn an_import_key_forces_the_imported_keys_template_without_its_names() {
        let gcm = byok_forced(Algorithm::Aes256Gcm, MechanismType::AES_GCM, false, true);
        for a in [
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Copyable(false),
            Attribute::Derive(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Modifiable(false),
            Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
        ] {
            assert!(gcm.contains(&a), "{a:?} not forced");
        }
        for t in [
            AttributeType::Id,
            AttributeType::Label,
            AttributeType::Token,
            AttributeType::ValueLen,
        ] {
            assert!(gcm.iter().all(|a| a.attribute_type() != t), "{t:?} forced");
        }
        // Not modifiable last: SoftHSM2 applies a template in order.
        assert_eq!(gcm.last(), Some(&Attribute::Modifiable(false)));
        let kwp = byok_forced(
            Algorithm::AesKeyWrapPad,
            MechanismType::AES_KEY_WRAP_PAD,
            true,
            true,
        );
        assert!(kwp.contains(&Attribute::Unwrap(true)) && kwp.contains(&Attribute::Encrypt(false)));
        assert!(kwp.contains(&Attribute::WrapWithTrusted(true)), "backup on");
        // RFC 3394 keys: the same wrap/unwrap-only roles as KWP, but their own one mechanism.
        let kw = byok_forced(
            Algorithm::AesKeyWrap,
            MechanismType::AES_KEY_WRAP,
            false,
            true,
        );
        for a in [
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Extractable(false),
            Attribute::AllowedMechanisms(vec![MechanismType::AES_KEY_WRAP]),
        ] {
            assert!(kw.contains(&a), "{a:?} not forced: {kw:?}");
        }
        let legacy = byok_forced(Algorithm::Aes256Gcm, MechanismType::AES_GCM, false, false);
        assert!(
            !legacy
                .iter()
                .any(|a| a.attribute_type() == AttributeType::Copyable)
        );
    }

    fn reported(backup: bool) -> Vec<Attribute> {
        vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::AlwaysSensitive(true),
            Attribute::Extractable(backup),
            Attribute::NeverExtractable(!backup),
            Attribute::WrapWithTrusted(backup),
            Attribute::Modifiable(false),
            Attribute::Copyable(false),
            Attribute::Derive(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
        ]
    }

    fn check(attrs: &[Attribute]) -> Vec<String> {
        check_secret(
            Algorithm::Aes256Gcm,
            MechanismType::AES_GCM,
            attrs,
            false,
            true,
        )
    }

    #[test]
    fn a_legacy_token_gets_no_2_40_attributes_and_is_not_checked_for_them() {
        let spec = KekSpec {
            id: VersionId::random(),
            label: "kb:t/k:v1".into(),
            key_type: KeyType::Rsa2048,
            algorithm: Algorithm::RsaOaepSha256,
            backup: false,
        };
        let (public, private) = rsa_templates(&spec, 2048, MechanismType::RSA_PKCS_OAEP);
        for t in [public.clone(), private.clone()] {
            let legacy = for_token(t.clone(), false);
            assert!(legacy.iter().all(|a| !V240.contains(&a.attribute_type())));
            assert_eq!(legacy.len(), t.len() - 3);
            assert_eq!(for_token(t.clone(), true), t);
        }
        // What openCryptoki 3.8.1 reports for such a private key: the 2.40 attributes absent.
        let mut attrs = reported(false);
        attrs.retain(|a| !V240.contains(&a.attribute_type()));
        let alg = Algorithm::Aes256Gcm;
        assert!(check_secret(alg, MechanismType::AES_GCM, &attrs, false, false).is_empty());
        let strict = check_secret(alg, MechanismType::AES_GCM, &attrs, false, true);
        assert!(
            strict.iter().any(|p| p.contains("CKA_COPYABLE")),
            "{strict:?}"
        );
        assert!(strict.iter().any(|p| p.contains("CKA_ALLOWED_MECHANISMS")));
        // The roles are still checked.
        let mut roles = attrs.clone();
        roles.retain(|a| a.attribute_type() != AttributeType::Wrap);
        roles.push(Attribute::Wrap(true));
        assert!(!check_secret(alg, MechanismType::AES_GCM, &roles, false, false).is_empty());
    }

    #[test]
    fn a_backup_enabled_kek_is_extractable_only_under_a_trusted_key() {
        assert!(check(&reported(false)).is_empty());
        assert!(check(&reported(true)).is_empty());
        // Extractable without CKA_WRAP_WITH_TRUSTED: any key with wrap could take it out.
        let mut loose = reported(true);
        loose.retain(|a| a.attribute_type() != AttributeType::WrapWithTrusted);
        loose.push(Attribute::WrapWithTrusted(false));
        let p = check(&loose);
        assert!(
            p.iter().any(|l| l.contains("CKA_WRAP_WITH_TRUSTED")),
            "{p:?}"
        );
        // Not extractable but never-extractable FALSE: it was extractable once.
        let mut was = reported(false);
        was.retain(|a| a.attribute_type() != AttributeType::NeverExtractable);
        was.push(Attribute::NeverExtractable(false));
        assert!(!check(&was).is_empty());
    }

    #[test]
    fn the_template_asks_for_wrap_with_trusted_only_when_backup_is_on() {
        let spec = |backup| KekSpec {
            id: VersionId::random(),
            label: "kb:t/k:v1".into(),
            key_type: KeyType::Aes256,
            algorithm: Algorithm::Aes256Gcm,
            backup,
        };
        let on = aes_template(&spec(true), MechanismType::AES_GCM);
        assert!(on.contains(&Attribute::Extractable(true)));
        assert!(on.contains(&Attribute::WrapWithTrusted(true)));
        let off = aes_template(&spec(false), MechanismType::AES_GCM);
        assert!(off.contains(&Attribute::Extractable(false)));
        assert!(
            !off.iter()
                .any(|a| a.attribute_type() == AttributeType::WrapWithTrusted)
        );
        // CKA_MODIFIABLE stays last (SoftHSM2 applies an unwrap template in order).
        for t in [
            on,
            off,
            rsa_templates(&spec(true), 3072, MechanismType::RSA_PKCS_OAEP).1,
        ] {
            assert_eq!(t.last(), Some(&Attribute::Modifiable(false)));
        }
    }
}
