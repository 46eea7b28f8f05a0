//! The configuration file (TOML). Every key, its default and what it does is documented in
//! `examples/keybroker.toml`. Relative paths are relative to the configuration file's directory.
//! Unknown keys are errors (a typo must not silently weaken security).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use secrecy::SecretString;
use serde::Deserialize;

use crate::{
    hsm::{HsmSettings, TokenSelector},
    keys::IntegrityPolicy,
    pkcs11_uri::{PinSource, Pkcs11Uri},
};

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The gRPC listener.
    #[serde(default)]
    pub server: ServerConfig,
    /// TLS material.
    pub tls: TlsConfig,
    /// The HSM.
    pub hsm: HsmConfig,
    /// The metadata store.
    #[serde(default)]
    pub store: StoreConfig,
    /// Who may call.
    pub access: AccessConfig,
    /// The audit trail.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Soft delete, purge protection, background maintenance.
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The HSM health probe behind `grpc.health.v1`.
    #[serde(default)]
    pub health: HealthConfig,
    /// The Prometheus metrics listener (off unless the section is present).
    pub metrics: Option<MetricsConfig>,
    /// The Kubernetes KMS v2 plugin socket (off unless the section is present).
    pub kms_v2: Option<KmsV2Config>,
    /// The AWS XKS proxy door on its own HTTPS listener (off unless the section is present;
    /// `api::xks::config`).
    pub xks: Option<crate::api::xks::config::XksConfig>,
    /// The Azure Managed HSM EKM proxy door on its own HTTPS listener (off unless the section
    /// is present; `api::ekm::config`).
    pub ekm: Option<crate::api::ekm::config::EkmConfig>,
    /// Remote EKM proxies external keys may live behind (`[[external_proxy]]`, see
    /// `external`; none unless present).
    #[serde(default)]
    pub external_proxy: Vec<crate::external::ExternalProxyConfig>,
    /// The directory relative paths are resolved against (the config file's directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[server]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8443` (loopback).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Longest time a request may run when the client sets no deadline, in ms. Default 30000.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Most concurrent HTTP/2 streams per connection. Default 256.
    #[serde(default = "default_max_streams")]
    pub max_concurrent_streams: u32,
    /// A client connection is closed (gracefully: GOAWAY, in-flight requests finish) after this
    /// many seconds, so that it reconnects and its certificate is verified in full again.
    /// Default 3600.
    #[serde(default = "default_max_connection_age_s")]
    pub max_connection_age_s: u64,
    /// Refused (denied or invalid) requests a caller may make per second, on average, before
    /// its requests are held off (RESOURCE_EXHAUSTED, counted in one audit record instead of
    /// one each). Default 10; 0 turns the limit off.
    #[serde(default = "default_refused_per_second")]
    pub refused_per_second: u32,
    /// Refused requests a caller may make in a burst. Default 100.
    #[serde(default = "default_refused_burst")]
    pub refused_burst: u32,
    /// Most client connections at once. Default (and upper bound): `RLIMIT_NOFILE` less a
    /// quarter of it, at least 128 descriptors, kept for the HSM and the store
    /// (`crate::fdlimit`). Connections over it are closed at once.
    pub max_connections: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            request_timeout_ms: default_request_timeout_ms(),
            max_concurrent_streams: default_max_streams(),
            max_connection_age_s: default_max_connection_age_s(),
            refused_per_second: default_refused_per_second(),
            refused_burst: default_refused_burst(),
            max_connections: None,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_max_streams() -> u32 {
    256
}
fn default_max_connection_age_s() -> u64 {
    3600
}
/// The default for `[server] refused_per_second`.
pub const DEFAULT_REFUSED_PER_SECOND: u32 = 10;
/// The default for `[server] refused_burst`.
pub const DEFAULT_REFUSED_BURST: u32 = 100;
fn default_refused_per_second() -> u32 {
    DEFAULT_REFUSED_PER_SECOND
}
fn default_refused_burst() -> u32 {
    DEFAULT_REFUSED_BURST
}

/// `[tls]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain, PEM.
    pub cert: PathBuf,
    /// Server private key, PEM.
    pub key: PathBuf,
    /// CA bundle that issues client certificates, PEM.
    pub client_ca: PathBuf,
    /// Handshake timeout in ms. Default 10000.
    #[serde(default = "default_handshake_ms")]
    pub handshake_timeout_ms: u64,
    /// Certificate revocation lists (PEM), checked for the whole client chain; a certificate
    /// whose status is unknown is refused. Default: none (no revocation checking).
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// Binds client CAs to the domains they may issue identities in (`[[tls.client_ca_domains]]`
    /// with `ca` and `domains`): a client certificate must then chain to a CA bound to its
    /// SPIFFE trust domain or DNS domain. Default: none (any CA in `client_ca`, any domain).
    #[serde(default)]
    pub client_ca_domains: Vec<crate::tls::CaDomains>,
    /// How long past its nextUpdate a CRL is still accepted, in seconds (then every client
    /// certificate is refused until a fresh CRL is in place). Default 3600.
    #[serde(default = "default_crl_grace_s")]
    pub crl_grace_s: u64,
    /// Most TLS handshakes in progress at once (each costs the server a signature); more
    /// connections wait unaccepted. Default 64.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Most established connections of one client identity at once; more are closed after
    /// their handshake. Default 64.
    #[serde(default = "default_max_connections_per_identity")]
    pub max_connections_per_identity: usize,
}

fn default_max_handshakes() -> usize {
    64
}
fn default_max_connections_per_identity() -> usize {
    64
}

fn default_crl_grace_s() -> u64 {
    3600
}

fn default_handshake_ms() -> u64 {
    10_000
}

/// `[hsm]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// The PKCS#11 module path (or `module-path` in `uri`).
    pub module: Option<PathBuf>,
    /// A PKCS #11 URI (RFC 7512) selecting the module and token, instead of `module` and
    /// `token_label`/`token_serial`/`slot_id`; it may carry `pin-source` (never `pin-value`).
    pub uri: Option<String>,
    /// Token label.
    pub token_label: Option<String>,
    /// Token serial number (preferred: slot ids change on replug).
    pub token_serial: Option<String>,
    /// Slot id.
    pub slot_id: Option<u64>,
    /// File holding the user PIN (trailing newline ignored). One of `pin_file`/`pin_env`.
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    pub pin_env: Option<String>,
    /// Accept a PIN file (`pin_file`, `pin-source=file:` in `uri`, and `domain init
    /// --so-pin-file`) that group or others have permissions on. Default false: such a file is
    /// refused. WARNING: anyone who can read the PIN can use every key in the token.
    #[serde(default)]
    pub allow_insecure_pin_file_permissions: bool,
    /// Sessions in the pool. Default: 2 per CPU, at least 4 (capped by the token).
    pub sessions: Option<usize>,
    /// Longest wait for a free session before RESOURCE_EXHAUSTED, ms. Default 2000.
    #[serde(default = "default_session_wait_ms")]
    pub session_wait_ms: u64,
    /// What to do when a key fails its start-up integrity check. Default `fail`.
    #[serde(default = "default_integrity")]
    pub on_integrity_failure: IntegrityPolicy,
    /// The vendor profile (`broker/src/hsm/profile.rs`): `auto` (default: chosen from the
    /// token's manufacturer/model) or a profile name such as `softhsm2`, `kryoptic`, `luna`.
    #[serde(default)]
    pub profile: Option<String>,
    /// Most requests waiting for a session, all tenants together; more are refused at once
    /// with RESOURCE_EXHAUSTED. Default 256.
    #[serde(default = "default_queue_limit")]
    pub queue_limit: usize,
    /// Most requests of one tenant waiting for a session. Default 64.
    #[serde(default = "default_tenant_queue_limit")]
    pub tenant_queue_limit: usize,
    /// Most sessions one tenant may hold at once. Default: all of them (sessions are shared
    /// round-robin between the tenants that wait, so a hard cap is optional).
    pub tenant_max_sessions: Option<usize>,
    /// How long the broker waits for an HSM call it makes for itself (audit checkpoints,
    /// maintenance), ms. Request calls are bounded by the request's deadline. Default 10000.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
    /// The longest the start-up identity checks (each KEK's canary) may hold up serving, ms.
    /// Within it the checks get a budget sized by the number of versions and the token's
    /// measured speed; versions not proven when it runs out are proven in the background and
    /// before their first use (never served unproven). Default 10000.
    #[serde(default = "default_startup_check_budget_ms")]
    pub startup_check_budget_ms: u64,
    /// What the token must be able to serve for the broker to start, by algorithm:
    /// `aes-256-gcm`, `aes-kwp`, `aes-kw`, `rsa-oaep-sha256`, `rsa-oaep-sha1`, `rsa-oaep` (SHA-256 or
    /// else SHA-1), `rsa-sign` or `ecdsa`. Default `["aes-256-gcm", "rsa-oaep"]` (signing keys
    /// are not required: a token without their mechanisms refuses to create them, saying why). Key types the token cannot serve
    /// are refused per request (FAILED_PRECONDITION, with the reason); e.g.
    /// `["rsa-oaep-sha256"]` serves RSA keys on a token without AES-GCM or RFC 5649
    /// (openCryptoki). `keybroker check-config` shows what the token can do.
    #[serde(default = "default_required_algorithms")]
    pub required_algorithms: Vec<String>,
    /// Accept a token that does not know the KEK template's PKCS#11 2.40 attributes
    /// (`CKA_COPYABLE`, `CKA_DESTROYABLE`, `CKA_ALLOWED_MECHANISMS`; openCryptoki 3.8): keys are
    /// then made without them. Default false: such a token is refused. WARNING: on such a
    /// token anyone holding the PIN can copy a key with more roles and use it with any
    /// mechanism the token has (docs/src/portability.md).
    #[serde(default)]
    pub legacy_template: bool,
}

fn default_required_algorithms() -> Vec<String> {
    crate::hsm::report::DEFAULT_REQUIRED
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn default_queue_limit() -> usize {
    256
}
fn default_tenant_queue_limit() -> usize {
    64
}
fn default_call_timeout_ms() -> u64 {
    10_000
}
fn default_startup_check_budget_ms() -> u64 {
    10_000
}

fn default_session_wait_ms() -> u64 {
    2_000
}
fn default_integrity() -> IntegrityPolicy {
    IntegrityPolicy::Fail
}

/// `[store]`: the embedded SQLite file (`path`, the default) or PostgreSQL (`url`), shared by
/// several replicas.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The SQLite file. Default `keybroker.db` (when no `url` is given).
    pub path: Option<PathBuf>,
    /// A PostgreSQL URL (`postgres://user@host:port/db`, or `host=/run/postgresql` for a unix
    /// socket), without a password.
    pub url: Option<String>,
    /// File holding the PostgreSQL password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the PostgreSQL password.
    pub password_env: Option<String>,
    /// Accept a `password_file` that group or others have permissions on. Default false: such
    /// a file is refused.
    #[serde(default)]
    pub allow_insecure_password_file_permissions: bool,
    /// CA bundle (PEM) that issues the PostgreSQL server's certificate. When set, connections
    /// require TLS and verify the server's certificate and host name.
    pub ca_file: Option<PathBuf>,
    /// PostgreSQL only: how stale this replica's key cache may be, in ms. Default 0: the
    /// store's generation is checked before every request, so a change made through any replica
    /// is in force on every replica from the moment it returns.
    #[serde(default)]
    pub max_staleness_ms: u64,
}

fn default_store_path() -> PathBuf {
    PathBuf::from("keybroker.db")
}

/// Which store a configuration names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL.
    Postgres(String),
}

/// `[access]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// The policy file (see `examples/*-policy.toml`): role bindings and HYOK rules, reloaded
    /// on SIGHUP and on change.
    pub policy_file: Option<PathBuf>,
    /// Development shorthand instead of a policy file: these identities (exact, or globs with
    /// `*`) get every role on every key.
    pub allow: Option<Vec<String>>,
}

/// `[lifecycle]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// Days a soft-deleted key is kept before it is purged: 7-90, default 90.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Purge protection for every key (per-key setting otherwise). Default false.
    #[serde(default)]
    pub purge_protection: bool,
    /// How often scheduled purges, automatic rotations and usage saving run, ms. Default 60000.
    #[serde(default = "default_maintenance_ms")]
    pub maintenance_interval_ms: u64,
    /// Create KEK versions that `BackupKey` can back up: extractable, but only under a trusted
    /// key (`CKA_WRAP_WITH_TRUSTED`), i.e. the security domain's wrap keys, which only the
    /// token's security officer can make (`keybroker domain init`). Default false: KEKs never
    /// leave the HSM in any form. Versions made while it was off can never be backed up.
    #[serde(default)]
    pub backup: bool,
    /// AES-GCM invocations one key version may make with random IVs, across every replica.
    /// Default and maximum 2^32 (NIST SP 800-38D §8.3). The key rotates automatically once half
    /// is reserved; a version whose budget is spent wraps no more.
    #[serde(default = "default_gcm_limit")]
    pub gcm_invocation_limit: u64,
    /// AES-GCM invocations a broker reserves in the store at a time (a crash forfeits the
    /// unspent part of one block per version). Default 65536.
    #[serde(default = "default_gcm_block")]
    pub gcm_reservation_block: u64,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            retention_days: default_retention_days(),
            purge_protection: false,
            maintenance_interval_ms: default_maintenance_ms(),
            backup: false,
            gcm_invocation_limit: default_gcm_limit(),
            gcm_reservation_block: default_gcm_block(),
        }
    }
}

fn default_retention_days() -> u32 {
    90
}
fn default_maintenance_ms() -> u64 {
    60_000
}
fn default_gcm_limit() -> u64 {
    crate::keys::budget::NIST_LIMIT
}
fn default_gcm_block() -> u64 {
    crate::keys::budget::DEFAULT_BLOCK
}

impl LifecycleConfig {
    /// The keyring's settings.
    pub fn settings(&self) -> crate::keys::LifecycleSettings {
        crate::keys::LifecycleSettings {
            retention_ms: i64::from(self.retention_days) * 24 * 3600 * 1000,
            purge_protection: self.purge_protection,
            maintenance_interval: Duration::from_millis(self.maintenance_interval_ms),
            backup: self.backup,
            gcm_limit: self.gcm_invocation_limit,
            gcm_block: self.gcm_reservation_block,
        }
    }
}

/// `[audit]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The audit log (JSON lines). Default `audit.log`.
    #[serde(default = "default_audit_path")]
    pub path: PathBuf,
    /// Write an HSM-authenticated checkpoint after this many records. Default 1000.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// ...or after this many ms with records not yet checkpointed. Default 10000.
    #[serde(default = "default_checkpoint_ms")]
    pub checkpoint_interval_ms: u64,
    /// fdatasync each batch of records before the replies go out. Default true.
    #[serde(default = "default_true")]
    pub sync: bool,
    /// Start even on a log that lacks the last checkpoint the broker recorded. Default false.
    #[serde(default)]
    pub allow_truncated: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: default_audit_path(),
            checkpoint_every: default_checkpoint_every(),
            checkpoint_interval_ms: default_checkpoint_ms(),
            sync: true,
            allow_truncated: false,
        }
    }
}

fn default_audit_path() -> PathBuf {
    PathBuf::from("audit.log")
}
fn default_checkpoint_every() -> u64 {
    1000
}
fn default_checkpoint_ms() -> u64 {
    10_000
}
fn default_true() -> bool {
    true
}

/// `[health]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// How often the HSM is probed (one `C_GenerateRandom`), ms. Default 5000.
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// A probe slower than this counts as failed, ms. Default 2000.
    #[serde(default = "default_probe_timeout_ms")]
    pub probe_timeout_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            probe_interval_ms: default_probe_interval_ms(),
            probe_timeout_ms: default_probe_timeout_ms(),
        }
    }
}

fn default_probe_interval_ms() -> u64 {
    5_000
}
fn default_probe_timeout_ms() -> u64 {
    2_000
}

/// `[metrics]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Plain-HTTP listener for `/metrics` and `/healthz`. Default `127.0.0.1:9464`.
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

/// `[kms_v2]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsV2Config {
    /// The unix socket kube-apiserver connects to.
    pub socket: PathBuf,
    /// The key (`tenant/name`) that encrypts kube-apiserver's DEKs.
    pub key: String,
    /// The socket file's mode. Default 0o600.
    #[serde(default = "default_socket_mode")]
    pub socket_mode: u32,
    /// The access justification every request through the socket carries (the KMS v2 API has
    /// none of its own). Only needed when the socket's peers (`unix:uid=N`) are listed as HYOK
    /// service identities, whose key use needs a justification the key accepts.
    #[serde(default)]
    pub justification: Option<crate::policy::Reason>,
}

fn default_socket_mode() -> u32 {
    0o600
}

/// `[log]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        let mut cfg: Config =
            toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))?;
        cfg.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        cfg.validate()
            .map_err(|e| format!("config {}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// The parsed `[hsm] uri`, if any (validated at load).
    pub fn hsm_uri(&self) -> Result<Option<Pkcs11Uri>, String> {
        self.hsm
            .uri
            .as_deref()
            .map(|u| Pkcs11Uri::parse(u).map_err(|e| format!("hsm.uri: {e}")))
            .transpose()
    }

    /// `[hsm] required_algorithms`, parsed (validated at load).
    pub fn required_algorithms(&self) -> Vec<crate::hsm::report::Required> {
        self.hsm
            .required_algorithms
            .iter()
            .filter_map(|n| crate::hsm::report::Required::parse(n))
            .collect()
    }

    fn validate_hsm(&self) -> Result<(), String> {
        let h = &self.hsm;
        if h.required_algorithms.is_empty() {
            return Err(format!(
                "hsm.required_algorithms is empty; name at least one of {}",
                crate::hsm::report::REQUIRED_NAMES.join(", ")
            ));
        }
        for n in &h.required_algorithms {
            if crate::hsm::report::Required::parse(n).is_none() {
                return Err(format!(
                    "hsm.required_algorithms: {n:?} is not an algorithm; known: {}",
                    crate::hsm::report::REQUIRED_NAMES.join(", ")
                ));
            }
        }
        let uri = self.hsm_uri()?;
        let uri_pin = uri.as_ref().is_some_and(|u| u.pin_source.is_some());
        let pins = [uri_pin, h.pin_file.is_some(), h.pin_env.is_some()];
        if pins.iter().filter(|p| **p).count() != 1 {
            return Err(if uri.is_some() {
                "set exactly one PIN source: pin-source in hsm.uri, hsm.pin_file or hsm.pin_env (a PIN is never written inline)".into()
            } else {
                "set exactly one of hsm.pin_file and hsm.pin_env (a PIN is never written inline)"
                    .into()
            });
        }
        match uri {
            Some(u) => {
                if !u.object_attributes.is_empty() {
                    return Err(format!(
                        "hsm.uri names objects ({}): it selects the token only; the broker finds its keys itself",
                        u.object_attributes.join(", ")
                    ));
                }
                if h.token_label.is_some() || h.token_serial.is_some() || h.slot_id.is_some() {
                    return Err("with hsm.uri, select the token in the URI, not with hsm.token_label, hsm.token_serial or hsm.slot_id".into());
                }
                match (&u.module_path, &h.module) {
                    (Some(_), Some(_)) => {
                        return Err(
                            "name the module once: module-path in hsm.uri or hsm.module".into()
                        );
                    }
                    (None, None) => {
                        return Err(
                            "hsm.uri has no module-path; add ?module-path=/path/to/module.so or set hsm.module".into(),
                        );
                    }
                    _ => {}
                }
                if !u.selects_token() {
                    return Err("hsm.uri selects no token: give token, serial, slot-id (or manufacturer, model, slot-description, slot-manufacturer)".into());
                }
            }
            None => {
                if h.module.is_none() {
                    return Err("set hsm.module (or hsm.uri with module-path)".into());
                }
                if h.token_label.is_none() && h.token_serial.is_none() && h.slot_id.is_none() {
                    return Err(
                        "select the token with hsm.token_serial, hsm.token_label or hsm.slot_id (or hsm.uri)"
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        self.validate_hsm()?;
        match (&self.access.policy_file, &self.access.allow) {
            (Some(_), Some(_)) | (None, None) => {
                return Err("set exactly one of access.policy_file and access.allow".into());
            }
            (None, Some(a)) if a.is_empty() => {
                return Err("access.allow is empty: nobody could call the broker".into());
            }
            (None, Some(a)) => {
                crate::policy::Policy::allow_all(a)?;
            }
            _ => {}
        }
        if !(7..=90).contains(&self.lifecycle.retention_days) {
            return Err("lifecycle.retention_days must be between 7 and 90".into());
        }
        if self.lifecycle.maintenance_interval_ms < 100 {
            return Err("lifecycle.maintenance_interval_ms must be at least 100".into());
        }
        let (limit, block) = (
            self.lifecycle.gcm_invocation_limit,
            self.lifecycle.gcm_reservation_block,
        );
        if !(2..=crate::keys::budget::NIST_LIMIT).contains(&limit) {
            return Err(format!(
                "lifecycle.gcm_invocation_limit must be 2 to 2^32 (NIST SP 800-38D's bound for random IVs), not {limit}"
            ));
        }
        if block == 0 || block > limit {
            return Err(format!(
                "lifecycle.gcm_reservation_block must be 1 to gcm_invocation_limit ({limit}), not {block}"
            ));
        }
        if self.audit.checkpoint_every == 0 || self.audit.checkpoint_interval_ms == 0 {
            return Err(
                "audit.checkpoint_every and audit.checkpoint_interval_ms must be positive".into(),
            );
        }
        if let Some(p) = self.hsm.profile.as_deref()
            && p != "auto"
            && crate::hsm::profile::by_name(p).is_none()
        {
            return Err(format!(
                "hsm.profile {p:?} is unknown; known: auto, {}",
                crate::hsm::profile::names().join(", ")
            ));
        }
        if self.hsm.queue_limit == 0 || self.hsm.tenant_queue_limit == 0 {
            return Err("hsm.queue_limit and hsm.tenant_queue_limit must be positive".into());
        }
        if self.hsm.tenant_max_sessions == Some(0) {
            return Err("hsm.tenant_max_sessions must be positive".into());
        }
        if self.hsm.call_timeout_ms == 0 || self.server.request_timeout_ms == 0 {
            return Err(
                "hsm.call_timeout_ms and server.request_timeout_ms must be positive".into(),
            );
        }
        if self.tls.handshake_timeout_ms == 0 {
            return Err("tls.handshake_timeout_ms must be positive".into());
        }
        if self.health.probe_interval_ms == 0 || self.health.probe_timeout_ms == 0 {
            return Err(
                "health.probe_interval_ms and health.probe_timeout_ms must be positive".into(),
            );
        }
        self.validate_store()?;
        if let Some(x) = &self.xks {
            x.validate()?;
            if x.listen == self.server.listen && x.listen.port() != 0 {
                return Err(format!(
                    "xks.listen {} is server.listen too: the XKS door needs its own address",
                    x.listen
                ));
            }
        }
        if let Some(x) = &self.ekm {
            x.validate()?;
            if x.listen == self.server.listen && x.listen.port() != 0 {
                return Err(format!(
                    "ekm.listen {} is server.listen too: the EKM door needs its own address",
                    x.listen
                ));
            }
            if let Some(k) = &self.xks
                && k.listen == x.listen
                && x.listen.port() != 0
            {
                return Err(format!(
                    "ekm.listen {} is xks.listen too: each door needs its own address",
                    x.listen
                ));
            }
        }
        if let Some(k) = &self.kms_v2 {
            crate::model::KeyName::parse(&k.key).map_err(|e| format!("kms_v2.key: {e}"))?;
            if k.socket.as_os_str().is_empty() {
                return Err("kms_v2.socket is empty".into());
            }
            if k.socket_mode & 0o7777 != k.socket_mode || k.socket_mode & 0o007 != 0 {
                return Err(format!(
                    "kms_v2.socket_mode {:o} must be a file mode without access for others (e.g. 0o600 or 0o660)",
                    k.socket_mode
                ));
            }
        }
        Ok(())
    }

    fn validate_store(&self) -> Result<(), String> {
        let s = &self.store;
        match (&s.path, &s.url) {
            (Some(_), Some(_)) => {
                return Err("set one of store.path (SQLite) and store.url (PostgreSQL)".into());
            }
            (_, Some(url)) => {
                if !(url.starts_with("postgres://")
                    || url.starts_with("postgresql://")
                    || url.contains('='))
                {
                    return Err(format!(
                        "store.url must be a PostgreSQL URL (postgres://user@host:port/db), not {url:?}"
                    ));
                }
                let parsed: tokio_postgres::Config = url
                    .parse()
                    .map_err(|e| format!("store.url is not a valid PostgreSQL URL: {e}"))?;
                if parsed.get_password().is_some() {
                    return Err("store.url carries a password; a password is never written inline: use store.password_file or store.password_env".into());
                }
                if s.password_file.is_some() && s.password_env.is_some() {
                    return Err(
                        "set at most one of store.password_file and store.password_env".into(),
                    );
                }
                let wants_tls = url.contains("sslmode=require") || url.contains("sslmode=verify");
                if wants_tls && s.ca_file.is_none() {
                    return Err("store.url asks for TLS: give store.ca_file, the CA that issues the server's certificate (keybroker always verifies it)".into());
                }
            }
            (_, None) => {
                if s.password_file.is_some() || s.password_env.is_some() || s.ca_file.is_some() {
                    return Err(
                        "store.password_file/password_env/ca_file need store.url (PostgreSQL)"
                            .into(),
                    );
                }
                if s.max_staleness_ms != 0 {
                    return Err(
                        "store.max_staleness_ms applies to PostgreSQL (store.url) only".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The store this configuration names.
    pub fn store_location(&self) -> StoreLocation {
        match &self.store.url {
            Some(u) => StoreLocation::Postgres(u.clone()),
            None => StoreLocation::Sqlite(
                self.path(self.store.path.as_deref().unwrap_or(&default_store_path())),
            ),
        }
    }

    /// Reads the PostgreSQL password from its file or environment variable (`None`: not set,
    /// e.g. peer or trust authentication over a unix socket).
    pub fn read_store_password(&self) -> Result<Option<SecretString>, String> {
        if let Some(f) = &self.store.password_file {
            return crate::secrets::read_file(
                &self.path(f),
                crate::secrets::FileRule {
                    what: "store.password_file",
                    option: "store.allow_insecure_password_file_permissions",
                    allow_insecure: self.store.allow_insecure_password_file_permissions,
                },
            )
            .map(Some);
        }
        if let Some(var) = &self.store.password_env {
            return crate::secrets::read_env(var)?
                .ok_or_else(|| {
                    format!("environment variable {var} (store.password_env) is not set")
                })
                .map(Some);
        }
        Ok(None)
    }

    /// The TLS connector for PostgreSQL (`store.ca_file`), if configured.
    pub fn store_tls(&self) -> Result<Option<crate::store::postgres::Tls>, String> {
        self.store
            .ca_file
            .as_ref()
            .map(|f| {
                crate::store::postgres::tls_from_ca_file(&self.path(f)).map_err(|e| e.to_string())
            })
            .transpose()
    }

    /// Opens the configured store (blocking: call it from a blocking thread).
    pub fn open_store(&self) -> Result<crate::store::Store, String> {
        use secrecy::ExposeSecret;
        match self.store_location() {
            StoreLocation::Sqlite(p) => crate::store::Store::open(&p).map_err(|e| e.to_string()),
            StoreLocation::Postgres(url) => {
                let pw = self.read_store_password()?;
                let tls = self.store_tls()?;
                crate::store::PgStore::open(&url, pw.as_ref().map(|p| p.expose_secret()), tls)
                    .map(crate::store::Store::Postgres)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Resolves a path against the config file's directory.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The TLS files, resolved against the configuration's directory.
    pub fn tls_paths(&self) -> crate::tls::TlsPaths {
        crate::tls::TlsPaths {
            cert: self.path(&self.tls.cert),
            key: self.path(&self.tls.key),
            client_ca: self.path(&self.tls.client_ca),
            crls: self.tls.crl.iter().map(|p| self.path(p)).collect(),
            ca_domains: self
                .tls
                .client_ca_domains
                .iter()
                .map(|b| crate::tls::CaDomains {
                    ca: self.path(&b.ca),
                    domains: b.domains.clone(),
                })
                .collect(),
            crl_grace: Duration::from_secs(self.tls.crl_grace_s),
        }
    }

    /// The access policy in force at start-up.
    pub fn policy(&self) -> Result<crate::policy::PolicyHandle, String> {
        match (&self.access.policy_file, &self.access.allow) {
            (Some(f), _) => crate::policy::PolicyHandle::load(&self.path(f)),
            (None, Some(a)) => Ok(crate::policy::PolicyHandle::fixed(
                crate::policy::Policy::allow_all(a)?,
            )),
            (None, None) => Err("no access policy configured".into()),
        }
    }

    /// Reads the PIN from its file or environment variable.
    pub fn read_pin(&self) -> Result<SecretString, String> {
        let from_uri = self.hsm_uri()?.and_then(|u| u.pin_source);
        let in_uri = from_uri.is_some();
        let (pin_file, pin_env) = match from_uri {
            Some(PinSource::File(f)) => (Some(f), None),
            Some(PinSource::Env(v)) => (None, Some(v)),
            None => (self.hsm.pin_file.clone(), self.hsm.pin_env.clone()),
        };
        use secrecy::ExposeSecret;
        if let Some(f) = &pin_file {
            let what = if in_uri {
                "the pin-source file of hsm.uri"
            } else {
                "hsm.pin_file"
            };
            let f = self.path(f);
            let pin = crate::secrets::read_file(&f, self.pin_file_rule(what))?;
            if pin.expose_secret().is_empty() {
                return Err(format!("{what} {} is empty", f.display()));
            }
            return Ok(pin);
        }
        if let Some(var) = &pin_env {
            let pin = crate::secrets::read_env(var)?
                .ok_or_else(|| format!("environment variable {var} (hsm.pin_env) is not set"))?;
            if pin.expose_secret().is_empty() {
                return Err(format!("environment variable {var} (hsm.pin_env) is empty"));
            }
            return Ok(pin);
        }
        Err("no PIN source configured".into())
    }

    /// How a PIN file's permissions are judged (`what` names it in messages).
    pub fn pin_file_rule<'a>(&self, what: &'a str) -> crate::secrets::FileRule<'a> {
        crate::secrets::FileRule {
            what,
            option: "hsm.allow_insecure_pin_file_permissions",
            allow_insecure: self.hsm.allow_insecure_pin_file_permissions,
        }
    }

    /// The HSM settings, with the PIN.
    pub fn hsm_settings(&self, pin: SecretString) -> HsmSettings {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let uri = self.hsm_uri().ok().flatten();
        let module = uri
            .as_ref()
            .and_then(|u| u.module_path.clone())
            .or_else(|| self.hsm.module.clone())
            .unwrap_or_default();
        let token = match uri {
            Some(u) => TokenSelector {
                label: u.token,
                serial: u.serial,
                slot: u.slot_id,
                manufacturer: u.manufacturer,
                model: u.model,
                slot_description: u.slot_description,
                slot_manufacturer: u.slot_manufacturer,
                library_manufacturer: u.library_manufacturer,
                library_description: u.library_description,
                library_version: u.library_version,
            },
            None => TokenSelector {
                label: self.hsm.token_label.clone(),
                serial: self.hsm.token_serial.clone(),
                slot: self.hsm.slot_id,
                ..Default::default()
            },
        };
        HsmSettings {
            module: self.path(&module),
            token,
            pin,
            sessions: self.hsm.sessions.unwrap_or((cpus * 2).max(4)),
            acquire_timeout: Duration::from_millis(self.hsm.session_wait_ms),
            profile: self.hsm.profile.clone().filter(|p| p != "auto"),
            queue_limit: self.hsm.queue_limit,
            tenant_queue_limit: self.hsm.tenant_queue_limit,
            tenant_max_sessions: self.hsm.tenant_max_sessions,
            call_timeout: Duration::from_millis(self.hsm.call_timeout_ms),
            startup_check_budget: Duration::from_millis(self.hsm.startup_check_budget_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let p = dir.path().join("k.toml");
        std::fs::write(&p, s).map_err(|e| e.to_string())?;
        Config::load(&p)
    }

    const MINIMAL: &str = r#"
[tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "kb"
pin_env = "KB_PIN"
[access]
allow = ["spiffe://example.org/app"]
"#;

    #[test]
    fn minimal_config_gets_secure_defaults() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(c.hsm.on_integrity_failure, IntegrityPolicy::Fail);
        assert!(c.metrics.is_none() && c.kms_v2.is_none());
        assert_eq!(c.health.probe_interval_ms, 5000);
        assert!(c.path(&c.tls.cert).ends_with("server.pem"));
        assert!(c.path(&c.tls.cert).is_absolute() || c.path(&c.tls.cert).starts_with(&c.base_dir));
    }

    #[test]
    fn the_commented_example_config_is_valid() {
        let c = parse(include_str!("../../examples/keybroker.toml"))
            .expect("examples/keybroker.toml is valid");
        assert_eq!(c.access.allow.as_ref().map(Vec::len), Some(2));
        assert_eq!(c.hsm.token_label.as_deref(), Some("keybroker"));
        let m = c.metrics.expect("[metrics] in the example");
        assert_eq!(m.listen.to_string(), "127.0.0.1:9464");
    }

    #[test]
    fn the_gcm_budget_is_at_most_nist_s_bound_and_its_block_fits_in_it() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.lifecycle.settings().gcm_limit, 1 << 32);
        for (extra, needle) in [
            (
                "gcm_invocation_limit = 4294967297",
                "gcm_invocation_limit must be 2 to 2^32",
            ),
            (
                "gcm_invocation_limit = 1",
                "gcm_invocation_limit must be 2 to 2^32",
            ),
            (
                "gcm_invocation_limit = 10\ngcm_reservation_block = 11",
                "gcm_reservation_block must be 1 to gcm_invocation_limit (10), not 11",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}[lifecycle]\n{extra}\n")).expect_err(extra);
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn kms_v2_section_is_checked() {
        let ok = parse(&format!(
            "{MINIMAL}[kms_v2]\nsocket = \"/run/kmsplugin/kb.sock\"\nkey = \"k8s/etcd\"\n"
        ))
        .expect("valid");
        let k = ok.kms_v2.expect("section");
        assert_eq!((k.key.as_str(), k.socket_mode), ("k8s/etcd", 0o600));
        let e = parse(&format!(
            "{MINIMAL}[kms_v2]\nsocket = \"/run/kb.sock\"\nkey = \"a/b/c\"\n"
        ))
        .expect_err("bad key");
        assert!(e.contains("kms_v2.key"), "{e}");
        let e = parse(&format!(
            "{MINIMAL}[kms_v2]\nsocket = \"/run/kb.sock\"\nkey = \"k\"\nsocket_mode = 0o666\n"
        ))
        .expect_err("world-writable");
        assert!(e.contains("socket_mode"), "{e}");
    }

    #[test]
    fn the_managed_hsm_and_hyok_examples_are_valid_with_their_policies() {
        for name in ["managed-hsm", "hyok"] {
            let path =
                Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/{name}.toml"));
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            let policy = c.policy().unwrap_or_else(|e| panic!("{name}: {e}")).get();
            assert!(!policy.bindings.is_empty(), "{name}");
            assert_eq!(policy.hyok.is_some(), name == "hyok", "{name}");
        }
    }

    #[test]
    fn a_pkcs11_uri_selects_module_token_and_pin() {
        let uri = MINIMAL
            .replace("module = \"/usr/lib/softhsm/libsofthsm2.so\"\n", "")
            .replace("token_label = \"kb\"\n", "")
            .replace(
                "pin_env = \"KB_PIN\"",
                "uri = \"pkcs11:token=prod;serial=42;slot-id=0?module-path=/usr/lib/x.so&pin-source=file:/etc/kb/pin\"",
            );
        let c = parse(&uri).expect("valid");
        let s = c.hsm_settings(SecretString::from(String::new()));
        assert_eq!(s.module, PathBuf::from("/usr/lib/x.so"));
        assert_eq!(
            (
                s.token.label.as_deref(),
                s.token.serial.as_deref(),
                s.token.slot
            ),
            (Some("prod"), Some("42"), Some(0))
        );
        let e = c.read_pin().expect_err("no such file");
        assert!(e.contains("/etc/kb/pin"), "{e}");
        for (text, why) in [
            (
                uri.replace("pin-source=file:/etc/kb/pin", "pin-value=1234"),
                "pin-value is refused: a PIN is never written inline",
            ),
            (
                uri.replace("[hsm]\n", "[hsm]\npin_env = \"KB_PIN\"\n"),
                "set exactly one PIN source",
            ),
            (
                uri.replace("[hsm]\n", "[hsm]\ntoken_label = \"kb\"\n"),
                "with hsm.uri, select the token in the URI",
            ),
            (
                uri.replace("[hsm]\n", "[hsm]\nmodule = \"/usr/lib/y.so\"\n"),
                "name the module once",
            ),
            (
                uri.replace("?module-path=/usr/lib/x.so&", "?"),
                "hsm.uri has no module-path",
            ),
            (
                uri.replace("token=prod;serial=42;slot-id=0", "object=k"),
                "hsm.uri names objects (object)",
            ),
            (
                uri.replace("token=prod;serial=42;slot-id=0", "library-version=1"),
                "hsm.uri selects no token",
            ),
        ] {
            let e = parse(&text).expect_err(why);
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn the_store_is_sqlite_by_default_or_postgres_by_url_without_an_inline_password() {
        let c = parse(MINIMAL).expect("valid");
        match c.store_location() {
            StoreLocation::Sqlite(p) => assert!(p.ends_with("keybroker.db"), "{p:?}"),
            other => panic!("{other:?}"),
        }
        let pg = parse(&format!(
            "{MINIMAL}[store]\nurl = \"postgres://kb@db.internal:5432/kb\"\npassword_env = \"KB_DB\"\n"
        ))
        .expect("valid");
        assert_eq!(
            pg.store_location(),
            StoreLocation::Postgres("postgres://kb@db.internal:5432/kb".into())
        );
        for (store, why) in [
            (
                "url = \"postgres://kb:hunter2@db/kb\"",
                "store.url carries a password",
            ),
            (
                "url = \"postgres://kb@db/kb\"\npath = \"x.db\"",
                "set one of store.path (SQLite) and store.url (PostgreSQL)",
            ),
            (
                "url = \"mysql://db/kb\"",
                "store.url must be a PostgreSQL URL",
            ),
            (
                "path = \"x.db\"\npassword_env = \"X\"",
                "store.password_file/password_env/ca_file need store.url",
            ),
            (
                "url = \"postgres://kb@db/kb\"\npassword_env = \"X\"\npassword_file = \"f\"",
                "set at most one of store.password_file and store.password_env",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}[store]\n{store}\n")).expect_err(why);
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn unknown_keys_and_inline_pins_are_refused() {
        let e =
            parse(&MINIMAL.replace("pin_env = \"KB_PIN\"", "pin = \"1234\"")).expect_err("refused");
        assert!(e.contains("pin"), "{e}");
        let e = parse(&MINIMAL.replace(
            "[access]\nallow = [\"spiffe://example.org/app\"]",
            "[access]\nallow = []",
        ))
        .expect_err("refused");
        assert!(e.contains("access.allow"), "{e}");
    }

    /// A random 64-letter PIN, in a buffer that is wiped when dropped, and the same PIN XORed
    /// with 0x5a (so the test's own copy never matches a scan).
    fn marker_pin() -> (zeroize::Zeroizing<Vec<u8>>, Vec<u8>) {
        let mut r = [0u8; 64];
        getrandom::fill(&mut r).expect("random");
        let pin: Vec<u8> = r.iter().map(|b| b'A' + b % 26).collect();
        let masked = pin.iter().map(|b| b ^ 0x5a).collect();
        (zeroize::Zeroizing::new(pin), masked)
    }

    /// Whether the bytes `masked` stands for (each XOR 0x5a) are anywhere in this process's
    /// writable memory (heaps, anonymous maps, stacks), read through /proc/self/mem.
    fn in_my_memory(masked: &[u8]) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
        let regions: Vec<(u64, u64)> = maps
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let range = it.next()?;
                let perms = it.next()?;
                if !perms.starts_with("rw") || l.contains("[v") {
                    return None;
                }
                let (a, b) = range.split_once('-')?;
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            })
            .collect();
        let mut mem = std::fs::File::open("/proc/self/mem").expect("/proc/self/mem");
        // Compared through the mask, byte by byte: the plain needle never exists in memory.
        let matches_at = |chunk: &[u8], i: usize| {
            chunk[i..i + masked.len()]
                .iter()
                .zip(masked)
                .all(|(m, k)| m ^ 0x5a == *k)
        };
        let mut buf = vec![0u8; 1 << 20];
        for (start, end) in regions {
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(buf.len() as u64) as usize;
                if mem.seek(SeekFrom::Start(pos)).is_err() {
                    break;
                }
                let r = match mem.read(&mut buf[..n]) {
                    Ok(0) | Err(_) => break,
                    Ok(r) => r,
                };
                let chunk = &buf[..r];
                let first = masked[0] ^ 0x5a;
                let mut i = 0;
                while i + masked.len() <= chunk.len() {
                    if chunk[i] == first && matches_at(chunk, i) {
                        return true;
                    }
                    i += 1;
                }
                if r < masked.len() {
                    break;
                }
                pos += (r - masked.len() + 1) as u64;
            }
        }
        false
    }

    /// Reads a secret through `read` from a file holding a fresh random PIN, drops it, and
    /// asserts that no copy of the PIN is left in memory unwiped (a buffer freed without
    /// zeroizing keeps its bytes until reused). Only the last 32 of its 64 letters are looked
    /// for: the allocator writes its own list pointers over the first bytes of a freed block.
    fn assert_read_leaves_no_copy(
        what: &str,
        text: impl Fn(&Path) -> String,
        read: impl Fn(&Config) -> Result<SecretString, String>,
    ) {
        use secrecy::ExposeSecret;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("secret");
        let (pin, masked) = marker_pin();
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .expect("create the secret file");
            f.write_all(&pin).expect("write");
            f.write_all(b"\n").expect("write");
        }
        let cfg = parse(&text(&file)).expect("valid config");
        let secret = read(&cfg).expect("read the secret");
        assert!(
            secret.expose_secret().as_bytes() == &pin[..],
            "{what}: the secret read is the file's first line"
        );
        drop(secret);
        drop(pin);
        assert!(
            !in_my_memory(&masked[32..]),
            "{what}: a copy of the secret was freed without being wiped"
        );
    }

    #[test]
    fn reading_the_pin_or_the_store_password_leaves_no_unwiped_copy_in_memory() {
        assert_read_leaves_no_copy(
            "hsm.pin_file",
            |f| {
                MINIMAL.replace(
                    "pin_env = \"KB_PIN\"",
                    &format!("pin_file = {:?}", f.display().to_string()),
                )
            },
            Config::read_pin,
        );
        assert_read_leaves_no_copy(
            "store.password_file",
            |f| {
                format!(
                    "{MINIMAL}[store]\nurl = \"postgres://kb@db/kb\"\npassword_file = {:?}\n",
                    f.display().to_string()
                )
            },
            |c| {
                c.read_store_password()
                    .and_then(|p| p.ok_or_else(|| "none".to_string()))
            },
        );
    }
}
