//! Reading the audit trail.

use super::{Operation, sealed::Sealed};
use crate::{
    api::call::Call,
    audit::QueryFilter,
    error::{BrokerError, Denied, Invalid, Unavailable},
    model::KeyName,
    policy::Permission,
};

/// The largest `page_size` of a query.
const MAX_PAGE: u32 = 1000;

/// `QueryAudit`: records matching `filter` that the caller may read (every record with the
/// `read audit` permission at scope `all`; else the records of keys its scopes cover).
pub struct QueryAudit {
    /// What to match.
    pub filter: QueryFilter,
    /// At most this many (0: 100).
    pub page_size: u32,
    /// Continue after this (a sequence number this broker issued).
    pub page_token: String,
}

impl Sealed for QueryAudit {}
impl Operation for QueryAudit {
    /// The records as stored (JSON lines) and the token of the next page, if any.
    type Output = (Vec<String>, Option<u64>);

    async fn run(self, call: &mut Call) -> Result<Self::Output, BrokerError> {
        let global = call.authorize_global(Permission::ReadAudit).is_ok();
        if !global && !call.authority().allows_somewhere(Permission::ReadAudit) {
            return Err(Denied::Permission {
                caller: call.caller_id().to_string(),
                permission: Permission::ReadAudit,
            }
            .into());
        }
        let limit = match self.page_size {
            0 => 100,
            n @ 1..=MAX_PAGE => n as usize,
            n => {
                return Err(Invalid::PageSize {
                    max: MAX_PAGE,
                    got: n,
                }
                .into());
            }
        };
        let after = if self.page_token.is_empty() {
            0
        } else {
            self.page_token
                .parse::<u64>()
                .map_err(|_| Invalid::PageToken)?
        };
        let reader = call.audit().reader();
        let visible = call.authority().filter(Permission::ReadAudit);
        let filter = self.filter;
        tokio::task::spawn_blocking(move || {
            reader.query(&filter, after, limit, &|rec| {
                global
                    || rec
                        .key
                        .as_deref()
                        .and_then(|k| KeyName::parse(k).ok())
                        .is_some_and(|k| visible(&k))
            })
        })
        .await
        .map_err(|e| BrokerError::internal(e.to_string()))?
        .map_err(|e| Unavailable::AuditRead(e).into())
    }
}
