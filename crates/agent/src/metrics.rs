//! Metric names of the node agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flotilla_telemetry::{FnCollector, MetricSpec};

use crate::events::{EventFeed, EventStats};

pub const RECONCILE_PASSES_TOTAL: &str = "flotilla_agent_reconcile_passes_total";
pub const RECONCILE_FAILURES_TOTAL: &str = "flotilla_agent_reconcile_failures_total";
pub const RECONCILE_LAST_DURATION_SECONDS: &str = "flotilla_agent_reconcile_last_duration_seconds";
pub const CONTAINERS_CREATED_TOTAL: &str = "flotilla_agent_containers_created_total";
pub const CONTAINERS_REMOVED_TOTAL: &str = "flotilla_agent_containers_removed_total";
pub const CONTAINERS_STOPPED_TOTAL: &str = "flotilla_agent_containers_stopped_total";
pub const REPLICAS_FENCED_TOTAL: &str = "flotilla_agent_replicas_fenced_total";
pub const REPLICA_FAILURES_TOTAL: &str = "flotilla_agent_replica_failures_total";
pub const HEARTBEATS_TOTAL: &str = "flotilla_agent_heartbeats_total";
pub const ROLLOUTS_TOTAL: &str = "flotilla_agent_rollouts_total";
pub const ROLLBACKS_TOTAL: &str = "flotilla_agent_rollbacks_total";
pub const CONTAINERS_ADOPTED_TOTAL: &str = "flotilla_agent_containers_adopted_total";
pub const ORPHANS_REMOVED_TOTAL: &str = "flotilla_agent_orphans_removed_total";
pub const EVENTS_TOTAL: &str = "flotilla_agent_docker_events_total";
pub const EVENTS_DROPPED_TOTAL: &str = "flotilla_agent_docker_events_dropped_total";
pub const EVENT_RECONNECTS_TOTAL: &str = "flotilla_agent_docker_event_reconnects_total";
pub const HEARTBEAT_FAILURES_TOTAL: &str = "flotilla_agent_heartbeat_failures_total";

/// Counters the agent keeps.
#[derive(Debug, Default)]
pub struct AgentStats {
    pub passes: AtomicU64,
    pub pass_failures: AtomicU64,
    pub last_pass_micros: AtomicU64,
    pub containers_created: AtomicU64,
    pub containers_removed: AtomicU64,
    pub containers_stopped: AtomicU64,
    pub replicas_fenced: AtomicU64,
    pub replica_failures: AtomicU64,
    pub heartbeats: AtomicU64,
    pub heartbeat_failures: AtomicU64,
    pub rollouts: AtomicU64,
    pub rollbacks: AtomicU64,
    pub adopted: AtomicU64,
    pub orphans_removed: AtomicU64,
}

pub fn collector(stats: &Arc<AgentStats>, events: &Arc<EventFeed>) -> FnCollector {
    let read = |f: fn(&AgentStats) -> &AtomicU64| {
        let stats = stats.clone();
        move || f(&stats).load(Ordering::Relaxed) as f64
    };
    let last = stats.clone();
    let event = |f: fn(EventStats) -> u64| {
        let events = events.clone();
        move || f(events.stats()) as f64
    };
    FnCollector::new(vec![
        MetricSpec::counter(RECONCILE_PASSES_TOTAL, "Reconciliation passes run.", read(|s| &s.passes)),
        MetricSpec::counter(
            RECONCILE_FAILURES_TOTAL,
            "Reconciliation passes that failed (engine or database unreachable).",
            read(|s| &s.pass_failures),
        ),
        MetricSpec::gauge(RECONCILE_LAST_DURATION_SECONDS, "Duration of the last reconciliation pass.", move || {
            last.last_pass_micros.load(Ordering::Relaxed) as f64 / 1e6
        }),
        MetricSpec::counter(
            CONTAINERS_CREATED_TOTAL,
            "Containers created for replicas.",
            read(|s| &s.containers_created),
        ),
        MetricSpec::counter(
            CONTAINERS_REMOVED_TOTAL,
            "Containers stopped and removed.",
            read(|s| &s.containers_removed),
        ),
        MetricSpec::counter(
            CONTAINERS_STOPPED_TOTAL,
            "Containers of stopped deployments stopped (and kept).",
            read(|s| &s.containers_stopped),
        ),
        MetricSpec::counter(
            REPLICAS_FENCED_TOTAL,
            "Replicas stopped because this node was cut off from the control database and most nodes.",
            read(|s| &s.replicas_fenced),
        ),
        MetricSpec::counter(
            REPLICA_FAILURES_TOTAL,
            "Replicas that could not be started (bad image, no port, engine refused).",
            read(|s| &s.replica_failures),
        ),
        MetricSpec::counter(HEARTBEATS_TOTAL, "Node heartbeats written.", read(|s| &s.heartbeats)),
        MetricSpec::counter(HEARTBEAT_FAILURES_TOTAL, "Node heartbeats that failed.", read(|s| &s.heartbeat_failures)),
        MetricSpec::counter(ROLLOUTS_TOTAL, "Replicas replaced by a newer generation.", read(|s| &s.rollouts)),
        MetricSpec::counter(
            ROLLBACKS_TOTAL,
            "Replica updates rolled back because the new container never became healthy.",
            read(|s| &s.rollbacks),
        ),
        MetricSpec::counter(
            CONTAINERS_ADOPTED_TOTAL,
            "Managed containers found without their row and given one back.",
            read(|s| &s.adopted),
        ),
        MetricSpec::counter(
            ORPHANS_REMOVED_TOTAL,
            "Managed containers removed because their deployment was gone.",
            read(|s| &s.orphans_removed),
        ),
        MetricSpec::counter(EVENTS_TOTAL, "Docker container events received.", event(|e| e.received)),
        MetricSpec::counter(
            EVENTS_DROPPED_TOTAL,
            "Docker events dropped from the agent's full buffer (a pass covers them).",
            event(|e| e.dropped),
        ),
        MetricSpec::counter(
            EVENT_RECONNECTS_TOTAL,
            "Times the Docker events stream broke and was resubscribed.",
            event(|e| e.reconnects),
        ),
    ])
}
