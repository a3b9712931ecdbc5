//! The long operations on a replica, run beside the passes so a pass never
//! waits for a container to become healthy or for the edge:
//! - **create**: a container for a replica that has none;
//! - **rollout**: start-first replacement by a container of the current
//!   generation. The new container must become healthy before the row (and
//!   with it every route) switches to it; the old one stops once every edge
//!   proxy serves the switch. A new container that never becomes
//!   healthy is removed, the old one keeps running, and the row says why;
//! - **retire**: stopping (or removing) a container that served, once every
//!   edge proxy serves a route table without it.
//!
//! Creates and rollouts start at most `max_parallel_starts` containers at a
//! time; retirements are not limited (they only wait and stop).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;
use flotilla_docker::{CommandHealthcheck, ContainerSpec, DockerError, ManagedContainer, RunState};
use flotilla_store::Assignment;
use flotilla_store::replicas::ReplicaObservation;
use flotilla_types::status::Health;
use flotilla_types::{HealthCheckKind, NetworkMode, ReplicaId, ReplicaState, labels};
use tracing::Instrument;

use crate::plan::RemoveReason;
use crate::{Agent, AgentError, probe};

/// How often a starting container is probed.
const STARTUP_PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// Why a new container is not healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unready {
    /// It exited (or vanished) while starting.
    Exited(String),
    /// It runs, but its check did not pass in time.
    Unhealthy(String),
}

impl std::fmt::Display for Unready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(why) | Self::Unhealthy(why) => f.write_str(why),
        }
    }
}

/// What a retirement does once the edge no longer sends the container requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retire {
    /// Stop it and keep it (the deployment is stopped).
    Stop,
    /// Remove it and its replica row.
    Remove { reason: RemoveReason },
}

/// A container started for a replica.
struct Launched {
    container_id: String,
    name: String,
    port: u16,
}

impl Agent {
    pub(crate) fn spawn_create(self: &Arc<Self>, assignment: Assignment, in_use: HashSet<u16>) {
        let replica = assignment.replica.id;
        self.spawn_operation(
            replica,
            "create",
            true,
            move |agent| async move { agent.create(&assignment, &in_use).await },
        );
    }

    pub(crate) fn spawn_rollout(self: &Arc<Self>, assignment: Assignment, old: ManagedContainer, in_use: HashSet<u16>) {
        let replica = assignment.replica.id;
        self.spawn_operation(replica, "rollout", true, move |agent| async move {
            agent.rollout(&assignment, &old, &in_use).await
        });
    }

    pub(crate) fn spawn_retire(self: &Arc<Self>, assignment: Assignment, container: ManagedContainer, how: Retire) {
        let replica = assignment.replica.id;
        self.spawn_operation(replica, "retire", false, move |agent| async move {
            agent.retire(&assignment, &container, how).await
        });
    }

    /// Runs `operation` for `replica` unless one is under way already; when
    /// it ends, a pass looks at the result. `starts` operations wait for one
    /// of the `max_parallel_starts` permits.
    fn spawn_operation<F, Fut>(self: &Arc<Self>, replica: ReplicaId, kind: &'static str, starts: bool, operation: F)
    where
        F: FnOnce(Arc<Agent>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        if !self.busy.lock().unwrap_or_else(|e| e.into_inner()).insert(replica) {
            return;
        }
        let agent = self.clone();
        let span = tracing::info_span!("operation", kind, replica.id = %replica);
        self.operations.spawn(
            async move {
                let cancel = agent.operations_cancel.clone();
                let result = tokio::select! {
                    () = cancel.cancelled() => None,
                    result = async {
                        let _permit = match starts {
                            true => agent.start_permits.acquire().await.ok(),
                            false => None,
                        };
                        operation(agent.clone()).await
                    } => Some(result),
                };
                agent.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&replica);
                match result {
                    Some(Err(error)) => tracing::warn!(%error, "operation failed; the next pass retries"),
                    None => tracing::info!("operation stopped by shutdown"),
                    Some(Ok(())) => {}
                }
                agent.reconcile_wake.notify_one();
            }
            .instrument(span),
        );
    }

    /// Creates and starts a container for a replica that has none, records
    /// it, then waits for it to become healthy and records that too.
    async fn create(&self, assignment: &Assignment, in_use: &HashSet<u16>) -> Result<(), AgentError> {
        let replica = &assignment.replica;
        let launched = match self.launch(assignment, in_use).await? {
            Ok(launched) => launched,
            Err(message) => return self.record_failure(replica.id, message).await,
        };
        self.stats.containers_created.fetch_add(1, Ordering::Relaxed);
        let check = assignment.deployment.spec.health_check.kind;
        let starting = if check == HealthCheckKind::None { Health::None } else { Health::Starting };
        let running = observation(ReplicaState::Running, starting, &launched, assignment);
        if !self.store.record_replica(&self.node_id, &running).await? {
            // The replica went away meanwhile; the next pass removes the orphan.
            return Ok(());
        }
        tracing::info!(container.id = %launched.container_id, port = launched.port, "replica running");
        match self.wait_healthy(assignment, &launched.container_id).await? {
            Ok(health) => {
                self.store.record_health(&self.node_id, replica.id, Some(&launched.container_id), health, None).await?;
            }
            // Its exit is the pass's to record (code, count, crash loop),
            // from the container's `die` event.
            Err(Unready::Exited(why)) => tracing::warn!(%why, "new replica exited while starting"),
            Err(Unready::Unhealthy(why)) => {
                tracing::warn!(%why, "new replica did not become healthy");
                let seen = ReplicaObservation {
                    message: Some(format!("not healthy: {why}")),
                    ..observation(ReplicaState::Running, Health::Unhealthy, &launched, assignment)
                };
                self.store.record_replica(&self.node_id, &seen).await?;
            }
        }
        Ok(())
    }

    /// Replaces `old` with a container of the current generation, start-first.
    async fn rollout(
        &self,
        assignment: &Assignment,
        old: &ManagedContainer,
        in_use: &HashSet<u16>,
    ) -> Result<(), AgentError> {
        let target = assignment.deployment.generation;
        tracing::info!(from = old.generation(), to = target, "rolling out a new generation");
        let launched = match self.launch(assignment, in_use).await? {
            Ok(launched) => launched,
            Err(message) => return self.roll_back(assignment, None, message).await,
        };
        self.stats.containers_created.fetch_add(1, Ordering::Relaxed);
        let health = match self.wait_healthy(assignment, &launched.container_id).await? {
            Ok(health) => health,
            Err(why) => return self.roll_back(assignment, Some(&launched), why.to_string()).await,
        };
        // The switch: from here the API and the route table name the new container.
        let seen = observation(ReplicaState::Running, health, &launched, assignment);
        if !self.store.record_replica(&self.node_id, &seen).await? {
            self.remove(&launched.container_id, RemoveReason::Orphaned).await?;
            return Ok(());
        }
        self.stats.rollouts.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            container.id = %launched.container_id,
            port = launched.port,
            "traffic moves to the new container; the old one stops once the edge has taken that in"
        );
        let edge = self.edge.unrouted().await?;
        tracing::info!(?edge, container.id = %old.id, "the edge sends the old container nothing more");
        self.remove(&old.id, RemoveReason::Duplicate).await?;
        Ok(())
    }

    /// Stops (`Retire::Stop`) or removes a container that served, once every
    /// edge proxy holds a route table without it.
    async fn retire(
        &self,
        assignment: &Assignment,
        container: &ManagedContainer,
        how: Retire,
    ) -> Result<(), AgentError> {
        let edge = self.edge.unrouted().await?;
        tracing::info!(?edge, container.id = %container.id, ?how, "the edge sends the container nothing more");
        match how {
            Retire::Stop => {
                self.stopping(&container.id);
                self.docker.stop_container(&container.id, self.config.stop_grace).await?;
                self.stats.containers_stopped.fetch_add(1, Ordering::Relaxed);
                let stopped = ManagedContainer { state: RunState::Exited, ..container.clone() };
                self.record(assignment, &stopped, ReplicaState::Stopped, Some("stopped on request".to_owned()), false)
                    .await?;
            }
            Retire::Remove { reason } => {
                self.remove(&container.id, reason).await?;
                if self.store.delete_replica(&self.node_id, assignment.replica.id).await? {
                    // A deleted deployment may now be final.
                    self.wake.wake(flotilla_redis::ORCHESTRATOR_TOPIC).await;
                }
                if assignment.deployment.spec.network_mode == NetworkMode::Isolated {
                    let remaining = self.store.node_assignments(&self.node_id).await?;
                    self.remove_unused_networks(&remaining).await;
                }
            }
        }
        Ok(())
    }

    /// Gives up a rollout: removes the new container (if any), keeps the old
    /// one, and records why on the replica.
    async fn roll_back(
        &self,
        assignment: &Assignment,
        launched: Option<&Launched>,
        why: String,
    ) -> Result<(), AgentError> {
        if let Some(launched) = launched {
            self.remove(&launched.container_id, RemoveReason::Duplicate).await?;
        }
        let target = assignment.deployment.generation;
        let message =
            format!("update to generation {target} rolled back on replica {}: {why}", assignment.replica.replica_index);
        self.stats.rollbacks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%message, "rollout rolled back");
        self.store.record_rollout_failure(&self.node_id, assignment.replica.id, target, &message).await?;
        Ok(())
    }

    /// Creates and starts a container for `assignment` on a free host port.
    /// The outer error is the engine or database failing; the inner one, a
    /// reason this replica cannot run (shown to the user).
    async fn launch(
        &self,
        assignment: &Assignment,
        in_use: &HashSet<u16>,
    ) -> Result<Result<Launched, String>, AgentError> {
        let network = self.network_for(assignment);
        let isolated = assignment.deployment.spec.network_mode == NetworkMode::Isolated;
        let mut network_id = self.ensure_network(&network, isolated.then_some(assignment.deployment.id)).await?;

        let mut refused: HashSet<u16> = in_use.clone();
        let mut pulled = false;
        for _attempt in 0..5 {
            let Some(port) = self.ports.allocate(&refused) else {
                let (start, end) = (*self.config.port_range.start(), *self.config.port_range.end());
                return Ok(Err(AgentError::NoFreePort { start, end }.to_string()));
            };
            let spec = self.container_spec(assignment, port, &network_id);
            let result = self.create_and_start(&spec).await;
            self.ports.release(port);
            match result {
                Ok(container_id) => return Ok(Ok(Launched { container_id, name: spec.name, port })),
                Err(DockerError::PortInUse { .. }) => {
                    tracing::debug!(port, "host port taken by someone else; trying another");
                    refused.insert(port);
                }
                // No image check before creating (that would cost every start an
                // engine round trip): the create says when the image is missing.
                Err(DockerError::NotFound { ref message, .. }) if message.contains("No such image") && !pulled => {
                    pulled = true;
                    if let Err(why) = self.pull(assignment).await? {
                        return Ok(Err(why));
                    }
                }
                Err(DockerError::NotFound { ref message, .. }) if message.contains("network") => {
                    // Removed behind our back: make it again.
                    self.forget_network(&network);
                    network_id = self.ensure_network(&network, isolated.then_some(assignment.deployment.id)).await?;
                }
                Err(error) if error.is_unreachable() => return Err(error.into()),
                Err(error) => return Ok(Err(format!("starting the container failed: {error}"))),
            }
        }
        Ok(Err("no usable host port after 5 attempts".to_owned()))
    }

    /// Pulls the assignment's image, saying so on the replica (a pull can take
    /// minutes). The inner error is why it could not be pulled.
    async fn pull(&self, assignment: &Assignment) -> Result<Result<(), String>, AgentError> {
        let image = assignment.deployment.spec.image.as_str();
        tracing::info!(image, "image not on this node; pulling");
        let pulling = ReplicaObservation {
            id: assignment.replica.id,
            status: ReplicaState::Creating,
            health: Health::Unknown,
            container_id: None,
            container_name: None,
            port: None,
            generation: None,
            message: Some(format!("pulling {image}")),
            started_at: None,
        };
        self.store.record_replica(&self.node_id, &pulling).await?;
        match self.docker.pull_image(image, self.config.pull_timeout).await {
            Ok(()) => Ok(Ok(())),
            Err(error) if error.is_unreachable() && !matches!(error, DockerError::Timeout { .. }) => Err(error.into()),
            Err(error) => {
                Ok(Err(format!("image {image} is not on node {} and could not be pulled: {error}", self.node_id)))
            }
        }
    }

    /// Creates and starts; a half-made container is removed again.
    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, DockerError> {
        let id = match self.docker.create_container(spec).await {
            Ok(id) => id,
            Err(DockerError::Conflict { .. }) => {
                // A container with this name is left from an interrupted attempt.
                self.docker.remove_container(&spec.name).await?;
                self.docker.create_container(spec).await?
            }
            Err(error) => return Err(error),
        };
        if let Err(error) = self.docker.start_container(&id).await {
            if let Err(cleanup) = self.docker.remove_container(&id).await {
                tracing::warn!(container.id = %id, error = %cleanup, "could not remove a container that failed to start");
            }
            return Err(error);
        }
        Ok(id)
    }

    /// Waits until a new container is healthy by the deployment's check, for
    /// at most its startup timeout. The inner error says why it is not.
    async fn wait_healthy(
        &self,
        assignment: &Assignment,
        container_id: &str,
    ) -> Result<Result<Health, Unready>, AgentError> {
        let spec = &assignment.deployment.spec;
        let check = &spec.health_check;
        let deadline = Instant::now() + Duration::from_millis(u64::from(check.startup_timeout_ms));
        loop {
            let Some(status) = self.docker.status(container_id).await? else {
                return Ok(Err(Unready::Exited("the container disappeared".to_owned())));
            };
            if status.state != RunState::Running && status.state != RunState::Restarting {
                let code = status.exit_code.map_or_else(|| "?".to_owned(), |c| c.to_string());
                return Ok(Err(Unready::Exited(format!("the container exited (code {code}) while starting"))));
            }
            let last_error = match check.kind {
                HealthCheckKind::None => return Ok(Ok(Health::None)),
                HealthCheckKind::Command => match status.docker_health.as_deref() {
                    Some("healthy") => return Ok(Ok(Health::Healthy)),
                    other => format!("Docker reports health {}", other.unwrap_or("unknown")),
                },
                HealthCheckKind::Tcp | HealthCheckKind::Http => match status.ip_address {
                    Some(ip) => match probe::probe(check, SocketAddr::new(ip, spec.health_port())).await {
                        Ok(()) => return Ok(Ok(Health::Healthy)),
                        Err(error) => error,
                    },
                    None => "the container has no address".to_owned(),
                },
            };
            if Instant::now() >= deadline {
                return Ok(Err(Unready::Unhealthy(format!(
                    "not healthy within {}s (last check: {last_error})",
                    check.startup_timeout_ms as f64 / 1000.0
                ))));
            }
            tokio::time::sleep(STARTUP_PROBE_INTERVAL).await;
        }
    }

    /// The container for `assignment`: its image, limits, the port and the
    /// labels that make it ours.
    fn container_spec(&self, assignment: &Assignment, host_port: u16, network: &str) -> ContainerSpec {
        let replica = &assignment.replica;
        let deployment = &assignment.deployment;
        let spec = &deployment.spec;
        let mut container_labels: HashMap<String, String> =
            self.config.extra_container_labels.clone().into_iter().collect();
        for (key, value) in [
            (labels::MANAGED, "true".to_owned()),
            (labels::NODE_ID, self.node_id.to_string()),
            (labels::DEPLOYMENT_ID, replica.deployment_id.to_string()),
            (labels::DEPLOYMENT_NAME, spec.name.clone()),
            (labels::ORGANIZATION_ID, deployment.organization_id.to_string()),
            (labels::REPLICA_ID, replica.id.to_string()),
            (labels::REPLICA_INDEX, replica.replica_index.to_string()),
            (labels::GENERATION, deployment.generation.to_string()),
        ] {
            container_labels.insert(key.to_owned(), value);
        }
        let mut env: Vec<String> = spec.env.iter().map(|v| format!("{}={}", v.name, v.value)).collect();
        env.extend([
            format!("FLOTILLA_DEPLOYMENT_ID={}", replica.deployment_id),
            format!("FLOTILLA_DEPLOYMENT_NAME={}", spec.name),
            format!("FLOTILLA_REPLICA_ID={}", replica.id),
            format!("FLOTILLA_REPLICA_INDEX={}", replica.replica_index),
            format!("FLOTILLA_NODE_ID={}", self.node_id),
            format!("FLOTILLA_GENERATION={}", deployment.generation),
        ]);
        if !spec.env.iter().any(|v| v.name == "PORT") {
            env.push(format!("PORT={}", spec.port));
        }
        let check = &spec.health_check;
        let healthcheck = (check.kind == HealthCheckKind::Command).then(|| CommandHealthcheck {
            command: check.command.clone(),
            interval: Duration::from_millis(u64::from(check.interval_ms)),
            timeout: Duration::from_millis(u64::from(check.timeout_ms)),
            retries: check.unhealthy_threshold,
        });
        let short = replica.id.as_uuid().simple().to_string();
        ContainerSpec {
            name: format!(
                "flotilla-{}-{}-g{}-{}",
                spec.name,
                replica.replica_index,
                deployment.generation,
                &short[short.len() - 8..]
            ),
            image: spec.image.to_string(),
            env,
            labels: container_labels,
            container_port: spec.port,
            host_ip: self.config.publish_ip.to_string(),
            host_port,
            memory_bytes: spec.limits.memory_bytes,
            nano_cpus: spec.limits.nano_cpus(),
            restart_policy: spec.restart_policy,
            healthcheck,
            network: Some(network.to_owned()),
            stop_grace: self.config.stop_grace,
        }
    }
}

/// The row for a container launched from the assignment's current generation.
fn observation(
    status: ReplicaState,
    health: Health,
    launched: &Launched,
    assignment: &Assignment,
) -> ReplicaObservation {
    ReplicaObservation {
        id: assignment.replica.id,
        status,
        health,
        container_id: Some(launched.container_id.clone()),
        container_name: Some(launched.name.clone()),
        port: Some(launched.port),
        generation: Some(assignment.deployment.generation),
        message: None,
        started_at: Some(Utc::now()),
    }
}
