//! The API's one error type, and its mapping to Connect/gRPC codes at the
//! boundary. Internal details are logged, never sent to clients.

use connectrpc_axum::{Code, ConnectError};
use flotilla_store::StoreError;
use flotilla_types::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field of the request is wrong; the message names it.
    #[error("{0}")]
    InvalidArgument(#[from] FieldError),

    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },

    #[error("{what} already exists")]
    AlreadyExists { what: String },

    /// The resource is not in a state that allows the call.
    #[error("{0}")]
    FailedPrecondition(String),

    /// A concurrent change won; the client may read again and retry.
    #[error("{0}")]
    Aborted(String),

    #[error("{0}")]
    Unauthenticated(String),

    #[error("{0}")]
    PermissionDenied(String),

    /// Over a rate limit; the client may retry after `retry_after`.
    #[error("rate limit of {limit} exceeded; retry in {} ms", retry_after.as_millis())]
    ResourceExhausted { limit: String, retry_after: std::time::Duration },

    /// A dependency (the database) is down; clients may retry.
    #[error("service temporarily unavailable: {0}")]
    Unavailable(String),

    #[error("the request took longer than {0:?}")]
    DeadlineExceeded(std::time::Duration),

    /// A bug or corrupt data: logged in full, reported to clients generically.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound { entity, id } => Self::NotFound { what: entity, id },
            StoreError::AlreadyExists { what } => Self::AlreadyExists { what },
            StoreError::Conflict { what } => Self::Aborted(what),
            StoreError::FailedPrecondition { what } => Self::FailedPrecondition(what),
            StoreError::Forbidden { what } => Self::PermissionDenied(what),
            e @ StoreError::IdempotencyKeyReused { .. } => {
                Self::InvalidArgument(FieldError::new("idempotency_key", e.to_string()))
            }
            e if e.is_unavailable() => Self::Unavailable("the control database cannot be reached".to_owned()),
            e => Self::Internal(e.to_string()),
        }
    }
}

impl ApiError {
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::AlreadyExists { .. } => Code::AlreadyExists,
            Self::Aborted(_) => Code::Aborted,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::ResourceExhausted { .. } => Code::ResourceExhausted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<ApiError> for ConnectError {
    fn from(error: ApiError) -> Self {
        let message = match &error {
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                "internal error; the server log has the details".to_owned()
            }
            other => other.to_string(),
        };
        let connect = ConnectError::new(error.code(), message);
        match &error {
            ApiError::ResourceExhausted { retry_after, .. } => with_retry_info(connect, *retry_after),
            _ => connect,
        }
    }
}

/// The wait as machine-readable retry information: a `google.rpc.RetryInfo`
/// error detail and a `retry-after` header (whole seconds, rounded up).
fn with_retry_info(error: ConnectError, retry_after: std::time::Duration) -> ConnectError {
    #[derive(Clone, PartialEq, prost::Message)]
    struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        retry_delay: Option<prost_types::Duration>,
    }
    let info = RetryInfo {
        retry_delay: Some(prost_types::Duration {
            seconds: retry_after.as_secs() as i64,
            nanos: retry_after.subsec_nanos() as i32,
        }),
    };
    error
        .add_detail("type.googleapis.com/google.rpc.RetryInfo", prost::Message::encode_to_vec(&info))
        .with_meta("retry-after", (retry_after.as_secs_f64().ceil() as u64).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let invalid: ConnectError = ApiError::from(FieldError::new("port", "out of range")).into();
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert_eq!(invalid.message(), Some("port: out of range"));
        let missing: ConnectError =
            ApiError::from(StoreError::NotFound { entity: "deployment", id: "x".into() }).into();
        assert_eq!(missing.code(), Code::NotFound);
        let internal: ConnectError = ApiError::Internal("secret detail".into()).into();
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().unwrap_or_default().contains("secret"));
    }
}
