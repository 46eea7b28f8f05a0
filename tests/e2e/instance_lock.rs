//! One SQLite store and one audit log belong to one broker process. A second `serve` naming
//! either file (the same config on another port, or a config that shares only one of them)
//! refuses to start before it opens the HSM, the store or the audit log, and names the process
//! that holds it; the first broker's audit sequence stays intact. Readers (`audit verify`) need
//! no lock and read the live log. See docs/src/hardening.md.

use keybroker_proto::v1 as pb;

use crate::common::*;

/// An env whose audit log changes only when a request is made (no timer checkpoint within a
/// test), so "nothing was written" can be checked byte for byte.
fn quiet_env() -> Env {
    Env::with(Options {
        audit_extra: "checkpoint_interval_ms = 3600000".into(),
        ..Default::default()
    })
}

fn records(env: &Env) -> Vec<serde_json::Value> {
    std::fs::read_to_string(env.audit_log())
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}

/// Sequence numbers 1..=n with no gap or repeat, and exactly `opened` start-up records.
#[track_caller]
fn assert_one_sequence(env: &Env, opened: usize) {
    let recs = records(env);
    let seqs: Vec<u64> = recs
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect();
    let expected: Vec<u64> = (1..=recs.len() as u64).collect();
    assert_eq!(seqs, expected, "one unbroken sequence");
    let starts = recs.iter().filter(|r| r["op"] == "AuditLogOpened").count();
    assert_eq!(starts, opened, "start-up records: {recs:#?}");
}

/// A copy of the env's config with `edit` applied, as `name` beside it.
fn config_variant(
    env: &Env,
    name: &str,
    edit: impl FnOnce(String) -> String,
) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&env.config).expect("read config");
    let changed = edit(text.clone());
    assert_ne!(changed, text, "the variant differs");
    let p = env.dir.path().join(name);
    std::fs::write(&p, changed).expect("write config");
    p
}

#[tokio::test]
async fn a_second_broker_with_the_same_config_refuses_to_start_and_the_first_ones_log_stays_one_sequence()
 {
    crate::require_aes!();
    let env = quiet_env();
    let a = env.start().await;
    let mut c = a.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let w = wrap(&mut c, "t/k", &[7; 32], b"").await.expect("wrap");
    let before = std::fs::read(env.audit_log()).expect("audit log");

    // The same config: port 0, so it would get a port of its own and serve beside A.
    let e = match env.try_start().await {
        Ok(b) => {
            drop(b);
            panic!("a second broker started on the same SQLite store and audit log");
        }
        Err(e) => e,
    };
    assert_eq!(
        std::fs::read(env.audit_log()).expect("audit log"),
        before,
        "the refused broker wrote nothing into the live audit log"
    );
    let store = env.dir.path().join("keybroker.db");
    assert!(
        e.contains(&format!(
            "store {} is in use by another keybroker (pid {}",
            store.display(),
            a.pid()
        )),
        "names the store and the process holding it: {e}"
    );

    // A serves on, and its trail is one sequence that verifies, live (readers take no lock)
    // and after a clean stop.
    unwrap(&mut c, "", &w.wrapped_key, b"")
        .await
        .expect("the first broker still serves");
    let (ok, out) = env.verify_audit(&env.audit_log());
    assert!(ok, "the live log verifies: {out}");
    drop(c);
    a.stop().await;
    let (ok, out) = env.verify_audit(&env.audit_log());
    assert!(ok, "the log verifies after the stop: {out}");
    assert_one_sequence(&env, 1);
}

#[tokio::test]
async fn a_second_broker_that_could_not_listen_writes_nothing_into_the_live_audit_log() {
    crate::require_aes!();
    let env = quiet_env();
    let a = env.start().await;
    let mut c = a.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let before = std::fs::read(env.audit_log()).expect("audit log");
    // The same files and A's own address: this one could never listen.
    let busy = config_variant(&env, "keybroker-busy-port.toml", |t| {
        t.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", a.addr),
        )
    });
    let e = env
        .try_start_config(&busy, &[])
        .await
        .err()
        .expect("it cannot start");
    assert_eq!(
        std::fs::read(env.audit_log()).expect("audit log"),
        before,
        "nothing written into the live audit log before failing ({e})"
    );
    assert!(
        e.contains("is in use by another keybroker") && !e.contains("cannot listen"),
        "refused at the lock, before the store, the audit log or the listener: {e}"
    );
    drop(c);

    // The lock dies with its process: after kill -9, a broker starts on the same files at once.
    a.kill9().await;
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    wrap(&mut c, "t/k", &[1; 32], b"")
        .await
        .expect("the restarted broker serves");
    drop(c);
    b.stop().await;
    let (ok, out) = env.verify_audit(&env.audit_log());
    assert!(ok, "{out}");
    assert_one_sequence(&env, 2);
}

#[tokio::test]
async fn a_broker_with_its_own_store_but_the_same_audit_log_is_refused_naming_the_log() {
    let env = quiet_env();
    let a = env.start().await;
    let before = std::fs::read(env.audit_log()).expect("audit log");
    let other_store = config_variant(&env, "keybroker-own-store.toml", |t| {
        t.replace("path = \"keybroker.db\"", "path = \"other.db\"")
    });
    let e = env
        .try_start_config(&other_store, &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(
        std::fs::read(env.audit_log()).expect("audit log"),
        before,
        "nothing written into the live audit log ({e})"
    );
    assert!(
        e.contains(&format!(
            "audit log {} is in use by another keybroker (pid {}",
            env.audit_log().display(),
            a.pid()
        )),
        "{e}"
    );
    assert!(
        !env.dir.path().join("other.db").exists(),
        "the refused broker did not even create its own store"
    );
    a.stop().await;
    assert_one_sequence(&env, 1);
}
