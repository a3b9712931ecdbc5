-- The node agent's full lifecycle: restart policy, health checks, networks,
-- stopping without deleting, and start-first rolling updates.

ALTER TABLE deployments
    DROP CONSTRAINT deployments_desired_state_check,
    ADD CONSTRAINT deployments_desired_state_check
        CHECK (desired_state IN ('running', 'stopped', 'deleted')),
    -- {"kind": "no" | "on-failure" | "always" | "unless-stopped", "max_retries": n}
    ADD COLUMN restart_policy jsonb NOT NULL DEFAULT '{"kind": "unless-stopped"}',
    -- {"kind": "none" | "tcp" | "http" | "command", ...}; see flotilla_types::health
    ADD COLUMN health_check jsonb NOT NULL DEFAULT '{"kind": "tcp"}',
    -- 'shared': the node's flotilla-apps network; 'isolated': a network of its own
    ADD COLUMN network_mode text NOT NULL DEFAULT 'shared'
        CHECK (network_mode IN ('shared', 'isolated'));

ALTER TABLE deployment_locations
    -- The generation the orchestrator has prepared this replica for (its
    -- labels and route); the agent brings the container to it. `generation`
    -- stays the generation the running container was made from.
    ADD COLUMN target_generation bigint,
    -- The generation a rollout to which failed on this replica (and was rolled
    -- back); the agent does not retry it until the deployment changes again.
    ADD COLUMN failed_generation bigint,
    ADD COLUMN rollout_message text,
    -- When the agent last saw the replica's health.
    ADD COLUMN health_checked_at timestamptz;

UPDATE deployment_locations SET target_generation = generation;
ALTER TABLE deployment_locations ALTER COLUMN target_generation SET NOT NULL;

-- Adoption: a managed container found without its row gets one back; the
-- agent needs to find rows of a deployment by index quickly.
CREATE INDEX deployment_locations_by_deployment_index
    ON deployment_locations (deployment_id, replica_index);
