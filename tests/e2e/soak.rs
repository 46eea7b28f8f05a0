//! The soak / chaos run (ignored by default; `tests/soak` runs it): minutes of mixed wrap,
//! unwrap, generate-data-key, rewrap, rotate and create from many concurrent clients in several
//! tenants, while a chaos controller injects HSM faults through the fault module (lost
//! sessions, device errors, failed functions, invalid handles, latency, hangs, a removed device,
//! an absent token), moves SoftHSM2's token directory away and back (every key object gone at
//! once), opens HTTP/2 streams that send only their headers, and kills (`kill -9`) or stops
//! (SIGTERM) the broker and restarts it. At the
//! end every acknowledged wrapped DEK is unwrapped and compared, every acknowledged key and
//! rotation is checked, the audit trail is verified, and a table is printed.
//!
//! Knobs: `KEYBROKER_SOAK_SECS` (default 180), `KEYBROKER_SOAK_CLIENTS` (default 12).
//! Must hold: 0 DEKs lost, 0 wrong DEKs, 0 INTERNAL errors, 0 acknowledged envelopes refused
//! as unauthentic, every SIGTERM exits 0, audit verify passes.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hsm_fixtures::fault::Rule;
use keybroker::client::{ClientSettings, Clients};
use keybroker_proto::v1 as pb;
use tokio::sync::RwLock;
use tonic::Code;

use crate::common::*;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rnd(n: usize) -> usize {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("random");
    (u64::from_le_bytes(b) % n.max(1) as u64) as usize
}

/// A key the load uses, and whether it binds AAD (AES-GCM).
#[derive(Clone)]
struct Key {
    name: String,
    gcm: bool,
}

/// An acknowledged envelope.
#[derive(Clone)]
struct Acked {
    key: String,
    envelope: Vec<u8>,
    dek: Vec<u8>,
    aad: Vec<u8>,
}

#[derive(Default)]
struct Ledger {
    keys: Mutex<Vec<Key>>,
    created: Mutex<Vec<String>>,
    rotated: Mutex<HashMap<String, u32>>,
    envelopes: Mutex<Vec<Acked>>,
}

#[derive(Default)]
struct Stats {
    by_code: Mutex<BTreeMap<String, u64>>,
    requests: AtomicU64,
    /// An acknowledged envelope unwrapped to another DEK during the run.
    wrong_dek: AtomicU64,
    /// An acknowledged envelope refused as unauthentic (INVALID_ARGUMENT) during the run.
    false_unauthentic: AtomicU64,
    /// The distinct messages of FAILED_PRECONDITION answers (a key's state, not a fault: each
    /// one is worth reading), with their counts.
    preconditions: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn record(&self, outcome: &str) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        *self
            .by_code
            .lock()
            .expect("lock")
            .entry(outcome.to_string())
            .or_default() += 1;
    }
}

/// The name of an outcome: the gRPC code the broker gave, or `transport` when the client could
/// not reach it (killed, restarting, draining). An INTERNAL is the broker's only if it carries
/// the broker's fixed message.
fn outcome(s: &tonic::Status) -> String {
    let broker_internal =
        s.code() == Code::Internal && s.message().contains("logged by the broker");
    match s.code() {
        Code::Internal if broker_internal => "INTERNAL".into(),
        Code::Unknown | Code::Internal | Code::Cancelled => "transport".into(),
        Code::Unavailable
            if !s.message().contains("HSM")
                && !s.message().contains("audit")
                && !s.message().contains("retry") =>
        {
            "transport".into()
        }
        c => format!("{c:?}"),
    }
}

struct Shared {
    settings: ClientSettings,
    ledger: Ledger,
    stats: Stats,
    stop: AtomicBool,
}

async fn worker(shared: Arc<Shared>, id: usize) {
    let mut clients: Option<Clients> = None;
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let mut c = match clients.take() {
            Some(c) => c,
            None => match keybroker::client::clients(&shared.settings).await {
                Ok(c) => c,
                Err(_) => {
                    shared.stats.record("transport");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        n += 1;
        let r = one_request(&shared, &mut c, id, n).await;
        match r {
            Ok(()) => {
                shared.stats.record("OK");
                clients = Some(c);
            }
            Err(s) => {
                let o = outcome(&s);
                shared.stats.record(&o);
                if s.code() == Code::FailedPrecondition {
                    *shared
                        .stats
                        .preconditions
                        .lock()
                        .expect("lock")
                        .entry(s.message().to_string())
                        .or_default() += 1;
                }
                if o == "transport" {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                } else {
                    clients = Some(c);
                    if o == "Unavailable" || o == "ResourceExhausted" {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
    }
}

fn timed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_secs(5));
    r
}

async fn one_request(
    shared: &Shared,
    c: &mut Clients,
    id: usize,
    n: u64,
) -> Result<(), tonic::Status> {
    let l = &shared.ledger;
    let keys = l.keys.lock().expect("lock").clone();
    let key = keys[rnd(keys.len())].clone();
    let dice = rnd(100);
    if dice < 40 {
        let dek = random_dek(32);
        let aad = if key.gcm { random_dek(12) } else { Vec::new() };
        let w = c
            .broker
            .wrap_key(timed(pb::WrapKeyRequest {
                key: key.name.clone(),
                plaintext: dek.clone(),
                aad: aad.clone(),
                ..Default::default()
            }))
            .await?
            .into_inner();
        l.envelopes.lock().expect("lock").push(Acked {
            key: key.name,
            envelope: w.wrapped_key,
            dek,
            aad,
        });
    } else if dice < 55 {
        let aad = if key.gcm { random_dek(12) } else { Vec::new() };
        let g = c
            .broker
            .generate_data_key(timed(pb::GenerateDataKeyRequest {
                key: key.name.clone(),
                aad: aad.clone(),
                ..Default::default()
            }))
            .await?
            .into_inner();
        l.envelopes.lock().expect("lock").push(Acked {
            key: key.name,
            envelope: g.wrapped_key,
            dek: g.plaintext,
            aad,
        });
    } else if dice < 94 {
        let pick = {
            let e = l.envelopes.lock().expect("lock");
            if e.is_empty() {
                None
            } else {
                Some(e[rnd(e.len())].clone())
            }
        };
        let Some(a) = pick else { return Ok(()) };
        if dice < 91 {
            let r = c
                .broker
                .unwrap_key(timed(pb::UnwrapKeyRequest {
                    key: a.key.clone(),
                    aad: a.aad.clone(),
                    wrapped: Some(pb::unwrap_key_request::Wrapped::Envelope(
                        a.envelope.clone(),
                    )),
                    ..Default::default()
                }))
                .await;
            match r {
                Ok(u) if u.get_ref().plaintext != a.dek => {
                    shared.stats.wrong_dek.fetch_add(1, Ordering::Relaxed);
                }
                Err(s) if s.code() == Code::InvalidArgument => {
                    shared
                        .stats
                        .false_unauthentic
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(s);
                }
                Err(s) => return Err(s),
                Ok(_) => {}
            }
        } else {
            // Rewrap to the newest version: a new acknowledged envelope for the same DEK.
            let r = c
                .broker
                .rewrap(timed(pb::RewrapRequest {
                    key: a.key.clone(),
                    envelope: a.envelope.clone(),
                    aad: a.aad.clone(),
                    ..Default::default()
                }))
                .await;
            match r {
                Ok(w) => l.envelopes.lock().expect("lock").push(Acked {
                    key: a.key,
                    envelope: w.into_inner().wrapped_key,
                    dek: a.dek,
                    aad: a.aad,
                }),
                Err(s) if s.code() == Code::InvalidArgument => {
                    shared
                        .stats
                        .false_unauthentic
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(s);
                }
                Err(s) => return Err(s),
            }
        }
    } else if dice < 99 {
        // Rotate, but keep every key well under the 100-version cap.
        let done = l.rotated.lock().expect("lock").get(&key.name).copied();
        if done.unwrap_or(1) >= 80 {
            return Ok(());
        }
        let k = c
            .mgmt
            .rotate_key(timed(pb::RotateKeyRequest {
                key: key.name.clone(),
            }))
            .await?
            .into_inner();
        let mut m = l.rotated.lock().expect("lock");
        let e = m.entry(key.name).or_default();
        *e = (*e).max(k.current_version);
    } else {
        let tenant = ["a", "b", "c", "d"][rnd(4)];
        let name = format!("{tenant}/c{id}-{n}");
        let gcm = rnd(3) != 0;
        c.mgmt
            .create_key(timed(pb::CreateKeyRequest {
                key: name.clone(),
                key_type: pb::KeyType::Aes256.into(),
                algorithm: if gcm {
                    pb::Algorithm::Aes256Gcm
                } else {
                    pb::Algorithm::AesKeyWrapPad
                }
                .into(),
                ..Default::default()
            }))
            .await?;
        l.created.lock().expect("lock").push(name.clone());
        l.keys.lock().expect("lock").push(Key { name, gcm });
    }
    Ok(())
}

/// A fault scenario: rules for a while, then none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Chaos {
    SessionLost,
    DeviceErrors,
    FunctionFailed,
    HandleInvalid,
    Latency,
    Hang,
    DeviceRemoved,
    TokenAbsent,
    Kill9,
    Sigterm,
    /// SoftHSM2's token directory moved away and back (every key object gone at once); on
    /// other tokens, the same symptom made by the fault module
    /// (`crate::reliability::storage_loss_rules`).
    StorageMoved,
    /// HTTP/2 streams that send their headers and nothing more.
    HeaderOnly,
}

const SCENARIOS: [Chaos; 12] = [
    Chaos::StorageMoved,
    Chaos::HeaderOnly,
    Chaos::SessionLost,
    Chaos::DeviceErrors,
    Chaos::FunctionFailed,
    Chaos::HandleInvalid,
    Chaos::Latency,
    Chaos::Hang,
    Chaos::DeviceRemoved,
    Chaos::TokenAbsent,
    Chaos::Kill9,
    Chaos::Sigterm,
];

/// Waits until a wrap through a fresh connection succeeds; returns how long it took.
async fn time_to_serve(settings: &ClientSettings, key: &str) -> Duration {
    let start = Instant::now();
    loop {
        if let Ok(mut c) = keybroker::client::clients(settings).await
            && c.broker
                .wrap_key(timed(pb::WrapKeyRequest {
                    key: key.into(),
                    plaintext: vec![3; 32],
                    ..Default::default()
                }))
                .await
                .is_ok()
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the broker did not serve again within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
#[ignore = "minutes long: run with tests/soak"]
async fn soak_chaos() {
    crate::require_aes!();
    let secs = env_num("KEYBROKER_SOAK_SECS", 180);
    let clients = env_num("KEYBROKER_SOAK_CLIENTS", 12) as usize;
    let env = Env::with(Options {
        faults: true,
        sessions: Some(4),
        // keybroker::server at info for its start-up line ("keys loaded and verified", with
        // its phase timings), which the restart figures below are read against.
        rust_log: Some("warn,keybroker::server=info,cryptoki=off".into()),
        // Header-only streams are answered at this deadline.
        server_extra: "request_timeout_ms = 5000\n".into(),
        ..Default::default()
    });
    // A fixed port, so clients find the broker again after every restart.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    env.edit_config(|t| {
        t.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        )
    });
    let f = env.faults().clone();
    let broker = Arc::new(RwLock::new(Some(env.start().await)));
    let addr: SocketAddr = broker
        .read()
        .await
        .as_ref()
        .map(|b| b.addr)
        .expect("broker");
    let settings = ClientSettings {
        endpoint: format!("https://localhost:{}", addr.port()),
        ca: env.pki.ca.cert_path.clone(),
        cert: env.pki.client.cert_path.clone(),
        key: env.pki.client.key_path.clone(),
    };
    let shared = Arc::new(Shared {
        settings: settings.clone(),
        ledger: Ledger::default(),
        stats: Stats::default(),
        stop: AtomicBool::new(false),
    });
    {
        let mut c = keybroker::client::clients(&settings)
            .await
            .expect("connect");
        let mut keys = Vec::new();
        for (name, kt, alg, gcm) in [
            ("a/gcm", pb::KeyType::Aes256, pb::Algorithm::Aes256Gcm, true),
            ("b/gcm", pb::KeyType::Aes256, pb::Algorithm::Aes256Gcm, true),
            ("c/gcm", pb::KeyType::Aes256, pb::Algorithm::Aes256Gcm, true),
            ("d/gcm", pb::KeyType::Aes256, pb::Algorithm::Aes256Gcm, true),
            (
                "a/kwp",
                pb::KeyType::Aes256,
                pb::Algorithm::AesKeyWrapPad,
                false,
            ),
            (
                "b/rsa",
                pb::KeyType::Rsa2048,
                pb::Algorithm::Unspecified,
                false,
            ),
        ] {
            create(&mut c, name, kt, alg).await;
            keys.push(Key {
                name: name.into(),
                gcm,
            });
        }
        *shared.ledger.keys.lock().expect("lock") = keys;
    }
    let mut workers = Vec::new();
    for id in 0..clients {
        workers.push(tokio::spawn(worker(shared.clone(), id)));
    }
    // Memory and descriptors: sample the broker's RSS and open files while it runs.
    let peak_rss = Arc::new(AtomicU64::new(0));
    let peak_fds = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (broker, peak, fds, shared) = (
            broker.clone(),
            peak_rss.clone(),
            peak_fds.clone(),
            shared.clone(),
        );
        tokio::spawn(async move {
            while !shared.stop.load(Ordering::Relaxed) {
                if let Some(b) = broker.read().await.as_ref() {
                    peak.fetch_max(b.rss_kib(), Ordering::Relaxed);
                    let open = std::fs::read_dir(format!("/proc/{}/fd", b.pid()))
                        .map(|d| d.count() as u64)
                        .unwrap_or(0);
                    fds.fetch_max(open, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    let mut logs = Vec::new();
    let mut ran: BTreeMap<Chaos, u32> = BTreeMap::new();
    let mut serve_after_device: Vec<Duration> = Vec::new();
    let mut serve_after_restart: Vec<Duration> = Vec::new();
    let mut serve_after_storage: Vec<Duration> = Vec::new();
    let mut header_only = Vec::new();
    let softhsm = env.token.kind == hsm_fixtures::token::TokenKind::SoftHsm;
    let mut sigterm_failures = 0;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    // Every scenario once per round, in a random order each round.
    let mut round: Vec<Chaos> = Vec::new();
    while Instant::now() < end {
        if round.is_empty() {
            round = SCENARIOS.to_vec();
            for i in (1..round.len()).rev() {
                round.swap(i, rnd(i + 1));
            }
        }
        // A calm spell, then a scenario.
        tokio::time::sleep(Duration::from_millis(1500 + rnd(1500) as u64)).await;
        let Some(chaos) = round.pop() else { break };
        *ran.entry(chaos).or_default() += 1;
        let hold = Duration::from_millis(2500 + rnd(2500) as u64);
        let rules = match chaos {
            Chaos::SessionLost => vec![
                Rule::fail("C_EncryptInit,C_DecryptInit", "CKR_SESSION_HANDLE_INVALID").p(0.05),
                Rule::fail("C_Encrypt,C_Decrypt", "CKR_SESSION_CLOSED").p(0.03),
            ],
            Chaos::DeviceErrors => {
                vec![Rule::fail("C_EncryptInit,C_Decrypt", "CKR_DEVICE_ERROR").p(0.02)]
            }
            Chaos::FunctionFailed => {
                vec![Rule::fail("C_Encrypt,C_Decrypt", "CKR_FUNCTION_FAILED").p(0.05)]
            }
            Chaos::HandleInvalid => {
                vec![Rule::fail("C_EncryptInit,C_DecryptInit", "CKR_KEY_HANDLE_INVALID").p(0.02)]
            }
            Chaos::Latency => vec![Rule::delay("C_EncryptInit,C_DecryptInit", 40).p(0.5)],
            Chaos::Hang => vec![Rule::hang("C_DecryptInit").ms(1500).count(3)],
            Chaos::DeviceRemoved => vec![Rule::fail("*", "CKR_DEVICE_REMOVED").latch()],
            Chaos::TokenAbsent => vec![Rule::fail("*", "CKR_TOKEN_NOT_PRESENT").latch()],
            Chaos::Kill9 | Chaos::Sigterm | Chaos::StorageMoved | Chaos::HeaderOnly => Vec::new(),
        };
        match chaos {
            Chaos::Kill9 | Chaos::Sigterm => {
                let b = broker.write().await.take().expect("broker running");
                if chaos == Chaos::Kill9 {
                    logs.push(b.kill9().await);
                } else {
                    b.sigterm();
                    let (status, log) = b.wait_status().await;
                    if !status.success() {
                        sigterm_failures += 1;
                        eprintln!("SIGTERM exit status {status}");
                    }
                    logs.push(log);
                }
                let t = Instant::now();
                *broker.write().await = Some(env.start().await);
                time_to_serve(&settings, "a/gcm").await;
                serve_after_restart.push(t.elapsed());
            }
            Chaos::StorageMoved => {
                if softhsm {
                    let tokens = env.token.dir.join("tokens");
                    let away = env.token.dir.join("tokens.away");
                    std::fs::rename(&tokens, &away).expect("move the token directory away");
                    tokio::time::sleep(hold).await;
                    std::fs::rename(&away, &tokens).expect("move it back");
                } else {
                    // Kryoptic keeps its sqlite file open: moving it changes nothing the broker
                    // sees (docs/src/hsm-notes.md). SoftHSM2's symptom, through the fault module.
                    f.set(&crate::reliability::storage_loss_rules())
                        .expect("rules");
                    tokio::time::sleep(hold).await;
                    f.clear().expect("rules");
                }
                serve_after_storage.push(time_to_serve(&settings, "a/gcm").await);
            }
            Chaos::HeaderOnly => {
                if let Some(send) = crate::reliability::raw::try_connect_to(addr, &env).await {
                    for _ in 0..16 {
                        header_only.push(tokio::spawn(crate::reliability::raw::try_call(
                            send.clone(),
                            crate::reliability::raw::request(
                                "/keybroker.v1.KeyBroker/WrapKey",
                                &[],
                            ),
                            None,
                        )));
                    }
                }
            }
            _ => {
                f.set(&rules).expect("rules");
                tokio::time::sleep(hold).await;
                f.clear().expect("rules");
                if matches!(chaos, Chaos::DeviceRemoved | Chaos::TokenAbsent) {
                    serve_after_device.push(time_to_serve(&settings, "a/gcm").await);
                }
            }
        }
    }
    f.clear().expect("rules");
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    sampler.await.expect("sampler");
    let run_time = start.elapsed();
    let (mut header_deadline, mut header_other) = (0, 0);
    for h in header_only {
        match tokio::time::timeout(Duration::from_secs(60), h).await {
            Ok(Ok(Some((4, _)))) => header_deadline += 1,
            // Cut by a kill -9 or a SIGTERM of the broker, or answered otherwise.
            _ => header_other += 1,
        }
    }

    // Verification: a clean restart, then every acknowledged thing.
    if let Some(b) = broker.write().await.take() {
        logs.push(b.stop().await);
    }
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let envelopes = shared.ledger.envelopes.lock().expect("lock").clone();
    let verified = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(Mutex::new(Vec::new()));
    let chunks: Vec<Vec<Acked>> = envelopes
        .chunks(envelopes.len().div_ceil(16).max(1))
        .map(<[Acked]>::to_vec)
        .collect();
    let mut checks = Vec::new();
    for chunk in chunks {
        let (mut c, verified, lost) = (c.clone(), verified.clone(), lost.clone());
        checks.push(tokio::spawn(async move {
            for a in chunk {
                // RESOURCE_EXHAUSTED and UNAVAILABLE say "retry later" (right after a restart,
                // canaries still proven on first use compete for the sessions): a client
                // retries them, with backoff, for up to 30 s; only what stays refused is lost.
                let mut r = unwrap(&mut c, &a.key, &a.envelope, &a.aad).await;
                let mut backoff = Duration::from_millis(20);
                let until = std::time::Instant::now() + Duration::from_secs(30);
                while let Err(s) = &r
                    && matches!(s.code(), Code::ResourceExhausted | Code::Unavailable)
                    && std::time::Instant::now() < until
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    r = unwrap(&mut c, &a.key, &a.envelope, &a.aad).await;
                }
                match r {
                    Ok(u) if u.plaintext == a.dek => {
                        verified.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => lost
                        .lock()
                        .expect("lock")
                        .push(format!("{}: wrong DEK", a.key)),
                    Err(e) => lost.lock().expect("lock").push(format!("{}: {e:?}", a.key)),
                }
            }
        }));
    }
    for t in checks {
        t.await.expect("verify");
    }
    let created = shared.ledger.created.lock().expect("lock").clone();
    let mut keys_missing = 0;
    for k in &created {
        if c.mgmt
            .get_key(pb::GetKeyRequest { key: k.clone() })
            .await
            .is_err()
        {
            keys_missing += 1;
        }
    }
    let rotated = shared.ledger.rotated.lock().expect("lock").clone();
    let mut versions_missing = 0;
    for (k, v) in &rotated {
        match c.mgmt.get_key(pb::GetKeyRequest { key: k.clone() }).await {
            Ok(key) if key.get_ref().current_version >= *v => {}
            _ => versions_missing += 1,
        }
    }
    drop(c);
    logs.push(b.stop().await);
    let (audit_ok, audit_out) = env.verify_audit(&env.audit_log());

    let all_logs = logs.join("\n");
    let reinit = all_logs
        .matches("HSM re-initialised: serving again")
        .count();
    let reinit_ms = all_logs
        .lines()
        .filter(|l| l.contains("HSM re-initialised: serving again"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("reinit_ms="))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .max()
        .unwrap_or(0);
    let broker_internal = all_logs.matches("internal error").count();
    let events = f.events();
    let count = |k: &str| events.iter().filter(|e| e.kind == k).count();
    let by_code = shared.stats.by_code.lock().expect("lock").clone();
    let lost = lost.lock().expect("lock").clone();
    let max = |v: &[Duration]| v.iter().max().map_or(0, |d| d.as_millis());
    let p50 = |v: &[Duration]| {
        let mut s = v.to_vec();
        s.sort();
        s.get(s.len() / 2).map_or(0, |d| d.as_millis())
    };
    let restarts = ran.get(&Chaos::Kill9).copied().unwrap_or(0)
        + ran.get(&Chaos::Sigterm).copied().unwrap_or(0);

    let mut t = String::new();
    let mut row = |k: &str, v: String| t.push_str(&format!("| {k} | {v} |\n"));
    row(
        "duration",
        format!(
            "{} s, {clients} concurrent clients, 4 tenants, 4 HSM sessions",
            run_time.as_secs()
        ),
    );
    row(
        "requests",
        shared.stats.requests.load(Ordering::Relaxed).to_string(),
    );
    for (code, n) in &by_code {
        row(&format!("… {code}"), n.to_string());
    }
    row(
        "faults injected (failed calls / latched failures / delays / hangs)",
        format!(
            "{} ({} / {} / {} / {})",
            count("fail") + count("latched") + count("delay") + count("hang"),
            count("fail"),
            count("latched"),
            count("delay"),
            count("hang")
        ),
    );
    row(
        "chaos scenarios run",
        ran.iter()
            .map(|(k, v)| format!("{k:?} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    row(
        "HSM re-initialisations in place (longest one)",
        format!("{reinit} ({reinit_ms} ms)"),
    );
    row(
        "restarts (kill -9 / SIGTERM)",
        format!(
            "{restarts} ({} / {})",
            ran.get(&Chaos::Kill9).copied().unwrap_or(0),
            ran.get(&Chaos::Sigterm).copied().unwrap_or(0)
        ),
    );
    row("SIGTERM exits not 0", sigterm_failures.to_string());
    row(
        "serving again after the device returned (p50 / max, a new TLS client's first wrap)",
        format!(
            "{} / {} ms",
            p50(&serve_after_device),
            max(&serve_after_device)
        ),
    );
    row(
        "serving again after the token's storage returned (p50 / max)",
        format!(
            "{} / {} ms ({} times{})",
            p50(&serve_after_storage),
            max(&serve_after_storage),
            serve_after_storage.len(),
            if softhsm { "" } else { ", simulated" }
        ),
    );
    row(
        "header-only streams (closed with DEADLINE_EXCEEDED / cut by a restart)",
        format!("{header_deadline} / {header_other}"),
    );
    row(
        "serving again after a restart (max)",
        format!("{} ms", max(&serve_after_restart)),
    );
    row(
        "keys created (acknowledged / missing after)",
        format!("{} / {keys_missing}", created.len()),
    );
    row(
        "rotations (keys / versions missing after)",
        format!("{} / {versions_missing}", rotated.len()),
    );
    row(
        "DEKs verified",
        verified.load(Ordering::Relaxed).to_string(),
    );
    row("DEKs lost", lost.len().to_string());
    row(
        "wrong DEKs during the run",
        shared.stats.wrong_dek.load(Ordering::Relaxed).to_string(),
    );
    row(
        "acknowledged envelopes refused as unauthentic",
        shared
            .stats
            .false_unauthentic
            .load(Ordering::Relaxed)
            .to_string(),
    );
    row(
        "INTERNAL errors (answers / broker log lines)",
        format!(
            "{} / {broker_internal}",
            by_code.get("INTERNAL").copied().unwrap_or(0)
        ),
    );
    row(
        "peak broker RSS",
        format!("{} MiB", peak_rss.load(Ordering::Relaxed) / 1024),
    );
    row(
        "peak broker descriptors",
        peak_fds.load(Ordering::Relaxed).to_string(),
    );
    row(
        "audit verify",
        if audit_ok {
            "ok".into()
        } else {
            "FAILED".into()
        },
    );
    println!("\n| soak | result |\n|---|---|\n{t}");
    for (message, n) in shared.stats.preconditions.lock().expect("lock").iter() {
        println!("FAILED_PRECONDITION x{n}: {message}");
    }
    for l in all_logs.lines().filter(|l| {
        l.contains("re-initialisation phases")
            || l.contains("serving again")
            || l.contains("KEK objects re-found")
            || l.contains("keys loaded and verified")
    }) {
        println!("broker: {l}");
    }
    for l in all_logs
        .lines()
        .filter(|l| l.contains("internal error") || l.contains("HSM refused operation"))
        .take(40)
    {
        println!("broker: {l}");
    }

    assert!(
        lost.is_empty(),
        "DEKs lost: {:?}",
        &lost[..lost.len().min(20)]
    );
    assert_eq!(keys_missing + versions_missing, 0);
    assert_eq!(shared.stats.wrong_dek.load(Ordering::Relaxed), 0);
    assert_eq!(shared.stats.false_unauthentic.load(Ordering::Relaxed), 0);
    assert_eq!(by_code.get("INTERNAL").copied().unwrap_or(0), 0);
    assert_eq!(broker_internal, 0, "internal errors in the broker log");
    assert_eq!(sigterm_failures, 0);
    assert!(audit_ok, "{audit_out}");
}
