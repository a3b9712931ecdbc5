//! The SQL twin of [`flotilla_types::serving::is_serving`]: which replica
//! rows the edge may send requests to. `tests/schema.rs` checks the two
//! agree on every combination of the facts they look at.

/// Whether node `n` may be sent requests: ready, or down while its agent
/// still answers (cut off from the database only) or was not asked (an agent
/// stopped for an update): not once found unreachable. The node part of
/// [`SERVING`], and `ReplicaRecord::node_reachable`.
macro_rules! node_reachable {
    () => {
        "(n.status = 'ready' OR n.unreachable_at IS NULL)"
    };
}
pub(crate) use node_reachable;

/// A condition over a replica row `l` and its deployment `d`.
pub(crate) const SERVING: &str = concat!(
    "(d.desired_state = 'running' AND l.replica_index < d.replicas \
     AND l.status = 'running' AND l.health_status NOT IN ('starting', 'unhealthy') \
     AND l.drain_state IS DISTINCT FROM 'retiring' AND l.address IS NOT NULL AND l.port IS NOT NULL \
     AND EXISTS (SELECT 1 FROM node_metadata n WHERE n.node_id = l.node_id AND ",
    node_reachable!(),
    "))"
);

/// A deployment `d` that is down rather than not up yet: scaled to zero, or
/// a replica it wants is unhealthy or exited by itself since it last
/// started (a container stopped on request does not count). The edge
/// answers 503 for it when no replica serves (404 for one being deployed or
/// started).
pub(crate) const APP_DOWN: &str = "(d.replicas = 0 OR EXISTS (SELECT 1 FROM deployment_locations x \
     WHERE x.deployment_id = d.id AND x.replica_index < d.replicas AND x.drain_state IS NULL \
     AND ((x.status = 'running' AND x.health_status = 'unhealthy') \
          OR (x.status = 'stopped' AND x.last_exit_at >= coalesce(x.started_at, '-infinity')))))";

impl crate::Store {
    /// Every replica for which [`SERVING`] holds (for the test of the twins).
    #[doc(hidden)]
    pub async fn serving_replica_ids(&self) -> Result<Vec<flotilla_types::ReplicaId>, crate::StoreError> {
        let sql = format!(
            "SELECT l.id FROM deployment_locations l JOIN deployments d ON d.id = l.deployment_id WHERE {SERVING}"
        );
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_all(self.pool())
            .await
            .map_err(crate::StoreError::db("reading which replicas serve"))?;
        Ok(ids.into_iter().map(Into::into).collect())
    }
}
