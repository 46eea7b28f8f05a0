//! `[xks]`: the AWS XKS proxy door's configuration. Secrets are never here: each URI prefix
//! names where its SigV4 credentials are read from ([`super::sigv4::Credentials`]).
//!
//! ```toml
//! [xks]
//! listen = "0.0.0.0:443"                 # its own HTTPS listener (HTTP/1.1, TLS 1.2+)
//! cert = "pki/xks.pem"                   # a certificate AWS KMS trusts (a public CA)
//! key = "pki/xks.key"
//! max_clock_skew_s = 300                 # SigV4 request time window (default: the spec's 5 min)
//! fleet_size = 2                         # xksProxyFleetSize: brokers behind this endpoint
//! max_connections = 256                  # connections open at once (more wait to be accepted)
//! handshake_timeout_ms = 10000           # TLS handshake bound
//! header_read_timeout_ms = 10000         # request head bound (no slow-loris)
//!
//! [xks.mtls]                             # optional: also require a client certificate
//! client_ca = "pki/amazon-trust.pem"     # the CA(s) AWS KMS's certificate chains to
//! client_cn = ["cks.kms.eu-west-1.amazonaws.com"]
//!
//! [[xks.prefix]]
//! path = "/acme"                         # the URI path before /kms/xks/v1 ("" for none)
//! tenant = "acme"                        # externalKeyId names a key of this tenant
//! identity = "xks:acme"                  # who the policy sees (default "xks:" + tenant)
//! credentials_dir = "/etc/keybroker/xks/acme"   # *.json files, 0600, the KMS console format
//! # credentials_env = "KEYBROKER_XKS_ACME"      # or/and the same JSON in a variable
//! # justification = "CUSTOMER_INITIATED_ACCESS"  # only if xks:acme is a HYOK service identity
//! ```

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use super::{API_PATH, sigv4::DEFAULT_MAX_SKEW};

/// `[xks]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XksConfig {
    /// The HTTPS listener's address.
    pub listen: SocketAddr,
    /// The server certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The most seconds a request's `X-Amz-Date` may differ from this server's clock (1-900).
    #[serde(default = "default_skew")]
    pub max_clock_skew_s: u64,
    /// `xksProxyFleetSize` in health reports.
    #[serde(default = "default_fleet")]
    pub fleet_size: u32,
    /// The most connections open at once (default 256).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// The TLS handshake timeout, ms (default 10000).
    #[serde(default = "default_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// The longest a request's head may take to arrive, ms (default 10000).
    #[serde(default = "default_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Client certificates (mutual TLS), if required.
    #[serde(default)]
    pub mtls: Option<XksMtls>,
    /// The URI prefixes served.
    #[serde(default)]
    pub prefix: Vec<XksPrefix>,
}

fn default_skew() -> u64 {
    DEFAULT_MAX_SKEW.as_secs()
}

fn default_fleet() -> u32 {
    1
}

fn default_max_connections() -> usize {
    256
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// `[xks.mtls]`: the client certificate's CA and subject common names (a handshake with
/// another CA or CN fails, as the spec requires).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XksMtls {
    /// The CA certificate(s) (PEM).
    pub client_ca: PathBuf,
    /// The accepted subject CNs (KMS presents `cks.kms.<region>.amazonaws.com`).
    pub client_cn: Vec<String>,
}

/// `[[xks.prefix]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XksPrefix {
    /// The path before `/kms/xks/v1`: empty, or `/` and segments of `[A-Za-z0-9_-]`.
    pub path: String,
    /// The tenant whose keys `externalKeyId` names.
    pub tenant: String,
    /// The caller identity the pipeline and the policy see (default `xks:TENANT`).
    #[serde(default)]
    pub identity: Option<String>,
    /// A directory of credential files (`*.json`, the KMS console's format, mode 0600).
    #[serde(default)]
    pub credentials_dir: Option<PathBuf>,
    /// An environment variable holding one such JSON object, or an array of them.
    #[serde(default)]
    pub credentials_env: Option<String>,
    /// The access justification every request through this prefix carries (the XKS API has
    /// none of its own). Only needed when the prefix's identity is a HYOK service identity,
    /// whose key use needs a justification the key accepts.
    #[serde(default)]
    pub justification: Option<crate::policy::Reason>,
}

impl XksPrefix {
    /// The identity requests through this prefix have.
    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .unwrap_or_else(|| format!("xks:{}", self.tenant))
    }

    /// `XksProxyUriPath`: the path KMS is configured with.
    pub fn uri_path(&self) -> String {
        format!("{}{API_PATH}", self.path)
    }
}

impl XksConfig {
    /// Checks what can be checked without reading files.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=900).contains(&self.max_clock_skew_s) {
            return Err("xks.max_clock_skew_s must be 1 to 900".into());
        }
        if self.fleet_size == 0 {
            return Err("xks.fleet_size must be at least 1".into());
        }
        if self.max_connections == 0
            || self.handshake_timeout_ms == 0
            || self.header_read_timeout_ms == 0
        {
            return Err(
                "xks.max_connections, xks.handshake_timeout_ms and xks.header_read_timeout_ms must be positive"
                    .into(),
            );
        }
        if let Some(m) = &self.mtls
            && (m.client_cn.is_empty() || m.client_cn.iter().any(|c| c.trim().is_empty()))
        {
            return Err("xks.mtls.client_cn must name at least one subject CN".into());
        }
        if self.prefix.is_empty() {
            return Err("xks: at least one [[xks.prefix]]".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.prefix {
            let what = format!("xks.prefix {:?}", p.path);
            let segments_ok = p.path.is_empty()
                || (p.path.starts_with('/')
                    && p.path[1..].split('/').all(|s| {
                        !s.is_empty()
                            && s.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    }));
            // The spec: XksProxyUriPath is at most 128 characters of a-z, A-Z, 0-9, /, - and _.
            if !segments_ok || p.uri_path().len() > 128 {
                return Err(format!(
                    "{what}: a path is empty or /SEGMENT... of [A-Za-z0-9_-], at most {} characters",
                    128 - API_PATH.len()
                ));
            }
            if p.path.contains(API_PATH) {
                return Err(format!("{what}: the path is the part before {API_PATH}"));
            }
            crate::model::validate_part("xks.prefix.tenant", &p.tenant)
                .map_err(|e| format!("{what}: {e}"))?;
            if p.credentials_dir.is_none() && p.credentials_env.is_none() {
                return Err(format!(
                    "{what}: give credentials_dir or credentials_env (secrets are never inline)"
                ));
            }
            if !seen.insert(p.path.clone()) {
                return Err(format!("{what}: configured twice"));
            }
        }
        Ok(())
    }

    /// The prefix a request's path prefix names.
    pub fn prefix(&self, path: &str) -> Option<&XksPrefix> {
        self.prefix.iter().find(|p| p.path == path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<XksConfig, String> {
        let c: XksConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    const BASE: &str = "listen = \"127.0.0.1:0\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";

    #[test]
    fn a_documented_configuration_parses() {
        let c = parse(&format!("{BASE}fleet_size = 2\n[xks_mtls_placeholder]\n"));
        assert!(c.is_err(), "unknown sections are refused");
        let c = parse(&format!(
            "{BASE}[mtls]\nclient_ca = \"ca.pem\"\nclient_cn = [\"cks.kms.eu-west-1.amazonaws.com\"]\n\
             [[prefix]]\npath = \"/acme\"\ntenant = \"acme\"\ncredentials_dir = \"/etc/xks/acme\"\n\
             [[prefix]]\npath = \"\"\ntenant = \"root\"\nidentity = \"xks:root-store\"\ncredentials_env = \"XKS_ROOT\"\n"
        ))
        .expect("valid");
        assert_eq!(c.max_clock_skew_s, 300);
        assert_eq!(
            c.prefix("/acme").map(|p| p.identity()),
            Some("xks:acme".into())
        );
        assert_eq!(
            c.prefix("").map(|p| p.uri_path()),
            Some("/kms/xks/v1".into())
        );
        assert_eq!(
            c.prefix("").map(|p| p.identity()),
            Some("xks:root-store".into())
        );
        assert!(c.prefix("/other").is_none());
    }

    #[test]
    fn secrets_inline_bad_paths_and_missing_credentials_are_refused() {
        for (extra, needle) in [
            (
                "[[prefix]]\npath = \"/a\"\ntenant = \"a\"\nsecret = \"x\"\n",
                "unknown field",
            ),
            (
                "[[prefix]]\npath = \"/a\"\ntenant = \"a\"\n",
                "never inline",
            ),
            (
                "[[prefix]]\npath = \"a\"\ntenant = \"a\"\ncredentials_env = \"X\"\n",
                "[A-Za-z0-9_-]",
            ),
            (
                "[[prefix]]\npath = \"/a/\"\ntenant = \"a\"\ncredentials_env = \"X\"\n",
                "[A-Za-z0-9_-]",
            ),
            (
                "[[prefix]]\npath = \"/a.b\"\ntenant = \"a\"\ncredentials_env = \"X\"\n",
                "[A-Za-z0-9_-]",
            ),
            (
                "[[prefix]]\npath = \"/a/kms/xks/v1\"\ntenant = \"a\"\ncredentials_env = \"X\"\n",
                "the part before",
            ),
            (
                "[[prefix]]\npath = \"/a\"\ntenant = \"a\"\ncredentials_env = \"X\"\n[[prefix]]\npath = \"/a\"\ntenant = \"b\"\ncredentials_env = \"Y\"\n",
                "twice",
            ),
            ("", "at least one"),
        ] {
            let e = parse(&format!("{BASE}{extra}")).expect_err(extra);
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let long = format!("/{}", "a".repeat(120));
        let e = parse(&format!(
            "{BASE}[[prefix]]\npath = \"{long}\"\ntenant = \"a\"\ncredentials_env = \"X\"\n"
        ))
        .expect_err("too long");
        assert!(e.contains("at most"), "{e}");
        let e = parse(&format!(
            "{BASE}max_clock_skew_s = 0\n[[prefix]]\npath = \"\"\ntenant = \"a\"\ncredentials_env = \"X\"\n"
        ))
        .expect_err("skew");
        assert!(e.contains("max_clock_skew_s"), "{e}");
    }
}
