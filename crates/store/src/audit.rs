//! The audit log: one row per mutating API call.

use chrono::{DateTime, Utc};
use flotilla_types::OrganizationId;

use crate::{Store, StoreError};

/// One mutating call and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub organization_id: OrganizationId,
    pub subject: String,
    pub method: String,
    pub target: String,
    /// `ok` or the Connect error code.
    pub code: String,
    pub message: Option<String>,
}

/// An entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRecord {
    pub at: DateTime<Utc>,
    pub subject: String,
    pub method: String,
    pub target: String,
    pub code: String,
    pub message: Option<String>,
}

impl Store {
    pub async fn record_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_log (organization_id, subject, method, target, code, message) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(entry.organization_id.as_uuid())
        .bind(&entry.subject)
        .bind(&entry.method)
        .bind(&entry.target)
        .bind(&entry.code)
        .bind(&entry.message)
        .execute(self.pool())
        .await
        .map_err(StoreError::db("writing the audit log"))?;
        Ok(())
    }
}
