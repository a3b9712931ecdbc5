//! The metrics store: container samples, minute aggregates and hourly usage.
//!
//! With the TimescaleDB extension available, the tables are hypertables with
//! compression, retention policies and a continuous aggregate for hourly
//! usage (`migrations/metrics/timescaledb.sql`). Without it they are native
//! PostgreSQL range partitions by day (`migrations/metrics/postgres.sql`),
//! kept by [`MetricsStore::maintain`]: partitions created ahead, hourly usage
//! rolled up, old partitions dropped. Table and column names are the same
//! either way, so one query layer serves both.

use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use flotilla_types::metrics::{MinuteAggregate, Sample};
use flotilla_types::{DeploymentId, OrganizationId};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::StoreError;
use crate::copy::CopyRows;

const POSTGRES_SCHEMA: &str = include_str!("../../../migrations/metrics/postgres.sql");
/// The TimescaleDB variant, with `{samples_days}`, `{minutes_days}` and
/// `{hourly_days}` to fill in.
pub const TIMESCALEDB_SCHEMA: &str = include_str!("../../../migrations/metrics/timescaledb.sql");

/// Serializes schema changes between the processes that write metrics.
const DDL_LOCK: i64 = 0x666c_6f74_696c_6c61; // "flotilla"

/// Which database the metrics live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsBackend {
    TimescaleDb,
    Postgres,
}

/// How long each kind of metric is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub samples: Duration,
    pub minutes: Duration,
    pub hourly: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 86_400;
        Self {
            samples: Duration::from_secs(7 * DAY),
            minutes: Duration::from_secs(30 * DAY),
            hourly: Duration::from_secs(400 * DAY),
        }
    }
}

impl Retention {
    fn days(d: Duration) -> u64 {
        d.as_secs().div_ceil(86_400).max(1)
    }

    /// The TimescaleDB schema with this retention filled in.
    pub fn timescaledb_schema(&self) -> String {
        TIMESCALEDB_SCHEMA
            .replace("{samples_days}", &Self::days(self.samples).to_string())
            .replace("{minutes_days}", &Self::days(self.minutes).to_string())
            .replace("{hourly_days}", &Self::days(self.hourly).to_string())
    }
}

/// What one maintenance run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MaintenanceReport {
    pub partitions_created: Vec<String>,
    pub partitions_dropped: Vec<String>,
    pub hours_rolled_up: u64,
    pub hourly_rows_deleted: u64,
}

/// A handle on the metrics database; cheap to clone.
#[derive(Debug, Clone)]
pub struct MetricsStore {
    pool: PgPool,
    backend: MetricsBackend,
}

/// The tables partitioned by day, and the column they are partitioned on.
const PARTITIONED: [(&str, &str); 2] = [("container_samples", "time"), ("container_minutes", "minute")];

fn ts(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn day_start(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).unwrap_or_default())
}

fn partition_name(table: &str, day: NaiveDate) -> String {
    format!("{table}_p{:04}{:02}{:02}", day.year(), day.month(), day.day())
}

impl MetricsStore {
    /// Sets the metrics schema up (idempotent) and returns the store. Uses
    /// TimescaleDB when the extension can be installed.
    pub async fn setup(pool: PgPool, retention: Retention) -> Result<Self, StoreError> {
        let op = "setting up the metrics schema";
        let available: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')")
                .fetch_one(&pool)
                .await
                .map_err(StoreError::db(op))?;
        let backend = if available { MetricsBackend::TimescaleDb } else { MetricsBackend::Postgres };
        let schema = match backend {
            MetricsBackend::TimescaleDb => retention.timescaledb_schema(),
            MetricsBackend::Postgres => POSTGRES_SCHEMA.to_owned(),
        };
        let mut tx = pool.begin().await.map_err(StoreError::db(op))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(DDL_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(schema)).execute(&mut *tx).await.map_err(StoreError::db(op))?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS usage_dirty_hours (deployment_id uuid NOT NULL, hour timestamptz NOT NULL, \
             PRIMARY KEY (deployment_id, hour))",
        )
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        tx.commit().await.map_err(StoreError::db(op))?;
        let store = Self { pool, backend };
        let today = Utc::now().date_naive();
        store.ensure_partitions(today.pred_opt().unwrap_or(today), today + chrono::Days::new(2)).await?;
        tracing::info!(?backend, "metrics store ready");
        Ok(store)
    }

    pub fn backend(&self) -> MetricsBackend {
        self.backend
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the daily partitions from `first` to `last` (inclusive) that
    /// do not exist yet; returns their names. Nothing to do on TimescaleDB.
    pub async fn ensure_partitions(&self, first: NaiveDate, last: NaiveDate) -> Result<Vec<String>, StoreError> {
        if self.backend == MetricsBackend::TimescaleDb {
            return Ok(Vec::new());
        }
        let op = "creating metrics partitions";
        let mut created = Vec::new();
        let mut tx = self.pool.begin().await.map_err(StoreError::db(op))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(DDL_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
        let mut day = first;
        while day <= last {
            for (table, _) in PARTITIONED {
                let name = partition_name(table, day);
                let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                    .bind(&name)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(StoreError::db(op))?;
                if !exists {
                    let from = day_start(day).to_rfc3339();
                    let to = day_start(day + chrono::Days::new(1)).to_rfc3339();
                    // Names and bounds are made here from a date, not from input.
                    let sql =
                        format!("CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM ('{from}') TO ('{to}')");
                    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.map_err(StoreError::db(op))?;
                    created.push(name);
                }
            }
            day = day + chrono::Days::new(1);
        }
        tx.commit().await.map_err(StoreError::db(op))?;
        Ok(created)
    }

    /// Writes a batch of samples with a binary `COPY` (one statement, no
    /// SQL per row). A batch that was written before (a retry after an
    /// answer was lost) conflicts: it is written again row by row skipping
    /// what is there, so nothing counts twice. Creates a missing day's
    /// partition once and retries.
    pub async fn write_samples(&self, node_id: &str, samples: &[Sample]) -> Result<u64, StoreError> {
        if samples.is_empty() {
            return Ok(0);
        }
        self.with_partitions(samples.iter().map(|s| s.time_ms), || async {
            match self.copy_samples(node_id, samples).await {
                // 23505: a row is already there.
                Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("23505") => {
                    self.insert_samples(node_id, samples).await
                }
                other => other,
            }
        })
        .await
    }

    async fn copy_samples(&self, node_id: &str, samples: &[Sample]) -> Result<u64, sqlx::Error> {
        let mut rows = CopyRows::with_capacity(samples.len() * 260);
        for s in samples {
            rows.row(16);
            rows.timestamptz_ms(s.time_ms);
            rows.text(node_id);
            rows.text(&s.key.container_id);
            rows.uuid(s.key.deployment_id.as_uuid());
            rows.optional_uuid(s.key.organization_id.map(|o| o.as_uuid()));
            rows.int4(s.key.replica_index);
            rows.int4(i32::try_from(s.interval_ms).unwrap_or(i32::MAX));
            rows.float8(s.cpu_cores);
            rows.float8(s.cpu_percent_of_limit);
            rows.int8(signed(s.memory_bytes));
            rows.int8(signed(s.memory_limit_bytes));
            rows.int8(signed(s.net_rx_bytes));
            rows.int8(signed(s.net_tx_bytes));
            rows.int8(signed(s.blk_read_bytes));
            rows.int8(signed(s.blk_write_bytes));
            rows.int4(i32::try_from(s.pids).unwrap_or(i32::MAX));
        }
        let mut conn = self.pool.acquire().await?;
        let mut copy = conn
            .copy_in_raw(
                "COPY container_samples (time, node_id, container_id, deployment_id, organization_id, \
                 replica_index, interval_ms, cpu_cores, cpu_percent, memory_bytes, memory_limit_bytes, net_rx_bytes, \
                 net_tx_bytes, blk_read_bytes, blk_write_bytes, pids) FROM STDIN (FORMAT binary)",
            )
            .await?;
        if let Err(error) = copy.send(rows.finish()).await {
            // Leave the connection usable (or let it be dropped) either way.
            let _ = copy.abort("sending failed").await;
            return Err(error);
        }
        copy.finish().await
    }

    /// Writes a batch of minute aggregates; a minute written before is
    /// skipped, so retries never count twice. Marks their hours for the
    /// roll-up.
    pub async fn write_minutes(&self, node_id: &str, minutes: &[MinuteAggregate]) -> Result<u64, StoreError> {
        if minutes.is_empty() {
            return Ok(0);
        }
        self.with_partitions(minutes.iter().map(|m| m.minute_ms), || self.insert_minutes(node_id, minutes)).await
    }

    async fn with_partitions<F, Fut>(&self, times: impl Iterator<Item = i64>, write: F) -> Result<u64, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<u64, sqlx::Error>>,
    {
        match write().await {
            Ok(rows) => Ok(rows),
            // 23514: no partition for the row's day.
            Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("23514") => {
                let days: Vec<NaiveDate> = times.map(|t| ts(t).date_naive()).collect();
                if let (Some(first), Some(last)) = (days.iter().min(), days.iter().max()) {
                    self.ensure_partitions(*first, *last).await?;
                }
                write().await.map_err(StoreError::db("writing metrics"))
            }
            Err(e) => Err(StoreError::db("writing metrics")(e)),
        }
    }

    async fn insert_samples(&self, node_id: &str, samples: &[Sample]) -> Result<u64, sqlx::Error> {
        let inserted = sqlx::query(
            "INSERT INTO container_samples (time, node_id, container_id, deployment_id, organization_id, \
             replica_index, interval_ms, cpu_cores, cpu_percent, memory_bytes, memory_limit_bytes, net_rx_bytes, \
             net_tx_bytes, blk_read_bytes, blk_write_bytes, pids) \
             SELECT t.time, $2, t.container_id, t.deployment_id, t.organization_id, t.replica_index, t.interval_ms, \
             t.cpu_cores, t.cpu_percent, t.memory_bytes, t.memory_limit_bytes, t.net_rx_bytes, t.net_tx_bytes, \
             t.blk_read_bytes, t.blk_write_bytes, t.pids \
             FROM UNNEST($1::timestamptz[], $3::text[], $4::uuid[], $5::uuid[], $6::int[], $7::int[], \
             $8::float8[], $9::float8[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::int8[], \
             $15::int8[], $16::int[]) AS t(time, container_id, deployment_id, organization_id, replica_index, \
             interval_ms, cpu_cores, cpu_percent, memory_bytes, memory_limit_bytes, net_rx_bytes, net_tx_bytes, \
             blk_read_bytes, blk_write_bytes, pids) \
             ON CONFLICT DO NOTHING",
        )
        .bind(samples.iter().map(|s| ts(s.time_ms)).collect::<Vec<_>>())
        .bind(node_id)
        .bind(samples.iter().map(|s| s.key.container_id.as_str()).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| s.key.deployment_id.as_uuid()).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| s.key.organization_id.map(|o| o.as_uuid())).collect::<Vec<Option<Uuid>>>())
        .bind(samples.iter().map(|s| s.key.replica_index).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| i32::try_from(s.interval_ms).unwrap_or(i32::MAX)).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| s.cpu_cores).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| s.cpu_percent_of_limit).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| signed(s.memory_bytes)).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| signed(s.memory_limit_bytes)).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| signed(s.net_rx_bytes)).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| signed(s.net_tx_bytes)).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| signed(s.blk_read_bytes)).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| signed(s.blk_write_bytes)).collect::<Vec<_>>())
        .bind(samples.iter().map(|s| i32::try_from(s.pids).unwrap_or(i32::MAX)).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected())
    }

    async fn insert_minutes(&self, node_id: &str, minutes: &[MinuteAggregate]) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO container_minutes (minute, node_id, container_id, deployment_id, organization_id, \
             replica_index, samples, cpu_avg_cores, cpu_max_cores, memory_avg_bytes, memory_max_bytes, net_rx_bytes, \
             net_tx_bytes, blk_read_bytes, blk_write_bytes) \
             SELECT t.minute, $2, t.container_id, t.deployment_id, t.organization_id, t.replica_index, t.samples, \
             t.cpu_avg, t.cpu_max, t.memory_avg, t.memory_max, t.net_rx, t.net_tx, t.blk_read, t.blk_write \
             FROM UNNEST($1::timestamptz[], $3::text[], $4::uuid[], $5::uuid[], $6::int[], $7::int[], \
             $8::float8[], $9::float8[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::int8[], \
             $15::int8[]) AS t(minute, container_id, deployment_id, organization_id, replica_index, samples, \
             cpu_avg, cpu_max, memory_avg, memory_max, net_rx, net_tx, blk_read, blk_write) \
             ON CONFLICT DO NOTHING",
        )
        .bind(minutes.iter().map(|m| ts(m.minute_ms)).collect::<Vec<_>>())
        .bind(node_id)
        .bind(minutes.iter().map(|m| m.key.container_id.as_str()).collect::<Vec<_>>())
        .bind(minutes.iter().map(|m| m.key.deployment_id.as_uuid()).collect::<Vec<_>>())
        .bind(minutes.iter().map(|m| m.key.organization_id.map(|o| o.as_uuid())).collect::<Vec<Option<Uuid>>>())
        .bind(minutes.iter().map(|m| m.key.replica_index).collect::<Vec<_>>())
        .bind(minutes.iter().map(|m| i32::try_from(m.samples).unwrap_or(i32::MAX)).collect::<Vec<_>>())
        .bind(minutes.iter().map(|m| m.cpu_avg_cores).collect::<Vec<_>>())
        .bind(minutes.iter().map(|m| m.cpu_max_cores).collect::<Vec<_>>())
        .bind(minutes.iter().map(|m| signed(m.memory_avg_bytes)).collect::<Vec<_>>())
        .bind(minutes.iter().map(|m| signed(m.memory_max_bytes)).collect::<Vec<_>>())
        .bind(minutes.iter().map(|m| signed(m.net_rx_bytes)).collect::<Vec<_>>())
        .bind(minutes.iter().map(|m| signed(m.net_tx_bytes)).collect::<Vec<_>>())
        .bind(minutes.iter().map(|m| signed(m.blk_read_bytes)).collect::<Vec<_>>())
        .bind(minutes.iter().map(|m| signed(m.blk_write_bytes)).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        if self.backend == MetricsBackend::Postgres {
            sqlx::query(
                "INSERT INTO usage_dirty_hours (deployment_id, hour) \
                 SELECT DISTINCT d, date_trunc('hour', m) FROM UNNEST($1::uuid[], $2::timestamptz[]) AS t(d, m) \
                 ORDER BY 1, 2 ON CONFLICT DO NOTHING",
            )
            .bind(minutes.iter().map(|m| m.key.deployment_id.as_uuid()).collect::<Vec<_>>())
            .bind(minutes.iter().map(|m| ts(m.minute_ms)).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(inserted.rows_affected())
    }

    /// The maintenance job (PostgreSQL backend; TimescaleDB's own policies do
    /// this there): partitions for the coming days, hourly usage for every
    /// hour that got new minutes, old partitions and hourly rows dropped.
    pub async fn maintain(&self, now: DateTime<Utc>, retention: Retention) -> Result<MaintenanceReport, StoreError> {
        let mut report = MaintenanceReport::default();
        if self.backend == MetricsBackend::TimescaleDb {
            return Ok(report);
        }
        let today = now.date_naive();
        report.partitions_created = self.ensure_partitions(today, today + chrono::Days::new(2)).await?;
        report.hours_rolled_up = self.roll_up_dirty_hours().await?;
        let op = "dropping expired metrics";
        let mut tx = self.pool.begin().await.map_err(StoreError::db(op))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(DDL_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
        for ((table, _), keep) in PARTITIONED.iter().zip([retention.samples, retention.minutes]) {
            let cutoff = (now - chrono::Duration::from_std(keep).unwrap_or_default()).date_naive();
            report.partitions_dropped.extend(drop_partitions_before(&mut tx, table, cutoff).await?);
        }
        let deleted = sqlx::query("DELETE FROM usage_hourly WHERE hour < $1")
            .bind(now - chrono::Duration::from_std(retention.hourly).unwrap_or_default())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
        report.hourly_rows_deleted = deleted.rows_affected();
        tx.commit().await.map_err(StoreError::db(op))?;
        Ok(report)
    }

    /// Recomputes hourly usage for the hours that got minutes since the last
    /// roll-up (late ones included), in one transaction.
    async fn roll_up_dirty_hours(&self) -> Result<u64, StoreError> {
        let op = "rolling up hourly usage";
        let mut tx = self.pool.begin().await.map_err(StoreError::db(op))?;
        let dirty: Vec<(Uuid, DateTime<Utc>)> =
            sqlx::query_as("DELETE FROM usage_dirty_hours RETURNING deployment_id, hour")
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::db(op))?;
        if dirty.is_empty() {
            return Ok(0);
        }
        let (deployments, hours): (Vec<Uuid>, Vec<DateTime<Utc>>) = dirty.into_iter().unzip();
        let rolled = sqlx::query(
            "INSERT INTO usage_hourly (hour, deployment_id, organization_id, cpu_core_seconds, memory_byte_seconds, \
             net_rx_bytes, net_tx_bytes, blk_read_bytes, blk_write_bytes, container_minutes) \
             SELECT date_trunc('hour', m.minute), m.deployment_id, max(m.organization_id::text)::uuid, \
             sum(m.cpu_avg_cores * 60.0), sum(m.memory_avg_bytes::float8 * 60.0), sum(m.net_rx_bytes), \
             sum(m.net_tx_bytes), sum(m.blk_read_bytes), sum(m.blk_write_bytes), count(*) \
             FROM container_minutes m JOIN UNNEST($1::uuid[], $2::timestamptz[]) AS d(deployment_id, hour) \
             ON m.deployment_id = d.deployment_id AND m.minute >= d.hour AND m.minute < d.hour + interval '1 hour' \
             GROUP BY 1, 2 \
             ON CONFLICT (deployment_id, hour) DO UPDATE SET organization_id = EXCLUDED.organization_id, \
             cpu_core_seconds = EXCLUDED.cpu_core_seconds, memory_byte_seconds = EXCLUDED.memory_byte_seconds, \
             net_rx_bytes = EXCLUDED.net_rx_bytes, net_tx_bytes = EXCLUDED.net_tx_bytes, \
             blk_read_bytes = EXCLUDED.blk_read_bytes, blk_write_bytes = EXCLUDED.blk_write_bytes, \
             container_minutes = EXCLUDED.container_minutes",
        )
        .bind(&deployments)
        .bind(&hours)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        tx.commit().await.map_err(StoreError::db(op))?;
        Ok(rolled.rows_affected())
    }

    /// The metrics queries of one organization.
    pub fn tenant(&self, organization_id: OrganizationId) -> MetricsTenant<'_> {
        MetricsTenant { pool: &self.pool, organization_id }
    }
}

/// Drops `table`'s daily partitions for days before `cutoff`.
async fn drop_partitions_before(
    tx: &mut Transaction<'_, Postgres>,
    table: &str,
    cutoff: NaiveDate,
) -> Result<Vec<String>, StoreError> {
    let op = "dropping expired metrics";
    let partitions: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = $1",
    )
    .bind(table)
    .fetch_all(&mut **tx)
    .await
    .map_err(StoreError::db(op))?;
    let prefix = format!("{table}_p");
    let mut dropped = Vec::new();
    for name in partitions {
        let Some(day) = name.strip_prefix(&prefix).and_then(|d| NaiveDate::parse_from_str(d, "%Y%m%d").ok()) else {
            continue;
        };
        if day < cutoff {
            // The name was just read from the catalogue and parsed as ours.
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {name}")))
                .execute(&mut **tx)
                .await
                .map_err(StoreError::db(op))?;
            dropped.push(name);
        }
    }
    Ok(dropped)
}

/// How finely a range of metrics is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// The collection interval (5 s), per replica.
    Raw,
    /// Minutes, per replica.
    Minute,
    /// Hours, per deployment.
    Hour,
}

impl Resolution {
    /// Raw up to an hour, minutes up to two days, hours beyond.
    pub fn for_range(range: Duration) -> Self {
        if range <= Duration::from_secs(3600) {
            Self::Raw
        } else if range <= Duration::from_secs(2 * 86_400) {
            Self::Minute
        } else {
            Self::Hour
        }
    }
}

/// A series as read: its resolution, bucket width and points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub resolution: Resolution,
    pub step: Duration,
    pub points: Vec<SeriesPoint>,
}

/// One point of a metrics series; per replica unless hourly.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SeriesPoint {
    pub time: DateTime<Utc>,
    pub container_id: Option<String>,
    pub replica_index: Option<i32>,
    pub cpu_cores: f64,
    pub cpu_max_cores: f64,
    pub memory_bytes: i64,
    pub memory_max_bytes: i64,
    pub net_rx_bytes: i64,
    pub net_tx_bytes: i64,
    pub blk_read_bytes: i64,
    pub blk_write_bytes: i64,
}

/// Usage of one deployment (or of the organization, summed) in one hour.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct UsageRow {
    pub hour: DateTime<Utc>,
    pub deployment_id: Option<Uuid>,
    pub cpu_core_seconds: f64,
    pub memory_byte_seconds: f64,
    pub net_rx_bytes: i64,
    pub net_tx_bytes: i64,
    pub blk_read_bytes: i64,
    pub blk_write_bytes: i64,
}

/// The metrics one organization may read; every query filters on it.
#[derive(Debug, Clone, Copy)]
pub struct MetricsTenant<'a> {
    pool: &'a PgPool,
    organization_id: OrganizationId,
}

impl MetricsTenant<'_> {
    /// A deployment's metrics from `from` to `to`, in buckets of `step` (the
    /// resolution's own when `None`).
    pub async fn series(
        &self,
        deployment: DeploymentId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        step: Option<Duration>,
    ) -> Result<Series, StoreError> {
        let range = (to - from).to_std().unwrap_or_default();
        let resolution = Resolution::for_range(range);
        let natural = match resolution {
            Resolution::Raw => Duration::from_secs(1),
            Resolution::Minute => Duration::from_secs(60),
            Resolution::Hour => Duration::from_secs(3600),
        };
        let step = step.unwrap_or(natural).max(natural);
        let step_secs = step.as_secs_f64();
        let sql = match resolution {
            Resolution::Raw => {
                "SELECT date_bin(make_interval(secs => $4), time, timestamptz 'epoch') AS time, container_id, \
                 min(replica_index) AS replica_index, avg(cpu_cores) AS cpu_cores, max(cpu_cores) AS cpu_max_cores, \
                 avg(memory_bytes)::int8 AS memory_bytes, max(memory_bytes) AS memory_max_bytes, \
                 sum(net_rx_bytes)::int8 AS net_rx_bytes, sum(net_tx_bytes)::int8 AS net_tx_bytes, \
                 sum(blk_read_bytes)::int8 AS blk_read_bytes, sum(blk_write_bytes)::int8 AS blk_write_bytes \
                 FROM container_samples WHERE organization_id = $1 AND deployment_id = $2 \
                 AND time >= $3 AND time < $5 GROUP BY 1, 2 ORDER BY 1, 2"
            }
            Resolution::Minute => {
                "SELECT date_bin(make_interval(secs => $4), minute, timestamptz 'epoch') AS time, container_id, \
                 min(replica_index) AS replica_index, avg(cpu_avg_cores) AS cpu_cores, max(cpu_max_cores) AS cpu_max_cores, \
                 avg(memory_avg_bytes)::int8 AS memory_bytes, max(memory_max_bytes) AS memory_max_bytes, \
                 sum(net_rx_bytes)::int8 AS net_rx_bytes, sum(net_tx_bytes)::int8 AS net_tx_bytes, \
                 sum(blk_read_bytes)::int8 AS blk_read_bytes, sum(blk_write_bytes)::int8 AS blk_write_bytes \
                 FROM container_minutes WHERE organization_id = $1 AND deployment_id = $2 \
                 AND minute >= $3 AND minute < $5 GROUP BY 1, 2 ORDER BY 1, 2"
            }
            Resolution::Hour => {
                "SELECT date_bin(make_interval(secs => $4), hour, timestamptz 'epoch') AS time, \
                 NULL::text AS container_id, NULL::int AS replica_index, \
                 sum(cpu_core_seconds) / ($4 / 1.0) AS cpu_cores, max(cpu_core_seconds / 3600.0) AS cpu_max_cores, \
                 (sum(memory_byte_seconds) / ($4 / 1.0))::int8 AS memory_bytes, \
                 max(memory_byte_seconds / 3600.0)::int8 AS memory_max_bytes, \
                 sum(net_rx_bytes)::int8 AS net_rx_bytes, sum(net_tx_bytes)::int8 AS net_tx_bytes, \
                 sum(blk_read_bytes)::int8 AS blk_read_bytes, sum(blk_write_bytes)::int8 AS blk_write_bytes \
                 FROM usage_hourly WHERE organization_id = $1 AND deployment_id = $2 \
                 AND hour >= $3 AND hour < $5 GROUP BY 1 ORDER BY 1"
            }
        };
        let points = sqlx::query_as(sql)
            .bind(self.organization_id.as_uuid())
            .bind(deployment.as_uuid())
            .bind(from)
            .bind(step_secs)
            .bind(to)
            .fetch_all(self.pool)
            .await
            .map_err(StoreError::db("reading a metrics series"))?;
        Ok(Series { resolution, step, points })
    }

    /// Hourly usage of one deployment, or of every deployment of the
    /// organization (`None`: one row per deployment and hour).
    pub async fn usage(
        &self,
        deployment: Option<DeploymentId>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        sqlx::query_as(
            "SELECT hour, deployment_id, cpu_core_seconds, memory_byte_seconds, net_rx_bytes, net_tx_bytes, \
             blk_read_bytes, blk_write_bytes FROM usage_hourly WHERE organization_id = $1 \
             AND ($2::uuid IS NULL OR deployment_id = $2) AND hour >= $3 AND hour < $4 ORDER BY hour, deployment_id",
        )
        .bind(self.organization_id.as_uuid())
        .bind(deployment.map(|d| d.as_uuid()))
        .bind(from)
        .bind(to)
        .fetch_all(self.pool)
        .await
        .map_err(StoreError::db("reading usage"))
    }

    /// Hourly usage of the whole organization: its deployments summed.
    pub async fn organization_usage(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        sqlx::query_as(
            "SELECT hour, NULL::uuid AS deployment_id, sum(cpu_core_seconds) AS cpu_core_seconds, \
             sum(memory_byte_seconds) AS memory_byte_seconds, sum(net_rx_bytes)::int8 AS net_rx_bytes, \
             sum(net_tx_bytes)::int8 AS net_tx_bytes, sum(blk_read_bytes)::int8 AS blk_read_bytes, \
             sum(blk_write_bytes)::int8 AS blk_write_bytes FROM usage_hourly WHERE organization_id = $1 \
             AND hour >= $2 AND hour < $3 GROUP BY hour ORDER BY hour",
        )
        .bind(self.organization_id.as_uuid())
        .bind(from)
        .bind(to)
        .fetch_all(self.pool)
        .await
        .map_err(StoreError::db("reading usage"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_follows_the_range() {
        assert_eq!(Resolution::for_range(Duration::from_secs(600)), Resolution::Raw);
        assert_eq!(Resolution::for_range(Duration::from_secs(6 * 3600)), Resolution::Minute);
        assert_eq!(Resolution::for_range(Duration::from_secs(30 * 86_400)), Resolution::Hour);
    }

    #[test]
    fn partition_names_and_the_timescaledb_schema() {
        let day = NaiveDate::from_ymd_opt(2026, 1, 9).unwrap();
        assert_eq!(partition_name("container_samples", day), "container_samples_p20260109");
        let schema = Retention::default().timescaledb_schema();
        assert!(schema.contains("INTERVAL '7 days'") && schema.contains("INTERVAL '400 days'"));
        assert!(!schema.contains('{'), "every placeholder filled");
    }
}
