//! keybroker: a gRPC key broker that keeps Key Encryption Keys (KEKs) inside a PKCS#11 HSM and
//! wraps/unwraps Data Encryption Keys (DEKs) for the services that call it over mutual TLS.
//!
//! A request flows: TLS handshake (client certificate verified, identity derived) → access check
//! → service handler → keyring (metadata in memory, one HSM call) → HSM layer (session pool,
//! cached handles, blocking calls on blocking threads) → reply.
//!
//! # Layout
//! * [`config`] — the TOML configuration file.
//! * [`tls`], [`identity`] — the mutual-TLS listener and caller identity.
//! * [`policy`] — roles, scopes, HYOK rules; [`hyok`] — the kill switch; [`audit`] — the tamper-evident trail.
//! * [`service`] — the `keybroker.v1` gRPC services (conversion only).
//! * [`keyring`] — key operations in domain terms; start-up reconciliation and integrity checks.
//! * [`envelope`] — the wrapped-DEK format, byte by byte.
//! * [`hsm`] — the only module that uses `cryptoki`; [`pkcs11_uri`] — RFC 7512 URIs that select
//!   the module and token.
//! * [`store`] — key metadata (never key material): SQLite, or PostgreSQL for several replicas;
//!   [`replica`] — keeping each replica's cache in step with the shared store.
//! * [`model`], [`error`] — domain types and the one error → status mapping.
//! * [`kms`] — the Kubernetes KMS v2 plugin API on a unix socket, for one key.
//! * [`health`], [`metrics`] — the HSM health probe behind `grpc.health.v1`, and Prometheus
//!   metrics on their own listener.
//! * [`instance_lock`] — one broker process per SQLite store and per audit log; [`secrets`] —
//!   reading PINs and passwords without stray copies, no core dumps.
//! * [`server`] — wiring and graceful shutdown; [`client`] — connecting as a client;
//!   [`cli`] — the `keybroker` command.

pub mod api;
pub mod audit;
pub mod cli;
pub mod client;
pub mod config;
pub mod envelope;
pub mod error;
pub mod failpoint;
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
