//! Random bytes from the HSM's RNG, for callers without a good local source.

use super::{Operation, sealed::Sealed};
use crate::{
    api::call::Call,
    error::{BrokerError, Denied, Invalid},
    hsm::RequestScope,
    model::Dek,
    policy::Permission,
};

/// The most bytes one request may ask for.
pub const MAX_RANDOM_BYTES: u32 = 4096;

/// `GetRandomBytes`: `count` bytes from `C_GenerateRandom`. The `random` permission with any
/// scope (no key is involved); audited with the count, never the bytes.
pub struct GetRandomBytes {
    /// 1 to [`MAX_RANDOM_BYTES`].
    pub count: u32,
}

impl Sealed for GetRandomBytes {}
impl Operation for GetRandomBytes {
    type Output = Dek;

    async fn run(self, call: &mut Call) -> Result<Dek, BrokerError> {
        // The count asked for, whatever the outcome (the record's `detail.count`).
        RequestScope::note_detail("count", self.count.into());
        if !call.authority().allows_somewhere(Permission::Random) {
            return Err(Denied::Permission {
                caller: call.caller_id().to_string(),
                permission: Permission::Random,
            }
            .into());
        }
        if !(1..=MAX_RANDOM_BYTES).contains(&self.count) {
            return Err(Invalid::Value {
                field: "count",
                expected: "1 to 4096",
            }
            .into());
        }
        call.keys().random(self.count as usize).await
    }
}
