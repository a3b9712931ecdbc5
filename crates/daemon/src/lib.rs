//! `flotillad`: composes the API, the orchestrator and the node agent into
//! one process, all of them or one. Tests start it in-process with
//! [`Daemon::start`]; the binary adds flags, logging and signals.

pub mod config;
pub mod health;
mod internal;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_agent::{Agent, AgentConfig, AgentError};
use flotilla_api::{ApiState, Authenticator, OidcAuthenticator};
use flotilla_docker::{DockerClient, DockerConfig, DockerError};
use flotilla_metrics::pipeline::MetricsError;
use flotilla_metrics::{LiveView, MetricsConfig, MetricsPipeline};
use flotilla_oidc::{Oidc, OidcSettings};
use flotilla_orchestrator::{Orchestrator, OrchestratorConfig};
use flotilla_redis::ratelimit::{Limit, RateLimiter};
use flotilla_redis::{LiveFeed, ORCHESTRATOR_TOPIC, RedisError, WakeBus, agent_topic};
use flotilla_store::metrics::{MetricsStore, Retention};
use flotilla_store::{Store, StoreConfig, StoreError};
use flotilla_telemetry::liveness::AgentProber;
use flotilla_telemetry::{Health, Telemetry};
use flotilla_types::NodeId;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Cli, Command, DaemonConfig, Roles};
pub use flotilla_metrics;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the control database: {0}")]
    Store(#[from] StoreError),
    #[error("Redis: {0}")]
    Redis(#[from] RedisError),
    #[error("the Docker Engine: {0}")]
    Docker(#[from] DockerError),
    #[error("the node agent: {0}")]
    Agent(#[from] AgentError),
    #[error("the metrics pipeline: {0}")]
    Metrics(#[from] MetricsError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no authentication is configured: give the API an OIDC provider with --oidc-issuer and \
         --oidc-audience (or, on a development machine only, --insecure-dev-auth)"
    )]
    NoAuthentication,
    #[error("the OIDC settings: {0}")]
    Oidc(#[from] flotilla_oidc::TokenError),
    #[error("start-up cancelled")]
    Cancelled,
    #[error("certificates: {0}")]
    Certificates(#[from] flotilla_acme::AcmeError),
    #[error("DNS: {0}")]
    Dns(#[from] flotilla_dns::DnsError),
    #[error("the node watch's HTTP client: {0}")]
    NodeWatch(#[source] reqwest::Error),
}

/// Everything a daemon is started with, in code (tests) or from flags.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    pub roles: Roles,
    pub database_url: String,
    pub redis: Option<(String, String)>,
    pub listen: SocketAddr,
    pub auth: AuthSettings,
    pub docker: DockerConfig,
    pub agent: AgentConfig,
    pub orchestrator: OrchestratorConfig,
    pub metrics: MetricsSettings,
    pub rate_limits: RateLimitSettings,
    pub shutdown_grace: Duration,
    /// Shared by every process of a cluster for their internal endpoints
    /// (the API reading logs from agents); random when not given, which
    /// only works when API and agent run in one process.
    pub internal_token: Option<String>,
    pub domains: DomainSettings,
    /// Certificates Flotilla orders itself (off when `None`).
    pub certificates: Option<CertificateSettings>,
    /// How the orchestrator role serves the route table.
    pub route_table: flotilla_edge::ServeConfig,
}

/// How custom domains are proven, and where users reach them.
#[derive(Debug, Clone)]
pub struct DomainSettings {
    pub token_ttl: Duration,
    /// Name servers asked (the system's configuration when empty).
    pub dns_servers: Vec<SocketAddr>,
    /// The ports users reach the edge's HTTP and HTTPS on (for URLs).
    pub edge_ports: (u16, u16),
}

impl Default for DomainSettings {
    fn default() -> Self {
        Self { token_ttl: Duration::from_secs(7 * 24 * 3600), dns_servers: Vec::new(), edge_ports: (80, 443) }
    }
}

/// The ACME side: where to order, and the secret that seals keys.
#[derive(Debug, Clone)]
pub struct CertificateSettings {
    pub acme: flotilla_acme::AcmeSettings,
    pub key_file: std::path::PathBuf,
}

/// How the API authenticates its callers.
#[derive(Debug, Clone, Default)]
pub enum AuthSettings {
    /// Not configured: a daemon with the API role refuses to start.
    #[default]
    None,
    /// Development only: every request is the default organization's owner.
    InsecureDevelopment,
    /// Bearer tokens of an OIDC provider; `platform_admins` are subjects.
    Oidc { settings: OidcSettings, platform_admins: Vec<String> },
}

/// API rate limits; `None`: unlimited.
#[derive(Debug, Clone, Copy, Default)]
pub struct RateLimitSettings {
    pub per_user: Option<Limit>,
    pub per_organization: Option<Limit>,
}

/// The metrics side of a daemon.
#[derive(Debug, Clone)]
pub struct MetricsSettings {
    /// The agent's pipeline; `None` turns it off.
    pub pipeline: Option<MetricsConfig>,
    /// Where metrics are stored (default: the control database).
    pub database_url: Option<String>,
    pub retention: Retention,
    /// How often the orchestrator runs the store's maintenance job.
    pub maintenance_interval: Duration,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            pipeline: Some(MetricsConfig::default()),
            database_url: None,
            retention: Retention::default(),
            maintenance_interval: Duration::from_secs(300),
        }
    }
}

impl DaemonSettings {
    pub fn from_config(roles: Roles, config: &DaemonConfig) -> Self {
        Self {
            roles,
            // Set by clap or by DaemonConfig::read_secret_files.
            database_url: config.database_url.clone().unwrap_or_default(),
            redis: config.redis_url.clone().map(|url| (url, config.redis_prefix.clone())),
            listen: config.listen,
            auth: config.auth_settings(),
            rate_limits: RateLimitSettings {
                per_user: (config.rate_limit_user > 0.0)
                    .then_some(Limit { per_second: config.rate_limit_user, burst: config.rate_limit_user_burst }),
                per_organization: (config.rate_limit_organization > 0.0).then_some(Limit {
                    per_second: config.rate_limit_organization,
                    burst: config.rate_limit_organization_burst,
                }),
            },
            docker: DockerConfig { socket: config.docker_socket.clone(), timeout: None },
            agent: config.agent_config(),
            orchestrator: config.orchestrator_config(),
            metrics: MetricsSettings {
                pipeline: config.metrics_config(),
                database_url: config.metrics.metrics_database_url.clone(),
                retention: config.retention(),
                maintenance_interval: config.metrics.metrics_maintenance_interval,
            },
            shutdown_grace: config.shutdown_grace,
            internal_token: config.internal_token.clone(),
            domains: config.domain_settings(),
            certificates: config.certificate_settings(),
            route_table: config.route_table_serving(),
        }
    }
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    pub local_addr: SocketAddr,
    pub node_id: Option<NodeId>,
    pub telemetry: Telemetry,
    pub agent: Option<Arc<Agent>>,
    pub orchestrator: Option<Arc<Orchestrator>>,
    pub metrics: Option<Arc<MetricsPipeline>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    grace: Duration,
}

impl Daemon {
    /// Starts the configured roles. Waits for the database (retrying) and
    /// applies migrations first; `cancel` aborts the wait and, later, stops
    /// the daemon.
    pub async fn start(settings: DaemonSettings, cancel: CancellationToken) -> Result<Self, DaemonError> {
        let telemetry = Telemetry::new("flotillad", VERSION);
        let store = Store::connect_lazy(&StoreConfig::new(&settings.database_url))?;
        migrate_when_reachable(&store, &cancel).await?;
        telemetry.health.set("database", Health::Ok, None, serde_json::json!({}));

        let wake = match &settings.redis {
            Some((url, prefix)) => WakeBus::with_redis(url, prefix)?,
            None => WakeBus::local_only(),
        };
        telemetry.register(Box::new(flotilla_redis::metrics::collector(&wake)));

        let feed = match &settings.redis {
            Some((url, prefix)) => {
                let feed = LiveFeed::new(url, prefix)?;
                telemetry.register(Box::new(flotilla_redis::metrics::live_collector(&feed)));
                Some(feed)
            }
            None => None,
        };

        let tracker = TaskTracker::new();
        let roles = settings.roles;
        let mut topics = Vec::new();
        // PostgreSQL's change notices: status streams and the view cache
        // (API), the route table (orchestrator). One listening connection.
        let (changes, _) = tokio::sync::broadcast::channel(4096);
        if roles.api || roles.orchestrator {
            let (store, changes, stop) = (store.clone(), changes.clone(), cancel.clone());
            tracker.spawn(async move { store.announce_changes(changes, stop).await });
        }

        let wants_metrics_store =
            roles.api || roles.orchestrator || (roles.agent && settings.metrics.pipeline.is_some());
        let metrics_store = if wants_metrics_store {
            Some(metrics_store_when_reachable(&store, &settings, &cancel).await?)
        } else {
            None
        };

        let internal_token: Arc<str> = match &settings.internal_token {
            Some(token) => token.as_str().into(),
            None => {
                use base64::Engine as _;
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>()).into()
            }
        };
        let orchestrator = match roles.orchestrator {
            true => {
                topics.push(ORCHESTRATOR_TOPIC.to_owned());
                let prober = AgentProber::new(internal_token.clone(), settings.orchestrator.node_watch.probe_timeout)
                    .map_err(DaemonError::NodeWatch)?;
                Some(Orchestrator::new(
                    settings.orchestrator.clone(),
                    store.clone(),
                    wake.clone(),
                    telemetry.clone(),
                    Some(prober),
                ))
            }
            false => None,
        };

        let (agent, pipeline) = if roles.agent {
            let docker = DockerClient::connect(&settings.docker).await?;
            let agent = Agent::new(
                settings.agent.clone(),
                store.clone(),
                docker.clone(),
                wake.clone(),
                telemetry.clone(),
                internal_token.clone(),
            )
            .await?;
            topics.push(agent_topic(agent.node_id().as_str()));
            let pipeline = match &settings.metrics.pipeline {
                Some(config) => Some(
                    MetricsPipeline::new(
                        config.clone(),
                        agent.node_id().clone(),
                        docker,
                        metrics_store.clone(),
                        feed.clone(),
                        telemetry.clone(),
                    )
                    .await?,
                ),
                None => None,
            };
            (Some(agent), pipeline)
        } else {
            (None, None)
        };

        let api_state = if roles.api {
            let auth = match &settings.auth {
                AuthSettings::None => return Err(DaemonError::NoAuthentication),
                AuthSettings::InsecureDevelopment => {
                    let (org, project) =
                        flotilla_store::tenant::ensure_organization(store.pool(), "default", "Default").await?;
                    let user = store.ensure_member(org, "dev", "owner").await?;
                    Authenticator::insecure_development(org, project, user)
                }
                AuthSettings::Oidc { settings, platform_admins } => {
                    let oidc = Arc::new(Oidc::new(settings.clone())?);
                    telemetry.register(Box::new(flotilla_oidc::metrics::collector(&oidc)));
                    // The provider may be away at start: requests answer
                    // `unavailable` until it is reachable, and discovery retries.
                    if let Err(error) = oidc.warm_up().await {
                        tracing::warn!(%error, "the OIDC provider cannot be reached yet; will retry on each request");
                    }
                    Authenticator::Oidc(OidcAuthenticator::new(oidc, store.clone(), platform_admins.clone()))
                }
            };
            // Live samples: from every node through Redis, else from this
            // process's own pipeline.
            let live = match (&feed, &pipeline) {
                (Some(feed), _) => {
                    let config = settings.metrics.pipeline.clone().unwrap_or_default();
                    let view = LiveView::from_config(&config);
                    let receiver = flotilla_metrics::remote::spawn_receiver(feed, view.clone(), cancel.clone());
                    tracker.spawn(async move {
                        let _ = receiver.await;
                    });
                    Some(view)
                }
                (None, Some(pipeline)) => Some(pipeline.live().clone()),
                (None, None) => None,
            };
            let metrics = flotilla_api::MetricsAccess { store: metrics_store.clone(), live };
            let limiter = match &settings.redis {
                Some((url, prefix)) => RateLimiter::with_redis(url, prefix)?,
                None => RateLimiter::local_only(),
            };
            let limits = flotilla_api::RateLimits {
                limiter,
                per_user: settings.rate_limits.per_user,
                per_organization: settings.rate_limits.per_organization,
            };
            let dns = match settings.domains.dns_servers.as_slice() {
                [] => flotilla_dns::DnsResolver::system()?,
                servers => flotilla_dns::DnsResolver::with_servers(servers),
            };
            let domains = flotilla_api::domains::DomainAccess {
                dns: Arc::new(dns),
                token_ttl: chrono::Duration::from_std(settings.domains.token_ttl).unwrap_or(chrono::Duration::MAX),
                platform_domains: settings.orchestrator.edge.platform_domains.clone(),
                edge_ports: settings.domains.edge_ports,
            };
            Some(
                ApiState::new(store.clone(), wake.clone(), auth, metrics, cancel.clone(), &telemetry, domains)
                    .with_changes(changes.clone())
                    .with_rate_limits(limits, &telemetry)
                    .with_internal_token(internal_token.clone()),
            )
        } else {
            None
        };

        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| DaemonError::Listen { addr: settings.listen, source })?;
        let local_addr =
            listener.local_addr().map_err(|source| DaemonError::Listen { addr: settings.listen, source })?;

        // Background tasks, each stopping on `cancel`.
        if !topics.is_empty() {
            let listener_task = wake.spawn_listener(topics, cancel.clone());
            tracker.spawn(async move {
                let _ = listener_task.await;
            });
        }
        tracker.spawn(database_watch(store.clone(), telemetry.clone(), cancel.clone()));
        if settings.redis.is_some() {
            tracker.spawn(redis_watch(wake.clone(), telemetry.clone(), cancel.clone()));
        }
        if let Some(orchestrator) = &orchestrator {
            orchestrator.spawn(&tracker, cancel.clone());
        }
        if let Some(agent) = &agent {
            agent.spawn(&tracker, cancel.clone());
        }
        if let Some(pipeline) = &pipeline {
            pipeline.spawn(&tracker, cancel.clone());
        }
        if let (true, Some(metrics_store)) = (roles.orchestrator, &metrics_store) {
            flotilla_metrics::maintenance::spawn(
                metrics_store.clone(),
                settings.metrics.retention,
                settings.metrics.maintenance_interval,
                telemetry.clone(),
                &tracker,
                cancel.clone(),
            );
        }

        let certificates = match (&settings.certificates, roles.orchestrator) {
            (Some(certificates), true) => {
                let sealer = Arc::new(flotilla_acme::Sealer::from_file(&certificates.key_file)?);
                let manager = flotilla_acme::CertificateManager::new(store.clone(), certificates.acme.clone(), sealer);
                telemetry.register(Box::new(flotilla_acme::metrics::collector(&manager.stats())));
                manager.spawn(telemetry.clone(), &tracker, cancel.clone());
                Some(manager)
            }
            _ => None,
        };
        let shutdown = cancel.clone().cancelled_owned();
        let mut extra = match roles.orchestrator {
            true => flotilla_edge::start(flotilla_edge::EdgeStart {
                store: store.clone(),
                settings: flotilla_edge::EdgeSettings {
                    flotilla_orders_certificates: certificates.is_some(),
                    ..settings.orchestrator.edge.clone()
                },
                serve: settings.route_table,
                sealer: certificates.as_ref().map(|m| m.sealer()),
                internal_token: internal_token.clone(),
                changes: &changes,
                telemetry: &telemetry,
                tracker: &tracker,
                cancel: cancel.clone(),
            })
            .merge(flotilla_acme::challenge::router(store.clone())),
            false => axum::Router::new(),
        };
        if let (true, AuthSettings::Oidc { settings: oidc, .. }) = (roles.api, &settings.auth) {
            extra = extra.merge(login_config_router(oidc));
        }
        if let Some(agent) = &agent {
            extra = extra.merge(internal::router(agent.clone(), internal_token.clone()));
            let url = format!("http://{}:{}", agent.advertise_address(), local_addr.port());
            if let Err(error) = store.set_agent_url(agent.node_id(), &url).await {
                tracing::warn!(%error, "could not announce this agent's endpoint: the API cannot read its logs");
            }
        }
        match api_state {
            Some(state) => {
                let (views, changes_for_cache) = (state.views.clone(), state.changes.subscribe());
                tracker.spawn(views.follow(changes_for_cache, cancel.clone()));
                let service = flotilla_api::service(state, telemetry.clone(), extra);
                serve(listener, axum::Router::new().fallback_service(service), shutdown, &tracker);
            }
            None => serve(listener, telemetry.router::<()>().merge(extra), shutdown, &tracker),
        }
        tracker.close();
        tracing::info!(%local_addr, api = roles.api, orchestrator = roles.orchestrator, agent = roles.agent, "flotillad started");

        Ok(Self {
            local_addr,
            node_id: agent.as_ref().map(|a| a.node_id().clone()),
            telemetry,
            agent,
            orchestrator,
            metrics: pipeline,
            cancel,
            tracker,
            grace: settings.shutdown_grace,
        })
    }

    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Waits until every task has stopped (after cancellation).
    pub async fn wait(&self) {
        self.tracker.wait().await;
    }

    /// Stops every task and waits up to the grace period. User containers are
    /// left running: the next agent adopts them.
    pub async fn shutdown(self) -> bool {
        self.cancel.cancel();
        let drained = tokio::time::timeout(self.grace, self.tracker.wait()).await.is_ok();
        let grace = self.grace;
        if drained {
            tracing::info!("flotillad stopped");
        } else {
            tracing::warn!(?grace, "tasks still running after the shutdown grace; exiting anyway");
        }
        drained
    }
}

impl Drop for Daemon {
    /// A daemon dropped without `shutdown` still stops its tasks.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Serves `router` on `listener` until `shutdown`, with each connection's
/// addresses known to handlers (the route table tells edge proxies apart by
/// theirs) and TCP_NODELAY.
fn serve(
    listener: TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tracker: &TaskTracker,
) {
    let listener = flotilla_edge::serve::NoDelayListener(listener);
    tracker.spawn(async move {
        let make = router.into_make_service_with_connect_info::<flotilla_edge::serve::Peer>();
        if let Err(error) = axum::serve(listener, make).with_graceful_shutdown(shutdown).await {
            tracing::error!(%error, "HTTP server stopped");
        }
    });
}

/// Applies migrations, retrying while the database is unreachable.
async fn migrate_when_reachable(store: &Store, cancel: &CancellationToken) -> Result<(), DaemonError> {
    let mut delays = flotilla_runtime::retry::delays(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(()),
            Err(error) => {
                let retryable = match &error {
                    StoreError::Migrate(sqlx_error) => {
                        sqlx_error.to_string().contains("error communicating")
                            || sqlx_error.to_string().contains("pool timed out")
                    }
                    other => other.is_unavailable(),
                };
                if !retryable {
                    return Err(error.into());
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(%error, retry_in = ?delay, "waiting for the control database");
                tokio::select! {
                    () = cancel.cancelled() => return Err(DaemonError::Cancelled),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The metrics store, set up once its database is reachable (the control
/// database unless another is configured).
async fn metrics_store_when_reachable(
    control: &Store,
    settings: &DaemonSettings,
    cancel: &CancellationToken,
) -> Result<MetricsStore, DaemonError> {
    let pool = match &settings.metrics.database_url {
        Some(url) if *url != settings.database_url => Store::connect_lazy(&StoreConfig::new(url))?.pool().clone(),
        _ => control.pool().clone(),
    };
    let mut delays = flotilla_runtime::retry::delays(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match MetricsStore::setup(pool.clone(), settings.metrics.retention).await {
            Ok(store) => return Ok(store),
            Err(error) if error.is_unavailable() => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(%error, retry_in = ?delay, "waiting for the metrics database");
                tokio::select! {
                    () = cancel.cancelled() => return Err(DaemonError::Cancelled),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Keeps the `database` health component current.
async fn database_watch(store: Store, telemetry: Telemetry, cancel: CancellationToken) {
    loop {
        let (health, message) = match store.ping().await {
            Ok(()) => (Health::Ok, None),
            Err(error) => (Health::Degraded, Some(error.to_string())),
        };
        telemetry.health.set("database", health, message, serde_json::json!({}));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

/// Keeps the `redis` health component current: Redis away is `degraded`
/// (wake-ups fall back to timers, rate limits to per-process counts), never
/// a reason to restart.
async fn redis_watch(wake: WakeBus, telemetry: Telemetry, cancel: CancellationToken) {
    loop {
        let (health, message) = match wake.ping().await {
            Some(Ok(())) | None => (Health::Ok, None),
            Some(Err(error)) => (
                Health::Degraded,
                Some(format!(
                    "Redis cannot be reached ({error}): wake-ups wait for timers, rate limits count per process"
                )),
            ),
        };
        let stats = wake.stats();
        let detail = serde_json::json!({
            "wake_ups_published": stats.published,
            "wake_up_publish_failures": stats.publish_failures,
            "wake_ups_received": stats.received,
        });
        telemetry.health.set("redis", health, message, detail);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// `GET /login/config`: where `flo login` signs in (the issuer, and the
/// client id the API's audience names), so users need only the API's URL.
/// Public, as discovery documents are: it holds no secret.
fn login_config_router(oidc: &OidcSettings) -> axum::Router {
    let config = serde_json::json!({ "issuer": oidc.issuer, "client_id": oidc.audience });
    axum::Router::new().route("/login/config", axum::routing::get(move || async move { axum::Json(config) }))
}
