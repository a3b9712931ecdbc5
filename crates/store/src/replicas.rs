//! The node agent's queries: its assignments and what it observed. Every
//! statement that writes is limited to the agent's own node.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use flotilla_types::status::Health;
use flotilla_types::{DeploymentId, NodeId, ReplicaId, ReplicaState};
use uuid::Uuid;

use crate::error::unique_violation;
use crate::models::{DEPLOYMENT_COLUMNS, DeploymentRow, REPLICA_COLUMNS, ReplicaRow, collect};
use crate::{Assignment, DeploymentRecord, ReplicaRecord, Store, StoreError};

/// What an agent saw of one replica; overwrites the observed columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaObservation {
    pub id: ReplicaId,
    pub status: ReplicaState,
    pub health: Health,
    pub container_id: Option<String>,
    pub container_name: Option<String>,
    pub port: Option<u16>,
    /// The generation the recorded container was made from; `None` keeps
    /// the row's.
    pub generation: Option<i64>,
    pub message: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
}

/// What became of a container found without its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdoptOutcome {
    /// It has a row again.
    Adopted,
    /// Another live replica serves its deployment's replica index (it was
    /// placed elsewhere while this one's node was down): it is stale.
    Superseded,
    /// Neither: its deployment is gone, or a row for it appeared meanwhile.
    NotAdopted,
}

/// A managed container found on the node without its row, to be given one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adoption {
    pub replica_id: ReplicaId,
    pub deployment_id: DeploymentId,
    pub replica_index: i32,
    pub generation: i64,
    pub address: String,
    pub container_port: u16,
    pub container_id: String,
    pub container_name: String,
    pub port: Option<u16>,
    pub running: bool,
}

impl Store {
    /// Every replica placed on `node`, with its deployment.
    pub async fn node_assignments(&self, node: &NodeId) -> Result<Vec<Assignment>, StoreError> {
        let sql = format!("SELECT {REPLICA_COLUMNS} FROM deployment_locations l WHERE l.node_id = $1 ORDER BY l.id");
        let rows: Vec<ReplicaRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(node.as_str())
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::db("reading a node's assignments"))?;
        let ids: Vec<DeploymentId> = rows.iter().map(|r| r.deployment_id.into()).collect();
        let deployments: HashMap<DeploymentId, DeploymentRecord> =
            self.deployments_by_id(&ids).await?.into_iter().map(|d| (d.id, d)).collect();
        let mut assignments = Vec::with_capacity(rows.len());
        for row in rows {
            let replica = ReplicaRecord::try_from(row)?;
            // A deployment removed between the two reads takes its rows with it.
            if let Some(deployment) = deployments.get(&replica.deployment_id) {
                assignments.push(Assignment { replica, deployment: deployment.clone() });
            }
        }
        Ok(assignments)
    }

    /// Deployments by id, whatever their organization (agents and the
    /// orchestrator act for the platform, not for a tenant).
    pub async fn deployments_by_id(&self, ids: &[DeploymentId]) -> Result<Vec<DeploymentRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let uuids: Vec<Uuid> = ids.iter().map(|d| d.as_uuid()).collect();
        let sql = format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = ANY($1)");
        let rows: Vec<DeploymentRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&uuids)
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::db("reading deployments"))?;
        collect(rows)
    }

    /// Records what the agent of `node` observed. Returns false when the row
    /// no longer exists (the replica was removed meanwhile).
    pub async fn record_replica(&self, node: &NodeId, seen: &ReplicaObservation) -> Result<bool, StoreError> {
        // A new container starts its exit count again.
        let updated = sqlx::query(
            "UPDATE deployment_locations SET status = $3, health_status = $4, container_id = $5, \
             container_name = $6, port = $7, generation = coalesce($8, generation), status_message = $9, \
             started_at = coalesce($10, started_at), health_checked_at = now(), updated_at = now(), \
             restart_count = CASE WHEN container_id IS DISTINCT FROM $5 THEN 0 ELSE restart_count END, \
             last_exit_code = CASE WHEN container_id IS DISTINCT FROM $5 THEN NULL ELSE last_exit_code END, \
             last_exit_at = CASE WHEN container_id IS DISTINCT FROM $5 THEN NULL ELSE last_exit_at END \
             WHERE id = $1 AND node_id = $2",
        )
        .bind(seen.id.as_uuid())
        .bind(node.as_str())
        .bind(seen.status.as_str())
        .bind(seen.health.as_str())
        .bind(seen.container_id.as_deref())
        .bind(seen.container_name.as_deref())
        .bind(seen.port.map(i32::from))
        .bind(seen.generation)
        .bind(seen.message.as_deref())
        .bind(seen.started_at)
        .execute(self.pool())
        .await
        .map_err(|e| match unique_violation(&e) {
            Some("deployment_locations_node_port") => {
                StoreError::AlreadyExists { what: format!("a replica on port {:?} of node {node}", seen.port) }
            }
            _ => StoreError::db("recording a replica")(e),
        })?;
        Ok(updated.rows_affected() == 1)
    }

    /// Records a running replica's health and, when it is unhealthy, why
    /// (`reason`, shown to users as it is); a healthy replica's reason is
    /// cleared. Only while the row
    /// names `container` (when given): a probe of a container that has been
    /// replaced says nothing of the replica.
    pub async fn record_health(
        &self,
        node: &NodeId,
        id: ReplicaId,
        container: Option<&str>,
        health: Health,
        reason: Option<&str>,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE deployment_locations SET health_status = $3, health_checked_at = now(), \
             status_message = CASE WHEN status = 'running' THEN $4 ELSE status_message END, \
             updated_at = CASE WHEN health_status = $3 THEN updated_at ELSE now() END \
             WHERE id = $1 AND node_id = $2 AND ($5::text IS NULL OR container_id = $5)",
        )
        .bind(id.as_uuid())
        .bind(node.as_str())
        .bind(health.as_str())
        .bind(reason)
        .bind(container)
        .execute(self.pool())
        .await
        .map_err(StoreError::db("recording a replica's health"))?;
        Ok(updated.rows_affected() == 1)
    }

    /// Records that the replica's container `container` exited with `code`:
    /// one more exit, its health (unhealthy, or starting when it already
    /// runs again) and what users are told. Only while the row names that
    /// container.
    pub async fn record_exit(
        &self,
        node: &NodeId,
        id: ReplicaId,
        container: &str,
        code: Option<i32>,
        health: Health,
        message: &str,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE deployment_locations SET restart_count = restart_count + 1, last_exit_code = $4, \
             last_exit_at = now(), health_status = $5, status_message = $6, health_checked_at = now(), \
             updated_at = now() WHERE id = $1 AND node_id = $2 AND container_id = $3",
        )
        .bind(id.as_uuid())
        .bind(node.as_str())
        .bind(container)
        .bind(code)
        .bind(health.as_str())
        .bind(message)
        .execute(self.pool())
        .await
        .map_err(StoreError::db("recording a replica's exit"))?;
        Ok(updated.rows_affected() == 1)
    }

    /// Records that updating a replica to `generation` failed and was rolled
    /// back, and why; the agent does not try that generation again.
    pub async fn record_rollout_failure(
        &self,
        node: &NodeId,
        id: ReplicaId,
        generation: i64,
        message: &str,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE deployment_locations SET failed_generation = $3, rollout_message = $4, updated_at = now() \
             WHERE id = $1 AND node_id = $2",
        )
        .bind(id.as_uuid())
        .bind(node.as_str())
        .bind(generation)
        .bind(message)
        .execute(self.pool())
        .await
        .map_err(StoreError::db("recording a failed rollout"))?;
        Ok(updated.rows_affected() == 1)
    }

    /// Gives a managed container found without its row a row again. Returns
    /// false when its replica index already has another row (the container
    /// is then a stale duplicate).
    pub async fn adopt_replica(&self, node: &NodeId, adoption: &Adoption) -> Result<AdoptOutcome, StoreError> {
        let op = "adopting a container";
        let mut tx = self.pool().begin().await.map_err(StoreError::db(op))?;
        // A row placed back on this very node for the same replica while the
        // node was silent, with no container yet, is that replica returning:
        // its running container takes the row's place (nothing is restarted,
        // the app keeps its port) instead of a second container beside it.
        let replaced = sqlx::query(
            "DELETE FROM deployment_locations WHERE deployment_id = $1 AND replica_index = $2 AND node_id = $3 \
             AND id <> $4 AND container_id IS NULL AND drain_state IS NULL",
        )
        .bind(adoption.deployment_id.as_uuid())
        .bind(adoption.replica_index)
        .bind(node.as_str())
        .bind(adoption.replica_id.as_uuid())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(op))?
        .rows_affected();
        let inserted = sqlx::query(
            "INSERT INTO deployment_locations (id, deployment_id, node_id, replica_index, generation, \
             target_generation, container_id, container_name, status, address, port, container_port, domain, \
             status_message, started_at) \
             SELECT $1, $2, $3, $4, $5, $5, $6, $7, $8, $9, $10, $11, d.domain, \
             'adopted: found running without its placement row', now() \
             FROM deployments d WHERE d.id = $2 AND d.desired_state <> 'deleted' \
             ON CONFLICT DO NOTHING",
        )
        .bind(adoption.replica_id.as_uuid())
        .bind(adoption.deployment_id.as_uuid())
        .bind(node.as_str())
        .bind(adoption.replica_index)
        .bind(adoption.generation)
        .bind(&adoption.container_id)
        .bind(&adoption.container_name)
        .bind(if adoption.running { "running" } else { "stopped" })
        .bind(&adoption.address)
        .bind(adoption.port.map(i32::from))
        .bind(i32::from(adoption.container_port))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        let count_change = inserted.rows_affected() as i64 - replaced as i64;
        if count_change != 0 {
            sqlx::query(
                "UPDATE node_metadata SET deployment_count = greatest(deployment_count + $2, 0) WHERE node_id = $1",
            )
            .bind(node.as_str())
            .bind(count_change as i32)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
        }
        // Not adopted: is its replica index served by another live replica
        // (placed elsewhere while this node was down)?
        let superseded = inserted.rows_affected() == 0
            && sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM deployment_locations WHERE deployment_id = $1 \
                 AND replica_index = $2 AND drain_state IS NULL AND id <> $3)",
            )
            .bind(adoption.deployment_id.as_uuid())
            .bind(adoption.replica_index)
            .bind(adoption.replica_id.as_uuid())
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
        tx.commit().await.map_err(StoreError::db(op))?;
        Ok(if inserted.rows_affected() == 1 {
            AdoptOutcome::Adopted
        } else if superseded {
            AdoptOutcome::Superseded
        } else {
            AdoptOutcome::NotAdopted
        })
    }

    /// Removes a replica row of `node`, once its container is gone.
    pub async fn delete_replica(&self, node: &NodeId, id: ReplicaId) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await.map_err(StoreError::db("deleting a replica"))?;
        let deleted = sqlx::query("DELETE FROM deployment_locations WHERE id = $1 AND node_id = $2")
            .bind(id.as_uuid())
            .bind(node.as_str())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("deleting a replica"))?;
        if deleted.rows_affected() == 1 {
            sqlx::query(
                "UPDATE node_metadata SET deployment_count = greatest(deployment_count - 1, 0) WHERE node_id = $1",
            )
            .bind(node.as_str())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("deleting a replica"))?;
        }
        tx.commit().await.map_err(StoreError::db("deleting a replica"))?;
        Ok(deleted.rows_affected() == 1)
    }

    /// One replica row by id, whatever its node.
    pub async fn replica(&self, id: ReplicaId) -> Result<Option<ReplicaRecord>, StoreError> {
        let sql = format!("SELECT {REPLICA_COLUMNS} FROM deployment_locations l WHERE l.id = $1");
        let row: Option<ReplicaRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.as_uuid())
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::db("reading a replica"))?;
        row.map(ReplicaRecord::try_from).transpose()
    }
}
