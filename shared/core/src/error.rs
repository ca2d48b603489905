//! The one domain error type, and its mapping to the wire's error codes.

use crate::protocol::ErrorCode;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a command can fail with. The client-facing variants carry a
/// message meant for the client; `Internal` keeps its source for the logs and
/// never shows it on the wire.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error("rate limit reached: {0}")]
    RateLimited(String),
    /// The devices an encrypted send or a device message named are not the
    /// server's; carries the current recipient devices.
    #[error("the recipient devices have changed")]
    MismatchedDevices(Vec<crate::protocol::RecipientDevice>),
    /// A dependency failed in a way a retry may cure (throttling, 5xx, a lost race).
    #[error("temporarily unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// A bug or a broken dependency; retrying will not help.
    #[error("internal: {0}")]
    Internal(#[source] BoxError),
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Error {
    pub fn internal(e: impl Into<BoxError>) -> Self {
        Error::Internal(e.into())
    }

    pub fn unavailable(e: impl Into<BoxError>) -> Self {
        Error::Unavailable(e.into())
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::Unauthorized(_) => ErrorCode::Unauthorized,
            Error::Forbidden(_) => ErrorCode::Forbidden,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::LimitExceeded(_) => ErrorCode::LimitExceeded,
            Error::RateLimited(_) => ErrorCode::RateLimited,
            Error::MismatchedDevices(_) => ErrorCode::MismatchedDevices,
            Error::Unavailable(_) | Error::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The text a client may see: never a table name, SDK error or path.
    pub fn client_message(&self) -> String {
        match self {
            Error::Unavailable(_) => "temporarily unavailable, retry".to_owned(),
            Error::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        }
    }

    /// Whether a Lambda runtime or a queue should try the same work again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_never_reach_the_client() {
        let e = Error::internal(std::io::Error::other("table courier_inbox is gone"));
        assert_eq!(e.code(), ErrorCode::Internal);
        assert!(!e.client_message().contains("courier_inbox"));
        assert!(!e.is_retryable());
        assert!(Error::unavailable("throttled").is_retryable());
    }
}
