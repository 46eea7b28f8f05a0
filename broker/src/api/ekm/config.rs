//! `[ekm]`: the Azure Managed HSM EKM proxy door's configuration. Mutual TLS is not optional:
//! the reference has the proxy reject every request without a valid client certificate, and
//! lets the customer configure both the root CA and the subject CN it accepts.
//!
//! ```toml
//! [ekm]
//! listen = "0.0.0.0:8443"                # its own HTTPS listener (HTTP/1.1, TLS 1.3 only)
//! cert = "pki/ekm.pem"                   # issued by the CA configured in Managed HSM
//! key = "pki/ekm.key"
//! client_ca = "pki/mhsm-client-ca.pem"   # the root CA of Managed HSM's client certificate
//! client_cn = ["mhsm.contoso.example"]   # its accepted subject CN(s)
//! max_connections = 256                  # connections open at once (more wait to be accepted)
//! handshake_timeout_ms = 10000           # TLS handshake bound
//! header_read_timeout_ms = 10000         # request head bound (no slow-loris)
//!
//! [[ekm.prefix]]
//! path = "/contoso"                      # the path prefix set in Managed HSM ("" for none)
//! tenant = "contoso"                     # {key-name} names a key of this tenant
//! identity = "ekm:contoso"               # who the policy sees (default "ekm:" + tenant)
//! # justification = "CUSTOMER_INITIATED_ACCESS"  # only if ekm:contoso is a HYOK service identity
//! ```

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

/// `[ekm]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EkmConfig {
    /// The HTTPS listener's address.
    pub listen: SocketAddr,
    /// The server certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA certificate(s) a client certificate must chain to (PEM).
    pub client_ca: PathBuf,
    /// The accepted subject CNs of the client certificate.
    pub client_cn: Vec<String>,
    /// The most connections open at once (default 256).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// The TLS handshake timeout, ms (default 10000).
    #[serde(default = "default_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// The longest a request's head may take to arrive, ms (default 10000).
    #[serde(default = "default_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// The path prefixes served.
    #[serde(default)]
    pub prefix: Vec<EkmPrefix>,
}

fn default_max_connections() -> usize {
    256
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// `[[ekm.prefix]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EkmPrefix {
    /// The path prefix: empty, or `/` and at most 64 characters of `[A-Za-z0-9/-]`.
    pub path: String,
    /// The tenant whose keys `{key-name}` names.
    pub tenant: String,
    /// The caller identity the pipeline and the policy see (default `ekm:TENANT`).
    #[serde(default)]
    pub identity: Option<String>,
    /// The access justification every request through this prefix carries (the EKM API has
    /// none of its own). Only needed when the prefix's identity is a HYOK service identity.
    #[serde(default)]
    pub justification: Option<crate::policy::Reason>,
}

impl EkmPrefix {
    /// The identity requests through this prefix have.
    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .unwrap_or_else(|| format!("ekm:{}", self.tenant))
    }
}

impl EkmConfig {
    /// Checks what can be checked without reading files.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0
            || self.handshake_timeout_ms == 0
            || self.header_read_timeout_ms == 0
        {
            return Err(
                "ekm.max_connections, ekm.handshake_timeout_ms and ekm.header_read_timeout_ms must be positive"
                    .into(),
            );
        }
        if self.client_cn.is_empty() || self.client_cn.iter().any(|c| c.trim().is_empty()) {
            return Err("ekm.client_cn must name at least one subject CN".into());
        }
        if self.prefix.is_empty() {
            return Err("ekm: at least one [[ekm.prefix]]".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.prefix {
            let what = format!("ekm.prefix {:?}", p.path);
            if !super::valid_prefix(&p.path) {
                return Err(format!(
                    "{what}: a path prefix is empty or /SEGMENT... of [A-Za-z0-9-], at most {} characters after the first /",
                    super::MAX_NAME_LEN
                ));
            }
            crate::model::validate_part("ekm.prefix.tenant", &p.tenant)
                .map_err(|e| format!("{what}: {e}"))?;
            if !p.identity().starts_with("ekm:") {
                return Err(format!("{what}: identity must start with ekm:"));
            }
            if !seen.insert(p.path.clone()) {
                return Err(format!("{what}: configured twice"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EkmConfig, String> {
        let c: EkmConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    const BASE: &str = "listen = \"127.0.0.1:0\"\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\nclient_cn = [\"mhsm\"]\n";

    #[test]
    fn a_documented_configuration_parses() {
        let c = parse(&format!(
            "{BASE}[[prefix]]\npath = \"/contoso\"\ntenant = \"contoso\"\n\
             [[prefix]]\npath = \"\"\ntenant = \"root\"\nidentity = \"ekm:root-pool\"\n"
        ))
        .expect("valid");
        assert_eq!(c.prefix[0].identity(), "ekm:contoso");
        assert_eq!(c.prefix[1].identity(), "ekm:root-pool");
        assert_eq!(c.max_connections, 256);
    }

    #[test]
    fn mtls_is_required_and_bad_prefixes_are_refused() {
        let no_ca = "listen = \"127.0.0.1:0\"\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_cn = [\"x\"]\n[[prefix]]\npath = \"\"\ntenant = \"a\"\n";
        assert!(parse(no_ca).expect_err("no CA").contains("client_ca"));
        for (extra, needle) in [
            ("[[prefix]]\npath = \"a\"\ntenant = \"a\"\n", "[A-Za-z0-9-]"),
            (
                "[[prefix]]\npath = \"/a_b\"\ntenant = \"a\"\n",
                "[A-Za-z0-9-]",
            ),
            (
                "[[prefix]]\npath = \"/a/\"\ntenant = \"a\"\n",
                "[A-Za-z0-9-]",
            ),
            (
                "[[prefix]]\npath = \"/a\"\ntenant = \"a\"\nidentity = \"spiffe://x\"\n",
                "ekm:",
            ),
            (
                "[[prefix]]\npath = \"/a\"\ntenant = \"a\"\n[[prefix]]\npath = \"/a\"\ntenant = \"b\"\n",
                "twice",
            ),
            ("", "at least one"),
        ] {
            let e = parse(&format!("{BASE}{extra}")).expect_err(extra);
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let e = parse(&BASE.replace("[\"mhsm\"]", "[]")).expect_err("no CN");
        assert!(e.contains("client_cn"), "{e}");
    }
}
