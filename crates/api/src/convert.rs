//! Between the protocol's messages and the domain's types. Conversions of
//! requests check what the domain types cannot express (negative numbers in
//! `int32` fields, unknown enum values) and name the field when they fail.

use chrono::{DateTime, Utc};
use flotilla_proto::v1 as pb;
use flotilla_store::{DeploymentRecord, DeploymentView, ReplicaRecord};
use flotilla_types::status::{Health, Rollout};
use flotilla_types::{
    DeploymentSpecInput, DeploymentStatus, EnvVar, FieldError, HealthCheck, HealthCheckKind, NetworkMode, ReplicaState,
    ResourceLimits, RestartPolicy,
};
use std::str::FromStr;

pub fn timestamp(t: DateTime<Utc>) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// Parses a required id field.
pub fn parse_id<T: FromStr>(field: &str, value: &str) -> Result<T, FieldError> {
    if value.is_empty() {
        return Err(FieldError::required(field));
    }
    value.parse().map_err(|_| FieldError::new(field, format!("{value:?} is not a valid id (a UUID)")))
}

/// Parses an optional id field (empty means not given).
pub fn parse_optional_id<T: FromStr>(field: &str, value: &str) -> Result<Option<T>, FieldError> {
    if value.is_empty() { Ok(None) } else { parse_id(field, value).map(Some) }
}

fn unknown_enum(field: &str, value: i32) -> FieldError {
    FieldError::new(field, format!("{value} is not a known value"))
}

pub fn env_vars(vars: Vec<pb::EnvVar>) -> Vec<EnvVar> {
    vars.into_iter().map(|v| EnvVar { name: v.name, value: v.value, secret: v.secret }).collect()
}

pub fn limits(limits: pb::ResourceLimits) -> ResourceLimits {
    ResourceLimits { memory_bytes: limits.memory_bytes, cpu_millis: limits.cpu_millis }
}

/// A non-negative `int32` millisecond or count field; 0 means the default.
fn positive_or_default(field: String, value: i32, default: u32) -> Result<u32, FieldError> {
    match value {
        0 => Ok(default),
        v if v > 0 => Ok(v as u32),
        v => Err(FieldError::new(field, format!("{v} must not be negative"))),
    }
}

pub fn health_check(field: &str, check: &pb::HealthCheck) -> Result<HealthCheck, FieldError> {
    let kind = match pb::HealthCheckKind::try_from(check.kind) {
        Ok(pb::HealthCheckKind::Unspecified | pb::HealthCheckKind::Tcp) => HealthCheckKind::Tcp,
        Ok(pb::HealthCheckKind::None) => HealthCheckKind::None,
        Ok(pb::HealthCheckKind::Http) => HealthCheckKind::Http,
        Ok(pb::HealthCheckKind::Command) => HealthCheckKind::Command,
        Err(_) => return Err(unknown_enum(&format!("{field}.kind"), check.kind)),
    };
    let defaults = HealthCheck::of(kind);
    let sub = |name: &str| format!("{field}.{name}");
    let port = match check.port {
        0 => None,
        p if (1..=65535).contains(&p) => Some(p as u16),
        p => return Err(FieldError::new(sub("port"), format!("{p} is out of range 1-65535"))),
    };
    Ok(HealthCheck {
        kind,
        path: if check.http_path.is_empty() { defaults.path.clone() } else { check.http_path.clone() },
        port,
        command: check.command.clone(),
        interval_ms: positive_or_default(sub("interval_ms"), check.interval_ms, defaults.interval_ms)?,
        timeout_ms: positive_or_default(sub("timeout_ms"), check.timeout_ms, defaults.timeout_ms)?,
        unhealthy_threshold: positive_or_default(
            sub("unhealthy_threshold"),
            check.unhealthy_threshold,
            defaults.unhealthy_threshold,
        )?,
        startup_timeout_ms: positive_or_default(
            sub("startup_timeout_ms"),
            check.startup_timeout_ms,
            defaults.startup_timeout_ms,
        )?,
    })
}

pub fn restart_policy(field: &str, policy: &pb::RestartPolicy) -> Result<RestartPolicy, FieldError> {
    let max_retries = positive_or_default(format!("{field}.max_retries"), policy.max_retries, 0)?;
    match pb::RestartPolicyKind::try_from(policy.kind) {
        Ok(pb::RestartPolicyKind::Unspecified | pb::RestartPolicyKind::UnlessStopped) => {
            Ok(RestartPolicy::UnlessStopped)
        }
        Ok(pb::RestartPolicyKind::No) => Ok(RestartPolicy::No),
        Ok(pb::RestartPolicyKind::OnFailure) => Ok(RestartPolicy::OnFailure { max_retries }),
        Ok(pb::RestartPolicyKind::Always) => Ok(RestartPolicy::Always),
        Err(_) => Err(unknown_enum(&format!("{field}.kind"), policy.kind)),
    }
}

/// `None` for UNSPECIFIED.
pub fn network_mode(field: &str, mode: i32) -> Result<Option<NetworkMode>, FieldError> {
    match pb::NetworkMode::try_from(mode) {
        Ok(pb::NetworkMode::Unspecified) => Ok(None),
        Ok(pb::NetworkMode::Shared) => Ok(Some(NetworkMode::Shared)),
        Ok(pb::NetworkMode::Isolated) => Ok(Some(NetworkMode::Isolated)),
        Err(_) => Err(unknown_enum(field, mode)),
    }
}

pub fn spec_input(request: pb::CreateDeploymentRequest) -> Result<DeploymentSpecInput, FieldError> {
    Ok(DeploymentSpecInput {
        health_check: request.health_check.as_ref().map(|c| health_check("health_check", c)).transpose()?,
        restart_policy: request.restart_policy.as_ref().map(|p| restart_policy("restart_policy", p)).transpose()?,
        network_mode: network_mode("network_mode", request.network_mode)?,
        name: request.name,
        image: request.image,
        port: request.port,
        env: env_vars(request.env),
        domain: request.domain,
        path_prefix: request.path_prefix,
        limits: limits(request.limits.unwrap_or_default()),
        replicas: match (request.replicas, request.replica_count) {
            (Some(a), Some(b)) if a != b => {
                return Err(FieldError::new(
                    "replica_count",
                    format!("{b} disagrees with replicas {a}: give one of them"),
                ));
            }
            (a, b) => a.or(b),
        },
        placement_strategy: request.placement.as_ref().map(|p| p.strategy.clone()).unwrap_or_default(),
        placement_node_loss: request.placement.as_ref().map(|p| p.node_loss.clone()).unwrap_or_default(),
        placement_constraints: request.placement.map(|p| p.constraints.into_iter().collect()).unwrap_or_default(),
    })
}

fn deployment_status(status: DeploymentStatus) -> pb::DeploymentStatus {
    match status {
        DeploymentStatus::Pending => pb::DeploymentStatus::Pending,
        DeploymentStatus::Deploying => pb::DeploymentStatus::Deploying,
        DeploymentStatus::Running => pb::DeploymentStatus::Running,
        DeploymentStatus::Degraded => pb::DeploymentStatus::Degraded,
        DeploymentStatus::Failed => pb::DeploymentStatus::Failed,
        DeploymentStatus::Stopped => pb::DeploymentStatus::Stopped,
        DeploymentStatus::Deleting => pb::DeploymentStatus::Deleting,
    }
}

fn replica_status(state: ReplicaState) -> pb::ReplicaStatus {
    match state {
        ReplicaState::Pending => pb::ReplicaStatus::Pending,
        ReplicaState::Creating => pb::ReplicaStatus::Creating,
        ReplicaState::Running => pb::ReplicaStatus::Running,
        ReplicaState::Stopped => pb::ReplicaStatus::Stopped,
        ReplicaState::Failed => pb::ReplicaStatus::Failed,
        ReplicaState::Removing => pb::ReplicaStatus::Removing,
    }
}

fn replica_health(health: Health) -> pb::ReplicaHealth {
    match health {
        Health::Unknown => pb::ReplicaHealth::Unknown,
        Health::Starting => pb::ReplicaHealth::Starting,
        Health::Healthy => pb::ReplicaHealth::Healthy,
        Health::Unhealthy => pb::ReplicaHealth::Unhealthy,
        Health::None => pb::ReplicaHealth::None,
    }
}

fn replica(r: &ReplicaRecord, deployment: &DeploymentRecord) -> pb::Replica {
    pb::Replica {
        restart_count: r.restart_count,
        last_exit_code: r.last_exit_code,
        last_exit_at: r.last_exit_at.map(timestamp),
        serving: r.serving(deployment),
        index: r.replica_index as u32,
        node_id: r.node_id.to_string(),
        container_id: r.container_id.clone().unwrap_or_default(),
        status: replica_status(r.status) as i32,
        host: r.address.clone().unwrap_or_default(),
        host_port: r.port.map_or(0, u32::from),
        endpoint: r.endpoint().unwrap_or_default(),
        message: r.status_message.clone().unwrap_or_default(),
        updated_at: Some(timestamp(r.updated_at)),
        generation: r.generation,
        health: replica_health(r.health) as i32,
        placement_reason: r.placement_reason.clone().unwrap_or_default(),
        drain_state: match (r.moving, r.retiring) {
            (_, true) => "retiring".to_owned(),
            (true, _) => "moving".to_owned(),
            _ => String::new(),
        },
    }
}

fn health_check_out(check: &HealthCheck) -> pb::HealthCheck {
    let kind = match check.kind {
        HealthCheckKind::None => pb::HealthCheckKind::None,
        HealthCheckKind::Tcp => pb::HealthCheckKind::Tcp,
        HealthCheckKind::Http => pb::HealthCheckKind::Http,
        HealthCheckKind::Command => pb::HealthCheckKind::Command,
    };
    pb::HealthCheck {
        kind: kind as i32,
        http_path: check.path.clone(),
        port: check.port.map_or(0, i32::from),
        command: check.command.clone(),
        interval_ms: check.interval_ms as i32,
        timeout_ms: check.timeout_ms as i32,
        unhealthy_threshold: check.unhealthy_threshold as i32,
        startup_timeout_ms: check.startup_timeout_ms as i32,
    }
}

fn restart_policy_out(policy: RestartPolicy) -> pb::RestartPolicy {
    let (kind, max_retries) = match policy {
        RestartPolicy::No => (pb::RestartPolicyKind::No, 0),
        RestartPolicy::OnFailure { max_retries } => (pb::RestartPolicyKind::OnFailure, max_retries as i32),
        RestartPolicy::Always => (pb::RestartPolicyKind::Always, 0),
        RestartPolicy::UnlessStopped => (pb::RestartPolicyKind::UnlessStopped, 0),
    };
    pb::RestartPolicy { kind: kind as i32, max_retries }
}

fn rollout(view: &DeploymentView) -> pb::Rollout {
    let generation = view.deployment.generation;
    let updated = view.replicas.iter().filter(|r| r.generation >= generation).count() as i32;
    let (state, message) = match view.rollout() {
        Rollout::Complete => (pb::RolloutState::Complete, String::new()),
        Rollout::InProgress { .. } => (pb::RolloutState::InProgress, String::new()),
        Rollout::RolledBack { message } => (pb::RolloutState::RolledBack, message),
    };
    pb::Rollout { generation, state: state as i32, message, updated_replicas: updated }
}

/// The deployment as clients see it: secret values masked.
/// Environment variables as the API shows them: secrets masked.
pub fn env_out(vars: &[EnvVar]) -> Vec<pb::EnvVar> {
    vars.iter()
        .map(|v| pb::EnvVar { name: v.name.clone(), value: v.display_value().to_owned(), secret: v.secret })
        .collect()
}

pub fn deployment(view: &DeploymentView) -> pb::Deployment {
    let d = &view.deployment;
    let (status, message) = view.status();
    pb::Deployment {
        id: d.id.to_string(),
        organization_id: d.organization_id.to_string(),
        project_id: d.project_id.to_string(),
        name: d.spec.name.clone(),
        image: d.spec.image.to_string(),
        port: u32::from(d.spec.port),
        env: env_out(&d.spec.env),
        domain: d.spec.domain.as_ref().map(ToString::to_string).unwrap_or_default(),
        path_prefix: d.spec.path_prefix.to_string(),
        limits: Some(pb::ResourceLimits {
            memory_bytes: d.spec.limits.memory_bytes,
            cpu_millis: d.spec.limits.cpu_millis,
        }),
        replica_count: d.spec.replicas,
        status: deployment_status(status) as i32,
        status_message: message.unwrap_or_default(),
        replicas: view.replicas.iter().map(|r| replica(r, &view.deployment)).collect(),
        generation: d.generation,
        created_at: Some(timestamp(d.created_at)),
        updated_at: Some(timestamp(d.updated_at)),
        health_check: Some(health_check_out(&d.spec.health_check)),
        restart_policy: Some(restart_policy_out(d.spec.restart_policy)),
        network_mode: match d.spec.network_mode {
            NetworkMode::Shared => pb::NetworkMode::Shared,
            NetworkMode::Isolated => pb::NetworkMode::Isolated,
        } as i32,
        rollout: Some(rollout(view)),
        placement: Some(pb::Placement {
            strategy: d.spec.placement.strategy.map(|s| s.as_str().to_owned()).unwrap_or_default(),
            constraints: d.spec.placement.constraints.as_map().clone().into_iter().collect(),
            node_loss: d.spec.placement.node_loss.as_str().to_owned(),
        }),
        placement_message: d.placement_message.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_create_takes_the_replica_count_by_either_name() {
        let count = |replicas, replica_count| {
            spec_input(pb::CreateDeploymentRequest { replicas, replica_count, ..Default::default() })
                .map(|input| input.replicas)
        };
        assert_eq!(count(Some(2), None).unwrap(), Some(2));
        assert_eq!(count(None, Some(3)).unwrap(), Some(3), "as a Deployment spells it");
        assert_eq!(count(Some(3), Some(3)).unwrap(), Some(3));
        assert_eq!(count(None, None).unwrap(), None);
        assert_eq!(count(Some(2), Some(3)).unwrap_err().field, "replica_count");
    }

    #[test]
    fn protocol_health_checks_fill_defaults_and_refuse_negatives() {
        let check = health_check("health_check", &pb::HealthCheck::default()).unwrap();
        assert_eq!(check, HealthCheck::default());
        let negative = pb::HealthCheck { interval_ms: -1, ..Default::default() };
        assert_eq!(health_check("health_check", &negative).unwrap_err().field, "health_check.interval_ms");
        let bad_kind = pb::HealthCheck { kind: 42, ..Default::default() };
        assert_eq!(health_check("health_check", &bad_kind).unwrap_err().field, "health_check.kind");
        let bad_port = pb::HealthCheck { port: 70000, ..Default::default() };
        assert_eq!(health_check("health_check", &bad_port).unwrap_err().field, "health_check.port");
        // What goes out comes back in unchanged.
        let mut http = HealthCheck::of(HealthCheckKind::Http);
        http.path = "/healthz".into();
        assert_eq!(health_check("h", &health_check_out(&http)).unwrap(), http);
    }

    #[test]
    fn restart_policies_and_networks() {
        let policy = pb::RestartPolicy { kind: pb::RestartPolicyKind::OnFailure as i32, max_retries: 3 };
        assert_eq!(restart_policy("r", &policy).unwrap(), RestartPolicy::OnFailure { max_retries: 3 });
        assert_eq!(restart_policy("r", &restart_policy_out(RestartPolicy::Always)).unwrap(), RestartPolicy::Always);
        assert!(restart_policy("r", &pb::RestartPolicy { kind: 99, max_retries: 0 }).is_err());
        assert_eq!(network_mode("n", 0).unwrap(), None);
        assert_eq!(network_mode("n", 2).unwrap(), Some(NetworkMode::Isolated));
        assert_eq!(network_mode("n", 7).unwrap_err().field, "n");
    }
}
