//! A small PKI made with rcgen: a CA that issues server and client certificates, written as PEM
//! files. Keys are ECDSA P-256.

use std::{
    fs,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::{Result, io_err, softhsm::write_private};

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (PEM).
    pub cert_pem: String,
    /// Where the CA certificate was written.
    pub cert_path: PathBuf,
    dir: PathBuf,
}

/// A certificate and its private key, in memory and on disk.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
    /// The certificate file.
    pub cert_path: PathBuf,
    /// The private key file (mode 0600).
    pub key_path: PathBuf,
    /// The certificate's serial number.
    pub serial: Vec<u8>,
}

/// What a leaf certificate says about its holder.
#[derive(Clone, Debug, Default)]
pub struct LeafSpec {
    /// The subject common name.
    pub common_name: String,
    /// URI SANs (e.g. SPIFFE IDs).
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// IP address SANs.
    pub ips: Vec<std::net::IpAddr>,
    /// Days of validity from now (negative values make an expired certificate with `expired`).
    pub valid_days: i64,
    /// Make a certificate that expired yesterday.
    pub expired: bool,
    /// Instead of `valid_days`: valid for this many seconds from now (a certificate that
    /// expires while a test holds a connection open).
    pub valid_seconds: Option<i64>,
    /// Server (true) or client (false) extended key usage.
    pub server: bool,
}

impl Ca {
    /// Makes a new self-signed CA and writes `<dir>/<stem>.pem`.
    pub fn new(dir: &Path, stem: &str, common_name: &str) -> Result<Self> {
        fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "keybroker test PKI");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let cert_pem = issuer.pem();
        let cert_path = dir.join(format!("{stem}.pem"));
        fs::write(&cert_path, &cert_pem)
            .map_err(io_err(format!("write {}", cert_path.display())))?;
        Ok(Self {
            issuer,
            cert_pem,
            cert_path,
            dir: dir.to_path_buf(),
        })
    }

    /// Issues a leaf certificate and writes `<stem>.pem` and `<stem>.key` beside the CA.
    pub fn issue(&self, stem: &str, spec: &LeafSpec) -> Result<Issued> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.common_name.as_str());
        params.distinguished_name = dn;
        let mut sans = Vec::new();
        for u in &spec.uris {
            sans.push(SanType::URI(u.as_str().try_into()?));
        }
        for d in &spec.dns {
            sans.push(SanType::DnsName(d.as_str().try_into()?));
        }
        for ip in &spec.ips {
            sans.push(SanType::IpAddress(*ip));
        }
        params.subject_alt_names = sans;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if spec.server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let now = OffsetDateTime::now_utc();
        if spec.expired {
            params.not_before = now - Duration::days(30);
            params.not_after = now - Duration::days(1);
        } else if let Some(s) = spec.valid_seconds {
            params.not_before = now - Duration::hours(1);
            params.not_after = now + Duration::seconds(s);
        } else {
            params.not_before = now - Duration::hours(1);
            params.not_after = now + Duration::days(spec.valid_days.max(1));
        }
        let mut serial = [0u8; 16];
        std::io::Read::read_exact(
            &mut fs::File::open("/dev/urandom").map_err(io_err("open /dev/urandom"))?,
            &mut serial,
        )
        .map_err(io_err("read /dev/urandom"))?;
        serial[0] &= 0x7f; // positive
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        let cert_path = self.dir.join(format!("{stem}.pem"));
        let key_path = self.dir.join(format!("{stem}.key"));
        fs::write(&cert_path, &cert_pem)
            .map_err(io_err(format!("write {}", cert_path.display())))?;
        write_private(&key_path, &key_pem)?;
        Ok(Issued {
            cert_pem,
            key_pem,
            cert_path,
            key_path,
            serial: serial.to_vec(),
        })
    }

    /// Writes a CRL (valid for a day) revoking `revoked`, as `<stem>.pem` beside the CA.
    pub fn crl(&self, stem: &str, revoked: &[&Issued]) -> Result<PathBuf> {
        self.crl_until(stem, revoked, Duration::days(1))
    }

    /// Writes a CRL revoking `revoked` whose nextUpdate is `next_update` from now (negative: a
    /// stale CRL), as `<stem>.pem` beside the CA.
    pub fn crl_until(
        &self,
        stem: &str,
        revoked: &[&Issued],
        next_update: Duration,
    ) -> Result<PathBuf> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: (now + next_update).min(now) - Duration::days(1),
            next_update: now + next_update,
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|i| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&i.serial),
                    revocation_time: now - Duration::minutes(5),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer)?;
        let path = self.dir.join(format!("{stem}.pem"));
        fs::write(&path, crl.pem()?).map_err(io_err(format!("write {}", path.display())))?;
        Ok(path)
    }

    /// A server certificate for `localhost`, `127.0.0.1` and `::1`.
    pub fn issue_localhost_server(&self, stem: &str) -> Result<Issued> {
        self.issue(
            stem,
            &LeafSpec {
                common_name: "localhost".into(),
                dns: vec!["localhost".into()],
                ips: vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()],
                valid_days: 365,
                server: true,
                ..Default::default()
            },
        )
    }

    /// A client certificate whose identity is the SPIFFE ID `uri`.
    pub fn issue_spiffe_client(&self, stem: &str, uri: &str) -> Result<Issued> {
        self.issue(
            stem,
            &LeafSpec {
                common_name: uri.rsplit('/').next().unwrap_or(uri).to_string(),
                uris: vec![uri.to_string()],
                valid_days: 365,
                ..Default::default()
            },
        )
    }
}

/// The PKI the end-to-end tests use: one trusted CA and one foreign CA, with the certificates
/// each test needs.
pub struct TestPki {
    /// The CA the broker trusts.
    pub ca: Ca,
    /// A CA the broker does not trust.
    pub foreign_ca: Ca,
    /// The broker's certificate (localhost, 127.0.0.1, ::1).
    pub server: Issued,
    /// An allowed client: `spiffe://keybroker.test/app`.
    pub client: Issued,
    /// A client with a valid certificate whose identity is not allowed:
    /// `spiffe://keybroker.test/intruder`.
    pub stranger: Issued,
    /// An allowed client identified by a DNS SAN only: `app.keybroker.test`.
    pub dns_client: Issued,
    /// An allowed identity, but the certificate expired yesterday.
    pub expired: Issued,
    /// An allowed identity, issued by the foreign CA.
    pub foreign: Issued,
}

/// The SPIFFE ID of [`TestPki::client`].
pub const TEST_CLIENT_ID: &str = "spiffe://keybroker.test/app";
/// The SPIFFE ID of [`TestPki::stranger`].
pub const TEST_STRANGER_ID: &str = "spiffe://keybroker.test/intruder";
/// The DNS name of [`TestPki::dns_client`].
pub const TEST_DNS_CLIENT: &str = "app.keybroker.test";

impl TestPki {
    /// Generates the test PKI under `dir`.
    pub fn generate(dir: &Path) -> Result<Self> {
        let ca = Ca::new(dir, "ca", "keybroker test CA")?;
        let foreign_ca = Ca::new(&dir.join("foreign"), "ca", "some other CA")?;
        let server = ca.issue_localhost_server("server")?;
        let client = ca.issue_spiffe_client("client", TEST_CLIENT_ID)?;
        let stranger = ca.issue_spiffe_client("stranger", TEST_STRANGER_ID)?;
        let dns_client = ca.issue(
            "dns-client",
            &LeafSpec {
                common_name: TEST_DNS_CLIENT.into(),
                dns: vec![TEST_DNS_CLIENT.into()],
                valid_days: 30,
                ..Default::default()
            },
        )?;
        let expired = ca.issue(
            "expired",
            &LeafSpec {
                common_name: "app".into(),
                uris: vec![TEST_CLIENT_ID.into()],
                expired: true,
                ..Default::default()
            },
        )?;
        let foreign = foreign_ca.issue_spiffe_client("client", TEST_CLIENT_ID)?;
        Ok(Self {
            ca,
            foreign_ca,
            server,
            client,
            stranger,
            dns_client,
            expired,
            foreign,
        })
    }
}
