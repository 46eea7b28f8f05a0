//! Signatures: `Sign` a digest with the newest version of a signing key, `Verify` a signature
//! with a version of it — both inside the HSM, each audited with the key and version (never
//! the digest or the signature).

use super::{
    Items, Operation, Slots, audit_items, check_batch_size, key_name, one, sealed::Sealed,
};
use crate::{
    api::call::Call,
    error::BrokerError,
    keys::{SignItem, Signed, Verified},
    model::SignAlgorithm,
    policy::Permission,
};

/// A digest to sign with the newest version of `key`.
pub struct SignIn {
    /// The key (`tenant/name`).
    pub key: String,
    /// The signature algorithm, or why the front door could not read it.
    pub algorithm: Result<SignAlgorithm, BrokerError>,
    /// The digest of the message.
    pub digest: Vec<u8>,
}

single!(
    /// `Sign`.
    Sign(SignIn) -> Signed = sign
);
batch!(
    /// `BatchSign`: many digests in one call, each with its own result and audit record.
    SignBatch(SignIn) -> Signed = sign
);

pub(crate) async fn sign(
    call: &mut Call,
    items: Items,
    input: Vec<SignIn>,
) -> Vec<Result<Signed, BrokerError>> {
    let mut slots = Slots::new(input.len());
    let names: Vec<String> = input.iter().map(|i| i.key.clone()).collect();
    let (indices, ready) = slots.sift(input.into_iter().enumerate(), |item| {
        let algorithm = item.algorithm?;
        let grant = items.authorize(call, Permission::Sign, &key_name(&item.key)?)?;
        Ok(SignItem {
            grant,
            algorithm,
            digest: item.digest,
        })
    });
    slots.fill(indices, call.keys().sign(ready).await);
    let results = slots.finish();
    audit_items(call, items, names, &results, |s| s.version);
    results
}

/// `Verify`.
pub struct Verify {
    /// The key (`tenant/name`).
    pub key: String,
    /// The version (0: the newest).
    pub version: u32,
    /// The signature algorithm.
    pub algorithm: SignAlgorithm,
    /// The digest of the message.
    pub digest: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
}

impl Sealed for Verify {}
impl Operation for Verify {
    type Output = Verified;

    async fn run(self, call: &mut Call) -> Result<Verified, BrokerError> {
        let grant = call.authorize(Permission::Verify, &key_name(&self.key)?)?;
        let verified = call
            .keys()
            .verify(
                &grant,
                self.version,
                self.algorithm,
                self.digest,
                self.signature,
            )
            .await?;
        call.note_version(verified.version);
        Ok(verified)
    }
}
