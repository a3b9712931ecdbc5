//! The metrics store on a real PostgreSQL (the native-partition backend; the
//! TimescaleDB schema is checked for syntax).

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use flotilla_store::metrics::{MetricsBackend, MetricsStore, Resolution, Retention, TIMESCALEDB_SCHEMA};
use flotilla_test_utils::TestDb;
use flotilla_types::metrics::{MinuteAggregate, Sample, SampleKey};
use flotilla_types::{DeploymentId, OrganizationId};

fn key(container: &str, deployment: DeploymentId, org: OrganizationId) -> SampleKey {
    SampleKey {
        container_id: container.into(),
        deployment_id: deployment,
        organization_id: Some(org),
        replica_index: 0,
    }
}

fn sample(key: &SampleKey, time: DateTime<Utc>, rx: u64) -> Sample {
    Sample {
        key: key.clone(),
        time_ms: time.timestamp_millis(),
        interval_ms: 5_000,
        cpu_cores: 0.25,
        cpu_percent_of_limit: 12.5,
        memory_bytes: 1_000_000,
        memory_limit_bytes: 0,
        net_rx_bytes: rx,
        net_tx_bytes: 1,
        blk_read_bytes: 0,
        blk_write_bytes: 0,
        pids: 2,
    }
}

fn minute(key: &SampleKey, at: DateTime<Utc>, cpu: f64, rx: u64) -> MinuteAggregate {
    MinuteAggregate {
        key: key.clone(),
        minute_ms: at.timestamp_millis(),
        samples: 12,
        cpu_avg_cores: cpu,
        cpu_max_cores: cpu * 2.0,
        memory_avg_bytes: 1_000,
        memory_max_bytes: 2_000,
        net_rx_bytes: rx,
        net_tx_bytes: 0,
        blk_read_bytes: 0,
        blk_write_bytes: 0,
    }
}

async fn count(db: &TestDb, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db.pool()).await.unwrap()
}

#[tokio::test]
async fn samples_are_written_once_and_read_back_by_their_organization_only() {
    let db = TestDb::new().await;
    let store = MetricsStore::setup(db.pool().clone(), Retention::default()).await.unwrap();
    assert_eq!(store.backend(), MetricsBackend::Postgres);
    // Setting up again (every start-up, every agent) changes nothing.
    MetricsStore::setup(db.pool().clone(), Retention::default()).await.unwrap();

    let (deployment, org, other_org) = (DeploymentId::new(), OrganizationId::new(), OrganizationId::new());
    let k = key("c1", deployment, org);
    // Whole seconds: samples are stored to the millisecond.
    let t0 = DateTime::from_timestamp((Utc::now() - chrono::Duration::minutes(10)).timestamp(), 0).unwrap();
    let batch: Vec<Sample> = (0..120).map(|i| sample(&k, t0 + chrono::Duration::seconds(5 * i), 100)).collect();
    assert_eq!(store.write_samples("n1", &batch).await.unwrap(), 120);
    assert_eq!(store.write_samples("n1", &batch).await.unwrap(), 0, "a retried batch is not written twice");
    assert_eq!(count(&db, "SELECT count(*) FROM container_samples").await, 120);
    // A batch of which only a part was written before: the rest goes in.
    let other = key("c2", deployment, org);
    let mut overlapping = batch[100..].to_vec();
    overlapping.extend((0..3).map(|i| sample(&other, t0 + chrono::Duration::seconds(5 * i), 100)));
    assert_eq!(store.write_samples("n1", &overlapping).await.unwrap(), 3);
    sqlx::query("DELETE FROM container_samples WHERE container_id = 'c2'").execute(db.pool()).await.unwrap();
    let stored: (i64, i64, f64, i32) = sqlx::query_as(
        "SELECT sum(net_rx_bytes)::int8, sum(memory_bytes)::int8, sum(cpu_cores), min(replica_index) \
         FROM container_samples",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    let expected: (i64, i64, f64) = (
        batch.iter().map(|s| s.net_rx_bytes as i64).sum(),
        batch.iter().map(|s| s.memory_bytes as i64).sum(),
        batch.iter().map(|s| s.cpu_cores).sum(),
    );
    assert_eq!((stored.0, stored.1), (expected.0, expected.1), "binary COPY wrote the values exactly");
    assert!((stored.2 - expected.2).abs() < 1e-9);
    assert_eq!(stored.3, k.replica_index);

    let series = store
        .tenant(org)
        .series(deployment, t0, t0 + chrono::Duration::minutes(10), Some(Duration::from_secs(60)))
        .await
        .unwrap();
    let (resolution, points) = (series.resolution, series.points);
    assert_eq!(series.step, Duration::from_secs(60));
    assert_eq!(resolution, Resolution::Raw);
    // The samples span t0 .. t0 + 595 s: one bucket per minute they touch.
    let minutes_touched = (t0.timestamp() + 595).div_euclid(60) - t0.timestamp().div_euclid(60) + 1;
    assert_eq!(points.len() as i64, minutes_touched, "one bucket a minute");
    assert_eq!(points.iter().map(|p| p.net_rx_bytes).sum::<i64>(), 120 * 100, "bytes add up across buckets");
    assert!(points.iter().all(|p| (p.cpu_cores - 0.25).abs() < 1e-9));
    let foreign =
        store.tenant(other_org).series(deployment, t0, t0 + chrono::Duration::minutes(10), None).await.unwrap().points;
    assert!(foreign.is_empty(), "another organization sees nothing");
}

#[tokio::test]
async fn a_day_without_a_partition_gets_one() {
    let db = TestDb::new().await;
    let store = MetricsStore::setup(db.pool().clone(), Retention::default()).await.unwrap();
    let k = key("c1", DeploymentId::new(), OrganizationId::new());
    let far = Utc::now() + chrono::Duration::days(20);
    assert_eq!(store.write_samples("n1", &[sample(&k, far, 1)]).await.unwrap(), 1);
    let name = format!("container_samples_p{}", far.format("%Y%m%d"));
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL").bind(&name).fetch_one(db.pool()).await.unwrap();
    assert!(exists, "{name} was created");
}

#[tokio::test]
async fn hourly_usage_is_rolled_up_exactly_including_late_minutes() {
    let db = TestDb::new().await;
    let store = MetricsStore::setup(db.pool().clone(), Retention::default()).await.unwrap();
    let (d1, d2, org) = (DeploymentId::new(), DeploymentId::new(), OrganizationId::new());
    let hour = Utc.with_ymd_and_hms(2026, 11, 20, 10, 0, 0).unwrap();
    let minutes: Vec<MinuteAggregate> = (0..60)
        .map(|m| minute(&key("a", d1, org), hour + chrono::Duration::minutes(m), 0.5, 10))
        .chain((0..30).map(|m| minute(&key("b", d2, org), hour + chrono::Duration::minutes(m), 1.0, 1)))
        .collect();
    store.write_minutes("n1", &minutes).await.unwrap();
    let report = store.maintain(Utc::now(), Retention::default()).await.unwrap();
    assert_eq!(report.hours_rolled_up, 2);

    let tenant = store.tenant(org);
    let until = hour + chrono::Duration::hours(1);
    let usage = tenant.usage(Some(d1), hour, until).await.unwrap();
    assert_eq!(usage.len(), 1);
    assert!((usage[0].cpu_core_seconds - 0.5 * 60.0 * 60.0).abs() < 1e-6, "half a core for an hour");
    assert_eq!(usage[0].net_rx_bytes, 600);
    let org_usage = tenant.organization_usage(hour, until).await.unwrap();
    assert_eq!(org_usage.len(), 1);
    assert!((org_usage[0].cpu_core_seconds - (1800.0 + 1800.0)).abs() < 1e-6);
    assert_eq!(org_usage[0].net_rx_bytes, 600 + 30);

    // A minute arriving late (an agent's buffer flushed after an outage) is rolled up too.
    let late = minute(&key("b", d2, org), hour + chrono::Duration::minutes(45), 1.0, 1);
    store.write_minutes("n2", &[late]).await.unwrap();
    store.maintain(Utc::now(), Retention::default()).await.unwrap();
    let d2_usage = tenant.usage(Some(d2), hour, until).await.unwrap();
    assert_eq!(d2_usage[0].net_rx_bytes, 31);
    assert!(store.tenant(OrganizationId::new()).usage(None, hour, until).await.unwrap().is_empty());
}

#[tokio::test]
async fn expired_partitions_are_dropped() {
    let db = TestDb::new().await;
    let store = MetricsStore::setup(db.pool().clone(), Retention::default()).await.unwrap();
    let k = key("c1", DeploymentId::new(), OrganizationId::new());
    let old = Utc::now() - chrono::Duration::days(9);
    store.write_samples("n1", &[sample(&k, old, 1)]).await.unwrap();
    let recent = Utc::now() - chrono::Duration::days(1);
    store.write_samples("n1", &[sample(&k, recent, 1)]).await.unwrap();
    let report = store.maintain(Utc::now(), Retention::default()).await.unwrap();
    assert!(report.partitions_dropped.contains(&format!("container_samples_p{}", old.format("%Y%m%d"))), "{report:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM container_samples").await, 1, "only the recent sample is kept");
}

#[tokio::test]
async fn the_timescaledb_schema_parses() {
    let db = TestDb::new().await;
    let sql = Retention::default().timescaledb_schema();
    assert!(TIMESCALEDB_SCHEMA.contains("create_hypertable"));
    let mut tx = db.pool().begin().await.unwrap();
    let mut statements = 0;
    for statement in
        sql.split(";\n").map(str::trim).filter(|s| !s.is_empty() && !s.lines().all(|l| l.starts_with("--")))
    {
        statements += 1;
        sqlx::query("SAVEPOINT s").execute(&mut *tx).await.unwrap();
        if let Err(error) = sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned())).execute(&mut *tx).await {
            let code = error.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
            // Without the extension its functions and options are unknown;
            // what must never happen is a syntax error.
            assert_ne!(code.as_deref(), Some("42601"), "syntax error in:\n{statement}\n{error}");
        }
        sqlx::query("ROLLBACK TO SAVEPOINT s").execute(&mut *tx).await.unwrap();
    }
    assert!(statements >= 15, "all statements checked ({statements})");
}
