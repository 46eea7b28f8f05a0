//! Payload encryption (`Encrypt`/`Decrypt` and their batch forms): round trips for every
//! algorithm and key size, one error for anything unauthentic, the size limits, the key
//! operations that keep payloads apart from wrapping, and the audit trail.

use keybroker::client::Clients;
use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::common::*;

const UNAUTHENTIC: &str = keybroker::error::UNAUTHENTIC_CIPHERTEXT_MESSAGE;

fn ops(list: &[pb::KeyOperation]) -> Option<pb::KeyAttributes> {
    Some(pb::KeyAttributes {
        operations: Some(pb::KeyOperations {
            operations: list.iter().map(|o| (*o).into()).collect(),
        }),
        ..Default::default()
    })
}

fn all_ops() -> Option<pb::KeyAttributes> {
    use pb::KeyOperation::*;
    ops(&[Wrap, Unwrap, GenerateDataKey, Rewrap, Encrypt, Decrypt])
}

async fn create_with(
    c: &mut Clients,
    name: &str,
    kt: pb::KeyType,
    alg: pb::Algorithm,
    attributes: Option<pb::KeyAttributes>,
) -> Result<pb::Key, tonic::Status> {
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
        .map(|r| r.into_inner())
}

async fn encrypt(
    c: &mut Clients,
    key: &str,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<pb::EncryptResponse, tonic::Status> {
    c.broker
        .encrypt(pb::EncryptRequest {
            key: key.into(),
            plaintext: plaintext.to_vec(),
            aad: aad.to_vec(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn decrypt(
    c: &mut Clients,
    key: &str,
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<pb::DecryptResponse, tonic::Status> {
    c.broker
        .decrypt(pb::DecryptRequest {
            key: key.into(),
            ciphertext: ciphertext.to_vec(),
            aad: aad.to_vec(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[track_caller]
fn assert_unauthentic_payload<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
            assert_eq!(s.message(), UNAUTHENTIC, "{what}");
        }
        Ok(v) => panic!("{what}: accepted: {v:?}"),
    }
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().contains(needle), "{needle:?} not in {s:?}");
        }
        Ok(v) => panic!("expected {code:?} ({needle}), got {v:?}"),
    }
}

/// The most one RSA-OAEP block of a `bits`-bit key holds with `alg` (RFC 8017 §7.1.1).
fn oaep_max(bits: usize, alg: pb::Algorithm) -> usize {
    let h = if alg == pb::Algorithm::RsaOaepSha1 {
        20
    } else {
        32
    };
    bits / 8 - 2 * h - 2
}

#[tokio::test]
async fn payloads_round_trip_for_every_algorithm_and_key_size() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;

    // AES-256-GCM: 1 byte, a DEK-like 32 bytes, the XKS door's 4,300 bytes and the 64 KiB limit,
    // with and without AAD (up to 8 KiB).
    create_with(
        &mut c,
        "t/gcm",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
        all_ops(),
    )
    .await
    .expect("create");
    for (n, aad) in [
        (1usize, vec![]),
        (32, b"ctx".to_vec()),
        (4300, vec![7u8; 8192]),
        (65536, vec![]),
    ] {
        let p = random_dek(n);
        let e = encrypt(&mut c, "t/gcm", &p, &aad).await.expect("encrypt");
        assert_eq!(e.ciphertext[0], 0x02, "format 2");
        assert_eq!(e.ciphertext[1], 1, "AES-256-GCM");
        assert_eq!(e.ciphertext[18], 12, "a 96-bit IV");
        assert_eq!(e.ciphertext.len(), 31 + n + 16, "header, payload, tag");
        assert_eq!(e.key_version, 1);
        assert_eq!(e.algorithm, pb::Algorithm::Aes256Gcm as i32);
        let d = decrypt(&mut c, "", &e.ciphertext, &aad)
            .await
            .expect("decrypt");
        assert_eq!(d.plaintext, p, "{n} bytes");
        assert_eq!(d.key, "t/gcm");
        assert_eq!(d.key_version, 1);
    }
    // Two encryptions of one payload differ (fresh IV).
    let a = encrypt(&mut c, "t/gcm", b"same", b"").await.expect("a");
    let bb = encrypt(&mut c, "t/gcm", b"same", b"").await.expect("b");
    assert_ne!(a.ciphertext, bb.ciphertext);

    // RSA-OAEP: every size, every OAEP hash the token has, the largest payload a block holds.
    for (kt, bits) in [
        (pb::KeyType::Rsa2048, 2048usize),
        (pb::KeyType::Rsa3072, 3072),
        (pb::KeyType::Rsa4096, 4096),
    ] {
        for alg in [pb::Algorithm::RsaOaepSha256, pb::Algorithm::RsaOaepSha1] {
            let name = format!("t/rsa-{bits}-{}", alg as i32);
            match create_with(&mut c, &name, kt, alg, all_ops()).await {
                Ok(_) => {}
                Err(s) if s.code() == Code::FailedPrecondition => {
                    skip_unsupported(
                        "payloads_round_trip_for_every_algorithm_and_key_size",
                        &format!("{} {}", alg.as_str_name(), kt.as_str_name()),
                        &format!(
                            "{alg:?} RSA-{bits}: the token cannot serve it ({})",
                            s.message()
                        ),
                    );
                    continue;
                }
                Err(s) => panic!("create {name}: {s:?}"),
            }
            let max = oaep_max(bits, alg);
            for n in [1, max] {
                let p = random_dek(n);
                let e = encrypt(&mut c, &name, &p, b"").await.expect("encrypt");
                assert_eq!(e.ciphertext[0], 0x02);
                assert_eq!(e.ciphertext[1], alg as i32 as u8);
                assert_eq!(e.ciphertext.len(), 19 + bits / 8, "one modulus-sized block");
                let d = decrypt(&mut c, &name, &e.ciphertext, b"")
                    .await
                    .expect("decrypt");
                assert_eq!(d.plaintext, p);
            }
            assert_code(
                encrypt(&mut c, &name, &random_dek(max + 1), b"").await,
                Code::InvalidArgument,
                &format!("at most {max} bytes"),
            );
            assert_code(
                encrypt(&mut c, &name, b"x", b"aad").await,
                Code::InvalidArgument,
                "cannot bind aad",
            );
        }
    }
    b.stop().await;
}

#[tokio::test]
async fn decrypt_after_rotation_uses_the_version_that_encrypted() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_with(
        &mut c,
        "t/rot",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
        all_ops(),
    )
    .await
    .expect("create");
    let old = encrypt(&mut c, "t/rot", b"before", b"a").await.expect("v1");
    c.mgmt
        .rotate_key(pb::RotateKeyRequest {
            key: "t/rot".into(),
        })
        .await
        .expect("rotate");
    let new = encrypt(&mut c, "t/rot", b"after", b"a").await.expect("v2");
    assert_eq!((old.key_version, new.key_version), (1, 2));
    let d = decrypt(&mut c, "t/rot", &old.ciphertext, b"a")
        .await
        .expect("old");
    assert_eq!((d.plaintext.as_slice(), d.key_version), (&b"before"[..], 1));
    // Raising the minimum decryption version retires version 1 for payloads as for DEKs.
    c.mgmt
        .update_key(pb::UpdateKeyRequest {
            key: "t/rot".into(),
            attributes: Some(pb::KeyAttributes {
                min_decryption_version: 2,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("update");
    assert_code(
        decrypt(&mut c, "t/rot", &old.ciphertext, b"a").await,
        Code::FailedPrecondition,
        "below its minimum decryption version",
    );
    b.stop().await;
}

#[tokio::test]
async fn tampering_wrong_aad_wrong_key_and_the_other_kind_of_ciphertext_get_one_error() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    for k in ["t/one", "t/two"] {
        create_with(
            &mut c,
            k,
            pb::KeyType::Aes256,
            pb::Algorithm::Aes256Gcm,
            all_ops(),
        )
        .await
        .expect("create");
    }
    let e = encrypt(&mut c, "t/one", b"a secret payload", b"ctx")
        .await
        .expect("encrypt")
        .ciphertext;
    // Every byte flipped, one at a time: header, IV, ciphertext, tag.
    for i in 0..e.len() {
        let mut t = e.clone();
        t[i] ^= 0x01;
        assert_unauthentic_payload(decrypt(&mut c, "", &t, b"ctx").await, &format!("byte {i}"));
    }
    assert_unauthentic_payload(decrypt(&mut c, "", &e, b"ctX").await, "wrong aad");
    assert_unauthentic_payload(decrypt(&mut c, "", &e, b"").await, "missing aad");
    assert_unauthentic_payload(decrypt(&mut c, "t/two", &e, b"ctx").await, "wrong key");
    assert_unauthentic_payload(
        decrypt(&mut c, "", &e[..e.len() - 1], b"ctx").await,
        "truncated",
    );
    let mut longer = e.clone();
    longer.push(0);
    assert_unauthentic_payload(decrypt(&mut c, "", &longer, b"ctx").await, "extended");
    // The same key's envelope of the other kind: a wrapped DEK does not decrypt as a payload
    // (a caller allowed to decrypt payloads cannot read the DEKs the key wraps), and a payload
    // does not unwrap as a DEK — even relabelled with the other format byte.
    let w = wrap(&mut c, "t/one", &[9; 32], b"ctx")
        .await
        .expect("wrap")
        .wrapped_key;
    assert_unauthentic_payload(decrypt(&mut c, "", &w, b"ctx").await, "a wrapped DEK");
    let mut relabelled = w.clone();
    relabelled[0] = 0x02;
    assert_unauthentic_payload(
        decrypt(&mut c, "", &relabelled, b"ctx").await,
        "a wrapped DEK relabelled as format 2",
    );
    let p32 = encrypt(&mut c, "t/one", &[9; 32], b"ctx")
        .await
        .expect("encrypt")
        .ciphertext;
    assert_unauthentic(unwrap(&mut c, "", &p32, b"ctx").await, "a payload as a DEK");
    let mut relabelled = p32.clone();
    relabelled[0] = 0x01;
    assert_unauthentic(
        unwrap(&mut c, "", &relabelled, b"ctx").await,
        "a payload relabelled as format 1",
    );
    b.stop().await;
}

#[tokio::test]
async fn payload_sizes_are_bounded_with_invalid_argument() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_with(
        &mut c,
        "t/size",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
        all_ops(),
    )
    .await
    .expect("create");
    assert_code(
        encrypt(&mut c, "t/size", b"", b"").await,
        Code::InvalidArgument,
        "the plaintext is empty",
    );
    assert_code(
        encrypt(&mut c, "t/size", &vec![1; 65537], b"").await,
        Code::InvalidArgument,
        "at most 65536 bytes",
    );
    assert_code(
        encrypt(&mut c, "t/size", b"x", &vec![1; 8193]).await,
        Code::InvalidArgument,
        "aad is longer than 8192 bytes",
    );
    // A batch whose reply would not fit the message limit.
    let items: Vec<_> = (0..9)
        .map(|_| pb::EncryptRequest {
            key: "t/size".into(),
            plaintext: vec![1; 65536],
            ..Default::default()
        })
        .collect();
    let r = c
        .broker
        .batch_encrypt(pb::BatchEncryptRequest {
            items,
            context: None,
        })
        .await;
    assert_code(
        r,
        Code::InvalidArgument,
        "at most 524288 bytes of plaintext",
    );
    b.stop().await;
}

#[tokio::test]
async fn key_operations_keep_payload_encryption_apart_from_wrapping() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    use pb::KeyOperation::*;
    // A new key's default operations are the wrapping ones only.
    let k = create(
        &mut c,
        "t/default",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let listed = k
        .attributes
        .and_then(|a| a.operations)
        .expect("operations")
        .operations;
    let want: Vec<i32> = [Wrap, Unwrap, GenerateDataKey, Rewrap]
        .iter()
        .map(|o| *o as i32)
        .collect();
    assert_eq!(listed, want);
    assert_code(
        encrypt(&mut c, "t/default", b"x", b"").await,
        Code::FailedPrecondition,
        "does not allow encrypt",
    );
    wrap(&mut c, "t/default", &[1; 32], b"")
        .await
        .expect("it still wraps");

    // Encrypt-only, decrypt-only and payload-only keys.
    create_with(
        &mut c,
        "t/enc-only",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
        ops(&[Encrypt]),
    )
    .await
    .expect("create");
    let e = encrypt(&mut c, "t/enc-only", b"x", b"")
        .await
        .expect("encrypt");
    assert_code(
        decrypt(&mut c, "", &e.ciphertext, b"").await,
        Code::FailedPrecondition,
        "does not allow decrypt",
    );
    assert_code(
        wrap(&mut c, "t/enc-only", &[1; 32], b"").await,
        Code::FailedPrecondition,
        "does not allow wrap",
    );
    // Allowing decrypt later makes the same ciphertext readable.
    c.mgmt
        .update_key(pb::UpdateKeyRequest {
            key: "t/enc-only".into(),
            attributes: ops(&[Encrypt, Decrypt]),
            ..Default::default()
        })
        .await
        .expect("update");
    let d = decrypt(&mut c, "", &e.ciphertext, b"")
        .await
        .expect("decrypt");
    assert_eq!(d.plaintext, b"x");

    // A disabled key refuses payloads like everything else.
    c.mgmt
        .update_key(pb::UpdateKeyRequest {
            key: "t/enc-only".into(),
            attributes: Some(pb::KeyAttributes {
                enabled: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("disable");
    assert_code(
        decrypt(&mut c, "", &e.ciphertext, b"").await,
        Code::FailedPrecondition,
        "is disabled",
    );

    // AES key-wrap keys (RFC 5649, RFC 3394) never encrypt payloads, whatever their operations
    // say.
    for (key, alg, rfc) in [
        ("t/kwp", pb::Algorithm::AesKeyWrapPad, "RFC 5649"),
        ("t/kw", pb::Algorithm::AesKeyWrap, "RFC 3394"),
    ] {
        match create_with(&mut c, key, pb::KeyType::Aes256, alg, all_ops()).await {
            Ok(_) => assert_code(
                encrypt(&mut c, key, b"x", b"").await,
                Code::FailedPrecondition,
                "does not encrypt payloads",
            ),
            Err(s) => skip_unsupported(
                "key_operations_keep_payload_encryption_apart_from_wrapping",
                alg.as_str_name(),
                &format!("the token has no {rfc}: {}", s.message()),
            ),
        }
    }
    b.stop().await;
}

#[tokio::test]
async fn batches_give_each_item_its_result_and_its_audit_record() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_with(
        &mut c,
        "t/batch",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
        all_ops(),
    )
    .await
    .expect("create");
    let payloads: Vec<Vec<u8>> = (0..5).map(|i| random_dek(10 + i)).collect();
    let mut items: Vec<_> = payloads
        .iter()
        .map(|p| pb::EncryptRequest {
            key: "t/batch".into(),
            plaintext: p.clone(),
            aad: b"b".to_vec(),
            ..Default::default()
        })
        .collect();
    items.insert(
        2,
        pb::EncryptRequest {
            key: "t/missing".into(),
            plaintext: b"x".to_vec(),
            ..Default::default()
        },
    );
    let r = c
        .broker
        .batch_encrypt(pb::BatchEncryptRequest {
            items,
            context: None,
        })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(r.results.len(), 6);
    let mut cts = Vec::new();
    for (i, res) in r.results.into_iter().enumerate() {
        match res.result.expect("result") {
            pb::encrypt_result::Result::Ok(e) => cts.push(e.ciphertext),
            pb::encrypt_result::Result::Error(e) => {
                assert_eq!(i, 2);
                assert_eq!(e.code, Code::NotFound as i32, "{e:?}");
            }
        }
    }
    assert_eq!(cts.len(), 5);
    let mut ditems: Vec<_> = cts
        .iter()
        .map(|ct| pb::DecryptRequest {
            ciphertext: ct.clone(),
            aad: b"b".to_vec(),
            ..Default::default()
        })
        .collect();
    ditems[1].aad = b"wrong".to_vec();
    let r = c
        .broker
        .batch_decrypt(pb::BatchDecryptRequest {
            items: ditems,
            context: None,
        })
        .await
        .expect("batch")
        .into_inner();
    for (i, res) in r.results.into_iter().enumerate() {
        match res.result.expect("result") {
            pb::decrypt_result::Result::Ok(d) => {
                assert_ne!(i, 1);
                assert_eq!(d.plaintext, payloads[i]);
            }
            pb::decrypt_result::Result::Error(e) => {
                assert_eq!(i, 1);
                assert_eq!(e.code, Code::InvalidArgument as i32);
                assert_eq!(e.message, UNAUTHENTIC);
            }
        }
    }
    b.stop().await;
    let log = std::fs::read_to_string(env.audit_log()).expect("audit log");
    let recs: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let items = |op: &str| {
        recs.iter()
            .filter(|r| r["op"] == op && r["request_id"].as_str().is_some_and(|s| s.contains('#')))
            .map(|r| r["outcome"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        items("BatchEncrypt"),
        ["OK", "OK", "NOT_FOUND", "OK", "OK", "OK"]
    );
    assert_eq!(
        items("BatchDecrypt"),
        ["OK", "INVALID_ARGUMENT", "OK", "OK", "OK"]
    );
    // No plaintext reaches the audit trail, in any encoding.
    for p in &payloads {
        assert!(!log.contains(&hex::encode(p)));
    }
}

#[tokio::test]
async fn encrypt_and_decrypt_are_audited_with_key_version_and_outcome() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create_with(
        &mut c,
        "t/audited",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
        all_ops(),
    )
    .await
    .expect("create");
    let e = encrypt(&mut c, "t/audited", b"hello", b"")
        .await
        .expect("encrypt");
    decrypt(&mut c, "", &e.ciphertext, b"")
        .await
        .expect("decrypt");
    let _ = decrypt(&mut c, "", &e.ciphertext, b"x").await;
    b.stop().await;
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(env.audit_log())
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let of = |op: &str| -> Vec<&serde_json::Value> {
        recs.iter()
            .filter(|r| r["kind"] == "request" && r["op"] == op)
            .collect()
    };
    let enc = of("Encrypt");
    assert_eq!(enc.len(), 1);
    assert_eq!(enc[0]["key"], "t/audited");
    assert_eq!(enc[0]["version"], 1);
    assert_eq!(enc[0]["outcome"], "OK");
    let dec = of("Decrypt");
    assert_eq!(dec.len(), 2);
    assert_eq!(dec[0]["outcome"], "OK");
    assert_eq!(dec[0]["key"], "t/audited");
    assert_eq!(dec[1]["outcome"], "INVALID_ARGUMENT");
    assert_eq!(dec[1]["message"], UNAUTHENTIC);
}
