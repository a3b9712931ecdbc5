//! The collector: one round every interval, a watchdog that keeps `/health`
//! honest even when a round hangs, and the tasks that feed Redis and the
//! database from bounded buffers.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use flotilla_docker::{ContainerRuntime, DockerClient, ManagedContainer};
use flotilla_redis::{LiveFeed, LiveFeedStats};
use flotilla_runtime::breaker::{BreakerState, CircuitBreaker};
use flotilla_store::metrics::MetricsStore;
use flotilla_telemetry::{Health, Telemetry};
use flotilla_types::metrics::{DeltaTracker, Limits, MinuteAggregator, Sample, SampleKey};
use flotilla_types::{DeploymentId, NodeId, labels};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cgroup::{CgroupReader, CgroupVersion};
use crate::source::{CgroupSource, DockerSource, ReadError, Reading, SourceKind, StatsSource, Target};
use crate::writer::{Batch, Writer, WriterStats};
use crate::{HubStats, LiveView, MetricsConfig, SourceChoice};

/// The health component the pipeline reports as.
pub const COMPONENT: &str = "metrics";

/// Rounds whose live samples may wait for Redis before the oldest is dropped.
const FEED_QUEUE_ROUNDS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "metrics source 'cgroup' was asked for, but {root} is not a cgroup filesystem this agent can read \
         (mount the host's /sys/fs/cgroup, or use --metrics-source auto)"
    )]
    NoCgroupFilesystem { root: String },
}

/// What a round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundOutcome {
    /// Counters were read (possibly only through cgroups while Docker was away).
    Collected,
    /// Nothing could be read.
    Failed,
    /// The breaker was open and there was no other way to read.
    Skipped,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub outcome: RoundOutcome,
    /// Containers read successfully.
    pub containers: usize,
    /// Containers that could not be read.
    pub failures: usize,
    pub samples: usize,
    pub minutes: usize,
    pub duration: Duration,
    /// Whether the container list came from the engine this round.
    pub listed: bool,
    /// The list was not needed: no container started since the last one.
    pub list_skipped: bool,
    pub error: Option<String>,
}

/// A container the collector reads.
#[derive(Debug, Clone)]
struct Known {
    key: SampleKey,
    target: Target,
    /// Its start time: a new one means its counters began again at zero.
    incarnation: String,
}

#[derive(Debug, Default)]
struct RoundState {
    known: HashMap<String, Known>,
    tracker: DeltaTracker,
    aggregator: MinuteAggregator,
    listed_at: Option<Instant>,
}

/// What the events stream tells the collector: whether the container set
/// may have grown since the last list.
#[derive(Debug)]
struct ListSignal {
    /// A container started, the stream broke, or nothing was listed yet.
    wanted: AtomicBool,
    /// The stream is followed; without it every round lists.
    following: AtomicBool,
    /// Unix nanoseconds of the last event seen: a new subscription starts
    /// there, so nothing between two is missed.
    since_nanos: AtomicI64,
    lists: AtomicU64,
    lists_skipped: AtomicU64,
}

#[derive(Debug, Default)]
struct Counters {
    collections: AtomicU64,
    collection_failures: AtomicU64,
    rounds_skipped: AtomicU64,
    consecutive_failures: AtomicU32,
    containers_processed: AtomicU64,
    containers_failed: AtomicU64,
    docker_reads: AtomicU64,
    cgroup_reads: AtomicU64,
    samples: AtomicU64,
    minutes: AtomicU64,
    containers_known: AtomicUsize,
    last_round_micros: AtomicU64,
    /// Milliseconds since the epoch; 0 before the first collection.
    last_collection_ms: AtomicI64,
    current_interval_ms: AtomicU64,
    feed_dropped_rounds: AtomicU64,
}

/// A snapshot for `/metrics/observability` and `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineSnapshot {
    pub node_id: String,
    pub source: SourceKind,
    pub cgroup_version: Option<CgroupVersion>,
    pub interval_ms: u64,
    pub current_interval_ms: u64,
    pub collections_total: u64,
    pub collections_per_second: f64,
    pub collection_failures_total: u64,
    pub consecutive_failures: u32,
    pub rounds_skipped_total: u64,
    pub containers: usize,
    pub containers_processed_total: u64,
    pub containers_failed_total: u64,
    pub cgroup_reads_total: u64,
    pub docker_reads_total: u64,
    /// Rounds that asked the engine for the container list, and rounds that
    /// did not need to (no container started since).
    pub container_lists_total: u64,
    pub container_lists_skipped_total: u64,
    pub following_events: bool,
    pub samples_total: u64,
    pub minutes_total: u64,
    pub last_round_ms: f64,
    pub last_collection_at: Option<DateTime<Utc>>,
    pub breaker: BreakerSnapshot,
    pub writer: Option<WriterStats>,
    pub last_write_at: Option<DateTime<Utc>>,
    pub subscribers: HubStats,
    pub cache_containers: usize,
    pub cache_samples: usize,
    pub live_feed: Option<LiveFeedStats>,
    pub live_feed_dropped_rounds: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    pub consecutive_failures: u32,
    pub times_opened: u64,
}

/// The metrics pipeline of one node.
#[derive(Debug)]
pub struct MetricsPipeline {
    config: MetricsConfig,
    node_id: NodeId,
    host_cores: f64,
    docker: DockerClient,
    cgroup: Option<CgroupSource>,
    docker_source: DockerSource,
    live: Arc<LiveView>,
    writer: Option<Arc<Writer>>,
    feed: Option<LiveFeed>,
    feed_queue: OnceLock<mpsc::Sender<Vec<(String, String)>>>,
    state: tokio::sync::Mutex<RoundState>,
    breaker: Mutex<CircuitBreaker>,
    counters: Counters,
    recent_rounds: Mutex<VecDeque<Instant>>,
    list_signal: ListSignal,
    started: Instant,
    telemetry: Telemetry,
}

impl MetricsPipeline {
    /// A pipeline for `node_id`'s containers; `store` is where aggregates
    /// go (none: live only), `feed` where live samples go across processes.
    pub async fn new(
        config: MetricsConfig,
        node_id: NodeId,
        docker: DockerClient,
        store: Option<MetricsStore>,
        feed: Option<LiveFeed>,
        telemetry: Telemetry,
    ) -> Result<Arc<Self>, MetricsError> {
        let cgroup = match config.source {
            SourceChoice::Docker => None,
            choice => match CgroupReader::detect(&config.cgroup_root, &config.proc_root) {
                Some(reader) => Some(CgroupSource { reader }),
                None if choice == SourceChoice::Cgroup => {
                    return Err(MetricsError::NoCgroupFilesystem { root: config.cgroup_root.display().to_string() });
                }
                None => None,
            },
        };
        let host_cores = match tokio::time::timeout(config.docker_timeout, docker.info()).await {
            Ok(Ok(info)) if info.cpus > 0 => info.cpus as f64,
            _ => std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
        };
        let writer = store.map(|store| Arc::new(Writer::new(node_id.to_string(), store, config.write_buffer_rows)));
        let docker_source = DockerSource {
            docker: docker.clone(),
            parallelism: config.docker_parallelism,
            timeout: config.docker_timeout,
        };
        tracing::info!(
            node.id = %node_id,
            source = ?cgroup.as_ref().map_or(SourceKind::Docker, |_| SourceKind::Cgroup),
            cgroup = ?cgroup.as_ref().map(|c| c.reader.version()),
            interval = ?config.interval,
            "metrics pipeline ready"
        );
        let pipeline = Arc::new(Self {
            live: LiveView::from_config(&config),
            breaker: Mutex::new(CircuitBreaker::new(config.breaker)),
            counters: Counters { current_interval_ms: AtomicU64::new(millis(config.interval)), ..Counters::default() },
            config,
            node_id,
            host_cores,
            docker,
            cgroup,
            docker_source,
            writer,
            feed,
            feed_queue: OnceLock::new(),
            state: tokio::sync::Mutex::new(RoundState::default()),
            recent_rounds: Mutex::new(VecDeque::new()),
            list_signal: ListSignal {
                wanted: AtomicBool::new(true),
                following: AtomicBool::new(false),
                since_nanos: AtomicI64::new(Utc::now().timestamp_nanos_opt().unwrap_or_default()),
                lists: AtomicU64::new(0),
                lists_skipped: AtomicU64::new(0),
            },
            started: Instant::now(),
            telemetry: telemetry.clone(),
        });
        telemetry.register(Box::new(crate::metrics::collector(&pipeline)));
        pipeline.report_health();
        Ok(pipeline)
    }

    /// The samples of this node: the cache and the subscribers.
    pub fn live(&self) -> &Arc<LiveView> {
        &self.live
    }

    pub fn writer(&self) -> Option<&Arc<Writer>> {
        self.writer.as_ref()
    }

    pub fn source(&self) -> SourceKind {
        if self.cgroup.is_some() { SourceKind::Cgroup } else { SourceKind::Docker }
    }

    pub fn current_interval(&self) -> Duration {
        Duration::from_millis(self.counters.current_interval_ms.load(Ordering::Relaxed))
    }

    /// Starts the collector, the watchdog, the writer and the live feed
    /// publisher; they stop on `cancel`, the collector handing its open
    /// minutes to the writer first and the writer flushing last.
    pub fn spawn(self: &Arc<Self>, tracker: &TaskTracker, cancel: CancellationToken) {
        let writer_cancel = CancellationToken::new();
        if let Some(writer) = &self.writer {
            tracker.spawn(writer.clone().run(writer_cancel.clone()));
        }
        if let Some(feed) = self.feed.clone() {
            let (tx, mut rx) = mpsc::channel::<Vec<(String, String)>>(FEED_QUEUE_ROUNDS);
            let _ = self.feed_queue.set(tx);
            let cancel = cancel.clone();
            tracker.spawn(async move {
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        next = rx.recv() => match next {
                            Some(messages) => feed.publish(&messages).await,
                            None => return,
                        },
                    }
                }
            });
        }
        let watchdog = self.clone();
        let watchdog_cancel = cancel.clone();
        tracker.spawn(async move {
            loop {
                watchdog.report_health();
                tokio::select! {
                    () = watchdog_cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        if self.cgroup.is_some() {
            tracker.spawn(self.clone().follow_events(cancel.clone()));
        }
        let collector = self.clone();
        tracker.spawn(async move {
            collector.run(cancel).await;
            writer_cancel.cancel();
        });
    }

    /// Follows the node's container events until `cancel` so that rounds on
    /// the cgroup path list containers only when one started. Public for
    /// benchmarks; [`Self::spawn`] starts it.
    pub async fn follow_events(self: Arc<Self>, cancel: CancellationToken) {
        let signal = &self.list_signal;
        let mut delays = flotilla_runtime::retry::delays(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let since = signal.since_nanos.load(Ordering::Relaxed);
            let mut stream = self.docker.container_events(&self.node_id, Some(since));
            signal.following.store(true, Ordering::SeqCst);
            let ended = loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    item = stream.next() => match item {
                        Some(Ok(event)) => {
                            signal.since_nanos.fetch_max(event.time_nanos, Ordering::Relaxed);
                            // Health-check execs and the like say nothing new about the set;
                            // stops and restarts are seen by the reads themselves.
                            if event.action == "start" {
                                signal.wanted.store(true, Ordering::SeqCst);
                            }
                        }
                        Some(Err(error)) => break error.to_string(),
                        None => break "the engine closed the stream".to_owned(),
                    }
                }
            };
            signal.following.store(false, Ordering::SeqCst);
            signal.wanted.store(true, Ordering::SeqCst);
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            tracing::debug!(error = %ended, retry_in = ?delay, "metrics: container events stream broke; listing every round until it is back");
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Whether this round must ask the engine for the container list.
    fn list_needed(&self, state: &RoundState) -> bool {
        let signal = &self.list_signal;
        // Cleared before the list, so a start seen during it sets it again.
        let wanted = signal.wanted.swap(false, Ordering::SeqCst);
        // While the breaker is not closed the list is also its probe.
        self.cgroup.is_none()
            || wanted
            || self.breaker_snapshot().state != BreakerState::Closed
            || !signal.following.load(Ordering::SeqCst)
            || state.listed_at.is_none_or(|at| at.elapsed() >= self.config.full_list_every)
    }

    /// Collects every interval until `cancel`, then closes the open minutes.
    pub async fn run(&self, cancel: CancellationToken) {
        let mut interval = self.config.interval;
        // Rounds keep to a fixed grid (no drift), so a minute holds the
        // same number of samples.
        let mut scheduled = tokio::time::Instant::now();
        loop {
            let report = tokio::select! {
                () = cancel.cancelled() => break,
                report = self.collect_once() => report,
            };
            interval = self.next_interval(interval, &report);
            self.counters.current_interval_ms.store(millis(interval), Ordering::Relaxed);
            if let Some(error) = &report.error {
                tracing::warn!(node.id = %self.node_id, outcome = ?report.outcome, %error, next_in = ?interval, "metrics round incomplete");
            }
            self.report_health();
            scheduled = (scheduled + interval).max(tokio::time::Instant::now());
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep_until(scheduled) => {}
            }
        }
        let minutes = self.state.lock().await.aggregator.flush_all();
        self.counters.minutes.fetch_add(minutes.len() as u64, Ordering::Relaxed);
        if let Some(writer) = &self.writer {
            writer.submit(Batch::Minutes(minutes));
        }
    }

    fn next_interval(&self, current: Duration, report: &RoundReport) -> Duration {
        let breaker_closed = self.breaker_snapshot().state == BreakerState::Closed;
        next_interval(self.config.interval, self.config.max_interval, current, report, breaker_closed)
    }

    fn allow_docker(&self) -> bool {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner()).allow(Instant::now())
    }

    fn docker_result(&self, ok: bool) {
        let mut breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            breaker.record_success();
        } else {
            let before = breaker.state();
            breaker.record_failure(Instant::now());
            if before != BreakerState::Open && breaker.state() == BreakerState::Open {
                tracing::warn!(node.id = %self.node_id, cool_down = ?self.config.breaker.cool_down, "Docker API circuit breaker opened");
            }
        }
    }

    fn breaker_snapshot(&self) -> BreakerSnapshot {
        let breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        BreakerSnapshot {
            state: breaker.state(),
            consecutive_failures: breaker.consecutive_failures(),
            times_opened: breaker.times_opened(),
        }
    }

    /// One collection round. Public for tests and benchmarks; [`Self::run`]
    /// calls it on its schedule.
    #[tracing::instrument(name = "metrics.round", skip_all, fields(node.id = %self.node_id))]
    pub async fn collect_once(&self) -> RoundReport {
        let started = Instant::now();
        let now_ms = Utc::now().timestamp_millis();
        let mut state = self.state.lock().await;
        let mut error = None;

        // Which containers run: from the engine unless the breaker is open
        // or nothing started since the last list.
        let list_skipped = !self.list_needed(&state);
        let listed = if list_skipped {
            None
        } else if self.allow_docker() {
            match tokio::time::timeout(self.config.docker_timeout, self.docker.list_managed(&self.node_id)).await {
                Ok(Ok(containers)) => {
                    self.docker_result(true);
                    Some(containers)
                }
                Ok(Err(e)) => {
                    self.docker_result(false);
                    error = Some(e.to_string());
                    None
                }
                Err(_) => {
                    self.docker_result(false);
                    error = Some(format!("listing containers took longer than {:?}", self.config.docker_timeout));
                    None
                }
            }
        } else {
            error = Some("the Docker API circuit breaker is open".to_owned());
            None
        };
        let was_listed = listed.is_some();
        if list_skipped {
            self.list_signal.lists_skipped.fetch_add(1, Ordering::Relaxed);
        } else if was_listed {
            self.list_signal.lists.fetch_add(1, Ordering::Relaxed);
            state.listed_at = Some(Instant::now());
        } else {
            self.list_signal.wanted.store(true, Ordering::SeqCst);
        }
        match listed {
            Some(containers) => self.refresh_known(&mut state, containers).await,
            None if list_skipped => {}
            // Without the engine only the cgroup path can go on, with the
            // containers it already knows.
            None if self.cgroup.is_none() => {
                let outcome = if error.as_deref() == Some("the Docker API circuit breaker is open") {
                    RoundOutcome::Skipped
                } else {
                    RoundOutcome::Failed
                };
                return self.finish_round(RoundReport {
                    outcome,
                    containers: 0,
                    failures: 0,
                    samples: 0,
                    minutes: 0,
                    duration: started.elapsed(),
                    listed: false,
                    list_skipped,
                    error,
                });
            }
            None => {}
        }

        let (read, failures) = self.read_known(&mut state).await;
        let processed = read.len();
        let mut samples = Vec::with_capacity(read.len());
        for (id, reading) in read {
            let Some(known) = state.known.get_mut(&id) else { continue };
            if let Some(runtime) = reading.runtime {
                known.incarnation.clone_from(&runtime.started_at);
                known.target.runtime = runtime;
            }
            let limits = Limits {
                cpu_cores: known.target.runtime.nano_cpus as f64 / 1e9,
                memory_bytes: u64::try_from(known.target.runtime.memory_limit_bytes).unwrap_or(0),
                host_cores: self.host_cores,
            };
            let (key, incarnation) = (known.key.clone(), known.incarnation.clone());
            // A read time far from the round's (a zero date, a skewed
            // clock) is not believed.
            let read_at_ms = reading.read_at_ms.filter(|at| (now_ms - at).abs() <= 10_000).unwrap_or(now_ms);
            if let Some(sample) = state.tracker.observe(&key, &incarnation, reading.counters, limits, read_at_ms) {
                samples.push(Arc::new(sample));
            }
        }
        let RoundState { known, tracker, .. } = &mut *state;
        tracker.retain(|id| known.contains_key(id));

        let minutes = self.hand_on(&mut state, &samples, now_ms);
        let outcome = if processed > 0 || (failures == 0 && (was_listed || list_skipped)) {
            RoundOutcome::Collected
        } else {
            RoundOutcome::Failed
        };
        if outcome == RoundOutcome::Failed && error.is_none() {
            error = Some(format!("none of {failures} containers could be read"));
        }
        self.finish_round(RoundReport {
            outcome,
            containers: processed,
            failures,
            samples: samples.len(),
            minutes,
            duration: started.elapsed(),
            listed: was_listed,
            list_skipped,
            error,
        })
    }

    fn finish_round(&self, report: RoundReport) -> RoundReport {
        let c = &self.counters;
        c.last_round_micros.store(report.duration.as_micros() as u64, Ordering::Relaxed);
        c.containers_processed.fetch_add(report.containers as u64, Ordering::Relaxed);
        c.containers_failed.fetch_add(report.failures as u64, Ordering::Relaxed);
        c.samples.fetch_add(report.samples as u64, Ordering::Relaxed);
        c.minutes.fetch_add(report.minutes as u64, Ordering::Relaxed);
        match report.outcome {
            RoundOutcome::Collected => {
                c.collections.fetch_add(1, Ordering::Relaxed);
                c.consecutive_failures.store(0, Ordering::Relaxed);
                c.last_collection_ms.store(Utc::now().timestamp_millis(), Ordering::Relaxed);
                let mut recent = self.recent_rounds.lock().unwrap_or_else(|e| e.into_inner());
                recent.push_back(Instant::now());
                while recent.len() > 20 {
                    recent.pop_front();
                }
            }
            RoundOutcome::Failed => {
                c.collection_failures.fetch_add(1, Ordering::Relaxed);
                c.consecutive_failures.fetch_add(1, Ordering::Relaxed);
            }
            RoundOutcome::Skipped => {
                c.rounds_skipped.fetch_add(1, Ordering::Relaxed);
                c.consecutive_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        report
    }

    /// Brings the known set in line with the engine's list: forgets what no
    /// longer runs, inspects what is new.
    async fn refresh_known(&self, state: &mut RoundState, containers: Vec<ManagedContainer>) {
        let running: HashMap<String, ManagedContainer> =
            containers.into_iter().filter(|c| c.state.is_running()).map(|c| (c.id.clone(), c)).collect();
        state.known.retain(|id, _| running.contains_key(id));
        let new: Vec<ManagedContainer> = running.into_values().filter(|c| !state.known.contains_key(&c.id)).collect();
        let learned: Vec<Option<Known>> = futures::stream::iter(new)
            .map(|container| self.learn(container))
            .buffer_unordered(self.config.docker_parallelism.max(1))
            .collect()
            .await;
        for known in learned.into_iter().flatten() {
            state.known.insert(known.target.container_id.clone(), known);
        }
        self.counters.containers_known.store(state.known.len(), Ordering::Relaxed);
    }

    /// Inspects a container and finds its cgroup files.
    async fn learn(&self, container: ManagedContainer) -> Option<Known> {
        let deployment_id: DeploymentId = container.labels.get(labels::DEPLOYMENT_ID)?.parse().ok()?;
        let runtime = self.inspect(&container.id).await?;
        let key = SampleKey {
            container_id: container.id.clone(),
            deployment_id,
            organization_id: container.labels.get(labels::ORGANIZATION_ID).and_then(|o| o.parse().ok()),
            replica_index: container.labels.get(labels::REPLICA_INDEX).and_then(|i| i.parse().ok()).unwrap_or(0),
        };
        Some(self.known(key, runtime))
    }

    fn known(&self, key: SampleKey, runtime: ContainerRuntime) -> Known {
        let (files, process_start) = match &self.cgroup {
            Some(cgroup) => {
                let opened = cgroup.reader.resolve(&key.container_id, runtime.pid).and_then(|files| {
                    let start = files.process_start()?;
                    Ok((files, start))
                });
                match opened {
                    Ok((files, start)) => (Some(Arc::new(files)), start),
                    Err(error) => {
                        // Out of descriptors is worth an operator's eye (raise the agent's nofile limit).
                        if error.raw_os_error() == Some(24) {
                            tracing::warn!(container.id = %key.container_id, %error, "cannot open cgroup files: reading through Docker");
                        } else {
                            tracing::debug!(container.id = %key.container_id, %error, "no cgroup files: reading through Docker");
                        }
                        (None, 0)
                    }
                }
            }
            None => (None, 0),
        };
        Known {
            incarnation: runtime.started_at.clone(),
            target: Target { container_id: key.container_id.clone(), runtime, files, process_start },
            key,
        }
    }

    /// A container's runtime facts; `None` when it does not run or the
    /// engine cannot be asked.
    async fn inspect(&self, id: &str) -> Option<ContainerRuntime> {
        if !self.allow_docker() {
            return None;
        }
        match tokio::time::timeout(self.config.docker_timeout, self.docker.container_runtime(id)).await {
            Ok(Ok(runtime)) => {
                self.docker_result(true);
                runtime
            }
            Ok(Err(error)) => {
                self.docker_result(!error.is_unreachable());
                tracing::debug!(container.id = id, %error, "inspecting for metrics failed");
                None
            }
            Err(_) => {
                self.docker_result(false);
                None
            }
        }
    }

    /// Reads every known container: through its cgroup files when it has
    /// them, otherwise through Docker (unless the breaker is open). A
    /// container that restarted is inspected again and read once more.
    async fn read_known(&self, state: &mut RoundState) -> (Vec<(String, Reading)>, usize) {
        let (by_cgroup, by_docker): (Vec<Target>, Vec<Target>) =
            state.known.values().map(|k| k.target.clone()).partition(|t| t.files.is_some() && self.cgroup.is_some());
        let docker_allowed = !by_docker.is_empty() && self.allow_docker();
        let cgroup_read = async {
            match &self.cgroup {
                Some(cgroup) if !by_cgroup.is_empty() => cgroup.read(&by_cgroup).await,
                _ => Vec::new(),
            }
        };
        let docker_read = async { if docker_allowed { self.docker_source.read(&by_docker).await } else { Vec::new() } };
        let (cgroup_results, docker_results) = futures::future::join(cgroup_read, docker_read).await;
        self.counters.cgroup_reads.fetch_add(cgroup_results.len() as u64, Ordering::Relaxed);
        self.counters.docker_reads.fetch_add(docker_results.len() as u64, Ordering::Relaxed);

        let mut readings = Vec::with_capacity(state.known.len());
        let mut failures = if docker_allowed { 0 } else { by_docker.len() };
        let mut gone = Vec::new();
        for (target, result) in by_cgroup.iter().zip(cgroup_results) {
            match result {
                Ok(reading) => readings.push((target.container_id.clone(), reading)),
                Err(ReadError::Gone { .. }) => gone.push(target.container_id.clone()),
                Err(error) => {
                    failures += 1;
                    tracing::debug!(container.id = %target.container_id, %error, "cgroup read failed");
                }
            }
        }
        for (target, result) in by_docker.iter().zip(docker_results) {
            match result {
                Ok(reading) => {
                    self.docker_result(true);
                    readings.push((target.container_id.clone(), reading));
                }
                Err(ReadError::Gone { .. }) => {
                    state.known.remove(&target.container_id);
                }
                Err(error) => {
                    self.docker_result(!error.is_engine_failure());
                    failures += 1;
                    tracing::debug!(container.id = %target.container_id, %error, "Docker stats read failed");
                }
            }
        }
        // Restarted (new init process) or stopped since we last looked.
        for id in gone {
            let Some(old) = state.known.remove(&id) else { continue };
            let Some(runtime) = self.inspect(&id).await else { continue };
            let known = self.known(old.key, runtime);
            let retry = match (&self.cgroup, known.target.files.is_some()) {
                (Some(cgroup), true) => cgroup.read(std::slice::from_ref(&known.target)).await,
                _ => self.docker_source.read(std::slice::from_ref(&known.target)).await,
            };
            match retry.into_iter().next() {
                Some(Ok(reading)) => readings.push((id.clone(), reading)),
                _ => failures += 1,
            }
            state.known.insert(id, known);
        }
        self.counters.containers_known.store(state.known.len(), Ordering::Relaxed);
        (readings, failures)
    }

    /// Hands a round's samples on: live view, Redis, minute aggregates and
    /// the writer. Returns how many minutes closed.
    fn hand_on(&self, state: &mut RoundState, samples: &[Arc<Sample>], now_ms: i64) -> usize {
        self.live.publish(samples, now_ms);
        if let Some(queue) = self.feed_queue.get()
            && !samples.is_empty()
        {
            let mut by_deployment: HashMap<DeploymentId, Vec<&Sample>> = HashMap::new();
            for sample in samples {
                by_deployment.entry(sample.key.deployment_id).or_default().push(sample);
            }
            let messages: Vec<(String, String)> = by_deployment
                .into_iter()
                .filter_map(|(d, s)| serde_json::to_string(&s).ok().map(|json| (d.to_string(), json)))
                .collect();
            if queue.try_send(messages).is_err() {
                self.counters.feed_dropped_rounds.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut minutes = Vec::new();
        for sample in samples {
            minutes.extend(state.aggregator.add(sample));
        }
        minutes.extend(state.aggregator.flush_due(now_ms, millis(self.config.minute_grace) as i64));
        let closed = minutes.len();
        if let Some(writer) = &self.writer {
            if self.config.store_samples && !samples.is_empty() {
                writer.submit(Batch::Samples(samples.iter().map(|s| Sample::clone(s)).collect()));
            }
            writer.submit(Batch::Minutes(minutes));
        }
        closed
    }

    pub fn snapshot(&self) -> PipelineSnapshot {
        let c = &self.counters;
        let writer = self.writer.as_ref().map(|w| w.stats());
        let (cache_containers, cache_samples) = self.live.cache.size();
        let last_collection_ms = c.last_collection_ms.load(Ordering::Relaxed);
        let collections_per_second = {
            let recent = self.recent_rounds.lock().unwrap_or_else(|e| e.into_inner());
            match (recent.front(), recent.back()) {
                (Some(first), Some(last)) if recent.len() > 1 => {
                    (recent.len() - 1) as f64 / last.duration_since(*first).as_secs_f64().max(1e-9)
                }
                _ => 0.0,
            }
        };
        PipelineSnapshot {
            node_id: self.node_id.to_string(),
            source: self.source(),
            cgroup_version: self.cgroup.as_ref().map(|c| c.reader.version()),
            interval_ms: millis(self.config.interval),
            current_interval_ms: c.current_interval_ms.load(Ordering::Relaxed),
            collections_total: c.collections.load(Ordering::Relaxed),
            collections_per_second,
            collection_failures_total: c.collection_failures.load(Ordering::Relaxed),
            consecutive_failures: c.consecutive_failures.load(Ordering::Relaxed),
            rounds_skipped_total: c.rounds_skipped.load(Ordering::Relaxed),
            containers: c.containers_known.load(Ordering::Relaxed),
            containers_processed_total: c.containers_processed.load(Ordering::Relaxed),
            containers_failed_total: c.containers_failed.load(Ordering::Relaxed),
            cgroup_reads_total: c.cgroup_reads.load(Ordering::Relaxed),
            docker_reads_total: c.docker_reads.load(Ordering::Relaxed),
            container_lists_total: self.list_signal.lists.load(Ordering::Relaxed),
            container_lists_skipped_total: self.list_signal.lists_skipped.load(Ordering::Relaxed),
            following_events: self.list_signal.following.load(Ordering::Relaxed),
            samples_total: c.samples.load(Ordering::Relaxed),
            minutes_total: c.minutes.load(Ordering::Relaxed),
            last_round_ms: c.last_round_micros.load(Ordering::Relaxed) as f64 / 1000.0,
            last_collection_at: (last_collection_ms > 0).then(|| time(last_collection_ms)),
            breaker: self.breaker_snapshot(),
            last_write_at: writer.filter(|w| w.last_write_ms > 0).map(|w| time(w.last_write_ms)),
            writer,
            subscribers: self.live.hub.stats(),
            cache_containers,
            cache_samples,
            live_feed: self.feed.as_ref().map(LiveFeed::stats),
            live_feed_dropped_rounds: c.feed_dropped_rounds.load(Ordering::Relaxed),
        }
    }

    /// The pipeline's health: `failed` after N failed rounds in a row or
    /// when the last collection is older than two intervals; `degraded`
    /// while the breaker is not closed or writes are failing.
    pub fn health(&self) -> (Health, Option<String>) {
        let snapshot = self.snapshot();
        let stale_after = Duration::from_millis(snapshot.current_interval_ms * 2);
        let since_last = match snapshot.last_collection_at {
            Some(at) => (Utc::now() - at).to_std().unwrap_or_default(),
            None => self.started.elapsed(),
        };
        if snapshot.consecutive_failures >= self.config.failures_for_unhealthy {
            return (
                Health::Failed,
                Some(format!("{} collection rounds failed in a row", snapshot.consecutive_failures)),
            );
        }
        if since_last > stale_after {
            return (
                Health::Failed,
                Some(format!("no collection for {:.1}s (more than two intervals)", since_last.as_secs_f64())),
            );
        }
        if snapshot.breaker.state != BreakerState::Closed {
            return (
                Health::Degraded,
                Some(format!(
                    "the Docker API circuit breaker is {}",
                    if snapshot.breaker.state == BreakerState::Open { "open" } else { "half-open" }
                )),
            );
        }
        if let Some(writer) = &self.writer
            && writer.failing()
        {
            return (
                Health::Degraded,
                Some(format!(
                    "metrics writes are failing; {} rows buffered",
                    snapshot.writer.map_or(0, |w| w.buffered_rows)
                )),
            );
        }
        (Health::Ok, None)
    }

    fn report_health(&self) {
        let (health, message) = self.health();
        let detail = serde_json::to_value(self.snapshot()).unwrap_or_default();
        self.telemetry.health.set(COMPONENT, health, message, detail);
    }
}

/// Stretches the interval while rounds fail, overrun or the breaker is not
/// closed; back to `base` once a round is healthy and fits in it.
fn next_interval(
    base: Duration,
    max: Duration,
    current: Duration,
    report: &RoundReport,
    breaker_closed: bool,
) -> Duration {
    let max = max.max(base);
    if report.outcome != RoundOutcome::Collected || !breaker_closed {
        (current * 2).min(max)
    } else if report.duration > current {
        (current * 2).max(report.duration.mul_f64(1.5)).min(max)
    } else if report.duration <= base {
        base
    } else {
        current
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcome: RoundOutcome, duration_ms: u64) -> RoundReport {
        RoundReport {
            outcome,
            containers: 0,
            failures: 0,
            samples: 0,
            minutes: 0,
            duration: Duration::from_millis(duration_ms),
            listed: true,
            list_skipped: false,
            error: None,
        }
    }

    #[test]
    fn the_interval_stretches_while_degraded_and_returns_when_healthy() {
        let (base, max) = (Duration::from_secs(5), Duration::from_secs(60));
        let s = |n| Duration::from_secs(n);
        let failed = report(RoundOutcome::Failed, 10);
        let mut interval = base;
        let mut seen = Vec::new();
        for _ in 0..6 {
            interval = next_interval(base, max, interval, &failed, true);
            seen.push(interval.as_secs());
        }
        assert_eq!(seen, vec![10, 20, 40, 60, 60, 60], "doubles up to the bound");
        let fast = report(RoundOutcome::Collected, 30);
        assert_eq!(next_interval(base, max, s(60), &fast, false), s(60), "the breaker is still not closed");
        assert_eq!(next_interval(base, max, s(60), &fast, true), base, "healthy again: back to 5 s");
        // A round that overruns its interval stretches it to fit.
        assert_eq!(next_interval(base, max, base, &report(RoundOutcome::Collected, 8_000), true), s(12));
        assert_eq!(next_interval(base, max, base, &report(RoundOutcome::Collected, 6_000), true), s(10));
        // Still slower than the base interval but within the current one: stay.
        assert_eq!(next_interval(base, max, s(10), &report(RoundOutcome::Collected, 6_000), true), s(10));
        assert_eq!(next_interval(base, max, base, &report(RoundOutcome::Skipped, 0), false), s(10));
    }
}
