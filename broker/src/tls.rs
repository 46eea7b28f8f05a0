//! The mutual-TLS listener: rustls with TLS 1.3 only, a client certificate required and
//! verified against the configured CA, the caller's identity derived during the handshake (a
//! certificate with no usable identity fails the handshake), a handshake timeout, and
//! `TCP_NODELAY` on every connection.
//!
//! A connection's certificate is checked again on every request, not only at the handshake
//! ([`ConnInfo::check`]): its expiry; after the CAs or CRLs were reloaded, the whole chain again;
//! and the CRLs' own freshness (a CRL past its nextUpdate by more than `[tls] crl_grace_s` is
//! refused, and its approach is logged a day ahead). Connections live at most
//! `[server] max_connection_age_s`, and TLS session resumption is off, so every connection is
//! verified in full.
//!
//! With `[tls] client_ca_domains`, each client CA is bound to the trust domains (SPIFFE) or DNS
//! domains it may issue identities in: a certificate must chain to a CA bound to its caller's
//! domain, so one tenant's CA in the bundle cannot mint another's identities.
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
    /// The client's certificate chain, to check it again per request.
    peer: Arc<Peer>,
}

/// A connection's client certificate, as verified at its handshake.
struct Peer {
    /// End-entity first.
    chain: Vec<CertificateDer<'static>>,
    /// The end-entity's notAfter (Unix seconds).
    not_after: i64,
    /// The TLS configuration in force (reloaded in place).
    tls: Arc<Reloadable>,
    /// The configuration generation the chain last verified under.
    checked: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl ConnInfo {
    /// Whether the connection's certificate still holds now: not expired; under the current
    /// CAs and CRLs (the chain is verified again once per connection after each reload); and
    /// the CRLs not stale past their grace. `Err` says why not.
    pub fn check(&self) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let now = UnixTime::now();
        let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        if secs > self.peer.not_after {
            return Err(format!("it expired at {}", rfc3339(self.peer.not_after)));
        }
        let built = self.peer.tls.built();
        built.verifier.crl_fresh(secs)?;
        if self.peer.checked.load(Ordering::Acquire) != built.generation {
            let Some((ee, rest)) = self.peer.chain.split_first() else {
                return Err("the connection has no certificate".into());
            };
            built
                .verifier
                .verify_client_cert(ee, rest, now)
                .map_err(|e| {
                    format!("it no longer verifies under the reloaded CAs and CRLs: {e}")
                })?;
            self.peer.checked.store(built.generation, Ordering::Release);
        }
        Ok(())
    }
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// A finished mutual-TLS connection.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: ConnInfo,
    /// Its place under the connection cap (`crate::fdlimit`), given back when it closes.
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// Its place in its identity's count ([`Limits::per_identity`]).
    _seat: Seat,
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
    /// Client CAs bound to the domains they may issue identities in (empty: any CA of
    /// `client_ca`, any domain).
    pub ca_domains: &'a [CaDomains],
    /// How long past its nextUpdate a CRL is still accepted.
    pub crl_grace: Duration,
}

/// One client CA (a PEM file, one or more certificates) and the domains it may issue client
/// identities in: SPIFFE trust domains (`acme.example` for `spiffe://acme.example/...`) and DNS
/// domains (`acme.example` for `acme.example` and every name under it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaDomains {
    /// The CA certificate(s), PEM; each must also be in `client_ca`.
    pub ca: std::path::PathBuf,
    /// The domains.
    pub domains: Vec<String>,
}

/// Reads a PEM bundle of CA certificates into a root store.
pub(crate) fn roots_from(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("read client CA {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("parse client CA {}: {e}", path.display()))?;
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| format!("client CA {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no CA certificate", path.display()));
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration: TLS 1.3 only, ALPN h2, client certificates required,
/// verified against `client_ca` and carrying a usable identity.
pub fn server_config(files: &TlsFiles<'_>) -> Result<Arc<ServerConfig>, String> {
    build(files, 0).map(|b| b.config)
}

/// A server configuration with the verifier it uses (to check connections again) and its
/// generation (bumped by every reload).
struct Built {
    config: Arc<ServerConfig>,
    verifier: Arc<IdentityVerifier>,
    generation: u64,
}

/// The earliest nextUpdate of the CRLs (Unix seconds), if any CRL has one.
fn crl_next_update(
    crls: &[rustls::pki_types::CertificateRevocationListDer<'_>],
) -> Result<Option<i64>, String> {
    use x509_parser::prelude::FromDer;
    let mut earliest: Option<i64> = None;
    for c in crls {
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(c)
            .map_err(|e| format!("parse CRL: {e}"))?;
        if let Some(t) = crl.next_update() {
            let t = t.timestamp();
            earliest = Some(earliest.map_or(t, |e| e.min(t)));
        }
    }
    Ok(earliest)
}

fn build(files: &TlsFiles<'_>, generation: u64) -> Result<Built, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(files.cert)
        .map_err(|e| format!("read server certificate {}: {e}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("parse server certificate {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(files.key)
        .map_err(|e| format!("read server key {}: {e}", files.key.display()))?;
    let roots = roots_from(files.client_ca)?;
    let mut crls = Vec::new();
    for f in files.crls {
        for crl in rustls::pki_types::CertificateRevocationListDer::pem_file_iter(f)
            .map_err(|e| format!("read CRL {}: {e}", f.display()))?
        {
            crls.push(crl.map_err(|e| format!("parse CRL {}: {e}", f.display()))?);
        }
    }
    let crl_next_update = crl_next_update(&crls)?;
    // With CRLs, rustls checks the whole chain and refuses a certificate whose status is unknown
    // (its secure defaults; we do not loosen them).
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls.clone())
        .build()
        .map_err(|e| format!("client certificate verifier: {e}"))?;
    let mut bound = Vec::new();
    for b in files.ca_domains {
        if b.domains.is_empty() {
            return Err(format!(
                "client_ca_domains: {} is bound to no domain",
                b.ca.display()
            ));
        }
        for d in &b.domains {
            crate::identity::check_dns_name(d)
                .map_err(|e| format!("client_ca_domains: {}: domain {d:?}: {e}", b.ca.display()))?;
        }
        let v =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots_from(&b.ca)?), provider())
                .with_crls(crls.clone())
                .build()
                .map_err(|e| format!("client CA {}: {e}", b.ca.display()))?;
        bound.push((v, b.domains.clone()));
    }
    let verifier = Arc::new(IdentityVerifier {
        inner: webpki,
        bound,
        crl_next_update,
        crl_grace: i64::try_from(files.crl_grace.as_secs()).unwrap_or(i64::MAX),
    });
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3: {e}"))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(certs, key)
        .map_err(|e| format!("server certificate and key: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed session skips the client certificate's verification,
    // so a certificate revoked since would get through.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Built {
        config: Arc::new(cfg),
        verifier,
        generation,
    })
}

/// The webpki verifier, plus: the certificate must yield a caller identity, and with bound CAs,
/// chain to a CA bound to the identity's domain.
#[derive(Debug)]
struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// Per bound CA, its own verifier and its domains.
    bound: Vec<(Arc<dyn ClientCertVerifier>, Vec<String>)>,
    /// The CRLs' earliest nextUpdate (Unix seconds).
    crl_next_update: Option<i64>,
    /// Seconds a CRL is accepted past its nextUpdate.
    crl_grace: i64,
}

impl IdentityVerifier {
    /// `Err` when a CRL is stale past its grace at `now` (Unix seconds): its revocations may be
    /// out of date, so no certificate can be judged.
    fn crl_fresh(&self, now: i64) -> Result<(), String> {
        match self.crl_next_update {
            Some(next) if now > next.saturating_add(self.crl_grace) => Err(format!(
                "a CRL is stale: its nextUpdate was {} and the grace of {} s has passed (publish a new CRL)",
                rfc3339(next),
                self.crl_grace
            )),
            _ => Ok(()),
        }
    }
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
        let refuse = |why: &str| {
            tracing::info!(reason = %why, "client certificate refused");
            TlsError::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
        };
        self.crl_fresh(i64::try_from(now.as_secs()).unwrap_or(i64::MAX))
            .map_err(|why| refuse(&why))?;
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let caller = caller_from_cert(end_entity).map_err(|why| refuse(&why))?;
        if !self.bound.is_empty() {
            let issued_by_a_bound_ca = self.bound.iter().any(|(v, domains)| {
                domains.iter().any(|d| caller.within(d))
                    && v.verify_client_cert(end_entity, intermediates, now).is_ok()
            });
            if !issued_by_a_bound_ca {
                return Err(refuse(&format!(
                    "{caller} was not issued by a client CA bound to its domain (tls.client_ca_domains)"
                )));
            }
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

/// Accepts TCP connections and completes TLS handshakes concurrently (one slow client cannot
/// hold up the others); yields finished connections for tonic. At most `max_connections` are
/// open at once (handshaking or established): one more is closed as soon as it is accepted, so
/// that connections never take the descriptors the HSM and the store need (`crate::fdlimit`).
pub fn incoming(
    listener: TcpListener,
    config: Arc<Reloadable>,
    limits: Limits,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, io::Error>> {
    let Limits {
        handshake_timeout,
        max_connections,
        max_handshakes,
        per_identity,
    } = limits;
    let (tx, rx) = mpsc::channel(256);
    let slots = Arc::new(tokio::sync::Semaphore::new(
        max_connections.min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        max_handshakes.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let identities = Arc::new(IdentityCount {
        max: per_identity.max(1),
        open: std::sync::Mutex::new(std::collections::HashMap::new()),
        refused: std::sync::atomic::AtomicU64::new(0),
    });
    tokio::spawn(async move {
        let mut refused: u64 = 0;
        let mut last_warned: Option<std::time::Instant> = None;
        loop {
            // Stop accepting as soon as the server stops listening (graceful shutdown drops
            // the stream): the listening socket closes, so new connections are refused at once
            // instead of being accepted and never served.
            // At most `max_handshakes` at once (each costs a server signature): past that, new
            // connections wait in the kernel's backlog, unaccepted, holding no descriptor.
            let handshake = tokio::select! {
                h = handshakes.clone().acquire_owned() => h,
                () = tx.closed() => break,
            };
            let Ok(handshake) = handshake else { break };
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
            // Each new connection takes the configuration in force now; established ones are
            // checked against a newer one at their next request (`ConnInfo::check`).
            let built = config.built();
            let acceptor = TlsAcceptor::from(built.config.clone());
            let config = config.clone();
            let tx = tx.clone();
            let identities = identities.clone();
            tokio::spawn(async move {
                let accepted = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
                drop(handshake);
                let stream = match accepted {
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
                let chain: Vec<CertificateDer<'static>> = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default();
                let identity = chain
                    .first()
                    .map(|c| caller_from_cert(c).and_then(|caller| Ok((caller, not_after(c)?))));
                let (caller, not_after) = match identity {
                    Some(Ok(c)) => c,
                    // Unreachable in practice: the verifier already required both.
                    _ => {
                        tracing::warn!(%remote, "connection without a usable client identity dropped");
                        return;
                    }
                };
                let Some(seat) = identities.take(&caller.id) else {
                    let n = identities
                        .refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if (n + 1).is_power_of_two() {
                        tracing::warn!(%remote, caller = %caller, max = identities.max, refused = n + 1,
                            "connection refused: this identity has the most connections allowed ([tls] max_connections_per_identity)");
                    }
                    return;
                };
                tracing::debug!(%remote, caller = %caller, "client connected");
                let peer = Arc::new(Peer {
                    chain,
                    not_after,
                    tls: config,
                    checked: std::sync::atomic::AtomicU64::new(built.generation),
                });
                let _ = tx
                    .send(Ok(TlsConn {
                        stream,
                        info: ConnInfo {
                            caller,
                            remote,
                            peer,
                        },
                        _slot: slot,
                        _seat: seat,
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// How many connections and handshakes the listener takes on.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A client must finish its handshake within this.
    pub handshake_timeout: Duration,
    /// Most connections at once (handshaking or established).
    pub max_connections: usize,
    /// Most handshakes at once.
    pub max_handshakes: usize,
    /// Most established connections of one identity at once.
    pub per_identity: usize,
}

/// Open connections per identity.
struct IdentityCount {
    max: usize,
    open: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    refused: std::sync::atomic::AtomicU64,
}

impl IdentityCount {
    /// A seat for one more connection of `id`, if it has fewer than `max`.
    fn take(self: &Arc<Self>, id: &str) -> Option<Seat> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(id.to_string()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Seat {
            count: self.clone(),
            id: id.to_string(),
        })
    }
}

/// One connection's place in its identity's count, given back when it closes.
struct Seat {
    count: Arc<IdentityCount>,
    id: String,
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut open = self.count.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.id);
            }
        }
    }
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
    /// Client CAs bound to domains.
    pub ca_domains: Vec<CaDomains>,
    /// How long past its nextUpdate a CRL is still accepted.
    pub crl_grace: Duration,
}

impl TlsPaths {
    fn files(&self) -> TlsFiles<'_> {
        TlsFiles {
            cert: &self.cert,
            key: &self.key,
            client_ca: &self.client_ca,
            crls: &self.crls,
            ca_domains: &self.ca_domains,
            crl_grace: self.crl_grace,
        }
    }

    /// The content of every file (to notice changes).
    fn fingerprint(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for p in [&self.cert, &self.key, &self.client_ca]
            .into_iter()
            .chain(self.crls.iter())
            .chain(self.ca_domains.iter().map(|b| &b.ca))
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
    current: std::sync::RwLock<Arc<Built>>,
    fingerprint: std::sync::Mutex<Vec<u8>>,
    /// When the CRL freshness warning was last logged.
    crl_warned: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long before a CRL's nextUpdate its approach is logged as a warning.
const CRL_WARN_AHEAD: i64 = 24 * 3600;
/// How often that warning (or the stale CRL error) repeats.
const CRL_WARN_EVERY: Duration = Duration::from_secs(600);

/// A client certificate's notAfter, Unix seconds.
fn not_after(der: &[u8]) -> Result<i64, String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    Ok(cert.validity().not_after.timestamp())
}

impl Reloadable {
    /// Loads the configuration; fails if it does not load.
    pub fn load(paths: TlsPaths) -> Result<Arc<Self>, String> {
        let built = build(&paths.files(), 0)?;
        let fp = paths.fingerprint();
        Ok(Arc::new(Self {
            paths,
            current: std::sync::RwLock::new(Arc::new(built)),
            fingerprint: std::sync::Mutex::new(fp),
            crl_warned: std::sync::Mutex::new(None),
        }))
    }

    fn built(&self) -> Arc<Built> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The configuration in force.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.built().config.clone()
    }

    /// Logs a warning when a CRL's nextUpdate is less than a day away, and an error when it has
    /// passed (every 10 minutes while it lasts): a CRL that is not replaced in time makes every
    /// client certificate refused once its grace ends.
    fn warn_crl(&self) {
        let built = self.built();
        let Some(next) = built.verifier.crl_next_update else {
            return;
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if now + CRL_WARN_AHEAD < next {
            return;
        }
        let mut last = self.crl_warned.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < CRL_WARN_EVERY) {
            return;
        }
        *last = Some(std::time::Instant::now());
        let grace = built.verifier.crl_grace;
        if now <= next {
            tracing::warn!(next_update = %rfc3339(next), "a CRL's nextUpdate is less than a day away: publish a new CRL, or client certificates will be refused {grace} s after it");
        } else {
            tracing::error!(next_update = %rfc3339(next), grace_s = grace, "a CRL is past its nextUpdate: publish a new CRL; client certificates are refused once the grace has passed");
        }
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
        let generation = self.built().generation + 1;
        match build(&self.paths.files(), generation) {
            Ok(built) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(built);
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
                me.warn_crl();
            }
        });
    }
}
