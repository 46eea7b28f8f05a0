//! The AWS KMS External Key Store (XKS) proxy API v1's four operations — GetKeyMetadata,
//! Encrypt, Decrypt, GetHealthStatus — as pipeline operations, with the specification's
//! semantics (`aws/aws-kms-xksproxy-api-spec`, `xks_proxy_api_spec.md`; the codec is
//! `api::xks`). Each request's `requestMetadata` reaches the pipeline as the request context's
//! [`Upstream`](crate::policy::Upstream): in the audit record, and matched by policy bindings'
//! `on_behalf_of`.
//!
//! * **Keys.** A URI prefix maps to a tenant; `externalKeyId` names a key of that tenant. A name
//!   keybroker cannot hold (longer than 64 characters, starting with `.`, `-` or `_`) is a key
//!   that does not exist.
//! * **AAD** (spec, Encrypt): the HSM authenticates `2-byte big-endian length of the AAD || AAD
//!   || 1-byte length of ciphertextMetadata || ciphertextMetadata` ([`xks_aad`]) — after the
//!   keyring's one-byte domain `0x03` (`keys::DETACHED_DOMAIN`), which keeps these ciphertexts
//!   apart from the wrapped DEKs and payload envelopes of the same key. The spec lets a proxy
//!   record such choices in the ciphertext metadata; keybroker's says "format 1": exactly this.
//! * **ciphertextMetadata** ([`CiphertextMetadata`], 17 bytes): `0x01`, then the 16-byte id of
//!   the key version that encrypted. Decrypt finds the version from it, so decrypt keeps working
//!   after rotation; because it is in the AAD, a changed byte is an InvalidCiphertextException.
//! * **CDIV** (spec, Appendix C): SHA-256 over `AAD || ciphertextMetadata || IV || ciphertext ||
//!   tag` ([`cdiv`]), computed from the encryption's output *before* that output is decrypted
//!   again and compared with the plaintext: assurance that a later decrypt succeeds. That check
//!   is a decrypt, so it needs the `decrypt` permission and a key that allows decrypt (an
//!   encrypt-only key refuses a CDIV request with InvalidKeyUsageException, as the reference
//!   test client expects).
//! * **keyUsage / keyStatus.** `ENCRYPT` and `DECRYPT` are listed when the key allows them and
//!   its algorithm is AES-256-GCM (`WRAP`/`UNWRAP` too when it allows those); an encrypt-only,
//!   decrypt-only or "impotent" key refuses what it does not allow with
//!   InvalidKeyUsageException. `DISABLED` when the key is disabled, deleted, quarantined or not
//!   yet valid; a merely expired key is `ENABLED` (it still decrypts; encrypt gets
//!   InvalidStateException).

use sha2::{Digest, Sha256};

use super::{Operation, sealed::Sealed};
use crate::{
    api::call::Call,
    error::{BrokerError, Invalid, NotFound},
    keys::{KeyState, Lifecycle, OpenItem, SealItem},
    model::{Algorithm, Dek, KeyName, KeyOp, KeyType, MAX_AAD_LEN, VersionId, now_ms},
    policy::Permission,
};

/// The ciphertext metadata format keybroker writes (and the AAD construction it stands for).
pub const CTM_FORMAT: u8 = 0x01;
/// The longest ciphertext metadata the spec allows.
pub const MAX_CTM_LEN: usize = 20;
/// The IV lengths the spec allows on decrypt (keybroker only ever makes 12-byte IVs).
pub const SPEC_IV_LENS: [usize; 2] = [12, 16];

/// What keybroker keeps with an XKS ciphertext: the version that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CiphertextMetadata(pub VersionId);

impl CiphertextMetadata {
    /// The 17 bytes sent as `ciphertextMetadata`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(17);
        v.push(CTM_FORMAT);
        v.extend_from_slice(self.0.as_bytes());
        v
    }

    /// Reads bytes that [`CiphertextMetadata::encode`] made (anything else: not ours).
    pub fn decode(b: &[u8]) -> Option<Self> {
        match b {
            [CTM_FORMAT, rest @ ..] => VersionId::from_slice(rest).map(Self),
            _ => None,
        }
    }
}

/// The AAD the spec has a proxy give the key manager: `len16(aad) || aad || len8(ctm) || ctm`.
/// The lengths make "AAD X, no metadata" and "AAD X minus its tail, metadata = that tail"
/// different. The callers bound `aad` to 8 KiB and `ctm` to 20 bytes.
pub fn xks_aad(aad: &[u8], ctm: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + aad.len() + ctm.len());
    out.extend_from_slice(&(aad.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(aad);
    out.push(ctm.len().min(u8::MAX as usize) as u8);
    out.extend_from_slice(ctm);
    out
}

/// The ciphertext data integrity value (spec, Appendix C): SHA-256 over the decoded `aad ||
/// ctm || iv || ciphertext || tag`, lengths not included.
pub fn cdiv(aad: &[u8], ctm: &[u8], iv: &[u8], ciphertext: &[u8], tag: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [aad, ctm, iv, ciphertext, tag] {
        h.update(part);
    }
    h.finalize().into()
}

/// An external key: `externalKeyId` under a prefix's tenant.
#[derive(Clone, Debug)]
pub struct XksKey {
    /// The tenant the URI prefix maps to.
    pub tenant: String,
    /// The `externalKeyId` of the URI.
    pub id: String,
}

impl XksKey {
    /// The key's name; a name keybroker cannot hold is a key that does not exist.
    fn name(&self) -> Result<KeyName, BrokerError> {
        KeyName::new(&self.tenant, &self.id)
            .map_err(|_| NotFound::Key(format!("{}/{}", self.tenant, self.id)).into())
    }
}

/// GetKeyMetadata.
pub struct XksMetadata {
    /// The key.
    pub key: XksKey,
}

/// What GetKeyMetadata answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XksKeyMetadata {
    /// `AES_256`, `RSA_2048`, ...
    pub key_spec: &'static str,
    /// `ENCRYPT`, `DECRYPT`, `WRAP`, `UNWRAP` (what the key allows and can do).
    pub key_usage: Vec<&'static str>,
    /// `ENABLED` or `DISABLED`.
    pub key_status: &'static str,
}

/// Encrypt.
pub struct XksEncrypt {
    /// The key.
    pub key: XksKey,
    /// The plaintext (1 byte to 64 KiB; the spec's minimum is 4,300).
    pub plaintext: Dek,
    /// `additionalAuthenticatedData` (at most 8,192 bytes), if given.
    pub aad: Option<Vec<u8>>,
    /// Whether `ciphertextDataIntegrityValueAlgorithm` (`SHA_256`) was given.
    pub cdiv: bool,
}

/// What Encrypt answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XksEncrypted {
    /// The ciphertext (as long as the plaintext).
    pub ciphertext: Vec<u8>,
    /// The 12-byte IV.
    pub iv: Vec<u8>,
    /// The 16-byte tag.
    pub tag: Vec<u8>,
    /// The ciphertext metadata ([`CiphertextMetadata`]).
    pub metadata: Vec<u8>,
    /// The CDIV, if asked for.
    pub cdiv: Option<[u8; 32]>,
}

/// Decrypt.
pub struct XksDecrypt {
    /// The key.
    pub key: XksKey,
    /// The ciphertext.
    pub ciphertext: Vec<u8>,
    /// The IV (12 or 16 bytes per the spec; keybroker made 12).
    pub iv: Vec<u8>,
    /// The tag (16 bytes).
    pub tag: Vec<u8>,
    /// `additionalAuthenticatedData`, if given.
    pub aad: Option<Vec<u8>>,
    /// `ciphertextMetadata`, if given.
    pub metadata: Option<Vec<u8>>,
}

/// GetHealthStatus.
pub struct XksHealth {
    /// `xksProxyFleetSize`: how many proxies (broker replicas) serve this endpoint.
    pub fleet_size: u32,
}

/// One external key manager's health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EkmDetail {
    /// The token's serial number.
    pub id: String,
    /// The token's manufacturer, model and library.
    pub model: String,
    /// `ACTIVE`, `DEGRADED` or `UNAVAILABLE`.
    pub health_status: &'static str,
}

/// What GetHealthStatus answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XksHealthReport {
    /// `xksProxyFleetSize`.
    pub fleet_size: u32,
    /// `xksProxyVendor`.
    pub vendor: String,
    /// `xksProxyModel`.
    pub model: String,
    /// `ekmVendor`.
    pub ekm_vendor: String,
    /// `ekmFleetDetails` (one token per broker).
    pub ekm: Vec<EkmDetail>,
}

fn key_spec(t: KeyType) -> &'static str {
    match t {
        KeyType::Aes256 => "AES_256",
        KeyType::Rsa2048 => "RSA_2048",
        KeyType::Rsa3072 => "RSA_3072",
        KeyType::Rsa4096 => "RSA_4096",
        KeyType::EcP256 => "ECC_NIST_P256",
        KeyType::EcP384 => "ECC_NIST_P384",
    }
}

fn check_aad(aad: &Option<Vec<u8>>) -> Result<&[u8], BrokerError> {
    let a = aad.as_deref().unwrap_or_default();
    if a.len() > MAX_AAD_LEN {
        return Err(Invalid::AadTooLong.into());
    }
    Ok(a)
}

impl Sealed for XksMetadata {}
impl Operation for XksMetadata {
    type Output = XksKeyMetadata;

    async fn run(self, call: &mut Call) -> Result<XksKeyMetadata, BrokerError> {
        let name = self.key.name()?;
        let grant = call.authorize(Permission::ReadMetadata, &name)?;
        let entry = call.keys().get(grant.key())?;
        let a = &entry.attributes;
        let now = now_ms();
        let mut key_usage = Vec::new();
        let payloads = entry.algorithm == Algorithm::Aes256Gcm;
        for (op, usage, ok) in [
            (KeyOp::Encrypt, "ENCRYPT", payloads),
            (KeyOp::Decrypt, "DECRYPT", payloads),
            (KeyOp::Wrap, "WRAP", true),
            (KeyOp::Unwrap, "UNWRAP", true),
        ] {
            if ok && a.operations.contains(&op) {
                key_usage.push(usage);
            }
        }
        let enabled = a.enabled
            && entry.lifecycle == Lifecycle::Active
            && entry.state == KeyState::Enabled
            && a.not_before_ms.is_none_or(|nb| now >= nb);
        if let Ok(v) = entry.current() {
            call.note_version(v.number);
        }
        Ok(XksKeyMetadata {
            key_spec: key_spec(entry.key_type),
            key_usage,
            key_status: if enabled { "ENABLED" } else { "DISABLED" },
        })
    }
}

impl Sealed for XksEncrypt {}
impl Operation for XksEncrypt {
    type Output = XksEncrypted;

    async fn run(self, call: &mut Call) -> Result<XksEncrypted, BrokerError> {
        let name = self.key.name()?;
        let aad = check_aad(&self.aad)?.to_vec();
        let grant = call.authorize(Permission::Encrypt, &name)?;
        // The CDIV's check is a decrypt: authorised as one, before any work.
        let check = if self.cdiv {
            Some((
                call.authorize(Permission::Decrypt, &name)?,
                self.plaintext.clone(),
            ))
        } else {
            None
        };
        let door_aad = aad.clone();
        let item = SealItem {
            grant,
            plaintext: self.plaintext,
            aad: Box::new(move |v| xks_aad(&door_aad, &CiphertextMetadata(v).encode())),
        };
        let sealed = super::one(call.keys().seal_detached(vec![item]).await)?;
        call.note_version(sealed.version);
        let metadata = CiphertextMetadata(sealed.version_id).encode();
        let out = XksEncrypted {
            ciphertext: sealed.ciphertext,
            iv: sealed.iv.to_vec(),
            tag: sealed.tag.to_vec(),
            cdiv: None,
            metadata,
        };
        let Some((grant, plaintext)) = check else {
            return Ok(out);
        };
        // Appendix C: the CDIV first, over the output as it will be sent; then that output
        // must decrypt to the plaintext.
        let value = cdiv(&aad, &out.metadata, &out.iv, &out.ciphertext, &out.tag);
        let item = OpenItem {
            grant,
            version_id: sealed.version_id,
            iv: out.iv.clone(),
            ciphertext: out.ciphertext.clone(),
            tag: out.tag.clone(),
            aad: xks_aad(&aad, &out.metadata),
        };
        let opened = super::one(call.keys().open_detached(vec![item]).await)?;
        if opened.plaintext != plaintext {
            return Err(BrokerError::internal(
                "an XKS ciphertext did not decrypt to its plaintext (CDIV check)",
            ));
        }
        Ok(XksEncrypted {
            cdiv: Some(value),
            ..out
        })
    }
}

impl Sealed for XksDecrypt {}
impl Operation for XksDecrypt {
    type Output = Dek;

    async fn run(self, call: &mut Call) -> Result<Dek, BrokerError> {
        let name = self.key.name()?;
        let aad = check_aad(&self.aad)?;
        if !SPEC_IV_LENS.contains(&self.iv.len()) {
            return Err(Invalid::Length {
                field: "initializationVector",
                expected: "12 or 16",
                got: self.iv.len(),
            }
            .into());
        }
        if self.tag.len() != 16 {
            return Err(Invalid::Length {
                field: "authenticationTag",
                expected: "16",
                got: self.tag.len(),
            }
            .into());
        }
        let metadata = self.metadata.unwrap_or_default();
        if metadata.len() > MAX_CTM_LEN {
            return Err(Invalid::Length {
                field: "ciphertextMetadata",
                expected: "at most 20",
                got: metadata.len(),
            }
            .into());
        }
        let grant = call.authorize(Permission::Decrypt, &name)?;
        // The key's existence before the ciphertext's validity: KeyNotFoundException first.
        call.keys().get(grant.key())?;
        let ctm =
            CiphertextMetadata::decode(&metadata).ok_or(BrokerError::UnauthenticCiphertext)?;
        let item = OpenItem {
            grant,
            version_id: ctm.0,
            iv: self.iv,
            ciphertext: self.ciphertext,
            tag: self.tag,
            aad: xks_aad(aad, &metadata),
        };
        let opened = super::one(call.keys().open_detached(vec![item]).await)?;
        call.note_version(opened.version);
        Ok(opened.plaintext)
    }
}

impl Sealed for XksHealth {}
impl Operation for XksHealth {
    type Output = XksHealthReport;

    async fn run(self, call: &mut Call) -> Result<XksHealthReport, BrokerError> {
        let hsm = call.keys().hsm().clone();
        // A real call through the session pool (C_GenerateRandom on a pooled, logged-in
        // session): the token answers now. The start-up probe already ran every mechanism's
        // known-answer test, and each key's canary proved its object.
        let answered = hsm.ping().await;
        let t = hsm.token();
        let health_status = match (answered, hsm.healthy()) {
            (Ok(()), true) => "ACTIVE",
            (Ok(()), false) => "DEGRADED",
            (Err(_), _) => "UNAVAILABLE",
        };
        Ok(XksHealthReport {
            fleet_size: self.fleet_size.max(1),
            vendor: "keybroker".into(),
            model: format!("keybroker {}", env!("CARGO_PKG_VERSION")),
            ekm_vendor: t.manufacturer.clone(),
            ekm: vec![EkmDetail {
                id: t.serial.clone(),
                model: format!("{} ({})", t.model, t.library),
                health_status,
            }],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_aad_carries_both_lengths() {
        assert_eq!(xks_aad(b"", b""), vec![0, 0, 0]);
        assert_eq!(xks_aad(b"ab", b"c"), vec![0, 2, b'a', b'b', 1, b'c']);
        // The spec's example: AAD then no metadata differs from the same bytes split.
        assert_ne!(xks_aad(b"abc", b""), xks_aad(b"ab", b"c"));
        let big = vec![7u8; 8192];
        let a = xks_aad(&big, &[1; 17]);
        assert_eq!(&a[..2], &[0x20, 0x00]);
        assert_eq!(a[2 + 8192], 17);
        assert_eq!(a.len(), 2 + 8192 + 1 + 17);
    }

    #[test]
    fn cdiv_matches_the_spec_appendix_c_example() {
        let aad = b"project=nile,department=marketing";
        let ctm = b"key_version=1";
        let iv = hex::decode("1ccae5470f39700254779031").expect("hex");
        let ct = hex::decode("821c642b5b71783367deaf18").expect("hex");
        let tag = hex::decode("bc1c4dda7707d6812447c5955e99b261").expect("hex");
        assert_eq!(
            hex::encode(cdiv(aad, ctm, &iv, &ct, &tag)),
            "a8703f2260bd8791ec2d15ea0b23e65a0631eedcf2a13a65cc82db3f47cf5ec7"
        );
    }

    #[test]
    fn ciphertext_metadata_round_trips_and_refuses_what_keybroker_did_not_make() {
        let m = CiphertextMetadata(VersionId([5; 16]));
        let b = m.encode();
        assert_eq!(b.len(), 17);
        assert!(b.len() <= MAX_CTM_LEN);
        assert_eq!(b[0], CTM_FORMAT);
        assert_eq!(CiphertextMetadata::decode(&b), Some(m));
        for bad in [
            &b""[..],
            &b[..16],
            &[&b[..], &[0]].concat(),
            &[&[2u8][..], &b[1..]].concat(),
        ] {
            assert_eq!(CiphertextMetadata::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn names_keybroker_cannot_hold_are_keys_that_do_not_exist() {
        for id in ["-x", ".x", &"a".repeat(65)] {
            let e = XksKey {
                tenant: "t".into(),
                id: id.into(),
            }
            .name()
            .expect_err("no such key");
            assert!(matches!(e, BrokerError::NotFound(NotFound::Key(_))), "{e}");
        }
        let ok = XksKey {
            tenant: "t".into(),
            id: "k.1-a_b".into(),
        };
        assert_eq!(ok.name().expect("valid").to_string(), "t/k.1-a_b");
    }
}
