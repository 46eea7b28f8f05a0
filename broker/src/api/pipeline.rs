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
//! [`Reply`]. The operation receives a `Call` (`api/call.rs`), the only way to the keys, and
//! the keyring acts only on a [`Grant`](crate::policy::Grant) that `Call::authorize` made.
//!
//! Every request has a request id: the `request_id` of its context, else the one its front door
//! read from the wire (the `x-request-id` header, kube-apiserver's `uid`) when that is sane (1-128
//! of `[A-Za-z0-9._:/-]`, see [`sanitize_request_id`]), else a fresh UUID. It is in the audit
//! record, in the request's log line and in the span of everything logged while it runs, and the
//! front door sends it back.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::Instrument;

use crate::{
    audit::AuditLog,
    error::{BrokerError, Deadline, Denied, Exhausted, Unavailable},
    hsm::RequestScope,
    hyok::HyokSwitch,
    identity::Caller,
    keys::Keyring,
    metrics::Metrics,
    model::{KeyName, VersionId},
    policy::{Authorizer, Binding, PolicyHandle},
};

pub use super::call::{Context, ReasonCode};
use super::{call::Call, limiter::RefusalLimiter, ops::Operation};

/// The caller name in the audit record of a request refused before any identity was verified
/// (an XKS request whose SigV4 signature does not verify).
pub const UNAUTHENTICATED: &str = "unauthenticated";

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

/// What a front door knows of a request besides the operation it asks for.
#[derive(Debug)]
pub struct Incoming {
    /// Where it came in.
    pub endpoint: Endpoint,
    /// The verified caller (`None`: refused and audited as `unauthenticated`; the operation's
    /// `Err` says why).
    pub caller: Option<Caller>,
    /// The request id read from the wire, unchecked.
    pub request_id: Option<String>,
    /// The caller's deadline, if it set one (capped by `[server] request_timeout_ms`).
    pub timeout: Option<Duration>,
    /// When the request's headers arrived, where the front door knows (the deadline is timed
    /// from then, not from when its body was complete); `None`: now.
    pub received: Option<Instant>,
    /// The request context, if the wire format carries one.
    pub context: Option<Context>,
    /// A binding the front door grants every caller it lets in (the Kubernetes KMS v2
    /// socket: local trust on its one key), in addition to the policy's.
    pub door_grant: Option<Binding>,
    /// The key the request is about, where the wire says it outside the body (the KMS v2
    /// socket's one key; a key in a URL path): in the audit record even of a request refused
    /// before its operation runs.
    pub key: Option<KeyName>,
    /// Why the front door refuses the request although it knows the caller (a client
    /// certificate that no longer holds): answered and audited without running.
    pub refused: Option<BrokerError>,
}

impl Incoming {
    /// A request at `endpoint` from `caller`, with nothing else known yet.
    pub fn new(endpoint: Endpoint, caller: Option<Caller>) -> Self {
        Self {
            endpoint,
            caller,
            request_id: None,
            timeout: None,
            received: None,
            context: None,
            door_grant: None,
            key: None,
            refused: None,
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
    refusals: Option<RefusalLimiter>,
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
                refusals: RefusalLimiter::new(
                    crate::config::DEFAULT_REFUSED_PER_SECOND,
                    crate::config::DEFAULT_REFUSED_BURST,
                ),
            }),
        }
    }

    /// Sets the per-caller budget of refused requests (`[server] refused_per_second` and
    /// `refused_burst`; 0 per second: no limit). Call it before the pipeline is cloned.
    pub fn refusal_limit(mut self, per_second: u32, burst: u32) -> Self {
        if let Some(sh) = Arc::get_mut(&mut self.shared) {
            sh.refusals = RefusalLimiter::new(per_second, burst);
        }
        self
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
            received,
            context,
            door_grant,
            key,
            refused,
        } = incoming;
        let header_id = request_id
            .as_deref()
            .and_then(sanitize_request_id)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let Some(caller) = caller else {
            // Refused before any identity: the front door says why in `op` (a SigV4 signature
            // that does not verify, a path no prefix serves, ...). Audited like every other
            // refusal, under the caller name `unauthenticated`; nothing runs.
            let error = match op {
                Err(e) => e,
                Ok(_) => Denied::NoIdentity.into(),
            };
            return self
                .refuse_unauthenticated(endpoint, key, error, header_id, start)
                .await;
        };
        // A caller with too many requests refused lately is held off, unaudited but counted
        // (`api::limiter`): it cannot fill the audit trail with refusals.
        if let Some(l) = &sh.refusals {
            let a = l.admit(&caller.id, Instant::now());
            if let Some(n) = a.report {
                let rec = crate::audit::Record::event(
                    "RefusedRequestsSuppressed",
                    Some(&caller.id),
                    format!(
                        "{n} request(s) answered RESOURCE_EXHAUSTED without running: too many \
                         of this caller's requests were refused"
                    ),
                );
                if let Err(e) = sh.audit.append(rec).await {
                    tracing::error!(caller = %caller, error = %e, "could not audit suppressed requests");
                }
            }
            if !a.admitted {
                return Reply {
                    result: Err(Exhausted::Refusals(caller.id.clone()).into()),
                    request_id: header_id,
                };
            }
        }
        // The deadline: the caller's, capped by [server] request_timeout_ms. Enforced here so
        // that a request that runs out of time is answered DEADLINE_EXCEEDED *and audited*; it
        // also bounds every HSM wait below (RequestScope).
        let timeout = timeout.map_or(sh.request_timeout, |t| t.min(sh.request_timeout));
        let deadline = work_deadline(received.unwrap_or(start).min(start), timeout);
        let scope = RequestScope::new(Some(deadline)).with_request_id(&header_id);
        let span = tracing::info_span!("rpc", op = endpoint.op, request_id = %header_id);
        let mut call = Call::new(
            sh.keys.clone(),
            sh.audit.clone(),
            sh.hyok.clone(),
            Authorizer::new(sh.policy.get(), caller, door_grant, sh.hyok.clone()),
            endpoint.op,
            scope.clone(),
            header_id.clone(),
        );
        if let Some(k) = &key {
            call.note_key(k);
        }
        let mut result = if let Some(e) = refused {
            Err(e)
        } else if Instant::now() >= deadline {
            // Work whose deadline has already passed is not started.
            Err(Deadline::OnArrival.into())
        } else if call.authority().knows() {
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
                    // HYOK: a provider identity passes the switch and gives a justification.
                    call_ref.authority().admit()?;
                    op?.run(call_ref).await
                }
                .instrument(span),
            );
            match tokio::time::timeout_at(deadline.into(), work).await {
                Ok(r) => r,
                Err(_) => Err(Deadline::Passed.into()),
            }
        } else {
            Err(Denied::NoRole(call.authority().caller().id.clone()).into())
        };
        // The kill switch may have been thrown while the HSM worked: nothing reaches a
        // disconnected service identity after Disconnect returned.
        if result.is_ok() && call.authority().gated() {
            // With replicas, the switch may have been thrown through another one.
            if let Err(e) = sh.keys.sync_now().await {
                result = Err(e);
            } else if !call.authority().hyok_connected() {
                result = Err(Denied::HyokDisconnected.into());
            }
        }
        let latency_us = start.elapsed().as_micros() as u64;
        let caller = call.authority().caller().clone();
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
        if let (Some(l), Err(BrokerError::Denied(_) | BrokerError::Invalid(_))) =
            (&sh.refusals, &result)
        {
            l.refused(&caller.id, Instant::now());
        }
        match &result {
            Ok(_) => tracing::debug!(op, caller = %caller, request_id, latency_us, "ok"),
            Err(e) => {
                tracing::info!(op, caller = %caller, request_id, latency_us, code = ?e.code(), error = %e, "refused")
            }
        }
        Reply { result, request_id }
    }

    /// The audit record and reply of a request no identity could be verified for.
    async fn refuse_unauthenticated<T>(
        &self,
        endpoint: Endpoint,
        key: Option<KeyName>,
        error: BrokerError,
        request_id: String,
        start: Instant,
    ) -> Reply<T> {
        let sh = &self.shared;
        // Unauthenticated refusals share one budget of the refusal limiter (`api::limiter`):
        // whoever holds no credential cannot fill the audit trail with them. Past the budget
        // they are answered RESOURCE_EXHAUSTED without a record each, and counted.
        if let Some(l) = &sh.refusals {
            let a = l.admit(UNAUTHENTICATED, Instant::now());
            if let Some(n) = a.report {
                let rec = crate::audit::Record::event(
                    "RefusedRequestsSuppressed",
                    Some(UNAUTHENTICATED),
                    format!(
                        "{n} unauthenticated request(s) answered RESOURCE_EXHAUSTED without \
                         running: too many unauthenticated requests were refused"
                    ),
                );
                if let Err(e) = sh.audit.append(rec).await {
                    tracing::error!(error = %e, "could not audit suppressed requests");
                }
            }
            if !a.admitted {
                return Reply {
                    result: Err(Exhausted::Refusals(UNAUTHENTICATED.into()).into()),
                    request_id,
                };
            }
            l.refused(UNAUTHENTICATED, Instant::now());
        }
        let mut rec = crate::audit::Record::request(endpoint.op, UNAUTHENTICATED);
        rec.tenant = key.as_ref().map(|k| k.tenant().to_string());
        rec.key = key.map(|k| k.to_string());
        rec.request_id = Some(request_id.clone());
        rec.outcome = Some(crate::audit::outcome_name(Err(&error)));
        rec.message = Some(error.public_message());
        rec.latency_us = Some(start.elapsed().as_micros() as u64);
        let audit_start = Instant::now();
        let written = sh.audit.append(rec).await;
        if let Some(m) = &sh.metrics {
            m.observe_audit_write(audit_start.elapsed(), written.is_ok());
        }
        let op = endpoint.op;
        if let Err(e) = written {
            tracing::error!(op, request_id, error = %e, "audit record not written: request refused");
            return Reply {
                result: Err(Unavailable::Audit.into()),
                request_id,
            };
        }
        tracing::info!(op, caller = UNAUTHENTICATED, request_id, code = ?error.code(), error = %error, "refused");
        Reply {
            result: Err(error),
            request_id,
        }
    }

    /// Whether the broker serves now — the HSM answers (one real call, within `timeout`) and the
    /// audit trail takes records — and, if `key` is given,
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
            Ok(()) => crate::health::probe_once(&probe, timeout)
                .await
                .and_then(|()| crate::health::audit_verdict(&sh.audit)),
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
}
