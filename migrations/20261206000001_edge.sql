-- The edge has one road: the route table Traefik takes from the
-- orchestrators (issue 14). Traefik labels on containers are gone, and with
-- them the column that carried them to the agents.
ALTER TABLE deployment_locations DROP COLUMN labels;

-- Routing rows keep what the route table reads. The router's name follows
-- from the deployment id and the target port from the deployment; protocol,
-- middlewares and the balancing algorithm were never set by anything.
ALTER TABLE deployment_routing
    DROP COLUMN router_name,
    DROP COLUMN target_port,
    DROP COLUMN protocol,
    DROP COLUMN middlewares,
    DROP COLUMN load_balancer_algo;

-- The edge proxies that take the route table, and which table each holds:
-- `snapshot` is the PostgreSQL snapshot (pg_snapshot, as text) the newest
-- table it has taken in was read in. Agents wait for every proxy seen
-- lately to hold a table that no longer sends traffic to a container
-- before they stop it.
CREATE TABLE edge_proxies (
    id             text PRIMARY KEY,
    name           text NOT NULL,
    address        text NOT NULL,
    snapshot       text,
    applied_at     timestamptz,
    seen_at        timestamptz NOT NULL DEFAULT now(),
    first_seen_at  timestamptz NOT NULL DEFAULT now()
);

-- One notice on whatever the route table reads changing, so the table is
-- rendered once per change and never per poll. Notices with the same
-- payload in one transaction are sent once.
CREATE FUNCTION flotilla_notify_routes() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('flotilla_routes_changed', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER deployment_routing_routes AFTER INSERT OR UPDATE OR DELETE ON deployment_routing
    FOR EACH STATEMENT EXECUTE FUNCTION flotilla_notify_routes();
CREATE TRIGGER deployment_locations_routes AFTER INSERT OR DELETE ON deployment_locations
    FOR EACH STATEMENT EXECUTE FUNCTION flotilla_notify_routes();
CREATE TRIGGER deployment_locations_routes_updated AFTER UPDATE ON deployment_locations
    FOR EACH ROW WHEN (
        OLD.status IS DISTINCT FROM NEW.status
        OR OLD.health_status IS DISTINCT FROM NEW.health_status
        OR OLD.address IS DISTINCT FROM NEW.address
        OR OLD.port IS DISTINCT FROM NEW.port
        OR OLD.drain_state IS DISTINCT FROM NEW.drain_state
        OR OLD.node_id IS DISTINCT FROM NEW.node_id
        OR OLD.replica_index IS DISTINCT FROM NEW.replica_index)
    EXECUTE FUNCTION flotilla_notify_routes();
CREATE TRIGGER deployments_routes AFTER DELETE ON deployments
    FOR EACH STATEMENT EXECUTE FUNCTION flotilla_notify_routes();
CREATE TRIGGER deployments_routes_updated AFTER UPDATE ON deployments
    FOR EACH ROW WHEN (
        OLD.desired_state IS DISTINCT FROM NEW.desired_state
        OR OLD.replicas IS DISTINCT FROM NEW.replicas)
    EXECUTE FUNCTION flotilla_notify_routes();
CREATE TRIGGER node_metadata_routes_updated AFTER UPDATE ON node_metadata
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION flotilla_notify_routes();
CREATE TRIGGER domain_verifications_routes AFTER INSERT OR DELETE ON domain_verifications
    FOR EACH STATEMENT EXECUTE FUNCTION flotilla_notify_routes();
CREATE TRIGGER domain_verifications_routes_updated AFTER UPDATE ON domain_verifications
    FOR EACH ROW WHEN (OLD.verified_at IS DISTINCT FROM NEW.verified_at)
    EXECUTE FUNCTION flotilla_notify_routes();
CREATE TRIGGER certificates_routes AFTER INSERT OR DELETE ON certificates
    FOR EACH STATEMENT EXECUTE FUNCTION flotilla_notify_routes();
CREATE TRIGGER certificates_routes_updated AFTER UPDATE ON certificates
    FOR EACH ROW WHEN (
        OLD.chain_pem IS DISTINCT FROM NEW.chain_pem
        OR OLD.key_sealed IS DISTINCT FROM NEW.key_sealed
        OR OLD.not_after IS DISTINCT FROM NEW.not_after)
    EXECUTE FUNCTION flotilla_notify_routes();
