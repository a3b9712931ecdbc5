//! Flotilla's benchmarks. Each prints its figure beside a baseline measured
//! in the same run; `BENCHMARKS.md` records the results and the commands.
//!
//! Needs the development services (`scripts/dev-services.sh start`) and the
//! demo image (`scripts/build-images.sh`). Run in release mode:
//!   cargo run --release -p flotilla-bench -- <benchmark> [options]

// Printing its figures is what a benchmark is for.
#![allow(clippy::print_stdout)]

mod api;
mod cluster;
mod data_failover;
mod edge;
mod metrics;
mod placement;
mod stats;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptionsBuilder, RemoveContainerOptionsBuilder,
};
use clap::{Parser, Subcommand};
use flotilla_agent::plan::{self, PlanInput};
use flotilla_docker::{ManagedContainer, RunState};
use flotilla_e2e::{DEMO_IMAGE, TestFlotilla, replica_container};
use flotilla_store::{Assignment, DeploymentRecord, ReplicaRecord};
use flotilla_types::status::Health;
use flotilla_types::{
    DeploymentId, DeploymentSpec, DeploymentSpecInput, DesiredState, NodeId, OrganizationId, ProjectId, ReplicaId,
    ReplicaState, labels,
};
use serde_json::json;
use stats::{Samples, ms};

#[derive(Debug, Parser)]
#[command(name = "flotilla-bench", about = "Flotilla's benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// GetDeployment over Connect JSON with OIDC authentication on, from
    /// `connections` concurrent clients on loopback, beside `/health`.
    ApiReads {
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        deployments: usize,
    },
    /// CreateDeployment to the app answering HTTP, beside a bare
    /// create+start of the same image through the Docker API.
    Deploy {
        #[arg(long, default_value_t = 50)]
        count: usize,
    },
    /// Many deployments at once (the agent starts at most 4 at a time)
    /// beside as many bare starts at once through the Docker API.
    Burst {
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// The agent's cap on starts at once.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
    },
    /// A killed container seen by the agent (events path), and a removed one
    /// replaced.
    Detect {
        #[arg(long, default_value_t = 20)]
        count: usize,
    },
    /// A reconciliation pass on a node with real containers, beside the
    /// engine's container list alone.
    Reconcile {
        #[arg(long, default_value_t = 200)]
        containers: usize,
        #[arg(long, default_value_t = 20)]
        passes: usize,
    },
    /// The reconciliation diff alone over synthetic rows and containers.
    Diff {
        #[arg(long, default_value_t = 100_000)]
        size: usize,
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Cost of a container sample: cgroup files, Docker one-shot stats,
    /// Docker streaming stats, on real containers.
    MetricsSources {
        #[arg(long, default_value_t = 100)]
        containers: usize,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// Collection rounds with 1,000 subscribers that never read, beside
    /// rounds with none; memory held.
    MetricsFanout {
        #[arg(long, default_value_t = 200)]
        containers: usize,
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 30)]
        rounds: usize,
    },
    /// Placement decisions over simulated clusters, beside a sort-all and a
    /// single-scan baseline.
    PlacementDecisions {
        /// Cluster sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1_000, 10_000, 100_000])]
        nodes: Vec<usize>,
        #[arg(long, default_value_t = 200_000)]
        decisions: usize,
        /// Time given to each baseline run, in seconds.
        #[arg(long, default_value_t = 2.0)]
        baseline_seconds: f64,
    },
    /// Replicas placed per second with the database commit, beside one
    /// deployment per round.
    PlacementCommit {
        #[arg(long, default_value_t = 5_000)]
        deployments: usize,
        #[arg(long, default_value_t = 2)]
        replicas: i32,
        #[arg(long, default_value_t = 20)]
        nodes: usize,
        /// Deployments per round.
        #[arg(long, default_value_t = 500)]
        batch: i64,
        /// Deployments placed by the one-per-round baseline.
        #[arg(long, default_value_t = 500)]
        baseline: usize,
    },
    /// The route table at 10,000 and 100,000 routes: one render per change
    /// and polls answered from it, beside rendering it for every poll.
    RouteTable {
        #[arg(long, value_delimiter = ',', default_values_t = vec![10_000, 100_000])]
        routes: Vec<usize>,
        #[arg(long, default_value_t = 30)]
        polls: usize,
    },
    /// A replica healthy to its first 200 through a real Traefik, and a stop
    /// to Traefik no longer routing: long-polled, beside polling each second.
    RoutePropagation {
        #[arg(long, default_value_t = 30)]
        runs: usize,
    },
    /// On scripts/cluster.sh's cluster: node 3 lost by a power cut and a
    /// partition in turn; a `fence` and a `replace` deployment moved and
    /// routed through Traefik, beside a Swarm service rescheduled by Swarm;
    /// then drains of node 2.
    ClusterFailover {
        /// Node losses (power cuts and partitions alternate).
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long, default_value_t = 5)]
        drains: usize,
        /// The flotillad the cluster runs (default: beside this binary).
        #[arg(long)]
        flotillad: Option<std::path::PathBuf>,
    },
    /// On scripts/cluster.sh's cluster with the HA data plane: the
    /// PostgreSQL primary's node lost, to the first write accepted, beside one
    /// plain PostgreSQL killed and started again at once.
    DatabaseFailover {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// The flotillad the cluster runs (default: beside this binary).
        #[arg(long)]
        flotillad: Option<std::path::PathBuf>,
    },
    /// Rows per second into PostgreSQL: the writer beside one INSERT per row.
    MetricsIngest {
        #[arg(long, default_value_t = 500_000)]
        rows: usize,
        #[arg(long, default_value_t = 20_000)]
        baseline_rows: usize,
        #[arg(long, default_value_t = 5_000)]
        batch: usize,
    },
}

/// Polling period when one start is measured at a time.
const FAST_POLL: Duration = Duration::from_millis(2);
/// Polling period of each of many clients measuring at once.
const BURST_POLL: Duration = Duration::from_millis(25);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.bench {
        Bench::ApiReads { connections, seconds, deployments } => api::reads(connections, seconds, deployments).await,
        Bench::Deploy { count } => deploy(count).await,
        Bench::Burst { count, parallel } => burst(count, parallel).await,
        Bench::Detect { count } => detect(count).await,
        Bench::Reconcile { containers, passes } => reconcile(containers, passes).await,
        Bench::Diff { size, runs } => {
            diff(size, runs);
            Ok(())
        }
        Bench::MetricsSources { containers, rounds } => metrics::sources(containers, rounds).await,
        Bench::MetricsFanout { containers, subscribers, rounds } => {
            metrics::fanout(containers, subscribers, rounds).await
        }
        Bench::PlacementDecisions { nodes, decisions, baseline_seconds } => {
            placement::decisions(&nodes, decisions, Duration::from_secs_f64(baseline_seconds))
        }
        Bench::PlacementCommit { deployments, replicas, nodes, batch, baseline } => {
            placement::commit(deployments, replicas, nodes, batch, baseline).await
        }
        Bench::MetricsIngest { rows, baseline_rows, batch } => metrics::ingest(rows, baseline_rows, batch).await,
        Bench::RouteTable { routes, polls } => edge::table(&routes, polls).await,
        Bench::RoutePropagation { runs } => edge::propagation(runs).await,
        Bench::ClusterFailover { runs, drains, flotillad } => {
            cluster::failover(runs, drains, &beside_this(flotillad)?).await
        }
        Bench::DatabaseFailover { runs, flotillad } => data_failover::failover(runs, &beside_this(flotillad)?).await,
    }
}

/// The flotillad given, or the one beside this binary.
fn beside_this(flotillad: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    match flotillad {
        Some(path) => Ok(path),
        None => Ok(std::env::current_exe()?.with_file_name("flotillad")),
    }
}

/// GETs `url` every `poll` until it answers 200.
async fn until_serving(http: &reqwest::Client, url: &str, poll: Duration, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(response) = http.get(url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("{url} did not answer within {timeout:?}");
        }
        tokio::time::sleep(poll).await;
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The floor: create and start the demo image through the Docker API, on the
/// same network, with Docker's init and a published port, as the agent does;
/// then wait until it answers HTTP.
async fn bare_start(
    flotilla: &TestFlotilla,
    http: &reqwest::Client,
    network: &str,
    poll: Duration,
) -> anyhow::Result<Duration> {
    let docker = &flotilla.docker.docker;
    let port = free_port()?;
    let name = format!("bench-floor-{}", flotilla_test_utils::unique_suffix());
    let body = ContainerCreateBody {
        image: Some(DEMO_IMAGE.to_owned()),
        env: Some(vec!["PORT=8080".to_owned(), "FLOTILLA_DEPLOYMENT_NAME=floor".to_owned()]),
        labels: Some(flotilla.docker.labels()),
        exposed_ports: Some(vec!["8080/tcp".to_owned()]),
        host_config: Some(HostConfig {
            port_bindings: Some(HashMap::from([(
                "8080/tcp".to_owned(),
                Some(vec![PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(port.to_string()) }]),
            )])),
            init: Some(true),
            network_mode: Some(network.to_owned()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let started = Instant::now();
    let created =
        docker.create_container(Some(CreateContainerOptionsBuilder::default().name(&name).build()), body).await?;
    docker.start_container(&created.id, None).await?;
    until_serving(http, &format!("http://127.0.0.1:{port}/"), poll, Duration::from_secs(60)).await?;
    let took = started.elapsed();
    docker.remove_container(&created.id, Some(RemoveContainerOptionsBuilder::default().force(true).build())).await?;
    Ok(took)
}

/// CreateDeployment until the app answers HTTP at the endpoint the API lists.
/// Polls every `poll`: 2 ms when one deployment is measured at a time; more
/// when many are, so that the clients do not take the engine's CPU.
async fn flotilla_start(
    flotilla: &TestFlotilla,
    http: &reqwest::Client,
    name: &str,
    poll: Duration,
) -> anyhow::Result<(Duration, String)> {
    let started = Instant::now();
    let id = flotilla.create(json!({ "name": name, "image": DEMO_IMAGE, "port": 8080 })).await;
    // No engine starts a container in under 150 ms here; polling the API
    // every 2 ms from the first moment would load the 2 cores the engine
    // needs (the floor's client likewise only polls once `start` returned).
    tokio::time::sleep(Duration::from_millis(150)).await;
    let endpoint = loop {
        let deployment = flotilla.get(&id).await;
        if let Some(endpoint) = deployment["replicas"][0]["endpoint"].as_str().filter(|e| !e.is_empty()) {
            break endpoint.to_owned();
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("{name} never got an endpoint: {deployment}");
        }
        tokio::time::sleep(poll).await;
    };
    until_serving(http, &format!("{endpoint}/"), poll, Duration::from_secs(60)).await?;
    Ok((started.elapsed(), id))
}

async fn delete_and_wait(flotilla: &TestFlotilla, id: &str) -> anyhow::Result<()> {
    flotilla.connect_json("DeleteDeployment", json!({ "id": id })).await;
    flotilla.wait_for(id, Duration::from_secs(60), |status, _| status == 404).await;
    Ok(())
}

async fn deploy(count: usize) -> anyhow::Result<()> {
    let flotilla = TestFlotilla::start().await;
    let result = deploy_with(&flotilla, count).await;
    // Drained before the fixtures clean up, whether the run failed or not.
    flotilla.stop().await;
    result
}

async fn deploy_with(flotilla: &TestFlotilla, count: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    println!("deploy latency: {count} deployments, one at a time, interleaved with bare starts");
    // Warm-up (not measured): makes the shared network, warms caches and pools.
    for i in 0..3 {
        let (_, id) = flotilla_start(flotilla, &http, &format!("warm-{i}"), FAST_POLL).await?;
        delete_and_wait(flotilla, &id).await?;
        bare_start(flotilla, &http, flotilla_agent::SHARED_NETWORK, FAST_POLL).await?;
    }
    let mut floor = Vec::with_capacity(count);
    let mut ours = Vec::with_capacity(count);
    let mut differences = Vec::with_capacity(count);
    for i in 0..count {
        let bare = bare_start(flotilla, &http, flotilla_agent::SHARED_NETWORK, FAST_POLL).await?;
        let (took, id) = flotilla_start(flotilla, &http, &format!("bench-{i}"), FAST_POLL).await?;
        delete_and_wait(flotilla, &id).await?;
        floor.push(bare);
        ours.push(took);
        differences.push(took.saturating_sub(bare));
    }
    let (floor, ours) = (Samples::new(floor), Samples::new(ours));
    println!("{}", floor.line("bare create+start (floor)"));
    println!("{}", ours.line("CreateDeployment to serving"));
    println!(
        "overhead over the floor: p50 {:+.1} ms, p99 {:+.1} ms (goal: under 25 ms at p50)",
        ms(ours.percentile(50.0)) - ms(floor.percentile(50.0)),
        ms(ours.percentile(99.0)) - ms(floor.percentile(99.0)),
    );
    let paired = Samples::new(differences);
    println!("per-pair overhead (ours - the floor just before): p50 {:.1} ms", ms(paired.percentile(50.0)));
    Ok(())
}

async fn burst(count: usize, parallel: usize) -> anyhow::Result<()> {
    let flotilla = TestFlotilla::start_with(|s| s.agent.max_parallel_starts = parallel).await;
    let result = burst_with(&flotilla, count, parallel).await;
    // Drained before the fixtures clean up, whether the run failed or not.
    flotilla.stop().await;
    result
}

async fn burst_with(flotilla: &TestFlotilla, count: usize, parallel: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let (_, warm) = flotilla_start(flotilla, &http, "warm", FAST_POLL).await?;
    delete_and_wait(flotilla, &warm).await?;
    println!("burst: {count} starts requested at once");

    let started = Instant::now();
    let bare = futures::future::try_join_all(
        (0..count).map(|_| bare_start(flotilla, &http, flotilla_agent::SHARED_NETWORK, BURST_POLL)),
    )
    .await?;
    let bare_total = started.elapsed();

    let started = Instant::now();
    let ours = futures::future::try_join_all((0..count).map(|i| {
        let http = &http;
        async move { flotilla_start(flotilla, http, &format!("burst-{i}"), BURST_POLL).await.map(|(took, _)| took) }
    }))
    .await?;
    let ours_total = started.elapsed();

    println!("{}", Samples::new(bare).line("bare, all at once: each"));
    println!("  all {count} serving after {:.0} ms", ms(bare_total));
    println!("{}", Samples::new(ours).line(&format!("Flotilla, {parallel} at a time: each")));
    println!("  all {count} serving after {:.0} ms", ms(ours_total));
    Ok(())
}

async fn detect(count: usize) -> anyhow::Result<()> {
    let flotilla = TestFlotilla::start().await;
    let result = detect_with(&flotilla, count).await;
    // Drained before the fixtures clean up, whether the run failed or not.
    flotilla.stop().await;
    result
}

async fn detect_with(flotilla: &TestFlotilla, count: usize) -> anyhow::Result<()> {
    let agent = flotilla.agent();
    let id = flotilla.deploy_demo("detect", 1).await;
    let docker = &flotilla.docker.docker;
    println!("failure detection: {count} rounds of kill (seen?) then rm -f (replaced?)");
    let (mut seen, mut replaced) = (Vec::new(), Vec::new());
    for _ in 0..count {
        let container = replica_container(&flotilla.get(&id).await, 0).context("a container")?;
        let events_before = agent.event_stats().received;
        let killed_at = chrono::Utc::now();
        let started = Instant::now();
        docker.kill_container(&container, Some(KillContainerOptionsBuilder::default().signal("KILL").build())).await?;
        // Seen: the `die` event received and a pass run after it.
        loop {
            let pass = agent.last_pass();
            if agent.event_stats().received > events_before && pass.started_at.is_some_and(|t| t > killed_at) {
                seen.push(started.elapsed());
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("the kill was never seen");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // A fresh container for the next round (Docker backs off restarting
        // the same one more each time it is killed).
        let started = Instant::now();
        docker.remove_container(&container, Some(RemoveContainerOptionsBuilder::default().force(true).build())).await?;
        flotilla
            .wait_for(&id, Duration::from_secs(30), |status, body| {
                status == 200
                    && body["deployment"]["replicas"][0]["status"] == "REPLICA_STATUS_RUNNING"
                    && body["deployment"]["replicas"][0]["containerId"].as_str().is_some_and(|c| c != container)
            })
            .await;
        replaced.push(started.elapsed());
        flotilla.wait_for(&id, Duration::from_secs(30), flotilla_e2e::is_running).await;
    }
    println!("{}", Samples::new(seen).line("kill seen by the agent (goal < 1 s)"));
    println!("{}", Samples::new(replaced).line("rm -f to a new container recorded"));
    Ok(())
}

async fn reconcile(containers: usize, passes: usize) -> anyhow::Result<()> {
    let per_deployment = 5;
    let deployments = containers.div_ceil(per_deployment);
    let flotilla = TestFlotilla::start_with(|s| {
        s.agent.max_deployments = (containers + 10) as i32;
        s.agent.reconcile_interval = Duration::from_secs(3600);
    })
    .await;
    let result = reconcile_with(&flotilla, containers, passes, deployments, per_deployment).await;
    // Drained before the fixtures clean up, whether the run failed or not.
    flotilla.stop().await;
    result
}

async fn reconcile_with(
    flotilla: &TestFlotilla,
    containers: usize,
    passes: usize,
    deployments: usize,
    per_deployment: usize,
) -> anyhow::Result<()> {
    println!("reconciliation pass: {deployments} deployments x {per_deployment} replicas");
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..deployments {
        ids.push(
            flotilla
                .create(
                    json!({ "name": format!("r{i}"), "image": DEMO_IMAGE, "port": 8080, "replicas": per_deployment }),
                )
                .await,
        );
    }
    for id in &ids {
        flotilla.wait_for(id, Duration::from_secs(600), flotilla_e2e::is_running).await;
    }
    println!(
        "  {} containers running after {:.1} s (at most 4 starts at a time)",
        containers,
        started.elapsed().as_secs_f64()
    );
    let agent = flotilla.agent();
    let docker = flotilla_docker::DockerClient::connect(&Default::default()).await?;
    let store = flotilla.db.store.clone();
    let (mut pass, mut list, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..passes {
        let report = agent.run_pass().await;
        if report.error.is_some() || report.changed_anything() {
            bail!("a pass over a settled node changed something: {report:?}");
        }
        pass.push(Duration::from_secs_f64(report.duration_ms / 1000.0));
        let t = Instant::now();
        let listed = docker.list_managed(agent.node_id()).await?;
        list.push(t.elapsed());
        assert_eq!(listed.len(), ids.len() * per_deployment);
        let t = Instant::now();
        store.node_assignments(agent.node_id()).await?;
        rows.push(t.elapsed());
    }
    let (pass, list, rows) = (Samples::new(pass), Samples::new(list), Samples::new(rows));
    println!("{}", list.line("engine list call alone (baseline)"));
    println!("{}", rows.line("database read of the node's rows"));
    println!("{}", pass.line("whole pass"));
    println!(
        "  the list call is {:.0} % of the pass at p50",
        100.0 * ms(list.percentile(50.0)) / ms(pass.percentile(50.0)).max(f64::EPSILON)
    );
    Ok(())
}

/// `size` replicas that agree with `size` running containers.
fn synthetic(size: usize) -> (Vec<Assignment>, Vec<ManagedContainer>) {
    let spec = DeploymentSpec::validate(DeploymentSpecInput {
        name: "synthetic".into(),
        image: "flotilla/demo-http:1".into(),
        port: 8080,
        ..Default::default()
    })
    .expect("valid spec");
    let node = NodeId::parse("bench").expect("node id");
    let now = chrono::Utc::now();
    let mut assignments = Vec::with_capacity(size);
    let mut containers = Vec::with_capacity(size);
    for i in 0..size {
        let replica = ReplicaId::new();
        let deployment_id = DeploymentId::new();
        let container_id = format!("{:064x}", i + 1);
        let port = 20_000 + (i % 40_000) as u16;
        assignments.push(Assignment {
            replica: ReplicaRecord {
                id: replica,
                deployment_id,
                replica_index: 0,
                generation: 1,
                target_generation: 1,
                failed_generation: None,
                rollout_message: None,
                node_id: node.clone(),
                container_id: Some(container_id.clone()),
                container_name: Some(format!("c{i}")),
                status: ReplicaState::Running,
                health: Health::Healthy,
                address: Some("127.0.0.1".into()),
                port: Some(port),
                container_port: 8080,
                status_message: None,
                placement_reason: None,
                moving: false,
                retiring: false,
                node_reachable: true,
                restart_count: 0,
                last_exit_code: None,
                last_exit_at: None,
                updated_at: now,
            },
            deployment: DeploymentRecord {
                id: deployment_id,
                organization_id: OrganizationId::new(),
                project_id: ProjectId::new(),
                spec: spec.clone(),
                desired_state: DesiredState::Running,
                generation: 1,
                placement_message: None,
                created_at: now,
                updated_at: now,
            },
        });
        containers.push(ManagedContainer {
            id: container_id,
            name: format!("c{i}"),
            state: RunState::Running,
            labels: HashMap::from([
                (labels::REPLICA_ID.to_owned(), replica.to_string()),
                (labels::GENERATION.to_owned(), "1".to_owned()),
            ]),
            host_ports: vec![port],
            ip_address: None,
            docker_health: None,
            exit_code: None,
        });
    }
    (assignments, containers)
}

fn diff(size: usize, runs: usize) {
    println!("reconciliation diff over synthetic rows and containers");
    for n in [size / 10, size] {
        let (assignments, mut containers) = synthetic(n);
        // Some work to find: every 100th container gone.
        containers.retain(|c| !c.id.ends_with("00"));
        let busy = HashSet::new();
        let mut samples = Vec::with_capacity(runs);
        let mut actions = 0;
        for _ in 0..runs {
            let started = Instant::now();
            let planned = plan::plan(PlanInput {
                assignments: &assignments,
                containers: &containers,
                busy: &busy,
                held: &busy,
                now: chrono::Utc::now(),
                failed_retry_after: Duration::from_secs(10),
            });
            samples.push(started.elapsed());
            actions = planned.len();
        }
        println!("{} ({actions} actions)", Samples::new(samples).line(&format!("diff of {n} rows/containers")));
    }
    println!("goal: under 100 ms at 100,000");
}
