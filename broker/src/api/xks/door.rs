//! The XKS door: the codec of this module on its own HTTPS listener ([`crate::api::https`]).
//!
//! ```text
//! TLS 1.2/1.3 (+ optional mTLS: client CA and subject CN, checked in the handshake)
//!   → POST? (else 405) → path → prefix (else 404 InvalidUriPathException)
//!   → body (at most MAX_BODY_BYTES, else 501 UnsupportedOperationException)
//!   → SigV4 against the prefix's credentials (else 401 AuthenticationFailedException)
//!   → body decoded → Pipeline::execute (roles, HYOK switch, deadline, audit, metrics)
//!   → reply encoded (the spec's errorName and HTTP status)
//! ```
//!
//! Every request that reaches the router leaves exactly one audit record: the refusals before
//! a signature verified go through the pipeline too, with no caller (recorded as
//! `unauthenticated`, with why). `GET /healthz` is the load balancer's check (the spec asks for
//! one): 200 while the HSM answers, 503 otherwise, unauthenticated and not audited, like gRPC
//! health.
//!
//! Credentials and TLS files are re-read on SIGHUP, and credential directories also whenever
//! they change (checked every second): SigV4 rotation and certificate renewal need no restart.
//! A file that does not load leaves what is in force unchanged (and says so in the log).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
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

use super::{
    Decoded, Route,
    config::{XksConfig, XksMtls, XksPrefix},
    error_response, names,
    sigv4::{self, Credentials},
};
use crate::{
    api::{
        Pipeline,
        https::{self, BodyError, HttpsSettings, Replies},
        ops::Operation,
        pipeline::{Endpoint, Incoming, ReasonCode},
    },
    error::{BrokerError, Denied, Invalid, NotFound, SignatureFailure},
    identity::{Caller, IdentityKind},
    model::KeyName,
};

/// The service name of XKS requests in metrics and logs.
pub const SERVICE: &str = "aws.kms.xks.v1";
/// The largest request body read: room for the largest plaintext keybroker encrypts (64 KiB,
/// Base64) with 8 KiB of AAD and ARNs of the spec's 2,048 characters.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// The request id header every reply carries.
const REQUEST_ID_HEADER: &str = "x-request-id";

/// One URI prefix, ready to serve.
struct Prefix {
    path: String,
    tenant: String,
    identity: String,
    justification: Option<crate::policy::Reason>,
    credentials: Arc<Credentials>,
}

/// The TLS files of the door.
#[derive(Clone, Debug)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    mtls: Option<(PathBuf, Vec<String>)>,
}

/// The XKS door (cheap to clone: one shared state).
#[derive(Clone)]
pub struct XksDoor {
    inner: Arc<Inner>,
}

struct Inner {
    pipeline: Pipeline,
    prefixes: Vec<Prefix>,
    max_skew: Duration,
    fleet_size: u32,
    probe_timeout: Duration,
    files: TlsFiles,
    tls: RwLock<Arc<ServerConfig>>,
}

/// What [`check`] found: the prefixes' URI paths and how many credentials each has.
#[derive(Debug)]
pub struct Checked {
    /// `(XksProxyUriPath, access key ids)` per prefix.
    pub prefixes: Vec<(String, Vec<String>)>,
    /// Whether client certificates are required.
    pub mtls: bool,
}

fn tls_files(cfg: &XksConfig, resolve: &dyn Fn(&Path) -> PathBuf) -> TlsFiles {
    TlsFiles {
        cert: resolve(&cfg.cert),
        key: resolve(&cfg.key),
        mtls: cfg.mtls.as_ref().map(
            |XksMtls {
                 client_ca,
                 client_cn,
             }| { (resolve(client_ca), client_cn.clone()) },
        ),
    }
}

fn load_prefixes(
    cfg: &XksConfig,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Vec<Prefix>, String> {
    cfg.prefix
        .iter()
        .map(|p: &XksPrefix| {
            let dir = p.credentials_dir.as_deref().map(resolve);
            let credentials =
                Credentials::load(&p.uri_path(), dir.as_deref(), p.credentials_env.as_deref())
                    .map_err(|e| format!("xks.prefix {:?}: {e}", p.path))?;
            Ok(Prefix {
                path: p.path.clone(),
                tenant: p.tenant.clone(),
                identity: p.identity(),
                justification: p.justification,
                credentials: Arc::new(credentials),
            })
        })
        .collect()
}

/// Loads everything `[xks]` names (TLS files, every prefix's credentials) without serving:
/// `keybroker check-config`.
pub fn check(cfg: &XksConfig, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<Checked, String> {
    cfg.validate()?;
    server_config(&tls_files(cfg, resolve))?;
    let prefixes = load_prefixes(cfg, resolve)?
        .iter()
        .map(|p| (sigv4::uri_path(&p.path), p.credentials.access_key_ids()))
        .collect();
    Ok(Checked {
        prefixes,
        mtls: cfg.mtls.is_some(),
    })
}

impl XksDoor {
    /// The door for `cfg` over `pipeline` (paths resolved with `resolve`). Fails when a TLS
    /// file or a prefix's credentials do not load.
    pub fn load(
        cfg: &XksConfig,
        resolve: &dyn Fn(&Path) -> PathBuf,
        pipeline: Pipeline,
        probe_timeout: Duration,
    ) -> Result<Self, String> {
        cfg.validate()?;
        let files = tls_files(cfg, resolve);
        let tls = server_config(&files)?;
        let prefixes = load_prefixes(cfg, resolve)?;
        for p in &prefixes {
            let ids = p.credentials.access_key_ids();
            if ids.len() < 2 {
                tracing::info!(uri_path = %sigv4::uri_path(&p.path), "XKS prefix has one SigV4 credential: rotation adds a second before removing it");
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                pipeline,
                prefixes,
                max_skew: Duration::from_secs(cfg.max_clock_skew_s),
                fleet_size: cfg.fleet_size,
                probe_timeout,
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

    /// The router: every path to the XKS handler, `GET /healthz` to the load balancer check.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", axum::routing::get(lb_health))
            .fallback(handle)
            .with_state(self.clone())
    }

    /// Re-reads credentials and TLS files on SIGHUP, and credential directories whenever they
    /// change (checked every second), until `stop` completes.
    pub fn watch(&self, stop: impl std::future::Future<Output = ()> + Send + 'static) {
        let me = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = signal(SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tokio::pin!(stop);
            loop {
                let force = tokio::select! {
                    () = &mut stop => return,
                    _ = tick.tick() => false,
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                let m = me.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || m.reload(force)).await {
                    tracing::error!(error = %e, "XKS reload task failed");
                }
            }
        });
    }

    /// One reload pass: every prefix's credentials (all of them when `force`, else those whose
    /// directory changed), and on `force` the TLS files.
    fn reload(&self, force: bool) {
        for p in &self.inner.prefixes {
            let uri_path = sigv4::uri_path(&p.path);
            let r = if force {
                p.credentials.reload().map(|_| true)
            } else {
                p.credentials.reload_if_changed()
            };
            match r {
                Ok(true) => {
                    tracing::info!(%uri_path, access_key_ids = ?p.credentials.access_key_ids(),
                    "XKS SigV4 credentials reloaded")
                }
                Ok(false) => {}
                Err(e) => tracing::error!(%uri_path, error = %e,
                    "XKS SigV4 credentials not reloaded; the previous ones stay in force"),
            }
        }
        if force {
            match server_config(&self.inner.files) {
                Ok(c) => {
                    *self.inner.tls.write().unwrap_or_else(|p| p.into_inner()) = c;
                    tracing::info!("XKS TLS configuration reloaded");
                }
                Err(e) => tracing::error!(error = %e,
                    "new XKS TLS files rejected; the previous TLS configuration stays in force"),
            }
        }
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

    /// Refuses a request no identity was verified for: audited by the pipeline (caller
    /// `unauthenticated`), answered with the spec's error.
    async fn refuse(&self, op: &'static str, key: Option<KeyName>, e: BrokerError) -> Response {
        let mut incoming = Incoming::new(endpoint(op), None);
        incoming.key = key;
        let reply = self
            .inner
            .pipeline
            .execute::<crate::api::ops::xks::XksHealth>(incoming, Err(e))
            .await;
        match reply.result {
            Ok(_) => error_reply(&Denied::NoIdentity.into(), &reply.request_id),
            Err(e) => error_reply(&e, &reply.request_id),
        }
    }

    /// Runs one verified request through the pipeline and encodes its reply.
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
                kind: IdentityKind::SigV4,
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
            Ok((_, r)) => op_name(r),
            Err(_) => "XksRequest",
        };
        if req.method() != Method::POST {
            // The spec: any other method at an XKS URI is 405 Method Not Allowed.
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
                "no XKS URI path {}{}",
                super::printable(prefix_path, 128),
                super::API_PATH
            ));
            return self.refuse(op, None, e.into()).await;
        };
        let key_id = match &route {
            Route::Metadata(id) | Route::Encrypt(id) | Route::Decrypt(id) => Some(id.clone()),
            Route::Health => None,
        };
        let key = key_id
            .as_deref()
            .and_then(|id| KeyName::new(&prefix.tenant, id).ok());
        let (parts, body) = match https::read_body(req, MAX_BODY_BYTES).await {
            Ok(b) => b,
            Err(BodyError::TooLarge(n)) => {
                return self
                    .refuse(op, key, Invalid::PayloadTooLarge(n + 1).into())
                    .await;
            }
            Err(BodyError::Read(why)) => {
                return self.refuse(op, key, Invalid::Body(why).into()).await;
            }
        };
        // Authentication: the signature over the request as received, with the secret of the
        // access key it names among this prefix's credentials.
        if let Err(f) = sigv4::verify(
            &parts,
            &body,
            &prefix.credentials,
            SystemTime::now(),
            self.inner.max_skew,
        ) {
            // What the client wrote (an access key id, a scope, a header list) is bounded
            // before it reaches the audit trail and the log.
            let f = match f {
                SignatureFailure::UnknownAccessKey(id) => {
                    SignatureFailure::UnknownAccessKey(super::printable(&id, 32))
                }
                SignatureFailure::Scope(s) => SignatureFailure::Scope(super::printable(&s, 128)),
                SignatureFailure::SignedHeaders(s) => {
                    SignatureFailure::SignedHeaders(super::printable(&s, 256))
                }
                other => other,
            };
            return self.refuse(op, key, Denied::Signature(f).into()).await;
        }
        let xkey = |id: String| crate::api::ops::xks::XksKey {
            tenant: prefix.tenant.clone(),
            id,
        };
        match route {
            Route::Metadata(id) => {
                let d = super::decode_metadata(&body, xkey(id));
                self.run(op, prefix, key, d, super::encode_metadata).await
            }
            Route::Encrypt(id) => {
                let d = super::decode_encrypt(&body, xkey(id));
                self.run(op, prefix, key, d, super::encode_encrypt).await
            }
            Route::Decrypt(id) => {
                let d = super::decode_decrypt(&body, xkey(id));
                self.run(op, prefix, key, d, super::encode_decrypt).await
            }
            Route::Health => {
                let d = super::decode_health(&body, self.inner.fleet_size);
                self.run(op, prefix, None, d, super::encode_health).await
            }
        }
    }
}

async fn handle(State(door): State<XksDoor>, req: Request) -> Response {
    door.handle(req).await
}

/// `GET /healthz`: 200 while the HSM answers and the audit trail takes records, 503 otherwise
/// (for load balancers).
async fn lb_health(State(door): State<XksDoor>) -> Response {
    let (up, _) = door
        .inner
        .pipeline
        .health(endpoint("Healthz"), None, door.inner.probe_timeout)
        .await;
    match up {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not serving: the HSM does not answer or the audit trail takes no records\n",
        )
            .into_response(),
    }
}

fn op_name(r: &Route) -> &'static str {
    match r {
        Route::Metadata(_) => "XksMetadata",
        Route::Encrypt(_) => "XksEncrypt",
        Route::Decrypt(_) => "XksDecrypt",
        Route::Health => "XksHealth",
    }
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
            tracing::error!(error = %e, "XKS reply not encoded");
            let b = br#"{"errorName":"InternalException","errorMessage":"internal error"}"#;
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

/// The listener's backstop timeout: the spec's DependencyTimeoutException.
fn timed_out() -> Response {
    let body = super::ErrorBody {
        error_name: names::DEPENDENCY_TIMEOUT,
        error_message: "the request took too long".into(),
    };
    json(StatusCode::SERVICE_UNAVAILABLE, &body, "")
}

/// The door's TLS configuration: TLS 1.3 and 1.2 (the spec's minimum; rustls offers only
/// AEAD suites with forward secrecy, among them the four the spec lists), HTTP/1.1, and with
/// `[xks.mtls]` a client certificate chained to the configured CA and bearing one of the
/// configured subject CNs — anything else fails the handshake, as the spec requires.
fn server_config(f: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&f.cert)
        .map_err(|e| format!("xks.cert {}: {e}", f.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("xks.cert {}: {e}", f.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "xks.cert {} holds no certificate",
            f.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&f.key)
        .map_err(|e| format!("xks.key {}: {e}", f.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("XKS TLS: {e}"))?;
    let builder = match &f.mtls {
        None => builder.with_no_client_auth(),
        Some((ca, cns)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("xks.mtls.client_ca {}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("xks.mtls.client_ca {}: {e}", ca.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("xks.mtls.client_ca {}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "xks.mtls.client_ca {} holds no CA certificate",
                    ca.display()
                ));
            }
            let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("XKS client certificate verifier: {e}"))?;
            builder.with_client_cert_verifier(Arc::new(crate::api::https::CnVerifier {
                door: "XKS",
                inner,
                cns: cns.clone(),
            }))
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("xks.cert and xks.key: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_configuration_speaks_http11_and_refuses_a_ca_file_without_a_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = hsm_fixtures::pki::Ca::new(dir.path(), "ca", "xks test CA").expect("ca");
        let server = ca.issue_localhost_server("server").expect("server");
        let mut files = TlsFiles {
            cert: server.cert_path.clone(),
            key: server.key_path.clone(),
            mtls: None,
        };
        let cfg = server_config(&files).expect("config");
        assert_eq!(cfg.alpn_protocols, [b"http/1.1".to_vec()]);
        files.mtls = Some((
            ca.cert_path.clone(),
            vec!["cks.kms.eu-west-1.amazonaws.com".into()],
        ));
        assert!(server_config(&files).is_ok());
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        files.mtls = Some((empty, vec!["x".into()]));
        let e = server_config(&files).expect_err("no CA");
        assert!(e.contains("holds no CA certificate"), "{e}");
        files.mtls = None;
        files.key = dir.path().join("missing.key");
        let e = server_config(&files).expect_err("no key");
        assert!(e.contains("xks.key"), "{e}");
    }
}
