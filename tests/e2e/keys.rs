//! Rotation, restart and the control plane.

use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn unwrap_after_rotation_uses_old_version_and_new_wraps_name_the_new_one() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    for (key, kt) in [
        ("t/gcm", pb::KeyType::Aes256),
        ("t/rsa", pb::KeyType::Rsa2048),
    ] {
        create(&mut c, key, kt, pb::Algorithm::Unspecified).await;
        let d1 = random_dek(32);
        let w1 = wrap(&mut c, key, &d1, b"").await.expect("wrap v1");
        assert_eq!(w1.key_version, 1);
        let k = c
            .mgmt
            .rotate_key(pb::RotateKeyRequest { key: key.into() })
            .await
            .expect("rotate")
            .into_inner();
        assert_eq!(k.current_version, 2);
        assert_eq!(k.versions.len(), 2);
        assert_ne!(k.versions[0].id, k.versions[1].id);
        let d2 = random_dek(32);
        let w2 = wrap(&mut c, key, &d2, b"").await.expect("wrap v2");
        assert_eq!(w2.key_version, 2, "new wraps use the newest version");
        assert_eq!(
            &w2.wrapped_key[2..18],
            &k.versions[1].id[..],
            "the envelope names the new version id"
        );
        assert_eq!(&w1.wrapped_key[2..18], &k.versions[0].id[..]);
        let u1 = unwrap(&mut c, key, &w1.wrapped_key, b"")
            .await
            .expect("old envelope unwraps");
        assert_eq!((u1.plaintext, u1.key_version), (d1.clone(), 1));
        let u2 = unwrap(&mut c, key, &w2.wrapped_key, b"")
            .await
            .expect("new envelope unwraps");
        assert_eq!((u2.plaintext, u2.key_version), (d2, 2));
        // Rewrap moves an old envelope to the newest version, same DEK.
        let r = c
            .broker
            .rewrap(pb::RewrapRequest {
                envelope: w1.wrapped_key.clone(),
                ..Default::default()
            })
            .await
            .expect("rewrap")
            .into_inner();
        assert_eq!((r.source_key_version, r.key_version), (1, 2));
        assert_eq!(
            unwrap(&mut c, "", &r.wrapped_key, b"")
                .await
                .expect("unwrap rewrapped")
                .plaintext,
            d1
        );
    }
    // Rewrap across keys and AAD.
    create(
        &mut c,
        "t/other",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let d = random_dek(32);
    let w = wrap(&mut c, "t/gcm", &d, b"a").await.expect("wrap");
    let r = c
        .broker
        .rewrap(pb::RewrapRequest {
            envelope: w.wrapped_key,
            aad: b"a".to_vec(),
            destination_key: "t/other".into(),
            new_aad: b"b".to_vec(),
            change_aad: true,
            ..Default::default()
        })
        .await
        .expect("rewrap to another key")
        .into_inner();
    assert_eq!(r.key, "t/other");
    assert_unauthentic(
        unwrap(&mut c, "", &r.wrapped_key, b"a").await,
        "old AAD after change",
    );
    assert_eq!(
        unwrap(&mut c, "", &r.wrapped_key, b"b")
            .await
            .expect("new AAD")
            .plaintext,
        d
    );
    b.stop().await;
}

#[tokio::test]
async fn dek_wrapped_before_restart_unwraps_after() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let mut saved = Vec::new();
    for (key, kt, alg) in [
        ("t/gcm", pb::KeyType::Aes256, pb::Algorithm::Unspecified),
        ("t/kwp", pb::KeyType::Aes256, pb::Algorithm::AesKeyWrapPad),
        ("t/rsa", pb::KeyType::Rsa3072, pb::Algorithm::Unspecified),
    ] {
        create(&mut c, key, kt, alg).await;
        let d = random_dek(32);
        let aad: &[u8] = if key == "t/gcm" { b"ctx" } else { b"" };
        saved.push((
            key,
            d.clone(),
            aad,
            wrap(&mut c, key, &d, aad).await.expect("wrap").wrapped_key,
        ));
    }
    c.mgmt
        .rotate_key(pb::RotateKeyRequest {
            key: "t/gcm".into(),
        })
        .await
        .expect("rotate");
    let before = c
        .mgmt
        .get_key(pb::GetKeyRequest {
            key: "t/gcm".into(),
        })
        .await
        .expect("get")
        .into_inner();
    drop(c);
    b.stop().await;

    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let after = c
        .mgmt
        .get_key(pb::GetKeyRequest {
            key: "t/gcm".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(before, after, "metadata survives the restart unchanged");
    assert_eq!(
        after.versions[0].wraps, 1,
        "usage counters survive a restart"
    );
    for (key, d, aad, w) in &saved {
        let u = unwrap(&mut c, "", w, aad)
            .await
            .unwrap_or_else(|e| panic!("{key} after restart: {e:?}"));
        assert_eq!(&u.plaintext, d, "{key}");
    }

    let w = wrap(&mut c, "t/gcm", &[9; 32], b"")
        .await
        .expect("wrap after restart");
    assert_eq!(w.key_version, 2);
    b.stop().await;
}

#[tokio::test]
async fn list_keys_pages_by_tenant() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    for i in 0..5 {
        create(
            &mut c,
            &format!("a/k{i}"),
            pb::KeyType::Aes256,
            pb::Algorithm::Unspecified,
        )
        .await;
    }
    create(
        &mut c,
        "b/only",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    create(
        &mut c,
        "plain",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let p = c
            .mgmt
            .list_keys(pb::ListKeysRequest {
                tenant: "a".into(),
                page_size: 2,
                page_token: token,
            })
            .await
            .expect("list")
            .into_inner();
        assert!(p.keys.len() <= 2);
        names.extend(p.keys.into_iter().map(|k| k.name));
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    assert_eq!(names, ["a/k0", "a/k1", "a/k2", "a/k3", "a/k4"]);
    let d = c
        .mgmt
        .list_keys(pb::ListKeysRequest::default())
        .await
        .expect("list default")
        .into_inner();
    assert_eq!(
        d.keys.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
        ["default/plain"]
    );
    let e = c
        .mgmt
        .list_keys(pb::ListKeysRequest {
            tenant: "a".into(),
            page_size: 5000,
            page_token: String::new(),
        })
        .await
        .expect_err("page too big");
    assert_eq!(e.code(), Code::InvalidArgument);
    b.stop().await;
}

/// Issue 18, item 6: a caller scoped to some of a tenant's keys pages through the tenant's list
/// one key at a time. Neither the keys nor the page tokens may name a key outside its scope
/// (the token used to be the last name of the unfiltered page: `page_size = 1` walked every
/// key name of the tenant).
#[tokio::test]
async fn listing_never_names_a_key_outside_the_callers_scope_not_even_in_a_page_token() {
    crate::require_aes!();
    const ADMIN: &str = "spiffe://keybroker.test/setup";
    const PAYMENTS: &str = "spiffe://keybroker.test/payments-app";
    let env = Env::with(Options {
        policy: Some(format!(
            r#"
[[binding]]
identity = "{ADMIN}"
role = "crypto-user"
scope = "all"
[[binding]]
identity = "{PAYMENTS}"
role = "service-encryption-user"
scope = "key:acme/payments-*"
"#
        )),
        ..Options::default()
    });
    let admin = env
        .pki
        .ca
        .issue_spiffe_client("admin", ADMIN)
        .expect("cert");
    let app = env
        .pki
        .ca
        .issue_spiffe_client("payments", PAYMENTS)
        .expect("cert");
    let b = env.start().await;
    let mut a = b.clients_as(&admin).await;
    for k in [
        "acme/alpha",
        "acme/payments-1",
        "acme/secret-merger",
        "acme/zeta",
    ] {
        create(&mut a, k, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    }
    let mut c = b.clients_as(&app).await;
    let (mut seen, mut tokens, mut token) = (Vec::new(), Vec::new(), String::new());
    for _ in 0..10 {
        let p = c
            .mgmt
            .list_keys(pb::ListKeysRequest {
                tenant: "acme".into(),
                page_size: 1,
                page_token: token,
            })
            .await
            .expect("list")
            .into_inner();
        seen.extend(p.keys.into_iter().map(|k| k.name));
        if p.next_page_token.is_empty() {
            break;
        }
        tokens.push(p.next_page_token.clone());
        token = p.next_page_token;
    }
    assert_eq!(seen, ["acme/payments-1"]);
    for t in &tokens {
        assert!(
            t.starts_with("payments-"),
            "a page token names a key outside the caller's scope: {t:?} (all tokens: {tokens:?})"
        );
    }
    drop((a, c));
    b.stop().await;
}
