//! The orchestrator's queries: what needs placing, and placing it.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_types::routing::Route;
use flotilla_types::{DeploymentId, Hostname, NodeId, ReplicaId, ResourceLimits};
use sqlx::types::Json;
use uuid::Uuid;

use crate::error::unique_violation;
use crate::models::{NODE_COLUMNS, NodeRow, collect};
use crate::{NodeRecord, Store, StoreError};

/// A running deployment with fewer placed replicas than it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementNeed {
    pub deployment_id: DeploymentId,
    pub name: String,
    pub domain: Option<Hostname>,
    pub container_port: u16,
    pub limits: ResourceLimits,
    pub replicas: u32,
    pub generation: i64,
    /// Replica indexes that already have a row.
    pub placed: Vec<i32>,
}

/// A replica the orchestrator decided to run on `node_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReplica {
    pub id: ReplicaId,
    pub replica_index: i32,
    pub node_id: NodeId,
    pub address: String,
    pub labels: BTreeMap<String, String>,
}

/// A route row as the orchestrator writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRecord {
    pub route: Route,
    pub tls_enabled: bool,
    pub cert_resolver: Option<String>,
}

/// What happened to a placement or a preparation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementOutcome {
    /// This many replica rows were written.
    Placed(usize),
    /// Replica rows on these nodes were prepared for the new generation.
    Prepared(Vec<NodeId>),
    /// The deployment changed or went away since it was read; nothing written.
    Stale,
}

#[derive(sqlx::FromRow)]
struct NeedRow {
    id: Uuid,
    name: String,
    domain: Option<String>,
    container_port: i32,
    memory_limit_bytes: i64,
    cpu_limit_millis: i64,
    replicas: i32,
    generation: i64,
    placed: Vec<i32>,
}

impl NeedRow {
    fn into_need(self) -> Result<PlacementNeed, StoreError> {
        let bad = |detail: String| StoreError::Corrupt { table: "deployments", id: self.id.to_string(), detail };
        Ok(PlacementNeed {
            deployment_id: self.id.into(),
            domain: self
                .domain
                .as_deref()
                .map(|d| Hostname::parse("domain", d))
                .transpose()
                .map_err(|e| bad(e.to_string()))?,
            container_port: u16::try_from(self.container_port).map_err(|e| bad(e.to_string()))?,
            limits: ResourceLimits { memory_bytes: self.memory_limit_bytes, cpu_millis: self.cpu_limit_millis },
            replicas: u32::try_from(self.replicas).map_err(|e| bad(e.to_string()))?,
            name: self.name,
            generation: self.generation,
            placed: self.placed,
        })
    }
}

/// Replaces a deployment's routes inside `tx`: readers see the old set or the
/// new one, never none in between.
async fn replace_routes(
    tx: &mut sqlx::PgTransaction<'_>,
    deployment_id: DeploymentId,
    route: Option<&RouteRecord>,
    op: &'static str,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM deployment_routing WHERE deployment_id = $1")
        .bind(deployment_id.as_uuid())
        .execute(&mut **tx)
        .await
        .map_err(StoreError::db(op))?;
    let Some(record) = route else { return Ok(()) };
    let route = &record.route;
    sqlx::query(
        "INSERT INTO deployment_routing (id, deployment_id, domain, path_prefix, target_port, \
         tls_enabled, cert_resolver, router_name) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(Uuid::now_v7())
    .bind(deployment_id.as_uuid())
    .bind(route.domain.as_str())
    .bind(route.path_prefix.as_str())
    .bind(i32::from(route.target_port))
    .bind(record.tls_enabled)
    .bind(record.cert_resolver.as_deref())
    .bind(route.router_name())
    .execute(&mut **tx)
    .await
    .map_err(|e| match unique_violation(&e) {
        Some(_) => StoreError::AlreadyExists { what: format!("a route for {}{}", route.domain, route.path_prefix) },
        None => StoreError::db(op)(e),
    })?;
    Ok(())
}

impl Store {
    /// Running deployments that want more replicas than they have rows.
    pub async fn deployments_to_place(&self, limit: i64) -> Result<Vec<PlacementNeed>, StoreError> {
        let rows: Vec<NeedRow> = sqlx::query_as(
            "SELECT d.id, d.name, d.domain, d.container_port, d.memory_limit_bytes, d.cpu_limit_millis, \
             d.replicas, d.generation, \
             coalesce(array_agg(l.replica_index) FILTER (WHERE l.id IS NOT NULL), '{}') AS placed \
             FROM deployments d LEFT JOIN deployment_locations l ON l.deployment_id = d.id \
             WHERE d.desired_state = 'running' \
             GROUP BY d.id HAVING count(l.id) < d.replicas ORDER BY d.id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::db("finding deployments to place"))?;
        rows.into_iter().map(NeedRow::into_need).collect()
    }

    /// Nodes that may take new work: active, ready, heard from recently.
    pub async fn schedulable_nodes(&self, heartbeat_within: Duration) -> Result<Vec<NodeRecord>, StoreError> {
        let sql = format!(
            "SELECT {NODE_COLUMNS} FROM node_metadata WHERE availability = 'active' AND status = 'ready' \
             AND last_heartbeat > now() - make_interval(secs => $1) ORDER BY node_id"
        );
        let rows: Vec<NodeRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(heartbeat_within.as_secs_f64())
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::db("listing schedulable nodes"))?;
        collect(rows)
    }

    /// Writes replica rows and the deployment's route in one transaction,
    /// provided the deployment is still at `generation` and running. A
    /// replica index that already has a row is skipped, so placing twice
    /// cannot create a second replica.
    pub async fn commit_placement(
        &self,
        deployment_id: DeploymentId,
        generation: i64,
        replicas: &[NewReplica],
        route: Option<&RouteRecord>,
    ) -> Result<PlacementOutcome, StoreError> {
        let op = "committing a placement";
        let mut tx = self.pool().begin().await.map_err(StoreError::db(op))?;
        let current: Option<(i64, String, i32, String, Option<String>)> = sqlx::query_as(
            "SELECT generation, desired_state, container_port, name, domain FROM deployments WHERE id = $1 FOR UPDATE",
        )
        .bind(deployment_id.as_uuid())
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        let Some((current_generation, desired_state, container_port, _name, domain)) = current else {
            return Ok(PlacementOutcome::Stale);
        };
        if current_generation != generation || desired_state != "running" {
            return Ok(PlacementOutcome::Stale);
        }
        let mut placed = 0;
        for replica in replicas {
            let inserted = sqlx::query(
                "INSERT INTO deployment_locations (id, deployment_id, node_id, replica_index, generation, \
                 target_generation, status, address, container_port, domain, labels) \
                 VALUES ($1, $2, $3, $4, $5, $5, 'pending', $6, $7, $8, $9) \
                 ON CONFLICT (deployment_id, replica_index) DO NOTHING",
            )
            .bind(replica.id.as_uuid())
            .bind(deployment_id.as_uuid())
            .bind(replica.node_id.as_str())
            .bind(replica.replica_index)
            .bind(generation)
            .bind(&replica.address)
            .bind(container_port)
            .bind(domain.as_deref())
            .bind(Json(&replica.labels))
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
            if inserted.rows_affected() == 1 {
                placed += 1;
                sqlx::query("UPDATE node_metadata SET deployment_count = deployment_count + 1 WHERE node_id = $1")
                    .bind(replica.node_id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::db(op))?;
            }
        }
        replace_routes(&mut tx, deployment_id, route, op).await?;
        tx.commit().await.map_err(StoreError::db(op))?;
        Ok(PlacementOutcome::Placed(placed))
    }

    /// Deployments whose replicas are not all prepared for the current
    /// generation (their labels and route date from an older one).
    pub async fn generations_to_prepare(&self, limit: i64) -> Result<Vec<PlacementNeed>, StoreError> {
        let rows: Vec<NeedRow> = sqlx::query_as(
            "SELECT d.id, d.name, d.domain, d.container_port, d.memory_limit_bytes, d.cpu_limit_millis, \
             d.replicas, d.generation, '{}'::int[] AS placed \
             FROM deployments d WHERE d.desired_state <> 'deleted' AND EXISTS (SELECT 1 FROM deployment_locations l \
             WHERE l.deployment_id = d.id AND l.target_generation < d.generation) ORDER BY d.id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::db("finding generations to prepare"))?;
        rows.into_iter().map(NeedRow::into_need).collect()
    }

    /// Prepares every replica of a deployment for `generation`: their labels
    /// and the route are replaced in one transaction, provided the deployment
    /// is still at `generation`. Agents roll a replica over only once it is
    /// prepared, so a container never gets one generation's spec with another
    /// generation's labels.
    pub async fn prepare_generation(
        &self,
        deployment_id: DeploymentId,
        generation: i64,
        labels: &BTreeMap<String, String>,
        route: Option<&RouteRecord>,
    ) -> Result<PlacementOutcome, StoreError> {
        let op = "preparing a generation";
        let mut tx = self.pool().begin().await.map_err(StoreError::db(op))?;
        let current: Option<(i64, String)> =
            sqlx::query_as("SELECT generation, desired_state FROM deployments WHERE id = $1 FOR UPDATE")
                .bind(deployment_id.as_uuid())
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::db(op))?;
        match current {
            Some((current, state)) if current == generation && state != "deleted" => {}
            _ => return Ok(PlacementOutcome::Stale),
        }
        let nodes: Vec<String> = sqlx::query_scalar(
            "UPDATE deployment_locations SET labels = $3, target_generation = $2, \
             domain = (SELECT domain FROM deployments WHERE id = $1), updated_at = now() \
             WHERE deployment_id = $1 AND target_generation < $2 RETURNING node_id",
        )
        .bind(deployment_id.as_uuid())
        .bind(generation)
        .bind(Json(labels))
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        replace_routes(&mut tx, deployment_id, route, op).await?;
        tx.commit().await.map_err(StoreError::db(op))?;
        let mut nodes: Vec<NodeId> = nodes.iter().filter_map(|n| NodeId::parse(n).ok()).collect();
        nodes.sort();
        nodes.dedup();
        Ok(PlacementOutcome::Prepared(nodes))
    }

    /// Removes deleted deployments whose replicas are all gone (their routes
    /// go with them), and returns their ids. Replica rows of deleted
    /// deployments on nodes silent for `node_gone_after` go first: no agent
    /// will remove them, and if the node comes back its agent removes the
    /// container as an orphan.
    pub async fn finalize_deleted_deployments(
        &self,
        node_gone_after: Duration,
    ) -> Result<Vec<DeploymentId>, StoreError> {
        let op = "finalizing deleted deployments";
        let mut tx = self.pool().begin().await.map_err(StoreError::db(op))?;
        let abandoned: Vec<String> = sqlx::query_scalar(
            "DELETE FROM deployment_locations l USING deployments d, node_metadata n \
             WHERE l.deployment_id = d.id AND d.desired_state = 'deleted' AND n.node_id = l.node_id \
             AND n.last_heartbeat < now() - make_interval(secs => $1) RETURNING l.node_id",
        )
        .bind(node_gone_after.as_secs_f64())
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        for node in &abandoned {
            sqlx::query(
                "UPDATE node_metadata SET deployment_count = greatest(deployment_count - 1, 0) WHERE node_id = $1",
            )
            .bind(node)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
        }
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "DELETE FROM deployments d WHERE d.desired_state = 'deleted' \
             AND NOT EXISTS (SELECT 1 FROM deployment_locations l WHERE l.deployment_id = d.id) RETURNING d.id",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        tx.commit().await.map_err(StoreError::db(op))?;
        if !abandoned.is_empty() {
            tracing::info!(rows = abandoned.len(), "removed replica rows of deleted deployments on silent nodes");
        }
        Ok(ids.into_iter().map(DeploymentId::from).collect())
    }
}
