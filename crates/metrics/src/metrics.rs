//! Metric names of the metrics pipeline (what `/metrics` says about it).

use std::sync::Arc;

use flotilla_runtime::breaker::BreakerState;
use flotilla_telemetry::{FnCollector, MetricKind, MetricSpec};

use crate::pipeline::{MetricsPipeline, PipelineSnapshot};

pub const COLLECTIONS_TOTAL: &str = "flotilla_metrics_collections_total";
pub const COLLECTION_FAILURES_TOTAL: &str = "flotilla_metrics_collection_failures_total";
pub const ROUNDS_SKIPPED_TOTAL: &str = "flotilla_metrics_rounds_skipped_total";
pub const CONSECUTIVE_FAILURES: &str = "flotilla_metrics_consecutive_failures";
pub const CONTAINERS: &str = "flotilla_metrics_containers";
pub const CONTAINERS_PROCESSED_TOTAL: &str = "flotilla_metrics_containers_processed_total";
pub const CONTAINERS_FAILED_TOTAL: &str = "flotilla_metrics_containers_failed_total";
pub const READS_TOTAL: &str = "flotilla_metrics_reads_total";
pub const CONTAINER_LISTS_TOTAL: &str = "flotilla_metrics_container_lists_total";
pub const CONTAINER_LISTS_SKIPPED_TOTAL: &str = "flotilla_metrics_container_lists_skipped_total";
pub const SAMPLES_TOTAL: &str = "flotilla_metrics_samples_total";
pub const MINUTES_TOTAL: &str = "flotilla_metrics_minute_aggregates_total";
pub const ROUND_DURATION_SECONDS: &str = "flotilla_metrics_round_duration_seconds";
pub const INTERVAL_SECONDS: &str = "flotilla_metrics_interval_seconds";
pub const LAST_COLLECTION_SECONDS: &str = "flotilla_metrics_last_collection_timestamp_seconds";
pub const BREAKER_STATE: &str = "flotilla_metrics_docker_breaker_state";
pub const BREAKER_FAILURES: &str = "flotilla_metrics_docker_breaker_consecutive_failures";
pub const BREAKER_OPENED_TOTAL: &str = "flotilla_metrics_docker_breaker_opened_total";
pub const DB_BATCHES_TOTAL: &str = "flotilla_metrics_db_batches_written_total";
pub const DB_ROWS_TOTAL: &str = "flotilla_metrics_db_rows_written_total";
pub const DB_WRITE_FAILURES_TOTAL: &str = "flotilla_metrics_db_write_failures_total";
pub const WRITE_BUFFER_ROWS: &str = "flotilla_metrics_write_buffer_rows";
pub const DROPPED_ROWS_TOTAL: &str = "flotilla_metrics_dropped_rows_total";
pub const LAST_WRITE_SECONDS: &str = "flotilla_metrics_last_write_timestamp_seconds";
pub const SUBSCRIBERS: &str = "flotilla_metrics_subscribers";
pub const SLOW_SUBSCRIBERS: &str = "flotilla_metrics_slow_subscribers";
pub const SUBSCRIBER_DROPPED_TOTAL: &str = "flotilla_metrics_subscriber_dropped_samples_total";
pub const CACHE_SAMPLES: &str = "flotilla_metrics_cache_samples";
pub const FEED_DROPPED_ROUNDS_TOTAL: &str = "flotilla_metrics_live_feed_dropped_rounds_total";

/// A collector reading the pipeline's snapshot at scrape time.
pub fn collector(pipeline: &Arc<MetricsPipeline>) -> FnCollector {
    // The collector must not keep the pipeline alive on its own.
    let weak = Arc::downgrade(pipeline);
    let read = move |f: fn(&PipelineSnapshot) -> f64| {
        let weak = weak.clone();
        move || weak.upgrade().map_or(0.0, |p| f(&p.snapshot()))
    };
    let per_source = {
        let weak = Arc::downgrade(pipeline);
        move || {
            weak.upgrade().map_or_else(Vec::new, |p| {
                let s = p.snapshot();
                vec![
                    (vec![("source".to_owned(), "cgroup".to_owned())], s.cgroup_reads_total as f64),
                    (vec![("source".to_owned(), "docker".to_owned())], s.docker_reads_total as f64),
                ]
            })
        }
    };
    let breaker_state = {
        let weak = Arc::downgrade(pipeline);
        move || {
            weak.upgrade().map_or_else(Vec::new, |p| {
                let now = p.snapshot().breaker.state;
                [BreakerState::Closed, BreakerState::HalfOpen, BreakerState::Open]
                    .into_iter()
                    .map(|state| {
                        let name = serde_json::to_value(state).ok().and_then(|v| v.as_str().map(str::to_owned));
                        (vec![("state".to_owned(), name.unwrap_or_default())], f64::from(u8::from(state == now)))
                    })
                    .collect()
            })
        }
    };
    FnCollector::new(vec![
        MetricSpec::counter(
            CONTAINER_LISTS_TOTAL,
            "Rounds that asked the engine for the container list.",
            read(|s| s.container_lists_total as f64),
        ),
        MetricSpec::counter(
            CONTAINER_LISTS_SKIPPED_TOTAL,
            "Rounds on the cgroup path that skipped the container list: no container had started since.",
            read(|s| s.container_lists_skipped_total as f64),
        ),
        MetricSpec::counter(
            COLLECTIONS_TOTAL,
            "Collection rounds that read counters.",
            read(|s| s.collections_total as f64),
        ),
        MetricSpec::counter(
            COLLECTION_FAILURES_TOTAL,
            "Collection rounds that could read nothing.",
            read(|s| s.collection_failures_total as f64),
        ),
        MetricSpec::counter(
            ROUNDS_SKIPPED_TOTAL,
            "Collection rounds skipped because the Docker API circuit breaker was open.",
            read(|s| s.rounds_skipped_total as f64),
        ),
        MetricSpec::gauge(
            CONSECUTIVE_FAILURES,
            "Collection rounds failed or skipped in a row.",
            read(|s| f64::from(s.consecutive_failures)),
        ),
        MetricSpec::gauge(CONTAINERS, "Containers the pipeline currently measures.", read(|s| s.containers as f64)),
        MetricSpec::counter(
            CONTAINERS_PROCESSED_TOTAL,
            "Container readings taken.",
            read(|s| s.containers_processed_total as f64),
        ),
        MetricSpec::counter(
            CONTAINERS_FAILED_TOTAL,
            "Container readings that failed.",
            read(|s| s.containers_failed_total as f64),
        ),
        MetricSpec::labelled(
            READS_TOTAL,
            "Container readings attempted, by source (cgroup files or the Docker stats API).",
            MetricKind::Counter,
            per_source,
        ),
        MetricSpec::counter(SAMPLES_TOTAL, "Samples (per-interval deltas) produced.", read(|s| s.samples_total as f64)),
        MetricSpec::counter(MINUTES_TOTAL, "Minute aggregates closed.", read(|s| s.minutes_total as f64)),
        MetricSpec::gauge(
            ROUND_DURATION_SECONDS,
            "Duration of the last collection round.",
            read(|s| s.last_round_ms / 1000.0),
        ),
        MetricSpec::gauge(
            INTERVAL_SECONDS,
            "The current collection interval (stretched while degraded).",
            read(|s| s.current_interval_ms as f64 / 1000.0),
        ),
        MetricSpec::gauge(
            LAST_COLLECTION_SECONDS,
            "When the last collection round read counters (Unix time).",
            read(|s| s.last_collection_at.map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0)),
        ),
        MetricSpec::labelled(
            BREAKER_STATE,
            "The Docker API circuit breaker's state: 1 for the current one.",
            MetricKind::Gauge,
            breaker_state,
        ),
        MetricSpec::gauge(
            BREAKER_FAILURES,
            "Consecutive Docker API failures seen by the circuit breaker.",
            read(|s| f64::from(s.breaker.consecutive_failures)),
        ),
        MetricSpec::counter(
            BREAKER_OPENED_TOTAL,
            "Times the Docker API circuit breaker opened.",
            read(|s| s.breaker.times_opened as f64),
        ),
        MetricSpec::counter(
            DB_BATCHES_TOTAL,
            "Batches written to the metrics store.",
            read(|s| s.writer.map_or(0.0, |w| w.batches_written as f64)),
        ),
        MetricSpec::counter(
            DB_ROWS_TOTAL,
            "Rows (samples and minute aggregates) written to the metrics store.",
            read(|s| s.writer.map_or(0.0, |w| w.rows_written as f64)),
        ),
        MetricSpec::counter(
            DB_WRITE_FAILURES_TOTAL,
            "Batch writes to the metrics store that failed (and were retried).",
            read(|s| s.writer.map_or(0.0, |w| w.write_failures as f64)),
        ),
        MetricSpec::gauge(
            WRITE_BUFFER_ROWS,
            "Rows waiting in the write buffer.",
            read(|s| s.writer.map_or(0.0, |w| w.buffered_rows as f64)),
        ),
        MetricSpec::counter(
            DROPPED_ROWS_TOTAL,
            "Rows dropped because the write buffer was full.",
            read(|s| s.writer.map_or(0.0, |w| w.dropped_rows as f64)),
        ),
        MetricSpec::gauge(
            LAST_WRITE_SECONDS,
            "When the last batch was written to the metrics store (Unix time).",
            read(|s| s.last_write_at.map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0)),
        ),
        MetricSpec::gauge(SUBSCRIBERS, "Live subscribers on this process.", read(|s| s.subscribers.active as f64)),
        MetricSpec::gauge(
            SLOW_SUBSCRIBERS,
            "Live subscribers that lost samples at the last publish.",
            read(|s| s.subscribers.slow as f64),
        ),
        MetricSpec::counter(
            SUBSCRIBER_DROPPED_TOTAL,
            "Samples slow subscribers lost (their oldest, to keep up).",
            read(|s| s.subscribers.dropped as f64),
        ),
        MetricSpec::gauge(CACHE_SAMPLES, "Samples held in the live cache.", read(|s| s.cache_samples as f64)),
        MetricSpec::counter(
            FEED_DROPPED_ROUNDS_TOTAL,
            "Rounds of live samples not sent to Redis because the publisher was behind.",
            read(|s| s.live_feed_dropped_rounds as f64),
        ),
    ])
}
