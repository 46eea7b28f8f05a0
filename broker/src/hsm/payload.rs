//! Encrypting and decrypting payloads under KEK versions: AES-256-GCM (`C_Encrypt`/`C_Decrypt`
//! with the secret key) and RSA-OAEP (`C_Encrypt` with the public key, `C_Decrypt` with the
//! private key) — the same single-part operations, objects and fault handling as DEK wraps
//! (`crypt`), a list of items in one session checkout. AES key wrap (RFC 5649, RFC 3394) never
//! serves a payload: it works on key objects only (`C_WrapKey`), and a payload is not a key.

use super::{
    Hsm,
    crypt::UnwrapCall,
    error::{FaultKind, HsmError},
    ops::{self, WrapParams},
};
use crate::model::{Dek, VersionId};

fn refuse_kwp(params: &WrapParams) -> Result<(), HsmError> {
    if params.algorithm().is_key_wrap() {
        return Err(HsmError::new(
            FaultKind::Other,
            "payload encryption",
            "AES key wrap (RFC 5649, RFC 3394) does not encrypt payloads",
        ));
    }
    Ok(())
}

impl Hsm {
    /// Encrypts payloads, each under its version: AES-GCM gives ciphertext || tag, RSA-OAEP
    /// one modulus-sized block.
    pub async fn encrypt_many(
        &self,
        items: Vec<(VersionId, WrapParams, Dek)>,
    ) -> Result<Vec<Result<Vec<u8>, HsmError>>, HsmError> {
        self.each(
            "encrypt",
            items,
            |inner, conn, s, (id, params, plaintext)| {
                refuse_kwp(params)?;
                let (h, kwp) = inner.key_for(conn, s, *id, params, true)?;
                ops::wrap(s, h, kwp, params, plaintext)
            },
        )
        .await
    }

    /// Decrypts payloads, each with its version. Any failure that can mean "not authentic" is
    /// [`FaultKind::DataInvalid`].
    pub async fn decrypt_many(
        &self,
        items: Vec<UnwrapCall>,
    ) -> Result<Vec<Result<Dek, HsmError>>, HsmError> {
        self.each("decrypt", items, |inner, conn, s, (id, params, ct)| {
            refuse_kwp(params)?;
            let (h, kwp) = inner.key_for(conn, s, *id, params, false)?;
            ops::unwrap(s, h, kwp, params, ct)
        })
        .await
    }
}
