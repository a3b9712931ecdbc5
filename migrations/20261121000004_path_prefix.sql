-- A deployment may serve only part of its domain: one domain plus path
-- prefix belongs to one live deployment.
ALTER TABLE deployments ADD COLUMN path_prefix text NOT NULL DEFAULT '/';
DROP INDEX deployments_domain_claim;
CREATE UNIQUE INDEX deployments_domain_claim
    ON deployments (domain, path_prefix) WHERE domain IS NOT NULL AND desired_state <> 'deleted';
