//! keybroker: a key broker that keeps Key Encryption Keys (KEKs) inside a PKCS#11 HSM and
//! wraps/unwraps Data Encryption Keys (DEKs) for the services that call it over mutual TLS.
//!
//! A request flows: front door (a codec: gRPC over mutual TLS, or the Kubernetes KMS v2 unix
//! socket) → the one pipeline (request id, caller, deadline, policy and HYOK rules, the
//! operation, the audit record before the reply, metrics and log) → keys (metadata in memory,
//! grants, one HSM call per chunk of items) → HSM layer (session pool, cached handles, blocking
//! calls on the pool's own HSM threads) → reply. `docs/src/architecture.md` draws it, with what each module
//! may import.
//!
//! # Layout (top to bottom: a module imports only modules below it)
//! * [`cli`] — the `keybroker` command; [`server`] — wiring, start-up errors, graceful shutdown.
//! * [`api`] — the front doors (`grpc`, `kms_v2`) and the one pipeline they share (`pipeline`,
//!   `call`, `ops`).
//! * [`config`] — the TOML configuration file; [`metrics`] — Prometheus metrics on their own
//!   listener; [`instance_lock`] — one broker per SQLite store and audit log.
//! * [`keys`] — every key operation in domain terms, on grants; start-up reconciliation,
//!   integrity checks, replicas, backup.
//! * [`audit`] — the tamper-evident trail; [`policy`] — roles, scopes, grants, HYOK rules;
//!   [`hyok`] — the kill switch.
//! * [`hsm`] — the only module that uses `cryptoki`.
//! * [`store`] — key metadata (never key material): SQLite, or PostgreSQL for several replicas;
//!   [`envelope`] — the wrapped-DEK format, byte by byte.
//! * [`error`] — the request errors, typed, and their one mapping to gRPC codes and HTTP
//!   statuses; [`tls`] — the mutual-TLS listener.
//! * [`model`] — the domain vocabulary (names, types, algorithms, permissions, DEKs);
//!   [`identity`], [`health`], [`secrets`], [`pkcs11_uri`], [`client`], [`failpoint`],
//!   [`fdlimit`] — leaves.

pub mod api;
pub mod audit;
pub mod cli;
pub mod client;
pub mod config;
pub mod envelope;
pub mod error;
pub mod external;
pub mod failpoint;
pub mod fdlimit;
pub mod health;
pub mod hsm;
pub mod hyok;
pub mod identity;
pub mod instance_lock;
pub mod keys;
pub mod log_bridge;
pub mod metrics;
pub mod model;
pub mod pkcs11_uri;
pub mod policy;
pub mod secrets;
pub mod server;
pub mod store;
pub mod tls;
