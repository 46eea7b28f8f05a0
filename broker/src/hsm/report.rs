//! The capability report: what the probe ([`super::probe`]) found, as one row per mechanism
//! keybroker uses (listed by the token, the known-answer test's result, what it serves), one row
//! per algorithm and per key type (usable or why not), and the start-up verdict against the
//! configured requirements (`[hsm] required_algorithms`, `[hsm] legacy_template`).
//!
//! `keybroker check-config` prints it (text or `-o json`) in every case, also when the broker
//! would refuse to start, so a deployer sees what works before deciding; the refusal itself
//! lists what is missing and what does work.

use serde::Serialize;

use super::{
    mac,
    probe::{
        AES_KW, BYOK_TEMPLATE, Capabilities, ECDSA_P256, ECDSA_P384, KEY_ATTRIBUTES, OAEP_SHA1,
        OAEP_SHA256, RSA_PKCS_SIGN, RSA_PSS_SIGN,
    },
};
use crate::model::{Algorithm, KeyType};

/// Every key type keybroker offers.
pub const KEY_TYPES: [KeyType; 6] = [
    KeyType::Aes256,
    KeyType::Rsa2048,
    KeyType::Rsa3072,
    KeyType::Rsa4096,
    KeyType::EcP256,
    KeyType::EcP384,
];

/// One thing the configuration requires the token to serve before the broker starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "&'static str")]
pub enum Required {
    /// One algorithm (its keys can be created and used).
    Algorithm(Algorithm),
    /// RSA-OAEP with SHA-256 or, failing that, SHA-1 (`rsa-oaep`).
    AnyRsaOaep,
}

impl From<Required> for &'static str {
    fn from(r: Required) -> Self {
        r.name()
    }
}

/// The names `[hsm] required_algorithms` accepts.
pub const REQUIRED_NAMES: [&str; 8] = [
    "aes-256-gcm",
    "aes-kwp",
    "aes-kw",
    "rsa-oaep-sha256",
    "rsa-oaep-sha1",
    "rsa-oaep",
    "rsa-sign",
    "ecdsa",
];

/// What start-up required before `required_algorithms` existed, and still does by default.
pub const DEFAULT_REQUIRED: [&str; 2] = ["aes-256-gcm", "rsa-oaep"];

impl Required {
    /// Parses one of [`REQUIRED_NAMES`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "rsa-oaep" => Some(Self::AnyRsaOaep),
            other => Algorithm::parse(other).map(Self::Algorithm),
        }
    }

    /// Its name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Algorithm(a) => a.as_str(),
            Self::AnyRsaOaep => "rsa-oaep",
        }
    }

    /// Whether the token serves it.
    pub fn met(self, caps: &Capabilities) -> bool {
        match self {
            Self::Algorithm(a) => caps.supports(a),
            Self::AnyRsaOaep => {
                caps.supports(Algorithm::RsaOaepSha256) || caps.supports(Algorithm::RsaOaepSha1)
            }
        }
    }

    /// The mechanisms it needs that the token lacks or that failed their test.
    fn missing(self, caps: &Capabilities) -> Vec<&'static str> {
        let algs = match self {
            Self::Algorithm(a) => vec![a],
            Self::AnyRsaOaep => vec![Algorithm::RsaOaepSha256, Algorithm::RsaOaepSha1],
        };
        let mut m = Vec::new();
        for a in &algs {
            let (keygen, name) = caps.keygen_for(*a);
            if !keygen && !m.contains(&name) {
                m.push(name);
            }
            if caps.mechanism_for(*a).is_none() {
                let mech = match a {
                    Algorithm::Aes256Gcm => "CKM_AES_GCM",
                    Algorithm::AesKeyWrapPad => "CKM_AES_KEY_WRAP_KWP/CKM_AES_KEY_WRAP_PAD",
                    Algorithm::AesKeyWrap => AES_KW,
                    Algorithm::RsaOaepSha256 | Algorithm::RsaOaepSha1 => "CKM_RSA_PKCS_OAEP",
                    Algorithm::RsaSign => "CKM_RSA_PKCS/CKM_RSA_PKCS_PSS",
                    Algorithm::Ecdsa => "CKM_ECDSA",
                };
                if !m.contains(&mech) {
                    m.push(mech);
                }
            }
        }
        m
    }

    /// Why it is not met.
    fn why_not(self, caps: &Capabilities) -> String {
        match self {
            Self::Algorithm(a) => caps.why_not(a),
            Self::AnyRsaOaep => format!(
                "{}; {}",
                caps.why_not(Algorithm::RsaOaepSha256),
                caps.why_not(Algorithm::RsaOaepSha1)
            ),
        }
    }
}

/// One mechanism (or function, or attribute set) keybroker uses.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MechanismRow {
    /// The mechanism, function or attributes.
    pub mechanism: String,
    /// Whether the token lists it (`C_GetMechanismList`; true for a function or attributes).
    pub listed: bool,
    /// The known-answer test: `passed`, `failed: why`, `not run: not listed`, or `none` (key
    /// generation is tested when a key is made).
    pub test: String,
    /// Whether keybroker can use it.
    pub usable: bool,
    /// What keybroker uses it for.
    pub used_for: &'static str,
}

/// One algorithm: the mechanism that serves it here, and the key types it can serve.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AlgorithmRow {
    /// `aes-256-gcm`, ...
    pub algorithm: &'static str,
    /// The mechanism, or `unavailable`.
    pub mechanism: String,
    /// Whether keys of this algorithm can be created and used.
    pub usable: bool,
    /// The key types it serves on this token.
    pub key_types: Vec<&'static str>,
    /// Why not, when it is not usable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
}

/// One key type: the algorithms it can be created with here.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct KeyTypeRow {
    /// `aes-256`, `rsa-2048`, ...
    pub key_type: &'static str,
    /// Whether a key of this type can be created (with at least one algorithm).
    pub usable: bool,
    /// The algorithms it can be created with.
    pub algorithms: Vec<&'static str>,
    /// Why not, when it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct CapabilityReport {
    /// Every mechanism keybroker uses.
    pub mechanisms: Vec<MechanismRow>,
    /// Every algorithm.
    pub algorithms: Vec<AlgorithmRow>,
    /// Every key type.
    pub key_types: Vec<KeyTypeRow>,
    /// The configured requirements, each with whether the token meets it.
    pub required: Vec<RequiredRow>,
    /// Why the broker refuses to start on this token with this configuration (empty: it
    /// starts).
    pub refusals: Vec<String>,
}

/// One configured requirement.
#[derive(Clone, Debug, Serialize)]
pub struct RequiredRow {
    /// Its name.
    pub name: &'static str,
    /// Whether the token meets it.
    pub met: bool,
}

fn test_result(caps: &Capabilities, listed: bool, key: &str, passed: bool) -> String {
    if !listed {
        "not run: not listed".into()
    } else if passed {
        "passed".into()
    } else {
        match caps.test_failures.get(key) {
            Some(why) => format!("failed: {why}"),
            None => "failed".into(),
        }
    }
}

fn listed(caps: &Capabilities, name: &str) -> bool {
    caps.mechanisms.iter().any(|m| m == name)
}

/// One row per mechanism keybroker uses.
pub fn mechanism_rows(caps: &Capabilities) -> Vec<MechanismRow> {
    let keygen = |name: &str, on: bool, used_for| MechanismRow {
        mechanism: name.into(),
        listed: on,
        test: if on {
            "none: tested when a key is made".into()
        } else {
            "not run: not listed".into()
        },
        usable: on,
        used_for,
    };
    let gcm_listed = listed(caps, "CKM_AES_GCM");
    let oaep_listed = listed(caps, "CKM_RSA_PKCS_OAEP");
    let hmac_listed = listed(caps, "CKM_SHA256_HMAC");
    let mut rows = vec![
        keygen("CKM_AES_KEY_GEN", caps.aes_keygen, "aes-256 keys"),
        MechanismRow {
            mechanism: "CKM_AES_GCM".into(),
            listed: gcm_listed,
            test: test_result(caps, gcm_listed, "CKM_AES_GCM", caps.aes_gcm),
            usable: caps.aes_gcm,
            used_for: "aes-256 keys with aes-256-gcm (the default for AES)",
        },
    ];
    for c in &caps.kwp_candidates {
        let test = if !c.listed {
            "not run: not listed".to_string()
        } else if c.full_rfc5649 {
            "passed".into()
        } else if c.aligned {
            "passed for inputs that are multiples of 8 bytes (all keybroker wraps)".into()
        } else {
            format!(
                "failed: {}",
                c.error.as_deref().unwrap_or("no RFC 5649 output")
            )
        };
        rows.push(MechanismRow {
            mechanism: format!("{} ({:#x})", c.name, c.mechanism),
            listed: c.listed,
            test,
            usable: caps
                .kwp
                .as_ref()
                .is_some_and(|k| k.mechanism == c.mechanism),
            used_for: "aes-256 keys with aes-kwp (RFC 5649)",
        });
    }
    let kw_listed = listed(caps, AES_KW);
    rows.extend([
        MechanismRow {
            mechanism: AES_KW.into(),
            listed: kw_listed,
            test: test_result(caps, kw_listed, AES_KW, caps.aes_kw),
            usable: caps.aes_kw,
            used_for: "aes-256 keys with aes-kw (RFC 3394)",
        },
        keygen(
            "CKM_RSA_PKCS_KEY_PAIR_GEN",
            caps.rsa_keygen,
            "rsa-2048, rsa-3072 and rsa-4096 keys",
        ),
        MechanismRow {
            mechanism: OAEP_SHA256.into(),
            listed: oaep_listed,
            test: test_result(caps, oaep_listed, OAEP_SHA256, caps.oaep_sha256),
            usable: caps.oaep_sha256,
            used_for: "rsa keys with rsa-oaep-sha256 (the default for RSA)",
        },
        MechanismRow {
            mechanism: OAEP_SHA1.into(),
            listed: oaep_listed,
            test: test_result(caps, oaep_listed, OAEP_SHA1, caps.oaep_sha1),
            usable: caps.oaep_sha1,
            used_for: "rsa keys with rsa-oaep-sha1",
        },
        MechanismRow {
            mechanism: RSA_PKCS_SIGN.into(),
            listed: listed(caps, "CKM_RSA_PKCS"),
            test: test_result(
                caps,
                listed(caps, "CKM_RSA_PKCS"),
                RSA_PKCS_SIGN,
                caps.rsa_pkcs_sign,
            ),
            usable: caps.rsa_pkcs_sign,
            used_for: "rsa keys with rsa-sign: RS256, RS384, RS512",
        },
        MechanismRow {
            mechanism: RSA_PSS_SIGN.into(),
            listed: listed(caps, "CKM_RSA_PKCS_PSS"),
            test: test_result(
                caps,
                listed(caps, "CKM_RSA_PKCS_PSS"),
                RSA_PSS_SIGN,
                caps.rsa_pss_sign,
            ),
            usable: caps.rsa_pss_sign,
            used_for: "rsa keys with rsa-sign: PS256, PS384, PS512",
        },
        keygen(
            "CKM_EC_KEY_PAIR_GEN",
            caps.ec_keygen,
            "ec-p256 and ec-p384 keys",
        ),
        MechanismRow {
            mechanism: ECDSA_P256.into(),
            listed: listed(caps, "CKM_ECDSA"),
            test: test_result(caps, listed(caps, "CKM_ECDSA"), ECDSA_P256, caps.ecdsa_p256),
            usable: caps.ecdsa_p256,
            used_for: "ec-p256 keys: ES256",
        },
        MechanismRow {
            mechanism: ECDSA_P384.into(),
            listed: listed(caps, "CKM_ECDSA"),
            test: test_result(caps, listed(caps, "CKM_ECDSA"), ECDSA_P384, caps.ecdsa_p384),
            usable: caps.ecdsa_p384,
            used_for: "ec-p384 keys: ES384",
        },
        MechanismRow {
            mechanism: "CKM_SHA256_HMAC".into(),
            listed: hmac_listed,
            test: test_result(caps, hmac_listed, "CKM_SHA256_HMAC", caps.hmac_sha256),
            usable: caps.mac.is_some(),
            used_for: "the audit trail's checkpoint MACs; the security domain's MAC key",
        },
        keygen(
            "CKM_GENERIC_SECRET_KEY_GEN",
            caps.generic_secret_keygen,
            "the HMAC keys (audit trail, security domain)",
        ),
        MechanismRow {
            mechanism: "C_GenerateRandom".into(),
            listed: true,
            test: if caps.rng {
                "passed".into()
            } else {
                "failed".into()
            },
            usable: caps.rng,
            used_for: "generated DEKs, AES-GCM IVs, key ids",
        },
        MechanismRow {
            mechanism: KEY_ATTRIBUTES.into(),
            listed: true,
            test: test_result(caps, true, KEY_ATTRIBUTES, caps.key_attributes),
            usable: caps.key_attributes,
            used_for: "every KEK's template: not copyable, one allowed mechanism",
        },
        MechanismRow {
            mechanism: BYOK_TEMPLATE.into(),
            listed: true,
            test: test_result(caps, true, BYOK_TEMPLATE, caps.byok),
            usable: caps.byok,
            used_for: "BYOK import keys: nobody, the PIN holder included, reads imported material",
        },
    ]);
    rows
}

/// One row per algorithm.
pub fn algorithm_rows(caps: &Capabilities) -> Vec<AlgorithmRow> {
    Algorithm::ALL
        .iter()
        .map(|a| {
            let usable = caps.supports(*a);
            AlgorithmRow {
                algorithm: a.as_str(),
                mechanism: caps.mechanism_name(*a),
                usable,
                key_types: KEY_TYPES
                    .iter()
                    .filter(|k| usable && a.fits(**k) && caps.key_type_fits(**k).is_ok())
                    .map(|k| k.as_str())
                    .collect(),
                why_not: (!usable).then(|| caps.why_not(*a)),
            }
        })
        .collect()
}

/// One row per key type.
pub fn key_type_rows(caps: &Capabilities) -> Vec<KeyTypeRow> {
    KEY_TYPES
        .iter()
        .map(|k| {
            let algorithms: Vec<&'static str> = Algorithm::ALL
                .iter()
                .filter(|a| a.fits(*k) && caps.supports(**a))
                .map(|a| a.as_str())
                .collect();
            let fits = caps.key_type_fits(*k);
            let why_not = match (&fits, algorithms.is_empty()) {
                (Err(why), _) => Some(why.clone()),
                (Ok(()), true) => Some(
                    Algorithm::ALL
                        .iter()
                        .filter(|a| a.fits(*k))
                        .map(|a| caps.why_not(*a))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
                (Ok(()), false) => None,
            };
            KeyTypeRow {
                key_type: k.as_str(),
                usable: why_not.is_none(),
                algorithms,
                why_not,
            }
        })
        .collect()
}

/// Why the broker must not start on this token: each configured requirement it does not meet,
/// no RNG, no MAC for the audit trail, and the KEK template's attributes (unless the operator
/// accepted their absence). Empty: it may start.
pub fn refusals(caps: &Capabilities, required: &[Required], legacy_template: bool) -> Vec<String> {
    let mut out = Vec::new();
    for r in required {
        if !r.met(caps) {
            out.push(format!(
                "required {} (needs {}): {}",
                r.name(),
                r.missing(caps).join(", "),
                r.why_not(caps)
            ));
        }
    }
    if !caps.rng {
        out.push(
            "C_GenerateRandom does not work (C_GenerateRandom): generated DEKs and AES-GCM IVs \
             come from the token's RNG"
                .into(),
        );
    }
    if caps.mac.is_none() {
        out.push(format!(
            "audit MAC (CKM_SHA256_HMAC): {}",
            mac::no_mac(caps)
        ));
    }
    if !caps.key_attributes && !legacy_template {
        out.push(format!(
            "KEK template ({KEY_ATTRIBUTES}): the token refuses these PKCS#11 2.40 attributes \
             ({}); keys made without them can be copied with more roles and used with any \
             mechanism the token has. Set [hsm] legacy_template = true to accept that (see \
             docs/src/portability.md)",
            caps.test_failures
                .get(KEY_ATTRIBUTES)
                .map(String::as_str)
                .unwrap_or("refused")
        ));
    }
    out
}

/// The mechanism names a refusal mentions first (`the token lacks mechanisms keybroker needs:
/// ...`).
pub fn missing_mechanisms(caps: &Capabilities, required: &[Required]) -> Vec<&'static str> {
    let mut m: Vec<&'static str> = Vec::new();
    for r in required.iter().filter(|r| !r.met(caps)) {
        for x in r.missing(caps) {
            if !m.contains(&x) {
                m.push(x);
            }
        }
    }
    if !caps.rng {
        m.push("C_GenerateRandom");
    }
    if caps.mac.is_none() {
        if !caps.hmac_sha256 {
            m.push("CKM_SHA256_HMAC");
        }
        if !caps.generic_secret_keygen {
            m.push("CKM_GENERIC_SECRET_KEY_GEN");
        }
    }
    m
}

/// The report for `caps` under the configured requirements.
pub fn report(
    caps: &Capabilities,
    required: &[Required],
    legacy_template: bool,
) -> CapabilityReport {
    CapabilityReport {
        mechanisms: mechanism_rows(caps),
        algorithms: algorithm_rows(caps),
        key_types: key_type_rows(caps),
        required: required
            .iter()
            .map(|r| RequiredRow {
                name: r.name(),
                met: r.met(caps),
            })
            .collect(),
        refusals: refusals(caps, required, legacy_template),
    }
}

/// The refusal message: what is missing, then what does work and what to do.
pub fn refusal_message(caps: &Capabilities, r: &CapabilityReport, required: &[Required]) -> String {
    let missing = missing_mechanisms(caps, required);
    let mut msg = if missing.is_empty() {
        "the token cannot serve what keybroker is configured to require".to_string()
    } else {
        format!(
            "the token lacks mechanisms keybroker needs: {}",
            missing.join(", ")
        )
    };
    for why in &r.refusals {
        msg.push_str("\n  - ");
        msg.push_str(why);
    }
    let works: Vec<String> = r
        .algorithms
        .iter()
        .filter(|a| a.usable)
        .map(|a| format!("{} ({})", a.algorithm, a.key_types.join(", ")))
        .collect();
    msg.push_str(&format!(
        "\n  what works: {}",
        if works.is_empty() {
            "no algorithm".to_string()
        } else {
            works.join("; ")
        }
    ));
    if r.required.iter().any(|q| !q.met) && !works.is_empty() {
        msg.push_str(
            "\n  to serve only what works, list it in [hsm] required_algorithms (key types the \
             token cannot serve are then refused per request, with the reason)",
        );
    }
    msg.push_str("\n  `keybroker check-config` prints the whole capability table");
    msg
}

/// The report as text for people (`keybroker check-config`).
pub fn text(r: &CapabilityReport) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(t, "mechanisms:");
    let _ = writeln!(
        t,
        "  {:<54} {:<6} {:<6} KNOWN-ANSWER TEST / USED FOR",
        "MECHANISM", "LISTED", "USABLE"
    );
    let yn = |b: bool| if b { "yes" } else { "no" };
    for m in &r.mechanisms {
        let _ = writeln!(
            t,
            "  {:<54} {:<6} {:<6} {}",
            m.mechanism,
            yn(m.listed),
            yn(m.usable),
            m.test
        );
        let _ = writeln!(t, "  {:<54} {:<6} {:<6}   for: {}", "", "", "", m.used_for);
    }
    let _ = writeln!(t, "algorithms:");
    for a in &r.algorithms {
        match &a.why_not {
            None => {
                let _ = writeln!(
                    t,
                    "  {:<16} usable: {} — key types {}",
                    a.algorithm,
                    a.mechanism,
                    a.key_types.join(", ")
                );
            }
            Some(why) => {
                let _ = writeln!(t, "  {:<16} UNAVAILABLE: {why}", a.algorithm);
            }
        }
    }
    let _ = writeln!(t, "key types:");
    for k in &r.key_types {
        match &k.why_not {
            None => {
                let _ = writeln!(
                    t,
                    "  {:<9} usable with {}",
                    k.key_type,
                    k.algorithms.join(", ")
                );
            }
            Some(why) => {
                let _ = writeln!(t, "  {:<9} REFUSED: {why}", k.key_type);
            }
        }
    }
    let _ = writeln!(
        t,
        "required ([hsm] required_algorithms): {}",
        r.required
            .iter()
            .map(|q| format!("{} {}", q.name, if q.met { "met" } else { "NOT MET" }))
            .collect::<Vec<_>>()
            .join(", ")
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_required_name_parses_and_the_default_is_what_start_up_always_required() {
        for n in REQUIRED_NAMES {
            assert_eq!(Required::parse(n).map(Required::name), Some(n));
        }
        assert!(Required::parse("aes-128").is_none());
        assert_eq!(
            DEFAULT_REQUIRED.map(|n| Required::parse(n).map(Required::name)),
            [Some("aes-256-gcm"), Some("rsa-oaep")]
        );
    }
}
