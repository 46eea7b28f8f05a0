//! Signatures: [`Client::sign`] has the broker sign a digest inside the HSM; [`Client::verify`]
//! checks a signature **locally**, with the signing version's public key fetched once
//! (`GetPublicKey`) and cached — a version's public key never changes, so verification costs no
//! broker call after the first, and keeps working while the broker is unreachable.
//!
//! The caller hashes the message itself (the broker signs digests, as Azure Managed HSM does):
//! SHA-256 for ES256/RS256/PS256, SHA-384 for ES384/RS384/PS384, SHA-512 for RS512/PS512.
//! ECDSA signatures are JWS-style `r || s`; RSA-PSS uses MGF1 with the same hash and a salt as
//! long as the hash.

use std::sync::Arc;

use keybroker_proto::v1::{self as pb, SignatureAlgorithm as Alg};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use rsa::{Pkcs1v15Sign, Pss, RsaPublicKey, pkcs8::DecodePublicKey};
use sha2::{Sha256, Sha384, Sha512};

use crate::{Client, Error, Result, decorate, new_request_id};

/// The most public keys kept (one per key version); past it the cache starts again.
const MAX_PUBLIC_KEYS: usize = 1024;

/// A signature made by the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// The full name of the key.
    pub key: String,
    /// The version that signed (pass it to [`Client::verify`]).
    pub key_version: u32,
    /// That version's id (the `kid` of its JWK).
    pub key_version_id: Vec<u8>,
    /// The algorithm.
    pub algorithm: Alg,
    /// The signature bytes.
    pub signature: Vec<u8>,
}

/// A version's public key, parsed.
pub(crate) enum PublicKey {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    Rsa(RsaPublicKey),
}

impl PublicKey {
    fn from_pem(pem: &str) -> Result<Self> {
        if let Ok(k) = p256::PublicKey::from_public_key_pem(pem) {
            return Ok(Self::P256(k.into()));
        }
        if let Ok(k) = p384::PublicKey::from_public_key_pem(pem) {
            return Ok(Self::P384(k.into()));
        }
        RsaPublicKey::from_public_key_pem(pem)
            .map(Self::Rsa)
            .map_err(|e| Error::Invalid(format!("the broker's public key does not parse: {e}")))
    }

    /// Whether `signature` is `alg`'s signature of `digest` under this key. An algorithm that
    /// does not fit the key is an error, not `false`.
    fn verify(&self, alg: Alg, digest: &[u8], signature: &[u8]) -> Result<bool> {
        let want = digest_len(alg)?;
        if digest.len() != want {
            return Err(Error::Invalid(format!(
                "{} takes a {want}-byte digest, got {} bytes",
                alg.as_str_name(),
                digest.len()
            )));
        }
        let mismatch = || {
            Error::Invalid(format!(
                "{} does not fit this key ({})",
                alg.as_str_name(),
                self.kind()
            ))
        };
        Ok(match (self, alg) {
            (Self::P256(k), Alg::Es256) => p256::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|s| k.verify_prehash(digest, &s).is_ok()),
            (Self::P384(k), Alg::Es384) => p384::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|s| k.verify_prehash(digest, &s).is_ok()),
            (Self::Rsa(k), Alg::Rs256) => k
                .verify(Pkcs1v15Sign::new::<Sha256>(), digest, signature)
                .is_ok(),
            (Self::Rsa(k), Alg::Rs384) => k
                .verify(Pkcs1v15Sign::new::<Sha384>(), digest, signature)
                .is_ok(),
            (Self::Rsa(k), Alg::Rs512) => k
                .verify(Pkcs1v15Sign::new::<Sha512>(), digest, signature)
                .is_ok(),
            (Self::Rsa(k), Alg::Ps256) => k.verify(Pss::new::<Sha256>(), digest, signature).is_ok(),
            (Self::Rsa(k), Alg::Ps384) => k.verify(Pss::new::<Sha384>(), digest, signature).is_ok(),
            (Self::Rsa(k), Alg::Ps512) => k.verify(Pss::new::<Sha512>(), digest, signature).is_ok(),
            _ => return Err(mismatch()),
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::P256(_) => "EC P-256",
            Self::P384(_) => "EC P-384",
            Self::Rsa(_) => "RSA",
        }
    }
}

/// The digest length `alg` signs.
fn digest_len(alg: Alg) -> Result<usize> {
    match alg {
        Alg::Es256 | Alg::Rs256 | Alg::Ps256 => Ok(32),
        Alg::Es384 | Alg::Rs384 | Alg::Ps384 => Ok(48),
        Alg::Rs512 | Alg::Ps512 => Ok(64),
        Alg::Unspecified => Err(Error::Invalid("no signature algorithm given".into())),
    }
}

impl Client {
    /// Has the broker sign `digest` (the message's hash under `algorithm`'s hash) with the
    /// newest version of `key`, inside the HSM.
    pub async fn sign(&self, key: &str, algorithm: Alg, digest: &[u8]) -> Result<Signature> {
        let want = digest_len(algorithm)?;
        if digest.len() != want {
            return Err(Error::Invalid(format!(
                "{} takes a {want}-byte digest, got {} bytes",
                algorithm.as_str_name(),
                digest.len()
            )));
        }
        let context = self.context();
        let r = self
            .call("Sign", &new_request_id(), |mut stub, req_id, timeout| {
                let mut req = tonic::Request::new(pb::SignRequest {
                    key: key.to_string(),
                    algorithm: algorithm.into(),
                    digest: digest.to_vec(),
                    context: context.clone(),
                });
                decorate(&mut req, &req_id, timeout);
                async move { stub.sign(req).await }
            })
            .await?;
        Ok(Signature {
            key: r.key,
            key_version: r.key_version,
            key_version_id: r.key_version_id,
            algorithm,
            signature: r.signature,
        })
    }

    /// Checks `signature` over `digest` locally, with the public key of version `key_version`
    /// of `key` (fetched from the broker once, then cached). `Ok(false)`: not a valid signature
    /// of this digest by this version. An algorithm that does not fit the key or a digest of
    /// the wrong length is [`Error::Invalid`]. Version 0 (the newest) asks the broker which
    /// version that is every time; pass [`Signature::key_version`] to verify offline.
    pub async fn verify(
        &self,
        key: &str,
        key_version: u32,
        algorithm: Alg,
        digest: &[u8],
        signature: &[u8],
    ) -> Result<bool> {
        let public = self.public_key(key, key_version).await?;
        public.verify(algorithm, digest, signature)
    }

    /// A version's public key: cached, or fetched (`GetPublicKey`).
    async fn public_key(&self, key: &str, version: u32) -> Result<Arc<PublicKey>> {
        let cache_key = (key.to_string(), version);
        if version != 0
            && let Some(k) = self
                .inner
                .public_keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&cache_key)
        {
            return Ok(k.clone());
        }
        let r = self
            .call(
                "GetPublicKey",
                &new_request_id(),
                |mut stub, req_id, timeout| {
                    let mut req = tonic::Request::new(pb::GetPublicKeyRequest {
                        key: key.to_string(),
                        key_version: version,
                    });
                    decorate(&mut req, &req_id, timeout);
                    async move { stub.get_public_key(req).await }
                },
            )
            .await?;
        let public = Arc::new(PublicKey::from_pem(&r.spki_pem)?);
        let mut cache = self
            .inner
            .public_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_PUBLIC_KEYS {
            cache.clear();
        }
        // Cached under the version the broker answered with (also for a request for version 0).
        cache.insert((key.to_string(), r.key_version), public.clone());
        Ok(public)
    }
}
