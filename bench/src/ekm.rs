//! The EKM rows: Azure Managed HSM EKM proxy API wrapkey and unwrapkey (`A256KWP`) through the
//! broker's EKM door, sent as Managed HSM sends them — HTTPS (TLS 1.3) with a client
//! certificate of the configured subject CN, keep-alive HTTP/1.1 connections (`xks::Conn`), the
//! reference's bodies.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};

/// The path prefix and tenant the bench's broker serves (the EKM door has its own listener).
pub const PREFIX: &str = "/bench";
/// The subject CN of the client certificate the door accepts.
pub const CLIENT_CN: &str = "mhsm.bench.example";
/// The key the rows wrap and unwrap under (an `aes-kwp` key of the tenant).
pub const KEY: &str = "kwp";
/// Its algorithm.
const ALG: &str = "A256KWP";

/// The path of `op` (`wrapkey`, `unwrapkey`) on [`KEY`].
pub fn path(op: &str) -> Vec<u8> {
    format!("{PREFIX}/{KEY}/{op}?api-version=0.1-preview").into_bytes()
}

/// A body carrying `value` (the key to wrap, or the wrapped key).
pub fn body(value: &[u8]) -> Vec<u8> {
    serde_json::json!({
        "request_context": {
            "request_id": "bench-request",
            "correlation_id": "bench-correlation",
            "pool_name": "bench-pool",
        },
        "alg": ALG,
        "value": B64URL.encode(value),
    })
    .to_string()
    .into_bytes()
}

/// The unwrapkey body for a wrapkey's answer.
pub fn unwrap_body(wrapped: &[u8]) -> Result<Vec<u8>, String> {
    let a: serde_json::Value = serde_json::from_slice(wrapped).map_err(|e| e.to_string())?;
    let value = a["value"]
        .as_str()
        .ok_or("the wrapkey answer has no value")?;
    Ok(body(&B64URL.decode(value).map_err(|e| e.to_string())?))
}
