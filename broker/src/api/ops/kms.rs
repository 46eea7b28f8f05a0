//! The Kubernetes KMS v2 plugin's two key operations, on its one configured key.
//!
//! * `Encrypt` wraps the plaintext under the key's **newest version** (exactly `WrapKey`, with
//!   the fixed AAD [`KMS_AAD`] so these envelopes are bound to this use).
//! * `Decrypt` unwraps with whichever version the envelope names, and refuses — with the one
//!   unauthentic error — an envelope of another key or a `key_id` that is not the one its
//!   version produces ([`key_id`]).

use super::{Items, Operation, data, one, sealed::Sealed};
use crate::{
    api::call::Call,
    error::{BrokerError, Invalid},
    keys::{Ciphertext, Wrapped},
    model::{Dek, KeyName, VersionId},
};

/// The AAD every KMS v2 envelope is bound to.
pub const KMS_AAD: &[u8] = b"keybroker:k8s-kms-v2";

/// The `key_id` of a key version: `tenant/name:vN:<32 hex digits of the version id>`. The
/// version id is the version's random 16-byte id (its HSM object's `CKA_ID`), so the key id
/// changes on every rotation and is never reused, not even by a key deleted and created again
/// under the same name.
pub fn key_id(name: &KeyName, number: u32, id: VersionId) -> String {
    format!("{name}:v{number}:{}", id.hex())
}

/// `Encrypt`.
pub struct KmsEncrypt {
    /// The configured key.
    pub key: KeyName,
    /// kube-apiserver's DEK (or seed).
    pub plaintext: Dek,
}

/// `Decrypt`.
pub struct KmsDecrypt {
    /// The configured key.
    pub key: KeyName,
    /// The envelope `Encrypt` returned.
    pub ciphertext: Vec<u8>,
    /// The key id `Encrypt` returned with it.
    pub key_id: String,
}

impl Sealed for KmsEncrypt {}
impl Operation for KmsEncrypt {
    type Output = Wrapped;

    async fn run(self, call: &mut Call) -> Result<Wrapped, BrokerError> {
        let item = data::WrapIn {
            key: self.key.to_string(),
            plaintext: self.plaintext,
            aad: KMS_AAD.to_vec(),
        };
        one(data::wrap(call, Items::One, vec![item]).await)
    }
}

impl Sealed for KmsDecrypt {}
impl Operation for KmsDecrypt {
    type Output = Dek;

    async fn run(self, call: &mut Call) -> Result<Dek, BrokerError> {
        if self.ciphertext.is_empty() {
            return Err(Invalid::Empty("ciphertext").into());
        }
        // The envelope must belong to the configured key (named as the expected key).
        let item = data::UnwrapIn {
            key: self.key.to_string(),
            ciphertext: Ok(Ciphertext::Envelope(self.ciphertext)),
            aad: KMS_AAD.to_vec(),
        };
        let u = one(data::unwrap(call, Items::One, vec![item]).await)?;
        if key_id(&u.key, u.version, u.version_id) != self.key_id {
            // The DEK is dropped (and zeroized) unreturned.
            call.forget_version();
            return Err(BrokerError::Unauthentic);
        }
        Ok(u.dek)
    }
}
