//! Signatures: `Sign` a digest with the newest version of a signing key, `Verify` a signature
//! with a version of it — both inside the HSM, each audited with the key and version (never
//! the digest or the signature).

use super::{Operation, key_name, sealed::Sealed};
use crate::{
    api::call::Call,
    error::BrokerError,
    keys::{Signed, Verified},
    model::SignAlgorithm,
    policy::Permission,
};

/// `Sign`.
pub struct Sign {
    /// The key (`tenant/name`).
    pub key: String,
    /// The signature algorithm.
    pub algorithm: SignAlgorithm,
    /// The digest of the message.
    pub digest: Vec<u8>,
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

impl Sealed for Sign {}
impl Operation for Sign {
    type Output = Signed;

    async fn run(self, call: &mut Call) -> Result<Signed, BrokerError> {
        let grant = call.authorize(Permission::Sign, &key_name(&self.key)?)?;
        let signed = call
            .keys()
            .sign(&grant, self.algorithm, self.digest)
            .await?;
        call.note_version(signed.version);
        Ok(signed)
    }
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
