//! Caller identity, decided once from the verified client certificate (house rule 7, `docs/src/style.md`): its
//! SPIFFE ID (the single URI SAN, `spiffe://...`), else its first DNS SAN. Never from request
//! fields.

use std::fmt;

use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// How the identity was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityKind {
    /// A SPIFFE ID from the URI SAN.
    Spiffe,
    /// A DNS name from the DNS SAN.
    Dns,
    /// A local peer of a unix socket, by uid (`unix:uid=N`, from the kernel).
    Unix,
    /// A request signed with AWS SigV4 by a credential of an XKS URI prefix (the id is the
    /// prefix's configured identity; `api::xks::sigv4`).
    SigV4,
}

/// A verified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The SPIFFE ID or DNS name.
    pub id: String,
    /// Which of the two.
    pub kind: IdentityKind,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// Derives the caller from a client certificate (DER). The certificate's chain and validity
/// must already have been verified.
///
/// Rules (the X.509-SVID profile): more than one URI SAN is refused (an SVID has exactly one);
/// one `spiffe://` URI SAN is the identity; otherwise the first DNS SAN; otherwise refused.
pub fn caller_from_cert(der: &[u8]) -> Result<Caller, String> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("client certificate has a malformed subjectAltName: {e}"))?
        .ok_or("client certificate has no subjectAltName (need a SPIFFE URI or DNS name)")?;
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    for n in &san.value.general_names {
        match n {
            GeneralName::URI(u) => uris.push(*u),
            GeneralName::DNSName(d) => dns.push(*d),
            _ => {}
        }
    }
    if uris.len() > 1 {
        return Err(format!(
            "client certificate has {} URI SANs; a SPIFFE identity needs exactly one",
            uris.len()
        ));
    }
    if let Some(u) = uris.first()
        && let Some(rest) = u.strip_prefix("spiffe://")
    {
        if rest.is_empty() || rest.starts_with('/') || u.chars().any(|c| c.is_control()) {
            return Err(format!(
                "client certificate has a malformed SPIFFE ID {u:?}"
            ));
        }
        return Ok(Caller {
            id: (*u).to_string(),
            kind: IdentityKind::Spiffe,
        });
    }
    match dns.first() {
        Some(d) if !d.is_empty() && !d.chars().any(|c| c.is_control()) => Ok(Caller {
            id: d.to_ascii_lowercase(),
            kind: IdentityKind::Dns,
        }),
        _ => Err("client certificate has neither a SPIFFE URI SAN nor a DNS SAN".into()),
    }
}
