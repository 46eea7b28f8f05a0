//! `keybroker.v1.KeyManagement`: the key lifecycle.

use keybroker_proto::v1::{self as pb, key_management_server::KeyManagement};
use tonic::{Request, Response, Status};

use super::{
    GrpcApi, KEY_MANAGEMENT,
    convert::{
        algorithm_from_pb, algorithm_to_pb, attributes_from_pb, deleted_to_pb, key_to_pb,
        key_type_from_pb, patch_from_pb, versions_to_pb,
    },
    rpc,
};
use crate::{
    api::ops::manage::*,
    model::{Invalid, KeyType},
};

/// A key type where 0 means `default`.
fn key_type_or(v: i32, default: KeyType) -> Result<KeyType, crate::error::BrokerError> {
    if v == 0 {
        Ok(default)
    } else {
        key_type_from_pb(v)
    }
}

#[tonic::async_trait]
impl KeyManagement for GrpcApi {
    async fn create_key(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "CreateKey"),
            req,
            |r| {
                let op = (|| {
                    if r.external.is_some() && r.double.is_some() {
                        return Err(Invalid::Value {
                            field: "double",
                            expected: "unset for an external key (a key is external or double, not both)",
                        }
                        .into());
                    }
                    // A double key's members, an external key's remote metadata, decide
                    // its type and algorithm.
                    let by_reference = match (&r.double, &r.external) {
                        (Some(_), _) => Some(
                            "unspecified (with algorithm) for a double key: its members decide them",
                        ),
                        (_, Some(_)) => Some(
                            "unspecified (with algorithm) for an external key: the remote key's metadata decides them",
                        ),
                        _ => None,
                    };
                    if let Some(expected) = by_reference {
                        if r.key_type != 0 || r.algorithm != 0 {
                            return Err(Invalid::Value {
                                field: "key_type",
                                expected,
                            }
                            .into());
                        }
                        return Ok(CreateKey {
                            key_type: KeyType::Aes256,
                            algorithm: None,
                            attributes: attributes_from_pb(r.attributes)?,
                            key: r.key,
                            external: r.external.map(|x| crate::model::ExternalRef {
                                proxy: x.proxy,
                                remote_key: x.remote_key,
                            }),
                            double: r.double.map(|d| crate::model::DoubleRef {
                                local: d.local,
                                external: d.external,
                            }),
                        });
                    }
                    Ok(CreateKey {
                        key_type: key_type_from_pb(r.key_type)?,
                        algorithm: algorithm_from_pb(r.algorithm)?,
                        attributes: attributes_from_pb(r.attributes)?,
                        key: r.key,
                        external: None,
                        double: None,
                    })
                })();
                (None, op)
            },
            |k| key_to_pb(&k),
        )
        .await
    }

    async fn get_key(&self, req: Request<pb::GetKeyRequest>) -> Result<Response<pb::Key>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "GetKey"),
            req,
            |r| (None, Ok(GetKey { key: r.key })),
            |k| key_to_pb(&k),
        )
        .await
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "ListKeys"),
            req,
            |r| {
                let op = ListKeys {
                    tenant: r.tenant,
                    page_size: r.page_size,
                    page_token: r.page_token,
                };
                (None, Ok(op))
            },
            |(keys, next)| pb::ListKeysResponse {
                keys: keys.iter().map(key_to_pb).collect(),
                next_page_token: next.unwrap_or_default(),
            },
        )
        .await
    }

    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "RotateKey"),
            req,
            |r| (None, Ok(RotateKey { key: r.key })),
            |k| key_to_pb(&k),
        )
        .await
    }

    async fn update_key(
        &self,
        req: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "UpdateKey"),
            req,
            |r| {
                let key = r.key.clone();
                (None, patch_from_pb(r).map(|patch| UpdateKey { key, patch }))
            },
            |k| key_to_pb(&k),
        )
        .await
    }

    async fn list_key_versions(
        &self,
        req: Request<pb::ListKeyVersionsRequest>,
    ) -> Result<Response<pb::ListKeyVersionsResponse>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "ListKeyVersions"),
            req,
            |r| (None, Ok(ListKeyVersions { key: r.key })),
            |k| pb::ListKeyVersionsResponse {
                versions: versions_to_pb(&k),
                min_decryption_version: k.entry.attributes.min_decryption_version,
            },
        )
        .await
    }

    async fn trim_key_versions(
        &self,
        req: Request<pb::TrimKeyVersionsRequest>,
    ) -> Result<Response<pb::TrimKeyVersionsResponse>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "TrimKeyVersions"),
            req,
            |r| (None, Ok(TrimKeyVersions { key: r.key })),
            |(destroyed, k)| pb::TrimKeyVersionsResponse {
                destroyed_versions: destroyed,
                key: Some(key_to_pb(&k)),
            },
        )
        .await
    }

    async fn delete_key(
        &self,
        req: Request<pb::DeleteKeyRequest>,
    ) -> Result<Response<pb::DeletedKey>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "DeleteKey"),
            req,
            |r| (None, Ok(DeleteKey { key: r.key })),
            |k| deleted_to_pb(&k),
        )
        .await
    }

    async fn list_deleted_keys(
        &self,
        req: Request<pb::ListDeletedKeysRequest>,
    ) -> Result<Response<pb::ListDeletedKeysResponse>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "ListDeletedKeys"),
            req,
            |r| (None, Ok(ListDeletedKeys { tenant: r.tenant })),
            |keys| pb::ListDeletedKeysResponse {
                keys: keys.iter().map(deleted_to_pb).collect(),
            },
        )
        .await
    }

    async fn get_deleted_key(
        &self,
        req: Request<pb::GetDeletedKeyRequest>,
    ) -> Result<Response<pb::DeletedKey>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "GetDeletedKey"),
            req,
            |r| (None, Ok(GetDeletedKey { key: r.key })),
            |k| deleted_to_pb(&k),
        )
        .await
    }

    async fn recover_key(
        &self,
        req: Request<pb::RecoverKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "RecoverKey"),
            req,
            |r| (None, Ok(RecoverKey { key: r.key })),
            |k| key_to_pb(&k),
        )
        .await
    }

    async fn purge_key(
        &self,
        req: Request<pb::PurgeKeyRequest>,
    ) -> Result<Response<pb::PurgeReceipt>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "PurgeKey"),
            req,
            |r| (None, Ok(PurgeKey { key: r.key })),
            |rc| pb::PurgeReceipt {
                key: rc.key,
                versions: rc.versions,
                object_ids: rc.object_ids,
                objects_destroyed: rc.objects_destroyed as u32,
                purged_at_ms: rc.at_ms,
                purged_by: rc.by,
                r#final: rc.is_final,
                backups: rc
                    .backups
                    .into_iter()
                    .map(|b| pb::BackupBlob {
                        sha256: b.sha256,
                        version_ids: b.version_ids,
                        made_at_ms: b.made_at_ms,
                        made_by: b.made_by,
                    })
                    .collect(),
            },
        )
        .await
    }

    async fn create_import_key(
        &self,
        req: Request<pb::CreateImportKeyRequest>,
    ) -> Result<Response<pb::ImportKeyInfo>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "CreateImportKey"),
            req,
            |r| {
                let op = (|| {
                    Ok(CreateImportKey {
                        key_type: key_type_or(r.key_type, KeyType::Rsa3072)?,
                        algorithm: algorithm_from_pb(r.algorithm)?,
                    })
                })();
                (None, op)
            },
            |(info, spki_pem)| pb::ImportKeyInfo {
                import_key_id: info.id.hex(),
                spki_pem,
                oaep: algorithm_to_pb(info.oaep).into(),
                expires_ms: info.expires_ms,
                algorithm: algorithm_to_pb(info.algorithm).into(),
            },
        )
        .await
    }

    async fn import_key(
        &self,
        req: Request<pb::ImportKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "ImportKey"),
            req,
            |r| {
                let op = (|| {
                    Ok(ImportKey {
                        key_type: key_type_or(r.key_type, KeyType::Aes256)?,
                        algorithm: algorithm_from_pb(r.algorithm)?,
                        attributes: attributes_from_pb(r.attributes)?,
                        key: r.key,
                        import_key_id: r.import_key_id,
                        wrapped_material: r.wrapped_material,
                    })
                })();
                (None, op)
            },
            |k| key_to_pb(&k),
        )
        .await
    }

    async fn backup_key(
        &self,
        req: Request<pb::BackupKeyRequest>,
    ) -> Result<Response<pb::BackupKeyResponse>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "BackupKey"),
            req,
            |r| (None, Ok(BackupKey { key: r.key })),
            |made| pb::BackupKeyResponse {
                backup: made.blob,
                domain_id: made.domain.hex(),
                versions: made.versions as u32,
                sha256: made.sha256,
            },
        )
        .await
    }

    async fn restore_key(
        &self,
        req: Request<pb::RestoreKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.serve(
            rpc(KEY_MANAGEMENT, "RestoreKey"),
            req,
            |r| (None, Ok(RestoreKey { backup: r.backup })),
            |k| key_to_pb(&k),
        )
        .await
    }
}
