//! Prometheus metrics, served as OpenMetrics text on a separate plain-HTTP listener
//! (`[metrics] listen`, loopback by default): nothing secret is in them (no key material, no
//! caller identities, no key names), but the listener has no TLS and no authentication, so keep
//! it on loopback or a private network that only the scraper reaches.
//!
//! | Series | Type | Labels | What |
//! |---|---|---|---|
//! | `grpc_server_handled_total` | counter | `grpc_service`, `grpc_method`, `grpc_code` | RPCs completed (the names dashboards built for go-grpc-prometheus expect) |
//! | `grpc_server_handling_seconds` | histogram | `grpc_service`, `grpc_method` | RPC latency, 0.5 ms … 16 s |
//! | `keybroker_hsm_call_duration_seconds` | histogram | `operation` | one session-pool operation on the HSM (`wrap`, `unwrap`, `generate_data_key`, `rewrap`, `public_key`, `generate_kek`, `destroy_kek`, `attach`, `health_probe`, `create_import_key`, `import_kek`, `audit_key`, `audit_checkpoint_mac`, `audit_checkpoint_verify`), 50 µs … 1.6 s |
//! | `keybroker_hsm_call_errors_total` | counter | `operation`, `fault` | HSM operations that failed, by fault class (`data_invalid` is a caller's unauthentic input, not an HSM problem) |
//! | `keybroker_audit_write_seconds` | histogram | | writing one audit record (the request waits for it before its reply), 50 µs … 1.6 s |
//! | `keybroker_audit_write_errors_total` | counter | | audit records that could not be written (each failed its request) |
//! | `keybroker_hsm_sessions` | gauge | | sessions in the pool |
//! | `keybroker_hsm_sessions_in_use` | gauge | | sessions checked out now |
//! | `keybroker_hsm_session_waiters` | gauge | | calls waiting for a session now |
//! | `keybroker_hsm_up` | gauge | | 1 if the last health probe (a real HSM call) succeeded |
//! | `keybroker_audit_up` | gauge | | 1 if the audit trail takes records (0 after a failed write, until one succeeds; after a failed journal sync, until a restart) |
//! | `keybroker_keys` | gauge | | keys known |
//! | `keybroker_key_versions` | gauge | | key versions known |
//!
//! The same listener answers `GET /healthz` with `200 ok` or `503` and the probe's reason, for
//! load balancers and kubelet HTTP probes that cannot speak gRPC over mutual TLS.

use std::{borrow::Cow, fmt::Write as _, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tonic::Code;

use crate::{
    external::ExternalObserver,
    health::HsmHealth,
    hsm::{FaultKind, HsmObserver},
    keys::Keyring,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    operation: Cow<'static, str>,
    fault: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExternalLabels {
    proxy: String,
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExternalCodeLabels {
    proxy: String,
    operation: String,
    grpc_code: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn hsm_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

/// Every metric the broker exports.
pub struct Metrics {
    registry: Registry,
    handled: Family<RequestLabels, Counter>,
    handling: HistogramFamily<MethodLabels>,
    hsm_calls: HistogramFamily<OperationLabels>,
    hsm_errors: Family<FaultLabels, Counter>,
    audit_writes: Histogram,
    audit_errors: Counter,
    external_calls: Family<ExternalCodeLabels, Counter>,
    external_seconds: HistogramFamily<ExternalLabels>,
    sessions: Gauge,
    sessions_in_use: Gauge,
    session_waiters: Gauge,
    hsm_up: Gauge,
    audit_up: Gauge,
    keys: Gauge,
    versions: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics { .. }")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The gRPC code as Prometheus dashboards spell it (`OK`, `InvalidArgument`, ...).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// A stable metric label for an HSM pool operation.
fn operation_label(op: &'static str) -> Cow<'static, str> {
    Cow::Borrowed(match op {
        "generate a data key" => "generate_data_key",
        "read a public key" => "public_key",
        "generate a KEK" => "generate_kek",
        "destroy a KEK" => "destroy_kek",
        "attach the KEKs" => "attach",
        "ping the HSM" => "health_probe",
        "find or create the audit key" => "audit_key",
        "MAC an audit checkpoint" => "audit_checkpoint_mac",
        "verify an audit checkpoint" => "audit_checkpoint_verify",
        "create an import key" => "create_import_key",
        "import a KEK" => "import_kek",
        // Already a label (`wrap`, `unwrap`, ...): borrowed, no allocation per call.
        other if other.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') => other,
        other => return Cow::Owned(other.to_ascii_lowercase().replace(' ', "_")),
    })
}

fn fault_label(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::SessionLost => "session_lost",
        FaultKind::DeviceLost => "device_lost",
        FaultKind::Busy => "busy",
        FaultKind::DataInvalid => "data_invalid",
        FaultKind::HandleInvalid => "handle_invalid",
        FaultKind::Login => "login",
        FaultKind::NotPermitted => "not_permitted",
        FaultKind::Setup => "setup",
        FaultKind::Transient => "transient",
        FaultKind::Deadline => "deadline",
        FaultKind::Other => "other",
    }
}

impl Metrics {
    /// Registers every series.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let handled = Family::<RequestLabels, Counter>::default();
        registry.register(
            "grpc_server_handled",
            "RPCs completed on the server, by service, method and gRPC status code",
            handled.clone(),
        );
        let handling: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(request_histogram);
        registry.register(
            "grpc_server_handling_seconds",
            "RPC latency on the server, from request to reply",
            handling.clone(),
        );
        let hsm_calls: HistogramFamily<OperationLabels> =
            Family::new_with_constructor(hsm_histogram);
        registry.register(
            "keybroker_hsm_call_duration_seconds",
            "Duration of one HSM operation on a pooled session (after a session was free)",
            hsm_calls.clone(),
        );
        let hsm_errors = Family::<FaultLabels, Counter>::default();
        registry.register(
            "keybroker_hsm_call_errors",
            "HSM operations that failed, by fault class",
            hsm_errors.clone(),
        );
        let audit_writes = hsm_histogram();
        registry.register(
            "keybroker_audit_write_seconds",
            "Writing one audit record, which the request waits for before it replies",
            audit_writes.clone(),
        );
        let audit_errors = Counter::default();
        registry.register(
            "keybroker_audit_write_errors",
            "Audit records that could not be written (each failed its request)",
            audit_errors.clone(),
        );
        let external_calls = Family::<ExternalCodeLabels, Counter>::default();
        registry.register(
            "keybroker_external_calls",
            "Calls to external keys' remote EKM proxies, by proxy, operation and the gRPC code they became",
            external_calls.clone(),
        );
        let external_seconds: HistogramFamily<ExternalLabels> =
            Family::new_with_constructor(request_histogram);
        registry.register(
            "keybroker_external_call_duration_seconds",
            "Duration of one call to a remote EKM proxy, its retry included",
            external_seconds.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let sessions = gauge(
            &mut registry,
            "keybroker_hsm_sessions",
            "HSM sessions in the pool",
        );
        let sessions_in_use = gauge(
            &mut registry,
            "keybroker_hsm_sessions_in_use",
            "HSM sessions checked out by a call now",
        );
        let session_waiters = gauge(
            &mut registry,
            "keybroker_hsm_session_waiters",
            "Calls waiting for a free HSM session now",
        );
        let hsm_up = gauge(
            &mut registry,
            "keybroker_hsm_up",
            "1 if the last HSM health probe (C_GenerateRandom through the pool) succeeded",
        );
        let audit_up = gauge(
            &mut registry,
            "keybroker_audit_up",
            "1 if the audit trail takes records (requests are refused UNAVAILABLE while it does not)",
        );
        let keys = gauge(&mut registry, "keybroker_keys", "Keys known to the broker");
        let versions = gauge(
            &mut registry,
            "keybroker_key_versions",
            "Key versions known to the broker",
        );
        Self {
            registry,
            handled,
            handling,
            hsm_calls,
            hsm_errors,
            audit_writes,
            audit_errors,
            external_calls,
            external_seconds,
            sessions,
            sessions_in_use,
            session_waiters,
            hsm_up,
            audit_up,
            keys,
            versions,
        }
    }

    /// Records one completed RPC.
    pub fn observe_request(
        &self,
        service: &'static str,
        method: &'static str,
        code: Code,
        elapsed: Duration,
    ) {
        self.handled
            .get_or_create(&RequestLabels {
                grpc_service: service,
                grpc_method: method,
                grpc_code: code_name(code),
            })
            .inc();
        self.handling
            .get_or_create(&MethodLabels {
                grpc_service: service,
                grpc_method: method,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Records one audit write.
    pub fn observe_audit_write(&self, elapsed: Duration, ok: bool) {
        self.audit_writes.observe(elapsed.as_secs_f64());
        if !ok {
            self.audit_errors.inc();
        }
    }

    /// The OpenMetrics text, with the gauges read now from the keyring, the HSM pool and the
    /// last health probe.
    pub fn render(&self, keyring: &Keyring, health: &HsmHealth) -> Result<String, std::fmt::Error> {
        self.hsm_up.set(i64::from(health.hsm_is_up()));
        self.audit_up.set(i64::from(health.audit_is_up()));
        let (keys, versions) = keyring.counts();
        self.keys.set(i64::try_from(keys).unwrap_or(i64::MAX));
        self.versions
            .set(i64::try_from(versions).unwrap_or(i64::MAX));
        let pool = keyring.hsm().pool_stats();
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.sessions.set(as_i64(pool.size));
        self.sessions_in_use.set(as_i64(pool.in_use));
        self.session_waiters.set(as_i64(pool.waiting));
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl ExternalObserver for Metrics {
    fn external_call(&self, proxy: &str, operation: &'static str, code: Code, elapsed: Duration) {
        self.external_calls
            .get_or_create(&ExternalCodeLabels {
                proxy: proxy.to_string(),
                operation: operation.to_string(),
                grpc_code: code_name(code).to_string(),
            })
            .inc();
        self.external_seconds
            .get_or_create(&ExternalLabels {
                proxy: proxy.to_string(),
                operation: operation.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

impl HsmObserver for Metrics {
    fn hsm_call(&self, operation: &'static str, elapsed: Duration, fault: Option<FaultKind>) {
        let op = operation_label(operation);
        self.hsm_calls
            .get_or_create(&OperationLabels {
                operation: op.clone(),
            })
            .observe(elapsed.as_secs_f64());
        if let Some(kind) = fault {
            self.hsm_errors
                .get_or_create(&FaultLabels {
                    operation: op,
                    fault: fault_label(kind),
                })
                .inc();
        }
    }

    fn hsm_item_fault(&self, operation: &'static str, fault: FaultKind) {
        self.hsm_errors
            .get_or_create(&FaultLabels {
                operation: operation_label(operation),
                fault: fault_label(fault),
            })
            .inc();
    }
}

/// What the metrics listener serves from.
#[derive(Clone)]
pub struct MetricsState {
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The keyring (key counts, HSM pool).
    pub keyring: Arc<Keyring>,
    /// The last health probe.
    pub health: Arc<HsmHealth>,
}

async fn metrics_page(State(s): State<MetricsState>) -> impl IntoResponse {
    match s.metrics.render(&s.keyring, &s.health) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn healthz(State(s): State<MetricsState>) -> impl IntoResponse {
    if s.health.is_up() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        let mut body = String::from("unavailable: ");
        let _ = writeln!(body, "{}", s.health.detail());
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: MetricsState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_stable() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::InvalidArgument), "InvalidArgument");
        assert_eq!(operation_label("generate a data key"), "generate_data_key");
        assert_eq!(operation_label("health probe"), "health_probe");
        assert_eq!(operation_label("wrap"), "wrap");
    }

    #[test]
    fn requests_and_hsm_calls_are_encoded() {
        let m = Metrics::new();
        m.observe_request(
            "keybroker.v1.KeyBroker",
            "WrapKey",
            Code::Ok,
            Duration::from_millis(2),
        );
        m.hsm_call(
            "unwrap",
            Duration::from_micros(80),
            Some(FaultKind::DataInvalid),
        );
        m.external_call(
            "hyok",
            "unwrapkey",
            Code::FailedPrecondition,
            Duration::from_millis(3),
        );
        let mut out = String::new();
        encode(&mut out, &m.registry).expect("encode");
        assert!(out.contains(
            r#"grpc_server_handled_total{grpc_service="keybroker.v1.KeyBroker",grpc_method="WrapKey",grpc_code="OK"} 1"#
        ), "{out}");
        assert!(out.contains(
            r#"grpc_server_handling_seconds_count{grpc_service="keybroker.v1.KeyBroker",grpc_method="WrapKey"} 1"#
        ), "{out}");
        assert!(
            out.contains(r#"keybroker_hsm_call_duration_seconds_count{operation="unwrap"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(
                r#"keybroker_hsm_call_errors_total{operation="unwrap",fault="data_invalid"} 1"#
            ),
            "{out}"
        );
        assert!(
            out.contains(
                r#"keybroker_external_calls_total{proxy="hyok",operation="unwrapkey",grpc_code="FailedPrecondition"} 1"#
            ),
            "{out}"
        );
        assert!(
            out.contains(
                r#"keybroker_external_call_duration_seconds_count{proxy="hyok",operation="unwrapkey"} 1"#
            ),
            "{out}"
        );
    }
}
