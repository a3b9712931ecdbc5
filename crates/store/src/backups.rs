//! Base backups of the control database, as the data plane's backup task
//! records them (it writes the rows; Flotilla only reads them).

use chrono::{DateTime, Utc};

use crate::{Store, StoreError};

/// One backup attempt.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DatabaseBackup {
    pub label: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub succeeded: bool,
    pub size_bytes: Option<i64>,
    pub wal_start: Option<String>,
    pub location: String,
    pub error: Option<String>,
}

/// The latest attempts and the last one that succeeded (which may be older
/// than all of them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupHistory {
    pub recent: Vec<DatabaseBackup>,
    pub last_good: Option<DatabaseBackup>,
}

macro_rules! backup_columns {
    () => {
        "label, started_at, finished_at, succeeded, size_bytes, wal_start, location, error"
    };
}

impl Store {
    pub async fn database_backups(&self, limit: i64) -> Result<BackupHistory, StoreError> {
        let recent = sqlx::query_as::<_, DatabaseBackup>(concat!(
            "SELECT ",
            backup_columns!(),
            " FROM database_backups ORDER BY finished_at DESC, id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::db("reading the backups"))?;
        let last_good = match recent.iter().find(|b| b.succeeded) {
            Some(good) => Some(good.clone()),
            None => sqlx::query_as::<_, DatabaseBackup>(concat!(
                "SELECT ",
                backup_columns!(),
                " FROM database_backups WHERE succeeded ORDER BY finished_at DESC, id DESC LIMIT 1"
            ))
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::db("reading the last good backup"))?,
        };
        Ok(BackupHistory { recent, last_good })
    }
}
