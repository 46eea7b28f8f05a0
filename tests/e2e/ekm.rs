//! The Azure Managed HSM EKM proxy door end to end: the real binary with `[ekm]`, a real
//! token, real TLS 1.3 with client certificates, and a client written from the public reference
//! (`MicrosoftDocs/azure-security-docs`,
//! `articles/key-vault/managed-hsm/external-key-management-proxy-api-reference.md`): plain
//! HTTP/1.1 over rustls, bodies with the reference's field names, answers checked against its
//! statuses. The raw outputs are checked with independent libraries: `aes-kw` (RFC 5649 and
//! RFC 3394) with key material imported through BYOK, and `rsa` (OAEP) with the public key the
//! metadata gives.

use std::{path::Path, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use hsm_fixtures::{
    fault::Rule,
    pki::{Issued, LeafSpec},
};
use keybroker_proto::v1 as pb;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde_json::{Value, json};

use crate::common::*;

/// The subject CN of the Managed HSM client certificate the door is configured for.
pub(crate) const MHSM_CN: &str = "mhsm.contoso.example";
const POOL: &str = "mhsm-pool-name";
const V: &str = "?api-version=0.1-preview";

/// An env whose broker serves `[ekm]` with prefix `/contoso` (tenant `contoso`), client
/// certificates of the test CA with subject CN [`MHSM_CN`], and a policy binding `ekm:contoso`
/// as a HYOK service identity (wrap and unwrap only).
pub(crate) fn ekm_env() -> Env {
    ekm_env_with(Options::default(), "", "")
}

/// [`ekm_env`] with the broker's `opts` (its policy is set here), `policy` bindings and
/// `[[ekm.prefix]]` sections added.
fn ekm_env_with(opts: Options, policy: &str, prefixes: &str) -> Env {
    let policy = format!(
        r#"{policy}
[[binding]]
identity = "{TEST_CLIENT_ID}"
roles = ["administrator", "crypto-officer", "crypto-user", "auditor"]
scope = "all"
[[binding]]
identity = "ekm:contoso"
role = "service-encryption-user"
scope = "tenant:contoso"

[hyok]
service_identities = ["ekm:*"]
"#,
        TEST_CLIENT_ID = hsm_fixtures::pki::TEST_CLIENT_ID
    );
    let env = Env::with(Options {
        policy: Some(policy),
        ..opts
    });
    let section = ekm_section(&env, prefixes);
    env.edit_config(|t| format!("{t}\n{section}"));
    env
}

/// The `[ekm]` section of [`ekm_env`] for `env`'s PKI, with `prefixes` added.
pub(crate) fn ekm_section(env: &Env, prefixes: &str) -> String {
    format!(
        r#"
[ekm]
listen = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
client_cn = ["{MHSM_CN}"]
header_read_timeout_ms = 3000

[[ekm.prefix]]
path = "/contoso"
tenant = "contoso"
justification = "CUSTOMER_INITIATED_ACCESS"
{prefixes}
"#,
        cert = env.pki.server.cert_path.display(),
        key = env.pki.server.key_path.display(),
        ca = env.pki.ca.cert_path.display(),
    )
}

pub(crate) fn mhsm_cert(env: &Env, stem: &str, cn: &str) -> Issued {
    env.pki
        .ca
        .issue(
            stem,
            &LeafSpec {
                common_name: cn.into(),
                dns: vec![cn.into()],
                valid_days: 30,
                ..Default::default()
            },
        )
        .expect("issue")
}

/// A TLS client trusting the test CA, with an optional client certificate, speaking TLS 1.3
/// and 1.2 (or only 1.2).
pub(crate) fn tls_client(
    ca: &Path,
    cert: Option<(&Path, &Path)>,
    tls12_only: bool,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(c.expect("CA")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider);
    let b = if tls12_only {
        b.with_protocol_versions(&[&rustls::version::TLS12])
    } else {
        b.with_safe_default_protocol_versions()
    }
    .expect("versions")
    .with_root_certificates(roots);
    let cfg = match cert {
        None => b.with_no_client_auth(),
        Some((c, k)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(c)
                .expect("read cert")
                .collect::<Result<_, _>>()
                .expect("cert");
            let key = PrivateKeyDer::from_pem_file(k).expect("key");
            b.with_client_auth_cert(chain, key).expect("client auth")
        }
    };
    Arc::new(cfg)
}

/// What the door answered.
type Answer = HttpAnswer;

impl Answer {
    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
    fn value(&self) -> Vec<u8> {
        let v = self.body["value"].as_str().expect("a value");
        assert!(!v.contains('='), "base64url without padding: {v}");
        B64URL.decode(v).expect("base64url")
    }
}

/// One HTTP/1.1 exchange with the door on a fresh TLS connection (see [`https_exchange`]).
async fn exchange(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<Answer, String> {
    let headers = [
        ("Host".to_string(), "localhost".to_string()),
        ("Content-Type".to_string(), "application/json".to_string()),
    ];
    https_exchange(addr, tls, method, path, &headers, body).await
}

/// Managed HSM, as far as the door can tell.
struct Mhsm {
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    requests: usize,
}

impl Mhsm {
    async fn post(&mut self, path: &str, body: &Value) -> Answer {
        self.requests += 1;
        exchange(
            self.addr,
            self.tls.clone(),
            "POST",
            path,
            body.to_string().as_bytes(),
        )
        .await
        .expect("an answer")
    }

    async fn wrap(&mut self, key: &str, alg: &str, value: &[u8]) -> Answer {
        let body = op_body(alg, value);
        self.post(&format!("/contoso/{key}/wrapkey{V}"), &body)
            .await
    }

    async fn unwrap(&mut self, key: &str, alg: &str, value: &[u8]) -> Answer {
        let body = op_body(alg, value);
        self.post(&format!("/contoso/{key}/unwrapkey{V}"), &body)
            .await
    }
}

fn context() -> Value {
    json!({
        "request_id": format!("req-{}", hex_id()),
        "correlation_id": format!("corr-{}", hex_id()),
        "pool_name": POOL,
    })
}

fn op_body(alg: &str, value: &[u8]) -> Value {
    json!({"request_context": context(), "alg": alg, "value": B64URL.encode(value)})
}

#[track_caller]
fn assert_error(a: &Answer, status: u16, code: &str, what: &str) {
    assert_eq!((a.status, a.code()), (status, code), "{what}: {}", a.raw);
    assert!(
        a.body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: a message: {}",
        a.raw
    );
}

/// Imports fresh AES-256 material as a key of `alg` (an AES key wrap) through BYOK (the `rsa`
/// crate plays the customer's side) and returns the material; the broker's refusal to make the
/// import key (a token that cannot serve `alg`) is returned.
async fn import_aes(
    c: &mut keybroker::client::Clients,
    name: &str,
    alg: pb::Algorithm,
) -> Result<Vec<u8>, tonic::Status> {
    use rsa::{Oaep, RsaPublicKey, pkcs8::DecodePublicKey};
    let ik = c
        .mgmt
        .create_import_key(pb::CreateImportKeyRequest {
            key_type: pb::KeyType::Rsa3072.into(),
            algorithm: alg.into(),
        })
        .await?
        .into_inner();
    let public = RsaPublicKey::from_public_key_pem(&ik.spki_pem).expect("SPKI");
    let material = random_dek(32);
    let mut rng = rsa::rand_core::OsRng;
    let blob = if ik.oaep == pb::Algorithm::RsaOaepSha1 as i32 {
        public.encrypt(&mut rng, Oaep::new::<sha1::Sha1>(), &material)
    } else {
        public.encrypt(&mut rng, Oaep::new::<sha2::Sha256>(), &material)
    }
    .expect("encrypt");
    let k = c
        .mgmt
        .import_key(pb::ImportKeyRequest {
            key: name.into(),
            key_type: pb::KeyType::Aes256.into(),
            import_key_id: ik.import_key_id,
            wrapped_material: blob,
            ..Default::default()
        })
        .await
        .expect("import")
        .into_inner();
    assert_eq!(k.algorithm, alg as i32);
    Ok(material)
}

#[tokio::test]
async fn ekm_door_serves_the_reference_with_raw_standard_outputs() {
    crate::require_aes!();
    let env = ekm_env();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let material = import_aes(&mut c, "contoso/kwp", pb::Algorithm::AesKeyWrapPad)
        .await
        .expect("aes-kwp import");
    // RFC 3394 keys exist where the token's CKM_AES_KEY_WRAP passed its known-answer test; a
    // token without it refuses the import key, saying why, and A256KW is skipped (printed).
    let kw_material = match import_aes(&mut c, "contoso/kw", pb::Algorithm::AesKeyWrap).await {
        Ok(m) => Some(m),
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            assert!(s.message().contains("CKM_AES_KEY_WRAP"), "{s:?}");
            skip(
                "ekm::ekm_door_serves_the_reference_with_raw_standard_outputs (A256KW)",
                &format!("skipped: {}", s.message()),
            );
            None
        }
        Err(s) => panic!("aes-kw import: {s:?}"),
    };
    let rsa_key = create(
        &mut c,
        "contoso/rsa",
        pb::KeyType::Rsa2048,
        pb::Algorithm::Unspecified,
    )
    .await;
    let sha1 = rsa_key.algorithm == pb::Algorithm::RsaOaepSha1 as i32;
    let (rsa_alg, other_rsa_alg) = if sha1 {
        ("RSA-OAEP", "RSA-OAEP-256")
    } else {
        ("RSA-OAEP-256", "RSA-OAEP")
    };
    create(
        &mut c,
        "contoso/gcm",
        pb::KeyType::Aes256,
        pb::Algorithm::Aes256Gcm,
    )
    .await;
    create(
        &mut c,
        "contoso/off",
        pb::KeyType::Aes256,
        pb::Algorithm::AesKeyWrapPad,
    )
    .await;
    c.mgmt
        .update_key(pb::UpdateKeyRequest {
            key: "contoso/off".into(),
            attributes: Some(pb::KeyAttributes {
                enabled: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("disable");
    let audit_before = std::fs::read_to_string(env.audit_log())
        .expect("audit log")
        .lines()
        .count();
    let cert = mhsm_cert(&env, "mhsm", MHSM_CN);
    let mut m = Mhsm {
        addr: b
            .ekm_addr
            .expect("the broker prints 'keybroker: ekm on ADDR'"),
        tls: tls_client(
            &env.pki.ca.cert_path,
            Some((&cert.cert_path, &cert.key_path)),
            false,
        ),
        requests: 0,
    };

    // Proxy information.
    let a = m
        .post(
            &format!("/contoso/info{V}"),
            &json!({"request_context": context()}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.body["api_version"], "0.1-preview");
    assert_eq!(a.body["proxy_vendor"], "keybroker");
    for f in ["proxy_name", "ekm_vendor", "ekm_product"] {
        assert!(
            a.body[f].as_str().is_some_and(|s| !s.is_empty()),
            "{f}: {}",
            a.raw
        );
    }
    assert!(
        a.raw
            .to_ascii_lowercase()
            .contains("content-type: application/json")
    );

    // Key metadata: AES key-wrap keys (RFC 5649, RFC 3394), and an RSA key whose n and e are
    // the public key's.
    let aes_keys: &[&str] = if kw_material.is_some() {
        &["kwp", "kw"]
    } else {
        &["kwp"]
    };
    for key in aes_keys {
        let a = m
            .post(
                &format!("/contoso/{key}/metadata{V}"),
                &json!({"request_context": context()}),
            )
            .await;
        assert_eq!(a.status, 200, "{key}: {}", a.raw);
        assert_eq!(
            a.body,
            json!({"key_type": "oct", "key_size": 256, "key_ops": ["wrapKey", "unwrapKey"]})
        );
    }
    let a = m
        .post(
            &format!("/contoso/rsa/metadata{V}"),
            &json!({"request_context": context()}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.body["key_type"], "RSA");
    assert_eq!(a.body["key_size"], 2048);
    assert_eq!(a.body["key_ops"], json!(["wrapKey", "unwrapKey"]));
    assert_eq!(a.body["e"], "AQAB");
    let n = B64URL
        .decode(a.body["n"].as_str().expect("n"))
        .expect("n is base64url");
    let pk = c
        .broker
        .get_public_key(pb::GetPublicKeyRequest {
            key: "contoso/rsa".into(),
            key_version: 0,
        })
        .await
        .expect("public key")
        .into_inner();
    use rsa::{Oaep, RsaPublicKey, pkcs8::DecodePublicKey, traits::PublicKeyParts};
    let public = RsaPublicKey::from_public_key_pem(&pk.spki_pem).expect("SPKI");
    assert_eq!(n, public.n().to_bytes_be());
    assert_eq!(n.len(), 256);

    // A256KWP and A256KW: the output is RFC 5649's (RFC 3394's), as `aes-kw` computes it with
    // the imported material; and what `aes-kw` wraps unwraps through the door.
    type Kw = fn(&aes_kw::KekAes256, &[u8]) -> Result<Vec<u8>, aes_kw::Error>;
    let kek = aes_kw::KekAes256::try_from(material.as_slice()).expect("KEK");
    let mut key_wraps: Vec<(&str, &str, aes_kw::KekAes256, Kw, Kw)> = vec![(
        "kwp",
        "A256KWP",
        kek.clone(),
        |k, d| k.wrap_with_padding_vec(d),
        |k, w| k.unwrap_with_padding_vec(w),
    )];
    if let Some(kw) = &kw_material {
        key_wraps.push((
            "kw",
            "A256KW",
            aes_kw::KekAes256::try_from(kw.as_slice()).expect("KEK"),
            |k, d| k.wrap_vec(d),
            |k, w| k.unwrap_vec(w),
        ));
    }
    let dek = random_dek(32);
    let mut outputs = Vec::new();
    for (key, alg, kek, wrap, unwrap) in &key_wraps {
        let a = m.wrap(key, alg, &dek).await;
        assert_eq!(a.status, 200, "{alg}: {}", a.raw);
        let wrapped = a.value();
        assert_eq!(wrapped.len(), dek.len() + 8, "{alg}");
        assert_eq!(unwrap(kek, &wrapped).expect("aes-kw unwraps"), dek, "{alg}");
        assert_eq!(wrapped, wrap(kek, &dek).expect("aes-kw"), "{alg}");
        let a = m.unwrap(key, alg, &wrapped).await;
        assert_eq!(
            (a.status, a.value()),
            (200, dek.clone()),
            "{alg}: {}",
            a.raw
        );
        let local = random_dek(40);
        let a = m
            .unwrap(key, alg, &wrap(kek, &local).expect("aes-kw"))
            .await;
        assert_eq!((a.status, a.value()), (200, local), "{alg}: {}", a.raw);
        // The integrity check refuses a flipped bit, as one InvalidCiphertext.
        let mut bad = wrapped.clone();
        bad[5] ^= 1;
        let a = m.unwrap(key, alg, &bad).await;
        assert_error(
            &a,
            400,
            "InvalidCiphertext",
            &format!("{alg}: a flipped bit"),
        );
        outputs.push(wrapped);
    }
    let wrapped = outputs.swap_remove(0);
    // The two AES key wraps are not interchangeable: each key performs its own algorithm only.
    if kw_material.is_some() {
        for (key, alg, what) in [
            ("kw", "A256KWP", "RFC 5649 on an RFC 3394 key"),
            ("kw", rsa_alg, "an RSA algorithm on an RFC 3394 key"),
        ] {
            let a = m.unwrap(key, alg, &wrapped).await;
            assert_error(&a, 400, "UnsupportedAlgorithm", what);
        }
    }
    // The reference's own example body (its value is the text "1234...5678", 32 bytes).
    let a = m
        .post(
            &format!("/contoso/kwp/wrapkey{V}"),
            &json!({
                "request_context": {
                    "request_id": "6476b291-7c15-4d0b-aef9-03688390cb8e",
                    "correlation_id": "aa9a3cb4-82b4-11f0-afc6-5ffd3bdade85",
                    "pool_name": "mhsm-pool-name"
                },
                "alg": "A256KWP",
                "value": "MTIzNDU2NzgxMjM0NTY3ODEyMzQ1Njc4MTIzNDU2Nzg"
            }),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(
        kek.unwrap_with_padding_vec(&a.value()).expect("aes-kw"),
        b"12345678123456781234567812345678"
    );

    // RSA-OAEP(-256): a block the `rsa` crate made unwraps; a block the door made is one
    // modulus long and unwraps again.
    let mut rng = rsa::rand_core::OsRng;
    let block = if sha1 {
        public.encrypt(&mut rng, Oaep::new::<sha1::Sha1>(), &dek)
    } else {
        public.encrypt(&mut rng, Oaep::new::<sha2::Sha256>(), &dek)
    }
    .expect("encrypt");
    let a = m.unwrap("rsa", rsa_alg, &block).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.value(), dek);
    let a = m.wrap("rsa", rsa_alg, &dek).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    let block = a.value();
    assert_eq!(block.len(), 256);
    let a = m.unwrap("rsa", rsa_alg, &block).await;
    assert_eq!((a.status, a.value()), (200, dek.clone()), "{}", a.raw);

    // Algorithms the key does not perform: the reference's 400 for an unsupported algorithm.
    for (key, alg, what) in [
        ("kwp", "A256KW", "RFC 3394 on an RFC 5649 key"),
        ("kwp", rsa_alg, "an RSA algorithm on an AES key"),
        ("rsa", "A256KWP", "an AES algorithm on an RSA key"),
        ("rsa", other_rsa_alg, "the other OAEP hash"),
        ("kwp", "RS256", "not a wrapping algorithm"),
    ] {
        let a = m.wrap(key, alg, &dek).await;
        assert_error(&a, 400, "UnsupportedAlgorithm", what);
    }
    let a = m
        .post(
            &format!("/contoso/gcm/metadata{V}"),
            &json!({"request_context": context()}),
        )
        .await;
    assert_error(
        &a,
        400,
        "UnsupportedAlgorithm",
        "an AES-GCM key has no EKM algorithm",
    );

    // Every other error status of the reference.
    let a = m.unwrap("kwp", "A256KWP", &wrapped[..16]).await;
    assert_error(&a, 400, "InvalidCiphertext", "a truncated wrapped key");
    let a = m.wrap("nope", "A256KWP", &dek).await;
    assert_error(&a, 404, "KeyNotFound", "an unknown key");
    let a = m.wrap("off", "A256KWP", &dek).await;
    assert_error(&a, 403, "KeyDisabled", "a disabled key");
    for q in ["?api-version=1.0", "", "?api-version="] {
        let a = m
            .post(
                &format!("/contoso/kwp/wrapkey{q}"),
                &op_body("A256KWP", &dek),
            )
            .await;
        assert_error(&a, 400, "UnsupportedApiVersion", q);
        assert!(
            a.body["message"]
                .as_str()
                .is_some_and(|s| s.contains("0.1-preview")),
            "{}",
            a.raw
        );
    }
    let a = m
        .post(
            &format!("/contoso/kwp/wrapkey{V}"),
            &json!({"alg": "A256KWP", "value": B64URL.encode(&dek)}),
        )
        .await;
    assert_error(&a, 400, "InvalidRequest", "no request_context");
    let a = m
        .post(
            &format!("/contoso/kwp/wrapkey{V}"),
            &json!({"request_context": context(), "alg": "A256KWP", "value": "a+b/"}),
        )
        .await;
    assert_error(&a, 400, "InvalidRequest", "base64, not base64url");
    let a = m.wrap("kwp", "A256KWP", &random_dek(8)[..7]).await;
    assert_error(&a, 400, "InvalidRequest", "a 7-byte key");
    let a = m
        .post(&format!("/other/kwp/wrapkey{V}"), &op_body("A256KWP", &dek))
        .await;
    assert_error(&a, 404, "PathNotFound", "an unknown prefix");
    m.requests += 1;
    let a = exchange(
        m.addr,
        m.tls.clone(),
        "GET",
        &format!("/contoso/info{V}"),
        b"",
    )
    .await
    .expect("an answer");
    assert_eq!(a.status, 405, "{}", a.raw);

    // The HYOK switch off: the prefix's identity is a HYOK service identity.
    c.hyok
        .disconnect(pb::HyokSwitchRequest {
            reason: "ekm test".into(),
        })
        .await
        .expect("disconnect");
    let a = m.unwrap("kwp", "A256KWP", &wrapped).await;
    assert_error(&a, 403, "ExternalKeyAccessDisconnected", "HYOK switch off");
    c.hyok
        .reconnect(pb::HyokSwitchRequest {
            reason: "ekm test".into(),
        })
        .await
        .expect("reconnect");
    let a = m.unwrap("kwp", "A256KWP", &wrapped).await;
    assert_eq!((a.status, a.value()), (200, dek.clone()), "{}", a.raw);

    // After a rotation, what the old version wrapped still unwraps; new wraps use the new one.
    // (The imported key's material is the test's; rotation is checked on the RSA key, whose
    // versions the door tries newest first.)
    c.mgmt
        .rotate_key(pb::RotateKeyRequest {
            key: "contoso/rsa".into(),
        })
        .await
        .expect("rotate");
    let a = m.unwrap("rsa", rsa_alg, &block).await;
    assert_eq!((a.status, a.value()), (200, dek.clone()), "{}", a.raw);

    // The documented curl example (docs/src/ekm.md), with curl's own TLS and client certificate.
    let curl = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--tlsv1.3", "--cacert"])
        .arg(&env.pki.ca.cert_path)
        .arg("--cert")
        .arg(&cert.cert_path)
        .arg("--key")
        .arg(&cert.key_path)
        .args([
            "-H",
            "Content-Type: application/json",
            "--data",
            r#"{"request_context":{"request_id":"r-1","correlation_id":"c-1","pool_name":"mhsm-pool-name"}}"#,
            &format!("https://localhost:{}/contoso/info{V}", m.addr.port()),
        ])
        .output();
    match curl {
        Ok(out) => {
            m.requests += 1;
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("\"api_version\":\"0.1-preview\""),
                "curl: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) => skip("ekm curl example", &format!("no curl: {e}")),
    }

    // One audit record per EKM request, written before its reply, with the request_context.
    drop(c);
    let log = std::fs::read_to_string(env.audit_log()).expect("audit log");
    let recs: Vec<Value> = log
        .lines()
        .skip(audit_before)
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let ekm: Vec<&Value> = recs
        .iter()
        .filter(|r| {
            r["kind"] == "request" && r["op"].as_str().is_some_and(|o| o.starts_with("Ekm"))
        })
        .collect();
    assert_eq!(ekm.len(), m.requests, "{log}");
    let w = ekm
        .iter()
        .find(|r| {
            r["op"] == "EkmWrapKey"
                && r["outcome"] == "OK"
                && r["request_id"] == "6476b291-7c15-4d0b-aef9-03688390cb8e"
        })
        .expect("the reference example's wrap, audited with its request_id");
    assert_eq!(w["caller"], "ekm:contoso");
    assert_eq!(w["key"], "contoso/kwp");
    assert_eq!(w["correlation_id"], "aa9a3cb4-82b4-11f0-afc6-5ffd3bdade85");
    assert_eq!(w["upstream"]["principal"], POOL);
    assert_eq!(w["upstream"]["operation"], "EkmWrapKey");
    assert_eq!(w["justification"], "CUSTOMER_INITIATED_ACCESS");
    assert!(
        ekm.iter()
            .any(|r| r["op"] == "EkmUnwrapKey" && r["outcome"] == "PERMISSION_DENIED"),
        "the HYOK refusal is audited: {ekm:?}"
    );
    assert!(
        !log.contains(&B64URL.encode(&dek)),
        "no key material in the audit trail"
    );
    let broker_log = b.stop().await;
    assert!(
        !broker_log.contains(&B64URL.encode(&dek)),
        "no key material in the log"
    );
    let (ok, report) = env.verify_audit(&env.audit_log());
    assert!(ok, "{report}");
}

#[tokio::test]
async fn ekm_handshake_refuses_wrong_cn_wrong_ca_no_certificate_and_tls12() {
    let env = ekm_env();
    let report = env.check_config().expect("check-config accepts [ekm]");
    assert_eq!(report["ekm"]["prefixes"], json!(["/contoso"]), "{report}");
    let b = env.start().await;
    let addr = b.ekm_addr.expect("ekm listener");
    let body = json!({"request_context": context()}).to_string();
    let path = format!("/contoso/info{V}");
    let ca = &env.pki.ca.cert_path;
    let good = mhsm_cert(&env, "mhsm", MHSM_CN);
    let a = exchange(
        addr,
        tls_client(ca, Some((&good.cert_path, &good.key_path)), false),
        "POST",
        &path,
        body.as_bytes(),
    )
    .await
    .expect("Managed HSM's certificate is accepted");
    assert_eq!(a.status, 200, "{}", a.raw);
    let other_cn = mhsm_cert(&env, "other", "mhsm.fabrikam.example");
    // The right subject CN from a CA the door does not trust: only the CA is wrong.
    let other_ca = env
        .pki
        .foreign_ca
        .issue(
            "mhsm-foreign",
            &LeafSpec {
                common_name: MHSM_CN.into(),
                dns: vec![MHSM_CN.into()],
                valid_days: 30,
                ..Default::default()
            },
        )
        .expect("issue");
    for (what, tls) in [
        ("no client certificate", tls_client(ca, None, false)),
        (
            "another subject CN",
            tls_client(ca, Some((&other_cn.cert_path, &other_cn.key_path)), false),
        ),
        (
            "another CA and another CN",
            tls_client(
                ca,
                Some((&env.pki.foreign.cert_path, &env.pki.foreign.key_path)),
                false,
            ),
        ),
        (
            "the right CN from another CA",
            tls_client(ca, Some((&other_ca.cert_path, &other_ca.key_path)), false),
        ),
        (
            "TLS 1.2",
            tls_client(ca, Some((&good.cert_path, &good.key_path)), true),
        ),
    ] {
        let r = exchange(addr, tls, "POST", &path, body.as_bytes()).await;
        assert!(r.is_err(), "{what}: answered {r:?}");
    }
    let log = b.stop().await;
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert!(log.contains("subject CN not configured"), "{log}");
}

/// The reference's refusals that the main test cannot produce with one caller and a healthy
/// token: a role that does not allow the operation (roles hold through this door as through
/// gRPC), a key whose allowed operations lack it, an expired key, the per-caller refusal budget,
/// an HSM that refuses the key's function, and an HSM that fails.
#[tokio::test]
async fn ekm_door_answers_denied_not_allowed_expired_too_many_internal_and_unavailable() {
    crate::require_aes!();
    // `/audit` is a second door onto tenant contoso, for an identity whose role (auditor)
    // may read but not wrap.
    let env = ekm_env_with(
        Options {
            faults: true,
            server_extra: "refused_per_second = 1\nrefused_burst = 3".into(),
            ..Default::default()
        },
        r#"
[[binding]]
identity = "ekm:audit"
role = "auditor"
scope = "tenant:contoso"
"#,
        r#"
[[ekm.prefix]]
path = "/audit"
tenant = "contoso"
identity = "ekm:audit"
justification = "CUSTOMER_INITIATED_ACCESS"
"#,
    );
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    for key in ["contoso/kwp", "contoso/unwrap-only", "contoso/expired"] {
        create(
            &mut c,
            key,
            pb::KeyType::Aes256,
            pb::Algorithm::AesKeyWrapPad,
        )
        .await;
    }
    c.mgmt
        .update_key(pb::UpdateKeyRequest {
            key: "contoso/unwrap-only".into(),
            attributes: Some(pb::KeyAttributes {
                operations: Some(pb::KeyOperations {
                    operations: vec![pb::KeyOperation::Unwrap.into()],
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("unwrap only");
    let past = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
        - 1000;
    c.mgmt
        .update_key(pb::UpdateKeyRequest {
            key: "contoso/expired".into(),
            attributes: Some(pb::KeyAttributes {
                expires_ms: past,
                ..Default::default()
            }),
            set_times: true,
        })
        .await
        .expect("expire");
    let cert = mhsm_cert(&env, "mhsm", MHSM_CN);
    let mut m = Mhsm {
        addr: b.ekm_addr.expect("ekm listener"),
        tls: tls_client(
            &env.pki.ca.cert_path,
            Some((&cert.cert_path, &cert.key_path)),
            false,
        ),
        requests: 0,
    };
    let dek = random_dek(32);
    let a = m.wrap("kwp", "A256KWP", &dek).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    let wrapped = a.value();
    let a = m.wrap("unwrap-only", "A256KWP", &dek).await;
    assert_error(&a, 403, "OperationNotAllowed", "a key that only unwraps");
    let a = m.wrap("expired", "A256KWP", &dek).await;
    assert_error(&a, 403, "KeyExpired", "an expired key");

    // The auditor's door: refused by its role, then, past the refusal budget (a burst of 3),
    // held off without running.
    let wrap_as_auditor = op_body("A256KWP", &dek);
    let a = m
        .post(&format!("/audit/kwp/wrapkey{V}"), &wrap_as_auditor)
        .await;
    assert_error(&a, 403, "AccessDenied", "the auditor role does not wrap");
    let a = m
        .post(
            &format!("/audit/kwp/metadata{V}"),
            &json!({"request_context": context()}),
        )
        .await;
    assert_eq!(a.status, 200, "the auditor role reads metadata: {}", a.raw);
    let mut codes = Vec::new();
    for _ in 0..10 {
        let a = m
            .post(&format!("/audit/kwp/wrapkey{V}"), &wrap_as_auditor)
            .await;
        codes.push((a.status, a.code().to_string()));
        if a.status == 429 {
            assert_error(&a, 429, "TooManyRequests", "past the refusal budget");
            break;
        }
        assert_error(&a, 403, "AccessDenied", "within the refusal budget");
    }
    assert_eq!(
        codes.last().map(|c| c.0),
        Some(429),
        "the refusal budget holds the auditor off: {codes:?}"
    );
    // Another caller (the Managed HSM prefix) is not held off by the auditor's refusals.
    let a = m.unwrap("kwp", "A256KWP", &wrapped).await;
    assert_eq!((a.status, a.value()), (200, dek.clone()), "{}", a.raw);

    // The HSM refuses the key's function mid-operation (a mechanism it passed at start-up):
    // keybroker cannot explain that to the caller, so it is the reference's 500.
    let f = env.faults();
    let crypt = "C_WrapKey,C_UnwrapKey,C_EncryptInit,C_DecryptInit,C_Encrypt,C_Decrypt";
    f.set(&[Rule::fail(crypt, "CKR_KEY_FUNCTION_NOT_PERMITTED")])
        .expect("rules");
    let a = m.unwrap("kwp", "A256KWP", &wrapped).await;
    assert_error(
        &a,
        500,
        "InternalError",
        "the HSM refuses the key's function",
    );

    // The HSM fails every call: 503, and served again once it recovers.
    f.set(&[Rule::fail("*", "CKR_DEVICE_ERROR")])
        .expect("rules");
    let a = m.unwrap("kwp", "A256KWP", &wrapped).await;
    assert_error(&a, 503, "ServiceUnavailable", "the HSM fails");
    f.clear().expect("rules");
    let addr = m.addr;
    let tls = m.tls.clone();
    poll_until("served again", Duration::from_secs(20), || {
        let body = op_body("A256KWP", &wrapped).to_string();
        let tls = tls.clone();
        async move {
            let a = exchange(
                addr,
                tls,
                "POST",
                &format!("/contoso/kwp/unwrapkey{V}"),
                body.as_bytes(),
            )
            .await
            .ok()?;
            (a.status == 200).then(|| a.value())
        }
    })
    .await;

    // Each refusal is audited with the reference's meaning.
    drop(c);
    let log = std::fs::read_to_string(env.audit_log()).expect("audit log");
    let outcomes: Vec<(String, String)> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"))
        .filter(|r| r["kind"] == "request" && r["op"] == "EkmWrapKey")
        .map(|r| {
            (
                r["caller"].as_str().unwrap_or("").to_string(),
                r["outcome"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for (caller, outcome) in [
        ("ekm:contoso", "OK"),
        ("ekm:contoso", "FAILED_PRECONDITION"),
        ("ekm:audit", "PERMISSION_DENIED"),
    ] {
        assert!(
            outcomes.iter().any(|(c, o)| c == caller && o == outcome),
            "{caller} {outcome} audited: {outcomes:?}"
        );
    }
    b.stop().await;
    let (ok, report) = env.verify_audit(&env.audit_log());
    assert!(ok, "{report}");
}
