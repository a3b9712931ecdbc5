//! DeploymentService handlers. Each validates its whole request before it
//! changes anything, acts only through the caller's organization, and wakes
//! whoever has to act next.

use std::collections::BTreeSet;

use axum::extract::State;
use connectrpc_axum::{BoxedStream, ConnectError, ConnectRequest, ConnectResponse, StreamBody};
use flotilla_proto::v1 as pb;
use flotilla_redis::{ORCHESTRATOR_TOPIC, agent_topic};
use flotilla_store::DeploymentView;
use flotilla_store::changes::Change;
use flotilla_store::tenant::{CreatedOnce, MAX_PAGE_SIZE};
use flotilla_types::{
    DeploymentId, DeploymentSpec, DesiredState, EnvVar, FieldError, Hostname, NodeId, PathPrefix, ProjectId,
};

use crate::auth::Caller;
use crate::convert::{self, parse_id, parse_optional_id};
use crate::{ApiError, ApiState};

const DEFAULT_PAGE_SIZE: i64 = 50;

type Reply<T> = Result<ConnectResponse<T>, ConnectError>;

pub(crate) fn require_mutation(caller: &Caller) -> Result<(), ApiError> {
    if caller.role.can_mutate() {
        Ok(())
    } else {
        Err(ApiError::PermissionDenied("viewers cannot change deployments".to_owned()))
    }
}

pub async fn create_deployment(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::CreateDeploymentRequest>,
) -> Reply<pb::CreateDeploymentResponse> {
    // Boxed: the spec and its validation make a large future.
    let target = request.name.clone();
    api.audited("CreateDeployment", &caller, &target, Box::pin(async {
        require_mutation(&caller)?;
        let project: Option<ProjectId> = parse_optional_id("project_id", &request.project_id)?;
        let key = idempotency_key(&request.idempotency_key)?;
        let spec = DeploymentSpec::validate(convert::spec_input(request)?)?;
        let tenant = api.store.tenant(caller.organization_id);
        let created = match &key {
            None => tenant.create_deployment(project, &spec).await?,
            Some(key) => match tenant.create_deployment_once(project, &spec, &caller.subject, key).await? {
                CreatedOnce::Created(record) => record,
                CreatedOnce::Replayed(view) => {
                    tracing::info!(deployment.id = %view.deployment.id, subject = %caller.subject, "create retried with the same idempotency key: the first result");
                    return Ok(pb::CreateDeploymentResponse { deployment: Some(convert::deployment(&view)) });
                }
            },
        };
        tracing::info!(deployment.id = %created.id, deployment.name = %spec.name, subject = %caller.subject, "deployment created");
        // Answer with the state just written (pending, no replicas yet), not
        // with whatever the orchestrator may already have done.
        let view = DeploymentView { deployment: created, replicas: Vec::new() };
        api.wake.wake(ORCHESTRATOR_TOPIC).await;
        Ok(pb::CreateDeploymentResponse {
            deployment: Some(convert::deployment(&view)),
        })
    }))
    .await
}

/// An idempotency key as sent: empty is none; otherwise 1-128 printable ASCII.
fn idempotency_key(value: &str) -> Result<Option<String>, ApiError> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > 128 || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            FieldError::new("idempotency_key", "must be 1-128 printable ASCII characters without spaces").into()
        );
    }
    Ok(Some(value.to_owned()))
}

pub async fn get_deployment(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::GetDeploymentRequest>,
) -> Reply<pb::GetDeploymentResponse> {
    api.observe("GetDeployment", async {
        let id: DeploymentId = match (request.id.is_empty(), request.name.is_empty()) {
            (false, true) => parse_id("id", &request.id)?,
            (true, false) => {
                let project: Option<ProjectId> = parse_optional_id("project_id", &request.project_id)?;
                api.store.tenant(caller.organization_id).deployment_named(project, &request.name).await?
            }
            (false, false) => return Err(FieldError::new("name", "give the id or the name, not both").into()),
            (true, true) => return Err(FieldError::required("id").into()),
        };
        if let Some(cached) = api.views.get(caller.organization_id, id) {
            return Ok(pb::GetDeploymentResponse { deployment: Some(cached.as_ref().clone()) });
        }
        let stamp = api.views.stamp(id);
        let view = api.store.tenant(caller.organization_id).get_deployment(id).await?;
        let deployment = convert::deployment(&view);
        api.views.put(caller.organization_id, id, &deployment, stamp);
        Ok(pb::GetDeploymentResponse { deployment: Some(deployment) })
    })
    .await
}

/// Store pages one ListDeployments with a status filter reads at most.
const STATUS_FILTER_PAGES: usize = 5;

pub async fn list_deployments(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::ListDeploymentsRequest>,
) -> Reply<pb::ListDeploymentsResponse> {
    api.observe("ListDeployments", async {
        let project: Option<ProjectId> = parse_optional_id("project_id", &request.project_id)?;
        let page_size = match i64::from(request.page_size) {
            0 => DEFAULT_PAGE_SIZE,
            n if (1..=MAX_PAGE_SIZE).contains(&n) => n,
            n => return Err(FieldError::new("page_size", format!("{n} is out of range 1-{MAX_PAGE_SIZE}")).into()),
        };
        let mut after: Option<DeploymentId> = parse_optional_id("page_token", &request.page_token)?;
        let node = match request.node_id.as_str() {
            "" => None,
            id => Some(NodeId::parse(id).map_err(|e| FieldError::new("node_id", e.to_string()))?),
        };
        let status = match pb::DeploymentStatus::try_from(request.status) {
            Ok(pb::DeploymentStatus::Unspecified) => None,
            Ok(status) => Some(status as i32),
            Err(_) => {
                return Err(FieldError::new("status", format!("{} is not a deployment status", request.status)).into());
            }
        };
        let tenant = api.store.tenant(caller.organization_id);
        // The status is derived from the replicas, so it is filtered here; a
        // few store pages at most per request, then the client goes on.
        let mut deployments = Vec::new();
        for _ in 0..STATUS_FILTER_PAGES {
            let page = tenant.list_deployments(project, node.as_ref(), after, page_size).await?;
            after = page.next_after;
            deployments.extend(
                page.deployments
                    .iter()
                    .map(|view| (view.deployment.id, convert::deployment(view)))
                    .filter(|(_, d)| status.is_none_or(|s| d.status == s)),
            );
            if status.is_none() || deployments.len() as i64 >= page_size || after.is_none() {
                break;
            }
        }
        if deployments.len() as i64 > page_size {
            // The next page starts after the last one returned, not after the last one read.
            deployments.truncate(page_size as usize);
            after = deployments.last().map(|(id, _)| *id);
        }
        Ok(pb::ListDeploymentsResponse {
            deployments: deployments.into_iter().map(|(_, d)| d).collect(),
            next_page_token: after.map(|id| id.to_string()).unwrap_or_default(),
        })
    })
    .await
}

pub async fn update_deployment(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::UpdateDeploymentRequest>,
) -> Reply<pb::UpdateDeploymentResponse> {
    // Boxed: the update reads, validates and writes, and its future is large.
    let target = request.id.clone();
    api.audited("UpdateDeployment", &caller, &target, Box::pin(update(&api, &caller, request))).await
}

async fn update(
    api: &ApiState,
    caller: &Caller,
    request: pb::UpdateDeploymentRequest,
) -> Result<pb::UpdateDeploymentResponse, ApiError> {
    require_mutation(caller)?;
    let id: DeploymentId = parse_id("id", &request.id)?;
    if request.expected_generation < 0 {
        return Err(FieldError::new("expected_generation", "must not be negative").into());
    }
    let tenant = api.store.tenant(caller.organization_id);
    let current = live_deployment(api, caller, id).await?.deployment;
    if request.expected_generation != 0 && request.expected_generation != current.generation {
        return Err(ApiError::Aborted(format!(
            "deployment {id} is at generation {}, not {}",
            current.generation, request.expected_generation
        )));
    }
    let spec = apply_update(&current.spec, request)?;
    let new_generation = current.spec.needs_new_containers(&spec);
    let updated = tenant.update_deployment(id, current.generation, &spec, new_generation).await?;
    tracing::info!(
        deployment.id = %id,
        generation = updated.generation,
        new_generation,
        subject = %caller.subject,
        "deployment updated"
    );
    let view = tenant.get_deployment(id).await?;
    changed_deployment(api, &view).await;
    Ok(pb::UpdateDeploymentResponse { deployment: Some(convert::deployment(&view)) })
}

/// A deployment of the caller's organization that is not being deleted.
pub(crate) async fn live_deployment(
    api: &ApiState,
    caller: &Caller,
    id: DeploymentId,
) -> Result<DeploymentView, ApiError> {
    let view = api.store.tenant(caller.organization_id).get_deployment(id).await?;
    if view.deployment.desired_state == DesiredState::Deleted {
        return Err(ApiError::NotFound { what: "deployment", id: id.to_string() });
    }
    Ok(view)
}

pub async fn get_env_vars(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::GetEnvVarsRequest>,
) -> Reply<pb::GetEnvVarsResponse> {
    api.observe("GetEnvVars", async {
        let d = live_deployment(&api, &caller, parse_id("id", &request.id)?).await?.deployment;
        Ok(pb::GetEnvVarsResponse { vars: convert::env_out(&d.spec.env), generation: d.generation })
    })
    .await
}

pub async fn update_env_vars(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::UpdateEnvVarsRequest>,
) -> Reply<pb::UpdateEnvVarsResponse> {
    let target = request.id.clone();
    let change = pb::UpdateDeploymentRequest {
        id: request.id,
        expected_generation: request.expected_generation,
        env: Some(pb::EnvList { vars: request.vars }),
        ..Default::default()
    };
    api.audited(
        "UpdateEnvVars",
        &caller,
        &target,
        Box::pin(async {
            let updated = update(&api, &caller, change).await?.deployment.unwrap_or_default();
            Ok(pb::UpdateEnvVarsResponse { vars: updated.env, generation: updated.generation })
        }),
    )
    .await
}

pub async fn get_routings(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::GetRoutingsRequest>,
) -> Reply<pb::GetRoutingsResponse> {
    api.observe("GetRoutings", async {
        let d = live_deployment(&api, &caller, parse_id("id", &request.id)?).await?.deployment;
        let rows = api.store.tenant(caller.organization_id).routings(d.id).await?;
        let proxies = match rows.is_empty() {
            true => 0,
            false => {
                api.store.live_edge_proxies(flotilla_edge::EdgeSyncConfig::default().proxy_gone_after).await?.len()
            }
        };
        Ok(pb::GetRoutingsResponse {
            domain: d.spec.domain.as_ref().map(ToString::to_string).unwrap_or_default(),
            path_prefix: d.spec.path_prefix.to_string(),
            routings: rows.into_iter().map(|r| routing(&api, d.id, r, proxies)).collect(),
            generation: d.generation,
        })
    })
    .await
}

/// A routing row as users see it: served or why not.
fn routing(api: &ApiState, id: DeploymentId, r: flotilla_store::routes::RoutingRecord, proxies: usize) -> pb::Routing {
    let router_name = match (Hostname::parse("domain", &r.domain), PathPrefix::parse("path_prefix", &r.path_prefix)) {
        (Ok(domain), Ok(path_prefix)) => flotilla_edge::Route { deployment_id: id, domain, path_prefix }.router_name(),
        _ => String::new(),
    };
    let not_served_reason = if !r.domain_verified && api.domains.needs_proof_of(&r.domain) {
        format!("{} is not proven yet: publish its TXT record (flo domains <app> --verify)", r.domain)
    } else if r.serving_replicas == 0 && r.down {
        "no replica serves: the app is down, and the edge answers 503".to_owned()
    } else if r.serving_replicas == 0 {
        "no replica serves yet: the edge answers 404 until one does".to_owned()
    } else if proxies == 0 {
        "no edge proxy (Traefik) takes the route table: nothing answers for this domain".to_owned()
    } else {
        String::new()
    };
    pb::Routing {
        url: api.domains.url(r.tls_enabled, &r.domain, &r.path_prefix),
        served: not_served_reason.is_empty(),
        not_served_reason,
        serving_replicas: u32::try_from(r.serving_replicas).unwrap_or_default(),
        edge_proxies: u32::try_from(proxies).unwrap_or_default(),
        domain: r.domain,
        path_prefix: r.path_prefix,
        target_port: u32::try_from(r.container_port).unwrap_or_default(),
        protocol: "http".to_owned(),
        tls_enabled: r.tls_enabled,
        router_name,
    }
}

pub async fn update_routings(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::UpdateRoutingsRequest>,
) -> Reply<pb::UpdateRoutingsResponse> {
    let target = request.id.clone();
    let change = pb::UpdateDeploymentRequest {
        id: request.id,
        expected_generation: request.expected_generation,
        domain: request.domain,
        path_prefix: request.path_prefix,
        ..Default::default()
    };
    api.audited(
        "UpdateRoutings",
        &caller,
        &target,
        Box::pin(async {
            let updated = update(&api, &caller, change).await?;
            Ok(pb::UpdateRoutingsResponse { deployment: updated.deployment })
        }),
    )
    .await
}

/// A status stream re-reads at least this often: changes are pushed
/// (PostgreSQL NOTIFY), this covers one missed while the listener reconnected.
const STATUS_FALLBACK: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn stream_deployment_status(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::StreamDeploymentStatusRequest>,
) -> Reply<StreamBody<BoxedStream<pb::DeploymentStatusEvent>>> {
    let shutdown = api.shutdown.clone();
    let store = api.store.clone();
    // Subscribed before the first read: no change falls in between.
    let changes = api.changes.subscribe();
    api.observe("StreamDeploymentStatus", async {
        let duration = crate::usage::stream_duration(request.max_duration_seconds)?;
        let id: DeploymentId = parse_id("id", &request.id)?;
        let organization = caller.organization_id;
        let first = convert::deployment(&store.tenant(organization).get_deployment(id).await?);
        let deadline = tokio::time::Instant::now() + duration;
        let event = |deployment: pb::Deployment| pb::DeploymentStatusEvent {
            deployment: Some(deployment),
            observed_at: Some(convert::timestamp(chrono::Utc::now())),
        };
        let initial = futures::stream::once(std::future::ready(Ok::<_, ConnectError>(event(first.clone()))));
        let later = futures::stream::unfold((first, changes), move |(mut sent, mut changes)| {
            let (store, shutdown) = (store.clone(), shutdown.clone());
            async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep_until(deadline) => return None,
                        change = changes.recv() => match change {
                            Ok(Change::Deployment(changed)) if changed != id => continue,
                            Ok(Change::Routes) => continue,
                            // Ours, or some lost: read.
                            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                tokio::time::sleep(STATUS_FALLBACK).await;
                            }
                        },
                        () = tokio::time::sleep(STATUS_FALLBACK) => {}
                    }
                    match store.tenant(organization).get_deployment(id).await {
                        Ok(view) => {
                            let now = convert::deployment(&view);
                            if status_changed(&sent, &now) {
                                sent = now.clone();
                                return Some((Ok(event(now)), (sent, changes)));
                            }
                        }
                        // Gone: the stream ends normally.
                        Err(flotilla_store::StoreError::NotFound { .. }) => return None,
                        Err(error) => {
                            tracing::warn!(%error, deployment.id = %id, "status stream: reading the deployment failed; retrying");
                        }
                    }
                }
            }
        });
        let boxed: BoxedStream<pb::DeploymentStatusEvent> = Box::pin(futures::StreamExt::chain(initial, later));
        Ok(StreamBody::new(boxed))
    })
    .await
}

/// Whether a client watching status would want to hear of this change.
fn status_changed(before: &pb::Deployment, now: &pb::Deployment) -> bool {
    before.status != now.status
        || before.status_message != now.status_message
        || before.generation != now.generation
        || before.replicas != now.replicas
        || before.rollout != now.rollout
        || before.placement_message != now.placement_message
}

/// The current spec with the request's changes, validated as a whole.
fn apply_update(current: &DeploymentSpec, request: pb::UpdateDeploymentRequest) -> Result<DeploymentSpec, ApiError> {
    let mut input = current.to_input();
    if let Some(image) = request.image {
        input.image = image;
    }
    if let Some(port) = request.port {
        input.port = port;
    }
    if let Some(env) = request.env {
        input.env = convert::env_vars(env.vars)
            .into_iter()
            .map(|mut var| {
                // A masked secret sent back keeps its value.
                if var.secret
                    && var.value == EnvVar::MASK
                    && let Some(old) = current.env.iter().find(|old| old.secret && old.name == var.name)
                {
                    var.value = old.value.clone();
                }
                var
            })
            .collect();
    }
    if let Some(limits) = request.limits {
        input.limits = convert::limits(limits);
    }
    if request.replicas.is_some() {
        input.replicas = request.replicas;
    }
    if let Some(domain) = request.domain {
        // Removing the domain removes its path prefix with it.
        if domain.is_empty() {
            input.path_prefix.clear();
        }
        input.domain = domain;
    }
    if let Some(path_prefix) = request.path_prefix {
        input.path_prefix = path_prefix;
    }
    if let Some(check) = &request.health_check {
        input.health_check = Some(convert::health_check("health_check", check)?);
    }
    if let Some(policy) = &request.restart_policy {
        input.restart_policy = Some(convert::restart_policy("restart_policy", policy)?);
    }
    if let Some(mode) = convert::network_mode("network_mode", request.network_mode)? {
        input.network_mode = Some(mode);
    }
    if let Some(placement) = request.placement {
        input.placement_strategy = placement.strategy;
        input.placement_node_loss = placement.node_loss;
        input.placement_constraints = placement.constraints.into_iter().collect();
    }
    Ok(DeploymentSpec::validate(input)?)
}

/// After a change of `view`'s deployment: drops its cached answer (so this
/// caller reads its own write without waiting for PostgreSQL's notice) and
/// wakes whoever acts next.
async fn changed_deployment(api: &ApiState, view: &DeploymentView) {
    api.views.invalidate(view.deployment.id);
    let nodes: BTreeSet<String> = view.replicas.iter().map(|r| r.node_id.to_string()).collect();
    for node in nodes {
        api.wake.wake(&agent_topic(&node)).await;
    }
    api.wake.wake(ORCHESTRATOR_TOPIC).await;
}

pub async fn delete_deployment(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::DeleteDeploymentRequest>,
) -> Reply<pb::DeleteDeploymentResponse> {
    api.audited("DeleteDeployment", &caller, &request.id, async {
        require_mutation(&caller)?;
        let id: DeploymentId = parse_id("id", &request.id)?;
        let view = api.store.tenant(caller.organization_id).delete_deployment(id).await?;
        tracing::info!(deployment.id = %id, subject = %caller.subject, "deployment marked for deletion");
        changed_deployment(&api, &view).await;
        Ok(pb::DeleteDeploymentResponse { deployment: Some(convert::deployment(&view)) })
    })
    .await
}

/// A change of a deployment's desired state: start, stop or restart.
async fn change_state(api: &ApiState, caller: &Caller, id: &str, to: StateChange) -> Result<DeploymentView, ApiError> {
    require_mutation(caller)?;
    let id: DeploymentId = parse_id("id", id)?;
    let tenant = api.store.tenant(caller.organization_id);
    let view = match to {
        StateChange::Start => tenant.set_desired_state(id, DesiredState::Running).await?,
        StateChange::Stop => tenant.set_desired_state(id, DesiredState::Stopped).await?,
        StateChange::Restart => tenant.restart_deployment(id).await?,
    };
    tracing::info!(deployment.id = %id, change = ?to, subject = %caller.subject, "deployment state changed");
    changed_deployment(api, &view).await;
    Ok(view)
}

#[derive(Debug, Clone, Copy)]
enum StateChange {
    Start,
    Stop,
    Restart,
}

pub async fn start_deployment(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::StartDeploymentRequest>,
) -> Reply<pb::StartDeploymentResponse> {
    api.audited("StartDeployment", &caller, &request.id, async {
        let view = change_state(&api, &caller, &request.id, StateChange::Start).await?;
        Ok(pb::StartDeploymentResponse { deployment: Some(convert::deployment(&view)) })
    })
    .await
}

pub async fn stop_deployment(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::StopDeploymentRequest>,
) -> Reply<pb::StopDeploymentResponse> {
    api.audited("StopDeployment", &caller, &request.id, async {
        let view = change_state(&api, &caller, &request.id, StateChange::Stop).await?;
        Ok(pb::StopDeploymentResponse { deployment: Some(convert::deployment(&view)) })
    })
    .await
}

pub async fn restart_deployment(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::RestartDeploymentRequest>,
) -> Reply<pb::RestartDeploymentResponse> {
    api.audited("RestartDeployment", &caller, &request.id, async {
        let view = change_state(&api, &caller, &request.id, StateChange::Restart).await?;
        Ok(pb::RestartDeploymentResponse { deployment: Some(convert::deployment(&view)) })
    })
    .await
}

pub async fn scale_deployment(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::ScaleDeploymentRequest>,
) -> Reply<pb::ScaleDeploymentResponse> {
    let target = request.id.clone();
    let update_request =
        pb::UpdateDeploymentRequest { id: request.id, replicas: Some(request.replicas), ..Default::default() };
    api.audited(
        "ScaleDeployment",
        &caller,
        &target,
        Box::pin(async {
            let updated = update(&api, &caller, update_request).await?;
            Ok(pb::ScaleDeploymentResponse { deployment: updated.deployment })
        }),
    )
    .await
}
