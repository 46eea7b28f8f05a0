//! Vendor profiles: one table of the PKCS#11 quirks keybroker knows about, selected by the
//! token's manufacturer/model (or the module's file name) or named in the configuration
//! (`[hsm] profile = "..."`).
//!
//! A profile never replaces the capability probe: the known-answer tests decide what a token
//! can do, on every start. A profile says what to expect and how to behave where a test cannot
//! tell: which RFC 5649 mechanism number to prefer, how many sessions the device allows,
//! whether `CKR_DEVICE_ERROR` means "slow down" rather than "device gone", and which quirks
//! keybroker cannot handle yet (so start-up says so instead of failing obscurely).
//!
//! What is applied by the HSM layer today:
//! * `kwp` — the order the probe prefers among RFC 5649 mechanisms that pass their KATs, and a
//!   note in the log when the token's behaviour differs from the profile's expectation;
//! * `max_sessions` — caps the session pool (besides `CK_TOKEN_INFO.ulMaxSessionCount`);
//! * `device_error_is_throttling` — `CKR_DEVICE_ERROR` becomes a retryable "busy"
//!   (RESOURCE_EXHAUSTED), not "device lost" (UNAVAILABLE);
//! * `device_error_on_bad_ciphertext` — on a decrypt/unwrap of caller data, `CKR_DEVICE_ERROR`
//!   from a session that still answers `C_GetSessionInfo` means "not authentic" (Kryoptic);
//!   `function_failed_on_bad_ciphertext` the same for `CKR_FUNCTION_FAILED` (openCryptoki);
//! * `init_reserved` — a module that needs `C_Initialize` `pReserved` is refused with a clear
//!   message: cryptoki can pass it only through an `unsafe` constructor
//!   (`CInitializeArgs::new_with_reserved`) and every keybroker crate forbids unsafe code.
//!
//! Documented, not applied (the probe catches their effect at start-up):
//! * `gcm_iv` — an HSM that generates the GCM IV itself ignores ours, so the GCM KAT (fixed IV,
//!   fixed expected ciphertext) fails and keybroker refuses to start; format-1 envelopes bind the
//!   IV into the AAD before encrypting, so HSM-generated IVs need a new envelope format;
//! * `size_query_under_reports` — cryptoki 0.12 sizes every output buffer from the token's own
//!   length query, so an under-reporting token fails with `CKR_BUFFER_TOO_SMALL` in the KATs.
//!
//! SoftHSM2 and Kryoptic are tested here (CI runs the whole end-to-end suite on both), and
//! openCryptoki's soft token (CI runs the suite on it too, its AES tests skipped). The
//! others are taken from their vendors' public documentation and issue threads and are marked
//! `tested: false`: verify them with `keybroker check-config` before relying on them.

use serde::Serialize;

use super::ops::KwpMechanism;

/// How AES-GCM IVs are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GcmIv {
    /// The caller supplies the IV (PKCS#11 2.40 behaviour; what keybroker needs).
    Caller,
    /// The HSM generates the IV and returns it in `CK_GCM_PARAMS.pIv`, ignoring the caller's.
    HsmGenerated,
    /// As `HsmGenerated`, but only when the HSM runs in FIPS mode.
    HsmGeneratedInFipsMode,
}

/// The known quirks of one PKCS#11 implementation.
#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    /// The profile's name, as used in `[hsm] profile`.
    pub name: &'static str,
    /// The product.
    pub product: &'static str,
    /// Whether keybroker's CI runs against it.
    pub tested: bool,
    /// Case-insensitive substrings of the token's manufacturer or model, the library's
    /// manufacturer or description, or the module's file name that select this profile.
    #[serde(skip)]
    pub matches: &'static [&'static str],
    /// The RFC 5649 mechanisms the vendor documents, in order of preference. Empty: none that
    /// keybroker can drive.
    pub kwp: &'static [KwpMechanism],
    /// How AES-GCM IVs are chosen.
    pub gcm_iv: GcmIv,
    /// Whether output-length queries (a NULL buffer) may report less than the real output.
    pub size_query_under_reports: bool,
    /// The `C_Initialize` `pReserved` string the module needs, if any (unsupported: see the
    /// module docs).
    pub init_reserved: Option<&'static str>,
    /// The most sessions the device allows an application, when it is lower than what it
    /// reports (or it reports none).
    pub max_sessions: Option<usize>,
    /// Whether `CKR_DEVICE_ERROR` means throttling (retry later) rather than a lost device.
    pub device_error_is_throttling: bool,
    /// Whether a decrypt/unwrap of data that fails its integrity check (bad OAEP padding, bad
    /// RFC 5649 integrity check value) returns `CKR_DEVICE_ERROR`. Then, on such a call, a
    /// device error from a session that still answers is "not authentic".
    pub device_error_on_bad_ciphertext: bool,
    /// The same for `CKR_FUNCTION_FAILED` (openCryptoki 3.8.1 answers a bad RSA-OAEP padding
    /// so).
    pub function_failed_on_bad_ciphertext: bool,
    /// What else to know, with sources.
    pub notes: &'static str,
}

/// The profile used when none matches: assume nothing beyond the standard.
pub const GENERIC: Profile = Profile {
    name: "generic",
    product: "any PKCS#11 2.40/3.x token",
    tested: false,
    matches: &[],
    kwp: &[KwpMechanism::Kwp, KwpMechanism::Pad],
    gcm_iv: GcmIv::Caller,
    size_query_under_reports: false,
    init_reserved: None,
    max_sessions: None,
    device_error_is_throttling: false,
    device_error_on_bad_ciphertext: false,
    function_failed_on_bad_ciphertext: false,
    notes: "No known quirks assumed; the probe's known-answer tests decide everything.",
};

/// Every profile keybroker knows. The first whose `matches` hits wins; `generic` is the
/// fallback.
pub const PROFILES: &[Profile] = &[
    Profile {
        name: "softhsm2",
        product: "SoftHSM2 2.6 (OpenDNSSEC)",
        tested: true,
        matches: &["softhsm"],
        kwp: &[KwpMechanism::Pad],
        gcm_iv: GcmIv::Caller,
        size_query_under_reports: false,
        init_reserved: None,
        max_sessions: None,
        device_error_is_throttling: false,
        device_error_on_bad_ciphertext: false,
        function_failed_on_bad_ciphertext: false,
        notes: "CKM_AES_KEY_WRAP_PAD (0x210A) zero-pads to a multiple of 8 and then applies RFC 5649 \
                (upstream issue #726): RFC 5649 for aligned input only; no CKM_AES_KEY_WRAP_KWP. \
                RSA-OAEP with SHA-1 only. A bad GCM tag gives CKR_GENERAL_ERROR. Does not enforce \
                wrap/decrypt role separation (the KEK template does). Never reports a lost device.",
    },
    Profile {
        name: "kryoptic",
        product: "Kryoptic 1.5 (Rust soft token on OpenSSL, PKCS#11 3.2)",
        tested: true,
        matches: &["kryoptic"],
        kwp: &[KwpMechanism::Kwp],
        gcm_iv: GcmIv::Caller,
        size_query_under_reports: false,
        init_reserved: None,
        max_sessions: None,
        device_error_is_throttling: false,
        device_error_on_bad_ciphertext: true,
        function_failed_on_bad_ciphertext: false,
        notes: "RFC 5649 as CKM_AES_KEY_WRAP_KWP (0x210B), no 0x210A. RSA-OAEP with SHA-256. A bad GCM \
                tag gives CKR_ENCRYPTED_DATA_INVALID. C_FindObjects also returns ~148 CKO_MECHANISM \
                objects: searches filter by CKA_CLASS. A failed RFC 5649 or RSA-OAEP integrity check on \
                unwrap/decrypt returns CKR_DEVICE_ERROR (found by this suite's flipped-byte tests); \
                it is reported as unauthentic when the session still answers. A slot's `mechanisms = [\"DENY\", ...]` hides \
                mechanisms (used in tests to imitate a poorer HSM).",
    },
    Profile {
        name: "opencryptoki",
        product: "openCryptoki 3.8 (IBM; soft, CCA and EP11 tokens)",
        tested: true,
        matches: &["opencryptoki"],
        kwp: &[],
        gcm_iv: GcmIv::Caller,
        size_query_under_reports: false,
        init_reserved: None,
        max_sessions: None,
        device_error_is_throttling: false,
        device_error_on_bad_ciphertext: false,
        function_failed_on_bad_ciphertext: true,
        notes: "Tested here with the 3.8.1 soft token (CI's third token, RSA keys only). Needs its slot \
                daemon pkcsslotd (C_Initialize returns CKR_HOST_MEMORY without it). No CKM_AES_GCM, no \
                AES key wrap, no EC: set required_algorithms = [\"rsa-oaep-sha256\"]. A PKCS#11 2.20 \
                object model: CKA_COPYABLE, CKA_DESTROYABLE and CKA_ALLOWED_MECHANISMS are refused \
                (legacy_template). utcTime is \"15:10:01\" (tolerated). A bad RSA-OAEP padding on \
                decrypt gives CKR_FUNCTION_FAILED (found by this suite's flipped-byte test): reported as \
                unauthentic when the session still answers.",
    },
    Profile {
        name: "luna",
        product: "Thales (SafeNet/Gemalto) Luna Network/PCIe HSM 7",
        tested: false,
        matches: &["safenet", "luna", "gemalto", "thales"],
        kwp: &[KwpMechanism::Kwp],
        gcm_iv: GcmIv::HsmGeneratedInFipsMode,
        size_query_under_reports: false,
        init_reserved: None,
        max_sessions: None,
        device_error_is_throttling: false,
        device_error_on_bad_ciphertext: false,
        function_failed_on_bad_ciphertext: false,
        notes: "Not tested here. RFC 5649 as CKM_AES_KEY_WRAP_KWP (0x210B; also the vendor CKM_LUNA_AES_KWP). \
                In FIPS mode the HSM generates AES-GCM IVs itself: keybroker's GCM KAT then fails and the \
                broker refuses to start (use a non-FIPS partition policy for caller IVs until a new \
                envelope format carries HSM-made IVs). Sources: Thales Luna PKCS#11 mechanism docs; \
                Mastercard/pkcs11-tools PR #77 (KWP interoperability matrix).",
    },
    Profile {
        name: "cloudhsm",
        product: "AWS CloudHSM (Client SDK 5 PKCS#11 library)",
        tested: false,
        matches: &["cloudhsm", "marvell"],
        kwp: &[],
        gcm_iv: GcmIv::HsmGenerated,
        size_query_under_reports: false,
        init_reserved: None,
        max_sessions: None,
        device_error_is_throttling: true,
        device_error_on_bad_ciphertext: false,
        function_failed_on_bad_ciphertext: false,
        notes: "Not tested here. RFC 5649 only as the vendor-defined CKM_CLOUDHSM_AES_KEY_WRAP_ZERO_PAD \
                (not driven by keybroker: AES-KWP keys are unavailable). AES-GCM encryption always uses \
                an HSM-generated 12-byte IV written back into CK_GCM_PARAMS (keybroker's GCM KAT fails: \
                unsupported until an envelope format carries HSM-made IVs); C_Encrypt/C_Decrypt buffers \
                with CKM_AES_GCM are limited to 16 KB. CKR_DEVICE_ERROR can mean the cluster is \
                throttling requests: treated as busy (retry). Sources: AWS CloudHSM user guide, \
                \"Supported mechanisms for the PKCS #11 library\", \"AES key wrapping\", \"Known issues \
                for the PKCS #11 library\".",
    },
    Profile {
        name: "nshield",
        product: "Entrust (nCipher) nShield Connect/Solo",
        tested: false,
        matches: &["ncipher", "nshield", "entrust"],
        kwp: &[KwpMechanism::Kwp, KwpMechanism::Pad],
        gcm_iv: GcmIv::Caller,
        size_query_under_reports: false,
        init_reserved: None,
        max_sessions: None,
        device_error_is_throttling: false,
        device_error_on_bad_ciphertext: false,
        function_failed_on_bad_ciphertext: false,
        notes: "Not tested here. Both CKM_AES_KEY_WRAP_KWP and CKM_AES_KEY_WRAP_PAD are RFC 5649 and \
                interoperate with Luna's KWP (validated on a real nShield in Mastercard/pkcs11-tools \
                PR #77); some nShield lines only offer KWP (dogtagpki/jss PR #660). Keys are generated \
                under a Security World; module protection vs OCS protection changes who may log in.",
    },
    Profile {
        name: "yubihsm2",
        product: "Yubico YubiHSM 2 (yubihsm_pkcs11)",
        tested: false,
        matches: &["yubico", "yubihsm"],
        kwp: &[],
        gcm_iv: GcmIv::Caller,
        size_query_under_reports: false,
        init_reserved: None,
        max_sessions: Some(16),
        device_error_is_throttling: false,
        device_error_on_bad_ciphertext: false,
        function_failed_on_bad_ciphertext: false,
        notes: "Not tested here. At most 16 sessions on the device (the pool is capped). No CKM_AES_GCM \
                and no AES key wrap (only the vendor CKM_YUBICO_AES_CCM_WRAP): keybroker refuses to \
                start, naming CKM_AES_GCM. RSA-OAEP decryption is available. Sources: Yubico YubiHSM 2 \
                PKCS#11 module documentation.",
    },
    Profile {
        name: "nss-softoken",
        product: "NSS softoken (libsoftokn3.so)",
        tested: false,
        matches: &["softokn", "mozilla", "network security services"],
        kwp: &[KwpMechanism::Kwp],
        gcm_iv: GcmIv::Caller,
        size_query_under_reports: true,
        init_reserved: Some("configdir='sql:DIR' certPrefix='' keyPrefix='' secmod='secmod.db'"),
        max_sessions: None,
        device_error_is_throttling: false,
        device_error_on_bad_ciphertext: false,
        function_failed_on_bad_ciphertext: false,
        notes: "Unsupported: C_Initialize needs pReserved (a configuration string), which cryptoki can \
                pass only through an unsafe constructor, and keybroker forbids unsafe code. Also: its \
                0x210A is RFC 3394 over PKCS#7 padding (a third meaning, refused by the KAT) and its \
                KWP output-size query under-reports. Observed here by hand (docs/src/hsm-notes.md).",
    },
];

/// The profile named `name` (`generic` included).
pub fn by_name(name: &str) -> Option<&'static Profile> {
    if name == GENERIC.name {
        return Some(&GENERIC);
    }
    PROFILES.iter().find(|p| p.name == name)
}

/// The names accepted by `[hsm] profile` (besides `auto`).
pub fn names() -> Vec<&'static str> {
    PROFILES
        .iter()
        .map(|p| p.name)
        .chain([GENERIC.name])
        .collect()
}

/// Whether one of `facts` (the module's file name, or the library description and manufacturer
/// from `C_GetInfo`) shows p11-kit's proxy module (`p11-kit-proxy.so`, "PKCS#11 Kit Proxy
/// Module" by "PKCS#11 Kit"). The proxy loads the modules its configuration names and passes
/// each its `x-init-reserved` string as `C_Initialize` `pReserved`: a module that needs one
/// (NSS softoken) is usable behind it, though keybroker cannot pass the string itself.
pub fn is_proxy(facts: &[&str]) -> bool {
    facts.iter().any(|f| {
        let f = f.to_ascii_lowercase();
        f.contains("p11-kit-proxy") || f.contains("pkcs#11 kit")
    })
}

/// The first profile one of whose patterns occurs in one of `facts` (token manufacturer and
/// model, library manufacturer and description, module file name), else `generic`.
pub fn detect(facts: &[&str]) -> &'static Profile {
    let facts: Vec<String> = facts.iter().map(|f| f.to_ascii_lowercase()).collect();
    PROFILES
        .iter()
        .find(|p| {
            p.matches
                .iter()
                .any(|m| facts.iter().any(|f| f.contains(m)))
        })
        .unwrap_or(&GENERIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tested_tokens_are_recognised_by_what_they_report() {
        assert_eq!(detect(&["SoftHSM project", "SoftHSM v2"]).name, "softhsm2");
        assert_eq!(detect(&["Kryoptic Project", "v1"]).name, "kryoptic");
        assert_eq!(
            detect(&[
                "IBM Corp.",
                "IBM SoftTok",
                "/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so"
            ])
            .name,
            "opencryptoki"
        );
        assert_eq!(detect(&["Safenet, Inc.", "LunaSA 7"]).name, "luna");
        assert_eq!(
            detect(&["Yubico (www.yubico.com)", "YubiHSM"]).name,
            "yubihsm2"
        );
        assert_eq!(
            detect(&["/usr/lib/x86_64-linux-gnu/libsoftokn3.so"]).name,
            "nss-softoken"
        );
        assert_eq!(detect(&["Acme", "Box 9000"]).name, "generic");
    }

    #[test]
    fn p11_kit_proxy_is_recognised_by_file_name_or_library_info() {
        assert!(is_proxy(&["/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so"]));
        assert!(is_proxy(&["PKCS#11 Kit Proxy Module 1.1 (PKCS#11 Kit)"]));
        assert!(!is_proxy(&[
            "/usr/lib/softhsm/libsofthsm2.so",
            "SoftHSM 2.6"
        ]));
    }

    #[test]
    fn every_profile_is_reachable_by_name_and_only_ours_claim_tested() {
        for p in PROFILES {
            assert_eq!(by_name(p.name).map(|q| q.name), Some(p.name));
            assert_eq!(
                p.tested,
                ["softhsm2", "kryoptic", "opencryptoki"].contains(&p.name),
                "{}: only tokens CI runs against may claim `tested`",
                p.name
            );
            if !p.tested {
                assert!(p.notes.contains("tested here") || p.name == "nss-softoken");
            }
        }
        assert_eq!(by_name("generic").map(|p| p.name), Some("generic"));
        assert!(by_name("nope").is_none());
    }
}
