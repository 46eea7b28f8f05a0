//! The data plane in domain terms: wrap, generate, unwrap and rewrap DEKs, and read an RSA
//! version's public half.
//!
//! **A single call is a batch of one**: every operation takes a list of items, checks each one
//! on its own (a bad item fails alone), then splits the good ones into as many chunks as the
//! pool has sessions and runs each chunk in one session checkout on one HSM thread (see
//! `hsm::crypt`) — one code path from the request pipeline to the HSM, whatever the number of
//! items (as Vault's transit engine does it).
//!
//! Every item carries the [`Grant`] the pipeline made for its key; an unwrap learns its key from
//! the envelope first ([`Keyring::resolve`]), so the pipeline authorises after resolving.
//!
//! The hot path reads the in-memory maps under a read lock and makes one HSM call per chunk; it
//! never touches the store or searches the token.

use std::{collections::HashMap, future::Future, sync::Arc};

use futures_util::future::join_all;

use super::{KeyEntry, Keyring, PublicKeyInfo, Unwrapped, VersionEntry, Wrapped};
use crate::{
    envelope::{self, GCM_IV_LEN},
    error::{BrokerError, Invalid, NotFound, Refused},
    external::Answered,
    hsm::{HsmError, RequestScope, WrapParams},
    model::{
        Algorithm, DEFAULT_DEK_LEN, Dek, ExternalRef, KeyName, KeyOp, MAX_AAD_LEN, VersionId,
        check_dek_len, now_ms,
    },
    policy::{Grant, Permission},
};

/// The most items in one batch.
pub const MAX_BATCH: usize = 1000;

/// A DEK to wrap under the newest version of the granted key (permission `wrap`).
pub struct WrapItem {
    /// The grant to wrap with the key.
    pub grant: Grant,
    /// The DEK.
    pub dek: Dek,
    /// The caller's AAD (AES-256-GCM keys only).
    pub aad: Vec<u8>,
}

/// A DEK to draw from the HSM's RNG and wrap (permission `wrap`).
pub struct GenerateItem {
    /// The grant to wrap with the key.
    pub grant: Grant,
    /// The DEK's length in bytes (0: the default, 32).
    pub len: usize,
    /// The caller's AAD.
    pub aad: Vec<u8>,
}

/// What a caller sends to be unwrapped.
pub enum Ciphertext {
    /// A keybroker envelope (it names its key version).
    Envelope(Vec<u8>),
    /// A raw RSA-OAEP block made with an exported public key: the caller names the key (and
    /// here the version and algorithm).
    Raw {
        /// The key version (from `GetPublicKey`).
        version: u32,
        /// RSA-OAEP with SHA-256 or SHA-1.
        algorithm: Algorithm,
        /// One modulus-sized block.
        ciphertext: Vec<u8>,
    },
}

/// A ciphertext to unwrap, before its key is known.
pub struct UnwrapInput {
    /// The key the caller says it belongs to (required for a raw ciphertext).
    pub expected: Option<KeyName>,
    /// The ciphertext.
    pub ciphertext: Ciphertext,
    /// The caller's AAD.
    pub aad: Vec<u8>,
}

/// A ciphertext whose key and version are known: authorise [`Resolved::key`], then unwrap.
pub struct Resolved {
    entry: Arc<KeyEntry>,
    version: VersionEntry,
    params: WrapParams,
    ciphertext: Vec<u8>,
    aad: Vec<u8>,
    raw: bool,
    /// A double-key envelope's two halves, resolved to their member keys (local, external);
    /// `params` and `ciphertext` above are then unused.
    double: Option<Box<(Resolved, Resolved)>>,
}

impl Resolved {
    /// The key the ciphertext belongs to.
    pub fn key(&self) -> &KeyName {
        &self.entry.name
    }
}

/// A resolved ciphertext and the grant to unwrap with its key.
pub struct UnwrapItem {
    /// The ciphertext.
    pub resolved: Resolved,
    /// The grant (permission `unwrap`) on [`Resolved::key`].
    pub grant: Grant,
}

/// A resolved ciphertext to unwrap and wrap again under the newest version of `destination`
/// (the same key, or another), inside the HSM: the DEK never leaves the call.
pub struct RewrapItem {
    /// The ciphertext.
    pub source: Resolved,
    /// The grant (permission `unwrap`) on the source key.
    pub source_grant: Grant,
    /// The grant (permission `wrap`) on the destination key.
    pub destination: Grant,
    /// The AAD to bind the new envelope to (`None`: the same as the source's).
    pub new_aad: Option<Vec<u8>>,
}

/// The result of a rewrap: the new envelope and the source version it came from.
pub struct Rewrapped {
    /// The new envelope.
    pub wrapped: Wrapped,
    /// The version of the source key that unwrapped.
    pub source_version: u32,
}

/// One checked item on its way to the HSM: where its result goes, what the result needs
/// (`meta`), and the HSM call's input.
type Work<M, I> = (usize, M, I);

/// What a wrap needs after the HSM call.
struct Sealing {
    entry: Arc<KeyEntry>,
    version: VersionEntry,
    header: Vec<u8>,
}

impl Sealing {
    /// The key, version number and id of an AES-GCM wrap (its budget is charged).
    fn gcm(&self) -> Option<(&KeyName, u32, VersionId)> {
        gcm_version(&self.entry, &self.version)
    }

    fn seal(self, ciphertext: &[u8]) -> Wrapped {
        Wrapped {
            envelope: envelope::seal(self.header, ciphertext),
            key: self.entry.name.clone(),
            version: self.version.number,
            version_id: self.version.id,
            algorithm: self.entry.algorithm,
        }
    }
}

impl Keyring {
    /// Wraps caller-supplied DEKs, each under the newest version of its granted key.
    pub async fn wrap(&self, items: Vec<WrapItem>) -> Vec<Result<Wrapped, BrokerError>> {
        let now = now_ms();
        let mut results = empty(items.len());
        let mut work = Vec::with_capacity(items.len());
        let (mut remote, mut double) = (Vec::new(), Vec::new());
        for (index, item) in items.into_iter().enumerate() {
            match self.prepare_wrap(&item.grant, KeyOp::Wrap, item.dek.len(), &item.aad, now) {
                Ok((sealing, _)) if sealing.entry.attributes.double.is_some() => {
                    double.push((index, sealing, item.dek, item.aad));
                }
                Ok((sealing, _)) if sealing.entry.attributes.external.is_some() => {
                    remote.push((index, sealing, item.dek));
                }
                Ok((sealing, params)) => {
                    let id = sealing.version.id;
                    work.push((index, sealing, (id, params, item.dek)));
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let work = self.charge(&mut results, work, Sealing::gcm).await;
        self.in_chunks(
            &mut results,
            work,
            |calls| self.hsm.wrap_many(calls),
            |sealing: Sealing, ct: Vec<u8>| Ok(self.sealed(sealing, &ct)),
        )
        .await;
        self.wrap_remote(&mut results, remote, |sealing, ct, _| sealing.seal(&ct))
            .await;
        self.wrap_double(&mut results, double, |sealing, body, _| sealing.seal(&body))
            .await;
        finish(results)
    }

    /// Draws DEKs from the HSM's RNG and wraps each under the newest version of its key.
    pub async fn generate(
        &self,
        items: Vec<GenerateItem>,
    ) -> Vec<Result<(Dek, Wrapped), BrokerError>> {
        let now = now_ms();
        let mut results = empty(items.len());
        let mut work = Vec::with_capacity(items.len());
        let (mut remote, mut double) = (Vec::new(), Vec::new());
        for (index, item) in items.into_iter().enumerate() {
            let len = if item.len == 0 {
                DEFAULT_DEK_LEN
            } else {
                item.len
            };
            match self.prepare_wrap(&item.grant, KeyOp::GenerateDataKey, len, &item.aad, now) {
                // An external (or double) key's DEK comes from this broker's HSM RNG too;
                // only the wrap (of a share) is remote.
                Ok((sealing, _)) if !sealing.entry.attributes.in_hsm() => {
                    match self.hsm.random(len).await {
                        Ok(dek) if sealing.entry.attributes.double.is_some() => {
                            double.push((index, sealing, dek, item.aad));
                        }
                        Ok(dek) => remote.push((index, sealing, dek)),
                        Err(e) => results[index] = Some(Err(e.into())),
                    }
                }
                Ok((sealing, params)) => {
                    let id = sealing.version.id;
                    work.push((index, sealing, (id, params, len)));
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let work = self.charge(&mut results, work, Sealing::gcm).await;
        self.in_chunks(
            &mut results,
            work,
            |calls| self.hsm.generate_many(calls),
            |sealing: Sealing, (dek, ct): (Dek, Vec<u8>)| {
                self.bump(sealing.version.id, true);
                Ok((dek, sealing.seal(&ct)))
            },
        )
        .await;
        self.wrap_remote(&mut results, remote, |sealing, ct, dek| {
            (dek, sealing.seal(&ct))
        })
        .await;
        self.wrap_double(&mut results, double, |sealing, body, dek| {
            (dek, sealing.seal(&body))
        })
        .await;
        finish(results)
    }

    /// The checks before a wrap (or generate) of a `len`-byte DEK under `grant`'s key, and
    /// fresh parameters for the HSM.
    fn prepare_wrap(
        &self,
        grant: &Grant,
        op: KeyOp,
        len: usize,
        aad: &[u8],
        now: i64,
    ) -> Result<(Sealing, WrapParams), BrokerError> {
        let name = grant.key_for(Permission::Wrap)?;
        check_dek_len(len)?;
        let entry = self.get(name)?;
        check_aad(&entry, aad)?;
        let version = entry.current()?.clone();
        entry.check(op, &version, now)?;
        let (params, header) = new_params(entry.algorithm, version.id, aad)?;
        Ok((
            Sealing {
                entry,
                version,
                header,
            },
            params,
        ))
    }

    /// Finds the key and version of each ciphertext (an envelope names its version; a raw
    /// ciphertext names its key and version), checking it against the key the caller expected.
    /// A version this replica does not know makes it check the shared store first (once for
    /// the list). Every mismatch of an envelope is [`BrokerError::Unauthentic`].
    pub async fn resolve(&self, items: Vec<UnwrapInput>) -> Vec<Result<Resolved, BrokerError>> {
        // A version unknown here may be another replica's newest: one refresh for the list.
        let unknown = items
            .iter()
            .flat_map(|i| match &i.ciphertext {
                Ciphertext::Envelope(b) => envelope::versions(b),
                Ciphertext::Raw { .. } => Vec::new(),
            })
            .find(|v| !self.knows_version(*v));
        if let Some(v) = unknown
            && let Err(e) = self.ensure_known(v).await
        {
            return items.iter().map(|_| Err(e.clone())).collect();
        }
        items.into_iter().map(|i| self.resolve_one(i)).collect()
    }

    fn resolve_one(&self, item: UnwrapInput) -> Result<Resolved, BrokerError> {
        let UnwrapInput {
            expected,
            ciphertext,
            aad,
        } = item;
        if aad.len() > MAX_AAD_LEN {
            return Err(Invalid::AadTooLong.into());
        }
        match ciphertext {
            Ciphertext::Envelope(bytes) => {
                if let Some(name) = &expected {
                    self.get(name)?;
                }
                if envelope::is_double(&bytes) {
                    return self.resolve_double(expected.as_ref(), &bytes, aad);
                }
                self.resolve_envelope(expected.as_ref(), &bytes, aad)
            }
            Ciphertext::Raw {
                version,
                algorithm,
                ciphertext,
            } => {
                let name = expected.ok_or(Invalid::RawWithoutKey)?;
                let entry = self.get(&name)?;
                if !algorithm.is_rsa() {
                    return Err(Invalid::RawNotRsa.into());
                }
                if entry.algorithm != algorithm {
                    return Err(Invalid::RawAlgorithm {
                        key: name,
                        algorithm: entry.algorithm,
                    }
                    .into());
                }
                if version == 0 {
                    return Err(Invalid::RawWithoutVersion.into());
                }
                let v = entry
                    .version(version)
                    .cloned()
                    .ok_or_else(|| NotFound::Version {
                        key: name.clone(),
                        version,
                    })?;
                let params = if algorithm == Algorithm::RsaOaepSha1 {
                    WrapParams::OaepSha1
                } else {
                    WrapParams::OaepSha256
                };
                Ok(Resolved {
                    entry,
                    version: v,
                    params,
                    ciphertext,
                    aad,
                    raw: true,
                    double: None,
                })
            }
        }
    }

    /// A format-1 envelope's key and version (checked against `expected`), and what its
    /// unwrap needs.
    fn resolve_envelope(
        &self,
        expected: Option<&KeyName>,
        bytes: &[u8],
        aad: Vec<u8>,
    ) -> Result<Resolved, BrokerError> {
        let env = envelope::parse(bytes)?;
        let (entry, version) = self.find_version(expected, &env, &aad)?;
        let params = params_for(&env, &aad)?;
        let ciphertext = env.ciphertext.to_vec();
        Ok(Resolved {
            entry,
            version,
            params,
            ciphertext,
            aad,
            raw: false,
            double: None,
        })
    }

    /// A double-key envelope: the double key's version it names (checked against `expected`),
    /// and each half resolved to its member key — the local half with the AAD that binds it to
    /// the header, the external half and the caller's AAD. A half of another key is
    /// [`BrokerError::Unauthentic`], as any mismatch.
    fn resolve_double(
        &self,
        expected: Option<&KeyName>,
        bytes: &[u8],
        aad: Vec<u8>,
    ) -> Result<Resolved, BrokerError> {
        let d = envelope::parse_double(bytes)?;
        let (entry, version) = self.find_named(expected, d.version)?;
        let members = entry
            .attributes
            .double
            .as_ref()
            .ok_or(BrokerError::Unauthentic)?;
        let bind = envelope::double_aad(d.header, d.external, &aad);
        let local = self.resolve_envelope(Some(&member_name(&members.local)?), d.local, bind)?;
        let external = self.resolve_envelope(
            Some(&member_name(&members.external)?),
            d.external,
            Vec::new(),
        )?;
        Ok(Resolved {
            entry,
            version,
            // Unused: each half carries its own.
            params: WrapParams::Kwp,
            ciphertext: Vec::new(),
            aad,
            raw: false,
            double: Some(Box::new((local, external))),
        })
    }

    /// The key and version a version id names, checked against `expected` (if the caller named
    /// a key). Every mismatch is [`BrokerError::Unauthentic`].
    fn find_named(
        &self,
        expected: Option<&KeyName>,
        id: VersionId,
    ) -> Result<(Arc<KeyEntry>, VersionEntry), BrokerError> {
        let found = self
            .versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        let Some((name, number)) = found else {
            return Err(BrokerError::Unauthentic);
        };
        if expected.is_some_and(|e| *e != name) {
            return Err(BrokerError::Unauthentic);
        }
        let entry = self.get(&name)?;
        let v = entry
            .version(number)
            .cloned()
            .ok_or(BrokerError::Unauthentic)?;
        Ok((entry, v))
    }

    /// The key and version an envelope names, checked against `expected` (if the caller named
    /// a key). Every mismatch is [`BrokerError::Unauthentic`].
    fn find_version(
        &self,
        expected: Option<&KeyName>,
        env: &envelope::Envelope<'_>,
        aad: &[u8],
    ) -> Result<(Arc<KeyEntry>, VersionEntry), BrokerError> {
        let (entry, v) = self.find_named(expected, env.version)?;
        // A double key's own version wraps nothing: only a double envelope may name it.
        if entry.algorithm != env.algorithm
            || (!aad.is_empty() && !env.algorithm.supports_aad())
            || entry.attributes.double.is_some()
        {
            return Err(BrokerError::Unauthentic);
        }
        Ok((entry, v))
    }

    /// Unwraps resolved ciphertexts.
    pub async fn unwrap(&self, items: Vec<UnwrapItem>) -> Vec<Result<Unwrapped, BrokerError>> {
        let now = now_ms();
        let mut results = empty(items.len());
        let mut work = Vec::with_capacity(items.len());
        let (mut remote, mut double) = (Vec::new(), Vec::new());
        for (index, item) in items.into_iter().enumerate() {
            let UnwrapItem { resolved: r, grant } = item;
            match check_unwrap(&grant, &r, KeyOp::Unwrap, now) {
                Ok(()) if r.double.is_some() => double.push((index, r)),
                Ok(()) if r.entry.attributes.external.is_some() => remote.push((index, r)),
                Ok(()) => work.push((
                    index,
                    (r.entry, r.version.clone()),
                    (r.version.id, r.params, r.ciphertext),
                )),
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        self.in_chunks(
            &mut results,
            work,
            |calls| self.hsm.unwrap_many(calls),
            |(entry, version): (Arc<KeyEntry>, VersionEntry), dek: Dek| {
                // A DEK of a length keybroker wraps, whether the envelope or a raw RSA block
                // (made with the exported public key) held it: the broker unwraps DEKs, it is
                // no general decryption oracle. Anything else is the one unauthentic error.
                if check_dek_len(dek.len()).is_err() {
                    return Err(BrokerError::Unauthentic);
                }
                self.bump(version.id, false);
                Ok(Unwrapped {
                    dek,
                    key: entry.name.clone(),
                    version: version.number,
                    version_id: version.id,
                    algorithm: entry.algorithm,
                })
            },
        )
        .await;
        self.unwrap_remote(&mut results, remote).await;
        self.unwrap_double(&mut results, double, now).await;
        finish(results)
    }

    /// Wraps each DEK through its external key's proxy (concurrently; each call bounded by
    /// the proxy's budget) and puts `done`'s result in its place. The envelope is the one a
    /// local key of the same algorithm makes, its ciphertext the remote's raw output.
    async fn wrap_remote<T>(
        &self,
        results: &mut [Option<Result<T, BrokerError>>],
        work: Vec<(usize, Sealing, Dek)>,
        done: impl Fn(Sealing, Vec<u8>, Dek) -> T,
    ) {
        if work.is_empty() {
            return;
        }
        let calls = work.iter().map(|(_, sealing, dek)| async move {
            let x = remote_ref(&sealing.entry)?.clone();
            let proxy = self.proxy(&x.proxy)?;
            let answer = proxy
                .wrap(&x.remote_key, sealing.entry.algorithm, dek)
                .await;
            Ok::<_, BrokerError>((x, proxy, answer))
        });
        let answers = join_all(calls).await;
        let mut notes = Vec::new();
        for ((index, sealing, dek), answer) in work.into_iter().zip(answers) {
            let r = answer.and_then(|(x, proxy, a)| {
                notes.push(remote_note(&sealing.entry.name, &x, proxy.name(), &a));
                Ok(a?.value)
            });
            results[index] = Some(r.map(|ct| {
                self.bump(sealing.version.id, true);
                done(sealing, ct, dek)
            }));
        }
        note_remote(notes);
    }

    /// Unwraps each resolved envelope of an external key through its proxy. A DEK of a length
    /// keybroker does not wrap is the one unauthentic error, as for a local key.
    async fn unwrap_remote(
        &self,
        results: &mut [Option<Result<Unwrapped, BrokerError>>],
        work: Vec<(usize, Resolved)>,
    ) {
        if work.is_empty() {
            return;
        }
        let calls = work.iter().map(|(_, r)| async move {
            if r.raw {
                // A raw RSA block is made with an exported public key; an external key
                // exports none.
                return Err(Refused::ExternalKey {
                    key: r.entry.name.clone(),
                    what: "unwrap a raw ciphertext",
                }
                .into());
            }
            let x = remote_ref(&r.entry)?.clone();
            let proxy = self.proxy(&x.proxy)?;
            let answer = proxy
                .unwrap(&x.remote_key, r.entry.algorithm, &r.ciphertext)
                .await;
            Ok::<_, BrokerError>((x, proxy, answer))
        });
        let answers = join_all(calls).await;
        let mut notes = Vec::new();
        for ((index, r), answer) in work.into_iter().zip(answers) {
            let out = answer.and_then(|(x, proxy, a)| {
                notes.push(remote_note(&r.entry.name, &x, proxy.name(), &a));
                let a = a?;
                if check_dek_len(a.value.len()).is_err() {
                    return Err(BrokerError::Unauthentic);
                }
                self.bump(r.version.id, false);
                Ok(Unwrapped {
                    dek: a.value,
                    key: r.entry.name.clone(),
                    version: r.version.number,
                    version_id: r.version.id,
                    algorithm: r.entry.algorithm,
                })
            });
            results[index] = Some(out);
        }
        note_remote(notes);
    }

    /// Seals an HSM wrap's output and counts the wrap.
    fn sealed(&self, sealing: Sealing, ciphertext: &[u8]) -> Wrapped {
        self.bump(sealing.version.id, true);
        sealing.seal(ciphertext)
    }

    /// Wraps each DEK under its double key (double key encryption, `docs/src/dke.md`): the
    /// DEK is split into share 1, fresh from the HSM RNG, and share 2 = DEK XOR share 1; share
    /// 2 is wrapped through the external member's proxy, then share 1 under the local member
    /// (AES-256-GCM) with an AAD that binds the double header, the external half's SHA-256 and
    /// the caller's AAD. `done` gets the double key's sealing (its header replaced by the
    /// double header) and the body to append. Every share is zeroized when dropped.
    async fn wrap_double<T>(
        &self,
        results: &mut [Option<Result<T, BrokerError>>],
        work: Vec<(usize, Sealing, Dek, Vec<u8>)>,
        done: impl Fn(Sealing, Vec<u8>, Dek) -> T,
    ) {
        if work.is_empty() {
            return;
        }
        let now = now_ms();
        // The members' checks and the shares.
        let (mut pending, mut remote) = (Vec::new(), Vec::new());
        for (index, sealing, dek, aad) in work {
            match self.split(&sealing, &dek, now).await {
                Ok((local, external, s1, s2)) => {
                    remote.push((pending.len(), external, s2));
                    pending.push((index, sealing, dek, aad, local, s1));
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        // Share 2 through the proxy, concurrently.
        let mut external = empty(pending.len());
        self.wrap_remote(&mut external, remote, |sealing, ct, _| {
            sealing.seal(&ct).envelope
        })
        .await;
        // Share 1 under the local member, bound to the external half.
        let mut waiting = Vec::with_capacity(pending.len());
        let mut local_work = Vec::with_capacity(pending.len());
        let mut local = empty(pending.len());
        for (n, ((index, mut sealing, dek, aad, mut member, s1), x)) in
            pending.into_iter().zip(finish(external)).enumerate()
        {
            let prepared = x.and_then(|x| {
                sealing.header = envelope::double_header(sealing.version.id);
                let bind = envelope::double_aad(&sealing.header, &x, &aad);
                let (params, header) =
                    new_params(member.entry.algorithm, member.version.id, &bind)?;
                member.header = header;
                Ok((x, params))
            });
            match prepared {
                Ok((x, params)) => {
                    let id = member.version.id;
                    local_work.push((n, member, (id, params, s1)));
                    waiting.push((n, index, sealing, dek, x));
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let local_work = self.charge(&mut local, local_work, Sealing::gcm).await;
        self.in_chunks(
            &mut local,
            local_work,
            |calls| self.hsm.wrap_many(calls),
            |member: Sealing, ct: Vec<u8>| Ok(self.sealed(member, &ct).envelope),
        )
        .await;
        for (n, index, sealing, dek, x) in waiting {
            let l = local[n]
                .take()
                .unwrap_or_else(|| Err(BrokerError::internal("a double wrap without a result")));
            results[index] = Some(l.map(|l| {
                self.bump(sealing.version.id, true);
                let body = envelope::double_body(&l, &x);
                done(sealing, body, dek)
            }));
        }
    }

    /// A double key's members for a wrap (each must exist and may wrap now, its own state
    /// applying) and a DEK's two shares: share 1 from the HSM RNG, share 2 = DEK XOR share 1.
    /// The external member's sealing is ready for [`Self::wrap_remote`]; the local one's header
    /// is a placeholder (its AAD needs the external half: the caller makes the real one).
    async fn split(
        &self,
        sealing: &Sealing,
        dek: &Dek,
        now: i64,
    ) -> Result<(Sealing, Sealing, Dek, Dek), BrokerError> {
        let members =
            sealing.entry.attributes.double.as_ref().ok_or_else(|| {
                BrokerError::internal("a double wrap of a key that is not double")
            })?;
        let member = |name: &str| -> Result<Sealing, BrokerError> {
            let entry = self.get(&member_name(name)?)?;
            let version = entry.current()?.clone();
            entry.check(KeyOp::Wrap, &version, now)?;
            let header = envelope::header(entry.algorithm, version.id, &[]);
            Ok(Sealing {
                entry,
                version,
                header,
            })
        };
        let (local, external) = (member(&members.local)?, member(&members.external)?);
        let s1 = self.hsm.random(dek.len()).await?;
        let s2 = xor(dek, &s1)?;
        Ok((local, external, s1, s2))
    }

    /// Unwraps double-key envelopes: both members must allow unwrap now (each its own state:
    /// disabled, deleted, below its minimum version), then the local half in this HSM and the
    /// external half through its proxy run concurrently, and the DEK is their shares' XOR. A
    /// local half that does not authenticate (tampered, or not this envelope's: the external
    /// half swapped) is the one unauthentic error, whatever the proxy said.
    async fn unwrap_double(
        &self,
        results: &mut [Option<Result<Unwrapped, BrokerError>>],
        work: Vec<(usize, Resolved)>,
        now: i64,
    ) {
        if work.is_empty() {
            return;
        }
        let (mut pending, mut local_work, mut remote) = (Vec::new(), Vec::new(), Vec::new());
        for (index, r) in work {
            let Some(halves) = r.double else {
                results[index] = Some(Err(BrokerError::internal("a double unwrap without halves")));
                continue;
            };
            let (l, x) = *halves;
            let checked = l
                .entry
                .check(KeyOp::Unwrap, &l.version, now)
                .and_then(|()| x.entry.check(KeyOp::Unwrap, &x.version, now));
            match checked {
                Ok(()) => {
                    let n = pending.len();
                    local_work.push((n, l.version.id, (l.version.id, l.params, l.ciphertext)));
                    remote.push((n, x));
                    pending.push((index, r.entry, r.version));
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let (mut local, mut external) = (empty(pending.len()), empty(pending.len()));
        tokio::join!(
            self.in_chunks(
                &mut local,
                local_work,
                |calls| self.hsm.unwrap_many(calls),
                |id: VersionId, share: Dek| {
                    self.bump(id, false);
                    Ok(share)
                },
            ),
            self.unwrap_remote(&mut external, remote),
        );
        for ((index, entry, version), (l, x)) in pending
            .into_iter()
            .zip(finish(local).into_iter().zip(finish(external)))
        {
            let out = l.and_then(|s1| {
                let s2 = x?.dek;
                if s1.len() != s2.len() || check_dek_len(s1.len()).is_err() {
                    return Err(BrokerError::Unauthentic);
                }
                let dek = xor(&s1, &s2)?;
                self.bump(version.id, false);
                Ok(Unwrapped {
                    dek,
                    key: entry.name.clone(),
                    version: version.number,
                    version_id: version.id,
                    algorithm: entry.algorithm,
                })
            });
            results[index] = Some(out);
        }
    }

    /// Unwraps resolved ciphertexts and wraps their DEKs again, each in one HSM call.
    pub async fn rewrap(&self, items: Vec<RewrapItem>) -> Vec<Result<Rewrapped, BrokerError>> {
        let now = now_ms();
        let mut results = empty(items.len());
        let mut work = Vec::with_capacity(items.len());
        let mut two_step = Vec::new();
        for (index, item) in items.into_iter().enumerate() {
            let external = |e: &KeyEntry| !e.attributes.in_hsm();
            let to_external = item
                .destination
                .key_for(Permission::Wrap)
                .ok()
                .and_then(|n| self.get(n).ok())
                .is_some_and(|e| external(&e));
            if to_external || external(&item.source.entry) {
                match check_unwrap(&item.source_grant, &item.source, KeyOp::Rewrap, now) {
                    Ok(()) => two_step.push((index, item)),
                    Err(e) => results[index] = Some(Err(e)),
                }
                continue;
            }
            let prepared = check_unwrap(&item.source_grant, &item.source, KeyOp::Rewrap, now)
                .and_then(|()| {
                    let out_aad = item.new_aad.as_deref().unwrap_or(&item.source.aad);
                    let name = item.destination.key_for(Permission::Wrap)?;
                    // Out of the source key, the DEK is as good as unwrapped: the source key
                    // must allow that too (not only rewrap), or a key that may not unwrap would
                    // unwrap in two steps, through a key that may.
                    if name != item.source.key() {
                        item.source
                            .entry
                            .check(KeyOp::Unwrap, &item.source.version, now)?;
                    }
                    let entry = self.get(name)?;
                    check_aad(&entry, out_aad)?;
                    let version = entry.current()?.clone();
                    entry.check(KeyOp::Wrap, &version, now)?;
                    let (params, header) = new_params(entry.algorithm, version.id, out_aad)?;
                    Ok((
                        Sealing {
                            entry,
                            version,
                            header,
                        },
                        params,
                    ))
                });
            match prepared {
                Ok((sealing, to)) => {
                    let s = item.source;
                    let meta = (sealing, s.version.id, s.version.number);
                    let call = (
                        (s.version.id, s.params, s.ciphertext),
                        (meta.0.version.id, to),
                    );
                    work.push((index, meta, call));
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let work = self
            .charge(&mut results, work, |(sealing, _, _)| sealing.gcm())
            .await;
        self.in_chunks(
            &mut results,
            work,
            |calls| self.hsm.rewrap_many(calls),
            |(sealing, source_id, source_version): (Sealing, VersionId, u32), ct: Vec<u8>| {
                self.bump(source_id, false);
                self.bump(sealing.version.id, true);
                Ok(Rewrapped {
                    wrapped: sealing.seal(&ct),
                    source_version,
                })
            },
        )
        .await;
        self.rewrap_two_steps(&mut results, two_step).await;
        finish(results)
    }

    /// Rewraps where an external key takes part, which one HSM call cannot do: the source
    /// unwraps (in this HSM, or through its proxy), then the destination wraps (likewise) —
    /// moving envelopes to or from a customer's HYOK hardware without re-encrypting data. The
    /// DEK is in this broker's memory between the two steps (zeroized after), as for an unwrap
    /// followed by a wrap, and each step makes its own checks: the source must allow unwrap as
    /// well as rewrap, the destination wrap.
    async fn rewrap_two_steps(
        &self,
        results: &mut [Option<Result<Rewrapped, BrokerError>>],
        work: Vec<(usize, RewrapItem)>,
    ) {
        if work.is_empty() {
            return;
        }
        let mut then = Vec::with_capacity(work.len());
        let mut unwraps = Vec::with_capacity(work.len());
        for (index, item) in work {
            let aad = item.new_aad.unwrap_or_else(|| item.source.aad.clone());
            then.push((index, item.destination, aad, item.source.version.number));
            unwraps.push(UnwrapItem {
                resolved: item.source,
                grant: item.source_grant,
            });
        }
        let unwrapped = self.unwrap(unwraps).await;
        let (mut wraps, mut placed) = (Vec::new(), Vec::new());
        for ((index, destination, aad, source_version), u) in then.into_iter().zip(unwrapped) {
            match u {
                Ok(u) => {
                    placed.push((index, source_version));
                    wraps.push(WrapItem {
                        grant: destination,
                        dek: u.dek,
                        aad,
                    });
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        for ((index, source_version), w) in placed.into_iter().zip(self.wrap(wraps).await) {
            results[index] = Some(w.map(|wrapped| Rewrapped {
                wrapped,
                source_version,
            }));
        }
    }

    /// Spends one invocation of its version's AES-GCM budget per item that `gcm` names (the
    /// items that wrap or encrypt with AES-GCM); an item past its version's budget fails alone,
    /// FAILED_PRECONDITION naming the key. Called after the checks, before the HSM.
    pub(super) async fn charge<M, I, T>(
        &self,
        results: &mut [Option<Result<T, BrokerError>>],
        work: Vec<Work<M, I>>,
        gcm: impl Fn(&M) -> Option<(&KeyName, u32, VersionId)>,
    ) -> Vec<Work<M, I>> {
        let mut wanted: HashMap<VersionId, u64> = HashMap::new();
        for (_, meta, _) in &work {
            if let Some((_, _, id)) = gcm(meta) {
                *wanted.entry(id).or_default() += 1;
            }
        }
        if wanted.is_empty() {
            return work;
        }
        let mut granted = HashMap::with_capacity(wanted.len());
        for (id, n) in wanted {
            granted.insert(id, self.budget.take(&self.store, id, n).await);
        }
        let mut kept = Vec::with_capacity(work.len());
        for (index, meta, input) in work {
            let Some((key, version, id)) = gcm(&meta) else {
                kept.push((index, meta, input));
                continue;
            };
            let refusal = match granted.get_mut(&id) {
                Some(Ok(g)) if g.count > 0 => {
                    g.count -= 1;
                    None
                }
                Some(Ok(g)) => Some(
                    Refused::GcmBudgetSpent {
                        key: key.clone(),
                        version,
                        limit: g.limit,
                    }
                    .into(),
                ),
                Some(Err(e)) => Some(e.clone()),
                None => Some(BrokerError::internal("an AES-GCM item without a budget")),
            };
            match refusal {
                None => kept.push((index, meta, input)),
                Some(e) => results[index] = Some(Err(e)),
            }
        }
        kept
    }

    /// Whether the key's newest version has reserved half its AES-GCM budget (the maintenance
    /// task then rotates it).
    pub(super) fn budget_wants_rotation(&self, entry: &KeyEntry) -> bool {
        entry
            .versions
            .last()
            .is_some_and(|v| self.budget.wants_rotation(v.id))
    }

    /// Runs checked items through the HSM in as many chunks as the pool has sessions, each
    /// chunk in one session checkout (`call`), and puts each item's outcome (`done` with its
    /// `meta` and the HSM's answer) in its place. A fault of the session or device fails the
    /// whole chunk, each item with it.
    pub(super) async fn in_chunks<M, I, O, T, C, F>(
        &self,
        results: &mut [Option<Result<T, BrokerError>>],
        work: Vec<Work<M, I>>,
        call: C,
        mut done: impl FnMut(M, O) -> Result<T, BrokerError>,
    ) where
        C: Fn(Vec<I>) -> F,
        F: Future<Output = Result<Vec<Result<O, HsmError>>, HsmError>>,
    {
        if work.is_empty() {
            return;
        }
        let runs = chunks(work, self.hsm.sessions()).into_iter().map(|chunk| {
            let (metas, inputs): (Vec<_>, Vec<_>) =
                chunk.into_iter().map(|(i, m, x)| ((i, m), x)).unzip();
            let answer = call(inputs);
            async move { (answer.await, metas) }
        });
        for (answer, metas) in join_all(runs).await {
            match answer {
                Err(e) => {
                    let e = BrokerError::from(e);
                    for (index, _) in metas {
                        results[index] = Some(Err(e.clone()));
                    }
                }
                Ok(outs) => {
                    for ((index, meta), out) in metas.into_iter().zip(outs) {
                        results[index] =
                            Some(out.map_err(BrokerError::from).and_then(|o| done(meta, o)));
                    }
                }
            }
        }
    }

    /// The public key of an RSA or EC key version (0 = newest).
    pub async fn public_key(
        &self,
        grant: &Grant,
        version: u32,
    ) -> Result<PublicKeyInfo, BrokerError> {
        let name = grant.key_for(Permission::ReadMetadata)?;
        let entry = self.get(name)?;
        if !entry.key_type.is_pair() {
            return Err(Refused::NotRsa {
                key: name.clone(),
                key_type: entry.key_type,
            }
            .into());
        }
        entry.usable()?;
        refuse_external(&entry, "export a public key")?;
        let v = entry.version_or_current(version)?.clone();
        if let Some(curve) = entry.key_type.curve() {
            let point = self
                .hsm
                .ec_point(v.id, curve)
                .await
                .map_err(BrokerError::from)?;
            return Ok(PublicKeyInfo {
                key: entry.name.clone(),
                version: v.number,
                version_id: v.id,
                algorithm: entry.algorithm,
                modulus: Vec::new(),
                exponent: Vec::new(),
                ec_point: Some((curve, point)),
            });
        }
        let pk = self.hsm.public_key(v.id).await.map_err(BrokerError::from)?;
        Ok(PublicKeyInfo {
            key: entry.name.clone(),
            version: v.number,
            version_id: v.id,
            algorithm: entry.algorithm,
            modulus: pk.modulus,
            exponent: pk.exponent,
            ec_point: None,
        })
    }
}

/// The checks before unwrapping `r` for `op`: the grant is for its key, and the key may
/// unwrap with its version now.
fn check_unwrap(grant: &Grant, r: &Resolved, op: KeyOp, now: i64) -> Result<(), BrokerError> {
    if grant.key_for(Permission::Unwrap)? != r.key() {
        return Err(BrokerError::internal(format!(
            "a grant on key {} used for key {}",
            grant.key(),
            r.key()
        )));
    }
    r.entry.check(op, &r.version, now)?;
    if r.raw {
        let bits = r.entry.key_type.rsa_bits().unwrap_or(0) as usize;
        if r.ciphertext.len() != bits / 8 {
            return Err(BrokerError::Unauthentic);
        }
    }
    Ok(())
}

/// A double key's member, by its stored name (INTERNAL if it does not parse: creation checked
/// it).
fn member_name(name: &str) -> Result<KeyName, BrokerError> {
    KeyName::parse(name).map_err(|_| {
        BrokerError::internal(format!("a double key's member {name:?} is no key name"))
    })
}

/// Two shares' XOR (equal lengths), zeroized when dropped.
fn xor(a: &Dek, b: &Dek) -> Result<Dek, BrokerError> {
    if a.len() != b.len() {
        return Err(BrokerError::internal("two shares of different lengths"));
    }
    Ok(Dek::new(
        a.expose()
            .iter()
            .zip(b.expose())
            .map(|(x, y)| x ^ y)
            .collect(),
    ))
}

/// An external key's reference (INTERNAL for a local key: the callers split them first).
fn remote_ref(entry: &KeyEntry) -> Result<&ExternalRef, BrokerError> {
    entry
        .attributes
        .external
        .as_ref()
        .ok_or_else(|| BrokerError::internal(format!("key {} is not external", entry.name)))
}

/// Refuses an external key for an operation that needs the key in this broker's HSM.
/// (and a double key, whose material is its members').
pub(crate) fn refuse_external(entry: &KeyEntry, what: &'static str) -> Result<(), BrokerError> {
    if entry.attributes.in_hsm() {
        return Ok(());
    }
    Err(not_in_hsm(&entry.name, &entry.attributes, what))
}

/// The refusal of `what` for a key whose material is not in this HSM: an external key's, or a
/// double key's.
pub(crate) fn not_in_hsm(
    key: &KeyName,
    a: &crate::model::KeyAttributes,
    what: &'static str,
) -> BrokerError {
    let key = key.clone();
    if a.double.is_some() {
        Refused::DoubleKey { key, what }.into()
    } else {
        Refused::ExternalKey { key, what }.into()
    }
}

/// One remote call as the request's audit record notes it: the remote request id of an
/// answered call, the error of one that failed (never key material).
fn remote_note<T>(
    key: &KeyName,
    x: &ExternalRef,
    proxy: &str,
    answer: &Result<Answered<T>, BrokerError>,
) -> serde_json::Value {
    let mut note = serde_json::json!({
        "key": key.to_string(),
        "proxy": proxy,
        "remote_key": x.remote_key,
    });
    match answer {
        Ok(a) => note["remote_request_id"] = a.remote_request_id.clone().into(),
        Err(e) => note["error"] = e.public_message().into(),
    }
    note
}

/// Puts the remote calls made into the request's audit record (`detail.external`).
fn note_remote(notes: Vec<serde_json::Value>) {
    if !notes.is_empty() {
        RequestScope::append_detail("external", notes);
    }
}

pub(super) fn empty<T>(n: usize) -> Vec<Option<Result<T, BrokerError>>> {
    (0..n).map(|_| None).collect()
}

pub(super) fn finish<T>(
    results: Vec<Option<Result<T, BrokerError>>>,
) -> Vec<Result<T, BrokerError>> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(BrokerError::internal("batch item without a result"))))
        .collect()
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

/// The key, version number and id when `entry` wraps or encrypts with AES-GCM.
pub(super) fn gcm_version<'a>(
    entry: &'a KeyEntry,
    version: &VersionEntry,
) -> Option<(&'a KeyName, u32, VersionId)> {
    (entry.algorithm == Algorithm::Aes256Gcm).then_some((&entry.name, version.number, version.id))
}

pub(crate) fn check_aad(entry: &KeyEntry, aad: &[u8]) -> Result<(), BrokerError> {
    check_aad_for(&entry.name, entry.algorithm, aad)
}

/// The AAD checks of a wrap or encrypt under key `name` of `algorithm` (a key that may not
/// exist yet: the platform's first use): not too long, and only where the algorithm binds it.
pub fn check_aad_for(name: &KeyName, algorithm: Algorithm, aad: &[u8]) -> Result<(), BrokerError> {
    if aad.len() > MAX_AAD_LEN {
        return Err(Invalid::AadTooLong.into());
    }
    if !aad.is_empty() && !algorithm.supports_aad() {
        return Err(Invalid::AadUnsupported {
            key: name.clone(),
            algorithm,
        }
        .into());
    }
    Ok(())
}

pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), BrokerError> {
    getrandom::fill(buf)
        .map_err(|e| BrokerError::internal(format!("OS random number generator failed: {e}")))
}

/// Fresh parameters and the envelope header for wrapping under `id`.
pub(crate) fn new_params(
    alg: Algorithm,
    id: VersionId,
    aad: &[u8],
) -> Result<(WrapParams, Vec<u8>), BrokerError> {
    Ok(match alg {
        Algorithm::Aes256Gcm => {
            // A random 96-bit IV per wrap (NIST SP 800-38D §8.2.2): the token's RNG is not
            // needed for IVs; the OS RNG is cheaper and as good.
            let mut iv = [0u8; GCM_IV_LEN];
            fill_random(&mut iv)?;
            let header = envelope::header(alg, id, &iv);
            let aad = envelope::gcm_aad(&header, aad);
            (WrapParams::Gcm { iv, aad }, header)
        }
        Algorithm::AesKeyWrapPad => (WrapParams::Kwp, envelope::header(alg, id, &[])),
        Algorithm::AesKeyWrap => (WrapParams::Kw, envelope::header(alg, id, &[])),
        Algorithm::RsaOaepSha256 => (WrapParams::OaepSha256, envelope::header(alg, id, &[])),
        Algorithm::RsaOaepSha1 => (WrapParams::OaepSha1, envelope::header(alg, id, &[])),
        // A signing key's operations never include wrapping (`KeyOp::fits`), so `check` refused
        // it before this point.
        Algorithm::RsaSign | Algorithm::Ecdsa => {
            return Err(BrokerError::internal(format!("a {alg} key asked to wrap")));
        }
    })
}

/// Parameters to unwrap a parsed envelope.
pub(crate) fn params_for(
    env: &envelope::Envelope<'_>,
    aad: &[u8],
) -> Result<WrapParams, BrokerError> {
    Ok(match env.algorithm {
        Algorithm::Aes256Gcm => WrapParams::Gcm {
            iv: env.nonce.try_into().map_err(|_| BrokerError::Unauthentic)?,
            aad: envelope::gcm_aad(env.header, aad),
        },
        Algorithm::AesKeyWrapPad => WrapParams::Kwp,
        Algorithm::AesKeyWrap => WrapParams::Kw,
        Algorithm::RsaOaepSha256 => WrapParams::OaepSha256,
        Algorithm::RsaOaepSha1 => WrapParams::OaepSha1,
        // Never an envelope's algorithm (`Algorithm::from_id`).
        Algorithm::RsaSign | Algorithm::Ecdsa => return Err(BrokerError::Unauthentic),
    })
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
