//! Who is calling. Every handler takes a [`Caller`]; the store is then used
//! only through the caller's organization.
//!
//! Callers are authenticated with OIDC bearer tokens ([`OidcAuthenticator`]).
//! A development mode treats every request as the owner of the default
//! organization; it exists only behind an explicit flag and logs a loud
//! warning.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use connectrpc_axum::ConnectError;
use flotilla_oidc::{Oidc, TokenError};
use flotilla_redis::ratelimit::{Decision, Limit, RateLimiter};
use flotilla_store::Store;
use flotilla_types::{OrganizationId, ProjectId};

use crate::ApiError;

/// The request header that picks one of the caller's organizations (its
/// slug or id); without it, the caller's first (personal) organization.
pub const ORGANIZATION_HEADER: &str = "flotilla-organization";

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

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Member => "member",
            Self::Viewer => "viewer",
        }
    }

    /// May manage members and invitations.
    pub fn can_manage_members(self) -> bool {
        matches!(self, Self::Owner | Self::Admin)
    }

    pub fn parse(role: &str) -> Option<Self> {
        match role {
            "owner" => Some(Self::Owner),
            "admin" => Some(Self::Admin),
            "member" => Some(Self::Member),
            "viewer" => Some(Self::Viewer),
            _ => None,
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub subject: String,
    /// The user's row (`users.id`).
    pub user_id: uuid::Uuid,
    /// As the token says; invitations are bound to it.
    pub email: Option<String>,
    pub organization_id: OrganizationId,
    pub default_project: ProjectId,
    pub role: Role,
    /// May manage the cluster itself (nodes).
    pub platform_admin: bool,
}

/// How requests are authenticated.
#[derive(Debug)]
pub enum Authenticator {
    /// Development only: every request is `caller`.
    InsecureDevelopment {
        caller: Caller,
    },
    Oidc(OidcAuthenticator),
}

impl Authenticator {
    pub fn insecure_development(
        organization_id: OrganizationId,
        default_project: ProjectId,
        user_id: uuid::Uuid,
    ) -> Self {
        tracing::warn!(
            "AUTHENTICATION IS OFF (--insecure-dev-auth): every request acts as the owner of the \
             default organization and as a platform administrator. Never expose this server beyond \
             this machine."
        );
        Self::InsecureDevelopment {
            caller: Caller {
                subject: "dev".to_owned(),
                user_id,
                email: None,
                organization_id,
                default_project,
                role: Role::Owner,
                platform_admin: true,
            },
        }
    }

    pub async fn authenticate(&self, parts: &Parts) -> Result<Caller, ApiError> {
        match self {
            Self::InsecureDevelopment { caller } => Ok(caller.clone()),
            Self::Oidc(oidc) => oidc.authenticate(parts).await,
        }
    }
}

/// Bearer tokens checked by the OIDC provider's rules, users and their
/// memberships from the store.
#[derive(Debug)]
pub struct OidcAuthenticator {
    oidc: Arc<Oidc>,
    store: Store,
    /// Subjects that administer the platform (from configuration).
    platform_admins: HashSet<String>,
    /// Callers resolved lately, by (subject, organization header): a role
    /// change takes effect within [`Self::CALLER_CACHE`].
    callers: Mutex<HashMap<CallerKey, (Caller, Instant)>>,
}

/// A subject and the organization its request named.
type CallerKey = (String, Option<String>);

impl OidcAuthenticator {
    pub const CALLER_CACHE: Duration = Duration::from_secs(5);
    const CALLER_CACHE_CAPACITY: usize = 20_000;

    pub fn new(oidc: Arc<Oidc>, store: Store, platform_admins: impl IntoIterator<Item = String>) -> Self {
        Self {
            oidc,
            store,
            platform_admins: platform_admins.into_iter().collect(),
            callers: Mutex::new(HashMap::new()),
        }
    }

    pub fn oidc(&self) -> &Arc<Oidc> {
        &self.oidc
    }

    async fn authenticate(&self, parts: &Parts) -> Result<Caller, ApiError> {
        let token = bearer_token(parts)?;
        let identity = self.oidc.verify(token).await.map_err(|error| match error {
            TokenError::ProviderUnavailable(_) => ApiError::Unavailable(error.to_string()),
            error => ApiError::Unauthenticated(error.to_string()),
        })?;
        let selector = match parts.headers.get(ORGANIZATION_HEADER) {
            Some(value) => Some(
                value
                    .to_str()
                    .map_err(|_| ApiError::Unauthenticated(format!("the {ORGANIZATION_HEADER} header is not text")))?
                    .to_owned(),
            ),
            None => None,
        };
        let key = (identity.subject.clone(), selector);
        let remembered = self.lock_callers().get(&key).filter(|(_, at)| at.elapsed() < Self::CALLER_CACHE).cloned();
        if let Some((caller, _)) = remembered {
            return Ok(caller);
        }
        let signed_in = self.store.sign_in(&identity.subject, identity.email.as_deref()).await?;
        if signed_in.created {
            tracing::info!(subject = %identity.subject, "new user signed in; personal organization created");
        }
        let membership = match &key.1 {
            Some(wanted) => signed_in
                .memberships
                .iter()
                .find(|m| &m.organization_slug == wanted || m.organization_id.to_string() == *wanted)
                .ok_or_else(|| ApiError::NotFound { what: "organization", id: wanted.clone() })?,
            None => signed_in.memberships.first().ok_or_else(|| {
                ApiError::PermissionDenied(
                    "you are not a member of any organization; ask an organization's owner to invite you".to_owned(),
                )
            })?,
        };
        let caller = Caller {
            subject: identity.subject.clone(),
            user_id: signed_in.user_id,
            email: identity.email.clone(),
            organization_id: membership.organization_id,
            default_project: membership.default_project,
            role: Role::parse(&membership.role)
                .ok_or_else(|| ApiError::Internal(format!("unknown role {:?} in the store", membership.role)))?,
            platform_admin: self.platform_admins.contains(&identity.subject),
        };
        let mut callers = self.lock_callers();
        if callers.len() >= Self::CALLER_CACHE_CAPACITY {
            callers.retain(|_, (_, at)| at.elapsed() < Self::CALLER_CACHE);
        }
        callers.insert(key, (caller.clone(), Instant::now()));
        Ok(caller)
    }

    fn lock_callers(&self) -> std::sync::MutexGuard<'_, HashMap<CallerKey, (Caller, Instant)>> {
        self.callers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The token of an `Authorization: Bearer <token>` header (gRPC metadata
/// arrives as the same header).
fn bearer_token(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts.headers.get(axum::http::header::AUTHORIZATION).ok_or_else(|| {
        ApiError::Unauthenticated(
            "no credentials: send `Authorization: Bearer <token>` (with the CLI: `flo login`)".to_owned(),
        )
    })?;
    let value =
        header.to_str().map_err(|_| ApiError::Unauthenticated("the authorization header is not text".to_owned()))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => Ok(token.trim()),
        _ => Err(ApiError::Unauthenticated("the authorization header must be `Bearer <token>`".to_owned())),
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
    Arc<Authenticator>: FromRef<S>,
    Arc<RateLimits>: FromRef<S>,
{
    type Rejection = ConnectError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let auth = Arc::<Authenticator>::from_ref(state);
        let caller = auth.authenticate(parts).await.map_err(ConnectError::from)?;
        Arc::<RateLimits>::from_ref(state).admit(&caller).await.map_err(ConnectError::from)?;
        Ok(caller)
    }
}
