//! Wrapping and unwrapping DEKs under KEK versions: every call runs a list of items in one
//! session checkout (a single request is a list of one), each item with its own result.

use super::{
    Hsm,
    error::HsmError,
    ops::{self, WrapParams},
    pool::{READ, chunk_fault},
};
use crate::model::{Dek, VersionId};

impl Hsm {
    /// Wraps a DEK under a version.
    pub async fn wrap(
        &self,
        id: VersionId,
        params: WrapParams,
        dek: Dek,
    ) -> Result<Vec<u8>, HsmError> {
        self.run("wrap", READ, move |inner, conn, s| {
            let (h, kwp) = inner.key_for(conn, s, id, &params, true)?;
            ops::wrap(s, h, kwp, &params, &dek)
        })
        .await
    }

    /// Unwraps a DEK with a version.
    pub async fn unwrap(
        &self,
        id: VersionId,
        params: WrapParams,
        ciphertext: Vec<u8>,
    ) -> Result<Dek, HsmError> {
        self.run("unwrap", READ, move |inner, conn, s| {
            let (h, kwp) = inner.key_for(conn, s, id, &params, false)?;
            ops::unwrap(s, h, kwp, &params, &ciphertext)
        })
        .await
    }

    /// Draws a DEK of `len` bytes from the token's RNG and wraps it, in one session checkout.
    pub async fn generate_and_wrap(
        &self,
        id: VersionId,
        params: WrapParams,
        len: usize,
    ) -> Result<(Dek, Vec<u8>), HsmError> {
        self.run("generate a data key", READ, move |inner, conn, s| {
            let (h, kwp) = inner.key_for(conn, s, id, &params, true)?;
            let dek = ops::random(s, len)?;
            let wrapped = ops::wrap(s, h, kwp, &params, &dek)?;
            Ok((dek, wrapped))
        })
        .await
    }

    /// Unwraps with one version and wraps again with another, in one session checkout; the
    /// DEK never leaves this call.
    pub async fn rewrap(
        &self,
        from: (VersionId, WrapParams, Vec<u8>),
        to: (VersionId, WrapParams),
    ) -> Result<Vec<u8>, HsmError> {
        self.run("rewrap", READ, move |inner, conn, s| {
            let (h_from, kwp) = inner.key_for(conn, s, from.0, &from.1, false)?;
            let dek = ops::unwrap(s, h_from, kwp, &from.1, &from.2)?;
            let (h_to, kwp) = inner.key_for(conn, s, to.0, &to.1, true)?;
            ops::wrap(s, h_to, kwp, &to.1, &dek)
        })
        .await
    }

    /// Wraps many DEKs in one session checkout (a batch chunk). The outer error is a session-
    /// level fault (the whole chunk is retried once on a lost session); each item has its own
    /// result.
    pub async fn wrap_many(
        &self,
        items: Vec<(VersionId, WrapParams, Dek)>,
    ) -> Result<Vec<Result<Vec<u8>, HsmError>>, HsmError> {
        self.run("wrap (batch)", READ, move |inner, conn, s| {
            let mut out = Vec::with_capacity(items.len());
            for (id, params, dek) in &items {
                let r = inner
                    .key_for(conn, s, *id, params, true)
                    .and_then(|(h, kwp)| ops::wrap(s, h, kwp, params, dek));
                if let Err(e) = &r
                    && chunk_fault(e)
                {
                    return Err(e.clone());
                }
                out.push(r);
            }
            Ok(out)
        })
        .await
    }

    /// Unwraps many ciphertexts in one session checkout, as [`Hsm::wrap_many`].
    pub async fn unwrap_many(
        &self,
        items: Vec<(VersionId, WrapParams, Vec<u8>)>,
    ) -> Result<Vec<Result<Dek, HsmError>>, HsmError> {
        self.run("unwrap (batch)", READ, move |inner, conn, s| {
            let mut out = Vec::with_capacity(items.len());
            for (id, params, ct) in &items {
                let r = inner
                    .key_for(conn, s, *id, params, false)
                    .and_then(|(h, kwp)| ops::unwrap(s, h, kwp, params, ct));
                if let Err(e) = &r
                    && chunk_fault(e)
                {
                    return Err(e.clone());
                }
                out.push(r);
            }
            Ok(out)
        })
        .await
    }

    /// Draws and wraps many DEKs in one session checkout, as [`Hsm::wrap_many`].
    pub async fn generate_many(
        &self,
        items: Vec<(VersionId, WrapParams, usize)>,
    ) -> Result<Vec<Result<(Dek, Vec<u8>), HsmError>>, HsmError> {
        self.run("generate data keys (batch)", READ, move |inner, conn, s| {
            let mut out = Vec::with_capacity(items.len());
            for (id, params, len) in &items {
                let r = inner
                    .key_for(conn, s, *id, params, true)
                    .and_then(|(h, kwp)| {
                        let dek = ops::random(s, *len)?;
                        let ct = ops::wrap(s, h, kwp, params, &dek)?;
                        Ok((dek, ct))
                    });
                if let Err(e) = &r
                    && chunk_fault(e)
                {
                    return Err(e.clone());
                }
                out.push(r);
            }
            Ok(out)
        })
        .await
    }

    /// A cheap liveness check: one `C_GenerateRandom` through the pool.
    pub async fn ping(&self) -> Result<(), HsmError> {
        self.run("ping the HSM", READ, |_, _, s| {
            ops::random(s, 8).map(|_| ())
        })
        .await
    }
}
