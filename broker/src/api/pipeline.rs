//! The one request pipeline every front door calls.
//!
//! ```text
//! front door (codec)      Incoming + Operation (decoded, or why not)
//!        │
//!        ▼
//! Pipeline::execute ─ request id ─ caller ─ deadline (the caller's, capped) ─ any role at all?
//!        │            ─ replica sync ─ request context (ids, justification)
//!        ▼
//! Operation::run(&mut Call) ─ Call::authorize: role × scope, HYOK switch, justification → Grant
//!        │                  ─ the keyring acts only on Grants
//!        ▼
//! HYOK switch checked again (a service identity's reply) ─ audit record(s), written before the
//!        │ reply (none written: the request fails) ─ log line ─ metrics
//!        ▼
//! Reply { result, request_id } ─ back through the front door's codec
//! ```
//!
//! A front door cannot skip a step: it never holds the keyring, the policy or the audit trail.
//! It can only describe a request ([`Incoming`]) and the operation it asks for (a type of
//! [`super::ops`], which a front door cannot define: the trait is sealed), and take the
//! [`Reply`]. The operation receives a [`Call`], the only way to the keys, and the keyring
//! acts only on a [`Grant`] that [`Call::authorize`] made.
//!
//! Every request has a request id: the `request_id` of its context, else the one its front door
//! read from the wire (the `x-request-id` header, kube-apiserver's `uid`) when that is sane (1-128
//! of `[A-Za-z0-9._:/-]`, see [`sanitize_request_id`]), else a fresh UUID. It is in the audit
//! record, in the request's log line and in the span of everything logged while it runs, and the
//! front door sends it back.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::Instrument;

use crate::{
    audit::{AuditLog, Record},
    error::{BrokerError, Deadline, Denied, Invalid, Unavailable},
    hsm::RequestScope,
    hyok::HyokSwitch,
    identity::Caller,
    keys::Keyring,
    metrics::Metrics,
    model::{KeyName, VersionId},
    policy::{Authorizer, Binding, Grant, Permission, PolicyHandle, Reason, Upstream},
};

use super::ops::Operation;

/// The default for `[server] request_timeout_ms`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a request came in, for metrics and the audit trail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The service (the gRPC service's full name, or the front door's).
    pub service: &'static str,
    /// The method.
    pub method: &'static str,
    /// The operation's name in the audit trail (`WrapKey`, `KmsV2Encrypt`, ...).
    pub op: &'static str,
}

/// A justification reason as a front door read it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReasonCode {
    /// None given.
    #[default]
    None,
    /// A known reason.
    Known(Reason),
    /// A value this broker does not know (refused as INVALID_ARGUMENT).
    Unknown(i32),
}

/// The request context a caller may send with a request (validated by the pipeline).
#[derive(Clone, Debug, Default)]
pub struct Context {
    /// The caller's request id (empty: none).
    pub request_id: String,
    /// The caller's correlation id (empty: none).
    pub correlation_id: String,
    /// The access justification's reason.
    pub reason: ReasonCode,
    /// The justification's free text.
    pub detail: String,
    /// The cloud request this request serves, as a cloud front door reports it (an XKS
    /// request's `requestMetadata`): into the audit record, and to the policy.
    pub upstream: Option<Upstream>,
}

/// What a front door knows of a request besides the operation it asks for.
#[derive(Debug)]
pub struct Incoming {
    /// Where it came in.
    pub endpoint: Endpoint,
    /// The verified caller (`None`: refused).
    pub caller: Option<Caller>,
    /// The request id read from the wire, unchecked.
    pub request_id: Option<String>,
    /// The caller's deadline, if it set one (capped by `[server] request_timeout_ms`).
    pub timeout: Option<Duration>,
    /// The request context, if the wire format carries one.
    pub context: Option<Context>,
    /// A binding the front door grants every caller it lets in (the Kubernetes KMS v2
    /// socket: local trust on its one key), in addition to the policy's.
    pub door_grant: Option<Binding>,
}

impl Incoming {
    /// A request at `endpoint` from `caller`, with nothing else known yet.
    pub fn new(endpoint: Endpoint, caller: Option<Caller>) -> Self {
        Self {
            endpoint,
            caller,
            request_id: None,
            timeout: None,
            context: None,
            door_grant: None,
        }
    }
}

/// What the pipeline answers: the operation's result (or why it failed) and the request id.
#[derive(Debug)]
pub struct Reply<T> {
    /// The result.
    pub result: Result<T, BrokerError>,
    /// The request's id (send it back to the caller).
    pub request_id: String,
}

/// The pipeline: every front door's one way to the keys.
#[derive(Clone)]
pub struct Pipeline {
    shared: Arc<Shared>,
}

struct Shared {
    keys: Arc<Keyring>,
    policy: Arc<PolicyHandle>,
    audit: AuditLog,
    hyok: Arc<HyokSwitch>,
    request_timeout: Duration,
    metrics: Option<Arc<Metrics>>,
}

/// A caller-supplied request id, if it is safe to log as is: 1-128 characters of
/// `[A-Za-z0-9._:/-]` (no spaces, quotes or control characters that could forge log fields).
pub fn sanitize_request_id(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b));
    ok.then(|| s.to_string())
}

/// When the broker stops working on a request that has `timeout` to live: a little before the
/// caller's deadline, so that the answer (DEADLINE_EXCEEDED, audited) reaches the caller while
/// it still listens. A tenth of the time, at most 100 ms.
fn work_deadline(start: Instant, timeout: Duration) -> Instant {
    let margin = (timeout / 10).min(Duration::from_millis(100));
    start + timeout.saturating_sub(margin)
}

fn check_id(what: &'static str, s: &str) -> Result<(), BrokerError> {
    if s.len() > 128 || s.chars().any(|c| c.is_control()) {
        return Err(Invalid::Text { what, max: 128 }.into());
    }
    Ok(())
}

/// The outcome's name in the audit trail: `OK`, `INVALID_ARGUMENT`, ...
pub fn outcome_name(result: Result<(), &BrokerError>) -> String {
    let c = match result {
        Ok(()) => tonic::Code::Ok,
        Err(e) => e.code(),
    };
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

impl Pipeline {
    /// The pipeline over one keyring.
    pub fn new(
        keys: Arc<Keyring>,
        policy: Arc<PolicyHandle>,
        audit: AuditLog,
        hyok: Arc<HyokSwitch>,
        request_timeout: Duration,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                keys,
                policy,
                audit,
                hyok,
                request_timeout,
                metrics,
            }),
        }
    }

    /// Runs one request through every step (see the module docs). `op` is the operation the
    /// front door decoded, or why it could not (refused, audited, like any other failure).
    pub async fn execute<O: Operation>(
        &self,
        incoming: Incoming,
        op: Result<O, BrokerError>,
    ) -> Reply<O::Output> {
        let start = Instant::now();
        let endpoint = incoming.endpoint;
        let reply = self.run(incoming, op, start).await;
        if let Some(m) = &self.shared.metrics {
            let code = match &reply.result {
                Ok(_) => tonic::Code::Ok,
                Err(e) => e.code(),
            };
            m.observe_request(endpoint.service, endpoint.method, code, start.elapsed());
        }
        reply
    }

    async fn run<O: Operation>(
        &self,
        incoming: Incoming,
        op: Result<O, BrokerError>,
        start: Instant,
    ) -> Reply<O::Output> {
        let sh = &self.shared;
        let Incoming {
            endpoint,
            caller,
            request_id,
            timeout,
            context,
            door_grant,
        } = incoming;
        let header_id = request_id
            .as_deref()
            .and_then(sanitize_request_id)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let Some(caller) = caller else {
            return Reply {
                result: Err(Denied::NoIdentity.into()),
                request_id: header_id,
            };
        };
        // The deadline: the caller's, capped by [server] request_timeout_ms. Enforced here so
        // that a request that runs out of time is answered DEADLINE_EXCEEDED *and audited*; it
        // also bounds every HSM wait below (RequestScope).
        let timeout = timeout.map_or(sh.request_timeout, |t| t.min(sh.request_timeout));
        let deadline = work_deadline(start, timeout);
        let scope = RequestScope::new(Some(deadline));
        let span = tracing::info_span!("rpc", op = endpoint.op, request_id = %header_id);
        let mut call = Call {
            keys: sh.keys.clone(),
            audit: sh.audit.clone(),
            hyok: sh.hyok.clone(),
            authority: Authorizer::new(sh.policy.get(), caller, door_grant, sh.hyok.clone()),
            op: endpoint.op,
            scope: scope.clone(),
            record: Notes {
                request_id: Some(header_id.clone()),
                ..Notes::default()
            },
            items: Vec::new(),
        };
        let mut result = if Instant::now() >= deadline {
            // Work whose deadline has already passed is not started.
            Err(Deadline::OnArrival.into())
        } else if call.authority.knows() {
            let keys = sh.keys.clone();
            let call_ref = &mut call;
            let work = scope.run(
                async move {
                    // With replicas, this replica's cache first catches up with every change
                    // made through any of them (see `keys::replica`).
                    keys.sync().await?;
                    if let Some(c) = context {
                        call_ref.take_context(c)?;
                    }
                    op?.run(call_ref).await
                }
                .instrument(span),
            );
            match tokio::time::timeout_at(deadline.into(), work).await {
                Ok(r) => r,
                Err(_) => Err(Deadline::Passed.into()),
            }
        } else {
            Err(Denied::NoRole(call.authority.caller().id.clone()).into())
        };
        // The kill switch may have been thrown while the HSM worked: nothing reaches a
        // disconnected service identity after Disconnect returned.
        if result.is_ok() && call.authority.gated() {
            // With replicas, the switch may have been thrown through another one.
            if let Err(e) = sh.keys.sync_now().await {
                result = Err(e);
            } else if !call.authority.hyok_connected() {
                result = Err(Denied::HyokDisconnected.into());
            }
        }
        let latency_us = start.elapsed().as_micros() as u64;
        let caller = call.authority.caller().clone();
        let (records, request_id) =
            call.records(result.as_ref().map(|_| ()), latency_us, &header_id);
        let audit_start = Instant::now();
        let written = sh.audit.append_many(records).await;
        if let Some(m) = &sh.metrics {
            m.observe_audit_write(audit_start.elapsed(), written.is_ok());
        }
        let op = endpoint.op;
        if let Err(e) = written {
            tracing::error!(op, caller = %caller, request_id, error = %e, "audit record not written: request refused");
            // The result (a DEK, perhaps) is dropped here, zeroized, never sent.
            return Reply {
                result: Err(Unavailable::Audit.into()),
                request_id,
            };
        }
        match &result {
            Ok(_) => tracing::debug!(op, caller = %caller, request_id, latency_us, "ok"),
            Err(e) => {
                tracing::info!(op, caller = %caller, request_id, latency_us, code = ?e.code(), error = %e, "refused")
            }
        }
        Reply { result, request_id }
    }

    /// Whether the HSM answers now (one real call, within `timeout`) and, if `key` is given,
    /// the number and id of its version that wraps now (or why it cannot wrap). A health poll:
    /// no key is used, nothing is audited; counted in the metrics.
    pub async fn health(
        &self,
        endpoint: Endpoint,
        key: Option<&KeyName>,
        timeout: Duration,
    ) -> (Result<(), String>, Result<(u32, VersionId), String>) {
        let start = Instant::now();
        let sh = &self.shared;
        let synced = sh.keys.sync().await;
        let hsm = sh.keys.hsm().clone();
        let probe = || {
            let hsm = hsm.clone();
            async move { hsm.ping().await.map_err(|e| e.to_string()) }
        };
        let up = match synced {
            Ok(()) => crate::health::probe_once(&probe, timeout).await,
            Err(e) => Err(e.to_string()),
        };
        let key_id = match key {
            Some(k) => sh.keys.wrapping_version(k),
            None => Err("no key".into()),
        };
        if let Some(m) = &sh.metrics {
            m.observe_request(
                endpoint.service,
                endpoint.method,
                tonic::Code::Ok,
                start.elapsed(),
            );
        }
        (up, key_id)
    }
}

/// What one request's audit record says, filled in as the request learns it.
#[derive(Default)]
struct Notes {
    key: Option<String>,
    tenant: Option<String>,
    version: Option<u32>,
    justification: Option<String>,
    justification_detail: Option<String>,
    request_id: Option<String>,
    correlation_id: Option<String>,
    upstream: Option<Upstream>,
}

/// One item of a batch, for its own audit record.
struct Item {
    key: Option<String>,
    outcome: Result<u32, (String, String)>,
}

/// One request on its way through the pipeline: what an operation receives. The only way to
/// the keys, and the only maker of [`Grant`]s.
pub struct Call {
    keys: Arc<Keyring>,
    audit: AuditLog,
    hyok: Arc<HyokSwitch>,
    authority: Authorizer,
    op: &'static str,
    scope: RequestScope,
    record: Notes,
    items: Vec<Item>,
}

impl Call {
    /// The keys.
    pub(in crate::api) fn keys(&self) -> &Arc<Keyring> {
        &self.keys
    }

    /// The audit trail (for `QueryAudit`).
    pub(in crate::api) fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The HYOK kill switch (for the switch's own operations).
    pub(in crate::api) fn hyok(&self) -> &Arc<HyokSwitch> {
        &self.hyok
    }

    /// The request's authority (for decisions that are not a grant on one key).
    pub(in crate::api) fn authority(&self) -> &Authorizer {
        &self.authority
    }

    /// The verified caller's identity.
    pub(in crate::api) fn caller_id(&self) -> &str {
        &self.authority.caller().id
    }

    /// Grants `perm` on `key` (see [`Authorizer::grant`]) and notes the key in the request's
    /// audit record.
    pub(in crate::api) fn authorize(
        &mut self,
        perm: Permission,
        key: &KeyName,
    ) -> Result<Grant, BrokerError> {
        self.note_key(key);
        self.authority.grant(perm, key)
    }

    /// [`Call::authorize`] for a batch item (which has its own record).
    pub(in crate::api) fn authorize_item(
        &mut self,
        perm: Permission,
        key: &KeyName,
    ) -> Result<Grant, BrokerError> {
        self.authority.grant(perm, key)
    }

    /// Checks a broker-wide permission (scope `all`).
    pub(in crate::api) fn authorize_global(&self, perm: Permission) -> Result<(), BrokerError> {
        self.authority.global(perm)
    }

    /// Notes the key the request is about.
    pub(in crate::api) fn note_key(&mut self, key: &KeyName) {
        self.scope.set_tenant(key.tenant());
        self.record.key = Some(key.to_string());
        self.record.tenant = Some(key.tenant().to_string());
    }

    /// Notes the tenant the request is about (listings).
    pub(in crate::api) fn note_tenant(&mut self, tenant: &str) {
        self.record.tenant = Some(tenant.to_string());
    }

    /// Notes the key version the request used.
    pub(in crate::api) fn note_version(&mut self, v: u32) {
        self.record.version = Some(v);
    }

    /// Forgets the noted version (the request failed after all).
    pub(in crate::api) fn forget_version(&mut self) {
        self.record.version = None;
    }

    /// Records the outcome of one batch item (`key` as the caller named it, or the key the
    /// item turned out to use).
    pub(in crate::api) fn item(&mut self, key: Option<String>, outcome: Result<u32, &BrokerError>) {
        self.items.push(Item {
            key,
            outcome: outcome.map_err(|e| (outcome_name(Err(e)), e.public_message())),
        });
    }

    /// Takes the request context into the audit record and the HYOK check.
    fn take_context(&mut self, c: Context) -> Result<(), BrokerError> {
        check_id("context.request_id", &c.request_id)?;
        check_id("context.correlation_id", &c.correlation_id)?;
        if !c.request_id.is_empty() {
            self.record.request_id = Some(c.request_id);
        }
        if !c.correlation_id.is_empty() {
            self.record.correlation_id = Some(c.correlation_id);
        }
        if c.detail.chars().count() > 256 || c.detail.chars().any(|c| c.is_control()) {
            return Err(Invalid::Text {
                what: "context.justification.detail",
                max: 256,
            }
            .into());
        }
        let reason = match c.reason {
            ReasonCode::None => None,
            ReasonCode::Known(r) => Some(r),
            ReasonCode::Unknown(v) => {
                return Err(Invalid::Unknown {
                    field: "justification reason",
                    value: v,
                }
                .into());
            }
        };
        self.record.justification = reason.map(|r| r.as_str().to_string());
        if !c.detail.is_empty() {
            self.record.justification_detail = Some(c.detail);
        }
        self.authority.set_reason(reason);
        // Opaque strings (the XKS spec forbids validating their structure): kept as sent, the
        // audit trail's JSON and the log's escaping make them safe to record.
        if let Some(u) = c.upstream {
            self.authority.set_upstream(u.clone());
            self.record.upstream = Some(u);
        }
        Ok(())
    }

    /// Runs a key change to completion (or rollback) in its own task, whatever happens to the
    /// request: a caller that hangs up or times out must not leave a half-done change behind.
    /// The request's scope (deadline, tenant) goes with it, so work not yet started when the
    /// deadline passes is not started. If the request was answered (DEADLINE_EXCEEDED) or
    /// dropped before the change finished, its outcome goes into the audit trail as its own
    /// event (`KeyChangeFinishedLate`, same request id): the request's record alone would say
    /// it failed.
    pub(in crate::api) async fn detached<T, F>(&self, f: F) -> Result<T, BrokerError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, BrokerError>> + Send + 'static,
    {
        struct Waiting(Arc<AtomicBool>);
        impl Drop for Waiting {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let scope = RequestScope::current().unwrap_or_default();
        let waiting = Waiting(Arc::new(AtomicBool::new(true)));
        let still = waiting.0.clone();
        let audit = self.audit.clone();
        let (op, caller) = (self.op, self.caller_id().to_string());
        let (key, tenant, request_id) = (
            self.record.key.clone(),
            self.record.tenant.clone(),
            self.record.request_id.clone(),
        );
        let task = tokio::spawn(scope.run(async move {
            let r = f.await;
            if !still.load(Ordering::SeqCst) {
                let message = match &r {
                    Ok(_) => format!("{op} completed after its request was answered or dropped"),
                    Err(e) => {
                        format!("{op} failed after its request was answered or dropped: {e}")
                    }
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

    /// The request's audit records: one per batch item (request id `ID#i`), then the request's
    /// own. Returns them with the request id to send back.
    fn records(
        &mut self,
        result: Result<(), &BrokerError>,
        latency_us: u64,
        header_id: &str,
    ) -> (Vec<Record>, String) {
        let caller = &self.authority.caller().id;
        let n = &mut self.record;
        let request_id = n.request_id.take().unwrap_or_else(|| header_id.to_string());
        let mut out = Vec::with_capacity(self.items.len() + 1);
        for (i, item) in self.items.drain(..).enumerate() {
            let mut rec = Record::request(self.op, caller);
            rec.tenant = item
                .key
                .as_deref()
                .and_then(|k| KeyName::parse(k).ok())
                .map(|k| k.tenant().to_string());
            rec.key = item.key.filter(|k| !k.is_empty());
            match item.outcome {
                Ok(v) => {
                    rec.version = Some(v);
                    rec.outcome = Some("OK".into());
                }
                Err((outcome, message)) => {
                    rec.outcome = Some(outcome);
                    rec.message = Some(message);
                }
            }
            rec.justification = n.justification.clone();
            rec.justification_detail = n.justification_detail.clone();
            rec.correlation_id = n.correlation_id.clone();
            rec.upstream = n.upstream.clone();
            rec.request_id = Some(format!("{request_id}#{i}"));
            out.push(rec);
        }
        let mut rec = Record::request(self.op, caller);
        rec.key = n.key.take();
        rec.tenant = n.tenant.take();
        rec.version = n.version;
        rec.justification = n.justification.take();
        rec.justification_detail = n.justification_detail.take();
        rec.request_id = Some(request_id.clone());
        rec.correlation_id = n.correlation_id.take();
        rec.upstream = n.upstream.take();
        rec.outcome = Some(outcome_name(result));
        rec.message = result.err().map(BrokerError::public_message);
        rec.latency_us = Some(latency_us);
        out.push(rec);
        (out, request_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn outcomes_are_named_like_grpc_codes() {
        assert_eq!(outcome_name(Ok(())), "OK");
        assert_eq!(
            outcome_name(Err(&Invalid::AadTooLong.into())),
            "INVALID_ARGUMENT"
        );
        assert_eq!(
            outcome_name(Err(&Deadline::Passed.into())),
            "DEADLINE_EXCEEDED"
        );
    }
}
