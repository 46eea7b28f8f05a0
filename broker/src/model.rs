//! Domain types shared by every layer: key names, key types, algorithms, version ids and the
//! secret DEK type. Nothing here knows about PKCS#11 or gRPC.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// The tenant a key reference without a `/` belongs to.
pub const DEFAULT_TENANT: &str = "default";
/// The longest tenant or key name part.
pub const MAX_NAME_PART: usize = 64;

/// A key's full name: `tenant/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyName {
    tenant: String,
    name: String,
}

impl KeyName {
    /// Parses `tenant/name` or `name` (tenant `default`).
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if s.is_empty() {
            return Err(Invalid::Empty("key name"));
        }
        let (tenant, name) = match s.split_once('/') {
            Some((t, n)) => (t, n),
            None => (DEFAULT_TENANT, s),
        };
        validate_part("tenant", tenant)?;
        validate_part("key name", name)?;
        Ok(Self {
            tenant: tenant.into(),
            name: name.into(),
        })
    }

    /// Builds a name from already-validated parts.
    pub fn new(tenant: &str, name: &str) -> Result<Self, Invalid> {
        validate_part("tenant", tenant)?;
        validate_part("key name", name)?;
        Ok(Self {
            tenant: tenant.into(),
            name: name.into(),
        })
    }

    /// The tenant part.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The name part.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.name)
    }
}

/// Checks one part of a key name: 1-64 of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn validate_part(what: &'static str, s: &str) -> Result<(), Invalid> {
    if s.is_empty() {
        return Err(Invalid::Empty(what));
    }
    if s.len() > MAX_NAME_PART {
        return Err(Invalid::TooLong {
            what,
            max: MAX_NAME_PART,
        });
    }
    let ok_first = s.as_bytes()[0].is_ascii_alphanumeric();
    let ok_rest = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if !ok_first || !ok_rest {
        return Err(Invalid::Characters(what));
    }
    Ok(())
}

/// The kind of key material a KEK holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// AES-256 secret key.
    Aes256,
    /// RSA key pair, 2048-bit modulus.
    Rsa2048,
    /// RSA key pair, 3072-bit modulus.
    Rsa3072,
    /// RSA key pair, 4096-bit modulus.
    Rsa4096,
    /// EC key pair on NIST P-256 (secp256r1), for ECDSA signatures (ES256).
    EcP256,
    /// EC key pair on NIST P-384 (secp384r1), for ECDSA signatures (ES384).
    EcP384,
}

impl KeyType {
    /// The stable name used in the store and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Aes256 => "aes-256",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
        }
    }

    /// Parses [`KeyType::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "aes-256" => KeyType::Aes256,
            "rsa-2048" => KeyType::Rsa2048,
            "rsa-3072" => KeyType::Rsa3072,
            "rsa-4096" => KeyType::Rsa4096,
            "ec-p256" => KeyType::EcP256,
            "ec-p384" => KeyType::EcP384,
            _ => return None,
        })
    }

    /// The RSA modulus size in bits, for RSA types.
    pub fn rsa_bits(self) -> Option<u32> {
        match self {
            KeyType::Aes256 | KeyType::EcP256 | KeyType::EcP384 => None,
            KeyType::Rsa2048 => Some(2048),
            KeyType::Rsa3072 => Some(3072),
            KeyType::Rsa4096 => Some(4096),
        }
    }

    /// Whether this is an RSA type.
    pub fn is_rsa(self) -> bool {
        self.rsa_bits().is_some()
    }

    /// The curve of an EC type.
    pub fn curve(self) -> Option<Curve> {
        match self {
            KeyType::EcP256 => Some(Curve::P256),
            KeyType::EcP384 => Some(Curve::P384),
            _ => None,
        }
    }

    /// Whether this is an EC type.
    pub fn is_ec(self) -> bool {
        self.curve().is_some()
    }

    /// Whether the key is a key pair (RSA or EC): a private and a public object per version.
    pub fn is_pair(self) -> bool {
        self != KeyType::Aes256
    }
}

/// A NIST curve of an EC key type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Curve {
    /// P-256 (secp256r1, prime256v1).
    P256,
    /// P-384 (secp384r1).
    P384,
}

impl Curve {
    /// The size of a coordinate, of the order and of one half of a signature (r or s), in bytes.
    pub fn size(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
        }
    }

    /// The JWK (RFC 7518 §6.2.1.1) name.
    pub fn jwk_name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }

    /// The named-curve object identifier (RFC 5480 §2.1.1.1).
    pub fn oid(self) -> &'static str {
        match self {
            Curve::P256 => "1.2.840.10045.3.1.7",
            Curve::P384 => "1.3.132.0.34",
        }
    }
}

/// How a DEK is wrapped. The discriminant is the algorithm byte of the envelope and the value
/// of the proto `Algorithm` enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Algorithm {
    /// AES-256-GCM, 96-bit IV, 128-bit tag, AAD = envelope header || caller AAD.
    Aes256Gcm = 1,
    /// AES key wrap with padding, RFC 5649.
    AesKeyWrapPad = 2,
    /// RSA-OAEP, SHA-256, MGF1-SHA-256, empty label.
    RsaOaepSha256 = 3,
    /// RSA-OAEP, SHA-1, MGF1-SHA-1, empty label.
    RsaOaepSha1 = 4,
    /// RSA signatures (RS256/384/512: PKCS#1 v1.5; PS256/384/512: PSS) on an RSA signing key:
    /// the key signs and verifies, and never wraps, unwraps, encrypts or decrypts. Never an
    /// envelope byte.
    RsaSign = 5,
    /// ECDSA signatures (ES256 on P-256, ES384 on P-384) on an EC key: sign and verify only.
    /// Never an envelope byte.
    Ecdsa = 6,
    /// AES key wrap without padding, RFC 3394 (`CKM_AES_KEY_WRAP`): DEKs are always a multiple
    /// of 8 bytes (`check_dek_len`), so none is needed. Appended after the signing algorithms:
    /// the numbers are envelope bytes and proto values, and never change.
    AesKeyWrap = 7,
}

impl Algorithm {
    /// All algorithms: the wrapping ones (the AES key wraps together), then the signing ones.
    pub const ALL: [Algorithm; 7] = [
        Algorithm::Aes256Gcm,
        Algorithm::AesKeyWrapPad,
        Algorithm::AesKeyWrap,
        Algorithm::RsaOaepSha256,
        Algorithm::RsaOaepSha1,
        Algorithm::RsaSign,
        Algorithm::Ecdsa,
    ];

    /// The algorithms an envelope may name (the wrapping and encrypting ones).
    pub const ENVELOPE: [Algorithm; 5] = [
        Algorithm::Aes256Gcm,
        Algorithm::AesKeyWrapPad,
        Algorithm::RsaOaepSha256,
        Algorithm::RsaOaepSha1,
        Algorithm::AesKeyWrap,
    ];

    /// The envelope byte (the proto enum value for every algorithm).
    pub fn id(self) -> u8 {
        self as u8
    }

    /// Parses an envelope byte: a signing algorithm never names an envelope's key.
    pub fn from_id(b: u8) -> Option<Self> {
        Self::ENVELOPE.into_iter().find(|a| a.id() == b)
    }

    /// Whether keys of this algorithm sign and verify (and do nothing else).
    pub fn is_signing(self) -> bool {
        matches!(self, Algorithm::RsaSign | Algorithm::Ecdsa)
    }

    /// The stable name used in the store and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Aes256Gcm => "aes-256-gcm",
            Algorithm::AesKeyWrapPad => "aes-kwp",
            Algorithm::AesKeyWrap => "aes-kw",
            Algorithm::RsaOaepSha256 => "rsa-oaep-sha256",
            Algorithm::RsaOaepSha1 => "rsa-oaep-sha1",
            Algorithm::RsaSign => "rsa-sign",
            Algorithm::Ecdsa => "ecdsa",
        }
    }

    /// Parses [`Algorithm::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Whether the algorithm can serve a key of `key_type`.
    pub fn fits(self, key_type: KeyType) -> bool {
        match self {
            Algorithm::Aes256Gcm | Algorithm::AesKeyWrapPad | Algorithm::AesKeyWrap => {
                key_type == KeyType::Aes256
            }
            Algorithm::RsaOaepSha256 | Algorithm::RsaOaepSha1 | Algorithm::RsaSign => {
                key_type.is_rsa()
            }
            Algorithm::Ecdsa => key_type.is_ec(),
        }
    }

    /// Whether the algorithm binds caller AAD.
    pub fn supports_aad(self) -> bool {
        self == Algorithm::Aes256Gcm
    }

    /// Whether this is an AES key wrap (RFC 5649 or RFC 3394): it works on key objects only
    /// (`C_WrapKey`/`C_UnwrapKey`), so it never encrypts a payload.
    pub fn is_key_wrap(self) -> bool {
        matches!(self, Algorithm::AesKeyWrapPad | Algorithm::AesKeyWrap)
    }

    /// Whether this is an RSA-OAEP algorithm.
    pub fn is_rsa(self) -> bool {
        matches!(self, Algorithm::RsaOaepSha256 | Algorithm::RsaOaepSha1)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A signature algorithm of `Sign`/`Verify`, named as JWS names them (RFC 7518 §3.1) and as
/// Azure Managed HSM takes them. The caller sends the digest, not the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignAlgorithm {
    /// ECDSA on P-256 over a SHA-256 digest; the signature is r || s (64 bytes).
    Es256,
    /// ECDSA on P-384 over a SHA-384 digest; the signature is r || s (96 bytes).
    Es384,
    /// RSASSA-PKCS1-v1_5 over a SHA-256 digest.
    Rs256,
    /// RSASSA-PKCS1-v1_5 over a SHA-384 digest.
    Rs384,
    /// RSASSA-PKCS1-v1_5 over a SHA-512 digest.
    Rs512,
    /// RSASSA-PSS, SHA-256, MGF1-SHA-256, 32-byte salt.
    Ps256,
    /// RSASSA-PSS, SHA-384, MGF1-SHA-384, 48-byte salt.
    Ps384,
    /// RSASSA-PSS, SHA-512, MGF1-SHA-512, 64-byte salt.
    Ps512,
}

/// The hash a signature algorithm signs a digest of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignHash {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl SignHash {
    /// The digest length in bytes.
    pub fn size(self) -> usize {
        match self {
            SignHash::Sha256 => 32,
            SignHash::Sha384 => 48,
            SignHash::Sha512 => 64,
        }
    }

    /// The DER `DigestInfo` prefix of RSASSA-PKCS1-v1_5 (RFC 8017 §9.2, note 1): the prefix
    /// followed by the digest is what the token pads and signs with `CKM_RSA_PKCS`.
    pub fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            SignHash::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            SignHash::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
            SignHash::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x03, 0x05, 0x00, 0x04, 0x40,
            ],
        }
    }
}

impl SignAlgorithm {
    /// Every signature algorithm.
    pub const ALL: [SignAlgorithm; 8] = [
        SignAlgorithm::Es256,
        SignAlgorithm::Es384,
        SignAlgorithm::Rs256,
        SignAlgorithm::Rs384,
        SignAlgorithm::Rs512,
        SignAlgorithm::Ps256,
        SignAlgorithm::Ps384,
        SignAlgorithm::Ps512,
    ];

    /// The JWS name (`ES256`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SignAlgorithm::Es256 => "ES256",
            SignAlgorithm::Es384 => "ES384",
            SignAlgorithm::Rs256 => "RS256",
            SignAlgorithm::Rs384 => "RS384",
            SignAlgorithm::Rs512 => "RS512",
            SignAlgorithm::Ps256 => "PS256",
            SignAlgorithm::Ps384 => "PS384",
            SignAlgorithm::Ps512 => "PS512",
        }
    }

    /// Parses [`SignAlgorithm::as_str`] (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
    }

    /// The hash whose digest the caller sends.
    pub fn hash(self) -> SignHash {
        match self {
            SignAlgorithm::Es256 | SignAlgorithm::Rs256 | SignAlgorithm::Ps256 => SignHash::Sha256,
            SignAlgorithm::Es384 | SignAlgorithm::Rs384 | SignAlgorithm::Ps384 => SignHash::Sha384,
            SignAlgorithm::Rs512 | SignAlgorithm::Ps512 => SignHash::Sha512,
        }
    }

    /// The digest length the caller must send, in bytes.
    pub fn digest_len(self) -> usize {
        self.hash().size()
    }

    /// Whether this is a PSS algorithm.
    pub fn is_pss(self) -> bool {
        matches!(
            self,
            SignAlgorithm::Ps256 | SignAlgorithm::Ps384 | SignAlgorithm::Ps512
        )
    }

    /// Whether a key of `key_type` (and key algorithm `algorithm`) signs with it: ES256 on
    /// P-256 keys, ES384 on P-384 keys (as JWS pairs them), RS*/PS* on RSA signing keys.
    pub fn fits(self, key_type: KeyType, algorithm: Algorithm) -> bool {
        match self {
            SignAlgorithm::Es256 => key_type == KeyType::EcP256 && algorithm == Algorithm::Ecdsa,
            SignAlgorithm::Es384 => key_type == KeyType::EcP384 && algorithm == Algorithm::Ecdsa,
            _ => key_type.is_rsa() && algorithm == Algorithm::RsaSign,
        }
    }
}

impl fmt::Display for SignAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The 16-byte id of a key version: carried in every envelope and used as the HSM object's
/// `CKA_ID`. Random (UUID v4), so ids never collide across keys, tenants or replicas.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VersionId(pub [u8; 16]);

impl VersionId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(*uuid::Uuid::new_v4().as_bytes())
    }

    /// Parses 16 bytes.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Some(Self(b.try_into().ok()?))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Lower-case hex.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VersionId({})", self.hex())
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// The smallest DEK accepted.
pub const MIN_DEK_LEN: usize = 16;
/// The largest DEK accepted.
pub const MAX_DEK_LEN: usize = 64;
/// The DEK length `GenerateDataKey` uses when none is asked for.
pub const DEFAULT_DEK_LEN: usize = 32;
/// The largest caller AAD accepted.
pub const MAX_AAD_LEN: usize = 8192;
/// The largest payload `Encrypt` takes (and `Decrypt` returns): 64 KiB. Payload encryption is
/// for small secrets (tokens, passwords, other systems' keys, the 4,300-byte data keys of the
/// AWS XKS door); bulk data is encrypted locally under a DEK (envelope encryption, the SDK).
/// The bound keeps one payload inside one single-part PKCS#11 call, whose input size tokens
/// limit (each to its own figure), and keeps a request well inside the 1 MiB gRPC message limit
/// with its AAD.
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;
/// The most plaintext one batch of `Encrypt` items carries in total: its reply (each payload
/// plus its envelope's header and tag, or an RSA block) must fit the 1 MiB message limit too.
pub const MAX_BATCH_PAYLOAD: usize = 512 * 1024;

/// Checks a DEK length: 16-64 bytes and a multiple of 8 (RFC 5649 on SoftHSM2 zero-pads other
/// lengths, which would change the DEK on unwrap; one rule for every algorithm keeps envelopes
/// interchangeable).
pub fn check_dek_len(len: usize) -> Result<(), Invalid> {
    if len == 0 {
        return Err(Invalid::DekEmpty);
    }
    if !(MIN_DEK_LEN..=MAX_DEK_LEN).contains(&len) || !len.is_multiple_of(8) {
        return Err(Invalid::DekLength(len));
    }
    Ok(())
}

/// A plaintext DEK (or any secret byte string): erased from memory when dropped, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct Dek(Vec<u8>);

impl Dek {
    /// Takes ownership of the bytes (the caller's buffer is moved, not copied).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Copies the bytes out of a slice.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Moves the bytes out into a plain `Vec` (for a reply message). The caller takes over the
    /// duty of erasing them.
    pub fn into_vec(mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dek([REDACTED; {} bytes])", self.0.len())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// One permission (a Managed-HSM "data action").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// Read key metadata (GetKey, ListKeys, GetPublicKey, ListKeyVersions...).
    ReadMetadata,
    /// Create keys.
    Create,
    /// Change key attributes.
    Update,
    /// Rotate keys.
    Rotate,
    /// Import keys (BYOK).
    Import,
    /// Back keys up.
    Backup,
    /// Restore keys.
    Restore,
    /// Soft-delete keys.
    Delete,
    /// Recover soft-deleted keys.
    Recover,
    /// Purge (destroy) keys.
    Purge,
    /// Destroy old key versions.
    TrimVersions,
    /// Wrap (WrapKey, GenerateDataKey, the wrap half of Rewrap).
    Wrap,
    /// Unwrap (UnwrapKey, the unwrap half of Rewrap).
    Unwrap,
    /// Encrypt payloads (Encrypt, XKS encrypt).
    Encrypt,
    /// Decrypt payloads (Decrypt, XKS decrypt).
    Decrypt,
    /// Read the audit trail.
    ReadAudit,
    /// Connect/disconnect HYOK service identities.
    HyokControl,
    /// Random bytes from the HSM's RNG (GetRandomBytes).
    Random,
    /// Sign digests (Sign).
    Sign,
    /// Verify signatures (Verify).
    Verify,
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Permission::ReadMetadata => "read metadata",
            Permission::Create => "create",
            Permission::Update => "update",
            Permission::Rotate => "rotate",
            Permission::Import => "import",
            Permission::Backup => "backup",
            Permission::Restore => "restore",
            Permission::Delete => "delete",
            Permission::Recover => "recover",
            Permission::Purge => "purge",
            Permission::TrimVersions => "trim versions",
            Permission::Wrap => "wrap",
            Permission::Unwrap => "unwrap",
            Permission::Encrypt => "encrypt",
            Permission::Decrypt => "decrypt",
            Permission::Random => "random",
            Permission::Sign => "sign",
            Permission::Verify => "verify",
            Permission::ReadAudit => "read audit",
            Permission::HyokControl => "HYOK control",
        };
        f.write_str(s)
    }
}

/// A justification reason code (mirrors the proto enum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum Reason {
    CustomerInitiatedAccess,
    CustomerInitiatedSupport,
    CustomerAuthorizedWorkflow,
    ProviderInitiatedService,
    ProviderInitiatedReview,
    ProviderInternalMaintenance,
    ProviderResponseToAlert,
    ThirdPartyDataRequest,
    ReasonNotExpected,
}

impl Reason {
    /// From the proto enum value (0 = none).
    pub fn from_proto(v: i32) -> Option<Self> {
        use Reason::*;
        Some(match v {
            1 => CustomerInitiatedAccess,
            2 => CustomerInitiatedSupport,
            3 => CustomerAuthorizedWorkflow,
            4 => ProviderInitiatedService,
            5 => ProviderInitiatedReview,
            6 => ProviderInternalMaintenance,
            7 => ProviderResponseToAlert,
            8 => ThirdPartyDataRequest,
            9 => ReasonNotExpected,
            _ => return None,
        })
    }

    /// The proto/config name.
    pub fn as_str(self) -> &'static str {
        use Reason::*;
        match self {
            CustomerInitiatedAccess => "CUSTOMER_INITIATED_ACCESS",
            CustomerInitiatedSupport => "CUSTOMER_INITIATED_SUPPORT",
            CustomerAuthorizedWorkflow => "CUSTOMER_AUTHORIZED_WORKFLOW",
            ProviderInitiatedService => "PROVIDER_INITIATED_SERVICE",
            ProviderInitiatedReview => "PROVIDER_INITIATED_REVIEW",
            ProviderInternalMaintenance => "PROVIDER_INTERNAL_MAINTENANCE",
            ProviderResponseToAlert => "PROVIDER_RESPONSE_TO_ALERT",
            ThirdPartyDataRequest => "THIRD_PARTY_DATA_REQUEST",
            ReasonNotExpected => "REASON_NOT_EXPECTED",
        }
    }
}

/// What was wrong with a request (a field, a name, a size): the domain's own checks say it in
/// these terms, and `error::BrokerError::Invalid` carries it to the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A name part (`tenant`, `key name`, ...) is empty.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// A name part is longer than allowed.
    #[error("{what} is longer than {max} characters")]
    TooLong {
        /// Which part.
        what: &'static str,
        /// The most allowed.
        max: usize,
    },
    /// A name part has characters outside `[A-Za-z0-9._-]` or a bad first character.
    #[error(
        "{0} may only contain letters, digits, '.', '_' and '-', and must start with a letter or digit"
    )]
    Characters(&'static str),
    /// A field of the request is wrong (the inner error says how).
    #[error("{field}: {error}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        error: Box<Invalid>,
    },
    /// Free text longer than allowed or with control characters.
    #[error("{what} must be at most {max} printable characters")]
    Text {
        /// Which field.
        what: &'static str,
        /// The most characters.
        max: usize,
    },
    /// An enum value this broker does not know.
    #[error("unknown {field} {value}")]
    Unknown {
        /// Which field (`algorithm`, `key_type`, ...).
        field: &'static str,
        /// The value.
        value: i32,
    },
    /// A required field is missing.
    #[error("{0} is required")]
    Missing(&'static str),
    /// An empty DEK.
    #[error("the DEK is empty")]
    DekEmpty,
    /// A DEK of a length keybroker does not wrap.
    #[error(
        "the DEK is {0} bytes; it must be {MIN_DEK_LEN} to {MAX_DEK_LEN} bytes and a multiple of 8"
    )]
    DekLength(usize),
    /// Too much AAD.
    #[error("aad is longer than {MAX_AAD_LEN} bytes")]
    AadTooLong,
    /// AAD for a key whose algorithm cannot bind it.
    #[error(
        "key {key} uses {algorithm}, which cannot bind aad; send no aad or use an AES-256-GCM key"
    )]
    AadUnsupported {
        /// The key.
        key: KeyName,
        /// Its algorithm.
        algorithm: Algorithm,
    },
    /// Neither an envelope nor a raw ciphertext.
    #[error("set envelope or raw")]
    NoCiphertext,
    /// A raw ciphertext without the key it is for.
    #[error("key is required with a raw ciphertext")]
    RawWithoutKey,
    /// A raw ciphertext with AAD.
    #[error("a raw RSA-OAEP ciphertext cannot carry aad")]
    RawWithAad,
    /// An empty payload to encrypt.
    #[error("the plaintext is empty")]
    PayloadEmpty,
    /// A payload larger than keybroker encrypts.
    #[error(
        "the plaintext is {0} bytes; at most {MAX_PAYLOAD_LEN} bytes are encrypted in one call"
    )]
    PayloadTooLarge(usize),
    /// A payload larger than an RSA-OAEP block of the key holds.
    #[error(
        "key {key} ({algorithm}) encrypts at most {max} bytes in one RSA-OAEP block; the plaintext is {got} bytes"
    )]
    RsaPayloadTooLarge {
        /// The key.
        key: KeyName,
        /// Its algorithm.
        algorithm: Algorithm,
        /// The most the block holds.
        max: usize,
        /// The plaintext's length.
        got: usize,
    },
    /// A batch of payloads larger in total than its reply may be.
    #[error(
        "a batch carries at most {MAX_BATCH_PAYLOAD} bytes of plaintext in total, not {0} (split it)"
    )]
    BatchPayload(usize),
    /// A field that is not valid Base64.
    #[error("{0} is not valid Base64")]
    Base64(&'static str),
    /// A body that is not the JSON the API expects (the parser says where).
    #[error("the request body is not valid: {0}")]
    Body(String),
    /// A field whose value the API does not define.
    #[error("{field} must be {expected}")]
    Value {
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// A binary field of the wrong length.
    #[error("{field} must be {expected} bytes, not {got}")]
    Length {
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
        /// What came.
        got: usize,
    },
    /// A raw ciphertext naming a non-RSA algorithm.
    #[error("a raw ciphertext must name RSA_OAEP_SHA256 or RSA_OAEP_SHA1")]
    RawNotRsa,
    /// A raw ciphertext naming another algorithm than its key's.
    #[error("key {key} uses {algorithm}; a raw ciphertext for it must use the same algorithm")]
    RawAlgorithm {
        /// The key.
        key: KeyName,
        /// Its algorithm.
        algorithm: Algorithm,
    },
    /// A raw ciphertext without its key version.
    #[error("a raw ciphertext must name its key version (from GetPublicKey)")]
    RawWithoutVersion,
    /// A batch of no items or too many.
    #[error("a batch has 1 to {max} items, not {got}")]
    BatchSize {
        /// The most items.
        max: usize,
        /// How many came.
        got: usize,
    },
    /// A page larger than allowed.
    #[error("page_size {got} is more than {max}")]
    PageSize {
        /// The largest page.
        max: u32,
        /// What was asked.
        got: u32,
    },
    /// A page token this broker did not issue.
    #[error("page_token is not one this broker issued")]
    PageToken,
    /// A time field below zero.
    #[error("{0} must not be negative")]
    Negative(&'static str),
    /// A time attribute that is not positive.
    #[error("{0} must be positive (0 means unset)")]
    NotPositive(&'static str),
    /// Times given without `set_times`.
    #[error("set set_times to change not_before/expires/rotation_period/version_expiry")]
    TimesWithoutSetTimes,
    /// `expires` not after `not_before`.
    #[error("expires must be after not-before")]
    ExpiresBeforeNotBefore,
    /// A rotation period under a second.
    #[error("rotation_period_ms must be at least 1000")]
    RotationTooShort,
    /// Too many tags.
    #[error("a key has at most {0} tags")]
    TooManyTags(usize),
    /// A tag name or value of a bad length.
    #[error("tag names must be 1-{0} characters and values at most {0}")]
    TagLength(usize),
    /// A tag with control characters.
    #[error("tags may not contain control characters")]
    TagControl,
    /// A minimum decryption version of 0.
    #[error("min_decryption_version starts at 1")]
    MinVersionZero,
    /// A new key with a minimum decryption version other than 1.
    #[error("a new key's min_decryption_version is 1")]
    NewKeyMinVersion,
    /// A new key whose operations were given as an empty list.
    #[error(
        "operations: name at least one operation, or leave operations unset for the algorithm's defaults"
    )]
    NoOperations,
    /// A minimum decryption version that names no version.
    #[error("min_decryption_version must be between 1 and the current version {current}")]
    MinVersionRange {
        /// The newest version.
        current: u32,
    },
    /// An algorithm that does not fit the key type.
    #[error("algorithm {algorithm} cannot be used with key type {}", key_type.as_str())]
    AlgorithmForType {
        /// The algorithm.
        algorithm: Algorithm,
        /// The key type.
        key_type: KeyType,
    },
    /// An import key that is not RSA 3072/4096.
    #[error("an import key is RSA_3072 or RSA_4096")]
    ImportKeyType,
    /// Key material to import that is not AES-256.
    #[error("ImportKey takes AES_256 key material")]
    ImportMaterialType,
    /// Too much key material.
    #[error("wrapped_material is larger than {0} bytes")]
    MaterialTooLarge(usize),
    /// An import key id that is not one.
    #[error("import_key_id is malformed")]
    ImportKeyId,
    /// An import key made for another algorithm.
    #[error("import key {id} imports {made_for} keys, not {asked}")]
    ImportAlgorithm {
        /// The import key.
        id: String,
        /// What it was made for.
        made_for: Algorithm,
        /// What the request asked for.
        asked: Algorithm,
    },
    /// Import key made for an algorithm that is not AES.
    #[error("an import key imports AES-256 keys: aes-256-gcm, aes-kwp or aes-kw, not {0}")]
    ImportKeyAlgorithm(Algorithm),
    /// Wrapped material in the two-step RSA-AES format.
    #[error(
        "wrapped_material is {got} bytes: the two-step RSA-AES format (RSA-OAEP of an ephemeral key, then RFC 5649) is refused because the holder of the HSM's PIN could open it; encrypt the 32-byte key itself with RSA-OAEP ({modulus} bytes)"
    )]
    TwoStepMaterial {
        /// What came.
        got: usize,
        /// The import key's modulus size.
        modulus: usize,
    },
    /// Key material that does not unwrap with its import key.
    #[error("the wrapped key material does not unwrap with this import key: {0}")]
    MaterialDoesNotUnwrap(String),
    /// A backup blob that does not parse.
    #[error("the backup blob is malformed: {0}")]
    BackupMalformed(String),
    /// A digest whose length is not the signature algorithm's hash length.
    #[error(
        "digest is {got} bytes, but {algorithm} signs a {}-byte {} digest (send the hash of the message, not the message)",
        algorithm.digest_len(), match algorithm.hash() { SignHash::Sha256 => "SHA-256", SignHash::Sha384 => "SHA-384", SignHash::Sha512 => "SHA-512" }
    )]
    DigestLength {
        /// The algorithm.
        algorithm: SignAlgorithm,
        /// What came.
        got: usize,
    },
    /// Key operations a key of this algorithm can never do.
    #[error(
        "a {algorithm} key cannot allow {op}: signing keys (rsa-sign, ecdsa) allow only sign and verify, and other keys never sign or verify"
    )]
    OperationForAlgorithm {
        /// The key's algorithm.
        algorithm: Algorithm,
        /// The operation.
        op: &'static str,
    },
    /// A backup blob whose MAC does not verify (or whose name is not the one authorised).
    #[error("the backup blob failed authentication: it was changed after BackupKey made it")]
    BackupForged,
}

/// What a key of this type and algorithm does sign with, for [`Invalid::SignAlgorithmForKey`].
pub(crate) fn sign_hint(key_type: KeyType, algorithm: Algorithm) -> String {
    let fit: Vec<&str> = SignAlgorithm::ALL
        .into_iter()
        .filter(|a| a.fits(key_type, algorithm))
        .map(SignAlgorithm::as_str)
        .collect();
    if fit.is_empty() {
        " (it is not a signing key)".into()
    } else {
        format!(" (it signs with {})", fit.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_double_keys_members_are_stored_in_the_attributes_and_old_rows_still_load() {
        let old: KeyAttributes = serde_json::from_str(r#"{"enabled":true}"#).expect("old row");
        assert!(old.double.is_none() && old.in_hsm());
        let a = KeyAttributes {
            double: Some(DoubleRef {
                local: "acme/provider-kek".into(),
                external: "acme/customer-kek".into(),
            }),
            ..Default::default()
        };
        let json = serde_json::to_string(&a).expect("json");
        assert!(
            json.contains(r#""double":{"local":"acme/provider-kek""#),
            "{json}"
        );
        let back: KeyAttributes = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, a);
        assert!(!back.in_hsm());
        // A local key's attributes do not mention it.
        let plain = serde_json::to_string(&KeyAttributes::default()).expect("json");
        assert!(!plain.contains("double"), "{plain}");
    }

    #[test]
    fn key_name_defaults_tenant_and_rejects_bad_parts() {
        let k = KeyName::parse("payments").expect("valid");
        assert_eq!(k.to_string(), "default/payments");
        let k = KeyName::parse("acme/db-kek_1.0").expect("valid");
        assert_eq!((k.tenant(), k.name()), ("acme", "db-kek_1.0"));
        for bad in ["", "/x", "x/", "a/b/c", "-x", "a b", "ä", &"x".repeat(65)] {
            assert!(KeyName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn dek_debug_is_redacted() {
        let d = Dek::from_slice(&[0x41; 32]);
        let s = format!("{d:?}");
        assert_eq!(s, "Dek([REDACTED; 32 bytes])");
        assert!(!s.contains("41") && !s.contains("65"));
    }

    #[test]
    fn dek_lengths() {
        for ok in [16, 24, 32, 40, 48, 56, 64] {
            assert!(check_dek_len(ok).is_ok(), "{ok}");
        }
        for bad in [0, 1, 8, 15, 17, 20, 31, 33, 72, 4096] {
            assert!(check_dek_len(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn algorithm_ids_round_trip() {
        for a in Algorithm::ENVELOPE {
            assert_eq!(Algorithm::from_id(a.id()), Some(a));
        }
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::parse(a.as_str()), Some(a));
        }
        assert_eq!(Algorithm::from_id(0), None);
        // A signing algorithm never names an envelope's key.
        assert_eq!(Algorithm::from_id(5), None);
        assert_eq!(Algorithm::from_id(6), None);
        // RFC 3394 was appended: its byte is 7, and the existing bytes did not move.
        assert_eq!(Algorithm::from_id(7), Some(Algorithm::AesKeyWrap));
        assert_eq!(Algorithm::from_id(2), Some(Algorithm::AesKeyWrapPad));
        assert_eq!(Algorithm::parse("aes-kw"), Some(Algorithm::AesKeyWrap));
        assert!(Algorithm::AesKeyWrap.fits(KeyType::Aes256));
        assert!(!Algorithm::AesKeyWrap.fits(KeyType::Rsa3072));
        assert!(!Algorithm::AesKeyWrap.supports_aad() && !Algorithm::AesKeyWrap.is_signing());
        assert_eq!(Algorithm::from_id(8), None);
    }

    #[test]
    fn signature_algorithms_fit_their_keys_and_digests() {
        use SignAlgorithm::*;
        for a in SignAlgorithm::ALL {
            assert_eq!(SignAlgorithm::parse(a.as_str()), Some(a));
            assert_eq!(a.hash().digest_info_prefix().len(), 19);
            // The prefix ends with OCTET STRING of the digest's length.
            assert_eq!(
                a.hash().digest_info_prefix()[18] as usize,
                a.digest_len(),
                "{a}"
            );
        }
        assert_eq!(SignAlgorithm::parse("es256"), Some(Es256));
        assert!(Es256.fits(KeyType::EcP256, Algorithm::Ecdsa));
        assert!(!Es256.fits(KeyType::EcP384, Algorithm::Ecdsa));
        assert!(Es384.fits(KeyType::EcP384, Algorithm::Ecdsa));
        for rsa in [Rs256, Rs384, Rs512, Ps256, Ps384, Ps512] {
            assert!(rsa.fits(KeyType::Rsa2048, Algorithm::RsaSign));
            // A wrapping key never signs.
            assert!(!rsa.fits(KeyType::Rsa2048, Algorithm::RsaOaepSha256));
        }
        assert!(KeyOp::Sign.fits(Algorithm::Ecdsa) && !KeyOp::Wrap.fits(Algorithm::Ecdsa));
        assert!(!KeyOp::Sign.fits(Algorithm::RsaOaepSha256));
        assert!(!KeyOp::Decrypt.fits(Algorithm::RsaSign));
        assert!(!Algorithm::Ecdsa.fits(KeyType::Aes256));
        assert!(!Algorithm::Aes256Gcm.fits(KeyType::EcP256));
    }
}

/// An operation a key may allow (proto `KeyOperation`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum KeyOp {
    /// WrapKey.
    Wrap,
    /// UnwrapKey.
    Unwrap,
    /// GenerateDataKey.
    GenerateDataKey,
    /// Rewrap (as the source).
    Rewrap,
    /// Encrypt a payload (Encrypt, and the XKS door's encrypt).
    Encrypt,
    /// Decrypt a payload (Decrypt, and the XKS door's decrypt).
    Decrypt,
    /// Sign a digest (signing keys only).
    Sign,
    /// Verify a signature (signing keys only).
    Verify,
}

impl KeyOp {
    /// Every operation.
    pub const ALL: [KeyOp; 8] = [
        KeyOp::Wrap,
        KeyOp::Unwrap,
        KeyOp::GenerateDataKey,
        KeyOp::Rewrap,
        KeyOp::Encrypt,
        KeyOp::Decrypt,
        KeyOp::Sign,
        KeyOp::Verify,
    ];

    /// What a new signing key (RSA_SIGN, ECDSA) allows when its creator names no operations,
    /// and all it may ever allow.
    pub const SIGNING: [KeyOp; 2] = [KeyOp::Sign, KeyOp::Verify];

    /// What an external key does (and allows by default): the rest needs the key in this
    /// broker's HSM.
    pub const EXTERNAL: [KeyOp; 3] = [KeyOp::Wrap, KeyOp::Unwrap, KeyOp::GenerateDataKey];

    /// Whether a key of `algorithm` can ever do this operation: a signing key only signs and
    /// verifies, any other key never does (separate key types, separate HSM templates).
    pub fn fits(self, algorithm: Algorithm) -> bool {
        Self::SIGNING.contains(&self) == algorithm.is_signing()
    }

    /// What a new key allows when its creator names no operations: the key-wrapping ones.
    /// Payload encryption (`encrypt`, `decrypt`) is asked for by name: a KEK made to wrap DEKs
    /// does not also decrypt whatever a caller hands it unless its owner says so (least
    /// privilege, and the role table keeps the two apart as well). Keys stored before these two
    /// operations existed keep exactly the operations they had.
    pub const DEFAULT: [KeyOp; 4] = [
        KeyOp::Wrap,
        KeyOp::Unwrap,
        KeyOp::GenerateDataKey,
        KeyOp::Rewrap,
    ];

    /// The name used in messages and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOp::Wrap => "wrap",
            KeyOp::Unwrap => "unwrap",
            KeyOp::GenerateDataKey => "generate-data-key",
            KeyOp::Rewrap => "rewrap",
            KeyOp::Encrypt => "encrypt",
            KeyOp::Decrypt => "decrypt",
            KeyOp::Sign => "sign",
            KeyOp::Verify => "verify",
        }
    }

    /// Parses [`KeyOp::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// The most tags a key may carry.
pub const MAX_TAGS: usize = 15;
/// The longest tag name or value, in characters.
pub const MAX_TAG_LEN: usize = 256;
/// The most versions a key may have.
pub const MAX_VERSIONS: usize = 100;

/// A key's attributes (stored as JSON; every field has a default so old rows load).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct KeyAttributes {
    /// Whether the key may be used at all.
    pub enabled: bool,
    /// Refuse everything before this time (ms).
    pub not_before_ms: Option<i64>,
    /// After this time refuse wrap/generate (unwrap still works).
    pub expires_ms: Option<i64>,
    /// Allowed operations.
    pub operations: std::collections::BTreeSet<KeyOp>,
    /// Tags.
    pub tags: std::collections::BTreeMap<String, String>,
    /// Versions below this refuse to unwrap.
    pub min_decryption_version: u32,
    /// Purge protection (never turned off once on).
    pub purge_protection: bool,
    /// Automatic rotation period (ms).
    pub rotation_period_ms: Option<i64>,
    /// Expiry of versions created by rotation (ms after creation).
    pub version_expiry_ms: Option<i64>,
    /// An external key's reference: its versions live behind a remote EKM proxy, not in this
    /// broker's HSM (`None`: a local key). Set at creation, never changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalRef>,
    /// A double key's members: a DEK it wraps is split in two shares, one wrapped under each
    /// (`None`: not a double key). Set at creation, never changed (`docs/src/dke.md`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub double: Option<DoubleRef>,
}

impl KeyAttributes {
    /// Whether the key's versions are objects in this broker's HSM: not for an external key
    /// (its versions are behind its proxy) nor a double key (its members hold the material).
    pub fn in_hsm(&self) -> bool {
        self.external.is_none() && self.double.is_none()
    }
}

/// A double key's two members (full names, in the double key's own tenant): a local AES-256-GCM
/// key of this broker and an external key (`docs/src/dke.md`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoubleRef {
    /// The local key (in this broker's HSM).
    pub local: String,
    /// The external key (behind its proxy).
    pub external: String,
}

/// Where an external key lives: a remote EKM proxy named in the configuration
/// (`[[external_proxy]]`) and the key's name there (`docs/src/external-keys.md`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalRef {
    /// The `[[external_proxy]]` name.
    pub proxy: String,
    /// The key's name at the proxy (`{key-name}` of the EKM API).
    pub remote_key: String,
}

impl Default for KeyAttributes {
    fn default() -> Self {
        Self {
            enabled: true,
            not_before_ms: None,
            expires_ms: None,
            operations: KeyOp::DEFAULT.into_iter().collect(),
            tags: Default::default(),
            min_decryption_version: 1,
            purge_protection: false,
            rotation_period_ms: None,
            version_expiry_ms: None,
            external: None,
            double: None,
        }
    }
}

impl KeyAttributes {
    /// Checks limits: tags, time order, positive periods.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.tags.len() > MAX_TAGS {
            return Err(Invalid::TooManyTags(MAX_TAGS));
        }
        for (k, v) in &self.tags {
            if k.is_empty() || k.chars().count() > MAX_TAG_LEN || v.chars().count() > MAX_TAG_LEN {
                return Err(Invalid::TagLength(MAX_TAG_LEN));
            }
            if k.chars().chain(v.chars()).any(char::is_control) {
                return Err(Invalid::TagControl);
            }
        }
        if let (Some(nb), Some(exp)) = (self.not_before_ms, self.expires_ms)
            && exp <= nb
        {
            return Err(Invalid::ExpiresBeforeNotBefore);
        }
        for (what, v) in [
            ("not_before_ms", self.not_before_ms),
            ("expires_ms", self.expires_ms),
            ("rotation_period_ms", self.rotation_period_ms),
            ("version_expiry_ms", self.version_expiry_ms),
        ] {
            if v.is_some_and(|v| v <= 0) {
                return Err(Invalid::NotPositive(what));
            }
        }
        if self.rotation_period_ms.is_some_and(|p| p < 1000) {
            return Err(Invalid::RotationTooShort);
        }
        if self.min_decryption_version == 0 {
            return Err(Invalid::MinVersionZero);
        }
        Ok(())
    }
}

/// Where a version's key material came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Generated inside the HSM.
    Generated,
    /// Imported (BYOK), unwrapped inside the HSM.
    Imported,
}

impl Origin {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Generated => "generated",
            Origin::Imported => "imported",
        }
    }

    /// Parses [`Origin::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "generated" => Some(Origin::Generated),
            "imported" => Some(Origin::Imported),
            _ => None,
        }
    }
}
