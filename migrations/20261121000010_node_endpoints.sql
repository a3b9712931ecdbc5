-- Where each node's agent serves its internal endpoints (container logs), as
-- its daemon announced at start. The API reaches a replica's logs there.
CREATE TABLE node_endpoints (
    node_id     text PRIMARY KEY,
    agent_url   text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
