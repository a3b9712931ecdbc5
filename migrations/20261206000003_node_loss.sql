-- Issue 15: noticing a lost node within seconds, and what becomes of its
-- replicas.

-- When a node was last marked down. A node is back only once heard from
-- after that: one marked down early (its agent confirmed unreachable while
-- its last heartbeat is younger than the timeout) must not bounce back.
ALTER TABLE node_metadata
    ADD COLUMN down_at timestamptz,
    -- Set when the orchestrator found the node's agent unreachable (or
    -- fenced); cleared by its next heartbeat.
    ADD COLUMN unreachable_at timestamptz,
    -- How long the node's agent waits, cut off, before it stops its `fence`
    -- replicas (it says so in its heartbeats; NULL: it never fences).
    ADD COLUMN fence_after_ms bigint CHECK (fence_after_ms >= 0),
    -- Set by an agent stopping on purpose (an update, a restart); cleared
    -- by its next heartbeat. Its node is left to the heartbeat timeout, not
    -- taken down the moment its agent stops answering.
    ADD COLUMN agent_stopping_at timestamptz;

-- What happens to a replica whose node is lost: `fence` (at most one copy:
-- a cut-off node stops its copy before a replacement starts) or `replace`
-- (replaced at once; a cut-off node's copy runs on until it returns).
ALTER TABLE deployments
    ADD COLUMN node_loss text NOT NULL DEFAULT 'fence' CHECK (node_loss IN ('fence', 'replace'));
