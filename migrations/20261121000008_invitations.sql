-- Invitations into an organization, bound to an email address. Only the
-- SHA-256 of the secret token is kept: the token is shown once, to the
-- inviter.
CREATE TABLE organization_invitations (
    id              uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    email           text NOT NULL,
    role            text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    token_sha256    bytea NOT NULL UNIQUE,
    invited_by      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    accepted_at     timestamptz
);
CREATE INDEX organization_invitations_pending
    ON organization_invitations (organization_id) WHERE accepted_at IS NULL;
