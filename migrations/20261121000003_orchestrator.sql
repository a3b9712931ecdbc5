-- Issue 5: placement strategies and constraints, moving replicas off nodes
-- (drain, node failure), leader election.

-- Per-deployment placement: NULL strategy means the cluster's default.
ALTER TABLE deployments
    ADD COLUMN placement_strategy text
        CHECK (placement_strategy IN ('least-loaded', 'round-robin', 'binpack', 'spread')),
    ADD COLUMN placement_constraints jsonb NOT NULL DEFAULT '{}'
        CHECK (jsonb_typeof(placement_constraints) = 'object'),
    -- Why replicas are waiting for a node (which filters removed which
    -- nodes); NULL when every replica is placed.
    ADD COLUMN placement_message text;

ALTER TABLE deployment_locations
    -- Why the orchestrator chose this node.
    ADD COLUMN placement_reason text,
    -- A replica being moved off its node (drain) has a second row, its
    -- replacement, with the same index:
    --   moving   - the replacement is starting elsewhere; this one still serves;
    --   retiring - the replacement serves; this one is out of the route table
    --              and its agent stops it once retire_at has passed.
    ADD COLUMN drain_state text CHECK (drain_state IN ('moving', 'retiring')),
    ADD COLUMN retire_at timestamptz,
    ADD CONSTRAINT retiring_has_a_time CHECK ((drain_state = 'retiring') = (retire_at IS NOT NULL));

-- One live row per replica index; a row being moved may stand beside its
-- replacement until its container is gone.
ALTER TABLE deployment_locations DROP CONSTRAINT deployment_locations_deployment_id_replica_index_key;
CREATE UNIQUE INDEX deployment_locations_live_index
    ON deployment_locations (deployment_id, replica_index) WHERE drain_state IS NULL;

-- Leader election: a lease. The holder renews it; another replica takes
-- over once it has expired. `term` grows with every new holder and fences
-- writes: a placement commits only while its term still holds the lease.
CREATE TABLE orchestrator_lease (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    holder      text NOT NULL,
    term        bigint NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- State that must survive orchestrator restarts and leader changes.
CREATE TABLE orchestrator_state (
    id                 boolean PRIMARY KEY DEFAULT true CHECK (id),
    -- The node round-robin chose last.
    round_robin_cursor text
);
INSERT INTO orchestrator_state (id) VALUES (true);
