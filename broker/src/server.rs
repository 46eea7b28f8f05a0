//! Wiring: configuration → HSM → store → keyring → TLS listener → gRPC services, with graceful
//! shutdown on SIGTERM/SIGINT: the listeners stop accepting, connections get GOAWAY (new
//! requests are refused), requests in flight finish and are answered, the audit trail gets its
//! final checkpoint, and the HSM is closed (sessions closed, `C_Finalize`). Exit status 0.
//!
//! Listeners: the mutual-TLS gRPC listener (`keybroker.v1`, `grpc.health.v1`, server reflection);
//! optionally the metrics listener (`[metrics]`, plain HTTP), the Kubernetes KMS v2 unix socket
//! (`[kms_v2]`), the AWS XKS proxy door on its own HTTPS listener (`[xks]`) and the Azure
//! Managed HSM EKM proxy door on its own (`[ekm]`). Each prints `keybroker: ... on ADDR` on
//! stdout when it is ready; the TLS
//! listener's `listening on` line comes last. One shutdown signal stops them all and the health
//! probe.

use std::{future::Future, sync::Arc, time::Duration};

use keybroker_proto::v1::{
    audit_server::AuditServer, hyok_server::HyokServer, key_broker_server::KeyBrokerServer,
    key_management_server::KeyManagementServer,
};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    api::{
        MAX_MESSAGE_BYTES, Pipeline,
        ekm::door::{self as ekm_door, EkmDoor},
        grpc::{AuditRejections, GrpcApi},
        https::HttpsSettings,
        kms_v2::{self, KmsV2},
        xks::door::{self as xks_door, XksDoor},
    },
    audit::{AuditLog, AuditSettings},
    config::Config,
    error::BrokerError,
    health::{self, HsmHealth},
    hsm::{Hsm, HsmError},
    hyok::HyokSwitch,
    keys::{Keyring, LoadError},
    metrics::{self, Metrics, MetricsState},
    model::KeyName,
    store::{Store, StoreError},
    tls,
};

/// Why the broker (or a command) could not start: typed by where it failed, each carrying the
/// failure it got from that layer. The command line prints it and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration file (reading, parsing or checking it).
    #[error("{0}")]
    Config(String),
    /// The policy file.
    #[error("{0}")]
    Policy(String),
    /// Opening the HSM (module, token, login, capability probe).
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// The token cannot serve what the configuration requires (the capability report says
    /// what is missing and what works).
    #[error("{0}")]
    Capabilities(String),
    /// Opening the metadata store.
    #[error("metadata store: {0}")]
    Store(#[from] StoreError),
    /// Loading the keys (reconciliation with the store and the HSM, integrity checks).
    #[error("{0}")]
    Keys(#[from] LoadError),
    /// A request-path failure during start-up (the audit key, the HYOK switch, receipts).
    #[error("{0}")]
    Broker(#[from] BrokerError),
    /// The audit trail.
    #[error("{0}")]
    Audit(String),
    /// TLS material.
    #[error("{0}")]
    Tls(String),
    /// A listener (address in use, socket path, ...).
    #[error("{0}")]
    Listen(String),
    /// Another broker holds the store or the audit log.
    #[error("{0}")]
    InUse(String),
    /// A task of the server failed.
    #[error("{0}")]
    Server(String),
}

impl From<StartError> for String {
    fn from(e: StartError) -> Self {
        e.to_string()
    }
}

/// A future that completes once `rx` sees `true`.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Process-wide protections of the server: no core dumps (also done first by every command,
/// `crate::secrets::disable_core_dumps`; again here for callers of [`run`] that do not go
/// through the command line), and SIGXFSZ caught.
pub fn harden_process() {
    if let Err(e) = crate::secrets::disable_core_dumps() {
        tracing::warn!(error = %e, "core dumps");
    }
    // A write past RLIMIT_FSIZE raises SIGXFSZ, whose default action kills the process. Catch it
    // so a full audit volume fails requests (EFBIG) instead of killing the broker.
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(
        rustix::process::Signal::XFSZ.as_raw(),
    )) {
        Ok(mut s) => {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    tracing::error!("SIGXFSZ: a file reached the size limit");
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot catch SIGXFSZ"),
    }
}

/// What `serve` refuses in the configuration before it opens anything: the access policy (a
/// missing or unreadable policy file, an unknown role, a bare `"*"` identity, ...). `check-config`
/// calls the same function, so it refuses exactly what `serve` would.
pub fn validate(cfg: &Config) -> Result<crate::policy::PolicyHandle, StartError> {
    cfg.policy().map_err(StartError::Policy)
}

/// Opens the HSM described by `cfg` (blocking work on a blocking thread) and refuses it when it
/// cannot serve what the configuration requires ([`refusal`]).
pub async fn open_hsm(cfg: &Config) -> Result<Hsm, StartError> {
    let hsm = open_hsm_unchecked(cfg).await?;
    match refusal(cfg, &hsm) {
        None => Ok(hsm),
        Some(why) => Err(StartError::Capabilities(why)),
    }
}

/// Opens the HSM without judging its capabilities (`check-config` prints them first).
pub async fn open_hsm_unchecked(cfg: &Config) -> Result<Hsm, StartError> {
    if let Some(u) = cfg.hsm_uri().map_err(StartError::Config)? {
        for a in &u.ignored {
            tracing::warn!(attribute = %a, "hsm.uri: query attribute not known to keybroker, ignored (RFC 7512 lets a consumer ignore vendor query attributes)");
        }
    }
    let pin = cfg.read_pin().map_err(StartError::Config)?;
    let settings = cfg.hsm_settings(pin);
    tokio::task::spawn_blocking(move || Hsm::open(&settings))
        .await
        .map_err(|e| StartError::Server(format!("HSM start-up task failed: {e}")))?
        .map_err(StartError::Hsm)
}

/// The capability report of `hsm` under `cfg`'s requirements.
pub fn capability_report(cfg: &Config, hsm: &Hsm) -> crate::hsm::report::CapabilityReport {
    crate::hsm::report::report(
        hsm.capabilities(),
        &cfg.required_algorithms(),
        cfg.hsm.legacy_template,
    )
}

/// Why the broker must not start on `hsm` with `cfg` (`None`: it may): a required algorithm
/// the token cannot serve, no RNG, no MAC for the audit trail, or a KEK template the token
/// cannot take. The message lists what is missing and what does work.
pub fn refusal(cfg: &Config, hsm: &Hsm) -> Option<String> {
    let report = capability_report(cfg, hsm);
    if report.refusals.is_empty() {
        return None;
    }
    Some(format!(
        "HSM: {}",
        crate::hsm::report::refusal_message(
            hsm.capabilities(),
            &report,
            &cfg.required_algorithms()
        )
    ))
}

/// Lets the HSM layer re-read the PIN source before each re-login, and re-reads it on SIGHUP
/// (a PIN rotated on the token is picked up without a restart; see `hsm::Hsm::reload_pin`).
fn watch_pin(cfg: &Config, hsm: &Hsm) {
    let c = cfg.clone();
    hsm.set_pin_source(Box::new(move || c.read_pin()));
    let hsm = hsm.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; the PIN source is re-read before each re-login only");
                return;
            }
        };
        while hup.recv().await.is_some() {
            let h = hsm.clone();
            let _ = tokio::task::spawn_blocking(move || h.reload_pin()).await;
        }
    });
}

/// Opens the configured metadata store (SQLite or PostgreSQL) on a blocking thread.
pub async fn open_store(cfg: &Config) -> Result<Store, StartError> {
    let c = cfg.clone();
    tokio::task::spawn_blocking(move || c.open_store())
        .await
        .map_err(|e| StartError::Server(format!("store task failed: {e}")))?
        .map_err(|e| StartError::Config(format!("metadata store: {e}")))
}

/// Runs the broker until `shutdown` completes. Prints `keybroker: listening on ADDR` on stdout
/// once it accepts connections.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    harden_process();
    // Before the HSM, the store or the audit log is touched: a second broker on the same files
    // stops here (crate::instance_lock). Held until `run` returns.
    let _locks = crate::instance_lock::lock_local_files(&cfg).map_err(StartError::InUse)?;
    let policy = validate(&cfg)?;
    // Before the HSM opens its files: the connection cap keeps descriptors for it.
    let fds = crate::fdlimit::budget(cfg.server.max_connections);
    let hsm = open_hsm(&cfg).await?;
    let t = hsm.token();
    tracing::info!(library = %t.library, slot = t.slot, label = %t.label, serial = %t.serial,
        manufacturer = %t.manufacturer, model = %t.model, sessions = t.sessions,
        profile = t.profile, profile_configured = t.profile_configured,
        profile_tested = hsm.profile().tested, "HSM ready");
    let caps = hsm.capabilities();
    if !caps.key_attributes {
        tracing::warn!(
            "[hsm] legacy_template: this token does not know CKA_COPYABLE, CKA_DESTROYABLE and \
             CKA_ALLOWED_MECHANISMS, and keys are made without them: anyone holding the PIN can \
             copy a key with more roles and use it with any mechanism the token has"
        );
    }
    for k in crate::hsm::report::key_type_rows(caps) {
        if let Some(why) = &k.why_not {
            tracing::warn!(key_type = k.key_type, why = %why,
                "capability probe: keys of this type are refused on this token");
        }
    }
    tracing::info!(
        aes_gcm = caps.aes_gcm,
        kwp = caps.kwp.as_ref().map(|k| k.name).unwrap_or("none"),
        kwp_full_rfc5649 = caps.kwp.as_ref().is_some_and(|k| k.full_rfc5649),
        aes_kw = caps.aes_kw,
        oaep_sha256 = caps.oaep_sha256,
        oaep_sha1 = caps.oaep_sha1,
        mac = caps.mac.as_ref().map(|m| m.mechanism).unwrap_or("none"),
        key_attributes = caps.key_attributes,
        "capability probe"
    );
    for a in &crate::model::Algorithm::ALL {
        tracing::info!(algorithm = %a, mechanism = %caps.mechanism_name(*a),
            usable = caps.supports(*a), "capability probe: algorithm");
    }
    if !hsm.profile().tested {
        tracing::warn!(
            profile = hsm.profile().name,
            "this vendor profile is documented from vendor sources but not tested by keybroker's CI"
        );
    }
    for n in &caps.notes {
        tracing::warn!(note = %n, "capability probe");
    }
    // [[external_proxy]]: one HTTPS client each, built now (a file that does not load stops
    // the start, as `check-config` reports it).
    let external = crate::external::ExternalProxies::load(&cfg.external_proxy, &|p| cfg.path(p))
        .map_err(StartError::Config)?;
    let store = open_store(&cfg).await?;
    tracing::info!(store = %store.describe(), shared = store.is_shared(), "metadata store open");
    let started = std::time::Instant::now();
    let (keyring, report) = Keyring::load(
        hsm,
        Arc::new(store),
        cfg.hsm.on_integrity_failure,
        cfg.lifecycle.settings(),
    )
    .await?;
    tracing::info!(
        keys = report.keys,
        versions = report.versions,
        rolled_back = report.rolled_back,
        quarantined = report.quarantined.len(),
        orphans = report.orphans.len(),
        millis = started.elapsed().as_millis() as u64,
        attach_ms = report.attach_ms,
        canaries_ms = report.canaries_ms,
        canaries_deferred = report.canaries_deferred,
        "keys loaded and verified"
    );
    let keyring = Arc::new(keyring);
    keyring.set_max_staleness(Duration::from_millis(cfg.store.max_staleness_ms));
    let metrics = Arc::new(Metrics::new());
    keyring.hsm().set_observer(metrics.clone());
    watch_pin(&cfg, keyring.hsm());
    let policy = Arc::new(policy);
    policy.watch();
    let store = keyring.store().clone();
    // Replicas starting together must agree on one audit HMAC key and on the HYOK switch's
    // first state: whoever creates them does so under the cluster-wide write lock.
    let audit_lock = keyring.write().await?;
    let first_start = {
        let st = store.clone();
        tokio::task::spawn_blocking(move || st.setting(crate::audit::SETTING_KEY_ID))
            .await
            .map_err(|e| StartError::Server(format!("store task failed: {e}")))?
            .map_err(BrokerError::from)?
            .is_none()
    };
    let audit = AuditLog::open(
        AuditSettings {
            path: cfg.path(&cfg.audit.path),
            checkpoint_every: cfg.audit.checkpoint_every,
            checkpoint_interval: Duration::from_millis(cfg.audit.checkpoint_interval_ms),
            sync: cfg.audit.sync,
            allow_truncated: cfg.audit.allow_truncated,
        },
        keyring.hsm().clone(),
        store.clone(),
    )
    .await
    .map_err(StartError::Audit)?;
    let hyok = Arc::new(HyokSwitch::load(store, keyring.hsm().clone(), first_start).await?);
    drop(audit_lock);
    {
        let h = Arc::downgrade(&hyok);
        keyring.on_setting(crate::hyok::SETTING, move |v| {
            if let Some(h) = h.upgrade() {
                h.apply_stored(v);
            }
        });
    }
    keyring.spawn_change_listener();
    keyring.attach_audit(audit.clone());
    external.set_observer(metrics.clone());
    keyring.attach_external(external);
    for r in &report.finished_destructions {
        keyring.write_receipt(r).await?;
    }
    for a in crate::failpoint::armed() {
        tracing::warn!(failpoint = %a, "TEST FAILPOINT ARMED: the broker will abort when it reaches it");
    }
    if crate::failpoint::ignored() {
        tracing::warn!(
            "{} is set but this build has no failpoints (feature `failpoints`): ignored",
            crate::failpoint::ENV
        );
    }
    keyring.spawn_maintenance();
    let keyring_for_shutdown = keyring.clone();
    // Every front door is a codec over this one pipeline.
    let pipeline = Pipeline::new(
        keyring.clone(),
        policy,
        audit.clone(),
        hyok,
        Duration::from_millis(cfg.server.request_timeout_ms),
        Some(metrics.clone()),
    )
    .refusal_limit(cfg.server.refused_per_second, cfg.server.refused_burst);
    let api = GrpcApi::new(pipeline.clone());

    // One shutdown signal for every listener and the probe.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
    }
    let mut side_tasks = Vec::new();

    // Health: the first probe before any listener opens, then one per interval.
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let hsm_health = Arc::new(HsmHealth::default());
    let probe_timeout = Duration::from_millis(cfg.health.probe_timeout_ms);
    // Serving needs the HSM and an audit trail that takes records (a failed audit sync holds
    // until a restart: NOT_SERVING tells the orchestrator so).
    let probe = {
        let hsm = keyring.hsm().clone();
        move || {
            let hsm = hsm.clone();
            async move { hsm.ping().await.map_err(|e| e.to_string()) }
        }
    };
    let audit_verdict = {
        let audit = audit.clone();
        move || health::audit_verdict(&audit)
    };
    let first = health::probe_once(&probe, probe_timeout).await;
    health::publish(&reporter, &hsm_health, Some(first), &audit_verdict).await;
    // The HSM layer's and the audit writer's own verdicts, at once: NOT_SERVING from the
    // moment the HSM layer confirms a lost device or an audit write fails (requests get
    // UNAVAILABLE), SERVING the moment re-initialisation or a write succeeds — without waiting
    // for the next probe.
    side_tasks.push(tokio::spawn({
        let (reporter, state, audit_verdict) =
            (reporter.clone(), hsm_health.clone(), audit_verdict.clone());
        let (mut changes, mut audit_changes, mut stop) =
            (keyring.hsm().health(), audit.failures(), stop_rx.clone());
        async move {
            loop {
                // The HSM layer's new verdict, or `None`: the audit trail's changed (the HSM's
                // last verdict, the probe's or the layer's, stands).
                let hsm = tokio::select! {
                    c = changes.changed() => {
                        if c.is_err() {
                            return Ok(());
                        }
                        let h = changes.borrow_and_update().clone();
                        Some(if h.serving { Ok(()) } else { Err(h.detail) })
                    }
                    // A stopped writer is a failure too (`audit_verdict` says so); the loop
                    // then waits for the HSM's changes alone.
                    _ = audit_changes.changed(), if audit_changes.has_changed().is_ok() => None,
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                };
                health::publish(&reporter, &state, hsm, &audit_verdict).await;
            }
        }
    }));
    side_tasks.push(tokio::spawn({
        let (state, rx) = (hsm_health.clone(), stop_rx.clone());
        let interval = Duration::from_millis(cfg.health.probe_interval_ms);
        async move {
            health::run(
                reporter,
                state,
                interval,
                probe_timeout,
                probe,
                audit_verdict,
                rx,
            )
            .await;
            Ok(())
        }
    }));

    // Server reflection (v1 and v1alpha, which older grpcurl releases ask for).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(keybroker_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| StartError::Server(format!("server reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| StartError::Server(format!("server reflection: {e}")))?;

    if let Some(m) = &cfg.metrics {
        let listener = TcpListener::bind(m.listen).await.map_err(|e| {
            StartError::Listen(format!("metrics: cannot listen on {}: {e}", m.listen))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::Listen(e.to_string()))?;
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the metrics listener is not on loopback: it is plain HTTP without authentication");
        }
        let state = MetricsState {
            metrics: metrics.clone(),
            keyring: keyring.clone(),
            health: hsm_health.clone(),
        };
        tracing::info!(%addr, "serving metrics (/metrics, /healthz)");
        println!("keybroker: metrics on {addr}");
        let stop = stopped(stop_rx.clone());
        side_tasks.push(tokio::spawn(async move {
            metrics::serve(listener, state, stop)
                .await
                .map_err(|e| format!("metrics listener failed: {e}"))
        }));
    }

    if let Some(k) = &cfg.kms_v2 {
        let key =
            KeyName::parse(&k.key).map_err(|e| StartError::Config(format!("kms_v2.key: {e}")))?;
        if keyring.get(&key).is_err() {
            tracing::warn!(key = %key, "kms_v2.key does not exist (yet): Status reports it and Encrypt fails until it is created");
        }
        let path = cfg.path(&k.socket);
        let listener = kms_v2::bind(&path, k.socket_mode).map_err(StartError::Listen)?;
        let svc = KmsV2::new(pipeline.clone(), key, k.justification, probe_timeout);
        tracing::info!(socket = %path.display(), key = %k.key, "serving Kubernetes KMS v2 (local trust: no TLS on the unix socket)");
        println!("keybroker: kms-v2 on {}", path.display());
        let stop = stopped(stop_rx.clone());
        side_tasks.push(tokio::spawn(kms_v2::serve(
            listener,
            path,
            svc,
            audit.clone(),
            stop,
        )));
    }

    if let Some(x) = &cfg.xks {
        let door = XksDoor::load(x, &|p| cfg.path(p), pipeline.clone(), probe_timeout)
            .map_err(StartError::Config)?;
        let listener = TcpListener::bind(x.listen)
            .await
            .map_err(|e| StartError::Listen(format!("xks: cannot listen on {}: {e}", x.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::Listen(e.to_string()))?;
        let settings = HttpsSettings {
            max_connections: x.max_connections,
            handshake_timeout: Duration::from_millis(x.handshake_timeout_ms),
            header_read_timeout: Duration::from_millis(x.header_read_timeout_ms),
            max_body_bytes: xks_door::MAX_BODY_BYTES,
            // A backstop: the pipeline answers (and audits) a request at its deadline first.
            request_timeout: Duration::from_millis(cfg.server.request_timeout_ms)
                + Duration::from_secs(5),
        };
        door.watch(stopped(stop_rx.clone()));
        tracing::info!(%addr, mtls = x.mtls.is_some(), prefixes = x.prefix.len(),
            "serving the AWS XKS proxy API v1 over HTTPS (SigV4)");
        println!("keybroker: xks on {addr}");
        let stop = stopped(stop_rx.clone());
        side_tasks.push(tokio::spawn(async move {
            door.serve(listener, settings, stop).await;
            Ok(())
        }));
    }

    if let Some(x) = &cfg.ekm {
        let door =
            EkmDoor::load(x, &|p| cfg.path(p), pipeline.clone()).map_err(StartError::Config)?;
        let listener = TcpListener::bind(x.listen)
            .await
            .map_err(|e| StartError::Listen(format!("ekm: cannot listen on {}: {e}", x.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::Listen(e.to_string()))?;
        let settings = HttpsSettings {
            max_connections: x.max_connections,
            handshake_timeout: Duration::from_millis(x.handshake_timeout_ms),
            header_read_timeout: Duration::from_millis(x.header_read_timeout_ms),
            max_body_bytes: ekm_door::MAX_BODY_BYTES,
            // A backstop: the pipeline answers (and audits) a request at its deadline first.
            request_timeout: Duration::from_millis(cfg.server.request_timeout_ms)
                + Duration::from_secs(5),
        };
        door.watch(stopped(stop_rx.clone()));
        tracing::info!(%addr, prefixes = x.prefix.len(), client_cn = ?x.client_cn,
            "serving the Azure Managed HSM EKM proxy API 0.1-preview over HTTPS (TLS 1.3, mTLS)");
        println!("keybroker: ekm on {addr}");
        let stop = stopped(stop_rx.clone());
        side_tasks.push(tokio::spawn(async move {
            door.serve(listener, settings, stop).await;
            Ok(())
        }));
    }

    let tls_cfg = tls::Reloadable::load(cfg.tls_paths()).map_err(StartError::Tls)?;
    tls_cfg.watch();
    let listener = TcpListener::bind(cfg.server.listen)
        .await
        .map_err(|e| StartError::Listen(format!("cannot listen on {}: {e}", cfg.server.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Listen(e.to_string()))?;
    let incoming = tls::incoming(
        listener,
        tls_cfg,
        tls::Limits {
            handshake_timeout: Duration::from_millis(cfg.tls.handshake_timeout_ms),
            max_connections: fds.max_connections,
            max_handshakes: cfg.tls.max_handshakes,
            per_identity: cfg.tls.max_connections_per_identity,
        },
    );

    tracing::info!(%addr, "serving keybroker.v1 over mutual TLS 1.3");
    println!("keybroker: listening on {addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    // No tonic `.timeout(...)`: deadlines (the caller's grpc-timeout, capped by
    // request_timeout_ms, timed from the request's headers) are enforced by the pipeline
    // (`api::pipeline`), so that a request that runs out of time is answered DEADLINE_EXCEEDED
    // *and audited*, and its HSM waits are bounded by it; before a handler takes the request
    // (a body still arriving, or never), by the edge layer (`AuditRejections`).
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(cfg.server.max_concurrent_streams)
        // Bounded connection age: a client reconnects, and its certificate is verified in full
        // again; requests in flight get the request timeout to finish.
        .max_connection_age(Duration::from_secs(cfg.server.max_connection_age_s.max(1)))
        .max_connection_age_grace(Duration::from_millis(cfg.server.request_timeout_ms))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .initial_stream_window_size(Some(256 * 1024))
        .initial_connection_window_size(Some(1024 * 1024))
        // Requests tonic refuses before a handler runs are audited too.
        .layer(
            AuditRejections::keybroker(audit.clone())
                .with_request_timeout(Duration::from_millis(cfg.server.request_timeout_ms)),
        )
        .add_service(
            KeyBrokerServer::new(api.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(AuditServer::new(api.clone()))
        .add_service(HyokServer::new(api.clone()))
        .add_service(
            KeyManagementServer::new(api)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx))
        .await
        .map_err(|e| StartError::Server(format!("server failed: {e}")));
    // However the main listener ended, stop the others and wait for them to drain.
    let _ = stop_tx.send(true);
    for t in side_tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "listener failed"),
            Err(e) => tracing::error!(error = %e, "listener task failed"),
        }
    }
    served?;
    // In-flight requests have been answered (serve_with_incoming_shutdown drains them). Save
    // the usage counters and the final audit checkpoint while the HSM is still open, then close
    // it: every session closed (logging out) and C_Finalize.
    keyring_for_shutdown.flush_usage().await;
    audit.close().await;
    keyring_for_shutdown
        .hsm()
        .close(crate::hsm::recovery_drain())
        .await;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is *called*, not when
/// the future is first polled: the broker prints its "listening" line before it polls the
/// shutdown future, and a SIGTERM arriving in between must drain, not kill, the process.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: draining in-flight requests"),
                    _ = int.recv() => tracing::info!("SIGINT: draining in-flight requests"),
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
                std::future::pending::<()>().await;
            }
        }
    }
}
