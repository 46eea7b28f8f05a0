//! Key safety, checked through PKCS#11 directly (hsm-probe), not through the broker.

use keybroker_proto::v1 as pb;

use crate::common::*;

#[tokio::test]
async fn kek_values_cannot_be_read_and_no_object_can_wrap_and_decrypt() {
    crate::require_aes!();
    kek_safety(false).await;
}

/// The same with `[lifecycle] backup = true`: KEKs are extractable, but only under a trusted
/// key (`CKA_WRAP_WITH_TRUSTED`), so none of the attacks gets further than before.
#[tokio::test]
async fn backup_enabled_keks_resist_the_same_attacks() {
    crate::require_aes!();
    kek_safety(true).await;
}

async fn kek_safety(backup: bool) {
    let env = Env::with(Options {
        lifecycle_extra: if backup {
            "backup = true".into()
        } else {
            String::new()
        },
        ..Default::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let mut ids = Vec::new();
    for (key, kt, alg) in [
        ("t/gcm", pb::KeyType::Aes256, pb::Algorithm::Unspecified),
        ("t/kwp", pb::KeyType::Aes256, pb::Algorithm::AesKeyWrapPad),
        ("t/kw", pb::KeyType::Aes256, pb::Algorithm::AesKeyWrap),
        ("t/rsa", pb::KeyType::Rsa2048, pb::Algorithm::Unspecified),
    ] {
        let k = create(&mut c, key, kt, alg).await;
        ids.push((key, hex::encode(&k.versions[0].id)));
    }
    c.mgmt
        .rotate_key(pb::RotateKeyRequest {
            key: "t/gcm".into(),
        })
        .await
        .expect("rotate");
    drop(c);
    b.stop().await;

    let report = env.probe(&["inspect"]);
    let objects = report["objects"].as_array().expect("objects");
    // 2 GCM versions + 1 KWP + 1 KW + 1 RSA pair, and the audit trail's HMAC key.
    assert_eq!(objects.len(), 7, "{report:#}");
    let audit_keys: Vec<_> = objects
        .iter()
        .filter(|o| o["label"].as_str().unwrap_or("").starts_with("kb-audit:"))
        .collect();
    assert_eq!(audit_keys.len(), 1, "{report:#}");
    let a = audit_keys[0];
    assert_eq!(
        (&a["sign"], &a["verify"]),
        (&true.into(), &true.into()),
        "{a}"
    );
    for role in ["encrypt", "decrypt", "wrap", "unwrap"] {
        assert_ne!(a[role], true, "audit key may {role}: {a}");
    }
    for o in objects {
        let class = o["class"].as_str().unwrap_or("");
        let label = o["label"].as_str().unwrap_or("");
        assert!(
            label.starts_with("kb:") || label.starts_with("kb-audit:"),
            "{o}"
        );
        assert_eq!(o["token"], true, "{o}");
        assert_eq!(o["modifiable"], false, "{o}");
        assert_eq!(o["copyable"], false, "{o}");
        assert_ne!(o["derive"], true, "{o}");
        assert!(
            !(o["wrap"] == true && o["decrypt"] == true),
            "wrap+decrypt: {o}"
        );
        assert!(
            !(o["unwrap"] == true && o["encrypt"] == true),
            "unwrap+encrypt: {o}"
        );
        if class != "CKO_PUBLIC_KEY" {
            assert_eq!(
                o["value"], "sensitive",
                "secret value must not be readable: {o}"
            );
            assert_eq!(o["sensitive"], true, "{o}");
            let kek_backup = backup && label.starts_with("kb:");
            assert_eq!(o["extractable"], kek_backup, "{o}");
            assert_eq!(o["never_extractable"], !kek_backup, "{o}");
            if kek_backup {
                assert_eq!(o["wrap_with_trusted"], true, "{o}");
            }
            assert_eq!(o["always_sensitive"], true, "{o}");
            assert_eq!(o["private"], true, "{o}");
            if !label.starts_with("kb-audit:") {
                assert_ne!(o["sign"], true, "{o}");
            }
        }
    }
    for (key, id) in &ids {
        let a = env.probe(&["attack", id]);
        assert_eq!(
            a["control_bad_key_extracts_target"], true,
            "the attack works on a bad key: {a:#}"
        );
        for attack in [
            "clulow_wrap_then_decrypt",
            "set_attribute_add_role",
            "copy_object_add_role",
            "loosen_sensitive_extractable",
        ] {
            let r = a[attack].as_str().unwrap_or("");
            assert!(
                r.starts_with("refused"),
                "{key}: {attack} was not refused: {a:#}"
            );
        }
        assert_eq!(a["read_value"], "sensitive", "{key}: {a:#}");
    }
    // The attacks changed nothing: the broker starts and its integrity checks pass.
    let b = env.start().await;
    b.stop().await;
}

#[tokio::test]
async fn dek_bytes_and_the_pin_never_reach_the_log_and_core_dumps_are_off() {
    crate::require_aes!();
    let env = Env::with(Options {
        rust_log: Some("trace".into()),
        ..Default::default()
    });
    let b = env.start().await;
    let pid = b.child.id().expect("pid");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );

    let mut c = b.clients_as(&env.pki.client).await;
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    for (key, kt, alg) in [
        ("t/gcm", pb::KeyType::Aes256, pb::Algorithm::Unspecified),
        ("t/kwp", pb::KeyType::Aes256, pb::Algorithm::AesKeyWrapPad),
        ("t/kw", pb::KeyType::Aes256, pb::Algorithm::AesKeyWrap),
        ("t/rsa", pb::KeyType::Rsa2048, pb::Algorithm::Unspecified),
    ] {
        create(&mut c, key, kt, alg).await;
        let dek = random_dek(32);
        let w = wrap(&mut c, key, &dek, b"").await.expect("wrap");
        assert_eq!(
            unwrap(&mut c, key, &w.wrapped_key, b"")
                .await
                .expect("unwrap")
                .plaintext,
            dek
        );
        let mut bad = w.wrapped_key.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(unwrap(&mut c, key, &bad, b"").await.is_err());
        assert!(
            wrap(&mut c, key, &dek[..31], b"").await.is_err(),
            "odd-length DEK refused"
        );
        let g = c
            .broker
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: key.into(),
                length: 32,
                aad: vec![],
                ..Default::default()
            })
            .await
            .expect("generate")
            .into_inner();
        secrets.push(dek);
        secrets.push(g.plaintext);
    }
    drop(c);
    let log = b.stop().await;
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the broker logged at trace level"
    );
    use base64::Engine;
    for s in &secrets {
        for needle in [
            hex::encode(s),
            hex::encode_upper(s),
            base64::engine::general_purpose::STANDARD.encode(s),
            format!("{:?}", &s[..8]),
            format!("{:02x?}", &s[..8]),
        ] {
            assert!(!log.contains(&needle), "DEK material in the log: {needle}");
        }
    }
    assert!(!log.contains(&env.token.user_pin), "the PIN is in the log");
}

#[tokio::test]
async fn a_tampered_token_fails_closed_at_start_up_and_quarantine_refuses_only_that_key() {
    crate::require_aes!();
    for (mode, expect) in [
        ("destroy", "its HSM object is missing"),
        ("duplicate", "share its CKA_ID"),
        ("replace-bad", "wrong template"),
        ("replace-good", "canary"),
    ] {
        let env = Env::new();
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
        let dek = random_dek(32);
        let wa = wrap(&mut c, "t/a", &dek, b"").await.expect("wrap a");
        let wb = wrap(&mut c, "t/b", &dek, b"").await.expect("wrap b");
        drop(c);
        b.stop().await;

        env.probe(&["tamper", &hex::encode(&a.versions[0].id), mode]);
        let err = match env.try_start().await {
            Ok(b) => {
                b.stop().await;
                panic!("{mode}: the broker started on a tampered token");
            }
            Err(e) => e,
        };
        assert!(err.contains("refusing to start"), "{mode}: {err}");
        assert!(
            err.contains("t/a") && err.contains(expect),
            "{mode}: the error names the key and the problem: {err}"
        );
        assert!(
            !err.contains("t/b:"),
            "{mode}: the intact key is not blamed: {err}"
        );

        // With quarantine, the broker serves the intact key and refuses the tampered one.
        env.edit_config(|t| {
            t.replace(
                "sessions = 4",
                "sessions = 4\non_integrity_failure = \"quarantine\"",
            )
        });
        let b = env.start().await;
        let mut c = b.clients_as(&env.pki.client).await;
        assert_eq!(
            unwrap(&mut c, "", &wb.wrapped_key, b"")
                .await
                .expect("intact key")
                .plaintext,
            dek
        );
        let e = unwrap(&mut c, "", &wa.wrapped_key, b"")
            .await
            .expect_err("quarantined key unwraps");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{mode}: {e:?}");
        let e = wrap(&mut c, "t/a", &dek, b"")
            .await
            .expect_err("quarantined key wraps");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{mode}");
        let k = c
            .mgmt
            .get_key(pb::GetKeyRequest { key: "t/a".into() })
            .await
            .expect("get")
            .into_inner();
        assert_eq!(k.state, pb::KeyState::Quarantined as i32);
        drop(c);
        b.stop().await;
    }
}
