//! HSM faults, injected through the fault module (`hsm_fixtures::fault`) between the broker and
//! the real token: one test per fault class of the HSM layer's recovery (lost session, lost
//! device or token, a device error from a token that still answers, a failed function, invalid
//! object handles, a hung call, work whose deadline has passed). The broker loads the fault
//! module exactly as it would a vendor's module.

use std::time::Duration;

use hsm_fixtures::fault::{FaultControl, Rule};
use keybroker::client::Clients;
use keybroker_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::common::*;

fn fault_env(sessions: usize) -> Env {
    Env::with(Options {
        faults: true,
        sessions: Some(sessions),
        ..Default::default()
    })
}

async fn wrap_within(
    c: &mut Clients,
    key: &str,
    dek: &[u8],
    timeout: Duration,
) -> Result<pb::WrapKeyResponse, tonic::Status> {
    let mut r = tonic::Request::new(pb::WrapKeyRequest {
        key: key.into(),
        plaintext: dek.to_vec(),
        ..Default::default()
    });
    r.set_timeout(timeout);
    c.broker.wrap_key(r).await.map(|r| r.into_inner())
}

async fn unwrap_within(
    c: &mut Clients,
    env: &[u8],
    timeout: Duration,
) -> Result<pb::UnwrapKeyResponse, tonic::Status> {
    let mut r = tonic::Request::new(pb::UnwrapKeyRequest {
        wrapped: Some(pb::unwrap_key_request::Wrapped::Envelope(env.to_vec())),
        ..Default::default()
    });
    r.set_timeout(timeout);
    c.broker.unwrap_key(r).await.map(|r| r.into_inner())
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, what: &str) {
    match r {
        Err(s) => assert_eq!(s.code(), code, "{what}: {s:?}"),
        Ok(v) => panic!("{what}: expected {code:?}, got {v:?}"),
    }
}

/// Waits until a wrap succeeds again (the broker serves after recovery).
async fn until_serving(c: &mut Clients, key: &str) {
    poll_until("the broker serves again", Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            wrap_within(&mut c, key, &[1; 32], Duration::from_secs(2))
                .await
                .ok()
        }
    })
    .await;
}

/// Removes the device (every call fails with `CKR_DEVICE_REMOVED` until the rules change) and
/// waits until a wrap under `key` has made the broker notice.
pub(crate) async fn remove_the_device(b: &Broker, f: &FaultControl, c: &mut Clients, key: &str) {
    f.set(&[Rule::fail("*", "CKR_DEVICE_REMOVED").latch()])
        .expect("rules");
    assert_code(
        wrap(c, key, &[7; 32], b"").await,
        Code::Unavailable,
        "device away",
    );
    poll_until("the broker notices", Duration::from_secs(10), || {
        let log = b.log();
        async move { log.contains("HSM device or token lost").then_some(()) }
    })
    .await;
}

/// Waits until `grpc.health.v1` reports `want` for the whole server and the data plane.
async fn wait_health(b: &Broker, env: &Env, want: ServingStatus) {
    let ch = keybroker::client::connect(&b.settings_as(&env.pki.client))
        .await
        .expect("connect");
    poll_until(&format!("health {want:?}"), Duration::from_secs(10), || {
        let mut h = HealthClient::new(ch.clone());
        async move {
            for service in ["", "keybroker.v1.KeyBroker"] {
                let s = h
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .status;
                if s != want as i32 {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

#[tokio::test]
async fn a_lost_session_is_evicted_and_the_operation_retried_once() {
    crate::require_aes!();
    let env = fault_env(2);
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let key = "t/k";
    create(&mut c, key, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    let dek = random_dek(32);
    let w = wrap(&mut c, key, &dek, b"").await.expect("wrap");
    let f = env.faults();

    for (function, rv) in [
        ("C_EncryptInit", "CKR_SESSION_HANDLE_INVALID"),
        ("C_EncryptInit", "CKR_SESSION_CLOSED"),
    ] {
        f.set(&[Rule::fail(function, rv).count(1)]).expect("rules");
        let again = wrap(&mut c, key, &dek, b"")
            .await
            .unwrap_or_else(|e| panic!("{rv} once: retried on a fresh session: {e:?}"));
        assert_eq!(again.key_version, 1);
    }
    f.set(&[Rule::fail("C_DecryptInit", "CKR_SESSION_HANDLE_INVALID").count(1)])
        .expect("rules");
    let u = unwrap(&mut c, key, &w.wrapped_key, b"")
        .await
        .expect("unwrap retried on a fresh session");
    assert_eq!(u.plaintext, dek);
    assert_eq!(f.count("fail", None), 3, "each fault was injected once");

    // Lost twice in a row: retried once only, then UNAVAILABLE (retryable).
    f.set(&[Rule::fail("C_EncryptInit", "CKR_SESSION_HANDLE_INVALID").count(2)])
        .expect("rules");
    assert_code(
        wrap(&mut c, key, &dek, b"").await,
        Code::Unavailable,
        "lost twice",
    );
    assert_eq!(f.count("fail", None), 5);
    // The device is fine: no re-initialisation, the next request is served.
    let w2 = wrap(&mut c, key, &dek, b"").await.expect("served again");
    assert_eq!(
        unwrap(&mut c, key, &w2.wrapped_key, b"")
            .await
            .expect("unwrap")
            .plaintext,
        dek
    );
    let log = b.stop().await;
    assert!(!log.contains("re-initialising"), "{log}");
    assert!(log.contains("HSM session lost"), "{log}");
}

#[tokio::test]
async fn a_removed_device_absent_token_or_lost_login_is_unavailable_then_served_again_without_a_restart()
 {
    crate::require_aes!();
    let env = fault_env(2);
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let key = "t/k";
    create(&mut c, key, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    let rsa = "t/rsa";
    create(
        &mut c,
        rsa,
        pb::KeyType::Rsa2048,
        pb::Algorithm::Unspecified,
    )
    .await;
    let dek = random_dek(32);
    let before = wrap(&mut c, key, &dek, b"").await.expect("wrap");
    let rsa_before = wrap(&mut c, rsa, &dek, b"").await.expect("wrap rsa");
    let f = env.faults();
    let trace = Rule::trace("C_Initialize,C_Finalize,C_Login");

    // A removed device, an absent token, and a token that dropped the login (reset).
    for (round, rv) in [
        "CKR_DEVICE_REMOVED",
        "CKR_TOKEN_NOT_PRESENT",
        "CKR_USER_NOT_LOGGED_IN",
    ]
    .into_iter()
    .enumerate()
    {
        // The device goes away, and stays unusable until the library is re-initialised.
        f.set(&[trace.clone(), Rule::fail("*", rv).latch()])
            .expect("rules");
        assert_code(wrap(&mut c, key, &dek, b"").await, Code::Unavailable, rv);
        for _ in 0..3 {
            assert_code(
                unwrap(&mut c, key, &before.wrapped_key, b"").await,
                Code::Unavailable,
                "while the device is away",
            );
        }
        // Metadata is served from memory meanwhile.
        c.mgmt
            .get_key(pb::GetKeyRequest { key: key.into() })
            .await
            .expect("GetKey needs no HSM");
        poll_until(
            "the broker notices the lost device",
            Duration::from_secs(10),
            || {
                let log = b.log();
                async move { log.contains("HSM device or token lost").then_some(()) }
            },
        )
        .await;

        // The device comes back: served again, no restart, same process.
        f.set(std::slice::from_ref(&trace)).expect("rules");
        until_serving(&mut c, key).await;
        wait_health(&b, &env, ServingStatus::Serving).await;
        assert!(
            f.count("trace", Some("C_Initialize")) >= 1 && f.count("trace", Some("C_Login")) >= 1,
            "round {round}: the broker re-initialised and logged in again: {:?}",
            f.events()
        );
        // Object handles were found again: old envelopes unwrap, under both key types.
        let u = unwrap(&mut c, key, &before.wrapped_key, b"")
            .await
            .expect("old AES envelope");
        assert_eq!(u.plaintext, dek);
        let u = unwrap(&mut c, rsa, &rsa_before.wrapped_key, b"")
            .await
            .expect("old RSA envelope");
        assert_eq!(u.plaintext, dek);
        // Key changes work on the new session pool.
        let k = c
            .mgmt
            .rotate_key(pb::RotateKeyRequest { key: key.into() })
            .await
            .expect("rotate after recovery")
            .into_inner();
        assert_eq!(k.current_version as usize, round + 2);
        create(
            &mut c,
            &format!("t/after{round}"),
            pb::KeyType::Aes256,
            pb::Algorithm::Unspecified,
        )
        .await;
    }
    let log = b.stop().await;
    assert_eq!(
        log.matches("HSM re-initialised: serving again").count(),
        3,
        "{log}"
    );
    // Everything made before, during and after the faults survives a restart.
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    assert_eq!(
        unwrap(&mut c, key, &before.wrapped_key, b"")
            .await
            .expect("after restart")
            .plaintext,
        dek
    );
    b.stop().await;
}

#[tokio::test]
async fn a_device_error_from_a_token_that_still_answers_is_unavailable_without_reinitialising() {
    crate::require_aes!();
    let env = fault_env(2);
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let key = "t/k";
    create(&mut c, key, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    let dek = random_dek(32);
    let f = env.faults();
    f.set(&[
        Rule::trace("C_Initialize"),
        Rule::fail("C_EncryptInit", "CKR_DEVICE_ERROR").count(1),
    ])
    .expect("rules");
    assert_code(
        wrap(&mut c, key, &dek, b"").await,
        Code::Unavailable,
        "one device error",
    );
    poll_until(
        "the broker checks the token",
        Duration::from_secs(10),
        || {
            let log = b.log();
            async move { log.contains("the token still answers").then_some(()) }
        },
    )
    .await;
    wrap(&mut c, key, &dek, b"").await.expect("served");
    assert_eq!(
        f.count("trace", Some("C_Initialize")),
        0,
        "no re-initialisation"
    );

    // A device error on every call: the token does not answer, so it is re-initialised.
    f.set(&[
        Rule::trace("C_Initialize"),
        Rule::fail("*", "CKR_DEVICE_ERROR"),
    ])
    .expect("rules");
    assert_code(
        wrap(&mut c, key, &dek, b"").await,
        Code::Unavailable,
        "device errors",
    );
    poll_until("the broker notices", Duration::from_secs(10), || {
        let log = b.log();
        async move { log.contains("HSM device or token lost").then_some(()) }
    })
    .await;
    f.set(&[Rule::trace("C_Initialize")]).expect("rules");
    until_serving(&mut c, key).await;
    assert!(f.count("trace", Some("C_Initialize")) >= 1);
    b.stop().await;
}

#[tokio::test]
async fn a_failed_function_is_a_retryable_unavailable_never_unauthentic() {
    crate::require_aes!();
    let env = fault_env(2);
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let key = "t/k";
    create(&mut c, key, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    let dek = random_dek(32);
    let w = wrap(&mut c, key, &dek, b"aad").await.expect("wrap");
    let f = env.faults();
    f.set(&[Rule::fail("C_Decrypt", "CKR_FUNCTION_FAILED").count(1)])
        .expect("rules");
    match unwrap(&mut c, key, &w.wrapped_key, b"aad").await {
        Err(s) => {
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
            assert_ne!(s.message(), keybroker::error::UNAUTHENTIC_MESSAGE);
        }
        Ok(_) => panic!("the injected failure was not seen"),
    }
    assert_eq!(
        unwrap(&mut c, key, &w.wrapped_key, b"aad")
            .await
            .expect("retry succeeds")
            .plaintext,
        dek
    );
    f.set(&[Rule::fail("C_EncryptInit", "CKR_FUNCTION_FAILED").count(1)])
        .expect("rules");
    assert_code(
        wrap(&mut c, key, &dek, b"").await,
        Code::Unavailable,
        "wrap",
    );
    wrap(&mut c, key, &dek, b"").await.expect("retry succeeds");
    // A token failing a key creation (SoftHSM2 2.6.1 does, rarely, under concurrent load):
    // UNAVAILABLE, nothing half-made left behind, and the retry creates the key.
    f.set(&[Rule::fail("C_GenerateKey", "CKR_GENERAL_ERROR").count(1)])
        .expect("rules");
    let r = c
        .mgmt
        .create_key(pb::CreateKeyRequest {
            key: "t/new".into(),
            key_type: pb::KeyType::Aes256 as i32,
            ..Default::default()
        })
        .await;
    assert_code(r, Code::Unavailable, "create while the token fails it");
    assert_code(
        c.mgmt
            .get_key(pb::GetKeyRequest {
                key: "t/new".into(),
            })
            .await,
        Code::NotFound,
        "nothing was created",
    );
    create(
        &mut c,
        "t/new",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let log = b.stop().await;
    assert!(!log.contains("re-initialising"), "{log}");
    assert!(!log.contains("internal error"), "{log}");
}

#[tokio::test]
async fn invalid_object_handles_are_found_again() {
    crate::require_aes!();
    let env = fault_env(2);
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let key = "t/k";
    create(&mut c, key, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    let dek = random_dek(32);
    let w = wrap(&mut c, key, &dek, b"").await.expect("wrap");
    let f = env.faults();
    f.set(&[
        Rule::trace("C_FindObjectsInit"),
        Rule::fail("C_EncryptInit", "CKR_KEY_HANDLE_INVALID").count(1),
    ])
    .expect("rules");
    wrap(&mut c, key, &dek, b"")
        .await
        .expect("handles re-found, wrap retried");
    assert!(
        f.count("trace", Some("C_FindObjectsInit")) >= 1,
        "the objects were searched for again: {:?}",
        f.events()
    );
    f.set(&[Rule::fail("C_DecryptInit", "CKR_OBJECT_HANDLE_INVALID").count(1)])
        .expect("rules");
    assert_eq!(
        unwrap(&mut c, key, &w.wrapped_key, b"")
            .await
            .expect("handles re-found, unwrap retried")
            .plaintext,
        dek
    );
    // Invalid again after the refresh: retried once only.
    f.set(&[Rule::fail("C_DecryptInit", "CKR_OBJECT_HANDLE_INVALID").count(2)])
        .expect("rules");
    assert_code(
        unwrap(&mut c, key, &w.wrapped_key, b"").await,
        Code::Unavailable,
        "invalid twice",
    );
    unwrap(&mut c, key, &w.wrapped_key, b"")
        .await
        .expect("served again");
    let log = b.stop().await;
    assert!(
        log.contains("re-found the KEK objects after an invalid object handle"),
        "{log}"
    );
}

#[tokio::test]
async fn a_key_replaced_behind_a_handle_is_never_used_after_its_handles_are_found_again() {
    crate::require_aes!();
    let env = fault_env(2);
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let k = create(
        &mut c,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let dek = random_dek(32);
    let w = wrap(&mut c, "t/k", &dek, b"").await.expect("wrap");
    // Someone with the PIN replaces the KEK (same CKA_ID, same template) while the broker
    // runs; the next call finds its handle invalid and the objects are searched for again.
    env.probe(&["tamper", &hex::encode(&k.versions[0].id), "replace-good"]);
    let f = env.faults();
    f.set(&[Rule::fail("C_EncryptInit", "CKR_KEY_HANDLE_INVALID").count(1)])
        .expect("rules");
    assert_code(
        wrap(&mut c, "t/k", &dek, b"").await,
        Code::FailedPrecondition,
        "wrap under the replaced key",
    );
    assert_code(
        unwrap(&mut c, "t/k", &w.wrapped_key, b"").await,
        Code::FailedPrecondition,
        "unwrap with the replaced key",
    );
    let log = b.stop().await;
    assert!(log.contains("re-found the KEK objects"), "{log}");
}

#[tokio::test]
async fn a_hung_hsm_call_does_not_hang_the_server() {
    crate::require_aes!();
    let env = fault_env(2);
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let key = "t/k";
    create(&mut c, key, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    let dek = random_dek(32);
    let w = wrap(&mut c, key, &dek, b"").await.expect("wrap");
    let f = env.faults();
    f.set(&[Rule::hang("C_EncryptInit")]).expect("rules");

    // A wrap hangs in the HSM: the caller hears DEADLINE_EXCEEDED at its deadline.
    assert_code(
        wrap_within(&mut c, key, &dek, Duration::from_secs(1)).await,
        Code::DeadlineExceeded,
        "hung wrap",
    );
    assert_eq!(f.count("hang", None), 1);
    // The other session still serves; metadata needs no HSM at all.
    assert_eq!(
        unwrap_within(&mut c, &w.wrapped_key, Duration::from_secs(5))
            .await
            .expect("unwrap on the free session")
            .plaintext,
        dek
    );
    c.mgmt
        .get_key(pb::GetKeyRequest { key: key.into() })
        .await
        .expect("GetKey");
    // A second hung wrap takes the last session...
    assert_code(
        wrap_within(&mut c, key, &dek, Duration::from_secs(1)).await,
        Code::DeadlineExceeded,
        "second hung wrap",
    );
    assert_eq!(f.count("hang", None), 2);
    // ...so HSM work is refused as overload, not left to time out.
    assert_code(
        unwrap_within(&mut c, &w.wrapped_key, Duration::from_secs(5)).await,
        Code::ResourceExhausted,
        "no session free",
    );
    // The refusals are in the audit trail.
    let audit = std::fs::read_to_string(env.audit_log()).expect("audit log");
    assert_eq!(
        audit
            .lines()
            .filter(|l| l.contains("\"WrapKey\"") && l.contains("DEADLINE_EXCEEDED"))
            .count(),
        2,
        "{audit}"
    );
    // The HSM answers again: the hung calls finish, their sessions return, service resumes.
    f.clear().expect("rules");
    until_serving(&mut c, key).await;
    poll_until("both sessions back", Duration::from_secs(10), || {
        let mut c = c.clone();
        let w = w.wrapped_key.clone();
        async move {
            // Two concurrent calls both served means both sessions are free.
            let mut c2 = c.clone();
            let (a, b) = tokio::join!(
                unwrap_within(&mut c2, &w, Duration::from_secs(2)),
                unwrap_within(&mut c, &w, Duration::from_secs(2))
            );
            (a.is_ok() && b.is_ok()).then_some(())
        }
    })
    .await;
    b.stop().await;
}

#[tokio::test]
async fn work_whose_deadline_has_passed_is_not_started() {
    crate::require_aes!();
    let env = fault_env(1);
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let key = "t/k";
    create(&mut c, key, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    let f = env.faults();
    f.set(&[Rule::trace("C_GenerateKey"), Rule::hang("C_EncryptInit")])
        .expect("rules");
    // The only session hangs in a wrap.
    let hung = {
        let mut c = c.clone();
        tokio::spawn(
            async move { wrap_within(&mut c, key, &[7; 32], Duration::from_secs(2)).await },
        )
    };
    let started = poll_until("the wrap hangs in the HSM", Duration::from_secs(10), || {
        let events = f.events();
        async move { events.iter().find(|e| e.kind == "hang").map(|e| e.at_ms) }
    })
    .await;
    // Once the hung call is older than the next request's whole deadline...
    poll_until(
        "the hung call ages",
        Duration::from_secs(10),
        || async move {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            (now >= started + 400).then_some(())
        },
    )
    .await;
    // ...a key creation with a 300 ms deadline is refused at once, and never reaches the HSM.
    let mut r = tonic::Request::new(pb::CreateKeyRequest {
        key: "t/late".into(),
        key_type: pb::KeyType::Aes256.into(),
        ..Default::default()
    });
    r.set_timeout(Duration::from_millis(300));
    assert_code(
        c.mgmt.create_key(r).await,
        Code::ResourceExhausted,
        "create behind a hung HSM",
    );
    assert_eq!(f.count("trace", Some("C_GenerateKey")), 0, "never started");
    assert_code(
        c.mgmt
            .get_key(pb::GetKeyRequest {
                key: "t/late".into(),
            })
            .await,
        Code::NotFound,
        "not created",
    );
    assert_code(
        hung.await.expect("join"),
        Code::DeadlineExceeded,
        "the hung wrap",
    );
    // Nothing half-made is left behind: the same name can be created once the HSM answers.
    f.clear().expect("rules");
    until_serving(&mut c, key).await;
    create(
        &mut c,
        "t/late",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    b.stop().await;
}

#[tokio::test]
async fn a_key_swapped_while_the_device_was_away_is_never_used_after_reinitialisation() {
    crate::require_aes!();
    let env = fault_env(2);
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let a = create(
        &mut c,
        "t/a",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    create(
        &mut c,
        "t/b",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let kc = create(
        &mut c,
        "t/c",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let kd = create(
        &mut c,
        "t/d",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let ke = create(
        &mut c,
        "t/e",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let dek = random_dek(32);
    let wa = wrap(&mut c, "t/a", &dek, b"").await.expect("wrap a");
    let wc = wrap(&mut c, "t/c", &dek, b"").await.expect("wrap c");
    let wd = wrap(&mut c, "t/d", &dek, b"").await.expect("wrap d");
    let we = wrap(&mut c, "t/e", &dek, b"").await.expect("wrap e");
    let f = env.faults();
    remove_the_device(&b, f, &mut c, "t/a").await;
    // Meanwhile someone replaces t/a's KEK with another key: same CKA_ID, same template.
    env.probe(&["tamper", &hex::encode(&a.versions[0].id), "replace-good"]);
    // And t/c's with a key that may wrap and decrypt (the template re-initialisation defers).
    env.probe(&["tamper", &hex::encode(&kc.versions[0].id), "replace-bad"]);
    // t/d's object is destroyed, and t/e gets a second object with its id.
    env.probe(&["tamper", &hex::encode(&kd.versions[0].id), "destroy"]);
    env.probe(&["tamper", &hex::encode(&ke.versions[0].id), "duplicate"]);
    f.clear().expect("rules");
    until_serving(&mut c, "t/b").await;
    // A key whose object is gone is judged by the pass over the token (until then a search
    // that finds nothing could be a storage fault, and the key is UNAVAILABLE, not judged).
    let (done, log) = b
        .log_contains("KEK objects re-found after re-initialising the HSM")
        .await;
    assert!(done, "the pass over the token finishes: {log}");
    for (key, w, what) in [
        ("t/d", &wd, "unwrap under a KEK whose object is gone"),
        ("t/e", &we, "unwrap under a KEK whose id two objects share"),
    ] {
        assert_code(
            unwrap(&mut c, key, &w.wrapped_key, b"").await,
            Code::FailedPrecondition,
            what,
        );
        assert_code(
            wrap(&mut c, key, &dek, b"").await,
            Code::FailedPrecondition,
            what,
        );
    }
    // The impostor never wraps or unwraps: its canary gives it away.
    assert_code(
        wrap(&mut c, "t/a", &dek, b"").await,
        Code::FailedPrecondition,
        "wrap under the swapped key",
    );
    assert_code(
        unwrap(&mut c, "t/a", &wa.wrapped_key, b"").await,
        Code::FailedPrecondition,
        "unwrap with the swapped key",
    );
    assert_code(
        unwrap(&mut c, "t/c", &wc.wrapped_key, b"").await,
        Code::FailedPrecondition,
        "unwrap with a KEK of the wrong template",
    );
    assert_code(
        wrap(&mut c, "t/c", &dek, b"").await,
        Code::FailedPrecondition,
        "wrap under a KEK of the wrong template",
    );
    let log = b.stop().await;
    assert!(
        log.contains("KEK integrity check failed after re-initialising the HSM"),
        "{log}"
    );
    assert!(log.contains("wrong template"), "{log}");
    assert!(log.contains("its HSM object is missing"), "{log}");
    assert!(log.contains("2 HSM objects share its CKA_ID"), "{log}");
}

#[tokio::test]
async fn after_a_reinitialisation_keys_are_served_before_the_pass_that_finds_them_all_ends() {
    crate::require_aes!();
    let env = fault_env(2);
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let n = 60;
    for i in 0..n {
        create(
            &mut c,
            &format!("t/k{i}"),
            pb::KeyType::Aes256,
            pb::Algorithm::Unspecified,
        )
        .await;
    }
    let last = format!("t/k{}", n - 1);
    let dek = random_dek(32);
    let before = wrap(&mut c, &last, &dek, b"").await.expect("wrap");
    let f = env.faults();
    remove_the_device(&b, f, &mut c, "t/k0").await;
    // The device comes back slow to read attributes: the pass that re-finds every version's
    // objects (two reads per object, 60+ objects) takes over 3 s, while one key's own lookup
    // and checks take a handful of reads.
    f.set(&[
        Rule::trace("C_GetAttributeValue"),
        Rule::delay("C_GetAttributeValue", 25),
    ])
    .expect("rules");
    until_serving(&mut c, "t/k0").await;
    let u = unwrap(&mut c, &last, &before.wrapped_key, b"")
        .await
        .expect("an old envelope unwraps while the pass runs");
    assert_eq!(u.plaintext, dek);
    let reads = f.count("trace", Some("C_GetAttributeValue"));
    assert!(
        reads < n,
        "served after {reads} attribute reads: the broker waited for the pass over all {n} keys"
    );
    let log = b.log();
    assert!(log.contains("HSM re-initialised: serving again"), "{log}");
    assert!(
        !log.contains("KEK objects re-found after re-initialising the HSM"),
        "served only once the whole token had been searched: {log}"
    );
    poll_until("the pass ends", Duration::from_secs(60), || {
        let log = b.log();
        async move {
            log.contains("KEK objects re-found after re-initialising the HSM")
                .then_some(())
        }
    })
    .await;
    f.clear().expect("rules");
    // Every version is served after the pass, the ones looked up early included.
    for i in [0, n / 2, n - 1] {
        wrap(&mut c, &format!("t/k{i}"), &dek, b"")
            .await
            .expect("wrap after the pass");
    }
    let u = unwrap(&mut c, &last, &before.wrapped_key, b"")
        .await
        .expect("unwrap after the pass");
    assert_eq!(u.plaintext, dek);
    let log = b.stop().await;
    assert!(!log.contains("KEK integrity check failed"), "{log}");
}

#[tokio::test]
async fn a_key_change_that_finishes_after_its_deadline_is_audited_as_such() {
    crate::require_aes!();
    let env = fault_env(2);
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/slow",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    // Key generation takes 1.5 s; the caller gives the rotation 600 ms.
    let f = env.faults();
    f.set(&[Rule::delay("C_GenerateKey", 1500)]).expect("rules");
    let mut r = tonic::Request::new(pb::RotateKeyRequest {
        key: "t/slow".into(),
    });
    r.set_timeout(Duration::from_millis(600));
    r.metadata_mut()
        .insert("x-request-id", "late-rotation-1".parse().expect("ascii"));
    // The broker answers DEADLINE_EXCEEDED at 90% of the caller's timeout (60 ms early here)
    // and writes its audit record first; on a loaded 2-core CI machine the client's own timer
    // (tonic enforces the same grpc-timeout) can still fire first, as "Timeout expired". Either
    // way the broker's answer is checked below, in the trail: RotateKey, DEADLINE_EXCEEDED.
    match c.mgmt.rotate_key(r).await {
        Err(s) if s.code() == Code::DeadlineExceeded => {}
        Err(s) if s.code() == Code::Cancelled && s.message().contains("Timeout expired") => {}
        other => panic!("rotation past its deadline: expected DEADLINE_EXCEEDED, got {other:?}"),
    }
    // The change runs to its end in its own task — completed, or (a later step found the
    // deadline passed) rolled back, never half done — and the trail says which, under the
    // same request id, beside the DEADLINE_EXCEEDED record.
    let log = env.audit_log();
    let records = poll_until("the late event is written", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move {
            let recs: Vec<serde_json::Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .filter(|r: &serde_json::Value| r["request_id"] == "late-rotation-1")
                .collect();
            recs.iter()
                .any(|r| r["op"] == "KeyChangeFinishedLate")
                .then_some(recs)
        }
    })
    .await;
    f.clear().expect("rules");
    assert!(
        records
            .iter()
            .any(|r| r["op"] == "RotateKey" && r["outcome"] == "DEADLINE_EXCEEDED"),
        "{records:?}"
    );
    let late = records
        .iter()
        .find(|r| r["op"] == "KeyChangeFinishedLate")
        .expect("late event");
    assert_eq!(late["key"], "t/slow", "{late}");
    // The key is exactly as the event says.
    let k = c
        .mgmt
        .get_key(pb::GetKeyRequest {
            key: "t/slow".into(),
        })
        .await
        .expect("get")
        .into_inner();
    let rotated = late["outcome"] == "OK";
    assert_eq!(k.current_version, if rotated { 2 } else { 1 }, "{late}");
    assert_eq!(k.versions.len(), if rotated { 2 } else { 1 }, "{late}");
    b.stop().await;
}

/// Issue 19 (the Kryoptic soak): Kryoptic answers a failed RFC 5649 or OAEP integrity check
/// with `CKR_DEVICE_ERROR`, and so does a device fault. A one-off device error while unwrapping
/// a valid envelope must not call it unauthentic (a caller told that may throw its data away):
/// the call runs again on a fresh session and the DEK is served; a tampered envelope fails the
/// same way every time and is still refused as unauthentic. A device error that lasts (every
/// decrypt fails while the session answers) is told apart by the key's canary, which fails
/// too: UNAVAILABLE, and the envelope is served once the device is well again.
#[tokio::test]
async fn a_passing_device_error_on_kryoptic_does_not_make_a_valid_envelope_unauthentic() {
    if skip_unless(
        "a_passing_device_error_on_kryoptic_does_not_make_a_valid_envelope_unauthentic",
        hsm_fixtures::token::TokenKind::Kryoptic,
        "only the Kryoptic profile reads CKR_DEVICE_ERROR on caller data as a failed integrity check",
    ) {
        return;
    }
    let env = fault_env(2);
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/kwp",
        pb::KeyType::Aes256,
        pb::Algorithm::AesKeyWrapPad,
    )
    .await;
    create(
        &mut c,
        "t/rsa",
        pb::KeyType::Rsa2048,
        pb::Algorithm::Unspecified,
    )
    .await;
    let f = env.faults();
    for (key, function) in [("t/kwp", "C_UnwrapKey"), ("t/rsa", "C_Decrypt")] {
        let dek = random_dek(32);
        let w = wrap(&mut c, key, &dek, b"").await.expect("wrap");
        f.set(&[Rule::fail(function, "CKR_DEVICE_ERROR").count(1)])
            .expect("rules");
        let u = unwrap(&mut c, "", &w.wrapped_key, b"")
            .await
            .unwrap_or_else(|e| panic!("{key}: a valid envelope after one device error: {e:?}"));
        assert_eq!(u.plaintext, dek, "{key}");
        assert_eq!(
            f.count("fail", Some(function)),
            1,
            "{key}: the fault was injected"
        );
        f.set(&[Rule::fail(function, "CKR_DEVICE_ERROR")])
            .expect("rules");
        let e = unwrap(&mut c, "", &w.wrapped_key, b"")
            .await
            .expect_err("every decrypt fails");
        assert_eq!(
            e.code(),
            Code::Unavailable,
            "{key}: a valid envelope during a lasting device error is not called unauthentic: {e:?}"
        );
        f.set(&[]).expect("rules");
        let u = poll_until("the device is well again", Duration::from_secs(10), || {
            let mut c = c.clone();
            let w = w.wrapped_key.clone();
            async move { unwrap(&mut c, "", &w, b"").await.ok() }
        })
        .await;
        assert_eq!(u.plaintext, dek, "{key}");
        let mut bad = w.wrapped_key.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x80;
        let e = unwrap(&mut c, "", &bad, b"")
            .await
            .expect_err("a tampered envelope is refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{key}: {e:?}");
    }
    b.stop().await;
}

/// On Kryoptic a tampered RFC 5649 or RSA-OAEP envelope fails with `CKR_DEVICE_ERROR`, like a
/// device fault. In a batch it must fail alone (unauthentic), and the valid envelopes beside it
/// must be served.
#[tokio::test]
async fn on_kryoptic_a_tampered_envelope_fails_alone_in_a_batch() {
    if skip_unless(
        "on_kryoptic_a_tampered_envelope_fails_alone_in_a_batch",
        hsm_fixtures::token::TokenKind::Kryoptic,
        "only the Kryoptic profile reads CKR_DEVICE_ERROR on caller data as a failed integrity check",
    ) {
        return;
    }
    let env = fault_env(2);
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/kwp",
        pb::KeyType::Aes256,
        pb::Algorithm::AesKeyWrapPad,
    )
    .await;
    let mut deks = Vec::new();
    let mut items = Vec::new();
    for _ in 0..3 {
        let dek = random_dek(32);
        let w = wrap(&mut c, "t/kwp", &dek, b"").await.expect("wrap");
        deks.push(dek);
        items.push(pb::UnwrapKeyRequest {
            wrapped: Some(pb::unwrap_key_request::Wrapped::Envelope(w.wrapped_key)),
            ..Default::default()
        });
    }
    let valid = items.clone();
    if let Some(pb::unwrap_key_request::Wrapped::Envelope(e)) = &mut items[1].wrapped {
        let last = e.len() - 1;
        e[last] ^= 0x80;
    }
    let u = c
        .broker
        .batch_unwrap_key(pb::BatchUnwrapKeyRequest {
            items,
            context: None,
        })
        .await
        .expect("batch unwrap")
        .into_inner();
    assert_eq!(u.results.len(), 3);
    for (i, r) in u.results.iter().enumerate() {
        match (&r.result, i) {
            (Some(pb::unwrap_key_result::Result::Ok(x)), 0 | 2) => {
                assert_eq!(x.plaintext, deks[i], "item {i}")
            }
            (Some(pb::unwrap_key_result::Result::Error(e)), 1) => {
                assert_eq!(e.code, Code::InvalidArgument as i32, "{e:?}");
                assert_eq!(e.message, keybroker::error::UNAUTHENTIC_MESSAGE);
            }
            other => panic!("item {i}: {other:?}"),
        }
    }
    // A device failing every unwrap fails the key's canary too: no item is called unauthentic.
    let f = env.faults();
    f.set(&[Rule::fail("C_UnwrapKey", "CKR_DEVICE_ERROR")])
        .expect("rules");
    let r = c
        .broker
        .batch_unwrap_key(pb::BatchUnwrapKeyRequest {
            items: valid,
            context: None,
        })
        .await;
    match r {
        Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        Ok(u) => {
            for (i, r) in u.into_inner().results.iter().enumerate() {
                match &r.result {
                    Some(pb::unwrap_key_result::Result::Error(e)) => {
                        assert_eq!(e.code, Code::Unavailable as i32, "item {i}: {e:?}")
                    }
                    other => panic!("item {i} during a lasting device error: {other:?}"),
                }
            }
        }
    }
    f.set(&[]).expect("rules");
    b.stop().await;
}
