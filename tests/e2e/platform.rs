//! The platform-managed key model (encryption by default, no customer action) and the move
//! between the three encryption-at-rest models without re-encrypting data, end to end: the
//! real binary, its policy's `[platform]` section, a real token, and the CLI as an operator
//! runs it (`docs/src/models.md` walks through the same flow).

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use hsm_fixtures::pki::TEST_CLIENT_ID;
use keybroker::client::Clients;
use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::common::*;

const PLATFORM: &str = "spiffe://keybroker.test/platform";
const ACME_ADMIN: &str = "spiffe://keybroker.test/acme-admin";

/// A policy with the platform model on: the test client administers everything, the platform
/// identity wraps and unwraps everywhere (and, for the move between models, updates, deletes
/// and purges), `acme-admin` holds every key role in tenant `acme`.
fn platform_policy(rotation_period_ms: u64) -> String {
    format!(
        r#"
[[binding]]
identity = "{TEST_CLIENT_ID}"
roles = ["administrator", "crypto-officer", "crypto-user", "auditor", "backup"]
scope = "all"
[[binding]]
identity = "{PLATFORM}"
roles = ["service-encryption-user", "crypto-user", "crypto-officer"]
scope = "all"
[[binding]]
identity = "{ACME_ADMIN}"
roles = ["crypto-officer", "crypto-user", "backup"]
scope = "tenant:acme"

[platform]
identities = ["{PLATFORM}"]
rotation_period_ms = {rotation_period_ms}
"#
    )
}

fn platform_env(rotation_period_ms: u64) -> Env {
    Env::with(Options {
        policy: Some(platform_policy(rotation_period_ms)),
        lifecycle_extra: "maintenance_interval_ms = 200".into(),
        ..Default::default()
    })
}

async fn generate(
    c: &mut Clients,
    key: &str,
    aad: &[u8],
) -> Result<pb::GenerateDataKeyResponse, tonic::Status> {
    c.broker
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: key.into(),
            aad: aad.to_vec(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn create_key(c: &mut Clients, key: &str) -> Result<pb::Key, tonic::Status> {
    c.mgmt
        .create_key(pb::CreateKeyRequest {
            key: key.into(),
            key_type: pb::KeyType::Aes256.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn get(c: &mut Clients, key: &str) -> Result<pb::Key, tonic::Status> {
    c.mgmt
        .get_key(pb::GetKeyRequest { key: key.into() })
        .await
        .map(|r| r.into_inner())
}

/// The `CreatePlatformKey` records of `key`: (outcome, version).
fn creation_records(env: &Env, key: &str) -> Vec<(String, Option<u64>)> {
    env.audit_records()
        .into_iter()
        .filter(|r| r["op"] == "CreatePlatformKey" && r["key"] == key)
        .map(|r| {
            (
                r["outcome"].as_str().unwrap_or_default().to_string(),
                r["version"].as_u64(),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_platforms_first_use_creates_the_tenants_default_key_which_only_the_platform_manages() {
    crate::require_aes!();
    // Rotation far away here: this test counts versions.
    let env = platform_env(86_400_000);
    let issue = |name: &str, id: &str| env.pki.ca.issue_spiffe_client(name, id).expect("cert");
    let (platform, acme_admin) = (issue("platform", PLATFORM), issue("acme-admin", ACME_ADMIN));
    let b = env.start().await;
    let mut p = b.clients_as(&platform).await;
    let mut admin = b.clients_as(&env.pki.client).await;
    let mut acme = b.clients_as(&acme_admin).await;

    // Nobody created acme/default: the platform's first use does, inside the HSM.
    assert_eq!(
        get(&mut admin, "acme/default")
            .await
            .expect_err("absent")
            .code(),
        Code::NotFound
    );
    let g = generate(&mut p, "acme/default", b"blob-1")
        .await
        .expect("first use");
    assert_eq!((g.key.as_str(), g.key_version), ("acme/default", 1));
    let k = get(&mut acme, "acme/default")
        .await
        .expect("the tenant sees its key");
    let a = k.attributes.clone().expect("attributes");
    assert_eq!(
        a.tags
            .expect("tags")
            .tags
            .get("managed-by")
            .map(String::as_str),
        Some("platform")
    );
    assert_eq!(
        a.rotation_period_ms, 86_400_000,
        "the default rotation policy"
    );
    assert_eq!(a.purge_protection, Some(true));
    assert_eq!(k.algorithm, pb::Algorithm::Aes256Gcm as i32);
    assert_eq!(k.versions.len(), 1);
    // Both the platform and the tenant's own identities use it.
    for c in [&mut p, &mut acme] {
        let u = unwrap(c, "", &g.wrapped_key, b"blob-1")
            .await
            .expect("unwrap");
        assert_eq!(u.plaintext, g.plaintext);
    }
    // Audited: intent before the change, then its outcome, by the platform, once.
    assert_eq!(
        creation_records(&env, "acme/default"),
        vec![("INTENT".to_string(), None), ("OK".to_string(), Some(1))]
    );

    // The tenant's identities cannot make, change, export or destroy it; nothing changes.
    let refused = [
        (
            "delete",
            acme.mgmt
                .delete_key(pb::DeleteKeyRequest {
                    key: "acme/default".into(),
                })
                .await
                .map(drop),
        ),
        (
            "update",
            acme.mgmt
                .update_key(pb::UpdateKeyRequest {
                    key: "acme/default".into(),
                    attributes: Some(pb::KeyAttributes {
                        enabled: Some(false),
                        ..Default::default()
                    }),
                    set_times: false,
                })
                .await
                .map(drop),
        ),
        (
            "backup",
            acme.mgmt
                .backup_key(pb::BackupKeyRequest {
                    key: "acme/default".into(),
                })
                .await
                .map(drop),
        ),
        (
            "trim",
            acme.mgmt
                .trim_key_versions(pb::TrimKeyVersionsRequest {
                    key: "acme/default".into(),
                })
                .await
                .map(drop),
        ),
    ];
    for (what, r) in refused {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
        assert!(
            e.message().contains("platform-managed"),
            "{what}: {}",
            e.message()
        );
    }
    let after = get(&mut acme, "acme/default").await.expect("still there");
    assert_eq!(after.state, k.state, "still enabled");
    assert_eq!(after.versions.len(), 1);
    // The name is reserved in every tenant, even for an administrator of all of them.
    let e = create_key(&mut admin, "globex/default")
        .await
        .expect_err("reserved name");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("platform-managed"), "{}", e.message());

    // Only the platform's use of the default key creates: not another identity's, and not
    // the platform's use of any other name.
    assert_eq!(
        generate(&mut admin, "globex/default", b"")
            .await
            .expect_err("not the platform")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        generate(&mut p, "globex/other", b"")
            .await
            .expect_err("not the default key")
            .code(),
        Code::NotFound
    );
    for k in ["globex/default", "globex/other"] {
        assert_eq!(
            get(&mut admin, k).await.expect_err("not created").code(),
            Code::NotFound,
            "{k}"
        );
    }

    // Many first uses at once make one key.
    let mut calls = Vec::new();
    for i in 0..8 {
        let mut c = b.clients_as(&platform).await;
        calls.push(tokio::spawn(async move {
            let aad = format!("item-{i}");
            let g = generate(&mut c, "initech/default", aad.as_bytes())
                .await
                .expect("concurrent first use");
            (g, aad, c)
        }));
    }
    for call in calls {
        let (g, aad, mut c) = call.await.expect("task");
        assert_eq!(g.key_version, 1);
        let u = unwrap(&mut c, "", &g.wrapped_key, aad.as_bytes())
            .await
            .expect("unwrap");
        assert_eq!(u.plaintext, g.plaintext);
    }
    let made: Vec<_> = creation_records(&env, "initech/default")
        .into_iter()
        .filter(|(o, v)| o == "OK" && *v == Some(1))
        .collect();
    assert_eq!(made.len(), 1, "one key made by eight first uses");
    assert_eq!(
        get(&mut admin, "initech/default")
            .await
            .expect("made")
            .versions
            .len(),
        1
    );
    b.stop().await;
}

/// The platform's first use may be an `Encrypt`: the key it creates allows payload
/// encryption as well as wrapping, whichever came first.
#[tokio::test]
async fn the_platforms_first_encrypt_creates_a_default_key_that_encrypts_and_wraps() {
    crate::require_aes!();
    let env = platform_env(86_400_000);
    let platform = env
        .pki
        .ca
        .issue_spiffe_client("platform", PLATFORM)
        .expect("cert");
    let b = env.start().await;
    let mut p = b.clients_as(&platform).await;
    let e = p
        .broker
        .encrypt(pb::EncryptRequest {
            key: "acme/default".into(),
            plaintext: b"row 17".to_vec(),
            aad: b"table=t".to_vec(),
            ..Default::default()
        })
        .await
        .expect("the first encrypt creates the key and encrypts")
        .into_inner();
    assert_eq!((e.key.as_str(), e.key_version), ("acme/default", 1));
    let d = p
        .broker
        .decrypt(pb::DecryptRequest {
            key: "acme/default".into(),
            ciphertext: e.ciphertext.clone(),
            aad: b"table=t".to_vec(),
            ..Default::default()
        })
        .await
        .expect("decrypt")
        .into_inner();
    assert_eq!(d.plaintext, b"row 17");
    let mut ops = get(&mut p, "acme/default")
        .await
        .expect("made")
        .attributes
        .and_then(|a| a.operations)
        .expect("operations")
        .operations;
    ops.sort_unstable();
    let want = [
        pb::KeyOperation::Wrap,
        pb::KeyOperation::Unwrap,
        pb::KeyOperation::GenerateDataKey,
        pb::KeyOperation::Rewrap,
        pb::KeyOperation::Encrypt,
        pb::KeyOperation::Decrypt,
    ];
    assert_eq!(
        ops,
        want.map(i32::from),
        "every operation its first use may be"
    );
    // The same key wraps too.
    let g = generate(&mut p, "acme/default", b"blob")
        .await
        .expect("wrap");
    let u = unwrap(&mut p, "", &g.wrapped_key, b"blob")
        .await
        .expect("unwrap");
    assert_eq!(u.plaintext, g.plaintext);
    assert_eq!(
        creation_records(&env, "acme/default"),
        vec![("INTENT".to_string(), None), ("OK".to_string(), Some(1))]
    );
    b.stop().await;
}

#[tokio::test]
async fn platform_managed_keys_rotate_by_the_default_policy() {
    crate::require_aes!();
    let env = platform_env(1500);
    let platform = env
        .pki
        .ca
        .issue_spiffe_client("platform", PLATFORM)
        .expect("cert");
    let b = env.start().await;
    let mut p = b.clients_as(&platform).await;
    let first = generate(&mut p, "acme/default", b"")
        .await
        .expect("first use");
    assert_eq!(first.key_version, 1);
    let rotated = poll_until(
        "the default policy rotates the key",
        Duration::from_secs(60),
        || {
            let mut p = p.clone();
            async move {
                let k = get(&mut p, "acme/default").await.ok()?;
                (k.current_version >= 2).then_some(k)
            }
        },
    )
    .await;
    let g = generate(&mut p, "acme/default", b"")
        .await
        .expect("wrap after rotation");
    assert!(
        g.key_version >= rotated.current_version,
        "new wraps use the new version"
    );
    let u = unwrap(&mut p, "", &first.wrapped_key, b"")
        .await
        .expect("old envelopes still unwrap");
    assert_eq!(u.plaintext, first.plaintext);
    b.stop().await;
}

/// The move between the three models, as `docs/src/models.md` walks through it with the CLI:
/// a tenant's data starts under its platform-managed key; the tenant brings its own key; the
/// platform moves the stored envelopes to it (`key rewrap-all --to`), then disables and
/// deletes its key: whatever was not moved is unreadable, what was moved reads as before, and
/// the tenant's own key now decides. Then the tenant moves to its own hardware: a second
/// broker on its own token (the customer's, with the EKM door), reached as an external key;
/// the envelopes move there, the customer-managed key is purged, and the customer's kill
/// switch decides. Last, the platform's key reaches its scheduled purge: what was never moved
/// off it is gone for good.
#[tokio::test]
async fn a_tenant_moves_from_platform_managed_to_its_own_key_to_its_own_hardware() {
    crate::require_aes!();
    // The customer's broker, next to its own HSM.
    let hyok_env = crate::ekm::ekm_env();
    let hyok = hyok_env.start().await;
    let mut hc = hyok.clients_as(&hyok_env.pki.client).await;
    let remote = crate::external::REMOTE_KEY;
    create(
        &mut hc,
        &format!("contoso/{remote}"),
        pb::KeyType::Aes256,
        pb::Algorithm::AesKeyWrapPad,
    )
    .await;
    let door = hyok.ekm_addr.expect("the customer's EKM door");

    let env = platform_env(86_400_000);
    let proxy = crate::external::proxy_section(&hyok_env, "acme-hsm", door, crate::ekm::MHSM_CN);
    env.edit_config(|t| format!("{t}\n{proxy}"));
    let issue = |name: &str, id: &str| env.pki.ca.issue_spiffe_client(name, id).expect("cert");
    let (platform, acme_admin) = (issue("platform", PLATFORM), issue("acme-admin", ACME_ADMIN));
    let b = env.start().await;
    let mut service = b.clients_as(&platform).await;

    // 1. Platform-managed: the service stores blobs, their DEKs under acme/default, which
    //    nobody created. Without AAD: the last move is to an EKM proxy's key, whose
    //    algorithms (A256KW/A256KWP, RSA-OAEP) bind none, and a rewrap does not drop a binding.
    let mut stored = Vec::new();
    for _ in 0..6 {
        let aad = String::new();
        let g = generate(&mut service, "acme/default", aad.as_bytes())
            .await
            .expect("generate");
        stored.push((g.plaintext, g.wrapped_key, aad));
    }
    // 2. Customer-managed: the tenant makes its own key...
    let (ok, out, err) = cli_as(&env, &b, &acme_admin, &["key", "create", "acme/cmk"]).await;
    assert!(ok, "{out}{err}");
    // ...and the platform moves its envelopes to it; the last blob stands for data it did
    // not move. The DEKs never leave the broker and the blobs are not re-encrypted.
    let moved = rewrap_all_to(
        &env,
        &b,
        &platform,
        "acme/cmk",
        stored[..5]
            .iter()
            .map(|(_, w, aad)| (w.clone(), aad.clone())),
    )
    .await;
    assert_eq!(moved.len(), 5);
    for (m, (dek, _, aad)) in moved.iter().zip(&stored) {
        let u = unwrap(&mut service, "", m, aad.as_bytes())
            .await
            .expect("moved");
        assert_eq!((&u.plaintext, u.key.as_str()), (dek, "acme/cmk"));
    }
    // The platform retires its key: disabled, then deleted (purge protection keeps its
    // material until the scheduled purge; an early purge is refused).
    let (ok, out, err) = cli_as(
        &env,
        &b,
        &platform,
        &["key", "update", "acme/default", "--disable"],
    )
    .await;
    assert!(ok, "{out}{err}");
    let (unmoved_dek, unmoved, unmoved_aad) = &stored[5];
    let e = unwrap(&mut service, "", unmoved, unmoved_aad.as_bytes())
        .await
        .expect_err("disabled");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let (ok, out, err) = cli_as(&env, &b, &platform, &["key", "delete", "acme/default"]).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli_as(&env, &b, &platform, &["key", "purge", "acme/default"]).await;
    assert!(!ok && err.contains("purge-protected"), "{out}{err}");
    let e = unwrap(&mut service, "", unmoved, unmoved_aad.as_bytes())
        .await
        .expect_err("deleted");
    assert_ne!(e.code(), Code::Ok);
    assert!(!format!("{e:?}").contains(&hex(unmoved_dek)));
    // What was moved reads as before, and the tenant's key decides now: disabling it cuts the
    // service off, enabling it lets the service in again.
    let (ok, out, err) = cli_as(
        &env,
        &b,
        &acme_admin,
        &["key", "update", "acme/cmk", "--disable"],
    )
    .await;
    assert!(ok, "{out}{err}");
    let e = unwrap(&mut service, "", &moved[0], stored[0].2.as_bytes())
        .await
        .expect_err("cut off");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let (ok, out, err) = cli_as(
        &env,
        &b,
        &acme_admin,
        &["key", "update", "acme/cmk", "--enable"],
    )
    .await;
    assert!(ok, "{out}{err}");
    let u = unwrap(&mut service, "", &moved[0], stored[0].2.as_bytes())
        .await
        .expect("back");
    assert_eq!(u.plaintext, stored[0].0);

    // 3. To the customer's own hardware: the tenant names a key of its own broker as an
    //    external key, and the platform moves the envelopes there, four of five (the last one
    //    stands for data it did not move).
    let (ok, out, err) = cli_as(
        &env,
        &b,
        &acme_admin,
        &[
            "key",
            "create",
            "acme/hyok",
            "--external",
            "acme-hsm",
            "--remote-key",
            remote,
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let at_home = rewrap_all_to(
        &env,
        &b,
        &platform,
        "acme/hyok",
        moved[..4]
            .iter()
            .zip(&stored)
            .map(|(m, (_, _, aad))| (m.clone(), aad.clone())),
    )
    .await;
    assert_eq!(at_home.len(), 4);
    for (h, (dek, _, aad)) in at_home.iter().zip(&stored) {
        let u = unwrap(&mut service, "", h, aad.as_bytes())
            .await
            .expect("at home");
        assert_eq!((&u.plaintext, u.key.as_str()), (dek, "acme/hyok"));
    }
    // The tenant retires its customer-managed key for good: what was not moved is gone.
    for args in [["key", "delete", "acme/cmk"], ["key", "purge", "acme/cmk"]] {
        let (ok, out, err) = cli_as(&env, &b, &acme_admin, &args).await;
        assert!(ok, "{args:?}: {out}{err}");
    }
    // (An envelope of a purged version is the one unauthentic error, as any envelope of a
    // version the broker does not hold.)
    assert_unauthentic(
        unwrap(&mut service, "", &moved[4], stored[4].2.as_bytes()).await,
        "an envelope of the purged key",
    );
    // And the customer's kill switch, on its own broker, cuts the provider off from the rest
    // at once; reconnecting lets it in again.
    hc.hyok
        .disconnect(pb::HyokSwitchRequest {
            reason: "walk-through".into(),
        })
        .await
        .expect("disconnect");
    let e = unwrap(&mut service, "", &at_home[0], stored[0].2.as_bytes())
        .await
        .expect_err("cut off");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    hc.hyok
        .reconnect(pb::HyokSwitchRequest {
            reason: "walk-through".into(),
        })
        .await
        .expect("reconnect");
    let u = unwrap(&mut service, "", &at_home[0], stored[0].2.as_bytes())
        .await
        .expect("back home");
    assert_eq!(u.plaintext, stored[0].0);
    drop(service);
    b.stop().await;

    // 4. The platform's key reaches its scheduled purge (retention is at least 7 days: the
    //    test moves its date into the past in the store) and the maintenance task purges it:
    //    the envelope that was never moved is unreadable for good, the moved ones read on.
    {
        let db = rusqlite::Connection::open(env.dir.path().join("keybroker.db")).expect("db");
        let n = db
            .execute(
                "UPDATE keys SET purge_at_ms = 1 WHERE tenant = 'acme' AND name = 'default'",
                [],
            )
            .expect("update");
        assert_eq!(n, 1, "acme/default is deleted, awaiting its purge");
    }
    let b = env.start().await;
    let admin = b.clients_as(&env.pki.client).await;
    poll_until("the scheduled purge", Duration::from_secs(60), || {
        let mut mgmt = admin.mgmt.clone();
        async move {
            let r = mgmt
                .get_deleted_key(pb::GetDeletedKeyRequest {
                    key: "acme/default".into(),
                })
                .await;
            (r.map(drop).map_err(|e| e.code()) == Err(Code::NotFound)).then_some(())
        }
    })
    .await;
    let mut service = b.clients_as(&platform).await;
    assert_unauthentic(
        unwrap(&mut service, "", unmoved, unmoved_aad.as_bytes()).await,
        "an envelope of the purged platform key",
    );
    let u = unwrap(&mut service, "", &at_home[0], stored[0].2.as_bytes())
        .await
        .expect("moved envelopes read on");
    assert_eq!(u.plaintext, stored[0].0);
    b.stop().await;
    hyok.stop().await;
}

/// Runs `key rewrap-all --to` as `who` over `envelopes` (envelope, AAD): every line must move
/// (the JSON summary says so); returns the new envelopes, in order.
async fn rewrap_all_to(
    env: &Env,
    b: &Broker,
    who: &hsm_fixtures::pki::Issued,
    to: &str,
    envelopes: impl Iterator<Item = (Vec<u8>, String)>,
) -> Vec<Vec<u8>> {
    let dir = env.dir.path();
    let (inp, outp) = (
        dir.join(format!("to-{}.in", to.replace('/', "-"))),
        dir.join(format!("to-{}.out", to.replace('/', "-"))),
    );
    let lines: String = envelopes
        .map(|(e, aad)| format!("{}\t{aad}\n", B64.encode(e)))
        .collect();
    let total = lines.lines().count() as u64;
    std::fs::write(&inp, lines).expect("write envelopes");
    let (ok, out, err) = cli_as(
        env,
        b,
        who,
        &[
            "key",
            "rewrap-all",
            "--input",
            inp.to_str().expect("path"),
            "--output-file",
            outp.to_str().expect("path"),
            "--to",
            to,
            "-o",
            "json",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON summary");
    assert_eq!(
        (summary["rewrapped"].as_u64(), summary["failed"].as_u64()),
        (Some(total), Some(0)),
        "{summary}"
    );
    std::fs::read_to_string(&outp)
        .expect("moved envelopes")
        .lines()
        .map(|l| B64.decode(l).expect("base64"))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// With `aes-kwp` as the platform's algorithm (keys that wrap keys only), a first use the key
/// would refuse — an `Encrypt`, a wrap with AAD, a DEK of a bad length — is refused as the key
/// would refuse it (and audited), and makes no key; a first wrap the key serves then makes it.
#[tokio::test]
async fn a_first_encrypt_the_platform_algorithm_cannot_serve_makes_no_key() {
    crate::require_aes!();
    let env = Env::with(Options {
        policy: Some(
            platform_policy(86_400_000)
                .replace("[platform]\n", "[platform]\nalgorithm = \"aes-kwp\"\n"),
        ),
        ..Default::default()
    });
    let platform = env
        .pki
        .ca
        .issue_spiffe_client("platform", PLATFORM)
        .expect("cert");
    let b = env.start().await;
    let mut p = b.clients_as(&platform).await;
    let e = p
        .broker
        .encrypt(pb::EncryptRequest {
            key: "acme/default".into(),
            plaintext: b"row 17".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("aes-kwp keys encrypt no payloads");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("does not allow encrypt"),
        "{}",
        e.message()
    );
    let e = wrap(&mut p, "acme/default", &[1; 32], b"context")
        .await
        .expect_err("aes-kwp takes no AAD");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = wrap(&mut p, "acme/default", &[1; 7], b"")
        .await
        .expect_err("a 7-byte DEK");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = p
        .broker
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "acme/default".into(),
            aad: b"context".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("aes-kwp takes no AAD");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let missing = get(&mut p, "acme/default")
        .await
        .expect_err("no key was made");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    let audit = std::fs::read_to_string(env.audit_log()).expect("audit log");
    assert!(!audit.contains("CreatePlatformKey"), "{audit}");
    let refused = audit
        .lines()
        .filter(|l| l.contains("\"caller\":\"spiffe://keybroker.test/platform\""))
        .filter(|l| !l.contains("\"outcome\":\"OK\"") && !l.contains("\"op\":\"GetKey\""))
        .count();
    assert_eq!(refused, 4, "each refusal is audited: {audit}");
    // The first wrap makes it, an aes-kwp key.
    let g = generate(&mut p, "acme/default", b"")
        .await
        .expect("the first wrap makes the key");
    assert_eq!(g.key_version, 1);
    let k = get(&mut p, "acme/default").await.expect("made");
    assert_eq!(
        k.algorithm,
        i32::from(pb::Algorithm::AesKeyWrapPad),
        "{k:?}"
    );
}
