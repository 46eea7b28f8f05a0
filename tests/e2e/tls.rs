//! Mutual TLS: who gets through the handshake, and what identity they get.

use std::{sync::Arc, time::Duration};

use hsm_fixtures::pki::{Issued, LeafSpec};
use keybroker_proto::v1 as pb;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tonic::Code;

use crate::common::*;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn client_config(env: &Env, who: Option<&Issued>, tls12_only: bool) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&env.pki.ca.cert_path).expect("ca"))
        .expect("add ca");
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots);
    let mut cfg = match who {
        Some(i) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(&i.cert_path).expect("cert")],
                PrivateKeyDer::from_pem_file(&i.key_path).expect("key"),
            )
            .expect("client auth"),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

/// Connects, completes TLS, sends the HTTP/2 preface and waits for the server's first frame.
/// In TLS 1.3 the server judges the client certificate after the client's Finished, so its
/// verdict (an alert, or its SETTINGS frame) arrives with the first read.
pub async fn handshake(b: &Broker, cfg: ClientConfig) -> Result<(), String> {
    let tcp = TcpStream::connect(b.addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .map_err(|e| format!("write: {e}"))?;
    tls.flush().await.map_err(|e| format!("flush: {e}"))?;
    let mut buf = [0u8; 9];
    match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err("closed by the server".into()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err("no answer in 10 s".into()),
    }
}

#[tokio::test]
async fn only_valid_client_certificates_over_tls13_get_through_the_handshake() {
    let env = Env::new();
    let two_uris = env
        .pki
        .ca
        .issue(
            "two-uris",
            &LeafSpec {
                common_name: "two".into(),
                uris: vec![
                    hsm_fixtures::pki::TEST_CLIENT_ID.into(),
                    "spiffe://keybroker.test/other".into(),
                ],
                valid_days: 30,
                ..Default::default()
            },
        )
        .expect("issue");
    let no_identity = env
        .pki
        .ca
        .issue(
            "no-identity",
            &LeafSpec {
                common_name: "nobody".into(),
                valid_days: 30,
                ..Default::default()
            },
        )
        .expect("issue");
    let b = env.start().await;

    // The positive control: the same probe with a good certificate is accepted.
    handshake(&b, client_config(&env, Some(&env.pki.client), false))
        .await
        .expect("valid client accepted");

    let cases: [(&str, ClientConfig, &str); 6] = [
        (
            "no client certificate",
            client_config(&env, None, false),
            "CertificateRequired",
        ),
        (
            "foreign CA",
            client_config(&env, Some(&env.pki.foreign), false),
            "alert",
        ),
        (
            "expired certificate",
            client_config(&env, Some(&env.pki.expired), false),
            "alert",
        ),
        (
            "TLS 1.2 only",
            client_config(&env, Some(&env.pki.client), true),
            "alert",
        ),
        (
            "two URI SANs",
            client_config(&env, Some(&two_uris), false),
            "alert",
        ),
        (
            "no SPIFFE or DNS SAN",
            client_config(&env, Some(&no_identity), false),
            "alert",
        ),
    ];
    for (what, cfg, expect) in cases {
        let e = handshake(&b, cfg).await.expect_err(what);
        assert!(
            e.contains(expect),
            "{what}: refused, but not by a TLS alert: {e}"
        );
    }
    b.stop().await;
}

#[tokio::test]
async fn identity_comes_from_the_certificate_and_strangers_are_denied() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    // A valid certificate whose SPIFFE ID is not allowed: through TLS, then PERMISSION_DENIED.
    let mut s = b.clients_as(&env.pki.stranger).await;
    let e = s
        .mgmt
        .list_keys(pb::ListKeysRequest::default())
        .await
        .expect_err("stranger");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("spiffe://keybroker.test/intruder"),
        "{}",
        e.message()
    );
    let e = wrap(&mut s, "t/k", &[1; 32], b"")
        .await
        .expect_err("stranger wrap");
    assert_eq!(e.code(), Code::PermissionDenied);
    // An allowed DNS-SAN identity works.
    let mut d = b.clients_as(&env.pki.dns_client).await;
    create(
        &mut d,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let w = wrap(&mut d, "t/k", &[1; 32], b"")
        .await
        .expect("dns client wraps");
    // ...and the stranger cannot unwrap what the DNS client wrapped.
    let e = unwrap(&mut s, "", &w.wrapped_key, b"")
        .await
        .expect_err("stranger unwrap");
    assert_eq!(e.code(), Code::PermissionDenied);
    b.stop().await;
}

#[tokio::test]
async fn a_silent_client_is_cut_off_after_the_handshake_timeout() {
    let env = Env::new();
    let b = env.start().await;
    let mut tcp = TcpStream::connect(b.addr).await.expect("connect");
    let mut buf = [0u8; 16];
    // The test config sets handshake_timeout_ms = 3000; allow generous slack.
    let r = tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "connection not closed: {r:?}"
    );
    b.stop().await;
}

#[tokio::test]
async fn certificates_cas_and_crls_reload_without_a_restart_and_a_corrupt_file_keeps_the_old_ones()
{
    use hsm_fixtures::pki::Ca;
    let env = Env::new();
    // CRLs are configured from the start (a CRL per trusted CA; unknown status is refused).
    let crl_path = env.dir.path().join("crl.pem");
    std::fs::copy(env.pki.ca.crl("crl1", &[]).expect("crl"), &crl_path).expect("copy");
    env.edit_config(|t| {
        t.replace(
            "handshake_timeout_ms = 3000",
            &format!(
                "handshake_timeout_ms = 3000\ncrl = [\"{}\"]",
                crl_path.display()
            ),
        )
    });
    let b = env.start().await;
    let pid = b.child.id().expect("pid").to_string();
    let hup = || {
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill -HUP");
    };
    let wait_log = |needle: &'static str, count: usize| {
        let b = &b;
        async move {
            for _ in 0..200 {
                if b.log().matches(needle).count() >= count {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("no {needle:?} in the log");
        }
    };
    // A client connected before the rotation keeps working through it.
    let mut before = b.clients_as(&env.pki.client).await;
    before
        .mgmt
        .list_keys(pb::ListKeysRequest::default())
        .await
        .expect("before");

    // Rotate to a new CA: new server certificate and client CA bundle.
    let ca2 = Ca::new(&env.dir.path().join("pki2"), "ca", "second CA").expect("ca2");
    let server2 = ca2.issue_localhost_server("server").expect("server2");
    let client2 = ca2
        .issue_spiffe_client("client", hsm_fixtures::pki::TEST_CLIENT_ID)
        .expect("client2");
    std::fs::write(&env.pki.server.cert_path, &server2.cert_pem).expect("write");
    std::fs::write(&env.pki.server.key_path, &server2.key_pem).expect("write");
    std::fs::write(&env.pki.ca.cert_path, &ca2.cert_pem).expect("write");
    std::fs::copy(ca2.crl("crl2", &[]).expect("crl"), &crl_path).expect("copy");
    hup();
    wait_log("TLS configuration reloaded", 1).await;
    // A connection made before is judged again under the new CAs (issue 18 item 3): its CA is
    // gone, so its next request is refused. (Rotate with both CAs in the bundle for a smooth
    // change.)
    let e = before
        .mgmt
        .list_keys(pb::ListKeysRequest::default())
        .await
        .expect_err("a connection whose CA was removed");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("reloaded CAs"), "{}", e.message());
    // New connections: the old CA's client is refused, the new CA's client gets in.
    let mut cfg_old = client_config(&env, Some(&env.pki.client), false);
    cfg_old.enable_sni = true;
    let e = handshake(&b, cfg_old)
        .await
        .expect_err("old client CA no longer trusted");
    assert!(e.contains("alert") || e.contains("handshake"), "{e}");
    let mut new_client = keybroker::client::clients(&keybroker::client::ClientSettings {
        endpoint: b.endpoint(),
        ca: ca2.cert_path.clone(),
        cert: client2.cert_path.clone(),
        key: client2.key_path.clone(),
    })
    .await
    .expect("new CA client connects");
    new_client
        .mgmt
        .list_keys(pb::ListKeysRequest::default())
        .await
        .expect("new client works");

    // A corrupt server certificate: rejected, the previous configuration stays.
    std::fs::write(
        &env.pki.server.cert_path,
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    hup();
    wait_log("new TLS files rejected", 1).await;
    let mut again = keybroker::client::clients(&keybroker::client::ClientSettings {
        endpoint: b.endpoint(),
        ca: ca2.cert_path.clone(),
        cert: client2.cert_path.clone(),
        key: client2.key_path.clone(),
    })
    .await
    .expect("still served with the last good configuration");
    again
        .mgmt
        .list_keys(pb::ListKeysRequest::default())
        .await
        .expect("works");

    // Restore the server certificate and revoke client2 in the CRL: picked up on change alone.
    std::fs::write(&env.pki.server.cert_path, &server2.cert_pem).expect("write");
    std::fs::copy(ca2.crl("crl3", &[&client2]).expect("crl"), &crl_path).expect("copy");
    wait_log("TLS configuration reloaded", 2).await;
    let r = keybroker::client::clients(&keybroker::client::ClientSettings {
        endpoint: b.endpoint(),
        ca: ca2.cert_path.clone(),
        cert: client2.cert_path.clone(),
        key: client2.key_path.clone(),
    })
    .await;
    match r {
        Err(_) => {}
        Ok(mut c) => {
            let e = c
                .mgmt
                .list_keys(pb::ListKeysRequest::default())
                .await
                .expect_err("revoked client2 still accepted");
            assert_ne!(
                e.code(),
                Code::PermissionDenied,
                "refused at the handshake: {e:?}"
            );
        }
    }
    drop((before, new_client, again));
    b.stop().await;
}

/// Issues a client certificate from `ca` with the given URI and DNS SANs.
fn leaf(ca: &hsm_fixtures::pki::Ca, stem: &str, uris: &[&str], dns: &[&str]) -> Issued {
    ca.issue(
        stem,
        &LeafSpec {
            common_name: stem.into(),
            uris: uris.iter().map(|s| s.to_string()).collect(),
            dns: dns.iter().map(|s| s.to_string()).collect(),
            valid_days: 30,
            ..Default::default()
        },
    )
    .expect("issue")
}

/// What a certificate gets: refused at the handshake, or through and then allowed or denied a
/// call that needs a binding (`ListKeys`).
async fn verdict(env: &Env, b: &Broker, who: &Issued) -> &'static str {
    if handshake(b, client_config(env, Some(who), false))
        .await
        .is_err()
    {
        return "handshake refused";
    }
    let mut c = b.clients_as(who).await;
    match c.mgmt.list_keys(pb::ListKeysRequest::default()).await {
        Ok(_) => "allowed",
        Err(e) if e.code() == Code::PermissionDenied => "denied",
        Err(e) => panic!("unexpected answer: {e:?}"),
    }
}

/// Issue 18 item 4: an identity is one kind, spelt one way, and a policy glob stays within a
/// path segment. Before: a DNS SAN reading `spiffe://...` was that SPIFFE ID, `..` in a SPIFFE
/// path passed, and `payments/*` matched `payments/../admin` and `payments/a/b`.
#[tokio::test]
async fn identities_are_matched_by_kind_and_segment_and_malformed_ones_refused() {
    let env = Env::with(Options {
        policy: Some(
            r#"
[[binding]]
identity = "spiffe://keybroker.test/payments/*"
role = "crypto-user"
scope = "all"
"#
            .into(),
        ),
        ..Default::default()
    });
    let ca = &env.pki.ca;
    let app = leaf(
        ca,
        "pay-app",
        &["spiffe://keybroker.test/payments/app"],
        &[],
    );
    let deeper = leaf(
        ca,
        "pay-deep",
        &["spiffe://keybroker.test/payments/app/x"],
        &[],
    );
    let dotted = leaf(
        ca,
        "pay-dots",
        &["spiffe://keybroker.test/payments/../admin"],
        &[],
    );
    let upper = leaf(
        ca,
        "pay-upper",
        &["spiffe://KEYBROKER.test/payments/app"],
        &[],
    );
    let as_dns = leaf(
        ca,
        "pay-dns",
        &[],
        &["spiffe://keybroker.test/payments/app"],
    );
    let b = env.start().await;
    assert_eq!(verdict(&env, &b, &app).await, "allowed", "the control");
    assert_eq!(
        verdict(&env, &b, &deeper).await,
        "denied",
        "`*` crossed a '/'"
    );
    for (what, who) in [
        ("a '..' segment", &dotted),
        ("an uppercase trust domain", &upper),
        ("a DNS SAN spelling a SPIFFE ID", &as_dns),
    ] {
        assert_eq!(verdict(&env, &b, who).await, "handshake refused", "{what}");
    }
    let (said, log) = b.log_contains("malformed DNS SAN").await;
    assert!(said, "the refusal says why: {log}");
    b.stop().await;

    // A trust domain written with a glob would match other trust domains: the policy is refused.
    std::fs::write(
        env.policy_file(),
        "[[binding]]\nidentity = \"spiffe://keybroker.test*\"\nrole = \"auditor\"\nscope = \"all\"\n",
    )
    .expect("policy");
    let e = env.try_start().await.err().expect("refused");
    assert!(e.contains("write the trust domain out"), "{e}");
}

/// Issue 18 item 4: any CA in the client bundle could issue any trust domain's identities.
/// With `client_ca_domains`, a CA issues only for the domains it is bound to.
#[tokio::test]
async fn a_client_ca_issues_only_for_the_domains_it_is_bound_to() {
    use hsm_fixtures::pki::{Ca, TEST_CLIENT_ID, TEST_DNS_CLIENT};
    let env = Env::new();
    let partner = Ca::new(&env.dir.path().join("partner"), "ca", "partner CA").expect("ca");
    let bundle = env.dir.path().join("client-cas.pem");
    std::fs::write(
        &bundle,
        format!("{}{}", env.pki.ca.cert_pem, partner.cert_pem),
    )
    .expect("bundle");
    let ca_line = format!("client_ca = \"{}\"", env.pki.ca.cert_path.display());
    env.edit_config(|t| t.replace(&ca_line, &format!("client_ca = \"{}\"", bundle.display())));
    let forged = leaf(&partner, "forged", &[TEST_CLIENT_ID], &[]);
    let forged_dns = leaf(&partner, "forged-dns", &[], &[TEST_DNS_CLIENT]);
    let own = leaf(&partner, "own", &["spiffe://partner.test/app"], &[]);

    // The attack, without bindings: the partner's CA mints our client's identity.
    let b = env.start().await;
    assert_eq!(
        verdict(&env, &b, &forged).await,
        "allowed",
        "the unbound bundle"
    );
    b.stop().await;

    env.edit_config(|t| {
        t.replace(
            "handshake_timeout_ms = 3000",
            &format!(
                "handshake_timeout_ms = 3000\nclient_ca_domains = [\
                 {{ ca = \"{}\", domains = [\"keybroker.test\"] }}, \
                 {{ ca = \"{}\", domains = [\"partner.test\"] }}]",
                env.pki.ca.cert_path.display(),
                partner.cert_path.display()
            ),
        )
    });
    let b = env.start().await;
    assert_eq!(verdict(&env, &b, &env.pki.client).await, "allowed");
    assert_eq!(verdict(&env, &b, &env.pki.dns_client).await, "allowed");
    assert_eq!(verdict(&env, &b, &forged).await, "handshake refused");
    assert_eq!(verdict(&env, &b, &forged_dns).await, "handshake refused");
    // The partner's CA still issues its own domain's identities (not allowed by the policy).
    assert_eq!(verdict(&env, &b, &own).await, "denied");
    let (said, log) = b
        .log_contains("not issued by a client CA bound to its domain")
        .await;
    assert!(said, "{log}");
    b.stop().await;
}

/// Writes `[tls] crl = [path]` (and extra `[tls]` lines) into the config.
fn with_crl(env: &Env, crl: &std::path::Path, extra: &str) {
    env.edit_config(|t| {
        t.replace(
            "handshake_timeout_ms = 3000",
            &format!(
                "handshake_timeout_ms = 3000\ncrl = [\"{}\"]\n{extra}",
                crl.display()
            ),
        )
    });
}

/// Issue 18 item 3: identity was decided once per connection, so a certificate revoked or
/// expired while its connection stayed open (HTTP/2 keepalive: for days) went on working.
/// Now each request checks the certificate again: revoked (after the CRL reload), expired.
#[tokio::test]
async fn a_certificate_revoked_or_expired_while_connected_is_refused_at_its_next_request() {
    let env = Env::new();
    let crl = env.dir.path().join("crl.pem");
    std::fs::copy(env.pki.ca.crl("crl0", &[]).expect("crl"), &crl).expect("copy");
    with_crl(&env, &crl, "");
    let short = env
        .pki
        .ca
        .issue(
            "short",
            &LeafSpec {
                common_name: "short".into(),
                uris: vec![hsm_fixtures::pki::TEST_CLIENT_ID.into()],
                valid_seconds: Some(4),
                ..Default::default()
            },
        )
        .expect("issue");
    let revoked = env
        .pki
        .ca
        .issue_spiffe_client("to-revoke", hsm_fixtures::pki::TEST_CLIENT_ID)
        .expect("issue");
    let b = env.start().await;
    let list = |c: &mut keybroker::client::Clients| {
        let mut m = c.mgmt.clone();
        async move { m.list_keys(pb::ListKeysRequest::default()).await }
    };
    let mut soon_expired = b.clients_as(&short).await;
    let mut soon_revoked = b.clients_as(&revoked).await;
    let mut good = b.clients_as(&env.pki.client).await;
    for c in [&mut soon_expired, &mut soon_revoked, &mut good] {
        list(c).await.expect("valid now");
    }
    // Revoke one (the file watcher reloads the CRL), and let the short one expire.
    std::fs::copy(env.pki.ca.crl("crl1", &[&revoked]).expect("crl"), &crl).expect("copy");
    let (reloaded, log) = b.log_contains("TLS configuration reloaded").await;
    assert!(reloaded, "{log}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let e = list(&mut soon_revoked)
        .await
        .expect_err("revoked, same connection");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("reloaded CAs and CRLs"),
        "{}",
        e.message()
    );
    let e = list(&mut soon_expired)
        .await
        .expect_err("expired, same connection");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("expired at"), "{}", e.message());
    list(&mut good)
        .await
        .expect("the good connection is unaffected");
    // Both refusals are in the audit trail.
    let trail = std::fs::read_to_string(env.audit_log()).expect("log");
    assert_eq!(
        trail.matches("client certificate no longer valid").count(),
        2
    );
    b.stop().await;
}

/// Issue 18 item 3: an expired CRL was accepted forever. Past its nextUpdate by more than
/// `crl_grace_s`, no client certificate can be judged and none is accepted; within the grace they
/// are, with an error in the log; a day ahead, a warning.
#[tokio::test]
async fn a_stale_crl_is_refused_after_its_grace_and_announced_before() {
    let env = Env::new();
    let stale = env
        .pki
        .ca
        .crl_until("stale", &[], time::Duration::hours(-2))
        .expect("crl");
    // Two hours stale, one hour of grace: every client refused.
    with_crl(&env, &stale, "crl_grace_s = 3600");
    let b = env.start().await;
    let e = handshake(&b, client_config(&env, Some(&env.pki.client), false))
        .await
        .expect_err("stale CRL");
    assert!(e.contains("alert"), "{e}");
    let (said, log) = b.log_contains("a CRL is stale").await;
    assert!(said, "{log}");
    b.stop().await;
    // Three hours of grace: accepted, and the log says the CRL is past its nextUpdate.
    env.edit_config(|t| t.replace("crl_grace_s = 3600", "crl_grace_s = 10800"));
    let b = env.start().await;
    handshake(&b, client_config(&env, Some(&env.pki.client), false))
        .await
        .expect("within the grace");
    let (said, log) = b.log_contains("a CRL is past its nextUpdate").await;
    assert!(said, "{log}");
    b.stop().await;
    // A CRL due in an hour: accepted, with a warning ahead.
    let due = env
        .pki
        .ca
        .crl_until("due", &[], time::Duration::hours(1))
        .expect("crl");
    std::fs::copy(&due, &stale).expect("copy");
    let b = env.start().await;
    handshake(&b, client_config(&env, Some(&env.pki.client), false))
        .await
        .expect("fresh CRL");
    let (said, log) = b.log_contains("nextUpdate is less than a day away").await;
    assert!(said, "{log}");
    b.stop().await;
}

/// Issue 18 item 3: no maximum connection age, and TLS 1.3 resumption skipped the certificate
/// checks. Connections are closed after `max_connection_age_s`; resumption is off.
#[tokio::test]
async fn connections_age_out_and_are_never_resumed() {
    let env = Env::with(Options {
        server_extra: "max_connection_age_s = 4\nrequest_timeout_ms = 1000".into(),
        ..Default::default()
    });
    let b = env.start().await;
    // A raw HTTP/2 connection, idle: the server closes it once it is 4 s old (plus the grace
    // for requests in flight, the request timeout: 1 s).
    let cfg = Arc::new(client_config(&env, Some(&env.pki.client), false));
    let tcp = TcpStream::connect(b.addr).await.expect("tcp");
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = TlsConnector::from(cfg.clone())
        .connect(name.clone(), tcp)
        .await
        .expect("handshake");
    // The preface, our SETTINGS, and the ACK of the server's.
    tls.write_all(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x04\x01\x00\x00\x00\x00",
    )
    .await
    .expect("preface");
    let t0 = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let mut stream = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => stream.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was not closed in 15 s");
    let age = t0.elapsed();
    assert!(
        age >= Duration::from_millis(3500),
        "closed too early: {age:?}"
    );
    // Closed once the age and the grace (the request timeout) have passed.
    assert!(age < Duration::from_secs(12), "closed too late: {age:?}");
    drop(stream);
    // A second connection with the same client config (which caches sessions) is a full
    // handshake: the server issues no tickets.
    for _ in 0..2 {
        let tcp = TcpStream::connect(b.addr).await.expect("tcp");
        let mut t = TlsConnector::from(cfg.clone())
            .connect(name.clone(), tcp)
            .await
            .expect("handshake");
        t.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .expect("preface");
        let _ = t.read(&mut buf).await;
        assert_eq!(
            t.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "resumed"
        );
    }
    b.stop().await;
}

/// A connection through TLS and the HTTP/2 preface, kept open; `Err` if the server closed it.
async fn hold(
    b: &Broker,
    cfg: ClientConfig,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(b.addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 9];
    match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(tls),
        Ok(Ok(_)) => Err("closed by the server".into()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err("no answer in 10 s".into()),
    }
}

/// Issue 18 item 5: no cap on concurrent handshakes (each costs a server signature and a
/// descriptor for up to the handshake timeout) nor on one identity's connections.
#[tokio::test]
async fn one_identity_has_a_bounded_number_of_connections_and_handshakes_wait_their_turn() {
    let env = Env::with(Options {
        tls_extra: "max_handshakes = 1\nmax_connections_per_identity = 2".into(),
        ..Default::default()
    });
    let b = env.start().await;
    let first = hold(&b, client_config(&env, Some(&env.pki.client), false))
        .await
        .expect("first");
    let _second = hold(&b, client_config(&env, Some(&env.pki.client), false))
        .await
        .expect("second");
    let e = hold(&b, client_config(&env, Some(&env.pki.client), false))
        .await
        .expect_err("a third connection of the same identity");
    assert!(e.contains("closed"), "{e}");
    let (said, log) = b.log_contains("max_connections_per_identity").await;
    assert!(said, "{log}");
    // Another identity is not affected; a closed connection gives its seat back.
    let _dns = hold(&b, client_config(&env, Some(&env.pki.dns_client), false))
        .await
        .expect("another identity");
    drop(first);
    let mut again = Err(String::new());
    for _ in 0..50 {
        again = hold(&b, client_config(&env, Some(&env.pki.client), false)).await;
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = again.expect("the seat came back");

    // One handshake at a time: a client that connects and says nothing holds the only slot
    // until the handshake timeout (3 s); the next handshake waits for it.
    let _silent = TcpStream::connect(b.addr).await.expect("tcp");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = std::time::Instant::now();
    let _late = hold(&b, client_config(&env, Some(&env.pki.dns_client), false))
        .await
        .expect("served after the silent one timed out");
    assert!(
        t0.elapsed() >= Duration::from_millis(2000),
        "did not wait for the handshake slot: {:?}",
        t0.elapsed()
    );
    // Raw connections that ignore GOAWAY would hold the graceful shutdown open.
    drop((_second, _dns, again, _silent, _late));
    b.stop().await;
}
