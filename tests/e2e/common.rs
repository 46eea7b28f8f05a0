//! The end-to-end harness: a private token and test PKI per test, the real `keybroker` binary
//! started as a child process (SoftHSM2 and Kryoptic read their configuration once per process,
//! so each broker gets its own token), clients over real mutual TLS.
//!
//! The token implementation is `KEYBROKER_TEST_TOKEN=softhsm` (default), `kryoptic` or
//! `opencryptoki` (`tests/run` runs the suite once with each). A test that needs a capability
//! one token lacks calls [`skip`] (or [`require_aes!`](crate::require_aes)), which prints the
//! reason, instead of passing silently.
//!
//! openCryptoki 3.8.1 has no AES-GCM and no RFC 5649: its brokers are configured as an
//! operator would for an RSA-only deployment (`required_algorithms = ["rsa-oaep-sha256"]`,
//! `legacy_template = true`, docs/src/portability.md), and the tests that need AES keys skip
//! with the reason printed.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::OnceLock,
    time::Duration,
};

use hsm_fixtures::{
    fault::FaultControl,
    pki::{Issued, TEST_CLIENT_ID, TEST_DNS_CLIENT, TestPki},
    token::{TestToken, TokenKind},
};
use keybroker::client::{ClientSettings, Clients, clients};
use keybroker_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The keybroker binary under test.
pub const BROKER: &str = env!("CARGO_BIN_EXE_keybroker");

/// One test's world: token, PKI, config, database — in a temporary directory.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub token: TestToken,
    pub pki: TestPki,
    pub config: PathBuf,
    pub opts: Options,
    /// With [`Options::faults`]: the fault module's control file and log.
    pub faults: Option<FaultControl>,
}

/// Extra `[hsm]` lines, e.g. `on_integrity_failure = "quarantine"`.
#[derive(Default, Clone)]
pub struct Options {
    pub hsm_extra: String,
    /// Whole sections appended to the config, e.g. `[metrics]\nlisten = "127.0.0.1:0"`.
    pub sections: String,
    /// RUST_LOG for the broker (default `info,cryptoki=off`).
    pub rust_log: Option<String>,
    /// A policy file's text; without one the config allows the test client identities.
    pub policy: Option<String>,
    /// Extra `[audit]` lines.
    pub audit_extra: String,
    /// Extra `[tls]` lines.
    pub tls_extra: String,
    /// A command prefix for the broker (e.g. `prlimit --fsize=N --`).
    pub wrapper: Vec<String>,
    /// Extra `[lifecycle]` lines.
    pub lifecycle_extra: String,
    /// The `[store]` lines instead of the default `path = "keybroker.db"` (e.g. a PostgreSQL
    /// `url`).
    pub store: Option<String>,
    /// Load the token through the fault-injecting module (`hsm_fixtures::fault`).
    pub faults: bool,
    /// Extra `[server]` lines.
    pub server_extra: String,
    /// `[hsm] sessions` (default 4).
    pub sessions: Option<usize>,
}

impl Env {
    pub fn new() -> Self {
        Self::with(Options::default())
    }

    pub fn with(opts: Options) -> Self {
        Self::of(token_kind(), opts)
    }

    /// An env on a token of the given kind, whatever `KEYBROKER_TEST_TOKEN` says.
    pub fn of(kind: TokenKind, opts: Options) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let label = format!("kb-{}", &hex_id()[..12]);
        let token = TestToken::create(kind, &dir.path().join("hsm"), &label, &hsm_probe())
            .unwrap_or_else(|e| {
                panic!(
                    "{} token: {e} (tests/run installs SoftHSM2 and builds Kryoptic)",
                    kind.name()
                )
            });
        let pki = TestPki::generate(&dir.path().join("pki")).expect("test PKI");
        let faults = opts.faults.then(|| {
            FaultControl::new(&dir.path().join("faults"), &token.module).expect("fault module")
        });
        let module = faults
            .as_ref()
            .map_or_else(|| token.module.clone(), FaultControl::module);
        let config = dir.path().join("keybroker.toml");
        // What an operator sets for openCryptoki (docs/src/portability.md).
        let token_extra = if kind.has_aes() {
            ""
        } else {
            "required_algorithms = [\"rsa-oaep-sha256\"]\nlegacy_template = true\n"
        };
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
{server_extra}
[tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
handshake_timeout_ms = 3000
{tls_extra}
[hsm]
module = "{module}"
token_label = "{label}"
pin_file = "{pin}"
sessions = {sessions}
{token_extra}{extra}
[store]
{store}
[audit]
path = "audit.log"
{audit_extra}
[lifecycle]
{lifecycle_extra}
[access]
{access}
{sections}
"#,
            label = token.label,
            cert = pki.server.cert_path.display(),
            key = pki.server.key_path.display(),
            ca = pki.ca.cert_path.display(),
            module = module.display(),
            server_extra = opts.server_extra,
            sessions = opts.sessions.unwrap_or(4),
            pin = token.pin_file.display(),
            extra = opts.hsm_extra,
            tls_extra = opts.tls_extra,
            audit_extra = opts.audit_extra,
            lifecycle_extra = opts.lifecycle_extra,
            access = match &opts.policy {
                Some(text) => {
                    std::fs::write(dir.path().join("policy.toml"), text).expect("write policy");
                    "policy_file = \"policy.toml\"".to_string()
                }
                None => format!("allow = [\"{TEST_CLIENT_ID}\", \"{TEST_DNS_CLIENT}\"]"),
            },
            sections = opts.sections,
            store = opts.store.as_deref().unwrap_or("path = \"keybroker.db\""),
        );
        std::fs::write(&config, text).expect("write config");
        Self {
            dir,
            token,
            pki,
            config,
            opts,
            faults,
        }
    }

    /// The environment the broker needs: the token's, and the fault module's if any.
    pub fn broker_env(&self) -> Vec<(String, String)> {
        let mut env = self.token.env();
        if let Some(f) = &self.faults {
            env.extend(f.env());
        }
        env
    }

    /// The fault module's controls (the env must have been made with `faults: true`).
    pub fn faults(&self) -> &FaultControl {
        self.faults
            .as_ref()
            .expect("this Env was made with Options { faults: true, .. }")
    }

    /// The audit log file.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// The policy file.
    /// Every record of the audit log, parsed.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_log())
            .expect("audit log")
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    pub fn policy_file(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    /// Runs `keybroker audit verify` on `file` with this env's config; returns (success, stdout).
    pub fn verify_audit(&self, file: &Path) -> (bool, String) {
        let out = std::process::Command::new(BROKER)
            .args(["audit", "verify"])
            .arg(file)
            .arg("--config")
            .arg(&self.config)
            .envs(self.broker_env())
            .env("RUST_LOG", "warn,cryptoki=off")
            .output()
            .expect("run keybroker audit verify");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Rewrites the config file.
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config).expect("read config");
        std::fs::write(&self.config, f(text)).expect("write config");
    }

    /// Starts the broker and waits until it listens.
    pub async fn start(&self) -> Broker {
        self.try_start()
            .await
            .unwrap_or_else(|e| panic!("broker did not start: {e}"))
    }

    /// Starts the broker; `Err` carries its stderr if it exits before listening.
    pub async fn try_start(&self) -> Result<Broker, String> {
        self.try_start_with(&[]).await
    }

    /// Starts the broker with extra environment variables (e.g. `KEYBROKER_FAILPOINTS`).
    pub async fn try_start_with(&self, envs: &[(&str, &str)]) -> Result<Broker, String> {
        self.try_start_config(&self.config, envs).await
    }

    /// Starts a broker with another config file (e.g. a second replica on the same token).
    pub async fn try_start_config(
        &self,
        config: &Path,
        envs: &[(&str, &str)],
    ) -> Result<Broker, String> {
        let mut cmd = match self.opts.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = tokio::process::Command::new(first);
                c.args(rest).arg(BROKER);
                c
            }
            None => tokio::process::Command::new(BROKER),
        };
        let mut child = cmd
            .args(["serve", "--config"])
            .arg(config)
            .envs(self.broker_env())
            .envs(envs.iter().copied())
            .env(
                "RUST_LOG",
                self.opts.rust_log.as_deref().unwrap_or("info,cryptoki=off"),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawn {BROKER}: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log2 = log.clone();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if let Ok(mut g) = log2.lock() {
                    g.push_str(&l);
                    g.push('\n');
                }
            }
        });
        let mut lines = BufReader::new(stdout).lines();
        let (mut metrics_addr, mut kms_socket, mut xks_addr, mut ekm_addr) =
            (None, None, None, None);
        let addr = loop {
            match tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await {
                Ok(Ok(Some(l))) => {
                    if let Some(a) = l.strip_prefix("keybroker: listening on ") {
                        break a.trim().parse::<SocketAddr>().map_err(|e| e.to_string())?;
                    }
                    if let Some(a) = l.strip_prefix("keybroker: metrics on ") {
                        metrics_addr =
                            Some(a.trim().parse::<SocketAddr>().map_err(|e| e.to_string())?);
                    }
                    if let Some(a) = l.strip_prefix("keybroker: xks on ") {
                        xks_addr = Some(a.trim().parse::<SocketAddr>().map_err(|e| e.to_string())?);
                    }
                    if let Some(a) = l.strip_prefix("keybroker: ekm on ") {
                        ekm_addr = Some(a.trim().parse::<SocketAddr>().map_err(|e| e.to_string())?);
                    }
                    if let Some(p) = l.strip_prefix("keybroker: kms-v2 on ") {
                        kms_socket = Some(PathBuf::from(p.trim()));
                    }
                }
                Ok(_) => {
                    let status = child.wait().await.map_err(|e| e.to_string())?;
                    // Let the stderr reader drain.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let text = log.lock().map(|g| g.clone()).unwrap_or_default();
                    return Err(format!("exited with {status}; stderr:\n{text}"));
                }
                Err(_) => return Err("no listening line within 120 s".into()),
            }
        };
        Ok(Broker {
            child,
            addr,
            metrics_addr,
            kms_socket,
            xks_addr,
            ekm_addr,
            log,
            reader: Some(reader),
            ca: self.pki.ca.cert_path.clone(),
        })
    }

    /// Runs hsm-probe against this env's token.
    pub fn probe(&self, args: &[&str]) -> serde_json::Value {
        let out = std::process::Command::new(hsm_probe())
            .arg(args[0])
            .arg(&self.token.module)
            .arg(&self.token.label)
            .arg(&self.token.user_pin)
            .args(&args[1..])
            .envs(self.token.env())
            .output()
            .expect("run hsm-probe");
        assert!(
            out.status.success(),
            "hsm-probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("hsm-probe prints JSON")
    }
}

impl Env {
    /// Runs `keybroker check-config -o json` on this env's config: `Ok(report JSON)` when it
    /// passes, `Err(stderr)` when it refuses.
    pub fn check_config(&self) -> Result<serde_json::Value, String> {
        let (ok, report, stderr) = self.check_config_report();
        if ok {
            Ok(report.expect("check-config prints JSON"))
        } else {
            Err(stderr)
        }
    }

    /// Runs `keybroker check-config -o json`: (exit status 0, the JSON report if one was
    /// printed — also when it refuses the token —, stderr).
    pub fn check_config_report(&self) -> (bool, Option<serde_json::Value>, String) {
        let out = self.check_config_output(&["-o", "json"]);
        let json = serde_json::from_slice(&out.stdout).ok();
        (
            out.status.success(),
            json,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `keybroker check-config` with extra arguments; the raw output.
    pub fn check_config_output(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(BROKER)
            .args(["check-config", "--config"])
            .arg(&self.config)
            .args(args)
            .envs(self.broker_env())
            .env("RUST_LOG", "warn,cryptoki=off")
            .output()
            .expect("run keybroker check-config")
    }

    /// Runs hsm-probe with the token's environment and the given arguments verbatim.
    pub fn probe_raw(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = std::process::Command::new(hsm_probe())
            .args(args)
            .envs(self.token.env())
            .output()
            .expect("run hsm-probe");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }
}

/// The token kind this run uses (`KEYBROKER_TEST_TOKEN`).
pub fn token_kind() -> TokenKind {
    TokenKind::from_env().unwrap_or_else(|e| panic!("{e}"))
}

/// Prints why a test does not run its checks on this token (never a silent pass). Written to
/// the process's stderr directly, not through `eprintln!`, so the test harness's output capture
/// does not swallow it: the reason shows in every `cargo test` run.
pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test} on {}: {reason}",
        token_kind().name()
    );
}

/// What SoftHSM2 2.6.1 and Kryoptic, as the tests build them, cannot do: on them a test may
/// skip these and nothing else (`None`: a token whose gaps are not pinned down). The names are
/// the proto's, as [`skip_unsupported`] takes them; docs/src/signing.md lists the same.
fn known_gaps(kind: TokenKind) -> Option<&'static [&'static str]> {
    match kind {
        // RSA-OAEP with SHA-256: SoftHSM2 2.6.1 rejects its OAEP parameters (C_DecryptInit
        // returns CKR_ARGUMENTS_BAD), so its RSA keys use SHA-1 OAEP.
        TokenKind::SoftHsm => Some(&[
            "RSA_OAEP_SHA256 RSA_2048",
            "RSA_OAEP_SHA256 RSA_3072",
            "RSA_OAEP_SHA256 RSA_4096",
        ]),
        TokenKind::Kryoptic => Some(&[]),
        TokenKind::OpenCryptoki => None,
    }
}

/// [`skip`] for a key type or algorithm the token refused to serve (`what`: its proto name,
/// e.g. `EC_P384` or `RSA_OAEP_SHA1 RSA_2048`). On SoftHSM2 and Kryoptic, whose support is
/// known, refusing anything outside [`known_gaps`] fails the test: there a skip would hide a
/// regression, not a token's limit.
#[track_caller]
pub fn skip_unsupported(test: &str, what: &str, reason: &str) {
    let kind = token_kind();
    if let Some(gaps) = known_gaps(kind) {
        assert!(
            gaps.contains(&what),
            "{test}: {} serves {what}, yet it was refused: {reason}",
            kind.name()
        );
    }
    skip(test, reason);
}

/// Returns from the calling test, after printing why, when this run's token lacks the AES
/// mechanisms keybroker uses (openCryptoki: no AES-GCM, no RFC 5649). Never a silent pass:
/// `cargo test` shows the line `SKIPPED <test> on opencryptoki: skipped: ...`.
#[macro_export]
macro_rules! require_aes {
    () => {
        if !$crate::common::token_kind().has_aes() {
            fn here() {}
            let name = ::std::any::type_name_of_val(&here)
                .trim_end_matches("::here")
                .replace("::{{closure}}", "");
            $crate::common::skip(&name, "skipped: openCryptoki has no AES-GCM/KWP");
            return;
        }
    };
}

/// `true` (after printing the reason) when this run's token is not `kind`.
pub fn skip_unless(test: &str, kind: TokenKind, reason: &str) -> bool {
    if token_kind() == kind {
        return false;
    }
    skip(test, reason);
    true
}

/// A running broker.
pub struct Broker {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    /// The metrics listener, when `[metrics]` is configured.
    pub metrics_addr: Option<SocketAddr>,
    /// The KMS v2 socket, when `[kms_v2]` is configured.
    pub kms_socket: Option<PathBuf>,
    /// The XKS door's HTTPS listener, when `[xks]` is configured.
    pub xks_addr: Option<SocketAddr>,
    /// The EKM door's HTTPS listener, when `[ekm]` is configured.
    pub ekm_addr: Option<SocketAddr>,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    ca: PathBuf,
}

impl Broker {
    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// Clients authenticated with `who`'s certificate.
    pub async fn clients_as(&self, who: &Issued) -> Clients {
        clients(&ClientSettings {
            endpoint: self.endpoint(),
            ca: self.ca.clone(),
            cert: who.cert_path.clone(),
            key: who.key_path.clone(),
        })
        .await
        .expect("connect")
    }

    /// Client settings for `who` (for raw channels: health, reflection, request ids).
    pub fn settings_as(&self, who: &Issued) -> ClientSettings {
        ClientSettings {
            endpoint: self.endpoint(),
            ca: self.ca.clone(),
            cert: who.cert_path.clone(),
            key: who.key_path.clone(),
        }
    }

    /// An SDK client builder authenticated with `who`'s certificate.
    pub fn sdk_as(&self, who: &Issued) -> keybroker_client::ClientBuilder {
        keybroker_client::ClientBuilder::from_pem_files(
            self.endpoint(),
            &self.ca,
            &who.cert_path,
            &who.key_path,
        )
        .expect("read the test PKI")
    }

    /// `GET path` on the metrics listener: (status code, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics_addr.expect("[metrics] configured");
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to metrics");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send request");
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.expect("read response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        (code, body.to_string())
    }

    /// Everything the broker wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Waits up to 10 s for the log to contain `needle` (stderr is read by a task, so a line the
    /// broker just wrote may not be in [`log`](Self::log) yet); the log, and whether it did.
    pub async fn log_contains(&self, needle: &str) -> (bool, String) {
        for _ in 0..100 {
            let log = self.log();
            if log.contains(needle) {
                return (true, log);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (false, self.log())
    }

    /// Waits for the process to end by itself (e.g. at a failpoint); returns its log.
    pub async fn wait_exit(mut self) -> String {
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("broker exits");
        if let Some(r) = self.reader.take() {
            let _ = r.await;
        }
        self.log()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the broker is running")
    }

    /// Sends SIGTERM and returns at once.
    pub fn sigterm(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
    }

    /// `kill -9`: the process dies at whatever it was doing. Returns its log.
    pub async fn kill9(mut self) -> String {
        self.child.start_kill().expect("SIGKILL");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("broker dies")
            .expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{status}"
        );
        if let Some(r) = self.reader.take() {
            let _ = r.await;
        }
        self.log()
    }

    /// Waits (at most 60 s) for the process to exit by itself; returns its status and log.
    pub async fn wait_status(mut self) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("broker exits within 60 s")
            .expect("wait");
        if let Some(r) = self.reader.take() {
            let _ = r.await;
        }
        (status, self.log())
    }

    /// Resident memory of the broker process (VmRSS), KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// SIGTERM, then wait for a clean exit; returns everything the broker wrote to stderr.
    pub async fn stop(mut self) -> String {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("broker exits within 30 s after SIGTERM")
            .expect("wait");
        if let Some(r) = self.reader.take() {
            let _ = r.await;
        }
        assert!(
            status.success(),
            "broker exit status {status}; log:\n{}",
            self.log()
        );
        self.log()
    }
}

/// The hsm-probe tool, built once per test binary.
pub fn hsm_probe() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = Path::new(BROKER)
            .parent()
            .expect("binary dir")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "hsm-fixtures",
                "--bin",
                "hsm-probe",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for hsm-probe");
        assert!(status.success(), "building hsm-probe failed");
        dir.join("hsm-probe")
    })
    .clone()
}

/// Polls `f` until it returns `Some` or `bound` passes (then panics naming `what`). For
/// waiting on observable state — a fault logged, a log line, a broker that serves again —
/// instead of sleeping.
pub async fn poll_until<T, F, Fut>(what: &str, bound: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = std::time::Instant::now() + bound;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < until,
            "{what}: not within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs a `keybroker` client command against `b` as `who`: (success, stdout, stderr).
pub async fn cli_as(
    env: &Env,
    b: &Broker,
    who: &hsm_fixtures::pki::Issued,
    args: &[&str],
) -> (bool, String, String) {
    let out = tokio::process::Command::new(BROKER)
        .args(args)
        .env("KEYBROKER_ENDPOINT", b.endpoint())
        .env("KEYBROKER_CA_CERT", &env.pki.ca.cert_path)
        .env("KEYBROKER_CLIENT_CERT", &who.cert_path)
        .env("KEYBROKER_CLIENT_KEY", &who.key_path)
        .output()
        .await
        .expect("run keybroker");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn hex_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("random");
    hex::encode(b)
}

pub async fn create(c: &mut Clients, name: &str, kt: pb::KeyType, alg: pb::Algorithm) -> pb::Key {
    c.mgmt
        .create_key(pb::CreateKeyRequest {
            key: name.into(),
            key_type: kt.into(),
            algorithm: alg.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e:?}"))
        .into_inner()
}

pub async fn wrap(
    c: &mut Clients,
    key: &str,
    dek: &[u8],
    aad: &[u8],
) -> Result<pb::WrapKeyResponse, tonic::Status> {
    c.broker
        .wrap_key(pb::WrapKeyRequest {
            key: key.into(),
            plaintext: dek.to_vec(),
            aad: aad.to_vec(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn unwrap(
    c: &mut Clients,
    key: &str,
    env: &[u8],
    aad: &[u8],
) -> Result<pb::UnwrapKeyResponse, tonic::Status> {
    c.broker
        .unwrap_key(pb::UnwrapKeyRequest {
            key: key.into(),
            aad: aad.to_vec(),
            wrapped: Some(pb::unwrap_key_request::Wrapped::Envelope(env.to_vec())),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

pub fn random_dek(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("random");
    b
}

/// Asserts the one fixed unauthentic error.
#[track_caller]
pub fn assert_unauthentic<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{what}: {s:?}");
            assert_eq!(s.message(), keybroker::error::UNAUTHENTIC_MESSAGE, "{what}");
        }
        Ok(v) => panic!("{what}: accepted: {v:?}"),
    }
}

/// What an HTTPS door (EKM, XKS) answered.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: serde_json::Value,
    pub raw: String,
}

/// One HTTP/1.1 exchange on a fresh TLS connection (`Connection: close`). `Err` when the TLS
/// handshake fails or no answer comes back.
///
/// A door refuses an announced oversized body without reading it and closes the connection,
/// so writing the rest of the body may fail (EPIPE, reset) while the answer is already on its
/// way: like curl, the client still reads what the door said.
pub async fn https_exchange(
    addr: std::net::SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<HttpAnswer, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut s = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    let written = s.write_all(&request).await;
    let mut raw = Vec::new();
    // A TLS 1.3 server refuses a client certificate after the client's side of the
    // handshake: the refusal arrives as an alert on the first read.
    let read = s.read_to_end(&mut raw).await;
    if raw.is_empty() {
        return Err(format!("no answer: write {written:?}, read {read:?}"));
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("no HTTP head")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    Ok(HttpAnswer {
        status,
        body: serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        raw,
    })
}
