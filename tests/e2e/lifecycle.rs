//! The Managed-HSM key lifecycle: attributes, versions, soft delete, purge, purge protection,
//! BYOK, rotation policy, usage telemetry, crash safety.

use std::time::Duration;

use keybroker::client::Clients;
use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::common::*;

fn attrs() -> pb::KeyAttributes {
    pb::KeyAttributes::default()
}

async fn create_with(
    c: &mut Clients,
    name: &str,
    a: pb::KeyAttributes,
) -> Result<pb::Key, tonic::Status> {
    c.mgmt
        .create_key(pb::CreateKeyRequest {
            key: name.into(),
            key_type: pb::KeyType::Aes256.into(),
            algorithm: 0,
            attributes: Some(a),
            external: None,
            double: None,
        })
        .await
        .map(|r| r.into_inner())
}

async fn update(
    c: &mut Clients,
    name: &str,
    a: pb::KeyAttributes,
    set_times: bool,
) -> Result<pb::Key, tonic::Status> {
    c.mgmt
        .update_key(pb::UpdateKeyRequest {
            key: name.into(),
            attributes: Some(a),
            set_times,
        })
        .await
        .map(|r| r.into_inner())
}

fn precondition<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) -> String {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
    e.message().to_string()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

async fn poll<F, Fut>(mut f: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not reached within 30 s");
}

#[tokio::test]
async fn attributes_decide_what_a_key_may_do() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let mut a = attrs();
    a.tags = Some(pb::KeyTags {
        tags: [("team".to_string(), "payments".to_string())].into(),
    });
    let k = create_with(&mut c, "t/k", a).await.expect("create");
    let at = k.attributes.expect("attributes");
    assert_eq!(at.enabled, Some(true));
    assert_eq!(at.tags.expect("tags").tags["team"], "payments");
    assert_eq!(
        at.operations.expect("ops").operations.len(),
        4,
        "every operation by default"
    );
    let w = wrap(&mut c, "t/k", &[1; 32], b"").await.expect("wrap");

    // Disabled: wrap and unwrap refused, state DISABLED; enabled again: works.
    let k = update(
        &mut c,
        "t/k",
        pb::KeyAttributes {
            enabled: Some(false),
            ..attrs()
        },
        false,
    )
    .await
    .expect("disable");
    assert_eq!(k.state, pb::KeyState::Disabled as i32);
    assert!(
        precondition(wrap(&mut c, "t/k", &[1; 32], b"").await, "wrap disabled")
            .contains("disabled")
    );
    precondition(
        unwrap(&mut c, "", &w.wrapped_key, b"").await,
        "unwrap disabled",
    );
    update(
        &mut c,
        "t/k",
        pb::KeyAttributes {
            enabled: Some(true),
            ..attrs()
        },
        false,
    )
    .await
    .expect("enable");
    assert_eq!(
        unwrap(&mut c, "", &w.wrapped_key, b"")
            .await
            .expect("unwrap")
            .plaintext,
        vec![1; 32]
    );

    // Not valid yet: everything refused.
    let later = now_ms() + 3_600_000;
    update(
        &mut c,
        "t/k",
        pb::KeyAttributes {
            not_before_ms: later,
            ..attrs()
        },
        true,
    )
    .await
    .expect("nbf");
    assert!(
        precondition(wrap(&mut c, "t/k", &[1; 32], b"").await, "nbf wrap")
            .contains("not valid before")
    );
    precondition(unwrap(&mut c, "", &w.wrapped_key, b"").await, "nbf unwrap");
    // Expired: no new envelopes, but old ones still unwrap (as in Azure).
    let past = now_ms() - 1000;
    update(
        &mut c,
        "t/k",
        pb::KeyAttributes {
            expires_ms: past,
            ..attrs()
        },
        true,
    )
    .await
    .expect("expire");
    assert!(
        precondition(wrap(&mut c, "t/k", &[1; 32], b"").await, "expired wrap").contains("expired")
    );
    precondition(
        c.broker
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: "t/k".into(),
                ..Default::default()
            })
            .await,
        "expired generate",
    );
    assert_eq!(
        unwrap(&mut c, "", &w.wrapped_key, b"")
            .await
            .expect("expired key unwraps")
            .plaintext,
        vec![1; 32]
    );
    update(&mut c, "t/k", attrs(), true)
        .await
        .expect("clear times");

    // Allowed operations.
    let only_unwrap = pb::KeyOperations {
        operations: vec![pb::KeyOperation::Unwrap.into()],
    };
    update(
        &mut c,
        "t/k",
        pb::KeyAttributes {
            operations: Some(only_unwrap),
            ..attrs()
        },
        false,
    )
    .await
    .expect("ops");
    assert!(
        precondition(wrap(&mut c, "t/k", &[1; 32], b"").await, "no wrap op")
            .contains("does not allow wrap")
    );
    assert!(unwrap(&mut c, "", &w.wrapped_key, b"").await.is_ok());
    precondition(
        c.broker
            .rewrap(pb::RewrapRequest {
                envelope: w.wrapped_key.clone(),
                ..Default::default()
            })
            .await,
        "no rewrap op",
    );

    // Limits: 16 tags, a 257-character value, expires before not-before.
    let many: std::collections::HashMap<String, String> =
        (0..16).map(|i| (format!("t{i}"), "v".into())).collect();
    let e = update(
        &mut c,
        "t/k",
        pb::KeyAttributes {
            tags: Some(pb::KeyTags { tags: many }),
            ..attrs()
        },
        false,
    )
    .await
    .expect_err("16 tags");
    assert_eq!(e.code(), Code::InvalidArgument);
    let long = [("k".to_string(), "x".repeat(257))].into();
    let e = update(
        &mut c,
        "t/k",
        pb::KeyAttributes {
            tags: Some(pb::KeyTags { tags: long }),
            ..attrs()
        },
        false,
    )
    .await
    .expect_err("long tag");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = update(
        &mut c,
        "t/k",
        pb::KeyAttributes {
            not_before_ms: later,
            expires_ms: later - 1,
            ..attrs()
        },
        true,
    )
    .await
    .expect_err("expires before not-before");
    assert_eq!(e.code(), Code::InvalidArgument);
    // None of the refused updates changed anything.
    let k = c
        .mgmt
        .get_key(pb::GetKeyRequest { key: "t/k".into() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(k.attributes.expect("a").tags.expect("tags").tags.len(), 1);
    drop(c);
    b.stop().await;
}

#[tokio::test]
async fn min_decryption_version_refuses_old_versions_trim_destroys_them_and_usage_is_counted() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_with(&mut c, "t/k", attrs()).await.expect("create");
    let mut envs = Vec::new();
    for v in 1..=3u32 {
        for _ in 0..v {
            envs.push((
                v,
                wrap(&mut c, "t/k", &[v as u8; 32], b"")
                    .await
                    .expect("wrap")
                    .wrapped_key,
            ));
        }
        c.mgmt
            .rotate_key(pb::RotateKeyRequest { key: "t/k".into() })
            .await
            .expect("rotate");
    }
    unwrap(&mut c, "", &envs[0].1, b"")
        .await
        .expect("unwrap v1");
    // Usage per version: v1 1 wrap + 1 unwrap, v2 2 wraps, v3 3 wraps, v4 nothing.
    let vs = c
        .mgmt
        .list_key_versions(pb::ListKeyVersionsRequest { key: "t/k".into() })
        .await
        .expect("list")
        .into_inner();
    let usage: Vec<(u32, u64, u64)> = vs
        .versions
        .iter()
        .map(|v| (v.version, v.wraps, v.unwraps))
        .collect();
    assert_eq!(usage, [(1, 1, 1), (2, 2, 0), (3, 3, 0), (4, 0, 0)]);
    assert!(vs.versions[0].last_used_ms > 0 && vs.versions[3].last_used_ms == 0);

    // Minimum decryption version 3: v1 and v2 refuse to unwrap, v3 still does.
    let e = update(
        &mut c,
        "t/k",
        pb::KeyAttributes {
            min_decryption_version: 9,
            ..attrs()
        },
        false,
    )
    .await
    .expect_err("too high");
    assert_eq!(e.code(), Code::InvalidArgument);
    update(
        &mut c,
        "t/k",
        pb::KeyAttributes {
            min_decryption_version: 3,
            ..attrs()
        },
        false,
    )
    .await
    .expect("min 3");
    for (v, e) in &envs {
        let r = unwrap(&mut c, "", e, b"").await;
        if *v < 3 {
            assert!(precondition(r, "below min").contains("minimum decryption version"));
        } else {
            assert_eq!(r.expect("v3 unwraps").plaintext, vec![3; 32]);
        }
    }
    // Trim destroys v1 and v2 inside the HSM.
    let t = c
        .mgmt
        .trim_key_versions(pb::TrimKeyVersionsRequest { key: "t/k".into() })
        .await
        .expect("trim")
        .into_inner();
    assert_eq!(t.destroyed_versions, [1, 2]);
    assert_eq!(
        t.key
            .expect("key")
            .versions
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        [3, 4]
    );
    for (v, e) in &envs {
        if *v < 3 {
            assert_unauthentic(unwrap(&mut c, "", e, b"").await, "trimmed version");
        }
    }
    drop(c);
    b.stop().await;
    let objects = env.probe(&["inspect"])["objects"]
        .as_array()
        .expect("objects")
        .len();
    assert_eq!(
        objects,
        2 + 1,
        "versions 3 and 4 plus the audit key remain in the token"
    );
    let audit = std::fs::read_to_string(env.audit_log()).expect("audit");
    assert!(
        audit.contains("\"op\":\"DestructionReceipt\"") && audit.contains("\"reason\":\"trim\""),
        "trim receipt"
    );
}

#[tokio::test]
async fn a_key_has_at_most_100_versions() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_with(&mut c, "t/k", attrs()).await.expect("create");
    for _ in 0..99 {
        c.mgmt
            .rotate_key(pb::RotateKeyRequest { key: "t/k".into() })
            .await
            .expect("rotate");
    }
    let m = precondition(
        c.mgmt
            .rotate_key(pb::RotateKeyRequest { key: "t/k".into() })
            .await,
        "101st version",
    );
    assert!(m.contains("100"), "{m}");
    drop(c);
    b.stop().await;
}

#[tokio::test]
async fn soft_delete_recover_and_purge_which_erases_every_dek_for_good() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let mut a = attrs();
    a.tags = Some(pb::KeyTags {
        tags: [("x".to_string(), "y".to_string())].into(),
    });
    create_with(&mut c, "t/k", a).await.expect("create");
    c.mgmt
        .rotate_key(pb::RotateKeyRequest { key: "t/k".into() })
        .await
        .expect("rotate");
    let w = wrap(&mut c, "t/k", &[7; 32], b"").await.expect("wrap");
    let before = c
        .mgmt
        .get_key(pb::GetKeyRequest { key: "t/k".into() })
        .await
        .expect("get")
        .into_inner();

    let d = c
        .mgmt
        .delete_key(pb::DeleteKeyRequest { key: "t/k".into() })
        .await
        .expect("delete")
        .into_inner();
    let day = 24 * 3600 * 1000;
    assert!(
        (d.scheduled_purge_ms - d.deleted_at_ms - 90 * day).abs() < 1000,
        "default retention 90 days: {d:?}"
    );
    assert_eq!(d.deleted_by, hsm_fixtures::pki::TEST_CLIENT_ID);
    precondition(wrap(&mut c, "t/k", &[7; 32], b"").await, "wrap deleted");
    precondition(
        unwrap(&mut c, "", &w.wrapped_key, b"").await,
        "unwrap deleted",
    );
    precondition(
        c.mgmt
            .get_key(pb::GetKeyRequest { key: "t/k".into() })
            .await,
        "get deleted",
    );
    let list = c
        .mgmt
        .list_keys(pb::ListKeysRequest {
            tenant: "t".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(list.keys.is_empty(), "a deleted key is not listed");
    let del = c
        .mgmt
        .list_deleted_keys(pb::ListDeletedKeysRequest { tenant: "t".into() })
        .await
        .expect("deleted")
        .into_inner();
    assert_eq!(del.keys.len(), 1);
    let e = create_with(&mut c, "t/k", attrs())
        .await
        .expect_err("name reused");
    assert_eq!(e.code(), Code::AlreadyExists);

    // Recover: back exactly as it was.
    let r = c
        .mgmt
        .recover_key(pb::RecoverKeyRequest { key: "t/k".into() })
        .await
        .expect("recover")
        .into_inner();
    assert_eq!(r, before);
    assert_eq!(
        unwrap(&mut c, "", &w.wrapped_key, b"")
            .await
            .expect("unwrap recovered")
            .plaintext,
        vec![7; 32]
    );
    let e = c
        .mgmt
        .purge_key(pb::PurgeKeyRequest { key: "t/k".into() })
        .await
        .expect_err("purge live key");
    assert_eq!(e.code(), Code::NotFound, "only a deleted key can be purged");

    // Purge: crypto erasure.
    c.mgmt
        .delete_key(pb::DeleteKeyRequest { key: "t/k".into() })
        .await
        .expect("delete");
    let rc = c
        .mgmt
        .purge_key(pb::PurgeKeyRequest { key: "t/k".into() })
        .await
        .expect("purge")
        .into_inner();
    assert_eq!(rc.versions, [1, 2]);
    assert_eq!(rc.objects_destroyed, 2);
    assert_eq!(
        rc.object_ids,
        before
            .versions
            .iter()
            .map(|v| hex::encode(&v.id))
            .collect::<Vec<_>>()
    );
    assert_unauthentic(unwrap(&mut c, "", &w.wrapped_key, b"").await, "after purge");
    let e = c
        .mgmt
        .get_deleted_key(pb::GetDeletedKeyRequest { key: "t/k".into() })
        .await
        .expect_err("gone");
    assert_eq!(e.code(), Code::NotFound);
    drop(c);
    b.stop().await;
    // Also after a restart, and the objects are gone from the token.
    let objects = env.probe(&["inspect"]);
    assert!(
        objects["objects"]
            .as_array()
            .expect("objects")
            .iter()
            .all(|o| !o["label"].as_str().unwrap_or("").starts_with("kb:")),
        "{objects}"
    );
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    assert_unauthentic(
        unwrap(&mut c, "", &w.wrapped_key, b"").await,
        "after purge and restart",
    );
    create_with(&mut c, "t/k", attrs())
        .await
        .expect("the name is free after the purge");
    drop(c);
    b.stop().await;
    // The destruction receipt is in the audit trail.
    let audit = std::fs::read_to_string(env.audit_log()).expect("audit");
    let receipt: serde_json::Value = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .find(|r| r["op"] == "DestructionReceipt")
        .expect("receipt");
    assert_eq!(receipt["detail"]["key"], "t/k");
    assert_eq!(receipt["detail"]["reason"], "purge");
    assert_eq!(receipt["detail"]["versions"], serde_json::json!([1, 2]));
    assert_eq!(
        receipt["detail"]["object_ids"][0],
        hex::encode(&before.versions[0].id)
    );
    assert_eq!(receipt["caller"], hsm_fixtures::pki::TEST_CLIENT_ID);
}

#[tokio::test]
async fn purge_protection_refuses_early_purge_for_everyone_and_cannot_be_turned_off() {
    crate::require_aes!();
    let env = Env::with(Options {
        lifecycle_extra: "retention_days = 7".into(),
        ..Default::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let k = create_with(
        &mut c,
        "t/p",
        pb::KeyAttributes {
            purge_protection: Some(true),
            ..attrs()
        },
    )
    .await
    .expect("create");
    assert_eq!(k.attributes.expect("a").purge_protection, Some(true));
    let e = update(
        &mut c,
        "t/p",
        pb::KeyAttributes {
            purge_protection: Some(false),
            ..attrs()
        },
        false,
    )
    .await
    .expect_err("off");
    assert_eq!(e.code(), Code::FailedPrecondition);
    let d = c
        .mgmt
        .delete_key(pb::DeleteKeyRequest { key: "t/p".into() })
        .await
        .expect("delete")
        .into_inner();
    assert!(
        (d.scheduled_purge_ms - d.deleted_at_ms - 7 * 24 * 3600 * 1000).abs() < 1000,
        "retention_days = 7"
    );
    // The test client holds every role, crypto officer included: still refused.
    let m = precondition(
        c.mgmt
            .purge_key(pb::PurgeKeyRequest { key: "t/p".into() })
            .await,
        "early purge",
    );
    assert!(m.contains("purge-protected"), "{m}");
    assert!(
        c.mgmt
            .get_deleted_key(pb::GetDeletedKeyRequest { key: "t/p".into() })
            .await
            .is_ok(),
        "still there"
    );
    // A key without protection can be turned protected later.
    create_with(&mut c, "t/q", attrs()).await.expect("create");
    update(
        &mut c,
        "t/q",
        pb::KeyAttributes {
            purge_protection: Some(true),
            ..attrs()
        },
        false,
    )
    .await
    .expect("on");
    c.mgmt
        .delete_key(pb::DeleteKeyRequest { key: "t/q".into() })
        .await
        .expect("delete");
    precondition(
        c.mgmt
            .purge_key(pb::PurgeKeyRequest { key: "t/q".into() })
            .await,
        "early purge q",
    );
    drop(c);
    b.stop().await;

    // Deployment-wide purge protection covers keys created without it.
    env.edit_config(|t| {
        t.replace(
            "retention_days = 7",
            "retention_days = 7\npurge_protection = true",
        )
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_with(&mut c, "t/r", attrs()).await.expect("create");
    c.mgmt
        .delete_key(pb::DeleteKeyRequest { key: "t/r".into() })
        .await
        .expect("delete");
    precondition(
        c.mgmt
            .purge_key(pb::PurgeKeyRequest { key: "t/r".into() })
            .await,
        "deployment protection",
    );
    drop(c);
    b.stop().await;
}

#[tokio::test]
async fn the_scheduler_purges_keys_whose_date_has_passed_and_rotates_by_policy() {
    crate::require_aes!();
    let env = Env::with(Options {
        lifecycle_extra: "maintenance_interval_ms = 200".into(),
        ..Default::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_with(
        &mut c,
        "t/old",
        pb::KeyAttributes {
            purge_protection: Some(true),
            ..attrs()
        },
    )
    .await
    .expect("create");
    let w = wrap(&mut c, "t/old", &[2; 32], b"").await.expect("wrap");
    c.mgmt
        .delete_key(pb::DeleteKeyRequest {
            key: "t/old".into(),
        })
        .await
        .expect("delete");
    // Automatic rotation every 1.5 s, new versions expiring an hour after creation.
    let k = create_with(
        &mut c,
        "t/rot",
        pb::KeyAttributes {
            rotation_period_ms: 1500,
            version_expiry_ms: 3_600_000,
            ..attrs()
        },
    )
    .await
    .expect("create");
    assert_eq!(k.current_version, 1);
    drop(c);
    b.stop().await;

    // Time passes: the scheduled purge date is now in the past.
    {
        let db = rusqlite::Connection::open(env.dir.path().join("keybroker.db")).expect("db");
        let n = db
            .execute(
                "UPDATE keys SET purge_at_ms = 1 WHERE tenant = 't' AND name = 'old'",
                [],
            )
            .expect("update");
        assert_eq!(n, 1);
    }
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let mut mg = c.mgmt.clone();
    poll(
        || {
            let mut mg = mg.clone();
            async move {
                mg.get_deleted_key(pb::GetDeletedKeyRequest {
                    key: "t/old".into(),
                })
                .await
                .map(drop)
                .map_err(|e| e.code())
                    == Err(Code::NotFound)
            }
        },
        "scheduled purge",
    )
    .await;
    assert_unauthentic(
        unwrap(&mut c, "", &w.wrapped_key, b"").await,
        "scheduled purge erased the DEK",
    );
    poll(
        || {
            let mut mg = mg.clone();
            async move {
                mg.get_key(pb::GetKeyRequest {
                    key: "t/rot".into(),
                })
                .await
                .map(|k| k.into_inner().current_version >= 2)
                .unwrap_or(false)
            }
        },
        "automatic rotation",
    )
    .await;
    let k = mg
        .get_key(pb::GetKeyRequest {
            key: "t/rot".into(),
        })
        .await
        .expect("get")
        .into_inner();
    let v2 = &k.versions[1];
    assert!(
        (v2.expires_ms - v2.created_at_ms - 3_600_000).abs() < 5,
        "rotated versions get the policy's expiry: {v2:?}"
    );
    let w = wrap(&mut c, "t/rot", &[1; 32], b"")
        .await
        .expect("wrap with the rotated version");
    assert!(w.key_version >= 2);
    drop(c);
    b.stop().await;
    let audit = std::fs::read_to_string(env.audit_log()).expect("audit");
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .collect();
    let receipt = records
        .iter()
        .find(|r| r["op"] == "DestructionReceipt")
        .expect("receipt");
    assert_eq!(receipt["caller"], "scheduler");
    // Issue 18, item 9: the scheduler's own changes are in the trail, each announced before it
    // is made (intent) and then with its outcome.
    for (op, key) in [("AutomaticRotation", "t/rot"), ("ScheduledPurge", "t/old")] {
        let of = |outcome: &str| {
            records
                .iter()
                .filter(|r| r["op"] == op && r["key"] == key && r["outcome"] == outcome)
                .count()
        };
        assert!(of("INTENT") >= 1, "{op} {key}: no intent record");
        assert!(of("OK") >= 1, "{op} {key}: no outcome record");
        let first_intent = records
            .iter()
            .position(|r| r["op"] == op && r["key"] == key && r["outcome"] == "INTENT");
        let first_outcome = records
            .iter()
            .position(|r| r["op"] == op && r["key"] == key && r["outcome"] == "OK");
        assert!(first_intent < first_outcome, "{op}: the intent comes first");
        assert!(
            records
                .iter()
                .all(|r| r["op"] != op || r["caller"] == "scheduler")
        );
    }
}

/// Issue 18, item 9: an expired BYOK import key is destroyed by the scheduler, in the trail.
#[tokio::test]
async fn the_scheduler_destroys_expired_import_keys_in_the_audit_trail() {
    crate::require_aes!();
    let env = Env::with(Options {
        lifecycle_extra: "maintenance_interval_ms = 200".into(),
        ..Default::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let ik = c
        .mgmt
        .create_import_key(pb::CreateImportKeyRequest {
            key_type: pb::KeyType::Rsa3072.into(),
            ..Default::default()
        })
        .await
        .expect("import key")
        .into_inner();
    drop(c);
    b.stop().await;
    {
        // Time passes: the import key's day is over.
        let db = rusqlite::Connection::open(env.dir.path().join("keybroker.db")).expect("db");
        let n = db
            .execute(
                "UPDATE settings SET value = ?1 WHERE name = 'byok.import_keys'",
                [format!("{{\"{}\":1}}", ik.import_key_id)],
            )
            .expect("update");
        assert_eq!(n, 1);
    }
    let b = env.start().await;
    let audit = env.audit_log();
    let id = ik.import_key_id.clone();
    poll(
        || {
            let (audit, id) = (audit.clone(), id.clone());
            async move {
                std::fs::read_to_string(&audit).is_ok_and(|t| {
                    t.lines().any(|l| {
                        l.contains("\"ImportKeyDestroyed\"")
                            && l.contains(&id)
                            && l.contains("\"OK\"")
                    })
                })
            }
        },
        "the expired import key's destruction in the trail",
    )
    .await;
    b.stop().await;
}

#[tokio::test]
async fn byok_material_wrapped_by_openssl_imports_and_is_the_key_that_wraps() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let ik = c
        .mgmt
        .create_import_key(pb::CreateImportKeyRequest {
            key_type: pb::KeyType::Rsa3072.into(),
            ..Default::default()
        })
        .await
        .expect("import key")
        .into_inner();
    assert!(ik.spki_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    let (blob, target, _) = byok_blob(env.dir.path(), &ik);

    let k = c
        .mgmt
        .import_key(pb::ImportKeyRequest {
            key: "t/byok".into(),
            import_key_id: ik.import_key_id.clone(),
            wrapped_material: blob.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("import: {e:?}\n{}", b.log()))
        .into_inner();
    assert_eq!(k.versions[0].origin, "imported");
    assert_eq!(k.algorithm, pb::Algorithm::Aes256Gcm as i32);

    // The imported material is the key that wraps: decrypt a broker-made envelope locally with
    // the customer's copy of it (format 1: AAD = header || caller AAD).
    let dek = random_dek(32);
    let w = wrap(&mut c, "t/byok", &dek, b"ctx")
        .await
        .expect("wrap")
        .wrapped_key;
    use aes_gcm::{
        Aes256Gcm, KeyInit,
        aead::{Aead, Payload},
    };
    let header = &w[..31];
    let mut aad = header.to_vec();
    aad.extend_from_slice(b"ctx");
    let cipher = Aes256Gcm::new_from_slice(&target).expect("key");
    let local = cipher
        .decrypt(
            (&w[19..31]).into(),
            Payload {
                msg: &w[31..],
                aad: &aad,
            },
        )
        .expect("the imported key made this envelope");
    assert_eq!(local, dek);
    assert_eq!(
        unwrap(&mut c, "", &w, b"ctx")
            .await
            .expect("unwrap")
            .plaintext,
        dek
    );

    // A tampered blob, an unknown import key, a name collision and a two-step (RSA-AES) blob
    // are refused. Only a blob that reached the HSM uses its import key up.
    let fresh = |c: &mut Clients| {
        let mut mgmt = c.mgmt.clone();
        async move {
            mgmt.create_import_key(pb::CreateImportKeyRequest {
                key_type: pb::KeyType::Rsa3072.into(),
                ..Default::default()
            })
            .await
            .expect("import key")
            .into_inner()
        }
    };
    let import = |c: &mut Clients, key: &str, ik: &pb::ImportKeyInfo, blob: Vec<u8>| {
        let mut mgmt = c.mgmt.clone();
        let (key, id) = (key.to_string(), ik.import_key_id.clone());
        async move {
            mgmt.import_key(pb::ImportKeyRequest {
                key,
                import_key_id: id,
                wrapped_material: blob,
                ..Default::default()
            })
            .await
        }
    };
    let ik2 = fresh(&mut c).await;
    let (blob2, _, _) = byok_blob(env.dir.path(), &ik2);
    let mut bad = blob2.clone();
    bad[17] ^= 1;
    let e = import(&mut c, "t/bad", &ik2, bad)
        .await
        .expect_err("tampered");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = import(&mut c, "t/bad", &ik2, blob2)
        .await
        .expect_err("used up");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = import(
        &mut c,
        "t/bad",
        &pb::ImportKeyInfo {
            import_key_id: "00".repeat(16),
            ..Default::default()
        },
        blob.clone(),
    )
    .await
    .expect_err("unknown import key");
    assert_eq!(e.code(), Code::NotFound);
    let ik3 = fresh(&mut c).await;
    let (blob3, _, _) = byok_blob(env.dir.path(), &ik3);
    let e = import(&mut c, "t/byok", &ik3, blob3.clone())
        .await
        .expect_err("exists");
    assert_eq!(e.code(), Code::AlreadyExists);
    let mut two_step = blob3.clone();
    two_step.extend([0u8; 40]);
    let e = import(&mut c, "t/byok3", &ik3, two_step)
        .await
        .expect_err("two-step");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("two-step"), "{}", e.message());
    import(&mut c, "t/byok3", &ik3, blob3)
        .await
        .expect("the refusals before the HSM left the import key unused");
    drop(c);
    b.stop().await;

    // Inside the token: the imported KEK is sensitive and never extractable again.
    let report = env.probe(&["inspect"]);
    let kek = report["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .find(|o| o["label"] == "kb:t/byok:v1")
        .expect("imported KEK")
        .clone();
    assert_eq!(kek["value"], "sensitive", "{kek}");
    assert_eq!(kek["extractable"], false, "{kek}");
    assert_eq!(kek["wrap"], false, "{kek}");
    // Restart: the imported key passes the integrity checks (as imported) and still works.
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    assert_eq!(
        unwrap(&mut c, "", &w, b"ctx")
            .await
            .expect("unwrap after restart")
            .plaintext,
        dek
    );
    drop(c);
    b.stop().await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature (tests/run enables it)"
)]
async fn a_crash_at_each_failpoint_is_reconciled_at_the_next_start() {
    crate::require_aes!();
    for point in [
        "create.after_pending",
        "create.after_hsm",
        "rotate.after_hsm",
        "destroy.after_intent",
        "destroy.after_hsm",
    ] {
        let env = Env::new();
        // Set-up that the crash must not disturb.
        let b = env.start().await;
        let mut c = b.clients_as(&env.pki.client).await;
        create_with(&mut c, "t/keep", attrs())
            .await
            .expect("create");
        let keep = wrap(&mut c, "t/keep", &[4; 32], b"")
            .await
            .expect("wrap")
            .wrapped_key;
        create_with(&mut c, "t/victim", attrs())
            .await
            .expect("create");
        let victim = wrap(&mut c, "t/victim", &[5; 32], b"")
            .await
            .expect("wrap")
            .wrapped_key;
        if point.starts_with("destroy") {
            c.mgmt
                .delete_key(pb::DeleteKeyRequest {
                    key: "t/victim".into(),
                })
                .await
                .expect("delete");
        }
        drop(c);
        b.stop().await;

        let b = env
            .try_start_with(&[("KEYBROKER_FAILPOINTS", point)])
            .await
            .expect("start with failpoint");
        let mut c = b.clients_as(&env.pki.client).await;
        let r = match point {
            "create.after_pending" | "create.after_hsm" => {
                create_with(&mut c, "t/new", attrs()).await.map(drop)
            }
            "rotate.after_hsm" => c
                .mgmt
                .rotate_key(pb::RotateKeyRequest {
                    key: "t/victim".into(),
                })
                .await
                .map(drop),
            _ => c
                .mgmt
                .purge_key(pb::PurgeKeyRequest {
                    key: "t/victim".into(),
                })
                .await
                .map(drop),
        };
        assert!(
            r.is_err(),
            "{point}: the request was answered although the broker crashed"
        );
        let log = b.wait_exit().await;
        assert!(
            log.contains(&format!("failpoint {point} reached")),
            "{point}: {log}"
        );

        let b = env.start().await;
        let mut c = b.clients_as(&env.pki.client).await;
        // Nothing acknowledged is lost.
        assert_eq!(
            unwrap(&mut c, "", &keep, b"")
                .await
                .expect("keep")
                .plaintext,
            vec![4; 32],
            "{point}"
        );
        match point {
            "create.after_pending" | "create.after_hsm" => {
                // Never acknowledged: rolled back, no orphan object, the name is free.
                let e = c
                    .mgmt
                    .get_key(pb::GetKeyRequest {
                        key: "t/new".into(),
                    })
                    .await
                    .expect_err("rolled back");
                assert_eq!(e.code(), Code::NotFound, "{point}");
                create_with(&mut c, "t/new", attrs())
                    .await
                    .expect("name free");
                assert!(b.log().contains("rolled back"), "{point}: reported");
            }
            "rotate.after_hsm" => {
                let k = c
                    .mgmt
                    .get_key(pb::GetKeyRequest {
                        key: "t/victim".into(),
                    })
                    .await
                    .expect("get")
                    .into_inner();
                assert_eq!(k.current_version, 1, "the unacknowledged version is gone");
                assert_eq!(
                    unwrap(&mut c, "", &victim, b"")
                        .await
                        .expect("v1")
                        .plaintext,
                    vec![5; 32]
                );
                let k = c
                    .mgmt
                    .rotate_key(pb::RotateKeyRequest {
                        key: "t/victim".into(),
                    })
                    .await
                    .expect("rotate")
                    .into_inner();
                assert_eq!(k.current_version, 2);
            }
            _ => {
                // The purge was durable once started: finished at start-up, receipt written.
                assert_unauthentic(unwrap(&mut c, "", &victim, b"").await, point);
                let e = c
                    .mgmt
                    .get_deleted_key(pb::GetDeletedKeyRequest {
                        key: "t/victim".into(),
                    })
                    .await
                    .expect_err("purged");
                assert_eq!(e.code(), Code::NotFound, "{point}");
            }
        }
        drop(c);
        b.stop().await;
        // No orphan HSM object: every kb: object belongs to a key the broker knows.
        let objects = env.probe(&["inspect"]);
        let kb: Vec<String> = objects["objects"]
            .as_array()
            .expect("objects")
            .iter()
            .filter_map(|o| {
                o["label"]
                    .as_str()
                    .filter(|l| l.starts_with("kb:"))
                    .map(str::to_string)
            })
            .collect();
        let expected: &[&str] = match point {
            "create.after_pending" | "create.after_hsm" => {
                &["kb:t/keep:v1", "kb:t/new:v1", "kb:t/victim:v1"]
            }
            "rotate.after_hsm" => &["kb:t/keep:v1", "kb:t/victim:v1", "kb:t/victim:v2"],
            _ => &["kb:t/keep:v1"],
        };
        let mut kb_sorted = kb.clone();
        kb_sorted.sort();
        assert_eq!(
            kb_sorted, expected,
            "{point}: HSM objects after reconciliation"
        );
        if point.starts_with("destroy") {
            let audit = std::fs::read_to_string(env.audit_log()).expect("audit");
            assert!(
                audit.contains("\"op\":\"DestructionReceipt\""),
                "{point}: receipt written after the crash"
            );
        }
    }
}

/// Issue 18, item 10: a key that may rewrap but not unwrap must not let its DEKs be moved to
/// another key that may unwrap them (that would be an unwrap by two steps). Rewrapping within
/// the key stays allowed.
#[tokio::test]
async fn rewrap_to_another_key_needs_the_source_key_to_allow_unwrap() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let no_unwrap = pb::KeyOperations {
        operations: vec![
            pb::KeyOperation::Wrap.into(),
            pb::KeyOperation::Rewrap.into(),
        ],
    };
    create_with(
        &mut c,
        "t/vault",
        pb::KeyAttributes {
            operations: Some(no_unwrap),
            ..attrs()
        },
    )
    .await
    .expect("create t/vault");
    create(
        &mut c,
        "t/open",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let dek = random_dek(32);
    let w = wrap(&mut c, "t/vault", &dek, b"").await.expect("wrap");
    precondition(
        unwrap(&mut c, "", &w.wrapped_key, b"").await,
        "no unwrap op",
    );
    let rewrap_to = |dest: &str| pb::RewrapRequest {
        envelope: w.wrapped_key.clone(),
        destination_key: dest.into(),
        ..Default::default()
    };
    // Within the key: allowed (the DEK stays under t/vault).
    c.broker
        .rewrap(rewrap_to(""))
        .await
        .expect("rewrap within the key");
    // To another key: refused, so the DEK cannot be unwrapped there.
    let why = precondition(
        c.broker.rewrap(rewrap_to("t/open")).await,
        "rewrap out of a key that may not unwrap",
    );
    assert!(why.contains("does not allow unwrap"), "{why}");
    b.stop().await;
}

fn byok_blob(dir: &std::path::Path, ik: &pb::ImportKeyInfo) -> (Vec<u8>, Vec<u8>, &'static str) {
    byok_blob_as(dir, ik, false)
}

/// The customer's side of BYOK, with OpenSSL's command line only: fresh AES-256 key material
/// wrapped for the import key as docs/src/lifecycle.md says (or, `two_step`, as the refused
/// RSA-AES construction). Returns (blob, material, OAEP hash).
fn byok_blob_as(
    dir: &std::path::Path,
    ik: &pb::ImportKeyInfo,
    two_step: bool,
) -> (Vec<u8>, Vec<u8>, &'static str) {
    let md = if ik.oaep == pb::Algorithm::RsaOaepSha1 as i32 {
        "sha1"
    } else {
        "sha256"
    };
    let target = random_dek(32);
    std::fs::write(dir.join("target.bin"), &target).expect("write");
    std::fs::write(dir.join("import.pem"), &ik.spki_pem).expect("write");
    let sh = |cmd: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(dir)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(&format!(
        "openssl pkeyutl -encrypt -pubin -inkey import.pem -in target.bin -out blob.bin \\
         -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:{md} -pkeyopt rsa_mgf1_md:{md}"
    ));
    let blob = std::fs::read(dir.join("blob.bin")).expect("blob");
    assert_eq!(blob.len(), 384);
    if two_step {
        // The CKM_RSA_AES_KEY_WRAP construction instead (which the broker refuses).
        sh("openssl rand 32 > ephemeral.bin");
        sh(&format!(
            "openssl pkeyutl -encrypt -pubin -inkey import.pem -in ephemeral.bin -out part1.bin \\
             -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:{md} -pkeyopt rsa_mgf1_md:{md}"
        ));
        sh(
            "openssl enc -id-aes256-wrap-pad -K $(od -An -tx1 -v ephemeral.bin | tr -d ' \\n') -iv A65959A6 -in target.bin -out part2.bin",
        );
        let mut blob = std::fs::read(dir.join("part1.bin")).expect("part1");
        blob.extend(std::fs::read(dir.join("part2.bin")).expect("part2"));
        return (blob, target, md);
    }
    (blob, target, md)
}

/// Issue 18, item 1: the holder of the user PIN (the provider, in the Managed HSM model) takes
/// a customer's import blob to the token and unwraps it with templates of their own. They must
/// read neither the key material nor anything that opens it; the import key serves one import
/// and is then gone from the token.
#[tokio::test]
async fn the_pin_holder_cannot_read_byok_material_and_import_keys_are_single_use() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let ik = c
        .mgmt
        .create_import_key(pb::CreateImportKeyRequest {
            key_type: pb::KeyType::Rsa3072.into(),
            ..Default::default()
        })
        .await
        .expect("import key")
        .into_inner();
    let (blob, target, md) = byok_blob(env.dir.path(), &ik);
    let attack = env.probe(&["byok-attack", &ik.import_key_id, md, &hex::encode(&blob)]);
    let recovered: Vec<String> = attack["recovered"]
        .as_array()
        .expect("recovered")
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        !recovered.contains(&hex::encode(&target)),
        "the PIN holder read the customer's key material: {attack}"
    );
    assert!(
        recovered.is_empty(),
        "the PIN holder read a key from the customer's blob: {attack}"
    );
    // A customer who sends the two-step construction by mistake is not exposed either: the
    // ephemeral key can only become a key with the forced AES-GCM roles, which unwraps nothing.
    let (two_step, material, _) = byok_blob_as(env.dir.path(), &ik, true);
    let attack = env.probe(&[
        "byok-attack",
        &ik.import_key_id,
        md,
        &hex::encode(&two_step),
    ]);
    assert_eq!(
        attack["recovered"].as_array().map(Vec::len),
        Some(0),
        "the PIN holder read a key from a two-step blob: {attack}"
    );
    assert!(!attack.to_string().contains(&hex::encode(&material)));

    // The broker imports it, once: the import key is then gone from the token.
    c.mgmt
        .import_key(pb::ImportKeyRequest {
            key: "t/byok".into(),
            import_key_id: ik.import_key_id.clone(),
            wrapped_material: blob.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("import: {e:?}\n{}", b.log()));
    let objects = env.probe(&["inspect"]);
    assert!(
        !objects.to_string().contains(&ik.import_key_id),
        "the import key is still on the token after its import: {objects}"
    );
    let e = c
        .mgmt
        .import_key(pb::ImportKeyRequest {
            key: "t/byok-again".into(),
            import_key_id: ik.import_key_id.clone(),
            wrapped_material: blob,
            ..Default::default()
        })
        .await
        .expect_err("a used import key");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("already used"), "{}", e.message());

    // An import key is made for one algorithm: an aes-kwp one imports an aes-kwp key that
    // wraps and unwraps, and refuses to import anything else.
    let kwp = c
        .mgmt
        .create_import_key(pb::CreateImportKeyRequest {
            key_type: pb::KeyType::Rsa3072.into(),
            algorithm: pb::Algorithm::AesKeyWrapPad.into(),
        })
        .await
        .expect("aes-kwp import key")
        .into_inner();
    assert_eq!(kwp.algorithm, pb::Algorithm::AesKeyWrapPad as i32);
    let (blob, _, _) = byok_blob(env.dir.path(), &kwp);
    let e = c
        .mgmt
        .import_key(pb::ImportKeyRequest {
            key: "t/byok-kwp".into(),
            import_key_id: kwp.import_key_id.clone(),
            wrapped_material: blob.clone(),
            algorithm: pb::Algorithm::Aes256Gcm.into(),
            ..Default::default()
        })
        .await
        .expect_err("another algorithm");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let k = c
        .mgmt
        .import_key(pb::ImportKeyRequest {
            key: "t/byok-kwp".into(),
            import_key_id: kwp.import_key_id.clone(),
            wrapped_material: blob,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("aes-kwp import: {e:?}\n{}", b.log()))
        .into_inner();
    assert_eq!(k.algorithm, pb::Algorithm::AesKeyWrapPad as i32);
    let dek = random_dek(32);
    let w = wrap(&mut c, "t/byok-kwp", &dek, b"")
        .await
        .expect("wrap")
        .wrapped_key;
    assert_eq!(
        unwrap(&mut c, "", &w, b"").await.expect("unwrap").plaintext,
        dek
    );
    b.stop().await;
}

/// Issue 18 item 7: an AES-GCM version makes at most `gcm_invocation_limit` invocations (random
/// IVs; NIST SP 800-38D), across restarts, then wraps no more; the key rotates by itself once
/// half is reserved, and what the old version wrapped still unwraps. Before the budget, the
/// 50 wraps below all succeeded under version 1.
#[tokio::test]
async fn an_aes_gcm_version_wraps_at_most_its_invocation_budget_and_the_key_rotates_before() {
    crate::require_aes!();
    let env = Env::with(Options {
        lifecycle_extra: "maintenance_interval_ms = 200\ngcm_invocation_limit = 40\n\
                          gcm_reservation_block = 8"
            .into(),
        ..Default::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_with(&mut c, "t/busy", attrs())
        .await
        .expect("create");
    // Six single wraps reserve one block (8) in the store.
    let first = wrap(&mut c, "t/busy", &[6; 32], b"a").await.expect("wrap");
    for _ in 0..5 {
        wrap(&mut c, "t/busy", &[5; 32], b"").await.expect("wrap");
    }
    let reserved = |env: &Env| -> i64 {
        let db = rusqlite::Connection::open(env.dir.path().join("keybroker.db")).expect("db");
        db.query_row(
            "SELECT v.gcm_reserved FROM key_versions v JOIN keys k ON k.id = v.key_id \
             WHERE k.name = 'busy' AND v.version = 1",
            [],
            |r| r.get(0),
        )
        .expect("reserved")
    };
    assert_eq!(reserved(&env), 8);
    drop(c);
    b.stop().await;
    // A restart forfeits the unspent 2: the budget counts from what was reserved.
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let items: Vec<pb::WrapKeyRequest> = (0..50)
        .map(|i| pb::WrapKeyRequest {
            key: "t/busy".into(),
            plaintext: vec![i as u8; 32],
            ..Default::default()
        })
        .collect();
    let r = c
        .broker
        .batch_wrap_key(pb::BatchWrapKeyRequest {
            items,
            context: None,
        })
        .await
        .expect("batch wrap")
        .into_inner();
    let (mut ok, mut refused) = (0, 0);
    for res in &r.results {
        match &res.result {
            Some(pb::wrap_key_result::Result::Ok(w)) => {
                assert_eq!(w.key_version, 1);
                ok += 1;
            }
            Some(pb::wrap_key_result::Result::Error(e)) => {
                assert_eq!(e.code, Code::FailedPrecondition as i32, "{e:?}");
                assert!(
                    e.message
                        .contains("version 1 of key t/busy has made its 40 AES-GCM invocations"),
                    "{}",
                    e.message
                );
                refused += 1;
            }
            None => panic!("an item without a result"),
        }
    }
    assert_eq!(
        (ok, refused),
        (32, 18),
        "8 reserved before the restart, 32 left"
    );
    assert_eq!(reserved(&env), 40);
    let single = wrap(&mut c, "t/busy", &[1; 32], b"").await;
    let mg = c.mgmt.clone();
    // The maintenance task rotates the key (due since half the budget was reserved).
    poll(
        || {
            let mut mg = mg.clone();
            async move {
                mg.get_key(pb::GetKeyRequest {
                    key: "t/busy".into(),
                })
                .await
                .is_ok_and(|k| k.into_inner().current_version == 2)
            }
        },
        "rotation by the AES-GCM budget",
    )
    .await;
    if let Err(e) = single {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    }
    let w = wrap(&mut c, "t/busy", &[2; 32], b"").await.expect("wrap");
    assert_eq!(w.key_version, 2);
    let back = unwrap(&mut c, "t/busy", &first.wrapped_key, b"a")
        .await
        .expect("version 1 still unwraps");
    assert_eq!(back.plaintext, vec![6; 32]);
    drop(c);
    b.stop().await;
    let audit = std::fs::read_to_string(env.audit_log()).expect("audit");
    assert!(
        audit.lines().any(|l| l.contains("\"AutomaticRotation\"")
            && l.contains("t/busy")
            && l.contains("\"OK\"")),
        "the rotation is in the audit trail"
    );
}
