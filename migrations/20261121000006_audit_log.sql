-- Every mutating API call: who, what, when, and how it ended.
CREATE TABLE audit_log (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    organization_id uuid REFERENCES organizations (id) ON DELETE CASCADE,
    subject         text NOT NULL,
    method          text NOT NULL,
    -- The resource acted on (a deployment or node id; the name asked for
    -- when a create failed).
    target          text NOT NULL,
    -- "ok" or the Connect error code.
    code            text NOT NULL,
    message         text
);
CREATE INDEX audit_log_by_organization ON audit_log (organization_id, at DESC);
