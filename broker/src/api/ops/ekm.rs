//! The Azure Managed HSM EKM proxy API (`0.1-preview`)'s four operations — proxy info, key
//! metadata, wrap key, unwrap key — as pipeline operations (the public reference is
//! `external-key-management-proxy-api-reference.md` of `MicrosoftDocs/azure-security-docs`;
//! the codec is `api::ekm`, the page `docs/src/ekm.md`).
//!
//! * **Keys.** A path prefix maps to a tenant; `{key-name}` names a key of that tenant. A name
//!   keybroker cannot hold is a key that does not exist (404).
//! * **Algorithms.** Each keybroker key has one wrapping algorithm, and an EKM request must
//!   name it: `A256KWP` for an `aes-kwp` key (RFC 5649), `A256KW` for an `aes-kw` key
//!   (RFC 3394), `RSA-OAEP-256` for an `rsa-oaep-sha256` key, `RSA-OAEP` for an `rsa-oaep-sha1`
//!   key. Anything else — another key's algorithm, `A256KW` on an `aes-kwp` key or the reverse —
//!   is refused before the HSM is called (400 `UnsupportedAlgorithm`). An AES-256-GCM key has
//!   no EKM algorithm at all: its metadata is refused the same way.
//! * **Raw outputs.** The reference wants the algorithm's standard output, so that any library
//!   unwraps it with the same key material: wrap answers the ciphertext of keybroker's envelope
//!   without its header (`envelope.rs`: for KWP the RFC 5649 output, for KW the RFC 3394
//!   output, for OAEP the one modulus-sized block). Unwrap rebuilds the envelope for the key's
//!   versions, newest first, until one unwraps (the key wraps' integrity checks and OAEP's
//!   padding check tell a wrong version):
//!   a key wrapped before a rotation still unwraps. Every failure is one
//!   `InvalidCiphertext`: no oracle on which check failed.
//! * **Sizes.** What keybroker wraps are DEKs: 16 to 64 bytes, a multiple of 8
//!   (`model::check_dek_len`); a 256-bit AES key, the reference's example, is 32.

use super::{Operation, sealed::Sealed};
use crate::{
    api::call::Call,
    envelope,
    error::{BrokerError, Invalid, NotFound},
    keys::{Ciphertext, UnwrapInput, UnwrapItem, WrapItem},
    model::{Algorithm, Dek, KeyName, KeyType},
    policy::Permission,
};

/// The API version keybroker speaks (the only one the reference defines).
pub const API_VERSION: &str = "0.1-preview";

/// A wrapping algorithm of the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EkmAlgorithm {
    /// `A256KW`: AES key wrap, RFC 3394.
    A256Kw,
    /// `A256KWP`: AES key wrap with padding, RFC 5649.
    A256Kwp,
    /// `RSA-OAEP-256`: RSAES-OAEP, SHA-256 and MGF1-SHA-256.
    RsaOaep256,
    /// `RSA-OAEP`: RSAES-OAEP, SHA-1 and MGF1-SHA-1.
    RsaOaep,
}

impl EkmAlgorithm {
    /// Parses the `alg` field (`None`: not one the reference names).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "A256KW" => Some(Self::A256Kw),
            "A256KWP" => Some(Self::A256Kwp),
            "RSA-OAEP-256" => Some(Self::RsaOaep256),
            "RSA-OAEP" => Some(Self::RsaOaep),
            _ => None,
        }
    }

    /// The keybroker key algorithm that performs it.
    fn key_algorithm(self) -> Algorithm {
        match self {
            Self::A256Kw => Algorithm::AesKeyWrap,
            Self::A256Kwp => Algorithm::AesKeyWrapPad,
            Self::RsaOaep256 => Algorithm::RsaOaepSha256,
            Self::RsaOaep => Algorithm::RsaOaepSha1,
        }
    }
}

/// The refusal of an algorithm the key cannot perform (400 `UnsupportedAlgorithm`).
pub fn unsupported_algorithm() -> BrokerError {
    Invalid::Value {
        field: "alg",
        expected: "the key's own algorithm: A256KWP for an aes-kwp key, A256KW for an aes-kw key, RSA-OAEP-256 for an rsa-oaep-sha256 key, RSA-OAEP for an rsa-oaep-sha1 key",
    }
    .into()
}

/// An external key: `{key-name}` under a prefix's tenant.
#[derive(Clone, Debug)]
pub struct EkmKey {
    /// The tenant the path prefix maps to.
    pub tenant: String,
    /// The key name of the path.
    pub id: String,
}

impl EkmKey {
    /// The key's name; a name keybroker cannot hold is a key that does not exist.
    fn name(&self) -> Result<KeyName, BrokerError> {
        KeyName::new(&self.tenant, &self.id)
            .map_err(|_| NotFound::Key(format!("{}/{}", self.tenant, self.id)).into())
    }
}

/// Get proxy information.
pub struct EkmInfo;

/// What proxy information answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EkmProxyInfo {
    /// `ekm_vendor`: the token's manufacturer.
    pub ekm_vendor: String,
    /// `ekm_product`: the token's model and library.
    pub ekm_product: String,
}

/// Get key metadata.
pub struct EkmMetadata {
    /// The key.
    pub key: EkmKey,
}

/// What key metadata answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EkmKeyMetadata {
    /// `oct` or `RSA`.
    pub key_type: &'static str,
    /// In bits.
    pub key_size: u32,
    /// The RSA modulus and public exponent (big-endian), for an RSA key.
    pub rsa: Option<(Vec<u8>, Vec<u8>)>,
}

/// Wrap key.
pub struct EkmWrap {
    /// The key.
    pub key: EkmKey,
    /// `alg`.
    pub alg: EkmAlgorithm,
    /// `value`: the key to wrap.
    pub value: Dek,
}

/// Unwrap key.
pub struct EkmUnwrap {
    /// The key.
    pub key: EkmKey,
    /// `alg`.
    pub alg: EkmAlgorithm,
    /// `value`: the wrapped key, the algorithm's raw output.
    pub value: Vec<u8>,
}

/// Refuses an algorithm the key's own algorithm is not.
fn check_algorithm(key: Algorithm, alg: EkmAlgorithm) -> Result<(), BrokerError> {
    if alg.key_algorithm() == key {
        Ok(())
    } else {
        Err(unsupported_algorithm())
    }
}

impl Sealed for EkmInfo {}
impl Operation for EkmInfo {
    type Output = EkmProxyInfo;

    async fn run(self, call: &mut Call) -> Result<EkmProxyInfo, BrokerError> {
        // Managed HSM polls this as its health check: a real call through the session pool,
        // so that a proxy whose HSM does not answer does not look healthy.
        let hsm = call.keys().hsm().clone();
        hsm.ping().await?;
        let t = hsm.token();
        Ok(EkmProxyInfo {
            ekm_vendor: t.manufacturer.clone(),
            ekm_product: format!("{} ({})", t.model, t.library),
        })
    }
}

impl Sealed for EkmMetadata {}
impl Operation for EkmMetadata {
    type Output = EkmKeyMetadata;

    async fn run(self, call: &mut Call) -> Result<EkmKeyMetadata, BrokerError> {
        let name = self.key.name()?;
        let grant = call.authorize(Permission::ReadMetadata, &name)?;
        let entry = call.keys().get(grant.key())?;
        if let Ok(v) = entry.current() {
            call.note_version(v.number);
        }
        match (entry.key_type, entry.algorithm) {
            (KeyType::Aes256, alg) if alg.is_key_wrap() => Ok(EkmKeyMetadata {
                key_type: "oct",
                key_size: 256,
                rsa: None,
            }),
            (KeyType::Aes256, _) => Err(unsupported_algorithm()),
            // The EKM door wraps and unwraps: a signing key is not for it.
            (_, alg) if alg.is_signing() => Err(unsupported_algorithm()),
            (kt, _) => {
                let info = call.keys().public_key(&grant, 0).await?;
                let key_size = match kt {
                    KeyType::Rsa2048 => 2048,
                    KeyType::Rsa3072 => 3072,
                    _ => 4096,
                };
                Ok(EkmKeyMetadata {
                    key_type: "RSA",
                    key_size,
                    rsa: Some((strip_zeros(info.modulus), strip_zeros(info.exponent))),
                })
            }
        }
    }
}

/// The reference's integers are unsigned big-endian without leading zero bytes (`AQAB`).
fn strip_zeros(mut b: Vec<u8>) -> Vec<u8> {
    let zeros = b.iter().take_while(|x| **x == 0).count();
    b.drain(..zeros.min(b.len().saturating_sub(1)));
    b
}

impl Sealed for EkmWrap {}
impl Operation for EkmWrap {
    type Output = Vec<u8>;

    async fn run(self, call: &mut Call) -> Result<Vec<u8>, BrokerError> {
        let name = self.key.name()?;
        let grant = call.authorize(Permission::Wrap, &name)?;
        let entry = call.keys().get(grant.key())?;
        check_algorithm(entry.algorithm, self.alg)?;
        let item = WrapItem {
            grant,
            dek: self.value,
            aad: Vec::new(),
        };
        let wrapped = super::one(call.keys().wrap(vec![item]).await)?;
        call.note_version(wrapped.version);
        let env = envelope::parse(&wrapped.envelope)
            .map_err(|_| BrokerError::internal("an envelope keybroker made does not parse"))?;
        Ok(env.ciphertext.to_vec())
    }
}

impl Sealed for EkmUnwrap {}
impl Operation for EkmUnwrap {
    type Output = Dek;

    async fn run(self, call: &mut Call) -> Result<Dek, BrokerError> {
        let name = self.key.name()?;
        let grant = call.authorize(Permission::Unwrap, &name)?;
        let entry = call.keys().get(grant.key())?;
        check_algorithm(entry.algorithm, self.alg)?;
        let mut first_error = None;
        // Newest first: a key wrapped since the last rotation unwraps at the first try.
        for version in entry.versions.iter().rev() {
            let mut bytes = envelope::header(entry.algorithm, version.id, &[]);
            bytes.extend_from_slice(&self.value);
            let input = UnwrapInput {
                expected: Some(name.clone()),
                ciphertext: Ciphertext::Envelope(bytes),
                aad: Vec::new(),
            };
            let result = match super::one(call.keys().resolve(vec![input]).await) {
                Ok(resolved) => {
                    let item = UnwrapItem {
                        resolved,
                        grant: grant.clone(),
                    };
                    super::one(call.keys().unwrap(vec![item]).await)
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(u) => {
                    call.note_version(u.version);
                    return Ok(u.dek);
                }
                // Only "not this version" tries the next one; a disabled key, an HSM fault
                // or the deadline ends the search.
                Err(e @ (BrokerError::Unauthentic | BrokerError::UnauthenticCiphertext)) => {
                    first_error.get_or_insert(e);
                }
                // An older version the key refuses (below its minimum decryption version,
                // expired): the wrapped key did not unwrap under the versions allowed, which is
                // the newest version's answer, not a refusal of the key.
                Err(BrokerError::Refused(_)) if first_error.is_some() => break,
                Err(e) => return Err(e),
            }
        }
        Err(first_error.unwrap_or(BrokerError::Unauthentic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_algorithms_map_to_key_algorithms() {
        assert_eq!(EkmAlgorithm::parse("A256KWP"), Some(EkmAlgorithm::A256Kwp));
        assert_eq!(EkmAlgorithm::parse("a256kwp"), None);
        assert_eq!(EkmAlgorithm::parse("RS256"), None);
        assert!(check_algorithm(Algorithm::AesKeyWrapPad, EkmAlgorithm::A256Kwp).is_ok());
        assert_eq!(EkmAlgorithm::parse("A256KW"), Some(EkmAlgorithm::A256Kw));
        assert!(check_algorithm(Algorithm::AesKeyWrap, EkmAlgorithm::A256Kw).is_ok());
        assert!(check_algorithm(Algorithm::RsaOaepSha1, EkmAlgorithm::RsaOaep).is_ok());
        assert!(check_algorithm(Algorithm::RsaOaepSha256, EkmAlgorithm::RsaOaep256).is_ok());
        for (k, a) in [
            (Algorithm::AesKeyWrapPad, EkmAlgorithm::A256Kw),
            (Algorithm::AesKeyWrap, EkmAlgorithm::A256Kwp),
            (Algorithm::Aes256Gcm, EkmAlgorithm::A256Kw),
            (Algorithm::Aes256Gcm, EkmAlgorithm::A256Kwp),
            (Algorithm::RsaOaepSha1, EkmAlgorithm::RsaOaep256),
            (Algorithm::RsaOaepSha256, EkmAlgorithm::RsaOaep),
        ] {
            let e = check_algorithm(k, a).expect_err("unsupported");
            assert!(
                matches!(e, BrokerError::Invalid(Invalid::Value { field: "alg", .. })),
                "{e}"
            );
        }
    }

    #[test]
    fn integers_lose_their_leading_zeros_but_not_their_last_byte() {
        assert_eq!(strip_zeros(vec![0, 1, 0, 1]), vec![1, 0, 1]);
        assert_eq!(strip_zeros(vec![1, 0, 1]), vec![1, 0, 1]);
        assert_eq!(strip_zeros(vec![0, 0]), vec![0]);
        assert_eq!(strip_zeros(vec![]), Vec::<u8>::new());
    }
}
