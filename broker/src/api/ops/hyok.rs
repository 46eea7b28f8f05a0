//! The HYOK kill switch: the key owner cuts the provider's service identities off, and back on.

use super::{Operation, sealed::Sealed};
use crate::{
    api::call::Call,
    error::{BrokerError, Invalid},
    hyok::HyokState,
    policy::Permission,
};

/// `Disconnect` (`connected: false`) or `Reconnect` (`connected: true`).
pub struct SetSwitch {
    /// The new position.
    pub connected: bool,
    /// Why (kept in the switch's state and the audit trail).
    pub reason: String,
}

/// `GetState`.
pub struct GetSwitch;

impl Sealed for SetSwitch {}
impl Operation for SetSwitch {
    type Output = HyokState;

    async fn run(self, call: &mut Call) -> Result<HyokState, BrokerError> {
        call.authorize_global(Permission::HyokControl)?;
        if self.reason.chars().count() > 256 || self.reason.chars().any(|c| c.is_control()) {
            return Err(Invalid::Text {
                what: "reason",
                max: 256,
            }
            .into());
        }
        let by = call.caller_id().to_string();
        call.intent().await?;
        let s = call.hyok().set(self.connected, &by, &self.reason).await?;
        tracing::warn!(connected = self.connected, by, reason = %self.reason, "HYOK service access switched");
        Ok(s)
    }
}

impl Sealed for GetSwitch {}
impl Operation for GetSwitch {
    type Output = HyokState;

    async fn run(self, call: &mut Call) -> Result<HyokState, BrokerError> {
        call.authorize_global(Permission::HyokControl)?;
        Ok(call.hyok().state())
    }
}
