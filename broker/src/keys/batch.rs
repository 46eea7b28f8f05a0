//! Batch wrap/unwrap/generate: up to 1000 items per call, each with its own result. Items are
//! checked one by one (a bad item fails alone), then the good ones are split into as many chunks
//! as the pool has sessions and each chunk runs in one session checkout on one blocking thread —
//! one task switch and one permit per chunk instead of per item.

use std::sync::Arc;

use futures_util::future::join_all;

use super::{
    KeyEntry, Keyring, Unwrapped, Wrapped,
    crypt::{check_aad, new_params, params_for},
};
use crate::{
    envelope,
    error::BrokerError,
    hsm::WrapParams,
    model::{DEFAULT_DEK_LEN, Dek, KeyName, KeyOp, MAX_AAD_LEN, VersionId, check_dek_len, now_ms},
};

/// A wrap item: key, DEK, AAD.
pub type WrapItem = (KeyName, Dek, Vec<u8>);
/// A generate item: key, length, AAD.
pub type GenerateItem = (KeyName, usize, Vec<u8>);
/// An unwrap item: the key the caller named (if any), envelope, AAD.
pub type UnwrapItem = (Option<KeyName>, Vec<u8>, Vec<u8>);

/// The most items in one batch.
pub const MAX_BATCH: usize = 1000;

/// One checked item, ready for the HSM.
struct Ready<T> {
    index: usize,
    id: VersionId,
    params: WrapParams,
    input: T,
    header: Vec<u8>,
    entry: Arc<KeyEntry>,
    version: u32,
}

/// Splits `work` into at most `n` contiguous chunks.
fn chunks<T>(mut work: Vec<T>, n: usize) -> Vec<Vec<T>> {
    let n = n.clamp(1, work.len().max(1));
    let per = work.len().div_ceil(n);
    let mut out = Vec::with_capacity(n);
    while !work.is_empty() {
        let rest = work.split_off(per.min(work.len()));
        out.push(std::mem::replace(&mut work, rest));
    }
    out
}

impl Keyring {
    /// Wraps caller-supplied DEKs. `items[i]` is the parsed request (or why it did not parse).
    pub async fn wrap_batch(
        &self,
        items: Vec<Result<WrapItem, BrokerError>>,
        authorize: &(dyn Fn(&KeyName) -> Result<(), BrokerError> + Sync),
    ) -> Vec<Result<Wrapped, BrokerError>> {
        let now = now_ms();
        let mut results: Vec<Option<Result<Wrapped, BrokerError>>> =
            (0..items.len()).map(|_| None).collect();
        let mut work = Vec::new();
        for (index, item) in items.into_iter().enumerate() {
            let checked = item.and_then(|(key, dek, aad)| {
                check_dek_len(dek.len())?;
                authorize(&key)?;
                let entry = self.get(&key)?;
                check_aad(&entry, &aad)?;
                let v = entry.current()?.clone();
                entry.check(KeyOp::Wrap, &v, now)?;
                let (params, header) = new_params(entry.algorithm, v.id, &aad)?;
                Ok(Ready {
                    index,
                    id: v.id,
                    params,
                    input: dek,
                    header,
                    entry,
                    version: v.number,
                })
            });
            match checked {
                Ok(r) => work.push(r),
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let hsm = self.hsm();
        let runs = chunks(work, hsm.sessions())
            .into_iter()
            .map(|chunk| async move {
                let calls = chunk
                    .iter()
                    .map(|r| (r.id, r.params.clone(), r.input.clone()))
                    .collect();
                (hsm.wrap_many(calls).await, chunk)
            });
        for (outcome, chunk) in join_all(runs).await {
            match outcome {
                Err(e) => {
                    let e = BrokerError::from(e);
                    for r in chunk {
                        results[r.index] = Some(Err(clone_err(&e)));
                    }
                }
                Ok(cts) => {
                    for (r, ct) in chunk.into_iter().zip(cts) {
                        results[r.index] = Some(ct.map_err(BrokerError::from).map(|ct| {
                            self.bump(r.id, true);
                            Wrapped {
                                envelope: envelope::seal(r.header, &ct),
                                key: r.entry.name.clone(),
                                version: r.version,
                                algorithm: r.entry.algorithm,
                            }
                        }));
                    }
                }
            }
        }
        finish(results)
    }

    /// Generates and wraps DEKs.
    pub async fn generate_batch(
        &self,
        items: Vec<Result<GenerateItem, BrokerError>>,
        authorize: &(dyn Fn(&KeyName) -> Result<(), BrokerError> + Sync),
    ) -> Vec<Result<(Dek, Wrapped), BrokerError>> {
        let now = now_ms();
        let mut results: Vec<Option<Result<(Dek, Wrapped), BrokerError>>> =
            (0..items.len()).map(|_| None).collect();
        let mut work = Vec::new();
        for (index, item) in items.into_iter().enumerate() {
            let checked = item.and_then(|(key, len, aad)| {
                let len = if len == 0 { DEFAULT_DEK_LEN } else { len };
                check_dek_len(len)?;
                authorize(&key)?;
                let entry = self.get(&key)?;
                check_aad(&entry, &aad)?;
                let v = entry.current()?.clone();
                entry.check(KeyOp::GenerateDataKey, &v, now)?;
                let (params, header) = new_params(entry.algorithm, v.id, &aad)?;
                Ok(Ready {
                    index,
                    id: v.id,
                    params,
                    input: len,
                    header,
                    entry,
                    version: v.number,
                })
            });
            match checked {
                Ok(r) => work.push(r),
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let hsm = self.hsm();
        let runs = chunks(work, hsm.sessions())
            .into_iter()
            .map(|chunk| async move {
                let calls = chunk
                    .iter()
                    .map(|r| (r.id, r.params.clone(), r.input))
                    .collect();
                (hsm.generate_many(calls).await, chunk)
            });
        for (outcome, chunk) in join_all(runs).await {
            match outcome {
                Err(e) => {
                    let e = BrokerError::from(e);
                    for r in chunk {
                        results[r.index] = Some(Err(clone_err(&e)));
                    }
                }
                Ok(out) => {
                    for (r, res) in chunk.into_iter().zip(out) {
                        results[r.index] = Some(res.map_err(BrokerError::from).map(|(dek, ct)| {
                            self.bump(r.id, true);
                            (
                                dek,
                                Wrapped {
                                    envelope: envelope::seal(r.header, &ct),
                                    key: r.entry.name.clone(),
                                    version: r.version,
                                    algorithm: r.entry.algorithm,
                                },
                            )
                        }));
                    }
                }
            }
        }
        finish(results)
    }

    /// Unwraps envelopes. `items[i]` is (the key the caller named, if any; envelope; aad).
    pub async fn unwrap_batch(
        &self,
        items: Vec<Result<UnwrapItem, BrokerError>>,
        authorize: &(dyn Fn(&KeyName) -> Result<(), BrokerError> + Sync),
    ) -> Vec<Result<Unwrapped, BrokerError>> {
        // A version unknown here may be another replica's newest: one refresh for the batch.
        let unknown = items
            .iter()
            .filter_map(|i| i.as_ref().ok())
            .filter_map(|(_, b, _)| envelope::parse(b).ok().map(|e| e.version))
            .find(|v| !self.knows_version(*v));
        if let Some(v) = unknown
            && let Err(e) = self.ensure_known(v).await
        {
            let m = e.to_string();
            return items
                .iter()
                .map(|_| Err(BrokerError::Unavailable(m.clone())))
                .collect();
        }
        let now = now_ms();
        let mut results: Vec<Option<Result<Unwrapped, BrokerError>>> =
            (0..items.len()).map(|_| None).collect();
        let mut work = Vec::new();
        for (index, item) in items.into_iter().enumerate() {
            let checked = item.and_then(|(expected, env_bytes, aad)| {
                if aad.len() > MAX_AAD_LEN {
                    return Err(BrokerError::invalid(format!(
                        "aad is longer than {MAX_AAD_LEN} bytes"
                    )));
                }
                if let Some(k) = &expected {
                    authorize(k)?;
                    self.get(k)?;
                }
                let env = envelope::parse(&env_bytes)?;
                let (entry, v) = self.resolve(expected.as_ref(), &env, &aad)?;
                authorize(&entry.name)?;
                entry.check(KeyOp::Unwrap, &v, now)?;
                let params = params_for(&env, &aad)?;
                let ct = env.ciphertext.to_vec();
                Ok(Ready {
                    index,
                    id: v.id,
                    params,
                    input: ct,
                    header: Vec::new(),
                    entry,
                    version: v.number,
                })
            });
            match checked {
                Ok(r) => work.push(r),
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let hsm = self.hsm();
        let runs = chunks(work, hsm.sessions())
            .into_iter()
            .map(|chunk| async move {
                let calls = chunk
                    .iter()
                    .map(|r| (r.id, r.params.clone(), r.input.clone()))
                    .collect();
                (hsm.unwrap_many(calls).await, chunk)
            });
        for (outcome, chunk) in join_all(runs).await {
            match outcome {
                Err(e) => {
                    let e = BrokerError::from(e);
                    for r in chunk {
                        results[r.index] = Some(Err(clone_err(&e)));
                    }
                }
                Ok(deks) => {
                    for (r, dek) in chunk.into_iter().zip(deks) {
                        results[r.index] = Some(dek.map_err(BrokerError::from).and_then(|dek| {
                            if check_dek_len(dek.len()).is_err() {
                                return Err(BrokerError::Unauthentic);
                            }
                            self.bump(r.id, false);
                            Ok(Unwrapped {
                                dek,
                                key: r.entry.name.clone(),
                                version: r.version,
                                algorithm: r.entry.algorithm,
                            })
                        }));
                    }
                }
            }
        }
        finish(results)
    }
}

fn clone_err(e: &BrokerError) -> BrokerError {
    match e {
        BrokerError::InvalidArgument(m) => BrokerError::InvalidArgument(m.clone()),
        BrokerError::Unauthentic => BrokerError::Unauthentic,
        BrokerError::NotFound(m) => BrokerError::NotFound(m.clone()),
        BrokerError::PermissionDenied(m) => BrokerError::PermissionDenied(m.clone()),
        BrokerError::FailedPrecondition(m) => BrokerError::FailedPrecondition(m.clone()),
        BrokerError::AlreadyExists(m) => BrokerError::AlreadyExists(m.clone()),
        BrokerError::Unavailable(m) => BrokerError::Unavailable(m.clone()),
        BrokerError::ResourceExhausted(m) => BrokerError::ResourceExhausted(m.clone()),
        BrokerError::DeadlineExceeded(m) => BrokerError::DeadlineExceeded(m.clone()),
        BrokerError::Internal(m) => BrokerError::Internal(m.clone()),
    }
}

fn finish<T>(results: Vec<Option<Result<T, BrokerError>>>) -> Vec<Result<T, BrokerError>> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(BrokerError::internal("batch item without a result"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::chunks;

    #[test]
    fn chunks_cover_everything_in_order() {
        for (n, k) in [(0usize, 4usize), (1, 4), (7, 3), (100, 8), (5, 10)] {
            let c = chunks((0..n).collect::<Vec<_>>(), k);
            assert!(c.len() <= k.max(1));
            assert_eq!(c.concat(), (0..n).collect::<Vec<_>>());
        }
    }
}
