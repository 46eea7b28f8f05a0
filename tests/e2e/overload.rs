//! Overload: bounded queues in front of the session pool. A burst beyond what the HSM can take
//! is answered RESOURCE_EXHAUSTED at once (not left to time out), memory stays flat, and one
//! tenant's flood does not starve another tenant. The HSM's speed is pinned with the fault
//! module's added latency, so the overload does not depend on the machine.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use hsm_fixtures::fault::Rule;
use keybroker::client::Clients;
use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::common::*;

fn overload_env(hsm_extra: &str) -> Env {
    Env::with(Options {
        faults: true,
        sessions: Some(2),
        hsm_extra: hsm_extra.into(),
        ..Default::default()
    })
}

async fn wrap10(c: &mut Clients, key: &str) -> Result<pb::WrapKeyResponse, tonic::Status> {
    let mut r = tonic::Request::new(pb::WrapKeyRequest {
        key: key.into(),
        plaintext: vec![5; 32],
        ..Default::default()
    });
    r.set_timeout(Duration::from_secs(10));
    c.broker.wrap_key(r).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn a_burst_beyond_the_queues_gets_resource_exhausted_at_once_and_memory_stays_flat() {
    crate::require_aes!();
    let env = overload_env("queue_limit = 4\ntenant_queue_limit = 4\nsession_wait_ms = 5000");
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    // Four connections, as four client processes would have.
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(b.clients_as(&env.pki.client).await);
    }
    // Each HSM wrap takes 200 ms: two sessions serve at most ten wraps a second.
    env.faults()
        .set(&[Rule::delay("C_EncryptInit", 200)])
        .expect("rules");
    let mut rss = Vec::new();
    let (mut ok, mut exhausted) = (0, 0);
    for _round in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..300 {
            let mut c = conns[i % conns.len()].clone();
            tasks.push(tokio::spawn(async move { wrap10(&mut c, "t/k").await }));
        }
        for t in tasks {
            match t.await.expect("join") {
                Ok(_) => ok += 1,
                Err(s) => {
                    assert_eq!(
                        s.code(),
                        Code::ResourceExhausted,
                        "a refusal, not a timeout: {s:?}"
                    );
                    assert!(s.message().contains("waiting"), "says why: {s:?}");
                    exhausted += 1;
                }
            }
        }
        rss.push(b.rss_kib());
    }
    eprintln!("served {ok}, refused {exhausted}; broker RSS after each burst (KiB): {rss:?}");
    // Two in service and four queued at any moment: most of each burst is refused.
    assert!(ok >= 6, "served {ok}");
    assert!(exhausted >= 600, "refused {exhausted} of 900");
    // Flat: later bursts do not grow the process (the first warms up allocator and buffers).
    assert!(
        rss[2] <= rss[0] + 16 * 1024,
        "RSS after bursts (KiB): {rss:?}"
    );
    // And it serves normally afterwards.
    env.faults().clear().expect("rules");
    wrap(&mut c, "t/k", &[1; 32], b"").await.expect("served");
    let audit = std::fs::read_to_string(env.audit_log()).expect("audit");
    assert_eq!(
        audit
            .lines()
            .filter(|l| l.contains("\"WrapKey\"") && l.contains("RESOURCE_EXHAUSTED"))
            .count(),
        exhausted,
        "every refusal is audited"
    );
    b.stop().await;
}

#[tokio::test]
async fn one_tenant_cannot_starve_another() {
    crate::require_aes!();
    let env = overload_env("queue_limit = 64\ntenant_queue_limit = 4\nsession_wait_ms = 5000");
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    for key in ["noisy/k", "quiet/k"] {
        create(&mut c, key, pb::KeyType::Aes256, pb::Algorithm::Unspecified).await;
    }
    env.faults()
        .set(&[Rule::delay("C_EncryptInit", 100)])
        .expect("rules");
    // The noisy tenant floods from 24 concurrent callers until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let noisy_ok = Arc::new(AtomicUsize::new(0));
    let noisy_refused = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for _ in 0..24 {
        let mut c = b.clients_as(&env.pki.client).await;
        let (stop, ok, refused) = (stop.clone(), noisy_ok.clone(), noisy_refused.clone());
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match wrap10(&mut c, "noisy/k").await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(s) => {
                        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    poll_until(
        "the noisy tenant saturates the HSM",
        Duration::from_secs(30),
        || {
            let n = noisy_refused.load(Ordering::Relaxed);
            async move { (n >= 10).then_some(()) }
        },
    )
    .await;
    // Meanwhile the quiet tenant is served every time.
    for i in 0..10 {
        wrap10(&mut c, "quiet/k")
            .await
            .unwrap_or_else(|e| panic!("quiet tenant request {i} during the flood: {e:?}"));
    }
    stop.store(true, Ordering::Relaxed);
    for t in flood {
        t.await.expect("join");
    }
    assert!(noisy_ok.load(Ordering::Relaxed) > 0);
    b.stop().await;
}
