//! Roles × RPCs, scopes, policy reload and certificate revocation.

use std::{collections::HashMap, time::Duration};

use hsm_fixtures::pki::Issued;
use keybroker::client::Clients;
use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::common::*;

const ROLES: [&str; 7] = [
    "administrator",
    "crypto-officer",
    "crypto-user",
    "service-encryption-user",
    "service-crypto-user",
    "auditor",
    "backup",
];

fn id(role: &str) -> String {
    format!("spiffe://keybroker.test/role/{role}")
}

fn role_policy() -> String {
    let mut p = String::from(
        "[[binding]]\nidentity = \"spiffe://keybroker.test/setup\"\nrole = \"crypto-user\"\nscope = \"all\"\n",
    );
    for r in ROLES {
        p.push_str(&format!(
            "[[binding]]\nidentity = \"{}\"\nrole = \"{r}\"\nscope = \"all\"\n",
            id(r)
        ));
    }
    p
}

const RPCS: [&str; 20] = [
    "CreateKey",
    "GetKey",
    "ListKeys",
    "RotateKey",
    "WrapKey",
    "GenerateDataKey",
    "UnwrapKey",
    "Rewrap",
    "Encrypt",
    "Decrypt",
    "BatchEncrypt",
    "BatchDecrypt",
    "GetPublicKey",
    "QueryAudit",
    "HyokGetState",
    "HyokReconnect",
    "GetRandomBytes",
    "Sign",
    "Verify",
    "BatchSign",
];

/// The published role table (docs/src/deployment.md, "Roles"), stated independently of the implementation.
fn allowed(role: &str, rpc: &str) -> bool {
    let read = ["GetKey", "ListKeys", "GetPublicKey"].contains(&rpc);
    let payload = ["Encrypt", "Decrypt", "BatchEncrypt", "BatchDecrypt"].contains(&rpc);
    match role {
        "administrator" => read || rpc.starts_with("Hyok"),
        "crypto-officer" | "backup" => read,
        "crypto-user" => {
            read || [
                "CreateKey",
                "RotateKey",
                "WrapKey",
                "GenerateDataKey",
                "UnwrapKey",
                "Rewrap",
                "GetRandomBytes",
                "Sign",
                "Verify",
                "BatchSign",
            ]
            .contains(&rpc)
                || payload
        }
        "service-encryption-user" => {
            read || ["WrapKey", "GenerateDataKey", "UnwrapKey", "Rewrap"].contains(&rpc)
        }
        "service-crypto-user" => read || payload,
        "auditor" => read || rpc == "QueryAudit",
        _ => false,
    }
}

async fn call(
    c: &mut Clients,
    rpc: &str,
    who: &str,
    envelope: &[u8],
    payload: &[u8],
) -> Result<(), tonic::Status> {
    let encrypt_req = || pb::EncryptRequest {
        key: "t/payload".into(),
        plaintext: b"a payload".to_vec(),
        ..Default::default()
    };
    let sign_req = || pb::SignRequest {
        key: "t/ec".into(),
        algorithm: pb::SignatureAlgorithm::Es256.into(),
        digest: vec![3; 32],
        context: None,
    };
    let decrypt_req = || pb::DecryptRequest {
        ciphertext: payload.to_vec(),
        ..Default::default()
    };
    match rpc {
        "Encrypt" => c.broker.encrypt(encrypt_req()).await.map(drop),
        "Decrypt" => c.broker.decrypt(decrypt_req()).await.map(drop),
        // A batch is refused as a whole only when its caller may not use the key at all; here
        // its one item's result says whether the role may.
        "BatchEncrypt" => {
            let r = c
                .broker
                .batch_encrypt(pb::BatchEncryptRequest {
                    items: vec![encrypt_req()],
                    context: None,
                })
                .await?
                .into_inner();
            match r.results.into_iter().next().and_then(|r| r.result) {
                Some(pb::encrypt_result::Result::Ok(_)) => Ok(()),
                Some(pb::encrypt_result::Result::Error(e)) => {
                    Err(tonic::Status::new(e.code.into(), e.message))
                }
                None => panic!("BatchEncrypt without a result"),
            }
        }
        "BatchDecrypt" => {
            let r = c
                .broker
                .batch_decrypt(pb::BatchDecryptRequest {
                    items: vec![decrypt_req()],
                    context: None,
                })
                .await?
                .into_inner();
            match r.results.into_iter().next().and_then(|r| r.result) {
                Some(pb::decrypt_result::Result::Ok(_)) => Ok(()),
                Some(pb::decrypt_result::Result::Error(e)) => {
                    Err(tonic::Status::new(e.code.into(), e.message))
                }
                None => panic!("BatchDecrypt without a result"),
            }
        }
        "CreateKey" => c
            .mgmt
            .create_key(pb::CreateKeyRequest {
                key: format!("t/new-{who}"),
                key_type: pb::KeyType::Aes256.into(),
                algorithm: 0,
                ..Default::default()
            })
            .await
            .map(drop),
        "GetKey" => c
            .mgmt
            .get_key(pb::GetKeyRequest {
                key: "t/aes".into(),
            })
            .await
            .map(drop),
        "ListKeys" => c
            .mgmt
            .list_keys(pb::ListKeysRequest {
                tenant: "t".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "RotateKey" => c
            .mgmt
            .rotate_key(pb::RotateKeyRequest {
                key: "t/aes".into(),
            })
            .await
            .map(drop),
        "WrapKey" => wrap(c, "t/aes", &[7; 32], b"").await.map(drop),
        "GenerateDataKey" => c
            .broker
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: "t/aes".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "UnwrapKey" => unwrap(c, "", envelope, b"").await.map(drop),
        "Rewrap" => c
            .broker
            .rewrap(pb::RewrapRequest {
                envelope: envelope.to_vec(),
                ..Default::default()
            })
            .await
            .map(drop),
        "GetPublicKey" => c
            .broker
            .get_public_key(pb::GetPublicKeyRequest {
                key: "t/rsa".into(),
                key_version: 0,
            })
            .await
            .map(drop),
        "QueryAudit" => c
            .audit
            .query_audit(pb::QueryAuditRequest::default())
            .await
            .map(drop),
        "HyokGetState" => c.hyok.get_state(pb::GetHyokStateRequest {}).await.map(drop),
        "HyokReconnect" => c
            .hyok
            .reconnect(pb::HyokSwitchRequest {
                reason: "test".into(),
            })
            .await
            .map(drop),
        "GetRandomBytes" => c
            .broker
            .get_random_bytes(pb::GetRandomBytesRequest {
                count: 32,
                context: None,
            })
            .await
            .map(drop),
        "Sign" => c.broker.sign(sign_req()).await.map(drop),
        "BatchSign" => {
            let r = c
                .broker
                .batch_sign(pb::BatchSignRequest {
                    items: vec![sign_req()],
                    context: None,
                })
                .await?
                .into_inner();
            match r.results.into_iter().next().and_then(|r| r.result) {
                Some(pb::sign_result::Result::Ok(_)) => Ok(()),
                Some(pb::sign_result::Result::Error(e)) => {
                    Err(tonic::Status::new(e.code.into(), e.message))
                }
                None => panic!("BatchSign without a result"),
            }
        }
        "Verify" => c
            .broker
            .verify(pb::VerifyRequest {
                key: "t/ec".into(),
                algorithm: pb::SignatureAlgorithm::Es256.into(),
                digest: vec![3; 32],
                signature: vec![1; 64],
                ..Default::default()
            })
            .await
            .map(drop),
        other => panic!("unknown rpc {other}"),
    }
}

#[tokio::test]
async fn every_role_against_every_rpc_is_allowed_or_denied_and_audited_either_way() {
    crate::require_aes!();
    let env = Env::with(Options {
        policy: Some(role_policy()),
        ..Default::default()
    });
    let setup = env
        .pki
        .ca
        .issue_spiffe_client("setup", "spiffe://keybroker.test/setup")
        .expect("cert");
    let mut certs: HashMap<&str, Issued> = HashMap::new();
    for r in ROLES {
        certs.insert(r, env.pki.ca.issue_spiffe_client(r, &id(r)).expect("cert"));
    }
    let b = env.start().await;
    let mut s = b.clients_as(&setup).await;
    create(
        &mut s,
        "t/aes",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    create(
        &mut s,
        "t/rsa",
        pb::KeyType::Rsa2048,
        pb::Algorithm::Unspecified,
    )
    .await;
    create(
        &mut s,
        "t/ec",
        pb::KeyType::EcP256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let envelope = wrap(&mut s, "t/aes", &[1; 32], b"")
        .await
        .expect("setup wrap")
        .wrapped_key;
    s.mgmt
        .create_key(pb::CreateKeyRequest {
            key: "t/payload".into(),
            key_type: pb::KeyType::Aes256.into(),
            attributes: Some(pb::KeyAttributes {
                operations: Some(pb::KeyOperations {
                    operations: vec![
                        pb::KeyOperation::Encrypt.into(),
                        pb::KeyOperation::Decrypt.into(),
                    ],
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("setup payload key");
    let payload = s
        .broker
        .encrypt(pb::EncryptRequest {
            key: "t/payload".into(),
            plaintext: b"setup".to_vec(),
            ..Default::default()
        })
        .await
        .expect("setup encrypt")
        .into_inner()
        .ciphertext;

    let mut expected = Vec::new();
    for role in ROLES.iter().copied().chain(["stranger"]) {
        let mut c = if role == "stranger" {
            b.clients_as(&env.pki.stranger).await
        } else {
            b.clients_as(&certs[role]).await
        };
        for rpc in RPCS {
            let r = call(&mut c, rpc, role, &envelope, &payload).await;
            if allowed(role, rpc) {
                assert!(r.is_ok(), "{role} {rpc} should work: {r:?}");
            } else {
                let e = r.expect_err("denied");
                assert_eq!(e.code(), Code::PermissionDenied, "{role} {rpc}: {e:?}");
            }
            let who = if role == "stranger" {
                hsm_fixtures::pki::TEST_STRANGER_ID.to_string()
            } else {
                id(role)
            };
            expected.push((
                who,
                rpc,
                if allowed(role, rpc) {
                    "OK"
                } else {
                    "PERMISSION_DENIED"
                },
            ));
        }
    }
    drop(s);
    b.stop().await;
    let recs = env.audit_records();
    for (who, rpc, outcome) in expected {
        let n = recs
            .iter()
            .filter(|r| r["kind"] == "request" && r["caller"] == who.as_str() && r["op"] == rpc)
            // A batch's item has its own record (request id `ID#0`): that one says whether the
            // role could use the key. A caller with no role at all is refused the whole batch
            // (no item records).
            .filter(|r| {
                let item = r["request_id"].as_str().is_some_and(|id| id.contains('#'));
                !rpc.starts_with("Batch") || item || who == hsm_fixtures::pki::TEST_STRANGER_ID
            })
            .filter(|r| r["outcome"] == outcome)
            .count();
        assert_eq!(n, 1, "exactly one audit record {outcome} for {who} {rpc}");
    }
}

#[tokio::test]
async fn scopes_limit_keys_and_unknown_keys_are_not_revealed_outside_them() {
    crate::require_aes!();
    let policy = r#"
[[binding]]
identity = "spiffe://keybroker.test/setup"
role = "crypto-user"
scope = "all"
[[binding]]
identity = "spiffe://keybroker.test/acme-app"
role = "service-encryption-user"
scope = "tenant:acme"
[[binding]]
identity = "spiffe://keybroker.test/payments/*"
role = "service-encryption-user"
scope = "key:acme/pay-*"
"#;
    let env = Env::with(Options {
        policy: Some(policy.into()),
        ..Default::default()
    });
    let setup = env
        .pki
        .ca
        .issue_spiffe_client("setup", "spiffe://keybroker.test/setup")
        .expect("cert");
    let app = env
        .pki
        .ca
        .issue_spiffe_client("acme-app", "spiffe://keybroker.test/acme-app")
        .expect("cert");
    let pay = env
        .pki
        .ca
        .issue_spiffe_client("pay", "spiffe://keybroker.test/payments/api")
        .expect("cert");
    let b = env.start().await;
    let mut s = b.clients_as(&setup).await;
    for k in ["acme/pay-1", "acme/bill", "other/pay-1"] {
        create(&mut s, k, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    }
    let mut a = b.clients_as(&app).await;
    let mut p = b.clients_as(&pay).await;
    // Tenant scope: every acme key, nothing else.
    assert!(wrap(&mut a, "acme/pay-1", &[1; 32], b"").await.is_ok());
    assert!(wrap(&mut a, "acme/bill", &[1; 32], b"").await.is_ok());
    assert_eq!(
        wrap(&mut a, "other/pay-1", &[1; 32], b"")
            .await
            .expect_err("other tenant")
            .code(),
        Code::PermissionDenied
    );
    // Key glob scope.
    assert!(wrap(&mut p, "acme/pay-1", &[1; 32], b"").await.is_ok());
    assert_eq!(
        wrap(&mut p, "acme/bill", &[1; 32], b"")
            .await
            .expect_err("outside glob")
            .code(),
        Code::PermissionDenied
    );
    // Unknown keys: NOT_FOUND inside the scope, PERMISSION_DENIED outside it (no name probing).
    assert_eq!(
        wrap(&mut a, "acme/nope", &[1; 32], b"")
            .await
            .expect_err("unknown")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        wrap(&mut a, "other/nope", &[1; 32], b"")
            .await
            .expect_err("unknown")
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        wrap(&mut p, "acme/bill-x", &[1; 32], b"")
            .await
            .expect_err("unknown")
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        p.mgmt
            .get_key(pb::GetKeyRequest {
                key: "other/pay-1".into()
            })
            .await
            .expect_err("other")
            .code(),
        Code::PermissionDenied
    );
    // Listing shows only what the caller may read.
    let list = |c: &mut Clients, t: &str| {
        let mut c = c.mgmt.clone();
        let t = t.to_string();
        async move {
            c.list_keys(pb::ListKeysRequest {
                tenant: t,
                ..Default::default()
            })
            .await
            .map(|r| {
                r.into_inner()
                    .keys
                    .into_iter()
                    .map(|k| k.name)
                    .collect::<Vec<_>>()
            })
        }
    };
    assert_eq!(
        list(&mut a, "acme").await.expect("list"),
        ["acme/bill", "acme/pay-1"]
    );
    assert_eq!(list(&mut p, "acme").await.expect("list"), ["acme/pay-1"]);
    assert_eq!(
        list(&mut a, "other").await.expect_err("other").code(),
        Code::PermissionDenied
    );
    // An envelope from a key outside the scope cannot be unwrapped (the key comes from the
    // envelope, and policy still applies).
    let w = wrap(&mut s, "other/pay-1", &[5; 32], b"")
        .await
        .expect("wrap");
    assert_eq!(
        unwrap(&mut a, "", &w.wrapped_key, b"")
            .await
            .expect_err("scope")
            .code(),
        Code::PermissionDenied
    );
    drop((s, a, p));
    b.stop().await;
}

#[tokio::test]
async fn policy_reloads_on_sighup_and_an_invalid_file_keeps_the_old_policy() {
    crate::require_aes!();
    let grant = |role: &str| {
        format!(
            "[[binding]]\nidentity = \"{}\"\nrole = \"{role}\"\nscope = \"all\"\n",
            hsm_fixtures::pki::TEST_CLIENT_ID
        )
    };
    let env = Env::with(Options {
        policy: Some(grant("crypto-user")),
        ..Default::default()
    });
    let b = env.start().await;
    let pid = b.child.id().expect("pid").to_string();
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    assert!(wrap(&mut c, "t/k", &[1; 32], b"").await.is_ok());

    // A bad file: rejected, the old policy stays.
    std::fs::write(
        env.policy_file(),
        "[[binding]]\nidentity = \"x\"\nrole = \"emperor\"\nscope = \"all\"\n",
    )
    .expect("write");
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    wait_for(|| b.log().contains("invalid policy file rejected")).await;
    assert!(b.log().contains("emperor"), "the log says what was wrong");
    assert!(
        wrap(&mut c, "t/k", &[1; 32], b"").await.is_ok(),
        "previous policy still in force"
    );

    // A good file: the client becomes an auditor and can no longer wrap.
    std::fs::write(env.policy_file(), grant("auditor")).expect("write");
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    wait_for(|| b.log().contains("policy reloaded")).await;
    let e = wrap(&mut c, "t/k", &[1; 32], b"")
        .await
        .expect_err("auditor cannot wrap");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        c.audit
            .query_audit(pb::QueryAuditRequest::default())
            .await
            .is_ok(),
        "auditor can query"
    );

    // Changing the file is enough (no signal): back to crypto user.
    std::fs::write(env.policy_file(), grant("crypto-user")).expect("write");
    let mut ok = false;
    for _ in 0..100 {
        if wrap(&mut c, "t/k", &[1; 32], b"").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the changed file was picked up without a signal");
    drop(c);
    b.stop().await;
}

/// Waits (at most 20 s) for a condition on the broker's observable state.
async fn wait_for(mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("condition not reached within 20 s");
}

#[tokio::test]
async fn a_revoked_client_certificate_is_refused_when_a_crl_is_configured() {
    let env = Env::new();
    let revoked = env
        .pki
        .ca
        .issue_spiffe_client("revoked", hsm_fixtures::pki::TEST_CLIENT_ID)
        .expect("cert");
    let crl = env.pki.ca.crl("crl", &[&revoked]).expect("crl");
    env.edit_config(|t| {
        t.replace(
            "handshake_timeout_ms = 3000",
            &format!("handshake_timeout_ms = 3000\ncrl = [\"{}\"]", crl.display()),
        )
    });
    let b = env.start().await;
    // The good certificate still gets through; the revoked one (same identity, same CA) does not.
    crate::tls::handshake(
        &b,
        crate::tls::client_config(&env, Some(&env.pki.client), false),
    )
    .await
    .expect("valid certificate accepted with a CRL configured");
    let e = crate::tls::handshake(&b, crate::tls::client_config(&env, Some(&revoked), false))
        .await
        .expect_err("revoked certificate accepted");
    assert!(e.contains("alert"), "refused by a TLS alert: {e}");
    b.stop().await;
}
