//! The front doors and the one request pipeline they share.
//!
//! * [`pipeline`] — every request's steps, in one place: request id, caller, deadline, policy
//!   and HYOK rules, the operation, the audit record before the reply, metrics and log;
//! * `call` — what an operation receives: the only way to the keys and maker of grants, and
//!   the request's audit record as it fills in;
//! * [`limiter`] — refused requests, rate-limited per caller (the pipeline applies it);
//! * [`ops`] — the operations a request can ask for, one type each (sealed: only this module
//!   defines them);
//! * [`grpc`] — the `keybroker.v1` gRPC services, a codec over the pipeline;
//! * [`https`] — the HTTPS listener every HTTP front door serves on (limits, shutdown);
//! * [`kms_v2`] — the Kubernetes KMS v2 plugin on a unix socket, a codec over the pipeline;
//! * [`xks`] — the AWS XKS proxy API's codec pieces (paths, bodies, error names, SigV4,
//!   `[xks]`) and its door on its own HTTPS listener;
//! * [`ekm`] — the Azure Managed HSM EKM proxy API's codec pieces (paths, `api-version`,
//!   bodies, `{code, message}` errors, `[ekm]`) and its door on its own HTTPS listener (TLS 1.3,
//!   mutual TLS required).
//!
//! A front door translates its wire format into an operation and the pipeline's reply back
//! into its wire format; it holds no keyring, policy or audit trail, so it cannot skip a step.

mod call;
pub mod ekm;
pub mod grpc;
pub mod https;
pub mod kms_v2;
pub mod limiter;
pub mod ops;
pub mod pipeline;
pub mod xks;

pub use self::pipeline::{DEFAULT_REQUEST_TIMEOUT, Pipeline};

/// Largest request message a front door accepts (a DEK request is well under 20 KiB).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
