//! Desired and observed states, and how a deployment's status follows from the
//! states of its replicas.

use std::fmt;
use std::str::FromStr;

/// A state name stored in the database that this version does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct UnknownState {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident, $kind:literal { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name stored in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownState { kind: $kind, value: s.to_owned() }),
                }
            }
        }
    };
}

text_enum!(
    /// What the user wants for a deployment.
    DesiredState, "desired state" {
        Running => "running",
        Stopped => "stopped",
        Deleted => "deleted",
    }
);

text_enum!(
    /// The observed state of one replica, kept by its node's agent.
    ReplicaState, "replica state" {
        Pending => "pending",
        Creating => "creating",
        Running => "running",
        Stopped => "stopped",
        Failed => "failed",
        Removing => "removing",
    }
);

text_enum!(
    /// A deployment's overall status as users see it.
    DeploymentStatus, "deployment status" {
        Pending => "pending",
        Deploying => "deploying",
        Running => "running",
        Degraded => "degraded",
        Failed => "failed",
        Stopped => "stopped",
        Deleting => "deleting",
    }
);

text_enum!(
    /// A replica's health as its agent last saw it.
    Health, "health" {
        Unknown => "unknown",
        Starting => "starting",
        Healthy => "healthy",
        Unhealthy => "unhealthy",
        None => "none",
    }
);

/// One replica as seen when deriving the deployment's status.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaView<'a> {
    pub state: ReplicaState,
    pub health: Health,
    pub message: Option<&'a str>,
    /// It takes traffic ([`crate::serving::is_serving`]).
    pub serving: bool,
    /// Its index is below the replica count: a replica being scaled away
    /// neither helps nor hurts the status.
    pub wanted: bool,
}

impl ReplicaView<'_> {
    /// Failed, unhealthy, or exited and not restarted while its deployment
    /// should run: why the deployment is not (fully) running.
    fn failure(&self) -> Option<String> {
        let message = self.message.map(str::to_owned);
        match (self.state, self.health) {
            (ReplicaState::Failed, _) => Some(message.unwrap_or_else(|| "a replica failed".to_owned())),
            (ReplicaState::Running, Health::Unhealthy) => {
                Some(message.unwrap_or_else(|| "a replica is unhealthy".to_owned()))
            }
            (ReplicaState::Stopped, _) => Some(message.unwrap_or_else(|| "a replica exited".to_owned())),
            _ => None,
        }
    }
}

/// Derives the status shown to users and a message saying why it is not
/// simply running.
pub fn derive_status(
    desired: DesiredState,
    wanted_replicas: u32,
    replicas: &[ReplicaView<'_>],
) -> (DeploymentStatus, Option<String>) {
    match desired {
        DesiredState::Deleted => return (DeploymentStatus::Deleting, None),
        DesiredState::Stopped => {
            let still = replicas.iter().filter(|r| r.state == ReplicaState::Running).count();
            let message = (still > 0).then(|| format!("stopping: {still} replicas still running"));
            return (DeploymentStatus::Stopped, message);
        }
        DesiredState::Running => {}
    }
    if wanted_replicas == 0 {
        let still = replicas.iter().filter(|r| r.state == ReplicaState::Running).count();
        let message = match still {
            0 => "scaled to 0 replicas: nothing runs; requests are answered 503 until it is scaled up".to_owned(),
            n => format!("scaling to 0 replicas: {n} still running"),
        };
        return (DeploymentStatus::Running, Some(message));
    }
    let wanted: Vec<&ReplicaView<'_>> = replicas.iter().filter(|r| r.wanted).collect();
    if wanted.is_empty() {
        return (DeploymentStatus::Pending, Some("waiting to be placed on a node".to_owned()));
    }
    let running = wanted.iter().filter(|r| r.serving).count() as u32;
    let first_failure = wanted.iter().find_map(|r| r.failure());
    match running {
        n if n >= wanted_replicas => (DeploymentStatus::Running, None),
        0 if first_failure.is_some() => (DeploymentStatus::Failed, first_failure),
        0 => (DeploymentStatus::Deploying, None),
        n => (
            DeploymentStatus::Degraded,
            Some(first_failure.unwrap_or_else(|| format!("{n} of {wanted_replicas} replicas running"))),
        ),
    }
}

/// Where a deployment's latest change stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollout {
    /// Every replica runs the deployment's current generation.
    Complete,
    /// Some replicas still run an older generation.
    InProgress { updated: usize, total: usize },
    /// A replica could not run the current generation and kept the old one.
    RolledBack { message: String },
}

/// One replica as seen when deriving the rollout.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaGeneration<'a> {
    pub generation: i64,
    pub failed_generation: Option<i64>,
    pub rollout_message: Option<&'a str>,
}

/// Derives the state of the rollout to `generation` from the replicas.
pub fn derive_rollout(generation: i64, replicas: &[ReplicaGeneration<'_>]) -> Rollout {
    if let Some(failed) = replicas.iter().find(|r| r.failed_generation == Some(generation)) {
        return Rollout::RolledBack {
            message: failed.rollout_message.unwrap_or("the new version did not become healthy").to_owned(),
        };
    }
    let updated = replicas.iter().filter(|r| r.generation >= generation).count();
    if updated == replicas.len() { Rollout::Complete } else { Rollout::InProgress { updated, total: replicas.len() } }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(state: ReplicaState) -> ReplicaView<'static> {
        checked(state, Health::Healthy, None)
    }

    /// A wanted replica, serving exactly when running and not starting or unhealthy.
    fn checked(state: ReplicaState, health: Health, message: Option<&'static str>) -> ReplicaView<'static> {
        let serving = state == ReplicaState::Running && !matches!(health, Health::Starting | Health::Unhealthy);
        ReplicaView { state, health, message, serving, wanted: true }
    }

    #[test]
    fn rollouts() {
        let at = |generation, failed: Option<i64>| ReplicaGeneration {
            generation,
            failed_generation: failed,
            rollout_message: Some("never healthy"),
        };
        assert_eq!(derive_rollout(2, &[at(2, None), at(2, None)]), Rollout::Complete);
        assert_eq!(derive_rollout(2, &[at(2, None), at(1, None)]), Rollout::InProgress { updated: 1, total: 2 });
        assert_eq!(
            derive_rollout(2, &[at(2, None), at(1, Some(2))]),
            Rollout::RolledBack { message: "never healthy".into() }
        );
        // A failure of an older generation does not count against the new one.
        assert_eq!(derive_rollout(3, &[at(3, Some(2))]), Rollout::Complete);
    }

    #[test]
    fn health_decides_whether_a_running_replica_serves() {
        use DeploymentStatus as D;
        let run = DesiredState::Running;
        let starting = checked(ReplicaState::Running, Health::Starting, None);
        assert_eq!(derive_status(run, 1, &[starting]).0, D::Deploying);
        let sick = checked(ReplicaState::Running, Health::Unhealthy, Some("TCP refused"));
        assert_eq!(derive_status(run, 1, &[sick]), (D::Failed, Some("TCP refused".to_owned())));
        assert_eq!(derive_status(run, 2, &[view(ReplicaState::Running), sick]).0, D::Degraded);
        let unchecked = checked(ReplicaState::Running, Health::None, None);
        assert_eq!(derive_status(run, 1, &[unchecked]).0, D::Running);
    }

    #[test]
    fn stopped_deployments() {
        let (status, message) = derive_status(DesiredState::Stopped, 1, &[view(ReplicaState::Running)]);
        assert_eq!(status, DeploymentStatus::Stopped);
        assert!(message.is_some());
        assert_eq!(derive_status(DesiredState::Stopped, 1, &[view(ReplicaState::Stopped)]).1, None);
    }

    #[test]
    fn names_round_trip() {
        for s in ReplicaState::ALL {
            assert_eq!(s.as_str().parse::<ReplicaState>().unwrap(), *s);
        }
        for s in DesiredState::ALL {
            assert_eq!(s.as_str().parse::<DesiredState>().unwrap(), *s);
        }
        assert!("bogus".parse::<ReplicaState>().is_err());
    }

    #[test]
    fn status_follows_replicas() {
        use DeploymentStatus as D;
        use ReplicaState as R;
        let run = DesiredState::Running;
        assert_eq!(derive_status(run, 1, &[]).0, D::Pending);
        assert_eq!(derive_status(run, 1, &[view(R::Pending)]).0, D::Deploying);
        assert_eq!(derive_status(run, 1, &[view(R::Running)]).0, D::Running);
        assert_eq!(derive_status(run, 2, &[view(R::Running), view(R::Creating)]).0, D::Degraded);
        let failed = checked(R::Failed, Health::Unknown, Some("image not found"));
        let (status, message) = derive_status(run, 1, &[failed]);
        assert_eq!(status, D::Failed);
        assert_eq!(message.as_deref(), Some("image not found"));
        let (status, message) = derive_status(run, 2, &[view(R::Running), failed]);
        assert_eq!(status, D::Degraded);
        assert_eq!(message.as_deref(), Some("image not found"));
        assert_eq!(derive_status(DesiredState::Deleted, 1, &[view(R::Running)]).0, D::Deleting);
    }

    #[test]
    fn an_exit_that_is_not_restarted_fails_the_deployment() {
        let exited = checked(ReplicaState::Stopped, Health::Unknown, Some("exited with code 3"));
        let run = DesiredState::Running;
        assert_eq!(derive_status(run, 1, &[exited]), (DeploymentStatus::Failed, Some("exited with code 3".into())));
        assert_eq!(derive_status(run, 2, &[view(ReplicaState::Running), exited]).0, DeploymentStatus::Degraded);
    }

    #[test]
    fn replicas_being_scaled_away_do_not_count_and_zero_is_a_state() {
        let run = DesiredState::Running;
        let leaving = ReplicaView { wanted: false, serving: false, ..view(ReplicaState::Running) };
        assert_eq!(derive_status(run, 1, &[view(ReplicaState::Running), leaving]), (DeploymentStatus::Running, None));
        let (status, message) = derive_status(run, 0, &[]);
        assert_eq!(status, DeploymentStatus::Running);
        assert!(message.unwrap().starts_with("scaled to 0 replicas"));
        assert!(derive_status(run, 0, &[leaving]).1.unwrap().contains("1 still running"));
    }
}
