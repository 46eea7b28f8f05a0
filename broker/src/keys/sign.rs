//! Signatures in domain terms: `Sign` and `Verify` of a caller's digest with a signing key
//! (key algorithm `rsa-sign` or `ecdsa`), each under the [`Grant`] the pipeline made
//! (permission `sign` or `verify`), the key allowing the matching [`KeyOp`].
//!
//! The order of the checks decides the status a caller gets: a digest of the wrong length is
//! the request's fault (INVALID_ARGUMENT, before the key is looked at); a signature algorithm
//! the key cannot sign with, or a key that does not allow the operation, is the key's
//! (FAILED_PRECONDITION); a signature that does not verify is an answer (`valid = false`).

use std::sync::Arc;

use super::{
    KeyEntry, Keyring, VersionEntry,
    crypt::{empty, finish},
};
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

/// A digest to sign, under a grant to sign with its key.
pub struct SignItem {
    /// The grant (permission `sign`).
    pub grant: Grant,
    /// The signature algorithm.
    pub algorithm: SignAlgorithm,
    /// The digest.
    pub digest: Vec<u8>,
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
    ) -> Result<Arc<KeyEntry>, BrokerError> {
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

    /// Signs each item's digest with the newest version of its granted key: the items that
    /// pass their checks go to the HSM together, spread over its sessions (a batch of one is
    /// a single call).
    pub async fn sign(&self, items: Vec<SignItem>) -> Vec<Result<Signed, BrokerError>> {
        let now = now_ms();
        let mut results = empty(items.len());
        let mut work = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let prepared = item.grant.key_for(Permission::Sign).and_then(|name| {
                let entry = self.signing_key(name, item.algorithm, &item.digest)?;
                let v = entry.current()?.clone();
                entry.check(KeyOp::Sign, &v, now)?;
                Ok((entry, v))
            });
            match prepared {
                Ok((entry, v)) => {
                    let id = v.id;
                    work.push((
                        index,
                        (entry, v, item.algorithm),
                        (id, item.algorithm, item.digest),
                    ))
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        self.in_chunks(
            &mut results,
            work,
            |calls| self.hsm.sign_many(calls),
            |(entry, v, algorithm): (Arc<KeyEntry>, VersionEntry, SignAlgorithm), signature| {
                // A signing version's usage counts signatures as its "wraps" (uses of the
                // private half) and verifications as its "unwraps".
                self.bump(v.id, true);
                Ok(Signed {
                    key: entry.name.clone(),
                    version: v.number,
                    version_id: v.id,
                    algorithm,
                    signature,
                })
            },
        )
        .await;
        finish(results)
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
