//! The audit trail: written before the reply, tamper-evident, verifiable, queryable.

use keybroker_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::common::*;

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("audit log")
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &std::path::Path, ls: &[String]) {
    std::fs::write(path, format!("{}\n", ls.join("\n"))).expect("write");
}

fn json(l: &str) -> serde_json::Value {
    serde_json::from_str(l).expect("json")
}

#[tokio::test]
async fn audit_verify_passes_an_untouched_log_and_finds_each_tampering_where_it_happened() {
    crate::require_aes!();
    let env = Env::with(Options {
        audit_extra: "checkpoint_every = 5".into(),
        ..Default::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    for i in 0..20 {
        let w = wrap(&mut c, "t/k", &[i; 32], b"").await.expect("wrap");
        unwrap(&mut c, "", &w.wrapped_key, b"")
            .await
            .expect("unwrap");
    }
    let _ = wrap(&mut c, "t/missing", &[1; 32], b"").await; // a refusal, audited too
    drop(c);
    b.stop().await;

    let log = env.audit_log();
    let (ok, out) = env.verify_audit(&log);
    assert!(ok, "an untouched log verifies: {out}");
    assert!(out.contains("checkpoint MACs (HSM)"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&out[..out.find("\naudit log OK").expect("summary")]).expect("report");
    assert!(v["checkpoints"].as_u64().expect("n") >= 8, "{v}");
    assert_eq!(v["macs_verified"], v["checkpoints"], "{v}");
    assert_eq!(
        v["unchecked_tail"], 0,
        "a clean shutdown ends with a checkpoint: {v}"
    );
    let all = lines(&log);
    assert!(
        all.iter().any(|l| json(l)["outcome"] == "NOT_FOUND"),
        "refusals are audited"
    );
    // No line carries key material: not the DEK bytes we sent, in any common encoding.
    for l in &all {
        assert!(!l.contains(&hex::encode([5u8; 32])), "{l}");
    }

    // Pick a request line in the middle (not a checkpoint) to tamper with.
    let n = (10..all.len())
        .find(|&i| json(&all[i])["kind"] == "request" && json(&all[i + 1])["kind"] == "request")
        .expect("line");
    let ln = n + 1; // 1-based line number
    let tampered = env.dir.path().join("tampered.log");
    let check = |ls: Vec<String>, expect: &str, what: &str| {
        write_lines(&tampered, &ls);
        let (ok, out) = env.verify_audit(&tampered);
        assert!(!ok, "{what}: tampering not detected:\n{out}");
        assert!(
            out.contains(expect),
            "{what}: expected {expect:?} in:\n{out}"
        );
    };
    // 1. Edit a field.
    let mut ls = all.clone();
    ls[n] = ls[n].replacen("\"outcome\":\"OK\"", "\"outcome\":\"PERMISSION_DENIED\"", 1);
    assert_ne!(ls[n], all[n]);
    check(ls, &format!("line {} ", ln + 1), "edit");
    // 2. Delete a line.
    let mut ls = all.clone();
    ls.remove(n);
    check(ls, &format!("line {ln}: seq jumps"), "deletion");
    // 3. Insert a copy.
    let mut ls = all.clone();
    ls.insert(n + 1, all[n].clone());
    check(ls, &format!("line {}: seq", ln + 1), "insertion");
    // 4. Reorder two lines.
    let mut ls = all.clone();
    ls.swap(n, n + 1);
    check(ls, &format!("line {ln} "), "reordering");
    // 5. Truncate back past the last checkpoint.
    check(
        all[..n].to_vec(),
        "last checkpoint the broker recorded",
        "truncation",
    );
    // 6. Rewrite a line and recompute every hash after it: the chain is consistent again, but
    //    the next checkpoint's MAC (made in the HSM) no longer verifies.
    let mut ls = all.clone();
    ls[n] = ls[n].replacen("\"outcome\":\"OK\"", "\"outcome\":\"PERMISSION_DENIED\"", 1);
    for i in n + 1..ls.len() {
        let prev = hex::encode(Sha256::digest(ls[i - 1].as_bytes()));
        let mut r = json(&ls[i]);
        r["prev"] = prev.into();
        // Keep the field order of the original line: rebuild it by replacing the prev value.
        let old_prev = json(&all[i])["prev"].as_str().expect("prev").to_string();
        ls[i] = ls[i].replace(&old_prev, r["prev"].as_str().expect("prev"));
    }
    let cp = (n..ls.len())
        .find(|&i| json(&ls[i])["kind"] == "checkpoint")
        .expect("a later checkpoint");
    check(
        ls,
        &format!("line {}: checkpoint MAC does not verify", cp + 1),
        "recomputed chain",
    );

    // At start-up the broker finds its last recorded checkpoint (reading from the offset the
    // store recorded, not the whole log) and continues the chain...
    let b = env.start().await;
    let log_text = b.stop().await;
    assert!(!log_text.contains("AUDIT LOG TAMPERING"), "{log_text}");
    let (ok, out) = env.verify_audit(&log);
    assert!(ok, "the chain continues across a restart: {out}");
    // ...and refuses to start on a log cut back past that checkpoint while it was stopped
    // (issue 18, item 9)...
    write_lines(&log, &all[..n]);
    let refused = env
        .try_start()
        .await
        .err()
        .expect("a truncated audit log stops the broker");
    assert!(refused.contains("allow_truncated"), "{refused}");
    assert_eq!(lines(&log).len(), n, "the refused start wrote nothing");
    // ...unless the operator allows it explicitly; then the finding goes into the trail.
    std::fs::write(
        &env.config,
        std::fs::read_to_string(&env.config)
            .expect("config")
            .replace("[audit]\n", "[audit]\nallow_truncated = true\n"),
    )
    .expect("config");
    let b = env.start().await;
    let log_text = b.stop().await;
    assert!(log_text.contains("AUDIT LOG TAMPERING"), "{log_text}");
    assert!(
        lines(&log)
            .iter()
            .any(|l| json(l)["event"] == "AuditLogTampered" || l.contains("AuditLogTampered")),
        "the finding is in the trail itself"
    );
}

#[tokio::test]
async fn an_unwritable_audit_log_makes_requests_fail_rather_than_go_unrecorded() {
    crate::require_aes!();
    // The kernel refuses writes past RLIMIT_FSIZE with EFBIG: the audit volume is "full".
    let env = Env::with(Options {
        wrapper: vec!["prlimit".into(), "--fsize=262144".into(), "--".into()],
        ..Default::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let mut served = 0u64;
    let failure = loop {
        match c
            .mgmt
            .get_key(pb::GetKeyRequest { key: "t/k".into() })
            .await
        {
            Ok(_) => served += 1,
            Err(e) => break e,
        }
        assert!(served < 5000, "the audit log never filled up");
    };
    assert_eq!(failure.code(), Code::Unavailable, "{failure:?}");
    assert!(failure.message().contains("audit"), "{}", failure.message());
    // Issue 18, item 9: a key change the trail cannot record is not made (its intent is
    // written before it, so no record, no change).
    let e = c
        .mgmt
        .create_key(pb::CreateKeyRequest {
            key: "t/unrecorded".into(),
            key_type: pb::KeyType::Aes256.into(),
            ..Default::default()
        })
        .await
        .expect_err("a key change while the log is full");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    {
        let db = rusqlite::Connection::open(env.dir.path().join("keybroker.db")).expect("db");
        let n: i64 = db
            .query_row(
                "SELECT COUNT(*) FROM keys WHERE tenant = 't' AND name = 'unrecorded'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(
            n, 0,
            "the key was created although no audit record could be written"
        );
    }
    // Every kind of request is refused now, including unwraps: nothing is served unaudited.
    let e = wrap(&mut c, "t/k", &[1; 32], b"")
        .await
        .expect_err("wrap while the log is full");
    assert_eq!(e.code(), Code::Unavailable);
    drop(c);
    b.stop().await;
    // The broker survived (no SIGXFSZ death), and every answered request is in the log.
    let recorded = lines(&env.audit_log())
        .iter()
        .filter(|l| {
            let r = json(l);
            r["op"] == "GetKey" && r["outcome"] == "OK"
        })
        .count() as u64;
    assert_eq!(
        recorded, served,
        "every GetKey that was answered is in the log, and no more"
    );
    let (ok, out) = env.verify_audit(&env.audit_log());
    assert!(ok, "the log is still intact: {out}");
}

#[tokio::test]
async fn auditors_query_the_trail_with_filters() {
    crate::require_aes!();
    let policy = format!(
        r#"
[[binding]]
identity = "{app}"
role = "crypto-user"
scope = "all"
[[binding]]
identity = "spiffe://keybroker.test/auditor"
role = "auditor"
scope = "all"
[[binding]]
identity = "spiffe://keybroker.test/acme-auditor"
role = "auditor"
scope = "tenant:acme"
"#,
        app = hsm_fixtures::pki::TEST_CLIENT_ID
    );
    let env = Env::with(Options {
        policy: Some(policy),
        ..Default::default()
    });
    let auditor = env
        .pki
        .ca
        .issue_spiffe_client("auditor", "spiffe://keybroker.test/auditor")
        .expect("cert");
    let acme_auditor = env
        .pki
        .ca
        .issue_spiffe_client("acme-auditor", "spiffe://keybroker.test/acme-auditor")
        .expect("cert");
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "acme/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    create(
        &mut c,
        "other/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    for _ in 0..3 {
        wrap(&mut c, "acme/k", &[1; 32], b"").await.expect("wrap");
        wrap(&mut c, "other/k", &[1; 32], b"").await.expect("wrap");
    }
    let _ = wrap(&mut c, "acme/missing", &[1; 32], b"").await;
    let mut a = b.clients_as(&auditor).await;
    let q = |key: &str, caller: &str, outcome: &str, page_size: u32, token: String| {
        pb::QueryAuditRequest {
            key: key.into(),
            caller: caller.into(),
            outcome: outcome.into(),
            page_size,
            page_token: token,
            ..Default::default()
        }
    };
    let r = a
        .audit
        .query_audit(q("acme/k", "", "", 0, String::new()))
        .await
        .expect("query")
        .into_inner();
    // The create's intent (written before the key was made), the create, 3 wraps.
    assert_eq!(r.records.len(), 5, "create + 3 wraps: {:?}", r.records);
    assert!(r.records.iter().all(|l| json(l)["key"] == "acme/k"));
    assert_eq!(
        r.records
            .iter()
            .map(|l| json(l))
            .filter(|r| r["outcome"] == "INTENT")
            .map(|r| r["op"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>(),
        ["CreateKey"]
    );
    let r = a
        .audit
        .query_audit(q("", "", "NOT_FOUND", 0, String::new()))
        .await
        .expect("query")
        .into_inner();
    assert_eq!(r.records.len(), 1);
    assert_eq!(json(&r.records[0])["key"], "acme/missing");
    let r = a
        .audit
        .query_audit(q(
            "",
            hsm_fixtures::pki::TEST_CLIENT_ID,
            "",
            0,
            String::new(),
        ))
        .await
        .expect("query")
        .into_inner();
    // Nine requests, and the intents of the two key changes among them.
    assert_eq!(r.records.len(), 11);
    assert_eq!(
        r.records
            .iter()
            .filter(|l| json(l)["outcome"] == "INTENT")
            .count(),
        2
    );
    // Paging.
    let p1 = a
        .audit
        .query_audit(q(
            "",
            hsm_fixtures::pki::TEST_CLIENT_ID,
            "",
            5,
            String::new(),
        ))
        .await
        .expect("page")
        .into_inner();
    assert_eq!(p1.records.len(), 5);
    assert!(!p1.next_page_token.is_empty());
    let p2 = a
        .audit
        .query_audit(q(
            "",
            hsm_fixtures::pki::TEST_CLIENT_ID,
            "",
            5,
            p1.next_page_token,
        ))
        .await
        .expect("page")
        .into_inner();
    assert_eq!(p2.records.len(), 5);
    let p3 = a
        .audit
        .query_audit(q(
            "",
            hsm_fixtures::pki::TEST_CLIENT_ID,
            "",
            5,
            p2.next_page_token,
        ))
        .await
        .expect("page")
        .into_inner();
    assert_eq!(p3.records.len(), 1);
    assert!(p3.next_page_token.is_empty());
    // A tenant-scoped auditor sees only its tenant's records.
    let mut t = b.clients_as(&acme_auditor).await;
    let r = t
        .audit
        .query_audit(q("", "", "", 1000, String::new()))
        .await
        .expect("query")
        .into_inner();
    assert!(!r.records.is_empty());
    assert!(
        r.records.iter().all(|l| json(l)["tenant"] == "acme"),
        "{:?}",
        r.records
    );
    // Auditors cannot use keys; key users cannot read the trail.
    assert_eq!(
        wrap(&mut a, "acme/k", &[1; 32], b"")
            .await
            .expect_err("auditor wrap")
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        c.audit
            .query_audit(q("", "", "", 0, String::new()))
            .await
            .expect_err("user query")
            .code(),
        Code::PermissionDenied
    );
    drop((a, c, t));
    b.stop().await;
}

/// Issue 18 item 5: batch items wrote the caller's key strings into the audit log as sent, so
/// any role holder could grow the log by about a megabyte per request (and fail-closed audit
/// turns a full volume into an outage). Only valid names are recorded as written; an invalid
/// one by its length and a hash.
#[tokio::test]
async fn invalid_key_names_in_a_batch_cannot_fill_the_audit_log() {
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let before = std::fs::metadata(env.audit_log()).expect("log").len();
    let long = format!("t/{}", "x".repeat(1500));
    let items: Vec<pb::WrapKeyRequest> = (0..600)
        .map(|i| pb::WrapKeyRequest {
            key: format!("{long}{i}"),
            plaintext: vec![1; 32],
            ..Default::default()
        })
        .collect();
    let r = c
        .broker
        .batch_wrap_key(pb::BatchWrapKeyRequest {
            items,
            context: None,
        })
        .await
        .expect("batch answered")
        .into_inner();
    assert_eq!(r.results.len(), 600);
    assert!(r.results.iter().all(|x| matches!(
        &x.result,
        Some(pb::wrap_key_result::Result::Error(e)) if e.code == Code::InvalidArgument as i32
    )));
    let grown = std::fs::metadata(env.audit_log()).expect("log").len() - before;
    // 600 item records and the request's: 900 KB of names alone before the fix.
    assert!(
        grown < 300_000,
        "the audit log grew by {grown} bytes for 900 KB of invalid names"
    );
    let recs: Vec<serde_json::Value> = lines(&env.audit_log())
        .iter()
        .map(|l| json(l))
        .filter(|r| r["op"] == "BatchWrapKey" && r["key"].is_string())
        .collect();
    assert_eq!(recs.len(), 600);
    let k = recs[0]["key"].as_str().unwrap_or_default();
    assert!(k.starts_with("invalid:1503:"), "{k}");
    b.stop().await;
}

/// Issue 18 item 5: every refused request was audited, one record each, as fast as a caller
/// could send them. Past its budget of refusals a caller is held off (RESOURCE_EXHAUSTED,
/// nothing runs), counted in one record; other callers are unaffected; it is let back once the
/// budget refills.
#[tokio::test]
async fn a_caller_that_keeps_being_refused_is_held_off_and_counted_not_audited_one_by_one() {
    crate::require_aes!();
    let env = Env::with(Options {
        server_extra: "refused_per_second = 5\nrefused_burst = 20".into(),
        ..Default::default()
    });
    let b = env.start().await;
    let mut app = b.clients_as(&env.pki.client).await;
    let mut stranger = b.clients_as(&env.pki.stranger).await;
    create(
        &mut app,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let before = lines(&env.audit_log()).len();
    let mut codes = std::collections::BTreeMap::new();
    for _ in 0..200 {
        let e = wrap(&mut stranger, "t/k", &[1; 32], b"")
            .await
            .expect_err("a stranger");
        *codes.entry(format!("{:?}", e.code())).or_insert(0u32) += 1;
    }
    let denied = codes.get("PermissionDenied").copied().unwrap_or(0);
    let held = codes.get("ResourceExhausted").copied().unwrap_or(0);
    assert_eq!(denied + held, 200, "{codes:?}");
    // The burst of 20 and what refilled at 5/s while the loop ran; most were held off.
    assert!(denied >= 20 && held >= 50, "{codes:?}");
    // Meanwhile the allowed client is served.
    wrap(&mut app, "t/k", &[2; 32], b"").await.expect("app");
    let recs: Vec<serde_json::Value> = lines(&env.audit_log())[before..]
        .iter()
        .map(|l| json(l))
        .collect();
    let stranger_recs = recs
        .iter()
        .filter(|r| r["caller"] == hsm_fixtures::pki::TEST_STRANGER_ID && r["op"] == "WrapKey")
        .count();
    assert_eq!(
        stranger_recs as u32, denied,
        "one record per request that ran"
    );
    // Let back after the budget refills: the count of held-off requests is in the trail.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let e = wrap(&mut stranger, "t/k", &[1; 32], b"")
        .await
        .expect_err("still a stranger");
    assert_eq!(e.code(), Code::PermissionDenied, "let back: {e:?}");
    let reported: u64 = lines(&env.audit_log())
        .iter()
        .map(|l| json(l))
        .filter(|r| r["op"] == "RefusedRequestsSuppressed")
        .map(|r| {
            assert_eq!(r["caller"], hsm_fixtures::pki::TEST_STRANGER_ID);
            let m = r["message"].as_str().unwrap_or_default();
            m.split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(reported, u64::from(held), "every held-off request counted");
    let (ok, out) = env.verify_audit(&env.audit_log());
    assert!(ok, "{out}");
    b.stop().await;
}

/// The end of the last checkpoint line: the log itself is synced there (and at close), so a
/// power failure can take from it everything after that point and nothing before.
fn durable_prefix(log: &[u8]) -> usize {
    let mut end = 0;
    let mut at = 0;
    for l in log.split_inclusive(|b| *b == b'\n') {
        at += l.len();
        if serde_json::from_slice::<serde_json::Value>(l).is_ok_and(|r| r["kind"] == "checkpoint") {
            end = at;
        }
    }
    end
}

#[tokio::test]
async fn a_power_failure_that_takes_the_logs_tail_loses_no_answered_request() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    drop(c);
    b.stop().await;
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let answered = 30;
    for i in 0..answered {
        wrap(&mut c, "t/k", &[i as u8; 32], b"")
            .await
            .expect("wrap");
    }
    drop(c);
    b.kill9().await;
    // The power went with the broker: what the log had after its last sync was still in the
    // page cache and is lost (what is cut here); the journal was synced before each reply.
    let log = env.audit_log();
    let before = std::fs::read(&log).expect("log");
    let keep = durable_prefix(&before);
    assert!(
        keep > 0 && keep < before.len(),
        "{keep} of {}",
        before.len()
    );
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .expect("log");
    f.set_len(keep as u64).expect("cut");
    drop(f);
    // Before the restart, `audit verify` says what the journal holds that the file lacks.
    let (_, out) = env.verify_audit(&log);
    assert!(out.contains("puts them back at its next start"), "{out}");
    let b = env.start().await;
    b.stop().await;
    let after = lines(&log);
    let wraps = after
        .iter()
        .map(|l| json(l))
        .filter(|r| r["op"] == "WrapKey" && r["outcome"] == "OK")
        .count();
    assert_eq!(wraps, answered, "every answered wrap is in the trail");
    assert!(
        after
            .iter()
            .any(|l| l.contains("AuditLogRecovered") && l.contains("restored")),
        "the restoration is in the trail itself"
    );
    let (ok, out) = env.verify_audit(&log);
    assert!(ok, "{out}");
}
