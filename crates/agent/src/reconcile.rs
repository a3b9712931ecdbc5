//! One reconciliation pass: list, diff, act.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use chrono::{DateTime, Utc};
use flotilla_docker::{DockerError, ManagedContainer};
use flotilla_redis::ORCHESTRATOR_TOPIC;
use flotilla_store::Assignment;
use flotilla_store::replicas::{AdoptOutcome, Adoption, ReplicaObservation};
use flotilla_types::status::Health;
use flotilla_types::{
    DeploymentId, DesiredState, HealthCheckKind, NetworkMode, NodeLoss, ReplicaId, ReplicaState, labels,
};
use futures::StreamExt;
use serde::Serialize;

use crate::exits;
use crate::operations::Retire;
use crate::plan::{self, Action, PlanInput, RemoveReason};
use crate::probe::ProbeTarget;
use crate::{Agent, AgentError, SHARED_NETWORK};

/// What one reconciliation pass did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PassReport {
    pub started_at: Option<DateTime<Utc>>,
    pub duration_ms: f64,
    pub containers: usize,
    pub assignments: usize,
    /// Docker events taken since the last pass.
    pub events: usize,
    pub creates_started: usize,
    pub rollouts_started: usize,
    /// Containers that served, to be stopped or removed once the edge
    /// proxies no longer send them requests.
    pub retirements_started: usize,
    pub started: usize,
    pub recorded: usize,
    pub removed: usize,
    pub rows_deleted: usize,
    pub adopted: usize,
    pub orphans_removed: usize,
    /// Orphans seen but still within their grace period.
    pub orphans_waiting: usize,
    /// Rows naming a container the list did not show, which inspect showed
    /// to exist after all (left for the next pass).
    pub not_gone: usize,
    pub failed: usize,
    pub error: Option<String>,
}

impl PassReport {
    pub fn changed_anything(&self) -> bool {
        self.creates_started
            + self.rollouts_started
            + self.retirements_started
            + self.started
            + self.recorded
            + self.removed
            + self.rows_deleted
            + self.adopted
            + self.failed
            > 0
    }
}

/// The result of one inline action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    CreateStarted,
    RolloutStarted,
    RetirementStarted,
    Started,
    Recorded,
    Removed { orphan: bool, row_deleted: bool },
    RowDeleted,
    Adopted,
    OrphanWaiting,
    NotGone,
    ReplicaFailed,
    Skipped,
}

/// Lookups shared by the actions of one pass.
pub(crate) struct PassContext<'a> {
    pub by_replica: HashMap<ReplicaId, &'a Assignment>,
    pub by_container: HashMap<&'a str, &'a ManagedContainer>,
    pub in_use: HashSet<u16>,
}

impl Agent {
    /// One reconciliation pass.
    #[tracing::instrument(skip_all, fields(node.id = %self.node_id), err)]
    pub async fn reconcile(self: &Arc<Self>) -> Result<PassReport, AgentError> {
        let _one_at_a_time = self.pass_lock.lock().await;
        let events = self.events.take();
        let deaths = exits::deaths(&events);
        // Busy replicas first: an operation writes its results before it
        // leaves the busy set, so a replica not busy now has them in the reads
        // below; read the other way round, a pass could see an operation's
        // replica free but its row from before the operation finished.
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // Containers before rows: one created after this list has its row
        // already (rows are written before containers), so it is never taken
        // for an orphan.
        let mut containers = self.docker.list_managed(&self.node_id).await?;
        // The list can still show a container running a moment after its
        // `die` event: the engine answers an inspect only once it has
        // recorded the exit.
        for container in containers.iter_mut().filter(|c| deaths.contains_key(&c.id) && c.state.is_running()) {
            if let Some(status) = self.docker.status(&container.id).await? {
                container.state = status.state;
                container.exit_code = status.exit_code;
                container.ip_address = status.ip_address;
                container.docker_health = status.docker_health;
            }
        }
        let mut assignments = self.store.node_assignments(&self.node_id).await?;
        *self.replaceable.lock().unwrap_or_else(|e| e.into_inner()) = assignments
            .iter()
            .filter(|a| a.deployment.spec.placement.node_loss == NodeLoss::Replace)
            .map(|a| a.deployment.id)
            .collect();
        self.record_exits(&mut assignments, &containers, &deaths).await?;
        let held = self.restarts_held(&assignments);
        let actions = plan::plan(PlanInput {
            assignments: &assignments,
            containers: &containers,
            busy: &busy,
            held: &held,
            now: Utc::now(),
            failed_retry_after: self.config.failed_retry_after,
        });

        let context = PassContext {
            by_replica: assignments.iter().map(|a| (a.replica.id, a)).collect(),
            by_container: containers.iter().map(|c| (c.id.as_str(), c)).collect(),
            in_use: containers
                .iter()
                .flat_map(|c| c.host_ports.iter().copied())
                .chain(assignments.iter().filter_map(|a| a.replica.port))
                .collect(),
        };
        let orphan_ids: HashSet<&str> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Orphan { container_id } => Some(container_id.as_str()),
                _ => None,
            })
            .collect();
        self.orphans.lock().unwrap_or_else(|e| e.into_inner()).retain(|id, _| orphan_ids.contains(id.as_str()));

        let outcomes: Vec<Result<Outcome, AgentError>> = futures::stream::iter(actions)
            .map(|action| self.execute(action, &context))
            .buffer_unordered(8)
            .collect()
            .await;

        // A new agent container (after an update) joins the networks of the
        // replicas it finds before probing them.
        if self.own_container.is_some() {
            let networks: BTreeSet<String> = assignments
                .iter()
                .filter(|a| a.deployment.desired_state != DesiredState::Deleted)
                .map(|a| self.network_for(a))
                .collect();
            for network in &networks {
                self.join_network(network).await;
            }
        }
        self.set_probe_targets(&assignments, &containers);
        let mut report = PassReport {
            containers: containers.len(),
            assignments: assignments.len(),
            events: events.len(),
            ..PassReport::default()
        };
        let mut first_error = None;
        for outcome in outcomes {
            match outcome {
                Ok(Outcome::CreateStarted) => report.creates_started += 1,
                Ok(Outcome::RolloutStarted) => report.rollouts_started += 1,
                Ok(Outcome::RetirementStarted) => report.retirements_started += 1,
                Ok(Outcome::Started) => report.started += 1,
                Ok(Outcome::Recorded) => report.recorded += 1,
                Ok(Outcome::Removed { orphan, row_deleted }) => {
                    report.removed += 1;
                    report.orphans_removed += usize::from(orphan);
                    report.rows_deleted += usize::from(row_deleted);
                }
                Ok(Outcome::RowDeleted) => report.rows_deleted += 1,
                Ok(Outcome::Adopted) => report.adopted += 1,
                Ok(Outcome::OrphanWaiting) => report.orphans_waiting += 1,
                Ok(Outcome::NotGone) => report.not_gone += 1,
                Ok(Outcome::ReplicaFailed) => report.failed += 1,
                Ok(Outcome::Skipped) => {}
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if report.removed > 0 || report.rows_deleted > 0 {
            self.remove_unused_networks(&assignments).await;
        }
        if report.rows_deleted > 0 || report.adopted > 0 {
            // Deleted deployments may now be final; adopted rows need preparing.
            self.wake.wake(ORCHESTRATOR_TOPIC).await;
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        if report.changed_anything() {
            tracing::info!(
                creates = report.creates_started,
                rollouts = report.rollouts_started,
                retirements = report.retirements_started,
                started = report.started,
                recorded = report.recorded,
                removed = report.removed,
                rows_deleted = report.rows_deleted,
                adopted = report.adopted,
                orphans_removed = report.orphans_removed,
                "reconciliation pass changed things"
            );
        }
        Ok(report)
    }

    async fn execute(self: &Arc<Self>, action: Action, cx: &PassContext<'_>) -> Result<Outcome, AgentError> {
        match action {
            Action::Create { replica, previous } => {
                let Some(assignment) = cx.by_replica.get(&replica) else { return Ok(Outcome::Skipped) };
                // The list did not show the row's container: make sure it is gone.
                if let Some(previous) = previous
                    && self.docker.run_state(&previous).await?.is_some()
                {
                    return Ok(Outcome::NotGone);
                }
                self.spawn_create((*assignment).clone(), cx.in_use.clone());
                Ok(Outcome::CreateStarted)
            }
            Action::Rollout { replica, container_id } => {
                let (Some(assignment), Some(container)) =
                    (cx.by_replica.get(&replica), cx.by_container.get(container_id.as_str()))
                else {
                    return Ok(Outcome::Skipped);
                };
                self.spawn_rollout((*assignment).clone(), (*container).clone(), cx.in_use.clone());
                Ok(Outcome::RolloutStarted)
            }
            Action::StartExisting { replica, container_id } => {
                let (Some(assignment), Some(container)) =
                    (cx.by_replica.get(&replica), cx.by_container.get(container_id.as_str()))
                else {
                    return Ok(Outcome::Skipped);
                };
                match self.docker.start_container(&container.id).await {
                    Ok(()) => {
                        tracing::info!(replica.id = %replica, container.id = %container.id, "stopped container started again");
                        self.record(assignment, container, ReplicaState::Running, None, true).await?;
                        Ok(Outcome::Started)
                    }
                    Err(error) if error.is_unreachable() => Err(error.into()),
                    Err(DockerError::PortInUse { .. }) => {
                        // Its host port was taken while it was stopped: replace
                        // it at once on another port.
                        tracing::info!(replica.id = %replica, container.id = %container.id, "host port taken meanwhile; replacing the container");
                        self.docker.remove_container(&container.id).await?;
                        let mut in_use = cx.in_use.clone();
                        in_use.extend(container.host_ports.iter().copied());
                        self.spawn_create((*assignment).clone(), in_use);
                        Ok(Outcome::CreateStarted)
                    }
                    Err(error) => {
                        // Replace it: remove now, the next pass creates a new one.
                        self.docker.remove_container(&container.id).await?;
                        self.fail(replica, format!("restarting the container failed: {error}")).await
                    }
                }
            }
            Action::Stop { replica, container_id } => {
                let (Some(assignment), Some(container)) =
                    (cx.by_replica.get(&replica), cx.by_container.get(container_id.as_str()))
                else {
                    return Ok(Outcome::Skipped);
                };
                self.spawn_retire((*assignment).clone(), (*container).clone(), Retire::Stop);
                Ok(Outcome::RetirementStarted)
            }
            Action::Record { replica, container_id } => {
                let (Some(assignment), Some(container)) =
                    (cx.by_replica.get(&replica), cx.by_container.get(container_id.as_str()))
                else {
                    return Ok(Outcome::Skipped);
                };
                let (status, message) = if container.state.is_running() {
                    (ReplicaState::Running, None)
                } else if assignment.deployment.desired_state == DesiredState::Stopped {
                    (ReplicaState::Stopped, Some("stopped on request".to_owned()))
                } else {
                    let code = container.exit_code.map_or_else(|| "?".to_owned(), |c| c.to_string());
                    (
                        ReplicaState::Stopped,
                        Some(format!("exited with code {code}; its restart policy does not restart it")),
                    )
                };
                self.record(assignment, container, status, message, false).await?;
                Ok(Outcome::Recorded)
            }
            Action::Remove { container_id, replica: Some(replica), delete_row: true, reason }
                if reason.was_routed() =>
            {
                let (Some(assignment), Some(container)) =
                    (cx.by_replica.get(&replica), cx.by_container.get(container_id.as_str()))
                else {
                    return Ok(Outcome::Skipped);
                };
                self.spawn_retire((*assignment).clone(), (*container).clone(), Retire::Remove { reason });
                Ok(Outcome::RetirementStarted)
            }
            Action::Remove { container_id, replica, delete_row, reason } => {
                self.remove(&container_id, reason).await?;
                let row_deleted = match (delete_row, replica) {
                    (true, Some(replica)) => self.store.delete_replica(&self.node_id, replica).await?,
                    _ => false,
                };
                Ok(Outcome::Removed { orphan: reason == RemoveReason::Orphaned, row_deleted })
            }
            Action::DeleteRow { replica, reason } => {
                self.store.delete_replica(&self.node_id, replica).await?;
                tracing::info!(replica.id = %replica, ?reason, "replica row removed");
                Ok(Outcome::RowDeleted)
            }
            Action::Orphan { container_id } => match cx.by_container.get(container_id.as_str()) {
                Some(container) => self.handle_orphan(container).await,
                None => Ok(Outcome::Skipped),
            },
        }
    }

    /// Notes that the agent itself stops `container`: its exit is no crash.
    pub(crate) fn stopping(&self, container: &str) {
        self.stopping.lock().unwrap_or_else(|e| e.into_inner()).insert(container.to_owned());
    }

    /// Stops (gracefully) and removes a container.
    pub(crate) async fn remove(&self, container_id: &str, reason: RemoveReason) -> Result<(), DockerError> {
        self.stopping(container_id);
        self.docker.stop_container(container_id, self.config.stop_grace).await?;
        self.docker.remove_container(container_id).await?;
        self.stats.containers_removed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(container.id = %container_id, ?reason, "container removed");
        Ok(())
    }

    /// A managed container without a row on this node: adopted when its
    /// deployment lives and its replica index is free; otherwise removed once
    /// it has been an orphan for the grace period.
    async fn handle_orphan(&self, container: &ManagedContainer) -> Result<Outcome, AgentError> {
        if let (Some((deployment_id, index)), Some(replica_id)) = (container.replica_slot(), container.replica_id()) {
            let live = self
                .store
                .deployments_by_id(&[deployment_id])
                .await?
                .into_iter()
                .find(|d| d.desired_state != DesiredState::Deleted && index < d.spec.replicas as i32);
            if let Some(deployment) = live {
                let adoption = Adoption {
                    replica_id,
                    deployment_id,
                    replica_index: index,
                    generation: container.generation().unwrap_or(0),
                    address: self.advertise_address.clone(),
                    container_port: deployment.spec.port,
                    container_id: container.id.clone(),
                    container_name: container.name.clone(),
                    port: container.host_ports.first().copied(),
                    running: container.state.is_running(),
                };
                match self.store.adopt_replica(&self.node_id, &adoption).await? {
                    AdoptOutcome::Adopted => {
                        self.stats.adopted.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            container.id = %container.id,
                            deployment.id = %deployment_id,
                            replica.id = %replica_id,
                            "adopted a managed container that had lost its placement row"
                        );
                        return Ok(Outcome::Adopted);
                    }
                    // This node was down and the replica runs elsewhere now:
                    // no grace, it serves nobody.
                    AdoptOutcome::Superseded => {
                        tracing::warn!(
                            container.id = %container.id,
                            deployment.id = %deployment_id,
                            replica.index = index,
                            "removing a stale container: its replica was placed on another node"
                        );
                        self.remove(&container.id, RemoveReason::Superseded).await?;
                        self.stats.orphans_removed.fetch_add(1, Ordering::Relaxed);
                        return Ok(Outcome::Removed { orphan: true, row_deleted: false });
                    }
                    AdoptOutcome::NotAdopted => {}
                }
            }
        }
        let first_seen = *self
            .orphans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(container.id.clone())
            .or_insert_with(Instant::now);
        if first_seen.elapsed() < self.config.orphan_grace {
            tracing::debug!(container.id = %container.id, "orphan container within its grace period");
            return Ok(Outcome::OrphanWaiting);
        }
        tracing::warn!(
            container.id = %container.id,
            container.name = %container.name,
            "removing a managed container whose deployment is gone"
        );
        self.remove(&container.id, RemoveReason::Orphaned).await?;
        self.stats.orphans_removed.fetch_add(1, Ordering::Relaxed);
        self.orphans.lock().unwrap_or_else(|e| e.into_inner()).remove(&container.id);
        Ok(Outcome::Removed { orphan: true, row_deleted: false })
    }

    /// Records a container as the replica's, with the health it shows.
    /// `started` (the agent just started it again): a probed replica is
    /// `starting` until its probe passes, whatever it was before it stopped.
    /// A crash-looping replica is unhealthy and says so while it runs.
    pub(crate) async fn record(
        &self,
        assignment: &Assignment,
        container: &ManagedContainer,
        status: ReplicaState,
        message: Option<String>,
        started: bool,
    ) -> Result<bool, AgentError> {
        let check = assignment.deployment.spec.health_check.kind;
        let looping =
            (status == ReplicaState::Running).then(|| self.exits.crash_looping(assignment.replica.id)).flatten();
        let health = match plan::observed_health(check, container) {
            _ if looping.is_some() => Health::Unhealthy,
            Some(health) => health,
            None if started => Health::Starting,
            // Probed: keep what the prober recorded for this container.
            None if assignment.replica.container_id.as_deref() == Some(&container.id) => assignment.replica.health,
            None => Health::Unknown,
        };
        let message = looping.or(message);
        let seen = ReplicaObservation {
            id: assignment.replica.id,
            status,
            health,
            container_id: Some(container.id.clone()),
            container_name: Some(container.name.clone()),
            port: container.host_ports.first().copied(),
            generation: container.generation(),
            message,
            started_at: (status == ReplicaState::Running).then(Utc::now),
        };
        Ok(self.store.record_replica(&self.node_id, &seen).await?)
    }

    pub(crate) async fn fail(&self, replica: ReplicaId, message: String) -> Result<Outcome, AgentError> {
        self.record_failure(replica, message).await?;
        Ok(Outcome::ReplicaFailed)
    }

    /// Marks a replica failed with the reason users will see.
    pub(crate) async fn record_failure(&self, replica: ReplicaId, message: String) -> Result<(), AgentError> {
        self.stats.replica_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(replica.id = %replica, %message, "replica failed");
        let seen = ReplicaObservation {
            id: replica,
            status: ReplicaState::Failed,
            health: Health::Unknown,
            container_id: None,
            container_name: None,
            port: None,
            generation: None,
            message: Some(message),
            started_at: None,
        };
        self.store.record_replica(&self.node_id, &seen).await?;
        Ok(())
    }

    /// Records, on each replica whose container died since the last pass
    /// (while it should run), the exit: its code and count, out of the
    /// route table (unhealthy, or starting when it runs again already), and
    /// whether it is crash looping. `assignments` are updated to match.
    async fn record_exits(
        &self,
        assignments: &mut [Assignment],
        containers: &[ManagedContainer],
        deaths: &HashMap<String, exits::Deaths>,
    ) -> Result<(), AgentError> {
        // The agent's own stops are no exits to report; forget those done.
        let stopping = {
            let mut stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
            stopping
                .retain(|id| containers.iter().any(|c| c.id == *id && c.state.is_running()) || deaths.contains_key(id));
            stopping.clone()
        };
        for assignment in assignments.iter_mut() {
            let replica = &assignment.replica;
            let Some(container_id) = replica.container_id.clone() else { continue };
            let Some(died) = deaths.get(&container_id) else { continue };
            // Stopped by the agent (on request, being removed or replaced):
            // not an exit to report.
            if assignment.deployment.desired_state != DesiredState::Running
                || replica.status != ReplicaState::Running
                || replica.retiring
                || stopping.contains(&container_id)
            {
                continue;
            }
            let container = containers.iter().find(|c| c.id == container_id);
            let running_again = container.is_some_and(|c| c.state.is_running());
            let code = died
                .codes
                .last()
                .copied()
                .flatten()
                .or_else(|| container.and_then(|c| c.exit_code).and_then(|c| i32::try_from(c).ok()));
            self.exits.record(replica.id, died.codes.len(), code);
            let (health, message) = match self.exits.crash_looping(replica.id) {
                Some(looping) => (Health::Unhealthy, looping),
                None if running_again => {
                    let health = match assignment.deployment.spec.health_check.kind {
                        HealthCheckKind::None => Health::None,
                        _ => Health::Starting,
                    };
                    (health, exits::exit_message(code, true))
                }
                None => (Health::Unhealthy, exits::exit_message(code, false)),
            };
            tracing::warn!(replica.id = %replica.id, container.id = %container_id, ?code, %message, "replica's container exited");
            if self.store.record_exit(&self.node_id, replica.id, &container_id, code, health, &message).await? {
                assignment.replica.health = health;
                assignment.replica.status_message = Some(message);
                assignment.replica.restart_count += died.codes.len() as u32;
                assignment.replica.last_exit_code = code;
            }
        }
        self.exits.retain(|id| assignments.iter().any(|a| a.replica.id == *id));
        Ok(())
    }

    /// Crash-looping replicas the agent does not start again yet; a pass is
    /// woken when the first of them may be.
    fn restarts_held(self: &Arc<Self>, assignments: &[Assignment]) -> HashSet<ReplicaId> {
        let now = Instant::now();
        let waits: Vec<(ReplicaId, Instant)> = assignments
            .iter()
            .filter_map(|a| self.exits.restart_not_before(a.replica.id).map(|at| (a.replica.id, at)))
            .filter(|(_, at)| *at > now)
            .collect();
        if let Some(first) = waits.iter().map(|(_, at)| *at).min() {
            let wake = self.reconcile_wake.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(first.into()).await;
                wake.notify_one();
            });
        }
        waits.into_iter().map(|(id, _)| id).collect()
    }

    /// The replicas whose TCP/HTTP health the prober checks: the running
    /// ones with an address.
    fn set_probe_targets(&self, assignments: &[Assignment], containers: &[ManagedContainer]) {
        let by_id: HashMap<&str, &ManagedContainer> = containers.iter().map(|c| (c.id.as_str(), c)).collect();
        let targets = assignments
            .iter()
            .filter(|a| matches!(a.deployment.spec.health_check.kind, HealthCheckKind::Tcp | HealthCheckKind::Http))
            .filter_map(|a| {
                let container = by_id.get(a.replica.container_id.as_deref()?)?;
                let ip = container.ip_address.filter(|_| container.state.is_running())?;
                let port = a.deployment.spec.health_port();
                Some((
                    a.replica.id,
                    ProbeTarget {
                        check: a.deployment.spec.health_check.clone(),
                        container_id: container.id.clone(),
                        address: SocketAddr::new(ip, port),
                        recorded: a.replica.health,
                    },
                ))
            })
            .collect();
        self.monitor.set_targets(targets);
    }

    /// The network a deployment's containers join.
    pub(crate) fn network_for(&self, assignment: &Assignment) -> String {
        match assignment.deployment.spec.network_mode {
            NetworkMode::Shared => SHARED_NETWORK.to_owned(),
            NetworkMode::Isolated => format!("flotilla-d-{}", assignment.deployment.id.as_uuid().simple()),
        }
    }

    /// The id of network `name`, made unless this agent knows it exists.
    /// A deployment's own network carries its id (and the extra labels, so
    /// tests can clean it up); the shared network carries neither.
    pub(crate) async fn ensure_network(
        &self,
        name: &str,
        deployment: Option<DeploymentId>,
    ) -> Result<String, DockerError> {
        if let Some(id) = self.networks.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(id.clone());
        }
        let mut network_labels = HashMap::from([(labels::MANAGED.to_owned(), "true".to_owned())]);
        if let Some(deployment) = deployment {
            network_labels.extend(self.config.extra_container_labels.clone());
            network_labels.insert(labels::DEPLOYMENT_ID.to_owned(), deployment.to_string());
        }
        let id = self.docker.ensure_network(name, &network_labels).await?;
        self.networks.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_owned(), id.clone());
        self.join_network(name).await;
        Ok(id)
    }

    /// Forgets a network (it turned out not to exist).
    pub(crate) fn forget_network(&self, name: &str) {
        self.networks.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        self.joined_networks.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    /// When this agent runs in a container, connects it to app network
    /// `name` so that probes reach the replicas' addresses there (a container
    /// on other networks cannot). A failure leaves those replicas' probes
    /// failing, and is logged; the next pass tries again.
    async fn join_network(&self, name: &str) {
        let Some(own) = &self.own_container else { return };
        if self.joined_networks.lock().unwrap_or_else(|e| e.into_inner()).contains(name) {
            return;
        }
        match self.docker.connect_to_network(name, own).await {
            Ok(()) => {
                self.joined_networks.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_owned());
                tracing::info!(network = %name, "joined an app network to probe its replicas");
            }
            // Not made yet: joined once a replica's container creates it.
            Err(DockerError::NotFound { .. }) => {}
            Err(error) => tracing::warn!(network = %name, %error, "could not join an app network to probe it"),
        }
    }

    /// Disconnects this agent's container from network `name` (before the
    /// network is removed: an attached container would keep it in use).
    async fn leave_network(&self, name: &str) {
        let Some(own) = &self.own_container else { return };
        if !self.joined_networks.lock().unwrap_or_else(|e| e.into_inner()).remove(name) {
            return;
        }
        if let Err(error) = self.docker.disconnect_from_network(name, own).await {
            tracing::warn!(network = %name, %error, "could not leave an app network");
        }
    }

    /// Removes isolated networks of deployments with no replica left on this
    /// node. One still in use (by another agent's containers) stays.
    pub(crate) async fn remove_unused_networks(&self, assignments: &[Assignment]) {
        let wanted: HashSet<String> = assignments
            .iter()
            // Rows of deleted deployments were read before this pass removed them.
            .filter(|a| a.deployment.desired_state != DesiredState::Deleted)
            .filter(|a| a.deployment.spec.network_mode == NetworkMode::Isolated)
            .map(|a| self.network_for(a))
            .collect();
        let filter = [format!("{}=true", labels::MANAGED), labels::DEPLOYMENT_ID.to_owned()];
        let Ok(networks) = self.docker.networks_labelled(&filter).await else { return };
        for name in networks.into_iter().filter(|n| !wanted.contains(n)) {
            self.leave_network(&name).await;
            match self.docker.remove_network(&name).await {
                Ok(true) => {
                    self.forget_network(&name);
                    tracing::info!(network = %name, "removed a deployment's network");
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(network = %name, %error, "could not remove a network"),
            }
        }
    }
}
