//! The orchestrator: decides where each replica runs and how traffic reaches
//! it. A round reads the deployments that want more replicas than they have,
//! picks a node for each missing replica, and writes the replica rows, their
//! Traefik labels and the deployment's route in one transaction; then it
//! wakes the chosen nodes' agents. It also removes deleted deployments once
//! their agents have removed every replica.
//!
//! Rounds are idempotent and level-triggered: they run on every wake-up and
//! on a timer.

pub mod metrics;
pub mod select;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use flotilla_redis::{ORCHESTRATOR_TOPIC, WakeBus, agent_topic};
use flotilla_runtime::{Next, PeriodicTask, run_periodically};
use flotilla_store::placement::{NewReplica, PlacementNeed, PlacementOutcome, RouteRecord};
use flotilla_store::{Store, StoreError};
use flotilla_telemetry::Telemetry;
use flotilla_types::routing::{EdgeSettings, PathPrefix, Route, Tls};
use flotilla_types::{NodeId, ReplicaId};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use select::{NodeLoad, least_loaded};

/// The orchestrator's settings.
#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// A node not heard from for this long takes no new replicas.
    pub heartbeat_timeout: Duration,
    /// A round runs at least this often, wake-ups or not.
    pub interval: Duration,
    /// Deployments looked at per round.
    pub batch_size: i64,
    pub edge: EdgeSettings,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_secs(15),
            interval: Duration::from_secs(10),
            batch_size: 500,
            edge: EdgeSettings::default(),
        }
    }
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
}

impl Orchestrator {
    pub fn new(config: OrchestratorConfig, store: Store, wake: WakeBus, telemetry: Telemetry) -> Arc<Self> {
        let stats = Arc::new(metrics::OrchestratorStats::default());
        telemetry.register(Box::new(metrics::collector(&stats)));
        Arc::new(Self { config, store, wake, telemetry, stats, last_round: Mutex::new(RoundReport::default()) })
    }

    pub fn last_round(&self) -> RoundReport {
        self.last_round.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs rounds on every wake-up and every `interval` until `cancel`.
    pub fn spawn(self: &Arc<Self>, tracker: &TaskTracker, cancel: CancellationToken) {
        let orchestrator = self.clone();
        let task = PeriodicTask {
            name: "orchestrator.placement",
            interval: self.config.interval,
            wake: Some(self.wake.waiter(ORCHESTRATOR_TOPIC)),
            pass_at_start: true,
        };
        tracker.spawn(
            run_periodically(task, cancel, move || {
                let orchestrator = orchestrator.clone();
                async move {
                    let report = orchestrator.run_round().await;
                    // Failed, or left replicas without a node: try again soon.
                    if report.error.is_some() || report.unschedulable > 0 { Next::RetrySoon } else { Next::Interval }
                }
            })
            .instrument(tracing::info_span!("orchestrator")),
        );
    }

    /// One round, with its outcome recorded for `/health`.
    pub async fn run_round(&self) -> RoundReport {
        let started = Instant::now();
        let started_at = Utc::now();
        let mut report = match self.round().await {
            Ok(report) => report,
            Err(error) => {
                self.stats.round_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "placement round failed");
                RoundReport { error: Some(error.to_string()), ..RoundReport::default() }
            }
        };
        report.started_at = Some(started_at);
        report.duration_ms = started.elapsed().as_millis() as u64;
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        self.telemetry.health.report_pass("orchestrator", report.error.as_deref(), json!({ "last_round": report }));
        *self.last_round.lock().unwrap_or_else(|e| e.into_inner()) = report.clone();
        report
    }

    #[tracing::instrument(skip_all, err)]
    async fn round(&self) -> Result<RoundReport, StoreError> {
        let mut report = RoundReport::default();
        let needs = self.store.deployments_to_place(self.config.batch_size).await?;
        report.deployments_considered = needs.len();
        if !needs.is_empty() {
            let mut nodes: Vec<NodeLoad> =
                self.store.schedulable_nodes(self.config.heartbeat_timeout).await?.iter().map(NodeLoad::from).collect();
            for need in &needs {
                let (replicas, unplaced) = self.choose_nodes(need, &mut nodes);
                if let Some(reason) = unplaced {
                    report.unschedulable += (need.replicas as usize).saturating_sub(need.placed.len() + replicas.len());
                    report.unschedulable_reason = Some(reason);
                }
                if replicas.is_empty() {
                    continue;
                }
                let route = need.domain.clone().map(|domain| self.route_record(need, domain));
                match self
                    .store
                    .commit_placement(need.deployment_id, need.generation, &replicas, route.as_ref())
                    .await?
                {
                    PlacementOutcome::Placed(n) => {
                        report.replicas_placed += n;
                        tracing::info!(deployment.id = %need.deployment_id, placed = n, "replicas placed");
                        // At once, not after the round: the agents start while we go on.
                        self.wake_nodes(replicas.iter().map(|r| &r.node_id)).await;
                    }
                    // Changed meanwhile: the next round sees the new state.
                    PlacementOutcome::Stale | PlacementOutcome::Prepared(_) => {}
                }
            }
        }
        for need in self.store.generations_to_prepare(self.config.batch_size).await? {
            let route = need.domain.clone().map(|domain| self.route_record(&need, domain));
            let labels = self.labels_for(&need);
            if let PlacementOutcome::Prepared(nodes) =
                self.store.prepare_generation(need.deployment_id, need.generation, &labels, route.as_ref()).await?
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
        self.stats.replicas_placed.fetch_add(report.replicas_placed as u64, Ordering::Relaxed);
        self.stats.unschedulable.fetch_add(report.unschedulable as u64, Ordering::Relaxed);
        self.stats.finalized.fetch_add(report.finalized as u64, Ordering::Relaxed);
        Ok(report)
    }

    /// Wakes each node's agent once.
    async fn wake_nodes(&self, nodes: impl Iterator<Item = &NodeId>) {
        let nodes: BTreeSet<&NodeId> = nodes.collect();
        for node in nodes {
            self.wake.wake(&agent_topic(node.as_str())).await;
        }
    }

    /// Picks a node for each missing replica index, updating the snapshot's
    /// counts as it goes. Returns the new replicas and, when some could not be
    /// placed, why.
    fn choose_nodes(&self, need: &PlacementNeed, nodes: &mut [NodeLoad]) -> (Vec<NewReplica>, Option<String>) {
        let mut replicas = Vec::new();
        let mut on_nodes: Vec<NodeId> = Vec::new();
        let missing = (0..need.replicas as i32).filter(|i| !need.placed.contains(i));
        for index in missing {
            match least_loaded(nodes, &on_nodes) {
                Ok(i) => {
                    let node = &mut nodes[i];
                    node.deployment_count += 1;
                    on_nodes.push(node.node_id.clone());
                    replicas.push(NewReplica {
                        id: ReplicaId::new(),
                        replica_index: index,
                        node_id: node.node_id.clone(),
                        address: node.address.clone(),
                        labels: self.labels_for(need),
                    });
                }
                Err(why) => return (replicas, Some(why.to_string())),
            }
        }
        (replicas, None)
    }

    fn route_for(need: &PlacementNeed, domain: flotilla_types::Hostname) -> Route {
        Route {
            deployment_id: need.deployment_id,
            domain,
            path_prefix: PathPrefix::root(),
            target_port: need.container_port,
        }
    }

    fn route_record(&self, need: &PlacementNeed, domain: flotilla_types::Hostname) -> RouteRecord {
        let (tls_enabled, cert_resolver) = match &self.config.edge.tls {
            Tls::Off => (false, None),
            Tls::Resolver(resolver) => (true, Some(resolver.clone())),
            Tls::Stored => (true, None),
        };
        RouteRecord { route: Self::route_for(need, domain), tls_enabled, cert_resolver }
    }

    /// Container labels the orchestrator chooses: Traefik's, when routed.
    fn labels_for(&self, need: &PlacementNeed) -> BTreeMap<String, String> {
        need.domain
            .clone()
            .map(|domain| Self::route_for(need, domain).traefik_labels(&self.config.edge))
            .unwrap_or_default()
    }
}
