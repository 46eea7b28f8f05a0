//! The data plane in domain terms: wrap, generate, unwrap and rewrap DEKs, and read an RSA
//! version's public half. Reads the in-memory maps under a read lock and makes exactly one HSM
//! call; never touches the store or searches the token.

use std::sync::Arc;

use super::{KeyEntry, Keyring, PublicKeyInfo, Unwrapped, VersionEntry, Wrapped};
use crate::{
    envelope::{self, GCM_IV_LEN},
    error::BrokerError,
    hsm::WrapParams,
    model::{
        Algorithm, DEFAULT_DEK_LEN, Dek, KeyName, KeyOp, MAX_AAD_LEN, VersionId, check_dek_len,
        now_ms,
    },
};

pub(crate) fn check_aad(entry: &KeyEntry, aad: &[u8]) -> Result<(), BrokerError> {
    if aad.len() > MAX_AAD_LEN {
        return Err(BrokerError::invalid(format!(
            "aad is longer than {MAX_AAD_LEN} bytes"
        )));
    }
    if !aad.is_empty() && !entry.algorithm.supports_aad() {
        return Err(BrokerError::invalid(format!(
            "key {} uses {}, which cannot bind aad; send no aad or use an AES-256-GCM key",
            entry.name, entry.algorithm
        )));
    }
    Ok(())
}

pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), BrokerError> {
    getrandom::fill(buf)
        .map_err(|e| BrokerError::internal(format!("OS random number generator failed: {e}")))
}

/// Fresh parameters and the envelope header for wrapping under `id`.
pub(crate) fn new_params(
    alg: Algorithm,
    id: VersionId,
    aad: &[u8],
) -> Result<(WrapParams, Vec<u8>), BrokerError> {
    Ok(match alg {
        Algorithm::Aes256Gcm => {
            // A random 96-bit IV per wrap (NIST SP 800-38D §8.2.2): the token's RNG is not
            // needed for IVs; the OS RNG is cheaper and as good.
            let mut iv = [0u8; GCM_IV_LEN];
            fill_random(&mut iv)?;
            let header = envelope::header(alg, id, &iv);
            let aad = envelope::gcm_aad(&header, aad);
            (WrapParams::Gcm { iv, aad }, header)
        }
        Algorithm::AesKeyWrapPad => (WrapParams::Kwp, envelope::header(alg, id, &[])),
        Algorithm::RsaOaepSha256 => (WrapParams::OaepSha256, envelope::header(alg, id, &[])),
        Algorithm::RsaOaepSha1 => (WrapParams::OaepSha1, envelope::header(alg, id, &[])),
    })
}

/// Parameters to unwrap a parsed envelope.
pub(crate) fn params_for(
    env: &envelope::Envelope<'_>,
    aad: &[u8],
) -> Result<WrapParams, BrokerError> {
    Ok(match env.algorithm {
        Algorithm::Aes256Gcm => WrapParams::Gcm {
            iv: env.nonce.try_into().map_err(|_| BrokerError::Unauthentic)?,
            aad: envelope::gcm_aad(env.header, aad),
        },
        Algorithm::AesKeyWrapPad => WrapParams::Kwp,
        Algorithm::RsaOaepSha256 => WrapParams::OaepSha256,
        Algorithm::RsaOaepSha1 => WrapParams::OaepSha1,
    })
}

impl Keyring {
    /// Wraps a caller-supplied DEK under the newest version of `name`.
    pub async fn wrap(&self, name: &KeyName, dek: Dek, aad: &[u8]) -> Result<Wrapped, BrokerError> {
        check_dek_len(dek.len())?;
        let entry = self.get(name)?;
        check_aad(&entry, aad)?;
        let v = entry.current()?;
        entry.check(KeyOp::Wrap, v, now_ms())?;
        let (params, header) = new_params(entry.algorithm, v.id, aad)?;
        let ct = self
            .hsm
            .wrap(v.id, params, dek)
            .await
            .map_err(BrokerError::from)?;
        self.bump(v.id, true);
        Ok(Wrapped {
            envelope: envelope::seal(header, &ct),
            key: entry.name.clone(),
            version: v.number,
            algorithm: entry.algorithm,
        })
    }

    /// Draws a DEK from the HSM's RNG and wraps it under the newest version of `name`.
    pub async fn generate_data_key(
        &self,
        name: &KeyName,
        len: usize,
        aad: &[u8],
    ) -> Result<(Dek, Wrapped), BrokerError> {
        let len = if len == 0 { DEFAULT_DEK_LEN } else { len };
        check_dek_len(len)?;
        let entry = self.get(name)?;
        check_aad(&entry, aad)?;
        let v = entry.current()?;
        entry.check(KeyOp::GenerateDataKey, v, now_ms())?;
        let (params, header) = new_params(entry.algorithm, v.id, aad)?;
        let (dek, ct) = self
            .hsm
            .generate_and_wrap(v.id, params, len)
            .await
            .map_err(BrokerError::from)?;
        self.bump(v.id, true);
        Ok((
            dek,
            Wrapped {
                envelope: envelope::seal(header, &ct),
                key: entry.name.clone(),
                version: v.number,
                algorithm: entry.algorithm,
            },
        ))
    }

    /// Resolves an envelope to its key and version, checking it against `expected` (if the
    /// caller named a key). Every mismatch is [`BrokerError::Unauthentic`].
    pub(crate) fn resolve<'a>(
        &self,
        expected: Option<&KeyName>,
        env: &envelope::Envelope<'a>,
        aad: &[u8],
    ) -> Result<(Arc<KeyEntry>, VersionEntry), BrokerError> {
        let found = self
            .versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&env.version)
            .cloned();
        let Some((name, number)) = found else {
            return Err(BrokerError::Unauthentic);
        };
        if expected.is_some_and(|e| *e != name) {
            return Err(BrokerError::Unauthentic);
        }
        let entry = self.get(&name)?;
        if entry.algorithm != env.algorithm || (!aad.is_empty() && !env.algorithm.supports_aad()) {
            return Err(BrokerError::Unauthentic);
        }
        let v = entry
            .version(number)
            .cloned()
            .ok_or(BrokerError::Unauthentic)?;
        Ok((entry, v))
    }

    /// Unwraps an envelope.
    ///
    /// `authorize` is called with the key the envelope belongs to, after it is known and before
    /// the HSM is asked: policy is decided at the edge, but only the envelope names the key.
    pub async fn unwrap(
        &self,
        expected: Option<&KeyName>,
        envelope_bytes: &[u8],
        aad: &[u8],
        authorize: impl FnOnce(&KeyName) -> Result<(), BrokerError>,
    ) -> Result<Unwrapped, BrokerError> {
        if aad.len() > MAX_AAD_LEN {
            return Err(BrokerError::invalid(format!(
                "aad is longer than {MAX_AAD_LEN} bytes"
            )));
        }
        if let Some(name) = expected {
            self.get(name)?;
        }
        let env = envelope::parse(envelope_bytes)?;
        self.ensure_known(env.version).await?;
        let (entry, v) = self.resolve(expected, &env, aad)?;
        authorize(&entry.name)?;
        entry.check(KeyOp::Unwrap, &v, now_ms())?;
        let params = params_for(&env, aad)?;
        let dek = self
            .hsm
            .unwrap(v.id, params, env.ciphertext.to_vec())
            .await
            .map_err(BrokerError::from)?;
        if check_dek_len(dek.len()).is_err() {
            return Err(BrokerError::Unauthentic);
        }
        self.bump(v.id, false);
        Ok(Unwrapped {
            dek,
            key: entry.name.clone(),
            version: v.number,
            algorithm: entry.algorithm,
        })
    }

    /// Unwraps a raw RSA-OAEP ciphertext made with an exported public key.
    pub async fn unwrap_raw(
        &self,
        name: &KeyName,
        version: u32,
        algorithm: Algorithm,
        ciphertext: &[u8],
    ) -> Result<Unwrapped, BrokerError> {
        let entry = self.get(name)?;
        if !algorithm.is_rsa() {
            return Err(BrokerError::invalid(
                "a raw ciphertext must name RSA_OAEP_SHA256 or RSA_OAEP_SHA1",
            ));
        }
        if entry.algorithm != algorithm {
            return Err(BrokerError::invalid(format!(
                "key {name} uses {}; a raw ciphertext for it must use the same algorithm",
                entry.algorithm
            )));
        }
        let bits = entry.key_type.rsa_bits().unwrap_or(0) as usize;
        if version == 0 {
            return Err(BrokerError::invalid(
                "a raw ciphertext must name its key version (from GetPublicKey)",
            ));
        }
        let v = entry
            .version(version)
            .cloned()
            .ok_or_else(|| BrokerError::NotFound(format!("key {name} has no version {version}")))?;
        entry.check(KeyOp::Unwrap, &v, now_ms())?;
        if ciphertext.len() != bits / 8 {
            return Err(BrokerError::Unauthentic);
        }
        let params = if algorithm == Algorithm::RsaOaepSha1 {
            WrapParams::OaepSha1
        } else {
            WrapParams::OaepSha256
        };
        let dek = self
            .hsm
            .unwrap(v.id, params, ciphertext.to_vec())
            .await
            .map_err(BrokerError::from)?;
        if dek.is_empty() {
            return Err(BrokerError::Unauthentic);
        }
        self.bump(v.id, false);
        Ok(Unwrapped {
            dek,
            key: entry.name.clone(),
            version: v.number,
            algorithm,
        })
    }

    /// Unwraps an envelope and wraps its DEK under the newest version of `destination` (or of
    /// the same key), with `new_aad` if given.
    ///
    /// `authorize_source` and `authorize_destination` are called with the two keys before the
    /// HSM is asked (as in [`Keyring::unwrap`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn rewrap(
        &self,
        expected: Option<&KeyName>,
        envelope_bytes: &[u8],
        aad: &[u8],
        destination: Option<&KeyName>,
        new_aad: Option<&[u8]>,
        authorize_source: impl FnOnce(&KeyName) -> Result<(), BrokerError>,
        authorize_destination: impl FnOnce(&KeyName) -> Result<(), BrokerError>,
    ) -> Result<(Wrapped, u32), BrokerError> {
        if aad.len() > MAX_AAD_LEN {
            return Err(BrokerError::invalid(format!(
                "aad is longer than {MAX_AAD_LEN} bytes"
            )));
        }
        if let Some(name) = expected {
            self.get(name)?;
        }
        let env = envelope::parse(envelope_bytes)?;
        self.ensure_known(env.version).await?;
        let (src, sv) = self.resolve(expected, &env, aad)?;
        authorize_source(&src.name)?;
        let now = now_ms();
        src.check(KeyOp::Rewrap, &sv, now)?;
        let dst_name = destination.cloned().unwrap_or_else(|| src.name.clone());
        authorize_destination(&dst_name)?;
        let dst = self.get(&dst_name)?;
        let out_aad = new_aad.unwrap_or(aad);
        check_aad(&dst, out_aad)?;
        let dv = dst.current()?;
        dst.check(KeyOp::Wrap, dv, now)?;
        let from = params_for(&env, aad)?;
        let (to, header) = new_params(dst.algorithm, dv.id, out_aad)?;
        let ct = self
            .hsm
            .rewrap((sv.id, from, env.ciphertext.to_vec()), (dv.id, to))
            .await
            .map_err(BrokerError::from)?;
        self.bump(sv.id, false);
        self.bump(dv.id, true);
        Ok((
            Wrapped {
                envelope: envelope::seal(header, &ct),
                key: dst.name.clone(),
                version: dv.number,
                algorithm: dst.algorithm,
            },
            sv.number,
        ))
    }

    /// The public key of an RSA key version (0 = newest).
    pub async fn public_key(
        &self,
        name: &KeyName,
        version: u32,
    ) -> Result<PublicKeyInfo, BrokerError> {
        let entry = self.get(name)?;
        if !entry.key_type.is_rsa() {
            return Err(BrokerError::precondition(format!(
                "key {name} is {}: only RSA keys have a public key",
                entry.key_type.as_str()
            )));
        }
        entry.usable()?;
        let v = if version == 0 {
            entry.current()?.clone()
        } else {
            entry.version(version).cloned().ok_or_else(|| {
                BrokerError::NotFound(format!("key {name} has no version {version}"))
            })?
        };
        let pk = self.hsm.public_key(v.id).await.map_err(BrokerError::from)?;
        Ok(PublicKeyInfo {
            key: entry.name.clone(),
            version: v.number,
            version_id: v.id,
            algorithm: entry.algorithm,
            modulus: pk.modulus,
            exponent: pk.exponent,
        })
    }
}
