//! Payload encryption: encrypt and decrypt small payloads, each as a batch or a single call (one
//! code path: a single call is a batch of one), as the data plane does for DEKs (`data`).

use super::{
    Items, Operation, Slots, audit_items, check_batch_size, key_name, one, optional_key,
    platform_keys_first, sealed::Sealed,
};
use crate::{
    api::call::Call,
    error::{BrokerError, Invalid, Refused},
    keys::{
        DecryptInput, DecryptItem, Decrypted, EncryptItem, Encrypted, check_aad_for,
        check_payload_len,
    },
    model::{Dek, KeyOp, MAX_BATCH_PAYLOAD},
    policy::{Permission, PlatformKey},
};

/// A payload to encrypt under the newest version of `key`.
pub struct EncryptIn {
    /// The key (`tenant/name`).
    pub key: String,
    /// The payload.
    pub plaintext: Dek,
    /// The AAD to bind it to.
    pub aad: Vec<u8>,
}

/// An encrypted payload to decrypt.
pub struct DecryptIn {
    /// The key the caller expects (empty: whichever the envelope names).
    pub key: String,
    /// The envelope.
    pub ciphertext: Vec<u8>,
    /// The AAD it was bound to.
    pub aad: Vec<u8>,
}

/// `Encrypt`.
pub struct Encrypt(pub EncryptIn);
/// `BatchEncrypt`.
pub struct EncryptBatch(pub Vec<EncryptIn>);
/// `Decrypt`.
pub struct Decrypt(pub DecryptIn);
/// `BatchDecrypt`.
pub struct DecryptBatch(pub Vec<DecryptIn>);

/// Whether the platform key `pk`, once made, would encrypt `e`: the keyring's checks, in its
/// order.
fn encrypt_serves(e: &EncryptItem, pk: &PlatformKey) -> Result<(), BrokerError> {
    check_payload_len(e.plaintext.len())?;
    check_aad_for(e.grant.key(), pk.algorithm, &e.aad)?;
    if !pk.operations().contains(&KeyOp::Encrypt) {
        let (key, op) = (e.grant.key().clone(), KeyOp::Encrypt);
        return Err(Refused::NotAllowed { key, op }.into());
    }
    Ok(())
}

pub(crate) async fn encrypt(
    call: &mut Call,
    items: Items,
    input: Vec<EncryptIn>,
) -> Vec<Result<Encrypted, BrokerError>> {
    let mut slots = Slots::new(input.len());
    let names: Vec<String> = input.iter().map(|i| i.key.clone()).collect();
    let (indices, ready) = slots.sift(input.into_iter().enumerate(), |item| {
        let grant = items.authorize(call, Permission::Encrypt, &key_name(&item.key)?)?;
        Ok(EncryptItem {
            grant,
            plaintext: item.plaintext,
            aad: item.aad,
        })
    });
    let (indices, ready) = platform_keys_first(
        call,
        &mut slots,
        indices,
        ready,
        |e| &e.grant,
        encrypt_serves,
    )
    .await;
    slots.fill(indices, call.keys().encrypt(ready).await);
    let results = slots.finish();
    audit_items(call, items, names, &results, |e| e.version);
    results
}

pub(crate) async fn decrypt(
    call: &mut Call,
    items: Items,
    input: Vec<DecryptIn>,
) -> Vec<Result<Decrypted, BrokerError>> {
    let mut slots = Slots::new(input.len());
    let mut names: Vec<String> = input.iter().map(|i| i.key.clone()).collect();
    // The key the caller named is authorised first; the envelope then says which key it is of.
    let (indices, inputs) = slots.sift(input.into_iter().enumerate(), |item| {
        let expected = optional_key(&item.key)?;
        if let Some(k) = &expected {
            items.authorize(call, Permission::Decrypt, k)?;
        }
        Ok(DecryptInput {
            expected,
            envelope: item.ciphertext,
            aad: item.aad,
        })
    });
    let resolved = call.keys().resolve_payloads(inputs).await;
    let (granted, ready) = slots.sift(indices.into_iter().zip(resolved), |r| {
        let resolved = r?;
        let grant = items.authorize(call, Permission::Decrypt, resolved.key())?;
        Ok(DecryptItem { resolved, grant })
    });
    slots.fill(granted, call.keys().decrypt(ready).await);
    let results = slots.finish();
    // An item's record names the key it turned out to use.
    for (name, r) in names.iter_mut().zip(&results) {
        if let Ok(d) = r {
            *name = d.key.to_string();
        }
    }
    audit_items(call, items, names, &results, |d| d.version);
    results
}

impl Sealed for Encrypt {}
impl Operation for Encrypt {
    type Output = Encrypted;

    async fn run(self, call: &mut Call) -> Result<Encrypted, BrokerError> {
        one(encrypt(call, Items::One, vec![self.0]).await)
    }
}

impl Sealed for EncryptBatch {}
impl Operation for EncryptBatch {
    type Output = Vec<Result<Encrypted, BrokerError>>;

    async fn run(self, call: &mut Call) -> Result<Self::Output, BrokerError> {
        check_batch_size(self.0.len())?;
        let total: usize = self.0.iter().map(|i| i.plaintext.len()).sum();
        if total > MAX_BATCH_PAYLOAD {
            return Err(Invalid::BatchPayload(total).into());
        }
        Ok(encrypt(call, Items::Each, self.0).await)
    }
}

impl Sealed for Decrypt {}
impl Operation for Decrypt {
    type Output = Decrypted;

    async fn run(self, call: &mut Call) -> Result<Decrypted, BrokerError> {
        one(decrypt(call, Items::One, vec![self.0]).await)
    }
}

impl Sealed for DecryptBatch {}
impl Operation for DecryptBatch {
    type Output = Vec<Result<Decrypted, BrokerError>>;

    async fn run(self, call: &mut Call) -> Result<Self::Output, BrokerError> {
        check_batch_size(self.0.len())?;
        Ok(decrypt(call, Items::Each, self.0).await)
    }
}
