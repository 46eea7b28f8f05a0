//! Signatures in domain terms: `Sign` and `Verify` of a caller's digest with a signing key
//! (key algorithm `rsa-sign` or `ecdsa`), each under the [`Grant`] the pipeline made
//! (permission `sign` or `verify`), the key allowing the matching [`KeyOp`].
//!
//! The order of the checks decides the status a caller gets: a digest of the wrong length is
//! the request's fault (INVALID_ARGUMENT, before the key is looked at); a signature algorithm
//! the key cannot sign with, or a key that does not allow the operation, is the key's
//! (FAILED_PRECONDITION); a signature that does not verify is an answer (`valid = false`).

use super::Keyring;
use crate::{
    error::{BrokerError, Invalid, Refused},
    hsm::{FaultKind, HsmError},
    model::{KeyName, KeyOp, SignAlgorithm, VersionId, now_ms},
    policy::{Grant, Permission},
};

/// A signature.
#[derive(Debug)]
pub struct Signed {
    /// The key.
    pub key: KeyName,
    /// The version that signed.
    pub version: u32,
    /// Its id.
    pub version_id: VersionId,
    /// The algorithm.
    pub algorithm: SignAlgorithm,
    /// The signature (r || s for ECDSA; a modulus-sized block for RSA).
    pub signature: Vec<u8>,
}

/// A verification's answer.
#[derive(Debug)]
pub struct Verified {
    /// The key.
    pub key: KeyName,
    /// The version that checked.
    pub version: u32,
    /// Whether the signature is valid.
    pub valid: bool,
}

/// Refuses a digest whose length is not `alg`'s hash length.
pub fn check_digest(alg: SignAlgorithm, digest: &[u8]) -> Result<(), BrokerError> {
    if digest.len() != alg.digest_len() {
        return Err(Invalid::DigestLength {
            algorithm: alg,
            got: digest.len(),
        }
        .into());
    }
    Ok(())
}

/// The one result of a one-item HSM call.
fn only<T>(r: Result<Vec<Result<T, HsmError>>, HsmError>) -> Result<T, BrokerError> {
    r.map_err(BrokerError::from)?
        .pop()
        .unwrap_or_else(|| {
            Err(HsmError::new(
                FaultKind::Other,
                "a one-item HSM call",
                "the HSM layer returned no result",
            ))
        })
        .map_err(BrokerError::from)
}

impl Keyring {
    /// The checks `Sign` and `Verify` share, in the order that decides the status (module
    /// docs): the digest's length, then the key (usable, and able to sign with `algorithm`).
    fn signing_key(
        &self,
        name: &KeyName,
        algorithm: SignAlgorithm,
        digest: &[u8],
    ) -> Result<std::sync::Arc<super::KeyEntry>, BrokerError> {
        check_digest(algorithm, digest)?;
        let entry = self.get(name)?;
        entry.usable()?;
        if !algorithm.fits(entry.key_type, entry.algorithm) {
            return Err(Refused::SignAlgorithmForKey {
                key: entry.name.clone(),
                key_type: entry.key_type,
                algorithm: entry.algorithm,
                asked: algorithm,
            }
            .into());
        }
        Ok(entry)
    }

    /// Signs `digest` with the newest version of the granted key.
    pub async fn sign(
        &self,
        grant: &Grant,
        algorithm: SignAlgorithm,
        digest: Vec<u8>,
    ) -> Result<Signed, BrokerError> {
        let name = grant.key_for(Permission::Sign)?;
        let entry = self.signing_key(name, algorithm, &digest)?;
        let v = entry.current()?.clone();
        entry.check(KeyOp::Sign, &v, now_ms())?;
        let signature = only(self.hsm.sign_many(vec![(v.id, algorithm, digest)]).await)?;
        // A signing version's usage counts signatures as its "wraps" (uses of the private
        // half) and verifications as its "unwraps".
        self.bump(v.id, true);
        Ok(Signed {
            key: entry.name.clone(),
            version: v.number,
            version_id: v.id,
            algorithm,
            signature,
        })
    }

    /// Verifies `signature` over `digest` with version `version` (0: the newest) of the granted
    /// key, inside the HSM.
    pub async fn verify(
        &self,
        grant: &Grant,
        version: u32,
        algorithm: SignAlgorithm,
        digest: Vec<u8>,
        signature: Vec<u8>,
    ) -> Result<Verified, BrokerError> {
        let name = grant.key_for(Permission::Verify)?;
        let entry = self.signing_key(name, algorithm, &digest)?;
        let v = entry.version_or_current(version)?.clone();
        entry.check(KeyOp::Verify, &v, now_ms())?;
        // An ECDSA signature is r || s, each as long as the curve's order: any other length is
        // not a signature of this key (the token would say CKR_SIGNATURE_LEN_RANGE).
        let valid = match entry.key_type.curve() {
            Some(c) if signature.len() != 2 * c.size() => false,
            _ if signature.is_empty() => false,
            _ => only(
                self.hsm
                    .verify_many(vec![(v.id, algorithm, digest, signature)])
                    .await,
            )?,
        };
        self.bump(v.id, false);
        Ok(Verified {
            key: entry.name.clone(),
            version: v.number,
            valid,
        })
    }
}
