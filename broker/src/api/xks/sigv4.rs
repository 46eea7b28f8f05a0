//! Verifying AWS Signature Version 4 on XKS requests (spec: Authentication and Appendix A).
//!
//! The signature is recomputed with `aws-sigv4`, the signer of the AWS SDK for Rust, from the
//! request as received — method, path, query, exactly the headers the client says it signed,
//! the body's SHA-256 — with the secret of the access key the `Authorization` header names, for
//! service `kms-xks-proxy` and the region and time the request states; then compared with the
//! one sent in constant time. No SigV4 arithmetic is written here: only the parsing of the
//! header and the checks the spec adds (service, scope date, at most [`DEFAULT_MAX_SKEW`] between
//! the request's time and this server's clock, against replay).
//!
//! **Credentials** ([`Credentials`], one set per URI prefix) never appear in the configuration:
//! each is a file in the prefix's `credentials_dir` — the very JSON file the AWS KMS console
//! takes (`XksProxyUriPath`, `XksProxyAuthenticationCredential.{AccessKeyId,
//! RawSecretAccessKey}`), private to the broker's user — or the same JSON (one object or an
//! array) in the environment variable `credentials_env`. Any number may be active at once, so
//! rotation is the spec's four steps without a restart: add the new file, update the key
//! store in KMS, wait, remove the old file. [`Credentials::reload`] re-reads the directory
//! ([`Credentials::watch`] does so whenever it changes); a directory that fails to read keeps the
//! credentials in force.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use aws_credential_types::Credentials as AwsCredentials;
use aws_sigv4::{
    http_request::{SignableBody, SignableRequest, SigningSettings, sign},
    sign::v4,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::API_PATH;
use crate::error::SignatureFailure;

/// The service name XKS requests are signed for.
pub const SERVICE: &str = "kms-xks-proxy";
/// The default bound on the difference between a request's time and this server's clock (the
/// spec: requests more than 5 minutes off SHOULD fail).
pub const DEFAULT_MAX_SKEW: Duration = Duration::from_secs(300);
/// The largest credential file or variable read.
const MAX_CREDENTIAL_BYTES: usize = 4096;

/// The console's configuration file (spec: "XKS proxy configuration in AWS KMS console").
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialFile {
    xks_proxy_uri_path: String,
    xks_proxy_authentication_credential: CredentialFields,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialFields {
    access_key_id: String,
    /// Moved into a [`SecretString`] at once (serde cannot build a zeroizing type here).
    raw_secret_access_key: String,
}

impl Drop for CredentialFields {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.raw_secret_access_key);
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(CredentialFile),
    Many(Vec<CredentialFile>),
}

/// The access key ids and secrets of one URI prefix.
pub struct Credentials {
    uri_path: String,
    dir: Option<PathBuf>,
    env: Option<String>,
    current: RwLock<Arc<HashMap<String, SecretString>>>,
    seen: Mutex<Option<Vec<(PathBuf, SystemTime, u64)>>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self.current().keys().cloned().collect();
        f.debug_struct("Credentials")
            .field("uri_path", &self.uri_path)
            .field("access_key_ids", &ids)
            .finish_non_exhaustive()
    }
}

/// Checks an access key id: 20-30 of `A-Z` and `2-7` (spec, Appendix A).
fn valid_access_key_id(s: &str) -> bool {
    (20..=30).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

/// Checks a secret: 43-64 of `A-Za-z0-9/+=` (what KMS accepts).
fn valid_secret(s: &str) -> bool {
    (43..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/+=".contains(&b))
}

impl Credentials {
    /// The credentials of the prefix whose URI path (prefix + `/kms/xks/v1`) is `uri_path`,
    /// read from `dir` and/or the variable `env`. Fails when none can be read.
    pub fn load(uri_path: &str, dir: Option<&Path>, env: Option<&str>) -> Result<Self, String> {
        let c = Self {
            uri_path: uri_path.to_string(),
            dir: dir.map(Path::to_path_buf),
            env: env.map(str::to_string),
            current: RwLock::new(Arc::new(HashMap::new())),
            seen: Mutex::new(None),
        };
        let n = c.reload()?;
        if n == 0 {
            return Err(format!(
                "XKS prefix {uri_path}: no SigV4 credentials (add a credential file to its credentials_dir)"
            ));
        }
        Ok(c)
    }

    fn current(&self) -> Arc<HashMap<String, SecretString>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The secret of an access key id.
    fn secret(&self, access_key_id: &str) -> Option<SecretString> {
        self.current().get(access_key_id).cloned()
    }

    /// The access key ids in force (for logs and tests).
    pub fn access_key_ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.current().keys().cloned().collect();
        v.sort();
        v
    }

    /// Reads every credential again and puts the set in force. On any error the previous set
    /// stays and the error says what was wrong. Returns how many are in force.
    pub fn reload(&self) -> Result<usize, String> {
        let mut next = HashMap::new();
        let mut add = |f: CredentialFile, from: &str| -> Result<(), String> {
            if f.xks_proxy_uri_path != self.uri_path {
                return Err(format!(
                    "{from}: XksProxyUriPath is {:?}, not this prefix's {:?}",
                    f.xks_proxy_uri_path, self.uri_path
                ));
            }
            let c = &f.xks_proxy_authentication_credential;
            if !valid_access_key_id(&c.access_key_id) {
                return Err(format!(
                    "{from}: AccessKeyId must be 20-30 characters of A-Z and 2-7"
                ));
            }
            if !valid_secret(&c.raw_secret_access_key) {
                return Err(format!(
                    "{from}: RawSecretAccessKey must be 43-64 characters of A-Z, a-z, 0-9, '/', '+', '='"
                ));
            }
            let secret = SecretString::from(c.raw_secret_access_key.as_str());
            // (`c` is wiped when `f` drops, below.)
            if next.insert(c.access_key_id.clone(), secret).is_some() {
                return Err(format!(
                    "{from}: access key id {} is given twice",
                    c.access_key_id
                ));
            }
            Ok(())
        };
        if let Some(var) = &self.env
            && let Some(v) = crate::secrets::read_env(var)?
        {
            let parsed: OneOrMany = serde_json::from_str(v.expose_secret())
                .map_err(|e| format!("environment variable {var}: not an XKS credential: {e}"))?;
            let from = format!("environment variable {var}");
            match parsed {
                OneOrMany::One(f) => add(f, &from)?,
                OneOrMany::Many(v) => {
                    for f in v {
                        add(f, &from)?;
                    }
                }
            }
        }
        let mut seen = Vec::new();
        if let Some(dir) = &self.dir {
            for (path, mtime, len) in listing(dir)? {
                let text = read_private(&path)?;
                let f: CredentialFile = serde_json::from_str(&text)
                    .map_err(|e| format!("{}: not an XKS credential file: {e}", path.display()))?;
                add(f, &path.display().to_string())?;
                seen.push((path, mtime, len));
            }
        }
        let n = next.len();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
        Ok(n)
    }

    /// Reloads if a file of the directory was added, removed or changed since the last read.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let now = listing(dir)?;
        let same = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|s| *s == now);
        if same {
            return Ok(false);
        }
        self.reload().map(|_| true)
    }

    /// Re-reads the directory whenever it changes (checked every `every`), for the life of
    /// the process: rotation needs no restart.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let m = me.clone();
                match tokio::task::spawn_blocking(move || m.reload_if_changed()).await {
                    Ok(Ok(true)) => tracing::info!(
                        uri_path = %me.uri_path,
                        access_key_ids = ?me.access_key_ids(),
                        "XKS SigV4 credentials reloaded"
                    ),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::error!(uri_path = %me.uri_path, error = %e,
                        "XKS SigV4 credentials not reloaded; the previous ones stay in force"),
                    Err(e) => tracing::error!(error = %e, "XKS credential reload task failed"),
                }
            }
        });
    }
}

/// The `*.json` files of a credential directory, with their modification times and sizes.
fn listing(dir: &Path) -> Result<Vec<(PathBuf, SystemTime, u64)>, String> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for e in entries {
        let e = e.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let m =
            std::fs::metadata(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if !m.is_file() {
            continue;
        }
        out.push((
            path,
            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            m.len(),
        ));
    }
    out.sort();
    Ok(out)
}

/// Reads a credential file that only its owner may use.
fn read_private(path: &Path) -> Result<Zeroizing<String>, String> {
    use std::{io::Read, os::unix::fs::PermissionsExt};
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = f
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "XKS credential file {} can be used by group or others (mode {:04o}): chmod 600",
            path.display(),
            mode & 0o7777
        ));
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_CREDENTIAL_BYTES + 1));
    (&mut f)
        .take(MAX_CREDENTIAL_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if buf.len() > MAX_CREDENTIAL_BYTES {
        return Err(format!(
            "{} is larger than {MAX_CREDENTIAL_BYTES} bytes",
            path.display()
        ));
    }
    let text = std::str::from_utf8(&buf).map_err(|_| format!("{} is not UTF-8", path.display()))?;
    Ok(Zeroizing::new(text.to_string()))
}

/// The parts of an `Authorization: AWS4-HMAC-SHA256 ...` header.
struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    scope: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(v: &str) -> Result<Authorization<'_>, SignatureFailure> {
    let rest = v
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or(SignatureFailure::Malformed)?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, val) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureFailure::Malformed)?;
        let slot = match k {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => return Err(SignatureFailure::Malformed),
        };
        if slot.replace(val).is_some() {
            return Err(SignatureFailure::Malformed);
        }
    }
    let (credential, signed, signature) = (
        credential.ok_or(SignatureFailure::Malformed)?,
        signed.ok_or(SignatureFailure::Malformed)?,
        signature.ok_or(SignatureFailure::Malformed)?,
    );
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SignatureFailure::Malformed);
    }
    let parts: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, terminator] = parts.as_slice() else {
        return Err(SignatureFailure::Scope(credential.to_string()));
    };
    if *terminator != "aws4_request" {
        return Err(SignatureFailure::Scope(credential.to_string()));
    }
    let scope = credential
        .split_once('/')
        .map(|(_, s)| s)
        .ok_or(SignatureFailure::Malformed)?;
    Ok(Authorization {
        access_key_id,
        date,
        region,
        service,
        scope,
        signed_headers: signed.split(';').collect(),
        signature,
    })
}

/// Parses `YYYYMMDDTHHMMSSZ`.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let month = time::Month::try_from(u8::try_from(num(4..6)?).ok()?).ok()?;
    let date = time::Date::from_calendar_date(
        i32::try_from(num(0..4)?).ok()?,
        month,
        u8::try_from(num(6..8)?).ok()?,
    )
    .ok()?;
    let t = time::Time::from_hms(
        u8::try_from(num(9..11)?).ok()?,
        u8::try_from(num(11..13)?).ok()?,
        u8::try_from(num(13..15)?).ok()?,
    )
    .ok()?;
    Some(time::PrimitiveDateTime::new(date, t).assume_utc().into())
}

/// Verifies a request's SigV4 signature against `credentials`, with `now` as this server's
/// clock. Returns the access key id that signed it; the caller is then the prefix's identity
/// (`Caller { id: prefix.identity(), kind: IdentityKind::SigV4 }`).
pub fn verify(
    parts: &http::request::Parts,
    body: &[u8],
    credentials: &Credentials,
    now: SystemTime,
    max_skew: Duration,
) -> Result<String, SignatureFailure> {
    let one = |name: &str| -> Result<&str, SignatureFailure> {
        let mut it = parts.headers.get_all(name).iter();
        let v = it.next().ok_or(SignatureFailure::Malformed)?;
        if it.next().is_some() {
            return Err(SignatureFailure::Malformed);
        }
        v.to_str().map_err(|_| SignatureFailure::Malformed)
    };
    let auth = parse_authorization(one("authorization")?)?;
    let amz_date = one("x-amz-date").map_err(|_| SignatureFailure::Date)?;
    let time = parse_amz_date(amz_date).ok_or(SignatureFailure::Date)?;
    if auth.service != SERVICE
        || !amz_date.starts_with(auth.date)
        || auth.date.len() != 8
        || auth.region.is_empty()
        || !auth
            .region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(SignatureFailure::Scope(auth.scope.to_string()));
    }
    let skew = match now.duration_since(time) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    if skew > max_skew {
        return Err(SignatureFailure::Skew {
            skew_s: skew.as_secs(),
            max_s: max_skew.as_secs(),
        });
    }
    let signed = &auth.signed_headers;
    let listed = signed.join(";");
    if !signed.contains(&"host")
        || !signed.contains(&"x-amz-date")
        || signed.iter().any(|h| {
            h.is_empty()
                || h.bytes().any(|b| b.is_ascii_uppercase())
                || !parts.headers.contains_key(*h)
        })
    {
        return Err(SignatureFailure::SignedHeaders(listed));
    }
    let secret = credentials
        .secret(auth.access_key_id)
        .ok_or_else(|| SignatureFailure::UnknownAccessKey(auth.access_key_id.to_string()))?;
    let host = one("host").map_err(|_| SignatureFailure::SignedHeaders(listed.clone()))?;
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri = format!("https://{host}{path_and_query}");
    // Exactly the headers the client signed; x-amz-date comes from the signing time.
    let mut headers: Vec<(&str, &str)> = Vec::new();
    for name in signed.iter().filter(|h| **h != "x-amz-date") {
        for v in parts.headers.get_all(*name) {
            headers.push((name, v.to_str().map_err(|_| SignatureFailure::Malformed)?));
        }
    }
    let request = SignableRequest::new(
        parts.method.as_str(),
        uri,
        headers.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|_| SignatureFailure::Mismatch)?;
    let mut settings = SigningSettings::default();
    // Sign what the client listed, nothing less (the default leaves out a few headers proxies
    // change; the client's list decides here, and is compared below).
    settings.excluded_headers = None;
    let identity = AwsCredentials::new(
        auth.access_key_id,
        secret.expose_secret(),
        None,
        None,
        "keybroker-xks",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(auth.region)
        .name(SERVICE)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|_| SignatureFailure::Mismatch)?
        .into();
    let out = sign(request, &params).map_err(|_| SignatureFailure::Mismatch)?;
    // The signer must have covered exactly the client's list (else it computed something else).
    let ours = out
        .output()
        .headers()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .and_then(|(_, v)| {
            parse_authorization(v)
                .ok()
                .map(|a| a.signed_headers.join(";"))
        });
    if ours.as_deref() != Some(listed.as_str()) {
        return Err(SignatureFailure::SignedHeaders(listed));
    }
    let expected = out.signature().to_ascii_lowercase();
    let given = auth.signature.to_ascii_lowercase();
    if expected.as_bytes().ct_eq(given.as_bytes()).into() {
        Ok(auth.access_key_id.to_string())
    } else {
        Err(SignatureFailure::Mismatch)
    }
}

/// The URI path of a prefix, as KMS is configured with it (`XksProxyUriPath`).
pub fn uri_path(prefix: &str) -> String {
    format!("{prefix}{API_PATH}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const AKID: &str = "AKIAI2SFODNN7EXAMPLEX";
    const SECRET: &str = "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE";
    const AKID2: &str = "MUBSXM6K3KMXHN6RRCXI7TWQ";
    const SECRET2: &str = "VU6W2byoiBrhDqNGbx703oL0syCAmhlQgwNUT123456abc";

    /// A request `curl --aws-sigv4 "aws:amz:us-east-1:kms-xks-proxy" --user AKID:SECRET -X POST
    /// -H "Content-Type:application/json" --data ...` (curl 7.88.1) sent, captured byte for
    /// byte: an independent signer.
    const CURL_ENCRYPT: &str = "POST /acme/kms/xks/v1/keys/k1/encrypt HTTP/1.1\r\n\
        Host: localhost:40111\r\n\
        Authorization: AWS4-HMAC-SHA256 Credential=AKIAI2SFODNN7EXAMPLEX/20261204/us-east-1/kms-xks-proxy/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=e1345c25f2230225f241110c7c8ed616eb9ceff720a35d0baff9d555abc92290\r\n\
        X-Amz-Date: 20261204T171133Z\r\n\
        User-Agent: curl/7.88.1\r\n\
        Accept: */*\r\n\
        Content-Type:application/json\r\n\
        Content-Length: 275\r\n\
        \r\n\
        {\"requestMetadata\":{\"awsPrincipalArn\":\"arn:aws:iam::123456789012:user/Alice\",\"kmsKeyArn\":\"arn:aws:kms:us-east-2:123456789012:key/1\",\"kmsOperation\":\"Encrypt\",\"kmsRequestId\":\"4112f4d6-db54-4af4-ae30-c55a22a8dfae\"},\"plaintext\":\"SGVsbG8gV29ybGQh\",\"encryptionAlgorithm\":\"AES_GCM\"}";

    /// The same for GetHealthStatus without a prefix, region eu-west-1.
    const CURL_HEALTH: &str = "POST /kms/xks/v1/health HTTP/1.1\r\n\
        Host: localhost:37999\r\n\
        Authorization: AWS4-HMAC-SHA256 Credential=AKIAI2SFODNN7EXAMPLEX/20261204/eu-west-1/kms-xks-proxy/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=09cf0b670d3a64676fd5175fca1772da06c845bfbfb5ed3e1af127ff6533bd11\r\n\
        X-Amz-Date: 20261204T171133Z\r\n\
        User-Agent: curl/7.88.1\r\n\
        Accept: */*\r\n\
        Content-Type:application/json\r\n\
        Content-Length: 79\r\n\
        \r\n\
        {\"requestMetadata\":{\"kmsRequestId\":\"1124f4d6\",\"kmsOperation\":\"KmsHealthCheck\"}}";

    /// The time curl signed at.
    fn signed_at() -> SystemTime {
        parse_amz_date("20261204T171133Z").expect("date")
    }

    /// Parses a captured HTTP/1.1 request.
    fn parse(raw: &str) -> (http::request::Parts, Vec<u8>) {
        let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
        let mut lines = head.split("\r\n");
        let mut start = lines.next().expect("request line").split(' ');
        let method = start.next().expect("method");
        let path = start.next().expect("path");
        let mut b = http::Request::builder().method(method).uri(path);
        for l in lines {
            let (k, v) = l.split_once(':').expect("header");
            b = b.header(k.trim(), v.trim());
        }
        let (parts, ()) = b.body(()).expect("request").into_parts();
        (parts, body.as_bytes().to_vec())
    }

    fn credential_json(uri_path: &str, akid: &str, secret: &str) -> String {
        format!(
            r#"{{"XksProxyUriPath": "{uri_path}", "XksProxyAuthenticationCredential": {{"AccessKeyId": "{akid}", "RawSecretAccessKey": "{secret}"}}}}"#
        )
    }

    fn write_private(path: &Path, text: &str) {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .expect("create");
        f.write_all(text.as_bytes()).expect("write");
    }

    /// A credential directory for `prefix` holding the given credentials.
    fn creds(prefix: &str, list: &[(&str, &str)]) -> (tempfile::TempDir, Credentials) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, (akid, secret)) in list.iter().enumerate() {
            write_private(
                &dir.path().join(format!("c{i}.json")),
                &credential_json(&uri_path(prefix), akid, secret),
            );
        }
        let c = Credentials::load(&uri_path(prefix), Some(dir.path()), None).expect("load");
        (dir, c)
    }

    /// A request signed by aws-sigv4's signer (the SDK's code path, not the verifier's).
    fn sdk_signed(
        path: &str,
        body: &[u8],
        akid: &str,
        secret: &str,
        at: SystemTime,
    ) -> (http::request::Parts, Vec<u8>) {
        let identity = AwsCredentials::new(akid, secret, None, None, "test").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("us-west-2")
            .name(SERVICE)
            .time(at)
            .settings(SigningSettings::default())
            .build()
            .expect("params")
            .into();
        let uri = format!("https://xks.example.com{path}");
        let req = SignableRequest::new(
            "POST",
            uri.clone(),
            [("content-type", "application/json")].into_iter(),
            SignableBody::Bytes(body),
        )
        .expect("signable");
        let (instructions, _) = sign(req, &params).expect("sign").into_parts();
        let mut b = http::Request::builder()
            .method("POST")
            .uri(path)
            .header("host", "xks.example.com")
            .header("content-type", "application/json");
        for (k, v) in instructions.headers() {
            b = b.header(k, v);
        }
        let (parts, ()) = b.body(()).expect("request").into_parts();
        (parts, body.to_vec())
    }

    #[test]
    fn requests_signed_by_curl_verify() {
        let (_d, c) = creds("/acme", &[(AKID, SECRET)]);
        let (parts, body) = parse(CURL_ENCRYPT);
        assert_eq!(
            verify(&parts, &body, &c, signed_at(), DEFAULT_MAX_SKEW).as_deref(),
            Ok(AKID)
        );
        let (_d, root) = creds("", &[(AKID, SECRET)]);
        let (parts, body) = parse(CURL_HEALTH);
        assert_eq!(
            verify(&parts, &body, &root, signed_at(), DEFAULT_MAX_SKEW).as_deref(),
            Ok(AKID)
        );
    }

    #[test]
    fn a_changed_body_path_header_or_signature_is_a_mismatch() {
        let (_d, c) = creds("/acme", &[(AKID, SECRET)]);
        let (parts, body) = parse(CURL_ENCRYPT);
        let mut b = body.clone();
        b[body.len() - 3] = b'X';
        assert_eq!(
            verify(&parts, &b, &c, signed_at(), DEFAULT_MAX_SKEW),
            Err(SignatureFailure::Mismatch)
        );
        let (parts, body) = parse(&CURL_ENCRYPT.replace("keys/k1/encrypt", "keys/k1/decrypt"));
        assert_eq!(
            verify(&parts, &body, &c, signed_at(), DEFAULT_MAX_SKEW),
            Err(SignatureFailure::Mismatch)
        );
        let (parts, body) = parse(
            &CURL_ENCRYPT.replace("Content-Type:application/json", "Content-Type:text/plain"),
        );
        assert_eq!(
            verify(&parts, &body, &c, signed_at(), DEFAULT_MAX_SKEW),
            Err(SignatureFailure::Mismatch)
        );
        let (parts, body) = parse(&CURL_ENCRYPT.replace("Signature=e1345c", "Signature=e1345d"));
        assert_eq!(
            verify(&parts, &body, &c, signed_at(), DEFAULT_MAX_SKEW),
            Err(SignatureFailure::Mismatch)
        );
        // The right access key id with another secret (a wrong credential on KMS's side).
        let (_d, wrong) = creds("/acme", &[(AKID, SECRET2)]);
        let (parts, body) = parse(CURL_ENCRYPT);
        assert_eq!(
            verify(&parts, &body, &wrong, signed_at(), DEFAULT_MAX_SKEW),
            Err(SignatureFailure::Mismatch)
        );
    }

    #[test]
    fn an_unknown_access_key_is_refused_by_name() {
        let (_d, c) = creds("/acme", &[(AKID2, SECRET2)]);
        let (parts, body) = parse(CURL_ENCRYPT);
        assert_eq!(
            verify(&parts, &body, &c, signed_at(), DEFAULT_MAX_SKEW),
            Err(SignatureFailure::UnknownAccessKey(AKID.into()))
        );
    }

    #[test]
    fn clock_skew_beyond_the_window_is_refused_both_ways() {
        let (_d, c) = creds("/acme", &[(AKID, SECRET)]);
        let (parts, body) = parse(CURL_ENCRYPT);
        let five = Duration::from_secs(300);
        for now in [signed_at() + five, signed_at() - five] {
            assert!(verify(&parts, &body, &c, now, DEFAULT_MAX_SKEW).is_ok());
        }
        for now in [
            signed_at() + five + Duration::from_secs(1),
            signed_at() - five - Duration::from_secs(1),
        ] {
            assert_eq!(
                verify(&parts, &body, &c, now, DEFAULT_MAX_SKEW),
                Err(SignatureFailure::Skew {
                    skew_s: 301,
                    max_s: 300
                })
            );
        }
        // A tighter configured window.
        assert!(matches!(
            verify(
                &parts,
                &body,
                &c,
                signed_at() + Duration::from_secs(61),
                Duration::from_secs(60)
            ),
            Err(SignatureFailure::Skew { .. })
        ));
    }

    #[test]
    fn another_prefixs_credentials_do_not_verify_its_requests() {
        // The same access key id configured under another prefix with its own secret: the
        // door looks credentials up by the request's prefix, so /acme's request meets /other's.
        let (_d, other) = creds("/other", &[(AKID, SECRET2)]);
        let (parts, body) = parse(CURL_ENCRYPT);
        assert_eq!(
            verify(&parts, &body, &other, signed_at(), DEFAULT_MAX_SKEW),
            Err(SignatureFailure::Mismatch)
        );
        // And a credential file made for another prefix is refused at load.
        let dir = tempfile::tempdir().expect("tempdir");
        write_private(
            &dir.path().join("c.json"),
            &credential_json(&uri_path("/other"), AKID, SECRET),
        );
        let e = Credentials::load(&uri_path("/acme"), Some(dir.path()), None).expect_err("refused");
        assert!(e.contains("not this prefix's"), "{e}");
    }

    #[test]
    fn malformed_authorization_scope_and_signed_headers_are_refused() {
        let (_d, c) = creds("/acme", &[(AKID, SECRET)]);
        let at = signed_at();
        type Expect = fn(&SignatureFailure) -> bool;
        let cases: Vec<(String, Expect)> = vec![
            (
                CURL_ENCRYPT.replace("AWS4-HMAC-SHA256 Credential", "AWS4-HMAC-SHA1 Credential"),
                |e| *e == SignatureFailure::Malformed,
            ),
            (CURL_ENCRYPT.replace("/kms-xks-proxy/", "/kms/"), |e| {
                matches!(e, SignatureFailure::Scope(_))
            }),
            (
                CURL_ENCRYPT.replace("/20261204/us-east-1", "/20261203/us-east-1"),
                |e| matches!(e, SignatureFailure::Scope(_)),
            ),
            (CURL_ENCRYPT.replace("aws4_request", "aws5_request"), |e| {
                matches!(e, SignatureFailure::Scope(_))
            }),
            (
                CURL_ENCRYPT.replace(
                    "SignedHeaders=content-type;host;x-amz-date",
                    "SignedHeaders=content-type;host",
                ),
                |e| matches!(e, SignatureFailure::SignedHeaders(_)),
            ),
            (
                CURL_ENCRYPT.replace(
                    "SignedHeaders=content-type;host;",
                    "SignedHeaders=content-type;host;x-missing;",
                ),
                |e| matches!(e, SignatureFailure::SignedHeaders(_)),
            ),
            (
                CURL_ENCRYPT.replace(
                    "X-Amz-Date: 20261204T171133Z",
                    "X-Amz-Date: 2026-12-04T17:11:33Z",
                ),
                |e| *e == SignatureFailure::Date,
            ),
        ];
        for (raw, want) in cases {
            let (parts, body) = parse(&raw);
            let e = verify(&parts, &body, &c, at, DEFAULT_MAX_SKEW).expect_err("refused");
            assert!(want(&e), "{e:?}");
        }
        let (mut parts, body) = parse(CURL_ENCRYPT);
        parts.headers.remove("authorization");
        assert_eq!(
            verify(&parts, &body, &c, at, DEFAULT_MAX_SKEW),
            Err(SignatureFailure::Malformed)
        );
    }

    #[test]
    fn two_credentials_verify_and_rotation_needs_no_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = uri_path("/acme");
        write_private(
            &dir.path().join("old.json"),
            &credential_json(&p, AKID, SECRET),
        );
        let c = Credentials::load(&p, Some(dir.path()), None).expect("load");
        assert_eq!(c.access_key_ids(), [AKID]);
        assert!(!c.reload_if_changed().expect("check"), "nothing changed");
        let body = br#"{"requestMetadata":{}}"#;
        let path = "/acme/kms/xks/v1/keys/k1/metadata";
        let now = SystemTime::now();
        // Step 1: add the new credential; both verify.
        write_private(
            &dir.path().join("new.json"),
            &credential_json(&p, AKID2, SECRET2),
        );
        assert!(c.reload_if_changed().expect("reload"));
        assert_eq!(c.access_key_ids(), [AKID, AKID2]);
        for (akid, secret) in [(AKID, SECRET), (AKID2, SECRET2)] {
            let (parts, body) = sdk_signed(path, body, akid, secret, now);
            assert_eq!(
                verify(&parts, &body, &c, now, DEFAULT_MAX_SKEW).as_deref(),
                Ok(akid)
            );
        }
        // Step 4: remove the old one; it no longer verifies, the new one does.
        std::fs::remove_file(dir.path().join("old.json")).expect("rm");
        assert!(c.reload_if_changed().expect("reload"));
        let (parts, b) = sdk_signed(path, body, AKID, SECRET, now);
        assert_eq!(
            verify(&parts, &b, &c, now, DEFAULT_MAX_SKEW),
            Err(SignatureFailure::UnknownAccessKey(AKID.into()))
        );
        let (parts, b) = sdk_signed(path, body, AKID2, SECRET2, now);
        assert!(verify(&parts, &b, &c, now, DEFAULT_MAX_SKEW).is_ok());
        // A broken file is refused and the credentials in force stay.
        write_private(&dir.path().join("broken.json"), "{");
        assert!(c.reload_if_changed().is_err());
        assert_eq!(c.access_key_ids(), [AKID2]);
    }

    #[test]
    fn credential_files_must_be_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt;
        let p = uri_path("/acme");
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("c.json");
        write_private(&f, &credential_json(&p, AKID, SECRET));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = Credentials::load(&p, Some(dir.path()), None).expect_err("refused");
        assert!(e.contains("chmod 600"), "{e}");
        for (akid, secret, needle) in [
            ("akid-lowercase-is-not-allowed", SECRET, "AccessKeyId"),
            ("SHORT", SECRET, "AccessKeyId"),
            (AKID, "too-short", "RawSecretAccessKey"),
        ] {
            write_private(&f, &credential_json(&p, akid, secret));
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            let e = Credentials::load(&p, Some(dir.path()), None).expect_err("refused");
            assert!(e.contains(needle), "{e}");
        }
        let empty = tempfile::tempdir().expect("tempdir");
        let e = Credentials::load(&p, Some(empty.path()), None).expect_err("no credentials");
        assert!(e.contains("no SigV4 credentials"), "{e}");
    }

    #[test]
    fn amz_dates_parse_strictly() {
        assert!(parse_amz_date("20221009T120000Z").is_some());
        for bad in [
            "20221009T120000",
            "2022-10-09T12:00:00Z",
            "20221309T120000Z",
            "20221009T250000Z",
            "2022100xT120000Z",
        ] {
            assert!(parse_amz_date(bad).is_none(), "{bad}");
        }
    }
}
