//! The Azure Managed HSM EKM proxy API, version `0.1-preview`, as a codec over the pipeline
//! (public reference: `MicrosoftDocs/azure-security-docs`,
//! `articles/key-vault/managed-hsm/external-key-management-proxy-api-reference.md`; the
//! operations' semantics are in [`crate::api::ops::ekm`], the user's page is `docs/src/ekm.md`).
//! What is here needs no listener: URI paths and the `api-version` query, the request and
//! response bodies straight from the reference (serde), base64url without padding, and the one
//! mapping from [`BrokerError`] to an HTTP status and a `{code, message}` body. [`door`] serves
//! them on their own HTTPS listener (TLS 1.3, mutual TLS), [`config`] is `[ekm]`.
//!
//! A request goes: TLS handshake (client CA and subject CN checked there) → path → prefix (→
//! tenant, identity) → `api-version` → body decoded here into the request context
//! (`request_context`) and one operation → [`Pipeline::execute`](super::Pipeline::execute) →
//! the reply encoded here.
//!
//! **`request_context`** goes into the audit record: `request_id` and `correlation_id` as the
//! record's own request and correlation ids, and the upstream request
//! ([`Upstream`]) as `principal` = `pool_name` (the Managed HSM pool that called),
//! `operation` = the EKM operation, `request_id` = `request_id`.

pub mod config;
pub mod door;

use super::https::{json_body as body, printable};
use base64::{
    Engine,
    engine::{
        DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose::URL_SAFE_NO_PAD,
    },
};
use serde::{Deserialize, Serialize};

use super::{
    ops::ekm::{
        API_VERSION, EkmAlgorithm, EkmInfo, EkmKey, EkmKeyMetadata, EkmMetadata, EkmProxyInfo,
        EkmUnwrap, EkmWrap, unsupported_algorithm,
    },
    pipeline::Context,
};
use crate::{
    error::{BrokerError, Deadline, Denied, Invalid, NotFound, Refused},
    model::Dek,
    policy::Upstream,
};

/// base64url (RFC 7515 §2): sent without padding; read with or without it.
const B64URL_IN: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The longest key name and path prefix the reference allows.
pub const MAX_NAME_LEN: usize = 64;

/// The operation a URI path names (after its prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/info`
    Info,
    /// `/{key}/metadata`
    Metadata(String),
    /// `/{key}/wrapkey`
    Wrap(String),
    /// `/{key}/unwrapkey`
    Unwrap(String),
}

impl Route {
    /// The operation's name in the audit trail and the metrics.
    pub fn op(&self) -> &'static str {
        match self {
            Route::Info => "EkmInfo",
            Route::Metadata(_) => "EkmMetadata",
            Route::Wrap(_) => "EkmWrapKey",
            Route::Unwrap(_) => "EkmUnwrapKey",
        }
    }

    /// The key the path names.
    pub fn key(&self) -> Option<&str> {
        match self {
            Route::Info => None,
            Route::Metadata(k) | Route::Wrap(k) | Route::Unwrap(k) => Some(k),
        }
    }
}

/// A key name as the reference allows it: 1-64 of `[A-Za-z0-9-]`.
pub fn valid_key_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A path prefix as the reference allows it: empty, or `/` and at most 64 characters of
/// `[A-Za-z0-9/-]` (without empty segments, so one prefix has one spelling).
pub fn valid_prefix(s: &str) -> bool {
    s.is_empty()
        || (s.starts_with('/')
            && s.len() <= MAX_NAME_LEN + 1
            && s[1..].split('/').all(|seg| {
                !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }))
}

/// Splits a URI path into its prefix (`""` or `/a/b`) and route; anything else is a 404
/// (`NotFound::UriPath`). The prefix is then looked up in the configuration.
pub fn route(path: &str) -> Result<(&str, Route), BrokerError> {
    let bad = || BrokerError::from(NotFound::UriPath(printable(path, 256)));
    let (rest, op) = path.rsplit_once('/').ok_or_else(bad)?;
    if op == "info" {
        return Ok((rest, Route::Info));
    }
    let (prefix, key) = rest.rsplit_once('/').ok_or_else(bad)?;
    if !valid_key_name(key) {
        return Err(bad());
    }
    let key = key.to_string();
    let r = match op {
        "metadata" => Route::Metadata(key),
        "wrapkey" => Route::Wrap(key),
        "unwrapkey" => Route::Unwrap(key),
        _ => return Err(bad()),
    };
    Ok((prefix, r))
}

/// Checks the query's `api-version`: missing or another version is a 400
/// `UnsupportedApiVersion` (its message names the version keybroker speaks).
pub fn check_api_version(query: Option<&str>) -> Result<(), BrokerError> {
    let version = query.unwrap_or("").split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == "api-version").then_some(v)
    });
    match version {
        Some(API_VERSION) => Ok(()),
        // Missing or another: either way the message names the version keybroker speaks.
        _ => Err(Invalid::Value {
            field: "api-version",
            expected: API_VERSION,
        }
        .into()),
    }
}

/// `request_context`, straight from the reference (fields Managed HSM may add are ignored).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct RequestContext {
    /// `request_id` (optional in the reference).
    pub request_id: Option<String>,
    /// `correlation_id`.
    pub correlation_id: Option<String>,
    /// `pool_name`.
    pub pool_name: Option<String>,
}

/// The info and metadata request body.
#[derive(Debug, Deserialize)]
pub struct ContextRequest {
    /// `request_context`.
    pub request_context: Option<RequestContext>,
}

/// The wrapkey and unwrapkey request body.
#[derive(Debug, Deserialize)]
pub struct KeyOperationRequest {
    /// `request_context`.
    pub request_context: Option<RequestContext>,
    /// `alg`.
    pub alg: Option<String>,
    /// `value` (base64url).
    pub value: Option<String>,
}

/// `ProxyInfo`.
#[derive(Debug, Serialize)]
pub struct ProxyInfo {
    /// `api_version`: the highest version keybroker speaks.
    pub api_version: &'static str,
    /// `proxy_vendor`.
    pub proxy_vendor: &'static str,
    /// `proxy_name`.
    pub proxy_name: String,
    /// `ekm_vendor`.
    pub ekm_vendor: String,
    /// `ekm_product`.
    pub ekm_product: String,
}

/// `KeyMetadata`.
#[derive(Debug, Serialize)]
pub struct KeyMetadata {
    /// `key_type`: `oct` or `RSA`.
    pub key_type: &'static str,
    /// `key_size`, bits.
    pub key_size: u32,
    /// `key_ops`: always `["wrapKey", "unwrapKey"]`.
    pub key_ops: [&'static str; 2],
    /// `n` (RSA keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// `e` (RSA keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
}

/// `WrapKeyOperationResult`.
#[derive(Debug, Serialize)]
pub struct WrapResult {
    /// `value`: the wrapped key (base64url).
    pub value: String,
}

/// `UnwrapKeyOperationResult`: holds the key, wiped on drop.
pub struct UnwrapResult {
    /// `value`: the unwrapped key (base64url).
    pub value: zeroize::Zeroizing<String>,
}

impl Serialize for UnwrapResult {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("UnwrapKeyOperationResult", 1)?;
        st.serialize_field("value", self.value.as_str())?;
        st.end()
    }
}

/// `ProxyError`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// `code`.
    pub code: &'static str,
    /// `message`.
    pub message: String,
}

/// The error codes keybroker answers (the reference fixes the statuses and gives
/// `KeyDisabled` as its example; the other names follow that style).
pub mod codes {
    /// 400: a malformed request (body, field, encoding, length).
    pub const INVALID_REQUEST: &str = "InvalidRequest";
    /// 400: `api-version` missing or not `0.1-preview`.
    pub const UNSUPPORTED_API_VERSION: &str = "UnsupportedApiVersion";
    /// 400: `alg` is not the key's algorithm (`A256KW` on an `aes-kwp` key, say).
    pub const UNSUPPORTED_ALGORITHM: &str = "UnsupportedAlgorithm";
    /// 400: the wrapped key does not unwrap under this key.
    pub const INVALID_CIPHERTEXT: &str = "InvalidCiphertext";
    /// 401: no verified client (the handshake refuses most of these first).
    pub const UNAUTHORIZED: &str = "Unauthorized";
    /// 403: the policy does not allow it.
    pub const ACCESS_DENIED: &str = "AccessDenied";
    /// 403: the key owner disconnected the HYOK service identities (the kill switch).
    pub const DISCONNECTED: &str = "ExternalKeyAccessDisconnected";
    /// 403: the key is disabled.
    pub const KEY_DISABLED: &str = "KeyDisabled";
    /// 403: the key (or its version) has expired or is not yet valid.
    pub const KEY_EXPIRED: &str = "KeyExpired";
    /// 403: the key does not allow this operation, or is deleted or quarantined.
    pub const OPERATION_NOT_ALLOWED: &str = "OperationNotAllowed";
    /// 404: no such key.
    pub const KEY_NOT_FOUND: &str = "KeyNotFound";
    /// 404: no such path (prefix or operation).
    pub const PATH_NOT_FOUND: &str = "PathNotFound";
    /// 429: too many requests.
    pub const TOO_MANY_REQUESTS: &str = "TooManyRequests";
    /// 503: the HSM or the audit trail is unavailable, or the deadline passed.
    pub const SERVICE_UNAVAILABLE: &str = "ServiceUnavailable";
    /// 500: anything else.
    pub const INTERNAL: &str = "InternalError";
}

/// The one mapping from a broker error to the reference's HTTP status and a `code`.
pub fn error_code(e: &BrokerError) -> (u16, &'static str) {
    use codes::*;
    match e {
        BrokerError::Invalid(Invalid::Value {
            field: "api-version",
            ..
        }) => (400, UNSUPPORTED_API_VERSION),
        BrokerError::Invalid(Invalid::Value { field: "alg", .. }) => (400, UNSUPPORTED_ALGORITHM),
        BrokerError::Invalid(_) => (400, INVALID_REQUEST),
        BrokerError::Unauthentic | BrokerError::UnauthenticCiphertext => (400, INVALID_CIPHERTEXT),
        BrokerError::NotFound(NotFound::UriPath(_)) => (404, PATH_NOT_FOUND),
        BrokerError::NotFound(_) => (404, KEY_NOT_FOUND),
        BrokerError::Denied(Denied::NoIdentity | Denied::Signature(_)) => (401, UNAUTHORIZED),
        BrokerError::Denied(Denied::HyokDisconnected) => (403, DISCONNECTED),
        BrokerError::Denied(_) => (403, ACCESS_DENIED),
        BrokerError::Refused(Refused::Disabled(_)) => (403, KEY_DISABLED),
        BrokerError::Refused(
            Refused::Expired { .. } | Refused::VersionExpired { .. } | Refused::NotYetValid { .. },
        ) => (403, KEY_EXPIRED),
        BrokerError::Refused(Refused::CannotServe { .. }) => (400, UNSUPPORTED_ALGORITHM),
        BrokerError::Refused(Refused::HsmRefused) => (500, INTERNAL),
        BrokerError::Refused(_) => (403, OPERATION_NOT_ALLOWED),
        BrokerError::Exhausted(_) => (429, TOO_MANY_REQUESTS),
        BrokerError::Deadline(
            Deadline::Hsm | Deadline::Passed | Deadline::WriteLock | Deadline::OnArrival,
        ) => (503, SERVICE_UNAVAILABLE),
        BrokerError::Unavailable(_) => (503, SERVICE_UNAVAILABLE),
        BrokerError::Exists(_) | BrokerError::Internal(_) => (500, INTERNAL),
    }
}

/// The status and body of a failed request (an internal error's detail stays in the log).
pub fn error_response(e: &BrokerError) -> (u16, ErrorBody) {
    let (status, code) = error_code(e);
    (
        status,
        ErrorBody {
            code,
            message: printable(&e.public_message(), 511),
        },
    )
}

/// A request the codec decoded: its context (from `request_context`), the request id to use,
/// and the operation or why there is none.
pub struct Decoded<O> {
    /// The request context.
    pub context: Context,
    /// `request_context.request_id`.
    pub request_id: Option<String>,
    /// The operation.
    pub op: Result<O, BrokerError>,
}

fn b64url(field: &'static str, s: &str) -> Result<Vec<u8>, BrokerError> {
    B64URL_IN
        .decode(s)
        .map_err(|_| Invalid::Base64(field).into())
}

/// base64url without padding, as the reference sends it.
pub fn encode_b64url(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn decoded<O>(
    op_name: &'static str,
    rc: Option<&RequestContext>,
    op: Result<O, BrokerError>,
) -> Decoded<O> {
    let op = match rc {
        Some(_) => op,
        // The reference requires it on every request; an operation's own error goes first.
        None => op.and(Err(Invalid::Missing("request_context").into())),
    };
    let Some(rc) = rc else {
        return Decoded {
            context: Context::default(),
            request_id: None,
            op,
        };
    };
    let upstream = Upstream {
        principal: rc.pool_name.clone(),
        operation: Some(op_name.to_string()),
        request_id: rc.request_id.clone(),
        via_service: None,
    };
    Decoded {
        context: Context {
            request_id: rc.request_id.clone().unwrap_or_default(),
            correlation_id: rc.correlation_id.clone().unwrap_or_default(),
            upstream: Some(upstream),
            ..Context::default()
        },
        request_id: rc.request_id.clone(),
        op,
    }
}

fn algorithm(v: &Option<String>) -> Result<EkmAlgorithm, BrokerError> {
    match v.as_deref() {
        None | Some("") => Err(Invalid::Missing("alg").into()),
        Some(a) => EkmAlgorithm::parse(a).ok_or_else(unsupported_algorithm),
    }
}

fn value(v: &Option<String>) -> Result<Vec<u8>, BrokerError> {
    match v.as_deref() {
        None | Some("") => Err(Invalid::Missing("value").into()),
        Some(s) => b64url("value", s),
    }
}

/// Decodes a proxy info body.
pub fn decode_info(bytes: &[u8]) -> Decoded<EkmInfo> {
    match body::<ContextRequest>(bytes) {
        Err(e) => decoded("EkmInfo", None, Err(e)),
        Ok(r) => decoded("EkmInfo", r.request_context.as_ref(), Ok(EkmInfo)),
    }
}

/// Decodes a key metadata body for `key`.
pub fn decode_metadata(bytes: &[u8], key: EkmKey) -> Decoded<EkmMetadata> {
    match body::<ContextRequest>(bytes) {
        Err(e) => decoded("EkmMetadata", None, Err(e)),
        Ok(r) => decoded(
            "EkmMetadata",
            r.request_context.as_ref(),
            Ok(EkmMetadata { key }),
        ),
    }
}

/// Decodes a wrapkey body for `key`.
pub fn decode_wrap(bytes: &[u8], key: EkmKey) -> Decoded<EkmWrap> {
    let r = match body::<KeyOperationRequest>(bytes) {
        Err(e) => return decoded("EkmWrapKey", None, Err(e)),
        Ok(r) => r,
    };
    let op = (|| {
        let alg = algorithm(&r.alg)?;
        let value = Dek::new(value(&r.value)?);
        Ok(EkmWrap { key, alg, value })
    })();
    decoded("EkmWrapKey", r.request_context.as_ref(), op)
}

/// Decodes an unwrapkey body for `key`.
pub fn decode_unwrap(bytes: &[u8], key: EkmKey) -> Decoded<EkmUnwrap> {
    let r = match body::<KeyOperationRequest>(bytes) {
        Err(e) => return decoded("EkmUnwrapKey", None, Err(e)),
        Ok(r) => r,
    };
    let op = (|| {
        let alg = algorithm(&r.alg)?;
        let value = value(&r.value)?;
        Ok(EkmUnwrap { key, alg, value })
    })();
    decoded("EkmUnwrapKey", r.request_context.as_ref(), op)
}

/// The proxy info response.
pub fn encode_info(i: EkmProxyInfo) -> ProxyInfo {
    ProxyInfo {
        api_version: API_VERSION,
        proxy_vendor: "keybroker",
        proxy_name: format!("keybroker {}", env!("CARGO_PKG_VERSION")),
        ekm_vendor: i.ekm_vendor,
        ekm_product: i.ekm_product,
    }
}

/// The key metadata response.
pub fn encode_metadata(m: EkmKeyMetadata) -> KeyMetadata {
    let (n, e) = match m.rsa {
        Some((n, e)) => (Some(encode_b64url(&n)), Some(encode_b64url(&e))),
        None => (None, None),
    };
    KeyMetadata {
        key_type: m.key_type,
        key_size: m.key_size,
        key_ops: ["wrapKey", "unwrapKey"],
        n,
        e,
    }
}

/// The wrapkey response.
pub fn encode_wrap(wrapped: Vec<u8>) -> WrapResult {
    WrapResult {
        value: encode_b64url(&wrapped),
    }
}

/// The unwrapkey response.
pub fn encode_unwrap(dek: Dek) -> UnwrapResult {
    UnwrapResult {
        value: zeroize::Zeroizing::new(encode_b64url(dek.expose())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KeyName;

    #[test]
    fn paths_split_into_prefix_and_route() {
        assert_eq!(route("/info").expect("info"), ("", Route::Info));
        assert_eq!(
            route("/a/b-1/info").expect("info under a prefix"),
            ("/a/b-1", Route::Info)
        );
        assert_eq!(
            route("/p/aes-key-1/metadata").expect("metadata"),
            ("/p", Route::Metadata("aes-key-1".into()))
        );
        assert_eq!(
            route("/k/wrapkey").expect("wrap"),
            ("", Route::Wrap("k".into()))
        );
        assert_eq!(
            route("/x/y/k/unwrapkey").expect("unwrap"),
            ("/x/y", Route::Unwrap("k".into()))
        );
        for bad in [
            "",
            "/",
            "/k/encrypt",
            "/k.1/wrapkey",
            "/k_1/wrapkey",
            "/wrapkey",
            &format!("/{}/wrapkey", "a".repeat(65)),
        ] {
            let e = route(bad).expect_err(bad);
            assert_eq!(error_code(&e), (404, codes::PATH_NOT_FOUND), "{bad}");
        }
    }

    #[test]
    fn prefixes_follow_the_reference() {
        assert!(valid_prefix(""));
        assert!(valid_prefix("/a/B-9"));
        assert!(valid_prefix(&format!("/{}", "a".repeat(64))));
        for bad in [
            "a",
            "/",
            "/a/",
            "/a//b",
            "/a_b",
            "/a.b",
            &format!("/{}", "a".repeat(65)),
        ] {
            assert!(!valid_prefix(bad), "{bad}");
        }
    }

    #[test]
    fn the_api_version_is_required_and_must_be_the_preview() {
        assert!(check_api_version(Some("api-version=0.1-preview")).is_ok());
        assert!(check_api_version(Some("x=1&api-version=0.1-preview")).is_ok());
        for q in [None, Some(""), Some("api-version=1.0"), Some("api-version")] {
            let e = check_api_version(q).expect_err("refused");
            assert_eq!(
                error_code(&e),
                (400, codes::UNSUPPORTED_API_VERSION),
                "{q:?}"
            );
        }
    }

    #[test]
    fn bodies_decode_as_the_reference_writes_them() {
        // The reference's wrapkey example, verbatim.
        let body = br#"{
            "request_context": {
                "request_id": "6476b291-7c15-4d0b-aef9-03688390cb8e",
                "correlation_id": "aa9a3cb4-82b4-11f0-afc6-5ffd3bdade85",
                "pool_name": "mhsm-pool-name"
            },
            "alg": "A256KWP",
            "value": "MTIzNDU2NzgxMjM0NTY3ODEyMzQ1Njc4MTIzNDU2Nzg"
        }"#;
        let key = EkmKey {
            tenant: "t".into(),
            id: "aes-key-1".into(),
        };
        let d = decode_wrap(body, key.clone());
        let op = d.op.expect("decoded");
        assert_eq!(op.alg, EkmAlgorithm::A256Kwp);
        assert_eq!(op.value.expose(), b"12345678123456781234567812345678");
        assert_eq!(
            d.request_id.as_deref(),
            Some("6476b291-7c15-4d0b-aef9-03688390cb8e")
        );
        assert_eq!(
            d.context.correlation_id,
            "aa9a3cb4-82b4-11f0-afc6-5ffd3bdade85"
        );
        let up = d.context.upstream.expect("upstream");
        assert_eq!(up.principal.as_deref(), Some("mhsm-pool-name"));
        assert_eq!(up.operation.as_deref(), Some("EkmWrapKey"));

        // Errors: each with its code.
        for (b, code) in [
            (
                &br#"{"alg":"A256KWP","value":"AAAA"}"#[..],
                codes::INVALID_REQUEST,
            ),
            (
                br#"{"request_context":{},"alg":"RS256","value":"AAAA"}"#,
                codes::UNSUPPORTED_ALGORITHM,
            ),
            (
                br#"{"request_context":{},"alg":"A256KWP","value":"!!"}"#,
                codes::INVALID_REQUEST,
            ),
            (
                br#"{"request_context":{},"value":"AAAA"}"#,
                codes::INVALID_REQUEST,
            ),
            (b"not json", codes::INVALID_REQUEST),
        ] {
            let e = decode_unwrap(b, key.clone()).op.err().expect("refused");
            assert_eq!(error_code(&e).1, code, "{}", String::from_utf8_lossy(b));
        }
    }

    #[test]
    fn broker_errors_map_to_the_reference_statuses() {
        use crate::error::{Exhausted, Unavailable};
        let k = KeyName::new("t", "k").expect("name");
        for (e, want) in [
            (BrokerError::Unauthentic, (400, codes::INVALID_CIPHERTEXT)),
            (Denied::NoIdentity.into(), (401, codes::UNAUTHORIZED)),
            (Denied::HyokDisconnected.into(), (403, codes::DISCONNECTED)),
            (
                Refused::Disabled(k.clone()).into(),
                (403, codes::KEY_DISABLED),
            ),
            (
                Refused::Quarantined(k.clone()).into(),
                (403, codes::OPERATION_NOT_ALLOWED),
            ),
            (
                Denied::NoRole("ekm:x".into()).into(),
                (403, codes::ACCESS_DENIED),
            ),
            (
                Refused::Expired {
                    key: k.clone(),
                    expires_ms: 1,
                }
                .into(),
                (403, codes::KEY_EXPIRED),
            ),
            (
                Refused::VersionExpired { key: k, version: 1 }.into(),
                (403, codes::KEY_EXPIRED),
            ),
            (
                NotFound::Key("t/k".into()).into(),
                (404, codes::KEY_NOT_FOUND),
            ),
            (Exhausted::Hsm.into(), (429, codes::TOO_MANY_REQUESTS)),
            (Deadline::Passed.into(), (503, codes::SERVICE_UNAVAILABLE)),
            (Unavailable::Hsm.into(), (503, codes::SERVICE_UNAVAILABLE)),
            (BrokerError::internal("x"), (500, codes::INTERNAL)),
        ] {
            assert_eq!(error_code(&e), want, "{e}");
        }
        // An internal error's detail stays in the log.
        let (_, body) = error_response(&BrokerError::internal("secret detail"));
        assert!(!body.message.contains("secret detail"), "{}", body.message);
    }

    #[test]
    fn responses_are_base64url_without_padding() {
        let w = serde_json::to_string(&encode_wrap(vec![0xfb, 0xff])).expect("json");
        assert_eq!(w, r#"{"value":"-_8"}"#);
        let m = encode_metadata(EkmKeyMetadata {
            key_type: "RSA",
            key_size: 2048,
            rsa: Some((vec![0xc0, 0x01], vec![1, 0, 1])),
        });
        let j = serde_json::to_value(&m).expect("json");
        assert_eq!(j["e"], "AQAB");
        assert_eq!(j["key_ops"], serde_json::json!(["wrapKey", "unwrapKey"]));
        let m = encode_metadata(EkmKeyMetadata {
            key_type: "oct",
            key_size: 256,
            rsa: None,
        });
        let j = serde_json::to_value(&m).expect("json");
        assert_eq!(
            j,
            serde_json::json!({"key_type":"oct","key_size":256,"key_ops":["wrapKey","unwrapKey"]})
        );
    }
}
