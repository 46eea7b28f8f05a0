//! Refused requests, rate-limited per caller. Every request is audited, and a refused one
//! (denied, or invalid) costs an audit record like any other: without a limit, any identity the
//! policy knows could write records as fast as it can send requests, and since the audit trail
//! fails closed, a full volume is an outage. Each caller has a token bucket of refusals
//! (`[server] refused_burst`, refilled at `refused_per_second`): while it is empty, that
//! caller's requests are answered RESOURCE_EXHAUSTED without running — nothing is read or
//! changed — and are counted instead of audited one by one; the count goes into one
//! `RefusedRequestsSuppressed` record when the caller is admitted again, and at most every
//! [`REPORT_EVERY`] while it is not.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// How often a caller's suppressed requests are reported while it stays suppressed.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Callers tracked before idle ones (a full bucket, nothing to report) are forgotten.
const MAX_TRACKED: usize = 10_000;

/// The per-caller refusal budget.
pub struct RefusalLimiter {
    per_second: f64,
    burst: f64,
    callers: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    suppressed: u64,
    reported_at: Instant,
}

/// Whether a request may run, and a count of this caller's suppressed requests to report now.
#[derive(Debug, PartialEq, Eq)]
pub struct Admission {
    /// Run it (false: answer RESOURCE_EXHAUSTED).
    pub admitted: bool,
    /// Requests suppressed since the last report, to write into the audit trail now.
    pub report: Option<u64>,
}

impl RefusalLimiter {
    /// A limiter with `burst` refusals in hand, refilled at `per_second`; `None` when
    /// `per_second` is 0 (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            callers: Mutex::new(HashMap::new()),
        })
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + dt * self.per_second).min(self.burst);
        b.at = now;
    }

    /// Whether `caller` may make a request now.
    pub fn admit(&self, caller: &str, now: Instant) -> Admission {
        let mut m = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(b) = m.get_mut(caller) else {
            return Admission {
                admitted: true,
                report: None,
            };
        };
        self.refill(b, now);
        if b.tokens >= 1.0 {
            let report = (b.suppressed > 0).then(|| std::mem::take(&mut b.suppressed));
            if report.is_some() {
                b.reported_at = now;
            }
            return Admission {
                admitted: true,
                report,
            };
        }
        b.suppressed += 1;
        let report = (now.saturating_duration_since(b.reported_at) >= REPORT_EVERY)
            .then(|| std::mem::take(&mut b.suppressed));
        if report.is_some() {
            b.reported_at = now;
        }
        Admission {
            admitted: false,
            report,
        }
    }

    /// Takes one refusal from `caller`'s budget (its request was denied or invalid).
    pub fn refused(&self, caller: &str, now: Instant) {
        let mut m = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_TRACKED && !m.contains_key(caller) {
            let (per_second, burst) = (self.per_second, self.burst);
            m.retain(|_, b| {
                let dt = now.saturating_duration_since(b.at).as_secs_f64();
                b.suppressed > 0 || b.tokens + dt * per_second < burst
            });
        }
        let burst = self.burst;
        let b = m.entry(caller.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
            suppressed: 0,
            reported_at: now,
        });
        self.refill(b, now);
        b.tokens = (b.tokens - 1.0).max(-burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_past_its_refusal_budget_is_held_off_then_reported_and_let_back() {
        let l = RefusalLimiter::new(2, 3).expect("on");
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.admit("mallory", t0).admitted);
            l.refused("mallory", t0);
        }
        // The budget is spent: held off, counted; another caller is not affected.
        for _ in 0..5 {
            assert_eq!(
                l.admit("mallory", t0),
                Admission {
                    admitted: false,
                    report: None
                }
            );
        }
        assert!(l.admit("alice", t0).admitted);
        // In debt, a caller is let back once the debt is refilled, with its count reported.
        let slow = RefusalLimiter::new(1, 1).expect("on");
        slow.refused("m", t0);
        slow.refused("m", t0); // in debt: -1
        assert!(!slow.admit("m", t0).admitted);
        let later = t0 + REPORT_EVERY;
        // 10 s refill the debt and more: admitted, with the one suppressed request reported.
        assert_eq!(
            slow.admit("m", later),
            Admission {
                admitted: true,
                report: Some(1)
            }
        );
        // Refilled at 2/s: half a second later, one more request runs, with the five
        // suppressed ones reported once.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(
            l.admit("mallory", t1),
            Admission {
                admitted: true,
                report: Some(5)
            }
        );
        assert_eq!(l.admit("mallory", t1).report, None);
        assert!(RefusalLimiter::new(0, 10).is_none());
    }

    #[test]
    fn a_held_off_caller_is_reported_periodically() {
        let l = RefusalLimiter::new(1, 20).expect("on");
        let t0 = Instant::now();
        for _ in 0..60 {
            l.refused("m", t0); // deep in debt, capped at -20
        }
        assert!(!l.admit("m", t0).admitted);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(l.admit("m", at(5_000)).report, None);
        // 10 s on, still in debt (-10): held off, and the three suppressed so far reported.
        assert_eq!(
            l.admit("m", at(10_000)),
            Admission {
                admitted: false,
                report: Some(3)
            }
        );
        assert_eq!(l.admit("m", at(12_000)).report, None);
        // Debt repaid at 21 s: admitted, the one suppressed since reported.
        assert_eq!(
            l.admit("m", at(21_000)),
            Admission {
                admitted: true,
                report: Some(1)
            }
        );
    }
}
