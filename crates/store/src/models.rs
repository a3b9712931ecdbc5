//! Records read from and written to the control database.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use flotilla_types::serving::{ServingFacts, is_serving};
use flotilla_types::status::{Health, ReplicaGeneration, ReplicaView, Rollout, derive_rollout, derive_status};
use flotilla_types::{
    Constraints, DeploymentId, DeploymentSpec, DeploymentStatus, DesiredState, EnvVar, HealthCheck, Hostname,
    ImageReference, NetworkMode, NodeId, NodeLoss, OrganizationId, PathPrefix, Placement, PlacementStrategy, ProjectId,
    ReplicaId, ReplicaState, ResourceLimits, RestartPolicy,
};
use uuid::Uuid;

use crate::StoreError;

/// A deployment's desired state as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRecord {
    pub id: DeploymentId,
    pub organization_id: OrganizationId,
    pub project_id: ProjectId,
    pub spec: DeploymentSpec,
    pub desired_state: DesiredState,
    pub generation: i64,
    /// Why replicas wait for a node, while some do.
    pub placement_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One placed replica and what its agent last observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRecord {
    pub id: ReplicaId,
    pub deployment_id: DeploymentId,
    pub replica_index: i32,
    /// The generation the replica's container was made from.
    pub generation: i64,
    /// The generation the orchestrator prepared it for (its route).
    pub target_generation: i64,
    /// A generation the replica could not be updated to (rolled back).
    pub failed_generation: Option<i64>,
    pub rollout_message: Option<String>,
    pub node_id: NodeId,
    pub container_id: Option<String>,
    pub container_name: Option<String>,
    pub status: ReplicaState,
    pub health: Health,
    pub address: Option<String>,
    pub port: Option<u16>,
    pub container_port: u16,
    pub status_message: Option<String>,
    /// Why the orchestrator chose its node.
    pub placement_reason: Option<String>,
    /// Being moved off its node: its replacement is starting elsewhere.
    pub moving: bool,
    /// Its replacement serves: out of routing, stopped once the edge
    /// proxies have taken that in.
    pub retiring: bool,
    /// Its node is `ready`, or down but not found unreachable (see
    /// [`flotilla_types::serving::ServingFacts::node_reachable`]).
    pub node_reachable: bool,
    /// Times its container exited since it was made (crashes, kills).
    pub restart_count: u32,
    /// The exit code of the last exit.
    pub last_exit_code: Option<i32>,
    pub last_exit_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

impl ReplicaRecord {
    /// Whether the edge may send it requests ([`flotilla_types::serving`]).
    pub fn serving(&self, deployment: &DeploymentRecord) -> bool {
        is_serving(&ServingFacts {
            desired: deployment.desired_state,
            wanted_replicas: deployment.spec.replicas,
            replica_index: self.replica_index,
            state: self.status,
            health: self.health,
            retiring: self.retiring,
            has_endpoint: self.address.is_some() && self.port.is_some(),
            node_reachable: self.node_reachable,
        })
    }

    /// `http://address:port`, once the replica has a published port.
    pub fn endpoint(&self) -> Option<String> {
        match (&self.address, self.port) {
            (Some(address), Some(port)) => Some(format!("http://{address}:{port}")),
            _ => None,
        }
    }
}

/// A deployment with its replicas, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentView {
    pub deployment: DeploymentRecord,
    pub replicas: Vec<ReplicaRecord>,
}

impl DeploymentView {
    pub fn status(&self) -> (DeploymentStatus, Option<String>) {
        let views: Vec<ReplicaView<'_>> = self
            .replicas
            .iter()
            .map(|r| ReplicaView {
                state: r.status,
                health: r.health,
                message: r.status_message.as_deref(),
                serving: r.serving(&self.deployment),
                wanted: i64::from(r.replica_index) < i64::from(self.deployment.spec.replicas) && !r.retiring,
            })
            .collect();
        derive_status(self.deployment.desired_state, self.deployment.spec.replicas, &views)
    }

    /// Where the latest change stands across the replicas.
    pub fn rollout(&self) -> Rollout {
        let replicas: Vec<ReplicaGeneration<'_>> = self
            .replicas
            .iter()
            .map(|r| ReplicaGeneration {
                generation: r.generation,
                failed_generation: r.failed_generation,
                rollout_message: r.rollout_message.as_deref(),
            })
            .collect();
        derive_rollout(self.deployment.generation, &replicas)
    }
}

/// What an agent needs to run one replica: its placement row joined with its
/// deployment's desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub replica: ReplicaRecord,
    pub deployment: DeploymentRecord,
}

impl Assignment {
    /// The orchestrator has prepared the deployment's current generation for
    /// this replica, so a container may be made from the current spec.
    pub fn prepared(&self) -> bool {
        self.replica.target_generation == self.deployment.generation
    }
}

/// A node as registered by its agent's heartbeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub node_id: NodeId,
    pub hostname: String,
    pub address: String,
    pub role: String,
    pub availability: String,
    pub status: String,
    pub labels: BTreeMap<String, String>,
    pub total_cpu_millis: i64,
    pub total_memory_bytes: i64,
    pub used_cpu_millis: i64,
    pub used_memory_bytes: i64,
    pub deployment_count: i32,
    pub max_deployments: i32,
    pub agent_version: String,
    pub last_heartbeat: DateTime<Utc>,
}

/// What an agent reports about its node every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHeartbeat {
    pub node_id: NodeId,
    pub hostname: String,
    pub address: String,
    pub role: String,
    pub labels: BTreeMap<String, String>,
    pub total_cpu_millis: i64,
    pub total_memory_bytes: i64,
    pub used_cpu_millis: i64,
    pub used_memory_bytes: i64,
    pub max_deployments: i32,
    pub agent_version: String,
    /// How long the agent waits, cut off, before stopping its `fence`
    /// replicas; `None`: it never does.
    pub fence_after: Option<std::time::Duration>,
}

// ---- row decoding -------------------------------------------------------

#[derive(sqlx::FromRow)]
pub(crate) struct DeploymentRow {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub project_id: Uuid,
    pub name: String,
    pub image: String,
    pub container_port: i32,
    pub env: sqlx::types::Json<Vec<EnvVar>>,
    pub domain: Option<String>,
    pub path_prefix: String,
    pub memory_limit_bytes: i64,
    pub cpu_limit_millis: i64,
    pub replicas: i32,
    pub desired_state: String,
    pub generation: i64,
    pub restart_policy: sqlx::types::Json<RestartPolicy>,
    pub health_check: sqlx::types::Json<HealthCheck>,
    pub network_mode: String,
    pub placement_strategy: Option<String>,
    pub placement_constraints: sqlx::types::Json<BTreeMap<String, String>>,
    pub node_loss: String,
    pub placement_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub(crate) const DEPLOYMENT_COLUMNS: &str = "id, organization_id, project_id, name, image, container_port, env, domain, \
     path_prefix, memory_limit_bytes, cpu_limit_millis, replicas, desired_state, generation, restart_policy, health_check, \
     network_mode, placement_strategy, placement_constraints, node_loss, placement_message, created_at, updated_at";

/// A deployment's placement as its columns store it.
pub(crate) fn stored_placement(
    strategy: Option<&str>,
    constraints: &BTreeMap<String, String>,
    node_loss: &str,
) -> Result<Placement, flotilla_types::FieldError> {
    Ok(Placement {
        strategy: strategy.map(|s| PlacementStrategy::parse("placement_strategy", s)).transpose()?,
        constraints: Constraints::parse("placement_constraints", constraints)?,
        node_loss: NodeLoss::parse("node_loss", node_loss)?,
    })
}

pub(crate) fn corrupt(table: &'static str, id: impl std::fmt::Display, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { table, id: id.to_string(), detail: detail.to_string() }
}

impl TryFrom<DeploymentRow> for DeploymentRecord {
    type Error = StoreError;

    fn try_from(row: DeploymentRow) -> Result<Self, StoreError> {
        let bad = |detail: String| corrupt("deployments", row.id, detail);
        let image = ImageReference::parse("image", &row.image).map_err(|e| bad(e.to_string()))?;
        let domain =
            row.domain.as_deref().map(|d| Hostname::parse("domain", d)).transpose().map_err(|e| bad(e.to_string()))?;
        let path_prefix = PathPrefix::parse("path_prefix", &row.path_prefix).map_err(|e| bad(e.to_string()))?;
        let desired_state =
            row.desired_state.parse().map_err(|e: flotilla_types::status::UnknownState| bad(e.to_string()))?;
        let port = u16::try_from(row.container_port).map_err(|e| bad(e.to_string()))?;
        let replicas = u32::try_from(row.replicas).map_err(|e| bad(e.to_string()))?;
        let network_mode =
            NetworkMode::parse(&row.network_mode).ok_or_else(|| bad(format!("network mode {:?}", row.network_mode)))?;
        let placement =
            stored_placement(row.placement_strategy.as_deref(), &row.placement_constraints.0, &row.node_loss)
                .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            id: row.id.into(),
            organization_id: row.organization_id.into(),
            project_id: row.project_id.into(),
            spec: DeploymentSpec {
                name: row.name,
                image,
                port,
                env: row.env.0,
                domain,
                path_prefix,
                limits: ResourceLimits { memory_bytes: row.memory_limit_bytes, cpu_millis: row.cpu_limit_millis },
                replicas,
                health_check: row.health_check.0,
                restart_policy: row.restart_policy.0,
                network_mode,
                placement,
            },
            desired_state,
            generation: row.generation,
            placement_message: row.placement_message,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct ReplicaRow {
    pub id: Uuid,
    pub deployment_id: Uuid,
    pub replica_index: i32,
    pub generation: i64,
    pub target_generation: i64,
    pub failed_generation: Option<i64>,
    pub rollout_message: Option<String>,
    pub node_id: String,
    pub container_id: Option<String>,
    pub container_name: Option<String>,
    pub status: String,
    pub health_status: String,
    pub address: Option<String>,
    pub port: Option<i32>,
    pub container_port: i32,
    pub status_message: Option<String>,
    pub placement_reason: Option<String>,
    pub moving: bool,
    pub retiring: bool,
    pub node_reachable: bool,
    pub restart_count: i32,
    pub last_exit_code: Option<i32>,
    pub last_exit_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

pub(crate) const REPLICA_COLUMNS: &str = concat!(
    "l.id, l.deployment_id, l.replica_index, l.generation, l.target_generation, \
     l.failed_generation, l.rollout_message, l.node_id, l.container_id, l.container_name, l.status, l.health_status, \
     l.address, l.port, l.container_port, l.status_message, l.placement_reason, coalesce(l.drain_state = 'moving', false) AS moving, \
     coalesce(l.drain_state = 'retiring', false) AS retiring, \
     coalesce((SELECT ",
    crate::serving::node_reachable!(),
    " FROM node_metadata n WHERE n.node_id = l.node_id), false) AS node_reachable, \
     l.restart_count, l.last_exit_code, l.last_exit_at, l.updated_at"
);

impl TryFrom<ReplicaRow> for ReplicaRecord {
    type Error = StoreError;

    fn try_from(row: ReplicaRow) -> Result<Self, StoreError> {
        let bad = |detail: String| corrupt("deployment_locations", row.id, detail);
        Ok(Self {
            id: row.id.into(),
            deployment_id: row.deployment_id.into(),
            replica_index: row.replica_index,
            generation: row.generation,
            target_generation: row.target_generation,
            failed_generation: row.failed_generation,
            rollout_message: row.rollout_message,
            node_id: NodeId::parse(&row.node_id).map_err(|e| bad(e.to_string()))?,
            container_id: row.container_id,
            container_name: row.container_name,
            status: row.status.parse().map_err(|e: flotilla_types::status::UnknownState| bad(e.to_string()))?,
            health: row.health_status.parse().map_err(|e: flotilla_types::status::UnknownState| bad(e.to_string()))?,
            address: row.address,
            port: row.port.map(u16::try_from).transpose().map_err(|e| bad(e.to_string()))?,
            container_port: u16::try_from(row.container_port).map_err(|e| bad(e.to_string()))?,
            status_message: row.status_message,
            placement_reason: row.placement_reason,
            moving: row.moving,
            retiring: row.retiring,
            node_reachable: row.node_reachable,
            restart_count: u32::try_from(row.restart_count).unwrap_or_default(),
            last_exit_code: row.last_exit_code,
            last_exit_at: row.last_exit_at,
            updated_at: row.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct NodeRow {
    pub node_id: String,
    pub hostname: String,
    pub address: String,
    pub role: String,
    pub availability: String,
    pub status: String,
    pub labels: sqlx::types::Json<BTreeMap<String, String>>,
    pub total_cpu_millis: i64,
    pub total_memory_bytes: i64,
    pub used_cpu_millis: i64,
    pub used_memory_bytes: i64,
    pub deployment_count: i32,
    pub max_deployments: i32,
    pub agent_version: String,
    pub last_heartbeat: DateTime<Utc>,
}

pub(crate) const NODE_COLUMNS: &str = "node_id, hostname, address, role, availability, status, labels, \
     total_cpu_millis, total_memory_bytes, used_cpu_millis, used_memory_bytes, deployment_count, \
     max_deployments, agent_version, last_heartbeat";

impl TryFrom<NodeRow> for NodeRecord {
    type Error = StoreError;

    fn try_from(row: NodeRow) -> Result<Self, StoreError> {
        Ok(Self {
            node_id: NodeId::parse(&row.node_id).map_err(|e| corrupt("node_metadata", &row.node_id, e))?,
            hostname: row.hostname,
            address: row.address,
            role: row.role,
            availability: row.availability,
            status: row.status,
            labels: row.labels.0,
            total_cpu_millis: row.total_cpu_millis,
            total_memory_bytes: row.total_memory_bytes,
            used_cpu_millis: row.used_cpu_millis,
            used_memory_bytes: row.used_memory_bytes,
            deployment_count: row.deployment_count,
            max_deployments: row.max_deployments,
            agent_version: row.agent_version,
            last_heartbeat: row.last_heartbeat,
        })
    }
}

pub(crate) fn collect<R, T>(rows: Vec<R>) -> Result<Vec<T>, StoreError>
where
    T: TryFrom<R, Error = StoreError>,
{
    rows.into_iter().map(T::try_from).collect()
}
