//! [`Call`]: one request on its way through the pipeline, as its operation sees it — the only
//! way to the keys and the only maker of grants — and what its audit record will say.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use crate::{
    audit::{self, AuditLog, Record},
    error::{BrokerError, Exists, Invalid, Unavailable},
    hsm::RequestScope,
    hyok::HyokSwitch,
    keys::Keyring,
    model::{KeyAttributes, KeyName, KeyType},
    policy::{Authorizer, Grant, PLATFORM_TAG, Permission, PlatformKey, Reason, Upstream},
};

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

fn check_id(what: &'static str, s: &str) -> Result<(), BrokerError> {
    if s.len() > 128 || s.chars().any(|c| c.is_control()) {
        return Err(Invalid::Text { what, max: 128 }.into());
    }
    Ok(())
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
    /// A request's call: nothing noted yet but its request id.
    pub(super) fn new(
        keys: Arc<Keyring>,
        audit: AuditLog,
        hyok: Arc<HyokSwitch>,
        authority: Authorizer,
        op: &'static str,
        scope: RequestScope,
        request_id: String,
    ) -> Self {
        Self {
            keys,
            audit,
            hyok,
            authority,
            op,
            scope,
            record: Notes {
                request_id: Some(request_id),
                ..Notes::default()
            },
            items: Vec::new(),
        }
    }

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
    /// item turned out to use). Only a valid key name reaches the audit record as written; an
    /// invalid one is recorded by its length and hash ([`audit_name`]), so a caller cannot fill
    /// the audit volume with megabytes of made-up names.
    pub(in crate::api) fn item(&mut self, key: Option<String>, outcome: Result<u32, &BrokerError>) {
        self.items.push(Item {
            key: key.filter(|k| !k.is_empty()).map(|k| audit_name(&k)),
            outcome: outcome.map_err(|e| (audit::outcome_name(Err(e)), e.public_message())),
        });
    }

    /// Takes the request context into the audit record and the HYOK check.
    pub(super) fn take_context(&mut self, c: Context) -> Result<(), BrokerError> {
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

    /// Writes the intent record of a change this request is about to make (`outcome:
    /// "INTENT"`, the request's op, key and ids): a write-ahead record, so no change is ever
    /// made unrecorded. If it cannot be written, the change is not made (UNAVAILABLE); the
    /// request's own record then says how it ended.
    pub(in crate::api) async fn intent(&self) -> Result<(), BrokerError> {
        self.intent_as(self.op, self.record.key.clone(), self.record.tenant.clone())
            .await
    }

    /// [`Call::intent`] of a change made under another op name than the request's own (a
    /// platform-managed key created by its first use).
    async fn intent_as(
        &self,
        op: &'static str,
        key: Option<String>,
        tenant: Option<String>,
    ) -> Result<(), BrokerError> {
        let mut rec = Record::request(op, self.caller_id());
        rec.outcome = Some(audit::INTENT.into());
        rec.key = key;
        rec.tenant = tenant;
        rec.request_id = self.record.request_id.clone();
        rec.correlation_id = self.record.correlation_id.clone();
        rec.justification = self.record.justification.clone();
        rec.upstream = self.record.upstream.clone();
        self.audit.append(rec).await.map_err(|e| {
            tracing::error!(error = %e, op, "intent record not written: the change is not made");
            Unavailable::Audit.into()
        })
    }

    /// Runs a key change to completion (or rollback) in its own task, whatever happens to the
    /// request: a caller that hangs up or times out must not leave a half-done change behind.
    /// Its intent is in the audit trail before it starts ([`Call::intent`]).
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
        let (key, tenant) = (self.record.key.clone(), self.record.tenant.clone());
        self.detached_as(self.op, key, tenant, f).await
    }

    /// [`Call::detached`] for a change audited under `op` on `key`.
    async fn detached_as<T, F>(
        &self,
        op: &'static str,
        key: Option<String>,
        tenant: Option<String>,
        f: F,
    ) -> Result<T, BrokerError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, BrokerError>> + Send + 'static,
    {
        self.intent_as(op, key.clone(), tenant.clone()).await?;
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
        let caller = self.caller_id().to_string();
        let request_id = self.record.request_id.clone();
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

    /// The platform's first use of a tenant's default key creates it (the platform-managed key
    /// model, `policy::PlatformRules`): each key that `grants` name, that the caller may create
    /// on first use ([`Authorizer::platform_key`]) and that does not exist yet, is created
    /// inside the HSM — its intent audited first, the change run to completion in its own
    /// task, its outcome audited as `CreatePlatformKey` — before the request uses it. Two first
    /// uses at once make one key. Returns why a key could not be made, by key.
    pub(in crate::api) async fn platform_keys<'a>(
        &self,
        grants: impl IntoIterator<Item = &'a Grant>,
    ) -> HashMap<KeyName, BrokerError> {
        let mut failed = HashMap::new();
        let mut seen = HashSet::new();
        for g in grants {
            let Some(pk) = self.authority.platform_key(g) else {
                continue;
            };
            let key = g.key().clone();
            if self.keys.get(&key).is_ok() || !seen.insert(key.clone()) {
                continue;
            }
            if let Err(e) = self.create_platform_key(pk).await {
                tracing::error!(key = %key, error = %e, "platform-managed key not created");
                failed.insert(key, e);
            }
        }
        failed
    }

    /// The platform-managed key a first use under `grant` would make ([`Call::platform_keys`]),
    /// if the caller may make it and it does not exist yet.
    pub(in crate::api) fn platform_key_to_make(&self, grant: &Grant) -> Option<PlatformKey> {
        let pk = self.authority.platform_key(grant)?;
        self.keys.get(grant.key()).is_err().then_some(pk)
    }

    async fn create_platform_key(&self, pk: PlatformKey) -> Result<(), BrokerError> {
        const OP: &str = "CreatePlatformKey";
        let key = pk.grant.key().clone();
        let mut attributes = KeyAttributes {
            rotation_period_ms: Some(pk.rotation_period_ms),
            purge_protection: true,
            operations: pk.operations(),
            ..KeyAttributes::default()
        };
        let (tag, value) = PLATFORM_TAG;
        attributes.tags.insert(tag.into(), value.into());
        let keys = self.keys.clone();
        let made = self
            .detached_as(
                OP,
                Some(key.to_string()),
                Some(key.tenant().to_string()),
                async move {
                    let made = keys
                        .create(&pk.grant, KeyType::Aes256, Some(pk.algorithm), attributes)
                        .await;
                    match made {
                        Ok(_) => Ok(true),
                        // A concurrent first use made it meanwhile.
                        Err(BrokerError::Exists(Exists::Key(_))) => Ok(false),
                        Err(e) => Err(e),
                    }
                },
            )
            .await;
        let mut rec = Record::request(OP, self.caller_id());
        rec.key = Some(key.to_string());
        rec.tenant = Some(key.tenant().to_string());
        rec.request_id = self.record.request_id.clone();
        rec.correlation_id = self.record.correlation_id.clone();
        rec.version = made.as_ref().is_ok_and(|m| *m).then_some(1);
        rec.outcome = Some(audit::outcome_name(made.as_ref().map(|_| ())));
        rec.message = match &made {
            Ok(true) => None,
            Ok(false) => Some("made meanwhile by a concurrent first use".into()),
            Err(e) => Some(e.public_message()),
        };
        self.audit.append(rec).await.map_err(|e| {
            tracing::error!(error = %e, key = %key, "could not audit a platform-managed key's creation");
            BrokerError::from(Unavailable::Audit)
        })?;
        if made? {
            tracing::info!(key = %key, "platform-managed key created on first use");
        }
        Ok(())
    }

    /// The request's audit records: one per batch item (request id `ID#i`), then the request's
    /// own. Returns them with the request id to send back.
    pub(super) fn records(
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
            rec.key = item.key;
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
        rec.outcome = Some(audit::outcome_name(result));
        rec.message = result.err().map(BrokerError::public_message);
        rec.latency_us = Some(latency_us);
        // What the operation noted for the record (an external key's proxy and remote
        // request ids).
        rec.detail = self.scope.take_detail();
        out.push(rec);
        (out, request_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Deadline;

    #[test]
    fn outcomes_are_named_like_grpc_codes() {
        assert_eq!(audit::outcome_name(Ok(())), "OK");
        assert_eq!(
            audit::outcome_name(Err(&Invalid::AadTooLong.into())),
            "INVALID_ARGUMENT"
        );
        assert_eq!(
            audit::outcome_name(Err(&Deadline::Passed.into())),
            "DEADLINE_EXCEEDED"
        );
    }
}

/// A key name as an audit record holds it: canonical if it is valid, else
/// `invalid:LEN:SHA256-PREFIX` (enough to tell two invalid names apart, a few dozen bytes
/// whatever their length).
pub(crate) fn audit_name(raw: &str) -> String {
    match KeyName::parse(raw) {
        Ok(k) => k.to_string(),
        Err(_) => {
            use sha2::{Digest, Sha256};
            let h = Sha256::digest(raw.as_bytes());
            let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
            format!("invalid:{}:{hex}", raw.len())
        }
    }
}

#[cfg(test)]
mod audit_name_tests {
    use super::audit_name;

    #[test]
    fn valid_names_are_kept_and_invalid_ones_shrink_to_a_hash() {
        assert_eq!(audit_name("acme/k1"), "acme/k1");
        assert_eq!(audit_name("k1"), "default/k1");
        let huge = "x/".repeat(500_000);
        let a = audit_name(&huge);
        assert!(a.starts_with("invalid:1000000:") && a.len() < 40, "{a}");
        assert_ne!(audit_name("bad name"), audit_name("bad name2"));
        assert!(!audit_name("bad\nname").contains('\n'));
    }
}
