//! The gRPC services. Each handler: identity (from the connection, decided at the handshake) →
//! access check → parse → keyring → convert. Errors become `tonic::Status` in one place
//! ([`BrokerError`]'s `From` impl).
//!
//! Every request gets a request id — the caller's `x-request-id` metadata when it is sane (1-128
//! of `[A-Za-z0-9._:/-]`), else a fresh one — that is in its log line and in the span of
//! everything logged while it runs, and is sent back in the reply's `x-request-id`.

use std::{future::Future, sync::Arc, time::Instant};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use keybroker_proto::v1::{
    self as pb, key_broker_server::KeyBroker, key_management_server::KeyManagement,
    unwrap_key_request::Wrapped as PbWrapped,
};
use tonic::{Request, Response, Status, metadata::MetadataValue};
use tracing::Instrument;

use crate::{
    authz::AllowList,
    error::BrokerError,
    identity::Caller,
    keyring::{KeyEntry, KeyState, Keyring, PublicKeyInfo},
    metrics::Metrics,
    model::{Algorithm, DEFAULT_TENANT, Dek, KeyName, KeyType, validate_part},
    tls::ConnInfo,
};

/// The data-plane service's full name.
pub const KEY_BROKER: &str = "keybroker.v1.KeyBroker";
/// The control-plane service's full name.
pub const KEY_MANAGEMENT: &str = "keybroker.v1.KeyManagement";
/// The metadata header carrying the request id (in both directions).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// A caller-supplied request id, if it is safe to log as is: 1-128 characters of
/// `[A-Za-z0-9._:/-]` (no spaces, quotes or control characters that could forge log lines).
pub fn sanitize_request_id(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b));
    ok.then(|| s.to_string())
}

/// The request's id: the caller's `x-request-id` if sane, else a fresh `kb-<uuid>`.
pub fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(sanitize_request_id)
        .unwrap_or_else(|| format!("kb-{}", uuid::Uuid::new_v4().simple()))
}

/// Both services over one keyring.
#[derive(Clone)]
pub struct Api {
    keyring: Arc<Keyring>,
    allow: Arc<AllowList>,
    metrics: Option<Arc<Metrics>>,
}

impl Api {
    /// Builds the services.
    pub fn new(keyring: Arc<Keyring>, allow: Arc<AllowList>) -> Self {
        Self {
            keyring,
            allow,
            metrics: None,
        }
    }

    /// Records every request in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The verified caller, if it may call at all.
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, BrokerError> {
        let info = req
            .extensions()
            .get::<ConnInfo>()
            .ok_or_else(|| BrokerError::PermissionDenied("no verified client identity".into()))?;
        if !self.allow.permits(&info.caller) {
            return Err(BrokerError::PermissionDenied(format!(
                "identity {} is not allowed to call this broker",
                info.caller
            )));
        }
        Ok(info.caller.clone())
    }

    /// Runs one request: request id, identity, then the handler, with one log line and one
    /// metrics observation for the outcome.
    async fn handle<Req, Resp, F, Fut>(
        &self,
        service: &'static str,
        method: &'static str,
        req: Request<Req>,
        f: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(Caller, Req) -> Fut,
        Fut: Future<Output = Result<Resp, BrokerError>>,
    {
        let start = Instant::now();
        let request_id = request_id(&req);
        let peer = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.caller.id.clone());
        let span = tracing::info_span!("rpc", method, request_id = %request_id);
        let result = async {
            match self.caller(&req) {
                Ok(caller) => f(caller, req.into_inner()).await,
                Err(e) => Err(e),
            }
        }
        .instrument(span)
        .await;
        let micros = start.elapsed().as_micros() as u64;
        let caller = peer.as_deref().unwrap_or("-");
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.code(),
        };
        match &result {
            Ok(_) => tracing::debug!(method, request_id = %request_id, caller, micros, "ok"),
            Err(e) => {
                tracing::info!(method, request_id = %request_id, caller, micros, code = ?e.code(), error = %e, "refused")
            }
        }
        if let Some(m) = &self.metrics {
            m.observe_request(service, method, code, start.elapsed());
        }
        let rid = MetadataValue::try_from(request_id.as_str()).ok();
        match result {
            Ok(resp) => {
                let mut resp = Response::new(resp);
                if let Some(v) = rid {
                    resp.metadata_mut().insert(REQUEST_ID_HEADER, v);
                }
                Ok(resp)
            }
            Err(e) => {
                let mut status = Status::from(e);
                if let Some(v) = rid {
                    status.metadata_mut().insert(REQUEST_ID_HEADER, v);
                }
                Err(status)
            }
        }
    }
}

fn key_name(s: &str) -> Result<KeyName, BrokerError> {
    KeyName::parse(s).map_err(|e| match e {
        BrokerError::InvalidArgument(m) => BrokerError::invalid(format!("key: {m}")),
        other => other,
    })
}

fn optional_key(s: &str) -> Result<Option<KeyName>, BrokerError> {
    if s.is_empty() {
        Ok(None)
    } else {
        key_name(s).map(Some)
    }
}

fn algorithm_to_pb(a: Algorithm) -> pb::Algorithm {
    match a {
        Algorithm::Aes256Gcm => pb::Algorithm::Aes256Gcm,
        Algorithm::AesKeyWrapPad => pb::Algorithm::AesKeyWrapPad,
        Algorithm::RsaOaepSha256 => pb::Algorithm::RsaOaepSha256,
        Algorithm::RsaOaepSha1 => pb::Algorithm::RsaOaepSha1,
    }
}

fn algorithm_from_pb(v: i32) -> Result<Option<Algorithm>, BrokerError> {
    match pb::Algorithm::try_from(v) {
        Ok(pb::Algorithm::Unspecified) => Ok(None),
        Ok(pb::Algorithm::Aes256Gcm) => Ok(Some(Algorithm::Aes256Gcm)),
        Ok(pb::Algorithm::AesKeyWrapPad) => Ok(Some(Algorithm::AesKeyWrapPad)),
        Ok(pb::Algorithm::RsaOaepSha256) => Ok(Some(Algorithm::RsaOaepSha256)),
        Ok(pb::Algorithm::RsaOaepSha1) => Ok(Some(Algorithm::RsaOaepSha1)),
        Err(_) => Err(BrokerError::invalid(format!("unknown algorithm {v}"))),
    }
}

fn key_type_to_pb(t: KeyType) -> pb::KeyType {
    match t {
        KeyType::Aes256 => pb::KeyType::Aes256,
        KeyType::Rsa2048 => pb::KeyType::Rsa2048,
        KeyType::Rsa3072 => pb::KeyType::Rsa3072,
        KeyType::Rsa4096 => pb::KeyType::Rsa4096,
    }
}

fn key_type_from_pb(v: i32) -> Result<KeyType, BrokerError> {
    match pb::KeyType::try_from(v) {
        Ok(pb::KeyType::Aes256) => Ok(KeyType::Aes256),
        Ok(pb::KeyType::Rsa2048) => Ok(KeyType::Rsa2048),
        Ok(pb::KeyType::Rsa3072) => Ok(KeyType::Rsa3072),
        Ok(pb::KeyType::Rsa4096) => Ok(KeyType::Rsa4096),
        Ok(pb::KeyType::Unspecified) => Err(BrokerError::invalid("key_type is required")),
        Err(_) => Err(BrokerError::invalid(format!("unknown key_type {v}"))),
    }
}

impl Api {
    fn key_to_pb(&self, k: &KeyEntry) -> pb::Key {
        pb::Key {
            name: k.name.to_string(),
            tenant: k.name.tenant().to_string(),
            key_type: key_type_to_pb(k.key_type).into(),
            algorithm: algorithm_to_pb(k.algorithm).into(),
            state: match k.state {
                KeyState::Enabled => pb::KeyState::Enabled,
                KeyState::Quarantined(_) => pb::KeyState::Quarantined,
            }
            .into(),
            created_at_ms: k.created_at_ms,
            current_version: k.versions.last().map(|v| v.number).unwrap_or(0),
            versions: k
                .versions
                .iter()
                .map(|v| pb::KeyVersion {
                    version: v.number,
                    id: v.id.as_bytes().to_vec(),
                    created_at_ms: v.created_at_ms,
                })
                .collect(),
            mechanism: self
                .keyring
                .hsm()
                .capabilities()
                .mechanism_name(k.algorithm),
        }
    }
}

/// rsaEncryption (RFC 8017 appendix C).
const RSA_ENCRYPTION: spki::ObjectIdentifier =
    spki::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// Encodes an RSA public key as SPKI PEM and as a JWK.
pub fn public_key_formats(pk: &PublicKeyInfo) -> Result<(String, String), BrokerError> {
    use spki::der::{Encode, asn1::BitStringRef, pem::LineEnding};
    let strip = |b: &[u8]| -> Vec<u8> {
        let i = b
            .iter()
            .position(|&x| x != 0)
            .unwrap_or(b.len().saturating_sub(1));
        b[i..].to_vec()
    };
    let (n, e) = (strip(&pk.modulus), strip(&pk.exponent));
    let bad = |what: &str, err: &dyn std::fmt::Display| {
        BrokerError::internal(format!("encode public key ({what}): {err}"))
    };
    let rsa = pkcs1::RsaPublicKey {
        modulus: pkcs1::UintRef::new(&n).map_err(|x| bad("modulus", &x))?,
        public_exponent: pkcs1::UintRef::new(&e).map_err(|x| bad("exponent", &x))?,
    };
    let rsa_der = rsa.to_der().map_err(|x| bad("PKCS#1", &x))?;
    let spki = spki::SubjectPublicKeyInfoRef {
        algorithm: spki::AlgorithmIdentifierRef {
            oid: RSA_ENCRYPTION,
            parameters: Some(spki::der::asn1::AnyRef::NULL),
        },
        subject_public_key: BitStringRef::from_bytes(&rsa_der)
            .map_err(|x| bad("bit string", &x))?,
    };
    let der = spki.to_der().map_err(|x| bad("SPKI", &x))?;
    let pem = spki::der::pem::encode_string("PUBLIC KEY", LineEnding::LF, &der)
        .map_err(|x| bad("PEM", &x))?;
    let jwk = serde_json::json!({
        "kty": "RSA",
        "n": URL_SAFE_NO_PAD.encode(&n),
        "e": URL_SAFE_NO_PAD.encode(&e),
        "alg": if pk.algorithm == Algorithm::RsaOaepSha1 { "RSA-OAEP" } else { "RSA-OAEP-256" },
        "use": "enc",
        "kid": pk.version_id.hex(),
    });
    Ok((pem, jwk.to_string()))
}

#[tonic::async_trait]
impl KeyBroker for Api {
    async fn wrap_key(
        &self,
        req: Request<pb::WrapKeyRequest>,
    ) -> Result<Response<pb::WrapKeyResponse>, Status> {
        self.handle(KEY_BROKER, "WrapKey", req, |_caller, r| async move {
            let name = key_name(&r.key)?;
            let w = self
                .keyring
                .wrap(&name, Dek::new(r.plaintext), &r.aad)
                .await?;
            Ok(pb::WrapKeyResponse {
                wrapped_key: w.envelope,
                key: w.key.to_string(),
                key_version: w.version,
                algorithm: algorithm_to_pb(w.algorithm).into(),
            })
        })
        .await
    }

    async fn unwrap_key(
        &self,
        req: Request<pb::UnwrapKeyRequest>,
    ) -> Result<Response<pb::UnwrapKeyResponse>, Status> {
        self.handle(KEY_BROKER, "UnwrapKey", req, |_caller, r| async move {
            let u = match r.wrapped {
                Some(PbWrapped::Envelope(env)) => {
                    let expected = optional_key(&r.key)?;
                    self.keyring.unwrap(expected.as_ref(), &env, &r.aad).await?
                }
                Some(PbWrapped::Raw(raw)) => {
                    if r.key.is_empty() {
                        return Err(BrokerError::invalid(
                            "key is required with a raw ciphertext",
                        ));
                    }
                    if !r.aad.is_empty() {
                        return Err(BrokerError::invalid(
                            "a raw RSA-OAEP ciphertext cannot carry aad",
                        ));
                    }
                    let name = key_name(&r.key)?;
                    let alg = algorithm_from_pb(raw.algorithm)?
                        .ok_or_else(|| BrokerError::invalid("raw.algorithm is required"))?;
                    self.keyring
                        .unwrap_raw(&name, raw.key_version, alg, &raw.ciphertext)
                        .await?
                }
                None => return Err(BrokerError::invalid("set envelope or raw")),
            };
            Ok(pb::UnwrapKeyResponse {
                plaintext: u.dek.into_vec(),
                key: u.key.to_string(),
                key_version: u.version,
                algorithm: algorithm_to_pb(u.algorithm).into(),
            })
        })
        .await
    }

    async fn generate_data_key(
        &self,
        req: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        self.handle(
            KEY_BROKER,
            "GenerateDataKey",
            req,
            |_caller, r| async move {
                let name = key_name(&r.key)?;
                let len = usize::try_from(r.length).unwrap_or(usize::MAX);
                let (dek, w) = self.keyring.generate_data_key(&name, len, &r.aad).await?;
                Ok(pb::GenerateDataKeyResponse {
                    plaintext: dek.into_vec(),
                    wrapped_key: w.envelope,
                    key: w.key.to_string(),
                    key_version: w.version,
                    algorithm: algorithm_to_pb(w.algorithm).into(),
                })
            },
        )
        .await
    }

    async fn rewrap(
        &self,
        req: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        self.handle(KEY_BROKER, "Rewrap", req, |_caller, r| async move {
            let expected = optional_key(&r.key)?;
            let dest = optional_key(&r.destination_key)?;
            let new_aad = if r.change_aad {
                Some(r.new_aad.as_slice())
            } else {
                None
            };
            let (w, src_version) = self
                .keyring
                .rewrap(
                    expected.as_ref(),
                    &r.envelope,
                    &r.aad,
                    dest.as_ref(),
                    new_aad,
                )
                .await?;
            Ok(pb::RewrapResponse {
                wrapped_key: w.envelope,
                key: w.key.to_string(),
                key_version: w.version,
                algorithm: algorithm_to_pb(w.algorithm).into(),
                source_key_version: src_version,
            })
        })
        .await
    }

    async fn get_public_key(
        &self,
        req: Request<pb::GetPublicKeyRequest>,
    ) -> Result<Response<pb::GetPublicKeyResponse>, Status> {
        self.handle(KEY_BROKER, "GetPublicKey", req, |_caller, r| async move {
            let name = key_name(&r.key)?;
            let pk = self.keyring.public_key(&name, r.key_version).await?;
            let (spki_pem, jwk) = public_key_formats(&pk)?;
            Ok(pb::GetPublicKeyResponse {
                key: pk.key.to_string(),
                key_version: pk.version,
                algorithm: algorithm_to_pb(pk.algorithm).into(),
                spki_pem,
                jwk,
                key_version_id: pk.version_id.as_bytes().to_vec(),
            })
        })
        .await
    }
}

#[tonic::async_trait]
impl KeyManagement for Api {
    async fn create_key(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.handle(KEY_MANAGEMENT, "CreateKey", req, |caller, r| async move {
            let name = key_name(&r.key)?;
            let key_type = key_type_from_pb(r.key_type)?;
            let alg = algorithm_from_pb(r.algorithm)?;
            let k = self.keyring.create(name, key_type, alg).await?;
            tracing::info!(key = %k.name, caller = %caller, "CreateKey");
            Ok(self.key_to_pb(&k))
        })
        .await
    }

    async fn get_key(&self, req: Request<pb::GetKeyRequest>) -> Result<Response<pb::Key>, Status> {
        self.handle(KEY_MANAGEMENT, "GetKey", req, |_caller, r| async move {
            let k = self.keyring.get(&key_name(&r.key)?)?;
            Ok(self.key_to_pb(&k))
        })
        .await
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.handle(KEY_MANAGEMENT, "ListKeys", req, |_caller, r| async move {
            let tenant = if r.tenant.is_empty() {
                DEFAULT_TENANT.to_string()
            } else {
                r.tenant
            };
            validate_part("tenant", &tenant)?;
            let limit = match r.page_size {
                0 => 100,
                n @ 1..=1000 => n as usize,
                n => {
                    return Err(BrokerError::invalid(format!(
                        "page_size {n} is more than 1000"
                    )));
                }
            };
            let after = if r.page_token.is_empty() {
                None
            } else {
                validate_part("page_token", &r.page_token)?;
                Some(r.page_token.as_str())
            };
            let (keys, next) = self.keyring.list(&tenant, after, limit);
            Ok(pb::ListKeysResponse {
                keys: keys.iter().map(|k| self.key_to_pb(k)).collect(),
                next_page_token: next.unwrap_or_default(),
            })
        })
        .await
    }

    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.handle(KEY_MANAGEMENT, "RotateKey", req, |caller, r| async move {
            let name = key_name(&r.key)?;
            let k = self.keyring.rotate(&name).await?;
            tracing::info!(key = %k.name, caller = %caller, version = k.versions.len(), "RotateKey");
            Ok(self.key_to_pb(&k))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_only_when_safe_to_log() {
        assert_eq!(sanitize_request_id("kbc-0a1b").as_deref(), Some("kbc-0a1b"));
        assert_eq!(
            sanitize_request_id("a1b2c3d4-e5f6:trace/7.x").as_deref(),
            Some("a1b2c3d4-e5f6:trace/7.x")
        );
        for bad in [
            "",
            "has space",
            "new\nline",
            "quote\"",
            "x=y",
            "ü",
            &"a".repeat(129),
        ] {
            assert_eq!(sanitize_request_id(bad), None, "{bad:?}");
        }
        let mut req = Request::new(());
        let fresh = request_id(&req);
        assert!(fresh.starts_with("kb-") && fresh.len() == 35, "{fresh}");
        req.metadata_mut()
            .insert(REQUEST_ID_HEADER, MetadataValue::from_static("order-42"));
        assert_eq!(request_id(&req), "order-42");
    }
}
