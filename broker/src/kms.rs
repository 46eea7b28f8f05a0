//! The Kubernetes KMS v2 plugin API (`v2.KeyManagementService`: `Status`, `Encrypt`,
//! `Decrypt`), served on a unix socket for **one configured key** (`[kms_v2] key`).
//!
//! kube-apiserver generates its own data encryption key (or, with KMSv2KDF, a seed) and asks the
//! plugin to encrypt those 32 bytes; it stores the ciphertext and the returned `key_id` beside
//! every object it encrypts, and calls `Decrypt` with both when it needs the key back. Here:
//! * `Encrypt` wraps the plaintext under the key's **newest version** (exactly `WrapKey`, with
//!   the fixed AAD [`KMS_AAD`] so these envelopes are bound to this use); the ciphertext is a
//!   keybroker envelope (79 bytes for an AES-256-GCM key, well under kube-apiserver's 1 KiB).
//! * `key_id` is [`key_id`]: `tenant/name:vN:<version id hex>`. The version id is the version's
//!   random 16-byte id (its HSM object's `CKA_ID`), so the key id **changes on every rotation and
//!   is never reused**, not even by a key deleted and created again under the same name. When it
//!   changes, kube-apiserver knows which stored objects are stale and rewrites them.
//! * `Decrypt` unwraps with whichever version the envelope names (every version that still
//!   exists decrypts), and refuses — with the one unauthentic error — an envelope of another key
//!   or a `key_id` that is not the one its version produces.
//! * `Status` makes a **real HSM call** each time (the same probe as the health service) and
//!   answers `healthz: "ok"` only when it succeeds and the key is usable.
//! * Every `Encrypt` and `Decrypt`, allowed or refused, leaves one audit record before the reply
//!   (op `KmsV2Encrypt`/`KmsV2Decrypt`, caller `unix:uid=N` from the socket's peer credentials,
//!   request id = kube-apiserver's `uid` when sane); no record, no reply. `Status` is a health
//!   poll and is not audited.
//!
//! # Trust
//! The socket is local trust: there is no TLS and no client identity; whoever can connect to
//! the socket can encrypt and decrypt with the configured key. The broker binds it under a
//! temporary name, sets its mode (`socket_mode`, default 0600), then renames it into place, so it
//! is never reachable with looser permissions; put it in a directory only kube-apiserver's user
//! (and the broker's) can enter, e.g. `/var/run/kmsplugin` mode 0700. The broker's access list
//! and (later) roles do not apply to this socket.

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use keybroker_proto::kms_v2::{
    self as pb,
    key_management_service_server::{KeyManagementService, KeyManagementServiceServer},
};
use tokio::net::UnixListener;
use tonic::{Request, Response, Status, transport::server::UdsConnectInfo};
use tracing::Instrument;

use crate::{
    audit::{AuditLog, Record},
    error::BrokerError,
    health,
    keys::{KeyState, Keyring, VersionEntry},
    metrics::Metrics,
    model::{Dek, KeyName, KeyOp, now_ms},
    service::{code_name, sanitize_request_id},
};

/// The AAD every KMS v2 envelope is bound to.
pub const KMS_AAD: &[u8] = b"keybroker:k8s-kms-v2";
/// The gRPC service name (for metrics).
pub const SERVICE: &str = "v2.KeyManagementService";
/// The plugin API version reported by `Status`.
pub const API_VERSION: &str = "v2";

/// The `key_id` of a key version: `tenant/name:vN:<32 hex digits of the version id>`.
pub fn key_id(name: &KeyName, v: &VersionEntry) -> String {
    format!("{name}:v{}:{}", v.number, v.id.hex())
}

/// The KMS v2 service for one key.
#[derive(Clone)]
pub struct KmsV2 {
    keyring: Arc<Keyring>,
    key: KeyName,
    audit: AuditLog,
    metrics: Option<Arc<Metrics>>,
    probe_timeout: Duration,
}

impl KmsV2 {
    /// The service for `key`.
    pub fn new(
        keyring: Arc<Keyring>,
        key: KeyName,
        audit: AuditLog,
        metrics: Option<Arc<Metrics>>,
        probe_timeout: Duration,
    ) -> Self {
        Self {
            keyring,
            key,
            audit,
            metrics,
            probe_timeout,
        }
    }

    /// The key id of the version that wraps now, or why there is none.
    fn current_key_id(&self) -> Result<String, String> {
        let entry = self
            .keyring
            .get(&self.key)
            .map_err(|_| format!("key {} does not exist", self.key))?;
        if let KeyState::Quarantined(_) = entry.state {
            return Err(format!(
                "key {} is quarantined (see the broker log)",
                self.key
            ));
        }
        let v = entry.current().map_err(|e| e.to_string())?;
        // Disabled, deleted or expired: Encrypt would fail, so the plugin is not healthy.
        entry
            .check(KeyOp::Wrap, v, now_ms())
            .map_err(|e| e.to_string())?;
        Ok(key_id(&self.key, v))
    }

    /// The key id of version `number` of the configured key.
    fn key_id_of(&self, number: u32) -> Result<String, BrokerError> {
        let entry = self.keyring.get(&self.key)?;
        let v = entry
            .version(number)
            .ok_or_else(|| BrokerError::internal(format!("version {number} vanished")))?;
        Ok(key_id(&self.key, v))
    }

    /// Runs one request: the handler, then (for `caller: Some`) the audit record before the
    /// reply, one log line and one metrics observation. The handler returns the key version it
    /// used, for the audit record.
    async fn handle<Resp, Fut>(
        &self,
        method: &'static str,
        caller: Option<String>,
        uid: &str,
        fut: Fut,
    ) -> Result<Response<Resp>, Status>
    where
        Fut: std::future::Future<Output = Result<(Resp, Option<u32>), BrokerError>>,
    {
        let start = Instant::now();
        let request_id =
            sanitize_request_id(uid).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let span = tracing::info_span!("kms_v2", method, request_id = %request_id);
        // With replicas, catch up with changes made through the others first.
        let result = match self.keyring.sync().await {
            Ok(()) => fut.instrument(span).await,
            Err(e) => Err(e),
        };
        let micros = start.elapsed().as_micros() as u64;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.code(),
        };
        if let Some(caller) = caller {
            let mut rec = Record::request(&format!("KmsV2{method}"), &caller);
            rec.key = Some(self.key.to_string());
            rec.tenant = Some(self.key.tenant().to_string());
            rec.version = result.as_ref().ok().and_then(|r| r.1);
            rec.outcome = Some(code_name(code));
            rec.message = result.as_ref().err().map(|e| match e {
                BrokerError::Internal(_) => "internal error".to_string(),
                other => other.to_string(),
            });
            rec.request_id = Some(request_id.clone());
            rec.latency_us = Some(micros);
            let audit_start = Instant::now();
            let written = self.audit.append(rec).await;
            if let Some(m) = &self.metrics {
                m.observe_audit_write(audit_start.elapsed(), written.is_ok());
            }
            if let Err(e) = written {
                tracing::error!(method, request_id = %request_id, error = %e, "audit record not written: kms-v2 request refused");
                if let Some(m) = &self.metrics {
                    m.observe_request(SERVICE, method, tonic::Code::Unavailable, start.elapsed());
                }
                // The result (a DEK, perhaps) is dropped here, zeroized, never sent.
                return Err(Status::unavailable(
                    "the audit trail cannot be written; the request was refused",
                ));
            }
        }
        let result = result.map(|r| r.0);
        match &result {
            Ok(_) => tracing::debug!(method, request_id = %request_id, micros, "kms-v2 ok"),
            Err(e) => {
                tracing::info!(method, request_id = %request_id, micros, code = ?e.code(), error = %e, "kms-v2 refused")
            }
        }
        if let Some(m) = &self.metrics {
            m.observe_request(SERVICE, method, code, start.elapsed());
        }
        result.map(Response::new).map_err(Status::from)
    }
}

#[tonic::async_trait]
impl KeyManagementService for KmsV2 {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.handle("Status", None, "", async {
            let hsm = self.keyring.hsm().clone();
            let probe = || {
                let hsm = hsm.clone();
                async move { hsm.ping().await.map_err(|e| e.to_string()) }
            };
            let healthz = health::probe_once(&probe, self.probe_timeout).await;
            let key_id = self.current_key_id();
            let healthz = match (&healthz, &key_id) {
                (Ok(()), Ok(_)) => "ok".to_string(),
                (Err(e), _) => format!("keybroker: HSM unavailable: {e}"),
                (Ok(()), Err(e)) => format!("keybroker: {e}"),
            };
            Ok((
                pb::StatusResponse {
                    version: API_VERSION.into(),
                    healthz,
                    key_id: key_id.unwrap_or_default(),
                },
                None,
            ))
        })
        .await
    }

    async fn encrypt(
        &self,
        req: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let caller = peer(&req);
        let r = req.into_inner();
        let uid = r.uid.clone();
        self.handle("Encrypt", Some(caller), &uid, async move {
            let w = self
                .keyring
                .wrap(&self.key, Dek::new(r.plaintext), KMS_AAD)
                .await?;
            Ok((
                pb::EncryptResponse {
                    ciphertext: w.envelope,
                    key_id: self.key_id_of(w.version)?,
                    annotations: Default::default(),
                },
                Some(w.version),
            ))
        })
        .await
    }

    async fn decrypt(
        &self,
        req: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let caller = peer(&req);
        let r = req.into_inner();
        let uid = r.uid.clone();
        self.handle("Decrypt", Some(caller), &uid, async move {
            if r.ciphertext.is_empty() {
                return Err(BrokerError::invalid("ciphertext is empty"));
            }
            let u = self
                .keyring
                // The envelope must belong to the configured key (checked by `expected`); the
                // socket is local trust, so there is no further policy decision to make.
                .unwrap(Some(&self.key), &r.ciphertext, KMS_AAD, |_| Ok(()))
                .await?;
            if self.key_id_of(u.version)? != r.key_id {
                // The DEK is dropped (and zeroized) unreturned.
                return Err(BrokerError::Unauthentic);
            }
            let version = u.version;
            Ok((
                pb::DecryptResponse {
                    plaintext: u.dek.into_vec(),
                },
                Some(version),
            ))
        })
        .await
    }
}

/// The audit identity of a unix-socket peer: its uid from the kernel (`SO_PEERCRED`).
fn peer<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| format!("unix:uid={}", c.uid()))
        .unwrap_or_else(|| "unix:unknown".into())
}

/// Binds the socket at `path` with `mode`, never exposing it with looser permissions: bind under
/// a temporary name in the same directory, chmod, rename into place. A stale socket (nobody
/// answering) is replaced; a live one, or anything that is not a socket, is an error.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "kms_v2.socket {}: another process is serving on it",
                    path.display()
                ));
            }
        }
        Ok(_) => {
            return Err(format!(
                "kms_v2.socket {} exists and is not a socket",
                path.display()
            ));
        }
        Err(_) => {}
    }
    let file = path
        .file_name()
        .ok_or_else(|| format!("kms_v2.socket {} has no file name", path.display()))?;
    let tmp: PathBuf = path.with_file_name(format!(
        ".{}.{}.tmp",
        file.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)
        .map_err(|e| format!("kms_v2.socket: cannot bind {}: {e}", tmp.display()))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("kms_v2.socket {}: {e}", path.display()));
    }
    Ok(listener)
}

/// Serves the KMS v2 API on `listener` until `shutdown` completes, then removes the socket.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    svc: KmsV2,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let r = tonic::transport::Server::builder()
        .add_service(
            KeyManagementServiceServer::new(svc)
                .max_decoding_message_size(crate::server::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(crate::server::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(|e| format!("kms-v2 server failed: {e}"));
    let _ = std::fs::remove_file(&path);
    r
}
