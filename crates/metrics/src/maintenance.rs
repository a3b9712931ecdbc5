//! The metrics store's maintenance job (run by the orchestrator): partitions
//! for the coming days, hourly usage rolled up from the minutes, expired
//! partitions dropped. Idempotent; reports each pass like a reconciler.

use std::time::Duration;

use chrono::Utc;
use flotilla_runtime::{Next, PeriodicTask, run_periodically};
use flotilla_store::metrics::{MetricsStore, Retention};
use flotilla_telemetry::Telemetry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The component name the job reports as.
pub const COMPONENT: &str = "metrics-maintenance";

/// Runs one pass now and reports it.
pub async fn run_pass(store: &MetricsStore, retention: Retention, telemetry: &Telemetry) -> Next {
    let started = std::time::Instant::now();
    match store.maintain(Utc::now(), retention).await {
        Ok(report) => {
            let detail = serde_json::json!({
                "backend": store.backend(),
                "duration_ms": started.elapsed().as_secs_f64() * 1000.0,
                "report": report,
            });
            telemetry.health.report_pass(COMPONENT, None, detail);
            Next::Interval
        }
        Err(error) => {
            tracing::warn!(%error, "metrics maintenance failed");
            telemetry.health.report_pass(COMPONENT, Some(&error.to_string()), serde_json::json!({}));
            Next::RetrySoon
        }
    }
}

/// The job on its timer until `cancel`.
pub fn spawn(
    store: MetricsStore,
    retention: Retention,
    interval: Duration,
    telemetry: Telemetry,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    let task = PeriodicTask { name: COMPONENT, interval, wake: None, pass_at_start: true };
    tracker.spawn(run_periodically(task, cancel, move || {
        let (store, telemetry) = (store.clone(), telemetry.clone());
        async move { run_pass(&store, retention, &telemetry).await }
    }));
}
