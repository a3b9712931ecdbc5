//! Who is calling. Every handler takes a [`Caller`]; the store is then used
//! only through the caller's organization.
//!
//! For now the only authenticator is the development mode, which treats every
//! request as the owner of the default organization. It exists only behind an
//! explicit flag and logs a loud warning; OIDC comes with the public API issue.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use connectrpc_axum::ConnectError;
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

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    std::sync::Arc<Authenticator>: FromRef<S>,
{
    type Rejection = ConnectError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let auth = std::sync::Arc::<Authenticator>::from_ref(state);
        auth.authenticate(parts).map_err(ConnectError::from)
    }
}
