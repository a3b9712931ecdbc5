//! Metric names of the orchestrator.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flotilla_telemetry::{FnCollector, MetricSpec};

pub const ROUNDS_TOTAL: &str = "flotilla_orchestrator_rounds_total";
pub const ROUND_FAILURES_TOTAL: &str = "flotilla_orchestrator_round_failures_total";
pub const REPLICAS_PLACED_TOTAL: &str = "flotilla_orchestrator_replicas_placed_total";
pub const PLACEMENTS_UNSCHEDULABLE_TOTAL: &str = "flotilla_orchestrator_placements_unschedulable_total";
pub const DEPLOYMENTS_FINALIZED_TOTAL: &str = "flotilla_orchestrator_deployments_finalized_total";
pub const LEADER: &str = "flotilla_orchestrator_leader";
pub const LEADERSHIP_CHANGES_TOTAL: &str = "flotilla_orchestrator_leadership_changes_total";
pub const NODES_DOWN_TOTAL: &str = "flotilla_orchestrator_nodes_down_total";
pub const REPLICAS_EVICTED_TOTAL: &str = "flotilla_orchestrator_replicas_evicted_total";
pub const NODE_PROBES_TOTAL: &str = "flotilla_orchestrator_node_probes_total";
pub const NODES_UNREACHABLE_TOTAL: &str = "flotilla_orchestrator_nodes_unreachable_total";
pub const REPLICAS_RETIRED_TOTAL: &str = "flotilla_orchestrator_replicas_retired_total";

#[derive(Debug, Default)]
pub struct OrchestratorStats {
    pub rounds: AtomicU64,
    pub round_failures: AtomicU64,
    pub replicas_placed: AtomicU64,
    pub unschedulable: AtomicU64,
    pub finalized: AtomicU64,
    /// 1 while this replica holds the lease.
    pub leader: AtomicU64,
    pub leadership_changes: AtomicU64,
    pub nodes_down: AtomicU64,
    pub evicted: AtomicU64,
    pub retired: AtomicU64,
    /// Agents of silent nodes asked whether they are alive.
    pub node_probes: AtomicU64,
    /// Of those, nodes found unreachable and marked down early.
    pub nodes_unreachable: AtomicU64,
}

pub fn collector(stats: &Arc<OrchestratorStats>) -> FnCollector {
    let read = |f: fn(&OrchestratorStats) -> &AtomicU64| {
        let stats = stats.clone();
        move || f(&stats).load(Ordering::Relaxed) as f64
    };
    FnCollector::new(vec![
        MetricSpec::counter(ROUNDS_TOTAL, "Placement rounds run.", read(|s| &s.rounds)),
        MetricSpec::counter(
            ROUND_FAILURES_TOTAL,
            "Placement rounds that failed (database unreachable).",
            read(|s| &s.round_failures),
        ),
        MetricSpec::counter(REPLICAS_PLACED_TOTAL, "Replicas placed on nodes.", read(|s| &s.replicas_placed)),
        MetricSpec::counter(
            PLACEMENTS_UNSCHEDULABLE_TOTAL,
            "Replicas that found no node to run on in a round.",
            read(|s| &s.unschedulable),
        ),
        MetricSpec::counter(
            DEPLOYMENTS_FINALIZED_TOTAL,
            "Deleted deployments removed once their replicas were gone.",
            read(|s| &s.finalized),
        ),
        MetricSpec::gauge(LEADER, "1 while this orchestrator holds the leader lease.", read(|s| &s.leader)),
        MetricSpec::counter(
            LEADERSHIP_CHANGES_TOTAL,
            "Times this orchestrator became or stopped being the leader.",
            read(|s| &s.leadership_changes),
        ),
        MetricSpec::counter(
            NODES_DOWN_TOTAL,
            "Nodes marked down (heartbeats missed, or agent unreachable).",
            read(|s| &s.nodes_down),
        ),
        MetricSpec::counter(
            NODE_PROBES_TOTAL,
            "Agents of silent nodes asked directly whether they are alive.",
            read(|s| &s.node_probes),
        ),
        MetricSpec::counter(
            NODES_UNREACHABLE_TOTAL,
            "Probes of silent nodes that found the agent unreachable, its engine away, or the node fenced.",
            read(|s| &s.nodes_unreachable),
        ),
        MetricSpec::counter(
            REPLICAS_EVICTED_TOTAL,
            "Replica rows taken off down nodes to be placed elsewhere.",
            read(|s| &s.evicted),
        ),
        MetricSpec::counter(
            REPLICAS_RETIRED_TOTAL,
            "Replicas on drained nodes retired once their replacement was healthy.",
            read(|s| &s.retired),
        ),
    ])
}
