//! The reconciliation diff: from the node's assignments (database) and its
//! managed containers (engine) to the actions that make them agree. Pure, so
//! every case is unit-tested; [`plan`] is also what the 100,000-row
//! benchmark measures.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_docker::{ManagedContainer, RunState};
use flotilla_store::Assignment;
use flotilla_types::status::Health;
use flotilla_types::{DeploymentId, DesiredState, HealthCheckKind, ReplicaId, ReplicaState, RestartPolicy};

/// One step of a reconciliation pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The replica should run and has no container: create and start one.
    /// `previous` is the container the row last named, which the listing did
    /// not show: it is confirmed gone by inspecting it first.
    Create { replica: ReplicaId, previous: Option<String> },
    /// The replica runs an older generation: replace it start-first.
    Rollout { replica: ReplicaId, container_id: String },
    /// The replica's container exists but is not running: start it.
    StartExisting { replica: ReplicaId, container_id: String },
    /// The deployment is stopped; its container still runs: stop it.
    Stop { replica: ReplicaId, container_id: String },
    /// The row does not say what the engine shows: record it.
    Record { replica: ReplicaId, container_id: String },
    /// Stop and remove a container. With `delete_row`, its replica row goes too.
    Remove { container_id: String, replica: Option<ReplicaId>, delete_row: bool, reason: RemoveReason },
    /// A replica row with no container left that must go.
    DeleteRow { replica: ReplicaId, reason: RemoveReason },
    /// A managed container without a row on this node: adopt it if its
    /// deployment still exists, otherwise remove it after the grace period.
    Orphan { container_id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveReason {
    /// Its deployment was deleted.
    Deleted,
    /// Its replica index is beyond the deployment's replica count.
    ScaledDown,
    /// It has no row and no live deployment (after the grace period).
    Orphaned,
    /// A second container for a replica that has one.
    Duplicate,
    /// Dead: cannot be started again, only replaced.
    Dead,
    /// Moved to another node (drain): its replacement serves.
    Moved,
    /// Its replica was placed on another node while this one was down.
    Superseded,
}

impl RemoveReason {
    /// Whether the container may still be in an edge proxy's route table:
    /// its removal first waits for the proxies to take in a table without it.
    pub fn was_routed(self) -> bool {
        matches!(self, Self::Deleted | Self::ScaledDown | Self::Moved)
    }
}

/// What one pass looks at.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    pub assignments: &'a [Assignment],
    pub containers: &'a [ManagedContainer],
    /// Replicas with a create or rollout under way: left alone.
    pub busy: &'a HashSet<ReplicaId>,
    /// Crash-looping replicas whose container is not started again yet.
    pub held: &'a HashSet<ReplicaId>,
    pub now: DateTime<Utc>,
    /// A replica that failed is tried again after this long.
    pub failed_retry_after: Duration,
}

/// The health a running container shows without the agent probing it.
pub fn observed_health(check: HealthCheckKind, container: &ManagedContainer) -> Option<Health> {
    match check {
        HealthCheckKind::None => Some(Health::None),
        HealthCheckKind::Command => Some(match container.docker_health.as_deref() {
            Some("healthy") => Health::Healthy,
            Some("unhealthy") => Health::Unhealthy,
            Some("starting") => Health::Starting,
            _ => Health::Unknown,
        }),
        // Probed by the agent; the prober records it.
        HealthCheckKind::Tcp | HealthCheckKind::Http => None,
    }
}

/// Whether the agent restarts a container that exited by itself, by the
/// deployment's restart policy.
pub fn restart_allowed(policy: RestartPolicy, exit_code: Option<i64>) -> bool {
    match policy {
        RestartPolicy::No => false,
        RestartPolicy::OnFailure { .. } => exit_code != Some(0),
        RestartPolicy::Always | RestartPolicy::UnlessStopped => true,
    }
}

/// Computes the actions for one pass.
pub fn plan(input: PlanInput<'_>) -> Vec<Action> {
    let mut by_replica: HashMap<ReplicaId, Vec<&ManagedContainer>> = HashMap::with_capacity(input.containers.len());
    let mut actions = Vec::new();
    for container in input.containers {
        match container.replica_id() {
            Some(replica) => by_replica.entry(replica).or_default().push(container),
            None => actions.push(Action::Orphan { container_id: container.id.clone() }),
        }
    }

    // Running containers of a replica no row of this node names: a replica
    // whose row was taken off this node while it was down (its agent silent)
    // and placed again. One placed back here is not created a second time:
    // the pass adopts the running container into that row instead
    // (handle_orphan, which needs the replica id to adopt).
    let rows: HashSet<ReplicaId> = input.assignments.iter().map(|a| a.replica.id).collect();
    let returning: HashSet<(DeploymentId, i32)> = input
        .containers
        .iter()
        .filter(|c| c.state.is_running() && c.replica_id().is_some_and(|id| !rows.contains(&id)))
        .filter_map(ManagedContainer::replica_slot)
        .collect();

    for assignment in input.assignments {
        let replica = &assignment.replica;
        let mut mine = by_replica.remove(&replica.id).unwrap_or_default();
        if input.busy.contains(&replica.id) {
            continue;
        }
        // Keep the container the row names, else a running one, else the newest generation.
        mine.sort_by_key(|c| {
            (
                replica.container_id.as_deref() != Some(c.id.as_str()),
                !c.state.is_running(),
                std::cmp::Reverse(c.generation()),
                c.id.clone(),
            )
        });
        let mut mine = mine.into_iter();
        let current = mine.next();
        for extra in mine {
            actions.push(Action::Remove {
                container_id: extra.id.clone(),
                replica: Some(replica.id),
                delete_row: false,
                reason: RemoveReason::Duplicate,
            });
        }
        let returned = current.is_none() && returning.contains(&(assignment.deployment.id, replica.replica_index));
        plan_replica(assignment, current, &input, returned, &mut actions);
    }

    // Containers naming a replica this node has no row for.
    for containers in by_replica.into_values() {
        for c in containers {
            actions.push(Action::Orphan { container_id: c.id.clone() });
        }
    }
    actions
}

/// `returned`: a running container of this replica's deployment and index
/// that no row names is on this node (see [`plan`]).
fn plan_replica(
    assignment: &Assignment,
    current: Option<&ManagedContainer>,
    input: &PlanInput<'_>,
    returned: bool,
    actions: &mut Vec<Action>,
) {
    let replica = &assignment.replica;
    let deployment = &assignment.deployment;

    let gone = match deployment.desired_state {
        DesiredState::Deleted => Some(RemoveReason::Deleted),
        _ if replica.replica_index >= deployment.spec.replicas as i32 => Some(RemoveReason::ScaledDown),
        // Moved off this node (drain): its replacement serves elsewhere.
        _ if replica.retiring => Some(RemoveReason::Moved),
        _ => None,
    };
    if let Some(reason) = gone {
        actions.push(match current {
            Some(c) => {
                Action::Remove { container_id: c.id.clone(), replica: Some(replica.id), delete_row: true, reason }
            }
            None => Action::DeleteRow { replica: replica.id, reason },
        });
        return;
    }

    if deployment.desired_state == DesiredState::Stopped {
        match current {
            Some(c) if c.state.is_running() || c.state == RunState::Restarting => {
                actions.push(Action::Stop { replica: replica.id, container_id: c.id.clone() });
            }
            Some(c) if replica.status != ReplicaState::Stopped || replica.container_id.as_deref() != Some(&c.id) => {
                actions.push(Action::Record { replica: replica.id, container_id: c.id.clone() });
            }
            _ => {}
        }
        return;
    }

    let Some(c) = current else {
        let failed_recently = replica.status == ReplicaState::Failed
            && input.now.signed_duration_since(replica.updated_at).to_std().unwrap_or_default()
                < input.failed_retry_after;
        // Wait for the orchestrator to prepare the current generation's
        // labels; a returned container is adopted instead.
        if assignment.prepared() && !failed_recently && !returned {
            actions.push(Action::Create { replica: replica.id, previous: replica.container_id.clone() });
        }
        return;
    };

    match c.state {
        RunState::Running => {
            let generation = c.generation().unwrap_or(0);
            let outdated = generation < deployment.generation
                && assignment.prepared()
                && replica.failed_generation != Some(deployment.generation);
            if outdated {
                actions.push(Action::Rollout { replica: replica.id, container_id: c.id.clone() });
                return;
            }
            let health_drift =
                observed_health(deployment.spec.health_check.kind, c).is_some_and(|health| health != replica.health);
            let row_agrees = replica.status == ReplicaState::Running
                && replica.container_id.as_deref() == Some(c.id.as_str())
                && replica.port.is_some_and(|p| c.host_ports.contains(&p))
                && replica.generation == generation
                && !health_drift;
            if !row_agrees {
                actions.push(Action::Record { replica: replica.id, container_id: c.id.clone() });
            }
        }
        RunState::Dead | RunState::Removing => actions.push(Action::Remove {
            container_id: c.id.clone(),
            replica: Some(replica.id),
            delete_row: false,
            reason: RemoveReason::Dead,
        }),
        // Docker restarts it by its restart policy; look at it next pass.
        RunState::Restarting => {}
        RunState::Created | RunState::Exited | RunState::Paused | RunState::Unknown => {
            if input.held.contains(&replica.id) {
                // Crash looping: started again once its backoff has passed.
            } else if restart_allowed(deployment.spec.restart_policy, c.exit_code) {
                actions.push(Action::StartExisting { replica: replica.id, container_id: c.id.clone() });
            } else if replica.status != ReplicaState::Stopped {
                actions.push(Action::Record { replica: replica.id, container_id: c.id.clone() });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_store::{DeploymentRecord, ReplicaRecord};
    use flotilla_types::{
        DeploymentId, DeploymentSpec, DeploymentSpecInput, NodeId, OrganizationId, ProjectId, labels,
    };

    fn assignment(status: ReplicaState, container: Option<&str>, port: Option<u16>) -> Assignment {
        let spec = DeploymentSpec::validate(DeploymentSpecInput {
            name: "web".into(),
            image: "img".into(),
            port: 8080,
            replicas: Some(2),
            ..Default::default()
        })
        .unwrap();
        let deployment_id = DeploymentId::new();
        Assignment {
            replica: ReplicaRecord {
                id: ReplicaId::new(),
                deployment_id,
                replica_index: 0,
                generation: 1,
                target_generation: 1,
                failed_generation: None,
                rollout_message: None,
                node_id: NodeId::parse("n1").unwrap(),
                container_id: container.map(str::to_owned),
                container_name: None,
                status,
                health: Health::Healthy,
                address: Some("127.0.0.1".into()),
                port,
                container_port: 8080,
                status_message: None,
                placement_reason: None,
                moving: false,
                retiring: false,
                node_reachable: true,
                restart_count: 0,
                last_exit_code: None,
                last_exit_at: None,
                updated_at: Utc::now(),
            },
            deployment: DeploymentRecord {
                id: deployment_id,
                organization_id: OrganizationId::new(),
                project_id: ProjectId::new(),
                spec,
                desired_state: DesiredState::Running,
                generation: 1,
                placement_message: None,
                created_at: Utc::now(),
                updated_at: Utc::now(),
            },
        }
    }

    fn container(id: &str, replica: Option<ReplicaId>, state: RunState, port: u16) -> ManagedContainer {
        let mut l = HashMap::from([(labels::GENERATION.to_owned(), "1".to_owned())]);
        if let Some(r) = replica {
            l.insert(labels::REPLICA_ID.to_owned(), r.to_string());
        }
        ManagedContainer {
            id: id.into(),
            name: id.into(),
            state,
            labels: l,
            host_ports: vec![port],
            ip_address: None,
            docker_health: None,
            exit_code: None,
        }
    }

    fn plan_with(
        assignments: &[Assignment],
        containers: &[ManagedContainer],
        busy: &HashSet<ReplicaId>,
    ) -> Vec<Action> {
        super::plan(PlanInput {
            assignments,
            containers,
            busy,
            held: &HashSet::new(),
            now: Utc::now(),
            failed_retry_after: Duration::from_secs(10),
        })
    }

    fn plan(assignments: &[Assignment], containers: &[ManagedContainer]) -> Vec<Action> {
        plan_with(assignments, containers, &HashSet::new())
    }

    fn one(a: &Assignment) -> &[Assignment] {
        std::slice::from_ref(a)
    }

    #[test]
    fn a_replica_placed_back_here_adopts_its_running_container_instead_of_a_second() {
        let a = assignment(ReplicaState::Pending, None, None);
        // The container of the row the health watch took off this node.
        let mut returning = container("c1", Some(ReplicaId::new()), RunState::Running, 20000);
        returning.labels.insert(labels::DEPLOYMENT_ID.to_owned(), a.deployment.id.to_string());
        returning.labels.insert(labels::REPLICA_INDEX.to_owned(), "0".to_owned());
        let containers = [returning.clone()];
        assert_eq!(plan(one(&a), &containers), vec![Action::Orphan { container_id: "c1".into() }]);
        // Another index, or a container no longer running, does not count.
        returning.labels.insert(labels::REPLICA_INDEX.to_owned(), "1".to_owned());
        assert!(
            plan(one(&a), &[returning.clone()]).contains(&Action::Create { replica: a.replica.id, previous: None })
        );
        returning.labels.insert(labels::REPLICA_INDEX.to_owned(), "0".to_owned());
        let mut without_replica_id = returning.clone();
        without_replica_id.labels.remove(labels::REPLICA_ID);
        assert!(
            plan(one(&a), &[without_replica_id]).contains(&Action::Create { replica: a.replica.id, previous: None }),
            "a container that cannot be adopted does not hold the replica back"
        );
        returning.state = RunState::Exited;
        assert!(plan(one(&a), &[returning]).contains(&Action::Create { replica: a.replica.id, previous: None }));
    }

    #[test]
    fn a_new_replica_is_created_once_prepared() {
        let mut a = assignment(ReplicaState::Pending, None, None);
        assert_eq!(plan(one(&a), &[]), vec![Action::Create { replica: a.replica.id, previous: None }]);
        // A new generation the orchestrator has not prepared yet: wait.
        a.deployment.generation = 2;
        assert!(plan(one(&a), &[]).is_empty());
    }

    #[test]
    fn agreement_needs_no_action() {
        let a = assignment(ReplicaState::Running, Some("c1"), Some(20000));
        let c = container("c1", Some(a.replica.id), RunState::Running, 20000);
        assert!(plan(one(&a), &[c]).is_empty());
    }

    #[test]
    fn drift_is_recorded() {
        // Row says pending (the agent crashed after starting the container).
        let a = assignment(ReplicaState::Pending, None, None);
        let c = container("c1", Some(a.replica.id), RunState::Running, 20000);
        assert_eq!(plan(one(&a), &[c]), vec![Action::Record { replica: a.replica.id, container_id: "c1".into() }]);
        // Port drift.
        let a = assignment(ReplicaState::Running, Some("c1"), Some(20001));
        let c = container("c1", Some(a.replica.id), RunState::Running, 20000);
        assert!(matches!(plan(one(&a), &[c])[..], [Action::Record { .. }]));
        // Health drift of a command check (Docker's health).
        let mut a = assignment(ReplicaState::Running, Some("c1"), Some(20000));
        a.deployment.spec.health_check.kind = HealthCheckKind::Command;
        let mut c = container("c1", Some(a.replica.id), RunState::Running, 20000);
        c.docker_health = Some("unhealthy".into());
        assert!(matches!(plan(one(&a), &[c])[..], [Action::Record { .. }]));
    }

    #[test]
    fn a_vanished_container_is_recreated_after_confirmation_and_a_stopped_one_started() {
        let a = assignment(ReplicaState::Running, Some("gone"), Some(20000));
        assert_eq!(plan(one(&a), &[]), vec![Action::Create { replica: a.replica.id, previous: Some("gone".into()) }]);
        let c = container("c1", Some(a.replica.id), RunState::Exited, 20000);
        assert_eq!(
            plan(one(&a), &[c]),
            vec![Action::StartExisting { replica: a.replica.id, container_id: "c1".into() }]
        );
    }

    #[test]
    fn restart_policies_decide_about_exited_containers() {
        let mut a = assignment(ReplicaState::Running, Some("c1"), Some(20000));
        let mut c = container("c1", Some(a.replica.id), RunState::Exited, 20000);
        c.exit_code = Some(0);
        a.deployment.spec.restart_policy = RestartPolicy::No;
        assert_eq!(
            plan(one(&a), std::slice::from_ref(&c)),
            vec![Action::Record { replica: a.replica.id, container_id: "c1".into() }]
        );
        a.deployment.spec.restart_policy = RestartPolicy::OnFailure { max_retries: 0 };
        assert!(matches!(plan(one(&a), std::slice::from_ref(&c))[..], [Action::Record { .. }]));
        c.exit_code = Some(1);
        assert!(matches!(plan(one(&a), std::slice::from_ref(&c))[..], [Action::StartExisting { .. }]));
        assert!(!restart_allowed(RestartPolicy::No, Some(1)));
        assert!(restart_allowed(RestartPolicy::Always, Some(0)));
    }

    #[test]
    fn deleted_and_scaled_down_replicas_are_removed_then_their_rows() {
        let mut a = assignment(ReplicaState::Running, Some("c1"), Some(20000));
        a.deployment.desired_state = DesiredState::Deleted;
        let c = container("c1", Some(a.replica.id), RunState::Running, 20000);
        assert_eq!(
            plan(one(&a), std::slice::from_ref(&c)),
            vec![Action::Remove {
                container_id: "c1".into(),
                replica: Some(a.replica.id),
                delete_row: true,
                reason: RemoveReason::Deleted
            }]
        );
        assert_eq!(
            plan(one(&a), &[]),
            vec![Action::DeleteRow { replica: a.replica.id, reason: RemoveReason::Deleted }]
        );

        let mut b = assignment(ReplicaState::Running, Some("c1"), Some(20000));
        b.replica.replica_index = 2; // the deployment wants 2 replicas: indexes 0 and 1
        let c = container("c1", Some(b.replica.id), RunState::Running, 20000);
        assert!(matches!(
            plan(one(&b), &[c])[..],
            [Action::Remove { reason: RemoveReason::ScaledDown, delete_row: true, .. }]
        ));
    }

    #[test]
    fn stopped_deployments_are_stopped_not_removed() {
        let mut a = assignment(ReplicaState::Running, Some("c1"), Some(20000));
        a.deployment.desired_state = DesiredState::Stopped;
        let c = container("c1", Some(a.replica.id), RunState::Running, 20000);
        assert_eq!(plan(one(&a), &[c]), vec![Action::Stop { replica: a.replica.id, container_id: "c1".into() }]);
        let c = container("c1", Some(a.replica.id), RunState::Exited, 20000);
        assert!(matches!(plan(one(&a), std::slice::from_ref(&c))[..], [Action::Record { .. }]));
        a.replica.status = ReplicaState::Stopped;
        assert!(plan(one(&a), &[c]).is_empty());
    }

    #[test]
    fn a_new_generation_rolls_out_unless_it_failed_already() {
        let mut a = assignment(ReplicaState::Running, Some("c1"), Some(20000));
        a.deployment.generation = 2;
        a.replica.target_generation = 2;
        let c = container("c1", Some(a.replica.id), RunState::Running, 20000);
        assert_eq!(
            plan(one(&a), std::slice::from_ref(&c)),
            vec![Action::Rollout { replica: a.replica.id, container_id: "c1".into() }]
        );
        a.replica.failed_generation = Some(2);
        assert!(plan(one(&a), std::slice::from_ref(&c)).is_empty(), "a rolled-back generation is not retried");
        // Not yet prepared by the orchestrator: wait.
        a.replica.failed_generation = None;
        a.replica.target_generation = 1;
        assert!(plan(one(&a), &[c]).is_empty());
    }

    #[test]
    fn busy_replicas_are_left_alone() {
        let a = assignment(ReplicaState::Pending, None, None);
        let busy = HashSet::from([a.replica.id]);
        // Its new container (from the operation under way) is not an orphan either.
        let c = container("new", Some(a.replica.id), RunState::Running, 20001);
        assert!(plan_with(one(&a), &[c], &busy).is_empty());
    }

    #[test]
    fn orphans_and_duplicates() {
        let a = assignment(ReplicaState::Running, Some("c1"), Some(20000));
        let keep = container("c1", Some(a.replica.id), RunState::Running, 20000);
        let dup = container("c2", Some(a.replica.id), RunState::Running, 20001);
        let orphan = container("c3", Some(ReplicaId::new()), RunState::Running, 20002);
        let unlabelled = container("c4", None, RunState::Running, 20003);
        let actions = plan(one(&a), &[keep, dup, orphan, unlabelled]);
        assert_eq!(actions.len(), 3, "{actions:?}");
        assert!(actions.contains(&Action::Remove {
            container_id: "c2".into(),
            replica: Some(a.replica.id),
            delete_row: false,
            reason: RemoveReason::Duplicate
        }));
        assert!(actions.contains(&Action::Orphan { container_id: "c3".into() }));
        assert!(actions.contains(&Action::Orphan { container_id: "c4".into() }));
    }
}
