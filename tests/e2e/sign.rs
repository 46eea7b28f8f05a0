//! Signing keys and signatures: Sign/Verify for every algorithm and key size the token supports
//! (signatures checked with independent libraries: the `p256`, `p384` and `rsa` crates), the
//! refusals (wrong digest length, wrong algorithm for the key, a signing key asked to wrap, a
//! wrapping key asked to sign), verification answers for altered signatures and other keys,
//! and the separation of signing and wrapping keys in the token's own attributes.

use hsm_fixtures::token::TokenKind;
use keybroker::client::Clients;
use keybroker_proto::v1 as pb;
use sha2::{Digest, Sha256, Sha384, Sha512};
use tonic::Code;

use crate::common::*;

use pb::SignatureAlgorithm as A;

/// The digest of `msg` under `alg`'s hash.
fn digest(alg: A, msg: &[u8]) -> Vec<u8> {
    match alg {
        A::Es256 | A::Rs256 | A::Ps256 => Sha256::digest(msg).to_vec(),
        A::Es384 | A::Rs384 | A::Ps384 => Sha384::digest(msg).to_vec(),
        _ => Sha512::digest(msg).to_vec(),
    }
}

/// Creates a signing key; `None` (after printing why) when the token cannot make it.
pub(crate) async fn create_signing(
    c: &mut Clients,
    test: &str,
    name: &str,
    kt: pb::KeyType,
) -> Option<pb::Key> {
    let algorithm = if matches!(kt, pb::KeyType::EcP256 | pb::KeyType::EcP384) {
        pb::Algorithm::Unspecified
    } else {
        pb::Algorithm::RsaSign
    };
    match c
        .mgmt
        .create_key(pb::CreateKeyRequest {
            key: name.into(),
            key_type: kt.into(),
            algorithm: algorithm.into(),
            ..Default::default()
        })
        .await
    {
        Ok(k) => Some(k.into_inner()),
        Err(e) if e.code() == Code::FailedPrecondition => {
            skip_unsupported(
                &format!("{test} ({kt:?})"),
                kt.as_str_name(),
                &format!("the token cannot make this key: {}", e.message()),
            );
            None
        }
        Err(e) => panic!("create {name}: {e:?}"),
    }
}

async fn sign(
    c: &mut Clients,
    key: &str,
    alg: A,
    digest: &[u8],
) -> Result<pb::SignResponse, tonic::Status> {
    c.broker
        .sign(pb::SignRequest {
            key: key.into(),
            algorithm: alg.into(),
            digest: digest.to_vec(),
            context: None,
        })
        .await
        .map(|r| r.into_inner())
}

async fn verify(
    c: &mut Clients,
    key: &str,
    version: u32,
    alg: A,
    digest: &[u8],
    signature: &[u8],
) -> Result<bool, tonic::Status> {
    c.broker
        .verify(pb::VerifyRequest {
            key: key.into(),
            key_version: version,
            algorithm: alg.into(),
            digest: digest.to_vec(),
            signature: signature.to_vec(),
            context: None,
        })
        .await
        .map(|r| r.into_inner().valid)
}

/// Checks `sig` over `digest` with an independent implementation, from the SPKI PEM the broker
/// served.
fn verify_independently(alg: A, pem: &str, digest: &[u8], sig: &[u8]) -> Result<(), String> {
    match alg {
        A::Es256 => {
            use p256::{
                ecdsa::{Signature, VerifyingKey, signature::hazmat::PrehashVerifier},
                pkcs8::DecodePublicKey,
            };
            let k = VerifyingKey::from_public_key_pem(pem).map_err(|e| e.to_string())?;
            let s = Signature::from_slice(sig).map_err(|e| e.to_string())?;
            k.verify_prehash(digest, &s).map_err(|e| e.to_string())
        }
        A::Es384 => {
            use p384::{
                ecdsa::{Signature, VerifyingKey, signature::hazmat::PrehashVerifier},
                pkcs8::DecodePublicKey,
            };
            let k = VerifyingKey::from_public_key_pem(pem).map_err(|e| e.to_string())?;
            let s = Signature::from_slice(sig).map_err(|e| e.to_string())?;
            k.verify_prehash(digest, &s).map_err(|e| e.to_string())
        }
        _ => {
            use rsa::{Pkcs1v15Sign, Pss, RsaPublicKey, pkcs8::DecodePublicKey};
            let k = RsaPublicKey::from_public_key_pem(pem).map_err(|e| e.to_string())?;
            let r = match alg {
                A::Rs256 => k.verify(Pkcs1v15Sign::new::<Sha256>(), digest, sig),
                A::Rs384 => k.verify(Pkcs1v15Sign::new::<Sha384>(), digest, sig),
                A::Rs512 => k.verify(Pkcs1v15Sign::new::<Sha512>(), digest, sig),
                // RFC 7518 §3.5: the salt is as long as the hash.
                A::Ps256 => k.verify(Pss::new_with_salt::<Sha256>(32), digest, sig),
                A::Ps384 => k.verify(Pss::new_with_salt::<Sha384>(48), digest, sig),
                _ => k.verify(Pss::new_with_salt::<Sha512>(64), digest, sig),
            };
            r.map_err(|e| e.to_string())
        }
    }
}

#[tokio::test]
async fn every_algorithm_signs_verifies_and_checks_out_with_independent_libraries() {
    const TEST: &str =
        "sign::every_algorithm_signs_verifies_and_checks_out_with_independent_libraries";
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let rsa_algs = [A::Rs256, A::Rs384, A::Rs512, A::Ps256, A::Ps384, A::Ps512];
    let cases: [(pb::KeyType, &[A]); 5] = [
        (pb::KeyType::EcP256, &[A::Es256]),
        (pb::KeyType::EcP384, &[A::Es384]),
        (pb::KeyType::Rsa2048, &rsa_algs),
        (pb::KeyType::Rsa3072, &rsa_algs),
        (pb::KeyType::Rsa4096, &rsa_algs),
    ];
    let mut secrets = Vec::new();
    for (kt, algs) in cases {
        let name = format!("t/sig-{}", format!("{kt:?}").to_ascii_lowercase());
        let Some(key) = create_signing(&mut c, TEST, &name, kt).await else {
            continue;
        };
        assert_eq!(
            key.attributes.as_ref().map(|a| a.operations.clone()),
            Some(Some(pb::KeyOperations {
                operations: vec![
                    pb::KeyOperation::Sign.into(),
                    pb::KeyOperation::Verify.into()
                ]
            })),
            "a signing key allows sign and verify, nothing else: {key:?}"
        );
        let public = c
            .broker
            .get_public_key(pb::GetPublicKeyRequest {
                key: name.clone(),
                key_version: 0,
            })
            .await
            .expect("public key")
            .into_inner();
        let jwk: serde_json::Value = serde_json::from_str(&public.jwk).expect("jwk");
        assert_eq!(jwk["use"], "sig", "{jwk}");
        assert_eq!(jwk["kid"], hex::encode(&key.versions[0].id), "{jwk}");
        match kt {
            pb::KeyType::EcP256 | pb::KeyType::EcP384 => {
                let (crv, n, alg) = if kt == pb::KeyType::EcP256 {
                    ("P-256", 32, "ES256")
                } else {
                    ("P-384", 48, "ES384")
                };
                assert_eq!(
                    (&jwk["kty"], &jwk["crv"], &jwk["alg"]),
                    (&"EC".into(), &crv.into(), &alg.into()),
                    "{jwk}"
                );
                use base64::Engine;
                let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                for c in ["x", "y"] {
                    let v = b64
                        .decode(jwk[c].as_str().unwrap_or(""))
                        .expect("coordinate");
                    assert_eq!(v.len(), n, "{c}: {jwk}");
                }
            }
            _ => {
                assert_eq!(jwk["kty"], "RSA", "{jwk}");
                assert!(
                    jwk.get("alg").is_none(),
                    "an RSA signing key signs RS* and PS*: {jwk}"
                );
            }
        }
        for &alg in algs {
            let msg = format!("message for {name} {alg:?}");
            let d = digest(alg, msg.as_bytes());
            let s = sign(&mut c, &name, alg, &d)
                .await
                .unwrap_or_else(|e| panic!("{name} {alg:?}: {e:?}"));
            assert_eq!((s.key.as_str(), s.key_version), (name.as_str(), 1));
            assert_eq!(s.algorithm, i32::from(alg));
            assert_eq!(s.key_version_id, key.versions[0].id);
            match alg {
                A::Es256 => assert_eq!(s.signature.len(), 64),
                A::Es384 => assert_eq!(s.signature.len(), 96),
                _ => assert_eq!(s.signature.len() * 8, rsa_bits(kt)),
            }
            verify_independently(alg, &public.spki_pem, &d, &s.signature).unwrap_or_else(|e| {
                panic!("{name} {alg:?}: an independent library refuses the signature: {e}")
            });
            assert!(
                verify(&mut c, &name, 1, alg, &d, &s.signature)
                    .await
                    .expect("verify")
            );
            assert!(
                verify(&mut c, &name, 0, alg, &d, &s.signature)
                    .await
                    .expect("verify newest")
            );
            // An altered signature, and the signature of another digest: valid = false.
            let mut bad = s.signature.clone();
            bad[5] ^= 0x10;
            assert!(
                !verify(&mut c, &name, 1, alg, &d, &bad)
                    .await
                    .expect("altered"),
                "{name} {alg:?}"
            );
            let other = digest(alg, b"another message");
            assert!(
                !verify(&mut c, &name, 1, alg, &other, &s.signature)
                    .await
                    .expect("other digest")
            );
            // The wrong length is an answer too, not an error.
            assert!(
                !verify(&mut c, &name, 1, alg, &d, &s.signature[1..])
                    .await
                    .expect("short")
            );
            secrets.push(hex::encode(&d));
            secrets.push(hex::encode(&s.signature));
        }
        // The version's usage counts its signatures and verifications (one and five each).
        let v = c
            .mgmt
            .list_key_versions(pb::ListKeyVersionsRequest { key: name.clone() })
            .await
            .expect("versions")
            .into_inner()
            .versions;
        let n = algs.len() as u64;
        assert_eq!((v[0].wraps, v[0].unwraps), (n, 5 * n), "{name}: {v:?}");
        assert!(v[0].last_used_ms > 0, "{name}: {v:?}");
    }
    drop(c);
    let log = b.stop().await;
    // Audited, and never with a digest or a signature.
    let trail = std::fs::read_to_string(env.audit_log()).expect("audit log");
    assert!(
        trail.contains("\"Sign\"") && trail.contains("\"Verify\""),
        "{trail}"
    );
    for s in &secrets {
        assert!(
            !trail.contains(s.as_str()),
            "the audit trail holds a digest or signature"
        );
        assert!(
            !log.contains(s.as_str()),
            "the log holds a digest or signature"
        );
    }
}

fn rsa_bits(kt: pb::KeyType) -> usize {
    match kt {
        pb::KeyType::Rsa2048 => 2048,
        pb::KeyType::Rsa3072 => 3072,
        _ => 4096,
    }
}

#[tokio::test]
async fn bad_digests_wrong_algorithms_and_other_keys_get_the_right_answer() {
    const TEST: &str = "sign::bad_digests_wrong_algorithms_and_other_keys_get_the_right_answer";
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let Some(_) = create_signing(&mut c, TEST, "t/ec-a", pb::KeyType::EcP256).await else {
        return b.stop().await.truncate(0);
    };
    let Some(_) = create_signing(&mut c, TEST, "t/ec-b", pb::KeyType::EcP256).await else {
        return b.stop().await.truncate(0);
    };
    let rsa = create_signing(&mut c, TEST, "t/rsa-sign", pb::KeyType::Rsa2048).await;
    // A digest of the wrong length: INVALID_ARGUMENT, saying what was expected.
    for (alg, len) in [
        (A::Es256, 31),
        (A::Es256, 48),
        (A::Es256, 0),
        (A::Rs256, 64),
        (A::Ps512, 32),
    ] {
        let key = if matches!(alg, A::Es256) {
            "t/ec-a"
        } else {
            "t/rsa-sign"
        };
        if key == "t/rsa-sign" && rsa.is_none() {
            continue;
        }
        let e = sign(&mut c, key, alg, &vec![1; len])
            .await
            .expect_err("wrong length");
        assert_eq!(e.code(), Code::InvalidArgument, "{alg:?} {len}: {e:?}");
        assert!(
            e.message().contains(&format!("digest is {len} bytes"))
                && e.message().contains("-byte"),
            "{}",
            e.message()
        );
        let e = verify(&mut c, key, 0, alg, &vec![1; len], &[1; 64])
            .await
            .expect_err("wrong length");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    // No algorithm at all.
    let e = sign(&mut c, "t/ec-a", A::Unspecified, &[1; 32])
        .await
        .expect_err("no algorithm");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // An algorithm the key does not sign with: FAILED_PRECONDITION, naming what it does.
    let e = sign(&mut c, "t/ec-a", A::Es384, &[1; 48])
        .await
        .expect_err("P-256 key, ES384");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("ES256"), "{}", e.message());
    let e = sign(&mut c, "t/ec-a", A::Rs256, &[1; 32])
        .await
        .expect_err("EC key, RS256");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // A signature by another key (the same curve): valid = false.
    let d = digest(A::Es256, b"signed by a");
    let s = sign(&mut c, "t/ec-a", A::Es256, &d)
        .await
        .expect("sign")
        .signature;
    assert!(
        verify(&mut c, "t/ec-a", 0, A::Es256, &d, &s)
            .await
            .expect("verify")
    );
    assert!(
        !verify(&mut c, "t/ec-b", 0, A::Es256, &d, &s)
            .await
            .expect("other key")
    );
    // A version that does not exist.
    let e = verify(&mut c, "t/ec-a", 9, A::Es256, &d, &s)
        .await
        .expect_err("no version 9");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // After rotation the new version signs; the old one still verifies what it signed.
    c.mgmt
        .rotate_key(pb::RotateKeyRequest {
            key: "t/ec-a".into(),
        })
        .await
        .expect("rotate");
    let s2 = sign(&mut c, "t/ec-a", A::Es256, &d).await.expect("sign v2");
    assert_eq!(s2.key_version, 2);
    assert!(
        verify(&mut c, "t/ec-a", 1, A::Es256, &d, &s)
            .await
            .expect("v1")
    );
    assert!(
        !verify(&mut c, "t/ec-a", 2, A::Es256, &d, &s)
            .await
            .expect("v1's signature, v2")
    );
    assert!(
        verify(&mut c, "t/ec-a", 0, A::Es256, &d, &s2.signature)
            .await
            .expect("v2")
    );
    // A wrapping key never signs; a signing key never wraps or encrypts.
    if token_kind().has_aes() {
        create(
            &mut c,
            "t/aes",
            pb::KeyType::Aes256,
            pb::Algorithm::Unspecified,
        )
        .await;
        let e = sign(&mut c, "t/aes", A::Es256, &d)
            .await
            .expect_err("AES key");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    }
    let e = wrap(&mut c, "t/ec-a", &[7; 32], b"")
        .await
        .expect_err("a signing key wraps");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    if rsa.is_some() {
        create(
            &mut c,
            "t/rsa-wrap",
            pb::KeyType::Rsa2048,
            pb::Algorithm::Unspecified,
        )
        .await;
        let e = sign(&mut c, "t/rsa-wrap", A::Rs256, &[1; 32])
            .await
            .expect_err("OAEP key");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("not a signing key"), "{}", e.message());
    }
    // Nor can a signing key be given wrapping operations, at creation or later.
    let ops = |o: Vec<pb::KeyOperation>| {
        Some(pb::KeyAttributes {
            operations: Some(pb::KeyOperations {
                operations: o.into_iter().map(Into::into).collect(),
            }),
            ..Default::default()
        })
    };
    let e = c
        .mgmt
        .create_key(pb::CreateKeyRequest {
            key: "t/ec-wrap".into(),
            key_type: pb::KeyType::EcP256.into(),
            attributes: ops(vec![pb::KeyOperation::Sign, pb::KeyOperation::Wrap]),
            ..Default::default()
        })
        .await
        .expect_err("a signing key that wraps");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("cannot allow wrap"), "{}", e.message());
    // Exactly the wrapping defaults, named, are refused too (not replaced by sign and verify),
    // and an empty list is not "the defaults".
    use pb::KeyOperation as Op;
    for (named, says) in [
        (
            vec![Op::Wrap, Op::Unwrap, Op::GenerateDataKey, Op::Rewrap],
            "cannot allow",
        ),
        (vec![], "name at least one operation"),
    ] {
        let e = c
            .mgmt
            .create_key(pb::CreateKeyRequest {
                key: "t/ec-wrap".into(),
                key_type: pb::KeyType::EcP256.into(),
                attributes: ops(named.clone()),
                ..Default::default()
            })
            .await
            .expect_err("named wrapping operations on a signing key");
        assert_eq!(e.code(), Code::InvalidArgument, "{named:?}: {e:?}");
        assert!(e.message().contains(says), "{named:?}: {}", e.message());
    }
    let e = c
        .mgmt
        .update_key(pb::UpdateKeyRequest {
            key: "t/ec-a".into(),
            attributes: ops(vec![pb::KeyOperation::Decrypt]),
            set_times: false,
        })
        .await
        .expect_err("a signing key that decrypts");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // And an EC key is an ECDSA key: no other algorithm fits it.
    let e = c
        .mgmt
        .create_key(pb::CreateKeyRequest {
            key: "t/ec-oaep".into(),
            key_type: pb::KeyType::EcP384.into(),
            algorithm: pb::Algorithm::RsaOaepSha256.into(),
            ..Default::default()
        })
        .await
        .expect_err("EC with OAEP");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A verify-only key verifies and does not sign.
    c.mgmt
        .update_key(pb::UpdateKeyRequest {
            key: "t/ec-b".into(),
            attributes: ops(vec![pb::KeyOperation::Verify]),
            set_times: false,
        })
        .await
        .expect("verify only");
    let e = sign(&mut c, "t/ec-b", A::Es256, &d)
        .await
        .expect_err("verify-only key signs");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        !verify(&mut c, "t/ec-b", 0, A::Es256, &d, &s)
            .await
            .expect("verify-only verifies")
    );
    drop(c);
    b.stop().await;
}

#[tokio::test]
async fn signing_keys_sign_only_and_wrapping_keys_never_sign_in_the_token() {
    const TEST: &str = "sign::signing_keys_sign_only_and_wrapping_keys_never_sign_in_the_token";
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    // Each signing key's version id, with the mechanisms its CKA_ALLOWED_MECHANISMS must be.
    let mut signing = Vec::new();
    for (name, kt, mechanisms) in [
        ("t/ec256", pb::KeyType::EcP256, &["CKM_ECDSA"][..]),
        ("t/ec384", pb::KeyType::EcP384, &["CKM_ECDSA"][..]),
        (
            "t/rsa-sign",
            pb::KeyType::Rsa2048,
            &["CKM_RSA_PKCS", "CKM_RSA_PKCS_PSS"][..],
        ),
    ] {
        if let Some(k) = create_signing(&mut c, TEST, name, kt).await {
            signing.push((hex::encode(&k.versions[0].id), mechanisms));
        }
    }
    let wrapping = create(
        &mut c,
        "t/rsa-oaep",
        pb::KeyType::Rsa2048,
        pb::Algorithm::Unspecified,
    )
    .await;
    let wrapping = hex::encode(&wrapping.versions[0].id);
    drop(c);
    b.stop().await;
    if signing.is_empty() {
        return;
    }
    let report = env.probe(&["inspect"]);
    let objects = report["objects"].as_array().expect("objects");
    let of = |id: &str| -> Vec<&serde_json::Value> {
        objects.iter().filter(|o| o["id"] == id).collect()
    };
    // A PKCS#11 2.20 token (openCryptoki, legacy_template) has no CKA_ALLOWED_MECHANISMS.
    let allowed_mechanisms = token_kind() != hsm_fixtures::token::TokenKind::OpenCryptoki;
    for (id, mechanisms) in &signing {
        let objs = of(id);
        assert_eq!(objs.len(), 2, "a key pair: {objs:?}");
        for o in objs {
            if allowed_mechanisms {
                // Its sign mechanism(s) only, read back through PKCS#11 as for KEKs
                // (portability.rs), on both halves.
                let mut got: Vec<_> = o["allowed_mechanisms"]
                    .as_array()
                    .unwrap_or_else(|| panic!("allowed mechanisms: {o}"))
                    .iter()
                    .filter_map(|m| m.as_str())
                    .collect();
                got.sort_unstable();
                assert_eq!(got, *mechanisms, "{o}");
            }
            assert_eq!(o["token"], true, "{o}");
            assert_eq!(o["modifiable"], false, "{o}");
            // A PKCS#11 2.20 token (openCryptoki, legacy_template) has no CKA_COPYABLE.
            if token_kind() == hsm_fixtures::token::TokenKind::OpenCryptoki {
                assert_ne!(o["copyable"], true, "{o}");
            } else {
                assert_eq!(o["copyable"], false, "{o}");
            }
            assert_ne!(o["derive"], true, "{o}");
            for role in ["encrypt", "decrypt", "wrap", "unwrap"] {
                assert_ne!(o[role], true, "a signing key may {role}: {o}");
            }
            if o["class"] == "CKO_PRIVATE_KEY" {
                assert_eq!(o["sign"], true, "{o}");
                assert_ne!(o["verify"], true, "{o}");
                assert_eq!(o["sensitive"], true, "{o}");
                assert_eq!(o["extractable"], false, "{o}");
                assert_eq!(o["never_extractable"], true, "{o}");
                assert_eq!(o["always_sensitive"], true, "{o}");
                assert_eq!(o["private"], true, "{o}");
            } else {
                assert_eq!(o["class"], "CKO_PUBLIC_KEY", "{o}");
                assert_eq!(o["verify"], true, "{o}");
                assert_ne!(o["sign"], true, "{o}");
            }
        }
    }
    for o in of(&wrapping) {
        assert_ne!(o["sign"], true, "a wrapping key signs: {o}");
        assert_ne!(o["verify"], true, "a wrapping key verifies: {o}");
    }
    // The broker starts again: every signing key passes its template check and identity check.
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let d = digest(A::Es256, b"after a restart");
    if let Ok(s) = sign(&mut c, "t/ec256", A::Es256, &d).await {
        assert!(
            verify(&mut c, "t/ec256", 0, A::Es256, &d, &s.signature)
                .await
                .expect("verify")
        );
    }
    drop(c);
    b.stop().await;
}

/// A token that lacks a sign mechanism (a Kryoptic slot hiding it) still serves everything
/// else; creating the key type that needs it is refused with FAILED_PRECONDITION naming the
/// mechanism, and the start-up log says so — never served unsafely.
#[tokio::test]
async fn a_token_without_a_sign_mechanism_refuses_that_key_type_and_says_why() {
    if skip_unless(
        "sign::a_token_without_a_sign_mechanism_refuses_that_key_type_and_says_why",
        TokenKind::Kryoptic,
        "only a Kryoptic slot can hide mechanisms (`mechanisms = [\"DENY\", ...]`)",
    ) {
        return;
    }
    for (denied, refused, served) in [
        ("CKM_ECDSA", pb::KeyType::EcP256, pb::KeyType::Rsa2048),
        (
            "CKM_RSA_PKCS_PSS",
            pb::KeyType::Rsa2048,
            pb::KeyType::EcP384,
        ),
    ] {
        // A fresh token each time: a key made under one denial would (rightly) stop the
        // broker from starting under the other.
        let env = Env::new();
        env.token
            .set_mechanisms(Some(&["DENY", denied]))
            .expect("rewrite kryoptic.conf");
        let b = env.start().await;
        let (logged, log) = b.log_contains(denied).await;
        assert!(logged, "the start-up log names {denied}: {log}");
        let mut c = b.clients_as(&env.pki.client).await;
        let name = format!("t/refused-{}", denied.to_ascii_lowercase());
        let algorithm = if refused == pb::KeyType::EcP256 {
            pb::Algorithm::Unspecified
        } else {
            pb::Algorithm::RsaSign
        };
        let e = c
            .mgmt
            .create_key(pb::CreateKeyRequest {
                key: name,
                key_type: refused.into(),
                algorithm: algorithm.into(),
                ..Default::default()
            })
            .await
            .expect_err("a key the token cannot serve");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains(denied), "{denied}: {}", e.message());
        // The other signing key type still works.
        let other = format!("t/served-{}", denied.to_ascii_lowercase());
        create_signing(&mut c, "served", &other, served)
            .await
            .expect("the other key type is served");
        drop(c);
        b.stop().await;
    }
}

#[tokio::test]
async fn batch_sign_signs_many_digests_in_one_call_each_with_its_own_result_and_record() {
    const TEST: &str =
        "sign::batch_sign_signs_many_digests_in_one_call_each_with_its_own_result_and_record";
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let Some(_) = create_signing(&mut c, TEST, "t/batch-ec", pb::KeyType::EcP256).await else {
        return;
    };
    let public = c
        .broker
        .get_public_key(pb::GetPublicKeyRequest {
            key: "t/batch-ec".into(),
            key_version: 0,
        })
        .await
        .expect("public key")
        .into_inner();
    let item = |key: &str, alg: i32, digest: Vec<u8>| pb::SignRequest {
        key: key.into(),
        algorithm: alg,
        digest,
        context: None,
    };
    let es256 = i32::from(A::Es256);
    let digests: Vec<Vec<u8>> = (0..40)
        .map(|i| digest(A::Es256, format!("message {i}").as_bytes()))
        .collect();
    let mut items: Vec<pb::SignRequest> = digests
        .iter()
        .map(|d| item("t/batch-ec", es256, d.clone()))
        .collect();
    // Bad items among good ones: each fails alone, with the code a single call would get.
    let bad = [
        (
            item("t/batch-ec", es256, vec![1; 31]),
            Code::InvalidArgument,
        ),
        (item("t/nope", es256, vec![1; 32]), Code::NotFound),
        (
            item("t/batch-ec", i32::from(A::Es384), vec![1; 48]),
            Code::FailedPrecondition,
        ),
        (item("t/batch-ec", 999, vec![1; 32]), Code::InvalidArgument),
    ];
    items.extend(bad.iter().map(|(i, _)| i.clone()));
    let r = c
        .broker
        .batch_sign(pb::BatchSignRequest {
            items,
            context: Some(pb::RequestContext {
                request_id: "batch-sign-1".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(r.results.len(), 44);
    for (i, (res, d)) in r.results.iter().zip(&digests).enumerate() {
        match &res.result {
            Some(pb::sign_result::Result::Ok(s)) => {
                assert_eq!((s.key.as_str(), s.key_version), ("t/batch-ec", 1));
                verify_independently(A::Es256, &public.spki_pem, d, &s.signature)
                    .unwrap_or_else(|e| panic!("item {i}: {e}"));
            }
            other => panic!("item {i}: {other:?}"),
        }
    }
    for (res, (_, code)) in r.results[40..].iter().zip(&bad) {
        match &res.result {
            Some(pb::sign_result::Result::Error(e)) => {
                assert_eq!(Code::from(e.code), *code, "{e:?}")
            }
            other => panic!("expected {code:?}: {other:?}"),
        }
    }
    // Too many items: the whole call is refused.
    let e = c
        .broker
        .batch_sign(pb::BatchSignRequest {
            items: vec![item("t/batch-ec", es256, digests[0].clone()); 1001],
            context: None,
        })
        .await
        .expect_err("1001 items");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    drop(c);
    b.stop().await;
    // One audit record per item (request id `ID#i`), then the request's own.
    let recs: Vec<_> = env
        .audit_records()
        .into_iter()
        .filter(|r| r["op"] == "BatchSign")
        .filter(|r| {
            r["request_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("batch-sign-1"))
        })
        .collect();
    assert_eq!(recs.len(), 45, "44 items and the request");
    assert_eq!(recs[0]["request_id"], "batch-sign-1#0");
    assert_eq!(recs[0]["outcome"], "OK");
    assert_eq!(recs[40]["outcome"], "INVALID_ARGUMENT");
    assert_eq!(recs[41]["outcome"], "NOT_FOUND");
    assert_eq!(recs[44]["request_id"], "batch-sign-1");
}
