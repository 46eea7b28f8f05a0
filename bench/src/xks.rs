//! The XKS rows: AWS XKS proxy API encrypt and decrypt through the broker's XKS door, sent as
//! AWS KMS sends them — HTTPS (TLS 1.3), keep-alive HTTP/1.1 connections with one request at a
//! time each, every request signed with SigV4 by `aws-sigv4` (the AWS SDK for Rust's signer)
//! and verified by the broker. The EKM rows (`ekm.rs`) use the same connections, authenticated
//! by a client certificate instead of SigV4.
//!
//! The load generator is kept cheap, since it shares the cores with the broker: like `wrk` with
//! a script of prepared requests, each connection signs each distinct request once and sends
//! the same bytes again until the signature is [`RESIGN_AFTER`] old (well inside the 5 minutes
//! of clock skew the broker accepts). The broker still verifies every request's signature in
//! full: it keeps nothing between requests.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use aws_sigv4::{
    http_request::{SignableBody, SignableRequest, SigningSettings, sign},
    sign::v4,
};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

/// The URI prefix and tenant the bench's broker serves.
pub const PREFIX: &str = "/bench";
/// Its credential.
pub const AKID: &str = "BENCHBENCHBENCHBENCH22";
const SECRET: &str = "YmVuY2hiZW5jaGJlbmNoYmVuY2hiZW5jaGJlbmNoMDE=";

/// Writes the prefix's credential file (the KMS console's format, mode 0600) into `dir`.
pub fn write_credentials(dir: &Path) -> Result<(), String> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let text = serde_json::json!({
        "XksProxyUriPath": format!("{PREFIX}/kms/xks/v1"),
        "XksProxyAuthenticationCredential": {"AccessKeyId": AKID, "RawSecretAccessKey": SECRET},
    })
    .to_string();
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join("bench.json"))
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("XKS credential file: {e}"))
}

/// Where the door listens and how to reach it.
pub struct Target {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    /// Sign every request with SigV4 (the XKS door); else the TLS client certificate is the
    /// authentication (the EKM door).
    sigv4: bool,
}

impl Target {
    /// The XKS door at `addr`, its certificate issued by the CA in `ca`.
    pub fn new(addr: SocketAddr, ca: &Path) -> Result<Self, String> {
        Self::build(addr, ca, None)
    }

    /// The EKM door at `addr`, presenting the client certificate `cert` (PEM chain) with `key`.
    pub fn with_client_cert(
        addr: SocketAddr,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, String> {
        Self::build(addr, ca, Some((cert, key)))
    }

    fn build(addr: SocketAddr, ca: &Path, client: Option<(&Path, &Path)>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
            roots
                .add(c.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
        let tls = match client {
            None => tls.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| e.to_string())?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| e.to_string())?;
                tls.with_client_auth_cert(chain, key)
                    .map_err(|e| e.to_string())?
            }
        };
        Ok(Self {
            addr,
            tls: Arc::new(tls),
            sigv4: client.is_none(),
        })
    }
}

/// A request body for an encrypt of `plaintext` with `aad` (what KMS sends for a data key).
pub fn encrypt_body(plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    serde_json::json!({
        "requestMetadata": metadata("Encrypt"),
        "plaintext": B64.encode(plaintext),
        "additionalAuthenticatedData": B64.encode(aad),
        "encryptionAlgorithm": "AES_GCM",
    })
    .to_string()
    .into_bytes()
}

/// The decrypt body for an encrypt's answer.
pub fn decrypt_body(encrypted: &[u8], aad: &[u8]) -> Result<Vec<u8>, String> {
    let e: serde_json::Value = serde_json::from_slice(encrypted).map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "requestMetadata": metadata("Decrypt"),
        "ciphertext": e["ciphertext"],
        "ciphertextMetadata": e["ciphertextMetadata"],
        "initializationVector": e["initializationVector"],
        "authenticationTag": e["authenticationTag"],
        "additionalAuthenticatedData": B64.encode(aad),
        "encryptionAlgorithm": "AES_GCM",
    })
    .to_string()
    .into_bytes())
}

fn metadata(op: &str) -> serde_json::Value {
    serde_json::json!({
        "awsPrincipalArn": "arn:aws:iam::111122223333:user/bench",
        "kmsKeyArn": "arn:aws:kms:eu-west-1:111122223333:key/bench",
        "kmsOperation": op,
        "kmsRequestId": "bench-request",
    })
}

/// A request's bytes (head and body) and when they were signed.
type Prepared = (Instant, Vec<u8>);

/// How long a connection sends a signed request again before it signs it anew.
pub const RESIGN_AFTER: Duration = Duration::from_secs(60);

/// One keep-alive connection (opened on first use, reopened after a failure), with the
/// requests it has prepared: their bytes, signed, by path and body.
#[derive(Default)]
pub struct Conn {
    stream: Option<TlsStream<TcpStream>>,
    /// Path → body → the request, prepared.
    prepared: HashMap<String, HashMap<Vec<u8>, Prepared>>,
    /// The response buffer, reused.
    buf: Vec<u8>,
}

impl Conn {
    /// POSTs `body` to `path`, signed now; returns the status and the response body.
    pub async fn post(
        &mut self,
        t: &Target,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), String> {
        let r = self.exchange(t, path, body).await;
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    /// Prepares the request's bytes (head and body), signed now, unless they were prepared
    /// less than [`RESIGN_AFTER`] ago.
    fn prepare(&mut self, t: &Target, path: &str, body: &[u8]) -> Result<(), String> {
        let now = Instant::now();
        let fresh = self
            .prepared
            .get(path)
            .and_then(|m| m.get(body))
            .is_some_and(|(at, _)| now.duration_since(*at) < RESIGN_AFTER);
        if !fresh {
            let bytes = build_request(t, path, body)?;
            self.prepared
                .entry(path.to_string())
                .or_default()
                .insert(body.to_vec(), (now, bytes));
        }
        Ok(())
    }

    async fn exchange(
        &mut self,
        t: &Target,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), String> {
        if self.stream.is_none() {
            let tcp = TcpStream::connect(t.addr)
                .await
                .map_err(|e| e.to_string())?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
            let s = tokio_rustls::TlsConnector::from(t.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            self.stream = Some(s);
        }
        self.prepare(t, path, body)?;
        let Self {
            stream,
            prepared,
            buf,
        } = self;
        let s = stream.as_mut().ok_or("no connection")?;
        let req = prepared
            .get(path)
            .and_then(|m| m.get(body))
            .map(|(_, r)| r.as_slice())
            .ok_or("no prepared request")?;
        s.write_all(req).await.map_err(|e| e.to_string())?;
        // The response head, then exactly Content-Length bytes of body.
        buf.clear();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let (status, len) = parse_head(&buf[..head_end])?;
        while buf.len() < head_end + len {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok((status, buf[head_end..head_end + len].to_vec()))
    }
}

/// A response head's status and `Content-Length`.
fn parse_head(head: &[u8]) -> Result<(u16, usize), String> {
    let text = std::str::from_utf8(head).map_err(|_| "a response head that is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    let len = lines
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then_some(v)
        })
        .and_then(|v| v.trim().parse().ok())
        .ok_or("no content-length")?;
    Ok((status, len))
}

/// A request's bytes: head (signed now, for the XKS door) and body.
fn build_request(t: &Target, path: &str, body: &[u8]) -> Result<Vec<u8>, String> {
    let host = format!("localhost:{}", t.addr.port());
    let mut head = format!("POST {path} HTTP/1.1\r\n");
    let headers = if t.sigv4 {
        signed_headers(&host, path, body)?
    } else {
        plain_headers(&host)
    };
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    Ok(req)
}

/// The headers every request carries.
fn plain_headers(host: &str) -> Vec<(String, String)> {
    vec![
        ("Host".to_string(), host.to_string()),
        ("Content-Type".to_string(), "application/json".to_string()),
    ]
}

/// The headers of a request signed now for `kms-xks-proxy`.
fn signed_headers(host: &str, path: &str, body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let identity = aws_credential_types::Credentials::new(AKID, SECRET, None, None, "bench").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region("eu-west-1")
        .name("kms-xks-proxy")
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let req = SignableRequest::new(
        "POST",
        format!("https://{host}{path}"),
        [("host", host), ("content-type", "application/json")].into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(req, &params).map_err(|e| e.to_string())?.into_parts();
    let mut out = plain_headers(host);
    for (k, v) in instructions.headers() {
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}
