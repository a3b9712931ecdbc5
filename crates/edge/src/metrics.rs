//! The edge's own Prometheus metrics: the route table's renders and polls
//! (orchestrators) and the waits for proxies before a container stops
//! (agents).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flotilla_telemetry::{FnCollector, MetricSpec};

pub const RENDERS_TOTAL: &str = "flotilla_edge_renders_total";
pub const RENDER_FAILURES_TOTAL: &str = "flotilla_edge_render_failures_total";
pub const RENDER_SECONDS_TOTAL: &str = "flotilla_edge_render_seconds_total";
pub const ROUTES: &str = "flotilla_edge_routes";
pub const SERVERS: &str = "flotilla_edge_servers";
pub const TABLE_BYTES: &str = "flotilla_edge_table_bytes";
pub const INVALID_ROUTES: &str = "flotilla_edge_invalid_routes";
pub const POLLS_TOTAL: &str = "flotilla_edge_polls_total";
pub const POLLS_HELD_TOTAL: &str = "flotilla_edge_polls_held_total";
pub const POLLS_ANSWERED_UNCHANGED_TOTAL: &str = "flotilla_edge_polls_answered_unchanged_total";
pub const CANARY_CHECKS_TOTAL: &str = "flotilla_edge_canary_checks_total";
pub const CANARY_UNKNOWN_TOTAL: &str = "flotilla_edge_canary_unknown_total";
pub const PROXY_RECORD_FAILURES_TOTAL: &str = "flotilla_edge_proxy_record_failures_total";
pub const SYNC_WAITS_TOTAL: &str = "flotilla_edge_sync_waits_total";
pub const SYNC_TIMEOUTS_TOTAL: &str = "flotilla_edge_sync_timeouts_total";
pub const SYNC_WAIT_SECONDS_TOTAL: &str = "flotilla_edge_sync_wait_seconds_total";

#[derive(Debug, Default)]
pub struct EdgeStats {
    pub renders: AtomicU64,
    pub render_failures: AtomicU64,
    pub render_micros: AtomicU64,
    pub routes: AtomicU64,
    pub servers: AtomicU64,
    pub table_bytes: AtomicU64,
    pub invalid_routes: AtomicU64,
    pub polls: AtomicU64,
    pub polls_held: AtomicU64,
    pub polls_unchanged: AtomicU64,
    pub canary_checks: AtomicU64,
    pub canary_unknown: AtomicU64,
    pub proxy_record_failures: AtomicU64,
    pub sync_waits: AtomicU64,
    pub sync_timeouts: AtomicU64,
    pub sync_wait_micros: AtomicU64,
}

impl EdgeStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The route table's metrics (processes serving it).
pub fn table_collector(stats: &Arc<EdgeStats>) -> FnCollector {
    let read = |f: fn(&EdgeStats) -> &AtomicU64| {
        let stats = stats.clone();
        move || f(&stats).load(Ordering::Relaxed) as f64
    };
    let seconds = |f: fn(&EdgeStats) -> &AtomicU64| {
        let stats = stats.clone();
        move || f(&stats).load(Ordering::Relaxed) as f64 / 1e6
    };
    FnCollector::new(vec![
        MetricSpec::counter(RENDERS_TOTAL, "Route table renders (one per change).", read(|s| &s.renders)),
        MetricSpec::counter(
            RENDER_FAILURES_TOTAL,
            "Route table renders that failed (the last good table is served meanwhile).",
            read(|s| &s.render_failures),
        ),
        MetricSpec::counter(
            RENDER_SECONDS_TOTAL,
            "Time spent reading and rendering the route table.",
            seconds(|s| &s.render_micros),
        ),
        MetricSpec::gauge(ROUTES, "Routers in the route table.", read(|s| &s.routes)),
        MetricSpec::gauge(SERVERS, "Replica servers in the route table.", read(|s| &s.servers)),
        MetricSpec::gauge(
            TABLE_BYTES,
            "Size of the rendered route table (uncompressed JSON).",
            read(|s| &s.table_bytes),
        ),
        MetricSpec::gauge(
            INVALID_ROUTES,
            "Route rows left out because they failed validation.",
            read(|s| &s.invalid_routes),
        ),
        MetricSpec::counter(POLLS_TOTAL, "Route table requests from edge proxies.", read(|s| &s.polls)),
        MetricSpec::counter(
            POLLS_HELD_TOTAL,
            "Route table requests held until the table changed (long polls).",
            read(|s| &s.polls_held),
        ),
        MetricSpec::counter(
            POLLS_ANSWERED_UNCHANGED_TOTAL,
            "Held route table requests answered with the same table at the end of their wait.",
            read(|s| &s.polls_unchanged),
        ),
        MetricSpec::counter(
            CANARY_CHECKS_TOTAL,
            "Health checks of their canary by edge proxies (each says which table the proxy serves).",
            read(|s| &s.canary_checks),
        ),
        MetricSpec::counter(
            CANARY_UNKNOWN_TOTAL,
            "Canary checks naming a proxy or table this process did not send (sent by another orchestrator, \
             or before a restart).",
            read(|s| &s.canary_unknown),
        ),
        MetricSpec::counter(
            PROXY_RECORD_FAILURES_TOTAL,
            "Failed writes of which table a proxy serves (agents then wait for it longer).",
            read(|s| &s.proxy_record_failures),
        ),
    ])
}

/// The waits of an agent for the proxies before it stops a container.
pub fn sync_collector(stats: &Arc<EdgeStats>) -> FnCollector {
    let read = |f: fn(&EdgeStats) -> &AtomicU64| {
        let stats = stats.clone();
        move || f(&stats).load(Ordering::Relaxed) as f64
    };
    let sync_seconds = {
        let stats = stats.clone();
        move || stats.sync_wait_micros.load(Ordering::Relaxed) as f64 / 1e6
    };
    FnCollector::new(vec![
        MetricSpec::counter(
            SYNC_WAITS_TOTAL,
            "Waits for the edge proxies to take a change in before a container stops.",
            read(|s| &s.sync_waits),
        ),
        MetricSpec::counter(
            SYNC_TIMEOUTS_TOTAL,
            "Waits that ran out of time (the container was stopped while a proxy lagged).",
            read(|s| &s.sync_timeouts),
        ),
        MetricSpec::counter(SYNC_WAIT_SECONDS_TOTAL, "Time spent waiting for the edge proxies.", sync_seconds),
    ])
}
