//! Who is calling. Every handler takes a [`Caller`]; the store is then used
//! only through the caller's organization.
//!
//! For now the only authenticator is the development mode, which treats every
//! request as the owner of the default organization. It exists only behind an
//! explicit flag and logs a loud warning; OIDC comes with the public API issue.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use connectrpc_axum::ConnectError;
use flotilla_redis::ratelimit::{Decision, Limit, RateLimiter};
use flotilla_types::{OrganizationId, ProjectId};

use crate::ApiError;

/// A member's role in an organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Owner,
    Admin,
    Member,
    Viewer,
}

impl Role {
    pub fn can_mutate(self) -> bool {
        !matches!(self, Self::Viewer)
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub subject: String,
    pub organization_id: OrganizationId,
    pub default_project: ProjectId,
    pub role: Role,
    /// May manage the cluster itself (nodes).
    pub platform_admin: bool,
}

/// How requests are authenticated.
#[derive(Debug, Clone)]
pub enum Authenticator {
    /// Development only: every request is `caller`.
    InsecureDevelopment { caller: Caller },
}

impl Authenticator {
    pub fn insecure_development(organization_id: OrganizationId, default_project: ProjectId) -> Self {
        tracing::warn!(
            "AUTHENTICATION IS OFF (--insecure-dev-auth): every request acts as the owner of the \
             default organization and as a platform administrator. Never expose this server beyond \
             this machine."
        );
        Self::InsecureDevelopment {
            caller: Caller {
                subject: "dev".to_owned(),
                organization_id,
                default_project,
                role: Role::Owner,
                platform_admin: true,
            },
        }
    }

    pub fn authenticate(&self, _parts: &Parts) -> Result<Caller, ApiError> {
        match self {
            Self::InsecureDevelopment { caller } => Ok(caller.clone()),
        }
    }
}

/// Requests allowed per user and per organization, shared by every API
/// replica through Redis (see [`RateLimiter`]).
#[derive(Debug)]
pub struct RateLimits {
    pub limiter: RateLimiter,
    pub per_user: Option<Limit>,
    pub per_organization: Option<Limit>,
}

impl RateLimits {
    pub fn none() -> Self {
        Self { limiter: RateLimiter::local_only(), per_user: None, per_organization: None }
    }

    /// Takes one request of `caller`: its own limit, then its organization's.
    pub async fn admit(&self, caller: &Caller) -> Result<(), ApiError> {
        let checks = [
            (self.per_user, format!("user:{}:{}", caller.organization_id, caller.subject), "requests per user"),
            (self.per_organization, format!("org:{}", caller.organization_id), "requests per organization"),
        ];
        for (limit, subject, what) in checks {
            let Some(limit) = limit else { continue };
            if let Decision::Limited { retry_after } = self.limiter.check(&subject, limit).await {
                return Err(ApiError::ResourceExhausted {
                    limit: format!("{} {what} a second (bursts of {})", limit.per_second, limit.burst),
                    retry_after,
                });
            }
        }
        Ok(())
    }
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    std::sync::Arc<Authenticator>: FromRef<S>,
    std::sync::Arc<RateLimits>: FromRef<S>,
{
    type Rejection = ConnectError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let auth = std::sync::Arc::<Authenticator>::from_ref(state);
        let caller = auth.authenticate(parts).map_err(ConnectError::from)?;
        std::sync::Arc::<RateLimits>::from_ref(state).admit(&caller).await.map_err(ConnectError::from)?;
        Ok(caller)
    }
}
