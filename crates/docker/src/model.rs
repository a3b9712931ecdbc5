//! What the Docker layer hands to and gets from its callers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use flotilla_types::{DeploymentId, ReplicaId, RestartPolicy, labels};

/// Where to reach the engine: a Unix socket path, or the default
/// (`$DOCKER_HOST` or `/var/run/docker.sock`).
#[derive(Debug, Clone, Default)]
pub struct DockerConfig {
    pub socket: Option<String>,
    /// Per-request timeout.
    pub timeout: Option<Duration>,
}

/// Facts about the engine and its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    pub hostname: String,
    pub server_version: String,
    pub cpus: i64,
    pub memory_bytes: i64,
    /// Set when the engine is part of a swarm.
    pub swarm_node_id: Option<String>,
    pub swarm_manager: bool,
    /// The node's address in the swarm, when it is in one.
    pub swarm_address: Option<String>,
    pub cgroup_version: String,
}

/// The run state of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Created,
    Running,
    Paused,
    Restarting,
    Exited,
    Removing,
    Dead,
    Unknown,
}

impl RunState {
    pub fn is_running(self) -> bool {
        matches!(self, Self::Running)
    }

    pub(crate) fn from_name(name: &str) -> Self {
        match name {
            "created" => Self::Created,
            "running" => Self::Running,
            "paused" => Self::Paused,
            "restarting" => Self::Restarting,
            "exited" => Self::Exited,
            "removing" => Self::Removing,
            "dead" => Self::Dead,
            _ => Self::Unknown,
        }
    }
}

/// One managed container as listed by the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedContainer {
    pub id: String,
    pub name: String,
    pub state: RunState,
    pub labels: HashMap<String, String>,
    /// Host ports the container publishes.
    pub host_ports: Vec<u16>,
    /// The container's address on its network, if it has one.
    pub ip_address: Option<IpAddr>,
    /// Docker's own health state for containers with a HEALTHCHECK:
    /// `starting`, `healthy` or `unhealthy`.
    pub docker_health: Option<String>,
    /// The exit code of a container that exited.
    pub exit_code: Option<i64>,
}

impl ManagedContainer {
    /// The replica this container runs, from its label.
    pub fn replica_id(&self) -> Option<ReplicaId> {
        self.labels.get(labels::REPLICA_ID)?.parse().ok()
    }

    /// The deployment and replica index it was made for, from its labels.
    pub fn replica_slot(&self) -> Option<(DeploymentId, i32)> {
        let deployment = self.labels.get(labels::DEPLOYMENT_ID)?.parse().ok()?;
        Some((deployment, self.labels.get(labels::REPLICA_INDEX)?.parse().ok()?))
    }

    /// The generation of the spec it was made from, from its label.
    pub fn generation(&self) -> Option<i64> {
        self.labels.get(labels::GENERATION)?.parse().ok()
    }
}

/// A container's state as inspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerStatus {
    pub state: RunState,
    pub exit_code: Option<i64>,
    /// `starting`, `healthy` or `unhealthy` for containers with a HEALTHCHECK.
    pub docker_health: Option<String>,
    pub ip_address: Option<IpAddr>,
}

/// Docker's HEALTHCHECK for a command check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandHealthcheck {
    pub command: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
}

/// Everything needed to create one app container. Its `Debug` shows only the
/// names of environment variables: their values may be secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// `NAME=value` entries; may hold secrets, so this type is never logged whole.
    pub env: Vec<String>,
    pub labels: HashMap<String, String>,
    pub container_port: u16,
    /// Address the host port is bound on (`0.0.0.0` for the edge proxy on
    /// other nodes, `127.0.0.1` for single-machine setups).
    pub host_ip: String,
    pub host_port: u16,
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub restart_policy: RestartPolicy,
    /// A command health check Docker runs inside the container.
    pub healthcheck: Option<CommandHealthcheck>,
    /// The network to join instead of the default bridge.
    pub network: Option<String>,
    /// SIGTERM-to-SIGKILL grace Docker uses when stopping it.
    pub stop_grace: Duration,
}

impl std::fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env_names: Vec<&str> = self.env.iter().map(|e| e.split('=').next().unwrap_or_default()).collect();
        f.debug_struct("ContainerSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("env_names", &env_names)
            .field("labels", &self.labels)
            .field("container_port", &self.container_port)
            .field("host_ip", &self.host_ip)
            .field("host_port", &self.host_port)
            .field("memory_bytes", &self.memory_bytes)
            .field("nano_cpus", &self.nano_cpus)
            .field("restart_policy", &self.restart_policy)
            .field("healthcheck", &self.healthcheck)
            .field("network", &self.network)
            .field("stop_grace", &self.stop_grace)
            .finish()
    }
}

/// Docker's health state from a container list entry's status text,
/// e.g. `Up 5 seconds (healthy)`.
pub(crate) fn health_from_status(status: &str) -> Option<String> {
    let inner = status.rsplit_once('(')?.1.strip_suffix(')')?;
    match inner {
        "healthy" | "unhealthy" => Some(inner.to_owned()),
        "health: starting" => Some("starting".to_owned()),
        _ => None,
    }
}

/// The exit code in a container list entry's status text,
/// e.g. `Exited (137) 5 seconds ago`.
pub(crate) fn exit_code_from_status(status: &str) -> Option<i64> {
    let rest = status.strip_prefix("Exited (")?;
    rest.split_once(')')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_spec_debug_hides_env_values() {
        let spec = ContainerSpec {
            name: "n".into(),
            image: "i".into(),
            env: vec!["TOKEN=hunter2".into()],
            labels: HashMap::new(),
            container_port: 80,
            host_ip: "127.0.0.1".into(),
            host_port: 20000,
            memory_bytes: 0,
            nano_cpus: 0,
            restart_policy: RestartPolicy::default(),
            healthcheck: None,
            network: None,
            stop_grace: Duration::from_secs(10),
        };
        let shown = format!("{spec:?}");
        assert!(shown.contains("TOKEN") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn health_is_read_from_status_text() {
        assert_eq!(health_from_status("Up 5 seconds (healthy)").as_deref(), Some("healthy"));
        assert_eq!(health_from_status("Up 1 second (health: starting)").as_deref(), Some("starting"));
        assert_eq!(health_from_status("Up 2 minutes (unhealthy)").as_deref(), Some("unhealthy"));
        assert_eq!(health_from_status("Up 2 minutes"), None);
        assert_eq!(health_from_status("Exited (0) 3 seconds ago"), None);
        assert_eq!(exit_code_from_status("Exited (137) 3 seconds ago"), Some(137));
        assert_eq!(exit_code_from_status("Up 3 seconds"), None);
    }
}
