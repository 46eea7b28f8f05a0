//! Provisioning for keybroker's tests and its `dev` command.
//!
//! * [`softhsm`]: a SoftHSM2 token in a directory of its own (own `softhsm2.conf`, own token
//!   directory, random PINs), so tests never touch a system-wide token and can run in parallel.
//! * [`kryoptic`]: the same for Kryoptic, keybroker's second CI token (an independent PKCS#11
//!   implementation), whose module `kryoptic/build.sh` builds from crates.io.
//! * [`opencryptoki`]: openCryptoki, the third CI token (a PKCS#11 2.20 implementation with a
//!   slot daemon): `opencryptoki/setup.sh` makes its slots, and each test claims one.
//! * [`token`]: a token of any kind behind one type, chosen by `KEYBROKER_TEST_TOKEN`.
//! * [`fault`]: the fault-injecting PKCS#11 module (C, built by `build.rs`) that sits between
//!   the broker and a real token and injects the return codes, latency and hangs a real HSM
//!   has, on command, while the broker runs.
//! * [`postgres`]: a private PostgreSQL server (Debian's package) on loopback in a temporary
//!   directory, for the replica tests.
//! * [`pki`]: a PKI made with rcgen — a CA, a server certificate for `localhost`/`127.0.0.1`,
//!   client certificates carrying SPIFFE IDs or DNS names, an expired client certificate and a
//!   client certificate from a foreign CA.
//!
//! Everything here is for tests and development only: keys are written to disk in the clear.

pub mod fault;
pub mod kryoptic;
pub mod opencryptoki;
pub mod pki;
pub mod postgres;
pub mod softhsm;
pub mod token;

/// Errors while provisioning fixtures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// rcgen refused a certificate.
    #[error("certificate generation failed: {0}")]
    Cert(#[from] rcgen::Error),
    /// A tool or environment requirement is missing or failed.
    #[error("{0}")]
    Setup(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
