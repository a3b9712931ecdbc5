//! What "serving" means: a replica the edge may send requests to. This is
//! the one definition; its SQL twin, `flotilla_store::serving::SERVING`,
//! selects the route table's servers, and a store test checks that the two
//! agree on every combination of the facts below.

use crate::status::Health;
use crate::{DesiredState, ReplicaState};

/// What decides whether one replica serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServingFacts {
    /// Its deployment's desired state.
    pub desired: DesiredState,
    /// How many replicas its deployment wants: an index at or above it is
    /// being scaled away.
    pub wanted_replicas: u32,
    pub replica_index: i32,
    pub state: ReplicaState,
    pub health: Health,
    /// Moved off its node (a drain) and replaced: stopped soon.
    pub retiring: bool,
    /// Its node's address and host port are known.
    pub has_endpoint: bool,
    /// Its node is `ready`, or `down` without having been found
    /// unreachable: alive but cut off from the database (its agent answers
    /// the orchestrator), or its agent stopped for an update. A node whose
    /// agent (or engine) did not answer is not sent requests.
    pub node_reachable: bool,
}

/// A replica serves when its deployment runs and still wants it, it runs,
/// is neither starting nor unhealthy, is not being retired, has an address,
/// and its node is ready.
pub fn is_serving(facts: &ServingFacts) -> bool {
    facts.desired == DesiredState::Running
        && i64::from(facts.replica_index) < i64::from(facts.wanted_replicas)
        && facts.state == ReplicaState::Running
        && !matches!(facts.health, Health::Starting | Health::Unhealthy)
        && !facts.retiring
        && facts.has_endpoint
        && facts.node_reachable
}

/// Every combination of facts worth telling apart (for tests of the twins).
pub fn all_combinations() -> Vec<ServingFacts> {
    let mut all = Vec::new();
    for desired in DesiredState::ALL {
        for (wanted_replicas, replica_index) in [(2, 0), (2, 1), (1, 1), (0, 0)] {
            for state in ReplicaState::ALL {
                for health in Health::ALL {
                    for bits in 0..8u8 {
                        all.push(ServingFacts {
                            desired: *desired,
                            wanted_replicas,
                            replica_index,
                            state: *state,
                            health: *health,
                            retiring: bits & 1 != 0,
                            has_endpoint: bits & 2 != 0,
                            node_reachable: bits & 4 != 0,
                        });
                    }
                }
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving() -> ServingFacts {
        ServingFacts {
            desired: DesiredState::Running,
            wanted_replicas: 2,
            replica_index: 1,
            state: ReplicaState::Running,
            health: Health::Healthy,
            retiring: false,
            has_endpoint: true,
            node_reachable: true,
        }
    }

    #[test]
    fn each_fact_can_take_a_replica_out() {
        assert!(is_serving(&serving()));
        assert!(is_serving(&ServingFacts { health: Health::None, ..serving() }), "no check: serves once running");
        for out in [
            ServingFacts { desired: DesiredState::Stopped, ..serving() },
            ServingFacts { wanted_replicas: 1, ..serving() },
            ServingFacts { state: ReplicaState::Creating, ..serving() },
            ServingFacts { health: Health::Starting, ..serving() },
            ServingFacts { health: Health::Unhealthy, ..serving() },
            ServingFacts { retiring: true, ..serving() },
            ServingFacts { has_endpoint: false, ..serving() },
            ServingFacts { node_reachable: false, ..serving() },
        ] {
            assert!(!is_serving(&out), "{out:?}");
        }
        assert_eq!(
            all_combinations().iter().filter(|f| is_serving(f)).count(),
            2 * 3,
            "2 indexes x unknown/healthy/none"
        );
    }
}
