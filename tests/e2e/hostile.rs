//! Hostile bytes on the wire: malformed protobuf, invalid UTF-8, oversized messages and zero
//! deadlines get a clear refusal — never INTERNAL, never a crash — and change nothing.

use std::time::Duration;

use bytes::{Buf, BufMut};
use keybroker_proto::v1 as pb;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

use crate::common::*;

/// Sends and receives raw bytes, so the test can put anything on the wire.
#[derive(Default, Clone)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let v = src.chunk().to_vec();
        src.advance(v.len());
        Ok(Some(v))
    }
}

async fn raw_call(
    b: &Broker,
    env: &Env,
    path: &'static str,
    body: Vec<u8>,
    timeout: Option<Duration>,
) -> Result<Vec<u8>, Status> {
    let ch = keybroker::client::connect(&keybroker::client::ClientSettings {
        endpoint: b.endpoint(),
        ca: env.pki.ca.cert_path.clone(),
        cert: env.pki.client.cert_path.clone(),
        key: env.pki.client.key_path.clone(),
    })
    .await
    .expect("connect");
    let mut g = tonic::client::Grpc::new(ch).max_encoding_message_size(64 << 20);
    g.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(body);
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    g.unary(req, http::uri::PathAndQuery::from_static(path), Raw)
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn malformed_messages_are_invalid_argument_never_internal() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let wrap_path = "/keybroker.v1.KeyBroker/WrapKey";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "invalid UTF-8 in the key name",
            vec![0x0a, 0x02, 0xff, 0xfe, 0x12, 0x20]
                .into_iter()
                .chain([7u8; 32])
                .collect(),
        ),
        ("truncated length prefix", vec![0x12, 0x20, 1, 2, 3]),
        ("garbage", vec![0xff, 0xff, 0xff, 0xff, 0x0f]),
        ("wrong wire type for a string field", vec![0x08, 0x96, 0x01]),
        (
            "an over-long varint",
            vec![0x18; 1].into_iter().chain([0xff; 11]).collect(),
        ),
    ];
    for (what, body) in cases {
        let e = raw_call(&b, &env, wrap_path, body, None)
            .await
            .expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }
    // A well-formed message with unknown fields is fine (forward compatibility).
    let mut ok = vec![0x0a, 0x03, b't', b'/', b'k', 0x12, 0x20];
    ok.extend([7u8; 32]);
    ok.extend([0xf8, 0x07, 0x01]); // field 127, varint 1
    assert!(
        raw_call(&b, &env, wrap_path, ok, None).await.is_ok(),
        "unknown fields are ignored"
    );

    // Oversized: refused before it is decoded, with a clear status that is not INTERNAL.
    let mut big = vec![0x0a, 0x03, b't', b'/', b'k', 0x1a];
    let aad = vec![1u8; 2 << 20];
    let mut len = aad.len();
    while len >= 0x80 {
        big.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    big.push(len as u8);
    big.extend(aad);
    let e = raw_call(&b, &env, wrap_path, big, None)
        .await
        .expect_err("2 MiB request");
    assert!(
        matches!(
            e.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "oversized: {e:?}"
    );
    assert!(
        e.message().contains("too large") || e.message().contains("limit"),
        "{}",
        e.message()
    );

    // A deadline that has already passed: no work is done, the caller hears DEADLINE_EXCEEDED or
    // CANCELLED, never INTERNAL.
    let mut body = vec![0x0a, 0x03, b't', b'/', b'k', 0x12, 0x20];
    body.extend([9u8; 32]);
    let e = raw_call(&b, &env, wrap_path, body, Some(Duration::from_nanos(1)))
        .await
        .expect_err("zero deadline");
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "zero deadline: {e:?}"
    );

    // The broker is still healthy and nothing changed.
    let k = c
        .mgmt
        .get_key(pb::GetKeyRequest { key: "t/k".into() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(k.current_version, 1);
    drop(c);
    let log = b.stop().await;
    assert!(!log.contains("panicked"), "{log}");
    // Issue 18, item 9: the requests refused before they could be decoded (the five malformed
    // messages and the oversized one) are in the audit trail too, with the caller and the
    // status they got.
    let refused: Vec<serde_json::Value> = std::fs::read_to_string(env.audit_log())
        .expect("audit")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|r| r["op"] == "WrapKey" && r["outcome"] != "OK")
        .collect();
    assert!(refused.len() >= 6, "{refused:?}");
    for r in &refused {
        assert_eq!(r["caller"], hsm_fixtures::pki::TEST_CLIENT_ID, "{r}");
        assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
    }
}
