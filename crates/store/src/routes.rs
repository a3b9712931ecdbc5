//! The cluster-wide route table: every route with the replicas that may
//! receive traffic right now.

use uuid::Uuid;

use crate::{Store, StoreError};

/// One route and where its traffic goes.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RouteTableRow {
    pub deployment_id: Uuid,
    pub router_name: String,
    pub domain: String,
    pub path_prefix: String,
    /// `http` or `h2c`.
    pub protocol: String,
    pub tls_enabled: bool,
    pub cert_resolver: Option<String>,
    pub middlewares: Vec<String>,
    /// (address, host port) of every replica that serves: running, not
    /// unhealthy or starting, not retiring, on a ready node.
    pub servers: Vec<String>,
    pub ports: Vec<i32>,
    /// Its deployment proved the domain (a custom domain is routed only then).
    pub domain_verified: bool,
}

impl Store {
    /// Read in one statement, so it is one consistent snapshot of
    /// `deployment_routing` and `deployment_locations`: a replica that
    /// stopped, failed, moved or whose node went down is not in it.
    pub async fn route_table(&self) -> Result<Vec<RouteTableRow>, StoreError> {
        sqlx::query_as(
            "SELECT r.deployment_id, r.router_name, r.domain, r.path_prefix, r.protocol, r.tls_enabled, r.cert_resolver, \
             r.middlewares, \
             coalesce(array_agg(l.address ORDER BY l.replica_index, l.id) FILTER (WHERE l.id IS NOT NULL), '{}') \
             AS servers, \
             coalesce(array_agg(l.port ORDER BY l.replica_index, l.id) FILTER (WHERE l.id IS NOT NULL), '{}') \
             AS ports, \
             EXISTS (SELECT 1 FROM domain_verifications v WHERE v.deployment_id = r.deployment_id \
                     AND v.domain = r.domain AND v.verified_at IS NOT NULL) AS domain_verified \
             FROM deployment_routing r JOIN deployments d ON d.id = r.deployment_id \
             LEFT JOIN deployment_locations l ON l.deployment_id = r.deployment_id AND l.status = 'running' \
             AND l.address IS NOT NULL AND l.port IS NOT NULL \
             AND l.health_status NOT IN ('unhealthy', 'starting') \
             AND l.drain_state IS DISTINCT FROM 'retiring' \
             AND EXISTS (SELECT 1 FROM node_metadata n WHERE n.node_id = l.node_id AND n.status = 'ready') \
             WHERE d.desired_state = 'running' \
             GROUP BY r.id ORDER BY r.router_name, r.path_prefix",
        )
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::db("reading the route table"))
    }
}

/// A deployment's routing row, as the edge serves it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RoutingRecord {
    pub domain: String,
    pub path_prefix: String,
    pub target_port: i32,
    pub protocol: String,
    pub tls_enabled: bool,
    pub router_name: String,
}

impl crate::Tenant<'_> {
    /// The routing rows of one of the organization's deployments.
    pub async fn routings(&self, deployment: flotilla_types::DeploymentId) -> Result<Vec<RoutingRecord>, StoreError> {
        sqlx::query_as(
            "SELECT r.domain, r.path_prefix, r.target_port, r.protocol, r.tls_enabled, r.router_name \
             FROM deployment_routing r JOIN deployments d ON d.id = r.deployment_id \
             WHERE d.organization_id = $1 AND d.id = $2 ORDER BY r.domain, r.path_prefix",
        )
        .bind(self.organization_id.as_uuid())
        .bind(deployment.as_uuid())
        .fetch_all(self.pool)
        .await
        .map_err(StoreError::db("reading routings"))
    }
}
