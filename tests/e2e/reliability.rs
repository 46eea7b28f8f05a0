//! What real HSMs and hosts do to a broker (issue 19): the token's storage going away and
//! coming back, PIN rotation, a slow token at start-up, descriptor exhaustion. Each test runs
//! the real binary against a real token.

use std::time::{Duration, Instant};

use hsm_fixtures::{fault::Rule, token::TokenKind};
use keybroker::client::Clients;
use keybroker_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::common::*;

const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

/// The value of a metrics series with no labels.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `grpc.health.v1` for the whole server, or `None` if the call failed.
async fn health(b: &Broker, env: &Env) -> Option<i32> {
    let ch = keybroker::client::connect(&b.settings_as(&env.pki.client))
        .await
        .ok()?;
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(r.into_inner().status)
}

async fn unwrap_code(c: &mut Clients, key: &str, env: &[u8]) -> Result<Vec<u8>, Code> {
    unwrap(c, key, env, b"")
        .await
        .map(|r| r.plaintext)
        .map_err(|s| s.code())
}

/// How many checkpoint records the audit log holds.
fn checkpoints(env: &Env) -> usize {
    std::fs::read_to_string(env.audit_log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"kind\":\"checkpoint\""))
        .count()
}

/// The token's storage goes away while the broker runs, then comes back (issue 19): `take_away`
/// and `bring_back` do it to `env` (a directory moved, fault rules set and cleared). Asserts
/// what the issue asks for on every token: every key `UNAVAILABLE` while the storage is away,
/// `NOT_SERVING` in health and `keybroker_hsm_up 0`, served again by itself (no restart)
/// within a generous bound of the return, no key quarantined, audit checkpoints resuming,
/// `log_says` in the broker's log, the audit trail verifying, and every key found after a
/// restart. `faults`: the token is loaded through the fault module.
async fn storage_loss_and_return(
    faults: bool,
    take_away: impl FnOnce(&Env),
    bring_back: impl FnOnce(&Env),
    log_says: &str,
) {
    let env = Env::with(Options {
        sections: METRICS.into(),
        audit_extra: "checkpoint_interval_ms = 200\n".into(),
        faults,
        ..Options::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let keys = ["t/a", "t/b", "t/rsa"];
    create(
        &mut c,
        keys[0],
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    create(
        &mut c,
        keys[1],
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    create(
        &mut c,
        keys[2],
        pb::KeyType::Rsa2048,
        pb::Algorithm::Unspecified,
    )
    .await;
    let dek = random_dek(32);
    let mut wrapped = Vec::new();
    for k in keys {
        wrapped.push(wrap(&mut c, k, &dek, b"").await.expect("wrap").wrapped_key);
    }

    // The storage goes away: every key vanishes at once.
    take_away(&env);
    poll_until(
        "the broker reports the storage lost",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            let w = wrapped[0].clone();
            async move {
                match unwrap_code(&mut c, keys[0], &w).await {
                    Err(Code::Unavailable) => Some(()),
                    Err(other) => panic!("while the storage is away: {other:?}, want UNAVAILABLE"),
                    Ok(_) => None,
                }
            }
        },
    )
    .await;
    for (k, w) in keys.iter().zip(&wrapped) {
        assert_eq!(
            unwrap_code(&mut c, k, w).await,
            Err(Code::Unavailable),
            "{k} while the storage is away"
        );
    }
    poll_until("health NOT_SERVING", Duration::from_secs(10), || {
        let b = &b;
        let env = &env;
        async move {
            (health(b, env).await == Some(ServingStatus::NotServing as i32)).then_some(())
        }
    })
    .await;
    let (_, m) = b.http_get("/metrics").await;
    assert_eq!(series(&m, "keybroker_hsm_up"), Some(0.0), "{m}");
    let (code, _) = b.http_get("/healthz").await;
    assert_ne!(code, 200, "/healthz while the storage is away");

    // It comes back: served again by itself, without a restart.
    bring_back(&env);
    let back = Instant::now();
    let checkpoints_at_return = checkpoints(&env);
    poll_until("served again", Duration::from_secs(20), || {
        let mut c = c.clone();
        let w = wrapped[0].clone();
        async move { unwrap_code(&mut c, keys[0], &w).await.ok() }
    })
    .await;
    // Generous: the backoff is at most 100 ms, and the issue asks for about a second.
    assert!(
        back.elapsed() < Duration::from_secs(10),
        "served again {:?} after the storage came back",
        back.elapsed()
    );
    for (k, w) in keys.iter().zip(&wrapped) {
        assert_eq!(
            unwrap_code(&mut c, k, w).await,
            Ok(dek.clone()),
            "{k} after"
        );
        assert_enabled(&mut c, k).await;
    }
    poll_until("health SERVING", Duration::from_secs(10), || {
        let b = &b;
        let env = &env;
        async move { (health(b, env).await == Some(ServingStatus::Serving as i32)).then_some(()) }
    })
    .await;
    poll_until("keybroker_hsm_up 1", Duration::from_secs(10), || {
        let b = &b;
        async move {
            let (_, m) = b.http_get("/metrics").await;
            (series(&m, "keybroker_hsm_up") == Some(1.0)).then_some(())
        }
    })
    .await;
    // Audit checkpoints resume.
    wrap(&mut c, keys[1], &dek, b"").await.expect("wrap after");
    poll_until(
        "a checkpoint after the return",
        Duration::from_secs(20),
        || {
            let env = &env;
            async move { (checkpoints(env) > checkpoints_at_return).then_some(()) }
        },
    )
    .await;
    let log = b.stop().await;
    assert!(!log.contains("integrity check failed"), "{log}");
    assert!(
        log.contains(log_says),
        "the log names the fault ({log_says:?}): {log}"
    );
    let (ok, out) = env.verify_audit(&env.audit_log());
    assert!(ok, "{out}");
    // And a restart finds every key.
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    for (k, w) in keys.iter().zip(&wrapped) {
        assert_eq!(
            unwrap_code(&mut c, k, w).await,
            Ok(dek.clone()),
            "{k} after restart"
        );
    }
    b.stop().await;
}

/// The key is enabled (not quarantined, not disabled).
async fn assert_enabled(c: &mut Clients, key: &str) {
    let got = c
        .mgmt
        .get_key(pb::GetKeyRequest { key: key.into() })
        .await
        .expect("get key")
        .into_inner();
    assert_eq!(
        got.state,
        pb::KeyState::Enabled as i32,
        "{key} not quarantined"
    );
}

#[tokio::test]
async fn storage_moved_away_is_unavailable_not_serving_and_recovers_by_itself_without_quarantine() {
    crate::require_aes!();
    if skip_unless(
        "storage_moved_away_is_unavailable_not_serving_and_recovers_by_itself_without_quarantine",
        TokenKind::SoftHsm,
        "moves SoftHSM2's token directory away (Kryoptic serves on from its open sqlite file: \
         kryoptic_serves_from_its_open_sqlite_file_while_the_file_is_away)",
    ) {
        return;
    }
    storage_loss_and_return(
        false,
        |env| {
            std::fs::rename(
                env.token.dir.join("tokens"),
                env.token.dir.join("tokens.away"),
            )
            .expect("move the token directory away");
        },
        |env| {
            std::fs::rename(
                env.token.dir.join("tokens.away"),
                env.token.dir.join("tokens"),
            )
            .expect("move the token directory back");
        },
        "HSM storage lost",
    )
    .await;
}

/// SoftHSM2's symptom of a lost storage, made by the fault module on any token: every key
/// handle invalid on the crypto inits and attribute reads, and every search finding nothing,
/// while `C_GetTokenInfo` and the sessions still answer. The soak run uses them too.
pub(crate) fn storage_loss_rules() -> Vec<Rule> {
    vec![
        Rule::empty(),
        Rule::fail(
            "C_EncryptInit,C_DecryptInit,C_SignInit,C_VerifyInit,C_WrapKey,C_UnwrapKey",
            "CKR_KEY_HANDLE_INVALID",
        ),
        Rule::fail("C_GetAttributeValue", "CKR_OBJECT_HANDLE_INVALID"),
    ]
}

#[tokio::test]
async fn a_simulated_storage_loss_is_unavailable_not_serving_and_recovers_without_quarantine() {
    crate::require_aes!();
    storage_loss_and_return(
        true,
        |env| env.faults().set(&storage_loss_rules()).expect("rules"),
        |env| {
            // The broker searched, and found nothing, while the storage was "away".
            assert!(
                env.faults().count("empty", Some("C_FindObjects")) > 0,
                "{:?}",
                env.faults().events()
            );
            env.faults().clear().expect("rules");
        },
        "HSM storage lost",
    )
    .await;
}

/// Kryoptic's sqlite file, and where it goes while it is away.
fn kryoptic_db(env: &Env) -> (std::path::PathBuf, std::path::PathBuf) {
    (
        env.token.dir.join("token.sql"),
        env.token.dir.join("token.sql.away"),
    )
}

#[tokio::test]
async fn kryoptic_serves_from_its_open_sqlite_file_while_the_file_is_away() {
    if skip_unless(
        "kryoptic_serves_from_its_open_sqlite_file_while_the_file_is_away",
        TokenKind::Kryoptic,
        "moves Kryoptic's sqlite file away",
    ) {
        return;
    }
    let env = Env::with(Options {
        sections: METRICS.into(),
        audit_extra: "checkpoint_interval_ms = 200\n".into(),
        ..Options::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let keys = ["t/a", "t/rsa"];
    create(
        &mut c,
        keys[0],
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    create(
        &mut c,
        keys[1],
        pb::KeyType::Rsa2048,
        pb::Algorithm::Unspecified,
    )
    .await;
    let dek = random_dek(32);
    let mut wrapped = Vec::new();
    for k in keys {
        wrapped.push(wrap(&mut c, k, &dek, b"").await.expect("wrap").wrapped_key);
    }
    let (db, away) = kryoptic_db(&env);
    std::fs::rename(&db, &away).expect("move the sqlite file away");

    // Kryoptic reads from the sqlite connection it holds open: every key is served, nothing is
    // lost, the HSM stays SERVING.
    let checkpoints_away = checkpoints(&env);
    for round in 0..3 {
        for (k, w) in keys.iter().zip(&wrapped) {
            assert_eq!(
                unwrap_code(&mut c, k, w).await,
                Ok(dek.clone()),
                "{k} while the file is away (round {round})"
            );
            wrap(&mut c, k, &dek, b"")
                .await
                .unwrap_or_else(|e| panic!("wrap under {k} while the file is away: {e:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(health(&b, &env).await, Some(ServingStatus::Serving as i32));
    let (_, m) = b.http_get("/metrics").await;
    assert_eq!(series(&m, "keybroker_hsm_up"), Some(1.0), "{m}");
    poll_until(
        "checkpoints go on while the file is away",
        Duration::from_secs(20),
        || {
            let env = &env;
            async move { (checkpoints(env) > checkpoints_away).then_some(()) }
        },
    )
    .await;
    // What it cannot do is write: SQLite refuses to write a database file that was moved
    // (Kryoptic answers C_GenerateKey with CKR_DEVICE_MEMORY). A new key is UNAVAILABLE
    // (retry), and nothing half-made remains.
    let refused = c
        .mgmt
        .create_key(pb::CreateKeyRequest {
            key: "t/new".into(),
            key_type: pb::KeyType::Aes256 as i32,
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|s| s.code());
    assert_eq!(
        refused,
        Err(Code::Unavailable),
        "a new key while the file is away"
    );
    let missing = c
        .mgmt
        .get_key(pb::GetKeyRequest {
            key: "t/new".into(),
        })
        .await
        .map(|_| ())
        .map_err(|s| s.code());
    assert_eq!(
        missing,
        Err(Code::NotFound),
        "the refused key was rolled back"
    );
    assert_eq!(
        unwrap_code(&mut c, keys[0], &wrapped[0]).await,
        Ok(dek.clone()),
        "served after the refused creation"
    );

    // The file comes back: the same, and writes work again.
    std::fs::rename(&away, &db).expect("move the sqlite file back");
    create(
        &mut c,
        "t/new",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let w_new = wrap(&mut c, "t/new", &dek, b"")
        .await
        .expect("wrap under the new key")
        .wrapped_key;
    for (k, w) in keys.iter().zip(&wrapped) {
        assert_eq!(
            unwrap_code(&mut c, k, w).await,
            Ok(dek.clone()),
            "{k} after"
        );
        assert_enabled(&mut c, k).await;
    }
    let log = b.stop().await;
    assert!(!log.contains("integrity check failed"), "{log}");
    assert!(!log.contains("HSM storage lost"), "{log}");
    let (ok, out) = env.verify_audit(&env.audit_log());
    assert!(ok, "{out}");
    // A restart reads the file that came back: every key, the new one too.
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    for (k, w) in keys.iter().zip(&wrapped).chain([(&"t/new", &w_new)]) {
        assert_eq!(
            unwrap_code(&mut c, k, w).await,
            Ok(dek.clone()),
            "{k} after restart"
        );
    }
    b.stop().await;
}

#[tokio::test]
async fn kryoptic_reinitialised_while_its_sqlite_file_is_away_serves_again_when_it_returns() {
    if skip_unless(
        "kryoptic_reinitialised_while_its_sqlite_file_is_away_serves_again_when_it_returns",
        TokenKind::Kryoptic,
        "moves Kryoptic's sqlite file away",
    ) {
        return;
    }
    // The file away, then one lost device: the re-initialisation's C_Initialize opens the path
    // again, and Kryoptic makes an empty file there and shows an uninitialised token ("Kryoptic
    // Soft Token"), so the token is not found until the file is back.
    storage_loss_and_return(
        true,
        |env| {
            let (db, away) = kryoptic_db(env);
            std::fs::rename(db, away).expect("move the sqlite file away");
            env.faults()
                .set(&[Rule::fail("*", "CKR_DEVICE_REMOVED").count(1).latch()])
                .expect("rules");
        },
        |env| {
            let (db, away) = kryoptic_db(env);
            std::fs::rename(away, db).expect("move the sqlite file back");
            // The rule fired once already; a restarted broker would meet it afresh.
            env.faults().clear().expect("rules");
        },
        "no initialized token matches label",
    )
    .await;
}

#[tokio::test]
async fn a_rotated_pin_is_tried_once_then_not_again_until_the_pin_source_changes() {
    crate::require_aes!();
    let env = Env::with(Options {
        faults: true,
        sessions: Some(2),
        ..Options::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let key = "t/k";
    create(&mut c, key, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    let dek = random_dek(32);
    let w = wrap(&mut c, key, &dek, b"").await.expect("wrap");
    let f = env.faults();
    let trace = Rule::trace("C_Login");
    f.set(std::slice::from_ref(&trace)).expect("rules");

    // The PIN is changed on the token (C_SetPIN, as an operator would): the broker's session
    // stays logged in and serves on.
    let new_pin = "rotated-pin-4711";
    env.probe(&["set-pin", new_pin]);
    wrap(&mut c, key, &dek, b"").await.expect("still logged in");

    // The device goes away and comes back: the re-login with the old PIN fails once.
    f.set(&[trace.clone(), Rule::fail("*", "CKR_DEVICE_REMOVED").latch()])
        .expect("rules");
    assert_eq!(
        unwrap_code(&mut c, key, &w.wrapped_key).await,
        Err(Code::Unavailable)
    );
    poll_until("the broker notices", Duration::from_secs(10), || {
        let log = b.log();
        async move { log.contains("HSM device or token lost").then_some(()) }
    })
    .await;
    f.set(std::slice::from_ref(&trace)).expect("rules");
    poll_until("the PIN alert", Duration::from_secs(20), || {
        let log = b.log();
        async move {
            log.contains("ALERT: the token refused the user PIN")
                .then_some(())
        }
    })
    .await;
    // SIGHUP with the source unchanged, and many more recovery attempts: never a second
    // C_Login with the refused PIN.
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &b.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    poll_until("SIGHUP handled", Duration::from_secs(10), || {
        let log = b.log();
        async move {
            log.contains("SIGHUP: PIN source re-read, but it holds the PIN the token refused")
                .then_some(())
        }
    })
    .await;
    poll_until("40 more recovery attempts", Duration::from_secs(60), || {
        let log = b.log();
        async move { log.contains("attempt=40").then_some(()) }
    })
    .await;
    assert_eq!(f.count("trace", Some("C_Login")), 1, "{:?}", f.events());
    assert_eq!(
        unwrap_code(&mut c, key, &w.wrapped_key).await,
        Err(Code::Unavailable),
        "NOT_SERVING while the PIN is refused"
    );
    assert_eq!(
        health(&b, &env).await,
        Some(ServingStatus::NotServing as i32)
    );

    // The operator puts the new PIN in the PIN file: the next attempt re-reads it, logs in
    // once and serves (no restart, no SIGHUP needed).
    std::fs::write(&env.token.pin_file, format!("{new_pin}\n")).expect("write the PIN file");
    poll_until("served again", Duration::from_secs(20), || {
        let mut c = c.clone();
        let w = w.wrapped_key.clone();
        async move { unwrap_code(&mut c, key, &w).await.ok() }
    })
    .await;
    assert_eq!(f.count("trace", Some("C_Login")), 2, "{:?}", f.events());
    let log = b.stop().await;
    assert!(
        !log.contains(new_pin) && !log.contains(&env.token.user_pin),
        "no PIN in the log"
    );
}

#[tokio::test]
async fn check_config_refuses_what_serve_refuses_for_the_same_reason() {
    let good = "[[binding]]\nidentity = \"spiffe://keybroker.test/app\"\nrole = \"crypto-user\"\nscope = \"all\"\n";
    let env = Env::with(Options {
        policy: Some(good.into()),
        ..Options::default()
    });
    env.check_config()
        .expect("a valid policy passes check-config");
    let cases = [
        ("a missing policy file", None, "cannot read policy file"),
        (
            "an unknown role",
            Some(good.replace("crypto-user", "crypto-wizard")),
            "crypto-wizard",
        ),
        (
            "a bare \"*\" identity",
            Some(good.replace("spiffe://keybroker.test/app", "*")),
            "bare \"*\"",
        ),
    ];
    for (what, policy, reason) in cases {
        match &policy {
            Some(text) => std::fs::write(env.policy_file(), text).expect("write policy"),
            None => std::fs::remove_file(env.policy_file()).expect("remove policy"),
        }
        let serve = match env.try_start().await {
            Err(e) => e,
            Ok(b) => {
                b.stop().await;
                panic!("serve started with {what}");
            }
        };
        assert!(serve.contains(reason), "serve, {what}: {serve}");
        let check = env
            .check_config()
            .map(|r| r.to_string())
            .expect_err(&format!("check-config accepted {what}"));
        assert!(check.contains(reason), "check-config, {what}: {check}");
    }
}

#[tokio::test]
async fn a_slow_token_at_start_up_starts_and_serves_every_key() {
    crate::require_aes!();
    let env = Env::with(Options {
        faults: true,
        sessions: Some(2),
        // A short call timeout and session wait (the issue saw 10 s and 2 s with 378 keys), and
        // a start-up budget too short for every check, so that the rest are proven after the
        // broker serves.
        hsm_extra: "call_timeout_ms = 500\nsession_wait_ms = 200\nstartup_check_budget_ms = 1000\n"
            .into(),
        ..Options::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let dek = random_dek(32);
    let mut wrapped = Vec::new();
    for i in 0..40 {
        let key = format!("t/k{i}");
        create(
            &mut c,
            &key,
            pb::KeyType::Aes256,
            pb::Algorithm::Unspecified,
        )
        .await;
        wrapped.push((
            key.clone(),
            wrap(&mut c, &key, &dek, b"")
                .await
                .expect("wrap")
                .wrapped_key,
        ));
    }
    b.stop().await;

    // 300 ms more for every encrypt and decrypt: each canary check takes longer than the
    // broker's own call timeout allows for a chunk of several.
    env.faults()
        .set(&[Rule::delay("C_Encrypt,C_Decrypt", 300)])
        .expect("rules");
    let b = env
        .try_start()
        .await
        .unwrap_or_else(|e| panic!("a slow token must not stop the broker: {e}"));
    let mut c = b.clients_as(&env.pki.client).await;
    for (key, w) in &wrapped {
        let mut r = tonic::Request::new(pb::UnwrapKeyRequest {
            wrapped: Some(pb::unwrap_key_request::Wrapped::Envelope(w.clone())),
            ..Default::default()
        });
        r.set_timeout(Duration::from_secs(30));
        let got = c
            .broker
            .unwrap_key(r)
            .await
            .unwrap_or_else(|e| panic!("{key}: {e:?}"));
        assert_eq!(got.into_inner().plaintext, dek, "{key}");
    }
    let log = b.stop().await;
    assert!(!log.contains("integrity check failed"), "{log}");
    assert!(
        log.contains("start-up identity checks: not every version could be proven"),
        "{log}"
    );
}

/// Raw HTTP/2 over mutual TLS (the `h2` crate), to put on the wire what a gRPC client never
/// sends: a stream with headers and no body, bad framing, bad headers.
pub(crate) mod raw {
    use std::{net::SocketAddr, sync::Arc};

    use bytes::Bytes;
    use h2::client::SendRequest;
    use rustls::pki_types::ServerName;
    use tokio::net::TcpStream;
    use tokio_rustls::TlsConnector;

    use crate::common::*;

    pub async fn connect(b: &Broker, env: &Env) -> SendRequest<Bytes> {
        try_connect(b, env).await.expect("connect, TLS and HTTP/2")
    }

    /// A connection with TLS and HTTP/2 set up, or `None` if the server closed it first.
    pub async fn try_connect(b: &Broker, env: &Env) -> Option<SendRequest<Bytes>> {
        try_connect_to(b.addr, env).await
    }

    /// [`try_connect`] to an address (a broker that restarts on a fixed port).
    pub async fn try_connect_to(addr: SocketAddr, env: &Env) -> Option<SendRequest<Bytes>> {
        let cfg = crate::tls::client_config(env, Some(&env.pki.client), false);
        let tcp = TcpStream::connect(addr).await.ok()?;
        let name = ServerName::try_from("localhost").expect("name");
        let tls = TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .ok()?;
        let (send, conn) = h2::client::handshake(tls).await.ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        // The server's SETTINGS came, or the connection is gone.
        send.ready().await.ok()
    }

    pub fn request(path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut r = http::Request::post(format!("https://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).expect("request")
    }

    /// One gRPC message frame: the compressed flag, the length prefix, the bytes.
    pub fn frame(compressed: bool, len: u32, bytes: &[u8]) -> Vec<u8> {
        let mut f = vec![u8::from(compressed)];
        f.extend(len.to_be_bytes());
        f.extend(bytes);
        f
    }

    /// Sends `req` and `body` (`None`: headers only, the stream left open) and returns the
    /// reply's `grpc-status` and `grpc-message`.
    pub async fn call(
        send: SendRequest<Bytes>,
        req: http::Request<()>,
        body: Option<Vec<u8>>,
    ) -> (i32, String) {
        try_call(send, req, body).await.expect("an answer")
    }

    /// [`call`], or `None` if the connection failed before an answer (a broker killed).
    pub async fn try_call(
        send: SendRequest<Bytes>,
        req: http::Request<()>,
        body: Option<Vec<u8>>,
    ) -> Option<(i32, String)> {
        let mut send = send.ready().await.ok()?;
        let (resp, mut stream) = send.send_request(req, false).ok()?;
        if let Some(b) = body {
            stream.send_data(Bytes::from(b), true).ok()?;
        }
        let resp = resp.await.ok()?;
        drop(stream);
        let (parts, mut body) = resp.into_parts();
        let status = |h: &http::HeaderMap| {
            h.get("grpc-status").map(|s| {
                (
                    s.to_str().expect("ascii").parse::<i32>().expect("number"),
                    h.get("grpc-message")
                        .map(|m| m.to_str().unwrap_or("").to_string())
                        .unwrap_or_default(),
                )
            })
        };
        if let Some(s) = status(&parts.headers) {
            return Some(s);
        }
        while let Some(chunk) = body.data().await {
            let c = chunk.ok()?;
            let _ = body.flow_control().release_capacity(c.len());
        }
        let trailers = body.trailers().await.ok()??;
        status(&trailers)
    }
}

const WRAP: &str = "/keybroker.v1.KeyBroker/WrapKey";
const LIST: &str = "/keybroker.v1.KeyManagement/ListKeys";

#[tokio::test]
async fn header_only_streams_are_closed_at_the_request_timeout() {
    let env = Env::with(Options {
        server_extra: "request_timeout_ms = 1500\n".into(),
        ..Options::default()
    });
    let b = env.start().await;
    let send = raw::connect(&b, &env).await;
    // Headers, then nothing: no body, no END_STREAM.
    let streams: Vec<_> = (0..16)
        .map(|_| tokio::spawn(raw::call(send.clone(), raw::request(WRAP, &[]), None)))
        .collect();
    for s in streams {
        let (code, message) = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("the stream is answered and closed (bound far above request_timeout_ms)")
            .expect("task");
        assert_eq!(code, Code::DeadlineExceeded as i32, "{message}");
    }
    // The connection and the broker still serve.
    let (code, message) = raw::call(
        send.clone(),
        raw::request(LIST, &[]),
        Some(raw::frame(false, 0, &[])),
    )
    .await;
    assert_eq!(code, 0, "{message}");
    let log = b.stop().await;
    assert!(!log.contains("panicked"), "{log}");
    let timed_out = std::fs::read_to_string(env.audit_log())
        .expect("audit")
        .lines()
        .filter(|l| l.contains("\"op\":\"WrapKey\"") && l.contains("DEADLINE_EXCEEDED"))
        .count();
    assert_eq!(timed_out, 16, "each header-only stream is audited");
}

#[tokio::test]
async fn framing_errors_sizes_and_bad_timeouts_get_the_documented_status_call_by_call() {
    let env = Env::new();
    let b = env.start().await;
    let send = raw::connect(&b, &env).await;
    let wrap_body = {
        let mut m = vec![0x0a, 0x03, b't', b'/', b'k', 0x12, 0x20];
        m.extend([7u8; 32]);
        m
    };
    /// What is sent, where, with which extra headers, the body, and the status wanted.
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>, Code);
    let cases: Vec<Case<'_>> = vec![
        (
            "a length prefix larger than the body",
            WRAP,
            vec![],
            raw::frame(false, 100, &wrap_body),
            Code::InvalidArgument,
        ),
        (
            "the compressed flag without grpc-encoding",
            WRAP,
            vec![],
            raw::frame(true, wrap_body.len() as u32, &wrap_body),
            Code::InvalidArgument,
        ),
        (
            "a message over the size limit",
            WRAP,
            vec![],
            raw::frame(false, 64 << 20, &wrap_body),
            Code::InvalidArgument,
        ),
        (
            "a malformed protobuf message",
            WRAP,
            vec![],
            raw::frame(false, 3, &[0xff, 0xff, 0xff]),
            Code::InvalidArgument,
        ),
        (
            "an invalid grpc-timeout",
            LIST,
            vec![("grpc-timeout", "soon")],
            raw::frame(false, 0, &[]),
            Code::InvalidArgument,
        ),
        (
            "a grpc-timeout of nine digits",
            LIST,
            vec![("grpc-timeout", "123456789S")],
            raw::frame(false, 0, &[]),
            Code::InvalidArgument,
        ),
        (
            "a valid grpc-timeout",
            LIST,
            vec![("grpc-timeout", "5S")],
            raw::frame(false, 0, &[]),
            Code::Ok,
        ),
        (
            "an unknown method",
            "/keybroker.v1.KeyBroker/Nope",
            vec![],
            raw::frame(false, 0, &[]),
            Code::Unimplemented,
        ),
    ];
    for (what, path, headers, body, want) in cases {
        let (code, message) =
            raw::call(send.clone(), raw::request(path, &headers), Some(body)).await;
        assert_eq!(code, want as i32, "{what}: {message}");
        assert_ne!(code, Code::Internal as i32, "{what}: {message}");
    }
    let log = b.stop().await;
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test]
async fn idle_connections_up_to_the_descriptor_limit_do_not_starve_the_hsm() {
    crate::require_aes!();
    let limit = 256;
    let env = Env::with(Options {
        wrapper: vec![
            "prlimit".into(),
            format!("--nofile={limit}:{limit}"),
            "--".into(),
        ],
        // One identity makes every connection here: lift its own cap, to reach the
        // descriptor cap.
        tls_extra: "max_connections_per_identity = 1000".into(),
        ..Options::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let key = "t/k";
    create(&mut c, key, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    let dek = random_dek(32);
    let w = wrap(&mut c, key, &dek, b"")
        .await
        .expect("wrap")
        .wrapped_key;

    // More idle connections (TLS and HTTP/2 done, then nothing) than the broker has
    // descriptors.
    let mut idle = Vec::new();
    let mut refused = 0;
    for _ in 0..(limit + 64) {
        match tokio::time::timeout(Duration::from_secs(10), raw::try_connect(&b, &env)).await {
            Ok(Some(conn)) => idle.push(conn),
            _ => refused += 1,
        }
    }
    assert!(refused > 0, "connections over the cap are refused");
    // The HSM, the store and the audit trail keep working on the connection that was there.
    for _ in 0..20 {
        assert_eq!(unwrap_code(&mut c, key, &w).await, Ok(dek.clone()));
    }
    create(
        &mut c,
        "t/k2",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    wrap(&mut c, "t/k2", &dek, b"")
        .await
        .expect("wrap under a new key");
    // Once the idle connections go, new clients get in again.
    drop(idle);
    poll_until(
        "a new connection is served",
        Duration::from_secs(30),
        || {
            let (b, env) = (&b, &env);
            async move {
                let send = raw::try_connect(b, env).await?;
                let (code, _) = raw::call(
                    send,
                    raw::request(LIST, &[]),
                    Some(raw::frame(false, 0, &[])),
                )
                .await;
                (code == 0).then_some(())
            }
        },
    )
    .await;
    let log = b.stop().await;
    assert!(
        log.contains("file descriptors: client connections are capped"),
        "{log}"
    );
    assert!(
        log.contains("connection refused: the connection cap is reached"),
        "{log}"
    );
    assert!(
        !log.contains("integrity check failed") && !log.contains("storage lost"),
        "{log}"
    );
}

/// After a storage loss the broker serves again as soon as the key objects are back, without
/// waiting for the pass that re-finds every version (which runs behind it, as after a lost
/// device): the return to service does not grow with the number of keys. Each attribute read
/// is slowed while the storage returns, so the pass over 24 versions takes at least 1.2 s
/// while the first unwrap needs a handful of reads: the first unwrap is served before the
/// pass has logged that it finished, and the pass still finishes.
#[tokio::test]
async fn after_a_storage_loss_serving_does_not_wait_for_the_pass_over_every_version() {
    crate::require_aes!();
    let env = Env::with(Options {
        faults: true,
        ..Options::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let dek = random_dek(32);
    let mut first = None;
    for i in 0..24 {
        let k = format!("t/k{i:02}");
        create(&mut c, &k, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
        let w = wrap(&mut c, &k, &dek, b"").await.expect("wrap").wrapped_key;
        first.get_or_insert((k, w));
    }
    let (key, envelope) = first.expect("a key");
    env.faults().set(&storage_loss_rules()).expect("rules");
    poll_until("UNAVAILABLE", Duration::from_secs(20), || {
        let mut c = c.clone();
        let (key, envelope) = (key.clone(), envelope.clone());
        async move {
            (unwrap_code(&mut c, &key, &envelope).await == Err(Code::Unavailable)).then_some(())
        }
    })
    .await;
    // The storage returns, with every attribute read slowed down.
    env.faults()
        .set(&[Rule::delay("C_GetAttributeValue", 25)])
        .expect("rules");
    poll_until("served again", Duration::from_secs(30), || {
        let mut c = c.clone();
        let (key, envelope) = (key.clone(), envelope.clone());
        async move { unwrap_code(&mut c, &key, &envelope).await.ok() }
    })
    .await;
    const PASS_DONE: &str = "KEK objects re-found after re-initialising the HSM";
    assert!(
        !b.log().contains(PASS_DONE),
        "served only after the pass over every version: {}",
        b.log()
    );
    let (done, log) = b.log_contains(PASS_DONE).await;
    assert!(
        done,
        "the pass over every version finishes behind it: {log}"
    );
    env.faults().clear().expect("rules");
    for i in 0..24 {
        let k = format!("t/k{i:02}");
        let w = wrap(&mut c, &k, &dek, b"")
            .await
            .expect("wrap after")
            .wrapped_key;
        assert_eq!(unwrap_code(&mut c, &k, &w).await, Ok(dek.clone()), "{k}");
        let got = c
            .mgmt
            .get_key(pb::GetKeyRequest { key: k.clone() })
            .await
            .expect("get key")
            .into_inner();
        assert_eq!(
            got.state,
            pb::KeyState::Enabled as i32,
            "{k} not quarantined"
        );
    }
    b.stop().await;
}

/// A broker on the fault module with no audit checkpoint during the test: a checkpoint's
/// search for the audit key would take one-shot rules on `C_FindObjects*`.
fn faults_without_checkpoints() -> Env {
    Env::with(Options {
        faults: true,
        audit_extra: "checkpoint_interval_ms = 3600000\n".into(),
        ..Options::default()
    })
}

/// A search that finds nothing while the pass after a re-initialisation is still running is
/// not a verdict on the key: the storage may be passing through a fault (the soak saw it on
/// Kryoptic, a storage loss starting just after a lost device came back). The key is answered
/// UNAVAILABLE, left for the pass to judge, and served once the pass has found its object —
/// not FAILED_PRECONDITION for the rest of the generation. The pass is held at its first
/// search; the request's own search, meanwhile, finds nothing.
#[tokio::test]
async fn a_search_finding_nothing_before_the_pass_ends_is_not_an_integrity_failure() {
    crate::require_aes!();
    let env = faults_without_checkpoints();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let dek = random_dek(32);
    let key = "t/blip";
    create(&mut c, key, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    let envelope = wrap(&mut c, key, &dek, b"")
        .await
        .expect("wrap")
        .wrapped_key;

    // The device goes away; the broker re-initialises in the background.
    crate::faults::remove_the_device(&b, env.faults(), &mut c, key).await;
    // It comes back: the pass over the token is held at its first search, and the next search
    // (the request's lookup of its own key) finds nothing.
    env.faults()
        .set(&[
            Rule::hang("C_FindObjectsInit").count(1).ms(30_000),
            Rule::empty().count(1),
        ])
        .expect("rules");
    poll_until("the pass is held", Duration::from_secs(20), || {
        let env = &env;
        async move { (env.faults().count("hang", Some("C_FindObjectsInit")) > 0).then_some(()) }
    })
    .await;
    assert_eq!(
        unwrap_code(&mut c, key, &envelope).await,
        Err(Code::Unavailable),
        "a key whose search found nothing while the pass runs: {}",
        b.log()
    );
    assert_eq!(env.faults().count("empty", Some("C_FindObjects")), 1);
    // Release the pass: it finds the object, and the key is served.
    env.faults().clear().expect("rules");
    let (done, log) = b
        .log_contains("KEK objects re-found after re-initialising the HSM")
        .await;
    assert!(done, "the pass finishes: {log}");
    assert_eq!(unwrap_code(&mut c, key, &envelope).await, Ok(dek.clone()));
    assert_enabled(&mut c, key).await;
    let log = b.stop().await;
    assert!(!log.contains("integrity check failed"), "{log}");
    // It was the request's search that found nothing, not the pass (a storage loss).
    assert!(
        log.contains("a search by a KEK's id found nothing"),
        "{log}"
    );
    assert!(!log.contains("HSM storage lost"), "{log}");
}

/// If the pass gives up (its searches keep failing), no pass will judge the versions: a
/// lookup by id then does, so a key whose object was destroyed while the device was away is
/// refused as such (FAILED_PRECONDITION), not UNAVAILABLE ("retry") for the whole generation,
/// and the other keys are served.
#[tokio::test]
async fn when_the_pass_gives_up_a_lookup_judges_a_missing_key_itself() {
    crate::require_aes!();
    let env = faults_without_checkpoints();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let dek = random_dek(32);
    create(
        &mut c,
        "t/kept",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let gone = create(
        &mut c,
        "t/gone",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let kept = wrap(&mut c, "t/kept", &dek, b"")
        .await
        .expect("wrap")
        .wrapped_key;
    let lost = wrap(&mut c, "t/gone", &dek, b"")
        .await
        .expect("wrap")
        .wrapped_key;

    crate::faults::remove_the_device(&b, env.faults(), &mut c, "t/kept").await;
    // Meanwhile t/gone's object is destroyed; when the device returns every search fails.
    env.probe(&["tamper", &hex::encode(&gone.versions[0].id), "destroy"]);
    env.faults()
        .set(&[Rule::fail("C_FindObjectsInit", "CKR_FUNCTION_FAILED")])
        .expect("rules");
    let (gave_up, log) = b.log_contains("re-finding the KEK objects gave up").await;
    assert!(gave_up, "the pass gives up: {log}");
    env.faults().clear().expect("rules");
    assert_eq!(
        unwrap_code(&mut c, "t/gone", &lost).await,
        Err(Code::FailedPrecondition),
        "the destroyed key, judged by its own lookup: {}",
        b.log()
    );
    assert_eq!(unwrap_code(&mut c, "t/kept", &kept).await, Ok(dek.clone()));
    let log = b.stop().await;
    assert!(log.contains("its HSM object is missing"), "{log}");
}

/// A broker whose audit I/O fault `point` fires while `<dir>/faults/<point>` exists (the path
/// returned); a key `t/k`. Without `journal`, the journal cannot be opened at start-up: each
/// group syncs the log itself.
async fn broker_with_audit_fault(point: &str, journal: bool) -> (Env, Broker, std::path::PathBuf) {
    let env = Env::with(Options {
        sections: METRICS.into(),
        audit_extra: "checkpoint_interval_ms = 200\n".into(),
        ..Options::default()
    });
    let triggers = env.dir.path().join("faults");
    std::fs::create_dir(&triggers).expect("mkdir");
    let mut points = point.to_string();
    if !journal {
        std::fs::write(triggers.join("audit.journal"), b"").expect("trigger");
        points.push_str(",audit.journal");
    }
    let b = env
        .try_start_with(&[
            ("KEYBROKER_FAILPOINTS", &points),
            (
                "KEYBROKER_FAILPOINT_TRIGGERS",
                triggers.to_str().expect("utf-8"),
            ),
        ])
        .await
        .expect("start");
    if !journal {
        let (found, log) = b.log_contains("no audit journal").await;
        assert!(found, "{log}");
    }
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    assert_eq!(health(&b, &env).await, Some(ServingStatus::Serving as i32));
    let (_, m) = b.http_get("/metrics").await;
    assert_eq!(series(&m, "keybroker_audit_up"), Some(1.0), "{m}");
    (env, b, triggers.join(point))
}

/// The audit trail fails under `b` (the trigger appears): requests are refused UNAVAILABLE,
/// health says NOT_SERVING at once, naming the audit trail, with the HSM still up. Returns the
/// wraps answered before.
async fn audit_trail_fails(env: &Env, b: &Broker, trigger: &std::path::Path) -> usize {
    let mut c = b.clients_as(&env.pki.client).await;
    let answered = 5;
    for i in 0..answered {
        wrap(&mut c, "t/k", &[i as u8; 32], b"")
            .await
            .expect("wrap");
    }
    // A checkpoint after them: no record waits for one when the trail fails, so only the
    // writer's own retries (not the checkpoint timer) can find a log that works again.
    poll_until(
        "a checkpoint after the wraps",
        Duration::from_secs(10),
        || async {
            let log = std::fs::read_to_string(env.audit_log()).expect("audit log");
            let last = log.lines().last().unwrap_or_default().to_string();
            last.contains("\"kind\":\"checkpoint\"").then_some(())
        },
    )
    .await;
    std::fs::write(trigger, b"").expect("trigger");
    let e = wrap(&mut c, "t/k", &[9; 32], b"")
        .await
        .expect_err("a wrap the trail cannot record");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("audit"), "{}", e.message());
    poll_until("health NOT_SERVING", Duration::from_secs(10), || async {
        (health(b, env).await == Some(ServingStatus::NotServing as i32)).then_some(())
    })
    .await;
    let (code, body) = b.http_get("/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("audit trail"), "{body}");
    let (_, m) = b.http_get("/metrics").await;
    assert_eq!(series(&m, "keybroker_audit_up"), Some(0.0), "{m}");
    assert_eq!(
        series(&m, "keybroker_hsm_up"),
        Some(1.0),
        "the HSM is fine: {m}"
    );
    answered
}

/// How many wraps the audit log records as answered.
fn answered_wraps(env: &Env) -> usize {
    std::fs::read_to_string(env.audit_log())
        .expect("audit log")
        .lines()
        .filter(|l| l.contains("\"op\":\"WrapKey\"") && l.contains("\"outcome\":\"OK\""))
        .count()
}

#[tokio::test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature (tests/run enables it)"
)]
async fn a_failed_audit_sync_shows_in_health_until_a_restart() {
    crate::require_aes!();
    failed_sync_holds_until_a_restart(true).await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature (tests/run enables it)"
)]
async fn without_a_journal_a_failed_sync_of_the_log_also_holds_until_a_restart() {
    crate::require_aes!();
    failed_sync_holds_until_a_restart(false).await;
}

async fn failed_sync_holds_until_a_restart(journal: bool) {
    let (env, b, trigger) = broker_with_audit_fault("audit.sync", journal).await;
    let answered = audit_trail_fails(&env, &b, &trigger).await;
    // The disk is fine again, but a failed sync may have lost pages the kernel then reports
    // clean: the journal keeps what it vouches for, and the broker stays NOT_SERVING (and
    // refuses requests) until a restart applies it.
    std::fs::remove_file(&trigger).expect("untrigger");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        health(&b, &env).await,
        Some(ServingStatus::NotServing as i32),
        "a failed sync holds until a restart"
    );
    let mut c = b.clients_as(&env.pki.client).await;
    let e = wrap(&mut c, "t/k", &[7; 32], b"")
        .await
        .expect_err("refused until a restart");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    drop(c);
    b.stop().await;
    let b = env.start().await;
    assert_eq!(health(&b, &env).await, Some(ServingStatus::Serving as i32));
    let mut c = b.clients_as(&env.pki.client).await;
    wrap(&mut c, "t/k", &[8; 32], b"")
        .await
        .expect("served after the restart");
    drop(c);
    b.stop().await;
    assert_eq!(
        answered_wraps(&env),
        answered + 1,
        "every answered wrap is in the trail, and no refused one"
    );
    let (ok, out) = env.verify_audit(&env.audit_log());
    assert!(ok, "{out}");
}

#[tokio::test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature (tests/run enables it)"
)]
async fn an_audit_log_that_cannot_be_written_is_not_serving_until_it_can_again() {
    crate::require_aes!();
    let (env, b, trigger) = broker_with_audit_fault("audit.write", true).await;
    let answered = audit_trail_fails(&env, &b, &trigger).await;
    // Room again (an operator freed the volume): the writer's own checkpoint attempts find it
    // without any request — a load balancer that took the broker out sends none.
    std::fs::remove_file(&trigger).expect("untrigger");
    poll_until("health SERVING again", Duration::from_secs(10), || async {
        (health(&b, &env).await == Some(ServingStatus::Serving as i32)).then_some(())
    })
    .await;
    let (code, body) = b.http_get("/healthz").await;
    assert_eq!(code, 200, "{body}");
    let (_, m) = b.http_get("/metrics").await;
    assert_eq!(series(&m, "keybroker_audit_up"), Some(1.0), "{m}");
    let mut c = b.clients_as(&env.pki.client).await;
    wrap(&mut c, "t/k", &[8; 32], b"")
        .await
        .expect("served again");
    drop(c);
    b.stop().await;
    assert_eq!(answered_wraps(&env), answered + 1);
    let (ok, out) = env.verify_audit(&env.audit_log());
    assert!(ok, "{out}");
}
