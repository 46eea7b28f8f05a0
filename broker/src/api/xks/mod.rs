//! The AWS KMS External Key Store (XKS) proxy API v1 as a codec over the pipeline (spec:
//! `aws/aws-kms-xksproxy-api-spec`, `xks_proxy_api_spec.md`; the operations' semantics are in
//! [`crate::api::ops::xks`]). What is here needs no listener: URI paths, the request and
//! response bodies straight from the spec (serde), the one mapping from [`BrokerError`] to the
//! spec's `errorName` and HTTP status, SigV4 verification ([`sigv4`]) and the `[xks]`
//! configuration ([`config`]). [`door`] serves them on their own HTTPS listener.
//!
//! A request goes: path → prefix (→ tenant, identity, credentials) → SigV4 against that
//! prefix's credentials (the verified access key is the caller: `Caller` of kind `SigV4`, id
//! the prefix's identity) → body decoded here into the request context (`requestMetadata` as
//! [`Upstream`]) and one operation → [`Pipeline::execute`](super::Pipeline::execute) → the
//! reply encoded here.

pub mod config;
pub mod door;
pub mod sigv4;

use super::https::{json_body as body, printable};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};

use super::{
    ops::xks::{
        XksDecrypt, XksEncrypt, XksEncrypted, XksHealth, XksHealthReport, XksKey, XksKeyMetadata,
        XksMetadata,
    },
    pipeline::Context,
};
use crate::{
    error::{BrokerError, Deadline, Denied, Invalid, NotFound, Refused},
    model::Dek,
    policy::Upstream,
};

/// The path every XKS URI has after its prefix.
pub const API_PATH: &str = "/kms/xks/v1";

/// The operation a URI names (after its prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `.../keys/{id}/metadata`
    Metadata(String),
    /// `.../keys/{id}/encrypt`
    Encrypt(String),
    /// `.../keys/{id}/decrypt`
    Decrypt(String),
    /// `.../health`
    Health,
}

/// Splits a URI path into its prefix (`""` or `/a/b`) and route; anything else is
/// InvalidUriPathException. The prefix is then looked up in the configuration.
pub fn route(path: &str) -> Result<(&str, Route), BrokerError> {
    let bad = || BrokerError::from(NotFound::UriPath(printable(path, 256)));
    let at = path.rfind(API_PATH).ok_or_else(bad)?;
    let (prefix, rest) = (&path[..at], &path[at + API_PATH.len()..]);
    let parts: Vec<&str> = rest.split('/').collect();
    let r = match parts.as_slice() {
        ["", "health"] => Route::Health,
        ["", "keys", id, op] if valid_key_id(id) => match *op {
            "metadata" => Route::Metadata((*id).to_string()),
            "encrypt" => Route::Encrypt((*id).to_string()),
            "decrypt" => Route::Decrypt((*id).to_string()),
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    };
    Ok((prefix, r))
}

/// An `externalKeyId` as the spec allows it: 1-128 of `[A-Za-z0-9._-]`.
fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `requestMetadata`, straight from the spec (fields KMS may add later are ignored).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMetadata {
    /// `awsPrincipalArn`.
    pub aws_principal_arn: Option<String>,
    /// `awsSourceVpc`.
    pub aws_source_vpc: Option<String>,
    /// `awsSourceVpce`.
    pub aws_source_vpce: Option<String>,
    /// `kmsKeyArn`.
    pub kms_key_arn: Option<String>,
    /// `kmsOperation`.
    pub kms_operation: Option<String>,
    /// `kmsRequestId`.
    pub kms_request_id: Option<String>,
    /// `kmsViaService`.
    pub kms_via_service: Option<String>,
}

/// The GetKeyMetadata request body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataRequest {
    /// `requestMetadata`.
    pub request_metadata: Option<RequestMetadata>,
}

/// The Encrypt request body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptRequest {
    /// `requestMetadata`.
    pub request_metadata: Option<RequestMetadata>,
    /// `plaintext` (Base64).
    pub plaintext: Option<String>,
    /// `encryptionAlgorithm` (`AES_GCM`).
    pub encryption_algorithm: Option<String>,
    /// `additionalAuthenticatedData` (Base64).
    pub additional_authenticated_data: Option<String>,
    /// `ciphertextDataIntegrityValueAlgorithm` (`SHA_256`).
    pub ciphertext_data_integrity_value_algorithm: Option<String>,
}

/// The Decrypt request body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptRequest {
    /// `requestMetadata`.
    pub request_metadata: Option<RequestMetadata>,
    /// `ciphertext` (Base64).
    pub ciphertext: Option<String>,
    /// `ciphertextMetadata` (Base64).
    pub ciphertext_metadata: Option<String>,
    /// `encryptionAlgorithm` (`AES_GCM`).
    pub encryption_algorithm: Option<String>,
    /// `additionalAuthenticatedData` (Base64).
    pub additional_authenticated_data: Option<String>,
    /// `initializationVector` (Base64).
    pub initialization_vector: Option<String>,
    /// `authenticationTag` (Base64).
    pub authentication_tag: Option<String>,
}

/// The GetHealthStatus request body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthRequest {
    /// `requestMetadata`.
    pub request_metadata: Option<RequestMetadata>,
}

/// The GetKeyMetadata response body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataResponse {
    /// `keySpec`.
    pub key_spec: &'static str,
    /// `keyUsage`.
    pub key_usage: Vec<&'static str>,
    /// `keyStatus`.
    pub key_status: &'static str,
}

/// The Encrypt response body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptResponse {
    /// `ciphertext`.
    pub ciphertext: String,
    /// `ciphertextMetadata`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext_metadata: Option<String>,
    /// `initializationVector`.
    pub initialization_vector: String,
    /// `authenticationTag`.
    pub authentication_tag: String,
    /// `ciphertextDataIntegrityValue`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext_data_integrity_value: Option<String>,
}

/// The Decrypt response body (`{"plaintext": BASE64}`). Holds the plaintext: wiped on drop.
pub struct DecryptResponse {
    /// `plaintext`.
    pub plaintext: zeroize::Zeroizing<String>,
}

impl Serialize for DecryptResponse {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("DecryptResponse", 1)?;
        st.serialize_field("plaintext", self.plaintext.as_str())?;
        st.end()
    }
}

/// One `ekmFleetDetails` entry.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EkmFleetDetail {
    /// `id`.
    pub id: String,
    /// `model`.
    pub model: String,
    /// `healthStatus`.
    pub health_status: &'static str,
}

/// The GetHealthStatus response body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthResponse {
    /// `xksProxyFleetSize`.
    pub xks_proxy_fleet_size: u32,
    /// `xksProxyVendor`.
    pub xks_proxy_vendor: String,
    /// `xksProxyModel`.
    pub xks_proxy_model: String,
    /// `ekmVendor`.
    pub ekm_vendor: String,
    /// `ekmFleetDetails`.
    pub ekm_fleet_details: Vec<EkmFleetDetail>,
}

/// An error body: `errorName` and `errorMessage`.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// The spec's error name.
    pub error_name: &'static str,
    /// Printable ASCII, under 512 characters.
    pub error_message: String,
}

/// The spec's error names.
pub mod names {
    /// 400: an input parameter is invalid.
    pub const VALIDATION: &str = "ValidationException";
    /// 400: the key or key store is disabled, deactivated or blocked.
    pub const INVALID_STATE: &str = "InvalidStateException";
    /// 400: ciphertext, IV, AAD or tag corrupted, missing or otherwise invalid.
    pub const INVALID_CIPHERTEXT: &str = "InvalidCiphertextException";
    /// 400: the key does not support the operation.
    pub const INVALID_KEY_USAGE: &str = "InvalidKeyUsageException";
    /// 401: invalid SigV4 signature.
    pub const AUTHENTICATION_FAILED: &str = "AuthenticationFailedException";
    /// 403: not authorised (secondary authorization on request metadata).
    pub const ACCESS_DENIED: &str = "AccessDeniedException";
    /// 404: no such external key.
    pub const KEY_NOT_FOUND: &str = "KeyNotFoundException";
    /// 404: no such URI path.
    pub const INVALID_URI_PATH: &str = "InvalidUriPathException";
    /// 429: request rate too high.
    pub const THROTTLING: &str = "ThrottlingException";
    /// 501: not implemented, or a size beyond what this proxy supports.
    pub const UNSUPPORTED_OPERATION: &str = "UnsupportedOperationException";
    /// 503: a dependency timed out.
    pub const DEPENDENCY_TIMEOUT: &str = "DependencyTimeoutException";
    /// 500: anything else (the HSM failed or cannot be reached).
    pub const INTERNAL: &str = "InternalException";
}

/// The one mapping from a broker error to the spec's HTTP status and `errorName`.
pub fn error_name(e: &BrokerError) -> (u16, &'static str) {
    use names::*;
    match e {
        // Sizes keybroker refuses are beyond the spec's minimums (4,300 bytes of plaintext,
        // 8,192 of AAD): "a parameter value exceeded the maximum size that is currently
        // supported" is UnsupportedOperationException.
        BrokerError::Invalid(
            Invalid::PayloadTooLarge(_) | Invalid::AadTooLong | Invalid::BatchPayload(_),
        ) => (501, UNSUPPORTED_OPERATION),
        BrokerError::Invalid(_) => (400, VALIDATION),
        BrokerError::Unauthentic | BrokerError::UnauthenticCiphertext => (400, INVALID_CIPHERTEXT),
        BrokerError::NotFound(NotFound::UriPath(_)) => (404, INVALID_URI_PATH),
        // A version the ciphertext metadata names that the key no longer has.
        BrokerError::NotFound(NotFound::Version { .. }) => (400, INVALID_CIPHERTEXT),
        BrokerError::NotFound(_) => (404, KEY_NOT_FOUND),
        BrokerError::Denied(Denied::Signature(_) | Denied::NoIdentity) => {
            (401, AUTHENTICATION_FAILED)
        }
        // The key owner cut the service off: the key store is "blocked".
        BrokerError::Denied(Denied::HyokDisconnected) => (400, INVALID_STATE),
        BrokerError::Denied(_) => (403, ACCESS_DENIED),
        BrokerError::Refused(
            Refused::NotAllowed { .. } | Refused::NotForPayloads { .. } | Refused::NotRsa { .. },
        ) => (400, INVALID_KEY_USAGE),
        BrokerError::Refused(Refused::CannotServe { .. }) => (501, UNSUPPORTED_OPERATION),
        BrokerError::Refused(Refused::HsmRefused) => (500, INTERNAL),
        BrokerError::Refused(_) => (400, INVALID_STATE),
        BrokerError::Exhausted(_) => (429, THROTTLING),
        BrokerError::Deadline(Deadline::Hsm | Deadline::Passed | Deadline::WriteLock)
        | BrokerError::Deadline(Deadline::OnArrival) => (503, DEPENDENCY_TIMEOUT),
        BrokerError::Exists(_) | BrokerError::Unavailable(_) | BrokerError::Internal(_) => {
            (500, INTERNAL)
        }
    }
}

/// The status and body of a failed request (an internal error's detail stays in the log).
pub fn error_response(e: &BrokerError) -> (u16, ErrorBody) {
    let (status, name) = error_name(e);
    (
        status,
        ErrorBody {
            error_name: name,
            error_message: printable(&e.public_message(), 511),
        },
    )
}

/// The status and body of a request with any method but POST (the spec: 405).
pub fn method_not_allowed() -> (u16, &'static str) {
    (405, "Method Not Allowed: the XKS proxy API takes POST only")
}

/// A request the codec decoded: its context (with `requestMetadata` as [`Upstream`]), the
/// request id to use (`kmsRequestId`, which the pipeline keeps if safe to log), and the
/// operation or why there is none.
pub struct Decoded<O> {
    /// The request context.
    pub context: Context,
    /// `kmsRequestId`.
    pub request_id: Option<String>,
    /// The operation.
    pub op: Result<O, BrokerError>,
}

fn b64(field: &'static str, s: &str) -> Result<Vec<u8>, BrokerError> {
    B64.decode(s).map_err(|_| Invalid::Base64(field).into())
}

fn required<'a>(field: &'static str, v: &'a Option<String>) -> Result<&'a str, BrokerError> {
    v.as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Invalid::Missing(field).into())
}

/// Which `requestMetadata` fields an operation requires.
#[derive(Clone, Copy)]
enum Needs {
    /// GetKeyMetadata: principal, operation, request id.
    Metadata,
    /// Encrypt, Decrypt: and the KMS key ARN.
    Crypto,
    /// GetHealthStatus: operation and request id.
    Health,
}

fn check_metadata(
    m: &Option<RequestMetadata>,
    needs: Needs,
) -> Result<&RequestMetadata, BrokerError> {
    let m = m.as_ref().ok_or(Invalid::Missing("requestMetadata"))?;
    required("requestMetadata.kmsRequestId", &m.kms_request_id)?;
    required("requestMetadata.kmsOperation", &m.kms_operation)?;
    if matches!(needs, Needs::Metadata | Needs::Crypto) {
        required("requestMetadata.awsPrincipalArn", &m.aws_principal_arn)?;
    }
    if matches!(needs, Needs::Crypto) {
        required("requestMetadata.kmsKeyArn", &m.kms_key_arn)?;
    }
    Ok(m)
}

fn context_of(m: Option<&RequestMetadata>) -> (Context, Option<String>) {
    let Some(m) = m else {
        return (Context::default(), None);
    };
    let upstream = Upstream {
        principal: m.aws_principal_arn.clone(),
        operation: m.kms_operation.clone(),
        request_id: m.kms_request_id.clone(),
        via_service: m.kms_via_service.clone(),
    };
    (
        Context {
            upstream: Some(upstream),
            ..Context::default()
        },
        m.kms_request_id.clone(),
    )
}

fn decoded<O>(m: Option<&RequestMetadata>, op: Result<O, BrokerError>) -> Decoded<O> {
    let (context, request_id) = context_of(m);
    Decoded {
        context,
        request_id,
        op,
    }
}

fn algorithm(v: &Option<String>) -> Result<(), BrokerError> {
    match v.as_deref() {
        Some("AES_GCM") => Ok(()),
        None => Err(Invalid::Missing("encryptionAlgorithm").into()),
        Some(_) => Err(Invalid::Value {
            field: "encryptionAlgorithm",
            expected: "AES_GCM",
        }
        .into()),
    }
}

/// Decodes a GetKeyMetadata body for `key`.
pub fn decode_metadata(bytes: &[u8], key: XksKey) -> Decoded<XksMetadata> {
    match body::<MetadataRequest>(bytes) {
        Err(e) => decoded(None, Err(e)),
        Ok(r) => {
            let op =
                check_metadata(&r.request_metadata, Needs::Metadata).map(|_| XksMetadata { key });
            decoded(r.request_metadata.as_ref(), op)
        }
    }
}

/// Decodes an Encrypt body for `key`.
pub fn decode_encrypt(bytes: &[u8], key: XksKey) -> Decoded<XksEncrypt> {
    let r = match body::<EncryptRequest>(bytes) {
        Err(e) => return decoded(None, Err(e)),
        Ok(r) => r,
    };
    let op = (|| {
        check_metadata(&r.request_metadata, Needs::Crypto)?;
        algorithm(&r.encryption_algorithm)?;
        let cdiv = match r.ciphertext_data_integrity_value_algorithm.as_deref() {
            None => false,
            Some("SHA_256") => true,
            Some(_) => {
                return Err(Invalid::Value {
                    field: "ciphertextDataIntegrityValueAlgorithm",
                    expected: "SHA_256",
                }
                .into());
            }
        };
        let plaintext = Dek::new(b64("plaintext", required("plaintext", &r.plaintext)?)?);
        if plaintext.is_empty() {
            return Err(Invalid::PayloadEmpty.into());
        }
        let aad = r
            .additional_authenticated_data
            .as_deref()
            .map(|a| b64("additionalAuthenticatedData", a))
            .transpose()?;
        Ok(XksEncrypt {
            key,
            plaintext,
            aad,
            cdiv,
        })
    })();
    decoded(r.request_metadata.as_ref(), op)
}

/// Decodes a Decrypt body for `key`.
pub fn decode_decrypt(bytes: &[u8], key: XksKey) -> Decoded<XksDecrypt> {
    let r = match body::<DecryptRequest>(bytes) {
        Err(e) => return decoded(None, Err(e)),
        Ok(r) => r,
    };
    let op = (|| {
        check_metadata(&r.request_metadata, Needs::Crypto)?;
        algorithm(&r.encryption_algorithm)?;
        let field = |name: &'static str, v: &Option<String>| -> Result<Vec<u8>, BrokerError> {
            b64(name, required(name, v)?)
        };
        let optional =
            |name: &'static str, v: &Option<String>| v.as_deref().map(|s| b64(name, s)).transpose();
        Ok(XksDecrypt {
            key,
            ciphertext: field("ciphertext", &r.ciphertext)?,
            iv: field("initializationVector", &r.initialization_vector)?,
            tag: field("authenticationTag", &r.authentication_tag)?,
            aad: optional(
                "additionalAuthenticatedData",
                &r.additional_authenticated_data,
            )?,
            metadata: optional("ciphertextMetadata", &r.ciphertext_metadata)?,
        })
    })();
    decoded(r.request_metadata.as_ref(), op)
}

/// Decodes a GetHealthStatus body.
pub fn decode_health(bytes: &[u8], fleet_size: u32) -> Decoded<XksHealth> {
    match body::<HealthRequest>(bytes) {
        Err(e) => decoded(None, Err(e)),
        Ok(r) => {
            let op = check_metadata(&r.request_metadata, Needs::Health)
                .map(|_| XksHealth { fleet_size });
            decoded(r.request_metadata.as_ref(), op)
        }
    }
}

/// The GetKeyMetadata response.
pub fn encode_metadata(m: XksKeyMetadata) -> MetadataResponse {
    MetadataResponse {
        key_spec: m.key_spec,
        key_usage: m.key_usage,
        key_status: m.key_status,
    }
}

/// The Encrypt response.
pub fn encode_encrypt(e: XksEncrypted) -> EncryptResponse {
    EncryptResponse {
        ciphertext: B64.encode(&e.ciphertext),
        ciphertext_metadata: Some(B64.encode(&e.metadata)),
        initialization_vector: B64.encode(&e.iv),
        authentication_tag: B64.encode(&e.tag),
        ciphertext_data_integrity_value: e.cdiv.map(|c| B64.encode(c)),
    }
}

/// The Decrypt response.
pub fn encode_decrypt(plaintext: Dek) -> DecryptResponse {
    DecryptResponse {
        plaintext: zeroize::Zeroizing::new(B64.encode(plaintext.expose())),
    }
}

/// The GetHealthStatus response.
pub fn encode_health(h: XksHealthReport) -> HealthResponse {
    HealthResponse {
        xks_proxy_fleet_size: h.fleet_size,
        xks_proxy_vendor: h.vendor,
        xks_proxy_model: h.model,
        ekm_vendor: h.ekm_vendor,
        ekm_fleet_details: h
            .ekm
            .into_iter()
            .map(|d| EkmFleetDetail {
                id: d.id,
                model: d.model,
                health_status: d.health_status,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        error::{Exhausted, SignatureFailure, Unavailable},
        model::{Algorithm, KeyName, KeyOp, VersionId},
    };

    fn key() -> XksKey {
        XksKey {
            tenant: "acme".into(),
            id: "k1".into(),
        }
    }

    const META: &str = r#""requestMetadata": {"awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
        "kmsKeyArn": "arn:aws:kms:us-east-2:123456789012:key/1234", "kmsOperation": "Encrypt",
        "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae", "kmsViaService": "ebs",
        "someFieldKmsAddsLater": "x"}"#;

    #[test]
    fn every_broker_error_has_the_specs_name_and_status() {
        let k = KeyName::parse("acme/k1").expect("name");
        let cases: Vec<(BrokerError, u16, &str)> = vec![
            (
                Invalid::Missing("plaintext").into(),
                400,
                "ValidationException",
            ),
            (
                Invalid::Base64("plaintext").into(),
                400,
                "ValidationException",
            ),
            (Invalid::Body("x".into()).into(), 400, "ValidationException"),
            (Invalid::PayloadEmpty.into(), 400, "ValidationException"),
            (
                Invalid::PayloadTooLarge(70_000).into(),
                501,
                "UnsupportedOperationException",
            ),
            (
                Invalid::AadTooLong.into(),
                501,
                "UnsupportedOperationException",
            ),
            (
                BrokerError::UnauthenticCiphertext,
                400,
                "InvalidCiphertextException",
            ),
            (BrokerError::Unauthentic, 400, "InvalidCiphertextException"),
            (
                NotFound::Version {
                    key: k.clone(),
                    version: 3,
                }
                .into(),
                400,
                "InvalidCiphertextException",
            ),
            (
                Refused::NotAllowed {
                    key: k.clone(),
                    op: KeyOp::Decrypt,
                }
                .into(),
                400,
                "InvalidKeyUsageException",
            ),
            (
                Refused::NotForPayloads {
                    key: k.clone(),
                    algorithm: Algorithm::AesKeyWrapPad,
                }
                .into(),
                400,
                "InvalidKeyUsageException",
            ),
            (
                Refused::Disabled(k.clone()).into(),
                400,
                "InvalidStateException",
            ),
            (
                Refused::Deleted {
                    key: k.clone(),
                    purge_at_ms: 1,
                }
                .into(),
                400,
                "InvalidStateException",
            ),
            (
                Refused::Quarantined(k.clone()).into(),
                400,
                "InvalidStateException",
            ),
            (
                Refused::Expired {
                    key: k.clone(),
                    expires_ms: 1,
                }
                .into(),
                400,
                "InvalidStateException",
            ),
            (
                Refused::BelowMinimum {
                    key: k.clone(),
                    version: 1,
                    min: 2,
                }
                .into(),
                400,
                "InvalidStateException",
            ),
            (
                Denied::HyokDisconnected.into(),
                400,
                "InvalidStateException",
            ),
            (
                Denied::Signature(SignatureFailure::Mismatch).into(),
                401,
                "AuthenticationFailedException",
            ),
            (
                Denied::NoIdentity.into(),
                401,
                "AuthenticationFailedException",
            ),
            (
                Denied::Key {
                    caller: "xks:acme".into(),
                    permission: crate::policy::Permission::Encrypt,
                    key: k.clone(),
                }
                .into(),
                403,
                "AccessDeniedException",
            ),
            (
                NotFound::Key("acme/k1".into()).into(),
                404,
                "KeyNotFoundException",
            ),
            (
                NotFound::UriPath("/x".into()).into(),
                404,
                "InvalidUriPathException",
            ),
            (Exhausted::Hsm.into(), 429, "ThrottlingException"),
            (Deadline::Hsm.into(), 503, "DependencyTimeoutException"),
            (Deadline::Passed.into(), 503, "DependencyTimeoutException"),
            (Unavailable::Hsm.into(), 500, "InternalException"),
            (Unavailable::Audit.into(), 500, "InternalException"),
            (
                BrokerError::internal("CKR_GENERAL_ERROR"),
                500,
                "InternalException",
            ),
        ];
        for (e, status, name) in cases {
            assert_eq!(error_name(&e), (status, name), "{e}");
            let (s, body) = error_response(&e);
            assert_eq!(s, status);
            assert!(body.error_message.len() < 512);
            assert!(body.error_message.chars().all(|c| (' '..='~').contains(&c)));
            assert!(
                !body.error_message.contains("CKR_"),
                "{}",
                body.error_message
            );
        }
    }

    #[test]
    fn error_messages_are_printable_ascii_under_512_characters() {
        let e: BrokerError = Invalid::Body(format!("{}\u{7}é\n", "x".repeat(600))).into();
        let (_, body) = error_response(&e);
        assert!(body.error_message.len() <= 511);
        assert!(body.error_message.chars().all(|c| (' '..='~').contains(&c)));
        let j = serde_json::to_value(&body).expect("json");
        assert_eq!(j["errorName"], "ValidationException");
        assert!(j["errorMessage"].is_string());
    }

    #[test]
    fn uri_paths_split_into_prefix_and_route() {
        assert_eq!(
            route("/kms/xks/v1/health").expect("health"),
            ("", Route::Health)
        );
        assert_eq!(
            route("/acme/store-1/kms/xks/v1/keys/k.1_x-y/encrypt").expect("encrypt"),
            ("/acme/store-1", Route::Encrypt("k.1_x-y".into()))
        );
        assert_eq!(
            route("/p/kms/xks/v1/keys/k/metadata").expect("metadata").1,
            Route::Metadata("k".into())
        );
        assert_eq!(
            route("/p/kms/xks/v1/keys/k/decrypt").expect("decrypt").1,
            Route::Decrypt("k".into())
        );
        for bad in [
            "/",
            "/p/kms/xks/v2/health",
            "/p/kms/xks/v1/keys/k/sign",
            "/p/kms/xks/v1/keys//encrypt",
            "/p/kms/xks/v1/keys/a b/encrypt",
            "/p/kms/xks/v1/keys/k/encrypt/more",
            "/p/kms/xks/v1/health/",
            &format!("/p/kms/xks/v1/keys/{}/encrypt", "k".repeat(129)),
        ] {
            let e = route(bad).expect_err(bad);
            assert_eq!(error_name(&e), (404, "InvalidUriPathException"), "{bad}");
        }
    }

    #[test]
    fn request_metadata_is_required_and_goes_into_the_context() {
        for body in [r#"{}"#, r#"{"requestMetadata": {}}"#] {
            let d = decode_metadata(body.as_bytes(), key());
            let e = d.op.err().expect("refused");
            assert_eq!(error_name(&e).1, "ValidationException", "{body}");
        }
        let d = decode_metadata(format!("{{{META}}}").as_bytes(), key());
        assert!(d.op.is_ok());
        let u = d.context.upstream.expect("upstream");
        assert_eq!(
            u.principal.as_deref(),
            Some("arn:aws:iam::123456789012:user/Alice")
        );
        assert_eq!(u.operation.as_deref(), Some("Encrypt"));
        assert_eq!(u.via_service.as_deref(), Some("ebs"));
        assert_eq!(
            d.request_id.as_deref(),
            Some("4112f4d6-db54-4af4-ae30-c55a22a8dfae")
        );
        // Health needs no principal.
        let h = decode_health(
            br#"{"requestMetadata": {"kmsRequestId": "r", "kmsOperation": "KmsHealthCheck"}}"#,
            2,
        );
        assert_eq!(h.op.expect("health").fleet_size, 2);
        let e = decode_health(b"{}", 1).op.err().expect("refused");
        assert_eq!(error_name(&e).1, "ValidationException");
        let e = decode_health(b"not json", 1).op.err().expect("refused");
        assert_eq!(error_name(&e).1, "ValidationException");
    }

    #[test]
    fn encrypt_bodies_are_checked_field_by_field() {
        let ok = format!(
            r#"{{{META}, "plaintext": "SGVsbG8gV29ybGQh", "encryptionAlgorithm": "AES_GCM",
            "additionalAuthenticatedData": "cHJvamVjdD1uaWxl", "ciphertextDataIntegrityValueAlgorithm": "SHA_256"}}"#
        );
        let op = decode_encrypt(ok.as_bytes(), key()).op.expect("valid");
        assert_eq!(op.plaintext.expose(), b"Hello World!");
        assert_eq!(op.aad.as_deref(), Some(&b"project=nile"[..]));
        assert!(op.cdiv);
        for (body, name) in [
            (
                format!(r#"{{{META}, "encryptionAlgorithm": "AES_GCM"}}"#),
                "ValidationException",
            ),
            (
                format!(r#"{{{META}, "plaintext": "!!", "encryptionAlgorithm": "AES_GCM"}}"#),
                "ValidationException",
            ),
            (
                format!(r#"{{{META}, "plaintext": "SGk=", "encryptionAlgorithm": "AES_CBC"}}"#),
                "ValidationException",
            ),
            (
                format!(
                    r#"{{{META}, "plaintext": "SGk=", "encryptionAlgorithm": "AES_GCM", "ciphertextDataIntegrityValueAlgorithm": "MD5"}}"#
                ),
                "ValidationException",
            ),
            (
                format!(r#"{{{META}, "plaintext": "", "encryptionAlgorithm": "AES_GCM"}}"#),
                "ValidationException",
            ),
            (
                r#"{"plaintext": "SGk=", "encryptionAlgorithm": "AES_GCM"}"#.to_string(),
                "ValidationException",
            ),
        ] {
            let e = decode_encrypt(body.as_bytes(), key())
                .op
                .err()
                .expect("refused");
            assert_eq!(error_name(&e).1, name, "{body}: {e}");
        }
    }

    #[test]
    fn decrypt_bodies_are_checked_field_by_field() {
        let ok = format!(
            r#"{{{META}, "ciphertext": "ghxkK1txeDNn3q8Y", "ciphertextMetadata": "a2V5X3ZlcnNpb249MQ==",
            "encryptionAlgorithm": "AES_GCM", "initializationVector": "HMrlRw85cAJUd5Ax",
            "authenticationTag": "vBxN2ncH1oEkR8WVXpmyYQ=="}}"#
        );
        let op = decode_decrypt(ok.as_bytes(), key()).op.expect("valid");
        assert_eq!(op.iv.len(), 12);
        assert_eq!(op.tag.len(), 16);
        assert_eq!(op.metadata.as_deref(), Some(&b"key_version=1"[..]));
        assert_eq!(op.aad, None);
        let missing_tag = format!(
            r#"{{{META}, "ciphertext": "ghxk", "encryptionAlgorithm": "AES_GCM", "initializationVector": "HMrlRw85cAJUd5Ax"}}"#
        );
        let e = decode_decrypt(missing_tag.as_bytes(), key())
            .op
            .err()
            .expect("refused");
        assert_eq!(error_name(&e).1, "ValidationException");
    }

    #[test]
    fn responses_have_the_specs_field_names() {
        let r = encode_encrypt(XksEncrypted {
            ciphertext: vec![1, 2],
            iv: vec![0; 12],
            tag: vec![0; 16],
            metadata: crate::api::ops::xks::CiphertextMetadata(VersionId([1; 16])).encode(),
            cdiv: None,
        });
        let j = serde_json::to_value(&r).expect("json");
        for f in [
            "ciphertext",
            "ciphertextMetadata",
            "initializationVector",
            "authenticationTag",
        ] {
            assert!(j[f].is_string(), "{f}: {j}");
        }
        assert!(j.get("ciphertextDataIntegrityValue").is_none());
        let m = serde_json::to_value(encode_metadata(XksKeyMetadata {
            key_spec: "AES_256",
            key_usage: vec!["ENCRYPT", "DECRYPT"],
            key_status: "ENABLED",
        }))
        .expect("json");
        assert_eq!(
            m,
            serde_json::json!({"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"})
        );
        let h = serde_json::to_value(encode_health(XksHealthReport {
            fleet_size: 1,
            vendor: "keybroker".into(),
            model: "keybroker 0.1.0".into(),
            ekm_vendor: "SoftHSM project".into(),
            ekm: vec![crate::api::ops::xks::EkmDetail {
                id: "serial".into(),
                model: "SoftHSM v2".into(),
                health_status: "ACTIVE",
            }],
        }))
        .expect("json");
        assert_eq!(h["xksProxyFleetSize"], 1);
        assert_eq!(h["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");
        let d =
            serde_json::to_value(encode_decrypt(Dek::from_slice(b"Hello World!"))).expect("json");
        assert_eq!(d["plaintext"], "SGVsbG8gV29ybGQh");
    }
}
