//! Node registration through heartbeats, and node listing.

use flotilla_types::NodeId;
use sqlx::types::Json;

use crate::models::{NODE_COLUMNS, NodeRow, collect};
use crate::{NodeHeartbeat, NodeRecord, Store, StoreError};

/// The nodes that make up the cluster when counting a majority (a cut-off
/// agent's, the orchestrator's): those heard from this recently. A node
/// gone for longer no longer counts.
pub const NODE_MEMBERSHIP: std::time::Duration = std::time::Duration::from_secs(600);

impl Store {
    /// Registers or refreshes a node. Availability (an operator's decision)
    /// and status (the orchestrator's) are left as they are; the deployment
    /// count is recounted from the placement rows. It clears the agent's
    /// stop announcement, unless the announcement came after this heartbeat
    /// began (the last one of a stopping agent, committed after it said so).
    ///
    /// The recount is its own statement after the upsert has locked the
    /// node's row, so it sees every placement committed before; a count
    /// taken inside the upsert would use the statement's older snapshot and
    /// overwrite a placement's increment committed meanwhile.
    pub async fn upsert_heartbeat(&self, beat: &NodeHeartbeat) -> Result<(), StoreError> {
        let op = "recording a heartbeat";
        let mut tx = self.pool().begin().await.map_err(StoreError::db(op))?;
        sqlx::query(
            "INSERT INTO node_metadata (node_id, hostname, address, role, labels, total_cpu_millis, \
             total_memory_bytes, used_cpu_millis, used_memory_bytes, max_deployments, agent_version, \
             deployment_count, last_heartbeat, fence_after_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, now(), $12) \
             ON CONFLICT (node_id) DO UPDATE SET hostname = EXCLUDED.hostname, address = EXCLUDED.address, \
             role = EXCLUDED.role, labels = EXCLUDED.labels, total_cpu_millis = EXCLUDED.total_cpu_millis, \
             total_memory_bytes = EXCLUDED.total_memory_bytes, used_cpu_millis = EXCLUDED.used_cpu_millis, \
             used_memory_bytes = EXCLUDED.used_memory_bytes, max_deployments = EXCLUDED.max_deployments, \
             agent_version = EXCLUDED.agent_version, last_heartbeat = now(), updated_at = now(), \
             fence_after_ms = EXCLUDED.fence_after_ms, unreachable_at = NULL, \
             agent_stopping_at = CASE WHEN node_metadata.agent_stopping_at > now() \
             THEN node_metadata.agent_stopping_at END",
        )
        .bind(beat.node_id.as_str())
        .bind(&beat.hostname)
        .bind(&beat.address)
        .bind(&beat.role)
        .bind(Json(&beat.labels))
        .bind(beat.total_cpu_millis)
        .bind(beat.total_memory_bytes)
        .bind(beat.used_cpu_millis)
        .bind(beat.used_memory_bytes)
        .bind(beat.max_deployments)
        .bind(&beat.agent_version)
        .bind(beat.fence_after.map(|d| d.as_millis() as i64))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        sqlx::query(
            "UPDATE node_metadata SET deployment_count = \
             (SELECT count(*) FROM deployment_locations WHERE node_id = $1) WHERE node_id = $1",
        )
        .bind(beat.node_id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        tx.commit().await.map_err(StoreError::db(op))?;
        Ok(())
    }

    /// Notes that `node`'s agent stops on purpose (an update, a restart):
    /// until its next heartbeat its silence is left to the heartbeat
    /// timeout, its agent not asked. The mark lasts until the restarted
    /// agent's first heartbeat (it beats as it starts, before its first
    /// reconciliation pass), not only until its start: the node would be
    /// asked meanwhile and, under load, taken unreachable with its routes.
    pub async fn announce_agent_stopping(&self, node: &NodeId) -> Result<(), StoreError> {
        sqlx::query("UPDATE node_metadata SET agent_stopping_at = now() WHERE node_id = $1")
            .bind(node.as_str())
            .execute(self.pool())
            .await
            .map_err(StoreError::db("announcing an agent's stop"))?;
        Ok(())
    }

    /// The agent URLs of the cluster's other nodes: those heard from within
    /// [`NODE_MEMBERSHIP`]. A cut-off agent asks them whether they answer.
    pub async fn peer_agent_urls(&self, node: &NodeId) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT e.agent_url FROM node_endpoints e JOIN node_metadata n ON n.node_id = e.node_id \
             WHERE n.node_id <> $1 AND n.last_heartbeat > now() - make_interval(secs => $2) ORDER BY n.node_id",
        )
        .bind(node.as_str())
        .bind(NODE_MEMBERSHIP.as_secs_f64())
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::db("listing peer agents"))
    }

    /// Addresses of up to `limit` nodes heard from within `within`: where
    /// the node watch checks that a port it would ask a silent node on is
    /// served at all in this cluster.
    pub async fn beating_node_addresses(
        &self,
        within: std::time::Duration,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT address FROM node_metadata WHERE last_heartbeat > now() - make_interval(secs => $1) \
             ORDER BY last_heartbeat DESC LIMIT $2",
        )
        .bind(within.as_secs_f64())
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::db("listing beating nodes"))
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM node_metadata ORDER BY node_id");
        let rows: Vec<NodeRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::db("listing nodes"))?;
        collect(rows)
    }

    pub async fn node(&self, node: &NodeId) -> Result<Option<NodeRecord>, StoreError> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM node_metadata WHERE node_id = $1");
        let row: Option<NodeRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(node.as_str())
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::db("reading a node"))?;
        row.map(NodeRecord::try_from).transpose()
    }

    /// Replicas still on each node that are being moved off it (drain).
    pub async fn replicas_moving_by_node(&self) -> Result<std::collections::BTreeMap<String, i32>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT node_id, count(*) FROM deployment_locations WHERE drain_state IS NOT NULL GROUP BY node_id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::db("counting replicas being moved"))?;
        Ok(rows.into_iter().map(|(node, n)| (node, n as i32)).collect())
    }
}

impl Store {
    /// Announces where `node`'s agent serves its internal endpoints.
    pub async fn set_agent_url(&self, node: &NodeId, url: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO node_endpoints (node_id, agent_url) VALUES ($1, $2) \
             ON CONFLICT (node_id) DO UPDATE SET agent_url = EXCLUDED.agent_url, updated_at = now()",
        )
        .bind(node.as_str())
        .bind(url)
        .execute(&self.pool)
        .await
        .map_err(StoreError::db("announcing the agent's endpoint"))?;
        Ok(())
    }

    /// Where `node`'s agent serves its internal endpoints, if it said.
    pub async fn agent_url(&self, node: &NodeId) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT agent_url FROM node_endpoints WHERE node_id = $1")
            .bind(node.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::db("reading an agent's endpoint"))
    }
}
