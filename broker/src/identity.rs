//! Caller identity, decided once from the verified client certificate (house rule 7, `docs/src/style.md`): its
//! SPIFFE ID (the single URI SAN, `spiffe://...`), else its first DNS SAN. Never from request
//! fields.
//!
//! Both syntaxes are checked strictly, so an identity has one spelling and cannot pass for one of
//! another kind: a SPIFFE ID as the SPIFFE specification writes it (a lowercase trust domain of
//! `a-z 0-9 . - _`, path segments of `a-z A-Z 0-9 . - _`, no empty, `.` or `..` segment, no
//! trailing `/`, query, fragment, port, user or percent-encoding), a DNS name as RFC 1123 does
//! (labels of `a-z 0-9 -`, lowercased, at most 253 bytes). A DNS SAN that reads
//! `spiffe://acme/admin` is therefore refused, not taken for that SPIFFE ID; and the policy
//! matches a caller's kind as well as its id (`policy::IdentityPattern`).

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
    /// An Azure Managed HSM whose client certificate the EKM door verified (CA and subject CN,
    /// in the TLS handshake); the id is the path prefix's configured identity (`api::ekm`).
    Ekm,
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
        && u.get(..9)
            .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://"))
    {
        check_spiffe_id(u).map_err(|why| {
            format!(
                "client certificate has a malformed SPIFFE ID {:?}: {why}",
                printable(u)
            )
        })?;
        return Ok(Caller {
            id: (*u).to_string(),
            kind: IdentityKind::Spiffe,
        });
    }
    let Some(d) = dns.first() else {
        return Err("client certificate has neither a SPIFFE URI SAN nor a DNS SAN".into());
    };
    let name = d.to_ascii_lowercase();
    check_dns_name(&name).map_err(|why| {
        format!(
            "client certificate has a malformed DNS SAN {:?}: {why}",
            printable(d)
        )
    })?;
    Ok(Caller {
        id: name,
        kind: IdentityKind::Dns,
    })
}

impl Caller {
    /// The domain a CA must be bound to for issuing this identity (`[tls] client_ca_domains`):
    /// a SPIFFE ID's trust domain, or a DNS name itself (bound by suffix). `None` for callers
    /// that no certificate authenticated.
    pub fn domain(&self) -> Option<&str> {
        match self.kind {
            IdentityKind::Spiffe => self
                .id
                .strip_prefix("spiffe://")
                .map(|r| r.split('/').next().unwrap_or(r)),
            IdentityKind::Dns => Some(&self.id),
            IdentityKind::Unix | IdentityKind::SigV4 | IdentityKind::Ekm => None,
        }
    }

    /// Whether this caller's [`domain`](Self::domain) lies within `domain`: the same SPIFFE
    /// trust domain, or a DNS name equal to `domain` or under it (`a.acme.example` is under
    /// `acme.example`; `evilacme.example` is not).
    pub fn within(&self, domain: &str) -> bool {
        match (self.kind, self.domain()) {
            (IdentityKind::Spiffe, Some(td)) => td == domain,
            (IdentityKind::Dns, Some(name)) => {
                name == domain
                    || name
                        .strip_suffix(domain)
                        .is_some_and(|head| head.ends_with('.'))
            }
            _ => false,
        }
    }
}

/// The longest SPIFFE ID accepted (the specification's limit for the whole URI).
const MAX_SPIFFE_ID: usize = 2048;
/// The longest trust domain accepted (the specification's limit).
const MAX_TRUST_DOMAIN: usize = 255;

/// Checks a SPIFFE trust domain: non-empty, at most 255 bytes, only `a-z 0-9 . - _`.
pub fn check_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("the trust domain is empty".into());
    }
    if td.len() > MAX_TRUST_DOMAIN {
        return Err(format!(
            "the trust domain is longer than {MAX_TRUST_DOMAIN} bytes"
        ));
    }
    if let Some(c) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(format!(
            "the trust domain holds {c:?} (only lowercase a-z, 0-9, '.', '-', '_')"
        ));
    }
    Ok(())
}

/// Checks one SPIFFE path segment: non-empty, not `.` or `..`, only `a-z A-Z 0-9 . - _`.
pub fn check_path_segment(seg: &str) -> Result<(), String> {
    if seg.is_empty() {
        return Err("the path has an empty segment (a doubled or trailing '/')".into());
    }
    if seg == "." || seg == ".." {
        return Err(format!("the path has a {seg:?} segment"));
    }
    if let Some(c) = seg
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "the path holds {c:?} (only a-z, A-Z, 0-9, '.', '-', '_')"
        ));
    }
    Ok(())
}

/// Checks a SPIFFE ID: `spiffe://` (lowercase), a trust domain, then zero or more path
/// segments, as the SPIFFE specification defines them.
pub fn check_spiffe_id(id: &str) -> Result<(), String> {
    if id.len() > MAX_SPIFFE_ID {
        return Err(format!("longer than {MAX_SPIFFE_ID} bytes"));
    }
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or("the scheme must be spiffe:// in lowercase")?;
    let (td, path) = rest
        .split_once('/')
        .map_or((rest, None), |(t, p)| (t, Some(p)));
    check_trust_domain(td)?;
    if let Some(path) = path {
        for seg in path.split('/') {
            check_path_segment(seg)?;
        }
    }
    Ok(())
}

/// Checks a DNS name as RFC 1123 writes a host name, lowercase: labels of 1 to 63 bytes of
/// `a-z 0-9 -`, not starting or ending with `-`, at most 253 bytes in all, no trailing dot.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("a DNS name has 1 to 253 bytes".into());
    }
    for label in name.split('.') {
        check_dns_label(label, false)?;
    }
    Ok(())
}

/// Checks one DNS label (with `glob`, `*` and `?` are allowed too: a policy pattern's label).
pub fn check_dns_label(label: &str, glob: bool) -> Result<(), String> {
    if label.is_empty() || label.len() > 63 {
        return Err("every label has 1 to 63 bytes (no empty label, no trailing dot)".into());
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("the label {label:?} starts or ends with '-'"));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(matches!(c, 'a'..='z' | '0'..='9' | '-') || (glob && matches!(c, '*' | '?'))))
    {
        return Err(format!(
            "the label {label:?} holds {c:?} (only lowercase a-z, 0-9, '-')"
        ));
    }
    Ok(())
}

/// A certificate's string, shortened and with control characters escaped, for a message.
fn printable(s: &str) -> String {
    s.chars().take(120).flat_map(char::escape_default).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_are_checked_as_the_specification_writes_them() {
        for ok in [
            "spiffe://acme.example",
            "spiffe://acme.example/ns/prod/sa/app",
            "spiffe://a_b-c.9/A.b-C_9",
        ] {
            assert_eq!(check_spiffe_id(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("spiffe://", "empty"),
            ("SPIFFE://acme/x", "lowercase"),
            ("spiffe://Acme/x", "'A'"),
            ("spiffe://acme/x/", "empty segment"),
            ("spiffe://acme//x", "empty segment"),
            ("spiffe://acme/x/../admin", "\"..\""),
            ("spiffe://acme/./x", "\".\""),
            ("spiffe://acme/a%2Fb", "'%'"),
            ("spiffe://acme/x?y", "'?'"),
            ("spiffe://acme/x#y", "'#'"),
            ("spiffe://acme:443/x", "':'"),
            ("spiffe://u@acme/x", "'@'"),
        ] {
            let e = check_spiffe_id(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn dns_names_are_checked_and_a_spiffe_id_is_no_dns_name() {
        for ok in ["a", "app.acme.example", "x-1.y2"] {
            assert_eq!(check_dns_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "spiffe://acme/admin",
            "",
            "a..b",
            "a.",
            "-a.b",
            "a-.b",
            "*.acme.example",
            "a_b.c",
            &"a".repeat(64),
        ] {
            assert!(check_dns_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_callers_domain_is_its_trust_domain_or_its_dns_suffix() {
        let s = Caller {
            id: "spiffe://acme.example/app".into(),
            kind: IdentityKind::Spiffe,
        };
        assert_eq!(s.domain(), Some("acme.example"));
        assert!(s.within("acme.example"));
        assert!(!s.within("example"));
        let d = Caller {
            id: "app.acme.example".into(),
            kind: IdentityKind::Dns,
        };
        assert!(d.within("acme.example") && d.within("app.acme.example"));
        assert!(!d.within("cme.example"));
        let evil = Caller {
            id: "evilacme.example".into(),
            kind: IdentityKind::Dns,
        };
        assert!(!evil.within("acme.example"));
        let unix = Caller {
            id: "unix:uid=0".into(),
            kind: IdentityKind::Unix,
        };
        assert!(unix.domain().is_none() && !unix.within("uid=0"));
    }
}
