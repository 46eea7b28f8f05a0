//! `keybroker.v1.Audit`: reading the audit trail.

use keybroker_proto::v1::{self as pb, audit_server::Audit};
use tonic::{Request, Response, Status};

use super::{AUDIT, GrpcApi, rpc};
use crate::{api::ops::audit::QueryAudit, audit::QueryFilter};

#[tonic::async_trait]
impl Audit for GrpcApi {
    async fn query_audit(
        &self,
        req: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<pb::QueryAuditResponse>, Status> {
        self.serve(
            rpc(AUDIT, "QueryAudit"),
            req,
            |r| {
                let opt = |s: String| if s.is_empty() { None } else { Some(s) };
                let op = QueryAudit {
                    filter: QueryFilter {
                        since_ms: (r.since_ms > 0).then_some(r.since_ms),
                        until_ms: (r.until_ms > 0).then_some(r.until_ms),
                        key: opt(r.key),
                        caller: opt(r.caller),
                        outcome: opt(r.outcome),
                    },
                    page_size: r.page_size,
                    page_token: r.page_token,
                };
                (None, Ok(op))
            },
            |(records, next)| pb::QueryAuditResponse {
                records,
                next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
            },
        )
        .await
    }
}
