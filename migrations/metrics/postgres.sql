-- The metrics store on plain PostgreSQL: samples and minute aggregates in
-- native range partitions by day (created ahead and dropped for retention by
-- the maintenance job), hourly usage rolled up by the same job. Idempotent:
-- applied at every start-up.

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
    -- A retried batch is written once. Time first: rows arrive in time
    -- order, so inserts land at the right edge of the index.
    PRIMARY KEY (time, container_id)
) PARTITION BY RANGE (time);
CREATE INDEX IF NOT EXISTS container_samples_by_deployment ON container_samples (deployment_id, time);

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
) PARTITION BY RANGE (minute);
CREATE INDEX IF NOT EXISTS container_minutes_by_deployment ON container_minutes (deployment_id, minute);
CREATE INDEX IF NOT EXISTS container_minutes_by_organization ON container_minutes (organization_id, minute);

-- Usage per deployment and hour: the basis of billing.
CREATE TABLE IF NOT EXISTS usage_hourly (
    hour                 timestamptz NOT NULL,
    deployment_id        uuid NOT NULL,
    organization_id      uuid,
    cpu_core_seconds     double precision NOT NULL,
    memory_byte_seconds  double precision NOT NULL,
    net_rx_bytes         bigint NOT NULL,
    net_tx_bytes         bigint NOT NULL,
    blk_read_bytes       bigint NOT NULL,
    blk_write_bytes      bigint NOT NULL,
    container_minutes    integer NOT NULL,
    PRIMARY KEY (deployment_id, hour)
);
CREATE INDEX IF NOT EXISTS usage_hourly_by_organization ON usage_hourly (organization_id, hour);
