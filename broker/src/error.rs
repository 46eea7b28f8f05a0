//! The broker's error type and its one mapping to `tonic::Status`.
//!
//! Callers get a stable code and a message that never contains key material. Details that could
//! help an attacker (which check failed on a wrapped key, the PKCS#11 return value) go to the log
//! only. Unauthentic wrapped data always gets [`UNAUTHENTIC_MESSAGE`], whatever the cause, so the
//! reply is no padding or tag oracle (DESIGN §3.6).

use tonic::{Code, Status};

/// The one message for a wrapped key that is malformed or fails authentication.
pub const UNAUTHENTIC_MESSAGE: &str = "wrapped key is malformed or not authentic";

/// An error that ends a request.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BrokerError {
    /// The request is malformed (the message says what was wrong).
    #[error("{0}")]
    InvalidArgument(String),
    /// A wrapped key failed to parse or authenticate. Deliberately carries no detail.
    #[error("{UNAUTHENTIC_MESSAGE}")]
    Unauthentic,
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The key exists but cannot do this now.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The name is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The HSM (or another dependency) cannot serve right now; retryable.
    #[error("{0}")]
    Unavailable(String),
    /// The broker is at capacity; retryable.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The request's deadline passed before the work could be done.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A bug. The detail is logged; the caller sees a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    /// INVALID_ARGUMENT with a message.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    /// FAILED_PRECONDITION with a message.
    pub fn precondition(msg: impl Into<String>) -> Self {
        Self::FailedPrecondition(msg.into())
    }

    /// INTERNAL with a detail for the log.
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::Internal(msg.into())
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        match self {
            BrokerError::InvalidArgument(_) | BrokerError::Unauthentic => Code::InvalidArgument,
            BrokerError::NotFound(_) => Code::NotFound,
            BrokerError::PermissionDenied(_) => Code::PermissionDenied,
            BrokerError::FailedPrecondition(_) => Code::FailedPrecondition,
            BrokerError::AlreadyExists(_) => Code::AlreadyExists,
            BrokerError::Unavailable(_) => Code::Unavailable,
            BrokerError::ResourceExhausted(_) => Code::ResourceExhausted,
            BrokerError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            BrokerError::Internal(_) => Code::Internal,
        }
    }
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
        match &e {
            BrokerError::Internal(detail) => {
                tracing::error!(detail = %detail, "internal error");
                Status::internal("internal error (logged by the broker)")
            }
            other => Status::new(other.code(), other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthentic_maps_to_invalid_argument_with_fixed_message() {
        let s: Status = BrokerError::Unauthentic.into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), UNAUTHENTIC_MESSAGE);
    }

    #[test]
    fn internal_detail_is_not_sent() {
        let s: Status = BrokerError::internal("CKR_ARGUMENTS_BAD in C_Encrypt").into();
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("CKR_"));
    }
}
