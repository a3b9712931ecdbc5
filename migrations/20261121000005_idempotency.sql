-- Idempotency keys of CreateDeployment: a retried request with the same key
-- returns the deployment the first one created. Written in the transaction
-- that creates the deployment, so a key never exists without its result.
CREATE TABLE idempotency_keys (
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    subject         text NOT NULL,
    key             text NOT NULL,
    -- sha256 of the request as validated: the same key with another request is refused.
    request_digest  bytea NOT NULL,
    deployment_id   uuid NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, subject, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
