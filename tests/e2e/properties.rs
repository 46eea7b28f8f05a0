//! Properties over random inputs, against one real broker: for every DEK and every AAD,
//! unwrap(wrap(d, aad), aad) == d; and any one-bit change to the envelope or the AAD fails with
//! the one unauthentic error.

use keybroker_proto::v1 as pb;
use proptest::prelude::*;

use crate::common::*;

#[test]
fn wrap_then_unwrap_is_the_identity_and_any_one_bit_change_fails() {
    crate::require_aes!();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let env = Env::new();
    let (b, c) = rt.block_on(async {
        let b = env.start().await;
        let mut c = b.clients_as(&env.pki.client).await;
        create(
            &mut c,
            "t/gcm",
            pb::KeyType::Aes256,
            pb::Algorithm::Unspecified,
        )
        .await;
        create(
            &mut c,
            "t/kwp",
            pb::KeyType::Aes256,
            pb::Algorithm::AesKeyWrapPad,
        )
        .await;
        (b, std::sync::Mutex::new(c))
    });
    let cfg = ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(cfg, |(
        len8 in 2usize..=8,
        seed in any::<[u8; 64]>(),
        aad in proptest::collection::vec(any::<u8>(), 0..64),
        gcm in any::<bool>(),
        flip in any::<prop::sample::Index>(),
        flip_aad in any::<bool>(),
    )| {
        let dek = seed[..len8 * 8].to_vec();
        let key = if gcm { "t/gcm" } else { "t/kwp" };
        let aad: Vec<u8> = if gcm { aad } else { Vec::new() };
        let mut guard = c.lock().expect("clients");
        let c = &mut *guard;
        rt.block_on(async {
            let w = wrap(c, key, &dek, &aad).await.expect("wrap").wrapped_key;
            let u = unwrap(c, "", &w, &aad).await.expect("unwrap");
            assert_eq!(u.plaintext, dek);
            if flip_aad && !aad.is_empty() {
                let mut a = aad.clone();
                let bit = flip.index(a.len() * 8);
                a[bit / 8] ^= 1 << (bit % 8);
                assert_unauthentic(unwrap(c, "", &w, &a).await, "AAD bit flipped");
            } else {
                let mut bad = w.clone();
                let bit = flip.index(bad.len() * 8);
                bad[bit / 8] ^= 1 << (bit % 8);
                assert_unauthentic(unwrap(c, "", &bad, &aad).await, "envelope bit flipped");
            }
        });
    });
    rt.block_on(async move {
        drop(c);
        b.stop().await;
    });
}
