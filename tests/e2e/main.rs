//! End-to-end tests: the real `keybroker` binary, a real SoftHSM2 token per test, real mutual
//! TLS on a loopback port. Run with `tests/run` (or `cargo test --workspace` once SoftHSM2 is
//! installed).

mod access;
mod audit;
mod common;
mod hostile;
mod hyok;
mod key_safety;
mod keys;
mod kms_v2;
mod lifecycle;
mod observability;
mod properties;
mod rsa_interop;
mod sdk;
mod tls;
mod wrap_unwrap;
