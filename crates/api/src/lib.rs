//! Flotilla's public API: `DeploymentService` served with Connect (JSON and
//! binary protobuf) and gRPC on one port, beside `/health` and `/metrics`.
//!
//! Handlers authenticate the [`Caller`](auth::Caller), validate the whole
//! request, and then use the store only through the caller's organization.
//! Errors are [`ApiError`]s, turned into Connect/gRPC codes at the boundary.

mod audit;
pub mod auth;
pub mod cache;
mod convert;
mod deadline;
mod deployments;
pub mod domains;
mod error;
mod logs;
pub mod metrics;
mod nodes;
mod organizations;
mod usage;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use connectrpc_axum::{ConnectError, ConnectResponse, MakeServiceBuilder};
use flotilla_metrics::LiveView;
use flotilla_proto::v1::deployment_service_connect::DeploymentServiceTonicCompatibleBuilder;
use flotilla_proto::v1::node_service_connect::NodeServiceTonicCompatibleBuilder;
use flotilla_proto::v1::organization_service_connect::OrganizationServiceTonicCompatibleBuilder;
use flotilla_proto::v1::project_service_connect::ProjectServiceTonicCompatibleBuilder;
use flotilla_redis::WakeBus;
use flotilla_store::Store;
use flotilla_store::metrics::MetricsStore;
use flotilla_telemetry::Telemetry;
use tokio_util::sync::CancellationToken;

pub use auth::{Authenticator, Caller, OidcAuthenticator, RateLimits, Role};
pub use error::ApiError;

/// What every gRPC service accepts: gzip both ways, requests up to
/// [`MAX_REQUEST_BYTES`] (decompressed).
macro_rules! grpc_limits {
    ($svc:expr) => {
        $svc.max_decoding_message_size(MAX_REQUEST_BYTES)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .send_compressed(tonic::codec::CompressionEncoding::Gzip)
    };
}

/// Largest request body accepted (bytes).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Longest a unary request may run before it is answered
/// `deadline_exceeded` (streams end on their own terms).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the metrics RPCs read from.
#[derive(Debug, Clone, Default)]
pub struct MetricsAccess {
    /// History and usage; `None` when no metrics store is configured.
    pub store: Option<MetricsStore>,
    /// Live samples: fed from Redis, or by this process's own pipeline.
    pub live: Option<Arc<LiveView>>,
}

/// What handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub store: Store,
    pub wake: WakeBus,
    pub auth: Arc<Authenticator>,
    pub limits: Arc<RateLimits>,
    pub stats: Arc<metrics::ApiStats>,
    pub metrics: MetricsAccess,
    /// Fires at shutdown: live streams end.
    pub shutdown: CancellationToken,
    /// Ids of deployments that changed, fed by
    /// [`Store::announce_changes`] (status streams wait on it).
    pub changes: tokio::sync::broadcast::Sender<flotilla_store::changes::Change>,
    /// GetDeployment's answers, dropped on change.
    pub views: Arc<cache::ViewCache>,
    /// How this process reaches agents' internal endpoints (logs).
    pub internal: logs::InternalClient,
    /// How custom domains are proven.
    pub domains: domains::DomainAccess,
}

impl FromRef<ApiState> for Arc<RateLimits> {
    fn from_ref(state: &ApiState) -> Self {
        state.limits.clone()
    }
}

impl FromRef<ApiState> for Arc<Authenticator> {
    fn from_ref(state: &ApiState) -> Self {
        state.auth.clone()
    }
}

impl ApiState {
    pub fn new(
        store: Store,
        wake: WakeBus,
        auth: Authenticator,
        metrics: MetricsAccess,
        shutdown: CancellationToken,
        telemetry: &Telemetry,
        domains: domains::DomainAccess,
    ) -> Self {
        let stats = Arc::new(metrics::ApiStats::default());
        telemetry.register(Box::new(metrics::collector(&stats, metrics.live.clone())));
        let limits = Arc::new(RateLimits::none());
        let (changes, _) = tokio::sync::broadcast::channel(4096);
        let views = Arc::new(cache::ViewCache::new(cache::VIEW_TTL));
        telemetry.register(Box::new(metrics::view_cache_collector(&views)));
        let internal = logs::InternalClient::new(None);
        Self { store, wake, auth: Arc::new(auth), limits, stats, metrics, shutdown, changes, views, internal, domains }
    }

    /// Takes PostgreSQL's change notices from `changes` (shared with the
    /// process's other parts) instead of a channel of its own.
    pub fn with_changes(mut self, changes: tokio::sync::broadcast::Sender<flotilla_store::changes::Change>) -> Self {
        self.changes = changes;
        self
    }

    /// The token agents expect on their internal endpoints.
    pub fn with_internal_token(mut self, token: Arc<str>) -> Self {
        self.internal = logs::InternalClient::new(Some(token));
        self
    }

    /// Limits requests per user and per organization (none by default).
    pub fn with_rate_limits(mut self, limits: RateLimits, telemetry: &Telemetry) -> Self {
        let limits = Arc::new(limits);
        telemetry.register(Box::new(metrics::rate_limit_collector(&limits)));
        self.limits = limits;
        self
    }

    /// Runs a handler body, counts its result by code and maps its error.
    async fn observe<T>(
        &self,
        method: &'static str,
        body: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<ConnectResponse<T>, ConnectError> {
        let result = Self::within_deadline(body).await;
        self.respond(method, result)
    }

    /// [`Self::observe`] for a mutating call: its outcome also goes to the
    /// audit log (`target`: what it acts on, unless the response names it).
    /// A failed audit write is logged and counted; the answer stands.
    async fn audited<T: audit::Audited>(
        &self,
        method: &'static str,
        caller: &Caller,
        target: &str,
        body: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<ConnectResponse<T>, ConnectError> {
        // Boxed: the body and the audit write together make a large future.
        let result = Box::pin(Self::within_deadline(body)).await;
        let entry = flotilla_store::audit::AuditEntry {
            organization_id: caller.organization_id,
            subject: caller.subject.clone(),
            method: method.to_owned(),
            target: result.as_ref().ok().and_then(audit::Audited::audit_target).unwrap_or_else(|| target.to_owned()),
            code: result.as_ref().err().map_or("ok", |e| e.code().as_str()).to_owned(),
            message: result.as_ref().err().map(ToString::to_string),
        };
        if let Err(error) = Box::pin(self.store.record_audit(&entry)).await {
            self.stats.audit_failed();
            tracing::warn!(%error, method, subject = %caller.subject, "could not write the audit log");
        }
        self.respond(method, result)
    }

    async fn within_deadline<T>(body: impl Future<Output = Result<T, ApiError>>) -> Result<T, ApiError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, body).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::DeadlineExceeded(REQUEST_TIMEOUT)),
        }
    }

    /// Counts the result and maps its error to what handlers answer with.
    #[allow(clippy::result_large_err, reason = "handlers answer with connectrpc's ConnectError as it is")]
    fn respond<T>(
        &self,
        method: &'static str,
        result: Result<T, ApiError>,
    ) -> Result<ConnectResponse<T>, ConnectError> {
        let code = match &result {
            Ok(_) => "ok",
            Err(e) => e.code().as_str(),
        };
        self.stats.count(method, code);
        result.map(ConnectResponse::new).map_err(|e| {
            if !matches!(e, ApiError::Internal(_)) {
                tracing::debug!(method, error = %e, "request refused");
            }
            ConnectError::from(e)
        })
    }
}

/// The whole HTTP service of an API process: Connect and gRPC on the same
/// port (told apart by content type), plus the telemetry routes.
/// The API on one port, beside `extra` (the route table, when this process
/// runs the orchestrator) and the telemetry endpoints.
pub fn service(
    state: ApiState,
    telemetry: Telemetry,
    extra: axum::Router,
) -> impl tower::Service<
    axum::http::Request<axum::body::Body>,
    Response = axum::http::Response<axum::body::Body>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let (connect, grpc) = DeploymentServiceTonicCompatibleBuilder::new()
        .create_deployment(deployments::create_deployment)
        .get_deployment(deployments::get_deployment)
        .list_deployments(deployments::list_deployments)
        .update_deployment(deployments::update_deployment)
        .delete_deployment(deployments::delete_deployment)
        .start_deployment(deployments::start_deployment)
        .stop_deployment(deployments::stop_deployment)
        .restart_deployment(deployments::restart_deployment)
        .scale_deployment(deployments::scale_deployment)
        .get_deployment_metrics(usage::get_deployment_metrics)
        .stream_deployment_metrics(usage::stream_deployment_metrics)
        .get_usage(usage::get_usage)
        .get_deployment_usage(usage::get_deployment_usage)
        .get_env_vars(deployments::get_env_vars)
        .update_env_vars(deployments::update_env_vars)
        .get_routings(deployments::get_routings)
        .update_routings(deployments::update_routings)
        .get_domain_status(domains::get_domain_status)
        .verify_domain(domains::verify_domain)
        .stream_deployment_status(deployments::stream_deployment_status)
        .stream_deployment_logs(logs::stream_deployment_logs)
        .with_state(state.clone())
        .build();
    let (node_connect, node_grpc) = NodeServiceTonicCompatibleBuilder::new()
        .list_nodes(nodes::list_nodes)
        .get_node(nodes::get_node)
        .drain_node(nodes::drain_node)
        .activate_node(nodes::activate_node)
        .list_database_backups(nodes::list_database_backups)
        .with_state(state.clone())
        .build();
    let (organization_connect, organization_grpc) = OrganizationServiceTonicCompatibleBuilder::new()
        .list_organizations(organizations::list_organizations)
        .create_organization(organizations::create_organization)
        .list_members(organizations::list_members)
        .invite_member(organizations::invite_member)
        .list_invitations(organizations::list_invitations)
        .revoke_invitation(organizations::revoke_invitation)
        .accept_invitation(organizations::accept_invitation)
        .set_member_role(organizations::set_member_role)
        .remove_member(organizations::remove_member)
        .with_state(state.clone())
        .build();
    let (project_connect, project_grpc) = ProjectServiceTonicCompatibleBuilder::new()
        .list_projects(organizations::list_projects)
        .create_project(organizations::create_project)
        .delete_project(organizations::delete_project)
        .with_state(state)
        .build();
    let service = MakeServiceBuilder::new()
        .add_router(connect)
        .add_router(node_connect)
        .add_router(organization_connect)
        .add_router(project_connect)
        .add_axum_router(telemetry.router().merge(extra))
        .receive_max_bytes(MAX_REQUEST_BYTES)
        .add_grpc_service_with(grpc, |svc| grpc_limits!(svc))
        .add_grpc_service_with(node_grpc, |svc| grpc_limits!(svc))
        .add_grpc_service_with(organization_grpc, |svc| grpc_limits!(svc))
        .add_grpc_service_with(project_grpc, |svc| grpc_limits!(svc))
        .build();
    deadline::GrpcDeadline::new(service)
}
