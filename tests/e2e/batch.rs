//! Batch RPCs behave like the single ones, item by item: one bad item fails alone, every item
//! is audited, and the results are in order.

use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::common::*;

fn item(key: &str, dek: Vec<u8>, aad: &[u8]) -> pb::WrapKeyRequest {
    pb::WrapKeyRequest {
        key: key.into(),
        plaintext: dek,
        aad: aad.to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn batches_give_one_result_per_item_and_one_bad_item_fails_alone() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/gcm",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    create(
        &mut c,
        "t/kwp",
        pb::KeyType::Aes256,
        pb::Algorithm::AesKeyWrapPad,
    )
    .await;
    create(
        &mut c,
        "t/rsa",
        pb::KeyType::Rsa2048,
        pb::Algorithm::Unspecified,
    )
    .await;
    let mut items = Vec::new();
    let mut deks = Vec::new();
    for i in 0..120usize {
        let key = ["t/gcm", "t/kwp", "t/rsa"][i % 3];
        let dek = random_dek(32);
        deks.push(dek.clone());
        items.push(item(key, dek, if key == "t/gcm" { b"ctx" } else { b"" }));
    }
    // Bad items in between: unknown key, bad size, AAD on a KWP key, a malformed name.
    items.insert(10, item("t/missing", random_dek(32), b""));
    items.insert(20, item("t/gcm", vec![1; 7], b""));
    items.insert(30, item("t/kwp", random_dek(32), b"aad"));
    items.insert(40, item("bad name", random_dek(32), b""));
    let r = c
        .broker
        .batch_wrap_key(pb::BatchWrapKeyRequest {
            items: items.clone(),
            context: None,
        })
        .await
        .expect("batch wrap")
        .into_inner();
    assert_eq!(r.results.len(), 124);
    let code = |res: &pb::WrapKeyResult| match &res.result {
        Some(pb::wrap_key_result::Result::Error(e)) => Some(e.code),
        _ => None,
    };
    assert_eq!(code(&r.results[10]), Some(Code::NotFound as i32));
    assert_eq!(code(&r.results[20]), Some(Code::InvalidArgument as i32));
    assert_eq!(code(&r.results[30]), Some(Code::InvalidArgument as i32));
    assert_eq!(code(&r.results[40]), Some(Code::InvalidArgument as i32));
    let mut envelopes = Vec::new();
    for (i, res) in r.results.iter().enumerate() {
        if [10, 20, 30, 40].contains(&i) {
            continue;
        }
        match &res.result {
            Some(pb::wrap_key_result::Result::Ok(w)) => {
                assert_eq!(w.key, items[i].key, "results are in order");
                envelopes.push(pb::UnwrapKeyRequest {
                    aad: items[i].aad.clone(),
                    wrapped: Some(pb::unwrap_key_request::Wrapped::Envelope(
                        w.wrapped_key.clone(),
                    )),
                    ..Default::default()
                });
            }
            other => panic!("item {i}: {other:?}"),
        }
    }
    // Unwrap them all in one batch, plus a tampered one and one with the wrong AAD.
    let mut bad = envelopes[0].clone();
    if let Some(pb::unwrap_key_request::Wrapped::Envelope(e)) = &mut bad.wrapped {
        let last = e.len() - 1;
        e[last] ^= 1;
    }
    envelopes.insert(5, bad);
    let mut wrong_aad = envelopes[0].clone();
    wrong_aad.aad = b"other".to_vec();
    envelopes.insert(6, wrong_aad);
    let u = c
        .broker
        .batch_unwrap_key(pb::BatchUnwrapKeyRequest {
            items: envelopes,
            context: None,
        })
        .await
        .expect("batch unwrap")
        .into_inner();
    assert_eq!(u.results.len(), 122);
    let mut got = Vec::new();
    for (i, res) in u.results.iter().enumerate() {
        match &res.result {
            Some(pb::unwrap_key_result::Result::Ok(x)) => got.push(x.plaintext.clone()),
            Some(pb::unwrap_key_result::Result::Error(e)) => {
                assert!(i == 5 || i == 6, "item {i}: {e:?}");
                assert_eq!(e.code, Code::InvalidArgument as i32);
                assert_eq!(e.message, keybroker::error::UNAUTHENTIC_MESSAGE);
            }
            None => panic!("item {i} without a result"),
        }
    }
    assert_eq!(got, deks, "every DEK back, in order");
    // Generate in a batch.
    let g = c
        .broker
        .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
            items: (0..50)
                .map(|i| pb::GenerateDataKeyRequest {
                    key: "t/gcm".into(),
                    length: if i == 7 { 3 } else { 32 },
                    ..Default::default()
                })
                .collect(),
            context: None,
        })
        .await
        .expect("batch generate")
        .into_inner();
    let mut ok = 0;
    for (i, res) in g.results.iter().enumerate() {
        match &res.result {
            Some(pb::generate_data_key_result::Result::Ok(x)) => {
                ok += 1;
                let back = unwrap(&mut c, "", &x.wrapped_key, b"")
                    .await
                    .expect("unwrap generated");
                assert_eq!(back.plaintext, x.plaintext);
            }
            Some(pb::generate_data_key_result::Result::Error(e)) => {
                assert_eq!(i, 7);
                assert_eq!(e.code, Code::InvalidArgument as i32);
            }
            None => panic!("no result"),
        }
    }
    assert_eq!(ok, 49);
    // Size limits.
    let e = c
        .broker
        .batch_wrap_key(pb::BatchWrapKeyRequest {
            items: vec![],
            context: None,
        })
        .await
        .expect_err("empty");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .broker
        .batch_wrap_key(pb::BatchWrapKeyRequest {
            items: vec![item("t/gcm", vec![1; 16], b""); 1001],
            context: None,
        })
        .await
        .expect_err("1001 items");
    assert_eq!(e.code(), Code::InvalidArgument);
    drop(c);
    b.stop().await;
    // Every item has its own audit record.
    let audit = std::fs::read_to_string(env.audit_log()).expect("audit");
    let items: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|r| {
            r["op"] == "BatchWrapKey" && r["request_id"].as_str().is_some_and(|id| id.contains('#'))
        })
        .collect();
    assert_eq!(items.len(), 124);
    assert_eq!(items.iter().filter(|r| r["outcome"] == "OK").count(), 120);
    assert_eq!(items[10]["outcome"], "NOT_FOUND");
    assert_eq!(items[10]["key"], "t/missing");
}
