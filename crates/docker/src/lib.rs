//! The Docker Engine operations Flotilla needs, over bollard and the Engine
//! API only (never the `docker` CLI). The client negotiates the API version,
//! so it works with older engines (20.10 speaks API 1.41).

mod error;
mod model;
mod stats;
mod streams;

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, HealthConfig, HostConfig, NetworkConnectRequest,
    NetworkCreateRequest, NetworkDisconnectRequest, PortBinding, RestartPolicy as DockerRestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    RemoveContainerOptionsBuilder, RestartContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use flotilla_types::{NodeId, RestartPolicy, labels};
use futures::StreamExt;

pub use error::DockerError;
pub use model::{
    CommandHealthcheck, ContainerSpec, ContainerStatus, DockerConfig, EngineInfo, ManagedContainer, RunState,
};
pub use stats::{ContainerRuntime, StatsReading, counters as stats_counters};
pub use streams::{ContainerEvent, EventStream, LogLine, LogOptions, LogSource, LogStream};

use model::{exit_code_from_status, health_from_status};

/// The container id in the source of the `/etc/hostname` mount of a
/// `/proc/self/mountinfo` (`.../containers/<64 hex>/hostname`).
fn container_id_from_mountinfo(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        if mount_point != "/etc/hostname" {
            return None;
        }
        let id = root.strip_suffix("/hostname")?.rsplit('/').next()?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
    })
}

/// A cheap-to-clone handle on the Docker Engine.
#[derive(Debug, Clone)]
pub struct DockerClient {
    docker: Docker,
    /// Serializes network creation from this process.
    network_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl DockerClient {
    /// Connects and negotiates the API version with the engine.
    pub async fn connect(config: &DockerConfig) -> Result<Self, DockerError> {
        let op = "connecting to the Docker Engine";
        let timeout = config.timeout.unwrap_or(Duration::from_secs(120)).as_secs();
        let docker = match &config.socket {
            Some(path) => Docker::connect_with_unix(path, timeout, bollard::API_DEFAULT_VERSION),
            None => Docker::connect_with_socket_defaults(),
        }
        .map_err(DockerError::from_bollard(op, ""))?;
        let docker = docker.negotiate_version().await.map_err(DockerError::from_bollard(op, ""))?;
        Ok(Self::from_bollard(docker))
    }

    pub fn from_bollard(docker: Docker) -> Self {
        Self { docker, network_lock: Default::default() }
    }

    pub fn bollard(&self) -> &Docker {
        &self.docker
    }

    pub async fn ping(&self) -> Result<(), DockerError> {
        self.docker.ping().await.map_err(DockerError::from_bollard("ping", ""))?;
        Ok(())
    }

    pub async fn info(&self) -> Result<EngineInfo, DockerError> {
        let info = self.docker.info().await.map_err(DockerError::from_bollard("reading engine info", ""))?;
        let swarm = info.swarm.as_ref();
        let swarm_node_id = swarm.and_then(|s| s.node_id.clone()).filter(|id| {
            !id.is_empty() && swarm.and_then(|s| s.local_node_state.as_ref()).is_some_and(|s| s.to_string() == "active")
        });
        let swarm_address = swarm_node_id.as_ref().and_then(|_| swarm.and_then(|s| s.node_addr.clone()));
        Ok(EngineInfo {
            hostname: info.name.unwrap_or_default(),
            server_version: info.server_version.unwrap_or_default(),
            cpus: info.ncpu.unwrap_or(0),
            memory_bytes: info.mem_total.unwrap_or(0),
            swarm_manager: swarm_node_id.is_some() && swarm.and_then(|s| s.control_available).unwrap_or(false),
            swarm_node_id,
            swarm_address,
            cgroup_version: info.cgroup_version.map(|v| v.to_string()).unwrap_or_default(),
        })
    }

    /// The containers Flotilla manages for `node`, running or not.
    pub async fn list_managed(&self, node: &NodeId) -> Result<Vec<ManagedContainer>, DockerError> {
        let filters = HashMap::from([("label", labels::node_filter(node.as_str()).to_vec())]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let summaries = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(DockerError::from_bollard("listing containers", ""))?;
        Ok(summaries
            .into_iter()
            .filter_map(|c| {
                Some(ManagedContainer {
                    id: c.id?,
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_owned())
                        .unwrap_or_default(),
                    state: c.state.map_or(RunState::Unknown, run_state),
                    labels: c.labels.unwrap_or_default(),
                    host_ports: c.ports.unwrap_or_default().into_iter().filter_map(|p| p.public_port).collect(),
                    ip_address: c
                        .network_settings
                        .and_then(|n| n.networks)
                        .and_then(|networks| {
                            let mut addresses: Vec<(String, String)> = networks
                                .into_iter()
                                .filter_map(|(name, endpoint)| endpoint.ip_address.map(|ip| (name, ip)))
                                .filter(|(_, ip)| !ip.is_empty())
                                .collect();
                            addresses.sort();
                            addresses.into_iter().next()
                        })
                        .and_then(|(_, ip)| ip.parse().ok()),
                    docker_health: c.status.as_deref().and_then(health_from_status),
                    exit_code: c.status.as_deref().and_then(exit_code_from_status),
                })
            })
            .collect())
    }

    pub async fn image_exists(&self, image: &str) -> Result<bool, DockerError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) => match DockerError::from_bollard("inspecting an image", image)(e) {
                DockerError::NotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Pulls `image`, giving up after `timeout`.
    pub async fn pull_image(&self, image: &str, timeout: Duration) -> Result<(), DockerError> {
        let options = CreateImageOptionsBuilder::default().from_image(image).build();
        let pull = async {
            let mut progress = self.docker.create_image(Some(options), None, None);
            while let Some(step) = progress.next().await {
                step.map_err(DockerError::from_bollard("pulling an image", image))?;
            }
            Ok(())
        };
        tokio::time::timeout(timeout, pull).await.map_err(|_| DockerError::Timeout {
            operation: "pulling an image",
            subject: image.to_owned(),
            after: timeout,
        })?
    }

    /// Creates a container and returns its id.
    pub async fn create_container(&self, spec: &ContainerSpec) -> Result<String, DockerError> {
        let port_key = format!("{}/tcp", spec.container_port);
        let host_config = HostConfig {
            port_bindings: Some(HashMap::from([(
                port_key.clone(),
                Some(vec![PortBinding {
                    host_ip: Some(spec.host_ip.clone()),
                    host_port: Some(spec.host_port.to_string()),
                }]),
            )])),
            // Docker's init as PID 1 forwards SIGTERM to the app, so a graceful
            // stop works for apps that never installed a signal handler.
            init: Some(true),
            memory: (spec.memory_bytes > 0).then_some(spec.memory_bytes),
            nano_cpus: (spec.nano_cpus > 0).then_some(spec.nano_cpus),
            // The agent restarts and recreates by itself; Docker's own policy
            // covers the time the agent is down.
            restart_policy: Some(docker_restart_policy(spec.restart_policy)),
            network_mode: spec.network.clone(),
            ..Default::default()
        };
        let healthcheck = spec.healthcheck.as_ref().map(|check| HealthConfig {
            test: Some(std::iter::once("CMD".to_owned()).chain(check.command.iter().cloned()).collect()),
            interval: Some(nanos(check.interval)),
            timeout: Some(nanos(check.timeout)),
            retries: Some(i64::from(check.retries)),
            start_period: None,
            start_interval: None,
        });
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone()),
            exposed_ports: Some(vec![port_key]),
            host_config: Some(host_config),
            healthcheck,
            stop_timeout: Some(spec.stop_grace.as_secs() as i64),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&spec.name).build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(DockerError::from_bollard("creating a container", &spec.name))?;
        Ok(created.id)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), DockerError> {
        self.docker.start_container(id, None).await.map_err(DockerError::from_bollard("starting a container", id))
    }

    /// Restarts a container: SIGTERM, SIGKILL after `grace`, start.
    pub async fn restart_container(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        let options = RestartContainerOptionsBuilder::default().t(grace.as_secs() as i32).build();
        self.docker
            .restart_container(id, Some(options))
            .await
            .map_err(DockerError::from_bollard("restarting a container", id))
    }

    /// Makes sure one bridge network called `name` exists and returns its
    /// id. Docker 20.10 lets concurrent creates make two networks of one
    /// name: creates from this client are serialized, and between processes
    /// every caller settles on the oldest network (a duplicate made later is
    /// newer) and removes the others it can. A caller left holding a removed
    /// duplicate gets "not found" on its next use and asks again.
    pub async fn ensure_network(&self, name: &str, labels: &HashMap<String, String>) -> Result<String, DockerError> {
        let _one_at_a_time = self.network_lock.lock().await;
        let mut networks = self.networks_named(name).await?;
        if networks.is_empty() {
            let request = NetworkCreateRequest {
                name: name.to_owned(),
                driver: Some("bridge".to_owned()),
                labels: Some(labels.clone()),
                ..Default::default()
            };
            if let Err(e) = self.docker.create_network(request).await {
                match DockerError::from_bollard("creating a network", name)(e) {
                    DockerError::Conflict { .. } => {}
                    DockerError::Engine { ref message, .. } if message.contains("already exists") => {}
                    other => return Err(other),
                }
            }
            networks = self.networks_named(name).await?;
        }
        // Oldest first; the id breaks ties.
        networks.sort();
        let Some((_, keep)) = networks.first().cloned() else {
            return Err(DockerError::NotFound {
                operation: "creating a network",
                subject: name.to_owned(),
                message: "network vanished right after it was created".to_owned(),
            });
        };
        for (_, duplicate) in &networks[1..] {
            // In use (a container joined it already): left for later.
            let _ = self.docker.remove_network(duplicate).await;
        }
        Ok(keep)
    }

    /// (creation time, id) of the networks named exactly `name`.
    async fn networks_named(&self, name: &str) -> Result<Vec<(String, String)>, DockerError> {
        let filters = HashMap::from([("name", vec![name.to_owned()])]);
        let options = ListNetworksOptionsBuilder::default().filters(&filters).build();
        let networks = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(DockerError::from_bollard("listing networks", name))?;
        // The name filter matches substrings.
        Ok(networks
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name))
            .filter_map(|n| Some((n.created.unwrap_or_default(), n.id?)))
            .collect())
    }

    /// Names of the networks carrying all of `label_filters` (`key=value`).
    pub async fn networks_labelled(&self, label_filters: &[String]) -> Result<Vec<String>, DockerError> {
        let filters = HashMap::from([("label", label_filters.to_vec())]);
        let options = ListNetworksOptionsBuilder::default().filters(&filters).build();
        let networks = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(DockerError::from_bollard("listing networks", ""))?;
        Ok(networks.into_iter().filter_map(|n| n.name).collect())
    }

    /// Connects `container` to `network`; one connected already stays so.
    pub async fn connect_to_network(&self, network: &str, container: &str) -> Result<(), DockerError> {
        let request = NetworkConnectRequest { container: container.to_owned(), ..Default::default() };
        match self.docker.connect_network(network, request).await {
            Ok(()) => Ok(()),
            Err(e) => match DockerError::from_bollard("joining a network", network)(e) {
                DockerError::Engine { ref message, .. } if message.contains("already exists") => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Disconnects `container` from `network`; one not connected (or a
    /// network gone) is fine.
    pub async fn disconnect_from_network(&self, network: &str, container: &str) -> Result<(), DockerError> {
        let request = NetworkDisconnectRequest { container: container.to_owned(), force: Some(true) };
        match self.docker.disconnect_network(network, request).await {
            Ok(()) => Ok(()),
            Err(e) => match DockerError::from_bollard("leaving a network", network)(e) {
                DockerError::NotFound { .. } => Ok(()),
                DockerError::Engine { ref message, .. } if message.contains("is not connected") => Ok(()),
                other => Err(other),
            },
        }
    }

    /// The container of this engine that this process runs in, or `None`
    /// when it does not run in one (Docker bind-mounts each container's own
    /// `/etc/hostname` from a directory named after the container's id).
    pub async fn own_container(&self) -> Option<String> {
        let mountinfo = tokio::fs::read_to_string("/proc/self/mountinfo").await.ok()?;
        let id = container_id_from_mountinfo(&mountinfo)?;
        // A container of another engine (Docker in Docker) is not ours to manage.
        self.docker.inspect_container(&id, None).await.ok()?;
        Some(id)
    }

    /// Removes a network; one that is gone or still in use is left alone
    /// (`Ok(false)`).
    pub async fn remove_network(&self, name: &str) -> Result<bool, DockerError> {
        match self.docker.remove_network(name).await {
            Ok(()) => Ok(true),
            Err(e) => match DockerError::from_bollard("removing a network", name)(e) {
                DockerError::NotFound { .. } | DockerError::Conflict { .. } => Ok(false),
                DockerError::Engine { ref message, .. } if message.contains("active endpoints") => Ok(false),
                other => Err(other),
            },
        }
    }

    /// The Swarm labels of node `node_id`; only managers can read them.
    pub async fn swarm_node_labels(&self, node_id: &str) -> Result<HashMap<String, String>, DockerError> {
        let node = self
            .docker
            .inspect_node(node_id)
            .await
            .map_err(DockerError::from_bollard("inspecting a swarm node", node_id))?;
        Ok(node.spec.and_then(|s| s.labels).unwrap_or_default())
    }

    /// A container's state, address and health, or `None` when it does not exist.
    pub async fn status(&self, id: &str) -> Result<Option<ContainerStatus>, DockerError> {
        match self.docker.inspect_container(id, None).await {
            Ok(inspect) => {
                let state = inspect.state.unwrap_or_default();
                let ip_address = inspect
                    .network_settings
                    .and_then(|n| n.networks)
                    .and_then(|networks| {
                        let mut addresses: Vec<(String, String)> = networks
                            .into_iter()
                            .filter_map(|(name, endpoint)| endpoint.ip_address.map(|ip| (name, ip)))
                            .filter(|(_, ip)| !ip.is_empty())
                            .collect();
                        addresses.sort();
                        addresses.into_iter().next()
                    })
                    .and_then(|(_, ip)| ip.parse().ok());
                Ok(Some(ContainerStatus {
                    state: state.status.map_or(RunState::Unknown, |s| RunState::from_name(s.as_ref())),
                    exit_code: state.exit_code,
                    docker_health: state.health.and_then(|h| h.status).map(|s| s.to_string()),
                    ip_address,
                }))
            }
            Err(e) => match DockerError::from_bollard("inspecting a container", id)(e) {
                DockerError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    /// The container's run state, or `None` when it does not exist.
    pub async fn run_state(&self, id: &str) -> Result<Option<RunState>, DockerError> {
        match self.docker.inspect_container(id, None).await {
            Ok(inspect) => Ok(Some(
                inspect.state.and_then(|s| s.status).map_or(RunState::Unknown, |s| RunState::from_name(s.as_ref())),
            )),
            Err(e) => match DockerError::from_bollard("inspecting a container", id)(e) {
                DockerError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Stops gracefully (SIGTERM, then SIGKILL after `grace`). A container
    /// that is already stopped or gone is fine.
    pub async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        let options = StopContainerOptionsBuilder::default().t(grace.as_secs() as i32).build();
        match self.docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) => match DockerError::from_bollard("stopping a container", id)(e) {
                DockerError::NotFound { .. } | DockerError::NotModified { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Removes a container (forcing it if it still runs). Gone already is fine.
    pub async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) => match DockerError::from_bollard("removing a container", id)(e) {
                DockerError::NotFound { .. } => Ok(()),
                // Removal already in progress.
                DockerError::Conflict { ref message, .. } if message.contains("already in progress") => Ok(()),
                other => Err(other),
            },
        }
    }
}

fn run_state(state: ContainerSummaryStateEnum) -> RunState {
    RunState::from_name(state.as_ref())
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn docker_restart_policy(policy: RestartPolicy) -> DockerRestartPolicy {
    let (name, maximum_retry_count) = match policy {
        RestartPolicy::No => (RestartPolicyNameEnum::NO, None),
        RestartPolicy::OnFailure { max_retries } => {
            (RestartPolicyNameEnum::ON_FAILURE, (max_retries > 0).then_some(i64::from(max_retries)))
        }
        RestartPolicy::Always => (RestartPolicyNameEnum::ALWAYS, None),
        RestartPolicy::UnlessStopped => (RestartPolicyNameEnum::UNLESS_STOPPED, None),
    };
    DockerRestartPolicy { name: Some(name), maximum_retry_count }
}

#[cfg(test)]
mod tests {
    use super::container_id_from_mountinfo;

    const ID: &str = "c885a98f12e0294b96e6fc3f9922ec7c2c1defc6c4a6d79247c05ab8d1cf78e4";

    #[test]
    fn a_container_is_known_by_its_hostname_mount() {
        // Lines as a container on this engine sees them.
        let mountinfo = format!(
            "147 120 0:52 / / rw,relatime - fuse.fuse-overlayfs fuse-overlayfs rw\n\
             164 147 254:0 /var/lib/docker/containers/{ID}/resolv.conf /etc/resolv.conf rw,relatime - ext4 /dev/vda rw\n\
             165 147 254:0 /var/lib/docker/containers/{ID}/hostname /etc/hostname rw,relatime - ext4 /dev/vda rw\n"
        );
        assert_eq!(container_id_from_mountinfo(&mountinfo).as_deref(), Some(ID));
    }

    #[test]
    fn outside_a_container_there_is_none() {
        let host = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    25 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw\n";
        assert_eq!(container_id_from_mountinfo(host), None);
        // Something else mounted on /etc/hostname, or a short name, is not an id.
        let other = "165 147 254:0 /srv/containers/abc/hostname /etc/hostname rw - ext4 /dev/vda rw\n";
        assert_eq!(container_id_from_mountinfo(other), None);
    }
}
