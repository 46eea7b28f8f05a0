//! A KEK version's identity: the canary wrapped under it when it was made, and the check that
//! an HSM object is the key the version was created with (at start-up, after a
//! re-initialisation, and for versions another replica made).
//!
//! A signing key wraps nothing: its canary is the fingerprint of its public key (stored as the
//! canary's digest, with [`SIGN_CANARY_PREFIX`] and the check's algorithm as the canary), and
//! the check signs a challenge with the private object and verifies it with the public one
//! (`hsm::sign`).

use sha2::{Digest, Sha256};

use super::{
    Keyring,
    crypt::{fill_random, new_params, params_for},
};
use crate::{
    envelope,
    error::BrokerError,
    hsm::{Canary, FaultKind, Hsm, HsmError, sign::SIGN_CANARY_PREFIX},
    model::{Algorithm, Curve, Dek, KeyType, SignAlgorithm, VersionId},
};

pub(crate) const CANARY_AAD: &[u8] = b"keybroker canary v1";

/// A version's stored canary, ready for the HSM, or why it cannot prove anything (the same
/// verdicts as [`check_canary`]).
pub(crate) fn canary_to_check(
    alg: Algorithm,
    id: VersionId,
    canary: Option<&[u8]>,
    digest: Option<&[u8]>,
) -> Result<Canary, String> {
    let (Some(canary), Some(digest)) = (canary, digest) else {
        return Err("no canary recorded".into());
    };
    if alg.is_signing() {
        let algorithm = std::str::from_utf8(canary)
            .ok()
            .and_then(|c| c.strip_prefix(SIGN_CANARY_PREFIX))
            .and_then(SignAlgorithm::parse)
            .ok_or_else(|| "signing-key canary is malformed".to_string())?;
        return Ok(Canary::Signing {
            algorithm,
            fingerprint: digest.to_vec(),
        });
    }
    let Ok(env) = envelope::parse(canary) else {
        return Err("canary envelope is malformed".to_string());
    };
    if env.version != id || env.algorithm != alg {
        return Err("canary belongs to another key version".into());
    }
    Ok(Canary::Wrapped {
        params: params_for(&env, CANARY_AAD).map_err(|e| e.to_string())?,
        ciphertext: env.ciphertext.to_vec(),
        digest: digest.to_vec(),
    })
}

/// A stored canary in the form the HSM layer re-checks after a re-initialisation.
pub(crate) fn canary_of(
    alg: Algorithm,
    envelope: Option<&[u8]>,
    digest: Option<&[u8]>,
) -> Option<Canary> {
    if alg.is_signing() {
        // A signing key's canary names no version (the id is not read for it).
        return canary_to_check(alg, VersionId([0; 16]), envelope, digest).ok();
    }
    let env = envelope::parse(envelope?).ok()?;
    Some(Canary::Wrapped {
        params: params_for(&env, CANARY_AAD).ok()?,
        ciphertext: env.ciphertext.to_vec(),
        digest: digest?.to_vec(),
    })
}

/// The algorithm a signing key's identity check signs with: the one of its type that the
/// probe requires (ES256, ES384; RS256 for RSA signing keys).
pub(crate) fn canary_sign_algorithm(key_type: KeyType) -> SignAlgorithm {
    match key_type.curve() {
        Some(Curve::P256) => SignAlgorithm::Es256,
        Some(Curve::P384) => SignAlgorithm::Es384,
        None => SignAlgorithm::Rs256,
    }
}

/// Unwraps a version's canary and compares it: `Ok(Ok(()))` it is the key the version was
/// created with, `Ok(Err(why))` it is not (or there is no usable canary), `Err` the HSM could
/// not answer (a fault, not a verdict).
pub(crate) async fn check_canary(
    hsm: &Hsm,
    alg: Algorithm,
    id: VersionId,
    canary: Option<Vec<u8>>,
    digest: Option<Vec<u8>>,
) -> Result<Result<(), String>, crate::hsm::HsmError> {
    let c = match canary_to_check(alg, id, canary.as_deref(), digest.as_deref()) {
        Ok(c) => c,
        Err(why) => return Ok(Err(why)),
    };
    let (params, ciphertext, digest) = match c {
        Canary::Wrapped {
            params,
            ciphertext,
            digest,
        } => (params, ciphertext, digest),
        signing @ Canary::Signing { .. } => {
            let verdict = hsm.check_canaries(vec![(id, signing)]).await?;
            return Ok(match verdict.into_iter().next() {
                Some((_, None)) => Ok(()),
                Some((_, Some(why))) => Err(why),
                None => Err("the HSM layer returned no verdict".into()),
            });
        }
    };
    match only(hsm.unwrap_many(vec![(id, params, ciphertext)]).await) {
        Ok(dek) if Sha256::digest(dek.expose()).as_slice() == digest.as_slice() => Ok(Ok(())),
        Ok(_) => Ok(Err("canary decrypts to the wrong value: the HSM object is not the key this version was created with".into())),
        Err(e) if e.kind == crate::hsm::FaultKind::DataInvalid => Ok(Err(
            "canary does not decrypt: the HSM object is not the key this version was created with".into(),
        )),
        Err(e) => Err(e),
    }
}

/// The one result of a one-item HSM call.
fn only<T>(r: Result<Vec<Result<T, HsmError>>, HsmError>) -> Result<T, HsmError> {
    r?.pop().unwrap_or_else(|| {
        Err(HsmError::new(
            FaultKind::Other,
            "a one-item HSM call",
            "the HSM layer returned no result",
        ))
    })
}

impl Keyring {
    /// Wraps a random canary under a new version and checks that it unwraps to the same value;
    /// returns the envelope and the SHA-256 of the value (stored with the version: every start
    /// and re-initialisation checks the object's identity with it).
    pub(crate) async fn new_canary(
        &self,
        algorithm: Algorithm,
        key_type: KeyType,
        id: VersionId,
    ) -> Result<(Vec<u8>, Vec<u8>), BrokerError> {
        if algorithm.is_signing() {
            let sign = canary_sign_algorithm(key_type);
            let canary = self
                .hsm
                .signing_canary(id, sign)
                .await
                .map_err(BrokerError::from)?;
            let Canary::Signing { fingerprint, .. } = &canary else {
                return Err(BrokerError::internal("a signing key got a wrapping canary"));
            };
            let blob = format!("{SIGN_CANARY_PREFIX}{}", sign.as_str()).into_bytes();
            let fingerprint = fingerprint.clone();
            check_canary(
                &self.hsm,
                algorithm,
                id,
                Some(blob.clone()),
                Some(fingerprint.clone()),
            )
            .await
            .map_err(BrokerError::from)?
            .map_err(|why| BrokerError::internal(format!("new key failed its canary: {why}")))?;
            return Ok((blob, fingerprint));
        }
        let mut value = [0u8; 32];
        fill_random(&mut value)?;
        let canary = Dek::from_slice(&value);
        value.fill(0);
        let digest = Sha256::digest(canary.expose()).to_vec();
        let (params, header) = new_params(algorithm, id, CANARY_AAD)?;
        let ct = only(self.hsm.wrap_many(vec![(id, params, canary)]).await)?;
        let env = envelope::seal(header, &ct);
        // An HSM fault here is just that (UNAVAILABLE, ...); only a wrong answer is a bug.
        check_canary(
            &self.hsm,
            algorithm,
            id,
            Some(env.clone()),
            Some(digest.clone()),
        )
        .await
        .map_err(BrokerError::from)?
        .map_err(|why| BrokerError::internal(format!("new KEK failed its canary: {why}")))?;
        Ok((env, digest))
    }
}
