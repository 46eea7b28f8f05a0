//! The HTTPS listener every HTTP front door uses (the AWS XKS proxy door today): an `axum`
//! [`Router`] served over `tokio-rustls` with the `rustls::ServerConfig` the door builds, over
//! HTTP/1.1 only. The door decides what it serves and how it answers; this module only bounds
//! what a client can make the broker hold:
//!
//! * **connections**: at most [`HttpsSettings::max_connections`] at once; the next one waits in
//!   the kernel's accept queue until a slot frees (back-pressure, not an error);
//! * **the TLS handshake** must finish within [`HttpsSettings::handshake_timeout`];
//! * **the request head** must arrive within [`HttpsSettings::header_read_timeout`] (hyper's
//!   own timer, for every request of a keep-alive connection): no slow-loris;
//! * **the body**: [`read_body`] reads at most [`HttpsSettings::max_body_bytes`] and otherwise
//!   says [`BodyError::TooLarge`] — at once, without reading a byte, when `Content-Length`
//!   already says so; the door answers (and audits) that refusal in its own format;
//! * **each request** is answered within [`HttpsSettings::request_timeout`] (the door's
//!   [`Replies::timed_out`] otherwise) — a backstop: the pipeline answers (and audits) a request
//!   whose deadline passes well before;
//! * `TCP_NODELAY` on every connection (without it the first response on a fresh TLS 1.3
//!   connection waits ~40 ms: the session-ticket write meets delayed ACK).
//!
//! **Shutdown**: when `shutdown` completes, the listening socket closes (new connections are
//! refused), every connection finishes the request it is serving and closes instead of waiting
//! for another, and [`serve`] returns once all have closed.
//!
//! Each request carries a [`Peer`] in its extensions (the remote address and the client's
//! certificate, if it sent one and the `ServerConfig` verified it).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    response::Response,
};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::{
    DigitallySignedStruct, DistinguishedName, Error as TlsError, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use x509_parser::prelude::FromDer;

/// The limits of one HTTPS listener.
#[derive(Clone, Copy, Debug)]
pub struct HttpsSettings {
    /// The most connections open at once.
    pub max_connections: usize,
    /// The longest a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// The longest a request's head (request line and headers) may take to arrive.
    pub header_read_timeout: Duration,
    /// The largest request body accepted.
    pub max_body_bytes: usize,
    /// The longest a request may take, body read included, before [`Replies::timed_out`].
    pub request_timeout: Duration,
}

/// How a door answers what the listener refuses itself, in the door's own wire format (an XKS
/// client expects a JSON `errorName`, another door something else).
#[derive(Clone, Copy)]
pub struct Replies {
    /// A request that ran past [`HttpsSettings::request_timeout`].
    pub timed_out: fn() -> Response,
}

/// Who is on the other end of a request's connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The remote address.
    pub remote: SocketAddr,
    /// The client's end-entity certificate, when it sent one (verified by the door's
    /// `ServerConfig`).
    pub client_cert: Option<CertificateDer<'static>>,
}

/// The body limit in force for a request (set by the listener, read by [`read_body`]), and
/// whether `Content-Length` already exceeds it (the body is then never read).
#[derive(Clone, Copy, Debug)]
struct BodyLimit {
    limit: usize,
    exceeded: bool,
}

/// Why [`read_body`] returned no body.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body is larger than the listener's limit.
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// The connection failed while the body was read.
    #[error("cannot read the request body: {0}")]
    Read(String),
}

/// Reads a request's whole body, at most the listener's [`HttpsSettings::max_body_bytes`]
/// (`fallback_limit` for a request that did not come through [`serve`], e.g. in a unit test).
pub async fn read_body(
    req: axum::extract::Request,
    fallback_limit: usize,
) -> Result<(http::request::Parts, Bytes), BodyError> {
    let (parts, body) = req.into_parts();
    let limit = match parts.extensions.get::<BodyLimit>() {
        None => fallback_limit,
        Some(l) if l.exceeded => return Err(BodyError::TooLarge(l.limit)),
        Some(l) => l.limit,
    };
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(c) => Ok((parts, c.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(limit)),
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
}

/// Serves `router` on `listener` until `shutdown` completes and every connection has closed
/// (see the module docs). `tls` gives the `ServerConfig` for each new connection (a reloaded
/// certificate applies to the next connection; established ones keep theirs).
pub async fn serve(
    listener: TcpListener,
    tls: impl Fn() -> Arc<ServerConfig> + Send + Sync + 'static,
    router: Router,
    settings: HttpsSettings,
    replies: Replies,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let mut conns = JoinSet::new();
    let mut stop = stop_rx.clone();
    loop {
        // Reap finished connections so the set does not grow with the listener's lifetime.
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stopped(&mut stop) => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stopped(&mut stop) => break,
        };
        let (tcp, remote) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "HTTPS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "set TCP_NODELAY failed");
        }
        let acceptor = TlsAcceptor::from(tls());
        let (router, stop) = (router.clone(), stop_rx.clone());
        conns.spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(
                settings.handshake_timeout,
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%remote, error = %e, "HTTPS: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "HTTPS: TLS handshake timed out");
                    return;
                }
            };
            let peer = Peer {
                remote,
                client_cert: stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.clone().into_owned()),
            };
            serve_connection(stream, peer, router, settings, replies, stop).await;
        });
    }
    // Stop accepting at once: the listening socket closes here.
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Completes once shutdown is asked (the guard `wait_for` returns is dropped here, not held
/// across the caller's awaits).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Serves one connection's requests until the client closes it or shutdown is asked (then the
/// request in flight finishes and the connection closes).
async fn serve_connection(
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: Peer,
    router: Router,
    settings: HttpsSettings,
    replies: Replies,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let remote = peer.remote;
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let router = router.clone();
        let peer = peer.clone();
        async move {
            let start = Instant::now();
            let too_large = req
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|n| n > settings.max_body_bytes as u64);
            // An announced oversized body is never read: the door sees an empty one, and
            // read_body says it was too large.
            let mut req = if too_large {
                req.map(|_| Body::empty())
            } else {
                req.map(Body::new)
            };
            req.extensions_mut().insert(peer);
            req.extensions_mut().insert(BodyLimit {
                limit: settings.max_body_bytes,
                exceeded: too_large,
            });
            // A Router is always ready; poll it anyway, as the Service contract asks.
            let mut router = router;
            let call = async move {
                std::future::poll_fn(|cx| {
                    tower::Service::<axum::extract::Request>::poll_ready(&mut router, cx)
                })
                .await?;
                tower::Service::call(&mut router, req).await
            };
            let resp = match tokio::time::timeout(settings.request_timeout, call).await {
                Ok(Ok(r)) => r,
                Ok(Err(never)) => match never {},
                Err(_) => {
                    tracing::warn!(%remote, elapsed_ms = start.elapsed().as_millis() as u64,
                        "HTTPS request timed out");
                    (replies.timed_out)()
                }
            };
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "HTTPS connection ended with an error");
    }
}

/// The subject common names of a certificate.
pub(crate) fn common_names(der: &[u8]) -> Vec<String> {
    match x509_parser::certificate::X509Certificate::from_der(der) {
        Ok((_, c)) => c
            .subject()
            .iter_common_name()
            .filter_map(|a| a.as_str().ok().map(str::to_string))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// At most `max` characters of printable ASCII: what the HTTP doors echo of a caller's input in
/// an error (the XKS spec's rule for `errorMessage`), so it cannot forge log or JSON structure.
pub(crate) fn printable(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(max)
        .collect()
}

/// A JSON request body, or the body error an HTTP door answers with 400.
pub(crate) fn json_body<T: for<'de> serde::Deserialize<'de>>(
    bytes: &[u8],
) -> Result<T, crate::error::BrokerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| crate::error::Invalid::Body(printable(&e.to_string(), 200)).into())
}

/// A door's client-certificate verifier: webpki's chain check against the door's configured
/// CA, then the subject CN must be one of those configured (AWS KMS presents
/// `cks.kms.<region>.amazonaws.com`; Azure's Managed HSM the name its operator configures).
#[derive(Debug)]
pub(crate) struct CnVerifier {
    /// The chain check.
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    /// The accepted subject common names.
    pub(crate) cns: Vec<String>,
    /// The door, for the log line (`XKS`, `EKM`).
    pub(crate) door: &'static str,
}

impl ClientCertVerifier for CnVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let names = common_names(end_entity);
        if !names.iter().any(|n| self.cns.contains(n)) {
            tracing::info!(door = self.door, subject_cn = ?names, "client certificate refused: subject CN not configured");
            return Err(TlsError::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_names_are_read_from_the_subject() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cks.kms.eu-west-1.amazonaws.com");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            common_names(cert.der()),
            ["cks.kms.eu-west-1.amazonaws.com"]
        );
        assert!(common_names(b"not a certificate").is_empty());
    }

    fn request(body: &'static [u8], limit: Option<BodyLimit>) -> axum::extract::Request {
        let mut r = http::Request::builder()
            .method("POST")
            .uri("/x")
            .body(Body::from(body))
            .expect("request");
        if let Some(l) = limit {
            r.extensions_mut().insert(l);
        }
        r
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_limit_and_no_further() {
        let (_, b) = read_body(request(b"0123456789", None), 10)
            .await
            .expect("at the limit");
        assert_eq!(&b[..], b"0123456789");
        assert!(matches!(
            read_body(request(b"0123456789", None), 9).await,
            Err(BodyError::TooLarge(9))
        ));
        // The listener's limit wins over the fallback.
        let l = BodyLimit {
            limit: 4,
            exceeded: false,
        };
        assert!(matches!(
            read_body(request(b"01234", Some(l)), 100).await,
            Err(BodyError::TooLarge(4))
        ));
        // An announced oversized body is refused without being read.
        let l = BodyLimit {
            limit: 4,
            exceeded: true,
        };
        assert!(matches!(
            read_body(request(b"", Some(l)), 100).await,
            Err(BodyError::TooLarge(4))
        ));
    }
}
