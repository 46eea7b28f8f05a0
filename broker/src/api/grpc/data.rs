//! `keybroker.v1.KeyBroker`: the data plane.

use keybroker_proto::v1::{
    self as pb, key_broker_server::KeyBroker, unwrap_key_request::Wrapped as PbWrapped,
};
use tonic::{Request, Response, Status};

use super::{
    GrpcApi, KEY_BROKER,
    convert::{
        algorithm_from_pb, algorithm_to_pb, item_error, sign_algorithm_from_pb,
        sign_algorithm_to_pb,
    },
    rpc,
};
use crate::{
    api::ops::data::{
        GenerateBatch, GenerateIn, GetPublicKey, Rewrap, RewrapIn, Unwrap, UnwrapBatch, UnwrapIn,
        Wrap, WrapBatch, WrapIn,
    },
    api::ops::payload::{Decrypt, DecryptBatch, DecryptIn, Encrypt, EncryptBatch, EncryptIn},
    api::ops::sign::{Sign, SignBatch, SignIn, Verify},
    error::Invalid,
    keys::{Ciphertext, Unwrapped, Wrapped},
    keys::{Decrypted, Encrypted, Signed},
    model::Dek,
};

fn wrapped_to_pb(w: Wrapped) -> pb::WrapKeyResponse {
    pb::WrapKeyResponse {
        wrapped_key: w.envelope,
        key: w.key.to_string(),
        key_version: w.version,
        algorithm: algorithm_to_pb(w.algorithm).into(),
    }
}

fn generated_to_pb((dek, w): (Dek, Wrapped)) -> pb::GenerateDataKeyResponse {
    pb::GenerateDataKeyResponse {
        plaintext: dek.into_vec(),
        wrapped_key: w.envelope,
        key: w.key.to_string(),
        key_version: w.version,
        algorithm: algorithm_to_pb(w.algorithm).into(),
    }
}

fn unwrapped_to_pb(u: Unwrapped) -> pb::UnwrapKeyResponse {
    pb::UnwrapKeyResponse {
        plaintext: u.dek.into_vec(),
        key: u.key.to_string(),
        key_version: u.version,
        algorithm: algorithm_to_pb(u.algorithm).into(),
    }
}

fn encrypted_to_pb(e: Encrypted) -> pb::EncryptResponse {
    pb::EncryptResponse {
        ciphertext: e.envelope,
        key: e.key.to_string(),
        key_version: e.version,
        algorithm: algorithm_to_pb(e.algorithm).into(),
    }
}

fn decrypted_to_pb(d: Decrypted) -> pb::DecryptResponse {
    pb::DecryptResponse {
        plaintext: d.plaintext.into_vec(),
        key: d.key.to_string(),
        key_version: d.version,
        algorithm: algorithm_to_pb(d.algorithm).into(),
    }
}

fn sign_in(i: pb::SignRequest) -> SignIn {
    SignIn {
        algorithm: sign_algorithm_from_pb(i.algorithm),
        key: i.key,
        digest: i.digest,
    }
}

fn signed_to_pb(s: Signed) -> pb::SignResponse {
    pb::SignResponse {
        key: s.key.to_string(),
        key_version: s.version,
        key_version_id: s.version_id.as_bytes().to_vec(),
        algorithm: sign_algorithm_to_pb(s.algorithm).into(),
        signature: s.signature,
    }
}

fn encrypt_in(i: pb::EncryptRequest) -> EncryptIn {
    EncryptIn {
        key: i.key,
        plaintext: Dek::new(i.plaintext),
        aad: i.aad,
    }
}

fn decrypt_in(i: pb::DecryptRequest) -> DecryptIn {
    DecryptIn {
        key: i.key,
        ciphertext: i.ciphertext,
        aad: i.aad,
    }
}

fn wrap_in(i: pb::WrapKeyRequest) -> WrapIn {
    WrapIn {
        key: i.key,
        plaintext: Dek::new(i.plaintext),
        aad: i.aad,
    }
}

fn generate_in(i: pb::GenerateDataKeyRequest) -> GenerateIn {
    GenerateIn {
        key: i.key,
        len: usize::try_from(i.length).unwrap_or(usize::MAX),
        aad: i.aad,
    }
}

fn unwrap_in(i: pb::UnwrapKeyRequest) -> UnwrapIn {
    let ciphertext = match i.wrapped {
        Some(PbWrapped::Envelope(env)) => Ok(Ciphertext::Envelope(env)),
        Some(PbWrapped::Raw(raw)) => algorithm_from_pb(raw.algorithm).and_then(|a| {
            let algorithm = a.ok_or(Invalid::Missing("raw.algorithm"))?;
            Ok(Ciphertext::Raw {
                version: raw.key_version,
                algorithm,
                ciphertext: raw.ciphertext,
            })
        }),
        None => Err(Invalid::NoCiphertext.into()),
    };
    UnwrapIn {
        key: i.key,
        ciphertext,
        aad: i.aad,
    }
}

#[tonic::async_trait]
impl KeyBroker for GrpcApi {
    async fn wrap_key(
        &self,
        req: Request<pb::WrapKeyRequest>,
    ) -> Result<Response<pb::WrapKeyResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "WrapKey"),
            req,
            |mut r| (r.context.take(), Ok(Wrap(wrap_in(r)))),
            wrapped_to_pb,
        )
        .await
    }

    async fn unwrap_key(
        &self,
        req: Request<pb::UnwrapKeyRequest>,
    ) -> Result<Response<pb::UnwrapKeyResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "UnwrapKey"),
            req,
            |mut r| (r.context.take(), Ok(Unwrap(unwrap_in(r)))),
            unwrapped_to_pb,
        )
        .await
    }

    async fn generate_data_key(
        &self,
        req: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "GenerateDataKey"),
            req,
            |mut r| {
                (
                    r.context.take(),
                    Ok(crate::api::ops::data::Generate(generate_in(r))),
                )
            },
            generated_to_pb,
        )
        .await
    }

    async fn rewrap(
        &self,
        req: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "Rewrap"),
            req,
            |r| {
                let op = Rewrap(RewrapIn {
                    key: r.key,
                    envelope: r.envelope,
                    aad: r.aad,
                    destination: r.destination_key,
                    new_aad: r.change_aad.then_some(r.new_aad),
                });
                (r.context, Ok(op))
            },
            |out| pb::RewrapResponse {
                source_key_version: out.source_version,
                wrapped_key: out.wrapped.envelope,
                key: out.wrapped.key.to_string(),
                key_version: out.wrapped.version,
                algorithm: algorithm_to_pb(out.wrapped.algorithm).into(),
            },
        )
        .await
    }

    async fn get_public_key(
        &self,
        req: Request<pb::GetPublicKeyRequest>,
    ) -> Result<Response<pb::GetPublicKeyResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "GetPublicKey"),
            req,
            |r| {
                let op = GetPublicKey {
                    key: r.key,
                    version: r.key_version,
                };
                (None, Ok(op))
            },
            |pk| pb::GetPublicKeyResponse {
                key: pk.info.key.to_string(),
                key_version: pk.info.version,
                algorithm: algorithm_to_pb(pk.info.algorithm).into(),
                spki_pem: pk.spki_pem,
                jwk: pk.jwk,
                key_version_id: pk.info.version_id.as_bytes().to_vec(),
            },
        )
        .await
    }

    async fn batch_wrap_key(
        &self,
        req: Request<pb::BatchWrapKeyRequest>,
    ) -> Result<Response<pb::BatchWrapKeyResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "BatchWrapKey"),
            req,
            |r| {
                let items = r.items.into_iter().map(wrap_in).collect();
                (r.context, Ok(WrapBatch(items)))
            },
            |results| pb::BatchWrapKeyResponse {
                results: results
                    .into_iter()
                    .map(|r| pb::WrapKeyResult {
                        result: Some(match r {
                            Ok(w) => pb::wrap_key_result::Result::Ok(wrapped_to_pb(w)),
                            Err(e) => pb::wrap_key_result::Result::Error(item_error(&e)),
                        }),
                    })
                    .collect(),
            },
        )
        .await
    }

    async fn batch_unwrap_key(
        &self,
        req: Request<pb::BatchUnwrapKeyRequest>,
    ) -> Result<Response<pb::BatchUnwrapKeyResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "BatchUnwrapKey"),
            req,
            |r| {
                let items = r.items.into_iter().map(unwrap_in).collect();
                (r.context, Ok(UnwrapBatch(items)))
            },
            |results| pb::BatchUnwrapKeyResponse {
                results: results
                    .into_iter()
                    .map(|r| pb::UnwrapKeyResult {
                        result: Some(match r {
                            Ok(u) => pb::unwrap_key_result::Result::Ok(unwrapped_to_pb(u)),
                            Err(e) => pb::unwrap_key_result::Result::Error(item_error(&e)),
                        }),
                    })
                    .collect(),
            },
        )
        .await
    }

    async fn batch_generate_data_key(
        &self,
        req: Request<pb::BatchGenerateDataKeyRequest>,
    ) -> Result<Response<pb::BatchGenerateDataKeyResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "BatchGenerateDataKey"),
            req,
            |r| {
                let items = r.items.into_iter().map(generate_in).collect();
                (r.context, Ok(GenerateBatch(items)))
            },
            |results| pb::BatchGenerateDataKeyResponse {
                results: results
                    .into_iter()
                    .map(|r| pb::GenerateDataKeyResult {
                        result: Some(match r {
                            Ok(g) => pb::generate_data_key_result::Result::Ok(generated_to_pb(g)),
                            Err(e) => pb::generate_data_key_result::Result::Error(item_error(&e)),
                        }),
                    })
                    .collect(),
            },
        )
        .await
    }
    async fn encrypt(
        &self,
        req: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "Encrypt"),
            req,
            |mut r| (r.context.take(), Ok(Encrypt(encrypt_in(r)))),
            encrypted_to_pb,
        )
        .await
    }

    async fn sign(
        &self,
        req: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "Sign"),
            req,
            |mut r| {
                let context = r.context.take();
                (context, Ok(Sign(sign_in(r))))
            },
            signed_to_pb,
        )
        .await
    }

    async fn batch_sign(
        &self,
        req: Request<pb::BatchSignRequest>,
    ) -> Result<Response<pb::BatchSignResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "BatchSign"),
            req,
            |r| {
                let items = r.items.into_iter().map(sign_in).collect();
                (r.context, Ok(SignBatch(items)))
            },
            |results| pb::BatchSignResponse {
                results: results
                    .into_iter()
                    .map(|r| pb::SignResult {
                        result: Some(match r {
                            Ok(s) => pb::sign_result::Result::Ok(signed_to_pb(s)),
                            Err(e) => pb::sign_result::Result::Error(item_error(&e)),
                        }),
                    })
                    .collect(),
            },
        )
        .await
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "Verify"),
            req,
            |mut r| {
                let op = sign_algorithm_from_pb(r.algorithm).map(|algorithm| Verify {
                    key: std::mem::take(&mut r.key),
                    version: r.key_version,
                    algorithm,
                    digest: std::mem::take(&mut r.digest),
                    signature: std::mem::take(&mut r.signature),
                });
                (r.context.take(), op)
            },
            |v| pb::VerifyResponse {
                key: v.key.to_string(),
                key_version: v.version,
                valid: v.valid,
            },
        )
        .await
    }

    async fn get_random_bytes(
        &self,
        req: Request<pb::GetRandomBytesRequest>,
    ) -> Result<Response<pb::GetRandomBytesResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "GetRandomBytes"),
            req,
            |mut r| {
                let op = crate::api::ops::random::GetRandomBytes { count: r.count };
                (r.context.take(), Ok(op))
            },
            |bytes| pb::GetRandomBytesResponse {
                random: bytes.into_vec(),
            },
        )
        .await
    }

    async fn decrypt(
        &self,
        req: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "Decrypt"),
            req,
            |mut r| (r.context.take(), Ok(Decrypt(decrypt_in(r)))),
            decrypted_to_pb,
        )
        .await
    }

    async fn batch_encrypt(
        &self,
        req: Request<pb::BatchEncryptRequest>,
    ) -> Result<Response<pb::BatchEncryptResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "BatchEncrypt"),
            req,
            |r| {
                let items = r.items.into_iter().map(encrypt_in).collect();
                (r.context, Ok(EncryptBatch(items)))
            },
            |results| pb::BatchEncryptResponse {
                results: results
                    .into_iter()
                    .map(|r| pb::EncryptResult {
                        result: Some(match r {
                            Ok(e) => pb::encrypt_result::Result::Ok(encrypted_to_pb(e)),
                            Err(e) => pb::encrypt_result::Result::Error(item_error(&e)),
                        }),
                    })
                    .collect(),
            },
        )
        .await
    }

    async fn batch_decrypt(
        &self,
        req: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        self.serve(
            rpc(KEY_BROKER, "BatchDecrypt"),
            req,
            |r| {
                let items = r.items.into_iter().map(decrypt_in).collect();
                (r.context, Ok(DecryptBatch(items)))
            },
            |results| pb::BatchDecryptResponse {
                results: results
                    .into_iter()
                    .map(|r| pb::DecryptResult {
                        result: Some(match r {
                            Ok(d) => pb::decrypt_result::Result::Ok(decrypted_to_pb(d)),
                            Err(e) => pb::decrypt_result::Result::Error(item_error(&e)),
                        }),
                    })
                    .collect(),
            },
        )
        .await
    }
}
