//! Custom domains and their certificates: verification tokens (per
//! organization, through [`crate::Tenant`]), and the cluster-wide side the
//! certificate manager and the edge read: which domains want a certificate,
//! the certificates, ACME challenges under way and the ACME account.

use chrono::{DateTime, Utc};
use flotilla_types::DeploymentId;
use sqlx::Postgres;
use sqlx::pool::PoolConnection;

use crate::{Store, StoreError};

/// A verification token of one deployment and domain.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DomainVerification {
    pub domain: String,
    pub token: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub verified_at: Option<DateTime<Utc>>,
    pub checked_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

impl DomainVerification {
    /// Still usable for a check: not proven yet and not expired.
    pub fn pending(&self, now: DateTime<Utc>) -> bool {
        self.verified_at.is_none() && self.expires_at > now
    }
}

const VERIFICATION_COLUMNS: &str = "domain, token, created_at, expires_at, verified_at, checked_at, last_error";

/// A certificate's state as users see it (never the key).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CertificateStatus {
    pub domain: String,
    /// `pending`, `issued` or `failed`.
    pub status: String,
    pub not_after: Option<DateTime<Utc>>,
    pub issued_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub failures: i32,
    pub next_attempt_at: DateTime<Utc>,
}

const CERTIFICATE_STATUS_COLUMNS: &str = "domain, status, not_after, issued_at, last_error, failures, next_attempt_at";

/// A domain that should have a certificate, and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CertificateNeed {
    pub domain: String,
    /// A deployment routing it proved it (a custom domain needs that).
    pub verified: bool,
    pub not_after: Option<DateTime<Utc>>,
    pub failures: Option<i32>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// An issued certificate with its sealed key.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredCertificate {
    pub domain: String,
    pub chain_pem: String,
    pub key_sealed: Vec<u8>,
    pub not_after: DateTime<Utc>,
}

impl crate::Tenant<'_> {
    /// The token of one of the organization's deployments for `domain`.
    pub async fn domain_verification(
        &self,
        deployment: DeploymentId,
        domain: &str,
    ) -> Result<Option<DomainVerification>, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {VERIFICATION_COLUMNS} FROM domain_verifications v \
             WHERE v.deployment_id = $1 AND v.domain = $2 AND v.organization_id = $3"
        )))
        .bind(deployment.as_uuid())
        .bind(domain)
        .bind(self.organization_id.as_uuid())
        .fetch_optional(self.pool)
        .await
        .map_err(StoreError::db("reading a domain verification"))
    }

    /// Gives `token` for the deployment and domain unless a token is already
    /// proven or still pending (that one is kept: a second request does not
    /// invalidate a record the user may be publishing). Returns the token in
    /// force.
    pub async fn issue_domain_token(
        &self,
        deployment: DeploymentId,
        domain: &str,
        token: &str,
        valid_for: chrono::Duration,
    ) -> Result<DomainVerification, StoreError> {
        let issued: Option<DomainVerification> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO domain_verifications AS v (deployment_id, organization_id, domain, token, expires_at) \
             SELECT d.id, d.organization_id, $2, $3, now() + $4 FROM deployments d \
             WHERE d.id = $1 AND d.organization_id = $5 \
             ON CONFLICT (deployment_id, domain) DO UPDATE \
             SET token = excluded.token, created_at = now(), expires_at = excluded.expires_at, \
                 checked_at = NULL, last_error = NULL \
             WHERE v.verified_at IS NULL AND v.expires_at <= now() \
             RETURNING {VERIFICATION_COLUMNS}"
        )))
        .bind(deployment.as_uuid())
        .bind(domain)
        .bind(token)
        .bind(valid_for)
        .bind(self.organization_id.as_uuid())
        .fetch_optional(self.pool)
        .await
        .map_err(StoreError::db("issuing a domain token"))?;
        match issued {
            Some(issued) => Ok(issued),
            None => self
                .domain_verification(deployment, domain)
                .await?
                .ok_or_else(|| StoreError::NotFound { entity: "deployment", id: deployment.to_string() }),
        }
    }

    /// Records a check of a pending token: proven (`error` is `None`) or
    /// not, and why. A token that expired meanwhile is not proven by it.
    pub async fn record_domain_check(
        &self,
        deployment: DeploymentId,
        domain: &str,
        token: &str,
        error: Option<&str>,
    ) -> Result<DomainVerification, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE domain_verifications SET checked_at = now(), last_error = $4, \
             verified_at = CASE WHEN $4::text IS NULL AND expires_at > now() THEN now() END \
             WHERE deployment_id = $1 AND domain = $2 AND token = $3 AND organization_id = $5 \
             AND verified_at IS NULL \
             RETURNING {VERIFICATION_COLUMNS}"
        )))
        .bind(deployment.as_uuid())
        .bind(domain)
        .bind(token)
        .bind(error)
        .bind(self.organization_id.as_uuid())
        .fetch_optional(self.pool)
        .await
        .map_err(StoreError::db("recording a domain check"))?
        .ok_or_else(|| StoreError::Conflict {
            what: format!("the token for {domain} changed while it was checked; check again"),
        })
    }

    /// The certificate of `domain`, if one of the organization's deployments
    /// routes it.
    pub async fn certificate_status(
        &self,
        deployment: DeploymentId,
        domain: &str,
    ) -> Result<Option<CertificateStatus>, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {CERTIFICATE_STATUS_COLUMNS} FROM certificates c WHERE c.domain = $2 \
             AND EXISTS (SELECT 1 FROM deployments d WHERE d.id = $1 AND d.organization_id = $3 AND d.domain = $2)"
        )))
        .bind(deployment.as_uuid())
        .bind(domain)
        .bind(self.organization_id.as_uuid())
        .fetch_optional(self.pool)
        .await
        .map_err(StoreError::db("reading a certificate's status"))
    }
}

/// Holds one certificate's ordering lock (a PostgreSQL session advisory
/// lock): released by [`CertificateLock::release`], or by PostgreSQL when
/// the connection ends, so a crashed orderer never blocks the domain.
pub struct CertificateLock {
    connection: PoolConnection<Postgres>,
    domain: String,
}

/// Advisory lock class of certificate orders (the second key is the domain's hash).
const CERTIFICATE_LOCK_CLASS: i32 = 0x0ce7;

impl CertificateLock {
    pub async fn release(mut self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(CERTIFICATE_LOCK_CLASS)
            .bind(&self.domain)
            .execute(&mut *self.connection)
            .await
            .map_err(StoreError::db("releasing a certificate lock"))?;
        Ok(())
    }
}

impl Store {
    /// Routed TLS domains of running deployments that could want a
    /// certificate from Flotilla, and whether their deployment proved them
    /// (the caller decides about platform domains). Wildcards are left out
    /// (HTTP-01 cannot prove them).
    pub async fn certificate_needs(&self) -> Result<Vec<CertificateNeed>, StoreError> {
        sqlx::query_as(
            "SELECT r.domain, bool_or(EXISTS (SELECT 1 FROM domain_verifications v WHERE v.deployment_id = d.id \
                       AND v.domain = r.domain AND v.verified_at IS NOT NULL)) AS verified, \
             c.not_after, c.failures, c.next_attempt_at \
             FROM deployment_routing r JOIN deployments d ON d.id = r.deployment_id \
             LEFT JOIN certificates c ON c.domain = r.domain \
             WHERE d.desired_state = 'running' AND r.domain NOT LIKE '*.%' AND r.tls_enabled \
             GROUP BY r.domain, c.not_after, c.failures, c.next_attempt_at ORDER BY r.domain",
        )
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::db("reading the domains that want certificates"))
    }

    /// Takes the ordering lock of `domain` if no one holds it.
    pub async fn try_lock_certificate(&self, domain: &str) -> Result<Option<CertificateLock>, StoreError> {
        let mut connection = self.pool().acquire().await.map_err(StoreError::db("locking a certificate"))?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(CERTIFICATE_LOCK_CLASS)
            .bind(domain)
            .fetch_one(&mut *connection)
            .await
            .map_err(StoreError::db("locking a certificate"))?;
        Ok(locked.then(|| CertificateLock { connection, domain: domain.to_owned() }))
    }

    pub async fn save_certificate(
        &self,
        domain: &str,
        chain_pem: &str,
        key_sealed: &[u8],
        not_after: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO certificates (domain, chain_pem, key_sealed, not_after, issued_at, status, failures, \
             last_error, next_attempt_at, updated_at) \
             VALUES ($1, $2, $3, $4, now(), 'issued', 0, NULL, now(), now()) \
             ON CONFLICT (domain) DO UPDATE SET chain_pem = excluded.chain_pem, key_sealed = excluded.key_sealed, \
             not_after = excluded.not_after, issued_at = now(), status = 'issued', failures = 0, \
             last_error = NULL, next_attempt_at = now(), updated_at = now()",
        )
        .bind(domain)
        .bind(chain_pem)
        .bind(key_sealed)
        .bind(not_after)
        .execute(self.pool())
        .await
        .map_err(StoreError::db("saving a certificate"))?;
        Ok(())
    }

    /// Records a failed order: the error, one more failure, and when to try
    /// again. An issued certificate stays served (and `issued`) until it
    /// expires; only the error and the retry time are added.
    pub async fn record_certificate_failure(
        &self,
        domain: &str,
        error: &str,
        next_attempt_at: DateTime<Utc>,
    ) -> Result<i32, StoreError> {
        sqlx::query_scalar(
            "INSERT INTO certificates (domain, status, last_error, failures, next_attempt_at, updated_at) \
             VALUES ($1, 'failed', $2, 1, $3, now()) \
             ON CONFLICT (domain) DO UPDATE SET last_error = excluded.last_error, \
             failures = certificates.failures + 1, next_attempt_at = excluded.next_attempt_at, updated_at = now(), \
             status = CASE WHEN certificates.status = 'issued' AND certificates.not_after > now() \
                           THEN 'issued' ELSE 'failed' END \
             RETURNING failures",
        )
        .bind(domain)
        .bind(error)
        .bind(next_attempt_at)
        .fetch_one(self.pool())
        .await
        .map_err(StoreError::db("recording a certificate failure"))
    }

    /// Issued, unexpired certificates of domains the route table routes.
    pub async fn routed_certificates(&self) -> Result<Vec<StoredCertificate>, StoreError> {
        sqlx::query_as(
            "SELECT c.domain, c.chain_pem, c.key_sealed, c.not_after FROM certificates c \
             WHERE c.chain_pem IS NOT NULL AND c.key_sealed IS NOT NULL AND c.not_after > now() \
             AND EXISTS (SELECT 1 FROM deployment_routing r JOIN deployments d ON d.id = r.deployment_id \
                         WHERE r.domain = c.domain AND d.desired_state = 'running') \
             ORDER BY c.domain",
        )
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::db("reading certificates"))
    }

    /// The stored certificate of `domain` (issued or not).
    pub async fn certificate(&self, domain: &str) -> Result<Option<StoredCertificate>, StoreError> {
        sqlx::query_as(
            "SELECT domain, chain_pem, key_sealed, not_after FROM certificates \
             WHERE domain = $1 AND chain_pem IS NOT NULL AND key_sealed IS NOT NULL AND not_after IS NOT NULL",
        )
        .bind(domain)
        .fetch_optional(self.pool())
        .await
        .map_err(StoreError::db("reading a certificate"))
    }

    pub async fn put_acme_challenge(
        &self,
        token: &str,
        key_authorization: &str,
        domain: &str,
        valid_for: chrono::Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO acme_challenges (token, key_authorization, domain, expires_at) \
             VALUES ($1, $2, $3, now() + $4) ON CONFLICT (token) DO UPDATE \
             SET key_authorization = excluded.key_authorization, expires_at = excluded.expires_at",
        )
        .bind(token)
        .bind(key_authorization)
        .bind(domain)
        .bind(valid_for)
        .execute(self.pool())
        .await
        .map_err(StoreError::db("saving an ACME challenge"))?;
        Ok(())
    }

    /// The key authorization for `token`, while the challenge is under way.
    pub async fn acme_challenge(&self, token: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT key_authorization FROM acme_challenges WHERE token = $1 AND expires_at > now()")
            .bind(token)
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::db("reading an ACME challenge"))
    }

    /// Removes the challenges of `domain` and any expired one.
    pub async fn clear_acme_challenges(&self, domain: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM acme_challenges WHERE domain = $1 OR expires_at <= now()")
            .bind(domain)
            .execute(self.pool())
            .await
            .map_err(StoreError::db("clearing ACME challenges"))?;
        Ok(())
    }

    pub async fn acme_account(&self, directory_url: &str) -> Result<Option<Vec<u8>>, StoreError> {
        sqlx::query_scalar("SELECT credentials_sealed FROM acme_accounts WHERE directory_url = $1")
            .bind(directory_url)
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::db("reading the ACME account"))
    }

    /// Saves the account unless one was saved meanwhile; returns the one kept.
    pub async fn save_acme_account(&self, directory_url: &str, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        sqlx::query_scalar(
            "WITH inserted AS (INSERT INTO acme_accounts (directory_url, credentials_sealed) VALUES ($1, $2) \
             ON CONFLICT (directory_url) DO NOTHING RETURNING credentials_sealed) \
             SELECT credentials_sealed FROM inserted \
             UNION ALL SELECT credentials_sealed FROM acme_accounts WHERE directory_url = $1 LIMIT 1",
        )
        .bind(directory_url)
        .bind(sealed)
        .fetch_one(self.pool())
        .await
        .map_err(StoreError::db("saving the ACME account"))
    }
}
