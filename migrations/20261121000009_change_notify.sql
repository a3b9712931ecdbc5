-- Deployment changes announced with NOTIFY, so API replicas can push status
-- to watching clients as it changes instead of polling. The payload is the
-- deployment's id; listeners re-read what they need.
CREATE FUNCTION flotilla_notify_deployment_change() RETURNS trigger AS $$
BEGIN
    IF TG_TABLE_NAME = 'deployments' THEN
        PERFORM pg_notify('flotilla_deployment_changed', COALESCE(NEW.id, OLD.id)::text);
    ELSE
        PERFORM pg_notify('flotilla_deployment_changed', COALESCE(NEW.deployment_id, OLD.deployment_id)::text);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER deployments_notify AFTER INSERT OR UPDATE OR DELETE ON deployments
    FOR EACH ROW EXECUTE FUNCTION flotilla_notify_deployment_change();
CREATE TRIGGER deployment_locations_notify AFTER INSERT OR UPDATE OR DELETE ON deployment_locations
    FOR EACH ROW EXECUTE FUNCTION flotilla_notify_deployment_change();
