use std::time::Duration;

/// Errors of Docker Engine operations, classified so callers can react:
/// retry when unreachable, pick another port when it is taken.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("Docker Engine unreachable while {operation}: {source}")]
    Unreachable {
        operation: &'static str,
        #[source]
        source: bollard::errors::Error,
    },

    #[error("{operation}: {subject} not found: {message}")]
    NotFound { operation: &'static str, subject: String, message: String },

    #[error("{operation}: {subject}: nothing to do ({message})")]
    NotModified { operation: &'static str, subject: String, message: String },

    #[error("{operation}: {subject}: host port already in use: {message}")]
    PortInUse { operation: &'static str, subject: String, message: String },

    #[error("{operation}: {subject}: conflict: {message}")]
    Conflict { operation: &'static str, subject: String, message: String },

    #[error("{operation}: {subject}: the engine answered {status}: {message}")]
    Engine { operation: &'static str, subject: String, status: u16, message: String },

    #[error("{operation}: {subject}: timed out after {after:?}")]
    Timeout { operation: &'static str, subject: String, after: Duration },

    #[error("{operation}: {subject}: {source}")]
    Other {
        operation: &'static str,
        subject: String,
        #[source]
        source: bollard::errors::Error,
    },
}

impl DockerError {
    /// Classifies a bollard error of `operation` on `subject`.
    pub(crate) fn from_bollard(operation: &'static str, subject: &str) -> impl FnOnce(bollard::errors::Error) -> Self {
        let subject = subject.to_owned();
        move |source| {
            use bollard::errors::Error as E;
            match source {
                E::DockerResponseServerError { status_code, message } => {
                    let lower = message.to_ascii_lowercase();
                    match status_code {
                        404 => Self::NotFound { operation, subject, message },
                        304 => Self::NotModified { operation, subject, message },
                        _ if lower.contains("port is already allocated")
                            || lower.contains("address already in use") =>
                        {
                            Self::PortInUse { operation, subject, message }
                        }
                        409 => Self::Conflict { operation, subject, message },
                        status => Self::Engine { operation, subject, status, message },
                    }
                }
                E::IOError { .. }
                | E::HyperLegacyError { .. }
                | E::SocketNotFoundError(_)
                | E::RequestTimeoutError
                | E::HyperResponseError { .. } => Self::Unreachable { operation, source },
                source => Self::Other { operation, subject, source },
            }
        }
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Timeout { .. })
    }
}
