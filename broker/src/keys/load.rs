//! Start-up: the store's keys reconciled with the HSM's objects. Destructions a crash
//! interrupted are finished, creations it interrupted are rolled back, every KEK object is found
//! and its template checked, and each version's identity is proven by its canary; orphans are
//! reported.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, OnceLock, RwLock},
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream};

use super::{
    IntegrityPolicy, KeyEntry, KeyState, Keyring, LifecycleSettings, Receipt, Usage, blocking,
    integrity::{canary_of, canary_to_check},
    replica::entry_from_stored,
};
use crate::{
    error::BrokerError,
    hsm::{ExpectedKek, Hsm},
    model::{KeyName, VersionId},
    store::{Store, StoredKey, StoredLifecycle, VersionState},
};

/// Why the keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The store or the HSM failed.
    #[error("{0}")]
    Failed(#[from] BrokerError),
    /// Keys failed their integrity check and `[hsm] on_integrity_failure` is `fail`.
    #[error(
        "refusing to start: {} key(s) failed the HSM integrity check (keys are never re-created silently; \
         investigate, or set hsm.on_integrity_failure = \"quarantine\" to serve the others): {}",
        .0.len(),
        .0.iter().map(|(k, why)| format!("{k}: {why}")).collect::<Vec<_>>().join(" | ")
    )]
    Integrity(Vec<(String, String)>),
}

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
    /// Versions whose identity could not be proven within the start-up budget (no verdict):
    /// proven in the background and before their first use.
    pub canaries_deferred: usize,
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
    ) -> Result<(Self, LoadReport), LoadError> {
        let mut report = LoadReport::default();
        let (stored, applied_generation) = recover(&hsm, &store, &mut report).await?;
        let mut bad = attach(&hsm, &stored, &mut report).await?;
        let deferred = prove_identities(&hsm, &stored, &mut bad, &mut report).await;
        let (keys, versions, usage) = cache(&hsm, stored, &bad, &mut report);
        for o in &report.orphans {
            tracing::warn!(object = %o, "HSM object made by keybroker is not referenced by any key (orphan)");
        }
        if policy == IntegrityPolicy::Fail && !report.quarantined.is_empty() {
            return Err(LoadError::Integrity(report.quarantined));
        }
        hsm.defer_checks(deferred);
        Ok((
            Self {
                hsm,
                store,
                keys: RwLock::new(keys),
                versions: RwLock::new(versions),
                usage: RwLock::new(usage),
                write_lock: tokio::sync::Mutex::new(()),
                replica: super::replica::ReplicaState::new(applied_generation),
                budget: super::budget::GcmBudget::new(settings.gcm_limit, settings.gcm_block),
                settings,
                audit: OnceLock::new(),
                pending_rollbacks: std::sync::Mutex::new(Vec::new()),
                external: OnceLock::new(),
            },
            report,
        ))
    }
}

/// Step 1, under the cluster-wide write lock (with a shared store, and only for the work of
/// replicas that are gone: another replica may be in the middle of a creation): finishes the
/// destructions a crash interrupted (their intent is durable), reads every key, and rolls back
/// the creations that were never acknowledged. Returns the versions that serve (active, not
/// being destroyed by a live replica) and the store generation they reflect.
async fn recover(
    hsm: &Hsm,
    store: &Arc<Store>,
    report: &mut LoadReport,
) -> Result<(Vec<StoredKey>, i64), BrokerError> {
    let st = store.clone();
    let cluster = blocking(move || st.lock_writes().map_err(BrokerError::from)).await?;
    let _cluster = super::replica::ReleaseOnDrop(cluster);
    let st = store.clone();
    let applied = blocking(move || st.generation().map_err(BrokerError::from))
        .await?
        .unwrap_or(0);
    let in_progress = finish_destructions(hsm, store, report).await?;
    let st = store.clone();
    let stored = blocking(move || st.load_all().map_err(BrokerError::from)).await?;
    roll_back_pending(hsm, store, &stored, report).await?;
    let serving = stored
        .into_iter()
        .filter(|k| k.lifecycle != StoredLifecycle::Purging)
        .map(|mut k| {
            k.versions
                .retain(|v| v.state == VersionState::Active && !in_progress.contains(&v.id));
            k
        })
        .filter(|k| !k.versions.is_empty())
        .collect();
    Ok((serving, applied))
}

/// Whether the replica that owns a piece of pending work is still running (then it is its
/// work, not a crash's).
async fn alive(store: &Arc<Store>, owner: Option<i64>) -> Result<bool, BrokerError> {
    let st = store.clone();
    blocking(move || st.owner_alive(owner).map_err(BrokerError::from)).await
}

/// Finishes the destructions (purge, trim) whose replica is gone, each with a receipt for the
/// audit trail; returns the versions a live replica is destroying.
async fn finish_destructions(
    hsm: &Hsm,
    store: &Arc<Store>,
    report: &mut LoadReport,
) -> Result<HashSet<VersionId>, BrokerError> {
    let st = store.clone();
    let pending = blocking(move || st.pending_destructions().map_err(BrokerError::from)).await?;
    let mut in_progress = HashSet::new();
    let mut by_key: BTreeMap<(KeyName, String, String), Vec<(u32, VersionId)>> = BTreeMap::new();
    for p in pending {
        if alive(store, p.owner).await? {
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
        let backups = blocking(move || {
            st.finish_destroy(&k, &ids, purge)
                .and_then(|()| st.backups(&k))
                .map_err(BrokerError::from)
        })
        .await?;
        tracing::warn!(key = %key, %reason, versions = versions.len(), objects_destroyed = destroyed,
            "finished a destruction interrupted by a crash");
        report.finished_destructions.push(Receipt::new(
            &key, &reason, &versions, destroyed, &by, backups,
        ));
    }
    Ok(in_progress)
}

/// Rolls back the creations that were never acknowledged and whose replica is gone: destroys
/// any HSM object of the version, then forgets it.
async fn roll_back_pending(
    hsm: &Hsm,
    store: &Arc<Store>,
    stored: &[StoredKey],
    report: &mut LoadReport,
) -> Result<(), BrokerError> {
    for k in stored {
        for v in k
            .versions
            .iter()
            .filter(|v| v.state == VersionState::Pending)
        {
            if alive(store, v.owner).await? {
                continue;
            }
            let destroyed = hsm.destroy_kek(v.id).await.map_err(BrokerError::from)?;
            let (st, id) = (store.clone(), v.id);
            blocking(move || st.abort_version(id).map_err(BrokerError::from)).await?;
            tracing::warn!(key = %k.name, version = v.number, objects_destroyed = destroyed,
                "rolled back a key version whose creation was interrupted (never acknowledged)");
            report.rolled_back += 1;
        }
    }
    Ok(())
}

/// Step 2: finds every version's objects in one pass over the token and checks their
/// templates. Returns the versions that failed, with why.
async fn attach(
    hsm: &Hsm,
    stored: &[StoredKey],
    report: &mut LoadReport,
) -> Result<HashMap<VersionId, String>, BrokerError> {
    // An external key's versions have no HSM object here (their key lives behind its proxy).
    let expected = stored
        .iter()
        .filter(|k| k.attributes.in_hsm())
        .flat_map(|k| {
            k.versions.iter().map(|v| ExpectedKek {
                id: v.id,
                key_type: k.key_type,
                algorithm: k.algorithm,
                origin: v.origin,
                canary: canary_of(k.algorithm, v.canary.as_deref(), v.canary_digest.as_deref()),
            })
        })
        .collect();
    let started = std::time::Instant::now();
    let attach = hsm.attach(expected).await.map_err(BrokerError::from)?;
    report.attach_ms = started.elapsed().as_millis() as u64;
    report.orphans = attach.orphans;
    Ok(attach.problems.into_iter().collect())
}

/// The least time the start-up identity checks get, whatever the estimate.
const CHECK_BUDGET_MIN: Duration = Duration::from_secs(1);

/// One chunk of start-up identity checks: verdicts, or versions not checked (no verdict).
enum Checked {
    Verdicts(Vec<(VersionId, Option<String>)>),
    Deferred(Vec<VersionId>),
}

/// Step 3: proves each attached object is the key its version was created with (its canary),
/// in chunks — one HSM call each, not one per version — one chunk per session at a time.
/// Adds the versions that failed to `bad`; returns those that could not be checked.
///
/// A check that could not run is not a failed check: an HSM fault or a slow token gives no
/// verdict. The checks get their own time budget, sized by the number of versions and the
/// token's speed measured on the first one (twice the estimated pass, at least
/// [`CHECK_BUDGET_MIN`], at most `[hsm] startup_check_budget_ms`), and chunks small enough that
/// each call stays well inside `[hsm] call_timeout_ms` (a chunk that overran it would keep its
/// session and starve the next). Versions not proven within the budget are handed to the HSM
/// layer, which proves each before its first use and sweeps them in the background: the
/// broker serves the proven keys meanwhile and never serves an unproven one.
async fn prove_identities(
    hsm: &Hsm,
    stored: &[StoredKey],
    bad: &mut HashMap<VersionId, String>,
    report: &mut LoadReport,
) -> Vec<VersionId> {
    let started = Instant::now();
    let mut to_check = Vec::new();
    for k in stored.iter().filter(|k| k.attributes.in_hsm()) {
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
    let total = to_check.len();
    let parallel = hsm.token().sessions.max(1);
    let mut outcomes = Vec::new();
    let mut items = to_check.into_iter();
    // The token's speed, measured on the first version alone.
    let per_check = match items.next() {
        None => Duration::ZERO,
        Some(first) => {
            let t = Instant::now();
            outcomes.push(check_chunk(hsm, vec![first], None).await);
            t.elapsed().max(Duration::from_millis(1))
        }
    };
    let rest: Vec<_> = items.collect();
    let rounds = u32::try_from(rest.len().div_ceil(parallel)).unwrap_or(u32::MAX);
    let ceiling = hsm.startup_check_budget().max(CHECK_BUDGET_MIN);
    let budget = per_check
        .saturating_mul(rounds)
        .saturating_mul(2)
        .clamp(CHECK_BUDGET_MIN, ceiling);
    let deadline = Instant::now() + budget;
    // Each call at most a quarter of the call timeout, at the measured speed.
    let fits = (hsm.call_timeout().as_micros() / 4 / per_check.as_micros().max(1)) as usize;
    let chunk = rest
        .len()
        .div_ceil(parallel * 4)
        .clamp(1, 64)
        .min(fits.max(1));
    let mut chunks = Vec::new();
    let mut it = rest.into_iter().peekable();
    while it.peek().is_some() {
        chunks.push(it.by_ref().take(chunk).collect::<Vec<_>>());
    }
    let rest: Vec<Checked> = stream::iter(chunks)
        .map(|c| check_chunk(hsm, c, Some(deadline)))
        .buffer_unordered(parallel)
        .collect()
        .await;
    outcomes.extend(rest);
    let mut deferred = Vec::new();
    for o in outcomes {
        match o {
            Checked::Verdicts(v) => {
                for (id, verdict) in v {
                    if let Some(why) = verdict {
                        bad.insert(id, why);
                    }
                }
            }
            Checked::Deferred(ids) => deferred.extend(ids),
        }
    }
    report.canaries_ms = started.elapsed().as_millis() as u64;
    report.canaries_deferred = deferred.len();
    let (per_check_ms, budget_ms) = (per_check.as_millis() as u64, budget.as_millis() as u64);
    if deferred.is_empty() {
        tracing::info!(
            versions = total,
            per_check_ms,
            budget_ms,
            "start-up identity checks: every version proven"
        );
    } else {
        tracing::warn!(
            versions = total,
            not_yet_proven = deferred.len(),
            per_check_ms,
            budget_ms,
            "start-up identity checks: not every version could be proven within the start-up \
             budget (a slow token or an HSM fault, not a failed check); serving the proven ones, \
             the rest are proven in the background and before their first use"
        );
    }
    deferred
}

/// Checks one chunk's canaries, unless `deadline` has passed. An HSM fault is no verdict: the
/// chunk's versions are deferred.
async fn check_chunk(
    hsm: &Hsm,
    chunk: Vec<(VersionId, crate::hsm::Canary)>,
    deadline: Option<Instant>,
) -> Checked {
    let ids = || chunk.iter().map(|c| c.0).collect::<Vec<_>>();
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Checked::Deferred(ids());
    }
    let deferred = ids();
    match hsm.check_canaries(chunk).await {
        Ok(v) => Checked::Verdicts(v),
        Err(e) => {
            tracing::warn!(versions = deferred.len(), error = %e,
                "a start-up identity check could not run (an HSM fault, not a failed check): proven later");
            Checked::Deferred(deferred)
        }
    }
}

type Cache = (
    BTreeMap<KeyName, Arc<KeyEntry>>,
    HashMap<VersionId, (KeyName, u32)>,
    HashMap<VersionId, Arc<Usage>>,
);

/// Step 4: the in-memory cache. A key with any version in `bad` is quarantined (its handles
/// forgotten, every operation refused) and reported.
fn cache(
    hsm: &Hsm,
    stored: Vec<StoredKey>,
    bad: &HashMap<VersionId, String>,
    report: &mut LoadReport,
) -> Cache {
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
        keys.insert(k.name.clone(), Arc::new(entry_from_stored(&k, state)));
    }
    report.keys = keys.len();
    (keys, versions, usage)
}
