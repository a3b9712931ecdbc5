-- The control database: tenants, desired state (deployments), observed state
-- (deployment_locations), nodes and routing. Column names follow the Obiente
-- reference design where it names them.

CREATE TABLE organizations (
    id          uuid PRIMARY KEY,
    slug        text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projects (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name             text NOT NULL CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    is_default       boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organization_id, name),
    -- Lets deployments reference (project, organization) together, so a
    -- deployment can never sit in another organization's project.
    UNIQUE (id, organization_id)
);
CREATE UNIQUE INDEX projects_one_default_per_organization
    ON projects (organization_id) WHERE is_default;

-- Nodes register themselves through their agent's heartbeat.
CREATE TABLE node_metadata (
    node_id             text PRIMARY KEY,
    hostname            text NOT NULL,
    -- Where other nodes and the edge proxy reach this node's published ports.
    address             text NOT NULL,
    role                text NOT NULL DEFAULT 'standalone'
                        CHECK (role IN ('manager', 'worker', 'standalone')),
    -- Set by operators (drain/activate); heartbeats never overwrite it.
    availability        text NOT NULL DEFAULT 'active'
                        CHECK (availability IN ('active', 'pause', 'drain')),
    -- Set by the orchestrator's health watch.
    status              text NOT NULL DEFAULT 'ready'
                        CHECK (status IN ('ready', 'suspect', 'down')),
    labels              jsonb NOT NULL DEFAULT '{}',
    total_cpu_millis    bigint NOT NULL DEFAULT 0 CHECK (total_cpu_millis >= 0),
    total_memory_bytes  bigint NOT NULL DEFAULT 0 CHECK (total_memory_bytes >= 0),
    used_cpu_millis     bigint NOT NULL DEFAULT 0 CHECK (used_cpu_millis >= 0),
    used_memory_bytes   bigint NOT NULL DEFAULT 0 CHECK (used_memory_bytes >= 0),
    deployment_count    integer NOT NULL DEFAULT 0 CHECK (deployment_count >= 0),
    max_deployments     integer NOT NULL DEFAULT 100 CHECK (max_deployments >= 0),
    agent_version       text NOT NULL DEFAULT '',
    last_heartbeat      timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- Desired state: what users asked for.
CREATE TABLE deployments (
    id                  uuid PRIMARY KEY,
    organization_id     uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    project_id          uuid NOT NULL,
    name                text NOT NULL CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    image               text NOT NULL CHECK (length(image) BETWEEN 1 AND 512),
    container_port      integer NOT NULL CHECK (container_port BETWEEN 1 AND 65535),
    -- [{"name": .., "value": .., "secret": bool}]
    env                 jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(env) = 'array'),
    domain              text CHECK (domain IS NULL OR length(domain) BETWEEN 1 AND 253),
    memory_limit_bytes  bigint NOT NULL DEFAULT 0 CHECK (memory_limit_bytes >= 0),
    cpu_limit_millis    bigint NOT NULL DEFAULT 0 CHECK (cpu_limit_millis >= 0),
    replicas            integer NOT NULL DEFAULT 1 CHECK (replicas >= 0),
    desired_state       text NOT NULL DEFAULT 'running'
                        CHECK (desired_state IN ('running', 'deleted')),
    generation          bigint NOT NULL DEFAULT 1 CHECK (generation >= 1),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (project_id, organization_id)
        REFERENCES projects (id, organization_id) ON DELETE CASCADE,
    UNIQUE (project_id, name)
);
CREATE INDEX deployments_by_organization ON deployments (organization_id, id);
-- One domain belongs to one live deployment.
CREATE UNIQUE INDEX deployments_domain_claim
    ON deployments (domain) WHERE domain IS NOT NULL AND desired_state <> 'deleted';
CREATE INDEX deployments_not_running ON deployments (id) WHERE desired_state <> 'running';

-- Observed state: one row per placed replica, owned by the agent of node_id.
CREATE TABLE deployment_locations (
    id               uuid PRIMARY KEY,
    deployment_id    uuid NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    node_id          text NOT NULL REFERENCES node_metadata (node_id),
    replica_index    integer NOT NULL CHECK (replica_index >= 0),
    generation       bigint NOT NULL,
    container_id     text,
    container_name   text,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'creating', 'running', 'stopped', 'failed', 'removing')),
    -- The node's address and the host port the app is published on.
    address          text,
    port             integer CHECK (port BETWEEN 1 AND 65535),
    container_port   integer NOT NULL CHECK (container_port BETWEEN 1 AND 65535),
    domain           text,
    health_status    text NOT NULL DEFAULT 'unknown'
                     CHECK (health_status IN ('unknown', 'starting', 'healthy', 'unhealthy', 'none')),
    resource_usage   jsonb NOT NULL DEFAULT '{}',
    -- Container labels chosen by the orchestrator (Traefik routing included).
    labels           jsonb NOT NULL DEFAULT '{}',
    status_message   text,
    started_at       timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (deployment_id, replica_index)
);
CREATE INDEX deployment_locations_by_node ON deployment_locations (node_id);
CREATE UNIQUE INDEX deployment_locations_container
    ON deployment_locations (container_id) WHERE container_id IS NOT NULL;
CREATE UNIQUE INDEX deployment_locations_node_port
    ON deployment_locations (node_id, port) WHERE port IS NOT NULL;

-- How traffic reaches a deployment; written by the orchestrator together with
-- the placement, in one transaction.
CREATE TABLE deployment_routing (
    id                  uuid PRIMARY KEY,
    deployment_id       uuid NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    domain              text NOT NULL CHECK (length(domain) BETWEEN 1 AND 253),
    path_prefix         text NOT NULL DEFAULT '/' CHECK (path_prefix LIKE '/%'),
    target_port         integer NOT NULL CHECK (target_port BETWEEN 1 AND 65535),
    protocol            text NOT NULL DEFAULT 'http' CHECK (protocol IN ('http', 'h2c')),
    tls_enabled         boolean NOT NULL DEFAULT false,
    cert_resolver       text,
    middlewares         text[] NOT NULL DEFAULT '{}',
    load_balancer_algo  text NOT NULL DEFAULT 'round-robin',
    router_name         text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain, path_prefix)
);
CREATE INDEX deployment_routing_by_deployment ON deployment_routing (deployment_id);
