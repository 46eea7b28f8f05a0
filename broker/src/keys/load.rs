//! Start-up: the store's keys reconciled with the HSM's objects. Destructions a crash
//! interrupted are finished, creations it interrupted are rolled back, every KEK object is found
//! and its template checked, and each version's identity is proven by its canary; orphans are
//! reported.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, OnceLock, RwLock},
};

use futures_util::{StreamExt, stream};

use super::{
    IntegrityPolicy, KeyEntry, KeyState, Keyring, Lifecycle, LifecycleSettings, Receipt, Usage,
    VersionEntry, blocking,
    integrity::{canary_of, canary_to_check},
};
use crate::{
    error::{BrokerError, StartError},
    hsm::{ExpectedKek, Hsm},
    model::{KeyName, VersionId, now_ms},
    store::{Store, StoredKey, StoredLifecycle, VersionState},
};

/// What start-up found.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Keys loaded.
    pub keys: usize,
    /// Versions attached and verified.
    pub versions: usize,
    /// Pending (unacknowledged) versions rolled back.
    pub rolled_back: usize,
    /// Keys quarantined, with why.
    pub quarantined: Vec<(String, String)>,
    /// Objects made by keybroker that no key references.
    pub orphans: Vec<String>,
    /// Destructions (purge/trim) interrupted by a crash and finished now; their receipts still
    /// have to go into the audit trail.
    pub finished_destructions: Vec<Receipt>,
    /// Time spent finding the KEK objects and checking their templates.
    pub attach_ms: u64,
    /// Time spent proving the KEKs' identities (canaries).
    pub canaries_ms: u64,
}

impl Keyring {
    /// Loads every key from the store, finishes destructions and rolls back creations that a
    /// crash interrupted, attaches the HSM objects, checks their templates and canaries, and
    /// reports orphans. With [`IntegrityPolicy::Fail`], any integrity problem is an error
    /// naming every affected key.
    pub async fn load(
        hsm: Hsm,
        store: Arc<Store>,
        policy: IntegrityPolicy,
        settings: LifecycleSettings,
    ) -> Result<(Self, LoadReport), StartError> {
        let mut report = LoadReport::default();

        // With a shared store, recovery runs under the cluster-wide write lock, and only for the
        // work of replicas that are gone: another replica may be in the middle of a creation.
        let st = store.clone();
        let cluster = blocking(move || st.lock_writes().map_err(BrokerError::from)).await?;
        let cluster = super::replica::ReleaseOnDrop(cluster);
        let st = store.clone();
        let applied_generation =
            blocking(move || st.generation().map_err(BrokerError::from)).await?;
        let applied_generation = applied_generation.unwrap_or(0);

        // Finish destructions that were started (their intent is durable) before anything else.
        let st = store.clone();
        let pending =
            blocking(move || st.pending_destructions().map_err(BrokerError::from)).await?;
        let mut in_progress = std::collections::HashSet::new();
        let mut by_key: BTreeMap<(KeyName, String, String), Vec<(u32, VersionId)>> =
            BTreeMap::new();
        for p in pending {
            let st = store.clone();
            let owner = p.owner;
            if blocking(move || st.owner_alive(owner).map_err(BrokerError::from)).await? {
                in_progress.insert(p.id);
                continue;
            }
            by_key
                .entry((p.key, p.reason, p.requested_by))
                .or_default()
                .push((p.version, p.id));
        }
        for ((key, reason, by), versions) in by_key {
            let mut destroyed = 0;
            for (_, id) in &versions {
                destroyed += hsm.destroy_kek(*id).await.map_err(BrokerError::from)?;
            }
            let (st, k, ids) = (
                store.clone(),
                key.clone(),
                versions.iter().map(|v| v.1).collect::<Vec<_>>(),
            );
            let purge = reason == "purge";
            blocking(move || {
                st.finish_destroy(&k, &ids, purge)
                    .map_err(BrokerError::from)
            })
            .await?;
            tracing::warn!(key = %key, %reason, versions = versions.len(), objects_destroyed = destroyed,
                "finished a destruction interrupted by a crash");
            report.finished_destructions.push(Receipt {
                key: key.to_string(),
                reason,
                versions: versions.iter().map(|v| v.0).collect(),
                object_ids: versions.iter().map(|v| v.1.hex()).collect(),
                objects_destroyed: destroyed,
                at_ms: now_ms(),
                by,
            });
        }

        let st = store.clone();
        let stored = blocking(move || st.load_all().map_err(BrokerError::from)).await?;

        // Roll back creations that were never acknowledged (and whose replica is gone).
        for k in &stored {
            for v in k
                .versions
                .iter()
                .filter(|v| v.state == VersionState::Pending)
            {
                let st = store.clone();
                let owner = v.owner;
                if blocking(move || st.owner_alive(owner).map_err(BrokerError::from)).await? {
                    continue;
                }
                let destroyed = hsm.destroy_kek(v.id).await.map_err(BrokerError::from)?;
                let st = store.clone();
                let id = v.id;
                blocking(move || st.abort_version(id).map_err(BrokerError::from)).await?;
                tracing::warn!(key = %k.name, version = v.number, objects_destroyed = destroyed,
                    "rolled back a key version whose creation was interrupted (never acknowledged)");
                report.rolled_back += 1;
            }
        }
        drop(cluster);
        let stored: Vec<StoredKey> = stored
            .into_iter()
            .filter(|k| k.lifecycle != StoredLifecycle::Purging)
            .map(|mut k| {
                k.versions
                    .retain(|v| v.state == VersionState::Active && !in_progress.contains(&v.id));
                k
            })
            .filter(|k| !k.versions.is_empty())
            .collect();

        let expected = stored
            .iter()
            .flat_map(|k| {
                k.versions.iter().map(|v| ExpectedKek {
                    id: v.id,
                    key_type: k.key_type,
                    algorithm: k.algorithm,
                    origin: v.origin,
                    canary: canary_of(v.canary.as_deref(), v.canary_digest.as_deref()),
                })
            })
            .collect();
        let t_attach = std::time::Instant::now();
        let attach = hsm.attach(expected).await.map_err(BrokerError::from)?;
        report.attach_ms = t_attach.elapsed().as_millis() as u64;
        report.orphans = attach.orphans;
        let mut bad: HashMap<VersionId, String> = attach.problems.into_iter().collect();

        // Canaries: prove each attached object is the key the version was created with, in
        // chunks (one HSM call each, not one per version), one chunk per session at a time.
        let t_canaries = std::time::Instant::now();
        let mut to_check = Vec::new();
        for k in &stored {
            for v in &k.versions {
                if bad.contains_key(&v.id) {
                    continue;
                }
                match canary_to_check(
                    k.algorithm,
                    v.id,
                    v.canary.as_deref(),
                    v.canary_digest.as_deref(),
                ) {
                    Ok(c) => to_check.push((v.id, c)),
                    Err(why) => {
                        bad.insert(v.id, why);
                    }
                }
            }
        }
        let parallel = hsm.token().sessions.max(1);
        // Small enough that a chunk of slow RSA-4096 unwraps stays far inside call_timeout.
        let chunk = to_check.len().div_ceil(parallel * 4).clamp(1, 64);
        let mut chunks = Vec::new();
        let mut it = to_check.into_iter().peekable();
        while it.peek().is_some() {
            chunks.push(it.by_ref().take(chunk).collect::<Vec<_>>());
        }
        let results: Vec<_> = stream::iter(chunks)
            .map(|c| {
                let hsm = hsm.clone();
                async move {
                    match hsm.check_canaries(c.clone()).await {
                        Ok(v) => v,
                        // An HSM fault in a chunk: each of its versions alone, and one that
                        // still cannot be checked is quarantined (as before chunks existed).
                        Err(_) => {
                            let mut out = Vec::with_capacity(c.len());
                            for item in c {
                                let id = item.0;
                                out.push(match hsm.check_canaries(vec![item]).await {
                                    Ok(mut v) => {
                                        v.pop().unwrap_or((id, Some("canary not checked".into())))
                                    }
                                    Err(e) => (id, Some(format!("canary check failed: {e}"))),
                                });
                            }
                            out
                        }
                    }
                }
            })
            .buffer_unordered(parallel)
            .collect()
            .await;
        for (id, verdict) in results.into_iter().flatten() {
            if let Some(why) = verdict {
                bad.insert(id, why);
            }
        }
        report.canaries_ms = t_canaries.elapsed().as_millis() as u64;

        let mut keys = BTreeMap::new();
        let mut versions = HashMap::new();
        let mut usage = HashMap::new();
        for k in stored {
            let problems: Vec<String> = k
                .versions
                .iter()
                .filter_map(|v| {
                    bad.get(&v.id)
                        .map(|why| format!("version {}: {why}", v.number))
                })
                .collect();
            let state = if problems.is_empty() {
                KeyState::Enabled
            } else {
                let why = problems.join("; ");
                tracing::error!(key = %k.name, problems = %why, "KEK integrity check failed");
                report.quarantined.push((k.name.to_string(), why.clone()));
                for v in &k.versions {
                    hsm.detach(v.id);
                }
                KeyState::Quarantined(why)
            };
            report.versions += k.versions.len();
            for v in &k.versions {
                versions.insert(v.id, (k.name.clone(), v.number));
                usage.insert(
                    v.id,
                    Arc::new(Usage::new(v.wraps, v.unwraps, v.last_used_ms)),
                );
            }
            let lifecycle = match k.lifecycle {
                StoredLifecycle::Deleted {
                    deleted_at_ms,
                    purge_at_ms,
                    deleted_by,
                } => Lifecycle::Deleted {
                    deleted_at_ms,
                    purge_at_ms,
                    deleted_by,
                },
                _ => Lifecycle::Active,
            };
            let entry = KeyEntry {
                name: k.name.clone(),
                key_type: k.key_type,
                algorithm: k.algorithm,
                created_at_ms: k.created_at_ms,
                updated_at_ms: k.updated_at_ms,
                state,
                lifecycle,
                attributes: k.attributes,
                versions: k
                    .versions
                    .iter()
                    .map(|v| VersionEntry {
                        number: v.number,
                        id: v.id,
                        created_at_ms: v.created_at_ms,
                        origin: v.origin,
                        expires_ms: v.expires_ms,
                    })
                    .collect(),
            };
            keys.insert(k.name, Arc::new(entry));
        }
        report.keys = keys.len();
        for o in &report.orphans {
            tracing::warn!(object = %o, "HSM object made by keybroker is not referenced by any key (orphan)");
        }
        if policy == IntegrityPolicy::Fail && !report.quarantined.is_empty() {
            return Err(StartError::Integrity(report.quarantined));
        }
        Ok((
            Self {
                hsm,
                store,
                keys: RwLock::new(keys),
                versions: RwLock::new(versions),
                usage: RwLock::new(usage),
                write_lock: tokio::sync::Mutex::new(()),
                replica: super::replica::ReplicaState::new(applied_generation),
                settings,
                audit: OnceLock::new(),
                pending_rollbacks: std::sync::Mutex::new(Vec::new()),
            },
            report,
        ))
    }
}
