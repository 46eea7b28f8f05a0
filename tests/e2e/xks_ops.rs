//! The AWS XKS operations (`keybroker::api::ops::xks`) through the real pipeline, keyring and
//! token, before their HTTP door exists: the keys are made through gRPC by the real broker,
//! which then stops; a child process (this test binary again, running one ignored test) opens
//! the same token, store and audit log in-process and drives the XKS operations through
//! `Pipeline::execute`, with bodies decoded by the XKS codec. A child process, because a
//! PKCS#11 library reads its configuration once per process (and the test binary must not
//! initialise the token of one test for all the others).

use std::{sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use keybroker::{
    api::{
        Pipeline,
        ops::{
            Operation,
            manage::RotateKey,
            xks::{XksEncrypted, XksKey},
        },
        pipeline::{Endpoint, Incoming, Reply},
        xks,
    },
    audit::{AuditLog, AuditSettings},
    error::BrokerError,
    identity::{Caller, IdentityKind},
    keys::Keyring,
    policy::{Policy, PolicyHandle},
};
use keybroker_proto::v1 as pb;
use sha2::{Digest, Sha256};

use crate::common::*;

const CHILD_ENV: &str = "KEYBROKER_XKS_CHILD_CONFIG";
const CHILD_TEST: &str = "xks_ops::child_drives_the_xks_operations_in_process";
const IDENTITY: &str = "xks:t";
const PRINCIPAL: &str = "arn:aws:iam::111122223333:user/Alice";

fn ops(list: &[pb::KeyOperation]) -> Option<pb::KeyAttributes> {
    Some(pb::KeyAttributes {
        operations: Some(pb::KeyOperations {
            operations: list.iter().map(|o| (*o).into()).collect(),
        }),
        ..Default::default()
    })
}

#[tokio::test]
async fn xks_operations_against_a_real_keyring() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    use pb::KeyOperation::*;
    for (name, alg, attributes) in [
        (
            "t/k1",
            pb::Algorithm::Aes256Gcm,
            ops(&[Wrap, Unwrap, Encrypt, Decrypt]),
        ),
        ("t/enc-only", pb::Algorithm::Aes256Gcm, ops(&[Encrypt])),
        ("t/dec-only", pb::Algorithm::Aes256Gcm, ops(&[Decrypt])),
        ("t/impotent", pb::Algorithm::Aes256Gcm, ops(&[Wrap, Unwrap])),
        (
            "t/disabled",
            pb::Algorithm::Aes256Gcm,
            ops(&[Encrypt, Decrypt]),
        ),
        (
            "t/rsa",
            pb::Algorithm::Unspecified,
            ops(&[Encrypt, Decrypt]),
        ),
    ] {
        let kt = if name == "t/rsa" {
            pb::KeyType::Rsa2048
        } else {
            pb::KeyType::Aes256
        };
        c.mgmt
            .create_key(pb::CreateKeyRequest {
                key: name.into(),
                key_type: kt.into(),
                algorithm: alg.into(),
                attributes,
                external: None,
                double: None,
            })
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e:?}"));
    }
    c.mgmt
        .update_key(pb::UpdateKeyRequest {
            key: "t/disabled".into(),
            attributes: Some(pb::KeyAttributes {
                enabled: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("disable");
    // A wrapped DEK of t/k1, to show it cannot be decrypted through the XKS door.
    let w = wrap(&mut c, "t/k1", &[7; 32], b"").await.expect("wrap");
    std::fs::write(env.dir.path().join("wrapped.bin"), &w.wrapped_key).expect("write");
    drop(c);
    b.stop().await;

    let out = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            CHILD_TEST,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(env.broker_env())
        .env(CHILD_ENV, &env.config)
        .env("RUST_BACKTRACE", "0")
        .output()
        .await
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{stderr}"
    );

    // One audit record per request, each with the request's requestMetadata, and the chain
    // (and the HSM-keyed checkpoints) still verify.
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(env.audit_log())
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let xks: Vec<&serde_json::Value> = recs
        .iter()
        .filter(|r| r["kind"] == "request" && r["caller"] == IDENTITY)
        .collect();
    assert!(xks.len() > 10, "{}", xks.len());
    let enc = xks
        .iter()
        .find(|r| r["op"] == "XksEncrypt" && r["outcome"] == "OK")
        .expect("an audited XKS encrypt");
    assert_eq!(enc["upstream"]["principal"], PRINCIPAL);
    assert_eq!(enc["upstream"]["operation"], "GenerateDataKey");
    assert_eq!(enc["upstream"]["via_service"], "ebs");
    assert_eq!(enc["key"], "t/k1");
    assert!(
        enc["request_id"]
            .as_str()
            .is_some_and(|s| s.starts_with("kms-"))
    );
    assert!(xks.iter().any(|r| r["op"] == "XksDecrypt"
        && r["outcome"] == "INVALID_ARGUMENT"
        && r["message"] == keybroker::error::UNAUTHENTIC_CIPHERTEXT_MESSAGE));
    let (ok, report) = env.verify_audit(&env.audit_log());
    assert!(ok, "{report}");
}

/// A body with `requestMetadata` and the given fields (already JSON).
fn body(fields: &str) -> Vec<u8> {
    let sep = if fields.is_empty() { "" } else { "," };
    format!(
        r#"{{"requestMetadata": {{"awsPrincipalArn": "{PRINCIPAL}",
        "kmsKeyArn": "arn:aws:kms:us-east-2:111122223333:key/1", "kmsOperation": "GenerateDataKey",
        "kmsRequestId": "kms-{}", "kmsViaService": "ebs"}}{sep}{fields}}}"#,
        hex_id()
    )
    .into_bytes()
}

fn key(id: &str) -> XksKey {
    XksKey {
        tenant: "t".into(),
        id: id.into(),
    }
}

struct Door {
    pipeline: Pipeline,
}

impl Door {
    /// Runs one decoded request through the pipeline, as the HTTP door will.
    async fn run<O: Operation>(&self, op: &'static str, d: xks::Decoded<O>) -> Reply<O::Output> {
        let mut incoming = Incoming::new(
            Endpoint {
                service: "aws.kms.xks.v1",
                method: op,
                op,
            },
            Some(Caller {
                id: IDENTITY.into(),
                kind: IdentityKind::SigV4,
            }),
        );
        incoming.request_id = d.request_id;
        incoming.context = Some(d.context);
        incoming.timeout = Some(Duration::from_secs(5));
        self.pipeline.execute(incoming, d.op).await
    }

    async fn encrypt(&self, id: &str, fields: &str) -> Result<XksEncrypted, BrokerError> {
        self.run("XksEncrypt", xks::decode_encrypt(&body(fields), key(id)))
            .await
            .result
    }

    async fn decrypt(&self, id: &str, fields: &str) -> Result<Vec<u8>, BrokerError> {
        self.run("XksDecrypt", xks::decode_decrypt(&body(fields), key(id)))
            .await
            .result
            .map(|d| d.expose().to_vec())
    }

    async fn metadata(&self, id: &str) -> Result<xks::MetadataResponse, BrokerError> {
        self.run("XksMetadata", xks::decode_metadata(&body(""), key(id)))
            .await
            .result
            .map(xks::encode_metadata)
    }
}

/// The JSON fields of a Decrypt for what Encrypt returned.
fn decrypt_fields(e: &XksEncrypted, aad: Option<&[u8]>) -> String {
    let mut f = format!(
        r#""ciphertext": "{}", "initializationVector": "{}", "authenticationTag": "{}", "ciphertextMetadata": "{}", "encryptionAlgorithm": "AES_GCM""#,
        B64.encode(&e.ciphertext),
        B64.encode(&e.iv),
        B64.encode(&e.tag),
        B64.encode(&e.metadata)
    );
    if let Some(a) = aad {
        f.push_str(&format!(
            r#", "additionalAuthenticatedData": "{}""#,
            B64.encode(a)
        ));
    }
    f
}

fn name(e: &BrokerError) -> &'static str {
    xks::error_name(e).1
}

#[tokio::test]
#[ignore = "the child of xks_operations_against_a_real_keyring (it needs that test's token and store)"]
async fn child_drives_the_xks_operations_in_process() {
    let Some(config) = std::env::var_os(CHILD_ENV) else {
        eprintln!("{CHILD_TEST}: run by xks_operations_against_a_real_keyring only");
        return;
    };
    let cfg = keybroker::config::Config::load(std::path::Path::new(&config)).expect("config");
    let hsm = keybroker::server::open_hsm(&cfg).await.expect("hsm");
    let store = Arc::new(keybroker::server::open_store(&cfg).await.expect("store"));
    let (keyring, _) = Keyring::load(
        hsm.clone(),
        store.clone(),
        cfg.hsm.on_integrity_failure,
        cfg.lifecycle.settings(),
    )
    .await
    .expect("keyring");
    let audit = AuditLog::open(
        AuditSettings {
            path: cfg.path(&cfg.audit.path),
            checkpoint_every: cfg.audit.checkpoint_every,
            checkpoint_interval: Duration::from_millis(cfg.audit.checkpoint_interval_ms),
            sync: true,
            allow_truncated: false,
        },
        hsm.clone(),
        store.clone(),
    )
    .await
    .expect("audit");
    let hyok = Arc::new(
        keybroker::hyok::HyokSwitch::load(store, hsm.clone(), true)
            .await
            .expect("hyok"),
    );
    let policy = Policy::parse(&format!(
        "[[binding]]\nidentity = \"{IDENTITY}\"\nroles = [\"service-crypto-user\", \"crypto-user\"]\nscope = \"tenant:t\"\non_behalf_of = [\"arn:aws:iam::111122223333:*\"]\n"
    ))
    .expect("policy");
    let door = Door {
        pipeline: Pipeline::new(
            Arc::new(keyring),
            Arc::new(PolicyHandle::fixed(policy)),
            audit.clone(),
            hyok,
            Duration::from_secs(30),
            None,
        ),
    };

    // Round trip at the spec's sizes: 4,300 bytes of plaintext, 8,192 of AAD, with a CDIV the
    // test computes itself from the response.
    let plaintext: Vec<u8> = (0..4300u32).map(|i| (i % 251) as u8).collect();
    let aad: Vec<u8> = (0..8192u32).map(|i| (i % 13) as u8).collect();
    let e = door
        .encrypt(
            "k1",
            &format!(
                r#""plaintext": "{}", "additionalAuthenticatedData": "{}", "encryptionAlgorithm": "AES_GCM", "ciphertextDataIntegrityValueAlgorithm": "SHA_256""#,
                B64.encode(&plaintext),
                B64.encode(&aad)
            ),
        )
        .await
        .expect("encrypt");
    assert_eq!(e.ciphertext.len(), plaintext.len());
    assert_ne!(e.ciphertext, plaintext);
    assert_eq!((e.iv.len(), e.tag.len(), e.metadata.len()), (12, 16, 17));
    let mut h = Sha256::new();
    for part in [&aad[..], &e.metadata, &e.iv, &e.ciphertext, &e.tag] {
        h.update(part);
    }
    let expected: [u8; 32] = h.finalize().into();
    assert_eq!(e.cdiv, Some(expected), "CDIV");
    let p = door
        .decrypt("k1", &decrypt_fields(&e, Some(&aad)))
        .await
        .expect("decrypt");
    assert_eq!(p, plaintext);

    // Decrypt refuses any change: AAD missing or different, metadata, IV, tag, ciphertext.
    let bad = |what: &str, r: Result<Vec<u8>, BrokerError>| match r {
        Err(err) => assert_eq!(name(&err), "InvalidCiphertextException", "{what}: {err}"),
        Ok(_) => panic!("{what}: decrypted"),
    };
    bad(
        "no AAD",
        door.decrypt("k1", &decrypt_fields(&e, None)).await,
    );
    let mut other_aad = aad.clone();
    other_aad[0] ^= 1;
    bad(
        "other AAD",
        door.decrypt("k1", &decrypt_fields(&e, Some(&other_aad)))
            .await,
    );
    for field in 0..4 {
        let mut t = e.clone();
        match field {
            0 => t.metadata[16] ^= 1,
            1 => t.iv[0] ^= 1,
            2 => t.tag[15] ^= 1,
            _ => t.ciphertext[100] ^= 1,
        }
        bad(
            &format!("field {field}"),
            door.decrypt("k1", &decrypt_fields(&t, Some(&aad))).await,
        );
    }
    let mut t = e.clone();
    t.iv = vec![0; 16];
    bad(
        "a 16-byte IV",
        door.decrypt("k1", &decrypt_fields(&t, Some(&aad))).await,
    );
    let mut t = e.clone();
    t.metadata = b"key_version=1".to_vec();
    bad(
        "foreign metadata",
        door.decrypt("k1", &decrypt_fields(&t, Some(&aad))).await,
    );
    // The metadata moved into the AAD (the spec's example of why lengths are included).
    let small = door
        .encrypt(
            "k1",
            r#""plaintext": "SGVsbG8gV29ybGQh", "encryptionAlgorithm": "AES_GCM""#,
        )
        .await
        .expect("encrypt");
    let mut moved = small.clone();
    moved.metadata = Vec::new();
    let r = door
        .decrypt(
            "k1",
            &decrypt_fields(&moved, Some(&small.metadata))
                .replace(r#", "ciphertextMetadata": """#, ""),
        )
        .await;
    bad("metadata passed as AAD", r);

    // Another key of the same tenant cannot decrypt it.
    let r = door
        .decrypt("enc-only", &decrypt_fields(&small, None))
        .await;
    assert_eq!(name(&r.expect_err("refused")), "InvalidKeyUsageException");

    // A wrapped DEK of the same key, cut into IV, ciphertext and tag with its header as AAD,
    // does not decrypt through the XKS door (domain separation).
    let w = std::fs::read(std::path::Path::new(&config).with_file_name("wrapped.bin"))
        .expect("wrapped");
    let (header, rest) = w.split_at(31);
    let forged = XksEncrypted {
        iv: header[19..31].to_vec(),
        ciphertext: rest[..rest.len() - 16].to_vec(),
        tag: rest[rest.len() - 16..].to_vec(),
        metadata: {
            let mut m = vec![1u8];
            m.extend_from_slice(&header[2..18]);
            m
        },
        cdiv: None,
    };
    bad(
        "a wrapped DEK",
        door.decrypt("k1", &decrypt_fields(&forged, Some(header)))
            .await,
    );

    // Rotation: ciphertexts of both versions decrypt with their metadata.
    let before = door
        .encrypt(
            "k1",
            r#""plaintext": "djE=", "encryptionAlgorithm": "AES_GCM""#,
        )
        .await
        .expect("v1");
    let mut incoming = Incoming::new(
        Endpoint {
            service: "test",
            method: "RotateKey",
            op: "RotateKey",
        },
        Some(Caller {
            id: IDENTITY.into(),
            kind: IdentityKind::SigV4,
        }),
    );
    incoming.context = Some(keybroker::api::pipeline::Context {
        upstream: Some(keybroker::policy::Upstream {
            principal: Some(PRINCIPAL.into()),
            ..Default::default()
        }),
        ..Default::default()
    });
    door.pipeline
        .execute(incoming, Ok(RotateKey { key: "t/k1".into() }))
        .await
        .result
        .expect("rotate");
    let after = door
        .encrypt(
            "k1",
            r#""plaintext": "djI=", "encryptionAlgorithm": "AES_GCM""#,
        )
        .await
        .expect("v2");
    assert_ne!(
        before.metadata, after.metadata,
        "the version is in the metadata"
    );
    assert_eq!(
        door.decrypt("k1", &decrypt_fields(&before, None))
            .await
            .expect("v1"),
        b"v1"
    );
    assert_eq!(
        door.decrypt("k1", &decrypt_fields(&after, None))
            .await
            .expect("v2"),
        b"v2"
    );

    // Key usage and state.
    let pt = r#""plaintext": "SGk=", "encryptionAlgorithm": "AES_GCM""#;
    let cdiv = r#""plaintext": "SGk=", "encryptionAlgorithm": "AES_GCM", "ciphertextDataIntegrityValueAlgorithm": "SHA_256""#;
    let m = door.metadata("k1").await.expect("metadata");
    assert_eq!((m.key_spec, m.key_status), ("AES_256", "ENABLED"));
    assert_eq!(m.key_usage, ["ENCRYPT", "DECRYPT", "WRAP", "UNWRAP"]);
    // Encrypt-only: encrypts; decrypt and CDIV (a decrypt) are InvalidKeyUsage.
    assert_eq!(
        door.metadata("enc-only").await.expect("m").key_usage,
        ["ENCRYPT"]
    );
    let eo = door
        .encrypt("enc-only", pt)
        .await
        .expect("encrypt-only encrypts");
    let r = door.decrypt("enc-only", &decrypt_fields(&eo, None)).await;
    assert_eq!(name(&r.expect_err("refused")), "InvalidKeyUsageException");
    let r = door.encrypt("enc-only", cdiv).await;
    assert_eq!(name(&r.expect_err("refused")), "InvalidKeyUsageException");
    // Decrypt-only and impotent keys refuse to encrypt.
    assert_eq!(
        door.metadata("dec-only").await.expect("m").key_usage,
        ["DECRYPT"]
    );
    assert_eq!(
        door.metadata("impotent").await.expect("m").key_usage,
        ["WRAP", "UNWRAP"]
    );
    for k in ["dec-only", "impotent"] {
        for f in [pt, cdiv] {
            let r = door.encrypt(k, f).await;
            assert_eq!(
                name(&r.expect_err("refused")),
                "InvalidKeyUsageException",
                "{k}"
            );
        }
    }
    // An RSA key is not an AES_256 key and does not serve XKS encrypt.
    assert_eq!(door.metadata("rsa").await.expect("m").key_spec, "RSA_2048");
    assert_eq!(
        name(&door.encrypt("rsa", pt).await.expect_err("refused")),
        "InvalidKeyUsageException"
    );
    // Disabled: DISABLED, and InvalidState for use.
    assert_eq!(
        door.metadata("disabled").await.expect("m").key_status,
        "DISABLED"
    );
    assert_eq!(
        name(&door.encrypt("disabled", pt).await.expect_err("refused")),
        "InvalidStateException"
    );
    // No such key; a name keybroker cannot hold.
    for k in ["missing", "-x"] {
        assert_eq!(
            name(&door.metadata(k).await.expect_err("refused")),
            "KeyNotFoundException"
        );
        assert_eq!(
            name(&door.encrypt(k, pt).await.expect_err("refused")),
            "KeyNotFoundException"
        );
    }
    // Sizes beyond keybroker's are UnsupportedOperation; an empty plaintext is invalid.
    let big = format!(
        r#""plaintext": "{}", "encryptionAlgorithm": "AES_GCM""#,
        B64.encode(vec![0u8; 65537])
    );
    assert_eq!(
        name(&door.encrypt("k1", &big).await.expect_err("refused")),
        "UnsupportedOperationException"
    );
    let big_aad = format!(
        r#""plaintext": "SGk=", "additionalAuthenticatedData": "{}", "encryptionAlgorithm": "AES_GCM""#,
        B64.encode(vec![0u8; 8193])
    );
    assert_eq!(
        name(&door.encrypt("k1", &big_aad).await.expect_err("refused")),
        "UnsupportedOperationException"
    );

    // Secondary authorization: another AWS account's principal is denied by policy.
    let foreign = String::from_utf8(body(pt))
        .expect("utf-8")
        .replace("111122223333:user", "999999999999:user");
    let r = door
        .run(
            "XksEncrypt",
            xks::decode_encrypt(foreign.as_bytes(), key("k1")),
        )
        .await
        .result;
    assert_eq!(name(&r.expect_err("refused")), "AccessDeniedException");

    // Health: a real call to the token, its identity in the report.
    let health = door
        .run(
            "XksHealth",
            xks::decode_health(br#"{"requestMetadata": {"kmsRequestId": "h-1", "kmsOperation": "KmsHealthCheck"}}"#, 1),
        )
        .await
        .result
        .expect("health");
    assert_eq!(health.ekm.len(), 1);
    assert_eq!(health.ekm[0].health_status, "ACTIVE");
    assert_eq!(health.ekm[0].id, hsm.token().serial);
    audit.close().await;
}
