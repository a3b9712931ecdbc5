//! Flotilla's metrics pipeline. On every node the agent's process measures
//! every managed container every 5 s (configurable):
//!
//! ```text
//! list (Docker, behind a circuit breaker)
//!   -> read counters: cgroup files (fast path) | Docker one-shot stats (fallback)
//!   -> exact per-interval deltas (DeltaTracker)
//!   -> live view: 5-minute cache + bounded subscriber queues; Redis pub/sub to API processes
//!   -> minute aggregates (MinuteAggregator)
//!   -> writer: bounded buffer, batched writes, retries with backoff, drops counted
//! ```
//!
//! Nothing here blocks collection: subscribers, Redis and the database each
//! have their own bounded buffer, and whatever has to be dropped is counted
//! and shown on `/metrics` and `/metrics/observability`.

pub mod cache;
pub mod cgroup;
pub mod hub;
pub mod maintenance;
pub mod metrics;
pub mod pipeline;
pub mod remote;
pub mod source;
pub mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use cache::LiveCache;
pub use flotilla_runtime::breaker::BreakerConfig;
pub use hub::{Filter, Hub, HubStats, Subscription};
pub use pipeline::{MetricsPipeline, PipelineSnapshot, RoundReport};
pub use source::SourceKind;
pub use writer::{Batch, Writer, WriterStats};

/// Which source the pipeline reads counters from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceChoice {
    /// The cgroup files when the host's cgroup filesystem is visible (each
    /// container whose cgroup cannot be found goes through Docker).
    #[default]
    Auto,
    Cgroup,
    Docker,
}

impl std::str::FromStr for SourceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cgroup" => Ok(Self::Cgroup),
            "docker" => Ok(Self::Docker),
            other => Err(format!("unknown metrics source {other:?} (expected auto, cgroup or docker)")),
        }
    }
}

/// How the pipeline runs.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Time between collection rounds when all is well.
    pub interval: Duration,
    /// The longest the interval stretches to when rounds overrun or the
    /// Docker API is failing.
    pub max_interval: Duration,
    pub source: SourceChoice,
    /// The host's cgroup filesystem (mounted read-only into the agent's container).
    pub cgroup_root: PathBuf,
    /// The host's `/proc` (network counters are read per container process).
    pub proc_root: PathBuf,
    /// Docker calls in flight at once on the fallback path.
    pub docker_parallelism: usize,
    /// Longest a single Docker call may take.
    pub docker_timeout: Duration,
    /// On the cgroup path the container list is asked of the engine only
    /// when a container starts (from the events stream), when that stream
    /// broke, and at least this often; other rounds cost the engine nothing.
    pub full_list_every: Duration,
    pub breaker: BreakerConfig,
    /// How much history the live cache keeps per container.
    pub cache_window: Duration,
    /// Samples a subscriber may have queued before it loses the oldest.
    pub subscriber_queue: usize,
    /// Rows the write buffer holds at most (while the database is away).
    pub write_buffer_rows: usize,
    /// Consecutive failed rounds after which `/health` says `failed`.
    pub failures_for_unhealthy: u32,
    /// How long after a minute ends its aggregate waits for late samples
    /// (containers that stopped, a stretched interval).
    pub minute_grace: Duration,
    /// Whether raw 5-second samples are stored (minute aggregates always are).
    pub store_samples: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            max_interval: Duration::from_secs(60),
            source: SourceChoice::Auto,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            proc_root: PathBuf::from("/proc"),
            docker_parallelism: 8,
            docker_timeout: Duration::from_secs(10),
            full_list_every: Duration::from_secs(120),
            breaker: BreakerConfig::default(),
            cache_window: Duration::from_secs(300),
            subscriber_queue: 256,
            // Two hours of minute aggregates for 1,000 containers, or 10
            // minutes of raw samples and minutes together.
            write_buffer_rows: 150_000,
            failures_for_unhealthy: 3,
            minute_grace: Duration::from_secs(15),
            store_samples: true,
        }
    }
}

/// The live side: the recent samples and the subscribers. The pipeline
/// feeds one on each agent; an API process feeds its own from Redis.
#[derive(Debug)]
pub struct LiveView {
    pub cache: LiveCache,
    pub hub: Hub,
    subscriber_queue: usize,
    /// Messages from other processes that could not be decoded.
    pub undecodable: std::sync::atomic::AtomicU64,
}

impl LiveView {
    pub fn new(cache_window: Duration, interval: Duration, subscriber_queue: usize) -> Self {
        let per_container = (cache_window.as_millis() / interval.as_millis().max(1)) as usize + 2;
        Self {
            cache: LiveCache::new(cache_window.as_millis() as i64, per_container),
            hub: Hub::default(),
            subscriber_queue,
            undecodable: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn from_config(config: &MetricsConfig) -> Arc<Self> {
        Arc::new(Self::new(config.cache_window, config.interval, config.subscriber_queue))
    }

    /// Hands samples to the cache and to every subscriber.
    pub fn publish(&self, samples: &[Arc<flotilla_types::metrics::Sample>], now_ms: i64) {
        self.cache.push(samples, now_ms);
        self.hub.publish(samples);
    }

    /// A new subscriber with the configured queue size.
    pub fn subscribe(&self, filter: Filter) -> Subscription {
        self.hub.subscribe(filter, self.subscriber_queue)
    }
}

/// A sample for unit tests.
#[cfg(test)]
pub(crate) fn test_sample(
    container: &str,
    deployment: flotilla_types::DeploymentId,
    time_ms: i64,
) -> flotilla_types::metrics::Sample {
    flotilla_types::metrics::Sample {
        key: flotilla_types::metrics::SampleKey {
            container_id: container.to_owned(),
            deployment_id: deployment,
            organization_id: None,
            replica_index: 0,
        },
        time_ms,
        interval_ms: 5_000,
        cpu_cores: 0.25,
        cpu_percent_of_limit: 25.0,
        memory_bytes: 1 << 20,
        memory_limit_bytes: 0,
        net_rx_bytes: 100,
        net_tx_bytes: 50,
        blk_read_bytes: 0,
        blk_write_bytes: 0,
        pids: 1,
    }
}
