-- The metrics store on TimescaleDB: the same tables as hypertables with
-- daily chunks, compression after 2 days, retention policies, and hourly
-- usage as a continuous aggregate named like the PostgreSQL table, so one
-- query layer serves both. Applied instead of postgres.sql when the
-- extension is available (it is not on the machines we test on: this file is
-- checked for syntax by PostgreSQL in the tests and documented in
-- docs/metrics.md). Retention and compression ages come in as $-free
-- literals substituted by the setup code: {samples_days}, {minutes_days},
-- {hourly_days}.

CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE IF NOT EXISTS container_samples (
    time               timestamptz NOT NULL,
    node_id            text NOT NULL,
    container_id       text NOT NULL,
    deployment_id      uuid NOT NULL,
    organization_id    uuid,
    replica_index      integer NOT NULL,
    interval_ms        integer NOT NULL,
    cpu_cores          double precision NOT NULL,
    cpu_percent        double precision NOT NULL,
    memory_bytes       bigint NOT NULL,
    memory_limit_bytes bigint NOT NULL,
    net_rx_bytes       bigint NOT NULL,
    net_tx_bytes       bigint NOT NULL,
    blk_read_bytes     bigint NOT NULL,
    blk_write_bytes    bigint NOT NULL,
    pids               integer NOT NULL,
    -- Time first: rows arrive in time order (inserts at the index's edge).
    PRIMARY KEY (time, container_id)
);
SELECT create_hypertable('container_samples', 'time', chunk_time_interval => INTERVAL '1 day', if_not_exists => TRUE);
CREATE INDEX IF NOT EXISTS container_samples_by_deployment ON container_samples (deployment_id, time);
ALTER TABLE container_samples SET (timescaledb.compress, timescaledb.compress_segmentby = 'container_id');
SELECT add_compression_policy('container_samples', INTERVAL '2 days', if_not_exists => TRUE);
SELECT add_retention_policy('container_samples', INTERVAL '{samples_days} days', if_not_exists => TRUE);

CREATE TABLE IF NOT EXISTS container_minutes (
    minute           timestamptz NOT NULL,
    node_id          text NOT NULL,
    container_id     text NOT NULL,
    deployment_id    uuid NOT NULL,
    organization_id  uuid,
    replica_index    integer NOT NULL,
    samples          integer NOT NULL,
    cpu_avg_cores    double precision NOT NULL,
    cpu_max_cores    double precision NOT NULL,
    memory_avg_bytes bigint NOT NULL,
    memory_max_bytes bigint NOT NULL,
    net_rx_bytes     bigint NOT NULL,
    net_tx_bytes     bigint NOT NULL,
    blk_read_bytes   bigint NOT NULL,
    blk_write_bytes  bigint NOT NULL,
    PRIMARY KEY (minute, container_id)
);
SELECT create_hypertable('container_minutes', 'minute', chunk_time_interval => INTERVAL '1 day', if_not_exists => TRUE);
CREATE INDEX IF NOT EXISTS container_minutes_by_deployment ON container_minutes (deployment_id, minute);
CREATE INDEX IF NOT EXISTS container_minutes_by_organization ON container_minutes (organization_id, minute);
ALTER TABLE container_minutes SET (timescaledb.compress, timescaledb.compress_segmentby = 'container_id');
SELECT add_compression_policy('container_minutes', INTERVAL '2 days', if_not_exists => TRUE);
SELECT add_retention_policy('container_minutes', INTERVAL '{minutes_days} days', if_not_exists => TRUE);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly
WITH (timescaledb.continuous) AS
SELECT time_bucket(INTERVAL '1 hour', minute) AS hour,
       deployment_id,
       organization_id,
       sum(cpu_avg_cores * 60.0) AS cpu_core_seconds,
       sum(memory_avg_bytes::double precision * 60.0) AS memory_byte_seconds,
       sum(net_rx_bytes)::bigint AS net_rx_bytes,
       sum(net_tx_bytes)::bigint AS net_tx_bytes,
       sum(blk_read_bytes)::bigint AS blk_read_bytes,
       sum(blk_write_bytes)::bigint AS blk_write_bytes,
       count(*)::integer AS container_minutes
FROM container_minutes
GROUP BY 1, 2, 3
WITH NO DATA;
SELECT add_continuous_aggregate_policy('usage_hourly',
    start_offset => INTERVAL '3 hours', end_offset => INTERVAL '1 minute',
    schedule_interval => INTERVAL '5 minutes', if_not_exists => TRUE);
SELECT add_retention_policy('usage_hourly', INTERVAL '{hourly_days} days', if_not_exists => TRUE);
