//! The Kubernetes KMS v2 plugin front door (`v2.KeyManagementService`: `Status`, `Encrypt`,
//! `Decrypt`), served on a unix socket for **one configured key** (`[kms_v2] key`): a codec
//! over the pipeline, like the gRPC services.
//!
//! kube-apiserver generates its own data encryption key (or, with KMSv2KDF, a seed) and asks the
//! plugin to encrypt those 32 bytes; it stores the ciphertext and the returned `key_id` beside
//! every object it encrypts, and calls `Decrypt` with both when it needs the key back. Here:
//! * `Encrypt` wraps the plaintext under the key's **newest version** (exactly `WrapKey`, with
//!   the fixed AAD [`KMS_AAD`] so these envelopes are bound to this use); the ciphertext is a
//!   keybroker envelope (79 bytes for an AES-256-GCM key, well under kube-apiserver's 1 KiB).
//! * `key_id` is [`key_id`]: `tenant/name:vN:<version id hex>`; it **changes on every rotation
//!   and is never reused**, so kube-apiserver knows which stored objects are stale and rewrites
//!   them.
//! * `Decrypt` unwraps with whichever version the envelope names (every version that still
//!   exists decrypts), and refuses — with the one unauthentic error — an envelope of another key
//!   or a `key_id` that is not the one its version produces.
//! * `Status` makes a **real HSM call** each time (the same probe as the health service) and
//!   answers `healthz: "ok"` only when it succeeds and the key is usable. It is a health poll:
//!   no key is used and it is not audited.
//! * `Encrypt` and `Decrypt` go through the pipeline like every other request: the caller
//!   (`unix:uid=N`, from the socket's peer credentials), the deadline (kube-apiserver's
//!   `grpc-timeout`, capped), the HYOK switch and justification when the peer is listed as a HYOK
//!   service identity (`[kms_v2] justification` gives the reason), and one audit record before
//!   the reply (op `KmsV2Encrypt`/`KmsV2Decrypt`, request id = kube-apiserver's `uid` when sane).
//!
//! # Trust
//! The socket is local trust: there is no TLS. The front door grants whoever can connect
//! `service-encryption-user` on the configured key and nothing else (on top of any binding the
//! policy file gives the peer's identity). The broker binds the socket under a temporary name,
//! sets its mode (`socket_mode`, default 0600), then renames it into place, so it is never
//! reachable with looser permissions; put it in a directory only kube-apiserver's user (and the
//! broker's) can enter, e.g. `/var/run/kmsplugin` mode 0700.

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use keybroker_proto::kms_v2::{
    self as pb,
    key_management_service_server::{KeyManagementService, KeyManagementServiceServer},
};
use tokio::net::UnixListener;
use tonic::{
    Request, Response, Status, metadata::MetadataValue, transport::server::UdsConnectInfo,
};

pub use super::ops::kms::{KMS_AAD, key_id};
use super::{
    grpc::REQUEST_ID_HEADER,
    ops::kms::{KmsDecrypt, KmsEncrypt},
    pipeline::{Context, Endpoint, Incoming, Pipeline, ReasonCode, Reply},
};
use crate::{
    identity::{Caller, IdentityKind},
    model::{Dek, KeyName},
    policy::{Binding, IdentityPattern, Reason, Role, Scope},
};

/// The gRPC service name (for metrics).
pub const SERVICE: &str = "v2.KeyManagementService";
/// The plugin API version reported by `Status`.
pub const API_VERSION: &str = "v2";

const STATUS: Endpoint = Endpoint {
    service: SERVICE,
    method: "Status",
    op: "KmsV2Status",
};
const ENCRYPT: Endpoint = Endpoint {
    service: SERVICE,
    method: "Encrypt",
    op: "KmsV2Encrypt",
};
const DECRYPT: Endpoint = Endpoint {
    service: SERVICE,
    method: "Decrypt",
    op: "KmsV2Decrypt",
};

/// The KMS v2 service for one key.
#[derive(Clone)]
pub struct KmsV2 {
    pipeline: Pipeline,
    key: KeyName,
    justification: Option<Reason>,
    probe_timeout: Duration,
}

impl KmsV2 {
    /// The service for `key`; every request carries `justification` (if set).
    pub fn new(
        pipeline: Pipeline,
        key: KeyName,
        justification: Option<Reason>,
        probe_timeout: Duration,
    ) -> Self {
        Self {
            pipeline,
            key,
            justification,
            probe_timeout,
        }
    }

    /// What the pipeline needs to know of a request: the peer, its deadline, kube-apiserver's
    /// uid as the request id, and the socket's own grant on the one key.
    fn incoming<T>(&self, endpoint: Endpoint, req: &Request<T>, uid: &str) -> Incoming {
        let caller = peer(req);
        let door = Binding {
            identity: IdentityPattern::exact(&caller),
            roles: vec![Role::ServiceEncryptionUser],
            scope: Scope::Key(self.key.to_string()),
            on_behalf_of: Vec::new(),
        };
        let mut incoming = Incoming::new(endpoint, Some(caller));
        incoming.request_id = Some(uid.to_string());
        incoming.timeout = req.metadata().get("grpc-timeout").and_then(|v| {
            v.to_str()
                .ok()
                .and_then(crate::api::grpc::parse_grpc_timeout)
        });
        incoming.door_grant = Some(door);
        incoming.key = Some(self.key.clone());
        incoming.context = self.justification.map(|r| Context {
            reason: ReasonCode::Known(r),
            ..Context::default()
        });
        incoming
    }
}

#[tonic::async_trait]
impl KeyManagementService for KmsV2 {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let (hsm, key) = self
            .pipeline
            .health(STATUS, Some(&self.key), self.probe_timeout)
            .await;
        let key_id = key.map(|(number, id)| key_id(&self.key, number, id));
        let healthz = match (&hsm, &key_id) {
            (Ok(()), Ok(_)) => "ok".to_string(),
            (Err(e), _) => format!("keybroker: HSM unavailable: {e}"),
            (Ok(()), Err(e)) => format!("keybroker: {e}"),
        };
        Ok(Response::new(pb::StatusResponse {
            version: API_VERSION.into(),
            healthz,
            key_id: key_id.unwrap_or_default(),
        }))
    }

    async fn encrypt(
        &self,
        req: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let incoming = self.incoming(ENCRYPT, &req, &req.get_ref().uid);
        let r = req.into_inner();
        let op = KmsEncrypt {
            key: self.key.clone(),
            plaintext: Dek::new(r.plaintext),
        };
        let reply = self.pipeline.execute(incoming, Ok(op)).await;
        respond(reply, |w| pb::EncryptResponse {
            key_id: key_id(&w.key, w.version, w.version_id),
            ciphertext: w.envelope,
            annotations: Default::default(),
        })
    }

    async fn decrypt(
        &self,
        req: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let incoming = self.incoming(DECRYPT, &req, &req.get_ref().uid);
        let r = req.into_inner();
        let op = KmsDecrypt {
            key: self.key.clone(),
            ciphertext: r.ciphertext,
            key_id: r.key_id,
        };
        let reply = self.pipeline.execute(incoming, Ok(op)).await;
        respond(reply, |dek| pb::DecryptResponse {
            plaintext: dek.into_vec(),
        })
    }
}

/// The reply, with its request id (as the gRPC door sends it: every pipeline reply has one).
fn respond<T, R>(reply: Reply<T>, encode: impl FnOnce(T) -> R) -> Result<Response<R>, Status> {
    let rid = MetadataValue::try_from(reply.request_id.as_str()).ok();
    let mut out = reply
        .result
        .map(|v| Response::new(encode(v)))
        .map_err(Status::from);
    if let Some(v) = rid {
        match &mut out {
            Ok(r) => r.metadata_mut().insert(REQUEST_ID_HEADER, v),
            Err(s) => s.metadata_mut().insert(REQUEST_ID_HEADER, v),
        };
    }
    out
}

/// The identity of a unix-socket peer: its uid from the kernel (`SO_PEERCRED`).
fn peer<T>(req: &Request<T>) -> Caller {
    let id = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| format!("unix:uid={}", c.uid()))
        .unwrap_or_else(|| "unix:unknown".into());
    Caller {
        id,
        kind: IdentityKind::Unix,
    }
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
    audit: crate::audit::AuditLog,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let r = tonic::transport::Server::builder()
        .layer(super::grpc::AuditRejections::kms_v2(audit))
        .add_service(
            KeyManagementServiceServer::new(svc)
                .max_decoding_message_size(super::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(super::MAX_MESSAGE_BYTES),
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
