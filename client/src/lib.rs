//! Client SDK for keybroker: envelope encryption for calling services.
//!
//! [`Client::seal`] asks the broker for a fresh data encryption key (`GenerateDataKey`: drawn from
//! the HSM's RNG, returned once in the clear and wrapped under the key's newest version),
//! encrypts the data **locally** with AES-256-GCM, erases the DEK, and returns one self-contained
//! message: a small header carrying the wrapped DEK, then the data in authenticated chunks.
//! [`Client::open`] parses the header, has the broker unwrap the DEK (`UnwrapKey`; the envelope
//! names its key version, so this keeps working after any number of rotations), and opens the
//! chunks. Large inputs stream: [`Client::sealer`] / [`Client::opener`] work chunk by chunk, and
//! [`Client::seal_stream`] / [`Client::open_stream`] connect them to `AsyncRead`/`AsyncWrite`.
//! The format and the chunk construction (STREAM: truncation, reordering and extension are
//! detected) are documented byte by byte in [`format`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), keybroker_client::Error> {
//! use keybroker_client::ClientBuilder;
//!
//! let client = ClientBuilder::from_pem_files(
//!     "https://keybroker.internal:8443",
//!     "/etc/payments/keybroker-ca.pem",   // the CA that issued the broker's certificate
//!     "/etc/payments/svid.pem",           // this service's certificate (SPIFFE ID or DNS SAN)
//!     "/etc/payments/svid.key",
//! )?
//! .key("acme/payments")                   // the broker key new messages are sealed under
//! .build()?;
//!
//! let sealed = client.seal(b"4111 1111 1111 1111", b"order-42").await?;
//! // ... store `sealed` anywhere; the DEK inside is wrapped by a KEK that never leaves the HSM.
//! let card = client.open(&sealed, b"order-42").await?;   // wrong AAD => Error::Unauthentic
//! assert_eq!(card, b"4111 1111 1111 1111");
//! # Ok(()) }
//! ```
//!
//! `examples/seal_open.rs` is the same thing as a program that runs against `keybroker dev`.
//!
//! # What the client does for you
//! * **Mutual TLS** from PEM files (the broker accepts TLS 1.3 with a client certificate only).
//! * **A deadline on every call** ([`ClientBuilder::call_timeout`], default 5 s; sent to the broker
//!   as `grpc-timeout` and enforced locally), and **retries with backoff** on `UNAVAILABLE`
//!   (HSM or broker unreachable) and `RESOURCE_EXHAUSTED` (no HSM session free) — see
//!   [`RetryPolicy`]. Both RPCs the SDK makes are safe to repeat. The channel connects lazily and
//!   reconnects by itself.
//! * **A DEK cache** ([`CacheConfig`]): opening many messages sealed under one DEK makes one
//!   `UnwrapKey` call; concurrent opens of one DEK share one call. Entries are bounded by age,
//!   uses and count, and erased on eviction. The cache's `max_age` is how long data stays
//!   readable here after its key is disabled at the broker.
//! * **A request id** (`x-request-id`, the same across the retries of one operation) that the
//!   broker writes into its log line and audit record for the request.
//! * **Access justifications** for HYOK deployments, where the key owner's policy may require a
//!   reason for each use of its key: [`Client::with_justification`] returns a client (sharing
//!   the channel and the DEK cache) whose broker calls carry it.
//!
//! # The DEK cache and the key owner's controls
//! An open served from the cache does not reach the broker: it is not audited there, needs no
//! justification and is not stopped by disabling the key or by the HYOK kill switch until the
//! entry expires. That is the point of the cache (one unwrap, then local decryption), and it is
//! bounded by `max_age` and `max_uses`. Where the key owner must see and be able to stop every
//! use within a short time, keep `max_age` short or turn the cache off
//! ([`CacheConfig::disabled`]).
//! * **Secrets kept in zeroizing types**: plaintext DEKs ([`format::DataKey`]) are erased when
//!   dropped and print as `[REDACTED]`. (The DEK also passes briefly through tonic's and prost's
//!   buffers, which are not zeroized.)
//!
//! # Layout
//! * [`format`] — the sealed format and the chunked AES-256-GCM construction (no I/O).
//! * [`cache`] — the DEK cache.
//! * [`error`] — the one error type; every malformed or unauthentic input is
//!   [`Error::Unauthentic`].
//! * this module — the client: connection, retries, seal/open and the streaming API.

pub mod cache;
pub mod error;
pub mod format;

use std::{
    collections::HashMap,
    future::Future,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use keybroker_proto::v1::{self as pb, key_broker_client::KeyBrokerClient};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::{
    Code, Status,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use zeroize::Zeroizing;

use crate::{
    cache::DekCache,
    format::{DEFAULT_CHUNK_LOG2, DEK_LEN, Decryptor, Encryptor, Header, NONCE_PREFIX_LEN},
};
pub use keybroker_proto::v1::JustificationReason;

pub use crate::{
    cache::{CacheConfig, CacheStats},
    error::{Error, Result},
    format::DataKey,
};

/// The metadata header that carries a request id to the broker.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// When and how often to retry a broker call.
///
/// A call is retried only when the broker (or the transport) answers `UNAVAILABLE` or
/// `RESOURCE_EXHAUSTED`. Before retry `n` (1, 2, …) the client sleeps a random time between half
/// and all of `min(max_backoff, initial_backoff × 2^(n-1))` ("equal jitter": spreads a herd of
/// clients out, never retries at once).
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. 1 means no retries. Default 4.
    pub max_attempts: u32,
    /// Backoff before the first retry (upper bound). Default 50 ms.
    pub initial_backoff: Duration,
    /// Largest backoff. Default 2 s.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The backoff before retry `retry` (1-based), given a uniformly random `u64`.
    pub fn backoff(&self, retry: u32, random: u64) -> Duration {
        let exp = retry.saturating_sub(1).min(30);
        let cap = self
            .initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        let half = cap / 2;
        let span = (cap - half).as_nanos() as u64;
        let jitter = if span == 0 { 0 } else { random % (span + 1) };
        half + Duration::from_nanos(jitter)
    }

    /// Whether a status code is worth retrying.
    pub fn retryable(code: Code) -> bool {
        matches!(code, Code::Unavailable | Code::ResourceExhausted)
    }
}

/// Builds a [`Client`].
#[derive(Clone)]
pub struct ClientBuilder {
    endpoint: String,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Zeroizing<Vec<u8>>,
    key: Option<String>,
    call_timeout: Duration,
    connect_timeout: Duration,
    retry: RetryPolicy,
    cache: CacheConfig,
    chunk_log2: u8,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("endpoint", &self.endpoint)
            .field("key", &self.key)
            .field("call_timeout", &self.call_timeout)
            .field("retry", &self.retry)
            .field("cache", &self.cache)
            .field("chunk_log2", &self.chunk_log2)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("cannot read {what} {}: {e}", path.display())))
}

impl ClientBuilder {
    /// A client of the broker at `endpoint` (`https://host:port`), with the CA that issued the
    /// broker's certificate and this service's certificate and private key, all PEM.
    pub fn from_pem(
        endpoint: impl Into<String>,
        ca_pem: impl Into<Vec<u8>>,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            endpoint: endpoint.into(),
            ca_pem: ca_pem.into(),
            cert_pem: cert_pem.into(),
            key_pem: Zeroizing::new(key_pem.into()),
            key: None,
            call_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            cache: CacheConfig::default(),
            chunk_log2: DEFAULT_CHUNK_LOG2,
        }
    }

    /// Like [`ClientBuilder::from_pem`], reading the three PEM files.
    pub fn from_pem_files(
        endpoint: impl Into<String>,
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self> {
        Ok(Self::from_pem(
            endpoint,
            read(ca.as_ref(), "CA certificate")?,
            read(cert.as_ref(), "client certificate")?,
            read(key.as_ref(), "client key")?,
        ))
    }

    /// The broker key (`tenant/name`) that [`Client::seal`] seals under. Opening needs no key
    /// name: every message names its key version.
    pub fn key(mut self, name: impl Into<String>) -> Self {
        self.key = Some(name.into());
        self
    }

    /// The deadline of each broker call attempt. Default 5 s.
    pub fn call_timeout(mut self, t: Duration) -> Self {
        self.call_timeout = t;
        self
    }

    /// The TCP + TLS connect timeout. Default 5 s.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// The retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The DEK cache bounds.
    pub fn cache(mut self, cfg: CacheConfig) -> Self {
        self.cache = cfg;
        self
    }

    /// Plaintext bytes per chunk, as a power of two (10 ..= 24; default 16, i.e. 64 KiB).
    pub fn chunk_size_log2(mut self, log2: u8) -> Self {
        self.chunk_log2 = log2;
        self
    }

    /// Builds the client. No network traffic: the channel connects on first use (and reconnects
    /// by itself after a broker restart).
    pub fn build(self) -> Result<Client> {
        if !(format::MIN_CHUNK_LOG2..=format::MAX_CHUNK_LOG2).contains(&self.chunk_log2) {
            return Err(Error::Config(format!(
                "chunk_size_log2 {} is outside {}..={}",
                self.chunk_log2,
                format::MIN_CHUNK_LOG2,
                format::MAX_CHUNK_LOG2
            )));
        }
        if self.retry.max_attempts == 0 {
            return Err(Error::Config(
                "retry.max_attempts must be at least 1".into(),
            ));
        }
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem[..]));
        let channel = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| Error::Config(format!("bad endpoint {:?}: {e}", self.endpoint)))?
            .tls_config(tls)
            .map_err(|e| Error::Config(format!("TLS configuration: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(Client {
            justification: None,
            inner: Arc::new(Inner {
                stub: KeyBrokerClient::new(channel),
                key: self.key,
                call_timeout: self.call_timeout,
                retry: self.retry,
                chunk_log2: self.chunk_log2,
                cache: DekCache::new(self.cache),
                inflight: Mutex::new(HashMap::new()),
                generate_calls: AtomicU64::new(0),
                unwrap_calls: AtomicU64::new(0),
                rpc_attempts: AtomicU64::new(0),
                retries: AtomicU64::new(0),
            }),
        })
    }
}

/// What the client has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// `GenerateDataKey` operations (one per seal), retries not counted.
    pub generate_calls: u64,
    /// `UnwrapKey` operations (one per DEK-cache miss), retries not counted.
    pub unwrap_calls: u64,
    /// RPC attempts in all, retries included.
    pub rpc_attempts: u64,
    /// Retries (attempts after the first).
    pub retries: u64,
    /// The DEK cache.
    pub cache: CacheStats,
}

/// A keybroker client: cheap to clone, shares its channel and DEK cache.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// The access justification sent with every broker call, if any.
    justification: Option<Arc<pb::AccessJustification>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("key", &self.inner.key)
            .field("justification", &self.justification)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Inner {
    stub: KeyBrokerClient<Channel>,
    key: Option<String>,
    call_timeout: Duration,
    retry: RetryPolicy,
    chunk_log2: u8,
    cache: DekCache,
    /// One lock per wrapped DEK being unwrapped right now: concurrent opens of one DEK wait for
    /// the first one's unwrap instead of making their own.
    inflight: Mutex<HashMap<Vec<u8>, Arc<tokio::sync::Mutex<()>>>>,
    generate_calls: AtomicU64,
    unwrap_calls: AtomicU64,
    rpc_attempts: AtomicU64,
    retries: AtomicU64,
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Jitter only: a failing OS RNG just means no jitter.
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

fn new_request_id() -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    format!("kbc-{}", hex::encode(b))
}

/// One open's turn at unwrapping a DEK. Dropping it (at the end, or when the open is
/// cancelled) releases the turn and removes the in-flight entry once nobody else holds it.
struct InflightGuard<'a> {
    inner: &'a Inner,
    wrapped: &'a [u8],
    gate: Option<Arc<tokio::sync::Mutex<()>>>,
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.turn.take();
        self.gate.take();
        let mut m = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if m.get(self.wrapped)
            .is_some_and(|g| Arc::strong_count(g) == 1)
        {
            m.remove(self.wrapped);
        }
    }
}

impl Client {
    /// The same client (same channel, same DEK cache and counters) whose broker calls carry an
    /// access justification: why the key is used (HYOK: the key owner's policy may accept only
    /// some reasons, and records them in its audit trail). `detail` is at most 256 printable
    /// characters, e.g. a ticket number. Opens served from the DEK cache make no broker call.
    pub fn with_justification(
        &self,
        reason: JustificationReason,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            inner: self.inner.clone(),
            justification: Some(Arc::new(pb::AccessJustification {
                reason: reason.into(),
                detail: detail.into(),
            })),
        }
    }

    /// The request context of a broker call (the request id travels as `x-request-id`).
    fn context(&self) -> Option<pb::RequestContext> {
        self.justification.as_ref().map(|j| pb::RequestContext {
            justification: Some((**j).clone()),
            ..Default::default()
        })
    }

    /// What the client has done so far.
    pub fn stats(&self) -> ClientStats {
        let i = &self.inner;
        ClientStats {
            generate_calls: i.generate_calls.load(Ordering::Relaxed),
            unwrap_calls: i.unwrap_calls.load(Ordering::Relaxed),
            rpc_attempts: i.rpc_attempts.load(Ordering::Relaxed),
            retries: i.retries.load(Ordering::Relaxed),
            cache: i.cache.stats(),
        }
    }

    /// Erases every cached DEK (e.g. when the application is told a key was revoked).
    pub fn clear_cache(&self) {
        self.inner.cache.clear();
    }

    /// Seals `plaintext` under a fresh DEK, binding `aad` (which must be presented again to
    /// open; it is not stored in the message).
    pub async fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let mut s = self.sealer(aad).await?;
        let mut out = s.update(plaintext)?;
        out.extend_from_slice(&s.finish()?);
        Ok(out)
    }

    /// Opens a message made by [`Client::seal`] (or a [`Sealer`]) with the same `aad`.
    pub async fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let mut o = self.opener(aad);
        let mut out = o.update(sealed).await?;
        out.extend_from_slice(&o.finish()?);
        Ok(out)
    }

    /// Starts sealing a message chunk by chunk: one `GenerateDataKey` call now, then local
    /// encryption only.
    pub async fn sealer(&self, aad: &[u8]) -> Result<Sealer> {
        let key =
            self.inner.key.clone().ok_or_else(|| {
                Error::Config("no key to seal under: set ClientBuilder::key".into())
            })?;
        let request_id = new_request_id();
        let context = self.context();
        self.inner.generate_calls.fetch_add(1, Ordering::Relaxed);
        let mut resp = self
            .call(
                "GenerateDataKey",
                &request_id,
                |mut stub, req_id, timeout| {
                    let mut req = tonic::Request::new(pb::GenerateDataKeyRequest {
                        key: key.clone(),
                        length: DEK_LEN as u32,
                        context: context.clone(),
                        // No broker AAD: the caller's AAD is bound locally, in every chunk.
                        ..Default::default()
                    });
                    decorate(&mut req, &req_id, timeout);
                    async move { stub.generate_data_key(req).await }
                },
            )
            .await?;
        let dek = DataKey::take(&mut resp.plaintext).ok_or_else(|| Error::Rpc {
            method: "GenerateDataKey",
            code: Code::Internal,
            message: "the broker returned a DEK that is not 32 bytes".into(),
            attempts: 1,
        })?;
        let mut prefix = [0u8; NONCE_PREFIX_LEN];
        getrandom::fill(&mut prefix)
            .map_err(|e| Error::Config(format!("OS random number generator failed: {e}")))?;
        let header = Header::new(self.inner.chunk_log2, &resp.wrapped_key, prefix)?;
        Ok(Sealer {
            enc: Encryptor::new(&dek, &header, aad),
        })
    }

    /// Starts opening a message chunk by chunk. The DEK is unwrapped (or found in the cache) as
    /// soon as the header has arrived.
    pub fn opener(&self, aad: &[u8]) -> Opener {
        Opener {
            client: self.clone(),
            aad: aad.to_vec(),
            state: OpenState::Header(Vec::new()),
        }
    }

    /// Seals everything `reader` yields into `writer` (then flushes it). Returns the number of
    /// plaintext bytes sealed.
    pub async fn seal_stream<R, W>(&self, aad: &[u8], mut reader: R, mut writer: W) -> Result<u64>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut s = self.sealer(aad).await?;
        let mut buf = Zeroizing::new(vec![0u8; 64 * 1024]);
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf[..]).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
            writer.write_all(&s.update(&buf[..n])?).await?;
        }
        writer.write_all(&s.finish()?).await?;
        writer.flush().await?;
        Ok(total)
    }

    /// Opens a sealed stream from `reader` into `writer`. Returns the number of plaintext bytes
    /// written. Plaintext is written as each chunk authenticates: if this returns an error, what
    /// was written must be discarded (the stream may have been truncated or altered later on).
    pub async fn open_stream<R, W>(&self, aad: &[u8], mut reader: R, mut writer: W) -> Result<u64>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut o = self.opener(aad);
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            let pt = Zeroizing::new(o.update(&buf[..n]).await?);
            total += pt.len() as u64;
            writer.write_all(&pt).await?;
        }
        let pt = Zeroizing::new(o.finish()?);
        total += pt.len() as u64;
        writer.write_all(&pt).await?;
        writer.flush().await?;
        Ok(total)
    }

    /// The DEK of a wrapped DEK: from the cache, or unwrapped by the broker (one call per DEK,
    /// however many opens ask for it at once).
    async fn data_key(&self, wrapped: &[u8]) -> Result<DataKey> {
        let inner = &self.inner;
        if let Some(k) = inner.cache.get(wrapped, Instant::now()) {
            return Ok(k);
        }
        let gate = inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(wrapped.to_vec())
            .or_default()
            .clone();
        let mut guard = InflightGuard {
            inner,
            wrapped,
            gate: Some(gate.clone()),
            turn: None,
        };
        guard.turn = Some(gate.lock_owned().await);
        // Someone else may have unwrapped it while we waited (not counted twice as a miss).
        if inner.cache.contains(wrapped, Instant::now())
            && let Some(k) = inner.cache.get(wrapped, Instant::now())
        {
            return Ok(k);
        }
        inner.cache.record_miss();
        let request_id = new_request_id();
        inner.unwrap_calls.fetch_add(1, Ordering::Relaxed);
        let envelope = wrapped.to_vec();
        let context = self.context();
        let result = self
            .call("UnwrapKey", &request_id, |mut stub, req_id, timeout| {
                let mut req = tonic::Request::new(pb::UnwrapKeyRequest {
                    // No key name (the envelope names its version) and no broker AAD.
                    wrapped: Some(pb::unwrap_key_request::Wrapped::Envelope(envelope.clone())),
                    context: context.clone(),
                    ..Default::default()
                });
                decorate(&mut req, &req_id, timeout);
                async move { stub.unwrap_key(req).await }
            })
            .await;
        let mut resp = match result {
            Ok(r) => r,
            // The request is well-formed by construction: INVALID_ARGUMENT can only mean that
            // the envelope (part of the sealed data) is malformed or not authentic.
            Err(Error::Rpc {
                code: Code::InvalidArgument,
                ..
            }) => return Err(Error::Unauthentic),
            Err(e) => return Err(e),
        };
        let key = DataKey::take(&mut resp.plaintext).ok_or(Error::Unauthentic)?;
        inner.cache.insert(wrapped, key.clone(), Instant::now());
        Ok(key)
    }

    /// One broker call with a deadline per attempt and retries with backoff.
    async fn call<T, F, Fut>(&self, method: &'static str, request_id: &str, mut f: F) -> Result<T>
    where
        F: FnMut(KeyBrokerClient<Channel>, String, Duration) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let inner = &self.inner;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            inner.rpc_attempts.fetch_add(1, Ordering::Relaxed);
            let fut = f(
                inner.stub.clone(),
                request_id.to_string(),
                inner.call_timeout,
            );
            let status = match tokio::time::timeout(inner.call_timeout, fut).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => {
                    Status::deadline_exceeded(format!("no answer within {:?}", inner.call_timeout))
                }
            };
            if RetryPolicy::retryable(status.code()) && attempt < inner.retry.max_attempts {
                let delay = inner.retry.backoff(attempt, random_u64());
                tracing::debug!(method, request_id, attempt, code = ?status.code(), ?delay, "retrying keybroker call");
                inner.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                continue;
            }
            return Err(Error::Rpc {
                method,
                code: status.code(),
                message: status.message().to_string(),
                attempts: attempt,
            });
        }
    }
}

fn decorate<T>(req: &mut tonic::Request<T>, request_id: &str, timeout: Duration) {
    req.set_timeout(timeout);
    if let Ok(v) = MetadataValue::try_from(request_id) {
        req.metadata_mut().insert(REQUEST_ID_HEADER, v);
    }
}

/// Seals one message chunk by chunk (from [`Client::sealer`]). The concatenation of everything
/// `update` and `finish` return is the sealed message.
pub struct Sealer {
    enc: Encryptor,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer { .. }")
    }
}

impl Sealer {
    /// Takes more plaintext; returns sealed bytes that are ready to be written (the header
    /// first). Buffers at most one chunk.
    pub fn update(&mut self, plaintext: &[u8]) -> Result<Vec<u8>> {
        self.enc.update(plaintext)
    }

    /// Seals the last chunk and returns the final bytes. Without it the message is truncated
    /// and will not open.
    pub fn finish(self) -> Result<Vec<u8>> {
        self.enc.finish()
    }
}

enum OpenState {
    Header(Vec<u8>),
    Body(Box<Decryptor>),
    Failed,
}

/// Opens one message chunk by chunk (from [`Client::opener`]).
pub struct Opener {
    client: Client,
    aad: Vec<u8>,
    state: OpenState,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Opener { .. }")
    }
}

impl Opener {
    /// Takes more sealed bytes; returns the plaintext of every chunk completed and
    /// authenticated so far. That plaintext is not yet proof that the message is whole: act on
    /// it only after [`Opener::finish`] succeeds. After an error the opener refuses everything.
    pub async fn update(&mut self, sealed: &[u8]) -> Result<Vec<u8>> {
        let r = self.update_inner(sealed).await;
        if r.is_err() {
            self.state = OpenState::Failed;
        }
        r
    }

    async fn update_inner(&mut self, sealed: &[u8]) -> Result<Vec<u8>> {
        match &mut self.state {
            OpenState::Body(d) => d.update(sealed),
            OpenState::Failed => Err(Error::Unauthentic),
            OpenState::Header(buf) => {
                buf.extend_from_slice(sealed);
                let Some((header, used)) = Header::parse(buf)? else {
                    return Ok(Vec::new());
                };
                let rest = buf.split_off(used);
                let key = self.client.data_key(header.wrapped()).await?;
                let mut d = Decryptor::new(&key, &header, &self.aad);
                let out = d.update(&rest)?;
                self.state = OpenState::Body(Box::new(d));
                Ok(out)
            }
        }
    }

    /// Opens the last chunk. `Ok` proves the message was authentic and complete.
    pub fn finish(self) -> Result<Vec<u8>> {
        match self.state {
            OpenState::Body(d) => d.finish(),
            OpenState::Header(_) | OpenState::Failed => Err(Error::Unauthentic),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_equal_jitter_up_to_the_cap() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
        };
        for (retry, cap) in [
            (1, 100u64),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (30, 1000),
        ] {
            let lo = p.backoff(retry, 0);
            let hi = p.backoff(retry, u64::MAX);
            assert_eq!(lo, Duration::from_millis(cap / 2), "retry {retry}");
            assert!(
                hi <= Duration::from_millis(cap) && hi >= lo,
                "retry {retry}: {hi:?}"
            );
        }
        assert!(RetryPolicy::retryable(Code::Unavailable));
        assert!(RetryPolicy::retryable(Code::ResourceExhausted));
        assert!(!RetryPolicy::retryable(Code::InvalidArgument));
        assert!(!RetryPolicy::retryable(Code::DeadlineExceeded));
    }

    #[test]
    fn builder_refuses_bad_settings_and_keeps_the_key_out_of_debug() {
        let b = ClientBuilder::from_pem("https://localhost:1", "ca", "cert", "SECRET-KEY-PEM");
        assert!(!format!("{b:?}").contains("SECRET"));
        assert!(matches!(
            b.clone().chunk_size_log2(9).build(),
            Err(Error::Config(_))
        ));
        let no_retries = RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        };
        assert!(matches!(b.retry(no_retries).build(), Err(Error::Config(_))));
    }
}
