-- What users are told about a replica whose container exits: how often it
-- exited since its container was made, with which code and when. A new
-- container (create, rolling update) starts again from zero.
ALTER TABLE deployment_locations
    ADD COLUMN restart_count integer NOT NULL DEFAULT 0 CHECK (restart_count >= 0),
    ADD COLUMN last_exit_code integer,
    ADD COLUMN last_exit_at timestamptz;
