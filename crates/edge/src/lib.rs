//! The edge: how a request for an app reaches one of its replicas. This
//! crate owns routing, end to end:
//! - [`rules`]: Traefik rules built only from validated domains and paths;
//! - [`render`]: the route table as Traefik v3 dynamic configuration;
//! - [`table`]: the rendered table, kept current from PostgreSQL's change
//!   notices (rendered once per change, never per poll);
//! - [`serve`]: `GET /traefik/dynamic` for Traefik's HTTP provider,
//!   long-polled so a change reaches Traefik at once, and which table each
//!   proxy holds;
//! - [`sync`]: what an agent waits for before it stops a container: every
//!   proxy holding a table that no longer sends the container requests;
//! - [`traefik_config`]: the shipped Traefik configuration made fit for one
//!   machine (the quickstart and the tests run it).
//!
//! What is stored (routes, the route table's read, the proxies) is in
//! `flotilla_store::routes`.

pub mod metrics;
pub mod render;
pub mod rules;
pub mod serve;
pub mod sync;
pub mod table;
pub mod traefik_config;

use flotilla_types::Hostname;

pub use render::{RenderedTable, TlsCertificate};
pub use rules::Route;
pub use serve::{EdgeServer, ROUTE_TABLE_PATH};
pub use sync::{EdgeSync, EdgeSyncConfig, SyncOutcome};
pub use table::RouteTable;

/// How a route terminates TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// Plain HTTP.
    Off,
    /// TLS with a certificate from this Traefik certificate resolver (ACME).
    Resolver(String),
    /// TLS with a certificate Traefik already has (default or stored).
    Stored,
}

/// Platform-wide routing settings, from the orchestrator's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeSettings {
    pub http_entrypoint: String,
    pub https_entrypoint: String,
    pub tls: Tls,
    /// The operator's domains (and everything under them): routed without
    /// proof. Any other domain must be verified by its deployment first.
    pub platform_domains: Vec<Hostname>,
    /// Flotilla orders the certificates of custom domains itself: their
    /// routers never name Traefik's resolver (Traefik would order a second
    /// certificate and serve that one).
    pub flotilla_orders_certificates: bool,
}

impl Default for EdgeSettings {
    fn default() -> Self {
        Self {
            http_entrypoint: "web".to_owned(),
            https_entrypoint: "websecure".to_owned(),
            tls: Tls::Off,
            platform_domains: Vec::new(),
            flotilla_orders_certificates: false,
        }
    }
}

impl EdgeSettings {
    /// The TLS columns of a route row: whether it is served over TLS, and
    /// the resolver that gets its certificate.
    pub fn route_tls(&self) -> (bool, Option<String>) {
        match &self.tls {
            Tls::Off => (false, None),
            Tls::Resolver(resolver) => (true, Some(resolver.clone())),
            Tls::Stored => (true, None),
        }
    }
}

/// How the route table is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeConfig {
    /// The longest a proxy's poll is held (it asks with `?wait=N`).
    pub max_wait: std::time::Duration,
    /// The table is rendered again at least this often, changes or not (a
    /// lost notice, a certificate expiring).
    pub refresh: std::time::Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self { max_wait: std::time::Duration::from_secs(5), refresh: std::time::Duration::from_secs(30) }
    }
}

/// What [`start`] needs.
#[derive(Debug)]
pub struct EdgeStart<'a> {
    pub store: flotilla_store::Store,
    pub settings: EdgeSettings,
    pub serve: ServeConfig,
    /// Opens the keys of certificates Flotilla ordered (then served to
    /// callers with the internal token); `None` when it orders none.
    pub sealer: Option<std::sync::Arc<flotilla_acme::Sealer>>,
    pub internal_token: std::sync::Arc<str>,
    /// PostgreSQL's change notices (`Store::announce_changes`).
    pub changes: &'a tokio::sync::broadcast::Sender<flotilla_store::changes::Change>,
    pub telemetry: &'a flotilla_telemetry::Telemetry,
    pub tracker: &'a tokio_util::task::TaskTracker,
    pub cancel: tokio_util::sync::CancellationToken,
}

/// Starts keeping the route table current and returns its router (`GET
/// /traefik/dynamic`; serve it with connection info).
pub fn start(edge: EdgeStart<'_>) -> axum::Router {
    let stats = std::sync::Arc::new(metrics::EdgeStats::default());
    edge.telemetry.register(Box::new(metrics::table_collector(&stats)));
    let table = RouteTable::new(edge.store.clone(), edge.settings, edge.sealer, edge.serve.refresh, stats.clone());
    let server = EdgeServer::new(
        table.clone(),
        edge.store,
        edge.internal_token,
        edge.serve.max_wait,
        stats,
        edge.tracker,
        edge.cancel.clone(),
    );
    let (changes, telemetry, cancel) = (edge.changes.subscribe(), edge.telemetry.clone(), edge.cancel);
    edge.tracker.spawn(async move { table.run(changes, telemetry, cancel).await });
    server.router()
}
