//! The Kubernetes KMS v2 plugin API on its unix socket, called by a client generated from the
//! API definition (`proto/k8s/kms/v2/api.proto`, wire-compatible with kube-apiserver's).

use std::{os::unix::fs::PermissionsExt, path::PathBuf};

use hyper_util::rt::TokioIo;
use keybroker_proto::{kms_v2 as kms, v1 as pb};
use tonic::{
    Code,
    transport::{Channel, Endpoint, Uri},
};

use crate::common::*;

const KEY: &str = "k8s/etcd";

fn kms_env() -> Env {
    Env::with(Options {
        sections: format!("[kms_v2]\nsocket = \"kms.sock\"\nkey = \"{KEY}\"\n"),
        ..Options::default()
    })
}

/// A KMS v2 client over the unix socket, as kube-apiserver connects.
async fn kms_client(
    path: PathBuf,
) -> kms::key_management_service_client::KeyManagementServiceClient<Channel> {
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect to the KMS socket");
    kms::key_management_service_client::KeyManagementServiceClient::new(channel)
}

fn expected_key_id(k: &pb::Key, version: u32) -> String {
    let v = k
        .versions
        .iter()
        .find(|v| v.version == version)
        .expect("version");
    format!("{KEY}:v{version}:{}", hex::encode(&v.id))
}

async fn status(
    c: &mut kms::key_management_service_client::KeyManagementServiceClient<Channel>,
) -> kms::StatusResponse {
    c.status(kms::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

async fn encrypt(
    c: &mut kms::key_management_service_client::KeyManagementServiceClient<Channel>,
    plaintext: &[u8],
) -> Result<kms::EncryptResponse, tonic::Status> {
    c.encrypt(kms::EncryptRequest {
        plaintext: plaintext.to_vec(),
        uid: format!("uid-{}", &hex_id()[..8]),
    })
    .await
    .map(|r| r.into_inner())
}

async fn decrypt(
    c: &mut kms::key_management_service_client::KeyManagementServiceClient<Channel>,
    ciphertext: &[u8],
    key_id: &str,
) -> Result<Vec<u8>, tonic::Status> {
    c.decrypt(kms::DecryptRequest {
        ciphertext: ciphertext.to_vec(),
        uid: "uid-decrypt".into(),
        key_id: key_id.into(),
        annotations: Default::default(),
    })
    .await
    .map(|r| r.into_inner().plaintext)
}

#[tokio::test]
async fn status_encrypt_decrypt_and_rotation_changes_the_key_id() {
    crate::require_aes!();
    let env = kms_env();
    let b = env.start().await;
    let socket = b.kms_socket.clone().expect("kms-v2 line");
    assert_eq!(socket, env.dir.path().join("kms.sock"));
    let mut admin = b.clients_as(&env.pki.client).await;
    let k1 = create(
        &mut admin,
        KEY,
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let mut c = kms_client(socket).await;

    let s = status(&mut c).await;
    assert_eq!((s.version.as_str(), s.healthz.as_str()), ("v2", "ok"));
    assert_eq!(s.key_id, expected_key_id(&k1, 1));

    let dek = random_dek(32);
    let e1 = encrypt(&mut c, &dek).await.expect("encrypt");
    assert_eq!(e1.key_id, s.key_id);
    assert_eq!(
        e1.ciphertext.len(),
        79,
        "an AES-256-GCM envelope of 32 bytes"
    );
    assert!(e1.annotations.is_empty());
    assert_eq!(
        decrypt(&mut c, &e1.ciphertext, &e1.key_id)
            .await
            .expect("decrypt"),
        dek
    );

    // Rotation: a new key id, never the old one; old ciphertexts still decrypt.
    let k2 = admin
        .mgmt
        .rotate_key(pb::RotateKeyRequest { key: KEY.into() })
        .await
        .expect("rotate")
        .into_inner();
    let s2 = status(&mut c).await;
    assert_eq!(s2.healthz, "ok");
    assert_eq!(s2.key_id, expected_key_id(&k2, 2));
    assert_ne!(s2.key_id, s.key_id);
    let dek2 = random_dek(32);
    let e2 = encrypt(&mut c, &dek2)
        .await
        .expect("encrypt after rotation");
    assert_eq!(e2.key_id, s2.key_id);
    assert_eq!(
        decrypt(&mut c, &e2.ciphertext, &e2.key_id)
            .await
            .expect("new"),
        dek2
    );
    assert_eq!(
        decrypt(&mut c, &e1.ciphertext, &e1.key_id)
            .await
            .expect("old version"),
        dek
    );

    // Refused with the one unauthentic error: a key id that is not the envelope's, a flipped
    // bit, an envelope of another key, and an envelope of this key made outside KMS v2 (other AAD).
    let unauthentic = |r: Result<Vec<u8>, tonic::Status>, what: &str| match r {
        Err(s) => {
            assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
            assert_eq!(s.message(), keybroker::error::UNAUTHENTIC_MESSAGE, "{what}");
        }
        Ok(_) => panic!("{what}: decrypted"),
    };
    unauthentic(
        decrypt(&mut c, &e1.ciphertext, &e2.key_id).await,
        "wrong key id",
    );
    unauthentic(decrypt(&mut c, &e1.ciphertext, "").await, "empty key id");
    let mut flipped = e1.ciphertext.clone();
    flipped[40] ^= 1;
    unauthentic(decrypt(&mut c, &flipped, &e1.key_id).await, "flipped bit");
    create(
        &mut admin,
        "k8s/other",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let other = wrap(&mut admin, "k8s/other", &dek, b"")
        .await
        .expect("wrap");
    unauthentic(
        decrypt(&mut c, &other.wrapped_key, &e1.key_id).await,
        "another key",
    );
    let plain_wrap = wrap(&mut admin, KEY, &dek, b"").await.expect("wrap");
    unauthentic(
        decrypt(&mut c, &plain_wrap.wrapped_key, &e2.key_id).await,
        "not a KMS envelope",
    );

    // Malformed requests.
    let e = decrypt(&mut c, &[], &e1.key_id).await.expect_err("empty");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = encrypt(&mut c, &[1; 20]).await.expect_err("20 bytes");
    assert_eq!(e.code(), Code::InvalidArgument);

    b.stop().await;
    assert!(
        !env.dir.path().join("kms.sock").exists(),
        "socket removed at shutdown"
    );

    // Every Encrypt and Decrypt, allowed or refused, left one audit record with the socket
    // peer's uid as the caller.
    let log = std::fs::read_to_string(env.dir.path().join("audit.log")).expect("audit log");
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .filter(|r: &serde_json::Value| r["op"].as_str().is_some_and(|op| op.starts_with("KmsV2")))
        .collect();
    let count = |op: &str, outcome: &str| {
        records
            .iter()
            .filter(|r| r["op"] == op && r["outcome"] == outcome)
            .count()
    };
    assert_eq!(count("KmsV2Encrypt", "OK"), 2);
    assert_eq!(count("KmsV2Encrypt", "INVALID_ARGUMENT"), 1);
    assert_eq!(count("KmsV2Decrypt", "OK"), 3);
    assert_eq!(count("KmsV2Decrypt", "INVALID_ARGUMENT"), 6);
    assert_eq!(records.len(), 12, "Status is not audited");
    let uid = format!("unix:uid={}", rustix::process::getuid().as_raw());
    assert!(
        records
            .iter()
            .all(|r| r["caller"] == uid.as_str() && r["key"] == KEY)
    );
    assert!(
        records
            .iter()
            .filter(|r| r["op"] == "KmsV2Encrypt" && r["outcome"] == "OK")
            .all(|r| r["request_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("uid-")))
    );
}

#[tokio::test]
async fn status_reports_a_missing_key_and_the_socket_is_private() {
    crate::require_aes!();
    let env = kms_env();
    let b = env.start().await;
    let socket = b.kms_socket.clone().expect("kms-v2 line");
    let mode = std::fs::symlink_metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let mut c = kms_client(socket).await;

    let s = status(&mut c).await;
    assert_eq!(s.version, "v2");
    assert_eq!(s.healthz, format!("keybroker: key {KEY} does not exist"));
    assert_eq!(s.key_id, "");
    let e = encrypt(&mut c, &random_dek(32)).await.expect_err("no key");
    assert_eq!(e.code(), Code::NotFound);

    let mut admin = b.clients_as(&env.pki.client).await;
    let k = create(
        &mut admin,
        KEY,
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let s = status(&mut c).await;
    assert_eq!(
        (s.healthz.as_str(), s.key_id),
        ("ok", expected_key_id(&k, 1))
    );
}

#[tokio::test]
async fn a_second_broker_refuses_a_live_socket() {
    let env = kms_env();
    let b = env.start().await;
    // The same config is refused earlier, at the store's lock (tests/e2e/instance_lock.rs).
    let err = env
        .try_start()
        .await
        .err()
        .expect("second broker must not start");
    assert!(err.contains("is in use by another keybroker"), "{err}");
    // With a store and an audit log of its own, the same socket path: the first broker answers
    // on it.
    let text = std::fs::read_to_string(&env.config).expect("read config");
    let own_files = text
        .replace("path = \"keybroker.db\"", "path = \"second.db\"")
        .replace("path = \"audit.log\"", "path = \"second-audit.log\"");
    assert_ne!(own_files, text);
    let second = env.dir.path().join("second.toml");
    std::fs::write(&second, own_files).expect("write config");
    let err = env
        .try_start_config(&second, &[])
        .await
        .err()
        .expect("second broker must not start");
    assert!(err.contains("another process is serving"), "{err}");
    drop(b);
}

/// The audit records of one op, as JSON.
fn audit_records(env: &Env, op: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(env.audit_log())
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .filter(|r| r["op"] == op)
        .collect()
}

#[tokio::test]
async fn the_hyok_switch_refuses_the_kms_socket_as_it_refuses_grpc_callers() {
    crate::require_aes!();
    // The socket's peers are the provider's service here (kube-apiserver in the provider's
    // control plane): listed as HYOK service identities, with the justification the socket's
    // requests carry accepted for the key.
    const ADMIN: &str = "spiffe://customer.test/admin";
    let env = Env::with(Options {
        sections: format!(
            "[kms_v2]\nsocket = \"kms.sock\"\nkey = \"{KEY}\"\njustification = \"PROVIDER_INITIATED_SERVICE\"\n"
        ),
        policy: Some(format!(
            r#"
[[binding]]
identity = "{ADMIN}"
roles = ["administrator", "crypto-user"]
scope = "all"

[hyok]
service_identities = ["unix:*"]
default_accepted_reasons = ["PROVIDER_INITIATED_SERVICE"]
"#
        )),
        ..Options::default()
    });
    let admin = env
        .pki
        .ca
        .issue_spiffe_client("admin", ADMIN)
        .expect("cert");
    let b = env.start().await;
    let mut a = b.clients_as(&admin).await;
    create(&mut a, KEY, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    let mut c = kms_client(b.kms_socket.clone().expect("kms-v2 line")).await;

    let dek = random_dek(32);
    let e = encrypt(&mut c, &dek)
        .await
        .expect("encrypt while connected");
    a.hyok
        .disconnect(pb::HyokSwitchRequest {
            reason: "incident 11".into(),
        })
        .await
        .expect("disconnect");
    let refused = encrypt(&mut c, &dek)
        .await
        .expect_err("encrypt after disconnect");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("disconnected"), "{refused:?}");
    let refused = decrypt(&mut c, &e.ciphertext, &e.key_id)
        .await
        .expect_err("decrypt after disconnect");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // Status is a health poll, not key use: it still answers.
    assert_eq!(status(&mut c).await.healthz, "ok");

    a.hyok
        .reconnect(pb::HyokSwitchRequest {
            reason: "resolved".into(),
        })
        .await
        .expect("reconnect");
    assert_eq!(
        decrypt(&mut c, &e.ciphertext, &e.key_id)
            .await
            .expect("decrypt after reconnect"),
        dek
    );
    drop((a, c));
    b.stop().await;

    // Each refusal is in the trail, with the justification the socket carried.
    for op in ["KmsV2Encrypt", "KmsV2Decrypt"] {
        let denied: Vec<_> = audit_records(&env, op)
            .into_iter()
            .filter(|r| r["outcome"] == "PERMISSION_DENIED")
            .collect();
        assert_eq!(denied.len(), 1, "{op}: {denied:?}");
        assert_eq!(denied[0]["justification"], "PROVIDER_INITIATED_SERVICE");
        assert_eq!(denied[0]["key"], KEY);
    }
}

#[tokio::test]
async fn a_kms_request_past_its_deadline_is_answered_and_audited_as_such() {
    crate::require_aes!();
    let env = Env::with(Options {
        sections: format!("[kms_v2]\nsocket = \"kms.sock\"\nkey = \"{KEY}\"\n"),
        faults: true,
        sessions: Some(2),
        ..Options::default()
    });
    let b = env.start().await;
    let mut admin = b.clients_as(&env.pki.client).await;
    create(
        &mut admin,
        KEY,
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let mut c = kms_client(b.kms_socket.clone().expect("kms-v2 line")).await;
    // The HSM hangs in every encryption: kube-apiserver's deadline (its grpc-timeout) bounds
    // the request, as a gRPC caller's does.
    env.faults()
        .set(&[hsm_fixtures::fault::Rule::hang("C_EncryptInit")])
        .expect("rules");
    let mut r = tonic::Request::new(kms::EncryptRequest {
        plaintext: random_dek(32),
        uid: "uid-late".into(),
    });
    r.set_timeout(std::time::Duration::from_millis(800));
    let e = c.encrypt(r).await.expect_err("encrypt behind a hung HSM");
    // The broker answers at 90% of the deadline; the client's own timer may fire first.
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    env.faults().clear().expect("rules");
    drop((admin, c));
    b.stop().await;
    let late: Vec<_> = audit_records(&env, "KmsV2Encrypt")
        .into_iter()
        .filter(|r| r["request_id"] == "uid-late")
        .collect();
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0]["outcome"], "DEADLINE_EXCEEDED", "{late:?}");
    // Answered at the caller's deadline, not when the HSM call's own timeout (10 s) ran out.
    let latency = late[0]["latency_us"].as_u64().expect("latency");
    assert!(latency < 5_000_000, "answered after {latency} µs");
}
