//! End-to-end tests: the real `keybroker` binary, a real token per test (SoftHSM2, or Kryoptic
//! with `KEYBROKER_TEST_TOKEN=kryoptic`), real mutual TLS on a loopback port. Run with
//! `tests/run` (both tokens), or `cargo test --workspace` once SoftHSM2 is installed.

mod access;
mod audit;
mod backup;
mod batch;
mod cli;
mod common;
mod crash;
mod dke;
mod ekm;
mod external;
mod faults;
mod hostile;
mod hygiene;
mod hyok;
mod instance_lock;
mod key_safety;
mod keys;
mod kms_v2;
mod lifecycle;
mod observability;
mod overload;
mod payload;
mod pkcs11_uri;
mod platform;
mod portability;
mod properties;
mod random;
mod reliability;
mod replicas;
mod rsa_interop;
mod sdk;
mod sign;
mod soak;
mod tls;
mod wrap_unwrap;
mod xks;
mod xks_ops;
