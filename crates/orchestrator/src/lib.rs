//! The orchestrator: decides where each replica runs and how traffic reaches
//! it. Replicas of it elect a leader through a lease row in PostgreSQL; only
//! the leader runs rounds, and every write of a round is fenced by the
//! lease's term, so a replica that lost the lease (paused, cut off) cannot
//! place anything twice.
//!
//! Between rounds, the node watch ([`liveness`]) asks the agents of nodes
//! silent for two heartbeats whether they are alive, and takes the
//! unreachable down at once.
//!
//! A round: the node health watch (silent nodes go down and their replicas
//! are taken off them), one step of every drain, placement of every missing
//! replica (one [`select::Placer`] per round; all decisions committed in one
//! transaction), preparation of new generations, and removal of deleted
//! deployments. Rounds are idempotent and level-triggered: they run on every
//! wake-up and on a timer.

pub mod liveness;
pub mod metrics;
pub mod select;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use flotilla_edge::EdgeSettings;
use flotilla_redis::{ORCHESTRATOR_TOPIC, WakeBus, agent_topic};
use flotilla_runtime::{Next, PeriodicTask, spawn_periodic};
use flotilla_store::placement::{
    HealthWatch, Lease, NewReplica, PlacementNeed, PlacementOutcome, PlacementPlan, SilentNode,
};
use flotilla_store::routes::RouteRecord;
use flotilla_store::{Store, StoreError};
use flotilla_telemetry::Telemetry;
use flotilla_types::{NodeId, PlacementStrategy, ReplicaId};
use futures::future::Either;
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use flotilla_telemetry::liveness::{AgentProber, Liveness};
use liveness::NodeWatchConfig;
use select::{Candidate, Placer, Request};

/// How long CreateDeployment's idempotency keys are kept.
pub const IDEMPOTENCY_KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// The orchestrator's settings.
#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// A node not heard from for this long is `down`: it takes no new
    /// replicas and its replicas are placed elsewhere.
    pub heartbeat_timeout: Duration,
    /// A round runs at least this often, wake-ups or not.
    pub interval: Duration,
    /// Deployments looked at per round.
    pub batch_size: i64,
    pub edge: EdgeSettings,
    /// The strategy of deployments that do not name one.
    pub default_strategy: PlacementStrategy,
    /// Who this replica is in the leader election (unique per process).
    pub holder: String,
    /// A leader not renewing its lease for this long is replaced.
    pub lease_ttl: Duration,
    pub node_watch: NodeWatchConfig,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_secs(15),
            interval: Duration::from_secs(10),
            batch_size: 500,
            edge: EdgeSettings::default(),
            default_strategy: PlacementStrategy::LeastLoaded,
            holder: holder_name(),
            lease_ttl: Duration::from_secs(3),
            node_watch: NodeWatchConfig::default(),
        }
    }
}

/// The lease holder's name, unique per process: `orchestrator@HOST-PID-T`,
/// so operators (and tests) see which machine leads (the stack names an
/// orchestrator task's host after its node).
fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')).collect();
    let pid = std::process::id();
    let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
    format!("orchestrator@{}-{pid}-{nanos:x}", if host.is_empty() { "unknown" } else { &host })
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RoundReport {
    pub started_at: Option<DateTime<Utc>>,
    pub duration_ms: u64,
    pub deployments_considered: usize,
    pub replicas_placed: usize,
    /// Deployments whose replicas were prepared for a new generation.
    pub generations_prepared: usize,
    pub unschedulable: usize,
    pub finalized: usize,
    /// Nodes that went down / came back in this round.
    pub nodes_down: Vec<String>,
    pub nodes_back: Vec<String>,
    /// Replica rows taken off down nodes.
    pub evicted: usize,
    /// Replicas on drained nodes that began moving / were retired.
    pub drain_moving: usize,
    pub drain_retired: usize,
    /// Replicas still moving or retiring: the round runs every second.
    pub drain_in_flight: usize,
    /// Not the leader: nothing was done.
    pub follower: bool,
    /// Why replicas could not be placed, when some could not.
    pub unschedulable_reason: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug)]
pub struct Orchestrator {
    config: OrchestratorConfig,
    store: Store,
    wake: WakeBus,
    telemetry: Telemetry,
    stats: Arc<metrics::OrchestratorStats>,
    last_round: Mutex<RoundReport>,
    /// The lease while this replica leads.
    lease: watch::Sender<Option<Lease>>,
    /// Why the lease could not be taken or renewed last time (the control
    /// database away): a follower for that reason is not healthy.
    lease_error: Mutex<Option<String>>,
    /// Asks silent nodes' agents whether they are alive; without it, nodes
    /// go down only after the heartbeat timeout.
    prober: Option<AgentProber>,
    /// Runs the node watch at once when this replica becomes the leader:
    /// the lost node may be the old leader's.
    node_watch_wake: Arc<Notify>,
}

impl Orchestrator {
    pub fn new(
        config: OrchestratorConfig,
        store: Store,
        wake: WakeBus,
        telemetry: Telemetry,
        prober: Option<AgentProber>,
    ) -> Arc<Self> {
        let stats = Arc::new(metrics::OrchestratorStats::default());
        telemetry.register(Box::new(metrics::collector(&stats)));
        Arc::new(Self {
            config,
            store,
            wake,
            telemetry,
            stats,
            last_round: Mutex::new(RoundReport::default()),
            lease: watch::Sender::new(None),
            lease_error: Mutex::new(None),
            prober,
            node_watch_wake: Arc::new(Notify::new()),
        })
    }

    pub fn last_round(&self) -> RoundReport {
        self.last_round.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The lease, while this replica leads.
    pub fn lease(&self) -> Option<Lease> {
        self.lease.borrow().clone()
    }

    /// Runs the leader election, and rounds on every wake-up and every
    /// `interval` while leading, until `cancel`. The lease is given up at
    /// shutdown so another replica takes over at once.
    pub fn spawn(self: &Arc<Self>, tracker: &TaskTracker, cancel: CancellationToken) {
        let orchestrator = self.clone();
        let election_cancel = cancel.clone();
        tracker.spawn(
            async move { orchestrator.run_election(election_cancel).await }
                .instrument(tracing::info_span!("orchestrator.lease", holder = %self.config.holder)),
        );
        let node_watch = PeriodicTask {
            name: "orchestrator.node_watch",
            interval: self.config.node_watch.every,
            wake: Some(self.node_watch_wake.clone()),
            pass_at_start: false,
        };
        spawn_periodic(
            tracker,
            &cancel,
            tracing::info_span!("orchestrator.node_watch"),
            node_watch,
            self,
            |watcher| async move { watcher.watch_silent_nodes().await },
        );
        let placement = PeriodicTask {
            name: "orchestrator.placement",
            interval: self.config.interval,
            wake: Some(self.wake.waiter(ORCHESTRATOR_TOPIC)),
            pass_at_start: true,
        };
        spawn_periodic(
            tracker,
            &cancel,
            tracing::info_span!("orchestrator"),
            placement,
            self,
            |orchestrator| async move {
                let report = orchestrator.run_round().await;
                if report.error.is_some() || report.unschedulable > 0 {
                    Next::RetrySoon
                } else if report.drain_in_flight > 0 {
                    // A drain waits on replacements becoming healthy and on
                    // retired replicas' stop times.
                    Next::After(Duration::from_secs(1))
                } else {
                    Next::Interval
                }
            },
        );
    }

    /// Tries once to take or renew the lease, for tools that drive rounds
    /// themselves (benchmarks); [`Self::spawn`] keeps renewing it.
    pub async fn lead_once(&self) -> Result<bool, StoreError> {
        let lease = self.store.acquire_lease(&self.config.holder, self.config.lease_ttl).await?;
        let leading = lease.is_some();
        self.set_lease(lease);
        Ok(leading)
    }

    /// Renews the lease every third of its time to live; a follower tries
    /// to take it every eighth, so a lost leader is replaced soon after its
    /// lease runs out.
    async fn run_election(self: Arc<Self>, cancel: CancellationToken) {
        let period = self.config.lease_ttl / 3;
        let mut lost_at: Option<Instant> = None;
        loop {
            match self.store.acquire_lease(&self.config.holder, self.config.lease_ttl).await {
                Ok(lease) => {
                    lost_at = None;
                    *self.lease_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    self.set_lease(lease);
                }
                Err(error) => {
                    *self.lease_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
                    // Keep leading only as long as the lease surely holds;
                    // fenced writes would fail after that anyway.
                    let since = *lost_at.get_or_insert_with(Instant::now);
                    tracing::warn!(%error, "could not renew the orchestrator lease");
                    if since.elapsed() + period >= self.config.lease_ttl {
                        self.set_lease(None);
                    }
                }
            }
            let next_try = if self.lease().is_some() { period } else { self.config.lease_ttl / 8 };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(next_try) => {}
            }
        }
        if let Some(lease) = self.lease() {
            self.set_lease(None);
            match self.store.release_lease(&lease).await {
                Ok(()) => tracing::info!(term = lease.term, "orchestrator lease released"),
                Err(error) => tracing::warn!(%error, "could not release the orchestrator lease; it expires by itself"),
            }
        }
    }

    fn set_lease(&self, lease: Option<Lease>) {
        let before = self.lease.borrow().as_ref().map(|l| l.term);
        let after = lease.as_ref().map(|l| l.term);
        if before == after {
            return;
        }
        self.stats.leadership_changes.fetch_add(1, Ordering::Relaxed);
        self.stats.leader.store(u64::from(after.is_some()), Ordering::Relaxed);
        match after {
            Some(term) => tracing::info!(term, holder = %self.config.holder, "became the orchestrator leader"),
            None => tracing::warn!(holder = %self.config.holder, "no longer the orchestrator leader"),
        }
        let became_leader = after.is_some();
        self.lease.send_replace(lease);
        if became_leader {
            // Catch up at once rather than at the next timer.
            self.wake.notify_local(ORCHESTRATOR_TOPIC);
            self.node_watch_wake.notify_one();
        }
    }

    /// One round, with its outcome recorded for `/health`.
    pub async fn run_round(&self) -> RoundReport {
        let started = Instant::now();
        let started_at = Utc::now();
        let mut report = match self.lease() {
            None => RoundReport {
                follower: true,
                // Not leading because the database is away is no health.
                error: self
                    .lease_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map(|e| format!("cannot take or renew the orchestrator lease: {e}")),
                ..RoundReport::default()
            },
            Some(lease) => match self.round(&lease).await {
                Ok(report) => report,
                Err(StoreError::NotLeader { term }) => {
                    tracing::warn!(term, "lost the lease during a round; nothing of it was written");
                    self.set_lease(None);
                    RoundReport { follower: true, ..RoundReport::default() }
                }
                Err(error) => {
                    self.stats.round_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "orchestrator round failed");
                    RoundReport { error: Some(error.to_string()), ..RoundReport::default() }
                }
            },
        };
        report.started_at = Some(started_at);
        report.duration_ms = started.elapsed().as_millis() as u64;
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        self.telemetry.health.report_pass(
            "orchestrator",
            report.error.as_deref(),
            json!({ "last_round": report, "leader": !report.follower, "holder": self.config.holder }),
        );
        *self.last_round.lock().unwrap_or_else(|e| e.into_inner()) = report.clone();
        report
    }

    #[tracing::instrument(skip_all, fields(term = lease.term), err)]
    async fn round(&self, lease: &Lease) -> Result<RoundReport, StoreError> {
        let mut report = RoundReport::default();
        let changed_nodes = self.watch_nodes(lease, Vec::new(), &mut report).await?;
        let drains = self.store.advance_drains(lease).await?;
        report.drain_moving = drains.moving;
        report.drain_retired = drains.retiring.len();
        report.drain_in_flight = drains.in_flight;
        self.stats.retired.fetch_add(drains.retiring.len() as u64, Ordering::Relaxed);
        if drains.moving > 0 || drains.restored > 0 || !drains.retiring.is_empty() {
            tracing::info!(moving = drains.moving, retiring = ?drains.retiring, restored = drains.restored, "drain step");
        }
        self.place(lease, &mut report).await?;
        // A node marked down may be alive (cut off, or too slow to beat in
        // time) and one back still runs what was placed elsewhere: once the
        // replacements are placed its agent removes them now, not at its
        // next timed pass.
        self.wake_nodes(changed_nodes.iter()).await;
        for need in self.store.generations_to_prepare(self.config.batch_size).await? {
            let route = need.domain.clone().map(|domain| self.route_record(&need, domain));
            if let PlacementOutcome::Prepared(nodes) =
                self.store.prepare_generation(lease, need.deployment_id, need.generation, route.as_ref()).await?
            {
                report.generations_prepared += 1;
                tracing::info!(deployment.id = %need.deployment_id, generation = need.generation, "generation prepared");
                self.wake_nodes(nodes.iter()).await;
            }
        }
        let finalized = self.store.finalize_deleted_deployments(self.config.heartbeat_timeout).await?;
        for id in &finalized {
            tracing::info!(deployment.id = %id, "deleted deployment removed");
        }
        report.finalized = finalized.len();
        self.store.expire_idempotency_keys(IDEMPOTENCY_KEY_TTL).await?;
        // Agents stop retired replicas when woken after their time has come.
        let due = self.store.nodes_with_due_retirements().await?;
        self.wake_nodes(due.iter()).await;
        self.stats.replicas_placed.fetch_add(report.replicas_placed as u64, Ordering::Relaxed);
        self.stats.unschedulable.fetch_add(report.unschedulable as u64, Ordering::Relaxed);
        self.stats.finalized.fetch_add(report.finalized as u64, Ordering::Relaxed);
        Ok(report)
    }

    /// Between rounds, while leading (every second): the agents of nodes
    /// silent for `suspect_after` are asked whether they are alive, and the
    /// health watch runs: unreachable nodes go down now, as do nodes silent
    /// past the heartbeat timeout, and what they held is freed; a round then
    /// places it elsewhere at once (rather than at its timer).
    async fn watch_silent_nodes(&self) -> Next {
        let Some(lease) = self.lease() else { return Next::Interval };
        let watch = &self.config.node_watch;
        let silent = match self.store.silent_nodes(watch.suspect_after, watch.restart_grace).await {
            Ok(silent) => silent,
            Err(error) => {
                tracing::debug!(%error, "could not list silent nodes");
                return Next::RetrySoon;
            }
        };
        let unreachable = match &self.prober {
            Some(prober) if !silent.is_empty() => self.probe_silent(prober, &silent).await,
            _ => Vec::new(),
        };
        // Every pass, silent nodes or not: `fence` replicas of a node known
        // lost move the moment its fence time has passed.
        let mut report = RoundReport::default();
        match self.watch_nodes(&lease, unreachable, &mut report).await {
            // Place what the down nodes held now, not at the round's timer.
            Ok(changed) if report.evicted > 0 || !changed.is_empty() => self.wake.notify_local(ORCHESTRATOR_TOPIC),
            Ok(_) => {}
            Err(StoreError::NotLeader { .. }) => self.set_lease(None),
            Err(error) => {
                tracing::warn!(%error, "node watch failed");
                return Next::RetrySoon;
            }
        }
        Next::Interval
    }

    /// Asks each silent node's agent whether it is alive; returns those that
    /// are not.
    async fn probe_silent(&self, prober: &AgentProber, silent: &[SilentNode]) -> Vec<NodeId> {
        let engine_port = match self.config.node_watch.engine_port {
            Some(port) if silent.iter().any(|n| n.restarting) => {
                self.engine_port_served(prober, port).await.then_some(port)
            }
            _ => None,
        };
        let probes = silent.iter().filter_map(|node| {
            // A restarting agent cannot answer: its node can.
            let probe = match (node.restarting, engine_port, node.agent_url.as_deref()) {
                (false, _, Some(url)) => Either::Left(prober.probe(url)),
                (true, Some(port), _) => Either::Right(prober.probe_node(&node.address, port)),
                _ => return None,
            };
            Some(async move { (node, probe.await) })
        });
        let answers = futures::future::join_all(probes).await;
        self.stats.node_probes.fetch_add(answers.len() as u64, Ordering::Relaxed);
        let mut unreachable = Vec::new();
        for (node, answer) in answers {
            match answer {
                Liveness::Alive => tracing::debug!(
                    node.id = %node.node_id, silent_for = ?node.silent_for, restarting = node.restarting,
                    "silent node answers: left to the heartbeat timeout"
                ),
                Liveness::Unavailable(reason) | Liveness::NoAnswer(reason) => {
                    tracing::warn!(
                        node.id = %node.node_id, silent_for = ?node.silent_for, restarting = node.restarting, %reason,
                        "silent node unreachable"
                    );
                    unreachable.push(node.node_id.clone());
                }
            }
        }
        self.stats.nodes_unreachable.fetch_add(unreachable.len() as u64, Ordering::Relaxed);
        unreachable
    }

    /// Whether `port` is served on nodes that beat now: only then does a
    /// restarting node's silent port mean a lost node (one engine outside
    /// a multi-node swarm may not serve Swarm's gossip port at all).
    async fn engine_port_served(&self, prober: &AgentProber, port: u16) -> bool {
        let beating = match self.store.beating_node_addresses(self.config.node_watch.suspect_after, 3).await {
            Ok(addresses) => addresses,
            Err(error) => {
                tracing::debug!(%error, "could not list beating nodes");
                return false;
            }
        };
        let answers = futures::future::join_all(beating.iter().map(|a| prober.probe_node(a, port))).await;
        let served = answers.contains(&Liveness::Alive);
        if !served {
            tracing::debug!(port, "no beating node serves the engine probe port: restarting nodes are not asked");
        }
        served
    }

    /// Silent nodes go down (their replicas are placed elsewhere this very
    /// round); nodes heard from again are ready.
    /// Marks nodes down or back; returns those that changed.
    async fn watch_nodes(
        &self,
        lease: &Lease,
        unreachable: Vec<NodeId>,
        report: &mut RoundReport,
    ) -> Result<Vec<NodeId>, StoreError> {
        let watch = HealthWatch {
            timeout: self.config.heartbeat_timeout,
            unreachable,
            suspect_after: self.config.node_watch.suspect_after,
            fence_margin: self.config.node_watch.fence_margin,
        };
        let changes = self.store.watch_node_health(lease, &watch).await?;
        for node in &changes.down {
            let reason = if watch.unreachable.contains(node) { "unreachable" } else { "missed its heartbeats" };
            tracing::warn!(node.id = %node, timeout = ?self.config.heartbeat_timeout, reason, "node down");
        }
        for node in &changes.back {
            tracing::info!(node.id = %node, "node is sending heartbeats again: ready");
        }
        if changes.evicted > 0 {
            tracing::warn!(replicas = changes.evicted, "replicas taken off down nodes, to be placed elsewhere");
        }
        self.stats.nodes_down.fetch_add(changes.down.len() as u64, Ordering::Relaxed);
        self.stats.evicted.fetch_add(changes.evicted as u64, Ordering::Relaxed);
        report.nodes_down = changes.down.iter().map(ToString::to_string).collect();
        report.nodes_back = changes.back.iter().map(ToString::to_string).collect();
        report.evicted = changes.evicted;
        Ok(changes.down.into_iter().chain(changes.back).collect())
    }

    /// Places every missing replica: one snapshot, one decision per replica,
    /// one transaction for all of them.
    async fn place(&self, lease: &Lease, report: &mut RoundReport) -> Result<(), StoreError> {
        let needs = self.store.deployments_to_place(self.config.batch_size).await?;
        report.deployments_considered = needs.len();
        if needs.is_empty() {
            return Ok(());
        }
        let (snapshot, cursor) = self.store.placement_snapshot(self.config.heartbeat_timeout).await?;
        let cursor_before = cursor.clone();
        let candidates: Vec<Candidate> = snapshot
            .iter()
            .map(|n| Candidate::from_record(&n.node, n.heartbeat_fresh, n.reserved_cpu_millis, n.reserved_memory_bytes))
            .collect();
        let mut placer = Placer::new(candidates, cursor);
        let plans: Vec<PlacementPlan> = needs
            .iter()
            .map(|need| {
                let plan = self.plan(need, &mut placer);
                if let Some(reason) = &plan.unplaced {
                    report.unschedulable +=
                        (need.replicas as usize).saturating_sub(need.placed.len() + plan.replicas.len());
                    report.unschedulable_reason = Some(reason.clone());
                }
                plan
            })
            .collect();
        let cursor = placer.cursor().filter(|c| Some(*c) != cursor_before.as_ref());
        let committed = self.store.commit_placements(lease, &plans, cursor).await?;
        report.replicas_placed = committed.placed;
        for plan in plans.iter().filter(|p| !p.replicas.is_empty() && !committed.stale.contains(&p.deployment_id)) {
            tracing::info!(
                deployment.id = %plan.deployment_id,
                placed = plan.replicas.len(),
                nodes = ?plan.replicas.iter().map(|r| r.node_id.as_str()).collect::<Vec<_>>(),
                "replicas placed"
            );
        }
        let chosen: Vec<NodeId> = plans.iter().flat_map(|p| p.replicas.iter().map(|r| r.node_id.clone())).collect();
        self.wake_nodes(chosen.iter()).await;
        Ok(())
    }

    /// Decides a node for each missing replica of one deployment, updating
    /// the placer as it goes.
    fn plan(&self, need: &PlacementNeed, placer: &mut Placer) -> PlacementPlan {
        let strategy = need.placement.strategy.unwrap_or(self.config.default_strategy);
        let mut avoid: Vec<NodeId> = need.nodes.clone();
        let mut replicas = Vec::new();
        let mut unplaced = None;
        for index in (0..need.replicas as i32).filter(|i| !need.placed.contains(i)) {
            let request = Request {
                strategy,
                cpu_millis: need.limits.cpu_millis,
                memory_bytes: need.limits.memory_bytes,
                constraints: &need.placement.constraints,
                avoid: &avoid,
            };
            match placer.choose(&request) {
                Ok(choice) => {
                    placer.commit(choice.index, &request);
                    let node = placer.node(choice.index);
                    avoid.push(node.node_id.clone());
                    replicas.push(NewReplica {
                        id: ReplicaId::new(),
                        replica_index: index,
                        node_id: node.node_id.clone(),
                        address: node.address.clone(),
                        reason: choice.reason,
                    });
                }
                Err(no_fit) => {
                    unplaced = Some(no_fit.to_string());
                    break;
                }
            }
        }
        let route = need.domain.clone().map(|domain| self.route_record(need, domain));
        PlacementPlan { deployment_id: need.deployment_id, generation: need.generation, replicas, route, unplaced }
    }

    /// Wakes each node's agent once.
    async fn wake_nodes(&self, nodes: impl Iterator<Item = &NodeId>) {
        let nodes: BTreeSet<&NodeId> = nodes.collect();
        for node in nodes {
            self.wake.wake(&agent_topic(node.as_str())).await;
        }
    }

    fn route_record(&self, need: &PlacementNeed, domain: flotilla_types::Hostname) -> RouteRecord {
        let (tls_enabled, cert_resolver) = self.config.edge.route_tls();
        RouteRecord {
            deployment_id: need.deployment_id,
            domain,
            path_prefix: need.path_prefix.clone(),
            tls_enabled,
            cert_resolver,
        }
    }
}
