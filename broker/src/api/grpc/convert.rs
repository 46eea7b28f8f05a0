//! Protobuf ↔ domain types for the `keybroker.v1` front door. Decoding refuses what the
//! domain cannot represent (an unknown enum value, a negative time) with INVALID_ARGUMENT; the
//! pipeline audits that refusal like any other.

use keybroker_proto::v1 as pb;

use crate::{
    error::{BrokerError, Invalid},
    hyok::HyokState,
    keys::{AttributePatch, KeyInfo, KeyState, Lifecycle},
    model::{Algorithm, KeyAttributes, KeyOp, KeyType, SignAlgorithm},
};

pub(super) fn algorithm_to_pb(a: Algorithm) -> pb::Algorithm {
    match a {
        Algorithm::Aes256Gcm => pb::Algorithm::Aes256Gcm,
        Algorithm::AesKeyWrapPad => pb::Algorithm::AesKeyWrapPad,
        Algorithm::AesKeyWrap => pb::Algorithm::AesKeyWrap,
        Algorithm::RsaOaepSha256 => pb::Algorithm::RsaOaepSha256,
        Algorithm::RsaOaepSha1 => pb::Algorithm::RsaOaepSha1,
        Algorithm::RsaSign => pb::Algorithm::RsaSign,
        Algorithm::Ecdsa => pb::Algorithm::Ecdsa,
    }
}

pub(super) fn algorithm_from_pb(v: i32) -> Result<Option<Algorithm>, BrokerError> {
    match pb::Algorithm::try_from(v) {
        Ok(pb::Algorithm::Unspecified) => Ok(None),
        Ok(pb::Algorithm::Aes256Gcm) => Ok(Some(Algorithm::Aes256Gcm)),
        Ok(pb::Algorithm::AesKeyWrapPad) => Ok(Some(Algorithm::AesKeyWrapPad)),
        Ok(pb::Algorithm::AesKeyWrap) => Ok(Some(Algorithm::AesKeyWrap)),
        Ok(pb::Algorithm::RsaOaepSha256) => Ok(Some(Algorithm::RsaOaepSha256)),
        Ok(pb::Algorithm::RsaOaepSha1) => Ok(Some(Algorithm::RsaOaepSha1)),
        Ok(pb::Algorithm::RsaSign) => Ok(Some(Algorithm::RsaSign)),
        Ok(pb::Algorithm::Ecdsa) => Ok(Some(Algorithm::Ecdsa)),
        Err(_) => Err(Invalid::Unknown {
            field: "algorithm",
            value: v,
        }
        .into()),
    }
}

pub(super) fn sign_algorithm_to_pb(a: SignAlgorithm) -> pb::SignatureAlgorithm {
    match a {
        SignAlgorithm::Es256 => pb::SignatureAlgorithm::Es256,
        SignAlgorithm::Es384 => pb::SignatureAlgorithm::Es384,
        SignAlgorithm::Rs256 => pb::SignatureAlgorithm::Rs256,
        SignAlgorithm::Rs384 => pb::SignatureAlgorithm::Rs384,
        SignAlgorithm::Rs512 => pb::SignatureAlgorithm::Rs512,
        SignAlgorithm::Ps256 => pb::SignatureAlgorithm::Ps256,
        SignAlgorithm::Ps384 => pb::SignatureAlgorithm::Ps384,
        SignAlgorithm::Ps512 => pb::SignatureAlgorithm::Ps512,
    }
}

/// A request's signature algorithm: required, and one this broker knows.
pub(super) fn sign_algorithm_from_pb(v: i32) -> Result<SignAlgorithm, BrokerError> {
    use pb::SignatureAlgorithm as P;
    Ok(match P::try_from(v) {
        Ok(P::Es256) => SignAlgorithm::Es256,
        Ok(P::Es384) => SignAlgorithm::Es384,
        Ok(P::Rs256) => SignAlgorithm::Rs256,
        Ok(P::Rs384) => SignAlgorithm::Rs384,
        Ok(P::Rs512) => SignAlgorithm::Rs512,
        Ok(P::Ps256) => SignAlgorithm::Ps256,
        Ok(P::Ps384) => SignAlgorithm::Ps384,
        Ok(P::Ps512) => SignAlgorithm::Ps512,
        Ok(P::Unspecified) => return Err(Invalid::Missing("algorithm").into()),
        Err(_) => {
            return Err(Invalid::Unknown {
                field: "algorithm",
                value: v,
            }
            .into());
        }
    })
}

pub(super) fn key_type_to_pb(t: KeyType) -> pb::KeyType {
    match t {
        KeyType::Aes256 => pb::KeyType::Aes256,
        KeyType::Rsa2048 => pb::KeyType::Rsa2048,
        KeyType::Rsa3072 => pb::KeyType::Rsa3072,
        KeyType::Rsa4096 => pb::KeyType::Rsa4096,
        KeyType::EcP256 => pb::KeyType::EcP256,
        KeyType::EcP384 => pb::KeyType::EcP384,
    }
}

pub(super) fn key_type_from_pb(v: i32) -> Result<KeyType, BrokerError> {
    match pb::KeyType::try_from(v) {
        Ok(pb::KeyType::Aes256) => Ok(KeyType::Aes256),
        Ok(pb::KeyType::Rsa2048) => Ok(KeyType::Rsa2048),
        Ok(pb::KeyType::Rsa3072) => Ok(KeyType::Rsa3072),
        Ok(pb::KeyType::Rsa4096) => Ok(KeyType::Rsa4096),
        Ok(pb::KeyType::EcP256) => Ok(KeyType::EcP256),
        Ok(pb::KeyType::EcP384) => Ok(KeyType::EcP384),
        Ok(pb::KeyType::Unspecified) => Err(Invalid::Missing("key_type").into()),
        Err(_) => Err(Invalid::Unknown {
            field: "key_type",
            value: v,
        }
        .into()),
    }
}

pub(super) fn op_to_pb(o: KeyOp) -> pb::KeyOperation {
    match o {
        KeyOp::Wrap => pb::KeyOperation::Wrap,
        KeyOp::Unwrap => pb::KeyOperation::Unwrap,
        KeyOp::GenerateDataKey => pb::KeyOperation::GenerateDataKey,
        KeyOp::Rewrap => pb::KeyOperation::Rewrap,
        KeyOp::Encrypt => pb::KeyOperation::Encrypt,
        KeyOp::Decrypt => pb::KeyOperation::Decrypt,
        KeyOp::Sign => pb::KeyOperation::Sign,
        KeyOp::Verify => pb::KeyOperation::Verify,
    }
}

pub(super) fn op_from_pb(v: i32) -> Result<KeyOp, BrokerError> {
    match pb::KeyOperation::try_from(v) {
        Ok(pb::KeyOperation::Wrap) => Ok(KeyOp::Wrap),
        Ok(pb::KeyOperation::Unwrap) => Ok(KeyOp::Unwrap),
        Ok(pb::KeyOperation::GenerateDataKey) => Ok(KeyOp::GenerateDataKey),
        Ok(pb::KeyOperation::Rewrap) => Ok(KeyOp::Rewrap),
        Ok(pb::KeyOperation::Encrypt) => Ok(KeyOp::Encrypt),
        Ok(pb::KeyOperation::Decrypt) => Ok(KeyOp::Decrypt),
        Ok(pb::KeyOperation::Sign) => Ok(KeyOp::Sign),
        Ok(pb::KeyOperation::Verify) => Ok(KeyOp::Verify),
        _ => Err(Invalid::Unknown {
            field: "key operation",
            value: v,
        }
        .into()),
    }
}

pub(super) fn opt_time(v: i64, what: &'static str) -> Result<Option<i64>, BrokerError> {
    match v {
        0 => Ok(None),
        v if v > 0 => Ok(Some(v)),
        _ => Err(Invalid::Negative(what).into()),
    }
}

pub(super) fn attributes_to_pb(a: &KeyAttributes) -> pb::KeyAttributes {
    pb::KeyAttributes {
        enabled: Some(a.enabled),
        not_before_ms: a.not_before_ms.unwrap_or(0),
        expires_ms: a.expires_ms.unwrap_or(0),
        operations: Some(pb::KeyOperations {
            operations: a.operations.iter().map(|o| op_to_pb(*o).into()).collect(),
        }),
        tags: Some(pb::KeyTags {
            tags: a.tags.clone().into_iter().collect(),
        }),
        min_decryption_version: a.min_decryption_version,
        purge_protection: Some(a.purge_protection),
        rotation_period_ms: a.rotation_period_ms.unwrap_or(0),
        version_expiry_ms: a.version_expiry_ms.unwrap_or(0),
    }
}

/// Attributes for a new key: unset fields take their defaults.
pub(super) fn attributes_from_pb(
    a: Option<pb::KeyAttributes>,
) -> Result<KeyAttributes, BrokerError> {
    // Operations unset: an empty set, which the keyring fills with the algorithm's defaults.
    let mut out = KeyAttributes {
        operations: Default::default(),
        ..KeyAttributes::default()
    };
    let Some(a) = a else { return Ok(out) };
    if let Some(e) = a.enabled {
        out.enabled = e;
    }
    out.not_before_ms = opt_time(a.not_before_ms, "not_before_ms")?;
    out.expires_ms = opt_time(a.expires_ms, "expires_ms")?;
    out.rotation_period_ms = opt_time(a.rotation_period_ms, "rotation_period_ms")?;
    out.version_expiry_ms = opt_time(a.version_expiry_ms, "version_expiry_ms")?;
    // Named: exactly those, checked against the algorithm (wrapping operations on a signing
    // key are refused, not replaced).
    out.operations = match a.operations {
        None => Default::default(),
        Some(ops) if ops.operations.is_empty() => return Err(Invalid::NoOperations.into()),
        Some(ops) => ops
            .operations
            .into_iter()
            .map(op_from_pb)
            .collect::<Result<_, _>>()?,
    };
    if let Some(t) = a.tags {
        out.tags = t.tags.into_iter().collect();
    }
    if a.min_decryption_version > 1 {
        return Err(Invalid::NewKeyMinVersion.into());
    }
    if let Some(p) = a.purge_protection {
        out.purge_protection = p;
    }
    out.validate()?;
    Ok(out)
}

pub(super) fn patch_from_pb(r: pb::UpdateKeyRequest) -> Result<AttributePatch, BrokerError> {
    let a = r.attributes.unwrap_or_default();
    Ok(AttributePatch {
        enabled: a.enabled,
        times: if r.set_times {
            Some((
                opt_time(a.not_before_ms, "not_before_ms")?,
                opt_time(a.expires_ms, "expires_ms")?,
                opt_time(a.rotation_period_ms, "rotation_period_ms")?,
                opt_time(a.version_expiry_ms, "version_expiry_ms")?,
            ))
        } else {
            if a.not_before_ms != 0
                || a.expires_ms != 0
                || a.rotation_period_ms != 0
                || a.version_expiry_ms != 0
            {
                return Err(Invalid::TimesWithoutSetTimes.into());
            }
            None
        },
        operations: match a.operations {
            Some(ops) => Some(
                ops.operations
                    .into_iter()
                    .map(op_from_pb)
                    .collect::<Result<_, _>>()?,
            ),
            None => None,
        },
        tags: a.tags.map(|t| t.tags.into_iter().collect()),
        min_decryption_version: (a.min_decryption_version != 0).then_some(a.min_decryption_version),
        purge_protection: a.purge_protection,
    })
}

/// A key as the API shows it.
pub(super) fn key_to_pb(k: &KeyInfo) -> pb::Key {
    let e = &k.entry;
    pb::Key {
        name: e.name.to_string(),
        tenant: e.name.tenant().to_string(),
        key_type: key_type_to_pb(e.key_type).into(),
        algorithm: algorithm_to_pb(e.algorithm).into(),
        state: match (&e.lifecycle, &e.state) {
            (Lifecycle::Deleted { .. }, _) => pb::KeyState::Deleted,
            (_, KeyState::Quarantined(_)) => pb::KeyState::Quarantined,
            _ if !e.attributes.enabled => pb::KeyState::Disabled,
            _ => pb::KeyState::Enabled,
        }
        .into(),
        created_at_ms: e.created_at_ms,
        current_version: e.versions.last().map(|v| v.number).unwrap_or(0),
        versions: versions_to_pb(k),
        mechanism: k.mechanism.clone(),
        attributes: Some(attributes_to_pb(&e.attributes)),
        updated_at_ms: e.updated_at_ms,
        external: e
            .attributes
            .external
            .as_ref()
            .map(|x| pb::ExternalKeyReference {
                proxy: x.proxy.clone(),
                remote_key: x.remote_key.clone(),
            }),
        double: e.attributes.double.as_ref().map(|d| pb::DoubleKeyMembers {
            local: d.local.clone(),
            external: d.external.clone(),
        }),
    }
}

/// A key's versions, oldest first, with their usage.
pub(super) fn versions_to_pb(k: &KeyInfo) -> Vec<pb::KeyVersion> {
    let e = &k.entry;
    e.versions
        .iter()
        .zip(
            k.usage
                .iter()
                .copied()
                .chain(std::iter::repeat(Default::default())),
        )
        .map(|(v, u)| pb::KeyVersion {
            version: v.number,
            id: v.id.as_bytes().to_vec(),
            created_at_ms: v.created_at_ms,
            origin: v.origin.as_str().into(),
            expires_ms: v.expires_ms.unwrap_or(0),
            decryptable: e.decryptable(v),
            wraps: u.wraps,
            unwraps: u.unwraps,
            last_used_ms: u.last_used_ms,
        })
        .collect()
}

/// A soft-deleted key as the API shows it.
pub(super) fn deleted_to_pb(k: &KeyInfo) -> pb::DeletedKey {
    let (deleted_at_ms, scheduled_purge_ms, deleted_by) = match &k.entry.lifecycle {
        Lifecycle::Deleted {
            deleted_at_ms,
            purge_at_ms,
            deleted_by,
        } => (*deleted_at_ms, *purge_at_ms, deleted_by.clone()),
        Lifecycle::Active => (0, 0, String::new()),
    };
    pb::DeletedKey {
        key: Some(key_to_pb(k)),
        deleted_at_ms,
        scheduled_purge_ms,
        deleted_by,
    }
}

pub(super) fn hyok_to_pb(s: HyokState) -> pb::HyokState {
    pb::HyokState {
        connected: s.connected,
        changed_at_ms: s.changed_at_ms,
        changed_by: s.changed_by,
        reason: s.reason,
    }
}

pub(super) fn item_error(e: &BrokerError) -> pb::ItemError {
    let status = tonic::Status::from(e.clone());
    pb::ItemError {
        code: status.code() as i32,
        message: status.message().to_string(),
    }
}
