//! NodeService handlers: the cluster's nodes, for platform administrators.
//! Drain and activate only change what operators own (availability); the
//! orchestrator's leader does the moving and wakes nodes.

use axum::extract::State;
use connectrpc_axum::{ConnectError, ConnectRequest, ConnectResponse};
use flotilla_proto::v1 as pb;
use flotilla_redis::ORCHESTRATOR_TOPIC;
use flotilla_store::NodeRecord;
use flotilla_types::{FieldError, NodeId};

use crate::auth::Caller;
use crate::convert::timestamp;
use crate::{ApiError, ApiState};

type Reply<T> = Result<ConnectResponse<T>, ConnectError>;

fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.platform_admin {
        Ok(())
    } else {
        Err(ApiError::PermissionDenied(
            "only platform administrators may see and manage the platform's nodes and backups".to_owned(),
        ))
    }
}

fn parse_node_id(value: &str) -> Result<NodeId, ApiError> {
    if value.is_empty() {
        return Err(FieldError::required("id").into());
    }
    NodeId::parse(value).map_err(|e| FieldError::new("id", e.to_string()).into())
}

fn node(record: &NodeRecord, moving: i32) -> pb::Node {
    pb::Node {
        id: record.node_id.to_string(),
        hostname: record.hostname.clone(),
        address: record.address.clone(),
        role: record.role.clone(),
        availability: record.availability.clone(),
        status: record.status.clone(),
        labels: record.labels.clone().into_iter().collect(),
        total_cpu_millis: record.total_cpu_millis,
        total_memory_bytes: record.total_memory_bytes,
        used_cpu_millis: record.used_cpu_millis,
        used_memory_bytes: record.used_memory_bytes,
        deployment_count: record.deployment_count,
        max_deployments: record.max_deployments,
        agent_version: record.agent_version.clone(),
        last_heartbeat: Some(timestamp(record.last_heartbeat)),
        replicas_moving: moving,
    }
}

async fn read_node(api: &ApiState, id: &NodeId) -> Result<pb::Node, ApiError> {
    let record = api.store.node(id).await?.ok_or_else(|| ApiError::NotFound { what: "node", id: id.to_string() })?;
    let moving = api.store.replicas_moving_by_node().await?;
    Ok(node(&record, moving.get(id.as_str()).copied().unwrap_or(0)))
}

pub async fn list_nodes(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(_request): ConnectRequest<pb::ListNodesRequest>,
) -> Reply<pb::ListNodesResponse> {
    api.observe("ListNodes", async {
        require_admin(&caller)?;
        let records = api.store.list_nodes().await?;
        let moving = api.store.replicas_moving_by_node().await?;
        let leader = api.store.current_leader().await?.map(|l| l.holder).unwrap_or_default();
        Ok(pb::ListNodesResponse {
            nodes: records.iter().map(|r| node(r, moving.get(r.node_id.as_str()).copied().unwrap_or(0))).collect(),
            leader,
        })
    })
    .await
}

pub async fn get_node(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::GetNodeRequest>,
) -> Reply<pb::GetNodeResponse> {
    api.observe("GetNode", async {
        require_admin(&caller)?;
        let id = parse_node_id(&request.id)?;
        Ok(pb::GetNodeResponse { node: Some(read_node(&api, &id).await?) })
    })
    .await
}

async fn set_availability(api: &ApiState, id: &NodeId, availability: &str, now: bool) -> Result<pb::Node, ApiError> {
    if !api.store.set_node_availability(id, availability, now).await? {
        return Err(ApiError::NotFound { what: "node", id: id.to_string() });
    }
    api.wake.wake(ORCHESTRATOR_TOPIC).await;
    read_node(api, id).await
}

pub async fn drain_node(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::DrainNodeRequest>,
) -> Reply<pb::DrainNodeResponse> {
    api.audited("DrainNode", &caller, &request.id, async {
        require_admin(&caller)?;
        let id = parse_node_id(&request.id)?;
        let node = set_availability(&api, &id, "drain", request.now).await?;
        tracing::warn!(node.id = %id, now = request.now, subject = %caller.subject, "node drained");
        Ok(pb::DrainNodeResponse { node: Some(node) })
    })
    .await
}

pub async fn activate_node(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::ActivateNodeRequest>,
) -> Reply<pb::ActivateNodeResponse> {
    api.audited("ActivateNode", &caller, &request.id, async {
        require_admin(&caller)?;
        let id = parse_node_id(&request.id)?;
        let node = set_availability(&api, &id, "active", false).await?;
        tracing::info!(node.id = %id, subject = %caller.subject, "node activated");
        Ok(pb::ActivateNodeResponse { node: Some(node) })
    })
    .await
}

fn database_backup(record: &flotilla_store::backups::DatabaseBackup) -> pb::DatabaseBackup {
    pb::DatabaseBackup {
        label: record.label.clone(),
        started_at: Some(timestamp(record.started_at)),
        finished_at: Some(timestamp(record.finished_at)),
        succeeded: record.succeeded,
        size_bytes: record.size_bytes.unwrap_or(0),
        wal_start: record.wal_start.clone().unwrap_or_default(),
        location: record.location.clone(),
        error: record.error.clone().unwrap_or_default(),
    }
}

pub async fn list_database_backups(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::ListDatabaseBackupsRequest>,
) -> Reply<pb::ListDatabaseBackupsResponse> {
    api.observe("ListDatabaseBackups", async {
        require_admin(&caller)?;
        let limit = match request.limit {
            0 => 20,
            1..=200 => request.limit,
            _ => return Err(FieldError::new("limit", "must be between 1 and 200 (0 for 20)").into()),
        };
        let history = api.store.database_backups(i64::from(limit)).await?;
        Ok(pb::ListDatabaseBackupsResponse {
            backups: history.recent.iter().map(database_backup).collect(),
            last_good: history.last_good.as_ref().map(database_backup),
        })
    })
    .await
}
