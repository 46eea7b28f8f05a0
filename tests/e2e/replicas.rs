//! Several replicas: two `keybroker` processes sharing one PostgreSQL database (a private server
//! started per test, Debian's package) and one HSM token. What is done through one is in force
//! through the other from the moment it returns — no waiting, no polling — except a HYOK
//! reconnect, which each replica applies once it has verified the state's MAC in its HSM.

use std::time::Duration;

use hsm_fixtures::postgres::PgServer;
use keybroker::client::Clients;
use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::common::*;

/// A PostgreSQL server, an env whose config uses it, and a second config for replica B (same
/// token, same database, its own audit log and port; `b_store` adds `[store]` lines).
fn replicated(mut opts: Options, b_store: &str) -> (PgServer, Env, std::path::PathBuf) {
    let pg = PgServer::start().expect("start PostgreSQL (tests/run installs it)");
    pg.create_database("kb").expect("create database");
    opts.store = Some(format!(
        "url = \"{}\"\npassword_file = \"{}\"",
        pg.url("kb"),
        pg.password_file.display()
    ));
    let env = Env::with(opts);
    let text = std::fs::read_to_string(&env.config).expect("read config");
    let b = text
        .replace("path = \"audit.log\"", "path = \"audit-b.log\"")
        .replace("[store]\n", &format!("[store]\n{b_store}\n"));
    assert_ne!(b, text, "replica B's config differs");
    let b_config = env.dir.path().join("keybroker-b.toml");
    std::fs::write(&b_config, b).expect("write replica B's config");
    (pg, env, b_config)
}

async fn start_both(env: &Env, b_config: &std::path::Path) -> (Broker, Broker) {
    // One after the other: SoftHSM2 2.6.1 can fail C_GetTokenInfo (CKR_GENERAL_ERROR) in a
    // process that enumerates slots while another process writes the same token's files.
    // (Concurrent first opens of the database are tested in the store's unit tests.)
    let a = env
        .try_start()
        .await
        .unwrap_or_else(|e| panic!("replica A: {e}"));
    let b = env
        .try_start_config(b_config, &[])
        .await
        .unwrap_or_else(|e| panic!("replica B: {e}"));
    (a, b)
}

async fn rotate(c: &mut Clients, key: &str) -> Result<pb::Key, tonic::Status> {
    c.mgmt
        .rotate_key(pb::RotateKeyRequest { key: key.into() })
        .await
        .map(|r| r.into_inner())
}

async fn versions(c: &mut Clients, key: &str) -> Vec<u32> {
    c.mgmt
        .list_key_versions(pb::ListKeyVersionsRequest { key: key.into() })
        .await
        .expect("list versions")
        .into_inner()
        .versions
        .iter()
        .map(|v| v.version)
        .collect()
}

#[tokio::test]
async fn a_key_created_or_rotated_through_one_replica_is_used_through_the_other_at_once() {
    crate::require_aes!();
    let (_pg, env, b_config) = replicated(Options::default(), "");
    let (a, b) = start_both(&env, &b_config).await;
    let mut ca = a.clients_as(&env.pki.client).await;
    let mut cb = b.clients_as(&env.pki.client).await;

    create(
        &mut ca,
        "acme/orders",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let dek = random_dek(32);
    let w1 = wrap(&mut cb, "acme/orders", &dek, b"order-1")
        .await
        .expect("B wraps under a key created through A, at once");
    assert_eq!(w1.key_version, 1);
    let u = unwrap(&mut ca, "", &w1.wrapped_key, b"order-1")
        .await
        .expect("A unwraps B's envelope");
    assert_eq!(u.plaintext, dek);

    // Rotate through A, then immediately wrap through B: the new version.
    let k = rotate(&mut ca, "acme/orders").await.expect("rotate");
    assert_eq!(k.current_version, 2);
    let w2 = wrap(&mut cb, "acme/orders", &dek, b"order-2")
        .await
        .expect("wrap");
    assert_eq!(w2.key_version, 2, "B wraps under the version A just made");
    for (env_bytes, aad) in [(&w1.wrapped_key, b"order-1"), (&w2.wrapped_key, b"order-2")] {
        let u = unwrap(&mut cb, "acme/orders", env_bytes, aad)
            .await
            .expect("B unwraps both versions");
        assert_eq!(u.plaintext, dek);
    }
    let got = cb
        .mgmt
        .get_key(pb::GetKeyRequest {
            key: "acme/orders".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!((got.current_version, got.versions.len()), (2, 2));

    // An RSA key pair made through B serves through A (both objects found in the token).
    create(
        &mut cb,
        "acme/rsa",
        pb::KeyType::Rsa2048,
        pb::Algorithm::Unspecified,
    )
    .await;
    let w = wrap(&mut ca, "acme/rsa", &dek, b"").await.expect("A wraps");
    assert_eq!(w.key_version, 1);
    let u = unwrap(&mut cb, "", &w.wrapped_key, b"")
        .await
        .expect("B unwraps");
    assert_eq!(u.plaintext, dek);
    let pk_a = ca
        .broker
        .get_public_key(pb::GetPublicKeyRequest {
            key: "acme/rsa".into(),
            key_version: 0,
        })
        .await
        .expect("public key through A")
        .into_inner();
    let pk_b = cb
        .broker
        .get_public_key(pb::GetPublicKeyRequest {
            key: "acme/rsa".into(),
            key_version: 0,
        })
        .await
        .expect("public key through B")
        .into_inner();
    assert_eq!(pk_a.spki_pem, pk_b.spki_pem);

    let log_b = b.stop().await;
    assert!(
        log_b.contains("attached a key version made by another replica"),
        "{log_b}"
    );
    a.stop().await;
}

#[tokio::test]
async fn replicas_share_the_store_but_each_needs_its_own_audit_log() {
    let (_pg, env, b_config) = replicated(Options::default(), "");
    let a = env
        .try_start()
        .await
        .unwrap_or_else(|e| panic!("replica A: {e}"));
    let before = std::fs::read(env.audit_log()).expect("A's audit log");
    // Replica B pointed at A's audit log instead of its own.
    let same_log = env.dir.path().join("keybroker-b-same-log.toml");
    let text = std::fs::read_to_string(&b_config).expect("read B's config");
    std::fs::write(
        &same_log,
        text.replace("path = \"audit-b.log\"", "path = \"audit.log\""),
    )
    .expect("write config");
    let e = env
        .try_start_config(&same_log, &[])
        .await
        .err()
        .expect("a second writer of A's audit log is refused");
    assert!(
        e.contains(&format!(
            "audit log {} is in use by another keybroker (pid {}",
            env.audit_log().display(),
            a.pid()
        )),
        "{e}"
    );
    assert_eq!(
        std::fs::read(env.audit_log()).expect("A's audit log"),
        before,
        "nothing written into A's log"
    );
    // With its own log, B serves beside A: the shared PostgreSQL store is not locked.
    let b = env
        .try_start_config(&b_config, &[])
        .await
        .unwrap_or_else(|e| panic!("replica B with its own audit log: {e}"));
    b.stop().await;
    a.stop().await;
    let (ok, out) = env.verify_audit(&env.audit_log());
    assert!(ok, "{out}");
}

#[tokio::test]
async fn concurrent_rotations_through_both_replicas_make_consecutive_versions() {
    crate::require_aes!();
    let (_pg, env, b_config) = replicated(Options::default(), "");
    let (a, b) = start_both(&env, &b_config).await;
    let mut ca = a.clients_as(&env.pki.client).await;
    let mut cb = b.clients_as(&env.pki.client).await;
    create(
        &mut ca,
        "acme/busy",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    const EACH: usize = 4;
    let mut tasks = Vec::new();
    for i in 0..2 * EACH {
        let mut m = if i % 2 == 0 {
            ca.mgmt.clone()
        } else {
            cb.mgmt.clone()
        };
        tasks.push(tokio::spawn(async move {
            m.rotate_key(pb::RotateKeyRequest {
                key: "acme/busy".into(),
            })
            .await
            .map(|k| k.into_inner().current_version)
        }));
    }
    let mut made = Vec::new();
    for t in tasks {
        made.push(t.await.expect("task").expect("every rotation succeeds"));
    }
    made.sort_unstable();
    let expected: Vec<u32> = (2..=(2 * EACH as u32 + 1)).collect();
    assert_eq!(made, expected, "each rotation made its own next version");
    let all: Vec<u32> = (1..=(2 * EACH as u32 + 1)).collect();
    assert_eq!(versions(&mut ca, "acme/busy").await, all);
    assert_eq!(versions(&mut cb, "acme/busy").await, all);
    let newest = *all.last().expect("versions");
    let dek = random_dek(32);
    for c in [&mut ca, &mut cb] {
        let w = wrap(c, "acme/busy", &dek, b"").await.expect("wrap");
        assert_eq!(w.key_version, newest);
    }
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn delete_recover_and_purge_through_one_replica_are_in_force_on_the_other() {
    crate::require_aes!();
    let (_pg, env, b_config) = replicated(Options::default(), "");
    let (a, b) = start_both(&env, &b_config).await;
    let mut ca = a.clients_as(&env.pki.client).await;
    let mut cb = b.clients_as(&env.pki.client).await;
    create(
        &mut ca,
        "acme/gone",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let dek = random_dek(32);
    let old = wrap(&mut cb, "acme/gone", &dek, b"").await.expect("wrap");

    ca.mgmt
        .delete_key(pb::DeleteKeyRequest {
            key: "acme/gone".into(),
        })
        .await
        .expect("delete through A");
    let e = wrap(&mut cb, "acme/gone", &dek, b"")
        .await
        .expect_err("B refuses a key deleted through A");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = unwrap(&mut cb, "", &old.wrapped_key, b"")
        .await
        .expect_err("unwrap refused too");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    cb.mgmt
        .recover_key(pb::RecoverKeyRequest {
            key: "acme/gone".into(),
        })
        .await
        .expect("recover through B");
    let u = unwrap(&mut ca, "", &old.wrapped_key, b"")
        .await
        .expect("A serves the key B recovered");
    assert_eq!(u.plaintext, dek);

    cb.mgmt
        .delete_key(pb::DeleteKeyRequest {
            key: "acme/gone".into(),
        })
        .await
        .expect("delete through B");
    ca.mgmt
        .purge_key(pb::PurgeKeyRequest {
            key: "acme/gone".into(),
        })
        .await
        .expect("purge through A");
    let e = wrap(&mut cb, "acme/gone", &dek, b"")
        .await
        .expect_err("purged");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_unauthentic(
        unwrap(&mut cb, "", &old.wrapped_key, b"").await,
        "an envelope of a key purged through A, unwrapped through B",
    );

    // The name is free again on both; the new key is a different key.
    create(
        &mut cb,
        "acme/gone",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let w = wrap(&mut ca, "acme/gone", &dek, b"").await.expect("wrap");
    assert_eq!(w.key_version, 1);
    assert_unauthentic(
        unwrap(&mut ca, "", &old.wrapped_key, b"").await,
        "the old key's envelope under the new key of the same name",
    );
    b.stop().await;
    a.stop().await;

    // check-config reaches the database and reports its schema without changing it.
    let report = env.check_config().expect("check-config");
    assert_eq!(report["store"]["kind"], "postgres");
    assert_eq!(report["store"]["schema_version"], 4);
    assert_eq!(report["store"]["schema"], "up to date");
}

#[tokio::test]
async fn the_hyok_kill_switch_thrown_through_one_replica_cuts_off_the_other() {
    crate::require_aes!();
    const PROVIDER: &str = "spiffe://provider.test/kms-proxy";
    const ADMIN: &str = "spiffe://customer.test/admin";
    let policy = format!(
        r#"
[[binding]]
identity = "{ADMIN}"
roles = ["administrator", "crypto-user"]
scope = "all"
[[binding]]
identity = "{PROVIDER}"
role = "service-encryption-user"
scope = "tenant:acme"
[hyok]
service_identities = ["spiffe://provider.test/*"]
default_accepted_reasons = ["CUSTOMER_INITIATED_ACCESS"]
"#
    );
    let (_pg, env, b_config) = replicated(
        Options {
            policy: Some(policy),
            ..Default::default()
        },
        "",
    );
    let admin = env
        .pki
        .ca
        .issue_spiffe_client("admin", ADMIN)
        .expect("cert");
    let provider = env
        .pki
        .ca
        .issue_spiffe_client("provider", PROVIDER)
        .expect("cert");
    let (a, b) = start_both(&env, &b_config).await;
    let mut admin_a = a.clients_as(&admin).await;
    let mut admin_b = b.clients_as(&admin).await;
    let mut provider_b = b.clients_as(&provider).await;
    let provider_a = a.clients_as(&provider).await;
    create(
        &mut admin_a,
        "acme/db",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let justified = |key: &str| pb::WrapKeyRequest {
        key: key.into(),
        plaintext: vec![7; 32],
        aad: vec![],
        context: Some(pb::RequestContext {
            justification: Some(pb::AccessJustification {
                reason: pb::JustificationReason::CustomerInitiatedAccess.into(),
                detail: String::new(),
            }),
            ..Default::default()
        }),
    };
    provider_b
        .broker
        .wrap_key(justified("acme/db"))
        .await
        .expect("connected: the provider wraps through B");

    admin_a
        .hyok
        .disconnect(pb::HyokSwitchRequest {
            reason: "incident 7".into(),
        })
        .await
        .expect("disconnect through A");
    let e = provider_b
        .broker
        .wrap_key(justified("acme/db"))
        .await
        .expect_err("cut off on B the moment A's Disconnect returned");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        e.message(),
        "the key owner has disconnected HYOK service access"
    );
    let state = admin_b
        .hyok
        .get_state(pb::GetHyokStateRequest::default())
        .await
        .expect("state through B")
        .into_inner();
    assert!(!state.connected);
    assert_eq!(state.reason, "incident 7");

    admin_b
        .hyok
        .reconnect(pb::HyokSwitchRequest {
            reason: "resolved".into(),
        })
        .await
        .expect("reconnect through B");
    // A reconnect reaches A once A has verified the new state's MAC in its HSM (a disconnect
    // needs no proof and is at once): eventually, not the moment B's Reconnect returns.
    poll_until(
        "reconnected through B: the provider wraps through A",
        Duration::from_secs(10),
        || {
            let mut p = provider_a.clone();
            let req = justified("acme/db");
            async move { p.broker.wrap_key(req).await.ok() }
        },
    )
    .await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn an_envelope_from_a_version_a_stale_replica_has_not_seen_still_unwraps() {
    crate::require_aes!();
    // B may serve a cache up to an hour old, yet an envelope naming a version it does not know
    // makes it look before calling the envelope unauthentic.
    let (_pg, env, b_config) = replicated(Options::default(), "max_staleness_ms = 3600000");
    let (a, b) = start_both(&env, &b_config).await;
    let mut ca = a.clients_as(&env.pki.client).await;
    let mut cb = b.clients_as(&env.pki.client).await;
    create(
        &mut ca,
        "acme/late",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    rotate(&mut ca, "acme/late").await.expect("rotate");
    let dek = random_dek(32);
    let w = wrap(&mut ca, "acme/late", &dek, b"x").await.expect("wrap");
    assert_eq!(w.key_version, 2);
    let u = unwrap(&mut cb, "", &w.wrapped_key, b"x")
        .await
        .expect("B finds the version it had not seen");
    assert_eq!((u.plaintext, u.key_version), (dek, 2));
    // A version nobody made is still the one unauthentic error.
    let mut forged = w.wrapped_key.clone();
    forged[2] ^= 1;
    assert_unauthentic(unwrap(&mut cb, "", &forged, b"x").await, "unknown version");
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn the_store_connection_is_tls_verified_against_the_configured_ca() {
    crate::require_aes!();
    let certs = tempfile::tempdir().expect("tempdir");
    let pki = hsm_fixtures::pki::TestPki::generate(certs.path()).expect("PKI");
    let other = hsm_fixtures::pki::TestPki::generate(&certs.path().join("other")).expect("PKI");
    let pg = PgServer::start_tls(&pki.server.cert_path, &pki.server.key_path)
        .expect("start PostgreSQL with TLS");
    pg.create_database("kb").expect("create database");
    let store = |ca: Option<&std::path::Path>| {
        let mut s = format!(
            "url = \"{}\"\npassword_file = \"{}\"",
            pg.url("kb"),
            pg.password_file.display()
        );
        if let Some(ca) = ca {
            s.push_str(&format!("\nca_file = \"{}\"", ca.display()));
        }
        s
    };
    let env = Env::with(Options {
        store: Some(store(Some(&pki.ca.cert_path))),
        ..Default::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "acme/tls",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    wrap(&mut c, "acme/tls", &random_dek(32), b"")
        .await
        .expect("wrap");
    // Every connection the broker holds is encrypted (the server admits TCP over TLS only).
    let plain = pg
        .psql(
            "kb",
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'keybroker' AND NOT s.ssl",
        )
        .expect("psql");
    let encrypted = pg
        .psql(
            "kb",
            "SELECT count(*) > 0 FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'keybroker' AND s.ssl",
        )
        .expect("psql");
    assert_eq!((plain.as_str(), encrypted.as_str()), ("0", "t"));
    b.stop().await;
    let report = env.check_config().expect("check-config");
    assert_eq!(report["store"]["tls"], true);

    // A server certificate from another CA: refused. No CA at all: plaintext, which this server
    // refuses.
    for (ca, why) in [
        (
            Some(other.ca.cert_path.as_path()),
            "invalid peer certificate",
        ),
        (None, "no pg_hba.conf entry"),
    ] {
        let text = std::fs::read_to_string(&env.config).expect("config");
        let start = text.find("[store]\n").expect("store") + "[store]\n".len();
        let end = text[start..].find("\n[").expect("next section") + start;
        std::fs::write(
            &env.config,
            format!("{}{}{}", &text[..start], store(ca), &text[end..]),
        )
        .expect("write config");
        let err = match env.try_start().await {
            Ok(b) => {
                b.stop().await;
                panic!("started with CA {ca:?}");
            }
            Err(e) => e,
        };
        assert!(err.contains(why), "{why}: {err}");
    }
}

/// BackupKey through one replica, purge, RestoreKey through the other: the restored key (all
/// its versions, recorded in PostgreSQL in one transaction) is served through the first at once.
#[tokio::test]
async fn a_key_restored_through_one_replica_is_served_by_the_other_at_once() {
    crate::require_aes!();
    let (_pg, env, b_config) = replicated(
        Options {
            lifecycle_extra: "backup = true".into(),
            ..Default::default()
        },
        "",
    );
    crate::backup::domain_init(&env).expect("domain init");
    let (a, b) = start_both(&env, &b_config).await;
    let mut ca = a.clients_as(&env.pki.client).await;
    let mut cb = b.clients_as(&env.pki.client).await;
    create(
        &mut ca,
        "acme/kept",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    rotate(&mut ca, "acme/kept").await.expect("rotate");
    let dek = random_dek(32);
    let old = wrap(&mut ca, "acme/kept", &dek, b"").await.expect("wrap");
    let blob = ca
        .mgmt
        .backup_key(pb::BackupKeyRequest {
            key: "acme/kept".into(),
        })
        .await
        .expect("backup through A")
        .into_inner()
        .backup;
    ca.mgmt
        .delete_key(pb::DeleteKeyRequest {
            key: "acme/kept".into(),
        })
        .await
        .expect("delete");
    ca.mgmt
        .purge_key(pb::PurgeKeyRequest {
            key: "acme/kept".into(),
        })
        .await
        .expect("purge");
    let k = cb
        .mgmt
        .restore_key(pb::RestoreKeyRequest {
            backup: blob.clone(),
        })
        .await
        .expect("restore through B")
        .into_inner();
    assert_eq!(k.current_version, 2);
    assert_eq!(versions(&mut ca, "acme/kept").await, vec![1, 2]);
    let u = unwrap(&mut ca, "", &old.wrapped_key, b"")
        .await
        .expect("A serves the key B restored");
    assert_eq!(u.plaintext, dek);
    let e = ca
        .mgmt
        .restore_key(pb::RestoreKeyRequest { backup: blob })
        .await
        .expect_err("restored already");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    b.stop().await;
    a.stop().await;
}
