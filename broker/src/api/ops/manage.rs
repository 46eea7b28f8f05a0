//! The key lifecycle (the control plane): create, import (BYOK), read, list, update, rotate,
//! trim, delete, recover, purge, backup, restore.
//!
//! Every change runs to completion in its own task (`Call::detached`): a caller that hangs up
//! or times out never leaves a half-done change behind.

use super::{Operation, key_name, sealed::Sealed};
use crate::{
    api::call::Call,
    error::{BrokerError, Denied, Invalid},
    keys::{
        AttributePatch, ImportKeyInfo, KeyInfo, Made, PublicKeyInfo, Receipt, public_key_formats,
    },
    model::{Algorithm, DEFAULT_TENANT, KeyAttributes, KeyName, KeyType, validate_part},
    policy::Permission,
};

/// The largest `page_size` of a listing.
const MAX_PAGE: u32 = 1000;
/// The most wrapped key material `ImportKey` takes.
const MAX_MATERIAL: usize = 4096;

/// `CreateKey`.
pub struct CreateKey {
    /// The key.
    pub key: String,
    /// Its type.
    pub key_type: KeyType,
    /// Its algorithm (`None`: the type's default on this HSM).
    pub algorithm: Option<Algorithm>,
    /// Its attributes.
    pub attributes: KeyAttributes,
    /// Set: an external key by reference (`key_type` and `algorithm` are then the remote
    /// key's, from its metadata).
    pub external: Option<crate::model::ExternalRef>,
    /// Set: a double key of these two members (`key_type` and `algorithm` are then ignored).
    pub double: Option<crate::model::DoubleRef>,
}

/// `GetKey`.
pub struct GetKey {
    /// The key.
    pub key: String,
}

/// `ListKeys`.
pub struct ListKeys {
    /// The tenant (empty: the default tenant).
    pub tenant: String,
    /// At most this many (0: 100).
    pub page_size: u32,
    /// Continue after this name.
    pub page_token: String,
}

/// `ListKeyVersions`.
pub struct ListKeyVersions {
    /// The key.
    pub key: String,
}

/// `RotateKey`.
pub struct RotateKey {
    /// The key.
    pub key: String,
}

/// `UpdateKey`.
pub struct UpdateKey {
    /// The key.
    pub key: String,
    /// What changes.
    pub patch: AttributePatch,
}

/// `TrimKeyVersions`.
pub struct TrimKeyVersions {
    /// The key.
    pub key: String,
}

/// `DeleteKey`.
pub struct DeleteKey {
    /// The key.
    pub key: String,
}

/// `ListDeletedKeys`.
pub struct ListDeletedKeys {
    /// The tenant (empty: the default tenant).
    pub tenant: String,
}

/// `GetDeletedKey`.
pub struct GetDeletedKey {
    /// The key.
    pub key: String,
}

/// `RecoverKey`.
pub struct RecoverKey {
    /// The key.
    pub key: String,
}

/// `PurgeKey`.
pub struct PurgeKey {
    /// The key.
    pub key: String,
}

/// `CreateImportKey`.
pub struct CreateImportKey {
    /// RSA 3072 or 4096.
    pub key_type: KeyType,
    /// The algorithm of the key it will import (`None`: AES-256-GCM).
    pub algorithm: Option<Algorithm>,
}

/// `ImportKey`.
pub struct ImportKey {
    /// The new key.
    pub key: String,
    /// The type of the material (AES-256 only).
    pub key_type: KeyType,
    /// Its algorithm (`None`: the default).
    pub algorithm: Option<Algorithm>,
    /// Its attributes.
    pub attributes: KeyAttributes,
    /// The import key it is wrapped for.
    pub import_key_id: String,
    /// RSA-OAEP(material) under the import key.
    pub wrapped_material: Vec<u8>,
}

/// `BackupKey`.
pub struct BackupKey {
    /// The key.
    pub key: String,
}

/// `RestoreKey`.
pub struct RestoreKey {
    /// The blob `BackupKey` made.
    pub backup: Vec<u8>,
}

/// The tenant a listing is of, authorised: the caller must hold `read metadata` somewhere in
/// it (the listing then shows only the keys it covers).
fn listing_tenant(call: &mut Call, tenant: String) -> Result<String, BrokerError> {
    let tenant = if tenant.is_empty() {
        DEFAULT_TENANT.to_string()
    } else {
        tenant
    };
    validate_part("tenant", &tenant)?;
    call.note_tenant(&tenant);
    if !call
        .authority()
        .allows_in_tenant(Permission::ReadMetadata, &tenant)
    {
        return Err(Denied::Tenant {
            caller: call.caller_id().to_string(),
            permission: Permission::ReadMetadata,
            tenant,
        }
        .into());
    }
    Ok(tenant)
}

impl Sealed for CreateKey {}
impl Operation for CreateKey {
    type Output = KeyInfo;

    async fn run(self, call: &mut Call) -> Result<KeyInfo, BrokerError> {
        let name = key_name(&self.key)?;
        let grant = call.authorize(Permission::Create, &name)?;
        let keys = call.keys().clone();
        let k = call
            .detached(async move {
                match (self.external, self.double) {
                    (_, Some(d)) => keys.create_double(&grant, d, self.attributes).await,
                    (Some(x), None) => keys.create_external(&grant, x, self.attributes).await,
                    (None, None) => {
                        keys.create(&grant, self.key_type, self.algorithm, self.attributes)
                            .await
                    }
                }
            })
            .await?;
        call.note_version(1);
        Ok(call.keys().describe(k))
    }
}

impl Sealed for GetKey {}
impl Operation for GetKey {
    type Output = KeyInfo;

    async fn run(self, call: &mut Call) -> Result<KeyInfo, BrokerError> {
        let grant = call.authorize(Permission::ReadMetadata, &key_name(&self.key)?)?;
        let k = call.keys().live(&grant)?;
        Ok(call.keys().describe(k))
    }
}

impl Sealed for ListKeys {}
impl Operation for ListKeys {
    type Output = (Vec<KeyInfo>, Option<String>);

    async fn run(self, call: &mut Call) -> Result<Self::Output, BrokerError> {
        let tenant = listing_tenant(call, self.tenant)?;
        let limit = match self.page_size {
            0 => 100,
            n @ 1..=MAX_PAGE => n as usize,
            n => {
                return Err(Invalid::PageSize {
                    max: MAX_PAGE,
                    got: n,
                }
                .into());
            }
        };
        let after = if self.page_token.is_empty() {
            None
        } else {
            validate_part("page_token", &self.page_token)?;
            Some(self.page_token.as_str())
        };
        let (keys, next) = call.keys().list(&tenant, after, limit, |k| {
            call.authority().allows(Permission::ReadMetadata, k)
        });
        let shown = keys.into_iter().map(|k| call.keys().describe(k)).collect();
        Ok((shown, next))
    }
}

impl Sealed for ListKeyVersions {}
impl Operation for ListKeyVersions {
    type Output = KeyInfo;

    async fn run(self, call: &mut Call) -> Result<KeyInfo, BrokerError> {
        let grant = call.authorize(Permission::ReadMetadata, &key_name(&self.key)?)?;
        let k = call.keys().live(&grant)?;
        Ok(call.keys().describe(k))
    }
}

impl Sealed for RotateKey {}
impl Operation for RotateKey {
    type Output = KeyInfo;

    async fn run(self, call: &mut Call) -> Result<KeyInfo, BrokerError> {
        let grant = call.authorize(Permission::Rotate, &key_name(&self.key)?)?;
        let keys = call.keys().clone();
        let k = call
            .detached(async move { keys.rotate(&grant).await })
            .await?;
        call.note_version(k.versions.last().map(|v| v.number).unwrap_or(0));
        Ok(call.keys().describe(k))
    }
}

impl Sealed for UpdateKey {}
impl Operation for UpdateKey {
    type Output = KeyInfo;

    async fn run(self, call: &mut Call) -> Result<KeyInfo, BrokerError> {
        let grant = call.authorize(Permission::Update, &key_name(&self.key)?)?;
        let keys = call.keys().clone();
        let k = call
            .detached(async move { keys.update(&grant, self.patch).await })
            .await?;
        Ok(call.keys().describe(k))
    }
}

impl Sealed for TrimKeyVersions {}
impl Operation for TrimKeyVersions {
    type Output = (Vec<u32>, KeyInfo);

    async fn run(self, call: &mut Call) -> Result<Self::Output, BrokerError> {
        let grant = call.authorize(Permission::TrimVersions, &key_name(&self.key)?)?;
        let (keys, by) = (call.keys().clone(), call.caller_id().to_string());
        let (destroyed, k) = call
            .detached(async move { keys.trim(&grant, &by).await })
            .await?;
        Ok((destroyed, call.keys().describe(k)))
    }
}

impl Sealed for DeleteKey {}
impl Operation for DeleteKey {
    type Output = KeyInfo;

    async fn run(self, call: &mut Call) -> Result<KeyInfo, BrokerError> {
        let grant = call.authorize(Permission::Delete, &key_name(&self.key)?)?;
        let (keys, by) = (call.keys().clone(), call.caller_id().to_string());
        let k = call
            .detached(async move { keys.delete(&grant, &by).await })
            .await?;
        Ok(call.keys().describe(k))
    }
}

impl Sealed for ListDeletedKeys {}
impl Operation for ListDeletedKeys {
    type Output = Vec<KeyInfo>;

    async fn run(self, call: &mut Call) -> Result<Vec<KeyInfo>, BrokerError> {
        let tenant = listing_tenant(call, self.tenant)?;
        Ok(call
            .keys()
            .list_deleted(&tenant)
            .into_iter()
            .filter(|k| call.authority().allows(Permission::ReadMetadata, &k.name))
            .map(|k| call.keys().describe(k))
            .collect())
    }
}

impl Sealed for GetDeletedKey {}
impl Operation for GetDeletedKey {
    type Output = KeyInfo;

    async fn run(self, call: &mut Call) -> Result<KeyInfo, BrokerError> {
        let grant = call.authorize(Permission::ReadMetadata, &key_name(&self.key)?)?;
        let k = call.keys().deleted(&grant)?;
        Ok(call.keys().describe(k))
    }
}

impl Sealed for RecoverKey {}
impl Operation for RecoverKey {
    type Output = KeyInfo;

    async fn run(self, call: &mut Call) -> Result<KeyInfo, BrokerError> {
        let grant = call.authorize(Permission::Recover, &key_name(&self.key)?)?;
        let keys = call.keys().clone();
        let k = call
            .detached(async move { keys.recover(&grant).await })
            .await?;
        Ok(call.keys().describe(k))
    }
}

impl Sealed for PurgeKey {}
impl Operation for PurgeKey {
    type Output = Receipt;

    async fn run(self, call: &mut Call) -> Result<Receipt, BrokerError> {
        let grant = call.authorize(Permission::Purge, &key_name(&self.key)?)?;
        let (keys, by) = (call.keys().clone(), call.caller_id().to_string());
        call.detached(async move { keys.purge(&grant, &by).await })
            .await
    }
}

impl Sealed for CreateImportKey {}
impl Operation for CreateImportKey {
    /// The import key and its public half as SPKI PEM.
    type Output = (ImportKeyInfo, String);

    async fn run(self, call: &mut Call) -> Result<Self::Output, BrokerError> {
        // An import key is not bound to a key name: creating one needs import rights
        // somewhere (scope all).
        call.authorize_global(Permission::Import)?;
        let keys = call.keys().clone();
        let info = call
            .detached(async move { keys.create_import_key(self.key_type, self.algorithm).await })
            .await?;
        let pk = PublicKeyInfo {
            key: KeyName::parse("byok/import").map_err(|e| BrokerError::internal(e.to_string()))?,
            version: 0,
            version_id: info.id,
            algorithm: info.oaep,
            modulus: info.public.modulus.clone(),
            exponent: info.public.exponent.clone(),
            ec_point: None,
        };
        let (spki_pem, _) = public_key_formats(&pk)?;
        Ok((info, spki_pem))
    }
}

impl Sealed for ImportKey {}
impl Operation for ImportKey {
    type Output = KeyInfo;

    async fn run(self, call: &mut Call) -> Result<KeyInfo, BrokerError> {
        let grant = call.authorize(Permission::Import, &key_name(&self.key)?)?;
        if self.key_type != KeyType::Aes256 {
            return Err(Invalid::ImportMaterialType.into());
        }
        if self.wrapped_material.len() > MAX_MATERIAL {
            return Err(Invalid::MaterialTooLarge(MAX_MATERIAL).into());
        }
        let keys = call.keys().clone();
        let k = call
            .detached(async move {
                keys.import(
                    &grant,
                    self.algorithm,
                    self.attributes,
                    &self.import_key_id,
                    self.wrapped_material,
                )
                .await
            })
            .await?;
        call.note_version(1);
        Ok(call.keys().describe(k))
    }
}

impl Sealed for BackupKey {}
impl Operation for BackupKey {
    type Output = Made;

    async fn run(self, call: &mut Call) -> Result<Made, BrokerError> {
        let grant = call.authorize(Permission::Backup, &key_name(&self.key)?)?;
        let (keys, by) = (call.keys().clone(), call.caller_id().to_string());
        call.detached(async move { keys.backup(&grant, &by).await })
            .await
    }
}

impl Sealed for RestoreKey {}
impl Operation for RestoreKey {
    type Output = KeyInfo;

    async fn run(self, call: &mut Call) -> Result<KeyInfo, BrokerError> {
        // The name is read before the blob is verified only to authorise the caller; the
        // restore itself uses nothing the domain's MAC does not cover (and refuses a blob whose
        // authenticated name is not this one).
        let name = crate::keys::claimed_name(&self.backup)?;
        let grant = call.authorize(Permission::Restore, &name)?;
        let keys = call.keys().clone();
        let k = call
            .detached(async move { keys.restore(&grant, &self.backup).await })
            .await?;
        Ok(call.keys().describe(k))
    }
}
