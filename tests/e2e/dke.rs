//! Double key encryption end to end (`docs/src/dke.md`): the same two brokers as `external.rs`,
//! each on its own token. The customer's broker serves the EKM proxy API (`[ekm]`); the
//! provider's broker has it as an `[[external_proxy]]`, an external key `acme/customer-kek`
//! referring to the customer's key, a local AES-256-GCM key `acme/provider-kek`, and a double
//! key `acme/dke` made of the two. Every DEK the double key wraps needs both to unwrap: the
//! provider's HSM and the customer's proxy.

use base64::Engine as _;
use keybroker::client::Clients;
use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::{
    common::*,
    ekm::{MHSM_CN, ekm_env},
    external::{REMOTE_KEY, proxy_section},
};

async fn create_double(
    c: &mut Clients,
    name: &str,
    local: &str,
    external: &str,
) -> Result<pb::Key, tonic::Status> {
    c.mgmt
        .create_key(pb::CreateKeyRequest {
            key: name.into(),
            double: Some(pb::DoubleKeyMembers {
                local: local.into(),
                external: external.into(),
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn set_enabled(c: &mut Clients, key: &str, enabled: bool) {
    c.mgmt
        .update_key(pb::UpdateKeyRequest {
            key: key.into(),
            attributes: Some(pb::KeyAttributes {
                enabled: Some(enabled),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("enable/disable {key}: {e:?}"));
}

/// A double envelope's header, local half and external half (the layout of
/// `docs/src/envelope.md`).
fn halves(env: &[u8]) -> (&[u8], &[u8], &[u8]) {
    assert_eq!((env[0], env[1], env[18]), (1, 8, 0), "a double envelope");
    let len = usize::from(u16::from_be_bytes([env[19], env[20]]));
    let (head, rest) = env.split_at(21);
    let (local, external) = rest.split_at(len);
    (head, local, external)
}

#[tokio::test]
async fn a_double_key_needs_both_the_providers_hsm_and_the_customers_proxy() {
    crate::require_aes!();
    // The customer's broker: its own token, its key, the EKM door.
    let customer_env = ekm_env();
    let customer = customer_env.start().await;
    let mut cc = customer.clients_as(&customer_env.pki.client).await;
    create(
        &mut cc,
        &format!("contoso/{REMOTE_KEY}"),
        pb::KeyType::Aes256,
        pb::Algorithm::AesKeyWrapPad,
    )
    .await;
    let door = customer.ekm_addr.expect("the customer's EKM door");

    // The provider's broker: its own token, the customer's door as a proxy.
    let provider_env = Env::with(Options::default());
    let section = proxy_section(&customer_env, "customer", door, MHSM_CN);
    provider_env.edit_config(|t| format!("{t}\n{section}"));
    let provider = provider_env.start().await;
    let mut c = provider.clients_as(&provider_env.pki.client).await;
    create(
        &mut c,
        "acme/provider-kek",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
    )
    .await;
    c.mgmt
        .create_key(pb::CreateKeyRequest {
            key: "acme/customer-kek".into(),
            external: Some(pb::ExternalKeyReference {
                proxy: "customer".into(),
                remote_key: REMOTE_KEY.into(),
            }),
            ..Default::default()
        })
        .await
        .expect("create the external key");

    // Creation refusals, each with a message that says what is wrong; nothing is created.
    let refusals = [
        (
            "acme/no-such",
            "acme/customer-kek",
            Code::FailedPrecondition,
            "acme/no-such does not exist",
        ),
        (
            "acme/provider-kek",
            "acme/provider-kek",
            Code::FailedPrecondition,
            "acme/provider-kek is not an external key",
        ),
        (
            "acme/customer-kek",
            "acme/customer-kek",
            Code::FailedPrecondition,
            "is an external key, not a key of this broker's HSM",
        ),
        (
            "other/provider-kek",
            "acme/customer-kek",
            Code::InvalidArgument,
            "the double key's own tenant",
        ),
    ];
    for (local, external, code, says) in refusals {
        let e = create_double(&mut c, "acme/ghost", local, external)
            .await
            .expect_err("refused");
        assert_eq!(e.code(), code, "{local} + {external}: {e:?}");
        assert!(e.message().contains(says), "{local} + {external}: {e:?}");
    }
    create(
        &mut c,
        "acme/kwp-kek",
        pb::KeyType::Aes256,
        pb::Algorithm::AesKeyWrapPad,
    )
    .await;
    let e = create_double(&mut c, "acme/ghost", "acme/kwp-kek", "acme/customer-kek")
        .await
        .expect_err("a KWP local member binds no AAD");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("AES-256-GCM"), "{e:?}");
    let e = c
        .mgmt
        .get_key(pb::GetKeyRequest {
            key: "acme/ghost".into(),
        })
        .await
        .expect_err("nothing was created");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // The double key, through gRPC; and another through the command line.
    let k = create_double(&mut c, "acme/dke", "acme/provider-kek", "acme/customer-kek")
        .await
        .expect("create the double key");
    let d = k.double.as_ref().expect("the members are shown");
    assert_eq!(
        (d.local.as_str(), d.external.as_str()),
        ("acme/provider-kek", "acme/customer-kek")
    );
    assert!(k.mechanism.contains("double"), "{k:?}");
    let (ok, out, err) = crate::cli::cli(
        &provider_env,
        &provider,
        &[
            "key",
            "create",
            "acme/dke-cli",
            "--double-local",
            "acme/provider-kek",
            "--double-external",
            "acme/customer-kek",
            "-o",
            "json",
        ],
    )
    .await;
    assert!(ok, "key create --double-local: {err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(j["double"]["external"], "acme/customer-kek", "{j}");

    // Round trips: generate, wrap (with AAD), unwrap.
    let g = c
        .broker
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "acme/dke".into(),
            length: 32,
            ..Default::default()
        })
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(g.plaintext.len(), 32);
    let u = unwrap(&mut c, "acme/dke", &g.wrapped_key, b"")
        .await
        .expect("unwrap the generated DEK");
    assert_eq!(u.plaintext, g.plaintext);
    let dek = random_dek(32);
    let w = wrap(&mut c, "acme/dke", &dek, b"row 7")
        .await
        .expect("wrap");
    let (_, local_half, external_half) = halves(&w.wrapped_key);
    assert_eq!(local_half[1], 1, "the local half is AES-256-GCM");
    assert_eq!(
        external_half[1], 2,
        "the external half is the remote's AES-KWP"
    );
    let u = unwrap(&mut c, "acme/dke", &w.wrapped_key, b"row 7")
        .await
        .expect("unwrap");
    assert_eq!(u.plaintext, dek);
    assert_unauthentic(
        unwrap(&mut c, "acme/dke", &w.wrapped_key, b"row 8").await,
        "another AAD",
    );
    let w2 = wrap(&mut c, "acme/dke", &dek, b"")
        .await
        .expect("wrap again");
    // The other double key's envelopes are not this one's.
    assert_unauthentic(
        unwrap(&mut c, "acme/dke-cli", &w2.wrapped_key, b"").await,
        "another double key",
    );

    // A batch mixing the double key, its external member and a local key: each on its path.
    let ext = wrap(&mut c, "acme/customer-kek", &dek, b"")
        .await
        .expect("external wrap");
    let item = |key: &str, env: &[u8]| pb::UnwrapKeyRequest {
        key: key.into(),
        wrapped: Some(pb::unwrap_key_request::Wrapped::Envelope(env.to_vec())),
        ..Default::default()
    };
    let batch = c
        .broker
        .batch_unwrap_key(pb::BatchUnwrapKeyRequest {
            items: vec![
                item("acme/dke", &g.wrapped_key),
                item("acme/customer-kek", &ext.wrapped_key),
                item("acme/dke", &w2.wrapped_key),
            ],
            ..Default::default()
        })
        .await
        .expect("batch unwrap")
        .into_inner();
    let got: Vec<Vec<u8>> = batch
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(pb::unwrap_key_result::Result::Ok(x)) => x.plaintext,
            other => panic!("batch item: {other:?}"),
        })
        .collect();
    assert_eq!(got, vec![g.plaintext.clone(), dek.clone(), dek.clone()]);
    // Its audit record names every remote call (the double items' external halves too).
    let records = provider_env.audit_records();
    let rec = records
        .iter()
        .rev()
        .find(|r| r["op"] == "BatchUnwrapKey")
        .expect("the batch's record");
    let calls = rec["detail"]["external"].as_array().expect("remote calls");
    assert_eq!(calls.len(), 3, "{rec}");
    // A rewrap into the double key moves a local envelope under both keys.
    let local = wrap(&mut c, "acme/provider-kek", &dek, b"")
        .await
        .expect("local wrap");
    let moved = c
        .broker
        .rewrap(pb::RewrapRequest {
            key: "acme/provider-kek".into(),
            envelope: local.wrapped_key.clone(),
            destination_key: "acme/dke".into(),
            ..Default::default()
        })
        .await
        .expect("rewrap into the double key")
        .into_inner();
    let u = unwrap(&mut c, "acme/dke", &moved.wrapped_key, b"")
        .await
        .expect("unwrap the moved envelope");
    assert_eq!(u.plaintext, dek);

    // Tampering: swapping the external halves of two envelopes, or flipping a bit of the local
    // half, is the one unauthentic error.
    let (head, l1, _) = halves(&w2.wrapped_key);
    let (_, _, x2) = halves(&g.wrapped_key);
    let swapped = [head, l1, x2].concat();
    assert_unauthentic(
        unwrap(&mut c, "acme/dke", &swapped, b"").await,
        "swapped external half",
    );
    let mut bad = w2.wrapped_key.clone();
    bad[21 + l1.len() - 1] ^= 1;
    assert_unauthentic(
        unwrap(&mut c, "acme/dke", &bad, b"").await,
        "tampered local half",
    );
    let mut bad = w2.wrapped_key.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_unauthentic(
        unwrap(&mut c, "acme/dke", &bad, b"").await,
        "tampered external half",
    );
    // A half alone is no envelope of the double key.
    assert_unauthentic(
        unwrap(&mut c, "acme/dke", l1, b"").await,
        "the local half alone",
    );

    // The provider disables its local member: the double key's unwraps fail, until enabled.
    set_enabled(&mut c, "acme/provider-kek", false).await;
    let e = unwrap(&mut c, "acme/dke", &w2.wrapped_key, b"")
        .await
        .expect_err("the local member is disabled");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("acme/provider-kek"), "{e:?}");
    set_enabled(&mut c, "acme/provider-kek", true).await;

    // The customer throws its kill switch: FAILED_PRECONDITION at once, naming the refusal;
    // wraps too. Reconnecting restores the same envelope.
    cc.hyok
        .disconnect(pb::HyokSwitchRequest {
            reason: "dke test".into(),
        })
        .await
        .expect("disconnect");
    let e = unwrap(&mut c, "acme/dke", &w2.wrapped_key, b"")
        .await
        .expect_err("unwrap while the customer is disconnected");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("ExternalKeyAccessDisconnected"),
        "{e:?}"
    );
    let refused = provider_env
        .audit_records()
        .into_iter()
        .rev()
        .find(|r| r["op"] == "UnwrapKey")
        .expect("the refused unwrap's record");
    assert_eq!(refused["outcome"], "FAILED_PRECONDITION", "{refused}");
    assert_eq!(
        refused["detail"]["external"][0]["key"], "acme/customer-kek",
        "{refused}"
    );
    let e = wrap(&mut c, "acme/dke", &dek, b"")
        .await
        .expect_err("wrap while disconnected");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    cc.hyok
        .reconnect(pb::HyokSwitchRequest {
            reason: "dke test".into(),
        })
        .await
        .expect("reconnect");
    let u = unwrap(&mut c, "acme/dke", &w2.wrapped_key, b"")
        .await
        .expect("unwrap after reconnecting");
    assert_eq!(u.plaintext, dek);

    // Operations that need key material here are refused, naming the key as double.
    let e = c
        .mgmt
        .rotate_key(pb::RotateKeyRequest {
            key: "acme/dke".into(),
        })
        .await
        .expect_err("a double key does not rotate");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("double key"), "{e:?}");

    // The customer's broker gone: UNAVAILABLE.
    let customer_log = customer.stop().await;
    let e = unwrap(&mut c, "acme/dke", &w2.wrapped_key, b"")
        .await
        .expect_err("the proxy is down");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // The double key survives a restart (its version has no HSM object).
    provider.stop().await;
    let provider = provider_env.start().await;
    let mut c = provider.clients_as(&provider_env.pki.client).await;
    let k = c
        .mgmt
        .get_key(pb::GetKeyRequest {
            key: "acme/dke".into(),
        })
        .await
        .expect("get after restart")
        .into_inner();
    assert_eq!(k.state, pb::KeyState::Enabled as i32);
    let log = provider.stop().await;

    // Nothing of a DEK in either side's logs or audit.
    let b64 = base64::engine::general_purpose::STANDARD;
    let texts = [
        log,
        customer_log,
        serde_json::to_string(&provider_env.audit_records()).expect("json"),
        serde_json::to_string(&customer_env.audit_records()).expect("json"),
    ];
    for secret in [&dek, &g.plaintext] {
        for form in [hex::encode(secret), b64.encode(secret)] {
            for t in &texts {
                assert!(!t.contains(&form), "a DEK in a log or audit record");
            }
        }
    }
}
