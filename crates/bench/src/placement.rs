//! Benchmarks of placement:
//! - `placement-decisions`: one decision (choose a node, update the
//!   indexes, and a departure's update) over 1,000 / 10,000 / 100,000
//!   simulated nodes, beside the naive sort-all baseline and a single-pass
//!   scan on the same nodes and requests;
//! - `placement-commit`: replicas placed per second by the orchestrator's
//!   rounds against a real PostgreSQL (snapshot, decisions, one transaction
//!   writing location and routing rows), beside the same orchestrator taking
//!   one deployment per round.

use std::collections::{BTreeMap, VecDeque};
use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_orchestrator::select::{Candidate, Placer, Request, choose_by_scanning, choose_by_sorting};
use flotilla_orchestrator::{Orchestrator, OrchestratorConfig};
use flotilla_redis::WakeBus;
use flotilla_store::NodeHeartbeat;
use flotilla_store::tenant::ensure_organization;
use flotilla_telemetry::Telemetry;
use flotilla_test_utils::TestDb;
use flotilla_types::{Constraints, DeploymentSpec, DeploymentSpecInput, NodeId, PlacementStrategy, ResourceLimits};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::stats::Samples;

const STRATEGIES: [PlacementStrategy; 4] = [
    PlacementStrategy::LeastLoaded,
    PlacementStrategy::RoundRobin,
    PlacementStrategy::Binpack,
    PlacementStrategy::Spread,
];
const REGIONS: [&str; 3] = ["eu", "us", "ap"];

/// `count` nodes of mixed sizes and loads; about 5 % drained, down or silent.
fn synthetic_nodes(count: usize, rng: &mut StdRng) -> Vec<Candidate> {
    (0..count)
        .map(|i| {
            let total_cpu = [4_000, 8_000, 16_000][rng.random_range(0..3)];
            let total_memory: i64 = [8, 16, 64][rng.random_range(0..3)] << 30;
            let deployments = rng.random_range(0..60);
            let (availability, status, fresh) = match rng.random_range(0..100) {
                0..=1 => ("drain", "ready", true),
                2..=3 => ("active", "down", false),
                4 => ("active", "ready", false),
                _ => ("active", "ready", true),
            };
            Candidate {
                node_id: NodeId::parse(&format!("node-{i:06}")).expect("a node id"),
                address: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                availability: availability.to_owned(),
                status: status.to_owned(),
                heartbeat_fresh: fresh,
                labels: BTreeMap::from([("region".to_owned(), REGIONS[i % 3].to_owned())]),
                total_cpu_millis: total_cpu,
                total_memory_bytes: total_memory,
                used_cpu_millis: rng.random_range(0..total_cpu / 2),
                reserved_cpu_millis: i64::from(deployments) * 50,
                reserved_memory_bytes: i64::from(deployments) * (64 << 20),
                deployment_count: deployments,
                max_deployments: 100,
            }
        })
        .collect()
}

/// One replica to place: its needs, and the deployment it belongs to (three
/// replicas each, so anti-affinity has nodes to avoid).
#[derive(Clone)]
struct Ask {
    cpu_millis: i64,
    memory_bytes: i64,
    constrained: bool,
    replica: usize,
}

fn asks(count: usize, rng: &mut StdRng) -> Vec<Ask> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let cpu_millis = [50, 100, 250][rng.random_range(0..3)];
        let memory_bytes: i64 = [64, 128, 256][rng.random_range(0..3)] << 20;
        // One deployment in four asks for region=eu.
        let constrained = rng.random_range(0..4) == 0;
        for replica in 0..3 {
            out.push(Ask { cpu_millis, memory_bytes, constrained, replica });
        }
    }
    out.truncate(count);
    out
}

/// The decisions of one run: who was placed where, so that departures keep
/// the cluster in a steady state (a replica leaves for each one placed once
/// `live` replicas are placed).
struct Churn {
    placed: VecDeque<(usize, i64, i64)>,
    live: usize,
}

impl Churn {
    fn new(nodes: usize) -> Self {
        Self { placed: VecDeque::new(), live: nodes * 5 }
    }

    fn departure(&mut self, node: usize, cpu: i64, memory: i64) -> Option<(usize, i64, i64)> {
        self.placed.push_back((node, cpu, memory));
        if self.placed.len() > self.live { self.placed.pop_front() } else { None }
    }
}

/// What the decision loop runs against: the indexes (ours), or a plain
/// node list with a baseline's way of deciding.
trait Cluster {
    /// Chooses a node for `request` and records the replica on it.
    fn place(&mut self, request: &Request<'_>) -> anyhow::Result<usize>;
    /// Records that a replica with these needs left node `i`.
    fn depart(&mut self, i: usize, cpu: i64, memory: i64);
    fn node_id(&self, i: usize) -> &NodeId;
    fn len(&self) -> usize;
}

impl Cluster for Placer {
    fn place(&mut self, request: &Request<'_>) -> anyhow::Result<usize> {
        let choice = self.choose(request).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.commit(choice.index, request);
        black_box(&choice.reason);
        Ok(choice.index)
    }

    fn depart(&mut self, i: usize, cpu: i64, memory: i64) {
        self.release(i, cpu, memory);
    }

    fn node_id(&self, i: usize) -> &NodeId {
        &self.node(i).node_id
    }

    fn len(&self) -> usize {
        self.nodes().len()
    }
}

/// A baseline: every node in a list, and a function that looks at them all.
struct Listed {
    nodes: Vec<Candidate>,
    decide: fn(&[Candidate], &Request<'_>) -> Option<usize>,
}

impl Listed {
    fn apply(&mut self, i: usize, cpu: i64, memory: i64, sign: i32) {
        let node = &mut self.nodes[i];
        node.deployment_count += sign;
        node.reserved_cpu_millis += i64::from(sign) * cpu;
        node.reserved_memory_bytes += i64::from(sign) * memory;
    }
}

impl Cluster for Listed {
    fn place(&mut self, request: &Request<'_>) -> anyhow::Result<usize> {
        let i = (self.decide)(&self.nodes, request).context("the baseline found no node")?;
        self.apply(i, request.cpu_millis, request.memory_bytes, 1);
        Ok(i)
    }

    fn depart(&mut self, i: usize, cpu: i64, memory: i64) {
        self.apply(i, cpu, memory, -1);
    }

    fn node_id(&self, i: usize) -> &NodeId {
        &self.nodes[i].node_id
    }

    fn len(&self) -> usize {
        self.nodes.len()
    }
}

/// Runs `asks` on `cluster`, timing each decision with its updates for the
/// replica placed and for the one that departs.
fn run(
    cluster: &mut impl Cluster,
    asks: &[Ask],
    strategy: PlacementStrategy,
    eu: &Constraints,
) -> anyhow::Result<Samples> {
    let none = Constraints::default();
    let mut churn = Churn::new(cluster.len());
    let mut avoid: Vec<NodeId> = Vec::new();
    let mut times = Vec::with_capacity(asks.len());
    for ask in asks {
        if ask.replica == 0 {
            avoid.clear();
        }
        let started = Instant::now();
        let request = Request {
            strategy,
            cpu_millis: ask.cpu_millis,
            memory_bytes: ask.memory_bytes,
            constraints: if ask.constrained { eu } else { &none },
            avoid: &avoid,
        };
        let i = cluster.place(&request)?;
        if let Some((j, cpu, memory)) = churn.departure(i, ask.cpu_millis, ask.memory_bytes) {
            cluster.depart(j, cpu, memory);
        }
        times.push(started.elapsed());
        avoid.push(cluster.node_id(i).clone());
    }
    Ok(Samples::new(times))
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn line(name: &str, samples: &Samples) -> String {
    let total: f64 = micros(samples.percentile(50.0));
    format!(
        "    {name:<28} n={:<7} p50={:>9.2} us  p99={:>9.2} us  max={:>10.2} us  (~{:>9.0} decisions/s at p50)",
        samples.len(),
        micros(samples.percentile(50.0)),
        micros(samples.percentile(99.0)),
        micros(samples.max()),
        1e6 / total.max(1e-3)
    )
}

pub fn decisions(node_counts: &[usize], count: usize, baseline_budget: Duration) -> anyhow::Result<()> {
    let eu = Constraints::parse("constraints", &BTreeMap::from([("region".to_owned(), "eu".to_owned())]))?;
    println!("placement decisions: {count} per strategy and cluster size; each = choose + index update + a departure");
    for &n in node_counts {
        let mut rng = StdRng::seed_from_u64(n as u64);
        let nodes = synthetic_nodes(n, &mut rng);
        let asks = asks(count, &mut rng);
        let started = Instant::now();
        let built = Placer::new(nodes.clone(), None);
        println!("{n} nodes: indexes built in {:.1} ms (once per round)", started.elapsed().as_secs_f64() * 1e3);
        black_box(built);
        for strategy in STRATEGIES {
            let mut placer = Placer::new(nodes.clone(), None);
            let run_started = Instant::now();
            let indexed = run(&mut placer, &asks, strategy, &eu)?;
            let wall = run_started.elapsed();
            println!("  {strategy}: {:.0} decisions/s over the run", asks.len() as f64 / wall.as_secs_f64());
            println!("{}", line("indexed (ours)", &indexed));
            // The baselines get as many decisions as fit their time budget.
            let baseline = |decide| Listed { nodes: nodes.clone(), decide };
            let probe = run(&mut baseline(choose_by_sorting), &asks[..3], strategy, &eu)?;
            let per = probe.max().max(Duration::from_micros(1));
            let budget = ((baseline_budget.as_secs_f64() / per.as_secs_f64()) as usize).clamp(30, asks.len());
            let sorted = run(&mut baseline(choose_by_sorting), &asks[..budget], strategy, &eu)?;
            let scanned = run(&mut baseline(choose_by_scanning), &asks[..budget], strategy, &eu)?;
            println!("{}", line("sort-all baseline", &sorted));
            println!("{}", line("single-scan baseline", &scanned));
            let ratio = |a: &Samples, b: &Samples, p: f64| micros(a.percentile(p)) / micros(b.percentile(p)).max(1e-3);
            println!(
                "    speed-up over sort-all: {:.0}x at p50, {:.0}x at p99; over one scan: {:.0}x at p50, {:.0}x at p99",
                ratio(&sorted, &indexed, 50.0),
                ratio(&sorted, &indexed, 99.0),
                ratio(&scanned, &indexed, 50.0),
                ratio(&scanned, &indexed, 99.0)
            );
        }
    }
    Ok(())
}

fn heartbeat(i: usize) -> anyhow::Result<NodeHeartbeat> {
    Ok(NodeHeartbeat {
        node_id: NodeId::parse(&format!("bench-node-{i:03}"))?,
        hostname: format!("bench-node-{i:03}"),
        address: format!("10.0.0.{}", i + 1),
        role: "worker".into(),
        labels: BTreeMap::new(),
        total_cpu_millis: 64_000,
        total_memory_bytes: 256 << 30,
        used_cpu_millis: 0,
        used_memory_bytes: 0,
        max_deployments: 100_000,
        agent_version: "bench".into(),
        fence_after: None,
    })
}

/// Creates `count` routed deployments of `replicas` replicas each, and
/// `nodes` nodes; places them all with rounds of `batch` deployments.
/// Returns the replicas placed and the time the rounds took.
async fn place_all(count: usize, replicas: i32, nodes: usize, batch: i64) -> anyhow::Result<(usize, Duration, usize)> {
    let db = TestDb::new().await;
    let store = db.store.clone();
    let (org, _) = ensure_organization(store.pool(), "bench", "Bench").await?;
    for i in 0..nodes {
        store.upsert_heartbeat(&heartbeat(i)?).await?;
    }
    for i in 0..count {
        let spec = DeploymentSpec::validate(DeploymentSpecInput {
            name: format!("app-{i}"),
            image: "flotilla/demo-http:latest".into(),
            port: 8080,
            domain: format!("app-{i}.bench.example.com"),
            replicas: Some(replicas),
            limits: ResourceLimits { memory_bytes: 64 << 20, cpu_millis: 100 },
            ..DeploymentSpecInput::default()
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        store.tenant(org).create_deployment(None, &spec).await?;
    }
    let config = OrchestratorConfig {
        batch_size: batch,
        default_strategy: PlacementStrategy::Spread,
        holder: format!("bench-{batch}"),
        ..OrchestratorConfig::default()
    };
    let orchestrator =
        Orchestrator::new(config, store.clone(), WakeBus::local_only(), Telemetry::new("bench", "0"), None);
    if !orchestrator.lead_once().await? {
        bail!("the bench orchestrator could not take the lease");
    }
    let mut placed = 0;
    let mut rounds = 0;
    let started = Instant::now();
    loop {
        let report = orchestrator.run_round().await;
        if let Some(error) = report.error {
            bail!("round failed: {error}");
        }
        if report.deployments_considered == 0 {
            break;
        }
        placed += report.replicas_placed;
        rounds += 1;
    }
    let took = started.elapsed();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM deployment_locations").fetch_one(store.pool()).await?;
    let routes: i64 = sqlx::query_scalar("SELECT count(*) FROM deployment_routing").fetch_one(store.pool()).await?;
    if rows as usize != count * replicas as usize || routes as usize != count || placed != rows as usize {
        bail!(
            "expected {} location rows and {count} routes; found {rows} and {routes} ({placed} reported)",
            count * replicas as usize
        );
    }
    Ok((placed, took, rounds))
}

pub async fn commit(
    deployments: usize,
    replicas: i32,
    nodes: usize,
    batch: i64,
    baseline: usize,
) -> anyhow::Result<()> {
    println!(
        "placement with the database: {deployments} routed deployments x {replicas} replicas on {nodes} nodes (spread), \
         PostgreSQL on loopback"
    );
    let (placed, took, rounds) = place_all(deployments, replicas, nodes, batch).await?;
    let ours = placed as f64 / took.as_secs_f64();
    println!(
        "  rounds of {batch} deployments:       {placed} replicas in {rounds} rounds, {:.0} ms: {ours:>8.0} replicas/s",
        took.as_secs_f64() * 1e3
    );
    let (placed, took, rounds) = place_all(baseline, replicas, nodes, 1).await?;
    let one = placed as f64 / took.as_secs_f64();
    println!(
        "  one deployment per round (baseline): {placed} replicas in {rounds} rounds, {:.0} ms: {one:>8.0} replicas/s",
        took.as_secs_f64() * 1e3
    );
    println!("  {:.1}x the baseline (goal: at least 1,000 placements/s)", ours / one);
    Ok(())
}
