//! The client SDK (`keybroker-client`) against the real broker: round trips, every way sealed
//! data can be damaged, a message sealed under another key than the reader accepts (the
//! key-substitution attack), the DEK cache's counts, retries, and the SDK's example program (docs/src/sdk.md).

use std::time::Duration;

use keybroker_client::{
    CacheConfig, Client, ClientStats, Error, OpenKeys, RetryPolicy, format::TAG_LEN,
};
use keybroker_proto::v1 as pb;

use crate::common::*;

/// 1 KiB chunks, so a few KiB make several chunks.
const LOG2: u8 = 10;
const CHUNK: usize = 1 << LOG2;
/// The header with an AES-256-GCM key: 8 + 79-byte envelope + 7.
const HEADER: usize = 94;

async fn setup(key: &str) -> (Env, Broker) {
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(&mut c, key, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    (env, b)
}

fn sdk(env: &Env, b: &Broker, key: &str) -> Client {
    b.sdk_as(&env.pki.client)
        .key(key)
        .chunk_size_log2(LOG2)
        .build()
        .expect("client")
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[track_caller]
fn assert_unauthentic(r: Result<Vec<u8>, Error>, what: &str) {
    match r {
        Err(Error::Unauthentic) => {}
        other => panic!("{what}: expected Error::Unauthentic, got {other:?}"),
    }
}

#[tokio::test]
async fn seal_and_open_round_trip_empty_small_and_chunked_in_one_shot_and_streaming() {
    crate::require_aes!();
    let (env, b) = setup("sdk/rt").await;
    let client = sdk(&env, &b, "sdk/rt");
    for n in [
        0usize,
        1,
        100,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        5 * CHUNK,
        300_000,
    ] {
        let pt = data(n);
        let sealed = client.seal(&pt, b"row-7").await.expect("seal");
        let chunks = n.div_ceil(CHUNK).max(1);
        assert_eq!(sealed.len(), HEADER + n + TAG_LEN * chunks, "{n} bytes");
        assert_eq!(
            client.open(&sealed, b"row-7").await.expect("open"),
            pt,
            "{n} bytes"
        );
    }
    // Streaming through AsyncRead/AsyncWrite, and the chunk-by-chunk API fed odd pieces.
    let pt = data(200_003);
    let mut sealed = Vec::new();
    let n = client
        .seal_stream(b"backup", &pt[..], &mut sealed)
        .await
        .expect("seal_stream");
    assert_eq!(n, pt.len() as u64);
    let mut opened = Vec::new();
    let m = client
        .open_stream(b"backup", &sealed[..], &mut opened)
        .await
        .expect("open_stream");
    assert_eq!((m, opened == pt), (pt.len() as u64, true));
    let mut o = client.opener(b"backup");
    let mut out = Vec::new();
    for piece in sealed.chunks(777) {
        out.extend(o.update(piece).await.expect("update"));
    }
    out.extend(o.finish().expect("finish"));
    assert_eq!(out, pt);
    // Empty AAD is an AAD like any other.
    let sealed = client.seal(b"x", b"").await.expect("seal");
    assert_eq!(client.open(&sealed, b"").await.expect("open"), b"x");
    // A second client (no shared cache) opens it too, and a seal under a rotated key still
    // opens with the old data's version.
    let other = sdk(&env, &b, "sdk/rt");
    assert_eq!(
        other.open(&sealed, b"").await.expect("open elsewhere"),
        b"x"
    );
    let mut c = b.clients_as(&env.pki.client).await;
    c.mgmt
        .rotate_key(pb::RotateKeyRequest {
            key: "sdk/rt".into(),
        })
        .await
        .expect("rotate");
    let newer = client.seal(b"y", b"").await.expect("seal after rotation");
    let fresh = sdk(&env, &b, "sdk/rt");
    assert_eq!(fresh.open(&sealed, b"").await.expect("old version"), b"x");
    assert_eq!(fresh.open(&newer, b"").await.expect("new version"), b"y");
}

#[tokio::test]
async fn tampered_truncated_reordered_extended_and_wrong_aad_are_refused_with_one_error() {
    crate::require_aes!();
    let (env, b) = setup("sdk/tamper").await;
    let client = sdk(&env, &b, "sdk/tamper");
    let pt = data(4 * CHUNK - 100); // 4 chunks, the last one short
    let sealed = client.seal(&pt, b"ctx").await.expect("seal");
    let chunk = CHUNK + TAG_LEN;
    assert_eq!(sealed.len(), HEADER + pt.len() + 4 * TAG_LEN);
    let chunks: Vec<&[u8]> = sealed[HEADER..].chunks(chunk).collect();
    assert_eq!(chunks.len(), 4);
    let rebuild = |order: &[usize]| {
        let mut v = sealed[..HEADER].to_vec();
        for &i in order {
            v.extend_from_slice(chunks[i]);
        }
        v
    };
    assert_eq!(
        client
            .open(&rebuild(&[0, 1, 2, 3]), b"ctx")
            .await
            .expect("intact"),
        pt
    );

    // Tampered: a bit in the magic, the chunk size, the wrapped DEK's header, IV, ciphertext and
    // tag (those reach the broker, which refuses them), the nonce prefix, and every chunk's body
    // and tag.
    let mut positions = vec![0, 5, 8, 9, 12, 30, 60, 86, 87, 90, 93];
    for i in 0..4 {
        positions.extend([HEADER + i * chunk, HEADER + i * chunk + 500]);
        positions.push((HEADER + (i + 1) * chunk).min(sealed.len()) - 1);
    }
    for p in positions {
        let mut t = sealed.clone();
        t[p] ^= 0x10;
        assert_unauthentic(
            client.open(&t, b"ctx").await,
            &format!("bit flipped at {p}"),
        );
    }
    // Truncated: the last chunk dropped, cut inside a chunk, header only, part of the header.
    for (what, cut) in [
        ("last chunk dropped", HEADER + 3 * chunk),
        ("cut inside the last chunk", sealed.len() - 1),
        ("cut inside a middle chunk", HEADER + chunk + 10),
        ("header only", HEADER),
        ("half a header", HEADER / 2),
        ("nothing", 0),
    ] {
        assert_unauthentic(client.open(&sealed[..cut], b"ctx").await, what);
    }
    // Reordered, duplicated, extended.
    for order in [
        &[1, 0, 2, 3][..],
        &[0, 2, 1, 3],
        &[0, 1, 3, 2],
        &[0, 1, 1, 2, 3],
        &[0, 1, 2, 3, 3],
    ] {
        assert_unauthentic(
            client.open(&rebuild(order), b"ctx").await,
            &format!("{order:?}"),
        );
    }
    let mut longer = sealed.clone();
    longer.extend_from_slice(&[0; TAG_LEN]);
    assert_unauthentic(client.open(&longer, b"ctx").await, "extended");
    // Wrong AAD.
    for aad in [&b"ctx2"[..], b"", b"CTX"] {
        assert_unauthentic(client.open(&sealed, aad).await, "wrong aad");
    }
    // Another message's header (its own DEK and nonce prefix) in front of these chunks.
    let other = client.seal(&pt, b"ctx").await.expect("seal");
    let mut spliced = other[..HEADER].to_vec();
    spliced.extend_from_slice(&sealed[HEADER..]);
    assert_unauthentic(client.open(&spliced, b"ctx").await, "spliced header");
    // And the intact message still opens.
    assert_eq!(client.open(&sealed, b"ctx").await.expect("intact"), pt);
}

#[tokio::test]
async fn repeated_and_concurrent_opens_under_one_dek_make_one_unwrap_call() {
    crate::require_aes!();
    let (env, b) = setup("sdk/cache").await;
    let sealer = sdk(&env, &b, "sdk/cache");
    let sealed = sealer.seal(b"hello", b"a").await.expect("seal");
    assert_eq!(sealer.stats().generate_calls, 1);

    let reader = sdk(&env, &b, "sdk/cache");
    for _ in 0..10 {
        assert_eq!(reader.open(&sealed, b"a").await.expect("open"), b"hello");
    }
    // A wrong AAD is refused locally, with the cached DEK: still no second unwrap.
    assert!(matches!(
        reader.open(&sealed, b"b").await,
        Err(Error::Unauthentic)
    ));
    let s = reader.stats();
    assert_eq!(
        (
            s.unwrap_calls,
            s.cache.misses,
            s.cache.hits,
            s.cache.entries
        ),
        (1, 1, 10, 1)
    );
    assert_eq!(s.generate_calls, 0);

    // Concurrent opens of a DEK nobody has cached yet share one unwrap.
    let concurrent = sdk(&env, &b, "sdk/cache");
    let opens = (0..8).map(|_| {
        let c = concurrent.clone();
        let sealed = sealed.clone();
        tokio::spawn(async move { c.open(&sealed, b"a").await })
    });
    for h in futures_util::future::join_all(opens).await {
        assert_eq!(h.expect("task").expect("open"), b"hello");
    }
    let s = concurrent.stats();
    assert_eq!((s.unwrap_calls, s.cache.misses, s.cache.hits), (1, 1, 7));

    // Use-bounded: max_uses 3 serves 3 opens per unwrap, and erases the DEK after the third.
    let bounded = b
        .sdk_as(&env.pki.client)
        .key("sdk/cache")
        .cache(CacheConfig {
            max_uses: 3,
            ..CacheConfig::default()
        })
        .build()
        .expect("client");
    for _ in 0..7 {
        bounded.open(&sealed, b"a").await.expect("open");
    }
    let s = bounded.stats();
    assert_eq!(
        (
            s.unwrap_calls,
            s.cache.hits,
            s.cache.evictions,
            s.cache.entries
        ),
        (3, 4, 2, 1)
    );

    // Time-bounded to zero and disabled both mean one unwrap per open; clear_cache erases.
    for cfg in [
        CacheConfig {
            max_age: Duration::ZERO,
            ..CacheConfig::default()
        },
        CacheConfig::disabled(),
    ] {
        let c = b
            .sdk_as(&env.pki.client)
            .key("sdk/cache")
            .cache(cfg)
            .build()
            .expect("client");
        for _ in 0..3 {
            c.open(&sealed, b"a").await.expect("open");
        }
        assert_eq!((c.stats().unwrap_calls, c.stats().cache.hits), (3, 0));
    }
    reader.clear_cache();
    reader.open(&sealed, b"a").await.expect("open");
    assert_eq!(reader.stats().unwrap_calls, 2);
}

#[tokio::test]
async fn an_unreachable_broker_is_retried_with_backoff_then_reported_as_unavailable() {
    crate::require_aes!();
    // A port nobody listens on: every attempt fails with UNAVAILABLE.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let env = Env::new();
    let client = keybroker_client::ClientBuilder::from_pem_files(
        format!("https://localhost:{port}"),
        &env.pki.ca.cert_path,
        &env.pki.client.cert_path,
        &env.pki.client.key_path,
    )
    .expect("pem")
    .key("sdk/none")
    .retry(RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
    })
    .build()
    .expect("client");
    match client.seal(b"x", b"").await {
        Err(Error::Rpc {
            method,
            code,
            attempts,
            ..
        }) => assert_eq!(
            (method, code, attempts),
            ("GenerateDataKey", tonic::Code::Unavailable, 3)
        ),
        other => panic!("expected UNAVAILABLE after 3 attempts, got {other:?}"),
    }
    assert_eq!(
        client.stats(),
        ClientStats {
            generate_calls: 1,
            rpc_attempts: 3,
            retries: 2,
            ..ClientStats::default()
        }
    );
    // Non-retryable codes are not retried: NOT_FOUND for a key that does not exist.
    let (env, b) = setup("sdk/exists").await;
    let c = sdk(&env, &b, "sdk/missing");
    match c.seal(b"x", b"").await {
        Err(e) => assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}"),
        Ok(_) => panic!("sealed under a missing key"),
    }
    assert_eq!((c.stats().rpc_attempts, c.stats().retries), (1, 0));
}

#[tokio::test]
async fn the_sdk_example_program_runs_against_a_broker() {
    crate::require_aes!();
    let (env, b) = setup("dev/demo").await;
    let example = build_example();
    let out = tokio::process::Command::new(&example)
        .arg("dev/demo")
        .env("KEYBROKER_ENDPOINT", b.endpoint())
        .env("KEYBROKER_CA_CERT", &env.pki.ca.cert_path)
        .env("KEYBROKER_CLIENT_CERT", &env.pki.client.cert_path)
        .env("KEYBROKER_CLIENT_KEY", &env.pki.client.key_path)
        .output()
        .await
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "example failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("wrong AAD refused"), "{stdout}");
    assert!(
        stdout
            .contains("broker calls: 2 GenerateDataKey, 2 UnwrapKey; DEK cache: 3 hits, 2 misses"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}

/// Builds `client/examples/seal_open.rs` (once per test binary) and returns its path.
fn build_example() -> std::path::PathBuf {
    let dir = std::path::Path::new(BROKER)
        .parent()
        .expect("binary dir")
        .join("examples");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "keybroker-client",
            "--example",
            "seal_open",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build for the example");
    assert!(status.success(), "building the example failed");
    dir.join("seal_open")
}

#[tokio::test]
async fn a_hyok_service_identity_seals_and_opens_with_a_justification_the_key_owner_accepts() {
    crate::require_aes!();
    const PROVIDER: &str = "spiffe://provider.test/reindexer";
    const ADMIN: &str = "spiffe://customer.test/admin";
    let env = Env::with(Options {
        policy: Some(format!(
            r#"
[[binding]]
identity = "{ADMIN}"
roles = ["administrator", "crypto-user"]
scope = "all"
[[binding]]
identity = "{PROVIDER}"
role = "service-encryption-user"
scope = "tenant:acme"

[hyok]
service_identities = ["spiffe://provider.test/*"]
default_accepted_reasons = ["PROVIDER_INITIATED_SERVICE"]
"#
        )),
        ..Options::default()
    });
    let admin = env
        .pki
        .ca
        .issue_spiffe_client("admin", ADMIN)
        .expect("cert");
    let provider = env
        .pki
        .ca
        .issue_spiffe_client("provider", PROVIDER)
        .expect("cert");
    let b = env.start().await;
    let mut a = b.clients_as(&admin).await;
    create(
        &mut a,
        "acme/db",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;

    // The cache is off so that every open reaches the key owner's policy.
    let base = b
        .sdk_as(&provider)
        .key("acme/db")
        .cache(CacheConfig::disabled())
        .build()
        .expect("client");
    let e = base.seal(b"x", b"").await.expect_err("no justification");
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied), "{e}");
    let justified = base.with_justification(
        keybroker_client::JustificationReason::ProviderInitiatedService,
        "reindex 7",
    );
    let sealed = justified.seal(b"record", b"ctx").await.expect("seal");
    assert_eq!(
        justified.open(&sealed, b"ctx").await.expect("open"),
        b"record"
    );
    let refused = base.with_justification(
        keybroker_client::JustificationReason::ProviderInternalMaintenance,
        "not accepted for this key",
    );
    let e = refused
        .open(&sealed, b"ctx")
        .await
        .expect_err("reason not accepted");
    assert_eq!(e.code(), Some(tonic::Code::PermissionDenied), "{e}");
    // The three views share one channel and one set of counters; nothing was retried.
    let s = base.stats();
    assert_eq!(s, justified.stats());
    assert_eq!(
        (s.generate_calls, s.unwrap_calls, s.rpc_attempts, s.retries),
        (2, 2, 4, 0)
    );
    drop(a);
    b.stop().await;

    // The key owner's audit trail has the reason, the detail and the SDK's request id.
    let text = std::fs::read_to_string(env.audit_log()).expect("audit");
    let rec: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .find(|r| r["caller"] == PROVIDER && r["op"] == "GenerateDataKey" && r["outcome"] == "OK")
        .expect("the provider's GenerateDataKey is audited");
    assert_eq!(rec["justification"], "PROVIDER_INITIATED_SERVICE");
    assert_eq!(rec["justification_detail"], "reindex 7");
    assert_eq!(rec["key"], "acme/db");
    assert!(
        rec["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("kbc-")),
        "{rec}"
    );
}

/// A multi-tenant reader (a service that may unwrap under every tenant's key) and an attacker who
/// holds a key of its own tenant and can write the reader's stored records.
const KEY_ADMIN: &str = "spiffe://keybroker.test/admin";
const READER: &str = "spiffe://keybroker.test/reader";
const ATTACKER: &str = "spiffe://evil.test/writer";

/// The world of the key-substitution tests: `acme/payments` (the record's key), `acme/archive`
/// (a second key of the same tenant) and `evil/inbox` (the attacker's), all AES-256; the reader
/// may wrap and unwrap under every one of them, the attacker only under `evil/*`.
async fn substitution_world() -> (
    Env,
    Broker,
    hsm_fixtures::pki::Issued,
    hsm_fixtures::pki::Issued,
) {
    let env = Env::with(Options {
        policy: Some(format!(
            r#"
[[binding]]
identity = "{KEY_ADMIN}"
roles = ["crypto-user"]
scope = "all"
[[binding]]
identity = "{READER}"
role = "service-encryption-user"
scope = "all"
[[binding]]
identity = "{ATTACKER}"
role = "service-encryption-user"
scope = "tenant:evil"
"#
        )),
        ..Options::default()
    });
    let [admin, reader, attacker] = [
        ("admin", KEY_ADMIN),
        ("reader", READER),
        ("attacker", ATTACKER),
    ]
    .map(|(stem, id)| env.pki.ca.issue_spiffe_client(stem, id).expect("cert"));
    let b = env.start().await;
    let mut a = b.clients_as(&admin).await;
    for key in ["acme/payments", "acme/archive", "evil/inbox"] {
        create(&mut a, key, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    }
    (env, b, reader, attacker)
}

#[tokio::test]
async fn open_refuses_a_message_an_attacker_sealed_under_another_key_the_reader_may_unwrap() {
    crate::require_aes!();
    let (env, b, reader, attacker) = substitution_world().await;
    let payments = b
        .sdk_as(&reader)
        .key("acme/payments")
        .build()
        .expect("client");
    let genuine = payments
        .seal(b"pay 10 EUR to alice", b"orders/42")
        .await
        .expect("seal");
    assert_eq!(
        payments.open(&genuine, b"orders/42").await.expect("open"),
        b"pay 10 EUR to alice"
    );

    // The attacker seals its own plaintext, with the record's AAD, under the one key it may use,
    // and writes the result over the stored record. Everything in the message is authentic under
    // the DEK the attacker chose; only the key that wrapped that DEK gives it away.
    let evil = b
        .sdk_as(&attacker)
        .key("evil/inbox")
        .build()
        .expect("client");
    let forged = evil
        .seal(b"pay 9999 EUR to mallory", b"orders/42")
        .await
        .expect("the attacker seals under its own key");
    let r = payments.open(&forged, b"orders/42").await;
    assert!(
        matches!(r, Err(Error::Unauthentic)),
        "the reader accepted a message sealed under evil/inbox: {:?}",
        r.map(|p| String::from_utf8_lossy(&p).into_owned())
    );
    // With one accepted key the broker was told which key to expect and refused the envelope
    // itself, before unwrapping: its audit trail has the reader's refused UnwrapKey and no
    // unwrap under evil/inbox for the reader.
    let audit = std::fs::read_to_string(env.audit_log()).expect("audit");
    let reader_unwraps: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|r| r["caller"] == READER && r["op"] == "UnwrapKey")
        .collect();
    let outcomes: Vec<(&str, &str)> = reader_unwraps
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap_or(""),
                r["outcome"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("acme/payments", "OK"),
            ("acme/payments", "INVALID_ARGUMENT")
        ]
    );
    // The forged DEK was not cached, and the record's own message still opens.
    let s = payments.stats();
    assert_eq!((s.unwrap_calls, s.cache.entries), (2, 1));
    assert_eq!(
        payments.open(&genuine, b"orders/42").await.expect("open"),
        b"pay 10 EUR to alice"
    );
}

#[tokio::test]
async fn several_accepted_keys_are_checked_by_the_client_and_the_cache_serves_a_dek_only_to_opens_that_accept_its_key()
 {
    crate::require_aes!();
    let (_env, b, reader, attacker) = substitution_world().await;
    // The reader accepts two keys of its tenant (say the current one and the one it replaced).
    let reader_sdk = |key: &str| b.sdk_as(&reader).key(key);
    let rw = reader_sdk("acme/payments")
        .open_keys(OpenKeys::only(["acme/payments", "acme/archive"]))
        .build()
        .expect("client");
    let payments = rw.seal(b"current", b"r1").await.expect("seal");
    let archived = reader_sdk("acme/archive")
        .build()
        .expect("client")
        .seal(b"archived", b"r2")
        .await
        .expect("seal");
    let forged = b
        .sdk_as(&attacker)
        .key("evil/inbox")
        .build()
        .expect("client")
        .seal(b"forged", b"r1")
        .await
        .expect("seal");
    assert_eq!(rw.open(&payments, b"r1").await.expect("open"), b"current");
    assert_eq!(rw.open(&archived, b"r2").await.expect("open"), b"archived");
    // Two keys do not fit UnwrapKeyRequest.key: the broker unwraps, the client refuses what the
    // broker reports (evil/inbox) and caches nothing.
    assert!(matches!(
        rw.open(&forged, b"r1").await,
        Err(Error::Unauthentic)
    ));
    let s = rw.stats();
    assert_eq!((s.unwrap_calls, s.cache.entries), (3, 2));

    // Discovery mode must be asked for, and then accepts the attacker's key: it is only for
    // identities that no other writer shares keys with. The view shares rw's cache...
    let discovery = rw.with_open_keys(OpenKeys::Discovery).expect("view");
    assert_eq!(
        discovery.open(&forged, b"r1").await.expect("discovery"),
        b"forged"
    );
    assert_eq!(rw.stats().cache.entries, 3);
    // ... and the cache serves that DEK to no open that refuses evil/inbox (no broker call), nor
    // the archive key's DEK to a view that accepts acme/payments alone.
    let payments_only = rw
        .with_open_keys(OpenKeys::only(["acme/payments"]))
        .expect("view");
    let calls = rw.stats().unwrap_calls;
    for (who, c) in [("rw", &rw), ("payments only", &payments_only)] {
        assert!(
            matches!(c.open(&forged, b"r1").await, Err(Error::Unauthentic)),
            "{who}"
        );
    }
    assert!(matches!(
        payments_only.open(&archived, b"r2").await,
        Err(Error::Unauthentic)
    ));
    assert_eq!(rw.stats().unwrap_calls, calls, "refused from the cache");
    assert_eq!(
        payments_only.open(&payments, b"r1").await.expect("open"),
        b"current"
    );

    // A client that names no key at all opens nothing (strict mode has nothing to accept).
    let nameless = b.sdk_as(&reader).build().expect("client");
    assert!(matches!(
        nameless.open(&payments, b"r1").await,
        Err(Error::Config(m)) if m.contains("no key to open with")
    ));
    assert_eq!(nameless.stats().rpc_attempts, 0);
}

/// Issue 22, item 7: the SDK signs through the broker and verifies locally, with the signing
/// version's public key fetched once — so verification still works with the broker stopped.
/// A tampered signature or another digest is `Ok(false)`; a digest of the wrong length or an
/// algorithm that does not fit the key is `Error::Invalid` (nothing sent).
#[tokio::test]
async fn the_sdk_signs_through_the_broker_and_verifies_locally_from_the_cached_public_key() {
    use keybroker_client::SignatureAlgorithm as A;
    use sha2::{Digest, Sha256, Sha384, Sha512};
    const TEST: &str =
        "the_sdk_signs_through_the_broker_and_verifies_locally_from_the_cached_public_key";
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let mut cases = Vec::new();
    for (name, kt, algs) in [
        ("t/ec256", pb::KeyType::EcP256, &[A::Es256][..]),
        ("t/ec384", pb::KeyType::EcP384, &[A::Es384][..]),
        (
            "t/rsa",
            pb::KeyType::Rsa2048,
            &[A::Rs256, A::Ps384, A::Ps512][..],
        ),
    ] {
        if crate::sign::create_signing(&mut c, TEST, name, kt)
            .await
            .is_some()
        {
            cases.extend(algs.iter().map(|a| (name, *a)));
        }
    }
    let client = b.sdk_as(&env.pki.client).build().expect("client");
    let digest = |alg: A, msg: &[u8]| match alg {
        A::Es256 | A::Rs256 | A::Ps256 => Sha256::digest(msg).to_vec(),
        A::Es384 | A::Rs384 | A::Ps384 => Sha384::digest(msg).to_vec(),
        _ => Sha512::digest(msg).to_vec(),
    };
    let mut made = Vec::new();
    for (key, alg) in &cases {
        let d = digest(*alg, b"invoice 42");
        let s = client.sign(key, *alg, &d).await.expect("sign");
        assert_eq!((s.key.as_str(), s.key_version), (*key, 1));
        let ok = async |sig: &[u8], d: &[u8]| client.verify(key, s.key_version, *alg, d, sig).await;
        assert!(ok(&s.signature, &d).await.expect("verify"), "{key} {alg:?}");
        let mut bad = s.signature.clone();
        bad[3] ^= 1;
        assert!(
            !ok(&bad, &d).await.expect("verify"),
            "{key} {alg:?}: tampered"
        );
        let other = digest(*alg, b"invoice 43");
        assert!(
            !ok(&s.signature, &other).await.expect("verify"),
            "{key} {alg:?}: other digest"
        );
        match ok(&s.signature, &d[1..]).await {
            Err(Error::Invalid(m)) => assert!(m.contains("digest"), "{m}"),
            r => panic!("{key} {alg:?}: a short digest gave {r:?}"),
        }
        made.push((key, *alg, d, s));
    }
    if let Some((key, _, d, s)) = made.first() {
        let wrong = if key.starts_with("t/ec") {
            A::Rs256
        } else {
            A::Es256
        };
        match client
            .verify(key, s.key_version, wrong, d, &s.signature)
            .await
        {
            Err(Error::Invalid(m)) => assert!(m.contains("does not fit"), "{m}"),
            r => panic!("a {wrong:?} signature on {key} gave {r:?}"),
        }
    }
    // Local: the public keys are cached, so the broker is not needed any more.
    drop(c);
    b.stop().await;
    for (key, alg, d, s) in &made {
        assert!(
            client
                .verify(key, s.key_version, *alg, d, &s.signature)
                .await
                .expect("verified offline"),
            "{key} {alg:?}"
        );
    }
}
