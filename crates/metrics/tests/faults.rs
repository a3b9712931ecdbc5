//! The pipeline through faults: the Docker API unreachable (the breaker
//! opens, `/health` and `/metrics/observability` say so, collection comes
//! back on its own) and PostgreSQL unreachable (nothing lost within the
//! buffer; what does not fit is counted exactly). Both are cut with a proxy
//! the test owns, so the real services other tests use keep running.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use flotilla_docker::{DockerClient, DockerConfig};
use flotilla_metrics::{Batch, BreakerConfig, MetricsConfig, SourceChoice, Writer};
use flotilla_store::metrics::{MetricsStore, Retention};
use flotilla_test_utils::TestDb;
use flotilla_test_utils::proxy::Proxy;
use flotilla_test_utils::wait_until;
use flotilla_types::DeploymentId;
use flotilla_types::metrics::{Sample, SampleKey};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn socket_path() -> PathBuf {
    std::env::temp_dir().join(format!("flotilla-docker-{}.sock", flotilla_test_utils::unique_suffix()))
}

fn fast_config(source: SourceChoice) -> MetricsConfig {
    MetricsConfig {
        source,
        // Not 1 s: Docker 20.10 holds a one-shot stats call back until a
        // second has passed since the container's previous one.
        interval: Duration::from_secs(2),
        max_interval: Duration::from_secs(8),
        docker_timeout: Duration::from_secs(2),
        breaker: BreakerConfig { failures_to_open: 3, cool_down: Duration::from_secs(3), successes_to_close: 2 },
        failures_for_unhealthy: 3,
        ..MetricsConfig::default()
    }
}

/// The pipeline's part of `/metrics/observability`.
fn metrics_detail(observability: &Value) -> &Value {
    &observability["components"]["metrics"]
}

async fn observe(base: &str) -> Value {
    get_json(base, "/metrics/observability").await.1
}

/// Runs the Docker-cut scenario for `source`; returns the observability
/// snapshots (while cut, after recovery).
async fn docker_cut(source: SourceChoice) -> (u16, Value, Value) {
    let f = Fixture::new().await;
    let deployment = DeploymentId::new();
    f.start(deployment, 0, SLEEPER, 0, 0).await;
    f.start(deployment, 1, SLEEPER, 0, 0).await;
    let socket = socket_path();
    let proxy = Proxy::unix(&socket, std::path::Path::new("/var/run/docker.sock")).await;
    let client = DockerClient::connect(&DockerConfig {
        socket: Some(socket.display().to_string()),
        timeout: Some(Duration::from_secs(3)),
    })
    .await
    .expect("Docker through the proxy");
    let (pipeline, telemetry) = f.pipeline_with(client, fast_config(source), None).await;
    let (base, stop_server) = serve_telemetry(&telemetry).await;
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    pipeline.spawn(&tracker, cancel.clone());

    wait_until("two samples", Duration::from_secs(20), || async {
        let o = observe(&base).await;
        (metrics_detail(&o)["samples_total"].as_u64() >= Some(2)).then_some(())
    })
    .await;
    assert_eq!(get_json(&base, "/health").await.0, 200);

    proxy.cut();
    let while_cut = wait_until("the breaker to open", Duration::from_secs(30), || async {
        let o = observe(&base).await;
        (metrics_detail(&o)["breaker"]["state"] == "open").then_some(o)
    })
    .await;
    let (health_status, health) = wait_until("/health to settle", Duration::from_secs(30), || async {
        let (status, health) = get_json(&base, "/health").await;
        let settled = match source {
            SourceChoice::Docker => status == 503,
            _ => health["components"]["metrics"]["health"] == "degraded",
        };
        settled.then_some((status, health))
    })
    .await;
    eprintln!("{source:?} while cut: /health {health_status} {}", health["components"]["metrics"]["message"]);
    let metrics_text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    assert!(
        metrics_text.contains("flotilla_metrics_docker_breaker_state{state=\"open\"} 1"),
        "/metrics shows the open breaker:\n{metrics_text}"
    );
    let samples_at_cut = metrics_detail(&while_cut)["samples_total"].as_u64().unwrap();

    // Stay cut a little longer: the interval stretches.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stretched = observe(&base).await;
    assert!(
        metrics_detail(&stretched)["current_interval_ms"].as_u64() > Some(2000),
        "the interval stretched: {stretched}"
    );
    if source != SourceChoice::Docker {
        assert!(
            metrics_detail(&stretched)["samples_total"].as_u64() > Some(samples_at_cut),
            "the cgroup path goes on measuring the containers it knows"
        );
    }

    proxy.restore().await;
    let recovered = wait_until("collection to come back", Duration::from_secs(40), || async {
        let o = observe(&base).await;
        let d = metrics_detail(&o);
        let (status, health) = get_json(&base, "/health").await;
        let back = d["breaker"]["state"] == "closed"
            && d["current_interval_ms"] == 2000
            && d["samples_total"].as_u64() > Some(samples_at_cut + 2)
            && status == 200
            && health["components"]["metrics"]["health"] == "ok";
        back.then_some(o)
    })
    .await;
    assert_eq!(get_json(&base, "/health").await.0, 200);
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    stop_server.cancel();
    let _ = std::fs::remove_file(&socket);
    (health_status, while_cut, recovered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_api_unreachable_opens_the_breaker_and_collection_resumes() {
    let (health_status, while_cut, recovered) = docker_cut(SourceChoice::Docker).await;
    assert_eq!(health_status, 503, "the Docker path cannot measure anything without the engine");
    let d = &metrics_detail(&while_cut);
    assert!(d["breaker"]["times_opened"].as_u64() >= Some(1));
    assert!(d["consecutive_failures"].as_u64() >= Some(1), "{d}");
    assert!(metrics_detail(&recovered)["breaker"]["times_opened"].as_u64() >= Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_cgroups_measuring_goes_on_while_the_docker_api_is_away() {
    let (health_status, _while_cut, recovered) = docker_cut(SourceChoice::Cgroup).await;
    assert_eq!(health_status, 200, "degraded, not failed: the known containers are still measured");
    assert_eq!(metrics_detail(&recovered)["containers"], 2);
}

/// A pool to the test database through `proxy`.
async fn store_through(db: &TestDb, proxy: &Proxy) -> MetricsStore {
    let options: PgConnectOptions = db.url.parse::<PgConnectOptions>().expect("URL").port(proxy.tcp_address().port());
    let pool =
        PgPoolOptions::new().max_connections(4).acquire_timeout(Duration::from_secs(3)).connect_lazy_with(options);
    MetricsStore::setup(pool, Retention::default()).await.expect("metrics schema")
}

async fn postgres_target(db: &TestDb) -> std::net::SocketAddr {
    let options: PgConnectOptions = db.url.parse().expect("URL");
    tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .expect("PostgreSQL address")
        .next()
        .expect("an address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_away_for_two_minutes_loses_no_minute() {
    let f = Fixture::new().await;
    let db = TestDb::new().await;
    let proxy = Proxy::tcp(postgres_target(&db).await).await;
    let store = store_through(&db, &proxy).await;
    let web = f.start(DeploymentId::new(), 0, BIG_FILE_SERVER, 0, 0).await;
    let ip = f.ip(&web).await;
    wait_serving(ip).await;

    let (pipeline, telemetry) = f.pipeline(config(SourceChoice::Cgroup), Some(store)).await;
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    pipeline.spawn(&tracker, cancel.clone());
    let traffic = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            while !cancel.is_cancelled() {
                download(ip, 1).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let writer = pipeline.writer().expect("a writer").clone();
    wait_until("a minute written", Duration::from_secs(90), || async {
        (writer.stats().minute_rows_written >= 1).then_some(())
    })
    .await;

    proxy.cut();
    let cut_at = tokio::time::Instant::now();
    let degraded = wait_until("the pipeline to report failing writes", Duration::from_secs(60), || async {
        let status = telemetry.health.snapshot().get("metrics").cloned()?;
        (status.health == flotilla_telemetry::Health::Degraded).then_some(status)
    })
    .await;
    eprintln!("while PostgreSQL is away: {:?}", degraded.message);
    tokio::time::sleep(Duration::from_secs(120).saturating_sub(cut_at.elapsed())).await;
    let during = writer.stats();
    assert!(during.write_failures > 0 && during.buffered_rows > 0, "{during:?}");
    proxy.restore().await;

    wait_until("the buffer to drain", Duration::from_secs(90), || async {
        (writer.stats().buffered_rows == 0).then_some(())
    })
    .await;
    traffic.abort();
    cancel.cancel();
    tracker.close();
    tracker.wait().await;

    let stats = writer.stats();
    eprintln!("writer after the outage: {stats:?}");
    assert_eq!(stats.dropped_rows, 0, "nothing dropped");
    assert_eq!(stats.buffered_rows, 0);
    let minutes: Vec<(chrono::DateTime<chrono::Utc>, i64, i32)> = sqlx::query_as(
        "SELECT minute, net_tx_bytes, samples FROM container_minutes WHERE container_id = $1 ORDER BY minute",
    )
    .bind(&web)
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert!(minutes.len() >= 4, "{minutes:?}");
    for pair in minutes.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, chrono::Duration::minutes(1), "no minute missing: {minutes:?}");
    }
    let samples_written: i64 = sqlx::query_scalar("SELECT count(*) FROM container_samples WHERE container_id = $1")
        .bind(&web)
        .fetch_one(db.pool())
        .await
        .unwrap();
    let snapshot = pipeline.snapshot();
    assert_eq!(samples_written as u64, snapshot.samples_total, "every sample written");
    let minute_samples: i64 = minutes.iter().map(|m| i64::from(m.2)).sum();
    assert_eq!(minute_samples, samples_written, "every sample in exactly one minute");
    let (raw_tx, minute_tx): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT sum(net_tx_bytes)::int8 FROM container_samples WHERE container_id = $1), \
         (SELECT sum(net_tx_bytes)::int8 FROM container_minutes WHERE container_id = $1)",
    )
    .bind(&web)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(raw_tx, minute_tx);
}

fn synthetic(deployment: DeploymentId, n: i64) -> Sample {
    Sample {
        key: SampleKey {
            container_id: "tiny-buffer".to_owned(),
            deployment_id: deployment,
            organization_id: None,
            replica_index: 0,
        },
        time_ms: chrono::Utc::now().timestamp_millis() - 600_000 + n * 5_000,
        interval_ms: 5_000,
        cpu_cores: 0.1,
        cpu_percent_of_limit: 10.0,
        memory_bytes: 1 << 20,
        memory_limit_bytes: 0,
        net_rx_bytes: n as u64,
        net_tx_bytes: n as u64,
        blk_read_bytes: 0,
        blk_write_bytes: 0,
        pids: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_buffer_drops_exactly_what_does_not_fit() {
    let db = TestDb::new().await;
    let proxy = Proxy::tcp(postgres_target(&db).await).await;
    let store = store_through(&db, &proxy).await;
    proxy.cut();
    let writer = Arc::new(Writer::new("node-tiny".to_owned(), store, 10));
    let deployment = DeploymentId::new();
    // Five batches of four rows into room for ten: the oldest go while the
    // total is over ten (after the third, fourth and fifth batch).
    for batch in 0..5 {
        writer.submit(Batch::Samples((0..4).map(|i| synthetic(deployment, batch * 4 + i)).collect()));
    }
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    tracker.spawn(writer.clone().run(cancel.clone()));
    wait_until("a failed write", Duration::from_secs(20), || async {
        (writer.stats().write_failures > 0).then_some(())
    })
    .await;
    let stats = writer.stats();
    assert_eq!((stats.dropped_batches, stats.dropped_rows), (3, 12), "{stats:?}");
    assert_eq!((stats.buffered_batches, stats.buffered_rows), (2, 8));
    proxy.restore().await;
    wait_until("the buffer to drain", Duration::from_secs(30), || async {
        (writer.stats().buffered_rows == 0).then_some(())
    })
    .await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    let stats = writer.stats();
    assert_eq!((stats.rows_written, stats.dropped_rows), (8, 12), "{stats:?}");
    let kept: Vec<i64> = sqlx::query_scalar(
        "SELECT net_tx_bytes FROM container_samples WHERE container_id = 'tiny-buffer' ORDER BY time",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(kept, (12..20).collect::<Vec<i64>>(), "the newest rows were kept, the oldest dropped");
}
