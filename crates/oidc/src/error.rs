use thiserror::Error;

/// Why a bearer token was not accepted. Every variant but
/// [`TokenError::ProviderUnavailable`] means the caller is not authenticated;
/// the messages say what was wrong without echoing the token.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the bearer token is empty")]
    Empty,

    #[error("the bearer token is not a well-formed token: {0}")]
    Malformed(String),

    #[error("the token has expired ({0})")]
    Expired(String),

    #[error("the token is not valid yet ({0})")]
    NotYetValid(String),

    #[error("the token was issued by another issuer ({0})")]
    WrongIssuer(String),

    #[error("the token is meant for another audience ({0})")]
    WrongAudience(String),

    #[error("the token's signature does not verify")]
    BadSignature,

    #[error("the token is signed with a key the provider does not publish")]
    UnknownKey,

    #[error("the token's signing algorithm is not accepted ({0})")]
    DisallowedAlgorithm(String),

    /// An opaque token the provider's userinfo endpoint refused: expired,
    /// revoked or never issued.
    #[error("the provider does not know this token (expired or revoked)")]
    Inactive,

    /// The provider could not be asked (discovery, keys or userinfo): the
    /// token may be fine, so this is not the caller's fault.
    #[error("the identity provider cannot be reached: {0}")]
    ProviderUnavailable(String),
}

impl TokenError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Malformed(_) => "malformed",
            Self::Expired(_) => "expired",
            Self::NotYetValid(_) => "not_yet_valid",
            Self::WrongIssuer(_) => "wrong_issuer",
            Self::WrongAudience(_) => "wrong_audience",
            Self::BadSignature => "bad_signature",
            Self::UnknownKey => "unknown_key",
            Self::DisallowedAlgorithm(_) => "disallowed_algorithm",
            Self::Inactive => "inactive",
            Self::ProviderUnavailable(_) => "provider_unavailable",
        }
    }
}
