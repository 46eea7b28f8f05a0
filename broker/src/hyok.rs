//! The HYOK kill switch: the key owner cuts the provider's identities off (and back on). The
//! state is written durably to the store *before* it takes effect in memory and before the RPC
//! returns, so it survives restarts; requests check it before and after their HSM call, so from
//! the moment `Disconnect` returns no result reaches a provider identity.
//!
//! **The stored state is authenticated and the switch fails closed.** The store holds the state
//! with an HMAC-SHA256 made inside the HSM with the audit trail's key (the key that MACs the
//! audit checkpoints: sensitive, never extractable). A state whose MAC does not verify (edited,
//! forged, or written by a version of keybroker that did not MAC it) and a state that is missing
//! once the broker has started before both mean **disconnected**, with an alert in the log,
//! until the customer reconnects through the API: whoever can write the store cannot reconnect
//! the provider.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use serde::{Deserialize, Serialize};

use crate::{error::BrokerError, hsm::Hsm, model::now_ms, store::Store};

/// The store setting holding the state.
pub const SETTING: &str = "hyok.state";

/// What the MAC covers, before the state's JSON (a separate domain from audit checkpoints).
const MAC_CONTEXT: &[u8] = b"keybroker hyok state v1\n";

/// The switch's state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HyokState {
    /// Whether provider identities may use keys.
    pub connected: bool,
    /// When it last changed (ms).
    pub changed_at_ms: i64,
    /// Who changed it.
    pub changed_by: String,
    /// Why.
    pub reason: String,
}

impl HyokState {
    /// The state of a broker's first start: connected.
    fn initial() -> Self {
        Self {
            connected: true,
            changed_at_ms: now_ms(),
            changed_by: "keybroker".into(),
            reason: "first start".into(),
        }
    }

    /// What the switch falls back to when the stored state cannot be trusted (logged).
    fn failed_closed(why: &str) -> Self {
        tracing::error!(
            why,
            "HYOK switch state not trusted: provider identities DISCONNECTED until the customer reconnects (keybroker hyok reconnect)"
        );
        Self::closed(format!("failed closed: {why}"))
    }

    /// Disconnected, not logged: the state a switch holds while it is being loaded.
    fn closed(reason: String) -> Self {
        Self {
            connected: false,
            changed_at_ms: now_ms(),
            changed_by: "keybroker".into(),
            reason,
        }
    }
}

/// The state as stored: its JSON and the HSM's MAC over it.
#[derive(Serialize, Deserialize)]
struct Stored {
    state: HyokState,
    /// HMAC-SHA256 (hex) of `MAC_CONTEXT || state's JSON`.
    mac: String,
}

fn mac_input(state: &HyokState) -> Result<Vec<u8>, BrokerError> {
    let json = serde_json::to_vec(state).map_err(|e| BrokerError::internal(e.to_string()))?;
    Ok([MAC_CONTEXT, &json].concat())
}

/// The state a stored text says, if its MAC verifies; else why not.
async fn verify(hsm: &Hsm, text: &str) -> Result<Result<HyokState, String>, BrokerError> {
    let Ok(stored) = serde_json::from_str::<Stored>(text) else {
        return Ok(Err(
            "the stored state is malformed, or in a format without a MAC".into(),
        ));
    };
    let Ok(mac) = hex::decode(&stored.mac) else {
        return Ok(Err("the stored state's MAC is malformed".into()));
    };
    let ok = hsm
        .audit_verify(mac_input(&stored.state)?, mac)
        .await
        .map_err(BrokerError::from)?;
    Ok(if ok {
        Ok(stored.state)
    } else {
        Err("the stored state's MAC does not verify".into())
    })
}

/// The switch.
pub struct HyokSwitch {
    connected: AtomicBool,
    state: Mutex<HyokState>,
    store: Arc<Store>,
    hsm: Hsm,
}

impl HyokSwitch {
    /// Loads the stored state and verifies its MAC. On the broker's `first_start` (its audit
    /// key was just made) a missing state is written as connected; otherwise a missing or
    /// unverifiable one is disconnected (fail closed). Call it after the audit trail is open
    /// (its key MACs the state), under the store's write lock (replicas starting together agree
    /// on the first state).
    pub async fn load(store: Arc<Store>, hsm: Hsm, first_start: bool) -> Result<Self, BrokerError> {
        let st = store.clone();
        let raw = tokio::task::spawn_blocking(move || st.setting(SETTING))
            .await
            .map_err(|e| BrokerError::internal(e.to_string()))??;
        let me = Self {
            connected: AtomicBool::new(false),
            state: Mutex::new(HyokState::closed("not loaded yet".into())),
            store,
            hsm,
        };
        let state = match raw {
            None if first_start => {
                let s = HyokState::initial();
                me.persist(&s).await?;
                s
            }
            None => HyokState::failed_closed("the stored state is missing"),
            Some(text) => match verify(&me.hsm, &text).await? {
                Ok(s) => s,
                Err(why) => HyokState::failed_closed(&why),
            },
        };
        if !state.connected {
            tracing::warn!(by = %state.changed_by, reason = %state.reason, "HYOK provider identities are DISCONNECTED");
        }
        me.apply(state);
        Ok(me)
    }

    /// Whether provider identities may use keys now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// The current state.
    pub fn state(&self) -> HyokState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn apply(&self, state: HyokState) {
        let connected = state.connected;
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
        self.connected.store(connected, Ordering::SeqCst);
    }

    /// Takes a state another replica stored (called when the shared store reports the change).
    /// Verifying its MAC takes an HSM call: until it is verified the switch stays as it was,
    /// except that a "disconnected" takes effect at once (cutting off never waits for proof).
    pub fn apply_stored(self: &Arc<Self>, text: &str) {
        if serde_json::from_str::<Stored>(text).is_ok_and(|s| !s.state.connected) {
            self.connected.store(false, Ordering::SeqCst);
        }
        let (me, text) = (self.clone(), text.to_string());
        tokio::spawn(async move {
            let state = match verify(&me.hsm, &text).await {
                Ok(Ok(s)) => s,
                Ok(Err(why)) => HyokState::failed_closed(&why),
                Err(e) => {
                    HyokState::failed_closed(&format!("the state could not be verified: {e}"))
                }
            };
            if state.connected != me.connected() {
                tracing::warn!(connected = state.connected, by = %state.changed_by, reason = %state.reason,
                    "HYOK kill switch changed through another replica");
            }
            me.apply(state);
        });
    }

    /// Writes `state` with its MAC.
    async fn persist(&self, state: &HyokState) -> Result<(), BrokerError> {
        let mac = self
            .hsm
            .audit_mac(mac_input(state)?)
            .await
            .map_err(BrokerError::from)?;
        let text = serde_json::to_string(&Stored {
            state: state.clone(),
            mac: hex::encode(mac),
        })
        .map_err(|e| BrokerError::internal(e.to_string()))?;
        let st = self.store.clone();
        tokio::task::spawn_blocking(move || st.set_setting(SETTING, &text))
            .await
            .map_err(|e| BrokerError::internal(e.to_string()))??;
        Ok(())
    }

    /// Sets the switch: persisted (with its MAC) first, then in effect.
    pub async fn set(
        &self,
        connected: bool,
        by: &str,
        reason: &str,
    ) -> Result<HyokState, BrokerError> {
        let new = HyokState {
            connected,
            changed_at_ms: now_ms(),
            changed_by: by.into(),
            reason: reason.into(),
        };
        self.persist(&new).await?;
        self.apply(new.clone());
        Ok(new)
    }
}
