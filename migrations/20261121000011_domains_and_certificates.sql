-- Custom domains: the TXT token given for one deployment and domain, until
-- it expires or is proven.
CREATE TABLE domain_verifications (
    deployment_id    uuid NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    domain           text NOT NULL,
    token            text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    verified_at      timestamptz,
    checked_at       timestamptz,
    last_error       text,
    PRIMARY KEY (deployment_id, domain)
);
CREATE INDEX domain_verifications_verified ON domain_verifications (domain) WHERE verified_at IS NOT NULL;

-- The ACME account per directory, its credentials sealed with the
-- certificate key (never stored in the clear).
CREATE TABLE acme_accounts (
    directory_url       text PRIMARY KEY,
    credentials_sealed  bytea NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- HTTP-01 challenges under way: any replica answers them.
CREATE TABLE acme_challenges (
    token              text PRIMARY KEY,
    key_authorization  text NOT NULL,
    domain             text NOT NULL,
    expires_at         timestamptz NOT NULL
);

-- One certificate per domain; the private key sealed (AES-256-GCM with a
-- key from a Docker secret).
CREATE TABLE certificates (
    domain           text PRIMARY KEY,
    chain_pem        text,
    key_sealed       bytea,
    not_after        timestamptz,
    issued_at        timestamptz,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'issued', 'failed')),
    last_error       text,
    failures         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
