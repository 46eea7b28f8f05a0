//! Health: a periodic probe that makes a real HSM call (`C_GenerateRandom` through the session
//! pool, see [`crate::hsm::Hsm::ping`]) and drives the standard `grpc.health.v1.Health`
//! statuses — the overall status (`""`) and one per served service — plus
//! `keybroker_hsm_up` and the metrics listener's `/healthz`.
//!
//! Every service of the broker needs the HSM and an audit trail that takes records, so they all
//! flip together: SERVING while the last probe succeeded and the last audit write did,
//! NOT_SERVING from the first failed probe or write until the next good one. A failed sync of
//! the audit journal holds until a restart (`audit`): NOT_SERVING tells the orchestrator so.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tonic_health::{ServingStatus, server::HealthReporter};

/// The services whose status the probe sets (besides the overall `""`).
pub const SERVICES: [&str; 4] = [
    "keybroker.v1.KeyBroker",
    "keybroker.v1.KeyManagement",
    "keybroker.v1.Audit",
    "keybroker.v1.Hyok",
];

/// The last verdict: the HSM's (the last probe) and the audit trail's.
#[derive(Debug)]
pub struct HsmHealth {
    up: AtomicBool,
    hsm_up: AtomicBool,
    audit_up: AtomicBool,
    detail: Mutex<String>,
    /// The HSM's last verdict (the probe's or the HSM layer's, whichever came last), for a
    /// verdict published because the audit trail's changed.
    hsm_last: Mutex<Result<(), String>>,
    /// One publication at a time: each reads the audit trail's verdict inside it, so the last
    /// one published is never older than another.
    publishing: tokio::sync::Mutex<()>,
}

impl Default for HsmHealth {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(false),
            hsm_up: AtomicBool::new(false),
            audit_up: AtomicBool::new(false),
            detail: Mutex::new("not probed yet".into()),
            hsm_last: Mutex::new(Err("not probed yet".into())),
            publishing: tokio::sync::Mutex::new(()),
        }
    }
}

impl HsmHealth {
    /// Whether the broker serves: the last probe succeeded and the audit trail takes records.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether the last HSM probe succeeded.
    pub fn hsm_is_up(&self) -> bool {
        self.hsm_up.load(Ordering::Relaxed)
    }

    /// Whether the audit trail takes records.
    pub fn audit_is_up(&self) -> bool {
        self.audit_up.load(Ordering::Relaxed)
    }

    /// Why the broker does not serve (or "ok").
    pub fn detail(&self) -> String {
        self.detail
            .lock()
            .map(|d| d.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// Publishes one verdict, the HSM's (`hsm`; `None`: its last one) and the audit trail's (read
/// from `audit` now): health statuses and `state` (which `keybroker_hsm_up`,
/// `keybroker_audit_up` and `/healthz` read). Logs changes.
pub async fn publish(
    reporter: &HealthReporter,
    state: &HsmHealth,
    hsm: Option<Result<(), String>>,
    audit: &(dyn Fn() -> Result<(), String> + Sync),
) {
    let _one = state.publishing.lock().await;
    let hsm = {
        let mut last = state.hsm_last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = hsm {
            *last = h;
        }
        last.clone()
    };
    let audit = audit();
    state.hsm_up.store(hsm.is_ok(), Ordering::Relaxed);
    state.audit_up.store(audit.is_ok(), Ordering::Relaxed);
    let result = hsm.and(audit);
    let up = result.is_ok();
    let status = if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    for s in SERVICES {
        reporter.set_service_status(s, status).await;
    }
    let was_up = state.up.swap(up, Ordering::Relaxed);
    let detail = match &result {
        Ok(()) => "ok".to_string(),
        Err(e) => e.clone(),
    };
    *state.detail.lock().unwrap_or_else(|p| p.into_inner()) = detail;
    match (&result, was_up) {
        (Ok(()), false) => tracing::info!("health: SERVING"),
        (Err(e), true) => tracing::error!(error = %e, "health: NOT_SERVING"),
        (Err(e), false) => tracing::warn!(error = %e, "health: still NOT_SERVING"),
        (Ok(()), true) => {}
    }
}

/// Runs `probe` (bounded by `timeout`) every `interval`, publishing each result with the audit
/// trail's verdict (`audit`), until `shutdown` changes. (The first probe, before the listeners
/// open, is the caller's.)
pub async fn run<P, Fut, A>(
    reporter: HealthReporter,
    state: Arc<HsmHealth>,
    interval: Duration,
    timeout: Duration,
    probe: P,
    audit: A,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    P: Fn() -> Fut,
    Fut: Future<Output = Result<(), String>>,
    A: Fn() -> Result<(), String> + Sync,
{
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let result = probe_once(&probe, timeout).await;
        publish(&reporter, &state, Some(result), &audit).await;
    }
}

/// The audit trail's part of the verdict: `Err` while it cannot take records (every request
/// would be refused UNAVAILABLE), saying why.
pub fn audit_verdict(audit: &crate::audit::AuditLog) -> Result<(), String> {
    match audit.failure() {
        Some(why) => Err(format!("the audit trail cannot take records: {why}")),
        None => Ok(()),
    }
}

/// One probe, failing if it takes longer than `timeout`.
pub async fn probe_once<P, Fut>(probe: &P, timeout: Duration) -> Result<(), String>
where
    P: Fn() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    match tokio::time::timeout(timeout, probe()).await {
        Ok(r) => r,
        Err(_) => Err(format!("the HSM did not answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Request;
    use tonic_health::{
        pb::{HealthCheckRequest, health_check_response, health_server::Health},
        server::HealthService,
    };

    use super::*;

    async fn status(svc: &HealthService, name: &str) -> i32 {
        svc.check(Request::new(HealthCheckRequest {
            service: name.into(),
        }))
        .await
        .expect("known service")
        .into_inner()
        .status
    }

    #[tokio::test]
    async fn a_failed_probe_flips_every_service_to_not_serving_and_back() {
        let reporter = HealthReporter::new();
        let svc = HealthService::from_health_reporter(reporter.clone());
        let state = HsmHealth::default();
        let serving = health_check_response::ServingStatus::Serving as i32;
        let not_serving = health_check_response::ServingStatus::NotServing as i32;

        let audit_ok = || Ok(());
        publish(&reporter, &state, Some(Ok(())), &audit_ok).await;
        for s in ["", SERVICES[0], SERVICES[1], SERVICES[2], SERVICES[3]] {
            assert_eq!(status(&svc, s).await, serving, "{s:?}");
        }
        assert!(state.is_up() && state.hsm_is_up() && state.audit_is_up());

        let failing =
            || async { Err::<(), String>("C_GenerateRandom returned DeviceError".into()) };
        let r = probe_once(&failing, Duration::from_secs(5)).await;
        publish(&reporter, &state, Some(r), &audit_ok).await;
        for s in ["", SERVICES[0], SERVICES[1], SERVICES[2], SERVICES[3]] {
            assert_eq!(status(&svc, s).await, not_serving, "{s:?}");
        }
        assert!(!state.is_up() && !state.hsm_is_up() && state.audit_is_up());
        assert!(state.detail().contains("DeviceError"));

        let hanging = || std::future::pending::<Result<(), String>>();
        let r = probe_once(&hanging, Duration::from_millis(1)).await;
        assert!(
            r.as_ref().is_err_and(|e| e.contains("did not answer")),
            "{r:?}"
        );

        publish(&reporter, &state, Some(Ok(())), &audit_ok).await;
        assert_eq!(status(&svc, SERVICES[0]).await, serving);

        // An audit trail that takes no records: the HSM is up, the broker does not serve.
        let full = || Err("the audit trail cannot take records: disk full".to_string());
        publish(&reporter, &state, None, &full).await;
        for s in ["", SERVICES[0], SERVICES[1], SERVICES[2], SERVICES[3]] {
            assert_eq!(status(&svc, s).await, not_serving, "{s:?}");
        }
        assert!(!state.is_up() && state.hsm_is_up() && !state.audit_is_up());
        assert!(state.detail().contains("disk full"), "{}", state.detail());
        // The HSM fails, then the audit trail comes back: the HSM's last verdict stands.
        publish(&reporter, &state, Some(Err("hung".into())), &full).await;
        publish(&reporter, &state, None, &audit_ok).await;
        assert_eq!(status(&svc, "").await, not_serving);
        assert!(!state.hsm_is_up() && state.audit_is_up());
        assert!(state.detail().contains("hung"), "{}", state.detail());
        publish(&reporter, &state, Some(Ok(())), &audit_ok).await;
        assert_eq!(status(&svc, "").await, serving);
    }
}
