//! The gRPC front door (`keybroker.v1`): a codec over the pipeline. Each RPC reads what the
//! pipeline needs from the request (caller from the TLS connection, `grpc-timeout`,
//! `x-request-id`, the body's `RequestContext`), decodes the body into one operation, and
//! encodes the pipeline's reply — nothing else. Errors become `tonic::Status` in one place
//! (`error`).
//!
//! * `data` — `KeyBroker` (wrap, unwrap, generate, rewrap, public keys; single and batch);
//! * `manage` — `KeyManagement` (the key lifecycle);
//! * `audit` — `Audit` (`QueryAudit`);
//! * `hyok` — `Hyok` (the kill switch);
//! * `convert` — protobuf ↔ domain types.

mod audit;
mod convert;
mod data;
mod hyok;
mod manage;
mod rejections;

use std::time::Duration;

use keybroker_proto::v1 as pb;
use tonic::{Request, Response, Status, metadata::MetadataValue};

pub use self::rejections::{Arrival, AuditRejections};
use super::{
    ops::Operation,
    pipeline::{Context, Endpoint, Incoming, Pipeline, ReasonCode},
};
use crate::{error::BrokerError, policy::Reason, tls::ConnInfo};

/// The data-plane service's full name.
pub const KEY_BROKER: &str = "keybroker.v1.KeyBroker";
/// The control-plane service's full name.
pub const KEY_MANAGEMENT: &str = "keybroker.v1.KeyManagement";
/// The audit service's full name.
pub const AUDIT: &str = "keybroker.v1.Audit";
/// The HYOK switch service's full name.
pub const HYOK: &str = "keybroker.v1.Hyok";
/// The metadata header carrying the request id (in both directions).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// An RPC whose audit name is its method's.
const fn rpc(service: &'static str, method: &'static str) -> Endpoint {
    Endpoint {
        service,
        method,
        op: method,
    }
}

/// Every `keybroker.v1` service, as one codec over the pipeline.
#[derive(Clone)]
pub struct GrpcApi {
    pipeline: Pipeline,
}

/// Parses a `grpc-timeout` header value (gRPC over HTTP/2: at most 8 digits and a unit).
pub(crate) fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The request context of a `keybroker.v1` request.
fn context(c: Option<pb::RequestContext>) -> Option<Context> {
    let c = c?;
    let (reason, detail) = match c.justification {
        None => (ReasonCode::None, String::new()),
        Some(j) => (
            match j.reason {
                0 => ReasonCode::None,
                v => Reason::from_proto(v).map_or(ReasonCode::Unknown(v), ReasonCode::Known),
            },
            j.detail,
        ),
    };
    Some(Context {
        request_id: c.request_id,
        correlation_id: c.correlation_id,
        reason,
        detail,
        upstream: None,
    })
}

impl GrpcApi {
    /// The services over `pipeline`.
    pub fn new(pipeline: Pipeline) -> Self {
        Self { pipeline }
    }

    /// Serves one RPC: `decode` turns the body into the operation (and its request context),
    /// the pipeline runs it, `encode` turns its output into the reply.
    async fn serve<Req, O, Resp>(
        &self,
        endpoint: Endpoint,
        req: Request<Req>,
        decode: impl FnOnce(Req) -> (Option<pb::RequestContext>, Result<O, BrokerError>),
        encode: impl FnOnce(O::Output) -> Resp,
    ) -> Result<Response<Resp>, Status>
    where
        O: Operation,
    {
        let meta = req.metadata();
        let received = req.extensions().get::<Arrival>().map(Arrival::take);
        let conn = req.extensions().get::<ConnInfo>();
        let mut incoming = Incoming::new(endpoint, conn.map(|c| c.caller.clone()));
        incoming.received = received;
        // The certificate is checked again on every request (expiry, revocation, a reload).
        if let Some(Err(why)) = conn.map(ConnInfo::check) {
            incoming.refused = Some(crate::error::Denied::Credential(why).into());
        }
        incoming.request_id = meta
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        incoming.timeout = meta
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let (ctx, op) = decode(req.into_inner());
        incoming.context = context(ctx);
        let reply = self.pipeline.execute(incoming, op).await;
        let rid = MetadataValue::try_from(reply.request_id.as_str()).ok();
        match reply.result {
            Ok(out) => {
                let mut resp = Response::new(encode(out));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_headers_parse_by_unit_and_bad_ones_are_ignored() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("1n"), Some(Duration::from_nanos(1)));
        for bad in ["", "m", "10", "10x", "-1S", "123456789S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_unknown_justification_reason_is_kept_for_the_pipeline_to_refuse() {
        let c = context(Some(pb::RequestContext {
            justification: Some(pb::AccessJustification {
                reason: 999,
                detail: "x".into(),
            }),
            ..Default::default()
        }))
        .expect("context");
        assert_eq!(c.reason, ReasonCode::Unknown(999));
    }
}
