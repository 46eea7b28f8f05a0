//! External keys' remote side: an HTTPS client of the Azure Managed HSM EKM proxy API
//! (`0.1-preview`, the API keybroker's own `[ekm]` door serves), one per `[[external_proxy]]`,
//! built at start-up. An external key's versions live behind such a proxy — another keybroker's
//! EKM door, or any proxy of that API — and keybroker wraps and unwraps through it
//! (`docs/src/external-keys.md`).
//!
//! * **Connections.** HTTP/1.1 over TLS 1.3 (tokio-rustls), the proxy's CA as the only root,
//!   this broker's client certificate; hyper's HTTP/1.1 client connections, kept alive and
//!   pooled per proxy (idle ones reused, at most [`MAX_IDLE`] kept).
//! * **Budget.** One call (all its attempts) gets `call_budget_ms` (default 250), and never
//!   more than the request's own deadline ([`RequestScope`]).
//! * **Retries only where safe.** An attempt may be repeated once, within the budget, when its
//!   request was never sent (the connection failed first, or a pooled connection had closed),
//!   or when the proxy answered 503. Any other answer, and any failure after the request was
//!   sent, is final: a wrap the proxy may have done is not done twice.
//! * **Errors.** 401/403 → [`Refused::ExternalRefused`] (FAILED_PRECONDITION, naming the proxy
//!   and the remote `code`: the HYOK side's kill switch, a disabled key, a call not permitted);
//!   404 → [`Refused::RemoteKeyNotFound`]; 400 on unwrap → [`BrokerError::Unauthentic`] (the
//!   error of a local envelope that does not unwrap: no oracle); 429 → RESOURCE_EXHAUSTED;
//!   timeouts, connection failures and 5xx → [`Unavailable::External`]; a TLS handshake the
//!   proxy refuses, or a proxy certificate that does not verify → [`Refused::ExternalTls`].
//!
//! Key material: a DEK is in the request body (wrap) or the answer (unwrap) base64url-encoded;
//! the buffers this module owns for them are wiped on drop (`Zeroizing`). Errors and logs never
//! hold a DEK.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, body::Bytes, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsConnector;
use tonic::Code;
use zeroize::Zeroizing;

use crate::{
    error::{BrokerError, Exhausted, Refused, Unavailable},
    hsm::RequestScope,
    model::{Algorithm, Dek, KeyType},
};

/// The API version spoken (the only one the reference defines).
pub const API_VERSION: &str = "0.1-preview";
/// The default per-call budget, ms.
pub const DEFAULT_CALL_BUDGET_MS: u64 = 250;
/// Idle connections kept per proxy.
pub const MAX_IDLE: usize = 32;
/// The largest answer read from a proxy.
const MAX_ANSWER: usize = 64 * 1024;

/// `[[external_proxy]]`: a remote EKM proxy external keys may live behind.
///
/// ```toml
/// [[external_proxy]]
/// name = "hyok"                                  # what `key create --external` names
/// url = "https://hyok.example:8444/contoso"      # https, with the proxy's path prefix
/// ca_file = "pki/hyok-ca.pem"                    # the only root the proxy's certificate may chain to
/// client_cert_file = "pki/mhsm-client.pem"       # this broker's client certificate
/// client_key_file = "pki/mhsm-client.key"
/// # server_name = "hyok.example"                 # the name to verify (default: the URL's host)
/// # call_budget_ms = 250                         # one remote call, retries included
/// # pool_name = "managed-eu1"                    # request_context.pool_name (default: the name)
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalProxyConfig {
    /// The name keys refer to.
    pub name: String,
    /// `https://host[:port][/prefix]`.
    pub url: String,
    /// The CA certificate(s) the proxy's certificate must chain to (PEM).
    pub ca_file: PathBuf,
    /// This broker's client certificate chain (PEM).
    pub client_cert_file: PathBuf,
    /// Its private key (PEM).
    pub client_key_file: PathBuf,
    /// The name the proxy's certificate is verified for (default: the URL's host).
    #[serde(default)]
    pub server_name: Option<String>,
    /// One remote call's budget, retries included, ms (default 250; the request's own deadline
    /// bounds it too).
    #[serde(default = "default_budget")]
    pub call_budget_ms: u64,
    /// `request_context.pool_name` (default: `name`).
    #[serde(default)]
    pub pool_name: Option<String>,
}

fn default_budget() -> u64 {
    DEFAULT_CALL_BUDGET_MS
}

/// The parts of a proxy URL.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    prefix: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("url {url:?}: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("url {url:?}: must be https://"));
    }
    if uri.query().is_some() {
        return Err(format!("url {url:?}: no query allowed"));
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("url {url:?}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    // The proxy's path prefix; the URI grammar already keeps it to path characters, and the
    // API's key names (`[A-Za-z0-9-]`) cannot escape it.
    let prefix = uri.path().trim_end_matches('/').to_string();
    Ok(Target {
        host,
        port: uri.port_u16().unwrap_or(443),
        prefix,
    })
}

/// Loads everything the `[[external_proxy]]` sections name without connecting
/// (`keybroker check-config`; `serve` loads them the same way): their names.
pub fn check(
    cfgs: &[ExternalProxyConfig],
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Vec<String>, String> {
    Ok(ExternalProxies::load(cfgs, resolve)?.names())
}

/// Told of every remote call (the metrics implement it), as `hsm::HsmObserver` is of HSM calls.
pub trait ExternalObserver: Send + Sync {
    /// One remote call (its retry included) to `proxy` finished with `code` after `elapsed`.
    fn external_call(&self, proxy: &str, operation: &'static str, code: Code, elapsed: Duration);
}

/// Every configured proxy, by name.
#[derive(Default)]
pub struct ExternalProxies {
    proxies: HashMap<String, Arc<Proxy>>,
}

impl ExternalProxies {
    /// Builds one client per section (TLS files read now). Fails naming the section.
    pub fn load(
        cfgs: &[ExternalProxyConfig],
        resolve: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<Self, String> {
        let mut proxies = HashMap::new();
        for c in cfgs {
            let p =
                Proxy::load(c, resolve).map_err(|e| format!("external_proxy {:?}: {e}", c.name))?;
            if proxies.insert(c.name.clone(), Arc::new(p)).is_some() {
                return Err(format!("external_proxy {:?} is configured twice", c.name));
            }
        }
        Ok(Self { proxies })
    }

    /// Sets who is told of every remote call (once, at start-up).
    pub fn set_observer(&self, observer: Arc<dyn ExternalObserver>) {
        for p in self.proxies.values() {
            let _ = p.observer.set(observer.clone());
        }
    }

    /// The proxies' names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.proxies.keys().cloned().collect();
        v.sort();
        v
    }

    /// The proxy `name` (FAILED_PRECONDITION when none is configured).
    pub fn get(&self, name: &str) -> Result<Arc<Proxy>, BrokerError> {
        self.proxies
            .get(name)
            .cloned()
            .ok_or_else(|| Refused::UnknownProxy(name.to_string()).into())
    }
}

/// One remote proxy: where, how to connect, the budget, and idle connections.
pub struct Proxy {
    name: String,
    target: Target,
    server_name: ServerName<'static>,
    authority: String,
    tls: TlsConnector,
    budget: Duration,
    pool_name: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    observer: OnceLock<Arc<dyn ExternalObserver>>,
}

/// What the remote key is, from its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteKey {
    /// The keybroker key type.
    pub key_type: KeyType,
    /// The wrapping algorithm keybroker will ask for.
    pub algorithm: Algorithm,
}

/// A remote call's outcome with the remote's request id (for the audit record).
pub struct Answered<T> {
    /// The result.
    pub value: T,
    /// The id the proxy gave the request (its `x-request-id`, else the one sent).
    pub remote_request_id: String,
}

#[derive(Serialize)]
struct RequestContext<'a> {
    request_id: &'a str,
    correlation_id: &'a str,
    pool_name: &'a str,
}

#[derive(Serialize)]
struct ContextBody<'a> {
    request_context: RequestContext<'a>,
}

#[derive(Serialize)]
struct KeyOpBody<'a> {
    request_context: RequestContext<'a>,
    alg: &'static str,
    value: &'a str,
}

#[derive(Deserialize)]
struct MetadataAnswer {
    key_type: String,
    key_size: u32,
    #[serde(default)]
    key_ops: Vec<String>,
}

/// A wrap or unwrap answer, borrowed from the (wiped on drop) answer buffer: no copy of an
/// unwrapped key's encoding is left behind.
#[derive(Deserialize)]
struct ValueAnswer<'a> {
    #[serde(borrow)]
    value: &'a str,
}

#[derive(Deserialize, Default)]
struct ErrorAnswer {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// The EKM algorithm name of a keybroker algorithm an external key can have.
pub fn ekm_alg(a: Algorithm) -> Option<&'static str> {
    match a {
        Algorithm::AesKeyWrapPad => Some("A256KWP"),
        Algorithm::RsaOaepSha256 => Some("RSA-OAEP-256"),
        Algorithm::RsaOaepSha1 => Some("RSA-OAEP"),
        _ => None,
    }
}

/// Which operation a call is (errors differ: a 400 on unwrap is a bad ciphertext).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Metadata,
    Wrap,
    Unwrap,
}

impl Op {
    fn path(self) -> &'static str {
        match self {
            Op::Metadata => "metadata",
            Op::Wrap => "wrapkey",
            Op::Unwrap => "unwrapkey",
        }
    }
}

/// Why an attempt failed, and whether repeating it is safe.
enum Failure {
    /// The request was never sent (connect failed, or the connection closed first).
    NotSent(BrokerError),
    /// Anything after the request may have been sent.
    Final(BrokerError),
}

impl Proxy {
    fn load(c: &ExternalProxyConfig, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<Self, String> {
        if c.name.is_empty() || c.name.len() > 64 || c.name.chars().any(|ch| ch.is_control()) {
            return Err("name must be 1-64 printable characters".into());
        }
        if c.call_budget_ms == 0 {
            return Err("call_budget_ms must be positive".into());
        }
        let target = parse_url(&c.url)?;
        let sni = c.server_name.clone().unwrap_or_else(|| target.host.clone());
        let server_name =
            ServerName::try_from(sni.clone()).map_err(|e| format!("server_name {sni:?}: {e}"))?;
        let ca = resolve(&c.ca_file);
        let roots = crate::tls::roots_from(&ca)?;
        let cert_path = resolve(&c.client_cert_file);
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
            .map_err(|e| format!("read client_cert_file {}: {e}", cert_path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("parse client_cert_file {}: {e}", cert_path.display()))?;
        if certs.is_empty() {
            return Err(format!("{} holds no certificate", cert_path.display()));
        }
        let key_path = resolve(&c.client_key_file);
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| format!("read client_key_file {}: {e}", key_path.display()))?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("client certificate and key: {e}"))?;
        let authority = if target.port == 443 {
            target.host.clone()
        } else if target.host.contains(':') {
            format!("[{}]:{}", target.host, target.port)
        } else {
            format!("{}:{}", target.host, target.port)
        };
        Ok(Self {
            name: c.name.clone(),
            target,
            server_name,
            authority,
            tls: TlsConnector::from(Arc::new(config)),
            budget: Duration::from_millis(c.call_budget_ms),
            pool_name: c.pool_name.clone().unwrap_or_else(|| c.name.clone()),
            idle: Mutex::new(Vec::new()),
            observer: OnceLock::new(),
        })
    }

    /// The proxy's configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The remote key's metadata, as keybroker will use it: an `oct` key of 256 bits wraps
    /// with `A256KWP`; an RSA key of 2048, 3072 or 4096 bits with `RSA-OAEP-256` (the remote
    /// does the RSA work; a proxy that only does `RSA-OAEP` refuses the first wrap). Refused
    /// unless its `key_ops` include both `wrapKey` and `unwrapKey`.
    pub async fn metadata(&self, remote_key: &str) -> Result<Answered<RemoteKey>, BrokerError> {
        let request_id = request_id();
        let body = serde_json::to_vec(&ContextBody {
            request_context: self.context(&request_id),
        })
        .map_err(|e| BrokerError::internal(format!("EKM metadata body: {e}")))?;
        let (bytes, rid) = self
            .call(Op::Metadata, remote_key, body.into(), &request_id)
            .await?;
        let m: MetadataAnswer = serde_json::from_slice(&bytes)
            .map_err(|e| self.unavailable(format!("metadata answer does not parse: {e}")))?;
        let unusable = |why: String| -> BrokerError {
            Refused::RemoteKeyUnusable {
                proxy: self.name.clone(),
                remote_key: remote_key.to_string(),
                why,
            }
            .into()
        };
        for op in ["wrapKey", "unwrapKey"] {
            if !m.key_ops.iter().any(|o| o == op) {
                return Err(unusable(format!("its key_ops do not include {op}")));
            }
        }
        let (key_type, algorithm) = match (m.key_type.as_str(), m.key_size) {
            ("oct" | "oct-HSM", 256) => (KeyType::Aes256, Algorithm::AesKeyWrapPad),
            ("RSA" | "RSA-HSM", 2048) => (KeyType::Rsa2048, Algorithm::RsaOaepSha256),
            ("RSA" | "RSA-HSM", 3072) => (KeyType::Rsa3072, Algorithm::RsaOaepSha256),
            ("RSA" | "RSA-HSM", 4096) => (KeyType::Rsa4096, Algorithm::RsaOaepSha256),
            (t, n) => {
                return Err(unusable(format!(
                    "a {t} key of {n} bits (an oct key of 256 bits or an RSA key of 2048-4096 bits is needed)"
                )));
            }
        };
        Ok(Answered {
            value: RemoteKey {
                key_type,
                algorithm,
            },
            remote_request_id: rid,
        })
    }

    /// Wraps `dek` under the remote key with `alg` (the remote's raw output).
    pub async fn wrap(
        &self,
        remote_key: &str,
        algorithm: Algorithm,
        dek: &Dek,
    ) -> Result<Answered<Vec<u8>>, BrokerError> {
        let request_id = request_id();
        let value = Zeroizing::new(URL_SAFE_NO_PAD.encode(dek.expose()));
        let body = self.key_op_body(algorithm, &value, &request_id)?;
        let (bytes, rid) = self.call(Op::Wrap, remote_key, body, &request_id).await?;
        let a: ValueAnswer = serde_json::from_slice(&bytes)
            .map_err(|e| self.unavailable(format!("wrapkey answer does not parse: {e}")))?;
        let ct = URL_SAFE_NO_PAD
            .decode(a.value.trim_end_matches('='))
            .map_err(|_| self.unavailable("wrapkey answer is not base64url".into()))?;
        Ok(Answered {
            value: ct,
            remote_request_id: rid,
        })
    }

    /// Unwraps the remote's raw output `ciphertext` under the remote key with `alg`.
    pub async fn unwrap(
        &self,
        remote_key: &str,
        algorithm: Algorithm,
        ciphertext: &[u8],
    ) -> Result<Answered<Dek>, BrokerError> {
        let request_id = request_id();
        let value = URL_SAFE_NO_PAD.encode(ciphertext);
        let body = self.key_op_body(algorithm, &value, &request_id)?;
        let (bytes, rid) = self.call(Op::Unwrap, remote_key, body, &request_id).await?;
        let a: ValueAnswer = serde_json::from_slice(&bytes)
            .map_err(|_| self.unavailable("unwrapkey answer does not parse".into()))?;
        let dek = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(a.value.trim_end_matches('='))
                .map_err(|_| self.unavailable("unwrapkey answer is not base64url".into()))?,
        );
        Ok(Answered {
            value: Dek::new(dek.to_vec()),
            remote_request_id: rid,
        })
    }

    fn context<'a>(&'a self, request_id: &'a str) -> RequestContext<'a> {
        RequestContext {
            request_id,
            correlation_id: request_id,
            pool_name: &self.pool_name,
        }
    }

    fn key_op_body(
        &self,
        algorithm: Algorithm,
        value: &str,
        request_id: &str,
    ) -> Result<Zeroizing<Vec<u8>>, BrokerError> {
        let alg = ekm_alg(algorithm).ok_or_else(|| {
            BrokerError::internal(format!("external key with algorithm {algorithm}"))
        })?;
        serde_json::to_vec(&KeyOpBody {
            request_context: self.context(request_id),
            alg,
            value,
        })
        .map(Zeroizing::new)
        .map_err(|e| BrokerError::internal(format!("EKM body: {e}")))
    }

    fn unavailable(&self, why: String) -> BrokerError {
        Unavailable::External {
            proxy: self.name.clone(),
            why,
        }
        .into()
    }

    /// One remote call within the budget (and the request's deadline): at most two attempts,
    /// the second only when the first was never sent or answered 503. Returns the answer body
    /// of a 200 and the remote request id.
    async fn call(
        &self,
        op: Op,
        remote_key: &str,
        body: Zeroizing<Vec<u8>>,
        request_id: &str,
    ) -> Result<(Zeroizing<Vec<u8>>, String), BrokerError> {
        let start = Instant::now();
        let budget_end = start + self.budget;
        let deadline = RequestScope::current_deadline().map_or(budget_end, |d| d.min(budget_end));
        let path = format!(
            "{}/{remote_key}/{}?api-version={API_VERSION}",
            self.target.prefix,
            op.path()
        );
        let attempts = async {
            let mut last = None;
            for attempt in 0..2 {
                match self.attempt(op, remote_key, &path, &body, request_id).await {
                    Ok(Ok(done)) => return Ok(done),
                    // Answered 503: nothing was done; once more.
                    Ok(Err((status, e))) if status == StatusCode::SERVICE_UNAVAILABLE => {
                        last = Some(e)
                    }
                    Ok(Err((_, e))) => return Err(e),
                    Err(Failure::NotSent(e)) => last = Some(e),
                    Err(Failure::Final(e)) => return Err(e),
                }
                if attempt == 0 {
                    tracing::debug!(proxy = %self.name, op = op.path(), "retrying an external call that was not sent or answered 503");
                }
            }
            Err(last.unwrap_or_else(|| self.unavailable("no attempt made".into())))
        };
        let result = match tokio::time::timeout_at(deadline.into(), attempts).await {
            Ok(r) => r,
            Err(_) => Err(self.unavailable(format!(
                "no answer within {} ms",
                deadline.saturating_duration_since(start).as_millis()
            ))),
        };
        if let Some(o) = self.observer.get() {
            let code = result.as_ref().map_or_else(BrokerError::code, |_| Code::Ok);
            o.external_call(&self.name, op.path(), code, start.elapsed());
        }
        result
    }

    /// One attempt: a connection (pooled or new), the request, the answer. `Ok(Err)` is an
    /// answer other than 200, with its status.
    #[allow(clippy::type_complexity)]
    async fn attempt(
        &self,
        op: Op,
        remote_key: &str,
        path: &str,
        body: &[u8],
        request_id: &str,
    ) -> Result<Result<(Zeroizing<Vec<u8>>, String), (StatusCode, BrokerError)>, Failure> {
        let mut sender = self.checkout().await.map_err(Failure::NotSent)?;
        let req = Request::post(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json");
        let req = req
            .header("x-request-id", request_id)
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| Failure::Final(BrokerError::internal(format!("EKM request: {e}"))))?;
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => {
                let not_sent = e.take_message().is_some();
                let err = e.into_error();
                let be = self.connection_error(&err);
                return Err(if not_sent {
                    Failure::NotSent(be)
                } else {
                    Failure::Final(be)
                });
            }
        };
        let status = resp.status();
        let rid = resp
            .headers()
            .get("x-request-id")
            .or_else(|| resp.headers().get("x-ms-request-id"))
            .and_then(|v| v.to_str().ok())
            .map(|s| printable(s, 128))
            .unwrap_or_else(|| request_id.to_string());
        let mut answer = Zeroizing::new(Vec::new());
        let mut body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Failure::Final(self.unavailable(format!("reading the answer: {e}")))
            })?;
            if let Ok(data) = frame.into_data() {
                answer.extend_from_slice(&data);
            }
        }
        self.checkin(sender);
        if status == StatusCode::OK {
            return Ok(Ok((answer, rid)));
        }
        Ok(Err((
            status,
            self.refusal(op, remote_key, status, &answer, &rid),
        )))
    }

    /// The error of an answer other than 200 (see the module docs).
    fn refusal(
        &self,
        op: Op,
        remote_key: &str,
        status: StatusCode,
        answer: &[u8],
        rid: &str,
    ) -> BrokerError {
        let body: ErrorAnswer = serde_json::from_slice(answer).unwrap_or_default();
        let code = printable(&body.code, 64);
        let message = printable(&body.message, 256);
        tracing::info!(proxy = %self.name, op = op.path(), status = status.as_u16(), code, remote_request_id = rid, "external proxy refused");
        match status.as_u16() {
            400 if op == Op::Unwrap => BrokerError::Unauthentic,
            404 => Refused::RemoteKeyNotFound {
                proxy: self.name.clone(),
                remote_key: remote_key.to_string(),
            }
            .into(),
            429 => Exhausted::Queue(format!("external proxy {} is at capacity", self.name)).into(),
            s if s >= 500 => self.unavailable(format!("HTTP {s} {code}")),
            s => Refused::ExternalRefused {
                proxy: self.name.clone(),
                status: s,
                code,
                message,
            }
            .into(),
        }
    }

    /// The error of a connection that failed: a TLS refusal (a certificate either side does
    /// not accept) is the configuration's problem, anything else the network's.
    fn connection_error(&self, e: &(dyn std::error::Error + 'static)) -> BrokerError {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
                err.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
            });
            if let Some(t) = tls
                && matches!(
                    t,
                    rustls::Error::AlertReceived(_)
                        | rustls::Error::InvalidCertificate(_)
                        | rustls::Error::NoCertificatesPresented
                        | rustls::Error::PeerIncompatible(_)
                )
            {
                return Refused::ExternalTls {
                    proxy: self.name.clone(),
                    why: t.to_string(),
                }
                .into();
            }
            cur = err.source();
        }
        self.unavailable(e.to_string())
    }

    /// An idle connection that is still open, or a new one.
    async fn checkout(&self) -> Result<SendRequest<Full<Bytes>>, BrokerError> {
        loop {
            let next = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match next {
                Some(s) if !s.is_closed() && s.is_ready() => return Ok(s),
                Some(_) => continue,
                None => break,
            }
        }
        let tcp = tokio::net::TcpStream::connect((self.target.host.as_str(), self.target.port))
            .await
            .map_err(|e| self.unavailable(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| self.connection_error(&e))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.connection_error(&e))?;
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(proxy = %name, error = %e, "external proxy connection closed");
            }
        });
        Ok(sender)
    }

    /// Keeps a connection for the next call (keep-alive), unless it closed or the pool is full.
    fn checkin(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }
}

/// The request id sent as `request_context.request_id` (and `x-request-id`): the broker
/// request's own, or a fresh one outside a request.
fn request_id() -> String {
    RequestScope::current_request_id().unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// What a proxy said, as an error message may quote it: no control characters, at most `max`
/// characters.
fn printable(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_with_a_valid_prefix() {
        assert_eq!(
            parse_url("https://hyok.example:8444/contoso/").expect("url"),
            Target {
                host: "hyok.example".into(),
                port: 8444,
                prefix: "/contoso".into()
            }
        );
        assert_eq!(parse_url("https://127.0.0.1").expect("url").port, 443);
        assert!(parse_url("http://hyok.example/x").is_err());
        assert!(parse_url("https://hyok.example/a?b=c").is_err());
    }
}

/// The client against a scripted TLS 1.3 server: the retry rule and the error mapping, on the
/// wire (the end-to-end suite runs it against a real keybroker EKM door).
#[cfg(test)]
mod wire_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hsm_fixtures::pki::TestPki;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// What the server does with one request.
    enum Reply {
        /// Answers this status and JSON body (and closes the connection).
        Answer(u16, &'static str),
        /// Reads the request, then closes the connection without answering.
        HangUp,
        /// Reads the request and never answers.
        Silent,
    }

    const METADATA: &str = r#"{"key_type":"oct","key_size":256,"key_ops":["wrapKey","unwrapKey"]}"#;

    /// A server answering the scripted replies, one connection each; the requests it read.
    async fn server(pki: &TestPki, replies: Vec<Reply>) -> (u16, Arc<AtomicUsize>) {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(&pki.server.cert_path)
                .expect("cert")
                .collect::<Result<_, _>>()
                .expect("cert");
        let key = PrivateKeyDer::from_pem_file(&pki.server.key_path).expect("key");
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            for reply in replies {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    continue;
                };
                // The head, then the body its Content-Length announces.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_lowercase();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                match reply {
                    Reply::Answer(status, body) => {
                        let head = format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\nx-request-id: remote-{status}\r\n\
                             Connection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(head.as_bytes()).await;
                        let _ = s.write_all(body.as_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                    Reply::HangUp => drop(s),
                    Reply::Silent => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                }
            }
        });
        (port, seen)
    }

    fn proxy(pki: &TestPki, port: u16, budget_ms: u64) -> Proxy {
        let cfg = ExternalProxyConfig {
            name: "p".into(),
            url: format!("https://localhost:{port}/contoso"),
            ca_file: pki.ca.cert_path.clone(),
            client_cert_file: pki.client.cert_path.clone(),
            client_key_file: pki.client.key_path.clone(),
            server_name: None,
            call_budget_ms: budget_ms,
            pool_name: None,
        };
        Proxy::load(&cfg, &|p| p.to_path_buf()).expect("proxy")
    }

    fn pki() -> (tempfile::TempDir, TestPki) {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = TestPki::generate(dir.path()).expect("pki");
        (dir, pki)
    }

    #[tokio::test]
    async fn a_503_is_retried_once_within_the_budget() {
        let (_d, pki) = pki();
        let (port, seen) = server(
            &pki,
            vec![
                Reply::Answer(503, r#"{"code":"ServiceUnavailable","message":"busy"}"#),
                Reply::Answer(200, METADATA),
            ],
        )
        .await;
        let m = proxy(&pki, port, 5000)
            .metadata("k")
            .await
            .unwrap_or_else(|e| panic!("metadata after a 503: {e}"));
        assert_eq!(m.value.algorithm, Algorithm::AesKeyWrapPad);
        assert_eq!(m.remote_request_id, "remote-200");
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_that_was_sent_is_never_repeated() {
        let (_d, pki) = pki();
        let (port, seen) = server(&pki, vec![Reply::HangUp, Reply::Answer(200, METADATA)]).await;
        let e = proxy(&pki, port, 5000)
            .metadata("k")
            .await
            .err()
            .expect("the connection closed after the request was sent");
        assert!(matches!(e, BrokerError::Unavailable(_)), "{e}");
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn refusals_map_to_their_codes() {
        let (_d, pki) = pki();
        let (port, _) = server(
            &pki,
            vec![
                Reply::Answer(
                    403,
                    r#"{"code":"ExternalKeyAccessDisconnected","message":"off"}"#,
                ),
                Reply::Answer(404, r#"{"code":"KeyNotFound","message":"no"}"#),
                Reply::Answer(400, r#"{"code":"InvalidCiphertext","message":"bad"}"#),
                Reply::Answer(500, r#"{"code":"InternalError","message":"oops"}"#),
            ],
        )
        .await;
        let p = proxy(&pki, port, 5000);
        let e = p.metadata("k").await.err().expect("403");
        assert!(
            matches!(&e, BrokerError::Refused(Refused::ExternalRefused { status: 403, code, .. }) if code == "ExternalKeyAccessDisconnected"),
            "{e}"
        );
        let e = p.metadata("k").await.err().expect("404");
        assert!(
            matches!(&e, BrokerError::Refused(Refused::RemoteKeyNotFound { .. })),
            "{e}"
        );
        let e = p
            .unwrap("k", Algorithm::AesKeyWrapPad, &[0u8; 40])
            .await
            .err()
            .expect("400");
        assert!(matches!(e, BrokerError::Unauthentic), "{e}");
        let e = p.metadata("k").await.err().expect("500");
        assert!(matches!(e, BrokerError::Unavailable(_)), "{e}");
    }

    #[tokio::test]
    async fn a_silent_proxy_is_unavailable_within_the_budget() {
        let (_d, pki) = pki();
        let (port, seen) = server(&pki, vec![Reply::Silent]).await;
        let started = Instant::now();
        let e = proxy(&pki, port, 200)
            .metadata("k")
            .await
            .err()
            .expect("no answer");
        assert!(matches!(e, BrokerError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("no answer within"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }
}
