//! A layer around a gRPC server's router that audits the requests tonic refuses before any
//! handler — and so before the pipeline — runs: a body that does not decode, a message larger
//! than the limit, an unknown method. Each gets one audit record (op: the method, caller: the
//! connection's identity, outcome: the status, message: why) before its reply; if that record
//! cannot be written, the reply is UNAVAILABLE instead. Every reply of the pipeline carries an
//! `x-request-id`; a failed reply without one never reached it.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::transport::server::UdsConnectInfo;
use tower::{Layer, Service};

use super::REQUEST_ID_HEADER;
use crate::{
    audit::{AuditLog, Record, code_name},
    tls::ConnInfo,
};

/// Audits what tonic refuses (see the module docs).
#[derive(Clone)]
pub struct AuditRejections {
    audit: AuditLog,
    /// How an op is named from a method path (`/pkg.Service/Method`).
    op_of: Arc<dyn Fn(&str) -> String + Send + Sync>,
}

impl AuditRejections {
    /// For `keybroker.v1`: the method's name (`WrapKey`), `Hyok` prefixed to the switch's.
    pub fn keybroker(audit: AuditLog) -> Self {
        Self::new(audit, |path| {
            let (service, method) = split(path);
            match service {
                "keybroker.v1.Hyok" if method == "GetState" => "HyokGetState".into(),
                "keybroker.v1.Hyok" => format!("Hyok{method}"),
                s if s.starts_with("keybroker.v1.") => method.to_string(),
                _ => path.to_string(),
            }
        })
    }

    /// For the Kubernetes KMS v2 plugin: `KmsV2` and the method.
    pub fn kms_v2(audit: AuditLog) -> Self {
        Self::new(audit, |path| format!("KmsV2{}", split(path).1))
    }

    fn new(audit: AuditLog, op_of: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        Self {
            audit,
            op_of: Arc::new(op_of),
        }
    }
}

fn split(path: &str) -> (&str, &str) {
    let p = path.trim_start_matches('/');
    p.split_once('/').unwrap_or((p, ""))
}

impl<S> Layer<S> for AuditRejections {
    type Service = Rejections<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rejections {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuditRejections`] makes.
#[derive(Clone)]
pub struct Rejections<S> {
    inner: S,
    layer: AuditRejections,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> Service<http::Request<B>> for Rejections<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let caller = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.caller.id.clone())
            .or_else(|| {
                req.extensions()
                    .get::<UdsConnectInfo>()
                    .and_then(|i| i.peer_cred)
                    .map(|c| format!("unix:uid={}", c.uid()))
            });
        // The service that was polled ready serves this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let resp = inner.call(req).await?;
            // Health checks and reflection answer for themselves; the pipeline's replies carry
            // a request id.
            if path.starts_with("/grpc.") || resp.headers().contains_key(REQUEST_ID_HEADER) {
                return Ok(resp);
            }
            let Some(status) = tonic::Status::from_header_map(resp.headers()) else {
                return Ok(resp);
            };
            if status.code() == tonic::Code::Ok {
                return Ok(resp);
            }
            let op = (layer.op_of)(&path);
            let mut rec = Record::request(&op, caller.as_deref().unwrap_or("unknown"));
            rec.outcome = Some(code_name(status.code()));
            rec.message = Some(format!("refused before decoding: {}", status.message()));
            if let Err(e) = layer.audit.append(rec).await {
                tracing::error!(error = %e, op, "audit record of a refused request not written");
                let status = tonic::Status::unavailable(
                    "the audit trail cannot be written; the request was refused",
                );
                return Ok(status.into_http());
            }
            tracing::info!(op, code = ?status.code(), message = status.message(), "request refused before decoding");
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn method_paths_split_into_service_and_method() {
        assert_eq!(
            split("/keybroker.v1.KeyBroker/WrapKey"),
            ("keybroker.v1.KeyBroker", "WrapKey")
        );
        assert_eq!(split("/nonsense"), ("nonsense", ""));
    }
}
