//! External keys end to end (`docs/src/external-keys.md`): two real brokers, each on its own
//! token. The "HYOK" broker serves the EKM proxy API (`[ekm]`, as in `ekm.rs`); the "managed"
//! broker has it as an `[[external_proxy]]`, with a client certificate of the HYOK side's CA
//! and configured CN, and creates a key by reference to one of its keys. Data keys are wrapped
//! and unwrapped through the managed broker's gRPC; the HYOK side's kill switch cuts the
//! managed side's unwraps off at once, and reconnecting restores them: crypto-erasure by the
//! customer.

use std::time::{Duration, Instant};

use keybroker::client::Clients;
use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::{
    common::*,
    ekm::{MHSM_CN, ekm_env, mhsm_cert},
};

/// The HYOK broker's key the managed side refers to (`contoso/hyok-kek`, an `aes-kwp` key).
pub(crate) const REMOTE_KEY: &str = "hyok-kek";

/// `[[external_proxy]]` for the HYOK broker's door at `addr`, with a client certificate of the
/// HYOK side's CA with subject `cn`.
pub(crate) fn proxy_section(
    hyok: &Env,
    name: &str,
    addr: std::net::SocketAddr,
    cn: &str,
) -> String {
    let cert = mhsm_cert(hyok, &format!("client-{name}"), cn);
    format!(
        r#"
[[external_proxy]]
name = "{name}"
url = "https://localhost:{port}/contoso"
ca_file = "{ca}"
client_cert_file = "{cert}"
client_key_file = "{key}"
pool_name = "managed-test-pool"
"#,
        port = addr.port(),
        ca = hyok.pki.ca.cert_path.display(),
        cert = cert.cert_path.display(),
        key = cert.key_path.display(),
    )
}

async fn create_external(
    c: &mut Clients,
    name: &str,
    proxy: &str,
    remote_key: &str,
) -> Result<pb::Key, tonic::Status> {
    c.mgmt
        .create_key(pb::CreateKeyRequest {
            key: name.into(),
            external: Some(pb::ExternalKeyReference {
                proxy: proxy.into(),
                remote_key: remote_key.into(),
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn a_managed_broker_wraps_through_the_hyok_broker_and_the_kill_switch_erases() {
    crate::require_aes!();
    // The HYOK side: the customer's broker, its own token, the EKM door.
    let hyok_env = ekm_env();
    let hyok = hyok_env.start().await;
    let mut hc = hyok.clients_as(&hyok_env.pki.client).await;
    create(
        &mut hc,
        &format!("contoso/{REMOTE_KEY}"),
        pb::KeyType::Aes256,
        pb::Algorithm::AesKeyWrapPad,
    )
    .await;
    let door = hyok.ekm_addr.expect("the HYOK broker's EKM door");

    // The managed side: its own token; the HYOK door as a proxy, and the same door with a
    // client certificate whose CN the door does not accept.
    let managed_env = Env::with(Options {
        sections: "[metrics]\nlisten = \"127.0.0.1:0\"\n".into(),
        ..Default::default()
    });
    let sections = format!(
        "{}{}",
        proxy_section(&hyok_env, "hyok", door, MHSM_CN),
        proxy_section(&hyok_env, "wrong-cn", door, "intruder.example"),
    );
    managed_env.edit_config(|t| format!("{t}\n{sections}"));
    let report = managed_env
        .check_config()
        .expect("check-config accepts the proxies");
    assert_eq!(
        report["external_proxies"],
        serde_json::json!(["hyok", "wrong-cn"]),
        "{report}"
    );
    let managed = managed_env.start().await;
    let mut c = managed.clients_as(&managed_env.pki.client).await;

    // Created by reference: the remote's metadata decides type and algorithm.
    let k = create_external(&mut c, "m/customer-kek", "hyok", REMOTE_KEY)
        .await
        .expect("create an external key");
    assert_eq!(k.key_type, pb::KeyType::Aes256 as i32);
    assert_eq!(k.algorithm, pb::Algorithm::AesKeyWrapPad as i32);
    let x = k.external.as_ref().expect("the reference is shown");
    assert_eq!(
        (x.proxy.as_str(), x.remote_key.as_str()),
        ("hyok", REMOTE_KEY)
    );

    // The same from the command line.
    let (ok, out, err) = crate::cli::cli(
        &managed_env,
        &managed,
        &[
            "key",
            "create",
            "m/cli-kek",
            "--external",
            "hyok",
            "--remote-key",
            REMOTE_KEY,
            "-o",
            "json",
        ],
    )
    .await;
    assert!(ok, "key create --external: {err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(j["external"]["proxy"], "hyok", "{j}");
    assert_eq!(j["algorithm"], "aes-kwp", "{j}");

    // GenerateDataKey and WrapKey, then UnwrapKey: through the managed broker's gRPC.
    let g = c
        .broker
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "m/customer-kek".into(),
            length: 32,
            ..Default::default()
        })
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(g.plaintext.len(), 32);
    let u = unwrap(&mut c, "m/customer-kek", &g.wrapped_key, b"")
        .await
        .expect("unwrap the generated DEK");
    assert_eq!(u.plaintext, g.plaintext);
    let dek = random_dek(32);
    let w = wrap(&mut c, "m/customer-kek", &dek, b"")
        .await
        .expect("wrap");
    assert_eq!(w.key_version, 1);
    let u = unwrap(&mut c, "m/customer-kek", &w.wrapped_key, b"")
        .await
        .expect("unwrap");
    assert_eq!(u.plaintext, dek);
    // A batch mixing external and local keys runs through the same keyring code: each item
    // on its own path (the local key's envelope from the HSM, the external ones remotely).
    create(
        &mut c,
        "m/local",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
    )
    .await;
    let local = wrap(&mut c, "m/local", &dek, b"")
        .await
        .expect("local wrap");
    let item = |key: &str, env: &[u8]| pb::UnwrapKeyRequest {
        key: key.into(),
        wrapped: Some(pb::unwrap_key_request::Wrapped::Envelope(env.to_vec())),
        ..Default::default()
    };
    let batch = c
        .broker
        .batch_unwrap_key(pb::BatchUnwrapKeyRequest {
            items: vec![
                item("m/customer-kek", &g.wrapped_key),
                item("m/local", &local.wrapped_key),
                item("m/customer-kek", &w.wrapped_key),
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
    // A tampered envelope: the remote's 400 is the local unauthentic error.
    let mut bad = w.wrapped_key.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_unauthentic(
        unwrap(&mut c, "m/customer-kek", &bad, b"").await,
        "tampered",
    );
    // Not through the HSM: a rewrap and a rotation are refused, naming the key as external.
    let e = c
        .mgmt
        .rotate_key(pb::RotateKeyRequest {
            key: "m/customer-kek".into(),
        })
        .await
        .expect_err("an external key does not rotate here");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("external key"), "{e:?}");

    // A rewrap into it moves a local envelope to the customer's hardware (unwrapped here,
    // wrapped there): the data is not re-encrypted, and the new envelope reads as any other.
    let moved = c
        .broker
        .rewrap(pb::RewrapRequest {
            key: "m/local".into(),
            envelope: local.wrapped_key.clone(),
            destination_key: "m/customer-kek".into(),
            ..Default::default()
        })
        .await
        .expect("rewrap into the external key")
        .into_inner();
    assert_eq!(moved.key, "m/customer-kek");
    let u = unwrap(&mut c, "m/customer-kek", &moved.wrapped_key, b"")
        .await
        .expect("unwrap the moved envelope");
    assert_eq!(u.plaintext, dek);
    // Out of it, a rewrap needs the rewrap operation, which an external key does not allow
    // (and may not be given: at most wrap, unwrap and generate).
    let e = c
        .broker
        .rewrap(pb::RewrapRequest {
            key: "m/customer-kek".into(),
            envelope: moved.wrapped_key.clone(),
            destination_key: "m/local".into(),
            ..Default::default()
        })
        .await
        .expect_err("no rewrap out of an external key");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = c
        .mgmt
        .update_key(pb::UpdateKeyRequest {
            key: "m/customer-kek".into(),
            attributes: Some(pb::KeyAttributes {
                operations: Some(pb::KeyOperations {
                    operations: vec![
                        pb::KeyOperation::Wrap.into(),
                        pb::KeyOperation::Unwrap.into(),
                        pb::KeyOperation::Rewrap.into(),
                    ],
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("an external key does not allow rewrap");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // The HYOK side audited the wraps (EkmWrapKey) under the request ids the managed side's
    // audit records name as the remote's.
    let managed_records = managed_env.audit_records();
    let wrap_rec = managed_records
        .iter()
        .rev()
        .find(|r| r["op"] == "WrapKey" && r["outcome"] == "OK" && r["key"] == "m/customer-kek")
        .expect("the managed side's WrapKey record");
    let ext = &wrap_rec["detail"]["external"][0];
    assert_eq!(ext["proxy"], "hyok", "{wrap_rec}");
    assert_eq!(ext["remote_key"], REMOTE_KEY, "{wrap_rec}");
    let rid = ext["remote_request_id"]
        .as_str()
        .expect("a remote request id");
    assert!(
        hyok_env
            .audit_records()
            .iter()
            .any(|r| r["op"] == "EkmWrapKey" && r["outcome"] == "OK" && r["request_id"] == rid),
        "the HYOK audit shows the wrap {rid}"
    );

    // The customer disables the key on its side: refused as such (FAILED_PRECONDITION, the
    // remote's KeyDisabled), until it enables it again.
    for enabled in [false, true] {
        hc.mgmt
            .update_key(pb::UpdateKeyRequest {
                key: format!("contoso/{REMOTE_KEY}"),
                attributes: Some(pb::KeyAttributes {
                    enabled: Some(enabled),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("enable/disable on the HYOK side");
        let r = unwrap(&mut c, "m/customer-kek", &w.wrapped_key, b"").await;
        if enabled {
            assert_eq!(r.expect("unwrap once enabled again").plaintext, dek);
        } else {
            let e = r.expect_err("unwrap while the remote key is disabled");
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(e.message().contains("KeyDisabled"), "{e:?}");
        }
    }

    // The customer throws the kill switch: the managed side's unwraps fail at once, with
    // FAILED_PRECONDITION naming the proxy and the remote's refusal (not a timeout).
    hc.hyok
        .disconnect(pb::HyokSwitchRequest {
            reason: "external test".into(),
        })
        .await
        .expect("disconnect");
    let e = unwrap(&mut c, "m/customer-kek", &w.wrapped_key, b"")
        .await
        .expect_err("unwrap while disconnected");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("hyok") && e.message().contains("ExternalKeyAccessDisconnected"),
        "{e:?}"
    );
    // The managed side's record says which proxy refused.
    let refused = managed_env
        .audit_records()
        .into_iter()
        .rev()
        .find(|r| r["op"] == "UnwrapKey")
        .expect("the refused unwrap's record");
    assert_eq!(refused["outcome"], "FAILED_PRECONDITION", "{refused}");
    assert_eq!(
        refused["detail"]["external"][0]["proxy"], "hyok",
        "{refused}"
    );
    // And its metrics count the proxy's refusals apart from its successes.
    let (status, page) = managed.http_get("/metrics").await;
    assert_eq!(status, 200);
    for series in [
        r#"keybroker_external_calls_total{proxy="hyok",operation="unwrapkey",grpc_code="FailedPrecondition"}"#,
        r#"keybroker_external_calls_total{proxy="hyok",operation="wrapkey",grpc_code="OK"}"#,
    ] {
        assert!(page.contains(series), "{series} in:\n{page}");
    }
    let e = wrap(&mut c, "m/customer-kek", &dek, b"")
        .await
        .expect_err("wrap while disconnected");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // Reconnecting restores the unwrap of the same envelope.
    hc.hyok
        .reconnect(pb::HyokSwitchRequest {
            reason: "external test".into(),
        })
        .await
        .expect("reconnect");
    let u = unwrap(&mut c, "m/customer-kek", &w.wrapped_key, b"")
        .await
        .expect("unwrap after reconnecting");
    assert_eq!(u.plaintext, dek);

    // A remote key that does not exist: a clear error, nothing created.
    let e = create_external(&mut c, "m/ghost", "hyok", "no-such-key")
        .await
        .expect_err("no such remote key");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("remote key not found"), "{e:?}");
    // A proxy that is not configured.
    let e = create_external(&mut c, "m/ghost", "nowhere", REMOTE_KEY)
        .await
        .expect_err("no such proxy");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // A client certificate the door does not accept (wrong CN): refused.
    let e = create_external(&mut c, "m/ghost", "wrong-cn", REMOTE_KEY)
        .await
        .expect_err("wrong client CN");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("wrong-cn"), "{e:?}");
    let e = c
        .mgmt
        .get_key(pb::GetKeyRequest {
            key: "m/ghost".into(),
        })
        .await
        .expect_err("nothing was created");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // The HYOK broker gone: UNAVAILABLE, within the call's budget (generous bound: no timing
    // assertion beyond "it returns").
    hyok.stop().await;
    let started = Instant::now();
    let e = unwrap(&mut c, "m/customer-kek", &w.wrapped_key, b"")
        .await
        .expect_err("the proxy is down");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("hyok"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The key itself is still there (metadata is local).
    let k = c
        .mgmt
        .get_key(pb::GetKeyRequest {
            key: "m/customer-kek".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(k.external.is_some());

    // And it survives a restart of the managed broker (its versions have no HSM object to
    // attach: start-up does not quarantine it).
    managed.stop().await;
    let managed = managed_env.start().await;
    let mut c = managed.clients_as(&managed_env.pki.client).await;
    let k = c
        .mgmt
        .get_key(pb::GetKeyRequest {
            key: "m/customer-kek".into(),
        })
        .await
        .expect("get after restart")
        .into_inner();
    assert_eq!(k.state, pb::KeyState::Enabled as i32);
    // Deleting and purging it destroys nothing in this HSM (there is nothing of it here).
    c.mgmt
        .delete_key(pb::DeleteKeyRequest {
            key: "m/customer-kek".into(),
        })
        .await
        .expect("delete");
    let r = c
        .mgmt
        .purge_key(pb::PurgeKeyRequest {
            key: "m/customer-kek".into(),
        })
        .await
        .expect("purge")
        .into_inner();
    assert_eq!((r.versions, r.objects_destroyed), (vec![1], 0));
    managed.stop().await;
}
