//! BackupKey / RestoreKey (issue 4, point 7): a key's versions leave the HSM only wrapped under
//! the security domain's trusted keys, come back exactly (DEKs wrapped before the backup unwrap
//! after backup → purge → restore), and a blob that was altered or made in another domain is
//! refused. On whichever token `KEYBROKER_TEST_TOKEN` names (SoftHSM2 or Kryoptic).

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use keybroker::client::Clients;
use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::common::*;

/// An env whose KEKs are created backup-enabled.
fn backup_env() -> Env {
    Env::with(Options {
        lifecycle_extra: "backup = true".into(),
        ..Default::default()
    })
}

/// `keybroker domain init` as the token's security officer (the SO PIN from the environment).
pub(crate) fn domain_init(env: &Env) -> Result<serde_json::Value, String> {
    let out = std::process::Command::new(BROKER)
        .args(["domain", "init", "--config"])
        .arg(&env.config)
        .env("KEYBROKER_SO_PIN", &env.token.so_pin)
        .envs(env.token.env())
        .output()
        .expect("run keybroker domain init");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("domain init prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

async fn create_kind(c: &mut Clients, name: &str, kt: pb::KeyType, alg: pb::Algorithm) {
    c.mgmt
        .create_key(pb::CreateKeyRequest {
            key: name.into(),
            key_type: kt.into(),
            algorithm: alg.into(),
            attributes: None,
            external: None,
            double: None,
        })
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e:?}"));
}

async fn backup(c: &mut Clients, name: &str) -> Result<pb::BackupKeyResponse, tonic::Status> {
    c.mgmt
        .backup_key(pb::BackupKeyRequest { key: name.into() })
        .await
        .map(|r| r.into_inner())
}

async fn restore(c: &mut Clients, blob: &[u8]) -> Result<pb::Key, tonic::Status> {
    c.mgmt
        .restore_key(pb::RestoreKeyRequest {
            backup: blob.to_vec(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn get(c: &mut Clients, name: &str) -> Result<pb::Key, tonic::Status> {
    c.mgmt
        .get_key(pb::GetKeyRequest { key: name.into() })
        .await
        .map(|r| r.into_inner())
}

async fn delete_and_purge(c: &mut Clients, name: &str) {
    c.mgmt
        .delete_key(pb::DeleteKeyRequest { key: name.into() })
        .await
        .expect("delete");
    c.mgmt
        .purge_key(pb::PurgeKeyRequest { key: name.into() })
        .await
        .expect("purge");
}

/// The JSON body of a blob (the format in `broker/src/backup.rs`).
fn body(blob: &[u8]) -> serde_json::Value {
    let n = u32::from_be_bytes(blob[21..25].try_into().expect("4 bytes")) as usize;
    serde_json::from_slice(&blob[25..25 + n]).expect("JSON body")
}

/// Rebuilds a blob with a changed body, keeping the original MAC.
fn with_body(blob: &[u8], f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut b = body(blob);
    f(&mut b);
    let text = serde_json::to_vec(&b).expect("JSON");
    let mut out = blob[..21].to_vec();
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&blob[blob.len() - 32..]);
    out
}

#[tokio::test]
async fn backup_then_purge_then_restore_brings_every_version_back_for_each_key_type() {
    crate::require_aes!();
    let env = backup_env();
    let domain = domain_init(&env).expect("domain init");
    assert_eq!(
        domain["created"],
        serde_json::json!([
            "kb-domain:wrap-aes-gcm",
            "kb-domain:wrap-aes-kwp",
            "kb-domain:wrap-rsa-oaep",
            "kb-domain:wrap-aes-kw",
            "kb-domain:mac"
        ]),
        "{domain}"
    );
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let rsa_alg = if env.token.kind == hsm_fixtures::token::TokenKind::SoftHsm {
        pb::Algorithm::RsaOaepSha1
    } else {
        pb::Algorithm::RsaOaepSha256
    };
    let keys = [
        ("acme/gcm", pb::KeyType::Aes256, pb::Algorithm::Aes256Gcm),
        (
            "acme/kwp",
            pb::KeyType::Aes256,
            pb::Algorithm::AesKeyWrapPad,
        ),
        // RFC 3394 KEKs come back through their own domain wrap key (its unwrap template
        // forces CKM_AES_KEY_WRAP; the KWP role's would force RFC 5649).
        ("acme/kw", pb::KeyType::Aes256, pb::Algorithm::AesKeyWrap),
        ("acme/rsa", pb::KeyType::Rsa3072, rsa_alg),
    ];
    let mut saved = Vec::new();
    for (name, kt, alg) in keys {
        create_kind(&mut c, name, kt, alg).await;
        // Only AES-GCM binds additional authenticated data.
        let (aad1, aad2): (&[u8], &[u8]) = if alg == pb::Algorithm::Aes256Gcm {
            (b"ctx-1", b"ctx-2")
        } else {
            (b"", b"")
        };
        // Two versions, an envelope under each, and attributes that must come back.
        let dek1 = random_dek(32);
        let env1 = wrap(&mut c, name, &dek1, aad1)
            .await
            .expect("wrap v1")
            .wrapped_key;
        c.mgmt
            .rotate_key(pb::RotateKeyRequest { key: name.into() })
            .await
            .expect("rotate");
        let dek2 = random_dek(32);
        let env2 = wrap(&mut c, name, &dek2, aad2)
            .await
            .expect("wrap v2")
            .wrapped_key;
        let mut tags = std::collections::HashMap::new();
        tags.insert("owner".to_string(), "payments".to_string());
        c.mgmt
            .update_key(pb::UpdateKeyRequest {
                key: name.into(),
                attributes: Some(pb::KeyAttributes {
                    tags: Some(pb::KeyTags { tags }),
                    ..Default::default()
                }),
                set_times: false,
            })
            .await
            .expect("update");
        let before = get(&mut c, name).await.expect("get");
        let made = backup(&mut c, name).await.expect("backup");
        assert_eq!(made.versions, 2, "{name}");
        assert_eq!(made.domain_id, domain["domain_id"].as_str().expect("id"));
        // Nothing in the blob is key material in the clear: the DEKs and envelopes aside, the
        // wrapped KEK material differs from every DEK.
        for d in [&dek1, &dek2] {
            assert!(
                !made.backup.windows(d.len()).any(|w| w == d.as_slice()),
                "{name}: a DEK in the blob"
            );
        }
        delete_and_purge(&mut c, name).await;
        assert!(
            unwrap(&mut c, name, &env1, aad1).await.is_err(),
            "{name}: purged, the envelope must not unwrap"
        );
        saved.push((
            name,
            before,
            made.backup,
            [(env1, dek1, aad1), (env2, dek2, aad2)],
        ));
    }
    for (name, before, blob, envelopes) in &saved {
        let k = restore(&mut c, blob).await.expect("restore");
        assert_eq!(k.name, *name);
        assert_eq!(k.current_version, 2);
        let ids = |k: &pb::Key| {
            k.versions
                .iter()
                .map(|v| (v.version, v.id.clone(), v.origin.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&k), ids(before), "{name}: same versions and ids");
        assert_eq!(k.attributes, before.attributes, "{name}: same attributes");
        assert_eq!(k.created_at_ms, before.created_at_ms, "{name}");
        for (e, dek, aad) in envelopes {
            let got = unwrap(&mut c, name, e, aad)
                .await
                .unwrap_or_else(|s| panic!("{name}: unwrap after restore: {s:?}"));
            assert_eq!(&got.plaintext, dek, "{name}");
        }
        // And the restored key works for new envelopes.
        let dek = random_dek(32);
        let e = wrap(&mut c, name, &dek, b"")
            .await
            .expect("wrap")
            .wrapped_key;
        assert_eq!(
            unwrap(&mut c, name, &e, b"")
                .await
                .expect("unwrap")
                .plaintext,
            dek
        );
        // The name is taken again.
        let again = restore(&mut c, blob).await.expect_err("twice");
        assert_eq!(again.code(), Code::AlreadyExists, "{name}: {again:?}");
    }
    drop(c);
    b.stop().await;
    // Restored keys are durable: a restart checks their objects and canaries and serves them.
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    for (name, _, _, envelopes) in &saved {
        for (e, dek, aad) in envelopes {
            assert_eq!(
                &unwrap(&mut c, name, e, aad)
                    .await
                    .expect("unwrap after restart")
                    .plaintext,
                dek
            );
        }
    }
    let log = b.stop().await;
    assert!(!log.contains("quarantined=1"), "{log}");
}

#[tokio::test]
async fn an_altered_or_foreign_backup_is_refused_and_changes_nothing() {
    crate::require_aes!();
    let env = backup_env();
    domain_init(&env).expect("domain init");
    // A second domain can be made only where there is none.
    let twice = domain_init(&env).expect_err("a second domain on the same token");
    assert!(twice.contains("already has a security domain"), "{twice}");
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_kind(
        &mut c,
        "acme/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
    )
    .await;
    let dek = random_dek(32);
    let envelope = wrap(&mut c, "acme/k", &dek, b"")
        .await
        .expect("wrap")
        .wrapped_key;
    let blob = backup(&mut c, "acme/k").await.expect("backup").backup;
    delete_and_purge(&mut c, "acme/k").await;

    let mut flipped_wrapped = body(&blob)["versions"][0]["wrapped"]
        .as_str()
        .expect("wrapped")
        .to_string();
    let first = if flipped_wrapped.starts_with('A') {
        "B"
    } else {
        "A"
    };
    flipped_wrapped.replace_range(0..1, first);
    let mut mac_flipped = blob.clone();
    let last = mac_flipped.len() - 1;
    mac_flipped[last] ^= 1;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a changed attribute",
            with_body(&blob, |b| b["attributes"]["enabled"] = false.into()),
        ),
        (
            "a changed name",
            with_body(&blob, |b| b["key"] = "acme/other".into()),
        ),
        (
            "a changed version number",
            with_body(&blob, |b| b["versions"][0]["number"] = 7.into()),
        ),
        (
            "changed key material",
            with_body(&blob, |b| {
                b["versions"][0]["wrapped"] = flipped_wrapped.clone().into()
            }),
        ),
        ("a changed MAC", mac_flipped),
    ];
    for (what, bad) in cases {
        let e = restore(&mut c, &bad).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(
            e.message().contains("failed authentication"),
            "{what}: {}",
            e.message()
        );
        assert_eq!(
            get(&mut c, "acme/k")
                .await
                .expect_err("nothing restored")
                .code(),
            Code::NotFound,
            "{what}"
        );
    }
    for (what, bad) in [
        ("truncated", blob[..blob.len() - 5].to_vec()),
        (
            "not a backup",
            b"hello, world, this is not a backup blob at all".to_vec(),
        ),
    ] {
        let e = restore(&mut c, &bad).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains("malformed"), "{what}: {}", e.message());
    }

    // Another token with its own domain: recognised as foreign, refused.
    let other = backup_env();
    let other_domain = domain_init(&other).expect("domain init (other)");
    let ob = other.start().await;
    let mut oc = ob.clients_as(&other.pki.client).await;
    let e = restore(&mut oc, &blob).await.expect_err("foreign domain");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("security domain"), "{}", e.message());
    // With the domain id forged to match, the other domain cannot verify it.
    let forged_id = hex::decode(other_domain["domain_id"].as_str().expect("id")).expect("hex");
    let mut forged = blob.clone();
    forged[5..21].copy_from_slice(&forged_id);
    let e = restore(&mut oc, &forged)
        .await
        .expect_err("forged domain id");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("failed authentication"),
        "{}",
        e.message()
    );
    drop(oc);
    ob.stop().await;

    // The untouched blob still restores, and the old envelope unwraps.
    restore(&mut c, &blob).await.expect("restore the good blob");
    assert_eq!(
        unwrap(&mut c, "acme/k", &envelope, b"")
            .await
            .expect("unwrap")
            .plaintext,
        dek
    );
    drop(c);
    b.stop().await;
}

#[tokio::test]
async fn without_a_domain_or_with_keys_made_before_backup_was_on_backup_is_refused() {
    crate::require_aes!();
    // Backup on, but the SO never made a domain.
    let env = backup_env();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_kind(
        &mut c,
        "acme/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
    )
    .await;
    let e = backup(&mut c, "acme/k").await.expect_err("no domain");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("domain init"), "{}", e.message());
    drop(c);
    b.stop().await;

    // A domain, but the key was made while backup was off: its material can never leave.
    let env = Env::new();
    domain_init(&env).expect("domain init");
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_kind(
        &mut c,
        "acme/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
    )
    .await;
    let e = backup(&mut c, "acme/k")
        .await
        .expect_err("not backup-enabled");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("backup was off"), "{}", e.message());
    let e = backup(&mut c, "acme/missing")
        .await
        .expect_err("no such key");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    drop(c);
    b.stop().await;
}

/// A domain without the RFC 3394 role's wrap key (made before `aes-kw` existed, or on a token
/// without `CKM_AES_KEY_WRAP`) keeps serving the other roles; backing up an `aes-kw` key under
/// it is refused, naming the missing key. Made here on a Kryoptic slot that hides
/// `CKM_AES_KEY_WRAP` while the domain is made, and shows it again afterwards.
#[tokio::test]
async fn a_domain_without_the_rfc3394_role_serves_the_others_and_refuses_aes_kw_backups() {
    crate::require_aes!();
    if skip_unless(
        "a_domain_without_the_rfc3394_role_serves_the_others_and_refuses_aes_kw_backups",
        hsm_fixtures::token::TokenKind::Kryoptic,
        "only a Kryoptic slot can hide CKM_AES_KEY_WRAP while the domain is made",
    ) {
        return;
    }
    let env = backup_env();
    env.token
        .set_mechanisms(Some(&["DENY", "CKM_AES_KEY_WRAP"]))
        .expect("rewrite kryoptic.conf");
    let domain = domain_init(&env).expect("domain init");
    assert!(
        !domain["created"]
            .as_array()
            .expect("created")
            .contains(&"kb-domain:wrap-aes-kw".into()),
        "{domain}"
    );
    env.token
        .set_mechanisms(None)
        .expect("rewrite kryoptic.conf");
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_kind(
        &mut c,
        "acme/gcm",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
    )
    .await;
    create_kind(
        &mut c,
        "acme/kw",
        pb::KeyType::Aes256,
        pb::Algorithm::AesKeyWrap,
    )
    .await;
    let made = backup(&mut c, "acme/gcm")
        .await
        .expect("the other roles are served");
    assert_eq!(made.domain_id, domain["domain_id"].as_str().expect("id"));
    let e = backup(&mut c, "acme/kw")
        .await
        .expect_err("no RFC 3394 role in this domain");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("kb-domain:wrap-aes-kw"),
        "{}",
        e.message()
    );
    drop(c);
    b.stop().await;
}

#[tokio::test]
async fn a_pin_holder_cannot_turn_a_backup_into_a_readable_or_misusable_key() {
    crate::require_aes!();
    let env = backup_env();
    domain_init(&env).expect("domain init");
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_kind(
        &mut c,
        "acme/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
    )
    .await;
    let k = get(&mut c, "acme/k").await.expect("get");
    let blob = backup(&mut c, "acme/k").await.expect("backup").backup;
    drop(c);
    b.stop().await;
    let wrapped = B64
        .decode(
            body(&blob)["versions"][0]["wrapped"]
                .as_str()
                .expect("wrapped"),
        )
        .expect("base64");
    let r = env.probe(&[
        "backup-attack",
        &hex::encode(&k.versions[0].id),
        &hex::encode(&wrapped),
    ]);
    eprintln!("backup-attack: {r:#}");
    let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
    for refused in [
        "wrap_under_own_key",
        "unwrap_extractable_not_sensitive",
        "unwrap_wrap_and_decrypt",
        "unwrap_with_ecb_allowed",
        "unwrap_public_object",
        "unwrap_modifiable",
        "unwrap_indestructible",
        "add_wrap_to_the_copy",
        "destroy_domain_key",
    ] {
        assert!(s(refused).starts_with("refused"), "{refused}: {r}");
    }
    // The one template the domain key accepts gives a key exactly like the KEK: sensitive.
    assert_eq!(
        s("unwrap_as_forced"),
        "unwrapped (CKA_VALUE: sensitive)",
        "{r}"
    );
}

#[tokio::test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature (tests/run enables it)"
)]
async fn a_crash_during_a_restore_is_rolled_back_at_the_next_start() {
    crate::require_aes!();
    let env = backup_env();
    domain_init(&env).expect("domain init");
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_kind(
        &mut c,
        "acme/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
    )
    .await;
    c.mgmt
        .rotate_key(pb::RotateKeyRequest {
            key: "acme/k".into(),
        })
        .await
        .expect("rotate");
    let dek = random_dek(32);
    let envelope = wrap(&mut c, "acme/k", &dek, b"")
        .await
        .expect("wrap")
        .wrapped_key;
    let blob = backup(&mut c, "acme/k").await.expect("backup").backup;
    delete_and_purge(&mut c, "acme/k").await;
    drop(c);
    b.stop().await;

    for point in ["restore.after_pending", "restore.after_hsm"] {
        let b = env
            .try_start_with(&[("KEYBROKER_FAILPOINTS", point)])
            .await
            .expect("start with failpoint");
        let mut c = b.clients_as(&env.pki.client).await;
        assert!(
            restore(&mut c, &blob).await.is_err(),
            "{point}: answered although the broker crashed"
        );
        let log = b.wait_exit().await;
        assert!(log.contains(&format!("failpoint {point} reached")), "{log}");
        // The next start rolls the half-made restore back: no key, no orphan objects.
        let b = env.start().await;
        let mut c = b.clients_as(&env.pki.client).await;
        assert_eq!(
            get(&mut c, "acme/k").await.expect_err("rolled back").code(),
            Code::NotFound,
            "{point}"
        );
        drop(c);
        let log = b.stop().await;
        assert!(
            !log.contains("orphans=1") && !log.contains("orphans=2"),
            "{point}: {log}"
        );
        let objects = env.probe(&["inspect"]);
        let text = objects.to_string();
        assert!(
            !text.contains("kb:acme/k"),
            "{point}: objects of the unacknowledged restore remain: {text}"
        );
    }
    // Then it restores cleanly.
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    restore(&mut c, &blob).await.expect("restore");
    assert_eq!(
        unwrap(&mut c, "acme/k", &envelope, b"")
            .await
            .expect("unwrap")
            .plaintext,
        dek
    );
    drop(c);
    b.stop().await;
}

/// The role table (docs/src/deployment.md, "Roles"): BackupKey needs the backup permission (crypto-user, backup),
/// RestoreKey the restore permission (crypto-officer) on the name in the blob, within scope.
#[tokio::test]
async fn backup_and_restore_follow_the_role_table_and_scopes() {
    crate::require_aes!();
    let roles = [
        "administrator",
        "crypto-officer",
        "crypto-user",
        "service-encryption-user",
        "auditor",
        "backup",
    ];
    let id = |r: &str| format!("spiffe://keybroker.test/role/{r}");
    let mut policy = String::new();
    for r in roles {
        policy.push_str(&format!(
            "[[binding]]\nidentity = \"{}\"\nrole = \"{r}\"\nscope = \"all\"\n",
            id(r)
        ));
    }
    // A crypto-officer of tenant "other" only.
    policy.push_str(
        "[[binding]]\nidentity = \"spiffe://keybroker.test/officer-other\"\nrole = \"crypto-officer\"\nscope = \"tenant:other\"\n",
    );
    let env = Env::with(Options {
        lifecycle_extra: "backup = true".into(),
        policy: Some(policy),
        ..Default::default()
    });
    domain_init(&env).expect("domain init");
    let b = env.start().await;
    let mut clients = std::collections::HashMap::new();
    for r in roles {
        let cert = env.pki.ca.issue_spiffe_client(r, &id(r)).expect("cert");
        clients.insert(r, b.clients_as(&cert).await);
    }
    let other = env
        .pki
        .ca
        .issue_spiffe_client("officer-other", "spiffe://keybroker.test/officer-other")
        .expect("cert");
    let mut other = b.clients_as(&other).await;
    let user = clients.get_mut("crypto-user").expect("crypto-user");
    create_kind(
        user,
        "acme/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
    )
    .await;
    let mut blob = Vec::new();
    for r in roles {
        let c = clients.get_mut(r).expect("client");
        let got = backup(c, "acme/k").await;
        let may = ["crypto-user", "backup"].contains(&r);
        match got {
            Ok(made) => {
                assert!(may, "{r} backed up");
                blob = made.backup;
            }
            Err(e) => {
                assert!(!may, "{r}: {e:?}");
                assert_eq!(e.code(), Code::PermissionDenied, "{r}: {e:?}");
            }
        }
    }
    let officer = clients.get_mut("crypto-officer").expect("officer");
    delete_and_purge(officer, "acme/k").await;
    for r in roles.iter().filter(|r| **r != "crypto-officer") {
        let c = clients.get_mut(r).expect("client");
        let e = restore(c, &blob).await.expect_err("not an officer");
        assert_eq!(e.code(), Code::PermissionDenied, "{r}: {e:?}");
    }
    let e = restore(&mut other, &blob).await.expect_err("out of scope");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let officer = clients.get_mut("crypto-officer").expect("officer");
    restore(officer, &blob).await.expect("the officer restores");
    drop(clients);
    drop(other);
    b.stop().await;
}

/// Issue 18, "also decide": a purge of a backed-up key is not final while its blobs exist, and
/// the receipt says so — naming each blob by its SHA-256 — instead of claiming an erasure that
/// `RestoreKey` can undo. Blobs are tracked per version: a later key of the same name does not
/// inherit them, and a restored key purged again is still not final.
#[tokio::test]
async fn a_purge_receipt_is_not_final_while_backups_of_its_versions_exist() {
    use sha2::Digest;
    crate::require_aes!();
    let env = backup_env();
    domain_init(&env).expect("domain init");
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let purge = async |c: &mut Clients, name: &str| {
        c.mgmt
            .delete_key(pb::DeleteKeyRequest { key: name.into() })
            .await
            .expect("delete");
        c.mgmt
            .purge_key(pb::PurgeKeyRequest { key: name.into() })
            .await
            .expect("purge")
            .into_inner()
    };

    // Never backed up: final.
    create_kind(
        &mut c,
        "acme/plain",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
    )
    .await;
    let r = purge(&mut c, "acme/plain").await;
    assert!(r.r#final, "{r:?}");
    assert!(r.backups.is_empty());

    // Backed up at v1 and again at v2: both blobs hold v1, only the second holds v2.
    let name = "acme/kept";
    create_kind(&mut c, name, pb::KeyType::Aes256, pb::Algorithm::Aes256Gcm).await;
    let first = backup(&mut c, name).await.expect("backup 1");
    c.mgmt
        .rotate_key(pb::RotateKeyRequest { key: name.into() })
        .await
        .expect("rotate");
    let second = backup(&mut c, name).await.expect("backup 2");
    for blob in [&first, &second] {
        assert_eq!(blob.sha256, hex::encode(sha2::Sha256::digest(&blob.backup)));
    }
    let ids: Vec<String> = get(&mut c, name)
        .await
        .expect("get")
        .versions
        .iter()
        .map(|v| hex::encode(&v.id))
        .collect();
    let r = purge(&mut c, name).await;
    assert!(
        !r.r#final,
        "a purge with blobs outstanding must not say final"
    );
    let named: Vec<(&str, &[String])> = r
        .backups
        .iter()
        .map(|b| (b.sha256.as_str(), b.version_ids.as_slice()))
        .collect();
    assert_eq!(
        named,
        [
            (first.sha256.as_str(), &ids[..1]),
            (second.sha256.as_str(), &ids[..])
        ]
    );
    assert!(
        r.backups
            .iter()
            .all(|b| b.made_by == hsm_fixtures::pki::TEST_CLIENT_ID)
    );

    // Which is true: the older blob brings v1 back. Purged again: still not final.
    restore(&mut c, &first.backup).await.expect("restore");
    let r = purge(&mut c, name).await;
    assert!(!r.r#final);
    assert_eq!(r.backups.len(), 2, "both blobs hold the restored v1");

    // A new key under the same name shares no version with the blobs: its purge is final.
    create_kind(&mut c, name, pb::KeyType::Aes256, pb::Algorithm::Aes256Gcm).await;
    let r = purge(&mut c, name).await;
    assert!(r.r#final, "{r:?}");
    b.stop().await;

    // The audit trail's receipts say the same, in words and in detail.
    let audit = std::fs::read_to_string(env.audit_log()).expect("audit");
    let receipts: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|r| r["op"] == "DestructionReceipt" && r["key"] == name)
        .collect();
    assert_eq!(receipts.len(), 3);
    assert_eq!(receipts[0]["detail"]["final"], false);
    assert_eq!(receipts[0]["detail"]["backups"][0]["sha256"], first.sha256);
    assert!(
        receipts[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not final while 2 backup blob(s)")),
        "{}",
        receipts[0]
    );
    assert_eq!(receipts[2]["detail"]["final"], true);
}
