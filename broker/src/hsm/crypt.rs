//! Wrapping and unwrapping DEKs under KEK versions. Every call runs a list of items in one
//! session checkout on one HSM thread (a single request is a list of one): the outer
//! error is a fault of the session or the device — the whole list is retried once on a lost
//! session, as any call is — and each item has its own result.

use cryptoki::{error::RvError, session::Session};

use super::{
    Hsm, Inner,
    conn::Conn,
    error::HsmError,
    ops::{self, WrapParams},
    pool::{INTEGRITY_RETRIES, READ, chunk_fault, reclassified, reclassify},
};
use crate::model::{Dek, VersionId};

/// An unwrap: the version, its parameters, the ciphertext.
pub type UnwrapCall = (VersionId, WrapParams, Vec<u8>);
/// A wrap under a version with fresh parameters.
pub type WrapUnder = (VersionId, WrapParams);

impl Hsm {
    /// Wraps DEKs, each under its version.
    pub async fn wrap_many(
        &self,
        items: Vec<(VersionId, WrapParams, Dek)>,
    ) -> Result<Vec<Result<Vec<u8>, HsmError>>, HsmError> {
        self.each("wrap", items, |inner, conn, s, (id, params, dek)| {
            let (h, kwp) = inner.key_for(conn, s, *id, params, true)?;
            ops::wrap(s, h, kwp, params, dek)
        })
        .await
    }

    /// Unwraps ciphertexts, each with its version.
    pub async fn unwrap_many(
        &self,
        items: Vec<UnwrapCall>,
    ) -> Result<Vec<Result<Dek, HsmError>>, HsmError> {
        self.each("unwrap", items, |inner, conn, s, (id, params, ct)| {
            unwrap_one(inner, conn, s, *id, params, ct)
        })
        .await
    }

    /// Draws DEKs of the given lengths from the token's RNG and wraps each.
    pub async fn generate_many(
        &self,
        items: Vec<(VersionId, WrapParams, usize)>,
    ) -> Result<Vec<Result<(Dek, Vec<u8>), HsmError>>, HsmError> {
        self.each(
            "generate a data key",
            items,
            |inner, conn, s, (id, params, len)| {
                let (h, kwp) = inner.key_for(conn, s, *id, params, true)?;
                let dek = ops::random(s, *len)?;
                let ct = ops::wrap(s, h, kwp, params, &dek)?;
                Ok((dek, ct))
            },
        )
        .await
    }

    /// Unwraps each ciphertext with one version and wraps its DEK again with another; the DEK
    /// never leaves the call.
    pub async fn rewrap_many(
        &self,
        items: Vec<(UnwrapCall, WrapUnder)>,
    ) -> Result<Vec<Result<Vec<u8>, HsmError>>, HsmError> {
        self.each(
            "rewrap",
            items,
            |inner, conn, s, ((from, from_params, ct), (to, to_params))| {
                let dek = unwrap_one(inner, conn, s, *from, from_params, ct)?;
                let (h, kwp) = inner.key_for(conn, s, *to, to_params, true)?;
                ops::wrap(s, h, kwp, to_params, &dek)
            },
        )
        .await
    }

    /// A cheap liveness check: one `C_GenerateRandom` through the pool.
    pub async fn ping(&self) -> Result<(), HsmError> {
        self.run("ping the HSM", READ, |_, _, s| {
            ops::random(s, 8).map(|_| ())
        })
        .await
    }

    /// `len` bytes from the token's RNG (`C_GenerateRandom`), in a buffer wiped when dropped.
    pub async fn random(&self, len: usize) -> Result<Dek, HsmError> {
        self.run("generate random bytes", READ, move |_, _, s| {
            ops::random(s, len)
        })
        .await
    }

    /// Runs `f` on every item in order, in one session checkout. A fault that is really about
    /// the session or the device ends the list with that fault (see [`chunk_fault`]), so that
    /// the session is evicted (and the list retried once), the handles re-found, or the device
    /// recovered — as for one call. The items that failed on their own are told to the metrics.
    pub(super) async fn each<I, T>(
        &self,
        what: &'static str,
        items: Vec<I>,
        f: impl Fn(&Inner, &Conn, &Session, &I) -> Result<T, HsmError> + Send + 'static,
    ) -> Result<Vec<Result<T, HsmError>>, HsmError>
    where
        I: Send + 'static,
        T: Send + 'static,
    {
        let out = self
            .run(what, READ, move |inner, conn, s| {
                let mut out = Vec::with_capacity(items.len());
                for item in &items {
                    let r = item_result(inner, conn, s, || f(inner, conn, s, item));
                    if let Err(e) = &r
                        && chunk_fault(e)
                    {
                        return Err(e.clone());
                    }
                    out.push(r);
                }
                Ok(out)
            })
            .await;
        if let Ok(items) = &out {
            self.inner.observe_items(what, items);
        }
        out
    }
}

/// One item of a batch chunk. A fault that the vendor profile reads as "not authentic" is that
/// item's, like any data error: openCryptoki's `CKR_FUNCTION_FAILED` for a bad OAEP padding,
/// and Kryoptic's `CKR_DEVICE_ERROR` for a failed RFC 5649 or OAEP check — the latter only once
/// the item failed the same way [`INTEGRITY_RETRIES`] more times and its key's canary still
/// decrypts, as for a single call (see `pool`): a device failing even the canary is the
/// chunk's fault. Other device errors are the chunk's (see [`chunk_fault`]).
fn item_result<T>(
    inner: &Inner,
    conn: &Conn,
    s: &Session,
    run: impl Fn() -> Result<T, HsmError>,
) -> Result<T, HsmError> {
    let alive = || s.get_session_info().is_ok();
    let mut retries = INTEGRITY_RETRIES;
    loop {
        let e = match run() {
            Ok(v) => return Ok(v),
            Err(e) if matches!(e.rv, Some(RvError::FunctionFailed | RvError::DeviceError)) => {
                reclassify(inner.profile, e, alive)
            }
            Err(e) => return Err(e),
        };
        if !reclassified(&e) || e.rv == Some(RvError::FunctionFailed) {
            return Err(e);
        }
        if retries > 0 {
            retries -= 1;
            continue;
        }
        return Err(e
            .version
            .and_then(|id| inner.canary_fails(conn, s, id))
            .unwrap_or(e));
    }
}

fn unwrap_one(
    inner: &Inner,
    conn: &Conn,
    s: &Session,
    id: VersionId,
    params: &WrapParams,
    ct: &[u8],
) -> Result<Dek, HsmError> {
    let (h, kwp) = inner.key_for(conn, s, id, params, false)?;
    ops::unwrap(s, h, kwp, params, ct).map_err(|mut e| {
        e.version = Some(id);
        e
    })
}
