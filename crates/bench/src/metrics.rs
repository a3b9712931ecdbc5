//! Benchmarks of the metrics pipeline:
//! - `metrics-sources`: the cost of a container sample through the cgroup
//!   files, through Docker one-shot stats and through Docker streaming stats,
//!   on real containers, counting the CPU of this process and of the engine
//!   (dockerd, containerd and the shims) that serves the Docker paths;
//! - `metrics-fanout`: collection rounds with no subscribers beside the same
//!   rounds with 1,000 subscribers that never read, and the memory they hold;
//! - `metrics-ingest`: rows per second into PostgreSQL with the pipeline's
//!   writer beside one INSERT per row.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, StatsOptionsBuilder};
use flotilla_docker::{DockerClient, DockerConfig};
use flotilla_metrics::cgroup::CgroupReader;
use flotilla_metrics::{Batch, Filter, MetricsConfig, MetricsPipeline, SourceChoice, Writer};
use flotilla_store::metrics::{MetricsStore, Retention};
use flotilla_telemetry::Telemetry;
use flotilla_test_utils::{DEMO_IMAGE, TestDb, TestDocker};
use flotilla_types::metrics::{Sample, SampleKey};
use flotilla_types::{DeploymentId, NodeId, OrganizationId, labels};
use futures::StreamExt;

use crate::stats::{Samples, ms};

/// CPU time of processes, from `/proc/<pid>/stat` (user + system, in clock
/// ticks of 10 ms; differences are taken over many rounds).
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some(close) = stat.rfind(')') else { return 0 };
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // Fields 14 and 15 of the whole line: utime, stime.
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    utime + stime
}

/// Pids of processes whose command name starts with one of `names`.
fn pids_named(names: &[&str]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| names.iter().any(|n| comm.trim().starts_with(n)))
        })
        .collect()
}

/// CPU used by this process and by the engine (dockerd, containerd, shims).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    ours: u64,
    engine: u64,
}

fn cpu_now(engine: &[u32]) -> Cpu {
    Cpu { ours: cpu_ticks(std::process::id()), engine: engine.iter().map(|p| cpu_ticks(*p)).sum() }
}

const TICK_MS: f64 = 10.0;

fn cpu_line(name: &str, before: Cpu, after: Cpu, units: f64, unit: &str) -> (f64, f64) {
    let ours = (after.ours - before.ours) as f64 * TICK_MS / units;
    let engine = (after.engine - before.engine) as f64 * TICK_MS / units;
    println!(
        "{name:<34} CPU per {unit}: ours {:>8.3} ms, engine {:>8.3} ms, total {:>8.3} ms",
        ours,
        engine,
        ours + engine
    );
    (ours, engine)
}

/// `count` sleeping containers labelled as managed by `node`, spread over
/// `deployments` deployments; returns their ids.
async fn start_sleepers(
    docker: &TestDocker,
    node: &NodeId,
    count: usize,
    deployments: &[DeploymentId],
) -> anyhow::Result<Vec<String>> {
    let organization = OrganizationId::new();
    let started = Instant::now();
    let ids: Vec<anyhow::Result<String>> = futures::stream::iter(0..count)
        .map(|i| {
            let deployment = deployments[i % deployments.len()];
            let mut container_labels = docker.labels();
            container_labels.extend([
                (labels::MANAGED.to_owned(), "true".to_owned()),
                (labels::NODE_ID.to_owned(), node.to_string()),
                (labels::DEPLOYMENT_ID.to_owned(), deployment.to_string()),
                (labels::ORGANIZATION_ID.to_owned(), organization.to_string()),
                (labels::REPLICA_INDEX.to_owned(), (i / deployments.len()).to_string()),
            ]);
            let name = format!("flotilla-bench-{}-{i}", docker.test_id);
            async move {
                let body = ContainerCreateBody {
                    image: Some(DEMO_IMAGE.to_owned()),
                    entrypoint: Some(vec!["/bin/busybox".into(), "sleep".into(), "3600".into()]),
                    labels: Some(container_labels),
                    host_config: Some(HostConfig { memory: Some(16 << 20), ..HostConfig::default() }),
                    ..ContainerCreateBody::default()
                };
                let options = CreateContainerOptionsBuilder::default().name(&name).build();
                let id = docker.docker.create_container(Some(options), body).await?.id;
                docker.docker.start_container(&id, None).await?;
                Ok(id)
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let ids: Vec<String> = ids.into_iter().collect::<anyhow::Result<_>>()?;
    println!("  {count} containers started in {:.1} s", started.elapsed().as_secs_f64());
    Ok(ids)
}

async fn pipeline(node: &NodeId, source: SourceChoice) -> anyhow::Result<Arc<MetricsPipeline>> {
    let docker = DockerClient::connect(&DockerConfig::default()).await?;
    let config = MetricsConfig { source, docker_parallelism: 8, ..MetricsConfig::default() };
    let pipeline = MetricsPipeline::new(config, node.clone(), docker, None, None, Telemetry::new("bench", "0")).await?;
    // As the agent runs it: rounds list containers only after one started.
    tokio::spawn(pipeline.clone().follow_events(tokio_util::sync::CancellationToken::new()));
    Ok(pipeline)
}

/// `rounds` rounds of `pipeline`, `spacing` apart; returns the round times
/// and the CPU used, per round.
async fn rounds(
    pipeline: &MetricsPipeline,
    rounds: usize,
    spacing: Duration,
    containers: usize,
    engine: &[u32],
) -> anyhow::Result<(Samples, Cpu, Cpu)> {
    pipeline.collect_once().await; // baselines
    tokio::time::sleep(spacing).await;
    let mut times = Vec::new();
    let before = cpu_now(engine);
    for _ in 0..rounds {
        let started = Instant::now();
        let report = pipeline.collect_once().await;
        times.push(started.elapsed());
        if report.samples != containers || report.failures != 0 {
            bail!("a round measured {} of {containers} containers: {report:?}", report.samples);
        }
        tokio::time::sleep(spacing.saturating_sub(started.elapsed())).await;
    }
    // The sleeps cost nothing; the CPU is the rounds'.
    Ok((Samples::new(times), before, cpu_now(engine)))
}

pub async fn sources(containers: usize, round_count: usize) -> anyhow::Result<()> {
    let docker = TestDocker::new().await;
    docker.require_demo_image().await;
    let node = docker.node_id(0);
    let deployments: Vec<DeploymentId> = (0..containers.div_ceil(5)).map(|_| DeploymentId::new()).collect();
    println!("metrics sources: {containers} containers, {round_count} rounds each");
    let ids = start_sleepers(&docker, &node, containers, &deployments).await?;
    let engine = pids_named(&["dockerd", "containerd"]);
    println!("  engine processes measured: {} (dockerd, containerd, shims)", engine.len());
    let n = containers as f64;

    // The cgroup files alone: what one container's reading costs.
    let reader = CgroupReader::detect("/sys/fs/cgroup".as_ref(), "/proc".as_ref()).context("no cgroup filesystem")?;
    let client = DockerClient::connect(&DockerConfig::default()).await?;
    let mut targets = Vec::new();
    for id in &ids {
        let runtime = client.container_runtime(id).await?.context("not running")?;
        targets.push(reader.resolve(id, runtime.pid)?);
    }
    let before = cpu_now(&[]);
    let started = Instant::now();
    let reads = 20;
    for _ in 0..reads {
        for files in &targets {
            std::hint::black_box(files.process_start()?);
            std::hint::black_box(files.read()?);
        }
    }
    let wall = started.elapsed().as_secs_f64() * 1000.0 / (reads as f64 * n);
    let (ours, _) = cpu_line("cgroup files only", before, cpu_now(&[]), reads as f64 * n, "container");
    println!("  wall {wall:.3} ms per container read");

    // Whole rounds through each path.
    let spacing = Duration::from_millis(1200); // past the engine's 1 s hold-back between one-shot calls
    // The engine's own background work over the same time (100 shims tick
    // whether or not anyone asks): subtracted from the engine's CPU below.
    let before = cpu_now(&engine);
    tokio::time::sleep(spacing * round_count as u32).await;
    let idle_engine = (cpu_now(&engine).engine - before.engine) as f64 * TICK_MS / round_count as f64;
    println!("engine idle, no calls from us      CPU per round interval: {idle_engine:.3} ms");
    let by_cgroup = pipeline(&node, SourceChoice::Cgroup).await?;
    let (times, before, after) = rounds(&by_cgroup, round_count, spacing, containers, &engine).await?;
    println!("{}", times.line("round via cgroup files"));
    let (cg_ours, cg_engine) = cpu_line("round via cgroup files", before, after, round_count as f64, "round");
    let cg_engine = (cg_engine - idle_engine).max(0.0);
    let snapshot = by_cgroup.snapshot();
    println!(
        "  container lists asked of the engine: {} (skipped in {} rounds: no container started)",
        snapshot.container_lists_total, snapshot.container_lists_skipped_total
    );
    let by_docker = pipeline(&node, SourceChoice::Docker).await?;
    let (times, before, after) = rounds(&by_docker, round_count, spacing, containers, &engine).await?;
    println!("{}", times.line("round via Docker one-shot stats"));
    let (dk_ours, dk_engine) = cpu_line("round via Docker one-shot stats", before, after, round_count as f64, "round");
    let dk_engine = (dk_engine - idle_engine).max(0.0);

    // Streaming stats: one long-lived stream per container, one sample a second each.
    let seconds = 10.0;
    let before = cpu_now(&engine);
    let started = Instant::now();
    let received: usize = futures::future::join_all(ids.iter().map(|id| {
        let docker = docker.docker.clone();
        async move {
            let options = StatsOptionsBuilder::default().stream(true).build();
            let stream = docker.stats(id, Some(options));
            let deadline = tokio::time::sleep(Duration::from_secs_f64(seconds));
            tokio::pin!(deadline);
            tokio::pin!(stream);
            let mut count = 0usize;
            loop {
                tokio::select! {
                    () = &mut deadline => return count,
                    next = stream.next() => match next {
                        Some(Ok(_)) => count += 1,
                        _ => return count,
                    },
                }
            }
        }
    }))
    .await
    .into_iter()
    .sum();
    let after = cpu_now(&engine);
    println!(
        "  streaming stats: {received} samples from {containers} streams in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (st_ours, st_engine) = cpu_line("Docker streaming stats", before, after, received as f64, "sample");
    let idle_per_sample = idle_engine * (seconds / spacing.as_secs_f64()) / received.max(1) as f64;
    let st_engine = (st_engine - idle_per_sample).max(0.0);

    println!("per container sample (CPU of this process + the engine's beyond its idle):");
    let per = |ours: f64, engine: f64| (ours + engine) * 1000.0;
    println!("  cgroup files (read only)      {:>9.1} us", ours * 1000.0);
    println!(
        "  cgroup path, whole round      {:>9.1} us  (ours {:.1} + engine {:.1})",
        per(cg_ours, cg_engine) / n,
        cg_ours * 1000.0 / n,
        cg_engine * 1000.0 / n
    );
    println!(
        "  Docker one-shot, whole round  {:>9.1} us  (ours {:.1} + engine {:.1})",
        per(dk_ours, dk_engine) / n,
        dk_ours * 1000.0 / n,
        dk_engine * 1000.0 / n
    );
    println!(
        "  Docker streaming              {:>9.1} us  per sample (ours {:.1} + engine {:.1}); it sends 5 per 5 s round",
        per(st_ours, st_engine),
        st_ours * 1000.0,
        st_engine * 1000.0
    );
    let thousand = |per_container_ms: f64| per_container_ms * 1000.0;
    println!("1,000 containers per 5 s round (goal: under 100 ms of CPU, 2 % of one core):");
    println!("  cgroup path      {:>8.1} ms", thousand((cg_ours + cg_engine) / n));
    println!("  Docker one-shot  {:>8.1} ms", thousand((dk_ours + dk_engine) / n));
    println!("  Docker streaming {:>8.1} ms", thousand((st_ours + st_engine) * 5.0));
    Ok(())
}

/// RSS of this process, from `/proc/self/status`.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

pub async fn fanout(containers: usize, subscribers: usize, round_count: usize) -> anyhow::Result<()> {
    let docker = TestDocker::new().await;
    docker.require_demo_image().await;
    let node = docker.node_id(0);
    let deployments: Vec<DeploymentId> = (0..containers.div_ceil(5)).map(|_| DeploymentId::new()).collect();
    println!(
        "metrics fan-out: {containers} containers in {} deployments, {subscribers} subscribers, {round_count} rounds",
        deployments.len()
    );
    start_sleepers(&docker, &node, containers, &deployments).await?;
    let engine = pids_named(&["dockerd", "containerd"]);
    let pipeline = pipeline(&node, SourceChoice::Cgroup).await?;
    let spacing = Duration::from_millis(500);
    let rss_start = rss_bytes();
    let (alone, before, after) = rounds(&pipeline, round_count, spacing, containers, &engine).await?;
    println!("{}", alone.line("rounds, no subscriber (baseline)"));
    cpu_line("rounds, no subscriber", before, after, round_count as f64, "round");
    let rss_alone = rss_bytes();

    // Subscribers that never read: each watches one deployment (as `flo top`
    // and the API's streams do); their queues fill up and then drop.
    let live = pipeline.live();
    let held: Vec<_> =
        (0..subscribers).map(|i| live.subscribe(Filter::Deployment(deployments[i % deployments.len()]))).collect();
    let (with, before, after) = rounds(&pipeline, round_count, spacing, containers, &engine).await?;
    println!("{}", with.line(&format!("rounds, {subscribers} stuck subscribers")));
    cpu_line(&format!("rounds, {subscribers} stuck subscribers"), before, after, round_count as f64, "round");
    let rss_with = rss_bytes();
    let stats = live.hub.stats();
    println!(
        "  subscribers: {} active, {} slow, {} samples dropped; queue bound {} samples each",
        stats.active,
        stats.slow,
        stats.dropped,
        MetricsConfig::default().subscriber_queue
    );
    // The worst case: every subscriber watches everything.
    let everything: Vec<_> = (0..subscribers).map(|_| live.subscribe(Filter::All)).collect();
    let (all, before, after) = rounds(&pipeline, round_count, spacing, containers, &engine).await?;
    println!("{}", all.line(&format!("rounds, {subscribers} stuck on all")));
    cpu_line(&format!("rounds, {subscribers} stuck on all"), before, after, round_count as f64, "round");
    let rss_all = rss_bytes();
    println!(
        "  RSS: {:.1} MiB at start, {:.1} MiB after rounds alone, {:.1} MiB with {subscribers} per-deployment subscribers, {:.1} MiB with {subscribers} more on everything",
        rss_start as f64 / 1048576.0,
        rss_alone as f64 / 1048576.0,
        rss_with as f64 / 1048576.0,
        rss_all as f64 / 1048576.0
    );
    println!(
        "  p50 round: {:.2} ms alone, {:.2} ms with per-deployment subscribers ({:+.1} %), {:.2} ms with all-watching ones",
        ms(alone.percentile(50.0)),
        ms(with.percentile(50.0)),
        100.0 * (ms(with.percentile(50.0)) / ms(alone.percentile(50.0)) - 1.0),
        ms(all.percentile(50.0))
    );
    drop((held, everything));
    Ok(())
}

fn synthetic_samples(count: usize, containers: usize) -> Vec<Sample> {
    let deployments: Vec<DeploymentId> = (0..containers.div_ceil(5)).map(|_| DeploymentId::new()).collect();
    let organization = Some(OrganizationId::new());
    // Within the last few hours, so the partitions of today and yesterday hold them.
    let start = chrono::Utc::now().timestamp_millis() - (count / containers) as i64 * 5_000 - 60_000;
    (0..count)
        .map(|i| {
            let container = i % containers;
            Sample {
                key: SampleKey {
                    container_id: format!("{container:064x}"),
                    deployment_id: deployments[container / 5],
                    organization_id: organization,
                    replica_index: (container % 5) as i32,
                },
                time_ms: start + (i / containers) as i64 * 5_000,
                interval_ms: 5_000,
                cpu_cores: 0.25,
                cpu_percent_of_limit: 25.0,
                memory_bytes: 64 << 20,
                memory_limit_bytes: 256 << 20,
                net_rx_bytes: i as u64,
                net_tx_bytes: 2 * i as u64,
                blk_read_bytes: 0,
                blk_write_bytes: 4096,
                pids: 3,
            }
        })
        .collect()
}

pub async fn ingest(rows: usize, baseline_rows: usize, batch: usize) -> anyhow::Result<()> {
    println!("metrics ingest: {rows} rows through the writer (batches of {batch}), {baseline_rows} one INSERT each");
    let db = TestDb::new().await;
    let store = MetricsStore::setup(db.pool().clone(), Retention::default()).await?;

    // Baseline: one INSERT statement (one round trip) per row.
    let samples = synthetic_samples(baseline_rows, 1000);
    let started = Instant::now();
    for s in &samples {
        sqlx::query(
            "INSERT INTO container_samples (time, node_id, container_id, deployment_id, organization_id, \
             replica_index, interval_ms, cpu_cores, cpu_percent, memory_bytes, memory_limit_bytes, net_rx_bytes, \
             net_tx_bytes, blk_read_bytes, blk_write_bytes, pids) \
             VALUES ($1, 'bench-baseline', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) ON CONFLICT DO NOTHING",
        )
        .bind(chrono::DateTime::from_timestamp_millis(s.time_ms))
        .bind(format!("baseline-{}", s.key.container_id))
        .bind(s.key.deployment_id.as_uuid())
        .bind(s.key.organization_id.map(|o| o.as_uuid()))
        .bind(s.key.replica_index)
        .bind(s.interval_ms as i32)
        .bind(s.cpu_cores)
        .bind(s.cpu_percent_of_limit)
        .bind(s.memory_bytes as i64)
        .bind(s.memory_limit_bytes as i64)
        .bind(s.net_rx_bytes as i64)
        .bind(s.net_tx_bytes as i64)
        .bind(s.blk_read_bytes as i64)
        .bind(s.blk_write_bytes as i64)
        .bind(s.pids as i32)
        .execute(db.pool())
        .await?;
    }
    let baseline = baseline_rows as f64 / started.elapsed().as_secs_f64();
    println!("  one INSERT per row (baseline)    {baseline:>10.0} rows/s");

    // The writer: batches submitted to its buffer, drained by its task.
    let samples = synthetic_samples(rows, 1000);
    let writer = Arc::new(Writer::new("bench".to_owned(), store, rows + 1));
    for chunk in samples.chunks(batch) {
        writer.submit(Batch::Samples(chunk.to_vec()));
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(writer.clone().run(cancel.clone()));
    while writer.stats().buffered_rows > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    cancel.cancel();
    task.await?;
    let stats = writer.stats();
    if stats.rows_written != rows as u64 || stats.dropped_rows != 0 {
        bail!("the writer wrote {} of {rows} rows: {stats:?}", stats.rows_written);
    }
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM container_samples WHERE node_id = 'bench'")
        .fetch_one(db.pool())
        .await?;
    let ours = rows as f64 / elapsed;
    println!("  the pipeline's writer            {ours:>10.0} rows/s  ({written} rows in the table)");
    println!("  {:.1}x the per-row baseline (goal: 200,000 rows/s and 20x)", ours / baseline);
    Ok(())
}
