-- Base backups of this database, one row per attempt, written by the data
-- plane's backup task (images/data/flotilla-data backup) with the
-- application's role: what `flo admin backups` and ListDatabaseBackups show.
CREATE TABLE database_backups (
    id          bigserial PRIMARY KEY,
    label       text        NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    succeeded   boolean     NOT NULL,
    size_bytes  bigint,
    -- The first WAL segment a restore from it needs.
    wal_start   text,
    location    text        NOT NULL,
    error       text
);
CREATE INDEX database_backups_by_finish ON database_backups (finished_at DESC);
