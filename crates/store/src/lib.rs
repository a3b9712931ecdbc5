//! The control database: tenants, desired state, placements, nodes and routing.
//!
//! Access is split by who may do what:
//! - [`Store::tenant`] gives the queries users' requests run; each of them is
//!   scoped to one organization in its SQL, so a handler cannot forget it;
//! - [`placement`] holds the orchestrator's queries, [`replicas`] the node
//!   agent's, [`nodes`] the heartbeat and node listing.

pub mod audit;
pub mod backups;
pub mod changes;
mod copy;
pub mod domains;
mod error;
pub mod metrics;
pub mod models;
pub mod nodes;
pub mod organizations;
pub mod placement;
pub mod replicas;
pub mod routes;
pub mod serving;
pub mod tenant;
pub mod users;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub use error::StoreError;
pub use models::*;
pub use tenant::Tenant;

use flotilla_types::OrganizationId;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Connection settings for the control database.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub url: String,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// The server ends a session left idle inside a transaction this long.
    /// A client that vanished mid-transaction (its container killed, its
    /// connection through a proxy left open) otherwise holds its row locks
    /// for good: seen on the cluster, one agent's heartbeat transaction
    /// left open stopped every heartbeat and the leader lease for 13 min.
    /// Flotilla's transactions never wait on anything but the database.
    pub idle_in_transaction_timeout: Duration,
}

impl StoreConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            idle_in_transaction_timeout: Duration::from_secs(15),
        }
    }
}

/// A handle on the control database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects lazily: the pool opens connections when first used, so a
    /// process can start while PostgreSQL is still coming up.
    pub fn connect_lazy(config: &StoreConfig) -> Result<Self, StoreError> {
        let options: PgConnectOptions =
            config.url.parse::<PgConnectOptions>().map_err(StoreError::db("parsing the database URL"))?;
        let idle = format!("{}ms", config.idle_in_transaction_timeout.as_millis().max(1));
        let options = options.options([("idle_in_transaction_session_timeout", idle.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            .connect_lazy_with(options);
        Ok(Self { pool })
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies every pending migration in `migrations/`. Safe to run from
    /// several processes at once: sqlx takes an advisory lock.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Answers whether the database can be reached right now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(StoreError::db("ping"))?;
        Ok(())
    }

    /// The queries of one organization's users.
    pub fn tenant(&self, organization_id: OrganizationId) -> Tenant<'_> {
        Tenant::new(&self.pool, organization_id)
    }
}

/// The migrations compiled into this binary, for tests and diagnostics.
pub fn migrator() -> &'static sqlx::migrate::Migrator {
    &MIGRATOR
}
