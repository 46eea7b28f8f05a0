//! Health (`grpc.health.v1`, driven by a real HSM probe), server reflection, the Prometheus
//! metrics listener, and request ids in the log.

use keybroker::client::connect;
use keybroker_proto::v1 as pb;
use tonic::{Code, metadata::MetadataValue};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::common::*;

fn metrics_env(rust_log: Option<&str>) -> Env {
    Env::with(Options {
        sections: "[metrics]\nlisten = \"127.0.0.1:0\"\n".into(),
        rust_log: rust_log.map(str::to_string),
        ..Options::default()
    })
}

#[tokio::test]
async fn health_is_serving_for_every_service_with_a_working_hsm() {
    let env = Env::new();
    let b = env.start().await;
    let ch = connect(&b.settings_as(&env.pki.client))
        .await
        .expect("connect");
    let mut h = HealthClient::new(ch);
    for service in [
        "",
        "keybroker.v1.KeyBroker",
        "keybroker.v1.KeyManagement",
        "keybroker.v1.Audit",
        "keybroker.v1.Hyok",
    ] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{service:?}: {e:?}"))
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let e = h
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(e.code(), Code::NotFound);
    // Health needs mutual TLS like everything else, but not the access list: a certificate from
    // the right CA whose identity may not call the API may still ask how the broker is.
    let ch = connect(&b.settings_as(&env.pki.stranger))
        .await
        .expect("connect");
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health for any verified client")
        .into_inner();
    assert_eq!(r.status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn reflection_lists_the_services_and_describes_them() {
    let env = Env::new();
    let b = env.start().await;
    let ch = connect(&b.settings_as(&env.pki.client))
        .await
        .expect("connect");
    let mut r = ServerReflectionClient::new(ch);
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let mut replies = r
        .server_reflection_info(tokio_stream::iter([
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "keybroker.v1.KeyBroker".into(),
            )),
        ]))
        .await
        .expect("reflection")
        .into_inner();
    let first = replies.message().await.expect("reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list: {first:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "keybroker.v1.Audit",
            "keybroker.v1.Hyok",
            "keybroker.v1.KeyBroker",
            "keybroker.v1.KeyManagement",
        ]
    );
    let second = replies
        .message()
        .await
        .expect("reply")
        .expect("two replies");
    let Some(MessageResponse::FileDescriptorResponse(fd)) = second.message_response else {
        panic!("expected a file descriptor: {second:?}");
    };
    // The v1alpha service (what older grpcurl releases ask) answers too.
    let ch = connect(&b.settings_as(&env.pki.client))
        .await
        .expect("connect");
    use tonic_reflection::pb::v1alpha as alpha;
    let mut replies = alpha::server_reflection_client::ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter([alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        }]))
        .await
        .expect("v1alpha reflection")
        .into_inner();
    let reply = replies.message().await.expect("reply").expect("one reply");
    let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("expected a service list: {reply:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "keybroker.v1.KeyBroker")
    );

    let file = &fd.file_descriptor_proto[0];
    let has = |needle: &[u8]| file.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"keybroker/v1/keybroker.proto") && has(b"KeyBroker") && has(b"UnwrapKey"));
}

/// The value of one series (the exact line prefix, labels included) in OpenMetrics text.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[track_caller]
fn assert_series(text: &str, series: &str, expected: f64) {
    assert_eq!(value(text, series), Some(expected), "{series} in:\n{text}");
}

#[tokio::test]
async fn metrics_expose_the_listed_series_and_move_with_requests() {
    crate::require_aes!();
    let env = metrics_env(None);
    let b = env.start().await;
    let (code, before) = b.http_get("/metrics").await;
    assert_eq!(code, 200);
    assert_series(&before, "keybroker_keys", 0.0);
    assert_series(&before, "keybroker_key_versions", 0.0);
    assert_series(&before, "keybroker_hsm_sessions", 4.0);
    assert_series(&before, "keybroker_hsm_up", 1.0);
    for series in [
        "keybroker_hsm_sessions_in_use",
        "keybroker_hsm_session_waiters",
    ] {
        let v = value(&before, series).unwrap_or_else(|| panic!("{series} missing:\n{before}"));
        assert!((0.0..=4.0).contains(&v), "{series} = {v}");
    }
    // The start-up probe was a real HSM call, timed like every other.
    let probes = value(
        &before,
        r#"keybroker_hsm_call_duration_seconds_count{operation="health_probe"}"#,
    )
    .expect("health probe timed");
    assert!(probes >= 1.0);
    assert_eq!(
        value(
            &before,
            r#"grpc_server_handled_total{grpc_service="keybroker.v1.KeyBroker",grpc_method="WrapKey",grpc_code="OK"}"#
        ),
        None
    );

    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "m/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let mut last = Vec::new();
    for _ in 0..3 {
        last = wrap(&mut c, "m/k", &random_dek(32), b"")
            .await
            .expect("wrap")
            .wrapped_key;
    }
    last[30] ^= 1; // in the GCM ciphertext: reaches the HSM, fails its tag
    assert_unauthentic(unwrap(&mut c, "", &last, b"").await, "flipped");
    let e = unwrap(&mut c, "", b"garbage", b"")
        .await
        .expect_err("garbage");
    assert_eq!(e.code(), Code::InvalidArgument);
    c.mgmt
        .rotate_key(pb::RotateKeyRequest { key: "m/k".into() })
        .await
        .expect("rotate");
    let e = c
        .mgmt
        .get_key(pb::GetKeyRequest {
            key: "m/none".into(),
        })
        .await
        .expect_err("missing");
    assert_eq!(e.code(), Code::NotFound);

    let (_, after) = b.http_get("/metrics").await;
    let broker = r#"grpc_service="keybroker.v1.KeyBroker""#;
    let mgmt = r#"grpc_service="keybroker.v1.KeyManagement""#;
    assert_series(
        &after,
        &format!(r#"grpc_server_handled_total{{{broker},grpc_method="WrapKey",grpc_code="OK"}}"#),
        3.0,
    );
    assert_series(
        &after,
        &format!(
            r#"grpc_server_handled_total{{{broker},grpc_method="UnwrapKey",grpc_code="InvalidArgument"}}"#
        ),
        2.0,
    );
    assert_series(
        &after,
        &format!(r#"grpc_server_handled_total{{{mgmt},grpc_method="CreateKey",grpc_code="OK"}}"#),
        1.0,
    );
    assert_series(
        &after,
        &format!(r#"grpc_server_handled_total{{{mgmt},grpc_method="RotateKey",grpc_code="OK"}}"#),
        1.0,
    );
    assert_series(
        &after,
        &format!(
            r#"grpc_server_handled_total{{{mgmt},grpc_method="GetKey",grpc_code="NotFound"}}"#
        ),
        1.0,
    );
    assert_series(
        &after,
        &format!(r#"grpc_server_handling_seconds_count{{{broker},grpc_method="WrapKey"}}"#),
        3.0,
    );
    assert_series(
        &after,
        &format!(r#"grpc_server_handling_seconds_count{{{broker},grpc_method="UnwrapKey"}}"#),
        2.0,
    );
    // HSM operations: each create/rotate generates a KEK and wraps and unwraps its canary.
    assert_series(
        &after,
        r#"keybroker_hsm_call_duration_seconds_count{operation="generate_kek"}"#,
        2.0,
    );
    assert_series(
        &after,
        r#"keybroker_hsm_call_duration_seconds_count{operation="wrap"}"#,
        5.0,
    );
    assert_series(
        &after,
        r#"keybroker_hsm_call_duration_seconds_count{operation="unwrap"}"#,
        3.0,
    );
    assert_series(
        &after,
        r#"keybroker_hsm_call_errors_total{operation="unwrap",fault="data_invalid"}"#,
        1.0,
    );
    assert_series(&after, "keybroker_keys", 1.0);
    assert_series(&after, "keybroker_key_versions", 2.0);
    assert!(after.contains("# TYPE grpc_server_handling_seconds histogram"));
    assert!(
        after.contains(r#"grpc_server_handling_seconds_bucket{le="+Inf","#)
            || after.contains(r#"le="+Inf"}"#)
    );
    assert!(after.trim_end().ends_with("# EOF"));

    let (code, body) = b.http_get("/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, _) = b.http_get("/nothing-here").await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn the_request_id_is_logged_and_echoed_or_generated() {
    crate::require_aes!();
    let env = Env::with(Options {
        rust_log: Some("info,cryptoki=off".into()),
        ..Options::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let call = |id: Option<&'static str>| {
        let mut req = tonic::Request::new(pb::UnwrapKeyRequest {
            wrapped: Some(pb::unwrap_key_request::Wrapped::Envelope(
                b"garbage".to_vec(),
            )),
            ..Default::default()
        });
        if let Some(id) = id {
            req.metadata_mut()
                .insert("x-request-id", MetadataValue::from_static(id));
        }
        req
    };
    let echoed = |s: &tonic::Status| {
        s.metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .expect("x-request-id in the reply")
    };
    let e = c
        .broker
        .unwrap_key(call(Some("e2e-req-42")))
        .await
        .expect_err("garbage");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(echoed(&e), "e2e-req-42");
    let e = c
        .broker
        .unwrap_key(call(Some("forged request_id=x")))
        .await
        .expect_err("garbage");
    let replaced = echoed(&e);
    assert!(uuid::Uuid::parse_str(&replaced).is_ok(), "{replaced}");
    let e = c.broker.unwrap_key(call(None)).await.expect_err("garbage");
    let generated = echoed(&e);
    assert!(
        uuid::Uuid::parse_str(&generated).is_ok() && generated != replaced,
        "{generated}"
    );
    // A successful call echoes it too.
    create(
        &mut c,
        "r/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let mut req = tonic::Request::new(pb::GetKeyRequest { key: "r/k".into() });
    req.metadata_mut()
        .insert("x-request-id", MetadataValue::from_static("e2e-ok-7"));
    let r = c.mgmt.get_key(req).await.expect("get");
    assert_eq!(
        r.metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("e2e-ok-7")
    );

    let log = b.stop().await;
    let line = |id: &str| {
        log.lines()
            .find(|l| l.contains("request_id") && l.contains(id) && l.contains("refused"))
            .unwrap_or_else(|| panic!("no refusal line with request id {id} in:\n{log}"))
            .to_string()
    };
    assert!(line("e2e-req-42").contains("UnwrapKey"));
    line(&replaced);
    line(&generated);
    assert!(
        !log.contains("forged"),
        "an unsafe request id reached the log:\n{log}"
    );
}
