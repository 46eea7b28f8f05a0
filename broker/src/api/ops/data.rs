//! The data plane: wrap, generate, unwrap and rewrap DEKs, and read public keys.
//!
//! Each operation exists as a batch and as a single call, and both run the same function over a
//! list of items (a single call is a list of one): parse the item's key, authorise it, hand the
//! granted items to the keyring in one go. Only the audit differs: a single call's item is the
//! request's own record; a batch's items get a record each.

use super::{
    Items, Operation, Slots, audit_items, check_batch_size, key_name, one, optional_key,
    platform_keys_first, sealed::Sealed,
};
use crate::{
    api::call::Call,
    error::{BrokerError, Invalid},
    keys::{
        Ciphertext, GenerateItem, PublicKeyInfo, RewrapItem, Rewrapped, UnwrapInput, UnwrapItem,
        Unwrapped, WrapItem, Wrapped, check_aad_for, public_key_formats,
    },
    model::{DEFAULT_DEK_LEN, Dek, KeyName, check_dek_len},
    policy::{Permission, PlatformKey},
};

/// A DEK to wrap under the newest version of `key`.
pub struct WrapIn {
    /// The key (`tenant/name`).
    pub key: String,
    /// The DEK.
    pub plaintext: Dek,
    /// The AAD to bind it to.
    pub aad: Vec<u8>,
}

/// A DEK to generate (from the HSM's RNG) and wrap under the newest version of `key`.
pub struct GenerateIn {
    /// The key.
    pub key: String,
    /// The length in bytes (0: 32).
    pub len: usize,
    /// The AAD to bind it to.
    pub aad: Vec<u8>,
}

/// A ciphertext to unwrap.
pub struct UnwrapIn {
    /// The key the caller expects (empty: whichever the envelope names; required for raw).
    pub key: String,
    /// The ciphertext, or why the front door could not read it.
    pub ciphertext: Result<Ciphertext, BrokerError>,
    /// The AAD it was bound to.
    pub aad: Vec<u8>,
}

/// An envelope to unwrap and wrap again.
pub struct RewrapIn {
    /// The key the caller expects the envelope to be of (empty: any).
    pub key: String,
    /// The envelope.
    pub envelope: Vec<u8>,
    /// Its AAD.
    pub aad: Vec<u8>,
    /// The key to wrap under (empty: the same key, its newest version).
    pub destination: String,
    /// The new envelope's AAD (`None`: the same).
    pub new_aad: Option<Vec<u8>>,
}

single!(
    /// `WrapKey`.
    Wrap(WrapIn) -> Wrapped = wrap
);
batch!(
    /// `BatchWrapKey`.
    WrapBatch(WrapIn) -> Wrapped = wrap
);
single!(
    /// `GenerateDataKey`.
    Generate(GenerateIn) -> (Dek, Wrapped) = generate
);
batch!(
    /// `BatchGenerateDataKey`.
    GenerateBatch(GenerateIn) -> (Dek, Wrapped) = generate
);
single!(
    /// `UnwrapKey`.
    Unwrap(UnwrapIn) -> Unwrapped = unwrap
);
batch!(
    /// `BatchUnwrapKey`.
    UnwrapBatch(UnwrapIn) -> Unwrapped = unwrap
);
single!(
    /// `Rewrap`.
    Rewrap(RewrapIn) -> Rewrapped = rewrap
);

/// An RSA version's public half, with its SPKI PEM and JWK encodings.
pub struct PublicKey {
    /// The key, version and raw numbers.
    pub info: PublicKeyInfo,
    /// SubjectPublicKeyInfo, PEM.
    pub spki_pem: String,
    /// RFC 7517 JWK (JSON).
    pub jwk: String,
}

/// `GetPublicKey`.
pub struct GetPublicKey {
    /// The key.
    pub key: String,
    /// The version (0: the newest).
    pub version: u32,
}

/// Whether the platform key `pk`, once made, would wrap `w` (the keyring's input checks).
fn wrap_serves(w: &WrapItem, pk: &PlatformKey) -> Result<(), BrokerError> {
    check_dek_len(w.dek.len())?;
    check_aad_for(w.grant.key(), pk.algorithm, &w.aad)
}

/// Whether the platform key `pk`, once made, would generate `g` (the keyring's input checks).
fn generate_serves(g: &GenerateItem, pk: &PlatformKey) -> Result<(), BrokerError> {
    check_dek_len(if g.len == 0 { DEFAULT_DEK_LEN } else { g.len })?;
    check_aad_for(g.grant.key(), pk.algorithm, &g.aad)
}

pub(crate) async fn wrap(
    call: &mut Call,
    items: Items,
    input: Vec<WrapIn>,
) -> Vec<Result<Wrapped, BrokerError>> {
    let mut slots = Slots::new(input.len());
    let names: Vec<String> = input.iter().map(|i| i.key.clone()).collect();
    let (indices, ready) = slots.sift(input.into_iter().enumerate(), |item| {
        let grant = items.authorize(call, Permission::Wrap, &key_name(&item.key)?)?;
        Ok(WrapItem {
            grant,
            dek: item.plaintext,
            aad: item.aad,
        })
    });
    let (indices, ready) =
        platform_keys_first(call, &mut slots, indices, ready, |w| &w.grant, wrap_serves).await;
    slots.fill(indices, call.keys().wrap(ready).await);
    let results = slots.finish();
    audit_items(call, items, names, &results, |w| w.version);
    results
}

pub(crate) async fn generate(
    call: &mut Call,
    items: Items,
    input: Vec<GenerateIn>,
) -> Vec<Result<(Dek, Wrapped), BrokerError>> {
    let mut slots = Slots::new(input.len());
    let names: Vec<String> = input.iter().map(|i| i.key.clone()).collect();
    let (indices, ready) = slots.sift(input.into_iter().enumerate(), |item| {
        let grant = items.authorize(call, Permission::Wrap, &key_name(&item.key)?)?;
        Ok(GenerateItem {
            grant,
            len: item.len,
            aad: item.aad,
        })
    });
    let (indices, ready) = platform_keys_first(
        call,
        &mut slots,
        indices,
        ready,
        |g| &g.grant,
        generate_serves,
    )
    .await;
    slots.fill(indices, call.keys().generate(ready).await);
    let results = slots.finish();
    audit_items(call, items, names, &results, |g| g.1.version);
    results
}

pub(crate) async fn unwrap(
    call: &mut Call,
    items: Items,
    input: Vec<UnwrapIn>,
) -> Vec<Result<Unwrapped, BrokerError>> {
    let mut slots = Slots::new(input.len());
    let mut names: Vec<String> = input.iter().map(|i| i.key.clone()).collect();
    // The key the caller named is authorised first; the envelope then says which key it is of.
    let (indices, inputs) = slots.sift(input.into_iter().enumerate(), |item| {
        let ciphertext = item.ciphertext?;
        if let Ciphertext::Raw { .. } = ciphertext {
            if item.key.is_empty() {
                return Err(Invalid::RawWithoutKey.into());
            }
            if !item.aad.is_empty() {
                return Err(Invalid::RawWithAad.into());
            }
        }
        let expected = optional_key(&item.key)?;
        if let Some(k) = &expected {
            items.authorize(call, Permission::Unwrap, k)?;
        }
        Ok(UnwrapInput {
            expected,
            ciphertext,
            aad: item.aad,
        })
    });
    let resolved = call.keys().resolve(inputs).await;
    let (granted, ready) = slots.sift(indices.into_iter().zip(resolved), |r| {
        let resolved = r?;
        let grant = items.authorize(call, Permission::Unwrap, resolved.key())?;
        Ok(UnwrapItem { resolved, grant })
    });
    slots.fill(granted, call.keys().unwrap(ready).await);
    let results = slots.finish();
    // An item's record names the key it turned out to use.
    for (name, r) in names.iter_mut().zip(&results) {
        if let Ok(u) = r {
            *name = u.key.to_string();
        }
    }
    audit_items(call, items, names, &results, |u| u.version);
    results
}

pub(crate) async fn rewrap(
    call: &mut Call,
    items: Items,
    input: Vec<RewrapIn>,
) -> Vec<Result<Rewrapped, BrokerError>> {
    let mut slots = Slots::new(input.len());
    let names: Vec<String> = input.iter().map(|i| i.key.clone()).collect();
    let (indices, checked) = slots.sift(input.into_iter().enumerate(), |item| {
        let expected = optional_key(&item.key)?;
        if let Some(k) = &expected {
            items.authorize(call, Permission::Unwrap, k)?;
        }
        let destination = optional_key(&item.destination)?;
        let source = UnwrapInput {
            expected,
            ciphertext: Ciphertext::Envelope(item.envelope),
            aad: item.aad,
        };
        Ok((source, (destination, item.new_aad)))
    });
    let (inputs, rest): (Vec<_>, Vec<_>) = checked.into_iter().unzip();
    let resolved = call.keys().resolve(inputs).await;
    let (granted, ready) = slots.sift(
        indices.into_iter().zip(resolved.into_iter().zip(rest)),
        |(r, (destination, new_aad))| {
            let source = r?;
            let source_grant = items.authorize(call, Permission::Unwrap, source.key())?;
            let dst = destination.unwrap_or_else(|| source.key().clone());
            let destination = items.authorize(call, Permission::Wrap, &dst)?;
            Ok(RewrapItem {
                source,
                source_grant,
                destination,
                new_aad,
            })
        },
    );
    slots.fill(granted, call.keys().rewrap(ready).await);
    let results = slots.finish();
    audit_items(call, items, names, &results, |r| r.wrapped.version);
    results
}

impl Sealed for GetPublicKey {}
impl Operation for GetPublicKey {
    type Output = PublicKey;

    async fn run(self, call: &mut Call) -> Result<PublicKey, BrokerError> {
        let name: KeyName = key_name(&self.key)?;
        let grant = call.authorize(Permission::ReadMetadata, &name)?;
        let info = call.keys().public_key(&grant, self.version).await?;
        call.note_version(info.version);
        let (spki_pem, jwk) = public_key_formats(&info)?;
        Ok(PublicKey {
            info,
            spki_pem,
            jwk,
        })
    }
}
