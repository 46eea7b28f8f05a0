//! The SDK's one error type.

use tonic::Code;

/// Everything that can go wrong in the SDK.
///
/// Sealed data that fails to parse or authenticate — tampered, truncated, reordered, extended,
/// opened with the wrong AAD, or carrying a wrapped DEK the broker refuses as unauthentic — is
/// always [`Error::Unauthentic`], whatever the cause, so an application cannot be turned into an
/// oracle that tells an attacker which check failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client is configured wrongly (unreadable PEM file, bad endpoint, no key to seal with).
    #[error("keybroker client configuration: {0}")]
    Config(String),
    /// The sealed data is malformed or not authentic.
    #[error("sealed data is malformed or not authentic")]
    Unauthentic,
    /// A broker call failed (after retries, where the code was retryable).
    #[error("keybroker {method} failed after {attempts} attempt(s): {code:?}: {message}")]
    Rpc {
        /// The RPC (`GenerateDataKey`, `UnwrapKey`).
        method: &'static str,
        /// The final gRPC status code (`DeadlineExceeded` when the client's own deadline fired).
        code: Code,
        /// The broker's message.
        message: String,
        /// How many attempts were made.
        attempts: u32,
    },
    /// An argument is wrong (a digest of the wrong length, a signature algorithm that does not
    /// fit the key); nothing was sent.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The input is larger than one sealed message can hold (2^32 chunks).
    #[error("input too large for one sealed message")]
    TooLarge,
    /// Reading or writing a stream failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The gRPC code of a failed broker call, if this is one.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
