//! The gRPC services. Each request: identity (from the connection, decided at the handshake) →
//! policy (role × scope, HYOK kill switch and justification) → keyring → convert → **audit
//! record written before the reply** (if it cannot be written, the request fails). Errors become
//! `tonic::Status` in one place ([`BrokerError`]'s `From` impl).
//!
//! Every request has a request id: the `request_id` of its `RequestContext`, else its
//! `x-request-id` metadata when that is sane (1-128 of `[A-Za-z0-9._:/-]`, see
//! [`sanitize_request_id`]), else a fresh UUID. It is in the audit record, in the request's log
//! line and in the span of everything logged while it runs, and is sent back in the reply's
//! `x-request-id`. Each request is also one observation in the Prometheus metrics.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use keybroker_proto::v1::{
    self as pb, audit_server::Audit, hyok_server::Hyok, key_broker_server::KeyBroker,
    key_management_server::KeyManagement, unwrap_key_request::Wrapped as PbWrapped,
};
use tonic::{Request, Response, Status, metadata::MetadataValue};
use tracing::Instrument;

use crate::{
    audit::{AuditLog, QueryFilter, Record},
    error::BrokerError,
    hsm::RequestScope,
    hyok::{HyokState, HyokSwitch},
    identity::Caller,
    keys::{AttributePatch, KeyEntry, KeyState, Keyring, Lifecycle, PublicKeyInfo, VersionEntry},
    metrics::Metrics,
    model::{
        Algorithm, DEFAULT_TENANT, Dek, KeyAttributes, KeyName, KeyOp, KeyType, validate_part,
    },
    policy::{Permission, Policy, PolicyHandle, Reason},
    tls::ConnInfo,
};

/// The data-plane service's full name.
pub const KEY_BROKER: &str = "keybroker.v1.KeyBroker";
/// The control-plane service's full name.
pub const KEY_MANAGEMENT: &str = "keybroker.v1.KeyManagement";
/// The audit service's full name.
pub const AUDIT: &str = "keybroker.v1.Audit";
/// The HYOK switch service's full name.
pub const HYOK: &str = "keybroker.v1.Hyok";
/// The metadata header carrying the request id (in both directions).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// A caller-supplied request id, if it is safe to log as is: 1-128 characters of
/// `[A-Za-z0-9._:/-]` (no spaces, quotes or control characters that could forge log fields).
pub fn sanitize_request_id(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b));
    ok.then(|| s.to_string())
}

/// The gRPC service and method of an audit op name (for metrics).
fn grpc_name(op: &'static str) -> (&'static str, &'static str) {
    match op {
        // The batch RPCs are on main's KeyBroker service (listed ahead of the merge).
        "WrapKey"
        | "UnwrapKey"
        | "GenerateDataKey"
        | "Rewrap"
        | "GetPublicKey"
        | "BatchWrapKey"
        | "BatchUnwrapKey"
        | "BatchGenerateDataKey" => (KEY_BROKER, op),
        "QueryAudit" => (AUDIT, op),
        "HyokDisconnect" => (HYOK, "Disconnect"),
        "HyokReconnect" => (HYOK, "Reconnect"),
        "HyokGetState" => (HYOK, "GetState"),
        _ => (KEY_MANAGEMENT, op),
    }
}

/// Every service over one keyring.
#[derive(Clone)]
pub struct Api {
    keyring: Arc<Keyring>,
    policy: Arc<PolicyHandle>,
    audit: AuditLog,
    hyok: Arc<HyokSwitch>,
    request_timeout: Duration,
    metrics: Option<Arc<Metrics>>,
}

/// The default for `[server] request_timeout_ms`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Parses a `grpc-timeout` header value (gRPC over HTTP/2: at most 8 digits and a unit).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// When the broker stops working on a request that has `timeout` to live: a little before the
/// caller's deadline, so that the answer (DEADLINE_EXCEEDED, audited) reaches the caller while
/// it still listens. A tenth of the time, at most 100 ms.
fn work_deadline(start: Instant, timeout: Duration) -> Instant {
    let margin = (timeout / 10).min(Duration::from_millis(100));
    start + timeout.saturating_sub(margin)
}

/// Runs a key change to completion (or rollback) in its own task, whatever happens to the
/// request: a caller that hangs up or times out must not leave a half-done change behind.
/// The request's scope (deadline, tenant) goes with it, so work not yet started when the
/// deadline passes is not started. If the request was answered (DEADLINE_EXCEEDED) or dropped
/// before the change finished, its outcome goes into the audit trail as its own event
/// (`KeyChangeFinishedLate`, same request id): the request's record alone would say it failed.
async fn detached<T, F>(audit: &AuditLog, ctx: &Ctx, op: &str, f: F) -> Result<T, BrokerError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, BrokerError>> + Send + 'static,
{
    struct Waiting(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Waiting {
        fn drop(&mut self) {
            self.0.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let scope = RequestScope::current().unwrap_or_default();
    let waiting = Waiting(Arc::new(std::sync::atomic::AtomicBool::new(true)));
    let still = waiting.0.clone();
    let audit = audit.clone();
    let (op, caller) = (op.to_string(), ctx.caller.id.clone());
    let (key, tenant, request_id) = {
        let f = ctx.fields();
        (f.key.clone(), f.tenant.clone(), f.request_id.clone())
    };
    let task = tokio::spawn(scope.run(async move {
        let r = f.await;
        if !still.load(std::sync::atomic::Ordering::SeqCst) {
            let message = match &r {
                Ok(_) => format!("{op} completed after its request was answered or dropped"),
                Err(e) => format!("{op} failed after its request was answered or dropped: {e}"),
            };
            let mut rec = Record::event("KeyChangeFinishedLate", Some(&caller), message);
            rec.key = key;
            rec.tenant = tenant;
            rec.request_id = request_id;
            rec.outcome = Some(if r.is_ok() { "OK" } else { "FAILED" }.into());
            if let Err(e) = audit.append(rec).await {
                tracing::error!(error = %e, op, "could not audit a key change that finished late");
            }
        }
        r
    }));
    let joined = task.await;
    drop(waiting);
    joined.map_err(|e| BrokerError::internal(format!("key change task failed: {e}")))?
}

/// What one request's audit record says, filled in as the request learns it.
#[derive(Default)]
struct Fields {
    key: Option<String>,
    tenant: Option<String>,
    version: Option<u32>,
    justification: Option<String>,
    justification_detail: Option<String>,
    request_id: Option<String>,
    correlation_id: Option<String>,
}

/// The request's verified caller and the policy in force when it arrived.
#[derive(Clone)]
struct Ctx {
    caller: Caller,
    scope: RequestScope,
    policy: Arc<Policy>,
    hyok: Arc<HyokSwitch>,
    fields: Arc<Mutex<Fields>>,
    reason: Arc<Mutex<Option<Reason>>>,
    /// Set once a HYOK service identity passed the kill switch: re-checked before replying.
    hyok_gated: Arc<std::sync::atomic::AtomicBool>,
}

fn check_id(what: &str, s: &str) -> Result<(), BrokerError> {
    if s.len() > 128 || s.chars().any(|c| c.is_control()) {
        return Err(BrokerError::invalid(format!(
            "{what} must be at most 128 printable characters"
        )));
    }
    Ok(())
}

impl Ctx {
    fn fields(&self) -> std::sync::MutexGuard<'_, Fields> {
        self.fields.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note_key(&self, key: &KeyName) {
        self.scope.set_tenant(key.tenant());
        let mut f = self.fields();
        f.key = Some(key.to_string());
        f.tenant = Some(key.tenant().to_string());
    }

    fn note_version(&self, v: u32) {
        self.fields().version = Some(v);
    }

    /// Takes the request context (ids, justification) into the audit record and the HYOK check.
    fn take_context(&self, c: Option<pb::RequestContext>) -> Result<(), BrokerError> {
        let Some(c) = c else { return Ok(()) };
        check_id("context.request_id", &c.request_id)?;
        check_id("context.correlation_id", &c.correlation_id)?;
        let mut f = self.fields();
        if !c.request_id.is_empty() {
            f.request_id = Some(c.request_id);
        }
        if !c.correlation_id.is_empty() {
            f.correlation_id = Some(c.correlation_id);
        }
        if let Some(j) = c.justification {
            if j.detail.chars().count() > 256 || j.detail.chars().any(|c| c.is_control()) {
                return Err(BrokerError::invalid(
                    "context.justification.detail must be at most 256 printable characters",
                ));
            }
            let reason = match j.reason {
                0 => None,
                v => Some(Reason::from_proto(v).ok_or_else(|| {
                    BrokerError::invalid(format!("unknown justification reason {v}"))
                })?),
            };
            f.justification = reason.map(|r| r.as_str().to_string());
            if !j.detail.is_empty() {
                f.justification_detail = Some(j.detail);
            }
            *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        }
        Ok(())
    }

    /// Checks `perm` on `key` (and, for key use by a HYOK service identity, the kill switch and
    /// the key's accepted justifications). Deny by default.
    fn authorize(&self, perm: Permission, key: &KeyName) -> Result<(), BrokerError> {
        self.note_key(key);
        self.check(perm, key)
    }

    /// [`Ctx::authorize`] without noting the key in the request's record (batch items have
    /// their own records).
    fn check(&self, perm: Permission, key: &KeyName) -> Result<(), BrokerError> {
        if !self.policy.allows(&self.caller, perm, key) {
            return Err(BrokerError::PermissionDenied(format!(
                "{} may not {perm} key {key}",
                self.caller
            )));
        }
        if matches!(perm, Permission::Wrap | Permission::Unwrap)
            && self.policy.is_hyok_service(&self.caller)
        {
            self.hyok_gated
                .store(true, std::sync::atomic::Ordering::SeqCst);
            if !self.hyok.connected() {
                return Err(BrokerError::PermissionDenied(
                    "the key owner has disconnected HYOK service access".into(),
                ));
            }
            let reason = *self.reason.lock().unwrap_or_else(|p| p.into_inner());
            self.policy
                .check_justification(key, reason)
                .map_err(BrokerError::PermissionDenied)?;
        }
        Ok(())
    }

    /// Checks a broker-wide permission (scope `all`).
    fn authorize_global(&self, perm: Permission) -> Result<(), BrokerError> {
        if !self.policy.allows_global(&self.caller, perm) {
            return Err(BrokerError::PermissionDenied(format!(
                "{} may not {perm}",
                self.caller
            )));
        }
        Ok(())
    }
}

pub(crate) fn code_name(c: tonic::Code) -> String {
    let s = format!("{c:?}");
    // InvalidArgument -> INVALID_ARGUMENT
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

impl Api {
    /// Builds the services.
    pub fn new(
        keyring: Arc<Keyring>,
        policy: Arc<PolicyHandle>,
        audit: AuditLog,
        hyok: Arc<HyokSwitch>,
    ) -> Self {
        Self {
            keyring,
            policy,
            audit,
            hyok,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            metrics: None,
        }
    }

    /// The longest a request may run when its caller sets no (or a longer) deadline.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Records every request in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Runs one request ([`Api::handle_inner`]), then counts it in the metrics and sends its
    /// request id back.
    async fn handle<Req, Resp, F, Fut>(
        &self,
        op: &'static str,
        req: Request<Req>,
        f: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(Ctx, Req) -> Fut,
        Fut: Future<Output = Result<Resp, BrokerError>>,
    {
        let start = Instant::now();
        let (result, request_id) = self.handle_inner(op, req, f).await;
        if let Some(m) = &self.metrics {
            let (service, method) = grpc_name(op);
            let code = match &result {
                Ok(_) => tonic::Code::Ok,
                Err(s) => s.code(),
            };
            m.observe_request(service, method, code, start.elapsed());
        }
        let rid = MetadataValue::try_from(request_id.as_str()).ok();
        match result {
            Ok(resp) => {
                let mut resp = Response::new(resp);
                if let Some(v) = rid {
                    resp.metadata_mut().insert(REQUEST_ID_HEADER, v);
                }
                Ok(resp)
            }
            Err(mut status) => {
                if let Some(v) = rid {
                    status.metadata_mut().insert(REQUEST_ID_HEADER, v);
                }
                Err(status)
            }
        }
    }

    /// Runs one request: identity and policy snapshot, the handler, the kill-switch re-check,
    /// then the audit record (before the reply) and one log line. Returns the result and the
    /// request id.
    async fn handle_inner<Req, Resp, F, Fut>(
        &self,
        op: &'static str,
        req: Request<Req>,
        f: F,
    ) -> (Result<Resp, Status>, String)
    where
        F: FnOnce(Ctx, Req) -> Fut,
        Fut: Future<Output = Result<Resp, BrokerError>>,
    {
        let start = Instant::now();
        let header_id = req
            .metadata()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(sanitize_request_id)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let Some(conn) = req.extensions().get::<ConnInfo>().cloned() else {
            return (
                Err(Status::permission_denied("no verified client identity")),
                header_id,
            );
        };
        // The deadline: the caller's (grpc-timeout), capped by [server] request_timeout_ms.
        // Enforced here rather than by tonic's timeout layer, which would drop the request
        // without an audit record; it also bounds every HSM wait below (RequestScope).
        let timeout = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or(self.request_timeout, |t| t.min(self.request_timeout));
        let deadline = work_deadline(start, timeout);
        let scope = RequestScope::new(Some(deadline));
        let span = tracing::info_span!("rpc", op, request_id = %header_id);
        let ctx = Ctx {
            caller: conn.caller.clone(),
            scope: scope.clone(),
            policy: self.policy.get(),
            hyok: self.hyok.clone(),
            fields: Arc::new(Mutex::new(Fields {
                request_id: Some(header_id.clone()),
                ..Default::default()
            })),
            reason: Arc::new(Mutex::new(None)),
            hyok_gated: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let mut result = if Instant::now() >= deadline {
            // Work whose deadline has already passed is not started.
            Err(BrokerError::DeadlineExceeded(
                "the request's deadline had passed when it arrived".into(),
            ))
        } else if ctx.policy.knows(&ctx.caller) {
            // With replicas, this replica's cache first catches up with every change made
            // through any of them (see `replica`).
            let keyring = self.keyring.clone();
            let call = f(ctx.clone(), req.into_inner());
            let work = scope.run(
                async move {
                    keyring.sync().await?;
                    call.await
                }
                .instrument(span),
            );
            match tokio::time::timeout_at(deadline.into(), work).await {
                Ok(r) => r,
                Err(_) => Err(BrokerError::DeadlineExceeded(
                    "the request's deadline passed before it was done".into(),
                )),
            }
        } else {
            Err(BrokerError::PermissionDenied(format!(
                "identity {} has no role on this broker",
                ctx.caller
            )))
        };
        // The kill switch may have been thrown while the HSM worked: nothing reaches a
        // disconnected service identity after Disconnect returned.
        if result.is_ok() && ctx.hyok_gated.load(std::sync::atomic::Ordering::SeqCst) {
            // With replicas, the switch may have been thrown through another one.
            if let Err(e) = self.keyring.sync_now().await {
                result = Err(e);
            } else if !self.hyok.connected() {
                result = Err(BrokerError::PermissionDenied(
                    "the key owner has disconnected HYOK service access".into(),
                ));
            }
        }
        let latency_us = start.elapsed().as_micros() as u64;
        let (code, message) = match &result {
            Ok(_) => (tonic::Code::Ok, None),
            Err(e) => (
                e.code(),
                Some(match e {
                    BrokerError::Internal(_) => "internal error".to_string(),
                    other => other.to_string(),
                }),
            ),
        };
        let mut rec = Record::request(op, &ctx.caller.id);
        {
            let mut f = ctx.fields();
            rec.key = f.key.take();
            rec.tenant = f.tenant.take();
            rec.version = f.version;
            rec.justification = f.justification.take();
            rec.justification_detail = f.justification_detail.take();
            rec.request_id = Some(f.request_id.take().unwrap_or(header_id));
            rec.correlation_id = f.correlation_id.take();
        }
        rec.outcome = Some(code_name(code));
        rec.message = message;
        rec.latency_us = Some(latency_us);
        let request_id = rec.request_id.clone().unwrap_or_default();
        let audit_start = Instant::now();
        let written = self.audit.append(rec).await;
        if let Some(m) = &self.metrics {
            m.observe_audit_write(audit_start.elapsed(), written.is_ok());
        }
        if let Err(e) = written {
            tracing::error!(op, caller = %ctx.caller, request_id, error = %e, "audit record not written: request refused");
            // The result (a DEK, perhaps) is dropped here, zeroized, never sent.
            return (
                Err(Status::unavailable(
                    "the audit trail cannot be written; the request was refused",
                )),
                request_id,
            );
        }
        match &result {
            Ok(_) => tracing::debug!(op, caller = %ctx.caller, request_id, latency_us, "ok"),
            Err(e) => {
                tracing::info!(op, caller = %ctx.caller, request_id, latency_us, code = ?e.code(), error = %e, "refused")
            }
        }
        (result.map_err(Status::from), request_id)
    }
}

fn key_name(s: &str) -> Result<KeyName, BrokerError> {
    KeyName::parse(s).map_err(|e| match e {
        BrokerError::InvalidArgument(m) => BrokerError::invalid(format!("key: {m}")),
        other => other,
    })
}

fn optional_key(s: &str) -> Result<Option<KeyName>, BrokerError> {
    if s.is_empty() {
        Ok(None)
    } else {
        key_name(s).map(Some)
    }
}

fn algorithm_to_pb(a: Algorithm) -> pb::Algorithm {
    match a {
        Algorithm::Aes256Gcm => pb::Algorithm::Aes256Gcm,
        Algorithm::AesKeyWrapPad => pb::Algorithm::AesKeyWrapPad,
        Algorithm::RsaOaepSha256 => pb::Algorithm::RsaOaepSha256,
        Algorithm::RsaOaepSha1 => pb::Algorithm::RsaOaepSha1,
    }
}

fn algorithm_from_pb(v: i32) -> Result<Option<Algorithm>, BrokerError> {
    match pb::Algorithm::try_from(v) {
        Ok(pb::Algorithm::Unspecified) => Ok(None),
        Ok(pb::Algorithm::Aes256Gcm) => Ok(Some(Algorithm::Aes256Gcm)),
        Ok(pb::Algorithm::AesKeyWrapPad) => Ok(Some(Algorithm::AesKeyWrapPad)),
        Ok(pb::Algorithm::RsaOaepSha256) => Ok(Some(Algorithm::RsaOaepSha256)),
        Ok(pb::Algorithm::RsaOaepSha1) => Ok(Some(Algorithm::RsaOaepSha1)),
        Err(_) => Err(BrokerError::invalid(format!("unknown algorithm {v}"))),
    }
}

fn key_type_to_pb(t: KeyType) -> pb::KeyType {
    match t {
        KeyType::Aes256 => pb::KeyType::Aes256,
        KeyType::Rsa2048 => pb::KeyType::Rsa2048,
        KeyType::Rsa3072 => pb::KeyType::Rsa3072,
        KeyType::Rsa4096 => pb::KeyType::Rsa4096,
    }
}

fn key_type_from_pb(v: i32) -> Result<KeyType, BrokerError> {
    match pb::KeyType::try_from(v) {
        Ok(pb::KeyType::Aes256) => Ok(KeyType::Aes256),
        Ok(pb::KeyType::Rsa2048) => Ok(KeyType::Rsa2048),
        Ok(pb::KeyType::Rsa3072) => Ok(KeyType::Rsa3072),
        Ok(pb::KeyType::Rsa4096) => Ok(KeyType::Rsa4096),
        Ok(pb::KeyType::Unspecified) => Err(BrokerError::invalid("key_type is required")),
        Err(_) => Err(BrokerError::invalid(format!("unknown key_type {v}"))),
    }
}

fn op_to_pb(o: KeyOp) -> pb::KeyOperation {
    match o {
        KeyOp::Wrap => pb::KeyOperation::Wrap,
        KeyOp::Unwrap => pb::KeyOperation::Unwrap,
        KeyOp::GenerateDataKey => pb::KeyOperation::GenerateDataKey,
        KeyOp::Rewrap => pb::KeyOperation::Rewrap,
    }
}

fn op_from_pb(v: i32) -> Result<KeyOp, BrokerError> {
    match pb::KeyOperation::try_from(v) {
        Ok(pb::KeyOperation::Wrap) => Ok(KeyOp::Wrap),
        Ok(pb::KeyOperation::Unwrap) => Ok(KeyOp::Unwrap),
        Ok(pb::KeyOperation::GenerateDataKey) => Ok(KeyOp::GenerateDataKey),
        Ok(pb::KeyOperation::Rewrap) => Ok(KeyOp::Rewrap),
        _ => Err(BrokerError::invalid(format!("unknown key operation {v}"))),
    }
}

fn opt_time(v: i64, what: &str) -> Result<Option<i64>, BrokerError> {
    match v {
        0 => Ok(None),
        v if v > 0 => Ok(Some(v)),
        _ => Err(BrokerError::invalid(format!("{what} must not be negative"))),
    }
}

fn attributes_to_pb(a: &KeyAttributes) -> pb::KeyAttributes {
    pb::KeyAttributes {
        enabled: Some(a.enabled),
        not_before_ms: a.not_before_ms.unwrap_or(0),
        expires_ms: a.expires_ms.unwrap_or(0),
        operations: Some(pb::KeyOperations {
            operations: a.operations.iter().map(|o| op_to_pb(*o).into()).collect(),
        }),
        tags: Some(pb::KeyTags {
            tags: a.tags.clone().into_iter().collect(),
        }),
        min_decryption_version: a.min_decryption_version,
        purge_protection: Some(a.purge_protection),
        rotation_period_ms: a.rotation_period_ms.unwrap_or(0),
        version_expiry_ms: a.version_expiry_ms.unwrap_or(0),
    }
}

/// Attributes for a new key: unset fields take their defaults.
fn attributes_from_pb(a: Option<pb::KeyAttributes>) -> Result<KeyAttributes, BrokerError> {
    let mut out = KeyAttributes::default();
    let Some(a) = a else { return Ok(out) };
    if let Some(e) = a.enabled {
        out.enabled = e;
    }
    out.not_before_ms = opt_time(a.not_before_ms, "not_before_ms")?;
    out.expires_ms = opt_time(a.expires_ms, "expires_ms")?;
    out.rotation_period_ms = opt_time(a.rotation_period_ms, "rotation_period_ms")?;
    out.version_expiry_ms = opt_time(a.version_expiry_ms, "version_expiry_ms")?;
    if let Some(ops) = a.operations {
        out.operations = ops
            .operations
            .into_iter()
            .map(op_from_pb)
            .collect::<Result<_, _>>()?;
    }
    if let Some(t) = a.tags {
        out.tags = t.tags.into_iter().collect();
    }
    if a.min_decryption_version > 1 {
        return Err(BrokerError::invalid(
            "a new key's min_decryption_version is 1",
        ));
    }
    if let Some(p) = a.purge_protection {
        out.purge_protection = p;
    }
    out.validate()?;
    Ok(out)
}

fn patch_from_pb(r: pb::UpdateKeyRequest) -> Result<AttributePatch, BrokerError> {
    let a = r.attributes.unwrap_or_default();
    Ok(AttributePatch {
        enabled: a.enabled,
        times: if r.set_times {
            Some((
                opt_time(a.not_before_ms, "not_before_ms")?,
                opt_time(a.expires_ms, "expires_ms")?,
                opt_time(a.rotation_period_ms, "rotation_period_ms")?,
                opt_time(a.version_expiry_ms, "version_expiry_ms")?,
            ))
        } else {
            if a.not_before_ms != 0
                || a.expires_ms != 0
                || a.rotation_period_ms != 0
                || a.version_expiry_ms != 0
            {
                return Err(BrokerError::invalid(
                    "set set_times to change not_before/expires/rotation_period/version_expiry",
                ));
            }
            None
        },
        operations: match a.operations {
            Some(ops) => Some(
                ops.operations
                    .into_iter()
                    .map(op_from_pb)
                    .collect::<Result<_, _>>()?,
            ),
            None => None,
        },
        tags: a.tags.map(|t| t.tags.into_iter().collect()),
        min_decryption_version: (a.min_decryption_version != 0).then_some(a.min_decryption_version),
        purge_protection: a.purge_protection,
    })
}

impl Api {
    fn key_to_pb(&self, k: &KeyEntry) -> pb::Key {
        pb::Key {
            name: k.name.to_string(),
            tenant: k.name.tenant().to_string(),
            key_type: key_type_to_pb(k.key_type).into(),
            algorithm: algorithm_to_pb(k.algorithm).into(),
            state: match (&k.lifecycle, &k.state) {
                (Lifecycle::Deleted { .. }, _) => pb::KeyState::Deleted,
                (_, KeyState::Quarantined(_)) => pb::KeyState::Quarantined,
                _ if !k.attributes.enabled => pb::KeyState::Disabled,
                _ => pb::KeyState::Enabled,
            }
            .into(),
            created_at_ms: k.created_at_ms,
            current_version: k.versions.last().map(|v| v.number).unwrap_or(0),
            versions: k
                .versions
                .iter()
                .map(|v| self.version_to_pb(k, v))
                .collect(),
            mechanism: self
                .keyring
                .hsm()
                .capabilities()
                .mechanism_name(k.algorithm),
            attributes: Some(attributes_to_pb(&k.attributes)),
            updated_at_ms: k.updated_at_ms,
        }
    }

    fn version_to_pb(&self, k: &KeyEntry, v: &VersionEntry) -> pb::KeyVersion {
        use std::sync::atomic::Ordering::Relaxed;
        let u = self.keyring.usage(v.id);
        pb::KeyVersion {
            version: v.number,
            id: v.id.as_bytes().to_vec(),
            created_at_ms: v.created_at_ms,
            origin: v.origin.as_str().into(),
            expires_ms: v.expires_ms.unwrap_or(0),
            decryptable: k.decryptable(v),
            wraps: u.as_ref().map(|u| u.wraps.load(Relaxed)).unwrap_or(0),
            unwraps: u.as_ref().map(|u| u.unwraps.load(Relaxed)).unwrap_or(0),
            last_used_ms: u
                .as_ref()
                .map(|u| u.last_used_ms.load(Relaxed))
                .unwrap_or(0),
        }
    }

    fn deleted_to_pb(&self, k: &KeyEntry) -> pb::DeletedKey {
        let (deleted_at_ms, scheduled_purge_ms, deleted_by) = match &k.lifecycle {
            Lifecycle::Deleted {
                deleted_at_ms,
                purge_at_ms,
                deleted_by,
            } => (*deleted_at_ms, *purge_at_ms, deleted_by.clone()),
            Lifecycle::Active => (0, 0, String::new()),
        };
        pb::DeletedKey {
            key: Some(self.key_to_pb(k)),
            deleted_at_ms,
            scheduled_purge_ms,
            deleted_by,
        }
    }
}

/// rsaEncryption (RFC 8017 appendix C).
const RSA_ENCRYPTION: spki::ObjectIdentifier =
    spki::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// Encodes an RSA public key as SPKI PEM and as a JWK.
pub fn public_key_formats(pk: &PublicKeyInfo) -> Result<(String, String), BrokerError> {
    use spki::der::{Encode, asn1::BitStringRef, pem::LineEnding};
    let strip = |b: &[u8]| -> Vec<u8> {
        let i = b
            .iter()
            .position(|&x| x != 0)
            .unwrap_or(b.len().saturating_sub(1));
        b[i..].to_vec()
    };
    let (n, e) = (strip(&pk.modulus), strip(&pk.exponent));
    let bad = |what: &str, err: &dyn std::fmt::Display| {
        BrokerError::internal(format!("encode public key ({what}): {err}"))
    };
    let rsa = pkcs1::RsaPublicKey {
        modulus: pkcs1::UintRef::new(&n).map_err(|x| bad("modulus", &x))?,
        public_exponent: pkcs1::UintRef::new(&e).map_err(|x| bad("exponent", &x))?,
    };
    let rsa_der = rsa.to_der().map_err(|x| bad("PKCS#1", &x))?;
    let spki = spki::SubjectPublicKeyInfoRef {
        algorithm: spki::AlgorithmIdentifierRef {
            oid: RSA_ENCRYPTION,
            parameters: Some(spki::der::asn1::AnyRef::NULL),
        },
        subject_public_key: BitStringRef::from_bytes(&rsa_der)
            .map_err(|x| bad("bit string", &x))?,
    };
    let der = spki.to_der().map_err(|x| bad("SPKI", &x))?;
    let pem = spki::der::pem::encode_string("PUBLIC KEY", LineEnding::LF, &der)
        .map_err(|x| bad("PEM", &x))?;
    let jwk = serde_json::json!({
        "kty": "RSA",
        "n": URL_SAFE_NO_PAD.encode(&n),
        "e": URL_SAFE_NO_PAD.encode(&e),
        "alg": if pk.algorithm == Algorithm::RsaOaepSha1 { "RSA-OAEP" } else { "RSA-OAEP-256" },
        "use": "enc",
        "kid": pk.version_id.hex(),
    });
    Ok((pem, jwk.to_string()))
}

#[tonic::async_trait]
impl KeyBroker for Api {
    async fn batch_wrap_key(
        &self,
        req: Request<pb::BatchWrapKeyRequest>,
    ) -> Result<Response<pb::BatchWrapKeyResponse>, Status> {
        self.handle("BatchWrapKey", req, |ctx, r| async move {
            ctx.take_context(r.context)?;
            check_batch_size(r.items.len())?;
            let names: Vec<String> = r.items.iter().map(|i| i.key.clone()).collect();
            let items = r
                .items
                .into_iter()
                .map(|i| key_name(&i.key).map(|k| (k, Dek::new(i.plaintext), i.aad)))
                .collect();
            let authorize = |k: &KeyName| ctx.check(Permission::Wrap, k);
            let results = self.keyring.wrap_batch(items, &authorize).await;
            self.audit_items(
                &ctx,
                "BatchWrapKey",
                &names,
                results.iter().map(|r| r.as_ref().map(|w| w.version)),
            )
            .await?;
            Ok(pb::BatchWrapKeyResponse {
                results: results
                    .into_iter()
                    .map(|r| pb::WrapKeyResult {
                        result: Some(match r {
                            Ok(w) => pb::wrap_key_result::Result::Ok(pb::WrapKeyResponse {
                                wrapped_key: w.envelope,
                                key: w.key.to_string(),
                                key_version: w.version,
                                algorithm: algorithm_to_pb(w.algorithm).into(),
                            }),
                            Err(e) => pb::wrap_key_result::Result::Error(item_error(&e)),
                        }),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn batch_unwrap_key(
        &self,
        req: Request<pb::BatchUnwrapKeyRequest>,
    ) -> Result<Response<pb::BatchUnwrapKeyResponse>, Status> {
        self.handle("BatchUnwrapKey", req, |ctx, r| async move {
            ctx.take_context(r.context)?;
            check_batch_size(r.items.len())?;
            let names: Vec<String> = r.items.iter().map(|i| i.key.clone()).collect();
            let items = r
                .items
                .into_iter()
                .map(|i| match i.wrapped {
                    Some(PbWrapped::Envelope(env)) => optional_key(&i.key).map(|k| (k, env, i.aad)),
                    Some(PbWrapped::Raw(_)) => Err(BrokerError::invalid(
                        "raw ciphertexts are not supported in batches; use UnwrapKey",
                    )),
                    None => Err(BrokerError::invalid("set envelope")),
                })
                .collect();
            let authorize = |k: &KeyName| ctx.check(Permission::Unwrap, k);
            let results = self.keyring.unwrap_batch(items, &authorize).await;
            let names: Vec<String> = names
                .into_iter()
                .zip(&results)
                .map(|(n, r)| match r {
                    Ok(u) => u.key.to_string(),
                    Err(_) => n,
                })
                .collect();
            self.audit_items(
                &ctx,
                "BatchUnwrapKey",
                &names,
                results.iter().map(|r| r.as_ref().map(|u| u.version)),
            )
            .await?;
            Ok(pb::BatchUnwrapKeyResponse {
                results: results
                    .into_iter()
                    .map(|r| pb::UnwrapKeyResult {
                        result: Some(match r {
                            Ok(u) => pb::unwrap_key_result::Result::Ok(pb::UnwrapKeyResponse {
                                key: u.key.to_string(),
                                key_version: u.version,
                                algorithm: algorithm_to_pb(u.algorithm).into(),
                                plaintext: u.dek.into_vec(),
                            }),
                            Err(e) => pb::unwrap_key_result::Result::Error(item_error(&e)),
                        }),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn batch_generate_data_key(
        &self,
        req: Request<pb::BatchGenerateDataKeyRequest>,
    ) -> Result<Response<pb::BatchGenerateDataKeyResponse>, Status> {
        self.handle("BatchGenerateDataKey", req, |ctx, r| async move {
            ctx.take_context(r.context)?;
            check_batch_size(r.items.len())?;
            let names: Vec<String> = r.items.iter().map(|i| i.key.clone()).collect();
            let items = r
                .items
                .into_iter()
                .map(|i| {
                    key_name(&i.key)
                        .map(|k| (k, usize::try_from(i.length).unwrap_or(usize::MAX), i.aad))
                })
                .collect();
            let authorize = |k: &KeyName| ctx.check(Permission::Wrap, k);
            let results = self.keyring.generate_batch(items, &authorize).await;
            self.audit_items(
                &ctx,
                "BatchGenerateDataKey",
                &names,
                results.iter().map(|r| r.as_ref().map(|w| w.1.version)),
            )
            .await?;
            Ok(pb::BatchGenerateDataKeyResponse {
                results: results
                    .into_iter()
                    .map(|r| pb::GenerateDataKeyResult {
                        result: Some(match r {
                            Ok((dek, w)) => pb::generate_data_key_result::Result::Ok(
                                pb::GenerateDataKeyResponse {
                                    plaintext: dek.into_vec(),
                                    wrapped_key: w.envelope,
                                    key: w.key.to_string(),
                                    key_version: w.version,
                                    algorithm: algorithm_to_pb(w.algorithm).into(),
                                },
                            ),
                            Err(e) => pb::generate_data_key_result::Result::Error(item_error(&e)),
                        }),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn wrap_key(
        &self,
        req: Request<pb::WrapKeyRequest>,
    ) -> Result<Response<pb::WrapKeyResponse>, Status> {
        self.handle("WrapKey", req, |ctx, r| async move {
            ctx.take_context(r.context)?;
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::Wrap, &name)?;
            let w = self
                .keyring
                .wrap(&name, Dek::new(r.plaintext), &r.aad)
                .await?;
            ctx.note_version(w.version);
            Ok(pb::WrapKeyResponse {
                wrapped_key: w.envelope,
                key: w.key.to_string(),
                key_version: w.version,
                algorithm: algorithm_to_pb(w.algorithm).into(),
            })
        })
        .await
    }

    async fn unwrap_key(
        &self,
        req: Request<pb::UnwrapKeyRequest>,
    ) -> Result<Response<pb::UnwrapKeyResponse>, Status> {
        self.handle("UnwrapKey", req, |ctx, r| async move {
            ctx.take_context(r.context)?;
            let u = match r.wrapped {
                Some(PbWrapped::Envelope(env)) => {
                    let expected = optional_key(&r.key)?;
                    if let Some(k) = &expected {
                        ctx.authorize(Permission::Unwrap, k)?;
                    }
                    self.keyring
                        .unwrap(expected.as_ref(), &env, &r.aad, |k| {
                            ctx.authorize(Permission::Unwrap, k)
                        })
                        .await?
                }
                Some(PbWrapped::Raw(raw)) => {
                    if r.key.is_empty() {
                        return Err(BrokerError::invalid(
                            "key is required with a raw ciphertext",
                        ));
                    }
                    if !r.aad.is_empty() {
                        return Err(BrokerError::invalid(
                            "a raw RSA-OAEP ciphertext cannot carry aad",
                        ));
                    }
                    let name = key_name(&r.key)?;
                    ctx.authorize(Permission::Unwrap, &name)?;
                    let alg = algorithm_from_pb(raw.algorithm)?
                        .ok_or_else(|| BrokerError::invalid("raw.algorithm is required"))?;
                    self.keyring
                        .unwrap_raw(&name, raw.key_version, alg, &raw.ciphertext)
                        .await?
                }
                None => return Err(BrokerError::invalid("set envelope or raw")),
            };
            ctx.note_version(u.version);
            Ok(pb::UnwrapKeyResponse {
                plaintext: u.dek.into_vec(),
                key: u.key.to_string(),
                key_version: u.version,
                algorithm: algorithm_to_pb(u.algorithm).into(),
            })
        })
        .await
    }

    async fn generate_data_key(
        &self,
        req: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        self.handle("GenerateDataKey", req, |ctx, r| async move {
            ctx.take_context(r.context)?;
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::Wrap, &name)?;
            let len = usize::try_from(r.length).unwrap_or(usize::MAX);
            let (dek, w) = self.keyring.generate_data_key(&name, len, &r.aad).await?;
            ctx.note_version(w.version);
            Ok(pb::GenerateDataKeyResponse {
                plaintext: dek.into_vec(),
                wrapped_key: w.envelope,
                key: w.key.to_string(),
                key_version: w.version,
                algorithm: algorithm_to_pb(w.algorithm).into(),
            })
        })
        .await
    }

    async fn rewrap(
        &self,
        req: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        self.handle("Rewrap", req, |ctx, r| async move {
            ctx.take_context(r.context)?;
            let expected = optional_key(&r.key)?;
            if let Some(k) = &expected {
                ctx.authorize(Permission::Unwrap, k)?;
            }
            let dest = optional_key(&r.destination_key)?;
            let new_aad = if r.change_aad {
                Some(r.new_aad.as_slice())
            } else {
                None
            };
            let (w, src_version) = self
                .keyring
                .rewrap(
                    expected.as_ref(),
                    &r.envelope,
                    &r.aad,
                    dest.as_ref(),
                    new_aad,
                    |k| ctx.authorize(Permission::Unwrap, k),
                    |k| ctx.authorize(Permission::Wrap, k),
                )
                .await?;
            ctx.note_version(w.version);
            Ok(pb::RewrapResponse {
                wrapped_key: w.envelope,
                key: w.key.to_string(),
                key_version: w.version,
                algorithm: algorithm_to_pb(w.algorithm).into(),
                source_key_version: src_version,
            })
        })
        .await
    }

    async fn get_public_key(
        &self,
        req: Request<pb::GetPublicKeyRequest>,
    ) -> Result<Response<pb::GetPublicKeyResponse>, Status> {
        self.handle("GetPublicKey", req, |ctx, r| async move {
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::ReadMetadata, &name)?;
            let pk = self.keyring.public_key(&name, r.key_version).await?;
            ctx.note_version(pk.version);
            let (spki_pem, jwk) = public_key_formats(&pk)?;
            Ok(pb::GetPublicKeyResponse {
                key: pk.key.to_string(),
                key_version: pk.version,
                algorithm: algorithm_to_pb(pk.algorithm).into(),
                spki_pem,
                jwk,
                key_version_id: pk.version_id.as_bytes().to_vec(),
            })
        })
        .await
    }
}

#[tonic::async_trait]
impl KeyManagement for Api {
    async fn create_key(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.handle("CreateKey", req, |ctx, r| async move {
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::Create, &name)?;
            let key_type = key_type_from_pb(r.key_type)?;
            let alg = algorithm_from_pb(r.algorithm)?;
            let attrs = attributes_from_pb(r.attributes)?;
            let kr = self.keyring.clone();
            let k = detached(&self.audit, &ctx, "CreateKey", async move {
                kr.create(name, key_type, alg, attrs).await
            })
            .await?;
            ctx.note_version(1);
            Ok(self.key_to_pb(&k))
        })
        .await
    }

    async fn get_key(&self, req: Request<pb::GetKeyRequest>) -> Result<Response<pb::Key>, Status> {
        self.handle("GetKey", req, |ctx, r| async move {
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::ReadMetadata, &name)?;
            let k = self.keyring.get_live(&name)?;
            Ok(self.key_to_pb(&k))
        })
        .await
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.handle("ListKeys", req, |ctx, r| async move {
            let tenant = if r.tenant.is_empty() {
                DEFAULT_TENANT.to_string()
            } else {
                r.tenant
            };
            validate_part("tenant", &tenant)?;
            ctx.fields().tenant = Some(tenant.clone());
            if !ctx
                .policy
                .allows_in_tenant(&ctx.caller, Permission::ReadMetadata, &tenant)
            {
                return Err(BrokerError::PermissionDenied(format!(
                    "{} may not read metadata in tenant {tenant}",
                    ctx.caller
                )));
            }
            let limit = match r.page_size {
                0 => 100,
                n @ 1..=1000 => n as usize,
                n => {
                    return Err(BrokerError::invalid(format!(
                        "page_size {n} is more than 1000"
                    )));
                }
            };
            let after = if r.page_token.is_empty() {
                None
            } else {
                validate_part("page_token", &r.page_token)?;
                Some(r.page_token.as_str())
            };
            let (keys, next) = self.keyring.list(&tenant, after, limit);
            Ok(pb::ListKeysResponse {
                keys: keys
                    .iter()
                    .filter(|k| {
                        ctx.policy
                            .allows(&ctx.caller, Permission::ReadMetadata, &k.name)
                    })
                    .map(|k| self.key_to_pb(k))
                    .collect(),
                next_page_token: next.unwrap_or_default(),
            })
        })
        .await
    }

    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.handle("RotateKey", req, |ctx, r| async move {
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::Rotate, &name)?;
            let (kr, n) = (self.keyring.clone(), name.clone());
            let k = detached(&self.audit, &ctx, "RotateKey", async move {
                kr.rotate(&n).await
            })
            .await?;
            ctx.note_version(k.versions.last().map(|v| v.number).unwrap_or(0));
            Ok(self.key_to_pb(&k))
        })
        .await
    }

    async fn update_key(
        &self,
        req: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.handle("UpdateKey", req, |ctx, r| async move {
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::Update, &name)?;
            let patch = patch_from_pb(r)?;
            let (kr, n) = (self.keyring.clone(), name.clone());
            let k = detached(&self.audit, &ctx, "UpdateKey", async move {
                kr.update(&n, patch).await
            })
            .await?;
            Ok(self.key_to_pb(&k))
        })
        .await
    }

    async fn list_key_versions(
        &self,
        req: Request<pb::ListKeyVersionsRequest>,
    ) -> Result<Response<pb::ListKeyVersionsResponse>, Status> {
        self.handle("ListKeyVersions", req, |ctx, r| async move {
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::ReadMetadata, &name)?;
            let k = self.keyring.get_live(&name)?;
            Ok(pb::ListKeyVersionsResponse {
                versions: k
                    .versions
                    .iter()
                    .map(|v| self.version_to_pb(&k, v))
                    .collect(),
                min_decryption_version: k.attributes.min_decryption_version,
            })
        })
        .await
    }

    async fn trim_key_versions(
        &self,
        req: Request<pb::TrimKeyVersionsRequest>,
    ) -> Result<Response<pb::TrimKeyVersionsResponse>, Status> {
        self.handle("TrimKeyVersions", req, |ctx, r| async move {
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::TrimVersions, &name)?;
            let (kr, n, by) = (self.keyring.clone(), name.clone(), ctx.caller.id.clone());
            let (destroyed, k) = detached(&self.audit, &ctx, "TrimKeyVersions", async move {
                kr.trim(&n, &by).await
            })
            .await?;
            Ok(pb::TrimKeyVersionsResponse {
                destroyed_versions: destroyed,
                key: Some(self.key_to_pb(&k)),
            })
        })
        .await
    }

    async fn delete_key(
        &self,
        req: Request<pb::DeleteKeyRequest>,
    ) -> Result<Response<pb::DeletedKey>, Status> {
        self.handle("DeleteKey", req, |ctx, r| async move {
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::Delete, &name)?;
            let (kr, n, by) = (self.keyring.clone(), name.clone(), ctx.caller.id.clone());
            let k = detached(&self.audit, &ctx, "DeleteKey", async move {
                kr.delete(&n, &by).await
            })
            .await?;
            Ok(self.deleted_to_pb(&k))
        })
        .await
    }

    async fn list_deleted_keys(
        &self,
        req: Request<pb::ListDeletedKeysRequest>,
    ) -> Result<Response<pb::ListDeletedKeysResponse>, Status> {
        self.handle("ListDeletedKeys", req, |ctx, r| async move {
            let tenant = if r.tenant.is_empty() {
                DEFAULT_TENANT.to_string()
            } else {
                r.tenant
            };
            validate_part("tenant", &tenant)?;
            ctx.fields().tenant = Some(tenant.clone());
            if !ctx
                .policy
                .allows_in_tenant(&ctx.caller, Permission::ReadMetadata, &tenant)
            {
                return Err(BrokerError::PermissionDenied(format!(
                    "{} may not read metadata in tenant {tenant}",
                    ctx.caller
                )));
            }
            Ok(pb::ListDeletedKeysResponse {
                keys: self
                    .keyring
                    .list_deleted(&tenant)
                    .iter()
                    .filter(|k| {
                        ctx.policy
                            .allows(&ctx.caller, Permission::ReadMetadata, &k.name)
                    })
                    .map(|k| self.deleted_to_pb(k))
                    .collect(),
            })
        })
        .await
    }

    async fn get_deleted_key(
        &self,
        req: Request<pb::GetDeletedKeyRequest>,
    ) -> Result<Response<pb::DeletedKey>, Status> {
        self.handle("GetDeletedKey", req, |ctx, r| async move {
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::ReadMetadata, &name)?;
            let k = self.keyring.get_deleted(&name)?;
            Ok(self.deleted_to_pb(&k))
        })
        .await
    }

    async fn recover_key(
        &self,
        req: Request<pb::RecoverKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.handle("RecoverKey", req, |ctx, r| async move {
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::Recover, &name)?;
            let (kr, n) = (self.keyring.clone(), name.clone());
            let k = detached(&self.audit, &ctx, "RecoverKey", async move {
                kr.recover(&n).await
            })
            .await?;
            Ok(self.key_to_pb(&k))
        })
        .await
    }

    async fn purge_key(
        &self,
        req: Request<pb::PurgeKeyRequest>,
    ) -> Result<Response<pb::PurgeReceipt>, Status> {
        self.handle("PurgeKey", req, |ctx, r| async move {
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::Purge, &name)?;
            let (kr, n, by) = (self.keyring.clone(), name.clone(), ctx.caller.id.clone());
            let rc = detached(&self.audit, &ctx, "PurgeKey", async move {
                kr.purge(&n, &by).await
            })
            .await?;
            Ok(pb::PurgeReceipt {
                key: rc.key,
                versions: rc.versions,
                object_ids: rc.object_ids,
                objects_destroyed: rc.objects_destroyed as u32,
                purged_at_ms: rc.at_ms,
                purged_by: rc.by,
            })
        })
        .await
    }

    async fn create_import_key(
        &self,
        req: Request<pb::CreateImportKeyRequest>,
    ) -> Result<Response<pb::ImportKeyInfo>, Status> {
        self.handle("CreateImportKey", req, |ctx, r| async move {
            // An import key is not bound to a key name: creating one needs import rights
            // somewhere (scope all).
            ctx.authorize_global(Permission::Import)?;
            let kt = if r.key_type == 0 {
                KeyType::Rsa3072
            } else {
                key_type_from_pb(r.key_type)?
            };
            let kr = self.keyring.clone();
            let info = detached(&self.audit, &ctx, "CreateImportKey", async move {
                kr.create_import_key(kt).await
            })
            .await?;
            let pk = PublicKeyInfo {
                key: KeyName::parse("byok/import")
                    .map_err(|e| BrokerError::internal(e.to_string()))?,
                version: 0,
                version_id: info.id,
                algorithm: info.oaep,
                modulus: info.public.modulus,
                exponent: info.public.exponent,
            };
            let (spki_pem, _) = public_key_formats(&pk)?;
            Ok(pb::ImportKeyInfo {
                import_key_id: info.id.hex(),
                spki_pem,
                oaep: algorithm_to_pb(info.oaep).into(),
                expires_ms: info.expires_ms,
            })
        })
        .await
    }

    async fn import_key(
        &self,
        req: Request<pb::ImportKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.handle("ImportKey", req, |ctx, r| async move {
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::Import, &name)?;
            let kt = if r.key_type == 0 {
                KeyType::Aes256
            } else {
                key_type_from_pb(r.key_type)?
            };
            if kt != KeyType::Aes256 {
                return Err(BrokerError::invalid("ImportKey takes AES_256 key material"));
            }
            if r.wrapped_material.len() > 4096 {
                return Err(BrokerError::invalid(
                    "wrapped_material is larger than 4096 bytes",
                ));
            }
            let alg = algorithm_from_pb(r.algorithm)?;
            let attrs = attributes_from_pb(r.attributes)?;
            let (kr, import_id, material) =
                (self.keyring.clone(), r.import_key_id, r.wrapped_material);
            let k = detached(&self.audit, &ctx, "ImportKey", async move {
                kr.import(name, alg, attrs, &import_id, material).await
            })
            .await?;
            ctx.note_version(1);
            Ok(self.key_to_pb(&k))
        })
        .await
    }

    async fn backup_key(
        &self,
        req: Request<pb::BackupKeyRequest>,
    ) -> Result<Response<pb::BackupKeyResponse>, Status> {
        self.handle("BackupKey", req, |ctx, r| async move {
            let name = key_name(&r.key)?;
            ctx.authorize(Permission::Backup, &name)?;
            let (kr, by) = (self.keyring.clone(), ctx.caller.id.clone());
            let made = detached(&self.audit, &ctx, "BackupKey", async move {
                kr.backup(&name, &by).await
            })
            .await?;
            Ok(pb::BackupKeyResponse {
                backup: made.blob,
                domain_id: made.domain.hex(),
                versions: made.versions as u32,
            })
        })
        .await
    }

    async fn restore_key(
        &self,
        req: Request<pb::RestoreKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.handle("RestoreKey", req, |ctx, r| async move {
            // The name is read before the blob is verified only to authorise the caller; the
            // restore itself uses nothing the domain's MAC does not cover.
            let name = crate::keys::claimed_name(&r.backup)?;
            ctx.authorize(Permission::Restore, &name)?;
            let kr = self.keyring.clone();
            let k = detached(&self.audit, &ctx, "RestoreKey", async move {
                kr.restore(&r.backup).await
            })
            .await?;
            Ok(self.key_to_pb(&k))
        })
        .await
    }
}

#[tonic::async_trait]
impl Audit for Api {
    async fn query_audit(
        &self,
        req: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<pb::QueryAuditResponse>, Status> {
        self.handle("QueryAudit", req, |ctx, r| async move {
            let global = ctx.policy.allows_global(&ctx.caller, Permission::ReadAudit);
            if !global
                && !ctx.policy.bindings.iter().any(|b| {
                    crate::policy::glob(&b.identity, &ctx.caller.id)
                        && b.roles
                            .iter()
                            .any(|role| role.permissions().contains(&Permission::ReadAudit))
                })
            {
                return Err(BrokerError::PermissionDenied(format!(
                    "{} may not read audit",
                    ctx.caller
                )));
            }
            let limit = match r.page_size {
                0 => 100,
                n @ 1..=1000 => n as usize,
                n => {
                    return Err(BrokerError::invalid(format!(
                        "page_size {n} is more than 1000"
                    )));
                }
            };
            let after = if r.page_token.is_empty() {
                0
            } else {
                r.page_token
                    .parse::<u64>()
                    .map_err(|_| BrokerError::invalid("page_token is not one this broker issued"))?
            };
            let opt = |s: String| if s.is_empty() { None } else { Some(s) };
            let filter = QueryFilter {
                since_ms: (r.since_ms > 0).then_some(r.since_ms),
                until_ms: (r.until_ms > 0).then_some(r.until_ms),
                key: opt(r.key),
                caller: opt(r.caller),
                outcome: opt(r.outcome),
            };
            let path = self.audit.path().to_path_buf();
            let policy = ctx.policy.clone();
            let caller = ctx.caller.clone();
            let (records, next) = tokio::task::spawn_blocking(move || {
                crate::audit::query(&path, &filter, after, limit, |rec| {
                    global
                        || rec
                            .key
                            .as_deref()
                            .and_then(|k| KeyName::parse(k).ok())
                            .is_some_and(|k| policy.allows(&caller, Permission::ReadAudit, &k))
                })
            })
            .await
            .map_err(|e| BrokerError::internal(e.to_string()))?
            .map_err(BrokerError::Unavailable)?;
            Ok(pb::QueryAuditResponse {
                records,
                next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
            })
        })
        .await
    }
}

fn check_batch_size(n: usize) -> Result<(), BrokerError> {
    if n == 0 || n > crate::keys::MAX_BATCH {
        return Err(BrokerError::invalid(format!(
            "a batch has 1 to {} items, not {n}",
            crate::keys::MAX_BATCH
        )));
    }
    Ok(())
}

fn item_error(e: &BrokerError) -> pb::ItemError {
    let message = match e {
        BrokerError::Internal(detail) => {
            tracing::error!(detail = %detail, "internal error in a batch item");
            "internal error (logged by the broker)".to_string()
        }
        other => other.to_string(),
    };
    pb::ItemError {
        code: e.code() as i32,
        message,
    }
}

impl Api {
    /// One audit record per batch item (written together, before the reply).
    async fn audit_items<'a>(
        &self,
        ctx: &Ctx,
        op: &str,
        keys: &[String],
        outcomes: impl Iterator<Item = Result<u32, &'a BrokerError>>,
    ) -> Result<(), BrokerError> {
        let (base_id, just, detail, corr) = {
            let f = ctx.fields();
            (
                f.request_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                f.justification.clone(),
                f.justification_detail.clone(),
                f.correlation_id.clone(),
            )
        };
        let recs = outcomes
            .zip(keys)
            .enumerate()
            .map(|(i, (o, key))| {
                let mut rec = Record::request(op, &ctx.caller.id);
                rec.key = Some(key.clone()).filter(|k| !k.is_empty());
                rec.tenant = rec
                    .key
                    .as_deref()
                    .and_then(|k| KeyName::parse(k).ok())
                    .map(|k| k.tenant().to_string());
                match o {
                    Ok(v) => {
                        rec.version = Some(v);
                        rec.outcome = Some("OK".into());
                    }
                    Err(e) => {
                        rec.outcome = Some(code_name(e.code()));
                        rec.message = Some(match e {
                            BrokerError::Internal(_) => "internal error".into(),
                            other => other.to_string(),
                        });
                    }
                }
                rec.justification = just.clone();
                rec.justification_detail = detail.clone();
                rec.correlation_id = corr.clone();
                rec.request_id = Some(format!("{base_id}#{i}"));
                rec
            })
            .collect();
        self.audit.append_many(recs).await.map_err(|e| {
            BrokerError::Unavailable(format!(
                "the audit trail cannot be written; the request was refused ({e})"
            ))
        })
    }
}

fn hyok_to_pb(s: HyokState) -> pb::HyokState {
    pb::HyokState {
        connected: s.connected,
        changed_at_ms: s.changed_at_ms,
        changed_by: s.changed_by,
        reason: s.reason,
    }
}

impl Api {
    async fn switch(
        &self,
        connected: bool,
        op: &'static str,
        req: Request<pb::HyokSwitchRequest>,
    ) -> Result<Response<pb::HyokState>, Status> {
        self.handle(op, req, |ctx, r| async move {
            ctx.authorize_global(Permission::HyokControl)?;
            if r.reason.chars().count() > 256 || r.reason.chars().any(|c| c.is_control()) {
                return Err(BrokerError::invalid("reason must be at most 256 printable characters"));
            }
            let s = self.hyok.set(connected, &ctx.caller.id, &r.reason).await?;
            tracing::warn!(connected, by = %ctx.caller, reason = %r.reason, "HYOK service access switched");
            Ok(hyok_to_pb(s))
        })
        .await
    }
}

#[tonic::async_trait]
impl Hyok for Api {
    async fn disconnect(
        &self,
        req: Request<pb::HyokSwitchRequest>,
    ) -> Result<Response<pb::HyokState>, Status> {
        self.switch(false, "HyokDisconnect", req).await
    }

    async fn reconnect(
        &self,
        req: Request<pb::HyokSwitchRequest>,
    ) -> Result<Response<pb::HyokState>, Status> {
        self.switch(true, "HyokReconnect", req).await
    }

    async fn get_state(
        &self,
        req: Request<pb::GetHyokStateRequest>,
    ) -> Result<Response<pb::HyokState>, Status> {
        self.handle("HyokGetState", req, |ctx, _r| async move {
            ctx.authorize_global(Permission::HyokControl)?;
            Ok(hyok_to_pb(self.hyok.state()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_headers_parse_by_unit_and_bad_ones_are_ignored() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("1n"), Some(Duration::from_nanos(1)));
        for bad in ["", "m", "10", "10x", "-1S", "123456789S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_broker_stops_a_little_before_the_callers_deadline() {
        let t0 = Instant::now();
        assert_eq!(
            work_deadline(t0, Duration::from_secs(1)),
            t0 + Duration::from_millis(900)
        );
        assert_eq!(
            work_deadline(t0, Duration::from_secs(30)),
            t0 + Duration::from_millis(29_900)
        );
        assert_eq!(
            work_deadline(t0, Duration::from_nanos(1)),
            t0 + Duration::from_nanos(1)
        );
    }

    #[test]
    fn request_ids_are_kept_only_when_safe_to_log() {
        assert_eq!(sanitize_request_id("kbc-0a1b").as_deref(), Some("kbc-0a1b"));
        assert_eq!(
            sanitize_request_id("a1b2c3d4-e5f6:trace/7.x").as_deref(),
            Some("a1b2c3d4-e5f6:trace/7.x")
        );
        for bad in [
            "",
            "has space",
            "new\nline",
            "quote\"",
            "x=y",
            "ü",
            &"a".repeat(129),
        ] {
            assert_eq!(sanitize_request_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn audit_ops_map_to_grpc_names() {
        assert_eq!(grpc_name("WrapKey"), (KEY_BROKER, "WrapKey"));
        assert_eq!(grpc_name("BatchUnwrapKey"), (KEY_BROKER, "BatchUnwrapKey"));
        assert_eq!(grpc_name("PurgeKey"), (KEY_MANAGEMENT, "PurgeKey"));
        assert_eq!(grpc_name("QueryAudit"), (AUDIT, "QueryAudit"));
        assert_eq!(grpc_name("HyokDisconnect"), (HYOK, "Disconnect"));
    }
}
