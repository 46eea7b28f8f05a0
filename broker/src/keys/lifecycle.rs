//! The key lifecycle of a Managed HSM: create, import (BYOK), rotate (also automatically),
//! update attributes, soft delete, recover, purge (cryptographic erasure with a receipt) and
//! trim old versions — each crash-safe (see `store`), each serialised with the others.
//!
//! ```text
//!            CreateKey / ImportKey
//!                    │
//!                    ▼
//!   ┌──────────► ACTIVE ──── UpdateKey (enable/disable, dates, operations, tags, min version)
//!   │            │  ▲  │──── RotateKey / rotation policy ──► new version (max 100)
//!   │ RecoverKey │  │  └──── TrimKeyVersions ──► versions below min decryption version destroyed
//!   │            ▼  │
//!   └─────── DELETED (soft: every operation refused, name reserved)
//!                │
//!                │ PurgeKey (refused before the scheduled date under purge protection)
//!                │ or the scheduled date passes (maintenance task)
//!                ▼
//!            PURGED: HSM objects of every version destroyed, metadata forgotten,
//!                    destruction receipt in the audit trail; envelopes can never unwrap again
//! ```

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
};

use sha2::{Digest, Sha256};

use super::{
    KeyEntry, KeyState, Keyring, Lifecycle, Receipt, VersionEntry, blocking, crypt::fill_random,
    integrity::canary_of,
};
use crate::{
    audit::Record,
    envelope,
    error::{BrokerError, Exists, Invalid, NotFound, Refused, Unavailable},
    failpoint,
    hsm::{KekSpec, RequestScope, RsaPublic, template::LABEL_PREFIX},
    model::{
        Algorithm, Dek, DoubleRef, ExternalRef, KeyAttributes, KeyName, KeyOp, KeyType,
        MAX_VERSIONS, Origin, VersionId, now_ms,
    },
    policy::{Grant, Permission},
    store::StoredLifecycle,
};

/// Store setting holding the BYOK import keys (id → expiry).
const SETTING_IMPORT_KEYS: &str = "byok.import_keys";
/// How long a BYOK import key lives.
pub const IMPORT_KEY_TTL_MS: i64 = 24 * 3600 * 1000;

/// not-before, expires, rotation period, version expiry (`None` = cleared).
pub type Times = (Option<i64>, Option<i64>, Option<i64>, Option<i64>);

/// A change to a key's attributes (unset = unchanged).
#[derive(Clone, Debug, Default)]
pub struct AttributePatch {
    /// Enable/disable.
    pub enabled: Option<bool>,
    /// The four time fields, applied together.
    pub times: Option<Times>,
    /// Replace the operations.
    pub operations: Option<std::collections::BTreeSet<crate::model::KeyOp>>,
    /// Replace the tags.
    pub tags: Option<std::collections::BTreeMap<String, String>>,
    /// New minimum decryption version.
    pub min_decryption_version: Option<u32>,
    /// Turn purge protection on.
    pub purge_protection: Option<bool>,
}

/// What `CreateImportKey` returns.
#[derive(Debug)]
pub struct ImportKeyInfo {
    /// The id.
    pub id: VersionId,
    /// The public key.
    pub public: RsaPublic,
    /// The OAEP algorithm the customer must use.
    pub oaep: Algorithm,
    /// Import before this (ms).
    pub expires_ms: i64,
    /// The algorithm of the key it imports.
    pub algorithm: Algorithm,
}

/// One BYOK import key, as the store keeps it (setting `byok.import_keys`, a JSON map by id).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum ImportKeyRecord {
    /// Made by a keybroker before import keys forced their template (only its expiry): never
    /// used, destroyed when it expires.
    Legacy(i64),
    /// An import key with an enforced unwrap template.
    Made {
        /// Import before this (ms); destroyed then.
        expires_ms: i64,
        /// The algorithm of the key it imports (its forced template's).
        algorithm: String,
        /// `[lifecycle] backup` when it was made (its forced template's extractability).
        backup: bool,
        /// Its RSA size.
        bits: u32,
        /// Whether it has served its one import.
        used: bool,
    },
}

impl ImportKeyRecord {
    fn expires_ms(&self) -> i64 {
        match self {
            Self::Legacy(e) | Self::Made { expires_ms: e, .. } => *e,
        }
    }
}

impl Keyring {
    pub(crate) fn replace(&self, entry: KeyEntry) -> Arc<KeyEntry> {
        let entry = Arc::new(entry);
        self.local_change(|| {
            self.keys
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(entry.name.clone(), entry.clone());
        });
        entry
    }

    pub(crate) fn register_version(&self, name: &KeyName, v: &VersionEntry) {
        self.local_change(|| {
            self.versions
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(v.id, (name.clone(), v.number));
            self.usage
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(v.id)
                .or_default();
        });
    }

    fn resolve_algorithm(
        &self,
        key_type: KeyType,
        algorithm: Option<Algorithm>,
    ) -> Result<Algorithm, BrokerError> {
        let caps = self.hsm.capabilities();
        let algorithm = algorithm.unwrap_or(if key_type.is_rsa() {
            caps.default_rsa_algorithm()
        } else if key_type.is_ec() {
            Algorithm::Ecdsa
        } else {
            Algorithm::Aes256Gcm
        });
        if !algorithm.fits(key_type) {
            return Err(Invalid::AlgorithmForType {
                algorithm,
                key_type,
            }
            .into());
        }
        if let Err(why) = caps.key_type_fits(key_type) {
            return Err(Refused::CannotCreate(why).into());
        }
        if !caps.supports(algorithm) {
            return Err(Refused::CannotServe {
                algorithm,
                why: caps.why_not(algorithm),
            }
            .into());
        }
        Ok(algorithm)
    }

    fn new_attributes(
        &self,
        algorithm: Algorithm,
        mut attrs: KeyAttributes,
    ) -> Result<KeyAttributes, BrokerError> {
        // No operations named: the algorithm's defaults (sign and verify for a signing key).
        // Operations named are kept as named, and must fit the algorithm.
        if attrs.operations.is_empty() {
            attrs.operations = if algorithm.is_signing() {
                KeyOp::SIGNING.into_iter().collect()
            } else {
                KeyOp::DEFAULT.into_iter().collect()
            };
        }
        check_operations(algorithm, &attrs.operations)?;
        attrs.purge_protection |= self.settings.purge_protection;
        attrs.validate()?;
        if attrs.min_decryption_version != 1 {
            return Err(Invalid::NewKeyMinVersion.into());
        }
        Ok(attrs)
    }

    /// Creates a key with one version generated inside the HSM.
    pub async fn create(
        &self,
        grant: &Grant,
        key_type: KeyType,
        algorithm: Option<Algorithm>,
        attributes: KeyAttributes,
    ) -> Result<Arc<KeyEntry>, BrokerError> {
        let name = grant.key_for(Permission::Create)?.clone();
        let algorithm = self.resolve_algorithm(key_type, algorithm)?;
        let attributes = self.new_attributes(algorithm, attributes)?;
        let _w = self.write().await?;
        self.new_key(name, key_type, algorithm, attributes, None)
            .await
    }

    /// A new key with one version: recorded as pending (phase 1), its HSM object made —
    /// generated, or imported from `import` — and proven (phase 2, see `materialize`), then
    /// served. The caller holds the write lock.
    async fn new_key(
        &self,
        name: KeyName,
        key_type: KeyType,
        algorithm: Algorithm,
        attributes: KeyAttributes,
        import: Option<(VersionId, Algorithm, Vec<u8>)>,
    ) -> Result<Arc<KeyEntry>, BrokerError> {
        self.name_free(&name)?;
        let origin = if import.is_some() {
            Origin::Imported
        } else {
            Origin::Generated
        };
        let id = VersionId::random();
        let now = now_ms();
        {
            let (st, n, a) = (self.store.clone(), name.clone(), attributes.clone());
            blocking(move || {
                st.begin_create(&n, key_type, algorithm, &a, origin, id, now)
                    .map_err(BrokerError::from)
            })
            .await?;
        }
        let after_hsm = match origin {
            Origin::Generated => {
                failpoint::hit("create.after_pending");
                "create.after_hsm"
            }
            _ => "import.after_hsm",
        };
        let spec = KekSpec {
            id,
            label: format!("{LABEL_PREFIX}{name}:v1"),
            key_type,
            algorithm,
            // A signing key's private half never leaves the HSM, not even for a backup.
            backup: self.settings.backup && !algorithm.is_signing(),
        };
        self.materialize(&name, spec, 1, after_hsm, import).await?;
        let entry =
            self.install_first_version(&name, (key_type, algorithm), attributes, id, origin, now);
        match origin {
            Origin::Generated => {
                tracing::info!(key = %name, key_type = key_type.as_str(), %algorithm, version_id = %id, "key created")
            }
            _ => tracing::info!(key = %name, %algorithm, version_id = %id, "key imported (BYOK)"),
        }
        Ok(entry)
    }

    /// Creates an external key by reference: its one version lives behind the remote EKM proxy
    /// `reference.proxy` as `reference.remote_key`. The remote's metadata decides the key type
    /// and algorithm; a round trip (a random canary wrapped and unwrapped through the proxy)
    /// proves the key serves both ways before anything is stored. Nothing is created when the
    /// proxy is not configured or unreachable, or the remote key is missing or unusable.
    pub async fn create_external(
        &self,
        grant: &Grant,
        reference: ExternalRef,
        mut attributes: KeyAttributes,
    ) -> Result<Arc<KeyEntry>, BrokerError> {
        let name = grant.key_for(Permission::Create)?.clone();
        let remote_key = &reference.remote_key;
        if remote_key.is_empty()
            || remote_key.len() > 64
            || !remote_key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(Invalid::Value {
                field: "external.remote_key",
                expected: "1-64 characters of [A-Za-z0-9-] (an EKM proxy key name)",
            }
            .into());
        }
        self.name_free(&name)?;
        let proxy = self.proxy(&reference.proxy)?;
        let remote = proxy.metadata(remote_key).await?.value;
        // No operations named: an external key's (wrap, unwrap, generate).
        if attributes.operations.is_empty() {
            attributes.operations = KeyOp::EXTERNAL.into_iter().collect();
        }
        attributes.external = Some(reference.clone());
        check_external(&name, &attributes)?;
        let attributes = self.new_attributes(remote.algorithm, attributes)?;
        // The round trip: the canary's envelope and digest are stored with the version, as a
        // local version's are (a later check can prove the remote key is still the same key).
        let id = VersionId::random();
        let mut value = [0u8; 32];
        fill_random(&mut value)?;
        let canary = Dek::from_slice(&value);
        value.fill(0);
        let digest = Sha256::digest(canary.expose()).to_vec();
        let ct = proxy
            .wrap(remote_key, remote.algorithm, &canary)
            .await?
            .value;
        let back = proxy.unwrap(remote_key, remote.algorithm, &ct).await?.value;
        if back != canary {
            return Err(Refused::RemoteKeyUnusable {
                proxy: reference.proxy.clone(),
                remote_key: remote_key.clone(),
                why: "a value wrapped through it did not unwrap to the same value".into(),
            }
            .into());
        }
        let env = envelope::seal(envelope::header(remote.algorithm, id, &[]), &ct);
        let entry = self
            .store_without_object(
                &name,
                (remote.key_type, remote.algorithm),
                attributes,
                id,
                (env, digest),
            )
            .await?;
        tracing::info!(key = %name, proxy = %reference.proxy, remote_key = %reference.remote_key,
            key_type = remote.key_type.as_str(), algorithm = %remote.algorithm, version_id = %id, "external key created");
        Ok(entry)
    }

    /// Creates a double key (double key encryption): each DEK it wraps is split into two
    /// shares, one wrapped under `members.local` in this HSM, the other through the external
    /// key `members.external`'s proxy (`docs/src/dke.md`). Both members must exist, live, in
    /// the double key's tenant; the local one an AES-256-GCM key that may wrap and unwrap (its
    /// AAD binds the two halves together), the external one an external key. Nothing is created
    /// otherwise. The key has one version with no HSM object: its envelopes name it.
    pub async fn create_double(
        &self,
        grant: &Grant,
        members: DoubleRef,
        mut attributes: KeyAttributes,
    ) -> Result<Arc<KeyEntry>, BrokerError> {
        let name = grant.key_for(Permission::Create)?.clone();
        self.name_free(&name)?;
        let member = |m: &str, external: bool| -> Result<(), BrokerError> {
            let refuse = |why| Refused::DoubleMember {
                key: name.clone(),
                member: m.to_string(),
                why,
            };
            let Ok(k) = KeyName::parse(m) else {
                return Err(Invalid::Value {
                    field: "double",
                    expected: "two key names, \"tenant/name\"",
                }
                .into());
            };
            if k.tenant() != name.tenant() {
                return Err(Invalid::Value {
                    field: "double",
                    expected: "two keys in the double key's own tenant",
                }
                .into());
            }
            let e = self.get(&k).map_err(|_| refuse("does not exist"))?;
            if !matches!(e.lifecycle, Lifecycle::Active) {
                return Err(refuse("is deleted").into());
            }
            if e.attributes.double.is_some() {
                return Err(refuse("is itself a double key").into());
            }
            if external {
                if e.attributes.external.is_none() {
                    return Err(refuse("is not an external key").into());
                }
                return Ok(());
            }
            if e.attributes.external.is_some() {
                return Err(refuse("is an external key, not a key of this broker's HSM").into());
            }
            if e.algorithm != Algorithm::Aes256Gcm {
                return Err(refuse(
                    "is not an AES-256-GCM key (its AAD binds the two halves of an envelope)",
                )
                .into());
            }
            if !(e.attributes.operations.contains(&KeyOp::Wrap)
                && e.attributes.operations.contains(&KeyOp::Unwrap))
            {
                return Err(refuse("does not allow both wrap and unwrap").into());
            }
            Ok(())
        };
        member(&members.local, false)?;
        member(&members.external, true)?;
        if attributes.operations.is_empty() {
            attributes.operations = KeyOp::EXTERNAL.into_iter().collect();
        }
        attributes.double = Some(members.clone());
        check_external(&name, &attributes)?;
        let attributes = self.new_attributes(Algorithm::Aes256Gcm, attributes)?;
        let id = VersionId::random();
        // No canary: the version is no HSM object (start-up skips it); each member proved
        // itself when it was made.
        let entry = self
            .store_without_object(
                &name,
                (KeyType::Aes256, Algorithm::Aes256Gcm),
                attributes,
                id,
                (Vec::new(), Vec::new()),
            )
            .await?;
        tracing::info!(key = %name, local = %members.local, external = %members.external,
            version_id = %id, "double key created");
        Ok(entry)
    }

    /// Stores a key whose one version `id` is no object in this HSM (an external or a double
    /// key), with the same two-phase write as a local key: a pending row, then the version
    /// (with `canary`: its envelope and digest), then the key in memory.
    async fn store_without_object(
        &self,
        name: &KeyName,
        (key_type, algorithm): (KeyType, Algorithm),
        attributes: KeyAttributes,
        id: VersionId,
        (env, digest): (Vec<u8>, Vec<u8>),
    ) -> Result<Arc<KeyEntry>, BrokerError> {
        let _w = self.write().await?;
        self.name_free(name)?;
        let now = now_ms();
        {
            let (st, n, a) = (self.store.clone(), name.clone(), attributes.clone());
            blocking(move || {
                st.begin_create(&n, key_type, algorithm, &a, Origin::Generated, id, now)
                    .map_err(BrokerError::from)
            })
            .await?;
        }
        let st = self.store.clone();
        let committed = blocking(move || {
            st.commit_version(id, &env, &digest)
                .map_err(BrokerError::from)
        })
        .await;
        if let Err(e) = committed {
            // No HSM object was made: only the pending row goes.
            if let Err(d) = RequestScope::new(None).run(self.roll_back(id, false)).await {
                tracing::error!(error = %d, version_id = %id, "could not roll back a half-made key now; the maintenance task retries");
                self.pending_rollbacks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((id, false));
            }
            return Err(e);
        }
        Ok(self.install_first_version(
            name,
            (key_type, algorithm),
            attributes,
            id,
            Origin::Generated,
            now,
        ))
    }

    /// Serves a key just committed with its first version `id`: the version is registered and
    /// the key's entry installed (enabled, active).
    fn install_first_version(
        &self,
        name: &KeyName,
        (key_type, algorithm): (KeyType, Algorithm),
        attributes: KeyAttributes,
        id: VersionId,
        origin: Origin,
        now: i64,
    ) -> Arc<KeyEntry> {
        let v = VersionEntry {
            number: 1,
            id,
            created_at_ms: now,
            origin,
            expires_ms: None,
        };
        self.register_version(name, &v);
        self.replace(KeyEntry {
            name: name.clone(),
            key_type,
            algorithm,
            created_at_ms: now,
            updated_at_ms: now,
            state: KeyState::Enabled,
            lifecycle: Lifecycle::Active,
            attributes,
            versions: vec![v],
        })
    }

    /// A name is free unless a key (also a soft-deleted one) has it.
    pub(crate) fn name_free(&self, name: &KeyName) -> Result<(), BrokerError> {
        match self.get(name) {
            Err(_) => Ok(()),
            Ok(k) if matches!(k.lifecycle, Lifecycle::Deleted { .. }) => {
                Err(Exists::Deleted(name.clone()).into())
            }
            Ok(_) => Err(Exists::Key(name.to_string()).into()),
        }
    }

    /// Adds a version generated inside the HSM; new wraps use it.
    pub async fn rotate(&self, grant: &Grant) -> Result<Arc<KeyEntry>, BrokerError> {
        let name = grant.key_for(Permission::Rotate)?;
        let _w = self.write().await?;
        self.rotate_locked(name).await
    }

    async fn rotate_locked(&self, name: &KeyName) -> Result<Arc<KeyEntry>, BrokerError> {
        let old = self.get_live(name)?;
        old.usable()?;
        // An external key's versions are the remote's: it rotates on the proxy's side.
        super::crypt::refuse_external(&old, "rotate")?;
        if old.versions.len() >= MAX_VERSIONS {
            return Err(Refused::TooManyVersions {
                key: name.clone(),
                max: MAX_VERSIONS,
            }
            .into());
        }
        let id = VersionId::random();
        let now = now_ms();
        let expires = old
            .attributes
            .version_expiry_ms
            .map(|t| now.saturating_add(t));
        let number = {
            let (st, n) = (self.store.clone(), name.clone());
            blocking(move || {
                st.begin_rotate(&n, id, now, expires)
                    .map_err(BrokerError::from)
            })
            .await?
        };
        let spec = KekSpec {
            id,
            label: format!("{LABEL_PREFIX}{name}:v{number}"),
            key_type: old.key_type,
            algorithm: old.algorithm,
            backup: self.settings.backup && !old.algorithm.is_signing(),
        };
        self.materialize(name, spec, number, "rotate.after_hsm", None)
            .await?;
        let mut entry = (*old).clone();
        let v = VersionEntry {
            number,
            id,
            created_at_ms: now,
            origin: Origin::Generated,
            expires_ms: expires,
        };
        self.register_version(name, &v);
        entry.versions.push(v);
        tracing::info!(key = %name, version = number, version_id = %id, "key rotated");
        Ok(self.replace(entry))
    }

    /// Phases 2 and 3 of a create/rotate/import: make the HSM object (generated, or imported from
    /// `import`), check it, make and verify the canary, mark the version active. Undoes phase 1
    /// on failure.
    async fn materialize(
        &self,
        name: &KeyName,
        spec: KekSpec,
        number: u32,
        failpoint_name: &str,
        import: Option<(VersionId, Algorithm, Vec<u8>)>,
    ) -> Result<(), BrokerError> {
        let (id, algorithm, key_type) = (spec.id, spec.algorithm, spec.key_type);
        // Whether an HSM object may exist under `id` if this fails (no: the HSM was never
        // asked to make it).
        let mut may_exist = true;
        let result = async {
            let made = match import {
                None => self.hsm.generate_kek(spec).await,
                Some((import_id, oaep, material)) => {
                    self.hsm.import_kek(import_id, oaep, material, spec).await
                }
            };
            if let Err(e) = made {
                may_exist = !e.not_started;
                return Err(match e.kind {
                    crate::hsm::FaultKind::DataInvalid => {
                        Invalid::MaterialDoesNotUnwrap(e.detail).into()
                    }
                    _ => BrokerError::from(e),
                });
            }
            failpoint::hit(failpoint_name);
            let (env, digest) = self.new_canary(algorithm, key_type, id).await?;
            let canary = canary_of(algorithm, Some(&env), Some(&digest));
            let st = self.store.clone();
            blocking(move || {
                st.commit_version(id, &env, &digest)
                    .map_err(BrokerError::from)
            })
            .await?;
            if let Some(c) = canary {
                self.hsm.set_canary(id, c);
            }
            Ok(())
        }
        .await;
        if let Err(e) = &result {
            tracing::warn!(key = %name, version = number, error = %e, "key version creation failed; rolling back");
            // Cleanup is not bound by the request's deadline (it may be why we are here).
            let rolled_back = RequestScope::new(None)
                .run(self.roll_back(id, may_exist))
                .await;
            if let Err(d) = rolled_back {
                tracing::error!(error = %d, version_id = %id,
                    "could not roll back the half-made key version now; the maintenance task retries (and every start-up rolls it back)");
                self.pending_rollbacks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((id, may_exist));
            }
        }
        result
    }

    /// Undoes phase 1 (and 2, if `may_exist`) of a creation: destroys any HSM object with the
    /// version's id, then removes the pending version row.
    pub(crate) async fn roll_back(
        &self,
        id: VersionId,
        may_exist: bool,
    ) -> Result<(), BrokerError> {
        if may_exist {
            self.hsm.destroy_kek(id).await.map_err(BrokerError::from)?;
        }
        let st = self.store.clone();
        blocking(move || st.abort_version(id).map_err(BrokerError::from)).await
    }

    /// Retries the rollbacks that failed (HSM unavailable at the time).
    async fn retry_rollbacks(&self) {
        let pending: Vec<_> = std::mem::take(
            &mut *self
                .pending_rollbacks
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (id, may_exist) in pending {
            match self.roll_back(id, may_exist).await {
                Ok(()) => tracing::info!(version_id = %id, "rolled back a half-made key version"),
                Err(e) => {
                    tracing::warn!(version_id = %id, error = %e, "rollback of a half-made key version failed again; will retry");
                    self.pending_rollbacks
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((id, may_exist));
                }
            }
        }
    }

    /// Changes attributes. Purge protection can only be turned on; the minimum decryption
    /// version can only name an existing version.
    pub async fn update(
        &self,
        grant: &Grant,
        patch: AttributePatch,
    ) -> Result<Arc<KeyEntry>, BrokerError> {
        let name = grant.key_for(Permission::Update)?;
        let _w = self.write().await?;
        let old = self.get_live(name)?;
        let mut a = old.attributes.clone();
        if let Some(e) = patch.enabled {
            a.enabled = e;
        }
        if let Some((nb, exp, rot, vexp)) = patch.times {
            a.not_before_ms = nb;
            a.expires_ms = exp;
            a.rotation_period_ms = rot;
            a.version_expiry_ms = vexp;
        }
        if let Some(ops) = patch.operations {
            check_operations(old.algorithm, &ops)?;
            a.operations = ops;
        }
        check_external(name, &a)?;
        if let Some(tags) = patch.tags {
            a.tags = tags;
        }
        if let Some(m) = patch.min_decryption_version {
            let current = old.current()?.number;
            if m == 0 || m > current {
                return Err(Invalid::MinVersionRange { current }.into());
            }
            a.min_decryption_version = m;
        }
        match patch.purge_protection {
            Some(true) => a.purge_protection = true,
            Some(false) if a.purge_protection => {
                return Err(Refused::PurgeProtectionOn(name.clone()).into());
            }
            _ => {}
        }
        a.validate()?;
        let now = now_ms();
        let (st, n, a2) = (self.store.clone(), name.clone(), a.clone());
        blocking(move || {
            st.update_attributes(&n, &a2, now)
                .map_err(BrokerError::from)
        })
        .await?;
        let mut entry = (*old).clone();
        entry.attributes = a;
        entry.updated_at_ms = now;
        tracing::info!(key = %name, "key attributes updated");
        Ok(self.replace(entry))
    }

    /// Soft-deletes a key.
    pub async fn delete(&self, grant: &Grant, by: &str) -> Result<Arc<KeyEntry>, BrokerError> {
        let name = grant.key_for(Permission::Delete)?;
        let _w = self.write().await?;
        let old = self.get_live(name)?;
        let now = now_ms();
        let lc = StoredLifecycle::Deleted {
            deleted_at_ms: now,
            purge_at_ms: now.saturating_add(self.settings.retention_ms),
            deleted_by: by.to_string(),
        };
        let (st, n, l) = (self.store.clone(), name.clone(), lc.clone());
        blocking(move || st.set_lifecycle(&n, &l).map_err(BrokerError::from)).await?;
        let mut entry = (*old).clone();
        if let StoredLifecycle::Deleted {
            deleted_at_ms,
            purge_at_ms,
            deleted_by,
        } = lc
        {
            entry.lifecycle = Lifecycle::Deleted {
                deleted_at_ms,
                purge_at_ms,
                deleted_by,
            };
        }
        tracing::info!(key = %name, by, "key soft-deleted");
        Ok(self.replace(entry))
    }

    /// A soft-deleted key (for reading its metadata).
    pub fn deleted(&self, grant: &Grant) -> Result<Arc<KeyEntry>, BrokerError> {
        self.get_deleted(grant.key_for(Permission::ReadMetadata)?)
    }

    /// A soft-deleted key.
    pub(super) fn get_deleted(&self, name: &KeyName) -> Result<Arc<KeyEntry>, BrokerError> {
        let k = self.get(name)?;
        match k.lifecycle {
            Lifecycle::Deleted { .. } => Ok(k),
            Lifecycle::Active => Err(NotFound::NotDeleted(name.clone()).into()),
        }
    }

    /// A tenant's soft-deleted keys.
    pub fn list_deleted(&self, tenant: &str) -> Vec<Arc<KeyEntry>> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|k| {
                k.name.tenant() == tenant && matches!(k.lifecycle, Lifecycle::Deleted { .. })
            })
            .cloned()
            .collect()
    }

    /// Brings a soft-deleted key back exactly as it was.
    pub async fn recover(&self, grant: &Grant) -> Result<Arc<KeyEntry>, BrokerError> {
        let name = grant.key_for(Permission::Recover)?;
        let _w = self.write().await?;
        let old = self.get_deleted(name)?;
        let (st, n) = (self.store.clone(), name.clone());
        blocking(move || {
            st.set_lifecycle(&n, &StoredLifecycle::Active)
                .map_err(BrokerError::from)
        })
        .await?;
        let mut entry = (*old).clone();
        entry.lifecycle = Lifecycle::Active;
        tracing::info!(key = %name, "key recovered");
        Ok(self.replace(entry))
    }

    /// Purges a soft-deleted key: destroys every version's HSM objects and forgets the key.
    /// Refused before the scheduled date while purge protection is on (for every caller).
    pub async fn purge(&self, grant: &Grant, by: &str) -> Result<Receipt, BrokerError> {
        let name = grant.key_for(Permission::Purge)?;
        let _w = self.write().await?;
        let k = self.get_deleted(name)?;
        let Lifecycle::Deleted { purge_at_ms, .. } = k.lifecycle else {
            return Err(NotFound::NotDeleted(name.clone()).into());
        };
        if (k.attributes.purge_protection || self.settings.purge_protection)
            && now_ms() < purge_at_ms
        {
            return Err(Refused::PurgeProtected {
                key: name.clone(),
                purge_at_ms,
            }
            .into());
        }
        let versions: Vec<(u32, VersionId)> = k.versions.iter().map(|v| (v.number, v.id)).collect();
        self.destroy(&k, versions, "purge", by).await
    }

    /// Destroys, inside the HSM, every version below the minimum decryption version.
    pub async fn trim(
        &self,
        grant: &Grant,
        by: &str,
    ) -> Result<(Vec<u32>, Arc<KeyEntry>), BrokerError> {
        let name = grant.key_for(Permission::TrimVersions)?;
        let _w = self.write().await?;
        let k = self.get_live(name)?;
        k.usable()?;
        let versions: Vec<(u32, VersionId)> = k
            .versions
            .iter()
            .filter(|v| !k.decryptable(v))
            .map(|v| (v.number, v.id))
            .collect();
        if versions.is_empty() {
            return Ok((Vec::new(), k));
        }
        let receipt = self.destroy(&k, versions, "trim", by).await?;
        let k = self.get(name)?;
        Ok((receipt.versions, k))
    }

    /// Records the intent, detaches, destroys the HSM objects, forgets the metadata, and writes
    /// the receipt to the audit trail.
    async fn destroy(
        &self,
        k: &KeyEntry,
        versions: Vec<(u32, VersionId)>,
        reason: &str,
        by: &str,
    ) -> Result<Receipt, BrokerError> {
        let purge = reason == "purge";
        let now = now_ms();
        // The blobs made of the key are read first: once the intent is recorded, the receipt
        // must not wait on anything that can fail. (No backup can be made meanwhile: both hold
        // the keyring's write lock.)
        let backups = {
            let (st, n, v, r, b) = (
                self.store.clone(),
                k.name.clone(),
                versions.clone(),
                reason.to_string(),
                by.to_string(),
            );
            blocking(move || {
                let backups = st.backups(&n)?;
                st.begin_destroy(&n, &v, &r, &b, now)?;
                Ok(backups)
            })
            .await?
        };
        failpoint::hit("destroy.after_intent");
        // From here on the versions are gone for callers, whatever happens next.
        self.local_change(|| {
            let mut vmap = self.versions.write().unwrap_or_else(|p| p.into_inner());
            for (_, id) in &versions {
                vmap.remove(id);
                self.hsm.detach(*id);
            }
        });
        if purge {
            self.local_change(|| {
                self.keys
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&k.name);
            });
        } else {
            let mut entry = k.clone();
            entry
                .versions
                .retain(|v| !versions.iter().any(|(_, id)| *id == v.id));
            self.replace(entry);
        }
        let mut destroyed = 0;
        for (_, id) in &versions {
            // A failure here leaves the intent in the store: the next start finishes the job.
            destroyed += self.hsm.destroy_kek(*id).await.map_err(BrokerError::from)?;
        }
        failpoint::hit("destroy.after_hsm");
        {
            let (st, n, ids) = (
                self.store.clone(),
                k.name.clone(),
                versions.iter().map(|v| v.1).collect::<Vec<_>>(),
            );
            blocking(move || {
                st.finish_destroy(&n, &ids, purge)
                    .map_err(BrokerError::from)
            })
            .await?;
        }
        {
            let mut u = self.usage.write().unwrap_or_else(|p| p.into_inner());
            for (_, id) in &versions {
                u.remove(id);
            }
        }
        let receipt = Receipt::new(&k.name, reason, &versions, destroyed, by, backups);
        tracing::warn!(key = %k.name, reason, versions = ?receipt.versions, objects = destroyed,
            backups = receipt.backups.len(), by, "key material destroyed");
        self.write_receipt(&receipt).await?;
        Ok(receipt)
    }

    /// Writes a destruction receipt into the audit trail.
    pub async fn write_receipt(&self, r: &Receipt) -> Result<(), BrokerError> {
        let Some(audit) = self.audit.get() else {
            tracing::warn!(key = %r.key, "no audit trail attached: destruction receipt only in the log");
            return Ok(());
        };
        let mut rec = Record::event("DestructionReceipt", Some(&r.by), r.summary());
        rec.key = Some(r.key.clone());
        rec.tenant = r.key.split('/').next().map(str::to_string);
        rec.detail = serde_json::to_value(r).ok();
        audit.append(rec).await.map_err(|e| {
            tracing::error!(error = %e, key = %r.key, "destruction receipt not written to the audit trail");
            BrokerError::from(Unavailable::Audit)
        })
    }

    /// Records one of the scheduler's own changes in the audit trail (caller `scheduler`):
    /// `Ok(None)` is its intent, written before the change (if it cannot be written, the change
    /// is not made now: `Err`), `Ok(Some(version))` its success, `Err(e)` its failure.
    async fn scheduled(
        &self,
        op: &str,
        key: Option<&KeyName>,
        outcome: Result<Option<Option<u32>>, BrokerError>,
    ) -> Result<(), BrokerError> {
        let mut rec = Record::event(op, Some("scheduler"), "");
        rec.key = key.map(|k| k.to_string());
        rec.tenant = key.map(|k| k.tenant().to_string());
        self.scheduler_append(rec, outcome).await
    }

    /// [`Keyring::scheduled`] for a change about something that is not a key (a BYOK import
    /// key, named by its id in the message).
    async fn scheduled_about(
        &self,
        op: &str,
        what: &str,
        outcome: Result<Option<Option<u32>>, BrokerError>,
    ) -> Result<(), BrokerError> {
        let rec = Record::event(op, Some("scheduler"), format!("import key {what}"));
        self.scheduler_append(rec, outcome).await
    }

    async fn scheduler_append(
        &self,
        mut rec: Record,
        outcome: Result<Option<Option<u32>>, BrokerError>,
    ) -> Result<(), BrokerError> {
        let Some(audit) = self.audit.get() else {
            return Ok(());
        };
        match outcome {
            Ok(None) => rec.outcome = Some(crate::audit::INTENT.into()),
            Ok(Some(version)) => {
                rec.outcome = Some("OK".into());
                rec.version = version;
            }
            Err(e) => {
                rec.outcome = Some(crate::audit::outcome_name(Err(&e)));
                rec.message = Some(e.public_message());
            }
        }
        if rec.message.as_deref() == Some("") {
            rec.message = None;
        }
        audit.append(rec).await.map_err(|e| {
            tracing::error!(error = %e, "the scheduler's audit record not written: the change waits");
            Unavailable::Audit.into()
        })
    }

    /// Attaches the audit trail (for receipts written outside requests).
    pub fn attach_audit(&self, audit: crate::audit::AuditLog) {
        let _ = self.audit.set(audit);
    }

    /// BYOK step 1: an RSA import key for one import of an AES-256 key of `algorithm`
    /// (default AES-256-GCM), which forces that key's template on whatever it unwraps.
    pub async fn create_import_key(
        &self,
        key_type: KeyType,
        algorithm: Option<Algorithm>,
    ) -> Result<ImportKeyInfo, BrokerError> {
        let bits = match key_type {
            KeyType::Rsa3072 => 3072,
            KeyType::Rsa4096 => 4096,
            _ => {
                return Err(Invalid::ImportKeyType.into());
            }
        };
        let algorithm = algorithm.unwrap_or(Algorithm::Aes256Gcm);
        if !matches!(algorithm, Algorithm::Aes256Gcm) && !algorithm.is_key_wrap() {
            return Err(Invalid::ImportKeyAlgorithm(algorithm).into());
        }
        let algorithm = self.resolve_algorithm(KeyType::Aes256, Some(algorithm))?;
        let caps = self.hsm.capabilities();
        let _w = self.write().await?;
        let id = VersionId::random();
        let expires_ms = now_ms().saturating_add(IMPORT_KEY_TTL_MS);
        let backup = self.settings.backup;
        let mut keys = self.import_keys().await?;
        keys.insert(
            id.hex(),
            ImportKeyRecord::Made {
                expires_ms,
                algorithm: algorithm.as_str().to_string(),
                backup,
                bits,
                used: false,
            },
        );
        // Recorded before the HSM object exists: a crash leaves a record whose object the
        // maintenance task destroys (destroying by id is idempotent).
        self.save_import_keys(&keys).await?;
        let public = self
            .hsm
            .create_import_key(id, bits, algorithm, backup)
            .await
            .map_err(BrokerError::from)?;
        Ok(ImportKeyInfo {
            id,
            public,
            oaep: caps.default_rsa_algorithm(),
            expires_ms,
            algorithm,
        })
    }

    async fn import_keys(&self) -> Result<BTreeMap<String, ImportKeyRecord>, BrokerError> {
        let st = self.store.clone();
        let raw =
            blocking(move || st.setting(SETTING_IMPORT_KEYS).map_err(BrokerError::from)).await?;
        Ok(raw
            .and_then(|r| serde_json::from_str(&r).ok())
            .unwrap_or_default())
    }

    async fn save_import_keys(
        &self,
        keys: &BTreeMap<String, ImportKeyRecord>,
    ) -> Result<(), BrokerError> {
        let text = serde_json::to_string(keys).map_err(|e| BrokerError::internal(e.to_string()))?;
        let st = self.store.clone();
        blocking(move || {
            st.set_setting(SETTING_IMPORT_KEYS, &text)
                .map_err(BrokerError::from)
        })
        .await
    }

    /// BYOK step 2: imports AES-256 key material wrapped for an import key into a new key. The
    /// import key serves this one call whatever its outcome (one RSA decryption per import
    /// key: a blob cannot be retried as an oracle) and is destroyed after it.
    pub async fn import(
        &self,
        grant: &Grant,
        algorithm: Option<Algorithm>,
        attributes: KeyAttributes,
        import_id: &str,
        material: Vec<u8>,
    ) -> Result<Arc<KeyEntry>, BrokerError> {
        let name = grant.key_for(Permission::Import)?.clone();
        let key_type = KeyType::Aes256;
        let attributes = self.new_attributes(Algorithm::Aes256Gcm, attributes)?;
        let _w = self.write().await?;
        let mut import_keys = self.import_keys().await?;
        let (made_for, bits) = match import_keys.get(import_id) {
            None => return Err(NotFound::ImportKey(import_id.to_string()).into()),
            Some(ImportKeyRecord::Legacy(_)) => {
                return Err(Refused::ImportKeyLegacy(import_id.to_string()).into());
            }
            Some(ImportKeyRecord::Made { used: true, .. }) => {
                return Err(Refused::ImportKeyUsed(import_id.to_string()).into());
            }
            Some(ImportKeyRecord::Made { expires_ms, .. }) if *expires_ms <= now_ms() => {
                return Err(Refused::ImportKeyExpired.into());
            }
            Some(ImportKeyRecord::Made {
                algorithm: made_for,
                backup,
                bits,
                ..
            }) => {
                if *backup != self.settings.backup {
                    let was = if *backup { "on" } else { "off" };
                    return Err(Refused::ImportKeyBackup(import_id.to_string(), was).into());
                }
                let made_for = Algorithm::parse(made_for).ok_or_else(|| {
                    BrokerError::internal(format!("import key record: algorithm {made_for:?}"))
                })?;
                (made_for, *bits as usize)
            }
        };
        let import = hex::decode(import_id)
            .ok()
            .and_then(|b| VersionId::from_slice(&b))
            .ok_or(Invalid::ImportKeyId)?;
        if let Some(asked) = algorithm.filter(|a| *a != made_for) {
            return Err(Invalid::ImportAlgorithm {
                id: import_id.to_string(),
                made_for,
                asked,
            }
            .into());
        }
        let modulus = bits / 8;
        if material.len() == modulus + 40 {
            return Err(Invalid::TwoStepMaterial {
                got: material.len(),
                modulus,
            }
            .into());
        }
        if material.len() != modulus {
            return Err(Invalid::MaterialDoesNotUnwrap(format!(
                "it is {} bytes; RSA-OAEP under this {bits}-bit import key gives {modulus}",
                material.len()
            ))
            .into());
        }
        self.name_free(&name)?;
        // Used from here on, whatever happens next.
        if let Some(ImportKeyRecord::Made { used, .. }) = import_keys.get_mut(import_id) {
            *used = true;
        }
        self.save_import_keys(&import_keys).await?;
        let oaep = self.hsm.capabilities().default_rsa_algorithm();
        let made = self
            .new_key(
                name,
                key_type,
                made_for,
                attributes,
                Some((import, oaep, material)),
            )
            .await;
        if let Err(e) = self.hsm.destroy_kek(import).await {
            // The record stays until it expires: the maintenance task destroys it then.
            tracing::warn!(error = %e, import_key = import_id, "could not destroy a used import key; retrying when it expires");
        }
        made
    }

    /// One pass of the maintenance task: purge keys whose date has passed, rotate keys whose
    /// rotation period has elapsed, destroy expired import keys, save usage counters.
    pub async fn maintain(&self) {
        self.retry_rollbacks().await;
        let now = now_ms();
        let all: Vec<Arc<KeyEntry>> = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for k in &all {
            match &k.lifecycle {
                Lifecycle::Deleted { purge_at_ms, .. } if *purge_at_ms <= now => {
                    let _w = match self.write().await {
                        Ok(w) => w,
                        Err(e) => {
                            tracing::error!(key = %k.name, error = %e, "scheduled purge: cannot take the write lock; retrying later");
                            continue;
                        }
                    };
                    // Re-check under the lock: another replica (or a request) may have purged or
                    // recovered it meanwhile.
                    let k = match self.get(&k.name) {
                        Ok(f) if matches!(f.lifecycle, Lifecycle::Deleted { purge_at_ms, .. } if purge_at_ms <= now) => {
                            f
                        }
                        _ => continue,
                    };
                    if self
                        .scheduled("ScheduledPurge", Some(&k.name), Ok(None))
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    let versions = k.versions.iter().map(|v| (v.number, v.id)).collect();
                    let done = self.destroy(&k, versions, "purge", "scheduler").await;
                    match &done {
                        Ok(_) => tracing::info!(key = %k.name, "scheduled purge done"),
                        Err(e) => {
                            tracing::error!(key = %k.name, error = %e, "scheduled purge failed; retrying later")
                        }
                    }
                    let _ = self
                        .scheduled(
                            "ScheduledPurge",
                            Some(&k.name),
                            done.map(|_| None).map(Some),
                        )
                        .await;
                }
                Lifecycle::Active if k.state == KeyState::Enabled && k.attributes.enabled => {
                    let period_due =
                        |f: &KeyEntry| match (f.attributes.rotation_period_ms, f.versions.last()) {
                            (Some(p), Some(v)) => v.created_at_ms.saturating_add(p) <= now,
                            _ => false,
                        };
                    // Due by its rotation period, or by its newest version's AES-GCM budget.
                    let due = |f: &KeyEntry| period_due(f) || self.budget_wants_rotation(f);
                    let due = due(k);
                    if due {
                        let _w = match self.write().await {
                            Ok(w) => w,
                            Err(e) => {
                                tracing::error!(key = %k.name, error = %e, "automatic rotation: cannot take the write lock; retrying later");
                                continue;
                            }
                        };
                        // Re-check under the lock: a manual rotation may have happened.
                        let still_due = self.get(&k.name).is_ok_and(|f| {
                            f.versions.last().map(|v| v.id) == k.versions.last().map(|v| v.id)
                                && (period_due(&f) || self.budget_wants_rotation(&f))
                        });
                        if still_due
                            && self
                                .scheduled("AutomaticRotation", Some(&k.name), Ok(None))
                                .await
                                .is_ok()
                        {
                            let done = self.rotate_locked(&k.name).await;
                            match &done {
                                Ok(e) => {
                                    tracing::info!(key = %k.name, version = e.versions.len(), "automatic rotation")
                                }
                                Err(e) => {
                                    tracing::error!(key = %k.name, error = %e, "automatic rotation failed")
                                }
                            }
                            let outcome = done.map(|e| Some(e.versions.last().map(|v| v.number)));
                            let _ = self
                                .scheduled("AutomaticRotation", Some(&k.name), outcome)
                                .await;
                        }
                    }
                }
                _ => {}
            }
        }
        let expired_imports = self
            .import_keys()
            .await
            .is_ok_and(|i| i.values().any(|r| r.expires_ms() <= now));
        // Under the write lock: the list is one setting that replicas rewrite.
        let guard = if expired_imports {
            self.write().await.ok()
        } else {
            None
        };
        if guard.is_some()
            && let Ok(imports) = self.import_keys().await
        {
            let (expired, live): (Vec<_>, Vec<_>) = imports
                .into_iter()
                .partition(|(_, r)| r.expires_ms() <= now);
            if !expired.is_empty() {
                for (id, _) in &expired {
                    let Some(v) = hex::decode(id).ok().and_then(|b| VersionId::from_slice(&b))
                    else {
                        continue;
                    };
                    let op = "ImportKeyDestroyed";
                    if self.scheduled_about(op, id, Ok(None)).await.is_err() {
                        continue;
                    }
                    let done = self.hsm.destroy_kek(v).await.map_err(BrokerError::from);
                    if let Err(e) = &done {
                        tracing::warn!(error = %e, "could not destroy an expired import key");
                    }
                    let _ = self.scheduled_about(op, id, done.map(|_| Some(None))).await;
                }
                let _ = self.save_import_keys(&live.into_iter().collect()).await;
            }
        }
        drop(guard);
        self.flush_usage().await;
    }

    /// Adds the usage counted since the last save to the store (adding, so replicas counting
    /// the same version do not overwrite each other).
    pub async fn flush_usage(&self) {
        let unsaved: Vec<(VersionId, u64, u64, Option<i64>)> = self
            .usage
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(id, u)| {
                let (w, un) = u.take_unsaved()?;
                let last = u.last_used_ms.load(Ordering::Relaxed);
                Some((*id, w, un, (last > 0).then_some(last)))
            })
            .collect();
        if unsaved.is_empty() {
            return;
        }
        let st = self.store.clone();
        let batch = unsaved.clone();
        if let Err(e) = blocking(move || st.add_usage(&batch).map_err(BrokerError::from)).await {
            tracing::warn!(error = %e, "could not save usage counters (kept for the next save)");
            for (id, w, u, _) in unsaved {
                if let Some(us) = self.usage(id) {
                    us.restore_unsaved(w, u);
                }
            }
        }
    }

    /// Runs [`Keyring::maintain`] every `maintenance_interval` until the process ends.
    pub fn spawn_maintenance(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.settings.maintenance_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut health = me.hsm.health();
            loop {
                tokio::select! {
                    _ = tick.tick() => me.maintain().await,
                    changed = health.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // Back from a lost device: finish what failed while it was away.
                        if health.borrow_and_update().serving {
                            me.retry_rollbacks().await;
                        }
                    }
                }
            }
        });
    }
}

/// Refuses operations a key of `algorithm` can never do: a signing key only signs and verifies,
/// any other key never does (its HSM template could not, either).
/// What an external key's attributes cannot be: operations other than wrap, unwrap and
/// generate (the others need the key in this broker's HSM), and automatic rotation (the
/// remote rotates its own key).
fn check_external(name: &KeyName, a: &KeyAttributes) -> Result<(), BrokerError> {
    if a.in_hsm() {
        return Ok(());
    }
    let refuse = |what| super::crypt::not_in_hsm(name, a, what);
    if a.operations.iter().any(|o| !KeyOp::EXTERNAL.contains(o)) {
        return Err(refuse(
            "allow operations other than wrap, unwrap and generate",
        ));
    }
    if a.rotation_period_ms.is_some() || a.version_expiry_ms.is_some() {
        return Err(refuse(
            "rotate (automatic rotation and version expiry are the remote's)",
        ));
    }
    Ok(())
}

fn check_operations(
    algorithm: Algorithm,
    ops: &std::collections::BTreeSet<KeyOp>,
) -> Result<(), BrokerError> {
    match ops.iter().find(|o| !o.fits(algorithm)) {
        Some(op) => Err(Invalid::OperationForAlgorithm {
            algorithm,
            op: op.as_str(),
        }
        .into()),
        None => Ok(()),
    }
}
