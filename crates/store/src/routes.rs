//! Everything routing keeps in the database: the routes the orchestrator
//! writes (`deployment_routing`), the route table the edge renders from
//! them and from the replicas that serve, and the edge proxies that take it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_types::{DbSnapshot, DeploymentId, Hostname, PathPrefix};
use uuid::Uuid;

use flotilla_types::snapshot::BadSnapshot;

use crate::domains::StoredCertificate;
use crate::error::unique_violation;
use crate::models::corrupt;
use crate::serving::{APP_DOWN, SERVING};
use crate::{Store, StoreError};

/// The NOTIFY channel of the triggers on everything the route table reads
/// (migration 20261206000001).
pub const CHANNEL: &str = "flotilla_routes_changed";

/// A route as the orchestrator writes it for a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRecord {
    pub deployment_id: DeploymentId,
    pub domain: Hostname,
    pub path_prefix: PathPrefix,
    pub tls_enabled: bool,
    /// The Traefik certificate resolver that gets its certificate.
    pub cert_resolver: Option<String>,
}

/// One route and where its traffic goes.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RouteTableRow {
    pub deployment_id: Uuid,
    pub domain: String,
    pub path_prefix: String,
    pub tls_enabled: bool,
    pub cert_resolver: Option<String>,
    /// (address, host port) of every replica that serves
    /// ([`flotilla_types::serving`]).
    pub servers: Vec<String>,
    pub ports: Vec<i32>,
    /// Its deployment proved the domain (a custom domain is routed only then).
    pub domain_verified: bool,
    /// The app is down rather than not there yet: scaled to zero, or a
    /// replica it wants crashed or exited (the edge answers 503, not 404).
    pub down: bool,
}

#[derive(sqlx::FromRow)]
struct RouteRow {
    deployment_id: Uuid,
    domain: String,
    path_prefix: String,
    tls_enabled: bool,
    cert_resolver: Option<String>,
    domain_verified: bool,
    down: bool,
}

/// Each route with the servers of its deployment; both come sorted by
/// deployment, so one merge pass does it.
fn join_servers(routes: Vec<RouteRow>, servers: Vec<(Uuid, String, i32)>) -> Vec<RouteTableRow> {
    let mut servers = servers.into_iter().peekable();
    let mut rows: Vec<RouteTableRow> = Vec::with_capacity(routes.len());
    for route in routes {
        while servers.next_if(|(deployment, _, _)| *deployment < route.deployment_id).is_some() {}
        let (mut addresses, mut ports) = (Vec::new(), Vec::new());
        // Several routes of one deployment (path prefixes) share its servers.
        match rows.last().filter(|previous| previous.deployment_id == route.deployment_id) {
            Some(previous) => (addresses, ports) = (previous.servers.clone(), previous.ports.clone()),
            None => {
                while let Some((_, address, port)) = servers.next_if(|(d, _, _)| *d == route.deployment_id) {
                    addresses.push(address);
                    ports.push(port);
                }
            }
        }
        rows.push(RouteTableRow {
            deployment_id: route.deployment_id,
            domain: route.domain,
            path_prefix: route.path_prefix,
            tls_enabled: route.tls_enabled,
            cert_resolver: route.cert_resolver,
            servers: addresses,
            ports,
            domain_verified: route.domain_verified,
            down: route.down,
        });
    }
    rows
}

/// The route table as of one snapshot of the database.
#[derive(Debug, Clone)]
pub struct RouteTableRead {
    pub rows: Vec<RouteTableRow>,
    /// Issued, unexpired certificates of routed domains (when asked for).
    pub certificates: Vec<StoredCertificate>,
    /// What the read saw: a proxy holding this table holds every change
    /// committed in it.
    pub snapshot: DbSnapshot,
}

/// What the edge saw of a proxy taking the route table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeProxySighting<'a> {
    /// `name@address`: one proxy process.
    pub id: &'a str,
    pub name: &'a str,
    pub address: &'a str,
    /// The snapshot of the newest table it serves, when that changed.
    pub holds: Option<&'a DbSnapshot>,
}

/// An edge proxy as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeProxyRecord {
    pub id: String,
    pub name: String,
    pub address: String,
    /// The snapshot of the newest table it serves (none yet: `None`).
    pub holds: Option<DbSnapshot>,
    pub applied_at: Option<DateTime<Utc>>,
    pub seen_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct EdgeProxyRow {
    id: String,
    name: String,
    address: String,
    snapshot: Option<String>,
    applied_at: Option<DateTime<Utc>>,
    seen_at: DateTime<Utc>,
}

impl Store {
    /// The route table, read in one snapshot that it reports: every route
    /// of a running deployment with the replicas that serve, and (when
    /// `with_certificates`) the certificates of routed domains.
    pub async fn read_route_table(&self, with_certificates: bool) -> Result<RouteTableRead, StoreError> {
        let op = "reading the route table";
        let mut tx = self.pool().begin().await.map_err(StoreError::db(op))?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
        // The first statement takes the transaction's snapshot: this one.
        let snapshot: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
        // Planned per call and read once per change: no JIT, sorts in memory.
        sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await.map_err(StoreError::db(op))?;
        sqlx::query("SET LOCAL work_mem = '64MB'").execute(&mut *tx).await.map_err(StoreError::db(op))?;
        // Routes, then the servers of all of them, joined here: two plain
        // scans cost a third of one grouped query at 100,000 routes.
        let sql = format!(
            "SELECT r.deployment_id, r.domain, r.path_prefix, r.tls_enabled, r.cert_resolver, \
             EXISTS (SELECT 1 FROM domain_verifications v WHERE v.deployment_id = r.deployment_id \
                     AND v.domain = r.domain AND v.verified_at IS NOT NULL) AS domain_verified, \
             {APP_DOWN} AS down \
             FROM deployment_routing r JOIN deployments d ON d.id = r.deployment_id \
             WHERE d.desired_state = 'running' ORDER BY r.deployment_id, r.path_prefix"
        );
        let routes: Vec<RouteRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *tx).await.map_err(StoreError::db(op))?;
        let sql = format!(
            "SELECT l.deployment_id, l.address, l.port FROM deployment_locations l \
             JOIN deployments d ON d.id = l.deployment_id WHERE {SERVING} \
             ORDER BY l.deployment_id, l.replica_index, l.id"
        );
        let servers: Vec<(Uuid, String, i32)> =
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *tx).await.map_err(StoreError::db(op))?;
        let rows = join_servers(routes, servers);
        let certificates = if with_certificates {
            sqlx::query_as(
                "SELECT c.domain, c.chain_pem, c.key_sealed, c.not_after FROM certificates c \
                 WHERE c.chain_pem IS NOT NULL AND c.key_sealed IS NOT NULL AND c.not_after > now() \
                 AND EXISTS (SELECT 1 FROM deployment_routing r JOIN deployments d ON d.id = r.deployment_id \
                             WHERE r.domain = c.domain AND d.desired_state = 'running') \
                 ORDER BY c.domain",
            )
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::db(op))?
        } else {
            Vec::new()
        };
        tx.commit().await.map_err(StoreError::db(op))?;
        let snapshot = parse_snapshot(&snapshot)?;
        Ok(RouteTableRead { rows, certificates, snapshot })
    }

    /// A snapshot taken now: it holds every change committed so far.
    pub async fn current_snapshot(&self) -> Result<DbSnapshot, StoreError> {
        let text: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
            .fetch_one(self.pool())
            .await
            .map_err(StoreError::db("taking a snapshot"))?;
        parse_snapshot(&text)
    }

    /// A snapshot taken now, and a route table notice: every process
    /// serving the table renders it again in a later snapshot, so a proxy
    /// already holding the same table is known to hold this snapshot with no
    /// round trip (writes elsewhere, heartbeats say, would otherwise leave
    /// this snapshot newer than every table until the next route change).
    pub async fn snapshot_for_edge(&self) -> Result<DbSnapshot, StoreError> {
        let text: String =
            sqlx::query_scalar("SELECT pg_current_snapshot()::text FROM (SELECT pg_notify($1, 'sync')) AS notice")
                .bind(CHANNEL)
                .fetch_one(self.pool())
                .await
                .map_err(StoreError::db("taking a snapshot for the edge"))?;
        parse_snapshot(&text)
    }

    /// Records that an edge proxy was heard from, and what table it holds
    /// when that is given.
    pub async fn record_edge_proxy(&self, seen: &EdgeProxySighting<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO edge_proxies (id, name, address, snapshot, applied_at) \
             VALUES ($1, $2, $3, $4, CASE WHEN $4 IS NULL THEN NULL ELSE now() END) \
             ON CONFLICT (id) DO UPDATE SET seen_at = now(), name = EXCLUDED.name, address = EXCLUDED.address, \
             snapshot = coalesce(EXCLUDED.snapshot, edge_proxies.snapshot), \
             applied_at = coalesce(EXCLUDED.applied_at, edge_proxies.applied_at)",
        )
        .bind(seen.id)
        .bind(seen.name)
        .bind(seen.address)
        .bind(seen.holds.map(ToString::to_string))
        .execute(self.pool())
        .await
        .map_err(StoreError::db("recording an edge proxy"))?;
        Ok(())
    }

    /// The edge proxies heard from within `within` (the others are taken
    /// for gone), newest first.
    pub async fn live_edge_proxies(&self, within: Duration) -> Result<Vec<EdgeProxyRecord>, StoreError> {
        let rows: Vec<EdgeProxyRow> = sqlx::query_as(
            "SELECT id, name, address, snapshot, applied_at, seen_at FROM edge_proxies \
             WHERE seen_at > now() - make_interval(secs => $1) ORDER BY seen_at DESC, id",
        )
        .bind(within.as_secs_f64())
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::db("reading the edge proxies"))?;
        rows.into_iter()
            .map(|row| {
                let holds = row
                    .snapshot
                    .as_deref()
                    .map(str::parse)
                    .transpose()
                    .map_err(|e: BadSnapshot| corrupt("edge_proxies", &row.id, e))?;
                Ok(EdgeProxyRecord {
                    id: row.id,
                    name: row.name,
                    address: row.address,
                    holds,
                    applied_at: row.applied_at,
                    seen_at: row.seen_at,
                })
            })
            .collect()
    }

    /// Forgets proxies not heard from for `older_than`; returns how many.
    pub async fn forget_edge_proxies(&self, older_than: Duration) -> Result<u64, StoreError> {
        let deleted = sqlx::query("DELETE FROM edge_proxies WHERE seen_at < now() - make_interval(secs => $1)")
            .bind(older_than.as_secs_f64())
            .execute(self.pool())
            .await
            .map_err(StoreError::db("forgetting edge proxies"))?;
        Ok(deleted.rows_affected())
    }
}

/// PostgreSQL's own text for a snapshot; anything else is a bug.
fn parse_snapshot(text: &str) -> Result<DbSnapshot, StoreError> {
    text.parse().map_err(|e: BadSnapshot| corrupt("pg_current_snapshot()", text, e))
}

/// A deployment's routing row, as the edge serves it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RoutingRecord {
    pub domain: String,
    pub path_prefix: String,
    pub tls_enabled: bool,
    /// The deployment's container port (where its replicas listen).
    pub container_port: i32,
    /// Replicas that serve now ([`flotilla_types::serving`]).
    pub serving_replicas: i64,
    /// Its deployment proved the domain.
    pub domain_verified: bool,
    /// Down rather than not up yet (see [`RouteTableRow::down`]).
    pub down: bool,
}

impl crate::Tenant<'_> {
    /// The routing rows of one of the organization's deployments.
    pub async fn routings(&self, deployment: DeploymentId) -> Result<Vec<RoutingRecord>, StoreError> {
        let sql = format!(
            "SELECT r.domain, r.path_prefix, r.tls_enabled, d.container_port, \
             (SELECT count(*) FROM deployment_locations l WHERE l.deployment_id = d.id AND {SERVING}) \
             AS serving_replicas, \
             EXISTS (SELECT 1 FROM domain_verifications v WHERE v.deployment_id = r.deployment_id \
                     AND v.domain = r.domain AND v.verified_at IS NOT NULL) AS domain_verified, \
             {APP_DOWN} AS down \
             FROM deployment_routing r JOIN deployments d ON d.id = r.deployment_id \
             WHERE d.organization_id = $1 AND d.id = $2 ORDER BY r.domain, r.path_prefix"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(self.organization_id.as_uuid())
            .bind(deployment.as_uuid())
            .fetch_all(self.pool)
            .await
            .map_err(StoreError::db("reading routings"))
    }
}

/// Replaces the routes of `deployments` inside `tx` with `routes`: readers
/// see the old set or the new one, never none in between.
pub(crate) async fn replace_routes(
    tx: &mut sqlx::PgTransaction<'_>,
    deployments: &[Uuid],
    routes: &[&RouteRecord],
    op: &'static str,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM deployment_routing WHERE deployment_id = ANY($1)")
        .bind(deployments)
        .execute(&mut **tx)
        .await
        .map_err(StoreError::db(op))?;
    if routes.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO deployment_routing (id, deployment_id, domain, path_prefix, tls_enabled, cert_resolver) \
         SELECT t.id, t.deployment_id, t.domain, t.path_prefix, t.tls, nullif(t.resolver, '') \
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bool[], $6::text[]) \
         AS t(id, deployment_id, domain, path_prefix, tls, resolver)",
    )
    .bind(routes.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>())
    .bind(routes.iter().map(|r| r.deployment_id.as_uuid()).collect::<Vec<_>>())
    .bind(routes.iter().map(|r| r.domain.to_string()).collect::<Vec<_>>())
    .bind(routes.iter().map(|r| r.path_prefix.to_string()).collect::<Vec<_>>())
    .bind(routes.iter().map(|r| r.tls_enabled).collect::<Vec<_>>())
    .bind(routes.iter().map(|r| r.cert_resolver.clone().unwrap_or_default()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await
    .map_err(|e| match unique_violation(&e) {
        Some(_) => StoreError::AlreadyExists {
            what: format!(
                "a route for {}",
                routes.iter().map(|r| format!("{}{}", r.domain, r.path_prefix)).collect::<Vec<_>>().join(" or ")
            ),
        },
        None => StoreError::db(op)(e),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(deployment: u128, prefix: &str) -> RouteRow {
        RouteRow {
            deployment_id: Uuid::from_u128(deployment),
            domain: format!("app-{deployment}.example.com"),
            path_prefix: prefix.to_owned(),
            tls_enabled: false,
            cert_resolver: None,
            domain_verified: false,
            down: false,
        }
    }

    fn server(deployment: u128, address: &str, port: i32) -> (Uuid, String, i32) {
        (Uuid::from_u128(deployment), address.to_owned(), port)
    }

    #[test]
    fn each_route_gets_the_servers_of_its_own_deployment_in_order() {
        // 2 has two routes, 3 has none served, 4 serves without a route
        // (stopped deployments are left out of the routes, not the servers).
        let routes = vec![route(2, "/"), route(2, "/api"), route(3, "/"), route(5, "/")];
        let servers = vec![
            server(1, "10.0.0.1", 1),
            server(2, "10.0.0.2", 20),
            server(2, "10.0.0.3", 21),
            server(4, "10.0.0.4", 40),
            server(5, "10.0.0.5", 50),
        ];
        let rows = join_servers(routes, servers);
        let got: Vec<(u128, &str, Vec<String>, Vec<i32>)> = rows
            .iter()
            .map(|row| (row.deployment_id.as_u128(), row.path_prefix.as_str(), row.servers.clone(), row.ports.clone()))
            .collect();
        let two = (vec!["10.0.0.2".to_owned(), "10.0.0.3".to_owned()], vec![20, 21]);
        assert_eq!(
            got,
            vec![
                (2, "/", two.0.clone(), two.1.clone()),
                (2, "/api", two.0, two.1),
                (3, "/", vec![], vec![]),
                (5, "/", vec!["10.0.0.5".to_owned()], vec![50]),
            ]
        );
    }
}
