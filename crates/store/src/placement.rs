//! The orchestrator's queries: what needs placing, and placing it.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_types::{DeploymentId, Hostname, NodeId, PathPrefix, Placement, ReplicaId, ResourceLimits};
use sqlx::types::Json;
use uuid::Uuid;

use crate::models::{NODE_COLUMNS, NodeRow, stored_placement};
use crate::routes::{RouteRecord, replace_routes};
use crate::serving::SERVING;
use crate::{NodeRecord, Store, StoreError};

/// A running deployment with fewer live replicas than it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementNeed {
    pub deployment_id: DeploymentId,
    pub name: String,
    pub domain: Option<Hostname>,
    pub path_prefix: PathPrefix,
    pub container_port: u16,
    pub limits: ResourceLimits,
    pub replicas: u32,
    pub generation: i64,
    pub placement: Placement,
    /// Replica indexes that already have a live row.
    pub placed: Vec<i32>,
    /// Nodes that run a replica of it already (anti-affinity).
    pub nodes: Vec<NodeId>,
}

/// A replica the orchestrator decided to run on `node_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReplica {
    pub id: ReplicaId,
    pub replica_index: i32,
    pub node_id: NodeId,
    pub address: String,
    /// Why this node.
    pub reason: String,
}

/// What a round decided for one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementPlan {
    pub deployment_id: DeploymentId,
    /// The generation the decision was made for: a deployment changed since
    /// is left for the next round.
    pub generation: i64,
    pub replicas: Vec<NewReplica>,
    pub route: Option<RouteRecord>,
    /// Why some replicas found no node; `None` clears an earlier message.
    pub unplaced: Option<String>,
}

/// The orchestrator's lease, as held by one replica: fences its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub term: i64,
}

/// What happened to a batch of placements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitReport {
    /// Replica rows written.
    pub placed: usize,
    /// Deployments that changed or went away since they were read.
    pub stale: Vec<DeploymentId>,
}

/// What happened to a preparation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementOutcome {
    /// Replica rows on these nodes were prepared for the new generation.
    Prepared(Vec<NodeId>),
    /// The deployment changed or went away since it was read; nothing written.
    Stale,
}

/// A node with what placement needs beyond its row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub node: NodeRecord,
    /// Heard from within the heartbeat timeout.
    pub heartbeat_fresh: bool,
    /// The limits of the replicas placed on it.
    pub reserved_cpu_millis: i64,
    pub reserved_memory_bytes: i64,
}

/// What the health watch goes by.
#[derive(Debug, Clone)]
pub struct HealthWatch {
    /// A node silent this long is down.
    pub timeout: Duration,
    /// Nodes whose agent was just found unreachable (or fenced)...
    pub unreachable: Vec<NodeId>,
    /// ...are down if still silent this long.
    pub suspect_after: Duration,
    /// A `fence` replica on a lost node is placed elsewhere once the node is
    /// silent for its agent's fence time plus this: time for the agent to
    /// ask its peers and stop the container.
    pub fence_margin: Duration,
}

/// A node that has not sent a heartbeat for a while (not yet down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SilentNode {
    pub node_id: NodeId,
    /// Where its agent answers, when it announced it.
    pub agent_url: Option<String>,
    /// The address the node announced (its Swarm address in a swarm).
    pub address: String,
    pub silent_for: Duration,
    /// Its agent said it was stopping on purpose (an update, a restart)
    /// less than the restart grace ago: no agent answers until the new one
    /// runs, so only the node itself can be asked.
    pub restarting: bool,
}

/// Node state changes made by the health watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeHealthChanges {
    /// Nodes that missed their heartbeats and went down.
    pub down: Vec<NodeId>,
    /// Down nodes heard from again.
    pub back: Vec<NodeId>,
    /// Replica rows taken off down nodes, to be placed elsewhere.
    pub evicted: usize,
}

/// What a drain step changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainProgress {
    /// Replicas on drained nodes that now wait for a replacement.
    pub moving: usize,
    /// Replicas whose replacement serves; out of routing, stopped soon.
    pub retiring: Vec<NodeId>,
    /// Moving replicas back to live because their node was activated
    /// before a replacement was placed.
    pub restored: usize,
    /// Replicas still moving or retiring after this step: the drain is
    /// under way and needs watching.
    pub in_flight: usize,
}

#[derive(sqlx::FromRow)]
struct NeedRow {
    id: Uuid,
    name: String,
    domain: Option<String>,
    path_prefix: String,
    container_port: i32,
    memory_limit_bytes: i64,
    cpu_limit_millis: i64,
    replicas: i32,
    generation: i64,
    placement_strategy: Option<String>,
    placement_constraints: Json<BTreeMap<String, String>>,
    node_loss: String,
    placed: Vec<i32>,
    nodes: Vec<String>,
}

impl NeedRow {
    fn into_need(self) -> Result<PlacementNeed, StoreError> {
        let bad = |detail: String| StoreError::Corrupt { table: "deployments", id: self.id.to_string(), detail };
        let placement =
            stored_placement(self.placement_strategy.as_deref(), &self.placement_constraints.0, &self.node_loss)
                .map_err(|e| bad(e.to_string()))?;
        Ok(PlacementNeed {
            deployment_id: self.id.into(),
            domain: self
                .domain
                .as_deref()
                .map(|d| Hostname::parse("domain", d))
                .transpose()
                .map_err(|e| bad(e.to_string()))?,
            path_prefix: PathPrefix::parse("path_prefix", &self.path_prefix).map_err(|e| bad(e.to_string()))?,
            container_port: u16::try_from(self.container_port).map_err(|e| bad(e.to_string()))?,
            limits: ResourceLimits { memory_bytes: self.memory_limit_bytes, cpu_millis: self.cpu_limit_millis },
            replicas: u32::try_from(self.replicas).map_err(|e| bad(e.to_string()))?,
            placement,
            nodes: self.nodes.iter().filter_map(|n| NodeId::parse(n).ok()).collect(),
            name: self.name,
            generation: self.generation,
            placed: self.placed,
        })
    }
}

const NEED_COLUMNS: &str = "d.id, d.name, d.domain, d.path_prefix, d.container_port, d.memory_limit_bytes, d.cpu_limit_millis, \
     d.replicas, d.generation, d.placement_strategy, d.placement_constraints, d.node_loss";

/// Inside `tx`: fails with `NotLeader` unless `lease` still holds. The row
/// lock keeps another replica from taking the lease until `tx` ends.
async fn fence(tx: &mut sqlx::PgTransaction<'_>, lease: &Lease, op: &'static str) -> Result<(), StoreError> {
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT term FROM orchestrator_lease WHERE holder = $1 AND term = $2 AND expires_at > now() FOR SHARE",
    )
    .bind(&lease.holder)
    .bind(lease.term)
    .fetch_optional(&mut **tx)
    .await
    .map_err(StoreError::db(op))?;
    match held {
        Some(_) => Ok(()),
        None => Err(StoreError::NotLeader { term: lease.term }),
    }
}

impl Store {
    /// Running deployments that want more live replicas than they have.
    pub async fn deployments_to_place(&self, limit: i64) -> Result<Vec<PlacementNeed>, StoreError> {
        let sql = format!(
            "SELECT {NEED_COLUMNS}, \
             coalesce(array_agg(l.replica_index) FILTER (WHERE l.id IS NOT NULL AND l.drain_state IS NULL), '{{}}') \
             AS placed, coalesce(array_agg(DISTINCT l.node_id) FILTER (WHERE l.id IS NOT NULL), '{{}}') AS nodes \
             FROM deployments d LEFT JOIN deployment_locations l ON l.deployment_id = d.id \
             WHERE d.desired_state = 'running' \
             GROUP BY d.id HAVING count(l.id) FILTER (WHERE l.drain_state IS NULL) < d.replicas \
             ORDER BY d.id LIMIT $1"
        );
        let rows: Vec<NeedRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::db("finding deployments to place"))?;
        rows.into_iter().map(NeedRow::into_need).collect()
    }

    /// Every node, with its heartbeat freshness and the resources its
    /// replicas reserve, and the node round-robin chose last.
    pub async fn placement_snapshot(
        &self,
        heartbeat_within: Duration,
    ) -> Result<(Vec<NodeSnapshot>, Option<NodeId>), StoreError> {
        let op = "reading the placement snapshot";
        #[derive(sqlx::FromRow)]
        struct Row {
            #[sqlx(flatten)]
            node: NodeRow,
            fresh: bool,
            reserved_cpu: i64,
            reserved_memory: i64,
        }
        let columns = NODE_COLUMNS.split(", ").map(|c| format!("n.{}", c.trim())).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "SELECT {columns}, n.last_heartbeat > now() - make_interval(secs => $1) AS fresh, \
             coalesce(r.cpu, 0)::int8 AS reserved_cpu, coalesce(r.memory, 0)::int8 AS reserved_memory \
             FROM node_metadata n LEFT JOIN (SELECT l.node_id, sum(d.cpu_limit_millis) AS cpu, \
             sum(d.memory_limit_bytes) AS memory FROM deployment_locations l \
             JOIN deployments d ON d.id = l.deployment_id GROUP BY l.node_id) r ON r.node_id = n.node_id \
             ORDER BY n.node_id"
        );
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(heartbeat_within.as_secs_f64())
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::db(op))?;
        let cursor: Option<String> = sqlx::query_scalar("SELECT round_robin_cursor FROM orchestrator_state WHERE id")
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::db(op))?
            .flatten();
        let nodes = rows
            .into_iter()
            .map(|r| {
                Ok(NodeSnapshot {
                    node: NodeRecord::try_from(r.node)?,
                    heartbeat_fresh: r.fresh,
                    reserved_cpu_millis: r.reserved_cpu,
                    reserved_memory_bytes: r.reserved_memory,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((nodes, cursor.and_then(|c| NodeId::parse(&c).ok())))
    }

    /// Writes a round's decisions in one transaction: the replica rows (with
    /// the reason for each node), the routes, the nodes' counts, the
    /// deployments' placement messages and the round-robin cursor. Fenced
    /// by `lease`; a deployment no longer at its plan's generation (or no
    /// longer running) is skipped and reported stale. A replica index that
    /// already has a live row is skipped, so placing twice cannot create a
    /// second replica.
    pub async fn commit_placements(
        &self,
        lease: &Lease,
        plans: &[PlacementPlan],
        cursor: Option<&NodeId>,
    ) -> Result<CommitReport, StoreError> {
        let op = "committing placements";
        let mut tx = self.pool().begin().await.map_err(StoreError::db(op))?;
        fence(&mut tx, lease, op).await?;
        let ids: Vec<Uuid> = plans.iter().map(|p| p.deployment_id.as_uuid()).collect();
        let current: Vec<(Uuid, i64)> = sqlx::query_as(
            "SELECT id, generation FROM deployments WHERE id = ANY($1) AND desired_state = 'running' \
             ORDER BY id FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        let current: BTreeMap<Uuid, i64> = current.into_iter().collect();
        let (fresh, stale): (Vec<&PlacementPlan>, Vec<&PlacementPlan>) =
            plans.iter().partition(|p| current.get(&p.deployment_id.as_uuid()) == Some(&p.generation));
        let replicas: Vec<(&PlacementPlan, &NewReplica)> =
            fresh.iter().flat_map(|p| p.replicas.iter().map(move |r| (*p, r))).collect();
        let mut placed_on: Vec<String> = Vec::new();
        if !replicas.is_empty() {
            placed_on = sqlx::query_scalar(
                "INSERT INTO deployment_locations (id, deployment_id, node_id, replica_index, generation, \
                 target_generation, status, address, container_port, domain, placement_reason) \
                 SELECT t.id, t.deployment_id, t.node_id, t.replica_index, d.generation, d.generation, 'pending', \
                 t.address, d.container_port, d.domain, t.reason \
                 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::text[]) \
                 AS t(id, deployment_id, node_id, replica_index, address, reason) \
                 JOIN deployments d ON d.id = t.deployment_id \
                 ON CONFLICT (deployment_id, replica_index) WHERE drain_state IS NULL DO NOTHING \
                 RETURNING node_id",
            )
            .bind(replicas.iter().map(|(_, r)| r.id.as_uuid()).collect::<Vec<_>>())
            .bind(replicas.iter().map(|(p, _)| p.deployment_id.as_uuid()).collect::<Vec<_>>())
            .bind(replicas.iter().map(|(_, r)| r.node_id.to_string()).collect::<Vec<_>>())
            .bind(replicas.iter().map(|(_, r)| r.replica_index).collect::<Vec<_>>())
            .bind(replicas.iter().map(|(_, r)| r.address.clone()).collect::<Vec<_>>())
            .bind(replicas.iter().map(|(_, r)| r.reason.clone()).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
            sqlx::query(
                "UPDATE node_metadata n SET deployment_count = n.deployment_count + c.added \
                 FROM (SELECT node_id, count(*)::int AS added FROM unnest($1::text[]) AS node_id GROUP BY node_id) c \
                 WHERE n.node_id = c.node_id",
            )
            .bind(&placed_on)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
        }
        // Routes change only with replicas placed (a new deployment) or on
        // a new generation (prepare_generation).
        let routed: Vec<&PlacementPlan> = fresh.iter().copied().filter(|p| !p.replicas.is_empty()).collect();
        let routes: Vec<&RouteRecord> = routed.iter().filter_map(|p| p.route.as_ref()).collect();
        let routed_ids: Vec<Uuid> = routed.iter().map(|p| p.deployment_id.as_uuid()).collect();
        replace_routes(&mut tx, &routed_ids, &routes, op).await?;
        sqlx::query(
            "UPDATE deployments d SET placement_message = nullif(t.message, '') \
             FROM unnest($1::uuid[], $2::text[]) AS t(id, message) \
             WHERE d.id = t.id AND d.placement_message IS DISTINCT FROM nullif(t.message, '')",
        )
        .bind(fresh.iter().map(|p| p.deployment_id.as_uuid()).collect::<Vec<_>>())
        .bind(fresh.iter().map(|p| p.unplaced.clone().unwrap_or_default()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        if let Some(cursor) = cursor {
            sqlx::query("UPDATE orchestrator_state SET round_robin_cursor = $1 WHERE id")
                .bind(cursor.as_str())
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(op))?;
        }
        tx.commit().await.map_err(StoreError::db(op))?;
        Ok(CommitReport { placed: placed_on.len(), stale: stale.iter().map(|p| p.deployment_id).collect() })
    }

    /// Deployments whose replicas are not all prepared for the current
    /// generation (their route dates from an older one).
    pub async fn generations_to_prepare(&self, limit: i64) -> Result<Vec<PlacementNeed>, StoreError> {
        let sql = format!(
            "SELECT {NEED_COLUMNS}, '{{}}'::int[] AS placed, '{{}}'::text[] AS nodes \
             FROM deployments d WHERE d.desired_state <> 'deleted' AND EXISTS (SELECT 1 FROM deployment_locations l \
             WHERE l.deployment_id = d.id AND l.target_generation < d.generation) ORDER BY d.id LIMIT $1"
        );
        let rows: Vec<NeedRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::db("finding generations to prepare"))?;
        rows.into_iter().map(NeedRow::into_need).collect()
    }

    /// Prepares every replica of a deployment for `generation`: the route is
    /// replaced and the replicas marked in one transaction, provided the
    /// deployment is still at `generation`. Agents roll a replica over only
    /// once it is prepared, so the route (a new domain, say) is in place
    /// before any container of the new generation serves.
    pub async fn prepare_generation(
        &self,
        lease: &Lease,
        deployment_id: DeploymentId,
        generation: i64,
        route: Option<&RouteRecord>,
    ) -> Result<PlacementOutcome, StoreError> {
        let op = "preparing a generation";
        let mut tx = self.pool().begin().await.map_err(StoreError::db(op))?;
        fence(&mut tx, lease, op).await?;
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
            "UPDATE deployment_locations SET target_generation = $2, \
             domain = (SELECT domain FROM deployments WHERE id = $1), updated_at = now() \
             WHERE deployment_id = $1 AND target_generation < $2 RETURNING node_id",
        )
        .bind(deployment_id.as_uuid())
        .bind(generation)
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        let routes: Vec<&RouteRecord> = route.into_iter().collect();
        replace_routes(&mut tx, &[deployment_id.as_uuid()], &routes, op).await?;
        tx.commit().await.map_err(StoreError::db(op))?;
        let mut nodes: Vec<NodeId> = nodes.iter().filter_map(|n| NodeId::parse(n).ok()).collect();
        nodes.sort();
        nodes.dedup();
        Ok(PlacementOutcome::Prepared(nodes))
    }

    /// Forgets idempotency keys older than `ttl`; returns how many.
    pub async fn expire_idempotency_keys(&self, ttl: Duration) -> Result<u64, StoreError> {
        let expired = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)")
            .bind(ttl.as_secs_f64())
            .execute(self.pool())
            .await
            .map_err(StoreError::db("expiring idempotency keys"))?;
        Ok(expired.rows_affected())
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

    /// Takes the orchestrator lease for `holder`, or renews it, unless
    /// another holder's lease is still valid. Returns the lease held, or
    /// `None` when another replica leads.
    pub async fn acquire_lease(&self, holder: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let term: Option<i64> = sqlx::query_scalar(
            "INSERT INTO orchestrator_lease AS l (id, holder, term, acquired_at, expires_at) \
             VALUES (true, $1, 1, now(), now() + make_interval(secs => $2)) \
             ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, \
             term = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now() THEN l.term ELSE l.term + 1 END, \
             acquired_at = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now() \
             THEN l.acquired_at ELSE now() END, expires_at = EXCLUDED.expires_at \
             WHERE l.holder = EXCLUDED.holder OR l.expires_at <= now() RETURNING term",
        )
        .bind(holder)
        .bind(ttl.as_secs_f64())
        .fetch_optional(self.pool())
        .await
        .map_err(StoreError::db("acquiring the orchestrator lease"))?;
        Ok(term.map(|term| Lease { holder: holder.to_owned(), term }))
    }

    /// Gives the lease up (at shutdown), so another replica takes over at
    /// once. The row stays, so terms keep growing.
    pub async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        sqlx::query("UPDATE orchestrator_lease SET expires_at = now() WHERE holder = $1 AND term = $2")
            .bind(&lease.holder)
            .bind(lease.term)
            .execute(self.pool())
            .await
            .map_err(StoreError::db("releasing the orchestrator lease"))?;
        Ok(())
    }

    /// The current leader, if the lease is valid: (holder, term).
    pub async fn current_leader(&self) -> Result<Option<Lease>, StoreError> {
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT holder, term FROM orchestrator_lease WHERE expires_at > now()")
                .fetch_optional(self.pool())
                .await
                .map_err(StoreError::db("reading the orchestrator lease"))?;
        Ok(row.map(|(holder, term)| Lease { holder, term }))
    }

    /// The health watch, fenced by `lease`:
    /// - nodes silent for `timeout`, and nodes in `unreachable` silent for
    ///   `suspect_after` (a heartbeat that arrived meanwhile wins), go
    ///   `down`;
    /// - `down` nodes heard from since they went down are `ready`;
    /// - replica rows on down nodes are taken off them, to be placed
    ///   elsewhere: `replace` replicas at once, `fence` replicas once the
    ///   node is known unreachable (or cannot be asked) and silent for its
    ///   agent's fence time plus `fence_margin`, so its agent has surely
    ///   stopped them. If the node comes back, its agent removes the
    ///   containers it finds without rows, or adopts them when nobody took
    ///   their place.
    pub async fn watch_node_health(&self, lease: &Lease, watch: &HealthWatch) -> Result<NodeHealthChanges, StoreError> {
        let op = "watching node health";
        let mut tx = self.pool().begin().await.map_err(StoreError::db(op))?;
        fence(&mut tx, lease, op).await?;
        let unreachable: Vec<&str> = watch.unreachable.iter().map(NodeId::as_str).collect();
        sqlx::query(
            "UPDATE node_metadata SET unreachable_at = now() WHERE node_id = ANY($1) AND unreachable_at IS NULL \
             AND last_heartbeat < now() - make_interval(secs => $2)",
        )
        .bind(&unreachable)
        .bind(watch.suspect_after.as_secs_f64())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        let down: Vec<String> = sqlx::query_scalar(
            "UPDATE node_metadata SET status = 'down', down_at = now(), updated_at = now() \
             WHERE status <> 'down' AND (last_heartbeat < now() - make_interval(secs => $1) \
             OR (unreachable_at IS NOT NULL AND last_heartbeat < now() - make_interval(secs => $2))) \
             RETURNING node_id",
        )
        .bind(watch.timeout.as_secs_f64())
        .bind(watch.suspect_after.as_secs_f64())
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        let back: Vec<String> = sqlx::query_scalar(
            "UPDATE node_metadata SET status = 'ready', updated_at = now() \
             WHERE status <> 'ready' AND last_heartbeat >= now() - make_interval(secs => $1) \
             AND last_heartbeat > coalesce(down_at, '-infinity') RETURNING node_id",
        )
        .bind(watch.timeout.as_secs_f64())
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        // `fence` replicas move only while most of the cluster is heard from:
        // with most nodes silent at once, the orchestrator's side of a cut may
        // be the minority, and the silent side runs its copies on.
        let evicted_from: Vec<String> = sqlx::query_scalar(
            "WITH members AS (SELECT count(*) AS total, \
             count(*) FILTER (WHERE last_heartbeat >= now() - make_interval(secs => $2)) AS heard \
             FROM node_metadata WHERE last_heartbeat > now() - make_interval(secs => $3)) \
             DELETE FROM deployment_locations l USING node_metadata n, deployments d \
             WHERE n.node_id = l.node_id AND d.id = l.deployment_id AND n.status = 'down' \
             AND (d.node_loss = 'replace' OR ((n.unreachable_at IS NOT NULL \
             OR NOT EXISTS (SELECT 1 FROM node_endpoints e WHERE e.node_id = n.node_id)) \
             AND n.last_heartbeat < now() - make_interval(secs => coalesce(n.fence_after_ms, 0) / 1000.0 + $1) \
             AND (SELECT heard * 2 > total FROM members))) \
             RETURNING l.node_id",
        )
        .bind(watch.fence_margin.as_secs_f64())
        .bind(watch.suspect_after.as_secs_f64())
        .bind(crate::nodes::NODE_MEMBERSHIP.as_secs_f64())
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        if !evicted_from.is_empty() {
            sqlx::query(
                "UPDATE node_metadata n SET deployment_count = \
                 (SELECT count(*) FROM deployment_locations l WHERE l.node_id = n.node_id) \
                 WHERE n.node_id = ANY($1)",
            )
            .bind(&evicted_from)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
        }
        tx.commit().await.map_err(StoreError::db(op))?;
        let ids = |v: Vec<String>| v.iter().filter_map(|n| NodeId::parse(n).ok()).collect();
        Ok(NodeHealthChanges { down: ids(down), back: ids(back), evicted: evicted_from.len() })
    }

    /// Nodes silent for `silent_for` worth asking whether they are alive:
    /// those not down yet, and down ones still holding replica rows whose
    /// agent was not found unreachable (their `fence` replicas wait on it);
    /// with the URL their agent serves on (if announced), how long they
    /// have been silent, and whether their agent said it was stopping on
    /// purpose less than `restart_grace` ago.
    pub async fn silent_nodes(
        &self,
        silent_for: Duration,
        restart_grace: Duration,
    ) -> Result<Vec<SilentNode>, StoreError> {
        let rows: Vec<(String, Option<String>, String, f64, bool)> = sqlx::query_as(
            "SELECT n.node_id, e.agent_url, n.address, extract(epoch FROM now() - n.last_heartbeat)::float8, \
             COALESCE(n.agent_stopping_at >= now() - make_interval(secs => $2), false) \
             FROM node_metadata n LEFT JOIN node_endpoints e ON e.node_id = n.node_id \
             WHERE n.last_heartbeat < now() - make_interval(secs => $1) \
             AND (n.status <> 'down' \
             OR (n.unreachable_at IS NULL AND EXISTS (SELECT 1 FROM deployment_locations l WHERE l.node_id = n.node_id)))",
        )
        .bind(silent_for.as_secs_f64())
        .bind(restart_grace.as_secs_f64())
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::db("listing silent nodes"))?;
        Ok(rows
            .into_iter()
            .filter_map(|(node, agent_url, address, silent, restarting)| {
                Some(SilentNode {
                    node_id: NodeId::parse(&node).ok()?,
                    agent_url,
                    address,
                    silent_for: Duration::from_secs_f64(silent.max(0.0)),
                    restarting,
                })
            })
            .collect())
    }

    /// One step of every drain under way, fenced by `lease`:
    /// - live replicas on drained nodes become `moving` (the next placement
    ///   finds their index missing and places a replacement elsewhere);
    /// - a moving replica whose replacement serves becomes `retiring`: out
    ///   of the route table at once, stopped by its agent once every edge
    ///   proxy has taken that in;
    /// - moving replicas on nodes activated again, with no replacement yet,
    ///   are live again.
    pub async fn advance_drains(&self, lease: &Lease) -> Result<DrainProgress, StoreError> {
        let op = "advancing drains";
        let mut tx = self.pool().begin().await.map_err(StoreError::db(op))?;
        fence(&mut tx, lease, op).await?;
        let restored = sqlx::query(
            "UPDATE deployment_locations l SET drain_state = NULL, updated_at = now() FROM node_metadata n \
             WHERE n.node_id = l.node_id AND n.availability = 'active' AND l.drain_state = 'moving' \
             AND NOT EXISTS (SELECT 1 FROM deployment_locations r WHERE r.deployment_id = l.deployment_id \
             AND r.replica_index = l.replica_index AND r.drain_state IS NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(op))?
        .rows_affected() as usize;
        let moving = sqlx::query(
            "UPDATE deployment_locations l SET drain_state = 'moving', updated_at = now() \
             FROM node_metadata n, deployments d WHERE n.node_id = l.node_id AND d.id = l.deployment_id \
             AND n.availability = 'drain' AND l.drain_state IS NULL AND d.desired_state <> 'deleted'",
        )
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(op))?
        .rows_affected() as usize;
        let retire = format!(
            "UPDATE deployment_locations m SET drain_state = 'retiring', retire_at = now(), updated_at = now() \
             WHERE m.drain_state = 'moving' AND EXISTS (SELECT 1 FROM deployment_locations l \
             JOIN deployments d ON d.id = l.deployment_id WHERE l.deployment_id = m.deployment_id \
             AND l.replica_index = m.replica_index AND l.drain_state IS NULL AND {SERVING}) RETURNING m.node_id"
        );
        let retiring: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(retire)).fetch_all(&mut *tx).await.map_err(StoreError::db(op))?;
        let in_flight: i64 =
            sqlx::query_scalar("SELECT count(*) FROM deployment_locations WHERE drain_state IS NOT NULL")
                .fetch_one(&mut *tx)
                .await
                .map_err(StoreError::db(op))?;
        tx.commit().await.map_err(StoreError::db(op))?;
        let mut retiring: Vec<NodeId> = retiring.iter().filter_map(|n| NodeId::parse(n).ok()).collect();
        retiring.sort();
        retiring.dedup();
        Ok(DrainProgress { moving, retiring, restored, in_flight: in_flight as usize })
    }

    /// Nodes with replicas whose stop time has come: their agents are woken.
    pub async fn nodes_with_due_retirements(&self) -> Result<Vec<NodeId>, StoreError> {
        let nodes: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT node_id FROM deployment_locations WHERE drain_state = 'retiring' AND retire_at <= now()",
        )
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::db("finding due retirements"))?;
        Ok(nodes.iter().filter_map(|n| NodeId::parse(n).ok()).collect())
    }

    /// Sets a node's availability (operators: drain, pause, activate).
    /// `drain --now` also retires every replica on it at once: out of the
    /// route table and stopped by its agent without waiting for a
    /// replacement. Returns false when the node is unknown.
    pub async fn set_node_availability(
        &self,
        node: &NodeId,
        availability: &str,
        retire_now: bool,
    ) -> Result<bool, StoreError> {
        let op = "setting a node's availability";
        let mut tx = self.pool().begin().await.map_err(StoreError::db(op))?;
        let updated = sqlx::query("UPDATE node_metadata SET availability = $2, updated_at = now() WHERE node_id = $1")
            .bind(node.as_str())
            .bind(availability)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(op))?
            .rows_affected();
        if updated == 1 && retire_now {
            sqlx::query(
                "UPDATE deployment_locations SET drain_state = 'retiring', retire_at = now(), updated_at = now() \
                 WHERE node_id = $1 AND drain_state IS DISTINCT FROM 'retiring'",
            )
            .bind(node.as_str())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
        }
        tx.commit().await.map_err(StoreError::db(op))?;
        Ok(updated == 1)
    }
}
