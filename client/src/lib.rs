//! Client SDK for keybroker: envelope encryption for calling services.
//!
//! [`Client::seal`] asks the broker for a fresh data encryption key (`GenerateDataKey`: drawn from
//! the HSM's RNG, returned once in the clear and wrapped under the key's newest version),
//! encrypts the data **locally** with AES-256-GCM, erases the DEK, and returns one self-contained
//! message: a small header carrying the wrapped DEK, then the data in authenticated chunks.
//! [`Client::open`] parses the header, has the broker unwrap the DEK (`UnwrapKey`; the envelope
//! names its key version, so this keeps working after any number of rotations), checks that the
//! key that unwrapped it is one the client accepts (below), and opens the chunks. Large inputs
//! stream: [`Client::sealer`] / [`Client::opener`] work chunk by chunk, and
//! [`Client::seal_stream`] / [`Client::open_stream`] connect them to `AsyncRead`/`AsyncWrite`.
//! The format and the chunk construction (STREAM: truncation, reordering and extension are
//! detected) are documented byte by byte in [`format`](mod@format).
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
//! .key("acme/payments")                   // seal under this key; open accepts only this key
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
//! # Envelope encryption authenticates the key, not the sender
//! A sealed message proves only that whoever made it held its DEK, and anyone who may call
//! `GenerateDataKey` (or `WrapKey`) under *some* key can make a DEK, seal any plaintext with any
//! AAD under it, and write the result where a reader will find it. What tells the reader's
//! messages from such a forgery is the key that wrapped the DEK: the forger cannot wrap under a
//! key it may not use. So the reader must check that key, and the check matters exactly when
//! the reader may unwrap under more than one key — a service that reads several tenants'
//! records, or a key shared by more parties than the one that should be writing — since then a
//! party who may seal under one of those keys can substitute its messages for another key's.
//!
//! So [`Client::open`] is **strict by default**, like the AWS Encryption SDK's strict mode: it
//! accepts a message only if its DEK was wrapped under a key the client names
//! ([`ClientBuilder::open_keys`] with [`OpenKeys::only`]; without it, the sealing key of
//! [`ClientBuilder::key`] alone), and refuses any other as [`Error::Unauthentic`]. With one
//! accepted key the broker is told which key to expect (`UnwrapKeyRequest.key`) and refuses an
//! envelope of another key itself, before it unwraps anything; with several, the client checks
//! the key the broker reports after the unwrap (so the broker has unwrapped, and audited, the
//! foreign DEK by then; the client erases it). A DEK in the cache is served only to an open that
//! accepts the key that unwrapped it. A client with neither a sealing key nor `open_keys`
//! refuses to open anything ([`Error::Config`]). [`Client::with_open_keys`] gives another view
//! of the same client (channel, cache) for a record whose expected key differs, e.g. per tenant.
//!
//! **Discovery mode** ([`OpenKeys::Discovery`]: any key the broker lets this identity unwrap
//! with) must be asked for explicitly. It is safe only where no one who may seal under any key
//! this identity may unwrap with could write the data it reads.
//!
//! The key is all that is authenticated: two writers who may both seal under the accepted key
//! cannot be told apart, and the AAD (bound in every chunk) is the place to bind *what* a
//! message is for (a record id, a tenant), so that a message cannot be moved to another record.
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
//! * [`format`](mod@format) — the sealed format and the chunked AES-256-GCM construction (no I/O).
//! * [`cache`] — the DEK cache.
//! * [`pinning`] — which keys an open accepts ([`OpenKeys`]).
//! * [`error`] — the one error type; every malformed or unauthentic input is
//!   [`Error::Unauthentic`].
//! * this module — the client: connection, retries, seal/open and the streaming API.

pub mod cache;
pub mod error;
pub mod format;
pub mod pinning;
pub mod sign;

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
    pinning::Accepted,
};
pub use keybroker_proto::v1::JustificationReason;

pub use crate::{
    cache::{CacheConfig, CacheStats},
    error::{Error, Result},
    format::DataKey,
    pinning::OpenKeys,
    sign::Signature,
};
pub use keybroker_proto::v1::SignatureAlgorithm;

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
    open_keys: Option<OpenKeys>,
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
            .field("open_keys", &self.open_keys)
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
            open_keys: None,
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

    /// The broker key (`tenant/name`) that [`Client::seal`] seals under. Unless
    /// [`ClientBuilder::open_keys`] says otherwise, it is also the one key [`Client::open`]
    /// accepts (strict mode).
    pub fn key(mut self, name: impl Into<String>) -> Self {
        self.key = Some(name.into());
        self
    }

    /// The broker keys [`Client::open`] accepts a message from (default: the sealing key of
    /// [`ClientBuilder::key`] alone). [`OpenKeys::only`] lists them (strict mode: e.g. the
    /// current key and the one it replaced); [`OpenKeys::Discovery`] accepts any key the broker
    /// lets this client unwrap with, which is safe only where nobody who may seal under another
    /// of those keys can write the data (see the crate docs).
    pub fn open_keys(mut self, keys: OpenKeys) -> Self {
        self.open_keys = Some(keys);
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

    /// The keys `open` will accept: strict by default (the sealing key alone); with neither a
    /// sealing key nor `open_keys`, none (and `open` refuses to guess).
    fn accepted(&self) -> Result<Option<Accepted>> {
        match (&self.open_keys, &self.key) {
            (Some(keys), _) => Accepted::new(keys).map(Some),
            (None, Some(key)) => Accepted::new(&OpenKeys::only([key.as_str()])).map(Some),
            (None, None) => Ok(None),
        }
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
        let accepted = self.accepted()?.map(Arc::new);
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
            accepted,
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
                public_keys: Mutex::new(HashMap::new()),
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
    /// The keys `open` accepts (`None`: none configured, so `open` refuses).
    accepted: Option<Arc<Accepted>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("key", &self.inner.key)
            .field("justification", &self.justification)
            .field("accepted", &self.accepted)
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
    /// Public keys of signing key versions, for local verification ([`Client::verify`]).
    public_keys: Mutex<HashMap<(String, u32), Arc<sign::PublicKey>>>,
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
            accepted: self.accepted.clone(),
        }
    }

    /// The same client (same channel, same DEK cache and counters, same justification) whose
    /// opens accept `keys` instead: for a service that reads records of several tenants or
    /// keys with one client and knows, per record, which key must have sealed it. A DEK the
    /// shared cache holds is served only to an open that accepts the key that unwrapped it.
    pub fn with_open_keys(&self, keys: OpenKeys) -> Result<Self> {
        Ok(Self {
            inner: self.inner.clone(),
            justification: self.justification.clone(),
            accepted: Some(Arc::new(Accepted::new(&keys)?)),
        })
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

    /// Opens a message made by [`Client::seal`] (or a [`Sealer`]) with the same `aad`, if its
    /// DEK was wrapped under a key this client accepts ([`ClientBuilder::open_keys`]; by default
    /// the sealing key). A message of any other key is [`Error::Unauthentic`], like any other
    /// forgery.
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
    /// however many opens ask for it at once), provided the key that unwrapped it is one this
    /// client accepts.
    async fn data_key(&self, wrapped: &[u8]) -> Result<DataKey> {
        let accepted = self.accepted.as_deref().ok_or_else(|| {
            Error::Config(
                "no key to open with: set ClientBuilder::key or ClientBuilder::open_keys".into(),
            )
        })?;
        let inner = &self.inner;
        if let Some(k) = inner
            .cache
            .get(wrapped, accepted, Instant::now())
            .served()?
        {
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
            && let Some(k) = inner
                .cache
                .get(wrapped, accepted, Instant::now())
                .served()?
        {
            return Ok(k);
        }
        inner.cache.record_miss();
        let request_id = new_request_id();
        inner.unwrap_calls.fetch_add(1, Ordering::Relaxed);
        let envelope = wrapped.to_vec();
        let context = self.context();
        // With one accepted key the broker checks it too, before it unwraps (an envelope of
        // another key is refused as unauthentic, like a forged one). Several keys do not fit the
        // request's one field: the client alone checks the key the broker reports.
        let expected = accepted.broker_key().unwrap_or_default().to_string();
        let result = self
            .call("UnwrapKey", &request_id, |mut stub, req_id, timeout| {
                let mut req = tonic::Request::new(pb::UnwrapKeyRequest {
                    key: expected.clone(),
                    // No broker AAD: the caller's AAD is bound locally, in every chunk.
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
        if !accepted.allows(&resp.key) {
            // Someone who may use another key this identity may unwrap with sealed this message
            // (or a broker answered without naming its key). Not cached: `key` is erased here.
            tracing::warn!(
                request_id,
                key = %resp.key,
                "refused a sealed message whose DEK is wrapped under a key this client does not accept"
            );
            return Err(Error::Unauthentic);
        }
        inner
            .cache
            .insert(wrapped, key.clone(), &resp.key, Instant::now());
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
        assert!(matches!(
            b.clone().retry(no_retries).build(),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            b.open_keys(OpenKeys::Only(vec![])).build(),
            Err(Error::Config(m)) if m.contains("at least one key")
        ));
    }

    #[test]
    fn open_accepts_the_sealing_key_alone_unless_open_keys_says_otherwise() {
        let b = ClientBuilder::from_pem("https://localhost:1", "ca", "cert", "key");
        assert_eq!(b.accepted().expect("valid"), None);
        let sealing = b.clone().key("acme/payments");
        assert_eq!(
            sealing.accepted().expect("valid"),
            Some(Accepted::new(&OpenKeys::only(["acme/payments"])).expect("keys"))
        );
        let both = sealing.open_keys(OpenKeys::only(["acme/payments", "acme/archive"]));
        let a = both.accepted().expect("valid").expect("keys");
        assert!(a.allows("acme/payments") && a.allows("acme/archive") && !a.allows("acme/x"));
        assert_eq!(
            b.clone()
                .open_keys(OpenKeys::Discovery)
                .accepted()
                .expect("valid"),
            Some(Accepted::Any)
        );
        assert!(matches!(
            b.key("bad name").accepted(),
            Err(Error::Config(_))
        ));
    }
}
