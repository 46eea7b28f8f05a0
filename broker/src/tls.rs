//! The mutual-TLS listener: rustls with TLS 1.3 only, a client certificate required and
//! verified against the configured CA, the caller's identity derived during the handshake (a
//! certificate with no usable identity fails the handshake), a handshake timeout, and
//! `TCP_NODELAY` on every connection.
//!
//! tonic's own TLS settings have no version knob, so we build the rustls `ServerConfig`
//! ourselves and hand tonic a stream of finished connections (`serve_with_incoming`). Each
//! connection carries its [`ConnInfo`] into every request's extensions.

use std::{
    io,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::{
    DigitallySignedStruct, DistinguishedName, Error as TlsError, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::Connected;

use crate::identity::{Caller, caller_from_cert};

/// What a request knows about its connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The verified caller.
    pub caller: Caller,
    /// The peer address.
    pub remote: SocketAddr,
}

/// A finished mutual-TLS connection.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: ConnInfo,
    /// Its place under the connection cap (`crate::fdlimit`), given back when it closes.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Where the TLS material is.
#[derive(Clone, Debug)]
pub struct TlsFiles<'a> {
    /// The server certificate chain (PEM).
    pub cert: &'a Path,
    /// The server private key (PEM).
    pub key: &'a Path,
    /// The CA certificates that issue client certificates (PEM bundle).
    pub client_ca: &'a Path,
    /// Certificate revocation lists (PEM).
    pub crls: &'a [std::path::PathBuf],
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration: TLS 1.3 only, ALPN h2, client certificates required,
/// verified against `client_ca` and carrying a usable identity.
pub fn server_config(files: &TlsFiles<'_>) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(files.cert)
        .map_err(|e| format!("read server certificate {}: {e}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("parse server certificate {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(files.key)
        .map_err(|e| format!("read server key {}: {e}", files.key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(files.client_ca)
        .map_err(|e| format!("read client CA {}: {e}", files.client_ca.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("parse client CA {}: {e}", files.client_ca.display()))?;
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| format!("client CA {}: {e}", files.client_ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{} holds no CA certificate",
            files.client_ca.display()
        ));
    }
    let mut crls = Vec::new();
    for f in files.crls {
        for crl in rustls::pki_types::CertificateRevocationListDer::pem_file_iter(f)
            .map_err(|e| format!("read CRL {}: {e}", f.display()))?
        {
            crls.push(crl.map_err(|e| format!("parse CRL {}: {e}", f.display()))?);
        }
    }
    // With CRLs, rustls checks the whole chain and refuses a certificate whose status is unknown
    // (its secure defaults; we do not loosen them).
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .build()
        .map_err(|e| format!("client certificate verifier: {e}"))?;
    let verifier = Arc::new(IdentityVerifier { inner: webpki });
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("server certificate and key: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The webpki verifier, plus: the certificate must yield a caller identity.
#[derive(Debug)]
struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for IdentityVerifier {
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
        caller_from_cert(end_entity).map_err(|why| {
            tracing::info!(reason = %why, "client certificate refused");
            TlsError::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
        })?;
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

/// Accepts TCP connections and completes TLS handshakes concurrently (one slow client cannot
/// hold up the others); yields finished connections for tonic. At most `max_connections` are
/// open at once (handshaking or established): one more is closed as soon as it is accepted, so
/// that connections never take the descriptors the HSM and the store need (`crate::fdlimit`).
pub fn incoming(
    listener: TcpListener,
    config: Arc<Reloadable>,
    handshake_timeout: Duration,
    max_connections: usize,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(256);
    let slots = Arc::new(tokio::sync::Semaphore::new(
        max_connections.min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    tokio::spawn(async move {
        let mut refused: u64 = 0;
        let mut last_warned: Option<std::time::Instant> = None;
        loop {
            // Stop accepting as soon as the server stops listening (graceful shutdown drops
            // the stream): the listening socket closes, so new connections are refused at once
            // instead of being accepted and never served.
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => break,
            };
            let (tcp, remote) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Over the cap: closed at once (its descriptor is freed now), logged at most
                // once a second.
                drop(tcp);
                refused += 1;
                if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_warned = Some(std::time::Instant::now());
                    tracing::warn!(%remote, max_connections, refused,
                        "connection refused: the connection cap is reached (descriptors are kept for the HSM and the store)");
                }
                continue;
            };
            // Without TCP_NODELAY the first response on a fresh TLS 1.3 connection waits ~40 ms
            // (session-ticket write meets delayed ACK).
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "set TCP_NODELAY failed");
            }
            // Each new connection takes the configuration in force now; established ones keep
            // theirs, so a reload never fails a valid in-flight client.
            let acceptor = TlsAcceptor::from(config.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                let caller = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| caller_from_cert(c));
                let caller = match caller {
                    Some(Ok(c)) => c,
                    // Unreachable in practice: the verifier already required both.
                    _ => {
                        tracing::warn!(%remote, "connection without a usable client identity dropped");
                        return;
                    }
                };
                tracing::debug!(%remote, caller = %caller, "client connected");
                let _ = tx
                    .send(Ok(TlsConn {
                        stream,
                        info: ConnInfo { caller, remote },
                        _slot: slot,
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Owned copies of the TLS file paths, for reloading.
#[derive(Clone, Debug)]
pub struct TlsPaths {
    /// Server certificate chain.
    pub cert: std::path::PathBuf,
    /// Server key.
    pub key: std::path::PathBuf,
    /// Client CA bundle.
    pub client_ca: std::path::PathBuf,
    /// CRLs.
    pub crls: Vec<std::path::PathBuf>,
}

impl TlsPaths {
    fn files(&self) -> TlsFiles<'_> {
        TlsFiles {
            cert: &self.cert,
            key: &self.key,
            client_ca: &self.client_ca,
            crls: &self.crls,
        }
    }

    /// The content of every file (to notice changes).
    fn fingerprint(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for p in [&self.cert, &self.key, &self.client_ca]
            .into_iter()
            .chain(self.crls.iter())
        {
            all.extend(std::fs::read(p).unwrap_or_default());
            all.push(0);
        }
        sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&all)).to_vec()
    }
}

/// The server TLS configuration, replaced atomically when its files change (server certificate,
/// client CA bundle, CRLs): on SIGHUP and when their content changes (checked every second). A
/// new configuration that does not load (corrupt file, key that does not match) is rejected and
/// the previous one stays in force.
pub struct Reloadable {
    paths: TlsPaths,
    current: std::sync::RwLock<Arc<ServerConfig>>,
    fingerprint: std::sync::Mutex<Vec<u8>>,
}

impl Reloadable {
    /// Loads the configuration; fails if it does not load.
    pub fn load(paths: TlsPaths) -> Result<Arc<Self>, String> {
        let cfg = server_config(&paths.files())?;
        let fp = paths.fingerprint();
        Ok(Arc::new(Self {
            paths,
            current: std::sync::RwLock::new(cfg),
            fingerprint: std::sync::Mutex::new(fp),
        }))
    }

    /// The configuration in force.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reloads if the files changed (or `force`). Returns whether a new configuration took effect.
    pub fn reload(&self, force: bool) -> bool {
        let fp = self.paths.fingerprint();
        {
            let mut old = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
            if !force && *old == fp {
                return false;
            }
            *old = fp;
        }
        match server_config(&self.paths.files()) {
            Ok(cfg) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = cfg;
                tracing::info!("TLS configuration reloaded (certificate, client CAs, CRLs)");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "new TLS files rejected; the previous TLS configuration stays in force");
                false
            }
        }
    }

    /// Reloads on SIGHUP and on change.
    pub fn watch(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = signal(SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let force = tokio::select! {
                    _ = tick.tick() => false,
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                let me2 = me.clone();
                let _ = tokio::task::spawn_blocking(move || me2.reload(force)).await;
            }
        });
    }
}
