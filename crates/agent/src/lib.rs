//! The node agent: one per node. It runs the replicas the orchestrator placed
//! on its node, records what really runs in `deployment_locations`, and
//! heartbeats `node_metadata`.
//!
//! Reconciliation is level-triggered: a pass compares the node's rows with
//! the engine's managed containers ([`plan`]) and acts on the difference. It
//! runs at start-up before anything else, on every Docker event and wake-up,
//! and on a timer, so a lost event or a crash mid-way is repaired by the next
//! pass. Creating a replica and replacing one (a rolling update) are
//! operations that run beside the passes, at most `max_parallel_starts` at a
//! time; a pass leaves replicas with an operation under way alone.
//!
//! The agent only ever touches containers labelled `flotilla.managed=true`
//! and `flotilla.node.id=<its id>`, so several agents can share one engine.

mod error;
mod events;
pub mod exits;
pub mod fence;
mod host;
mod identity;
pub mod metrics;
mod operations;
pub mod plan;
mod ports;
pub mod probe;
mod reconcile;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use flotilla_docker::{DockerClient, EngineInfo, LogOptions, LogStream};
use flotilla_edge::{EdgeSync, EdgeSyncConfig};
use flotilla_redis::{ORCHESTRATOR_TOPIC, WakeBus, agent_topic};
use flotilla_runtime::{Next, PeriodicTask, spawn_periodic};
use flotilla_store::{NodeHeartbeat, Store};
use flotilla_telemetry::Telemetry;
use flotilla_telemetry::liveness::AgentProber;
use flotilla_types::status::Health;
use flotilla_types::{DeploymentId, NodeId, ReplicaId};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use error::AgentError;
pub use events::{EventFeed, EventStats};
pub use identity::resolve_node_id;
pub use ports::PortAllocator;
pub use reconcile::PassReport;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How often the engine's facts reported in heartbeats are read again.
const ENGINE_FACTS_EVERY: Duration = Duration::from_secs(30);
/// How long one read of them may take.
const ENGINE_FACTS_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a cut-off agent checks whether to fence itself.
const FENCE_TICK: Duration = Duration::from_millis(500);
/// How long a peer has to answer a cut-off agent.
const PEER_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The peer list is read again every this many successful heartbeats.
const PEER_REFRESH_BEATS: u64 = 10;

/// Name of the network replicas of `shared` deployments join.
pub const SHARED_NETWORK: &str = "flotilla-apps";

/// The agent's settings; every one can be set from `flotillad`'s flags or
/// environment (see `docs/configuration.md`).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Overrides the node id (otherwise: Swarm node id, else persisted).
    pub node_id: Option<NodeId>,
    /// Where a generated node id is kept.
    pub node_id_file: PathBuf,
    /// The address other nodes and the edge proxy use to reach published
    /// ports; `None` means the Swarm node address, else 127.0.0.1.
    pub advertise_address: Option<String>,
    /// The host address replicas' ports are published on.
    pub publish_ip: IpAddr,
    pub port_range: RangeInclusive<u16>,
    pub heartbeat_interval: Duration,
    pub reconcile_interval: Duration,
    /// React to Docker events (otherwise only timed passes and wake-ups).
    pub events: bool,
    /// Container creations and replacements under way at most; the engine
    /// slows down badly when many containers start together.
    pub max_parallel_starts: usize,
    /// SIGTERM-to-SIGKILL grace when stopping a replica.
    pub stop_grace: Duration,
    pub max_deployments: i32,
    pub pull_timeout: Duration,
    /// A failed replica is tried again after this long.
    pub failed_retry_after: Duration,
    /// A managed container without a row and without a live deployment is
    /// removed after this long.
    pub orphan_grace: Duration,
    /// Before a container that served is stopped (stop, delete, scale-down,
    /// drain, the old container of a rolling update): how long to wait for
    /// the edge proxies to take in a route table without it.
    pub edge: EdgeSyncConfig,
    /// How often due health probes are looked for.
    pub probe_tick: Duration,
    /// Node labels reported in the heartbeat (placement constraints); Swarm
    /// labels are added when the node is a manager.
    pub node_labels: BTreeMap<String, String>,
    /// Labels added to every container and network (tests use them to clean up).
    pub extra_container_labels: BTreeMap<String, String>,
    /// Out of contact with the control database this long, and reaching no
    /// majority of the nodes, the agent stops its `fence` replicas (see
    /// [`fence`]); `None`: never.
    pub fence_after: Option<Duration>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_id: None,
            node_id_file: PathBuf::from("/var/lib/flotilla/node-id"),
            advertise_address: None,
            publish_ip: IpAddr::from([0, 0, 0, 0]),
            port_range: 20000..=29999,
            heartbeat_interval: Duration::from_secs(1),
            reconcile_interval: Duration::from_secs(60),
            events: true,
            max_parallel_starts: 4,
            stop_grace: Duration::from_secs(10),
            max_deployments: 100,
            pull_timeout: Duration::from_secs(300),
            failed_retry_after: Duration::from_secs(10),
            orphan_grace: Duration::from_secs(60),
            edge: EdgeSyncConfig::default(),
            probe_tick: Duration::from_millis(250),
            node_labels: BTreeMap::new(),
            extra_container_labels: BTreeMap::new(),
            fence_after: Some(Duration::from_secs(3)),
        }
    }
}

/// The node agent.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    node_id: NodeId,
    advertise_address: String,
    store: Store,
    docker: DockerClient,
    wake: WakeBus,
    /// Woken by Docker events, wake-ups and finished operations.
    reconcile_wake: Arc<Notify>,
    telemetry: Telemetry,
    ports: PortAllocator,
    stats: Arc<metrics::AgentStats>,
    last_pass: Mutex<PassReport>,
    /// Whether the last heartbeat succeeded.
    registered: AtomicBool,
    host: host::HostUsage,
    events: Arc<EventFeed>,
    monitor: Arc<probe::HealthMonitor>,
    /// Recent exits of each replica (crash loops).
    exits: exits::ExitHistory,
    /// Containers the agent is stopping itself (their exits are no crashes).
    stopping: Mutex<HashSet<String>>,
    /// Replicas with a create or rollout under way.
    busy: Mutex<HashSet<ReplicaId>>,
    start_permits: Semaphore,
    operations: TaskTracker,
    operations_cancel: CancellationToken,
    /// When each orphan container was first seen.
    orphans: Mutex<HashMap<String, Instant>>,
    /// One pass at a time: passes run on a timer, on events, and on demand.
    pass_lock: tokio::sync::Mutex<()>,
    /// Networks known to exist: name to id.
    networks: Mutex<HashMap<String, String>>,
    /// The container this agent runs in (a Swarm task), if any: it joins
    /// the app networks, since its probes go to replicas' own addresses.
    own_container: Option<String>,
    /// App networks the own container has joined.
    joined_networks: Mutex<HashSet<String>>,
    /// Waits for the edge proxies before a container that served stops.
    edge: Arc<EdgeSync>,
    /// Contact with the control database and the other nodes.
    fence: fence::Fence,
    /// Deployments on this node whose replicas may run twice rather than
    /// stop when it is cut off (`node_loss: replace`), as of the last pass.
    replaceable: Mutex<HashSet<DeploymentId>>,
    /// Successful heartbeats, to refresh the peer list every few.
    beats: AtomicU64,
    /// What heartbeats report of the engine, read every
    /// [`ENGINE_FACTS_EVERY`].
    engine_facts: Mutex<EngineFacts>,
}

/// The engine as heartbeats report it.
#[derive(Debug, Clone)]
struct EngineFacts {
    engine: EngineInfo,
    swarm_labels: BTreeMap<String, String>,
}

impl Agent {
    /// Resolves the node's identity from the engine and makes the agent.
    /// The engine must be reachable.
    pub async fn new(
        config: AgentConfig,
        store: Store,
        docker: DockerClient,
        wake: WakeBus,
        telemetry: Telemetry,
        internal_token: Arc<str>,
    ) -> Result<Arc<Self>, AgentError> {
        // Taken before any container list, so the events feed misses nothing.
        let started_nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default() - 1_000_000_000;
        let engine = docker.info().await?;
        let node_id = resolve_node_id(config.node_id.as_ref(), &engine, &config.node_id_file).await?;
        let advertise_address = config
            .advertise_address
            .clone()
            .or_else(|| engine.swarm_address.clone())
            .unwrap_or_else(|| "127.0.0.1".to_owned());
        let own_container = docker.own_container().await;
        let stats = Arc::new(metrics::AgentStats::default());
        let events = Arc::new(EventFeed::new(started_nanos));
        telemetry.register(Box::new(metrics::collector(&stats, &events)));
        let edge_stats = Arc::new(flotilla_edge::metrics::EdgeStats::default());
        telemetry.register(Box::new(flotilla_edge::metrics::sync_collector(&edge_stats)));
        let edge = EdgeSync::new(store.clone(), config.edge, edge_stats);
        let prober = AgentProber::new(internal_token, PEER_PROBE_TIMEOUT).map_err(AgentError::HttpClient)?;
        let fence = fence::Fence::new(config.fence_after, prober);
        tracing::info!(
            node.id = %node_id,
            engine = %engine.server_version,
            swarm = engine.swarm_node_id.is_some(),
            address = %advertise_address,
            container = own_container.as_deref().unwrap_or("none"),
            "node agent ready"
        );
        Ok(Arc::new(Self {
            ports: PortAllocator::new(config.port_range.clone(), config.publish_ip),
            start_permits: Semaphore::new(config.max_parallel_starts.max(1)),
            reconcile_wake: wake.waiter(&agent_topic(node_id.as_str())),
            config,
            node_id,
            advertise_address,
            store,
            docker,
            wake,
            telemetry,
            stats,
            last_pass: Mutex::new(PassReport::default()),
            registered: AtomicBool::new(false),
            host: host::HostUsage::default(),
            events,
            monitor: Arc::new(probe::HealthMonitor::default()),
            exits: exits::ExitHistory::default(),
            stopping: Mutex::new(HashSet::new()),
            busy: Mutex::new(HashSet::new()),
            operations: TaskTracker::new(),
            operations_cancel: CancellationToken::new(),
            orphans: Mutex::new(HashMap::new()),
            pass_lock: tokio::sync::Mutex::new(()),
            networks: Mutex::new(HashMap::new()),
            own_container,
            joined_networks: Mutex::new(HashSet::new()),
            edge,
            fence,
            replaceable: Mutex::new(HashSet::new()),
            beats: AtomicU64::new(0),
            engine_facts: Mutex::new(EngineFacts { engine, swarm_labels: BTreeMap::new() }),
        }))
    }

    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    /// The address other nodes and the edge reach this node at.
    pub fn advertise_address(&self) -> &str {
        &self.advertise_address
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The last pass's report.
    pub fn last_pass(&self) -> PassReport {
        self.last_pass.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn event_stats(&self) -> EventStats {
        self.events.stats()
    }

    /// Operations (creates, rollouts) under way.
    pub fn operations_in_flight(&self) -> usize {
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Starts the agent: the events subscription (from before the first
    /// list), one reconciliation pass before anything else, then the
    /// heartbeat, reconciliation and health-probe loops, until `cancel`.
    /// On cancel, operations under way are stopped; user containers are
    /// left as they are.
    pub fn spawn(self: &Arc<Self>, tracker: &TaskTracker, cancel: CancellationToken) {
        let span = tracing::info_span!("agent", node.id = %self.node_id);
        if self.config.events {
            let feed = self.events.clone();
            tracker.spawn(
                feed.run(
                    self.docker.clone(),
                    self.node_id.clone(),
                    self.reconcile_wake.clone(),
                    self.monitor.clone(),
                    cancel.clone(),
                )
                .instrument(span.clone()),
            );
        }
        let agent = self.clone();
        let tasks = tracker.clone();
        tracker.spawn(
            async move {
                if let Err(error) = agent.refresh_engine_facts().await {
                    tracing::warn!(%error, "could not read the engine's facts");
                }
                // Beating before the first pass (seconds, over 15 s under
                // load) ends a restart's silence, and the stop mark with
                // it, as soon as this agent runs.
                agent.spawn_heartbeat(&tasks, &cancel);
                agent.run_pass().await;
                agent.spawn_loops(&tasks, &cancel);
                cancel.cancelled().await;
                // An update or restart: the node is not lost, its agent is
                // only away a few seconds.
                if let Err(error) = agent.store.announce_agent_stopping(&agent.node_id).await {
                    tracing::warn!(%error, "could not announce this agent's stop");
                }
                agent.operations_cancel.cancel();
                agent.operations.close();
                agent.operations.wait().await;
            }
            .instrument(span),
        );
    }

    fn spawn_heartbeat(self: &Arc<Self>, tasks: &TaskTracker, cancel: &CancellationToken) {
        let heartbeat = PeriodicTask {
            name: "agent.heartbeat",
            interval: self.config.heartbeat_interval,
            wake: None,
            pass_at_start: true,
        };
        spawn_periodic(tasks, cancel, tracing::Span::current(), heartbeat, self, |agent| async move {
            agent.heartbeat_pass().await
        });
    }

    fn spawn_loops(self: &Arc<Self>, tasks: &TaskTracker, cancel: &CancellationToken) {
        let span = tracing::Span::current;
        let every = |name, interval| PeriodicTask { name, interval, wake: None, pass_at_start: false };
        // The start-up pass just ran.
        let reconcile = PeriodicTask {
            wake: Some(self.reconcile_wake.clone()),
            ..every("agent.reconcile", self.config.reconcile_interval)
        };
        spawn_periodic(tasks, cancel, span(), reconcile, self, |agent| async move {
            if agent.run_pass().await.error.is_some() { Next::RetrySoon } else { Next::Interval }
        });
        let facts = every("agent.engine_facts", ENGINE_FACTS_EVERY);
        spawn_periodic(tasks, cancel, span(), facts, self, |agent| async move {
            match agent.refresh_engine_facts().await {
                Ok(()) => Next::Interval,
                Err(error) => {
                    tracing::warn!(%error, "could not read the engine's facts; heartbeats report the last ones");
                    Next::RetrySoon
                }
            }
        });
        spawn_periodic(tasks, cancel, span(), every("agent.fence", FENCE_TICK), self, |agent| async move {
            agent.fence_pass().await;
            Next::Interval
        });
        let probes = every("agent.probes", self.config.probe_tick);
        spawn_periodic(tasks, cancel, span(), probes, self, |agent| async move {
            agent.probe_pass().await;
            Next::Interval
        });
    }

    async fn heartbeat_pass(&self) -> Next {
        let sent = Instant::now();
        match self.heartbeat().await {
            Ok(()) => {
                if self.fence.contact(sent) {
                    tracing::warn!(
                        "in contact again after fencing: the next pass restarts or removes the stopped replicas"
                    );
                    self.reconcile_wake.notify_one();
                }
                if self.beats.fetch_add(1, Ordering::Relaxed).is_multiple_of(PEER_REFRESH_BEATS) {
                    match self.store.peer_agent_urls(&self.node_id).await {
                        Ok(peers) => self.fence.set_peers(peers),
                        Err(error) => tracing::debug!(%error, "could not refresh the peer list"),
                    }
                }
                if !self.registered.swap(true, Ordering::Relaxed) {
                    // The node just (re)joined: work waiting for a node can be placed now.
                    self.wake.wake(ORCHESTRATOR_TOPIC).await;
                }
                Next::Interval
            }
            Err(error) => {
                self.registered.store(false, Ordering::Relaxed);
                self.stats.heartbeat_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "heartbeat failed");
                Next::RetrySoon
            }
        }
    }

    /// Writes this node's row in `node_metadata`, from the engine facts
    /// last read: a heartbeat never waits on the engine (a Swarm manager's
    /// `docker info` waits for a Raft leader, 20 s during an election).
    #[tracing::instrument(skip_all, fields(node.id = %self.node_id), err)]
    pub async fn heartbeat(&self) -> Result<(), AgentError> {
        let facts = self.engine_facts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut labels = facts.swarm_labels;
        // Configured labels win over Swarm's.
        labels.extend(self.config.node_labels.clone());
        let (used_cpu_millis, used_memory_bytes) = self.host.sample(facts.engine.cpus);
        let role = match (&facts.engine.swarm_node_id, facts.engine.swarm_manager) {
            (None, _) => "standalone",
            (Some(_), true) => "manager",
            (Some(_), false) => "worker",
        };
        let beat = NodeHeartbeat {
            node_id: self.node_id.clone(),
            hostname: facts.engine.hostname,
            address: self.advertise_address.clone(),
            role: role.to_owned(),
            labels,
            total_cpu_millis: facts.engine.cpus.saturating_mul(1000),
            total_memory_bytes: facts.engine.memory_bytes,
            used_cpu_millis,
            used_memory_bytes,
            max_deployments: self.config.max_deployments,
            agent_version: AGENT_VERSION.to_owned(),
            fence_after: self.fence.after(),
        };
        self.store.upsert_heartbeat(&beat).await?;
        self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Reads the engine's facts (size, Swarm role and labels) for the
    /// heartbeats; each read is bounded, and a failed one keeps the last.
    pub async fn refresh_engine_facts(&self) -> Result<(), AgentError> {
        let engine = match tokio::time::timeout(ENGINE_FACTS_TIMEOUT, self.docker.info()).await {
            Ok(engine) => engine?,
            Err(_) => return Err(AgentError::EngineSlow { what: "docker info", after: ENGINE_FACTS_TIMEOUT }),
        };
        let mut swarm_labels = self.engine_facts.lock().unwrap_or_else(|e| e.into_inner()).swarm_labels.clone();
        if let (Some(swarm_id), true) = (&engine.swarm_node_id, engine.swarm_manager) {
            match tokio::time::timeout(ENGINE_FACTS_TIMEOUT, self.docker.swarm_node_labels(swarm_id)).await {
                Ok(Ok(labels)) => swarm_labels = labels.into_iter().collect(),
                Ok(Err(error)) => tracing::debug!(%error, "swarm labels not readable"),
                Err(_) => tracing::debug!("swarm labels not read in time (no Raft leader?)"),
            }
        }
        *self.engine_facts.lock().unwrap_or_else(|e| e.into_inner()) = EngineFacts { engine, swarm_labels };
        Ok(())
    }

    /// Runs one pass and records its outcome for `/health` and the admin
    /// endpoint.
    pub async fn run_pass(self: &Arc<Self>) -> PassReport {
        let started = Instant::now();
        let started_at = Utc::now();
        let mut report = match self.reconcile().await {
            Ok(report) => report,
            Err(error) => {
                self.stats.pass_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "reconciliation pass failed");
                PassReport { error: Some(error.to_string()), ..PassReport::default() }
            }
        };
        report.started_at = Some(started_at);
        report.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        self.stats.last_pass_micros.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.telemetry.health.report_pass(
            "agent",
            report.error.as_deref(),
            json!({
                "node_id": self.node_id,
                "last_pass": report,
                "events": self.events.stats(),
                "operations_in_flight": self.operations_in_flight(),
                "probed_replicas": self.monitor.len(),
            }),
        );
        *self.last_pass.lock().unwrap_or_else(|e| e.into_inner()) = report.clone();
        report
    }

    /// Probes the health of running replicas that are due and records
    /// changes. A crash-looping replica stays unhealthy even when a probe
    /// passes between two crashes: it gets no requests until it has stopped
    /// crashing for a while (the crash-loop window).
    async fn probe_pass(&self) {
        for mut change in self.monitor.probe_due().await {
            let mut reason = change.error.as_ref().map(|e| format!("unhealthy: {e}"));
            if change.health == Health::Healthy
                && let Some(looping) = self.exits.crash_looping(change.replica)
            {
                tracing::debug!(replica.id = %change.replica, "probe passed, but the replica is crash looping");
                change.health = Health::Unhealthy;
                reason = Some(looping);
            } else if let Some(error) = &change.error {
                tracing::info!(replica.id = %change.replica, health = %change.health, %error, "replica health changed");
            } else {
                tracing::info!(replica.id = %change.replica, health = %change.health, "replica health changed");
            }
            let reason = match change.health {
                Health::Unhealthy => reason.as_deref(),
                _ => None,
            };
            let container = Some(change.container_id.as_str());
            if let Err(error) =
                self.store.record_health(&self.node_id, change.replica, container, change.health, reason).await
            {
                tracing::warn!(%error, "could not record a replica's health");
            }
        }
    }

    /// Whether this node can run its replicas, asked by the orchestrator
    /// when its heartbeats stop and by peers when theirs do: not when its
    /// engine does not answer or it fenced itself.
    pub async fn liveness(&self, within: Duration) -> Result<(), String> {
        if self.fence.is_fenced() {
            return Err(format!(
                "fenced: out of contact with the control database for {:?} and with most nodes",
                self.fence.silent_for()
            ));
        }
        match tokio::time::timeout(within, self.docker.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("the Docker Engine did not answer within {within:?}")),
        }
    }

    /// A replica's log lines (it must run on this node).
    pub async fn replica_logs(&self, replica: ReplicaId, options: &LogOptions) -> Result<LogStream, AgentError> {
        let container = self
            .docker
            .list_managed(&self.node_id)
            .await?
            .into_iter()
            .filter(|c| c.replica_id() == Some(replica))
            .max_by_key(|c| (c.state.is_running(), c.generation()))
            .ok_or_else(|| AgentError::NoContainer { replica: replica.to_string(), node: self.node_id.to_string() })?;
        Ok(self.docker.logs(&container.id, options))
    }

    /// When the start-up events subscription begins (Unix nanoseconds).
    pub fn events_since(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_nanos(self.events.stats().since_nanos)
    }
}
