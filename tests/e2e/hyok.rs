//! The HYOK model: the provider's service identity may only wrap/unwrap/read within the
//! customer's policy, with an accepted justification, until the customer cuts it off.

use keybroker::client::Clients;
use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::common::*;

const PROVIDER: &str = "spiffe://provider.test/kms-proxy";
const ADMIN: &str = "spiffe://customer.test/admin";

fn policy() -> String {
    format!(
        r#"
[[binding]]
identity = "{ADMIN}"
roles = ["administrator", "crypto-user", "crypto-officer", "auditor"]
scope = "all"
[[binding]]
identity = "{PROVIDER}"
role = "service-encryption-user"
scope = "tenant:acme"

[hyok]
service_identities = ["spiffe://provider.test/*"]
default_accepted_reasons = ["CUSTOMER_INITIATED_ACCESS", "PROVIDER_INITIATED_SERVICE"]
[[hyok.key]]
keys = "acme/logs-*"
accepted_reasons = ["PROVIDER_INTERNAL_MAINTENANCE"]
"#
    )
}

fn ctx(reason: pb::JustificationReason) -> Option<pb::RequestContext> {
    Some(pb::RequestContext {
        request_id: "req-1".into(),
        correlation_id: "op-7".into(),
        justification: Some(pb::AccessJustification {
            reason: reason.into(),
            detail: "ticket 42".into(),
        }),
    })
}

async fn wrap_with(
    c: &mut Clients,
    key: &str,
    context: Option<pb::RequestContext>,
) -> Result<Vec<u8>, tonic::Status> {
    c.broker
        .wrap_key(pb::WrapKeyRequest {
            key: key.into(),
            plaintext: vec![3; 32],
            aad: vec![],
            context,
        })
        .await
        .map(|r| r.into_inner().wrapped_key)
}

async fn unwrap_with(
    c: &mut Clients,
    env: &[u8],
    context: Option<pb::RequestContext>,
) -> Result<Vec<u8>, tonic::Status> {
    c.broker
        .unwrap_key(pb::UnwrapKeyRequest {
            key: String::new(),
            aad: vec![],
            context,
            wrapped: Some(pb::unwrap_key_request::Wrapped::Envelope(env.to_vec())),
        })
        .await
        .map(|r| r.into_inner().plaintext)
}

#[tokio::test]
async fn service_identity_needs_an_accepted_justification_and_cannot_manage_keys() {
    crate::require_aes!();
    let env = Env::with(Options {
        policy: Some(policy()),
        ..Default::default()
    });
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
    let b = env.start().await;
    let mut a = b.clients_as(&admin).await;
    create(
        &mut a,
        "acme/db",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    create(
        &mut a,
        "acme/logs-1",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let mut p = b.clients_as(&provider).await;

    // Accepted reasons work, wrap and unwrap.
    let w = wrap_with(
        &mut p,
        "acme/db",
        ctx(pb::JustificationReason::CustomerInitiatedAccess),
    )
    .await
    .expect("wrap");
    let d = unwrap_with(
        &mut p,
        &w,
        ctx(pb::JustificationReason::ProviderInitiatedService),
    )
    .await
    .expect("unwrap");
    assert_eq!(d, vec![3; 32]);
    // No justification: refused, and the message says so.
    let e = wrap_with(&mut p, "acme/db", None)
        .await
        .expect_err("no justification");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("justification"), "{}", e.message());
    let e = unwrap_with(&mut p, &w, None)
        .await
        .expect_err("no justification");
    assert_eq!(e.code(), Code::PermissionDenied);
    // A reason the key does not accept: refused, naming the reason.
    let e = wrap_with(
        &mut p,
        "acme/db",
        ctx(pb::JustificationReason::ThirdPartyDataRequest),
    )
    .await
    .expect_err("refused reason");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("THIRD_PARTY_DATA_REQUEST"),
        "{}",
        e.message()
    );
    // Per-key rules: the logs key accepts maintenance only.
    assert!(
        wrap_with(
            &mut p,
            "acme/logs-1",
            ctx(pb::JustificationReason::ProviderInternalMaintenance)
        )
        .await
        .is_ok()
    );
    let e = wrap_with(
        &mut p,
        "acme/logs-1",
        ctx(pb::JustificationReason::CustomerInitiatedAccess),
    )
    .await
    .expect_err("per-key rule");
    assert!(
        e.message().contains("CUSTOMER_INITIATED_ACCESS"),
        "{}",
        e.message()
    );
    // The service identity cannot create, rotate or switch the kill switch.
    let e = p
        .mgmt
        .create_key(pb::CreateKeyRequest {
            key: "acme/x".into(),
            key_type: pb::KeyType::Aes256.into(),
            algorithm: 0,
            ..Default::default()
        })
        .await
        .expect_err("create");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = p
        .mgmt
        .rotate_key(pb::RotateKeyRequest {
            key: "acme/db".into(),
        })
        .await
        .expect_err("rotate");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = p
        .hyok
        .reconnect(pb::HyokSwitchRequest::default())
        .await
        .expect_err("switch");
    assert_eq!(e.code(), Code::PermissionDenied);
    // The customer's own admin needs no justification.
    assert!(wrap_with(&mut a, "acme/db", None).await.is_ok());
    drop((a, p));
    b.stop().await;

    // The justification, request id and correlation id are in the audit trail.
    let text = std::fs::read_to_string(env.audit_log()).expect("audit");
    let rec: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .find(|r| r["caller"] == PROVIDER && r["op"] == "WrapKey" && r["outcome"] == "OK")
        .expect("provider wrap audited");
    assert_eq!(rec["justification"], "CUSTOMER_INITIATED_ACCESS");
    assert_eq!(rec["justification_detail"], "ticket 42");
    assert_eq!(rec["request_id"], "req-1");
    assert_eq!(rec["correlation_id"], "op-7");
    assert_eq!(rec["key"], "acme/db");
    assert_eq!(rec["version"], 1);
}

#[tokio::test]
async fn the_kill_switch_cuts_the_service_off_at_once_and_survives_a_restart() {
    crate::require_aes!();
    let env = Env::with(Options {
        policy: Some(policy()),
        ..Default::default()
    });
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
    let b = env.start().await;
    let mut a = b.clients_as(&admin).await;
    create(
        &mut a,
        "acme/db",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let mut p = b.clients_as(&provider).await;
    let good = || ctx(pb::JustificationReason::CustomerInitiatedAccess);
    let w = wrap_with(&mut p, "acme/db", good())
        .await
        .expect("wrap before");

    let st = a
        .hyok
        .disconnect(pb::HyokSwitchRequest {
            reason: "incident 9".into(),
        })
        .await
        .expect("disconnect")
        .into_inner();
    assert!(!st.connected);
    assert_eq!(st.changed_by, ADMIN);
    // The very next request (same connection, same request cycle) is refused.
    for _ in 0..3 {
        let e = unwrap_with(&mut p, &w, good())
            .await
            .expect_err("unwrap after disconnect");
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(e.message().contains("disconnected"), "{}", e.message());
        let e = wrap_with(&mut p, "acme/db", good())
            .await
            .expect_err("wrap after disconnect");
        assert_eq!(e.code(), Code::PermissionDenied);
    }
    // The customer keeps access to its own data.
    assert_eq!(
        unwrap_with(&mut a, &w, None).await.expect("admin unwrap"),
        vec![3; 32]
    );
    drop((a, p));
    b.stop().await;

    // Still disconnected after a restart.
    let b = env.start().await;
    let mut a = b.clients_as(&admin).await;
    let mut p = b.clients_as(&provider).await;
    let st = a
        .hyok
        .get_state(pb::GetHyokStateRequest {})
        .await
        .expect("state")
        .into_inner();
    assert!(!st.connected);
    assert_eq!(st.reason, "incident 9");
    let e = unwrap_with(&mut p, &w, good())
        .await
        .expect_err("still cut off after restart");
    assert_eq!(e.code(), Code::PermissionDenied);
    // Reconnect: the service works again.
    let st = a
        .hyok
        .reconnect(pb::HyokSwitchRequest {
            reason: "resolved".into(),
        })
        .await
        .expect("reconnect")
        .into_inner();
    assert!(st.connected);
    assert_eq!(
        unwrap_with(&mut p, &w, good())
            .await
            .expect("unwrap after reconnect"),
        vec![3; 32]
    );
    drop((a, p));
    b.stop().await;
    let text = std::fs::read_to_string(env.audit_log()).expect("audit");
    assert!(
        text.contains("\"op\":\"HyokDisconnect\"") && text.contains("\"op\":\"HyokReconnect\"")
    );
}

/// Issue 18, item 2: the kill switch fails open. An identity the customer did not list as the
/// provider's service, with a role binding of its own, is not gated at all; and a gated one
/// still reads metadata and public keys while disconnected. Every identity that is not the
/// customer's is a provider identity, and the switch cuts off every operation it makes.
#[tokio::test]
async fn the_switch_cuts_off_every_operation_of_every_identity_that_is_not_the_customers() {
    crate::require_aes!();
    const PARTNER: &str = "spiffe://partner.test/batch-jobs";
    let env = Env::with(Options {
        policy: Some(format!(
            r#"
[[binding]]
identity = "{ADMIN}"
roles = ["administrator", "crypto-user", "crypto-officer", "auditor"]
scope = "all"
[[binding]]
identity = "{PROVIDER}"
role = "crypto-user"
scope = "tenant:acme"
[[binding]]
identity = "{PARTNER}"
role = "service-encryption-user"
scope = "tenant:acme"

[hyok]
service_identities = ["spiffe://provider.test/*"]
"#
        )),
        ..Default::default()
    });
    let cert = |name, id| env.pki.ca.issue_spiffe_client(name, id).expect("cert");
    let (admin, provider, partner) = (
        cert("admin", ADMIN),
        cert("provider", PROVIDER),
        cert("partner", PARTNER),
    );
    let b = env.start().await;
    let mut a = b.clients_as(&admin).await;
    create(
        &mut a,
        "acme/db",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    create(
        &mut a,
        "acme/rsa",
        pb::KeyType::Rsa2048,
        pb::Algorithm::Unspecified,
    )
    .await;
    let (mut p, mut q) = (b.clients_as(&provider).await, b.clients_as(&partner).await);
    let good = || ctx(pb::JustificationReason::CustomerInitiatedAccess);
    wrap_with(&mut q, "acme/db", good())
        .await
        .expect("the partner wraps while connected");

    a.hyok
        .disconnect(pb::HyokSwitchRequest {
            reason: "incident 12".into(),
        })
        .await
        .expect("disconnect");
    let cut_off = |r: Result<(), tonic::Status>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
        assert!(e.message().contains("disconnected"), "{what}: {e:?}");
    };
    cut_off(
        wrap_with(&mut q, "acme/db", good()).await.map(|_| ()),
        "the partner (not listed as the provider's service) wraps",
    );
    cut_off(
        p.broker
            .get_public_key(pb::GetPublicKeyRequest {
                key: "acme/rsa".into(),
                key_version: 0,
            })
            .await
            .map(|_| ()),
        "the provider reads a public key",
    );
    cut_off(
        p.mgmt
            .get_key(pb::GetKeyRequest {
                key: "acme/db".into(),
            })
            .await
            .map(|_| ()),
        "the provider reads key metadata",
    );
    cut_off(
        p.mgmt
            .list_keys(pb::ListKeysRequest {
                tenant: "acme".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "the provider lists keys",
    );
    cut_off(
        p.mgmt
            .rotate_key(pb::RotateKeyRequest {
                key: "acme/db".into(),
            })
            .await
            .map(|_| ()),
        "the provider rotates a key",
    );
    // The customer's own identities keep working.
    a.mgmt
        .get_key(pb::GetKeyRequest {
            key: "acme/db".into(),
        })
        .await
        .expect("the customer reads its key");
    drop((a, p, q));
    b.stop().await;
}

/// Issue 18, item 2: a missing switch state meant "connected", and nothing authenticated a
/// stored one. Deleting the row, or writing one that says "connected", must not reconnect the
/// provider: the broker stays disconnected until the customer reconnects through the API.
#[tokio::test]
async fn a_missing_or_forged_switch_state_does_not_reconnect_the_provider() {
    crate::require_aes!();
    let env = Env::with(Options {
        policy: Some(policy()),
        ..Default::default()
    });
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
    let good = || ctx(pb::JustificationReason::CustomerInitiatedAccess);
    let b = env.start().await;
    let mut a = b.clients_as(&admin).await;
    create(
        &mut a,
        "acme/db",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    a.hyok
        .disconnect(pb::HyokSwitchRequest {
            reason: "incident 13".into(),
        })
        .await
        .expect("disconnect");
    drop(a);
    b.stop().await;

    let db = env.dir.path().join("keybroker.db");
    let forged = r#"{"connected":true,"changed_at_ms":1,"changed_by":"spiffe://customer.test/admin","reason":"forged"}"#;
    for (what, tamper) in [
        (
            "the state row deleted",
            "DELETE FROM settings WHERE name = 'hyok.state'",
        ),
        ("a forged state that says connected", ""),
    ] {
        {
            let conn = rusqlite::Connection::open(&db).expect("open the store");
            if tamper.is_empty() {
                conn.execute(
                    "UPDATE settings SET value = ?1 WHERE name = 'hyok.state'",
                    [forged],
                )
                .expect("forge");
            } else {
                conn.execute(tamper, []).expect("tamper");
            }
        }
        let b = env.start().await;
        let mut p = b.clients_as(&provider).await;
        let e = wrap_with(&mut p, "acme/db", good()).await.expect_err(what);
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
        assert!(e.message().contains("disconnected"), "{what}: {e:?}");
        drop(p);
        b.stop().await;
    }

    // The customer reconnects through the API: the provider works again.
    let b = env.start().await;
    let mut a = b.clients_as(&admin).await;
    a.hyok
        .reconnect(pb::HyokSwitchRequest {
            reason: "checked".into(),
        })
        .await
        .expect("reconnect");
    let mut p = b.clients_as(&provider).await;
    wrap_with(&mut p, "acme/db", good())
        .await
        .expect("wrap after the customer reconnected");
    drop((a, p));
    b.stop().await;
}
