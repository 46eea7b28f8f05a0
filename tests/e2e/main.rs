//! End-to-end tests: the real `keybroker` binary, a real token per test (SoftHSM2, or Kryoptic
//! with `KEYBROKER_TEST_TOKEN=kryoptic`), real mutual TLS on a loopback port. Run with
//! `tests/run` (both tokens), or `cargo test --workspace` once SoftHSM2 is installed.

mod access;
mod audit;
mod common;
mod crash;
mod faults;
mod hostile;
mod hyok;
mod key_safety;
mod keys;
mod lifecycle;
mod overload;
mod portability;
mod properties;
mod rsa_interop;
mod soak;
mod tls;
mod wrap_unwrap;
