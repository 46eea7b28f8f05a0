//! A layer around a gRPC server's router: the edge of every request, before any handler — and
//! so before the pipeline — runs.
//!
//! * **The whole request is timed from its headers.** A stream that sends its headers and
//!   never completes its body (a header-only stream) never reaches a handler, so the
//!   pipeline's deadline never starts: here it gets DEADLINE_EXCEEDED at the caller's
//!   `grpc-timeout` or `[server] request_timeout_ms`, whichever is sooner, counted from the
//!   headers, and the stream is closed. Once a handler takes the request ([`Arrival::take`]) the
//!   pipeline owns the deadline (from the same instant) and audits the outcome.
//! * **`grpc-timeout` is checked**: a value that is not 1–8 digits and a unit (`H M S m u n`)
//!   is refused with INVALID_ARGUMENT rather than silently ignored.
//! * **Status codes are deliberate** (the table is in docs/src/api.md): tonic answers INTERNAL
//!   for gRPC framing errors (a length prefix larger than the body, the compressed flag without
//!   `grpc-encoding`), which the API reserves for bugs — they become INVALID_ARGUMENT; and
//!   OUT_OF_RANGE for a message over the size limit — also INVALID_ARGUMENT ("bad sizes"),
//!   with tonic's message naming the sizes.
//! * **Every refusal is audited**: a body that does not decode, a message larger than the
//!   limit, an unknown method, a deadline passed before the body was complete. Each gets one
//!   audit record (op: the method, caller: the connection's identity, outcome: the status,
//!   message: why) before its reply; if that record cannot be written, the reply is UNAVAILABLE
//!   instead. Every reply of the pipeline carries an `x-request-id`; a failed reply without one
//!   never reached it.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tonic::transport::server::UdsConnectInfo;
use tower::{Layer, Service};

use super::{REQUEST_ID_HEADER, parse_grpc_timeout};
use crate::{
    audit::{AuditLog, Record, code_name},
    tls::ConnInfo,
};

/// When a request's headers arrived, and whether a handler has taken it (a request
/// extension set by [`AuditRejections`]).
#[derive(Clone, Debug)]
pub struct Arrival {
    at: Instant,
    taken: Arc<AtomicBool>,
}

impl Arrival {
    /// Marks the request as taken by a handler (from now on the pipeline owns its deadline)
    /// and returns when its headers arrived.
    pub fn take(&self) -> Instant {
        self.taken.store(true, Ordering::SeqCst);
        self.at
    }

    fn taken(&self) -> bool {
        self.taken.load(Ordering::SeqCst)
    }
}

/// The edge of every request: deadline from the headers, `grpc-timeout` checked, status codes
/// mapped, refusals audited (see the module docs).
#[derive(Clone)]
pub struct AuditRejections {
    audit: AuditLog,
    /// How an op is named from a method path (`/pkg.Service/Method`).
    op_of: Arc<dyn Fn(&str) -> String + Send + Sync>,
    /// `[server] request_timeout_ms`: no request lives longer, counted from its headers.
    request_timeout: Option<Duration>,
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
            request_timeout: None,
        }
    }

    /// Times every request from its headers: at most `timeout` (or the caller's shorter
    /// `grpc-timeout`) until a handler takes it.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }
}

/// The status a refusal before any handler gets: tonic's INTERNAL for framing errors and
/// OUT_OF_RANGE for an oversized message become INVALID_ARGUMENT (see the module docs);
/// `None` keeps tonic's.
fn mapped(status: &tonic::Status) -> Option<tonic::Status> {
    match status.code() {
        tonic::Code::Internal => Some(tonic::Status::invalid_argument(format!(
            "malformed gRPC request framing: {}",
            status.message()
        ))),
        tonic::Code::OutOfRange => Some(tonic::Status::invalid_argument(status.message())),
        _ => None,
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

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let arrival = Arrival {
            at: Instant::now(),
            taken: Arc::default(),
        };
        // A grpc-timeout that does not parse is refused, not ignored.
        let caller_timeout = match req.headers().get("grpc-timeout") {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .ok()
                .and_then(parse_grpc_timeout)
                .map(Some)
                .ok_or_else(|| {
                    tonic::Status::invalid_argument(
                        "invalid grpc-timeout header: want 1 to 8 digits and a unit (H, M, S, m, u or n)",
                    )
                }),
        };
        req.extensions_mut().insert(arrival.clone());
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
            let limit = match (caller_timeout, layer.request_timeout) {
                (Err(status), _) => Err(status),
                (Ok(Some(c)), Some(r)) => Ok(Some(c.min(r))),
                (Ok(c), r) => Ok(c.or(r)),
            };
            let resp = match limit {
                Err(status) => status.into_http(),
                Ok(None) => inner.call(req).await?,
                Ok(Some(limit)) => {
                    let call = inner.call(req);
                    tokio::pin!(call);
                    match tokio::time::timeout_at((arrival.at + limit).into(), &mut call).await {
                        Ok(r) => r?,
                        // A handler has it: the pipeline answers (and audits) at the deadline.
                        Err(_) if arrival.taken() => call.await?,
                        // Headers, but no complete body by the deadline: the stream is closed
                        // with the answer (the request body is dropped unread).
                        Err(_) => tonic::Status::deadline_exceeded(
                            "the request's deadline passed before its message was complete \
                             (timed from its headers)",
                        )
                        .into_http(),
                    }
                }
            };
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
            let (status, resp) = match mapped(&status) {
                Some(m) => {
                    let r = m.clone().into_http();
                    (m, r)
                }
                None => (status, resp),
            };
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
