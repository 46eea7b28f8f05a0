//! Payload encryption in domain terms: `Encrypt`/`Decrypt` of small payloads into
//! self-describing envelopes (format 2, `crate::envelope`), and detached AES-256-GCM — IV,
//! ciphertext and tag apart, with AAD a front door builds — for the AWS XKS door.
//!
//! As for wrapping (`crypt`), every operation takes a list of items, checks each on its own,
//! then runs the good ones through the HSM in as many chunks as the pool has sessions (a single
//! call is a list of one). Each item carries the [`Grant`] the pipeline made for its key
//! (permission `encrypt` or `decrypt`), and the key must allow the matching [`KeyOp`].
//!
//! **One key, three kinds of ciphertext, no crossing.** An AES-256-GCM key can wrap DEKs
//! (format 1), encrypt payloads (format 2) and serve the XKS door (detached). The AAD the HSM
//! authenticates starts with a byte that names the kind — the envelope's format byte `0x01` or
//! `0x02`, and [`DETACHED_DOMAIN`] `0x03` for detached ciphertexts — so a ciphertext of one kind
//! never authenticates as another: a caller allowed only to decrypt payloads (or to call the
//! XKS door) cannot recover the DEKs the same key wraps, whatever AAD it sends.

use std::sync::Arc;

use super::{
    KeyEntry, Keyring, VersionEntry,
    crypt::{check_aad, empty, fill_random, finish},
};
use crate::{
    envelope::{self, GCM_IV_LEN, GCM_TAG_LEN},
    error::{BrokerError, Invalid, Refused},
    hsm::WrapParams,
    model::{Algorithm, Dek, KeyName, KeyOp, MAX_AAD_LEN, MAX_PAYLOAD_LEN, VersionId, now_ms},
    policy::{Grant, Permission},
};

/// The first byte of the AAD the HSM authenticates for a detached ciphertext (after it: the
/// front door's AAD). Distinct from the envelope format bytes (`0x01` wrapped DEKs, `0x02`
/// payloads), which begin their AAD likewise (see the module docs).
pub const DETACHED_DOMAIN: u8 = 0x03;
/// The largest AAD a front door may build for a detached ciphertext: the caller's 8 KiB and
/// room for the door's own framing (XKS: two lengths and 20 bytes of ciphertext metadata).
pub const MAX_DETACHED_AAD: usize = MAX_AAD_LEN + 64;

/// A payload to encrypt under the newest version of the granted key (permission `encrypt`).
pub struct EncryptItem {
    /// The grant.
    pub grant: Grant,
    /// The payload (1 byte to 64 KiB; an RSA key takes what one OAEP block holds).
    pub plaintext: Dek,
    /// The caller's AAD (AES-256-GCM keys only).
    pub aad: Vec<u8>,
}

/// An encrypted payload.
#[derive(Debug)]
pub struct Encrypted {
    /// The envelope (format 2).
    pub envelope: Vec<u8>,
    /// The key.
    pub key: KeyName,
    /// The version number used.
    pub version: u32,
    /// The version's id.
    pub version_id: VersionId,
    /// The algorithm.
    pub algorithm: Algorithm,
}

/// An envelope to decrypt, before its key is known.
pub struct DecryptInput {
    /// The key the caller says it belongs to (`None`: whichever the envelope names).
    pub expected: Option<KeyName>,
    /// The envelope (format 2).
    pub envelope: Vec<u8>,
    /// The caller's AAD.
    pub aad: Vec<u8>,
}

/// An envelope whose key and version are known: authorise [`PayloadResolved::key`], then
/// decrypt.
pub struct PayloadResolved {
    entry: Arc<KeyEntry>,
    version: VersionEntry,
    params: WrapParams,
    ciphertext: Vec<u8>,
}

impl PayloadResolved {
    /// The key the envelope belongs to.
    pub fn key(&self) -> &KeyName {
        &self.entry.name
    }
}

/// A resolved envelope and the grant (permission `decrypt`) on its key.
pub struct DecryptItem {
    /// The envelope.
    pub resolved: PayloadResolved,
    /// The grant.
    pub grant: Grant,
}

/// A decrypted payload.
#[derive(Debug)]
pub struct Decrypted {
    /// The payload.
    pub plaintext: Dek,
    /// The key.
    pub key: KeyName,
    /// The version number used.
    pub version: u32,
    /// The version's id.
    pub version_id: VersionId,
    /// The algorithm.
    pub algorithm: Algorithm,
}

/// A payload to encrypt with AES-256-GCM under the newest version of the granted key, the
/// result kept apart (IV, ciphertext, tag).
pub struct SealItem {
    /// The grant (permission `encrypt`).
    pub grant: Grant,
    /// The payload (1 byte to 64 KiB).
    pub plaintext: Dek,
    /// The AAD the front door builds once the version is chosen (its AAD may name the version,
    /// as XKS's ciphertext metadata does), at most [`MAX_DETACHED_AAD`] bytes; the HSM sees
    /// [`DETACHED_DOMAIN`] then these bytes.
    pub aad: DoorAad,
}

/// How a front door's AAD depends on the key version that encrypts.
pub type DoorAad = Box<dyn FnOnce(VersionId) -> Vec<u8> + Send>;

/// A detached AES-256-GCM ciphertext.
#[derive(Debug)]
pub struct Sealed {
    /// The 96-bit IV.
    pub iv: [u8; GCM_IV_LEN],
    /// The ciphertext (as long as the payload).
    pub ciphertext: Vec<u8>,
    /// The 128-bit tag.
    pub tag: [u8; GCM_TAG_LEN],
    /// The key.
    pub key: KeyName,
    /// The version number used.
    pub version: u32,
    /// The version's id (what the front door keeps with the ciphertext to decrypt it after a
    /// rotation).
    pub version_id: VersionId,
}

/// A detached AES-256-GCM ciphertext to decrypt with one version of the granted key.
pub struct OpenItem {
    /// The grant (permission `decrypt`).
    pub grant: Grant,
    /// The version that encrypted it (from what the front door kept with the ciphertext).
    pub version_id: VersionId,
    /// The IV.
    pub iv: Vec<u8>,
    /// The ciphertext.
    pub ciphertext: Vec<u8>,
    /// The tag.
    pub tag: Vec<u8>,
    /// The AAD the front door built, as for [`SealItem::aad`].
    pub aad: Vec<u8>,
}

/// A decrypted detached ciphertext.
#[derive(Debug)]
pub struct Opened {
    /// The payload.
    pub plaintext: Dek,
    /// The version number that decrypted it.
    pub version: u32,
}

/// The most an RSA-OAEP block of `bits` holds with `alg`'s hash (RFC 8017 §7.1.1: k − 2·hLen −
/// 2 bytes).
pub fn rsa_payload_max(alg: Algorithm, bits: u32) -> usize {
    let h = if alg == Algorithm::RsaOaepSha1 {
        20
    } else {
        32
    };
    (bits as usize / 8).saturating_sub(2 * h + 2)
}

/// Checks a payload's length: 1 byte to [`MAX_PAYLOAD_LEN`].
pub fn check_payload_len(len: usize) -> Result<(), Invalid> {
    match len {
        0 => Err(Invalid::PayloadEmpty),
        n if n > MAX_PAYLOAD_LEN => Err(Invalid::PayloadTooLarge(n)),
        _ => Ok(()),
    }
}

/// An HSM "not authentic" refusal of a payload, in the payload's own words.
fn payload_error(e: BrokerError) -> BrokerError {
    match e {
        BrokerError::Unauthentic => BrokerError::UnauthenticCiphertext,
        e => e,
    }
}

impl Keyring {
    /// Encrypts payloads, each under the newest version of its granted key.
    pub async fn encrypt(&self, items: Vec<EncryptItem>) -> Vec<Result<Encrypted, BrokerError>> {
        let now = now_ms();
        let mut results = empty(items.len());
        let mut work = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            match self.prepare_encrypt(&item, now) {
                Ok((entry, version, params, header)) => {
                    let id = version.id;
                    work.push((
                        index,
                        (entry, version, header),
                        (id, params, item.plaintext),
                    ));
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let work = self
            .charge(&mut results, work, |(entry, version, _)| {
                super::crypt::gcm_version(entry, version)
            })
            .await;
        self.in_chunks(
            &mut results,
            work,
            |calls| self.hsm.encrypt_many(calls),
            |(entry, version, header): (Arc<KeyEntry>, VersionEntry, Vec<u8>), ct: Vec<u8>| {
                self.bump(version.id, true);
                Ok(Encrypted {
                    envelope: envelope::seal(header, &ct),
                    key: entry.name.clone(),
                    version: version.number,
                    version_id: version.id,
                    algorithm: entry.algorithm,
                })
            },
        )
        .await;
        finish(results)
    }

    /// The checks before encrypting `item`, and the HSM's parameters with the envelope header.
    fn prepare_encrypt(
        &self,
        item: &EncryptItem,
        now: i64,
    ) -> Result<(Arc<KeyEntry>, VersionEntry, WrapParams, Vec<u8>), BrokerError> {
        let name = item.grant.key_for(Permission::Encrypt)?;
        check_payload_len(item.plaintext.len())?;
        let entry = self.get(name)?;
        check_aad(&entry, &item.aad)?;
        let version = entry.current()?.clone();
        entry.check(KeyOp::Encrypt, &version, now)?;
        let (params, header) = match entry.algorithm {
            Algorithm::Aes256Gcm => {
                let iv = fresh_iv()?;
                let header = envelope::payload_header(entry.algorithm, version.id, &iv);
                let aad = envelope::gcm_aad(&header, &item.aad);
                (WrapParams::Gcm { iv, aad }, header)
            }
            alg @ (Algorithm::RsaOaepSha256 | Algorithm::RsaOaepSha1) => {
                let bits = entry.key_type.rsa_bits().unwrap_or(0);
                let max = rsa_payload_max(alg, bits);
                if item.plaintext.len() > max {
                    return Err(Invalid::RsaPayloadTooLarge {
                        key: entry.name.clone(),
                        algorithm: alg,
                        max,
                        got: item.plaintext.len(),
                    }
                    .into());
                }
                let params = if alg == Algorithm::RsaOaepSha1 {
                    WrapParams::OaepSha1
                } else {
                    WrapParams::OaepSha256
                };
                (params, envelope::payload_header(alg, version.id, &[]))
            }
            Algorithm::AesKeyWrapPad
            | Algorithm::AesKeyWrap
            | Algorithm::RsaSign
            | Algorithm::Ecdsa => {
                return Err(not_for_payloads(&entry));
            }
        };
        Ok((entry, version, params, header))
    }

    /// Finds the key and version of each envelope, checked against the key the caller
    /// expected. Every mismatch is [`BrokerError::UnauthenticCiphertext`].
    pub async fn resolve_payloads(
        &self,
        items: Vec<DecryptInput>,
    ) -> Vec<Result<PayloadResolved, BrokerError>> {
        // A version unknown here may be another replica's newest: one refresh for the list.
        let unknown = items
            .iter()
            .filter_map(|i| envelope::parse_payload(&i.envelope).ok().map(|e| e.version))
            .find(|v| !self.knows_version(*v));
        if let Some(v) = unknown
            && let Err(e) = self.ensure_known(v).await
        {
            return items.iter().map(|_| Err(e.clone())).collect();
        }
        items.into_iter().map(|i| self.resolve_payload(i)).collect()
    }

    fn resolve_payload(&self, item: DecryptInput) -> Result<PayloadResolved, BrokerError> {
        let DecryptInput {
            expected,
            envelope: bytes,
            aad,
        } = item;
        if aad.len() > MAX_AAD_LEN {
            return Err(Invalid::AadTooLong.into());
        }
        if let Some(name) = &expected {
            self.get(name)?;
        }
        let env = envelope::parse_payload(&bytes)?;
        let (entry, version) = self
            .version_of(expected.as_ref(), env.version)
            .ok_or(BrokerError::UnauthenticCiphertext)?;
        if entry.algorithm != env.algorithm || (!aad.is_empty() && !env.algorithm.supports_aad()) {
            return Err(BrokerError::UnauthenticCiphertext);
        }
        let params = match env.algorithm {
            Algorithm::Aes256Gcm => WrapParams::Gcm {
                iv: env
                    .nonce
                    .try_into()
                    .map_err(|_| BrokerError::UnauthenticCiphertext)?,
                aad: envelope::gcm_aad(env.header, &aad),
            },
            Algorithm::RsaOaepSha256 => WrapParams::OaepSha256,
            Algorithm::RsaOaepSha1 => WrapParams::OaepSha1,
            Algorithm::AesKeyWrapPad
            | Algorithm::AesKeyWrap
            | Algorithm::RsaSign
            | Algorithm::Ecdsa => {
                return Err(BrokerError::UnauthenticCiphertext);
            }
        };
        if env.algorithm.is_rsa() {
            let bits = entry.key_type.rsa_bits().unwrap_or(0) as usize;
            if env.ciphertext.len() != bits / 8 {
                return Err(BrokerError::UnauthenticCiphertext);
            }
        }
        Ok(PayloadResolved {
            params,
            ciphertext: env.ciphertext.to_vec(),
            entry,
            version,
        })
    }

    /// The key and version entry of a version id, if it belongs to `expected` (when given).
    fn version_of(
        &self,
        expected: Option<&KeyName>,
        id: VersionId,
    ) -> Option<(Arc<KeyEntry>, VersionEntry)> {
        let (name, number) = self
            .versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()?;
        if expected.is_some_and(|e| *e != name) {
            return None;
        }
        let entry = self.get(&name).ok()?;
        let v = entry.version(number).cloned()?;
        Some((entry, v))
    }

    /// Decrypts resolved envelopes.
    pub async fn decrypt(&self, items: Vec<DecryptItem>) -> Vec<Result<Decrypted, BrokerError>> {
        let now = now_ms();
        let mut results = empty(items.len());
        let mut work = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let DecryptItem { resolved: r, grant } = item;
            match check_decrypt(&grant, &r.entry, &r.version, now) {
                Ok(()) => work.push((
                    index,
                    (r.entry, r.version.clone()),
                    (r.version.id, r.params, r.ciphertext),
                )),
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        self.in_chunks(
            &mut results,
            work,
            |calls| self.hsm.decrypt_many(calls),
            |(entry, version): (Arc<KeyEntry>, VersionEntry), plaintext: Dek| {
                if plaintext.is_empty() {
                    return Err(BrokerError::UnauthenticCiphertext);
                }
                self.bump(version.id, false);
                Ok(Decrypted {
                    plaintext,
                    key: entry.name.clone(),
                    version: version.number,
                    version_id: version.id,
                    algorithm: entry.algorithm,
                })
            },
        )
        .await;
        finish(results)
            .into_iter()
            .map(|r| r.map_err(payload_error))
            .collect()
    }

    /// Encrypts payloads with AES-256-GCM under the newest version of each granted key,
    /// returning IV, ciphertext and tag apart (see [`SealItem`]).
    pub async fn seal_detached(&self, items: Vec<SealItem>) -> Vec<Result<Sealed, BrokerError>> {
        let now = now_ms();
        let mut results = empty(items.len());
        let mut work = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let SealItem {
                grant,
                plaintext,
                aad,
            } = item;
            let prepared = (|| {
                let name = grant.key_for(Permission::Encrypt)?;
                check_payload_len(plaintext.len())?;
                let entry = self.get(name)?;
                if entry.algorithm != Algorithm::Aes256Gcm {
                    return Err(not_for_payloads(&entry));
                }
                let version = entry.current()?.clone();
                entry.check(KeyOp::Encrypt, &version, now)?;
                let aad = aad(version.id);
                check_detached_aad(&aad)?;
                let iv = fresh_iv()?;
                let params = WrapParams::Gcm {
                    iv,
                    aad: detached_aad(&aad),
                };
                Ok((entry, version, iv, params))
            })();
            match prepared {
                Ok((entry, version, iv, params)) => {
                    let id = version.id;
                    work.push((index, (entry, version, iv), (id, params, plaintext)));
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let work = self
            .charge(&mut results, work, |(entry, version, _)| {
                super::crypt::gcm_version(entry, version)
            })
            .await;
        self.in_chunks(
            &mut results,
            work,
            |calls| self.hsm.encrypt_many(calls),
            |(entry, version, iv): (Arc<KeyEntry>, VersionEntry, [u8; GCM_IV_LEN]),
             mut out: Vec<u8>| {
                // The HSM returned ciphertext || tag (its length was checked there).
                let at = out
                    .len()
                    .checked_sub(GCM_TAG_LEN)
                    .ok_or_else(|| BrokerError::internal("AES-GCM output shorter than a tag"))?;
                let tag: [u8; GCM_TAG_LEN] = out[at..]
                    .try_into()
                    .map_err(|_| BrokerError::internal("AES-GCM tag of the wrong length"))?;
                out.truncate(at);
                self.bump(version.id, true);
                Ok(Sealed {
                    iv,
                    ciphertext: out,
                    tag,
                    key: entry.name.clone(),
                    version: version.number,
                    version_id: version.id,
                })
            },
        )
        .await;
        finish(results)
    }

    /// Decrypts detached AES-256-GCM ciphertexts (see [`OpenItem`]). A version that is not
    /// one of the granted key's, an IV that is not 96 bits, a tag that is not 128 bits and any
    /// authentication failure are all [`BrokerError::UnauthenticCiphertext`].
    pub async fn open_detached(&self, items: Vec<OpenItem>) -> Vec<Result<Opened, BrokerError>> {
        let now = now_ms();
        if let Some(v) = items
            .iter()
            .map(|i| i.version_id)
            .find(|v| !self.knows_version(*v))
            && let Err(e) = self.ensure_known(v).await
        {
            return items.iter().map(|_| Err(e.clone())).collect();
        }
        let mut results = empty(items.len());
        let mut work = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let prepared = (|| {
                let name = item.grant.key_for(Permission::Decrypt)?;
                check_detached_aad(&item.aad)?;
                let entry = self.get(name)?;
                if entry.algorithm != Algorithm::Aes256Gcm {
                    return Err(not_for_payloads(&entry));
                }
                // The key's state and operations first (a key that does not decrypt says so,
                // whatever ciphertext it is given), then the version the metadata names.
                entry.check(KeyOp::Decrypt, entry.current()?, now)?;
                let (_, version) = self
                    .version_of(Some(name), item.version_id)
                    .ok_or(BrokerError::UnauthenticCiphertext)?;
                entry.check(KeyOp::Decrypt, &version, now)?;
                let iv: [u8; GCM_IV_LEN] = item
                    .iv
                    .as_slice()
                    .try_into()
                    .map_err(|_| BrokerError::UnauthenticCiphertext)?;
                if item.tag.len() != GCM_TAG_LEN || item.ciphertext.is_empty() {
                    return Err(BrokerError::UnauthenticCiphertext);
                }
                check_payload_len(item.ciphertext.len())?;
                let mut ct = item.ciphertext;
                ct.extend_from_slice(&item.tag);
                let params = WrapParams::Gcm {
                    iv,
                    aad: detached_aad(&item.aad),
                };
                Ok((version, (item.version_id, params, ct)))
            })();
            match prepared {
                Ok((version, call)) => work.push((index, version, call)),
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        self.in_chunks(
            &mut results,
            work,
            |calls| self.hsm.decrypt_many(calls),
            |version: VersionEntry, plaintext: Dek| {
                self.bump(version.id, false);
                Ok(Opened {
                    plaintext,
                    version: version.number,
                })
            },
        )
        .await;
        finish(results)
            .into_iter()
            .map(|r| r.map_err(payload_error))
            .collect()
    }
}

/// The checks before decrypting with `entry`'s version `v` under `grant`.
fn check_decrypt(
    grant: &Grant,
    entry: &KeyEntry,
    v: &VersionEntry,
    now: i64,
) -> Result<(), BrokerError> {
    if grant.key_for(Permission::Decrypt)? != &entry.name {
        return Err(BrokerError::internal(format!(
            "a grant on key {} used for key {}",
            grant.key(),
            entry.name
        )));
    }
    entry.check(KeyOp::Decrypt, v, now)
}

fn not_for_payloads(entry: &KeyEntry) -> BrokerError {
    Refused::NotForPayloads {
        key: entry.name.clone(),
        algorithm: entry.algorithm,
    }
    .into()
}

fn check_detached_aad(aad: &[u8]) -> Result<(), BrokerError> {
    if aad.len() > MAX_DETACHED_AAD {
        return Err(Invalid::AadTooLong.into());
    }
    Ok(())
}

/// The AAD the HSM authenticates for a detached ciphertext.
fn detached_aad(door_aad: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(1 + door_aad.len());
    a.push(DETACHED_DOMAIN);
    a.extend_from_slice(door_aad);
    a
}

/// A random 96-bit IV (NIST SP 800-38D §8.2.2), from the OS RNG as for wraps.
fn fresh_iv() -> Result<[u8; GCM_IV_LEN], BrokerError> {
    let mut iv = [0u8; GCM_IV_LEN];
    fill_random(&mut iv)?;
    Ok(iv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_blocks_hold_what_rfc_8017_says() {
        assert_eq!(rsa_payload_max(Algorithm::RsaOaepSha256, 2048), 190);
        assert_eq!(rsa_payload_max(Algorithm::RsaOaepSha256, 3072), 318);
        assert_eq!(rsa_payload_max(Algorithm::RsaOaepSha256, 4096), 446);
        assert_eq!(rsa_payload_max(Algorithm::RsaOaepSha1, 2048), 214);
        assert_eq!(rsa_payload_max(Algorithm::RsaOaepSha1, 4096), 470);
    }

    #[test]
    fn payload_lengths() {
        assert_eq!(check_payload_len(0), Err(Invalid::PayloadEmpty));
        assert!(check_payload_len(1).is_ok());
        assert!(check_payload_len(MAX_PAYLOAD_LEN).is_ok());
        assert_eq!(
            check_payload_len(MAX_PAYLOAD_LEN + 1),
            Err(Invalid::PayloadTooLarge(MAX_PAYLOAD_LEN + 1))
        );
    }

    #[test]
    fn the_three_kinds_of_ciphertext_begin_their_aad_differently() {
        let wrapped = envelope::header(Algorithm::Aes256Gcm, VersionId([1; 16]), &[0; 12]);
        let payload = envelope::payload_header(Algorithm::Aes256Gcm, VersionId([1; 16]), &[0; 12]);
        let detached = detached_aad(&wrapped);
        let firsts = [wrapped[0], payload[0], detached[0]];
        assert_eq!(firsts, [0x01, 0x02, 0x03]);
    }
}
