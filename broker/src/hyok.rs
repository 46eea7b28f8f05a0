//! The HYOK kill switch: the key owner cuts the provider's service identities off (and back
//! on). The state is written durably to the store *before* it takes effect in memory and before
//! the RPC returns, so it survives restarts; requests check it before and after their HSM call,
//! so from the moment `Disconnect` returns no wrap or unwrap result reaches a service identity.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use serde::{Deserialize, Serialize};

use crate::{error::BrokerError, model::now_ms, store::Store};

/// The store setting holding the state.
pub const SETTING: &str = "hyok.state";

/// The switch's state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HyokState {
    /// Whether service identities may use keys.
    pub connected: bool,
    /// When it last changed (ms).
    pub changed_at_ms: i64,
    /// Who changed it.
    pub changed_by: String,
    /// Why.
    pub reason: String,
}

impl Default for HyokState {
    fn default() -> Self {
        Self {
            connected: true,
            changed_at_ms: 0,
            changed_by: String::new(),
            reason: String::new(),
        }
    }
}

/// The switch.
pub struct HyokSwitch {
    connected: AtomicBool,
    state: Mutex<HyokState>,
    store: Arc<Store>,
}

impl HyokSwitch {
    /// Loads the persisted state (connected if never set).
    pub async fn load(store: Arc<Store>) -> Result<Self, BrokerError> {
        let st = store.clone();
        let raw = tokio::task::spawn_blocking(move || st.setting(SETTING))
            .await
            .map_err(|e| BrokerError::internal(e.to_string()))??;
        let state = match raw {
            Some(s) => serde_json::from_str(&s).map_err(|e| {
                BrokerError::internal(format!("stored HYOK state is malformed: {e}"))
            })?,
            None => HyokState::default(),
        };
        if !state.connected {
            tracing::warn!(by = %state.changed_by, reason = %state.reason, "HYOK service identities are DISCONNECTED");
        }
        Ok(Self {
            connected: AtomicBool::new(state.connected),
            state: Mutex::new(state),
            store,
        })
    }

    /// Whether service identities may use keys now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// The current state.
    pub fn state(&self) -> HyokState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes a state another replica stored (called when the shared store reports the change).
    pub fn apply_stored(&self, text: &str) {
        match serde_json::from_str::<HyokState>(text) {
            Ok(state) => {
                if state.connected != self.connected() {
                    tracing::warn!(connected = state.connected, by = %state.changed_by, reason = %state.reason,
                        "HYOK kill switch changed through another replica");
                }
                let connected = state.connected;
                *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
                self.connected.store(connected, Ordering::SeqCst);
            }
            // Fail closed: a state this replica cannot read cuts service identities off.
            Err(e) => {
                tracing::error!(error = %e, "stored HYOK state is malformed; service identities disconnected");
                self.connected.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Sets the switch: persisted first, then in effect.
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
        let text = serde_json::to_string(&new).map_err(|e| BrokerError::internal(e.to_string()))?;
        let st = self.store.clone();
        tokio::task::spawn_blocking(move || st.set_setting(SETTING, &text))
            .await
            .map_err(|e| BrokerError::internal(e.to_string()))??;
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = new.clone();
        self.connected.store(connected, Ordering::SeqCst);
        Ok(new)
    }
}
