//! `BackupKey` / `RestoreKey`: a key with all its versions and attributes, its key material
//! wrapped under the security domain (see `hsm::domain`), authenticated by the domain's MAC key.
//!
//! The blob, byte by byte:
//!
//! | offset | size | field                                                              |
//! |--------|------|--------------------------------------------------------------------|
//! | 0      | 4    | magic `KBBK`                                                       |
//! | 4      | 1    | format, 1                                                          |
//! | 5      | 16   | the security domain's id (the domain keys' `CKA_ID`)               |
//! | 21     | 4    | N, the body's length, big-endian                                   |
//! | 25     | N    | the body: UTF-8 JSON ([`Body`]): name, type, algorithm, attributes, versions (number, id, times, origin, RFC 5649 of the key material under the role's domain wrap key, an RSA key's public half) |
//! | 25 + N | 32   | HMAC-SHA256 of bytes 0 .. 25 + N under the domain MAC key (in the HSM) |
//!
//! Nothing in it is secret without the HSM: the key material is wrapped under a key that never
//! leaves it; the rest is metadata. Any change is detected (the MAC), a blob from another
//! domain is recognised by its id (and could not be verified or unwrapped anyway).

use std::sync::Arc;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    error::{BrokerError, Exists, Invalid, Refused},
    failpoint,
    hsm::{
        HsmError, KekSpec, RequestScope, RsaPublic, domain::WrappedVersion, template::LABEL_PREFIX,
    },
    keys::{KeyEntry, KeyState, Keyring, Lifecycle, VersionEntry, blocking},
    model::{Algorithm, KeyAttributes, KeyName, KeyType, MAX_VERSIONS, Origin, VersionId, now_ms},
    policy::{Grant, Permission},
    store::{BackupRecord, RestoredKey},
};

const MAGIC: &[u8; 4] = b"KBBK";
const FORMAT: u8 = 1;
const HEADER: usize = 25;
const MAC_LEN: usize = 32;
/// The largest body accepted (100 RSA-4096 versions take about 0.5 MiB).
const MAX_BODY: usize = 8 << 20;

/// The JSON body of a backup.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// "tenant/name".
    pub key: String,
    /// e.g. `aes-256`.
    pub key_type: String,
    /// e.g. `aes-256-gcm`.
    pub algorithm: String,
    /// When the key was created (ms).
    pub created_at_ms: i64,
    /// Its attributes.
    pub attributes: KeyAttributes,
    /// When the backup was made (ms).
    pub backed_up_at_ms: i64,
    /// Who made it.
    pub backed_up_by: String,
    /// Every version, oldest first.
    pub versions: Vec<BodyVersion>,
}

/// One version in a backup.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyVersion {
    /// Its number.
    pub number: u32,
    /// Its id (`CKA_ID`, named in every envelope), hex.
    pub id: String,
    /// Creation time (ms).
    pub created_at_ms: i64,
    /// `generated` or `imported`.
    pub origin: String,
    /// When it stops wrapping.
    pub expires_ms: Option<i64>,
    /// RFC 5649 of the key material under the role's domain wrap key, base64.
    pub wrapped: String,
    /// RSA: the public modulus, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modulus: Option<String>,
    /// RSA: the public exponent, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exponent: Option<String>,
}

/// A blob split into its parts (nothing verified yet).
pub struct Parsed<'a> {
    /// The domain that made it.
    pub domain: VersionId,
    /// Header and body: what the MAC covers.
    pub signed: &'a [u8],
    /// The body.
    pub body: &'a [u8],
    /// The MAC.
    pub mac: &'a [u8],
}

fn malformed(why: &str) -> BrokerError {
    Invalid::BackupMalformed(why.to_string()).into()
}

/// Splits a blob (checks the framing only).
pub fn parse(blob: &[u8]) -> Result<Parsed<'_>, BrokerError> {
    if blob.len() < HEADER + MAC_LEN {
        return Err(malformed("too short"));
    }
    if &blob[..4] != MAGIC {
        return Err(malformed(
            "it does not start with KBBK (not made by BackupKey)",
        ));
    }
    if blob[4] != FORMAT {
        return Err(malformed(&format!(
            "format {} is not one this broker reads (1)",
            blob[4]
        )));
    }
    let domain = VersionId::from_slice(&blob[5..21]).ok_or_else(|| malformed("domain id"))?;
    let n = u32::from_be_bytes([blob[21], blob[22], blob[23], blob[24]]) as usize;
    if n > MAX_BODY || blob.len() != HEADER + n + MAC_LEN {
        return Err(malformed(
            "its length does not match its header (truncated or extended)",
        ));
    }
    Ok(Parsed {
        domain,
        signed: &blob[..HEADER + n],
        body: &blob[HEADER..HEADER + n],
        mac: &blob[HEADER + n..],
    })
}

/// Header and body of a blob (the MAC is appended by the caller).
pub fn frame(domain: VersionId, body: &[u8]) -> Result<Vec<u8>, BrokerError> {
    let n = u32::try_from(body.len())
        .ok()
        .filter(|n| (*n as usize) <= MAX_BODY)
        .ok_or_else(|| BrokerError::internal("backup body too large"))?;
    let mut out = Vec::with_capacity(HEADER + body.len() + MAC_LEN);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    out.extend_from_slice(domain.as_bytes());
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// The key a blob names, read before it is verified (to authorise the caller first; nothing
/// else is used before the MAC checks out).
pub fn claimed_name(blob: &[u8]) -> Result<KeyName, BrokerError> {
    let p = parse(blob)?;
    let body: Body = serde_json::from_slice(p.body).map_err(|_| malformed("body"))?;
    Ok(KeyName::parse(&body.key)?)
}

/// A verified body, checked for sense.
pub struct Plan {
    name: KeyName,
    key_type: KeyType,
    algorithm: Algorithm,
    created_at_ms: i64,
    attributes: KeyAttributes,
    versions: Vec<(VersionEntry, WrappedVersion)>,
}

/// Reads a body (after its MAC checked out): JSON, then `plan`. Public for the fuzz target.
pub fn read_body(body: &[u8]) -> Result<Plan, BrokerError> {
    let body: Body = serde_json::from_slice(body).map_err(|_| malformed("body"))?;
    plan(body)
}

fn plan(body: Body) -> Result<Plan, BrokerError> {
    let name = KeyName::parse(&body.key)?;
    let key_type = KeyType::parse(&body.key_type).ok_or_else(|| malformed("key type"))?;
    let algorithm = Algorithm::parse(&body.algorithm).ok_or_else(|| malformed("algorithm"))?;
    if body.versions.is_empty() || body.versions.len() > MAX_VERSIONS {
        return Err(malformed("version count"));
    }
    let mut versions = Vec::with_capacity(body.versions.len());
    let mut last = 0;
    for v in body.versions {
        if v.number <= last {
            return Err(malformed("version numbers out of order"));
        }
        last = v.number;
        let id = hex::decode(&v.id)
            .ok()
            .and_then(|b| VersionId::from_slice(&b))
            .ok_or_else(|| malformed("version id"))?;
        if versions.iter().any(|(e, _): &(VersionEntry, _)| e.id == id) {
            return Err(malformed("duplicate version id"));
        }
        let b64 = |s: &str| B64.decode(s).map_err(|_| malformed("base64"));
        let public = match (v.modulus, v.exponent) {
            (Some(m), Some(e)) => Some(RsaPublic {
                modulus: b64(&m)?,
                exponent: b64(&e)?,
            }),
            (None, None) => None,
            _ => return Err(malformed("half an RSA public key")),
        };
        versions.push((
            VersionEntry {
                number: v.number,
                id,
                created_at_ms: v.created_at_ms,
                origin: Origin::parse(&v.origin).ok_or_else(|| malformed("origin"))?,
                expires_ms: v.expires_ms,
            },
            WrappedVersion {
                wrapped: b64(&v.wrapped)?,
                public,
            },
        ));
    }
    Ok(Plan {
        name,
        key_type,
        algorithm,
        created_at_ms: body.created_at_ms,
        attributes: body.attributes,
        versions,
    })
}

/// What a backup holds, for the reply.
pub struct Made {
    /// The blob.
    pub blob: Vec<u8>,
    /// The domain it was made in.
    pub domain: VersionId,
    /// How many versions it holds.
    pub versions: usize,
    /// SHA-256 of the blob (hex): how purge receipts name it.
    pub sha256: String,
}

fn refused(why: String) -> BrokerError {
    Refused::Domain(why).into()
}

impl Keyring {
    /// `BackupKey`: every version of a live key, wrapped under the security domain, with its
    /// attributes, MACed by the domain.
    pub async fn backup(&self, grant: &Grant, by: &str) -> Result<Made, BrokerError> {
        let name = grant.key_for(Permission::Backup)?;
        // Serialised with rotation, trim and purge: the blob is one consistent state of the key.
        let _w = self.write().await?;
        let k = self.get_live(name)?;
        if k.algorithm.is_signing() {
            return Err(Refused::SigningKeyBackup(k.name.clone()).into());
        }
        // Nothing of an external key is in this HSM to back up (its reference is metadata).
        super::crypt::refuse_external(&k, "be backed up")?;
        let versions = k
            .versions
            .iter()
            .map(|v| (v.number, v.id, k.algorithm))
            .collect();
        let (domain, wrapped) = self
            .hsm
            .backup_versions(versions)
            .await
            .map_err(BrokerError::from)?
            .map_err(refused)?;
        let body = Body {
            key: k.name.to_string(),
            key_type: k.key_type.as_str().to_string(),
            algorithm: k.algorithm.as_str().to_string(),
            created_at_ms: k.created_at_ms,
            attributes: k.attributes.clone(),
            backed_up_at_ms: now_ms(),
            backed_up_by: by.to_string(),
            versions: k
                .versions
                .iter()
                .zip(wrapped)
                .map(|(v, w)| BodyVersion {
                    number: v.number,
                    id: v.id.hex(),
                    created_at_ms: v.created_at_ms,
                    origin: v.origin.as_str().to_string(),
                    expires_ms: v.expires_ms,
                    wrapped: B64.encode(&w.wrapped),
                    modulus: w.public.as_ref().map(|p| B64.encode(&p.modulus)),
                    exponent: w.public.as_ref().map(|p| B64.encode(&p.exponent)),
                })
                .collect(),
        };
        let body = serde_json::to_vec(&body).map_err(|e| BrokerError::internal(e.to_string()))?;
        let mut blob = frame(domain, &body)?;
        let mac = self
            .hsm
            .domain_mac(blob.clone())
            .await
            .map_err(BrokerError::from)?
            .map_err(refused)?;
        blob.extend_from_slice(&mac);
        // Recorded before the blob is handed out, so every purge or trim receipt of these
        // versions names it: a blob that could not be recorded is not returned.
        let record = BackupRecord {
            sha256: hex::encode(Sha256::digest(&blob)),
            version_ids: k.versions.iter().map(|v| v.id.hex()).collect(),
            made_at_ms: now_ms(),
            made_by: by.to_string(),
        };
        let (st, n, r) = (self.store.clone(), k.name.clone(), record.clone());
        blocking(move || st.record_backup(&n, &r).map_err(BrokerError::from)).await?;
        tracing::info!(key = %name, versions = k.versions.len(), domain = %domain,
            sha256 = %record.sha256, "key backed up");
        Ok(Made {
            blob,
            domain,
            versions: k.versions.len(),
            sha256: record.sha256,
        })
    }

    /// `RestoreKey`: brings a backed-up key back under its name with every version (same
    /// numbers and ids, so envelopes made before the backup unwrap again). All or nothing, and
    /// crash-safe: every version is recorded pending first and committed in one transaction
    /// after all objects exist and passed their checks; a crash in between is rolled back at
    /// the next start.
    pub async fn restore(&self, grant: &Grant, blob: &[u8]) -> Result<Arc<KeyEntry>, BrokerError> {
        let granted = grant.key_for(Permission::Restore)?;
        let p = parse(blob)?;
        let ours = self
            .hsm
            .domain_id()
            .await
            .map_err(BrokerError::from)?
            .map_err(refused)?;
        if p.domain != ours {
            return Err(Refused::OtherDomain {
                backup: p.domain,
                ours,
            }
            .into());
        }
        let authentic = self
            .hsm
            .domain_verify(p.signed.to_vec(), p.mac.to_vec())
            .await
            .map_err(BrokerError::from)?
            .map_err(refused)?;
        if !authentic {
            return Err(Invalid::BackupForged.into());
        }
        let plan = read_body(p.body)?;
        if !self.hsm.capabilities().supports(plan.algorithm) {
            return Err(Refused::CannotServe {
                algorithm: plan.algorithm,
                why: self.hsm.capabilities().why_not(plan.algorithm),
            }
            .into());
        }
        let mut attributes = plan.attributes;
        attributes.purge_protection |= self.settings.purge_protection;
        attributes.validate()?;
        let name = plan.name;
        if name != *granted {
            // The grant was made for the name read before the MAC was checked; a blob whose
            // authenticated name differs was tampered with.
            return Err(Invalid::BackupForged.into());
        }
        let _w = self.write().await?;
        self.name_free(&name)?;
        {
            let vmap = self.versions.read().unwrap_or_else(|p| p.into_inner());
            if let Some((v, _)) = plan.versions.iter().find(|(v, _)| vmap.contains_key(&v.id)) {
                return Err(Exists::VersionId(v.id).into());
            }
        }
        let in_use = self
            .hsm
            .ids_in_use(plan.versions.iter().map(|(v, _)| v.id).collect())
            .await
            .map_err(BrokerError::from)?;
        if let Some(id) = in_use.first() {
            return Err(Exists::Objects(*id).into());
        }
        let now = now_ms();
        let record = RestoredKey {
            name: name.clone(),
            key_type: plan.key_type,
            algorithm: plan.algorithm,
            created_at_ms: plan.created_at_ms,
            now_ms: now,
            attributes: attributes.clone(),
            versions: plan
                .versions
                .iter()
                .map(|(v, _)| (v.number, v.id, v.created_at_ms, v.origin, v.expires_ms))
                .collect(),
        };
        {
            let st = self.store.clone();
            blocking(move || st.begin_restore(&record).map_err(BrokerError::from)).await?;
        }
        failpoint::hit("restore.after_pending");
        let ids: Vec<VersionId> = plan.versions.iter().map(|(v, _)| v.id).collect();
        // Versions whose objects this restore may have made (a refusal before the unwrap, e.g.
        // objects with that id already in the token, made nothing, and those objects are not
        // ours to destroy).
        let touched = std::sync::Mutex::new(Vec::new());
        let made = async {
            let mut canaries = Vec::with_capacity(plan.versions.len());
            for (v, w) in &plan.versions {
                let spec = KekSpec {
                    id: v.id,
                    label: format!("{LABEL_PREFIX}{name}:v{}", v.number),
                    key_type: plan.key_type,
                    algorithm: plan.algorithm,
                    backup: true,
                };
                let r = self.hsm.restore_kek(spec, w.clone(), v.origin).await;
                if matches!(
                    &r,
                    Ok(Ok(()))
                        | Err(HsmError {
                            not_started: false,
                            ..
                        })
                ) {
                    touched.lock().unwrap_or_else(|p| p.into_inner()).push(v.id);
                }
                r.map_err(BrokerError::from)?.map_err(refused)?;
                let (env, digest) = self.new_canary(plan.algorithm, plan.key_type, v.id).await?;
                canaries.push((v.id, env, digest));
            }
            failpoint::hit("restore.after_hsm");
            let st = self.store.clone();
            let c2 = canaries.clone();
            blocking(move || st.commit_versions(&c2).map_err(BrokerError::from)).await?;
            Ok::<_, BrokerError>(canaries)
        }
        .await;
        let canaries = match made {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(key = %name, error = %e, "restore failed; rolling back");
                let touched = touched.into_inner().unwrap_or_else(|p| p.into_inner());
                for id in &ids {
                    let may_exist = touched.contains(id);
                    let rolled_back = RequestScope::new(None)
                        .run(self.roll_back(*id, may_exist))
                        .await;
                    if let Err(d) = rolled_back {
                        tracing::error!(error = %d, version_id = %id,
                            "could not roll back a half-restored version now; the maintenance task retries (and every start-up rolls it back)");
                        self.pending_rollbacks
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((*id, may_exist));
                    }
                }
                return Err(e);
            }
        };
        for (id, env, digest) in &canaries {
            if let Some(c) = super::integrity::canary_of(plan.algorithm, Some(env), Some(digest)) {
                self.hsm.set_canary(*id, c);
            }
        }
        let versions: Vec<VersionEntry> = plan.versions.into_iter().map(|(v, _)| v).collect();
        for v in &versions {
            self.register_version(&name, v);
        }
        let entry = self.replace(KeyEntry {
            name: name.clone(),
            key_type: plan.key_type,
            algorithm: plan.algorithm,
            created_at_ms: plan.created_at_ms,
            updated_at_ms: now,
            state: KeyState::Enabled,
            lifecycle: Lifecycle::Active,
            attributes,
            versions,
        });
        tracing::info!(key = %name, versions = entry.versions.len(), "key restored from a backup");
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob() -> Vec<u8> {
        let mut b = frame(VersionId([7; 16]), br#"{"key":"t/k"}"#).expect("frame");
        b.extend_from_slice(&[0u8; 32]);
        b
    }

    #[test]
    fn frames_and_parses() {
        let b = blob();
        let p = parse(&b).expect("parse");
        assert_eq!(p.domain, VersionId([7; 16]));
        assert_eq!(p.body, br#"{"key":"t/k"}"#);
        assert_eq!(p.signed.len(), b.len() - 32);
    }

    #[test]
    fn refuses_bad_framing() {
        let b = blob();
        for bad in [
            b[..b.len() - 1].to_vec(),
            [b.clone(), vec![0]].concat(),
            [b"KBBX".to_vec(), b[4..].to_vec()].concat(),
            {
                let mut x = b.clone();
                x[4] = 2;
                x
            },
            b[..20].to_vec(),
        ] {
            let e = parse(&bad).err().expect("refused");
            assert!(matches!(e, BrokerError::Invalid(_)), "{e:?}");
        }
    }

    #[test]
    fn plan_refuses_nonsense() {
        let v = |n: u32, id: u8| BodyVersion {
            number: n,
            id: hex::encode([id; 16]),
            created_at_ms: 1,
            origin: "generated".into(),
            expires_ms: None,
            wrapped: B64.encode([1u8; 40]),
            modulus: None,
            exponent: None,
        };
        let body = |versions| Body {
            key: "t/k".into(),
            key_type: "aes-256".into(),
            algorithm: "aes-256-gcm".into(),
            created_at_ms: 1,
            attributes: KeyAttributes::default(),
            backed_up_at_ms: 2,
            backed_up_by: "me".into(),
            versions,
        };
        assert!(plan(body(vec![v(1, 1), v(3, 2)])).is_ok());
        assert!(plan(body(vec![])).is_err());
        assert!(plan(body(vec![v(2, 1), v(1, 2)])).is_err());
        assert!(plan(body(vec![v(1, 1), v(2, 1)])).is_err());
        let mut half = v(1, 1);
        half.modulus = Some(B64.encode([1u8; 4]));
        assert!(plan(body(vec![half])).is_err());
    }
}
