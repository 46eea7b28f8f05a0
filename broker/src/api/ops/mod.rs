//! The operations a request can ask for, one type each, whatever front door it came through.
//!
//! A front door decodes its wire format into one of these types and hands it to
//! [`Pipeline::execute`](super::Pipeline::execute); the operation's `run` is the pipeline's
//! "the operation" step. [`Operation`] is sealed: only this module defines operations, so a
//! front door cannot reach the keys except through the pipeline's steps.
//!
//! * [`data`] — wrap, generate, unwrap, rewrap (each as a batch or a single call: one code
//!   path, a single call is a batch of one) and public keys;
//! * [`manage`] — the key lifecycle: create, import, read, list, update, rotate, trim, delete,
//!   recover, purge, backup, restore;
//! * [`audit`] — reading the audit trail;
//! * [`payload`] — encrypt and decrypt small payloads (batch or single, one code path);
//! * [`hyok`] — the HYOK kill switch;
//! * [`random`] — random bytes from the HSM;
//! * [`sign`] — sign digests and verify signatures with signing keys;
//! * [`kms`] — the Kubernetes KMS v2 plugin's encrypt and decrypt of its one key;
//! * [`xks`] — the AWS XKS proxy API's key metadata, encrypt, decrypt and health;
//! * [`ekm`] — the Azure Managed HSM EKM proxy API's proxy info, key metadata, wrap and unwrap.

/// An item operation (data, signatures) as a single call: a batch of one, audited as the request itself.
macro_rules! single {
    ($(#[$doc:meta])* $name:ident($input:ty) -> $output:ty = $run:ident) => {
        $(#[$doc])*
        pub struct $name(pub $input);

        impl Sealed for $name {}
        impl Operation for $name {
            type Output = $output;

            async fn run(self, call: &mut Call) -> Result<$output, BrokerError> {
                one($run(call, Items::One, vec![self.0]).await)
            }
        }
    };
}

/// An item operation as a batch: 1 to [`crate::keys::MAX_BATCH`] items, each with its own
/// result and audit record.
macro_rules! batch {
    ($(#[$doc:meta])* $name:ident($input:ty) -> $output:ty = $run:ident) => {
        $(#[$doc])*
        pub struct $name(pub Vec<$input>);

        impl Sealed for $name {}
        impl Operation for $name {
            type Output = Vec<Result<$output, BrokerError>>;

            async fn run(self, call: &mut Call) -> Result<Self::Output, BrokerError> {
                check_batch_size(self.0.len())?;
                Ok($run(call, Items::Each, self.0).await)
            }
        }
    };
}

pub mod audit;
pub mod data;
pub mod ekm;
pub mod hyok;
pub mod kms;
pub mod manage;
pub mod payload;
pub mod random;
pub mod sign;
pub mod xks;

use std::future::Future;

use super::call::Call;
use crate::{
    error::{BrokerError, Invalid},
    model::KeyName,
    policy::Permission,
};

mod sealed {
    /// Implemented only by this module's operations.
    pub trait Sealed {}
}

/// One operation: what the pipeline runs once identity, deadline and context are settled.
pub trait Operation: sealed::Sealed + Send {
    /// What it produces for the front door to encode.
    type Output: Send;

    /// Runs it. Every key it touches is authorised through `call` first.
    fn run(self, call: &mut Call)
    -> impl Future<Output = Result<Self::Output, BrokerError>> + Send;
}

/// Parses a key name from a request (the message says which field).
pub(crate) fn key_name(s: &str) -> Result<KeyName, BrokerError> {
    KeyName::parse(s).map_err(|e| {
        Invalid::Field {
            field: "key",
            error: Box::new(e),
        }
        .into()
    })
}

/// An optional key name (empty: none).
pub(crate) fn optional_key(s: &str) -> Result<Option<KeyName>, BrokerError> {
    if s.is_empty() {
        Ok(None)
    } else {
        key_name(s).map(Some)
    }
}

/// How an operation's items are audited: a single call's one item in the request's own record;
/// a batch's items each in a record of its own (the request's record says the batch ran).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Items {
    /// One item, the request itself.
    One,
    /// A batch.
    Each,
}

impl Items {
    /// Authorises `perm` on an item's key.
    fn authorize(
        self,
        call: &mut Call,
        perm: Permission,
        key: &KeyName,
    ) -> Result<crate::policy::Grant, BrokerError> {
        match self {
            Items::One => call.authorize(perm, key),
            Items::Each => call.authorize_item(perm, key),
        }
    }
}

/// Each item's result, filled in as the item fails a check or comes back from the keyring.
pub(crate) struct Slots<T>(Vec<Option<Result<T, BrokerError>>>);

impl<T> Slots<T> {
    pub(crate) fn new(n: usize) -> Self {
        Self((0..n).map(|_| None).collect())
    }

    /// Runs `check` on each `(index, item)`: an item that passes goes on, with its index; one
    /// that fails has its result here.
    pub(crate) fn sift<I, R>(
        &mut self,
        items: impl IntoIterator<Item = (usize, I)>,
        mut check: impl FnMut(I) -> Result<R, BrokerError>,
    ) -> (Vec<usize>, Vec<R>) {
        let (mut indices, mut passed) = (Vec::new(), Vec::new());
        for (i, item) in items {
            match check(item) {
                Ok(r) => {
                    indices.push(i);
                    passed.push(r);
                }
                Err(e) => self.0[i] = Some(Err(e)),
            }
        }
        (indices, passed)
    }

    /// The keyring's results for the items at `indices`, in order.
    pub(crate) fn fill(&mut self, indices: Vec<usize>, results: Vec<Result<T, BrokerError>>) {
        for (i, r) in indices.into_iter().zip(results) {
            self.0[i] = Some(r);
        }
    }

    pub(crate) fn finish(self) -> Vec<Result<T, BrokerError>> {
        self.0
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(BrokerError::internal("item without a result"))))
            .collect()
    }
}

/// The platform's first use of a tenant's default key creates it ([`Call::platform_keys`]):
/// before the keyring wraps or encrypts the granted items, each platform-managed key they name
/// that does not exist yet is made; the items of one that could not be made fail with why.
///
/// A key is made only for a first use it would serve (`serves`: the keyring's checks of the
/// input against the key to be made — lengths, AAD, the operation): a refused request changes
/// nothing. An item the key would refuse fails with that refusal; if another item makes the
/// key, the keyring refuses it as it would anyway.
pub(super) async fn platform_keys_first<T, R>(
    call: &Call,
    slots: &mut Slots<T>,
    indices: Vec<usize>,
    ready: Vec<R>,
    grant: impl Fn(&R) -> &crate::policy::Grant,
    serves: impl Fn(&R, &crate::policy::PlatformKey) -> Result<(), BrokerError>,
) -> (Vec<usize>, Vec<R>) {
    let mut wanted = std::collections::HashSet::new();
    let mut refused = std::collections::HashMap::new();
    for (at, r) in ready.iter().enumerate() {
        if let Some(pk) = call.platform_key_to_make(grant(r)) {
            match serves(r, &pk) {
                Ok(()) => {
                    wanted.insert(grant(r).key().clone());
                }
                Err(e) => {
                    refused.insert(at, e);
                }
            }
        }
    }
    let failed = if wanted.is_empty() {
        std::collections::HashMap::new()
    } else {
        let grants: Vec<&crate::policy::Grant> = ready
            .iter()
            .map(&grant)
            .filter(|g| wanted.contains(g.key()))
            .collect();
        call.platform_keys(grants).await
    };
    if failed.is_empty() && refused.is_empty() {
        return (indices, ready);
    }
    slots.sift(
        indices.into_iter().zip(ready.into_iter().enumerate()),
        |(at, r)| {
            let key = grant(&r).key();
            if let Some(e) = failed.get(key) {
                return Err(e.clone());
            }
            match refused.remove(&at) {
                Some(e) if !wanted.contains(key) => Err(e),
                _ => Ok(r),
            }
        },
    )
}

/// Refuses an empty batch or one larger than [`crate::keys::MAX_BATCH`].
pub(super) fn check_batch_size(n: usize) -> Result<(), BrokerError> {
    if n == 0 || n > crate::keys::MAX_BATCH {
        return Err(Invalid::BatchSize {
            max: crate::keys::MAX_BATCH,
            got: n,
        }
        .into());
    }
    Ok(())
}

/// Audits each item (a batch) or notes the one item's version (a single call).
pub(super) fn audit_items<T>(
    call: &mut Call,
    items: Items,
    names: Vec<String>,
    results: &[Result<T, BrokerError>],
    version: impl Fn(&T) -> u32,
) {
    match items {
        Items::One => {
            if let Some(Ok(r)) = results.first() {
                call.note_version(version(r));
            }
        }
        Items::Each => {
            for (name, r) in names.into_iter().zip(results) {
                call.item(Some(name), r.as_ref().map(&version));
            }
        }
    }
}

/// The one result of a batch of one.
pub(crate) fn one<T>(mut results: Vec<Result<T, BrokerError>>) -> Result<T, BrokerError> {
    results
        .pop()
        .unwrap_or_else(|| Err(BrokerError::internal("a single call without a result")))
}
