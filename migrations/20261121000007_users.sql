-- People, as the identity provider names them, and their roles in
-- organizations. A user is created the first time a valid token is seen.
CREATE TABLE users (
    id            uuid PRIMARY KEY,
    -- The provider's `sub`: stable and unique for the one configured issuer.
    subject       text NOT NULL UNIQUE,
    email         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE organization_members (
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role            text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, user_id)
);
CREATE INDEX organization_members_by_user ON organization_members (user_id, created_at);
