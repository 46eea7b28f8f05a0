//! RSA keys interoperate with standard tools: a ciphertext made with the exported public key by
//! an independent library (the `rsa` crate) and by OpenSSL's command line unwraps to the DEK.

use keybroker_proto::v1 as pb;
use rsa::{Oaep, RsaPublicKey, pkcs8::DecodePublicKey, traits::PublicKeyParts};
use tonic::Code;

use crate::common::*;

async fn unwrap_raw(
    c: &mut keybroker::client::Clients,
    key: &str,
    version: u32,
    alg: i32,
    ct: Vec<u8>,
) -> Result<pb::UnwrapKeyResponse, tonic::Status> {
    c.broker
        .unwrap_key(pb::UnwrapKeyRequest {
            key: key.into(),
            aad: vec![],
            wrapped: Some(pb::unwrap_key_request::Wrapped::Raw(pb::RawCiphertext {
                ciphertext: ct,
                key_version: version,
                algorithm: alg,
            })),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn raw_oaep_ciphertext_from_independent_libraries_unwraps() {
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    for (key, kt, bits) in [
        ("t/rsa2048", pb::KeyType::Rsa2048, 2048usize),
        ("t/rsa3072", pb::KeyType::Rsa3072, 3072),
    ] {
        let k = create(&mut c, key, kt, pb::Algorithm::Unspecified).await;
        let pk = c
            .broker
            .get_public_key(pb::GetPublicKeyRequest {
                key: key.into(),
                key_version: 0,
            })
            .await
            .expect("public key")
            .into_inner();
        assert_eq!(pk.key_version, 1);
        assert_eq!(pk.algorithm, k.algorithm);
        assert_eq!(pk.key_version_id, k.versions[0].id);
        let public = RsaPublicKey::from_public_key_pem(&pk.spki_pem).expect("SPKI PEM parses");
        assert_eq!(public.size() * 8, bits);
        // The JWK carries the same key.
        let jwk: serde_json::Value = serde_json::from_str(&pk.jwk).expect("JWK is JSON");
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        assert_eq!(jwk["kty"], "RSA");
        assert_eq!(
            b64.decode(jwk["n"].as_str().expect("n")).expect("n b64"),
            public.n().to_bytes_be()
        );
        assert_eq!(
            b64.decode(jwk["e"].as_str().expect("e")).expect("e b64"),
            public.e().to_bytes_be()
        );
        assert_eq!(jwk["kid"], hex::encode(&k.versions[0].id));
        let sha1 = k.algorithm == pb::Algorithm::RsaOaepSha1 as i32;
        assert_eq!(jwk["alg"], if sha1 { "RSA-OAEP" } else { "RSA-OAEP-256" });

        // 1. The `rsa` crate.
        let dek = random_dek(32);
        let mut rng = rsa::rand_core::OsRng;
        let ct = if sha1 {
            public.encrypt(&mut rng, Oaep::new::<sha1::Sha1>(), &dek)
        } else {
            public.encrypt(&mut rng, Oaep::new::<sha2::Sha256>(), &dek)
        }
        .expect("encrypt");
        let u = unwrap_raw(&mut c, key, 1, k.algorithm, ct.clone())
            .await
            .expect("raw unwrap");
        assert_eq!(u.plaintext, dek, "rsa crate ciphertext");
        // Wrong algorithm or version named → refused with the right code.
        let other = if sha1 {
            pb::Algorithm::RsaOaepSha256
        } else {
            pb::Algorithm::RsaOaepSha1
        } as i32;
        assert_eq!(
            unwrap_raw(&mut c, key, 1, other, ct.clone())
                .await
                .expect_err("alg")
                .code(),
            Code::InvalidArgument
        );
        assert_eq!(
            unwrap_raw(&mut c, key, 7, k.algorithm, ct.clone())
                .await
                .expect_err("version")
                .code(),
            Code::NotFound
        );
        let mut bad = ct.clone();
        bad[10] ^= 1;
        assert_unauthentic(
            unwrap_raw(&mut c, key, 1, k.algorithm, bad).await,
            "flipped raw ciphertext",
        );

        // 2. OpenSSL's command line.
        let dir = tempfile::tempdir().expect("tmp");
        let pem = dir.path().join("pub.pem");
        let input = dir.path().join("dek.bin");
        let out = dir.path().join("ct.bin");
        std::fs::write(&pem, &pk.spki_pem).expect("write pem");
        let dek2 = random_dek(32);
        std::fs::write(&input, &dek2).expect("write dek");
        let md = if sha1 { "sha1" } else { "sha256" };
        let status = std::process::Command::new("openssl")
            .args(["pkeyutl", "-encrypt", "-pubin", "-inkey"])
            .arg(&pem)
            .arg("-in")
            .arg(&input)
            .arg("-out")
            .arg(&out)
            .args([
                "-pkeyopt",
                "rsa_padding_mode:oaep",
                "-pkeyopt",
                &format!("rsa_oaep_md:{md}"),
                "-pkeyopt",
                &format!("rsa_mgf1_md:{md}"),
            ])
            .status()
            .expect("run openssl (tests/run installs it)");
        assert!(status.success(), "openssl pkeyutl failed");
        let ct = std::fs::read(&out).expect("read ct");
        let u = unwrap_raw(&mut c, key, 1, k.algorithm, ct)
            .await
            .expect("openssl ciphertext unwraps");
        assert_eq!(u.plaintext, dek2, "OpenSSL ciphertext");
    }
    b.stop().await;
}

/// Issue 18, item 10: the raw RSA path unwraps DEKs, not arbitrary data. A block that holds
/// something else than a DEK (here 20 bytes, and 100) is refused with the one unauthentic
/// error, as an envelope holding it would be; the broker is no general RSA decryption oracle.
#[tokio::test]
async fn a_raw_rsa_block_that_holds_no_dek_is_refused() {
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let k = create(
        &mut c,
        "t/rsa",
        pb::KeyType::Rsa2048,
        pb::Algorithm::Unspecified,
    )
    .await;
    let pk = c
        .broker
        .get_public_key(pb::GetPublicKeyRequest {
            key: "t/rsa".into(),
            key_version: 0,
        })
        .await
        .expect("public key")
        .into_inner();
    let public = RsaPublicKey::from_public_key_pem(&pk.spki_pem).expect("SPKI PEM parses");
    let sha1 = k.algorithm == pb::Algorithm::RsaOaepSha1 as i32;
    let mut rng = rsa::rand_core::OsRng;
    for len in [20usize, 100] {
        let secret = random_dek(len);
        let ct = if sha1 {
            public.encrypt(&mut rng, Oaep::new::<sha1::Sha1>(), &secret)
        } else {
            public.encrypt(&mut rng, Oaep::new::<sha2::Sha256>(), &secret)
        }
        .expect("encrypt");
        assert_unauthentic(
            unwrap_raw(&mut c, "t/rsa", 1, k.algorithm, ct).await,
            &format!("a {len}-byte block"),
        );
    }
    b.stop().await;
}
