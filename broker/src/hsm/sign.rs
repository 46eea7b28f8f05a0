//! Signing and verifying digests with signing-key versions (RSA signing and ECDSA keys), and a
//! signing key's identity check (its canary).
//!
//! The caller hashes the message and sends the digest (as with Azure Managed HSM), so the token
//! is asked for the "raw" mechanisms that take a digest: `CKM_ECDSA` (the digest itself;
//! PKCS#11 returns r || s, each as long as the curve's order, which is JWS's form),
//! `CKM_RSA_PKCS` over the DER `DigestInfo` the broker builds (RFC 8017 §9.2: the token adds
//! only the type-1 padding), and `CKM_RSA_PKCS_PSS` over the digest with the parameters of the
//! hash (MGF1 of the same hash, a salt as long as the digest, RFC 7518 §3.5). Verification runs
//! in the HSM too, with the version's public object: a signature that does not verify
//! (`CKR_SIGNATURE_INVALID`, `CKR_SIGNATURE_LEN_RANGE`) is an answer, `false`, not a fault.

use cryptoki::{
    error::{Error as CkError, RvError},
    mechanism::{
        Mechanism, MechanismType,
        rsa::{PkcsMgfType, PkcsPssParams},
    },
    object::ObjectHandle,
    session::Session,
};
use sha2::{Digest, Sha256, Sha384};

use super::{
    Canary, Hsm, KekHandles,
    error::{FaultKind, HsmError},
    objects::{read_ec_point, read_rsa_public},
};
use crate::model::{SignAlgorithm, SignHash, VersionId};

/// The PKCS#11 mechanism (with its parameters) that signs a digest with `alg`.
pub fn mechanism(alg: SignAlgorithm) -> Mechanism<'static> {
    match alg {
        SignAlgorithm::Es256 | SignAlgorithm::Es384 => Mechanism::Ecdsa,
        SignAlgorithm::Rs256 | SignAlgorithm::Rs384 | SignAlgorithm::Rs512 => Mechanism::RsaPkcs,
        SignAlgorithm::Ps256 | SignAlgorithm::Ps384 | SignAlgorithm::Ps512 => {
            let (hash_alg, mgf) = match alg.hash() {
                SignHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
                SignHash::Sha384 => (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384),
                SignHash::Sha512 => (MechanismType::SHA512, PkcsMgfType::MGF1_SHA512),
            };
            Mechanism::RsaPkcsPss(PkcsPssParams {
                hash_alg,
                mgf,
                s_len: (alg.digest_len() as u64).into(),
            })
        }
    }
}

/// What the token signs for `alg`: the `DigestInfo` of the digest for RSASSA-PKCS1-v1_5, the
/// digest itself otherwise.
pub fn to_be_signed(alg: SignAlgorithm, digest: &[u8]) -> Vec<u8> {
    match alg {
        SignAlgorithm::Rs256 | SignAlgorithm::Rs384 | SignAlgorithm::Rs512 => {
            let mut v = alg.hash().digest_info_prefix().to_vec();
            v.extend_from_slice(digest);
            v
        }
        _ => digest.to_vec(),
    }
}

/// Signs `digest` (already checked against `alg`'s length) with the private key `key`.
pub(super) fn sign_raw(
    s: &Session,
    key: ObjectHandle,
    alg: SignAlgorithm,
    digest: &[u8],
) -> Result<Vec<u8>, HsmError> {
    sign(s, key, alg, digest)
}

/// [`verify`] for the probe.
pub(super) fn verify_raw(
    s: &Session,
    key: ObjectHandle,
    alg: SignAlgorithm,
    digest: &[u8],
    signature: &[u8],
) -> Result<bool, HsmError> {
    verify(s, key, alg, digest, signature)
}

fn sign(
    s: &Session,
    key: ObjectHandle,
    alg: SignAlgorithm,
    digest: &[u8],
) -> Result<Vec<u8>, HsmError> {
    s.sign(&mechanism(alg), key, &to_be_signed(alg, digest))
        .map_err(|e| HsmError::from_ck("C_Sign", e))
}

/// Verifies `signature` over `digest` with the public key `key`: `Ok(false)` when the token
/// says the signature is not valid (or of the wrong length).
fn verify(
    s: &Session,
    key: ObjectHandle,
    alg: SignAlgorithm,
    digest: &[u8],
    signature: &[u8],
) -> Result<bool, HsmError> {
    match s.verify(&mechanism(alg), key, &to_be_signed(alg, digest), signature) {
        Ok(()) => Ok(true),
        Err(CkError::Pkcs11(RvError::SignatureInvalid | RvError::SignatureLenRange, _)) => {
            Ok(false)
        }
        Err(e) => Err(HsmError::from_ck("C_Verify", e)),
    }
}

/// The canary blob stored for a signing-key version: this prefix and the JWS name of the
/// algorithm its identity check signs with (`ES256`, `ES384` or `RS256`).
pub const SIGN_CANARY_PREFIX: &str = "kb-sign-canary-1:";

/// What a signing key's identity check signs (a digest of the canary text, of the algorithm's
/// length).
fn challenge(alg: SignAlgorithm) -> Vec<u8> {
    const TEXT: &[u8] = b"keybroker signing-key canary v1";
    match alg.hash() {
        SignHash::Sha256 => Sha256::digest(TEXT).to_vec(),
        SignHash::Sha384 => Sha384::digest(TEXT).to_vec(),
        SignHash::Sha512 => sha2::Sha512::digest(TEXT).to_vec(),
    }
}

/// SHA-256 of a version's public key as the token reports it (the EC point, or the RSA modulus
/// and exponent without leading zeros): recorded when the version is made, so that a public
/// object swapped for another key's is told apart.
pub(super) fn public_fingerprint(
    s: &Session,
    public: ObjectHandle,
    alg: SignAlgorithm,
) -> Result<Vec<u8>, HsmError> {
    let strip = |b: &[u8]| -> Vec<u8> {
        let i = b.iter().position(|&x| x != 0).unwrap_or(b.len());
        b[i..].to_vec()
    };
    let bytes = match alg {
        SignAlgorithm::Es256 => read_ec_point(s, public, crate::model::Curve::P256)?,
        SignAlgorithm::Es384 => read_ec_point(s, public, crate::model::Curve::P384)?,
        _ => {
            let pk = read_rsa_public(s, public)?;
            let mut v = strip(&pk.modulus);
            v.push(0);
            v.extend(strip(&pk.exponent));
            v
        }
    };
    Ok(Sha256::digest(bytes).to_vec())
}

/// A signing key's identity check: its public object is the one recorded at creation (the
/// fingerprint), and its private object signs a challenge that the public object verifies.
/// `None`: it is the key the version was made with; `Some(why)`: it is not.
pub(super) fn sign_canary_verdict(
    s: &Session,
    h: &KekHandles,
    alg: SignAlgorithm,
    fingerprint: &[u8],
) -> Result<Option<String>, HsmError> {
    let Some(public) = h.public else {
        return Ok(Some("its public key object is missing".into()));
    };
    if public_fingerprint(s, public, alg)? != fingerprint {
        return Ok(Some(
            "its public key is not the one recorded when the version was made".into(),
        ));
    }
    let c = challenge(alg);
    let sig = match sign(s, h.secret, alg, &c) {
        Ok(sig) => sig,
        Err(e) if e.kind == FaultKind::DataInvalid || e.kind == FaultKind::NotPermitted => {
            return Ok(Some(format!("its private key does not sign: {}", e.detail)));
        }
        Err(e) => return Err(e),
    };
    if verify(s, public, alg, &c, &sig)? {
        Ok(None)
    } else {
        Ok(Some(
            "its private key's signature does not verify with its public key: the objects are not one key pair".into(),
        ))
    }
}

impl Hsm {
    /// Signs digests, each with the private object of its version.
    pub async fn sign_many(
        &self,
        items: Vec<(VersionId, SignAlgorithm, Vec<u8>)>,
    ) -> Result<Vec<Result<Vec<u8>, HsmError>>, HsmError> {
        self.each("sign", items, |inner, conn, s, (id, alg, digest)| {
            inner.ensure_verified(conn, s, *id)?;
            let h = conn.handles_of(*id)?;
            sign(s, h.secret, *alg, digest)
        })
        .await
    }

    /// Verifies signatures, each with the public object of its version.
    pub async fn verify_many(
        &self,
        items: Vec<(VersionId, SignAlgorithm, Vec<u8>, Vec<u8>)>,
    ) -> Result<Vec<Result<bool, HsmError>>, HsmError> {
        self.each("verify", items, |inner, conn, s, (id, alg, digest, sig)| {
            inner.ensure_verified(conn, s, *id)?;
            let public = conn.handles_of(*id)?.public.ok_or_else(|| {
                HsmError::new(FaultKind::Other, "verify", "no public key object cached")
            })?;
            verify(s, public, *alg, digest, sig)
        })
        .await
    }

    /// The canary of a new signing-key version (its objects installed): the public key's
    /// fingerprint, checked at once by [`Hsm::check_canaries`].
    pub async fn signing_canary(
        &self,
        id: VersionId,
        alg: SignAlgorithm,
    ) -> Result<Canary, HsmError> {
        self.run(
            "make a signing key's canary",
            super::pool::READ,
            move |_, conn, s| {
                let public = conn.handles_of(id)?.public.ok_or_else(|| {
                    HsmError::new(
                        FaultKind::Other,
                        "make a signing key's canary",
                        "no public key object cached",
                    )
                })?;
                Ok(Canary::Signing {
                    algorithm: alg,
                    fingerprint: public_fingerprint(s, public, alg)?,
                })
            },
        )
        .await
    }
}
