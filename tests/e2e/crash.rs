//! Crash safety and shutdown: `kill -9` in the middle of concurrent creates, rotations and
//! wraps loses nothing that was acknowledged (the restarted broker has every acknowledged key
//! and version and unwraps every acknowledged envelope), and SIGTERM drains: requests in flight
//! complete, new ones are refused, the HSM is closed, the exit status is 0.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use hsm_fixtures::fault::Rule;
use keybroker::client::{ClientSettings, Clients};
use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::common::*;

/// An acknowledged envelope: (key, envelope, DEK, AAD).
type Acked = (String, Vec<u8>, Vec<u8>, Vec<u8>);

/// Everything the broker acknowledged.
#[derive(Default)]
struct Ledger {
    /// Keys whose CreateKey was answered OK.
    created: Mutex<Vec<String>>,
    /// Per key, the highest version a RotateKey answer reported.
    rotated: Mutex<HashMap<String, u32>>,
    /// (key, envelope, DEK, AAD) of every wrap and generated data key answered OK.
    envelopes: Mutex<Vec<Acked>>,
    acks: AtomicUsize,
}

impl Ledger {
    fn keys(&self) -> Vec<String> {
        let mut k = vec!["t/gcm".to_string(), "t/kwp".into(), "t/rsa".into()];
        k.extend(self.created.lock().expect("lock").iter().cloned());
        k
    }
}

fn rnd(n: usize) -> usize {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("random");
    (u64::from_le_bytes(b) % n as u64) as usize
}

/// One client's load until the broker dies (or `stop`): creates, rotations, wraps and data
/// keys, each recorded once acknowledged.
async fn load(mut c: Clients, worker: usize, ledger: Arc<Ledger>, stop: Arc<AtomicBool>) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let keys = ledger.keys();
        let key = keys[rnd(keys.len())].clone();
        let outcome = match rnd(10) {
            0 => {
                let name = format!("t/w{worker}-{n}-{}", &hex_id()[..6]);
                let alg = if rnd(3) == 0 {
                    pb::Algorithm::AesKeyWrapPad
                } else {
                    pb::Algorithm::Aes256Gcm
                };
                let mut r = tonic::Request::new(pb::CreateKeyRequest {
                    key: name.clone(),
                    key_type: pb::KeyType::Aes256.into(),
                    algorithm: alg.into(),
                    ..Default::default()
                });
                r.set_timeout(Duration::from_secs(20));
                c.mgmt.create_key(r).await.map(|_| {
                    ledger.created.lock().expect("lock").push(name);
                })
            }
            1 => {
                let mut r = tonic::Request::new(pb::RotateKeyRequest { key: key.clone() });
                r.set_timeout(Duration::from_secs(20));
                c.mgmt.rotate_key(r).await.map(|k| {
                    let v = k.into_inner().current_version;
                    let mut m = ledger.rotated.lock().expect("lock");
                    let e = m.entry(key.clone()).or_default();
                    *e = (*e).max(v);
                })
            }
            2 | 3 => {
                let mut r = tonic::Request::new(pb::GenerateDataKeyRequest {
                    key: key.clone(),
                    ..Default::default()
                });
                r.set_timeout(Duration::from_secs(20));
                c.broker.generate_data_key(r).await.map(|g| {
                    let g = g.into_inner();
                    ledger.envelopes.lock().expect("lock").push((
                        key.clone(),
                        g.wrapped_key,
                        g.plaintext,
                        Vec::new(),
                    ));
                })
            }
            _ => {
                let dek = random_dek(32);
                // AAD only where the algorithm binds it (GCM keys are named t/gcm or were
                // created as GCM; an AAD on a KWP/RSA key is refused, which is fine too).
                let aad = if key == "t/gcm" {
                    random_dek(8)
                } else {
                    Vec::new()
                };
                let mut r = tonic::Request::new(pb::WrapKeyRequest {
                    key: key.clone(),
                    plaintext: dek.clone(),
                    aad: aad.clone(),
                    ..Default::default()
                });
                r.set_timeout(Duration::from_secs(20));
                c.broker.wrap_key(r).await.map(|w| {
                    ledger.envelopes.lock().expect("lock").push((
                        key.clone(),
                        w.into_inner().wrapped_key,
                        dek,
                        aad,
                    ));
                })
            }
        };
        match outcome {
            Ok(()) => {
                ledger.acks.fetch_add(1, Ordering::Relaxed);
            }
            // The broker is gone (killed): this client is done.
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ) =>
            {
                return;
            }
            Err(s) => panic!("worker {worker}: unexpected answer {s:?}"),
        }
    }
}

#[tokio::test]
async fn kill_9_during_concurrent_creates_rotations_and_wraps_loses_nothing_acknowledged() {
    crate::require_aes!();
    let env = Env::new();
    let ledger = Arc::new(Ledger::default());
    {
        let b = env.start().await;
        let mut c = b.clients_as(&env.pki.client).await;
        create(
            &mut c,
            "t/gcm",
            pb::KeyType::Aes256,
            pb::Algorithm::Aes256Gcm,
        )
        .await;
        create(
            &mut c,
            "t/kwp",
            pb::KeyType::Aes256,
            pb::Algorithm::AesKeyWrapPad,
        )
        .await;
        create(
            &mut c,
            "t/rsa",
            pb::KeyType::Rsa2048,
            pb::Algorithm::Unspecified,
        )
        .await;
        b.stop().await;
    }
    let mut kills = 0;
    for cycle in 0..4 {
        let b = env.start().await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for w in 0..8 {
            let c = b.clients_as(&env.pki.client).await;
            workers.push(tokio::spawn(load(c, w, ledger.clone(), stop.clone())));
        }
        // Kill at a different moment each cycle: after 15..75 more acknowledgements.
        let target = ledger.acks.load(Ordering::Relaxed) + 15 + rnd(60);
        poll_until("the load gets going", Duration::from_secs(120), || {
            let n = ledger.acks.load(Ordering::Relaxed);
            async move { (n >= target).then_some(()) }
        })
        .await;
        let log = b.kill9().await;
        kills += 1;
        assert!(!log.contains("panicked"), "cycle {cycle}: {log}");
        for w in workers {
            w.await.expect("worker");
        }
    }
    assert_eq!(kills, 4);

    // The restarted broker has everything it ever acknowledged.
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let created = ledger.created.lock().expect("lock").clone();
    for k in &created {
        c.mgmt
            .get_key(pb::GetKeyRequest { key: k.clone() })
            .await
            .unwrap_or_else(|e| panic!("acknowledged key {k} lost: {e:?}"));
    }
    let rotated = ledger.rotated.lock().expect("lock").clone();
    for (k, v) in &rotated {
        let key = c
            .mgmt
            .get_key(pb::GetKeyRequest { key: k.clone() })
            .await
            .expect("get")
            .into_inner();
        assert!(
            key.current_version >= *v,
            "acknowledged version {v} of {k} lost (now {})",
            key.current_version
        );
    }
    let envelopes = ledger.envelopes.lock().expect("lock").clone();
    for (key, env_bytes, dek, aad) in &envelopes {
        let u = unwrap(&mut c, key, env_bytes, aad)
            .await
            .unwrap_or_else(|e| panic!("acknowledged envelope under {key} lost: {e:?}"));
        assert_eq!(&u.plaintext, dek, "{key}");
    }
    eprintln!(
        "kill -9 x{kills}: {} keys created, {} keys rotated, {} envelopes: all there",
        created.len(),
        rotated.len(),
        envelopes.len()
    );
    assert!(!envelopes.is_empty() && !created.is_empty());
    drop(c);
    b.stop().await;
    // The audit trail survived the kills too (a torn last line is recovered, not tampering).
    let (ok, out) = env.verify_audit(&env.audit_log());
    assert!(ok, "{out}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_refuses_new_ones_and_closes_the_hsm() {
    crate::require_aes!();
    let env = Env::with(Options {
        faults: true,
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
    let f = env.faults();
    f.set(&[
        Rule::trace("C_Finalize,C_CloseSession"),
        Rule::delay("C_EncryptInit", 1500),
    ])
    .expect("rules");
    // Three wraps are inside the HSM (each takes 1.5 s) when SIGTERM arrives.
    let mut in_flight = Vec::new();
    for _ in 0..3 {
        let mut c = b.clients_as(&env.pki.client).await;
        in_flight.push(tokio::spawn(async move {
            let dek = random_dek(32);
            let mut r = tonic::Request::new(pb::WrapKeyRequest {
                key: "t/k".into(),
                plaintext: dek.clone(),
                ..Default::default()
            });
            r.set_timeout(Duration::from_secs(30));
            c.broker
                .wrap_key(r)
                .await
                .map(|w| (w.into_inner().wrapped_key, dek))
        }));
    }
    poll_until("three wraps in the HSM", Duration::from_secs(10), || {
        let n = f.count("delay", Some("C_EncryptInit"));
        async move { (n == 3).then_some(()) }
    })
    .await;
    b.sigterm();
    poll_until(
        "the broker starts draining",
        Duration::from_secs(10),
        || {
            let log = b.log();
            async move { log.contains("SIGTERM: draining").then_some(()) }
        },
    )
    .await;
    // New connections are refused...
    let refused = keybroker::client::clients(&ClientSettings {
        endpoint: b.endpoint(),
        ca: env.pki.ca.cert_path.clone(),
        cert: env.pki.client.cert_path.clone(),
        key: env.pki.client.key_path.clone(),
    })
    .await;
    assert!(refused.is_err(), "a new connection during the drain");
    // ...and so are new requests on a connection that was open.
    match c
        .mgmt
        .get_key(pb::GetKeyRequest { key: "t/k".into() })
        .await
    {
        Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        Ok(_) => panic!("a new request during the drain was served"),
    }
    // The requests in flight complete successfully.
    let mut wrapped = Vec::new();
    for t in in_flight {
        wrapped.push(t.await.expect("join").expect("in-flight wrap completes"));
    }
    let (status, log) = b.wait_status().await;
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("HSM closed: sessions closed"), "{log}");
    assert_eq!(f.count("trace", Some("C_Finalize")), 1, "{:?}", f.events());
    assert!(f.count("trace", Some("C_CloseSession")) >= 1);
    // What was acknowledged during the drain is real.
    f.clear().expect("rules");
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    for (env_bytes, dek) in &wrapped {
        assert_eq!(
            &unwrap(&mut c, "t/k", env_bytes, b"")
                .await
                .expect("unwrap after restart")
                .plaintext,
            dek
        );
    }
    b.stop().await;
}
