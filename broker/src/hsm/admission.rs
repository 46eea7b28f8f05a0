//! Admission to the session pool: bounded queues, deadlines, and fairness between tenants.
//!
//! The HSM is the scarce resource: a pool of `slots` sessions. Every HSM call first takes a
//! [`Slot`] here; the call itself then runs on one of the pool's HSM threads.
//!
//! * **Hand-offs.** A call submitted as a [`Job`] ([`Admission::submit`]) waits in the queue
//!   itself, not as a parked task: the HSM thread that finishes a call takes the next
//!   queued job and runs it at once ([`Slot::finish`]), so under load a request costs one
//!   wake-up (its result) instead of three (a slot handed to a waiting task, the task starting
//!   a thread, the result coming back). [`Admission::acquire`] is the same queue for callers
//!   that want the slot itself.
//! * **HSM threads.** A job granted a free slot goes to the pool's own threads, at most one per
//!   session, started when first needed and kept: a thread that waits for work costs a
//!   condition-variable wake-up, where a `spawn_blocking` per job also allocated a task and
//!   went through the runtime's blocking pool. As many threads as sessions always suffice:
//!   every running job holds a slot.
//!
//! * **Bounded queues.** At most `queue_limit` requests wait in all, at most
//!   `tenant_queue_limit` per tenant; past that a request is refused at once. Waiters hold only
//!   a small record, so memory stays flat under a burst: the excess is answered, not parked.
//! * **Refuse early, not late.** Before queueing, the wait is estimated from the queue ahead
//!   and the measured service time (an exponential moving average of how long a slot is held;
//!   when every slot is busy, at least the age of the youngest call in flight, so a hung HSM
//!   raises the estimate by itself). If the estimate exceeds the request's remaining deadline or
//!   the configured bound (`session_wait_ms`), the request is refused at once — callers get
//!   RESOURCE_EXHAUSTED promptly instead of a pile of timeouts. The wait itself is also capped
//!   by both, as a backstop.
//! * **Fairness.** Each tenant has its own FIFO queue, and a freed slot goes to the tenants in
//!   round-robin order, so a tenant with a thousand queued requests delays another tenant's
//!   request by at most one turn per tenant. The scheme is work-conserving (one busy tenant may
//!   use every session while nobody else waits); `tenant_max_slots` additionally caps how many
//!   sessions one tenant may hold at once, if an operator wants a hard share.
//!
//! Which request, and which tenant, a call belongs to travels in a task-local
//! [`RequestScope`] set by the service layer (so the keyring's signatures need not carry it).
//! HSM work the broker does for itself (start-up, maintenance, audit checkpoints, recovery)
//! runs without a scope, in the [`SYSTEM_TENANT`] queue, bounded by the configured wait.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

/// The queue of HSM work the broker does for itself.
pub const SYSTEM_TENANT: &str = "";

/// How the pool admits work.
#[derive(Clone, Debug)]
pub struct AdmissionSettings {
    /// Sessions in the pool.
    pub slots: usize,
    /// The longest a request may wait for a session (also when its deadline is later).
    pub max_wait: Duration,
    /// Most requests waiting, all tenants together.
    pub queue_limit: usize,
    /// Most requests waiting per tenant.
    pub tenant_queue_limit: usize,
    /// Most sessions one tenant may hold at once.
    pub tenant_max_slots: usize,
}

/// Why a request was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Too many requests are waiting in all.
    QueueFull,
    /// Too many requests of this tenant are waiting.
    TenantQueueFull,
    /// The estimated wait is longer than the request may wait.
    WouldWait {
        /// The estimate.
        estimate: Duration,
        /// What the request could wait.
        allowed: Duration,
    },
    /// No session came free in time.
    TimedOut(Duration),
    /// The pool is shutting down.
    Closed,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::QueueFull => write!(f, "too many requests are waiting for an HSM session"),
            Refused::TenantQueueFull => {
                write!(
                    f,
                    "too many of this tenant's requests are waiting for an HSM session"
                )
            }
            Refused::WouldWait { estimate, allowed } => write!(
                f,
                "an HSM session would take about {} ms to come free; the request can wait {} ms",
                estimate.as_millis(),
                allowed.as_millis()
            ),
            Refused::TimedOut(d) => {
                write!(f, "no HSM session came free within {} ms", d.as_millis())
            }
            Refused::Closed => write!(f, "the HSM session pool is shutting down"),
        }
    }
}

/// The right to use one session. Dropping it frees the session for the next waiter.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    tenant: Arc<str>,
    id: u64,
    started: Instant,
    /// False for a slot that was never handed out (its accounting was undone by hand).
    armed: bool,
    /// False once the holder said it did no HSM work (its hold time is not a service sample).
    sample: std::cell::Cell<bool>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.admission.release(&self.tenant, self.id, self.held());
        }
    }
}

impl Slot {
    /// Says the slot was used for no HSM work (a job that found its request gone or its
    /// deadline passed), so its hold time does not lower the service-time estimate.
    pub fn unused(&self) {
        self.sample.set(false);
    }

    fn held(&self) -> Option<Duration> {
        self.sample.get().then(|| self.started.elapsed())
    }

    /// Frees the slot and, when the next turn belongs to a queued [`Job`], returns that job
    /// with its slot, to be run on the calling thread (no hand-off to another thread). Other
    /// waiters are served as on drop.
    pub fn finish(mut self) -> Option<(Job, Slot)> {
        self.armed = false;
        let admission = self.admission.clone();
        admission.release_and_take(&self.tenant, self.id, self.held(), true)
    }
}

/// HSM work queued in the admission queue itself, run with its slot by whichever HSM thread
/// frees a slot (or by an idle one). A job is always either run or dropped: dropping it
/// (shutdown, withdrawal) must be how its caller learns it will not run.
pub type Job = Box<dyn FnOnce(&Slot) + Send + 'static>;

/// A job waiting in the queue; withdrawn when dropped before it started.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    tenant: Arc<str>,
    id: u64,
    allowed: Duration,
}

impl Ticket {
    /// How long the job may wait for its turn (the request's budget and the configured bound).
    pub fn allowed(&self) -> Duration {
        self.allowed
    }

    /// Takes the job out of the queue. True if it was still waiting (it will never run); false
    /// if it has started or been dropped already.
    pub fn withdraw(&self) -> bool {
        self.admission.forget_waiter(&self.tenant, self.id)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.withdraw();
    }
}

/// Runs `job` with `slot`, then every job handed to this thread as slots free up.
pub fn run_chain(mut job: Job, mut slot: Slot) {
    loop {
        job(&slot);
        match slot.finish() {
            Some((next, next_slot)) => {
                job = next;
                slot = next_slot;
            }
            None => return,
        }
    }
}

thread_local! {
    /// Chains waiting to be started by an outer [`spawn_chain`] on this thread.
    static STARTING: std::cell::RefCell<Option<Vec<(Job, Slot)>>> =
        const { std::cell::RefCell::new(None) };
}

/// Ends a run of starts on this thread, also when a panic unwinds through it: what is still
/// pending is dropped (its callers see their channels close, the slots are freed), and the next
/// start on this thread begins afresh instead of parking its job in a list nobody empties.
struct Starting;

impl Drop for Starting {
    fn drop(&mut self) {
        let pending = STARTING.with(|s| s.borrow_mut().take());
        drop(pending);
    }
}

/// Starts a chain on one of the pool's HSM threads.
///
/// Never recursive: a start that no thread can take drops the job and its slot, and freeing
/// that slot may start the next queued job — when no thread can be started, every one of them.
/// A start requested while another is under way on this thread is queued for it instead, so the
/// stack stays flat however long the queue.
fn spawn_chain(job: Job, slot: Slot) {
    let first = STARTING.with(|s| match s.borrow_mut().as_mut() {
        Some(pending) => {
            pending.push((job, slot));
            None
        }
        None => Some((job, slot)),
    });
    let Some(mut next) = first else {
        return;
    };
    STARTING.with(|s| *s.borrow_mut() = Some(Vec::new()));
    let _starting = Starting;
    loop {
        start_chain(next.0, next.1);
        match STARTING.with(|s| s.borrow_mut().as_mut().and_then(Vec::pop)) {
            Some(n) => next = n,
            None => break,
        }
    }
}

/// Hands a chain to the pool's HSM threads. Jobs no thread will ever run (none could be
/// started) are dropped here: the caller sees its result channel close, the slot is freed.
fn start_chain(job: Job, slot: Slot) {
    let runners = slot.admission.runners.clone();
    let stranded = runners.push(job, slot);
    // Dropped with [`spawn_chain`]'s guard up: freeing their slots starts nothing recursively.
    drop(stranded);
}

/// A chain waiting for an HSM thread, with the runtime it was started from (entered while it
/// runs, as a blocking thread of that runtime would be).
struct Chain {
    job: Job,
    slot: Slot,
    rt: Option<tokio::runtime::Handle>,
}

/// The pool's HSM threads and the chains waiting for one (see the module docs).
struct Runners {
    queue: Mutex<RunQueue>,
    ready: Condvar,
    /// At most this many threads (the pool's sessions).
    max: usize,
}

#[derive(Default)]
struct RunQueue {
    chains: VecDeque<Chain>,
    /// Threads started and not yet ended.
    threads: usize,
    /// Threads waiting on `ready`.
    idle: usize,
    /// Of those, how many were signalled and have not yet woken.
    signalled: usize,
    stopped: bool,
}

impl Runners {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(RunQueue::default()),
            ready: Condvar::new(),
            max,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunQueue> {
        // Held only to move a chain in or out, never while one runs.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a chain and wakes an idle thread for it, or starts one. Returns the chains that no
    /// thread may ever run (a thread could not be started), to be dropped.
    fn push(self: &Arc<Self>, job: Job, slot: Slot) -> Vec<Chain> {
        let rt = tokio::runtime::Handle::try_current().ok();
        let mut q = self.lock();
        q.chains.push_back(Chain { job, slot, rt });
        if q.idle > q.signalled {
            q.signalled += 1;
            drop(q);
            self.ready.notify_one();
            return Vec::new();
        }
        if q.threads >= self.max {
            // Every running chain holds a slot and so does this one: a thread is on its way
            // back for it.
            return Vec::new();
        }
        q.threads += 1;
        drop(q);
        let runners = self.clone();
        let spawned = std::thread::Builder::new()
            .name("keybroker-hsm".into())
            .spawn(move || runners.serve());
        match spawned {
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::error!(error = %e, "could not start a thread for HSM work");
                let mut q = self.lock();
                q.threads -= 1;
                // The other threads may all be held by calls that never return: a chain no
                // woken thread is coming for may wait for ever. Dropped, as a job whose thread
                // could not start always was.
                let keep = q.signalled.min(q.chains.len());
                q.chains.drain(keep..).collect()
            }
        }
    }

    /// An HSM thread: runs chains until the pool is dropped.
    fn serve(&self) {
        // Counted out however the thread ends (a panic outside a job's included), so that the
        // next push starts another one.
        let _leaving = Leaving(self);
        loop {
            let next = {
                let mut q = self.lock();
                loop {
                    if let Some(chain) = q.chains.pop_front() {
                        break Some(chain);
                    }
                    if q.stopped {
                        break None;
                    }
                    q.idle += 1;
                    q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
                    q.idle -= 1;
                    q.signalled = q.signalled.saturating_sub(1);
                }
            };
            let Some(Chain { job, slot, rt }) = next else {
                return;
            };
            let _rt = rt.as_ref().map(tokio::runtime::Handle::enter);
            // A job that panics frees its slot while unwinding (the next queued job starts);
            // the thread stays.
            let ran =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_chain(job, slot)));
            if ran.is_err() {
                tracing::error!("HSM work panicked; its request gets no answer from it");
            }
        }
    }

    /// Lets every thread end once it has nothing left to run.
    fn stop(&self) {
        self.lock().stopped = true;
        self.ready.notify_all();
    }
}

/// Counts an HSM thread out when it ends.
struct Leaving<'a>(&'a Runners);

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.threads = q.threads.saturating_sub(1);
    }
}

enum Handoff {
    /// A task waiting for the slot itself ([`Admission::acquire`]).
    Wake(oneshot::Sender<Slot>),
    /// Work to run with the slot ([`Admission::submit`]).
    Run(Job),
}

struct Waiter {
    id: u64,
    handoff: Handoff,
}

#[derive(Default)]
struct State {
    free: usize,
    in_use: HashMap<Arc<str>, usize>,
    queues: HashMap<Arc<str>, VecDeque<Waiter>>,
    /// Tenants with waiters, in the order they get their next turn.
    order: VecDeque<Arc<str>>,
    waiting: usize,
    next_id: u64,
    /// Slot id → when it was handed out.
    in_flight: HashMap<u64, Instant>,
    /// Mean slot hold time (exponential moving average), µs.
    service_us: f64,
    closed: bool,
}

/// The admission controller of one session pool.
pub struct Admission {
    settings: AdmissionSettings,
    state: Mutex<State>,
    runners: Arc<Runners>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("settings", &self.settings)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        // No chain is queued or running: each would hold a slot, and so this pool.
        self.runners.stop();
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("free", &self.free)
            .field("waiting", &self.waiting)
            .finish_non_exhaustive()
    }
}

/// How busy the pool is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Sessions in the pool.
    pub size: usize,
    /// Sessions held by a call.
    pub in_use: usize,
    /// Requests waiting for a session.
    pub waiting: usize,
}

impl Admission {
    /// A controller for `settings.slots` sessions.
    pub fn new(mut settings: AdmissionSettings) -> Arc<Self> {
        settings.slots = settings.slots.max(1);
        settings.tenant_max_slots = settings.tenant_max_slots.clamp(1, settings.slots);
        let state = State {
            free: settings.slots,
            ..Default::default()
        };
        Arc::new(Self {
            runners: Runners::new(settings.slots),
            settings,
            state: Mutex::new(state),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &AdmissionSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A std mutex: held only for bookkeeping, never across an await or an HSM call.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How busy the pool is now.
    pub fn stats(&self) -> PoolStats {
        let st = self.lock();
        PoolStats {
            size: self.settings.slots,
            in_use: self.settings.slots.saturating_sub(st.free),
            waiting: st.waiting,
        }
    }

    /// Waits for a slot for `tenant`, at most `budget` (the request's remaining deadline) and at
    /// most the configured bound. Refuses at once when the queues are full or the estimated wait
    /// is longer than that.
    pub async fn acquire(
        self: &Arc<Self>,
        tenant: &str,
        budget: Option<Duration>,
    ) -> Result<Slot, Refused> {
        let (tx, mut rx) = oneshot::channel();
        let (id, allowed) = match self.admit(tenant, budget, Handoff::Wake(tx))? {
            Admit::Now(slot, _) => return Ok(slot),
            Admit::Queued { id, allowed } => (id, allowed),
        };
        match tokio::time::timeout(allowed, &mut rx).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_)) => Err(Refused::Closed),
            Err(_) => {
                self.forget_waiter(tenant, id);
                // A slot may have been handed over between the timeout and the removal.
                match rx.try_recv() {
                    Ok(slot) => Ok(slot),
                    Err(_) => Err(Refused::TimedOut(allowed)),
                }
            }
        }
    }

    /// Queues `job` for `tenant` under the same rules as [`Admission::acquire`]. With a slot
    /// free, the job starts at once on an HSM thread and `None` is returned; otherwise it
    /// waits in the queue and the [`Ticket`] withdraws it (see [`Ticket::allowed`] for how long
    /// the caller should let it wait; withdrawing it is the caller's job, as is a deadline check
    /// inside the job). A job refused here is dropped without running.
    pub fn submit(
        self: &Arc<Self>,
        tenant: &str,
        budget: Option<Duration>,
        job: Job,
    ) -> Result<Option<Ticket>, Refused> {
        match self.admit(tenant, budget, Handoff::Run(job))? {
            Admit::Now(slot, Handoff::Run(job)) => {
                spawn_chain(job, slot);
                Ok(None)
            }
            Admit::Now(_, Handoff::Wake(_)) => Err(Refused::Closed),
            Admit::Queued { id, allowed } => Ok(Some(Ticket {
                admission: self.clone(),
                tenant: Arc::from(tenant),
                id,
                allowed,
            })),
        }
    }

    /// Grants a slot at once, queues `handoff`, or refuses.
    fn admit(
        self: &Arc<Self>,
        tenant: &str,
        budget: Option<Duration>,
        handoff: Handoff,
    ) -> Result<Admit, Refused> {
        let allowed = budget.map_or(self.settings.max_wait, |b| b.min(self.settings.max_wait));
        let mut st = self.lock();
        if st.closed {
            return Err(Refused::Closed);
        }
        let tenant_in_use = st.in_use.get(tenant).copied().unwrap_or(0);
        let queued = st.queues.get(tenant).map_or(0, VecDeque::len);
        if st.free > 0 && queued == 0 && tenant_in_use < self.settings.tenant_max_slots {
            return Ok(Admit::Now(self.grant(&mut st, Arc::from(tenant)), handoff));
        }
        if st.waiting >= self.settings.queue_limit {
            return Err(Refused::QueueFull);
        }
        if queued >= self.settings.tenant_queue_limit {
            return Err(Refused::TenantQueueFull);
        }
        let estimate = self.estimate(&st, queued);
        if estimate > allowed {
            return Err(Refused::WouldWait { estimate, allowed });
        }
        st.next_id += 1;
        let id = st.next_id;
        let key: Arc<str> = Arc::from(tenant);
        let q = st.queues.entry(key.clone()).or_default();
        q.push_back(Waiter { id, handoff });
        if q.len() == 1 {
            st.order.push_back(key);
        }
        st.waiting += 1;
        Ok(Admit::Queued { id, allowed })
    }

    /// Whether [`Admission::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Refuses every waiter and every later request (shutdown).
    pub fn close(&self) {
        let queues = {
            let mut st = self.lock();
            st.closed = true;
            st.order.clear();
            st.waiting = 0;
            std::mem::take(&mut st.queues)
        };
        // Dropped outside the lock: a job's captures are arbitrary.
        drop(queues);
    }

    fn grant(self: &Arc<Self>, st: &mut State, tenant: Arc<str>) -> Slot {
        st.free -= 1;
        *st.in_use.entry(tenant.clone()).or_default() += 1;
        st.next_id += 1;
        let id = st.next_id;
        let started = Instant::now();
        st.in_flight.insert(id, started);
        Slot {
            admission: self.clone(),
            tenant,
            id,
            started,
            armed: true,
            sample: std::cell::Cell::new(true),
        }
    }

    /// Undoes [`Admission::grant`] for a slot that could not be handed over.
    fn ungrant(st: &mut State, mut slot: Slot) {
        slot.armed = false;
        st.free += 1;
        st.in_flight.remove(&slot.id);
        if let Some(n) = st.in_use.get_mut(&slot.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.in_use.remove(&slot.tenant);
            }
        }
    }

    /// The expected wait of a new request of a tenant that has `queued` requests waiting.
    fn estimate(&self, st: &State, queued: usize) -> Duration {
        // Round-robin: our request is served after `queued` more turns of ours, and each turn
        // goes once around every tenant that has waiters.
        let tenants = st.order.len() + usize::from(queued == 0);
        let turns_ahead = (queued + 1) * tenants.max(1);
        let rounds = turns_ahead.div_ceil(self.settings.slots);
        let mut service = Duration::from_micros(st.service_us as u64);
        if st.free == 0
            && let Some(youngest) = st.in_flight.values().max()
        {
            service = service.max(youngest.elapsed());
        }
        service.saturating_mul(u32::try_from(rounds).unwrap_or(u32::MAX))
    }

    /// Takes waiter `id` out of `tenant`'s queue; true if it was there.
    fn forget_waiter(&self, tenant: &str, id: u64) -> bool {
        let mut st = self.lock();
        let mut removed = None;
        let mut now_empty = false;
        if let Some(q) = st.queues.get_mut(tenant) {
            if let Some(pos) = q.iter().position(|w| w.id == id) {
                removed = q.remove(pos);
            }
            now_empty = q.is_empty();
        }
        if removed.is_some() {
            st.waiting = st.waiting.saturating_sub(1);
        }
        if now_empty {
            st.queues.remove(tenant);
            st.order.retain(|t| &**t != tenant);
        }
        drop(st);
        // Dropped outside the lock.
        removed.is_some()
    }

    fn release(self: &Arc<Self>, tenant: &Arc<str>, id: u64, held: Option<Duration>) {
        if let Some((job, slot)) = self.release_and_take(tenant, id, held, false) {
            spawn_chain(job, slot);
        }
    }

    /// Frees a slot and serves the waiters. With `take`, one job handed a slot is returned for
    /// the calling thread to run; every other job starts on another HSM thread.
    fn release_and_take(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        id: u64,
        held: Option<Duration>,
        take: bool,
    ) -> Option<(Job, Slot)> {
        let mut st = self.lock();
        st.in_flight.remove(&id);
        if let Some(held) = held {
            let us = held.as_micros() as f64;
            st.service_us = if st.service_us == 0.0 {
                us
            } else {
                0.8 * st.service_us + 0.2 * us
            };
        }
        if let Some(n) = st.in_use.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.in_use.remove(tenant);
            }
        }
        st.free += 1;
        let mut ready = self.dispatch(&mut st);
        drop(st);
        let taken = if take { ready.pop() } else { None };
        for (job, slot) in ready {
            spawn_chain(job, slot);
        }
        taken
    }

    /// Hands free slots to waiters, one tenant at a time in round-robin order. Waiting tasks
    /// are woken; jobs are returned with their slots, to be run once the lock is released.
    fn dispatch(self: &Arc<Self>, st: &mut State) -> Vec<(Job, Slot)> {
        let mut ready = Vec::new();
        while st.free > 0 && !st.order.is_empty() {
            let mut handed = false;
            for _ in 0..st.order.len() {
                let Some(tenant) = st.order.pop_front() else {
                    break;
                };
                let capped =
                    st.in_use.get(&tenant).copied().unwrap_or(0) >= self.settings.tenant_max_slots;
                if capped {
                    st.order.push_back(tenant);
                    continue;
                }
                let Some(waiter) = st.queues.get_mut(&tenant).and_then(VecDeque::pop_front) else {
                    st.queues.remove(&tenant);
                    continue;
                };
                st.waiting = st.waiting.saturating_sub(1);
                let slot = self.grant(st, tenant.clone());
                match waiter.handoff {
                    Handoff::Wake(tx) => {
                        if let Err(slot) = tx.send(slot) {
                            // The waiter gave up (its request ended): undo, try the next one.
                            Self::ungrant(st, slot);
                        } else {
                            handed = true;
                        }
                    }
                    Handoff::Run(job) => {
                        ready.push((job, slot));
                        handed = true;
                    }
                }
                if st.queues.get(&tenant).is_some_and(|q| !q.is_empty()) {
                    st.order.push_back(tenant);
                } else {
                    st.queues.remove(&tenant);
                }
                if handed {
                    break;
                }
            }
            if !handed
                && st.order.iter().all(|t| {
                    st.in_use.get(t).copied().unwrap_or(0) >= self.settings.tenant_max_slots
                })
            {
                break;
            }
        }
        ready
    }
}

/// What [`Admission::admit`] decided.
enum Admit {
    /// A slot was free: the handoff comes back unused.
    Now(Slot, Handoff),
    /// Queued as waiter `id`, allowed to wait `allowed`.
    Queued { id: u64, allowed: Duration },
}

/// The request an HSM call is made for: its deadline and its tenant. Set by the service layer
/// around each request (a task-local, see the module docs).
#[derive(Clone, Debug, Default)]
pub struct RequestScope {
    deadline: Option<Instant>,
    tenant: Arc<Mutex<Option<Arc<str>>>>,
    /// The request id (sent on as an external key's remote `request_context.request_id`).
    request_id: Option<Arc<str>>,
    /// Structured detail for the request's audit record (an external key's remote calls).
    detail: Arc<Mutex<serde_json::Map<String, serde_json::Value>>>,
}

tokio::task_local! {
    static SCOPE: RequestScope;
}

impl RequestScope {
    /// A scope with a deadline (`None`: bounded only by the pool's configured wait).
    pub fn new(deadline: Option<Instant>) -> Self {
        Self {
            deadline,
            tenant: Arc::default(),
            request_id: None,
            detail: Arc::default(),
        }
    }

    /// The same scope for the request `id`.
    pub fn with_request_id(mut self, id: &str) -> Self {
        self.request_id = Some(Arc::from(id));
        self
    }

    /// The current task's request id, if it runs in a scope that has one.
    pub fn current_request_id() -> Option<String> {
        SCOPE
            .try_with(|s| s.request_id.as_deref().map(str::to_string))
            .ok()
            .flatten()
    }

    /// Adds `value` under `name` to the current request's audit detail (no-op outside a
    /// request). A later value under the same name replaces the earlier one.
    pub fn note_detail(name: &str, value: serde_json::Value) {
        let _ = SCOPE.try_with(|s| {
            s.detail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.to_string(), value);
        });
    }

    /// Appends `values` to the array noted as `name` (a new one if none, or if `name` held
    /// something else): for notes one request makes in several steps.
    pub fn append_detail(name: &str, values: Vec<serde_json::Value>) {
        let _ = SCOPE.try_with(|s| {
            let mut d = s.detail.lock().unwrap_or_else(|p| p.into_inner());
            match d.get_mut(name) {
                Some(serde_json::Value::Array(a)) => a.extend(values),
                _ => {
                    d.insert(name.to_string(), serde_json::Value::Array(values));
                }
            }
        });
    }

    /// The audit detail noted so far (`None`: nothing).
    pub fn take_detail(&self) -> Option<serde_json::Value> {
        let mut d = self.detail.lock().unwrap_or_else(|p| p.into_inner());
        (!d.is_empty()).then(|| serde_json::Value::Object(std::mem::take(&mut *d)))
    }

    /// The scope of the current task, if any.
    pub fn current() -> Option<Self> {
        SCOPE.try_with(Clone::clone).ok()
    }

    /// The deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The current task's deadline, if it runs in a scope that has one.
    pub fn current_deadline() -> Option<Instant> {
        SCOPE.try_with(|s| s.deadline).ok().flatten()
    }

    /// Records the tenant the request acts for (the first one named wins).
    pub fn set_tenant(&self, tenant: &str) {
        let mut t = self.tenant.lock().unwrap_or_else(|p| p.into_inner());
        if t.is_none() {
            *t = Some(Arc::from(tenant));
        }
    }

    /// The tenant, or [`SYSTEM_TENANT`]... for requests that named none, a shared queue.
    pub fn tenant(&self) -> Arc<str> {
        self.tenant
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| Arc::from("-"))
    }

    /// Runs `f` in this scope.
    pub async fn run<F: std::future::Future>(self, f: F) -> F::Output {
        SCOPE.scope(self, f).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adm(slots: usize, queue: usize, per_tenant: usize, cap: usize) -> Arc<Admission> {
        Admission::new(AdmissionSettings {
            slots,
            max_wait: Duration::from_secs(5),
            queue_limit: queue,
            tenant_queue_limit: per_tenant,
            tenant_max_slots: cap,
        })
    }

    #[tokio::test]
    async fn full_queues_are_refused_at_once() {
        let a = adm(1, 2, 1, 1);
        let held = a.acquire("t1", None).await.expect("free slot");
        let a2 = a.clone();
        let w1 = tokio::spawn(async move { a2.acquire("t1", None).await.map(drop) });
        let a3 = a.clone();
        let w2 = tokio::spawn(async move { a3.acquire("t2", None).await.map(drop) });
        // Poll until both wait (observable state, no sleeps).
        for _ in 0..1000 {
            if a.stats().waiting == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(a.stats().waiting, 2);
        assert_eq!(
            a.acquire("t1", None).await.map(drop),
            Err(Refused::QueueFull)
        );
        drop(held);
        assert_eq!(w1.await.expect("join"), Ok(()));
        assert_eq!(w2.await.expect("join"), Ok(()));
        assert_eq!(a.stats().in_use, 0);
    }

    #[tokio::test]
    async fn a_tenant_queue_limit_leaves_room_for_others() {
        let a = adm(1, 10, 1, 1);
        let held = a.acquire("busy", None).await.expect("free slot");
        let a2 = a.clone();
        let w = tokio::spawn(async move { a2.acquire("busy", None).await.map(drop) });
        for _ in 0..1000 {
            if a.stats().waiting == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            a.acquire("busy", None).await.map(drop),
            Err(Refused::TenantQueueFull)
        );
        let a3 = a.clone();
        let other = tokio::spawn(async move { a3.acquire("quiet", None).await.map(drop) });
        for _ in 0..1000 {
            if a.stats().waiting == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(held);
        assert_eq!(w.await.expect("join"), Ok(()));
        assert_eq!(other.await.expect("join"), Ok(()));
    }

    #[test]
    fn freed_slots_go_round_robin_between_tenants() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let a = adm(1, 100, 100, 1);
            let first = a.acquire("a", None).await.expect("free");
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            // Tenant a queues four requests, then b queues two.
            for (t, n) in [("a", 4), ("b", 2)] {
                for i in 0..n {
                    let (a2, tx) = (a.clone(), tx.clone());
                    tokio::spawn(async move {
                        let slot = a2.acquire(t, None).await;
                        let _ = tx.send(format!("{t}{i}"));
                        drop(slot);
                    });
                    tokio::task::yield_now().await;
                }
            }
            assert_eq!(a.stats().waiting, 6);
            drop(first);
            let mut served = Vec::new();
            while served.len() < 6 {
                served.push(rx.recv().await.expect("served"));
            }
            // b's first request is served after a's first, not after all four of a's.
            assert_eq!(served, ["a0", "b0", "a1", "b1", "a2", "a3"]);
        });
    }

    #[tokio::test]
    async fn a_tenant_cap_holds_back_a_tenant_with_free_sessions_left() {
        let a = adm(3, 10, 10, 2);
        let s1 = a.acquire("a", None).await.expect("1");
        let s2 = a.acquire("a", None).await.expect("2");
        let a2 = a.clone();
        let third = tokio::spawn(async move {
            a2.acquire("a", Some(Duration::from_secs(5)))
                .await
                .map(drop)
        });
        for _ in 0..1000 {
            if a.stats().waiting == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(a.stats().in_use, 2, "a is capped at 2 of 3 sessions");
        let b = a
            .acquire("b", None)
            .await
            .expect("b gets the third session");
        drop((s1, b));
        assert_eq!(third.await.expect("join"), Ok(()));
        drop(s2);
    }

    #[tokio::test]
    async fn a_wait_longer_than_the_budget_is_refused_without_waiting() {
        let a = adm(1, 10, 10, 1);
        // Teach it a 200 ms service time.
        {
            let mut st = a.lock();
            st.service_us = 200_000.0;
        }
        let held = a.acquire("t", None).await.expect("free");
        let r = a.acquire("t", Some(Duration::from_millis(50))).await;
        assert!(matches!(r, Err(Refused::WouldWait { .. })), "{r:?}");
        assert_eq!(a.stats().waiting, 0, "nothing was queued");
        drop(held);
    }

    /// Waits (without sleeping blind) until `cond` holds.
    async fn until(mut cond: impl FnMut() -> bool) {
        for _ in 0..20_000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("condition never held");
    }

    /// A job that says when it runs; the receiver errs if it is dropped unrun.
    fn signalling_job() -> (Job, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |_| {
            let _ = tx.send(());
        });
        (job, rx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_jobs_run_on_the_thread_that_frees_the_slot() {
        let a = adm(1, 10, 10, 1);
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (ran_tx, mut ran_rx) = tokio::sync::mpsc::unbounded_channel();
        let first = ran_tx.clone();
        let started = a
            .submit(
                "t",
                None,
                Box::new(move |_| {
                    let _ = go_rx.recv();
                    let _ = first.send(("first", std::thread::current().id()));
                }),
            )
            .expect("admitted");
        assert!(started.is_none(), "a free slot starts the job at once");
        let mut tickets = Vec::new();
        for name in ["second", "third"] {
            let tx = ran_tx.clone();
            let t = a
                .submit(
                    "t",
                    None,
                    Box::new(move |_| {
                        let _ = tx.send((name, std::thread::current().id()));
                    }),
                )
                .expect("queued");
            tickets.push(t.expect("a ticket: the slot is busy"));
        }
        assert_eq!(a.stats().waiting, 2);
        go_tx.send(()).expect("go");
        let mut ran = Vec::new();
        for _ in 0..3 {
            ran.push(ran_rx.recv().await.expect("ran"));
        }
        let names: Vec<_> = ran.iter().map(|r| r.0).collect();
        assert_eq!(names, ["first", "second", "third"]);
        assert!(
            ran.iter().all(|r| r.1 == ran[0].1),
            "one thread ran all three: {ran:?}"
        );
        until(|| a.stats().in_use == 0).await;
        assert_eq!(a.stats().waiting, 0);
        // Tickets of jobs that ran withdraw nothing.
        assert!(!tickets[0].withdraw());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_on_the_pools_own_threads_at_most_one_per_session_and_kept() {
        let a = adm(2, 100, 100, 2);
        let runners = a.runners.clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tickets = Vec::new();
        let mut rounds = Vec::new();
        for _ in 0..3 {
            for _ in 0..20 {
                let tx = tx.clone();
                let job: Job = Box::new(move |_| {
                    let t = std::thread::current();
                    let rt = tokio::runtime::Handle::try_current().is_ok();
                    let _ = tx.send((t.id(), t.name().map(str::to_owned), rt));
                });
                tickets.push(a.submit("t", None, job).expect("admitted"));
            }
            let mut seen = Vec::new();
            for _ in 0..20 {
                seen.push(rx.recv().await.expect("ran"));
            }
            until(|| {
                let q = runners.lock();
                a.stats().in_use == 0 && q.idle == q.threads
            })
            .await;
            rounds.push(seen);
        }
        let all: Vec<_> = rounds.iter().flatten().collect();
        assert!(
            all.iter()
                .all(|(_, n, _)| n.as_deref() == Some("keybroker-hsm")),
            "never an async worker: {all:?}"
        );
        assert!(
            all.iter().all(|(_, _, rt)| *rt),
            "inside the runtime the work came from"
        );
        let ids: std::collections::HashSet<_> = all.iter().map(|(id, _, _)| *id).collect();
        assert!(ids.len() <= 2, "two sessions, two threads at most: {ids:?}");
        // Idle between rounds, the threads were kept (60 jobs, at most two threads ever).
        let threads = runners.lock().threads;
        assert!((1..=2).contains(&threads), "{threads} threads");
        // The pool gone, its threads end.
        drop(tickets);
        drop(a);
        until(|| Arc::strong_count(&runners) == 1).await;
        assert_eq!(runners.lock().threads, 0);
    }

    #[tokio::test]
    async fn a_withdrawn_or_dropped_ticket_never_runs_its_job() {
        let a = adm(1, 10, 10, 1);
        let held = a.acquire("t", None).await.expect("free");
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let job = |ran: &Arc<std::sync::atomic::AtomicUsize>| -> Job {
            let ran = ran.clone();
            Box::new(move |_| {
                ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        };
        let withdrawn = a
            .submit("t", None, job(&ran))
            .expect("queued")
            .expect("ticket");
        let dropped = a
            .submit("t", None, job(&ran))
            .expect("queued")
            .expect("ticket");
        let kept = a
            .submit("t", None, job(&ran))
            .expect("queued")
            .expect("ticket");
        assert_eq!(a.stats().waiting, 3);
        assert!(withdrawn.withdraw());
        assert!(!withdrawn.withdraw(), "only once");
        drop(dropped);
        assert_eq!(a.stats().waiting, 1);
        drop(held);
        until(|| ran.load(std::sync::atomic::Ordering::SeqCst) == 1).await;
        until(|| a.stats().in_use == 0).await;
        assert!(!kept.withdraw(), "it ran");
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_panicking_job_frees_its_slot_for_the_next() {
        let a = adm(1, 10, 10, 1);
        let held = a.acquire("t", None).await.expect("free");
        let _bad = a
            .submit("t", None, Box::new(|_| panic!("a job failed")))
            .expect("queued");
        let (job, rx) = signalling_job();
        let _good = a.submit("t", None, job).expect("queued");
        drop(held);
        rx.await.expect("the next job ran after the panic");
        until(|| a.stats().in_use == 0).await;
    }

    #[tokio::test]
    async fn a_slot_used_for_nothing_leaves_the_service_estimate_alone() {
        let a = adm(1, 10, 10, 1);
        a.lock().service_us = 200_000.0;
        let slot = a.acquire("t", None).await.expect("free");
        slot.unused();
        drop(slot);
        assert_eq!(a.lock().service_us, 200_000.0);
        let slot = a.acquire("t", None).await.expect("free");
        drop(slot);
        assert!(a.lock().service_us < 200_000.0, "a real hold is a sample");
    }

    #[tokio::test]
    async fn close_drops_queued_jobs() {
        let a = adm(1, 10, 10, 1);
        let held = a.acquire("t", None).await.expect("free");
        let (job, rx) = signalling_job();
        let ticket = a.submit("t", None, job).expect("queued");
        assert!(ticket.is_some());
        a.close();
        assert!(rx.await.is_err(), "dropped, never run");
        assert!(a.is_closed());
        assert!(matches!(
            a.submit("t", None, Box::new(|_| {})),
            Err(Refused::Closed)
        ));
        drop(held);
        assert_eq!(a.stats().in_use, 0);
    }

    #[tokio::test]
    async fn close_refuses_waiters_and_newcomers() {
        let a = adm(1, 10, 10, 1);
        let held = a.acquire("t", None).await.expect("free");
        let a2 = a.clone();
        let w = tokio::spawn(async move { a2.acquire("t", None).await.map(drop) });
        for _ in 0..1000 {
            if a.stats().waiting == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        a.close();
        assert_eq!(w.await.expect("join"), Err(Refused::Closed));
        assert_eq!(a.acquire("t", None).await.map(drop), Err(Refused::Closed));
        drop(held);
    }
}
