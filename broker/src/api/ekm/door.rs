//! The EKM door: the codec of this module on its own HTTPS listener ([`crate::api::https`]).
//!
//! ```text
//! TLS 1.3 only + mTLS required: client CA and subject CN, checked in the handshake
//!   → POST? (else 405) → path → prefix (else 404 PathNotFound)
//!   → api-version=0.1-preview (else 400 UnsupportedApiVersion)
//!   → body (at most MAX_BODY_BYTES, else 400 InvalidRequest)
//!   → body decoded → Pipeline::execute (roles, HYOK switch, deadline, audit, metrics)
//!   → reply encoded (the reference's status and {code, message})
//! ```
//!
//! The caller is the path prefix's configured identity (kind [`IdentityKind::Ekm`]): the
//! handshake already proved the client holds a certificate of the configured CA with one of
//! the configured subject CNs, and the prefix says for which tenant it calls. Every request
//! that reaches the router leaves exactly one audit record: refusals before a prefix is known
//! go through the pipeline too, with no caller (recorded as `unauthenticated`, with why).
//!
//! The TLS files are re-read on SIGHUP (certificate renewal needs no restart); files that do
//! not load leave what is in force unchanged (and say so in the log).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::Serialize;
use tokio::net::TcpListener;

use super::{Decoded, Route, codes, config::EkmConfig, error_response};
use crate::{
    api::{
        Pipeline,
        https::{self, BodyError, HttpsSettings, Replies},
        ops::{Operation, ekm::EkmKey},
        pipeline::{Endpoint, Incoming, ReasonCode},
    },
    error::{BrokerError, Denied, Invalid, NotFound},
    identity::{Caller, IdentityKind},
    model::KeyName,
};

/// The service name of EKM requests in metrics and logs.
pub const SERVICE: &str = "azure.mhsm.ekm.v0";
/// The largest request body read: a wrapped RSA-4096 block in base64url and a request
/// context are well under 2 KiB.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// The request id header every reply carries.
const REQUEST_ID_HEADER: &str = "x-request-id";

/// One path prefix, ready to serve.
struct Prefix {
    path: String,
    tenant: String,
    identity: String,
    justification: Option<crate::policy::Reason>,
}

/// The TLS files of the door.
#[derive(Clone, Debug)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    client_cn: Vec<String>,
}

/// The EKM door (cheap to clone: one shared state).
#[derive(Clone)]
pub struct EkmDoor {
    inner: Arc<Inner>,
}

struct Inner {
    pipeline: Pipeline,
    prefixes: Vec<Prefix>,
    files: TlsFiles,
    tls: RwLock<Arc<ServerConfig>>,
}

fn tls_files(cfg: &EkmConfig, resolve: &dyn Fn(&Path) -> PathBuf) -> TlsFiles {
    TlsFiles {
        cert: resolve(&cfg.cert),
        key: resolve(&cfg.key),
        client_ca: resolve(&cfg.client_ca),
        client_cn: cfg.client_cn.clone(),
    }
}

/// Loads everything `[ekm]` names without serving (`keybroker check-config`): the path
/// prefixes served.
pub fn check(cfg: &EkmConfig, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<Vec<String>, String> {
    cfg.validate()?;
    server_config(&tls_files(cfg, resolve))?;
    Ok(cfg.prefix.iter().map(|p| p.path.clone()).collect())
}

impl EkmDoor {
    /// The door for `cfg` over `pipeline` (paths resolved with `resolve`). Fails when a TLS
    /// file does not load.
    pub fn load(
        cfg: &EkmConfig,
        resolve: &dyn Fn(&Path) -> PathBuf,
        pipeline: Pipeline,
    ) -> Result<Self, String> {
        cfg.validate()?;
        let files = tls_files(cfg, resolve);
        let tls = server_config(&files)?;
        let prefixes = cfg
            .prefix
            .iter()
            .map(|p| Prefix {
                path: p.path.clone(),
                tenant: p.tenant.clone(),
                identity: p.identity(),
                justification: p.justification,
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                pipeline,
                prefixes,
                files,
                tls: RwLock::new(tls),
            }),
        })
    }

    /// The TLS configuration in force (for the next connection).
    pub fn tls(&self) -> Arc<ServerConfig> {
        self.inner
            .tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The router: every path to the EKM handler.
    pub fn router(&self) -> Router {
        Router::new().fallback(handle).with_state(self.clone())
    }

    /// Re-reads the TLS files on SIGHUP until `stop` completes.
    pub fn watch(&self, stop: impl std::future::Future<Output = ()> + Send + 'static) {
        let me = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    r = hup.recv() => if r.is_none() { return },
                }
                let files = me.inner.files.clone();
                match tokio::task::spawn_blocking(move || server_config(&files)).await {
                    Ok(Ok(c)) => {
                        *me.inner.tls.write().unwrap_or_else(|p| p.into_inner()) = c;
                        tracing::info!("EKM TLS configuration reloaded");
                    }
                    Ok(Err(e)) => tracing::error!(error = %e,
                        "new EKM TLS files rejected; the previous TLS configuration stays in force"),
                    Err(e) => tracing::error!(error = %e, "EKM reload task failed"),
                }
            }
        });
    }

    /// Serves on `listener` until `shutdown` completes and the connections drain.
    pub async fn serve(
        self,
        listener: TcpListener,
        settings: HttpsSettings,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let me = self.clone();
        https::serve(
            listener,
            move || me.tls(),
            self.router(),
            settings,
            Replies { timed_out },
            shutdown,
        )
        .await;
    }

    fn prefix(&self, path: &str) -> Option<&Prefix> {
        self.inner.prefixes.iter().find(|p| p.path == path)
    }

    /// Refuses a request before it has a caller: audited by the pipeline (caller
    /// `unauthenticated`), answered with the reference's status.
    async fn refuse(&self, op: &'static str, key: Option<KeyName>, e: BrokerError) -> Response {
        let mut incoming = Incoming::new(endpoint(op), None);
        incoming.key = key;
        let reply = self
            .inner
            .pipeline
            .execute::<crate::api::ops::ekm::EkmInfo>(incoming, Err(e))
            .await;
        match reply.result {
            Ok(_) => error_reply(&Denied::NoIdentity.into(), &reply.request_id),
            Err(e) => error_reply(&e, &reply.request_id),
        }
    }

    /// Runs one request through the pipeline as the prefix's identity and encodes its reply.
    async fn run<O: Operation, R: Serialize>(
        &self,
        op: &'static str,
        prefix: &Prefix,
        key: Option<KeyName>,
        d: Decoded<O>,
        encode: impl FnOnce(O::Output) -> R,
    ) -> Response {
        let mut incoming = Incoming::new(
            endpoint(op),
            Some(Caller {
                id: prefix.identity.clone(),
                kind: IdentityKind::Ekm,
            }),
        );
        incoming.request_id = d.request_id;
        let mut context = d.context;
        if let Some(r) = prefix.justification {
            context.reason = ReasonCode::Known(r);
        }
        incoming.context = Some(context);
        incoming.key = key;
        let reply = self.inner.pipeline.execute(incoming, d.op).await;
        match reply.result {
            Ok(out) => json(StatusCode::OK, &encode(out), &reply.request_id),
            Err(e) => error_reply(&e, &reply.request_id),
        }
    }

    async fn handle(&self, req: Request) -> Response {
        let path = req.uri().path().to_string();
        let routed = super::route(&path);
        let op = match &routed {
            Ok((_, r)) => r.op(),
            Err(_) => "EkmRequest",
        };
        if req.method() != Method::POST {
            let e = Invalid::Value {
                field: "HTTP method",
                expected: "POST",
            };
            let mut resp = self.refuse(op, None, e.into()).await;
            *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        let (prefix_path, route) = match routed {
            Ok(r) => r,
            Err(e) => return self.refuse(op, None, e).await,
        };
        let Some(prefix) = self.prefix(prefix_path) else {
            let e = NotFound::UriPath(format!(
                "no EKM path prefix {:?}",
                super::printable(prefix_path, 80)
            ));
            return self.refuse(op, None, e.into()).await;
        };
        let key = route
            .key()
            .and_then(|id| KeyName::new(&prefix.tenant, id).ok());
        // The version first: a client that speaks another one learns that before anything else.
        let version = super::check_api_version(req.uri().query());
        let body = match https::read_body(req, MAX_BODY_BYTES).await {
            Ok((_, b)) => Ok(b),
            Err(BodyError::TooLarge(n)) => Err(Invalid::PayloadTooLarge(n + 1).into()),
            Err(BodyError::Read(why)) => Err(Invalid::Body(why).into()),
        };
        let body = match version.and(body) {
            Ok(b) => b,
            Err(e) => {
                // Refused with the prefix's identity: the client certificate was verified.
                let d: Decoded<crate::api::ops::ekm::EkmInfo> = Decoded {
                    context: Default::default(),
                    request_id: None,
                    op: Err(e),
                };
                return self.run(op, prefix, key, d, super::encode_info).await;
            }
        };
        let ekey = |id: String| EkmKey {
            tenant: prefix.tenant.clone(),
            id,
        };
        match route {
            Route::Info => {
                let d = super::decode_info(&body);
                self.run(op, prefix, None, d, super::encode_info).await
            }
            Route::Metadata(id) => {
                let d = super::decode_metadata(&body, ekey(id));
                self.run(op, prefix, key, d, super::encode_metadata).await
            }
            Route::Wrap(id) => {
                let d = super::decode_wrap(&body, ekey(id));
                self.run(op, prefix, key, d, super::encode_wrap).await
            }
            Route::Unwrap(id) => {
                let d = super::decode_unwrap(&body, ekey(id));
                self.run(op, prefix, key, d, super::encode_unwrap).await
            }
        }
    }
}

async fn handle(State(door): State<EkmDoor>, req: Request) -> Response {
    door.handle(req).await
}

fn endpoint(op: &'static str) -> Endpoint {
    Endpoint {
        service: SERVICE,
        method: op,
        op,
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T, request_id: &str) -> Response {
    let mut resp = match serde_json::to_vec(body) {
        Ok(b) => (status, b).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "EKM reply not encoded");
            let b = br#"{"code":"InternalError","message":"internal error"}"#;
            (StatusCode::INTERNAL_SERVER_ERROR, b.to_vec()).into_response()
        }
    };
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

fn error_reply(e: &BrokerError, request_id: &str) -> Response {
    let (status, body) = error_response(e);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(status, &body, request_id)
}

/// The listener's backstop timeout.
fn timed_out() -> Response {
    let body = super::ErrorBody {
        code: codes::SERVICE_UNAVAILABLE,
        message: "the request took too long".into(),
    };
    json(StatusCode::SERVICE_UNAVAILABLE, &body, "")
}

/// The door's TLS configuration: TLS 1.3 only (the reference's two suites,
/// `TLS_AES_256_GCM_SHA384` and `TLS_AES_128_GCM_SHA256`, are among rustls's), HTTP/1.1, and
/// a client certificate chained to the configured CA and bearing one of the configured subject
/// CNs — anything else fails the handshake.
fn server_config(f: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&f.cert)
        .map_err(|e| format!("ekm.cert {}: {e}", f.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("ekm.cert {}: {e}", f.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "ekm.cert {} holds no certificate",
            f.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&f.key)
        .map_err(|e| format!("ekm.key {}: {e}", f.key.display()))?;
    let ca = &f.client_ca;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("ekm.client_ca {}: {e}", ca.display()))?
    {
        let c = c.map_err(|e| format!("ekm.client_ca {}: {e}", ca.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("ekm.client_ca {}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "ekm.client_ca {} holds no CA certificate",
            ca.display()
        ));
    }
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("EKM client certificate verifier: {e}"))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("EKM TLS: {e}"))?
        .with_client_cert_verifier(Arc::new(crate::api::https::CnVerifier {
            door: "EKM",
            inner,
            cns: f.client_cn.clone(),
        }))
        .with_single_cert(certs, key)
        .map_err(|e| format!("ekm.cert and ekm.key: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_configuration_speaks_http11_and_refuses_a_ca_file_without_a_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = hsm_fixtures::pki::Ca::new(dir.path(), "ca", "ekm test CA").expect("ca");
        let server = ca.issue_localhost_server("server").expect("server");
        let mut files = TlsFiles {
            cert: server.cert_path.clone(),
            key: server.key_path.clone(),
            client_ca: ca.cert_path.clone(),
            client_cn: vec!["mhsm.example".into()],
        };
        let cfg = server_config(&files).expect("config");
        assert_eq!(cfg.alpn_protocols, [b"http/1.1".to_vec()]);
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        files.client_ca = empty;
        let e = server_config(&files).expect_err("no CA");
        assert!(e.contains("holds no CA certificate"), "{e}");
    }
}
