//! The AWS XKS proxy door end to end: the real binary with `[xks]`, a real token, real TLS, and
//! an independent client written from the spec (`aws/aws-kms-xksproxy-api-spec`,
//! `xks_proxy_api_spec.md`): plain HTTP/1.1 over rustls, bodies built from the spec's field
//! names, requests signed by `aws-sigv4` (the AWS SDK for Rust's signer), answers checked
//! against the spec's `errorName`s and statuses, the CDIV recomputed here with SHA-256.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use aws_sigv4::{
    http_request::{SignableBody, SignableRequest, SigningSettings, sign},
    sign::v4,
};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use hsm_fixtures::{
    fault::Rule,
    pki::{Issued, LeafSpec},
};
use keybroker_proto::v1 as pb;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::*;

const AKID1: &str = "AKIAI2SFODNN7EXAMPLEX";
const SECRET1: &str = "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE";
const AKID2: &str = "MUBSXM6K3KMXHN6RRCXI7TWQ";
const SECRET2: &str = "VU6W2byoiBrhDqNGbx703oL0syCAmhlQgwNUT123456abc";
const PRINCIPAL: &str = "arn:aws:iam::111122223333:user/Alice";
const KMS_CN: &str = "cks.kms.eu-west-1.amazonaws.com";

/// Writes a credential file (the KMS console's format), mode 0600.
fn write_credential(dir: &Path, file: &str, uri_path: &str, akid: &str, secret: &str) {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let text = json!({
        "XksProxyUriPath": uri_path,
        "XksProxyAuthenticationCredential": {"AccessKeyId": akid, "RawSecretAccessKey": secret},
    })
    .to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join(file))
        .expect("create credential");
    f.write_all(text.as_bytes()).expect("write credential");
}

/// An env whose broker serves `[xks]` with prefix `/acme` (tenant `acme`, two credentials),
/// a policy binding `xks:acme` as a HYOK service identity, and `mtls` appended to `[xks]`.
fn xks_env(mtls: &str) -> Env {
    xks_env_with(Options::default(), mtls, "")
}

/// [`xks_env`] with the broker's `opts` (its policy is set here) and `policy` bindings added.
/// `ekm:*` identities are HYOK service identities too.
fn xks_env_with(opts: Options, mtls: &str, policy: &str) -> Env {
    let policy = format!(
        r#"{policy}
[[binding]]
identity = "{TEST_CLIENT_ID}"
roles = ["administrator", "crypto-officer", "crypto-user", "auditor"]
scope = "all"
[[binding]]
identity = "xks:acme"
role = "service-crypto-user"
scope = "tenant:acme"
on_behalf_of = ["arn:aws:iam::111122223333:*"]

[hyok]
service_identities = ["xks:*", "ekm:*"]
"#,
        TEST_CLIENT_ID = hsm_fixtures::pki::TEST_CLIENT_ID
    );
    let env = Env::with(Options {
        policy: Some(policy),
        ..opts
    });
    let creds = env.dir.path().join("xks-credentials");
    std::fs::create_dir_all(&creds).expect("mkdir");
    write_credential(&creds, "old.json", "/acme/kms/xks/v1", AKID1, SECRET1);
    write_credential(&creds, "new.json", "/acme/kms/xks/v1", AKID2, SECRET2);
    let section = format!(
        r#"
[xks]
listen = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
header_read_timeout_ms = 3000
{mtls}
[[xks.prefix]]
path = "/acme"
tenant = "acme"
credentials_dir = "{creds}"
justification = "CUSTOMER_INITIATED_ACCESS"
"#,
        cert = env.pki.server.cert_path.display(),
        key = env.pki.server.key_path.display(),
        creds = creds.display(),
    );
    env.edit_config(|t| format!("{t}\n{section}"));
    env
}

/// The XKS listener's address, from the broker's log line on stdout (read by the harness).
fn xks_addr(b: &Broker) -> std::net::SocketAddr {
    b.xks_addr
        .expect("the broker prints 'keybroker: xks on ADDR'")
}

/// A TLS client trusting the test CA, with an optional client certificate.
fn tls_client(ca: &Path, cert: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(c.expect("CA")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
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
    fn error_name(&self) -> &str {
        self.body["errorName"].as_str().unwrap_or("")
    }
}

/// A request signed for the spec's service with one credential, at `at`.
fn signed_headers(
    host: &str,
    path: &str,
    body: &[u8],
    akid: &str,
    secret: &str,
    at: SystemTime,
) -> Vec<(String, String)> {
    let identity =
        aws_credential_types::Credentials::new(akid, secret, None, None, "xks-test").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region("eu-west-1")
        .name("kms-xks-proxy")
        .time(at)
        .settings(SigningSettings::default())
        .build()
        .expect("signing params")
        .into();
    let uri = format!("https://{host}{path}");
    let req = SignableRequest::new(
        "POST",
        uri,
        [("host", host), ("content-type", "application/json")].into_iter(),
        SignableBody::Bytes(body),
    )
    .expect("signable");
    let (instructions, _) = sign(req, &params).expect("sign").into_parts();
    let mut out = vec![
        ("Host".to_string(), host.to_string()),
        ("Content-Type".to_string(), "application/json".to_string()),
    ];
    for (k, v) in instructions.headers() {
        out.push((k.to_string(), v.to_string()));
    }
    out
}

/// A client of the door: the address, TLS, and who signs.
struct Kms {
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    requests: usize,
}

impl Kms {
    /// A KMS on `b`'s XKS door, trusting `env`'s CA, with no client certificate.
    fn new(b: &Broker, env: &Env) -> Kms {
        Kms {
            addr: xks_addr(b),
            tls: tls_client(&env.pki.ca.cert_path, None),
            requests: 0,
        }
    }

    /// Sends `body` to `path` signed with `(akid, secret)` at `at`.
    async fn signed_at(
        &mut self,
        path: &str,
        body: &Value,
        akid: &str,
        secret: &str,
        at: SystemTime,
    ) -> Answer {
        let bytes = body.to_string().into_bytes();
        let host = format!("localhost:{}", self.addr.port());
        let headers = signed_headers(&host, path, &bytes, akid, secret, at);
        self.requests += 1;
        https_exchange(self.addr, self.tls.clone(), "POST", path, &headers, &bytes)
            .await
            .expect("an answer")
    }

    async fn post(&mut self, path: &str, body: &Value) -> Answer {
        self.signed_at(path, body, AKID1, SECRET1, SystemTime::now())
            .await
    }

    async fn raw(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Answer {
        self.requests += 1;
        https_exchange(self.addr, self.tls.clone(), method, path, headers, body)
            .await
            .expect("an answer")
    }
}

fn meta(op: &str) -> Value {
    json!({
        "awsPrincipalArn": PRINCIPAL,
        "kmsKeyArn": "arn:aws:kms:eu-west-1:111122223333:key/1234abcd",
        "kmsOperation": op,
        "kmsRequestId": format!("kms-{}", hex_id()),
        "kmsViaService": "ebs",
    })
}

fn encrypt_body(plaintext: &[u8], aad: Option<&[u8]>, cdiv: bool) -> Value {
    let mut b = json!({
        "requestMetadata": meta("Encrypt"),
        "plaintext": B64.encode(plaintext),
        "encryptionAlgorithm": "AES_GCM",
    });
    if let Some(a) = aad {
        b["additionalAuthenticatedData"] = B64.encode(a).into();
    }
    if cdiv {
        b["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256".into();
    }
    b
}

/// A Decrypt body for what Encrypt answered.
fn decrypt_body(enc: &Value, aad: Option<&[u8]>) -> Value {
    let mut b = json!({
        "requestMetadata": meta("Decrypt"),
        "ciphertext": enc["ciphertext"],
        "ciphertextMetadata": enc["ciphertextMetadata"],
        "initializationVector": enc["initializationVector"],
        "authenticationTag": enc["authenticationTag"],
        "encryptionAlgorithm": "AES_GCM",
    });
    if let Some(a) = aad {
        b["additionalAuthenticatedData"] = B64.encode(a).into();
    }
    b
}

fn b64(v: &Value) -> Vec<u8> {
    B64.decode(v.as_str().expect("a Base64 string"))
        .expect("Base64")
}

const KEYS: &str = "/acme/kms/xks/v1/keys";

#[track_caller]
fn assert_error(a: &Answer, status: u16, name: &str, what: &str) {
    assert_eq!(
        (a.status, a.error_name()),
        (status, name),
        "{what}: {}",
        a.raw
    );
    let msg = a.body["errorMessage"].as_str().unwrap_or("");
    assert!(
        msg.len() < 512 && msg.chars().all(|c| (' '..='~').contains(&c)),
        "{what}: errorMessage {msg:?}"
    );
}

async fn create_with_ops(c: &mut keybroker::client::Clients, name: &str, ops: &[pb::KeyOperation]) {
    c.mgmt
        .create_key(pb::CreateKeyRequest {
            key: name.into(),
            key_type: pb::KeyType::Aes256.into(),
            algorithm: pb::Algorithm::Aes256Gcm.into(),
            attributes: Some(pb::KeyAttributes {
                operations: Some(pb::KeyOperations {
                    operations: ops.iter().map(|o| (*o).into()).collect(),
                }),
                ..Default::default()
            }),
            external: None,
            double: None,
        })
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e:?}"));
}

#[tokio::test]
async fn xks_door_serves_the_spec_over_https_with_sigv4() {
    crate::require_aes!();
    let env = xks_env("");
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    use pb::KeyOperation::*;
    create_with_ops(&mut c, "acme/k1", &[Encrypt, Decrypt, Wrap, Unwrap]).await;
    create_with_ops(&mut c, "acme/enc-only", &[Encrypt]).await;
    create_with_ops(&mut c, "acme/dec-only", &[Decrypt]).await;
    create_with_ops(&mut c, "acme/wrap-only", &[Wrap, Unwrap]).await;
    create_with_ops(&mut c, "acme/disabled", &[Encrypt, Decrypt]).await;
    c.mgmt
        .update_key(pb::UpdateKeyRequest {
            key: "acme/disabled".into(),
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
    let mut kms = Kms::new(&b, &env);

    // GetKeyMetadata.
    let m = kms
        .post(
            &format!("{KEYS}/k1/metadata"),
            &json!({"requestMetadata": meta("DescribeKey")}),
        )
        .await;
    assert_eq!(m.status, 200, "{}", m.raw);
    assert_eq!(m.body["keySpec"], "AES_256");
    assert_eq!(m.body["keyStatus"], "ENABLED");
    assert_eq!(
        m.body["keyUsage"],
        json!(["ENCRYPT", "DECRYPT", "WRAP", "UNWRAP"])
    );
    assert!(
        m.raw
            .to_ascii_lowercase()
            .contains("content-type: application/json")
    );

    // Round trip: 4,096 bytes of plaintext, 8,192 of AAD, the CDIV checked here; the second
    // credential of the prefix signs the decrypt (both are in force).
    let plaintext: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let aad: Vec<u8> = (0..8192u32).map(|i| (i % 13) as u8).collect();
    let mut round_trip = encrypt_body(&plaintext, Some(&aad), true);
    round_trip["requestMetadata"]["kmsRequestId"] = "kms-round-trip".into();
    let e = kms.post(&format!("{KEYS}/k1/encrypt"), &round_trip).await;
    assert_eq!(e.status, 200, "{}", e.raw);
    let (ct, iv, tag, ctm) = (
        b64(&e.body["ciphertext"]),
        b64(&e.body["initializationVector"]),
        b64(&e.body["authenticationTag"]),
        b64(&e.body["ciphertextMetadata"]),
    );
    assert_eq!((ct.len(), iv.len(), tag.len()), (4096, 12, 16));
    assert_ne!(ct, plaintext);
    // Appendix C: SHA-256 over AAD || ciphertextMetadata || IV || ciphertext || tag.
    let mut h = Sha256::new();
    for part in [&aad[..], &ctm, &iv, &ct, &tag] {
        h.update(part);
    }
    assert_eq!(
        b64(&e.body["ciphertextDataIntegrityValue"]),
        h.finalize().to_vec(),
        "CDIV"
    );
    let d = kms
        .signed_at(
            &format!("{KEYS}/k1/decrypt"),
            &decrypt_body(&e.body, Some(&aad)),
            AKID2,
            SECRET2,
            SystemTime::now(),
        )
        .await;
    assert_eq!(d.status, 200, "{}", d.raw);
    assert_eq!(b64(&d.body["plaintext"]), plaintext);

    // Decrypt after rotation: the old ciphertext names its version in ciphertextMetadata.
    c.mgmt
        .rotate_key(pb::RotateKeyRequest {
            key: "acme/k1".into(),
        })
        .await
        .expect("rotate");
    let e2 = kms
        .post(
            &format!("{KEYS}/k1/encrypt"),
            &encrypt_body(b"after", None, false),
        )
        .await;
    assert_eq!(e2.status, 200, "{}", e2.raw);
    assert_ne!(e2.body["ciphertextMetadata"], e.body["ciphertextMetadata"]);
    let d = kms
        .post(
            &format!("{KEYS}/k1/decrypt"),
            &decrypt_body(&e.body, Some(&aad)),
        )
        .await;
    assert_eq!(
        (d.status, b64(&d.body["plaintext"])),
        (200, plaintext.clone())
    );
    let d = kms
        .post(&format!("{KEYS}/k1/decrypt"), &decrypt_body(&e2.body, None))
        .await;
    assert_eq!(
        (d.status, b64(&d.body["plaintext"])),
        (200, b"after".to_vec())
    );

    // GetHealthStatus: a real call to the token.
    let h = kms
        .post(
            "/acme/kms/xks/v1/health",
            &json!({"requestMetadata": {"kmsRequestId": "h-1", "kmsOperation": "KmsHealthCheck"}}),
        )
        .await;
    assert_eq!(h.status, 200, "{}", h.raw);
    assert_eq!(h.body["xksProxyFleetSize"], 1);
    assert_eq!(h.body["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");
    assert!(
        h.body["ekmFleetDetails"][0]["id"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{}",
        h.raw
    );

    // Every errorName the door produces, with its status.
    let bad_json = {
        let host = format!("localhost:{}", kms.addr.port());
        let path = format!("{KEYS}/k1/encrypt");
        let body = b"{not json".to_vec();
        let headers = signed_headers(&host, &path, &body, AKID1, SECRET1, SystemTime::now());
        kms.raw("POST", &path, &headers, &body).await
    };
    assert_error(&bad_json, 400, "ValidationException", "malformed body");
    let mut no_alg = encrypt_body(b"x", None, false);
    no_alg["encryptionAlgorithm"] = "AES_CBC".into();
    let a = kms.post(&format!("{KEYS}/k1/encrypt"), &no_alg).await;
    assert_error(&a, 400, "ValidationException", "algorithm");
    // Authentication: a changed signature, an unknown access key, a request 10 minutes old.
    let body = encrypt_body(b"x", None, false);
    let path = format!("{KEYS}/k1/encrypt");
    let bytes = body.to_string().into_bytes();
    let host = format!("localhost:{}", kms.addr.port());
    let mut headers = signed_headers(&host, &path, &bytes, AKID1, SECRET1, SystemTime::now());
    for (k, v) in headers.iter_mut() {
        if k.eq_ignore_ascii_case("authorization") {
            let last = v.pop().expect("signature");
            v.push(if last == '0' { '1' } else { '0' });
        }
    }
    let a = kms.raw("POST", &path, &headers, &bytes).await;
    assert_error(&a, 401, "AuthenticationFailedException", "bad signature");
    let a = kms
        .signed_at(
            &path,
            &body,
            "QQQQQQQQQQQQQQQQQQQQ22",
            SECRET1,
            SystemTime::now(),
        )
        .await;
    assert_error(
        &a,
        401,
        "AuthenticationFailedException",
        "unknown access key",
    );
    let a = kms
        .signed_at(
            &path,
            &body,
            AKID1,
            SECRET1,
            SystemTime::now() - Duration::from_secs(600),
        )
        .await;
    assert_error(&a, 401, "AuthenticationFailedException", "clock skew");
    assert!(
        a.body["errorMessage"]
            .as_str()
            .unwrap_or("")
            .contains("clock"),
        "{}",
        a.raw
    );
    // A prefix this door does not serve; a path that is not the API's.
    let a = kms.post("/other/kms/xks/v1/keys/k1/encrypt", &body).await;
    assert_error(&a, 404, "InvalidUriPathException", "wrong prefix");
    let a = kms.post("/acme/kms/xks/v1/keys/k1/sign", &body).await;
    assert_error(&a, 404, "InvalidUriPathException", "unknown operation");
    let a = kms.post(&format!("{KEYS}/missing/encrypt"), &body).await;
    assert_error(&a, 404, "KeyNotFoundException", "no such key");
    let mut tampered = e2.body.clone();
    let mut t = b64(&tampered["authenticationTag"]);
    t[0] ^= 1;
    tampered["authenticationTag"] = B64.encode(&t).into();
    let a = kms
        .post(
            &format!("{KEYS}/k1/decrypt"),
            &decrypt_body(&tampered, None),
        )
        .await;
    assert_error(&a, 400, "InvalidCiphertextException", "tampered tag");
    let a = kms
        .post(
            &format!("{KEYS}/k1/decrypt"),
            &decrypt_body(&e2.body, Some(b"other aad")),
        )
        .await;
    assert_error(&a, 400, "InvalidCiphertextException", "other AAD");
    let eo = kms
        .post(
            &format!("{KEYS}/enc-only/encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_eq!(eo.status, 200, "{}", eo.raw);
    let a = kms
        .post(
            &format!("{KEYS}/enc-only/decrypt"),
            &decrypt_body(&eo.body, None),
        )
        .await;
    assert_error(
        &a,
        400,
        "InvalidKeyUsageException",
        "encrypt-only key decrypts",
    );
    let a = kms
        .post(
            &format!("{KEYS}/dec-only/encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_error(
        &a,
        400,
        "InvalidKeyUsageException",
        "decrypt-only key encrypts",
    );
    // A key that allows neither encrypt nor decrypt refuses both.
    let a = kms
        .post(
            &format!("{KEYS}/wrap-only/encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_error(
        &a,
        400,
        "InvalidKeyUsageException",
        "wrap-only key encrypts",
    );
    let a = kms
        .post(
            &format!("{KEYS}/wrap-only/decrypt"),
            &decrypt_body(&eo.body, None),
        )
        .await;
    assert_error(
        &a,
        400,
        "InvalidKeyUsageException",
        "wrap-only key decrypts",
    );
    let a = kms
        .post(
            &format!("{KEYS}/disabled/encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_error(&a, 400, "InvalidStateException", "disabled key");
    let a = kms
        .post(
            &format!("{KEYS}/disabled/metadata"),
            &json!({"requestMetadata": meta("DescribeKey")}),
        )
        .await;
    assert_eq!(
        (a.status, a.body["keyStatus"].as_str()),
        (200, Some("DISABLED")),
        "{}",
        a.raw
    );
    // A principal the policy does not allow (secondary authorization).
    let mut foreign = encrypt_body(b"x", None, false);
    foreign["requestMetadata"]["awsPrincipalArn"] = "arn:aws:iam::999999999999:user/M".into();
    let a = kms.post(&format!("{KEYS}/k1/encrypt"), &foreign).await;
    assert_error(&a, 403, "AccessDeniedException", "foreign principal");
    // Sizes: a plaintext beyond keybroker's 64 KiB; a body beyond the listener's limit.
    let a = kms
        .post(
            &format!("{KEYS}/k1/encrypt"),
            &encrypt_body(&vec![1; 65537], None, false),
        )
        .await;
    assert_error(&a, 501, "UnsupportedOperationException", "large plaintext");
    let a = kms
        .post(
            &format!("{KEYS}/k1/encrypt"),
            &encrypt_body(&vec![1; 300_000], None, false),
        )
        .await;
    assert_error(&a, 501, "UnsupportedOperationException", "oversized body");
    // Any method but POST: 405.
    let a = kms
        .raw(
            "GET",
            &format!("{KEYS}/k1/metadata"),
            &[("Host".into(), "localhost".into())],
            b"",
        )
        .await;
    assert_eq!(a.status, 405, "{}", a.raw);

    // The HYOK switch off: the prefix's identity is a HYOK service identity.
    c.hyok
        .disconnect(pb::HyokSwitchRequest {
            reason: "xks test".into(),
        })
        .await
        .expect("disconnect");
    let a = kms
        .post(
            &format!("{KEYS}/k1/encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_error(&a, 400, "InvalidStateException", "HYOK switch off");
    c.hyok
        .reconnect(pb::HyokSwitchRequest {
            reason: "xks test".into(),
        })
        .await
        .expect("reconnect");
    let a = kms
        .post(
            &format!("{KEYS}/k1/encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.raw);

    // The documented curl example (docs/src/xks.md), with curl's own SigV4 signer.
    let curl = std::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--aws-sigv4",
            "aws:amz:eu-west-1:kms-xks-proxy",
            "--user",
            &format!("{AKID2}:{SECRET2}"),
            "--cacert",
        ])
        .arg(&env.pki.ca.cert_path)
        .args([
            "-H",
            "Content-Type: application/json",
            "--data",
            r#"{"requestMetadata":{"kmsRequestId":"r-1","kmsOperation":"KmsHealthCheck"}}"#,
            &format!(
                "https://localhost:{}/acme/kms/xks/v1/health",
                kms.addr.port()
            ),
        ])
        .output();
    match curl {
        Ok(out) => {
            kms.requests += 1;
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("\"ekmFleetDetails\""),
                "curl: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) => skip("xks curl example", &format!("no curl: {e}")),
    }

    // The load balancer's check (not audited).
    let lb = https_exchange(
        kms.addr,
        kms.tls.clone(),
        "GET",
        "/healthz",
        &[("Host".into(), "localhost".into())],
        b"",
    )
    .await
    .expect("an answer");
    assert_eq!(lb.status, 200, "{}", lb.raw);

    // One audit record per XKS request, written before its reply: the refused ones too (an
    // unverified signature under the caller `unauthenticated`, with why).
    drop(c);
    let log = std::fs::read_to_string(env.audit_log()).expect("audit log");
    let recs: Vec<Value> = log
        .lines()
        .skip(audit_before)
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let xks: Vec<&Value> = recs
        .iter()
        .filter(|r| {
            r["kind"] == "request" && r["op"].as_str().is_some_and(|o| o.starts_with("Xks"))
        })
        .collect();
    assert_eq!(xks.len(), kms.requests, "{log}");
    let enc = xks
        .iter()
        .find(|r| r["op"] == "XksEncrypt" && r["upstream"]["request_id"] == "kms-round-trip")
        .expect("the round trip's encrypt, audited with its kmsRequestId");
    assert_eq!(enc["outcome"], "OK");
    assert_eq!(enc["caller"], "xks:acme");
    assert_eq!(enc["key"], "acme/k1");
    assert_eq!(enc["upstream"]["principal"], PRINCIPAL);
    assert_eq!(enc["upstream"]["operation"], "Encrypt");
    assert_eq!(enc["upstream"]["via_service"], "ebs");
    assert_eq!(enc["justification"], "CUSTOMER_INITIATED_ACCESS");
    let unauth: Vec<&&Value> = xks
        .iter()
        .filter(|r| r["caller"] == "unauthenticated")
        .collect();
    assert!(
        unauth.iter().any(|r| r["outcome"] == "UNAUTHENTICATED"
            && r["message"]
                .as_str()
                .is_some_and(|m| m.contains("unknown access key"))),
        "{unauth:?}"
    );
    assert!(
        unauth.iter().any(|r| r["outcome"] == "NOT_FOUND"),
        "{unauth:?}"
    );
    assert!(
        !log.contains(&B64.encode(&plaintext)),
        "no plaintext in the audit trail"
    );
    b.stop().await;
    let (ok, report) = env.verify_audit(&env.audit_log());
    assert!(ok, "{report}");
}

/// A self-signed client certificate with KMS's subject CN, written under `dir`.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, KMS_CN);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    let (c, k) = (dir.join("self.pem"), dir.join("self.key"));
    std::fs::write(&c, cert.pem()).expect("write");
    std::fs::write(&k, key.serialize_pem()).expect("write");
    (c, k)
}

fn kms_client_cert(env: &Env, stem: &str, cn: &str, expired: bool) -> Issued {
    env.pki
        .ca
        .issue(
            stem,
            &LeafSpec {
                common_name: cn.into(),
                dns: vec![cn.into()],
                valid_days: 30,
                expired,
                ..Default::default()
            },
        )
        .expect("issue")
}

#[tokio::test]
async fn xks_mtls_refuses_missing_self_signed_expired_and_other_cn_client_certificates() {
    let env = xks_env(&format!(
        "[xks.mtls]\nclient_ca = \"CA\"\nclient_cn = [\"{KMS_CN}\"]\n"
    ));
    let ca = env.pki.ca.cert_path.display().to_string();
    env.edit_config(|t| t.replace("client_ca = \"CA\"", &format!("client_ca = \"{ca}\"")));
    env.check_config().expect("check-config accepts [xks]");
    let b = env.start().await;
    let addr = xks_addr(&b);
    let health =
        json!({"requestMetadata": {"kmsRequestId": "h-1", "kmsOperation": "KmsHealthCheck"}});
    let bytes = health.to_string().into_bytes();
    let host = format!("localhost:{}", addr.port());
    let path = "/acme/kms/xks/v1/health";
    let send = |tls: Arc<rustls::ClientConfig>| {
        let headers = signed_headers(&host, path, &bytes, AKID1, SECRET1, SystemTime::now());
        let bytes = bytes.clone();
        async move { https_exchange(addr, tls, "POST", path, &headers, &bytes).await }
    };
    let ca = &env.pki.ca.cert_path;
    let good = kms_client_cert(&env, "kms", KMS_CN, false);
    let a = send(tls_client(ca, Some((&good.cert_path, &good.key_path))))
        .await
        .expect("KMS's certificate is accepted");
    assert_eq!(a.status, 200, "{}", a.raw);
    let expired = kms_client_cert(&env, "kms-expired", KMS_CN, true);
    let other_cn = kms_client_cert(&env, "kms-other", "cks.kms.us-east-1.amazonaws.com", false);
    let (ss_cert, ss_key) = self_signed(env.dir.path());
    for (what, tls) in [
        ("no client certificate", tls_client(ca, None)),
        (
            "expired",
            tls_client(ca, Some((&expired.cert_path, &expired.key_path))),
        ),
        ("self-signed", tls_client(ca, Some((&ss_cert, &ss_key)))),
        (
            "another subject CN",
            tls_client(ca, Some((&other_cn.cert_path, &other_cn.key_path))),
        ),
        (
            "another CA",
            tls_client(
                ca,
                Some((&env.pki.foreign.cert_path, &env.pki.foreign.key_path)),
            ),
        ),
    ] {
        let r = send(tls).await;
        assert!(r.is_err(), "{what}: answered {r:?}");
    }
    let log = b.stop().await;
    assert!(log.contains("TLS handshake failed"), "{log}");
}

#[tokio::test]
async fn xks_configuration_without_credentials_is_refused_by_check_config_and_serve() {
    let env = xks_env("");
    let empty = env.dir.path().join("no-credentials");
    std::fs::create_dir_all(&empty).expect("mkdir");
    env.edit_config(|t| {
        let start = t.find("credentials_dir = ").expect("credentials_dir");
        let end = start + t[start..].find('\n').expect("line end");
        format!(
            "{}credentials_dir = \"{}\"{}",
            &t[..start],
            empty.display(),
            &t[end..]
        )
    });
    let e = env.check_config().expect_err("refused");
    assert!(e.contains("no SigV4 credentials"), "{e}");
    let e = env.try_start().await.err().expect("serve refuses");
    assert!(e.contains("no SigV4 credentials"), "{e}");
}

/// The spec's rotation steps against a running broker: a third credential added to the
/// directory is accepted once the door re-reads it (no restart), and a removed one is refused;
/// SIGHUP re-reads at once.
#[tokio::test]
async fn xks_credentials_rotate_without_a_restart() {
    const AKID3: &str = "ROTATEDKEYROTATEDKEY2345";
    const SECRET3: &str = "cm90YXRlZHNlY3JldHJvdGF0ZWRzZWNyZXRyb3RhdGVkMDE=";
    let env = xks_env("");
    let b = env.start().await;
    let mut kms = Kms::new(&b, &env);
    let health =
        json!({"requestMetadata": {"kmsRequestId": "h-1", "kmsOperation": "KmsHealthCheck"}});
    let path = "/acme/kms/xks/v1/health";
    let a = kms
        .signed_at(path, &health, AKID3, SECRET3, SystemTime::now())
        .await;
    assert_error(&a, 401, "AuthenticationFailedException", "not yet added");
    let dir = env.dir.path().join("xks-credentials");
    write_credential(&dir, "third.json", "/acme/kms/xks/v1", AKID3, SECRET3);
    poll_until(
        "the added credential is accepted",
        Duration::from_secs(20),
        || {
            let (addr, tls) = (kms.addr, kms.tls.clone());
            let health = health.clone();
            async move {
                let bytes = health.to_string().into_bytes();
                let host = format!("localhost:{}", addr.port());
                let h = signed_headers(&host, path, &bytes, AKID3, SECRET3, SystemTime::now());
                let a = https_exchange(addr, tls, "POST", path, &h, &bytes)
                    .await
                    .ok()?;
                (a.status == 200).then_some(())
            }
        },
    )
    .await;
    // Step 4: the old credential removed; SIGHUP makes the door re-read now.
    std::fs::remove_file(dir.join("old.json")).expect("remove");
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &b.pid().to_string()])
        .status();
    poll_until(
        "the removed credential is refused",
        Duration::from_secs(20),
        || {
            let (addr, tls) = (kms.addr, kms.tls.clone());
            let health = health.clone();
            async move {
                let bytes = health.to_string().into_bytes();
                let host = format!("localhost:{}", addr.port());
                let h = signed_headers(&host, path, &bytes, AKID1, SECRET1, SystemTime::now());
                let a = https_exchange(addr, tls, "POST", path, &h, &bytes)
                    .await
                    .ok()?;
                (a.status == 401).then_some(())
            }
        },
    )
    .await;
    let a = kms
        .signed_at(path, &health, AKID2, SECRET2, SystemTime::now())
        .await;
    assert_eq!(a.status, 200, "the other credential still works: {}", a.raw);
    let log = b.stop().await;
    assert!(log.contains("XKS SigV4 credentials reloaded"), "{log}");
    assert!(!log.contains(SECRET3), "no secret in the log");
}

/// Refusals before any identity share the refusal limiter's budget: past it they are
/// ThrottlingException, not one audit record each.
#[tokio::test]
async fn unauthenticated_refusals_are_throttled_not_audited_one_by_one() {
    let env = xks_env("");
    env.edit_config(|t| {
        t.replacen(
            "[server]\n",
            "[server]\nrefused_per_second = 1\nrefused_burst = 3\n",
            1,
        )
    });
    let b = env.start().await;
    let mut kms = Kms::new(&b, &env);
    let health =
        json!({"requestMetadata": {"kmsRequestId": "h-1", "kmsOperation": "KmsHealthCheck"}});
    let (mut refused, mut throttled) = (0, 0);
    for _ in 0..8 {
        let a = kms
            .signed_at(
                "/acme/kms/xks/v1/health",
                &health,
                AKID1,
                SECRET2,
                SystemTime::now(),
            )
            .await;
        match a.status {
            401 => refused += 1,
            429 => {
                assert_eq!(a.error_name(), "ThrottlingException", "{}", a.raw);
                throttled += 1;
            }
            s => panic!("status {s}: {}", a.raw),
        }
    }
    assert!(throttled > 0, "{refused} refused, none throttled");
    b.stop().await;
    let log = std::fs::read_to_string(env.audit_log()).expect("audit log");
    let audited = log
        .lines()
        .filter(|l| {
            l.contains("\"caller\":\"unauthenticated\"") && l.contains("\"op\":\"XksHealth\"")
        })
        .count();
    assert_eq!(audited, refused, "{log}");
}

/// A prefix's credentials from an environment variable (`credentials_env`): a request signed
/// with that secret is served, the same access key id with another secret is refused.
#[tokio::test]
async fn xks_credentials_from_the_environment_sign_requests() {
    let env = xks_env("");
    env.edit_config(|t| {
        t.replace(
            "justification = \"CUSTOMER_INITIATED_ACCESS\"",
            "justification = \"CUSTOMER_INITIATED_ACCESS\"\ncredentials_env = \"KEYBROKER_XKS_ACME\"",
        )
    });
    const AKID_ENV: &str = "ENVKEYIDSEVENEXAMPLEQ";
    const SECRET_ENV: &str = "S3cr3tFr0mTheEnv1r0nment0nlyNeverInAFile0abc";
    let credential = json!([{
        "XksProxyUriPath": "/acme/kms/xks/v1",
        "XksProxyAuthenticationCredential": {
            "AccessKeyId": AKID_ENV,
            "RawSecretAccessKey": SECRET_ENV,
        },
    }])
    .to_string();
    let b = env
        .try_start_with(&[("KEYBROKER_XKS_ACME", &credential)])
        .await
        .unwrap_or_else(|e| panic!("broker did not start: {e}"));
    let mut kms = Kms::new(&b, &env);
    let health =
        json!({"requestMetadata": {"kmsRequestId": "h-env", "kmsOperation": "KmsHealthCheck"}});
    let path = "/acme/kms/xks/v1/health";
    let a = kms
        .signed_at(path, &health, AKID_ENV, SECRET_ENV, SystemTime::now())
        .await;
    assert_eq!(a.status, 200, "the environment's credential: {}", a.raw);
    let a = kms
        .signed_at(path, &health, AKID_ENV, SECRET1, SystemTime::now())
        .await;
    assert_error(&a, 401, "AuthenticationFailedException", "another secret");
    // The directory's credentials still hold beside the environment's.
    let a = kms.post(path, &health).await;
    assert_eq!(a.status, 200, "the directory's credential: {}", a.raw);
    let log = b.stop().await;
    assert!(!log.contains(SECRET_ENV), "the secret is not logged");
}

/// The HSM's faults through the door, injected by the fault module: a call that hangs past the
/// request's deadline is the spec's `DependencyTimeoutException` (503), a failing HSM its
/// `InternalException` (500); both are audited, and the door serves again once the HSM does.
#[tokio::test]
async fn xks_hsm_hang_is_dependency_timeout_and_failure_internal() {
    crate::require_aes!();
    let env = xks_env_with(
        Options {
            faults: true,
            server_extra: "request_timeout_ms = 1000".into(),
            ..Default::default()
        },
        "",
        "",
    );
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    use pb::KeyOperation::*;
    create_with_ops(&mut c, "acme/k1", &[Encrypt, Decrypt]).await;
    let mut kms = Kms::new(&b, &env);
    let path = format!("{KEYS}/k1/encrypt");
    let a = kms.post(&path, &encrypt_body(b"x", None, false)).await;
    assert_eq!(a.status, 200, "{}", a.raw);

    let f = env.faults();
    f.set(&[Rule::hang("C_EncryptInit")]).expect("rules");
    let a = kms.post(&path, &encrypt_body(b"x", None, false)).await;
    assert_error(&a, 503, "DependencyTimeoutException", "a hung HSM call");
    assert_eq!(f.count("hang", None), 1, "the hang was injected");
    f.set(&[Rule::fail("*", "CKR_DEVICE_ERROR")])
        .expect("rules");
    let a = kms.post(&path, &encrypt_body(b"x", None, false)).await;
    assert_error(&a, 500, "InternalException", "a failing HSM");
    f.clear().expect("rules");
    let addr = kms.addr;
    poll_until("served again", Duration::from_secs(20), || {
        let mut k = Kms {
            addr,
            tls: kms.tls.clone(),
            requests: 0,
        };
        let path = path.clone();
        async move {
            let a = k.post(&path, &encrypt_body(b"x", None, false)).await;
            (a.status == 200).then_some(())
        }
    })
    .await;

    drop(c);
    let log = std::fs::read_to_string(env.audit_log()).expect("audit log");
    let outcomes: Vec<String> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"))
        .filter(|r| r["kind"] == "request" && r["op"] == "XksEncrypt")
        .map(|r| r["outcome"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        outcomes.iter().any(|o| o == "DEADLINE_EXCEEDED"),
        "the timeout is audited: {outcomes:?}"
    );
    assert!(
        outcomes.iter().any(|o| o == "UNAVAILABLE"),
        "the failure is audited: {outcomes:?}"
    );
    b.stop().await;
}

/// One broker serves gRPC, `[xks]` and `[ekm]` at once, on one token and one audit trail: a
/// call through each door, one audit record each.
#[tokio::test]
async fn one_broker_serves_grpc_xks_and_ekm_at_once() {
    crate::require_aes!();
    let env = xks_env_with(
        Options::default(),
        "",
        r#"
[[binding]]
identity = "ekm:contoso"
role = "service-encryption-user"
scope = "tenant:contoso"
"#,
    );
    let ekm = crate::ekm::ekm_section(&env, "");
    env.edit_config(|t| format!("{t}\n{ekm}"));
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    use pb::KeyOperation::*;
    create_with_ops(&mut c, "acme/k1", &[Encrypt, Decrypt]).await;
    create(
        &mut c,
        "contoso/kwp",
        pb::KeyType::Aes256,
        pb::Algorithm::AesKeyWrapPad,
    )
    .await;
    let audit_before = std::fs::read_to_string(env.audit_log())
        .expect("audit log")
        .lines()
        .count();

    // gRPC.
    let dek = random_dek(32);
    let w = wrap(&mut c, "contoso/kwp", &dek, b"")
        .await
        .expect("gRPC wrap");
    assert!(!w.wrapped_key.is_empty());
    // XKS.
    let mut kms = Kms::new(&b, &env);
    let mut body = encrypt_body(b"through xks", None, false);
    body["requestMetadata"]["kmsRequestId"] = "kms-three-doors".into();
    let a = kms.post(&format!("{KEYS}/k1/encrypt"), &body).await;
    assert_eq!(a.status, 200, "xks: {}", a.raw);
    // EKM.
    let cert = crate::ekm::mhsm_cert(&env, "mhsm", crate::ekm::MHSM_CN);
    let tls = crate::ekm::tls_client(
        &env.pki.ca.cert_path,
        Some((&cert.cert_path, &cert.key_path)),
        false,
    );
    let ekm_body = json!({
        "request_context": {"request_id": "ekm-three-doors", "correlation_id": "c", "pool_name": "p"},
        "alg": "A256KWP",
        "value": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&dek),
    })
    .to_string();
    let a = https_exchange(
        b.ekm_addr.expect("ekm listener"),
        tls,
        "POST",
        "/contoso/kwp/wrapkey?api-version=0.1-preview",
        &[
            ("Host".into(), "localhost".into()),
            ("Content-Type".into(), "application/json".into()),
        ],
        ekm_body.as_bytes(),
    )
    .await
    .expect("an answer");
    assert_eq!(a.status, 200, "ekm: {}", a.raw);

    drop(c);
    let log = std::fs::read_to_string(env.audit_log()).expect("audit log");
    let recs: Vec<Value> = log
        .lines()
        .skip(audit_before)
        .map(|l| serde_json::from_str(l).expect("json"))
        .filter(|r: &Value| r["kind"] == "request")
        .collect();
    let ops: Vec<&str> = recs.iter().filter_map(|r| r["op"].as_str()).collect();
    for (op, n) in [("WrapKey", 1), ("XksEncrypt", 1), ("EkmWrapKey", 1)] {
        assert_eq!(ops.iter().filter(|o| **o == op).count(), n, "{op}: {ops:?}");
    }
    assert!(recs.iter().any(|r| r["op"] == "XksEncrypt"
        && r["upstream"]["request_id"] == "kms-three-doors"
        && r["caller"] == "xks:acme"));
    assert!(recs.iter().any(|r| r["op"] == "EkmWrapKey"
        && r["request_id"] == "ekm-three-doors"
        && r["caller"] == "ekm:contoso"));
    b.stop().await;
    let (ok, report) = env.verify_audit(&env.audit_log());
    assert!(ok, "{report}");
}
