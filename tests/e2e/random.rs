//! GetRandomBytes: bytes from the HSM's RNG, bounded, audited without the bytes.

use keybroker_proto::v1 as pb;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn random_bytes_come_from_the_hsm_within_bounds_and_are_never_audited() {
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    let get = |c: &mut keybroker::client::Clients, count: u32| {
        let mut broker = c.broker.clone();
        async move {
            broker
                .get_random_bytes(pb::GetRandomBytesRequest {
                    count,
                    context: None,
                })
                .await
                .map(|r| r.into_inner().random)
        }
    };
    let a = get(&mut c, 32).await.expect("32 bytes");
    let b2 = get(&mut c, 32).await.expect("32 more");
    assert_eq!((a.len(), b2.len()), (32, 32));
    assert_ne!(a, b2, "two draws of 256 bits are equal");
    assert_ne!(a, vec![0u8; 32]);
    assert_eq!(get(&mut c, 4096).await.expect("the most").len(), 4096);
    for bad in [0, 4097, u32::MAX] {
        let e = get(&mut c, bad).await.expect_err("out of range");
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {e:?}");
        assert!(
            e.message().contains("count must be 1 to 4096"),
            "{}",
            e.message()
        );
    }
    // Audited, one record per request, and never with the bytes.
    let trail = std::fs::read_to_string(env.audit_log()).expect("log");
    assert_eq!(trail.matches("\"GetRandomBytes\"").count(), 6, "{trail}");
    // Each with the count asked for, refused or not.
    let counts: Vec<_> = env
        .audit_records()
        .into_iter()
        .filter(|r| r["op"] == "GetRandomBytes")
        .map(|r| {
            let outcome = r["outcome"].as_str().unwrap_or_default().to_string();
            (r["detail"]["count"].as_u64(), outcome)
        })
        .collect();
    let want = [(32, "OK"), (32, "OK"), (4096, "OK")]
        .into_iter()
        .chain([0, 4097, u32::MAX].map(|n| (n, "INVALID_ARGUMENT")))
        .map(|(n, o)| (Some(u64::from(n)), o.to_string()))
        .collect::<Vec<_>>();
    assert_eq!(counts, want);
    let hex: String = a.iter().map(|x| format!("{x:02x}")).collect();
    assert!(!trail.contains(&hex));
    assert!(!b.log().contains(&hex));
    b.stop().await;
}
